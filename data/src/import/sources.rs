//! Where an import's images come from, listed without unpacking anything:
//!
//! - an ImageFolder tree: `SOURCE/<class>/<image>` (ImageNet's `train/<wnid>/*.JPEG`);
//! - a directory of per-synset tars, `SOURCE/<wnid>.tar` (ImageNet-21k's release, unpacked
//!   one level, or downloaded per synset);
//! - a tar of per-synset tars (`ILSVRC2012_img_train.tar`, `fall11_whole.tar`, or
//!   `winter21_whole.tar.gz` once gunzipped), read in place: each image is a byte range of
//!   the one archive file;
//! - a tar of images with its labels (`ILSVRC2012_img_val.tar` with Kaggle's
//!   `LOC_val_solution.csv`: `ImageId,PredictionString`, the wnid first in the string; or
//!   with the ILSVRC-2012 devkit unpacked, see [`super::devkit`]).
//!
//! A class is a sub-directory's name or a synset tar's stem. Archives are listed with seeks
//! past the members' data, so listing a terabyte archive reads its headers, not its images. A
//! synset tar that breaks part-way keeps the members listed before the break; the rest is
//! reported. A compressed tar of per-synset tars (`winter21_whole.tar.gz` as downloaded) has no
//! byte ranges to read in place: it is streamed instead (see [`super::stream`]).

use super::io;
use ladder_core::dataset::DatasetError;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An archive images are byte ranges of. The one archive of a tar of tars is held open, so
/// that reading its millions of images costs no `open` each; the thousands of tars of a
/// directory are opened per read, not held (they would exceed the open-file limit).
#[derive(Debug)]
pub struct Archive {
    pub path: PathBuf,
    held: Option<std::fs::File>,
}

impl Archive {
    fn held(path: &Path) -> std::io::Result<Arc<Archive>> {
        Ok(Arc::new(Archive {
            path: path.to_owned(),
            held: Some(std::fs::File::open(path)?),
        }))
    }

    fn opened_per_read(path: &Path) -> Arc<Archive> {
        Arc::new(Archive {
            path: path.to_owned(),
            held: None,
        })
    }

    fn read_exact_at(&self, bytes: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.held {
            Some(file) => file.read_exact_at(bytes, offset),
            None => std::fs::File::open(&self.path)?.read_exact_at(bytes, offset),
        }
    }
}

/// One image's bytes: a file, a byte range of an archive, or a byte range of a compressed
/// archive's uncompressed stream (which only streaming the archive reads).
#[derive(Clone, Debug)]
pub enum Bytes {
    File(PathBuf),
    Range {
        archive: Arc<Archive>,
        offset: u64,
        len: u64,
    },
    Streamed {
        archive: Arc<Path>,
        offset: u64,
        len: u64,
    },
}

impl Bytes {
    /// Up to `len` bytes from the start (all of them when `None`).
    pub fn read(&self, len: Option<u64>) -> std::io::Result<Vec<u8>> {
        match self {
            Bytes::File(path) => match len {
                None => std::fs::read(path),
                Some(len) => {
                    let mut head = Vec::new();
                    std::fs::File::open(path)?
                        .take(len)
                        .read_to_end(&mut head)?;
                    Ok(head)
                }
            },
            Bytes::Range {
                archive,
                offset,
                len: whole,
            } => {
                let mut bytes = vec![0; len.map_or(*whole, |l| l.min(*whole)) as usize];
                archive.read_exact_at(&mut bytes, *offset)?;
                Ok(bytes)
            }
            Bytes::Streamed { archive, .. } => Err(std::io::Error::other(format!(
                "{} is compressed: its images are read by streaming it, not one by one",
                archive.display()
            ))),
        }
    }

    /// How many bytes the image has.
    pub fn size(&self) -> std::io::Result<u64> {
        match self {
            Bytes::File(path) => Ok(std::fs::metadata(path)?.len()),
            Bytes::Range { len, .. } | Bytes::Streamed { len, .. } => Ok(*len),
        }
    }
}

