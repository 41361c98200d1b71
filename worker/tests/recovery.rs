//! Resume and fault tolerance across real processes: exact mid-epoch resume after killing
//! everything, resume on other world sizes, a worker lost to SIGKILL or SIGSTOP, and a
//! coordinator killed mid-training.

mod common;

use common::{
    Cluster, EPOCHS, STEPS_PER_EPOCH, assert_every_sample_once, final_manifest, state_of,
    trained_steps, worker_id, write_spec,
};
use ladder_proto::v1 as pb;
use ladder_testkit::Etcd;
use ladder_train::checkpoint::MANIFEST_FILE;
use ladder_train::checkpoint::safetensors;
use ladder_train::checkpoint::state::MOMENTUM_FILE;
use std::path::Path;
use std::time::{Duration, Instant};

const TOTAL_STEPS: u64 = EPOCHS * STEPS_PER_EPOCH;
const TIMEOUT: Duration = Duration::from_secs(300);

fn assert_failed(job: &pb::Job, cluster: &Cluster) {
    assert_eq!(
        state_of(job),
        pb::JobState::Failed,
        "{}\n{}",
        job.message,
        cluster.logs()
    );
}

fn completed(job: &pb::Job) -> bool {
    state_of(job) == pb::JobState::Completed
}

/// Trains the whole job on `workers` workers started with `flags`, without interruption;
/// returns the final job.
fn straight_run(dir: &Path, workers: u32, flags: &[&str]) -> pb::Job {
    let spec = write_spec(dir, (1, 3), 5, 100);
    let mut cluster = Cluster::new(dir);
    cluster.add_workers_with(workers as usize, flags);
    let id = cluster.submit(&spec);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    job
}

/// Waits until a checkpoint past `step` is committed while the job still runs.
fn wait_for_checkpoint_after(cluster: &Cluster, id: &str, step: u64) -> pb::Job {
    let job = cluster.wait_for(id, "a mid-run checkpoint", TIMEOUT, |j| {
        j.checkpoints.iter().any(|c| c.step > step) || completed(j)
    });
    assert!(
        !completed(&job),
        "the job finished before it could be interrupted"
    );
    job
}

/// Tensors that barely leave zero (late biases, some running means at 1e-8) are compared
/// against this magnitude instead of their own.
const FLOOR: f64 = 1e-2;

