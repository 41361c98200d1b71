//! The lockstep training loop of one rank (DESIGN.md, ideas 1-4), top to bottom:
//!
//! ```text
//! for each epoch from the cursor:           (stage plan: size, micro-batch, regularization)
//!     at a new shape: prepare it once         (cuDNN autotuning, allocator warm-up: a graph build)
//!     for each step:                          (sample plan: this rank's micro-batches)
//!         micro-batches -> forward/backward, accumulating into the flat gradient buffer
//!         one allreduce of the gradients, BatchNorm statistics and step statistics
//!         RMSProp, EMA: all queued; the step before's loss and progress read meanwhile
//!         every N steps: checkpoint (rank 0, written in the background)
//!     at the end of a stage: evaluate with EMA weights, checkpoint
//! ```
//!
//! Every rank runs the same number of steps, so no rank waits on an allreduce that another
//! never starts. Dropout and stochastic-depth masks are seeded per micro-batch by (job seed,
//! epoch, step, micro-batch index), mixup likewise, and augmentation per sample: the run is a
//! function of the spec, whatever the world size and wherever it resumed.
//!
//! Beside the loop, each in its own module: [`step`] (one global step: the micro-batches'
//! passes, the reduction, the update), [`evaluation`] (the held-out split with the EMA
//! weights), [`meter`] (step time and its parts, into the run's instruments) and [`faults`]
//! (what tests inject); the checkpoint pipeline is [`crate::checkpoint::pipeline`].

mod evaluation;
mod faults;
mod meter;
mod step;

pub use faults::{Faults, hang_for_good};
use meter::Meter;

use crate::checkpoint::pipeline::Pipeline;
use crate::checkpoint::restore::{self, RestoreError};
use crate::checkpoint::state::TrainingState;
use crate::checkpoint::{Manifest, safetensors};
use crate::ema::Ema;
use crate::events::{Evaluation, Events, Instruments, Liveness, Progress, StopSignal};
use crate::feed::{self, Cursor};
use crate::flat::FlatState;
use crate::input::Normalization;
use crate::model::{EfficientNetV2, Regularization};
use crate::optim::RmsProp;
use crate::precision::{self, Precision};
use crate::pretrained;
use ladder_collective::{Collective, CollectiveError};
use ladder_core::learning_rate::LearningRate;
use ladder_core::location::CheckpointId;
use ladder_core::sample::SamplePlan;
use ladder_core::spec::JobSpec;
use ladder_core::stage::{EpochParams, StagePlan};
use ladder_data::batch::plain_memory;
use ladder_data::loader::{Dataset, Loader};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

const DROPOUT_STREAM: u64 = 0x4452_4f50; // "DROP"

/// What the coordinator assigned this worker.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub spec: JobSpec,
    /// The job's checkpoint directory, `checkpoint.dir/JOB` (see [`ladder_core::location::job_dir`]): the
    /// only place this run writes checkpoints.
    pub checkpoints: PathBuf,
    /// A committed checkpoint to continue from.
    pub restore_from: Option<Restore>,
}

#[derive(Clone, Debug)]
pub struct Restore {
    pub id: String,
    pub dir: PathBuf,
}

#[derive(Clone)]
pub struct Options {
    pub device: Device,
    pub precision: Precision,
    /// Append `global_step sha256` of the parameters and BatchNorm statistics here after every
    /// step: replicas that agree write the same lines.
    pub replica_digests: Option<PathBuf>,
    pub faults: Faults,
    /// Set (on rank 0) when the coordinator asks for a checkpoint now: a worker is leaving.
    pub checkpoint_now: Arc<AtomicBool>,
    /// What the run measures of itself goes here (the worker's metrics).
    pub instruments: Arc<dyn Instruments>,
    /// Decode threads when the spec leaves them to the worker (`data.decode_threads = 0`):
    /// its share of the node's cores.
    pub decode_threads: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Asked to stop (a new generation, a cancelled job): not a failure of the job.
    #[error("stopped: {0}")]
    Stopped(String),
    /// A peer is gone or hung: the coordinator ends the generation.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The checkpoint to restore from fails verification (truncated, checksum): the previous
    /// one should be used.
    #[error("checkpoint {id}: {reason}")]
    BadCheckpoint { id: String, reason: String },
    /// The job cannot go on (its data, its checkpoint or its spec is unusable).
    #[error("{0}")]
    Fatal(String),
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    pub graph_builds: u32,
}

