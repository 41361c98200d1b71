//! The dataset index against real tar files: ones written here with the tar crate (GNU long
//! names, ustar prefixes), one written by the Python `webdataset` library that users shard with,
//! and broken ones. Every index entry is checked by reading its byte range back from the file.

use ladder_core::dataset::{
    DatasetError, ImageFormat, IndexedSample, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardIndex,
};
use ladder_core::indexing::{Issue, IssueKind, index_dir, index_name, index_shard};
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

/// A tar member: name and data.
type Member = (String, Vec<u8>);

fn member(name: impl Into<String>, data: impl Into<Vec<u8>>) -> Member {
    (name.into(), data.into())
}

/// Stand-in image bytes, distinct per `seed`, of a length that is usually not a multiple of 512
/// so that the index's sizes cannot be confused with the tar's padded ones.
fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A tar of `members` with headers made by `new_header`; the builder adds the end-of-archive
/// marker and, for names that do not fit the header, GNU long-name members.
fn tar_bytes(new_header: fn() -> tar::Header, members: &[Member]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut header = new_header();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    builder.into_inner().unwrap()
}

fn gnu_tar(members: &[Member]) -> Vec<u8> {
    tar_bytes(tar::Header::new_gnu, members)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Asserts that `sample`'s range of the shard file holds exactly `expected`.
fn assert_range(shard: &[u8], sample: &IndexedSample, expected: &[u8]) {
    let range = sample.offset as usize..(sample.offset + sample.size) as usize;
    assert!(
        range.end <= shard.len(),
        "{}: range {range:?} is beyond the {}-byte shard",
        sample.key,
        shard.len()
    );
    assert_eq!(
        &shard[range.clone()],
        expected,
        "{}: bytes {range:?} are not the image",
        sample.key
    );
}

#[test]
fn a_good_directory_is_indexed_with_exact_image_ranges() {
    let dir = TempDir::new().unwrap();
    // Over 100 bytes: the GNU header stores it in a separate long-name member before the file.
    let long_key = format!("{}/{}/sample000003", "d".repeat(60), "e".repeat(60));
    // Over 100 bytes but splittable at a '/': the ustar header stores it in its prefix field.
    let prefixed_key = format!("{}/sample000004", "p".repeat(120));
    let a_images = [image(1, 1000), image(2, 512), image(3, 3)];
    let b_image = image(4, 700);
    let a = gnu_tar(&[
        member("sample000001.jpg", a_images[0].clone()),
        member("sample000001.cls", "7"),
        member("sample000002.png", a_images[1].clone()),
        member("sample000002.cls", "0\n"),
        member(format!("{long_key}.jpeg"), a_images[2].clone()),
        member(format!("{long_key}.cls"), " 12 "),
    ]);
    let b = tar_bytes(
        tar::Header::new_ustar,
        &[
            member(format!("{prefixed_key}.JPG"), b_image.clone()),
            member(format!("{prefixed_key}.cls"), "3"),
        ],
    );
    // The archives really take the paths this test is about.
    assert!(contains(&a, b"././@LongLink"));
    assert!(!contains(&b, b"././@LongLink"));
    std::fs::write(dir.path().join("b.tar"), &b).unwrap();
    std::fs::write(dir.path().join("a.tar"), &a).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a shard").unwrap();

    let report = index_dir(dir.path(), None).unwrap();
    assert!(report.issues.is_empty(), "{:?}", report.issues);
    assert_eq!(report.manifest_path, dir.path().join(MANIFEST_FILE));
    let manifest = &report.manifest;
    assert_eq!(manifest.format, MANIFEST_FORMAT);
    assert_eq!(manifest.total_samples, 4);
    assert_eq!(manifest.classes, 13, "the largest label is 12");
    assert_eq!(manifest.shard_sizes(), vec![3, 1]);
    let listed: Vec<_> = manifest
        .shards
        .iter()
        .map(|s| (s.path.as_str(), s.index.as_str(), s.bytes))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("a.tar", "a.idx.json", a.len() as u64),
            ("b.tar", "b.idx.json", b.len() as u64),
        ]
    );
    assert_eq!(index_name("a.tar"), "a.idx.json");
    assert_eq!(Manifest::load(&report.manifest_path).unwrap(), *manifest);

    let a_index = ShardIndex::load(&dir.path().join("a.idx.json")).unwrap();
    let (fresh, issues) = index_shard(&dir.path().join("a.tar"), "a.tar", None).unwrap();
    assert!(issues.is_empty());
    assert_eq!(a_index, fresh, "the index file round-trips");
    let summary: Vec<_> = a_index
        .samples
        .iter()
        .map(|s| (s.key.as_str(), s.format, s.label))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("sample000001", ImageFormat::Jpeg, 7),
            ("sample000002", ImageFormat::Png, 0),
            (long_key.as_str(), ImageFormat::Jpeg, 12),
        ]
    );
    for (sample, expected) in a_index.samples.iter().zip(&a_images) {
        assert_range(&a, sample, expected);
    }

    let b_index = ShardIndex::load(&dir.path().join("b.idx.json")).unwrap();
    assert_eq!(b_index.samples.len(), 1);
    let sample = &b_index.samples[0];
    assert_eq!(
        (sample.key.as_str(), sample.format, sample.label),
        (prefixed_key.as_str(), ImageFormat::Jpeg, 3)
    );
    assert_range(&b, sample, &b_image);

    let bounded = index_dir(dir.path(), Some(1000)).unwrap();
    assert_eq!(
        bounded.manifest.classes, 1000,
        "a given class count is kept"
    );
}

