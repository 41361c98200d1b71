//! The data path end to end on real shards: reading by plan, determinism per sample, bad input
//! skipped and reported without changing the micro-batch's shape or mislabelling, and the
//! threaded loader across a stage switch.

use ladder_core::indexing;
use ladder_data::augment::TrainTransform;
use ladder_data::batch::{HostBuffer, HostMemory, PixelFormat, Pixels};
use ladder_data::loader::{
    BatchRequest, Dataset, LoadError, Loader, MicroBatch, SkipReason, Transform, assemble,
};
use ladder_data::synth;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn train(size: u32) -> Transform {
    Transform::Train(TrainTransform {
        size,
        crop_scale: [0.08, 1.0],
        crop_ratio: [0.75, 4.0 / 3.0],
        randaugment: ladder_data::randaugment::RandAugmentScale::Torchvision,
        randaugment_magnitude: 9.0,
        randaugment_layers: 2,
    })
}

fn request(ids: Vec<u64>, epoch: u32, transform: Transform) -> BatchRequest {
    BatchRequest {
        ids,
        seed: 7,
        epoch,
        transform,
        pixels: PixelFormat::Bytes,
        classes: 4,
    }
}

/// A micro-batch's pixels as handed over for a GPU.
fn bytes(batch: &MicroBatch) -> &[u8] {
    match &batch.images {
        Pixels::Bytes(all) => all.as_slice(),
        Pixels::Normalized(_) => panic!("requested as bytes"),
    }
}

fn synth_dataset(dir: &Path) -> Dataset {
    let report = synth::write(dir, 4, 24, 3, 1).unwrap();
    assert_eq!(report.manifest.total_samples, 24);
    Dataset::open(&report.manifest_path).unwrap()
}

#[test]
fn a_sample_gets_the_same_pixels_in_any_micro_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_dataset(dir.path());
    let plane = 3 * 64 * 64;
    let together = assemble(&data, &request(vec![3, 17, 9, 22], 2, train(64))).unwrap();
    let alone = assemble(&data, &request(vec![9], 2, train(64))).unwrap();
    assert_eq!(bytes(&together).len(), 4 * plane);
    assert_eq!(
        together.labels,
        vec![3, 1, 1, 2],
        "labels follow the ids (index % 4)"
    );
    assert_eq!(
        &bytes(&together)[2 * plane..3 * plane],
        bytes(&alone),
        "sample 9"
    );
    let again = assemble(&data, &request(vec![3, 17, 9, 22], 2, train(64))).unwrap();
    assert_eq!(together.images, again.images, "reproducible");
    let next_epoch = assemble(&data, &request(vec![9], 3, train(64))).unwrap();
    assert_ne!(
        alone.images, next_epoch.images,
        "another epoch, another augmentation"
    );
    let eval = assemble(&data, &request(vec![9, 9], 2, Transform::Eval(96))).unwrap();
    assert_eq!(
        bytes(&eval)[..3 * 96 * 96],
        bytes(&eval)[3 * 96 * 96..],
        "eval is deterministic"
    );
    assert!(together.skipped.is_empty());
}

/// A shard of good and broken samples: empty, truncated and non-image bytes, and a label
/// beyond the class count.
fn broken_dataset(dir: &Path) -> Dataset {
    let file = std::fs::File::create(dir.join("shard-000000.tar")).unwrap();
    let mut tar = tar::Builder::new(file);
    let good = synth::encode_jpeg(&synth::draw(1, 4, 0, 0), 90);
    let samples: Vec<(&str, Vec<u8>, &str)> = vec![
        ("good-a", good.clone(), "1"),
        ("empty", Vec::new(), "0"),
        ("truncated", good[..good.len() / 3].to_vec(), "2"),
        ("text", b"this is not an image".to_vec(), "3"),
        ("big-label", good.clone(), "9"),
        (
            "good-b",
            synth::encode_jpeg(&synth::draw(2, 4, 1, 0), 90),
            "2",
        ),
    ];
    for (key, bytes, label) in &samples {
        synth::append(&mut tar, &format!("{key}.jpg"), bytes).unwrap();
        synth::append(&mut tar, &format!("{key}.cls"), label.as_bytes()).unwrap();
    }
    tar.finish().unwrap();
    let report = indexing::index_dir(dir, None).unwrap();
    Dataset::open(&report.manifest_path).unwrap()
}

