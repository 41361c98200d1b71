//! Ladder's EfficientNetV2 against torchvision's, run from the bootstrap venv: same names and
//! shapes for S, M and L; for S, the same eval logits, and in train mode the same logits, loss,
//! gradients and BatchNorm buffer updates, within 1e-4.

use ladder_core::spec::Variant;
use ladder_train::checkpoint::safetensors;
use ladder_train::checkpoint::state::{MODEL_FILE, TrainingState};
use ladder_train::ema::Ema;
use ladder_train::flat::{FlatState, Layout};
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_train::optim::RmsProp;
use ladder_train::pretrained;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use tch::{Device, Kind, Tensor, nn};

fn reference(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/torchvision_reference.py");
    let out = Command::new(ladder_testkit::venv_python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "torchvision reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// torchvision keeps BatchNorm's momentum at PyTorch's 0.1 and uses eps 1e-3.
const TORCHVISION_BN: BatchNormConfig = BatchNormConfig {
    eps: 1e-3,
    momentum: 0.1,
};

/// S with torchvision's BatchNorm settings, as the reference script builds it.
fn torchvision_s(classes: i64) -> (nn::VarStore, EfficientNetV2) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNetV2::new(
        &vs.root(),
        &Architecture::of(Variant::S),
        classes,
        TORCHVISION_BN,
    );
    (vs, model)
}

fn max_relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    let scale = theirs.abs().max().double_value(&[]).max(1e-6);
    (ours - theirs).abs().max().double_value(&[]) / scale
}