pub struct Trainer {
    job: Assignment,
    options: Options,
    spec: Arc<JobSpec>,
    stages: Arc<StagePlan>,
    plan: Arc<SamplePlan>,
    dataset: Arc<Dataset>,
    eval_set: Option<Arc<Dataset>>,
    vs: nn::VarStore,
    model: EfficientNetV2,
    flat: FlatState,
    optimizer: RmsProp,
    ema: Ema,
    lr: LearningRate,
    collective: Box<dyn Collective>,
    events: Arc<dyn Events>,
    stop: Arc<StopSignal>,
    liveness: Arc<Liveness>,
    /// The checkpoint pipeline: rank 0's snapshots, writes and commits.
    checkpoints: Pipeline,
    /// The step queued last, whose results are read after the next is queued.
    in_flight: Option<step::InFlight>,
    /// The job's input normalization, applied on the device.
    normalization: Normalization,
    start: Cursor,
    /// The (image size, micro-batch) shapes prepared so far: one graph build each.
    prepared: BTreeSet<(u32, u32)>,
    evaluation: Option<Evaluation>,
    meter: Meter,
    /// Every BatchNorm's `num_batches_tracked`, and the value a checkpoint gives them all: the
    /// micro-batches of all ranks so far (so the count does not depend on the world size, and
    /// the warm-up of a graph build does not count). Forward passes count their own rank's in
    /// between; nothing reads them but a checkpoint.
    batch_counters: Vec<Tensor>,
    batches_tracked: i64,
    /// The BatchNorm statistics at the start of the step, for combining them across ranks.
    step_start_statistics: Tensor,
}

fn fatal(what: &str) -> impl Fn(String) -> TrainError + '_ {
    move |message| TrainError::Fatal(format!("{what}: {message}"))
}

/// The run ends on a non-finite loss or weights: training on would only burn device time, and
/// the checkpoints it wrote would be worthless. Nothing after the last committed checkpoint is
/// kept.
fn diverged(what: String) -> TrainError {
    TrainError::Fatal(format!(
        "training diverged: {what}; no checkpoint is taken from here. `ladder resume` goes on \
         from the last committed checkpoint (after a hardware fault, say); the same data and \
         seed diverge again at the same step, which needs a new job with a lower \
         optimizer.lr_per_256"
    ))
}

fn finite(values: &Tensor) -> bool {
    tch::no_grad(|| values.isfinite().all().int64_value(&[]) == 1)
}

