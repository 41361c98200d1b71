//! The lockstep training loop of one rank (DESIGN.md, ideas 1-4), top to bottom:
//!
//! ```text
//! for each epoch from the cursor:           (stage plan: size, micro-batch, regularization)
//!     at a new shape: prepare it once         (cuDNN autotuning, allocator warm-up: a graph build)
//!     for each step:                          (sample plan: this rank's micro-batches)
//!         micro-batches -> forward/backward, accumulating into the flat gradient buffer
//!         one allreduce of the gradients (and of BatchNorm statistics)
//!         RMSProp, EMA, progress
//!         every N steps: checkpoint (rank 0, written in the background)
//!     at the end of a stage: evaluate with EMA weights, checkpoint
//! ```
//!
//! Every rank runs the same number of steps, so no rank waits on an allreduce that another
//! never starts. Dropout and stochastic-depth masks are seeded per micro-batch by (job seed,
//! epoch, step, micro-batch index), mixup likewise, and augmentation per sample: the run is a
//! function of the spec, whatever the world size and wherever it resumed.

use crate::checkpoint::{self, Manifest, Writer};
use crate::data_parallel::{
    all_reduce_batch_norm_statistics, all_reduce_gradients, all_reduce_tensor, floats_to_u64,
    u64_to_floats,
};
use crate::ema::Ema;
use crate::feed::{self, Cursor};
use crate::flat::FlatState;
use crate::loss;
use crate::metrics::{RunMetrics, StepParts};
use crate::model::{EfficientNetV2, Regularization};
use crate::optim::{LearningRate, RmsProp};
use crate::precision::{self, Precision};
use crate::pretrained;
use crate::report::{Commit, Evaluation, Events, Liveness, Progress, StopSignal};
use crate::state_io;
use crate::training_state::{PendingSnapshot, Snapshot, TrainingState};
use ladder_collective::{Collective, CollectiveError};
use ladder_core::location::CheckpointId;
use ladder_core::rng::Stream;
use ladder_core::sample::{EpochTally, SamplePlan, rank_micro_batches};
use ladder_core::spec::JobSpec;
use ladder_core::stage::{EpochParams, StagePlan, micro_batch_for, round_to_multiple_of_8};
use ladder_data::loader::{Dataset, Loader, MicroBatch};
use ladder_data::mixup;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

#[derive(Clone, Debug)]
pub struct Options {
    pub device: Device,
    pub precision: Precision,
    /// Gradient elements per allreduce call.
    pub bucket_elements: i64,
    /// Append `global_step sha256` of the parameters and BatchNorm statistics here after every
    /// step: replicas that agree write the same lines.
    pub replica_digests: Option<PathBuf>,
    pub faults: Faults,
    /// Set (on rank 0) when the coordinator asks for a checkpoint now: a worker is leaving.
    pub checkpoint_now: Arc<AtomicBool>,
    /// This run's series of the worker's metrics.
    pub metrics: Arc<RunMetrics>,
}

/// Faults the tests inject (hidden worker flags), each before a global step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The training thread hangs for good (heartbeats go on), as a stuck kernel or a deadlock
    /// would.
    pub hang_before_step: Option<u64>,
    /// The collective fails with an error, each time the run comes to the step, as a
    /// misconfigured NCCL does.
    pub collective_error_before_step: Option<u64>,
    /// The parameters turn to NaN right after this step's update, as a diverged one leaves
    /// them.
    pub nan_after_step: Option<u64>,
    /// The training thread hangs for good once its run stopped or failed (heartbeats go on),
    /// as one stuck in a driver call when its generation ends would.
    pub hang_when_stopped: bool,
}

