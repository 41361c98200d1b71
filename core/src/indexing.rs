//! Indexing a directory of shards ([`crate::dataset`]'s layout): each shard's index, read from
//! its headers and labels ([`index_shard`]), or known by the writer that put every sample where
//! it is ([`write_indexes`]); then the compact sample index ([`crate::sample_index`]) and the
//! manifest, written last, since the manifest is what makes the dataset whole.

use crate::dataset::{
    DatasetError, INDEX_FORMAT, ImageFormat, IndexedSample, MANIFEST_FILE, MANIFEST_FORMAT,
    Manifest, ShardEntry, ShardIndex, io_error,
};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

/// Why a member or sample of a shard was left out of the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueKind {
    MissingLabel,
    BadLabel(String),
    LabelOutOfRange { label: u32, classes: u32 },
    MissingImage,
    UnknownExtension(String),
    DuplicateMember(String),
    NotAFile,
}

impl fmt::Display for IssueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IssueKind::MissingLabel => write!(f, "no .cls label; sample skipped"),
            IssueKind::BadLabel(text) => {
                write!(f, ".cls holds {text:?}, not a class number; sample skipped")
            }
            IssueKind::LabelOutOfRange { label, classes } => write!(
                f,
                "label {label} is out of range for {classes} classes; sample skipped"
            ),
            IssueKind::MissingImage => write!(f, "no .jpg, .jpeg or .png image; sample skipped"),
            IssueKind::UnknownExtension(ext) if ext.is_empty() => {
                write!(f, "member name has no .EXT; ignored")
            }
            IssueKind::UnknownExtension(ext) => write!(f, "member .{ext} is not used; ignored"),
            IssueKind::DuplicateMember(ext) => {
                write!(f, "second .{ext} member for this key; ignored")
            }
            IssueKind::NotAFile => write!(f, "not a regular file; ignored"),
        }
    }
}

/// A problem found while indexing, with where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub shard: String,
    pub key: String,
    pub kind: IssueKind,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.shard, self.key, self.kind)
    }
}

/// The result of indexing a directory of shards.
#[derive(Debug)]
pub struct IndexReport {
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
    pub issues: Vec<Issue>,
}

#[derive(Default)]
struct PendingSample {
    image: Option<(u64, u64, ImageFormat)>,
    label: Option<Result<u32, String>>,
    /// The `label` field of a `.json` member: the label when no `.cls` gives one.
    json_label: Option<Result<u32, String>>,
}

/// The largest `.json` member read for its label: metadata of a few hundred bytes in
/// practice.
const MAX_JSON_MEMBER: u64 = 64 << 10;

/// Splits a member name into WebDataset's key and extension (`a/b.c.d` -> `a/b`, `c.d`).
fn split_member_name(name: &str) -> Option<(&str, &str)> {
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[file_start..].find('.')? + file_start;
    if dot == file_start {
        return None;
    }
    Some((&name[..dot], &name[dot + 1..]))
}

/// Remembers whether the tar reader ran into the end of the file. The tar crate ends its entries
/// quietly both at the end-of-archive marker and at a plain end of file; only the second means
/// the shard was cut short, and a cut that falls between members leaves every member readable,
/// so without this the shard would silently index fewer samples than it was written with.
pub struct EofProbe<R> {
    inner: R,
    hit_eof: bool,
}

impl<R> EofProbe<R> {
    pub fn new(inner: R) -> EofProbe<R> {
        EofProbe {
            inner,
            hit_eof: false,
        }
    }

    /// Whether a read found the end of the file: after a tar's entries ended, that it ended
    /// without its end-of-archive marker.
    pub fn hit_eof(&self) -> bool {
        self.hit_eof
    }
}

impl<R: Read> Read for EofProbe<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hit_eof |= n == 0 && !buf.is_empty();
        Ok(n)
    }
}

/// Seeking past the images' data: indexing a shard reads its headers and labels, not its
/// images (a terabyte of the hub's shards is indexed in place by reading a few GB).
impl<R: io::Seek> io::Seek for EofProbe<R> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

