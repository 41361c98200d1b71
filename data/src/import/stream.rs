//! A compressed tar of per-synset tars (`winter21_whole.tar.gz` as downloaded) imported as a
//! stream, with nothing unpacked to disk. gzip cannot be read out of order, so the import
//! reads the archive twice, front to back each time, on a thread of its own that inflates it
//! while the import's threads work on what it read:
//!
//! 1. [`list`] finds every image's place in the uncompressed stream, its length and its
//!    verdict (format by its first bytes; decoded whole with `--verify`), judged as its bytes
//!    pass by. The plan (classes, split, shuffle, shards) is then made from this listing as
//!    from any other source's.
//! 2. [`write`] writes the plan. A shard's layout follows from its images' lengths (each
//!    sample's members are as long as its image, padded, plus headers), so every image's place
//!    in its shard is known before a byte is written: each shard's temporary file is made its
//!    final length, and each image written at its place as it passes by, in the archive's
//!    order. A shard is renamed once its last image is in; its bytes are those written front
//!    to back in the plan's order, the bytes a `.tar` import of the same archive writes.
//!
//! Resuming: every [`CHECKPOINT_SECONDS`] (after a synset tar) the shards written so far are
//! flushed and `DEST/.import-stream` records how far into the stream every image is on disk.
//! The same command run again lists the archive again (the journal refuses another plan),
//! keeps the renamed shards, passes over the images before that point without writing them,
//! and writes the others at the same places: what a kill -9 interrupted after the last
//! checkpoint is written again, byte for byte the same.

use super::shards::{self, Planned, Renames, Written};
use super::sources::{self, Bytes, Listing};
use super::{in_parallel, io, verdict};
use ladder_core::dataset::DatasetError;
use ladder_core::indexing::{EofProbe, IndexedShard};
use std::io::Read;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How far into the stream an interrupted import's images are on disk.
pub const CHECKPOINT_FILE: &str = ".import-stream";

/// The largest outer member read into memory (of which a few are at once): a synset tar of
/// ImageNet-21k holds at most a few thousand images, well under this; a larger one is left out
/// (and reported), not allowed to exhaust the memory.
const LARGEST_MEMBER: u64 = 4 << 30;

/// Seconds between checkpoints (30 unless set; tests set 0: one after every synset tar).
pub const CHECKPOINT_SECONDS: &str = "LADDER_IMPORT_CHECKPOINT_SECONDS";

/// Whether `source` is a gzip file, by its first bytes (whatever its name).
pub fn is_compressed(source: &Path) -> bool {
    let mut magic = [0; 2];
    std::fs::File::open(source)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| magic == [0x1f, 0x8b])
}

fn format_error(source: &Path, message: String) -> DatasetError {
    DatasetError::Format {
        path: source.to_owned(),
        what: "compressed archive",
        message,
    }
}

