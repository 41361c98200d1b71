//! The store's records against what can be in them: numbers a worker sent (NaN, infinities)
//! and records no coordinator can decode. Recovery serves everything it can read.

mod common;

use common::{
    STEPS_PER_EPOCH, checkpoint, config, coordinator_with_job, progress_at, register, running,
    submit,
};
use ladder_coordinator::policy::{STAGE_ENDS_KEPT, TALLIED_EPOCHS};
use ladder_coordinator::records::{
    CheckpointRecord, JobState, LedgerEntry, ProgressRecord, encode,
};
use ladder_coordinator::state::{Config, Coordinator, ProgressReport, Signs};
use ladder_coordinator::store::{RedbStore, SharedStore, Write};
use std::path::Path;
use std::sync::Arc;

fn store(dir: &Path) -> SharedStore {
    Arc::new(RedbStore::open(&dir.join("state.redb")).unwrap())
}

/// What the coordinator in-process takes without the gRPC service's checks: numbers no JSON can
/// hold still read back after a restart.
#[tokio::test]
async fn a_job_whose_worker_reported_nan_and_infinities_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 1).await;
    let (workers, generation) = running(&coordinator, 1).await;
    let signs = Signs {
        data_wait: f32::NAN,
        ..Signs::default()
    };
    coordinator.heartbeat(&workers[0], signs).await.unwrap();
    let report = ProgressReport {
        progress: Some(ProgressRecord {
            epoch: 1,
            step: 1,
            steps_per_epoch: 3,
            global_step: 4,
            loss: 2.5,
            learning_rate: f32::NAN,
            images_per_second: f32::INFINITY,
            eta_seconds: f32::NEG_INFINITY,
            ..ProgressRecord::default()
        }),
        ..ProgressReport::default()
    };
    coordinator
        .report_progress(&workers[0], &job, generation, report)
        .await
        .unwrap();
    // Saved with the next decision: a cancel writes the job with its progress and curves.
    coordinator.cancel(&job).await.unwrap();
    drop(coordinator);

    let recovered = Coordinator::recover(store(dir.path()), config())
        .await
        .expect("a record holding NaN reads back");
    let shown = recovered.record(&job).await.unwrap();
    assert_eq!(shown.state, JobState::Cancelled);
    assert!(shown.progress.learning_rate.is_nan());
    assert_eq!(shown.progress.images_per_second, f32::INFINITY);
    let curves = recovered.history(&job).await.unwrap();
    assert!(curves.points[0].data_wait[0].is_nan(), "{curves:?}");
}

#[tokio::test]
async fn a_record_that_does_not_decode_is_set_aside_and_everything_else_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, good, _) = coordinator_with_job(dir.path(), 1).await;
    drop(coordinator);
    let junk: Vec<(String, Vec<u8>)> = [
        (
            "jobs/job-000002".to_owned(),
            &br#"{"id": "job-000002", "state": "#[..],
        ),
        ("workers/w-000007".to_owned(), b"not a record"),
        (format!("history/{good}"), b"["),
        ("meta/counters".to_owned(), b"{}"),
    ]
    .into_iter()
    .map(|(key, bytes)| (key, bytes.to_vec()))
    .collect();
    {
        let raw = store(dir.path());
        raw.apply(
            junk.iter()
                .map(|(key, bytes)| Write::Put(key.clone(), bytes.clone()))
                .collect(),
        )
        .await
        .unwrap();
    }

    let coordinator = Coordinator::recover(store(dir.path()), config())
        .await
        .expect("one unreadable record does not stop a coordinator");
    assert_eq!(
        coordinator.record(&good).await.unwrap().state,
        JobState::Queued
    );
    assert!(coordinator.history(&good).await.unwrap().points.is_empty());
    let lost = coordinator.record("job-000002").await.unwrap();
    assert_eq!(lost.state, JobState::Failed);
    assert!(
        lost.message.contains("jobs/job-000002")
            && lost
                .message
                .contains("set aside as quarantine/jobs/job-000002")
            && lost.message.contains("model.init_from"),
        "{}",
        lost.message
    );
    let refused = coordinator
        .resume("job-000002", None, None)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("submit the spec again"),
        "{refused}"
    );
    // Ids go on past every id the store holds, readable or not.
    assert_eq!(register(&coordinator).await.id, "w-000008");
    let (third, _) = submit(&coordinator, &dir.path().join("third"), 1).await;
    assert_eq!(third, "job-000003");
    drop(coordinator);

    let raw = store(dir.path());
    for (key, bytes) in &junk {
        assert_eq!(
            raw.get(&format!("quarantine/{key}"))
                .await
                .unwrap()
                .as_ref(),
            Some(bytes),
            "{key} is kept as it was"
        );
    }
    assert_eq!(raw.get("workers/w-000007").await.unwrap(), None);
    assert_eq!(raw.list("quarantine/").await.unwrap().len(), junk.len());
    drop(raw);
    // Nothing is left to set aside: a second restart reads every record.
    let again = Coordinator::recover(store(dir.path()), config())
        .await
        .unwrap();
    assert_eq!(
        again.record("job-000002").await.unwrap().state,
        JobState::Failed
    );
    drop(again);
    assert_eq!(
        store(dir.path()).list("quarantine/").await.unwrap().len(),
        junk.len()
    );
}

