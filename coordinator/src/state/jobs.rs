//! Jobs as people move them: submit, look at, cancel, resume.

use super::{Change, Coordinator, Inner};
use crate::clock::now_ms;
use crate::error::{CoordinatorError, Result};
use crate::history::History;
use crate::records::{Counters, JobRecord, JobState, ProgressRecord};
use crate::view;
use ladder_core::cut;
use ladder_core::dataset::Manifest;
use ladder_core::sample::SamplePlan;
use ladder_core::spec::JobSpec;
use ladder_core::stage::StagePlan;
use ladder_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The largest spec taken: the shipped ones have about 3 KiB (comments included).
const MAX_SPEC_BYTES: usize = 64 << 10;

impl Coordinator {
    /// Validates a spec (its values, its dataset manifest, and that a plan can be made from
    /// them) and queues it as a new job.
    pub async fn submit(&self, spec_toml: &str) -> Result<pb::Job> {
        if spec_toml.len() > MAX_SPEC_BYTES {
            return Err(CoordinatorError::Invalid(format!(
                "the spec has {} bytes, more than {} KiB: a job's record holds it",
                spec_toml.len(),
                MAX_SPEC_BYTES >> 10
            )));
        }
        let spec = JobSpec::parse(spec_toml, "submitted spec")
            .map_err(|e| CoordinatorError::Invalid(e.to_string()))?;
        // Off the async threads: the paths are the submitter's, on file systems that may be
        // slow, and heartbeats must not wait for them.
        let checked = spec.clone();
        let steps_per_epoch = tokio::task::spawn_blocking(move || check_data(&checked))
            .await
            .map_err(|e| CoordinatorError::Invalid(format!("data: {e}")))??;
        let stages = StagePlan::new(&spec);

        // The directory is checked off the state lock and the async threads (checkpoint.dir
        // may be on a slow network file system, and heartbeats must not wait for it), for the
        // next id; should another submit take that id meanwhile, for the one after.
        let (mut inner, id) = loop {
            let next = self.inner.lock().await.counters.next_job + 1;
            let id = format!("job-{next:06}");
            let (dir, checked) = (spec.checkpoint.dir.clone(), id.clone());
            tokio::task::spawn_blocking(move || check_checkpoint_dir(&dir, &checked))
                .await
                .map_err(|e| CoordinatorError::Invalid(format!("checkpoint.dir: {e}")))?
                .map_err(CoordinatorError::Invalid)?;
            let inner = self.inner.lock().await;
            if inner.counters.next_job + 1 == next {
                break (inner, id);
            }
        };
        let now = now_ms();
        let job = JobRecord {
            id,
            name: spec.job.name.clone(),
            state: JobState::Queued,
            generation: 0,
            spec_toml: spec.to_toml(),
            workers: Vec::new(),
            progress: ProgressRecord::default(),
            checkpoints: Vec::new(),
            message: "waiting for workers".to_owned(),
            created_at_ms: now,
            last_incident: String::new(),
            ledger: Vec::new(),
            updated_at_ms: now,
            stage_count: stages.stage_count(),
            steps_per_epoch,
            epochs: spec.schedule.epochs,
            priority: spec.job.priority,
            world_sizes: spec.allowed_world_sizes(),
            requested_world_size: None,
            restore_from: None,
            failed_generations: 0,
            failed_checkpoints: 0,
            last_retired: Vec::new(),
            incidents: BTreeMap::new(),
            checkpoints_committed: 0,
        };
        let counters = Counters {
            next_job: inner.counters.next_job + 1,
            next_worker: inner.counters.next_worker,
        };
        tracing::info!(job = %job.id, name = %job.name, "job submitted");
        let id = job.id.clone();
        let change = Change {
            jobs: vec![job],
            counters: Some(counters),
            ..Change::default()
        };
        // Known before the job is shown (where its events go is read from it).
        inner.specs.insert(id.clone(), Arc::new(spec));
        if let Err(e) = self.apply(&mut inner, change).await {
            inner.specs.remove(&id);
            return Err(e);
        }
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, &id)
    }

    /// Job `id` as it is now (with the newest progress, saved or not), as a decision about it
    /// answers.
    fn view(&self, inner: &Inner, id: &str) -> Result<pb::Job> {
        let roster = self.roster();
        let record = roster.latest(inner.job(id)?.clone());
        let waiting = inner.runtime.get(id).map_or("", |r| r.waiting.as_str());
        let skipped = roster.skipped.get(id).copied().unwrap_or_default();
        let batch = inner.specs.get(id).map_or(0, |spec| spec.batch.global);
        Ok(view::job(&record, waiting, &skipped, batch))
    }

    /// The job as readers are shown it (see [`Coordinator::snapshot`]).
    pub async fn get(&self, id: &str) -> Result<Arc<pb::Job>> {
        self.snapshot().job(id)
    }

    /// The job's saved record, with the newest progress: what decisions read (it waits for the
    /// decision being made).
    pub async fn record(&self, id: &str) -> Result<JobRecord> {
        let inner = self.inner.lock().await;
        Ok(self.roster().latest(inner.job(id)?.clone()))
    }

    /// The job's curves (see [`History`]).
    pub async fn history(&self, id: &str) -> Result<History> {
        self.snapshot().job(id)?;
        Ok(self.roster().history.get(id).cloned().unwrap_or_default())
    }

    pub async fn cancel(&self, id: &str) -> Result<pb::Job> {
        let mut inner = self.inner.lock().await;
        let mut job = inner.job(id)?.clone();
        if job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is already {}",
                job.state
            )));
        }
        job.release();
        job.state = JobState::Cancelled;
        job.message = "cancelled by request".to_owned();
        self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job cancelled");
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, id)
    }

    /// Deletes ended job `id` (see [`Change::deleted`]).
    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let job = inner.job(id)?;
        if !job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is {}; only an ended job can be deleted (`ladder cancel {id}` first)",
                job.state
            )));
        }
        let change = Change {
            deleted: vec![id.to_owned()],
            ..Change::default()
        };
        self.apply(&mut inner, change).await?;
        tracing::info!(job = %id, "job deleted");
        Ok(())
    }

    /// Queues an ended job again, to continue from `checkpoint_id` (or the latest committed
    /// checkpoint) on `workers` ranks (or any allowed number).
    pub async fn resume(
        &self,
        id: &str,
        checkpoint_id: Option<&str>,
        workers: Option<u32>,
    ) -> Result<pb::Job> {
        let mut inner = self.inner.lock().await;
        let mut job = inner.job(id)?.clone();
        if !job.state.is_terminal() {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} is {}; only a completed, failed or cancelled job can be resumed",
                job.state
            )));
        }
        if !inner.specs.contains_key(id) {
            return Err(CoordinatorError::Conflict(format!(
                "job {id} cannot be resumed: its saved spec does not parse ({}); submit the spec \
                 again",
                cut(&job.message)
            )));
        }
        let restore = match checkpoint_id {
            Some(cid) => Some(
                job.checkpoints
                    .iter()
                    .find(|c| c.id == cid)
                    .cloned()
                    .ok_or_else(|| {
                        let known: Vec<&str> =
                            job.checkpoints.iter().map(|c| c.id.as_str()).collect();
                        CoordinatorError::NotFound(format!(
                            "job {id} has no committed checkpoint {:?}; it has: {}",
                            cut(cid),
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ))
                    })?,
            ),
            None => job.checkpoints.last().cloned(),
        };
        if let Some(n) = workers
            && !job.world_sizes.contains(&n)
        {
            return Err(CoordinatorError::Invalid(format!(
                "--workers {n}: job {id} can run on {:?} workers (each must take whole micro-batches)",
                job.world_sizes
            )));
        }
        job.requested_world_size = workers;
        job.restore_from = restore;
        job.failed_generations = 0;
        job.state = JobState::Queued;
        let later: Vec<&str> = job.checkpoints[job.history_kept()..]
            .iter()
            .map(|c| c.id.as_str())
            .collect();
        job.message = match &job.restore_from {
            Some(c) => format!("resuming from checkpoint {}", c.id),
            None => "resuming from the start: no committed checkpoint".to_owned(),
        };
        if !later.is_empty() {
            job.message.push_str(&format!(
                "; the checkpoints committed after it ({}) leave the job's history once it \
                 starts (their files stay)",
                later.join(", ")
            ));
        }
        self.commit_job(&mut inner, job).await?;
        tracing::info!(job = %id, "job resumed");
        self.schedule_after_change(&mut inner).await;
        self.view(&inner, id)
    }
}

