//! `ladder-worker`: one process per GPU (or CPU worker). Registers with the coordinator, keeps
//! its lease and trains whatever it is assigned. See `ladder-worker --help`.

use clap::Parser;
use ladder_core::logging::{self, LogFormat};
use ladder_train::precision::Precision;
use ladder_train::trainer::Faults;
use ladder_worker::agent::{self, Config};
use ladder_worker::metrics::WorkerMetrics;
use ladder_worker::nccl_check;
use ladder_worker::threads;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

#[derive(Parser, Debug)]
#[command(version, about = "Ladder's worker: one rank of a training job.")]
struct Args {
    /// Coordinator URL(s), comma-separated.
    #[arg(
        long,
        env = "LADDER_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// The coordinator's worker token.
    #[arg(long, env = "LADDER_WORKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the worker token (readable by its owner, or its group, only): the way to
    /// pass it on a shared node. It takes the place of --token / LADDER_WORKER_TOKEN.
    #[arg(long, env = "LADDER_WORKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https:// coordinator.
    #[arg(long, env = "LADDER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// What training computes in: bfloat16 autocast with channels-last tensors (the default
    /// on CUDA), or float32 in the standard layout (the default on CPU).
    #[arg(long, value_name = "float32|bfloat16")]
    precision: Option<Precision>,
    /// A stable name for this worker slot, kept with its registration (the coordinator logs it
    /// beside the worker id).
    #[arg(long, default_value = "")]
    name: String,
    /// Threads for libtorch's CPU operators (0: this worker's share of the node's cores: the
    /// cores over the workers on the node, as the launcher or the visible GPUs tell; at most
    /// 1024).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1024))]
    threads: u64,
    /// The host or address other workers reach this one's CPU ring on.
    #[arg(long, default_value = "127.0.0.1")]
    ring_host: String,
    /// Seconds a collective waits on a silent peer before giving up.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    collective_timeout_s: u64,
    /// Seconds a stopped run's training thread (its generation ended, its lease lost) may go
    /// without progress before it returns. One that does is stuck (a GPU kernel, the driver, a
    /// file system): the worker exits with code 1, so that a supervisor starts it again, instead
    /// of holding its GPU doing nothing.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    stop_grace_s: u64,
    /// After every step, append the global step and a SHA-256 of the parameters and BatchNorm
    /// statistics to FILE (a check that replicas agree: every rank writes the same lines).
    #[arg(long, value_name = "FILE")]
    replica_digests: Option<PathBuf>,
    /// Fault injection for tests: the training thread hangs for good before this global step
    /// while heartbeats go on (the coordinator's stall detection must expel this worker).
    #[arg(long, value_name = "STEP", hide = true)]
    inject_hang_before_step: Option<u64>,
    /// Fault injection for tests: the collective fails with an error before this global step,
    /// every time the run comes to it.
    #[arg(long, value_name = "STEP", hide = true)]
    inject_collective_error_before_step: Option<u64>,
    /// Fault injection for tests: right after this global step's update the parameters turn
    /// to NaN, as a diverged update leaves them.
    #[arg(long, value_name = "STEP", hide = true)]
    inject_nan_after_step: Option<u64>,
    /// Fault injection for tests: the training thread hangs for good once its run was
    /// stopped or failed, while heartbeats go on.
    #[arg(long, hide = true)]
    inject_hang_when_stopped: bool,
    /// Check that this GPU can run the gradient allreduce (NCCL found, a one-rank
    /// communicator, a sum of a CUDA buffer), print what was loaded and exit: 0 when it works.
    /// Needs --device cuda:N; joins no coordinator.
    #[arg(long)]
    check_nccl: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_name = "text|json")]
    log_format: LogFormat,
    /// Address to serve Prometheus metrics on (HOST:PORT, at /metrics): step time and its
    /// parts, data-wait share, skipped samples, checkpoint times and bytes, memory. Off unless
    /// given; loopback only, unless --metrics-allow-remote.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Serve metrics on a non-loopback --metrics-listen (plain HTTP: they tell job ids and
    /// timings, never a secret).
    #[arg(long)]
    metrics_allow_remote: bool,
}

fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "cpu" => Ok(Device::Cpu),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(format!(
                "--device {text:?}: expected `cpu` or `cuda:N` (N the GPU's index)"
            )),
        },
    }
}

fn check_device(device: Device) -> Result<(), String> {
    if let Device::Cuda(n) = device {
        let available = tch::Cuda::device_count() as usize;
        if n >= available {
            return Err(format!(
                "--device cuda:{n}: this machine has {available} CUDA device(s) visible to libtorch"
            ));
        }
    }
    Ok(())
}

