//! Restoring a run from a committed checkpoint: the files are verified against their
//! manifest, the manifest against the run it is restored into, and only then is the state
//! loaded (which itself changes nothing unless every name, shape and dtype matches).

use super::state::TrainingState;
use super::{CheckpointError, Manifest, verify};
use crate::feed::Cursor;
use std::path::Path;

/// The run a checkpoint is restored into.
pub struct Run<'a> {
    pub job_id: &'a str,
    pub steps_per_epoch: u64,
    pub epochs: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The checkpoint is damaged (truncated, a checksum or its manifest's cursor is wrong):
    /// the previous one should be used.
    #[error("{0}")]
    Damaged(String),
    /// Intact but not this run's to restore (another job, another dataset or batch, another
    /// format): no other checkpoint of the job would do better.
    #[error("{0}")]
    Refused(String),
}

/// Restores checkpoint `id` from `dir` into `state`; returns where the run goes on.
pub fn restore(
    dir: &Path,
    id: &str,
    run: Run,
    mut state: TrainingState,
) -> Result<(Manifest, Cursor), RestoreError> {
    let manifest = verify(dir).map_err(|e| match e {
        // Intact: the coordinator must not drop it as damaged.
        CheckpointError::OtherFormat { .. } => RestoreError::Refused(e.to_string()),
        _ => RestoreError::Damaged(e.to_string()),
    })?;
    if manifest.job != run.job_id {
        return Err(RestoreError::Refused(format!(
            "checkpoint {} belongs to job {}, not to {}: refusing to restore it",
            dir.display(),
            manifest.job,
            run.job_id
        )));
    }
    let steps_per_epoch = run.steps_per_epoch;
    if manifest.steps_per_epoch != steps_per_epoch {
        return Err(RestoreError::Refused(format!(
            "checkpoint {} was written with {} steps per epoch, the data now gives \
             {steps_per_epoch}: the dataset or the global batch changed",
            dir.display(),
            manifest.steps_per_epoch,
        )));
    }
    // The manifest is not among the files its digests cover: a cursor outside the run (an
    // epoch past the end would finish it untrained) is a damaged checkpoint.
    let global_step = u64::from(manifest.epoch)
        .checked_mul(steps_per_epoch)
        .and_then(|s| s.checked_add(manifest.step));
    if manifest.id != id
        || manifest.step >= steps_per_epoch
        || manifest.epoch > run.epochs
        || global_step != Some(manifest.global_step)
    {
        return Err(RestoreError::Damaged(format!(
            "its manifest names checkpoint {} at epoch {}, step {} (global step {}): not where \
             checkpoint {id} of a run of {} epochs of {steps_per_epoch} steps can be",
            manifest.id, manifest.epoch, manifest.step, manifest.global_step, run.epochs
        )));
    }
    state
        .load(dir)
        .map_err(|e| RestoreError::Refused(e.to_string()))?;
    let cursor = Cursor {
        epoch: manifest.epoch,
        step: manifest.step,
    };
    Ok((manifest, cursor))
}
