//! Finding libnccl for a CUDA worker, and only one. cudarc loads NCCL by the name `libnccl.so`,
//! but torch's nvidia-nccl wheel ships only `libnccl.so.2` (in `site-packages/nvidia/nccl/lib`),
//! which libtorch_cuda loaded at start as a dependency. That copy must be the one cudarc loads
//! too: a second NCCL in the process (a system install's `libnccl.so`) breaks both (see
//! [`nccl::single_copy`]). When the name does not load, or loads another copy, the worker links
//! libtorch's copy (else `LADDER_NCCL_LIBRARY`, else the one beside the torch install) as
//! `libnccl.so` in a private directory and restarts itself once with that directory first on
//! `LD_LIBRARY_PATH` (the loader reads the variable only at start); the restarted worker loads
//! NCCL for good and removes the link.

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

/// The libnccl.so.2 to link as `libnccl.so`: libtorch's (mapped at start), else
/// `LADDER_NCCL_LIBRARY`, else the one beside the torch install.
fn locate(torch_copy: Option<PathBuf>) -> Option<PathBuf> {
    torch_copy
        .or_else(|| std::env::var_os("LADDER_NCCL_LIBRARY").map(PathBuf::from))
        .or_else(|| {
            mapped("libtorch_cuda.so").into_iter().find_map(|torch| {
                let candidate = torch.parent()?.join("../../nvidia/nccl/lib/libnccl.so.2");
                candidate.exists().then_some(candidate)
            })
        })
}

/// Returns when NCCL is loaded, and is the process's only NCCL; may restart the process (never
/// returns then); errors say what to set.
pub fn ensure_loadable() -> Result<(), String> {
    // The copy libtorch_cuda brought in at start, before anything else loads one.
    let torch_copy = mapped("libnccl.so").into_iter().next();
    let restarted = std::env::var_os(LINK_DIR);
    let loaded = match nccl::load() {
        Ok(()) => {
            if let Some(dir) = restarted {
                // Loaded for the life of the process: the link has done its work.
                let _ = std::fs::remove_dir_all(dir);
            }
            return Ok(());
        }
        // The usual case, torch's wheel shipping no `libnccl.so`, in words of its own: the
        // loader's message is advice for a user, and the worker takes that advice itself.
        Err(_) if nccl::available().is_err() => {
            "no libnccl.so on the loader's search path".to_owned()
        }
        Err(e) => e.to_string(),
    };
    if restarted.is_some() {
        return Err(format!(
            "NCCL is still not usable after linking libtorch's as libnccl.so: {loaded}"
        ));
    }
    let hint = "set LADDER_NCCL_LIBRARY to the path of libnccl.so.2 (site-packages/nvidia/nccl/lib of the torch install)";
    let library =
        locate(torch_copy).ok_or_else(|| format!("{loaded}; libnccl.so.2 not found: {hint}"))?;
    let dir = std::env::temp_dir().join(format!("ladder-nccl-{}", std::process::id()));
    link(&dir, &library).map_err(|e| format!("linking {}: {e}", library.display()))?;
    let mut search = OsString::from(dir.as_os_str());
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        search.push(":");
        search.push(old);
    }
    tracing::info!(library = %library.display(), why = %loaded, "restarting with libnccl.so linked in {}", dir.display());
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
