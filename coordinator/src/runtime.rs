//! What lives in memory only, and is rebuilt after a restart from the workers' next calls:
//! the [`Roster`] (every worker's signs of life and the rank it holds, each training job's
//! newest progress and curves) and each job's [`JobRuntime`] (what its generation exchanged,
//! what it waits for in the queue). A job's curves ([`History`]) are saved now and then, so
//! they survive a restart.
//!
//! Times here are on [`monotonic_ms`]'s clock, never saved.

use crate::auth::{self, WorkerIdentity};
use crate::clock::monotonic_ms;
use crate::error::CoordinatorError;
use crate::history::History;
use crate::records::{JobRecord, ProgressRecord, WorkerAssignment, WorkerRecord};
use crate::tensorboard::{self, Note};
use ladder_core::cut;
use ladder_core::dataset::SKIP_REASONS;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;

/// How many workers that left [`Roster::left`] remembers.
pub const LEFT_REMEMBERED: usize = 4096;

/// The longest a training job's progress goes unsaved (it is saved at once at an epoch or
/// stage boundary, and with every decision about the job).
pub const PROGRESS_SAVED_EVERY_MS: i64 = 5_000;

/// A registered worker as this process knows it: its saved record and its signs of life.
#[derive(Clone, Debug)]
pub struct Member {
    pub record: WorkerRecord,
    /// Derived from the job that lists it (see [`Roster::reassign`]).
    pub assignment: Option<WorkerAssignment>,
    pub lease_expires_ms: i64,
    /// The training thread's activity counter from the last heartbeat, when it last changed
    /// (or the assignment began), and whether it waits in a collective.
    pub activity: u64,
    pub active_ms: i64,
    pub in_collective: bool,
    /// The share of its step time spent waiting for data, from its last heartbeat.
    pub data_wait: f32,
    /// Samples its process skipped so far, by [`SKIP_REASONS`], from its last heartbeat.
    pub skipped: [u64; SKIP_REASONS.len()],
    /// Whether this coordinator process has heard from the worker (it registered or sent a
    /// heartbeat). Workers recovered from the store after a restart may be long dead: they
    /// keep the assignments they had, but get no new one before they show they are alive.
    pub heard_from: bool,
    /// Asked to stop (SIGTERM): its job checkpoints, then goes on without it. A worker says so
    /// with every heartbeat, so a restarted coordinator learns it again.
    pub leaving: bool,
    /// Wakes this worker's long poll for an assignment when its assignment changes (one
    /// worker's, not every idle worker's).
    pub reassigned: Arc<Notify>,
}

impl Member {
    /// A worker with a fresh lease from `now`: just registered (`heard_from`), or recovered
    /// from the store, since no worker could reach a coordinator that was down.
    pub fn new(record: WorkerRecord, now: i64, heard_from: bool) -> Member {
        Member {
            lease_expires_ms: now + record.lease_ttl_ms as i64,
            record,
            assignment: None,
            activity: 0,
            active_ms: now,
            in_collective: false,
            data_wait: 0.0,
            skipped: [0; SKIP_REASONS.len()],
            heard_from,
            leaving: false,
            reassigned: Arc::default(),
        }
    }

    /// Whether a scheduler may give it a job at `now`.
    pub fn is_idle(&self, now: i64) -> bool {
        self.assignment.is_none()
            && self.lease_expires_ms >= now
            && self.heard_from
            && !self.leaving
    }
}

/// What a training job's rank 0 reported: kept here as it comes, saved with the job at every
/// decision about it, at an epoch or stage boundary, and at least every
/// [`PROGRESS_SAVED_EVERY_MS`] (by `Coordinator::tick`).
#[derive(Clone, Debug, Default)]
pub struct Training {
    pub generation: u64,
    /// The newest progress (the job's saved progress until rank 0 reports).
    pub progress: ProgressRecord,
    /// Reports received, and how many of them the last save held: a save in flight does not
    /// count a report that came meanwhile as saved.
    pub reported: u64,
    pub saved: u64,
    /// A report since the last save crossed an epoch or stage boundary.
    pub boundary: bool,
    pub saved_ms: i64,
    /// When the generation was assigned.
    pub started_ms: i64,
    /// The generation's workers by rank.
    pub ranks: Vec<String>,
    /// The job's stages, epochs and steps per epoch (0: not known): what its progress can say.
    pub stage_count: u32,
    pub epochs: u32,
    pub steps_per_epoch: u64,
    /// A worker of the generation is leaving: rank 0 is told to checkpoint now (once), and
    /// that commit ends the generation without it.
    pub checkpoint_requested: bool,
    /// The global step of the first report that told rank 0 to checkpoint for a leaving
    /// worker: only a checkpoint of that step or later ends the generation, not one still
    /// being written from before (the job would lose the steps between).
    pub leave_from_step: Option<u64>,
}

