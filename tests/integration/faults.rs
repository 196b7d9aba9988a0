//! Repository faults the archiver must survive without leaving the archive broken: a segment
//! whose upload fails for good while later ones succeed, a segment deleted by hand, leftovers
//! stored past a hole.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidemark::archive::{self, ArchiveError, ArchiveOptions};
use tidemark::catalog::chain;
use tidemark::conninfo::ConnInfo;
use tidemark::lsn::Lsn;
use tidemark::store::faulty::{Fault, FaultyStore, Op, Rule, Times};
use tidemark::store::{LocalStore, Store};
use tokio_util::sync::CancellationToken;

use crate::spine::{wait_archived, Archiver, Archiving, Prepared};
use crate::support::metrics::{self, metric, scrape};
use crate::support::Cluster;

const SCHEMA: &str = "CREATE TABLE t (id bigint PRIMARY KEY, v text NOT NULL);";

/// The segments of generation 1 in the folder repository at `repo`.
async fn chain(repo: &Path) -> Vec<chain::SegmentRef> {
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(repo));
    chain::list_segments(&store)
        .await
        .unwrap()
        .remove(&1)
        .unwrap_or_default()
}

async fn confirmed_flush(src: &tokio_postgres::Client) -> Lsn {
    let s: String = src
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'tidemark'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    s.parse().unwrap()
}

/// Commits a row every 20 ms until `stop` is set.
fn keep_writing(
    src: Arc<tokio_postgres::Client>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 1_000_000i64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            src.execute("INSERT INTO t VALUES ($1, 'w')", &[&i])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Starts the archiver on `app` serving metrics (see [`metrics::start_with_metrics`]).
async fn start_with_metrics(cluster: &Cluster, repo: &Path) -> (Archiver, String) {
    metrics::start_with_metrics(&cluster.conninfo("app"), repo.to_str().unwrap(), &[], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_leaves_no_segment_past_it_and_the_slot_not_acknowledged_past_it() {
    let Prepared {
        cluster,
        src,
        repo: repo_path,
        dir: _repo_dir,
        ..
    } = Archiving::builder().sql(SCHEMA).prepare().await;
    let src = Arc::new(src);
    let info = ConnInfo::parse(&cluster.conninfo("app")).unwrap();
    let opts = ArchiveOptions {
        seal_interval: Duration::from_millis(100),
        heartbeat: None,
        status_interval: Duration::from_millis(200),
        ..ArchiveOptions::default()
    };

    // The second segment's put fails after 1.5 s: meanwhile later segments are sealed and
    // stored (up to four upload at once).
    let is_segment = |k: &str| k.starts_with(chain::SEGMENTS_PREFIX);
    let faulty = Arc::new(FaultyStore::new(Arc::new(LocalStore::new(&repo_path))));
    faulty.add_rule(
        Rule::new(Op::Put, Fault::Permanent, Times::N(1))
            .keys(is_segment)
            .after(1)
            .delay(Duration::from_millis(1500)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(src.clone(), stop.clone());
    let store: Arc<dyn Store> = faulty.clone();
    let run = tokio::time::timeout(
        Duration::from_secs(90),
        archive::run(&info, store, &opts, CancellationToken::new()),
    )
    .await
    .expect("the archiver stops at the failed upload");
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let failed_key = match faulty.injected_keys(Op::Put).as_slice() {
        [key] => key.clone(),
        other => panic!("one injected failure expected, got {other:?}"),
    };
    let (_, failed_start, _) = tidemark::catalog::keys::parse_segment(&failed_key)
        .map(|k| (k.generation, k.start, k.end))
        .unwrap();
    match run {
        Err(ArchiveError::Upload { range, .. }) => {
            assert!(
                range.starts_with(&failed_start.to_string()),
                "{range} vs {failed_key}"
            )
        }
        other => panic!("expected the injected upload failure, got {other:?}"),
    }
    assert!(
        faulty
            .calls(Op::Put)
            .iter()
            .filter(|k| is_segment(k))
            .count()
            > 2,
        "later segments were stored while the failing put waited"
    );

    // Nothing past the failed segment stays, and the slot was not acknowledged past its start.
    let segments = chain(&repo_path).await;
    assert!(!segments.is_empty());
    assert!(
        segments.iter().all(|s| s.end <= failed_start),
        "segments past the failed one {failed_key}: {segments:?}"
    );
    assert_eq!(chain::check_chain(&segments).unwrap(), Some(failed_start));
    let confirmed = confirmed_flush(&src).await;
    assert!(
        confirmed <= failed_start,
        "slot confirmed {confirmed}, past the failed segment's start {failed_start}"
    );

    // The next run resumes at the archive's end and archives on, with a whole chain.
    src.execute("INSERT INTO t VALUES (1, 'after')", &[])
        .await
        .unwrap();
    let mut archiver = Archiver::start(&cluster, "app", &repo_path, &[]);
    archiver.wait_streaming(&src, "tidemark").await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    archiver.stop();
    let segments = chain(&repo_path).await;
    let end = chain::check_chain(&segments).unwrap().unwrap();
    assert!(end > failed_start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_goes_on_past_a_deleted_segment_and_drops_leftovers_past_a_hole() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo: repo_path,
        dir: _repo_dir,
        ..
    } = Archiving::builder().sql(SCHEMA).start().await;
    for i in 0..3i64 {
        src.execute("INSERT INTO t VALUES ($1, 'before')", &[&i])
            .await
            .unwrap();
        wait_archived(&src, "tidemark", &archiver.log).await;
    }
    archiver.stop();
    let segments = chain(&repo_path).await;
    assert!(segments.len() >= 3, "{segments:?}");
    let end = chain::check_chain(&segments).unwrap().unwrap();

    // Someone deletes an archived segment; a failed upload left a segment past a hole above
    // the slot's confirmed position (a copy of a real one under a later name).
    let deleted = &segments[segments.len() / 2];
    std::fs::remove_file(repo_path.join(&deleted.key)).unwrap();
    assert!(confirmed_flush(&src).await <= end);
    let orphan = tidemark::catalog::keys::segment(1, Lsn(end.0 + 0x1000), Lsn(end.0 + 0x2000));
    std::fs::copy(
        repo_path.join(&segments.last().unwrap().key),
        repo_path.join(&orphan),
    )
    .unwrap();

    let (mut archiver, metrics_addr) = start_with_metrics(&cluster, &repo_path).await;
    archiver.wait_streaming(&src, "tidemark").await;
    let holes = metric(&scrape(&metrics_addr), "tidemark_segment_chain_holes");
    assert_eq!(holes, Some(1.0), "the hole is counted");
    src.execute("INSERT INTO t VALUES (100, 'after')", &[])
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        log.contains("the archive has a hole")
            && log.contains(&format!("{}-{}", deleted.start, deleted.end)),
        "the hole is reported, named:\n{log}"
    );
    assert!(
        log.contains("deleting segments stored past a hole"),
        "the leftover is reported:\n{log}"
    );
    assert!(!repo_path.join(&orphan).exists(), "the leftover is deleted");
    let after = chain(&repo_path).await;
    let holes = chain::chain_holes(&after).unwrap();
    assert_eq!(
        holes.len(),
        1,
        "only the deleted segment is missing: {holes:?}"
    );
    assert_eq!((holes[0].from, holes[0].to), (deleted.start, deleted.end));
    assert!(
        after.last().unwrap().end > end,
        "archiving went on past the hole"
    );
}
