//! The sample plan: which samples form every micro-batch of every step (DESIGN.md, idea 2).
//!
//! For epoch `e` the plan defines one global order of all samples: the shards are shuffled
//! (seeded by job seed and epoch), cut into windows of `window` consecutive shards, and the
//! samples inside each window are shuffled. Reading stays local (a stretch of the order touches
//! few shards) while every epoch is still a permutation of the whole dataset.
//!
//! With a shuffle block `b > 1`, a window's samples are shuffled in blocks of up to `b`
//! consecutive samples of one shard (each shard cut at an offset drawn for it each epoch, so
//! that the same neighbours do not meet every epoch; its first and last blocks may be
//! shorter), which stay together in the order: a micro-batch then holds runs of neighbours that
//! the loader reads with one ranged read each, where one read per sample would be random access
//! on a shared file system. It trades mixing for it (neighbours in a shard share micro-batches),
//! so it suits shards written in random order. `b = 1` is exactly the plain shuffle.
//!
//! Global step `s` takes positions `[s * G, (s + 1) * G)` of the order (`G` = global batch),
//! cut into micro-batches of the stage's size `m`; rank `r` of `N` takes the contiguous block of
//! micro-batches `[r * M / N, (r + 1) * M / N)` (`M = G / m`, which `N` divides). The
//! micro-batches, and so their BatchNorm groups, do not depend on `N`: a job resumed on another
//! number of workers sees the same data. Every rank has the same number of steps, and the last
//! `total % G` positions of each epoch are dropped (a different tail each epoch), so each sample
//! is trained at most once per epoch and exactly once in every epoch whose tail misses it.

use crate::rng::Stream;
use crate::spec::{JobSpec, MAX_SHUFFLE_BLOCK};
use std::borrow::Borrow;
use std::ops::Range;

const SHARD_ORDER_STREAM: u64 = 0x5348_4152; // "SHAR"
const WINDOW_STREAM: u64 = 0x5749_4e44; // "WIND"
const TALLY_STREAM: u64 = 0x5441_4c59; // "TALY"
const BLOCK_STREAM: u64 = 0x424c_4f43; // "BLOC"

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the dataset has {total} samples, fewer than the global batch of {global}: an epoch would have no step"
    )]
    TooFewSamples { total: u64, global: u32 },
    #[error("{what} must be at least 1")]
    Zero { what: &'static str },
    #[error(
        "world size {world} does not divide the {micro_per_step} micro-batches of a step (global batch {global} / micro-batch {micro}); ranks take whole micro-batches"
    )]
    WorldSize {
        world: u32,
        micro_per_step: u32,
        global: u32,
        micro: u32,
    },
    #[error("a shuffle block of {0} samples is too large; at most {MAX_SHUFFLE_BLOCK}")]
    ShuffleBlock(u32),
    #[error("micro-batch {micro} does not divide the global batch {global}")]
    MicroBatch { micro: u32, global: u32 },
}

/// A sample's place in the dataset: its shard and its index inside the shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleLocation {
    pub shard: u32,
    pub index: u32,
}

/// The plan of a job's data: fixed by the dataset's shard sizes, the seed, the window and the
/// global batch.
#[derive(Clone, Debug)]
pub struct SamplePlan {
    /// `shard_starts[i]` is the id of shard `i`'s first sample; one extra entry holds the total.
    shard_starts: Vec<u64>,
    seed: u64,
    window: u32,
    global_batch: u32,
    shuffle_block: u32,
}

impl SamplePlan {
    pub fn new(
        shard_sizes: &[u32],
        seed: u64,
        window: u32,
        global_batch: u32,
    ) -> Result<SamplePlan, PlanError> {
        if window == 0 {
            return Err(PlanError::Zero {
                what: "the shard window",
            });
        }
        if global_batch == 0 {
            return Err(PlanError::Zero {
                what: "the global batch",
            });
        }
        let mut shard_starts = Vec::with_capacity(shard_sizes.len() + 1);
        let mut total = 0u64;
        for &n in shard_sizes {
            shard_starts.push(total);
            total += n as u64;
        }
        shard_starts.push(total);
        if total < global_batch as u64 {
            return Err(PlanError::TooFewSamples {
                total,
                global: global_batch,
            });
        }
        Ok(SamplePlan {
            shard_starts,
            seed,
            window,
            global_batch,
            shuffle_block: 1,
        })
    }

