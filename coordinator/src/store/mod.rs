//! Where the coordinator remembers everything: a small key-value interface with two real
//! implementations, an embedded redb file (the default, one coordinator) and an etcd cluster
//! (a replicated control plane with leader election).
//!
//! Keys are `/`-separated paths (`jobs/job-000001`, `workers/w-...`); values are JSON records
//! owned by [`crate::state`]. Writes come in transactions ([`Store::apply`]): all of them or
//! none, durable when the call returns (redb commits with fsync, etcd through raft). A
//! coordinator that is no longer the leader cannot write: the etcd store makes every
//! transaction conditional on the leader's election key.

mod etcd;
mod redb;

pub use self::etcd::{Compaction, EtcdStore, EtcdTls, LeaderLease};
pub use self::redb::RedbStore;

use async_trait::async_trait;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {store}: {message}")]
    Backend { store: String, message: String },
    #[error("store {store}: this coordinator is no longer the leader")]
    NotLeader { store: String },
    #[error("invalid store address {0:?}: use redb:PATH or etcd://HOST:PORT[,HOST:PORT...]")]
    Address(String),
    #[error(
        "store {store}: a transaction of {writes} writes is more than the {MAX_WRITES} allowed"
    )]
    TooLarge { store: String, writes: usize },
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Write {
    /// The bytes it carries: its key and value.
    pub fn bytes(&self) -> usize {
        match self {
            Write::Put(key, value) => key.len() + value.len(),
            Write::Delete(key) => key.len(),
        }
    }
}

/// The most writes one transaction may hold: etcd's default `--max-txn-ops`.
pub const MAX_WRITES: usize = 128;

#[async_trait]
pub trait Store: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Makes every write of `writes` or none of them (at most [`MAX_WRITES`]).
    async fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        if writes.len() > MAX_WRITES {
            return Err(StoreError::TooLarge {
                store: self.describe(),
                writes: writes.len(),
            });
        }
        self.transaction(writes).await
    }
    /// The backend's transaction of 1 to [`MAX_WRITES`] writes: all of them or none.
    async fn transaction(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.apply(vec![Write::Put(key.to_owned(), value)]).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.apply(vec![Write::Delete(key.to_owned())]).await
    }
    /// Every key under `prefix` with its value, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Where the store lives, for messages.
    fn describe(&self) -> String;
}

/// A parsed `--store` address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAddress {
    Redb(std::path::PathBuf),
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreAddress {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        if let Some(path) = s.strip_prefix("redb:") {
            if path.is_empty() {
                return Err(StoreError::Address(s.to_owned()));
            }
            return Ok(StoreAddress::Redb(path.into()));
        }
        if let Some(hosts) = s.strip_prefix("etcd://") {
            let endpoints: Vec<String> = hosts
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| format!("http://{h}"))
                .collect();
            if endpoints.is_empty() || hosts.split(',').any(|h| !h.contains(':')) {
                return Err(StoreError::Address(s.to_owned()));
            }
            return Ok(StoreAddress::Etcd(endpoints));
        }
        Err(StoreError::Address(s.to_owned()))
    }
}

pub type SharedStore = Arc<dyn Store>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_addresses_parse_or_say_what_is_allowed() {
        assert_eq!(
            "redb:/tmp/x.redb".parse::<StoreAddress>().unwrap(),
            StoreAddress::Redb("/tmp/x.redb".into())
        );
        assert_eq!(
            "etcd://a:1,b:2".parse::<StoreAddress>().unwrap(),
            StoreAddress::Etcd(vec!["http://a:1".into(), "http://b:2".into()])
        );
        for bad in ["", "redb:", "etcd://", "etcd://nohost", "postgres://x"] {
            let err = bad.parse::<StoreAddress>().unwrap_err().to_string();
            assert!(err.contains("redb:PATH"), "{err}");
        }
    }
}
