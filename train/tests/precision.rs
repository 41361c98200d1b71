//! bfloat16 autocast through the C++ shim and channels-last flat buffers, exercised on CPU
//! (libtorch autocasts on CPU too); the CUDA path runs in scripts/gpu-check.

use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_train::checkpoint::state::TrainingState;
use ladder_train::ema::Ema;
use ladder_train::flat::{FlatState, Layout};
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_train::optim::RmsProp;
use ladder_train::precision::{
    autocast_bf16, autocast_enabled, channels_last, is_channels_last, pinned, upload_slice,
};
use tch::{Device, Kind, Tensor, nn};

const BN: BatchNormConfig = BatchNormConfig {
    eps: 1e-3,
    momentum: 0.01,
};

fn tiny(seed: i64) -> (nn::VarStore, EfficientNetV2) {
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(Variant::Tiny), 4, BN);
    (vs, model)
}

fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Float);
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}

#[test]
fn autocast_computes_in_bfloat16_inside_the_region_only() {
    tch::set_num_threads(1);
    let (_vs, model) = tiny(1);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let full = tch::no_grad(|| model.forward(&x, false));
    assert!(!autocast_enabled(Device::Cpu));
    let (half, inside) = autocast_bf16(Device::Cpu, || {
        (
            tch::no_grad(|| model.forward(&x, false)),
            autocast_enabled(Device::Cpu),
        )
    })
    .unwrap();
    assert!(inside);
    assert!(
        !autocast_enabled(Device::Cpu),
        "the region restores the previous state"
    );
    assert_eq!(
        half.kind(),
        Kind::BFloat16,
        "the classifier ran in bfloat16"
    );
    let err = relative(&half, &full);
    assert!(
        err > 0.0 && err < 5e-2,
        "bfloat16 logits within bfloat16's precision: {err:e}"
    );

    // Training under autocast: gradients reach the float32 flat buffer.
    let flat = FlatState::new(&_vs, Layout::Contiguous);
    autocast_bf16(Device::Cpu, || {
        model
            .forward(&x, true)
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&Tensor::from_slice(&[0i64, 3]))
            .backward()
    })
    .unwrap();
    assert_eq!(flat.grads.kind(), Kind::Float);
    assert!(flat.grads.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn channels_last_buffers_compute_the_same_and_save_in_standard_order() {
    tch::set_num_threads(1);
    let (vs, model) = tiny(2);
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let reference = tch::no_grad(|| model.forward(&x, false));
    let flat = FlatState::new(&vs, Layout::ChannelsLast);
    let stem = &vs.variables()["features.0.0.weight"];
    assert!(is_channels_last(stem), "strides {:?}", stem.stride());
    let input = channels_last(&x);
    assert!(is_channels_last(&input) && input.equal(&x));
    let out = tch::no_grad(|| model.forward(&input, false));
    assert!(relative(&out, &reference) < 1e-5);

    model
        .forward(&input, true)
        .cross_entropy_for_logits(&Tensor::from_slice(&[1i64, 2]))
        .backward();
    let grad = vs.variables()["features.0.0.weight"].grad();
    let slot = flat
        .param_slots
        .iter()
        .find(|s| s.name == "features.0.0.weight")
        .unwrap();
    assert!(
        grad.equal(&slot.view(&flat.grads)),
        "gradients land in the flat buffer"
    );

    // Saved in the standard order: a contiguous model loads it and computes the same.
    let dir = tempfile::tempdir().unwrap();
    let mut optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
    let mut ema = Ema::new(&flat, 0.999);
    optimizer.step(&flat, 0.01);
    TrainingState {
        vs: &vs,
        flat: &flat,
        optimizer: &mut optimizer,
        ema: &mut ema,
    }
    .save(dir.path())
    .unwrap();
    let (vs2, model2) = tiny(3);
    let flat2 = FlatState::new(&vs2, Layout::Contiguous);
    let mut optimizer2 = RmsProp::new(&flat2, &OptimizerSpec::default());
    let mut ema2 = Ema::new(&flat2, 0.999);
    TrainingState {
        vs: &vs2,
        flat: &flat2,
        optimizer: &mut optimizer2,
        ema: &mut ema2,
    }
    .load(dir.path())
    .unwrap();
    let a = tch::no_grad(|| model.forward(&input, false));
    let b = tch::no_grad(|| model2.forward(&x, false));
    assert!(relative(&a, &b) < 1e-5);
}

#[test]
fn page_locked_copies_exist_only_with_cuda_and_uploads_keep_the_values() {
    let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
    match pinned(&x) {
        // The shim turned libtorch's exception into a plain "cannot", with no CUDA to pin for.
        None => assert!(!tch::Cuda::is_available()),
        Some(p) => assert!(p.equal(&x) && p.device() == Device::Cpu),
    }
    let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
    assert!(upload_slice(&values, &[3, 4], Device::Cpu).equal(&x));
    if tch::Cuda::is_available() {
        let on_gpu = upload_slice(&values, &[3, 4], Device::Cuda(0));
        assert!(on_gpu.to_device(Device::Cpu).equal(&x));
    }
}

#[test]
fn a_panic_inside_an_autocast_region_leaves_it() {
    let panicked = std::panic::catch_unwind(|| {
        autocast_bf16(Device::Cpu, || panic!("a libtorch error inside the region"))
    });
    assert!(panicked.is_err());
    assert!(
        !autocast_enabled(Device::Cpu),
        "the thread no longer autocasts after the panic"
    );
}

/// The loader's memory for a GPU: zeroed, writable bytes that are the page-locked tensor's
/// own (no copy between them); plain bytes where libtorch can pin none (no CUDA device here).
#[test]
fn page_locked_memory_is_the_tensors_own_bytes_or_plain_without_cuda() {
    let memory = ladder_train::precision::page_locked_memory();
    let mut buffer = memory(4096);
    assert!(buffer.as_slice().iter().all(|&b| b == 0));
    buffer.as_mut_slice()[7] = 9;
    assert_eq!(buffer.as_slice()[7], 9);
    match buffer.owner().downcast_ref::<Tensor>() {
        Some(pinned) => {
            assert_eq!(
                pinned.int64_value(&[7]),
                9,
                "the buffer is the tensor's memory"
            );
            assert!(pinned.is_pinned(Device::Cuda(0)));
        }
        None => assert!(
            !tch::Cuda::is_available(),
            "CUDA is here, but the memory is not page-locked"
        ),
    }
}
