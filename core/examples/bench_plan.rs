//! `scripts/bench plan`: plans one ImageNet-21k epoch the way a job of 1024 ranks consumes it,
//! every rank asking for its micro-batches at every step, and checks the time and memory goals.
//! A second, untimed pass replays the epoch to verify that it is a permutation.

use ladder_core::sample::{EpochOrder, SamplePlan};
use std::hint::black_box;
use std::time::Instant;

#[path = "common/imagenet21k.rs"]
mod imagenet21k;
use imagenet21k::{SAMPLES, SHARDS, shard_sizes};

const GLOBAL_BATCH: u32 = 4096;
const MICRO_BATCH: u32 = 4;
const WORLD: u32 = 1024;
const WINDOW: u32 = 4;
const SEED: u64 = 0x1adde5;
const GOAL_SECONDS: f64 = 1.0;
const GOAL_RSS_MB: f64 = 500.0;

/// Walks the epoch as the ranks do, then its dropped tail, handing every sample id to `visit`;
/// returns an order-sensitive checksum of the ids, which also keeps the work from being
/// optimized away.
fn walk_epoch(order: &mut EpochOrder<&SamplePlan>, steps: u64, mut visit: impl FnMut(u64)) -> u64 {
    let mut checksum = 0xcbf2_9ce4_8422_2325u64;
    let mut fold = |id: u64| {
        visit(id);
        checksum = (checksum ^ id).wrapping_mul(0x0100_0000_01b3);
    };
    for step in 0..steps {
        for rank in 0..WORLD {
            let micro_batches = order
                .rank_step(step, MICRO_BATCH, rank, WORLD)
                .expect("the world size divides the micro-batches");
            for id in micro_batches.into_iter().flatten() {
                fold(id);
            }
        }
    }
    for id in order.dropped() {
        fold(id);
    }
    checksum
}

/// Peak resident memory of this process in MB (VmHWM).
fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb / 1024.0
}

fn verdict(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

fn main() {
    let sizes = shard_sizes();
    assert_eq!(sizes.iter().map(|&n| n as u64).sum::<u64>(), SAMPLES);

    let start = Instant::now();
    let plan = SamplePlan::new(&sizes, SEED, WINDOW, GLOBAL_BATCH).expect("a valid plan");
    let steps = plan.steps_per_epoch();
    let checksum = walk_epoch(&mut plan.epoch(0), steps, |_| {});
    let seconds = start.elapsed().as_secs_f64();
    black_box(checksum);

    // Each id must turn up exactly once, whether trained or dropped.
    let mut seen = vec![0u64; SAMPLES.div_ceil(64) as usize];
    let replayed = walk_epoch(&mut plan.epoch(0), steps, |id| {
        let (word, bit) = ((id / 64) as usize, 1u64 << (id % 64));
        assert!(seen[word] & bit == 0, "sample {id} appears twice");
        seen[word] |= bit;
    });
    let distinct: u64 = seen.iter().map(|w| w.count_ones() as u64).sum();
    assert_eq!(distinct, SAMPLES, "the epoch misses samples");
    assert_eq!(replayed, checksum, "the same epoch came out differently");
    let rss_mb = peak_rss_mb();

    let dropped = SAMPLES - steps * GLOBAL_BATCH as u64;
    println!(
        "plan: one ImageNet-21k epoch, {SAMPLES} samples in {SHARDS} shards, window {WINDOW}, \
         global batch {GLOBAL_BATCH}, micro-batch {MICRO_BATCH}, {WORLD} ranks"
    );
    println!(
        "  {steps} steps x {WORLD} ranks, {dropped} samples dropped; permutation verified; \
         checksum {checksum:016x}"
    );
    let time_ok = seconds < GOAL_SECONDS;
    let rss_ok = rss_mb < GOAL_RSS_MB;
    println!(
        "  wall time (plan + epoch): {seconds:>8.3} s   goal < {GOAL_SECONDS} s    {}",
        verdict(time_ok)
    );
    println!(
        "  peak resident memory:     {rss_mb:>8.1} MB  goal < {GOAL_RSS_MB} MB  {}",
        verdict(rss_ok)
    );
    if !(time_ok && rss_ok) {
        std::process::exit(1);
    }
}
