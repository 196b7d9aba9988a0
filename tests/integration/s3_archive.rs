//! The archiver on an S3 repository, through our fault proxy: every sixth request answered 503
//! or its connection dropped (by count, so every run meets faults however slow the machine),
//! then a 30 s outage in the middle of a workload. Every
//! instant noted on the way restores exactly, from S3.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::spine::{
    restore_each_instant, server_now, tidemark_env, wait_archived, workload_step, Archiving,
};
use crate::support;
use crate::support::proxy::Mode;
use crate::support::s3::ProxiedS3;

/// The archiver's memory bound while the store is unreachable, for this workload: reading stops
/// once the queues are full (see `archive.rs`: the event queue and the byte budget of sealed
/// segments), so resident memory stays well under this.
const OUTAGE_RSS_BOUND: u64 = 64 << 20;

/// An S3 server behind our fault proxy (in `mode`), a source database with the spine's schema
/// and a first workload step, and an archiver streaming it into `s3://archive/{prefix}`.
struct S3Scenario {
    s3: ProxiedS3,
    env: Vec<(&'static str, String)>,
    /// Its repository folder is unused: the repository is on S3, at `url`.
    archiving: Archiving,
}

async fn s3_scenario(prefix: &str, mode: Mode) -> S3Scenario {
    let s3 = ProxiedS3::start("archive", mode);
    let env = s3.cli_env();
    let archiving = Archiving::builder()
        .repo_url(&format!("s3://archive/{prefix}"))
        .env(&env)
        .start()
        .await;
    S3Scenario { s3, env, archiving }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_and_restore_through_a_faulty_s3() {
    let S3Scenario {
        s3: ProxiedS3 { server, proxy },
        env,
        archiving:
            Archiving {
                cluster,
                src,
                archiver,
                url: repo,
                ..
            },
    } = s3_scenario("app", Mode::Every(6)).await;
    let repo = repo.as_str();

    let mut instants = Vec::new();
    for step in 2..6 {
        workload_step(&src, step).await;
        instants.push((
            server_now(&src).await,
            support::snapshot_content(&src).await,
        ));
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    // By count: the archiver's start alone (write probe, listings, lease, base backup) makes
    // more than the twelve requests that meet a 503 and a dropped connection.
    let counters = proxy.counters();
    let (slowdowns, dropped) = (
        counters.slowdowns.load(Ordering::SeqCst),
        counters.dropped.load(Ordering::SeqCst),
    );
    assert!(
        slowdowns > 0 && dropped > 0,
        "the proxy must have injected 503s and dropped connections into the archiver's requests \
         ({slowdowns} 503s, {dropped} dropped, {} requests)",
        proxy.requests()
    );

    // The chain is whole: list checks every generation for gaps and overlaps.
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", repo]);
    assert_eq!(code, 0, "list through the faulty proxy failed: {out}{err}");
    assert!(
        server.open_uploads().is_empty(),
        "no multipart upload may stay open"
    );
    restore_each_instant(&cluster, repo, &env, &instants, "faulty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_rides_out_a_30_second_s3_outage() {
    let S3Scenario {
        s3: ProxiedS3 {
            server: _server,
            proxy,
        },
        env,
        archiving:
            Archiving {
                cluster,
                src,
                mut archiver,
                url: repo,
                ..
            },
    } = s3_scenario("outage", Mode::Pass).await;
    let repo = repo.as_str();

    let mut instants = Vec::new();
    workload_step(&src, 2).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // S3 unreachable for 30 s while the application keeps committing.
    proxy.set_mode(Mode::Down);
    let outage = Instant::now();
    let mut max_rss = archiver.rss();
    let mut step = 3;
    while outage.elapsed() < Duration::from_secs(30) {
        workload_step(&src, step).await;
        if step % 4 == 0 {
            instants.push((
                server_now(&src).await,
                support::snapshot_content(&src).await,
            ));
        }
        step += 1;
        for _ in 0..10 {
            max_rss = max_rss.max(archiver.rss());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        archiver.assert_running();
    }
    // Nothing was acknowledged beyond what was stored before the outage.
    proxy.set_mode(Mode::Pass);
    workload_step(&src, step).await;
    instants.push((
        server_now(&src).await,
        support::snapshot_content(&src).await,
    ));
    wait_archived(&src, "tidemark", &archiver.log).await;
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        max_rss < OUTAGE_RSS_BOUND,
        "archiver RSS reached {max_rss} bytes during the outage (bound {OUTAGE_RSS_BOUND})"
    );
    assert!(
        log.contains("falling behind") || log.contains("retrying"),
        "the outage must be logged:\n{log}"
    );
    restore_each_instant(&cluster, repo, &env, &instants, "outage").await;
}
