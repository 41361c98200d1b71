//! Ladder's worker: the math of training EfficientNetV2 with libtorch (through `tch`).
//!
//! Data flow of a step: micro-batches -> [`model`] forward -> [`loss`] -> backward, which
//! accumulates into the flat gradient buffer of [`flat`] -> (collective) -> [`optim`] RMSProp on
//! the flat buffers -> [`ema`]. [`state_io`] moves named state in and out of safetensors.

pub mod data_parallel;
pub mod ema;
pub mod flat;
pub mod loss;
pub mod model;
pub mod optim;
pub mod precision;
pub mod state_io;
pub mod training_state;
