//! Finding libnccl for a CUDA worker. cudarc loads NCCL by the name `libnccl.so`, but torch's
//! nvidia-nccl wheel ships only `libnccl.so.2` (in `site-packages/nvidia/nccl/lib`, which
//! libtorch_cuda already loaded as a dependency). If the name does not load, the worker finds
//! that library — `LADDER_NCCL_LIBRARY` if set, else the copy this process already mapped, else
//! the one beside the torch install — links it as `libnccl.so` in a private directory, and
//! restarts itself once with that directory first on `LD_LIBRARY_PATH` (the loader reads the
//! variable only at start); the restarted worker loads NCCL for good and removes the link. It
//! does the same when `libnccl.so` resolves to another copy than
//! the one libtorch loaded (a system CUDA install), so one process never holds two NCCLs.

use ladder_collective::nccl;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Set on the restart: the private directory holding the `libnccl.so` link, removed once NCCL
/// is loaded for good.
const LINK_DIR: &str = "LADDER_NCCL_LINK_DIR";

/// Libraries this process has mapped whose file name starts with `prefix`.
pub fn mapped(prefix: &str) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut found: Vec<PathBuf> = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .map(PathBuf::from)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

fn locate() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LADDER_NCCL_LIBRARY") {
        return Some(PathBuf::from(path));
    }
    if let Some(path) = mapped("libnccl.so").into_iter().next() {
        return Some(path);
    }
    mapped("libtorch_cuda.so").into_iter().find_map(|torch| {
        let candidate = torch.parent()?.join("../../nvidia/nccl/lib/libnccl.so.2");
        candidate.exists().then_some(candidate)
    })
}

/// Returns when NCCL loads; may restart the process (never returns then); errors say what to
/// set.
pub fn ensure_loadable() -> Result<(), String> {
    // The copy libtorch_cuda brought in, before anything else loads one.
    let torch_copy = mapped("libnccl.so").into_iter().next();
    if nccl::available().is_ok() {
        // Another libnccl.so on the search path (a system CUDA install, say) would put two
        // NCCLs of different versions in one process: use libtorch's unless told otherwise.
        let loaded = mapped("libnccl.so");
        let same = torch_copy
            .as_ref()
            .is_none_or(|t| loaded.iter().all(|p| p == t));
        if same || std::env::var_os("LADDER_NCCL_LIBRARY").is_some() {
            if let Some(dir) = std::env::var_os(LINK_DIR) {
                // Loaded for the life of the process: the link has done its work.
                nccl::load().map_err(|e| e.to_string())?;
                let _ = std::fs::remove_dir_all(dir);
            }
            return Ok(());
        }
    }
    let hint = "set LADDER_NCCL_LIBRARY to the path of libnccl.so.2 (site-packages/nvidia/nccl/lib of the torch install)";
    if std::env::var_os(LINK_DIR).is_some() {
        return Err(format!(
            "NCCL still cannot be loaded after linking it as libnccl.so: {hint}"
        ));
    }
    let library = locate().ok_or_else(|| format!("libnccl.so.2 not found: {hint}"))?;
    let dir = std::env::temp_dir().join(format!("ladder-nccl-{}", std::process::id()));
    link(&dir, &library).map_err(|e| format!("linking {}: {e}", library.display()))?;
    let mut search = OsString::from(dir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        search.push(":");
        search.push(old);
    }
    tracing::info!(library = %library.display(), "restarting with libnccl.so linked in {}", dir.display());
    let error = std::os::unix::process::CommandExt::exec(
        std::process::Command::new("/proc/self/exe")
            .args(std::env::args_os().skip(1))
            .env("LD_LIBRARY_PATH", search)
            .env(LINK_DIR, &dir),
    );
    Err(format!("restarting the worker: {error}"))
}

fn link(dir: &Path, library: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = dir.join("libnccl.so");
    let _ = std::fs::remove_file(&name);
    std::os::unix::fs::symlink(library, name)
}
