//! `ladder`: the command line of Ladder. Talks to the coordinator named by
//! `--coordinator` / `LADDER_COORDINATOR` with the token from `--token` / `LADDER_TOKEN`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ladder_core::dataset;
use ladder_core::spec::JobSpec;
use ladder_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use std::path::PathBuf;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

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
        global = true
    )]
    coordinator: String,
    /// Submit token.
    #[arg(long, env = "LADDER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify an https:// coordinator.
    #[arg(long, env = "LADDER_TLS_CA", global = true)]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a job spec locally, submit it, and print the new job's id (last line).
    Submit { spec: PathBuf },
    /// Show a job: state, stage, epoch, step, workers, throughput, last checkpoint.
    Status {
        job: String,
        /// Keep showing the job as it changes, until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// List jobs, one per line, starting with the id.
    List,
    /// Cancel a job.
    Cancel { job: String },
    /// Continue an ended job from its latest committed checkpoint.
    Resume {
        job: String,
        /// Resume from this checkpoint instead of the latest.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Run on exactly this many workers.
        #[arg(long)]
        workers: Option<u32>,
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
        dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        classes: u32,
        #[arg(long, default_value_t = 1000)]
        samples: u64,
        #[arg(long, default_value_t = 4)]
        shards: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Turn an ImageFolder tree (SOURCE/<class>/<image>) into shuffled shards in DEST, with
    /// indexes, a manifest and DEST/classes.json.
    Import {
        source: PathBuf,
        dest: PathBuf,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_samples: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Index the WebDataset shards (*.tar) in DIR: writes NAME.idx.json per shard and
    /// DIR/manifest.json.
    Index {
        dir: PathBuf,
        /// Number of classes (labels must be below it); default: the largest label + 1.
        #[arg(long)]
        classes: Option<u32>,
    },
}

type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

async fn connect(cli: &Cli) -> Result<Client> {
    let token =
        cli.token.as_deref().filter(|t| !t.is_empty()).context(
            "no token: set LADDER_TOKEN or pass --token (the coordinator's submit token)",
        )?;
    let bearer = Bearer(
        format!("Bearer {token}")
            .parse()
            .context("the token has characters that cannot go in a header")?,
    );
    let mut failures = Vec::new();
    for url in cli
        .coordinator
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
    {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid coordinator URL {url:?}"))?
            .connect_timeout(std::time::Duration::from_secs(3));
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &cli.tls_ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("cannot read --tls-ca {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        }
        match endpoint.connect().await {
            Ok(channel) => return Ok(JobServiceClient::with_interceptor(channel, bearer)),
            Err(e) => failures.push(format!("{url}: {}", error_chain(&e))),
        }
    }
    bail!("cannot reach the coordinator ({})", failures.join("; "))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn rpc_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", status.message())
}

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Queued => "queued",
        pb::JobState::Rendezvous => "rendezvous",
        pb::JobState::Running => "running",
        pb::JobState::Completed => "completed",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

fn job_line(job: &pb::Job) -> String {
    let p = job.progress.unwrap_or_default();
    format!(
        "{}  {:<10}  {:<24}  stage {}/{}  epoch {}/{}  step {}  workers {}",
        job.id,
        state_name(job.state),
        job.name,
        p.stage + 1,
        job.stage_count,
        p.epoch + 1,
        job.epochs,
        p.step,
        job.workers.len()
    )
}

fn job_details(job: &pb::Job) -> String {
    let p = job.progress.unwrap_or_default();
    let last = job.checkpoints.last().map_or("none".to_owned(), |c| {
        format!(
            "{} (epoch {}, step {}) at {}",
            c.id,
            c.epoch + 1,
            c.step,
            c.path
        )
    });
    format!(
        "job        {}\nname       {}\nstate      {}\ngeneration {}\nstage      {}/{}{}\nepoch      {}/{}\nstep       {}/{}\nloss       {:.4}\nimages/s   {:.1}\nworkers    {}\ncheckpoint {}\nmessage    {}",
        job.id,
        job.name,
        state_name(job.state),
        job.generation,
        p.stage + 1,
        job.stage_count,
        if p.image_size > 0 {
            format!(" ({} px)", p.image_size)
        } else {
            String::new()
        },
        p.epoch + 1,
        job.epochs,
        p.step,
        p.steps_per_epoch,
        p.loss,
        p.images_per_second,
        if job.workers.is_empty() {
            "none".to_owned()
        } else {
            job.workers.join(", ")
        },
        last,
        job.message
    )
}

fn print_index(report: &dataset::IndexReport) {
    for issue in &report.issues {
        eprintln!("warning: {issue}");
    }
    let m = &report.manifest;
    println!(
        "indexed {} samples in {} shards, {} classes, {} issue(s); wrote {}",
        m.total_samples,
        m.shards.len(),
        m.classes,
        report.issues.len(),
        report.manifest_path.display()
    );
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
                .context("the coordinator returned no job")?;
            eprintln!("submitted {} ({})", job.name, state_name(job.state));
            println!("{}", job.id);
        }
        Command::Status { job, watch } => {
            let mut client = connect(&cli).await?;
            if *watch {
                let mut events = client
                    .watch_job(pb::WatchJobRequest { id: job.clone() })
                    .await
                    .map_err(|s| rpc_error("status", s))?
                    .into_inner();
                while let Some(event) = events.message().await.map_err(|s| rpc_error("watch", s))? {
                    if let Some(job) = event.job {
                        println!("{}", job_line(&job));
                    }
                }
            } else {
                let job = client
                    .get_job(pb::GetJobRequest { id: job.clone() })
                    .await
                    .map_err(|s| rpc_error("status", s))?
                    .into_inner();
                println!("{}", job_details(&job));
            }
        }
        Command::List => {
            let mut client = connect(&cli).await?;
            let jobs = client
                .list_jobs(pb::ListJobsRequest {})
                .await
                .map_err(|s| rpc_error("list", s))?
                .into_inner()
                .jobs;
            for job in &jobs {
                println!("{}", job_line(job));
            }
        }
        Command::Cancel { job } => {
            let mut client = connect(&cli).await?;
            let job = client
                .cancel_job(pb::CancelJobRequest { id: job.clone() })
                .await
                .map_err(|s| rpc_error("cancel", s))?
                .into_inner();
            println!("{}", job_line(&job));
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
            eprintln!("{}", job.message);
            println!("{}", job_line(&job));
        }
        Command::Dataset(DatasetCommand::Index { dir, classes }) => {
            print_index(&dataset::index_dir(dir, *classes)?);
        }
        Command::Dataset(DatasetCommand::Synth {
            dir,
            classes,
            samples,
            shards,
            seed,
        }) => {
            if *classes < 2 || *samples == 0 || *shards == 0 {
                bail!("--classes must be at least 2, --samples and --shards at least 1");
            }
            print_index(&ladder_data::synth::write(
                dir, *classes, *samples, *shards, *seed,
            )?);
        }
        Command::Dataset(DatasetCommand::Import {
            source,
            dest,
            shard_samples,
            seed,
        }) => {
            let report = ladder_data::import::import(source, dest, *shard_samples, *seed)?;
            for skipped in &report.skipped {
                eprintln!("warning: {skipped}");
            }
            print_index(&report.index);
            println!(
                "{} classes; class names in {}",
                report.classes.len(),
                dest.join(ladder_data::import::CLASS_MAP_FILE).display()
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("ladder: error: {e:#}");
        std::process::exit(1);
    }
}
