//! Each decision of the coordinator is one store transaction, and each fact is saved once (a
//! worker's rank is derived from the job that lists it): a store failure in the middle of a
//! decision leaves neither the store nor memory half-changed, and a restart recovers exactly
//! what was decided. The coordinator runs in-process on a real redb store that fails on
//! demand.

mod common;

use common::{FlakyStore, config, register, submit};
use ladder_coordinator::auth::WorkerIdentity;
use ladder_coordinator::records::{JobState, WorkerAssignment};
use ladder_coordinator::state::{Coordinator, Signs};
use ladder_coordinator::store::SharedStore;
use std::sync::Arc;
use std::time::Duration;

/// A coordinator recovered from `store`, as a restarted process recovers.
async fn recover(store: &Arc<FlakyStore>) -> Arc<Coordinator> {
    Coordinator::recover(store.clone() as SharedStore, config())
        .await
        .unwrap()
}

/// Each worker's assignment as `coordinator` answers its heartbeat.
async fn assignments(
    coordinator: &Coordinator,
    workers: &[WorkerIdentity],
) -> Vec<Option<WorkerAssignment>> {
    let mut all = Vec::new();
    for w in workers {
        all.push(coordinator.heartbeat(w, Signs::default()).await.unwrap());
    }
    all
}

#[tokio::test]
async fn a_store_failure_in_the_middle_of_a_schedule_assigns_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let coordinator = recover(&store).await;
    let (job, _) = submit(&coordinator, dir.path(), 4).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(register(&coordinator).await);
    }
    // The fourth worker makes the job schedulable. Its registration is written; the schedule
    // that follows fails to write the job, and the registration still stands.
    store.fail_writes_to(Some("jobs/"));
    workers.push(register(&coordinator).await);
    assert_eq!(assignments(&coordinator, &workers).await, vec![None; 4]);
    let queued = coordinator.record(&job).await.unwrap();
    assert_eq!((queued.state, queued.generation), (JobState::Queued, 0));
    assert!(queued.workers.is_empty());
    for w in &workers {
        assert!(
            coordinator
                .await_assignment(w, Duration::ZERO)
                .await
                .unwrap()
                .is_none(),
            "{} was told a rank the store never saved",
            w.id
        );
    }

    // Healed, the next tick schedules all four in one transaction.
    store.fail_writes_to(None);
    let before = store.transactions();
    coordinator.tick().await.unwrap();
    assert_eq!(store.transactions() - before, 1, "one write for four ranks");
    let assigned = assignments(&coordinator, &workers).await;
    let mut ranks: Vec<u32> = assigned
        .iter()
        .map(|a| {
            let a = a.as_ref().expect("every worker is assigned");
            assert_eq!((a.job_id.as_str(), a.generation), (job.as_str(), 1));
            a.rank
        })
        .collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2, 3]);

    // A coordinator started on the same store derives the same ranks from the job alone.
    let recovered = recover(&store).await;
    assert_eq!(assignments(&recovered, &workers).await, assigned);
}

