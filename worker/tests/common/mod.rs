//! A training cluster on loopback for the multi-process tests: a real coordinator (embedded
//! store), real `ladder-worker` processes, a synthetic JPEG dataset and a three-stage spec.
#![allow(dead_code)] // each test binary uses part of it

use ladder_core::spec::JobSpec;
use ladder_proto::client::{Authed, connect};
use ladder_proto::v1 as pb;
use ladder_proto::v1::job_service_client::JobServiceClient;
use ladder_testkit::{CoordinatorProcess, SUBMIT_TOKEN, WorkerProcess};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Steps per epoch of the spec below: 960 samples / global batch 96.
pub const STEPS_PER_EPOCH: u64 = 10;
pub const EPOCHS: u64 = 6;

/// Three stages (32, 48 and 64 px) of two epochs; micro-batches of 16, 8 and 8 make 6, 12 and
/// 12 per global batch of 96, which 1, 2 and 3 ranks all divide.
pub fn write_spec(dir: &Path, workers: (u32, u32), every_steps: u32, keep: u32) -> JobSpec {
    let data = dir.join("data");
    if !data.join("train/manifest.json").exists() {
        ladder_data::synth::write(&data.join("train"), 10, 960, 4, 1).expect("train split");
        ladder_data::synth::write(&data.join("val"), 10, 200, 2, 2).expect("held-out split");
    }
    let text = format!(
        r#"[job]
name = "cluster"
[model]
variant = "tiny"
classes = 10
[data]
manifest = "data/train/manifest.json"
eval_manifest = "data/val/manifest.json"
decode_threads = 1
shuffle_block = 4
[schedule]
epochs = {EPOCHS}
stage_epochs = 2
seed = 7
min_size = 32
max_size = 64
eval_size = 64
min_dropout = 0.0
max_dropout = 0.1
stochastic_depth = 0.1
# torchvision's RandAugment: the official one translates by 10 pixels a level and keeps one bit
# in Posterize below level 2.5, sized for 128-380 px images, not these 32-64 px ones.
randaugment = "torchvision"
min_randaugment = 2
max_randaugment = 6
min_mixup = 0.0
max_mixup = 0.2
[optimizer]
lr_per_256 = 0.064
warmup_epochs = 1
[batch]
global = 96
micro_at_max_size = 8
micro_max = 16
[checkpoint]
dir = "checkpoints"
every_steps = {every_steps}
keep = {keep}
[workers]
min = {}
max = {}
"#,
        workers.0, workers.1
    );
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).expect("writing the spec");
    JobSpec::load(&path).expect("a valid spec")
}

pub struct Cluster {
    pub dir: PathBuf,
    pub coordinator: Option<CoordinatorProcess>,
    /// A second coordinator on the same (etcd) store, waiting to lead, and its address.
    pub standby: Option<(std::process::Child, String)>,
    store: String,
    pub workers: Vec<WorkerProcess>,
    runtime: tokio::runtime::Runtime,
    started_workers: usize,
    /// The coordinator's address, kept across restarts so that workers find it again.
    listen: String,
    coordinator_flags: Vec<String>,
}

impl Cluster {
    pub fn new(dir: &Path) -> Cluster {
        Cluster::with_flags(dir, &[])
    }

    /// A cluster whose coordinator gets `flags` too.
    pub fn with_flags(dir: &Path, flags: &[&str]) -> Cluster {
        let store = format!("redb:{}", dir.join("state.redb").display());
        Cluster::on_store(dir, &store, flags)
    }

