//! The store conformance suite (`tidemark::store::conformance`) against the real stores: the S3
//! store on the S3-compatible test server (directly, at a prefix and at the bucket's root, and
//! through the fault-injecting proxy), and the faulty wrapper around it. The folder store runs
//! the same suite in the crate's unit tests.

use std::sync::Arc;

use tidemark::store::conformance::{self, LARGE};
use tidemark::store::faulty::{Fault, FaultyStore, Op, Times};
use tidemark::store::{S3Store, Store};

use crate::support::proxy::{Faults, Mode};
use crate::support::s3::{small_parts, ProxiedS3, S3Server};

/// The large object goes up as a multipart upload of two parts.
fn multipart(s: &mut S3Store) {
    small_parts(s);
    assert!(LARGE > s.multipart_threshold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_at_a_prefix_and_at_the_bucket_root() {
    let server = S3Server::with_bucket("conform");
    let mut s = server.store("s3://conform/pg/main").await;
    multipart(&mut s);
    conformance::run(&s, "").await;
    assert!(
        server.open_uploads().is_empty(),
        "no multipart upload left open"
    );
    // Everything it stored is under the prefix.
    let outside: Vec<String> = server
        .objects("conform")
        .into_keys()
        .filter(|k| !k.starts_with("pg/main/"))
        .collect();
    assert!(
        outside.is_empty(),
        "objects outside the prefix: {outside:?}"
    );

    server.create_bucket("root");
    let mut s = server.store("s3://root").await;
    multipart(&mut s);
    conformance::run(&s, "suite/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_through_a_faulty_proxy() {
    let s3 = ProxiedS3::start("flaky", Mode::Faulty(Faults::default()));
    let mut s = s3.store("s3://flaky/r").await;
    multipart(&mut s);
    conformance::run(&s, "").await;
    assert!(s3.proxy.faults() > 0, "the proxy injected no fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_store_over_s3_conforms_and_reports_its_faults_as_configured() {
    let server = S3Server::with_bucket("wrapped");
    let inner: Arc<dyn Store> = Arc::new(server.store("s3://wrapped/w").await);
    let s = FaultyStore::new(inner.clone());
    conformance::run(&s, "").await;

    // One failure of each kind, each classified as configured, and none reaches S3.
    let before = server.objects("wrapped");
    s.add_fault(Op::Put, Fault::Retryable, Times::N(1));
    s.add_fault(Op::Get, Fault::Permanent, Times::N(1));
    s.add_fault(Op::List, Fault::DiskFull, Times::N(1));
    s.add_fault(Op::Delete, Fault::Retryable, Times::Always);
    let put = s.put("x/new", bytes::Bytes::from_static(b"new")).await;
    assert!(put.as_ref().is_err_and(|e| e.is_retryable()), "{put:?}");
    let get = s.get("round-trip/flat.seg").await;
    assert!(get.as_ref().is_err_and(|e| !e.is_retryable()), "{get:?}");
    let list = s.list("").await;
    assert!(
        matches!(&list, Err(tidemark::store::StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::StorageFull),
        "{list:?}"
    );
    for _ in 0..3 {
        assert!(s
            .delete("round-trip/flat.seg")
            .await
            .unwrap_err()
            .is_retryable());
    }
    assert_eq!(
        server.objects("wrapped"),
        before,
        "no injected failure reached S3"
    );
    // The counted faults ran out (but the delete's); the next calls pass.
    s.put("x/new", bytes::Bytes::from_static(b"new"))
        .await
        .unwrap();
    s.get("round-trip/flat.seg").await.unwrap();
    s.list("").await.unwrap();
    assert_eq!(
        [Op::Put, Op::Get, Op::List, Op::Delete].map(|op| s.injected(op)),
        [1, 1, 1, 3]
    );
}