#[tokio::test]
async fn a_lost_worker_and_the_end_of_its_generation_are_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let short_leases = ladder_coordinator::state::Config {
        lease_ttl: Duration::from_millis(300),
        ..config()
    };
    let coordinator = Coordinator::recover(store.clone() as SharedStore, short_leases)
        .await
        .unwrap();
    let (job, _) = submit(&coordinator, dir.path(), 2).await;
    let workers = [register(&coordinator).await, register(&coordinator).await];
    assert!(
        assignments(&coordinator, &workers)
            .await
            .iter()
            .all(Option::is_some)
    );
    // Only the first worker goes on heartbeating; the second's lease runs out while the store
    // refuses every write: nothing changes, not even in memory.
    store.fail_writes_to(Some(""));
    tokio::time::sleep(Duration::from_millis(200)).await;
    coordinator
        .heartbeat(
            &workers[0],
            Signs {
                activity: 1,
                ..Signs::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    coordinator
        .heartbeat(
            &workers[0],
            Signs {
                activity: 2,
                ..Signs::default()
            },
        )
        .await
        .unwrap();
    coordinator.tick().await.unwrap_err();
    let still = coordinator.record(&job).await.unwrap();
    assert_eq!(still.state, JobState::Rendezvous);
    assert_eq!(still.workers.len(), 2);
    // Healed: the worker is forgotten and the generation ends, together.
    store.fail_writes_to(None);
    coordinator.tick().await.unwrap();
    let ended = coordinator.record(&job).await.unwrap();
    assert_eq!(ended.state, JobState::Queued, "{}", ended.message);
    assert!(ended.message.contains(&workers[1].id), "{}", ended.message);
    let recovered = recover(&store).await;
    let known: Vec<String> = recovered
        .snapshot()
        .workers
        .iter()
        .map(|w| w.id.clone())
        .collect();
    assert_eq!(known, [workers[0].id.clone()]);
    assert_eq!(
        recovered.record(&job).await.unwrap().state,
        JobState::Queued
    );
}

/// A store write that takes its time (a slow disk, etcd electing a leader) holds up the
/// decisions behind it, never a heartbeat or a progress report: a healthy worker is not
/// expelled because the disk was slow.
#[tokio::test]
async fn heartbeats_and_progress_do_not_wait_for_a_store_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let coordinator = recover(&store).await;
    let (job, _) = submit(&coordinator, dir.path(), 1).await;
    let (workers, generation) = common::running(&coordinator, 1).await;
    let report = |global_step| ladder_coordinator::state::ProgressReport {
        progress: Some(common::progress_at(global_step)),
        ..Default::default()
    };
    // Reported before the cancel: the cancel's write carries it.
    coordinator
        .report_progress(&workers[0], &job, generation, report(7))
        .await
        .unwrap();
    store.hold_writes(true);
    let cancelling = {
        let (coordinator, job) = (coordinator.clone(), job.clone());
        tokio::spawn(async move { coordinator.cancel(&job).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!cancelling.is_finished(), "the cancel waits for its write");
    let beat = tokio::time::timeout(
        Duration::from_secs(2),
        coordinator.heartbeat(
            &workers[0],
            Signs {
                activity: 7,
                ..Signs::default()
            },
        ),
    )
    .await
    .expect("a heartbeat waited for a store write")
    .unwrap();
    assert_eq!(beat.map(|a| a.generation), Some(generation));
    let answer = tokio::time::timeout(
        Duration::from_secs(2),
        coordinator.report_progress(&workers[0], &job, generation, report(8)),
    )
    .await
    .expect("a progress report waited for a store write")
    .unwrap();
    assert!(answer.current);
    store.hold_writes(false);
    cancelling.await.unwrap().unwrap();
    let recovered = recover(&store).await;
    let saved = recovered.record(&job).await.unwrap();
    assert_eq!(saved.state, JobState::Cancelled);
    assert_eq!(saved.progress.global_step, 7);
}

/// Leases are judged on the monotonic clock from each heartbeat's arrival (here tokio's clock,
/// paused and advanced by the test).
#[tokio::test(start_paused = true)]
async fn a_lease_runs_from_the_last_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let leases = ladder_coordinator::state::Config {
        lease_ttl: Duration::from_secs(10),
        ..config()
    };
    let coordinator = Coordinator::recover(store.clone() as SharedStore, leases)
        .await
        .unwrap();
    let worker = register(&coordinator).await;
    tokio::time::advance(Duration::from_secs(9)).await;
    coordinator
        .heartbeat(&worker, Signs::default())
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(9)).await;
    coordinator.tick().await.unwrap();
    assert_eq!(
        coordinator.snapshot().workers.len(),
        1,
        "9 s since its heartbeat"
    );
    tokio::time::advance(Duration::from_millis(1_100)).await;
    coordinator.tick().await.unwrap();
    assert!(
        coordinator.snapshot().workers.is_empty(),
        "10.1 s since its heartbeat: lost"
    );
}

