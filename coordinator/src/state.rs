//! The coordinator's model of the world (jobs and workers) and the rules that move it.
//!
//! A job moves `queued -> rendezvous -> running -> completed`, or to `failed` / `cancelled`;
//! `resume` brings an ended job back to `queued`. Every assignment of workers to a job starts a
//! new *generation*: a worker lost mid-run sends the job back to `queued`, its survivors are
//! released, and the next assignment (generation + 1) restores from the latest committed
//! checkpoint. Workers notice a generation change through their heartbeat and drop the old
//! collective.
//!
//! Each fact is saved once. A job's record holds its generation and its workers by rank; a
//! worker's assignment is derived from it ([`show_job`]), never saved beside it, so no crash or
//! store error between two writes can leave a worker assigned to a job that does not list it.
//! A restarted coordinator rebuilds everything from the store alone.
//!
//! Two locks, taken in this order:
//! - `inner` (async): jobs and counters, what decisions read and write. Every decision is one
//!   store transaction ([`Change`]), written before it becomes visible; the lock is held across
//!   the write, so decisions are made one at a time, each from the state it replaces.
//! - `roster` (plain, [`Roster`]): every worker with its signs of life and derived rank, and
//!   each training job's newest progress. Held for memory work only, never across a write:
//!   heartbeats and progress reports take nothing else, so a slow disk or etcd never makes a
//!   healthy worker late. Heartbeats renew leases in memory only, and recovery grants every
//!   known worker a fresh lease, since no worker could reach a coordinator that was down;
//!   progress is saved by the next decision about its job or by [`Coordinator::tick`].

use crate::auth::{self, WorkerIdentity};
use crate::store::{SharedStore, StoreError, Write};
use ladder_core::cut;
use ladder_core::dataset::Manifest;
use ladder_core::location::{self, CheckpointId};
use ladder_core::sample::SamplePlan;
use ladder_core::spec::JobSpec;
use ladder_core::stage::StagePlan;
use serde::{Deserialize, Serialize};
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

/// Milliseconds on the monotonic clock since this process first asked. Leases, stalls and grace
/// periods are timed on it (and never persisted), so that a step of the wall clock (NTP, a
/// resumed virtual machine) neither expires every lease at once nor hides a dead worker. It is
/// tokio's clock, which tests may pause and advance.
fn monotonic_ms() -> i64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(start)
        .as_millis() as i64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Rendezvous,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The names `ladder status` shows.
        f.write_str(match self {
            JobState::Queued => "queued",
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        })
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    fn is_active(self) -> bool {
        matches!(self, JobState::Rendezvous | JobState::Running)
    }
}

/// How far a job got, as rank 0 reports it: saved as the wire's message.
pub type ProgressRecord = ladder_proto::v1::Progress;

/// A committed checkpoint: saved as the wire's message.
pub type CheckpointRecord = ladder_proto::v1::CheckpointRef;

/// What the steps up to a committed checkpoint trained of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The global step of the checkpoint that committed it.
    pub checkpoint_step: u64,
    pub epoch: u32,
    pub samples: u64,
    pub digest: u64,
    pub skipped: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub name: String,
    pub state: JobState,
    pub generation: u64,
    pub spec_toml: String,
    /// Worker ids by rank in the current generation; empty unless rendezvous or running.
    pub workers: Vec<String>,
    pub progress: ProgressRecord,
    pub checkpoints: Vec<CheckpointRecord>,
    pub message: String,
    #[serde(default)]
    pub last_incident: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub stage_count: u32,
    pub epochs: u32,
    /// Queued jobs are served highest priority first, then oldest first (`job.priority`).
    #[serde(default)]
    pub priority: i32,
    /// World sizes the spec allows (see `JobSpec::allowed_world_sizes`).
    pub world_sizes: Vec<u32>,
    /// Set by `resume --workers N`.
    pub requested_world_size: Option<u32>,
    pub restore_from: Option<CheckpointRecord>,
    /// What each committed checkpoint's steps trained, in commit order: the model's history
    /// (compacted at each commit, see [`compact_ledger`]).
    #[serde(default)]
    pub ledger: Vec<LedgerEntry>,
    /// Rendezvous payloads by rank for the current generation: workers publish them again
    /// after a coordinator restart, so they are not persisted.
    #[serde(skip)]
    pub rendezvous: BTreeMap<u32, Vec<u8>>,
    /// The current generation's ring key (see [`auth::ring_key`]), handed to its ranks with
    /// the completed rendezvous; made anew with the rendezvous after a restart.
    #[serde(skip)]
    pub ring_key: Vec<u8>,
    /// When enough workers for some allowed world size were first idle.
    #[serde(skip)]
    pub ready_since_ms: Option<i64>,
    /// The collective failures reported in the current generation, by worker. Not persisted:
    /// after a coordinator restart the generation ends through leases or stall detection.
    #[serde(skip)]
    pub collective_failures: BTreeMap<String, String>,
    /// Generations in a row that ended with every rank's collective failing and no checkpoint
    /// committed since: at [`COLLECTIVE_FAILURES_TO_GIVE_UP`] the job fails.
    #[serde(default)]
    pub failed_generations: u32,
    /// Checkpoints in a row that could not be written: at [`CHECKPOINT_FAILURES_TO_GIVE_UP`]
    /// the job fails.
    #[serde(default)]
    pub failed_checkpoints: u32,
    /// What the newest commit retired: answered again to a retry of that commit whose first
    /// answer was lost, so that its worker still deletes them.
    #[serde(default)]
    pub last_retired: Vec<CheckpointRecord>,
    /// While queued: what the job waits for (the idle workers it lacks, or the grace before it
    /// starts on fewer), as the scheduler last saw it.
    #[serde(skip)]
    pub waiting: String,
}

/// Generations in a row, without a checkpoint between, whose collectives all fail before the
/// job is failed: the same failure again and again (a bad NCCL setup, a broken network path)
/// is not worth retrying forever, while one or two can be a passing fault.
pub const COLLECTIVE_FAILURES_TO_GIVE_UP: u32 = 3;

/// Checkpoints in a row that cannot be written before the job is failed: a full disk can pass,
/// but training on for days without a checkpoint would put all of it at risk unseen.
pub const CHECKPOINT_FAILURES_TO_GIVE_UP: u32 = 3;

impl JobRecord {
    /// Frees every worker of the current generation (they become idle once this record is
    /// shown) and forgets what the generation exchanged.
    fn release(&mut self) {
        self.workers.clear();
        self.rendezvous.clear();
        self.ring_key.clear();
        self.collective_failures.clear();
    }

