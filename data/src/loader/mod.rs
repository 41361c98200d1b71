//! From sample ids to augmented micro-batches.
//!
//! [`Dataset`] opens a manifest and its sample index (memory-mapped, see
//! [`ladder_core::sample_index`]) and reads just the byte ranges a plan names (positional reads,
//! grouped and ordered per shard, neighbours coalesced into one ranged read). [`assemble`] decodes and augments a
//! micro-batch into one buffer ([`crate::batch`]). [`Loader`] works through the plan's requests on a
//! pool of threads ahead of training, delivering in order, with at most `prefetch_bytes` of
//! batches in flight; each request carries its own transform, so a stage switch changes the
//! size with no restart.
//!
//! Bad input never stops training and never mislabels: a sample that cannot be read or decoded,
//! or whose label is out of range, is skipped, counted by reason and reported with its shard and
//! key, and its place in the micro-batch is filled by the next usable sample of the same
//! micro-batch (cyclically), augmented with the skipped sample's own random stream. The result
//! depends only on the plan, so every rank and every rerun fills it the same way, and the
//! micro-batch keeps its shape. A read that fails is first tried again for about 8 s, through a
//! fresh handle, since shared file systems have outages of seconds.
//!
//! Opening a dataset reads its manifest and maps its index, and touches no shard: hundreds of
//! ranks starting at once would otherwise send the metadata server of a shared file system one
//! `stat` per shard each (13,000 for ImageNet-21k). A shard's size is checked against the
//! manifest's when this process first opens it, on the open handle. A shard rewritten after
//! indexing is not bad input but a dataset that is no longer the one indexed: its offsets would
//! misread samples, so the loader stops the run ([`LoadError::ShardChanged`]) rather than skip.

use crate::augment::{TrainTransform, eval_transform, sample_stream};
mod pool;

pub use pool::Loader;

use crate::batch::{HostMemory, PixelFormat, Pixels, plain_memory};
use crate::decode::DecodeError;
use ladder_core::dataset::{DatasetError, ImageFormat, Manifest};
use ladder_core::sample_index::SampleIndex;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

struct Shard {
    name: String,
    path: PathBuf,
    /// Its size in the manifest.
    bytes: u64,
    /// Its file was found to have that size (checked once per process, at its first open).
    checked: AtomicBool,
    /// Opened at the first read (a dataset of 13,000 shards must not hold 13,000 descriptors
    /// before it reads anything); replaced when reads through it fail and one through a fresh
    /// handle works (an NFS handle gone stale); closed when too many are open. Reads go
    /// through a clone of the `Arc`, outside the lock, so that a read that hangs (a dead file
    /// server) holds up no one else.
    file: RwLock<Option<Arc<File>>>,
    /// When a read last failed through every pause: for [`FAIL_FAST_FOR`] after, reads try
    /// once more at once and give up, so that a shard that stays unreadable costs each of its
    /// samples an instant, not the whole wait.
    gave_up: Mutex<Option<Instant>>,
}

/// Pauses before the further tries of a failed read, about 8 s in all: shared file systems
/// (NFS, Lustre) have outages of seconds, which should cost a pause, not samples (or, when a
/// whole micro-batch fails, the job).
const READ_RETRY_PAUSES: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
    Duration::from_secs(5),
];

const FAIL_FAST_FOR: Duration = Duration::from_secs(60);

/// The pauses before the further tries of a failed read from a shard whose reads last gave up
/// at `gave_up`: one more try at once, through a fresh handle, within [`FAIL_FAST_FOR`] of it.
fn pauses_after(gave_up: Option<Instant>) -> &'static [Duration] {
    const AT_ONCE: [Duration; 1] = [Duration::ZERO];
    match gave_up {
        Some(at) if at.elapsed() < FAIL_FAST_FOR => &AT_ONCE,
        _ => &READ_RETRY_PAUSES,
    }
}

impl Shard {
    /// `bytes.len()` bytes at `offset`, tried again through a fresh handle after each of
    /// [`READ_RETRY_PAUSES`] while it fails.
    fn read_at(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
        let file = self.file.read().expect("shard handle lock").clone();
        let first = match file {
            Some(file) => file.read_exact_at(bytes, offset),
            None => self.reopen(bytes, offset),
        };
        if first.is_ok() {
            return first;
        }
        let mut gave_up = self.gave_up.lock().expect("shard state lock");
        let result = retry(first, pauses_after(*gave_up), || self.reopen(bytes, offset));
        *gave_up = result.is_err().then(Instant::now);
        result
    }

