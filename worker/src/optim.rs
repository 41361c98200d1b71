//! The optimizer of the paper and its official code: TF-style RMSProp
//! (`tf.compat.v1.train.RMSPropOptimizer`: the mean square starts at 1 and epsilon sits inside
//! the square root), L2 weight decay on convolution and linear weights only, stepped at the rate
//! of [`ladder_core::learning_rate`].

use crate::flat::FlatState;
use ladder_core::spec::OptimizerSpec;
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