/// A usage or setup error: exit code 2, as clap's own.
fn setup_error(message: impl std::fmt::Display) -> ! {
    eprintln!("ladder-worker: error: {message}");
    std::process::exit(2);
}

/// `--check-nccl`: the library first (it needs no GPU), then the device and the check.
fn check_nccl(device: Device, timeout: Duration) -> ! {
    let Device::Cuda(ordinal) = device else {
        setup_error("--check-nccl needs --device cuda:N");
    };
    let library = nccl_check::describe_library().unwrap_or_else(|e| setup_error(e));
    println!("library: {library}");
    check_device(device).unwrap_or_else(|e| setup_error(e));
    match nccl_check::run(ordinal, timeout) {
        Ok(()) => {
            println!("NCCL check passed on cuda:{ordinal}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("ladder-worker: NCCL check failed on cuda:{ordinal}: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let args = Args::parse();
    logging::init(args.log_format);
    let device = parse_device(&args.device).unwrap_or_else(|e| setup_error(e));
    if args.check_nccl {
        check_nccl(device, Duration::from_secs(args.collective_timeout_s));
    }
    check_device(device).unwrap_or_else(|e| setup_error(e));
    // Before any job: the NCCL and CUDA runtime libtorch loaded, bound, or why not.
    if device.is_cuda() {
        let library = nccl_check::describe_library().unwrap_or_else(|e| setup_error(e));
        tracing::info!("{library}");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = if device.is_cuda() {
        tch::Cuda::device_count() as usize
    } else {
        0
    };
    let share = threads::share(cores, |name| std::env::var(name).ok(), gpus);
    // A worker alone on its node keeps libtorch's own default (one per physical core).
    let libtorch = match args.threads {
        0 if share.workers > 1 => Some(share.threads),
        0 => None,
        n => Some(n as usize),
    };
    tracing::info!(
        "threads: {} for libtorch{}, {} for decoding unless the spec sets data.decode_threads: {}",
        libtorch.map_or("its default".to_owned(), |n| n.to_string()),
        if args.threads > 0 { " (--threads)" } else { "" },
        share.threads,
        share.why
    );
    threads::set(share);
    if let Some(n) = libtorch {
        tch::set_num_threads(n as i32);
    }
    let config = Config {
        coordinator: args.coordinator,
        token: match &args.token_file {
            Some(path) => ladder_core::token::read(path).unwrap_or_else(|e| setup_error(e)),
            None => args.token.unwrap_or_default(),
        },
        tls_ca: args.tls_ca,
        device,
        precision: args.precision.unwrap_or(Precision::default_for(device)),
        name: args.name,
        ring_host: args.ring_host,
        collective_timeout: Duration::from_secs(args.collective_timeout_s),
        progress_bar: std::io::stderr().is_terminal(),
        replica_digests: args.replica_digests,
        stop_grace: Duration::from_secs(args.stop_grace_s),
        metrics: WorkerMetrics::new(match device {
            Device::Cuda(n) => Some(n),
            _ => None,
        }),
        faults: Faults {
            hang_before_step: args.inject_hang_before_step,
            collective_error_before_step: args.inject_collective_error_before_step,
            nan_after_step: args.inject_nan_after_step,
            hang_when_stopped: args.inject_hang_when_stopped,
        },
    };
    let runtime = tokio::runtime::Runtime::new().expect("starting the tokio runtime");
    if let Some(address) = args.metrics_listen {
        if !address.ip().is_loopback() && !args.metrics_allow_remote {
            setup_error(format!(
                "--metrics-listen {address} is not a loopback address: pass \
                 --metrics-allow-remote to serve metrics to the network (plain HTTP)"
            ));
        }
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .unwrap_or_else(|e| setup_error(format!("--metrics-listen {address}: {e}")));
        if let Ok(bound) = listener.local_addr() {
            println!("ladder-worker metrics at http://{bound}/metrics");
        }
        runtime.spawn(ladder_worker::metrics::serve(
            listener,
            config.metrics.clone(),
        ));
    }
    if let Err(e) = runtime.block_on(agent::run(config)) {
        eprintln!("ladder-worker: error: {e:#}");
        if e.is::<agent::Stuck>() {
            // SAFETY: ends the process at once; the exit handlers and static destructors of
            // libtorch and CUDA could wait for the stuck thread's driver call.
            unsafe { libc::_exit(1) };
        }
        std::process::exit(1);
    }
}
