//! The coordinator's decisions as pure functions of its state and a time: whom to give idle
//! workers (scheduling), who lost their lease or stalls a job (lease and stall policy), when a
//! running job grows back, and what a commit keeps (retention, ledger compaction). Each returns
//! what should change; `crate::state` writes it and shows it.

use crate::records::{CheckpointRecord, JobRecord, JobState, LedgerEntry};
use crate::runtime::{JobRuntime, Member};
use std::collections::BTreeMap;

/// Epochs of a job's ledger told one by one; older ones are summed in ranges (see
/// [`compact_ledger`]), so that a 10,000-epoch run's record is no larger than a 300-epoch one's.
pub const TALLIED_EPOCHS: u32 = 256;

/// Merges the ledger entries that no restore can tell apart, so that a job's record stays
/// small however often it checkpoints and however many epochs it runs. A restore goes back to
/// a kept checkpoint (or to the start) and drops the entries committed after it, so the
/// entries committed after one kept checkpoint and up to the next stay or go together: those
/// of one epoch become one entry, counted as committed by that next checkpoint, and those of
/// epochs older than the newest `tallied` become one entry per run of adjacent epochs (an
/// epoch split between two such spans stays alone, so that no two entries' epochs overlap).
/// Sums per epoch, or per range, after any restore, are those of the full ledger.
pub fn compact_ledger(ledger: &mut Vec<LedgerEntry>, kept: &[CheckpointRecord], tallied: u32) {
    let mut bounds: Vec<u64> = kept.iter().map(|c| c.step).collect();
    bounds.push(0);
    bounds.sort_unstable();
    let mut compact: Vec<LedgerEntry> = Vec::with_capacity(ledger.len());
    for entry in ledger.drain(..) {
        let bound = bounds
            .get(bounds.partition_point(|&b| b < entry.checkpoint_step))
            .copied()
            .unwrap_or(entry.checkpoint_step);
        match compact.iter_mut().find(|c| {
            c.checkpoint_step == bound && c.epoch == entry.epoch && c.epochs == entry.epochs
        }) {
            Some(merged) => add(merged, &entry),
            None => compact.push(LedgerEntry {
                checkpoint_step: bound,
                ..entry
            }),
        }
    }
    *ledger = fold_old_epochs(compact, tallied);
}

fn add(sum: &mut LedgerEntry, entry: &LedgerEntry) {
    sum.samples = sum.samples.saturating_add(entry.samples);
    sum.digest = sum.digest.wrapping_add(entry.digest);
    sum.skipped = sum.skipped.saturating_add(entry.skipped);
}

/// See [`compact_ledger`]: the entries of epochs older than the newest `tallied`, each told
/// under one kept checkpoint only, merged per checkpoint into runs of adjacent epochs.
fn fold_old_epochs(mut ledger: Vec<LedgerEntry>, tallied: u32) -> Vec<LedgerEntry> {
    let Some(newest) = ledger.iter().map(|e| *e.span().end()).max() else {
        return ledger;
    };
    let cutoff = newest.saturating_sub(tallied);
    let overlap = |a: &LedgerEntry, b: &LedgerEntry| {
        a.span().start() <= b.span().end() && b.span().start() <= a.span().end()
    };
    ledger.sort_by_key(|e| (e.checkpoint_step, e.epoch));
    let foldable: Vec<bool> = ledger
        .iter()
        .map(|e| {
            *e.span().end() < cutoff
                && !ledger
                    .iter()
                    .any(|o| o.checkpoint_step != e.checkpoint_step && overlap(o, e))
        })
        .collect();
    let mut folded: Vec<(LedgerEntry, bool)> = Vec::with_capacity(ledger.len());
    for (entry, can) in ledger.into_iter().zip(foldable) {
        match folded.last_mut() {
            Some((run, true))
                if can
                    && run.checkpoint_step == entry.checkpoint_step
                    && run.span().end() + 1 == entry.epoch =>
            {
                run.epochs = run.epochs.max(1) + entry.epochs.max(1);
                add(run, &entry);
            }
            _ => folded.push((entry, can)),
        }
    }
    folded.into_iter().map(|(entry, _)| entry).collect()
}

/// The most stage-end checkpoints retention keeps (the newest): a run of thousands of
/// one-epoch stages still keeps a bounded record.
pub const STAGE_ENDS_KEPT: usize = 64;

