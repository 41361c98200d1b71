//! The worker process's side of the control plane: register, keep the lease, wait for an
//! assignment, rendezvous with the other ranks, run the [`Trainer`] on a thread of its own,
//! and report progress and checkpoints asynchronously (no per-step round trip).
//!
//! ```text
//! register --> heartbeat task (every TTL/3; a new generation or a lost lease stops the run)
//!    |
//!    +--> await assignment --> rendezvous (ring address / NCCL id) --> trainer thread
//!               ^                                                        |  progress, commits
//!               +---------------- finished / stopped / failed <----------+--> reporter task
//! ```
//!
//! The coordinator may be down for a while: the run goes on, heartbeats and reports are
//! retried, and a checkpoint commit waits for it.

use crate::metrics::WorkerMetrics;
use crate::reporting::{ChannelEvents, Run, delete_retired, report_progress, to_pb};
use crate::session::{Retry, Session};
use crate::transport::Transport;
use ladder_core::location;
use ladder_core::spec::JobSpec;
use ladder_proto::v1 as pb;
use ladder_train::events::{Liveness, Progress, StopSignal};
use ladder_train::precision::Precision;
use ladder_train::trainer::{self, Faults, Options, TrainError, Trainer};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tch::Device;
use tonic::Code;

#[derive(Clone, Debug)]
pub struct Config {
    /// Comma-separated coordinator URLs.
    pub coordinator: String,
    pub token: String,
    pub tls_ca: Option<PathBuf>,
    pub device: Device,
    pub precision: Precision,
    /// Operator-chosen stable name (shown by `ladder status`).
    pub name: String,
    /// The address other ranks reach this worker's ring listener on.
    pub ring_host: String,
    /// How long a collective waits on a silent peer before giving up.
    pub collective_timeout: Duration,
    /// A progress bar (terminal) or log lines.
    pub progress_bar: bool,
    /// See [`Options::replica_digests`].
    pub replica_digests: Option<PathBuf>,
    pub faults: Faults,
    /// How long a stopped run's training thread may take to return before the worker counts
    /// it stuck and exits.
    pub stop_grace: Duration,
    /// What `--metrics-listen` serves.
    pub metrics: Arc<WorkerMetrics>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".to_owned(),
    }
}

/// A stopped run's training thread that no longer progresses: the worker cannot serve again
/// and must exit, without the process's exit handlers, which may wait on that thread's driver
/// call too (see `main`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Stuck(String);

/// How long a worker asked to stop waits for its job's checkpoint before it leaves anyway
/// (preemption notices give 30 s to 2 minutes).
const LEAVE_GRACE: Duration = Duration::from_secs(90);

/// On SIGTERM (a node drain, a preemption notice): tell the coordinator, which has rank 0
/// checkpoint and then goes on without this worker; leave once that happened. A second
/// SIGTERM, or [`LEAVE_GRACE`] without the checkpoint, leaves at once.
async fn leave_on_sigterm(leave: Arc<StopSignal>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tracing::warn!("cannot handle SIGTERM: it will end the worker at once");
        return;
    };
    term.recv().await;
    tracing::warn!(
        "asked to stop (SIGTERM): leaving, after a checkpoint of the job in training if there \
         is one (at most {} s); a second SIGTERM leaves at once",
        LEAVE_GRACE.as_secs()
    );
    leave.stop("SIGTERM");
    tokio::select! {
        _ = term.recv() => tracing::warn!("second SIGTERM: leaving now"),
        _ = tokio::time::sleep(LEAVE_GRACE) => {
            tracing::warn!("no checkpoint came within {} s: leaving now", LEAVE_GRACE.as_secs())
        }
    }
    std::process::exit(143);
}

/// Runs the worker until it fails to reach any coordinator for good, gets a fatal error, or
/// leaves on request (SIGTERM).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let session = Arc::new(Session::new(
        config.coordinator.clone(),
        config.token.clone(),
        config.tls_ca.clone(),
    ));
    // Set once the worker is asked to stop (SIGTERM).
    let leave = Arc::new(StopSignal::default());
    tokio::spawn(leave_on_sigterm(leave.clone()));
    loop {
        let registration = register(&session, &config).await?;
        let worker = Worker {
            identity: pb::WorkerIdentity {
                id: registration.worker_id,
                secret: registration.worker_secret,
            },
            lease: Duration::from_millis(registration.lease_ttl_ms as u64),
            session: session.clone(),
            config: config.clone(),
            liveness: Arc::new(Liveness::default()),
            leave: leave.clone(),
        };
        let id = &worker.identity.id;
        config.metrics.registered(id);
        tracing::info!(worker = %id, device = %device_name(config.device), precision = ?config.precision, "registered");
        worker.serve().await?;
        if leave.is_stopped() {
            tracing::info!(worker = %id, "left on request");
            return Ok(());
        }
        tracing::warn!(worker = %id, "lease lost; registering again");
    }
}

