//! How the command line shows what the coordinator sends: a line per job or worker, a job's
//! details, and every remote string made safe to print first.

use ladder_core::spec::JobSpec;
use ladder_core::{indexing, location};
use ladder_proto::v1 as pb;

pub fn terminal(job: &pb::Job) -> bool {
    pb::JobState::of(job.state).is_terminal()
}

pub fn rpc_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", printable(status.message()))
}

/// `text` from the coordinator (where much of it comes from workers: names, error messages),
/// safe to print: control characters (a terminal's escape sequences, a line break that would
/// fake another line) and the bidirectional overrides that reorder what is shown, each
/// replaced by `?`.
pub fn printable(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    text.chars()
        .map(|c| if hidden(c) { '?' } else { c })
        .collect()
}

/// `job` with every string it shows [`printable`].
pub fn printable_job(mut job: pb::Job) -> pb::Job {
    for text in [
        &mut job.id,
        &mut job.name,
        &mut job.message,
        &mut job.last_incident,
        &mut job.waiting,
    ]
    .into_iter()
    .chain(&mut job.workers)
    {
        *text = printable(text);
    }
    for c in &mut job.checkpoints {
        c.id = printable(&c.id);
    }
    job
}

/// `worker` with every string it shows [`printable`].
pub fn printable_worker(mut worker: pb::WorkerInfo) -> pb::WorkerInfo {
    for text in [
        &mut worker.id,
        &mut worker.name,
        &mut worker.hostname,
        &mut worker.device,
        &mut worker.job_id,
    ] {
        *text = printable(text);
    }
    worker
}

pub fn state_name(state: i32) -> &'static str {
    pb::JobState::of(state).name()
}

pub fn duration(seconds: f32) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// One registered worker: who and where, what it does, and its signs of life (how long its
/// training thread has been quiet, when its lease runs out).
pub fn worker_line(w: &pb::WorkerInfo) -> String {
    fn or_dash(text: &str) -> &str {
        if text.is_empty() { "-" } else { text }
    }
    let seconds = |ms: i64| duration(ms as f32 / 1000.0);
    let mut line = format!(
        "{}  {}  {}  {}  ",
        w.id,
        or_dash(&w.name),
        or_dash(&w.hostname),
        or_dash(&w.device)
    );
    if w.job_id.is_empty() {
        line.push_str("idle");
    } else {
        line.push_str(&format!(
            "{} rank {} (generation {})  quiet {}",
            w.job_id,
            w.rank,
            w.generation,
            seconds(w.quiet_ms)
        ));
        if w.in_collective {
            line.push_str(", waiting on the other ranks");
        }
    }
    if w.leaving {
        line.push_str("  leaving");
    }
    if w.heard_from {
        line.push_str(&format!("  lease {}", seconds(w.lease_remaining_ms)));
    } else {
        line.push_str("  not heard from since the coordinator started");
    }
    line
}

/// What the last evaluation measured, if one ran.
pub fn eval_summary(p: &pb::Progress) -> Option<String> {
    (p.eval_epoch > 0).then(|| {
        format!(
            "top-1 {:.2}%  top-5 {:.2}% (after epoch {})",
            p.eval_top1 * 100.0,
            p.eval_top5 * 100.0,
            p.eval_epoch
        )
    })
}

pub fn running(job: &pb::Job) -> bool {
    pb::JobState::try_from(job.state) == Ok(pb::JobState::Running)
}

/// `step/steps per epoch`, or `-` before any worker said how many steps an epoch has.
pub fn steps(p: &pb::Progress) -> String {
    match p.steps_per_epoch {
        0 => "-".to_owned(),
        n => format!("{}/{n}", p.step),
    }
}

pub fn job_line(job: &pb::Job) -> String {
    let p = job.progress.unwrap_or_default();
    let mut line = format!(
        "{}  {:<10}  {:<24}  stage {}/{}  epoch {}/{}  step {}  workers {}",
        job.id,
        state_name(job.state),
        job.name,
        p.stage.saturating_add(1),
        job.stage_count,
        p.epoch.saturating_add(1),
        job.epochs,
        steps(&p),
        job.workers.len()
    );
    if p.global_step > 0 {
        line.push_str(&format!(
            "  {} px  loss {:.4}  {:.1} img/s",
            p.image_size, p.loss, p.images_per_second
        ));
        if running(job) {
            line.push_str(&format!("  ETA {}", duration(p.eta_seconds)));
        }
    }
    if let Some(eval) = eval_summary(&p) {
        line.push_str("  ");
        line.push_str(&eval);
    }
    if !job.waiting.is_empty() {
        line.push_str("  ");
        line.push_str(&job.waiting);
    }
    line
}

/// Samples per epoch in the model's committed history, and how many were skipped. Runs of
/// epochs with the same count are told once, so a run of hundreds of epochs fits on a line; a
/// long run's older epochs, which the coordinator sums in ranges, are told as their mean.
pub fn trained_summary(job: &pb::Job) -> String {
    if job.trained.is_empty() {
        return "nothing committed yet".to_owned();
    }
    let mut runs: Vec<(String, u64)> = Vec::new();
    for tally in &job.trained {
        let epochs = u64::from(tally.epochs.max(1));
        let samples = match epochs {
            1 => tally.samples.to_string(),
            n if tally.samples % n == 0 => (tally.samples / n).to_string(),
            n => format!("{:.1} (mean)", tally.samples as f64 / n as f64),
        };
        match runs.last_mut() {
            Some((same, count)) if *same == samples => *count += epochs,
            _ => runs.push((samples, epochs)),
        }
    }
    let per_epoch: Vec<String> = runs
        .iter()
        .map(|(samples, epochs)| match epochs {
            1 => samples.clone(),
            n => format!("{samples} x{n}"),
        })
        .collect();
    let skipped = job
        .trained
        .iter()
        .fold(0u64, |sum, t| sum.saturating_add(t.skipped));
    let epochs: u64 = runs.iter().map(|(_, n)| n).sum();
    format!(
        "{} samples per epoch (epochs 1-{epochs}), {skipped} skipped",
        per_epoch.join(", "),
    )
}

