//! ImageNet-21k's shape, as the benchmarks simulate it.

pub const SAMPLES: u64 = 12_720_275;
pub const SHARDS: u64 = 12_721;

/// Shard sizes as even as the total allows (999 or 1000 here), summing to exactly `SAMPLES`.
pub fn shard_sizes() -> Vec<u32> {
    (0..SHARDS)
        .map(|i| (SAMPLES * (i + 1) / SHARDS - SAMPLES * i / SHARDS) as u32)
        .collect()
}
