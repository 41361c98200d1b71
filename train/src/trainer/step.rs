//! One global step of the lockstep loop: this rank's micro-batches (upload, mixup or CutMix,
//! forward and backward into the flat gradient buffer), the reduction across ranks, and the
//! update (RMSProp, EMA) with what the step trained added to the checkpoint ledger.

use super::{DROPOUT_STREAM, TrainError, Trainer};
use crate::data_parallel::{
    all_reduce_batch_norm_statistics, all_reduce_gradients, all_reduce_tensor, floats_to_u64,
    u64_to_floats,
};
use crate::feed::Cursor;
use crate::loss;
use crate::precision::{self, Precision};
use ladder_collective::CollectiveError;
use ladder_core::rng::Stream;
use ladder_core::sample::{EpochTally, rank_micro_batches};
use ladder_core::stage::EpochParams;
use ladder_data::loader::{Loader, MicroBatch};
use ladder_data::mix;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

impl Trainer {
    pub(super) fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let device = self.options.device;
        let logits = match self.options.precision {
            Precision::Bfloat16 => {
                precision::autocast_bf16(device, || self.model.forward(images, train))
                    .expect("libtorch autocasts to bfloat16 on CPU and CUDA")
            }
            Precision::Float32 => self.model.forward(images, train),
        };
        logits.to_kind(Kind::Float)
    }

    pub(super) fn to_device(&self, batch: &MicroBatch) -> (Tensor, Tensor) {
        let n = batch.labels.len() as i64;
        let size = batch.size as i64;
        let images =
            precision::upload_slice(&batch.images, &[n, 3, size, size], self.options.device);
        let images = self.options.precision.lay_out_images(images);
        let labels = precision::upload_slice(&batch.labels, &[n], self.options.device);
        (images, labels)
    }

    /// One global step: this rank's micro-batches, the allreduce, the update. Returns the mean
    /// loss over the global batch.
    pub(super) fn train_step(
        &mut self,
        loader: &Loader,
        e: &EpochParams,
        step: u64,
        micro_per_step: u32,
    ) -> Result<f64, TrainError> {
        let spec = self.spec.clone();
        let (rank, world) = (self.job.rank, self.job.world_size);
        let classes = spec.model.classes as i64;
        self.flat.zero_grads();
        if world > 1 {
            tch::no_grad(|| {
                self.step_start_statistics
                    .shallow_clone()
                    .copy_(&self.flat.buffers)
            });
        }
        let loss_sum = Tensor::zeros([1], (Kind::Float, self.options.device));
        let mut tally = EpochTally::default();
        let mut computing = Duration::ZERO;
        for k in rank_micro_batches(micro_per_step, rank, world) {
            let waiting = Instant::now();
            let batch = loader
                .next()
                .expect("the requests cover every step of the run")
                .map_err(|e| TrainError::Fatal(e.to_string()))?;
            let waited = waiting.elapsed();
            self.meter.data_wait += waited;
            self.meter.parts.data_wait += waited;
            let started = Instant::now();
            self.meter.epoch_images += batch.labels.len() as u64;
            self.options
                .instruments
                .read(batch.reads.calls, batch.reads.bytes);
            for skip in &batch.skipped {
                tracing::warn!("{skip}");
                self.options.instruments.skipped(skip.reason.kind());
                self.liveness.count_skip(skip.reason.kind());
            }
            let used: Vec<u64> = batch
                .ids
                .iter()
                .copied()
                .filter(|id| !batch.skipped.iter().any(|s| s.id == *id))
                .collect();
            tally.add_samples(e.epoch, &used);
            tally.skipped += batch.skipped.len() as u64;
            if batch.size != e.image_size || batch.labels.len() != e.micro_batch as usize {
                return Err(TrainError::Fatal(format!(
                    "a micro-batch of {} images at {} px inside a stage of {} at {} px: shapes must not change inside a stage",
                    batch.labels.len(),
                    batch.size,
                    e.micro_batch,
                    e.image_size
                )));
            }
            let (images, labels) = self.to_device(&batch);
            let targets = loss::smooth(
                &loss::one_hot(&labels, classes),
                spec.optimizer.label_smoothing,
            );
            let (images, targets) = match mix::draw(
                spec.schedule.seed,
                e.epoch,
                step,
                k,
                e.mixup_alpha,
                e.cutmix_alpha,
                batch.labels.len(),
                e.image_size,
            ) {
                Some(plan) => loss::mix(&images, &targets, &plan),
                None => (images, targets),
            };
            let mut masks = Stream::new(
                spec.schedule.seed,
                &[DROPOUT_STREAM, e.epoch as u64, step, k as u64],
            );
            tch::manual_seed((masks.next_u64() >> 1) as i64);
            let loss = loss::soft_cross_entropy(&self.forward(&images, true), &targets);
            (&loss / micro_per_step as f64).backward();
            tch::no_grad(|| {
                let _ = loss_sum.shallow_clone().g_add_(&loss.detach());
            });
            computing += started.elapsed();
        }
        self.meter.parts.compute = computing;
        let reducing = Instant::now();
        // The step's loss and what it trained, summed over the ranks in one small allreduce
        // (the digest as exact 12-bit limbs).
        let mut counts = vec![tally.samples as f32, tally.skipped as f32];
        counts.extend(u64_to_floats(tally.digest));
        let stats = Tensor::cat(
            &[
                loss_sum,
                precision::upload_slice(&counts, &[counts.len() as i64], self.options.device),
            ],
            0,
        );
        let collective = self.collective.as_mut();
        let flat = &self.flat;
        let bucket_elements = self.options.bucket_elements;
        self.liveness
            .collective(|| -> Result<(), CollectiveError> {
                all_reduce_gradients(flat, collective, bucket_elements)?;
                if world > 1 {
                    all_reduce_batch_norm_statistics(
                        &flat.buffers,
                        &self.step_start_statistics,
                        spec.model.bn_momentum,
                        rank_micro_batches(micro_per_step, rank, world),
                        micro_per_step,
                        collective,
                    )?;
                }
                all_reduce_tensor(&stats, collective)
            })?;
        self.meter.parts.allreduce = reducing.elapsed();
        let updating = Instant::now();
        let global_step = Cursor {
            epoch: e.epoch,
            step,
        }
        .global_step(self.plan.steps_per_epoch());
        // Read before the update is queued: the collective has completed, so this waits for
        // nothing on a GPU, and the update then runs there while this thread prepares the next
        // step (read after it, the host would wait for the update to finish).
        let stats = Vec::<f32>::try_from(&stats.to_device(Device::Cpu)).expect("float stats");
        self.checkpoints.complete();
        self.optimizer.step(&self.flat, self.lr.at(global_step));
        // The EMA counts the updates this one included, as TensorFlow's num_updates does
        // (its apply runs after the optimizer advanced the global step).
        self.ema.update(&self.flat, global_step + 1);
        self.batches_tracked += micro_per_step as i64;
        self.checkpoints.tally(
            e.epoch,
            EpochTally {
                samples: stats[1] as u64,
                skipped: stats[2] as u64,
                digest: floats_to_u64(&stats[3..]),
            },
        );
        self.meter.parts.optimizer = updating.elapsed();
        Ok(stats[0] as f64 / micro_per_step as f64)
    }
}
