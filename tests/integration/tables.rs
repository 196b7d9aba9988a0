//! Table kinds round-trip: tables without a primary key (REPLICA IDENTITY FULL, with duplicate
//! identical rows), REPLICA IDENTITY USING INDEX, partitioned tables (several levels, default
//! partitions, rows moving between partitions) published via their leaves and via their root,
//! table inheritance (a change of a parent never reaches a child), TRUNCATE … CASCADE and
//! TRUNCATE … RESTART IDENTITY, unchanged TOAST values in updates.
//! Each scenario restores to several instants and compares data and schema with the source.

use std::time::Duration;

use crate::spine::{server_now, tidemark, wait_archived, Archiving};
use crate::support::{self, assert_same_schema, wait_base_backup};
use crate::types::schema_of;

const SCHEMA: &str = "
    CREATE TABLE nopk (a int, b text, big text);
    ALTER TABLE nopk REPLICA IDENTITY FULL;
    ALTER TABLE nopk ALTER COLUMN big SET STORAGE EXTERNAL;

    CREATE TABLE byidx (a int NOT NULL, b text NOT NULL, v text, big text);
    CREATE UNIQUE INDEX byidx_ab ON byidx (a, b);
    ALTER TABLE byidx REPLICA IDENTITY USING INDEX byidx_ab;
    ALTER TABLE byidx ALTER COLUMN big SET STORAGE EXTERNAL;

    CREATE TABLE measure (id int, at date, region text, v numeric, note text,
                          PRIMARY KEY (id, at, region)) PARTITION BY RANGE (at);
    CREATE TABLE measure_2025 PARTITION OF measure
        FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY LIST (region);
    CREATE TABLE measure_2025_eu PARTITION OF measure_2025 FOR VALUES IN ('eu');
    CREATE TABLE measure_2025_other PARTITION OF measure_2025 DEFAULT;
    CREATE TABLE measure_2026 PARTITION OF measure FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    CREATE TABLE measure_default PARTITION OF measure DEFAULT;
    ALTER TABLE measure_2026 ALTER COLUMN note SET STORAGE EXTERNAL;

    CREATE TABLE logs (at date, msg text) PARTITION BY RANGE (at);
    CREATE TABLE logs_2025 PARTITION OF logs FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
    CREATE TABLE logs_rest PARTITION OF logs DEFAULT;
    ALTER TABLE logs REPLICA IDENTITY FULL;
    ALTER TABLE logs_2025 REPLICA IDENTITY FULL;
    ALTER TABLE logs_rest REPLICA IDENTITY FULL;

    -- Table inheritance: a change of the parent must never reach the child's row with the
    -- same key.
    CREATE TABLE animals (id int PRIMARY KEY, name text);
    CREATE TABLE dogs (breed text) INHERITS (animals);
    ALTER TABLE dogs ADD PRIMARY KEY (id);
    CREATE TABLE pets (name text, kind text) INHERITS (animals);
    ALTER TABLE pets REPLICA IDENTITY FULL;

    CREATE TABLE customers (id int PRIMARY KEY, name text);
    CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers, total int);
    CREATE TABLE tickets (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, s serial, what text);
";

