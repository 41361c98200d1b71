//! The control plane end to end: the real `ladder-coordinator` and `ladder` binaries on
//! loopback, real stores (redb files, an etcd server), SIGKILL, and the worker protocol driven
//! through the real gRPC service.

use ladder_proto::v1 as pb;
use ladder_testkit::{
    CoordinatorProcess, Etcd, Registered, SUBMIT_TOKEN, WORKER_TOKEN, binary, checkpoint_ref,
    free_port, job_client, make_certificates, worker_client, write_dataset, write_spec,
};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Cli<'a> {
    url: String,
    token: &'a str,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(binary("ladder"))
            .args(args)
            .env("LADDER_COORDINATOR", &self.url)
            .env("LADDER_TOKEN", self.token)
            .output()
            .expect("running ladder")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ladder {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr, which must be one line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "ladder {args:?} should fail");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.starts_with("ladder: error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
        err
    }
}

fn last_line(s: &str) -> String {
    s.trim_end().lines().last().unwrap_or_default().to_owned()
}

fn setup(dir: &Path, workers: (u32, u32)) -> std::path::PathBuf {
    let manifest = write_dataset(&dir.join("data"), 3, 20, 10);
    write_spec(dir, "tiny-job", &manifest, workers)
}

/// A coordinator on a fresh redb file in `dir`.
fn redb_coordinator(dir: &Path, extra: &[&str]) -> CoordinatorProcess {
    let store = format!("redb:{}", dir.join("state.redb").display());
    CoordinatorProcess::start(&store, &dir.join("logs"), extra)
}

/// The CLI with the submit token, pointed at `coordinator`.
fn submitter(coordinator: &CoordinatorProcess) -> Cli<'static> {
    Cli {
        url: coordinator.url(),
        token: SUBMIT_TOKEN,
    }
}

#[test]
fn submit_list_status_cancel_and_resume_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 2));
    let coordinator = redb_coordinator(dir.path(), &[]);
    let cli = submitter(&coordinator);

    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));
    assert!(
        id.starts_with("job-"),
        "the id alone on the last line: {id:?}"
    );
    let list = cli.ok(&["list"]);
    assert!(
        list.lines().any(|l| l.starts_with(&format!("{id} "))
            && l.ends_with("  waiting for workers: 0 idle, 1 needed")),
        "{list}"
    );
    let status = cli.ok(&["status", &id]);
    assert!(
        status.contains("queued") && status.contains("tiny-job"),
        "{status}"
    );
    assert!(status.contains("stage        1/2"), "{status}");
    assert!(
        status.contains("workers      none; waiting for workers: 0 idle, 1 needed\n"),
        "{status}"
    );
    // One idle worker for a job that could use two: it waits the rendezvous grace for more.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut worker = worker_client(&coordinator.url(), WORKER_TOKEN).await;
        worker
            .register(pb::RegisterRequest::default())
            .await
            .unwrap();
    });
    let status = cli.ok(&["status", &id]);
    assert!(
        status.contains("workers      none; 1 idle: starting on 1 in ")
            && status.contains(" s unless 2 are idle by then\n"),
        "{status}"
    );

    assert!(cli.ok(&["cancel", &id]).contains("cancelled"));
    let err = cli.fails(&["cancel", &id]);
    assert!(err.contains("already"), "{err}");
    // `wait` gives the ended job's result as its exit status.
    let err = cli.fails(&["wait", &id]);
    assert!(err.contains(&format!("job {id} cancelled")), "{err}");
    cli.ok(&["resume", &id]);
    assert!(cli.ok(&["status", &id]).contains("queued"));
    let err = cli.fails(&["resume", &id, "--checkpoint", "nope"]);
    assert!(
        err.contains("only a completed, failed or cancelled job"),
        "{err}"
    );

    let err = cli.fails(&["status", "job-999999"]);
    assert!(err.contains("no job \"job-999999\""), "{err}");

    // A spec that fails validation is rejected locally, naming the field.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("epochs = 4", "epochs = 0"),
    )
    .unwrap();
    let out = cli.run(&["submit", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("schedule.epochs = 0"), "{err}");
    // A spec whose dataset is missing is rejected by the coordinator, naming the manifest.
    let missing = dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("data/manifest.json", "nowhere/manifest.json"),
    )
    .unwrap();
    let err = cli.fails(&["submit", missing.to_str().unwrap()]);
    assert!(
        err.contains("data.manifest") && err.contains("nowhere/manifest.json"),
        "{err}"
    );
    // A megabyte of bad value is not echoed back whole.
    let huge = "x".repeat(1 << 20);
    let long_name = dir.path().join("long-name.toml");
    std::fs::write(
        &long_name,
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("name = \"tiny-job\"", &format!("name = \"{huge}\"")),
    )
    .unwrap();
    let out = cli.run(&["submit", long_name.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("job.name = ") && err.len() < 1_000,
        "{}",
        &err[..err.len().min(300)]
    );
    let err = cli.fails(&["status", &huge[..100_000]]);
    assert!(
        err.contains("no job ") && err.len() < 1_000,
        "{}",
        &err[..err.len().min(300)]
    );
    assert_eq!(
        cli.ok(&["list"]).lines().count(),
        1,
        "nothing else was submitted"
    );

    // Output into a pipe its reader closed ends quietly.
    let mut listing = Command::new(binary("ladder"))
        .args(["status", &id])
        .env("LADDER_COORDINATOR", &cli.url)
        .env("LADDER_TOKEN", cli.token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(listing.stdout.take());
    let out = listing.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // An ended job can be deleted; a live one cannot.
    let status = cli.ok(&["status", &id]);
    if !status.contains("cancelled") {
        assert!(cli.fails(&["delete", &id]).contains("only an ended job"));
        cli.ok(&["cancel", &id]);
    }
    // Ended jobs are listed on request only; the listing says they are left out.
    let listed = cli.run(&["list"]);
    assert!(listed.status.success() && listed.stdout.is_empty());
    let note = String::from_utf8(listed.stderr).unwrap();
    assert!(note.contains("1 ended job(s) not listed"), "{note}");
    let all = cli.ok(&["list", "--all"]);
    assert!(all.starts_with(&format!("{id}  cancelled")), "{all}");
    cli.ok(&["delete", &id]);
    assert!(cli.fails(&["status", &id]).contains("no job"));
    assert_eq!(cli.ok(&["list"]), "");
}

#[test]
fn tokens_are_required_and_roles_are_separate() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 1));
    let coordinator = redb_coordinator(dir.path(), &[]);
    let spec = spec.to_str().unwrap();

    let err = Cli {
        url: coordinator.url(),
        token: "",
    }
    .fails(&["submit", spec]);
    assert!(err.contains("LADDER_TOKEN"), "{err}");
    let err = Cli {
        url: coordinator.url(),
        token: "wrong",
    }
    .fails(&["list"]);
    assert!(err.contains("invalid token"), "{err}");
    let err = Cli {
        url: coordinator.url(),
        token: WORKER_TOKEN,
    }
    .fails(&["submit", spec]);
    assert!(err.contains("may not use JobService"), "{err}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = coordinator.url();
        let mut anonymous = job_client(&url, "").await;
        let status = anonymous
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let mut submitter_as_worker = worker_client(&url, SUBMIT_TOKEN).await;
        let status = submitter_as_worker
            .register(pb::RegisterRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let mut worker = worker_client(&url, WORKER_TOKEN).await;
        worker
            .register(pb::RegisterRequest::default())
            .await
            .unwrap();
    });
    assert_eq!(
        Cli {
            url: coordinator.url(),
            token: SUBMIT_TOKEN
        }
        .ok(&["list"]),
        ""
    );

    // From a file only its owner can read; never from one every user can.
    let without_env = Cli {
        url: coordinator.url(),
        token: "",
    };
    let token_file = dir.path().join("submit-token");
    std::fs::write(&token_file, format!("{SUBMIT_TOKEN}\n")).unwrap();
    let file_arg = token_file.to_str().unwrap();
    let err = without_env.fails(&["list", "--token-file", file_arg]);
    assert!(
        err.contains("every user") && err.contains("chmod o-rwx"),
        "{err}"
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    without_env.ok(&["list", "--token-file", file_arg]);

    // The health check needs no token, and names what it could not reach.
    assert_eq!(
        without_env.ok(&["health"]).trim(),
        format!("{} serves", coordinator.url())
    );
    let nobody = Cli {
        url: format!("http://127.0.0.1:{}", free_port()),
        token: "",
    };
    let err = nobody.fails(&["health"]);
    assert!(err.contains("cannot reach the coordinator"), "{err}");
}