/// The leases a worker accepts (the coordinator's `--lease-ttl-ms` takes no others).
const LEASES: std::ops::RangeInclusive<u32> = 1_000..=600_000;

async fn register(session: &Session, config: &Config) -> anyhow::Result<pb::RegisterResponse> {
    let request = pb::RegisterRequest {
        hostname: hostname(),
        device: device_name(config.device),
        name: config.name.clone(),
    };
    let retry = Retry::every(Duration::from_secs(1), Some(Duration::from_secs(600)));
    let answer = session
        .call_retrying(retry, "registering", request, |mut c, r| async move {
            c.register(r).await
        })
        .await;
    match answer {
        Ok(response) if !LEASES.contains(&response.lease_ttl_ms) => anyhow::bail!(
            "the coordinator gave a lease of {} ms: a worker heartbeats every third of its \
             lease, so it takes leases of {} to {} ms only",
            response.lease_ttl_ms,
            LEASES.start(),
            LEASES.end()
        ),
        Ok(response) => Ok(response),
        Err(status) => anyhow::bail!("registering with the coordinator: {}", status.message()),
    }
}

struct Worker {
    identity: pb::WorkerIdentity,
    lease: Duration,
    session: Arc<Session>,
    config: Config,
    liveness: Arc<Liveness>,
    leave: Arc<StopSignal>,
}

/// A job generation this worker took part in.
type Generation = (String, u64);

/// The generation being trained, and how to stop it.
type Running = Arc<std::sync::Mutex<Option<(Generation, Arc<StopSignal>)>>>;