    /// The plan of a job's training data (`shard_sizes` from its manifest).
    pub fn of_job(spec: &JobSpec, shard_sizes: &[u32]) -> Result<SamplePlan, PlanError> {
        SamplePlan::new(
            shard_sizes,
            spec.schedule.seed,
            spec.data.shard_window,
            spec.batch.global,
        )?
        .with_shuffle_block(spec.data.shuffle_block)
    }

    /// The plan shuffling each window in blocks of `block` consecutive samples of a shard
    /// (see the module's documentation); 1 keeps the plain shuffle.
    pub fn with_shuffle_block(self, block: u32) -> Result<SamplePlan, PlanError> {
        match block {
            0 => Err(PlanError::Zero {
                what: "the shuffle block",
            }),
            b if b > MAX_SHUFFLE_BLOCK => Err(PlanError::ShuffleBlock(b)),
            _ => Ok(SamplePlan {
                shuffle_block: block,
                ..self
            }),
        }
    }

    pub fn total_samples(&self) -> u64 {
        *self.shard_starts.last().unwrap_or(&0)
    }

    pub fn shard_count(&self) -> u32 {
        (self.shard_starts.len() - 1) as u32
    }

    pub fn global_batch(&self) -> u32 {
        self.global_batch
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// Steps in every epoch: the same for all ranks and all world sizes.
    pub fn steps_per_epoch(&self) -> u64 {
        self.total_samples() / self.global_batch as u64
    }

    fn shard_size(&self, shard: u32) -> u64 {
        self.shard_starts[shard as usize + 1] - self.shard_starts[shard as usize]
    }

    /// Where sample `id` lives.
    pub fn locate(&self, id: u64) -> SampleLocation {
        assert!(
            id < self.total_samples(),
            "sample {id} is beyond the dataset"
        );
        let shard = self.shard_starts.partition_point(|&start| start <= id) - 1;
        SampleLocation {
            shard: shard as u32,
            index: (id - self.shard_starts[shard]) as u32,
        }
    }

    /// Checks that `world` ranks can share micro-batches of `micro`, and returns the
    /// micro-batches per step.
    pub fn micro_batches_per_step(&self, micro: u32, world: u32) -> Result<u32, PlanError> {
        if micro == 0 || !self.global_batch.is_multiple_of(micro) {
            return Err(PlanError::MicroBatch {
                micro,
                global: self.global_batch,
            });
        }
        let micro_per_step = self.global_batch / micro;
        if world == 0 || !micro_per_step.is_multiple_of(world) {
            return Err(PlanError::WorldSize {
                world,
                micro_per_step,
                global: self.global_batch,
                micro,
            });
        }
        Ok(micro_per_step)
    }

    /// The order of epoch `epoch`. Building it costs one shuffle of the shards; windows are
    /// shuffled lazily as positions inside them are asked for.
    pub fn epoch(&self, epoch: u32) -> EpochOrder<&SamplePlan> {
        EpochOrder::new(self, epoch)
    }
}

/// What was trained of one epoch: how many samples, and an order-free digest of which (the
/// wrapping sum of a 64-bit mix of each (epoch, sample id)). Tallies add up across steps,
/// ranks and checkpoints; two tallies of the same epoch agree only if the same samples were
/// used the same number of times (a sample lost and another counted twice changes the digest,
/// except with probability about 2^-64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EpochTally {
    pub samples: u64,
    pub digest: u64,
    /// Samples the plan gave that could not be used (not in `samples` or `digest`).
    #[serde(default)]
    pub skipped: u64,
}

impl EpochTally {
    /// A sample's contribution to its epoch's digest.
    pub fn mark(epoch: u32, id: u64) -> u64 {
        Stream::new(id, &[TALLY_STREAM, epoch as u64]).next_u64()
    }

