//! What the coordinator saves: plain records, each fact in one place. A job's record holds its
//! generation and its workers by rank; a worker's assignment is derived from it (see
//! [`crate::runtime::Roster::reassign`]), never saved beside it, so no crash or store error between
//! two writes can leave a worker assigned to a job that does not list it. Nothing here is
//! about liveness or a generation's exchange: that lives in memory ([`crate::runtime`]) and a
//! restarted coordinator rebuilds it from the workers' next calls.

use crate::error::CoordinatorError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
        f.write_str(self.name())
    }
}

impl JobState {
    /// The name `ladder status` shows.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn is_active(self) -> bool {
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

/// Per epoch, the sum of `entries`: (epoch, samples, digest, skipped).
pub fn sum_per_epoch<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
) -> Vec<(u32, u64, u64, u64)> {
    let mut per_epoch: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
    for e in entries {
        let t = per_epoch.entry(e.epoch).or_default();
        t.0 = t.0.saturating_add(e.samples);
        t.1 = t.1.wrapping_add(e.digest);
        t.2 = t.2.saturating_add(e.skipped);
    }
    per_epoch
        .into_iter()
        .map(|(epoch, (samples, digest, skipped))| (epoch, samples, digest, skipped))
        .collect()
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
    /// (compacted at each commit, see [`crate::policy::compact_ledger`]).
    #[serde(default)]
    pub ledger: Vec<LedgerEntry>,
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
    /// Incidents so far, by [`Incident::name`].
    #[serde(default)]
    pub incidents: BTreeMap<String, u64>,
    /// Checkpoints committed so far (retired ones included).
    #[serde(default)]
    pub checkpoints_committed: u64,
}

/// What can go wrong in a job, as each is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incident {
    /// A worker's lease ran out.
    WorkerLost,
    /// A worker held its job up (hung in a step, or never joined a rendezvous).
    WorkerStalled,
    /// A worker was asked to stop (a node drained or preempted).
    WorkerLeft,
    /// Every rank's collective failed.
    CollectiveFailed,
    /// The checkpoint to restore from failed verification.
    CheckpointUnusable,
    /// Rank 0 could not write a checkpoint.
    CheckpointNotWritten,
    /// A worker reported an error that ends the job.
    WorkerFailed,
}

impl Incident {
    pub const ALL: [Incident; 7] = [
        Incident::WorkerLost,
        Incident::WorkerStalled,
        Incident::WorkerLeft,
        Incident::CollectiveFailed,
        Incident::CheckpointUnusable,
        Incident::CheckpointNotWritten,
        Incident::WorkerFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Incident::WorkerLost => "worker_lost",
            Incident::WorkerStalled => "worker_stalled",
            Incident::WorkerLeft => "worker_left",
            Incident::CollectiveFailed => "collective_failed",
            Incident::CheckpointUnusable => "checkpoint_unusable",
            Incident::CheckpointNotWritten => "checkpoint_not_written",
            Incident::WorkerFailed => "worker_failed",
        }
    }
}

/// Generations in a row, without a checkpoint between, whose collectives all fail before the
/// job is failed: the same failure again and again (a bad NCCL setup, a broken network path)
/// is not worth retrying forever, while one or two can be a passing fault.
pub const COLLECTIVE_FAILURES_TO_GIVE_UP: u32 = 3;

/// Checkpoints in a row that cannot be written before the job is failed: a full disk can pass,
/// but training on for days without a checkpoint would put all of it at risk unseen.
pub const CHECKPOINT_FAILURES_TO_GIVE_UP: u32 = 3;

impl JobRecord {
    /// Frees every worker of the current generation: they become idle once this record is
    /// shown, and what the generation exchanged is forgotten with it.
    pub fn release(&mut self) {
        self.workers.clear();
    }

    /// The assignments this record makes: rank `r` of the current generation to
    /// `workers[r]`, while the job is active.
    pub fn assignments(&self) -> impl Iterator<Item = (&String, WorkerAssignment)> {
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

    /// Counts an incident of `kind`, which `what` tells: the job's last incident.
    pub fn incident(&mut self, kind: Incident, what: String) {
        *self.incidents.entry(kind.name().to_owned()).or_default() += 1;
        self.last_incident = what;
    }

    /// The job queued again, to restore from its latest checkpoint, after its generation ended
    /// (`why`): through an incident (a member lost), or to regroup (`None`); `None` if the job
    /// is not training.
    pub fn generation_ended(&self, incident: Option<Incident>, why: &str) -> Option<JobRecord> {
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
        match incident {
            Some(kind) => {
                job.incident(kind, job.message.clone());
                tracing::warn!(job = %job.id, "{}", job.message);
            }
            None => tracing::info!(job = %job.id, "{}", job.message),
        }
        Some(job)
    }

    /// How many of `checkpoints` stay the model's history when the next generation starts
    /// from `restore_from`: those up to it in commit order (all of them if it is not listed).
    pub fn history_kept(&self) -> usize {
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
    pub fn roll_back_to_restore_point(&mut self) -> Vec<CheckpointRecord> {
        let restored = self.restore_from.as_ref().map_or(0, |c| c.step);
        self.ledger.retain(|e| e.checkpoint_step <= restored);
        let kept = self.history_kept();
        self.checkpoints.split_off(kept)
    }

    /// Per epoch, the sum of the ledger: (epoch, samples, digest, skipped).
    pub fn trained(&self) -> Vec<(u32, u64, u64, u64)> {
        sum_per_epoch(&self.ledger)
    }

    pub fn world_sizes_now(&self) -> Vec<u32> {
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
    /// The SHA-256 of the secret its registration returned (see [`crate::auth::WorkerSecret`]). A
    /// record without one (written before workers had secrets) never authenticates: its
    /// worker registers again.
    #[serde(default)]
    pub secret_sha256: String,
}

// Where each record is saved, and how.

pub fn job_key(id: &str) -> String {
    format!("jobs/{id}")
}

pub fn worker_key(id: &str) -> String {
    format!("workers/{id}")
}

/// A job's curves ([`crate::history::History`]): apart from its record, and saved less often.
pub fn history_key(id: &str) -> String {
    format!("history/{id}")
}

pub const JOBS_PREFIX: &str = "jobs/";
pub const HISTORY_PREFIX: &str = "history/";
pub const WORKERS_PREFIX: &str = "workers/";
pub const COUNTERS_KEY: &str = "meta/counters";

/// The last job and worker numbers given out: ids are never given twice by one store.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub next_job: u64,
    pub next_worker: u64,
}

pub fn decode<T: serde::de::DeserializeOwned>(
    key: &str,
    bytes: &[u8],
) -> Result<T, CoordinatorError> {
    serde_json::from_slice(bytes).map_err(|e| CoordinatorError::Corrupt {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

pub fn encode(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("records always serialize")
}
