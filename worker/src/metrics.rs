//! The worker's Prometheus metrics, served at `/metrics` by `--metrics-listen`.
//!
//! Every series of a run carries the labels `job`, `rank` and `worker`; a new run (a new
//! generation, another job) replaces the last one's series. The training loop records into the
//! [`RunMetrics`] it holds, its [`Instruments`]: a step costs a handful of atomic additions and no host-device
//! wait (on CUDA the parts are the host's view: a part that queues GPU work ends when it is
//! queued, and the GPU's time shows in the part that first waits for it, the allreduce).
//! Process memory (and on CUDA the device's) is read at each scrape.

use ladder_core::dataset::SKIP_REASONS;
use ladder_train::events::{Instruments, StepParts};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The `Content-Type` of [`WorkerMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    job: String,
    rank: u32,
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabels {
    job: String,
    rank: u32,
    worker: String,
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    job: String,
    rank: u32,
    worker: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The series of one run, held by its training loop.
pub struct RunMetrics {
    step: Histogram,
    parts: [FloatCounter; 4],
    data_wait_share: FloatGauge,
    skipped: [Counter; 4],
    data_reads: Counter,
    data_read_bytes: Counter,
    uploaded_bytes: Counter,
    snapshot_blocked: Histogram,
    write: Histogram,
    written_bytes: Counter,
}

impl std::fmt::Debug for RunMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunMetrics").finish_non_exhaustive()
    }
}

impl Instruments for RunMetrics {
    fn step(&self, parts: &StepParts, data_wait_share: f64) {
        self.step.observe(parts.total().as_secs_f64());
        for (counter, seconds) in self.parts.iter().zip(parts.seconds()) {
            counter.inc_by(seconds);
        }
        self.data_wait_share.set(data_wait_share);
    }

    fn skipped(&self, reason: &str) {
        if let Some(i) = SKIP_REASONS.iter().position(|r| *r == reason) {
            self.skipped[i].inc();
        }
    }

    fn read(&self, calls: u64, bytes: u64) {
        self.data_reads.inc_by(calls);
        self.data_read_bytes.inc_by(bytes);
    }

    fn uploaded(&self, bytes: u64) {
        self.uploaded_bytes.inc_by(bytes);
    }

    fn snapshot(&self, blocked: Duration) {
        self.snapshot_blocked.observe(blocked.as_secs_f64());
    }

    fn written(&self, took: Duration, bytes: u64) {
        self.write.observe(took.as_secs_f64());
        self.written_bytes.inc_by(bytes);
    }
}

/// Every series the worker serves, and the registry they are encoded from.
pub struct WorkerMetrics {
    registry: Registry,
    step: Family<RunLabels, Histogram, fn() -> Histogram>,
    parts: Family<PartLabels, FloatCounter>,
    data_wait_share: Family<RunLabels, FloatGauge>,
    skipped: Family<ReasonLabels, Counter>,
    data_reads: Family<RunLabels, Counter>,
    data_read_bytes: Family<RunLabels, Counter>,
    uploaded_bytes: Family<RunLabels, Counter>,
    snapshot_blocked: Family<RunLabels, Histogram, fn() -> Histogram>,
    write: Family<RunLabels, Histogram, fn() -> Histogram>,
    written_bytes: Family<RunLabels, Counter>,
    resident: Family<WorkerLabel, Gauge>,
    device_memory: Family<WorkerLabel, Gauge>,
    /// The worker's id (empty before it registers), and its CUDA device.
    worker: Mutex<String>,
    cuda: Option<usize>,
}

/// 1 ms to about 65 s, doubling.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// The worker's metrics; `cuda` is its device's ordinal when it trains on one.
    pub fn new(cuda: Option<usize>) -> Arc<WorkerMetrics> {
        let mut registry = Registry::with_prefix("ladder_worker");
        let step = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "step_duration",
            "Training step time (from the end of the last step)",
            Unit::Seconds,
            step.clone(),
        );
        let parts = Family::<PartLabels, FloatCounter>::default();
        registry.register_with_unit(
            "step_part",
            "Time spent in each part of the training steps: data_wait (for the loader), \
             compute (forward and backward), allreduce, optimizer",
            Unit::Seconds,
            parts.clone(),
        );
        let data_wait_share = Family::<RunLabels, FloatGauge>::default();
        registry.register_with_unit(
            "data_wait",
            "Share of the recent steps' time spent waiting for data (smoothed)",
            Unit::Other("ratio".into()),
            data_wait_share.clone(),
        );
        let skipped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "samples_skipped",
            "Samples this rank skipped, by reason: unreadable, empty, undecodable, \
             label_out_of_range",
            skipped.clone(),
        );
        let data_reads = Family::<RunLabels, Counter>::default();
        registry.register(
            "data_reads",
            "Read calls to the dataset's shards (neighbouring samples share one)",
            data_reads.clone(),
        );
        let data_read_bytes = Family::<RunLabels, Counter>::default();
        registry.register_with_unit(
            "data_read",
            "Bytes read from the dataset's shards",
            Unit::Bytes,
            data_read_bytes.clone(),
        );
        let uploaded_bytes = Family::<RunLabels, Counter>::default();
        registry.register_with_unit(
            "uploaded",
            "Bytes of micro-batch images sent to the device (uint8 pixels, normalized there)",
            Unit::Bytes,
            uploaded_bytes.clone(),
        );
        let snapshot_blocked = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "checkpoint_snapshot",
            "How long each checkpoint held training up (the snapshot of the state)",
            Unit::Seconds,
            snapshot_blocked.clone(),
        );
        let write = Family::new_with_constructor(seconds_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "checkpoint_write",
            "How long each checkpoint took to write in the background",
            Unit::Seconds,
            write.clone(),
        );
        let written_bytes = Family::<RunLabels, Counter>::default();
        registry.register_with_unit(
            "checkpoint_written",
            "Checkpoint bytes written",
            Unit::Bytes,
            written_bytes.clone(),
        );
        let resident = Family::<WorkerLabel, Gauge>::default();
        registry.register_with_unit(
            "resident_memory",
            "The worker process's resident memory",
            Unit::Bytes,
            resident.clone(),
        );
        let device_memory = Family::<WorkerLabel, Gauge>::default();
        if cuda.is_some() {
            registry.register_with_unit(
                "cuda_memory_used",
                "Memory in use on the worker's CUDA device (all processes)",
                Unit::Bytes,
                device_memory.clone(),
            );
        }
        Arc::new(WorkerMetrics {
            registry,
            step,
            parts,
            data_wait_share,
            skipped,
            data_reads,
            data_read_bytes,
            uploaded_bytes,
            snapshot_blocked,
            write,
            written_bytes,
            resident,
            device_memory,
            worker: Mutex::new(String::new()),
            cuda,
        })
    }

    /// The worker registered as `id`.
    pub fn registered(&self, id: &str) {
        *self.worker.lock().unwrap_or_else(|e| e.into_inner()) = id.to_owned();
        self.resident.clear();
        self.device_memory.clear();
    }

    /// A run of rank `rank` of `job` begins: the last run's series go.
    pub fn begin_run(&self, job: &str, rank: u32) -> RunMetrics {
        let worker = self
            .worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.step.clear();
        self.parts.clear();
        self.data_wait_share.clear();
        self.skipped.clear();
        self.data_reads.clear();
        self.data_read_bytes.clear();
        self.uploaded_bytes.clear();
        self.snapshot_blocked.clear();
        self.write.clear();
        self.written_bytes.clear();
        let run = RunLabels {
            job: job.to_owned(),
            rank,
            worker,
        };
        let part = |part: &'static str| {
            self.parts.get_or_create_owned(&PartLabels {
                job: run.job.clone(),
                rank,
                worker: run.worker.clone(),
                part,
            })
        };
        let skipped = |reason: &'static str| {
            self.skipped.get_or_create_owned(&ReasonLabels {
                job: run.job.clone(),
                rank,
                worker: run.worker.clone(),
                reason,
            })
        };
        RunMetrics {
            step: self.step.get_or_create_owned(&run),
            parts: StepParts::NAMES.map(part),
            data_wait_share: self.data_wait_share.get_or_create_owned(&run),
            skipped: SKIP_REASONS.map(skipped),
            data_reads: self.data_reads.get_or_create_owned(&run),
            data_read_bytes: self.data_read_bytes.get_or_create_owned(&run),
            uploaded_bytes: self.uploaded_bytes.get_or_create_owned(&run),
            snapshot_blocked: self.snapshot_blocked.get_or_create_owned(&run),
            write: self.write.get_or_create_owned(&run),
            written_bytes: self.written_bytes.get_or_create_owned(&run),
        }
    }

    /// The metrics text for a scrape.
    pub fn render(&self) -> String {
        let worker = WorkerLabel {
            worker: self
                .worker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        if let Some(bytes) = resident_bytes() {
            self.resident.get_or_create(&worker).set(bytes as i64);
        }
        if let Some(used) = self.cuda.and_then(crate::cuda_memory::used_bytes) {
            self.device_memory.get_or_create(&worker).set(used as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// This process's resident memory, from `/proc/self/statm`.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Serves `/metrics` on `listener` for the life of the process.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<WorkerMetrics>) {
    use axum::http::header;
    use axum::routing::get;
    let router = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()) }
        }),
    );
    if let Err(e) = axum::serve(listener, router).await {
        tracing::warn!("the metrics server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_labelled_and_replaces_the_last_ones_series() {
        let metrics = WorkerMetrics::new(None);
        metrics.registered("w-000007");
        let run = metrics.begin_run("job-000001", 1);
        run.step(
            &StepParts {
                data_wait: Duration::from_millis(250),
                compute: Duration::from_millis(500),
                allreduce: Duration::from_millis(200),
                optimizer: Duration::from_millis(50),
            },
            0.25,
        );
        run.skipped("undecodable");
        run.written(Duration::from_secs(2), 1 << 20);
        run.read(3, 300_000);
        run.uploaded(49_152);
        let text = metrics.render();
        let run_labels = "job=\"job-000001\",rank=\"1\",worker=\"w-000007\"";
        for line in [
            format!("ladder_worker_step_duration_seconds_count{{{run_labels}}} 1"),
            format!(
                "ladder_worker_step_part_seconds_total{{{run_labels},part=\"data_wait\"}} 0.25"
            ),
            format!("ladder_worker_data_wait_ratio{{{run_labels}}} 0.25"),
            format!("ladder_worker_samples_skipped_total{{{run_labels},reason=\"undecodable\"}} 1"),
            format!("ladder_worker_checkpoint_written_bytes_total{{{run_labels}}} 1048576"),
            format!("ladder_worker_data_reads_total{{{run_labels}}} 3"),
            format!("ladder_worker_data_read_bytes_total{{{run_labels}}} 300000"),
            format!("ladder_worker_uploaded_bytes_total{{{run_labels}}} 49152"),
        ] {
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(text.contains("ladder_worker_resident_memory_bytes{worker=\"w-000007\"}"));

        let _next = metrics.begin_run("job-000002", 0);
        let text = metrics.render();
        assert!(!text.contains("job-000001"), "{text}");
        assert!(text.contains("job=\"job-000002\",rank=\"0\""), "{text}");
    }
}