/// Retention: keeps the newest `keep` checkpoints (at least one, so the last good one is never
/// retired) and the end of each stage (the newest committed for it, should a replayed
/// generation commit it again; at most [`STAGE_ENDS_KEPT`], the newest); removes the others
/// from `checkpoints` (in commit order) and returns them.
pub fn retire(checkpoints: &mut Vec<CheckpointRecord>, keep: usize) -> Vec<CheckpointRecord> {
    // Newest last: by step, then by commit.
    let mut order: Vec<usize> = (0..checkpoints.len()).collect();
    order.sort_by_key(|&i| (checkpoints[i].step, i));
    let mut kept = vec![false; checkpoints.len()];
    for &i in order.iter().rev().take(keep.max(1)) {
        kept[i] = true;
    }
    let mut stages = std::collections::BTreeSet::new();
    for &i in order.iter().rev() {
        let c = &checkpoints[i];
        if c.stage_end && stages.len() < STAGE_ENDS_KEPT && stages.insert(c.stage) {
            kept[i] = true;
        }
    }
    let mut flags = kept.into_iter();
    let (kept, retired) = checkpoints
        .drain(..)
        .partition(|_| flags.next().unwrap_or(false));
    *checkpoints = kept;
    retired
}

/// A queued job as the scheduler sees it.
#[derive(Debug)]
pub struct Queued {
    pub id: String,
    /// The world sizes it may start on.
    pub sizes: Vec<u32>,
    pub ready_since_ms: Option<i64>,
}

/// The queued jobs in the order they are served: highest `job.priority` first, then oldest
/// (then by id, so that jobs submitted in one millisecond keep their order).
pub fn queue(
    jobs: &BTreeMap<String, JobRecord>,
    runtime: &BTreeMap<String, JobRuntime>,
) -> Vec<Queued> {
    let mut queued: Vec<&JobRecord> = jobs
        .values()
        .filter(|j| j.state == JobState::Queued)
        .collect();
    queued.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.created_at_ms, j.id.clone()));
    queued
        .into_iter()
        .map(|j| Queued {
            id: j.id.clone(),
            sizes: j.world_sizes_now(),
            ready_since_ms: runtime.get(&j.id).and_then(|r| r.ready_since_ms),
        })
        .collect()
}

/// What the scheduler decides for a queued job.
#[derive(Debug, PartialEq)]
pub enum Placement {
    /// A new generation on these workers (by rank).
    Start(Vec<String>),
    /// Not yet: why (shown by `ladder status`), and since when enough workers for some
    /// allowed size were idle.
    Wait {
        why: String,
        ready_since_ms: Option<i64>,
    },
}

/// Takes up to `n` of the `free` workers away from the jobs behind a waiting one; returns how
/// many.
fn hold_back(free: &mut Vec<String>, n: u32) -> usize {
    let hold = free.len().min(n as usize);
    free.drain(..hold);
    hold
}

/// Gives `idle` workers to `queued` jobs, in the order they are served (highest priority, then
/// oldest). A job starts at once on the largest world size it allows, or, after `grace` with
/// fewer idle workers, on the largest allowed size that the idle workers fill. A job that
/// cannot start holds the idle workers back from the jobs behind it (up to its smallest size,
/// or its largest while it waits out the grace), so small jobs never starve a large one:
/// workers gather for it as they come free. `unheard` workers are registered but not heard
/// from since a restart (they are named in what a job waits for).
pub fn place(
    queued: &[Queued],
    idle: Vec<String>,
    unheard: usize,
    now: i64,
    grace: i64,
) -> Vec<(String, Placement)> {
    let mut free = idle;
    let mut held = 0;
    let mut placements = Vec::new();
    for job in queued {
        let best = job.sizes.iter().copied().max().unwrap_or(0);
        let least = job.sizes.iter().copied().min().unwrap_or(0);
        let behind = match held {
            0 => String::new(),
            n => format!("; {n} more held for the jobs served before it"),
        };
        let Some(fit) = job
            .sizes
            .iter()
            .copied()
            .filter(|&n| n as usize <= free.len())
            .max()
        else {
            let why = format!(
                "waiting for workers: {} idle, {least} needed{}{behind}",
                free.len(),
                match unheard {
                    0 => String::new(),
                    n => format!(
                        " ({n} more registered, not heard from since the coordinator started)"
                    ),
                }
            );
            held += hold_back(&mut free, least);
            placements.push((
                job.id.clone(),
                Placement::Wait {
                    why,
                    ready_since_ms: None,
                },
            ));
            continue;
        };
        let ready_since = job.ready_since_ms.unwrap_or(now);
        if fit < best && now - ready_since < grace {
            let why = format!(
                "{} idle: starting on {fit} in {} s unless {best} are idle by then{behind}",
                free.len(),
                (ready_since + grace - now + 999) / 1000
            );
            held += hold_back(&mut free, best);
            placements.push((
                job.id.clone(),
                Placement::Wait {
                    why,
                    ready_since_ms: Some(ready_since),
                },
            ));
            continue;
        }
        placements.push((
            job.id.clone(),
            Placement::Start(free.drain(..fit as usize).collect()),
        ));
    }
    placements
}