/// Writes a shard the way users do (webdataset's TarWriter, JPEGs encoded by Pillow) to
/// argv[1], and what it wrote, as JSON, to argv[2]. The last key is over 100 bytes long.
const WEBDATASET_WRITER: &str = r#"
import io, json, sys
import numpy as np
import webdataset as wds
from PIL import Image

keys = [f"sample{i:06d}" for i in range(1, 5)] + ["nested/" + "k" * 110 + "000005"]
written = []
with wds.TarWriter(sys.argv[1]) as sink:
    for i, key in enumerate(keys):
        pixels = np.random.default_rng(i).integers(0, 256, (16 + i, 24, 3), dtype=np.uint8)
        jpeg = io.BytesIO()
        Image.fromarray(pixels).save(jpeg, format="JPEG")
        sink.write({"__key__": key, "jpg": jpeg.getvalue(), "cls": 100 + i})
        written.append({"key": key, "cls": 100 + i, "jpg": list(jpeg.getvalue())})
with open(sys.argv[2], "w") as out:
    json.dump(written, out)
"#;

#[derive(serde::Deserialize)]
struct Written {
    key: String,
    cls: u32,
    jpg: Vec<u8>,
}

#[test]
fn a_shard_written_by_python_webdataset_is_indexed_exactly() {
    let python = ladder_testkit::venv_python();
    let dir = TempDir::new().unwrap();
    let shard = dir.path().join("wds-000000.tar");
    let expected_path = dir.path().join("expected.json");
    let output = Command::new(&python)
        .arg("-c")
        .arg(WEBDATASET_WRITER)
        .arg(&shard)
        .arg(&expected_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "the webdataset writer failed ({}); run scripts/bootstrap if a module is missing:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: Vec<Written> =
        serde_json::from_slice(&std::fs::read(&expected_path).unwrap()).unwrap();
    assert_eq!(expected.len(), 5);

    let report = index_dir(dir.path(), Some(1000)).unwrap();
    assert!(report.issues.is_empty(), "{:?}", report.issues);
    assert_eq!(report.manifest.total_samples, 5);
    let index = ShardIndex::load(&dir.path().join("wds-000000.idx.json")).unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    assert_eq!(index.samples.len(), expected.len());
    for (sample, written) in index.samples.iter().zip(&expected) {
        assert_eq!(sample.key, written.key);
        assert_eq!(sample.label, written.cls);
        assert_eq!(sample.format, ImageFormat::Jpeg);
        assert!(
            written.jpg.starts_with(&[0xff, 0xd8]) && written.jpg.ends_with(&[0xff, 0xd9]),
            "{}: Pillow did not write a JPEG",
            written.key
        );
        assert_range(&bytes, sample, &written.jpg);
    }
}

/// Indexes a directory holding one shard, `s.tar`, of `members`; returns the index written for
/// it and the issues.
fn index_members(members: &[Member], classes: Option<u32>) -> (ShardIndex, Vec<Issue>) {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("s.tar"), gnu_tar(members)).unwrap();
    let report = index_dir(dir.path(), classes).unwrap();
    let index = ShardIndex::load(&dir.path().join("s.idx.json")).unwrap();
    assert_eq!(report.manifest.total_samples, index.samples.len() as u64);
    (index, report.issues)
}

