//! Transactions the server streams or prepares: a huge transaction archived with flat memory,
//! streamed transactions that abort (also across an archiver restart in the middle of the
//! stream), subtransactions rolled back to a savepoint, and two-phase commit. Each scenario
//! restores to several instants and compares data and schema with the source at that instant.
//!
//! `logical_decoding_work_mem = 64kB` makes the server stream every transaction larger than
//! that (PostgreSQL ≥ 14 with protocol 2 and `streaming` on, which the archiver asks for).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backup::pg_dump_schema;
use crate::spine::{restore_into, server_now, wait_archived, Archiver, Archiving};
use crate::support::{self, Cluster, ClusterOptions, ContentHashes};

/// An instant of the source: its time, exact content, and schema.
struct Instant_ {
    name: &'static str,
    time: String,
    content: ContentHashes,
    schema: String,
}

async fn note(cluster: &Cluster, src: &tokio_postgres::Client, name: &'static str) -> Instant_ {
    let time = server_now(src).await;
    let content = support::content_hashes(src).await;
    let schema = pg_dump_schema(cluster, "app");
    // Distinct instants: the next commit is clearly after this one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Instant_ {
        name,
        time,
        content,
        schema,
    }
}

/// Restores to each instant into a fresh database and compares content and schema.
async fn restore_and_compare(cluster: &Cluster, repo: &Path, instants: &[Instant_], tag: &str) {
    for (i, at) in instants.iter().enumerate() {
        let db = format!("{tag}_{i}");
        let started = Instant::now();
        let (code, out, err) = restore_into(
            cluster,
            repo.to_str().unwrap(),
            &db,
            &["--to-time", &at.time],
        );
        assert_eq!(
            code, 0,
            "restore to {} ({}) failed: {out}{err}",
            at.name, at.time
        );
        eprintln!("restore to {} took {:?}", at.name, started.elapsed());
        let restored = support::content_hashes(&cluster.client(&db).await).await;
        support::assert_same_hashes(&at.content, &restored, &format!("restore to {}", at.name));
        assert_eq!(
            at.schema,
            pg_dump_schema(cluster, &db),
            "schema after restore to {}",
            at.name
        );
    }
}

/// The archiver's resident memory in kB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Cumulative bytes the server streamed for the slot (pg_stat_replication_slots, PG ≥ 14).
async fn stream_bytes(src: &tokio_postgres::Client) -> i64 {
    src.query_one(
        "SELECT coalesce((SELECT stream_bytes FROM pg_stat_replication_slots
                           WHERE slot_name = 'tidemark'), 0)",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Waits until the server has streamed more than `before` bytes for the slot. `obs` must not be
