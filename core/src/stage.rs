//! The stage plan: what every epoch trains with.
//!
//! Training climbs a ladder of stages (EfficientNetV2's progressive learning). A stage is a run
//! of `stage_epochs` epochs (8 by default) in which the image size, the micro-batch size and the
//! regularization stay fixed, so that every batch of a stage has one shape and anything
//! shape-specialized on the GPU is prepared once per stage. Stage `i` of `M` sits at level
//! `i / (M - 1)` of the way from the `min_*` to the `max_*` values (the paper's Algorithm 1 and
//! Table 6); the `random` mode instead gives each stage a seeded random level of the same
//! ladder (the paper's adaptive-regularization study). `rule = "official"` follows the
//! official code instead (see [`StageRule::Official`]): sizes at `(i + 1) / M`, dropout held.
//!
//! Image sizes are rounded to the nearest multiple of 8 (halves round up), so that every
//! stage's batches align with GPU tile sizes and the network's stride-2 steps halve evenly;
//! a spec's `max_size = 300` therefore trains its last stage at 304.

use crate::rng::Stream;
use crate::spec::{JobSpec, StageMode, StageRule};

/// What one epoch trains with. Equal values within a stage.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochParams {
    pub epoch: u32,
    pub stage: u32,
    pub image_size: u32,
    pub micro_batch: u32,
    pub dropout: f64,
    /// Drop rate of the last block; block `j` of `n` drops `rate * j / n`.
    pub stochastic_depth: f64,
    pub randaugment_magnitude: f64,
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
}

/// The whole run's epochs, from a spec alone (a pure function: the coordinator and every worker
/// compute the same plan).
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    pub epochs: Vec<EpochParams>,
}

const RANDOM_LEVEL_STREAM: u64 = 0x5354_4147; // "STAG"

/// RandAugment's layers while its magnitude is above 0: the official code's `ra_num_layers`.
pub const RANDAUGMENT_LAYERS: u32 = 2;

/// Rounds to the nearest multiple of 8, halves up.
pub fn round_to_multiple_of_8(size: f64) -> u32 {
    ((size / 8.0 + 0.5).floor() as u32 * 8).max(8)
}

/// The micro-batch at `image_size`: `micro_at_max_size` times the largest power of two that
/// keeps pixels per micro-batch at or below those of the largest stage, capped at `micro_max`.
pub fn micro_batch_for(
    image_size: u32,
    max_size: u32,
    micro_at_max_size: u32,
    micro_max: u32,
) -> u32 {
    let pixel_ratio = (max_size as f64 / image_size as f64).powi(2);
    let mut micro = micro_at_max_size;
    while micro * 2 <= micro_max
        && (micro * 2) as f64 <= micro_at_max_size as f64 * pixel_ratio + 1e-9
    {
        micro *= 2;
    }
    micro
}

impl StagePlan {
    pub fn new(spec: &JobSpec) -> StagePlan {
        let s = &spec.schedule;
        let stages = s.epochs.div_ceil(s.stage_epochs);
        let level = |stage: u32| -> f64 {
            match s.mode {
                StageMode::Linear if stages > 1 => stage as f64 / (stages - 1) as f64,
                StageMode::Linear => 1.0,
                StageMode::Random => {
                    let mut rng = Stream::new(s.seed, &[RANDOM_LEVEL_STREAM, stage as u64]);
                    let step = rng.below(stages as u64) as f64;
                    if stages > 1 {
                        step / (stages - 1) as f64
                    } else {
                        1.0
                    }
                }
            }
        };
        let lerp = |lo: f64, hi: f64, t: f64| lo + (hi - lo) * t;
        let epochs = (0..s.epochs)
            .map(|epoch| {
                let stage = epoch / s.stage_epochs;
                let t = level(stage);
                let size = |at: f64| lerp(s.min_size as f64, s.max_size as f64, at);
                let (image_size, dropout) = match s.rule {
                    StageRule::Paper => (size(t), lerp(s.min_dropout, s.max_dropout, t)),
                    // Level t = i / (M - 1) sized at (i + 1) / M, `int(...)` as the official
                    // code writes it; dropout held.
                    StageRule::Official => {
                        let i = (t * stages.saturating_sub(1) as f64).round();
                        (size((i + 1.0) / stages as f64).trunc(), s.max_dropout)
                    }
                };
                let image_size = round_to_multiple_of_8(image_size);
                let max_size = round_to_multiple_of_8(s.max_size as f64);
                EpochParams {
                    epoch,
                    stage,
                    image_size,
                    micro_batch: micro_batch_for(
                        image_size,
                        max_size,
                        spec.batch.micro_at_max_size,
                        spec.batch.micro_max,
                    ),
                    dropout,
                    stochastic_depth: s.stochastic_depth,
                    randaugment_magnitude: lerp(s.min_randaugment, s.max_randaugment, t),
                    mixup_alpha: lerp(s.min_mixup, s.max_mixup, t),
                    cutmix_alpha: lerp(s.min_cutmix, s.max_cutmix, t),
                }
            })
            .collect();
        StagePlan { epochs }
    }

