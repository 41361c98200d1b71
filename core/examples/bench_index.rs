//! `scripts/bench index`: the dataset index at ImageNet-21k scale (12,720,275 samples in
//! 12,721 shards; no images needed), the memory-mapped `samples.idx` beside today's JSON path
//! (every shard's JSON index parsed into per-sample structures), in one run: the time to open
//! the index and plan an epoch for 1,024 ranks (every id the plan hands out is looked up), one
//! process at a time on a warm page cache (an 8-GPU node has a core for each of its ranks;
//! this machine may have two), and each process's private resident memory with 8 processes on
//! the machine at once, sharing the map's pages (the JSON path's memory is private, however
//! many run).
//!
//! `bench_index [DIR]` writes the synthetic dataset into DIR (default: a temporary directory)
//! and runs itself as the measured processes (`bench_index --open mapped|json DIR`).

use ladder_core::dataset::{
    INDEX_FORMAT, ImageFormat, IndexedSample, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardEntry,
    ShardIndex,
};
use ladder_core::sample::SamplePlan;
use ladder_core::sample_index::{SAMPLE_INDEX_FILE, SampleIndex};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "common/imagenet21k.rs"]
mod imagenet21k;
use imagenet21k::{SAMPLES, SHARDS, shard_sizes};

const CLASSES: u32 = 21_841;
const GLOBAL_BATCH: u32 = 4096;
const MICRO_BATCH: u32 = 4;
const WORLD: u32 = 1024;
const WINDOW: u32 = 4;
const PROCESSES: usize = 8;
const GOAL_OPEN_SECONDS: f64 = 0.2;
const GOAL_PRIVATE_MB: f64 = 100.0;
const GOAL_SPEEDUP: f64 = 20.0;

/// Writes the synthetic dataset's JSON shard indexes, its `samples.idx` and its manifest:
/// ImageNet-like keys (`n01440764_10026`), sizes and labels.
fn write_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut shards = Vec::with_capacity(SHARDS as usize);
    let mut entries = Vec::with_capacity(SHARDS as usize);
    let mut id = 0u64;
    for (shard, &count) in shard_sizes().iter().enumerate() {
        let mut offset = 512;
        let samples: Vec<IndexedSample> = (0..count)
            .map(|_| {
                id += 1;
                let label = (id * 2_654_435_761 % CLASSES as u64) as u32;
                let size = 40_000 + id * 7919 % 200_000;
                let sample = IndexedSample {
                    key: format!("n{:08}_{id}", 1_000_000 + label),
                    offset,
                    size,
                    format: ImageFormat::Jpeg,
                    label,
                };
                // Header, data rounded to 512, and the label member.
                offset += size.div_ceil(512) * 512 + 1024;
                sample
            })
            .collect();
        let index = format!("shard-{shard:06}.idx.json");
        let file = std::fs::File::create(dir.join(&index)).unwrap();
        serde_json::to_writer(
            std::io::BufWriter::new(file),
            &ShardIndex {
                format: INDEX_FORMAT.to_owned(),
                samples: samples.clone(),
            },
        )
        .unwrap();
        entries.push(ShardEntry {
            path: format!("shard-{shard:06}.tar"),
            index,
            samples: count,
            bytes: offset + 1024,
        });
        shards.push(samples);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_owned(),
        classes: CLASSES,
        total_samples: SAMPLES,
        shards: entries,
    };
    SampleIndex::write(
        &dir.join(SAMPLE_INDEX_FILE),
        &manifest,
        shards.iter().map(Vec::as_slice),
    )
    .unwrap();
    std::fs::write(
        dir.join(MANIFEST_FILE),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
}

