//! Jobs and workers as everyone outside the coordinator sees them: the wire's `Job` and
//! `WorkerInfo`, made here from a saved record and what lives in memory beside it. gRPC answers
//! them, the status page reads their serde form, the metrics and the CLI render them: one view.
//!
//! Readers never take the decision lock. Each decision publishes the views of the jobs it
//! changed ([`Decided`]); a reader takes a [`Snapshot`]: those views with the newest progress
//! and every worker, rebuilt when a decision was published since, or when it is older than
//! [`SNAPSHOT_FRESH_MS`] — so fifty pollers cost the roster (which heartbeats take) a few
//! copies a second, not fifty.

use crate::error::{CoordinatorError, Result};
use crate::records::{Incident, JobRecord};
use crate::runtime::Member;
use axum::body::Bytes;
use ladder_core::cut;
use ladder_core::dataset::SKIP_REASONS;
use ladder_proto::v1 as pb;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How old a snapshot may be before a reader asks for a new one (monotonic ms): progress and
/// workers' signs of life on show are at most this late; decisions never are.
pub const SNAPSHOT_FRESH_MS: i64 = 500;

/// Jobs in a listed page unless the request asks for fewer, and the most it may ask for.
pub const PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1_000;

/// A listed page stops before it passes this many encoded bytes (gRPC clients refuse answers
/// past 4 MiB).
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// A job as it is shown: its record (with the newest progress), what it waits for while
/// queued, the samples its workers skipped (by [`SKIP_REASONS`]) and its spec's global batch.
pub fn job(record: &JobRecord, waiting: &str, skipped: &[u64], global_batch: u32) -> pb::Job {
    pb::Job {
        id: record.id.clone(),
        name: record.name.clone(),
        state: record.state as i32,
        generation: record.generation,
        spec_toml: record.spec_toml.clone(),
        workers: record.workers.clone(),
        progress: Some(record.progress),
        checkpoints: record.checkpoints.clone(),
        message: record.message.clone(),
        created_at_ms: record.created_at_ms,
        updated_at_ms: record.updated_at_ms,
        stage_count: record.stage_count,
        epochs: record.epochs,
        last_incident: record.last_incident.clone(),
        trained: record.trained(),
        waiting: if record.state == pb::JobState::Queued {
            waiting.to_owned()
        } else {
            String::new()
        },
        incidents: Incident::ALL
            .iter()
            .map(|kind| {
                let count = record.incidents.get(kind.name()).copied().unwrap_or(0);
                (kind.name().to_owned(), count)
            })
            .collect(),
        checkpoints_committed: record.checkpoints_committed,
        skipped: skipped_by_reason(skipped),
        global_batch,
    }
}

pub fn skipped_by_reason(counts: &[u64]) -> BTreeMap<String, u64> {
    SKIP_REASONS
        .iter()
        .zip(counts.iter().copied().chain(std::iter::repeat(0)))
        .map(|(reason, count)| ((*reason).to_owned(), count))
        .collect()
}

/// A worker as it is shown at `now` (monotonic ms): how long until its lease runs out, how
/// long its training thread has been quiet.
pub fn worker(member: &Member, now: i64) -> pb::WorkerInfo {
    let w = member;
    let assignment = w.assignment.clone().unwrap_or_default();
    pb::WorkerInfo {
        id: w.record.id.clone(),
        name: w.record.name.clone(),
        hostname: w.record.hostname.clone(),
        device: w.record.device.clone(),
        job_id: assignment.job_id,
        generation: assignment.generation,
        rank: assignment.rank,
        leaving: w.leaving,
        heard_from: w.heard_from,
        registered_at_ms: w.record.registered_at_ms,
        lease_remaining_ms: w.lease_expires_ms - now,
        quiet_ms: now - w.active_ms,
        in_collective: w.in_collective,
        data_wait_ratio: w.data_wait,
    }
}

/// `job` as a list shows it: without its spec, checkpoints and per-epoch tallies (the largest
/// parts; `GetJob` has them).
pub fn brief(job: &pb::Job) -> pb::Job {
    pb::Job {
        spec_toml: String::new(),
        checkpoints: Vec::new(),
        trained: Vec::new(),
        ..job.clone()
    }
}

/// What the decisions published: every job's view by id, and how many publications so far.
#[derive(Clone, Default)]
pub struct Decided {
    pub version: u64,
    pub jobs: Arc<BTreeMap<String, Arc<pb::Job>>>,
}

/// What readers are shown: [`Decided`]'s jobs with the newest progress and skip counts, and
/// every worker, as of `taken_ms` (monotonic).
#[derive(Default)]
pub struct Snapshot {
    /// The [`Decided::version`] it was made from.
    pub version: u64,
    pub taken_ms: i64,
    pub jobs: Arc<BTreeMap<String, Arc<pb::Job>>>,
    pub workers: Vec<pb::WorkerInfo>,
    /// Answers already rendered from it, by what was asked (see [`Snapshot::rendered`]).
    rendered: std::sync::Mutex<BTreeMap<String, Bytes>>,
}

/// The most distinct answers a snapshot keeps rendered (a scrape, the page's list, ...).
const RENDERED_KEPT: usize = 16;