impl Worker {
    /// Serves assignments until the lease is lost.
    async fn serve(&self) -> anyhow::Result<()> {
        let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
        let running: Running = Default::default();
        let heartbeat = tokio::spawn(heartbeat(
            self.session.clone(),
            self.identity.clone(),
            self.lease,
            running.clone(),
            self.liveness.clone(),
            self.leave.clone(),
            lost_tx,
        ));
        let mut ended: Option<Generation> = None;
        let result = loop {
            let request = pb::AwaitAssignmentRequest {
                worker: Some(self.identity.clone()),
                wait_ms: 5_000,
            };
            let assignment = tokio::select! {
                _ = lost.changed() => break Ok(()),
                // Asked to stop between generations (at once when that was earlier).
                _ = self.leave.stopped() => break Ok(()),
                a = self.session.call_retrying(
                    Retry::every(Duration::from_millis(500), None),
                    "awaiting an assignment",
                    request,
                    |mut c, r| async move { c.await_assignment(r).await },
                ) => a,
            };
            let assignment = match assignment {
                Ok(a) if a.job_id.is_empty() => continue,
                Ok(a) => a,
                Err(status) if status.code() == Code::NotFound => break Ok(()),
                Err(status) => {
                    break Err(anyhow::anyhow!(
                        "awaiting an assignment: {}",
                        status.message()
                    ));
                }
            };
            let generation = (assignment.job_id.clone(), assignment.generation);
            if ended.as_ref() == Some(&generation) {
                // Done with it; the coordinator has not moved on yet.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let stop = Arc::new(StopSignal::default());
            *running.lock().expect("running lock") = Some((generation.clone(), stop.clone()));
            if let Err(stuck) = self.run_assignment(assignment, stop).await {
                break Err(stuck.into());
            }
            *running.lock().expect("running lock") = None;
            ended = Some(generation);
            if *lost.borrow() {
                break Ok(());
            }
        };
        heartbeat.abort();
        if self.leave.is_stopped() {
            self.tell_leaving().await;
        }
        result
    }

    /// Makes sure the coordinator heard that this worker leaves (the heartbeat task may have
    /// been stopped with its message in flight), so that it hands it no job meanwhile.
    async fn tell_leaving(&self) {
        let request = pb::HeartbeatRequest {
            worker: Some(self.identity.clone()),
            leaving: true,
            ..Default::default()
        };
        let told = tokio::time::timeout(
            Duration::from_secs(2),
            self.session
                .call(request, |mut c, r| async move { c.heartbeat(r).await }),
        )
        .await;
        // An answer of any kind will do: "unknown worker" means it is gone already.
        if told.is_err() {
            tracing::warn!("the coordinator did not answer; its lease will tell it");
        }
    }

    /// Rendezvous, train, report the end. Every way out leaves the worker ready for the next
    /// assignment but one: a stopped run whose training thread makes no progress for
    /// [`Config::stop_grace`] is stuck, and then the worker must exit.
    async fn run_assignment(
        &self,
        assignment: pb::Assignment,
        stop: Arc<StopSignal>,
    ) -> Result<(), Stuck> {
        let job_id = assignment.job_id.clone();
        let generation = assignment.generation;
        let (rank, world) = (assignment.rank, assignment.world_size);
        tracing::info!(job = %job_id, generation, rank, world, "assigned");
        let (spec, checkpoints, restore_from) = match checked_assignment(&assignment) {
            Ok(checked) => checked,
            Err(why) => {
                self.finish(&job_id, generation, None, Ending::Failed(why))
                    .await;
                return Ok(());
            }
        };
        // Off the async threads: a network file system may take its time.
        let retired = assignment.retired.clone();
        let (root, job) = (spec.checkpoint.dir.clone(), job_id.clone());
        tokio::task::spawn_blocking(move || delete_retired(&retired, &root, &job));
        let (transport, payload) =
            match Transport::open(self.config.device, &self.config.ring_host, rank, world) {
                Ok(opened) => opened,
                Err(why) => {
                    self.finish(&job_id, generation, None, Ending::Failed(why))
                        .await;
                    return Ok(());
                }
            };
        let Some((payloads, ring_key)) = self
            .rendezvous(&job_id, generation, rank, payload, &stop)
            .await
        else {
            tracing::info!(job = %job_id, generation, "generation ended before the rendezvous completed");
            return Ok(());
        };

        let run = Run {
            session: self.session.clone(),
            worker: self.identity.clone(),
            job_id: job_id.clone(),
            generation,
            checkpoint_root: spec.checkpoint.dir.clone(),
        };
        let (events, reports) = ChannelEvents::new(run.clone());
        let checkpoint_now = Arc::new(AtomicBool::new(false));
        let reporter = tokio::spawn(report_progress(
            run,
            reports,
            stop.clone(),
            checkpoint_now.clone(),
            self.config.progress_bar,
            rank == 0,
        ));
        let job = trainer::Assignment {
            job_id: job_id.clone(),
            generation,
            rank,
            world_size: world,
            spec,
            checkpoints,
            restore_from,
        };
        let options = Options {
            device: self.config.device,
            precision: self.config.precision,
            replica_digests: self.config.replica_digests.clone(),
            faults: self.config.faults,
            checkpoint_now,
            instruments: Arc::new(self.config.metrics.begin_run(&job_id, rank)),
            decode_threads: crate::threads::per_worker(),
        };
        let liveness = self.liveness.clone();
        let timeout = self.config.collective_timeout;
        let training_stop = stop.clone();
        let mut training = tokio::task::spawn_blocking(move || {
            let hang_when_stopped = options.faults.hang_when_stopped;
            let result = transport
                .connect(rank, &payloads, generation, &ring_key, timeout)
                .and_then(|collective| {
                    Trainer::new(
                        job,
                        options,
                        collective,
                        Arc::new(events),
                        training_stop,
                        liveness,
                    )
                })
                .and_then(|mut trainer| trainer.run());
            if hang_when_stopped && result.is_err() {
                trainer::hang_for_good("at the end of the run (--inject-hang-when-stopped)");
            }
            result
        });
        let joined = tokio::select! {
            joined = &mut training => joined,
            () = stop.stopped() => tokio::select! {
                joined = &mut training => joined,
                () = self.liveness.still_for(self.config.stop_grace) => {
                    return Err(Stuck(format!(
                        "generation {generation} of {job_id} was stopped ({}) and its training \
                         thread has made no progress for {} s since, nor returned: it is stuck \
                         (in a GPU kernel, the driver or a file system); exiting so that this \
                         worker can be started again",
                        stop.reason().unwrap_or_default(),
                        self.config.stop_grace.as_secs()
                    )));
                }
            },
        };
        let outcome = joined.unwrap_or_else(|e| {
            Err(TrainError::Fatal(format!(
                "the training thread panicked: {e}"
            )))
        });
        let last = reporter.await.ok().flatten();
        match outcome {
            Ok(outcome) => {
                tracing::info!(job = %job_id, graph_builds = outcome.graph_builds, "run finished");
                if rank == 0 {
                    self.finish(&job_id, generation, last, Ending::Finished)
                        .await;
                }
            }
            Err(TrainError::Stopped(why)) => {
                tracing::warn!(job = %job_id, generation, "stopped: {why}")
            }
            Err(TrainError::Collective(e)) => match stop.reason() {
                Some(why) => tracing::warn!(job = %job_id, generation, "stopped: {why}"),
                None => {
                    tracing::warn!(
                        job = %job_id, generation,
                        "collective failed, waiting for the coordinator to end the generation: {e}"
                    );
                    let ending = Ending::CollectiveFailed(e.to_string());
                    self.finish(&job_id, generation, last, ending).await;
                }
            },
            Err(TrainError::BadCheckpoint { id, reason }) => {
                tracing::error!(job = %job_id, checkpoint = %id, "cannot restore: {reason}");
                let ending = Ending::BadCheckpoint { id, reason };
                self.finish(&job_id, generation, last, ending).await;
            }
            Err(TrainError::Fatal(why)) => {
                tracing::error!(job = %job_id, "cannot go on: {why}");
                self.finish(&job_id, generation, last, Ending::Failed(why))
                    .await;
            }
        }
        Ok(())
    }

    /// Publishes `payload` and waits for every rank's; returns them with the generation's ring
    /// key, or `None` when the generation ended.
    async fn rendezvous(
        &self,
        job_id: &str,
        generation: u64,
        rank: u32,
        payload: Vec<u8>,
        stop: &StopSignal,
    ) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
        let request = pb::RendezvousRequest {
            worker: Some(self.identity.clone()),
            job_id: job_id.to_owned(),
            generation,
            rank,
            payload,
            wait_ms: 2_000,
        };
        loop {
            let answer = tokio::select! {
                () = stop.stopped() => return None,
                answer = self.session.call_retrying(
                    Retry::every(Duration::from_millis(500), None),
                    "rendezvous",
                    request.clone(),
                    |mut c, r| async move { c.rendezvous(r).await },
                ) => answer,
            };
            match answer {
                Ok(r) if !r.current => return None,
                Ok(r) if r.complete => return Some((r.payloads, r.ring_key)),
                Ok(_) => {}
                Err(status) => {
                    tracing::warn!("rendezvous refused: {}", status.message());
                    return None;
                }
            }
        }
    }

