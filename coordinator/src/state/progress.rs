//! What a generation's ranks report as it trains: progress (kept in memory, saved later) and
//! events (the end, a failure), which are decisions.

use super::{Coordinator, Inner};
use crate::auth::WorkerIdentity;
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::records::{
    CHECKPOINT_FAILURES_TO_GIVE_UP, COLLECTIVE_FAILURES_TO_GIVE_UP, Incident, JobRecord, JobState,
    ProgressRecord,
};
use ladder_core::cut;

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

/// What a worker is told in answer to its progress report: whether its generation is current,
/// and (rank 0) whether to checkpoint now for a leaving worker.
pub type ProgressAnswer = ladder_proto::v1::ReportProgressResponse;

impl Coordinator {
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
        let (rank, checkpoint_now, diverged) = {
            let mut roster = self.roster();
            let Some(rank) = roster.current_rank(who, job_id, generation)? else {
                return Ok(ProgressAnswer::default());
            };
            let with_progress = report.progress.is_some();
            let mut diverged = None;
            // Rank 0's progress is the job's; another rank's (sent with its end) is not shown.
            if let Some(progress) = report.progress.take()
                && rank == 0
            {
                let training = roster.training.entry(job_id.to_owned()).or_default();
                training
                    .check(&progress)
                    .map_err(CoordinatorError::Invalid)?;
                if progress.loss.is_finite() {
                    roster.report(job_id, progress, now_ms());
                } else {
                    // Never shown nor saved: the job's last progress is its last good one.
                    diverged = Some(progress);
                }
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
            (rank, checkpoint_now, diverged)
        };
        let _ = self.job_changed.send(job_id.to_owned());
        if let Some(progress) = diverged {
            let mut inner = self.inner.lock().await;
            if let Some((job, _)) = self.current(&inner, who, job_id, generation)? {
                let job = job.clone();
                self.diverged(&mut inner, job, &progress).await?;
            }
            return Ok(ProgressAnswer::default());
        }
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

    /// Rank 0 reported a loss that is not a number (or is infinite): training on cannot bring
    /// it back, and every step from here is wasted GPU time, so the job fails, naming where it
    /// diverged and the checkpoint to go back to.
    async fn diverged(
        &self,
        inner: &mut Inner,
        mut job: JobRecord,
        progress: &ProgressRecord,
    ) -> Result<()> {
        let newest = match job.checkpoints.last() {
            Some(c) => format!(
                "`ladder resume {}` restarts from its newest checkpoint, {} (step {}), or \
                 `--checkpoint ID` from an earlier one",
                job.id, c.id, c.step
            ),
            None => format!(
                "it has no checkpoint: lower the learning rate (or check the data), then \
                 `ladder resume {}`",
                job.id
            ),
        };
        job.release();
        job.state = JobState::Failed;
        job.message = format!(
            "the loss diverged: {} at global step {} (epoch {}, stage {}); stopped rather than \
             train on. {newest}",
            progress.loss, progress.global_step, progress.epoch, progress.stage
        );
        job.incident(
            Incident::Diverged,
            format!("generation {}: {}", job.generation, job.message),
        );
        tracing::error!(job = %job.id, "{}", job.message);
        self.commit_job(inner, job).await?;
        self.schedule_after_change(inner).await;
        Ok(())
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
}
