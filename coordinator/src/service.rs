//! The gRPC face of the coordinator: `ladder.v1.JobService` and `ladder.v1.WorkerService`,
//! translating between the wire types and [`crate::state`].

use crate::auth::WorkerIdentity;
use crate::error::CoordinatorError;
use crate::records::LedgerEntry;
use crate::serving::{Serving, Term};
use crate::state::Coordinator;
use crate::state::{ProgressReport, RendezvousOutcome, Signs};
use ladder_core::dataset::SKIP_REASONS;
use ladder_proto::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The longest a worker's long-poll may wait, so that requests do not outlive proxies.
const MAX_WAIT: Duration = Duration::from_secs(30);

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        match e {
            CoordinatorError::NotFound(m) => Status::not_found(m),
            CoordinatorError::Invalid(m) => Status::invalid_argument(m),
            CoordinatorError::Conflict(m) => Status::failed_precondition(m),
            e @ CoordinatorError::Store(_) => Status::unavailable(e.to_string()),
            e @ CoordinatorError::Corrupt { .. } => Status::internal(e.to_string()),
        }
    }
}

fn wait(ms: u32) -> Duration {
    Duration::from_millis(ms as u64).min(MAX_WAIT)
}

/// The caller's identity, which every worker call after Register carries.
fn identity(worker: Option<pb::WorkerIdentity>) -> Result<WorkerIdentity, Status> {
    let worker = worker.ok_or_else(|| {
        Status::invalid_argument("worker is required: the id and secret registration returned")
    })?;
    required(&worker.id, "worker.id")?;
    Ok(worker)
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(value)
    }
}

/// The most bytes of a worker's name, host name or device: a host name has at most 253, and
/// every worker record is kept, listed and sent to every client.
const MAX_NAME_BYTES: usize = 256;

/// The most bytes of a worker's message kept (an error, a checkpoint's failure): enough for a
/// chained error, not a megabyte saved in the job's record for every reader.
const MAX_MESSAGE_BYTES: usize = 4096;

fn bounded<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.len() > MAX_NAME_BYTES {
        Err(Status::invalid_argument(format!(
            "{what} has {} bytes, more than {MAX_NAME_BYTES}: {}",
            value.len(),
            ladder_core::cut(value)
        )))
    } else {
        Ok(value)
    }
}

/// `message`, cut to at most [`MAX_MESSAGE_BYTES`] (at a character boundary) and marked so.
fn clipped(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let end = (0..=MAX_MESSAGE_BYTES)
            .rev()
            .find(|&at| message.is_char_boundary(at))
            .unwrap_or(0);
        message.truncate(end);
        message.push_str("... (cut)");
    }
    message
}

/// A number a worker sends, refused unless finite and in `range`: JSON, the store's encoding,
/// has no NaN, and a curve or an ETA of NaN helps nobody.
fn number(value: f32, what: &str, range: std::ops::RangeInclusive<f32>) -> Result<f32, Status> {
    if value.is_finite() && range.contains(&value) {
        Ok(value)
    } else {
        Err(Status::invalid_argument(format!(
            "{what} is {value}: it must be a number from {} to {}",
            range.start(),
            range.end()
        )))
    }
}

/// Rank 0's progress, its numbers checked one by one. A loss that is not finite passes: it is
/// not a malformed report but a diverged run, which the coordinator ends (see
/// [`Coordinator::report_progress`]).
fn checked_progress(p: pb::Progress) -> Result<pb::Progress, Status> {
    const ANY: std::ops::RangeInclusive<f32> = 0.0..=f32::MAX;
    if p.loss.is_finite() {
        number(p.loss, "progress.loss", ANY)?;
    }
    number(p.images_per_second, "progress.images_per_second", ANY)?;
    number(p.eta_seconds, "progress.eta_seconds", ANY)?;
    number(p.learning_rate, "progress.learning_rate", ANY)?;
    number(p.eval_top1, "progress.eval_top1", 0.0..=1.0)?;
    number(p.eval_top5, "progress.eval_top5", 0.0..=1.0)?;
    Ok(p)
}

