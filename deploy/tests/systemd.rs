//! `deploy/systemd` checked by systemd's own verifier, and run: the exact command lines the
//! units start (their variables from `ladder.env`, their credentials as systemd passes them)
//! serve, train a job and stop the way the restart policy expects. systemd itself does not run
//! in these sandboxes, so the sandboxing settings are checked, not exercised.

use ladder_deploy::systemd::{Unit, command_line, environment_file};
use ladder_deploy::{TinyJob, deploy_dir, run_ok};
use ladder_testkit::{binary, free_port, make_certificates};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const COORDINATOR_UNIT: &str = "ladder-coordinator.service";
const WORKER_UNIT: &str = "ladder-worker@.service";

fn systemd_dir() -> PathBuf {
    deploy_dir().join("systemd")
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    // A root holding systemd's own units (the targets ours order against), ours, and the
    // binaries where ours run them: verify checks that each command exists.
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    let bin = root.path().join("usr/local/bin");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    run_ok(
        Command::new("cp")
            .args(["-r", "/usr/lib/systemd/system"])
            .arg(root.path().join("usr/lib/systemd/")),
    );
    for name in ["ladder-coordinator", "ladder-worker"] {
        std::fs::copy(binary(name), bin.join(name)).unwrap();
    }
    for unit in [COORDINATOR_UNIT, WORKER_UNIT] {
        std::fs::copy(systemd_dir().join(unit), units.join(unit)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg(units.join(COORDINATOR_UNIT))
        .arg("ladder-worker@0.service")
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/bootstrap installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 after warnings about unknown keys or bad values: any output is a failure.
    assert!(out.status.success() && said.is_empty(), "{said}");
}

/// A unit's files made real in `dir`: its `/etc/ladder` paths, its credentials (copied with
/// mode 0400, as systemd passes them) and the binaries it starts.
struct Installed {
    etc: PathBuf,
    credentials: PathBuf,
    environment: BTreeMap<String, String>,
}

impl Installed {
    fn new(dir: &Path, environment: BTreeMap<String, String>) -> Installed {
        let etc = dir.join("etc-ladder");
        let credentials = dir.join("credentials");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&credentials).unwrap();
        Installed {
            etc,
            credentials,
            environment,
        }
    }

    /// The words `unit`'s `ExecStart=` runs for instance `instance`, with every path under
    /// /etc/ladder in this installation, its credentials in place and the binary a built one.
    fn command(&self, unit: &str, instance: &str) -> Vec<String> {
        let unit = Unit::load(&systemd_dir().join(unit));
        for credential in unit.values("Service", "LoadCredential") {
            let (name, source) = credential.split_once(':').expect("NAME:PATH");
            let target = self.credentials.join(name);
            std::fs::copy(self.local(source), &target)
                .unwrap_or_else(|e| panic!("credential {name} from {source}: {e}"));
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        let mut environment = self.environment.clone();
        environment.insert(
            "CREDENTIALS_DIRECTORY".to_owned(),
            self.credentials.display().to_string(),
        );
        let exec = unit.value("Service", "ExecStart").expect("ExecStart=");
        let mut words = command_line(exec, &environment, &[('i', instance), ('H', "node0")])
            .unwrap_or_else(|e| panic!("{unit_name}: {e}", unit_name = unit_name(&unit)));
        let program = Path::new(&words[0]).file_name().unwrap().to_str().unwrap();
        words[0] = binary(program).display().to_string();
        words
            .into_iter()
            .map(|w| match w.strip_prefix("/etc/ladder/") {
                Some(name) => self.etc.join(name).display().to_string(),
                None => w,
            })
            .collect()
    }

    fn local(&self, path: &str) -> PathBuf {
        self.etc.join(
            path.strip_prefix("/etc/ladder/")
                .unwrap_or_else(|| panic!("{path} is not under /etc/ladder")),
        )
    }
}

fn unit_name(unit: &Unit) -> &str {
    unit.value("Unit", "Description").unwrap_or("unit")
}

fn spawn(words: &[String], log: &Path) -> Child {
    Command::new(&words[0])
        .args(&words[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("{words:?}: {e}"))
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The exit codes the worker unit's restart policy restarts after (`Restart=on-failure`,
/// less `RestartPreventExitStatus=`).
fn restarted_after(code: i32) -> bool {
    let unit = Unit::load(&systemd_dir().join(WORKER_UNIT));
    assert_eq!(unit.value("Service", "Restart"), Some("on-failure"));
    let prevented: Vec<i32> = unit
        .values("Service", "RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(|c| c.parse().expect("a numeric exit status"))
        .collect();
    code != 0 && !prevented.contains(&code)
}

#[test]
fn the_units_command_lines_serve_train_and_stop_as_their_restart_policy_expects() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut environment = environment_file(&systemd_dir().join("ladder.env"));
    let defined: Vec<String> = environment.keys().cloned().collect();
    for (key, value) in [
        ("LADDER_LISTEN", listen.clone()),
        ("LADDER_HTTP_LISTEN", format!("127.0.0.1:{}", free_port())),
        (
            "LADDER_STORE",
            format!("redb:{}", dir.path().join("coordinator.redb").display()),
        ),
        (
            "LADDER_COORDINATOR",
            format!("https://localhost:{}", listen.split(':').nth(1).unwrap()),
        ),
        ("LADDER_RING_HOST", "127.0.0.1".to_owned()),
    ] {
        assert!(
            defined.contains(&key.to_owned()),
            "ladder.env does not define {key}"
        );
        environment.insert(key.to_owned(), value);
    }
    let installed = Installed::new(dir.path(), environment);
    let (ca, cert, key) = make_certificates(dir.path(), &["DNS:localhost", "IP:127.0.0.1"]);
    for (from, to) in [(&ca, "ca.crt"), (&cert, "tls.crt"), (&key, "tls.key")] {
        std::fs::copy(from, installed.etc.join(to)).unwrap();
    }
    for (name, token) in [
        ("submit-token", "submit-secret"),
        ("worker-token", "worker-secret"),
    ] {
        std::fs::write(installed.etc.join(name), token).unwrap();
    }

    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut coordinator = spawn(
        &installed.command(COORDINATOR_UNIT, ""),
        &logs.join("coordinator.log"),
    );
    let cli = |args: &[&str]| {
        let submit_token = installed.etc.join("cli-token");
        std::fs::write(&submit_token, "submit-secret").unwrap();
        std::fs::set_permissions(&submit_token, std::fs::Permissions::from_mode(0o600)).unwrap();
        Command::new(binary("ladder"))
            .args(args)
            .env(
                "LADDER_COORDINATOR",
                &installed.environment["LADDER_COORDINATOR"],
            )
            .env("LADDER_TLS_CA", installed.etc.join("ca.crt"))
            .env("LADDER_TOKEN_FILE", &submit_token)
            .output()
            .unwrap()
    };
    let start = Instant::now();
    while !cli(&["health"]).status.success() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator's unit command never served: {}",
            std::fs::read_to_string(logs.join("coordinator.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // On this machine, without a GPU, the worker's own command line stops at once with a
    // one-line reason, and an exit status the unit does not restart after.
    let worker_words = installed.command(WORKER_UNIT, "0");
    assert!(
        worker_words.contains(&"cuda:0".to_owned()),
        "{worker_words:?}"
    );
    let mut no_gpu = spawn(&worker_words, &logs.join("no-gpu.log"));
    let status = wait_exit(&mut no_gpu, Duration::from_secs(30));
    let reason = std::fs::read_to_string(logs.join("no-gpu.err")).unwrap();
    assert_eq!(reason.trim_end().lines().count(), 1, "{reason}");
    assert!(reason.contains("cuda:0"), "{reason}");
    assert!(
        !restarted_after(status.code().unwrap()),
        "{status}: {reason}"
    );

    // The same command line on the CPU trains a job to its end.
    let cpu_words: Vec<String> = worker_words
        .iter()
        .map(|w| {
            if w == "cuda:0" {
                "cpu".to_owned()
            } else {
                w.clone()
            }
        })
        .collect();
    let mut worker = spawn(&cpu_words, &logs.join("worker.log"));
    let data = dir.path().join("data");
    let out = cli(&[
        "dataset",
        "synth",
        data.to_str().unwrap(),
        "--classes",
        "4",
        "--samples",
        "64",
        "--shards",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = TinyJob {
        name: "systemd",
        epochs: 2,
        stage_epochs: 1,
        sizes: (32, 40),
        batch: (16, 8),
        workers: (1, 1),
        checkpoint_every: 2,
    }
    .write(dir.path());
    let out = cli(&["submit", spec.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let out = cli(&["wait", &id]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(logs.join("worker.err")).unwrap_or_default()
    );
    let status = String::from_utf8(cli(&["status", &id]).stdout).unwrap();
    assert!(
        status.contains("trained      64 x2 samples per epoch (epochs 1-2), 0 skipped"),
        "{status}"
    );

    // `systemctl stop` sends SIGTERM: the worker leaves with 0 and is not restarted; the
    // coordinator stops within the unit's TimeoutStopSec.
    for (child, unit) in [
        (&mut worker, WORKER_UNIT),
        (&mut coordinator, COORDINATOR_UNIT),
    ] {
        let stop = Unit::load(&systemd_dir().join(unit))
            .value("Service", "TimeoutStopSec")
            .and_then(|v| v.strip_suffix('s')?.parse().ok())
            .expect("TimeoutStopSec in seconds");
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let status = wait_exit(child, Duration::from_secs(stop));
        assert_eq!(status.code(), Some(0), "{unit} after SIGTERM");
    }
    assert!(!restarted_after(0));
}
