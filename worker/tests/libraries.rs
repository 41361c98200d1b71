//! The NCCL and CUDA runtime a worker calls are the copies libtorch loaded, bound without
//! loading anything (`ladder_collective::libraries`). The torch wheel's libraries load without
//! a GPU, so the binding is checked here in full: the versions against the wheels' own
//! metadata (read by Python, not through Ladder), one copy of each in the process after
//! binding, and a unique id made (NCCL makes one without a device: it needs only a network
//! interface for its bootstrap socket).

use ladder_collective::libraries;
use ladder_collective::nccl;

/// `nvidia-nccl-cu13 2.28.9` and `nvidia-cuda-runtime 13.0.96` as `NCCL 2.28.9, CUDA runtime
/// 13.0`, from the installed wheels' metadata.
fn wheel_versions() -> String {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("versions.py");
    std::fs::write(
        &script,
        "import importlib.metadata as m\n\
         nccl = m.version('nvidia-nccl-cu13')\n\
         cudart = '.'.join(m.version('nvidia-cuda-runtime').split('.')[:2])\n\
         print(f'NCCL {nccl}, CUDA runtime {cudart}')\n",
    )
    .unwrap();
    ladder_testkit::run_python(&script, &[]).trim().to_owned()
}

#[test]
fn nccl_and_the_cuda_runtime_are_libtorchs_own_copies_bound_once() {
    let versions = nccl::versions().expect("binding libtorch's NCCL and CUDA runtime");
    eprintln!("bound: {versions}");
    assert!(
        versions.starts_with(&format!("{}, driver ", wheel_versions())),
        "{versions} is not the wheels' {}",
        wheel_versions()
    );
    let nccl = libraries::nccl().unwrap();
    let runtime = libraries::runtime().unwrap();
    eprintln!(
        "from {} and {}",
        nccl.path.display(),
        runtime.path.display()
    );
    assert!(
        nccl.path.ends_with("nvidia/nccl/lib/libnccl.so.2"),
        "{}",
        nccl.path.display()
    );
    assert!(
        runtime
            .path
            .to_string_lossy()
            .contains("/nvidia/cu13/lib/libcudart.so."),
        "{}",
        runtime.path.display()
    );
    let id = nccl::unique_id().expect("a unique id without a device");
    assert!(id.iter().any(|&b| b != 0), "an empty unique id");
    // After every call above: still exactly one of each in the process.
    for (prefix, bound) in [("libnccl.so", &nccl.path), ("libcudart.so", &runtime.path)] {
        let mapped = libraries::mapped(prefix);
        eprintln!("mapped {prefix}*: {mapped:?}");
        assert_eq!(mapped, std::slice::from_ref(bound), "{prefix}");
    }
}
