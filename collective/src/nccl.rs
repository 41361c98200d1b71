//! NCCL, bound at run time from the copy libtorch loaded ([`crate::libraries`]): it builds
//! without a CUDA toolkit, and a worker without GPUs never touches it.
//!
//! Rank 0 makes the unique id ([`unique_id`]); the coordinator's rendezvous passes it to the
//! other ranks. The communicator is created non-blocking, and every wait — its creation, each
//! reduction's queuing, the wait for a step's reduction through a [`Fence`] a step later —
//! polls with a deadline: a peer that died or hangs makes the call fail after `timeout` (or at
//! once on [`Collective::abort_handle`]), and the communicator is then aborted with
//! `ncclCommAbort`, never left hanging. Reductions run on the legacy default stream, the one
//! libtorch's tensors are computed on, ordered after the work that wrote their buffers and
//! before the optimizer's update that reads them: the host does not wait for them.

use crate::libraries::{
    self, CUDA_SUCCESS, CudaPointerAttributes, NCCL_AVG, NCCL_FLOAT32, NCCL_IN_PROGRESS,
    NCCL_SUCCESS, NCCL_SUM, Nccl, NcclComm, NcclConfig, NcclUniqueId, Runtime,
};
use crate::{AbortHandle, Collective, CollectiveError, Fence};
use std::ffi::c_int;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use crate::libraries::UNIQUE_ID_BYTES;
/// The `ncclConfig_t` layout this build passes (NCCL 2.28's).
const CONFIG_VERSION: u32 = 22800;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
const UNDEFINED: i32 = i32::MIN;
/// The longest sleep between two polls of a wait. The training thread waits on each step's
/// fence a step later, and the device passes it at some moment within the last pause:
/// short enough that the overshoot is a small share of a step.
const LONGEST_PAUSE: Duration = Duration::from_micros(200);

fn error(rank: u32, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Nccl {
        rank,
        message: message.into(),
    }
}

/// An NCCL failure in words: the result code, NCCL's string for it and its last error message.
fn explain(nccl: &Nccl, comm: NcclComm, code: c_int) -> String {
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
    let (name, last) = unsafe { ((nccl.get_error_string)(code), (nccl.get_last_error)(comm)) };
    format!("result {code} ({}); last error: {}", text(name), text(last))
}

/// Where `buffer` lives as CUDA sees it from this thread, and which device this thread and the
/// communicator (on `comm_device`) use: what NCCL checks before it answers
/// `ncclInvalidArgument`.
fn describe_buffer(cuda: &Runtime, comm_device: i32, buffer: *const std::ffi::c_void) -> String {
    let mut attributes = std::mem::MaybeUninit::<CudaPointerAttributes>::zeroed();
    let mut current = -1;
    // SAFETY: plain queries writing into locals; a zeroed attribute record is a valid one
    // (unregistered memory on device 0).
    let found = unsafe {
        (cuda.get_device)(&mut current);
        (cuda.pointer_get_attributes)(attributes.as_mut_ptr(), buffer)
    };
    let memory = if found == CUDA_SUCCESS {
        // SAFETY: zeroed, then filled in by the successful call.
        let a = unsafe { attributes.assume_init() };
        format!("memory type {} on device {}", a.memory_type, a.device)
    } else {
        format!("unknown to CUDA (error {found})")
    };
    format!(
        "buffer {buffer:p}: {memory}; this thread's device {current}, the communicator's \
         {comm_device}"
    )
}

/// The bound NCCL and CUDA runtime (libtorch's); the error says what is missing.
fn bound() -> Result<(&'static Nccl, &'static Runtime), CollectiveError> {
    Ok((
        &libraries::nccl()?.functions,
        &libraries::runtime()?.functions,
    ))
}

/// A communicator-less call's result `code`, as an error naming `call` unless it succeeded.
fn succeeded(nccl: &Nccl, call: &str, code: c_int) -> Result<(), CollectiveError> {
    if code == NCCL_SUCCESS {
        return Ok(());
    }
    let why = explain(nccl, std::ptr::null_mut(), code);
    Err(error(0, format!("{call}: {why}")))
}

/// The NCCL and CUDA this process bound, in words: "NCCL 2.28.9, CUDA runtime 13.0, driver
/// 13.0 (none without a driver)".
pub fn versions() -> Result<String, CollectiveError> {
    let (nccl, cuda) = bound()?;
    let mut version = 0;
    // SAFETY: a plain query writing into a local.
    succeeded(nccl, "ncclGetVersion", unsafe {
        (nccl.get_version)(&mut version)
    })?;
    let (mut runtime, mut driver) = (0, 0);
    // SAFETY: plain queries writing into locals; a machine without a driver reports 0.
    unsafe {
        (cuda.runtime_get_version)(&mut runtime);
        (cuda.driver_get_version)(&mut driver);
    }
    let cuda_version = |v: i32| match v {
        0 => "none".to_owned(),
        v => format!("{}.{}", v / 1000, v % 1000 / 10),
    };
    Ok(format!(
        "NCCL {}.{}.{}, CUDA runtime {}, driver {}",
        version / 10000,
        version % 10000 / 100,
        version % 100,
        cuda_version(runtime),
        cuda_version(driver)
    ))
}

