//! Dataset manifest and shard index: the one description of a WebDataset that coordinator and
//! worker share.
//!
//! A dataset is a directory of WebDataset tar shards: members named `KEY.EXT`, where the members
//! of one sample share `KEY` (the path up to the first dot of the file name) and sit next to
//! each other. A training sample is an image (`jpg`, `jpeg`, `png` or `webp`) and a class label
//! (`cls`, an ASCII integer). Indexing ([`crate::indexing`]: `ladder dataset index DIR`) writes,
//! next to each `NAME.tar`, an index `NAME.idx.json` (each sample's key, image offset, size and
//! format, and label) and, in `DIR`, `manifest.json` (the shards in order, their sample counts
//! and sizes, the class count) and `samples.idx`, all the shard indexes in one compact,
//! memory-mapped table ([`crate::sample_index`]). The coordinator plans from the manifest; a
//! worker reads just the byte ranges its plan names.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST_FORMAT: &str = "ladder-manifest/1";

/// Why a sample is skipped while training, as it is counted everywhere (the worker's and the
/// coordinator's metrics): it cannot be read, it is empty, it does not decode, or its label is
/// out of range.
pub const SKIP_REASONS: [&str; 4] = ["unreadable", "empty", "undecodable", "label_out_of_range"];
pub const INDEX_FORMAT: &str = "ladder-shard-index/1";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub classes: u32,
    pub total_samples: u64,
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The tar file, relative to the manifest's directory.
    pub path: String,
    /// Its index, relative to the manifest's directory.
    pub index: String,
    pub samples: u32,
    /// The tar's size when indexed: a shard rewritten since is detected, not misread.
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Jpeg,
    Png,
    Webp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedSample {
    pub key: String,
    /// Byte offset of the image's data inside the tar.
    pub offset: u64,
    pub size: u64,
    pub format: ImageFormat,
    pub label: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub samples: Vec<IndexedSample>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a Ladder {what}: {message}")]
    Format {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("{dir}: no .tar shards found")]
    NoShards { dir: PathBuf },
    #[error("{count} shard(s) could not be indexed:\n  {}", errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    BadShards {
        count: usize,
        errors: Vec<DatasetError>,
    },
    #[error(
        "{dir} already holds a dataset ({shards} shard(s)): write into a new or empty \
         directory, so that old and new shards are not indexed together"
    )]
    NotEmpty { dir: PathBuf, shards: usize },
    #[error("{path}: not a readable tar archive (after {members} good member(s)): {message}")]
    BadTar {
        path: PathBuf,
        members: usize,
        message: String,
    },
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The largest manifest read: ImageNet-21k's (13,000 shards) is about 2 MB. A path named in
/// a submitted spec is read by the coordinator, so `/dev/zero` must not be read to the end.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

impl Manifest {
    /// Reads and checks the manifest at `path`, which must be a regular file (a FIFO or a
    /// device named in a spec must not block or flood the reader) of at most
    /// [`MAX_MANIFEST_BYTES`].
    pub fn load(path: &Path) -> Result<Manifest, DatasetError> {
        let bad = |message: String| DatasetError::Format {
            path: path.to_owned(),
            what: "dataset manifest",
            message,
        };
        let text = match crate::files::read_small_file(path, MAX_MANIFEST_BYTES) {
            Ok(text) => text,
            Err(crate::files::SmallFileError::Io(e)) => return Err(io_error(path)(e)),
            Err(crate::files::SmallFileError::TooLarge { .. }) => {
                return Err(bad(format!(
                    "larger than {} MiB: not a manifest `ladder dataset index` wrote",
                    MAX_MANIFEST_BYTES >> 20
                )));
            }
            Err(e) => return Err(bad(e.to_string())),
        };
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {MANIFEST_FORMAT:?}",
                manifest.format
            )));
        }
        let sum: u64 = manifest.shards.iter().map(|s| s.samples as u64).sum();
        if sum != manifest.total_samples {
            return Err(bad(format!(
                "total_samples is {} but the shards hold {sum}",
                manifest.total_samples
            )));
        }
        if manifest.shards.is_empty() {
            return Err(bad("it lists no shards".into()));
        }
        Ok(manifest)
    }

    pub fn shard_sizes(&self) -> Vec<u32> {
        self.shards.iter().map(|s| s.samples).collect()
    }
}

impl ShardIndex {
    pub fn load(path: &Path) -> Result<ShardIndex, DatasetError> {
        let text = std::fs::read_to_string(path).map_err(io_error(path))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| DatasetError::Format {
            path: path.to_owned(),
            what: "shard index",
            message: e.to_string(),
        })?;
        if index.format != INDEX_FORMAT {
            return Err(DatasetError::Format {
                path: path.to_owned(),
                what: "shard index",
                message: format!("format is {:?}, expected {INDEX_FORMAT:?}", index.format),
            });
        }
        Ok(index)
    }
}