/// Indexes one tar shard. Sample-level problems become issues; only an unreadable archive is an
/// error. `classes`, when known, bounds the labels.
pub fn index_shard(
    path: &Path,
    shard_name: &str,
    classes: Option<u32>,
) -> Result<(ShardIndex, Vec<Issue>), DatasetError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut archive = tar::Archive::new(EofProbe::new(BufReader::new(file)));
    let mut order: Vec<String> = Vec::new();
    let mut pending: HashMap<String, PendingSample> = HashMap::new();
    let mut issues = Vec::new();
    let mut issue = |key: &str, kind: IssueKind| {
        issues.push(Issue {
            shard: shard_name.to_owned(),
            key: key.to_owned(),
            kind,
        })
    };
    // The tar reader quotes the bytes it choked on: shown escaped and cut short, never raw to
    // a terminal.
    let bad_tar = |members: usize, message: String| {
        const SHOWN: usize = 160;
        let escaped = message.escape_debug().to_string();
        let message = match escaped.char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("{}...", &escaped[..cut]),
            None => escaped,
        };
        DatasetError::BadTar {
            path: path.to_owned(),
            members,
            message,
        }
    };
    let mut members = 0;
    let entries = archive
        .entries_with_seek()
        .map_err(|e| bad_tar(0, e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_tar(members, e.to_string()))?;
        members += 1;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if !kind.is_file() {
            issue(&name, IssueKind::NotAFile);
            continue;
        }
        let Some((key, ext)) = split_member_name(&name) else {
            issue(&name, IssueKind::UnknownExtension(String::new()));
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        let key = key.to_owned();
        if !pending.contains_key(&key) {
            order.push(key.clone());
        }
        let sample = pending.entry(key.clone()).or_default();
        let format = match ext.as_str() {
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            "png" => Some(ImageFormat::Png),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        };
        if let Some(format) = format {
            if sample.image.is_some() {
                issue(&key, IssueKind::DuplicateMember(ext));
            } else {
                sample.image = Some((entry.raw_file_position(), entry.size(), format));
            }
        } else if ext == "cls" {
            if sample.label.is_some() {
                issue(&key, IssueKind::DuplicateMember(ext));
                continue;
            }
            // A label is a short number: 64 bytes are plenty to show what a bad one holds.
            // A read error is the archive's fault, not the label's.
            let mut bytes = Vec::new();
            (&mut entry)
                .take(64)
                .read_to_end(&mut bytes)
                .map_err(|e| bad_tar(members - 1, e.to_string()))?;
            let text = String::from_utf8_lossy(&bytes);
            let trimmed = text.trim();
            sample.label = Some(trimmed.parse::<u32>().map_err(|_| trimmed.to_owned()));
        } else if ext == "json" {
            // Metadata beside the image (the hub's shards carry it): its `label` field labels
            // a sample that has no `.cls`.
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_JSON_MEMBER)
                .read_to_end(&mut bytes)
                .map_err(|e| bad_tar(members - 1, e.to_string()))?;
            let label = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("label").cloned());
            sample.json_label = label.map(|label| {
                label
                    .as_u64()
                    .and_then(|l| u32::try_from(l).ok())
                    .ok_or_else(|| format!("json label {label}"))
            });
        } else {
            issue(&key, IssueKind::UnknownExtension(ext));
        }
    }
    if archive.into_inner().hit_eof {
        return Err(bad_tar(
            members,
            "the file ends without the end-of-archive marker: the shard is cut short".into(),
        ));
    }
    let mut samples = Vec::with_capacity(order.len());
    for key in order {
        let sample = pending.remove(&key).expect("every ordered key is pending");
        let Some((offset, size, format)) = sample.image else {
            issue(&key, IssueKind::MissingImage);
            continue;
        };
        let label = match sample.label.or(sample.json_label) {
            None => {
                issue(&key, IssueKind::MissingLabel);
                continue;
            }
            Some(Err(text)) => {
                issue(&key, IssueKind::BadLabel(text));
                continue;
            }
            Some(Ok(label)) => label,
        };
        if let Some(classes) = classes.filter(|&c| label >= c) {
            issue(&key, IssueKind::LabelOutOfRange { label, classes });
            continue;
        }
        samples.push(IndexedSample {
            key,
            offset,
            size,
            format,
            label,
        });
    }
    Ok((
        ShardIndex {
            format: INDEX_FORMAT.to_owned(),
            samples,
        },
        issues,
    ))
}

/// The index file that belongs to `NAME.tar`: `NAME.idx.json`.
pub fn index_name(shard_name: &str) -> String {
    let stem = shard_name.strip_suffix(".tar").unwrap_or(shard_name);
    format!("{stem}.idx.json")
}

fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<(), DatasetError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(value).expect("index types always serialize");
    std::fs::write(&tmp, bytes).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Fails when `dir` holds shards already: a tool writing a dataset there would mix its shards
/// with them (and `index_dir` takes every `*.tar`).
pub fn ensure_no_shards(dir: &Path) -> Result<(), DatasetError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let shards = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
        .count();
    if shards > 0 {
        return Err(DatasetError::NotEmpty {
            dir: dir.to_owned(),
            shards,
        });
    }
    Ok(())
}

/// Indexes every `*.tar` in `dir` (in name order) and writes the indexes and the manifest.
/// Unreadable shards fail the whole command, naming each, and no manifest is written: a
/// manifest that silently missed a shard would train on less data than the user thinks.
pub fn index_dir(dir: &Path, classes: Option<u32>) -> Result<IndexReport, DatasetError> {
    // A directory entry that cannot be read fails the command: skipping it could skip a shard.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let name = entry.map_err(io_error(dir))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tar") {
            names.push(name.into_owned());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(DatasetError::NoShards {
            dir: dir.to_owned(),
        });
    }
    // Shards are read on several threads at once: on a shared file system each of a shard's
    // header reads waits on the network, and a terabyte of the hub's shards is thousands of them.
    let threads = crate::storage_threads().min(names.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let index_one = |name: &String| -> Result<(IndexedShard, Vec<Issue>), DatasetError> {
        let path = dir.join(name);
        let (index, issues) = index_shard(&path, name, classes)?;
        let bytes = std::fs::metadata(&path).map_err(io_error(&path))?.len();
        let name = name.clone();
        Ok((IndexedShard { name, index, bytes }, issues))
    };
    let mut indexed: Vec<(usize, _)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(name) = names.get(i) else {
                            return mine;
                        };
                        mine.push((i, index_one(name)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    indexed.sort_by_key(|(i, _)| *i);
    let mut shards = Vec::with_capacity(names.len());
    let mut issues = Vec::new();
    let mut errors = Vec::new();
    for (_, result) in indexed {
        match result {
            Ok((shard, shard_issues)) => {
                issues.extend(shard_issues);
                shards.push(shard);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(DatasetError::BadShards {
            count: errors.len(),
            errors,
        });
    }
    write_indexes(dir, shards, issues, classes)
}

/// A shard of a dataset and its index.
pub struct IndexedShard {
    /// The tar's file name in the dataset's directory.
    pub name: String,
    pub index: ShardIndex,
    /// The tar's size.
    pub bytes: u64,
}

/// Writes the indexes of `shards` (in name order) in `dir`, the compact sample index and the
/// manifest; `issues` are what indexing them found. A writer that knows where it put every
/// sample (the import) indexes its shards without reading them again.
pub fn write_indexes(
    dir: &Path,
    shards: Vec<IndexedShard>,
    issues: Vec<Issue>,
    classes: Option<u32>,
) -> Result<IndexReport, DatasetError> {
    let mut entries = Vec::with_capacity(shards.len());
    let mut indexes = Vec::with_capacity(shards.len());
    let mut max_label = None;
    for IndexedShard { name, index, bytes } in shards {
        max_label = index.samples.iter().map(|s| s.label).chain(max_label).max();
        let index_file = index_name(&name);
        write_json_atomically(&dir.join(&index_file), &index)?;
        entries.push(ShardEntry {
            path: name,
            index: index_file,
            samples: index.samples.len() as u32,
            bytes,
        });
        indexes.push(index.samples);
    }
    let shards = entries;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        classes: classes.unwrap_or_else(|| max_label.map_or(0, |m| m + 1)),
        total_samples: shards.iter().map(|s| s.samples as u64).sum(),
        shards,
    };
    // The compact index first: the manifest, written last, is what makes the dataset whole
    // (and an index left from before it is refused for not matching it).
    crate::sample_index::SampleIndex::write(
        &dir.join(crate::sample_index::SAMPLE_INDEX_FILE),
        &manifest,
        indexes.iter().map(Vec::as_slice),
    )?;
    let manifest_path = dir.join(MANIFEST_FILE);
    write_json_atomically(&manifest_path, &manifest)?;
    Ok(IndexReport {
        manifest_path,
        manifest,
        issues,
    })
}
