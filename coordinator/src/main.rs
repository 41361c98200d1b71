//! `ladder-coordinator`: owns jobs, plans and membership; workers and the `ladder` CLI talk to
//! it over gRPC. See `ladder-coordinator --help`.

use anyhow::{Context, Result, bail};
use clap::Parser;
use ladder_coordinator::auth::{Role, Tokens};
use ladder_coordinator::metrics::{Metrics, RpcTimerLayer};
use ladder_coordinator::service::{JobApi, WorkerApi};
use ladder_coordinator::serving::{Serving, WhileServingLayer};
use ladder_coordinator::state::{Config, Coordinator};
use ladder_coordinator::store::{
    EtcdStore, EtcdTls, LeaderLease, RedbStore, SharedStore, StoreAddress, StoreError,
};
use ladder_coordinator::{connections, http};
use ladder_core::logging::{self, LogFormat};
use ladder_proto::v1::job_service_server::JobServiceServer;
use ladder_proto::v1::worker_service_server::WorkerServiceServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// How often the gRPC server pings each connection (HTTP/2 keep-alive): a client whose
/// connection is quiet (a status watch with nothing new) answers, so it never looks idle.
const GRPC_KEEPALIVE: Duration = Duration::from_secs(20);
/// A gRPC connection on which nothing moved for this long (no request, no answer to three
/// pings) is ended: one that never finished its TLS handshake, say.
const GRPC_IDLE: Duration = Duration::from_secs(60);
/// How long a gRPC connection lives before it is asked to go, and the grace it then has (a
/// watch or a long poll in flight ends, and its client reconnects).
const GRPC_MAX_AGE: Duration = Duration::from_secs(30 * 60);
const GRPC_MAX_AGE_GRACE: Duration = Duration::from_secs(60);
/// Calls one gRPC connection carries at once: a worker makes a few (heartbeat, long poll,
/// report, commit).
const GRPC_STREAMS_PER_CONNECTION: u32 = 64;
/// The most gRPC connections served at once: a worker holds one, a command line one while it
/// runs.
const MAX_GRPC_CONNECTIONS: u64 = 16_384;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Ladder's coordinator: accepts training jobs and drives workers."
)]
struct Args {
    /// Address to serve gRPC on (HOST:PORT; a host name is resolved). Without TLS only
    /// loopback addresses are allowed.
    #[arg(long, default_value = "127.0.0.1:7070", value_parser = listen_address)]
    listen: SocketAddr,
    /// Where state lives: `redb:PATH` (embedded, one coordinator) or
    /// `etcd://HOST:PORT[,HOST:PORT...]` (replicated; coordinators elect a leader).
    #[arg(long, default_value = "redb:ladder-coordinator.redb")]
    store: StoreAddress,
    /// File holding the submit token (else LADDER_SUBMIT_TOKEN).
    #[arg(long)]
    submit_token_file: Option<PathBuf>,
    /// File holding the worker token (else LADDER_WORKER_TOKEN).
    #[arg(long)]
    worker_token_file: Option<PathBuf>,
    /// File holding a read-only token for the status page (else LADDER_READ_TOKEN; optional:
    /// the submit token reads it too).
    #[arg(long)]
    read_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve without TLS on a non-loopback address (tokens then cross the network in clear).
    #[arg(long)]
    insecure_allow_remote: bool,
    /// Address to serve HTTP on (HOST:PORT): Prometheus metrics at /metrics. Off unless given;
    /// the same rules as --listen (TLS with the same certificate, or loopback, or
    /// --insecure-allow-remote).
    #[arg(long, value_parser = listen_address)]
    http_listen: Option<SocketAddr>,
    /// A worker that has not sent a heartbeat for this long is considered lost (1 s to
    /// 10 min; workers heartbeat every third of it).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    lease_ttl_ms: u64,
    /// How long a job that could start on fewer workers waits for more to register (at most an
    /// hour).
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    rendezvous_grace_ms: u64,
    /// A running job whose workers all make no progress for this long has its hung workers
    /// (those not waiting on the others) expelled and restarts from its latest checkpoint.
    /// Shape preparation, evaluation and checkpoint snapshots count as progress. A worker that
    /// does not join its new generation's rendezvous within this long is expelled too. At
    /// least the lease (progress is seen through heartbeats), at most a week.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1_000..=604_800_000))]
    stall_timeout_ms: u64,
    /// A running job below its largest world size takes idle workers (a node that came back)
    /// at a checkpoint at least this long after its generation started (at most a day).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    regroup_interval_s: u64,
    /// On SIGTERM, keep serving for up to this long while workers still train, so that those
    /// stopped with it (a Slurm job's cancellation signals every process at once) can commit
    /// their leaving checkpoint; 0 stops at once. A second signal stops at once.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    drain_s: u64,
    /// An ended job's record and curves leave the store this many hours after it ended (its
    /// checkpoints and TensorBoard run stay); 0 keeps them until `ladder delete` (at most a
    /// year).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(0..=8_760))]
    retire_ended_after_h: u64,
    /// With etcd: talk to it over TLS, checking its certificate against this CA (PEM).
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// With etcd over TLS: this coordinator's client certificate (PEM), for an etcd that
    /// authenticates its clients (`--client-cert-auth`).
    #[arg(long, requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// With etcd: the leadership lease. A standby takes over within this time after the
    /// leader dies (2 s to 5 min).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i64).range(2..=300))]
    leader_ttl_s: i64,
    /// Log format.
    #[arg(long, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,
}