/// A rank 0 that lies: every checkpoint "a stage end" (retention keeps those), every report a
/// new evaluation. The coordinator decides stage ends and bounds evaluations from the job's
/// plan, so the job's records stay within a budget, however many such calls come.
#[tokio::test]
async fn a_hostile_rank_0_cannot_grow_the_jobs_records() {
    const BUDGET: usize = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 1).await;
    let (ranks, generation) = running(&coordinator, 1).await;
    let mut accepted = 0;
    for step in 1..=10_000u64 {
        let claimed = CheckpointRecord {
            stage_end: true,
            ..checkpoint(generation, step)
        };
        let committed = coordinator
            .commit_checkpoint(&ranks[0], &job, generation, claimed, Vec::new())
            .await
            .unwrap();
        accepted += committed.is_ok() as usize;
        let evaluation = ProgressRecord {
            eval_epoch: step as u32,
            eval_top1: 0.5,
            ..progress_at(step.min(12))
        };
        let _ = coordinator
            .report_progress(
                &ranks[0],
                &job,
                generation,
                ProgressReport {
                    progress: Some(evaluation),
                    ..ProgressReport::default()
                },
            )
            .await;
    }
    // Steps 1 to 12 are in the job's 4 epochs of 3 steps; the ends of its 2 stages are at 6
    // and 12.
    assert_eq!(accepted, 12);
    let record = coordinator.record(&job).await.unwrap();
    let ends: Vec<u64> = record
        .checkpoints
        .iter()
        .filter(|c| c.stage_end)
        .map(|c| c.step)
        .collect();
    assert_eq!(ends, [6, 12]);
    let history = coordinator.history(&job).await.unwrap();
    assert_eq!(history.evaluations.len(), 4, "one per epoch the job has");
    let (record_bytes, history_bytes) = (encode(&record).len(), encode(&history).len());
    assert!(record_bytes < BUDGET, "{record_bytes} bytes");
    assert!(history_bytes < BUDGET, "{history_bytes} bytes");
}

