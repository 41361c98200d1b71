//! The optimizer and learning-rate schedule of the paper and its official code: TF-style RMSProp
//! (`tf.compat.v1.train.RMSPropOptimizer`: the mean square starts at 1 and epsilon sits inside
//! the square root), L2 weight decay on convolution and linear weights only, linear warm-up, then
//! exponential (0.97 every 2.4 epochs, staircase), cosine decay or a constant rate (the official
//! fine-tuning's), each evaluated at the global step as the official schedule does.

use crate::flat::FlatState;
use ladder_core::spec::{LrSchedule, OptimizerSpec};
use tch::Tensor;

/// Elements updated together on the CPU: small enough that a chunk of every buffer the update
/// touches stays in cache across its half-dozen passes, large enough that per-call overhead is
/// noise. On a GPU the whole buffer is one chunk: there each pass is a kernel launch, whose
/// host cost would exceed its work on a small chunk, and no cache holds the buffers anyway.
const CPU_CHUNK: i64 = 1 << 18;

/// RMSProp state over the flat parameter buffer.
pub struct RmsProp {
    pub mean_square: Tensor,
    pub momentum_buffer: Tensor,
    /// `weight_decay` where decay applies, else 0.
    decay_factors: Tensor,
    /// Elements updated together; as long as `scratch`.
    chunk: i64,
    scratch: Tensor,
    decay: f64,
    momentum: f64,
    eps: f64,
}

impl RmsProp {
    pub fn new(flat: &FlatState, spec: &OptimizerSpec) -> RmsProp {
        let total = flat.params.numel() as i64;
        let chunk = if flat.params.device().is_cuda() {
            total
        } else {
            CPU_CHUNK.min(total)
        };
        RmsProp {
            mean_square: flat.params.ones_like(),
            momentum_buffer: flat.params.zeros_like(),
            decay_factors: &flat.decay_mask * spec.weight_decay,
            chunk,
            scratch: Tensor::empty([chunk], (flat.params.kind(), flat.params.device())),
            decay: spec.decay,
            momentum: spec.momentum,
            eps: spec.eps,
        }
    }

    /// One update from the (already reduced) gradients in `flat.grads`, which it consumes:
    /// `g += wd * p` (decayed weights only); `ms = decay * ms + (1 - decay) * g^2`;
    /// `mom = momentum * mom + lr * g / sqrt(ms + eps)`; `p -= mom`. Runs chunk by chunk,
    /// in place, allocating nothing.
    pub fn step(&mut self, flat: &FlatState, lr: f64) {
        let total = flat.params.numel() as i64;
        tch::no_grad(|| {
            let mut start = 0;
            while start < total {
                let len = self.chunk.min(total - start);
                let chunk = |t: &Tensor| t.narrow(0, start, len);
                let (p, mut g) = (chunk(&flat.params), chunk(&flat.grads));
                let (mut ms, mut mom) = (chunk(&self.mean_square), chunk(&self.momentum_buffer));
                let mut scratch = self.scratch.narrow(0, 0, len);
                let _ = g.addcmul_(&p, &chunk(&self.decay_factors));
                let _ = g.mul_out(&scratch, &g);
                let _ = ms.lerp_(&scratch, 1.0 - self.decay);
                scratch.copy_(&ms);
                let _ = scratch.g_add_scalar_(self.eps).sqrt_();
                let _ = g.g_mul_scalar_(lr);
                let _ = mom.g_mul_scalar_(self.momentum);
                let _ = mom.addcdiv_(&g, &scratch);
                let _ = p.shallow_clone().g_sub_(&mom);
                start += len;
            }
        });
    }
}

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
