//! What a training run tells the outside world, and how the outside world stops it: the seam
//! between the training library and the worker's agent. The trainer knows nothing of gRPC or
//! Prometheus: the worker implements [`Events`] over its coordinator session and
//! [`Instruments`] over its metrics; tests can implement both in memory.

use crate::checkpoint::Manifest;
use ladder_collective::AbortHandle;
use ladder_core::dataset::SKIP_REASONS;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The latest evaluation on the held-out split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// The epoch (0-based) after which it ran.
    pub epoch: u32,
    pub top1: f64,
    pub top5: f64,
    pub samples: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub stage: u32,
    pub epoch: u32,
    /// Steps done in `epoch`.
    pub step: u64,
    pub steps_per_epoch: u64,
    /// Steps done since the start of the run.
    pub global_step: u64,
    /// Mean training loss over the steps since the last report, across all ranks.
    pub loss: f64,
    /// Images per second of the whole job (all ranks).
    pub images_per_second: f64,
    pub image_size: u32,
    pub graph_builds: u32,
    pub eta_seconds: f64,
    pub evaluation: Option<Evaluation>,
    /// The learning rate of the last step.
    pub learning_rate: f64,
}

/// How a run reaches its coordinator. Called from the training thread, except `commit`, which
/// the checkpoint writer calls from its own.
pub trait Events: Send + Sync {
    /// The run's progress; `urgent` at boundaries (epoch, stage, evaluation), else the
    /// receiver may coalesce.
    fn progress(&self, progress: &Progress, urgent: bool);
    /// Offers a written checkpoint to the coordinator.
    fn commit(&self, manifest: &Manifest) -> Commit;
    /// A checkpoint could not be written (training goes on).
    fn checkpoint_failed(&self, error: &str);
}

/// What a run measures of itself, for the worker's metrics. Called from the training thread,
/// except `written`, which the checkpoint writer calls from its own; each call is a handful of
/// atomic additions and waits for nothing on the device.
pub trait Instruments: Send + Sync {
    /// A step: its parts, and the share of recent steps' time spent waiting for data
    /// (`data_wait_share`, smoothed by the loop).
    fn step(&self, parts: &StepParts, data_wait_share: f64);
    /// A skipped sample; `reason` is one of [`SKIP_REASONS`].
    fn skipped(&self, reason: &str);
    /// The read calls one micro-batch's samples cost, and the bytes they read.
    fn read(&self, calls: u64, bytes: u64);
    /// The bytes of a micro-batch's images sent to the device (uint8 pixels).
    fn uploaded(&self, bytes: u64);
    /// How long a checkpoint held training up (its snapshot).
    fn snapshot(&self, blocked: Duration);
    /// A checkpoint written in the background: how long it took and its size.
    fn written(&self, took: Duration, bytes: u64);
}

/// What a training step's time went to, in the loop's order.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepParts {
    /// Waiting for the loader's micro-batches.
    pub data_wait: Duration,
    /// Forward and backward passes (with the upload of the batch and mixup).
    pub compute: Duration,
    /// Gradient, BatchNorm-statistics and loss allreduces.
    pub allreduce: Duration,
    /// Reading the step's loss back, the optimizer and the EMA update.
    pub optimizer: Duration,
}

impl StepParts {
    pub const NAMES: [&'static str; 4] = ["data_wait", "compute", "allreduce", "optimizer"];

    pub fn seconds(&self) -> [f64; 4] {
        [self.data_wait, self.compute, self.allreduce, self.optimizer].map(|d| d.as_secs_f64())
    }

    pub fn total(&self) -> Duration {
        self.data_wait + self.compute + self.allreduce + self.optimizer
    }
}

/// The coordinator's answer to a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Commit {
    Committed,
    /// Not committed, and never will be: nothing refers to the files.
    Refused(String),
    /// No answer: it may have been committed.
    Unknown(String),
}

/// Stops a run from outside: the trainer checks it before every step, and a collective blocked
/// on a dead peer is aborted at once. Async code awaits it too (also the worker's own SIGTERM).
#[derive(Default)]
pub struct StopSignal {
    state: Mutex<(Option<String>, Vec<AbortHandle>)>,
    stopped: tokio::sync::Notify,
}

impl StopSignal {
    pub fn stop(&self, reason: &str) {
        let mut state = self.state.lock().expect("stop signal lock");
        if state.0.is_none() {
            state.0 = Some(reason.to_owned());
        }
        for handle in &state.1 {
            handle.abort();
        }
        self.stopped.notify_waiters();
    }

    /// Resolves once the run was asked to stop.
    pub async fn stopped(&self) {
        let notified = self.stopped.notified();
        if !self.is_stopped() {
            notified.await;
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.state.lock().expect("stop signal lock").0.is_some()
    }

    /// Why the run must stop, once asked to.
    pub fn reason(&self) -> Option<String> {
        self.state.lock().expect("stop signal lock").0.clone()
    }

    /// Aborts `handle` on stop (at once if the stop came already).
    pub fn watch(&self, handle: AbortHandle) {
        let mut state = self.state.lock().expect("stop signal lock");
        if state.0.is_some() {
            handle.abort();
        }
        state.1.push(handle);
    }
}

/// What the heartbeat tells the coordinator about the training thread: an activity counter it
/// advances as it works, and whether it is waiting on the other ranks (a counter that stops
/// while the thread is not in a collective is a hung worker); and the share of its step time
/// spent waiting for data.
#[derive(Default)]
pub struct Liveness {
    activity: AtomicU64,
    in_collective: AtomicBool,
    /// An f32's bits.
    data_wait_share: AtomicU32,
    /// Samples skipped so far by this process, by [`SKIP_REASONS`].
    skipped: [AtomicU64; SKIP_REASONS.len()],
}

impl Liveness {
    pub fn tick(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `f` (a collective) marked as waiting on the other ranks.
    pub fn collective<T>(&self, f: impl FnOnce() -> T) -> T {
        self.in_collective.store(true, Ordering::Relaxed);
        let result = f();
        self.in_collective.store(false, Ordering::Relaxed);
        self.tick();
        result
    }

    /// Resolves once the activity counter has not moved for `quiet`.
    pub async fn still_for(&self, quiet: Duration) {
        let poll = (quiet / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let (mut seen, mut since) = (self.activity(), tokio::time::Instant::now());
        loop {
            tokio::time::sleep(poll).await;
            let now = self.activity();
            if now != seen {
                (seen, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= quiet {
                return;
            }
        }
    }

    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    pub fn in_collective(&self) -> bool {
        self.in_collective.load(Ordering::Relaxed)
    }

    pub fn set_data_wait_share(&self, share: f64) {
        self.data_wait_share
            .store((share as f32).to_bits(), Ordering::Relaxed);
    }

    pub fn data_wait_share(&self) -> f32 {
        f32::from_bits(self.data_wait_share.load(Ordering::Relaxed))
    }

    /// Counts a skipped sample; `reason` is one of [`SKIP_REASONS`].
    pub fn count_skip(&self, reason: &str) {
        if let Some(i) = SKIP_REASONS.iter().position(|r| *r == reason) {
            self.skipped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Samples skipped so far, by reason (those with none left out).
    pub fn skipped(&self) -> std::collections::BTreeMap<String, u64> {
        SKIP_REASONS
            .iter()
            .zip(&self.skipped)
            .map(|(reason, n)| ((*reason).to_owned(), n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