/// The largest difference between two checkpoints' model tensors, relative to each tensor's
/// largest magnitude (at least [`FLOOR`]).
fn model_difference(a: &pb::Job, b: &pb::Job) -> f64 {
    let read = |job: &pb::Job| {
        let dir = common::checkpoint_dir(job, job.checkpoints.last().unwrap());
        let mut tensors = safetensors::read(&dir.join("model.safetensors")).expect("model file");
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        tensors
    };
    let (a, b) = (read(a), read(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .filter(|((_, t), _)| t.is_floating_point())
        .map(|((name, x), (other, y))| {
            assert_eq!(name, other);
            let scale = x.abs().max().double_value(&[]).max(FLOOR);
            (x - y).abs().max().double_value(&[]) / scale
        })
        .fold(0.0, f64::max)
}

/// Trains about half the job on 2 workers started with `flags`, kills every process, restarts
/// the coordinator on its store and brings 2 new workers: the job must continue from its latest
/// committed checkpoint by itself and end bit-identical to `reference`, the same job run
/// straight through.
fn assert_killed_and_restarted_run_is_bit_identical(reference: &pb::Job, flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (1, 3), 5, 100);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers_with(2, flags);
    let id = cluster.submit(&spec);
    let before = wait_for_checkpoint_after(&cluster, &id, TOTAL_STEPS / 2 - 5);
    cluster.kill_workers();
    cluster.kill_coordinator();
    let restored = before.checkpoints.last().unwrap().step;
    cluster.start_coordinator();
    cluster.add_workers_with(2, flags);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert!(job.generation >= 2, "the job ran a second generation");
    assert_every_sample_once(&job, &spec);
    assert_eq!(
        final_manifest(&job).files,
        final_manifest(reference).files,
        "killed at step {restored}+ and resumed ({flags:?}), the final model, optimizer and EMA are bit-identical"
    );
}

#[test]
fn a_run_resumed_mid_epoch_is_bit_identical_and_other_world_sizes_match() {
    let reference = tempfile::tempdir().unwrap();
    let reference = straight_run(reference.path(), 2, &[]);
    assert_killed_and_restarted_run_is_bit_identical(&reference, &[]);

    // The same job, cancelled half-way and resumed by command on 3 workers, then on 1.
    for workers in [3u32, 1] {
        let dir = tempfile::tempdir().unwrap();
        let spec = write_spec(dir.path(), (1, 3), 5, 100);
        let mut cluster = Cluster::new(dir.path());
        cluster.add_workers(2);
        let id = cluster.submit(&spec);
        wait_for_checkpoint_after(&cluster, &id, TOTAL_STEPS / 2 - 5);
        cluster.cancel(&id);
        cluster.kill_workers();
        cluster.add_workers(workers as usize);
        let resumed = cluster.resume(&id, workers);
        assert!(
            matches!(
                state_of(&resumed),
                pb::JobState::Queued | pb::JobState::Rendezvous
            ),
            "{}",
            resumed.message
        );
        let job = cluster.wait_until_ended(&id, TIMEOUT);
        assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
        assert_eq!(job.workers.len(), 0);
        assert_every_sample_once(&job, &spec);
        let difference = model_difference(&job, &reference);
        eprintln!("resumed on {workers} worker(s): largest relative difference {difference:e}");
        // Only the order of float additions differs (the ring's sums, the BatchNorm
        // statistics' combination): about 1e-7 per operation, compounded over the remaining
        // steps of RMSProp; measured at 3.6e-5 on 1 and 3 workers.
        assert!(
            difference < 5e-4,
            "resumed on {workers} workers the model differs by {difference:e}"
        );
    }
}

/// The GPU's precision on CPU workers: the flat buffers are channels-last, so every snapshot
/// reorders them to the files' standard order and every restore back; bfloat16 autocast runs
/// the forward passes. A restart must still lose nothing, to the bit.
#[test]
fn a_bfloat16_channels_last_run_resumed_after_a_kill_is_bit_identical() {
    let flags = ["--precision", "bfloat16"];
    let reference = tempfile::tempdir().unwrap();
    let reference = straight_run(reference.path(), 2, &flags);
    assert_killed_and_restarted_run_is_bit_identical(&reference, &flags);
}

/// Waits until the job runs a generation after `generation` and one of `workers` has trained
/// a step in it (the survivors cannot finish a step of the old generation without the lost
/// rank). Returns when that step was seen.
fn wait_for_next_generation_step(
    cluster: &Cluster,
    id: &str,
    generation: u64,
    workers: &[usize],
) -> Instant {
    cluster.wait_for(id, "the next generation", TIMEOUT, |j| {
        j.generation > generation && state_of(j) == pb::JobState::Running
    });
    let before: Vec<usize> = workers
        .iter()
        .map(|&w| trained_steps(&cluster.dir, w).len())
        .collect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if workers
            .iter()
            .zip(&before)
            .any(|(&w, &n)| trained_steps(&cluster.dir, w).len() > n)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no step in the new generation: {:#?}\n{}",
            cluster.job(id),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_worker_and_a_stopped_worker_are_replaced_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 3), 5, 100);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(3);
    let id = cluster.submit(&spec);
    let running = wait_for_checkpoint_after(&cluster, &id, 10);

    // SIGKILL one of three mid-epoch: the lease expires, the survivors abort their ring,
    // restore the latest checkpoint and go on as two (the spec's minimum).
    let killed = worker_id(&cluster.workers[0]);
    cluster.workers[0].kill9();
    let killed_at = Instant::now();
    let stepped = wait_for_next_generation_step(&cluster, &id, running.generation, &[1, 2]);
    let recovery = stepped - killed_at;
    eprintln!(
        "SIGKILL: next step {:.1} s after the kill",
        recovery.as_secs_f64()
    );
    assert!(
        recovery < Duration::from_secs(30),
        "recovery took {recovery:?}"
    );
    let job = cluster.job(&id);
    assert!(
        job.last_incident.contains(&killed),
        "`ladder status` names the lost worker: {}",
        job.last_incident
    );
    assert_eq!(job.workers.len(), 2, "{}", job.message);

    // SIGSTOP one of the two: it stops renewing its lease (and stepping); the other aborts
    // instead of waiting on it, and a replacement that registers takes its place.
    wait_for_checkpoint_after(&cluster, &id, job.checkpoints.last().unwrap().step);
    let stopped = cluster.workers[1].pid();
    let stopped_id = worker_id(&cluster.workers[1]);
    cluster.workers[1].signal("-STOP");
    let stopped_at = Instant::now();
    cluster.add_workers(1);
    let job = cluster.wait_for(&id, "the stopped worker to be replaced", TIMEOUT, |j| {
        j.last_incident.contains(&stopped_id) && state_of(j) == pb::JobState::Running
    });
    eprintln!(
        "SIGSTOP: generation {} running {:.1} s after the stop",
        job.generation,
        stopped_at.elapsed().as_secs_f64()
    );
    assert!(!job.workers.contains(&stopped_id));
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    cluster.workers[1].signal("-CONT");
    assert_eq!(cluster.workers[1].pid(), stopped);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert!(job.generation >= 3, "two membership changes");
    assert_every_sample_once(&job, &spec);
}

