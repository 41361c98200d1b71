//! ImageNet's layouts, imported or read in place, train: one-epoch jobs of a real coordinator
//! and worker on each dataset `cli/tests/imagenet.rs` makes with Python's tarfile, webdataset
//! and Pillow (per-synset tars, a tar of them, the same gzipped, ILSVRC-2012's val tar with its
//! labels, the hub's WebP shards), each training every sample of its dataset once with nothing
//! skipped.

mod common;

use common::{Cluster, assert_every_sample_once};
use ladder_core::spec::JobSpec;
use ladder_proto::v1 as pb;
use ladder_testkit::binary;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn import(args: &[&Path], extra: &[&str]) {
    let out = Command::new(binary("ladder"))
        .args(["dataset", "import", "--held-out", "0"])
        .args(args)
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A one-epoch job on the dataset at `manifest` with `classes` classes.
fn spec(dir: &Path, name: &str, manifest: &Path, classes: u32) -> JobSpec {
    let text = format!(
        r#"[job]
name = "{name}"
[model]
variant = "tiny"
classes = {classes}
[data]
manifest = "{manifest}"
decode_threads = 1
[schedule]
epochs = 1
stage_epochs = 1
min_size = 32
max_size = 32
eval_size = 32
min_dropout = 0.0
max_dropout = 0.0
min_randaugment = 2
max_randaugment = 2
randaugment = "torchvision"
[optimizer]
warmup_epochs = 0
[batch]
global = 2
micro_at_max_size = 2
micro_max = 2
[checkpoint]
dir = "checkpoints"
every_steps = 100
[workers]
min = 1
max = 1
"#,
        manifest = manifest.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    JobSpec::load(&path).unwrap()
}

#[test]
fn each_imported_or_in_place_dataset_trains_every_sample_once() {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    let hub = dir.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/tests");
    ladder_testkit::run_python(&scripts.join("imagenet_layouts.py"), &[made.as_os_str()]);
    ladder_testkit::run_python(&scripts.join("hub_shards.py"), &[hub.as_os_str()]);
    let index = Command::new(binary("ladder"))
        .args(["dataset", "index"])
        .arg(&hub)
        .output()
        .unwrap();
    assert!(index.status.success(), "{index:?}");
    import(&[&made.join("synsets"), &dir.path().join("synsets")], &[]);
    import(&[&made.join("train.tar"), &dir.path().join("archive")], &[]);
    import(&[&made.join("train.tar.gz"), &dir.path().join("gz")], &[]);
    let labels = made.join("LOC_val_solution.csv");
    import(
        &[&made.join("val.tar"), &dir.path().join("val")],
        &["--labels", labels.to_str().unwrap()],
    );

    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(1);
    for (name, manifest, classes, samples) in [
        (
            "synsets",
            dir.path().join("synsets/train/manifest.json"),
            3,
            16,
        ),
        (
            "archive",
            dir.path().join("archive/train/manifest.json"),
            3,
            16,
        ),
        ("gz", dir.path().join("gz/train/manifest.json"), 3, 16),
        ("val", dir.path().join("val/train/manifest.json"), 3, 6),
        ("hub", hub.join("manifest.json"), 4, 20),
    ] {
        let spec = spec(dir.path(), name, &manifest, classes);
        let id = cluster.submit(&spec);
        let seen = cluster.watch_until_ended(&id, Duration::from_secs(300));
        let last = seen.last().expect("the job was seen");
        assert_eq!(
            pb::JobState::try_from(last.state),
            Ok(pb::JobState::Completed),
            "{name}: {}\n{}",
            last.message,
            cluster.logs()
        );
        assert_every_sample_once(last, &spec);
        assert_eq!(
            last.trained[0].samples, samples,
            "{name}: the whole dataset in the epoch"
        );
    }
}