/// An image found in the source. Its place and class are shared with its neighbours: an
/// ImageNet-21k listing holds 13 million of these.
#[derive(Clone, Debug)]
pub struct Found {
    /// Where it is, up to its name: a folder (`…/n01440764/`), or an archive or a member of one
    /// (`…/train.tar:winter21_whole/n01440764.tar:`).
    pub place: Arc<str>,
    /// Its name there: a file name, or a member's path.
    pub member: Box<str>,
    pub class: Arc<str>,
    pub bytes: Bytes,
    /// Its format, or why it is left out, when that was found as its bytes streamed by.
    pub examined: Option<Result<&'static str, String>>,
}

impl Found {
    /// Where it is, for messages: a path, or `archive:member`.
    pub fn name(&self) -> String {
        format!("{}{}", self.place, self.member)
    }

    /// Its file name, whose extension says what it claims to be.
    pub fn file_name(&self) -> &str {
        Path::new(&*self.member)
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or(&self.member)
    }
}

/// What a source holds.
#[derive(Default)]
pub struct Listing {
    /// The classes, each with at least one image listed (an ImageFolder tree's empty class
    /// folders are refused, as torchvision's ImageFolder refuses them).
    pub classes: Vec<String>,
    pub images: Vec<Found>,
    /// What was left out while listing, with why.
    pub skipped: Vec<String>,
}

fn format_error(path: &Path, message: String) -> DatasetError {
    DatasetError::Format {
        path: path.to_owned(),
        what: "import source",
        message,
    }
}

/// Lists `source` (see the module's doc); `labels` names a labels file for a tar of images.
pub fn list(source: &Path, labels: Option<&Path>) -> Result<Listing, DatasetError> {
    if source.is_dir() {
        return match labels {
            Some(_) => Err(format_error(
                source,
                "--labels goes with a tar of images (ILSVRC2012_img_val.tar)".into(),
            )),
            None => directory(source),
        };
    }
    let archive = Archive::held(source).map_err(io(source))?;
    let members = members_in(source, 0, None).map_err(|p| io(source)(p.error))?;
    match labels {
        Some(labels) => labelled(&archive, members, labels),
        None if members.iter().any(|m| m.0.ends_with(".tar")) => {
            let mut listing = Listing::default();
            for (member, offset, len) in members {
                let where_ = format!("{}:{member}", source.display());
                match synset(&member) {
                    Some(class) => {
                        let listed = members_in(&archive.path, offset, Some(len));
                        synset_tar(&mut listing, listed, &where_, class, |offset, len| {
                            Bytes::Range {
                                archive: archive.clone(),
                                offset,
                                len,
                            }
                        })
                    }
                    None => listing
                        .skipped
                        .push(format!("{where_}: not a per-synset tar; left out")),
                }
            }
            finish(listing)
        }
        None => Err(format_error(
            source,
            "a tar of images needs --labels (ILSVRC2012_img_val.tar with \
             LOC_val_solution.csv, or the ILSVRC-2012 devkit's directory); a tar of \
             per-synset tars is read as is"
                .into(),
        )),
    }
}

/// A member name's synset: the stem of `[dir/]n01440764.tar`.
pub(super) fn synset(member: &str) -> Option<String> {
    let stem = Path::new(member)
        .file_name()?
        .to_str()?
        .strip_suffix(".tar")?;
    (!stem.is_empty()).then(|| stem.to_owned())
}

