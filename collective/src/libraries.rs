//! NCCL and the CUDA runtime, bound from the copies libtorch already loaded.
//!
//! A CUDA build of libtorch (`libtorch_cuda`, which the worker links) needs `libnccl.so.2` and
//! `libcudart.so.*`, so the loader maps the torch install's copies (its nvidia wheels) before
//! `main` runs. Ladder calls the same copies: it finds them in `/proc/self/maps`, opens each
//! with `RTLD_NOLOAD` (which only ever returns a library already mapped, never loads one) and
//! takes the functions it calls with `dlsym`. So there is never a second NCCL or CUDA runtime
//! in the process, whatever `LD_LIBRARY_PATH` holds, and nothing is searched for by name. Two
//! copies could not work together: NCCL calls some of its own exported functions through the
//! dynamic linker, which binds them to the copy loaded first, and two runtimes keep two sets
//! of contexts and streams.

use crate::CollectiveError;
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::path::PathBuf;
use std::sync::OnceLock;

/// `ncclResult_t` values Ladder tells apart.
pub const NCCL_SUCCESS: c_int = 0;
pub const NCCL_IN_PROGRESS: c_int = 7;
/// `ncclDataType_t::ncclFloat32`.
pub const NCCL_FLOAT32: c_int = 7;
/// `ncclRedOp_t` values.
pub const NCCL_SUM: c_int = 0;
pub const NCCL_AVG: c_int = 4;
/// `cudaError_t` values Ladder tells apart.
pub const CUDA_SUCCESS: c_int = 0;
pub const CUDA_ERROR_NOT_READY: c_int = 600;
/// `cudaEventDisableTiming`: an event only ordered against, never timed.
pub const CUDA_EVENT_DISABLE_TIMING: c_uint = 2;

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

pub type NcclComm = *mut c_void;
pub type CudaStream = *mut c_void;
pub type CudaEvent = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct NcclUniqueId {
    pub internal: [c_char; UNIQUE_ID_BYTES],
}

/// `ncclConfig_t` as NCCL 2.28 lays it out (`version` says so to the library, which reads only
/// the fields its caller's version has).
#[repr(C)]
pub struct NcclConfig {
    pub size: usize,
    pub magic: c_uint,
    pub version: c_uint,
    pub blocking: c_int,
    pub cga_cluster_size: c_int,
    pub min_ctas: c_int,
    pub max_ctas: c_int,
    pub net_name: *const c_char,
    pub split_share: c_int,
    pub traffic_class: c_int,
    pub comm_name: *const c_char,
    pub collnet_enable: c_int,
    pub cta_policy: c_int,
    pub shrink_share: c_int,
    pub nvls_ctas: c_int,
    pub n_channels_per_net_peer: c_int,
    pub nvlink_centric_sched: c_int,
}

/// `cudaPointerAttributes`, with room for the reserved words CUDA 13 appends.
#[repr(C)]
pub struct CudaPointerAttributes {
    pub memory_type: c_int,
    pub device: c_int,
    pub device_pointer: *mut c_void,
    pub host_pointer: *mut c_void,
    pub reserved: [i64; 8],
}

/// A table of functions taken from one library by name.
macro_rules! functions {
    ($table:ident { $($field:ident = $symbol:literal : fn($($arg:ty),*) -> $ret:ty;)* }) => {
        pub struct $table {
            $(pub $field: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl $table {
            /// Every function of the table from the library `handle`; the error names the one
            /// missing.
            fn take(handle: *mut c_void) -> Result<$table, String> {
                Ok($table {
                    $($field: {
                        let address = symbol(handle, $symbol)?;
                        // SAFETY: the symbol is the library's C function of this signature
                        // (its header's), and the library is never unloaded.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(address)
                        }
                    },)*
                })
            }
        }
    };
}

functions!(Nccl {
    get_version = c"ncclGetVersion": fn(*mut c_int) -> c_int;
    get_unique_id = c"ncclGetUniqueId": fn(*mut NcclUniqueId) -> c_int;
    comm_init_rank_config = c"ncclCommInitRankConfig":
        fn(*mut NcclComm, c_int, NcclUniqueId, c_int, *mut NcclConfig) -> c_int;
    comm_get_async_error = c"ncclCommGetAsyncError": fn(NcclComm, *mut c_int) -> c_int;
    all_reduce = c"ncclAllReduce":
        fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, CudaStream) -> c_int;
    comm_abort = c"ncclCommAbort": fn(NcclComm) -> c_int;
    comm_destroy = c"ncclCommDestroy": fn(NcclComm) -> c_int;
    get_error_string = c"ncclGetErrorString": fn(c_int) -> *const c_char;
    get_last_error = c"ncclGetLastError": fn(NcclComm) -> *const c_char;
});