impl Training {
    pub fn record(&mut self, mut progress: ProgressRecord) {
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

    /// Whether rank 0's `progress` is one this job can have made: every number in its run's
    /// range (the ranges of the numbers alone are checked where they arrive). A hostile or
    /// confused rank must not grow the job's evaluations or curves past its plan.
    pub fn check(&self, progress: &ProgressRecord) -> Result<(), String> {
        let p = progress;
        let problem = if p.stage >= self.stage_count.max(1) {
            Some(format!("stage {} (it has {})", p.stage, self.stage_count))
        } else if p.epoch > self.epochs {
            Some(format!("epoch {} (it has {})", p.epoch, self.epochs))
        } else if p.eval_epoch > self.epochs {
            Some(format!(
                "an evaluation after epoch {} (it has {})",
                p.eval_epoch, self.epochs
            ))
        } else if p.step > p.steps_per_epoch {
            Some(format!(
                "step {} of an epoch of {}",
                p.step, p.steps_per_epoch
            ))
        } else if self.steps_per_epoch > 0 && p.steps_per_epoch != self.steps_per_epoch {
            Some(format!(
                "epochs of {} steps (it has {})",
                p.steps_per_epoch, self.steps_per_epoch
            ))
        } else if self.steps_per_epoch > 0
            && Some(p.global_step)
                != (p.epoch as u64)
                    .checked_mul(p.steps_per_epoch)
                    .and_then(|s| s.checked_add(p.step))
        {
            Some(format!(
                "global step {} at step {} of epoch {}",
                p.global_step, p.step, p.epoch
            ))
        } else {
            None
        };
        match problem {
            Some(what) => Err(format!("progress tells {what}; not recorded")),
            None => Ok(()),
        }
    }

    pub fn save_due(&self, now: i64) -> bool {
        self.reported != self.saved
            && (self.boundary || now - self.saved_ms >= PROGRESS_SAVED_EVERY_MS)
    }
}

/// Every registered worker and what each training job's rank 0 last reported. Behind a plain
/// mutex that is held for memory work only, never across an await or a store write: heartbeats
/// and progress reports touch nothing else, so they never wait for the disk or etcd.
#[derive(Default)]
pub struct Roster {
    pub workers: BTreeMap<String, Member>,
    pub training: BTreeMap<String, Training>,
    /// Every job's curves.
    pub history: BTreeMap<String, History>,
    /// What of each job's curves the store holds (see [`History::version`]), and when it was
    /// saved (monotonic ms).
    pub history_saved: BTreeMap<String, (u64, i64)>,
    /// Samples skipped while each job trained, by [`SKIP_REASONS`], as its workers' heartbeats
    /// told them (since this coordinator started).
    pub skipped: BTreeMap<String, [u64; SKIP_REASONS.len()]>,
    /// Workers that left on request, by id, with their secret's SHA-256: one that says so again
    /// (its heartbeat raced its leave) is answered as gone, not as unknown. The newest
    /// [`LEFT_REMEMBERED`] only.
    pub left: BTreeMap<String, String>,
    /// Where each job's TensorBoard events go, and the writer that writes them.
    pub event_dirs: BTreeMap<String, PathBuf>,
    pub events: Option<tensorboard::Events>,
}

impl Roster {
    /// The worker `who` names, if its secret is that worker's. Any other answer is the same
    /// "unknown worker": a caller learns nothing about which ids exist.
    pub fn authenticated(&mut self, who: &WorkerIdentity) -> Result<&mut Member, CoordinatorError> {
        self.workers
            .get_mut(&who.id)
            .filter(|w| auth::WorkerSecret::matches(&w.record.secret_sha256, &who.secret))
            .ok_or_else(|| {
                CoordinatorError::NotFound(format!(
                    "unknown worker {:?}: its lease expired, it never registered, or the call \
                     does not carry its secret; register again",
                    cut(&who.id)
                ))
            })
    }

    /// Remembers that worker `id` left on request (see [`Roster::left`]).
    pub fn remember_leaving(&mut self, id: &str) {
        if let Some(w) = self.workers.get(id) {
            self.left
                .insert(id.to_owned(), w.record.secret_sha256.clone());
        }
        while self.left.len() > LEFT_REMEMBERED {
            // Ids grow with each registration: the first is the longest gone.
            self.left.pop_first();
        }
    }