impl Trainer {
    /// Opens the data, builds the model (identically on every rank: initialized from the job
    /// seed) and restores the checkpoint if there is one.
    pub fn new(
        job: Assignment,
        options: Options,
        collective: Box<dyn Collective>,
        events: Arc<dyn Events>,
        stop: Arc<StopSignal>,
        liveness: Arc<Liveness>,
    ) -> Result<Trainer, TrainError> {
        let spec = Arc::new(job.spec.clone());
        stop.watch(collective.abort_handle());
        let dataset = Dataset::open_shared(&spec.data.manifest)
            .map_err(|e| fatal("training data")(e.to_string()))?;
        let eval_set = match &spec.data.eval_manifest {
            Some(path) => Some(
                Dataset::open_shared(path).map_err(|e| fatal("held-out data")(e.to_string()))?,
            ),
            None => None,
        };
        let plan = SamplePlan::of_job(&spec, &dataset.shard_sizes())
            .map_err(|e| fatal("sample plan")(e.to_string()))?;
        let stages = StagePlan::new(&spec);
        for e in stages.stage_starts() {
            plan.micro_batches_per_step(e.micro_batch, job.world_size)
                .map_err(|e| fatal("world size")(e.to_string()))?;
        }
        let device = options.device;
        tch::manual_seed(spec.schedule.seed as i64);
        let vs = nn::VarStore::new(device);
        let model = EfficientNetV2::from_spec(&vs.root(), &spec.model);
        if let (None, Some(path)) = (&job.restore_from, &spec.model.init_from) {
            let fresh = pretrained::initialize(&vs, path)
                .map_err(|e| fatal("model.init_from")(e.to_string()))?;
            tracing::info!(weights = %path.display(), fresh = ?fresh, "initialized from pretrained weights");
        }
        let flat = FlatState::new(&vs, options.precision.layout());
        let mut optimizer = RmsProp::new(&flat, &spec.optimizer);
        let mut ema = Ema::new(&flat, spec.optimizer.ema_decay);
        let steps_per_epoch = plan.steps_per_epoch();
        let start = match &job.restore_from {
            None => Cursor::START,
            Some(Restore { id, dir }) => {
                let run = restore::Run {
                    job_id: &job.job_id,
                    steps_per_epoch,
                    epochs: spec.schedule.epochs,
                };
                let state = TrainingState {
                    vs: &vs,
                    flat: &flat,
                    optimizer: &mut optimizer,
                    ema: &mut ema,
                };
                let (manifest, cursor) =
                    restore::restore(dir, id, run, state).map_err(|e| match e {
                        RestoreError::Damaged(reason) => TrainError::BadCheckpoint {
                            id: id.clone(),
                            reason,
                        },
                        RestoreError::Refused(why) => TrainError::Fatal(why),
                    })?;
                tracing::info!(checkpoint = %dir.display(), epoch = manifest.epoch, step = manifest.step, "restored");
                cursor
            }
        };
        let step_start_statistics = flat.buffers.zeros_like();
        let batch_counters: Vec<Tensor> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.ends_with("num_batches_tracked"))
            .map(|(_, t)| t)
            .collect();
        let batches_tracked = batch_counters.first().map_or(0, |t| t.int64_value(&[]));
        let lr = LearningRate::new(
            &spec.optimizer,
            spec.batch.global,
            steps_per_epoch,
            spec.schedule.epochs,
        );
        let checkpoints = Pipeline::new(
            job.checkpoints.clone(),
            events.clone(),
            options.instruments.clone(),
            options.checkpoint_now.clone(),
        );
        Ok(Trainer {
            job,
            options,
            stages: Arc::new(stages),
            plan: Arc::new(plan),
            dataset,
            eval_set,
            vs,
            model,
            flat,
            optimizer,
            ema,
            lr,
            collective,
            events,
            stop,
            liveness,
            checkpoints,
            in_flight: None,
            normalization: Normalization::new(spec.data.mean, spec.data.std, device),
            start,
            prepared: BTreeSet::new(),
            evaluation: None,
            meter: Meter::new(),
            batch_counters,
            batches_tracked,
            step_start_statistics,
            spec,
        })
    }

    fn graph_builds(&self) -> u32 {
        self.prepared.len() as u32
    }

    fn loader(
        &self,
        dataset: &Arc<Dataset>,
        requests: impl Iterator<Item = ladder_data::loader::BatchRequest> + Send + 'static,
    ) -> Loader {
        let decode_threads = match self.spec.data.decode_threads {
            0 => self.options.decode_threads,
            n => n as usize,
        };
        // For a GPU, the loader threads write bytes straight into page-locked memory.
        let memory = if self.options.device.is_cuda() {
            precision::page_locked_memory()
        } else {
            plain_memory()
        };
        Loader::with_memory(
            dataset.clone(),
            decode_threads,
            self.spec.data.prefetch_mb as usize * (1 << 20),
            requests,
            memory,
        )
    }

    /// Trains from the start cursor to the end of the run.
    pub fn run(&mut self) -> Result<Outcome, TrainError> {
        let steps_per_epoch = self.plan.steps_per_epoch();
        let (rank, world) = (self.job.rank, self.job.world_size);
        let loader = self.loader(
            &self.dataset.clone(),
            feed::train_requests(
                self.spec.clone(),
                self.plan.clone(),
                self.stages.clone(),
                rank,
                world,
                self.start,
                feed::pixel_format(&self.spec, self.options.device),
            ),
        );
        let stages = self.stages.clone();
        let mut cursor = self.start;
        while (cursor.epoch as usize) < stages.epochs.len() {
            let e = &stages.epochs[cursor.epoch as usize];
            self.prepare(e)?;
            self.model.set_regularization(Regularization {
                dropout: e.dropout,
                stochastic_depth: e.stochastic_depth,
            });
            let micro_per_step = self
                .plan
                .micro_batches_per_step(e.micro_batch, world)
                .map_err(|err| TrainError::Fatal(err.to_string()))?;
            self.meter.restart();
            for step in cursor.step..steps_per_epoch {
                if let Some(reason) = self.stop.reason() {
                    return Err(TrainError::Stopped(reason));
                }
                let about_to = Cursor {
                    epoch: e.epoch,
                    step,
                }
                .global_step(steps_per_epoch);
                self.options.faults.before_step(about_to, rank, world)?;
                let queued = self.train_step(&loader, e, step, micro_per_step)?;
                self.meter.step(&*self.options.instruments);
                // The step before's results, read now that this one is queued behind it (the
                // wait counts in the next step's reduction time).
                if let Some(previous) = self.in_flight.replace(queued) {
                    self.settle(previous)?;
                }
                self.options
                    .faults
                    .after_step(about_to + 1, &self.flat.params);
                self.liveness
                    .set_data_wait_share(self.meter.data_wait_share.unwrap_or_default());
                self.liveness.tick();
                let done = Cursor {
                    epoch: e.epoch,
                    step: step + 1,
                };
                let global_step = done.global_step(steps_per_epoch);
                self.record_digest(global_step)?;
                let epoch_end = step + 1 == steps_per_epoch;
                if !epoch_end && self.checkpoints.due(&self.spec.checkpoint, global_step) {
                    // What the checkpoint counts as trained must have been seen.
                    self.drain()?;
                    self.checkpoint(e, done, false);
                }
            }
            // The epoch's last step: its loss and its (urgent) progress.
            self.drain()?;
            self.meter.log_epoch(e.epoch);
            let next = Cursor {
                epoch: e.epoch + 1,
                step: 0,
            };
            let stage_end = stages
                .epochs
                .get(next.epoch as usize)
                .is_none_or(|n| n.stage != e.stage);
            if stage_end {
                self.evaluation = self.evaluate(e.epoch)?;
                let mut progress = self.progress(e, next);
                (progress.epoch, progress.step) = (e.epoch, steps_per_epoch);
                self.events.progress(&progress, true);
            }
            if stage_end
                || self
                    .checkpoints
                    .due(&self.spec.checkpoint, next.global_step(steps_per_epoch))
            {
                self.checkpoint(e, next, stage_end);
            }
            cursor = next;
        }
        // No next step's loss will show weights that went bad in the last update.
        self.ensure_finite_weights(cursor)?;
        self.checkpoints.finish();
        Ok(Outcome {
            graph_builds: self.graph_builds(),
        })
    }

    /// Fails when the parameters or EMA weights after `done` are no longer finite.
    fn ensure_finite_weights(&self, done: Cursor) -> Result<(), TrainError> {
        let global_step = done.global_step(self.plan.steps_per_epoch());
        for (what, values) in [
            ("parameters", &self.flat.params),
            ("EMA weights", &self.ema.params),
        ] {
            if !finite(values) {
                return Err(diverged(format!(
                    "the {what} were no longer finite after global step {global_step}"
                )));
            }
        }
        Ok(())
    }

    fn record_digest(&self, global_step: u64) -> Result<(), TrainError> {
        let Some(path) = &self.options.replica_digests else {
            return Ok(());
        };
        let mut hasher = Sha256::new();
        for t in [&self.flat.params, &self.flat.buffers] {
            let host = t.to_device(Device::Cpu).contiguous();
            let len = host.numel() * host.kind().elt_size_in_bytes();
            // SAFETY: a contiguous host tensor of `len` bytes, alive across the call.
            hasher.update(unsafe { std::slice::from_raw_parts(host.data_ptr().cast::<u8>(), len) });
        }
        let line = format!("{global_step} {}\n", safetensors::hex(&hasher.finalize()));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
            .map_err(|e| TrainError::Fatal(format!("{}: {e}", path.display())))
    }

    fn progress(&self, e: &EpochParams, done: Cursor) -> Progress {
        let steps_per_epoch = self.plan.steps_per_epoch();
        let step_seconds = self.meter.step_seconds.unwrap_or(0.0);
        // What is left, in steps weighted by their pixels relative to this stage's.
        let pixels = |size: u32| (size as f64).powi(2);
        let remaining: f64 = self.stages.epochs[done.epoch as usize..]
            .iter()
            .map(|later| {
                let steps = if later.epoch == done.epoch {
                    steps_per_epoch - done.step
                } else {
                    steps_per_epoch
                };
                steps as f64 * pixels(later.image_size) / pixels(e.image_size)
            })
            .sum();
        Progress {
            stage: e.stage,
            epoch: done.epoch,
            step: done.step,
            steps_per_epoch,
            global_step: done.global_step(steps_per_epoch),
            loss: self.meter.loss.unwrap_or(0.0),
            images_per_second: if step_seconds > 0.0 {
                self.spec.batch.global as f64 / step_seconds
            } else {
                0.0
            },
            image_size: e.image_size,
            graph_builds: self.graph_builds(),
            eta_seconds: remaining * step_seconds,
            evaluation: self.evaluation,
            learning_rate: self
                .lr
                .at(done.global_step(steps_per_epoch).saturating_sub(1)),
        }
    }

    /// Prepares the shape-specialized state of `e`'s shape, once per distinct shape: a
    /// forward and backward pass on a batch of that shape lets cuDNN pick its algorithms and the
    /// caching allocator size its pools. Nothing of the model's state changes.
    fn prepare(&mut self, e: &EpochParams) -> Result<(), TrainError> {
        let shape = (e.image_size, e.micro_batch);
        if !self.prepared.insert(shape) {
            return Ok(());
        }
        let started = Instant::now();
        if self.options.device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let statistics = self.flat.buffers.copy();
        let size = e.image_size as i64;
        let images = Tensor::zeros(
            [e.micro_batch as i64, 3, size, size],
            (Kind::Float, self.options.device),
        );
        let images = self.options.precision.lay_out_images(images);
        self.forward(&images, true).mean(Kind::Float).backward();
        self.flat.zero_grads();
        tch::no_grad(|| self.flat.buffers.shallow_clone().copy_(&statistics));
        if let Device::Cuda(ordinal) = self.options.device {
            tch::Cuda::synchronize(ordinal as i64);
        }
        self.liveness.tick();
        tracing::info!(
            size = e.image_size,
            micro_batch = e.micro_batch,
            builds = self.graph_builds(),
            seconds = started.elapsed().as_secs_f64(),
            "prepared a new shape"
        );
        Ok(())
    }

    /// Rank 0 snapshots the state and writes it in the background; training goes on.
    fn checkpoint(&mut self, e: &EpochParams, next: Cursor, stage_end: bool) {
        self.checkpoints.taken();
        if self.job.rank != 0 {
            return;
        }
        // A diverged update can leave non-finite weights behind a finite loss; saved, they would
        // push good checkpoints out of retention. Not saved, then: the next step's loss, the
        // same on every rank, ends the run on all of them together (the run's last checkpoint
        // has no next step: `ensure_finite_weights` stands in for it).
        if let Err(e) = self.ensure_finite_weights(next) {
            tracing::error!("checkpoint not taken: {e}");
            return;
        }
        // The pending copy reads the batch counters this sets.
        self.checkpoints.complete();
        self.set_batch_counters();
        let steps_per_epoch = self.plan.steps_per_epoch();
        let global_step = next.global_step(steps_per_epoch);
        let manifest = Manifest {
            format: 0,
            id: CheckpointId {
                generation: self.job.generation,
                global_step,
            }
            .to_string(),
            job: self.job.job_id.clone(),
            generation: self.job.generation,
            global_step,
            epoch: next.epoch,
            step: next.step,
            steps_per_epoch,
            stage: e.stage,
            stage_end,
            seed: self.spec.schedule.seed,
            world_size: self.job.world_size,
            model: self.spec.model.variant.to_string(),
            classes: self.spec.model.classes,
            files: Default::default(),
            trained: Default::default(),
        };
        let state = TrainingState {
            vs: &self.vs,
            flat: &self.flat,
            optimizer: &mut self.optimizer,
            ema: &mut self.ema,
        };
        self.checkpoints.begin(state, manifest);
        self.liveness.tick();
    }

    fn set_batch_counters(&self) {
        tch::no_grad(|| {
            for counter in &self.batch_counters {
                let _ = counter.shallow_clone().fill_(self.batches_tracked);
            }
        });
    }
}