    fn is_open(&self) -> bool {
        self.file.read().expect("shard handle lock").is_some()
    }

    /// Reads through a fresh handle, which is kept if the read works. The first handle's file
    /// must have the manifest's size ([`ShardChanged`] otherwise).
    fn reopen(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
        let file = Arc::new(File::open(&self.path)?);
        if !self.checked.load(Ordering::Relaxed) {
            let found = file.metadata()?.len();
            if found != self.bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    ShardChanged {
                        path: self.path.clone(),
                        found,
                        indexed: self.bytes,
                    },
                ));
            }
            self.checked.store(true, Ordering::Relaxed);
        }
        file.read_exact_at(bytes, offset)?;
        *self.file.write().expect("shard handle lock") = Some(file);
        Ok(())
    }
}

/// A shard whose file does not have the size the manifest gives it: rewritten after indexing.
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "{}: it has {found} bytes, the manifest says {indexed}: the shard was rewritten after \
     indexing; re-run `ladder dataset index`",
    path.display()
)]
pub struct ShardChanged {
    pub path: PathBuf,
    pub found: u64,
    pub indexed: u64,
}

/// The [`ShardChanged`] that `error` carries, if it does.
fn shard_changed(error: &std::io::Error) -> Option<&ShardChanged> {
    error.get_ref()?.downcast_ref()
}

/// `first`, or, while the result is an error that a later try may not repeat (not a short read:
/// a truncated shard stays truncated; nor a changed shard), `again` after each pause in turn;
/// the last result.
fn retry(
    first: std::io::Result<()>,
    pauses: &[Duration],
    mut again: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut result = first;
    for pause in pauses {
        match &result {
            Err(e)
                if e.kind() != std::io::ErrorKind::UnexpectedEof && shard_changed(e).is_none() =>
            {
                std::thread::sleep(*pause);
                result = again();
            }
            _ => break,
        }
    }
    result
}

/// The most shard files a dataset keeps open. A rank reads a window of a few shards at a time,
/// but over an epoch it reads from all of them (13,000 for ImageNet-21k): the handles opened
/// longest ago are closed beyond this, and reopened if read again.
pub const MAX_OPEN_SHARDS: usize = 128;

/// An opened dataset: its shards and its sample index.
pub struct Dataset {
    shards: Vec<Shard>,
    /// The shards holding an open file, in the order they opened it.
    open: Mutex<std::collections::VecDeque<usize>>,
    /// Id of each shard's first sample; one extra entry holds the total.
    starts: Vec<u64>,
    index: SampleIndex,
    pub classes: u32,
}

/// One sample's bytes and what the index says about it.
pub struct RawSample {
    pub id: u64,
    pub shard: String,
    pub key: String,
    pub label: u32,
    pub format: ImageFormat,
    pub bytes: std::io::Result<Vec<u8>>,
}

impl Dataset {
    /// Opens the manifest at `path` and its sample index; no shard is touched until it is read.
    pub fn open(path: &Path) -> Result<Dataset, DatasetError> {
        let manifest = Manifest::load(path)?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut shards = Vec::with_capacity(manifest.shards.len());
        let mut starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut total = 0u64;
        for entry in &manifest.shards {
            starts.push(total);
            total += entry.samples as u64;
            shards.push(Shard {
                name: entry.path.clone(),
                path: dir.join(&entry.path),
                bytes: entry.bytes,
                checked: AtomicBool::new(false),
                file: RwLock::new(None),
                gave_up: Mutex::new(None),
            });
        }
        starts.push(total);
        Ok(Dataset {
            shards,
            open: Mutex::new(std::collections::VecDeque::new()),
            starts,
            index: SampleIndex::open(&dir, &manifest)?,
            classes: manifest.classes,
        })
    }