/// A cluster starting at once: registrations that wait while a write is in flight are written
/// together (group commit), each still durable before its answer.
#[tokio::test]
async fn registrations_arriving_together_are_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let coordinator = recover(&store).await;
    let before = store.transactions();
    store.hold_writes(true);
    let registering: Vec<_> = (0..300)
        .map(|_| {
            let coordinator = coordinator.clone();
            tokio::spawn(async move { register(&coordinator).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.hold_writes(false);
    let mut ids = std::collections::BTreeSet::new();
    for r in registering {
        assert!(ids.insert(r.await.unwrap().id), "an id given twice");
    }
    assert_eq!(ids.len(), 300);
    let writes = store.transactions() - before;
    assert!(
        writes <= 5,
        "300 registrations took {writes} transactions (at most 127 each, and the first alone)"
    );
    let recovered = recover(&store).await;
    assert_eq!(
        recovered.snapshot().workers.len(),
        300,
        "every one was saved"
    );
}

/// `GET path` over HTTP/1.1 at `address` with the submit token: the whole answer.
async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: ladder\r\nAuthorization: Bearer submit\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

/// Readers take the snapshot the decisions publish, never the decision lock: a decision
/// waiting on a slow store (a disk, an etcd election) holds up no scrape, page or `ladder
/// list`, and what it decides is shown at once when it is written.
#[tokio::test]
async fn readers_are_answered_while_a_decision_waits_for_the_store() {
    use ladder_coordinator::{auth::Tokens, http, serving::Serving};
    let dir = tempfile::tempdir().unwrap();
    let store = FlakyStore::open(dir.path());
    let coordinator = recover(&store).await;
    let (job, _) = submit(&coordinator, dir.path(), 1).await;
    let serving = Serving::new("starting");
    serving.lead(coordinator.clone());
    let tokens = Tokens {
        submit: "submit".into(),
        worker: "worker".into(),
        read: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(http::serve(
        listener,
        http::router(serving, tokens),
        None,
        http::ConnectionLimits::default(),
        std::future::pending(),
    ));

    store.hold_writes(true);
    let deciding = tokio::spawn({
        let (coordinator, job) = (coordinator.clone(), job.clone());
        async move { coordinator.cancel(&job).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!deciding.is_finished(), "the cancel waits for the store");
    let soon = Duration::from_secs(2);
    let shown = tokio::time::timeout(soon, coordinator.get(&job))
        .await
        .expect("a job is shown while a decision waits")
        .unwrap();
    assert_eq!(shown.state(), JobState::Queued);
    tokio::time::timeout(soon, coordinator.history(&job))
        .await
        .expect("curves are shown while a decision waits")
        .unwrap();
    for path in [
        "/metrics".to_owned(),
        "/api/jobs".to_owned(),
        format!("/api/jobs/{job}"),
        "/api/workers".to_owned(),
    ] {
        let answer = tokio::time::timeout(soon, http_get(address, &path))
            .await
            .unwrap_or_else(|_| panic!("{path} is answered while a decision waits"));
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        if path == "/api/jobs" {
            assert!(answer.contains(r#""state":"queued""#), "{answer}");
        }
    }

    store.hold_writes(false);
    let cancelled = deciding.await.unwrap().unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert_eq!(
        coordinator.get(&job).await.unwrap().state(),
        JobState::Cancelled,
        "a decision is shown as soon as it is written"
    );
    let listed = http_get(address, "/api/jobs").await;
    assert!(
        !listed.contains(&job) && listed.contains(r#""ended_left_out":1"#),
        "ended jobs are listed on request: {listed}"
    );
    let all = http_get(address, "/api/jobs?include_ended=true").await;
    assert!(all.contains(r#""state":"cancelled""#), "{all}");
}
