//! Workers and their leases: registration (written in groups), heartbeats, and leaving.

use super::{Change, Coordinator, Inner};
use crate::auth::{self, WorkerIdentity};
use crate::clock::{monotonic_ms, now_ms};
use crate::error::{CoordinatorError, Result};
use crate::records::{Counters, Incident, JobState, WorkerAssignment, WorkerRecord};
use crate::runtime::Member;
use crate::store::StoreError;
use ladder_core::dataset::SKIP_REASONS;
use tokio::sync::oneshot;

/// What a worker's heartbeat says of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Signs {
    /// Its training thread's activity counter: unchanged, the thread makes no progress.
    pub activity: u64,
    /// Its training thread waits in a collective (on the other ranks).
    pub in_collective: bool,
    /// It was asked to stop.
    pub leaving: bool,
    /// The share of its step time spent waiting for data.
    pub data_wait: f32,
    /// Samples the worker process skipped so far, by [`SKIP_REASONS`].
    pub skipped: [u64; SKIP_REASONS.len()],
}

/// A registration waiting for its group's write.
pub(super) struct Registration {
    hostname: String,
    device: String,
    name: String,
    reply: oneshot::Sender<Result<(WorkerRecord, String)>>,
}

impl Coordinator {
    /// Registers a worker; returns its record and the secret that identifies it from now on.
    /// Registrations are written in groups (group commit): whoever gets the decision lock
    /// writes every registration waiting by then in one transaction, so a cluster of ten
    /// thousand workers starting at once costs a few hundred writes, not ten thousand.
    pub async fn register(
        &self,
        hostname: &str,
        device: &str,
        name: &str,
    ) -> Result<(WorkerRecord, String)> {
        let (reply, mut answer) = oneshot::channel();
        self.registrations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Registration {
                hostname: hostname.to_owned(),
                device: device.to_owned(),
                name: name.to_owned(),
                reply,
            });
        let mut inner = self.inner.lock().await;
        let mut wrote = false;
        let result = loop {
            // Written by whoever held the lock before (or by this call's last group).
            if let Ok(result) = answer.try_recv() {
                break result;
            }
            let group: Vec<Registration> = {
                let mut waiting = self.registrations.lock().unwrap_or_else(|e| e.into_inner());
                let n = waiting.len().min(crate::store::MAX_WRITES - 1);
                waiting.drain(..n).collect()
            };
            self.write_registrations(&mut inner, group).await;
            wrote = true;
        };
        if wrote {
            self.schedule_after_change(&mut inner).await;
        }
        result
    }

    /// Writes `group` in one transaction (with the worker counter) and answers each.
    async fn write_registrations(&self, inner: &mut Inner, group: Vec<Registration>) {
        let (now, wall) = (monotonic_ms(), now_ms());
        let lease = self.config.lease_ttl.as_millis();
        let mut next = inner.counters.next_worker;
        let made: Vec<(Registration, WorkerRecord, String)> = group
            .into_iter()
            .map(|r| {
                next += 1;
                let secret = auth::WorkerSecret::generate();
                let worker = WorkerRecord {
                    id: format!("w-{next:06}"),
                    hostname: r.hostname.clone(),
                    device: r.device.clone(),
                    name: r.name.clone(),
                    lease_ttl_ms: lease as u32,
                    registered_at_ms: wall,
                    secret_sha256: secret.sha256,
                };
                (r, worker, secret.secret)
            })
            .collect();
        let change = Change {
            workers: made
                .iter()
                .map(|(_, w, _)| Member::new(w.clone(), now, true))
                .collect(),
            counters: Some(Counters {
                next_job: inner.counters.next_job,
                next_worker: next,
            }),
            ..Change::default()
        };
        match self.apply(inner, change).await {
            Ok(()) => {
                for (r, worker, secret) in made {
                    tracing::info!(worker = %worker.id, hostname = %r.hostname, device = %r.device, name = %r.name, "worker registered");
                    let _ = r.reply.send(Ok((worker, secret)));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (r, _, _) in made {
                    let _ = r
                        .reply
                        .send(Err(CoordinatorError::Store(StoreError::Backend {
                            store: self.store.describe(),
                            message: message.clone(),
                        })));
                }
            }
        }
    }

    /// Renews the worker's lease (from when the heartbeat arrived) and records its training
    /// thread's activity; returns its current assignment. Only the roster is touched, unless
    /// the worker leaves or is heard from for the first time since a restart (then a decision
    /// follows).
    pub async fn heartbeat(
        &self,
        who: &WorkerIdentity,
        signs: Signs,
    ) -> Result<Option<WorkerAssignment>> {
        let Signs {
            activity,
            in_collective,
            leaving,
            data_wait,
            skipped,
        } = signs;
        let arrived = monotonic_ms();
        {
            let mut roster = self.roster();
            let gone = leaving && roster.has_left(who);
            let worker = match roster.authenticated(who) {
                Ok(worker) => worker,
                // Gone just now: it left while idle, and says so again.
                Err(_) if gone => return Ok(None),
                Err(e) => return Err(e),
            };
            worker.lease_expires_ms = arrived + worker.record.lease_ttl_ms as i64;
            if activity != worker.activity {
                worker.activity = activity;
                worker.active_ms = arrived;
            }
            worker.in_collective = in_collective;
            worker.data_wait = data_wait;
            roster.count_skips(&who.id, skipped);
            // Authenticated just above.
            let worker = &roster.workers[&who.id];
            if worker.heard_from && (!leaving || worker.leaving) {
                return Ok(worker.assignment.clone());
            }
        }
        let mut inner = self.inner.lock().await;
        if leaving {
            self.worker_leaving(&mut inner, &who.id).await?;
        }
        let newly_heard = self
            .roster()
            .workers
            .get_mut(&who.id)
            .is_some_and(|w| !std::mem::replace(&mut w.heard_from, true));
        if newly_heard {
            self.schedule_after_change(&mut inner).await;
        }
        Ok(self
            .roster()
            .workers
            .get(&who.id)
            .and_then(|w| w.assignment.clone()))
    }

    /// `worker_id` was asked to stop. Idle, it is simply gone. In a running job, rank 0 is
    /// told to checkpoint now (with its next progress report), and that checkpoint's commit
    /// ends the generation without it (see [`Self::commit_checkpoint`]), so the job loses no
    /// steps. Should no checkpoint come, its lease runs out as a dead worker's would.
    async fn worker_leaving(&self, inner: &mut Inner, worker_id: &str) -> Result<()> {
        let assignment = {
            let mut roster = self.roster();
            let Some(worker) = roster.workers.get(worker_id) else {
                return Ok(());
            };
            if worker.leaving {
                return Ok(());
            }
            let assignment = worker.assignment.clone();
            // Whichever way it goes, the worker may say it again once forgotten.
            roster.remember_leaving(worker_id);
            let running = assignment
                .as_ref()
                .and_then(|a| inner.jobs.get(&a.job_id))
                .is_some_and(|job| job.state == JobState::Running);
            if let (true, Some(a)) = (running, &assignment) {
                tracing::info!(worker = %worker_id, job = %a.job_id, "worker leaving on request; the job checkpoints first");
                if let Some(t) = roster.training.get_mut(&a.job_id) {
                    t.checkpoint_requested = true;
                }
                // Marked here only: on the paths below the worker is removed, and should the
                // store refuse that, the next heartbeat tries again.
                if let Some(w) = roster.workers.get_mut(worker_id) {
                    w.leaving = true;
                }
                return Ok(());
            }
            assignment
        };
        match assignment {
            Some(a) => {
                tracing::info!(worker = %worker_id, job = %a.job_id, "worker leaving on request");
                let why = format!("worker {worker_id} left on request");
                self.part(
                    inner,
                    &a.job_id,
                    &[worker_id.to_owned()],
                    Incident::WorkerLeft,
                    &why,
                )
                .await?;
            }
            None => {
                tracing::info!(worker = %worker_id, "idle worker leaving on request");
                let change = Change {
                    forgotten: vec![worker_id.to_owned()],
                    ..Change::default()
                };
                self.apply(inner, change).await?;
            }
        }
        Ok(())
    }

    /// `workers` leave `job_id`: they are forgotten, and its generation ends (one
    /// transaction) and the job is given to whoever is idle.
    pub(super) async fn part(
        &self,
        inner: &mut Inner,
        job_id: &str,
        workers: &[String],
        incident: Incident,
        why: &str,
    ) -> Result<()> {
        let ended = inner
            .jobs
            .get(job_id)
            .and_then(|j| j.generation_ended(Some(incident), why));
        let change = Change {
            jobs: ended.into_iter().collect(),
            forgotten: workers.to_vec(),
            ..Change::default()
        };
        self.apply(inner, change).await?;
        self.schedule_after_change(inner).await;
        Ok(())
    }
}
