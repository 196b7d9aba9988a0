//! The archiver rides out what operations throw at it without a restart of its own: a dropped
//! replication connection, a crash and restart of the source server. Every instant noted on the
//! way restores exactly.

use std::time::Duration;

use crate::spine::{
    restore_each_instant, server_now, tidemark, wait_archived, workload_step, Archiving,
};
use crate::support::{self, walsender_pid};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_survives_a_dropped_connection_and_a_server_crash() {
    let Archiving {
        mut cluster,
        src,
        mut archiver,
        url: repo,
        dir: _dir,
        ..
    } = Archiving::start(&[]).await;

    let mut instants = Vec::new();
    workload_step(&src, 2).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));

    // 1. The replication connection is cut (a network blip, an admin's pg_terminate_backend).
    let first = walsender_pid(&src).await.expect("archiver is streaming");
    src.execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .unwrap();
    workload_step(&src, 3).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    // Streaming again, on a new connection (the old walsender may linger a moment).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while walsender_pid(&src).await.is_none_or(|pid| pid == first) {
        archiver.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "the archiver did not reconnect:\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    archiver.assert_running();

    // 2. The source server crashes (no checkpoint: the slot's saved position may go back) and
    //    comes back; the archiver keeps retrying meanwhile.
    drop(src);
    cluster.stop_immediate();
    tokio::time::sleep(Duration::from_secs(2)).await;
    archiver.assert_running();
    cluster.start_again();
    let src = cluster.client("app").await;
    workload_step(&src, 4).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    archiver.wait_streaming(&src, "tidemark").await;
    workload_step(&src, 5).await;
    let last = support::snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        log.matches("starting over from the archive's end").count() >= 2,
        "both interruptions must be retried in process:\n{log}"
    );

    let repo_s = repo.as_str();
    restore_each_instant(&cluster, repo_s, &[], &instants, "restored").await;
    cluster.create_database("restored_latest");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo_s,
        "--target",
        &cluster.conninfo("restored_latest"),
        "--latest",
    ]);
    assert_eq!(code, 0, "restore --latest failed: {out}{err}");
    let restored = support::snapshot_content(&cluster.client("restored_latest").await).await;
    support::assert_same_content(&last, &restored, "restore --latest");
}

/// A source that is still starting (the pod's PostgreSQL beside the archiver, a server booting
/// with the machine) is waited for with `--source-wait` instead of the exit that crash-loops a
/// container; without it the archiver fails at once (exit 3), and one the server refuses (no
/// such database) fails at once even with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_waits_with_source_wait_for_a_server_still_starting() {
    let crate::spine::Prepared {
        mut cluster,
        src,
        url,
        dir: _dir,
        ..
    } = Archiving::builder().prepare().await;
    drop(src);
    cluster.stop();
    let source = cluster.conninfo("app");
    let (code, _, err) = tidemark(&["archive", "--source", &source, "--repo", &url]);
    assert_eq!(code, 3, "without --source-wait: {err}");

    let mut archiver =
        crate::spine::Archiver::start_source(&source, &url, &["--source-wait", "2m"], &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !archiver
        .log_text()
        .contains("the source is not accepting connections yet")
    {
        archiver.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "no wait logged:\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Waiting through a few retries, not exiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    archiver.assert_running();
    cluster.start_again();
    let src = cluster.client("app").await;
    archiver.wait_streaming(&src, "tidemark").await;
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    let started = std::time::Instant::now();
    let (code, _, err) = tidemark(&[
        "archive",
        "--source",
        &cluster.conninfo("no_such_database"),
        "--repo",
        &url,
        "--source-wait",
        "2m",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no_such_database"), "{err}");
    assert!(
        !err.contains("not accepting connections yet")
            && started.elapsed() < Duration::from_secs(60),
        "a refusal was waited on:\n{err}"
    );
}
