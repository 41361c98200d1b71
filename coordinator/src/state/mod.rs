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
//! This module holds the coordinator, its locks and `apply`, through which every decision is
//! written; the decisions themselves are grouped by what they are about, one file each: `jobs`
//! (submit, cancel, resume, and how a job is shown), `workers` (registration, heartbeats and
//! leases, leaving), `generations` (assignments and the rendezvous), `progress` (what ranks
//! report as they train), `checkpoints` (commits and retention), and `tick` (lapsed leases,
//! stalls, saving progress, and the schedule).
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

mod checkpoints;
mod generations;
mod jobs;
mod progress;
mod tick;
mod workers;

pub use generations::{Assignment, RendezvousOutcome};
pub use progress::{ProgressAnswer, ProgressReport};
use workers::Registration;
pub use workers::Signs;

use crate::clock::{monotonic_ms, now_ms};
use crate::error::{CoordinatorError, Result};
use crate::history::History;
use crate::metrics::Metrics;
use crate::records::{self, Counters, JobRecord, WorkerRecord};
use crate::runtime::{JobRuntime, Member, Roster};
use crate::store::{SharedStore, StoreError, Write};
use crate::tensorboard;
use crate::view::{self, Decided, Snapshot};
use ladder_core::cut;
use ladder_core::dataset::SKIP_REASONS;
use ladder_core::spec::JobSpec;
use ladder_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, broadcast, watch};

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
    /// An ended job is deleted this long after it ended (`None`: kept until `ladder delete`):
    /// every job ever run would otherwise stay in the store, read at every start.
    pub retire_ended_after: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease_ttl: Duration::from_secs(10),
            rendezvous_grace: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(300),
            regroup_interval: Duration::from_secs(600),
            retire_ended_after: Some(Duration::from_secs(7 * 24 * 3600)),
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
    /// Jobs changed in memory since the last [`Coordinator::publish`].
    unpublished: BTreeSet<String>,
    /// Every job's view as decided (see [`crate::view`]).
    published: Arc<BTreeMap<String, Arc<pb::Job>>>,
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
        self.unpublished.insert(job.id.clone());
        let ended = job.state.is_terminal()
            && self
                .jobs
                .get(&job.id)
                .is_some_and(|old| !old.state.is_terminal());
        if let (true, Some(events)) = (ended, &roster.events) {
            events.send(tensorboard::Note::Close {
                job: job.id.clone(),
            });
        }
        self.jobs.insert(job.id.clone(), job);
        reassigned
    }

    /// Forgets deleted job `id`, with everything kept in memory beside it.
    fn forget(&mut self, roster: &mut Roster, id: &str) {
        self.unpublished.insert(id.to_owned());
        self.jobs.remove(id);
        self.specs.remove(id);
        self.runtime.remove(id);
        roster.training.remove(id);
        roster.history.remove(id);
        roster.history_saved.remove(id);
        roster.skipped.remove(id);
        roster.event_dirs.remove(id);
        if let Some(events) = &roster.events {
            events.send(tensorboard::Note::Close { job: id.to_owned() });
        }
    }

    /// Brings [`Inner::published`] up to date; returns the jobs whose views changed.
    fn publish(&mut self) -> Vec<String> {
        let changed = std::mem::take(&mut self.unpublished);
        if changed.is_empty() {
            return Vec::new();
        }
        let views = Arc::make_mut(&mut self.published);
        for id in &changed {
            match self.jobs.get(id) {
                Some(record) => {
                    let waiting = self.runtime.get(id).map_or("", |r| r.waiting.as_str());
                    let batch = self.specs.get(id).map_or(0, |spec| spec.batch.global);
                    let shown = view::job(record, waiting, &[], batch);
                    views.insert(id.clone(), Arc::new(shown));
                }
                None => {
                    views.remove(id);
                }
            }
        }
        changed.into_iter().collect()
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

/// What one store transaction writes; shown in memory only once written.
#[derive(Default)]
struct Change {
    jobs: Vec<JobRecord>,
    /// New workers: their records are written.
    workers: Vec<Member>,
    /// Workers to forget: their next call is answered "unknown worker".
    forgotten: Vec<String>,
    /// Ended jobs to delete: their record and curves leave the store.
    deleted: Vec<String>,
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
    metrics: Arc<Metrics>,
    /// The jobs' views as the decisions published them, and what readers were last shown:
    /// readers take these, never `inner` (see [`crate::view`]).
    decided: std::sync::Mutex<Decided>,
    shown: std::sync::Mutex<Arc<Snapshot>>,
}

impl Coordinator {
    /// Rebuilds the coordinator's state from `store`. One record that does not decode (a bug
    /// of an older version, a damaged file) never keeps the coordinator from serving the rest:
    /// it is set aside under [`records::QUARANTINE_PREFIX`] and, if it was a job's, the job
    /// fails saying so (a worker's registers again, a job's curves start afresh).
    pub async fn recover(store: SharedStore, config: Config) -> Result<Arc<Coordinator>> {
        Self::recover_with(store, config, Arc::default()).await
    }

    /// [`Self::recover`], measuring into `metrics` (a process's, kept across its terms of
    /// leadership).
    pub async fn recover_with(
        store: SharedStore,
        config: Config,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Coordinator>> {
        let mut inner = Inner::default();
        let mut roster = Roster {
            events: Some(tensorboard::Events::start(
                metrics.tensorboard_dropped.clone(),
            )),
            ..Roster::default()
        };
        let now = monotonic_ms();
        // Each record's writes: one transaction each, so that a job's record is never
        // replaced before its original is set aside.
        let mut set_aside: Vec<Vec<Write>> = Vec::new();
        let mut ids = Vec::new();
        for (key, bytes) in store.list(records::WORKERS_PREFIX).await? {
            ids.push(key.clone());
            match records::decode::<WorkerRecord>(&key, &bytes) {
                Ok(worker) => {
                    roster
                        .workers
                        .insert(worker.id.clone(), Member::new(worker, now, false));
                }
                Err(e) => set_aside.push(set_aside_writes(&key, bytes, &e)),
            }
        }
        for (key, bytes) in store.list(records::JOBS_PREFIX).await? {
            ids.push(key.clone());
            let job = match records::decode::<JobRecord>(&key, &bytes) {
                Ok(job) => job,
                Err(e) => {
                    let id = &key[records::JOBS_PREFIX.len()..];
                    let failed = JobRecord::unreadable(id, &key, &e.to_string(), now_ms());
                    let mut writes = set_aside_writes(&key, bytes, &e);
                    writes.push(Write::Put(key.clone(), records::encode(&failed)));
                    set_aside.push(writes);
                    inner.show(&mut roster, failed);
                    continue;
                }
            };
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
            let history: History = match records::decode(&key, &bytes) {
                Ok(history) => history,
                Err(e) => {
                    set_aside.push(set_aside_writes(&key, bytes, &e));
                    continue;
                }
            };
            let id = key[records::HISTORY_PREFIX.len()..].to_owned();
            roster
                .history_saved
                .insert(id.clone(), (history.version, now));
            roster.history.insert(id, history);
        }
        if let Some(bytes) = store.get(records::COUNTERS_KEY).await? {
            match records::decode::<Counters>(records::COUNTERS_KEY, &bytes) {
                Ok(counters) => inner.counters = counters,
                Err(e) => {
                    // Ids must never be given twice: at least as high as any id seen.
                    ids.extend(
                        store
                            .list(records::QUARANTINE_PREFIX)
                            .await?
                            .into_iter()
                            .map(|(key, _)| key),
                    );
                    let counters = Counters::default().at_least(&ids);
                    let mut writes = set_aside_writes(records::COUNTERS_KEY, bytes, &e);
                    writes.push(Write::Put(
                        records::COUNTERS_KEY.to_owned(),
                        records::encode(&counters),
                    ));
                    set_aside.push(writes);
                    inner.counters = counters;
                }
            }
        }
        for writes in set_aside {
            store.apply(writes).await?;
        }
        inner.publish();
        let decided = Decided {
            version: 1,
            jobs: inner.published.clone(),
        };
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
            metrics,
            decided: std::sync::Mutex::new(decided),
            shown: std::sync::Mutex::default(),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the coordinator measures of itself (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
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

    /// Publishes the views of the jobs changed since the last call (see [`crate::view`]), then
    /// tells their watchers.
    fn publish(&self, inner: &mut Inner) {
        let changed = inner.publish();
        if changed.is_empty() {
            return;
        }
        {
            let mut decided = locked(&self.decided);
            decided.version += 1;
            decided.jobs = inner.published.clone();
        }
        for id in changed {
            let _ = self.job_changed.send(id);
        }
    }

    /// Every job and worker as readers are shown them: the views the decisions published with
    /// the newest progress laid over them, taken anew when a decision was published since or
    /// when older than [`view::SNAPSHOT_FRESH_MS`]. Never waits for a decision.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut shown = locked(&self.shown);
        let decided = locked(&self.decided).clone();
        let now = monotonic_ms();
        if shown.is_fresh(decided.version, now) {
            return shown.clone();
        }
        let mut jobs = decided.jobs;
        let (live, skipped, workers) = {
            let roster = self.roster();
            let live: Vec<(String, pb::Progress)> = roster
                .training
                .iter()
                .filter(|(id, t)| {
                    jobs.get(*id).is_some_and(|job| {
                        job.generation == t.generation && job.progress != Some(t.progress)
                    })
                })
                .map(|(id, t)| (id.clone(), t.progress))
                .collect();
            let skipped: Vec<(String, [u64; SKIP_REASONS.len()])> = roster
                .skipped
                .iter()
                .filter(|(id, counts)| jobs.contains_key(*id) && counts.iter().any(|&n| n > 0))
                .map(|(id, counts)| (id.clone(), *counts))
                .collect();
            let workers: Vec<pb::WorkerInfo> = roster
                .workers
                .values()
                .map(|member| view::worker(member, now))
                .collect();
            (live, skipped, workers)
        };
        if !live.is_empty() || !skipped.is_empty() {
            let views = Arc::make_mut(&mut jobs);
            for (id, progress) in live {
                if let Some(job) = views.get_mut(&id) {
                    Arc::make_mut(job).progress = Some(progress);
                }
            }
            for (id, counts) in skipped {
                if let Some(job) = views.get_mut(&id) {
                    Arc::make_mut(job).skipped = view::skipped_by_reason(&counts);
                }
            }
        }
        *shown = Arc::new(Snapshot::new(decided.version, now, jobs, workers));
        shown.clone()
    }

    /// The roster, for memory work only (see [`Roster`]).
    fn roster(&self) -> std::sync::MutexGuard<'_, Roster> {
        locked(&self.roster)
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
        for id in &change.deleted {
            writes.push(Write::Delete(records::job_key(id)));
            writes.push(Write::Delete(records::history_key(id)));
        }
        if let Some(counters) = &change.counters {
            writes.push(Write::Put(
                records::COUNTERS_KEY.to_owned(),
                records::encode(counters),
            ));
        }
        self.write(writes).await?;
        if let Some(counters) = change.counters {
            inner.counters = counters;
        }
        let mut reassigned = false;
        {
            let mut roster = self.roster();
            let now = monotonic_ms();
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
            for id in &change.deleted {
                inner.forget(&mut roster, id);
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
            }
        }
        self.publish(inner);
        if reassigned {
            self.rendezvous_changed.notify_waiters();
        }
        // The curves, apart: the decision stands whatever becomes of them (they are tried
        // again with the next decision about their job), and a job's largest record never
        // rides in the transaction of its decisions.
        for (id, history) in histories {
            let put = Write::Put(records::history_key(&id), records::encode(&history));
            match self.write(vec![put]).await {
                Ok(()) => {
                    let now = monotonic_ms();
                    self.roster()
                        .history_saved
                        .insert(id, (history.version, now));
                }
                Err(e) => tracing::warn!(job = %id, "the job's curves are not saved yet: {e}"),
            }
        }
        Ok(())
    }

    /// Writes `writes` in one transaction, measured.
    async fn write(&self, writes: Vec<Write>) -> Result<()> {
        let bytes = writes.iter().map(Write::bytes).sum();
        let writing = std::time::Instant::now();
        let written = self.store.apply(writes).await;
        self.metrics.observe_store(writing.elapsed(), bytes);
        written.map_err(|e| self.store_failed(e))
    }

    /// Writes `job` and makes it visible.
    async fn commit_job(&self, inner: &mut Inner, job: JobRecord) -> Result<()> {
        self.apply(inner, Change::job(job)).await
    }

    /// The job's state now, then after each change.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.job_changed.subscribe()
    }
}

/// The writes that set the record at `key` (`bytes`, unreadable: `e`) aside under
/// [`records::QUARANTINE_PREFIX`] and remove it; a job's record is replaced instead (by the
/// caller, in the same transaction), so that the job stays listed as failed.
fn set_aside_writes(key: &str, bytes: Vec<u8>, e: &CoordinatorError) -> Vec<Write> {
    let aside = records::quarantine_key(key);
    tracing::error!("{e}; set aside as {aside} for inspection");
    let mut writes = vec![Write::Put(aside, bytes)];
    if !key.starts_with(records::JOBS_PREFIX) && key != records::COUNTERS_KEY {
        writes.push(Write::Delete(key.to_owned()));
    }
    writes
}

/// `mutex`'s guard: what the coordinator keeps behind plain mutexes is never left half-changed
/// by a panic, so a poisoned one is used as it is.
fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
