//! Exponential moving average of the weights and BatchNorm statistics (the official code keeps
//! both), with TensorFlow's warm-up of the decay: `min(decay, (1 + step) / (10 + step))`, so
//! early averages are not dominated by the random initialization.

use crate::flat::FlatState;
use tch::Tensor;

pub struct Ema {
    pub params: Tensor,
    pub buffers: Tensor,
    decay: f64,
}

impl Ema {
    pub fn new(flat: &FlatState, decay: f64) -> Ema {
        Ema {
            params: flat.params.copy(),
            buffers: flat.buffers.copy(),
            decay,
        }
    }

    pub fn decay_at(&self, step: u64) -> f64 {
        self.decay.min((1.0 + step as f64) / (10.0 + step as f64))
    }

    /// `ema = d * ema + (1 - d) * current`, `updates` optimizer steps having been taken (this
    /// one included: TensorFlow's `num_updates`, the global step after the optimizer's).
    pub fn update(&mut self, flat: &FlatState, updates: u64) {
        let keep = self.decay_at(updates);
        tch::no_grad(|| {
            let _ = self.params.lerp_(&flat.params, 1.0 - keep);
            let _ = self.buffers.lerp_(&flat.buffers, 1.0 - keep);
        });
    }
}