    /// A cluster whose coordinator keeps its state in `store` and gets `flags` too.
    pub fn on_store(dir: &Path, store: &str, flags: &[&str]) -> Cluster {
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            coordinator: None,
            standby: None,
            store: store.to_owned(),
            workers: Vec::new(),
            runtime: tokio::runtime::Runtime::new().expect("tokio runtime"),
            started_workers: 0,
            listen: format!("127.0.0.1:{}", ladder_testkit::free_port()),
            coordinator_flags: flags.iter().map(|f| f.to_string()).collect(),
        };
        cluster.start_coordinator();
        cluster
    }

    /// Starts (or restarts) the coordinator on the cluster's store.
    pub fn start_coordinator(&mut self) {
        let flags: Vec<&str> = self.coordinator_flags.iter().map(String::as_str).collect();
        self.coordinator = Some(CoordinatorProcess::start(
            &self.store,
            &self.dir.join("logs"),
            &[["--listen", self.listen.as_str()].as_slice(), &flags].concat(),
        ));
    }

    /// Starts a second coordinator on the cluster's store (etcd), which waits to lead. Start it
    /// before the workers: they are given every coordinator's address.
    pub fn add_standby(&mut self) {
        let listen = format!("127.0.0.1:{}", ladder_testkit::free_port());
        let mut flags: Vec<&str> = self.coordinator_flags.iter().map(String::as_str).collect();
        flags.extend(["--listen", listen.as_str()]);
        let child = CoordinatorProcess::spawn(&self.store, &self.dir.join("logs"), &flags);
        self.standby = Some((child, format!("http://{listen}")));
    }

    /// Every coordinator's address, comma-separated: clients try each in turn.
    pub fn url(&self) -> String {
        let leader = format!("http://{}", self.listen);
        match &self.standby {
            Some((_, standby)) => format!("{leader},{standby}"),
            None => leader,
        }
    }

    /// A client of whichever coordinator serves now, if one does.
    async fn client(&self) -> Option<JobServiceClient<Authed>> {
        let channel = connect(&self.url(), SUBMIT_TOKEN, "the test's", None)
            .await
            .ok()?;
        Some(JobServiceClient::new(channel))
    }

    /// Starts `n` workers; each writes its replica digests to `digests-<i>.txt`.
    pub fn add_workers(&mut self, n: usize) {
        self.add_workers_with(n, &[]);
    }

    /// Starts `n` workers with `flags` too.
    pub fn add_workers_with(&mut self, n: usize, flags: &[&str]) {
        for _ in 0..n {
            self.add_worker(flags);
        }
    }

    /// Starts a worker with `flags` too.
    pub fn add_worker(&mut self, flags: &[&str]) {
        let i = self.started_workers;
        self.started_workers += 1;
        let digests = self.dir.join(format!("digests-{i}.txt"));
        let mut args = vec!["--replica-digests", digests.to_str().expect("utf-8 path")];
        args.extend_from_slice(flags);
        self.workers.push(WorkerProcess::start(
            &self.url(),
            &self.dir.join("logs").join(format!("worker-{i}.log")),
            &args,
        ));
    }

    pub fn kill_workers(&mut self) {
        for mut w in self.workers.drain(..) {
            w.kill9();
        }
    }

    pub fn kill_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.kill9();
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("logs"))
            .into_iter()
            .flatten()
        {
            let path = entry.expect("log entry").path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out.push_str(&format!("---- {}\n", path.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    pub fn submit(&self, spec: &JobSpec) -> String {
        self.runtime.block_on(async {
            self.client()
                .await
                .expect("a coordinator serves")
                .submit_job(pb::SubmitJobRequest {
                    spec_toml: spec.to_toml(),
                })
                .await
                .expect("submit")
                .into_inner()
                .job
                .expect("a job")
                .id
        })
    }

    /// Follows the job with WatchJob until it ends; returns every state it was seen in.
    pub fn watch_until_ended(&self, id: &str, timeout: Duration) -> Vec<pb::Job> {
        self.runtime.block_on(async {
            let mut events = self
                .client()
                .await
                .expect("a coordinator serves")
                .watch_job(pb::WatchJobRequest { id: id.to_owned() })
                .await
                .expect("watch")
                .into_inner();
            let deadline = Instant::now() + timeout;
            let mut seen = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, events.message()).await {
                    Ok(Ok(Some(event))) => seen.extend(event.job),
                    Ok(Ok(None)) => return seen,
                    Ok(Err(status)) => panic!("watch failed: {status}"),
                    Err(_) => panic!(
                        "the job did not end within {timeout:?}; last seen: {:#?}",
                        seen.last()
                    ),
                }
            }
        })
    }

    pub fn job(&self, id: &str) -> pb::Job {
        self.try_job(id).expect("a coordinator serves the job")
    }

    /// The job, if a coordinator serves now (none may, between two terms of leadership).
    fn try_job(&self, id: &str) -> Option<pb::Job> {
        self.runtime.block_on(async {
            let request = pb::GetJobRequest { id: id.to_owned() };
            let answer = self.client().await?.get_job(request).await;
            answer.ok().map(tonic::Response::into_inner)
        })
    }

    pub fn cancel(&self, id: &str) {
        self.runtime.block_on(async {
            self.client()
                .await
                .expect("a coordinator serves")
                .cancel_job(pb::CancelJobRequest { id: id.to_owned() })
                .await
                .expect("cancel");
        });
    }

    pub fn resume(&self, id: &str, workers: u32) -> pb::Job {
        self.resume_from(id, "", workers)
    }

    /// Resumes from checkpoint `checkpoint` ("": the latest).
    pub fn resume_from(&self, id: &str, checkpoint: &str, workers: u32) -> pb::Job {
        self.runtime.block_on(async {
            self.client()
                .await
                .expect("a coordinator serves")
                .resume_job(pb::ResumeJobRequest {
                    id: id.to_owned(),
                    checkpoint_id: checkpoint.to_owned(),
                    workers,
                })
                .await
                .expect("resume")
                .into_inner()
        })
    }

    /// Polls the job every 50 ms until `done` holds; panics with the logs after `timeout`.
    pub fn wait_for(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&pb::Job) -> bool,
    ) -> pb::Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.try_job(id);
            if let Some(job) = job.as_ref().filter(|j| done(j)) {
                return job.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; job: {job:#?}\nlogs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_until_ended(&self, id: &str, timeout: Duration) -> pb::Job {
        self.wait_for(id, "the job to end", timeout, |j| {
            matches!(
                pb::JobState::try_from(j.state),
                Ok(pb::JobState::Completed | pb::JobState::Failed | pb::JobState::Cancelled)
            )
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_workers();
        self.kill_coordinator();
        if let Some((mut standby, _)) = self.standby.take() {
            let _ = standby.kill();
            let _ = standby.wait();
        }
    }
}

/// The worker id a worker process registered as, from its log.
pub fn worker_id(worker: &WorkerProcess) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = worker.log_text();
        if let Some(at) = log.find("registered") {
            let rest = &log[at..];
            if let Some(start) = rest.find("w-") {
                return rest[start..start + 8].to_owned();
            }
        }
        assert!(
            Instant::now() < deadline,
            "the worker never registered:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The global steps a worker trained, in order, from its `--replica-digests` file.
pub fn trained_steps(dir: &Path, worker: usize) -> Vec<u64> {
    std::fs::read_to_string(dir.join(format!("digests-{worker}.txt")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

pub fn state_of(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap_or(pb::JobState::Unspecified)
}

/// The final checkpoint's manifest (the last committed one).
pub fn final_manifest(job: &pb::Job) -> ladder_train::checkpoint::Manifest {
    let last = job.checkpoints.last().expect("a committed checkpoint");
    ladder_train::checkpoint::verify(&checkpoint_dir(job, last))
        .expect("the final checkpoint verifies")
}

/// Where `job`'s checkpoint `c` is, as the coordinator and its workers both derive it.
pub fn checkpoint_dir(job: &pb::Job, c: &pb::CheckpointRef) -> PathBuf {
    let spec = ladder_core::spec::JobSpec::parse(&job.spec_toml, &job.id).expect("its spec");
    ladder_core::location::checkpoint_dir(&spec.checkpoint.dir, &job.id, &c.id)
        .expect("a checkpoint's directory")
}

/// Every sample of every epoch trained exactly once in the job's committed history (the
/// coordinator's ledger), as the sample plan orders them; none skipped.
pub fn assert_every_sample_once(job: &pb::Job, spec: &JobSpec) {
    let manifest = ladder_core::dataset::Manifest::load(&spec.data.manifest).expect("manifest");
    let plan =
        ladder_core::sample::SamplePlan::of_job(spec, &manifest.shard_sizes()).expect("plan");
    // Each tally tells one epoch, or a range of old ones (summed: what each should be, summed).
    let mut epochs = Vec::new();
    for t in &job.trained {
        let span = t.epoch..t.epoch + t.epochs.max(1);
        epochs.extend(span.clone());
        let expected = span.clone().fold((0, 0u64), |(samples, digest), epoch| {
            let e = ladder_core::sample::EpochTally::expected(&plan, epoch);
            (samples + e.samples, digest.wrapping_add(e.digest))
        });
        assert_eq!(
            (t.samples, t.digest, t.skipped),
            (expected.0, expected.1, 0),
            "epochs {span:?}: every sample once"
        );
    }
    assert_eq!(
        epochs,
        (0..spec.schedule.epochs).collect::<Vec<_>>(),
        "{:?}",
        job.trained
    );
}
