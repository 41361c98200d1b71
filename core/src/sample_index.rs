//! The compact index of a whole dataset: every sample's shard offset, size, format, label and
//! key in one file beside the manifest (`samples.idx`), memory-mapped read-only, so that the
//! ranks of a node share its pages through the page cache and a process opens ImageNet-21k's
//! 13 million samples in a fraction of a second, with no per-sample allocation.
//!
//! Layout (little-endian):
//!
//! ```text
//! header (64 bytes)  "LADDERIX", version u32 = 1, record size u32 = 24, samples u64,
//!                    shards u32, 0 u32, manifest digest u64, key bytes u64,
//!                    body CRC-32C u32, 0 u32, header CRC-32C u32, 0 u32
//! records            per sample, in manifest order (shard by shard, in each shard's order):
//!                    offset u64, size u32, label u32, key start u32, key length u16,
//!                    format u8 (0 JPEG, 1 PNG), 0 u8
//! keys               the keys, back to back (UTF-8)
//! ```
//!
//! The manifest digest ties the index to the shards it describes (their paths, sample counts
//! and sizes): a shard re-indexed without it is refused, as is a file cut short or one whose
//! checksums do not hold. Every record is checked against its shard's size when the table is
//! made (written, or built from JSON indexes, which anyone may have edited), so no read is ever
//! sized from a bad entry; a written file's checksum and digest keep it so.
//!
//! Datasets indexed before this file existed keep working: [`SampleIndex::open`] builds the
//! same table in memory from the per-shard JSON indexes when `samples.idx` is absent, and
//! `ladder dataset index DIR` writes it.

use crate::dataset::{DatasetError, ImageFormat, IndexedSample, Manifest, ShardIndex};
use std::path::{Path, PathBuf};

pub const SAMPLE_INDEX_FILE: &str = "samples.idx";

const MAGIC: &[u8; 8] = b"LADDERIX";
const VERSION: u32 = 1;
const HEADER: usize = 64;
const RECORD: usize = 24;

/// One sample as the index tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample<'a> {
    pub key: &'a str,
    pub offset: u64,
    pub size: u64,
    pub format: ImageFormat,
    pub label: u32,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

