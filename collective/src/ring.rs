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
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::VecDeque;
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

/// The longest one connection may take to answer its challenge: a stranger that connects and
/// stays silent holds a slot this long at most, not until the ring's deadline.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
/// The most connections waiting at once for their answers: a flood of strangers costs this
/// many sockets at most, the longest-waiting dropped for each newcomer, so the previous rank,
/// which answers at once, always gets a slot.
const MAX_PENDING: usize = 64;
/// A listener's challenge: [`MAGIC`] and a random nonce.
const CHALLENGE: usize = 8 + NONCE;
const NONCE: usize = 32;
/// A connector's answer: its header and the HMAC-SHA256 of the nonce and that header.
const ANSWER: usize = 24 + 32;
/// The listener's last byte of a handshake: this connection is admitted.
const ADMITTED: u8 = 1;

/// What proves that the connecting side holds the generation's key: an HMAC over the
/// listener's fresh nonce (so an answer seen once cannot be replayed) and the header it sends.
fn proof(key: &hmac::Key, nonce: &[u8], header: &[u8; 24]) -> hmac::Tag {
    let mut context = hmac::Context::with_key(key);
    context.update(nonce);
    context.update(header);
    context.sign()
}

/// Who may join: `rank` of `world` in `generation`, holding `key`.
struct Membership<'a> {
    rank: u32,
    world: u32,
    generation: u64,
    key: &'a hmac::Key,
    timeout: Duration,
    deadline: Instant,
}

