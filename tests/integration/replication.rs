//! The replication-protocol client against a real PostgreSQL 15 server.

use std::time::Duration;

use tidemark::conninfo::ConnInfo;
use tidemark::lsn::Lsn;
use tidemark::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream,
};

use crate::support::{Cluster, ClusterOptions};

/// Connection parameters from the cluster's string alone (no PG* environment, no .pgpass).
fn info(conninfo: &str) -> ConnInfo {
    ConnInfo::parse_with_env(conninfo, &|_| None).unwrap()
}

async fn connect(cluster: &Cluster, db: &str) -> ReplicationClient {
    ReplicationClient::connect(&info(&cluster.conninfo(db)))
        .await
        .unwrap()
}

async fn confirmed_flush(cluster: &Cluster, slot: &str) -> Option<Lsn> {
    let client = cluster.client("postgres").await;
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();
    row.get::<_, Option<String>>(0).map(|s| s.parse().unwrap())
}

/// The next message within a generous timeout.
async fn next(stream: &mut ReplicationStream) -> Option<ReplicationMessage> {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no replication message within 30s")
        .unwrap()
}

#[tokio::test]
async fn identify_system_reports_the_cluster() {
    let cluster = Cluster::start(ClusterOptions::default());
    let mut c = connect(&cluster, "postgres").await;
    assert!(
        c.server_version_num() >= 150000,
        "{}",
        c.server_version_num()
    );
    let sys = c.identify_system().await.unwrap();
    let client = cluster.client("postgres").await;
    let row = client
        .query_one(
            "SELECT system_identifier::text, pg_current_wal_flush_lsn()::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        sys.system_id,
        row.get::<_, String>(0).parse::<u64>().unwrap()
    );
    assert_eq!(sys.timeline, 1);
    assert_eq!(sys.dbname.as_deref(), Some("postgres"));
    assert!(sys.xlogpos <= row.get::<_, String>(1).parse::<Lsn>().unwrap());

    // The session settings that make pgoutput's text values unambiguous.
    for (setting, want) in [
        ("bytea_output", "hex"),
        ("TimeZone", "UTC"),
        ("DateStyle", "ISO, YMD"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "3"),
        ("client_encoding", "UTF8"),
        ("application_name", "tidemark"),
    ] {
        let rows = c.simple_query(&format!("SHOW {setting}")).await.unwrap();
        assert_eq!(rows, vec![vec![Some(want.to_string())]], "{setting}");
    }
    let err = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("22012"));
    // The connection is still usable after an error.
    assert_eq!(
        c.simple_query("SELECT NULL::int, 'a'").await.unwrap(),
        vec![vec![None, Some("a".to_string())]]
    );
    c.close().await;
}

#[tokio::test]
async fn hosts_are_tried_in_order() {
    let cluster = Cluster::start(ClusterOptions::default());
    let good = info(&cluster.conninfo("postgres"));
    // Held until the end: the port stays closed.
    let closed = crate::support::ClosedPort::hold();
    let closed_port = closed.port;
    let both = info(&format!(
        "host=127.0.0.1,{} port={closed_port},{} user={} dbname=postgres",
        good.host_string(),
        good.port(),
        good.user()
    ));
    let mut c = ReplicationClient::connect(&both).await.unwrap();
    assert!(
        c.target().ends_with(&format!(":{}/postgres", good.port())),
        "{}",
        c.target()
    );
    c.identify_system().await.unwrap();
    c.close().await;

    // A Unix-domain socket directory as host.
    let unix = info(&format!(
        "host={} port={} user=tidemark dbname=postgres",
        cluster.socket_dir.display(),
        cluster.port
    ));
    let mut c = ReplicationClient::connect(&unix).await.unwrap();
    assert_eq!(
        c.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    c.close().await;

    let only_closed = info(&format!(
        "host=127.0.0.1 port={closed_port} user=tidemark dbname=postgres"
    ));
    let err = ReplicationClient::connect(&only_closed).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Io { .. }), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn exported_snapshot_is_usable_while_the_connection_is_idle() {
    let cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client("postgres").await;
    client
        .batch_execute(
            "CREATE TABLE snap_t (id int); INSERT INTO snap_t SELECT generate_series(1, 3);",
        )
        .await
        .unwrap();
    let mut c = connect(&cluster, "postgres").await;
    let slot = c
        .create_logical_slot("tm_snap_slot", false, true)
        .await
        .unwrap();
    assert_eq!(slot.name, "tm_snap_slot");
    let snapshot = slot.snapshot_name.clone().expect("an exported snapshot");
    assert!(slot.consistent_point > Lsn::ZERO);
    client
        .batch_execute("INSERT INTO snap_t SELECT generate_series(4, 5)")
        .await
        .unwrap();

    let mut reader = cluster.client("postgres").await;
    let tx = reader
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snapshot}'"))
        .await
        .unwrap();
    let n: i64 = tx
        .query_one("SELECT count(*) FROM snap_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "the snapshot sees exactly what precedes the slot");
    tx.commit().await.unwrap();

    assert_eq!(
        confirmed_flush(&cluster, "tm_snap_slot").await,
        Some(slot.consistent_point)
    );
    c.drop_slot("tm_snap_slot", false).await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tm_snap_slot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);

    let temp = c
        .create_logical_slot("tm_temp_slot", true, false)
        .await
        .unwrap();
    assert_eq!(temp.snapshot_name, None);
    c.close().await;
}

