//! Proves the harness itself works: clusters, psql, clients, content
//! snapshots and diffs, restarts, and the physical PITR oracle.

use std::collections::BTreeMap;

use crate::support::{
    assert_same_content, assert_same_hashes, content_hashes, pg_bindir, snapshot_content,
    tidemark_bin, Cluster, ClusterOptions,
};

#[test]
fn finds_binaries() {
    assert!(pg_bindir().join("pg_ctl").is_file(), "{:?}", pg_bindir());
    assert!(tidemark_bin().is_file(), "{:?}", tidemark_bin());
}

#[tokio::test]
async fn cluster_psql_client_and_snapshot() {
    let cluster = Cluster::start(ClusterOptions::default());
    assert_eq!(cluster.psql("postgres", "SHOW wal_level"), "logical");
    assert_eq!(cluster.psql("postgres", "SHOW fsync"), "on");
    assert_eq!(cluster.psql("postgres", "SHOW max_replication_slots"), "20");
    cluster.create_database("smoke db");

    let client = cluster.client("smoke db").await;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text, f float8, ts timestamptz);
             INSERT INTO t VALUES (2, 'b', 0.1, '2026-01-02 03:04:05.678+02'),
                                  (1, 'a, \"q\"', 1.5, NULL);
             CREATE SCHEMA other;
             CREATE TABLE other.empty (x int);
             CREATE TABLE \"t\"\"odd\" (t int);
             INSERT INTO \"t\"\"odd\" VALUES (7), (7);
             CREATE UNLOGGED TABLE skipped (x int);
             INSERT INTO skipped VALUES (1);",
        )
        .await
        .unwrap();
    // The session's own settings survive the snapshot.
    client
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();

    let snap = snapshot_content(&client).await;
    let expected: BTreeMap<String, Vec<String>> = [
        ("other.empty", vec![]),
        (
            "t",
            vec![
                r#"(1,"a, ""q""",1.5,)"#,
                r#"(2,b,0.1,"2026-01-02 01:04:05.678+00")"#,
            ],
        ),
        ("t\"odd", vec!["(7)", "(7)"]),
    ]
    .into_iter()
    .map(|(k, rows)| (k.to_string(), rows.into_iter().map(String::from).collect()))
    .collect();
    assert_same_content(&expected, &snap, "smoke snapshot");
    let tz: String = client.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
    assert_eq!(tz, "Asia/Tokyo");

    let hashes = content_hashes(&client).await;
    assert_eq!(hashes["t"].0, 2);
    assert_eq!(
        hashes["other.empty"],
        (0, "d41d8cd98f00b204e9800998ecf8427e".into())
    );
    assert_eq!(hashes["t\"odd"].0, 2);
    assert_same_hashes(&hashes, &content_hashes(&client).await, "hashes are stable");

    // A mismatch names the table and the differing rows.
    let mut changed = snap.clone();
    changed.get_mut("t").unwrap()[1] = "(2,B,0.1,)".to_string();
    let err = std::panic::catch_unwind(|| assert_same_content(&snap, &changed, "ctx"))
        .expect_err("must panic");
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("ctx") && msg.contains("\"t\""), "{msg}");
    assert!(msg.contains("only in actual: (2,B,0.1,)"), "{msg}");
    assert!(!msg.contains("(1,"), "equal rows are not shown: {msg}");
}

#[tokio::test]
async fn restart_with_applies_conf_and_keeps_data() {
    let mut cluster = Cluster::start(ClusterOptions {
        extra_conf: vec!["work_mem = '5MB'".into()],
        hba: vec!["host all nobody 127.0.0.1/32 reject".into()],
        ..Default::default()
    });
    assert_eq!(cluster.psql("postgres", "SHOW work_mem"), "5MB");
    cluster.psql(
        "postgres",
        "CREATE TABLE k (x int); INSERT INTO k VALUES (42);",
    );
    let first_pid = cluster.postmaster_pid();

    cluster.restart_with(&["work_mem = '7MB'"]);
    assert_eq!(cluster.psql("postgres", "SHOW work_mem"), "7MB");
    assert_ne!(cluster.postmaster_pid(), first_pid);

    cluster.stop_immediate();
    assert!(!cluster.is_running());
    cluster.start_again();
    assert_eq!(cluster.psql("postgres", "SELECT x FROM k"), "42");
    assert!(cluster
        .log()
        .contains("database system was not properly shut down"));
    cluster.stop();
}

#[tokio::test]
async fn pitr_oracle_recovers_exactly_the_rows_before_target() {
    let source = Cluster::start(ClusterOptions {
        archive_wal: true,
        ..Default::default()
    });
    source.create_database("app");
    source.psql("app", "CREATE TABLE t (id int PRIMARY KEY, note text)");
    let backup = source.base_backup();

    // Separate transactions on both sides of the target time.
    for id in 1..=20 {
        source.psql("app", &format!("INSERT INTO t VALUES ({id}, 'before')"));
    }
    let client = source.client("app").await;
    let expected = snapshot_content(&client).await;
    let target = source.psql(
        "app",
        "SET TimeZone = 'UTC'; SELECT clock_timestamp()::text",
    );
    for id in 21..=40 {
        source.psql("app", &format!("INSERT INTO t VALUES ({id}, 'after')"));
    }
    source.psql("app", "UPDATE t SET note = 'changed' WHERE id <= 5");
    let everything = snapshot_content(&client).await;
    source.switch_wal_and_wait_archived();

    let recovered = backup.recover_to_time(&target);
    assert_eq!(recovered.psql("app", "SELECT pg_is_in_recovery()"), "f");
    let log = recovered.log();
    assert!(log.contains("recovery stopping before commit"), "{log}");
    let restored = snapshot_content(&recovered.client("app").await).await;
    assert_same_content(&expected, &restored, &format!("PITR to {target}"));
    assert_eq!(expected["t"].len(), 20);
    assert_ne!(expected, everything);

    // The recovered cluster is an ordinary, writable cluster.
    recovered.psql("app", "INSERT INTO t VALUES (100, 'new timeline')");
}
