//! `ladder dataset import`: ImageNet as people have it ([`sources`]: an ImageFolder tree, a
//! directory of per-synset tars, a tar of them, or a tar of images with a labels file, read in
//! place; [`stream`]: a compressed tar of per-synset tars, streamed) to WebDataset shards,
//! their indexes, a manifest and a class map, with a held-out split made on the way.
//!
//! Classes are numbered in name order (wnids sorted, as torchvision's ImageFolder numbers
//! them).
//! ImageNet-21k has no validation split, so the import makes one: `held_out` images of each
//! class (drawn with the seed) go to `DEST/val/`, the rest to `DEST/train/`; a class with no
//! more than `held_out` images trains on all of them (the summary counts such classes). With
//! `min_class_images` set, classes with at most that many images are set aside whole, and the
//! others numbered anew (ImageNet-21K-P's rule, with 500). Files are shuffled (seeded) before
//! sharding: the sample plan mixes only a few shards at a time, so shards sorted by class would
//! make class-pure batches. Images are copied byte for byte; files that are not JPEG, PNG or
//! WebP by their first bytes are reported and left out, and with `verify` so are images that do
//! not decode. A source with no image to import is refused.

mod devkit;
pub mod shards;
pub mod sources;
pub mod stream;

use ladder_core::dataset::{DatasetError, ImageFormat};
use ladder_core::indexing::{self, IndexReport};
use ladder_core::rng::Stream;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const IMPORT_STREAM: u64 = 0x494d_5052; // "IMPR"

pub const CLASS_MAP_FILE: &str = "classes.json";

/// How to import: shard size, the seed of the split and the shuffle, and the split's rules.
#[derive(Clone, Copy, Debug)]
pub struct ImportOptions {
    pub shard_samples: u32,
    pub seed: u64,
    /// Images of each class held out for validation (0: no split).
    pub held_out: u32,
    /// Classes with at most this many images are set aside whole (0: none).
    pub min_class_images: u32,
    /// Decode every image, leaving out (and reporting) what no epoch could use: a truncated
    /// or corrupt file that still starts like an image.
    pub verify: bool,
    /// Threads examining images and writing shards (0: [`ladder_core::storage_threads`]).
    pub threads: usize,
}

/// What an import did.
pub struct ImportReport {
    /// The training set, and the held-out one (none when nothing was held out).
    pub train: IndexReport,
    pub val: Option<IndexReport>,
    pub classes: Vec<String>,
    /// Classes set aside by `min_class_images`, and classes too small to hold any out.
    pub set_aside: Vec<String>,
    pub too_small_to_hold_out: usize,
    /// Files left out, with why.
    pub skipped: Vec<String>,
    /// What writing each split did (an interrupted import resumed keeps its shards).
    pub written: shards::Written,
    pub resumed: bool,
}

/// How far an import is.
#[derive(Clone, Copy, Debug)]
pub enum Progress {
    /// Streaming a compressed archive to list it: bytes of it read, of its size.
    Listing { read: u64, size: u64 },
    /// Examining the images found in place (their first bytes; with `verify`, a decode):
    /// images examined, of all found.
    Examining { images: u64, total: u64 },
    /// Images written (or found written by an interrupted import), of all to write.
    Writing { images: u64, total: u64 },
}

/// An I/O error at `path`, for `map_err`.
fn io(path: &Path) -> impl Fn(std::io::Error) -> DatasetError + '_ {
    move |source| DatasetError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `jpg`, `png` or `webp` by an image's first bytes (whatever its name says); None when it
/// is none of them, or empty.
fn image_format(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if crate::webp::is_webp(head) {
        Some("webp")
    } else {
        None
    }
}

/// The image's format by its name and first bytes, and with `verify` whether it decodes whole
/// (`bytes` is then all of it, else at least its first 12 bytes); else why it is left out.
fn verdict(file_name: &str, bytes: &[u8], verify: bool) -> Result<&'static str, String> {
    if !has_image_extension(file_name) {
        return Err(NOT_AN_IMAGE_FILE.into());
    }
    let format =
        image_format(bytes).ok_or("empty, or not a JPEG, PNG or WebP image by its first bytes")?;
    if verify {
        let decodable = match format {
            "png" => ImageFormat::Png,
            "webp" => ImageFormat::Webp,
            _ => ImageFormat::Jpeg,
        };
        if let Err(why) = crate::decode::decode(bytes, decodable, None, 1, 1) {
            return Err(format!("does not decode ({why})"));
        }
    }
    Ok(format)
}

const NOT_AN_IMAGE_FILE: &str = "not a .jpg, .jpeg, .png or .webp file";

