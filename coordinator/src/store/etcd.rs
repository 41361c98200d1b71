use super::{Store, StoreError, Write};
use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, LeaderKey,
    TlsOptions, Txn, TxnOp,
};
use ladder_proto::client::{error_chain, with_causes};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

const KEY_PREFIX: &str = "/ladder/";
/// The longest pause between two tries of an unreachable etcd.
const RETRY_AT_MOST: Duration = Duration::from_secs(2);
const ELECTION: &str = "/ladder-election/coordinator";

/// How much of etcd's history the coordinator keeps, and how often it drops the rest. etcd
/// keeps every past value until it is compacted: a coordinator that persists each running
/// job's progress every few seconds would otherwise fill etcd's space quota (2 GiB by default)
/// within weeks, after which etcd refuses every write.
#[derive(Clone, Copy, Debug)]
pub struct Compaction {
    /// Revisions kept behind the newest (nothing reads older ones).
    pub kept_revisions: i64,
    /// Writes between two compactions.
    pub every_writes: u64,
}

impl Default for Compaction {
    fn default() -> Compaction {
        Compaction {
            kept_revisions: 10_000,
            every_writes: 1_000,
        }
    }
}

/// The replicated store: an etcd v3 cluster. Several coordinators may run against it; the
/// one that wins the election leads, and every write it makes is conditional on still holding
/// the election key, so a deposed leader cannot overwrite its successor's state.
///
/// Each term of leadership writes through its own store ([`EtcdStore::lead`] returns it),
/// bound to the key that term won: a coordinator that lost its lease and won again later
/// writes through the new one, and whatever of the old term is still in flight fails.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    tls: Option<TlsOptions>,
    leader: Option<LeaderKey>,
    compaction: Compaction,
    writes: Arc<AtomicU64>,
}

/// Held by the leading coordinator. `lost` resolves when the leadership lease could not be
/// renewed: the coordinator must stop deciding then. Dropped, it stops renewing the lease and
/// revokes it, so that this coordinator's next campaign does not queue behind its own old key.
pub struct LeaderLease {
    pub lost: oneshot::Receiver<String>,
    renewing: tokio::task::JoinHandle<()>,
    election: Client,
    lease: i64,
}

impl Drop for LeaderLease {
    fn drop(&mut self) {
        self.renewing.abort();
        let (mut election, lease) = (self.election.clone(), self.lease);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A lease etcd already dropped (or an etcd that is down) leaves nothing to do.
            runtime.spawn(async move {
                let _ = election.lease_revoke(lease).await;
            });
        }
    }
}

/// TLS to etcd: the CA its certificate is checked against, and this coordinator's client
/// certificate and key (PEM files) for an etcd that authenticates its clients
/// (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> Result<TlsOptions, StoreError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| StoreError::Backend {
                store: "etcd".to_owned(),
                message: format!("cannot read {}: {e}", path.display()),
            })
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://HOST:PORT`; `https://` with `tls`).
    pub async fn connect(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
    ) -> Result<EtcdStore, StoreError> {
        let tls = tls.map(EtcdTls::options).transpose()?;
        let endpoints: Vec<String> = match tls {
            Some(_) => endpoints
                .iter()
                .map(|e| e.replacen("http://", "https://", 1))
                .collect(),
            None => endpoints.to_vec(),
        };
        let endpoints = endpoints.as_slice();
        let options = with_tls(
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(Duration::from_secs(5))
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2)),
            &tls,
        );
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| backend(endpoints, e))?;
        let store = EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
            tls,
            leader: None,
            compaction: Compaction::default(),
            writes: Arc::default(),
        };
        // Connecting is lazy: ask once so that a wrong address fails here, not later.
        store.get("meta/probe").await?;
        Ok(store)
    }

    /// Waits until this coordinator wins the election (announcing `address`), trying again
    /// for as long as etcd cannot be reached (backing off from 0.25 s to 2 s), each failure
    /// told to `waiting`; then keeps the leadership lease (`ttl_s` seconds) alive in the
    /// background. Returns the term's store (see [`EtcdStore`]) and its lease.
    pub async fn lead_when_possible(
        &self,
        address: &str,
        ttl_s: i64,
        waiting: impl Fn(&StoreError, Duration),
    ) -> (EtcdStore, LeaderLease) {
        let mut pause = Duration::from_millis(250);
        loop {
            match self.lead(address, ttl_s).await {
                Ok(term) => return term,
                Err(e) => {
                    waiting(&e, pause);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_AT_MOST);
                }
            }
        }
    }

    /// Waits until this coordinator wins the election (announcing `address`), then keeps the
    /// leadership lease (`ttl_s` seconds) alive in the background. Returns the term's store
    /// (see [`EtcdStore`]) and its lease.
    pub async fn lead(
        &self,
        address: &str,
        ttl_s: i64,
    ) -> Result<(EtcdStore, LeaderLease), StoreError> {
        let endpoints = self.endpoints.clone();
        // A campaign blocks until the current leader goes, so it runs on a client without the
        // per-request timeout of the store's client.
        let options = with_tls(
            ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2)),
            &self.tls,
        );
        let mut election = Client::connect(&endpoints, Some(options))
            .await
            .map_err(|e| backend(&endpoints, e))?;
        let lease = election
            .lease_grant(ttl_s, None)
            .await
            .map_err(|e| backend(&endpoints, e))?;
        let (mut keeper, mut responses) = election
            .lease_keep_alive(lease.id())
            .await
            .map_err(|e| backend(&endpoints, e))?;
        let (lost_tx, lost) = oneshot::channel();
        // Keep the lease alive while campaigning too: a standby may wait for hours.
        let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(200));
        let renewing = tokio::spawn(async move {
            let reason = loop {
                if let Err(e) = keeper.keep_alive().await {
                    break format!("cannot renew the leadership lease: {e}");
                }
                match tokio::time::timeout(period, responses.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => break "the leadership lease expired".to_owned(),
                    Ok(Ok(None)) => break "etcd closed the lease stream".to_owned(),
                    Ok(Err(e)) => break format!("cannot renew the leadership lease: {e}"),
                    Err(_) => break "etcd did not answer a lease renewal in time".to_owned(),
                }
                tokio::time::sleep(period).await;
            };
            let _ = lost_tx.send(reason);
        });
        // Held from here: should the campaign fail, the lease is let go with it.
        let held = LeaderLease {
            lost,
            renewing,
            election: election.clone(),
            lease: lease.id(),
        };
        let won = election
            .campaign(ELECTION, address, lease.id())
            .await
            .map_err(|e| backend(&endpoints, e))?;
        let term = EtcdStore {
            leader: won.leader().cloned(),
            ..self.clone()
        };
        Ok((term, held))
    }

    /// Sets how much history is kept (see [`Compaction`]).
    pub fn with_compaction(mut self, compaction: Compaction) -> EtcdStore {
        self.compaction = compaction;
        self
    }

    fn key(key: &str) -> String {
        format!("{KEY_PREFIX}{key}")
    }

    /// Runs `ops` as one transaction, on condition that this coordinator still holds the
    /// leadership it won (when it campaigned): a deposed leader's writes fail, all of them.
    async fn guarded(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        let txn = match &self.leader {
            None => Txn::new().and_then(ops),
            Some(leader) => Txn::new()
                .when([Compare::create_revision(
                    leader.key(),
                    CompareOp::Equal,
                    leader.rev(),
                )])
                .and_then(ops),
        };
        let response = kv.txn(txn).await.map_err(|e| backend(&self.endpoints, e))?;
        if !response.succeeded() {
            return Err(StoreError::NotLeader {
                store: self.describe(),
            });
        }
        if let Some(header) = response.header() {
            self.compact_now_and_then(header.revision()).await;
        }
        Ok(())
    }

    /// Every [`Compaction::every_writes`] writes, drops the history older than
    /// [`Compaction::kept_revisions`] behind `revision` (the newest). A failure only costs
    /// space until the next try, so it is logged, not returned.
    async fn compact_now_and_then(&self, revision: i64) {
        let Compaction {
            kept_revisions,
            every_writes,
        } = self.compaction;
        let writes = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if !writes.is_multiple_of(every_writes) || revision <= kept_revisions {
            return;
        }
        let mut kv = self.client.kv_client();
        match kv.compact(revision - kept_revisions, None).await {
            // Someone else (etcd's own auto-compaction, an operator) went further already.
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => {}
            Err(e) => tracing::warn!(
                "cannot compact etcd's history: {}",
                backend(&self.endpoints, e)
            ),
            Ok(_) => {}
        }
    }
}