impl Snapshot {
    pub fn new(
        version: u64,
        taken_ms: i64,
        jobs: Arc<BTreeMap<String, Arc<pb::Job>>>,
        workers: Vec<pb::WorkerInfo>,
    ) -> Snapshot {
        Snapshot {
            version,
            taken_ms,
            jobs,
            workers,
            rendered: Default::default(),
        }
    }

    /// The answer to `asked`, rendered by `render` once per snapshot: fifty pollers of the
    /// same page or scrape between two snapshots cost one rendering, not fifty.
    pub fn rendered(&self, asked: &str, render: impl FnOnce(&Snapshot) -> Vec<u8>) -> Bytes {
        let mut rendered = self.rendered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(answer) = rendered.get(asked) {
            return answer.clone();
        }
        let answer = Bytes::from(render(self));
        if rendered.len() < RENDERED_KEPT {
            rendered.insert(asked.to_owned(), answer.clone());
        }
        answer
    }

    pub fn is_fresh(&self, decided: u64, now: i64) -> bool {
        self.version == decided && now - self.taken_ms < SNAPSHOT_FRESH_MS
    }

    pub fn job(&self, id: &str) -> Result<Arc<pb::Job>> {
        self.jobs.get(id).cloned().ok_or_else(|| {
            CoordinatorError::NotFound(format!(
                "no job {:?}; `ladder list` shows the jobs",
                cut(id)
            ))
        })
    }

    /// The page of jobs `request` asks for (see `ListJobsRequest`).
    pub fn page(&self, request: &pb::ListJobsRequest) -> pb::ListJobsResponse {
        let size = match request.page_size as usize {
            0 => PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        let from = match after {
            Some(token) => std::ops::Bound::Excluded(token.to_owned()),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = pb::ListJobsResponse::default();
        let mut bytes = 0;
        let mut last = None;
        for (id, job) in self.jobs.range((from, std::ops::Bound::Unbounded)) {
            if page.jobs.len() == size {
                break;
            }
            if !request.include_ended && pb::JobState::of(job.state).is_terminal() {
                page.ended_left_out += 1;
                last = Some(id);
                continue;
            }
            let shown = brief(job);
            let len = shown.encoded_len();
            if !page.jobs.is_empty() && bytes + len > MAX_PAGE_BYTES {
                break;
            }
            bytes += len;
            page.jobs.push(shown);
            last = Some(id);
        }
        let more = last.is_some_and(|id| {
            self.jobs
                .range::<String, _>((
                    std::ops::Bound::Excluded(id.clone()),
                    std::ops::Bound::Unbounded,
                ))
                .next()
                .is_some()
        });
        if more {
            page.next_page_token = last.cloned().unwrap_or_default();
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(states: &[pb::JobState], spec_bytes: usize) -> Snapshot {
        let jobs = states
            .iter()
            .enumerate()
            .map(|(n, state)| {
                let id = format!("job-{:06}", n + 1);
                let job = pb::Job {
                    id: id.clone(),
                    state: *state as i32,
                    spec_toml: "x".repeat(spec_bytes),
                    name: "y".repeat(spec_bytes),
                    ..Default::default()
                };
                (id, Arc::new(job))
            })
            .collect();
        Snapshot {
            jobs: Arc::new(jobs),
            ..Snapshot::default()
        }
    }

    fn ids(page: &pb::ListJobsResponse) -> Vec<&str> {
        page.jobs.iter().map(|j| j.id.as_str()).collect()
    }

    #[test]
    fn pages_follow_each_other_and_leave_out_ended_jobs_unless_asked() {
        use pb::JobState::{Completed, Failed, Queued, Running};
        let shown = snapshot(
            &[Completed, Running, Failed, Queued, Running, Completed],
            10,
        );
        let mut request = pb::ListJobsRequest {
            page_size: 2,
            ..Default::default()
        };
        let first = shown.page(&request);
        assert_eq!(ids(&first), ["job-000002", "job-000004"]);
        assert_eq!(first.ended_left_out, 2);
        assert!(first.jobs.iter().all(|j| j.spec_toml.is_empty()), "brief");
        request.page_token = first.next_page_token.clone();
        let second = shown.page(&request);
        assert_eq!(ids(&second), ["job-000005"]);
        assert_eq!(second.ended_left_out, 1);
        assert!(second.next_page_token.is_empty(), "the last page");

        let everything = shown.page(&pb::ListJobsRequest {
            include_ended: true,
            page_size: 100_000,
            ..Default::default()
        });
        assert_eq!(everything.jobs.len(), 6);
        assert_eq!(everything.ended_left_out, 0);
        assert!(everything.next_page_token.is_empty());
    }

    #[test]
    fn a_page_stops_short_of_a_mebibyte_and_the_next_goes_on_from_there() {
        // Names of 64 KiB (the brief view keeps names): 16 of them pass 1 MiB.
        let shown = snapshot(&[pb::JobState::Running; 40], 64 << 10);
        let mut request = pb::ListJobsRequest {
            page_size: 1_000,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = shown.page(&request);
            assert!(
                page.encoded_len() <= MAX_PAGE_BYTES + 1024,
                "{}",
                page.encoded_len()
            );
            assert!(!page.jobs.is_empty());
            seen.extend(ids(&page).into_iter().map(str::to_owned));
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        assert_eq!(seen.len(), 40);
        seen.dedup();
        assert_eq!(seen.len(), 40, "each job once");
    }
}
