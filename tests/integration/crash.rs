//! kill -9 the archiver five times while a writer commits continuously: the restore of the
//! latest state holds every committed transaction exactly once, and equals the source.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::spine::{tidemark, wait_archived, Archiver, Archiving};
use crate::support::{assert_same_content, snapshot_content};

const KILLS: usize = 5;

/// `ledger` gets one row per transaction (its key is the transaction's sequence number), so a
/// replayed duplicate fails the restore; `journal` has no key, so a duplicate there would survive
/// the restore and show up in the content comparison; `counters` is updated by every transaction.
const CRASH_SCHEMA: &str = "
    CREATE TABLE ledger (txid bigint PRIMARY KEY, note text);
    CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL, last_txid bigint);
    INSERT INTO counters SELECT i, 0, NULL FROM generate_series(0, 9) i;
    CREATE TABLE journal (txid bigint NOT NULL, at timestamptz NOT NULL);
    ALTER TABLE journal REPLICA IDENTITY FULL;
";

/// The pid of the process streaming from the slot, if any.
async fn slot_pid(client: &tokio_postgres::Client, slot: &str) -> Option<i32> {
    client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

/// Waits until a walsender other than `old` streams from the slot (the new archiver is in),
/// failing early with the archiver's log if it reported an error.
async fn wait_new_stream(
    client: &tokio_postgres::Client,
    archiver: &Archiver,
    old: Option<i32>,
) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match slot_pid(client, "tidemark").await {
            Some(pid) if Some(pid) != old => return pid,
            _ => {}
        }
        let log = archiver.log_text();
        assert!(
            !log.contains("error:"),
            "the restarted archiver failed:\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "the restarted archiver did not start streaming:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ledger_ids(client: &tokio_postgres::Client) -> BTreeSet<i64> {
    client
        .query("SELECT txid FROM ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_loses_nothing_and_duplicates_nothing() {
    let started = Instant::now();
    let prepared = Archiving::builder().sql(CRASH_SCHEMA).prepare().await;

    // The writer: one transaction after another, each recorded once its COMMIT returned.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = prepared.cluster.client("app").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut committed = BTreeSet::new();
            let mut txid: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                txid += 1;
                let sql = format!(
                    "BEGIN;
                     INSERT INTO ledger VALUES ({txid}, 'transaction {txid}');
                     UPDATE counters SET n = n + 1, last_txid = {txid} WHERE id = {};
                     INSERT INTO journal VALUES ({txid}, clock_timestamp());
                     COMMIT;",
                    txid % 10
                );
                client
                    .batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("writer transaction {txid}: {e}"));
                committed.insert(txid);
            }
            committed
        })
    };

    // The first run creates the slot and takes the base backup while the writer runs.
    let Archiving {
        cluster,
        src,
        mut archiver,
        repo,
        dir: _repo_dir,
        ..
    } = prepared.archive().await;
    let mut pid = slot_pid(&src, "tidemark").await;

    let seed: u64 = rand::random();
    eprintln!("crash test seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut max_unacknowledged = 0;
    for kill in 1..=KILLS {
        let delay = Duration::from_millis(rng.gen_range(2_000..6_000));
        tokio::time::sleep(delay).await;
        // WAL the slot has not had acknowledged: what this kill puts at risk.
        let unacknowledged: i64 = src
            .query_one(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
                   FROM pg_replication_slots WHERE slot_name = 'tidemark'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        max_unacknowledged = max_unacknowledged.max(unacknowledged);
        archiver.kill();
        eprintln!(
            "kill {kill}: SIGKILL after {delay:?} of streaming, {unacknowledged} bytes of WAL unacknowledged"
        );
        archiver = Archiver::start(&cluster, "app", &repo, &[]);
        pid = Some(wait_new_stream(&src, &archiver, pid).await);
    }

    assert!(
        max_unacknowledged > 0,
        "no kill hit unacknowledged changes: the test proved nothing"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let committed = writer.await.expect("the writer failed");
    eprintln!("writer committed {} transactions", committed.len());
    // Everything committed is stored; then a clean stop.
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    let source_ids = ledger_ids(&src).await;
    let lost_at_source: Vec<_> = committed.difference(&source_ids).take(10).collect();
    assert!(
        lost_at_source.is_empty(),
        "committed but not in the source?! {lost_at_source:?}"
    );

    let repo_arg = repo.to_str().unwrap();
    cluster.create_database("restored");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo_arg,
        "--target",
        &cluster.conninfo("restored"),
        "--latest",
    ]);
    assert_eq!(
        code, 0,
        "restore --latest failed (exit {code}); a duplicated transaction shows as a unique \
         violation on ledger:\n{out}{err}"
    );
    let restored = cluster.client("restored").await;
    let restored_ids = ledger_ids(&restored).await;
    let missing: Vec<_> = source_ids.difference(&restored_ids).collect();
    let extra: Vec<_> = restored_ids.difference(&source_ids).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ledger differs after {KILLS} kills: {} committed transactions missing (first {:?}), {} extra (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)]
    );
    let duplicated = restored
        .query(
            "SELECT txid, count(*) FROM journal GROUP BY txid HAVING count(*) > 1 ORDER BY txid LIMIT 10",
            &[],
        )
        .await
        .unwrap();
    assert!(
        duplicated.is_empty(),
        "transactions replayed twice (journal has no key): {:?}",
        duplicated
            .iter()
            .map(|r| r.get::<_, i64>(0))
            .collect::<Vec<_>>()
    );
    assert_same_content(
        &snapshot_content(&src).await,
        &snapshot_content(&restored).await,
        "source (expected) vs restore --latest after kills (actual)",
    );

    let (code, out, err) = tidemark(&["list", "--repo", repo_arg, "--json"]);
    assert_eq!(code, 0, "list --json failed: {out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{out}"));
    let generations = listing["generations"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no generations array:\n{out}"));
    assert_eq!(
        generations.len(),
        1,
        "kills must not start a new generation:\n{out}"
    );
    let backups = generations[0]["backups"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(backups, 1, "one base backup expected:\n{out}");
    eprintln!("crash test took {:?}", started.elapsed());
}
