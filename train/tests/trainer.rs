//! The trainer in process, on the CPU, through its events: when it tells what. A step's loss
//! and progress are read a step after the step was queued (on a GPU the host never waits for
//! the step it just queued), and the step in flight is drained before each checkpoint (so that
//! what it counts as trained was seen) and at each epoch's end.

use ladder_collective::Alone;
use ladder_core::spec::JobSpec;
use ladder_train::checkpoint::Manifest;
use ladder_train::events::{
    Commit, Events, Instruments, Liveness, Progress, StepParts, StopSignal,
};
use ladder_train::precision::Precision;
use ladder_train::trainer::{Assignment, Faults, Options, Trainer};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::Device;

const EVERY_STEPS: u64 = 4;

/// Everything the trainer told, in order.
#[derive(Default)]
struct Told(Mutex<Vec<(&'static str, u64)>>);

impl Told {
    fn push(&self, what: &'static str, step: u64) {
        self.0.lock().unwrap().push((what, step));
    }
}

impl Events for Told {
    fn progress(&self, progress: &Progress, _urgent: bool) {
        self.push("progress", progress.global_step);
    }

    fn commit(&self, manifest: &Manifest) -> Commit {
        self.push("commit", manifest.global_step);
        Commit::Committed
    }

    fn checkpoint_failed(&self, error: &str) {
        panic!("checkpoint failed: {error}");
    }
}

impl Instruments for Told {
    fn step(&self, _parts: &StepParts, _data_wait_share: f64) {
        self.push("step queued", 0);
    }

    fn skipped(&self, _reason: &str) {}

    fn read(&self, _calls: u64, _bytes: u64) {}

    fn uploaded(&self, _bytes: u64) {}

    fn snapshot(&self, _blocked: Duration) {}

    fn written(&self, _took: Duration, _bytes: u64) {}
}

fn spec(dir: &std::path::Path) -> JobSpec {
    ladder_data::synth::write(&dir.join("data"), 10, 160, 2, 1).expect("dataset");
    let text = format!(
        r#"[job]
name = "told"
[model]
variant = "tiny"
classes = 10
[data]
manifest = "data/manifest.json"
decode_threads = 1
[schedule]
epochs = 2
stage_epochs = 1
min_size = 32
max_size = 48
eval_size = 48
min_dropout = 0.0
max_dropout = 0.1
min_randaugment = 2
max_randaugment = 4
randaugment = "torchvision"
[batch]
global = 16
micro_at_max_size = 8
micro_max = 8
[checkpoint]
dir = "checkpoints"
every_steps = {EVERY_STEPS}
[optimizer]
warmup_epochs = 1
[workers]
min = 1
max = 1
"#
    );
    let path = dir.join("told.toml");
    std::fs::write(&path, text).unwrap();
    JobSpec::load(&path).expect("spec")
}

#[test]
fn a_steps_loss_is_told_after_the_next_step_is_queued_and_drained_at_checkpoints_and_epoch_ends() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let job_id = "job-000001";
    let checkpoints = ladder_core::location::job_dir(&spec.checkpoint.dir, job_id).unwrap();
    let told = Arc::new(Told::default());
    let job = Assignment {
        job_id: job_id.to_owned(),
        generation: 1,
        rank: 0,
        world_size: 1,
        spec,
        checkpoints,
        restore_from: None,
    };
    let options = Options {
        device: Device::Cpu,
        precision: Precision::Float32,
        replica_digests: None,
        faults: Faults::default(),
        checkpoint_now: Arc::new(AtomicBool::new(false)),
        instruments: told.clone(),
        decode_threads: 1,
    };
    let mut trainer = Trainer::new(
        job,
        options,
        Box::new(Alone),
        told.clone(),
        Arc::new(StopSignal::default()),
        Arc::new(Liveness::default()),
    )
    .expect("a trainer");
    trainer.run().expect("the run");
    let told = told.0.lock().unwrap().clone();
    let steps_per_epoch = 10;
    let total = 2 * steps_per_epoch;
    for global_step in 1..=total {
        let at = told
            .iter()
            .position(|t| *t == ("progress", global_step))
            .unwrap_or_else(|| panic!("no progress of step {global_step}: {told:?}"));
        let queued = told[..at].iter().filter(|t| t.0 == "step queued").count() as u64;
        let drained = global_step % EVERY_STEPS == 0 || global_step % steps_per_epoch == 0;
        let expected = if drained {
            global_step
        } else {
            global_step + 1
        };
        assert_eq!(
            queued, expected,
            "step {global_step}'s progress came after {queued} steps were queued: {told:?}"
        );
        if let Some(commit) = told.iter().position(|t| *t == ("commit", global_step)) {
            assert!(drained && commit > at, "{told:?}");
        }
    }
    let commits: Vec<u64> = told
        .iter()
        .filter(|t| t.0 == "commit")
        .map(|t| t.1)
        .collect();
    assert_eq!(commits, [4, 8, 10, 12, 16, 20], "{told:?}");
}
