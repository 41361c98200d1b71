//! The TCP ring on real loopback sockets, one thread per rank.

use ladder_collective::ring::TcpRing;
use ladder_collective::{Collective, CollectiveError};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// The generation's ring key, as the coordinator's rendezvous hands it out.
const KEY: &[u8] = b"a generation's 32 random bytes..";

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    (listeners, addresses)
}

/// Runs `body(rank, ring)` on every rank of a fresh ring; returns the results by rank.
fn on_ring<T: Send>(
    world: usize,
    timeout: Duration,
    body: impl Fn(u32, TcpRing) -> T + Sync,
) -> Vec<T> {
    let (listeners, addresses) = listeners(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addresses, body) = (&addresses, &body);
                scope.spawn(move || {
                    let ring = TcpRing::connect(rank as u32, listener, addresses, 7, KEY, timeout)
                        .unwrap();
                    body(rank as u32, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn values(rank: u32, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 + rank as usize * 17) % 1000) as f32 * 0.001 + rank as f32)
        .collect()
}

#[test]
fn sums_are_right_and_bitwise_identical_on_every_rank() {
    for world in [2usize, 3, 4] {
        for len in [0usize, 1, 3, 1000, 300_001] {
            let results = on_ring(world, Duration::from_secs(10), |rank, mut ring| {
                assert_eq!((ring.rank(), ring.world_size()), (rank, world as u32));
                let mut data = values(rank, len);
                ring.all_reduce_sum(&mut data).unwrap();
                data
            });
            let inputs: Vec<Vec<f32>> = (0..world as u32).map(|r| values(r, len)).collect();
            let expected: Vec<f64> = (0..len)
                .map(|i| inputs.iter().map(|v| v[i] as f64).sum())
                .collect();
            for (got, want) in results[0].iter().zip(&expected) {
                assert!(
                    (*got as f64 - want).abs() < 1e-3,
                    "world {world}, len {len}"
                );
            }
            for other in &results[1..] {
                let same = other
                    .iter()
                    .zip(&results[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "world {world}, len {len}: ranks differ");
            }
        }
    }
}

#[test]
fn a_ring_of_one_is_a_no_op_and_repeated_calls_work() {
    let (mut listeners, addresses) = listeners(1);
    let mut ring = TcpRing::connect(
        0,
        listeners.remove(0),
        &addresses,
        0,
        KEY,
        Duration::from_secs(1),
    )
    .unwrap();
    let mut data = vec![1.5f32; 10];
    ring.all_reduce_sum(&mut data).unwrap();
    assert_eq!(data, vec![1.5; 10]);
    let results = on_ring(3, Duration::from_secs(10), |_, mut ring| {
        let mut data = vec![1.0f32; 100];
        for _ in 0..5 {
            ring.all_reduce_sum(&mut data).unwrap();
        }
        data[0]
    });
    assert_eq!(results, vec![243.0; 3], "3^5 after five rounds");
}

#[test]
fn a_silent_peer_times_out_naming_it() {
    let results = on_ring(2, Duration::from_millis(300), |rank, mut ring| {
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(1200));
            return None;
        }
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut vec![1.0; 1 << 20]).unwrap_err();
        Some((err, start.elapsed()))
    });
    let (err, took) = results[0].as_ref().unwrap();
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(*took < Duration::from_secs(1), "gave up after {took:?}");
    assert!(err.to_string().contains("peer rank 1"), "{err}");
}

#[test]
fn abort_unblocks_a_waiting_rank_at_once() {
    let results = on_ring(2, Duration::from_secs(30), |rank, mut ring| {
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(700));
            return None;
        }
        let handle = ring.abort_handle();
        let aborter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            handle.abort();
        });
        let start = Instant::now();
        let err = ring.all_reduce_sum(&mut vec![1.0; 1 << 20]).unwrap_err();
        aborter.join().unwrap();
        let again = ring.all_reduce_sum(&mut [1.0]).unwrap_err();
        Some((err, again, start.elapsed()))
    });
    let (err, again, took) = results[0].as_ref().unwrap();
    assert!(matches!(err, CollectiveError::Aborted { rank: 0 }), "{err}");
    assert!(
        matches!(again, CollectiveError::Aborted { .. }),
        "stays aborted: {again}"
    );
    assert!(
        *took < Duration::from_millis(500),
        "abort took {took:?} with a 30 s timeout"
    );
}

