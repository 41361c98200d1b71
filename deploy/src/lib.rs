//! What the tests of `deploy/` share: reading systemd unit and environment files as systemd
//! reads them, so that a test can run exactly the command line a unit would run.

pub mod systemd;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `deploy/` directory of this checkout.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Runs `command`, which must succeed (else the panic shows what it printed); its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (scripts/bootstrap installs it)"));
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