/// One step of the workload; `k` makes the rows of each step distinct.
fn step(k: i32) -> String {
    let mut sql = format!(
        "
        -- Duplicates in a table without a key: an UPDATE or DELETE touches exactly one.
        INSERT INTO nopk VALUES ({k}, 'dup', NULL), ({k}, 'dup', NULL), ({k}, 'dup', NULL),
            ({k}, 'dup', repeat(md5('{k}'), 2000)), ({k}, 'dup', repeat(md5('{k}'), 2000)),
            ({k}, 'dup', repeat(md5('{k}'), 2000));
        UPDATE nopk SET b = 'changed' WHERE ctid = (SELECT ctid FROM nopk WHERE a = {k} AND big IS NULL LIMIT 1);
        DELETE FROM nopk WHERE ctid = (SELECT ctid FROM nopk WHERE a = {k} AND big IS NOT NULL LIMIT 1);
        -- The TOASTed value is unchanged: not in the new tuple.
        UPDATE nopk SET a = a + 1000 WHERE a = {k} - 1 AND big IS NOT NULL;

        INSERT INTO byidx SELECT i, 'k{k}', 'v', CASE WHEN i = 1 THEN repeat(md5(i::text), 3000) END
            FROM generate_series(1, 3) i;
        UPDATE byidx SET v = 'v2' WHERE a = 1 AND b = 'k{k}';
        UPDATE byidx SET b = b || 'x', v = NULL WHERE a = 2 AND b = 'k{k}';
        UPDATE byidx SET a = 10, v = 'moved' WHERE a = 1 AND b = 'k{k}';
        DELETE FROM byidx WHERE a = 3 AND b = 'k{k}';

        INSERT INTO measure SELECT i + {k} * 100, date '2025-06-01' + i * 40, (ARRAY['eu', 'us'])[i % 2 + 1], i,
                                   CASE WHEN i % 3 = 0 THEN repeat(md5(i::text), 3000) END
            FROM generate_series(1, 14) i;
        UPDATE measure SET at = at + 200 WHERE id % 3 = 0 AND id / 100 = {k};
        UPDATE measure SET region = 'eu' WHERE id % 4 = 1 AND id / 100 = {k};
        UPDATE measure SET v = v * 2 WHERE id % 5 = 2 AND id / 100 = {k};
        DELETE FROM measure WHERE id % 7 = 0 AND id / 100 = {k};

        INSERT INTO logs VALUES ('2025-03-01', 'm'), ('2025-03-01', 'm'), ('2026-03-01', 'm'), ('2026-03-01', 'm');
        UPDATE logs SET msg = msg || '{k}' WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM logs_2025 WHERE msg = 'm' LIMIT 1);
        UPDATE logs SET at = '2025-12-31' WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM logs_rest WHERE msg = 'm' LIMIT 1);
        DELETE FROM logs WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM logs_rest WHERE msg = 'm' LIMIT 1);

        INSERT INTO animals VALUES ({k}, 'animal'), ({k} + 50, 'animal');
        INSERT INTO dogs VALUES ({k}, 'dog', 'collie'), ({k} + 50, 'dog', 'pug');
        INSERT INTO pets VALUES ({k}, 'pet'), ({k}, 'pet');
        UPDATE ONLY animals SET name = 'renamed' WHERE id = {k};
        UPDATE dogs SET name = 'renamed dog' WHERE id = {k} + 50;
        DELETE FROM ONLY animals WHERE id = {k} + 50;
        DELETE FROM pets WHERE ctid = (SELECT ctid FROM pets WHERE id = {k} LIMIT 1);

        INSERT INTO customers SELECT {k} * 10 + i, 'c' FROM generate_series(1, 3) i;
        INSERT INTO orders SELECT {k} * 10 + i, {k} * 10 + i, i FROM generate_series(1, 3) i;
        INSERT INTO tickets (what) SELECT 't{k}.' || i FROM generate_series(1, 4) i;
        "
    );
    if k == 0 {
        // The sequences stand high in the base backup; the restart must win over that.
        sql.push_str("INSERT INTO tickets (what) SELECT 'early' FROM generate_series(1, 30);");
    }
    if k == 2 {
        sql.push_str(
            "TRUNCATE customers CASCADE;
             INSERT INTO customers VALUES (1, 'after truncate');
             INSERT INTO orders VALUES (1, 1, 1);
             TRUNCATE tickets RESTART IDENTITY;
             INSERT INTO tickets (what) VALUES ('restarted'), ('restarted 2');",
        );
    }
    if k == 3 {
        sql.push_str(
            "TRUNCATE logs;
             INSERT INTO logs VALUES ('2025-04-01', 'after truncate');",
        );
    }
    sql
}

