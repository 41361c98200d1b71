//! The training-step pieces together on the tiny network: flat buffers aliased by the model,
//! TF-style RMSProp, weight decay, EMA, and a loss that falls.

use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_train::ema::Ema;
use ladder_train::flat::{FlatState, Layout};
use ladder_train::loss;
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2, Regularization};
use ladder_train::optim::RmsProp;
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

/// Backward accumulates into the head of the step's one reduced buffer; the BatchNorm share
/// and the step's statistics follow it, disjoint, so one call reduces all three.
#[test]
fn gradients_statistics_and_step_statistics_share_one_reduced_buffer() {
    let (vs, model) = tiny(3);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let (grads, buffers) = (flat.grads.numel() as i64, flat.buffers.numel() as i64);
    assert_eq!(
        flat.reduced.numel() as i64,
        grads + buffers + ladder_train::flat::STEP_STATISTICS
    );
    assert_eq!(flat.grads.data_ptr(), flat.reduced.data_ptr());
    let float = std::mem::size_of::<f32>() as i64;
    let at = |t: &Tensor| (t.data_ptr() as i64 - flat.reduced.data_ptr() as i64) / float;
    assert_eq!(at(&flat.statistics_share()), grads);
    assert_eq!(at(&flat.step_statistics()), grads + buffers);
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    model.forward(&images, true).sum(Kind::Float).backward();
    let head = flat.reduced.narrow(0, 0, grads);
    assert!(head.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    let tail = flat
        .reduced
        .narrow(0, grads, buffers + ladder_train::flat::STEP_STATISTICS);
    assert_eq!(tail.abs().sum(Kind::Float).double_value(&[]), 0.0);
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
        ema.update(&flat, step + 1);
        losses.push(l.double_value(&[]));
    }
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first * 0.5,
        "loss fell from {first:.3} to {last:.3}: {losses:?}"
    );
}

/// EfficientNetV2-S at 64 px, batches of 8, 20 steps: Ladder's model, loss, weight decay,
/// RMSProp and EMA against a PyTorch reference loop of the official recipe
/// (tests/reference_loop.py: torchvision's model, the official training step written there),
/// from the same weights on the same batches, with dropout and stochastic depth off.
#[test]
fn v2_s_trains_as_a_pytorch_reference_loop_of_the_official_recipe() {
    const STEPS: i64 = 20;
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(Variant::S), 10, BN);
    model.set_regularization(Regularization {
        dropout: 0.0,
        stochastic_depth: 0.0,
    });
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let dir = tempfile::tempdir().unwrap();
    let named = |params: &Tensor, buffers: &Tensor| {
        let mut all = flat.named_param_views(params, "");
        all.extend(flat.named_buffer_views(buffers, ""));
        all
    };
    ladder_train::checkpoint::safetensors::write(
        &dir.path().join("initial.safetensors"),
        &named(&flat.params, &flat.buffers),
    )
    .unwrap();
    let batches: Vec<(Tensor, Tensor)> = (0..STEPS)
        .map(|_| {
            let x = Tensor::randn([8, 3, 64, 64], (Kind::Float, Device::Cpu));
            (x, Tensor::randint(10, [8], (Kind::Int64, Device::Cpu)))
        })
        .collect();
    let stored: Vec<(String, Tensor)> = batches
        .iter()
        .enumerate()
        .flat_map(|(t, (x, y))| {
            [
                (format!("x{t}"), x.shallow_clone()),
                (format!("y{t}"), y.shallow_clone()),
            ]
        })
        .collect();
    ladder_train::checkpoint::safetensors::write(&dir.path().join("batches.safetensors"), &stored)
        .unwrap();
    let spec = OptimizerSpec::default();
    let lr = ladder_core::learning_rate::LearningRate::new(&spec, 8, 10, 2);
    let mut optimizer = RmsProp::new(&flat, &spec);
    let mut ema = Ema::new(&flat, spec.ema_decay);
    let mut losses = Vec::new();
    let rates: Vec<f64> = (0..STEPS as u64).map(|t| lr.at(t)).collect();
    for (t, (x, labels)) in batches.iter().enumerate() {
        flat.zero_grads();
        let targets = loss::smooth(&loss::one_hot(labels, 10), spec.label_smoothing);
        let l = loss::soft_cross_entropy(&model.forward(x, true), &targets);
        l.backward();
        optimizer.step(&flat, rates[t]);
        ema.update(&flat, t as u64 + 1);
        losses.push(l.double_value(&[]));
    }
    let case = serde_json::json!({
        "classes": 10, "bn_momentum": BN.momentum, "bn_eps": BN.eps,
        "learning_rates": rates, "label_smoothing": spec.label_smoothing,
        "weight_decay": spec.weight_decay, "decay": spec.decay, "momentum": spec.momentum,
        "eps": spec.eps, "ema_decay": spec.ema_decay,
    });
    std::fs::write(dir.path().join("case.json"), case.to_string()).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_loop.py");
    ladder_testkit::run_python(&script, &[dir.path().as_os_str()]);
    let reference: Vec<f64> =
        serde_json::from_slice(&std::fs::read(dir.path().join("losses.json")).unwrap()).unwrap();
    let relative = |t: usize| (losses[t] - reference[t]).abs() / reference[t].abs();
    eprintln!(
        "loss at step 1: {:.6} vs {:.6} (relative {:.1e}); at step 20: {:.6} vs {:.6} ({:.1e})",
        losses[0],
        reference[0],
        relative(0),
        losses[19],
        reference[19],
        relative(19)
    );
    assert!(relative(0) <= 1e-5, "step 1");
    assert!(relative(19) <= 1e-3, "step 20");
    let theirs: std::collections::BTreeMap<String, Tensor> =
        ladder_train::checkpoint::safetensors::read(&dir.path().join("ema.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut worst = (0f64, String::new());
    for (name, ours) in named(&ema.params, &ema.buffers) {
        let theirs = &theirs[&name];
        // Relative to the tensor's largest magnitude, at least 0.01: some running means are
        // 1e-9, noise either side.
        let scale = theirs.abs().max().double_value(&[]).max(1e-2);
        let off = (&ours - theirs).abs().max().double_value(&[]) / scale;
        if off > worst.0 {
            worst = (off, name);
        }
    }
    eprintln!(
        "EMA: worst relative difference {:.1e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-4, "EMA {}: {:e}", worst.1, worst.0);
}
