//! Checkpoint commits: what rank 0 may commit, retention, and the generation ends a commit
//! brings (a leaving worker goes, idle workers join).

use super::{Coordinator, Inner};
use crate::auth::WorkerIdentity;
use crate::clock::{monotonic_ms, now_ms};
use crate::error::{CoordinatorError, Result};
use crate::policy;
use crate::records::{self, CheckpointRecord, Incident, JobState, LedgerEntry};
use ladder_core::cut;
use ladder_core::location::CheckpointId;
use ladder_core::stage::StagePlan;

impl Coordinator {
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
        let assigned = self.roster().authenticated(who)?.assignment.clone();
        let known = inner.job(job_id)?;
        if let Some(position) = known.checkpoints.iter().position(|c| c.id == checkpoint.id) {
            // Answered to a worker of the job only (a regroup may have given the committer
            // another rank since). Not a refusal, which would have it delete a committed
            // checkpoint's files: an error, after which files stay.
            if assigned.is_none_or(|a| a.job_id != job_id) {
                return Err(CoordinatorError::Conflict(format!(
                    "worker {} is not a worker of job {job_id}: checkpoint {} is not answered \
                     for",
                    who.id,
                    cut(&checkpoint.id)
                )));
            }
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
        // The steps this commit accounts for: since the generation's previous commit, or the
        // checkpoint it restored from.
        let since = job
            .checkpoints
            .iter()
            .filter(|c| c.generation == generation)
            .map(|c| c.step)
            .max()
            .or(job.restore_from.as_ref().map(|c| c.step))
            .unwrap_or(0);
        let bounds = Bounds {
            epochs: spec.schedule.epochs,
            stages: job.stage_count,
            steps_per_epoch: job.steps_per_epoch,
        };
        if let Err(why) = check_trained(&trained, &checkpoint, bounds, since) {
            return Ok(Err(why));
        }
        let (stage, stage_end) =
            match place(&StagePlan::new(&spec), job.steps_per_epoch, &checkpoint) {
                Ok(placed) => placed,
                Err(why) => return Ok(Err(why)),
            };
        let mut job = job.clone();
        let checkpoint = CheckpointRecord {
            generation,
            committed_at_ms: now_ms(),
            stage,
            stage_end,
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
        policy::compact_ledger(&mut job.ledger, &job.checkpoints, policy::TALLIED_EPOCHS);
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

/// What of a job's plan a commit is checked against.
#[derive(Clone, Copy)]
struct Bounds {
    epochs: u32,
    stages: u32,
    /// 0: not known (a job submitted by an older version).
    steps_per_epoch: u64,
}

/// A commit's checkpoint and what it says its steps (those after global step `since`) trained,
/// against the job's bounds: an epoch or stage the job does not have, an epoch told twice, or
/// one its steps are not in, is refused (the ledger is kept in the job's record and summed by
/// every reader).
fn check_trained(
    trained: &[LedgerEntry],
    checkpoint: &CheckpointRecord,
    bounds: Bounds,
    since: u64,
) -> std::result::Result<(), String> {
    let Bounds {
        epochs,
        stages,
        steps_per_epoch,
    } = bounds;
    let id = cut(&checkpoint.id);
    // The epochs its steps (after `since`, up to its own) are in: what it can tell, so that
    // the ledger grows with the run, not with what a worker makes up.
    let spanned = match steps_per_epoch {
        0 => 0..=u32::MAX,
        spe => {
            let last = checkpoint.step.max(since + 1) - 1;
            (since / spe) as u32..=(last / spe) as u32
        }
    };
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
        if !spanned.contains(&entry.epoch) {
            return Err(format!(
                "checkpoint {id} tells what epoch {} trained; its steps ({} to {}) are in epochs \
                 {} to {}",
                entry.epoch,
                since + 1,
                checkpoint.step,
                spanned.start(),
                spanned.end()
            ));
        }
    }
    Ok(())
}

/// Where a checkpoint at epoch `epoch` (the epoch its cursor is in) and global step `step`
/// falls in the job's plan: its stage (the stage of the epoch whose steps it follows), and
/// whether it ends that stage. Decided here from the plan, not taken from the worker:
/// retention keeps stage ends, so a rank 0 calling every checkpoint one would keep them all.
/// With `steps_per_epoch` known, a step outside its epoch is refused; without it (a job
/// submitted by an older version), a stage end is trusted only at a stage's last epoch.
fn place(
    plan: &StagePlan,
    steps_per_epoch: u64,
    checkpoint: &CheckpointRecord,
) -> std::result::Result<(u32, bool), String> {
    let (epoch, step) = (checkpoint.epoch as usize, checkpoint.step);
    let epochs = plan.epochs.len();
    let stage_of = |e: usize| plan.epochs.get(e).map_or(0, |p| p.stage);
    let ends_a_stage =
        |epoch: usize| epoch > 0 && (epoch == epochs || stage_of(epoch) != stage_of(epoch - 1));
    let at_epoch_start = match steps_per_epoch {
        0 => {
            return Ok((
                checkpoint.stage,
                checkpoint.stage_end && ends_a_stage(epoch),
            ));
        }
        spe => {
            let start = checkpoint.epoch as u64 * spe;
            let end = if epoch == epochs {
                start
            } else {
                start + spe - 1
            };
            if !(start..=end).contains(&step) {
                return Err(format!(
                    "checkpoint {} says epoch {epoch}, but its step {step} is in epoch {} \
                     ({spe} steps each)",
                    cut(&checkpoint.id),
                    step / spe
                ));
            }
            step == start
        }
    };
    // A cursor at an epoch's first step follows the steps of the epoch before it.
    let follows = match at_epoch_start && epoch > 0 {
        true => epoch - 1,
        false => epoch,
    };
    Ok((stage_of(follows), at_epoch_start && ends_a_stage(epoch)))
}