#[test]
fn the_coordinator_refuses_a_public_address_without_tls_a_missing_token_and_senseless_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    // Starts the coordinator with `flags` (on loopback and `store` unless they say otherwise)
    // and `tokens`; expects it to refuse, saying `says`.
    let refused = |flags: &[&str], tokens: &[(&str, &str)], says: &str| {
        let mut command = Command::new(binary("ladder-coordinator"));
        for (flag, value) in [("--listen", "127.0.0.1:0"), ("--store", store.as_str())] {
            if !flags.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command
            .args(flags)
            .env_remove("LADDER_SUBMIT_TOKEN")
            .env_remove("LADDER_WORKER_TOKEN")
            .envs(tokens.iter().copied());
        let out = command.output().unwrap();
        assert!(!out.status.success(), "{flags:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{flags:?}: {err}");
    };
    let tokens = [("LADDER_SUBMIT_TOKEN", "a"), ("LADDER_WORKER_TOKEN", "b")];
    refused(&["--listen", "0.0.0.0:0"], &tokens, "without TLS");
    refused(&["--listen", "0.0.0.0:0"], &tokens, "--tls-cert");
    // The metrics and the status page follow the same rule.
    refused(
        &["--http-listen", "0.0.0.0:0"],
        &tokens,
        "(--http-listen) without TLS",
    );
    refused(&[], &tokens[1..], "LADDER_SUBMIT_TOKEN");
    refused(&["--store", "mysql://x"], &tokens, "redb:PATH");
    // Leases and timeouts out of range: a lease of 0 would expire every worker at once, one of
    // 2^32 ms would wrap around; a stall cannot be judged between two heartbeats.
    for (flags, says) in [
        (&["--lease-ttl-ms", "0"][..], "--lease-ttl-ms"),
        (&["--lease-ttl-ms", "4294967296"][..], "--lease-ttl-ms"),
        (&["--leader-ttl-s", "0"][..], "--leader-ttl-s"),
        (
            &["--rendezvous-grace-ms", "99999999999"][..],
            "--rendezvous-grace-ms",
        ),
        (
            &["--lease-ttl-ms", "20000", "--stall-timeout-ms", "5000"][..],
            "shorter than --lease-ttl-ms",
        ),
    ] {
        refused(flags, &tokens, says);
    }
}

#[test]
fn tls_serves_clients_that_trust_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certificates(dir.path(), &["DNS:localhost", "IP:127.0.0.1"]);
    let http = format!("127.0.0.1:{}", free_port());
    let coordinator = redb_coordinator(
        dir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--http-listen",
            &http,
        ],
    );
    // The metrics are served over TLS with the same certificate.
    let mut client = Command::new("openssl")
        .args(["s_client", "-connect", &http, "-servername", "localhost"])
        .args([
            "-CAfile",
            ca.to_str().unwrap(),
            "-verify_return_error",
            "-quiet",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = client.stdin.take().unwrap();
        stdin
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        // -quiet goes on past the end of input, until the server closes the connection.
    }
    let scraped = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&scraped.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("ladder_workers{state=\"idle\"} 0"),
        "{text}\n{}",
        String::from_utf8_lossy(&scraped.stderr)
    );
    assert!(
        ladder_testkit::http_get(&http, "/metrics").is_err(),
        "plain HTTP is not served on the TLS port"
    );
    let https = format!("https://localhost:{}", coordinator.address.port());
    let trusted = Command::new(binary("ladder"))
        .args(["list", "--tls-ca", ca.to_str().unwrap()])
        .env("LADDER_COORDINATOR", &https)
        .env("LADDER_TOKEN", SUBMIT_TOKEN)
        .output()
        .unwrap();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let untrusted = Cli {
        url: https,
        token: SUBMIT_TOKEN,
    }
    .fails(&["list"]);
    assert!(!untrusted.is_empty());
    let plain = submitter(&coordinator).fails(&["list"]);
    assert!(!plain.is_empty(), "plaintext is not served on a TLS port");
}

