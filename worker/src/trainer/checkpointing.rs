//! The checkpoint pipeline of a run: when one is due, rank 0's snapshot of the state (its copy
//! runs beside the next step's forward and backward passes), and the background write and
//! commit, after which what the steps trained leaves the untallied ledger.

use super::Trainer;
use crate::checkpoint::{self, Manifest, Writer};
use crate::feed::Cursor;
use crate::report::Commit;
use crate::training_state::{PendingSnapshot, Snapshot, TrainingState};
use ladder_core::location::CheckpointId;
use ladder_core::sample::EpochTally;
use ladder_core::stage::EpochParams;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The checkpoint pipeline's state.
pub(super) struct Checkpoints {
    /// Writes one checkpoint at a time in the background.
    pub(super) writer: Writer,
    /// When the last checkpoint was taken (or the run started), for
    /// `checkpoint.every_minutes`.
    last: Instant,
    /// The last snapshot's host memory, back from the writer: the next snapshot copies into it.
    spare: Arc<Mutex<Option<Snapshot>>>,
    /// A checkpoint whose snapshot is still being copied, with how long starting it took.
    pending: Option<(PendingSnapshot, Manifest, Duration)>,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Checkpoints {
            writer: Writer::default(),
            last: Instant::now(),
            spare: Arc::default(),
            pending: None,
        }
    }
}

impl Trainer {
    /// Whether a checkpoint is due after `global_step`: every `checkpoint.every_steps` steps,
    /// whenever `checkpoint.every_minutes` have passed since the last one (by this rank's
    /// clock: rank 0's decides, since it writes), and when the coordinator asked for one.
    pub(super) fn checkpoint_due(&self, global_step: u64) -> bool {
        let every = &self.spec.checkpoint;
        let by_steps =
            every.every_steps > 0 && global_step.is_multiple_of(every.every_steps as u64);
        let by_time = every.every_minutes > 0.0
            && self.checkpoints.last.elapsed().as_secs_f64() >= every.every_minutes * 60.0;
        let asked = self.options.checkpoint_now.load(Ordering::SeqCst);
        by_steps || by_time || asked
    }

    /// Rank 0 snapshots the state and writes it in the background; training goes on.
    pub(super) fn checkpoint(&mut self, e: &EpochParams, next: Cursor, stage_end: bool) {
        self.checkpoints.last = Instant::now();
        self.options.checkpoint_now.store(false, Ordering::SeqCst);
        if self.job.rank != 0 {
            return;
        }
        // A diverged update can leave non-finite weights behind a finite loss; saved, they would
        // push good checkpoints out of retention. Not saved, then: the next step's loss, the
        // same on every rank, ends the run on all of them together (the run's last checkpoint
        // has no next step: `ensure_finite_weights` stands in for it).
        if let Err(e) = self.ensure_finite_weights(next) {
            tracing::error!("checkpoint not taken: {e}");
            return;
        }
        self.complete_checkpoint();
        let started = Instant::now();
        if self.checkpoints.writer.busy() {
            tracing::warn!("the previous checkpoint is still being written; waiting for it");
        }
        // At most one write in flight; it gives back the host memory the next snapshot reuses.
        self.checkpoints.writer.wait();
        self.set_batch_counters();
        let snapshot = TrainingState {
            vs: &self.vs,
            flat: &self.flat,
            optimizer: &mut self.optimizer,
            ema: &mut self.ema,
        }
        .begin_snapshot(self.checkpoints.spare.lock().expect("snapshot lock").take());
        let steps_per_epoch = self.plan.steps_per_epoch();
        let global_step = next.global_step(steps_per_epoch);
        let manifest = Manifest {
            format: 0,
            id: CheckpointId {
                generation: self.job.generation,
                global_step,
            }
            .to_string(),
            job: self.job.job_id.clone(),
            generation: self.job.generation,
            global_step,
            epoch: next.epoch,
            step: next.step,
            steps_per_epoch,
            stage: e.stage,
            stage_end,
            seed: self.spec.schedule.seed,
            world_size: self.job.world_size,
            model: self.spec.model.variant.to_string(),
            classes: self.spec.model.classes,
            files: Default::default(),
            trained: self.untallied.lock().expect("tally lock").clone(),
        };
        self.checkpoints.pending = Some((snapshot, manifest, started.elapsed()));
        self.liveness.tick();
    }

    /// Waits for the pending snapshot's copy (it ran beside this step's forward and backward
    /// passes) and hands it to the background writer. Called before anything changes the
    /// parameters, optimizer state or EMA.
    pub(super) fn complete_checkpoint(&mut self) {
        let Some((pending, manifest, taken)) = self.checkpoints.pending.take() else {
            return;
        };
        let waited = Instant::now();
        let snapshot = pending.finish();
        let blocked = taken + waited.elapsed();
        tracing::debug!(
            blocked_ms = blocked.as_secs_f64() * 1e3,
            "checkpoint snapshot taken"
        );
        self.options.metrics.snapshot(blocked);
        let metrics = self.options.metrics.clone();
        let untallied = self.untallied.clone();
        let spare = self.checkpoints.spare.clone();
        let parent = self.job.checkpoints.clone();
        let events = self.events.clone();
        self.checkpoints.writer.submit(Box::new(move || {
            let writing = Instant::now();
            let written = checkpoint::write(&snapshot, &parent, manifest);
            if let Ok((_, manifest)) = &written {
                metrics.written(
                    writing.elapsed(),
                    manifest.files.values().map(|f| f.bytes).sum(),
                );
            }
            match written {
                Ok((dir, manifest)) => match events.commit(&manifest) {
                    Commit::Committed => {
                        let mut untallied = untallied.lock().expect("tally lock");
                        for (epoch, sent) in &manifest.trained {
                            untallied.entry(*epoch).or_default().unmerge(*sent);
                        }
                        untallied.retain(|_, t| *t != EpochTally::default());
                    }
                    Commit::Refused(why) => {
                        // Never to be resumed from: left on disk, it would only look like one.
                        let removed = std::fs::remove_dir_all(&dir);
                        tracing::warn!(checkpoint = %manifest.id, ?removed, "the coordinator refused the checkpoint ({why}); its files are deleted");
                    }
                    Commit::Unknown(why) => {
                        tracing::warn!(checkpoint = %manifest.id, "no answer to the checkpoint's commit; its files stay: {why}");
                    }
                },
                Err(e) => {
                    tracing::error!("checkpoint not written, training goes on: {e}");
                    events.checkpoint_failed(&e.to_string());
                }
            }
            *spare.lock().expect("snapshot lock") = Some(snapshot);
        }));
    }

    fn set_batch_counters(&self) {
        tch::no_grad(|| {
            for counter in &self.batch_counters {
                let _ = counter.shallow_clone().fill_(self.batches_tracked);
            }
        });
    }
}