/// A job of many one-epoch stages, a checkpoint at each epoch's end: every stage end is real,
/// retention keeps the newest [`STAGE_ENDS_KEPT`] and the newest `checkpoint.keep`, and the
/// ledger tells the newest [`TALLIED_EPOCHS`] epochs one by one and sums the older ones in
/// ranges, so the record stops growing however long the run.
#[tokio::test]
async fn a_long_runs_record_stops_growing() {
    const EPOCHS: u64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let coordinator = Coordinator::recover(store, config()).await.unwrap();
    let manifest = ladder_testkit::write_dataset(&dir.path().join("data"), 3, 20, 10);
    let spec = ladder_testkit::write_spec(dir.path(), "long", &manifest, (1, 1));
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "epochs = 4\nstage_epochs = 2",
        &format!("epochs = {EPOCHS}\nstage_epochs = 1"),
    );
    std::fs::write(&spec, text).unwrap();
    // Loaded from its file: its checkpoint.dir is beside it.
    let spec = ladder_core::spec::JobSpec::load(&spec).unwrap();
    let keep = spec.checkpoint.keep as usize;
    let job = coordinator.submit(&spec.to_toml()).await.unwrap().id;
    let (ranks, generation) = running(&coordinator, 1).await;
    let mut bytes_at = Vec::new();
    for epoch in 1..=EPOCHS {
        let step = epoch * STEPS_PER_EPOCH;
        let trained = vec![LedgerEntry {
            checkpoint_step: 0,
            epoch: epoch as u32 - 1,
            epochs: 1,
            samples: 48,
            digest: epoch,
            skipped: 0,
        }];
        coordinator
            .commit_checkpoint(
                &ranks[0],
                &job,
                generation,
                checkpoint(generation, step),
                trained,
            )
            .await
            .unwrap()
            .expect("a stage end");
        if epoch % 2_000 == 0 {
            bytes_at.push(encode(&coordinator.record(&job).await.unwrap()).len());
        }
    }
    let record = coordinator.record(&job).await.unwrap();
    assert!(record.checkpoints.iter().all(|c| c.stage_end));
    assert_eq!(record.checkpoints.len(), STAGE_ENDS_KEPT.max(keep));
    assert_eq!(
        record.checkpoints.last().unwrap().step,
        EPOCHS * STEPS_PER_EPOCH
    );
    let trained = record.trained();
    let told: Vec<u32> = trained
        .iter()
        .flat_map(|t| t.epoch..t.epoch + t.epochs.max(1))
        .collect();
    assert_eq!(
        told,
        (0..EPOCHS as u32).collect::<Vec<_>>(),
        "every epoch, once"
    );
    let singles = trained.iter().rev().take_while(|t| t.epochs <= 1).count();
    assert!(singles >= TALLIED_EPOCHS as usize, "{singles}");
    let samples: u64 = trained.iter().map(|t| t.samples).sum();
    assert_eq!(samples, 48 * EPOCHS);
    // 2,000 epochs in, the ledger already folds: from there the record stays the same size.
    eprintln!("record bytes every 2,000 epochs: {bytes_at:?}");
    let (first, last) = (bytes_at[0], *bytes_at.last().unwrap());
    assert!(last <= first + first / 10, "{bytes_at:?}");
    assert!(last < 64 << 10, "{last} bytes");
}

/// An ended job leaves the store by `ladder delete`, or on its own once it ended long enough
/// ago: every job ever run would otherwise be read at every start.
#[tokio::test]
async fn ended_jobs_are_deleted_on_request_or_retired_after_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 1).await;
    let refused = coordinator.delete(&job).await.unwrap_err();
    assert!(refused.to_string().contains("cancel"), "{refused}");
    coordinator.cancel(&job).await.unwrap();
    coordinator.delete(&job).await.unwrap();
    assert!(coordinator.get(&job).await.is_err());
    drop(coordinator);

    let retiring = Config {
        retire_ended_after: Some(std::time::Duration::from_millis(50)),
        ..config()
    };
    let coordinator = Coordinator::recover(store(dir.path()), retiring)
        .await
        .unwrap();
    assert!(coordinator.snapshot().jobs.is_empty(), "deleted for good");
    let (second, _) = submit(&coordinator, &dir.path().join("second"), 1).await;
    assert_eq!(second, "job-000002", "an id is never given again");
    let (third, _) = submit(&coordinator, &dir.path().join("third"), 1).await;
    coordinator.cancel(&second).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    coordinator.tick().await.unwrap();
    let left: Vec<String> = coordinator.snapshot().jobs.keys().cloned().collect();
    assert_eq!(left, [third], "the ended one retired, the queued one stays");
    drop(coordinator);
    let raw = store(dir.path());
    assert_eq!(raw.list("jobs/").await.unwrap().len(), 1);
    assert!(raw.list("history/").await.unwrap().is_empty());
}