/// Registers a worker and drives it to a running job (of a spec [`setup`] wrote in `dir`) with
/// a committed checkpoint.
async fn run_one_worker(url: &str, job_id: &str) -> (pb::WorkerIdentity, u64) {
    let mut worker = worker_client(url, WORKER_TOKEN).await;
    let identity = worker
        .register(pb::RegisterRequest {
            hostname: "test".into(),
            device: "cpu".into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .identity();
    let assignment = worker
        .await_assignment(pb::AwaitAssignmentRequest {
            worker: Some(identity.clone()),
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assignment.job_id, job_id);
    assert_eq!((assignment.rank, assignment.world_size), (0, 1));
    let rendezvous = worker
        .rendezvous(pb::RendezvousRequest {
            worker: Some(identity.clone()),
            job_id: job_id.into(),
            generation: assignment.generation,
            rank: 0,
            payload: b"127.0.0.1:1".to_vec(),
            wait_ms: 5_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(rendezvous.complete && rendezvous.current);
    assert_eq!(rendezvous.payloads, vec![b"127.0.0.1:1".to_vec()]);
    let progress = pb::Progress {
        stage: 0,
        epoch: 1,
        step: 3,
        steps_per_epoch: 3,
        loss: 2.0,
        images_per_second: 10.0,
        image_size: 64,
        global_step: 6,
        graph_builds: 1,
        ..Default::default()
    };
    let current = worker
        .report_progress(pb::ReportProgressRequest {
            worker: Some(identity.clone()),
            job_id: job_id.into(),
            generation: assignment.generation,
            progress: Some(progress),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .current;
    assert!(current);
    let commit = worker
        .commit_checkpoint(first_checkpoint(&identity, job_id, assignment.generation))
        .await
        .unwrap()
        .into_inner();
    assert!(commit.accepted, "{}", commit.reason);
    (identity, assignment.generation)
}

/// The checkpoint [`run_one_worker`] commits: step 3, in epoch 1.
fn first_checkpoint(
    identity: &pb::WorkerIdentity,
    job_id: &str,
    generation: u64,
) -> pb::CommitCheckpointRequest {
    pb::CommitCheckpointRequest {
        worker: Some(identity.clone()),
        job_id: job_id.into(),
        generation,
        checkpoint: Some(pb::CheckpointRef {
            epoch: 1,
            ..checkpoint_ref(generation, 3)
        }),
        ..Default::default()
    }
}

/// A job on a fresh redb coordinator, driven by [`run_one_worker`] to running with its first
/// checkpoint committed.
struct OneWorkerJob {
    coordinator: CoordinatorProcess,
    id: String,
    identity: pb::WorkerIdentity,
    generation: u64,
    rt: tokio::runtime::Runtime,
}

impl OneWorkerJob {
    fn start(dir: &Path) -> OneWorkerJob {
        let spec = setup(dir, (1, 1));
        let coordinator = redb_coordinator(dir, &[]);
        let id = last_line(&submitter(&coordinator).ok(&["submit", spec.to_str().unwrap()]));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (identity, generation) = rt.block_on(run_one_worker(&coordinator.url(), &id));
        OneWorkerJob {
            coordinator,
            id,
            identity,
            generation,
            rt,
        }
    }

    /// Commits the checkpoint of global step `step` (in its epoch: [`setup`]'s jobs have 3
    /// steps each), with what its steps trained.
    fn commit(&self, step: u64, trained: Vec<pb::EpochTally>) -> pb::CommitCheckpointResponse {
        let mut request = first_checkpoint(&self.identity, &self.id, self.generation);
        request.checkpoint = Some(pb::CheckpointRef {
            epoch: (step / 3) as u32,
            ..checkpoint_ref(self.generation, step)
        });
        request.trained = trained;
        self.rt.block_on(async {
            worker_client(&self.coordinator.url(), WORKER_TOKEN)
                .await
                .commit_checkpoint(request)
                .await
                .unwrap()
                .into_inner()
        })
    }
}

fn state_survives_kill_9(store: &str, dir: &Path) {
    let spec = setup(dir, (1, 1));
    let logs = dir.join("logs");
    let coordinator = CoordinatorProcess::start(store, &logs, &["--lease-ttl-ms", "4000"]);
    let cli = submitter(&coordinator);
    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (identity, generation) = rt.block_on(run_one_worker(&coordinator.url(), &id));
    coordinator.kill9();

    let restarted = CoordinatorProcess::start(store, &logs, &["--lease-ttl-ms", "4000"]);
    let cli = submitter(&restarted);
    let status = cli.ok(&["status", &id]);
    assert!(status.contains("running"), "{status}");
    assert!(
        status.contains(&format!("generation   {generation}")),
        "{status}"
    );
    assert!(
        status.contains("step-000000003-g1"),
        "the committed checkpoint survived: {status}"
    );
    assert!(status.contains("epoch        2/4"), "{status}");
    rt.block_on(async {
        // The worker's lease and assignment survived too: its heartbeat is accepted as is.
        let mut worker = worker_client(&restarted.url(), WORKER_TOKEN).await;
        let beat = worker
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(identity.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (beat.job_id.as_str(), beat.generation),
            (id.as_str(), generation)
        );
        // A new job gets a new id: the counter survived.
        let second = job_client(&restarted.url(), SUBMIT_TOKEN)
            .await
            .submit_job(pb::SubmitJobRequest {
                spec_toml: ladder_core::spec::JobSpec::load(&spec).unwrap().to_toml(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        assert_ne!(second.id, id);
    });
}

/// Also what `ladder workers` shows meanwhile: the recovered worker not heard from, then its
/// job and rank, beside a new idle one.
#[test]
fn after_a_restart_a_recovered_worker_gets_no_new_job_until_it_shows_it_is_alive() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 1));
    let coordinator = redb_coordinator(dir.path(), &["--lease-ttl-ms", "4000"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let idle = rt.block_on(async {
        let mut worker = worker_client(&coordinator.url(), WORKER_TOKEN).await;
        worker
            .register(pb::RegisterRequest::default())
            .await
            .unwrap()
            .into_inner()
            .identity()
    });
    coordinator.kill9();

    // The idle worker may have died with the coordinator: the job waits for a sign of life
    // instead of its lease running out.
    let restarted = redb_coordinator(dir.path(), &["--lease-ttl-ms", "4000"]);
    let cli = submitter(&restarted);
    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));
    std::thread::sleep(Duration::from_millis(500));
    let status = cli.ok(&["status", &id]);
    assert!(status.contains("queued"), "{status}");
    assert!(
        status.contains(
            "workers      none; waiting for workers: 0 idle, 1 needed (1 more registered, not \
             heard from since the coordinator started)"
        ),
        "`ladder status` says what a queued job waits for: {status}"
    );
    let workers = cli.ok(&["workers"]);
    assert_eq!(
        workers.trim_end(),
        format!(
            "{}  -  -  -  idle  not heard from since the coordinator started",
            idle.id
        ),
        "`ladder workers` says why the job waits"
    );
    rt.block_on(async {
        let mut worker = worker_client(&restarted.url(), WORKER_TOKEN).await;
        worker
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(idle.clone()),
                ..Default::default()
            })
            .await
            .unwrap();
        let assignment = worker
            .await_assignment(pb::AwaitAssignmentRequest {
                worker: Some(idle.clone()),
                wait_ms: 5_000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(assignment.job_id, id, "assigned once it sent a heartbeat");
        worker
            .register(pb::RegisterRequest {
                hostname: "node-7".into(),
                device: "cuda:3".into(),
                name: "slot-b".into(),
            })
            .await
            .unwrap();
    });
    let workers = cli.ok(&["workers"]);
    let lines: Vec<&str> = workers.lines().collect();
    assert_eq!(lines.len(), 2, "{workers}");
    assert!(
        lines[0].starts_with(&format!(
            "{}  -  -  -  {id} rank 0 (generation 1)  quiet ",
            idle.id
        )),
        "{workers}"
    );
    assert!(lines[0].contains("  lease "), "{workers}");
    assert!(
        lines[1].contains("  slot-b  node-7  cuda:3  idle  lease "),
        "{workers}"
    );
}

#[test]
fn redb_state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    state_survives_kill_9(&store, dir.path());
}

#[test]
fn etcd_state_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start();
    state_survives_kill_9(&etcd.store(), dir.path());
}

#[test]
fn a_lost_worker_ends_the_generation_and_a_new_one_restores_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 1));
    let coordinator = redb_coordinator(dir.path(), &["--lease-ttl-ms", "1000"]);
    let cli = submitter(&coordinator);
    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = coordinator.url();
        let (lost, generation) = run_one_worker(&url, &id).await;
        // The worker stops heartbeating; its lease runs out.
        let mut jobs = job_client(&url, SUBMIT_TOKEN).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let job = loop {
            let job = jobs
                .get_job(pb::GetJobRequest { id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if job.state == pb::JobState::Queued as i32 {
                break job;
            }
            assert!(
                Instant::now() < deadline,
                "the lost worker was not detected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            job.message.contains(&lost.id) && job.message.contains("lease expired"),
            "{}",
            job.message
        );

        let mut worker = worker_client(&url, WORKER_TOKEN).await;
        let status = worker
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(lost),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert!(
            status.message().contains("register again"),
            "{}",
            status.message()
        );

        let replacement = worker
            .register(pb::RegisterRequest::default())
            .await
            .unwrap()
            .into_inner()
            .identity();
        let assignment = worker
            .await_assignment(pb::AwaitAssignmentRequest {
                worker: Some(replacement),
                wait_ms: 10_000,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(assignment.job_id, id);
        assert_eq!(assignment.generation, generation + 1);
        assert_eq!(assignment.restore_from.unwrap().id, "step-000000003-g1");
    });
}

#[test]
fn stale_generations_are_refused_and_watch_follows_a_job_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (2, 2));
    let coordinator = redb_coordinator(dir.path(), &[]);
    let cli = submitter(&coordinator);
    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));
    let mut watch = Command::new(binary("ladder"))
        .args(["status", "--watch", &id])
        .env("LADDER_COORDINATOR", coordinator.url())
        .env("LADDER_TOKEN", SUBMIT_TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The watch shows the queued job before any worker comes (on a busy machine it could
    // otherwise connect only once the job runs).
    let mut watched = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut watched, &mut first).unwrap();
    assert!(first.contains("queued"), "{first}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = coordinator.url();
        let mut ranks = Vec::new();
        for _ in 0..2 {
            let mut w = worker_client(&url, WORKER_TOKEN).await;
            let id = w
                .register(pb::RegisterRequest::default())
                .await
                .unwrap()
                .into_inner()
                .identity();
            ranks.push((w, id));
        }
        let mut assignments = Vec::new();
        for (w, wid) in ranks.iter_mut() {
            let a = w
                .await_assignment(pb::AwaitAssignmentRequest {
                    worker: Some(wid.clone()),
                    wait_ms: 10_000,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(a.world_size, 2);
            assignments.push(a);
        }
        let mut ranks_seen: Vec<u32> = assignments.iter().map(|a| a.rank).collect();
        ranks_seen.sort();
        assert_eq!(ranks_seen, [0, 1]);
        // Both ranks publish concurrently and both see both payloads.
        let mut handles = Vec::new();
        for ((w, wid), a) in ranks.iter().zip(&assignments) {
            let (mut w, wid, a, job) = (w.clone(), wid.clone(), a.clone(), id.clone());
            handles.push(tokio::spawn(async move {
                w.rendezvous(pb::RendezvousRequest {
                    worker: Some(wid),
                    job_id: job,
                    generation: a.generation,
                    rank: a.rank,
                    payload: format!("rank{}", a.rank).into_bytes(),
                    wait_ms: 10_000,
                })
                .await
                .unwrap()
                .into_inner()
            }));
        }
        for h in handles {
            let r = h.await.unwrap();
            assert!(r.complete);
            assert_eq!(r.payloads, vec![b"rank0".to_vec(), b"rank1".to_vec()]);
        }
        // An old generation's report is refused.
        let (w, wid) = &mut ranks[0];
        let stale = w
            .report_progress(pb::ReportProgressRequest {
                worker: Some(wid.clone()),
                job_id: id.clone(),
                generation: assignments[0].generation - 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!stale.current);
        let rank0 = assignments.iter().position(|a| a.rank == 0).unwrap();
        let (w, wid) = &mut ranks[rank0];
        let done = w
            .report_progress(pb::ReportProgressRequest {
                worker: Some(wid.clone()),
                job_id: id.clone(),
                generation: assignments[rank0].generation,
                finished: true,
                progress: Some(pb::Progress {
                    epoch: 3,
                    stage: 1,
                    step: 3,
                    steps_per_epoch: 3,
                    global_step: 12,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(done.current);
    });
    let mut lines = String::new();
    std::io::Read::read_to_string(&mut watched, &mut lines).unwrap();
    assert!(watch.wait().unwrap().success());
    assert!(
        lines
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("completed"),
        "{lines}"
    );
    assert!(cli.ok(&["wait", &id]).contains("completed"));
}

#[test]
fn an_etcd_standby_takes_over_within_the_leader_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start();
    let spec = setup(dir.path(), (1, 1));
    let logs = dir.path().join("logs");
    let ttl = ["--leader-ttl-s", "2"];
    let leader = CoordinatorProcess::start(&etcd.store(), &logs, &ttl);
    let standby_address = format!("127.0.0.1:{}", free_port());
    let standby = CoordinatorProcess::spawn(
        &etcd.store(),
        &logs,
        &["--leader-ttl-s", "2", "--listen", &standby_address],
    );
    let cli = submitter(&leader);
    let id = last_line(&cli.ok(&["submit", spec.to_str().unwrap()]));

    // The standby has bound its port (it campaigns after) but does not answer: a client
    // that lists it first must move on to the leader instead of waiting on it.
    let bound = Instant::now();
    while !std::fs::read_dir(&logs).unwrap().any(|entry| {
        std::fs::read_to_string(entry.unwrap().path())
            .is_ok_and(|log| log.contains("campaigning for leadership"))
    }) {
        assert!(bound.elapsed() < Duration::from_secs(30), "no standby");
        std::thread::sleep(Duration::from_millis(50));
    }
    let both = format!("http://{standby_address},{}", leader.url());
    let mut status = Command::new(binary("ladder"))
        .args(["status", &id])
        .env("LADDER_COORDINATOR", &both)
        .env("LADDER_TOKEN", SUBMIT_TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let asked = Instant::now();
    while status.try_wait().unwrap().is_none() {
        if asked.elapsed() > Duration::from_secs(20) {
            let _ = status.kill();
            panic!("a client listing the standby first still waits on it after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = status.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("queued"));

    // A watch outlives the leader: it reaches the standby once that leads, and follows the job
    // to its end there.
    let mut watch = Command::new(binary("ladder"))
        .args(["status", "--watch", &id])
        .env("LADDER_COORDINATOR", &both)
        .env("LADDER_TOKEN", SUBMIT_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut watched_lines = std::io::BufReader::new(watch.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut watched_lines, &mut first).unwrap();
    assert!(first.contains("queued"), "{first}");

    let killed = Instant::now();
    leader.kill9();
    let standby = CoordinatorProcess::until_serving(standby, &logs, Duration::from_secs(15));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(2_000 + 1_500),
        "takeover took {took:?} with a 2 s lease"
    );
    let cli = submitter(&standby);
    assert!(
        cli.ok(&["status", &id]).contains("queued"),
        "the new leader has the job"
    );
    cli.ok(&["cancel", &id]);
    let mut lines = String::new();
    std::io::Read::read_to_string(&mut watched_lines, &mut lines).unwrap();
    let watched = watch.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&watched.stderr);
    assert!(watched.status.success(), "{said}");
    assert!(said.contains("lost the coordinator"), "{said}");
    assert!(
        lines
            .lines()
            .last()
            .is_some_and(|l| l.contains("cancelled")),
        "{lines}"
    );
}

#[test]
fn dataset_index_reports_bad_shards_by_name_and_indexes_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_dataset(&data, 2, 5, 10);
    std::fs::remove_file(data.join("manifest.json")).unwrap();
    let cli = Cli {
        url: String::new(),
        token: "",
    };
    let out = cli.ok(&[
        "dataset",
        "index",
        data.to_str().unwrap(),
        "--classes",
        "10",
    ]);
    assert!(
        out.contains("indexed 10 samples in 2 shards, 10 classes"),
        "{out}"
    );
    assert!(data.join("manifest.json").exists());

    std::fs::write(
        data.join("shard-000002.tar"),
        b"definitely not a tar archive",
    )
    .unwrap();
    let out = cli.run(&["dataset", "index", data.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("shard-000002.tar"),
        "names the bad shard: {err}"
    );
}

#[test]
fn the_coordinator_logs_json_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let coordinator = redb_coordinator(dir.path(), &["--log-format", "json"]);
    submitter(&coordinator).ok(&["list"]);
    coordinator.kill9();
    let log = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("recovered state"), "{text}");
    for line in text.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON line: {line}"
        );
    }
}

#[test]
fn dataset_synth_and_import_write_indexed_shards() {
    let dir = tempfile::tempdir().unwrap();
    let cli = Cli {
        url: String::new(),
        token: "",
    };
    let synth = dir.path().join("synth");
    let out = cli.ok(&[
        "dataset",
        "synth",
        synth.to_str().unwrap(),
        "--classes",
        "3",
        "--samples",
        "12",
        "--shards",
        "2",
    ]);
    assert!(
        out.contains("indexed 12 samples in 2 shards, 3 classes, 0 issue(s)"),
        "{out}"
    );

    // An ImageFolder tree made of the synthetic JPEGs, plus a stray text file.
    let tree = dir.path().join("tree");
    for (class, count) in [("n01440764", 3), ("n01443537", 2)] {
        std::fs::create_dir_all(tree.join(class)).unwrap();
        for i in 0..count {
            let image = ladder_data::synth::draw(i, 3, i as u64, 0);
            std::fs::write(
                tree.join(class).join(format!("{class}_{i}.JPEG")),
                ladder_data::synth::encode_jpeg(&image, 85),
            )
            .unwrap();
        }
    }
    std::fs::write(tree.join("n01440764/notes.txt"), "not an image").unwrap();
    // Named like images, but one is empty and one is text: left out, reported.
    std::fs::write(tree.join("n01443537/empty.JPEG"), b"").unwrap();
    std::fs::write(tree.join("n01443537/renamed.JPEG"), b"<html>404</html>").unwrap();
    // A class folder without a usable image is refused, as torchvision's ImageFolder does.
    std::fs::create_dir_all(tree.join("n99999999")).unwrap();
    std::fs::write(tree.join("n99999999/empty.png"), b"").unwrap();
    let refused = cli.fails(&[
        "dataset",
        "import",
        tree.to_str().unwrap(),
        dir.path().join("refused").to_str().unwrap(),
    ]);
    assert!(
        refused.contains("class(es) with no usable image: n99999999"),
        "{refused}"
    );
    std::fs::remove_dir_all(tree.join("n99999999")).unwrap();
    let dest = dir.path().join("imported");
    let output = cli.run(&[
        "dataset",
        "import",
        tree.to_str().unwrap(),
        dest.to_str().unwrap(),
        "--shard-samples",
        "2",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("indexed 5 samples in 3 shards, 2 classes"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for stray in ["notes.txt", "empty.JPEG", "renamed.JPEG"] {
        assert!(stderr.contains(stray), "{stray} is reported: {stderr}");
    }
    let classes: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dest.join("classes.json")).unwrap()).unwrap();
    assert_eq!(classes, ["n01440764", "n01443537"]);
    // No class has more than the 50 images held out by default: all of them train.
    assert!(stdout.contains("held out nothing"), "{stdout}");
    assert!(!dest.join("val").exists());
    let data = ladder_data::loader::Dataset::open(&dest.join("train/manifest.json")).unwrap();
    let mut labels: Vec<u32> = data
        .read(&[0, 1, 2, 3, 4])
        .0
        .iter()
        .map(|s| s.label)
        .collect();
    labels.sort();
    assert_eq!(labels, [0, 0, 0, 1, 1]);

    // A held-out split: 2 images of each class, classes of 2 images or fewer set aside.
    let split_tree = dir.path().join("split-tree");
    for (class, count) in [("a", 8u32), ("b", 5), ("c", 2)] {
        std::fs::create_dir_all(split_tree.join(class)).unwrap();
        for i in 0..count {
            let image = ladder_data::synth::draw(i % 3, 3, i as u64, count as u64);
            std::fs::write(
                split_tree.join(class).join(format!("{i}.jpg")),
                ladder_data::synth::encode_jpeg(&image, 85),
            )
            .unwrap();
        }
    }
    let split = |name: &str| {
        let dest = dir.path().join(name);
        let out = cli.ok(&[
            "dataset",
            "import",
            split_tree.to_str().unwrap(),
            dest.to_str().unwrap(),
            "--held-out",
            "2",
            "--min-class-images",
            "2",
            "--shard-samples",
            "4",
            "--seed",
            "3",
        ]);
        (dest, out)
    };
    let (first, out) = split("split-1");
    assert!(
        out.contains("indexed 9 samples in 3 shards, 2 classes"),
        "{out}"
    );
    assert!(
        out.contains("indexed 4 samples in 1 shards, 2 classes"),
        "{out}"
    );
    assert!(
        out.contains("set aside 1 class(es) with 2 images or fewer: c"),
        "{out}"
    );
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(first.join("classes.json")).unwrap())
            .unwrap();
    assert_eq!(names, ["a", "b"]);
    let samples = |set: &str| {
        let data =
            ladder_data::loader::Dataset::open(&first.join(set).join("manifest.json")).unwrap();
        let ids: Vec<u64> = (0..data.len()).collect();
        let mut all: Vec<(u32, Vec<u8>)> = data
            .read(&ids)
            .0
            .into_iter()
            .map(|s| (s.label, s.bytes.unwrap()))
            .collect();
        all.sort();
        all
    };
    let (train, val) = (samples("train"), samples("val"));
    let labels = |set: &[(u32, Vec<u8>)]| set.iter().map(|(l, _)| *l).collect::<Vec<_>>();
    assert_eq!(labels(&val), [0, 0, 1, 1], "two of each kept class");
    assert_eq!(labels(&train), [0, 0, 0, 0, 0, 0, 1, 1, 1]);
    assert!(
        val.iter().all(|v| !train.contains(v)),
        "no image both trains and is held out"
    );
    // The same seed makes the same split.
    let (second, _) = split("split-2");
    for set in ["train", "val"] {
        assert_eq!(
            std::fs::read(first.join(set).join("manifest.json")).unwrap(),
            std::fs::read(second.join(set).join("manifest.json")).unwrap(),
            "{set}"
        );
    }

    // A truncated download starts like a JPEG: imported as it is, unless --verify decodes it.
    let odd_tree = dir.path().join("odd-tree");
    std::fs::create_dir_all(odd_tree.join("x")).unwrap();
    for i in 0..3u64 {
        let jpeg = ladder_data::synth::encode_jpeg(&ladder_data::synth::draw(0, 3, i, 9), 85);
        std::fs::write(odd_tree.join("x").join(format!("{i}.jpg")), &jpeg).unwrap();
        if i == 0 {
            std::fs::write(odd_tree.join("x/truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
        }
    }
    let import = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "dataset",
            "import",
            odd_tree.to_str().unwrap(),
            name,
            "--held-out",
            "0",
        ];
        args.extend(extra);
        cli.run(&args)
    };
    let trusting = import(dir.path().join("odd-1").to_str().unwrap(), &[]);
    assert!(String::from_utf8_lossy(&trusting.stdout).contains("indexed 4 samples"));
    let verified = import(dir.path().join("odd-2").to_str().unwrap(), &["--verify"]);
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("indexed 3 samples"),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let report = String::from_utf8_lossy(&verified.stderr);
    assert!(
        report.contains("truncated.jpg: does not decode"),
        "{report}"
    );
}

/// The spec at `spec`, changed by `edit`, written beside it as `name`.
fn spec_with(spec: &Path, name: &str, edit: impl Fn(&str) -> String) -> std::path::PathBuf {
    let text = edit(&std::fs::read_to_string(spec).unwrap());
    let path = spec.with_file_name(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn submit_refuses_paths_a_worker_could_not_use_and_another_jobs_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 1));
    let coordinator = redb_coordinator(dir.path(), &[]);
    let cli = submitter(&coordinator);

    // A fresh store numbers jobs from 1 again: job-000001's checkpoints here are another job's.
    let foreign = dir.path().join("checkpoints/job-000001/step-000000002-g1");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("model.safetensors"), b"another job's weights").unwrap();
    let err = cli.fails(&["submit", spec.to_str().unwrap()]);
    assert!(err.contains("checkpoint.dir"), "{err}");
    assert!(err.contains("already holds files"), "{err}");
    assert_eq!(
        std::fs::read(foreign.join("model.safetensors")).unwrap(),
        b"another job's weights"
    );

    let unwritable = spec_with(&spec, "unwritable.toml", |t| {
        t.replace(
            r#"dir = "checkpoints""#,
            r#"dir = "/proc/ladder-checkpoints""#,
        )
    });
    let err = cli.fails(&["submit", unwritable.to_str().unwrap()]);
    assert!(
        err.contains("checkpoint.dir: /proc/ladder-checkpoints cannot be written"),
        "{err}"
    );

    let fresh = |t: &str| t.replace(r#"dir = "checkpoints""#, r#"dir = "fresh""#);
    // Paths a worker would fail on only once the job started.
    for (section, line, expected) in [
        (
            "[data]\n",
            "eval_manifest = \"missing/manifest.json\"\n",
            "data.eval_manifest",
        ),
        (
            "[model]\n",
            "init_from = \"missing.safetensors\"\n",
            "model.init_from: ",
        ),
    ] {
        let missing = spec_with(&spec, "missing.toml", |t| {
            fresh(t).replace(section, &format!("{section}{line}"))
        });
        let err = cli.fails(&["submit", missing.to_str().unwrap()]);
        assert!(err.contains(expected) && err.contains("missing"), "{err}");
    }

    // Nothing was queued, and a good spec still goes through as job-000001.
    let good = spec_with(&spec, "good.toml", fresh);
    assert_eq!(
        last_line(&cli.ok(&["submit", good.to_str().unwrap()])),
        "job-000001"
    );
    // Its log went to a file: plain text, no terminal colour codes.
    for entry in std::fs::read_dir(dir.path().join("logs")).unwrap() {
        let log = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(log.contains("job submitted"), "{log}");
        assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
    }
}

#[test]
fn checkpoint_failures_are_incidents_until_the_job_is_failed_and_a_commit_retry_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let job = OneWorkerJob::start(dir.path());
    let (id, identity, generation) = (&job.id, &job.identity, job.generation);
    let cli = submitter(&job.coordinator);
    // Retention (3 kept): the fourth commit retires the first, and a retry of it whose answer
    // was lost is told the same, so its files are still deleted.
    for step in [6, 9] {
        assert!(job.commit(step, Vec::new()).retired.is_empty());
    }
    let retired_ids = |reply: pb::CommitCheckpointResponse| -> Vec<String> {
        assert!(reply.accepted, "{}", reply.reason);
        reply.retired.into_iter().map(|c| c.id).collect()
    };
    assert_eq!(
        retired_ids(job.commit(12, Vec::new())),
        ["step-000000003-g1"]
    );
    assert_eq!(
        retired_ids(job.commit(12, Vec::new())),
        ["step-000000003-g1"]
    );
    // An older commit retried after newer ones (its first answer lost): accepted, not refused,
    // since a refusal makes the worker delete the files; nothing more to delete.
    assert!(retired_ids(job.commit(9, Vec::new())).is_empty());
    job.rt.block_on(async {
        let mut worker = worker_client(&job.coordinator.url(), WORKER_TOKEN).await;
        for attempt in 1..=3 {
            let reply = worker
                .report_progress(pb::ReportProgressRequest {
                    worker: Some(identity.clone()),
                    job_id: id.clone(),
                    generation,
                    checkpoint_error: "No space left on device (os error 28)".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let status = cli.ok(&["status", id]);
            if attempt < 3 {
                assert!(reply.current);
                assert!(status.contains("running"), "{status}");
                assert!(
                    status.contains(&format!("checkpoint not written ({attempt} in a row)")),
                    "{status}"
                );
                // A report without progress leaves the job's progress as it was.
                assert!(status.contains("epoch        2/4"), "{status}");
            } else {
                assert!(!reply.current);
                assert!(status.contains("failed"), "{status}");
                assert!(
                    status.contains("3 checkpoints in a row could not be written"),
                    "{status}"
                );
                assert!(status.contains("No space left on device"), "{status}");
            }
        }
    });
    // Resumed, the job's next rank 0 is told what the newest commit retired, to delete what
    // is left of it (the worker told first may have died before it did).
    let assignment = job.rt.block_on(async {
        let mut worker = worker_client(&job.coordinator.url(), WORKER_TOKEN).await;
        let beat = worker
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(identity.clone()),
                ..Default::default()
            })
            .await;
        cli.ok(&["resume", id]);
        // Its lease (2 s) may have run out on a slow machine: then a new worker takes the job
        // (in a later generation if the old one was assigned it first).
        let alive = match beat {
            Ok(_) => identity.clone(),
            Err(_) => worker
                .register(pb::RegisterRequest::default())
                .await
                .unwrap()
                .into_inner()
                .identity(),
        };
        worker
            .await_assignment(pb::AwaitAssignmentRequest {
                worker: Some(alive),
                wait_ms: 10_000,
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert_eq!(assignment.rank, 0);
    assert!(assignment.generation > generation);
    let retired: Vec<&str> = assignment.retired.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(retired, ["step-000000003-g1"]);
}

#[test]
fn resuming_from_an_older_checkpoint_drops_the_later_ones_from_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let job = OneWorkerJob::start(dir.path());
    let (cli, id) = (submitter(&job.coordinator), &job.id);
    // Steps 4 and 5 train 10 samples each of epoch 1 (the first commit, step 3, none).
    for step in [4, 5] {
        let trained = vec![pb::EpochTally {
            epoch: 1,
            epochs: 1,
            samples: 10,
            digest: step,
            skipped: 0,
        }];
        let reply = job.commit(step, trained);
        assert!(reply.accepted, "{}", reply.reason);
    }
    assert!(cli.ok(&["status", id]).contains("20 samples per epoch"));
    cli.ok(&["cancel", id]);
    let resumed = cli.run(&["resume", id, "--checkpoint", "step-000000004-g1"]);
    let said = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{said}");
    assert!(
        said.contains("(step-000000005-g1)") && said.contains("the job's history"),
        "{said}"
    );
    // The idle worker takes the next generation, which starts from step 4: step 5 and what it
    // trained are gone from the record (the default restore point, `status`, the ledger).
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = cli.ok(&["status", id]);
        if status.contains("generation   2") {
            break status;
        }
        assert!(Instant::now() < deadline, "no second generation: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.contains("checkpoint   step-000000004-g1 "),
        "{status}"
    );
    assert!(status.contains("10 samples per epoch"), "{status}");
}

#[test]
fn dataset_tools_never_mix_into_an_existing_dataset_or_take_senseless_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cli = Cli {
        url: String::new(),
        token: "",
    };
    let path = data.to_str().unwrap();
    cli.ok(&["dataset", "synth", path, "--samples", "30", "--shards", "2"]);
    let manifest = std::fs::read(data.join("manifest.json")).unwrap();

    let err = cli.fails(&["dataset", "synth", path, "--samples", "10", "--shards", "1"]);
    assert!(
        err.contains("already holds a dataset (2 shard(s))"),
        "{err}"
    );
    let images = dir.path().join("images/cat");
    std::fs::create_dir_all(&images).unwrap();
    let err = cli.fails(&[
        "dataset",
        "import",
        dir.path().join("images").to_str().unwrap(),
        path,
    ]);
    assert!(err.contains("already holds a dataset"), "{err}");
    assert_eq!(
        std::fs::read(data.join("manifest.json")).unwrap(),
        manifest,
        "the dataset is untouched"
    );

    for args in [
        vec!["dataset", "index", path, "--classes", "0"],
        vec!["dataset", "synth", "elsewhere", "--samples", "0"],
        vec!["dataset", "synth", "elsewhere", "--classes", "1"],
        vec![
            "dataset",
            "import",
            "images",
            "elsewhere",
            "--shard-samples",
            "0",
        ],
        vec!["resume", "job-000001", "--workers", "0"],
    ] {
        let out = cli.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("is not in"), "{args:?} names the range: {err}");
    }
    assert_eq!(std::fs::read(data.join("manifest.json")).unwrap(), manifest);

    // The cause is told once, though the message quotes it and is also its source.
    let missing = dir.path().join("missing");
    for args in [
        vec!["dataset", "index", missing.to_str().unwrap()],
        vec!["submit", missing.to_str().unwrap()],
    ] {
        let err = cli.fails(&args);
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    }
}

#[test]
fn an_unreachable_etcd_is_named_without_debug_dumps() {
    let port = free_port();
    let out = Command::new(binary("ladder-coordinator"))
        .args(["--store", &format!("etcd://127.0.0.1:{port}")])
        .args(["--listen", "127.0.0.1:0"])
        .env("LADDER_SUBMIT_TOKEN", SUBMIT_TOKEN)
        .env("LADDER_WORKER_TOKEN", WORKER_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("store etcd http://127.0.0.1:{port}: Unavailable")),
        "{err}"
    );
    assert!(err.contains("Connection refused"), "{err}");
    assert!(
        !err.contains("MetadataMap") && !err.contains("Status {"),
        "{err}"
    );
}

#[test]
fn a_ca_certificate_with_a_plain_http_url_is_refused() {
    let out = Command::new(binary("ladder"))
        .args(["list", "--tls-ca", "/nonexistent/ca.pem"])
        .env("LADDER_COORDINATOR", "http://127.0.0.1:1")
        .env("LADDER_TOKEN", SUBMIT_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http://127.0.0.1:1"), "{err}");
    assert!(err.contains("so use https://"), "{err}");
}

/// Every number a worker sends is checked where it arrives, and a NaN loss (a bf16 overflow,
/// or a hostile worker-token holder) ends the job as diverged: the coordinator restarts on its
/// store afterwards (it once refused to, the NaN saved as a JSON null it could not read back).
#[test]
fn numbers_from_a_worker_are_checked_and_a_nan_loss_fails_the_job_as_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let job = OneWorkerJob::start(dir.path());
    let url = job.coordinator.url();
    type Edit<'a> = &'a dyn Fn(&mut pb::Progress);
    let progress = |edit: Edit| {
        let mut p = pb::Progress {
            epoch: 2,
            step: 1,
            steps_per_epoch: 3,
            global_step: 7,
            loss: 1.5,
            learning_rate: 0.01,
            image_size: 64,
            ..Default::default()
        };
        edit(&mut p);
        pb::ReportProgressRequest {
            worker: Some(job.identity.clone()),
            job_id: job.id.clone(),
            generation: job.generation,
            progress: Some(p),
            ..Default::default()
        }
    };
    job.rt.block_on(async {
        let mut worker = worker_client(&url, WORKER_TOKEN).await;
        let refused = worker
            .heartbeat(pb::HeartbeatRequest {
                worker: Some(job.identity.clone()),
                data_wait_ratio: f32::NAN,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("data_wait_ratio is NaN"),
            "{refused:?}"
        );
        let hostile: [(Edit, &str); 6] = [
            (
                &|p| p.learning_rate = f32::NAN,
                "progress.learning_rate is NaN",
            ),
            (
                &|p| p.images_per_second = f32::INFINITY,
                "progress.images_per_second is inf",
            ),
            (&|p| p.eval_top1 = 1.5, "progress.eval_top1 is 1.5"),
            (&|p| p.loss = -1.0, "progress.loss is -1"),
            (
                &|p| p.eval_epoch = 1_000_000,
                "an evaluation after epoch 1000000 (it has 4)",
            ),
            (&|p| p.stage = 7, "stage 7 (it has 2)"),
        ];
        for (edit, said) in hostile {
            let refused = worker.report_progress(progress(edit)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{said}");
            assert!(refused.message().contains(said), "{said}: {refused:?}");
        }
        let answer = worker
            .report_progress(progress(&|p| p.loss = f32::NAN))
            .await
            .unwrap()
            .into_inner();
        assert!(!answer.current, "the generation ended with the divergence");
    });
    let status = submitter(&job.coordinator).ok(&["status", &job.id]);
    assert!(status.contains("failed"), "{status}");
    assert!(
        status.contains("the loss diverged: NaN at global step 7 (epoch 2, stage 0)"),
        "{status}"
    );
    assert!(status.contains("step-000000003-g1"), "{status}");
    let store = format!("redb:{}", dir.path().join("state.redb").display());
    job.coordinator.kill9();

    let restarted = CoordinatorProcess::start(&store, &dir.path().join("logs"), &[]);
    let status = submitter(&restarted).ok(&["status", &job.id]);
    assert!(status.contains("the loss diverged"), "{status}");
    assert!(
        status.contains("epoch        2/4"),
        "the last good progress: {status}"
    );
}

/// `ladder plan` prints a spec's recipe card with no coordinator: a row per stage, steps and
/// learning rates from its dataset; without the dataset, the card still, and a warning.
#[test]
fn plan_prints_the_recipe_card_without_a_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let spec = setup(dir.path(), (1, 1));
    let out = Command::new(binary("ladder"))
        .args(["plan", spec.to_str().unwrap()])
        .env_remove("LADDER_COORDINATOR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let card = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = card.lines().filter(|l| l.ends_with('%')).collect();
    assert_eq!(rows.len(), 2, "two stages: {card}");
    assert!(rows[0].contains("1-2") && rows[1].contains("3-4"), "{card}");
    assert!(
        card.contains("steps an epoch") && card.contains("total: "),
        "{card}"
    );
    std::fs::remove_file(dir.path().join("data").join("manifest.json")).unwrap();
    let out = Command::new(binary("ladder"))
        .args(["plan", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no steps or learning rates"));
}

/// `ladder preview` writes a contact sheet of a stage's training samples: the sources on top,
/// what training sees below. The last stage of a growing ladder (RandAugment 5 to 25, Mixup
/// and CutMix 0 to 0.4) changes the samples more than the first.
#[test]
fn preview_sheets_show_the_regularization_grow() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let synth = Command::new(binary("ladder"))
        .args([
            "dataset",
            "synth",
            data.to_str().unwrap(),
            "--samples",
            "64",
        ])
        .output()
        .unwrap();
    assert!(
        synth.status.success(),
        "{}",
        String::from_utf8_lossy(&synth.stderr)
    );
    let spec = dir.path().join("preview.toml");
    std::fs::write(
        &spec,
        "[job]\nname = \"preview\"\n[model]\nvariant = \"tiny\"\nclasses = 10\n\
         [data]\nmanifest = \"data/manifest.json\"\n\
         [schedule]\nepochs = 4\nstage_epochs = 1\nmin_size = 96\nmax_size = 160\n\
         eval_size = 160\nmin_dropout = 0.0\nmax_dropout = 0.1\nmin_randaugment = 5\n\
         max_randaugment = 25\nmax_mixup = 0.4\nmax_cutmix = 0.4\n\
         [optimizer]\nwarmup_epochs = 0\n\
         [batch]\nglobal = 16\nmicro_at_max_size = 4\nmicro_max = 8\n\
         [checkpoint]\ndir = \"checkpoints\"\nevery_steps = 10\n[workers]\nmin = 1\nmax = 1\n",
    )
    .unwrap();
    // Mean absolute difference between each source and its training sample, over the sheet.
    let change = |stage: u32, size: u32| -> f64 {
        let out = dir.path().join(format!("stage-{stage}.png"));
        let run = Command::new(binary("ladder"))
            .args([
                "preview",
                spec.to_str().unwrap(),
                "--stage",
                &stage.to_string(),
            ])
            .args(["--out", out.to_str().unwrap(), "--samples", "64"])
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let bytes = std::fs::read(&out).unwrap();
        let (width, height) = (64 * size + 65 * 4, 2 * size + 3 * 4);
        let sheet = ladder_data::decode::decode(
            &bytes,
            ladder_core::dataset::ImageFormat::Png,
            None,
            width,
            height,
        )
        .unwrap()
        .image;
        assert_eq!(
            (sheet.width, sheet.height),
            (width, height),
            "stage {stage}"
        );
        let mut total = 0u64;
        for column in 0..64 {
            let x0 = 4 + column * (size + 4);
            for y in 0..size {
                for x in x0..x0 + size {
                    let (top, bottom) = (sheet.pixel(x, 4 + y), sheet.pixel(x, 8 + size + y));
                    total += (0..3)
                        .map(|c| top[c].abs_diff(bottom[c]) as u64)
                        .sum::<u64>();
                }
            }
        }
        total as f64 / (64 * size * size * 3) as f64
    };
    let (first, last) = (change(1, 96), change(4, 160));
    eprintln!("mean change per value: stage 1 {first:.1}, stage 4 {last:.1}");
    assert!(
        last > first,
        "stage 4 ({last:.1}) changes more than stage 1 ({first:.1})"
    );
    let err = Command::new(binary("ladder"))
        .args([
            "preview",
            spec.to_str().unwrap(),
            "--stage",
            "5",
            "--out",
            "x.png",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&err.stderr).contains("the spec has 4 stages"));
}