/// inside a transaction: statistics are read once per transaction (stats_fetch_consistency).
async fn wait_streamed(src: &tokio_postgres::Client, archiver: &Archiver, before: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_bytes(src).await <= before {
        assert!(
            Instant::now() < deadline,
            "the server never streamed {what}:\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SCHEMA: &str = "
    CREATE TABLE big (id bigint PRIMARY KEY, pad text NOT NULL);
    CREATE TABLE items (id int PRIMARY KEY, label text, qty int NOT NULL DEFAULT 0);
    CREATE TABLE log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, note text);
    INSERT INTO items SELECT i, 'item ' || i, i FROM generate_series(1, 50) i;
";

/// A cluster that streams every transaction over 64 kB (server settings `extra_conf` added),
/// [`SCHEMA`] in `app`, and an archiver (flags `args`) streaming it, past its base backup's time.
async fn start(extra_conf: &[&str], args: &[&str]) -> Archiving {
    let mut conf = vec!["logical_decoding_work_mem = 64kB".to_string()];
    conf.extend(extra_conf.iter().map(|s| s.to_string()));
    let archiving = Archiving::builder()
        .cluster(ClusterOptions {
            extra_conf: conf,
            ..ClusterOptions::default()
        })
        .sql(SCHEMA)
        .args(args)
        .start()
        .await;
    // The base backup's time is the earliest restorable instant.
    tokio::time::sleep(Duration::from_millis(500)).await;
    archiving
        .src
        .batch_execute("INSERT INTO log (note) VALUES ('archiving')")
        .await
        .unwrap();
    archiving
}

/// A transaction of TIDEMARK_HUGE_ROWS rows (default 300 000) is streamed and archived while
/// the archiver's memory stays flat; restore before and after it equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_transaction_is_archived_with_flat_memory() {
    let rows: i64 = std::env::var("TIDEMARK_HUGE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = start(&[], &["--segment-bytes", "1048576"]).await;
    let mut instants = vec![note(&cluster, &src, "before").await];

    let pid = archiver.pid();
    let baseline = rss_kb(pid).expect("archiver RSS");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(rss_kb(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            max
        })
    };
    let started = Instant::now();
    src.batch_execute(&format!(
        "INSERT INTO big SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, {rows}) i"
    ))
    .await
    .unwrap();
    let inserted = started.elapsed();
    src.batch_execute("UPDATE items SET qty = qty + 1 WHERE id <= 10")
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    let archived = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap();
    eprintln!(
        "{rows} rows: insert {inserted:?}, archived after {archived:?}; archiver RSS {baseline} kB before, max {max} kB"
    );
    wait_streamed(&src, &archiver, 0, "the huge transaction").await;
    // Buffering the transaction would take well over 150 bytes per row; flat memory is the
    // open 1 MiB segment, a few sealed ones queued for upload, and the channels.
    const BOUND_KB: u64 = 48 * 1024;
    assert!(
        max.saturating_sub(baseline) < BOUND_KB,
        "archiver RSS grew from {baseline} kB to {max} kB while archiving {rows} rows (bound: +{BOUND_KB} kB)"
    );
    instants.push(note(&cluster, &src, "after").await);
    src.batch_execute("DELETE FROM big WHERE id % 1000 = 0; INSERT INTO log (note) VALUES ('x')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "after delete").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    restore_and_compare(&cluster, &repo, &instants, "huge").await;
}

/// Streamed transactions that abort leave nothing, also one in progress while the archiver
/// was killed and restarted; one that commits after the restart is restored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_streamed_transactions_leave_nothing_also_across_a_restart() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = start(&[], &[]).await;
    src.batch_execute("INSERT INTO big VALUES (0, 'first')")
        .await
        .unwrap();
    let mut instants = vec![note(&cluster, &src, "start").await];

    // Streamed, then rolled back. Statistics are watched from a session outside it.
    let obs = cluster.client("app").await;
    let before = stream_bytes(&obs).await;
    src.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT i, repeat(md5(i::text), 2) FROM generate_series(1, 20000) i;
         UPDATE items SET qty = -1;
         DELETE FROM items WHERE id > 40;",
    )
    .await
    .unwrap();
    wait_streamed(&obs, &archiver, before, "the first transaction").await;
    src.batch_execute("ROLLBACK").await.unwrap();
    src.batch_execute("INSERT INTO log (note) VALUES ('after abort')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "after abort").await);

    // Two transactions in progress across a kill -9 of the archiver: one commits after the
    // restart, one aborts.
    let committer = cluster.client("app").await;
    let aborter = cluster.client("app").await;
    let before = stream_bytes(&obs).await;
    committer
        .batch_execute(
            "BEGIN;
             INSERT INTO big SELECT i, repeat(md5(i::text), 2) FROM generate_series(100001, 130000) i;
             UPDATE items SET label = label || ' (c)' WHERE id % 2 = 0;",
        )
        .await
        .unwrap();
    aborter
        .batch_execute(
            "BEGIN;
             INSERT INTO big SELECT i, 'gone' FROM generate_series(200001, 230000) i;
             DELETE FROM items WHERE id % 3 = 0 AND id % 2 = 1;",
        )
        .await
        .unwrap();
    wait_streamed(&obs, &archiver, before, "the transactions in progress").await;
    // Let the archiver seal and store segments holding their first chunks.
    wait_for_streamed_segment(&repo).await;
    src.batch_execute("INSERT INTO log (note) VALUES ('before kill')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "before kill").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.kill();

    let mut archiver = Archiver::start(&cluster, "app", &repo, &[]);
    archiver.wait_streaming(&src, "tidemark").await;
    committer
        .batch_execute(
            "INSERT INTO big SELECT i, 'late' FROM generate_series(130001, 135000) i;
             COMMIT;",
        )
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "after commit").await);
    aborter
        .batch_execute(
            "INSERT INTO big SELECT i, 'gone too' FROM generate_series(230001, 240000) i;
             ROLLBACK;",
        )
        .await
        .unwrap();
    src.batch_execute("INSERT INTO log (note) VALUES ('end')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "end").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    restore_and_compare(&cluster, &repo, &instants, "aborted").await;
}

/// Waits until the repository holds a segment with records of a streamed transaction.
async fn wait_for_streamed_segment(repo: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = walk(&repo.join("segments")).into_iter().any(|p| {
            std::fs::read(&p).ok().is_some_and(|b| {
                tidemark::segment::read_info(&b)
                    .is_ok_and(|(i, _)| i.flags & tidemark::segment::FLAG_STREAMED != 0)
            })
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no segment with streamed records was stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// ROLLBACK TO SAVEPOINT discards only the subtransaction's changes, in small (sent whole)
/// and streamed transactions, with nested and released savepoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoint_rollbacks_discard_only_the_subtransaction() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = start(&[], &[]).await;
    let mut instants = vec![note(&cluster, &src, "start").await];

    src.batch_execute(
        "BEGIN;
         INSERT INTO big VALUES (1, 'kept');
         SAVEPOINT a;
         INSERT INTO big VALUES (2, 'rolled back');
         UPDATE items SET qty = 1000 WHERE id = 1;
         ROLLBACK TO SAVEPOINT a;
         INSERT INTO big VALUES (3, 'kept after rollback');
         SAVEPOINT b;
         UPDATE items SET qty = 2000 WHERE id = 2;
         RELEASE SAVEPOINT b;
         COMMIT;",
    )
    .await
    .unwrap();
    instants.push(note(&cluster, &src, "small").await);

    let before = stream_bytes(&src).await;
    src.batch_execute(
        "BEGIN;
         INSERT INTO big SELECT i, repeat(md5(i::text), 2) FROM generate_series(1000, 16000) i;
         SAVEPOINT s1;
         INSERT INTO big SELECT i, 'rolled back' FROM generate_series(20000, 36000) i;
         UPDATE big SET pad = 'changed in s1' WHERE id BETWEEN 1000 AND 3000;
         DELETE FROM items WHERE id <= 5;
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s2;
         INSERT INTO big SELECT i, 'kept in s2' FROM generate_series(40000, 45000) i;
         SAVEPOINT s3;
         UPDATE big SET pad = 'changed in s3' WHERE id BETWEEN 40000 AND 40100;
         SAVEPOINT s4;
         INSERT INTO big SELECT i, 'nested, rolled back' FROM generate_series(50000, 60000) i;
         ROLLBACK TO SAVEPOINT s3;
         RELEASE SAVEPOINT s2;
         UPDATE items SET label = 'top' WHERE id = 7;
         SAVEPOINT s5;
         DELETE FROM big WHERE id BETWEEN 1000 AND 1010;
         RELEASE SAVEPOINT s5;
         COMMIT;",
    )
    .await
    .unwrap();
    // The walsender decodes after COMMIT returns: wait for it rather than read the counter once.
    wait_streamed(&src, &archiver, before, "the transaction with savepoints").await;
    instants.push(note(&cluster, &src, "streamed").await);
    src.batch_execute("INSERT INTO log (note) VALUES ('end')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "end").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    restore_and_compare(&cluster, &repo, &instants, "savepoint").await;
}

/// With two_phase off, a prepared transaction is archived at COMMIT PREPARED (and not at all
/// if rolled back): restores between PREPARE and COMMIT PREPARED do not hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_transactions_count_when_committed() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = start(&["max_prepared_transactions = 10"], &[]).await;
    let other = cluster.client("app").await;
    let mut instants = vec![note(&cluster, &src, "start").await];

    src.batch_execute(
        "BEGIN; INSERT INTO big VALUES (1, 'p1'); UPDATE items SET qty = 0 WHERE id = 1;
         PREPARE TRANSACTION 'p1';",
    )
    .await
    .unwrap();
    other
        .batch_execute("INSERT INTO log (note) VALUES ('while p1 is prepared')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "p1 prepared").await);
    src.batch_execute("COMMIT PREPARED 'p1'").await.unwrap();
    instants.push(note(&cluster, &src, "p1 committed").await);

    // A large prepared transaction: streamed, then committed.
    src.batch_execute(
        "BEGIN; INSERT INTO big SELECT i, repeat(md5(i::text), 2) FROM generate_series(1000, 16000) i;
         PREPARE TRANSACTION 'p2';",
    )
    .await
    .unwrap();
    other
        .batch_execute("INSERT INTO log (note) VALUES ('while p2 is prepared')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "p2 prepared").await);
    // Small and large ones rolled back, interleaved with other commits.
    src.batch_execute(
        "BEGIN; INSERT INTO big VALUES (2, 'p3'); DELETE FROM items WHERE id = 2;
         PREPARE TRANSACTION 'p3';
         BEGIN; INSERT INTO big SELECT i, 'p4' FROM generate_series(20000, 36000) i;
         PREPARE TRANSACTION 'p4';",
    )
    .await
    .unwrap();
    src.batch_execute("COMMIT PREPARED 'p2'").await.unwrap();
    instants.push(note(&cluster, &src, "p2 committed").await);
    other
        .batch_execute("INSERT INTO log (note) VALUES ('p3, p4 still prepared')")
        .await
        .unwrap();
    src.batch_execute("ROLLBACK PREPARED 'p3'").await.unwrap();
    other
        .batch_execute("UPDATE items SET qty = qty + 1 WHERE id = 3")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "p3 rolled back").await);
    src.batch_execute("ROLLBACK PREPARED 'p4'").await.unwrap();
    other
        .batch_execute("INSERT INTO log (note) VALUES ('end')")
        .await
        .unwrap();
    instants.push(note(&cluster, &src, "p4 rolled back").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    restore_and_compare(&cluster, &repo, &instants, "prepared").await;
}

/// Schema changes inside a transaction the server streams (a migration that also rewrites many
/// rows): the captured DDL is replayed at its place inside the streamed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_inside_a_streamed_transaction_replay_in_place() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = start(&[], &[]).await;
    let mut instants = vec![note(&cluster, &src, "start").await];

    let before = stream_bytes(&src).await;
    // One statement per query, as migration tools send them: DDL capture records each query.
    for sql in [
        "BEGIN",
        "INSERT INTO big SELECT i, repeat(md5(i::text), 2) FROM generate_series(1, 15000) i",
        "ALTER TABLE items ADD COLUMN note text",
        "UPDATE items SET note = 'n' || id WHERE id % 2 = 0",
        "ALTER TABLE big ADD COLUMN flag boolean NOT NULL DEFAULT false",
        "UPDATE big SET flag = true WHERE id % 3 = 0",
        "CREATE TABLE fresh (id int PRIMARY KEY, big_id bigint REFERENCES big (id))",
        "INSERT INTO fresh SELECT i, i FROM generate_series(1, 500) i",
        "ALTER TABLE items RENAME COLUMN label TO title",
        "COMMIT",
    ] {
        src.batch_execute(sql).await.unwrap();
    }
    wait_streamed(&src, &archiver, before, "the migration").await;
    instants.push(note(&cluster, &src, "migrated").await);
    src.batch_execute(
        "UPDATE items SET title = title || '!' WHERE id < 10;
         INSERT INTO fresh VALUES (501, 501);",
    )
    .await
    .unwrap();
    instants.push(note(&cluster, &src, "after").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    restore_and_compare(&cluster, &repo, &instants, "migration").await;
}
