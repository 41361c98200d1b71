//! Each job's scalars as TensorBoard event files: one run per job, in
//! `checkpoint.dir/JOB/tensorboard/`, written by the coordinator from rank 0's progress reports
//! and the ranks' heartbeats (loss, learning rate, images/s, image size, top-1/top-5 at each
//! evaluation, each rank's data-wait share), so that `tensorboard --logdir checkpoint.dir`
//! shows every job.
//!
//! The file follows the model's history: when a generation restores from step S, the records
//! after S are cut off before the next ones are appended, so no step shows twice and none runs
//! backwards, across generations, resumes and coordinator restarts (a restarted coordinator
//! appends to the job's file; a step reported again replaces what followed it).
//!
//! The format is TensorBoard's: TFRecord framing (length, masked CRC-32C of the length, an
//! `Event` protocol buffer, its masked CRC-32C) of `Event { wall_time = 1, step = 2,
//! file_version = 3 | summary = 5 }`, `Summary { repeated Value value = 1 }` and `Value { tag
//! = 1, simple_value = 2 }`. Files are written by one thread, off every lock; a failure is
//! logged (once per job until it clears), never felt by training.
//!
//! Workers write in the job's directory too (rank 0 writes its checkpoints there), and the
//! worker token sits on every node: a link planted there must not lead the coordinator to
//! cut another file. The event file is opened without following a link, and written only if
//! the file opened lies in `checkpoint.dir/JOB/tensorboard` itself.

use prometheus_client::metrics::counter::Counter;
use prost::Message;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: the event framed and checksummed.
fn record(event: &Event) -> Vec<u8> {
    let data = event.encode_to_vec();
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(&masked_crc(&data).to_le_bytes());
    out
}

/// The next record of `reader` and its length in bytes, or `None` where the records end: at
/// the end, or at a record cut short or not checking out (a write the process did not finish).
fn next_record(reader: &mut impl Read) -> Option<(Event, u64)> {
    let mut head = [0u8; 12];
    reader.read_exact(&mut head).ok()?;
    let length: [u8; 8] = head[..8].try_into().expect("8 bytes");
    if masked_crc(&length).to_le_bytes() != head[8..12] {
        return None;
    }
    let n = u64::from_le_bytes(length);
    // No event of ours is near this size: a length this large is damage, not a record.
    if n > MAX_RECORD_BYTES {
        return None;
    }
    let mut data = vec![0u8; n as usize + 4];
    reader.read_exact(&mut data).ok()?;
    let (data, crc) = data.split_at(n as usize);
    if masked_crc(data).to_le_bytes() != crc {
        return None;
    }
    let event = Event::decode(data).ok()?;
    Some((event, 16 + n))
}

/// The largest record read back.
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// The events of `bytes` with the byte offset each ends at (see [`next_record`]).
#[cfg(test)]
fn read_records(bytes: &[u8]) -> Vec<(Event, u64)> {
    let mut reader = bytes;
    let mut at = 0;
    std::iter::from_fn(|| {
        let (event, length) = next_record(&mut reader)?;
        at += length;
        Some((event, at))
    })
    .collect()
}

/// Whether `file` (opened from `dir`, which is `ROOT/JOB/tensorboard`) lies in that directory
/// with no link below `ROOT` on the way: the path the kernel opened, against `ROOT`'s real path
/// joined with the two names.
fn lies_in(file: &File, dir: &Path) -> std::io::Result<()> {
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let expected = match dir.ancestors().nth(2) {
        Some(root) if !root.as_os_str().is_empty() => root
            .canonicalize()?
            .join(dir.strip_prefix(root).expect("an ancestor of dir")),
        _ => dir.canonicalize()?,
    };
    if opened.parent() == Some(expected.as_path()) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "the event file opened in {} is {}: a link in the job's directory leads elsewhere; \
             not written (remove the link)",
            dir.display(),
            opened.display()
        )))
    }
}

/// What the writer is told.
pub enum Note {
    /// Scalars of global step `step` (`tag`, value), reported at wall-clock `wall_ms`.
    Scalars {
        job: String,
        dir: PathBuf,
        step: u64,
        wall_ms: i64,
        values: Vec<(String, f32)>,
    },
    /// A new generation restores from global step `step`: what came after it goes.
    RollBack {
        job: String,
        dir: PathBuf,
        step: u64,
    },
    /// The job ended: its file is closed (and opened again should it train again).
    Close { job: String },
}

/// Every this many records a run marks where one starts: a roll-back reads at most this many
/// records from the mark before its step, never the whole file.
const MARK_EVERY: usize = 64;

