//! Ladder's worker, the agent around one rank's training: [`agent`] runs the worker's life
//! (register, heartbeat, await an assignment, rendezvous, run a
//! [`ladder_train::trainer::Trainer`] per assignment) over its [`session`] with the
//! coordinator (one connection, one way to retry), joins each generation's collective through
//! [`transport`], and tells the coordinator what the trainer reports through its events
//! ([`reporting`]). Beside it: the worker's Prometheus [`metrics`], the terminal [`display`],
//! its share of the node's cores ([`threads`]), and the glue to the device's libraries
//! ([`nccl_check`], [`cuda_memory`]).

pub mod agent;
pub mod cuda_memory;
pub mod display;
pub mod metrics;
pub mod nccl_check;
pub mod reporting;
pub mod session;
pub mod threads;
pub mod transport;