#[test]
fn a_coordinator_killed_mid_training_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 2), 5, 100);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    let before = wait_for_checkpoint_after(&cluster, &id, 10);
    cluster.kill_coordinator();
    let at_kill = *trained_steps(dir.path(), 0).last().unwrap();
    // The workers train on without it, up to the checkpoint whose commit must wait for it.
    std::thread::sleep(Duration::from_secs(3));
    let while_down = *trained_steps(dir.path(), 0).last().unwrap();
    assert!(
        while_down > at_kill,
        "training went on without the coordinator ({at_kill} -> {while_down})"
    );
    cluster.start_coordinator();
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert_eq!(
        job.generation, before.generation,
        "no membership change, no rollback"
    );
    for w in 0..2 {
        let steps = trained_steps(dir.path(), w);
        assert_eq!(
            steps,
            (1..=TOTAL_STEPS).collect::<Vec<_>>(),
            "worker {w} trained every step once, none again"
        );
    }
    let committed: Vec<u64> = job.checkpoints.iter().map(|c| c.step).collect();
    assert!(
        committed.iter().any(|&s| s > while_down),
        "checkpoints were committed after the restart: {committed:?}"
    );
}

/// The worker whose training thread hangs: it is expelled, and its process, which can no
/// longer serve, exits `--stop-grace-s` later with code 1 (so that a supervisor restarts it).
fn assert_expelled_and_exits(cluster: &mut Cluster, job: &pb::Job, hung: usize) {
    let hung_id = worker_id(&cluster.workers[hung]);
    assert!(
        job.last_incident.contains(&hung_id),
        "the incident names the hung worker, not the ones waiting on it: {}",
        job.last_incident
    );
    let exit = cluster.workers[hung].exit_within(Duration::from_secs(60));
    let log = cluster.workers[hung].log_text();
    assert_eq!(exit.and_then(|e| e.code()), Some(1), "{log}");
    assert!(log.contains("it is stuck"), "{log}");
}

#[test]
fn a_worker_that_hangs_while_its_heartbeat_goes_on_is_expelled() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (1, 2), 5, 100);
    let mut cluster = Cluster::with_flags(dir.path(), &["--stall-timeout-ms", "3000"]);
    cluster.add_worker(&["--inject-hang-before-step", "12", "--stop-grace-s", "2"]);
    cluster.add_worker(&[]);
    let id = cluster.submit(&spec);
    let job = cluster.wait_for(&id, "the hung worker to be expelled", TIMEOUT, |j| {
        j.last_incident.contains("stalled")
    });
    assert_expelled_and_exits(&mut cluster, &job, 0);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert_every_sample_once(&job, &spec);
    assert_eq!(
        *trained_steps(dir.path(), 1).last().unwrap(),
        TOTAL_STEPS,
        "the healthy worker finished the job alone"
    );
}

/// A worker whose run was stopped (a peer died) but whose training thread never returns keeps
/// heartbeating, so it looks idle and is given the next generation, whose rendezvous it never
/// joins. The coordinator expels it after the stall timeout instead of waiting for good.
#[test]
fn a_worker_stuck_in_its_previous_run_is_expelled_from_the_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 3), 5, 100);
    let mut cluster = Cluster::with_flags(dir.path(), &["--stall-timeout-ms", "4000"]);
    cluster.add_worker(&["--inject-hang-when-stopped", "--stop-grace-s", "600"]);
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    let running = wait_for_checkpoint_after(&cluster, &id, 10);
    cluster.workers[2].kill9();
    let job = cluster.wait_for(&id, "the stuck worker to be expelled", TIMEOUT, |j| {
        j.last_incident.contains("rendezvous")
    });
    assert!(
        job.last_incident.contains(&worker_id(&cluster.workers[0]))
            && job.generation > running.generation,
        "{}",
        job.last_incident
    );
    // The one healthy survivor and a replacement finish the job.
    cluster.add_workers(1);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert_every_sample_once(&job, &spec);
}

