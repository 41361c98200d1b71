//! Ladder's worker: trains EfficientNetV2 with libtorch (through `tch`) as one rank of a job.
//!
//! [`agent`] runs the worker's life (register, heartbeat, await an assignment, rendezvous, run
//! a [`trainer::Trainer`] per assignment) over its [`session`] with the coordinator (one
//! connection, one way to retry), joining each generation's collective through [`transport`]
//! and telling the coordinator what happens through [`reporting`]. The trainer's loop reads
//! top to bottom in `trainer/mod.rs`, with its checkpoint pipeline, evaluation, meter and
//! injected faults beside it; it is fed by [`feed`] (this rank's micro-batches), tells the
//! outside world through [`report`] and [`metrics`], and writes [`checkpoint`]s.
//!
//! Data flow of a step: micro-batches -> [`model`] forward -> [`loss`] -> backward, which
//! accumulates into the flat gradient buffer of [`flat`] -> (collective) -> [`optim`] RMSProp on
//! the flat buffers -> [`ema`]. [`state_io`] moves named state in and out of safetensors.

pub mod agent;
pub mod checkpoint;
pub mod cuda_memory;
pub mod data_parallel;
pub mod display;
pub mod ema;
pub mod feed;
pub mod flat;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod nccl_check;
pub mod nccl_library;
pub mod optim;
pub mod precision;
pub mod pretrained;
pub mod report;
pub mod reporting;
pub mod session;
pub mod state_io;
pub mod threads;
pub mod trainer;
pub mod training_state;
pub mod transport;
