//! A replication connection that goes silent without a reset (a network partition: here a proxy
//! that stops forwarding but closes nothing, so TCP never reports an error) is noticed within
//! the stated bound, two thirds of the server's `wal_sender_timeout`; the archiver reconnects
//! and archives on with no gap and no duplicate.

use std::time::{Duration, Instant};

use crate::spine::{
    restore_each_instant, restore_latest_equals, server_now, wait_archived, workload_step,
    Archiving, SCHEMA,
};
use crate::support::tcp_proxy::TcpProxy;
use crate::support::{self, walsender_pid, ClusterOptions, SUPERUSER};

/// A cluster whose walsenders time out after 4 s of silence.
fn short_wal_sender_timeout() -> ClusterOptions {
    ClusterOptions {
        extra_conf: vec!["wal_sender_timeout = '4s'".into()],
        ..ClusterOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_replication_connection_is_noticed_within_the_bound_and_archiving_goes_on()
{
    // The bound: 2/3 of wal_sender_timeout, 2.7 s.
    const BOUND: Duration = Duration::from_millis(2666);
    // Time to drain the pipeline and write the log line, on a loaded machine.
    const SLACK: Duration = Duration::from_secs(3);
    let prepared = Archiving::builder()
        .cluster(short_wal_sender_timeout())
        .prepare()
        .await;
    let proxy = TcpProxy::start(prepared.cluster.port);
    let source = format!(
        "host=127.0.0.1 port={} user={SUPERUSER} dbname=app",
        proxy.port
    );
    let Archiving {
        cluster,
        src,
        mut archiver,
        url: repo,
        dir: _repo_dir,
        ..
    } = prepared.archive_from(&source).await;
    let repo_s = repo.as_str();

    let mut instants = Vec::new();
    workload_step(&src, 2).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    wait_archived(&src, "tidemark", &archiver.log).await;
    let first = walsender_pid(&src).await.expect("archiver is streaming");
    let accepted = proxy.accepted();

    // The route dies silently. The source goes on committing meanwhile.
    proxy.freeze_open_connections();
    let frozen_at = Instant::now();
    workload_step(&src, 3).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));

    let noticed = loop {
        archiver.assert_running();
        if archiver.log_text().contains("presumed dead") {
            break frozen_at.elapsed();
        }
        assert!(
            frozen_at.elapsed() < BOUND + SLACK,
            "the dead connection was not noticed within {BOUND:?} (+{SLACK:?}):\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = archiver.log_text();
    assert!(
        log.contains(
            "no message from the server for 2.7 s (wal_sender_timeout 4 s): the connection is presumed dead; reconnecting"
        ),
        "the error names the bound and where it comes from:\n{log}"
    );
    assert!(
        log.contains("starting over from the archive's end"),
        "the attempt is retried in process:\n{log}"
    );
    eprintln!("noticed {noticed:?} after the freeze");

    // Streaming again, through the proxy (a new route), once the server has let the old
    // walsender go (its own wal_sender_timeout).
    let deadline = Instant::now() + Duration::from_secs(60);
    while walsender_pid(&src).await.is_none_or(|pid| pid == first)
        || archiver.log_text().matches("INFO archiving").count() < 2
    {
        archiver.assert_running();
        assert!(
            Instant::now() < deadline,
            "the archiver did not reconnect:\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        proxy.accepted() > accepted,
        "it reconnected through the proxy"
    );

    workload_step(&src, 4).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    workload_step(&src, 5).await;
    let last = support::snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    let log = archiver.log_text();
    archiver.stop();
    assert_eq!(
        log.matches("presumed dead").count(),
        1,
        "a live connection is never presumed dead:\n{log}"
    );

    // No gap (what was committed during the silence is there) and no duplicate.
    restore_each_instant(&cluster, repo_s, &[], &instants, "restored").await;
    restore_latest_equals(&cluster, repo_s, "restored_latest", &last).await;
}

/// A quiet but live connection is never presumed dead. With no heartbeats, status updates
/// every 30 s and a receive timeout of 1 s, the server has nothing to send within the bound on
/// its own (it sends a keepalive after half its wal_sender_timeout, 2 s): only its answers to the
/// archiver's reply requests (after 0.5 s of silence) keep the connection alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_live_connection_is_asked_for_replies_and_never_presumed_dead() {
    let Archiving {
        cluster: _cluster,
        src,
        mut archiver,
        dir: _repo_dir,
        ..
    } = Archiving::builder()
        .cluster(short_wal_sender_timeout())
        .sql(SCHEMA)
        .args(&[
            "--heartbeat",
            "0s",
            "--status-interval",
            "30s",
            "--receive-timeout",
            "1s",
        ])
        .env(&[("TIDEMARK_LOG", "info,tidemark::archive=debug".into())])
        .start()
        .await;
    let pid = walsender_pid(&src).await.expect("archiver is streaming");
    // Many bounds of quiet.
    tokio::time::sleep(Duration::from_secs(8)).await;
    archiver.assert_running();
    let log = archiver.log_text();
    assert!(!log.contains("presumed dead"), "{log}");
    assert!(
        log.matches("requesting a reply").count() >= 3,
        "the archiver asks the quiet server for replies:\n{log}"
    );
    assert_eq!(
        walsender_pid(&src).await,
        Some(pid),
        "the same connection throughout"
    );
    archiver.stop();
}
