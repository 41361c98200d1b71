//! `ladder dataset import` on ImageNet's release layouts, made in small by Python's tarfile and
//! Pillow (`imagenet_layouts.py`): a directory of per-synset tars, a tar of them read in place,
//! and ILSVRC-2012's val tar with Kaggle's labels. Each import has the expected classes and
//! samples, reports every oddity it left out, and every sample it kept reads through the loader
//! with nothing skipped that decodes.

use ladder_core::dataset::Manifest;
use ladder_data::batch::PixelFormat;
use ladder_data::loader::{BatchRequest, Dataset, Transform, assemble};
use ladder_testkit::binary;
use std::path::Path;
use std::process::Command;

const WNIDS: [&str; 3] = ["n01440764", "n01443537", "n01484850"];

/// `ladder dataset import --held-out 0 ARGS...`: (success, stdout and stderr).
fn import(args: &[&str]) -> (bool, String) {
    import_with(&[&["--held-out", "0"], args].concat(), |_| {})
}

/// `ladder dataset import ARGS...` with `setup` on the command first (its environment, say).
fn import_with(args: &[&str], setup: impl FnOnce(&mut Command)) -> (bool, String) {
    let mut command = Command::new(binary("ladder"));
    command.args(["dataset", "import"]).args(args);
    setup(&mut command);
    let out = command.output().expect("running ladder");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A temporary directory holding `imagenet_layouts.py`'s archives in `made/`.
fn layouts() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/imagenet_layouts.py");
    ladder_testkit::run_python(&script, &[made.as_os_str()]);
    (dir, made)
}

fn classes(dest: &Path) -> Vec<String> {
    serde_json::from_slice(&std::fs::read(dest.join("classes.json")).unwrap()).unwrap()
}

/// The imported training split's samples, each read and decoded through the loader (the
/// labels they carry, in sample order); fails on any skip.
fn read_all(dest: &Path) -> Vec<i64> {
    let manifest = dest.join("train/manifest.json");
    let manifest_read = Manifest::load(&manifest).unwrap();
    let (samples, classes) = (manifest_read.total_samples, manifest_read.classes);
    let data = Dataset::open(&manifest).unwrap();
    let batch = assemble(
        &data,
        &BatchRequest {
            ids: (0..samples).collect(),
            seed: 0,
            epoch: 0,
            transform: Transform::Eval(32),
            pixels: PixelFormat::Bytes,
            classes,
        },
    )
    .unwrap();
    assert!(batch.skipped.is_empty(), "{:?}", batch.skipped);
    batch.labels
}

/// The shards in `dir`, in name order: each one's name, length and a hash of its bytes (what a
/// failed comparison can print).
fn shards(dir: &Path) -> Vec<(String, usize, u64)> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let mut hash = DefaultHasher::new();
            bytes.hash(&mut hash);
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, bytes.len(), hash.finish())
        })
        .collect()
}

/// The index files of a dataset directory (the shards' indexes, the sample index, the
/// manifest), by name.
fn index_files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".tar"))
        .map(|name| (name.clone(), std::fs::read(dir.join(&name)).unwrap()))
        .collect()
}