    pub fn add_samples(&mut self, epoch: u32, ids: &[u64]) {
        for &id in ids {
            self.samples += 1;
            self.digest = self.digest.wrapping_add(Self::mark(epoch, id));
        }
    }

    pub fn merge(&mut self, other: EpochTally) {
        self.samples += other.samples;
        self.digest = self.digest.wrapping_add(other.digest);
        self.skipped += other.skipped;
    }

    /// Takes back what `merge(other)` added.
    pub fn unmerge(&mut self, other: EpochTally) {
        self.samples -= other.samples;
        self.digest = self.digest.wrapping_sub(other.digest);
        self.skipped -= other.skipped;
    }

    /// What training every step of `epoch` of `plan` exactly once adds up to.
    pub fn expected<P: Borrow<SamplePlan>>(plan: P, epoch: u32) -> EpochTally {
        let p = plan.borrow();
        let used = p.steps_per_epoch() * p.global_batch() as u64;
        let ids = EpochOrder::new(p, epoch).samples(0..used);
        let mut tally = EpochTally::default();
        tally.add_samples(epoch, &ids);
        tally
    }
}

/// The block of micro-batch indices that rank `rank` of `world` takes at every step.
pub fn rank_micro_batches(micro_per_step: u32, rank: u32, world: u32) -> Range<u32> {
    let per_rank = micro_per_step / world;
    rank * per_rank..(rank + 1) * per_rank
}

/// One epoch's global sample order, over a borrowed or shared (`Arc`) plan.
pub struct EpochOrder<P: Borrow<SamplePlan>> {
    plan: P,
    epoch: u32,
    /// Non-empty shards in this epoch's order.
    shards: Vec<u32>,
    /// Position of each window's first sample; one extra entry holds the total.
    window_starts: Vec<u64>,
    /// The most recently shuffled window: consecutive requests mostly fall into it.
    cached: Option<(usize, Vec<u64>)>,
}

