//! Ladder's training library: one rank's lockstep training of EfficientNetV2, with no network
//! of its own. The worker process (`ladder-worker`, the agent) assigns it a job, hands it a
//! [`ladder_collective::Collective`] and listens to it through [`events`]; tests and
//! benchmarks drive it the same way in memory.
//!
//! Data flow of a step, in one direction: [`feed`] (this rank's micro-batch requests) -> the
//! loader's decoded uint8 batches -> [`input`] (uploaded, normalized on the device) -> [`model`]
//! forward under [`precision`] -> [`loss`] -> backward,
//! which accumulates into the flat gradient buffer of [`flat`] -> one reduction through
//! [`data_parallel`] -> [`optim`] RMSProp on the flat buffers -> [`ema`]. The loop that drives
//! it reads top to bottom in [`trainer`]; [`checkpoint`] is the one component that writes,
//! verifies and restores a run's state and runs the snapshot pipeline beside the steps;
//! [`pretrained`] starts a model from published weights.

pub mod checkpoint;
pub mod data_parallel;
pub mod ema;
pub mod events;
pub mod feed;
pub mod flat;
pub mod input;
pub mod loss;
pub mod model;
pub mod optim;
pub mod precision;
pub mod pretrained;
pub mod trainer;
