//! The data-parallel step's reduction through any [`Collective`]: one call per optimizer step
//! over the step's flat [`FlatState::reduced`] buffer, which holds the gradients, each rank's
//! share of the BatchNorm statistics and the step's statistics ([`all_reduce_step`]). Host
//! tensors go to the collective as slices, GPU tensors by device address. One call, not one
//! per kind of value: on a GPU each call is a launch and a wait, on the ring a round of
//! messages.
//!
//! Each rank scales its micro-batch losses by `1 / micro-batches per global step` before
//! backward, so the sum over ranks is the mean gradient of the global batch whatever the world
//! size (only the order of float additions differs between world sizes).

use crate::flat::FlatState;
use ladder_collective::{Collective, CollectiveError};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Sums elements `range` of `tensor`, a contiguous float32 tensor, across the ranks.
pub fn all_reduce_range(
    tensor: &Tensor,
    range: Range<i64>,
    collective: &mut dyn Collective,
) -> Result<(), CollectiveError> {
    assert_eq!(tensor.kind(), Kind::Float);
    assert!(tensor.is_contiguous());
    assert!(0 <= range.start && range.end <= tensor.numel() as i64);
    let len = (range.end - range.start) as usize;
    // SAFETY (both arms): `tensor` is contiguous float32 and outlives the call, `range` lies
    // inside it, and nothing else touches it while the collective runs (the caller is between
    // backward and the optimizer, on the thread that queues all work on the default stream).
    let start = unsafe { tensor.data_ptr().cast::<f32>().add(range.start as usize) };
    match tensor.device() {
        Device::Cpu => {
            let data = unsafe { std::slice::from_raw_parts_mut(start, len) };
            collective.all_reduce_sum(data)
        }
        _ => unsafe { collective.all_reduce_sum_device(start as u64, len) },
    }
}

/// Bits per float of [`u64_to_floats`]: sums of up to 4096 ranks' limbs stay below 2^24, where
/// float32 holds every integer exactly.
const LIMB_BITS: u32 = 12;
pub const U64_FLOATS: usize = 6;
const _: () = assert!(crate::flat::STEP_STATISTICS as usize == 3 + U64_FLOATS);

/// A 64-bit value as six float32 limbs of 12 bits, so that a float32 sum over ranks followed by
/// [`floats_to_u64`] is the exact wrapping sum of the values.
pub fn u64_to_floats(value: u64) -> [f32; U64_FLOATS] {
    std::array::from_fn(|i| ((value >> (LIMB_BITS * i as u32)) & 0xfff) as f32)
}

pub fn floats_to_u64(limbs: &[f32]) -> u64 {
    limbs.iter().enumerate().fold(0u64, |sum, (i, &limb)| {
        sum.wrapping_add((limb as u64).wrapping_shl(LIMB_BITS * i as u32))
    })
}

/// Sums the whole of `tensor` across the ranks.
pub fn all_reduce_tensor(
    tensor: &Tensor,
    collective: &mut dyn Collective,
) -> Result<(), CollectiveError> {
    all_reduce_range(tensor, 0..tensor.numel() as i64, collective)
}

/// Where a rank's BatchNorm running statistics stand in a step, for combining them across the
/// ranks (see [`all_reduce_step`]).
#[derive(Clone)]
pub struct StatisticsBlock<'a> {
    /// The statistics at the start of the step.
    pub start: &'a Tensor,
    /// BatchNorm's momentum (PyTorch's sense: the weight of the new batch's statistics).
    pub momentum: f64,
    /// This rank's micro-batches of the step, by index.
    pub block: Range<u32>,
    pub micro_per_step: u32,
}

/// Sums everything a step sums across the ranks of `collective`, in one call over
/// `flat.reduced`: the gradients, the step's statistics, and the BatchNorm running statistics,
/// which end as what one rank would have computed alone over every micro-batch in order.
/// A world of one has nothing to sum: no call at all.
///
/// Each micro-batch moves a running statistic `r` to `d * r + (1 - d) * mu_k` (`d` = 1 -
/// momentum). Run in global order over the step's `M` micro-batches from `r0`, that is
/// `d^M r0 + sum_k (1 - d) d^(M-1-k) mu_k`. A rank that ran its block `[a, b)` from `r0` holds
/// `r = d^(b-a) r0 + sum_(k in block) (1 - d) d^(b-1-k) mu_k`, so its share of the sum is
/// `d^(M-b) (r - d^(b-a) r0)`: the shares are summed across ranks and added to `d^M r0`. Every
/// rank ends with the same bytes, and the statistics do not depend on the world size (up to
/// float rounding).
pub fn all_reduce_step(
    flat: &FlatState,
    statistics: StatisticsBlock,
    collective: &mut dyn Collective,
) -> Result<(), CollectiveError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let keep = 1.0 - statistics.momentum;
    let own = (statistics.block.end - statistics.block.start) as i32;
    let after = (statistics.micro_per_step - statistics.block.end) as i32;
    let start = statistics.start;
    let share = flat.statistics_share();
    tch::no_grad(|| {
        share
            .shallow_clone()
            .copy_(&((&flat.buffers - start * keep.powi(own)) * keep.powi(after)));
    });
    all_reduce_tensor(&flat.reduced, collective)?;
    tch::no_grad(|| {
        flat.buffers
            .shallow_clone()
            .copy_(&(&share + start * keep.powi(statistics.micro_per_step as i32)));
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_limbs_sum_exactly() {
        let values = [u64::MAX, 0x0123_4567_89ab_cdef, 1, 0xfff0_0000_0000_0fff];
        let mut sums = [0f32; U64_FLOATS];
        for v in values {
            for (s, l) in sums.iter_mut().zip(u64_to_floats(v)) {
                *s += l;
            }
        }
        let expected = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        assert_eq!(floats_to_u64(&sums), expected);
        assert_eq!(floats_to_u64(&u64_to_floats(u64::MAX)), u64::MAX);
    }
}
