//! What the coordinator saves: plain records, each fact in one place. A job's record holds its
//! generation and its workers by rank; a worker's assignment is derived from it (see
//! [`crate::runtime::Roster::reassign`]), never saved beside it, so no crash or store error between
//! two writes can leave a worker assigned to a job that does not list it. Nothing here is
//! about liveness or a generation's exchange: that lives in memory ([`crate::runtime`]) and a
//! restarted coordinator rebuilds it from the workers' next calls.

use crate::error::CoordinatorError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A job's state: the wire's enum, saved by its name (see `ladder_proto::v1::JobState`).
pub type JobState = ladder_proto::v1::JobState;

/// How far a job got, as rank 0 reports it: saved as the wire's message.
pub type ProgressRecord = ladder_proto::v1::Progress;

/// A committed checkpoint: saved as the wire's message.
pub type CheckpointRecord = ladder_proto::v1::CheckpointRef;

/// What the steps up to a committed checkpoint trained of one epoch, or (for old epochs of a
/// long run, see [`crate::policy::compact_ledger`]) summed over a range of epochs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// The global step of the checkpoint that committed it.
    pub checkpoint_step: u64,
    /// The first epoch it tells, and how many from there (1: that epoch alone).
    pub epoch: u32,
    #[serde(default = "one_epoch")]
    pub epochs: u32,
    pub samples: u64,
    pub digest: u64,
    pub skipped: u64,
}

fn one_epoch() -> u32 {
    1
}

impl LedgerEntry {
    /// The epochs it tells.
    pub fn span(&self) -> std::ops::RangeInclusive<u32> {
        self.epoch..=self.epoch.saturating_add(self.epochs.max(1) - 1)
    }
}

/// What `entries` tell, summed per epoch (per range for ranges), in order of epochs.
pub fn sum_per_epoch<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
) -> Vec<ladder_proto::v1::EpochTally> {
    let mut per_epoch: BTreeMap<(u32, u32), (u64, u64, u64)> = BTreeMap::new();
    for e in entries {
        let t = per_epoch.entry((e.epoch, e.epochs.max(1))).or_default();
        t.0 = t.0.saturating_add(e.samples);
        t.1 = t.1.wrapping_add(e.digest);
        t.2 = t.2.saturating_add(e.skipped);
    }
    per_epoch
        .into_iter()
        .map(
            |((epoch, epochs), (samples, digest, skipped))| ladder_proto::v1::EpochTally {
                epoch,
                epochs,
                samples,
                digest,
                skipped,
            },
        )
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
    /// Steps in each epoch, from the job's sample plan when it was submitted (0 in a record
    /// written before it was kept: then what rank 0 says of epochs is checked without it).
    #[serde(default)]
    pub steps_per_epoch: u64,
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
    /// Rank 0 reported a loss that is not a finite number.
    Diverged,
}

impl Incident {
    pub const ALL: [Incident; 8] = [
        Incident::WorkerLost,
        Incident::WorkerStalled,
        Incident::WorkerLeft,
        Incident::CollectiveFailed,
        Incident::CheckpointUnusable,
        Incident::CheckpointNotWritten,
        Incident::WorkerFailed,
        Incident::Diverged,
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
            Incident::Diverged => "diverged",
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

    /// Per epoch (per range of old epochs), the sum of the ledger.
    pub fn trained(&self) -> Vec<ladder_proto::v1::EpochTally> {
        sum_per_epoch(&self.ledger)
    }

    /// What stands for job `id` when its saved record (at `key`) does not decode (`why`): the
    /// job failed, saying where its record was set aside and how to go on from its files.
    pub fn unreadable(id: &str, key: &str, why: &str, now_ms: i64) -> JobRecord {
        let message = format!(
            "its saved record {key} could not be read ({}); it was set aside as {} and the job \
             failed. Its checkpoints stay in its checkpoint directory: submit its spec again \
             (spec_toml in the set-aside record) with model.init_from naming a checkpoint's \
             model.safetensors to go on from there",
            ladder_core::cut(why),
            quarantine_key(key)
        );
        JobRecord {
            id: id.to_owned(),
            name: String::new(),
            state: JobState::Failed,
            generation: 0,
            spec_toml: String::new(),
            workers: Vec::new(),
            progress: ProgressRecord::default(),
            checkpoints: Vec::new(),
            last_incident: message.clone(),
            message,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            stage_count: 0,
            epochs: 0,
            steps_per_epoch: 0,
            priority: 0,
            world_sizes: Vec::new(),
            requested_world_size: None,
            restore_from: None,
            ledger: Vec::new(),
            failed_generations: 0,
            failed_checkpoints: 0,
            last_retired: Vec::new(),
            incidents: BTreeMap::new(),
            checkpoints_committed: 0,
        }
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
/// Where recovery sets a record aside that does not decode, under its own key: kept for
/// inspection, out of the way of everything else.
pub const QUARANTINE_PREFIX: &str = "quarantine/";

pub fn quarantine_key(key: &str) -> String {
    format!("{QUARANTINE_PREFIX}{key}")
}

/// The last job and worker numbers given out: ids are never given twice by one store.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub next_job: u64,
    pub next_worker: u64,
}

impl Counters {
    /// The counters as high as the ids `keys` name (`jobs/job-NNNNNN`, `workers/w-NNNNNN`):
    /// what a store whose counters record is unreadable can still be sure of.
    pub fn at_least(mut self, keys: impl IntoIterator<Item = impl AsRef<str>>) -> Counters {
        let number =
            |key: &str, prefix: &str| -> Option<u64> { key.strip_prefix(prefix)?.parse().ok() };
        for key in keys {
            let key = key.as_ref();
            let key = key.strip_prefix(QUARANTINE_PREFIX).unwrap_or(key);
            if let Some(n) = number(key, "jobs/job-") {
                self.next_job = self.next_job.max(n);
            }
            if let Some(n) = number(key, "workers/w-") {
                self.next_worker = self.next_worker.max(n);
            }
        }
        self
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Evaluation, History, Point};
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter)
    }

