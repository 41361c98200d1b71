//! One suite, run against both real stores: the embedded redb file and an etcd server.

use ladder_coordinator::store::{
    Compaction, EtcdStore, EtcdTls, MAX_WRITES, RedbStore, Store, StoreError, Write,
};
use ladder_testkit::Etcd;

async fn suite(store: &dyn Store) {
    assert_eq!(store.get("jobs/a").await.unwrap(), None);
    store.put("jobs/a", b"1".to_vec()).await.unwrap();
    store.put("jobs/b", b"2".to_vec()).await.unwrap();
    store.put("jobsx/c", b"3".to_vec()).await.unwrap();
    store.put("workers/w", b"4".to_vec()).await.unwrap();
    assert_eq!(store.get("jobs/a").await.unwrap(), Some(b"1".to_vec()));

    store.put("jobs/a", b"10".to_vec()).await.unwrap();
    let jobs = store.list("jobs/").await.unwrap();
    assert_eq!(
        jobs,
        vec![
            ("jobs/a".to_owned(), b"10".to_vec()),
            ("jobs/b".to_owned(), b"2".to_vec())
        ],
        "prefix listing is exact and ordered"
    );
    store.delete("jobs/a").await.unwrap();
    store.delete("jobs/never").await.unwrap();
    assert_eq!(store.get("jobs/a").await.unwrap(), None);
    assert_eq!(store.list("jobs/").await.unwrap().len(), 1);
    assert!(store.list("nothing/").await.unwrap().is_empty());

    // A transaction: every write or none.
    store
        .apply(vec![
            Write::Put("jobs/t".into(), b"t".to_vec()),
            Write::Put("workers/t".into(), b"w".to_vec()),
            Write::Delete("jobs/b".into()),
        ])
        .await
        .unwrap();
    assert_eq!(store.get("jobs/t").await.unwrap(), Some(b"t".to_vec()));
    assert_eq!(store.get("workers/t").await.unwrap(), Some(b"w".to_vec()));
    assert_eq!(store.get("jobs/b").await.unwrap(), None);
    let too_many: Vec<Write> = (0..=MAX_WRITES)
        .map(|i| Write::Put(format!("jobs/many-{i}"), Vec::new()))
        .collect();
    let err = store.apply(too_many).await.unwrap_err();
    assert!(matches!(err, StoreError::TooLarge { .. }), "{err}");
    assert_eq!(store.get("jobs/many-0").await.unwrap(), None);
    store.delete("jobs/t").await.unwrap();
    store.put("jobs/b", b"2".to_vec()).await.unwrap();

    let big = vec![7u8; 512 * 1024];
    store.put("jobs/big", big.clone()).await.unwrap();
    assert_eq!(store.get("jobs/big").await.unwrap(), Some(big));
}

#[tokio::test]
async fn redb_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/ladder.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        suite(&store).await;
    }
    // Reopened, the data is still there.
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.get("jobs/b").await.unwrap(), Some(b"2".to_vec()));
}

#[tokio::test]
async fn redb_store_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ladder.redb");
    let _first = RedbStore::open(&path).unwrap();
    let err = RedbStore::open(&path)
        .err()
        .expect("a second open must fail");
    assert!(err.to_string().contains("ladder.redb"), "{err}");
}

#[tokio::test]
async fn etcd_store() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[format!("http://{}", etcd.endpoint)], None)
        .await
        .unwrap();
    suite(&store).await;
}

#[tokio::test]
async fn the_etcd_store_compacts_the_history_it_no_longer_needs() {
    let etcd = Etcd::start();
    let endpoints = [format!("http://{}", etcd.endpoint)];
    let store = EtcdStore::connect(&endpoints, None)
        .await
        .unwrap()
        .with_compaction(Compaction {
            kept_revisions: 10,
            every_writes: 5,
        });
    for i in 0..40u32 {
        store.put("jobs/a", i.to_be_bytes().to_vec()).await.unwrap();
    }
    assert_eq!(
        store.get("jobs/a").await.unwrap(),
        Some(39u32.to_be_bytes().to_vec())
    );
    let mut raw = etcd_client::Client::connect(endpoints, None).await.unwrap();
    let old = raw
        .get(
            "/ladder/jobs/a",
            Some(etcd_client::GetOptions::new().with_revision(2)),
        )
        .await
        .expect_err("revision 2 is long compacted");
    assert!(old.to_string().contains("compacted"), "{old}");
    let newest = raw.get("/ladder/jobs/a", None).await.unwrap();
    let recent = newest.header().unwrap().revision() - 5;
    raw.get(
        "/ladder/jobs/a",
        Some(etcd_client::GetOptions::new().with_revision(recent)),
    )
    .await
    .expect("recent history is kept");
}

