//! The coordinator in-process, on a real redb store (wrapped to fail writes on demand), with
//! helpers that drive it the way workers do.

#![allow(dead_code)]

use async_trait::async_trait;
use ladder_coordinator::auth::WorkerIdentity;
use ladder_coordinator::records::{CheckpointRecord, ProgressRecord};
use ladder_coordinator::state::{Config, Coordinator, RendezvousOutcome};
use ladder_coordinator::store::{RedbStore, SharedStore, Store, StoreError, Write};
use ladder_core::spec::JobSpec;
use ladder_testkit::{checkpoint_ref, write_dataset, write_spec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A redb store whose transactions fail (as on a full disk, or an etcd that lost its quorum)
/// while they write a key under the prefix set with [`FlakyStore::fail_writes_to`], counting
/// those that went through.
pub struct FlakyStore {
    inner: RedbStore,
    failing: Mutex<Option<String>>,
    /// While true, transactions wait (a disk or etcd that takes its time).
    held: tokio::sync::watch::Sender<bool>,
    pub transactions: AtomicUsize,
}

impl FlakyStore {
    pub fn open(dir: &Path) -> Arc<FlakyStore> {
        Arc::new(FlakyStore {
            inner: RedbStore::open(&dir.join("state.redb")).unwrap(),
            failing: Mutex::new(None),
            held: tokio::sync::watch::channel(false).0,
            transactions: AtomicUsize::new(0),
        })
    }

    /// Fails every transaction that writes a key starting with `prefix` ("" for all; `None`
    /// heals the store).
    pub fn fail_writes_to(&self, prefix: Option<&str>) {
        *self.failing.lock().unwrap() = prefix.map(str::to_owned);
    }

    /// Makes transactions wait until released (`false`).
    pub fn hold_writes(&self, held: bool) {
        self.held.send_replace(held);
    }

    pub fn transactions(&self) -> usize {
        self.transactions.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key).await
    }

    async fn transaction(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let _ = self.held.subscribe().wait_for(|held| !held).await;
        let failing = self.failing.lock().unwrap().clone();
        let hit = |key: &str| failing.as_deref().is_some_and(|p| key.starts_with(p));
        if writes.iter().any(|w| match w {
            Write::Put(key, _) | Write::Delete(key) => hit(key),
        }) {
            return Err(StoreError::Backend {
                store: self.describe(),
                message: "No space left on device".into(),
            });
        }
        self.transactions.fetch_add(1, Ordering::SeqCst);
        self.inner.transaction(writes).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner.list(prefix).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Leases and stalls long enough not to happen unless a test makes them; no grace before a
/// job starts on the workers it has.
pub fn config() -> Config {
    Config {
        lease_ttl: Duration::from_secs(60),
        rendezvous_grace: Duration::ZERO,
        stall_timeout: Duration::from_secs(600),
        regroup_interval: Duration::ZERO,
        retire_ended_after: None,
    }
}

/// Submits a job of `workers` ranks (its dataset and spec written in `dir`); returns its id
/// and its `checkpoint.dir`.
pub async fn submit(coordinator: &Coordinator, dir: &Path, workers: u32) -> (String, PathBuf) {
    let manifest = write_dataset(&dir.join("data"), 3, 20, 10);
    let spec = JobSpec::load(&write_spec(dir, "job", &manifest, (workers, workers))).unwrap();
    let job = coordinator.submit(&spec.to_toml()).await.unwrap();
    (job.id, spec.checkpoint.dir)
}

/// A coordinator on a fresh store with one job of `workers` ranks submitted, and the job's
/// checkpoint directory (`checkpoint.dir`).
pub async fn coordinator_with_job(dir: &Path, workers: u32) -> (Arc<Coordinator>, String, PathBuf) {
    let store: SharedStore = Arc::new(RedbStore::open(&dir.join("state.redb")).unwrap());
    let coordinator = Coordinator::recover(store, config()).await.unwrap();
    let (job, checkpoints) = submit(&coordinator, dir, workers).await;
    (coordinator, job, checkpoints)
}

pub async fn register(coordinator: &Coordinator) -> WorkerIdentity {
    let (worker, secret) = coordinator.register("host", "cpu", "").await.unwrap();
    WorkerIdentity {
        id: worker.id,
        secret,
    }
}

/// Registers `n` workers and brings them through the rendezvous of the job's generation; returns
/// them by rank, with the generation.
pub async fn running(coordinator: &Arc<Coordinator>, n: usize) -> (Vec<WorkerIdentity>, u64) {
    let mut workers = Vec::new();
    for _ in 0..n {
        workers.push(register(coordinator).await);
    }
    meet(coordinator, workers).await
}

/// Brings registered `workers` through the rendezvous of the generation they are assigned;
/// returns them by rank, with the generation.
pub async fn meet(
    coordinator: &Arc<Coordinator>,
    workers: Vec<WorkerIdentity>,
) -> (Vec<WorkerIdentity>, u64) {
    let mut by_rank = vec![WorkerIdentity::default(); workers.len()];
    let mut generation = 0;
    let mut joins = Vec::new();
    for worker in workers {
        let a = coordinator
            .await_assignment(&worker, Duration::from_secs(30))
            .await
            .unwrap()
            .expect("every worker is assigned");
        generation = a.generation;
        by_rank[a.rank as usize] = worker.clone();
        let coordinator = coordinator.clone();
        joins.push(tokio::spawn(async move {
            coordinator
                .rendezvous(
                    &worker,
                    &a.job_id,
                    a.generation,
                    a.rank,
                    vec![a.rank as u8],
                    Duration::from_secs(60),
                )
                .await
                .unwrap()
        }));
    }
    for join in joins {
        assert!(matches!(
            join.await.unwrap(),
            RendezvousOutcome::Complete { .. }
        ));
    }
    (by_rank, generation)
}

/// Steps in an epoch of [`submit`]'s jobs: 60 samples in global batches of 16.
pub const STEPS_PER_EPOCH: u64 = 3;

/// Rank 0's progress at global step `global_step` of a job [`submit`] made.
pub fn progress_at(global_step: u64) -> ProgressRecord {
    ProgressRecord {
        epoch: (global_step / STEPS_PER_EPOCH) as u32,
        step: global_step % STEPS_PER_EPOCH,
        steps_per_epoch: STEPS_PER_EPOCH,
        global_step,
        ..ProgressRecord::default()
    }
}

/// The checkpoint of global step `step`, in the epoch that step is in.
pub fn checkpoint(generation: u64, step: u64) -> CheckpointRecord {
    let r = checkpoint_ref(generation, step);
    CheckpointRecord {
        id: r.id,
        generation,
        epoch: (step / STEPS_PER_EPOCH) as u32,
        step,
        stage: 0,
        committed_at_ms: 0,
        stage_end: false,
    }
}
