//! The `ladder-worker` binary's own checks, before it joins a coordinator.
//!
//! `--check-nccl`: it names the NCCL and CUDA runtime it bound (torch's, which libtorch
//! loaded), never loads a second NCCL, then checks the GPU. Without a GPU it must stop there with a clear error; with one, the whole
//! check must pass.

use ladder_testkit::binary;
use std::process::Command;

fn check(device: &str) -> (Option<i32>, String, String) {
    check_with(device, |_| {})
}

fn check_with(device: &str, setup: impl FnOnce(&mut Command)) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary("ladder-worker"));
    command.args(["--device", device, "--check-nccl"]);
    setup(&mut command);
    let output = command.output().expect("running ladder-worker");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The files the worker says it bound NCCL and the CUDA runtime from.
fn bound_from(stdout: &str, stderr: &str) -> (String, String) {
    let library = stdout
        .lines()
        .find_map(|l| l.strip_prefix("library: "))
        .unwrap_or_else(|| panic!("no library line:\n{stdout}\n{stderr}"));
    assert!(library.starts_with("NCCL 2."), "{library}");
    let (_, files) = library
        .split_once("; bound from ")
        .unwrap_or_else(|| panic!("no files named: {library}"));
    let (nccl, runtime) = files
        .split_once(" and ")
        .unwrap_or_else(|| panic!("not two files: {library}"));
    (nccl.to_owned(), runtime.to_owned())
}

/// Without a GPU the check ends at the device; with one, it passes.
fn assert_ends_at_the_device(code: Option<i32>, stdout: &str, stderr: &str) {
    if tch::Cuda::device_count() == 0 {
        assert_eq!(code, Some(2), "{stdout}\n{stderr}");
        assert!(
            stderr.contains("--device cuda:0: this machine has 0 CUDA device(s)"),
            "{stderr}"
        );
    } else {
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        assert!(stdout.contains("NCCL check passed on cuda:0"), "{stdout}");
    }
}

#[test]
fn reports_torchs_nccl_then_checks_the_gpu() {
    let (code, stdout, stderr) = check("cuda:0");
    let (nccl, runtime) = bound_from(&stdout, &stderr);
    assert!(
        nccl.ends_with("nvidia/nccl/lib/libnccl.so.2"),
        "not torch's nvidia-nccl wheel: {nccl}"
    );
    assert!(runtime.contains("libcudart.so."), "{runtime}");
    assert_ends_at_the_device(code, &stdout, &stderr);
}

/// A system install's `libnccl.so` first on the search path (here a copy of torch's: another
/// file, which the loader would map a second time) is never loaded: the worker loads nothing
/// by name, it binds what libtorch loaded.
#[test]
fn a_second_nccl_on_the_search_path_is_left_out() {
    let torch_copy = ladder_collective::libraries::mapped("libnccl.so.2")
        .into_iter()
        .next()
        .expect("libtorch_cuda loads torch's libnccl.so.2 into this test too");
    let system = tempfile::tempdir().expect("temp dir");
    let second = system.path().join("libnccl.so");
    std::fs::copy(&torch_copy, &second).expect("copying libnccl");
    let (code, stdout, stderr) = check_with("cuda:0", |command| {
        command.env("LD_LIBRARY_PATH", system.path());
    });
    let (nccl, _) = bound_from(&stdout, &stderr);
    assert!(nccl.ends_with("nvidia/nccl/lib/libnccl.so.2"), "{nccl}");
    assert!(
        !stdout.contains(&second.display().to_string()) && !stderr.contains("two NCCL"),
        "{stdout}\n{stderr}"
    );
    assert_ends_at_the_device(code, &stdout, &stderr);
}

#[test]
fn needs_a_cuda_device() {
    let (code, _, stderr) = check("cpu");
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--check-nccl needs --device cuda:N"),
        "{stderr}"
    );
}

/// Values that would exhaust memory or threads are refused by name, before anything starts.
#[test]
fn flags_out_of_range_are_refused() {
    for (flag, value, allowed) in [
        ("--threads", "100000", "0..=1024"),
        ("--collective-timeout-s", "0", "1.."),
    ] {
        let output = Command::new(binary("ladder-worker"))
            .arg(format!("{flag}={value}"))
            .output()
            .expect("running ladder-worker");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(allowed),
            "{flag} {value}: {stderr}"
        );
    }
}

/// A worker takes its share of the node's cores: as many as the launcher says share the node
/// (torchrun's LOCAL_WORLD_SIZE here), and says so before it connects anywhere.
#[test]
fn a_worker_takes_its_share_of_the_nodes_cores_and_says_so() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut worker = Command::new(binary("ladder-worker"))
        .args(["--coordinator", "http://127.0.0.1:9", "--token", "t"])
        .env("LOCAL_WORLD_SIZE", "2")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("running ladder-worker");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let _ = worker.kill();
    let output = worker.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let share = (cores / 2).max(1);
    assert!(
        stderr.contains(&format!(
            "threads: {share} for libtorch, {share} for decoding"
        )) && stderr.contains(&format!(
            "{cores} cores / 2 worker(s) on this node (LOCAL_WORLD_SIZE=2)"
        )),
        "{stderr}"
    );
}

/// `scripts/gpu-check --dry-run`: the device check's phases on the CPU, so that the script a
/// lent GPU's few minutes depend on cannot rot. Every phase ends in a verdict; those that need
/// a GPU say they were skipped; the logs go straight into $OUT.
#[test]
fn the_gpu_check_runs_its_phases_dry_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let bin = binary("ladder-worker").parent().unwrap().to_owned();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check");
    let run = Command::new(script)
        .arg("--dry-run")
        .env("LADDER_GPU_CHECK_BIN", &bin)
        .env("LADDER_GPU_CHECK_WORK", work.path())
        .env("LADDER_PYTHON", ladder_testkit::venv_python())
        .env("OUT", out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let verdicts = std::fs::read_to_string(out.path().join("verdicts.txt")).unwrap();
    let phases: Vec<&str> = verdicts
        .lines()
        .map(|l| l.split(':').next().unwrap_or(l))
        .collect();
    assert_eq!(
        phases,
        [
            "PASS environment",
            "SKIP library binding",
            "SKIP NCCL kernel",
            "PASS training",
            "PASS kill and restore",
            "PASS throughput",
        ],
        "{verdicts}"
    );
    for log in ["worker.log", "coordinator.log", "watch.txt", "peer.jsonl"] {
        assert!(out.path().join(log).is_file(), "{log} is in $OUT");
    }
    // Past its deadline a phase is not started: the check stops there and says why.
    let late =
        Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpu-check"))
            .arg("--dry-run")
            .env("LADDER_GPU_CHECK_BIN", &bin)
            .env("LADDER_GPU_CHECK_WORK", work.path())
            .env("LADDER_PYTHON", ladder_testkit::venv_python())
            .env("LADDER_GPU_CHECK_S", "3")
            .env("OUT", out.path())
            .output()
            .unwrap();
    assert_eq!(late.status.code(), Some(1));
    let verdicts = std::fs::read_to_string(out.path().join("verdicts.txt")).unwrap();
    assert!(
        verdicts.ends_with("FAIL training: no time left of the 3 s deadline\n"),
        "{verdicts}"
    );
}
