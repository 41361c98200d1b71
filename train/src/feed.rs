//! What a rank trains on: its micro-batch requests in training order, from a cursor to the end
//! of the run, across epoch and stage boundaries. The loader pulls them lazily, so prefetching
//! runs straight through a boundary while the trainer prepares the next stage.
//!
//! Requests depend only on the spec, the cursor, the rank and the world size: micro-batch `k`
//! of step `s` holds the same samples, augmented the same way, at any world size (the sample
//! plan's promise), so a resumed or resized run sees exactly the data of the original.

use ladder_core::sample::{EpochOrder, SamplePlan, rank_micro_batches};
use ladder_core::spec::JobSpec;
use ladder_core::stage::StagePlan;
use ladder_data::augment::TrainTransform;
use ladder_data::batch::PixelFormat;
use ladder_data::loader::{BatchRequest, Transform};
use std::sync::Arc;
use tch::Device;

/// A place in the run: the next step to train, `step` of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    pub epoch: u32,
    pub step: u64,
}

impl Cursor {
    pub const START: Cursor = Cursor { epoch: 0, step: 0 };

    pub fn from_global_step(global_step: u64, steps_per_epoch: u64) -> Cursor {
        Cursor {
            epoch: (global_step / steps_per_epoch) as u32,
            step: global_step % steps_per_epoch,
        }
    }

    pub fn global_step(&self, steps_per_epoch: u64) -> u64 {
        self.epoch as u64 * steps_per_epoch + self.step
    }
}

/// How micro-batches reach `device`: as decoded bytes for a GPU, which normalizes them itself
/// (see [`crate::input`]), normalized by the loader threads for the CPU.
pub fn pixel_format(spec: &JobSpec, device: Device) -> PixelFormat {
    if device.is_cuda() {
        PixelFormat::Bytes
    } else {
        let f = |v: [f64; 3]| v.map(|x| x as f32);
        PixelFormat::Normalized {
            mean: f(spec.data.mean),
            std: f(spec.data.std),
        }
    }
}

/// The seed, pixel format and label range every request of a job shares.
fn request(
    spec: &JobSpec,
    ids: Vec<u64>,
    epoch: u32,
    transform: Transform,
    pixels: PixelFormat,
) -> BatchRequest {
    BatchRequest {
        ids,
        seed: spec.schedule.seed,
        epoch,
        transform,
        pixels,
        classes: spec.model.classes,
    }
}

/// The training transform of `epoch`.
pub fn train_transform(spec: &JobSpec, stages: &StagePlan, epoch: u32) -> TrainTransform {
    TrainTransform::of_epoch(spec, &stages.epochs[epoch as usize])
}

/// Rank `rank` of `world`'s training requests from `from` to the end of the run: for each
/// step, its block of micro-batches in order.
pub fn train_requests(
    spec: Arc<JobSpec>,
    plan: Arc<SamplePlan>,
    stages: Arc<StagePlan>,
    rank: u32,
    world: u32,
    from: Cursor,
    pixels: PixelFormat,
) -> impl Iterator<Item = BatchRequest> + Send + 'static {
    let epochs = stages.epochs.len() as u32;
    (from.epoch..epochs).flat_map(move |epoch| {
        let (spec, plan) = (spec.clone(), plan.clone());
        let micro = stages.epochs[epoch as usize].micro_batch;
        let transform = Transform::Train(train_transform(&spec, &stages, epoch));
        let micro_per_step = plan
            .micro_batches_per_step(micro, world)
            .expect("the coordinator assigns only world sizes the spec allows");
        let first = if epoch == from.epoch { from.step } else { 0 };
        let steps = first..plan.steps_per_epoch();
        // The epoch's order is built once, when its first request is pulled.
        let mut order = None;
        steps.flat_map(move |step| {
            let order = order.get_or_insert_with(|| EpochOrder::new(plan.clone(), epoch));
            rank_micro_batches(micro_per_step, rank, world)
                .map(|k| {
                    let ids = order.micro_batch(step, micro, k);
                    request(&spec, ids, epoch, transform, pixels)
                })
                .collect::<Vec<_>>()
        })
    })
}

/// Rank `rank` of `world`'s share of the held-out split at `size`: every `world`-th sample, in
/// batches of at most `batch`.
pub fn eval_requests(
    spec: &JobSpec,
    samples: u64,
    size: u32,
    batch: u32,
    rank: u32,
    world: u32,
    pixels: PixelFormat,
) -> Vec<BatchRequest> {
    let ids: Vec<u64> = (rank as u64..samples).step_by(world as usize).collect();
    ids.chunks(batch as usize)
        .map(|chunk| request(spec, chunk.to_vec(), 0, Transform::Eval(size), pixels))
        .collect()
}
