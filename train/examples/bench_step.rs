//! One side of `scripts/bench step`: times Ladder's CPU training step (forward, loss with label
//! smoothing, backward, RMSProp with weight decay) and prints images/s as one JSON line.
//!
//! usage: bench_step VARIANT IMAGE_SIZE BATCH THREADS STEPS

use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_train::flat::{FlatState, Layout};
use ladder_train::loss;
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_train::optim::RmsProp;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [variant, size, batch, threads, steps] = args.as_slice() else {
        eprintln!("usage: bench_step VARIANT IMAGE_SIZE BATCH THREADS STEPS");
        std::process::exit(2);
    };
    let variant: Variant = toml::Value::String(variant.clone())
        .try_into()
        .expect("variant: tiny, s, m, l or xl");
    let (size, batch, threads, steps): (i64, i64, i32, u32) = (
        size.parse().expect("size"),
        batch.parse().expect("batch"),
        threads.parse().expect("threads"),
        steps.parse().expect("steps"),
    );
    tch::set_num_threads(threads);
    tch::manual_seed(0);
    let classes = 1000;
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = BatchNormConfig {
        eps: 1e-3,
        momentum: 0.01,
    };
    let model = EfficientNetV2::new(&vs.root(), &Architecture::of(variant), classes, bn);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let mut optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
    let images = Tensor::randn([batch, 3, size, size], (Kind::Float, Device::Cpu));
    let labels = Tensor::randint(classes, [batch], (Kind::Int64, Device::Cpu));
    let targets = loss::smooth(&loss::one_hot(&labels, classes), 0.1);
    let step = |optimizer: &mut RmsProp| {
        flat.zero_grads();
        loss::soft_cross_entropy(&model.forward(&images, true), &targets).backward();
        optimizer.step(&flat, 0.01);
    };
    for _ in 0..2 {
        step(&mut optimizer);
    }
    let start = Instant::now();
    for _ in 0..steps {
        step(&mut optimizer);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"images_per_second\": {}}}",
        (batch * steps as i64) as f64 / seconds
    );
}