    /// Whether `who` is a worker that left on request (its secret its own).
    pub fn has_left(&self, who: &WorkerIdentity) -> bool {
        self.left
            .get(&who.id)
            .is_some_and(|sha256| auth::WorkerSecret::matches(sha256, &who.secret))
    }

    /// The rank `who` holds in generation `generation` of `job_id`, if that generation is
    /// current. The rank is the coordinator's, never one a request names.
    pub fn current_rank(
        &mut self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
    ) -> Result<Option<u32>, CoordinatorError> {
        Ok(self
            .authenticated(who)?
            .assignment
            .as_ref()
            .filter(|a| a.job_id == job_id && a.generation == generation)
            .map(|a| a.rank))
    }

    /// Takes worker `id`'s count of skipped samples (`told`, since its process started): what
    /// is new since its last heartbeat counts for the job it trains. A count lower than the
    /// last is a new process's.
    pub fn count_skips(&mut self, id: &str, told: [u64; SKIP_REASONS.len()]) {
        let Some(worker) = self.workers.get_mut(id) else {
            return;
        };
        let seen = std::mem::replace(&mut worker.skipped, told);
        let Some(job) = worker.assignment.as_ref().map(|a| a.job_id.clone()) else {
            return;
        };
        let counts = self.skipped.entry(job).or_default();
        for ((count, now), before) in counts.iter_mut().zip(told).zip(seen) {
            *count = count.saturating_add(if now >= before { now - before } else { now });
        }
    }

    /// Records rank 0's `progress` of `job_id` (a report at wall-clock `wall_ms`): the job's
    /// newest progress, and a point of its curves with each rank's data-wait share.
    pub fn report(&mut self, job_id: &str, progress: ProgressRecord, wall_ms: i64) {
        let training = self.training.entry(job_id.to_owned()).or_default();
        training.record(progress);
        let data_wait: Vec<f32> = training
            .ranks
            .iter()
            .map(|id| self.workers.get(id).map_or(0.0, |w| w.data_wait))
            .collect();
        let history = self.history.entry(job_id.to_owned()).or_default();
        let evaluations = history.evaluations.len();
        history.record(
            &training.progress,
            crate::history::rank_series(&data_wait),
            wall_ms,
        );
        let evaluated = history.evaluations.len() > evaluations;
        let p = &training.progress;
        if let (Some(events), Some(dir), true) =
            (&self.events, self.event_dirs.get(job_id), p.global_step > 0)
        {
            let mut values = vec![
                ("loss".to_owned(), p.loss),
                ("learning_rate".to_owned(), p.learning_rate),
                ("images_per_second".to_owned(), p.images_per_second),
                ("image_size".to_owned(), p.image_size as f32),
            ];
            if evaluated {
                values.push(("eval/top1".to_owned(), p.eval_top1));
                values.push(("eval/top5".to_owned(), p.eval_top5));
            }
            values.extend(
                data_wait
                    .iter()
                    .enumerate()
                    .map(|(rank, share)| (format!("data_wait/rank_{rank}"), *share)),
            );
            events.send(Note::Scalars {
                job: job_id.to_owned(),
                dir: dir.clone(),
                step: p.global_step,
                wall_ms,
                values,
            });
        }
    }

    /// A new generation of `job_id` restores from global step `step`: its curves and events go
    /// back there with the model.
    pub fn roll_back(&mut self, job_id: &str, step: u64) {
        if let Some(history) = self.history.get_mut(job_id) {
            history.roll_back_to(step);
        }
        if let (Some(events), Some(dir)) = (&self.events, self.event_dirs.get(job_id)) {
            events.send(Note::RollBack {
                job: job_id.to_owned(),
                dir: dir.clone(),
                step,
            });
        }
    }

    /// The job as it is now: its record with the newest progress of its generation.
    pub fn latest(&self, mut job: JobRecord) -> JobRecord {
        if let Some(t) = self
            .training
            .get(&job.id)
            .filter(|t| t.generation == job.generation)
        {
            job.progress = t.progress;
        }
        job
    }