/// `HOST:PORT` with HOST an address or a name (`localhost:7070`): the first address it resolves
/// to.
fn listen_address(text: &str) -> std::result::Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addresses = text
        .to_socket_addrs()
        .map_err(|e| format!("expected HOST:PORT (127.0.0.1:7070, localhost:7070): {e}"))?;
    addresses
        .next()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

fn read_token(file: Option<&PathBuf>, env: &str, flag: &str) -> Result<String> {
    if let Some(path) = file {
        return ladder_core::token::read(path).with_context(|| flag.to_owned());
    }
    let token = std::env::var(env).unwrap_or_default().trim().to_owned();
    if token.is_empty() {
        bail!("no token: set {env} or pass {flag} (a file holding the token)");
    }
    Ok(token)
}

async fn shutdown_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

/// Serves on while any worker trains, for at most `within` or until a second signal: workers
/// stopped at the same moment checkpoint, and leave through this coordinator. Once they have
/// left, it serves one heartbeat interval more, in which each hears that it left (else it would
/// wait out its own grace for an answer).
async fn drain(coordinator: &Coordinator, within: Duration) {
    let until = tokio::time::Instant::now() + within;
    let heard = coordinator.config().lease_ttl / 3 + Duration::from_secs(1);
    let mut again = std::pin::pin!(shutdown_signal());
    let mut waited = false;
    loop {
        let training = coordinator
            .snapshot()
            .workers
            .iter()
            .filter(|w| !w.job_id.is_empty())
            .count();
        let now = tokio::time::Instant::now();
        let pause = match training {
            0 if !waited => return,
            0 => (now + heard).min(until) - now,
            _ if now >= until => {
                tracing::warn!(training, "stopping while workers still train (--drain-s)");
                return;
            }
            _ => {
                if !waited {
                    tracing::info!(
                        training,
                        "serving until the training workers leave (--drain-s)"
                    );
                    waited = true;
                }
                Duration::from_millis(250)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            why = &mut again => {
                tracing::info!("{why} again; stopping at once");
                return;
            }
        }
        if training == 0 {
            return;
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    logging::init(args.log_format);
    if let Err(e) = run(args).await {
        eprintln!("ladder-coordinator: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    if args.stall_timeout_ms < args.lease_ttl_ms {
        bail!(
            "--stall-timeout-ms {} is shorter than --lease-ttl-ms {}: a worker's progress is \
             seen through its heartbeats, so a stall can only be judged over at least one lease",
            args.stall_timeout_ms,
            args.lease_ttl_ms
        );
    }
    let tokens = Tokens {
        submit: read_token(
            args.submit_token_file.as_ref(),
            "LADDER_SUBMIT_TOKEN",
            "--submit-token-file",
        )?,
        worker: read_token(
            args.worker_token_file.as_ref(),
            "LADDER_WORKER_TOKEN",
            "--worker-token-file",
        )?,
        read: match (&args.read_token_file, std::env::var_os("LADDER_READ_TOKEN")) {
            (None, None) => None,
            (file, _) => Some(read_token(
                file.as_ref(),
                "LADDER_READ_TOKEN",
                "--read-token-file",
            )?),
        },
    };
    if tokens.read.as_ref() == Some(&tokens.worker) {
        bail!("the read and worker tokens must differ, so that a worker node cannot read jobs");
    }
    if tokens.submit == tokens.worker {
        bail!("the submit and worker tokens must differ, so that a worker node cannot submit jobs");
    }
    // TLS files are read and parsed before anything else starts, so a bad one fails at once.
    // Every connection is pinged more often than an idle one is ended (see connections).
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(GRPC_KEEPALIVE))
        .http2_keepalive_timeout(Some(GRPC_KEEPALIVE))
        // A connection answering pings is never idle, so none is held for ever: each is asked
        // to go (GOAWAY; clients reconnect on their own) after its age, and ended a grace
        // later; and each carries a bounded number of calls at once.
        .max_connection_age(GRPC_MAX_AGE)
        .max_connection_age_grace(GRPC_MAX_AGE_GRACE)
        .max_concurrent_streams(GRPC_STREAMS_PER_CONNECTION);
    let mut http_tls = None;
    if let (Some(cert_path), Some(key_path)) = (&args.tls_cert, &args.tls_key) {
        let cert = std::fs::read(cert_path)
            .with_context(|| format!("cannot read --tls-cert {}", cert_path.display()))?;
        let key = std::fs::read(key_path)
            .with_context(|| format!("cannot read --tls-key {}", key_path.display()))?;
        let unusable = || {
            format!(
                "--tls-cert {} with --tls-key {} is not a usable PEM certificate chain and \
                 private key",
                cert_path.display(),
                key_path.display()
            )
        };
        if args.http_listen.is_some() {
            http_tls = Some(
                http::tls_config(&cert, &key)
                    .map_err(anyhow::Error::msg)
                    .with_context(unusable)?,
            );
        }
        let config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        builder = builder.tls_config(config).with_context(unusable)?;
    }
    let tls = args.tls_cert.is_some();
    for (flag, address) in [
        ("--listen", Some(args.listen)),
        ("--http-listen", args.http_listen),
    ] {
        if let Some(address) = address
            && !tls
            && !address.ip().is_loopback()
            && !args.insecure_allow_remote
        {
            bail!(
                "refusing to serve on {address} ({flag}) without TLS: tokens and job details \
                 would cross the network in clear. Pass --tls-cert and --tls-key, listen on a \
                 loopback address, or pass --insecure-allow-remote on a trusted network"
            );
        }
    }
    // Bind before campaigning, so a bad address fails fast; serve only once leading.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let http_listener = match args.http_listen {
        Some(at) => Some(
            tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (--http-listen)"))?,
        ),
        None => None,
    };

    let config = Config {
        lease_ttl: Duration::from_millis(args.lease_ttl_ms),
        rendezvous_grace: Duration::from_millis(args.rendezvous_grace_ms),
        stall_timeout: Duration::from_millis(args.stall_timeout_ms),
        regroup_interval: Duration::from_secs(args.regroup_interval_s),
        retire_ended_after: (args.retire_ended_after_h > 0)
            .then(|| Duration::from_secs(args.retire_ended_after_h * 3600)),
    };
    let backend = match &args.store {
        StoreAddress::Redb(path) => Backend::Redb(Arc::new(RedbStore::open(path)?)),
        // A wrong address fails here, at once; once etcd has answered, an outage is waited out.
        StoreAddress::Etcd(endpoints) => {
            let tls = args.etcd_ca.clone().map(|ca| EtcdTls {
                ca,
                identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
            });
            Backend::Etcd(Box::new(EtcdStore::connect(endpoints, tls.as_ref()).await?))
        }
    };

    // One server for the process, answering through whichever term serves (see Serving).
    let metrics = Arc::new(Metrics::default());
    let serving = Serving::new("starting: recovering its state from the store");
    let (_health, health_service) = tonic_health::server::health_reporter();
    let server = builder
        .layer(RpcTimerLayer(metrics.clone()))
        .layer(WhileServingLayer(serving.clone()))
        .add_service(health_service)
        .add_service(JobServiceServer::with_interceptor(
            JobApi(serving.clone()),
            tokens.require(Role::Submitter),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            WorkerApi(serving.clone()),
            tokens.require(Role::Worker),
        ));
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut announcement = vec![format!("ladder-coordinator listening on {address}")];
    if let Some(listener) = http_listener {
        let scheme = if http_tls.is_some() { "https" } else { "http" };
        announcement.push(format!(
            "ladder-coordinator metrics at {scheme}://{}/metrics",
            listener.local_addr()?
        ));
        tokio::spawn(http::serve(
            listener,
            http::router(serving.clone(), tokens.clone()),
            http_tls,
            http::ConnectionLimits::default(),
            async {
                let _ = http_stopped.await;
            },
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let open_files = connections::raise_open_file_limit();
    let max = (open_files / 2).clamp(64, MAX_GRPC_CONNECTIONS) as usize;
    let limits = connections::Limits {
        // Half the descriptors: the store, the HTTP server and the TensorBoard files take
        // some; clients beyond wait in the backlog.
        max,
        // A quarter of them from one address (a node runs a worker per GPU).
        per_peer: max / 4,
        idle: GRPC_IDLE,
    };
    tracing::info!(
        connections = limits.max,
        open_file_limit = open_files,
        "serving gRPC"
    );
    let accepted = connections::accept(listener, limits, "gRPC");
    let served = tokio::spawn(server.serve_with_incoming_shutdown(
        tokio_stream::StreamExt::map(
            tokio_stream::wrappers::ReceiverStream::new(accepted),
            Ok::<_, std::io::Error>,
        ),
        async {
            let _ = stop_rx.await;
        },
    ));

    let mut shutdown = std::pin::pin!(shutdown_signal());
    let mut pause = Duration::from_millis(250);
    let outcome: Result<()> = loop {
        // One term: won (or, on redb, the process's only one), recovered, served until its
        // leadership is lost or the process is asked to stop.
        let (store, mut lease): (SharedStore, Option<LeaderLease>) = match &backend {
            Backend::Redb(store) => (store.clone(), None),
            Backend::Etcd(candidate) => {
                serving
                    .wait("a standby: campaigning for leadership while another coordinator leads");
                tracing::info!(%address, "campaigning for leadership");
                let waiting = |e: &StoreError, retry: Duration| {
                    let why = format!(
                        "waiting for its store: {e}; trying again in {:.1} s",
                        retry.as_secs_f32()
                    );
                    tracing::warn!("{why}");
                    serving.wait(why);
                };
                let announced = address.to_string();
                let campaign = candidate.lead_when_possible(&announced, args.leader_ttl_s, waiting);
                let (term, lease) = tokio::select! {
                    won = campaign => won,
                    why = &mut shutdown => {
                        tracing::info!("{why}; shutting down");
                        break Ok(());
                    }
                };
                tracing::info!(%address, "elected leader");
                (Arc::new(term), Some(lease))
            }
        };
        let recovered = Coordinator::recover_with(store, config.clone(), metrics.clone()).await;
        let coordinator = match recovered {
            Ok(coordinator) => coordinator,
            Err(e) if lease.is_some() => {
                // etcd went away again, or the term with it: campaign afresh.
                let why = format!("cannot recover its state from the store: {e}; trying again");
                tracing::warn!("{why}");
                serving.wait(why);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(e) => break Err(e.into()),
        };
        pause = Duration::from_millis(250);
        let ticker = {
            let coordinator = coordinator.clone();
            tokio::spawn(async move {
                let mut interval = tokio::time::interval(Duration::from_millis(250));
                loop {
                    interval.tick().await;
                    if let Err(e) = coordinator.tick().await {
                        tracing::error!("membership check failed: {e}");
                    }
                }
            })
        };
        serving.lead(coordinator.clone());
        // Said once, when this process first serves (scripts wait for the line).
        for line in announcement.drain(..) {
            println!("{line}");
        }
        let mut deposition = coordinator.deposed();
        let lost = async {
            match lease.as_mut() {
                Some(lease) => (&mut lease.lost)
                    .await
                    .unwrap_or_else(|_| "lease task ended".into()),
                None => std::future::pending().await,
            }
        };
        // Leadership is watched while draining too: a coordinator that no longer leads stops
        // deciding at once, drain or not.
        let mut no_longer_leading = std::pin::pin!(async {
            tokio::select! {
                why = lost => format!("lost leadership: {why}"),
                _ = deposition.wait_for(Option::is_some) => "another coordinator leads now".to_owned(),
            }
        });
        let stopping = tokio::select! {
            why = &mut shutdown => {
                tracing::info!("{why}; shutting down");
                tokio::select! {
                    () = drain(&coordinator, Duration::from_secs(args.drain_s)) => {}
                    why = &mut no_longer_leading => tracing::warn!("{why}; stopping"),
                }
                true
            }
            why = &mut no_longer_leading => {
                tracing::warn!("{why}: no longer deciding; campaigning again");
                serving.wait(format!("{why}; campaigning again"));
                false
            }
        };
        ticker.abort();
        if stopping {
            break Ok(());
        }
    };
    serving.wait("shutting down");
    let _ = stop_tx.send(());
    let _ = http_stop.send(());
    if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .unwrap_or(Ok(Ok(())))
    {
        tracing::warn!("server stopped with: {e}");
    }
    outcome
}

/// Where this process keeps its state: the embedded file (one coordinator, one term for the
/// process's life) or etcd (terms won by election, as often as leadership is lost and won).
enum Backend {
    Redb(Arc<RedbStore>),
    Etcd(Box<EtcdStore>),
}