    /// The dataset at `path`, opened once per process and kept: a job's generations (and
    /// jobs on the same data) share it, so a recovery maps and checks nothing again. It is
    /// opened again when its manifest changed (re-indexed) since.
    pub fn open_shared(path: &Path) -> Result<Arc<Dataset>, DatasetError> {
        type Opened = BTreeMap<PathBuf, ((u64, Option<std::time::SystemTime>), Arc<Dataset>)>;
        static OPENED: Mutex<Opened> = Mutex::new(BTreeMap::new());
        let metadata = std::fs::metadata(path).map_err(|source| DatasetError::Io {
            path: path.to_owned(),
            source,
        })?;
        let stamp = (metadata.len(), metadata.modified().ok());
        let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, dataset)) = opened.get(path)
            && *seen == stamp
        {
            return Ok(dataset.clone());
        }
        let dataset = Arc::new(Dataset::open(path)?);
        opened.insert(path.to_owned(), (stamp, dataset.clone()));
        Ok(dataset)
    }

    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Samples per shard, in manifest order (what the sample plan is built from).
    pub fn shard_sizes(&self) -> Vec<u32> {
        self.starts
            .windows(2)
            .map(|w| (w[1] - w[0]) as u32)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the samples `ids`, in that order, and counts the read calls. Reads go per shard
    /// in file order, and neighbours in a shard (at most [`COALESCE_GAP`] apart) share one
    /// ranged read of up to [`MAX_READ`] bytes, so a shared file system sees few, large,
    /// sequential reads where the plan puts neighbours together (a shuffle block).
    pub fn read(&self, ids: &[u64]) -> (Vec<RawSample>, ReadCount) {
        // (shard, offset, end, position), in file order.
        let mut order: Vec<(usize, u64, u64, usize)> = ids
            .iter()
            .enumerate()
            .map(|(position, &id)| {
                assert!(id < self.len(), "sample {id} is beyond the dataset");
                let shard = self.starts.partition_point(|&s| s <= id) - 1;
                let entry = self.index.get(id);
                let offset = entry.offset;
                (shard, offset, offset + entry.size, position)
            })
            .collect();
        order.sort_unstable();
        let mut out: Vec<Option<RawSample>> = (0..ids.len()).map(|_| None).collect();
        let mut count = ReadCount::default();
        let mut at = 0;
        while at < order.len() {
            let (shard, start, mut end, _) = order[at];
            // Take neighbours while the gap and the read's size allow.
            let mut next = at + 1;
            while let Some(&(s, offset, until, _)) = order.get(next) {
                if s != shard || offset > end + COALESCE_GAP || until.max(end) - start > MAX_READ {
                    break;
                }
                end = end.max(until);
                next += 1;
            }
            self.read_run(&order[at..next], ids, &mut out, &mut count);
            at = next;
        }
        let samples = out
            .into_iter()
            .map(|s| s.expect("every position read"))
            .collect();
        (samples, count)
    }

    /// One ranged read for the samples `members` (shard, offset, end, position: one shard, in
    /// file order), from the first one's offset to the furthest end. If it fails, each member
    /// is read on its own: one bad range costs only its own samples, as without coalescing.
    fn read_run(
        &self,
        members: &[(usize, u64, u64, usize)],
        ids: &[u64],
        out: &mut [Option<RawSample>],
        count: &mut ReadCount,
    ) {
        let (shard, start) = (members[0].0, members[0].1);
        let end = members
            .iter()
            .map(|m| m.2)
            .max()
            .expect("a run has members");
        let s = &self.shards[shard];
        let mut read = |offset: u64, until: u64| {
            let mut bytes = vec![0u8; (until - offset) as usize];
            count.calls += 1;
            count.bytes += until - offset;
            let was_open = s.is_open();
            let result = s.read_at(&mut bytes, offset);
            if !was_open && s.is_open() {
                self.opened(shard);
            }
            result.map(|()| bytes)
        };
        let whole = read(start, end);
        let mut sample = |position: usize, bytes| {
            let entry = self.index.get(ids[position]);
            out[position] = Some(RawSample {
                id: ids[position],
                shard: s.name.clone(),
                key: entry.key.to_owned(),
                label: entry.label,
                format: entry.format,
                bytes,
            });
        };
        match (whole, members) {
            (whole, &[(_, _, _, position)]) => sample(position, whole),
            (Ok(buffer), members) => {
                for &(_, offset, until, position) in members {
                    let bytes =
                        buffer[(offset - start) as usize..(until - start) as usize].to_vec();
                    sample(position, Ok(bytes));
                }
            }
            (Err(_), members) => {
                for &(_, offset, until, position) in members {
                    sample(position, read(offset, until));
                }
            }
        }
    }

    /// `shard` keeps a new handle: the handles opened longest ago beyond [`MAX_OPEN_SHARDS`]
    /// are closed (each once the reads through it end). No shard's lock is held while this
    /// takes the list's, and no lock is held during a read.
    fn opened(&self, shard: usize) {
        let mut open = self.open.lock().expect("open shards lock");
        open.retain(|&s| s != shard);
        open.push_back(shard);
        while open.len() > MAX_OPEN_SHARDS {
            let oldest = open.pop_front().expect("more than the maximum");
            *self.shards[oldest].file.write().expect("shard handle lock") = None;
        }
    }
}