/// The services answer through whichever coordinator serves now (see [`Serving`]).
pub struct JobApi(pub Arc<Serving>);
pub struct WorkerApi(pub Arc<Serving>);

type JobEvents = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let job = self
            .0
            .coordinator()?
            .submit(&request.into_inner().spec_toml)
            .await?;
        Ok(Response::new(pb::SubmitJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self.0.coordinator()?.get(&request.into_inner().id).await?;
        Ok(Response::new(Arc::unwrap_or_clone(job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let shown = self.0.coordinator()?.snapshot();
        Ok(Response::new(shown.page(&request.into_inner())))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let workers = self.0.coordinator()?.snapshot().workers.clone();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self
            .0
            .coordinator()?
            .cancel(&request.into_inner().id)
            .await?;
        Ok(Response::new(job))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        self.0
            .coordinator()?
            .delete(&request.into_inner().id)
            .await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn resume_job(
        &self,
        request: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        let checkpoint = (!r.checkpoint_id.is_empty()).then_some(r.checkpoint_id.as_str());
        let workers = (r.workers > 0).then_some(r.workers);
        let job = self
            .0
            .coordinator()?
            .resume(&r.id, checkpoint, workers)
            .await?;
        Ok(Response::new(job))
    }

    type WatchJobStream = JobEvents;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<JobEvents>, Status> {
        let id = request.into_inner().id;
        let coordinator = self.0.coordinator()?;
        let term = self.0.changes();
        let mut changes = coordinator.subscribe();
        let first = coordinator.get(&id).await?;
        let stream = async_stream(move |tx| async move {
            let mut term_ends = std::pin::pin!(term_ends(term, coordinator.clone()));
            let mut job = first;
            loop {
                let ended = pb::JobState::of(job.state).is_terminal();
                if tx
                    .send(Ok(pb::JobEvent {
                        job: Some(pb::Job::clone(&job)),
                    }))
                    .await
                    .is_err()
                    || ended
                {
                    return;
                }
                loop {
                    let changed = tokio::select! {
                        changed = changes.recv() => changed,
                        // The term that answered ended: the watcher goes on with whichever
                        // coordinator serves next.
                        () = &mut term_ends => {
                            let _ = tx
                                .send(Err(Status::unavailable("this coordinator's term ended")))
                                .await;
                            return;
                        }
                    };
                    match changed {
                        Ok(changed) if changed == id => break,
                        Ok(_) => continue,
                        // Missed some changes: the latest state is all a watcher needs.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
                match coordinator.get(&id).await {
                    Ok(latest) => job = latest,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// Resolves once `serving` no longer serves (the process lost its leadership, or stops).
async fn term_ends(mut term: tokio::sync::watch::Receiver<Term>, serving: Arc<Coordinator>) {
    loop {
        let same =
            matches!(&*term.borrow_and_update(), Term::Leading(c) if Arc::ptr_eq(c, &serving));
        if !same || term.changed().await.is_err() {
            return;
        }
    }
}

/// A stream fed by a task: the task ends when the client goes away.
fn async_stream<F, Fut>(body: F) -> JobEvents
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = request.into_inner();
        let (worker, secret) = self
            .0
            .coordinator()?
            .register(
                bounded(&r.hostname, "hostname")?,
                bounded(&r.device, "device")?,
                bounded(&r.name, "name")?,
            )
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: worker.id,
            lease_ttl_ms: worker.lease_ttl_ms,
            worker_secret: secret,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let assignment = self
            .0
            .coordinator()?
            .heartbeat(
                &identity(r.worker)?,
                Signs {
                    activity: r.activity,
                    in_collective: r.in_collective,
                    leaving: r.leaving,
                    data_wait: number(r.data_wait_ratio, "data_wait_ratio", 0.0..=1.0)?,
                    // Only the reasons there are: a label is never made up by a caller.
                    skipped: SKIP_REASONS.map(|reason| r.skipped.get(reason).copied().unwrap_or(0)),
                },
            )
            .await?;
        Ok(Response::new(match assignment {
            Some(a) => pb::HeartbeatResponse {
                job_id: a.job_id,
                generation: a.generation,
            },
            None => pb::HeartbeatResponse::default(),
        }))
    }

    async fn await_assignment(
        &self,
        request: Request<pb::AwaitAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let r = request.into_inner();
        let assignment = self
            .0
            .coordinator()?
            .await_assignment(&identity(r.worker)?, wait(r.wait_ms))
            .await?;
        Ok(Response::new(assignment.unwrap_or_default()))
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        let r = request.into_inner();
        let report = ProgressReport {
            progress: r.progress.map(checked_progress).transpose()?,
            finished: r.finished,
            error: clipped(r.error),
            bad_checkpoint: r.bad_checkpoint,
            collective_error: clipped(r.collective_error),
            checkpoint_error: clipped(r.checkpoint_error),
        };
        let answer = self
            .0
            .coordinator()?
            .report_progress(&identity(r.worker)?, &r.job_id, r.generation, report)
            .await?;
        Ok(Response::new(answer))
    }

    async fn rendezvous(
        &self,
        request: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = request.into_inner();
        let outcome = self
            .0
            .coordinator()?
            .rendezvous(
                &identity(r.worker)?,
                &r.job_id,
                r.generation,
                r.rank,
                r.payload,
                wait(r.wait_ms),
            )
            .await?;
        Ok(Response::new(match outcome {
            RendezvousOutcome::Stale => pb::RendezvousResponse::default(),
            RendezvousOutcome::Waiting => pb::RendezvousResponse {
                current: true,
                ..Default::default()
            },
            RendezvousOutcome::Complete { payloads, ring_key } => pb::RendezvousResponse {
                payloads,
                complete: true,
                current: true,
                ring_key,
            },
        }))
    }

    async fn commit_checkpoint(
        &self,
        request: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let r = request.into_inner();
        let checkpoint = r
            .checkpoint
            .ok_or_else(|| Status::invalid_argument("checkpoint is required"))?;
        required(&checkpoint.id, "checkpoint.id")?;
        let outcome = self
            .0
            .coordinator()?
            .commit_checkpoint(
                &identity(r.worker)?,
                &r.job_id,
                r.generation,
                checkpoint,
                r.trained
                    .into_iter()
                    .map(|t| LedgerEntry {
                        checkpoint_step: 0,
                        epoch: t.epoch,
                        // A commit tells single epochs (ranges are the coordinator's).
                        epochs: 1,
                        samples: t.samples,
                        digest: t.digest,
                        skipped: t.skipped,
                    })
                    .collect(),
            )
            .await?;
        Ok(Response::new(match outcome {
            Ok(retired) => pb::CommitCheckpointResponse {
                accepted: true,
                reason: String::new(),
                retired,
            },
            Err(reason) => pb::CommitCheckpointResponse {
                accepted: false,
                reason,
                retired: Vec::new(),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_message_is_kept_to_its_bound_at_a_character_boundary() {
        assert_eq!(clipped("short".into()), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let kept = clipped(long);
        assert!(kept.ends_with("... (cut)"));
        assert!(kept.len() <= MAX_MESSAGE_BYTES + "... (cut)".len());
        assert!(kept.trim_end_matches("... (cut)").chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_name_past_its_bound_is_refused_naming_the_field() {
        assert_eq!(bounded("node-7", "hostname").unwrap(), "node-7");
        let refused = bounded(&"x".repeat(MAX_NAME_BYTES + 1), "hostname").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().starts_with("hostname has 257 bytes"));
    }
}