#[test]
fn a_peer_from_another_generation_is_refused() {
    let (mut listeners, addresses) = listeners(2);
    let l1 = listeners.pop().unwrap();
    let l0 = listeners.pop().unwrap();
    let other = {
        let addresses = addresses.clone();
        std::thread::spawn(move || {
            TcpRing::connect(1, l1, &addresses, 8, KEY, Duration::from_secs(2)).map(|_| ())
        })
    };
    let err = TcpRing::connect(0, l0, &addresses, 7, KEY, Duration::from_secs(2))
        .err()
        .unwrap();
    let theirs = other.join().unwrap().unwrap_err().to_string();
    // Neither joins, and at least one says why. When rank 1 refused rank 0 first and gave up,
    // its listener is gone, so rank 0's own handshake may end in a reset instead.
    let refused = |e: &str| e.contains("generation 7") || e.contains("generation 8");
    assert!(
        matches!(err, CollectiveError::Handshake { .. })
            || err.to_string().contains("failed (handshake)"),
        "{err}"
    );
    assert!(
        refused(&err.to_string()) || refused(&theirs),
        "neither named the other generation: {err}; {theirs}"
    );
}

/// A stranger reaches rank 0's port before rank 1 does: one connects and stays silent, one
/// answers the challenge without the key. Neither joins, neither breaks the ring: rank 1 is
/// admitted once it comes, and the sums are right.
#[test]
fn strangers_on_the_port_are_not_admitted_and_do_not_break_the_ring() {
    use std::io::{Read, Write};
    let (mut listeners, addresses) = listeners(2);
    let l1 = listeners.pop().unwrap();
    let l0 = listeners.pop().unwrap();
    let timeout = Duration::from_secs(20);
    let rank0 = {
        let addresses = addresses.clone();
        std::thread::spawn(move || {
            let mut ring = TcpRing::connect(0, l0, &addresses, 7, KEY, timeout)?;
            let mut data = vec![1.0f32; 1000];
            ring.all_reduce_sum(&mut data).map(|()| data)
        })
    };
    let silent = std::net::TcpStream::connect(addresses[0]).unwrap();
    let mut forger = std::net::TcpStream::connect(addresses[0]).unwrap();
    let mut challenge = [0u8; 40];
    forger
        .read_exact(&mut challenge)
        .unwrap_or_else(|_| panic!("the listener challenges every connection at once"));
    // Rank 1's header with a made-up proof.
    let mut answer = vec![0u8; 56];
    answer[..8].copy_from_slice(b"LADRING1");
    answer[8..12].copy_from_slice(&1u32.to_le_bytes());
    answer[12..16].copy_from_slice(&2u32.to_le_bytes());
    answer[16..24].copy_from_slice(&7u64.to_le_bytes());
    forger.write_all(&answer).unwrap();
    let mut admitted = [0u8; 1];
    assert!(
        !matches!(forger.read(&mut admitted), Ok(1)),
        "a connection without the key was admitted"
    );
    let mut ring = TcpRing::connect(1, l1, &addresses, 7, KEY, timeout).unwrap();
    let mut data = vec![2.0f32; 1000];
    ring.all_reduce_sum(&mut data).unwrap();
    assert!(data.iter().all(|&x| x == 3.0));
    assert!(rank0.join().unwrap().unwrap().iter().all(|&x| x == 3.0));
    drop(silent);
}

#[test]
fn ranks_with_different_keys_refuse_each_other() {
    let (mut listeners, addresses) = listeners(2);
    let l1 = listeners.pop().unwrap();
    let l0 = listeners.pop().unwrap();
    let timeout = Duration::from_secs(2);
    let other = {
        let addresses = addresses.clone();
        std::thread::spawn(move || {
            TcpRing::connect(1, l1, &addresses, 7, b"another key", timeout).map(|_| ())
        })
    };
    let err = TcpRing::connect(0, l0, &addresses, 7, KEY, timeout)
        .err()
        .unwrap();
    // Each refuses the other: neither holds the key the other checks against.
    assert!(err.to_string().contains("did not admit this rank"), "{err}");
    // Rank 1 is refused too; or, when rank 0 was refused first and gave up, its listener is
    // gone mid-handshake and rank 1's handshake with it fails (a race the test cannot order).
    let theirs = other.join().unwrap().unwrap_err().to_string();
    assert!(
        theirs.contains("did not admit this rank")
            || theirs.contains("connection to rank 0 failed (handshake)"),
        "{theirs}"
    );
}

