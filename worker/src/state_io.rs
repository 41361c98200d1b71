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
    #[error("state does not match the model{}:\n  {}", if .origin.is_empty() { String::new() } else { format!(" ({})", .origin) }, .problems.join("\n  "))]
    Mismatch {
        origin: String,
        problems: Vec<String>,
    },
}

pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, StateError> {
    Tensor::read_safetensors(path).map_err(|e| StateError::File {
        path: path.display().to_string(),
        message: e.to_string(),
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

/// Writes `tensors` in safetensors format, streaming: the bytes are hashed as they go out, and
/// the file is flushed to disk (fsync) before this returns. Views with other layouts
/// (channels-last weights) and device tensors are written in standard order from host memory.
pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<Written, StateError> {
    let fail = |message: String| StateError::File {
        path: path.display().to_string(),
        message,
    };
    let host: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(name, t)| (name.as_str(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in &host {
        let dtype = dtype_name(t.kind()).ok_or_else(|| {
            fail(format!(
                "{name}: dtype {:?} has no safetensors name",
                t.kind()
            ))
        })?;
        let len = t.numel() * t.kind().elt_size_in_bytes();
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("a JSON map serializes");
    // The data starts 8-byte aligned, as the format recommends; padding is spaces.
    header.resize(header.len().next_multiple_of(8), b' ');
    let length = (header.len() as u64).to_le_bytes();
    let mut pieces: Vec<&[u8]> = vec![&length, &header];
    for (_, t) in &host {
        let len = t.numel() * t.kind().elt_size_in_bytes();
        if len > 0 {
            // SAFETY: `t` is a contiguous host tensor of `len` bytes that outlives `pieces`.
            pieces.push(unsafe { std::slice::from_raw_parts(t.data_ptr().cast::<u8>(), len) });
        }
    }
    // Hashing runs beside the writing (both only read the tensors), so the SHA-256 costs no
    // time when the disk is the slower of the two.
    let (written, sha256) = std::thread::scope(|scope| {
        let hasher = scope.spawn(|| {
            let mut hasher = Sha256::new();
            for piece in &pieces {
                hasher.update(piece);
            }
            hex(&hasher.finalize())
        });
        let written = write_pieces(path, &pieces);
        (
            written,
            hasher.join().expect("the hashing thread does not panic"),
        )
    });
    let bytes = written.map_err(|e| fail(e.to_string()))?;
    Ok(Written { bytes, sha256 })
}

/// Bytes written between two requests to start writing back to disk.
const WRITEBACK_EVERY: u64 = 256 << 20;

/// Writes `pieces` into a new file at `path` and flushes it to disk; returns its size.
///
/// Every 256 MiB the kernel is asked to start writing the new range back (without waiting),
/// so the disk works while later bytes are copied and the final flush has little left: dirty
/// pages never pile up to the point where the kernel throttles the writer.
fn write_pieces(path: &Path, pieces: &[&[u8]]) -> std::io::Result<u64> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let file = std::fs::File::create(path)?;
    // Small pieces (headers, biases) are gathered; large ones go to the file in 8 MiB writes.
    let mut out = std::io::BufWriter::with_capacity(4 << 20, file);
    let (mut bytes, mut flushed) = (0u64, 0u64);
    for piece in pieces {
        for chunk in piece.chunks(8 << 20) {
            out.write_all(chunk)?;
            bytes += chunk.len() as u64;
            if bytes - flushed >= WRITEBACK_EVERY {
                out.flush()?;
                // SAFETY: a plain syscall on an open file descriptor.
                unsafe {
                    libc::sync_file_range(
                        out.get_ref().as_raw_fd(),
                        flushed as i64,
                        (bytes - flushed) as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
                flushed = bytes;
            }
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    // The data and the size; the directory entry is flushed by the checkpoint's rename.
    file.sync_data()?;
    Ok(bytes)
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
