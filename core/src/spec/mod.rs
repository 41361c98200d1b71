//! The job spec: a TOML file that says what to train, on what, and how.
//!
//! Parsing rejects unknown fields (a typo never silently falls back to a default), and
//! [`JobSpec::validate`] checks every value, naming the field, the value and what is allowed.
//! Paths inside a spec are relative to the spec file's directory; [`JobSpec::load`] makes them
//! absolute so that the coordinator, which runs elsewhere, sees the same files.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job: JobSection,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    pub batch: BatchSpec,
    pub checkpoint: CheckpointSpec,
    pub workers: WorkersSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    /// Queued jobs are served highest priority first, then oldest first.
    #[serde(default)]
    pub priority: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Tiny,
    S,
    M,
    L,
    Xl,
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Variant::Tiny => "tiny",
            Variant::S => "s",
            Variant::M => "m",
            Variant::L => "l",
            Variant::Xl => "xl",
        };
        f.write_str(name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub variant: Variant,
    pub classes: u32,
    /// BatchNorm epsilon; the paper's 1e-3.
    #[serde(default = "defaults::bn_eps")]
    pub bn_eps: f64,
    /// BatchNorm momentum in PyTorch's convention (TF's 0.99 is PyTorch's 0.01).
    #[serde(default = "defaults::bn_momentum")]
    pub bn_momentum: f64,
    /// Pretrained weights to start from (fine-tuning): a torchvision state dict saved as
    /// safetensors. The classifier starts fresh when the class counts differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The training split's manifest (written by `ladder dataset index`).
    pub manifest: PathBuf,
    /// The held-out split evaluated at the end of each stage.
    #[serde(default)]
    pub eval_manifest: Option<PathBuf>,
    /// RandomResizedCrop's area fraction range.
    #[serde(default = "defaults::crop_scale")]
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop's aspect ratio range.
    #[serde(default = "defaults::crop_ratio")]
    pub crop_ratio: [f64; 2],
    #[serde(default = "defaults::mean")]
    pub mean: [f64; 3],
    #[serde(default = "defaults::std")]
    pub std: [f64; 3],
    /// How many shards the sample order mixes at a time (see the sample plan).
    #[serde(default = "defaults::shard_window")]
    pub shard_window: u32,
    /// Consecutive samples of a shard that stay together in the sample order, so the loader
    /// reads them with one ranged read (see the sample plan); 1 shuffles samples one by one.
    #[serde(default = "defaults::shuffle_block")]
    pub shuffle_block: u32,
    /// Memory for micro-batches decoded ahead of training, per worker, in MiB.
    #[serde(default = "defaults::prefetch_mb")]
    pub prefetch_mb: u32,
    /// Decoding threads per worker; 0 uses one per available core.
    #[serde(default)]
    pub decode_threads: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageMode {
    /// Size and regularization grow linearly from the first stage to the last.
    Linear,
    /// Each stage takes a seeded random level of the linear ladder.
    Random,
}

/// How a stage's image size and regularization follow from its place on the ladder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageRule {
    /// The paper's Algorithm 1: stage `i` of `M` at `i / (M - 1)` of the way from every
    /// `min_*` to its `max_*` (size, dropout, RandAugment, Mixup, CutMix); the first stage
    /// trains at `min_size`.
    #[default]
    Paper,
    /// The official code's (google/automl `efficientnetv2/main.py`): the size at
    /// `min_size + (max_size - min_size) * (i + 1) / M` (the first stage already above
    /// `min_size`, its `ibase`); RandAugment, Mixup and CutMix at `i / (M - 1)`; dropout held at
    /// `max_dropout` (the code computes a dropout ladder and deletes it).
    Official,
}

/// Which RandAugment a spec's magnitudes are for: they share a name, not a scale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RandAugmentScale {
    /// The official EfficientNetV2 code's (google/automl): 16 operations, level 10 its nominal
    /// top and higher levels extrapolated, gray fill. The paper's Table 6 magnitudes (5 to 25)
    /// are on this scale.
    #[default]
    Official,
    /// torchvision's: 14 operations, magnitude 0 to 30 (its 31 bins), black fill.
    Torchvision,
}

