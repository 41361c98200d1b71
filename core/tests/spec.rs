use ladder_core::spec::{JobSpec, SpecError, Variant};
use std::path::Path;

const VALID: &str = r#"
[job]
name = "t"
[model]
variant = "tiny"
classes = 10
[data]
manifest = "data/manifest.json"
[schedule]
epochs = 8
stage_epochs = 2
min_size = 64
max_size = 128
eval_size = 128
min_dropout = 0.1
max_dropout = 0.3
min_randaugment = 5
max_randaugment = 15
[batch]
global = 64
micro_at_max_size = 8
micro_max = 32
[checkpoint]
dir = "ckpt"
every_steps = 10
[workers]
min = 1
max = 2
"#;

fn with(from: &str, to: &str) -> String {
    assert!(
        VALID.contains(from),
        "test setup: {from:?} not in the base spec"
    );
    VALID.replacen(from, to, 1)
}

#[test]
fn the_base_spec_and_the_shipped_configs_are_valid() {
    let spec = JobSpec::parse(VALID, "base").unwrap();
    assert_eq!(spec.model.variant, Variant::Tiny);
    assert_eq!(
        spec.optimizer.lr_per_256, 0.016,
        "optimizer defaults to the paper's"
    );
    assert_eq!(spec.model.bn_eps, 1e-3);
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let spec = JobSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(spec.data.manifest.is_absolute());
            assert!(spec.checkpoint.dir.is_absolute());
            seen += 1;
        }
    }
    assert_eq!(
        seen, 6,
        "configs/ ships S, M, L, L-21k, its fine-tuning on 1k and the demo"
    );
}

#[test]
fn checkpoints_by_time_alone_are_allowed() {
    let text = with("every_steps = 10", "every_steps = 0\nevery_minutes = 30");
    let spec = JobSpec::parse(&text, "time.toml").unwrap();
    assert_eq!(
        (spec.checkpoint.every_steps, spec.checkpoint.every_minutes),
        (0, 30.0)
    );
}

#[test]
fn paths_are_relative_to_the_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, VALID).unwrap();
    let spec = JobSpec::load(&path).unwrap();
    assert_eq!(spec.data.manifest, dir.path().join("data/manifest.json"));
    assert_eq!(spec.checkpoint.dir, dir.path().join("ckpt"));
    // A loaded spec round-trips through the TOML that is sent to the coordinator.
    assert_eq!(JobSpec::parse(&spec.to_toml(), "again").unwrap(), spec);
}

