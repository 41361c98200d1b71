//! `ladder-worker --device cuda:N --check-nccl`: whether this GPU node can run the gradient
//! allreduce, before it joins a job. It says which NCCL and CUDA runtime the worker bound (the
//! copies libtorch loaded) and from where, makes a one-rank communicator the way training does (non-blocking, polled with a
//! deadline), and reduces a CUDA tensor through the communicator's reduction path, out of place
//! (an average into zeros, so that a kernel runs even with one rank), checking that the bytes
//! arrive whole.
//!
//! One rank exercises no transport between GPUs: it checks what a node's setup gets wrong (the
//! library found, its versions, the communicator, device buffers and streams). Each step is
//! printed as it ends, so a hang or a crash still shows how far the check came.

use ladder_collective::nccl::{self, NcclCommunicator};
use ladder_collective::{Collective, Fence, libraries};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Floats per allreduce: 64 MB, the gradients of a model of 16M parameters.
const ELEMENTS: i64 = 16 << 20;
const ROUNDS: usize = 3;

/// Which NCCL and CUDA runtime this process bound, their versions and their files.
pub fn describe_library() -> Result<String, String> {
    let versions = nccl::versions().map_err(|e| e.to_string())?;
    let nccl = libraries::nccl().map_err(|e| e.to_string())?;
    let runtime = libraries::runtime().map_err(|e| e.to_string())?;
    Ok(format!(
        "{versions}; bound from {} and {}",
        nccl.path.display(),
        runtime.path.display()
    ))
}

/// Runs the check on CUDA device `device`, printing each step; the error says which failed.
pub fn run(device: usize, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    let id = nccl::unique_id().map_err(|e| format!("making the unique id: {e}"))?;
    let mut communicator = NcclCommunicator::init(0, 1, &id, device as i32, timeout)
        .map_err(|e| format!("making a one-rank communicator: {e}"))?;
    println!(
        "communicator: one rank on cuda:{device}, ready in {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    let cuda = Device::Cuda(device);
    let sent = Tensor::arange(ELEMENTS, (Kind::Float, cuda));
    for round in 1..=ROUNDS {
        // Out of place, into zeros: a one-rank average that launches a kernel moving every
        // value (an in-place one-rank sum is a no-op NCCL may skip, and proves nothing).
        let received = sent.zeros_like();
        let started = Instant::now();
        // SAFETY: both tensors hold ELEMENTS floats on this device, written by work queued on
        // the default stream, and nothing else touches them until the call returns.
        unsafe {
            communicator.average_device_into(
                sent.data_ptr() as u64,
                received.data_ptr() as u64,
                ELEMENTS as usize,
            )
        }
        .map_err(|e| format!("allreduce {round} of {ROUNDS}: {e}"))?;
        // As training waits for a step's reduction: through a fence, with the deadline.
        let fence = Fence::after_queued().map_err(|e| format!("allreduce {round}: {e}"))?;
        communicator
            .wait(&fence)
            .map_err(|e| format!("allreduce {round} of {ROUNDS}: {e}"))?;
        if !received.equal(&sent) {
            return Err(format!(
                "allreduce {round} of {ROUNDS}: one rank's average did not arrive whole"
            ));
        }
        println!(
            "allreduce {round}/{ROUNDS}: {ELEMENTS} floats averaged out of place on the default \
             stream (a kernel moved them), bytes intact, {:.2} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
