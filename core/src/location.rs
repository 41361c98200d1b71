//! Where a job's checkpoints live: `checkpoint.dir/JOB/ID`, with ID
//! `step-{global step, 9 digits}-g{generation}`. The coordinator names these directories and
//! workers write, restore and delete nothing else: each side derives a directory from the job's
//! spec and the two ids, and no path is ever sent. The ids arrive over the wire
//! (and the worker token sits on every node), so they are parsed, never joined into a path as
//! sent: an id of `../../home` must not become a directory to delete.

use crate::cut;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocationError {
    #[error("{0:?} is not a job id (job-NNNNNN)")]
    JobId(String),
    #[error("{0:?} is not a checkpoint id (step-NNNNNNNNN-gN)")]
    CheckpointId(String),
}

/// A checkpoint's id: unique within a job even when a rollback repeats steps, since the
/// generation that wrote it is part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckpointId {
    pub generation: u64,
    pub global_step: u64,
}

impl CheckpointId {
    /// The one spelling [`fmt::Display`] writes, and nothing else.
    pub fn parse(text: &str) -> Result<CheckpointId, LocationError> {
        let refuse = || LocationError::CheckpointId(cut(text));
        let (step, generation) = text
            .strip_prefix("step-")
            .and_then(|rest| rest.split_once("-g"))
            .ok_or_else(refuse)?;
        let number = |digits: &str| {
            digits
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| digits.parse::<u64>().ok())
                .flatten()
        };
        let id = CheckpointId {
            global_step: number(step).ok_or_else(refuse)?,
            generation: number(generation).ok_or_else(refuse)?,
        };
        // Leading zeros, a sign or a shorter step would name another directory for the same id.
        if id.to_string() != text {
            return Err(refuse());
        }
        Ok(id)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "step-{:09}-g{}", self.global_step, self.generation)
    }
}

/// `job-` and digits: the ids the coordinator gives jobs.
fn check_job_id(job_id: &str) -> Result<(), LocationError> {
    match job_id.strip_prefix("job-") {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(LocationError::JobId(cut(job_id))),
    }
}

/// `root/JOB`: the directory holding every checkpoint of `job_id` (`root` is the spec's
/// `checkpoint.dir`).
pub fn job_dir(root: &Path, job_id: &str) -> Result<PathBuf, LocationError> {
    check_job_id(job_id)?;
    Ok(root.join(job_id))
}

/// `root/JOB/ID`: where checkpoint `id` of `job_id` lives.
pub fn checkpoint_dir(root: &Path, job_id: &str, id: &str) -> Result<PathBuf, LocationError> {
    CheckpointId::parse(id)?;
    Ok(job_dir(root, job_id)?.join(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_ids_have_one_spelling() {
        let id = CheckpointId {
            generation: 3,
            global_step: 120,
        };
        assert_eq!(id.to_string(), "step-000000120-g3");
        assert_eq!(CheckpointId::parse("step-000000120-g3"), Ok(id));
        for bad in [
            "",
            "step-",
            "step-000000120",
            "step-120-g3",
            "step-000000120-g03",
            "step-000000120-g+3",
            "step-00000012a-g3",
            "step-000000120-g3/..",
            "../step-000000120-g3",
            "step--00000120-g3",
        ] {
            assert!(CheckpointId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn paths_are_named_here_not_taken_from_the_wire() {
        let root = Path::new("/ckpt");
        assert_eq!(
            checkpoint_dir(root, "job-000001", "step-000000010-g1").unwrap(),
            Path::new("/ckpt/job-000001/step-000000010-g1")
        );
        for job in ["", "job-", "job-1/..", "..", "job-000001/../../etc"] {
            assert!(job_dir(root, job).is_err(), "{job:?} was accepted");
        }
        assert!(checkpoint_dir(root, "job-000001", "..").is_err());
        let long = "x".repeat(1 << 20);
        let err = CheckpointId::parse(&long).unwrap_err().to_string();
        assert!(
            err.len() < 200,
            "a long id is cut short: {} bytes",
            err.len()
        );
    }
}