    /// Derives the assignments `job` makes, where `old` was its record until now: a worker
    /// holds rank `r` of a job's generation exactly while that job is active and lists it at
    /// rank `r`. Returns whether any assignment changed.
    pub fn reassign(&mut self, old: Option<&JobRecord>, job: &JobRecord) -> bool {
        let same = old.is_some_and(|o| {
            o.state.is_active() == job.state.is_active()
                && o.generation == job.generation
                && o.workers == job.workers
        });
        if same {
            return false;
        }
        let now = monotonic_ms();
        for (id, assignment) in old.into_iter().flat_map(|o| o.assignments()) {
            if let Some(w) = self.workers.get_mut(id)
                && w.assignment.as_ref() == Some(&assignment)
            {
                w.assignment = None;
                w.active_ms = now;
                w.reassigned.notify_waiters();
            }
        }
        for (id, assignment) in job.assignments() {
            if let Some(w) = self.workers.get_mut(id) {
                w.assignment = Some(assignment);
                // Stalls are timed from the start of an assignment.
                w.active_ms = now;
                w.reassigned.notify_waiters();
            }
        }
        if job.state.is_active() {
            let training = self.training.entry(job.id.clone()).or_default();
            if training.generation != job.generation {
                *training = Training {
                    generation: job.generation,
                    progress: job.progress,
                    saved_ms: now,
                    started_ms: now,
                    ranks: job.workers.clone(),
                    stage_count: job.stage_count,
                    epochs: job.epochs,
                    steps_per_epoch: job.steps_per_epoch,
                    ..Training::default()
                };
            }
        } else {
            self.training.remove(&job.id);
        }
        true
    }
}

/// A job's state in this process alone, beside its saved record: what its current generation
/// exchanged (gone with the generation; after a restart the workers publish again, and a
/// generation that cannot finish ends through leases or stall detection), and what the
/// scheduler last decided of it while queued.
#[derive(Clone, Debug, Default)]
pub struct JobRuntime {
    /// The generation the exchange below belongs to.
    pub generation: u64,
    /// Rendezvous payloads by rank.
    pub rendezvous: BTreeMap<u32, Vec<u8>>,
    /// The generation's ring key (see [`auth::ring_key`]), handed to its ranks with the
    /// completed rendezvous.
    pub ring_key: Vec<u8>,
    /// The collective failures reported in the generation, by worker.
    pub collective_failures: BTreeMap<String, String>,
    /// When enough workers for some allowed world size were first idle.
    pub ready_since_ms: Option<i64>,
    /// While queued: what the job waits for (the idle workers it lacks, or the grace before it
    /// starts on fewer).
    pub waiting: String,
}

impl JobRuntime {
    /// Follows `job` as it is shown: the exchange is forgotten once its generation is over
    /// (the job is no longer active, or a new generation began).
    pub fn follow(&mut self, job: &JobRecord) {
        if !job.state.is_active() || self.generation != job.generation {
            *self = JobRuntime {
                generation: job.generation,
                ready_since_ms: self.ready_since_ms,
                waiting: std::mem::take(&mut self.waiting),
                ..JobRuntime::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::JobState;

    #[test]
    fn a_generations_exchange_is_forgotten_with_it_and_the_queue_wait_is_not() {
        let mut job: JobRecord = serde_json::from_value(serde_json::json!({
            "id": "job-000001", "name": "j", "state": "rendezvous", "generation": 1,
            "spec_toml": "", "workers": ["w-1", "w-2"], "progress": {}, "checkpoints": [],
            "message": "", "created_at_ms": 0, "updated_at_ms": 0, "stage_count": 1,
            "epochs": 1, "world_sizes": [2], "requested_world_size": null, "restore_from": null,
        }))
        .unwrap();
        let mut runtime = JobRuntime::default();
        runtime.follow(&job);
        runtime.rendezvous.insert(0, b"rank 0".to_vec());
        runtime.ring_key = b"key".to_vec();
        runtime
            .collective_failures
            .insert("w-1".into(), "timeout".into());
        runtime.follow(&job);
        assert_eq!(
            runtime.rendezvous.len(),
            1,
            "the same generation keeps its exchange"
        );

        job.state = JobState::Queued;
        runtime.waiting = "waiting for workers: 1 idle, 2 needed".into();
        runtime.ready_since_ms = Some(5);
        runtime.follow(&job);
        assert!(runtime.rendezvous.is_empty() && runtime.ring_key.is_empty());
        assert!(runtime.collective_failures.is_empty());
        assert_eq!(runtime.ready_since_ms, Some(5));
        assert!(runtime.waiting.starts_with("waiting for workers"));

        job.state = JobState::Rendezvous;
        job.generation = 2;
        runtime.rendezvous.insert(1, b"stale".to_vec());
        runtime.follow(&job);
        assert!(
            runtime.rendezvous.is_empty(),
            "a new generation starts afresh"
        );
        assert_eq!(runtime.generation, 2);
    }
}
