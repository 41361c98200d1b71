//! Named tensors in and out of safetensors files, checked: loading says exactly which names are
//! missing or extra and which shapes or dtypes differ, and changes nothing unless all match.
//!
//! Model weights use torchvision's names (`features.0.0.weight`, ...), so the files load into
//! torchvision with `load_state_dict`; other state lives under a prefix (`ema.`, `optimizer.`).

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor, nn};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("state does not match the model{}:\n  {}", if .origin.is_empty() { String::new() } else { format!(" ({})", .origin) }, listed(.problems))]
    Mismatch {
        origin: String,
        problems: Vec<String>,
    },
}

/// The problems one per line; past 20 (another variant's file has hundreds), a count of each
/// kind and the first 20.
fn listed(problems: &[String]) -> String {
    const SHOWN: usize = 20;
    if problems.len() <= SHOWN {
        return problems.join("\n  ");
    }
    let count = |kind: fn(&str) -> bool| problems.iter().filter(|p| kind(p)).count();
    format!(
        "{} problems: {} missing, {} unexpected, {} of another shape, {} of another dtype; the \
         first {SHOWN}:\n  {}",
        problems.len(),
        count(|p| p.starts_with("missing ")),
        count(|p| p.starts_with("unexpected ")),
        count(|p| p.contains(": shape ")),
        count(|p| p.contains(": dtype ")),
        problems[..SHOWN].join("\n  ")
    )
}

pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, StateError> {
    Tensor::read_safetensors(path).map_err(|e| StateError::File {
        path: path.display().to_string(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// What was written: the file's size and SHA-256 (lowercase hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

fn dtype_name(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "F32",
        Kind::Double => "F64",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        Kind::Bool => "BOOL",
        _ => return None,
    })
}

/// Writes `tensors` (any device, any layout) as a safetensors file, in standard order, flushed
/// to disk; see [`FileImage::write`].
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<Written, StateError> {
    let image = FileImage::of(tensors).map_err(|message| StateError::File {
        path: path.display().to_string(),
        message,
    })?;
    image.write(path)
}

/// File images start at a multiple of this address and their data at a multiple of this
/// offset (the JSON header is padded with spaces, as the format allows): what direct I/O needs
/// on any disk, whose sectors are 512 or 4096 bytes.
const ALIGN: usize = 4096;

/// Bytes per `write` call of a file image.
const WRITE_CHUNK: usize = 64 << 20;

/// One tensor of a [`FileImage`].
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<i64>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<i64>() as usize * self.kind.elt_size_in_bytes()
    }
}

/// A safetensors file laid out in host memory exactly as it goes to disk: header, then every
/// tensor's bytes. Tensors are copied straight into their places ([`FileImage::view`]), and
/// [`FileImage::write`] hands the memory to the disk as it is (direct I/O: no copy into the
/// page cache, which on a small machine costs as much CPU as hashing, and no dirty pages for
/// the kernel to throttle) while another thread computes its SHA-256.
///
/// The data lie in order of decreasing element size (entries of one size in the caller's
/// order), so every tensor is aligned to its own element size without gaps, which the format
/// does not allow. Entries are addressed by their index in the caller's list.
pub struct FileImage {
    /// The file, then zeros up to a multiple of [`ALIGN`], at an aligned address.
    buffer: Tensor,
    entries: Vec<Entry>,
    /// Per entry (in the caller's order), its byte offset in the file.
    offsets: Vec<usize>,
    len: usize,
}

