//! `scripts/bench coordinator`: one real `ladder-coordinator` (release build) driven by
//! simulated workers, light async gRPC clients in this process that speak the worker protocol
//! as `ladder-worker` does: register, heartbeat every third of the lease, long-poll for an
//! assignment, rendezvous, and (rank 0 of a running job) report progress every second.
//!
//! For each store (the embedded redb file, a local etcd) and each pool size (1,000 and 10,000
//! workers) it measures heartbeat latency, progress latency from 64 running one-rank jobs,
//! and, with 10,000 workers, the time from submitting a 1,024-rank job to its last rank
//! holding the completed rendezvous; the coordinator's CPU time and peak memory; and how many
//! leases expired that should not have (every simulated worker heartbeats on time). Once more
//! on redb with 1,000 workers and [`READERS`] clients polling `/metrics` and `/api/jobs`
//! (operators' pages, Prometheus): readers take a published snapshot, so heartbeats must not
//! notice them. Beside them, in the same run, the etcd write path alone: a leader-guarded
//! transaction of a job's size, the floor every decision on etcd stands on.

mod probes;

use ladder_proto::v1 as pb;
use ladder_testkit::{
    Bearer, CoordinatorProcess, Etcd, Registered, SUBMIT_TOKEN, WORKER_TOKEN, write_dataset,
    write_spec,
};
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use probes::{ServerHeartbeats, read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;
type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;

const LEASE: Duration = Duration::from_secs(10);
/// Connections the simulated workers share (HTTP/2 multiplexes their calls).
const CHANNELS: usize = 200;
const BIG_JOB: u32 = 1_024;
const SMALL_JOBS: usize = 64;
/// Heartbeats are measured over this long before the jobs come, and the jobs run this long;
/// the first long polls of workers that registered together are a burst, not the steady
/// state, and are left out for `SETTLE`.
const SETTLE: Duration = Duration::from_secs(6);
const QUIET: Duration = Duration::from_secs(12);
const BUSY: Duration = Duration::from_secs(15);
/// Clients polling `/metrics` and `/api/jobs` in the readers' scenario, each every
/// [`READ_EVERY`].
const READERS: usize = 50;
const READ_EVERY: Duration = Duration::from_millis(100);
/// Pairs of runs, without readers and then with them, that the readers' goal compares by
/// their medians: one run's p99 on a shared 2-core machine moves by 40% from run to run
/// with nothing changed, more than the 20% the goal allows.
const READER_ROUNDS: usize = 3;

/// Latencies in microseconds.
#[derive(Default)]
struct Latencies(std::sync::Mutex<Vec<u32>>);

impl Latencies {
    fn record(&self, since: Instant) {
        let us = since.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.0.lock().unwrap().push(us);
    }

    /// (count, p50, p99, max) in milliseconds.
    fn summary(&self) -> (usize, f64, f64, f64) {
        let mut all = self.0.lock().unwrap().clone();
        if all.is_empty() {
            return (0, 0.0, 0.0, 0.0);
        }
        all.sort_unstable();
        let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        (all.len(), at(0.5), at(0.99), at(1.0))
    }
}

/// What one scenario measured.
struct Outcome {
    store: &'static str,
    workers: usize,
    /// From the first registration sent to every worker registered.
    registration: Duration,
    quiet_heartbeats: (usize, f64, f64, f64),
    busy_heartbeats: (usize, f64, f64, f64),
    /// p99 of Heartbeat as the coordinator timed it (arrival to answer), in ms: before jobs,
    /// and while they start and run.
    server_quiet_p99: Option<f64>,
    server_busy_p99: Option<f64>,
    progress: (usize, f64, f64, f64),
    /// Clients polling the HTTP face, and their reads' latencies.
    readers: usize,
    reads: (usize, f64, f64, f64),
    big_job_running: Option<Duration>,
    cpu_seconds: f64,
    /// CPU seconds of this process, the simulated workers, over the same time.
    load_cpu_seconds: f64,
    /// How long the scenario ran.
    seconds: f64,
    peak_rss_mb: f64,
    wrongly_expired: u64,
}

struct Shared {
    /// Heartbeats are recorded once the start-up burst has passed.
    settled: AtomicBool,
    lost: AtomicU64,
    stop: AtomicBool,
    heartbeats: Latencies,
    progress: Latencies,
    /// Set while the jobs run: heartbeats then count as "busy".
    busy: AtomicBool,
    busy_heartbeats: Latencies,
    reads: Latencies,
}

/// One polling client, from loopback address `from` (each its own host, as the coordinator
/// counts connections per address): `/metrics` and `/api/jobs` in turn, every
/// [`READ_EVERY`], from when heartbeats are measured until the scenario stops.
async fn reader(http: String, from: std::net::IpAddr, offset: Duration, shared: Arc<Shared>) {
    tokio::time::sleep(offset).await;
    let mut every = tokio::time::interval(READ_EVERY);
    let mut connection = None;
    for path in ["/metrics", "/api/jobs?include_ended=true"].iter().cycle() {
        every.tick().await;
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if !shared.settled.load(Ordering::Relaxed) {
            continue;
        }
        let sent = Instant::now();
        read(&mut connection, from, &http, path).await;
        shared.reads.record(sent);
    }
}

/// Steps per epoch of a one-rank job: the dataset's 4,800 samples in global batches of 16 (the
/// coordinator refuses progress that does not add up to its plan).
const ONE_RANK_STEPS_PER_EPOCH: u64 = 300;

async fn channels(url: &str) -> Vec<Workers> {
    let mut pool = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connecting to the coordinator");
        pool.push(WorkerServiceClient::with_interceptor(
            channel,
            Bearer(WORKER_TOKEN.to_owned()),
        ));
    }
    pool
}