/// Lists the compressed tar of per-synset tars `source` (pass 1 of the module's doc), judging
/// every image as it passes by; `progress` is told the compressed bytes read and the total.
pub fn list(
    source: &Path,
    labels: Option<&Path>,
    verify: bool,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Listing, DatasetError> {
    if labels.is_some() {
        return Err(format_error(
            source,
            "--labels goes with a tar of images, read in place: `gunzip` this one first".into(),
        ));
    }
    let archive: Arc<Path> = source.into();
    let mut listing = Listing::default();
    let synset_tar = |name: &str, _, _| sources::synset(name).is_some();
    each_entry(source, &synset_tar, progress, |entry| {
        let where_ = format!("{}:{}", source.display(), entry.name);
        let (Some(class), Some(bytes)) = (sources::synset(&entry.name), &entry.bytes) else {
            listing.skipped.push(match entry.len > LARGEST_MEMBER {
                true => format!(
                    "{where_}: {} GB, larger than a synset tar can be ({} GB); left out",
                    entry.len >> 30,
                    LARGEST_MEMBER >> 30
                ),
                false => format!("{where_}: not a per-synset tar; left out"),
            });
            return Ok(ControlFlow::Continue(()));
        };
        let first = listing.images.len();
        let tar = std::io::Cursor::new(&bytes[..]);
        let listed = sources::members(tar, entry.offset, entry.len);
        sources::synset_tar(&mut listing, listed, &where_, class, |offset, len| {
            Bytes::Streamed {
                archive: archive.clone(),
                offset,
                len,
            }
        });
        let added = &mut listing.images[first..];
        let verdicts = in_parallel(added, if verify { threads } else { 1 }, |found| {
            let Bytes::Streamed { offset, len, .. } = found.bytes else {
                unreachable!("a streamed synset tar's images are streamed")
            };
            let start = (offset - entry.offset) as usize;
            verdict(found.file_name(), &bytes[start..][..len as usize], verify)
        });
        for (found, verdict) in added.iter_mut().zip(verdicts) {
            found.examined = Some(verdict);
        }
        Ok(ControlFlow::Continue(()))
    })?;
    if listing.images.is_empty() && !listing.skipped.is_empty() {
        return Err(format_error(
            source,
            "it holds no per-synset tars: a compressed tar of images is read with --labels \
             once gunzipped"
                .into(),
        ));
    }
    sources::finish(listing)
}

/// An image's place in a shard.
struct Slot {
    /// Where its bytes start in the uncompressed stream.
    offset: u64,
    len: u64,
    shard: usize,
    at: u64,
    key: usize,
    label: u32,
    ext: &'static str,
}

/// A shard being written: its temporary file, and how many of its images are still to come.
struct Shard {
    path: PathBuf,
    temporary: PathBuf,
    missing: AtomicUsize,
}

/// Writes the plan of the compressed archive `source` (pass 2 of the module's doc): each
/// split's images (all streamed from `source`) into shards of `shard_samples` in its
/// directory, on `threads` threads, resuming from `destination`'s checkpoint when `resumed`;
/// `progress` is told every image written or found on disk. Returns each split's shards'
/// indexes too, made from the plan (a kept shard's by reading it).
pub fn write(
    source: &Path,
    destination: &Path,
    splits: &[(PathBuf, &[Planned])],
    shard_samples: u32,
    threads: usize,
    resumed: bool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Written, Vec<Vec<IndexedShard>>), DatasetError> {
    let checkpoint = destination.join(CHECKPOINT_FILE);
    let on_disk = match resumed {
        true => read_checkpoint(&checkpoint)?,
        // One left by an abandoned import (its journal deleted) is not this import's.
        false => match std::fs::remove_file(&checkpoint) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(&checkpoint)(e));
            }
            _ => 0,
        },
    };
    let mut written = Written::default();
    let mut indexes = Vec::new();
    let mut shards = Vec::new();
    let mut slots = Vec::new();
    for (dir, files) in splits {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut split = Vec::new();
        for (number, chunk) in files.chunks(shard_samples.max(1) as usize).enumerate() {
            let name = shards::shard_name(number);
            let path = dir.join(&name);
            let samples: Vec<_> = chunk
                .iter()
                .map(|(bytes, label, ext)| (streamed(bytes).1, *label, *ext))
                .collect();
            let first_key = number * shard_samples as usize;
            let (index, len) = shards::shard_index(&samples, first_key);
            written.shards += 1;
            written.bytes += len;
            if path.exists() {
                let (index, _) = shards::kept_index(&path, &name, (index, len))?;
                split.push(IndexedShard {
                    index,
                    name,
                    bytes: len,
                });
                written.kept += 1;
                progress(chunk.len() as u64);
                continue;
            }
            let temporary = path.with_extension("tar.tmp");
            if on_disk > 0 && !temporary.exists() {
                return Err(checkpoint_error(
                    &checkpoint,
                    format!(
                        "says images are on disk in {}, which is gone: delete {} to write \
                         the unfinished shards from the start",
                        temporary.display(),
                        checkpoint.display()
                    ),
                ));
            }
            // Bytes of a temporary file are this import's only below its checkpoint.
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(on_disk == 0)
                .write(true)
                .open(&temporary)
                .and_then(|file| file.set_len(len))
                .map_err(io(&temporary))?;
            for (i, ((bytes, label, ext), planned)) in chunk.iter().zip(&index.samples).enumerate()
            {
                let (offset, len) = streamed(bytes);
                slots.push(Slot {
                    offset,
                    len,
                    shard: shards.len(),
                    at: shards::sample_start(planned),
                    key: first_key + i,
                    label: *label,
                    ext,
                });
            }
            shards.push(Shard {
                path,
                temporary,
                missing: AtomicUsize::new(chunk.len()),
            });
            split.push(IndexedShard {
                index,
                name,
                bytes: len,
            });
        }
        split.sort_by(|a, b| a.name.cmp(&b.name));
        indexes.push(split);
    }
    slots.sort_by_key(|slot| slot.offset);
    let renames = Renames::default();
    let done = |shard: &Shard| -> Result<(), DatasetError> {
        std::fs::File::open(&shard.temporary)
            .and_then(|file| file.sync_all())
            .map_err(io(&shard.temporary))?;
        renames.rename(&shard.temporary, &shard.path)
    };
    let first = slots.partition_point(|slot| slot.offset < on_disk);
    for slot in &slots[..first] {
        if shards[slot.shard].missing.fetch_sub(1, Ordering::SeqCst) == 1 {
            done(&shards[slot.shard])?;
        }
    }
    progress(first as u64);
    written.resumed_images = first as u64;
    let every = Duration::from_secs(
        std::env::var(CHECKPOINT_SECONDS)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let mut last_checkpoint = Instant::now();
    let mut next = first;
    let not_on_disk = |_: &str, start: u64, len: u64| start + len > on_disk;
    let stream = |entry: Entry| {
        let end = entry.offset + entry.len;
        let start = next;
        while next < slots.len() && slots[next].offset < end {
            next += 1;
        }
        let work = &slots[start..next];
        let bytes = match &entry.bytes {
            Some(bytes) => bytes,
            None if work.is_empty() => return Ok(ControlFlow::Continue(())),
            None => return Err(changed(source, &entry, &work[0])),
        };
        if let Some(moved) = work
            .iter()
            .find(|slot| slot.offset < entry.offset || slot.offset + slot.len > end)
        {
            return Err(changed(source, &entry, moved));
        }
        let wrote = in_parallel(work, threads, |slot| {
            let shard = &shards[slot.shard];
            let from = (slot.offset - entry.offset) as usize;
            let image = &bytes[from..][..slot.len as usize];
            shards::sample_members(slot.key, slot.ext, slot.label, image)
                .and_then(|members| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&shard.temporary)?
                        .write_all_at(&members, slot.at)
                })
                .map_err(io(&shard.temporary))?;
            if shard.missing.fetch_sub(1, Ordering::SeqCst) == 1 {
                done(shard)?;
            }
            Ok(())
        });
        wrote
            .into_iter()
            .collect::<Result<Vec<()>, DatasetError>>()?;
        progress(work.len() as u64);
        if next == slots.len() {
            return Ok(ControlFlow::Break(())); // the rest of the stream holds none
        }
        if last_checkpoint.elapsed() >= every {
            save_checkpoint(&checkpoint, splits, end)?;
            last_checkpoint = Instant::now();
        }
        Ok(ControlFlow::Continue(()))
    };
    if first < slots.len() {
        each_entry(source, &not_on_disk, &|_, _| {}, stream)?;
    }
    if next < slots.len() {
        return Err(format_error(
            source,
            format!(
                "it ends before {} of the images its listing found: did it change since the \
                 import began?",
                slots.len() - next
            ),
        ));
    }
    for (dir, _) in splits {
        shards::sync_dir(dir)?;
    }
    match std::fs::remove_file(&checkpoint) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&checkpoint)(e)),
        _ => Ok((written, indexes)),
    }
}