/// An ImageFolder tree or a directory of per-synset tars.
fn directory(source: &Path) -> Result<Listing, DatasetError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(source)
        .map_err(io(source))?
        .map(|e| e.map(|e| e.path()).map_err(io(source)))
        .collect::<Result<_, _>>()?;
    entries.sort();
    let folders: Vec<&PathBuf> = entries.iter().filter(|p| p.is_dir()).collect();
    let mut listing = Listing::default();
    if !folders.is_empty() {
        let mut empty = Vec::new();
        for folder in folders {
            let class = folder.file_name().unwrap().to_string_lossy().into_owned();
            let (place, shared): (Arc<str>, Arc<str>) = (
                format!("{}/", folder.display()).into(),
                class.as_str().into(),
            );
            let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
                .map_err(io(folder))?
                .map(|e| e.map(|e| e.path()).map_err(io(folder)))
                .collect::<Result<_, _>>()?;
            files.sort();
            if files.is_empty() {
                empty.push(class.clone());
            }
            for path in files {
                listing.images.push(Found {
                    place: place.clone(),
                    member: path.file_name().unwrap().to_string_lossy().into(),
                    class: shared.clone(),
                    bytes: Bytes::File(path),
                    examined: None,
                });
            }
            listing.classes.push(class);
        }
        if !empty.is_empty() {
            return Err(format_error(
                source,
                format!("empty class folder(s): {}", empty.join(", ")),
            ));
        }
        return Ok(listing);
    }
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match synset(&name) {
            Some(class) => {
                let archive = Archive::opened_per_read(&path);
                let listed = members_in(&path, 0, None);
                synset_tar(
                    &mut listing,
                    listed,
                    &path.display().to_string(),
                    class,
                    |offset, len| Bytes::Range {
                        archive: archive.clone(),
                        offset,
                        len,
                    },
                )
            }
            None => listing.skipped.push(format!(
                "{}: neither a class folder nor a per-synset tar; left out",
                path.display()
            )),
        }
    }
    if listing.images.is_empty() && listing.skipped.is_empty() {
        return Err(format_error(
            source,
            "it holds neither class folders nor per-synset tars".into(),
        ));
    }
    finish(listing)
}

/// The images of a synset tar (its `listed` members, found at `where_`), added as class
/// `class` with the bytes `bytes_at` makes of each member's offset and length; a tar that
/// broke keeps what was listed before the break.
pub(super) fn synset_tar(
    listing: &mut Listing,
    listed: Result<Vec<(String, u64, u64)>, Partial>,
    where_: &str,
    class: String,
    bytes_at: impl Fn(u64, u64) -> Bytes,
) {
    let (members, broken) = match listed {
        Ok(members) => (members, None),
        Err(Partial { listed, error }) => (listed, Some(error)),
    };
    if let Some(error) = broken {
        listing.skipped.push(format!(
            "{where_}: unreadable after {} member(s) ({error}); those are kept, the rest left out",
            members.len()
        ));
    }
    let (place, class): (Arc<str>, Arc<str>) = (format!("{where_}:").into(), class.into());
    let mut seen = BTreeSet::new();
    for (member, at, member_len) in members {
        let found = Found {
            place: place.clone(),
            member: member.into(),
            class: class.clone(),
            bytes: bytes_at(at, member_len),
            examined: None,
        };
        if !seen.insert(found.file_name().to_owned()) {
            listing.skipped.push(format!(
                "{}: a second member of that name; left out",
                found.name()
            ));
            continue;
        }
        listing.images.push(found);
    }
}

/// A tar of images named by a labels file.
fn labelled(
    archive: &Arc<Archive>,
    members: Vec<(String, u64, u64)>,
    labels: &Path,
) -> Result<Listing, DatasetError> {
    let class_of = if labels.is_dir() {
        super::devkit::val_wnids(labels)
            .map_err(|e| format_error(labels, format!("the ILSVRC-2012 devkit: {e}")))?
            .into_iter()
            .map(|(n, wnid)| (format!("ILSVRC2012_val_{n:08}"), wnid))
            .collect()
    } else {
        kaggle_labels(labels)?
    };
    let class_of: BTreeMap<String, Arc<str>> = class_of
        .into_iter()
        .map(|(image, class)| (image, class.into()))
        .collect();
    let place: Arc<str> = format!("{}:", archive.path.display()).into();
    let mut listing = Listing::default();
    for (member, offset, len) in members {
        let found = Found {
            place: place.clone(),
            member: member.into(),
            class: "".into(),
            bytes: Bytes::Range {
                archive: archive.clone(),
                offset,
                len,
            },
            examined: None,
        };
        let stem = found.file_name().split('.').next().unwrap_or_default();
        match class_of.get(stem) {
            Some(class) => listing.images.push(Found {
                class: class.clone(),
                ..found
            }),
            None => listing.skipped.push(format!(
                "{}: not in {}; left out",
                found.name(),
                labels.display()
            )),
        }
    }
    finish(listing)
}

/// Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the wnid first in the string.
fn kaggle_labels(labels: &Path) -> Result<BTreeMap<String, String>, DatasetError> {
    let text = std::fs::read_to_string(labels).map_err(io(labels))?;
    let mut class_of = BTreeMap::new();
    for (line, row) in text.lines().enumerate().skip(1) {
        let row = row.trim();
        if row.is_empty() {
            continue;
        }
        let wnid = row
            .split_once(',')
            .and_then(|(id, prediction)| Some((id, prediction.split_whitespace().next()?)));
        match wnid {
            Some((id, wnid)) => class_of.insert(id.to_owned(), wnid.to_owned()),
            None => {
                return Err(format_error(
                    labels,
                    format!(
                        "line {}: not `ImageId,PredictionString` with a wnid first (Kaggle's \
                         LOC_val_solution.csv)",
                        line + 1
                    ),
                ));
            }
        };
    }
    Ok(class_of)
}

/// The classes of the images listed, in name order.
pub(super) fn finish(mut listing: Listing) -> Result<Listing, DatasetError> {
    let classes: BTreeSet<&str> = listing.images.iter().map(|f| &*f.class).collect();
    listing.classes = classes.into_iter().map(str::to_owned).collect();
    Ok(listing)
}

/// What a tar listing got before it broke.
pub(super) struct Partial {
    listed: Vec<(String, u64, u64)>,
    error: std::io::Error,
}

/// The regular-file members of the tar that lies at `offset` of `archive` (`len` bytes of it,
/// or the rest), seeking past their data: see [`members`].
fn members_in(
    archive: &Path,
    offset: u64,
    len: Option<u64>,
) -> Result<Vec<(String, u64, u64)>, Partial> {
    let fail = |error| Partial {
        listed: Vec::new(),
        error,
    };
    let file = std::fs::File::open(archive).map_err(fail)?;
    let end = match len {
        Some(len) => offset + len,
        None => file.metadata().map_err(fail)?.len(),
    };
    let window = Window {
        file,
        start: offset,
        end,
        at: offset,
    };
    members(window, offset, end - offset)
}

/// The regular-file members (name, offset of the data plus `base`, length) of the tar `tar`
/// reads (`len` bytes), seeking past their data. A member whose data runs past the end (a tar
/// cut inside an image) is where the tar breaks.
pub(super) fn members(
    tar: impl Read + Seek,
    base: u64,
    len: u64,
) -> Result<Vec<(String, u64, u64)>, Partial> {
    let mut listed = Vec::new();
    let fail = |listed, error| Partial { listed, error };
    let mut tar = tar::Archive::new(tar);
    let entries = match tar.entries_with_seek() {
        Ok(entries) => entries,
        Err(error) => return Err(fail(listed, error)),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => return Err(fail(listed, error)),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(path) => path.to_string_lossy().into_owned(),
            Err(error) => return Err(fail(listed, error)),
        };
        let (at, size) = (entry.raw_file_position(), entry.size());
        if at.checked_add(size).is_none_or(|end| end > len) {
            let error = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name} is cut short: {size} bytes from {at} of a tar of {len}"),
            );
            return Err(fail(listed, error));
        }
        listed.push((name, base + at, size));
    }
    Ok(listed)
}