/// A job's open event file.
struct Run {
    file: File,
    path: PathBuf,
    /// The newest step written.
    last_step: u64,
    /// The step and start of every [`MARK_EVERY`]th record, in file order (steps only grow
    /// along the file).
    marks: Vec<(u64, u64)>,
    /// Records since the last mark.
    unmarked: usize,
    /// The file's length: where the next record goes.
    end: u64,
}

impl Run {
    /// The job's event file in `dir`: the one there (its unfinished tail cut off), or a new
    /// one. Read once, whole, to find its records.
    fn open(dir: &Path) -> std::io::Result<Run> {
        std::fs::create_dir_all(dir)?;
        let existing = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("events.out.tfevents.") && n.ends_with(".ladder")
                })
            })
            .min();
        let path = existing.unwrap_or_else(|| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            dir.join(format!("events.out.tfevents.{now}.ladder"))
        });
        let file = File::options()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        lies_in(&file, dir)?;
        // A hard link made in the directory is the same file as one elsewhere (the store, say):
        // cutting it would cut that one.
        let links = std::os::unix::fs::MetadataExt::nlink(&file.metadata()?);
        if links > 1 {
            return Err(std::io::Error::other(format!(
                "the event file {} has {links} links: it is also another file; not written \
                 (remove it)",
                path.display()
            )));
        }
        let mut run = Run {
            file,
            path,
            last_step: 0,
            marks: Vec::new(),
            unmarked: 0,
            end: 0,
        };
        run.keep_from(0, u64::MAX)?;
        if run.end == 0 {
            run.append(&Event {
                wall_time: wall_seconds(crate::clock::now_ms()),
                step: 0,
                what: Some(What::FileVersion("brain.Event:2".to_owned())),
            })?;
        }
        Ok(run)
    }

    /// Cuts the file after the last record of a step up to `step`, reading from the mark
    /// before it.
    fn cut_after(&mut self, step: u64) -> std::io::Result<()> {
        if step >= self.last_step {
            return Ok(());
        }
        let marked = self.marks.partition_point(|&(s, _)| s <= step);
        let from = match marked {
            0 => 0,
            i => self.marks[i - 1].1,
        };
        self.keep_from(from, step)
    }

    /// Reads the records from offset `from` (where one starts), keeps those of steps up to
    /// `step` (and the file's version record) and cuts the file after the last kept (and any
    /// unfinished tail).
    fn keep_from(&mut self, from: u64, step: u64) -> std::io::Result<()> {
        self.marks.retain(|&(_, start)| start < from);
        self.unmarked = 0;
        self.file.seek(SeekFrom::Start(from))?;
        let mut reader = std::io::BufReader::new(&self.file);
        let mut at = from;
        let mut kept = Vec::new();
        while let Some((event, length)) = next_record(&mut reader) {
            let version = matches!(event.what, Some(What::FileVersion(_)));
            if !version && event.step as u64 > step {
                break;
            }
            kept.push((event.step as u64, at));
            at += length;
        }
        drop(reader);
        for (step, start) in kept {
            self.mark(step, start);
        }
        if at != self.file.metadata()?.len() {
            self.file.set_len(at)?;
        }
        self.end = at;
        Ok(())
    }

    /// Counts a record of `step` starting at `start`, the newest.
    fn mark(&mut self, step: u64, start: u64) {
        if self.unmarked == 0 {
            self.marks.push((step, start));
        }
        self.unmarked = (self.unmarked + 1) % MARK_EVERY;
        self.last_step = step;
    }

    fn append(&mut self, event: &Event) -> std::io::Result<()> {
        let bytes = record(event);
        self.file.write_all(&bytes)?;
        self.mark(event.step as u64, self.end);
        self.end += bytes.len() as u64;
        Ok(())
    }
}

fn wall_seconds(ms: i64) -> f64 {
    ms as f64 / 1e3
}

/// The writer thread's end of things: what it was told, applied in order.
#[derive(Default)]
struct Writer {
    runs: BTreeMap<String, Run>,
    /// Jobs whose last write failed: logged once until one succeeds.
    failing: BTreeMap<String, String>,
}

impl Writer {
    fn run(&mut self, job: &str, dir: &Path) -> std::io::Result<&mut Run> {
        if self.runs.get(job).is_none_or(|r| !r.path.starts_with(dir)) {
            self.runs.insert(job.to_owned(), Run::open(dir)?);
        }
        Ok(self.runs.get_mut(job).expect("opened"))
    }

