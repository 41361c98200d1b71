//! Collectives behind one trait: [`nccl::NcclCommunicator`] for GPU memory, through the NCCL
//! and CUDA runtime libtorch loaded ([`libraries`]);
//! [`ring::TcpRing`] for host memory, a ring allreduce
//! over TCP (reduce-scatter, then all-gather) whose results are bitwise identical on every rank,
//! with timeouts and an abort that unblocks a rank stuck on a dead or hung peer; and [`Alone`],
//! a generation of one rank, which has nothing to exchange.

pub mod fence;
pub mod libraries;
pub mod nccl;
pub mod ring;

pub use fence::Fence;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: peer rank {peer} did not answer within {timeout:?} ({during})")]
    Timeout {
        rank: u32,
        peer: u32,
        timeout: Duration,
        during: &'static str,
    },
    #[error("rank {rank}: connection to rank {peer} failed ({during}): {source}")]
    Peer {
        rank: u32,
        peer: u32,
        during: &'static str,
        source: std::io::Error,
    },
    #[error("rank {rank}: the collective was aborted")]
    Aborted { rank: u32 },
    #[error("rank {rank}: {message}")]
    Handshake { rank: u32, message: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("rank {rank}: NCCL: {message}")]
    Nccl { rank: u32, message: String },
    /// The device's own work failed (a CUDA error while waiting for it).
    #[error("the device failed: {0}")]
    Device(String),
}

/// Sums a buffer across all ranks in place; every rank ends with the same bytes. Host memory
/// goes through [`Collective::all_reduce_sum`], GPU memory through
/// [`Collective::all_reduce_sum_device`]; each implementation takes the kind it can reach.
pub trait Collective: Send {
    fn rank(&self) -> u32;
    fn world_size(&self) -> u32;
    /// A handle that makes this collective's blocked and future calls fail with
    /// [`CollectiveError::Aborted`], from any thread.
    fn abort_handle(&self) -> AbortHandle;
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Sums `len` float32 values at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must address `len` float32 values in the memory of this collective's device,
    /// written by work already queued on the default stream, and nothing else may write them
    /// until the call returns.
    unsafe fn all_reduce_sum_device(
        &mut self,
        ptr: u64,
        len: usize,
    ) -> Result<(), CollectiveError> {
        let _ = (ptr, len);
        Err(CollectiveError::Unsupported(
            "this collective reduces host memory only".to_owned(),
        ))
    }

    /// Waits until the device has passed `fence` (a step's work, its reduction included: a
    /// device reduction returns once queued), failing as a reduction does. A collective whose
    /// peers can hold the device up waits with its deadline and abort; one that cannot simply
    /// waits.
    fn wait(&mut self, fence: &Fence) -> Result<(), CollectiveError> {
        fence.wait_for_device()
    }
}

/// Aborts a collective from another thread (see [`Collective::abort_handle`]).
#[derive(Clone)]
pub struct AbortHandle(Arc<dyn Fn() + Send + Sync>);

impl AbortHandle {
    pub fn new(abort: impl Fn() + Send + Sync + 'static) -> AbortHandle {
        AbortHandle(Arc::new(abort))
    }

    pub fn abort(&self) {
        (self.0)()
    }
}

/// A generation of one rank: every sum is already the sum over the ranks, so nothing is
/// exchanged, no communicator is made (no NCCL unique id, no ring listener) and no call
/// touches a device or a socket.
pub struct Alone;

impl Collective for Alone {
    fn rank(&self) -> u32 {
        0
    }

    fn world_size(&self) -> u32 {
        1
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(|| {})
    }

    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }

    unsafe fn all_reduce_sum_device(
        &mut self,
        _ptr: u64,
        _len: usize,
    ) -> Result<(), CollectiveError> {
        Ok(())
    }
}