functions!(Runtime {
    runtime_get_version = c"cudaRuntimeGetVersion": fn(*mut c_int) -> c_int;
    driver_get_version = c"cudaDriverGetVersion": fn(*mut c_int) -> c_int;
    set_device = c"cudaSetDevice": fn(c_int) -> c_int;
    get_device = c"cudaGetDevice": fn(*mut c_int) -> c_int;
    pointer_get_attributes = c"cudaPointerGetAttributes":
        fn(*mut CudaPointerAttributes, *const c_void) -> c_int;
    stream_query = c"cudaStreamQuery": fn(CudaStream) -> c_int;
    mem_get_info = c"cudaMemGetInfo": fn(*mut usize, *mut usize) -> c_int;
    event_create_with_flags = c"cudaEventCreateWithFlags": fn(*mut CudaEvent, c_uint) -> c_int;
    event_record = c"cudaEventRecord": fn(CudaEvent, CudaStream) -> c_int;
    event_query = c"cudaEventQuery": fn(CudaEvent) -> c_int;
    event_destroy = c"cudaEventDestroy": fn(CudaEvent) -> c_int;
});

fn symbol(handle: *mut c_void, name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if found.is_null() {
        Err(format!("it has no {}", name.to_string_lossy()))
    } else {
        Ok(found)
    }
}

/// Libraries this process has mapped whose file name starts with `prefix`, each once.
pub fn mapped(prefix: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut found: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The one mapped library named `prefix*`, opened without loading anything.
fn open_mapped(prefix: &str, what: &str) -> Result<(PathBuf, *mut c_void), String> {
    let files = mapped(prefix);
    let path = match files.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(format!(
                "no {what} is loaded in this process: it comes with a CUDA build of libtorch \
                 (libtorch_cuda needs the torch install's {prefix}*), and this process has none \
                 (a CPU-only torch, or a program that does not link libtorch_cuda)"
            ));
        }
        several => {
            return Err(format!(
                "{} copies of {what} are loaded in this process ({}): they cannot work \
                 together; remove the others from LD_PRELOAD or LD_LIBRARY_PATH so that only \
                 the torch install's is loaded",
                several.len(),
                list(several)
            ));
        }
    };
    let name = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: RTLD_NOLOAD returns a library already mapped (or null) and runs no code; the
    // handle is never closed, so the library and its functions stay for the process's life.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(format!(
            "{} is mapped but the dynamic linker does not know it as loaded",
            path.display()
        ));
    }
    Ok((path, handle))
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A bound library: its file and its functions.
pub struct Bound<T> {
    pub path: PathBuf,
    pub functions: T,
}

fn bind<T>(
    prefix: &str,
    what: &str,
    take: fn(*mut c_void) -> Result<T, String>,
) -> Result<Bound<T>, String> {
    let (path, handle) = open_mapped(prefix, what)?;
    let functions = take(handle).map_err(|e| format!("{} ({what}): {e}", path.display()))?;
    Ok(Bound { path, functions })
}

fn unsupported(e: &str) -> CollectiveError {
    CollectiveError::Unsupported(e.to_owned())
}

/// libtorch's NCCL, bound once.
pub fn nccl() -> Result<&'static Bound<Nccl>, CollectiveError> {
    static NCCL: OnceLock<Result<Bound<Nccl>, String>> = OnceLock::new();
    NCCL.get_or_init(|| bind("libnccl.so", "NCCL", Nccl::take))
        .as_ref()
        .map_err(|e| unsupported(e))
}

/// libtorch's CUDA runtime, bound once.
pub fn runtime() -> Result<&'static Bound<Runtime>, CollectiveError> {
    static RUNTIME: OnceLock<Result<Bound<Runtime>, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| bind("libcudart.so", "CUDA runtime", Runtime::take))
        .as_ref()
        .map_err(|e| unsupported(e))
}
