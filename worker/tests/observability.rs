//! Watching a run from outside: Debian's real `prometheus` server scrapes a real coordinator
//! and two real workers through a short job, and the series are read back through
//! Prometheus's HTTP API.

mod common;

use common::{Cluster, STEPS_PER_EPOCH, write_spec};
use ladder_proto::v1 as pb;
use ladder_testkit::{free_port, http_get};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus server scraping `targets` every 200 ms, its data in `dir`.
struct Prometheus {
    child: Child,
    address: String,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[String]) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n\
                 scrape_configs:\n  - job_name: ladder\n    honor_labels: true\n    \
                 static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting Debian's prometheus (scripts/bootstrap installs it)");
        let prometheus = Prometheus { child, address };
        let started = Instant::now();
        while http_get(&prometheus.address, "/-/ready").is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "prometheus did not get ready; see {}",
                dir.join("prometheus.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        prometheus
    }

    /// The instant vector `query` evaluates to now: each series' labels and value.
    fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", encode(query));
        let body = http_get(&self.address, &path).unwrap_or_else(|e| panic!("{query}: {e}"));
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["status"], "success", "{body}");
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                let value = series["value"][1].as_str().unwrap().parse().unwrap();
                (series["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` percent-encoded for a URL's query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_coordinator_and_both_workers_through_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 2), 10, 2);
    let coordinator_http = format!("127.0.0.1:{}", free_port());
    let mut cluster = Cluster::with_flags(dir.path(), &["--http-listen", &coordinator_http]);
    let worker_http: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    for address in &worker_http {
        cluster.add_worker(&["--metrics-listen", address]);
    }
    let targets: Vec<String> = std::iter::once(coordinator_http.clone())
        .chain(worker_http.iter().cloned())
        .collect();
    let prometheus = Prometheus::start(&dir.path().join("prometheus"), &targets);

    let id = cluster.submit(&spec);
    let job = cluster.wait_until_ended(&id, Duration::from_secs(600));
    assert_eq!(
        pb::JobState::try_from(job.state),
        Ok(pb::JobState::Completed),
        "{}\n{}",
        job.message,
        cluster.logs()
    );
    // Scraped after the end too.
    std::thread::sleep(Duration::from_secs(1));

    let selector = format!("{{job=\"{id}\"}}");
    let steps = prometheus.query(&format!("ladder_job_step{selector}"));
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0].1, (STEPS_PER_EPOCH * common::EPOCHS) as f64);
    // The step went up while the job ran: Prometheus saw it low first.
    let least = prometheus.query(&format!("min_over_time(ladder_job_step{selector}[10m])"));
    assert!(least[0].1 < steps[0].1, "{least:?} then {steps:?}");
    let completed = prometheus.query(&format!(
        "ladder_job_state{{job=\"{id}\",state=\"completed\"}}"
    ));
    assert_eq!(completed[0].1, 1.0, "{completed:?}");
    let committed = prometheus.query(&format!("ladder_job_checkpoints_committed_total{selector}"));
    assert!(committed[0].1 >= 1.0, "{committed:?}");

    // Each rank's share of time waiting for data, and its step parts.
    let shares = prometheus.query(&format!("ladder_worker_data_wait_ratio{selector}"));
    let mut ranks: Vec<String> = shares
        .iter()
        .map(|(labels, share)| {
            assert!((0.0..=1.0).contains(share), "{labels}: {share}");
            labels["rank"].as_str().unwrap().to_owned()
        })
        .collect();
    ranks.sort();
    assert_eq!(ranks, ["0", "1"], "{shares:?}");
    let compute = prometheus.query(&format!(
        "ladder_worker_step_part_seconds_total{{job=\"{id}\",part=\"compute\"}}"
    ));
    assert!(
        compute.len() == 2 && compute.iter().all(|(_, s)| *s > 0.0),
        "{compute:?}"
    );
    // Neighbours in blocks of 4 share reads: far fewer read calls than samples.
    let reads = prometheus.query(&format!("sum(ladder_worker_data_reads_total{selector})"));
    let trained = (STEPS_PER_EPOCH * common::EPOCHS * 96) as f64;
    assert!(
        reads[0].1 > 0.0 && reads[0].1 < trained / 2.0,
        "{reads:?} read calls for {trained} samples"
    );
    // Rank 0 wrote the checkpoints.
    let written = prometheus.query(&format!(
        "ladder_worker_checkpoint_written_bytes_total{{job=\"{id}\",rank=\"0\"}}"
    ));
    assert!(written[0].1 > 0.0, "{written:?}");

    // The coordinator's own latencies: every worker heartbeated.
    let heartbeats =
        prometheus.query("ladder_coordinator_rpc_duration_seconds_count{method=\"Heartbeat\"}");
    assert!(heartbeats[0].1 >= 2.0, "{heartbeats:?}");
}

