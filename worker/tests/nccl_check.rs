//! `ladder-worker --check-nccl`, the real binary: it finds torch's NCCL and names it (restarting
//! itself with the library linked where cudarc looks, a link it then removes), then checks the
//! GPU. Without a GPU it must
//! stop there with a clear error; with one, the whole check must pass.

use ladder_testkit::binary;
use std::process::Command;

fn check(device: &str) -> (Option<i32>, String, String) {
    let output = Command::new(binary("ladder-worker"))
        .args(["--device", device, "--check-nccl"])
        .env_remove("LADDER_NCCL_LIBRARY")
        .output()
        .expect("running ladder-worker");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn reports_torchs_nccl_then_checks_the_gpu() {
    let (code, stdout, stderr) = check("cuda:0");
    let library = stdout
        .lines()
        .find_map(|l| l.strip_prefix("library: "))
        .unwrap_or_else(|| panic!("no library line:\n{stdout}\n{stderr}"));
    assert!(library.starts_with("NCCL 2."), "{library}");
    assert!(
        library.contains("nvidia/nccl/lib/libnccl.so.2"),
        "not torch's nvidia-nccl wheel: {library}"
    );
    // The link the worker restarted with is gone once NCCL is loaded.
    if let Some((_, rest)) = stderr.split_once("libnccl.so linked in ") {
        let dir: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && !c.is_control())
            .collect();
        assert!(dir.contains("ladder-nccl-"), "{stderr}");
        assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    }
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
fn needs_a_cuda_device() {
    let (code, _, stderr) = check("cpu");
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--check-nccl needs --device cuda:N"),
        "{stderr}"
    );
}