/// The larger world size a running `job` regroups to at a checkpoint just committed, if it
/// runs below its largest size, `idle` workers make a larger one, no job is queued (queued jobs
/// are served first) and its generation has run at least `regroup_interval_ms` (a regroup costs
/// a rendezvous and a restore).
pub fn grows_to(
    job: &JobRecord,
    any_queued: bool,
    idle: usize,
    running_for_ms: i64,
    regroup_interval_ms: i64,
) -> Option<u32> {
    if job.state != JobState::Running || any_queued || running_for_ms < regroup_interval_ms {
        return None;
    }
    let current = job.workers.len();
    job.world_sizes_now()
        .into_iter()
        .filter(|&n| n as usize > current && n as usize <= current + idle)
        .max()
}

/// The workers whose lease ran out before `now`, by the job they trained (`None`: idle). The
/// workers a job lost and the end of its generation are then one transaction (a rack that went
/// dark ends each job once), and the idle ones go together.
pub fn expired_leases(
    workers: &BTreeMap<String, Member>,
    now: i64,
) -> BTreeMap<Option<String>, Vec<String>> {
    let mut lost: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (id, w) in workers.iter().filter(|(_, w)| w.lease_expires_ms < now) {
        lost.entry(w.assignment.as_ref().map(|a| a.job_id.clone()))
            .or_default()
            .push(id.clone());
    }
    lost
}