impl FileImage {
    /// Lays out `entries` and allocates the image, page-locked for copies from `pin`'s device
    /// when given. Fails on a dtype safetensors has no name for.
    pub fn new(entries: Vec<Entry>, pin: Option<Device>) -> Result<FileImage, String> {
        let mut placed: Vec<usize> = (0..entries.len()).collect();
        placed.sort_by_key(|&i| std::cmp::Reverse(entries[i].kind.elt_size_in_bytes()));
        let mut header = serde_json::Map::new();
        let mut data_offsets = vec![0usize; entries.len()];
        let mut offset = 0usize;
        for &i in &placed {
            let entry = &entries[i];
            let dtype = dtype_name(entry.kind).ok_or_else(|| {
                format!(
                    "{}: dtype {:?} has no safetensors name",
                    entry.name, entry.kind
                )
            })?;
            header.insert(
                entry.name.clone(),
                serde_json::json!({"dtype": dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.bytes()]}),
            );
            data_offsets[i] = offset;
            offset += entry.bytes();
        }
        let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
        header.resize((8 + header.len()).next_multiple_of(ALIGN) - 8, b' ');
        let data_start = 8 + header.len();
        let len = data_start + offset;
        let padded = len.next_multiple_of(ALIGN);
        let memory = Tensor::empty([(padded + ALIGN) as i64], (Kind::Uint8, Device::Cpu));
        let memory = match pin.filter(|d| d.is_cuda()) {
            Some(_) => crate::precision::pinned(&memory).unwrap_or(memory),
            None => memory,
        };
        let skip =
            (memory.data_ptr() as usize).next_multiple_of(ALIGN) - memory.data_ptr() as usize;
        let buffer = memory.narrow(0, skip as i64, padded as i64);
        let image = FileImage {
            buffer,
            offsets: data_offsets.iter().map(|o| data_start + o).collect(),
            entries,
            len,
        };
        // SAFETY: the buffer is a contiguous host tensor of `padded` bytes that `image` owns, and
        // no view of it exists yet.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(image.buffer.data_ptr().cast::<u8>(), padded) };
        bytes[..8].copy_from_slice(&(header.len() as u64).to_le_bytes());
        bytes[8..data_start].copy_from_slice(&header);
        bytes[len..].fill(0);
        Ok(image)
    }

    /// An image holding `tensors` (any device, any layout) in standard order.
    pub fn of(tensors: &[(String, Tensor)]) -> Result<FileImage, String> {
        let entries = tensors
            .iter()
            .map(|(name, t)| Entry {
                name: name.clone(),
                kind: t.kind(),
                shape: t.size(),
            })
            .collect();
        let image = FileImage::new(entries, None)?;
        tch::no_grad(|| {
            for (i, (_, t)) in tensors.iter().enumerate() {
                image.view(i).copy_(t);
            }
        });
        Ok(image)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Entry `i`'s place in the image, as a tensor of its dtype and shape in standard order.
    pub fn view(&self, i: usize) -> Tensor {
        let entry = &self.entries[i];
        self.buffer
            .narrow(0, self.offsets[i] as i64, entry.bytes() as i64)
            .view_dtype(entry.kind)
            .view(entry.shape.as_slice())
    }

    /// `numel` elements of `kind` from entry `first`'s start on, flat: the place of several
    /// entries that follow each other in the caller's list with one dtype (so also in the
    /// image), for one copy instead of one per entry.
    pub fn span(&self, first: usize, numel: i64, kind: Kind) -> Tensor {
        self.buffer
            .narrow(
                0,
                self.offsets[first] as i64,
                numel * kind.elt_size_in_bytes() as i64,
            )
            .view_dtype(kind)
    }

    /// The file's bytes followed by zero padding to a multiple of [`ALIGN`].
    fn padded_bytes(&self) -> &[u8] {
        // SAFETY: the buffer is a contiguous host tensor of that many bytes, owned by `self`.
        // Copies into its views are over before its bytes are read: a snapshot is handed out
        // only after its copy thread is joined (`PendingSnapshot::finish`).
        unsafe {
            std::slice::from_raw_parts(self.buffer.data_ptr().cast::<u8>(), self.buffer.numel())
        }
    }

    /// Writes the image to a new file at `path`, flushed to disk (fsync), hashing it on
    /// another thread meanwhile.
    pub fn write(&self, path: &Path) -> Result<Written, StateError> {
        write_images(&[(path, self)]).map(|mut written| written.remove(0))
    }
}

