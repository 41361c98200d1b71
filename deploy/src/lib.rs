//! What the tests of `deploy/` share: reading systemd unit and environment files as systemd
//! reads them, so that a test can run exactly the command line a unit would run.

pub mod systemd;

use std::path::{Path, PathBuf};

/// The `deploy/` directory of this checkout.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}