#[test]
fn bad_samples_are_skipped_counted_reported_and_filled_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let data = broken_dataset(dir.path());
    let req = request((0..6).collect(), 0, train(48));
    let batch = assemble(&data, &req).unwrap();
    assert_eq!(
        bytes(&batch).len(),
        6 * 3 * 48 * 48,
        "the micro-batch keeps its shape"
    );
    let mut kinds: Vec<(&str, &str)> = batch
        .skipped
        .iter()
        .map(|s| (s.key.as_str(), s.reason.kind()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            ("big-label", "label_out_of_range"),
            ("empty", "empty"),
            ("text", "undecodable"),
            ("truncated", "undecodable"),
        ]
    );
    for skip in &batch.skipped {
        let line = skip.to_string();
        assert!(
            line.starts_with("shard-000000.tar: ") && line.contains(&skip.key),
            "{line}"
        );
    }
    assert!(matches!(
        batch
            .skipped
            .iter()
            .find(|s| s.key == "big-label")
            .unwrap()
            .reason,
        SkipReason::LabelOutOfRange {
            label: 9,
            classes: 4
        }
    ));
    // Every place holds a good sample's label: the donors are good-b (2) after 1..=4 and good-a.
    assert_eq!(batch.labels, vec![1, 2, 2, 2, 2, 2]);
    let again = assemble(&data, &req).unwrap();
    assert_eq!(batch.images, again.images, "filled the same way every time");
    let plane = 3 * 48 * 48;
    assert_ne!(
        bytes(&batch)[plane..2 * plane],
        bytes(&batch)[5 * plane..],
        "a fresh view of the donor"
    );

    match assemble(&data, &request(vec![1, 2, 3], 0, train(48))) {
        Err(LoadError::NothingUsable(all_bad)) => {
            assert_eq!(all_bad.0.len(), 3);
            assert!(all_bad.to_string().contains("truncated"));
        }
        other => panic!("{:?}", other.map(|b| b.ids)),
    }
}

/// A sample of `data` read on its own, with one call.
fn read_alone(data: &Dataset, id: u64) -> Vec<u8> {
    let (mut samples, count) = data.read(&[id]);
    assert_eq!(count.calls, 1);
    samples.remove(0).bytes.unwrap()
}

#[test]
fn neighbours_in_a_shard_share_one_read_of_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_dataset(dir.path()); // 3 shards of 8 samples
    let alone: Vec<Vec<u8>> = (0..24).map(|id| read_alone(&data, id)).collect();
    // Out of order and across shards: 0..=5 are neighbours in shard 0, 8 and 9 in shard 1.
    let ids = [5, 0, 3, 1, 2, 4, 9, 8, 23];
    let (samples, count) = data.read(&ids);
    assert_eq!(count.calls, 3, "one read per shard");
    let wanted: u64 = ids.iter().map(|&id| alone[id as usize].len() as u64).sum();
    assert!(
        count.bytes > wanted && count.bytes < wanted + 8 * ladder_data::loader::COALESCE_GAP,
        "{count:?}: only the gaps between neighbours are read besides the samples ({wanted} bytes)"
    );
    for (sample, id) in samples.iter().zip(ids) {
        assert_eq!(sample.id, id);
        assert_eq!(
            sample.bytes.as_ref().unwrap(),
            &alone[id as usize],
            "sample {id}"
        );
    }
    // A sample between them larger than the gap: two reads, not one that reads it too.
    assert!(alone[1].len() as u64 > ladder_data::loader::COALESCE_GAP);
    assert_eq!(data.read(&[0, 2]).1.calls, 2);
}

#[test]
fn a_shared_read_that_fails_costs_only_the_samples_it_could_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth_dataset(dir.path());
    let alone: Vec<Vec<u8>> = (0..8).map(|id| read_alone(&data, id)).collect();
    // Shard 0 loses its end after the dataset opened: sample 4's bytes are cut.
    let shard = dir.path().join("shard-000000.tar");
    let bytes = std::fs::read(&shard).unwrap();
    let fourth = bytes
        .windows(alone[4].len())
        .position(|w| w == alone[4])
        .unwrap();
    let cut = (fourth + alone[4].len() / 2) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (samples, count) = data.read(&(0..8).collect::<Vec<_>>());
    assert_eq!(
        count.calls,
        1 + 8,
        "the shared read, then each sample on its own"
    );
    for sample in &samples {
        match sample.id {
            0..4 => assert_eq!(sample.bytes.as_ref().unwrap(), &alone[sample.id as usize]),
            _ => assert_eq!(
                sample.bytes.as_ref().unwrap_err().kind(),
                std::io::ErrorKind::UnexpectedEof,
                "sample {}",
                sample.id
            ),
        }
    }
}

