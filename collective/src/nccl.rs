//! NCCL, loaded at run time through cudarc: it builds without a CUDA toolkit, and a worker
//! without GPUs never touches it.
//!
//! Rank 0 makes the unique id ([`unique_id`]); the coordinator's rendezvous passes it to the
//! other ranks. The communicator is created non-blocking, and every wait — its creation, each
//! allreduce — polls with a deadline: a peer that died or hangs makes the call fail after
//! `timeout` (or at once on [`Collective::abort_handle`]), and the communicator is then aborted
//! with `ncclCommAbort`, never left hanging. Reductions run on the legacy default stream, the
//! one libtorch's tensors are computed on.

use crate::{AbortHandle, Collective, CollectiveError};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use cudarc::runtime::sys as cuda;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;
/// The `ncclConfig_t` layout this build passes (NCCL 2.28's).
const CONFIG_VERSION: u32 = 22800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const UNDEFINED: i32 = i32::MIN;
/// The longest sleep between two polls of a wait. The training thread waits on each
/// allreduce, and every step's reduction ends on the GPU at some moment within the last pause:
/// short enough that the overshoot is a small share of a step.
const LONGEST_PAUSE: Duration = Duration::from_micros(200);

fn error(rank: u32, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Nccl {
        rank,
        message: message.into(),
    }
}

/// An NCCL failure in words: the result code, NCCL's string for it and its last error message.
fn explain(comm: sys::ncclComm_t, code: sys::ncclResult_t) -> String {
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NCCL returns NUL-terminated static or per-communicator strings.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    // SAFETY: plain queries; a null communicator asks for the last error of any.
    let (name, last) = unsafe { (sys::ncclGetErrorString(code), sys::ncclGetLastError(comm)) };
    format!("{code:?} ({}); last error: {}", text(name), text(last))
}

/// Where `buffer` lives as CUDA sees it from this thread, and which device this thread and the
/// communicator (on `comm_device`) use: what NCCL checks before it answers
/// `ncclInvalidArgument`.
fn describe_buffer(comm_device: i32, buffer: *const std::ffi::c_void) -> String {
    let mut attributes = std::mem::MaybeUninit::<cuda::cudaPointerAttributes>::zeroed();
    let mut current = -1;
    // SAFETY: plain queries writing into locals; a zeroed attribute record is a valid one
    // (unregistered memory on device 0).
    let found = unsafe {
        cuda::cudaGetDevice(&mut current);
        cuda::cudaPointerGetAttributes(attributes.as_mut_ptr(), buffer)
    };
    let memory = if found == cuda::cudaError::cudaSuccess {
        // SAFETY: zeroed, then filled in by the successful call.
        let a = unsafe { attributes.assume_init() };
        format!("{:?} on device {}", a.type_, a.device)
    } else {
        format!("unknown to CUDA ({found:?})")
    };
    format!(
        "buffer {buffer:p}: {memory}; this thread's device {current}, the communicator's \
         {comm_device}"
    )
}

/// Whether libnccl and the CUDA runtime can be loaded; the error says what is missing.
pub fn available() -> Result<(), CollectiveError> {
    // SAFETY: the probes only try to dlopen the libraries.
    let nccl = unsafe { sys::is_culib_present() };
    let runtime = unsafe { cuda::is_culib_present() };
    match (nccl, runtime) {
        (true, true) => Ok(()),
        (false, _) => Err(CollectiveError::Unsupported(
            "libnccl.so cannot be loaded: NCCL comes from the nvidia-nccl wheel of the torch install; \
             put a directory holding libnccl.so (a link to its libnccl.so.2) on LD_LIBRARY_PATH"
                .to_owned(),
        )),
        (true, false) => Err(CollectiveError::Unsupported(
            "the CUDA runtime (libcudart.so.13) cannot be loaded".to_owned(),
        )),
    }
}

/// Loads libnccl for the rest of the process (cudarc otherwise loads it at the first call), and
/// checks that it is the only NCCL in the process (see [`single_copy`]).
pub fn load() -> Result<(), CollectiveError> {
    available()?;
    // SAFETY: the library was just found loadable; loading it runs no code of ours.
    let _ = unsafe { sys::culib() };
    single_copy()
}

