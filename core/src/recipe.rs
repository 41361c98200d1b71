//! The recipe card: what each stage of a job trains with, the card a person checks before
//! spending GPU-days on a spec (`ladder plan`). A pure function of the spec and, when the
//! dataset is at hand, its steps per epoch.

use crate::learning_rate::LearningRate;
use crate::spec::{JobSpec, RandAugmentScale};
use crate::stage::{RANDAUGMENT_LAYERS, StagePlan};
use std::fmt::Write;

/// One stage of the card.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StageCard {
    /// 1-based, as people count them.
    pub stage: u32,
    pub first_epoch: u32,
    pub last_epoch: u32,
    pub image_size: u32,
    pub micro_batch: u32,
    pub dropout: f64,
    pub randaugment_magnitude: f64,
    pub randaugment_layers: u32,
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Steps, and the learning rate at the stage's first and last step (known with the
    /// dataset's steps per epoch).
    pub steps: Option<u64>,
    pub learning_rate: Option<(f64, f64)>,
    /// The stage's share of the run's compute, taken as pixels times images.
    pub compute_share: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Card {
    pub name: String,
    pub epochs: u32,
    pub eval_size: u32,
    pub global_batch: u32,
    pub steps_per_epoch: Option<u64>,
    #[serde(skip)]
    pub spec: JobSpec,
    pub stages: Vec<StageCard>,
}

impl Card {
    /// The card of `spec`, with `steps_per_epoch` from its dataset when known.
    pub fn new(spec: &JobSpec, steps_per_epoch: Option<u64>) -> Card {
        let plan = StagePlan::new(spec);
        let s = &spec.schedule;
        let learning_rate = steps_per_epoch
            .map(|spe| LearningRate::new(&spec.optimizer, spec.batch.global, spe, s.epochs));
        let total: f64 = plan
            .epochs
            .iter()
            .map(|e| (e.image_size as f64).powi(2))
            .sum();
        let stages = plan
            .stage_starts()
            .map(|e| {
                let epochs: Vec<_> = plan.epochs.iter().filter(|x| x.stage == e.stage).collect();
                let (first, last) = (epochs[0].epoch, epochs[epochs.len() - 1].epoch);
                let steps = steps_per_epoch.map(|spe| spe * epochs.len() as u64);
                StageCard {
                    stage: e.stage + 1,
                    first_epoch: first + 1,
                    last_epoch: last + 1,
                    image_size: e.image_size,
                    micro_batch: e.micro_batch,
                    dropout: e.dropout,
                    randaugment_magnitude: e.randaugment_magnitude,
                    randaugment_layers: if e.randaugment_magnitude > 0.0 {
                        RANDAUGMENT_LAYERS
                    } else {
                        0
                    },
                    mixup_alpha: e.mixup_alpha,
                    cutmix_alpha: e.cutmix_alpha,
                    steps,
                    learning_rate: learning_rate
                        .as_ref()
                        .zip(steps_per_epoch)
                        .map(|(lr, spe)| {
                            let start = first as u64 * spe;
                            (lr.at(start), lr.at(start + steps.unwrap_or(1).max(1) - 1))
                        }),
                    compute_share: epochs.len() as f64 * (e.image_size as f64).powi(2) / total,
                }
            })
            .collect();
        Card {
            name: spec.job.name.clone(),
            epochs: s.epochs,
            eval_size: s.eval_size,
            global_batch: spec.batch.global,
            steps_per_epoch,
            spec: spec.clone(),
            stages,
        }
    }

