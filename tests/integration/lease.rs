//! One writer per repository (issue 13 #1): a second archiver on another slot is refused while
//! the first holds the writer lease, and takes over only once a dead first archiver's lease
//! has expired; the chain stays whole, and a restore equals the source.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::spine::{
    restore_latest_equals, tidemark, wait_archived, workload_step, Archiver, SCHEMA,
};
use crate::support::{self, snapshot_content, Cluster, ClusterOptions};

/// Runs `tidemark archive --slot SLOT` on `repo` and waits (at most `limit`) for it to exit:
/// its exit code (None: still running, killed) and its stderr.
fn archive_until_exit(
    cluster: &Cluster,
    repo: &Path,
    slot: &str,
    env: &[(&str, &str)],
    limit: Duration,
) -> (Option<i32>, String) {
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(support::tidemark_bin())
        .args(["archive", "--source", &cluster.conninfo("app")])
        .args(["--repo", repo.to_str().unwrap(), "--slot", slot])
        .env("TIDEMARK_LOG", "info")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("start tidemark archive");
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        code,
        std::fs::read_to_string(err.path()).unwrap_or_default(),
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn setup_slot(cluster: &Cluster, slot: &str) {
    let (code, out, err) = tidemark(&[
        "setup",
        "--source",
        &cluster.conninfo("app"),
        "--slot",
        slot,
    ]);
    assert_eq!(code, 0, "setup --slot {slot}: {out}{err}");
}

/// The case: `setup --slot tm2`, then `archive --slot tm2` on the repository another
/// archiver is writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_archiver_on_another_slot_is_refused_naming_the_first() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("app");
    let src = cluster.client("app").await;
    src.batch_execute(SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");

    let mut first = Archiver::start(&cluster, "app", &repo, &[]);
    first.wait_streaming(&src, "tidemark").await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", &first.log).await;

    setup_slot(&cluster, "tm2");
    let (code, err) = archive_until_exit(&cluster, &repo, "tm2", &[], Duration::from_secs(60));
    assert_eq!(
        code,
        Some(4),
        "the second archiver is refused (exit 4):\n{err}"
    );
    for needle in [
        format!("pid {}", first.pid()),
        format!("host {}", hostname()),
        "slot \"tidemark\"".to_string(),
        "HINT".to_string(),
    ] {
        assert!(
            err.contains(&needle),
            "the refusal names {needle:?}:\n{err}"
        );
    }

    // The first goes on, and its chain is whole.
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &first.log).await;
    first.assert_running();
    first.stop();
    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "list after the refused second archiver: {out}{err}"
    );
    let expected = snapshot_content(&src).await;
    restore_latest_equals(&cluster, repo.to_str().unwrap(), "restored", &expected).await;

    // Stopped cleanly, the first released the lease: the next archiver starts at once.
    let mut next = Archiver::start(&cluster, "app", &repo, &["--slot", "tidemark"]);
    next.wait_streaming(&src, "tidemark").await;
    next.stop();
}

/// A dead (kill -9) archiver's lease holds another slot's archiver off until it expires; then
/// that archiver takes over and extends the same chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_archivers_lease_expires_and_another_slot_takes_over() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("app");
    let src = cluster.client("app").await;
    src.batch_execute(SCHEMA).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let ttl = [("TIDEMARK_LEASE_TTL", "8s")];
    let ttl_env = [("TIDEMARK_LEASE_TTL", "8s".to_string())];

    // tm2 exists before the first archiver's first segment, so it can resume the chain.
    setup_slot(&cluster, "tm2");
    let mut first = Archiver::start_with(&cluster, "app", repo.to_str().unwrap(), &[], &ttl_env);
    first.wait_streaming(&src, "tidemark").await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", &first.log).await;
    let pid = first.pid();
    first.kill();
    let killed = Instant::now();

    let (code, err) = archive_until_exit(&cluster, &repo, "tm2", &ttl, Duration::from_secs(60));
    if killed.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            code,
            Some(4),
            "refused while the dead one's lease is live:\n{err}"
        );
        assert!(err.contains(&format!("pid {pid}")), "{err}");
    }

    // Past the expiry, the second takes over.
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(killed.elapsed())).await;
    workload_step(&src, 2).await;
    let mut second = Archiver::start_with(
        &cluster,
        "app",
        repo.to_str().unwrap(),
        &["--slot", "tm2"],
        &ttl_env,
    );
    second.wait_streaming(&src, "tm2").await;
    assert!(
        second.log_text().contains("lease expired"),
        "the takeover is logged:\n{}",
        second.log_text()
    );
    workload_step(&src, 3).await;
    wait_archived(&src, "tm2", &second.log).await;
    second.stop();
    let expected = snapshot_content(&src).await;
    restore_latest_equals(&cluster, repo.to_str().unwrap(), "restored", &expected).await;
}