/// Neighbouring samples of a shard at most this far apart are read with one call; the bytes
/// between (in a WebDataset tar, the next member's header and the label member: about 1.5 KiB)
/// are read and dropped. 16 KiB costs less to read than a round trip to a network file system.
pub const COALESCE_GAP: u64 = 16 << 10;
/// The most one coalesced read asks for (a sample larger than this is read whole).
pub const MAX_READ: u64 = 8 << 20;

/// The read calls that reading some samples made, and the bytes they read (gaps included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCount {
    pub calls: u64,
    pub bytes: u64,
}

/// Why a sample was left out of its micro-batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    Unreadable(String),
    Undecodable(DecodeError),
    LabelOutOfRange { label: u32, classes: u32 },
}

impl SkipReason {
    /// A short name to count skips by (a metric label value).
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::Unreadable(_) => "unreadable",
            SkipReason::Undecodable(DecodeError::Empty) => "empty",
            SkipReason::Undecodable(_) => "undecodable",
            SkipReason::LabelOutOfRange { .. } => "label_out_of_range",
        }
    }
}

/// A skipped sample, with where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub id: u64,
    pub shard: String,
    pub key: String,
    pub reason: SkipReason,
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match &self.reason {
            SkipReason::Unreadable(e) => format!("cannot read: {e}"),
            SkipReason::Undecodable(e) => format!("cannot decode: {e}"),
            SkipReason::LabelOutOfRange { label, classes } => {
                format!("label {label} is out of range for {classes} classes")
            }
        };
        write!(
            f,
            "{}: {} (sample {}): {why}; skipped",
            self.shard, self.key, self.id
        )
    }
}

/// How a micro-batch's images are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Transform {
    Train(TrainTransform),
    /// Center crop at this size.
    Eval(u32),
}

impl Transform {
    pub fn size(&self) -> u32 {
        match self {
            Transform::Train(t) => t.size,
            Transform::Eval(size) => *size,
        }
    }
}

/// What to assemble: the samples of one micro-batch and how.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRequest {
    pub ids: Vec<u64>,
    pub seed: u64,
    pub epoch: u32,
    pub transform: Transform,
    /// How the pixels are handed over (for the trainer's device).
    pub pixels: PixelFormat,
    /// Labels must be below this.
    pub classes: u32,
}

/// A finished micro-batch: its images in the request's [`PixelFormat`].
#[derive(Debug)]
pub struct MicroBatch {
    /// The requested samples, in order (a skipped one's place holds another's pixels).
    pub ids: Vec<u64>,
    pub images: Pixels,
    pub labels: Vec<i64>,
    pub size: u32,
    pub skipped: Vec<Skip>,
    /// What reading its samples cost.
    pub reads: ReadCount,
}

#[derive(Debug, thiserror::Error)]
#[error("no sample of the micro-batch could be used:\n  {}", .0.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("\n  "))]
pub struct NothingUsable(pub Vec<Skip>);

/// Why the loader has no micro-batch to give.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    NothingUsable(#[from] NothingUsable),
    /// A thread of the data path panicked (a bug, never bad input): the run must stop with
    /// it rather than wait for a batch that never comes.
    #[error("the data path failed: {0}")]
    Panicked(String),
    #[error(transparent)]
    ShardChanged(ShardChanged),
}

/// Reads, decodes and augments one micro-batch.
pub fn assemble(dataset: &Dataset, request: &BatchRequest) -> Result<MicroBatch, LoadError> {
    assemble_into(dataset, request, &plain_memory())
}

