//! The spine end to end: archive a workload, note the exact content at three instants, restore
//! to each instant (and to the latest) into fresh databases, and compare row for row.

pub use crate::support::archiving::*;

use std::time::Duration;

use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_each_instant_equals_the_source_then() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = Archiving::start(&[]).await;

    let mut instants = Vec::new();
    for step in 2..5 {
        workload_step(&src, step).await;
        let t = server_now(&src).await;
        let content = support::snapshot_content(&src).await;
        instants.push((t, content));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    workload_step(&src, 9).await;
    let final_content = support::snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    // A quiet period: no commit of the application after this instant; the archiver's
    // heartbeat lets the archive see the server's clock pass it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = server_now(&src).await;
    wait_heartbeat_received(&src, "tidemark", &quiet, &archiver.log).await;
    archiver.stop();
    instants.push((quiet, final_content.clone()));

    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap()]);
    assert_eq!(code, 0, "list failed: {out}{err}");
    assert!(out.contains("base backup"), "{out}");

    restore_each_instant(&cluster, repo.to_str().unwrap(), &[], &instants, "restored").await;
    // An instant the archive has not seen passed is refused, never moved.
    let (code, out, err) = restore_into(
        &cluster,
        repo.to_str().unwrap(),
        "restored_future",
        &["--to-time", "2999-01-01 00:00:00+00"],
    );
    assert_eq!(code, 6, "a future target must be refused: {out}{err}");
    assert!(
        err.contains("earliest restorable instant") && err.contains("latest"),
        "{err}"
    );

    let c = restore_latest_equals(
        &cluster,
        repo.to_str().unwrap(),
        "restored_latest",
        &final_content,
    )
    .await;
    // The restored application can insert: sequences are past every value.
    c.execute("INSERT INTO docs (title) VALUES ('after restore')", &[])
        .await
        .unwrap();
    c.execute("INSERT INTO events (kind) VALUES ('after restore')", &[])
        .await
        .unwrap();
}