    /// The card as text: a header, a row per stage, the totals.
    pub fn render(&self) -> String {
        let s = &self.spec.schedule;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}: {} epochs in {} stages (rule {}, mode {}), global batch {}, evaluated at {} px",
            self.name,
            self.epochs,
            self.stages.len(),
            lowercase(s.rule),
            lowercase(s.mode),
            self.global_batch,
            self.eval_size
        );
        let _ = writeln!(
            out,
            "RandAugment on the {} scale, {} layers an image; learning rate {:.4} per 256 \
             images, {} after {} warm-up epochs",
            lowercase(s.randaugment),
            RANDAUGMENT_LAYERS,
            self.spec.optimizer.lr_per_256,
            lowercase(self.spec.optimizer.lr_schedule),
            self.spec.optimizer.warmup_epochs
        );
        match self.steps_per_epoch {
            Some(spe) => {
                let _ = writeln!(out, "{spe} steps an epoch");
            }
            None => {
                let _ = writeln!(
                    out,
                    "steps and learning rates need the dataset's manifest, which was not read"
                );
            }
        }
        let _ = writeln!(
            out,
            "{:>5} {:>9} {:>5} {:>5} {:>8} {:>7}  {:<76} {:>6} {:>6}  {:>17} {:>7}",
            "stage",
            "epochs",
            "size",
            "micro",
            "steps",
            "dropout",
            "RandAugment: magnitude, what it does at most",
            "mixup",
            "cutmix",
            "learning rate",
            "compute"
        );
        for st in &self.stages {
            let randaugment = if st.randaugment_layers == 0 {
                "off".to_owned()
            } else {
                format!(
                    "{:.2}: {}",
                    st.randaugment_magnitude,
                    randaugment_meaning(s.randaugment, st.randaugment_magnitude, st.image_size)
                )
            };
            let _ = writeln!(
                out,
                "{:>5} {:>9} {:>5} {:>5} {:>8} {:>7.3}  {:<76} {:>6.3} {:>6.3}  {:>17} {:>6.1}%",
                st.stage,
                format!("{}-{}", st.first_epoch, st.last_epoch),
                st.image_size,
                st.micro_batch,
                st.steps.map_or("-".to_owned(), |n| n.to_string()),
                st.dropout,
                randaugment,
                st.mixup_alpha,
                st.cutmix_alpha,
                st.learning_rate
                    .map_or("-".to_owned(), |(a, b)| format!("{a:.5} -> {b:.5}")),
                st.compute_share * 100.0
            );
        }
        if let Some(spe) = self.steps_per_epoch {
            let steps = spe * self.epochs as u64;
            let _ = writeln!(
                out,
                "total: {steps} steps, {} images",
                steps * self.global_batch as u64
            );
        }
        out
    }
}

/// An enum's name as the spec spells it.
fn lowercase(value: impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}

/// What RandAugment at `magnitude` on `scale` does at most to a `size`-pixel image: the
/// strongest rotation, shear, translation and enhancement its operations draw.
pub fn randaugment_meaning(scale: RandAugmentScale, magnitude: f64, size: u32) -> String {
    let m = magnitude;
    match scale {
        RandAugmentScale::Official => format!(
            "rotate {:.0} deg, shear {:.2}, move {:.0} px, enhance x{:.2}, cutout {} px",
            3.0 * m,
            0.03 * m,
            10.0 * m,
            0.18 * m + 0.1,
            2 * (4.0 * m) as i64
        ),
        RandAugmentScale::Torchvision => {
            let level = (m / 30.0).clamp(0.0, 1.0);
            format!(
                "rotate {:.0} deg, shear {:.2}, move {:.0} px, enhance x{:.2}-{:.2}",
                30.0 * level,
                0.3 * level,
                (150.0 / 331.0 * size as f64 * level).trunc(),
                1.0 - 0.9 * level,
                1.0 + 0.9 * level
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(name: &str) -> JobSpec {
        JobSpec::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn the_card_of_the_l_config_adds_up() {
        let spec = config("efficientnetv2-l-in1k.toml");
        let card = Card::new(&spec, Some(312));
        assert_eq!(card.stages.len(), 44, "350 epochs in stages of 8");
        let (first, last) = (&card.stages[0], card.stages.last().unwrap());
        assert_eq!(
            (first.first_epoch, first.last_epoch, first.image_size),
            (1, 8, 128)
        );
        assert_eq!(
            (last.first_epoch, last.last_epoch, last.image_size),
            (345, 350, 384)
        );
        assert_eq!(
            (first.randaugment_magnitude, last.randaugment_magnitude),
            (5.0, 25.0)
        );
        let steps: u64 = card.stages.iter().map(|s| s.steps.unwrap()).sum();
        assert_eq!(steps, 312 * 350);
        let share: f64 = card.stages.iter().map(|s| s.compute_share).sum();
        assert!((share - 1.0).abs() < 1e-9);
        assert!(
            last.compute_share > 5.0 * first.compute_share,
            "384 px vs 128 px"
        );
        let (start, _) = first.learning_rate.unwrap();
        assert_eq!(start, 0.0, "warm-up starts at 0");
        let text = card.render();
        assert!(
            text.contains("rotate 75 deg, shear 0.75, move 250 px, enhance x4.60"),
            "{text}"
        );
        assert!(
            text.contains(&format!("total: {} steps", 312 * 350)),
            "{text}"
        );
        // Without the dataset: no steps, no rates, the rest alike.
        let blind = Card::new(&spec, None);
        assert!(
            blind
                .stages
                .iter()
                .all(|s| s.steps.is_none() && s.learning_rate.is_none())
        );
        assert!(blind.render().contains("need the dataset's manifest"));
    }
}
