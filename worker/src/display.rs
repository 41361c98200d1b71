//! Progress a person at the worker can follow: a progress bar per epoch on a terminal, plain
//! log lines otherwise (every 10 seconds and at every boundary).

use indicatif::{ProgressBar, ProgressStyle};
use ladder_train::events::Progress;
use std::time::{Duration, Instant};

pub struct Display {
    bar: Option<ProgressBar>,
    terminal: bool,
    job: String,
    epoch: Option<u32>,
    logged: Instant,
}

fn summary(p: &Progress) -> String {
    let mut line = format!(
        "stage {} {} px  loss {:.4}  {:.1} img/s  ETA {:.0}s  builds {}",
        p.stage + 1,
        p.image_size,
        p.loss,
        p.images_per_second,
        p.eta_seconds.max(0.0),
        p.graph_builds
    );
    if let Some(e) = p.evaluation {
        line.push_str(&format!(
            "  eval@{} top-1 {:.2}% top-5 {:.2}%",
            e.epoch + 1,
            e.top1 * 100.0,
            e.top5 * 100.0
        ));
    }
    line
}

impl Display {
    pub fn new(terminal: bool, job: &str) -> Display {
        Display {
            bar: None,
            terminal,
            job: job.to_owned(),
            epoch: None,
            logged: Instant::now(),
        }
    }

    pub fn show(&mut self, p: &Progress, boundary: bool) {
        if !self.terminal {
            if boundary || self.logged.elapsed() >= Duration::from_secs(10) {
                self.logged = Instant::now();
                tracing::info!(
                    job = %self.job,
                    "epoch {} step {}/{}  {}",
                    p.epoch + 1,
                    p.step,
                    p.steps_per_epoch,
                    summary(p)
                );
            }
            return;
        }
        if self.epoch != Some(p.epoch) {
            self.finish();
            let bar = ProgressBar::new(p.steps_per_epoch);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("{} epoch {}", self.job, p.epoch + 1));
            self.bar = Some(bar);
            self.epoch = Some(p.epoch);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(p.step);
            bar.set_message(summary(p));
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
