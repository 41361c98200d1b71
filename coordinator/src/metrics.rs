//! The coordinator's Prometheus metrics (text exposition format, OpenMetrics flavour, encoded by
//! `prometheus-client`).
//!
//! Two kinds, kept apart:
//! - what the coordinator measures of itself as it works, kept in [`Metrics`]: each gRPC
//!   method's latency (timed by [`RpcTimer`], a tower layer around both services, from the
//!   request's arrival to its answer; a long poll counts its wait) and each store
//!   transaction's;
//! - what it knows of jobs and workers, read from a snapshot at each scrape ([`render`]): per
//!   job (label `job`, its id) its state, stage, image size, epoch, step, samples, loss,
//!   speed, ETA, last evaluation, graph builds, generation, checkpoints and incidents; the
//!   worker pool by state. Nothing is updated on the way, so a scrape costs the training path
//!   nothing, and the numbers are the ones `ladder status` shows.
//!
//! Prometheus renames a scraped `job` label `exported_job` unless the scrape config says
//! `honor_labels: true` (as for a Pushgateway): the README's example says so.

use crate::records::{Incident, JobState};
use crate::view::Snapshot;
use ladder_core::dataset::SKIP_REASONS;
use ladder_proto::v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::{BoxFuture, Service, http};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Jobs that ended longer ago than this leave the metrics (their series would otherwise grow
/// with every job ever run); `ladder list` still shows them.
const ENDED_JOBS_SHOWN_FOR_MS: i64 = 24 * 3600 * 1000;

/// The methods of `ladder.v1.JobService` and `ladder.v1.WorkerService`: a request for any other
/// path is counted as "other", so that nobody can make up label values.
const METHODS: [&str; 14] = [
    "SubmitJob",
    "GetJob",
    "ListJobs",
    "ListWorkers",
    "CancelJob",
    "DeleteJob",
    "ResumeJob",
    "WatchJob",
    "Register",
    "Heartbeat",
    "AwaitAssignment",
    "Rendezvous",
    "ReportProgress",
    "CommitCheckpoint",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobInfoLabels {
    job: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobStateLabels {
    job: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IncidentLabels {
    job: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkipLabels {
    job: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabel {
    state: &'static str,
}

/// 100 µs to about 13 s, by factors of 1.5 (fine enough to tell a p99 of 15 ms from one of
/// 25 ms).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 1.5, 30))
}

/// What the coordinator measures of itself.
pub struct Metrics {
    rpc: Family<MethodLabel, Histogram, fn() -> Histogram>,
    store: Histogram,
    /// TensorBoard notes the writer had no room for (see [`crate::tensorboard::QUEUED_NOTES`]).
    pub tensorboard_dropped: Counter,
    largest_transaction: std::sync::Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rpc: Family::new_with_constructor(latency_histogram),
            store: latency_histogram(),
            tensorboard_dropped: Counter::default(),
            largest_transaction: std::sync::Arc::default(),
        }
    }
}

impl Metrics {
    /// Counts one call of the gRPC method at `path` (`/ladder.v1.WorkerService/Heartbeat`).
    pub fn observe_rpc(&self, path: &str, took: Duration) {
        let name = path.rsplit('/').next().unwrap_or_default();
        let method = METHODS
            .iter()
            .copied()
            .find(|m| *m == name)
            .unwrap_or("other");
        self.rpc
            .get_or_create(&MethodLabel { method })
            .observe(took.as_secs_f64());
    }

    /// Counts one store transaction (written or refused) of `bytes` keys and values.
    pub fn observe_store(&self, took: Duration, bytes: usize) {
        self.store.observe(took.as_secs_f64());
        self.largest_transaction
            .fetch_max(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// The most bytes one store transaction has carried (etcd refuses a request past 1.5 MiB
    /// by default).
    pub fn largest_transaction_bytes(&self) -> u64 {
        self.largest_transaction
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A family of float gauges, one per job, registered under `name`.
struct PerJob {
    family: Family<JobLabel, Gauge<f64, AtomicU64>>,
}

impl PerJob {
    fn new(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> PerJob {
        let family = Family::<JobLabel, Gauge<f64, AtomicU64>>::default();
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
            None => registry.register(name, help, family.clone()),
        }
        PerJob { family }
    }

    fn set(&self, job: &str, value: f64) {
        self.family
            .get_or_create(&JobLabel {
                job: job.to_owned(),
            })
            .set(value);
    }
}

const STATES: [JobState; 6] = [
    JobState::Queued,
    JobState::Rendezvous,
    JobState::Running,
    JobState::Completed,
    JobState::Failed,
    JobState::Cancelled,
];

/// The metrics text for a scrape: `metrics`, and the jobs and workers `shown` at `now_ms`
/// (wall clock, as checkpoints' commit times are).
pub fn render(metrics: &Metrics, shown: &Snapshot, now_ms: i64) -> String {
    let mut registry = Registry::with_prefix("ladder");
    {
        let own = registry.sub_registry_with_prefix("coordinator");
        own.register_with_unit(
            "rpc_duration",
            "Latency of the coordinator's gRPC methods, from a request's arrival to its answer",
            Unit::Seconds,
            metrics.rpc.clone(),
        );
        own.register_with_unit(
            "store_transaction_duration",
            "Latency of the coordinator's store transactions (redb or etcd)",
            Unit::Seconds,
            metrics.store.clone(),
        );
        let largest = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        largest.set(metrics.largest_transaction_bytes() as i64);
        own.register_with_unit(
            "store_transaction_largest",
            "The most bytes (keys and values) one store transaction has carried",
            Unit::Bytes,
            largest,
        );
        own.register(
            "tensorboard_notes_dropped",
            "TensorBoard scalars not written because the writer's queue was full (a slow \
             checkpoint file system)",
            metrics.tensorboard_dropped.clone(),
        );
    }

    let info = Family::<JobInfoLabels, Gauge>::default();
    registry.register("job_info", "A job's name (always 1)", info.clone());
    let states = Family::<JobStateLabels, Gauge>::default();
    registry.register(
        "job_state",
        "1 for the state the job is in, 0 for the others",
        states.clone(),
    );
    let incidents = Family::<IncidentLabels, Counter>::default();
    registry.register(
        "job_incidents",
        "Incidents so far, by kind: workers lost, stalled or gone on request, collectives \
         failed, checkpoints unusable or not written, workers failed",
        incidents.clone(),
    );
    let skips = Family::<SkipLabels, Counter>::default();
    registry.register(
        "job_samples_skipped",
        "Samples the job's workers skipped while it trained, by reason (unreadable, empty, \
         undecodable, label_out_of_range), as their heartbeats tell (since the coordinator \
         started)",
        skips.clone(),
    );
    let committed = Family::<JobLabel, Counter>::default();
    registry.register(
        "job_checkpoints_committed",
        "Checkpoints committed so far (retired ones included)",
        committed.clone(),
    );
    let mut per_job =
        |name: &str, help: &str, unit: Option<Unit>| PerJob::new(&mut registry, name, help, unit);
    let stage = per_job("job_stage", "The stage trained now (1-based)", None);
    let stages = per_job("job_stages", "Stages in the job's plan", None);
    let image_size = per_job(
        "job_image_size",
        "Training image size now (the side of the square)",
        Some(Unit::Other("pixels".into())),
    );
    let epoch = per_job("job_epoch", "The epoch trained now (1-based)", None);
    let epochs = per_job("job_epochs", "Epochs in the job's plan", None);
    let step = per_job(
        "job_step",
        "Global steps done since the start of the run",
        None,
    );
    let samples = per_job(
        "job_samples_trained",
        "Samples trained since the start of the run (steps times the global batch; goes back \
         with a restore)",
        None,
    );
    let skipped = per_job(
        "job_samples_skipped_committed",
        "Samples skipped in the job's committed history (what its checkpoints trained)",
        None,
    );
    let loss = per_job(
        "job_loss",
        "Training loss, the mean over the steps of the last report, across ranks",
        None,
    );
    let speed = per_job(
        "job_images_per_second",
        "Training images per second, all ranks together",
        None,
    );
    let eta = per_job(
        "job_eta",
        "Time to the end of the run at the current speed",
        Some(Unit::Seconds),
    );
    let top1 = per_job(
        "job_eval_top1",
        "Top-1 accuracy of the latest evaluation (EMA weights, held-out split)",
        Some(Unit::Other("ratio".into())),
    );
    let top5 = per_job(
        "job_eval_top5",
        "Top-5 accuracy of the latest evaluation",
        Some(Unit::Other("ratio".into())),
    );
    let eval_epoch = per_job(
        "job_eval_epoch",
        "The epoch after which the latest evaluation ran (0: none yet)",
        None,
    );
    let graph_builds = per_job(
        "job_graph_builds",
        "Shape-specialized preparations in this generation (one per image size and \
         micro-batch shape)",
        None,
    );
    let generation = per_job(
        "job_generation",
        "The job's generation (a new one at each start on a new set of workers)",
        None,
    );
    let ranks = per_job("job_workers", "Workers in the current generation", None);
    let checkpoint_age = per_job(
        "job_last_checkpoint_age",
        "Time since the newest committed checkpoint (absent before the first)",
        Some(Unit::Seconds),
    );

    for job in shown.jobs.values() {
        let job_state = pb::JobState::of(job.state);
        if job_state.is_terminal() && now_ms - job.updated_at_ms > ENDED_JOBS_SHOWN_FOR_MS {
            continue;
        }
        let id = job.id.as_str();
        info.get_or_create(&JobInfoLabels {
            job: id.to_owned(),
            name: job.name.clone(),
        })
        .set(1);
        for state in STATES {
            states
                .get_or_create(&JobStateLabels {
                    job: id.to_owned(),
                    state: state.name(),
                })
                .set(i64::from(state == job_state));
        }
        for kind in Incident::ALL {
            let count = job.incidents.get(kind.name()).copied().unwrap_or(0);
            incidents
                .get_or_create(&IncidentLabels {
                    job: id.to_owned(),
                    kind: kind.name(),
                })
                .inc_by(count);
        }
        committed
            .get_or_create(&JobLabel { job: id.to_owned() })
            .inc_by(job.checkpoints_committed);
        for reason in SKIP_REASONS.iter() {
            let count = job.skipped.get(*reason).copied().unwrap_or(0);
            skips
                .get_or_create(&SkipLabels {
                    job: id.to_owned(),
                    reason,
                })
                .inc_by(count);
        }
        let p = &job.progress.unwrap_or_default();
        stage.set(id, f64::from(p.stage.saturating_add(1)));
        stages.set(id, f64::from(job.stage_count));
        image_size.set(id, f64::from(p.image_size));
        epoch.set(id, f64::from(p.epoch.saturating_add(1)));
        epochs.set(id, f64::from(job.epochs));
        step.set(id, p.global_step as f64);
        if job.global_batch > 0 {
            samples.set(id, p.global_step as f64 * f64::from(job.global_batch));
        }
        skipped.set(
            id,
            job.trained
                .iter()
                .fold(0u64, |sum, t| sum.saturating_add(t.skipped)) as f64,
        );
        loss.set(id, f64::from(p.loss));
        speed.set(id, f64::from(p.images_per_second));
        eta.set(id, f64::from(p.eta_seconds));
        eval_epoch.set(id, f64::from(p.eval_epoch));
        if p.eval_epoch > 0 {
            top1.set(id, f64::from(p.eval_top1));
            top5.set(id, f64::from(p.eval_top5));
        }
        graph_builds.set(id, f64::from(p.graph_builds));
        generation.set(id, job.generation as f64);
        ranks.set(id, job.workers.len() as f64);
        if let Some(newest) = job.checkpoints.iter().map(|c| c.committed_at_ms).max() {
            checkpoint_age.set(id, (now_ms - newest).max(0) as f64 / 1e3);
        }
    }

    let pool = Family::<WorkerStateLabel, Gauge>::default();
    registry.register(
        "workers",
        "Registered workers by state: idle, training (assigned to a job), leaving (asked to \
         stop), not_heard_from (known from the store, silent since the coordinator started)",
        pool.clone(),
    );
    for state in ["idle", "training", "leaving", "not_heard_from"] {
        pool.get_or_create(&WorkerStateLabel { state }).set(0);
    }
    for w in &shown.workers {
        let state = match w {
            w if !w.heard_from => "not_heard_from",
            w if w.leaving => "leaving",
            w if !w.job_id.is_empty() => "training",
            _ => "idle",
        };
        pool.get_or_create(&WorkerStateLabel { state }).inc();
    }

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// A tower layer timing every gRPC call into [`Metrics::observe_rpc`].
#[derive(Clone)]
pub struct RpcTimerLayer(pub std::sync::Arc<Metrics>);

impl<S> tower::Layer<S> for RpcTimerLayer {
    type Service = RpcTimer<S>;

    fn layer(&self, inner: S) -> RpcTimer<S> {
        RpcTimer {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcTimer<S> {
    inner: S,
    metrics: std::sync::Arc<Metrics>,
}

impl<S, B> Service<http::Request<B>> for RpcTimer<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let arrived = Instant::now();
        let path = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            metrics.observe_rpc(&path, arrived.elapsed());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_counted_as_other_and_names_follow_the_conventions() {
        let metrics = Metrics::default();
        metrics.observe_rpc(
            "/ladder.v1.WorkerService/Heartbeat",
            Duration::from_millis(2),
        );
        metrics.observe_rpc("/made.up/Anything", Duration::from_millis(1));
        metrics.observe_store(Duration::from_millis(3), 2048);
        let text = render(&metrics, &Snapshot::default(), 0);
        assert!(
            text.contains("ladder_coordinator_rpc_duration_seconds_count{method=\"Heartbeat\"} 1"),
            "{text}"
        );
        assert!(text.contains("{method=\"other\"} 1"), "{text}");
        assert!(!text.contains("Anything"), "{text}");
        assert!(
            text.contains("ladder_coordinator_store_transaction_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("ladder_workers{state=\"idle\"} 0"), "{text}");
        assert!(
            text.contains("ladder_coordinator_store_transaction_largest_bytes 2048"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