    fn apply(&mut self, note: Note) {
        let (job, result) = match note {
            Note::Scalars {
                job,
                dir,
                step,
                wall_ms,
                values,
            } => {
                let result = self.run(&job, &dir).and_then(|run| {
                    if step <= run.last_step {
                        // Reported again (by a generation that went on through a coordinator
                        // restart): it replaces what followed.
                        run.cut_after(step.saturating_sub(1))?;
                    }
                    run.append(&Event {
                        wall_time: wall_seconds(wall_ms),
                        step: step as i64,
                        what: Some(What::Summary(Summary {
                            value: values
                                .into_iter()
                                .map(|(tag, simple_value)| Value { tag, simple_value })
                                .collect(),
                        })),
                    })
                });
                (job, result)
            }
            Note::RollBack { job, dir, step } => {
                let result = self.run(&job, &dir).and_then(|run| run.cut_after(step));
                (job, result)
            }
            Note::Close { job } => {
                self.runs.remove(&job);
                self.failing.remove(&job);
                return;
            }
        };
        match result {
            Ok(()) => {
                if self.failing.remove(&job).is_some() {
                    tracing::info!(job = %job, "TensorBoard events are written again");
                }
            }
            Err(e) => {
                self.runs.remove(&job);
                let e = e.to_string();
                if self.failing.get(&job) != Some(&e) {
                    tracing::warn!(job = %job, "cannot write TensorBoard events (training goes on): {e}");
                    self.failing.insert(job, e);
                }
            }
        }
    }
}

/// The most notes waiting for the writer: a slow or hung file system (where checkpoints live)
/// must not grow the coordinator's memory; notes past it are dropped, and counted.
pub const QUEUED_NOTES: usize = 4096;

/// Where to send [`Note`]s: a thread writes them.
#[derive(Clone)]
pub struct Events {
    notes: mpsc::SyncSender<Note>,
    dropped: Counter,
}

impl Events {
    /// Starts the writer; notes it has no room for count in `dropped`.
    pub fn start(dropped: Counter) -> Events {
        let (tx, rx) = mpsc::sync_channel::<Note>(QUEUED_NOTES);
        std::thread::Builder::new()
            .name("tensorboard".into())
            .spawn(move || {
                let mut writer = Writer::default();
                for note in rx {
                    writer.apply(note);
                }
            })
            .expect("starting the TensorBoard writer thread");
        Events { notes: tx, dropped }
    }

    /// Hands `note` to the writer, never waiting for it.
    pub fn send(&self, note: Note) {
        // The writer thread lives as long as the process: the queue can only be full.
        if let Err(mpsc::TrySendError::Full(_)) = self.notes.try_send(note) {
            self.dropped.inc();
        }
    }
}