/// Headless Chromium (Debian's) run on `url`: the DOM after its scripts ran for `budget` of
/// virtual time, and a screenshot at `screenshot`.
fn chromium(dir: &Path, url: &str, screenshot: &Path) -> String {
    let run = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--window-size=1400,2000",
                "--virtual-time-budget=10000",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .args(extra)
            .arg(url)
            .output()
            .expect("starting Debian's chromium (scripts/bootstrap installs it)");
        assert!(
            out.status.success(),
            "chromium {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&[&format!("--screenshot={}", screenshot.display())]);
    run(&["--dump-dom"])
}

/// The value of `attribute` on the element that has `marker` among its attributes.
fn attribute_near<'a>(dom: &'a str, marker: &str, attribute: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let tag_end = dom[at..].find("</div>").map_or(dom.len(), |e| at + e);
    let inside = &dom[at..tag_end];
    let start = inside.find(&format!("{attribute}=\""))? + attribute.len() + 2;
    inside[start..].split('"').next()
}

#[test]
fn the_status_page_draws_a_running_job_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 2), 10, 2);
    let http = format!("127.0.0.1:{}", free_port());
    // Leases long enough to hold the run still while the page is looked at.
    let flags = ["--http-listen", &http, "--lease-ttl-ms", "120000"];
    let mut cluster = Cluster::with_flags(dir.path(), &flags);
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    // Into its second stage (a curve with points, and a stage boundary on it), then held
    // there: the page is read during the run.
    cluster.wait_for(&id, "the second stage", Duration::from_secs(300), |j| {
        j.progress.is_some_and(|p| p.stage >= 1)
    });
    for worker in &cluster.workers {
        worker.signal("-STOP");
    }

    // The page needs a token: without one it asks for it.
    let page = format!("http://{http}/");
    let screenshot = dir.path().join("status-page.png");
    let asking = chromium(dir.path(), &page, &screenshot);
    assert!(
        asking.contains("id=\"login\"") && !asking.contains(&format!("data-job=\"{id}\"")),
        "{asking}"
    );
    let worker_token = chromium(
        dir.path(),
        &format!("{page}#token={}", ladder_testkit::WORKER_TOKEN),
        &screenshot,
    );
    assert!(
        !worker_token.contains(&format!("data-job=\"{id}\"")),
        "the worker token reads nothing"
    );

    let dom = chromium(
        dir.path(),
        &format!("{page}#token={}&job={id}", ladder_testkit::SUBMIT_TOKEN),
        &screenshot,
    );
    assert!(dom.contains(&format!("data-job=\"{id}\"")), "{dom}");
    assert!(dom.contains("id=\"job-state\">running<"), "{dom}");
    assert!(dom.contains("<b>stage</b>2/3 at 48 px"), "{dom}");
    // The recipe card, a row per stage, the one trained now marked.
    assert!(
        dom.contains("<tr class=\"selected current\" data-stage=\"2\">")
            && dom.contains("data-stage=\"3\""),
        "{dom}"
    );
    let loss_points: usize = attribute_near(&dom, "data-title=\"loss\"", "data-points")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss chart: {dom}"));
    assert!(loss_points >= 2, "{loss_points} points: {dom}");
    assert!(
        dom.contains("data-series=\"rank 0\"") && dom.contains("data-series=\"rank 1\""),
        "a data-wait curve per rank: {dom}"
    );
    for worker in &cluster.workers {
        worker.signal("-CONT");
    }
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("LADDER_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}

/// Every scalar of the TensorBoard run in `dir`, read with the real `tensorboard` package
/// (orphaned data kept: what the file holds, not what TensorBoard would hide): tag ->
/// [(step, value, wall time)].
fn tensorboard_scalars(dir: &Path) -> BTreeMap<String, Vec<(i64, f64, f64)>> {
    const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing import event_accumulator as ea
acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
acc.Reload()
print(json.dumps({t: [(s.step, s.value, s.wall_time) for s in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = Command::new(ladder_testkit::venv_python())
        .args(["-c", READ])
        .arg(dir)
        .output()
        .expect("running the venv's python");
    assert!(
        out.status.success(),
        "tensorboard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_reads_a_jobs_scalars_across_generations_without_a_step_twice() {
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint every 10 steps, all kept: the run resumes from an early one.
    let spec = write_spec(dir.path(), (2, 2), 10, 10);
    let plan = ladder_core::stage::StagePlan::new(&spec);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    let first = cluster.wait_until_ended(&id, Duration::from_secs(600));
    assert_eq!(
        pb::JobState::try_from(first.state),
        Ok(pb::JobState::Completed)
    );
    // Again from step 20: the second generation's steps replace the first's after it.
    let from = first
        .checkpoints
        .iter()
        .find(|c| c.step == 20)
        .expect("a checkpoint at step 20");
    let resumed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    cluster.resume_from(&id, &from.id, 0);
    cluster.wait_for(&id, "the second run", Duration::from_secs(60), |j| {
        j.generation > first.generation
    });
    let job = cluster.wait_until_ended(&id, Duration::from_secs(600));
    assert_eq!(
        pb::JobState::try_from(job.state),
        Ok(pb::JobState::Completed)
    );
    let progress = job.progress.unwrap();

    let scalars = tensorboard_scalars(&spec.checkpoint.dir.join(&id).join("tensorboard"));
    let loss = &scalars["loss"];
    for pair in loss.windows(2) {
        assert!(
            pair[0].0 < pair[1].0 && pair[0].2 <= pair[1].2,
            "a step twice or backwards: {loss:?}"
        );
    }
    // Every point after step 20 is the second run's: the first run's were cut off.
    let after: Vec<_> = loss.iter().filter(|s| s.0 > 20).collect();
    assert!(!after.is_empty() && loss.iter().any(|s| s.0 <= 20));
    assert!(
        after.iter().all(|s| s.2 >= resumed),
        "points of the first run after its restore point: {after:?}"
    );
    // What `ladder status` shows is the last of each curve.
    let last = |tag: &str| *scalars[tag].last().unwrap();
    assert_eq!(last("loss").0 as u64, progress.global_step);
    assert!((last("loss").1 - progress.loss as f64).abs() < 1e-6);
    assert!((last("eval/top1").1 - progress.eval_top1 as f64).abs() < 1e-6);
    assert!((last("eval/top5").1 - progress.eval_top5 as f64).abs() < 1e-6);
    // The image size climbs the stage plan's ladder.
    let steps_per_epoch = STEPS_PER_EPOCH as i64;
    for &(step, size, _) in &scalars["image_size"] {
        let epoch = ((step - 1) / steps_per_epoch) as usize;
        assert_eq!(size as u32, plan.epochs[epoch].image_size, "step {step}");
    }
    for rank in ["data_wait/rank_0", "data_wait/rank_1"] {
        assert!(scalars.contains_key(rank), "{:?}", scalars.keys());
    }
}
