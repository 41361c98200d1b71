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

use crate::checkpoint::Manifest;
use crate::metrics::WorkerMetrics;
use crate::precision::Precision;
use crate::report::{Commit, Events, Liveness, Progress, StopSignal};
use crate::trainer::{self, Faults, Options, TrainError, Trainer};
use ladder_collective::Collective;
use ladder_collective::nccl::{self, NcclCommunicator};
use ladder_collective::ring::TcpRing;
use ladder_core::location;
use ladder_core::spec::JobSpec;
use ladder_proto::client::{self, Authed};
use ladder_proto::v1 as pb;
use pb::worker_service_client::WorkerServiceClient;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::Device;
use tokio::sync::{Mutex, mpsc};
use tonic::{Code, Status};

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
    pub bucket_elements: i64,
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

/// A connection to whichever coordinator answers, re-established after transport failures.
struct Coordinator {
    config: Config,
    client: Mutex<Option<WorkerServiceClient<Authed>>>,
}

impl Coordinator {
    async fn client(&self) -> Result<WorkerServiceClient<Authed>, Status> {
        let mut slot = self.client.lock().await;
        if let Some(client) = &*slot {
            return Ok(client.clone());
        }
        let channel = client::connect(
            &self.config.coordinator,
            &self.config.token,
            "set LADDER_WORKER_TOKEN or pass --token (the coordinator's worker token)",
            self.config.tls_ca.as_deref(),
        )
        .await
        .map_err(|e| match e {
            client::ConnectError::Unreachable(m) => Status::unavailable(m),
            other => Status::invalid_argument(other.to_string()),
        })?;
        let client = WorkerServiceClient::new(channel);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the connection after a transport failure, so the next call tries every URL.
    async fn failed(&self, status: &Status) {
        if matches!(status.code(), Code::Unavailable | Code::Unknown) {
            *self.client.lock().await = None;
        }
    }
}

/// Calls `$method` with `$request` on the coordinator, forgetting a broken connection.
macro_rules! rpc {
    ($coordinator:expr, $method:ident, $request:expr) => {{
        let coordinator = &$coordinator;
        let result = match coordinator.client().await {
            Ok(mut client) => client.$method($request).await.map(|r| r.into_inner()),
            Err(status) => Err(status),
        };
        if let Err(status) = &result {
            coordinator.failed(status).await;
        }
        result
    }};
}

/// Failures worth retrying: the coordinator is restarting, failing over or briefly overloaded.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Internal
    )
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
    let coordinator = Arc::new(Coordinator {
        config: config.clone(),
        client: Mutex::new(None),
    });
    // Set once the worker is asked to stop (SIGTERM).
    let leave = Arc::new(StopSignal::default());
    tokio::spawn(leave_on_sigterm(leave.clone()));
    loop {
        let registration = register(&coordinator).await?;
        let worker = Worker {
            identity: pb::WorkerIdentity {
                id: registration.worker_id,
                secret: registration.worker_secret,
            },
            lease: Duration::from_millis(registration.lease_ttl_ms as u64),
            coordinator: coordinator.clone(),
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

async fn register(coordinator: &Coordinator) -> anyhow::Result<pb::RegisterResponse> {
    let request = pb::RegisterRequest {
        hostname: hostname(),
        device: device_name(coordinator.config.device),
        name: coordinator.config.name.clone(),
    };
    let started = Instant::now();
    loop {
        match rpc!(coordinator, register, request.clone()) {
            Ok(response) if !LEASES.contains(&response.lease_ttl_ms) => anyhow::bail!(
                "the coordinator gave a lease of {} ms: a worker heartbeats every third of its \
                 lease, so it takes leases of {} to {} ms only",
                response.lease_ttl_ms,
                LEASES.start(),
                LEASES.end()
            ),
            Ok(response) => return Ok(response),
            Err(status) if transient(&status) && started.elapsed() < Duration::from_secs(600) => {
                tracing::warn!("cannot register yet: {}", status.message());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(status) => anyhow::bail!("registering with the coordinator: {}", status.message()),
        }
    }
}

struct Worker {
    identity: pb::WorkerIdentity,
    lease: Duration,
    coordinator: Arc<Coordinator>,
    config: Config,
    liveness: Arc<Liveness>,
    leave: Arc<StopSignal>,
}

/// A job generation this worker took part in.
type Generation = (String, u64);

/// The generation being trained, and how to stop it.
type Running = Arc<std::sync::Mutex<Option<(Generation, Arc<StopSignal>)>>>;

/// One generation of one job as this worker takes part in it.
#[derive(Clone)]
struct Run {
    coordinator: Arc<Coordinator>,
    worker: pb::WorkerIdentity,
    job_id: String,
    generation: u64,
    /// The spec's `checkpoint.dir`: retired checkpoints are deleted only inside its
    /// `JOB` directory.
    checkpoint_root: PathBuf,
}

impl Worker {
    /// Serves assignments until the lease is lost.
    async fn serve(&self) -> anyhow::Result<()> {
        let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
        let running: Running = Default::default();
        let heartbeat = tokio::spawn(heartbeat(
            self.coordinator.clone(),
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
                a = async { rpc!(self.coordinator, await_assignment, request) } => a,
            };
            let assignment = match assignment {
                Ok(a) if a.job_id.is_empty() => continue,
                Ok(a) => a,
                Err(status) if status.code() == Code::NotFound => break Ok(()),
                Err(status) if transient(&status) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
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
        let told = tokio::time::timeout(Duration::from_secs(2), async {
            rpc!(self.coordinator, heartbeat, request)
        })
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
        let (transport, payload) = match Transport::open(&self.config, rank) {
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
            coordinator: self.coordinator.clone(),
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
            bucket_elements: self.config.bucket_elements,
            replica_digests: self.config.replica_digests.clone(),
            faults: self.config.faults,
            checkpoint_now,
            metrics: Arc::new(self.config.metrics.begin_run(&job_id, rank)),
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
        loop {
            if stop.is_stopped() {
                return None;
            }
            let request = pb::RendezvousRequest {
                worker: Some(self.identity.clone()),
                job_id: job_id.to_owned(),
                generation,
                rank,
                payload: payload.clone(),
                wait_ms: 2_000,
            };
            match rpc!(self.coordinator, rendezvous, request) {
                Ok(r) if !r.current => return None,
                Ok(r) if r.complete => return Some((r.payloads, r.ring_key)),
                Ok(_) => {}
                Err(status) if transient(&status) => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
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
        let started = Instant::now();
        loop {
            match rpc!(self.coordinator, report_progress, request.clone()) {
                Ok(_) => return,
                Err(status)
                    if transient(&status) && started.elapsed() < Duration::from_secs(600) =>
                {
                    tokio::time::sleep(Duration::from_secs(1)).await
                }
                Err(status) => {
                    tracing::error!("could not report the end of the run: {}", status.message());
                    return;
                }
            }
        }
    }
}

/// Renews the lease every TTL/3, telling the training thread's liveness. A heartbeat naming
/// another generation than the one running
/// stops it (the coordinator ended it); an unknown worker (lease expired) stops it and ends
/// the registration.
async fn heartbeat(
    coordinator: Arc<Coordinator>,
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
        };
        // The reply tells the assignment as of when the request was handled: it judges only a
        // generation that was running before the request left (one assigned meanwhile, by a
        // long poll that answered first, is not in it yet).
        let sent_during = running
            .lock()
            .expect("running lock")
            .as_ref()
            .map(|(generation, _)| generation.clone());
        let result = rpc!(coordinator, heartbeat, request);
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

/// How the ranks of a generation reach each other: the TCP ring on CPU, NCCL on CUDA.
enum Transport {
    /// This rank's ring listener, bound before its address is published.
    Ring(TcpListener),
    Nccl {
        device: i32,
    },
}

impl Transport {
    /// Prepares this rank's side and what it publishes in the rendezvous: its ring address,
    /// or (rank 0 on CUDA) the NCCL unique id.
    fn open(config: &Config, rank: u32) -> Result<(Transport, Vec<u8>), String> {
        match config.device {
            Device::Cuda(device) => {
                let payload = if rank == 0 {
                    nccl::unique_id().map_err(|e| e.to_string())?.to_vec()
                } else {
                    Vec::new()
                };
                Ok((
                    Transport::Nccl {
                        device: device as i32,
                    },
                    payload,
                ))
            }
            _ => {
                let listener = TcpListener::bind((config.ring_host.as_str(), 0))
                    .map_err(|e| format!("cannot listen on {}: {e}", config.ring_host))?;
                let address = listener
                    .local_addr()
                    .map_err(|e| format!("the ring listener has no address: {e}"))?;
                Ok((Transport::Ring(listener), address.to_string().into_bytes()))
            }
        }
    }

    /// Joins the generation's collective from every rank's published payload.
    fn connect(
        self,
        rank: u32,
        payloads: &[Vec<u8>],
        generation: u64,
        ring_key: &[u8],
        timeout: Duration,
    ) -> Result<Box<dyn Collective>, TrainError> {
        let world = payloads.len() as u32;
        Ok(match self {
            Transport::Ring(listener) => {
                let addresses = payloads
                    .iter()
                    .enumerate()
                    .map(|(r, p)| {
                        String::from_utf8_lossy(p)
                            .parse::<SocketAddr>()
                            .map_err(|e| {
                                TrainError::Fatal(format!(
                                    "rank {r} published an unusable ring address {p:?}: {e}"
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Box::new(TcpRing::connect(
                    rank, listener, &addresses, generation, ring_key, timeout,
                )?)
            }
            Transport::Nccl { device } => Box::new(NcclCommunicator::init(
                rank,
                world,
                &payloads[0],
                device,
                timeout,
            )?),
        })
    }
}

fn to_pb(p: &Progress) -> pb::Progress {
    let evaluation = p.evaluation.unwrap_or(crate::report::Evaluation {
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
        images_per_second: p.images_per_second as f32,
        image_size: p.image_size,
        graph_builds: p.graph_builds,
        eta_seconds: p.eta_seconds as f32,
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

enum Report {
    Progress(Progress, bool),
}

/// [`Events`] over channels to the async side: progress goes to the reporter task; a commit
/// blocks the checkpoint writer's thread until the coordinator answers.
struct ChannelEvents {
    reports: mpsc::UnboundedSender<Report>,
    run: Run,
    runtime: tokio::runtime::Handle,
}

impl ChannelEvents {
    fn new(run: Run) -> (ChannelEvents, mpsc::UnboundedReceiver<Report>) {
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
        if let Err(status) = self
            .runtime
            .block_on(async { rpc!(run.coordinator, report_progress, request) })
        {
            tracing::warn!(
                "the failed checkpoint was not reported: {}",
                status.message()
            );
        }
    }

    fn commit(&self, manifest: &Manifest, dir: &Path) -> Commit {
        let run = &self.run;
        let request = pb::CommitCheckpointRequest {
            worker: Some(run.worker.clone()),
            job_id: run.job_id.clone(),
            generation: run.generation,
            checkpoint: Some(pb::CheckpointRef {
                id: manifest.id.clone(),
                path: dir.display().to_string(),
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
                    samples: t.samples,
                    digest: t.digest,
                    skipped: t.skipped,
                })
                .collect(),
        };
        self.runtime.block_on(async {
            let mut pause = Duration::from_millis(200);
            loop {
                match rpc!(run.coordinator, commit_checkpoint, request.clone()) {
                    Ok(reply) if reply.accepted => {
                        tracing::info!(checkpoint = %manifest.id, "checkpoint committed");
                        delete_retired(&reply.retired, &run.checkpoint_root, &run.job_id);
                        return Commit::Committed;
                    }
                    Ok(reply) => return Commit::Refused(reply.reason),
                    Err(status) if transient(&status) => {
                        tracing::warn!(checkpoint = %manifest.id, "coordinator unreachable, commit retried: {}", status.message());
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(status) => return Commit::Unknown(status.message().to_owned()),
                }
            }
        })
    }
}

/// Deletes checkpoints retention retired. It dropped them from the job's record first, so
/// deleting them can never lose the last good checkpoint, even if this process dies half-way:
/// what is left is merely unreferenced, and the next generation's rank 0 is told to delete it
/// again. Only directories of `job_id` under `root` (the spec's `checkpoint.dir`) are deleted:
/// whoever else a path names, this worker refuses.
fn delete_retired(retired: &[pb::CheckpointRef], root: &Path, job_id: &str) {
    for old in retired {
        let dir = match location::check_checkpoint_path(root, job_id, &old.id, &old.path) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::error!("refusing to delete a retired checkpoint: {e}");
                continue;
            }
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => tracing::info!(checkpoint = %old.id, "retired checkpoint deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(checkpoint = %old.id, "cannot delete retired checkpoint {}: {e}", dir.display())
            }
        }
    }
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
        Some(c) if !c.path.is_empty() => {
            let dir = location::check_checkpoint_path(root, job_id, &c.id, &c.path)
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

/// Shows progress here and, from rank 0, sends it to the coordinator at most once a second (at
/// once when urgent); stops the run if the coordinator says the generation is over. Returns the last
/// progress once the trainer is done.
async fn report_progress(
    run: Run,
    mut reports: mpsc::UnboundedReceiver<Report>,
    stop: Arc<StopSignal>,
    checkpoint_now: Arc<AtomicBool>,
    progress_bar: bool,
    send: bool,
) -> Option<Progress> {
    let Run {
        coordinator,
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
        match rpc!(coordinator, report_progress, request) {
            Ok(reply) if !reply.current => stop.stop(&format!(
                "generation {generation} of {job_id} is no longer current"
            )),
            Ok(reply) if reply.checkpoint_now => {
                checkpoint_now.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(status) => tracing::debug!("progress not reported: {}", status.message()),
        }
    }
    display.finish();
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec whose `checkpoint.dir` is `dir/checkpoints`, as the coordinator hands it out.
    fn spec_toml(dir: &Path) -> String {
        let manifest = ladder_testkit::write_dataset(&dir.join("data"), 1, 4, 10);
        let spec = ladder_testkit::write_spec(dir, "job", &manifest, (1, 1));
        JobSpec::load(&spec).unwrap().to_toml()
    }

    #[test]
    fn retired_checkpoints_are_deleted_only_inside_their_jobs_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("checkpoints");
        let job = "job-000001";
        let ours = ladder_testkit::checkpoint_ref(&root, job, 1, 4);
        let precious = dir.path().join("home");
        let other_job = ladder_testkit::checkpoint_ref(&root, "job-000002", 1, 4);
        for d in [Path::new(&ours.path), &precious, Path::new(&other_job.path)] {
            std::fs::create_dir_all(d).unwrap();
        }
        let forged = [
            pb::CheckpointRef {
                path: precious.display().to_string(),
                ..ours.clone()
            },
            pb::CheckpointRef {
                id: "../../home".into(),
                path: precious.display().to_string(),
                ..ours.clone()
            },
            other_job.clone(),
        ];
        delete_retired(&forged, &root, job);
        assert!(precious.is_dir() && Path::new(&other_job.path).is_dir());
        delete_retired(std::slice::from_ref(&ours), &root, job);
        assert!(!Path::new(&ours.path).exists());
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
        let ours = ladder_testkit::checkpoint_ref(&root, "job-000001", 1, 4);
        let (_, checkpoints, restore) = checked_assignment(&assignment(ours.clone())).unwrap();
        assert_eq!(checkpoints, root.join("job-000001"));
        assert_eq!(restore.unwrap().dir, Path::new(&ours.path));
        let theirs = ladder_testkit::checkpoint_ref(&root, "job-000002", 1, 4);
        let err = checked_assignment(&assignment(theirs)).unwrap_err();
        assert!(err.contains("refusing to restore"), "{err}");
        let bad_job = pb::Assignment {
            job_id: "../job-000001".into(),
            ..assignment(ours)
        };
        let err = checked_assignment(&bad_job).unwrap_err();
        assert!(err.contains("not a job id"), "{err}");
    }
}
