//! Data-parallel training across processes: a real coordinator and 2 or 3 real `ladder-worker`
//! processes on loopback train `tiny` on a synthetic JPEG dataset through three size stages.

mod common;

use common::{Cluster, EPOCHS, STEPS_PER_EPOCH, assert_every_sample_once, write_spec};
use ladder_core::stage::StagePlan;
use ladder_proto::v1 as pb;
use std::path::PathBuf;
use std::time::Duration;

/// Trains the cluster spec on `workers` workers started with `flags`.
fn train_with(workers: u32, flags: &[&str]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = write_spec(dir.path(), (workers, workers), 25, 1);
    let plan = StagePlan::new(&spec);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers_with(workers as usize, flags);
    let digests: Vec<PathBuf> = (0..workers)
        .map(|i| dir.path().join(format!("digests-{i}.txt")))
        .collect();
    let id = cluster.submit(&spec);
    let seen = cluster.watch_until_ended(&id, Duration::from_secs(600));
    let logs_text = || cluster.logs();
    let last = seen.last().expect("the job was seen");
    assert_eq!(
        pb::JobState::try_from(last.state),
        Ok(pb::JobState::Completed),
        "{}\n{}",
        last.message,
        logs_text()
    );
    let progress = last.progress.expect("progress");

    assert_every_sample_once(last, &spec);

    // One graph build per distinct shape, and the shapes are the stages'.
    assert_eq!(plan.stage_count(), 3);
    assert_eq!(plan.distinct_shapes(), 3);
    assert_eq!(progress.graph_builds, 3, "{}", logs_text());

    // The loss falls and the EMA model is far better than chance (10%).
    let losses: Vec<(u64, f32)> = seen
        .iter()
        .filter_map(|j| j.progress)
        .filter(|p| p.global_step > 0)
        .map(|p| (p.global_step, p.loss))
        .collect();
    let (first, final_loss) = (losses.first().unwrap().1, losses.last().unwrap().1);
    eprintln!(
        "{workers} workers: loss {first:.3} -> {final_loss:.3}, top-1 {:.3}, top-5 {:.3}",
        progress.eval_top1, progress.eval_top5
    );
    assert!(
        final_loss < 0.8 * first,
        "the loss fell from {first} to {final_loss}: {losses:?}"
    );
    assert_eq!(progress.eval_epoch, 6, "evaluated after the last epoch");
    assert!(
        progress.eval_top1 > 0.4,
        "top-1 {} after training",
        progress.eval_top1
    );
    let stage_evaluations: Vec<u32> = {
        let mut epochs: Vec<u32> = seen
            .iter()
            .filter_map(|j| j.progress)
            .map(|p| p.eval_epoch)
            .filter(|&e| e > 0)
            .collect();
        epochs.dedup();
        epochs
    };
    assert_eq!(stage_evaluations, vec![2, 4, 6], "one evaluation per stage");

    // Each rank logs its precision, and every epoch's throughput and the share of it spent
    // waiting for data.
    let precision = if flags.contains(&"bfloat16") {
        "precision=Bfloat16"
    } else {
        "precision=Float32"
    };
    for worker in &cluster.workers {
        let log = worker.log_text();
        assert!(log.contains(precision), "{precision} expected: {log}");
        let epochs: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("epoch trained on this rank"))
            .collect();
        assert_eq!(epochs.len(), EPOCHS as usize, "{log}");
        assert!(
            epochs
                .iter()
                .all(|l| l.contains("images_per_second=") && l.contains("waiting_for_data=")),
            "{epochs:?}"
        );
    }

    // After every step all ranks hold the same bytes.
    let steps_per_epoch = STEPS_PER_EPOCH as usize;
    let texts: Vec<String> = digests
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("digest file"))
        .collect();
    assert_eq!(
        texts[0].lines().count(),
        EPOCHS as usize * steps_per_epoch,
        "a line per step"
    );
    for (rank, text) in texts.iter().enumerate().skip(1) {
        for (a, b) in texts[0].lines().zip(text.lines()) {
            assert_eq!(a, b, "replica {rank} differs");
        }
    }

    // Checkpoints were committed, the last one at the end of the run; retention (keep = 1)
    // kept the three stage ends (steps 20, 40, 60) and deleted the others (25, 50) from disk.
    let committed: Vec<u64> = last.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(committed, vec![20, 40, 60], "{:?}", last.checkpoints);
    let first = common::checkpoint_dir(last, &last.checkpoints[0]);
    let job_dir = first.parent().unwrap();
    // Beside the checkpoints: the job's TensorBoard run.
    let mut on_disk: Vec<String> = std::fs::read_dir(job_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "tensorboard")
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = last.checkpoints.iter().map(|c| c.id.clone()).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "retired checkpoints are deleted, kept ones are not"
    );
    for c in &last.checkpoints {
        ladder_train::checkpoint::verify(&common::checkpoint_dir(last, c))
            .expect("a committed checkpoint verifies");
    }
}

#[test]
fn two_workers_train_through_three_stages_in_lockstep() {
    train_with(2, &[]);
}

#[test]
fn three_workers_train_through_three_stages_in_lockstep() {
    train_with(3, &[]);
}

/// What a GPU computes in (bfloat16 autocast, channels-last weights, gradients and
/// activations), on CPU workers: the same checks as in float32.
#[test]
fn two_workers_train_in_bfloat16_and_channels_last() {
    train_with(2, &["--precision", "bfloat16"]);
}
