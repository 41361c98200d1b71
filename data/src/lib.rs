//! Ladder's data path, from tar bytes to augmented micro-batches. No libtorch: the worker turns
//! the finished batch buffers into tensors.

pub mod augment;
pub mod batch;
pub mod decode;
pub mod image;
pub mod import;
pub mod loader;
pub mod mix;
pub mod preview;
pub mod randaugment;
pub mod resample;
mod simd;
pub mod synth;