#[test]
fn s_matches_torchvision_in_eval_and_train_mode() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.safetensors");
    reference(&["tensors", "s", file.to_str().unwrap()]);
    let tensors: HashMap<String, Tensor> = safetensors::read(&file).unwrap().into_iter().collect();
    let state: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k.starts_with("state."))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();

    let (vs, model) = torchvision_s(10);
    safetensors::load(&vs, &state, "state.", "torchvision S").unwrap();

    let x = &tensors["input"];
    let eval = tch::no_grad(|| model.forward(x, false));
    let err = max_relative_error(&eval, &tensors["eval_logits"]);
    assert!(err < 1e-4, "eval logits differ by {err:e}");

    let logits = model.forward(x, true);
    let err = max_relative_error(&logits, &tensors["train_logits"]);
    assert!(err < 1e-4, "train logits differ by {err:e}");
    let loss = logits.cross_entropy_for_logits(&tensors["labels"]);
    let err = max_relative_error(&loss.reshape([1]), &tensors["loss"]);
    assert!(err < 1e-4, "loss differs by {err:e}");
    loss.backward();

    let mut checked = 0;
    for (name, var) in vs.variables() {
        if var.requires_grad() {
            let err = max_relative_error(&var.grad(), &tensors[&format!("grad.{name}")]);
            assert!(err < 1e-4, "gradient of {name} differs by {err:e}");
        } else {
            let after = &tensors[&format!("after.{name}")];
            if var.kind() == Kind::Int64 {
                assert_eq!(var.int64_value(&[]), after.int64_value(&[]), "{name}");
            } else {
                let err = max_relative_error(&var, after);
                assert!(
                    err < 1e-4,
                    "buffer {name} after a train step differs by {err:e}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 782);
}

#[test]
fn s_m_and_l_have_torchvision_names_shapes_and_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    for (variant, name, classes) in [
        (Variant::S, "s", 1000),
        (Variant::M, "m", 1000),
        (Variant::L, "l", 21_843),
    ] {
        let file = dir.path().join(format!("{name}.json"));
        reference(&["shapes", name, &classes.to_string(), file.to_str().unwrap()]);
        let theirs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EfficientNetV2::new(
            &vs.root(),
            &Architecture::of(variant),
            classes,
            TORCHVISION_BN,
        );
        let ours = vs.variables();
        let state = theirs["state"].as_object().unwrap();
        assert_eq!(ours.len(), state.len(), "{name}: key count");
        for (key, entry) in state {
            let var = ours
                .get(key)
                .unwrap_or_else(|| panic!("{name}: {key} missing"));
            let shape: Vec<i64> = entry["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_i64().unwrap())
                .collect();
            assert_eq!(var.size(), shape, "{name}: {key}");
            let dtype = if var.kind() == Kind::Int64 {
                "torch.int64"
            } else {
                "torch.float32"
            };
            assert_eq!(entry["dtype"], dtype, "{name}: {key}");
        }
        let parameters: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(theirs["parameters"].as_i64().unwrap(), parameters, "{name}");
    }
}

#[test]
fn torchvision_loads_a_ladder_model_file_and_computes_the_same_logits() {
    tch::set_num_threads(1);
    tch::manual_seed(5);
    let dir = tempfile::tempdir().unwrap();
    let (vs, model) = torchvision_s(10);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let mut optimizer = RmsProp::new(&flat, &Default::default());
    let mut ema = Ema::new(&flat, 0.9999);
    // One step, so that weights, BatchNorm statistics and the counter all moved.
    let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    model
        .forward(&x, true)
        .cross_entropy_for_logits(&Tensor::from_slice(&[1i64, 2]))
        .backward();
    optimizer.step(&flat, 0.01);
    ema.update(&flat, 0);
    let state = TrainingState {
        vs: &vs,
        flat: &flat,
        optimizer: &mut optimizer,
        ema: &mut ema,
    };
    state.save(dir.path()).unwrap();

    let input = dir.path().join("input.safetensors");
    safetensors::write(&input, &[("input".to_owned(), x.shallow_clone())]).unwrap();
    let out = dir.path().join("logits.safetensors");
    let model_file = dir.path().join(MODEL_FILE);
    reference(&[
        "load",
        "s",
        "10",
        model_file.to_str().unwrap(),
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let theirs = safetensors::read(&out).unwrap().remove(0).1;
    let ours = tch::no_grad(|| model.forward(&x, false));
    let err = max_relative_error(&ours, &theirs);
    assert!(err < 1e-4, "torchvision's logits differ by {err:e}");
}

#[test]
fn a_job_starts_from_torchvision_weights_with_a_fresh_classifier_for_its_classes() {
    let dir = tempfile::tempdir().unwrap();
    let imagenet = dir.path().join("s-1000.safetensors");
    reference(&["pretrained", "s", "1000", imagenet.to_str().unwrap()]);
    let weights: HashMap<String, Tensor> =
        safetensors::read(&imagenet).unwrap().into_iter().collect();

    // Fine-tuning on 10 classes: everything but the classifier comes from the file.
    let (vs, _model) = torchvision_s(10);
    let fresh = pretrained::initialize(&vs, &imagenet).unwrap();
    assert_eq!(fresh, vec!["classifier.1.bias", "classifier.1.weight"]);
    for (name, var) in safetensors::named(&vs, "") {
        if name.starts_with("classifier.") {
            assert_eq!(var.size()[0], 10);
        } else {
            assert!(var.equal(&weights[&name]), "{name} comes from the file");
        }
    }
    // Same classes: the classifier is loaded too.
    let (vs, _model) = torchvision_s(1000);
    assert!(pretrained::initialize(&vs, &imagenet).unwrap().is_empty());
    let classifier = &safetensors::named(&vs, "")
        .into_iter()
        .find(|(n, _)| n == "classifier.1.weight")
        .unwrap()
        .1;
    assert!(classifier.equal(&weights["classifier.1.weight"]));

    // Another variant's weights are refused, naming the problems, and nothing changes.
    let m = dir.path().join("m.safetensors");
    reference(&["pretrained", "m", "1000", m.to_str().unwrap()]);
    let (vs, _model) = torchvision_s(10);
    let before = safetensors::named(&vs, "")[0].1.copy();
    let err = pretrained::initialize(&vs, &m).unwrap_err().to_string();
    assert!(err.contains("unexpected") && err.contains("shape"), "{err}");
    // Hundreds of problems: counted by kind, the first 20 listed.
    assert!(err.contains("of another dtype; the first 20:"), "{err}");
    assert!(err.lines().count() <= 22, "{err}");
    assert!(safetensors::named(&vs, "")[0].1.equal(&before));
}
