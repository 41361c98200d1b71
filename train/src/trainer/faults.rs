//! The faults tests inject into a run through hidden worker flags: a hang, a failing
//! collective, weights gone to NaN, each at a chosen global step.

use super::TrainError;
use ladder_collective::CollectiveError;
use std::time::Duration;
use tch::Tensor;

/// Faults the tests inject (hidden worker flags), each before a global step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The training thread hangs for good (heartbeats go on), as a stuck kernel or a deadlock
    /// would.
    pub hang_before_step: Option<u64>,
    /// The collective fails with an error, each time the run comes to the step, as a
    /// misconfigured NCCL does.
    pub collective_error_before_step: Option<u64>,
    /// The parameters turn to NaN right after this step's update, as a diverged one leaves
    /// them.
    pub nan_after_step: Option<u64>,
    /// The training thread hangs for good once its run stopped or failed (heartbeats go on),
    /// as one stuck in a driver call when its generation ends would.
    pub hang_when_stopped: bool,
}

/// What an injected hang does: the calling thread never returns.
pub fn hang_for_good(when: &str) -> ! {
    tracing::warn!("hanging on purpose {when}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

impl Faults {
    /// Before global step `about_to` (0-based): fails the collective or hangs, if told to.
    pub(super) fn before_step(
        &self,
        about_to: u64,
        rank: u32,
        world: u32,
    ) -> Result<(), TrainError> {
        if self.collective_error_before_step == Some(about_to) {
            // What a peer that resets the connection looks like.
            return Err(TrainError::Collective(CollectiveError::Peer {
                rank,
                peer: (rank + 1) % world,
                during: "allreduce",
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    format!(
                        "injected before step {about_to} (--inject-collective-error-before-step)"
                    ),
                ),
            }));
        }
        if self.hang_before_step == Some(about_to) {
            hang_for_good(&format!(
                "before step {about_to} (--inject-hang-before-step)"
            ));
        }
        Ok(())
    }

    /// After `done` steps: turns `params` to NaN, if told to.
    pub(super) fn after_step(&self, done: u64, params: &Tensor) {
        if self.nan_after_step == Some(done) {
            tch::no_grad(|| {
                let _ = params.shallow_clone().fill_(f64::NAN);
            });
        }
    }
}