/// A job's event directory: `checkpoint.dir/JOB/tensorboard`.
pub fn dir(checkpoint_root: &Path, job: &str) -> Option<PathBuf> {
    ladder_core::location::job_dir(checkpoint_root, job)
        .ok()
        .map(|d| d.join("tensorboard"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(job: &str, dir: &Path, step: u64) -> Note {
        Note::Scalars {
            job: job.into(),
            dir: dir.into(),
            step,
            wall_ms: step as i64 * 1000,
            values: vec![("loss".into(), step as f32)],
        }
    }

    fn steps(dir: &Path) -> Vec<i64> {
        let file = std::fs::read_dir(dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        read_records(&std::fs::read(file).unwrap())
            .into_iter()
            .filter(|(e, _)| matches!(e.what, Some(What::Summary(_))))
            .map(|(e, _)| e.step)
            .collect()
    }

    #[test]
    fn a_roll_back_cuts_the_file_and_a_restart_appends_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("tb");
        let mut writer = Writer::default();
        for step in 1..=10 {
            writer.apply(scalars("j", &events, step));
        }
        writer.apply(Note::RollBack {
            job: "j".into(),
            dir: events.clone(),
            step: 6,
        });
        writer.apply(scalars("j", &events, 8));
        assert_eq!(steps(&events), [1, 2, 3, 4, 5, 6, 8]);
        // A coordinator restarted: a new writer appends to the same file; a step reported
        // again replaces what followed it; an unfinished record at the end is cut off.
        let file = std::fs::read_dir(&events)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap()
            .write_all(&record(&Event::default())[..7])
            .unwrap();
        let mut restarted = Writer::default();
        restarted.apply(scalars("j", &events, 5));
        restarted.apply(scalars("j", &events, 9));
        assert_eq!(steps(&events), [1, 2, 3, 4, 5, 9]);
        assert_eq!(std::fs::read_dir(&events).unwrap().count(), 1);
    }

    #[test]
    fn a_link_planted_in_the_jobs_directory_leads_the_writer_nowhere() {
        let root = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("store.redb");
        std::fs::write(&victim, b"the coordinator's records").unwrap();
        let mut writer = Writer::default();
        // The event file is a link to another file.
        let events = dir(root.path(), "job-000001").unwrap();
        std::fs::create_dir_all(&events).unwrap();
        std::os::unix::fs::symlink(&victim, events.join("events.out.tfevents.0.ladder")).unwrap();
        writer.apply(scalars("job-000001", &events, 1));
        // The events directory is a link to another directory holding such a file.
        let job = root.path().join("job-000002");
        std::fs::create_dir_all(&job).unwrap();
        let planted = elsewhere.path().join("tensorboard");
        std::fs::create_dir(&planted).unwrap();
        std::fs::hard_link(&victim, planted.join("events.out.tfevents.0.ladder")).unwrap();
        std::os::unix::fs::symlink(&planted, job.join("tensorboard")).unwrap();
        let events = dir(root.path(), "job-000002").unwrap();
        writer.apply(scalars("job-000002", &events, 1));
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"the coordinator's records",
            "not cut nor appended to"
        );
        assert_eq!(writer.failing.len(), 2, "{:?}", writer.failing);
        assert!(
            writer.failing["job-000002"].contains("leads elsewhere"),
            "{:?}",
            writer.failing
        );
        // A checkpoint.dir reached through a link of the operator's own is fine.
        let linked_root = elsewhere.path().join("checkpoints");
        std::os::unix::fs::symlink(root.path(), &linked_root).unwrap();
        let events = dir(&linked_root, "job-000003").unwrap();
        writer.apply(scalars("job-000003", &events, 1));
        assert_eq!(steps(&events), [1]);
    }

    #[test]
    fn a_record_that_does_not_check_out_ends_the_file() {
        let bytes = record(&Event {
            wall_time: 1.5,
            step: 3,
            what: Some(What::FileVersion("brain.Event:2".into())),
        });
        assert_eq!(read_records(&bytes).len(), 1);
        let mut corrupt = bytes.clone();
        corrupt[20] ^= 1;
        assert!(read_records(&corrupt).is_empty());
    }

    #[test]
    fn a_roll_back_reads_from_the_mark_before_its_step_not_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("tb");
        let mut writer = Writer::default();
        for step in 1..=1000 {
            writer.apply(scalars("j", &events, step));
        }
        // Damage a record near the start: a roll-back that read the file from there would stop
        // at it and cut everything after.
        let file = std::fs::read_dir(&events)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[300] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        writer.apply(Note::RollBack {
            job: "j".into(),
            dir: events.clone(),
            step: 990,
        });
        writer.apply(scalars("j", &events, 991));
        let mut unharmed = std::fs::read(&file).unwrap();
        unharmed[300] ^= 0xff;
        let steps: Vec<i64> = read_records(&unharmed)
            .into_iter()
            .filter(|(e, _)| matches!(e.what, Some(What::Summary(_))))
            .map(|(e, _)| e.step)
            .collect();
        assert_eq!(steps, (1..=991).collect::<Vec<_>>());
    }

    #[test]
    fn an_event_file_with_another_name_elsewhere_is_not_written() {
        let root = tempfile::tempdir().unwrap();
        let victim = root.path().join("store.redb");
        std::fs::write(&victim, b"the coordinator's records").unwrap();
        let events = dir(root.path(), "job-000001").unwrap();
        std::fs::create_dir_all(&events).unwrap();
        std::fs::hard_link(&victim, events.join("events.out.tfevents.0.ladder")).unwrap();
        let mut writer = Writer::default();
        writer.apply(scalars("job-000001", &events, 1));
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"the coordinator's records"
        );
        assert!(
            writer.failing["job-000001"].contains("has 2 links"),
            "{:?}",
            writer.failing
        );
    }

    #[test]
    fn an_ended_jobs_file_is_closed_and_notes_past_the_queue_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::default();
        writer.apply(scalars("j", dir.path(), 1));
        assert_eq!(writer.runs.len(), 1);
        writer.apply(Note::Close { job: "j".into() });
        assert!(writer.runs.is_empty(), "its file is closed");
        writer.apply(scalars("j", dir.path(), 2));
        assert_eq!(
            steps(dir.path()),
            [1, 2],
            "and opened again if it trains again"
        );

        let dropped = Counter::default();
        let (notes, _writer_is_stuck) = mpsc::sync_channel(QUEUED_NOTES);
        let events = Events {
            notes,
            dropped: dropped.clone(),
        };
        for step in 0..QUEUED_NOTES as u64 + 10 {
            events.send(scalars("j", dir.path(), step));
        }
        assert_eq!(dropped.get(), 10);
    }
}