/// Writes each image to its path, all at once, every file flushed to disk; the first error, if
/// any. The SHA-256s are computed meanwhile by one thread per core (at most one per file),
/// largest file first, so that hashing keeps up with a fast disk.
pub fn write_images(images: &[(&Path, &FileImage)]) -> Result<Vec<Written>, StateError> {
    // Tensors may not cross threads by reference; their bytes may.
    let jobs: Vec<(&Path, &[u8], usize)> = images
        .iter()
        .map(|(path, image)| (*path, image.padded_bytes(), image.len))
        .collect();
    let mut largest_first: Vec<usize> = (0..jobs.len()).collect();
    largest_first.sort_by_key(|&i| std::cmp::Reverse(jobs[i].2));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let digests: Vec<std::sync::OnceLock<String>> =
        jobs.iter().map(|_| std::sync::OnceLock::new()).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..cores.min(jobs.len()) {
            scope.spawn(|| {
                while let Some(&i) =
                    largest_first.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    let (_, padded, len) = jobs[i];
                    let mut hasher = Sha256::new();
                    hasher.update(&padded[..len]);
                    let _ = digests[i].set(hex(&hasher.finalize()));
                }
            });
        }
        let writers: Vec<_> = jobs
            .iter()
            .map(|&(path, padded, len)| {
                scope.spawn(move || {
                    write_padded(path, padded, len).map_err(|e| StateError::File {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })
                })
            })
            .collect();
        let written: Result<Vec<()>, StateError> = writers
            .into_iter()
            .map(|w| w.join().expect("a checkpoint file writer does not panic"))
            .collect();
        written
    })?;
    Ok(jobs
        .iter()
        .zip(digests)
        .map(|(&(_, _, len), digest)| Written {
            bytes: len as u64,
            sha256: digest.into_inner().expect("every file was hashed"),
        })
        .collect())
}

/// Writes the first `len` of `padded` (an image from [`FileImage`]) to a new file at `path`:
/// direct I/O where it works, else through the page cache.
fn write_padded(path: &Path, padded: &[u8], len: usize) -> std::io::Result<()> {
    // Direct I/O fails in more ways than a plain write: tmpfs and some network file systems
    // refuse it (EINVAL), and some drivers refuse DMA from page-locked memory such as a GPU
    // snapshot's (EFAULT). Whatever the reason, the page cache gets a second chance; when it
    // fails too, its error is the one about the disk itself (no space, no permission).
    write_direct(path, padded, len).or_else(|_| write_buffered(path, &padded[..len]))
}

fn write_direct(path: &Path, padded: &[u8], len: usize) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    for chunk in padded.chunks(WRITE_CHUNK) {
        file.write_all(chunk)?;
    }
    // The padding goes, so the file is exactly the safetensors bytes.
    file.set_len(len as u64)?;
    file.sync_data()
}

fn write_buffered(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        file.write_all(chunk)?;
    }
    file.sync_data()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 (lowercase hex) and size of a file, read in large chunks.