fn keys(index: &ShardIndex) -> Vec<&str> {
    index.samples.iter().map(|s| s.key.as_str()).collect()
}

fn issue(key: &str, kind: IssueKind) -> Issue {
    Issue {
        shard: "s.tar".into(),
        key: key.into(),
        kind,
    }
}

#[test]
fn a_sample_without_a_label_is_skipped_and_reported() {
    let (index, issues) = index_members(
        &[
            member("good.jpg", image(1, 10)),
            member("good.cls", "1"),
            member("unlabelled.jpg", image(2, 10)),
        ],
        None,
    );
    assert_eq!(keys(&index), ["good"]);
    assert_eq!(issues, [issue("unlabelled", IssueKind::MissingLabel)]);
    assert_eq!(
        issues[0].to_string(),
        "s.tar: unlabelled: no .cls label; sample skipped"
    );
}

#[test]
fn a_label_that_is_not_a_number_is_skipped_and_reported() {
    let (index, issues) = index_members(
        &[
            member("good.jpg", image(1, 10)),
            member("good.cls", "1"),
            member("words.jpg", image(2, 10)),
            member("words.cls", "abc"),
            member("negative.jpg", image(3, 10)),
            member("negative.cls", "-1"),
            member("binary.jpg", image(4, 10)),
            member("binary.cls", vec![0xff, 0xfe]),
        ],
        None,
    );
    assert_eq!(keys(&index), ["good"]);
    assert_eq!(
        issues,
        [
            issue("words", IssueKind::BadLabel("abc".into())),
            issue("negative", IssueKind::BadLabel("-1".into())),
            issue("binary", IssueKind::BadLabel("\u{fffd}\u{fffd}".into())),
        ]
    );
    assert!(issues[0].to_string().starts_with("s.tar: words: "));
}

#[test]
fn a_label_beyond_the_class_count_is_skipped_and_reported() {
    let members = [
        member("last.jpg", image(1, 10)),
        member("last.cls", "4"),
        member("beyond.jpg", image(2, 10)),
        member("beyond.cls", "5"),
    ];
    let (index, issues) = index_members(&members, Some(5));
    assert_eq!(keys(&index), ["last"]);
    assert_eq!(
        issues,
        [issue(
            "beyond",
            IssueKind::LabelOutOfRange {
                label: 5,
                classes: 5
            }
        )]
    );
    assert!(issues[0].to_string().starts_with("s.tar: beyond: "));
    let (unbounded, issues) = index_members(&members, None);
    assert_eq!(keys(&unbounded), ["last", "beyond"]);
    assert!(issues.is_empty());
}

#[test]
fn a_sample_without_an_image_is_skipped_and_reported() {
    let (index, issues) = index_members(
        &[
            member("label-only.cls", "1"),
            member("good.png", image(1, 10)),
            member("good.cls", "2"),
        ],
        None,
    );
    assert_eq!(keys(&index), ["good"]);
    assert_eq!(issues, [issue("label-only", IssueKind::MissingImage)]);
    assert!(issues[0].to_string().starts_with("s.tar: label-only: "));
}

#[test]
fn unknown_members_are_reported_and_their_samples_kept() {
    let image_bytes = image(1, 10);
    let (index, issues) = index_members(
        &[
            member("good.jpg", image_bytes.clone()),
            member("good.txt", "a caption"),
            member("good.cls", "2"),
            member("README", "no extension at all"),
        ],
        None,
    );
    assert_eq!(keys(&index), ["good"]);
    assert_eq!(index.samples[0].label, 2);
    assert_eq!(index.samples[0].size, image_bytes.len() as u64);
    assert_eq!(
        issues,
        [
            issue("good", IssueKind::UnknownExtension("txt".into())),
            issue("README", IssueKind::UnknownExtension(String::new())),
        ]
    );
    assert_eq!(
        issues[0].to_string(),
        "s.tar: good: member .txt is not used; ignored"
    );
    assert_eq!(
        issues[1].to_string(),
        "s.tar: README: member name has no .EXT; ignored"
    );
}

