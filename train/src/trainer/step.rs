//! One global step of the lockstep loop: this rank's micro-batches (upload, mixup or CutMix,
//! forward and backward into the flat gradient buffer), the reduction across ranks, and the
//! update (RMSProp, EMA), all queued without waiting for the device; and, a step later, its
//! results: the loss (checked finite), what it trained (into the checkpoint ledger) and the
//! progress it made.
//!
//! On a GPU the host never waits for a step it just queued: the step's statistics are copied to
//! page-locked memory behind a [`Fence`], and read once the device has passed it, after the
//! next step is queued ([`Trainer::settle`]); the device drains only at epoch ends (before
//! their evaluation and checkpoint) and before a checkpoint, so that what a checkpoint counts
//! as trained was seen. On the CPU every call ran when made, and the one-step delay only
//! orders the reports.

use super::{DROPOUT_STREAM, TrainError, Trainer, diverged};
use crate::data_parallel::{StatisticsBlock, all_reduce_step, floats_to_u64, u64_to_floats};
use crate::feed::Cursor;
use crate::input;
use crate::loss;
use crate::precision::{self, Precision};
use ladder_collective::Fence;
use ladder_core::rng::Stream;
use ladder_core::sample::{EpochTally, rank_micro_batches};
use ladder_core::stage::EpochParams;
use ladder_data::loader::{Loader, MicroBatch};
use ladder_data::mix;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A step queued on the device whose results the host has not read yet.
pub(super) struct InFlight {
    /// The step's summed statistics on their way to host memory (see
    /// [`crate::flat::STEP_STATISTICS`]).
    stats: Tensor,
    /// Passed once they have arrived.
    fence: Fence,
    /// The cursor after the step.
    done: Cursor,
    micro_per_step: u32,
}

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

    /// `batch` on the device, normalized and laid out there; its bytes counted.
    pub(super) fn to_device(&self, batch: &MicroBatch) -> (Tensor, Tensor) {
        self.options
            .instruments
            .uploaded(batch.images.bytes() as u64);
        input::to_device(
            batch,
            self.options.device,
            self.options.precision,
            &self.normalization,
        )
    }

    /// Queues one global step: this rank's micro-batches, the allreduce, the update. Returns
    /// the step in flight, for [`Trainer::settle`].
    pub(super) fn train_step(
        &mut self,
        loader: &Loader,
        e: &EpochParams,
        step: u64,
        micro_per_step: u32,
    ) -> Result<InFlight, TrainError> {
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
        let stats = self.flat.step_statistics();
        let _ = stats.shallow_clone().zero_();
        let loss_sum = stats.narrow(0, 0, 1);
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
        // The step's loss and what it trained ride with the gradients (the digest as exact
        // 12-bit limbs).
        let mut counts = vec![tally.samples as f32, tally.skipped as f32];
        counts.extend(u64_to_floats(tally.digest));
        tch::no_grad(|| {
            stats
                .narrow(0, 1, counts.len() as i64)
                .copy_(&precision::upload_slice(
                    &counts,
                    &[counts.len() as i64],
                    self.options.device,
                ));
        });
        let collective = self.collective.as_mut();
        let statistics = StatisticsBlock {
            start: &self.step_start_statistics,
            momentum: spec.model.bn_momentum,
            block: rank_micro_batches(micro_per_step, rank, world),
            micro_per_step,
        };
        self.liveness
            .collective(|| all_reduce_step(&self.flat, statistics, collective))?;
        self.meter.parts.allreduce = reducing.elapsed();
        let updating = Instant::now();
        let global_step = Cursor {
            epoch: e.epoch,
            step,
        }
        .global_step(self.plan.steps_per_epoch());
        // On their way to the host before the update is queued, so that the fence after them
        // does not wait for the update.
        let stats = if self.options.device.is_cuda() {
            stats.to_device_(Device::Cpu, Kind::Float, true, true)
        } else {
            stats.copy()
        };
        let fence = if self.options.device.is_cuda() {
            Fence::after_queued()?
        } else {
            Fence::HOST
        };
        self.checkpoints.complete();
        self.optimizer.step(&self.flat, self.lr.at(global_step));
        // The EMA counts the updates this one included, as TensorFlow's num_updates does
        // (its apply runs after the optimizer advanced the global step).
        self.ema.update(&self.flat, global_step + 1);
        self.batches_tracked += micro_per_step as i64;
        self.meter.parts.optimizer = updating.elapsed();
        Ok(InFlight {
            stats,
            fence,
            done: Cursor {
                epoch: e.epoch,
                step: step + 1,
            },
            micro_per_step,
        })
    }

    /// Reads a queued step's results once the device has passed it (waiting, as for a
    /// reduction, with the collective's deadline): its loss, which must be finite (every rank
    /// has the same sum, so all stop here together), what it trained, and its progress.
    pub(super) fn settle(&mut self, step: InFlight) -> Result<(), TrainError> {
        let waiting = Instant::now();
        let collective = self.collective.as_mut();
        self.liveness.collective(|| collective.wait(&step.fence))?;
        self.meter.parts.allreduce += waiting.elapsed();
        let stats = Vec::<f32>::try_from(&step.stats).expect("float stats");
        let steps_per_epoch = self.plan.steps_per_epoch();
        let global_step = step.done.global_step(steps_per_epoch);
        let loss = stats[0] as f64 / step.micro_per_step as f64;
        if !loss.is_finite() {
            return Err(diverged(format!(
                "the loss of global step {global_step} was {loss}"
            )));
        }
        self.checkpoints.tally(
            step.done.epoch,
            EpochTally {
                samples: stats[1] as u64,
                skipped: stats[2] as u64,
                digest: floats_to_u64(&stats[3..]),
            },
        );
        self.meter.loss(loss);
        let e = &self.stages.clone().epochs[step.done.epoch as usize];
        let epoch_end = step.done.step == steps_per_epoch;
        self.events
            .progress(&self.progress(e, step.done), epoch_end);
        Ok(())
    }

    /// Settles the step in flight, if any: the device has then run everything queued.
    pub(super) fn drain(&mut self) -> Result<(), TrainError> {
        match self.in_flight.take() {
            Some(step) => self.settle(step),
            None => Ok(()),
        }
    }
}