/// Every sample of a dataset, by global id (manifest order).
pub struct SampleIndex {
    bytes: Bytes,
    samples: u64,
    keys_start: usize,
    /// Where the table came from: the index file, or the JSON indexes it was built from.
    pub source: PathBuf,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// What ties an index to its manifest's shards: their paths, sample counts and sizes.
fn manifest_digest(manifest: &Manifest) -> u64 {
    let mut text = String::new();
    for shard in &manifest.shards {
        text.push_str(&format!(
            "{}\0{}\0{}\n",
            shard.path, shard.samples, shard.bytes
        ));
    }
    // Two CRC-32Cs of different seeds make a 64-bit digest; nothing adversarial is defended
    // against here, only a stale index.
    (u64::from(crc32c::crc32c(text.as_bytes())) << 32)
        | u64::from(crc32c::crc32c_append(0x4c41_4444, text.as_bytes()))
}

/// The index file's bytes for `manifest`'s shards, whose indexes `shards` gives in order.
fn encode<'a>(
    manifest: &Manifest,
    shards: impl IntoIterator<Item = &'a [IndexedSample]>,
) -> Result<Vec<u8>, String> {
    let samples = manifest.total_samples;
    let mut records = Vec::with_capacity(samples as usize * RECORD);
    let mut keys = Vec::new();
    let mut listed = manifest.shards.iter();
    let mut count = 0u64;
    for shard in shards {
        let entry = listed
            .next()
            .ok_or_else(|| "more shard indexes than the manifest lists".to_owned())?;
        if shard.len() != entry.samples as usize {
            return Err(format!(
                "the index of {} lists {} samples, the manifest says {}",
                entry.path,
                shard.len(),
                entry.samples
            ));
        }
        for s in shard {
            if s.offset
                .checked_add(s.size)
                .is_none_or(|end| end > entry.bytes)
            {
                return Err(format!(
                    "{} says sample {:?} runs to byte {} of {} ({} bytes): re-run `ladder \
                     dataset index`",
                    entry.index,
                    crate::cut(&s.key),
                    s.offset as u128 + s.size as u128,
                    entry.path,
                    entry.bytes
                ));
            }
            let key_start = u32::try_from(keys.len())
                .map_err(|_| "the keys take more than 4 GiB".to_owned())?;
            let key_len = u16::try_from(s.key.len())
                .map_err(|_| format!("key {:?} is longer than 65,535 bytes", crate::cut(&s.key)))?;
            let size = u32::try_from(s.size)
                .map_err(|_| format!("sample {:?} is larger than 4 GiB", crate::cut(&s.key)))?;
            records.extend_from_slice(&s.offset.to_le_bytes());
            records.extend_from_slice(&size.to_le_bytes());
            records.extend_from_slice(&s.label.to_le_bytes());
            records.extend_from_slice(&key_start.to_le_bytes());
            records.extend_from_slice(&key_len.to_le_bytes());
            records.push(match s.format {
                ImageFormat::Jpeg => 0,
                ImageFormat::Png => 1,
                ImageFormat::Webp => 2,
            });
            records.push(0);
            keys.extend_from_slice(s.key.as_bytes());
            count += 1;
        }
    }
    if count != samples {
        return Err(format!(
            "the shard indexes hold {count} samples, the manifest says {samples}"
        ));
    }
    let body_crc = crc32c::crc32c_append(crc32c::crc32c(&records), &keys);
    let mut out = Vec::with_capacity(HEADER + records.len() + keys.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(RECORD as u32).to_le_bytes());
    out.extend_from_slice(&samples.to_le_bytes());
    out.extend_from_slice(&(manifest.shards.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&manifest_digest(manifest).to_le_bytes());
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    out.extend_from_slice(&body_crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let header_crc = crc32c::crc32c(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER);
    out.extend_from_slice(&records);
    out.extend_from_slice(&keys);
    Ok(out)
}

impl SampleIndex {
    /// Writes the index of `manifest`'s shards (their indexes in `shards`, in order) to
    /// `path`, through a temporary file renamed into place.
    pub fn write<'a>(
        path: &Path,
        manifest: &Manifest,
        shards: impl IntoIterator<Item = &'a [IndexedSample]>,
    ) -> Result<(), DatasetError> {
        let bytes = encode(manifest, shards).map_err(|message| DatasetError::Format {
            path: path.to_owned(),
            what: "sample index",
            message,
        })?;
        let io = |source| DatasetError::Io {
            path: path.to_owned(),
            source,
        };
        let temporary = path.with_extension("idx.tmp");
        std::fs::write(&temporary, &bytes).map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)
    }

    /// The index of the dataset whose manifest is `manifest` (read from `dir`): its
    /// `samples.idx`, memory-mapped and checked, or, without one, the table built from the
    /// per-shard JSON indexes.
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<SampleIndex, DatasetError> {
        let path = dir.join(SAMPLE_INDEX_FILE);
        let index = match std::fs::File::open(&path) {
            Ok(file) => {
                // SAFETY: the file is mapped read-only and never written in place (writers
                // rename a new file over it); its contents are checked before use. Its pages
                // are faulted in at once (they are all read by the checksum).
                let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(
                    |source| DatasetError::Io {
                        path: path.clone(),
                        source,
                    },
                )?;
                SampleIndex::check(Bytes::Mapped(map), manifest, path)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut shards = Vec::with_capacity(manifest.shards.len());
                for entry in &manifest.shards {
                    shards.push(ShardIndex::load(&dir.join(&entry.index))?.samples);
                }
                let bytes =
                    encode(manifest, shards.iter().map(Vec::as_slice)).map_err(|message| {
                        DatasetError::Format {
                            path: dir.to_owned(),
                            what: "dataset's shard indexes",
                            message,
                        }
                    })?;
                SampleIndex::check(Bytes::Owned(bytes), manifest, dir.to_owned())?
            }
            Err(source) => return Err(DatasetError::Io { path, source }),
        };
        Ok(index)
    }

    fn check(
        bytes: Bytes,
        manifest: &Manifest,
        source: PathBuf,
    ) -> Result<SampleIndex, DatasetError> {
        let bad = |message: String| DatasetError::Format {
            path: source.clone(),
            what: "sample index",
            message,
        };
        let rebuild = "re-run `ladder dataset index` on the dataset's directory";
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(bad(format!("no index header: {rebuild}")));
        }
        if u32_at(&bytes, 56) != crc32c::crc32c(&bytes[..56]) {
            return Err(bad(format!("its header does not check out: {rebuild}")));
        }
        let version = u32_at(&bytes, 8);
        if version != VERSION || u32_at(&bytes, 12) as usize != RECORD {
            return Err(bad(format!(
                "version {version}; this Ladder reads version {VERSION}: {rebuild}"
            )));
        }
        let samples = u64_at(&bytes, 16);
        let shards = u32_at(&bytes, 24);
        if samples != manifest.total_samples
            || shards as usize != manifest.shards.len()
            || u64_at(&bytes, 32) != manifest_digest(manifest)
        {
            return Err(bad(format!(
                "it describes {samples} samples in {shards} shards, not this manifest's \
                 {} in {} (a shard was re-indexed since?): {rebuild}",
                manifest.total_samples,
                manifest.shards.len()
            )));
        }
        let keys_start = usize::try_from(samples)
            .ok()
            .and_then(|n| n.checked_mul(RECORD))
            .and_then(|n| n.checked_add(HEADER))
            .ok_or_else(|| bad("its sample count is impossible".into()))?;
        let expected = u64_at(&bytes, 40)
            .checked_add(keys_start as u64)
            .ok_or_else(|| bad("its key table size is impossible".into()))?;
        if bytes.len() as u64 != expected {
            return Err(bad(format!(
                "it has {} bytes, its header says {expected} (cut short?): {rebuild}",
                bytes.len()
            )));
        }
        if u32_at(&bytes, 48) != crc32c::crc32c(&bytes[HEADER..]) {
            return Err(bad(format!(
                "its checksum does not hold (corrupted): {rebuild}"
            )));
        }
        Ok(SampleIndex {
            bytes,
            samples,
            keys_start,
            source,
        })
    }

    fn record(&self, id: u64) -> &[u8] {
        let at = HEADER + id as usize * RECORD;
        &self.bytes[at..at + RECORD]
    }

    pub fn len(&self) -> u64 {
        self.samples
    }

    pub fn is_empty(&self) -> bool {
        self.samples == 0
    }

    /// Sample `id` (below [`Self::len`]).
    pub fn get(&self, id: u64) -> Sample<'_> {
        assert!(id < self.samples, "sample {id} is beyond the dataset");
        let r = self.record(id);
        let key_start = self.keys_start + u32_at(r, 16) as usize;
        let key_len = u16::from_le_bytes([r[20], r[21]]) as usize;
        Sample {
            // Keys were written from `String`s, and the checksum holds.
            key: std::str::from_utf8(&self.bytes[key_start..key_start + key_len])
                .unwrap_or("(a key that is not UTF-8)"),
            offset: u64_at(r, 0),
            size: u64::from(u32_at(r, 8)),
            format: match r[22] {
                1 => ImageFormat::Png,
                2 => ImageFormat::Webp,
                _ => ImageFormat::Jpeg,
            },
            label: u32_at(r, 12),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{MANIFEST_FORMAT, ShardEntry};

    fn sample(key: &str, offset: u64, size: u64, label: u32) -> IndexedSample {
        IndexedSample {
            key: key.to_owned(),
            offset,
            size,
            format: if label.is_multiple_of(2) {
                ImageFormat::Jpeg
            } else {
                ImageFormat::Png
            },
            label,
        }
    }

    /// Two shards of 2 and 1 samples, their JSON indexes written in `dir`.
    fn dataset(dir: &Path) -> (Manifest, Vec<Vec<IndexedSample>>) {
        let shards = vec![
            vec![sample("a/0001", 512, 100, 3), sample("a/0002", 1536, 50, 4)],
            vec![sample("b/ünïcode", 512, 700, 9)],
        ];
        let entries: Vec<ShardEntry> = shards
            .iter()
            .enumerate()
            .map(|(i, samples)| {
                let index = format!("shard-{i}.idx.json");
                let json = ShardIndex {
                    format: crate::dataset::INDEX_FORMAT.to_owned(),
                    samples: samples.clone(),
                };
                std::fs::write(dir.join(&index), serde_json::to_vec(&json).unwrap()).unwrap();
                ShardEntry {
                    path: format!("shard-{i}.tar"),
                    index,
                    samples: samples.len() as u32,
                    bytes: 4096,
                }
            })
            .collect();
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_owned(),
            classes: 10,
            total_samples: 3,
            shards: entries,
        };
        (manifest, shards)
    }

    fn samples(index: &SampleIndex) -> Vec<(String, u64, u64, ImageFormat, u32)> {
        (0..index.len())
            .map(|id| {
                let s = index.get(id);
                (s.key.to_owned(), s.offset, s.size, s.format, s.label)
            })
            .collect()
    }

    #[test]
    fn the_mapped_index_reads_as_the_json_indexes_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, shards) = dataset(dir.path());
        let from_json = SampleIndex::open(dir.path(), &manifest).unwrap();
        assert_eq!(from_json.source, dir.path());
        SampleIndex::write(
            &dir.path().join(SAMPLE_INDEX_FILE),
            &manifest,
            shards.iter().map(Vec::as_slice),
        )
        .unwrap();
        let mapped = SampleIndex::open(dir.path(), &manifest).unwrap();
        assert_eq!(mapped.source, dir.path().join(SAMPLE_INDEX_FILE));
        assert_eq!(samples(&mapped), samples(&from_json));
        assert_eq!(mapped.get(2).key, "b/ünïcode");
        assert_eq!(mapped.get(1).format, ImageFormat::Jpeg);
        assert_eq!(mapped.get(2).format, ImageFormat::Png);
    }

    #[test]
    fn a_truncated_corrupted_or_stale_index_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (manifest, shards) = dataset(dir.path());
        let path = dir.path().join(SAMPLE_INDEX_FILE);
        let write = || {
            SampleIndex::write(&path, &manifest, shards.iter().map(Vec::as_slice)).unwrap();
            std::fs::read(&path).unwrap()
        };
        let good = write();
        let refused = |bytes: &[u8], manifest: &Manifest, says: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = SampleIndex::open(dir.path(), manifest)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains(SAMPLE_INDEX_FILE) && err.contains(says),
                "{says}: {err}"
            );
        };
        refused(&good[..good.len() - 1], &manifest, "cut short");
        refused(&good[..10], &manifest, "no index header");
        let mut flipped = good.clone();
        flipped[HEADER + 30] ^= 0x20;
        refused(&flipped, &manifest, "corrupted");
        let mut header = good.clone();
        header[16] ^= 1;
        refused(&header, &manifest, "header does not check out");
        let mut other = manifest.clone();
        other.shards[1].bytes += 512;
        refused(&good, &other, "re-indexed since");
    }

    #[test]
    fn an_entry_past_its_shards_end_is_refused_before_any_read() {
        let dir = tempfile::tempdir().unwrap();
        let (mut manifest, shards) = dataset(dir.path());
        manifest.shards[1].bytes = 1000;
        let err = SampleIndex::open(dir.path(), &manifest)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("shard-1.idx.json") && err.contains("runs to byte 1212 of shard-1.tar"),
            "{err}"
        );
        let err = SampleIndex::write(
            &dir.path().join(SAMPLE_INDEX_FILE),
            &manifest,
            shards.iter().map(Vec::as_slice),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("runs to byte 1212"), "{err}");
    }
}
