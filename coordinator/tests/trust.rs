//! The worker token sits on every node, so the coordinator trusts nothing a worker call says
//! that it can check itself: who is calling (the secret from registration), which rank it holds
//! (the assignment), where a checkpoint lives (`checkpoint.dir/JOB/ID`) and who may be told to
//! write one (rank 0). The coordinator runs in-process on a real redb store.

mod common;

use common::{checkpoint, coordinator_with_job, register, running};
use ladder_coordinator::auth::WorkerIdentity;
use ladder_coordinator::error::CoordinatorError;
use ladder_coordinator::records::{CheckpointRecord, LedgerEntry};
use ladder_coordinator::state::{ProgressReport, RendezvousOutcome, Signs};
use std::path::Path;
use std::time::Duration;

#[tokio::test]
async fn a_worker_is_known_by_its_secret_not_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 1).await;
    let (workers, generation) = running(&coordinator, 1).await;
    let real = &workers[0];
    // Anyone with the worker token can read an id off a log line; only the worker has the
    // secret.
    for forged in [
        WorkerIdentity {
            id: real.id.clone(),
            secret: String::new(),
        },
        WorkerIdentity {
            id: real.id.clone(),
            secret: "0".repeat(64),
        },
    ] {
        let refused = coordinator
            .heartbeat(
                &forged,
                Signs {
                    leaving: true,
                    ..Signs::default()
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(refused, CoordinatorError::NotFound(_)),
            "{refused}"
        );
        let refused = coordinator
            .report_progress(
                &forged,
                &job,
                generation,
                ProgressReport {
                    error: "forged".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("secret"), "{refused}");
        assert!(
            coordinator
                .await_assignment(&forged, Duration::ZERO)
                .await
                .is_err()
        );
    }
    // The forged "leaving" and "failed" calls changed nothing.
    let status = coordinator.record(&job).await.unwrap();
    assert_eq!(status.state.to_string(), "running");
    let listed = coordinator.snapshot().workers.clone();
    assert!(!listed[0].leaving);
    let assignment = coordinator
        .heartbeat(
            real,
            Signs {
                activity: 1,
                ..Signs::default()
            },
        )
        .await
        .unwrap()
        .expect("the real worker is still assigned");
    assert_eq!(assignment.generation, generation);
}

#[tokio::test]
async fn a_rendezvous_files_a_payload_under_the_assigned_rank_only() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 2).await;
    let a = register(&coordinator).await;
    let b = register(&coordinator).await;
    let assigned = coordinator
        .await_assignment(&a, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let other_rank = 1 - assigned.rank;
    let refused = coordinator
        .rendezvous(
            &a,
            &job,
            assigned.generation,
            other_rank,
            b"10.0.0.66:1".to_vec(),
            Duration::ZERO,
        )
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&format!("holds rank {}", assigned.rank)),
        "{refused}"
    );
    // The refused payload was not filed: the other worker, joining under its own rank, still
    // waits for this one.
    let b_assigned = coordinator
        .await_assignment(&b, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let waiting = coordinator
        .rendezvous(
            &b,
            &job,
            b_assigned.generation,
            b_assigned.rank,
            b"b".to_vec(),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(waiting, RendezvousOutcome::Waiting);
    let done = coordinator
        .rendezvous(
            &a,
            &job,
            assigned.generation,
            assigned.rank,
            b"a".to_vec(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let RendezvousOutcome::Complete { payloads, ring_key } = done else {
        panic!("complete once both ranks published: {done:?}");
    };
    let mut expected = vec![Vec::new(); 2];
    expected[assigned.rank as usize] = b"a".to_vec();
    expected[b_assigned.rank as usize] = b"b".to_vec();
    assert_eq!(payloads, expected);
    assert_eq!(
        ring_key.len(),
        32,
        "the generation's ring key comes with it"
    );
}

#[tokio::test]
async fn a_commit_is_taken_from_rank_0_and_only_by_the_name_the_coordinator_gives() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 2).await;
    let (ranks, generation) = running(&coordinator, 2).await;
    let good = checkpoint(generation, 4);
    // Only the id names a directory (no path travels): any other spelling of it would later be
    // handed out to restore from or to delete.
    let named = |id: String| CheckpointRecord { id, ..good.clone() };
    let refusals = [
        named("../../home".into()),
        named(format!("{}/../../../home", good.id)),
        named(format!("/{}", good.id)),
        named("step-4-g1".into()),
        checkpoint(generation + 1, 4),
    ];
    for refused in refusals {
        let outcome = coordinator
            .commit_checkpoint(&ranks[0], &job, generation, refused.clone(), Vec::new())
            .await
            .unwrap();
        let reason = outcome.expect_err("refused");
        assert!(reason.contains("must be named"), "{refused:?}: {reason}");
    }
    let from_rank_1 = coordinator
        .commit_checkpoint(&ranks[1], &job, generation, good.clone(), Vec::new())
        .await
        .unwrap();
    assert!(
        from_rank_1.expect_err("refused").contains("only rank 0"),
        "rank 1 does not write checkpoints"
    );
    assert!(
        coordinator
            .record(&job)
            .await
            .unwrap()
            .checkpoints
            .is_empty()
    );
    coordinator
        .commit_checkpoint(&ranks[0], &job, generation, good.clone(), Vec::new())
        .await
        .unwrap()
        .expect("the named checkpoint is accepted");
    let committed = coordinator.record(&job).await.unwrap().checkpoints;
    assert_eq!(committed.len(), 1);
    assert_eq!(committed[0].id, good.id);
}

#[tokio::test]
async fn only_rank_0_is_asked_to_checkpoint_for_a_leaving_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 2).await;
    let (ranks, generation) = running(&coordinator, 2).await;
    // Rank 1 is asked to stop (SIGTERM): rank 0 must checkpoint, so the job goes on without it.
    coordinator
        .heartbeat(
            &ranks[1],
            Signs {
                leaving: true,
                ..Signs::default()
            },
        )
        .await
        .unwrap();
    // Step reports, which carry progress: a report of only an event (a failed checkpoint's)
    // is not answered with the request, as its answer is not acted on.
    let report = || ProgressReport {
        progress: Some(common::progress_at(3)),
        ..ProgressReport::default()
    };
    let event = coordinator
        .report_progress(&ranks[0], &job, generation, ProgressReport::default())
        .await
        .unwrap();
    assert!(!event.checkpoint_now);
    let rank_1 = coordinator
        .report_progress(&ranks[1], &job, generation, report())
        .await
        .unwrap();
    assert!(rank_1.current);
    assert!(
        !rank_1.checkpoint_now,
        "rank 1 does not write checkpoints, and must not take rank 0's request"
    );
    let rank_0 = coordinator
        .report_progress(&ranks[0], &job, generation, report())
        .await
        .unwrap();
    assert!(rank_0.checkpoint_now);
    let again = coordinator
        .report_progress(&ranks[0], &job, generation, report())
        .await
        .unwrap();
    assert!(!again.checkpoint_now, "said once per request");
}

