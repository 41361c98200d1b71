//! The generated types and services of `ladder.v1` (see `ladder/v1/ladder.proto`), and the
//! client connection that the CLI and the workers share.

pub mod client;
pub mod saved_f32;

pub mod v1 {
    tonic::include_proto!("ladder.v1");
}