fn with_tls(options: ConnectOptions, tls: &Option<TlsOptions>) -> ConnectOptions {
    match tls {
        Some(tls) => options.with_tls(tls.clone()),
        None => options,
    }
}

/// Keys listed per request (fewer when they do not fit one message).
const LIST_PAGE: i64 = 256;

/// The end of the range of keys that start with `prefix`: the prefix with its last byte that
/// is not 0xff incremented (and what follows it dropped); `[0]` (every key) if there is none.
fn range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn backend(endpoints: &[String], e: etcd_client::Error) -> StoreError {
    // etcd-client's own text for a gRPC status or a transport failure carries Rust debug dumps
    // (metadata maps, nested structs): keep what a person can act on.
    let message = match &e {
        etcd_client::Error::GRpcStatus(status) => with_causes(
            format!("{:?}: {}", status.code(), status.message()),
            std::error::Error::source(status),
        ),
        etcd_client::Error::TransportError(transport) => {
            format!("cannot reach etcd: {}", error_chain(transport))
        }
        other => other.to_string(),
    };
    StoreError::Backend {
        store: format!("etcd {}", endpoints.join(",")),
        message,
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let response = self
            .client
            .kv_client()
            .get(Self::key(key), None)
            .await
            .map_err(|e| backend(&self.endpoints, e))?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn transaction(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let ops = writes
            .into_iter()
            .map(|write| match write {
                Write::Put(key, value) => TxnOp::put(Self::key(&key), value, None),
                Write::Delete(key) => TxnOp::delete(Self::key(&key), None),
            })
            .collect();
        self.guarded(ops).await
    }

    /// In pages, all at the revision of the first: etcd answers a range in one message, which
    /// its clients refuse past 4 MiB, and a store of many jobs holds far more. A page too large
    /// for one message (a few large records) is asked again at half the count.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = Self::key(prefix).into_bytes();
        let end = range_end(&start);
        let mut kv = self.client.kv_client();
        let (mut from, mut page, mut revision) = (start, LIST_PAGE, 0);
        let mut listed = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(revision);
            let response = match kv.get(from.clone(), Some(options)).await {
                Ok(response) => response,
                Err(etcd_client::Error::GRpcStatus(status))
                    if page > 1 && status.message().contains("too large") =>
                {
                    page /= 2;
                    continue;
                }
                Err(e) => return Err(backend(&self.endpoints, e)),
            };
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            for kv in response.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                let key = key.strip_prefix(KEY_PREFIX).unwrap_or(&key).to_owned();
                listed.push((key, kv.value().to_vec()));
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok(listed),
            }
        }
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }
}
