//! `deploy/slurm/ladder.sbatch` on a real Slurm: Debian's munged, slurmctld and slurmd started
//! here with a generated configuration (this machine is controller and node, with eight GPUs
//! that Slurm counts and hands out, which are /dev/null; process tracking and task plugins that need no
//! cgroups; job completions kept by jobcomp/filetxt, which `sacct -c` reads). The batch script runs CPU workers on a small job to completion; a second
//! batch job is cancelled mid-epoch (its workers checkpoint and leave on SIGTERM) and a third
//! resumes the same training job to completion. Bad input stops the script with one line.

use ladder_deploy::{TinyJob, deploy_dir, run_ok};
use ladder_testkit::{CoordinatorProcess, SUBMIT_TOKEN, binary, free_port};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's Slurm daemons and munged for one test, in `dir`; stopped when dropped.
struct Slurm {
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        let munge = dir.join("munge");
        std::fs::create_dir_all(&munge).unwrap();
        std::fs::set_permissions(&munge, std::fs::Permissions::from_mode(0o700)).unwrap();
        let key: Vec<u8> = (0..1024).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(munge.join("munge.key"), key).unwrap();
        std::fs::set_permissions(
            munge.join("munge.key"),
            std::fs::Permissions::from_mode(0o400),
        )
        .unwrap();
        let socket = munge.join("munge.sock");
        let node = run_ok(Command::new("hostname").arg("-s")).trim().to_owned();
        let cpus = std::thread::available_parallelism().unwrap().get();
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|kb| kb.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap()
            / 1024
            * 9
            / 10;
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let d = dir.display();
        let config = format!(
            "ClusterName=ladder\nSlurmctldHost={node}\nSlurmUser=root\nSlurmdUser=root\n\
             AuthType=auth/munge\nAuthInfo=socket={socket}\nCredType=cred/munge\n\
             StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
             ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             SchedulerType=sched/builtin\nSelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\nMpiDefault=none\nReturnToService=2\n\
             JobCompType=jobcomp/filetxt\nJobCompLoc={d}/jobcomp.txt\n\
             AccountingStorageType=accounting_storage/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             KillWait=120\nGresTypes=gpu\n\
             SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
             NodeName={node} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:8 State=UNKNOWN\n\
             PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP\n",
            socket = socket.display(),
            ctld = free_port(),
            slurmd = free_port(),
        );
        std::fs::write(dir.join("slurm.conf"), config).unwrap();
        // Eight GPUs for Slurm to count and hand out, character devices that are /dev/null:
        // the script's GPU request is granted as on a GPU node, and the workers train on the
        // CPU.
        let gpus = dir.join("gpus");
        std::fs::create_dir_all(&gpus).unwrap();
        for i in 0..8 {
            run_ok(
                Command::new("mknod")
                    .arg(gpus.join(format!("gpu{i}")))
                    .args(["c", "1", "3"]),
            );
        }
        std::fs::write(
            dir.join("gres.conf"),
            format!(
                "NodeName={node} Name=gpu File={}/gpu[0-7]\n",
                gpus.display()
            ),
        )
        .unwrap();
        let mut slurm = Slurm {
            dir: dir.to_owned(),
            daemons: Vec::new(),
        };
        let log = |name: &str| std::fs::File::create(dir.join("log").join(name)).unwrap();
        slurm.daemons.push(
            Command::new("munged")
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", munge.join("munge.key").display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
                .arg(format!("--seed-file={}", munge.join("seed").display()))
                .arg(format!("--log-file={}", munge.join("munged.log").display()))
                .stderr(log("munged.err"))
                .spawn()
                .expect("munged (Debian's munge; scripts/bootstrap installs it)"),
        );
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "munged never served"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        for daemon in ["slurmctld", "slurmd"] {
            slurm.daemons.push(
                Command::new(daemon)
                    .arg("-D")
                    // gres.conf is looked for beside SLURM_CONF, not beside -f's file.
                    .env("SLURM_CONF", dir.join("slurm.conf"))
                    .stdout(Stdio::null())
                    .stderr(log(&format!("{daemon}.err")))
                    .spawn()
                    .expect("Debian's slurm-wlm (scripts/bootstrap installs it)"),
            );
        }
        let start = Instant::now();
        loop {
            let idle = slurm
                .command("sinfo")
                .args(["--noheader", "--format=%t"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle");
            if idle {
                return slurm;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the node never came up: {}",
                std::fs::read_to_string(dir.join("log/slurmctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A Slurm client command against this cluster.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.dir.join("slurm.conf"));
        command
    }

    /// The batch job's state as `sacct -c` (the completion log) reports it, once it ended
    /// and its processes are gone (a cancelled job is logged at once, and its processes have
    /// KillWait to finish).
    fn ended(&self, id: &str, within: Duration) -> String {
        let start = Instant::now();
        loop {
            // A job long gone is an error to squeue: not listed either.
            let listed = self
                .command("squeue")
                .args(["--noheader", "--jobs", id])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty());
            if listed {
                assert!(
                    start.elapsed() < within,
                    "batch job {id} still running after {within:?}"
                );
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            let out = run_ok(
                self.command("sacct")
                    .args(["-c", "-n", "-X", "-o", "JobID,State"]),
            );
            if let Some(state) = out
                .lines()
                .filter_map(|l| l.split_once(char::is_whitespace))
                .find(|(job, _)| job.trim() == id)
                .map(|(_, state)| state.trim().to_owned())
            {
                return state;
            }
            assert!(
                start.elapsed() < within,
                "batch job {id} still running after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // No job outlives the test: what is left is killed, and its end awaited.
        let _ = self
            .command("scancel")
            .args(["--signal=KILL", "--full", "--user=root"])
            .output();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20)
            && self
                .command("squeue")
                .arg("--noheader")
                .output()
                .is_ok_and(|o| !o.stdout.is_empty())
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

/// What a batch job needs: the tokens, the data, the binaries, and where its state goes.
struct Setup {
    dir: PathBuf,
    port: u16,
}

impl Setup {
    fn new(dir: &Path) -> Setup {
        for (name, token) in [
            ("submit-token", "submit-secret"),
            ("worker-token", "worker-secret"),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, token).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        run_ok(
            Command::new(binary("ladder"))
                .args(["dataset", "synth"])
                .arg(dir.join("data"))
                // Epochs of 96 steps: long enough, on an idle machine too, for a cancel to
                // land mid-run (at 32 steps a whole run took 3 s and finished first).
                .args(["--classes", "4", "--samples", "1536", "--shards", "4"]),
        );
        Setup {
            dir: dir.to_owned(),
            port: free_port(),
        }
    }

    fn spec(&self, name: &'static str, epochs: u32) -> PathBuf {
        TinyJob {
            name,
            epochs,
            stage_epochs: 1,
            sizes: (64, 96),
            batch: (16, 8),
            workers: (2, 2),
            checkpoint_every: 4,
        }
        .write(&self.dir)
    }

    /// `sbatch` of the script with two CPU workers on this node, and `env` on top.
    fn sbatch(&self, slurm: &Slurm, args: &[&Path], env: &[(&str, String)]) -> String {
        let mut command = slurm.command("sbatch");
        command
            .args(["--parsable", "--ntasks-per-node=2", "--cpus-per-task=1"])
            .arg(format!("--output={}/slurm-%j.out", self.dir.display()))
            .arg(format!("--chdir={}", self.dir.display()))
            .arg(deploy_dir().join("slurm/ladder.sbatch"))
            .args(args)
            .env("LADDER_BIN", binary("ladder").parent().unwrap())
            .env("LADDER_DEVICE", "cpu")
            .env("LADDER_RING_HOST", "127.0.0.1")
            .env("LADDER_PORT", self.port.to_string())
            .env("LADDER_STATE_DIR", self.dir.join("state"))
            .env("LADDER_SUBMIT_TOKEN_FILE", self.dir.join("submit-token"))
            .env("LADDER_WORKER_TOKEN_FILE", self.dir.join("worker-token"))
            .envs(env.iter().map(|(k, v)| (k, v)));
        run_ok(&mut command).trim().to_owned()
    }

    fn output(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("slurm-{id}.out"))).unwrap_or_default()
    }
}

#[test]
fn a_job_runs_to_completion_and_a_cancelled_one_resumes_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let slurm = Slurm::start(&dir.path().join("slurm"));
    let setup = Setup::new(dir.path());

    // Bad input stops the batch job at once, with one line that says why.
    let missing = dir.path().join("nowhere/worker-token");
    for (env, says) in [
        (
            vec![("LADDER_WORKER_TOKEN_FILE", missing.display().to_string())],
            "no token file at",
        ),
        (
            vec![(
                "LADDER_COORDINATOR",
                format!("http://127.0.0.1:{}", free_port()),
            )],
            "no coordinator answers at",
        ),
        (vec![("LADDER_DEVICE", "cuda".to_owned())], "no GPU on"),
    ] {
        let spec = setup.spec("refused", 1);
        let id = setup.sbatch(&slurm, &[&spec], &env);
        assert_eq!(slurm.ended(&id, Duration::from_secs(60)), "FAILED");
        let out = setup.output(&id);
        let reason: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("ladder.sbatch:"))
            .collect();
        assert!(reason.len() == 1 && reason[0].contains(says), "{out}");
    }

    // A whole job: the batch job ends with the training job's result.
    let spec = setup.spec("whole", 1);
    let id = setup.sbatch(&slurm, &[&spec], &[]);
    assert_eq!(
        slurm.ended(&id, Duration::from_secs(300)),
        "COMPLETED",
        "{}",
        setup.output(&id)
    );
    let out = setup.output(&id);
    assert!(out.contains("completed"), "{out}");

    // Cancelled mid-epoch: the workers checkpoint and leave; the job waits for workers.
    let spec = setup.spec("resumed", 3);
    let cancelled = setup.sbatch(&slurm, &[&spec], &[]);
    let job = {
        let record = dir.path().join(format!("state/slurm-{cancelled}.job"));
        let start = Instant::now();
        loop {
            if let Ok(job) = std::fs::read_to_string(&record) {
                break job.trim().to_owned();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}",
                setup.output(&cancelled)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let cli = |args: &[&str]| {
        Command::new(binary("ladder"))
            .args(args)
            .env(
                "LADDER_COORDINATOR",
                format!("http://127.0.0.1:{}", setup.port),
            )
            .env("LADDER_TOKEN_FILE", dir.path().join("submit-token"))
            .output()
            .unwrap()
    };
    // Until the training job's status passes `done`, while batch job `batch` drives it.
    let until_status = |done: &dyn Fn(&str) -> bool, batch: &str| {
        let start = Instant::now();
        loop {
            let status = String::from_utf8_lossy(&cli(&["status", &job]).stdout).into_owned();
            if done(&status) {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "{status}\n{}",
                setup.output(batch)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let step = |status: &str| {
        status
            .lines()
            .find(|l| l.starts_with("step "))
            .unwrap_or_default()
            .to_owned()
    };
    until_status(&|s| s.contains("epoch        2/3"), &cancelled);
    run_ok(slurm.command("scancel").arg(&cancelled));
    assert_eq!(
        slurm.ended(&cancelled, Duration::from_secs(180)),
        "CANCELLED"
    );
    let out = setup.output(&cancelled);
    assert!(out.contains("the workers checkpoint and leave"), "{out}");
    assert!(
        !out.contains("second SIGTERM: leaving now"),
        "one SIGTERM each: {out}"
    );
    // They left through the graceful path: the job went on from a checkpoint taken for them.
    assert!(
        out.contains("left on request; generation 1 ended, restoring from checkpoint"),
        "{out}"
    );

    // Resumed by a new batch job naming the training job, and stopped as at its time limit
    // (`--signal=B:TERM@300` signals the batch shell alone): the script has the workers
    // checkpoint and leave.
    let timed_out = setup.sbatch(&slurm, &[], &[("LADDER_JOB", job.clone())]);
    // Training in its own generation: the step moves.
    let started = until_status(
        &|s| s.contains("state        running") && s.contains("generation   2"),
        &timed_out,
    );
    until_status(&|s| step(s) != step(&started), &timed_out);
    // The workers inherit the worker token's file and nothing of the submit token's.
    let pids = run_ok(Command::new("pgrep").args(["-f", "ladder-worker --device"]));
    let mut workers = 0;
    for pid in pids.split_whitespace() {
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
        // Another test's ladder-worker (a device check, run beside this test) is not Slurm's.
        if !environ.contains("SLURM_JOB_ID=") {
            continue;
        }
        assert!(environ.contains("LADDER_WORKER_TOKEN_FILE="), "{environ}");
        assert!(!environ.contains("submit-token"), "{environ}");
        workers += 1;
    }
    assert_eq!(workers, 2, "{pids}");
    // What the script writes is its user's alone (umask 077).
    for written in std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
    {
        let mode = written.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{}: {mode:o}", written.path().display());
    }
    run_ok(
        slurm
            .command("scancel")
            .args(["--batch", "--signal=TERM"])
            .arg(&timed_out),
    );
    slurm.ended(&timed_out, Duration::from_secs(180));
    let out = setup.output(&timed_out);
    assert!(
        out.contains("left on request; generation 2 ended, restoring from checkpoint"),
        "{out}"
    );
    assert!(!out.contains("second SIGTERM: leaving now"), "{out}");

    // Resumed again, its coordinator killed while it trains: the script starts it again on
    // the same store, and the job continues to completion.
    let resumed = setup.sbatch(&slurm, &[], &[("LADDER_JOB", job.clone())]);
    let started = until_status(
        &|s| s.contains("state        running") && s.contains("generation   3"),
        &resumed,
    );
    until_status(&|s| step(s) != step(&started), &resumed);
    let store = dir.path().join("state/coordinator.redb");
    run_ok(
        Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("ladder-coordinator .*{}", store.display())),
    );
    assert_eq!(
        slurm.ended(&resumed, Duration::from_secs(300)),
        "COMPLETED",
        "{}",
        setup.output(&resumed)
    );
    let out = setup.output(&resumed);
    assert!(
        out.contains("the coordinator stopped (exit 137); starting it again"),
        "{out}"
    );
    // Every epoch's samples, once each, in the job's committed history (read back through a
    // coordinator on the batch jobs' store).
    let coordinator = CoordinatorProcess::start(
        &format!(
            "redb:{}",
            dir.path().join("state/coordinator.redb").display()
        ),
        &dir.path().join("logs"),
        &[],
    );
    let status = run_ok(
        Command::new(binary("ladder"))
            .args(["status", &job])
            .env("LADDER_COORDINATOR", coordinator.url())
            .env("LADDER_TOKEN", SUBMIT_TOKEN),
    );
    assert!(status.contains("state        completed"), "{status}");
    assert!(
        status.contains("trained      1536 x3 samples per epoch (epochs 1-3), 0 skipped"),
        "{status}"
    );
}
