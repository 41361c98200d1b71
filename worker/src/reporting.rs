//! How a run tells the coordinator what happens: progress (shown here, and from rank 0 sent at
//! most once a second and at every boundary), checkpoint commits (retried until the
//! coordinator answers) and failed checkpoints, over the worker's [`Session`]; and the
//! deletion of what retention retired ([`delete_retired`]).

use crate::session::{Retry, Session};
use ladder_proto::v1 as pb;
use ladder_train::checkpoint::{self, Manifest};
use ladder_train::events::{Commit, Evaluation, Events, Progress, StopSignal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// One generation of one job as this worker takes part in it.
#[derive(Clone)]
pub struct Run {
    pub session: Arc<Session>,
    pub worker: pb::WorkerIdentity,
    pub job_id: String,
    pub generation: u64,
    /// The spec's `checkpoint.dir`: retired checkpoints are deleted only inside its
    /// `JOB` directory.
    pub checkpoint_root: PathBuf,
}

pub fn to_pb(p: &Progress) -> pb::Progress {
    let evaluation = p.evaluation.unwrap_or(Evaluation {
        epoch: 0,
        top1: 0.0,
        top5: 0.0,
        samples: 0,
    });
    pb::Progress {
        stage: p.stage,
        epoch: p.epoch,
        step: p.step,
        steps_per_epoch: p.steps_per_epoch,
        loss: p.loss as f32,
        images_per_second: finite_f32(p.images_per_second),
        image_size: p.image_size,
        graph_builds: p.graph_builds,
        eta_seconds: finite_f32(p.eta_seconds),
        eval_epoch: if p.evaluation.is_some() {
            evaluation.epoch + 1
        } else {
            0
        },
        eval_top1: evaluation.top1 as f32,
        eval_top5: evaluation.top5 as f32,
        global_step: p.global_step,
        learning_rate: p.learning_rate as f32,
    }
}

/// `value` as the wire's `f32`, a rate or a time too large for it kept at its largest: the
/// coordinator refuses infinities (the loss is sent as it is: a diverged one ends the job).
fn finite_f32(value: f64) -> f32 {
    value.clamp(0.0, f32::MAX as f64) as f32
}

pub enum Report {
    Progress(Progress, bool),
}

/// [`Events`] over channels to the async side: progress goes to the reporter task; a commit
/// blocks the checkpoint writer's thread until the coordinator answers.
pub struct ChannelEvents {
    reports: mpsc::UnboundedSender<Report>,
    run: Run,
    runtime: tokio::runtime::Handle,
}

impl ChannelEvents {
    pub fn new(run: Run) -> (ChannelEvents, mpsc::UnboundedReceiver<Report>) {
        let (reports, receiver) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Handle::current();
        (
            ChannelEvents {
                reports,
                run,
                runtime,
            },
            receiver,
        )
    }
}

impl Events for ChannelEvents {
    fn progress(&self, progress: &Progress, urgent: bool) {
        let _ = self
            .reports
            .send(Report::Progress(progress.clone(), urgent));
    }

    fn checkpoint_failed(&self, error: &str) {
        let run = &self.run;
        let request = pb::ReportProgressRequest {
            worker: Some(run.worker.clone()),
            job_id: run.job_id.clone(),
            generation: run.generation,
            checkpoint_error: error.to_owned(),
            ..Default::default()
        };
        if let Err(status) =
            self.runtime
                .block_on(run.session.call(request, |mut c, r| async move {
                    c.report_progress(r).await
                }))
        {
            tracing::warn!(
                "the failed checkpoint was not reported: {}",
                status.message()
            );
        }
    }

    fn commit(&self, manifest: &Manifest) -> Commit {
        let run = &self.run;
        let request = pb::CommitCheckpointRequest {
            worker: Some(run.worker.clone()),
            job_id: run.job_id.clone(),
            generation: run.generation,
            checkpoint: Some(pb::CheckpointRef {
                id: manifest.id.clone(),
                generation: manifest.generation,
                epoch: manifest.epoch,
                step: manifest.global_step,
                stage: manifest.stage,
                committed_at_ms: 0,
                stage_end: manifest.stage_end,
            }),
            trained: manifest
                .trained
                .iter()
                .map(|(&epoch, t)| pb::EpochTally {
                    epoch,
                    epochs: 1,
                    samples: t.samples,
                    digest: t.digest,
                    skipped: t.skipped,
                })
                .collect(),
        };
        // A commit waits for a coordinator that is away: its checkpoint must not be lost.
        let answer = self.runtime.block_on(run.session.call_retrying(
            Retry::backing_off(Duration::from_millis(200), Duration::from_secs(5)),
            &format!("committing checkpoint {}", manifest.id),
            request,
            |mut c, r| async move { c.commit_checkpoint(r).await },
        ));
        match answer {
            Ok(reply) if reply.accepted => {
                tracing::info!(checkpoint = %manifest.id, "checkpoint committed");
                delete_retired(&reply.retired, &run.checkpoint_root, &run.job_id);
                Commit::Committed
            }
            Ok(reply) => Commit::Refused(reply.reason),
            Err(status) => Commit::Unknown(status.message().to_owned()),
        }
    }
}

/// Shows progress here and, from rank 0, sends it to the coordinator at most once a second (at
/// once when urgent); stops the run if the coordinator says the generation is over. Returns the last
/// progress once the trainer is done.
pub async fn report_progress(
    run: Run,
    mut reports: mpsc::UnboundedReceiver<Report>,
    stop: Arc<StopSignal>,
    checkpoint_now: Arc<AtomicBool>,
    progress_bar: bool,
    send: bool,
) -> Option<Progress> {
    let Run {
        session,
        worker,
        job_id,
        generation,
        ..
    } = run;
    let mut display = crate::display::Display::new(progress_bar, &job_id);
    let mut last: Option<Progress> = None;
    let mut sent: Option<Instant> = None;
    while let Some(Report::Progress(progress, urgent)) = reports.recv().await {
        display.show(&progress, urgent);
        last = Some(progress.clone());
        let recently = sent.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if !send || (!urgent && recently) {
            continue;
        }
        sent = Some(Instant::now());
        let request = pb::ReportProgressRequest {
            worker: Some(worker.clone()),
            job_id: job_id.clone(),
            generation,
            progress: Some(to_pb(&progress)),
            ..Default::default()
        };
        match session
            .call(
                request,
                |mut c, r| async move { c.report_progress(r).await },
            )
            .await
        {
            Ok(reply) if !reply.current => stop.stop(&format!(
                "generation {generation} of {job_id} is no longer current"
            )),
            Ok(reply) if reply.checkpoint_now => {
                checkpoint_now.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::warn!("progress refused by the coordinator: {}", status.message())
            }
            Err(status) => tracing::debug!("progress not reported: {}", status.message()),
        }
    }
    display.finish();
    last
}

/// Deletes the checkpoints retention retired (see [`checkpoint::delete_retired`]).
pub fn delete_retired(retired: &[pb::CheckpointRef], root: &Path, job_id: &str) {
    checkpoint::delete_retired(retired.iter().map(|r| r.id.as_str()), root, job_id);
}
