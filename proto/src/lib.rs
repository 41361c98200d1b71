//! The generated types and services of `ladder.v1` (see `ladder/v1/ladder.proto`), and the
//! client connection that the CLI and the workers share.

pub mod client;
pub mod saved_f32;

/// A job's state in the shown JSON: its name ("running"), as the store saves it.
fn serialize_job_state<S: serde::Serializer>(state: &i32, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(v1::JobState::of(*state).name())
}

/// A 64-bit digest in the shown JSON: 16 hex digits.
fn serialize_hex<S: serde::Serializer>(digest: &u64, to: S) -> Result<S::Ok, S::Error> {
    to.collect_str(&format_args!("{digest:016x}"))
}

pub mod v1 {
    tonic::include_proto!("ladder.v1");

    impl JobState {
        /// The name people read (`ladder status`, the status page, metrics labels) and the
        /// store saves.
        pub fn name(self) -> &'static str {
            match self {
                JobState::Unspecified => "unknown",
                JobState::Queued => "queued",
                JobState::Rendezvous => "rendezvous",
                JobState::Running => "running",
                JobState::Completed => "completed",
                JobState::Failed => "failed",
                JobState::Cancelled => "cancelled",
            }
        }

        /// The state of a job as the wire carries it (`Job::state`), unknown ones as such.
        pub fn of(wire: i32) -> JobState {
            JobState::try_from(wire).unwrap_or(JobState::Unspecified)
        }

        pub fn is_terminal(self) -> bool {
            matches!(
                self,
                JobState::Completed | JobState::Failed | JobState::Cancelled
            )
        }

        pub fn is_active(self) -> bool {
            matches!(self, JobState::Rendezvous | JobState::Running)
        }
    }

    impl std::fmt::Display for JobState {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.name())
        }
    }
}