#[test]
fn opening_touches_no_shard_and_a_shard_rewritten_after_indexing_stops_the_run_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let report = synth::write(dir.path(), 4, 8, 2, 1).unwrap();
    // Opening reads the manifest and the index alone: it works with every shard gone.
    let shards: Vec<PathBuf> = report
        .manifest
        .shards
        .iter()
        .map(|shard| dir.path().join(&shard.path))
        .collect();
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for shard in &shards {
        std::fs::rename(shard, aside.join(shard.file_name().unwrap())).unwrap();
    }
    let data = Arc::new(Dataset::open(&report.manifest_path).expect("opened without shards"));
    for shard in &shards {
        std::fs::rename(aside.join(shard.file_name().unwrap()), shard).unwrap();
    }
    // Shard 1 (samples 4 to 7) is rewritten, one tar record longer, after indexing.
    let mut bytes = std::fs::read(&shards[1]).unwrap();
    bytes.extend_from_slice(&[0u8; 512]);
    std::fs::write(&shards[1], bytes).unwrap();
    assert!(assemble(&data, &request(vec![0, 1, 2], 0, train(32))).is_ok());
    let requests = vec![
        request(vec![0, 1], 0, train(32)),
        request(vec![0, 5, 6], 0, train(32)),
    ];
    let loader = Loader::new(data, 1, 1 << 20, requests.into_iter());
    assert!(loader.next().unwrap().is_ok());
    match next_within_a_minute(loader) {
        Some(Err(LoadError::ShardChanged(changed))) => {
            let message = changed.to_string();
            assert!(
                message.contains("shard-000001.tar")
                    && message.contains(&format!(
                        "the manifest says {}",
                        report.manifest.shards[1].bytes
                    ))
                    && message.contains("re-run `ladder dataset index`"),
                "{message}"
            );
        }
        other => panic!("{:?}", other.map(|b| b.map(|b| b.ids))),
    }
}

#[test]
fn the_loader_delivers_in_order_across_a_stage_switch() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(synth_dataset(dir.path()));
    let requests: Vec<BatchRequest> = (0..6u64)
        .map(|k| {
            let size = if k < 3 { 32 } else { 48 };
            request(vec![k * 4, k * 4 + 1, k * 4 + 2, k * 4 + 3], 0, train(size))
        })
        .collect();
    // A small prefetch budget: the loader must apply back-pressure without deadlocking.
    let loader = Loader::new(data.clone(), 2, 64 * 1024, requests.clone().into_iter());
    for req in &requests {
        let batch = loader.next().unwrap().unwrap();
        let direct = assemble(&data, req).unwrap();
        assert_eq!(batch.size, req.transform.size());
        assert_eq!(
            batch.images, direct.images,
            "in order, and as assembled directly"
        );
    }
    assert!(loader.next().is_none());
    drop(loader);
    // Dropped half-way, the loader stops its threads.
    let partial = Loader::new(data.clone(), 2, 1 << 20, requests.into_iter());
    assert!(partial.next().is_some());
}

/// Memory a test hands the loader, known by its owner.
struct Provided;

/// A trainer for a GPU hands the loader its own (page-locked) memory: every byte batch is
/// written there, in full, and comes back in it.
#[test]
fn byte_batches_are_written_into_the_memory_the_trainer_provides() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(synth_dataset(dir.path()));
    let requests: Vec<BatchRequest> = (0..4u64)
        .map(|k| request(vec![k * 4, k * 4 + 1, k * 4 + 2, k * 4 + 3], 0, train(32)))
        .collect();
    let given = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = given.clone();
    let memory: HostMemory = Arc::new(move |len| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut bytes = vec![0xa5u8; len].into_boxed_slice();
        let ptr = bytes.as_mut_ptr();
        // SAFETY: the boxed slice's block does not move and is reached only through the
        // buffer, which owns it (with the marker beside it).
        unsafe { HostBuffer::new(ptr, len, Box::new((Provided, bytes))) }
    });
    let loader = Loader::with_memory(
        data.clone(),
        2,
        1 << 20,
        requests.clone().into_iter(),
        memory,
    );
    for req in &requests {
        let batch = loader.next().unwrap().unwrap();
        let Pixels::Bytes(buffer) = &batch.images else {
            panic!("asked for bytes")
        };
        assert!(buffer.owner().is::<(Provided, Box<[u8]>)>());
        assert_eq!(
            batch.images,
            assemble(&data, req).unwrap().images,
            "every byte written"
        );
    }
    assert_eq!(
        given.load(std::sync::atomic::Ordering::SeqCst),
        requests.len()
    );
}

