//! How far the device has come. A [`Fence`] marks the work queued so far on the device's
//! legacy default stream (the one libtorch's tensors are computed on, and NCCL's reductions
//! run on): a CUDA event recorded there. The host reads what that work wrote (a step's loss,
//! copied to page-locked memory) once the device has passed the fence, a step later, instead
//! of draining the device every step. A host fence has always passed: on the CPU the work
//! ran when it was called. Events are reused: a dropped fence's event waits in a spare list
//! for the next fence, so a step records an event and creates none.

use crate::CollectiveError;
use crate::libraries::{self, CUDA_ERROR_NOT_READY, CUDA_EVENT_DISABLE_TIMING, CUDA_SUCCESS};
use crate::libraries::{CudaEvent, Runtime};
use std::time::Duration;

pub struct Fence(Option<(&'static Runtime, CudaEvent)>);

// SAFETY: a CUDA event may be queried and destroyed from any thread.
unsafe impl Send for Fence {}

/// An event no fence holds, kept for the next one.
struct Spare(CudaEvent);

// SAFETY: as for `Fence`.
unsafe impl Send for Spare {}

static SPARES: std::sync::Mutex<Vec<Spare>> = std::sync::Mutex::new(Vec::new());

fn cuda_error(call: &str, code: i32) -> CollectiveError {
    CollectiveError::Device(format!("{call}: CUDA error {code}"))
}

impl Fence {
    /// A fence the host has passed already.
    pub const HOST: Fence = Fence(None);

    /// After everything queued so far on the current CUDA device's legacy default stream.
    pub fn after_queued() -> Result<Fence, CollectiveError> {
        let cuda = &libraries::runtime()?.functions;
        let spare = SPARES.lock().unwrap_or_else(|e| e.into_inner()).pop();
        // SAFETY: `event` outlives the call; the null stream is the legacy default stream.
        unsafe {
            let event = match spare {
                Some(Spare(event)) => event,
                None => {
                    let mut event: CudaEvent = std::ptr::null_mut();
                    let made =
                        (cuda.event_create_with_flags)(&mut event, CUDA_EVENT_DISABLE_TIMING);
                    if made != CUDA_SUCCESS {
                        return Err(cuda_error("cudaEventCreateWithFlags", made));
                    }
                    event
                }
            };
            let fence = Fence(Some((cuda, event)));
            let recorded = (cuda.event_record)(event, std::ptr::null_mut());
            if recorded != CUDA_SUCCESS {
                return Err(cuda_error("cudaEventRecord", recorded));
            }
            Ok(fence)
        }
    }

    /// Whether the device has passed the fence; an error when its work failed.
    pub fn passed(&self) -> Result<bool, CollectiveError> {
        let Some((cuda, event)) = self.0 else {
            return Ok(true);
        };
        // SAFETY: a live event of this fence.
        match unsafe { (cuda.event_query)(event) } {
            CUDA_SUCCESS => Ok(true),
            CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(cuda_error("cudaEventQuery", other)),
        }
    }

    /// Waits until the device has passed the fence, polling (the driver's own wait cannot be
    /// interrupted). No deadline: what only this device's work holds up cannot wait on a peer;
    /// a collective that can waits through [`crate::Collective::wait`].
    pub fn wait_for_device(&self) -> Result<(), CollectiveError> {
        let mut pause = Duration::from_micros(20);
        while !self.passed()? {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_micros(200));
        }
        Ok(())
    }
}

impl Drop for Fence {
    /// The event waits for the next fence (recording it again later is CUDA's own way to
    /// reuse one); only a list already holding a few destroys it.
    fn drop(&mut self) {
        if let Some((cuda, event)) = self.0 {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            if spares.len() < 4 {
                spares.push(Spare(event));
            } else {
                // SAFETY: the event is live and not used after this.
                let _ = unsafe { (cuda.event_destroy)(event) };
            }
        }
    }
}
