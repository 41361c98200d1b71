//! The control plane's records at etcd scale, on a real etcd: a 1,024-rank job driven through
//! the coordinator as its workers would (every rank's data-wait share, a full history, commits
//! with their ledger), 500 ended jobs with records as large beside it, and then a coordinator
//! restart and a failover to a standby, each timed.

mod common;

use common::{checkpoint, config, meet};
use ladder_coordinator::auth::WorkerIdentity;
use ladder_coordinator::records::{
    self, CheckpointRecord, JobRecord, JobState, LedgerEntry, ProgressRecord,
};
use ladder_coordinator::state::{Coordinator, ProgressReport, Signs};
use ladder_coordinator::store::{EtcdStore, SharedStore, Write};
use ladder_proto::v1 as pb;
use ladder_testkit::{CoordinatorProcess, Etcd, SUBMIT_TOKEN, job_client, write_dataset};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RANKS: u32 = 1024;
const EPOCHS: u64 = 600;
const ENDED_JOBS: usize = 500;
/// etcd's default `--max-request-bytes`.
const ETCD_REQUEST_LIMIT: u64 = 1536 * 1024;

/// Registers `n` workers at once (group commit), has them take their ranks and meet.
async fn rendezvous_of(coordinator: &Arc<Coordinator>, n: u32) -> (Vec<WorkerIdentity>, u64) {
    let registering: Vec<_> = (0..n)
        .map(|_| {
            let coordinator = coordinator.clone();
            tokio::spawn(async move { coordinator.register("host", "cuda:0", "").await })
        })
        .collect();
    let mut workers = Vec::new();
    for registered in registering {
        let (record, secret) = registered.await.unwrap().unwrap();
        workers.push(WorkerIdentity {
            id: record.id,
            secret,
        });
    }
    meet(coordinator, workers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_jobs_and_a_1024_rank_job_restart_and_fail_over_within_seconds() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let endpoints = [format!("http://{}", etcd.endpoint)];
    let candidate = EtcdStore::connect(&endpoints, None).await.unwrap();
    let (store, lease) = candidate.lead("127.0.0.1:1", 5).await.unwrap();
    let store: SharedStore = Arc::new(store);
    let coordinator = Coordinator::recover(store.clone(), config()).await.unwrap();

    // 4,096 samples in global batches of 4,096 (a micro-batch of 4 per rank): one step per
    // epoch, 600 epochs.
    let manifest = write_dataset(&dir.path().join("data"), 4, 1024, 10);
    let spec = ladder_testkit::write_spec(dir.path(), "wide", &manifest, (RANKS, RANKS));
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace(
            "epochs = 4\nstage_epochs = 2",
            &format!("epochs = {EPOCHS}\nstage_epochs = 8"),
        )
        .replace("global = 16", "global = 4096");
    std::fs::write(&spec, text).unwrap();
    let spec = ladder_core::spec::JobSpec::load(&spec).unwrap();
    let wide = coordinator.submit(&spec.to_toml()).await.unwrap().id;
    let (ranks, generation) = rendezvous_of(&coordinator, RANKS).await;
    for (rank, worker) in ranks.iter().enumerate() {
        let signs = Signs {
            data_wait: (rank % 100) as f32 / 100.0,
            ..Signs::default()
        };
        coordinator.heartbeat(worker, signs).await.unwrap();
    }
    for step in 1..=EPOCHS {
        let progress = ProgressRecord {
            epoch: step as u32 - 1,
            step: 1,
            steps_per_epoch: 1,
            global_step: step,
            loss: 2.0,
            learning_rate: 0.1,
            images_per_second: 40_000.0,
            image_size: 128,
            ..ProgressRecord::default()
        };
        let report = ProgressReport {
            progress: Some(progress),
            ..ProgressReport::default()
        };
        coordinator
            .report_progress(&ranks[0], &wide, generation, report)
            .await
            .unwrap();
        if step % 10 == 0 {
            let trained = (step - 10..step)
                .map(|epoch| LedgerEntry {
                    checkpoint_step: 0,
                    epoch: epoch as u32,
                    epochs: 1,
                    samples: 4096,
                    digest: epoch,
                    skipped: 0,
                })
                .collect();
            coordinator
                .commit_checkpoint(
                    &ranks[0],
                    &wide,
                    generation,
                    CheckpointRecord {
                        epoch: step as u32,
                        ..checkpoint(generation, step)
                    },
                    trained,
                )
                .await
                .unwrap()
                .expect("committed");
        }
    }
    coordinator.cancel(&wide).await.unwrap();
    let history = coordinator.history(&wide).await.unwrap();
    assert!(history.points.len() >= ladder_coordinator::history::MAX_POINTS / 2);
    let record = coordinator.record(&wide).await.unwrap();
    // Every epoch told, the older ones summed in ranges.
    let trained = record.trained();
    let told: u32 = trained.iter().map(|t| t.epochs.max(1)).sum();
    assert_eq!(told, EPOCHS as u32);
    // At most: the newest epochs one by one, and a range per span between kept checkpoints.
    let most = ladder_coordinator::policy::TALLIED_EPOCHS as usize + record.checkpoints.len() + 1;
    assert!(trained.len() <= most, "{} tallies", trained.len());
    let largest = coordinator.metrics().largest_transaction_bytes();
    let (record_bytes, history_bytes) = (
        records::encode(&record).len(),
        records::encode(&history).len(),
    );
    eprintln!(
        "1,024-rank job: record {record_bytes} bytes, history {history_bytes} bytes ({} points); \
         largest transaction {largest} bytes (etcd's limit {ETCD_REQUEST_LIMIT})",
        history.points.len()
    );
    assert!(largest < ETCD_REQUEST_LIMIT / 4, "{largest} bytes");

    // 500 ended jobs as large beside it.
    let mut writes = Vec::new();
    for i in 0..ENDED_JOBS {
        let id = format!("job-{:06}", i + 2);
        let job = JobRecord {
            id: id.clone(),
            state: JobState::Completed,
            ..record.clone()
        };
        writes.push(Write::Put(records::job_key(&id), records::encode(&job)));
        writes.push(Write::Put(
            records::history_key(&id),
            records::encode(&history),
        ));
        if writes.len() >= 8 {
            store.apply(std::mem::take(&mut writes)).await.unwrap();
        }
    }
    store.apply(writes).await.unwrap();
    let counters = records::Counters {
        next_job: ENDED_JOBS as u64 + 1,
        next_worker: RANKS as u64,
    };
    store
        .put(records::COUNTERS_KEY, records::encode(&counters))
        .await
        .unwrap();
    drop((coordinator, store, lease));

    let logs = dir.path().join("logs");
    let flags = ["--leader-ttl-s", "2"];
    let started = Instant::now();
    let leader = CoordinatorProcess::start(&etcd.store(), &logs, &flags);
    let restart = started.elapsed();
    let every_job_reads = |url: String| async move {
        let mut client = job_client(&url, SUBMIT_TOKEN).await;
        for n in 1..=ENDED_JOBS + 1 {
            let id = format!("job-{n:06}");
            let job = client
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"))
                .into_inner();
            let told: u32 = job.trained.iter().map(|t| t.epochs.max(1)).sum();
            assert_eq!(told, EPOCHS as u32, "{id}");
        }
    };
    every_job_reads(leader.url()).await;

    let standby = CoordinatorProcess::spawn(&etcd.store(), &logs, &flags);
    // Campaigning behind the leader before it goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    leader.kill9();
    let standby = tokio::task::spawn_blocking(move || {
        CoordinatorProcess::until_serving(standby, &logs, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let failover = killed.elapsed();
    every_job_reads(standby.url()).await;
    eprintln!(
        "{} jobs on etcd: a restart served in {restart:.2?}, a failover in {failover:.2?}",
        ENDED_JOBS + 1
    );
    assert!(restart < Duration::from_secs(10), "{restart:?}");
    assert!(failover < Duration::from_secs(10), "{failover:?}");
}