/// Where checkpoint `c` of `job` is: named by the job's spec and the two ids, as the
/// coordinator and the workers name it.
pub fn checkpoint_dir(job: &pb::Job, c: &pb::CheckpointRef) -> String {
    JobSpec::parse(&job.spec_toml, &job.id)
        .ok()
        .and_then(|spec| location::checkpoint_dir(&spec.checkpoint.dir, &job.id, &c.id).ok())
        .map_or_else(
            || "(no directory: the job's spec does not parse)".to_owned(),
            |dir| printable(&dir.display().to_string()),
        )
}

pub fn job_details(job: &pb::Job) -> String {
    let p = job.progress.unwrap_or_default();
    let last = job.checkpoints.last().map_or("none".to_owned(), |c| {
        format!(
            "{} (after global step {}, stage {}) at {}",
            c.id,
            c.step,
            c.stage.saturating_add(1),
            checkpoint_dir(job, c)
        )
    });
    let started = p.global_step > 0;
    let stage_size = if started && p.image_size > 0 {
        format!(" ({} px)", p.image_size)
    } else {
        String::new()
    };
    let eta = if started && running(job) {
        duration(p.eta_seconds)
    } else {
        "-".to_owned()
    };
    format!(
        "job          {}\nname         {}\nstate        {}\ngeneration   {}\nstage        {}/{}{}\nepoch        {}/{}\nstep         {}\nloss         {:.4}\nimages/s     {:.1}\nETA          {}\neval         {}\ngraph builds {}\nworkers      {}\ncheckpoint   {}\ntrained      {}\nmessage      {}\nincident     {}",
        job.id,
        job.name,
        state_name(job.state),
        job.generation,
        p.stage + 1,
        job.stage_count,
        stage_size,
        p.epoch + 1,
        job.epochs,
        steps(&p),
        p.loss,
        p.images_per_second,
        eta,
        eval_summary(&p).unwrap_or_else(|| "none yet".to_owned()),
        p.graph_builds,
        match (job.workers.is_empty(), job.waiting.is_empty()) {
            (true, true) => "none".to_owned(),
            (true, false) => format!("none; {}", job.waiting),
            (false, _) => job.workers.join(", "),
        },
        last,
        trained_summary(job),
        job.message,
        if job.last_incident.is_empty() {
            "none"
        } else {
            &job.last_incident
        }
    )
}

pub fn print_index(report: &indexing::IndexReport) {
    for issue in &report.issues {
        eprintln!("warning: {issue}");
    }
    let m = &report.manifest;
    say!(
        "indexed {} samples in {} shards, {} classes, {} issue(s); wrote {}",
        m.total_samples,
        m.shards.len(),
        m.classes,
        report.issues.len(),
        report.manifest_path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_coordinator_sends_is_printed_without_escape_sequences_or_fake_lines() {
        let job = printable_job(pb::Job {
            name: "evil\u{1b}]0;pwned\u{7}\u{1b}[2J".into(),
            message: "failed\nstate        completed".into(),
            workers: vec!["w-1\r".into()],
            last_incident: "right\u{202e}txt.exe".into(),
            ..Default::default()
        });
        assert_eq!(job.name, "evil?]0;pwned??[2J");
        assert_eq!(job.message, "failed?state        completed");
        assert_eq!(job.workers, ["w-1?"]);
        assert_eq!(job.last_incident, "right?txt.exe");
        assert_eq!(job_details(&job).lines().count(), 17, "one line per field");
        let worker = printable_worker(pb::WorkerInfo {
            hostname: "node\u{9b}31m".into(),
            ..Default::default()
        });
        assert_eq!(worker.hostname, "node?31m");
        let refused = rpc_error("status", tonic::Status::not_found("no job \u{1b}[31m"));
        assert_eq!(refused.to_string(), "status: no job ?[31m");
    }

    #[test]
    fn trained_epochs_with_equal_counts_are_told_once() {
        let tally = |samples| pb::EpochTally {
            samples,
            skipped: 1,
            ..Default::default()
        };
        let mut job = pb::Job::default();
        assert_eq!(trained_summary(&job), "nothing committed yet");
        job.trained = [60, 60, 60, 59, 60, 60].map(tally).to_vec();
        assert_eq!(
            trained_summary(&job),
            "60 x3, 59, 60 x2 samples per epoch (epochs 1-6), 6 skipped"
        );
        // Older epochs summed in ranges: 300 epochs of 60, then 2 of 119 in all.
        let range = |epochs, samples| pb::EpochTally {
            epochs,
            ..tally(samples)
        };
        job.trained = vec![range(300, 18_000), range(2, 119), tally(60)];
        assert_eq!(
            trained_summary(&job),
            "60 x300, 59.5 (mean) x2, 60 samples per epoch (epochs 1-303), 3 skipped"
        );
    }
}