    /// Tells the coordinator how the run ended (rank 0 on success; any rank on an error),
    /// retrying while it is unreachable.
    async fn finish(&self, job_id: &str, generation: u64, last: Option<Progress>, ending: Ending) {
        let mut request = pb::ReportProgressRequest {
            worker: Some(self.identity.clone()),
            job_id: job_id.to_owned(),
            generation,
            progress: last.as_ref().map(to_pb),
            ..Default::default()
        };
        match ending {
            Ending::Finished => request.finished = true,
            Ending::Failed(why) => request.error = why,
            Ending::BadCheckpoint { id, reason } => {
                request.bad_checkpoint = id;
                request.error = reason;
            }
            Ending::CollectiveFailed(why) => request.collective_error = why,
        }
        let retry = Retry::every(Duration::from_secs(1), Some(Duration::from_secs(600)));
        let answer = self
            .session
            .call_retrying(
                retry,
                "reporting the end of the run",
                request,
                |mut c, r| async move { c.report_progress(r).await },
            )
            .await;
        if let Err(status) = answer {
            tracing::error!("could not report the end of the run: {}", status.message());
        }
    }
}

/// Renews the lease every TTL/3, telling the training thread's liveness. A heartbeat naming
/// another generation than the one running
/// stops it (the coordinator ended it); an unknown worker (lease expired) stops it and ends
/// the registration.
async fn heartbeat(
    session: Arc<Session>,
    worker: pb::WorkerIdentity,
    lease: Duration,
    running: Running,
    liveness: Arc<Liveness>,
    leave: Arc<StopSignal>,
    lost: tokio::sync::watch::Sender<bool>,
) {
    let mut interval = tokio::time::interval(lease / 3);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut told_leaving = false;
    loop {
        // Asked to stop: the coordinator hears it at once, not a third of a lease later.
        tokio::select! {
            _ = interval.tick() => {}
            _ = leave.stopped(), if !told_leaving => {}
        }
        told_leaving = leave.is_stopped();
        let request = pb::HeartbeatRequest {
            worker: Some(worker.clone()),
            activity: liveness.activity(),
            in_collective: liveness.in_collective(),
            leaving: told_leaving,
            data_wait_ratio: liveness.data_wait_share(),
            skipped: liveness.skipped(),
        };
        // The reply tells the assignment as of when the request was handled: it judges only a
        // generation that was running before the request left (one assigned meanwhile, by a
        // long poll that answered first, is not in it yet).
        let sent_during = running
            .lock()
            .expect("running lock")
            .as_ref()
            .map(|(generation, _)| generation.clone());
        let result = session
            .call(request, |mut c, r| async move { c.heartbeat(r).await })
            .await;
        let current = running.lock().expect("running lock").clone();
        match result {
            Ok(reply) => {
                if let Some(((job, generation), stop)) = current
                    && sent_during.as_ref() == Some(&(job.clone(), generation))
                    && (reply.job_id != job || reply.generation != generation)
                {
                    stop.stop(&format!(
                        "the coordinator ended generation {generation} of {job}"
                    ));
                }
            }
            Err(status) if status.code() == Code::NotFound => {
                if let Some((_, stop)) = current {
                    stop.stop("this worker's lease expired");
                }
                let _ = lost.send(true);
                return;
            }
            Err(status) => tracing::warn!("heartbeat failed: {}", status.message()),
        }
    }
}

