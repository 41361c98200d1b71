//! `scripts/bench reduce`: a step's reduction on the CPU ring, two ranks (threads) on loopback,
//! for the demo's model (tiny) and for S: the fused reduction (one call over the flat buffer of
//! gradients, BatchNorm shares and step statistics) beside the separate calls a step made
//! before (the gradients in buckets of 16M elements, the BatchNorm statistics, the step's
//! statistics), in alternating rounds. Prints calls, bytes and milliseconds per step of each,
//! and their ratio.

use ladder_collective::ring::TcpRing;
use ladder_collective::{Collective, CollectiveError};
use ladder_core::spec::Variant;
use ladder_train::data_parallel::{StatisticsBlock, all_reduce_range, all_reduce_step};
use ladder_train::flat::{FlatState, Layout};
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use std::net::TcpListener;
use std::time::{Duration, Instant};
use tch::{Device, nn};

/// The old default bucket of the ring's gradient calls.
const BUCKET: i64 = 16 << 20;
const ROUNDS: usize = 5;
const STEPS: usize = 20;

/// The separate calls a step made before the fusion; returns how many.
fn separate(
    flat: &FlatState,
    statistics: &StatisticsBlock,
    ring: &mut dyn Collective,
) -> Result<usize, CollectiveError> {
    let mut calls = 0;
    let grads = flat.grads.numel() as i64;
    for start in (0..grads).step_by(BUCKET as usize) {
        all_reduce_range(&flat.grads, start..(start + BUCKET).min(grads), ring)?;
        calls += 1;
    }
    let keep = 1.0 - statistics.momentum;
    tch::no_grad(|| {
        flat.buffers
            .shallow_clone()
            .copy_(&((&flat.buffers - statistics.start * keep) * keep));
    });
    all_reduce_range(&flat.buffers, 0..flat.buffers.numel() as i64, ring)?;
    let stats = flat.step_statistics().copy();
    all_reduce_range(&stats, 0..stats.numel() as i64, ring)?;
    Ok(calls + 2)
}

/// Milliseconds per step of the separate and the fused reduction, and the calls of each.
fn rank(
    variant: Variant,
    rank: u32,
    listener: TcpListener,
    addresses: &[std::net::SocketAddr],
) -> [(f64, usize); 2] {
    tch::manual_seed(1);
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = BatchNormConfig {
        eps: 1e-3,
        momentum: 0.01,
    };
    let _model = EfficientNetV2::new(&vs.root(), &Architecture::of(variant), 1000, bn);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let start = flat.buffers.copy();
    let mut ring = TcpRing::connect(
        rank,
        listener,
        addresses,
        0,
        b"bench",
        Duration::from_secs(60),
    )
    .expect("joining the ring");
    let statistics = StatisticsBlock {
        start: &start,
        momentum: 0.01,
        block: rank..rank + 1,
        micro_per_step: 2,
    };
    let mut totals = [(Duration::ZERO, 0usize); 2];
    for _ in 0..ROUNDS {
        for (i, fused) in [false, true].into_iter().enumerate() {
            let _ = flat.reduced.shallow_clone().fill_(1.0 / 1024.0);
            let started = Instant::now();
            for _ in 0..STEPS {
                let calls = if fused {
                    all_reduce_step(&flat, statistics.clone(), &mut ring).map(|()| 1)
                } else {
                    separate(&flat, &statistics, &mut ring)
                };
                totals[i].1 = calls.expect("reduction");
            }
            totals[i].0 += started.elapsed();
        }
    }
    totals.map(|(took, calls)| (took.as_secs_f64() * 1e3 / (ROUNDS * STEPS) as f64, calls))
}

fn main() {
    tch::set_num_threads(1);
    for (name, variant) in [("tiny (the demo's)", Variant::Tiny), ("S", Variant::S)] {
        let listeners: Vec<TcpListener> = (0..2)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addresses: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let results: Vec<[(f64, usize); 2]> = std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(r, listener)| {
                    let addresses = &addresses;
                    scope.spawn(move || rank(variant, r as u32, listener, addresses))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let [(before, calls_before), (after, calls_after)] = results[0];
        let elements = {
            let vs = nn::VarStore::new(Device::Cpu);
            let bn = BatchNormConfig {
                eps: 1e-3,
                momentum: 0.01,
            };
            let _m = EfficientNetV2::new(&vs.root(), &Architecture::of(variant), 1000, bn);
            FlatState::new(&vs, Layout::Contiguous).reduced.numel()
        };
        println!(
            "{name}: {:.1} MB reduced per step; separate calls: {calls_before} per step, \
             {before:.2} ms; fused: {calls_after} per step, {after:.2} ms; fused/separate \
             time {:.2}",
            elements as f64 * 4.0 / 1e6,
            after / before
        );
    }
}
