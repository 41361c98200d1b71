//! Data-parallel training across processes: a real coordinator and 2 or 3 real `ladder-worker`
//! processes on loopback train `tiny` on a synthetic JPEG dataset through three size stages.

use ladder_core::spec::JobSpec;
use ladder_core::stage::StagePlan;
use ladder_proto::v1 as pb;
use ladder_testkit::{CoordinatorProcess, SUBMIT_TOKEN, WorkerProcess, job_client};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Three stages (32, 48 and 64 px) of two epochs; micro-batches of 16, 8 and 8 make 6, 12 and
/// 12 per global batch of 96, which 1, 2 and 3 ranks all divide.
fn write_spec(dir: &Path, workers: u32) -> PathBuf {
    let data = dir.join("data");
    let train = ladder_data::synth::write(&data.join("train"), 10, 960, 4, 1).expect("train split");
    let val = ladder_data::synth::write(&data.join("val"), 10, 200, 2, 2).expect("held-out split");
    let text = format!(
        r#"[job]
name = "cluster"
[model]
variant = "tiny"
classes = 10
[data]
manifest = "{train}"
eval_manifest = "{val}"
decode_threads = 1
[schedule]
epochs = 6
stage_epochs = 2
seed = 7
min_size = 32
max_size = 64
eval_size = 64
min_dropout = 0.0
max_dropout = 0.1
stochastic_depth = 0.1
min_randaugment = 2
max_randaugment = 6
[optimizer]
lr_per_256 = 0.064
warmup_epochs = 1
[batch]
global = 96
micro_at_max_size = 8
micro_max = 16
[checkpoint]
dir = "checkpoints"
every_steps = 25
keep = 1
[workers]
min = {workers}
max = {workers}
"#,
        train = train.manifest_path.display(),
        val = val.manifest_path.display(),
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("writing the spec");
    path
}

/// Submits the spec and follows the job until it ends; returns every state it was seen in.
fn run_job(url: &str, spec: &JobSpec, timeout: Duration) -> Vec<pb::Job> {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        let mut client = job_client(url, SUBMIT_TOKEN).await;
        let job = client
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec.to_toml(),
            })
            .await
            .expect("submit")
            .into_inner()
            .job
            .expect("a job");
        let mut events = client
            .watch_job(pb::WatchJobRequest { id: job.id })
            .await
            .expect("watch")
            .into_inner();
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.message()).await {
                Ok(Ok(Some(event))) => seen.extend(event.job),
                Ok(Ok(None)) => return seen,
                Ok(Err(status)) => panic!("watch failed: {status}"),
                Err(_) => panic!(
                    "the job did not end within {timeout:?}; last seen: {:#?}",
                    seen.last()
                ),
            }
        }
    })
}

fn train_with(workers: u32) {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec_path = write_spec(dir.path(), workers);
    let spec = JobSpec::load(&spec_path).expect("a valid spec");
    let plan = StagePlan::new(&spec);
    let logs = dir.path().join("logs");
    let coordinator = CoordinatorProcess::start(
        &format!("redb:{}", dir.path().join("state.redb").display()),
        &logs,
        &[],
    );
    let digests: Vec<PathBuf> = (0..workers)
        .map(|i| dir.path().join(format!("digests-{i}.txt")))
        .collect();
    let processes: Vec<WorkerProcess> = digests
        .iter()
        .enumerate()
        .map(|(i, file)| {
            WorkerProcess::start(
                &coordinator.url(),
                &logs.join(format!("worker-{i}.log")),
                &["--replica-digests", file.to_str().expect("utf-8 path")],
            )
        })
        .collect();
    let seen = run_job(&coordinator.url(), &spec, Duration::from_secs(600));
    let logs_text = || {
        processes
            .iter()
            .map(|p| p.log_text())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let last = seen.last().expect("the job was seen");
    assert_eq!(
        pb::JobState::try_from(last.state),
        Ok(pb::JobState::Completed),
        "{}\n{}",
        last.message,
        logs_text()
    );
    let progress = last.progress.expect("progress");

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

    // After every step all ranks hold the same bytes.
    let steps_per_epoch = 960 / 96;
    let texts: Vec<String> = digests
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("digest file"))
        .collect();
    assert_eq!(
        texts[0].lines().count(),
        6 * steps_per_epoch,
        "a line per step"
    );
    for (rank, text) in texts.iter().enumerate().skip(1) {
        for (a, b) in texts[0].lines().zip(text.lines()) {
            assert_eq!(a, b, "replica {rank} differs");
        }
    }

    // Checkpoints were committed, the last one at the end of the run.
    let committed = &last.checkpoints;
    assert!(committed.len() >= 3, "{committed:?}");
    assert_eq!(committed.last().unwrap().step, 6 * steps_per_epoch as u64);
    for c in committed.iter().rev().take(2) {
        ladder_worker::checkpoint::verify(Path::new(&c.path))
            .expect("a committed checkpoint verifies");
    }
}

#[test]
fn two_workers_train_through_three_stages_in_lockstep() {
    train_with(2);
}

#[test]
fn three_workers_train_through_three_stages_in_lockstep() {
    train_with(3);
}