#[test]
fn a_missing_file_names_the_path() {
    let err = JobSpec::load(Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(matches!(err, SpecError::Read { .. }));
    assert!(err.to_string().contains("/nonexistent/job.toml"), "{err}");
}

/// Each malformed spec, and words its error must contain: the field and what is wrong.
fn malformed() -> Vec<(String, &'static [&'static str])> {
    vec![
        ("this is not toml [".to_owned(), &["not valid TOML"][..]),
        (
            VALID.replace("[workers]\nmin = 1\nmax = 2\n", ""),
            &["missing field `workers`"],
        ),
        (
            with("classes = 10", "classes = 10\nlayers = 3"),
            &["unknown field `layers`"],
        ),
        (
            with("variant = \"tiny\"", "variant = \"huge\""),
            &["unknown variant `huge`", "tiny"],
        ),
        (
            with("classes = 10", "classes = 10\ninit_from = \"s.pth\""),
            &["model.init_from", "s.pth", ".safetensors", "save_file"],
        ),
        (
            with("classes = 10", "classes = 1"),
            &["model.classes = 1", "between 2"],
        ),
        (
            with("classes = 10", "classes = -5"),
            &["classes", "invalid value"],
        ),
        (
            with("classes = 10", "classes = \"ten\""),
            &["classes", "invalid type"],
        ),
        (
            with("name = \"t\"", "name = \"bad name!\""),
            &["job.name", "letters, digits"],
        ),
        (with("name = \"t\"", "name = \"\""), &["job.name = \"\""]),
        (with("epochs = 8", "epochs = 0"), &["schedule.epochs = 0"]),
        (
            with("stage_epochs = 2", "stage_epochs = 0"),
            &["schedule.stage_epochs = 0"],
        ),
        (
            with("stage_epochs = 2", "stage_epochs = 9"),
            &["schedule.stage_epochs = 9", "schedule.epochs (8)"],
        ),
        (
            with("min_size = 64", "min_size = 16"),
            &["schedule.min_size = 16", "32"],
        ),
        (
            with("max_size = 128", "max_size = 48"),
            &["schedule.max_size = 48", "min_size (64)"],
        ),
        (
            with("max_size = 128", "max_size = 4096"),
            &["schedule.max_size = 4096", "1024"],
        ),
        (
            with("min_dropout = 0.1", "min_dropout = 1.5"),
            &["schedule.min_dropout = 1.5", "[0, 1)"],
        ),
        (
            with("max_dropout = 0.3", "max_dropout = 0.05"),
            &["schedule.max_dropout = 0.05", "min_dropout (0.1)"],
        ),
        (
            with("max_randaugment = 15", "max_randaugment = 31"),
            &["schedule.max_randaugment = 31", "30] on the official scale"],
        ),
        (
            with(
                "max_randaugment = 15",
                "max_randaugment = 31\nrandaugment = \"torchvision\"",
            ),
            &["schedule.max_randaugment = 31", "torchvision's scale"],
        ),
        (
            with(
                "max_randaugment = 15",
                "max_randaugment = 15\nrandaugment = \"tf\"",
            ),
            &["randaugment", "official", "torchvision"],
        ),
        (
            with("max_randaugment = 15", "max_randaugment = nan"),
            &["schedule.max_randaugment = NaN"],
        ),
        (with("mode", "mode"), &[]), // placeholder replaced below
        (with("global = 64", "global = 0"), &["batch.global = 0"]),
        (
            with("micro_max = 32", "micro_max = 24"),
            &["batch.micro_max = 24", "power of two"],
        ),
        (
            with("global = 64", "global = 80"),
            &["batch.global = 80", "multiple of batch.micro_max (32)"],
        ),
        (
            with("every_steps = 10", "every_steps = 0"),
            &[
                "checkpoint.every_steps = 0",
                "unless checkpoint.every_minutes",
            ],
        ),
        (
            with("every_steps = 10", "every_steps = 10\nevery_minutes = -1"),
            &["checkpoint.every_minutes = -1"],
        ),
        (
            with("every_steps = 10", "every_steps = 10\nevery_minutes = nan"),
            &["checkpoint.every_minutes = NaN"],
        ),
        (
            with("min = 1\nmax = 2", "min = 0\nmax = 2"),
            &["workers.min = 0"],
        ),
        (
            with("min = 1\nmax = 2", "min = 3\nmax = 2"),
            &["workers.max = 2", "workers.min (3)"],
        ),
        (
            with("min = 1\nmax = 2", "min = 3\nmax = 3"),
            &["workers = 3..=3", "1, 2"],
        ),
        (
            with("[data]", "[data]\ncrop_scale = [0.5, 0.1]"),
            &["data.crop_scale", "low <= high"],
        ),
        (
            with("[data]", "[data]\nstd = [0.2, 0.0, 0.2]"),
            &["data.std"],
        ),
        (
            with("[data]", "[data]\nshard_window = 0"),
            &["data.shard_window = 0"],
        ),
        (
            with("[data]", "[data]\nshuffle_block = 2000"),
            &["data.shuffle_block = 2000", "1 to 1024"],
        ),
        (
            with("[data]", "[data]\nprefetch_mb = 0"),
            &["data.prefetch_mb = 0", "MiB"],
        ),
        (
            with("[model]", "[optimizer]\nlr_per_256 = -1\n[model]"),
            &["optimizer.lr_per_256 = -1"],
        ),
        (
            with("[model]", "[optimizer]\nwarmup_epochs = 8\n[model]"),
            &["optimizer.warmup_epochs = 8"],
        ),
        (
            with("[model]", "[optimizer]\nlr_schedule = \"step\"\n[model]"),
            &["unknown variant `step`", "exponential"],
        ),
        (
            with("[model]", "[optimizer]\nema_decay = 1.0\n[model]"),
            &["optimizer.ema_decay = 1"],
        ),
        (
            with("epochs = 8", "epochs = 8\nmode = \"zigzag\""),
            &["unknown variant `zigzag`", "linear", "random"],
        ),
    ]
    .into_iter()
    .filter(|(_, words)| !words.is_empty())
    .collect()
}

#[test]
fn malformed_specs_are_rejected_with_field_value_and_allowed() {
    let cases = malformed();
    assert!(cases.len() >= 20);
    for (text, words) in cases {
        let result = std::panic::catch_unwind(|| JobSpec::parse(&text, "bad.toml"));
        let err = result
            .expect("parsing never panics")
            .expect_err(&format!("accepted a spec that should fail with {words:?}"));
        let message = err.to_string();
        assert!(message.contains("bad.toml"), "names the spec: {message}");
        for word in words {
            assert!(message.contains(word), "{word:?} missing from: {message}");
        }
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = with("epochs = 8", "epochs = 0").replace("classes = 10", "classes = 0");
    match JobSpec::parse(&text, "x").unwrap_err() {
        SpecError::Invalid { problems, .. } => {
            let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
            assert!(fields.contains(&"model.classes") && fields.contains(&"schedule.epochs"));
        }
        other => panic!("{other}"),
    }
}
