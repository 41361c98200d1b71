//! Jobs and workers as they are shown (the gRPC answers, the status page, the metrics): a saved
//! record with what lives in memory beside it.

use crate::records::JobRecord;
use crate::runtime::Member;
use ladder_core::dataset::SKIP_REASONS;
use ladder_core::spec::JobSpec;
use std::sync::Arc;

/// A job as it is shown: its record with the newest progress, and what it waits for while
/// queued.
/// A job as it is shown: its record with the newest progress, and what it waits for while
/// queued.
#[derive(Clone, Debug)]
pub struct JobView {
    pub record: JobRecord,
    pub waiting: String,
    /// Samples its workers skipped while it trained, by [`SKIP_REASONS`] (since this
    /// coordinator started).
    pub skipped: [u64; SKIP_REASONS.len()],
    /// The job's spec, parsed (`None` if its saved text no longer parses).
    pub spec: Option<Arc<JobSpec>>,
}

/// A worker as it is shown, with how long until its lease runs out and how long its training
/// thread has been quiet (both in milliseconds, from now).
#[derive(Clone, Debug)]
pub struct WorkerView {
    pub member: Member,
    pub lease_remaining_ms: i64,
    pub quiet_ms: i64,
}