/// One simulated worker: heartbeats (staggered by `offset`) and, when assigned, joins the
/// rendezvous and, as rank 0, reports progress every second. Returns when told to stop.
async fn worker(
    mut client: Workers,
    identity: pb::WorkerIdentity,
    offset: Duration,
    shared: Arc<Shared>,
    rendezvoused: Arc<tokio::sync::mpsc::UnboundedSender<(String, Instant)>>,
) {
    let beats = {
        let (mut client, identity, shared) = (client.clone(), identity.clone(), shared.clone());
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut interval = tokio::time::interval(LEASE / 3);
            while !shared.stop.load(Ordering::Relaxed) {
                interval.tick().await;
                let sent = Instant::now();
                let reply = client
                    .heartbeat(pb::HeartbeatRequest {
                        worker: Some(identity.clone()),
                        ..Default::default()
                    })
                    .await;
                match reply {
                    Ok(_) if !shared.settled.load(Ordering::Relaxed) => {}
                    Ok(_) if shared.busy.load(Ordering::Relaxed) => {
                        shared.busy_heartbeats.record(sent)
                    }
                    Ok(_) => shared.heartbeats.record(sent),
                    Err(_) if shared.stop.load(Ordering::Relaxed) => return,
                    Err(status) if status.code() == tonic::Code::NotFound => {
                        shared.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(status) => panic!("heartbeat: {status}"),
                }
            }
        })
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let assignment = match client
            .await_assignment(pb::AwaitAssignmentRequest {
                worker: Some(identity.clone()),
                wait_ms: 5_000,
            })
            .await
        {
            Ok(a) => a.into_inner(),
            Err(_) => break,
        };
        if assignment.job_id.is_empty() {
            continue;
        }
        loop {
            let r = client
                .rendezvous(pb::RendezvousRequest {
                    worker: Some(identity.clone()),
                    job_id: assignment.job_id.clone(),
                    generation: assignment.generation,
                    rank: assignment.rank,
                    payload: b"10.0.0.1:29500".to_vec(),
                    wait_ms: 5_000,
                })
                .await
                .expect("rendezvous")
                .into_inner();
            if r.complete {
                let _ = rendezvoused.send((assignment.job_id.clone(), Instant::now()));
                break;
            }
            assert!(r.current, "the generation ended during the rendezvous");
        }
        if assignment.rank != 0 || assignment.world_size != 1 {
            // A rank of the big job: it trains (idles) until the end.
            while !shared.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            break;
        }
        let mut step: u64 = 0;
        while !shared.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            step += 1;
            let sent = Instant::now();
            client
                .report_progress(pb::ReportProgressRequest {
                    worker: Some(identity.clone()),
                    job_id: assignment.job_id.clone(),
                    generation: assignment.generation,
                    progress: Some(pb::Progress {
                        epoch: (step / ONE_RANK_STEPS_PER_EPOCH) as u32,
                        step: step % ONE_RANK_STEPS_PER_EPOCH,
                        steps_per_epoch: ONE_RANK_STEPS_PER_EPOCH,
                        global_step: step,
                        loss: 2.0,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .expect("progress");
            shared.progress.record(sent);
        }
        break;
    }
    let _ = beats.await;
}

/// User and system CPU seconds, and peak resident memory in MB, of process `pid`.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after the command.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, rss_kb / 1024.0)
}

/// The unit of /proc's CPU times (`getconf CLK_TCK`).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .expect("getconf CLK_TCK")
}