#[test]
fn a_duplicate_member_is_reported_and_the_first_kept() {
    let first = image(1, 600);
    let members = [
        member("twice.jpg", first.clone()),
        member("twice.cls", "1"),
        member("twice.png", image(2, 300)),
        member("twice.cls", "2"),
    ];
    let shard = gnu_tar(&members);
    let (index, issues) = index_members(&members, None);
    assert_eq!(keys(&index), ["twice"]);
    assert_eq!(index.samples[0].label, 1);
    assert_eq!(index.samples[0].format, ImageFormat::Jpeg);
    assert_range(&shard, &index.samples[0], &first);
    assert_eq!(
        issues,
        [
            issue("twice", IssueKind::DuplicateMember("png".into())),
            issue("twice", IssueKind::DuplicateMember("cls".into())),
        ]
    );
    assert!(issues[0].to_string().starts_with("s.tar: twice: "));
}

#[test]
fn links_are_reported_and_directories_passed_over() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir_header = tar::Header::new_gnu();
    dir_header.set_entry_type(tar::EntryType::Directory);
    dir_header.set_size(0);
    builder
        .append_data(&mut dir_header, "train/", std::io::empty())
        .unwrap();
    let mut link_header = tar::Header::new_gnu();
    link_header.set_entry_type(tar::EntryType::Symlink);
    link_header.set_size(0);
    builder
        .append_link(&mut link_header, "train/a.jpg", "elsewhere.jpg")
        .unwrap();
    let shard = builder.into_inner().unwrap();
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("s.tar");
    std::fs::write(&path, shard).unwrap();
    let (index, issues) = index_shard(&path, "s.tar", None).unwrap();
    assert!(index.samples.is_empty());
    assert_eq!(issues, [issue("train/a.jpg", IssueKind::NotAFile)]);
}

/// A valid shard of three small samples.
fn valid_shard() -> Vec<u8> {
    gnu_tar(&[
        member("a.jpg", image(1, 900)),
        member("a.cls", "1"),
        member("b.jpg", image(2, 900)),
        member("b.cls", "2"),
        member("c.jpg", image(3, 900)),
        member("c.cls", "3"),
    ])
}

/// Indexes a directory of a valid `good.tar` and `x.tar` holding `broken`, and checks that the
/// whole command fails, naming x.tar alone, and writes no manifest.
fn assert_rejected(broken: &[u8], what: &str) {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("good.tar"), valid_shard()).unwrap();
    std::fs::write(dir.path().join("x.tar"), broken).unwrap();
    let err = match index_dir(dir.path(), None) {
        Ok(report) => panic!("{what}: indexed as {:?}", report.manifest),
        Err(err) => err,
    };
    let message = err.to_string();
    let DatasetError::BadShards { count, errors } = &err else {
        panic!("{what}: expected BadShards, got {message}");
    };
    assert_eq!((*count, errors.len()), (1, 1), "{what}: {message}");
    let DatasetError::BadTar { path, .. } = &errors[0] else {
        panic!("{what}: expected BadTar, got {}", errors[0]);
    };
    assert_eq!(*path, dir.path().join("x.tar"), "{what}");
    assert!(message.contains("x.tar"), "{what}: {message}");
    assert!(!message.contains("good.tar"), "{what}: {message}");
    assert!(
        !dir.path().join(MANIFEST_FILE).exists(),
        "{what}: a manifest was written"
    );
}

/// More shards than indexing threads, two of them broken: the report names both, in name
/// order, and a valid directory of as many shards is indexed in name order.
#[test]
fn many_shards_are_indexed_in_name_order_and_every_broken_one_is_named() {
    let dir = TempDir::new().unwrap();
    let shard = valid_shard();
    for i in 0..20 {
        let broken = i == 4 || i == 17;
        let bytes = if broken {
            &shard[..shard.len() / 2]
        } else {
            &shard[..]
        };
        std::fs::write(dir.path().join(format!("s{i:02}.tar")), bytes).unwrap();
    }
    let Err(DatasetError::BadShards { count, errors }) = index_dir(dir.path(), None) else {
        panic!("two broken shards indexed");
    };
    let named: Vec<String> = errors
        .iter()
        .map(|e| match e {
            DatasetError::BadTar { path, .. } => path.file_name().unwrap().to_string_lossy().into(),
            other => panic!("expected BadTar, got {other}"),
        })
        .collect();
    assert_eq!(
        (count, named),
        (2, vec!["s04.tar".into(), "s17.tar".into()])
    );
    for i in [4, 17] {
        std::fs::write(dir.path().join(format!("s{i:02}.tar")), &shard).unwrap();
    }
    let report = index_dir(dir.path(), None).unwrap();
    let names: Vec<&str> = report
        .manifest
        .shards
        .iter()
        .map(|s| s.path.as_str())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("s{i:02}.tar")).collect();
    assert_eq!(names, expected);
}