impl RandAugmentScale {
    /// The magnitudes a spec may give: torchvision's bins end at 30; the official levels are
    /// extrapolated past 10, up to the 30 the RandAugment paper searched.
    pub fn magnitudes(self) -> std::ops::RangeInclusive<f64> {
        0.0..=30.0
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub epochs: u32,
    #[serde(default = "defaults::stage_epochs")]
    pub stage_epochs: u32,
    #[serde(default = "defaults::mode")]
    pub mode: StageMode,
    /// How stages' sizes and regularization follow from their levels.
    #[serde(default)]
    pub rule: StageRule,
    #[serde(default)]
    pub seed: u64,
    pub min_size: u32,
    pub max_size: u32,
    pub eval_size: u32,
    pub min_dropout: f64,
    pub max_dropout: f64,
    /// Stochastic-depth drop rate of the last block (earlier blocks drop proportionally less).
    #[serde(default = "defaults::stochastic_depth")]
    pub stochastic_depth: f64,
    /// Which RandAugment the magnitudes below are for.
    #[serde(default)]
    pub randaugment: RandAugmentScale,
    pub min_randaugment: f64,
    pub max_randaugment: f64,
    #[serde(default)]
    pub min_mixup: f64,
    #[serde(default)]
    pub max_mixup: f64,
    /// CutMix's alpha (0 turns it off; with Mixup on too, half of each micro-batch cuts).
    #[serde(default)]
    pub min_cutmix: f64,
    #[serde(default)]
    pub max_cutmix: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Multiply by `lr_decay_rate` every `lr_decay_epochs` after warm-up (the paper's ImageNet runs).
    Exponential,
    /// Cosine decay to zero after warm-up (the paper's ImageNet-21k pretraining).
    Cosine,
    /// The base rate after warm-up (the official code's fine-tuning from ImageNet-21k).
    Constant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// TF-style RMSProp: epsilon inside the square root, as the official code.
    Rmsprop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "defaults::optimizer")]
    pub kind: OptimizerKind,
    /// Learning rate per 256 images; the base rate is this times global batch / 256.
    #[serde(default = "defaults::lr_per_256")]
    pub lr_per_256: f64,
    #[serde(default = "defaults::rms_decay")]
    pub decay: f64,
    #[serde(default = "defaults::momentum")]
    pub momentum: f64,
    #[serde(default = "defaults::rms_eps")]
    pub eps: f64,
    /// L2 weight decay; skips biases and BatchNorm parameters.
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "defaults::warmup_epochs")]
    pub warmup_epochs: f64,
    #[serde(default = "defaults::lr_schedule")]
    pub lr_schedule: LrSchedule,
    #[serde(default = "defaults::lr_decay_rate")]
    pub lr_decay_rate: f64,
    #[serde(default = "defaults::lr_decay_epochs")]
    pub lr_decay_epochs: f64,
    #[serde(default = "defaults::ema_decay")]
    pub ema_decay: f64,
    #[serde(default = "defaults::label_smoothing")]
    pub label_smoothing: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            kind: defaults::optimizer(),
            lr_per_256: defaults::lr_per_256(),
            decay: defaults::rms_decay(),
            momentum: defaults::momentum(),
            eps: defaults::rms_eps(),
            weight_decay: defaults::weight_decay(),
            warmup_epochs: defaults::warmup_epochs(),
            lr_schedule: defaults::lr_schedule(),
            lr_decay_rate: defaults::lr_decay_rate(),
            lr_decay_epochs: defaults::lr_decay_epochs(),
            ema_decay: defaults::ema_decay(),
            label_smoothing: defaults::label_smoothing(),
        }
    }
}

/// The global batch is fixed for the whole run; the micro-batch (what one forward pass sees,
/// and so one BatchNorm group) grows as images shrink, in powers of two, so that memory per
/// micro-batch stays about constant across stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    pub global: u32,
    /// Micro-batch size at `schedule.max_size`.
    pub micro_at_max_size: u32,
    /// Upper bound of the micro-batch size at small stages.
    pub micro_max: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    pub dir: PathBuf,
    /// A checkpoint every this many global steps (0: none by steps).
    pub every_steps: u32,
    /// A checkpoint whenever this many minutes of training have passed since the last one
    /// (0: none by time). Steps slow down as images grow through the stages; time does not.
    #[serde(default)]
    pub every_minutes: f64,
    #[serde(default = "defaults::keep")]
    pub keep: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSpec {
    pub min: u32,
    pub max: u32,
}

/// The largest `data.shuffle_block`: larger blocks would mix little more than whole shards do.
pub const MAX_SHUFFLE_BLOCK: u32 = 1024;