impl Membership<'_> {
    fn next_rank(&self) -> u32 {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> u32 {
        (self.rank + self.world - 1) % self.world
    }

    /// Connects to the next rank (its listener already exists, retrying while it starts),
    /// answers its challenge and waits to be admitted.
    fn join_next(&self, address: &SocketAddr) -> Result<TcpStream, CollectiveError> {
        let (rank, next_rank, timeout) = (self.rank, self.next_rank(), self.timeout);
        let mut next = loop {
            match TcpStream::connect_timeout(address, timeout) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < self.deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(peer_error(rank, next_rank, "connecting", timeout)(e)),
            }
        };
        next.set_nodelay(true).ok();
        next.set_write_timeout(Some(timeout)).ok();
        next.set_read_timeout(Some(timeout)).ok();
        let handshake = peer_error(rank, next_rank, "handshake", timeout);
        let mut challenge = [0u8; CHALLENGE];
        next.read_exact(&mut challenge).map_err(&handshake)?;
        if &challenge[..8] != MAGIC {
            return Err(CollectiveError::Handshake {
                rank,
                message: format!("{address} (rank {next_rank}) is not a Ladder ring listener"),
            });
        }
        let mine = header(rank, self.world, self.generation);
        let tag = proof(self.key, &challenge[8..], &mine);
        next.write_all(&[&mine[..], tag.as_ref()].concat())
            .map_err(&handshake)?;
        let mut admitted = [0u8; 1];
        match next.read_exact(&mut admitted) {
            Ok(()) if admitted[0] == ADMITTED => Ok(next),
            _ => Err(CollectiveError::Handshake {
                rank,
                message: format!(
                    "rank {next_rank} at {address} did not admit this rank to generation {} \
                     (a ring of another generation or key?)",
                    self.generation
                ),
            }),
        }
    }

    /// Admits the previous rank: a connection that does not prove it holds the key, or says
    /// it is someone else, is dropped and the listener goes on waiting, so a stranger on the
    /// port can neither join nor break the ring. Every connection is challenged as soon as it
    /// is accepted and its answer read without blocking, side by side with accepting more: a
    /// stranger that stays silent holds one of [`MAX_PENDING`] slots, never the listener, and
    /// no number of them keeps this rank waiting past its deadline.
    fn admit_previous(
        &self,
        listener: &TcpListener,
        given_up: &AtomicBool,
    ) -> Result<TcpStream, CollectiveError> {
        let (rank, prev_rank, timeout) = (self.rank, self.prev_rank(), self.timeout);
        listener.set_nonblocking(true).ok();
        let mut pending = VecDeque::<Challenged>::with_capacity(MAX_PENDING);
        let mut refused = Refused::default();
        loop {
            // Checked on every round, not only when the port is quiet: connections that keep
            // coming must not keep this rank here.
            if Instant::now() >= self.deadline || given_up.load(Ordering::SeqCst) {
                for silent in pending {
                    refused.add(silent.from, "no answer to the challenge in time");
                }
                return Err(match refused.last {
                    None => CollectiveError::Timeout {
                        rank,
                        peer: prev_rank,
                        timeout,
                        during: "waiting for the previous rank to connect",
                    },
                    Some(last) => CollectiveError::Handshake {
                        rank,
                        message: format!(
                            "rank {prev_rank} did not join within {timeout:?}; {} \
                             connection(s) refused, the last from {last}",
                            refused.count
                        ),
                    },
                });
            }
            let mut busy = false;
            match listener.accept() {
                Ok((stream, from)) => {
                    busy = true;
                    match Challenged::send(stream, from) {
                        Ok(challenged) => {
                            if pending.len() == MAX_PENDING {
                                let oldest = pending.pop_front().expect("the list is full");
                                refused.add(oldest.from, "no answer before newer connections");
                            }
                            pending.push_back(challenged);
                        }
                        Err(why) => refused.add(from, why),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Its client reset it before it was accepted: nothing to admit, no reason to fail.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => return Err(peer_error(rank, prev_rank, "accepting", timeout)(e)),
            }
            let now = Instant::now();
            let mut i = 0;
            while i < pending.len() {
                match pending[i].read_answer(now) {
                    Ok(false) => i += 1,
                    answered => {
                        busy = true;
                        let challenged = pending.remove(i).expect("i is in the list");
                        let from = challenged.from;
                        match answered.and_then(|_| self.admit(challenged)) {
                            Ok(prev) => return Ok(prev),
                            Err(why) => refused.add(from, why),
                        }
                    }
                }
            }
            if !busy {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Admits a connection that has answered its challenge in full if the answer proves that
    /// it holds this generation's key and says it is the previous rank.
    fn admit(&self, challenged: Challenged) -> Result<TcpStream, String> {
        let Challenged {
            mut stream,
            nonce,
            answer,
            ..
        } = challenged;
        let theirs: [u8; 24] = answer[..24].try_into().expect("24 bytes");
        hmac::verify(self.key, &[&nonce[..], &theirs[..]].concat(), &answer[24..])
            .map_err(|_| "it does not hold this generation's ring key".to_owned())?;
        let prev_rank = self.prev_rank();
        if theirs != header(prev_rank, self.world, self.generation) {
            return Err(format!(
                "expected rank {prev_rank} of {} in generation {}, it announced {:?}",
                self.world,
                self.generation,
                (
                    u32::from_le_bytes(theirs[8..12].try_into().expect("4 bytes")),
                    u32::from_le_bytes(theirs[12..16].try_into().expect("4 bytes")),
                    u64::from_le_bytes(theirs[16..24].try_into().expect("8 bytes"))
                )
            ));
        }
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(self.timeout)).ok();
        stream
            .write_all(&[ADMITTED])
            .map_err(|e| format!("cannot admit it ({e})"))?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(self.timeout)).ok();
        Ok(stream)
    }
}

/// The connections a listener turned away: how many, and the last with why.
#[derive(Default)]
struct Refused {
    count: usize,
    last: Option<String>,
}

impl Refused {
    fn add(&mut self, from: SocketAddr, why: impl std::fmt::Display) {
        self.count += 1;
        self.last = Some(format!("{from}: {why}"));
    }
}

/// A connection that has been sent its challenge and not yet answered it in full.
struct Challenged {
    stream: TcpStream,
    from: SocketAddr,
    nonce: [u8; NONCE],
    answer: [u8; ANSWER],
    received: usize,
    /// When it is dropped if its answer is not complete.
    until: Instant,
}

impl Challenged {
    /// Sends `stream` a fresh challenge and leaves it non-blocking for the answer.
    fn send(mut stream: TcpStream, from: SocketAddr) -> Result<Challenged, String> {
        let mut nonce = [0u8; NONCE];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the system has no random numbers".to_owned())?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        // A fresh connection's send buffer is empty: the challenge goes out whole, at once.
        stream
            .write_all(&[&MAGIC[..], &nonce[..]].concat())
            .map_err(|e| format!("cannot send the challenge ({e})"))?;
        Ok(Challenged {
            stream,
            from,
            nonce,
            answer: [0; ANSWER],
            received: 0,
            until: Instant::now() + HANDSHAKE_WAIT,
        })
    }

    /// Reads what has arrived of the answer without waiting: `Ok(true)` once it is complete,
    /// `Ok(false)` while more may come before `until`.
    fn read_answer(&mut self, now: Instant) -> Result<bool, String> {
        loop {
            match self.stream.read(&mut self.answer[self.received..]) {
                Ok(0) => return Err("it hung up without answering the challenge".to_owned()),
                Ok(n) => {
                    self.received += n;
                    if self.received == ANSWER {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if now < self.until {
                        Ok(false)
                    } else {
                        Err(format!(
                            "no answer to the challenge within {HANDSHAKE_WAIT:?}"
                        ))
                    };
                }
                Err(e) => return Err(format!("no answer to the challenge ({e})")),
            }
        }
    }
}

impl TcpRing {
    /// Joins the ring as `rank` of `addresses.len()`: `listener` is this rank's own (bound before
    /// its address was published), `addresses[r]` rank `r`'s. Only the generation's ranks get
    /// in: each connection proves it holds `key` (the generation's secret, from the
    /// coordinator's rendezvous) and names `generation`, so neither a stranger on the port nor
    /// a straggler from an older membership can join.
    pub fn connect(
        rank: u32,
        listener: TcpListener,
        addresses: &[SocketAddr],
        generation: u64,
        key: &[u8],
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
        if key.is_empty() {
            return Err(CollectiveError::Handshake {
                rank,
                message: "no ring key: the coordinator gives one with the rendezvous".to_owned(),
            });
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let membership = Membership {
            rank,
            world,
            generation,
            key: &key,
            timeout,
            deadline: Instant::now() + timeout,
        };
        let given_up = AtomicBool::new(false);
        // Both sides at once: every rank connects to its next while admitting its previous.
        let (next, prev) = std::thread::scope(|scope| {
            let admitting = scope.spawn(|| membership.admit_previous(&listener, &given_up));
            let next = membership.join_next(&addresses[membership.next_rank() as usize]);
            if next.is_err() {
                given_up.store(true, Ordering::SeqCst);
            }
            let prev = admitting.join().expect("admitting does not panic");
            (next, prev)
        });
        let (next, prev) = (next?, prev?);
        next.set_read_timeout(None).ok();
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
