//! Test support shared by the integration tests: real servers and processes on loopback.
//!
//! - [`Etcd`]: a real etcd server (Debian's etcd-server) on free loopback ports.
//! - [`CoordinatorProcess`]: the real `ladder-coordinator` binary, killable with SIGKILL.
//! - [`write_dataset`] and [`write_spec`]: a small indexed dataset and a job spec for it.
//! - [`job_client`] and [`worker_client`]: gRPC clients carrying a bearer token.
//! - [`venv_python`]: the bootstrap venv's Python, where the peers (torchvision, Pillow,
//!   webdataset) live.

use ladder_proto::v1 as pb;
use ladder_proto::v1::job_service_client::JobServiceClient;
use ladder_proto::v1::worker_service_client::WorkerServiceClient;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const SUBMIT_TOKEN: &str = "test-submit-token";
pub const WORKER_TOKEN: &str = "test-worker-token";

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
        .port()
}

/// The body of a plain HTTP GET of `path` from `address` (`HOST:PORT`), or why there is none
/// (no connection, no answer within 10 s, a status other than 200).
pub fn http_get(address: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    // HTTP/1.0: the answer ends with the connection, never chunked.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {head}"));
    }
    Ok(body.to_owned())
}

/// Runs `script` (a test's oracle or peer) with the venv's Python and `args`; fails the test
/// with its stderr unless it succeeds; returns its stdout.
pub fn run_python(script: &Path, args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new(venv_python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Python of the venv that scripts/bootstrap creates (`LADDER_VENV`, else the workspace's
/// `.venv`). A missing venv fails the test with what to do, never skips it.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("LADDER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap to create the Python venv (torch, torchvision, \
         pillow, webdataset)",
        python.display()
    );
    python
}

/// A binary of this workspace, from the target directory the tests run from.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` (scripts/test does) first",
        path.display()
    );
    path
}

/// A real etcd server on loopback, stopped on drop.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    /// Where it runs: its data directory, its client and peer ports, its log.
    data: PathBuf,
    ports: (u16, u16),
    log: PathBuf,
    tls: Option<EtcdTls>,
    _dir: tempfile::TempDir,
}

