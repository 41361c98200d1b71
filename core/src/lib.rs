//! Ladder's shared core: what coordinator and worker must agree on, with no libtorch and no
//! networking. The job spec ([`spec`]), the stage plan ([`stage`]), the sample plan
//! ([`sample`]), the dataset manifest and shard index ([`dataset`]), and the deterministic
//! random streams they are built on ([`rng`]).

pub mod dataset;
pub mod logging;
pub mod rng;
pub mod sample;
pub mod spec;
pub mod stage;