/// This process's private resident memory beyond file maps, in MB: its anonymous memory (heap,
/// stacks). The map of `samples.idx` is page cache, shared by every process that maps it (the
/// kernel counts a page mapped by one process alone as that process's "private" too).
fn private_mb() -> f64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let kb: u64 = rollup
        .lines()
        .filter(|l| l.starts_with("Anonymous:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    kb as f64 / 1024.0
}

/// One measured process: opens the index the way `how` says, plans an epoch for every rank
/// looking up every id, prints `open_s plan_s private_mb`, then waits for a line on stdin (so
/// that all the processes are there at once).
fn measure(how: &str, dir: &Path) {
    let started = Instant::now();
    let manifest = Manifest::load(&dir.join(MANIFEST_FILE)).unwrap();
    let lookup: Box<dyn Fn(u64) -> u64> = match how {
        "mapped" => {
            let index = SampleIndex::open(dir, &manifest).unwrap();
            Box::new(move |id| index.get(id).offset)
        }
        _ => {
            // Today's JSON path: every shard's index parsed into per-sample structures.
            let shards: Vec<ShardIndex> = manifest
                .shards
                .iter()
                .map(|s| ShardIndex::load(&dir.join(&s.index)).unwrap())
                .collect();
            let mut starts = vec![0u64];
            for s in &shards {
                starts.push(starts.last().unwrap() + s.samples.len() as u64);
            }
            Box::new(move |id| {
                let shard = starts.partition_point(|&s| s <= id) - 1;
                shards[shard].samples[(id - starts[shard]) as usize].offset
            })
        }
    };
    let opened = started.elapsed().as_secs_f64();
    let plan = SamplePlan::new(&manifest.shard_sizes(), 7, WINDOW, GLOBAL_BATCH).unwrap();
    let mut order = plan.epoch(0);
    let mut checksum = 0u64;
    for step in 0..plan.steps_per_epoch() {
        for rank in 0..WORLD {
            for id in order
                .rank_step(step, MICRO_BATCH, rank, WORLD)
                .unwrap()
                .into_iter()
                .flatten()
            {
                checksum = checksum.wrapping_add(lookup(id));
            }
        }
    }
    std::hint::black_box(checksum);
    let planned = started.elapsed().as_secs_f64();
    println!("{opened} {planned} {}", private_mb());
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().lock().lines().next();
}

/// Runs `n` measured processes of `how` at once; their (open s, open and plan s, private MB).
fn run(how: &str, dir: &Path, n: usize) -> Vec<(f64, f64, f64)> {
    let me = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..n)
        .map(|_| {
            Command::new(&me)
                .args(["--open", how])
                .arg(dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let results = children
        .iter_mut()
        .map(|child| {
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            let v: Vec<f64> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            (v[0], v[1], v[2])
        })
        .collect();
    for mut child in children {
        drop(child.stdin.take());
        child.wait().unwrap();
    }
    results
}

fn verdict(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--open") {
        return measure(&args[2], Path::new(&args[3]));
    }
    let temporary = tempfile::tempdir().unwrap();
    let dir = args
        .get(1)
        .map_or_else(|| temporary.path().to_owned(), Into::into);
    if !dir.join(MANIFEST_FILE).exists() {
        eprintln!(
            "bench index: writing the synthetic index in {}",
            dir.display()
        );
        write_dataset(&dir);
    }
    let mapped_size = std::fs::metadata(dir.join(SAMPLE_INDEX_FILE))
        .unwrap()
        .len();
    // The first pass of each warms the page cache; the second is measured.
    run("json", &dir, 1);
    let json = run("json", &dir, 1)[0];
    run("mapped", &dir, 1);
    let mapped = run("mapped", &dir, 1)[0];
    let together = run("mapped", &dir, PROCESSES);
    let worst = |f: fn(&(f64, f64, f64)) -> f64| together.iter().map(f).fold(0.0, f64::max);
    let (open, planned, private) = (mapped.0, mapped.1, worst(|r| r.2));
    println!(
        "{SAMPLES} samples in {SHARDS} shards; samples.idx {:.0} MB (shared through the page \
         cache)",
        mapped_size as f64 / 1e6
    );
    println!(
        "{:<40} {:>10} {:>16} {:>14}",
        "", "open s", "open + plan s", "private MB"
    );
    println!(
        "{:<40} {:>10.3} {:>16.3} {:>14.0}",
        "JSON shard indexes (1 process)", json.0, json.1, json.2
    );
    println!(
        "{:<40} {:>10.3} {:>16.3} {:>14.0}",
        "samples.idx (1 process)", open, planned, mapped.2
    );
    println!(
        "{:<40} {:>10.3} {:>16.3} {:>14.0}",
        format!("samples.idx ({PROCESSES} at once, the worst)"),
        worst(|r| r.0),
        worst(|r| r.1),
        private
    );
    let speedup = json.0 / open;
    println!("open: {speedup:.0}x faster than the JSON path");
    let goals = [
        (
            format!("open {open:.3} s < {GOAL_OPEN_SECONDS} s"),
            open < GOAL_OPEN_SECONDS,
        ),
        (
            format!(
                "private {private:.0} MB < {GOAL_PRIVATE_MB} MB per process, {PROCESSES} at once"
            ),
            private < GOAL_PRIVATE_MB,
        ),
        (
            format!("{speedup:.0}x >= {GOAL_SPEEDUP}x the JSON path"),
            speedup >= GOAL_SPEEDUP,
        ),
    ];
    let mut missed = false;
    for (what, met) in &goals {
        println!("{} {what}", verdict(*met));
        missed |= !met;
    }
    if missed {
        std::process::exit(1);
    }
}
