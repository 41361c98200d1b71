//! `scripts/bench reads`: the read calls a shared file system sees. Writes shards of
//! ImageNet's shape (1,000 samples each) from the data benchmark's JPEGs (the corpus, cycled),
//! then reads one epoch's micro-batches as the loader reads them, at several micro-batch sizes
//! and shuffle blocks; each beside one read per sample (what the loader did before it
//! coalesced neighbours), in the same run and on the same files. Prints read calls per sample,
//! bytes per call and the bytes read besides the samples. The number of ranks changes nothing:
//! a rank reads whole micro-batches, and they do not depend on it.
//!
//! usage: bench_reads CORPUS_DIR WORK_DIR

use ladder_core::indexing;
use ladder_core::sample::SamplePlan;
use ladder_data::loader::{Dataset, ReadCount};
use ladder_data::synth;
use std::path::Path;

const SHARDS: u32 = 8;
const PER_SHARD: u32 = 1000;
const CLASSES: u32 = 1000;
const WINDOW: u32 = 4;
const GLOBAL_BATCH: u32 = 512;
const MICRO_BATCHES: [u32; 2] = [16, 64];
const BLOCKS: [u32; 3] = [1, 4, 16];

fn write_shards(corpus: &Path, out: &Path) -> Dataset {
    let mut photos: Vec<Vec<u8>> = std::fs::read_dir(corpus)
        .expect("corpus directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .map(|p| std::fs::read(p).expect("image"))
        .collect();
    photos.sort();
    assert!(!photos.is_empty(), "no .jpg in {}", corpus.display());
    std::fs::create_dir_all(out).expect("work directory");
    let mut id = 0usize;
    for shard in 0..SHARDS {
        let file = std::fs::File::create(out.join(format!("shard-{shard:06}.tar"))).expect("shard");
        let mut tar = tar::Builder::new(file);
        for _ in 0..PER_SHARD {
            let key = format!("{id:08}");
            synth::append(&mut tar, &format!("{key}.jpg"), &photos[id % photos.len()])
                .expect("write");
            let label = (id as u32 % CLASSES).to_string();
            synth::append(&mut tar, &format!("{key}.cls"), label.as_bytes()).expect("write");
            id += 1;
        }
        tar.finish().expect("write");
    }
    let report = indexing::index_dir(out, Some(CLASSES)).expect("index");
    Dataset::open(&report.manifest_path).expect("open")
}

/// One epoch's micro-batches: read one sample per call, and as the loader reads.
fn epoch_reads(data: &Dataset, micro: u32, block: u32) -> (ReadCount, ReadCount, u64, u64) {
    let plan = SamplePlan::new(&data.shard_sizes(), 7, WINDOW, GLOBAL_BATCH)
        .and_then(|plan| plan.with_shuffle_block(block))
        .expect("plan");
    let mut order = plan.epoch(0);
    let (mut alone, mut coalesced) = (ReadCount::default(), ReadCount::default());
    let (mut samples, mut sample_bytes) = (0u64, 0u64);
    for step in 0..plan.steps_per_epoch() {
        for k in 0..GLOBAL_BATCH / micro {
            let batch = order.micro_batch(step, micro, k);
            for &id in &batch {
                let (read, count) = data.read(&[id]);
                sample_bytes += read[0].bytes.as_ref().expect("readable").len() as u64;
                alone.calls += count.calls;
                alone.bytes += count.bytes;
            }
            let (_, count) = data.read(&batch);
            coalesced.calls += count.calls;
            coalesced.bytes += count.bytes;
            samples += batch.len() as u64;
        }
    }
    (alone, coalesced, samples, sample_bytes)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [corpus, work] = args.as_slice() else {
        eprintln!("usage: bench_reads CORPUS_DIR WORK_DIR");
        std::process::exit(2);
    };
    let data = write_shards(Path::new(corpus), Path::new(work));
    println!(
        "reads of one epoch: {SHARDS} shards x {PER_SHARD} samples (the data benchmark's \
         JPEGs), window {WINDOW}, global batch {GLOBAL_BATCH}; neighbours at most {} KiB \
         apart share a read",
        ladder_data::loader::COALESCE_GAP >> 10
    );
    println!(
        "{:>5} {:>5} | {:>14} {:>10} | {:>14} {:>10} {:>11} | {:>11}",
        "micro",
        "block",
        "before: reads",
        "KB/read",
        "after: reads",
        "KB/read",
        "extra read",
        "fewer reads"
    );
    println!(
        "{:>5} {:>5} | {:>14} {:>10} | {:>14}",
        "", "", "per sample", "", "per sample"
    );
    for micro in MICRO_BATCHES {
        for block in BLOCKS {
            let (alone, coalesced, samples, sample_bytes) = epoch_reads(&data, micro, block);
            let per_sample = |c: &ReadCount| c.calls as f64 / samples as f64;
            let kb_per_read = |c: &ReadCount| c.bytes as f64 / c.calls as f64 / 1024.0;
            println!(
                "{micro:>5} {block:>5} | {:>14.3} {:>10.1} | {:>14.3} {:>10.1} {:>10.2}% | {:>10.1}x",
                per_sample(&alone),
                kb_per_read(&alone),
                per_sample(&coalesced),
                kb_per_read(&coalesced),
                (coalesced.bytes - sample_bytes) as f64 * 100.0 / sample_bytes as f64,
                alone.calls as f64 / coalesced.calls as f64,
            );
        }
    }
}
