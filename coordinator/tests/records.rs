//! The store's records against what can be in them: numbers a worker sent (NaN, infinities)
//! and records no coordinator can decode. Recovery serves everything it can read.

mod common;

use common::{config, coordinator_with_job, register, running, submit};
use ladder_coordinator::records::{JobState, ProgressRecord};
use ladder_coordinator::state::{Coordinator, ProgressReport, Signs};
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
    let shown = recovered.get(&job).await.unwrap().record;
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
        coordinator.get(&good).await.unwrap().record.state,
        JobState::Queued
    );
    assert!(coordinator.history(&good).await.unwrap().points.is_empty());
    let lost = coordinator.get("job-000002").await.unwrap().record;
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
        again.get("job-000002").await.unwrap().record.state,
        JobState::Failed
    );
    drop(again);
    assert_eq!(
        store(dir.path()).list("quarantine/").await.unwrap().len(),
        junk.len()
    );
}