    /// The assignments this record makes: rank `r` of the current generation to
    /// `workers[r]`, while the job is active.
    fn assignments(&self) -> impl Iterator<Item = (&String, WorkerAssignment)> {
        let active = self.state.is_active();
        self.workers
            .iter()
            .enumerate()
            .filter(move |_| active)
            .map(|(rank, w)| {
                (
                    w,
                    WorkerAssignment {
                        job_id: self.id.clone(),
                        generation: self.generation,
                        rank: rank as u32,
                    },
                )
            })
    }

    /// The job queued again after a member of its generation was lost (`why`), to restore
    /// from its latest checkpoint; `None` if the job is not training.
    fn generation_ended(&self, why: &str) -> Option<JobRecord> {
        if !self.state.is_active() {
            return None;
        }
        let mut job = self.clone();
        job.release();
        job.state = JobState::Queued;
        job.restore_from = job.checkpoints.last().cloned();
        job.message = format!(
            "{why}; generation {} ended, restoring from {}",
            job.generation,
            job.restore_from
                .as_ref()
                .map_or("the start".to_owned(), |c| format!("checkpoint {}", c.id))
        );
        job.last_incident = job.message.clone();
        tracing::warn!(job = %job.id, "{}", job.message);
        Some(job)
    }

    /// How many of `checkpoints` stay the model's history when the next generation starts
    /// from `restore_from`: those up to it in commit order (all of them if it is not listed).
    fn history_kept(&self) -> usize {
        match &self.restore_from {
            None => 0,
            Some(from) => self
                .checkpoints
                .iter()
                .position(|c| c.id == from.id)
                .map_or(self.checkpoints.len(), |p| p + 1),
        }
    }

    /// Rolls the record back to `restore_from` as a new generation starts from it: what was
    /// committed after it — checkpoints, and what their steps trained — is no longer the model's
    /// history. Returns the checkpoints dropped; their files stay where they are.
    fn roll_back_to_restore_point(&mut self) -> Vec<CheckpointRecord> {
        let restored = self.restore_from.as_ref().map_or(0, |c| c.step);
        self.ledger.retain(|e| e.checkpoint_step <= restored);
        let kept = self.history_kept();
        self.checkpoints.split_off(kept)
    }

    /// Per epoch, the sum of the ledger: (epoch, samples, digest, skipped).
    pub fn trained(&self) -> Vec<(u32, u64, u64, u64)> {
        sum_per_epoch(&self.ledger)
    }

    fn world_sizes_now(&self) -> Vec<u32> {
        match self.requested_world_size {
            Some(n) => self
                .world_sizes
                .iter()
                .copied()
                .filter(|&s| s == n)
                .collect(),
            None => self.world_sizes.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerAssignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub hostname: String,
    pub device: String,
    pub name: String,
    pub lease_ttl_ms: u32,
    pub registered_at_ms: i64,
    /// The SHA-256 of the secret its registration returned (see [`auth::WorkerSecret`]). A
    /// record without one (written before workers had secrets) never authenticates: its
    /// worker registers again.
    #[serde(default)]
    pub secret_sha256: String,
    /// Derived from the job that lists it (see `show_job`), never saved.
    #[serde(skip)]
    pub assignment: Option<WorkerAssignment>,
    /// On [`monotonic_ms`]'s clock, as the other times kept in memory only.
    #[serde(skip)]
    pub lease_expires_ms: i64,
    /// The training thread's activity counter from the last heartbeat, when it last changed
    /// (or the assignment began), and whether it waits in a collective.
    #[serde(skip)]
    pub activity: u64,
    #[serde(skip)]
    pub active_ms: i64,
    #[serde(skip)]
    pub in_collective: bool,
    /// Whether this coordinator process has heard from the worker (it registered or sent a
    /// heartbeat). Workers recovered from the store after a restart may be long dead: they
    /// keep the assignments they had, but get no new one before they show they are alive.
    #[serde(skip)]
    pub heard_from: bool,
    /// Asked to stop (SIGTERM): its job checkpoints, then goes on without it.
    #[serde(default)]
    pub leaving: bool,
    /// Wakes this worker's long poll for an assignment when its assignment changes (one
    /// worker's, not every idle worker's).
    #[serde(skip)]
    pub reassigned: Arc<Notify>,
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
    next_job: u64,
    next_worker: u64,
}

/// Every registered worker (its saved record, its signs of life, and the rank it holds, derived
/// from its job) and what each training job's rank 0 last reported. Behind a plain mutex that
/// is held for memory work only, never across an await or a store write: heartbeats and
/// progress reports touch nothing else, so they never wait for the disk or etcd.
#[derive(Default)]
struct Roster {
    workers: BTreeMap<String, WorkerRecord>,
    training: BTreeMap<String, Training>,
}

/// What a training job's rank 0 reported: kept here as it comes, saved with the job at every
/// decision about it, at an epoch or stage boundary, and at least every
/// [`PROGRESS_SAVED_EVERY_MS`] (by [`Coordinator::tick`]).
#[derive(Clone, Debug, Default)]
struct Training {
    generation: u64,
    /// The newest progress (the job's saved progress until rank 0 reports).
    progress: ProgressRecord,
    /// Reports received, and how many of them the last save held: a save in flight does not
    /// count a report that came meanwhile as saved.
    reported: u64,
    saved: u64,
    /// A report since the last save crossed an epoch or stage boundary.
    boundary: bool,
    saved_ms: i64,
    /// When the generation was assigned.
    started_ms: i64,
    /// A worker of the generation is leaving: rank 0 is told to checkpoint now (once), and
    /// that commit ends the generation without it.
    checkpoint_requested: bool,
}

impl Training {
    fn record(&mut self, mut progress: ProgressRecord) {
        if progress.eval_epoch == 0 {
            // A run resumed from a checkpoint has not evaluated yet: the last evaluation stays
            // on show.
            let last = &self.progress;
            (progress.eval_epoch, progress.eval_top1, progress.eval_top5) =
                (last.eval_epoch, last.eval_top1, last.eval_top5);
        }
        self.boundary |=
            self.progress.epoch != progress.epoch || self.progress.stage != progress.stage;
        self.progress = progress;
        self.reported += 1;
    }

    fn save_due(&self, now: i64) -> bool {
        self.reported != self.saved
            && (self.boundary || now - self.saved_ms >= PROGRESS_SAVED_EVERY_MS)
    }
}

impl Roster {
    /// The record of the worker `who` names, if its secret is that worker's. Any other
    /// answer is the same "unknown worker": a caller learns nothing about which ids exist.
    fn authenticated(&mut self, who: &WorkerIdentity) -> Result<&mut WorkerRecord> {
        self.workers
            .get_mut(&who.id)
            .filter(|w| auth::WorkerSecret::matches(&w.secret_sha256, &who.secret))
            .ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "unknown worker {:?}: its lease expired, it never registered, or the call \
                     does not carry its secret; register again",
                    cut(&who.id)
                ))
            })
    }

    /// The rank `who` holds in generation `generation` of `job_id`, if that generation is
    /// current. The rank is the coordinator's, never one a request names.
    fn current_rank(
        &mut self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
    ) -> Result<Option<u32>> {
        Ok(self
            .authenticated(who)?
            .assignment
            .as_ref()
            .filter(|a| a.job_id == job_id && a.generation == generation)
            .map(|a| a.rank))
    }

    /// The job as it is now: its record with the newest progress of its generation.
    fn latest(&self, mut job: JobRecord) -> JobRecord {
        if let Some(t) = self
            .training
            .get(&job.id)
            .filter(|t| t.generation == job.generation)
        {
            job.progress = t.progress;
        }
        job
    }
}

