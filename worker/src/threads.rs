//! How many threads one worker takes: its share of the node's cores. A node runs a worker per
//! GPU, and each defaulting to every core (libtorch's intra-op pool, the decode threads) would
//! put eight times the cores' worth of threads on an eight-GPU node. The share is the cores
//! divided by the workers on the node, as the launcher tells them (torchrun's
//! `LOCAL_WORLD_SIZE`, Slurm's `SLURM_NTASKS_PER_NODE`), else by the GPUs this process sees; a
//! CPU worker with no launcher takes every core. Flags (`--threads`, `data.decode_threads`)
//! override it.

use std::sync::OnceLock;

/// The threads a worker takes, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub threads: usize,
    /// The workers sharing the node (1: this one alone, libtorch's own default stands).
    pub workers: usize,
    pub why: String,
}

/// This process's share, set once at start (see [`set`]); every core until then.
static SHARE: OnceLock<Share> = OnceLock::new();

/// The share of `cores` for a worker, from the launcher's variables (`env`) or the GPUs this
/// process sees (`gpus`, 0 on a CPU worker).
pub fn share(cores: usize, env: impl Fn(&str) -> Option<String>, gpus: usize) -> Share {
    // "8", or Slurm's "8(x2)" (8 tasks on each of 2 nodes).
    let count = |name: &str| {
        env(name).and_then(|v| {
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .map(|n| (n, v))
        })
    };
    let (workers, why) = if let Some((n, v)) = count("LOCAL_WORLD_SIZE") {
        (n, format!("LOCAL_WORLD_SIZE={v}"))
    } else if let Some((n, v)) = count("SLURM_NTASKS_PER_NODE") {
        (n, format!("SLURM_NTASKS_PER_NODE={v}"))
    } else if gpus > 0 {
        (gpus, format!("{gpus} GPU(s) visible"))
    } else {
        (1, "a CPU worker, no launcher".to_owned())
    };
    let threads = (cores / workers).max(1);
    Share {
        threads,
        workers,
        why: format!("{cores} cores / {workers} worker(s) on this node ({why})"),
    }
}

/// Sets this process's share (once; later calls keep the first).
pub fn set(share: Share) {
    let _ = SHARE.set(share);
}

/// This process's share of the node's cores.
pub fn per_worker() -> usize {
    SHARE
        .get()
        .map(|s| s.threads)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_launcher_then_the_gpus_say_how_many_workers_share_the_node() {
        let torchrun = share(64, env(&[("LOCAL_WORLD_SIZE", "8")]), 8);
        assert_eq!(torchrun.threads, 8);
        assert!(
            torchrun.why.contains("LOCAL_WORLD_SIZE=8"),
            "{}",
            torchrun.why
        );
        let slurm = share(96, env(&[("SLURM_NTASKS_PER_NODE", "4(x2)")]), 1);
        assert_eq!(slurm.threads, 24);
        assert!(
            slurm.why.contains("96 cores / 4 worker(s)"),
            "{}",
            slurm.why
        );
        assert_eq!(
            share(32, env(&[]), 8).threads,
            4,
            "one worker per visible GPU"
        );
        assert_eq!(share(16, env(&[]), 0).threads, 16, "a lone CPU worker");
        assert_eq!(
            share(4, env(&[("LOCAL_WORLD_SIZE", "8")]), 8).threads,
            1,
            "at least one"
        );
        let nonsense = share(16, env(&[("LOCAL_WORLD_SIZE", "many")]), 2);
        assert_eq!(nonsense.threads, 8, "an unreadable count is passed over");
    }
}