/// `checkpoint.dir` must be writable, and hold nothing yet for job `id`: job ids restart with a
/// new store, and a job must never write over another job's checkpoints.
fn check_checkpoint_dir(dir: &Path, id: &str) -> std::result::Result<(), String> {
    let problem =
        |e: std::io::Error| format!("checkpoint.dir: {} cannot be written: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(problem)?;
    let probe = dir.join(format!(".ladder-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(problem)?;
    let _ = std::fs::remove_file(&probe);
    let own = dir.join(id);
    if std::fs::read_dir(&own).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(format!(
            "checkpoint.dir: {} already holds files, though no job {id} is known to this \
             coordinator (a job of another coordinator store?): choose another checkpoint.dir, \
             or move those files away",
            own.display()
        ));
    }
    Ok(())
}

/// What a submitted spec reads from files: its dataset manifests, a plan made from them, and
/// the weights it starts from. Returns the plan's steps per epoch.
fn check_data(spec: &JobSpec) -> Result<u64> {
    let manifest = Manifest::load(&spec.data.manifest)
        .map_err(|e| CoordinatorError::Invalid(format!("data.manifest: {e}")))?;
    // Fewer outputs than classes cannot learn the dataset's labels, and more leave outputs no
    // label ever trains (a 21k head on a 1k fine-tuning set, say): either is a wrong spec.
    if manifest.classes != spec.model.classes {
        return Err(CoordinatorError::Invalid(format!(
            "model.classes = {}, but the dataset {} has {} classes: set model.classes = {} \
             (or index the dataset with `ladder dataset index --classes N` if it lacks some)",
            spec.model.classes,
            spec.data.manifest.display(),
            manifest.classes,
            manifest.classes
        )));
    }
    let plan = SamplePlan::of_job(spec, &manifest.shard_sizes())
        .map_err(|e| CoordinatorError::Invalid(format!("batch.global: {e}")))?;
    if let Some(eval) = &spec.data.eval_manifest {
        Manifest::load(eval)
            .map_err(|e| CoordinatorError::Invalid(format!("data.eval_manifest: {e}")))?;
    }
    if let Some(init) = &spec.model.init_from
        && !init.is_file()
    {
        return Err(CoordinatorError::Invalid(format!(
            "model.init_from: {} is not a file here (paths are checked on the coordinator's \
             machine)",
            init.display()
        )));
    }
    Ok(plan.steps_per_epoch())
}