/// A spec of `ranks` ranks (min = max) on the dataset at `manifest`, written in `dir`.
fn spec(dir: &Path, name: &str, manifest: &Path, ranks: u32) -> String {
    let path = write_spec(dir, name, manifest, (ranks, ranks));
    let text = std::fs::read_to_string(&path).unwrap();
    // 4 samples per micro-batch: a global batch of 4 per rank lets every rank take one.
    let text = text.replace("global = 16", &format!("global = {}", (4 * ranks).max(16)));
    std::fs::write(&path, text).unwrap();
    ladder_core::spec::JobSpec::load(&path)
        .unwrap_or_else(|e| panic!("bench spec {name}: {e}"))
        .to_toml()
}

async fn scenario(
    store_name: &'static str,
    store: &str,
    dir: &Path,
    manifest: &Path,
    workers: usize,
    readers: usize,
) -> Outcome {
    // Each scenario's logs, checkpoints and TensorBoard runs lie apart: job ids start again
    // with each store.
    let name = dir.join(format!("{store_name}-{workers}-{readers}"));
    let name = (0..)
        .map(|round| name.with_extension(round.to_string()))
        .find(|dir| !dir.exists())
        .unwrap();
    let logs = name.join("logs");
    let jobs_dir = name.join("jobs");
    std::fs::create_dir_all(&jobs_dir).unwrap();
    let http = format!("127.0.0.1:{}", ladder_testkit::free_port());
    let coordinator = CoordinatorProcess::start(
        store,
        &logs,
        &[
            "--http-listen",
            &http,
            "--lease-ttl-ms",
            &LEASE.as_millis().to_string(),
            "--rendezvous-grace-ms",
            "0",
            "--stall-timeout-ms",
            "600000",
            "--regroup-interval-s",
            "86400",
        ],
    );
    let url = coordinator.url();
    let pid = coordinator.pid();
    let (cpu_before, _) = usage(pid);
    let (load_before, _) = usage(std::process::id());
    let pool = channels(&url).await;
    let mut jobs: Jobs = JobServiceClient::with_interceptor(
        Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
        Bearer(SUBMIT_TOKEN.to_owned()),
    );
    let shared = Arc::new(Shared {
        settled: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        heartbeats: Latencies::default(),
        progress: Latencies::default(),
        busy: AtomicBool::new(false),
        busy_heartbeats: Latencies::default(),
        reads: Latencies::default(),
    });
    let polling: Vec<_> = (0..readers)
        .map(|i| {
            let offset = READ_EVERY.mul_f64(i as f64 / readers as f64);
            let from = std::net::Ipv4Addr::new(127, 0, 1, 1 + i as u8).into();
            tokio::spawn(reader(http.clone(), from, offset, shared.clone()))
        })
        .collect();
    let (rendezvoused_tx, mut rendezvoused) = tokio::sync::mpsc::unbounded_channel();
    let rendezvoused_tx = Arc::new(rendezvoused_tx);

    // Workers start as a cluster's do: all at once, each heartbeating from its registration.
    let period = LEASE / 3;
    let registering = Instant::now();
    let simulated: Vec<_> = (0..workers)
        .map(|i| {
            let mut client = pool[i % CHANNELS].clone();
            let (shared, rendezvoused) = (shared.clone(), rendezvoused_tx.clone());
            let offset = period.mul_f64(i as f64 / workers as f64);
            tokio::spawn(async move {
                let identity = client
                    .register(pb::RegisterRequest {
                        hostname: format!("node-{}", i / 8),
                        device: format!("cuda:{}", i % 8),
                        name: String::new(),
                    })
                    .await
                    .expect("register")
                    .into_inner()
                    .identity();
                worker(client, identity, offset, shared, rendezvoused).await;
            })
        })
        .collect();
    let registration = loop {
        let listed = jobs
            .list_workers(pb::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers
            .len();
        if listed == workers {
            break registering.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(SETTLE).await;
    shared.settled.store(true, Ordering::SeqCst);
    let settled = ServerHeartbeats::scrape(&http).await;
    tokio::time::sleep(QUIET).await;

    shared.busy.store(true, Ordering::SeqCst);
    let busy_from = ServerHeartbeats::scrape(&http).await;
    let mut big_job_running = None;
    if workers >= BIG_JOB as usize * 2 {
        let submitted = Instant::now();
        let big = jobs
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec(&jobs_dir, "big", manifest, BIG_JOB),
            })
            .await
            .expect("submitting the 1,024-rank job")
            .into_inner()
            .job
            .unwrap()
            .id;
        let mut ranks = 0;
        while ranks < BIG_JOB {
            let (job, at) = tokio::time::timeout(Duration::from_secs(60), rendezvoused.recv())
                .await
                .expect("the 1,024-rank job did not start within 60 s")
                .unwrap();
            if job == big {
                ranks += 1;
                if ranks == BIG_JOB {
                    big_job_running = Some(at - submitted);
                }
            }
        }
        let state = jobs
            .get_job(pb::GetJobRequest { id: big })
            .await
            .unwrap()
            .into_inner()
            .state;
        assert_eq!(state, pb::JobState::Running as i32);
    }
    let small = spec(&jobs_dir, "small", manifest, 1);
    for _ in 0..SMALL_JOBS {
        jobs.submit_job(pb::SubmitJobRequest {
            spec_toml: small.clone(),
        })
        .await
        .expect("submitting a one-rank job");
    }
    tokio::time::sleep(BUSY).await;
    let busy_to = ServerHeartbeats::scrape(&http).await;
    shared.stop.store(true, Ordering::SeqCst);
    let (cpu_after, peak_rss_mb) = usage(pid);
    let (load_after, _) = usage(std::process::id());
    for s in simulated.into_iter().chain(polling) {
        s.abort();
    }
    let log = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    let expired_in_log = log.matches("worker lease expired").count() as u64;
    Outcome {
        store: store_name,
        workers,
        registration,
        quiet_heartbeats: shared.heartbeats.summary(),
        busy_heartbeats: shared.busy_heartbeats.summary(),
        server_quiet_p99: busy_from.quantile_since(&settled, 0.99),
        server_busy_p99: busy_to.quantile_since(&busy_from, 0.99),
        progress: shared.progress.summary(),
        readers,
        reads: shared.reads.summary(),
        big_job_running,
        cpu_seconds: cpu_after - cpu_before,
        load_cpu_seconds: load_after - load_before,
        seconds: registering.elapsed().as_secs_f64(),
        peak_rss_mb,
        wrongly_expired: shared.lost.load(Ordering::SeqCst).max(expired_in_log),
    }
}

/// The etcd write path alone: `writes` leader-guarded transactions of a job-sized value, one
/// after the other, as the coordinator's store makes them. Latencies in ms: (p50, p99).
async fn etcd_floor(endpoint: &str, writes: usize) -> (f64, f64) {
    use ladder_coordinator::store::{EtcdStore, Store};
    let candidate = EtcdStore::connect(&[format!("http://{endpoint}")], None)
        .await
        .expect("etcd");
    let (store, _lease) = candidate.lead("127.0.0.1:1", 5).await.expect("leading");
    let value = vec![b'x'; 4 << 10];
    let latencies = Latencies::default();
    for i in 0..writes {
        let sent = Instant::now();
        store
            .put(&format!("bench/job-{}", i % 64), value.clone())
            .await
            .expect("etcd write");
        latencies.record(sent);
    }
    let (_, p50, p99, _) = latencies.summary();
    (p50, p99)
}

/// A latency summary as the tables print it: p50/p99/max (count), in ms.
fn ms((n, p50, p99, max): (usize, f64, f64, f64)) -> String {
    if n == 0 {
        "-".to_owned()
    } else {
        format!("{p50:.2}/{p99:.2}/{max:.1} ({n})")
    }
}

/// The coordinator's own heartbeat p99 over a scenario's measured span (before and while jobs
/// run), in ms.
fn server_p99(o: &Outcome) -> f64 {
    o.server_quiet_p99
        .unwrap_or(f64::INFINITY)
        .max(o.server_busy_p99.unwrap_or(f64::INFINITY))
}

/// [`READER_ROUNDS`] pairs of runs on redb with 1,000 workers, without readers and then with
/// them, each on a fresh store.
async fn reader_rounds(dir: &Path, manifest: &Path) -> Vec<(Outcome, Outcome)> {
    let mut rounds = Vec::new();
    for round in 1..=READER_ROUNDS {
        let mut pair = Vec::new();
        for readers in [0, READERS] {
            eprintln!("bench: redb, 1000 workers, {readers} readers (round {round})");
            let store = dir.join(format!("redb-readers-{round}-{readers}.redb"));
            let store = format!("redb:{}", store.display());
            pair.push(scenario("redb", &store, dir, manifest, 1_000, readers).await);
        }
        let read = pair.pop().unwrap();
        rounds.push((pair.pop().unwrap(), read));
    }
    rounds
}

/// Prints each round of the readers' comparison; returns its goal: the median of the
/// coordinator's heartbeat p99 with readers within 20% of the median without.
fn readers_goal(rounds: &[(Outcome, Outcome)]) -> (String, bool) {
    for (round, (alone, read)) in rounds.iter().enumerate() {
        println!(
            "readers, round {}: {} clients polling /metrics and /api/jobs every {} ms, {} reads \
             p50/p99/max {}; heartbeat ms p50/p99/max at the workers {} (without readers {}), \
             server p99 {:.3} (without readers {:.3})",
            round + 1,
            read.readers,
            READ_EVERY.as_millis(),
            read.reads.0,
            ms(read.reads),
            ms(read.quiet_heartbeats),
            ms(alone.quiet_heartbeats),
            server_p99(read),
            server_p99(alone),
        );
    }
    let median = |side: &dyn Fn(&(Outcome, Outcome)) -> f64| {
        let mut p99s: Vec<f64> = rounds.iter().map(side).collect();
        p99s.sort_by(f64::total_cmp);
        p99s[p99s.len() / 2]
    };
    let without = median(&|(alone, _)| server_p99(alone));
    let with = median(&|(_, read)| server_p99(read));
    (
        format!(
            "heartbeat p99 in the coordinator with {READERS} readers polling: median of {} runs \
             {with:.3} ms, {:.2}x the {without:.3} ms without them (goal: within 20%)",
            rounds.len(),
            with / without
        ),
        with <= without * 1.2,
    )
}

/// Prints each goal with PASS or FAIL; exits 1 if any failed.
fn judge(goals: &[(String, bool)]) {
    for (what, ok) in goals {
        println!("{} {what}", pass(*ok));
    }
    if goals.iter().any(|(_, ok)| !ok) {
        std::process::exit(1);
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    // 4,800 samples: enough for a global batch of 4,096 (4 per rank of 1,024).
    let manifest: PathBuf = write_dataset(&dir.path().join("data"), 8, 600, 10);
    // `readers`: only the readers' rounds.
    if std::env::args().nth(1).as_deref() == Some("readers") {
        judge(&[readers_goal(&reader_rounds(dir.path(), &manifest).await)]);
        return;
    }
    let sizes = [1_000, 10_000];
    let mut outcomes = Vec::new();
    for workers in sizes {
        let store = format!(
            "redb:{}",
            dir.path().join(format!("redb-{workers}.redb")).display()
        );
        eprintln!("bench: redb, {workers} workers");
        outcomes.push(scenario("redb", &store, dir.path(), &manifest, workers, 0).await);
    }
    let rounds = reader_rounds(dir.path(), &manifest).await;
    let etcd = Etcd::start();
    for workers in sizes {
        eprintln!("bench: etcd, {workers} workers");
        // One etcd, a fresh key space per run: the runs' records do not meet.
        outcomes.push(scenario("etcd", &etcd.store(), dir.path(), &manifest, workers, 0).await);
        let mut raw = etcd_client::Client::connect([format!("http://{}", etcd.endpoint)], None)
            .await
            .unwrap();
        raw.delete(
            "/ladder",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    }
    let (floor_p50, floor_p99) = etcd_floor(&etcd.endpoint, 300).await;

    println!(
        "\n{:<5} {:>7} {:>9}  {:>28}  {:>28}  {:>16}  {:>22}  {:>12}  {:>8} {:>8}  {:>7}",
        "store",
        "workers",
        "register",
        "heartbeat ms p50/p99/max",
        "with jobs: p50/p99/max",
        "server p99 ms",
        "progress p50/p99/max",
        "1,024 ranks",
        "cpu s",
        "rss MB",
        "expired"
    );
    for o in &outcomes {
        println!(
            "{:<5} {:>7} {:>9}  {:>28}  {:>28}  {:>16}  {:>22}  {:>12}  {:>8.1} {:>8.0}  {:>7}",
            o.store,
            o.workers,
            format!("{:.1} s", o.registration.as_secs_f64()),
            ms(o.quiet_heartbeats),
            ms(o.busy_heartbeats),
            format!(
                "{}/{}",
                o.server_quiet_p99.map_or("-".into(), |p| format!("{p:.2}")),
                o.server_busy_p99.map_or("-".into(), |p| format!("{p:.2}"))
            ),
            ms(o.progress),
            o.big_job_running
                .map_or("-".to_owned(), |d| format!("{:.3} s", d.as_secs_f64())),
            o.cpu_seconds,
            o.peak_rss_mb,
            o.wrongly_expired
        );
    }
    println!(
        "cpu s: the coordinator's CPU time over the scenario; the simulated workers (this \
         process) used {} over the same spans, on {} cores",
        outcomes
            .iter()
            .map(|o| format!(
                "{:.1} s of {:.0} s ({} {})",
                o.load_cpu_seconds, o.seconds, o.store, o.workers
            ))
            .collect::<Vec<_>>()
            .join(", "),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "etcd write path alone: a leader-guarded 4 KB transaction p50 {floor_p50:.2} ms, p99 \
         {floor_p99:.2} ms; submit to running is 3 such writes in a row (submit, schedule, \
         rendezvous complete): floor {:.1} ms",
        3.0 * floor_p50
    );

    let find = |store: &str, workers: usize| {
        outcomes
            .iter()
            .find(|o| o.store == store && o.workers == workers)
            .unwrap()
    };
    println!(
        "heartbeat ms: as the simulated workers saw it (their own scheduling on the shared \
         cores included); server p99: as the coordinator timed it, from arrival to answer, \
         before jobs / while they start and run"
    );
    let redb = find("redb", 10_000);
    let heartbeat_p99 = redb.quiet_heartbeats.2.max(redb.busy_heartbeats.2);
    let server_p99 = server_p99(redb);
    let etcd_big = find("etcd", 10_000).big_job_running;
    let readers = readers_goal(&rounds);
    let expired: u64 = outcomes
        .iter()
        .chain(rounds.iter().flat_map(|(alone, read)| [alone, read]))
        .map(|o| o.wrongly_expired)
        .sum();
    let goals = [
        (
            format!(
                "heartbeat p99 {server_p99:.2} ms in the coordinator (at the workers \
                 {heartbeat_p99:.2} ms) < 20 ms at 10,000 workers on redb"
            ),
            server_p99 < 20.0,
        ),
        (
            format!(
                "1,024-rank generation running {} after submit on etcd (goal: < 2 s)",
                etcd_big.map_or("never".to_owned(), |d| format!("{:.3} s", d.as_secs_f64()))
            ),
            etcd_big.is_some_and(|d| d < Duration::from_secs(2)),
        ),
        readers,
        (
            format!("leases expired wrongly: {expired} (goal: none)"),
            expired == 0,
        ),
    ];
    judge(&goals);
}