/// Trains to a checkpoint after step 10, stops, damages the newest checkpoint with `damage`,
/// resumes: the damage is reported (its message holding `reason`), the previous checkpoint used
/// instead, and the job completes with every sample trained once.
fn assert_a_damaged_checkpoint_is_reported_and_the_previous_one_used(
    damage: impl FnOnce(&Path),
    reason: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (1, 2), 5, 100);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    wait_for_checkpoint_after(&cluster, &id, 10);
    cluster.cancel(&id);
    cluster.kill_workers();
    let job = cluster.job(&id);
    let (bad, previous) = match job.checkpoints.as_slice() {
        [.., previous, bad] => (bad.clone(), previous.clone()),
        _ => panic!("two committed checkpoints: {:?}", job.checkpoints),
    };
    damage(&common::checkpoint_dir(&job, &bad));
    cluster.add_workers(2);
    cluster.resume(&id, 0);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert!(
        job.last_incident.contains(&bad.id) && job.last_incident.contains(reason),
        "the damaged checkpoint is reported: {}",
        job.last_incident
    );
    assert!(
        job.last_incident.contains(&previous.id),
        "and the previous one used: {}",
        job.last_incident
    );
    assert!(!job.checkpoints.iter().any(|c| c.id == bad.id));
    assert_every_sample_once(&job, &spec);
}

#[test]
fn a_corrupt_checkpoint_is_reported_and_the_previous_one_is_used() {
    // The training state cut short, as a full disk or a dying node would.
    let truncate = |checkpoint: &Path| {
        let file = checkpoint.join(MOMENTUM_FILE);
        let length = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(length / 2)
            .unwrap();
    };
    assert_a_damaged_checkpoint_is_reported_and_the_previous_one_used(truncate, "truncated");
}

#[test]
fn a_checkpoint_whose_manifest_puts_it_past_the_run_is_not_restored() {
    // The manifest is not covered by the files' digests: one that says the run is over (edited,
    // or written by a hostile node) must not finish the job untrained.
    let past_the_end = |checkpoint: &Path| {
        let path = checkpoint.join(MANIFEST_FILE);
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        manifest["epoch"] = serde_json::json!(EPOCHS + 5);
        std::fs::write(&path, manifest.to_string()).unwrap();
    };
    assert_a_damaged_checkpoint_is_reported_and_the_previous_one_used(
        past_the_end,
        "not where checkpoint",
    );
}

#[test]
fn a_collective_failing_on_every_rank_ends_the_generation_at_once_and_the_job_when_it_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 2), 5, 100);
    // The default stall timeout (300 s): the job must not wait for it.
    let mut cluster = Cluster::new(dir.path());
    cluster.add_worker(&["--inject-collective-error-before-step", "12"]);
    cluster.add_worker(&[]);
    let started = Instant::now();
    let id = cluster.submit(&spec);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    let elapsed = started.elapsed();
    assert_failed(&job, &cluster);
    assert!(
        job.message.contains("the collective failed on every rank")
            && job.message.contains("injected before step 12")
            && job.message.contains("3 generations in a row"),
        "{}",
        job.message
    );
    assert_eq!(
        job.generation, 3,
        "the checkpoint at step 10 came before the first failure, none after"
    );
    assert!(
        elapsed < Duration::from_secs(120),
        "each generation ended when its ranks reported, not by stall detection: {elapsed:?}"
    );
}

/// Runs a job on one worker whose parameters turn to NaN after global step `poisoned`
/// (checkpoints every 5 steps): it must fail with no checkpoint committed from that step on.
/// Returns its message.
fn diverging_run(poisoned: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (1, 1), 5, 100);
    let mut cluster = Cluster::new(dir.path());
    cluster.add_worker(&["--inject-nan-after-step", &poisoned.to_string()]);
    let id = cluster.submit(&spec);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert_failed(&job, &cluster);
    let committed: Vec<u64> = job.checkpoints.iter().map(|c| c.step).collect();
    assert!(
        committed.contains(&5) && committed.iter().all(|&s| s < poisoned),
        "nothing from the divergence on is committed: {committed:?}"
    );
    job.message
}

#[test]
fn a_diverged_run_stops_and_never_checkpoints_non_finite_weights() {
    // Poisoned between two checkpoints: the next step's loss is NaN.
    let message = diverging_run(7);
    assert!(
        message.contains("training diverged: the loss of global step 8 was NaN"),
        "{message}"
    );
    // Poisoned by the update of a checkpoint step: the loss was still finite, the weights are
    // not, so the checkpoint is not taken, and the next step's loss ends the run.
    let message = diverging_run(10);
    assert!(
        message.contains("training diverged: the loss of global step 11 was NaN"),
        "{message}"
    );
    // Poisoned by the run's last update: no next step, so the weights themselves are checked.
    let message = diverging_run(60);
    assert!(
        message.contains(
            "training diverged: the parameters were no longer finite after global step 60"
        ),
        "{message}"
    );
}