/// Where a planned image of a compressed archive lies in its uncompressed stream, and its length.
fn streamed(bytes: &Bytes) -> (u64, u64) {
    match bytes {
        Bytes::Streamed { offset, len, .. } => (*offset, *len),
        _ => unreachable!("a compressed archive's images are streamed"),
    }
}

fn checkpoint_error(checkpoint: &Path, message: String) -> DatasetError {
    DatasetError::Format {
        path: checkpoint.to_owned(),
        what: "import checkpoint",
        message,
    }
}

/// The archive does not hold what its listing found: `slot`'s image is not inside `entry`.
fn changed(source: &Path, entry: &Entry, slot: &Slot) -> DatasetError {
    format_error(
        source,
        format!(
            "an image listed at {} ({} bytes) is not inside {} ({} bytes from {}) as read now: \
             did it change since the import began?",
            slot.offset, slot.len, entry.name, entry.len, entry.offset
        ),
    )
}

/// How far into the stream the images are on disk (0 before the first checkpoint).
fn read_checkpoint(checkpoint: &Path) -> Result<u64, DatasetError> {
    match std::fs::read_to_string(checkpoint) {
        Ok(text) => text.trim().parse().map_err(|_| {
            checkpoint_error(
                checkpoint,
                format!("{text:?} is not an offset: delete the file to start the writing over"),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io(checkpoint)(e)),
    }
}

/// Flushes every shard written to (with one `syncfs` per split's file system: the thousands of
/// shards an ImageNet-21k import writes to between two checkpoints would cost one fsync each),
/// then records that every image before `offset` is on disk.
fn save_checkpoint(
    checkpoint: &Path,
    splits: &[(PathBuf, &[Planned])],
    offset: u64,
) -> Result<(), DatasetError> {
    for (dir, _) in splits {
        let flushed = std::fs::File::open(dir).and_then(|d| {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the call.
            match unsafe { libc::syncfs(d.as_raw_fd()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        flushed.map_err(io(dir))?;
    }
    let temporary = checkpoint.with_extension("tmp");
    std::fs::write(&temporary, offset.to_string())
        .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
        .map_err(io(&temporary))?;
    std::fs::rename(&temporary, checkpoint).map_err(io(checkpoint))
}

/// An outer member of the archive.
struct Entry {
    name: String,
    /// Where its data starts in the uncompressed stream.
    offset: u64,
    len: u64,
    /// Its data, when wanted and no larger than [`LARGEST_MEMBER`].
    bytes: Option<Vec<u8>>,
}

/// The compressed file's bytes, counted as they are read.
struct Counted<'a> {
    file: std::fs::File,
    read: &'a AtomicU64,
    size: u64,
    progress: &'a (dyn Fn(u64, u64) + Sync),
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        let read = self.read.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        (self.progress)(read, self.size);
        Ok(n)
    }
}

/// Streams the outer tar of the compressed archive `source` on a thread of its own and hands
/// `consume` each regular-file member in order, read whole when `wanted` wants it (given its
/// name, where its data starts in the uncompressed stream, and its length), until `consume`
/// breaks off. A tar that ends without its end-of-archive marker was cut short: an error.
/// `progress` is told the compressed bytes read and the file's size.
fn each_entry(
    source: &Path,
    wanted: &(dyn Fn(&str, u64, u64) -> bool + Sync),
    progress: &(dyn Fn(u64, u64) + Sync),
    mut consume: impl FnMut(Entry) -> Result<ControlFlow<()>, DatasetError>,
) -> Result<(), DatasetError> {
    let file = std::fs::File::open(source).map_err(io(source))?;
    let size = file.metadata().map_err(io(source))?.len();
    let read = AtomicU64::new(0);
    let (sender, entries) = std::sync::mpsc::sync_channel::<std::io::Result<Entry>>(1);
    let counted = Counted {
        file,
        read: &read,
        size,
        progress,
    };
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let inflated = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(
                1 << 20,
                counted,
            ));
            let mut tar = tar::Archive::new(EofProbe::new(inflated));
            let streamed = (|| -> std::io::Result<()> {
                for entry in tar.entries()? {
                    let mut entry = entry?;
                    if !entry.header().entry_type().is_file() {
                        continue;
                    }
                    let name = entry.path()?.to_string_lossy().into_owned();
                    let (offset, len) = (entry.raw_file_position(), entry.size());
                    let mut bytes = None;
                    if len <= LARGEST_MEMBER && wanted(&name, offset, len) {
                        let mut data = Vec::new();
                        if entry.read_to_end(&mut data)? as u64 != len {
                            return Err(cut_short(&name));
                        }
                        bytes = Some(data);
                    }
                    let entry = Entry {
                        name,
                        offset,
                        len,
                        bytes,
                    };
                    if sender.send(Ok(entry)).is_err() {
                        return Ok(()); // the import stopped reading
                    }
                }
                match tar.into_inner().hit_eof() {
                    true => Err(cut_short("the archive")),
                    false => Ok(()),
                }
            })();
            if let Err(e) = streamed {
                let _ = sender.send(Err(e));
            }
        });
        for entry in entries {
            let entry = entry.map_err(|e| {
                format_error(
                    source,
                    format!(
                        "it breaks after {:.1} MB of its {:.1} MB ({e}): a truncated or \
                         corrupt download? (`gzip -t` checks it)",
                        read.load(Ordering::Relaxed) as f64 / 1e6,
                        size as f64 / 1e6
                    ),
                )
            })?;
            if consume(entry)?.is_break() {
                break;
            }
        }
        Ok(())
    })
}

fn cut_short(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("{what} is cut short"),
    )
}