/// etcd serving its clients over TLS and requiring a client certificate signed by `ca`
/// (`--client-cert-auth`): PEM files.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Etcd {
    /// Starts etcd on fresh loopback ports. Ports are picked free but not held, so another
    /// process may take one before etcd binds it; etcd then exits, and the start is retried on
    /// new ports. On a loaded machine etcd's first fsyncs can take many seconds, hence the
    /// generous wait.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// [`Etcd::start`], serving its clients over TLS with client certificates required.
    pub fn start_tls(tls: EtcdTls) -> Etcd {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<EtcdTls>) -> Etcd {
        const ATTEMPTS: usize = 3;
        let dir = tempfile::tempdir().expect("etcd data dir");
        let mut failures = Vec::new();
        for attempt in 1..=ATTEMPTS {
            let data = dir.path().join(format!("data-{attempt}"));
            let log = dir.path().join(format!("etcd-{attempt}.log"));
            let ports = (free_port(), free_port());
            match Self::run(&data, ports, &log, tls.as_ref()) {
                Ok(child) => {
                    return Etcd {
                        child,
                        endpoint: format!("127.0.0.1:{}", ports.0),
                        data,
                        ports,
                        log,
                        tls,
                        _dir: dir,
                    };
                }
                Err(failure) => failures.push(format!("attempt {attempt}: {failure}")),
            }
        }
        panic!(
            "etcd did not start in {ATTEMPTS} attempts:\n{}",
            failures.join("\n")
        );
    }

    /// Kills etcd (SIGKILL): its data stays, for [`Etcd::restart`].
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again on its data and its ports, as after a crash.
    pub fn restart(&mut self) {
        self.child = Self::run(&self.data, self.ports, &self.log, self.tls.as_ref())
            .unwrap_or_else(|failure| panic!("etcd did not start again: {failure}"));
    }

    /// Runs etcd on `data` and (client, peer) `ports`, logging to `log`, until it accepts
    /// connections.
    fn run(
        data: &Path,
        (client, peer): (u16, u16),
        log_path: &Path,
        tls: Option<&EtcdTls>,
    ) -> Result<Child, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .expect("etcd log");
        let mut child = Command::new("etcd")
            .args(["--name", "n0", "--data-dir"])
            .arg(data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("n0={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .args(tls.map_or(Vec::new(), |tls| {
                vec![
                    "--client-cert-auth".into(),
                    format!("--trusted-ca-file={}", tls.ca.display()),
                    format!("--cert-file={}", tls.cert.display()),
                    format!("--key-file={}", tls.key.display()),
                ]
            }))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd: is etcd-server installed? run scripts/bootstrap");
        let log_tail = || {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(5)..].join("\n")
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "etcd on ports {client}/{peer} exited ({status}):\n{}",
                    log_tail()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "etcd on port {client} accepted no connection in 60 s:\n{}",
                    log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The coordinator's `--store` address for this server.
    pub fn store(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ladder-coordinator`.
pub struct CoordinatorProcess {
    child: Child,
    pub address: SocketAddr,
    pub log: PathBuf,
}

impl CoordinatorProcess {
    /// Starts the coordinator on a free loopback port with the test tokens and `extra` flags,
    /// and waits until it serves (for an etcd standby: until it leads, up to `timeout`).
    pub fn start(store: &str, log_dir: &Path, extra: &[&str]) -> CoordinatorProcess {
        Self::start_with_timeout(store, log_dir, extra, Duration::from_secs(30))
    }

    pub fn start_with_timeout(
        store: &str,
        log_dir: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> CoordinatorProcess {
        let child = Self::spawn(store, log_dir, extra);
        Self::until_serving(child, log_dir, timeout)
    }

    /// Starts the coordinator without waiting for it to serve.
    pub fn spawn(store: &str, log_dir: &Path, extra: &[&str]) -> Child {
        std::fs::create_dir_all(log_dir).expect("log dir");
        let log = log_dir.join(format!("coordinator-{}.log", free_port()));
        let mut command = Command::new(binary("ladder-coordinator"));
        command.args(["--store", store]);
        // Short defaults keep the tests fast; `extra` may set its own.
        for (flag, value) in [
            ("--listen", "127.0.0.1:0"),
            ("--lease-ttl-ms", "2000"),
            ("--rendezvous-grace-ms", "500"),
        ] {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        command
            .args(extra)
            .env("LADDER_SUBMIT_TOKEN", SUBMIT_TOKEN)
            .env("LADDER_WORKER_TOKEN", WORKER_TOKEN)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("coordinator log"))
            .spawn()
            .expect("starting ladder-coordinator")
    }

    /// Waits for a spawned coordinator's "listening on" line.
    pub fn until_serving(
        mut child: Child,
        log_dir: &Path,
        timeout: Duration,
    ) -> CoordinatorProcess {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("ladder-coordinator listening on ") {
                    let _ = tx.send(addr.parse::<SocketAddr>().expect("address"));
                }
            }
        });
        let address = match rx.recv_timeout(timeout) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the coordinator did not start serving within {timeout:?}; logs in {}",
                    log_dir.display()
                );
            }
        };
        CoordinatorProcess {
            child,
            address,
            log: log_dir.to_owned(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Whether the process still runs (it neither exited nor was restarted).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ladder-worker` on CPU with one libtorch thread and one decoding thread's worth
/// of data, logging to `log`.
pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    pub fn start(coordinator: &str, log: &Path, extra: &[&str]) -> WorkerProcess {
        let child = Command::new(binary("ladder-worker"))
            .args(["--coordinator", coordinator, "--threads", "1"])
            .args(extra)
            .env("LADDER_WORKER_TOKEN", WORKER_TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("worker log"))
            .spawn()
            .expect("starting ladder-worker");
        WorkerProcess {
            child,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (for example `-STOP`, `-CONT`) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// How the process ended, if it did within `timeout`.
    pub fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling ladder-worker") {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

#[derive(Clone)]
pub struct Bearer(pub String);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.0.is_empty() {
            let value = format!("Bearer {}", self.0).parse().expect("ascii token");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connecting to the coordinator")
}

pub async fn job_client(url: &str, token: &str) -> JobServiceClient<Authed> {
    JobServiceClient::with_interceptor(channel(url).await, Bearer(token.to_owned()))
}

pub async fn worker_client(url: &str, token: &str) -> WorkerServiceClient<Authed> {
    WorkerServiceClient::with_interceptor(channel(url).await, Bearer(token.to_owned()))
}

/// What a worker's registration gives it to name itself on every later call.
pub trait Registered {
    fn identity(self) -> pb::WorkerIdentity;
}

impl Registered for pb::RegisterResponse {
    fn identity(self) -> pb::WorkerIdentity {
        pb::WorkerIdentity {
            id: self.worker_id,
            secret: self.worker_secret,
        }
    }
}

/// The reference rank 0 commits for the checkpoint of global step `step` in generation
/// `generation`: the id the coordinator names it by.
pub fn checkpoint_ref(generation: u64, step: u64) -> pb::CheckpointRef {
    pb::CheckpointRef {
        id: ladder_core::location::CheckpointId {
            generation,
            global_step: step,
        }
        .to_string(),
        generation,
        step,
        ..Default::default()
    }
}

/// Writes `shards` WebDataset shards of `per_shard` samples into `dir` and indexes them.
/// The image members are placeholder bytes: the control plane reads manifests, never pixels.
pub fn write_dataset(dir: &Path, shards: u32, per_shard: u32, classes: u32) -> PathBuf {
    std::fs::create_dir_all(dir).expect("dataset dir");
    for s in 0..shards {
        let file = std::fs::File::create(dir.join(format!("shard-{s:06}.tar"))).expect("shard");
        let mut tar = tar::Builder::new(file);
        for i in 0..per_shard {
            let key = format!("s{s:04}i{i:04}");
            let label = ((s * per_shard + i) % classes).to_string();
            for (ext, data) in [("jpg", &b"placeholder"[..]), ("cls", label.as_bytes())] {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, format!("{key}.{ext}"), data)
                    .expect("tar member");
            }
        }
        tar.finish().expect("tar");
    }
    ladder_core::indexing::index_dir(dir, Some(classes))
        .expect("indexing the test dataset")
        .manifest_path
}

/// Writes a valid tiny job spec for the dataset at `manifest` into `dir/name.toml`.
pub fn write_spec(dir: &Path, name: &str, manifest: &Path, workers: (u32, u32)) -> PathBuf {
    let text = format!(
        r#"[job]
name = "{name}"
[model]
variant = "tiny"
classes = 10
[data]
manifest = "{manifest}"
[schedule]
epochs = 4
stage_epochs = 2
min_size = 64
max_size = 96
eval_size = 96
min_dropout = 0.0
max_dropout = 0.1
min_randaugment = 2
max_randaugment = 6
[optimizer]
warmup_epochs = 1
[batch]
global = 16
micro_at_max_size = 4
micro_max = 4
[checkpoint]
dir = "checkpoints"
every_steps = 2
[workers]
min = {}
max = {}
"#,
        workers.0,
        workers.1,
        manifest = manifest.display()
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("writing the spec");
    path
}

/// A CA, and a server certificate for `names` (subject alternative names such as
/// `DNS:localhost` or `IP:10.0.0.1`) signed by it, made with openssl in `dir`: (CA, certificate,
/// key).
pub fn make_certificates(dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let path = |name: &str| dir.join(name);
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=Ladder test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        path("ext.cnf"),
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\n",
            names.join(",")
        ),
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (path("ca.pem"), path("server.pem"), path("server.key"))
}