/// Shows `job` and derives its workers' assignments from it: a worker holds rank `r` of a
/// job's generation exactly while that job is active and lists it at rank `r`. Returns whether
/// any assignment changed.
fn show_job(jobs: &mut BTreeMap<String, JobRecord>, roster: &mut Roster, job: JobRecord) -> bool {
    let old = jobs.get(&job.id);
    let same = old.is_some_and(|o| {
        o.state.is_active() == job.state.is_active()
            && o.generation == job.generation
            && o.workers == job.workers
    });
    if same {
        jobs.insert(job.id.clone(), job);
        return false;
    }
    let now = monotonic_ms();
    let released: Vec<(String, WorkerAssignment)> = old
        .map(|o| o.assignments().map(|(w, a)| (w.clone(), a)).collect())
        .unwrap_or_default();
    for (id, assignment) in released {
        if let Some(w) = roster.workers.get_mut(&id)
            && w.assignment.as_ref() == Some(&assignment)
        {
            w.assignment = None;
            w.active_ms = now;
            w.reassigned.notify_waiters();
        }
    }
    for (id, assignment) in job.assignments() {
        if let Some(w) = roster.workers.get_mut(id) {
            w.assignment = Some(assignment);
            // Stalls are timed from the start of an assignment.
            w.active_ms = now;
            w.reassigned.notify_waiters();
        }
    }
    if job.state.is_active() {
        let training = roster.training.entry(job.id.clone()).or_default();
        if training.generation != job.generation {
            *training = Training {
                generation: job.generation,
                progress: job.progress,
                saved_ms: now,
                started_ms: now,
                ..Training::default()
            };
        }
    } else {
        roster.training.remove(&job.id);
    }
    jobs.insert(job.id.clone(), job);
    true
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
    workers: Vec<WorkerRecord>,
    /// Workers to forget: their next call is answered "unknown worker".
    forgotten: Vec<String>,
    counters: Option<Counters>,
}

impl Change {
    fn job(job: JobRecord) -> Change {
        Change {
            jobs: vec![job],
            ..Change::default()
        }
    }
}

/// Per epoch, the sum of `entries`: (epoch, samples, digest, skipped).
fn sum_per_epoch<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
) -> Vec<(u32, u64, u64, u64)> {
    let mut per_epoch: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for e in entries {
        let t = per_epoch.entry(e.epoch).or_default();
        t.0 += e.samples;
        t.1 = t.1.wrapping_add(e.digest);
        t.2 += e.skipped;
    }
    per_epoch
        .into_iter()
        .map(|(epoch, (samples, digest, skipped))| (epoch, samples, digest, skipped))
        .collect()
}

/// Merges the ledger entries that no restore can tell apart, so that a job's record stays
/// small however often it checkpoints. A restore goes back to a kept checkpoint (or to the
/// start) and drops the entries committed after it, so the entries of one epoch committed
/// after one kept checkpoint and up to the next stay or go together: they become one entry,
/// counted as committed by that next checkpoint. Sums per epoch, after any restore, are those
/// of the full ledger.
pub fn compact_ledger(ledger: &mut Vec<LedgerEntry>, kept: &[CheckpointRecord]) {
    let mut bounds: Vec<u64> = kept.iter().map(|c| c.step).collect();
    bounds.push(0);
    bounds.sort_unstable();
    let mut compact: Vec<LedgerEntry> = Vec::with_capacity(ledger.len());
    for entry in ledger.drain(..) {
        let bound = bounds
            .get(bounds.partition_point(|&b| b < entry.checkpoint_step))
            .copied()
            .unwrap_or(entry.checkpoint_step);
        match compact
            .iter_mut()
            .find(|c| c.checkpoint_step == bound && c.epoch == entry.epoch)
        {
            Some(merged) => {
                merged.samples += entry.samples;
                merged.digest = merged.digest.wrapping_add(entry.digest);
                merged.skipped += entry.skipped;
            }
            None => compact.push(LedgerEntry {
                checkpoint_step: bound,
                ..entry
            }),
        }
    }
    *ledger = compact;
}

/// Retention: keeps the newest `keep` checkpoints (at least one, so the last good one is never
/// retired) and every stage end; removes the others from `checkpoints` and returns them.
pub fn retire(checkpoints: &mut Vec<CheckpointRecord>, keep: usize) -> Vec<CheckpointRecord> {
    let keep = keep.max(1);
    let mut by_step: Vec<(u64, String)> =
        checkpoints.iter().map(|c| (c.step, c.id.clone())).collect();
    by_step.sort();
    let newest: Vec<String> = by_step
        .iter()
        .rev()
        .take(keep)
        .map(|(_, id)| id.clone())
        .collect();
    let (kept, retired) = checkpoints
        .drain(..)
        .partition(|c| c.stage_end || newest.contains(&c.id));
    *checkpoints = kept;
    retired
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
}

/// The longest a training job's progress goes unsaved (it is saved at once at an epoch or
/// stage boundary, and with every decision about the job).
const PROGRESS_SAVED_EVERY_MS: i64 = 5_000;

fn job_key(id: &str) -> String {
    format!("jobs/{id}")
}

fn worker_key(id: &str) -> String {
    format!("workers/{id}")
}

const COUNTERS_KEY: &str = "meta/counters";

#[derive(Serialize, Deserialize)]
struct Counters {
    next_job: u64,
    next_worker: u64,
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| CoordinatorError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}

