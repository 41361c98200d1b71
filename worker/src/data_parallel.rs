//! The data-parallel step's reduction: the flat gradient buffer summed across ranks, bucket by
//! bucket, through any [`Collective`].
//!
//! Each rank scales its micro-batch losses by `1 / micro-batches per global step` before
//! backward, so the sum over ranks is the mean gradient of the global batch whatever the world
//! size (only the order of float additions differs between world sizes).

use crate::flat::FlatState;
use ladder_collective::{Collective, CollectiveError};
use tch::{Device, Kind};

/// Sums `flat.grads` across the ranks of `collective`, `bucket_elements` at a time.
pub fn all_reduce_gradients(
    flat: &FlatState,
    collective: &mut dyn Collective,
    bucket_elements: i64,
) -> Result<(), CollectiveError> {
    assert_eq!(
        flat.grads.device(),
        Device::Cpu,
        "the TCP ring reduces host memory"
    );
    assert_eq!(flat.grads.kind(), Kind::Float);
    assert!(flat.grads.is_contiguous());
    let len = flat.grads.numel();
    // SAFETY: the gradient buffer is a contiguous float32 CPU tensor of `len` elements that
    // outlives this call, and nothing else touches it while the collective runs (backward is
    // finished and the optimizer has not started).
    let grads = unsafe { std::slice::from_raw_parts_mut(flat.grads.data_ptr().cast::<f32>(), len) };
    for bucket in flat.buckets(bucket_elements) {
        collective.all_reduce_sum(&mut grads[bucket.start as usize..bucket.end as usize])?;
    }
    Ok(())
}