fn has_image_extension(file_name: &str) -> bool {
    let ext = Path::new(file_name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png" | "webp"))
}

/// [`verdict`] of an image found in place (read as far as needed), or as found while its
/// bytes streamed by.
fn examine(
    found: &sources::Found,
    verify: bool,
    source: &Path,
) -> Result<Result<&'static str, String>, DatasetError> {
    if let Some(verdict) = &found.examined {
        return Ok(verdict.clone());
    }
    if !has_image_extension(found.file_name()) {
        return Ok(Err(NOT_AN_IMAGE_FILE.into()));
    }
    let bytes = found
        .bytes
        .read((!verify).then_some(12))
        .map_err(|e| DatasetError::Format {
            path: source.to_owned(),
            what: "import source",
            message: format!("{}: {e}", found.name()),
        })?;
    Ok(verdict(found.file_name(), &bytes, verify))
}

/// `f` of every item, on `threads` threads (contiguous runs of the items), in the items' order.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let run = items.len().div_ceil(threads.max(1)).max(1);
    if run >= items.len() {
        return items.iter().map(f).collect(); // one run: no thread to start
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(run)
            .map(|chunk| scope.spawn(|| chunk.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an import thread panicked"))
            .collect()
    })
}

/// Imports `source` into `destination` (see the module's doc); `labels` names the labels
/// file of a tar of images; `progress` is told how far it is. An interrupted import continues
/// when run again with the same arguments (see [`shards`] and [`stream`]).
pub fn import(
    source: &Path,
    destination: &Path,
    options: ImportOptions,
    labels: Option<&Path>,
    classes_from: Option<&Path>,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<ImportReport, DatasetError> {
    if !destination.join(shards::JOURNAL_FILE).exists() {
        for dir in [
            destination.to_owned(),
            destination.join("train"),
            destination.join("val"),
        ] {
            indexing::ensure_no_shards(&dir)?;
        }
    }
    let threads = match options.threads {
        0 => ladder_core::storage_threads(),
        n => n,
    };
    let streamed = stream::is_compressed(source);
    let mut listing = if streamed {
        stream::list(source, labels, options.verify, threads, &|read, size| {
            progress(Progress::Listing { read, size })
        })?
    } else {
        sources::list(source, labels)?
    };
    let mut skipped = std::mem::take(&mut listing.skipped);
    // Another import's classes (a val set numbered as its train set): images of other
    // classes are left out, and classes without images here keep their numbers.
    let given = match classes_from {
        Some(file) => {
            if options.min_class_images > 0 {
                return Err(DatasetError::Format {
                    path: file.to_owned(),
                    what: "import options",
                    message: "--classes-from keeps that import's numbering; \
                              --min-class-images would number the classes anew"
                        .into(),
                });
            }
            let text = std::fs::read(file).map_err(io(file))?;
            let classes: Vec<String> =
                serde_json::from_slice(&text).map_err(|e| DatasetError::Format {
                    path: file.to_owned(),
                    what: "class list",
                    message: format!("not a JSON list of class names: {e}"),
                })?;
            let known: std::collections::BTreeSet<&str> =
                classes.iter().map(String::as_str).collect();
            listing.images.retain(|found| {
                let keep = known.contains(&*found.class);
                if !keep {
                    skipped.push(format!(
                        "{}: class {} is not in {}; left out",
                        found.name(),
                        found.class,
                        file.display()
                    ));
                }
                keep
            });
            Some(classes)
        }
        None => None,
    };
    let classes = given.clone().unwrap_or(listing.classes);
    let label_of: BTreeMap<&str, u32> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect();
    // Every image's first bytes (and with `verify` all of it, decoded) on every core; the
    // verdicts come back in listing order, so the plan does not depend on the threads.
    let unexamined = listing
        .images
        .iter()
        .filter(|i| i.examined.is_none())
        .count() as u64;
    let examined = AtomicU64::new(0);
    let verdicts = in_parallel(&listing.images, threads, |image| {
        let verdict = examine(image, options.verify, source);
        if image.examined.is_none() {
            // Told every so many images: a first read from the page cache takes microseconds.
            let images = examined.fetch_add(1, Ordering::Relaxed) + 1;
            if images.is_multiple_of(1024) || images == unexamined {
                let total = unexamined;
                progress(Progress::Examining { images, total });
            }
        }
        verdict
    });
    let mut files: Vec<shards::Planned> = Vec::new();
    let mut usable = vec![false; classes.len()];
    for (found, verdict) in listing.images.into_iter().zip(verdicts) {
        match verdict? {
            Ok(format) => {
                let label = label_of[&*found.class];
                usable[label as usize] = true;
                files.push((found.bytes, label, format));
            }
            Err(why) => skipped.push(format!("{}: {why}; left out", found.name())),
        }
    }
    let empty_classes: Vec<&str> = classes
        .iter()
        .zip(&usable)
        .filter(|(_, u)| !**u)
        .map(|(c, _)| c.as_str())
        .collect();
    if !empty_classes.is_empty() && given.is_none() {
        // torchvision's ImageFolder refuses these too: a label with no image.
        return Err(DatasetError::Format {
            path: source.to_owned(),
            what: "import source",
            message: format!(
                "class(es) with no usable image: {}",
                empty_classes.join(", ")
            ),
        });
    }
    // Classes set aside whole, and the others numbered anew.
    let mut counts = vec![0u32; classes.len()];
    for (_, label, _) in &files {
        counts[*label as usize] += 1;
    }
    let kept: Vec<bool> = counts
        .iter()
        .map(|&n| options.min_class_images == 0 || n > options.min_class_images)
        .collect();
    let set_aside: Vec<String> = classes
        .iter()
        .zip(&kept)
        .filter(|(_, k)| !**k)
        .map(|(c, _)| c.clone())
        .collect();
    let relabel: Vec<Option<u32>> = kept
        .iter()
        .scan(0u32, |next, &k| {
            Some(k.then(|| {
                *next += 1;
                *next - 1
            }))
        })
        .collect();
    files.retain_mut(|(_, label, _)| match relabel[*label as usize] {
        Some(new) => {
            *label = new;
            true
        }
        None => false,
    });
    let classes: Vec<String> = classes
        .into_iter()
        .zip(&kept)
        .filter(|(_, k)| **k)
        .map(|(c, _)| c)
        .collect();
    if files.is_empty() {
        return Err(DatasetError::Format {
            path: source.to_owned(),
            what: "import source",
            message: format!(
                "no image to import: {} left out{}",
                skipped.len(),
                skipped
                    .first()
                    .map_or(String::new(), |first| format!(", the first: {first}"))
            ),
        });
    }
    // The held-out split: `held_out` of each class, drawn with the seed.
    let mut rng = Stream::new(options.seed, &[IMPORT_STREAM]);
    rng.shuffle(&mut files);
    let mut taken = vec![0u32; classes.len()];
    let mut per_class = vec![0u32; classes.len()];
    for (_, label, _) in &files {
        per_class[*label as usize] += 1;
    }
    let too_small_to_hold_out = per_class.iter().filter(|&&n| n <= options.held_out).count();
    let (val, train): (Vec<_>, Vec<_>) = files.into_iter().partition(|(_, label, _)| {
        let l = *label as usize;
        let hold = per_class[l] > options.held_out && taken[l] < options.held_out;
        taken[l] += hold as u32;
        hold
    });
    let digest = shards::plan_digest(&[&train, &val], options.shard_samples, &classes);
    let resumed = shards::begin(destination, &digest)?;
    let total = (train.len() + val.len()) as u64;
    let done = AtomicU64::new(0);
    let written_images = |n: u64| {
        let images = done.fetch_add(n, Ordering::SeqCst) + n;
        progress(Progress::Writing { images, total });
    };
    let mut splits = vec![(destination.join("train"), &train[..])];
    if !val.is_empty() {
        splits.push((destination.join("val"), &val[..]));
    }
    // Each split's shards are indexed as they were written, not read again.
    let (written, indexes) = if streamed {
        stream::write(
            source,
            destination,
            &splits,
            options.shard_samples,
            threads,
            resumed,
            &written_images,
        )?
    } else {
        let mut written = shards::Written::default();
        let mut indexes = Vec::new();
        for (dir, files) in &splits {
            let (split, indexed) =
                shards::write(dir, files, options.shard_samples, threads, &written_images)?;
            written.shards += split.shards;
            written.kept += split.kept;
            written.bytes += split.bytes;
            indexes.push(indexed);
        }
        (written, indexes)
    };
    let classes_count = Some(classes.len() as u32);
    let mut reports = splits.iter().zip(indexes).map(|((dir, _), indexed)| {
        indexing::write_indexes(dir, indexed, Vec::new(), classes_count)
    });
    let train = reports.next().expect("a training split")?;
    let val = reports.next().transpose()?;
    let class_map = destination.join(CLASS_MAP_FILE);
    let json = serde_json::to_vec_pretty(&classes).expect("class names serialize");
    std::fs::write(&class_map, json).map_err(io(&class_map))?;
    shards::finish(destination)?;
    Ok(ImportReport {
        train,
        val,
        classes,
        set_aside,
        too_small_to_hold_out,
        skipped,
        written,
        resumed,
    })
}
