//! The coordinator: the decisions that move jobs and workers, each written as one store
//! transaction and then shown.
//!
//! A job moves `queued -> rendezvous -> running -> completed`, or to `failed` / `cancelled`;
//! `resume` brings an ended job back to `queued`. Every assignment of workers to a job starts a
//! new *generation*: a worker lost mid-run sends the job back to `queued`, its survivors are
//! released, and the next assignment (generation + 1) restores from the latest committed
//! checkpoint. Workers notice a generation change through their heartbeat and drop the old
//! collective.
//!
//! The state is in three parts, each in its own module: what is saved ([`crate::records`]:
//! plain records, each fact once; a worker's assignment is derived from its job's record),
//! what lives in memory only ([`crate::runtime`]: liveness, progress not yet saved, a
//! generation's rendezvous), and the rules, as pure functions of both and a time
//! ([`crate::policy`]: scheduling, lease and stall policy, growing back, retention). This module
//! applies the rules' outcomes. A restarted coordinator rebuilds everything from the store
//! alone.
//!
//! Two locks, taken in this order:
//! - `inner` (async): jobs, their specs and runtime, and the counters: what decisions read and
//!   write. Every decision is one store transaction ([`Change`]), written before it becomes
//!   visible; the lock is held across the write, so decisions are made one at a time, each
//!   from the state it replaces.
//! - `roster` (plain, [`Roster`]): every worker with its signs of life and derived rank, and
//!   each training job's newest progress. Held for memory work only, never across a write:
//!   heartbeats and progress reports take nothing else, so a slow disk or etcd never makes a
//!   healthy worker late. Heartbeats renew leases in memory only, and recovery grants every
//!   known worker a fresh lease, since no worker could reach a coordinator that was down;
//!   progress is saved by the next decision about its job or by [`Coordinator::tick`].
//!
//! What must be durable before a call returns: a registration (the worker's secret must
//! authenticate it after a restart), every decision about a job (an assignment acted on but
//! not saved could give one rank to two workers after a restart) and a commit (a checkpoint
//! reported committed but forgotten would be deleted as uncommitted, or a retired one kept).
//! Heartbeats and progress are not: a restart renews every lease, and the progress since the
//! last save is reported again within a step.

use crate::auth::{self, WorkerIdentity};
use crate::history::History;
use crate::metrics::Metrics;
use crate::policy::{self, Placement};
use crate::records::{
    self, CHECKPOINT_FAILURES_TO_GIVE_UP, COLLECTIVE_FAILURES_TO_GIVE_UP, CheckpointRecord,
    Counters, Incident, JobRecord, JobState, LedgerEntry, ProgressRecord, WorkerAssignment,
    WorkerRecord,
};
use crate::runtime::{JobRuntime, Member, Roster, monotonic_ms};
use crate::store::{SharedStore, StoreError, Write};
use crate::tensorboard;
use ladder_core::cut;
use ladder_core::dataset::Manifest;
use ladder_core::dataset::SKIP_REASONS;
use ladder_core::location::{self, CheckpointId};
use ladder_core::sample::SamplePlan;
use ladder_core::spec::JobSpec;
use ladder_core::stage::StagePlan;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Mutex, Notify, broadcast, oneshot, watch};

/// `checkpoint.dir` must be writable, and hold nothing yet for job `id`: job ids restart with a
/// new store, and a job must never write over another job's checkpoints.
fn check_checkpoint_dir(dir: &Path, id: &str) -> std::result::Result<(), String> {
    let problem =
        |e: std::io::Error| format!("checkpoint.dir: {} cannot be written: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(problem)?;
    let probe = dir.join(format!(".ladder-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(problem)?;
    let _ = std::fs::remove_file(&probe);
    let own = dir.join(id);
    if std::fs::read_dir(&own).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!(
            "checkpoint.dir: {} already holds files, though no job {id} is known to this \
             coordinator (a job of another coordinator store?): choose another checkpoint.dir, \
             or move those files away",
            own.display()
        ));
    }
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch: for what is shown and persisted.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a worker is told to do (to rank 0, also what the newest commit retired, in case its
/// files outlived the worker told to delete them).
pub type Assignment = ladder_proto::v1::Assignment;

impl ProgressReport {
    /// Whether it says more than how far the run got.
    fn has_event(&self) -> bool {
        self.finished
            || !self.error.is_empty()
            || !self.bad_checkpoint.is_empty()
            || !self.collective_error.is_empty()
            || !self.checkpoint_error.is_empty()
    }
}

/// Where a rendezvous stands for one of its ranks.
#[derive(Clone, Debug, PartialEq)]
pub enum RendezvousOutcome {
    /// The generation is no longer current.
    Stale,
    /// Not every rank has published yet.
    Waiting,
    /// Every rank's payload by rank, and the generation's ring key.
    Complete {
        payloads: Vec<Vec<u8>>,
        ring_key: Vec<u8>,
    },
}

/// What a worker is told in answer to its progress report: whether its generation is current,
/// and (rank 0) whether to checkpoint now for a leaving worker.
pub type ProgressAnswer = ladder_proto::v1::ReportProgressResponse;

/// What a worker's heartbeat says of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Signs {
    /// Its training thread's activity counter: unchanged, the thread makes no progress.
    pub activity: u64,
    /// Its training thread waits in a collective (on the other ranks).
    pub in_collective: bool,
    /// It was asked to stop.
    pub leaving: bool,
    /// The share of its step time spent waiting for data.
    pub data_wait: f32,
    /// Samples the worker process skipped so far, by [`SKIP_REASONS`].
    pub skipped: [u64; SKIP_REASONS.len()],
}

/// What a worker reports: progress, and perhaps an event (the end, a failure).
#[derive(Clone, Debug, Default)]
pub struct ProgressReport {
    /// None when the report carries only an event (a failure, the end): the job's last
    /// progress stays.
    pub progress: Option<ProgressRecord>,
    pub finished: bool,
    pub error: String,
    /// The checkpoint the worker was told to restore from, when it failed verification.
    pub bad_checkpoint: String,
    /// Why this rank's collective failed, when it did (a peer's error, a timeout, NCCL's).
    pub collective_error: String,
    /// Why rank 0 could not write a checkpoint, when it could not (training went on).
    pub checkpoint_error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
}

type Result<T> = std::result::Result<T, CoordinatorError>;

#[derive(Clone, Debug)]
pub struct Config {
    /// How long a worker lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How long a schedulable job waits for more workers before starting on fewer.
    pub rendezvous_grace: Duration,
    /// How long a running job may go without any of its workers making progress before the
    /// workers that are not waiting on the others are declared stalled.
    pub stall_timeout: Duration,
    /// A running job below its largest world size takes idle workers at a checkpoint at most
    /// this long after its generation started (a regroup costs a rendezvous and a restore).
    pub regroup_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ttl: Duration::from_secs(10),
            rendezvous_grace: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(300),
            regroup_interval: Duration::from_secs(600),
        }
    }
}