/// Fails when the libnccl cudarc loaded is not the one the process's global scope resolves
/// NCCL's names to (libtorch_cuda's, which the loader mapped at start).
///
/// Two copies cannot work together: libnccl calls some of its own exported functions through
/// the dynamic linker (`ncclCommGetAsyncError` among them), which binds them to the copy
/// loaded first. The other copy's calls then run that copy's code on its own communicators,
/// whose layout differs between builds, and are refused as invalid, logged in the wrong
/// copy's last error.
pub fn single_copy() -> Result<(), CollectiveError> {
    const PROBE: &std::ffi::CStr = c"ncclCommGetAsyncError";
    // SAFETY: looking up a symbol's address; nothing is called.
    let (ours, global) = unsafe {
        let ours = sys::culib()
            .get::<unsafe extern "C" fn()>(PROBE.to_bytes_with_nul())
            .map(|f| *f as *const std::ffi::c_void)
            .map_err(|e| {
                CollectiveError::Unsupported(format!("libnccl has no ncclCommGetAsyncError: {e}"))
            })?;
        (
            ours,
            libc::dlsym(libc::RTLD_DEFAULT, PROBE.as_ptr()).cast_const(),
        )
    };
    if global.is_null() || global == ours {
        return Ok(());
    }
    Err(CollectiveError::Unsupported(format!(
        "two NCCL libraries are loaded in this process: {} (the one NCCL's own calls bind to, \
         libtorch's) and {} (the one the worker calls); they cannot share communicators",
        library_file(global),
        library_file(ours)
    )))
}

/// The file of the library holding `address`.
fn library_file(address: *const std::ffi::c_void) -> String {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr fills `info` and returns non-zero when it knows the address; the file name
    // it points to lives as long as the library stays loaded.
    unsafe {
        if libc::dladdr(address, info.as_mut_ptr()) != 0 && !info.assume_init().dli_fname.is_null()
        {
            std::ffi::CStr::from_ptr(info.assume_init().dli_fname)
                .to_string_lossy()
                .into_owned()
        } else {
            format!("{address:p}")
        }
    }
}

/// The NCCL and CUDA this process loaded, in words: "NCCL 2.28.9, CUDA runtime 13.0, driver
/// 13.0".
pub fn versions() -> Result<String, CollectiveError> {
    available()?;
    let nccl = nccl::get_nccl_version().map_err(|e| {
        error(
            0,
            format!("ncclGetVersion: {}", explain(std::ptr::null_mut(), e.0)),
        )
    })?;
    let (mut runtime, mut driver) = (0, 0);
    // SAFETY: plain queries writing into locals; a machine without a driver reports 0.
    unsafe {
        cuda::cudaRuntimeGetVersion(&mut runtime);
        cuda::cudaDriverGetVersion(&mut driver);
    }
    let cuda_version = |v: i32| match v {
        0 => "none".to_owned(),
        v => format!("{}.{}", v / 1000, v % 1000 / 10),
    };
    Ok(format!(
        "NCCL {}.{}.{}, CUDA runtime {}, driver {}",
        nccl / 10000,
        nccl % 10000 / 100,
        nccl % 100,
        cuda_version(runtime),
        cuda_version(driver)
    ))
}

/// A new NCCL unique id, made by rank 0 and shared through the rendezvous.
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    load()?;
    let id = nccl::get_uniqueid().map_err(|e| {
        error(
            0,
            format!("ncclGetUniqueId: {}", explain(std::ptr::null_mut(), e.0)),
        )
    })?;
    Ok(id.internal.map(|c| c as u8))
}

pub struct NcclCommunicator {
    comm: sys::ncclComm_t,
    /// The CUDA device it reduces on.
    device: i32,
    rank: u32,
    world: u32,
    timeout: Duration,
    aborted: Arc<AtomicBool>,
    /// Set once ncclCommAbort ran: the communicator must not be used or destroyed again.
    dead: bool,
}