/// [`assemble`], the bytes of a [`PixelFormat::Bytes`] batch in `memory`'s buffers.
pub fn assemble_into(
    dataset: &Dataset,
    request: &BatchRequest,
    memory: &HostMemory,
) -> Result<MicroBatch, LoadError> {
    let (raw, reads) = dataset.read(&request.ids);
    let changed = raw
        .iter()
        .find_map(|sample| sample.bytes.as_ref().err().and_then(shard_changed));
    if let Some(changed) = changed {
        return Err(LoadError::ShardChanged(changed.clone()));
    }
    let size = request.transform.size();
    let plane = 3 * size as usize * size as usize;
    let decode = |sample: &RawSample, stream_id: u64| -> Result<crate::image::Image, SkipReason> {
        if sample.label >= request.classes {
            return Err(SkipReason::LabelOutOfRange {
                label: sample.label,
                classes: request.classes,
            });
        }
        let bytes = sample
            .bytes
            .as_ref()
            .map_err(|e| SkipReason::Unreadable(e.to_string()))?;
        let result = match request.transform {
            Transform::Train(t) => {
                let mut rng = sample_stream(request.seed, request.epoch, stream_id);
                t.apply(bytes, sample.format, &mut rng)
            }
            Transform::Eval(size) => eval_transform(bytes, sample.format, size),
        };
        result.map_err(SkipReason::Undecodable)
    };
    let mut images = Pixels::new(request.pixels, raw.len(), plane, memory);
    let mut labels = vec![0i64; raw.len()];
    let mut skipped = Vec::new();
    let mut failed = Vec::new();
    for (position, sample) in raw.iter().enumerate() {
        match decode(sample, sample.id) {
            Ok(image) => {
                images.place(request.pixels, position, &image);
                labels[position] = sample.label as i64;
            }
            Err(reason) => {
                skipped.push(Skip {
                    id: sample.id,
                    shard: sample.shard.clone(),
                    key: sample.key.clone(),
                    reason,
                });
                failed.push(position);
            }
        }
    }
    if failed.len() == raw.len() {
        return Err(NothingUsable(skipped).into());
    }
    // Fill each skipped place from the next usable sample, cyclically, seen through the skipped
    // sample's own random stream.
    for &position in &failed {
        let donor = (1..raw.len())
            .map(|step| (position + step) % raw.len())
            .find(|p| !failed.contains(p))
            .expect("some sample is usable");
        let image =
            decode(&raw[donor], raw[position].id).or_else(|_| decode(&raw[donor], raw[donor].id));
        let image = image.expect("the donor decoded once already");
        images.place(request.pixels, position, &image);
        labels[position] = raw[donor].label as i64;
    }
    Ok(MicroBatch {
        ids: request.ids.clone(),
        images,
        labels,
        size,
        skipped,
        reads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn every_skip_reason_is_one_the_metrics_count() {
        let reasons = [
            SkipReason::Unreadable("gone".into()),
            SkipReason::Undecodable(DecodeError::Empty),
            SkipReason::Undecodable(DecodeError::Jpeg("truncated".into())),
            SkipReason::LabelOutOfRange {
                label: 9,
                classes: 3,
            },
        ];
        let kinds: Vec<&str> = reasons.iter().map(SkipReason::kind).collect();
        assert_eq!(kinds, ladder_core::dataset::SKIP_REASONS);
    }

    #[test]
    fn a_failed_read_is_tried_again_after_each_pause_but_a_short_one_is_final() {
        let pauses = [Duration::ZERO; 3];
        let failing = |kind| Err(Error::new(kind, "no"));
        // An outage shorter than the pauses costs nothing.
        let mut tries = 0;
        let outage = retry(failing(ErrorKind::Other), &pauses, || {
            tries += 1;
            if tries < 2 {
                failing(ErrorKind::Other)
            } else {
                Ok(())
            }
        });
        assert!(outage.is_ok());
        assert_eq!(tries, 2);
        // A longer one gives the last error after every pause.
        tries = 0;
        let gone = retry(failing(ErrorKind::Other), &pauses, || {
            tries += 1;
            failing(ErrorKind::NotFound)
        });
        assert_eq!(gone.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(tries, 3);
        // A truncated shard stays truncated: no further try.
        tries = 0;
        let short = retry(failing(ErrorKind::UnexpectedEof), &pauses, || {
            tries += 1;
            Ok(())
        });
        assert_eq!(short.unwrap_err().kind(), ErrorKind::UnexpectedEof);
        assert_eq!(tries, 0);
        assert!(retry(Ok(()), &pauses, || unreachable!()).is_ok());
    }

    #[test]
    fn a_shard_that_gave_up_lately_fails_fast_then_waits_again() {
        assert_eq!(pauses_after(None), READ_RETRY_PAUSES);
        assert_eq!(pauses_after(Some(Instant::now())), [Duration::ZERO]);
        if let Some(long_ago) = Instant::now().checked_sub(FAIL_FAST_FOR * 2) {
            assert_eq!(pauses_after(Some(long_ago)), READ_RETRY_PAUSES);
        }
    }
}
