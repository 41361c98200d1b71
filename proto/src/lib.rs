//! The generated types and services of `ladder.v1` (see `ladder/v1/ladder.proto`).

pub mod v1 {
    tonic::include_proto!("ladder.v1");
}
