//! Ladder's shared core: what coordinator and worker must agree on, with no libtorch and no
//! networking. The job spec ([`spec`]), the stage plan ([`stage`]), the sample plan
//! ([`sample`]), the dataset manifest and shard index ([`dataset`], [`indexing`], [`sample_index`]), and the deterministic
//! random streams they are built on ([`rng`]), the learning rate ([`learning_rate`]), where checkpoints live ([`location`]), the recipe card ([`recipe`]), tokens
//! read from files ([`token`]), and small files read to a bound ([`files`]).

pub mod dataset;
pub mod files;
pub mod indexing;
pub mod learning_rate;
pub mod location;
pub mod logging;
pub mod recipe;
pub mod rng;
pub mod sample;
pub mod sample_index;
pub mod spec;
pub mod stage;
pub mod token;

/// `text` as a message quotes it: cut short after 80 characters, so that a megabyte of bad
/// input is not echoed back whole.
pub fn cut(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

/// How many threads work that mostly waits on storage runs on: one per core, and at least 8,
/// since on a shared file system each read waits on the network more than on a core (indexing
/// shards, importing a dataset).
pub fn storage_threads() -> usize {
    const AT_LEAST: usize = 8;
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .max(AT_LEAST)
}