/// Jobs and counters: what decisions read and write. Behind the async lock held across each
/// decision's store write, so that decisions are made one at a time, each from the state it
/// replaces.
#[derive(Default)]
struct Inner {
    jobs: BTreeMap<String, JobRecord>,
    /// Each job's spec, parsed once (at submit, or when the coordinator starts).
    specs: BTreeMap<String, Arc<JobSpec>>,
    runtime: BTreeMap<String, JobRuntime>,
    counters: Counters,
}

impl Inner {
    /// Shows `job`: its workers' assignments are derived from it, and its runtime follows it.
    /// Returns whether any assignment changed.
    fn show(&mut self, roster: &mut Roster, job: JobRecord) -> bool {
        let reassigned = roster.reassign(self.jobs.get(&job.id), &job);
        if !roster.event_dirs.contains_key(&job.id)
            && let Some(dir) = self
                .specs
                .get(&job.id)
                .and_then(|spec| tensorboard::dir(&spec.checkpoint.dir, &job.id))
        {
            roster.event_dirs.insert(job.id.clone(), dir);
        }
        self.runtime.entry(job.id.clone()).or_default().follow(&job);
        self.jobs.insert(job.id.clone(), job);
        reassigned
    }

    fn job(&self, id: &str) -> Result<&JobRecord> {
        self.jobs.get(id).ok_or_else(|| {
            CoordinatorError::NotFound(format!(
                "no job {:?}; `ladder list` shows the jobs",
                cut(id)
            ))
        })
    }
}

/// A job as it is shown: its record with the newest progress, and what it waits for while
/// queued.
#[derive(Clone, Debug)]
pub struct JobView {
    pub record: JobRecord,
    pub waiting: String,
    /// Samples its workers skipped while it trained, by [`SKIP_REASONS`] (since this
    /// coordinator started).
    pub skipped: [u64; SKIP_REASONS.len()],
    /// The job's spec, parsed (`None` if its saved text no longer parses).
    pub spec: Option<Arc<JobSpec>>,
}

/// A worker as it is shown, with how long until its lease runs out and how long its training
/// thread has been quiet (both in milliseconds, from now).
#[derive(Clone, Debug)]
pub struct WorkerView {
    pub member: Member,
    pub lease_remaining_ms: i64,
    pub quiet_ms: i64,
}

/// A registration waiting for its group's write.
struct Registration {
    hostname: String,
    device: String,
    name: String,
    reply: oneshot::Sender<Result<(WorkerRecord, String)>>,
}

/// What one store transaction writes; shown in memory only once written.
#[derive(Default)]
struct Change {
    jobs: Vec<JobRecord>,
    /// New workers: their records are written.
    workers: Vec<Member>,
    /// Workers to forget: their next call is answered "unknown worker".
    forgotten: Vec<String>,
    counters: Option<Counters>,
}

/// A job's curves are saved with a decision about the job, or with its progress, at most this
/// often while it trains (and at once when its generation ends): they are the largest record,
/// and a restart losing half a minute of points loses nothing else.
const HISTORY_SAVED_EVERY_MS: i64 = 30_000;

impl Change {
    fn job(job: JobRecord) -> Change {
        Change {
            jobs: vec![job],
            ..Change::default()
        }
    }
}

pub struct Coordinator {
    store: SharedStore,
    config: Config,
    inner: Mutex<Inner>,
    roster: std::sync::Mutex<Roster>,
    /// Registrations waiting to be written (see [`Coordinator::register`]).
    registrations: std::sync::Mutex<Vec<Registration>>,
    job_changed: broadcast::Sender<String>,
    rendezvous_changed: Notify,
    /// Set when the store refuses this coordinator's writes: it must stop serving.
    deposed: watch::Sender<Option<String>>,
    metrics: Metrics,
}

