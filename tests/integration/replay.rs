//! Replay's batching (prepared statements, multi-row INSERTs of power-of-two sizes, several
//! source transactions per target transaction) against many small transactions: a restore to
//! an instant between two of them, wherever it falls in a group, equals the source then.

use std::time::Duration;

use crate::spine::{
    restore_each_instant, restore_latest_equals, server_now, wait_archived,
    wait_heartbeat_received, Archiving,
};
use crate::support;

const SCHEMA: &str = "
    CREATE TABLE counters (id int PRIMARY KEY, n bigint NOT NULL, note text);
    INSERT INTO counters SELECT i, 0, NULL FROM generate_series(1, 3) i;
    CREATE TABLE ledger (id bigserial PRIMARY KEY, k int NOT NULL, note text);
    CREATE TABLE slots (id int PRIMARY KEY, pos int NOT NULL UNIQUE DEFERRABLE INITIALLY DEFERRED);
    INSERT INTO slots VALUES (1, 1), (2, 2);
    CREATE TABLE tags (k int, v text);
    ALTER TABLE tags REPLICA IDENTITY FULL;
    INSERT INTO tags SELECT i % 4, 'v' || i FROM generate_series(1, 8) i;
";

/// Small transaction number `i`: hot-row updates (like pgbench's branches), an insert run of
/// `i % 70` rows (every size up to 69, so every split into power-of-two INSERTs), deletes,
/// NULLs, a swap only a deferred unique constraint allows, and a REPLICA IDENTITY FULL table.
async fn small_transaction(client: &tokio_postgres::Client, i: i32) {
    let rows = i % 70;
    let swap = if i % 7 == 0 {
        "UPDATE slots SET pos = 3 - pos;"
    } else {
        ""
    };
    let note = if i % 3 == 0 {
        "NULL".to_string()
    } else {
        format!("'t{i} it''s'")
    };
    client
        .batch_execute(&format!(
            "BEGIN;
             UPDATE counters SET n = n + {i}, note = {note} WHERE id = {i} % 3 + 1;
             INSERT INTO ledger (k, note) SELECT {i}, CASE WHEN j % 5 = 0 THEN NULL ELSE 'row ' || j END
               FROM generate_series(1, {rows}) j;
             UPDATE counters SET n = n - 1 WHERE id = 1;
             DELETE FROM ledger WHERE id IN (SELECT id FROM ledger WHERE k = {i} - 3 ORDER BY id LIMIT 2);
             UPDATE tags SET v = v || '.' WHERE ctid = (SELECT ctid FROM tags WHERE k = {i} % 4 LIMIT 1);
             {swap}
             COMMIT;"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_between_small_transactions_equals_the_source_then() {
    let Archiving {
        cluster,
        src,
        archiver,
        url: repo,
        dir: _repo_dir,
        ..
    } = Archiving::builder().sql(SCHEMA).start().await;

    // Instants after transactions 1, 45, 77 and 150 of 150: before the first group ends, and
    // inside later groups.
    let noted = [1, 45, 77];
    let mut instants = Vec::new();
    for i in 1..=150 {
        small_transaction(&src, i).await;
        if noted.contains(&i) {
            let t = server_now(&src).await;
            instants.push((t, support::snapshot_content(&src).await));
        }
    }
    let final_content = support::snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    // A quiet instant: only the archiver's heartbeat commits after it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let quiet = server_now(&src).await;
    wait_heartbeat_received(&src, "tidemark", &quiet, &archiver.log).await;
    archiver.stop();
    instants.push((quiet, final_content.clone()));

    restore_each_instant(&cluster, &repo, &[], &instants, "replayed").await;

    restore_latest_equals(&cluster, &repo, "replayed_latest", &final_content).await;
}