// SAFETY: an NCCL communicator may be used from any thread, one thread at a time (which `&mut
// self` guarantees).
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Joins the communicator as `rank` of `world` on CUDA device `device`, with rank 0's
    /// unique id. Fails after `timeout` if the other ranks do not join.
    pub fn init(
        rank: u32,
        world: u32,
        id: &[u8],
        device: i32,
        timeout: Duration,
    ) -> Result<NcclCommunicator, CollectiveError> {
        load()?;
        let id: [u8; UNIQUE_ID_BYTES] = id.try_into().map_err(|_| {
            error(
                rank,
                format!(
                    "the unique id has {} bytes, not {UNIQUE_ID_BYTES}",
                    id.len()
                ),
            )
        })?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: plain runtime call.
        let set = unsafe { cuda::cudaSetDevice(device) };
        if set != cuda::cudaError::cudaSuccess {
            return Err(error(rank, format!("cudaSetDevice({device}): {set:?}")));
        }
        let mut config = sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: CONFIG_VERSION,
            blocking: 0,
            cgaClusterSize: UNDEFINED,
            minCTAs: UNDEFINED,
            maxCTAs: UNDEFINED,
            netName: std::ptr::null(),
            splitShare: UNDEFINED,
            trafficClass: UNDEFINED,
            commName: std::ptr::null(),
            collnetEnable: UNDEFINED,
            CTAPolicy: UNDEFINED,
            shrinkShare: UNDEFINED,
            nvlsCTAs: UNDEFINED,
            nChannelsPerNetPeer: UNDEFINED,
            nvlinkCentricSched: UNDEFINED,
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; the id is a valid unique id's bytes.
        unsafe {
            nccl::comm_init_rank_config(&mut comm, world as i32, id, rank as i32, &mut config)
        }
        .map_err(|e| {
            error(
                rank,
                format!("ncclCommInitRankConfig: {}", explain(comm, e.0)),
            )
        })?;
        let mut communicator = NcclCommunicator {
            comm,
            device,
            rank,
            world,
            timeout,
            aborted: Arc::new(AtomicBool::new(false)),
            dead: false,
        };
        communicator.wait_for_comm("joining the communicator")?;
        Ok(communicator)
    }

    fn check_aborted(&self) -> Result<(), CollectiveError> {
        if self.aborted.load(Ordering::SeqCst) || self.dead {
            Err(CollectiveError::Aborted { rank: self.rank })
        } else {
            Ok(())
        }
    }

    /// Aborts the communicator after a failure, so no kernel waits on a peer forever.
    fn abort_now(&mut self) {
        if !self.dead {
            self.dead = true;
            // SAFETY: the communicator is valid and no longer used after this.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }

    fn fail(&mut self, e: CollectiveError) -> CollectiveError {
        self.abort_now();
        e
    }

    /// Polls until `done` says the operation finished, the deadline passes or an abort comes.
    fn poll(
        &mut self,
        during: &'static str,
        mut done: impl FnMut(&Self) -> Result<bool, CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            if self.aborted.load(Ordering::SeqCst) {
                let rank = self.rank;
                return Err(self.fail(CollectiveError::Aborted { rank }));
            }
            match done(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(e)),
            }
            if Instant::now() >= deadline {
                let (rank, timeout) = (self.rank, self.timeout);
                return Err(self.fail(error(
                    rank,
                    format!("no progress within {timeout:?} ({during}): a peer is gone or hung"),
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    /// The communicator's asynchronous state: `Ok(true)` when idle, `Ok(false)` in progress,
    /// else what failed, in words.
    fn async_state(&self) -> Result<bool, String> {
        let mut state = sys::ncclResult_t::ncclInProgress;
        // SAFETY: the communicator is valid; `state` outlives the call.
        let queried = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if queried != sys::ncclResult_t::ncclSuccess {
            // The state is unknown: taking it for idle would send the next call into a
            // communicator that is not ready.
            return Err(format!(
                "ncclCommGetAsyncError: {}",
                explain(self.comm, queried)
            ));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            other => Err(explain(self.comm, other)),
        }
    }

    fn comm_state(&self) -> Result<bool, CollectiveError> {
        self.async_state().map_err(|e| error(self.rank, e))
    }

    fn wait_for_comm(&mut self, during: &'static str) -> Result<(), CollectiveError> {
        self.poll(during, |c| c.comm_state())
    }
}

impl Collective for NcclCommunicator {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world
    }

    fn abort_handle(&self) -> AbortHandle {
        let aborted = self.aborted.clone();
        // The waiting thread sees the flag within a pause and aborts the communicator itself.
        AbortHandle::new(move || aborted.store(true, Ordering::SeqCst))
    }

    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Err(CollectiveError::Unsupported(
            "NCCL reduces GPU memory; host buffers go through the TCP ring".to_owned(),
        ))
    }

    unsafe fn all_reduce_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
    ) -> Result<(), CollectiveError> {
        // SAFETY: the caller's guarantee, passed on; in place.
        unsafe { self.all_reduce_device(ptr, ptr, len, sys::ncclRedOp_t::ncclSum) }
    }
}

impl NcclCommunicator {
    /// Averages `len` float32 values at device address `send` across the ranks into `recv`:
    /// out of place, so even one rank's call launches a kernel that moves the data (an
    /// in-place one-rank sum is a no-op NCCL may skip). The device check's test.
    ///
    /// # Safety
    /// As [`Collective::all_reduce_sum_device`], for both buffers; they must not overlap.
    pub unsafe fn average_device_into(
        &mut self,
        send: u64,
        recv: u64,
        len: usize,
    ) -> Result<(), CollectiveError> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.all_reduce_device(send, recv, len, sys::ncclRedOp_t::ncclAvg) }
    }

    /// Reduces `len` floats at `send` into `recv` with `op`, waiting for it without blocking
    /// in the driver.
    ///
    /// # Safety
    /// As [`Collective::all_reduce_sum_device`], for both buffers.
    unsafe fn all_reduce_device(
        &mut self,
        send: u64,
        recv: u64,
        len: usize,
        op: sys::ncclRedOp_t,
    ) -> Result<(), CollectiveError> {
        self.check_aborted()?;
        if len == 0 {
            return Ok(());
        }
        // NCCL refuses a call on a communicator whose state turned to an error after its last
        // call (a failure in one of NCCL's own threads) with that error: say it is not this
        // call's arguments.
        if let Err(why) = self.async_state() {
            let rank = self.rank;
            return Err(self.fail(error(
                rank,
                format!("the communicator failed before this allreduce of {len} floats: {why}"),
            )));
        }
        let (buffer, into) = (send as *mut std::ffi::c_void, recv as *mut std::ffi::c_void);
        // SAFETY: the caller guarantees both address `len` floats on this device; the null
        // stream is the legacy default stream, ordered after the work that wrote them.
        let queued = unsafe {
            nccl::all_reduce(
                buffer,
                into,
                len,
                sys::ncclDataType_t::ncclFloat32,
                op,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        if let Err(e) = queued {
            let rank = self.rank;
            let why = explain(self.comm, e.0);
            let place = describe_buffer(self.device, buffer);
            return Err(self.fail(error(
                rank,
                format!("ncclAllReduce of {len} floats: {why}; {place}"),
            )));
        }
        self.wait_for_comm("queuing the allreduce")?;
        // Wait for the reduction itself without blocking in the driver, so that a hung peer
        // turns into a timeout instead of a hang.
        self.poll("allreduce", |c| {
            // SAFETY: querying the legacy default stream.
            match unsafe { cuda::cudaStreamQuery(std::ptr::null_mut()) } {
                cuda::cudaError::cudaSuccess => c.comm_state(),
                cuda::cudaError::cudaErrorNotReady => c.comm_state().map(|_| false),
                other => Err(error(c.rank, format!("cudaStreamQuery: {other:?}"))),
            }
        })
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if !self.dead {
            // SAFETY: the communicator is valid and idle (every call waited for completion).
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}