/// How a run ended, as the coordinator is told.
enum Ending {
    Finished,
    /// The job cannot go on.
    Failed(String),
    /// The checkpoint to restore from is corrupt: the coordinator falls back to the previous.
    BadCheckpoint {
        id: String,
        reason: String,
    },
    /// This rank's collective failed: once every live rank says so, the coordinator ends the
    /// generation.
    CollectiveFailed(String),
}

/// The assignment's spec, the job's checkpoint directory and the checkpoint to restore, each
/// checked: a job id or a checkpoint path that is not `checkpoint.dir/JOB/ID` is refused.
fn checked_assignment(
    assignment: &pb::Assignment,
) -> Result<(JobSpec, PathBuf, Option<trainer::Restore>), String> {
    let job_id = &assignment.job_id;
    let spec = JobSpec::parse(&assignment.spec_toml, &format!("job {job_id}"))
        .map_err(|e| e.to_string())?;
    let root = &spec.checkpoint.dir;
    let checkpoints = location::job_dir(root, job_id).map_err(|e| e.to_string())?;
    let restore_from = match &assignment.restore_from {
        Some(c) if !c.id.is_empty() => {
            let dir = location::checkpoint_dir(root, job_id, &c.id)
                .map_err(|e| format!("refusing to restore: {e}"))?;
            Some(trainer::Restore {
                id: c.id.clone(),
                dir,
            })
        }
        _ => None,
    };
    Ok((spec, checkpoints, restore_from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A spec whose `checkpoint.dir` is `dir/checkpoints`, as the coordinator hands it out.
    fn spec_toml(dir: &Path) -> String {
        let manifest = ladder_testkit::write_dataset(&dir.join("data"), 1, 4, 10);
        let spec = ladder_testkit::write_spec(dir, "job", &manifest, (1, 1));
        JobSpec::load(&spec).unwrap().to_toml()
    }

    #[test]
    fn an_assignment_restores_only_from_its_jobs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let assignment = |restore: pb::CheckpointRef| pb::Assignment {
            job_id: "job-000001".into(),
            generation: 2,
            world_size: 1,
            spec_toml: spec_toml(dir.path()),
            restore_from: Some(restore),
            ..Default::default()
        };
        let ours = ladder_testkit::checkpoint_ref(1, 4);
        let (_, checkpoints, restore) = checked_assignment(&assignment(ours.clone())).unwrap();
        assert_eq!(checkpoints, root.join("job-000001"));
        assert_eq!(restore.unwrap().dir, root.join("job-000001").join(&ours.id));
        let forged = pb::CheckpointRef {
            id: "../../job-000002/step-000000004-g1".into(),
            ..ours.clone()
        };
        let err = checked_assignment(&assignment(forged)).unwrap_err();
        assert!(err.contains("refusing to restore"), "{err}");
        let bad_job = pb::Assignment {
            job_id: "../job-000001".into(),
            ..assignment(ours)
        };
        let err = checked_assignment(&bad_job).unwrap_err();
        assert!(err.contains("not a job id"), "{err}");
    }
}
