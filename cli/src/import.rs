//! `ladder dataset import`: the import run with its progress on stderr, and its summary.

use crate::show::print_index;
use ladder_data::import::{CLASS_MAP_FILE, ImportOptions, Progress, import};
use std::path::Path;

/// Imports `source` into `dest` (see `ladder_data::import`), showing progress, then says what
/// it did.
pub fn run(
    source: &Path,
    dest: &Path,
    options: ImportOptions,
    labels: Option<&Path>,
    classes_from: Option<&Path>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let progress = ImportProgress::new();
    let report = import(source, dest, options, labels, classes_from, &|at| {
        progress.show(at)
    })?;
    progress.end();
    for skipped in &report.skipped {
        eprintln!("warning: {skipped}");
    }
    let images = report.train.manifest.total_samples
        + report.val.as_ref().map_or(0, |v| v.manifest.total_samples);
    let seconds = started.elapsed().as_secs_f64();
    say!(
        "imported {images} images of {} classes into {} shards ({:.1} MB) in {seconds:.1} s, \
         {:.0} images/s{}; left out {}",
        report.classes.len(),
        report.written.shards,
        report.written.bytes as f64 / 1e6,
        images as f64 / seconds.max(1e-9),
        if report.resumed {
            format!(
                "; resumed an interrupted import, keeping its {} shards{}",
                report.written.kept,
                match report.written.resumed_images {
                    0 => String::new(),
                    n => format!(" and {n} more images written before its last checkpoint"),
                }
            )
        } else {
            String::new()
        },
        left_out(&report.skipped)
    );
    print_index(&report.train);
    match &report.val {
        Some(val) => print_index(val),
        None if options.held_out == 0 => say!("no held-out split (--held-out 0)"),
        None => say!(
            "held out nothing: no class has more than {} images",
            options.held_out
        ),
    }
    if report.too_small_to_hold_out > 0 && report.val.is_some() {
        say!(
            "{} class(es) with {} images or fewer train on all of them",
            report.too_small_to_hold_out,
            options.held_out
        );
    }
    if !report.set_aside.is_empty() {
        say!(
            "set aside {} class(es) with {} images or fewer: {}",
            report.set_aside.len(),
            options.min_class_images,
            ladder_core::cut(&report.set_aside.join(", "))
        );
    }
    say!(
        "{} classes; class names in {}",
        report.classes.len(),
        dest.join(CLASS_MAP_FILE).display()
    );
    Ok(())
}

/// An import's progress on stderr: on a terminal a progress bar per phase (a compressed
/// archive's bytes listed, or the images found in place examined; then images written) with
/// its rate and ETA; otherwise a line a minute.
struct ImportProgress {
    terminal: bool,
    phase: std::sync::Mutex<Option<Phase>>,
    /// When a line was last logged, or a bar's rate last shown.
    logged: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A phase of the import: which, since when, and its bar on a terminal.
struct Phase {
    kind: std::mem::Discriminant<Progress>,
    since: std::time::Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl ImportProgress {
    fn new() -> ImportProgress {
        use std::io::IsTerminal;
        ImportProgress {
            terminal: std::io::stderr().is_terminal(),
            phase: std::sync::Mutex::new(None),
            logged: std::sync::Mutex::new(None),
        }
    }

    fn show(&self, at: Progress) {
        let (done, total) = match at {
            Progress::Listing { read, size } => (read, size),
            Progress::Examining { images, total } | Progress::Writing { images, total } => {
                (images, total)
            }
        };
        let now = std::time::Instant::now();
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let phase = match &mut *phase {
            Some(p) if p.kind == std::mem::discriminant(&at) => p,
            other => {
                if let Some(bar) = other.take().and_then(|p| p.bar) {
                    bar.finish();
                }
                let bar = self.terminal.then(|| {
                    let template = match at {
                        Progress::Listing { .. } => {
                            "listing [{bar:25}] {decimal_bytes}/{decimal_total_bytes} {msg} ETA {eta}"
                        }
                        Progress::Examining { .. } => {
                            "examining [{bar:25}] {human_pos}/{human_len} images {msg} ETA {eta}"
                        }
                        Progress::Writing { .. } => {
                            "import [{bar:25}] {human_pos}/{human_len} images {msg} ETA {eta}"
                        }
                    };
                    let bar = indicatif::ProgressBar::new(total);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(template)
                            .expect("a valid template")
                            .progress_chars("=> "),
                    );
                    bar
                });
                other.insert(Phase {
                    kind: std::mem::discriminant(&at),
                    since: now,
                    bar,
                })
            }
        };
        // On a terminal the bar moves with every call and its rate a few times a second; a log
        // gets a line a minute. Either once the phase has a second behind it to give a rate.
        if let Some(bar) = &phase.bar {
            bar.set_position(done);
        }
        let every = std::time::Duration::from_millis(if self.terminal { 250 } else { 60_000 });
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let seconds = (now - phase.since).as_secs_f64();
        if seconds < 1.0 || done == total || logged.is_some_and(|l| now - l < every) {
            return;
        }
        *logged = Some(now);
        let rate = done as f64 / seconds;
        let eta =
            crate::show::duration((total.saturating_sub(done) as f64 / rate.max(1e-9)) as f32);
        let (rate, line) = match at {
            Progress::Listing { .. } => (
                format!("{:.0} MB/s", rate / 1e6),
                format!(
                    "listing the compressed archive: {:.1}/{:.1} GB",
                    done as f64 / 1e9,
                    total as f64 / 1e9
                ),
            ),
            Progress::Examining { .. } => (
                format!("{rate:.0} images/s"),
                format!("examined {done}/{total} images"),
            ),
            Progress::Writing { .. } => (
                format!("{rate:.0} images/s"),
                format!("{done}/{total} images"),
            ),
        };
        match &phase.bar {
            Some(bar) => bar.set_message(rate),
            None => eprintln!("import: {line}, {rate}, ETA {eta}"),
        }
    }

    fn end(&self) {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bar) = phase.and_then(|p| p.bar) {
            bar.finish();
        }
    }
}

impl Drop for ImportProgress {
    /// An import that failed leaves its bar where it stopped (a dropped bar would show full).
    fn drop(&mut self) {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(bar) = phase.and_then(|p| p.bar) {
            bar.abandon();
        }
    }
}

/// What an import left out, counted by reason.
fn left_out(skipped: &[String]) -> String {
    let mut by_reason = std::collections::BTreeMap::<&str, usize>::new();
    for line in skipped {
        // `PLACE: why; left out`, sometimes with details in parentheses.
        let why = line.split_once(": ").map_or(line.as_str(), |(_, why)| why);
        let reason = why.split(';').next().unwrap_or(why);
        let reason = reason.split(" (").next().unwrap_or(reason).trim();
        *by_reason.entry(reason).or_default() += 1;
    }
    if by_reason.is_empty() {
        return "nothing".into();
    }
    by_reason
        .iter()
        .map(|(reason, n)| format!("{n} ({reason})"))
        .collect::<Vec<_>>()
        .join(", ")
}
