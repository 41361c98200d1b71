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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ema::Ema;
    use crate::flat::{FlatState, Layout};
    use ladder_core::learning_rate::LearningRate;
    use tch::{Device, Kind, nn};

    /// 100 steps of RMSProp with weight decay, and the EMA beside them, on the same gradients as
    /// an oracle written in numpy from the official code's definitions
    /// (tests/official_rmsprop.py): every weight and every averaged weight within 1e-6 of the
    /// oracle's, relative to the largest magnitude.
    #[test]
    fn rmsprop_weight_decay_and_ema_match_the_official_definitions() {
        const STEPS: usize = 100;
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = root.randn("conv", &[8, 4, 3, 3], 0.0, 0.5);
        let _ = root.randn("bias", &[8], 0.0, 0.5);
        let _ = root.randn("dense", &[10, 8], 0.0, 0.5);
        let flat = FlatState::new(&vs, Layout::Contiguous);
        let spec = OptimizerSpec {
            weight_decay: 1e-2,
            warmup_epochs: 1.0,
            ..OptimizerSpec::default()
        };
        let mut optimizer = RmsProp::new(&flat, &spec);
        let mut ema = Ema::new(&flat, spec.ema_decay);
        let lr = LearningRate::new(&spec, 4096, 20, 5);
        let n = flat.params.numel();
        let floats = |t: &Tensor| Vec::<f32>::try_from(&t.to_kind(Kind::Float)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, values: &[f32]| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(dir.path().join(name), bytes).unwrap();
        };
        write("params.f32", &floats(&flat.params));
        write("mask.f32", &floats(&flat.decay_mask));
        let mut grads = Vec::with_capacity(STEPS * n);
        let mut rates = Vec::with_capacity(STEPS);
        for step in 0..STEPS as u64 {
            let g = Tensor::randn([n as i64], (Kind::Float, Device::Cpu));
            grads.extend(floats(&g));
            tch::no_grad(|| flat.grads.shallow_clone().copy_(&g));
            rates.push(lr.at(step));
            optimizer.step(&flat, lr.at(step));
            ema.update(&flat, step + 1);
        }
        write("grads.f32", &grads);
        let case = serde_json::json!({
            "elements": n, "steps": STEPS, "learning_rates": rates,
            "decay": spec.decay, "momentum": spec.momentum, "eps": spec.eps,
            "weight_decay": spec.weight_decay, "ema_decay": spec.ema_decay,
        });
        std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/official_rmsprop.py");
        ladder_testkit::run_python(&script, &[dir.path().as_os_str()]);
        let read = |name: &str| -> Vec<f64> {
            std::fs::read(dir.path().join(name))
                .unwrap()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        };
        for (ours, theirs, what) in [
            (&flat.params, read("params.f64"), "weights"),
            (&ema.params, read("ema.f64"), "EMA weights"),
        ] {
            let ours = Vec::<f64>::try_from(&ours.to_kind(Kind::Double)).unwrap();
            let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs() / scale)
                .fold(0f64, f64::max);
            eprintln!("{what}: worst relative difference {worst:.2e} after {STEPS} steps");
            assert!(worst <= 1e-6, "{what}: {worst:e}");
        }
    }
}