/// `loader.next()`, or a failure if it does not answer within 60 s (a hang fails the test
/// instead of stalling the suite).
fn next_within_a_minute(
    loader: Loader,
) -> Option<Result<ladder_data::loader::MicroBatch, LoadError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(loader.next());
        // The loader is dropped here, after the answer.
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the loader hung instead of failing")
}

#[test]
fn a_panic_in_the_data_path_is_an_error_for_the_trainer_not_a_wait() {
    let dir = tempfile::tempdir().unwrap();
    let data = Arc::new(synth_dataset(dir.path()));
    // A decode thread panics (an id beyond the dataset is a bug upstream, never bad input).
    let beyond = vec![request(vec![0, 999], 0, train(32))];
    let loader = Loader::new(data.clone(), 2, 1 << 20, beyond.into_iter());
    let failed = next_within_a_minute(loader).expect("an answer");
    match failed {
        Err(LoadError::Panicked(why)) => assert!(why.contains("beyond the dataset"), "{why}"),
        other => panic!("{:?}", other.map(|b| b.ids)),
    }
    // The plan itself panics after its first request.
    let first = request(vec![0, 1], 0, train(32));
    let plan = std::iter::once(first).chain(std::iter::from_fn(|| -> Option<BatchRequest> {
        panic!("the plan broke")
    }));
    let loader = Loader::new(data, 1, 1 << 20, plan);
    assert!(loader.next().unwrap().is_ok(), "the first batch comes");
    match next_within_a_minute(loader) {
        Some(Err(LoadError::Panicked(why))) => assert!(why.contains("the plan broke"), "{why}"),
        other => panic!("{:?}", other.map(|b| b.map(|b| b.ids))),
    }
}

#[test]
fn an_index_entry_past_its_shards_end_is_refused_when_the_dataset_opens() {
    let dir = tempfile::tempdir().unwrap();
    let report = synth::write(dir.path(), 4, 8, 2, 1).unwrap();
    // A dataset indexed before samples.idx existed: its JSON indexes are read (and may have
    // been edited by anyone).
    std::fs::remove_file(
        dir.path()
            .join(ladder_core::sample_index::SAMPLE_INDEX_FILE),
    )
    .unwrap();
    let index_path = dir.path().join(&report.manifest.shards[0].index);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    // What a corrupted index might say: a sample of 2^40 bytes.
    index["samples"][1]["size"] = serde_json::json!(1u64 << 40);
    std::fs::write(&index_path, index.to_string()).unwrap();
    let err = Dataset::open(&report.manifest_path)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains(&report.manifest.shards[0].index)
            && err.contains("runs to byte")
            && err.contains("re-run `ladder dataset index`"),
        "{err}"
    );
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_dataset_holds_a_shards_file_only_once_it_reads_it_and_a_process_opens_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let report = synth::write(dir.path(), 4, 24, 6, 1).unwrap();
    let before = open_descriptors();
    let data = Dataset::open_shared(&report.manifest_path).unwrap();
    // Other tests run on other threads of this process: allow their descriptors some slack,
    // far below one per shard.
    assert!(
        open_descriptors() < before + 3,
        "{before} -> {}",
        open_descriptors()
    );
    assert!(data.read(&[0]).0[0].bytes.is_ok());
    // Shared within the process until the manifest changes (re-indexed).
    let again = Dataset::open_shared(&report.manifest_path).unwrap();
    assert!(Arc::ptr_eq(&data, &again));
    std::thread::sleep(std::time::Duration::from_millis(20));
    indexing::index_dir(dir.path(), None).unwrap();
    let reindexed = Dataset::open_shared(&report.manifest_path).unwrap();
    assert!(!Arc::ptr_eq(&data, &reindexed));
}

#[test]
fn a_dataset_keeps_a_bounded_number_of_shard_files_open() {
    let dir = tempfile::tempdir().unwrap();
    let shards = ladder_data::loader::MAX_OPEN_SHARDS as u32 + 40;
    let report = synth::write(dir.path(), 4, shards as u64, shards, 1).unwrap();
    let data = Dataset::open(&report.manifest_path).unwrap();
    let before = open_descriptors();
    for id in 0..shards as u64 {
        assert!(data.read(&[id]).0[0].bytes.is_ok(), "sample {id}");
    }
    // Other tests run on other threads of this process: some slack for their descriptors.
    let held = open_descriptors().saturating_sub(before);
    assert!(
        held <= ladder_data::loader::MAX_OPEN_SHARDS + 8,
        "{held} descriptors held after reading {shards} shards"
    );
    // A shard whose handle was closed is opened again when read.
    assert!(data.read(&[0]).0[0].bytes.is_ok());
}

