//! Ladder's worker: the math of training EfficientNetV2 with libtorch (through `tch`).

pub mod model;
pub mod state_io;
