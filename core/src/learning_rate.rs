//! The learning rate at every global step, from the spec alone: linear warm-up from 0, then
//! exponential decay (0.97 every 2.4 epochs, staircase), cosine decay or a constant rate (the
//! official fine-tuning's), each evaluated at the global step as the official schedule does
//! (the decay counts from step 0, not from the end of the warm-up). The worker's optimizer
//! steps with it; `ladder plan` shows it.

use crate::spec::{LrSchedule, OptimizerSpec};

/// The learning rate at every global step.
#[derive(Clone, Debug, PartialEq)]
pub struct LearningRate {
    /// `lr_per_256 * global_batch / 256`.
    pub base: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    schedule: LrSchedule,
    decay_rate: f64,
    decay_steps: f64,
}

impl LearningRate {
    pub fn new(
        spec: &OptimizerSpec,
        global_batch: u32,
        steps_per_epoch: u64,
        epochs: u32,
    ) -> LearningRate {
        LearningRate {
            base: spec.lr_per_256 * global_batch as f64 / 256.0,
            warmup_steps: (spec.warmup_epochs * steps_per_epoch as f64) as u64,
            total_steps: steps_per_epoch * epochs as u64,
            schedule: spec.lr_schedule,
            decay_rate: spec.lr_decay_rate,
            decay_steps: (spec.lr_decay_epochs * steps_per_epoch as f64).max(1.0),
        }
    }

    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base * step as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            LrSchedule::Exponential => {
                self.base
                    * self
                        .decay_rate
                        .powf((step as f64 / self.decay_steps).floor())
            }
            LrSchedule::Cosine => {
                let progress = step as f64 / self.total_steps.max(1) as f64;
                0.5 * self.base * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            LrSchedule::Constant => self.base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OptimizerSpec {
        OptimizerSpec::default()
    }

    #[test]
    fn the_papers_schedule() {
        // Batch 4096: 0.016 per 256 images is 0.256, reached after 5 warm-up epochs.
        let lr = LearningRate::new(&spec(), 4096, 1000, 350);
        assert!((lr.base - 0.256).abs() < 1e-12);
        assert_eq!(lr.at(0), 0.0);
        assert!(
            (lr.at(2500) - 0.128).abs() < 1e-12,
            "half-way through warm-up"
        );
        assert!(
            (lr.at(5000) - 0.256 * 0.97f64.powi(2)).abs() < 1e-12,
            "5000 / 2400 = 2 decays"
        );
        assert!(
            (lr.at(7199) - 0.256 * 0.97f64.powi(2)).abs() < 1e-12,
            "staircase"
        );
        assert!((lr.at(7200) - 0.256 * 0.97f64.powi(3)).abs() < 1e-12);

        let cosine = OptimizerSpec {
            lr_schedule: LrSchedule::Cosine,
            ..spec()
        };
        let lr = LearningRate::new(&cosine, 4096, 100, 60);
        assert!(
            (lr.at(3000) - 0.128).abs() < 1e-9,
            "half-way: half the base"
        );
        assert!(lr.at(5999) < 1e-5, "ends near zero");

        // Fine-tuning from ImageNet-21k: 0.0005 per 256 at batch 512, held after warm-up.
        let constant = OptimizerSpec {
            lr_schedule: LrSchedule::Constant,
            lr_per_256: 0.0005,
            warmup_epochs: 1.0,
            ..spec()
        };
        let lr = LearningRate::new(&constant, 512, 100, 15);
        assert!((lr.at(50) - 0.0005).abs() < 1e-12, "warming up");
        assert!((lr.at(100) - 0.001).abs() < 1e-12 && (lr.at(1499) - 0.001).abs() < 1e-12);
    }
}
