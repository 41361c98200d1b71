//! A run's checkpoint pipeline: when one is due, rank 0's snapshot of the state (its copy runs
//! beside the next step's forward and backward passes), and the background write and commit,
//! after which what the steps trained leaves the untallied ledger.

use super::state::{PendingSnapshot, Snapshot, TrainingState};
use super::{Manifest, Writer};
use crate::events::{Commit, Events, Instruments};
use ladder_core::sample::EpochTally;
use ladder_core::spec::CheckpointSpec;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The checkpoint pipeline of one run.
pub struct Pipeline {
    /// The job's checkpoint directory: the only place this run writes checkpoints.
    parent: PathBuf,
    events: Arc<dyn Events>,
    instruments: Arc<dyn Instruments>,
    /// Set when the coordinator asks for a checkpoint now (a worker is leaving).
    asked: Arc<AtomicBool>,
    /// Writes one checkpoint at a time in the background.
    writer: Writer,
    /// When the last checkpoint was taken (or the run started), for
    /// `checkpoint.every_minutes`.
    last: Instant,
    /// The last snapshot's host memory, back from the writer: the next snapshot copies into it.
    spare: Arc<Mutex<Option<Snapshot>>>,
    /// A checkpoint whose snapshot is still being copied, with how long starting it took.
    pending: Option<(PendingSnapshot, Manifest, Duration)>,
    /// What the steps since the last committed checkpoint (or the restore) trained, per
    /// epoch, over all ranks: sent with the next commit, and taken off once it is accepted.
    untallied: Arc<Mutex<BTreeMap<u32, EpochTally>>>,
}

impl Pipeline {
    pub fn new(
        parent: PathBuf,
        events: Arc<dyn Events>,
        instruments: Arc<dyn Instruments>,
        asked: Arc<AtomicBool>,
    ) -> Pipeline {
        Pipeline {
            parent,
            events,
            instruments,
            asked,
            writer: Writer::default(),
            last: Instant::now(),
            spare: Arc::default(),
            pending: None,
            untallied: Arc::default(),
        }
    }

    /// Whether a checkpoint is due after `global_step`: every `checkpoint.every_steps` steps,
    /// whenever `checkpoint.every_minutes` have passed since the last one (by this rank's
    /// clock: rank 0's decides, since it writes), and when the coordinator asked for one.
    pub fn due(&self, every: &CheckpointSpec, global_step: u64) -> bool {
        let by_steps =
            every.every_steps > 0 && global_step.is_multiple_of(every.every_steps as u64);
        let by_time = every.every_minutes > 0.0
            && self.last.elapsed().as_secs_f64() >= every.every_minutes * 60.0;
        by_steps || by_time || self.asked.load(Ordering::SeqCst)
    }

    /// A checkpoint is taken now (on every rank: the clock and the request are reset, though
    /// only rank 0 writes).
    pub fn taken(&mut self) {
        self.last = Instant::now();
        self.asked.store(false, Ordering::SeqCst);
    }

    /// Adds what one step trained (over all ranks) to the untallied ledger.
    pub fn tally(&self, epoch: u32, trained: EpochTally) {
        self.untallied
            .lock()
            .expect("tally lock")
            .entry(epoch)
            .or_default()
            .merge(trained);
    }

    /// Starts rank 0's checkpoint of `state` as `manifest` (its `trained` is filled here):
    /// waits for the write in flight, if any (it gives back the host memory this snapshot
    /// reuses), and begins copying. Call [`Pipeline::complete`] first: a pending copy reads
    /// the state this one may follow changes of.
    pub fn begin(&mut self, state: TrainingState, mut manifest: Manifest) {
        assert!(
            self.pending.is_none(),
            "the pending snapshot is completed first"
        );
        let started = Instant::now();
        if self.writer.busy() {
            tracing::warn!("the previous checkpoint is still being written; waiting for it");
        }
        self.writer.wait();
        let snapshot = state.begin_snapshot(self.spare.lock().expect("snapshot lock").take());
        manifest.trained = self.untallied.lock().expect("tally lock").clone();
        self.pending = Some((snapshot, manifest, started.elapsed()));
    }

    /// Waits for the pending snapshot's copy (it ran beside this step's forward and backward
    /// passes) and hands it to the background writer. Called before anything changes the
    /// parameters, optimizer state or EMA.
    pub fn complete(&mut self) {
        let Some((pending, manifest, taken)) = self.pending.take() else {
            return;
        };
        let waited = Instant::now();
        let snapshot = pending.finish();
        let blocked = taken + waited.elapsed();
        tracing::debug!(
            blocked_ms = blocked.as_secs_f64() * 1e3,
            "checkpoint snapshot taken"
        );
        self.instruments.snapshot(blocked);
        let instruments = self.instruments.clone();
        let untallied = self.untallied.clone();
        let spare = self.spare.clone();
        let parent = self.parent.clone();
        let events = self.events.clone();
        self.writer.submit(Box::new(move || {
            let writing = Instant::now();
            match super::write(&snapshot, &parent, manifest) {
                Ok((dir, manifest)) => {
                    instruments.written(
                        writing.elapsed(),
                        manifest.files.values().map(|f| f.bytes).sum(),
                    );
                    commit(&*events, &dir, &manifest, &untallied);
                }
                Err(e) => {
                    tracing::error!("checkpoint not written, training goes on: {e}");
                    events.checkpoint_failed(&e.to_string());
                }
            }
            *spare.lock().expect("snapshot lock") = Some(snapshot);
        }));
    }

    /// Completes the pending snapshot and waits until its write is committed (or failed).
    pub fn finish(&mut self) {
        self.complete();
        self.writer.wait();
    }
}

/// Offers the checkpoint written in `dir` to the coordinator; what it trained leaves the
/// untallied ledger once committed, and a refused one's files are deleted.
fn commit(
    events: &dyn Events,
    dir: &std::path::Path,
    manifest: &Manifest,
    untallied: &Mutex<BTreeMap<u32, EpochTally>>,
) {
    match events.commit(manifest) {
        Commit::Committed => {
            let mut untallied = untallied.lock().expect("tally lock");
            for (epoch, sent) in &manifest.trained {
                untallied.entry(*epoch).or_default().unmerge(*sent);
            }
            untallied.retain(|_, t| *t != EpochTally::default());
        }
        Commit::Refused(why) => {
            // Never to be resumed from: left on disk, it would only look like one.
            let removed = std::fs::remove_dir_all(dir);
            tracing::warn!(checkpoint = %manifest.id, ?removed, "the coordinator refused the checkpoint ({why}); its files are deleted");
        }
        Commit::Unknown(why) => {
            tracing::warn!(checkpoint = %manifest.id, "no answer to the checkpoint's commit; its files stay: {why}");
        }
    }
}