    pub fn stage_count(&self) -> u32 {
        self.epochs.last().map_or(0, |e| e.stage + 1)
    }

    /// The first epoch of each stage.
    pub fn stage_starts(&self) -> impl Iterator<Item = &EpochParams> {
        self.epochs
            .iter()
            .enumerate()
            .filter(|(i, e)| *i == 0 || self.epochs[i - 1].stage != e.stage)
            .map(|(_, e)| e)
    }

    /// Distinct (image size, micro-batch) shapes the run visits: the number of times a worker
    /// prepares shape-specialized state.
    pub fn distinct_shapes(&self) -> usize {
        let mut shapes: Vec<(u32, u32)> = self
            .epochs
            .iter()
            .map(|e| (e.image_size, e.micro_batch))
            .collect();
        shapes.sort_unstable();
        shapes.dedup();
        shapes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(name: &str) -> JobSpec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(name);
        JobSpec::load(&path).unwrap()
    }

    /// The paper's 4-stage schedule: 32 epochs cut into 4 stages of 8.
    fn four_stages(name: &str) -> StagePlan {
        let mut spec = config(name);
        spec.schedule.epochs = 32;
        spec.schedule.stage_epochs = 8;
        StagePlan::new(&spec)
    }

    fn column(plan: &StagePlan, f: impl Fn(&EpochParams) -> f64) -> Vec<f64> {
        plan.stage_starts()
            .map(|e| (f(e) * 1000.0).round() / 1000.0)
            .collect()
    }

    #[test]
    fn reproduces_table_6_for_s_m_and_l() {
        // (config, sizes, RandAugment, mixup, dropout) per stage, from the paper's ranges:
        // stage i of 4 sits at i/3 between min and max; sizes round to multiples of 8.
        type Row = (&'static str, [u32; 4], [f64; 4], [f64; 4], [f64; 4]);
        let table: [Row; 3] = [
            (
                "efficientnetv2-s-in1k.toml",
                [128, 184, 240, 304],
                [5.0, 8.333, 11.667, 15.0],
                [0.0; 4],
                [0.1, 0.167, 0.233, 0.3],
            ),
            (
                "efficientnetv2-m-in1k.toml",
                [128, 216, 296, 384],
                [5.0, 10.0, 15.0, 20.0],
                [0.0, 0.067, 0.133, 0.2],
                [0.1, 0.2, 0.3, 0.4],
            ),
            (
                "efficientnetv2-l-in1k.toml",
                [128, 216, 296, 384],
                [5.0, 11.667, 18.333, 25.0],
                [0.0, 0.133, 0.267, 0.4],
                [0.1, 0.233, 0.367, 0.5],
            ),
        ];
        for (name, sizes, randaugment, mixup, dropout) in table {
            let plan = four_stages(name);
            assert_eq!(plan.stage_count(), 4, "{name}");
            let got: Vec<u32> = plan.stage_starts().map(|e| e.image_size).collect();
            assert_eq!(got, sizes, "{name} sizes");
            assert_eq!(
                column(&plan, |e| e.randaugment_magnitude),
                randaugment,
                "{name}"
            );
            assert_eq!(column(&plan, |e| e.mixup_alpha), mixup, "{name}");
            assert_eq!(column(&plan, |e| e.dropout), dropout, "{name}");
        }
    }

    #[test]
    fn the_official_rule_reproduces_the_official_codes_stages() {
        // google/automl efficientnetv2: S trains at int(128 + 172 (i + 1) / 4) = 171, 214,
        // 257, 300 px (here to multiples of 8), RandAugment 5 to 10 and no mixing; L at 192,
        // 256, 320, 384 px, RandAugment 5 to 20, Mixup and CutMix 0 to 0.5; dropout held at
        // the model's (0.2, 0.4).
        type Row = (
            &'static str,
            u32,
            f64,
            f64,
            f64,
            [u32; 4],
            [f64; 4],
            [f64; 4],
        );
        let table: [Row; 2] = [
            (
                "efficientnetv2-s-in1k.toml",
                300,
                10.0,
                0.0,
                0.2,
                [168, 216, 256, 304],
                [5.0, 6.667, 8.333, 10.0],
                [0.0; 4],
            ),
            (
                "efficientnetv2-l-in1k.toml",
                384,
                20.0,
                0.5,
                0.4,
                [192, 256, 320, 384],
                [5.0, 10.0, 15.0, 20.0],
                [0.0, 0.167, 0.333, 0.5],
            ),
        ];
        for (name, size, ram, mix, dropout, sizes, randaugment, mixing) in table {
            let mut spec = config(name);
            let s = &mut spec.schedule;
            (s.epochs, s.stage_epochs, s.rule) = (32, 8, StageRule::Official);
            (s.min_size, s.max_size, s.max_randaugment) = (128, size, ram);
            (s.max_mixup, s.max_cutmix, s.max_dropout) = (mix, mix, dropout);
            let plan = StagePlan::new(&spec);
            let got: Vec<u32> = plan.stage_starts().map(|e| e.image_size).collect();
            assert_eq!(got, sizes, "{name} sizes");
            assert_eq!(column(&plan, |e| e.randaugment_magnitude), randaugment);
            assert_eq!(column(&plan, |e| e.mixup_alpha), mixing, "{name}");
            assert_eq!(column(&plan, |e| e.cutmix_alpha), mixing, "{name}");
            assert_eq!(column(&plan, |e| e.dropout), [dropout; 4], "{name}");
        }
        // One stage: the last size either way.
        let mut spec = config("efficientnetv2-s-in1k.toml");
        (spec.schedule.epochs, spec.schedule.stage_epochs) = (8, 8);
        spec.schedule.rule = StageRule::Official;
        assert_eq!(StagePlan::new(&spec).epochs[0].image_size, 304);
    }

    #[test]
    fn the_size_changes_every_8_epochs_by_default_and_never_inside_a_stage() {
        let spec = config("efficientnetv2-l-in21k.toml");
        let plan = StagePlan::new(&spec);
        assert_eq!(plan.epochs.len(), 60);
        assert_eq!(plan.stage_count(), 8, "60 epochs in stages of 8");
        for pair in plan.epochs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.stage == b.stage {
                assert_eq!((a.image_size, a.micro_batch), (b.image_size, b.micro_batch));
                assert_eq!(a.dropout, b.dropout);
            } else {
                assert_eq!(b.epoch % 8, 0, "stages start every 8 epochs");
                assert!(b.image_size > a.image_size, "linear mode climbs");
            }
        }
        assert!(plan.epochs.iter().all(|e| e.image_size % 8 == 0));
        let first = &plan.epochs[0];
        let last = plan.epochs.last().unwrap();
        assert_eq!((first.image_size, last.image_size), (128, 384));
        assert_eq!(plan.distinct_shapes(), 8);
    }