#[test]
fn imagenets_release_layouts_import_in_place_with_their_oddities_reported() {
    let (dir, made) = layouts();
    let path = |p: &Path| p.to_str().unwrap().to_owned();

    // A directory of per-synset tars.
    let from_synsets = dir.path().join("from-synsets");
    let (ok, said) = import(&[&path(&made.join("synsets")), &path(&from_synsets)]);
    assert!(ok, "{said}");
    assert_eq!(classes(&from_synsets), WNIDS);
    for oddity in [
        "n01440764.tar:n01440764_empty.JPEG: empty, or not a JPEG, PNG or WebP image",
        "n01440764.tar:readme.txt: not a .jpg, .jpeg, .png or .webp file",
        "n01440764.tar:n01440764_0.JPEG: a second member of that name",
        "n01484850.tar: unreadable after 2 member(s)",
    ] {
        assert!(said.contains(oddity), "{oddity} not reported:\n{said}");
    }
    // 9 of the first tar (6, grayscale, CMYK, a PNG named .JPEG), 5 and the 2 before the cut.
    let labels = read_all(&from_synsets);
    for (class, expected) in [(0, 9), (1, 5), (2, 2)] {
        let n = labels.iter().filter(|&&l| l == class).count();
        assert_eq!(n, expected, "class {class}: {labels:?}");
    }

    // The tar of those tars, read in place: the same shards, byte for byte.
    let from_archive = dir.path().join("from-archive");
    let (ok, said) = import(&[&path(&made.join("train.tar")), &path(&from_archive)]);
    assert!(ok, "{said}");
    assert!(
        said.contains("winter21_whole/n01484850.tar: unreadable after 2 member(s)"),
        "{said}"
    );
    assert_eq!(classes(&from_archive), WNIDS);
    assert_eq!(
        shards(&from_archive.join("train")),
        shards(&from_synsets.join("train")),
        "the archive in place gives the shards the unpacked tars give"
    );

    // ILSVRC-2012's val tar with LOC_val_solution.csv; a tar of images needs the labels.
    let val = dir.path().join("val");
    let (ok, said) = import(&[&path(&made.join("val.tar")), &path(&val)]);
    assert!(!ok && said.contains("needs --labels"), "{said}");
    let labels_file = path(&made.join("LOC_val_solution.csv"));
    let (ok, said) = import(&[
        &path(&made.join("val.tar")),
        &path(&val),
        "--labels",
        &labels_file,
    ]);
    assert!(ok, "{said}");
    assert!(
        said.contains("ILSVRC2012_val_00000007.JPEG: not in"),
        "{said}"
    );
    assert_eq!(classes(&val), WNIDS);
    let mut labels = read_all(&val);
    labels.sort();
    assert_eq!(
        labels,
        [0, 0, 1, 1, 2, 2],
        "the wnid first in each PredictionString"
    );

    // The same tar labelled by the ILSVRC-2012 devkit (meta.mat and the ground truth), which
    // labels the seventh image too.
    let devkit = dir.path().join("val-devkit");
    let (ok, said) = import(&[
        &path(&made.join("val.tar")),
        &path(&devkit),
        "--labels",
        &path(&made.join("devkit")),
    ]);
    assert!(ok, "{said}");
    assert_eq!(classes(&devkit), WNIDS);
    let mut labels = read_all(&devkit);
    labels.sort();
    assert_eq!(
        labels,
        [0, 0, 1, 1, 1, 2, 2],
        "image 7 is the second wnid's"
    );

    // Numbered as a train import with one more class (sorting first) numbered them: the val
    // set's labels follow that list, and a class it lacks keeps its number.
    let train_classes = dir.path().join("train-classes.json");
    std::fs::write(
        &train_classes,
        serde_json::to_vec(&["n00000001", WNIDS[0], WNIDS[1], WNIDS[2]]).unwrap(),
    )
    .unwrap();
    let numbered = dir.path().join("val-numbered");
    let (ok, said) = import(&[
        &path(&made.join("val.tar")),
        &path(&numbered),
        "--labels",
        &labels_file,
        "--classes-from",
        &path(&train_classes),
    ]);
    assert!(ok, "{said}");
    assert_eq!(classes(&numbered)[0], "n00000001");
    // Numbered by a class list that none of its images are of: nothing to import, refused.
    let foreign = dir.path().join("foreign-classes.json");
    std::fs::write(&foreign, r#"["n00000001"]"#).unwrap();
    let (ok, said) = import(&[
        &path(&made.join("val.tar")),
        &path(&dir.path().join("foreign")),
        "--labels",
        &labels_file,
        "--classes-from",
        &path(&foreign),
    ]);
    assert!(
        !ok && said.contains("no image to import: 7 left out"),
        "{said}"
    );
    let mut labels = read_all(&numbered);
    labels.sort();
    assert_eq!(labels, [1, 1, 2, 2, 3, 3]);

    // The same tar of tars compressed, as it is downloaded (and as pigz or bgzip write it, in
    // gzip members): streamed, it gives the shards the archive in place gives, byte for byte,
    // both splits.
    let split = ["--held-out", "2", "--shard-samples", "3"];
    let from_compressed = dir.path().join("from-compressed");
    let from_members = dir.path().join("from-members");
    let in_place = dir.path().join("in-place");
    for (source, dest) in [
        ("train.tar.gz", &from_compressed),
        ("members.tar.gz", &from_members),
        ("train.tar", &in_place),
    ] {
        let (source, dest) = (path(&made.join(source)), path(dest));
        let (ok, said) = import_with(
            &[&[source.as_str(), dest.as_str()][..], &split].concat(),
            |_| {},
        );
        assert!(ok, "{said}");
        assert!(
            said.contains("winter21_whole/n01484850.tar: unreadable after 2 member(s)"),
            "{said}"
        );
    }
    let (ok, said) = import(&[
        &path(&made.join("train.tar.gz")),
        &path(&dir.path().join("x")),
    ]);
    assert!(
        ok && said.contains("winter21_whole/README: not a per-synset tar"),
        "{said}"
    );
    assert_eq!(classes(&from_compressed), WNIDS);
    for split in ["train", "val"] {
        let (streamed, read) = (
            shards(&from_compressed.join(split)),
            shards(&in_place.join(split)),
        );
        let members = shards(&from_members.join(split));
        assert_eq!(members, read, "{split}: a gzip of two members");
        assert!(!streamed.is_empty());
        assert_eq!(streamed, read, "{split}: the compressed archive's shards");
    }
    // The import indexes what it writes as it writes it: the indexes and manifests are those
    // `ladder dataset index` makes reading the shards.
    for dest in [&from_compressed, &in_place] {
        for split in ["train", "val"] {
            let dir = dest.join(split);
            let imported = index_files(&dir);
            for name in imported.keys() {
                std::fs::remove_file(dir.join(name)).unwrap();
            }
            let out = Command::new(binary("ladder"))
                .args(["dataset", "index", "--classes", "3"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(imported, index_files(&dir), "{}", dir.display());
        }
    }
    assert_eq!(
        read_all(&from_compressed).len(),
        16 - 4,
        "2 held out of each of 2 classes"
    );

    // A truncated JPEG inside it starts like a JPEG: kept, unless --verify decodes each image
    // as the stream passes it.
    for (extra, kept) in [(None, 3), (Some("--verify"), 2)] {
        let dest = dir.path().join(format!("verify-{kept}"));
        let mut args = vec![path(&made.join("verify.tar.gz")), path(&dest)];
        args.extend(extra.map(str::to_owned));
        let (ok, said) = import(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{said}");
        assert!(said.contains(&format!("imported {kept} images")), "{said}");
        assert_eq!(
            said.contains("n01440764_2.JPEG: does not decode"),
            extra.is_some(),
            "{said}"
        );
    }

    // A download cut short is refused, saying where it breaks, with nothing written.
    let cut = made.join("cut.tar.gz");
    let whole = std::fs::read(made.join("train.tar.gz")).unwrap();
    std::fs::write(&cut, &whole[..whole.len() * 2 / 3]).unwrap();
    let cut_dest = dir.path().join("from-cut");
    let (ok, said) = import(&[&path(&cut), &path(&cut_dest)]);
    assert!(
        !ok && said.contains("a truncated or corrupt download?"),
        "{said}"
    );
    assert!(!cut_dest.join("train").exists(), "{said}");
    // So is a whole gzip around a tar cut short between two synset tars.
    let (ok, said) = import(&[&path(&made.join("tar-cut.tar.gz")), &path(&cut_dest)]);
    assert!(!ok && said.contains("the archive is cut short"), "{said}");
}

/// The hub's WebDataset shards of WebP images, written by webdataset's own TarWriter, indexed
/// in place (no copy) and read whole through the loader, nothing skipped.
#[test]
fn the_hubs_webp_shards_are_indexed_in_place_and_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hub_shards.py");
    let counts: Vec<usize> =
        serde_json::from_str(ladder_testkit::run_python(&script, &[dir.path().as_os_str()]).trim())
            .unwrap();
    let out = Command::new(binary("ladder"))
        .args(["dataset", "index"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("indexed 20 samples in 2 shards, 4 classes, 0 issue(s)"),
        "{said}"
    );
    let manifest = dir.path().join("manifest.json");
    let data = Dataset::open(&manifest).unwrap();
    let batch = assemble(
        &data,
        &BatchRequest {
            ids: (0..20).collect(),
            seed: 0,
            epoch: 0,
            transform: Transform::Eval(32),
            pixels: PixelFormat::Bytes,
            classes: 4,
        },
    )
    .unwrap();
    assert!(batch.skipped.is_empty(), "{:?}", batch.skipped);
    for (class, expected) in counts.iter().enumerate() {
        let n = batch.labels.iter().filter(|&&l| l == class as i64).count();
        assert_eq!(n, *expected, "class {class}");
    }
}

/// An import killed part-way (here aborted by its test hook after three shards, as kill -9
/// would stop it) continues when run again: the shards it wrote stay as they are (same inode,
/// same time), the rest are written, and the result is byte for byte a fresh import's. Another
/// seed over the interrupted import is refused.
#[test]
fn an_interrupted_import_continues_where_it_stopped_writing_nothing_twice() {
    interrupted_and_resumed("synsets");
}

/// The same for a compressed archive, streamed, with a checkpoint after every synset tar: the
/// rerun also passes over the images the checkpoint says are on disk without writing them.
#[test]
fn an_interrupted_compressed_import_continues_from_its_last_checkpoint() {
    let said = interrupted_and_resumed("train.tar.gz");
    let phrase = " more images written before its last checkpoint";
    let before = &said[..said
        .find(phrase)
        .unwrap_or_else(|| panic!("{phrase:?}: {said}"))];
    let images: u64 = before.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(images > 0, "{said}");
}

/// A checkpoint left by an interrupted import that the user abandoned (its journal and shards
/// deleted, to start over with another seed) is not taken for the new import's when that one
/// is interrupted too, before its own first checkpoint.
#[test]
fn an_abandoned_imports_checkpoint_is_not_taken_for_a_new_ones() {
    let (dir, made) = layouts();
    let source = made.join("train.tar.gz");
    let dest = dir.path().join("dest");
    let (ok, said) = small_shards(&source, &dest, &[], Some("3"));
    assert!(!ok && dest.join(".import-stream").exists(), "{said}");
    std::fs::remove_file(dest.join(".import-journal")).unwrap();
    for shard in std::fs::read_dir(dest.join("train")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.extension().is_some_and(|e| e == "tar") {
            std::fs::remove_file(shard).unwrap();
        }
    }
    let seed = ["--seed", "9"];
    let (ok, said) = small_shards(&source, &dest, &seed, Some("1"));
    assert!(!ok, "{said}");
    let (ok, said) = small_shards(&source, &dest, &seed, None);
    assert!(ok, "{said}");
    let fresh = dir.path().join("fresh");
    let (ok, said) = small_shards(&source, &fresh, &seed, None);
    assert!(ok, "{said}");
    assert_eq!(shards(&dest.join("train")), shards(&fresh.join("train")));
    assert_eq!(
        index_files(&dest.join("train")),
        index_files(&fresh.join("train"))
    );
}

/// Imports `source` into `dest` in shards of 2 on one thread, with a checkpoint after every
/// synset tar, aborted by the test hook after `abort_after` shards if given.
fn small_shards(
    source: &Path,
    dest: &Path,
    extra: &[&str],
    abort_after: Option<&str>,
) -> (bool, String) {
    let (source, dest) = (source.to_str().unwrap(), dest.to_str().unwrap());
    let args = [
        &[
            "--held-out",
            "0",
            "--shard-samples",
            "2",
            "--threads",
            "1",
            source,
            dest,
        ],
        extra,
    ]
    .concat();
    import_with(&args, |command| {
        command.env("LADDER_IMPORT_CHECKPOINT_SECONDS", "0");
        if let Some(n) = abort_after {
            command.env("LADDER_IMPORT_ABORT_AFTER_SHARDS", n);
        }
    })
}

/// Imports `source` (of `imagenet_layouts.py`'s) interrupted, then again; returns what the
/// second run said.
fn interrupted_and_resumed(source: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let (dir, made) = layouts();
    let source = made.join(source);
    let run = |dest: &Path, extra: &[&str], abort_after: Option<&str>| {
        small_shards(&source, dest, extra, abort_after)
    };
    let shard_files = |dest: &Path| -> Vec<(String, u64, i64)> {
        let mut found: Vec<_> = std::fs::read_dir(dest.join("train"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
            .map(|e| {
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.ino(),
                    m.mtime_nsec(),
                )
            })
            .collect();
        found.sort();
        found
    };
    let dest = dir.path().join("interrupted");
    let (ok, said) = run(&dest, &[], Some("3"));
    assert!(!ok, "the hook aborts the import: {said}");
    assert!(dest.join(".import-journal").exists());
    let before = shard_files(&dest);
    assert_eq!(before.len(), 3, "{before:?}");
    // A kept shard that is not what the plan puts there (cut short, here, in a copy) is refused.
    let copy = dir.path().join("copy");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&dest)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    let kept = copy.join("train").join(&before[0].0);
    let bytes = std::fs::read(&kept).unwrap();
    std::fs::write(&kept, &bytes[..bytes.len() - 1024]).unwrap();
    let (ok, said) = run(&copy, &[], None);
    assert!(
        !ok && said.contains("delete it and run the import again"),
        "{said}"
    );

    let (ok, said) = run(&dest, &["--seed", "9"], None);
    assert!(
        !ok && said.contains("interrupted import of another source"),
        "{said}"
    );

    let (ok, resumed) = run(&dest, &[], None);
    assert!(ok, "{resumed}");
    assert!(
        resumed.contains("resumed an interrupted import, keeping its 3 shards"),
        "{resumed}"
    );
    assert!(
        resumed.contains("imported 16 images of 3 classes into 8 shards"),
        "{resumed}"
    );
    let after = shard_files(&dest);
    assert_eq!(after.len(), 8);
    for kept in &before {
        assert!(
            after.contains(kept),
            "{kept:?} was written again: {after:?}"
        );
    }
    assert!(!dest.join(".import-journal").exists());
    let fresh = dir.path().join("fresh");
    let (ok, said) = run(&fresh, &[], None);
    assert!(ok, "{said}");
    assert_eq!(shards(&dest.join("train")), shards(&fresh.join("train")));
    assert_eq!(
        index_files(&dest.join("train")),
        index_files(&fresh.join("train")),
        "the indexes, sample index and manifest"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dest.join("train"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!dest.join(".import-stream").exists());
    resumed
}