#[tokio::test]
async fn a_commit_tells_only_epochs_and_stages_the_job_has_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 2).await;
    let (ranks, generation) = running(&coordinator, 2).await;
    let good = checkpoint(generation, 4);
    let tally = |epoch| LedgerEntry {
        checkpoint_step: 0,
        epoch,
        epochs: 1,
        samples: u64::MAX,
        digest: 1,
        skipped: u64::MAX,
    };
    // The job has 4 epochs (0 to 3) in 2 stages.
    let refusals = [
        (good.clone(), vec![tally(4)], "epochs 0 to 3"),
        (good.clone(), vec![tally(u32::MAX)], "epochs 0 to 3"),
        (good.clone(), vec![tally(1), tally(1)], "twice"),
        // Steps 1 to 4 of 3-step epochs are in epochs 0 and 1: a commit tells no other.
        (
            good.clone(),
            vec![tally(3)],
            "its steps (1 to 4) are in epochs 0 to 1",
        ),
        (
            CheckpointRecord {
                epoch: 5,
                ..good.clone()
            },
            Vec::new(),
            "4 epochs in 2 stages",
        ),
        (
            CheckpointRecord {
                stage: 2,
                ..good.clone()
            },
            Vec::new(),
            "4 epochs in 2 stages",
        ),
    ];
    for (refused, trained, why) in refusals {
        let outcome = coordinator
            .commit_checkpoint(&ranks[0], &job, generation, refused.clone(), trained)
            .await
            .unwrap();
        let reason = outcome.expect_err("refused");
        assert!(reason.contains(why), "{refused:?}: {reason}");
    }
    // Counts at the top of the range add up without overflowing, for every reader.
    coordinator
        .commit_checkpoint(
            &ranks[0],
            &job,
            generation,
            good.clone(),
            vec![tally(0), tally(1)],
        )
        .await
        .unwrap()
        .expect("accepted");
    let later = checkpoint(generation, 6);
    coordinator
        .commit_checkpoint(&ranks[0], &job, generation, later, vec![tally(1)])
        .await
        .unwrap()
        .expect("accepted");
    let record = coordinator.record(&job).await.unwrap();
    assert_eq!(record.checkpoints.len(), 2);
    let trained = record.trained();
    assert_eq!(trained.len(), 2);
    assert!(
        trained
            .iter()
            .all(|t| t.samples == u64::MAX && t.skipped == u64::MAX)
    );
}