#[tokio::test]
async fn etcd_store_unreachable_is_a_clear_error() {
    let port = ladder_testkit::free_port();
    let err = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], None)
        .await
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, StoreError::Backend { .. }));
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[tokio::test]
async fn a_deposed_etcd_leader_cannot_write() {
    let etcd = Etcd::start();
    let endpoints = [format!("http://{}", etcd.endpoint)];
    let candidate = EtcdStore::connect(&endpoints, None).await.unwrap();
    let (leader, _lease) = candidate.lead("127.0.0.1:1", 1).await.unwrap();
    leader.put("jobs/x", b"from leader".to_vec()).await.unwrap();

    // Revoke the leader's election key behind its back, as an expired lease would.
    let mut raw = etcd_client::Client::connect(endpoints.clone(), None)
        .await
        .unwrap();
    raw.delete(
        "/ladder-election/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .unwrap();
    let err = leader.put("jobs/x", b"stale".to_vec()).await.unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err}");
    // A transaction in flight when the leadership went: none of it lands.
    let err = leader
        .apply(vec![
            Write::Put("jobs/y".into(), b"stale".to_vec()),
            Write::Delete("jobs/x".into()),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotLeader { .. }), "{err}");
    assert_eq!(
        leader.get("jobs/x").await.unwrap(),
        Some(b"from leader".to_vec())
    );
    assert_eq!(leader.get("jobs/y").await.unwrap(), None);
}

/// etcd answers a range in one message, which its client refuses past 4 MiB: a store of many
/// jobs is listed in pages, every record once, in key order.
#[tokio::test]
async fn an_etcd_prefix_larger_than_one_message_is_listed_in_pages() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&[format!("http://{}", etcd.endpoint)], None)
        .await
        .unwrap();
    // 600 small records (past one page of keys) and 30 of 300 KiB (9 MiB: past one message).
    for i in 0..600 {
        store
            .put(&format!("jobs/small-{i:04}"), vec![b's'; 100])
            .await
            .unwrap();
    }
    for i in 0..30 {
        store
            .put(&format!("jobs/large-{i:02}"), vec![b'l'; 300 << 10])
            .await
            .unwrap();
    }
    store.put("jobsx/other", b"x".to_vec()).await.unwrap();
    let listed = store.list("jobs/").await.expect("listed in pages");
    assert_eq!(listed.len(), 630);
    assert!(listed.windows(2).all(|w| w[0].0 < w[1].0), "in key order");
    assert!(listed.iter().all(|(key, _)| key.starts_with("jobs/")));
    let large: usize = listed
        .iter()
        .filter(|(key, _)| key.starts_with("jobs/large-"))
        .map(|(_, value)| value.len())
        .sum();
    assert_eq!(large, 30 * (300 << 10));
}

/// etcd that serves over TLS and admits only clients with a certificate its CA signed: the
/// store connects with the coordinator's certificate, and nothing connects without one.
#[tokio::test]
async fn etcd_over_tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ladder_testkit::make_certificates(certs.path(), &["IP:127.0.0.1"]);
    let etcd = Etcd::start_tls(ladder_testkit::EtcdTls {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    });
    let endpoints = [format!("http://{}", etcd.endpoint)];
    let tls = EtcdTls {
        ca: ca.clone(),
        identity: Some((cert.clone(), key.clone())),
    };
    let store = EtcdStore::connect(&endpoints, Some(&tls)).await.unwrap();
    suite(&store).await;

    let anonymous = EtcdTls {
        ca: ca.clone(),
        identity: None,
    };
    assert!(
        EtcdStore::connect(&endpoints, Some(&anonymous))
            .await
            .is_err()
    );
    assert!(EtcdStore::connect(&endpoints, None).await.is_err());

    // The coordinator's flags.
    let logs = certs.path().join("logs");
    let [ca, cert, key] = [ca, cert, key].map(|p| p.display().to_string());
    let coordinator = ladder_testkit::CoordinatorProcess::start(
        &etcd.store(),
        &logs,
        &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key],
    );
    let mut jobs =
        ladder_testkit::job_client(&coordinator.url(), ladder_testkit::SUBMIT_TOKEN).await;
    // It serves, from the store above (whose junk records it set aside, failing them).
    jobs.list_jobs(ladder_proto::v1::ListJobsRequest::default())
        .await
        .expect("a coordinator on etcd over TLS");
}