/// What an injected hang does: the calling thread never returns.
pub fn hang_for_good(when: &str) -> ! {
    tracing::warn!("hanging on purpose {when}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
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

/// Smoothed step time and loss, for images/s, ETA and the reported loss; and the epoch's
/// totals, for a line in the log that tells the time waiting for data apart from the rest.
struct Meter {
    step_seconds: Option<f64>,
    loss: Option<f64>,
    /// The smoothed share of step time spent waiting for data.
    data_wait_share: Option<f64>,
    /// The parts of the step in progress.
    parts: StepParts,
    last: Instant,
    epoch_started: Instant,
    /// This rank's images in the epoch so far, and the time it spent waiting for them.
    epoch_images: u64,
    data_wait: Duration,
}

impl Meter {
    fn smooth(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| 0.9 * o + 0.1 * new)
    }

    fn new() -> Meter {
        let now = Instant::now();
        Meter {
            step_seconds: None,
            loss: None,
            data_wait_share: None,
            parts: StepParts::default(),
            last: now,
            epoch_started: now,
            epoch_images: 0,
            data_wait: Duration::ZERO,
        }
    }

    /// At the start of an epoch, its shape prepared.
    fn restart(&mut self) {
        self.last = Instant::now();
        self.epoch_started = self.last;
        self.epoch_images = 0;
        self.data_wait = Duration::ZERO;
    }

    /// Logs the epoch's images/s on this rank and the share of its time spent waiting for the
    /// data path: near 0 when the model step is what limits, large when decoding is.
    fn log_epoch(&self, epoch: u32) {
        let seconds = self.epoch_started.elapsed().as_secs_f64();
        if self.epoch_images == 0 || seconds <= 0.0 {
            return;
        }
        tracing::info!(
            epoch = epoch + 1,
            images_per_second = %format!("{:.1}", self.epoch_images as f64 / seconds),
            waiting_for_data = %format!("{:.1}%", 100.0 * self.data_wait.as_secs_f64() / seconds),
            "epoch trained on this rank"
        );
    }

    /// Ends a step: smooths its time, loss and data-wait share, and records its parts in
    /// `metrics`.
    fn step(&mut self, loss: f64, metrics: &RunMetrics) {
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        self.step_seconds = Some(Self::smooth(self.step_seconds, seconds));
        self.loss = Some(Self::smooth(self.loss, loss));
        let parts = std::mem::take(&mut self.parts);
        let share = match seconds {
            s if s > 0.0 => (parts.data_wait.as_secs_f64() / s).min(1.0),
            _ => 0.0,
        };
        self.data_wait_share = Some(Self::smooth(self.data_wait_share, share));
        metrics.step(&parts, self.data_wait_share.unwrap_or_default());
    }
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
    writer: Writer,
    start: Cursor,
    /// The (image size, micro-batch) shapes prepared so far: one graph build each.
    prepared: BTreeSet<(u32, u32)>,
    evaluation: Option<Evaluation>,
    meter: Meter,
    /// When the last checkpoint was taken (or the run started), for `checkpoint.every_minutes`.
    last_checkpoint: Instant,
    /// Every BatchNorm's `num_batches_tracked`, and the value a checkpoint gives them all: the
    /// micro-batches of all ranks so far (so the count does not depend on the world size, and
    /// the warm-up of a graph build does not count). Forward passes count their own rank's in
    /// between; nothing reads them but a checkpoint.
    batch_counters: Vec<Tensor>,
    batches_tracked: i64,
    /// What the steps since the last committed checkpoint (or the restore) trained, per
    /// epoch, over all ranks: sent with the next commit, and taken off once it is accepted.
    untallied: Arc<Mutex<BTreeMap<u32, EpochTally>>>,
    /// The last snapshot's host memory, back from the writer: the next snapshot copies into it.
    spare_snapshot: Arc<Mutex<Option<Snapshot>>>,
    /// The BatchNorm statistics at the start of the step, for combining them across ranks.
    step_start_statistics: Tensor,
    /// A checkpoint whose snapshot is still being copied, with how long starting it took.
    pending_checkpoint: Option<(PendingSnapshot, Manifest, Duration)>,
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

fn decode_threads(spec: &JobSpec) -> usize {
    match spec.data.decode_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
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
        let dataset = Dataset::open(&spec.data.manifest)
            .map_err(|e| fatal("training data")(e.to_string()))?;
        let eval_set = match &spec.data.eval_manifest {
            Some(path) => Some(Arc::new(
                Dataset::open(path).map_err(|e| fatal("held-out data")(e.to_string()))?,
            )),
            None => None,
        };
        let plan = SamplePlan::new(
            &dataset.shard_sizes(),
            spec.schedule.seed,
            spec.data.shard_window,
            spec.batch.global,
        )
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
                let manifest = checkpoint::verify(dir).map_err(|e| match e {
                    // Intact: the coordinator must not drop it as damaged.
                    checkpoint::CheckpointError::OtherFormat { .. } => {
                        TrainError::Fatal(e.to_string())
                    }
                    _ => TrainError::BadCheckpoint {
                        id: id.clone(),
                        reason: e.to_string(),
                    },
                })?;
                if manifest.job != job.job_id {
                    return Err(TrainError::Fatal(format!(
                        "checkpoint {} belongs to job {}, not to {}: refusing to restore it",
                        dir.display(),
                        manifest.job,
                        job.job_id
                    )));
                }
                if manifest.steps_per_epoch != steps_per_epoch {
                    return Err(TrainError::Fatal(format!(
                        "checkpoint {} was written with {} steps per epoch, the data now gives {}: the dataset or the global batch changed",
                        dir.display(),
                        manifest.steps_per_epoch,
                        steps_per_epoch
                    )));
                }
                TrainingState {
                    vs: &vs,
                    flat: &flat,
                    optimizer: &mut optimizer,
                    ema: &mut ema,
                }
                .load(dir)
                .map_err(|e| TrainError::Fatal(e.to_string()))?;
                tracing::info!(checkpoint = %dir.display(), epoch = manifest.epoch, step = manifest.step, "restored");
                Cursor {
                    epoch: manifest.epoch,
                    step: manifest.step,
                }
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
        Ok(Trainer {
            job,
            options,
            stages: Arc::new(stages),
            plan: Arc::new(plan),
            dataset: Arc::new(dataset),
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
            writer: Writer::default(),
            start,
            prepared: BTreeSet::new(),
            evaluation: None,
            meter: Meter::new(),
            last_checkpoint: Instant::now(),
            batch_counters,
            batches_tracked,
            untallied: Arc::default(),
            spare_snapshot: Arc::default(),
            pending_checkpoint: None,
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
        Loader::new(
            dataset.clone(),
            decode_threads(&self.spec),
            self.spec.data.prefetch_mb as usize * (1 << 20),
            requests,
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
                let faults = self.options.faults;
                if faults.collective_error_before_step == Some(about_to) {
                    // What a peer that resets the connection looks like.
                    return Err(TrainError::Collective(CollectiveError::Peer {
                        rank,
                        peer: (rank + 1) % world,
                        during: "allreduce",
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            format!(
                                "injected before step {about_to} \
                                 (--inject-collective-error-before-step)"
                            ),
                        ),
                    }));
                }
                if faults.hang_before_step == Some(about_to) {
                    hang_for_good(&format!(
                        "before step {about_to} (--inject-hang-before-step)"
                    ));
                }
                let loss = self.train_step(&loader, e, step, micro_per_step)?;
                // Every rank has the same summed loss, so all stop here together.
                if !loss.is_finite() {
                    return Err(diverged(format!(
                        "the loss of global step {} was {loss}",
                        about_to + 1
                    )));
                }
                if faults.nan_after_step == Some(about_to + 1) {
                    tch::no_grad(|| {
                        let _ = self.flat.params.shallow_clone().fill_(f64::NAN);
                    });
                }
                self.meter.step(loss, &self.options.metrics);
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
                self.events.progress(&self.progress(e, done), epoch_end);
                if !epoch_end && self.checkpoint_due(global_step) {
                    self.checkpoint(e, done, false);
                }
            }
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
            if stage_end || self.checkpoint_due(next.global_step(steps_per_epoch)) {
                self.checkpoint(e, next, stage_end);
            }
            cursor = next;
        }
        // No next step's loss will show weights that went bad in the last update.
        self.ensure_finite_weights(cursor)?;
        self.complete_checkpoint();
        self.writer.wait();
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

    /// Whether a checkpoint is due after `global_step`: every `checkpoint.every_steps` steps,
    /// whenever `checkpoint.every_minutes` have passed since the last one (by this rank's
    /// clock: rank 0's decides, since it writes), and when the coordinator asked for one.
    fn checkpoint_due(&self, global_step: u64) -> bool {
        let every = &self.spec.checkpoint;
        let by_steps =
            every.every_steps > 0 && global_step.is_multiple_of(every.every_steps as u64);
        let by_time = every.every_minutes > 0.0
            && self.last_checkpoint.elapsed().as_secs_f64() >= every.every_minutes * 60.0;
        let asked = self.options.checkpoint_now.load(Ordering::SeqCst);
        by_steps || by_time || asked
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
        let line = format!("{global_step} {}\n", state_io::hex(&hasher.finalize()));
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

    fn forward(&self, images: &Tensor, train: bool) -> Tensor {
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

    fn to_device(&self, batch: &MicroBatch) -> (Tensor, Tensor) {
        let n = batch.labels.len() as i64;
        let size = batch.size as i64;
        let images =
            precision::upload_slice(&batch.images, &[n, 3, size, size], self.options.device);
        let images = self.options.precision.lay_out_images(images);
        let labels = precision::upload_slice(&batch.labels, &[n], self.options.device);
        (images, labels)
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

    /// One global step: this rank's micro-batches, the allreduce, the update. Returns the mean
    /// loss over the global batch.
    fn train_step(
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
            for skip in &batch.skipped {
                tracing::warn!("{skip}");
                self.options.metrics.skipped(skip.reason.kind());
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
            let (images, targets) = match mixup::draw(
                spec.schedule.seed,
                e.epoch,
                step,
                k,
                e.mixup_alpha,
                batch.labels.len(),
            ) {
                Some((lambda, order)) => {
                    let order: Vec<i64> = order.into_iter().map(|i| i as i64).collect();
                    let order =
                        precision::upload_slice(&order, &[order.len() as i64], self.options.device);
                    loss::mixup(&images, &targets, lambda, &order)
                }
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
        self.complete_checkpoint();
        self.optimizer.step(&self.flat, self.lr.at(global_step));
        self.ema.update(&self.flat, global_step);
        self.batches_tracked += micro_per_step as i64;
        self.untallied
            .lock()
            .expect("tally lock")
            .entry(e.epoch)
            .or_default()
            .merge(EpochTally {
                samples: stats[1] as u64,
                skipped: stats[2] as u64,
                digest: floats_to_u64(&stats[3..]),
            });
        self.meter.parts.optimizer = updating.elapsed();
        Ok(stats[0] as f64 / micro_per_step as f64)
    }

    fn set_batch_counters(&self) {
        tch::no_grad(|| {
            for counter in &self.batch_counters {
                let _ = counter.shallow_clone().fill_(self.batches_tracked);
            }
        });
    }

    /// Top-1 and top-5 on the held-out split with the EMA weights, each rank evaluating every
    /// `world`-th sample; `None` without a held-out split.
    fn evaluate(&mut self, epoch: u32) -> Result<Option<Evaluation>, TrainError> {
        self.complete_checkpoint();
        let Some(eval_set) = self.eval_set.clone() else {
            return Ok(None);
        };
        let started = Instant::now();
        let spec = self.spec.clone();
        let size = spec.schedule.eval_size;
        let batch = micro_batch_for(
            size,
            round_to_multiple_of_8(spec.schedule.max_size as f64),
            spec.batch.micro_at_max_size,
            spec.batch.micro_max,
        );
        let requests = feed::eval_requests(
            &spec,
            eval_set.len(),
            size,
            batch,
            self.job.rank,
            self.job.world_size,
        );
        let loader = self.loader(&eval_set, requests.into_iter());
        let live = (self.flat.params.copy(), self.flat.buffers.copy());
        let swap_in = |params: &Tensor, buffers: &Tensor| {
            tch::no_grad(|| {
                self.flat.params.shallow_clone().copy_(params);
                self.flat.buffers.shallow_clone().copy_(buffers);
            })
        };
        swap_in(&self.ema.params, &self.ema.buffers);
        let classes = spec.model.classes as i64;
        let counts = Tensor::zeros([3], (Kind::Float, self.options.device));
        let result = (|| -> Result<(), TrainError> {
            while let Some(batch) = loader.next() {
                if let Some(reason) = self.stop.reason() {
                    return Err(TrainError::Stopped(reason));
                }
                let batch = batch.map_err(|e| TrainError::Fatal(e.to_string()))?;
                let (images, labels) = self.to_device(&batch);
                let logits = tch::no_grad(|| self.forward(&images, false));
                let top = logits.topk(classes.min(5), 1, true, true).1;
                let hits = top.eq_tensor(&labels.unsqueeze(1));
                let top1 = hits.narrow(1, 0, 1).sum(Kind::Float);
                let top5 = hits.sum(Kind::Float);
                let n = Tensor::full(
                    [],
                    batch.labels.len() as f64,
                    (Kind::Float, self.options.device),
                );
                self.liveness.tick();
                let _ = counts
                    .shallow_clone()
                    .g_add_(&Tensor::stack(&[top1, top5, n], 0));
            }
            Ok(())
        })();
        swap_in(&live.0, &live.1);
        result?;
        let collective = self.collective.as_mut();
        self.liveness
            .collective(|| all_reduce_tensor(&counts, collective))?;
        let counts = Vec::<f32>::try_from(&counts.to_device(Device::Cpu)).expect("3 floats");
        let samples = counts[2] as u64;
        let evaluation = Evaluation {
            epoch,
            top1: counts[0] as f64 / samples.max(1) as f64,
            top5: counts[1] as f64 / samples.max(1) as f64,
            samples,
        };
        tracing::info!(
            epoch = epoch + 1,
            top1 = evaluation.top1,
            top5 = evaluation.top5,
            samples,
            seconds = started.elapsed().as_secs_f64(),
            "evaluated the EMA weights"
        );
        Ok(Some(evaluation))
    }

    /// Rank 0 snapshots the state and writes it in the background; training goes on.
    fn checkpoint(&mut self, e: &EpochParams, next: Cursor, stage_end: bool) {
        self.last_checkpoint = Instant::now();
        self.options.checkpoint_now.store(false, Ordering::SeqCst);
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
        self.complete_checkpoint();
        let started = Instant::now();
        if self.writer.busy() {
            tracing::warn!("the previous checkpoint is still being written; waiting for it");
        }
        // At most one write in flight; it gives back the host memory the next snapshot reuses.
        self.writer.wait();
        self.set_batch_counters();
        let snapshot = TrainingState {
            vs: &self.vs,
            flat: &self.flat,
            optimizer: &mut self.optimizer,
            ema: &mut self.ema,
        }
        .begin_snapshot(self.spare_snapshot.lock().expect("snapshot lock").take());
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
            trained: self.untallied.lock().expect("tally lock").clone(),
        };
        self.pending_checkpoint = Some((snapshot, manifest, started.elapsed()));
        self.liveness.tick();
    }

    /// Waits for the pending snapshot's copy (it ran beside this step's forward and backward
    /// passes) and hands it to the background writer. Called before anything changes the
    /// parameters, optimizer state or EMA.
    fn complete_checkpoint(&mut self) {
        let Some((pending, manifest, taken)) = self.pending_checkpoint.take() else {
            return;
        };
        let waited = Instant::now();
        let snapshot = pending.finish();
        let blocked = taken + waited.elapsed();
        tracing::debug!(
            blocked_ms = blocked.as_secs_f64() * 1e3,
            "checkpoint snapshot taken"
        );
        self.options.metrics.snapshot(blocked);
        let metrics = self.options.metrics.clone();
        let untallied = self.untallied.clone();
        let spare = self.spare_snapshot.clone();
        let parent = self.job.checkpoints.clone();
        let events = self.events.clone();
        self.writer.submit(Box::new(move || {
            let writing = Instant::now();
            let written = checkpoint::write(&snapshot, &parent, manifest);
            if let Ok((_, manifest)) = &written {
                metrics.written(
                    writing.elapsed(),
                    manifest.files.values().map(|f| f.bytes).sum(),
                );
            }
            match written {
                Ok((dir, manifest)) => match events.commit(&manifest, &dir) {
                    Commit::Committed => {
                        let mut untallied = untallied.lock().expect("tally lock");
                        for (epoch, sent) in &manifest.trained {
                            untallied.entry(*epoch).or_default().unmerge(*sent);
                        }
                        untallied.retain(|_, t| *t != EpochTally::default());
                    }
                    Commit::Refused(why) => {
                        // Never to be resumed from: left on disk, it would only look like one.
                        let removed = std::fs::remove_dir_all(&dir);
                        tracing::warn!(checkpoint = %manifest.id, ?removed, "the coordinator refused the checkpoint ({why}); its files are deleted");
                    }
                    Commit::Unknown(why) => {
                        tracing::warn!(checkpoint = %manifest.id, "no answer to the checkpoint's commit; its files stay: {why}");
                    }
                },
                Err(e) => {
                    tracing::error!("checkpoint not written, training goes on: {e}");
                    events.checkpoint_failed(&e.to_string());
                }
            }
            *spare.lock().expect("snapshot lock") = Some(snapshot);
        }));
    }
}
