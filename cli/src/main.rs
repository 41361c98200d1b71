//! `ladder`: the command line of Ladder. Talks to the coordinator named by
//! `--coordinator` / `LADDER_COORDINATOR` with the token from `--token` / `LADDER_TOKEN`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ladder_core::dataset;
use ladder_core::spec::JobSpec;
use ladder_proto::client::{self, Authed};
use ladder_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `println!` that ends the program quietly when standard output is a closed pipe (`ladder
/// status JOB | head -3`), as ripgrep does: the reader wanted no more.
macro_rules! say {
    ($($arg:tt)*) => {
        crate::say(format_args!($($arg)*))
    };
}

fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ladder: error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

mod import;
mod show;

use show::{
    job_details, job_line, print_index, printable_job, printable_worker, rpc_error, state_name,
    terminal, worker_line,
};

/// Where the connection options show in `--help`: apart from each command's own (the dataset
/// tools take them but never connect).
const COORDINATOR_OPTIONS: &str = "Coordinator options (commands that talk to it)";

#[derive(Parser)]
#[command(
    version,
    about = "Ladder: progressive-learning training jobs for EfficientNetV2."
)]
struct Cli {
    /// Coordinator URL(s), comma-separated; tried in order (a standby coordinator does not
    /// answer until it leads).
    #[arg(
        long,
        env = "LADDER_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        global = true,
        help_heading = COORDINATOR_OPTIONS
    )]
    coordinator: String,
    /// Submit token.
    #[arg(
        long,
        env = "LADDER_TOKEN",
        hide_env_values = true,
        global = true,
        help_heading = COORDINATOR_OPTIONS
    )]
    token: Option<String>,
    /// File holding the submit token (readable by its owner, or its group, only); it takes
    /// the place of --token / LADDER_TOKEN.
    #[arg(
        long,
        env = "LADDER_TOKEN_FILE",
        global = true,
        help_heading = COORDINATOR_OPTIONS
    )]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify an https:// coordinator.
    #[arg(
        long,
        env = "LADDER_TLS_CA",
        global = true,
        help_heading = COORDINATOR_OPTIONS
    )]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a job spec locally, submit it, and print the new job's id (last line).
    Submit {
        /// The job spec (TOML); its relative paths are relative to its own directory.
        spec: PathBuf,
    },
    /// Show a job: state, stage, epoch, step, workers, throughput, last checkpoint.
    Status {
        /// The job's id, as `submit` printed it.
        job: String,
        /// Keep showing the job as it changes, until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a job until it ends, a line per change (as `status --watch`); exit 0 if it
    /// completed, 1 if it failed or was cancelled.
    Wait {
        /// The job's id.
        job: String,
    },
    /// Check that a coordinator serves (the gRPC health check, which only the leader answers;
    /// no token needed): exit 0 and print its URL if one does, 1 if none does. For readiness
    /// probes and scripts that wait for a coordinator.
    Health,
    /// List the jobs that are queued or training, one per line, starting with the id (page by
    /// page: any number of jobs).
    List {
        /// Ended jobs (completed, failed, cancelled) too.
        #[arg(long)]
        all: bool,
    },
    /// List registered workers, one per line, starting with the id: name, host, device, the
    /// job and rank it trains (or idle), and its signs of life.
    Workers,
    /// Cancel a job.
    Cancel {
        /// The job's id.
        job: String,
    },
    /// Delete an ended job from the coordinator's store (its checkpoints and TensorBoard run
    /// stay in its checkpoint directory; ended jobs also leave on their own, a week after they
    /// ended by default).
    Delete {
        /// The job's id.
        job: String,
    },
    /// Continue an ended job from its latest committed checkpoint.
    Resume {
        /// The job's id.
        job: String,
        /// Resume from this checkpoint instead of the latest.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Run on exactly this many workers.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        workers: Option<u32>,
    },
    /// Print a spec's recipe card without a coordinator: per stage its epochs, image size,
    /// micro-batch, steps, dropout, RandAugment (and what its magnitude does), Mixup and CutMix,
    /// learning rate at its start and end, and share of the compute. Steps and rates need the
    /// spec's dataset manifest.
    Plan {
        /// The job spec (TOML).
        spec: PathBuf,
    },
    /// Write a contact sheet (PNG) of training samples as the loader makes them at one stage:
    /// a column per sample, its source on top, below it cropped, flipped, RandAugment-ed and
    /// mixed as that stage trains it.
    Preview {
        /// The job spec (TOML); its dataset is read.
        spec: PathBuf,
        /// The stage, counted from 1 (`ladder plan` lists them).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        stage: u32,
        /// Where to write the PNG.
        #[arg(long)]
        out: PathBuf,
        /// How many samples, spread over the dataset.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
        samples: u32,
    },
    /// Dataset tools.
    #[command(subcommand)]
    Dataset(DatasetCommand),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Write a learnable synthetic dataset (classes told apart by shape, texture and colour) as
    /// JPEG shards in DIR, indexed.
    Synth {
        /// A new or empty directory.
        dir: PathBuf,
        /// Number of classes.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
        classes: u32,
        /// Number of samples, spread evenly over the classes.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        samples: u64,
        /// Number of shards.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
        shards: u32,
        /// Seed of the images and their order: the same seed writes the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Turn ImageNet as it comes (see SOURCE) into shuffled shards with indexes and manifests:
    /// DEST/train/ and, held out from it, DEST/val/; DEST/classes.json names the classes.
    Import {
        /// ImageNet as it comes: an ImageFolder tree (one folder per class), a directory of
        /// per-synset tars (n01440764.tar ...), a tar of them (ILSVRC2012_img_train.tar,
        /// fall11_whole.tar), read in place; a tar of them gzipped (winter21_whole.tar.gz),
        /// streamed twice; or a tar of images with --labels (ILSVRC2012_img_val.tar).
        source: PathBuf,
        /// A new or empty directory.
        dest: PathBuf,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        shard_samples: u32,
        /// Seed of the shuffle across shards and of the held-out split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images of each class held out for validation in DEST/val/ (0: none); a class with
        /// no more images than this trains on all of them.
        #[arg(long, default_value_t = 50)]
        held_out: u32,
        /// Set aside classes with at most this many images (ImageNet-21K-P sets aside those
        /// with 500 or fewer); 0 keeps every class.
        #[arg(long, default_value_t = 0)]
        min_class_images: u32,
        /// Decode every image, leaving out (and reporting) those that do not decode: a
        /// truncated download still starts like a JPEG. Slower.
        #[arg(long)]
        verify: bool,
        /// The labels of a tar of images: Kaggle's LOC_val_solution.csv (ImageId,
        /// PredictionString, the wnid first), or the ILSVRC-2012 devkit's directory, unpacked
        /// (data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Threads examining images and writing shards (0: one per core, at least 8: on a
        /// shared file system reads wait on the network more than on the cores).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1024))]
        threads: u32,
        /// Number the classes as another import did (its DEST/classes.json): a val set
        /// labelled as its train set, even where it lacks some classes.
        #[arg(long, value_name = "CLASSES_JSON")]
        classes_from: Option<PathBuf>,
    },
    /// Index the WebDataset shards (*.tar) in DIR: writes NAME.idx.json per shard,
    /// DIR/samples.idx (all of them in one compact, memory-mapped table) and
    /// DIR/manifest.json. Run it again on a dataset indexed before samples.idx existed to add
    /// one.
    Index {
        /// The directory of the shards.
        dir: PathBuf,
        /// Number of classes (labels must be below it); default: the largest label + 1.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        classes: Option<u32>,
    },
}

type Client = JobServiceClient<Authed>;

async fn connect(cli: &Cli) -> Result<Client> {
    let token = match &cli.token_file {
        Some(path) => ladder_core::token::read(path)?,
        None => cli.token.clone().unwrap_or_default(),
    };
    let channel = client::connect(
        &cli.coordinator,
        &token,
        "pass --token-file (a file holding the coordinator's submit token), or set LADDER_TOKEN",
        cli.tls_ca.as_deref(),
    )
    .await?;
    Ok(JobServiceClient::new(channel))
}

/// How long `status --watch` keeps trying to reach a coordinator again after losing it: longer
/// than a restart or a failover to a standby takes.
const WATCH_RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Why a watch stopped before its job ended.
enum WatchBreak {
    /// Nothing another coordinator, or this one a moment later, would answer differently.
    Final(anyhow::Error),
    /// The coordinator went away (or is not back yet).
    Lost(anyhow::Error),
}

/// `status --watch`: a line per change of `job` until it ends. When the coordinator goes away
/// mid-watch (a restart, a failover to a standby) it is reached again, through the same list
/// of addresses, for up to [`WATCH_RECONNECT_FOR`].
async fn watch(cli: &Cli, job: &str) -> Result<pb::Job> {
    let mut shown = String::new();
    let mut lost_since: Option<Instant> = None;
    loop {
        let reached = |e| match lost_since {
            Some(_) => WatchBreak::Lost(e),
            None => WatchBreak::Final(e),
        };
        let outcome = match connect(cli).await {
            Ok(mut client) => follow(&mut client, job, &mut shown, &mut lost_since).await,
            Err(e) => Err(reached(e)),
        };
        match outcome {
            Ok(ended) => return Ok(ended),
            Err(WatchBreak::Final(e)) => return Err(e),
            Err(WatchBreak::Lost(e)) => {
                let since = *lost_since.get_or_insert_with(|| {
                    eprintln!("lost the coordinator ({e:#}); reaching it again");
                    Instant::now()
                });
                if since.elapsed() > WATCH_RECONNECT_FOR {
                    return Err(e.context(format!(
                        "no coordinator answered for {} s",
                        WATCH_RECONNECT_FOR.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Prints `job`'s changes from one coordinator until the job ends (`Ok`, the ended job) or the
/// watch breaks.
async fn follow(
    client: &mut Client,
    job: &str,
    shown: &mut String,
    lost_since: &mut Option<Instant>,
) -> std::result::Result<pb::Job, WatchBreak> {
    let classify = |what: &str, status: tonic::Status| match status.code() {
        tonic::Code::NotFound
        | tonic::Code::InvalidArgument
        | tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied => WatchBreak::Final(rpc_error(what, status)),
        _ => WatchBreak::Lost(rpc_error(what, status)),
    };
    let mut events = client
        .watch_job(pb::WatchJobRequest { id: job.to_owned() })
        .await
        .map_err(|s| classify("status", s))?
        .into_inner();
    let mut last = None;
    while let Some(event) = events.message().await.map_err(|s| classify("watch", s))? {
        let Some(job) = event.job.map(printable_job) else {
            continue;
        };
        *lost_since = None;
        // Events come on every change of the record; a line only when what it shows changed.
        let line = job_line(&job);
        if line != *shown {
            say!("{line}");
            *shown = line;
        }
        last = Some(job);
    }
    if let Some(job) = last.filter(terminal) {
        Ok(job)
    } else {
        Err(WatchBreak::Lost(anyhow::anyhow!(
            "the coordinator closed the watch before the job ended"
        )))
    }
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Submit { spec } => {
            let spec = JobSpec::load(spec)?;
            let mut client = connect(&cli).await?;
            let job = client
                .submit_job(pb::SubmitJobRequest {
                    spec_toml: spec.to_toml(),
                })
                .await
                .map_err(|s| rpc_error("submit rejected", s))?
                .into_inner()
                .job
                .map(printable_job)
                .context("the coordinator returned no job")?;
            eprintln!("submitted {} ({})", job.name, state_name(job.state));
            say!("{}", job.id);
        }
        Command::Status { job, watch: true } => {
            watch(&cli, job).await?;
        }
        Command::Wait { job } => {
            let ended = watch(&cli, job).await?;
            if pb::JobState::try_from(ended.state) != Ok(pb::JobState::Completed) {
                anyhow::bail!(
                    "job {} {}: {}",
                    ended.id,
                    state_name(ended.state),
                    ended.message
                );
            }
        }
        Command::Health => {
            let url = client::reach(&cli.coordinator, cli.tls_ca.as_deref()).await?;
            say!("{url} serves");
        }
        Command::Status { job, watch: false } => {
            let mut client = connect(&cli).await?;
            let job = client
                .get_job(pb::GetJobRequest { id: job.clone() })
                .await
                .map_err(|s| rpc_error("status", s))?
                .into_inner();
            let job = printable_job(job);
            say!("{}", job_details(&job));
        }
        Command::List { all } => {
            let mut client = connect(&cli).await?;
            let mut request = pb::ListJobsRequest {
                include_ended: *all,
                ..Default::default()
            };
            let mut ended_left_out = 0;
            loop {
                let page = client
                    .list_jobs(request.clone())
                    .await
                    .map_err(|s| rpc_error("list", s))?
                    .into_inner();
                for job in page.jobs.into_iter().map(printable_job) {
                    say!("{}", job_line(&job));
                }
                ended_left_out += u64::from(page.ended_left_out);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            if ended_left_out > 0 {
                eprintln!(
                    "({ended_left_out} ended job(s) not listed: `ladder list --all` lists them)"
                );
            }
        }
        Command::Workers => {
            let mut client = connect(&cli).await?;
            let workers = client
                .list_workers(pb::ListWorkersRequest {})
                .await
                .map_err(|s| rpc_error("workers", s))?
                .into_inner()
                .workers;
            for worker in workers.into_iter().map(printable_worker) {
                say!("{}", worker_line(&worker));
            }
        }
        Command::Cancel { job } => {
            let mut client = connect(&cli).await?;
            let job = client
                .cancel_job(pb::CancelJobRequest { id: job.clone() })
                .await
                .map_err(|s| rpc_error("cancel", s))?
                .into_inner();
            let job = printable_job(job);
            say!("{}", job_line(&job));
        }
        Command::Delete { job } => {
            let mut client = connect(&cli).await?;
            client
                .delete_job(pb::DeleteJobRequest { id: job.clone() })
                .await
                .map_err(|s| rpc_error("delete", s))?;
            eprintln!("deleted {job}");
        }
        Command::Resume {
            job,
            checkpoint,
            workers,
        } => {
            let mut client = connect(&cli).await?;
            let job = client
                .resume_job(pb::ResumeJobRequest {
                    id: job.clone(),
                    checkpoint_id: checkpoint.clone().unwrap_or_default(),
                    workers: workers.unwrap_or(0),
                })
                .await
                .map_err(|s| rpc_error("resume", s))?
                .into_inner();
            let job = printable_job(job);
            eprintln!("{}", job.message);
            say!("{}", job_line(&job));
        }
        Command::Plan { spec } => {
            let spec = JobSpec::load(spec)?;
            let steps_per_epoch = match dataset::Manifest::load(&spec.data.manifest) {
                Ok(manifest) => {
                    let plan =
                        ladder_core::sample::SamplePlan::of_job(&spec, &manifest.shard_sizes())
                            .map_err(|e| anyhow::anyhow!("batch.global: {e}"))?;
                    Some(plan.steps_per_epoch())
                }
                Err(e) => {
                    eprintln!("warning: no steps or learning rates: data.manifest: {e}");
                    None
                }
            };
            say!(
                "{}",
                ladder_core::recipe::Card::new(&spec, steps_per_epoch).render()
            );
        }
        Command::Preview {
            spec,
            stage,
            out,
            samples,
        } => {
            let spec = JobSpec::load(spec)?;
            let plan = ladder_core::stage::StagePlan::new(&spec);
            let epoch = plan
                .stage_starts()
                .nth(*stage as usize - 1)
                .with_context(|| {
                    format!(
                        "--stage {stage}: the spec has {} stages",
                        plan.stage_count()
                    )
                })?;
            let dataset =
                ladder_data::loader::Dataset::open(&spec.data.manifest).context("data.manifest")?;
            let sheet = ladder_data::preview::sheet(&dataset, &spec, epoch, *samples as usize)
                .map_err(|e| anyhow::anyhow!(e))?;
            ladder_data::preview::write_png(&sheet.image, out).map_err(|e| anyhow::anyhow!(e))?;
            say!(
                "stage {stage}: {} samples at {} px (RandAugment {:.2}, mixup {:.2}, cutmix {:.2}); wrote {}",
                sheet.trained.len(),
                epoch.image_size,
                epoch.randaugment_magnitude,
                epoch.mixup_alpha,
                epoch.cutmix_alpha,
                out.display()
            );
        }
        Command::Dataset(DatasetCommand::Index { dir, classes }) => {
            print_index(&ladder_core::indexing::index_dir(dir, *classes)?);
        }
        Command::Dataset(DatasetCommand::Synth {
            dir,
            classes,
            samples,
            shards,
            seed,
        }) => {
            print_index(&ladder_data::synth::write(
                dir, *classes, *samples, *shards, *seed,
            )?);
        }
        Command::Dataset(DatasetCommand::Import {
            source,
            dest,
            shard_samples,
            seed,
            held_out,
            min_class_images,
            verify,
            labels,
            threads,
            classes_from,
        }) => {
            let options = ladder_data::import::ImportOptions {
                shard_samples: *shard_samples,
                seed: *seed,
                held_out: *held_out,
                min_class_images: *min_class_images,
                verify: *verify,
                threads: *threads as usize,
            };
            import::run(
                source,
                dest,
                options,
                labels.as_deref(),
                classes_from.as_deref(),
            )?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("ladder: error: {}", client::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}