impl Coordinator {
    /// Rebuilds the coordinator's state from `store`.
    pub async fn recover(store: SharedStore, config: Config) -> Result<Arc<Coordinator>> {
        let mut inner = Inner::default();
        let mut roster = Roster {
            events: Some(tensorboard::Events::start()),
            ..Roster::default()
        };
        let now = monotonic_ms();
        for (key, bytes) in store.list(records::WORKERS_PREFIX).await? {
            let worker: WorkerRecord = records::decode(&key, &bytes)?;
            roster
                .workers
                .insert(worker.id.clone(), Member::new(worker, now, false));
        }
        for (key, bytes) in store.list(records::JOBS_PREFIX).await? {
            let job: JobRecord = records::decode(&key, &bytes)?;
            match JobSpec::parse(&job.spec_toml, &job.id) {
                Ok(spec) => {
                    inner.specs.insert(job.id.clone(), Arc::new(spec));
                }
                // Its workers would refuse it too; everything else of the job stays readable.
                Err(e) => {
                    tracing::error!(job = %job.id, "the job's saved spec does not parse: {e}")
                }
            }
            inner.show(&mut roster, job);
        }
        for (key, bytes) in store.list(records::HISTORY_PREFIX).await? {
            let history: History = records::decode(&key, &bytes)?;
            let id = key[records::HISTORY_PREFIX.len()..].to_owned();
            roster
                .history_saved
                .insert(id.clone(), (history.version, now));
            roster.history.insert(id, history);
        }
        if let Some(bytes) = store.get(records::COUNTERS_KEY).await? {
            inner.counters = records::decode(records::COUNTERS_KEY, &bytes)?;
        }
        tracing::info!(
            store = %store.describe(),
            jobs = inner.jobs.len(),
            workers = roster.workers.len(),
            "recovered state"
        );
        let (job_changed, _) = broadcast::channel(1024);
        Ok(Arc::new(Coordinator {
            store,
            config,
            inner: Mutex::new(inner),
            roster: std::sync::Mutex::new(roster),
            registrations: std::sync::Mutex::default(),
            job_changed,
            rendezvous_changed: Notify::new(),
            deposed: watch::channel(None).0,
            metrics: Metrics::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the coordinator measures of itself (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Resolves when the store has refused a write because another coordinator leads.
    pub fn deposed(&self) -> watch::Receiver<Option<String>> {
        self.deposed.subscribe()
    }

    fn store_failed(&self, e: StoreError) -> CoordinatorError {
        if matches!(e, StoreError::NotLeader { .. }) {
            self.deposed.send_replace(Some(e.to_string()));
        }
        CoordinatorError::Store(e)
    }

    /// The roster, for memory work only (see [`Roster`]).
    fn roster(&self) -> std::sync::MutexGuard<'_, Roster> {
        // Nothing is left half-changed by a panic while it is held: go on with it.
        self.roster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `change` in one transaction, then shows it: the store and memory change
    /// together or not at all. Each job written carries the newest progress of its generation.
    async fn apply(&self, inner: &mut Inner, mut change: Change) -> Result<()> {
        let (wall, now) = (now_ms(), monotonic_ms());
        let mut saves = Vec::new();
        let mut histories = Vec::new();
        {
            let mut roster = self.roster();
            for job in &mut change.jobs {
                job.updated_at_ms = wall;
                let mut boundary = false;
                if let Some(t) = roster
                    .training
                    .get_mut(&job.id)
                    .filter(|t| t.generation == job.generation)
                {
                    job.progress = t.progress;
                    boundary = std::mem::take(&mut t.boundary);
                    saves.push((job.id.clone(), job.generation, t.reported));
                }
                if let Some(history) = roster.history.get(&job.id) {
                    let saved = roster.history_saved.get(&job.id).copied();
                    let due = saved.is_none_or(|(version, at)| {
                        version != history.version
                            && (boundary
                                || !job.state.is_active()
                                || now - at >= HISTORY_SAVED_EVERY_MS)
                    });
                    if due {
                        histories.push((job.id.clone(), history.clone()));
                    }
                }
            }
        }
        let mut writes = Vec::new();
        for job in &change.jobs {
            writes.push(Write::Put(records::job_key(&job.id), records::encode(job)));
        }
        for worker in &change.workers {
            writes.push(Write::Put(
                records::worker_key(&worker.record.id),
                records::encode(&worker.record),
            ));
        }
        for id in &change.forgotten {
            writes.push(Write::Delete(records::worker_key(id)));
        }
        for (id, history) in &histories {
            writes.push(Write::Put(
                records::history_key(id),
                records::encode(history),
            ));
        }
        if let Some(counters) = &change.counters {
            writes.push(Write::Put(
                records::COUNTERS_KEY.to_owned(),
                records::encode(counters),
            ));
        }
        let writing = std::time::Instant::now();
        let written = self.store.apply(writes).await;
        self.metrics.observe_store(writing.elapsed());
        written.map_err(|e| self.store_failed(e))?;
        if let Some(counters) = change.counters {
            inner.counters = counters;
        }
        let mut reassigned = false;
        {
            let mut roster = self.roster();
            let now = monotonic_ms();
            for (id, history) in histories {
                roster.history_saved.insert(id, (history.version, now));
            }
            for (id, generation, reported) in saves {
                if let Some(t) = roster
                    .training
                    .get_mut(&id)
                    .filter(|t| t.generation == generation)
                {
                    t.saved = reported;
                    t.saved_ms = now;
                }
            }
            for id in &change.forgotten {
                roster.workers.remove(id);
            }
            for worker in change.workers {
                roster.workers.insert(worker.record.id.clone(), worker);
            }
            for job in change.jobs {
                let id = job.id.clone();
                let starts = job.state.is_active()
                    && inner
                        .jobs
                        .get(&id)
                        .is_none_or(|old| old.generation != job.generation);
                if starts {
                    // The curves go back with the model to where this generation starts.
                    roster.roll_back(&id, job.restore_from.as_ref().map_or(0, |c| c.step));
                }
                reassigned |= inner.show(&mut roster, job);
                let _ = self.job_changed.send(id);
            }
        }
        if reassigned {
            self.rendezvous_changed.notify_waiters();
        }
        Ok(())
    }

    /// Writes `job` and makes it visible.
    async fn commit_job(&self, inner: &mut Inner, job: JobRecord) -> Result<()> {
        self.apply(inner, Change::job(job)).await
    }

    // ------------------------------------------------------------------ jobs

    /// Validates a spec (its values, its dataset manifest, and that a plan can be made from
    /// them) and queues it as a new job.
    pub async fn submit(&self, spec_toml: &str) -> Result<JobView> {
        let spec = JobSpec::parse(spec_toml, "submitted spec")
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        // Off the async threads: the paths are the submitter's, on file systems that may be
        // slow, and heartbeats must not wait for them.
        let checked = spec.clone();
        tokio::task::spawn_blocking(move || check_data(&checked))
            .await
            .map_err(|e| CoordinatorError::Invalid(format!("data: {e}")))??;
        let stages = StagePlan::new(&spec);

        // The directory is checked off the state lock and the async threads (checkpoint.dir
        // may be on a slow network file system, and heartbeats must not wait for it), for the
        // next id; should another submit take that id meanwhile, for the one after.
        let (mut inner, id) = loop {
            let next = self.inner.lock().await.counters.next_job + 1;
            let id = format!("job-{next:06}");
            let (dir, checked) = (spec.checkpoint.dir.clone(), id.clone());
            tokio::task::spawn_blocking(move || check_checkpoint_dir(&dir, &checked))
                .await
                .map_err(|e| CoordinatorError::Invalid(format!("checkpoint.dir: {e}")))?
                .map_err(CoordinatorError::Invalid)?;
            let inner = self.inner.lock().await;
            if inner.counters.next_job + 1 == next {
                break (inner, id);
            }
        };
        let now = now_ms();
        let job = JobRecord {
            id,
            name: spec.job.name.clone(),
            state: JobState::Queued,
            generation: 0,
            spec_toml: spec.to_toml(),
            workers: Vec::new(),
            progress: ProgressRecord::default(),
            checkpoints: Vec::new(),
            message: "waiting for workers".to_owned(),
            created_at_ms: now,
            last_incident: String::new(),
            ledger: Vec::new(),
            updated_at_ms: now,
            stage_count: stages.stage_count(),
            epochs: spec.schedule.epochs,
            priority: spec.job.priority,
            world_sizes: spec.allowed_world_sizes(),
            requested_world_size: None,
            restore_from: None,
            failed_generations: 0,
            failed_checkpoints: 0,
            last_retired: Vec::new(),
            incidents: BTreeMap::new(),
            checkpoints_committed: 0,
        };
        let counters = Counters {
            next_job: inner.counters.next_job + 1,
            next_worker: inner.counters.next_worker,
        };
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        let id = job.id.clone();
        let change = Change {
            jobs: vec![job],
            counters: Some(counters),
            ..Change::default()
        };
        // Known before the job is shown (where its events go is read from it).
        inner.specs.insert(id.clone(), Arc::new(spec));
        if let Err(e) = self.apply(&mut inner, change).await {
            inner.specs.remove(&id);
            return Err(e);
        }
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, &id)
    }

    /// Job `id` as it is now (with the newest progress, saved or not).
    fn view(&self, inner: &Inner, id: &str) -> Result<JobView> {
        let record = self.roster().latest(inner.job(id)?.clone());
        let waiting = match record.state {
            JobState::Queued => inner
                .runtime
                .get(id)
                .map(|r| r.waiting.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let skipped = self.roster().skipped.get(id).copied().unwrap_or_default();
        Ok(JobView {
            record,
            waiting,
            skipped,
            spec: inner.specs.get(id).cloned(),
        })
    }

    /// The job as it is now (with the newest progress, saved or not).
    pub async fn get(&self, id: &str) -> Result<JobView> {
        self.view(&*self.inner.lock().await, id)
    }

    /// The job's curves (see [`History`]).
    pub async fn history(&self, id: &str) -> Result<History> {
        self.inner.lock().await.job(id)?;
        Ok(self.roster().history.get(id).cloned().unwrap_or_default())
    }

    pub async fn list(&self) -> Vec<JobView> {
        let inner = self.inner.lock().await;
        inner
            .jobs
            .keys()
            .filter_map(|id| self.view(&inner, id).ok())
            .collect()
    }

    /// Every registered worker, in id order.
    pub async fn workers(&self) -> Vec<WorkerView> {
        let now = monotonic_ms();
        self.roster()
            .workers
            .values()
            .map(|w| WorkerView {
                member: w.clone(),
                lease_remaining_ms: w.lease_expires_ms - now,
                quiet_ms: now - w.active_ms,
            })
            .collect()
    }

    pub async fn cancel(&self, id: &str) -> Result<JobView> {
        let mut inner = self.inner.lock().await;
        let mut job = inner.job(id)?.clone();
        if job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is already {}",
                job.state
            )));
        }
        job.release();
        job.state = JobState::Cancelled;
        job.message = "cancelled by request".to_owned();
        self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job cancelled");
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, id)
    }

    /// Queues an ended job again, to continue from `checkpoint_id` (or the latest committed
    /// checkpoint) on `workers` ranks (or any allowed number).
    pub async fn resume(
        &self,
        id: &str,
        checkpoint_id: Option<&str>,
        workers: Option<u32>,
    ) -> Result<JobView> {
        let mut inner = self.inner.lock().await;
        let mut job = inner.job(id)?.clone();
        if !job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is {}; only a completed, failed or cancelled job can be resumed",
                job.state
            )));
        }
        let restore = match checkpoint_id {
            Some(cid) => Some(
                job.checkpoints
                    .iter()
                    .find(|c| c.id == cid)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            job.checkpoints.iter().map(|c| c.id.as_str()).collect();
                        CoordinatorError::NotFound(format!(
                            "job {id} has no committed checkpoint {:?}; it has: {}",
                            cut(cid),
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ))
                    })?,
            ),
            None => job.checkpoints.last().cloned(),
        };
        if let Some(n) = workers
            && !job.world_sizes.contains(&n)
        {
            return Err(CoordinatorError::Invalid(format!(
                "--workers {n}: job {id} can run on {:?} workers (each must take whole micro-batches)",
                job.world_sizes
            )));
        }
        job.requested_world_size = workers;
        job.restore_from = restore;
        job.failed_generations = 0;
        job.state = JobState::Queued;
        let later: Vec<&str> = job.checkpoints[job.history_kept()..]
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        job.message = match &job.restore_from {
            Some(c) => format!("resuming from checkpoint {}", c.id),
            None => "resuming from the start: no committed checkpoint".to_owned(),
        };
        if !later.is_empty() {
            job.message.push_str(&format!(
                "; the checkpoints committed after it ({}) leave the job's history once it \
                 starts (their files stay)",
                later.join(", ")
            ));
        }
        self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job resumed");
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, id)
    }

    /// The job's state now, then after each change.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.job_changed.subscribe()
    }

    // --------------------------------------------------------------- workers

    /// Registers a worker; returns its record and the secret that identifies it from now on.
    /// Registrations are written in groups (group commit): whoever gets the decision lock
    /// writes every registration waiting by then in one transaction, so a cluster of ten
    /// thousand workers starting at once costs a few hundred writes, not ten thousand.
    pub async fn register(
        &self,
        hostname: &str,
        device: &str,
        name: &str,
    ) -> Result<(WorkerRecord, String)> {
        let (reply, mut answer) = oneshot::channel();
        self.registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Registration {
                hostname: hostname.to_owned(),
                device: device.to_owned(),
                name: name.to_owned(),
                reply,
            });
        let mut inner = self.inner.lock().await;
        let mut wrote = false;
        let result = loop {
            // Written by whoever held the lock before (or by this call's last group).
            if let Ok(result) = answer.try_recv() {
                break result;
            }
            let group: Vec<Registration> = {
                let mut waiting = self.registrations.lock().unwrap_or_else(|e| e.into_inner());
                let n = waiting.len().min(crate::store::MAX_WRITES - 1);
                waiting.drain(..n).collect()
            };
            self.write_registrations(&mut inner, group).await;
            wrote = true;
        };
        if wrote {
            self.schedule_after_change(&mut inner).await;
        }
        result
    }

    /// Writes `group` in one transaction (with the worker counter) and answers each.
    async fn write_registrations(&self, inner: &mut Inner, group: Vec<Registration>) {
        let (now, wall) = (monotonic_ms(), now_ms());
        let lease = self.config.lease_ttl.as_millis();
        let mut next = inner.counters.next_worker;
        let made: Vec<(Registration, WorkerRecord, String)> = group
            .into_iter()
            .map(|r| {
                next += 1;
                let secret = auth::WorkerSecret::generate();
                let worker = WorkerRecord {
                    id: format!("w-{next:06}"),
                    hostname: r.hostname.clone(),
                    device: r.device.clone(),
                    name: r.name.clone(),
                    lease_ttl_ms: lease as u32,
                    registered_at_ms: wall,
                    secret_sha256: secret.sha256,
                };
                (r, worker, secret.secret)
            })
            .collect();
        let change = Change {
            workers: made
                .iter()
                .map(|(_, w, _)| Member::new(w.clone(), now, true))
                .collect(),
            counters: Some(Counters {
                next_job: inner.counters.next_job,
                next_worker: next,
            }),
            ..Change::default()
        };
        match self.apply(inner, change).await {
            Ok(()) => {
                for (r, worker, secret) in made {
                    tracing::info!(worker = %worker.id, hostname = %r.hostname, device = %r.device, name = %r.name, "worker registered");
                    let _ = r.reply.send(Ok((worker, secret)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (r, _, _) in made {
                    let _ = r
                        .reply
                        .send(Err(CoordinatorError::Store(StoreError::Backend {
                            store: self.store.describe(),
                            message: message.clone(),
                        })));
                }
            }
        }
    }

    /// Renews the worker's lease (from when the heartbeat arrived) and records its training
    /// thread's activity; returns its current assignment. Only the roster is touched, unless
    /// the worker leaves or is heard from for the first time since a restart (then a decision
    /// follows).
    pub async fn heartbeat(
        &self,
        who: &WorkerIdentity,
        signs: Signs,
    ) -> Result<Option<WorkerAssignment>> {
        let Signs {
            activity,
            in_collective,
            leaving,
            data_wait,
            skipped,
        } = signs;
        let arrived = monotonic_ms();
        {
            let mut roster = self.roster();
            let gone = leaving && !roster.workers.contains_key(&who.id);
            let worker = match roster.authenticated(who) {
                Ok(worker) => worker,
                // Gone just now: it left while idle, and says so again.
                Err(_) if gone => return Ok(None),
                Err(e) => return Err(e),
            };
            worker.lease_expires_ms = arrived + worker.record.lease_ttl_ms as i64;
            if activity != worker.activity {
                worker.activity = activity;
                worker.active_ms = arrived;
            }
            worker.in_collective = in_collective;
            worker.data_wait = data_wait;
            roster.count_skips(&who.id, skipped);
            // Authenticated just above.
            let worker = &roster.workers[&who.id];
            if worker.heard_from && (!leaving || worker.leaving) {
                return Ok(worker.assignment.clone());
            }
        }
        let mut inner = self.inner.lock().await;
        if leaving {
            self.worker_leaving(&mut inner, &who.id).await?;
        }
        let newly_heard = self
            .roster()
            .workers
            .get_mut(&who.id)
            .is_some_and(|w| !std::mem::replace(&mut w.heard_from, true));
        if newly_heard {
            self.schedule_after_change(&mut inner).await;
        }
        Ok(self
            .roster()
            .workers
            .get(&who.id)
            .and_then(|w| w.assignment.clone()))
    }

    /// `worker_id` was asked to stop. Idle, it is simply gone. In a running job, rank 0 is
    /// told to checkpoint now (with its next progress report), and that checkpoint's commit
    /// ends the generation without it (see [`Self::commit_checkpoint`]), so the job loses no
    /// steps. Should no checkpoint come, its lease runs out as a dead worker's would.
    async fn worker_leaving(&self, inner: &mut Inner, worker_id: &str) -> Result<()> {
        let assignment = {
            let mut roster = self.roster();
            let Some(worker) = roster.workers.get(worker_id) else {
                return Ok(());
            };
            if worker.leaving {
                return Ok(());
            }
            let assignment = worker.assignment.clone();
            let running = assignment
                .as_ref()
                .and_then(|a| inner.jobs.get(&a.job_id))
                .is_some_and(|job| job.state == JobState::Running);
            if let (true, Some(a)) = (running, &assignment) {
                tracing::info!(worker = %worker_id, job = %a.job_id, "worker leaving on request; the job checkpoints first");
                if let Some(t) = roster.training.get_mut(&a.job_id) {
                    t.checkpoint_requested = true;
                }
                // Marked here only: on the paths below the worker is removed, and should the
                // store refuse that, the next heartbeat tries again.
                if let Some(w) = roster.workers.get_mut(worker_id) {
                    w.leaving = true;
                }
                return Ok(());
            }
            assignment
        };
        match assignment {
            Some(a) => {
                tracing::info!(worker = %worker_id, job = %a.job_id, "worker leaving on request");
                let why = format!("worker {worker_id} left on request");
                self.part(
                    inner,
                    &a.job_id,
                    &[worker_id.to_owned()],
                    Incident::WorkerLeft,
                    &why,
                )
                .await?;
            }
            None => {
                tracing::info!(worker = %worker_id, "idle worker leaving on request");
                let change = Change {
                    forgotten: vec![worker_id.to_owned()],
                    ..Change::default()
                };
                self.apply(inner, change).await?;
            }
        }
        Ok(())
    }

    /// `workers` leave `job_id`: they are forgotten, and its generation ends (one
    /// transaction) and the job is given to whoever is idle.
    async fn part(
        &self,
        inner: &mut Inner,
        job_id: &str,
        workers: &[String],
        incident: Incident,
        why: &str,
    ) -> Result<()> {
        let ended = inner
            .jobs
            .get(job_id)
            .and_then(|j| j.generation_ended(Some(incident), why));
        let change = Change {
            jobs: ended.into_iter().collect(),
            forgotten: workers.to_vec(),
            ..Change::default()
        };
        self.apply(inner, change).await?;
        self.schedule_after_change(inner).await;
        Ok(())
    }

    fn assignment_of(&self, inner: &Inner, who: &WorkerIdentity) -> Result<Option<Assignment>> {
        let mut roster = self.roster();
        let worker = roster.authenticated(who)?;
        Ok(worker.assignment.as_ref().and_then(|a| {
            let job = inner.jobs.get(&a.job_id)?;
            Some(Assignment {
                job_id: job.id.clone(),
                generation: job.generation,
                rank: a.rank,
                world_size: job.workers.len() as u32,
                spec_toml: job.spec_toml.clone(),
                restore_from: job.restore_from.clone(),
                retired: match a.rank {
                    0 => job.last_retired.clone(),
                    _ => Vec::new(),
                },
            })
        }))
    }

    /// The worker's assignment, waiting up to `wait` for one (an empty answer comes after a
    /// random 50 to 100% of `wait`, so that the long polls of workers that started together
    /// do not all end, and come again, at the same instant).
    pub async fn await_assignment(
        &self,
        who: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Assignment>> {
        use std::hash::BuildHasher;
        let spread = std::collections::hash_map::RandomState::new().hash_one(&who.id) as f64
            / u64::MAX as f64;
        let deadline = tokio::time::Instant::now() + wait.mul_f64(0.5 + 0.5 * spread);
        loop {
            let reassigned = self.roster().authenticated(who)?.reassigned.clone();
            let notified = reassigned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // An idle worker waits on the roster alone, never behind a decision's write.
            let assigned = self.roster().authenticated(who)?.assignment.is_some();
            if assigned && let Some(a) = self.assignment_of(&*self.inner.lock().await, who)? {
                return Ok(Some(a));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// The job and the rank `who` holds in it, if `who` is a worker of `job_id`'s generation
    /// `generation` and that generation is current. The rank is the coordinator's, never one a
    /// request names.
    fn current<'a>(
        &self,
        inner: &'a Inner,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
    ) -> Result<Option<(&'a JobRecord, u32)>> {
        let rank = self.roster().current_rank(who, job_id, generation)?;
        let job = inner.job(job_id)?;
        Ok(rank.map(|rank| (job, rank)))
    }

    /// Publishes `payload` for the rank `who` holds (a request naming another `rank` is
    /// refused) and waits up to `wait` for every rank's.
    pub async fn rendezvous(
        &self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
        rank: u32,
        payload: Vec<u8>,
        wait: Duration,
    ) -> Result<RendezvousOutcome> {
        let deadline = tokio::time::Instant::now() + wait;
        {
            let mut inner = self.inner.lock().await;
            let Some((_, assigned)) = self.current(&inner, who, job_id, generation)? else {
                return Ok(RendezvousOutcome::Stale);
            };
            if rank != assigned {
                return Err(CoordinatorError::Invalid(format!(
                    "worker {} holds rank {assigned} of generation {generation} of {job_id}, \
                     not rank {rank}",
                    who.id
                )));
            }
            let world = inner.job(job_id)?.workers.len();
            let exchange = inner.runtime.entry(job_id.to_owned()).or_default();
            exchange.rendezvous.insert(assigned, payload);
            if exchange.ring_key.is_empty() {
                exchange.ring_key = auth::ring_key();
            }
            if exchange.rendezvous.len() == world {
                let job = inner.job(job_id)?;
                if job.state == JobState::Rendezvous {
                    let mut running = job.clone();
                    running.state = JobState::Running;
                    running.message = match running.workers.len() {
                        1 => format!("running generation {generation} on 1 worker"),
                        n => format!("running generation {generation} on {n} workers"),
                    };
                    self.commit_job(&mut inner, running).await?;
                }
                // The waiting ranks are woken once, when the last one has published.
                self.rendezvous_changed.notify_waiters();
            }
        }
        loop {
            let notified = self.rendezvous_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.inner.lock().await;
                let Some((job, _)) = self.current(&inner, who, job_id, generation)? else {
                    return Ok(RendezvousOutcome::Stale);
                };
                if let Some(exchange) = inner.runtime.get(job_id)
                    && exchange.rendezvous.len() == job.workers.len()
                {
                    return Ok(RendezvousOutcome::Complete {
                        payloads: exchange.rendezvous.values().cloned().collect(),
                        ring_key: exchange.ring_key.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(RendezvousOutcome::Waiting);
            }
        }
    }

    /// Records a worker's progress; tells rank 0 when to checkpoint for a leaving worker.
    /// Progress alone touches the roster only (it is saved by the next decision or tick); a
    /// report of an event (the end, a failure) is a decision.
    pub async fn report_progress(
        &self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
        mut report: ProgressReport,
    ) -> Result<ProgressAnswer> {
        let (rank, checkpoint_now) = {
            let mut roster = self.roster();
            let Some(rank) = roster.current_rank(who, job_id, generation)? else {
                return Ok(ProgressAnswer::default());
            };
            let with_progress = report.progress.is_some();
            // Rank 0's progress is the job's; another rank's (sent with its end) is not shown.
            if let Some(progress) = report.progress.take()
                && rank == 0
            {
                roster.report(job_id, progress, now_ms());
            }
            let training = roster.training.entry(job_id.to_owned()).or_default();
            // Said once per request, so that progress reports during the checkpoint's write do
            // not ask for another; and to rank 0 only, the one that writes checkpoints.
            // Said on a report that carries progress (one the worker acts on), and the step it
            // came at kept from the first such answer: a later leaver goes with that checkpoint.
            let checkpoint_now =
                rank == 0 && with_progress && std::mem::take(&mut training.checkpoint_requested);
            if checkpoint_now {
                let step = training.progress.global_step;
                training.leave_from_step.get_or_insert(step);
            }
            (rank, checkpoint_now)
        };
        let _ = self.job_changed.send(job_id.to_owned());
        if !report.has_event() {
            return Ok(ProgressAnswer {
                current: true,
                checkpoint_now,
            });
        }
        let mut inner = self.inner.lock().await;
        let Some((job, _)) = self.current(&inner, who, job_id, generation)? else {
            return Ok(ProgressAnswer::default());
        };
        let job = job.clone();
        let current = self
            .record_event(&mut inner, &who.id, rank, job, report)
            .await?;
        Ok(ProgressAnswer {
            current,
            checkpoint_now: current && checkpoint_now,
        })
    }

    /// Records the event `worker_id` (rank `rank`) reported of `job`'s current generation
    /// (its progress is in the roster already). Returns false when the generation ended with
    /// it.
    async fn record_event(
        &self,
        inner: &mut Inner,
        worker_id: &str,
        rank: u32,
        mut job: JobRecord,
        report: ProgressReport,
    ) -> Result<bool> {
        let (job_id, generation) = (job.id.clone(), job.generation);
        let job_id = job_id.as_str();
        if !report.bad_checkpoint.is_empty() {
            let bad = report.bad_checkpoint;
            // Only the checkpoint this generation restores from can fail its restore: any
            // other id would let one rank drop the job's newest checkpoints.
            let restoring = job.restore_from.as_ref().map(|c| c.id.as_str());
            if restoring != Some(bad.as_str()) {
                return Err(CoordinatorError::Invalid(format!(
                    "checkpoint {:?} is not the one generation {generation} of {job_id} \
                     restores from ({}); not dropped",
                    cut(&bad),
                    restoring.unwrap_or("none: it starts afresh")
                )));
            }
            job.checkpoints.retain(|c| c.id != bad);
            let fallback = job
                .checkpoints
                .iter()
                .rfind(|c| job.restore_from.as_ref().is_none_or(|r| c.step <= r.step))
                .cloned();
            job.release();
            job.state = JobState::Queued;
            job.message = format!(
                "checkpoint {bad} is unusable ({}); restarting from {}",
                report.error,
                fallback
                    .as_ref()
                    .map_or("the start".to_owned(), |c| format!("checkpoint {}", c.id))
            );
            job.restore_from = fallback;
            job.incident(
                Incident::CheckpointUnusable,
                format!("generation {generation}: {}", job.message),
            );
            tracing::warn!(job = %job_id, "{}", job.message);
            self.commit_job(inner, job).await?;
            self.schedule_after_change(inner).await;
            return Ok(false);
        }
        if !report.collective_error.is_empty() {
            let failures = &mut inner
                .runtime
                .entry(job.id.clone())
                .or_default()
                .collective_failures;
            failures.insert(worker_id.to_owned(), report.collective_error);
            let every_live_rank = {
                let roster = self.roster();
                job.workers
                    .iter()
                    .filter(|w| roster.workers.contains_key(*w))
                    .all(|w| failures.contains_key(w))
            };
            if !every_live_rank {
                // A rank that did not fail is dead or hung: its lease or the stall detection
                // ends the generation, naming it.
                return Ok(true);
            }
            self.collectives_failed(inner, job).await?;
            self.schedule_after_change(inner).await;
            return Ok(false);
        }
        if !report.checkpoint_error.is_empty() {
            job.failed_checkpoints += 1;
            job.incident(
                Incident::CheckpointNotWritten,
                format!(
                    "generation {generation}: checkpoint not written ({} in a row): {}",
                    job.failed_checkpoints, report.checkpoint_error
                ),
            );
            tracing::warn!(job = %job_id, "{}", job.last_incident);
            if job.failed_checkpoints >= CHECKPOINT_FAILURES_TO_GIVE_UP {
                job.release();
                job.state = JobState::Failed;
                job.message = format!(
                    "{} checkpoints in a row could not be written (the last: {}); stopped \
                     rather than train on unsaved. Fix checkpoint.dir, then `ladder resume {}`",
                    job.failed_checkpoints, report.checkpoint_error, job.id
                );
                self.commit_job(inner, job).await?;
                self.schedule_after_change(inner).await;
                return Ok(false);
            }
            self.commit_job(inner, job).await?;
            return Ok(true);
        }
        if !report.error.is_empty() {
            job.release();
            job.state = JobState::Failed;
            job.message = format!("worker {worker_id} failed: {}", report.error);
            job.incident(
                Incident::WorkerFailed,
                format!("generation {generation}: {}", job.message),
            );
            tracing::warn!(job = %job_id, worker = %worker_id, error = %report.error, "job failed");
            self.commit_job(inner, job).await?;
            self.schedule_after_change(inner).await;
        } else if report.finished && rank == 0 {
            job.release();
            job.state = JobState::Completed;
            job.message = "completed".to_owned();
            tracing::info!(job = %job_id, "job completed");
            self.commit_job(inner, job).await?;
            self.schedule_after_change(inner).await;
        }
        Ok(true)
    }

    /// Records a checkpoint that rank 0 of the current generation has written completely, in
    /// the directory the coordinator names for it (`checkpoint.dir/JOB/ID`, its id naming this
    /// generation and its step): a commit of any other path is refused, since that path is
    /// later handed out to be restored from and deleted.
    pub async fn commit_checkpoint(
        &self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
        checkpoint: CheckpointRecord,
        trained: Vec<LedgerEntry>,
    ) -> Result<std::result::Result<Vec<CheckpointRecord>, String>> {
        let mut inner = self.inner.lock().await;
        self.roster().authenticated(who)?;
        let known = inner.job(job_id)?;
        if let Some(position) = known.checkpoints.iter().position(|c| c.id == checkpoint.id) {
            // A retry whose first attempt was committed but whose answer was lost: the same
            // answer. A refusal must mean "not committed": the worker then deletes the files.
            let newest = position + 1 == known.checkpoints.len();
            return Ok(Ok(if newest {
                known.last_retired.clone()
            } else {
                Vec::new()
            }));
        }
        let Some((job, rank)) = self.current(&inner, who, job_id, generation)? else {
            return Ok(Err(format!(
                "generation {generation} of job {job_id} is not current"
            )));
        };
        if rank != 0 {
            return Ok(Err(format!(
                "only rank 0 commits checkpoints; worker {} is rank {rank}",
                who.id
            )));
        }
        let spec = inner
            .specs
            .get(job_id)
            .cloned()
            .ok_or_else(|| CoordinatorError::Corrupt {
                key: records::job_key(job_id),
                message: "its spec does not parse (see the coordinator's log at start)".into(),
            })?;
        let named = CheckpointId {
            generation,
            global_step: checkpoint.step,
        };
        if checkpoint.id != named.to_string() {
            return Ok(Err(format!(
                "checkpoint {:?} of step {} in generation {generation} must be named {named}",
                cut(&checkpoint.id),
                checkpoint.step
            )));
        }
        if let Err(why) =
            check_trained(&trained, &checkpoint, spec.schedule.epochs, job.stage_count)
        {
            return Ok(Err(why));
        }
        let path = match location::check_checkpoint_path(
            &spec.checkpoint.dir,
            job_id,
            &checkpoint.id,
            &checkpoint.path,
        ) {
            Ok(path) => path.display().to_string(),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let mut job = job.clone();
        let checkpoint = CheckpointRecord {
            path,
            generation,
            committed_at_ms: now_ms(),
            ..checkpoint
        };
        tracing::info!(job = %job_id, checkpoint = %checkpoint.id, step = checkpoint.step, "checkpoint committed");
        let checkpoint_id = checkpoint.id.clone();
        let checkpoint_step = checkpoint.step;
        job.ledger.extend(trained.into_iter().map(|e| LedgerEntry {
            checkpoint_step: checkpoint.step,
            ..e
        }));
        job.checkpoints.push(checkpoint);
        job.checkpoints_committed += 1;
        job.failed_generations = 0;
        job.failed_checkpoints = 0;
        let retired = policy::retire(&mut job.checkpoints, spec.checkpoint.keep as usize);
        policy::compact_ledger(&mut job.ledger, &job.checkpoints);
        job.last_retired = retired.clone();
        // The leaving workers go with a checkpoint taken since they asked, not with one that
        // was still being written then.
        let leaves_now = self
            .roster()
            .training
            .get(job_id)
            .and_then(|t| t.leave_from_step)
            .is_some_and(|from| checkpoint_step >= from);
        let leaving: Vec<(usize, String)> = job
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| leaves_now && self.roster().workers.get(*w).is_some_and(|w| w.leaving))
            .map(|(rank, w)| (rank, w.clone()))
            .collect();
        self.commit_job(&mut inner, job).await?;
        if !leaving.is_empty() {
            // The checkpoint the leaving workers waited for: the job goes on without them
            // from it. The commit stands whatever happens here: a failure only leaves them to
            // their leases.
            let named: Vec<String> = leaving
                .iter()
                .map(|(rank, w)| format!("worker {w} (rank {rank})"))
                .collect();
            let why = format!("{} left on request", named.join(", "));
            let workers: Vec<String> = leaving.into_iter().map(|(_, w)| w).collect();
            if let Err(e) = self
                .part(&mut inner, job_id, &workers, Incident::WorkerLeft, &why)
                .await
            {
                tracing::warn!(job = %job_id, "{why}, but the generation could not end yet: {e}");
            }
        } else if let Some(target) = self.grows_to(&inner, job_id) {
            // Idle workers it could use (a node came back): the next generation starts from
            // this checkpoint on more ranks, no step lost.
            let why = format!(
                "growing to {target} workers: idle workers join at checkpoint {checkpoint_id}"
            );
            if let Err(e) = self.regroup(&mut inner, job_id, &why).await {
                tracing::warn!(job = %job_id, "{why}, but the generation could not end yet: {e}");
            }
        }
        Ok(Ok(retired))
    }

    /// Ends `job_id`'s generation at the checkpoint just committed so that the next one takes
    /// the idle workers too. Not an incident: the job's last incident stays.
    async fn regroup(&self, inner: &mut Inner, job_id: &str, why: &str) -> Result<()> {
        let Some(job) = inner.jobs.get(job_id) else {
            return Ok(());
        };
        let Some(next) = job.generation_ended(None, why) else {
            return Ok(());
        };
        self.commit_job(inner, next).await?;
        self.schedule_after_change(inner).await;
        Ok(())
    }

    // ------------------------------------------------------------ membership

    /// Expires lapsed leases, expels stalled workers, saves the progress that is due and
    /// assigns idle workers. Called periodically.
    pub async fn tick(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let now = monotonic_ms();
        let lost = policy::expired_leases(&self.roster().workers, now);
        for (job_id, workers) in lost {
            for id in &workers {
                tracing::warn!(worker = %id, "worker lease expired");
            }
            for forgotten in workers.chunks(crate::store::MAX_WRITES - 1) {
                let why = match forgotten {
                    [one] => format!("worker {one} lost (lease expired)"),
                    many => format!("workers {} lost (leases expired)", many.join(", ")),
                };
                let ended = job_id
                    .as_ref()
                    .and_then(|id| inner.jobs.get(id))
                    .and_then(|job| job.generation_ended(Some(Incident::WorkerLost), &why));
                let change = Change {
                    jobs: ended.into_iter().collect(),
                    forgotten: forgotten.to_vec(),
                    ..Change::default()
                };
                self.apply(&mut inner, change).await?;
            }
        }
        let stalled = policy::stalled_workers(
            &inner.jobs,
            &inner.runtime,
            &self.roster().workers,
            now,
            self.config.stall_timeout.as_millis() as i64,
        );
        for (job_id, hung, why) in stalled {
            for id in &hung {
                tracing::warn!(worker = %id, job = %job_id, "expelling a stalled worker");
            }
            self.part(&mut inner, &job_id, &hung, Incident::WorkerStalled, &why)
                .await?;
        }
        self.save_progress(&mut inner, now).await?;
        self.schedule(&mut inner).await
    }

    /// Saves the progress of training jobs whose save is due (see [`Training`]), all in one
    /// transaction (or a few, for more jobs than one may hold): a thousand reports between
    /// two ticks cost one write.
    async fn save_progress(&self, inner: &mut Inner, now: i64) -> Result<()> {
        let due: Vec<JobRecord> = {
            let roster = self.roster();
            roster
                .training
                .iter()
                .filter(|(_, t)| t.save_due(now))
                .filter_map(|(id, t)| {
                    inner
                        .jobs
                        .get(id)
                        .filter(|j| j.generation == t.generation && j.state.is_active())
                        .cloned()
                })
                .collect()
        };
        for jobs in due.chunks(crate::store::MAX_WRITES) {
            let change = Change {
                jobs: jobs.to_vec(),
                ..Change::default()
            };
            self.apply(inner, change).await?;
        }
        Ok(())
    }

    /// Every live rank of `job`'s generation reported its collective failing: the workers are
    /// alive, so waiting for a lease or a stall would only waste time. The generation ends and
    /// starts again from the latest checkpoint, unless it is the same story too many times in
    /// a row.
    async fn collectives_failed(&self, inner: &mut Inner, mut job: JobRecord) -> Result<()> {
        let failures = inner.runtime.get(&job.id).map(|r| &r.collective_failures);
        let errors: Vec<String> = job
            .workers
            .iter()
            .enumerate()
            .filter_map(|(rank, w)| {
                let e = failures?.get(w)?;
                Some(format!("rank {rank}: {e}"))
            })
            .collect();
        let why = format!(
            "the collective failed on every rank ({})",
            errors.join("; ")
        );
        job.failed_generations += 1;
        if job.failed_generations < COLLECTIVE_FAILURES_TO_GIVE_UP {
            let ended = job
                .generation_ended(Some(Incident::CollectiveFailed), &why)
                .expect("a training job");
            return self.commit_job(inner, ended).await;
        }
        job.release();
        job.state = JobState::Failed;
        job.message = format!(
            "{why}, in {} generations in a row without a checkpoint: giving up; fix the cause, \
             then `ladder resume {}`",
            job.failed_generations, job.id
        );
        job.incident(
            Incident::CollectiveFailed,
            format!("generation {}: {}", job.generation, job.message),
        );
        tracing::error!(job = %job.id, "{}", job.message);
        self.commit_job(inner, job).await
    }

    /// Records what queued `job_id` waits for; watchers hear of a change.
    fn set_waiting(&self, job_id: &str, waiting: String, inner: &mut Inner) {
        let runtime = inner.runtime.entry(job_id.to_owned()).or_default();
        if runtime.waiting != waiting {
            runtime.waiting = waiting;
            let _ = self.job_changed.send(job_id.to_owned());
        }
    }

    /// Schedules after a change that is already saved: the change stands whatever happens
    /// here, so a failure is logged, not returned (the next [`Self::tick`] tries again).
    async fn schedule_after_change(&self, inner: &mut Inner) {
        if let Err(e) = self.schedule(inner).await {
            tracing::warn!("cannot assign workers now (tried again shortly): {e}");
        }
    }

    /// Gives idle workers to queued jobs in the order they are served (see [`policy::place`]).
    async fn schedule(&self, inner: &mut Inner) -> Result<()> {
        let now = monotonic_ms();
        let queued = policy::queue(&inner.jobs, &inner.runtime);
        let (idle, unheard) = {
            let roster = self.roster();
            let idle: Vec<String> = roster
                .workers
                .iter()
                .filter(|(_, w)| w.is_idle(now))
                .map(|(id, _)| id.clone())
                .collect();
            let unheard = roster
                .workers
                .values()
                .filter(|w| w.assignment.is_none() && !w.heard_from)
                .count();
            (idle, unheard)
        };
        let grace = self.config.rendezvous_grace.as_millis() as i64;
        for (job_id, placement) in policy::place(&queued, idle, unheard, now, grace) {
            let workers = match placement {
                Placement::Wait {
                    why,
                    ready_since_ms,
                } => {
                    inner
                        .runtime
                        .entry(job_id.clone())
                        .or_default()
                        .ready_since_ms = ready_since_ms;
                    self.set_waiting(&job_id, why, inner);
                    continue;
                }
                Placement::Start(workers) => workers,
            };
            let runtime = inner.runtime.entry(job_id.clone()).or_default();
            runtime.waiting.clear();
            runtime.ready_since_ms = None;
            let mut job = inner.job(&job_id)?.clone();
            job.generation += 1;
            let dropped: Vec<String> = job
                .roll_back_to_restore_point()
                .into_iter()
                .map(|c| c.id)
                .collect();
            let fit = workers.len();
            job.workers = workers;
            job.state = JobState::Rendezvous;
            job.message = format!(
                "generation {} assigned to {} worker(s), waiting for rendezvous",
                job.generation, fit
            );
            if !dropped.is_empty() {
                let note = format!(
                    "the checkpoints committed after its restore point ({}) left the job's \
                     history (their files stay)",
                    dropped.join(", ")
                );
                tracing::info!(job = %job.id, "{note}");
                job.message = format!("{}; {note}", job.message);
            }
            tracing::info!(job = %job.id, generation = job.generation, workers = fit, "workers assigned");
            // One write: the workers hold their ranks once the job lists them.
            self.commit_job(inner, job).await?;
        }
        Ok(())
    }

    /// The larger world size `job_id` regroups to at a checkpoint just committed (see
    /// [`policy::grows_to`]).
    fn grows_to(&self, inner: &Inner, job_id: &str) -> Option<u32> {
        let job = inner.jobs.get(job_id)?;
        let any_queued = inner.jobs.values().any(|j| j.state == JobState::Queued);
        let now = monotonic_ms();
        let roster = self.roster();
        let running_for = now - roster.training.get(job_id)?.started_ms;
        let idle = roster.workers.values().filter(|w| w.is_idle(now)).count();
        policy::grows_to(
            job,
            any_queued,
            idle,
            running_for,
            self.config.regroup_interval.as_millis() as i64,
        )
    }
}

/// A commit's checkpoint and what it says its steps trained, against the job's `epochs` and
/// `stages`: an epoch or stage the job does not have, or an epoch told twice, is refused (the
/// ledger is kept in the job's record and summed by every reader).
fn check_trained(
    trained: &[LedgerEntry],
    checkpoint: &CheckpointRecord,
    epochs: u32,
    stages: u32,
) -> std::result::Result<(), String> {
    let id = cut(&checkpoint.id);
    if checkpoint.epoch > epochs || checkpoint.stage >= stages.max(1) {
        return Err(format!(
            "checkpoint {id} says epoch {} of stage {}; the job has {epochs} epochs in {stages} \
             stages",
            checkpoint.epoch, checkpoint.stage
        ));
    }
    let mut told = std::collections::BTreeSet::new();
    for entry in trained {
        if entry.epoch >= epochs {
            return Err(format!(
                "checkpoint {id} tells what epoch {} trained; the job has epochs 0 to {}",
                entry.epoch,
                epochs.saturating_sub(1)
            ));
        }
        if !told.insert(entry.epoch) {
            return Err(format!("checkpoint {id} tells epoch {} twice", entry.epoch));
        }
    }
    Ok(())
}

/// What a submitted spec reads from files: its dataset manifests, a plan made from them, and
/// the weights it starts from.
fn check_data(spec: &JobSpec) -> Result<()> {
    let manifest = Manifest::load(&spec.data.manifest)
        .map_err(|e| CoordinatorError::Invalid(format!("data.manifest: {e}")))?;
    if manifest.classes > spec.model.classes {
        return Err(CoordinatorError::Invalid(format!(
            "model.classes = {}: the dataset {} has {} classes",
            spec.model.classes,
            spec.data.manifest.display(),
            manifest.classes
        )));
    }
    SamplePlan::of_job(spec, &manifest.shard_sizes())
        .map_err(|e| CoordinatorError::Invalid(format!("batch.global: {e}")))?;
    if let Some(eval) = &spec.data.eval_manifest {
        Manifest::load(eval)
            .map_err(|e| CoordinatorError::Invalid(format!("data.eval_manifest: {e}")))?;
    }
    if let Some(init) = &spec.model.init_from
        && !init.is_file()
    {
        return Err(CoordinatorError::Invalid(format!(
            "model.init_from: {} is not a file here (paths are checked on the coordinator's \
             machine)",
            init.display()
        )));
    }
    Ok(())
}