pub fn digest(path: &Path) -> std::io::Result<Written> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 8 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bytes += n as u64;
    }
    Ok(Written {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// The variables of `vs` under `prefix` (for example `"ema."`), in name order.
pub fn named(vs: &nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    vars.into_iter()
        .map(|(name, t)| (format!("{prefix}{name}"), t))
        .collect()
}

/// Copies the tensors named `prefix + variable name` into the variables of `vs`.
pub fn load(
    vs: &nn::VarStore,
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    load_into(&named(vs, ""), tensors, prefix, origin)
}

/// Copies the tensors named `prefix + target name` into `targets`, after [`check`].
pub fn load_into(
    targets: &[(String, Tensor)],
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    let given = matched(targets, tensors, prefix, origin)?;
    tch::no_grad(|| {
        for (name, var) in targets {
            var.shallow_clone().copy_(given[name.as_str()]);
        }
    });
    Ok(())
}

/// Checks that every target has a tensor named `prefix + target name` with its shape and dtype,
/// and that no other name carries the prefix; the error lists every problem.
pub fn check(
    targets: &[(String, Tensor)],
    tensors: &[(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<(), StateError> {
    matched(targets, tensors, prefix, origin).map(|_| ())
}

/// The tensor for each target, by target name, once every one is there and fits.
fn matched<'a>(
    targets: &[(String, Tensor)],
    tensors: &'a [(String, Tensor)],
    prefix: &str,
    origin: &str,
) -> Result<HashMap<&'a str, &'a Tensor>, StateError> {
    let given: HashMap<&str, &Tensor> = tensors
        .iter()
        .filter_map(|(name, t)| name.strip_prefix(prefix).map(|n| (n, t)))
        .collect();
    let wanted: BTreeMap<&str, &Tensor> = targets.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut problems = Vec::new();
    for (name, var) in &wanted {
        match given.get(name) {
            None => problems.push(format!("missing {prefix}{name} {:?}", var.size())),
            Some(t) if t.size() != var.size() => problems.push(format!(
                "{prefix}{name}: shape {:?}, the model has {:?}",
                t.size(),
                var.size()
            )),
            Some(t) if t.kind() != var.kind() => problems.push(format!(
                "{prefix}{name}: dtype {:?}, the model has {:?}",
                t.kind(),
                var.kind()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&&str> = given.keys().filter(|n| !wanted.contains_key(**n)).collect();
    extra.sort();
    problems.extend(extra.into_iter().map(|n| format!("unexpected {prefix}{n}")));
    if problems.is_empty() {
        Ok(given)
    } else {
        Err(StateError::Mismatch {
            origin: origin.to_owned(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        let float = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) / 7.0;
        vec![
            ("b.bias".to_owned(), Tensor::from_slice(&[1.5f32, -2.0])),
            // Transposed: written in standard order, as `contiguous()` would give.
            ("a.weight".to_owned(), float.tr()),
            ("bn.num_batches_tracked".to_owned(), Tensor::from(42i64)),
            ("mask".to_owned(), Tensor::from_slice(&[1u8, 0, 1])),
            ("half".to_owned(), float.to_kind(Kind::BFloat16)),
            (
                "empty".to_owned(),
                Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)),
            ),
        ]
    }

    /// A directory on the disk the build lives on (`/tmp` may be tmpfs, without direct I/O).
    fn disk_dir() -> tempfile::TempDir {
        let deps = std::env::current_exe().expect("test executable");
        tempfile::tempdir_in(deps.parent().expect("target/debug/deps")).expect("temp dir")
    }

    #[test]
    fn a_file_image_reads_back_exactly_and_its_data_start_page_aligned() {
        let dir = disk_dir();
        let path = dir.path().join("state.safetensors");
        let tensors = tensors();
        let written = write(&path, &tensors).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(written.bytes, bytes.len() as u64);
        assert_eq!(written, digest(&path).unwrap());
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header) % ALIGN, 0, "data start at a page boundary");
        let back = read(&path).unwrap();
        assert_eq!(back.len(), tensors.len());
        for (name, t) in &tensors {
            let (_, found) = back.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(found.kind(), t.kind(), "{name}");
            assert!(found.equal(t), "{name}");
        }
    }

    #[test]
    fn direct_and_buffered_writes_make_the_same_file() {
        let dir = disk_dir();
        let image = FileImage::of(&tensors()).unwrap();
        let (direct, buffered) = (dir.path().join("direct"), dir.path().join("buffered"));
        write_direct(&direct, image.padded_bytes(), image.len)
            .expect("the disk under target/ takes direct I/O");
        write_buffered(&buffered, &image.padded_bytes()[..image.len]).unwrap();
        let direct = std::fs::read(direct).unwrap();
        assert_eq!(direct.len(), image.len, "the padding is cut off");
        assert_eq!(direct, std::fs::read(buffered).unwrap());
    }

    #[test]
    fn a_dtype_without_a_safetensors_name_is_refused_by_name() {
        let entry = Entry {
            name: "complex".to_owned(),
            kind: Kind::ComplexFloat,
            shape: vec![2],
        };
        let err = FileImage::new(vec![entry], None).err().unwrap();
        assert!(err.contains("complex: dtype ComplexFloat"), "{err}");
    }
}
