//! The memory in use on a CUDA device, through the CUDA runtime that libtorch already loaded
//! (`cudaMemGetInfo`): tch has no call for it, and the metrics must not load a second runtime.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> c_int;

struct Runtime {
    set_device: SetDevice,
    mem_get_info: MemGetInfo,
}

/// The runtime's entry points, if libtorch mapped a `libcudart` (a CUDA build of torch).
fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let path = crate::nccl_library::mapped("libcudart.so")
                .into_iter()
                .next()?;
            let name = std::ffi::CString::new(path.to_str()?).ok()?;
            // SAFETY: RTLD_NOLOAD only finds a library already mapped; it is never unloaded
            // (the handle is not closed), so the symbols stay valid for the process's life.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
            if handle.is_null() {
                return None;
            }
            let symbol = |name: &std::ffi::CStr| -> Option<*mut c_void> {
                // SAFETY: a valid handle and a NUL-terminated name.
                let found = unsafe { libc::dlsym(handle, name.as_ptr()) };
                (!found.is_null()).then_some(found)
            };
            let set_device = symbol(c"cudaSetDevice")?;
            let mem_get_info = symbol(c"cudaMemGetInfo")?;
            // SAFETY: the CUDA runtime's documented signatures for these two symbols.
            Some(unsafe {
                Runtime {
                    set_device: std::mem::transmute::<*mut c_void, SetDevice>(set_device),
                    mem_get_info: std::mem::transmute::<*mut c_void, MemGetInfo>(mem_get_info),
                }
            })
        })
        .as_ref()
}

/// Bytes in use on CUDA device `ordinal` (by every process on it), if the runtime answers.
pub fn used_bytes(ordinal: usize) -> Option<u64> {
    let runtime = runtime()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid out-pointers; the calling thread's current device is set first (the
    // runtime's current device is per thread), and libtorch's primary context is reused.
    let ok = unsafe {
        (runtime.set_device)(c_int::try_from(ordinal).ok()?) == 0
            && (runtime.mem_get_info)(&mut free, &mut total) == 0
    };
    ok.then(|| (total - free) as u64)
}