#[test]
fn a_truncated_shard_fails_the_directory() {
    let shard = valid_shard();
    let (index, _) = {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("s.tar");
        std::fs::write(&path, &shard).unwrap();
        index_shard(&path, "s.tar", None).unwrap()
    };
    let b = &index.samples[1];
    let b_data = b.offset as usize;
    // Short names: each member is one header block followed by its data.
    let b_header = b_data - 512;
    assert_rejected(
        &shard[..b_data + b.size as usize / 2],
        "cut inside a member's data",
    );
    assert_rejected(&shard[..b_header + 100], "cut inside a member's header");
    // The builder ends the archive with two zero blocks: without them every member is whole,
    // yet the shard was cut short and lost whatever followed.
    assert_eq!(&shard[shard.len() - 1024..], &[0; 1024]);
    assert_rejected(&shard[..shard.len() - 1024], "cut between members");
    assert_rejected(&[], "empty file");
}

#[test]
fn a_shard_of_garbage_fails_the_directory() {
    // A fixed xorshift stream: random-looking bytes, the same on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    assert_rejected(&garbage, "random bytes");
    assert_rejected(&garbage[..100], "random bytes shorter than a tar block");
}

#[test]
fn a_directory_without_shards_is_an_error() {
    let dir = TempDir::new().unwrap();
    let err = index_dir(dir.path(), None).unwrap_err();
    assert!(
        matches!(&err, DatasetError::NoShards { dir: d } if d == dir.path()),
        "{err}"
    );
    std::fs::write(
        dir.path().join("shard.tar.gz"),
        "compressed shards are not read",
    )
    .unwrap();
    let err = index_dir(dir.path(), None).unwrap_err();
    assert!(matches!(err, DatasetError::NoShards { .. }), "{err}");
    assert!(!dir.path().join(MANIFEST_FILE).exists());
}

/// A directory indexed from one valid shard, and its manifest as JSON.
fn indexed_dir() -> (TempDir, serde_json::Value) {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("s.tar"), valid_shard()).unwrap();
    let report = index_dir(dir.path(), None).unwrap();
    let json = serde_json::from_slice(&std::fs::read(report.manifest_path).unwrap()).unwrap();
    (dir, json)
}

/// Writes `contents` as the manifest and loads it, expecting a format error that names the file
/// and says `why`.
fn assert_manifest_rejected(dir: &Path, contents: &str, why: &str) {
    let path = dir.join(MANIFEST_FILE);
    std::fs::write(&path, contents).unwrap();
    let err = Manifest::load(&path).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, DatasetError::Format { .. }),
        "{why}: {message}"
    );
    assert!(
        message.starts_with(&format!("{}: ", path.display())),
        "{why}: {message}"
    );
    assert!(message.contains(why), "{why}: {message}");
}

#[test]
fn a_bad_manifest_is_rejected_naming_the_file() {
    let (dir, manifest) = indexed_dir();
    assert!(Manifest::load(&dir.path().join(MANIFEST_FILE)).is_ok());

    let mut wrong_format = manifest.clone();
    wrong_format["format"] = "ladder-manifest/0".into();
    assert_manifest_rejected(
        dir.path(),
        &wrong_format.to_string(),
        "format is \"ladder-manifest/0\"",
    );

    let mut wrong_total = manifest.clone();
    wrong_total["total_samples"] = 4.into();
    assert_manifest_rejected(
        dir.path(),
        &wrong_total.to_string(),
        "total_samples is 4 but the shards hold 3",
    );

    assert_manifest_rejected(dir.path(), "shards: [s.tar]", "expected value");

    let missing = dir.path().join("elsewhere").join(MANIFEST_FILE);
    let err = Manifest::load(&missing).unwrap_err();
    assert!(matches!(err, DatasetError::Io { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_bad_shard_index_is_rejected_naming_the_file() {
    let (dir, _) = indexed_dir();
    let path = dir.path().join("s.idx.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    index["format"] = "ladder-shard-index/0".into();
    std::fs::write(&path, index.to_string()).unwrap();
    let message = ShardIndex::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "{}: not a Ladder shard index: format is",
            path.display()
        )),
        "{message}"
    );
}
