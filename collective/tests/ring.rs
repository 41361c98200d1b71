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
    assert!(matches!(err, CollectiveError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("generation 7"), "{err}");
    assert!(other.join().unwrap().is_err());
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
        .unwrap_or_else(|_| panic!("the listener challenges every connection in turn"));
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
    let theirs = other.join().unwrap().unwrap_err().to_string();
    assert!(theirs.contains("did not admit this rank"), "{theirs}");
}
