//! A job across hosts: the coordinator and three workers each on a host of their own (network
//! namespaces joined by a bridge, every address non-loopback), TLS because it is required off
//! loopback, the TCP ring between hosts. One worker's link is cut for longer than its lease:
//! the job recovers on the other two without a hang; when the link returns, the worker
//! registers again and the job takes it back. Every sample of every epoch is trained once.

use ladder_deploy::hosts::Network;
use ladder_deploy::{TinyJob, run_ok};
use ladder_testkit::{binary, make_certificates};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LEASE_MS: u64 = 2_000;
const EPOCHS: u32 = 6;
const SAMPLES: u32 = 720;

/// A process on a host, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut command: Command, log: &Path) -> Process {
    Process(
        command
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .expect("ip netns exec"),
    )
}

/// The value of `key`'s line in `ladder status` output.
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or("")
}

#[test]
fn a_job_trains_across_hosts_and_recovers_from_a_cut_link() {
    let network = Network::new(4);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let coordinator_address = network.address(0);
    let url = format!("https://{coordinator_address}:7070");
    let (ca, cert, key) = make_certificates(d, &[&format!("IP:{coordinator_address}")]);
    for (name, token) in [
        ("submit-token", "submit-secret"),
        ("worker-token", "worker-secret"),
    ] {
        std::fs::write(d.join(name), token).unwrap();
        std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    run_ok(
        Command::new(binary("ladder"))
            .args(["dataset", "synth"])
            .arg(d.join("data"))
            .args([
                "--classes",
                "4",
                "--samples",
                &SAMPLES.to_string(),
                "--shards",
                "6",
            ]),
    );
    // Steps of 12 samples in 6 micro-batches: 2 or 3 workers share them.
    let spec = TinyJob {
        name: "hosts",
        epochs: EPOCHS,
        stage_epochs: 2,
        sizes: (64, 80),
        batch: (12, 2),
        workers: (2, 3),
        checkpoint_every: 5,
    }
    .write(d);

    let mut coordinator = network.command(0, binary("ladder-coordinator"));
    coordinator
        .arg(format!("--listen={coordinator_address}:7070"))
        .arg(format!("--store=redb:{}", d.join("state.redb").display()))
        .arg(format!("--tls-cert={}", cert.display()))
        .arg(format!("--tls-key={}", key.display()))
        .arg(format!(
            "--submit-token-file={}",
            d.join("submit-token").display()
        ))
        .arg(format!(
            "--worker-token-file={}",
            d.join("worker-token").display()
        ))
        .arg(format!("--lease-ttl-ms={LEASE_MS}"))
        .arg("--stall-timeout-ms=20000")
        .arg("--rendezvous-grace-ms=3000")
        .arg("--regroup-interval-s=2");
    let _coordinator = spawn(coordinator, &d.join("coordinator.log"));
    let _workers: Vec<Process> = (1..4)
        .map(|host| {
            let mut worker = network.command(host, binary("ladder-worker"));
            worker
                .arg(format!("--coordinator={url}"))
                .arg(format!("--tls-ca={}", ca.display()))
                .arg(format!("--token-file={}", d.join("worker-token").display()))
                .arg(format!("--ring-host={}", network.address(host)))
                .arg(format!("--name=host{host}"))
                .args(["--threads=1", "--collective-timeout-s=60"])
                .stdin(Stdio::null());
            spawn(worker, &d.join(format!("worker{host}.log")))
        })
        .collect();
    let ladder = |host: usize, args: &[&str]| {
        let out = network
            .command(host, binary("ladder"))
            .arg(format!("--coordinator={url}"))
            .arg(format!("--tls-ca={}", ca.display()))
            .arg(format!("--token-file={}", d.join("submit-token").display()))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let logs = || {
        [
            "coordinator.err",
            "worker1.err",
            "worker2.err",
            "worker3.err",
        ]
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(d.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            format!(
                "--- {f}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    };
    let start = Instant::now();
    while !ladder(1, &["health"]).0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no coordinator across the bridge:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (submitted, out, err) = ladder(1, &["submit", spec.to_str().unwrap()]);
    assert!(submitted, "{err}");
    let job = out.trim().to_owned();
    let status = || ladder(2, &["status", &job]).1;
    let wait_for = |what: &str, within: Duration, done: &dyn Fn(&str) -> bool| -> String {
        let start = Instant::now();
        loop {
            let now = status();
            if done(&now) {
                return now;
            }
            assert!(
                start.elapsed() < within,
                "{what} within {within:?}:\n{now}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Three hosts train together over the ring.
    let running = wait_for("three workers training", Duration::from_secs(120), &|s| {
        field(s, "state") == "running"
            && field(s, "workers").split(", ").count() == 3
            && field(s, "epoch").starts_with('2')
    });
    let generation: u64 = field(&running, "generation").parse().unwrap();

    // Host 3 drops off the network for three leases; the others go on without it.
    network.cut(3);
    let cut = Instant::now();
    let recovered = wait_for("recovery on two workers", Duration::from_secs(60), &|s| {
        field(s, "state") == "running"
            && field(s, "generation").parse::<u64>().unwrap_or(0) > generation
            && field(s, "workers").split(", ").count() == 2
            && !field(s, "step").starts_with('-')
    });
    let took = cut.elapsed();
    let step_then = field(&recovered, "step").to_owned();
    wait_for("steps on two workers", Duration::from_secs(60), &|s| {
        field(s, "step") != step_then
    });
    eprintln!(
        "cut at epoch {}: training again on two workers {:.1} s later (lease {} ms)",
        field(&running, "epoch"),
        took.as_secs_f64(),
        LEASE_MS
    );
    assert!(took < Duration::from_secs(30), "recovery took {took:?}");
    std::thread::sleep((Duration::from_millis(3 * LEASE_MS)).saturating_sub(cut.elapsed()));

    // Back on the network: it registers again and the job takes it back at a checkpoint.
    network.restore(3);
    let restored = Instant::now();
    let back = wait_for(
        "the cut worker back in the job",
        Duration::from_secs(90),
        &|s| field(s, "workers").split(", ").count() == 3 || field(s, "state") == "completed",
    );
    assert_ne!(
        field(&back, "state"),
        "completed",
        "the job ended before it took the worker back:\n{back}"
    );
    eprintln!(
        "link restored: the job took the worker back {:.1} s later",
        restored.elapsed().as_secs_f64()
    );
    let (_, workers, _) = ladder(1, &["workers"]);
    assert!(workers.contains("host3"), "{workers}");

    let (completed, out, err) = ladder(1, &["wait", &job]);
    assert!(completed, "{out}{err}\n{}", logs());
    let done = status();
    assert!(
        field(&done, "trained").starts_with(&format!(
            "{SAMPLES} x{EPOCHS} samples per epoch (epochs 1-{EPOCHS}), 0 skipped"
        )),
        "every sample once per epoch:\n{done}"
    );
}