#[test]
fn checkpoints_come_by_time_too() {
    let dir = tempfile::tempdir().unwrap();
    // By steps only at step 1000, beyond the run's 60: the checkpoints between the stage ends
    // (steps 20, 40, 60) come from the clock.
    let mut spec = write_spec(dir.path(), (1, 1), 1000, 100);
    spec.checkpoint.every_minutes = 0.002;
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(1);
    let id = cluster.submit(&spec);
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    let by_time: Vec<u64> = job
        .checkpoints
        .iter()
        .filter(|c| !c.stage_end)
        .map(|c| c.step)
        .collect();
    assert!(!by_time.is_empty(), "{:?}", job.checkpoints);
}

#[test]
fn a_worker_asked_to_stop_leaves_after_a_checkpoint_and_the_job_loses_no_steps() {
    let dir = tempfile::tempdir().unwrap();
    // One stage, and by steps only at step 1000: any checkpoint but the run's end (step 60) is
    // the one the leaving worker asked for.
    let mut spec = write_spec(dir.path(), (1, 2), 1000, 100);
    spec.schedule.stage_epochs = EPOCHS as u32;
    let mut cluster = Cluster::new(dir.path());
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    let running = cluster.wait_for(&id, "step 5", TIMEOUT, |j| {
        j.progress.is_some_and(|p| p.global_step >= 5)
    });
    cluster.workers[1].signal("-TERM");
    let asked_at = running.progress.unwrap().global_step;
    let left = cluster.workers[1].exit_within(Duration::from_secs(60));
    assert!(
        left.is_some_and(|s| s.success()),
        "the worker did not leave by itself after the checkpoint: {left:?}\n{}",
        cluster.logs()
    );
    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    let asked_for: Vec<&pb::CheckpointRef> =
        job.checkpoints.iter().filter(|c| !c.stage_end).collect();
    assert_eq!(
        asked_for.len(),
        1,
        "{:?}\n{}",
        job.checkpoints,
        cluster.logs()
    );
    assert!(
        asked_for[0].step >= asked_at,
        "no step before the request is lost"
    );
    assert!(
        job.last_incident.contains("left on request")
            && job
                .last_incident
                .contains(&format!("restoring from checkpoint {}", asked_for[0].id)),
        "{}",
        job.last_incident
    );
    assert_every_sample_once(&job, &spec);
}

/// etcd killed (SIGKILL) mid-training and started again on its data 10 s later: neither
/// coordinator exits; the leader stops deciding when its lease cannot be renewed, both
/// campaign again, and one serves again within the leader TTL and a few seconds of etcd's
/// return. The job goes on in the same processes and trains every sample once.
#[test]
fn an_etcd_outage_is_waited_out_without_a_restart() {
    const LEADER_TTL_S: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), (2, 2), 5, 100);
    let mut etcd = Etcd::start();
    let ttl = LEADER_TTL_S.to_string();
    let mut cluster = Cluster::on_store(dir.path(), &etcd.store(), &["--leader-ttl-s", &ttl]);
    cluster.add_standby();
    cluster.add_workers(2);
    let id = cluster.submit(&spec);
    let before = wait_for_checkpoint_after(&cluster, &id, 10);

    etcd.kill9();
    std::thread::sleep(Duration::from_secs(10));
    etcd.restart();
    let back = Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    while runtime
        .block_on(ladder_proto::client::reach(&cluster.url(), None))
        .is_err()
    {
        assert!(back.elapsed() < TIMEOUT, "no coordinator serves again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let serving_after = back.elapsed();
    eprintln!("a coordinator serves again {serving_after:?} after etcd's return");
    assert!(
        serving_after < Duration::from_secs(LEADER_TTL_S + 8),
        "{serving_after:?}"
    );

    let job = cluster.wait_until_ended(&id, TIMEOUT);
    assert!(completed(&job), "{}\n{}", job.message, cluster.logs());
    assert_eq!(job.generation, before.generation, "no membership change");
    assert_every_sample_once(&job, &spec);
    let leader = cluster.coordinator.as_mut().unwrap();
    assert!(leader.is_running(), "the leader waited the outage out");
    let standby = &mut cluster.standby.as_mut().unwrap().0;
    assert!(
        matches!(standby.try_wait(), Ok(None)),
        "the standby waited it out"
    );
    // Every coordinator log, whole (the outage is long before their tails).
    let said: String = std::fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("coordinator"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(said.contains("waiting for its store"), "{said}");
    assert!(said.contains("campaigning again"), "{said}");
}
