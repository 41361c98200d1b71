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
use ladder_core::dataset::{DatasetError, INDEX_FORMAT, ImageFormat, IndexedSample, ShardIndex};
use ladder_core::indexing::{self, IndexedShard};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub const JOURNAL_FILE: &str = ".import-journal";

/// A test's stand-in for kill -9: the process aborts once it has renamed this many shards.
const ABORT_AFTER_SHARDS: &str = "LADDER_IMPORT_ABORT_AFTER_SHARDS";

/// A tar's end: two zero blocks.
const END_OF_ARCHIVE: u64 = 1024;

/// A ustar member's header: a member's data follows it.
const HEADER: u64 = 512;

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
                Bytes::Streamed {
                    archive,
                    offset,
                    len,
                } => {
                    hash.update(archive.as_os_str().as_encoded_bytes());
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
    /// Images of a compressed archive an interrupted import had written already.
    pub resumed_images: u64,
}

/// Writes `files` into `dir` as shards of `shard_samples`, on `threads` threads, keeping the
/// shards that exist; `progress` is told every image written (or kept). Returns the shards'
/// indexes too, made as they were written (a kept shard's by reading it).
pub fn write(
    dir: &Path,
    files: &[Planned],
    shard_samples: u32,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Written, Vec<IndexedShard>), DatasetError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let chunks: Vec<&[Planned]> = files.chunks(shard_samples.max(1) as usize).collect();
    let next = AtomicUsize::new(0);
    let (kept, bytes) = (AtomicUsize::new(0), AtomicU64::new(0));
    let renames = Renames::default();
    let indexed = std::sync::Mutex::new(Vec::with_capacity(chunks.len()));
    let worker = || -> Result<(), DatasetError> {
        loop {
            let shard = next.fetch_add(1, Ordering::SeqCst);
            let Some(chunk) = chunks.get(shard) else {
                return Ok(());
            };
            let name = shard_name(shard);
            let path = dir.join(&name);
            let first_key = shard * shard_samples as usize;
            let (index, len) = match path.exists() {
                true => {
                    kept.fetch_add(1, Ordering::SeqCst);
                    let samples = chunk
                        .iter()
                        .map(|(bytes, label, ext)| Ok((bytes.size()?, *label, *ext)))
                        .collect::<std::io::Result<Vec<_>>>()
                        .map_err(io(&path))?;
                    kept_index(&path, &name, shard_index(&samples, first_key))?
                }
                false => {
                    let written = write_one(&path, chunk, first_key)?;
                    renames.rename(&path.with_extension("tar.tmp"), &path)?;
                    written
                }
            };
            bytes.fetch_add(len, Ordering::SeqCst);
            indexed.lock().unwrap().push(IndexedShard {
                name,
                index,
                bytes: len,
            });
            progress(chunk.len() as u64);
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
    sync_dir(dir)?;
    let mut indexed = indexed.into_inner().unwrap();
    indexed.sort_by(|a, b| a.name.cmp(&b.name));
    let written = Written {
        shards: chunks.len(),
        kept: kept.into_inner(),
        bytes: bytes.into_inner(),
        resumed_images: 0,
    };
    Ok((written, indexed))
}

/// The file name of shard `number`.
pub fn shard_name(number: usize) -> String {
    format!("shard-{number:06}.tar")
}

/// The index and length of a shard an interrupted import wrote, once checked against what the
/// plan puts there (`planned`: its index and length); read from it.
pub fn kept_index(
    path: &Path,
    name: &str,
    planned: (ShardIndex, u64),
) -> Result<(ShardIndex, u64), DatasetError> {
    let refused = |what: String| DatasetError::Format {
        path: path.to_owned(),
        what: "shard of this import",
        message: format!("{what}: delete it and run the import again"),
    };
    let (index, issues) =
        indexing::index_shard(path, name, None).map_err(|e| refused(e.to_string()))?;
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if issues.is_empty() && (&index, len) == (&planned.0, planned.1) {
        return Ok(planned);
    }
    Err(refused(format!(
        "it holds {} samples in {len} bytes ({} issue(s)), not the {} samples in {} bytes the \
         import's plan puts there",
        index.samples.len(),
        issues.len(),
        planned.0.samples.len(),
        planned.1
    )))
}

/// The index and length of a shard of `samples` (each image's length, label and extension)
/// whose first key is `first_key`: where [`layout`] puts each image.
pub fn shard_index(samples: &[(u64, u32, &'static str)], first_key: usize) -> (ShardIndex, u64) {
    let (offsets, len) = layout(samples.iter().map(|&(len, label, _)| (len, label)));
    let samples = samples
        .iter()
        .zip(offsets)
        .enumerate()
        .map(|(i, (&(size, label, ext), at))| IndexedSample {
            key: sample_key(first_key + i),
            offset: at + HEADER,
            size,
            format: match ext {
                "png" => ImageFormat::Png,
                "webp" => ImageFormat::Webp,
                _ => ImageFormat::Jpeg,
            },
            label,
        })
        .collect();
    let index = ShardIndex {
        format: INDEX_FORMAT.to_owned(),
        samples,
    };
    (index, len)
}

/// Where sample `sample` of a shard [`shard_index`] planned starts: its image's header.
pub fn sample_start(sample: &IndexedSample) -> u64 {
    sample.offset - HEADER
}

fn sample_key(key: usize) -> String {
    format!("{key:08}")
}

/// Writes one shard under a temporary name and flushes it; returns its index and bytes. A
/// shard that fails to write (a full disk) leaves nothing behind.
fn write_one(
    path: &Path,
    chunk: &[Planned],
    first_key: usize,
) -> Result<(ShardIndex, u64), DatasetError> {
    let temporary = path.with_extension("tar.tmp");
    let written = (|| -> std::io::Result<(ShardIndex, u64)> {
        let file = std::fs::File::create(&temporary)?;
        let mut out = std::io::BufWriter::new(&file);
        let mut samples = Vec::with_capacity(chunk.len());
        for (i, (bytes, label, ext)) in chunk.iter().enumerate() {
            let image = bytes.read(None)?;
            out.write_all(&sample_members(first_key + i, ext, *label, &image)?)?;
            samples.push((image.len() as u64, *label, *ext));
        }
        out.write_all(&[0; END_OF_ARCHIVE as usize])?;
        out.flush()?;
        drop(out);
        file.sync_all()?;
        Ok(shard_index(&samples, first_key))
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        io(path)(e)
    })
}

/// The tar members of sample `key` (its image, then its `.cls` label), headers and padding
/// included: what a shard holds of it.
pub fn sample_members(key: usize, ext: &str, label: u32, image: &[u8]) -> std::io::Result<Vec<u8>> {
    let label = label.to_string();
    let mut out = Vec::with_capacity(sample_len(image.len() as u64, &label) as usize);
    for (name, data) in [
        (format!("{}.{ext}", sample_key(key)), image),
        (format!("{}.cls", sample_key(key)), label.as_bytes()),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_path(&name)?;
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    Ok(out)
}

/// The length of [`sample_members`] of an image of `image_len` bytes labelled `label`.
fn sample_len(image_len: u64, label: &str) -> u64 {
    2 * HEADER + image_len.next_multiple_of(512) + (label.len() as u64).next_multiple_of(512)
}

/// Where each sample of a shard of `samples` (image length, label) lies in it, and the
/// shard's length: the layout [`write_one`] writes front to back.
fn layout(samples: impl Iterator<Item = (u64, u32)>) -> (Vec<u64>, u64) {
    let mut at = 0;
    let offsets = samples
        .map(|(len, label)| {
            let offset = at;
            at += sample_len(len, &label.to_string());
            offset
        })
        .collect();
    (offsets, at + END_OF_ARCHIVE)
}

/// Renames whole shards into place, counting them for the test's stand-in for kill -9.
#[derive(Default)]
pub struct Renames(AtomicUsize);

impl Renames {
    pub fn rename(&self, temporary: &Path, path: &Path) -> Result<(), DatasetError> {
        std::fs::rename(temporary, path).map_err(io(path))?;
        let done = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        let abort_after: Option<usize> = std::env::var(ABORT_AFTER_SHARDS)
            .ok()
            .and_then(|n| n.parse().ok());
        if abort_after.is_some_and(|n| done >= n) {
            std::process::abort();
        }
        Ok(())
    }
}

/// Makes the renames in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<(), DatasetError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample's members are what the tar crate's builder writes for them, and lie where the
    /// layout says.
    #[test]
    fn sample_members_are_the_tar_builders_bytes_where_the_layout_puts_them() {
        let images: [&[u8]; 3] = [b"", &[7; 512], &[9; 1000]];
        let labels = [0u32, 17, 123_456];
        let mut tar = tar::Builder::new(Vec::new());
        let mut ours = Vec::new();
        for (i, (image, label)) in images.iter().zip(labels).enumerate() {
            crate::synth::append(&mut tar, &format!("{:08}.jpg", 40 + i), image).unwrap();
            let label_text = label.to_string();
            crate::synth::append(
                &mut tar,
                &format!("{:08}.cls", 40 + i),
                label_text.as_bytes(),
            )
            .unwrap();
            ours.extend(sample_members(40 + i, "jpg", label, image).unwrap());
        }
        ours.extend([0; END_OF_ARCHIVE as usize]);
        assert_eq!(tar.into_inner().unwrap(), ours);
        let (offsets, len) = layout(images.iter().map(|i| i.len() as u64).zip(labels));
        assert_eq!(len, ours.len() as u64);
        for (i, offset) in offsets.iter().enumerate() {
            let members = sample_members(40 + i, "jpg", labels[i], images[i]).unwrap();
            assert_eq!(&ours[*offset as usize..][..members.len()], &members[..]);
        }
    }
}
