//! A generation's start: the assignment each worker waits for, and the rendezvous in which its
//! ranks exchange their addresses and receive the ring key.

use super::{Coordinator, Inner};
use crate::auth::{self, WorkerIdentity};
use crate::error::{CoordinatorError, Result};
use crate::records::{JobRecord, JobState};
use std::time::Duration;

/// What a worker is told to do (to rank 0, also what the newest commit retired, in case its
/// files outlived the worker told to delete them).
pub type Assignment = ladder_proto::v1::Assignment;

/// Where a rendezvous stands for one of its ranks.
#[derive(Clone, Debug, PartialEq)]
pub enum RendezvousOutcome {
    /// The generation is no longer current.
    Stale,
    /// Not every rank has published yet.
    Waiting,
    /// Every rank's payload by rank, and the generation's ring key.
    Complete {
        payloads: Vec<Vec<u8>>,
        ring_key: Vec<u8>,
    },
}

impl Coordinator {
    fn assignment_of(&self, inner: &Inner, who: &WorkerIdentity) -> Result<Option<Assignment>> {
        let mut roster = self.roster();
        let worker = roster.authenticated(who)?;
        Ok(worker.assignment.as_ref().and_then(|a| {
            let job = inner.jobs.get(&a.job_id)?;
            Some(Assignment {
                job_id: job.id.clone(),
                generation: job.generation,
                rank: a.rank,
                world_size: job.workers.len() as u32,
                spec_toml: job.spec_toml.clone(),
                restore_from: job.restore_from.clone(),
                retired: match a.rank {
                    0 => job.last_retired.clone(),
                    _ => Vec::new(),
                },
            })
        }))
    }

    /// The worker's assignment, waiting up to `wait` for one (an empty answer comes after a
    /// random 50 to 100% of `wait`, so that the long polls of workers that started together
    /// do not all end, and come again, at the same instant).
    pub async fn await_assignment(
        &self,
        who: &WorkerIdentity,
        wait: Duration,
    ) -> Result<Option<Assignment>> {
        use std::hash::BuildHasher;
        let spread = std::collections::hash_map::RandomState::new().hash_one(&who.id) as f64
            / u64::MAX as f64;
        let deadline = tokio::time::Instant::now() + wait.mul_f64(0.5 + 0.5 * spread);
        loop {
            let reassigned = self.roster().authenticated(who)?.reassigned.clone();
            let notified = reassigned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // An idle worker waits on the roster alone, never behind a decision's write.
            let assigned = self.roster().authenticated(who)?.assignment.is_some();
            if assigned && let Some(a) = self.assignment_of(&*self.inner.lock().await, who)? {
                return Ok(Some(a));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// The job and the rank `who` holds in it, if `who` is a worker of `job_id`'s generation
    /// `generation` and that generation is current. The rank is the coordinator's, never one a
    /// request names.
    pub(super) fn current<'a>(
        &self,
        inner: &'a Inner,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
    ) -> Result<Option<(&'a JobRecord, u32)>> {
        let rank = self.roster().current_rank(who, job_id, generation)?;
        let job = inner.job(job_id)?;
        Ok(rank.map(|rank| (job, rank)))
    }

    /// Publishes `payload` for the rank `who` holds (a request naming another `rank` is
    /// refused) and waits up to `wait` for every rank's.
    pub async fn rendezvous(
        &self,
        who: &WorkerIdentity,
        job_id: &str,
        generation: u64,
        rank: u32,
        payload: Vec<u8>,
        wait: Duration,
    ) -> Result<RendezvousOutcome> {
        let deadline = tokio::time::Instant::now() + wait;
        {
            let mut inner = self.inner.lock().await;
            let Some((_, assigned)) = self.current(&inner, who, job_id, generation)? else {
                return Ok(RendezvousOutcome::Stale);
            };
            if rank != assigned {
                return Err(CoordinatorError::Invalid(format!(
                    "worker {} holds rank {assigned} of generation {generation} of {job_id}, \
                     not rank {rank}",
                    who.id
                )));
            }
            let world = inner.job(job_id)?.workers.len();
            let exchange = inner.runtime.entry(job_id.to_owned()).or_default();
            exchange.rendezvous.insert(assigned, payload);
            if exchange.ring_key.is_empty() {
                exchange.ring_key = auth::ring_key();
            }
            if exchange.rendezvous.len() == world {
                let job = inner.job(job_id)?;
                if job.state == JobState::Rendezvous {
                    let mut running = job.clone();
                    running.state = JobState::Running;
                    running.message = match running.workers.len() {
                        1 => format!("running generation {generation} on 1 worker"),
                        n => format!("running generation {generation} on {n} workers"),
                    };
                    self.commit_job(&mut inner, running).await?;
                }
                // The waiting ranks are woken once, when the last one has published.
                self.rendezvous_changed.notify_waiters();
            }
        }
        loop {
            let notified = self.rendezvous_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.inner.lock().await;
                let Some((job, _)) = self.current(&inner, who, job_id, generation)? else {
                    return Ok(RendezvousOutcome::Stale);
                };
                if let Some(exchange) = inner.runtime.get(job_id)
                    && exchange.rendezvous.len() == job.workers.len()
                {
                    return Ok(RendezvousOutcome::Complete {
                        payloads: exchange.rendezvous.values().cloned().collect(),
                        ring_key: exchange.ring_key.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(RendezvousOutcome::Waiting);
            }
        }
    }
}
