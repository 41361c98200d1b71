//! `ladder dataset import`: an ImageFolder tree (ImageNet's `train/<wnid>/*.JPEG`) to WebDataset
//! shards, their indexes, a manifest and a class map.
//!
//! Classes are the sub-directories in name order (as torchvision's ImageFolder numbers them).
//! Files are shuffled (seeded) before sharding: the sample plan mixes only a few shards at a
//! time, so shards sorted by class would make class-pure batches. Images are copied byte for
//! byte; files that are not JPEG or PNG by extension are reported and left out.

use crate::synth::append;
use ladder_core::dataset::{self, DatasetError, IndexReport};
use ladder_core::rng::Stream;
use std::path::{Path, PathBuf};

const IMPORT_STREAM: u64 = 0x494d_5052; // "IMPR"

pub const CLASS_MAP_FILE: &str = "classes.json";

/// What an import did.
pub struct ImportReport {
    pub index: IndexReport,
    pub classes: Vec<String>,
    /// Files left out, with why.
    pub skipped: Vec<String>,
}

/// `jpg` or `png` by the file's first bytes (whatever its extension says); None when it is
/// neither, or empty.
fn image_format(path: &Path) -> std::io::Result<Option<&'static str>> {
    let mut head = [0u8; 8];
    let mut file = std::fs::File::open(path)?;
    let mut read = 0;
    while read < head.len() {
        match std::io::Read::read(&mut file, &mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(if head[..read].starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if head[..read] == *b"\x89PNG\r\n\x1a\n" {
        Some("png")
    } else {
        None
    })
}

pub fn import(
    source: &Path,
    destination: &Path,
    shard_samples: u32,
    seed: u64,
) -> Result<ImportReport, DatasetError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| DatasetError::Io { path, source }
    };
    dataset::ensure_no_shards(destination)?;
    let mut classes: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(source).map_err(io(source))? {
        let entry = entry.map_err(io(source))?;
        if entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            classes.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(DatasetError::Format {
            path: source.to_owned(),
            what: "ImageFolder tree",
            message: "it has no class sub-directories".into(),
        });
    }
    let mut files: Vec<(PathBuf, u32, &'static str)> = Vec::new();
    let mut skipped = Vec::new();
    let mut empty_classes = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let dir = source.join(class);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .map(|e| e.map(|e| e.path()).map_err(io(&dir)))
            .collect::<Result<_, _>>()?;
        names.sort();
        let before = files.len();
        for path in names {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            if !matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
                skipped.push(format!(
                    "{}: not a .jpg, .jpeg or .png file; left out",
                    path.display()
                ));
                continue;
            }
            match image_format(&path).map_err(io(&path))? {
                Some(format) => files.push((path, label as u32, format)),
                None => skipped.push(format!(
                    "{}: empty, or not a JPEG or PNG image by its first bytes; left out",
                    path.display()
                )),
            }
        }
        if files.len() == before {
            empty_classes.push(class.as_str());
        }
    }
    if !empty_classes.is_empty() {
        // torchvision's ImageFolder refuses these too: a label with no image.
        return Err(DatasetError::Format {
            path: source.to_owned(),
            what: "ImageFolder tree",
            message: format!(
                "class folder(s) with no usable image: {}",
                empty_classes.join(", ")
            ),
        });
    }
    Stream::new(seed, &[IMPORT_STREAM]).shuffle(&mut files);
    std::fs::create_dir_all(destination).map_err(io(destination))?;
    for (shard, chunk) in files.chunks(shard_samples.max(1) as usize).enumerate() {
        let path = destination.join(format!("shard-{shard:06}.tar"));
        let mut tar = tar::Builder::new(std::fs::File::create(&path).map_err(io(&path))?);
        for (i, (file, label, ext)) in chunk.iter().enumerate() {
            let bytes = std::fs::read(file).map_err(io(file))?;
            let key = format!("{:08}", shard * shard_samples as usize + i);
            append(&mut tar, &format!("{key}.{ext}"), &bytes).map_err(io(&path))?;
            append(
                &mut tar,
                &format!("{key}.cls"),
                label.to_string().as_bytes(),
            )
            .map_err(io(&path))?;
        }
        tar.finish().map_err(io(&path))?;
    }
    let class_map = destination.join(CLASS_MAP_FILE);
    let json = serde_json::to_vec_pretty(&classes).expect("class names serialize");
    std::fs::write(&class_map, json).map_err(io(&class_map))?;
    let index = dataset::index_dir(destination, Some(classes.len() as u32))?;
    Ok(ImportReport {
        index,
        classes,
        skipped,
    })
}
