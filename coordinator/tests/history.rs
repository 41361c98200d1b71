//! A job's curves (the status page's history) in-process, on a real redb store: what rank 0
//! reports and each rank's data-wait share become points, saved with the job's progress, back
//! after a restart, and rolled back with a restore so that no step shows twice.

mod common;

use common::{checkpoint, config, submit};
use ladder_coordinator::records::ProgressRecord;
use ladder_coordinator::state::{Coordinator, ProgressReport, Signs};
use ladder_coordinator::store::{RedbStore, SharedStore};
use std::sync::Arc;

fn report(global_step: u64) -> ProgressReport {
    ProgressReport {
        progress: Some(ProgressRecord {
            loss: 3.0 - global_step as f32 / 10.0,
            learning_rate: 0.01,
            image_size: 128,
            ..common::progress_at(global_step)
        }),
        ..ProgressReport::default()
    }
}

fn steps(history: &ladder_coordinator::history::History) -> Vec<u64> {
    history.points.iter().map(|p| p.step).collect()
}

#[tokio::test]
async fn a_jobs_curves_survive_a_restart_and_go_back_with_a_restore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store: SharedStore = Arc::new(RedbStore::open(&path).unwrap());
    let coordinator = Coordinator::recover(store, config()).await.unwrap();
    let (job, _) = submit(&coordinator, dir.path(), 1).await;
    let (ranks, generation) = common::running(&coordinator, 1).await;
    coordinator
        .heartbeat(
            &ranks[0],
            Signs {
                data_wait: 0.25,
                ..Signs::default()
            },
        )
        .await
        .unwrap();
    let committed = checkpoint(generation, 6);
    for step in 1..=10 {
        coordinator
            .report_progress(&ranks[0], &job, generation, report(step))
            .await
            .unwrap();
        if step == 6 {
            coordinator
                .commit_checkpoint(&ranks[0], &job, generation, committed.clone(), Vec::new())
                .await
                .unwrap()
                .expect("committed");
        }
    }
    // Step 10 crossed an epoch: the next tick saves the progress, and the curves with it.
    coordinator.tick().await.unwrap();
    let history = coordinator.history(&job).await.unwrap();
    assert_eq!(steps(&history), (1..=10).collect::<Vec<_>>());
    assert!(history.points.iter().all(|p| p.data_wait == [0.25]));
    assert_eq!(history.points[9].loss, 2.0);
    drop(coordinator);

    let store: SharedStore = Arc::new(RedbStore::open(&path).unwrap());
    let recovered = Coordinator::recover(store, config()).await.unwrap();
    assert_eq!(
        recovered.history(&job).await.unwrap(),
        history,
        "the curves survive the restart"
    );

    // Resumed from step 6: the next generation's curves go on from there.
    recovered.cancel(&job).await.unwrap();
    recovered
        .resume(&job, Some(&committed.id), None)
        .await
        .unwrap();
    let (ranks, generation) = common::running(&recovered, 1).await;
    assert_eq!(
        steps(&recovered.history(&job).await.unwrap()),
        (1..=6).collect::<Vec<_>>(),
        "rolled back with the model"
    );
    recovered
        .report_progress(&ranks[0], &job, generation, report(7))
        .await
        .unwrap();
    assert_eq!(
        steps(&recovered.history(&job).await.unwrap()),
        (1..=7).collect::<Vec<_>>(),
        "no step twice, none backwards"
    );
}

#[tokio::test]
async fn skipped_samples_count_for_the_job_their_workers_train() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(RedbStore::open(&dir.path().join("state.redb")).unwrap());
    let coordinator = Coordinator::recover(store, config()).await.unwrap();
    let (job, _) = submit(&coordinator, dir.path(), 1).await;
    let (ranks, _) = common::running(&coordinator, 1).await;
    let beat = |skipped| Signs {
        skipped,
        ..Signs::default()
    };
    // Heartbeats are shown within a snapshot's freshness (decisions at once).
    let skipped = || async {
        let fresh = ladder_coordinator::view::SNAPSHOT_FRESH_MS as u64 + 10;
        tokio::time::sleep(std::time::Duration::from_millis(fresh)).await;
        let shown = coordinator.get(&job).await.unwrap();
        ["unreadable", "empty", "undecodable", "label_out_of_range"]
            .map(|reason| shown.skipped[reason])
    };
    coordinator
        .heartbeat(&ranks[0], beat([2, 0, 1, 0]))
        .await
        .unwrap();
    assert_eq!(skipped().await, [2, 0, 1, 0]);
    coordinator
        .heartbeat(&ranks[0], beat([3, 0, 1, 0]))
        .await
        .unwrap();
    assert_eq!(skipped().await, [3, 0, 1, 0], "only what is new counts");
    // A restarted worker process counts from zero again.
    coordinator
        .heartbeat(&ranks[0], beat([1, 0, 0, 0]))
        .await
        .unwrap();
    assert_eq!(skipped().await, [4, 0, 1, 0]);
    // An idle worker's skips are no job's.
    let idle = common::register(&coordinator).await;
    coordinator
        .heartbeat(&idle, beat([5, 5, 5, 5]))
        .await
        .unwrap();
    assert_eq!(skipped().await, [4, 0, 1, 0]);
}
