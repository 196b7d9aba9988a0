//! The oracle: a tidemark restore to an instant equals PostgreSQL's own physical point-in-time
//! recovery of the same cluster to the same instant, for instants taken at random moments of a
//! concurrent workload that never pauses (so every instant falls between busy commits).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::spine::{restore_into, server_now, wait_archived, workload_step, Archiving, SCHEMA};
use crate::support::{self, assert_same_hashes, content_hashes, ClusterOptions};

/// Concurrent writer tasks.
const WORKERS: u64 = 4;
/// How long the writers run.
const WORKLOAD: Duration = Duration::from_secs(15);
/// Instants recorded while they run.
const INSTANTS: usize = 4;

/// Tables of the concurrent workload, beside the spine's `SCHEMA`. `bag` has no key and holds
/// rows that are exact duplicates of each other: changing one of two identical rows must change
/// exactly one on replay too.
const ORACLE_SCHEMA: &str = "
    CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text, big text);
    ALTER TABLE accounts ALTER COLUMN big SET STORAGE EXTERNAL;
    INSERT INTO accounts
        SELECT i, 1000, NULL, CASE WHEN i % 4 = 0 THEN repeat(md5(i::text), 100) END
          FROM generate_series(1, 200) i;
    CREATE TABLE items (
        id bigserial PRIMARY KEY, account int NOT NULL, qty int NOT NULL, price numeric(12,2),
        tags text[], payload jsonb, at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE TABLE bag (grp int NOT NULL, val text, n int NOT NULL);
    ALTER TABLE bag REPLICA IDENTITY FULL;
    INSERT INTO bag SELECT i % 20, 'v' || (i % 7), 0 FROM generate_series(1, 200) i;
";

/// One short transaction of a writer, chosen at random. Deadlock-free by construction: every
/// transaction locks at most one row per table, tables in one order, accounts in id order.
async fn random_transaction(
    client: &tokio_postgres::Client,
    rng: &mut StdRng,
    max_item: &AtomicI64,
) {
    let account = rng.gen_range(1..=200);
    let item = rng.gen_range(1..=max_item.load(Ordering::Relaxed).max(1));
    let grp = rng.gen_range(0..20);
    let sql = match rng.gen_range(0..10) {
        0 | 1 => {
            let qty = rng.gen_range(1..50);
            let row = client
                .query_one(
                    "WITH i AS (
                         INSERT INTO items (account, qty, price, tags, payload)
                         VALUES ($1::int, $2::int, round((random() * 1000)::numeric, 2),
                                 ARRAY['t' || $2::int, NULL], jsonb_build_object('q', $2::int, 'a', $1::int))
                         RETURNING id),
                     u AS (UPDATE accounts SET balance = balance - $2::int WHERE id = $1::int)
                     SELECT id FROM i",
                    &[&account, &qty],
                )
                .await
                .unwrap_or_else(|e| panic!("insert item: {e:?}"));
            max_item.fetch_max(row.get(0), Ordering::Relaxed);
            return;
        }
        2 => format!("UPDATE items SET qty = qty + 1, price = price * 1.01, tags = NULL WHERE id = {item}"),
        3 => format!("DELETE FROM items WHERE id = {item}"),
        4 => format!(
            "INSERT INTO bag VALUES ({grp}, 'v{k}', 0), ({grp}, 'v{k}', 0)",
            k = rng.gen_range(0..7)
        ),
        5 => format!(
            "UPDATE bag SET n = n + 1 WHERE ctid = (SELECT ctid FROM bag WHERE grp = {grp} LIMIT 1)"
        ),
        6 => format!("DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE grp = {grp} LIMIT 1)"),
        7 => {
            if rng.gen_bool(0.3) {
                format!(
                    "INSERT INTO docs (title, body) VALUES ('w{item}', repeat(md5('{item}'), 150))"
                )
            } else {
                "UPDATE docs SET version = version + 1 WHERE id = (SELECT max(id) FROM docs)".into()
            }
        }
        8 => {
            let other = rng.gen_range(1..=200);
            let (a, b) = (account.min(other), account.max(other));
            format!(
                "BEGIN;
                 INSERT INTO events (kind, payload) VALUES ('transfer', '{{\"from\": {a}, \"to\": {b}}}');
                 UPDATE accounts SET balance = balance - 7 WHERE id = {a};
                 UPDATE accounts SET balance = balance + 7 WHERE id = {b};
                 COMMIT;"
            )
        }
        _ => format!(
            "UPDATE accounts SET note = CASE WHEN note IS NULL THEN 'note ' || balance END WHERE id = {account}"
        ),
    };
    client
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("workload statement failed: {e:?}\n{sql}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_to_random_instants_under_load_equals_physical_pitr() {
    let started = Instant::now();
    let prepared = Archiving::builder()
        .cluster(ClusterOptions {
            archive_wal: true,
            ..ClusterOptions::default()
        })
        .sql(SCHEMA)
        .sql(ORACLE_SCHEMA)
        .sql("INSERT INTO docs (title, body) VALUES ('first', repeat('x', 9000))")
        .prepare()
        .await;
    let physical = prepared.cluster.base_backup();
    // Changes between the physical and tidemark's base backup: replayed physically, copied by
    // tidemark's base backup.
    workload_step(&prepared.src, 1).await;
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = prepared.archive().await;

    let seed: u64 = rand::random();
    eprintln!("oracle workload seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let max_item = Arc::new(AtomicI64::new(1));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let client = cluster.client("app").await;
        let (stop, max_item) = (stop.clone(), max_item.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                random_transaction(&client, &mut rng, &max_item).await;
                n += 1;
            }
            n
        }));
    }

    // Instants at random moments while the writers run, never at a pause: one in each of
    // INSTANTS equal slots, at least 500 ms apart so that commits separate them.
    let mut rng = StdRng::seed_from_u64(seed);
    let slot = (WORKLOAD.as_millis() as u64 - 2_000) / INSTANTS as u64;
    let offsets: Vec<Duration> = (0..INSTANTS as u64)
        .map(|k| Duration::from_millis(1_000 + k * slot + rng.gen_range(0..slot - 500)))
        .collect();
    let load_start = Instant::now();
    let mut instants = Vec::new();
    for offset in offsets {
        tokio::time::sleep_until((load_start + offset).into()).await;
        instants.push(server_now(&src).await);
    }
    tokio::time::sleep_until((load_start + WORKLOAD).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut transactions = 0;
    for w in workers {
        transactions += w.await.expect("a writer failed");
    }
    eprintln!(
        "oracle workload: {transactions} transactions in {WORKLOAD:?}; instants {instants:?}"
    );
    assert!(
        transactions > 100,
        "the workload barely ran: {transactions} transactions"
    );

    // A commit after the last change is stored, so every instant is provably passed.
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    cluster.switch_wal_and_wait_archived();
    let repo_arg = repo.to_str().unwrap();

    let mut previous: Option<support::ContentHashes> = None;
    for (i, t) in instants.iter().enumerate() {
        let expected = {
            let recovered = physical.recover_to_time(t);
            let client = recovered.client("app").await;
            let hashes = content_hashes(&client).await;
            drop(client);
            hashes
        };
        let db = format!("oracle_{i}");
        let (code, out, err) = restore_into(&cluster, repo_arg, &db, &["--to-time", t]);
        assert_eq!(
            code, 0,
            "restore --to-time {t} failed (exit {code}):\n{out}{err}"
        );
        let actual = content_hashes(&cluster.client(&db).await).await;
        assert_same_hashes(
            &expected,
            &actual,
            &format!(
                "instant {i} {t}: physical PITR (expected) vs tidemark restore (actual); {out}"
            ),
        );
        // The instants must show different states, or the comparison proves little.
        if let Some(prev) = &previous {
            assert_ne!(
                prev,
                &expected,
                "instants {} and {i} show the same content",
                i - 1
            );
        }
        previous = Some(expected);
    }
    eprintln!("oracle test took {:?}", started.elapsed());
}
