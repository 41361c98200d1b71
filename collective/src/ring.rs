//! Ring allreduce over TCP.
//!
//! Each rank listens on a port and connects to the next rank's; addresses are exchanged through
//! the coordinator's rendezvous. The buffer is cut into `world` segments. Reduce-scatter: in
//! step `s` rank `r` sends segment `r - s` to `r + 1` while receiving segment `r - s - 1` from
//! `r - 1` and adding it in; after `world - 1` steps rank `r` holds the full sum of segment
//! `r + 1`, accumulated in ring order from rank `r + 2`. All-gather: the finished segments travel
//! once more around the ring and are copied, not added, so every rank ends with the same bytes.
//! Sending and receiving run at the same time (a sender thread per step), so large segments
//! cannot deadlock on full socket buffers; received data is reduced chunk by chunk as it
//! arrives.

use crate::{AbortHandle, Collective, CollectiveError};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"LADRING1";
/// Bytes moved per read: large enough for throughput, small enough to overlap the additions.
const CHUNK: usize = 4 << 20;

pub struct TcpRing {
    rank: u32,
    world: u32,
    next: Option<TcpStream>,
    prev: Option<TcpStream>,
    timeout: Duration,
    aborted: Arc<AtomicBool>,
}

fn peer_error(
    rank: u32,
    peer: u32,
    during: &'static str,
    timeout: Duration,
) -> impl Fn(std::io::Error) -> CollectiveError {
    move |source| match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            rank,
            peer,
            timeout,
            during,
        },
        _ => CollectiveError::Peer {
            rank,
            peer,
            during,
            source,
        },
    }
}

fn header(rank: u32, world: u32, generation: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&rank.to_le_bytes());
    h[12..16].copy_from_slice(&world.to_le_bytes());
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h
}

impl TcpRing {
    /// Joins the ring as `rank` of `addresses.len()`: `listener` is this rank's own (bound before
    /// its address was published), `addresses[r]` rank `r`'s. `generation` must match on every
    /// rank, so that a straggler from an older membership cannot join.
    pub fn connect(
        rank: u32,
        listener: TcpListener,
        addresses: &[SocketAddr],
        generation: u64,
        timeout: Duration,
    ) -> Result<TcpRing, CollectiveError> {
        let world = addresses.len() as u32;
        let aborted = Arc::new(AtomicBool::new(false));
        if world <= 1 {
            return Ok(TcpRing {
                rank,
                world: 1,
                next: None,
                prev: None,
                timeout,
                aborted,
            });
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        // Connect to the next rank (its listener already exists), retrying while it starts.
        let next = loop {
            match TcpStream::connect_timeout(&addresses[next_rank as usize], timeout) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(peer_error(rank, next_rank, "connecting", timeout)(e)),
            }
        };
        let mut next = next;
        next.set_nodelay(true).ok();
        next.set_write_timeout(Some(timeout)).ok();
        next.write_all(&header(rank, world, generation))
            .map_err(peer_error(rank, next_rank, "handshake", timeout))?;
        // Accept the previous rank, refusing anyone else.
        listener.set_nonblocking(true).ok();
        let mut prev = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(CollectiveError::Timeout {
                        rank,
                        peer: prev_rank,
                        timeout,
                        during: "waiting for the previous rank to connect",
                    });
                }
                Err(e) => return Err(peer_error(rank, prev_rank, "accepting", timeout)(e)),
            }
        };
        prev.set_nonblocking(false).ok();
        prev.set_nodelay(true).ok();
        prev.set_read_timeout(Some(timeout)).ok();
        let mut theirs = [0u8; 24];
        prev.read_exact(&mut theirs)
            .map_err(peer_error(rank, prev_rank, "handshake", timeout))?;
        if theirs != header(prev_rank, world, generation) {
            return Err(CollectiveError::Handshake {
                rank,
                message: format!(
                    "expected rank {prev_rank} of {world} in generation {generation}, got a peer announcing {:?}",
                    (
                        u32::from_le_bytes(theirs[8..12].try_into().expect("4 bytes")),
                        u32::from_le_bytes(theirs[12..16].try_into().expect("4 bytes")),
                        u64::from_le_bytes(theirs[16..24].try_into().expect("8 bytes"))
                    )
                ),
            });
        }
        Ok(TcpRing {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            timeout,
            aborted,
        })
    }

    fn check_aborted(&self) -> Result<(), CollectiveError> {
        if self.aborted.load(Ordering::SeqCst) {
            Err(CollectiveError::Aborted { rank: self.rank })
        } else {
            Ok(())
        }
    }

    /// One ring step: sends `outgoing` to the next rank while receiving `incoming.len()` floats
    /// from the previous one, combining each with `combine(local, received)`.
    fn exchange(
        &mut self,
        outgoing: &[f32],
        incoming: &mut [f32],
        combine: Combine,
        during: &'static str,
    ) -> Result<(), CollectiveError> {
        let (rank, world, timeout) = (self.rank, self.world, self.timeout);
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let next = self
            .next
            .as_mut()
            .expect("a ring of two or more has a next rank");
        let prev = self
            .prev
            .as_mut()
            .expect("a ring of two or more has a previous rank");
        let aborted = &self.aborted;
        let abort_or = |e: CollectiveError| {
            if aborted.load(Ordering::SeqCst) {
                CollectiveError::Aborted { rank }
            } else {
                e
            }
        };
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || -> Result<(), CollectiveError> {
                next.write_all(as_bytes(outgoing))
                    .map_err(peer_error(rank, next_rank, during, timeout))
            });
            let mut received = vec![0f32; CHUNK / 4];
            let mut done = 0;
            let receive = (|| -> Result<(), CollectiveError> {
                while done < incoming.len() {
                    let floats = (incoming.len() - done).min(CHUNK / 4);
                    let target = &mut incoming[done..done + floats];
                    match combine {
                        // The all-gather's data lands in place; the reduction's goes through a
                        // chunk buffer and is added in.
                        Combine::Copy => prev
                            .read_exact(as_bytes_mut(target))
                            .map_err(peer_error(rank, prev_rank, during, timeout))?,
                        Combine::Add => {
                            let chunk = &mut received[..floats];
                            prev.read_exact(as_bytes_mut(chunk))
                                .map_err(peer_error(rank, prev_rank, during, timeout))?;
                            for (l, r) in target.iter_mut().zip(chunk.iter()) {
                                *l += r;
                            }
                        }
                    }
                    done += floats;
                }
                Ok(())
            })();
            let sent = sender.join().expect("the sender thread does not panic");
            receive.and(sent).map_err(abort_or)
        })
    }
}

