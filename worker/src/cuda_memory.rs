//! The memory in use on a CUDA device, through the CUDA runtime that libtorch already loaded
//! (`cudaMemGetInfo`, bound by [`ladder_collective::libraries`]): tch has no call for it.

/// Bytes in use on CUDA device `ordinal` (by every process on it), if the runtime answers.
pub fn used_bytes(ordinal: usize) -> Option<u64> {
    let runtime = &ladder_collective::libraries::runtime().ok()?.functions;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: valid out-pointers; the calling thread's current device is set first (the
    // runtime's current device is per thread), and libtorch's primary context is reused.
    let ok = unsafe {
        (runtime.set_device)(std::ffi::c_int::try_from(ordinal).ok()?) == 0
            && (runtime.mem_get_info)(&mut free, &mut total) == 0
    };
    ok.then(|| (total - free) as u64)
}
