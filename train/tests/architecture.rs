use ladder_core::spec::Variant;
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2, Regularization};
use tch::{Device, Kind, Tensor, nn};

const BN: BatchNormConfig = BatchNormConfig {
    eps: 1e-3,
    momentum: 0.01,
};

fn build(variant: Variant, classes: i64) -> (nn::VarStore, EfficientNetV2) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(variant), classes, BN);
    (vs, model)
}

fn parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum()
}

#[test]
fn parameter_counts_equal_torchvision() {
    // REFERENCE.md: exactly as torchvision reports them.
    for (variant, classes, expected) in [
        (Variant::S, 1000, 21_458_488),
        (Variant::M, 1000, 54_139_356),
        (Variant::L, 1000, 118_515_272),
        (Variant::S, 21_843, 48_158_371),
        (Variant::M, 21_843, 80_839_239),
        (Variant::L, 21_843, 145_215_155),
    ] {
        let (vs, _) = build(variant, classes);
        assert_eq!(
            parameters(&vs),
            expected,
            "{variant} with {classes} classes"
        );
    }
}

#[test]
fn names_follow_torchvision() {
    let (vs, _) = build(Variant::S, 1000);
    let vars = vs.variables();
    assert_eq!(vars.len(), 782, "S has 782 state-dict keys");
    for name in [
        "features.0.0.weight",
        "features.0.1.num_batches_tracked",
        "features.1.0.block.0.0.weight",
        "features.2.0.block.0.0.weight",
        "features.2.0.block.1.1.running_var",
        "features.4.0.block.2.fc1.bias",
        "features.4.0.block.3.1.weight",
        "features.7.0.weight",
        "classifier.1.weight",
    ] {
        assert!(vars.contains_key(name), "{name} missing");
    }
    assert_eq!(vars["features.0.1.num_batches_tracked"].kind(), Kind::Int64);
    let (vs, _) = build(Variant::L, 1000);
    assert!(
        vs.variables().contains_key("features.8.0.weight"),
        "L's head is features.8"
    );
}

#[test]
fn regularization_changes_without_rebuilding() {
    tch::manual_seed(0);
    let (_vs, model) = build(Variant::Tiny, 10);
    let x = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let eval = model.forward(&x, false);
    assert_eq!(eval.size(), [4, 10]);
    // Without regularization, two train passes differ only through BatchNorm's running stats,
    // which train mode does not read: equal outputs.
    let a = model.forward(&x, true);
    let b = model.forward(&x, true);
    assert!(a.allclose(&b, 1e-6, 1e-6, false));
    model.set_regularization(Regularization {
        dropout: 0.5,
        stochastic_depth: 0.5,
    });
    let c = model.forward(&x, true);
    assert!(!a.allclose(&c, 1e-3, 1e-3, false), "dropout now applies");
    let eval_again = model.forward(&x, false);
    assert_eq!(eval_again.size(), [4, 10], "eval ignores dropout");
}

#[test]
fn a_spec_builds_its_network() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs/efficientnetv2-l-in21k.toml");
    let spec = ladder_core::spec::JobSpec::load(&path).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = EfficientNetV2::from_spec(&vs.root(), &spec.model);
    assert_eq!(parameters(&vs), 145_215_155, "L with the 21,843-class head");
}

#[test]
fn stochastic_depth_grows_with_depth_as_the_official_code_sets_it() {
    // The official code: survival 1 - 0.2 * i / n for block i of n, all blocks counted (S has
    // 40): the first keeps everything, the last drops 0.2 * 39 / 40.
    let (_vs, model) = build(Variant::S, 10);
    let rates = model.drop_rates(0.2);
    assert_eq!(rates.len(), 40);
    for (i, rate) in rates.iter().enumerate() {
        assert!(
            (rate - 0.2 * i as f64 / 40.0).abs() < 1e-12,
            "block {i}: {rate}"
        );
    }
}