/// Receives one transaction: the pgoutput tags of its messages and the commit's end LSN
/// (read from the Commit payload).
async fn receive_transaction(stream: &mut ReplicationStream) -> (Vec<u8>, Lsn) {
    let mut tags = Vec::new();
    loop {
        match next(stream).await.expect("stream ended early") {
            ReplicationMessage::XLogData {
                data, wal_start, ..
            } => {
                let tag = data[0];
                tags.push(tag);
                if tag == b'C' {
                    let end = Lsn(u64::from_be_bytes(data[10..18].try_into().unwrap()));
                    let commit_lsn = Lsn(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    assert!(commit_lsn < end);
                    assert!(wal_start <= end);
                    return (tags, end);
                }
            }
            ReplicationMessage::Keepalive { .. } => {}
        }
    }
}

fn assert_one_transaction(tags: &[u8], inserts: usize) {
    assert_eq!(
        tags.first(),
        Some(&b'B'),
        "{:?}",
        String::from_utf8_lossy(tags)
    );
    assert_eq!(tags.last(), Some(&b'C'));
    assert_eq!(tags.iter().filter(|&&t| t == b'R').count(), 1);
    assert_eq!(tags.iter().filter(|&&t| t == b'I').count(), inserts);
    let first_insert = tags.iter().position(|&t| t == b'I').unwrap();
    let relation = tags.iter().position(|&t| t == b'R').unwrap();
    assert!(relation < first_insert, "Relation precedes the inserts");
}

#[tokio::test]
async fn streams_a_transaction_and_acknowledges_only_on_request() {
    let cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client("postgres").await;
    client
        .batch_execute(
            "CREATE TABLE stream_t (id int PRIMARY KEY, note text);
             CREATE PUBLICATION tm_pub FOR ALL TABLES;",
        )
        .await
        .unwrap();
    let mut c = connect(&cluster, "postgres").await;
    let slot = c
        .create_logical_slot("tm_stream_slot", false, false)
        .await
        .unwrap();
    client
        .batch_execute(
            "BEGIN;
             INSERT INTO stream_t SELECT g, 'row ' || g FROM generate_series(1, 1000) g;
             COMMIT;",
        )
        .await
        .unwrap();
    let before = confirmed_flush(&cluster, "tm_stream_slot").await.unwrap();
    assert_eq!(before, slot.consistent_point);

    // proto_version 1: receive everything, never acknowledge.
    let mut stream = c
        .start_replication(
            "tm_stream_slot",
            Lsn::ZERO,
            &[("proto_version", "1"), ("publication_names", "\"tm_pub\"")],
        )
        .await
        .unwrap();
    let (tags, end_v1) = receive_transaction(&mut stream).await;
    assert_one_transaction(&tags, 1000);
    stream.finish().await.unwrap();
    assert_eq!(
        confirmed_flush(&cluster, "tm_stream_slot").await,
        Some(before),
        "receiving without send_status must not move confirmed_flush_lsn"
    );

    // proto_version 2 with streaming: the unacknowledged transaction comes again.
    let c = connect(&cluster, "postgres").await;
    let mut stream = c
        .start_replication(
            "tm_stream_slot",
            Lsn::ZERO,
            &[
                ("proto_version", "2"),
                ("publication_names", "\"tm_pub\""),
                ("streaming", "on"),
                ("messages", "true"),
            ],
        )
        .await
        .unwrap();
    let (tags, end) = receive_transaction(&mut stream).await;
    assert_one_transaction(&tags, 1000);
    assert_eq!(end, end_v1);
    assert!(end > before);
    stream.send_status(end, end, end, false).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(confirmed_flush(&cluster, "tm_stream_slot").await, Some(end));

    // Restarting after the acknowledgement does not resend the transaction.
    client
        .batch_execute("INSERT INTO stream_t VALUES (1001, 'after')")
        .await
        .unwrap();
    let c = connect(&cluster, "postgres").await;
    let mut stream = c
        .start_replication(
            "tm_stream_slot",
            Lsn::ZERO,
            &[("proto_version", "2"), ("publication_names", "\"tm_pub\"")],
        )
        .await
        .unwrap();
    let (tags, _) = receive_transaction(&mut stream).await;
    assert_one_transaction(&tags, 1);
    stream.finish().await.unwrap();
    assert_eq!(confirmed_flush(&cluster, "tm_stream_slot").await, Some(end));
}

#[tokio::test]
async fn keepalive_requests_are_surfaced_and_never_answered() {
    let cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client("postgres").await;
    client
        .batch_execute("CREATE PUBLICATION tm_ka_pub FOR ALL TABLES")
        .await
        .unwrap();
    let mut c = connect(&cluster, "postgres").await;
    c.create_logical_slot("tm_ka_slot", false, false)
        .await
        .unwrap();
    let before = confirmed_flush(&cluster, "tm_ka_slot").await;
    // The walsender asks for a reply after wal_sender_timeout / 2 and gives up after
    // wal_sender_timeout without one.
    c.simple_query("SET wal_sender_timeout = '2s'")
        .await
        .unwrap();
    let mut stream = c
        .start_replication(
            "tm_ka_slot",
            Lsn::ZERO,
            &[
                ("proto_version", "2"),
                ("publication_names", "\"tm_ka_pub\""),
            ],
        )
        .await
        .unwrap();
    loop {
        match next(&mut stream).await {
            Some(ReplicationMessage::Keepalive {
                reply_requested: true,
                ..
            }) => break,
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    // We do not answer, and neither does the client: the server times the connection out.
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the server should have timed out the silent client");
    let err = end.expect_err("the connection ends with an error");
    assert!(matches!(err, ReplicationError::Io { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(confirmed_flush(&cluster, "tm_ka_slot").await, before);
}

#[tokio::test]
async fn missing_and_active_slots_are_not_retryable() {
    let cluster = Cluster::start(ClusterOptions::default());
    let client = cluster.client("postgres").await;
    client
        .batch_execute("CREATE PUBLICATION tm_err_pub FOR ALL TABLES")
        .await
        .unwrap();
    let opts = [
        ("proto_version", "2"),
        ("publication_names", "\"tm_err_pub\""),
    ];

    let c = connect(&cluster, "postgres").await;
    let err = c
        .start_replication("tm_no_such_slot", Lsn::ZERO, &opts)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("(SQLSTATE 42704)"), "{err}");

    let mut c = connect(&cluster, "postgres").await;
    c.create_logical_slot("tm_busy_slot", false, false)
        .await
        .unwrap();
    let err = c
        .create_logical_slot("tm_busy_slot", false, false)
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("42710"), "{err}");
    let stream = c
        .start_replication("tm_busy_slot", Lsn::ZERO, &opts)
        .await
        .unwrap();
    let other = connect(&cluster, "postgres").await;
    let err = other
        .start_replication("tm_busy_slot", Lsn::ZERO, &opts)
        .await
        .unwrap_err();
    // "replication slot … is active for PID …" is object_in_use.
    assert_eq!(err.sqlstate(), Some("55006"), "{err}");
    assert!(!err.is_retryable());
    stream.finish().await.unwrap();
    let mut c = connect(&cluster, "postgres").await;
    c.drop_slot("tm_busy_slot", true).await.unwrap();
    c.close().await;
}

#[tokio::test]
async fn scram_authentication() {
    let cluster = Cluster::start(ClusterOptions {
        hba: vec![
            "host all tm_scram 127.0.0.1/32 scram-sha-256".into(),
            "host replication tm_scram 127.0.0.1/32 scram-sha-256".into(),
        ],
        extra_conf: vec!["password_encryption = 'scram-sha-256'".into()],
        ..ClusterOptions::default()
    });
    let client = cluster.client("postgres").await;
    client
        .batch_execute(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE tm_scram LOGIN REPLICATION PASSWORD 'c0rrect horse';",
        )
        .await
        .unwrap();
    let hashed: bool = client
        .query_one(
            "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'tm_scram'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(hashed);
    let port = info(&cluster.conninfo("postgres")).port();
    let with = |password: Option<&str>| {
        let pw = password
            .map(|p| format!(" password='{p}'"))
            .unwrap_or_default();
        info(&format!(
            "host=127.0.0.1 port={port} user=tm_scram dbname=postgres{pw}"
        ))
    };

    let mut c = ReplicationClient::connect(&with(Some("c0rrect horse")))
        .await
        .unwrap();
    let sys = c.identify_system().await.unwrap();
    assert!(sys.system_id > 0);
    c.close().await;

    let err = ReplicationClient::connect(&with(Some("wrong")))
        .await
        .unwrap_err();
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(!err.is_retryable());

    let err = ReplicationClient::connect(&with(None)).await.unwrap_err();
    assert!(matches!(err, ReplicationError::Auth { .. }), "{err}");
    assert!(!err.is_retryable());
}