    fn float() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(f32::NAN),
            Just(f32::INFINITY),
            Just(f32::NEG_INFINITY),
            Just(f32::MIN_POSITIVE / 3.0),
            Just(-0.0),
            proptest::num::f32::ANY,
        ]
    }

    fn progress() -> impl Strategy<Value = ProgressRecord> {
        (
            (any::<u32>(), any::<u32>(), any::<u64>(), any::<u64>()),
            (float(), float(), float(), float(), float(), float()),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()),
        )
            .prop_map(
                |(
                    (stage, epoch, step, steps_per_epoch),
                    (loss, images_per_second, eta_seconds, eval_top1, eval_top5, learning_rate),
                    (image_size, graph_builds, eval_epoch, global_step),
                )| ProgressRecord {
                    stage,
                    epoch,
                    step,
                    steps_per_epoch,
                    loss,
                    images_per_second,
                    image_size,
                    graph_builds,
                    eta_seconds,
                    eval_epoch,
                    eval_top1,
                    eval_top5,
                    global_step,
                    learning_rate,
                },
            )
    }

    fn checkpoint() -> impl Strategy<Value = CheckpointRecord> {
        (
            text(),
            any::<u64>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<i64>(),
            any::<bool>(),
        )
            .prop_map(
                |(id, generation, epoch, step, stage, committed_at_ms, stage_end)| {
                    CheckpointRecord {
                        id,
                        generation,
                        epoch,
                        step,
                        stage,
                        committed_at_ms,
                        stage_end,
                    }
                },
            )
    }

    fn state() -> impl Strategy<Value = JobState> {
        prop_oneof![
            Just(JobState::Queued),
            Just(JobState::Rendezvous),
            Just(JobState::Running),
            Just(JobState::Completed),
            Just(JobState::Failed),
            Just(JobState::Cancelled),
        ]
    }

    fn job() -> impl Strategy<Value = JobRecord> {
        let ledger = proptest::collection::vec(
            (
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
            )
                .prop_map(
                    |(checkpoint_step, epoch, epochs, samples, digest, skipped)| LedgerEntry {
                        checkpoint_step,
                        epoch,
                        epochs,
                        samples,
                        digest,
                        skipped,
                    },
                ),
            0..4,
        );
        (
            (text(), text(), state(), any::<u64>(), text()),
            (proptest::collection::vec(text(), 0..3), progress()),
            (
                proptest::collection::vec(checkpoint(), 0..3),
                text(),
                text(),
            ),
            (
                any::<i64>(),
                any::<i64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<i32>(),
            ),
            (
                proptest::collection::vec(any::<u32>(), 0..4),
                proptest::option::of(any::<u32>()),
                proptest::option::of(checkpoint()),
                ledger,
            ),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(checkpoint(), 0..2),
                proptest::collection::btree_map(text(), any::<u64>(), 0..3),
                any::<u64>(),
            ),
        )
            .prop_map(
                |(
                    (id, name, state, generation, spec_toml),
                    (workers, progress),
                    (checkpoints, message, last_incident),
                    (created_at_ms, updated_at_ms, stage_count, epochs, steps_per_epoch, priority),
                    (world_sizes, requested_world_size, restore_from, ledger),
                    (
                        failed_generations,
                        failed_checkpoints,
                        last_retired,
                        incidents,
                        checkpoints_committed,
                    ),
                )| JobRecord {
                    id,
                    name,
                    state,
                    generation,
                    spec_toml,
                    workers,
                    progress,
                    checkpoints,
                    message,
                    last_incident,
                    created_at_ms,
                    updated_at_ms,
                    stage_count,
                    epochs,
                    steps_per_epoch,
                    priority,
                    world_sizes,
                    requested_world_size,
                    restore_from,
                    ledger,
                    failed_generations,
                    failed_checkpoints,
                    last_retired,
                    incidents,
                    checkpoints_committed,
                },
            )
    }

    fn history() -> impl Strategy<Value = History> {
        let point = (
            (any::<u64>(), float(), float(), float()),
            (
                any::<u32>(),
                any::<i64>(),
                proptest::collection::vec(float(), 0..4),
            ),
        )
            .prop_map(
                |(
                    (step, loss, learning_rate, images_per_second),
                    (image_size, time_ms, data_wait),
                )| Point {
                    step,
                    loss,
                    learning_rate,
                    images_per_second,
                    image_size,
                    time_ms,
                    data_wait,
                },
            );
        let evaluation =
            (any::<u32>(), any::<u64>(), float(), float()).prop_map(|(epoch, step, top1, top5)| {
                Evaluation {
                    epoch,
                    step,
                    top1,
                    top5,
                }
            });
        (
            proptest::collection::vec(point, 0..4),
            proptest::collection::vec(evaluation, 0..3),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(points, evaluations, stride, version)| History {
                points,
                evaluations,
                stride,
                version,
            })
    }

    fn worker() -> impl Strategy<Value = WorkerRecord> {
        (
            (text(), text(), text(), text()),
            (any::<u32>(), any::<i64>(), text()),
        )
            .prop_map(
                |(
                    (id, hostname, device, name),
                    (lease_ttl_ms, registered_at_ms, secret_sha256),
                )| {
                    WorkerRecord {
                        id,
                        hostname,
                        device,
                        name,
                        lease_ttl_ms,
                        registered_at_ms,
                        secret_sha256,
                    }
                },
            )
    }

    /// Encodes `value`, reads it back, and encodes that again: the same bytes, so every value
    /// (a NaN, an infinity, a subnormal, a control character) reads back as it was written.
    fn round_trips<T: Serialize + serde::de::DeserializeOwned>(
        value: &T,
    ) -> Result<(), TestCaseError> {
        let bytes = encode(value);
        let read: T = decode("a key", &bytes).map_err(|e| {
            TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&bytes)))
        })?;
        let again = encode(&read);
        prop_assert_eq!(
            String::from_utf8_lossy(&again),
            String::from_utf8_lossy(&bytes)
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn every_record_reads_back_whatever_numbers_and_strings_it_holds(
            job in job(),
            history in history(),
            worker in worker(),
            (next_job, next_worker) in (any::<u64>(), any::<u64>()),
        ) {
            round_trips(&job)?;
            round_trips(&history)?;
            round_trips(&worker)?;
            round_trips(&Counters { next_job, next_worker })?;
        }
    }

    #[test]
    fn non_finite_numbers_are_saved_by_name_and_a_null_saved_before_reads_as_nan() {
        let progress = ProgressRecord {
            loss: f32::NAN,
            learning_rate: f32::INFINITY,
            eta_seconds: f32::NEG_INFINITY,
            ..ProgressRecord::default()
        };
        let text = String::from_utf8(encode(&progress)).unwrap();
        assert!(text.contains(r#""loss":"NaN""#), "{text}");
        assert!(text.contains(r#""learning_rate":"inf""#), "{text}");
        assert!(text.contains(r#""eta_seconds":"-inf""#), "{text}");
        // States are saved by name, as the records written before the wire's enum was theirs.
        for state in [JobState::Queued, JobState::Rendezvous, JobState::Cancelled] {
            let saved = format!("\"{}\"", state.name());
            assert_eq!(String::from_utf8(encode(&state)).unwrap(), saved);
            assert_eq!(
                decode::<JobState>("a key", saved.as_bytes()).unwrap(),
                state
            );
        }
        let old: ProgressRecord = decode("jobs/job-000001", br#"{"loss":null,"epoch":3}"#).unwrap();
        assert!(old.loss.is_nan());
        assert_eq!(old.epoch, 3);
    }
}
