//! Ladder's data path, from tar bytes to augmented micro-batches of uint8 pixels (NHWC). No
//! libtorch: the trainer uploads the finished batch buffers and normalizes them on the device.

pub mod augment;
pub mod batch;
pub mod decode;
pub mod decoded;
pub mod image;
pub mod import;
pub mod loader;
pub mod mix;
pub mod preview;
pub mod randaugment;
pub mod resample;
mod simd;
pub mod synth;
pub mod webp;
