//! Checkpoints: written in the background, atomically, and verified before use (DESIGN.md,
//! idea 5).
//!
//! Rank 0 takes a [`Snapshot`] (a copy of model, optimizer and EMA state in host memory: the
//! only time training waits), and a [`Writer`] thread writes it into a temporary directory —
//! the state files ([`STATE_FILES`]) at once, then `manifest.json` with each file's size and
//! SHA-256 — flushes everything to disk, renames the directory to its final name and flushes
//! the parent. Only then is the checkpoint offered to the coordinator, and only committed
//! checkpoints are ever resumed from. At most one write is in flight.
//!
//! The one component for a run's state on disk: [`safetensors`] (named tensors in and out of
//! files, checked), [`state`] (the training state's four files and its host snapshot), this
//! module (the manifest, the atomic write, verification, the writer thread, deleting what
//! retention retired), [`pipeline`] (when a checkpoint is due, the snapshot beside the next
//! step, the write and the commit) and [`restore`] (a committed checkpoint checked against
//! the run it goes on).

pub mod pipeline;
pub mod restore;
pub mod safetensors;
pub mod state;

use ladder_core::files::{SmallFileError, read_small_file};
use ladder_core::location;
use ladder_core::location::CheckpointId;
use ladder_core::sample::EpochTally;
use safetensors::Written;
use serde::{Deserialize, Serialize};
use state::{STATE_FILES, Snapshot};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

pub const MANIFEST_FILE: &str = "manifest.json";

/// The largest checkpoint manifest read: a few KiB in practice (its files' digests and the
/// epochs' tallies); anything larger is not one Ladder wrote.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// 2: the training state in four files (1 had `training.safetensors`).
const FORMAT: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

/// Everything needed to continue a run from a checkpoint, besides the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub job: String,
    pub generation: u64,
    /// Steps done: the run continues with this global step.
    pub global_step: u64,
    /// The sample-plan cursor of the next step.
    pub epoch: u32,
    pub step: u64,
    pub steps_per_epoch: u64,
    pub stage: u32,
    /// Written at the end of a stage (kept by retention).
    pub stage_end: bool,
    pub seed: u64,
    pub world_size: u32,
    pub model: String,
    pub classes: u32,
    pub files: BTreeMap<String, FileDigest>,
    /// What the steps since the previous committed checkpoint of this run trained, per epoch
    /// (the coordinator's ledger of the model's history adds these up).
    #[serde(default)]
    pub trained: BTreeMap<u32, EpochTally>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Corrupt { path: String, message: String },
    /// Written by another version of Ladder: intact, but not readable by this one.
    #[error(
        "checkpoint {path} has format {found}; this Ladder reads format {FORMAT}: continue \
         the job with the Ladder that wrote it"
    )]
    OtherFormat { path: String, found: u32 },
    #[error(transparent)]
    State(#[from] safetensors::StateError),
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The directory a checkpoint is written in before it is renamed to its id.
const TEMP_PREFIX: &str = ".tmp-";

/// Removes the half-written checkpoints that writers of generations before `generation` left
/// in `parent`: a worker killed mid-write leaves a directory the size of a checkpoint, which no
/// later id would ever replace. Only the current generation's rank 0 writes in a job's
/// directory, so nothing of an earlier one is still wanted (a writer of an earlier generation
/// still running would see its commit refused and delete it anyway).
fn remove_stale_temps(parent: &Path, generation: u64) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let stale = name
            .to_str()
            .and_then(|n| n.strip_prefix(TEMP_PREFIX))
            .and_then(|id| CheckpointId::parse(id).ok())
            .is_some_and(|id| id.generation < generation);
        if stale {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(path = %entry.path().display(), "removed a checkpoint an earlier generation left half-written")
                }
                Err(e) => {
                    tracing::warn!(path = %entry.path().display(), "cannot remove a half-written checkpoint: {e}")
                }
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Writes `snapshot` as checkpoint `manifest.id` under `parent`, atomically; returns its
/// directory and the manifest with the files' digests.
pub fn write(
    snapshot: &Snapshot,
    parent: &Path,
    mut manifest: Manifest,
) -> Result<(PathBuf, Manifest), CheckpointError> {
    let final_dir = parent.join(&manifest.id);
    let temp = parent.join(format!("{TEMP_PREFIX}{}", manifest.id));
    std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    remove_stale_temps(parent, manifest.generation);
    if temp.exists() {
        // Left by a writer that died mid-write: never committed, safe to replace.
        std::fs::remove_dir_all(&temp).map_err(io_error(&temp))?;
    }
    let files = snapshot.write(&temp).inspect_err(|_| {
        // A full disk must not fill up further with the rest of a failed checkpoint.
        let _ = std::fs::remove_dir_all(&temp);
    })?;
    manifest.format = FORMAT;
    manifest.files = files
        .into_iter()
        .map(|(name, Written { bytes, sha256 })| (name.to_owned(), FileDigest { bytes, sha256 }))
        .collect();
    let manifest_path = temp.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    std::fs::File::create(&manifest_path)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &text)?;
            f.sync_all()
        })
        .map_err(io_error(&manifest_path))?;
    sync_dir(&temp)?;
    if final_dir.exists() {
        // Ids are unique within a job, so this is another job's (or a copy put there by hand):
        // never written over.
        let _ = std::fs::remove_dir_all(&temp);
        return Err(CheckpointError::Io {
            path: final_dir.display().to_string(),
            message: "already exists; not replaced".to_owned(),
        });
    }
    std::fs::rename(&temp, &final_dir).map_err(io_error(&final_dir))?;
    sync_dir(parent)?;
    Ok((final_dir, manifest))
}

