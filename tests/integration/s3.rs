//! The S3 store against a real S3-compatible HTTP server (s3s-fs, see `support::s3`), directly
//! and through a fault-injecting proxy, and the command line's refusals of unusable S3
//! repositories (missing bucket, wrong secret, a policy that refuses writes).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use tidemark::store::s3::RetryPolicy;
use tidemark::store::{S3Store, Sse, Store, StoreError};

use crate::spine::{server_now, wait_archived, workload_step, Archiving};
use crate::support::proxy::{Faults, Mode};
use crate::support::s3::{quick_retry, small_parts, ProxiedS3, S3Server};
use crate::support::{self, Cluster, ClusterOptions};

fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    Bytes::from(v)
}

fn assert_remote(err: &StoreError, retryable: bool, needles: &[&str]) {
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::Remote { .. }) && err.is_retryable() == retryable,
        "expected a {} remote error, got: {text}",
        if retryable { "retryable" } else { "final" }
    );
    for n in needles {
        assert!(text.contains(n), "{n:?} missing from: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_round_trips_create_only_with_sse() {
    let server = S3Server::with_bucket("archive");
    let s = server.store("s3://archive/pg/main/").await;
    assert_eq!(s.location(), "s3://archive/pg/main");
    s.check_writable().await.unwrap();

    s.put("segments/00000001/a.seg", Bytes::from_static(b"one"))
        .await
        .unwrap();
    // Identical re-put: Ok; different bytes: Conflict, and the object is unchanged.
    s.put("segments/00000001/a.seg", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let err = s
        .put("segments/00000001/a.seg", Bytes::from_static(b"two!"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                existing: 3,
                new: 4,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        s.get("segments/00000001/a.seg").await.unwrap(),
        Bytes::from_static(b"one")
    );
    assert!(matches!(
        s.get("segments/00000001/none.seg").await,
        Err(StoreError::NotFound { .. })
    ));
    s.put("segments/00000001/b.seg", Bytes::new())
        .await
        .unwrap();
    s.put("backups/x/manifest.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert!(s.put("../evil", Bytes::new()).await.is_err());

    let keys = |v: Vec<tidemark::store::ObjectMeta>| -> Vec<(String, u64)> {
        v.into_iter().map(|o| (o.key, o.size)).collect()
    };
    assert_eq!(
        keys(s.list("segments/").await.unwrap()),
        [
            ("segments/00000001/a.seg".to_string(), 3),
            ("segments/00000001/b.seg".to_string(), 0)
        ]
    );
    assert_eq!(s.list("").await.unwrap().len(), 3);
    assert_eq!(s.list("backups/x/m").await.unwrap().len(), 1);
    s.delete("segments/00000001/b.seg").await.unwrap();
    s.delete("segments/00000001/b.seg").await.unwrap();
    assert_eq!(s.list("").await.unwrap().len(), 2);

    // On the server: exactly the objects, under the prefix; the probe is gone.
    let on_disk: Vec<String> = server.objects("archive").into_keys().collect();
    assert_eq!(
        on_disk,
        [
            "pg/main/backups/x/manifest.json",
            "pg/main/segments/00000001/a.seg"
        ]
    );
    // Many listings: pagination (s3s-fs pages at 1000 keys by default; ask for more).
    let many: Vec<String> = (0..1050).map(|i| format!("many/{i:05}")).collect();
    stream::iter(many.clone())
        .for_each_concurrent(16, |k| {
            let s = &s;
            async move { s.put(&k, Bytes::from_static(b"m")).await.unwrap() }
        })
        .await;
    let listed: Vec<String> = s
        .list("many/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, many);
    let seen = server.policy.sse_seen.lock().unwrap().clone();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s == "AES256"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_uploads_large_objects_and_aborts_on_failure() {
    let server = S3Server::with_bucket("big");
    let mut s = server.store("s3://big/p").await;
    s.multipart_threshold = 6 << 20;
    s.part_size = 5 << 20;
    s.part_concurrency = 2;
    // As on AWS: CRC32 per part, listed in the completion.
    s.multipart_checksums = true;
    let data = random_bytes((11 << 20) + 12345);
    s.put("backups/1/table.copy", data.clone()).await.unwrap();
    assert_eq!(s.get("backups/1/table.copy").await.unwrap(), data);
    assert_eq!(
        server.objects("big")["p/backups/1/table.copy"].len(),
        data.len()
    );
    assert!(server.open_uploads().is_empty());
    // Identical re-put: Ok; different bytes of the same size: Conflict.
    s.put("backups/1/table.copy", data.clone()).await.unwrap();
    let mut other = data.to_vec();
    other[7 << 20] ^= 1;
    let err = s
        .put("backups/1/table.copy", Bytes::from(other))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(s.get("backups/1/table.copy").await.unwrap(), data);

    // Parts refused half-way (the policy flips after the upload started): the upload is
    // aborted and nothing is left.
    server.set_deny_writes(true);
    let err = s
        .put("backups/1/other.copy", random_bytes(7 << 20))
        .await
        .unwrap_err();
    assert_remote(
        &err,
        false,
        &["s3://big/p", "CreateMultipartUpload", "HINT"],
    );
    server.set_deny_writes(false);
    assert!(
        server.open_uploads().is_empty(),
        "{:?}",
        server.open_uploads()
    );
    assert_eq!(server.objects("big").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_writes_carry_the_sse_header_the_policy_demands() {
    let server = S3Server::with_bucket("enc");
    let opts = server.options_via(&server.endpoint);

    // Without SSE the "deny unencrypted PutObject" policy refuses: a clear, final error.
    let plain = S3Store::connect(
        "s3://enc/x",
        &tidemark::store::S3Options {
            sse: Sse::None,
            ..opts.clone()
        },
    )
    .await
    .unwrap();
    let err = plain.check_writable().await.unwrap_err();
    assert_remote(
        &err,
        false,
        &[
            "s3://enc/x",
            "PutObject",
            "AccessDenied",
            "HINT",
            "--s3-sse",
        ],
    );
    let mut plain_big = plain;
    plain_big.multipart_threshold = 1 << 20;
    let err = plain_big
        .put("big", random_bytes(2 << 20))
        .await
        .unwrap_err();
    assert_remote(&err, false, &["CreateMultipartUpload", "AccessDenied"]);
    assert!(server.objects("enc").is_empty());

    // aws:kms with a key id: sent as such.
    let kms = S3Store::connect(
        "s3://enc/x",
        &tidemark::store::S3Options {
            sse: Sse::Kms {
                key_id: Some("alias/tidemark".into()),
            },
            ..opts
        },
    )
    .await
    .unwrap();
    kms.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(
        server.policy.sse_seen.lock().unwrap().as_slice(),
        ["aws:kms"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_loses_and_duplicates_nothing_through_a_faulty_proxy() {
    let s3 = ProxiedS3::start("flaky", Mode::Faulty(Faults::default()));
    let mut s = s3.store("s3://flaky/r").await;
    small_parts(&mut s);
    let ProxiedS3 { server, proxy } = s3;

    let mut objects: BTreeMap<String, Bytes> = (0..80)
        .map(|i| {
            let size = if i % 10 == 0 {
                0
            } else {
                rand::random::<usize>() % 100_000
            };
            (format!("segments/{i:04}.seg"), random_bytes(size))
        })
        .collect();
    for i in 0..2 {
        objects.insert(format!("backups/{i}.copy"), random_bytes((5 << 20) + 4096));
    }
    let s = &s;
    let put_all = || {
        stream::iter(objects.clone()).for_each_concurrent(8, |(k, v)| async move {
            s.put(&k, v)
                .await
                .unwrap_or_else(|e| panic!("put {k}: {e}"))
        })
    };
    put_all().await;
    // Again (as after a crash): identical re-puts succeed and change nothing.
    put_all().await;

    let listed: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed, objects.keys().cloned().collect::<Vec<_>>());
    let got: Vec<(String, Bytes)> = stream::iter(objects.keys().cloned())
        .map(|k| async move {
            let v = s.get(&k).await.unwrap_or_else(|e| panic!("get {k}: {e}"));
            (k, v)
        })
        .buffered(8)
        .collect()
        .await;
    for (k, v) in got {
        assert!(objects[&k] == v, "{k}: read back different bytes");
    }
    // On the server: exactly these objects, byte for byte; no upload left open.
    let stored = server.objects("flaky");
    assert_eq!(stored.len(), objects.len());
    for (k, v) in &objects {
        assert!(
            stored.get(&format!("r/{k}")).map(|s| s.as_slice()) == Some(&v[..]),
            "{k} not stored exactly"
        );
    }
    assert!(
        server.open_uploads().is_empty(),
        "{:?}",
        server.open_uploads()
    );
    let c = proxy.counters();
    eprintln!(
        "fault proxy: {} requests, {} answered 503, {} connections dropped",
        proxy.requests(),
        c.slowdowns.load(std::sync::atomic::Ordering::SeqCst),
        c.dropped.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(c.slowdowns.load(std::sync::atomic::Ordering::SeqCst) > 10);
    assert!(c.dropped.load(std::sync::atomic::Ordering::SeqCst) > 3);

    // Lost answers: first to CreateMultipartUpload (`POST …?uploads`) only, then to it and to
    // CompleteMultipartUpload (both POST). Uploads created by attempts whose answer was lost are
    // found and aborted; a completion that did land is recognised. Each phase puts until the
    // proxy dropped an answer (at most 40 objects: each loses its answer with probability 1/2).
    for (phase, only) in [("create", "?uploads"), ("create and complete", "POST ")] {
        proxy.set_mode(Mode::Faulty(Faults {
            slowdown: 0.0,
            drop_request: 0.0,
            drop_before_response: 0.5,
            drop_response: 0.0,
            only: Some(only),
        }));
        let before = proxy.faults();
        for i in 0..40 {
            let key = format!("backups/lost-{}-{i}.copy", phase.len());
            let data = random_bytes((5 << 20) + 1 + i);
            s.put(&key, data.clone()).await.unwrap();
            assert!(server.objects("flaky")[&format!("r/{key}")] == data[..]);
            if proxy.faults() > before {
                break;
            }
        }
        assert!(proxy.faults() > before, "{phase}: no answer was lost");
        assert!(
            server.open_uploads().is_empty(),
            "{phase}: {:?}",
            server.open_uploads()
        );
    }

    // An outage: retryable errors, within a bounded time, then recovery.
    proxy.set_mode(Mode::Down);
    let mut quick = S3Store::connect("s3://flaky/r", &server.options_via(&proxy.endpoint))
        .await
        .unwrap();
    quick.retry = RetryPolicy {
        max_elapsed: Duration::from_secs(2),
        ..quick_retry()
    };
    let started = std::time::Instant::now();
    let err = quick
        .put("segments/outage.seg", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    proxy.set_mode(Mode::Pass);
    quick
        .put("segments/outage.seg", Bytes::from_static(b"x"))
        .await
        .unwrap();
}

/// Runs `tidemark` with the test server's credentials and endpoint in the environment.
fn tidemark_s3(
    server: &S3Server,
    env: &[(&'static str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let mut full = server.cli_env(&server.endpoint);
    full.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    tidemark_with(&full, args)
}

/// Runs `tidemark args…` with `env` added; returns (exit code, stdout, stderr).
fn tidemark_with(env: &[(&'static str, String)], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(support::tidemark_bin())
        .args(args)
        .env("TIDEMARK_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(what: &str, (code, out, err): &(i32, String, String), needles: &[&str]) {
    let context = format!("{what}: exit {code}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
    assert_eq!(*code, 4, "{context}");
    assert!(
        err.starts_with("error: ") && err.contains("HINT"),
        "{context}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} missing: {context}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unusable_repositories_are_refused_with_exit_4_and_nothing_written() {
    let server = S3Server::with_bucket("guarded");

    let r = tidemark_s3(&server, &[], &["list", "--repo", "s3://nosuchbucket/pg"]);
    assert_refused(
        "list of a missing bucket",
        &r,
        &["nosuchbucket", "NoSuchBucket"],
    );

    let r = tidemark_s3(
        &server,
        &[("AWS_SECRET_ACCESS_KEY", "not-the-secret")],
        &["list", "--repo", "s3://guarded/pg"],
    );
    assert_refused(
        "list with a wrong secret key",
        &r,
        &[
            "s3://guarded/pg",
            "SignatureDoesNotMatch",
            "AWS_SECRET_ACCESS_KEY",
        ],
    );

    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("src");
    let source = cluster.conninfo("src");
    server.set_deny_writes(true);
    let archive = |repo: &str| {
        tidemark_s3(
            &server,
            &[],
            &["archive", "--source", &source, "--repo", repo],
        )
    };
    assert_refused(
        "archive into a bucket whose policy refuses writes",
        &archive("s3://guarded/pg"),
        &["s3://guarded/pg", "PutObject", "AccessDenied"],
    );
    assert_refused(
        "archive into a missing bucket",
        &archive("s3://nosuchbucket/pg"),
        &["nosuchbucket", "NoSuchBucket"],
    );
    // Nothing was created on the source.
    let slots = cluster.psql("src", "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(slots.trim(), "0", "a replication slot was created");

    // A base backup needs the publication and slot `setup` creates.
    let (code, _, err) = tidemark_s3(&server, &[], &["setup", "--source", &source]);
    assert_eq!(code, 0, "{err}");
    let r = tidemark_s3(
        &server,
        &[],
        &["backup", "--source", &source, "--repo", "s3://guarded/pg"],
    );
    assert_refused(
        "backup into a bucket whose policy refuses writes",
        &r,
        &["s3://guarded/pg", "PutObject", "AccessDenied"],
    );
    assert!(server.objects("guarded").is_empty());
    assert!(server.open_uploads().is_empty());
}

/// The spine over S3: archive a workload into a bucket through the faulty proxy (about one
/// request in six failing: 503s and dropped connections), then list and restore through it, to an
/// instant and to the latest, and compare row for row. The archiver must not poll listings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_archive_and_restore_through_a_faulty_proxy() {
    let ProxiedS3 { server, proxy } = ProxiedS3::start("pitr", Mode::Faulty(Faults::light()));
    let env = server.cli_env(&proxy.endpoint);
    let repo = "s3://pitr/app";
    let Archiving {
        cluster,
        src,
        archiver,
        ..
    } = Archiving::builder().repo_url(repo).env(&env).start().await;
    let log_text = || archiver.log_text();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    // The slot is active already while the first base backup is taken (which lists): count
    // listings from the first stored segment on.
    workload_step(&src, 2).await;
    while !server
        .objects("pitr")
        .keys()
        .any(|k| k.contains("/segments/"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no segment stored:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lists_at_start = proxy.requests_matching("list-type=2");
    workload_step(&src, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let instant = server_now(&src).await;
    let at_instant = support::snapshot_content(&src).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    workload_step(&src, 9).await;
    let final_content = support::snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    let lists_while_streaming = proxy.requests_matching("list-type=2") - lists_at_start;
    archiver.stop();

    let (code, out, err) = tidemark_with(&env, &["list", "--repo", repo]);
    assert_eq!(code, 0, "list failed: {out}{err}");
    assert!(out.contains("base backup"), "{out}");

    for (db, target, expected) in [
        (
            "restored_instant",
            vec!["--to-time", instant.as_str()],
            &at_instant,
        ),
        ("restored_latest", vec!["--latest"], &final_content),
    ] {
        cluster.create_database(db);
        let conninfo = cluster.conninfo(db);
        let mut args = vec!["restore", "--repo", repo, "--target", conninfo.as_str()];
        args.extend(target.iter().copied());
        let (code, out, err) = tidemark_with(&env, &args);
        assert_eq!(code, 0, "restore {target:?} failed: {out}{err}");
        let restored = support::snapshot_content(&cluster.client(db).await).await;
        support::assert_same_content(expected, &restored, &format!("restore {target:?}"));
    }
    assert!(proxy.faults() > 0, "the proxy injected no fault");
    assert!(
        server.open_uploads().is_empty(),
        "{:?}",
        server.open_uploads()
    );
    let lists: Vec<String> = proxy
        .counters()
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("list-type=2"))
        .cloned()
        .collect();
    assert_eq!(
        lists_while_streaming, 0,
        "the archiver listed the bucket while streaming: {lists:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_without_conditional_writes_still_refuses_overwrites() {
    let server = S3Server::with_bucket("plain");
    server
        .policy
        .no_conditional_writes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let s = server.store("s3://plain").await;
    s.put("a", Bytes::from_static(b"one")).await.unwrap();
    s.put("a", Bytes::from_static(b"one")).await.unwrap();
    let err = s.put("a", Bytes::from_static(b"two")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    s.put("b", Bytes::from_static(b"new")).await.unwrap();
    let stored = server.objects("plain");
    assert_eq!(stored["a"], b"one");
    assert_eq!(stored["b"], b"new");
}