mod problems;

pub use problems::Problem;

mod defaults {
    use super::*;
    pub fn bn_eps() -> f64 {
        1e-3
    }
    pub fn bn_momentum() -> f64 {
        0.01
    }
    pub fn crop_scale() -> [f64; 2] {
        [0.08, 1.0]
    }
    pub fn crop_ratio() -> [f64; 2] {
        [3.0 / 4.0, 4.0 / 3.0]
    }
    pub fn mean() -> [f64; 3] {
        [0.485, 0.456, 0.406]
    }
    pub fn std() -> [f64; 3] {
        [0.229, 0.224, 0.225]
    }
    pub fn shard_window() -> u32 {
        4
    }
    pub fn shuffle_block() -> u32 {
        1
    }
    pub fn prefetch_mb() -> u32 {
        1024
    }
    pub fn stage_epochs() -> u32 {
        8
    }
    pub fn mode() -> StageMode {
        StageMode::Linear
    }
    pub fn stochastic_depth() -> f64 {
        0.2
    }
    pub fn optimizer() -> OptimizerKind {
        OptimizerKind::Rmsprop
    }
    pub fn lr_per_256() -> f64 {
        0.016
    }
    pub fn rms_decay() -> f64 {
        0.9
    }
    pub fn momentum() -> f64 {
        0.9
    }
    pub fn rms_eps() -> f64 {
        1e-3
    }
    pub fn weight_decay() -> f64 {
        1e-5
    }
    pub fn warmup_epochs() -> f64 {
        5.0
    }
    pub fn lr_schedule() -> LrSchedule {
        LrSchedule::Exponential
    }
    pub fn lr_decay_rate() -> f64 {
        0.97
    }
    pub fn lr_decay_epochs() -> f64 {
        2.4
    }
    pub fn ema_decay() -> f64 {
        0.9999
    }
    pub fn label_smoothing() -> f64 {
        0.1
    }
    pub fn keep() -> u32 {
        3
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read job spec {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job spec {origin} is not valid TOML for a Ladder job: {message}")]
    Parse { origin: String, message: String },
    #[error("job spec {origin} has {} problem(s):\n  {}", problems.len(),
        problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

impl JobSpec {
    /// Reads, parses and validates a spec file, and makes its paths absolute.
    pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut spec = JobSpec::parse(&text, &path.display().to_string())?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        spec.resolve_paths(&base);
        Ok(spec)
    }

    /// Parses and validates spec text; `origin` names it in errors (a path, or "job 12").
    pub fn parse(text: &str, origin: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            origin: origin.to_owned(),
            // toml quotes the offending line: cut short, as a megabyte-long line may be.
            message: e
                .to_string()
                .trim_end()
                .lines()
                .map(crate::cut)
                .collect::<Vec<_>>()
                .join("\n"),
        })?;
        let problems = spec.problems();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(SpecError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobSpec always serializes")
    }

    fn resolve_paths(&mut self, base: &Path) {
        // Lexically: `configs/../run` becomes `run` (symbolic links are left as they are).
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                let mut clean = PathBuf::new();
                for part in base.join(&*p).components() {
                    match part {
                        std::path::Component::CurDir => {}
                        std::path::Component::ParentDir if clean.file_name().is_some() => {
                            clean.pop();
                        }
                        other => clean.push(other),
                    }
                }
                *p = clean;
            }
        };
        resolve(&mut self.data.manifest);
        if let Some(p) = self.data.eval_manifest.as_mut() {
            resolve(p);
        }
        resolve(&mut self.checkpoint.dir);
        if let Some(p) = self.model.init_from.as_mut() {
            resolve(p);
        }
    }

    /// Micro-batches per global step at the largest micro-batch: every world size must divide
    /// it, so that ranks take whole micro-batches at every stage.
    pub fn min_micro_batches_per_step(&self) -> u32 {
        self.batch.global / self.batch.micro_max.max(1)
    }

    /// The world sizes this job can run on: within `workers.min..=workers.max`, dividing the
    /// micro-batch count of every stage.
    pub fn allowed_world_sizes(&self) -> Vec<u32> {
        let micro = self.min_micro_batches_per_step();
        (self.workers.min.max(1)..=self.workers.max)
            .filter(|n| micro > 0 && micro.is_multiple_of(*n))
            .collect()
    }
}
