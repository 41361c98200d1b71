//! One rank of `scripts/bench allreduce`: joins a TCP ring and times allreduce of float32
//! buffers; rank 0 prints seconds per allreduce for each size as one JSON line.
//!
//! usage: bench_ring RANK ADDRESS... -- MEGABYTES...

use ladder_collective::Collective;
use ladder_collective::ring::TcpRing;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .expect("usage: bench_ring RANK ADDRESS... -- MEGABYTES...");
    let rank: u32 = args[0].parse().expect("rank");
    let addresses: Vec<SocketAddr> = args[1..split]
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    let sizes: Vec<usize> = args[split + 1..]
        .iter()
        .map(|a| a.parse().expect("megabytes"))
        .collect();
    let listener =
        TcpListener::bind(addresses[rank as usize]).expect("binding this rank's address");
    let mut ring = TcpRing::connect(
        rank,
        listener,
        &addresses,
        0,
        b"bench",
        Duration::from_secs(60),
    )
    .expect("joining the ring");
    let mut results = Vec::new();
    for mb in sizes {
        let mut data = vec![1.0f32; mb * 1024 * 1024 / 4];
        ring.all_reduce_sum(&mut data).expect("warm-up allreduce");
        let reps = 3;
        let start = Instant::now();
        for _ in 0..reps {
            ring.all_reduce_sum(&mut data).expect("allreduce");
        }
        results.push(format!(
            "\"{mb}\": {}",
            start.elapsed().as_secs_f64() / reps as f64
        ));
    }
    if rank == 0 {
        println!("{{{}}}", results.join(", "));
    }
}
