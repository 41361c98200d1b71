use ladder_core::spec::{OptimizerSpec, Variant};
use ladder_train::checkpoint::safetensors::{self, StateError};
use ladder_train::checkpoint::state::{EMA_FILE, MODEL_FILE, TrainingState};
use ladder_train::ema::Ema;
use ladder_train::flat::{FlatState, Layout};
use ladder_train::model::{Architecture, BatchNormConfig, EfficientNetV2};
use ladder_train::optim::RmsProp;
use tch::{Device, Kind, Tensor, nn};

const BN: BatchNormConfig = BatchNormConfig {
    eps: 1e-3,
    momentum: 0.01,
};

struct Run {
    vs: nn::VarStore,
    model: EfficientNetV2,
    flat: FlatState,
    optimizer: RmsProp,
    ema: Ema,
}

impl Run {
    fn new(seed: i64, classes: i64) -> Run {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = EfficientNetV2::new(&vs.root(), &Architecture::of(Variant::Tiny), classes, BN);
        let flat = FlatState::new(&vs, Layout::Contiguous);
        let optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
        let ema = Ema::new(&flat, 0.999);
        Run {
            vs,
            model,
            flat,
            optimizer,
            ema,
        }
    }

    fn train(&mut self, steps: u64) {
        for step in 0..steps {
            let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
            self.flat.zero_grads();
            self.model
                .forward(&x, true)
                .cross_entropy_for_logits(&Tensor::from_slice(&[0i64, 1, 2, 0]))
                .backward();
            self.optimizer.step(&self.flat, 0.01);
            self.ema.update(&self.flat, step);
        }
    }

    fn state(&mut self) -> TrainingState<'_> {
        TrainingState {
            vs: &self.vs,
            flat: &self.flat,
            optimizer: &mut self.optimizer,
            ema: &mut self.ema,
        }
    }
}

#[test]
fn state_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut original = Run::new(1, 3);
    original.train(3);
    original.state().save(dir.path()).unwrap();

    let mut restored = Run::new(2, 3);
    assert!(!restored.flat.params.equal(&original.flat.params));
    restored.state().load(dir.path()).unwrap();
    assert!(restored.flat.params.equal(&original.flat.params));
    assert!(restored.flat.buffers.equal(&original.flat.buffers));
    assert!(
        restored
            .optimizer
            .mean_square
            .equal(&original.optimizer.mean_square)
    );
    assert!(
        restored
            .optimizer
            .momentum_buffer
            .equal(&original.optimizer.momentum_buffer)
    );
    assert!(restored.ema.params.equal(&original.ema.params));
    assert!(restored.ema.buffers.equal(&original.ema.buffers));
    let counter =
        |run: &Run| run.vs.variables()["features.0.1.num_batches_tracked"].int64_value(&[]);
    assert_eq!(counter(&restored), 3);

    // Training on from the restored state is training on from the original.
    tch::manual_seed(9);
    original.train(2);
    tch::manual_seed(9);
    restored.train(2);
    assert!(restored.flat.params.equal(&original.flat.params));
}

#[test]
fn mismatched_state_is_refused_with_every_problem_named_and_nothing_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = Run::new(1, 5);
    other.state().save(dir.path()).unwrap();
    let mut run = Run::new(2, 3);
    let before = run.flat.params.copy();
    let err = run.state().load(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, StateError::Mismatch { .. }));
    assert!(
        message.contains("classifier.1.weight: shape [5, 256], the model has [3, 256]"),
        "{message}"
    );
    assert!(message.contains(MODEL_FILE), "{message}");
    assert!(run.flat.params.equal(&before), "nothing was loaded");

    // A file missing a tensor and carrying an unknown one.
    let path = dir.path().join(MODEL_FILE);
    let mut tensors = safetensors::read(&path).unwrap();
    tensors.retain(|(name, _)| name != "features.0.0.weight");
    tensors.push((
        "features.99.weight".to_owned(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    ));
    let err = safetensors::load(&run.vs, &tensors, "", "edited")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing features.0.0.weight [16, 3, 3, 3]"),
        "{err}"
    );
    assert!(err.contains("unexpected features.99.weight"), "{err}");

    std::fs::write(dir.path().join(EMA_FILE), b"truncated").unwrap();
    let mut same = Run::new(3, 5);
    let err = same.state().load(dir.path()).unwrap_err().to_string();
    assert!(err.contains(EMA_FILE), "names the broken file: {err}");
}

#[test]
fn a_model_without_batchnorm_buffers_saves_and_loads() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _fc = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    let flat = FlatState::new(&vs, Layout::Contiguous);
    assert_eq!(flat.buffers.numel(), 0, "no buffers to copy");
    let mut optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
    let mut ema = Ema::new(&flat, 0.999);
    let dir = tempfile::tempdir().unwrap();
    let mut state = TrainingState {
        vs: &vs,
        flat: &flat,
        optimizer: &mut optimizer,
        ema: &mut ema,
    };
    state.save(dir.path()).unwrap();
    let before = flat.params.copy();
    tch::no_grad(|| {
        let _ = flat.params.shallow_clone().fill_(0.0);
    });
    state.load(dir.path()).unwrap();
    assert!(flat.params.equal(&before));
}

#[test]
fn a_checkpoint_never_replaces_an_existing_one() {
    use ladder_train::checkpoint::{self, Manifest};
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::new(1, 3);
    let snapshot = run.state().snapshot(None);
    let manifest = Manifest {
        format: 0,
        id: ladder_core::location::CheckpointId {
            generation: 1,
            global_step: 2,
        }
        .to_string(),
        job: "job-000001".into(),
        generation: 1,
        global_step: 2,
        epoch: 0,
        step: 2,
        steps_per_epoch: 10,
        stage: 0,
        stage_end: false,
        seed: 0,
        world_size: 1,
        model: "tiny".into(),
        classes: 3,
        files: Default::default(),
        trained: Default::default(),
    };
    // Another job's checkpoint of the same name (job ids restart with a new coordinator store).
    let theirs = dir.path().join(&manifest.id);
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join(MODEL_FILE), b"theirs").unwrap();
    // What a worker of generation 0 killed mid-write left, and names that are not such.
    for left_behind in [".tmp-step-000000001-g0", ".tmp-notes", "step-000000001-g0"] {
        std::fs::create_dir_all(dir.path().join(left_behind)).unwrap();
    }
    let err = checkpoint::write(&snapshot, dir.path(), manifest.clone()).unwrap_err();
    assert!(
        err.to_string().contains("already exists; not replaced"),
        "{err}"
    );
    assert_eq!(std::fs::read(theirs.join(MODEL_FILE)).unwrap(), b"theirs");
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [".tmp-notes", "step-000000001-g0", &manifest.id],
        "our temporary directory and an earlier generation's are removed, nothing else"
    );
    for other in [".tmp-notes", "step-000000001-g0"] {
        std::fs::remove_dir_all(dir.path().join(other)).unwrap();
    }

    std::fs::remove_dir_all(&theirs).unwrap();
    let (written, _) = checkpoint::write(&snapshot, dir.path(), manifest).unwrap();
    assert_eq!(written, theirs);
    checkpoint::verify(&written).unwrap();
}