#[tokio::test]
async fn only_the_checkpoint_being_restored_can_be_reported_bad_and_only_rank_0_shows_progress() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 2).await;
    let (ranks, generation) = running(&coordinator, 2).await;
    let good = checkpoint(generation, 4);
    coordinator
        .commit_checkpoint(&ranks[0], &job, generation, good.clone(), Vec::new())
        .await
        .unwrap()
        .expect("accepted");
    // This generation started afresh: no checkpoint of the job failed its restore.
    let refused = coordinator
        .report_progress(
            &ranks[1],
            &job,
            generation,
            ProgressReport {
                bad_checkpoint: good.id.clone(),
                error: "its files fail their digests".into(),
                ..ProgressReport::default()
            },
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(&refused, CoordinatorError::Invalid(m) if m.contains("not the one")),
        "{refused}"
    );
    let record = coordinator.record(&job).await.unwrap();
    let kept: Vec<&str> = record.checkpoints.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(kept, [good.id.as_str()], "the checkpoint stays");
    assert_eq!(record.generation, generation, "the generation goes on");
    // Rank 1 sends progress only with its end: it is not the job's, nor checked as the job's.
    let wild = ladder_proto::v1::Progress {
        global_step: 999,
        epoch: u32::MAX,
        stage: u32::MAX,
        ..Default::default()
    };
    for (rank, progress) in [(0, common::progress_at(5)), (1, wild)] {
        let report = ProgressReport {
            progress: Some(progress),
            ..ProgressReport::default()
        };
        coordinator
            .report_progress(&ranks[rank], &job, generation, report)
            .await
            .unwrap();
    }
    let shown = coordinator.record(&job).await.unwrap();
    assert_eq!(shown.progress.global_step, 5);
}

#[tokio::test]
async fn a_spec_naming_a_device_or_a_fifo_as_its_manifest_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = coordinator_with_job(dir.path(), 1).await;
    let fifo = dir.path().join("manifest.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for manifest in [Path::new("/dev/zero"), fifo.as_path()] {
        let spec = ladder_testkit::write_spec(dir.path(), "hostile", manifest, (1, 1));
        let spec = ladder_core::spec::JobSpec::load(&spec).unwrap();
        // Read to the end, /dev/zero would take the coordinator's memory, and a FIFO with no
        // writer would hold one of its threads for ever.
        let refused =
            tokio::time::timeout(Duration::from_secs(10), coordinator.submit(&spec.to_toml()))
                .await
                .expect("answered at once")
                .map(|_| ())
                .expect_err("refused");
        assert!(
            matches!(&refused, CoordinatorError::Invalid(m) if m.contains("not a regular file")),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_spec_whose_class_count_is_not_the_datasets_is_refused_with_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = coordinator_with_job(dir.path(), 1).await;
    // The spec says 10 classes; the datasets have 12 and 8.
    for classes in [12, 8] {
        let data = dir.path().join(format!("data-{classes}"));
        let manifest = ladder_testkit::write_dataset(&data, 2, 24, classes);
        let spec = ladder_testkit::write_spec(&data, "classes", &manifest, (1, 1));
        let spec = ladder_core::spec::JobSpec::load(&spec).unwrap();
        let refused = coordinator
            .submit(&spec.to_toml())
            .await
            .map(|_| ())
            .expect_err("refused");
        assert!(
            matches!(&refused, CoordinatorError::Invalid(m)
                if m.contains("model.classes = 10") && m.contains(&format!("has {classes} classes"))),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn only_a_worker_that_left_is_answered_as_gone_when_it_says_so_again() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, _, _) = coordinator_with_job(dir.path(), 2).await;
    let idle = register(&coordinator).await;
    let leaving = Signs {
        leaving: true,
        ..Signs::default()
    };
    for _ in 0..2 {
        let answer = coordinator.heartbeat(&idle, leaving).await.unwrap();
        assert_eq!(answer, None, "gone, and told so again");
    }
    for stranger in [
        WorkerIdentity {
            id: "w-999999".into(),
            secret: String::new(),
        },
        WorkerIdentity {
            id: idle.id.clone(),
            secret: "0".repeat(64),
        },
    ] {
        let refused = coordinator.heartbeat(&stranger, leaving).await.unwrap_err();
        assert!(
            matches!(refused, CoordinatorError::NotFound(_)),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_commit_retry_is_answered_to_the_jobs_workers_only() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, job, _) = coordinator_with_job(dir.path(), 1).await;
    let (ranks, generation) = running(&coordinator, 1).await;
    let committed = checkpoint(generation, 3);
    let commit = |who: WorkerIdentity| {
        let (coordinator, job, committed) = (coordinator.clone(), job.clone(), committed.clone());
        async move {
            coordinator
                .commit_checkpoint(&who, &job, generation, committed, Vec::new())
                .await
        }
    };
    commit(ranks[0].clone()).await.unwrap().expect("committed");
    // The committer's retry (its answer lost) is answered the same; an idle worker's is not
    // answered at all (not refused: a refusal tells its worker to delete the files).
    commit(ranks[0].clone())
        .await
        .unwrap()
        .expect("the same answer");
    let idle = register(&coordinator).await;
    let refused = commit(idle).await.unwrap_err();
    assert!(
        refused.to_string().contains("is not a worker of job"),
        "{refused}"
    );
}