async fn scenario(via_root: bool) {
    let mut scenario = Archiving::builder().sql(SCHEMA).sql(step(0));
    if via_root {
        scenario = scenario
            .sql("CREATE PUBLICATION viaroot FOR ALL TABLES WITH (publish_via_partition_root = true)")
            .args(&["--publication", "viaroot"]);
    }
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = scenario.start().await;
    wait_base_backup(&repo).await;

    let mut instants = Vec::new();
    for k in 1..4 {
        src.batch_execute(&step(k)).await.unwrap();
        let t = server_now(&src).await;
        let content = support::snapshot_content(&src).await;
        instants.push((t, content));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sequences = "SELECT string_agg(format('%s=%s/%s', sequencename, last_value, \
                     coalesce(last_value, 0) > 0), ' ' ORDER BY sequencename) FROM pg_sequences";
    let source_sequences: String = src.query_one(sequences, &[]).await.unwrap().get(0);
    // Something after the last instant, so that the archive has seen the clock pass it.
    src.batch_execute("INSERT INTO nopk VALUES (-1, 'after', NULL)")
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    // The duplicates are there (the test can fail on them).
    let dups: i64 = src
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM nopk GROUP BY a, b, big HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(dups > 0);

    let source_schema = schema_of(&cluster, "app");
    for (i, (t, expected)) in instants.iter().enumerate() {
        let db = format!("restored_{i}");
        let (code, out, err) =
            crate::spine::restore_into(&cluster, repo.to_str().unwrap(), &db, &["--to-time", t]);
        assert_eq!(code, 0, "restore to {t} failed: {out}{err}");
        let restored = cluster.client(&db).await;
        let context = format!("restore to {t} (via root: {via_root})");
        support::assert_same_content(
            expected,
            &support::snapshot_content(&restored).await,
            &context,
        );
        assert_same_schema(&source_schema, &schema_of(&cluster, &db), &context);
        if i == instants.len() - 1 {
            // After TRUNCATE … RESTART IDENTITY the restored identity restarted too.
            let restored_sequences: String =
                restored.query_one(sequences, &[]).await.unwrap().get(0);
            assert_eq!(source_sequences, restored_sequences, "{context}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_kinds_round_trip_published_via_leaves() {
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_kinds_round_trip_published_via_root() {
    scenario(true).await;
}

/// `setup` names what the archive will not carry and what a restore does about it; the
/// archiver logs the same at startup; a restore behaves as reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_reports_what_the_archive_will_not_carry() {
    let prepared = Archiving::builder()
        .sql(
            "CREATE TABLE covered (id int PRIMARY KEY, v text);
             CREATE TABLE \"Left Out\" (id int PRIMARY KEY);
             CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
             CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
             CREATE UNLOGGED TABLE scratch (id int);
             INSERT INTO scratch VALUES (1);
             CREATE FOREIGN DATA WRAPPER nowhere;
             CREATE SERVER far FOREIGN DATA WRAPPER nowhere;
             CREATE FOREIGN TABLE remote (id int) SERVER far;
             INSERT INTO covered VALUES (1, 'a'), (2, 'b');
             CREATE MATERIALIZED VIEW summary AS SELECT count(*) AS n FROM covered;
             CREATE SEQUENCE free_seq;
             CREATE SEQUENCE owned_seq OWNED BY covered.id;
             SELECT lo_from_bytea(0, 'large'), lo_from_bytea(0, 'object');
             CREATE FUNCTION audit_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN END $$;
             CREATE EVENT TRIGGER audit ON ddl_command_end EXECUTE FUNCTION audit_ddl();
             CREATE SUBSCRIPTION inbound CONNECTION 'dbname=nowhere' PUBLICATION p
                 WITH (connect = false, enabled = false, create_slot = false, slot_name = NONE);
             CREATE PUBLICATION partial FOR TABLE covered, parted;",
        )
        .args(&["--publication", "partial"])
        .prepare()
        .await;
    let (code, out, err) = tidemark(&[
        "setup",
        "--source",
        &prepared.cluster.conninfo("app"),
        "--publication",
        "partial",
    ]);
    assert_eq!(code, 0, "setup failed: {out}{err}");
    let expect = [
        "not archived: large objects (2): ",
        "not archived: unlogged tables (1): public.scratch\n    at restore: created empty",
        "not archived: foreign tables (1): public.remote\n    at restore:",
        "not archived: materialized views (1): public.summary\n    at restore: defined again but not populated",
        "not archived: tables outside the publication (1): public.\"Left Out\"\n",
        "not archived: sequences not owned by a column (1): public.free_seq\n",
        "not archived: event triggers (1): audit\n",
        "not archived: subscriptions (1): inbound\n",
    ];
    for e in expect {
        assert!(out.contains(e), "setup output lacks {e:?}:\n{out}");
    }
    assert!(
        !out.contains("owned_seq") && !out.contains("parted_1"),
        "{out}"
    );

    // The archiver says the same at startup; a restore does what was announced.
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = prepared.archive().await;
    wait_base_backup(&repo).await;
    src.batch_execute("INSERT INTO covered VALUES (3, 'c')")
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        log.contains("not archived: unlogged tables (1): public.scratch"),
        "{log}"
    );
    cluster.create_database("restored");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--target",
        &cluster.conninfo("restored"),
        "--latest",
    ]);
    assert_eq!(code, 0, "restore failed: {out}{err}");
    let facts = cluster.psql(
        "restored",
        "SELECT (SELECT count(*) FROM covered), (SELECT count(*) FROM scratch),
                (SELECT count(*) FROM \"Left Out\"),
                (SELECT relispopulated FROM pg_class WHERE relname = 'summary'),
                (SELECT count(*) FROM pg_largeobject_metadata),
                (SELECT count(*) FROM pg_foreign_table)",
    );
    assert_eq!(facts, "3|0|0|f|0|1");
}
