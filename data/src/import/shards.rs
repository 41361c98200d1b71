//! Writing an import's shards: on every core, each shard whole under a temporary name, then
//! renamed, so that a shard that exists is complete; and against a journal, so that an import
//! interrupted (kill -9, a full disk) continues where it stopped and writes no shard twice.
//!
//! The journal (`DEST/.import-journal`) holds a digest of the import's plan: every image's
//! place (file, or archive and byte range), label and shard, the shard size and the classes.
//! The plan is a function of the source and the options (the seed fixes the shuffle and the
//! split), so the same command run again makes the same plan: it keeps the shards that exist
//! and writes the others. Another plan over an interrupted import is refused. The journal goes
//! once both splits are written and indexed.

use super::io;
use super::sources::Bytes;
use crate::synth::append;
use ladder_core::dataset::DatasetError;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub const JOURNAL_FILE: &str = ".import-journal";

/// A test's stand-in for kill -9: the process aborts once it has renamed this many shards.
const ABORT_AFTER_SHARDS: &str = "LADDER_IMPORT_ABORT_AFTER_SHARDS";

/// One image to write: its bytes, label and extension.
pub type Planned = (Bytes, u32, &'static str);

/// The digest of what the import writes: each split's images in order, the shard size and the
/// classes.
pub fn plan_digest(splits: &[&[Planned]], shard_samples: u32, classes: &[String]) -> String {
    let mut hash = Sha256::new();
    hash.update(shard_samples.to_le_bytes());
    for class in classes {
        hash.update(class.as_bytes());
        hash.update([0]);
    }
    for split in splits {
        hash.update((split.len() as u64).to_le_bytes());
        for (bytes, label, ext) in *split {
            match bytes {
                Bytes::File(path) => hash.update(path.as_os_str().as_encoded_bytes()),
                Bytes::Range {
                    archive,
                    offset,
                    len,
                } => {
                    hash.update(archive.path.as_os_str().as_encoded_bytes());
                    hash.update(offset.to_le_bytes());
                    hash.update(len.to_le_bytes());
                }
            }
            hash.update(label.to_le_bytes());
            hash.update(ext.as_bytes());
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Starts or resumes the import of plan `digest` into `destination`: true when it resumes an
/// interrupted one. Refuses a destination that holds another plan's journal.
pub fn begin(destination: &Path, digest: &str) -> Result<bool, DatasetError> {
    let journal = destination.join(JOURNAL_FILE);
    match std::fs::read_to_string(&journal) {
        Ok(found) if found.trim() == digest => Ok(true),
        Ok(_) => Err(DatasetError::Format {
            path: destination.to_owned(),
            what: "import destination",
            message: "it holds an interrupted import of another source, options or seed: run \
                      that import again to finish it, or import into another directory"
                .into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(destination).map_err(io(destination))?;
            let temporary = destination.join(format!("{JOURNAL_FILE}.tmp"));
            std::fs::write(&temporary, digest).map_err(io(&temporary))?;
            std::fs::rename(&temporary, &journal).map_err(io(&journal))?;
            Ok(false)
        }
        Err(e) => Err(io(&journal)(e)),
    }
}

/// The import is written and indexed: the journal goes.
pub fn finish(destination: &Path) -> Result<(), DatasetError> {
    let journal = destination.join(JOURNAL_FILE);
    std::fs::remove_file(&journal).map_err(io(&journal))
}

/// What writing a split did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Written {
    pub shards: usize,
    /// Shards an interrupted run had written already, kept as they are.
    pub kept: usize,
    pub bytes: u64,
}

/// Writes `files` into `dir` as shards of `shard_samples`, on `threads` threads, keeping the
/// shards that exist; `progress` is told every image written (or kept).
pub fn write(
    dir: &Path,
    files: &[Planned],
    shard_samples: u32,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Written, DatasetError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let chunks: Vec<&[Planned]> = files.chunks(shard_samples.max(1) as usize).collect();
    let next = AtomicUsize::new(0);
    let (kept, bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
    let abort_after: Option<usize> = std::env::var(ABORT_AFTER_SHARDS)
        .ok()
        .and_then(|n| n.parse().ok());
    let renamed = AtomicUsize::new(0);
    let worker = || -> Result<(), DatasetError> {
        loop {
            let shard = next.fetch_add(1, Ordering::SeqCst);
            let Some(chunk) = chunks.get(shard) else {
                return Ok(());
            };
            let path = dir.join(format!("shard-{shard:06}.tar"));
            if let Ok(existing) = std::fs::metadata(&path) {
                kept.fetch_add(1, Ordering::SeqCst);
                bytes.fetch_add(existing.len(), Ordering::SeqCst);
                progress(chunk.len() as u64);
                continue;
            }
            let first_key = shard * shard_samples as usize;
            bytes.fetch_add(write_one(&path, chunk, first_key)?, Ordering::SeqCst);
            progress(chunk.len() as u64);
            let done = renamed.fetch_add(1, Ordering::SeqCst) + 1;
            if abort_after.is_some_and(|n| done >= n) {
                std::process::abort();
            }
        }
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.clamp(1, chunks.len().max(1)))
            .map(|_| scope.spawn(worker))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an import thread panicked"))
            .collect::<Result<Vec<()>, _>>()
    })?;
    // The renames are durable once the directory is.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(Written {
        shards: chunks.len(),
        kept: kept.into_inner(),
        bytes: bytes.into_inner(),
    })
}

/// Writes one shard under a temporary name, flushes it and renames it; returns its bytes.
fn write_one(path: &Path, chunk: &[Planned], first_key: usize) -> Result<u64, DatasetError> {
    let temporary = path.with_extension("tar.tmp");
    let written = (|| -> std::io::Result<u64> {
        let mut tar = tar::Builder::new(std::fs::File::create(&temporary)?);
        for (i, (file, label, ext)) in chunk.iter().enumerate() {
            let image = file.read(None)?;
            let key = format!("{:08}", first_key + i);
            append(&mut tar, &format!("{key}.{ext}"), &image)?;
            append(
                &mut tar,
                &format!("{key}.cls"),
                label.to_string().as_bytes(),
            )?;
        }
        let file = tar.into_inner()?;
        file.sync_all()?;
        Ok(file.metadata()?.len())
    })();
    match written {
        Ok(len) => {
            std::fs::rename(&temporary, path).map_err(io(path))?;
            Ok(len)
        }
        Err(e) => {
            // A full disk, say: nothing half-written stays behind.
            let _ = std::fs::remove_file(&temporary);
            Err(io(path)(e))
        }
    }
}