/// A new NCCL unique id, made by rank 0 and shared through the rendezvous.
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES], CollectiveError> {
    let (nccl, _) = bound()?;
    let mut id = NcclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: `id` outlives the call.
    succeeded(nccl, "ncclGetUniqueId", unsafe {
        (nccl.get_unique_id)(&mut id)
    })?;
    Ok(id.internal.map(|c| c as u8))
}

pub struct NcclCommunicator {
    nccl: &'static Nccl,
    cuda: &'static Runtime,
    comm: NcclComm,
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
        let (nccl, cuda) = bound()?;
        let id: [u8; UNIQUE_ID_BYTES] = id.try_into().map_err(|_| {
            error(
                rank,
                format!(
                    "the unique id has {} bytes, not {UNIQUE_ID_BYTES}",
                    id.len()
                ),
            )
        })?;
        let id = NcclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        // SAFETY: plain runtime call.
        let set = unsafe { (cuda.set_device)(device) };
        if set != CUDA_SUCCESS {
            return Err(error(rank, format!("cudaSetDevice({device}): error {set}")));
        }
        let mut config = NcclConfig {
            size: std::mem::size_of::<NcclConfig>(),
            magic: CONFIG_MAGIC,
            version: CONFIG_VERSION,
            blocking: 0,
            cga_cluster_size: UNDEFINED,
            min_ctas: UNDEFINED,
            max_ctas: UNDEFINED,
            net_name: std::ptr::null(),
            split_share: UNDEFINED,
            traffic_class: UNDEFINED,
            comm_name: std::ptr::null(),
            collnet_enable: UNDEFINED,
            cta_policy: UNDEFINED,
            shrink_share: UNDEFINED,
            nvls_ctas: UNDEFINED,
            n_channels_per_net_peer: UNDEFINED,
            nvlink_centric_sched: UNDEFINED,
        };
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: `comm` and `config` outlive the call; the id is a valid unique id's bytes.
        let code = unsafe {
            (nccl.comm_init_rank_config)(&mut comm, world as i32, id, rank as i32, &mut config)
        };
        if code != NCCL_SUCCESS && code != NCCL_IN_PROGRESS {
            return Err(error(
                rank,
                format!("ncclCommInitRankConfig: {}", explain(nccl, comm, code)),
            ));
        }
        let mut communicator = NcclCommunicator {
            nccl,
            cuda,
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
            let _ = unsafe { (self.nccl.comm_abort)(self.comm) };
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
        let mut state = NCCL_IN_PROGRESS;
        // SAFETY: the communicator is valid; `state` outlives the call.
        let queried = unsafe { (self.nccl.comm_get_async_error)(self.comm, &mut state) };
        if queried != NCCL_SUCCESS {
            // The state is unknown: taking it for idle would send the next call into a
            // communicator that is not ready.
            return Err(format!(
                "ncclCommGetAsyncError: {}",
                explain(self.nccl, self.comm, queried)
            ));
        }
        match state {
            NCCL_SUCCESS => Ok(true),
            NCCL_IN_PROGRESS => Ok(false),
            other => Err(explain(self.nccl, self.comm, other)),
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
        unsafe { self.all_reduce_device(ptr, ptr, len, NCCL_SUM) }
    }

    /// Polls the fence and the communicator's state with the deadline: a peer that died or
    /// hangs holds the reduction, and so the fence, up for ever.
    fn wait(&mut self, fence: &Fence) -> Result<(), CollectiveError> {
        self.poll("the step's reduction", |c| {
            let passed = fence.passed()?;
            Ok(c.comm_state()? && passed)
        })
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
        unsafe { self.all_reduce_device(send, recv, len, NCCL_AVG) }
    }

    /// Queues the reduction of `len` floats at `send` into `recv` with `op` on the default
    /// stream, and returns once NCCL has it queued; [`Collective::wait`] on a later fence waits
    /// for it with the deadline.
    ///
    /// # Safety
    /// As [`Collective::all_reduce_sum_device`], for both buffers.
    unsafe fn all_reduce_device(
        &mut self,
        send: u64,
        recv: u64,
        len: usize,
        op: c_int,
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
            (self.nccl.all_reduce)(
                buffer,
                into,
                len,
                NCCL_FLOAT32,
                op,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        if queued != NCCL_SUCCESS && queued != NCCL_IN_PROGRESS {
            let rank = self.rank;
            let why = explain(self.nccl, self.comm, queued);
            let place = describe_buffer(self.cuda, self.device, buffer);
            return Err(self.fail(error(
                rank,
                format!("ncclAllReduce of {len} floats: {why}; {place}"),
            )));
        }
        self.wait_for_comm("queuing the allreduce")
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if !self.dead {
            // SAFETY: the communicator is valid and idle (every call waited for completion).
            let _ = unsafe { (self.nccl.comm_destroy)(self.comm) };
        }
    }
}