/// Writes, with the real `webdataset` package, a shard of a photo-sized image as a baseline
/// and a progressive JPEG, each whole and cut at several points (down to only its end-of-image
/// marker missing), a JPEG with bytes after its end marker, a PNG stored as `.jpg` and a JPEG
/// stored as `.png`; prints Pillow's verdict on each sample (whether
/// `Image.open(...).convert("RGB")` succeeds) as JSON.
const PILLOW_VERDICT_SHARD: &str = r#"
import io, json, sys
import numpy as np
import webdataset as wds
from PIL import Image
rng = np.random.default_rng(0)
# Smooth gradients with noise: photo-like entropy, so a cut lands mid-image.
y, x = np.mgrid[0:375, 0:500]
pixels = np.stack([x * 255 / 500, y * 255 / 375, (x + y) * 255 / 875], -1)
pixels = (pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
image = Image.fromarray(pixels)
def encoded(fmt, **options):
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()
samples = {}
for name, jpeg in (("baseline", encoded("JPEG", quality=90)),
                   ("progressive", encoded("JPEG", quality=90, progressive=True))):
    samples[name] = ("jpg", jpeg)
    for percent in (15, 40, 70, 95):
        samples[f"{name}-cut{percent}"] = ("jpg", jpeg[: len(jpeg) * percent // 100])
    samples[f"{name}-no-end-marker"] = ("jpg", jpeg[:-2])
samples["trailing-bytes"] = ("jpg", encoded("JPEG", quality=90) + b"\0" * 64)
samples["png-as-jpg"] = ("jpg", encoded("PNG"))
samples["jpeg-as-png"] = ("png", encoded("JPEG", quality=75))
verdicts = {}
with wds.TarWriter(sys.argv[1]) as shard:
    for key, (ext, data) in samples.items():
        shard.write({"__key__": key, ext: data, "cls": b"1"})
        try:
            Image.open(io.BytesIO(data)).convert("RGB")
            verdicts[key] = True
        except Exception:
            verdicts[key] = False
print(json.dumps(verdicts))
"#;

/// Ladder decodes what Pillow decodes and skips what Pillow refuses, the same in every epoch:
/// an image by what its bytes are (not by its member's extension), and a truncated JPEG never,
/// whatever the epoch's crop and the DCT scale it decodes at.
#[test]
fn every_epoch_gives_each_sample_pillows_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ladder_testkit::venv_python())
        .args(["-c", PILLOW_VERDICT_SHARD])
        .arg(dir.path().join("verdicts-000000.tar"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the webdataset writer or Pillow failed; run scripts/bootstrap if a module is missing:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: std::collections::BTreeMap<String, bool> =
        serde_json::from_slice(&out.stdout).unwrap();
    let refused: Vec<&str> = verdicts
        .iter()
        .filter(|(_, decodes)| !**decodes)
        .map(|(key, _)| key.as_str())
        .collect();
    assert_eq!(
        refused.len(),
        10,
        "Pillow refuses every cut file: {verdicts:?}"
    );
    let report = indexing::index_dir(dir.path(), Some(4)).unwrap();
    assert_eq!(
        report.manifest.total_samples,
        verdicts.len() as u64,
        "{:?}",
        report.issues
    );
    let data = Dataset::open(&report.manifest_path).unwrap();
    let ids: Vec<u64> = (0..verdicts.len() as u64).collect();
    // Small and large outputs (DCT scales 1/8 to 1) and many crops: one per epoch and sample.
    let transforms = [
        train(32),
        train(128),
        train(384),
        Transform::Eval(64),
        Transform::Eval(400),
    ];
    for epoch in 0..6 {
        for transform in &transforms {
            let batch = assemble(&data, &request(ids.clone(), epoch, *transform)).unwrap();
            let mut skipped: Vec<&str> = batch.skipped.iter().map(|s| s.key.as_str()).collect();
            skipped.sort();
            assert_eq!(
                skipped, refused,
                "epoch {epoch}, {transform:?}: skipped {:?}",
                batch.skipped
            );
        }
    }
}