/// Reads `dir`'s manifest and checks every file against its size and SHA-256.
pub fn verify(dir: &Path) -> Result<Manifest, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt {
        path: dir.display().to_string(),
        message,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = match read_small_file(&manifest_path, MAX_MANIFEST_BYTES) {
        Ok(text) => text,
        Err(SmallFileError::Io(e)) => return Err(io_error(&manifest_path)(e)),
        Err(e) => return Err(corrupt(format!("{MANIFEST_FILE} is {e}"))),
    };
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| corrupt(format!("{MANIFEST_FILE} is unreadable: {e}")))?;
    if manifest.format != FORMAT {
        return Err(CheckpointError::OtherFormat {
            path: dir.display().to_string(),
            found: manifest.format,
        });
    }
    for name in STATE_FILES {
        let expected = manifest
            .files
            .get(name)
            .ok_or_else(|| corrupt(format!("the manifest lists no {name}")))?;
        let path = dir.join(name);
        let found = safetensors::digest(&path).map_err(io_error(&path))?;
        if found.bytes != expected.bytes {
            return Err(corrupt(format!(
                "{name} has {} bytes, the manifest says {} (truncated?)",
                found.bytes, expected.bytes
            )));
        }
        if found.sha256 != expected.sha256 {
            return Err(corrupt(format!(
                "{name} fails its checksum (SHA-256 {}, the manifest says {})",
                found.sha256, expected.sha256
            )));
        }
    }
    Ok(manifest)
}

type Job = Box<dyn FnOnce() + Send>;

/// Writes checkpoints on a background thread, one at a time.
#[derive(Default)]
pub struct Writer {
    in_flight: Option<JoinHandle<()>>,
}

impl Writer {
    /// Waits for the write in flight, if any.
    pub fn wait(&mut self) {
        if let Some(handle) = self.in_flight.take() {
            handle.join().expect("the checkpoint writer does not panic");
        }
    }

    pub fn busy(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Runs `work` (a write and what follows it) in the background, after the previous one.
    pub fn submit(&mut self, work: Job) {
        self.wait();
        self.in_flight = Some(
            std::thread::Builder::new()
                .name("checkpoint-writer".to_owned())
                .spawn(work)
                .expect("spawning the checkpoint writer"),
        );
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Deletes the checkpoints `ids` of job `job_id` that retention retired. The coordinator
/// dropped them from the job's record first, so deleting them can never lose the last good
/// checkpoint, even if this process dies half-way: what is left is merely unreferenced, and
/// the next generation's rank 0 is told to delete it again. Only directories of `job_id`
/// under `root` (the spec's `checkpoint.dir`) are deleted: whatever else an id names, this
/// refuses.
pub fn delete_retired<'a>(ids: impl IntoIterator<Item = &'a str>, root: &Path, job_id: &str) {
    for id in ids {
        let dir = match location::checkpoint_dir(root, job_id, id) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::error!("refusing to delete a retired checkpoint: {e}");
                continue;
            }
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(checkpoint = %id, "retired checkpoint deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(checkpoint = %id, "cannot delete retired checkpoint {}: {e}", dir.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_of_another_format_is_refused_as_such_not_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let old = serde_json::json!({
            "format": 1, "id": "step-000000010-g1", "job": "job-000001", "generation": 1,
            "global_step": 10, "epoch": 0, "step": 10, "steps_per_epoch": 20, "stage": 0,
            "stage_end": false, "seed": 0, "world_size": 2, "model": "tiny", "classes": 10,
            "files": {},
        });
        std::fs::write(dir.path().join(MANIFEST_FILE), old.to_string()).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(
            matches!(err, CheckpointError::OtherFormat { found: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("format 1; this Ladder reads format 2"),
            "{err}"
        );
    }

    #[test]
    fn a_manifest_that_is_no_regular_file_or_too_large_is_corrupt_and_never_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join(MANIFEST_FILE);
        let made = std::process::Command::new("mkfifo")
            .arg(&manifest)
            .status()
            .unwrap();
        assert!(made.success());
        let err = verify(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("manifest.json is not a regular file"),
            "{err}"
        );
        std::fs::remove_file(&manifest).unwrap();
        std::fs::write(&manifest, vec![b' '; (MAX_MANIFEST_BYTES + 1) as usize]).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn retired_checkpoints_are_deleted_only_inside_their_jobs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let job = "job-000001";
        let ours = "step-000000004-g1";
        let ours_dir = root.join(job).join(ours);
        let other_jobs = root.join("job-000002").join(ours);
        let precious = dir.path().join("home");
        for d in [&ours_dir, &other_jobs, &precious] {
            std::fs::create_dir_all(d).unwrap();
        }
        let forged = ["../../home", "step-000000004-g1/../../../home", "/home"];
        delete_retired(forged, &root, job);
        assert!(precious.is_dir() && ours_dir.is_dir());
        delete_retired([ours], &root, job);
        assert!(!ours_dir.exists(), "its own retired checkpoint is deleted");
        assert!(other_jobs.is_dir(), "another job's is not");
    }
}
