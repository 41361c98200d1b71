//! The training-step pieces together on the tiny network: flat buffers aliased by the model,
//! TF-style RMSProp, weight decay, EMA, and a loss that falls.

use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_worker::ema::Ema;
use ladder_worker::flat::{FlatState, Layout};
use ladder_worker::loss;
use ladder_worker::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_worker::optim::RmsProp;
use tch::{Device, Kind, Tensor, nn};

const BN: BatchNormConfig = BatchNormConfig {
    eps: 1e-3,
    momentum: 0.01,
};

fn tiny(classes: i64) -> (nn::VarStore, EfficientNetV2) {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(Variant::Tiny), classes, BN);
    (vs, model)
}

fn images(n: i64) -> Tensor {
    Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu))
}

#[test]
fn the_model_reads_and_writes_the_flat_buffers() {
    tch::set_num_threads(1);
    let (vs, model) = tiny(5);
    let x = images(2);
    let before = tch::no_grad(|| model.forward(&x, false));
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let same = tch::no_grad(|| model.forward(&x, false));
    assert!(
        before.allclose(&same, 0.0, 0.0, false),
        "flattening keeps the weights"
    );

    let labels = Tensor::from_slice(&[1i64, 4]);
    model
        .forward(&x, false)
        .cross_entropy_for_logits(&labels)
        .backward();
    let once = flat.grads.copy();
    assert!(
        once.abs().sum(Kind::Float).double_value(&[]) > 0.0,
        "backward wrote the flat buffer"
    );
    for (name, var) in vs.variables() {
        if var.requires_grad() {
            let slot = flat.param_slots.iter().find(|s| s.name == name).unwrap();
            assert!(var.grad().equal(&slot.view(&flat.grads)), "{name}");
        }
    }
    model
        .forward(&x, false)
        .cross_entropy_for_logits(&labels)
        .backward();
    assert!(
        flat.grads.allclose(&(&once * 2.0), 1e-5, 1e-6, false),
        "accumulates in place"
    );
    flat.zero_grads();
    assert_eq!(flat.grads.abs().sum(Kind::Float).double_value(&[]), 0.0);

    tch::no_grad(|| {
        let _ = flat.params.shallow_clone().g_mul_scalar_(0.5);
    });
    let halved = tch::no_grad(|| model.forward(&x, false));
    assert!(
        !halved.allclose(&before, 1e-4, 1e-4, false),
        "the model reads the flat params"
    );

    // Training mode updates BatchNorm's running statistics inside the flat buffer.
    let stats = flat.buffers.copy();
    let _ = model.forward(&x, true);
    assert!(!flat.buffers.equal(&stats));
}

#[test]
fn rmsprop_follows_tensorflows_formula_and_decays_only_weights() {
    let (vs, model) = tiny(3);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let spec = OptimizerSpec::default();
    let mut optimizer = RmsProp::new(&flat, &spec);
    let x = images(2);
    let labels = Tensor::from_slice(&[0i64, 2]);

    // A plain per-element reference of tf.compat.v1.train.RMSPropOptimizer with L2 decay.
    let p0 = Vec::<f32>::try_from(&flat.params).unwrap();
    let mask = Vec::<f32>::try_from(&flat.decay_mask).unwrap();
    let mut p: Vec<f64> = p0.iter().map(|&v| v as f64).collect();
    let mut ms = vec![1.0f64; p.len()];
    let mut mom = vec![0.0f64; p.len()];
    for step in 0..3 {
        flat.zero_grads();
        model
            .forward(&x, false)
            .cross_entropy_for_logits(&labels)
            .backward();
        let g = Vec::<f32>::try_from(&flat.grads).unwrap();
        let lr = 0.01 * (step + 1) as f64;
        for i in 0..p.len() {
            let gi = g[i] as f64 + spec.weight_decay * mask[i] as f64 * p[i];
            ms[i] = spec.decay * ms[i] + (1.0 - spec.decay) * gi * gi;
            mom[i] = spec.momentum * mom[i] + lr * gi / (ms[i] + spec.eps).sqrt();
            p[i] -= mom[i];
        }
        optimizer.step(&flat, lr);
        let ours = Vec::<f32>::try_from(&flat.params).unwrap();
        let worst = ours
            .iter()
            .zip(&p)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "step {step}: off by {worst:e}");
    }
    // Decay applies to convolution and linear weights, never to biases or BatchNorm.
    let decayed = |name: &str| {
        let slot = flat.param_slots.iter().find(|s| s.name == name).unwrap();
        slot.view(&flat.decay_mask).min().double_value(&[]) == 1.0
    };
    for name in [
        "features.0.0.weight",
        "features.3.0.block.2.fc1.weight",
        "classifier.1.weight",
    ] {
        assert!(decayed(name), "{name} is decayed");
    }
    for name in [
        "features.0.1.weight",
        "features.0.1.bias",
        "features.3.0.block.2.fc1.bias",
        "classifier.1.bias",
    ] {
        assert!(!decayed(name), "{name} is not decayed");
    }
}

#[test]
fn ema_warms_up_then_averages() {
    let (vs, _model) = tiny(3);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let mut ema = Ema::new(&flat, 0.9999);
    assert!((ema.decay_at(0) - 0.1).abs() < 1e-12, "(1 + 0) / (10 + 0)");
    assert_eq!(ema.decay_at(1_000_000), 0.9999);
    let start = flat.params.copy();
    tch::no_grad(|| {
        let _ = flat.params.shallow_clone().g_add_scalar_(1.0);
    });
    ema.update(&flat, 0);
    // d = 0.1: ema = 0.1 * start + 0.9 * (start + 1) = start + 0.9
    assert!(ema.params.allclose(&(&start + 0.9), 1e-5, 1e-5, false));
}

#[test]
fn buckets_cover_the_gradients_in_order() {
    let (vs, _model) = tiny(3);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let total = flat.grads.numel() as i64;
    for size in [1_000, 10_000, 100_000, total, total * 2] {
        let buckets = flat.buckets(size);
        assert_eq!(buckets.first().unwrap().start, 0);
        assert_eq!(buckets.last().unwrap().end, total);
        for pair in buckets.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(
            buckets
                .iter()
                .all(|b| b.end - b.start <= size && b.end > b.start)
        );
    }
}

#[test]
fn the_tiny_model_learns() {
    tch::set_num_threads(1);
    let (vs, model) = tiny(4);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let spec = OptimizerSpec::default();
    let mut optimizer = RmsProp::new(&flat, &spec);
    let mut ema = Ema::new(&flat, 0.99);
    // Four classes told apart by which colour channel is bright.
    let batch = |seed: i64| {
        tch::manual_seed(seed);
        let labels = Tensor::randint(3, [16], (Kind::Int64, Device::Cpu));
        let x = Tensor::randn([16, 3, 32, 32], (Kind::Float, Device::Cpu)) * 0.5;
        let boost = loss::one_hot(&labels, 4)
            .narrow(1, 0, 3)
            .view([16, 3, 1, 1])
            * 2.0;
        (x + boost, labels)
    };
    let mut losses = Vec::new();
    for step in 0..40u64 {
        let (x, labels) = batch(step as i64);
        flat.zero_grads();
        let targets = loss::smooth(&loss::one_hot(&labels, 4), 0.1);
        let l = loss::soft_cross_entropy(&model.forward(&x, true), &targets);
        l.backward();
        optimizer.step(&flat, 0.01);
        ema.update(&flat, step);
        losses.push(l.double_value(&[]));
    }
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first * 0.5,
        "loss fell from {first:.3} to {last:.3}: {losses:?}"
    );
}