fn as_bytes(floats: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of it is valid to read; the wire format
    // is little-endian, which this target is (checked at compile time below).
    unsafe {
        std::slice::from_raw_parts(floats.as_ptr().cast::<u8>(), std::mem::size_of_val(floats))
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the TCP ring sends floats in native (little-endian) byte order");

fn as_bytes_mut(floats: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern written is a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(
            floats.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(floats),
        )
    }
}

/// What a ring step does with what it receives.
#[derive(Clone, Copy)]
enum Combine {
    Add,
    Copy,
}

/// Segment `i` of `n` over `len` elements: the first `len % n` segments are one longer.
fn segment(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// Two disjoint ranges of one slice, one shared and one mutable.
fn split(
    data: &mut [f32],
    read: std::ops::Range<usize>,
    write: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    assert!(
        read.end <= write.start || write.end <= read.start,
        "segments are disjoint"
    );
    if read.start < write.start {
        let (a, b) = data.split_at_mut(write.start);
        (&a[read], &mut b[..write.end - write.start])
    } else {
        let (a, b) = data.split_at_mut(read.start);
        (&b[..read.end - read.start], &mut a[write])
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world_size(&self) -> u32 {
        self.world
    }

    /// Blocked sends and receives fail at once; later calls fail too.
    fn abort_handle(&self) -> AbortHandle {
        let streams: Vec<TcpStream> = [&self.next, &self.prev]
            .into_iter()
            .flatten()
            .filter_map(|s| s.try_clone().ok())
            .collect();
        let aborted = self.aborted.clone();
        AbortHandle::new(move || {
            aborted.store(true, Ordering::SeqCst);
            for stream in &streams {
                let _ = stream.shutdown(Shutdown::Both);
            }
        })
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.check_aborted()?;
        let n = self.world as usize;
        if n <= 1 || data.is_empty() {
            return Ok(());
        }
        let r = self.rank as usize;
        for s in 0..n - 1 {
            let send = segment(data.len(), n, (r + n - s) % n);
            let recv = segment(data.len(), n, (r + 2 * n - s - 1) % n);
            let (outgoing, incoming) = split(data, send, recv);
            self.exchange(outgoing, incoming, Combine::Add, "reduce-scatter")?;
        }
        for s in 0..n - 1 {
            let send = segment(data.len(), n, (r + 1 + n - s) % n);
            let recv = segment(data.len(), n, (r + n - s) % n);
            let (outgoing, incoming) = split(data, send, recv);
            self.exchange(outgoing, incoming, Combine::Copy, "all-gather")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_buffer() {
        for len in [0, 1, 5, 7, 100] {
            for n in 1..6 {
                let parts: Vec<_> = (0..n).map(|i| segment(len, n, i)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[n - 1].end, len);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }
}
