//! The periodic tick: lapsed leases, stalled workers, progress due to be saved, and the
//! schedule that gives idle workers to queued jobs.

use super::{Change, Coordinator, Inner};
use crate::clock::{monotonic_ms, now_ms};
use crate::error::Result;
use crate::policy::{self, Placement};
use crate::records::{Incident, JobRecord, JobState};

impl Coordinator {
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
        self.retire_ended(&mut inner).await?;
        self.schedule(&mut inner).await
    }

    /// Deletes the jobs that ended longer ago than [`Config::retire_ended_after`] (their
    /// TensorBoard runs keep their curves).
    async fn retire_ended(&self, inner: &mut Inner) -> Result<()> {
        let Some(after) = self.config.retire_ended_after else {
            return Ok(());
        };
        let before = now_ms() - after.as_millis() as i64;
        let retired: Vec<String> = inner
            .jobs
            .values()
            .filter(|j| j.state.is_terminal() && j.updated_at_ms < before)
            .map(|j| j.id.clone())
            .collect();
        // Two deletes each.
        for chunk in retired.chunks(crate::store::MAX_WRITES / 2) {
            tracing::info!(jobs = %chunk.join(", "), "retiring ended jobs");
            let change = Change {
                deleted: chunk.to_vec(),
                ..Change::default()
            };
            self.apply(inner, change).await?;
        }
        Ok(())
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

    /// Records what queued `job_id` waits for; it is shown with the next publication.
    fn set_waiting(job_id: &str, waiting: String, inner: &mut Inner) {
        let runtime = inner.runtime.entry(job_id.to_owned()).or_default();
        if runtime.waiting != waiting {
            runtime.waiting = waiting;
            inner.unpublished.insert(job_id.to_owned());
        }
    }

    /// Schedules after a change that is already saved: the change stands whatever happens
    /// here, so a failure is logged, not returned (the next [`Self::tick`] tries again).
    pub(super) async fn schedule_after_change(&self, inner: &mut Inner) {
        if let Err(e) = self.schedule(inner).await {
            tracing::warn!("cannot assign workers now (tried again shortly): {e}");
        }
    }

    /// Gives idle workers to queued jobs in the order they are served (see [`policy::place`]),
    /// and shows what the others wait for.
    async fn schedule(&self, inner: &mut Inner) -> Result<()> {
        let placed = self.place_queued(inner).await;
        self.publish(inner);
        placed
    }

    async fn place_queued(&self, inner: &mut Inner) -> Result<()> {
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
                    Self::set_waiting(&job_id, why, inner);
                    continue;
                }
                Placement::Start(workers) => workers,
            };
            let runtime = inner.runtime.entry(job_id.clone()).or_default();
            runtime.waiting.clear();
            inner.unpublished.insert(job_id.clone());
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
}
