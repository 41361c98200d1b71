//! Collectives behind one trait. [`ring::TcpRing`] is the CPU implementation: a ring allreduce
//! over TCP (reduce-scatter, then all-gather) whose results are bitwise identical on every rank,
//! with timeouts and an abort that unblocks a rank stuck on a dead or hung peer.

pub mod ring;

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
}

/// Sums a buffer across all ranks in place; every rank ends with the same bytes.
pub trait Collective: Send {
    fn rank(&self) -> u32;
    fn world_size(&self) -> u32;
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError>;
}
