//! How fast a run goes: smoothed step time and loss (for images/s, the ETA and the reported
//! loss), each step's parts into the run's instruments, and per epoch a log line that tells the
//! time spent waiting for data apart from the rest.

use crate::events::{Instruments, StepParts};
use std::time::{Duration, Instant};

/// Smoothed step time and loss, for images/s, ETA and the reported loss; and the epoch's
/// totals, for a line in the log that tells the time waiting for data apart from the rest.
pub(super) struct Meter {
    pub(super) step_seconds: Option<f64>,
    pub(super) loss: Option<f64>,
    /// The smoothed share of step time spent waiting for data.
    pub(super) data_wait_share: Option<f64>,
    /// The parts of the step in progress.
    pub(super) parts: StepParts,
    last: Instant,
    epoch_started: Instant,
    /// This rank's images in the epoch so far, and the time it spent waiting for them.
    pub(super) epoch_images: u64,
    pub(super) data_wait: Duration,
}

impl Meter {
    fn smooth(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| 0.9 * o + 0.1 * new)
    }

    pub(super) fn new() -> Meter {
        let now = Instant::now();
        Meter {
            step_seconds: None,
            loss: None,
            data_wait_share: None,
            parts: StepParts::default(),
            last: now,
            epoch_started: now,
            epoch_images: 0,
            data_wait: Duration::ZERO,
        }
    }

    /// At the start of an epoch, its shape prepared.
    pub(super) fn restart(&mut self) {
        self.last = Instant::now();
        self.epoch_started = self.last;
        self.epoch_images = 0;
        self.data_wait = Duration::ZERO;
    }

    /// Logs the epoch's images/s on this rank and the share of its time spent waiting for the
    /// data path: near 0 when the model step is what limits, large when decoding is.
    pub(super) fn log_epoch(&self, epoch: u32) {
        let seconds = self.epoch_started.elapsed().as_secs_f64();
        if self.epoch_images == 0 || seconds <= 0.0 {
            return;
        }
        tracing::info!(
            epoch = epoch + 1,
            images_per_second = %format!("{:.1}", self.epoch_images as f64 / seconds),
            waiting_for_data = %format!("{:.1}%", 100.0 * self.data_wait.as_secs_f64() / seconds),
            "epoch trained on this rank"
        );
    }

    /// Ends a step on the host (its work queued): smooths its time and data-wait share, and
    /// records its parts in `instruments`.
    pub(super) fn step(&mut self, instruments: &dyn Instruments) {
        let now = Instant::now();
        let seconds = (now - self.last).as_secs_f64();
        self.last = now;
        self.step_seconds = Some(Self::smooth(self.step_seconds, seconds));
        let parts = std::mem::take(&mut self.parts);
        let share = match seconds {
            s if s > 0.0 => (parts.data_wait.as_secs_f64() / s).min(1.0),
            _ => 0.0,
        };
        self.data_wait_share = Some(Self::smooth(self.data_wait_share, share));
        instruments.step(&parts, self.data_wait_share.unwrap_or_default());
    }

    /// A step's loss, read a step after it was queued.
    pub(super) fn loss(&mut self, loss: f64) {
        self.loss = Some(Self::smooth(self.loss, loss));
    }
}