/// Which workers hold their job up for `stall` milliseconds at `now`, by job, with why: they are
/// hung, and are expelled (their next heartbeat is refused) and the generation ends, as if they
/// had died. In a running
/// generation none of whose workers made progress, those are the ones not waiting in a
/// collective (the ones the others wait on). In a rendezvous, those that never joined it: a
/// worker joins once its previous run has returned, and its heartbeat goes on while that run's
/// training thread is stuck (a GPU kernel, a driver, a file system).
pub fn stalled_workers(
    jobs: &BTreeMap<String, JobRecord>,
    runtime: &BTreeMap<String, JobRuntime>,
    workers: &BTreeMap<String, Member>,
    now: i64,
    stall: i64,
) -> Vec<(String, Vec<String>, String)> {
    let mut stalled = Vec::new();
    for job in jobs.values() {
        let rank = |id: &String| job.workers.iter().position(|w| w == id).unwrap_or(0);
        let name = |id: &String| format!("worker {id} (rank {})", rank(id));
        let members: Vec<(&String, &Member)> = job
            .workers
            .iter()
            .filter_map(|id| workers.get(id).map(|w| (id, w)))
            .collect();
        let idle_too_long = |w: &Member| now - w.active_ms >= stall;
        let exchange = runtime
            .get(&job.id)
            .filter(|r| r.generation == job.generation);
        let collective_failed =
            |id: &String| exchange.is_some_and(|r| r.collective_failures.contains_key(id));
        let joined =
            |id: &String| exchange.is_some_and(|r| r.rendezvous.contains_key(&(rank(id) as u32)));
        match job.state {
            JobState::Running => {
                if members.is_empty() || !members.iter().all(|(_, w)| idle_too_long(w)) {
                    continue;
                }
                // If everyone waits in the collective, the network between them is the
                // suspect: nobody is expelled and the generation restarts with all of them.
                // A worker that reported its collective failing waits for the others too.
                let hung: Vec<String> = members
                    .iter()
                    .filter(|(id, w)| !w.in_collective && !collective_failed(id))
                    .map(|(id, _)| (*id).clone())
                    .collect();
                let why = if hung.is_empty() {
                    format!(
                        "no worker made progress for {} s, all waiting in the collective",
                        stall / 1000
                    )
                } else {
                    format!(
                        "{} stalled: no progress for {} s while the others wait on it",
                        hung.iter().map(name).collect::<Vec<_>>().join(", "),
                        stall / 1000
                    )
                };
                stalled.push((job.id.clone(), hung, why));
            }
            JobState::Rendezvous => {
                let hung: Vec<String> = members
                    .iter()
                    .filter(|(id, w)| idle_too_long(w) && !joined(id))
                    .map(|(id, _)| (*id).clone())
                    .collect();
                if hung.is_empty() {
                    continue;
                }
                let why = format!(
                    "{} stalled: did not join generation {}'s rendezvous within {} s (its \
                         previous run never returned)",
                    hung.iter().map(name).collect::<Vec<_>>().join(", "),
                    job.generation,
                    stall / 1000
                );
                stalled.push((job.id.clone(), hung, why));
            }
            _ => {}
        }
    }
    stalled
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{WorkerAssignment, WorkerRecord, sum_per_epoch};
    use ladder_proto::v1::EpochTally;

    fn checkpoint(step: u64, stage_end: bool) -> CheckpointRecord {
        CheckpointRecord {
            id: format!("step-{step}"),
            generation: 1,
            epoch: 0,
            step,
            stage: 0,
            committed_at_ms: 0,
            stage_end,
        }
    }

    fn trained_after_restoring(ledger: &[LedgerEntry], restored: u64) -> Vec<EpochTally> {
        sum_per_epoch(ledger.iter().filter(|e| e.checkpoint_step <= restored))
    }

    #[test]
    fn expired_leases_are_grouped_by_the_job_their_workers_trained() {
        let worker = |id: &str, expires: i64, job: Option<&str>| {
            let record = WorkerRecord {
                id: id.to_owned(),
                hostname: String::new(),
                device: String::new(),
                name: String::new(),
                lease_ttl_ms: 1_000,
                registered_at_ms: 0,
                secret_sha256: String::new(),
            };
            Member {
                assignment: job.map(|j| WorkerAssignment {
                    job_id: j.to_owned(),
                    generation: 1,
                    rank: 0,
                }),
                lease_expires_ms: expires,
                ..Member::new(record, 0, true)
            }
        };
        let workers: BTreeMap<String, Member> = [
            worker("a", 100, Some("j1")),
            worker("b", 99, Some("j1")),
            worker("c", 500, Some("j1")),
            worker("d", 50, None),
            worker("e", 100, Some("j2")),
        ]
        .into_iter()
        .map(|w| (w.record.id.clone(), w))
        .collect();
        let lost = expired_leases(&workers, 100);
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert_eq!(
            lost[&Some("j1".to_owned())],
            ["b"],
            "a lease ending at now holds"
        );
        assert_eq!(lost[&None], ["d"]);
        let later = expired_leases(&workers, 101);
        assert_eq!(later[&Some("j1".to_owned())], ["a", "b"]);
        assert_eq!(later[&Some("j2".to_owned())], ["e"]);
    }

    fn queued(id: &str, sizes: &[u32]) -> Queued {
        Queued {
            id: id.to_owned(),
            sizes: sizes.to_vec(),
            ready_since_ms: None,
        }
    }

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("w{i}")).collect()
    }

    #[test]
    fn a_job_that_cannot_start_holds_idle_workers_back_from_the_jobs_behind_it() {
        let jobs = [queued("big", &[2]), queued("small", &[1])];
        let placed = place(&jobs, workers(1), 0, 0, 5_000);
        let Placement::Wait { why, .. } = &placed[1].1 else {
            panic!("the small job behind the big one must wait: {placed:?}");
        };
        assert!(
            why.contains("0 idle") && why.contains("1 more held"),
            "{why}"
        );
        let placed = place(&jobs, workers(3), 0, 0, 5_000);
        assert_eq!(placed[0].1, Placement::Start(workers(2)));
        assert_eq!(placed[1].1, Placement::Start(vec!["w2".to_owned()]));
    }

    #[test]
    fn a_job_waits_out_the_grace_for_its_largest_size_then_starts_on_fewer() {
        let mut job = queued("j", &[1, 2]);
        let placed = place(std::slice::from_ref(&job), workers(1), 0, 1_000, 5_000);
        let Placement::Wait {
            why,
            ready_since_ms,
        } = &placed[0].1
        else {
            panic!("{placed:?}");
        };
        assert!(why.contains("starting on 1 in 5 s unless 2"), "{why}");
        assert_eq!(*ready_since_ms, Some(1_000));
        job.ready_since_ms = Some(1_000);
        let placed = place(std::slice::from_ref(&job), workers(1), 0, 6_000, 5_000);
        assert_eq!(placed[0].1, Placement::Start(workers(1)));
    }

    proptest::proptest! {
        /// However many jobs wait for however many workers: no worker is given twice, each job
        /// starts on a size it allows, and a job that must wait is never passed by the jobs
        /// behind it on the workers it could use.
        #[test]
        fn placements_are_disjoint_allowed_and_starve_no_one(
            sizes in proptest::collection::vec(proptest::collection::btree_set(1u32..6, 1..3), 1..6),
            idle in 0usize..12,
        ) {
            let jobs: Vec<Queued> = sizes
                .iter()
                .enumerate()
                .map(|(i, s)| queued(&format!("j{i}"), &s.iter().copied().collect::<Vec<_>>()))
                .collect();
            let placed = place(&jobs, workers(idle), 0, 0, 0);
            let mut given = std::collections::BTreeSet::new();
            // What the first job that must wait holds back for itself.
            let mut held_back: Option<usize> = None;
            for ((job, (id, placement)), allowed) in jobs.iter().zip(&placed).zip(&sizes) {
                proptest::prop_assert_eq!(&job.id, id);
                match placement {
                    Placement::Start(ws) => {
                        proptest::prop_assert!(allowed.contains(&(ws.len() as u32)));
                        for w in ws {
                            proptest::prop_assert!(given.insert(w.clone()), "{} given twice", w);
                        }
                    }
                    Placement::Wait { .. } => {
                        if held_back.is_none() {
                            let least = *allowed.iter().next().unwrap() as usize;
                            held_back = Some((idle - given.len()).min(least));
                        }
                    }
                }
            }
            // The workers it holds went to nobody behind it.
            proptest::prop_assert!(given.len() + held_back.unwrap_or(0) <= idle);
        }
    }

    proptest::proptest! {
        /// Whatever was committed and kept, a ledger compacted after each commit (as the
        /// coordinator does) never grows past the full one and, after a restore to any kept
        /// checkpoint or to the start, tells what the full one tells: its entries' epochs do
        /// not overlap, the newest `tallied` epochs are told one by one, and each entry sums
        /// the full ledger over its epochs.
        #[test]
        fn a_compacted_ledger_is_the_same_history_after_any_restore(
            commits in proptest::collection::vec(
                (1u64..6, 0u32..3, 1u32..4, 0u64..100, proptest::num::u64::ANY, 0u64..3, proptest::bool::ANY),
                1..40,
            ),
            tallied in 0u32..5,
        ) {
            let (mut ledger, mut compact, mut kept) = (Vec::new(), Vec::new(), Vec::new());
            let (mut step, mut epoch) = (0, 0);
            for &(advance, jump, count, samples, digest, skipped, keep) in &commits {
                step += advance;
                // A commit tells the epochs its steps are in: from the one the previous commit
                // ended in (or a later one) on.
                epoch += jump;
                let told: Vec<LedgerEntry> = (epoch..epoch + count)
                    .map(|e| LedgerEntry {
                        checkpoint_step: step,
                        epoch: e,
                        epochs: 1,
                        samples,
                        digest: digest.wrapping_mul(u64::from(e) + 1),
                        skipped,
                    })
                    .collect();
                epoch += count - 1;
                ledger.extend(told.iter().cloned());
                compact.extend(told);
                if keep {
                    kept.push(checkpoint(step, false));
                }
                let mut now_kept = kept.clone();
                now_kept.push(checkpoint(step, false));
                compact_ledger(&mut compact, &now_kept, tallied);
            }
            proptest::prop_assert!(compact.len() <= ledger.len());
            for restored in std::iter::once(0).chain(kept.iter().map(|c| c.step)).chain([step]) {
                let full = trained_after_restoring(&ledger, restored);
                let shown = trained_after_restoring(&compact, restored);
                let newest = full.last().map_or(0, |t| t.epoch);
                let mut told = std::collections::BTreeSet::new();
                for tally in &shown {
                    let span = tally.epoch..tally.epoch + tally.epochs.max(1);
                    for e in span.clone() {
                        proptest::prop_assert!(told.insert(e), "epoch {} told twice: {:?}", e, shown);
                    }
                    if tally.epochs > 1 && restored == step {
                        proptest::prop_assert!(span.end + tallied <= newest + 1, "{:?}", tally);
                    }
                    let summed = full.iter().filter(|t| span.contains(&t.epoch)).fold(
                        (0u64, 0u64, 0u64),
                        |(n, d, k), t| (n + t.samples, d.wrapping_add(t.digest), k + t.skipped),
                    );
                    proptest::prop_assert_eq!(
                        summed,
                        (tally.samples, tally.digest, tally.skipped),
                        "restored to step {}: {:?}", restored, tally
                    );
                }
                let all: std::collections::BTreeSet<u32> = full.iter().map(|t| t.epoch).collect();
                proptest::prop_assert_eq!(told, all, "restored to step {}", restored);
            }
        }
    }

    #[test]
    fn a_ledger_between_two_kept_checkpoints_becomes_one_entry_per_epoch() {
        let entry = |checkpoint_step, epoch| LedgerEntry {
            checkpoint_step,
            epoch,
            epochs: 1,
            samples: 10,
            digest: checkpoint_step,
            skipped: 0,
        };
        let mut ledger = vec![
            entry(5, 0),
            entry(10, 0),
            entry(10, 1),
            entry(15, 1),
            entry(20, 1),
        ];
        compact_ledger(
            &mut ledger,
            &[checkpoint(10, true), checkpoint(20, false)],
            TALLIED_EPOCHS,
        );
        let shape: Vec<(u64, u32, u64)> = ledger
            .iter()
            .map(|e| (e.checkpoint_step, e.epoch, e.samples))
            .collect();
        assert_eq!(shape, vec![(10, 0, 20), (10, 1, 10), (20, 1, 20)]);
    }

    #[test]
    fn retention_keeps_the_newest_and_every_stage_end() {
        let mut all: Vec<CheckpointRecord> = [(10, false), (20, true), (30, false), (40, false)]
            .into_iter()
            .map(|(s, e)| checkpoint(s, e))
            .collect();
        let retired = retire(&mut all, 1);
        let ids = |v: &[CheckpointRecord]| v.iter().map(|c| c.step).collect::<Vec<_>>();
        assert_eq!(ids(&all), vec![20, 40]);
        assert_eq!(ids(&retired), vec![10, 30]);
        // Keeping zero still keeps the newest: the last good checkpoint is never retired.
        let mut one = vec![checkpoint(5, false)];
        assert!(retire(&mut one, 0).is_empty());
        assert_eq!(ids(&one), vec![5]);
        let mut many: Vec<CheckpointRecord> = (1..=5).map(|s| checkpoint(s, false)).collect();
        retire(&mut many, 3);
        assert_eq!(ids(&many), vec![3, 4, 5]);
    }

    proptest::proptest! {
        /// Whatever rank 0 commits, retention keeps a bounded set: the newest `keep`, and for
        /// each stage (of the newest [`STAGE_ENDS_KEPT`] stages with one) its newest stage end.
        #[test]
        fn retention_is_bounded_and_keeps_the_newest_end_of_each_stage(
            commits in proptest::collection::vec((0u64..500, 0u32..100, proptest::bool::ANY), 1..400),
            keep in 0usize..6,
        ) {
            let mut checkpoints: Vec<CheckpointRecord> = commits
                .iter()
                .enumerate()
                .map(|(i, &(step, stage, stage_end))| CheckpointRecord {
                    id: format!("c{i}"),
                    stage,
                    ..checkpoint(step, stage_end)
                })
                .collect();
            let all = checkpoints.clone();
            let retired = retire(&mut checkpoints, keep);
            proptest::prop_assert_eq!(checkpoints.len() + retired.len(), all.len());
            proptest::prop_assert!(checkpoints.len() <= keep.max(1) + STAGE_ENDS_KEPT);
            // Newest last, by step then commit order.
            let mut order: Vec<usize> = (0..all.len()).collect();
            order.sort_by_key(|&i| (all[i].step, i));
            let is_kept = |i: usize| checkpoints.iter().any(|c| c.id == all[i].id);
            for &i in order.iter().rev().take(keep.max(1)) {
                proptest::prop_assert!(is_kept(i), "one of the newest {} retired", keep.max(1));
            }
            let mut stages = std::collections::BTreeSet::new();
            for &i in order.iter().rev().filter(|&&i| all[i].stage_end) {
                if stages.len() < STAGE_ENDS_KEPT && stages.insert(all[i].stage) {
                    proptest::prop_assert!(is_kept(i), "the newest end of stage {}", all[i].stage);
                }
            }
            // Kept stays in commit order.
            let positions: Vec<usize> = checkpoints
                .iter()
                .map(|c| all.iter().position(|a| a.id == c.id).unwrap())
                .collect();
            proptest::prop_assert!(positions.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