impl<P: Borrow<SamplePlan>> EpochOrder<P> {
    pub fn new(plan: P, epoch: u32) -> EpochOrder<P> {
        let p = plan.borrow();
        let mut shards: Vec<u32> = (0..p.shard_count())
            .filter(|&s| p.shard_size(s) > 0)
            .collect();
        Stream::new(p.seed, &[SHARD_ORDER_STREAM, epoch as u64]).shuffle(&mut shards);
        let mut window_starts = Vec::with_capacity(shards.len() / p.window as usize + 2);
        let mut position = 0u64;
        for group in shards.chunks(p.window as usize) {
            window_starts.push(position);
            position += group.iter().map(|&s| p.shard_size(s)).sum::<u64>();
        }
        window_starts.push(position);
        EpochOrder {
            plan,
            epoch,
            shards,
            window_starts,
            cached: None,
        }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn window_count(&self) -> usize {
        self.window_starts.len() - 1
    }

    /// The sample ids at `positions` of the epoch's order.
    pub fn samples(&mut self, positions: Range<u64>) -> Vec<u64> {
        let mut out = Vec::with_capacity((positions.end - positions.start) as usize);
        let mut at = positions.start;
        while at < positions.end {
            let w = self.window_starts.partition_point(|&start| start <= at) - 1;
            let window_end = self.window_starts[w + 1];
            let until = positions.end.min(window_end);
            let base = self.window_starts[w];
            let window = self.window_samples(w);
            out.extend_from_slice(&window[(at - base) as usize..(until - base) as usize]);
            at = until;
        }
        out
    }

    /// The samples of micro-batch `k` of `step` at micro-batch size `micro`.
    pub fn micro_batch(&mut self, step: u64, micro: u32, k: u32) -> Vec<u64> {
        let start = step * self.plan.borrow().global_batch as u64 + k as u64 * micro as u64;
        self.samples(start..start + micro as u64)
    }

    /// The micro-batches rank `rank` of `world` trains at `step`, in order.
    pub fn rank_step(
        &mut self,
        step: u64,
        micro: u32,
        rank: u32,
        world: u32,
    ) -> Result<Vec<Vec<u64>>, PlanError> {
        let micro_per_step = self.plan.borrow().micro_batches_per_step(micro, world)?;
        Ok(rank_micro_batches(micro_per_step, rank, world)
            .map(|k| self.micro_batch(step, micro, k))
            .collect())
    }

    /// The samples the epoch leaves out because they do not fill a whole step.
    pub fn dropped(&mut self) -> Vec<u64> {
        let used = self.plan.borrow().steps_per_epoch() * self.plan.borrow().global_batch as u64;
        self.samples(used..self.plan.borrow().total_samples())
    }

    fn window_samples(&mut self, w: usize) -> &[u64] {
        if self.cached.as_ref().map(|(cw, _)| *cw) != Some(w) {
            let window = self.plan.borrow().window as usize;
            let group = &self.shards[w * window..((w + 1) * window).min(self.shards.len())];
            let len = (self.window_starts[w + 1] - self.window_starts[w]) as usize;
            let mut ids = match self.cached.take() {
                Some((_, mut buffer)) => {
                    buffer.clear();
                    buffer
                }
                None => Vec::with_capacity(len),
            };
            // Blocks of consecutive samples (single samples when the block is 1, and then the
            // same permutation as shuffling the ids). Each epoch cuts each shard at its own
            // offset, so that the same neighbours do not meet in every epoch.
            let plan = self.plan.borrow();
            let epoch = self.epoch as u64;
            let block = plan.shuffle_block as u64;
            let mut blocks: Vec<Range<u64>> = group
                .iter()
                .flat_map(|&shard| {
                    let start = plan.shard_starts[shard as usize];
                    let end = plan.shard_starts[shard as usize + 1];
                    let offset = match block {
                        1 => 0,
                        _ => Stream::new(plan.seed, &[BLOCK_STREAM, epoch, shard as u64])
                            .below(block),
                    };
                    let first = (start + offset).min(end);
                    (offset > 0).then_some(start..first).into_iter().chain(
                        (first..end)
                            .step_by(block as usize)
                            .map(move |b| b..(b + block).min(end)),
                    )
                })
                .collect();
            Stream::new(plan.seed, &[WINDOW_STREAM, self.epoch as u64, w as u64])
                .shuffle(&mut blocks);
            ids.extend(blocks.into_iter().flatten());
            self.cached = Some((w, ids));
        }
        &self.cached.as_ref().expect("just filled").1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of 1 must give the order plans had before blocks existed (ids shuffled one by
    /// one), so that jobs started then resume onto the same samples.
    #[test]
    fn a_block_of_one_is_the_plain_shuffle() {
        let sizes = [7, 0, 12, 5, 9, 3];
        let plan = SamplePlan::new(&sizes, 42, 2, 4).unwrap();
        let blocked = plan.clone().with_shuffle_block(1).unwrap();
        for epoch in 0..3 {
            let mut order = plan.epoch(epoch);
            let mut expected = Vec::new();
            for w in 0..order.window_count() {
                let group = &order.shards[w * 2..(w * 2 + 2).min(order.shards.len())];
                let mut ids: Vec<u64> = group
                    .iter()
                    .flat_map(|&s| plan.shard_starts[s as usize]..plan.shard_starts[s as usize + 1])
                    .collect();
                Stream::new(42, &[WINDOW_STREAM, epoch as u64, w as u64]).shuffle(&mut ids);
                expected.extend(ids);
            }
            assert_eq!(order.samples(0..plan.total_samples()), expected);
            assert_eq!(
                blocked.epoch(epoch).samples(0..plan.total_samples()),
                expected
            );
        }
    }

    #[test]
    fn a_shuffle_block_must_be_between_one_and_the_maximum() {
        let plan = SamplePlan::new(&[10], 0, 1, 2).unwrap();
        assert!(matches!(
            plan.clone().with_shuffle_block(0),
            Err(PlanError::Zero { .. })
        ));
        assert_eq!(
            plan.with_shuffle_block(MAX_SHUFFLE_BLOCK + 1).unwrap_err(),
            PlanError::ShuffleBlock(MAX_SHUFFLE_BLOCK + 1)
        );
    }
}
