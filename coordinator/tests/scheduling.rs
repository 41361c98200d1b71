//! Which job gets the idle workers: queued jobs in a stated order (priority, then age) with no
//! starvation, and a running job that lost a node growing back when the node returns. The
//! coordinator runs in-process on a real redb store.

mod common;

use common::{FlakyStore, checkpoint, config, register};
use ladder_coordinator::records::JobState;
use ladder_coordinator::state::{Config, Coordinator};
use ladder_coordinator::store::SharedStore;
use ladder_core::spec::JobSpec;
use ladder_testkit::{write_dataset, write_spec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Submits a job named `name` of `workers` (min, max) ranks at `priority`; returns its id and
/// `checkpoint.dir`.
async fn submit(
    coordinator: &Coordinator,
    dir: &Path,
    name: &str,
    workers: (u32, u32),
    priority: i32,
) -> (String, PathBuf) {
    let manifest = write_dataset(&dir.join("data"), 3, 20, 10);
    let spec_path = write_spec(dir, name, &manifest, workers);
    let text = std::fs::read_to_string(&spec_path)
        .unwrap()
        .replace("[job]\n", &format!("[job]\npriority = {priority}\n"));
    std::fs::write(&spec_path, text).unwrap();
    let spec = JobSpec::load(&spec_path).unwrap();
    let job = coordinator.submit(&spec.to_toml()).await.unwrap();
    (job.id, spec.checkpoint.dir)
}

async fn start_coordinator(dir: &Path, config: Config) -> Arc<Coordinator> {
    let store = FlakyStore::open(dir);
    Coordinator::recover(store as SharedStore, config)
        .await
        .unwrap()
}

async fn state(coordinator: &Coordinator, job: &str) -> (JobState, usize) {
    let job = coordinator.get(job).await.unwrap();
    (job.state(), job.workers.len())
}

#[tokio::test]
async fn queued_jobs_are_served_by_priority_then_age_and_a_large_one_is_not_starved() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path(), config()).await;
    let (large, _) = submit(&coordinator, dir.path(), "large", (2, 2), 0).await;
    let (small, _) = submit(&coordinator, dir.path(), "small", (1, 1), 0).await;
    let (urgent, _) = submit(&coordinator, dir.path(), "urgent", (1, 1), 5).await;
    register(&coordinator).await;
    assert_eq!(
        state(&coordinator, &urgent).await,
        (JobState::Rendezvous, 1),
        "the highest priority first"
    );
    // One idle worker: the small job could start on it, but the large job was queued first
    // and gathers workers until it can start.
    register(&coordinator).await;
    assert_eq!(state(&coordinator, &small).await, (JobState::Queued, 0));
    let waiting = coordinator.get(&small).await.unwrap().waiting.clone();
    assert!(waiting.contains("1 more held"), "{waiting}");
    register(&coordinator).await;
    assert_eq!(state(&coordinator, &large).await, (JobState::Rendezvous, 2));
    assert_eq!(state(&coordinator, &small).await, (JobState::Queued, 0));
    register(&coordinator).await;
    assert_eq!(state(&coordinator, &small).await, (JobState::Rendezvous, 1));
}

#[tokio::test]
async fn a_job_below_its_size_takes_idle_workers_at_its_next_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path(), config()).await;
    // Workers 1 to 2: it starts on the one there is (no grace in these tests).
    let (job, _) = submit(&coordinator, dir.path(), "elastic", (1, 2), 0).await;
    let (ranks, generation) = common::running(&coordinator, 1).await;
    assert_eq!(state(&coordinator, &job).await, (JobState::Running, 1));
    // A node comes back.
    let returning = register(&coordinator).await;
    assert_eq!(state(&coordinator, &job).await, (JobState::Running, 1));
    let committed = checkpoint(generation, 6);
    coordinator
        .commit_checkpoint(&ranks[0], &job, generation, committed.clone(), Vec::new())
        .await
        .unwrap()
        .expect("committed");
    let grown = coordinator.record(&job).await.unwrap();
    assert_eq!(grown.state, JobState::Rendezvous, "{}", grown.message);
    assert_eq!(grown.generation, generation + 1);
    assert_eq!(grown.workers.len(), 2);
    assert!(grown.workers.contains(&returning.id));
    assert_eq!(
        grown.restore_from.map(|c| c.id),
        Some(committed.id),
        "from the checkpoint just committed: no step lost"
    );
    assert!(grown.last_incident.is_empty(), "growing is no incident");
}

#[tokio::test]
async fn a_job_regroups_at_most_once_per_interval_and_never_ahead_of_a_queued_job() {
    let dir = tempfile::tempdir().unwrap();
    let hourly = Config {
        regroup_interval: Duration::from_secs(3_600),
        ..config()
    };
    let coordinator = start_coordinator(dir.path(), hourly).await;
    let (job, _) = submit(&coordinator, dir.path(), "elastic", (1, 2), 0).await;
    let (ranks, generation) = common::running(&coordinator, 1).await;
    register(&coordinator).await;
    commit_step_6(&coordinator, &ranks[0], &job, generation).await;
    assert_eq!(
        state(&coordinator, &job).await,
        (JobState::Running, 1),
        "its generation started less than the interval ago"
    );

    let dir = tempfile::tempdir().unwrap();
    let coordinator = start_coordinator(dir.path(), config()).await;
    let (job, _) = submit(&coordinator, dir.path(), "elastic", (1, 2), 0).await;
    let (ranks, generation) = common::running(&coordinator, 1).await;
    let (queued, _) = submit(&coordinator, dir.path(), "queued", (2, 2), 0).await;
    register(&coordinator).await;
    commit_step_6(&coordinator, &ranks[0], &job, generation).await;
    assert_eq!(
        state(&coordinator, &job).await,
        (JobState::Running, 1),
        "a queued job is served before a running one grows"
    );
    assert_eq!(state(&coordinator, &queued).await, (JobState::Queued, 0));
}

/// Rank 0 commits the checkpoint of step 6 of `generation`.
async fn commit_step_6(
    coordinator: &Coordinator,
    rank_0: &ladder_coordinator::auth::WorkerIdentity,
    job: &str,
    generation: u64,
) {
    coordinator
        .commit_checkpoint(
            rank_0,
            job,
            generation,
            checkpoint(generation, 6),
            Vec::new(),
        )
        .await
        .unwrap()
        .expect("committed");
}
