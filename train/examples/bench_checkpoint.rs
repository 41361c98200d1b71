//! Ladder's side of `scripts/bench checkpoint`: EfficientNetV2-L's training state (model,
//! RMSProp mean square and momentum, EMA) checkpointed as the trainer does. Prints one JSON line:
//! the time training is blocked (starting the snapshot, then waiting for its copy, which runs
//! beside a real forward and backward pass of L), what a snapshot taken all at once would
//! block, that pass's time alone and beside the copy, the background write's time (safetensors,
//! SHA-256, fsync, rename), the bytes written, and the time the disk takes for a plain
//! sequential write of as many bytes, measured after each of Ladder's rounds both through the
//! page cache and with direct I/O (the faster of the two is the disk's speed for that round).
//!
//! usage: bench_checkpoint DIR ROUNDS (at least 2)

use ladder_core::spec::{ModelSpec, OptimizerSpec, Variant};
use ladder_train::checkpoint::state::TrainingState;
use ladder_train::checkpoint::{self, Manifest};
use ladder_train::ema::Ema;
use ladder_train::flat::{FlatState, Layout};
use ladder_train::model::EfficientNetV2;
use ladder_train::optim::RmsProp;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: bench_checkpoint DIR ROUNDS"));
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("ROUNDS"));
    let vs = nn::VarStore::new(Device::Cpu);
    let spec = ModelSpec {
        variant: Variant::L,
        classes: 1000,
        bn_eps: 1e-3,
        bn_momentum: 0.01,
        init_from: None,
    };
    let model = EfficientNetV2::from_spec(&vs.root(), &spec);
    let flat = FlatState::new(&vs, Layout::Contiguous);
    let mut optimizer = RmsProp::new(&flat, &OptimizerSpec::default());
    let mut ema = Ema::new(&flat, 0.9999);
    let (mut blocked, mut written, mut disk) = (Vec::new(), Vec::new(), Vec::new());
    let (mut synchronous, mut step_alone, mut step_beside) = (Vec::new(), Vec::new(), Vec::new());
    // The next step's forward and backward passes, which the snapshot's copy runs beside.
    let images = Tensor::randn([2, 3, 128, 128], (Kind::Float, Device::Cpu));
    let step = || {
        let start = Instant::now();
        flat.zero_grads();
        model.forward(&images, true).mean(Kind::Float).backward();
        start.elapsed().as_secs_f64()
    };
    let mut bytes = 0;
    let mut spare = None;
    for round in 0..rounds {
        let state = TrainingState {
            vs: &vs,
            flat: &flat,
            optimizer: &mut optimizer,
            ema: &mut ema,
        };
        // What a snapshot taken all at once would block for.
        let start = Instant::now();
        let full = state.snapshot(spare.take());
        synchronous.push(start.elapsed().as_secs_f64());
        step_alone.push(step());
        // What the trainer does: start the snapshot, run the next step's passes, then wait for
        // the copy before the optimizer update.
        let start = Instant::now();
        let pending = state.begin_snapshot(Some(full));
        let started = start.elapsed().as_secs_f64();
        step_beside.push(step());
        let start = Instant::now();
        let snapshot = pending.finish();
        blocked.push(started + start.elapsed().as_secs_f64());
        let manifest = Manifest {
            format: 0,
            id: ladder_core::location::CheckpointId {
                generation: 1,
                global_step: round as u64,
            }
            .to_string(),
            job: "bench".to_owned(),
            generation: 1,
            global_step: round as u64,
            epoch: 0,
            step: round as u64,
            steps_per_epoch: 1,
            stage: 0,
            stage_end: false,
            seed: 0,
            world_size: 1,
            model: "l".to_owned(),
            classes: 1000,
            files: Default::default(),
            trained: Default::default(),
        };
        let start = Instant::now();
        let (path, manifest) = checkpoint::write(&snapshot, &dir, manifest).expect("writing");
        written.push(start.elapsed().as_secs_f64());
        bytes = manifest.files.values().map(|f| f.bytes).sum::<u64>();
        std::fs::remove_dir_all(path).expect("cleaning up");
        spare = Some(snapshot);
        disk.push(plain_write(&dir, bytes, false).min(plain_write(&dir, bytes, true)));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // The first synchronous snapshot allocates its host memory; later ones copy into it (what
    // a run does from its second checkpoint on).
    let mut paired: Vec<f64> = disk.iter().zip(&written).map(|(d, w)| d / w).collect();
    let first = synchronous[0];
    let mut steady = synchronous[1..].to_vec();
    let rounds = |v: &[f64]| format!("{v:?}");
    let (write_rounds, disk_rounds) = (rounds(&written), rounds(&disk));
    println!(
        "{{\"blocked_s\": {}, \"synchronous_s\": {}, \"first_synchronous_s\": {first}, \"step_alone_s\": {}, \"step_beside_s\": {}, \"write_s\": {}, \"disk_s\": {}, \"paired_ratio\": {}, \"bytes\": {bytes}, \"write_rounds_s\": {write_rounds}, \"disk_rounds_s\": {disk_rounds}}}",
        median(&mut blocked),
        median(&mut steady),
        median(&mut step_alone),
        median(&mut step_beside),
        median(&mut written),
        median(&mut disk),
        median(&mut paired)
    );
}

/// The disk's sequential write speed, measured between Ladder's rounds: `bytes` written in
/// 8 MiB `write` calls to one new file, then fsync — what `dd bs=8M conv=fsync` does, with
/// `oflag=direct` when `direct`. Returns the seconds.
fn plain_write(dir: &std::path::Path, bytes: u64, direct: bool) -> f64 {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 8 << 20;
    // Direct I/O needs a page-aligned buffer.
    let mut memory: Vec<u8> = (0..CHUNK as u32 + 4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let skip = memory.as_ptr().align_offset(4096);
    let chunk = &mut memory[skip..skip + CHUNK];
    let path = dir.join("disk-speed.bin");
    let start = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&path)
        .expect("disk test file");
    let mut written = 0u64;
    while written < bytes {
        // Direct writes stay whole pages; the last one rounds the size up by under 4 KiB.
        let n = CHUNK.min((bytes - written).next_multiple_of(4096) as usize);
        file.write_all(&chunk[..n])
            .expect("writing the disk test file");
        written += n as u64;
    }
    file.sync_all().expect("fsync");
    let seconds = start.elapsed().as_secs_f64();
    std::fs::remove_file(path).expect("cleaning up");
    seconds
}