/// `file`'s bytes `start..end`, readable and seekable as a file of their own.
struct Window {
    file: std::fs::File,
    start: u64,
    end: u64,
    at: u64,
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.end.saturating_sub(self.at) as usize;
        let want = buf.len().min(left);
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(self.start + n),
            SeekFrom::End(n) => self.end.checked_add_signed(n),
            SeekFrom::Current(n) => self.at.checked_add_signed(n),
        };
        match target {
            Some(t) if t >= self.start => {
                self.at = t;
                Ok(t - self.start)
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a seek before the tar's start",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// However a tar of members is cut or overwritten, listing it never panics, and every
        /// member it lists lies inside it: the streamed import slices images by these ranges.
        #[test]
        fn listed_members_lie_inside_the_tar_however_it_is_damaged(
            sizes in proptest::collection::vec(0usize..3000, 1..8),
            cut in 0.0f64..1.0,
            garbage in proptest::option::of((0.0f64..1.0, any::<u8>())),
        ) {
            let mut tar = tar::Builder::new(Vec::new());
            for (i, size) in sizes.iter().enumerate() {
                crate::synth::append(&mut tar, &format!("{i}.JPEG"), &vec![7; *size]).unwrap();
            }
            let mut bytes = tar.into_inner().unwrap();
            if let Some((at, byte)) = garbage {
                let at = ((at * bytes.len() as f64) as usize).min(bytes.len() - 1);
                bytes[at] = byte;
            }
            bytes.truncate((cut * bytes.len() as f64) as usize);
            let len = bytes.len() as u64;
            let listed = match members(std::io::Cursor::new(&bytes), 1000, len) {
                Ok(listed) => listed,
                Err(partial) => partial.listed,
            };
            for (name, offset, size) in listed {
                prop_assert!(offset >= 1000 && offset - 1000 + size <= len, "{name}");
            }
        }
    }

    /// A member's file name is its path's last component, as `Path::file_name` has it, also for
    /// an old-format tar's directory entries (`n01440764/`, which the tar crate lists as files).
    #[test]
    fn a_members_file_name_is_its_last_component() {
        let found = |member: &str| Found {
            place: "a.tar:".into(),
            member: member.into(),
            class: "n01440764".into(),
            bytes: Bytes::File("x".into()),
            examined: None,
        };
        for (member, file_name) in [
            ("n01440764_1.JPEG", "n01440764_1.JPEG"),
            ("./train/n01440764_1.JPEG", "n01440764_1.JPEG"),
            ("n01440764/", "n01440764"),
            ("x.JPEG/", "x.JPEG"),
            ("a/..", "a/.."),
        ] {
            assert_eq!(found(member).file_name(), file_name, "{member}");
            assert_eq!(found(member).name(), format!("a.tar:{member}"));
        }
    }

    /// A tar cut inside its last image keeps the images before it, and says where it broke.
    #[test]
    fn a_tar_cut_inside_an_image_keeps_the_images_before_it() {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, len) in [("a.JPEG", 700), ("b.JPEG", 300), ("c.JPEG", 2000)] {
            crate::synth::append(&mut tar, name, &vec![1; len]).unwrap();
        }
        let mut bytes = tar.into_inner().unwrap();
        let whole = members(std::io::Cursor::new(&bytes), 100, bytes.len() as u64)
            .unwrap_or_else(|p| panic!("{}", p.error));
        assert_eq!(
            whole,
            [
                ("a.JPEG".to_owned(), 612, 700),
                ("b.JPEG".to_owned(), 2148, 300),
                ("c.JPEG".to_owned(), 3172, 2000)
            ]
        );
        bytes.truncate(3072 + 1000);
        let Err(cut) = members(std::io::Cursor::new(&bytes), 100, bytes.len() as u64) else {
            panic!("a cut tar listed whole")
        };
        assert_eq!(cut.listed, whole[..2]);
        assert!(
            cut.error.to_string().contains("c.JPEG is cut short"),
            "{}",
            cut.error
        );
    }
}
