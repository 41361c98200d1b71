//! What the tests of `deploy/` share: hosts on one machine (network namespaces joined by a
//! bridge, [`hosts`]), and systemd's unit and environment files read as systemd reads them, so
//! that a test can run exactly the command line a unit would run ([`systemd`]).

pub mod hosts;
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

/// A small CPU job for the tests: `tiny` on the synthetic dataset at `data/manifest.json`
/// beside the spec (`ladder dataset synth` with 4 classes), in stages of `stage_epochs`
/// epochs from `sizes.0` to `sizes.1` px.
pub struct TinyJob {
    pub name: &'static str,
    pub epochs: u32,
    pub stage_epochs: u32,
    pub sizes: (u32, u32),
    /// The global batch and the micro-batch.
    pub batch: (u32, u32),
    pub workers: (u32, u32),
    pub checkpoint_every: u32,
}

impl TinyJob {
    /// Writes the spec as `dir/NAME.toml`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("{}.toml", self.name));
        let spec = format!(
            "[job]\nname = \"{name}\"\n[model]\nvariant = \"tiny\"\nclasses = 4\n\
             [data]\nmanifest = \"data/manifest.json\"\ndecode_threads = 1\n\
             [schedule]\nepochs = {epochs}\nstage_epochs = {stage}\nmin_size = {min}\n\
             max_size = {max}\neval_size = {max}\nmin_dropout = 0.0\nmax_dropout = 0.1\n\
             randaugment = \"torchvision\"\nmin_randaugment = 2\nmax_randaugment = 4\n[optimizer]\nwarmup_epochs = 0\n\
             [batch]\nglobal = {global}\nmicro_at_max_size = {micro}\nmicro_max = {micro}\n\
             [checkpoint]\ndir = \"checkpoints\"\nevery_steps = {every}\n\
             [workers]\nmin = {least}\nmax = {most}\n",
            name = self.name,
            epochs = self.epochs,
            stage = self.stage_epochs,
            min = self.sizes.0,
            max = self.sizes.1,
            global = self.batch.0,
            micro = self.batch.1,
            every = self.checkpoint_every,
            least = self.workers.0,
            most = self.workers.1,
        );
        std::fs::write(&path, spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}