impl Coordinator {
    /// Rebuilds the coordinator's state from `store`.
    pub async fn recover(store: SharedStore, config: Config) -> Result<Arc<Coordinator>> {
        let mut inner = Inner::default();
        let mut roster = Roster::default();
        let now = monotonic_ms();
        for (key, bytes) in store.list("workers/").await? {
            let mut worker: WorkerRecord = decode(&key, &bytes)?;
            worker.lease_expires_ms = now + worker.lease_ttl_ms as i64;
            worker.active_ms = now;
            roster.workers.insert(worker.id.clone(), worker);
        }
        for (key, bytes) in store.list("jobs/").await? {
            let job: JobRecord = decode(&key, &bytes)?;
            match JobSpec::parse(&job.spec_toml, &job.id) {
                Ok(spec) => {
                    inner.specs.insert(job.id.clone(), Arc::new(spec));
                }
                // Its workers would refuse it too; everything else of the job stays readable.
                Err(e) => {
                    tracing::error!(job = %job.id, "the job's saved spec does not parse: {e}")
                }
            }
            show_job(&mut inner.jobs, &mut roster, job);
        }
        if let Some(bytes) = store.get(COUNTERS_KEY).await? {
            let counters: Counters = decode(COUNTERS_KEY, &bytes)?;
            inner.next_job = counters.next_job;
            inner.next_worker = counters.next_worker;
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
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
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
        let wall = now_ms();
        let mut saves = Vec::new();
        {
            let mut roster = self.roster();
            for job in &mut change.jobs {
                job.updated_at_ms = wall;
                if let Some(t) = roster
                    .training
                    .get_mut(&job.id)
                    .filter(|t| t.generation == job.generation)
                {
                    job.progress = t.progress;
                    t.boundary = false;
                    saves.push((job.id.clone(), job.generation, t.reported));
                }
            }
        }
        let mut writes = Vec::new();
        for job in &change.jobs {
            writes.push(Write::Put(job_key(&job.id), encode(job)));
        }
        for worker in &change.workers {
            writes.push(Write::Put(worker_key(&worker.id), encode(worker)));
        }
        for id in &change.forgotten {
            writes.push(Write::Delete(worker_key(id)));
        }
        if let Some(counters) = &change.counters {
            writes.push(Write::Put(COUNTERS_KEY.to_owned(), encode(counters)));
        }
        self.store
            .apply(writes)
            .await
            .map_err(|e| self.store_failed(e))?;
        if let Some(counters) = change.counters {
            inner.next_job = inner.next_job.max(counters.next_job);
            inner.next_worker = inner.next_worker.max(counters.next_worker);
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
            for worker in change.workers {
                roster.workers.insert(worker.id.clone(), worker);
            }
            for job in change.jobs {
                let id = job.id.clone();
                reassigned |= show_job(&mut inner.jobs, &mut roster, job);
                let _ = self.job_changed.send(id);
            }
        }
        if reassigned {
            self.rendezvous_changed.notify_waiters();
        }
        Ok(())
    }

    /// Writes `job` and makes it visible.
    async fn commit_job(&self, inner: &mut Inner, job: JobRecord) -> Result<JobRecord> {
        let id = job.id.clone();
        self.apply(inner, Change::job(job)).await?;
        Ok(inner.jobs[&id].clone())
    }

    /// Shows a change of `job` that is not saved (what a restart may lose: rendezvous
    /// payloads, collective failures).
    fn show_unsaved(&self, inner: &mut Inner, job: JobRecord) {
        show_job(&mut inner.jobs, &mut self.roster(), job);
    }

    fn job<'a>(inner: &'a Inner, id: &str) -> Result<&'a JobRecord> {
        inner.jobs.get(id).ok_or_else(|| {
            CoordinatorError::NotFound(format!("no job {id:?}; `ladder list` shows the jobs"))
        })
    }

    // ------------------------------------------------------------------ jobs

    /// Validates a spec (its values, its dataset manifest, and that a plan can be made from
    /// them) and queues it as a new job.
    pub async fn submit(&self, spec_toml: &str) -> Result<JobRecord> {
        let spec = JobSpec::parse(spec_toml, "submitted spec")
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
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
        SamplePlan::new(
            &manifest.shard_sizes(),
            spec.schedule.seed,
            spec.data.shard_window,
            spec.batch.global,
        )
        .map_err(|e| CoordinatorError::Invalid(format!("batch.global: {e}")))?;
        if let Some(eval) = &spec.data.eval_manifest {
            Manifest::load(eval)
                .map_err(|e| CoordinatorError::Invalid(format!("data.eval_manifest: {e}")))?;
        }
        if let Some(init) = &spec.model.init_from
            && !init.is_file()
        {
            return Err(CoordinatorError::Invalid(format!(
                "model.init_from: {} is not a file here (paths are checked on the \
                 coordinator's machine)",
                init.display()
            )));
        }
        let stages = StagePlan::new(&spec);

        // The directory is checked off the state lock and the async threads (checkpoint.dir
        // may be on a slow network file system, and heartbeats must not wait for it), for the
        // next id; should another submit take that id meanwhile, for the one after.
        let (mut inner, id) = loop {
            let next = self.inner.lock().await.next_job + 1;
            let id = format!("job-{next:06}");
            let (dir, checked) = (spec.checkpoint.dir.clone(), id.clone());
            tokio::task::spawn_blocking(move || check_checkpoint_dir(&dir, &checked))
                .await
                .map_err(|e| CoordinatorError::Invalid(format!("checkpoint.dir: {e}")))?
                .map_err(CoordinatorError::Invalid)?;
            let inner = self.inner.lock().await;
            if inner.next_job + 1 == next {
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
            rendezvous: BTreeMap::new(),
            ring_key: Vec::new(),
            ready_since_ms: None,
            collective_failures: BTreeMap::new(),
            failed_generations: 0,
            failed_checkpoints: 0,
            last_retired: Vec::new(),
            waiting: String::new(),
        };
        let counters = Counters {
            next_job: inner.next_job + 1,
            next_worker: inner.next_worker,
        };
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        let id = job.id.clone();
        let change = Change {
            jobs: vec![job],
            counters: Some(counters),
            ..Change::default()
        };
        self.apply(&mut inner, change).await?;
        inner.specs.insert(id.clone(), Arc::new(spec));
        self.schedule_after_change(&mut inner).await;
        Ok(inner.jobs[&id].clone())
    }

    /// The job as it is now (with the newest progress, saved or not).
    pub async fn get(&self, id: &str) -> Result<JobRecord> {
        let job = Self::job(&*self.inner.lock().await, id)?.clone();
        Ok(self.roster().latest(job))
    }

    pub async fn list(&self) -> Vec<JobRecord> {
        let jobs: Vec<JobRecord> = self.inner.lock().await.jobs.values().cloned().collect();
        let roster = self.roster();
        jobs.into_iter().map(|job| roster.latest(job)).collect()
    }

    /// Every registered worker, in id order, with how long until its lease runs out and how
    /// long its training thread has been quiet (both in milliseconds, from now).
    pub async fn workers(&self) -> Vec<(WorkerRecord, i64, i64)> {
        let now = monotonic_ms();
        self.roster()
            .workers
            .values()
            .map(|w| (w.clone(), w.lease_expires_ms - now, now - w.active_ms))
            .collect()
    }

    pub async fn cancel(&self, id: &str) -> Result<JobRecord> {
        let mut inner = self.inner.lock().await;
        let mut job = Self::job(&inner, id)?.clone();
        if job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is already {}",
                job.state
            )));
        }
        job.release();
        job.state = JobState::Cancelled;
        job.message = "cancelled by request".to_owned();
        let job = self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job cancelled");
        self.schedule_after_change(&mut inner).await;
        Ok(job)
    }

    /// Queues an ended job again, to continue from `checkpoint_id` (or the latest committed
    /// checkpoint) on `workers` ranks (or any allowed number).
    pub async fn resume(
        &self,
        id: &str,
        checkpoint_id: Option<&str>,
        workers: Option<u32>,
    ) -> Result<JobRecord> {
        let mut inner = self.inner.lock().await;
        let mut job = Self::job(&inner, id)?.clone();
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
                            "job {id} has no committed checkpoint {cid:?}; it has: {}",
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
        let job = self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job resumed");
        self.schedule_after_change(&mut inner).await;
        Ok(inner.jobs.get(&job.id).cloned().unwrap_or(job))
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
        let mut next = inner.next_worker;
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
                    assignment: None,
                    lease_expires_ms: now + lease as i64,
                    activity: 0,
                    active_ms: now,
                    in_collective: false,
                    heard_from: true,
                    leaving: false,
                    reassigned: Arc::default(),
                };
                (r, worker, secret.secret)
            })
            .collect();
        let change = Change {
            workers: made.iter().map(|(_, w, _)| w.clone()).collect(),
            counters: Some(Counters {
                next_job: inner.next_job,
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
        activity: u64,
        in_collective: bool,
        leaving: bool,
    ) -> Result<Option<WorkerAssignment>> {
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
            worker.lease_expires_ms = arrived + worker.lease_ttl_ms as i64;
            if activity != worker.activity {
                worker.activity = activity;
                worker.active_ms = arrived;
            }
            worker.in_collective = in_collective;
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
                self.part(inner, &a.job_id, &[worker_id.to_owned()], &why)
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
        why: &str,
    ) -> Result<()> {
        let ended = inner.jobs.get(job_id).and_then(|j| j.generation_ended(why));
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
        let job = Self::job(inner, job_id)?;
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
            // In place: payloads are not saved, and a 1,024-rank rendezvous must not copy the
            // job once per rank.
            let job = inner.jobs.get_mut(job_id).expect("a current job");
            job.rendezvous.insert(assigned, payload);
            if job.ring_key.is_empty() {
                job.ring_key = auth::ring_key();
            }
            if job.rendezvous.len() == job.workers.len() {
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
                if job.rendezvous.len() == job.workers.len() {
                    return Ok(RendezvousOutcome::Complete {
                        payloads: job.rendezvous.values().cloned().collect(),
                        ring_key: job.ring_key.clone(),
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
            let training = roster.training.entry(job_id.to_owned()).or_default();
            if let Some(progress) = report.progress.take() {
                training.record(progress);
            }
            // Said once per request, so that progress reports during the checkpoint's write do
            // not ask for another; and to rank 0 only, the one that writes checkpoints.
            let checkpoint_now = rank == 0 && std::mem::take(&mut training.checkpoint_requested);
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
            job.last_incident = format!("generation {generation}: {}", job.message);
            tracing::warn!(job = %job_id, "{}", job.message);
            self.commit_job(inner, job).await?;
            self.schedule_after_change(inner).await;
            return Ok(false);
        }
        if !report.collective_error.is_empty() {
            job.collective_failures
                .insert(worker_id.to_owned(), report.collective_error);
            let every_live_rank = {
                let roster = self.roster();
                job.workers
                    .iter()
                    .filter(|w| roster.workers.contains_key(*w))
                    .all(|w| job.collective_failures.contains_key(w))
            };
            if !every_live_rank {
                // A rank that did not fail is dead or hung: its lease or the stall detection
                // ends the generation, naming it.
                self.show_unsaved(inner, job);
                return Ok(true);
            }
            self.collectives_failed(inner, job).await?;
            self.schedule_after_change(inner).await;
            return Ok(false);
        }
        if !report.checkpoint_error.is_empty() {
            job.failed_checkpoints += 1;
            job.last_incident = format!(
                "generation {generation}: checkpoint not written ({} in a row): {}",
                job.failed_checkpoints, report.checkpoint_error
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
        let known = Self::job(&inner, job_id)?;
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
                key: job_key(job_id),
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
        job.ledger.extend(trained.into_iter().map(|e| LedgerEntry {
            checkpoint_step: checkpoint.step,
            ..e
        }));
        job.checkpoints.push(checkpoint);
        job.failed_generations = 0;
        job.failed_checkpoints = 0;
        let retired = retire(&mut job.checkpoints, spec.checkpoint.keep as usize);
        compact_ledger(&mut job.ledger, &job.checkpoints);
        job.last_retired = retired.clone();
        let leaving: Vec<(usize, String)> = job
            .workers
            .iter()
            .enumerate()
            .filter(|(_, w)| self.roster().workers.get(*w).is_some_and(|w| w.leaving))
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
            if let Err(e) = self.part(&mut inner, job_id, &workers, &why).await {
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
        let Some(mut next) = job.generation_ended(why) else {
            return Ok(());
        };
        next.last_incident = job.last_incident.clone();
        tracing::info!(job = %job_id, "{why}");
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
        let lost = expired_leases(&self.roster().workers, now);
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
                    .and_then(|job| job.generation_ended(&why));
                let change = Change {
                    jobs: ended.into_iter().collect(),
                    forgotten: forgotten.to_vec(),
                    ..Change::default()
                };
                self.apply(&mut inner, change).await?;
            }
        }
        let stalled = stalled_workers(
            &inner.jobs,
            &self.roster().workers,
            now,
            self.config.stall_timeout.as_millis() as i64,
        );
        for (job_id, hung, why) in stalled {
            for id in &hung {
                tracing::warn!(worker = %id, job = %job_id, "expelling a stalled worker");
            }
            self.part(&mut inner, &job_id, &hung, &why).await?;
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
        let errors: Vec<String> = job
            .workers
            .iter()
            .enumerate()
            .filter_map(|(rank, w)| {
                job.collective_failures
                    .get(w)
                    .map(|e| format!("rank {rank}: {e}"))
            })
            .collect();
        let why = format!(
            "the collective failed on every rank ({})",
            errors.join("; ")
        );
        job.failed_generations += 1;
        if job.failed_generations < COLLECTIVE_FAILURES_TO_GIVE_UP {
            let ended = job.generation_ended(&why).expect("a training job");
            return self.commit_job(inner, ended).await.map(|_| ());
        }
        job.release();
        job.state = JobState::Failed;
        job.message = format!(
            "{why}, in {} generations in a row without a checkpoint: giving up; fix the cause, \
             then `ladder resume {}`",
            job.failed_generations, job.id
        );
        job.last_incident = format!("generation {}: {}", job.generation, job.message);
        tracing::error!(job = %job.id, "{}", job.message);
        self.commit_job(inner, job).await.map(|_| ())
    }

    /// Records what queued `job_id` waits for; watchers hear of a change.
    fn set_waiting(&self, job_id: &str, waiting: String, inner: &mut Inner) {
        let Some(job) = inner.jobs.get_mut(job_id) else {
            return;
        };
        if job.waiting != waiting {
            job.waiting = waiting;
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

    /// Gives idle workers to queued jobs in the order they are served (see [`place`]).
    async fn schedule(&self, inner: &mut Inner) -> Result<()> {
        let now = monotonic_ms();
        let mut queued: Vec<&JobRecord> = inner
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .collect();
        queued.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.created_at_ms, j.id.clone()));
        let queued: Vec<Queued> = queued
            .into_iter()
            .map(|j| Queued {
                id: j.id.clone(),
                sizes: j.world_sizes_now(),
                ready_since_ms: j.ready_since_ms,
            })
            .collect();
        let (idle, unheard) = {
            let roster = self.roster();
            let unassigned = || roster.workers.values().filter(|w| w.assignment.is_none());
            let idle: Vec<String> = unassigned()
                .filter(|w| w.lease_expires_ms >= now && w.heard_from && !w.leaving)
                .map(|w| w.id.clone())
                .collect();
            (idle, unassigned().filter(|w| !w.heard_from).count())
        };
        let grace = self.config.rendezvous_grace.as_millis() as i64;
        for (job_id, placement) in place(&queued, idle, unheard, now, grace) {
            let job = inner.jobs.get_mut(&job_id).expect("queued job exists");
            let workers = match placement {
                Placement::Wait {
                    why,
                    ready_since_ms,
                } => {
                    job.ready_since_ms = ready_since_ms;
                    self.set_waiting(&job_id, why, inner);
                    continue;
                }
                Placement::Start(workers) => workers,
            };
            job.waiting.clear();
            let mut job = job.clone();
            job.generation += 1;
            let dropped: Vec<String> = job
                .roll_back_to_restore_point()
                .into_iter()
                .map(|c| c.id)
                .collect();
            let fit = workers.len();
            job.workers = workers;
            job.state = JobState::Rendezvous;
            job.ready_since_ms = None;
            job.rendezvous.clear();
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

    /// The larger world size `job_id` regroups to at a checkpoint just committed, if it runs
    /// below its largest size, idle workers make a larger one, no queued job waits for them
    /// (queued jobs are served first) and its generation started at least
    /// [`Config::regroup_interval`] ago.
    fn grows_to(&self, inner: &Inner, job_id: &str) -> Option<u32> {
        let job = inner.jobs.get(job_id)?;
        if job.state != JobState::Running
            || inner.jobs.values().any(|j| j.state == JobState::Queued)
        {
            return None;
        }
        let now = monotonic_ms();
        let roster = self.roster();
        let started = roster.training.get(job_id)?.started_ms;
        if now - started < self.config.regroup_interval.as_millis() as i64 {
            return None;
        }
        let idle = roster
            .workers
            .values()
            .filter(|w| {
                w.assignment.is_none() && w.lease_expires_ms >= now && w.heard_from && !w.leaving
            })
            .count();
        let current = job.workers.len();
        job.world_sizes_now()
            .into_iter()
            .filter(|&n| n as usize > current && n as usize <= current + idle)
            .max()
    }
}

/// A queued job as the scheduler sees it.
struct Queued {
    id: String,
    /// The world sizes it may start on.
    sizes: Vec<u32>,
    ready_since_ms: Option<i64>,
}

/// What the scheduler decides for a queued job.
#[derive(Debug, PartialEq)]
enum Placement {
    /// A new generation on these workers (by rank).
    Start(Vec<String>),
    /// Not yet: why (shown by `ladder status`), and since when enough workers for some
    /// allowed size were idle.
    Wait {
        why: String,
        ready_since_ms: Option<i64>,
    },
}

/// Takes up to `n` of the `free` workers away from the jobs behind a waiting one; returns how
/// many.
fn hold_back(free: &mut Vec<String>, n: u32) -> usize {
    let hold = free.len().min(n as usize);
    free.drain(..hold);
    hold
}

/// Gives `idle` workers to `queued` jobs, in the order they are served (highest priority, then
/// oldest). A job starts at once on the largest world size it allows, or, after `grace` with
/// fewer idle workers, on the largest allowed size that the idle workers fill. A job that
/// cannot start holds the idle workers back from the jobs behind it (up to its smallest size,
/// or its largest while it waits out the grace), so small jobs never starve a large one:
/// workers gather for it as they come free. `unheard` workers are registered but not heard
/// from since a restart (they are named in what a job waits for).
fn place(
    queued: &[Queued],
    idle: Vec<String>,
    unheard: usize,
    now: i64,
    grace: i64,
) -> Vec<(String, Placement)> {
    let mut free = idle;
    let mut held = 0;
    let mut placements = Vec::new();
    for job in queued {
        let best = job.sizes.iter().copied().max().unwrap_or(0);
        let least = job.sizes.iter().copied().min().unwrap_or(0);
        let behind = match held {
            0 => String::new(),
            n => format!("; {n} more held for the jobs served before it"),
        };
        let Some(fit) = job
            .sizes
            .iter()
            .copied()
            .filter(|&n| n as usize <= free.len())
            .max()
        else {
            let why = format!(
                "waiting for workers: {} idle, {least} needed{}{behind}",
                free.len(),
                match unheard {
                    0 => String::new(),
                    n => format!(
                        " ({n} more registered, not heard from since the coordinator started)"
                    ),
                }
            );
            held += hold_back(&mut free, least);
            placements.push((
                job.id.clone(),
                Placement::Wait {
                    why,
                    ready_since_ms: None,
                },
            ));
            continue;
        };
        let ready_since = job.ready_since_ms.unwrap_or(now);
        if fit < best && now - ready_since < grace {
            let why = format!(
                "{} idle: starting on {fit} in {} s unless {best} are idle by then{behind}",
                free.len(),
                (ready_since + grace - now + 999) / 1000
            );
            held += hold_back(&mut free, best);
            placements.push((
                job.id.clone(),
                Placement::Wait {
                    why,
                    ready_since_ms: Some(ready_since),
                },
            ));
            continue;
        }
        placements.push((
            job.id.clone(),
            Placement::Start(free.drain(..fit as usize).collect()),
        ));
    }
    placements
}

/// The workers whose lease ran out before `now`, by the job they trained (`None`: idle). The
/// workers a job lost and the end of its generation are then one transaction (a rack that went
/// dark ends each job once), and the idle ones go together.
fn expired_leases(
    workers: &BTreeMap<String, WorkerRecord>,
    now: i64,
) -> BTreeMap<Option<String>, Vec<String>> {
    let mut lost: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for w in workers.values().filter(|w| w.lease_expires_ms < now) {
        lost.entry(w.assignment.as_ref().map(|a| a.job_id.clone()))
            .or_default()
            .push(w.id.clone());
    }
    lost
}

/// Which workers hold their job up for `stall` milliseconds at `now`, by job, with why: they are
/// hung, and are expelled (their next heartbeat is refused) and the generation ends, as if they
/// had died. In a running
/// generation none of whose workers made progress, those are the ones not waiting in a
/// collective (the ones the others wait on). In a rendezvous, those that never joined it: a
/// worker joins once its previous run has returned, and its heartbeat goes on while that run's
/// training thread is stuck (a GPU kernel, a driver, a file system).
fn stalled_workers(
    jobs: &BTreeMap<String, JobRecord>,
    workers: &BTreeMap<String, WorkerRecord>,
    now: i64,
    stall: i64,
) -> Vec<(String, Vec<String>, String)> {
    let mut stalled = Vec::new();
    for job in jobs.values() {
        let rank = |id: &String| job.workers.iter().position(|w| w == id).unwrap_or(0);
        let name = |id: &String| format!("worker {id} (rank {})", rank(id));
        let records: Vec<&WorkerRecord> =
            job.workers.iter().filter_map(|w| workers.get(w)).collect();
        let idle_too_long = |w: &WorkerRecord| now - w.active_ms >= stall;
        match job.state {
            JobState::Running => {
                if records.is_empty() || !records.iter().all(|w| idle_too_long(w)) {
                    continue;
                }
                // If everyone waits in the collective, the network between them is the
                // suspect: nobody is expelled and the generation restarts with all of them.
                // A worker that reported its collective failing waits for the others too.
                let hung: Vec<String> = records
                    .iter()
                    .filter(|w| !w.in_collective && !job.collective_failures.contains_key(&w.id))
                    .map(|w| w.id.clone())
                    .collect();
                let why = if hung.is_empty() {
                    format!(
                        "no worker made progress for {} s, all waiting in the collective",
                        stall / 1000
                    )
                } else {
                    format!(
                        "{} stalled: no progress for {} s while the others wait on it",
                        hung.iter().map(name).collect::<Vec<_>>().join(", "),
                        stall / 1000
                    )
                };
                stalled.push((job.id.clone(), hung, why));
            }
            JobState::Rendezvous => {
                let hung: Vec<String> = records
                    .iter()
                    .filter(|w| idle_too_long(w))
                    .filter(|w| !job.rendezvous.contains_key(&(rank(&w.id) as u32)))
                    .map(|w| w.id.clone())
                    .collect();
                if hung.is_empty() {
                    continue;
                }
                let why = format!(
                    "{} stalled: did not join generation {}'s rendezvous within {} s (its \
                         previous run never returned)",
                    hung.iter().map(name).collect::<Vec<_>>().join(", "),
                    job.generation,
                    stall / 1000
                );
                stalled.push((job.id.clone(), hung, why));
            }
            _ => {}
        }
    }
    stalled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(step: u64, stage_end: bool) -> CheckpointRecord {
        CheckpointRecord {
            id: format!("step-{step}"),
            path: format!("/ckpt/step-{step}"),
            generation: 1,
            epoch: 0,
            step,
            stage: 0,
            committed_at_ms: 0,
            stage_end,
        }
    }

    fn trained_after_restoring(ledger: &[LedgerEntry], restored: u64) -> Vec<(u32, u64, u64, u64)> {
        sum_per_epoch(ledger.iter().filter(|e| e.checkpoint_step <= restored))
    }

    #[test]
    fn expired_leases_are_grouped_by_the_job_their_workers_trained() {
        let worker = |id: &str, expires: i64, job: Option<&str>| WorkerRecord {
            id: id.to_owned(),
            hostname: String::new(),
            device: String::new(),
            name: String::new(),
            lease_ttl_ms: 1_000,
            registered_at_ms: 0,
            secret_sha256: String::new(),
            assignment: job.map(|j| WorkerAssignment {
                job_id: j.to_owned(),
                generation: 1,
                rank: 0,
            }),
            lease_expires_ms: expires,
            activity: 0,
            active_ms: 0,
            in_collective: false,
            heard_from: true,
            leaving: false,
            reassigned: Arc::default(),
        };
        let workers: BTreeMap<String, WorkerRecord> = [
            worker("a", 100, Some("j1")),
            worker("b", 99, Some("j1")),
            worker("c", 500, Some("j1")),
            worker("d", 50, None),
            worker("e", 100, Some("j2")),
        ]
        .into_iter()
        .map(|w| (w.id.clone(), w))
        .collect();
        let lost = expired_leases(&workers, 100);
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert_eq!(
            lost[&Some("j1".to_owned())],
            ["b"],
            "a lease ending at now holds"
        );
        assert_eq!(lost[&None], ["d"]);
        let later = expired_leases(&workers, 101);
        assert_eq!(later[&Some("j1".to_owned())], ["a", "b"]);
        assert_eq!(later[&Some("j2".to_owned())], ["e"]);
    }

    fn queued(id: &str, sizes: &[u32]) -> Queued {
        Queued {
            id: id.to_owned(),
            sizes: sizes.to_vec(),
            ready_since_ms: None,
        }
    }

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn a_job_that_cannot_start_holds_idle_workers_back_from_the_jobs_behind_it() {
        let jobs = [queued("big", &[2]), queued("small", &[1])];
        let placed = place(&jobs, workers(1), 0, 0, 5_000);
        let Placement::Wait { why, .. } = &placed[1].1 else {
            panic!("the small job behind the big one must wait: {placed:?}");
        };
        assert!(
            why.contains("0 idle") && why.contains("1 more held"),
            "{why}"
        );
        let placed = place(&jobs, workers(3), 0, 0, 5_000);
        assert_eq!(placed[0].1, Placement::Start(workers(2)));
        assert_eq!(placed[1].1, Placement::Start(vec!["w2".to_owned()]));
    }

    #[test]
    fn a_job_waits_out_the_grace_for_its_largest_size_then_starts_on_fewer() {
        let mut job = queued("j", &[1, 2]);
        let placed = place(std::slice::from_ref(&job), workers(1), 0, 1_000, 5_000);
        let Placement::Wait {
            why,
            ready_since_ms,
        } = &placed[0].1
        else {
            panic!("{placed:?}");
        };
        assert!(why.contains("starting on 1 in 5 s unless 2"), "{why}");
        assert_eq!(*ready_since_ms, Some(1_000));
        job.ready_since_ms = Some(1_000);
        let placed = place(std::slice::from_ref(&job), workers(1), 0, 6_000, 5_000);
        assert_eq!(placed[0].1, Placement::Start(workers(1)));
    }

    proptest::proptest! {
        /// However many jobs wait for however many workers: no worker is given twice, each job
        /// starts on a size it allows, and a job that must wait is never passed by the jobs
        /// behind it on the workers it could use.
        #[test]
        fn placements_are_disjoint_allowed_and_starve_no_one(
            sizes in proptest::collection::vec(proptest::collection::btree_set(1u32..6, 1..3), 1..6),
            idle in 0usize..12,
        ) {
            let jobs: Vec<Queued> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| queued(&format!("j{i}"), &s.iter().copied().collect::<Vec<_>>()))
                .collect();
            let placed = place(&jobs, workers(idle), 0, 0, 0);
            let mut given = std::collections::BTreeSet::new();
            // What the first job that must wait holds back for itself.
            let mut held_back: Option<usize> = None;
            for ((job, (id, placement)), allowed) in jobs.iter().zip(&placed).zip(&sizes) {
                proptest::prop_assert_eq!(&job.id, id);
                match placement {
                    Placement::Start(ws) => {
                        proptest::prop_assert!(allowed.contains(&(ws.len() as u32)));
                        for w in ws {
                            proptest::prop_assert!(given.insert(w.clone()), "{} given twice", w);
                        }
                    }
                    Placement::Wait { .. } => {
                        if held_back.is_none() {
                            let least = *allowed.iter().next().unwrap() as usize;
                            held_back = Some((idle - given.len()).min(least));
                        }
                    }
                }
            }
            // The workers it holds went to nobody behind it.
            proptest::prop_assert!(given.len() + held_back.unwrap_or(0) <= idle);
        }
    }

    proptest::proptest! {
        /// Whatever was committed and kept, a compacted ledger sums per epoch as the full one,
        /// after a restore to any kept checkpoint or to the start, and never grows.
        #[test]
        fn a_compacted_ledger_is_the_same_history_after_any_restore(
            commits in proptest::collection::vec(
                (1u64..6, proptest::collection::vec((0u32..4, 0u64..100, proptest::num::u64::ANY, 0u64..3), 1..4), proptest::bool::ANY),
                1..25,
            ),
        ) {
            let mut ledger = Vec::new();
            let mut kept = Vec::new();
            let mut step = 0;
            for (advance, trained, keep) in &commits {
                step += advance;
                ledger.extend(trained.iter().map(|&(epoch, samples, digest, skipped)| LedgerEntry {
                    checkpoint_step: step,
                    epoch,
                    samples,
                    digest,
                    skipped,
                }));
                if *keep {
                    kept.push(checkpoint(step, false));
                }
            }
            kept.push(checkpoint(step, false));
            let mut compact = ledger.clone();
            compact_ledger(&mut compact, &kept);
            proptest::prop_assert!(compact.len() <= ledger.len());
            for restored in std::iter::once(0).chain(kept.iter().map(|c| c.step)) {
                proptest::prop_assert_eq!(
                    trained_after_restoring(&compact, restored),
                    trained_after_restoring(&ledger, restored),
                    "restored to step {}", restored
                );
            }
        }
    }

    #[test]
    fn a_ledger_between_two_kept_checkpoints_becomes_one_entry_per_epoch() {
        let entry = |checkpoint_step, epoch| LedgerEntry {
            checkpoint_step,
            epoch,
            samples: 10,
            digest: checkpoint_step,
            skipped: 0,
        };
        let mut ledger = vec![
            entry(5, 0),
            entry(10, 0),
            entry(10, 1),
            entry(15, 1),
            entry(20, 1),
        ];
        compact_ledger(&mut ledger, &[checkpoint(10, true), checkpoint(20, false)]);
        let shape: Vec<(u64, u32, u64)> = ledger
            .iter()
            .map(|e| (e.checkpoint_step, e.epoch, e.samples))
            .collect();
        assert_eq!(shape, vec![(10, 0, 20), (10, 1, 10), (20, 1, 20)]);
    }

    #[test]
    fn retention_keeps_the_newest_and_every_stage_end() {
        let mut all: Vec<CheckpointRecord> = [(10, false), (20, true), (30, false), (40, false)]
            .into_iter()
            .map(|(s, e)| checkpoint(s, e))
            .collect();
        let retired = retire(&mut all, 1);
        let ids = |v: &[CheckpointRecord]| v.iter().map(|c| c.step).collect::<Vec<_>>();
        assert_eq!(ids(&all), vec![20, 40]);
        assert_eq!(ids(&retired), vec![10, 30]);
        // Keeping zero still keeps the newest: the last good checkpoint is never retired.
        let mut one = vec![checkpoint(5, false)];
        assert!(retire(&mut one, 0).is_empty());
        assert_eq!(ids(&one), vec![5]);
        let mut many: Vec<CheckpointRecord> = (1..=5).map(|s| checkpoint(s, false)).collect();
        retire(&mut many, 3);
        assert_eq!(ids(&many), vec![3, 4, 5]);
    }
}