    #[test]
    fn micro_batches_grow_as_images_shrink_and_divide_the_global_batch() {
        let spec = config("efficientnetv2-l-in21k.toml");
        let plan = StagePlan::new(&spec);
        assert_eq!(
            plan.epochs.last().unwrap().micro_batch,
            16,
            "micro_at_max_size"
        );
        assert_eq!(
            plan.epochs[0].micro_batch, 128,
            "(384/128)^2 = 9 -> x8, the cap"
        );
        for e in &plan.epochs {
            assert_eq!(spec.batch.global % e.micro_batch, 0);
            let pixels = e.micro_batch as f64 * (e.image_size as f64).powi(2);
            assert!(
                pixels <= 16.0 * 384.0 * 384.0 + 1.0,
                "memory stays bounded: {e:?}"
            );
        }
        assert_eq!(micro_batch_for(300, 300, 32, 256), 32);
        assert_eq!(
            micro_batch_for(212, 300, 32, 256),
            64,
            "(300/212)^2 = 2.0025"
        );
    }

    #[test]
    fn random_mode_is_seeded_reproducible_and_stays_on_the_ladder() {
        let mut spec = config("efficientnetv2-s-in1k.toml");
        spec.schedule.mode = StageMode::Random;
        let a = StagePlan::new(&spec);
        assert_eq!(a, StagePlan::new(&spec), "same seed, same plan");
        let linear_sizes: Vec<u32> = {
            let mut linear = spec.clone();
            linear.schedule.mode = StageMode::Linear;
            StagePlan::new(&linear)
                .epochs
                .iter()
                .map(|e| e.image_size)
                .collect()
        };
        let sizes: Vec<u32> = a.epochs.iter().map(|e| e.image_size).collect();
        assert!(sizes.iter().all(|s| linear_sizes.contains(s)));
        assert_ne!(sizes, linear_sizes, "random mode is not the linear climb");
        for pair in a.epochs.windows(2) {
            if pair[0].stage == pair[1].stage {
                assert_eq!(pair[0].image_size, pair[1].image_size);
            }
        }
        spec.schedule.seed += 1;
        assert_ne!(StagePlan::new(&spec), a, "another seed, another plan");
    }

    #[test]
    fn a_short_last_stage_and_a_single_stage_work() {
        let mut spec = config("demo.toml");
        spec.schedule.epochs = 5;
        spec.schedule.stage_epochs = 2;
        let plan = StagePlan::new(&spec);
        assert_eq!(plan.stage_count(), 3);
        assert_eq!(
            plan.epochs[4].image_size, 112,
            "the last stage reaches max_size"
        );
        spec.schedule.stage_epochs = 5;
        let single = StagePlan::new(&spec);
        assert_eq!(single.stage_count(), 1);
        assert!(single.epochs.iter().all(|e| e.image_size == 112));
    }
}