/// Strangers that connect to `address` and never say a word: `STRANGERS` of them before
/// `body` runs, then a new one every few milliseconds while it runs.
fn with_silent_strangers<T>(address: SocketAddr, body: impl FnOnce() -> T) -> T {
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicBool, Ordering};
    const STRANGERS: usize = 40;
    let early: Vec<TcpStream> = (0..STRANGERS)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let mut late = Vec::new();
            // Bounded, so that a listener that stops accepting cannot keep this test going.
            for _ in 0..300 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                late.extend(TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok());
                std::thread::sleep(Duration::from_millis(2));
            }
            late
        });
        let result = body();
        stop.store(true, Ordering::SeqCst);
        drop(flood.join().unwrap());
        result
    });
    drop(early);
    result
}

/// Silent connections on rank 1's port, before and while rank 0 comes, each of which would
/// hold a listener that challenges one connection at a time for seconds: rank 0 is admitted
/// at once all the same, and the sums are right.
#[test]
fn a_flood_of_silent_strangers_does_not_keep_the_previous_rank_out() {
    let (mut listeners, addresses) = listeners(2);
    let l1 = listeners.pop().unwrap();
    let l0 = listeners.pop().unwrap();
    let timeout = Duration::from_secs(10);
    let (took, sums) = with_silent_strangers(addresses[1], || {
        let start = Instant::now();
        std::thread::scope(|scope| {
            let rank1 = scope.spawn(|| TcpRing::connect(1, l1, &addresses, 7, KEY, timeout));
            // Rank 0 arrives in the middle of the flood.
            std::thread::sleep(Duration::from_millis(200));
            let rank0 = scope.spawn(|| TcpRing::connect(0, l0, &addresses, 7, KEY, timeout));
            let rings = [rank0.join().unwrap(), rank1.join().unwrap()];
            let took = start.elapsed();
            let sums: Vec<Vec<f32>> = std::thread::scope(|scope| {
                let handles: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(rank, ring)| {
                        scope.spawn(move || {
                            let mut ring = ring.unwrap_or_else(|e| panic!("{e}"));
                            let mut data = vec![rank as f32 + 1.0; 1000];
                            ring.all_reduce_sum(&mut data).unwrap();
                            data
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            (took, sums)
        })
    });
    assert!(took < timeout, "the ring took {took:?} to form");
    for data in sums {
        assert!(data.iter().all(|&x| x == 3.0));
    }
}

/// Only silent strangers on rank 1's port, never rank 0: rank 1 gives up when its timeout is
/// over, not after the strangers' handshakes have run out one by one, and says what it refused.
#[test]
fn silent_strangers_alone_fail_the_handshake_within_the_timeout() {
    use std::io::{Read, Write};
    let (mut listeners, addresses) = listeners(2);
    let l1 = listeners.pop().unwrap();
    let l0 = listeners.pop().unwrap();
    // Rank 1's next rank (0) admits it, so that what fails is rank 1 waiting for its previous.
    let next = std::thread::spawn(move || {
        let (mut stream, _) = l0.accept().unwrap();
        let mut challenge = [0u8; 40];
        challenge[..8].copy_from_slice(b"LADRING1");
        stream.write_all(&challenge).unwrap();
        stream.read_exact(&mut [0u8; 56]).unwrap();
        stream.write_all(&[1]).unwrap();
        stream
    });
    let timeout = Duration::from_secs(2);
    let (err, took) = with_silent_strangers(addresses[1], || {
        let start = Instant::now();
        let err = TcpRing::connect(1, l1, &addresses, 7, KEY, timeout)
            .err()
            .expect("no rank 0 to join");
        (err, start.elapsed())
    });
    drop(next.join().unwrap());
    assert!(
        took < timeout + Duration::from_secs(1),
        "gave up after {took:?} with a {timeout:?} timeout"
    );
    assert!(
        matches!(err, CollectiveError::Handshake { rank: 1, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("rank 0 did not join"), "{message}");
    assert!(message.contains("connection(s) refused"), "{message}");
}
