//! Base backups against a real server: take at an exported snapshot, load all four phases
//! into a fresh database, compare content and schema; corruption is detected.

use std::sync::Arc;

use tidemark::backup::{self, BackupRequest, CopyFormat, LoadPhase, Manifest};
use tidemark::conninfo::ConnInfo;
use tidemark::lsn::Lsn;
use tidemark::store::{LocalStore, Store};

use crate::support::{assert_same_content, snapshot_content, Cluster, ClusterOptions};

const SCHEMA: &str = r#"
CREATE TABLE kinds (id serial PRIMARY KEY, i int, t text, n numeric, j jsonb, b bytea,
                    a int[], ta text[], f float8, ts timestamptz, d date, iv interval,
                    u text UNIQUE);
INSERT INTO kinds (i, t, n, j, b, a, ta, f, ts, d, iv, u) VALUES
  (1, 'plain', 1.50, '{"a": [1, 2, null], "b": "x"}', '\xdeadbeef', '{1,NULL,3}',
   '{"x y","\"q\"",NULL}', 0.1, '2024-02-29 12:34:56.789+05', '2024-02-29', '1 day 02:03:04', 'u1'),
  (NULL, E'tab\there\nnew line\\back\\slash \r cr', -123456789012345678901234567890.123456789,
   '"just a string"', '\x00ff00', '{}', '{}', 'NaN', 'infinity', '-infinity', '-1 mon', 'u2'),
  (3, '', 0, 'null', '', NULL, '{""}', -0.0, '1999-12-31 23:59:59.999999+00', '0001-01-01 BC', '0', NULL),
  (NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1e308, NULL, NULL, NULL, NULL),
  (5, 'ünïcødé ✓ 日本', 'NaN', '{"nested": {"deep": [{"k": "v"}]}}', NULL, '{{1,2},{3,4}}',
   '{"a,b","c\\d"}', 3.141592653589793, now(), 'today', '-00:00:01.5', 'u5');

-- Column types without an OID-free binary form: the table travels as COPY text.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (x int, y text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE custom (id int PRIMARY KEY, m mood, ms mood[], p pair, ps pair[], d posint);
INSERT INTO custom VALUES (1, 'ok', '{sad,happy}', '(1,"a b")', ARRAY['(2,x)'::pair, NULL], 7),
  (2, NULL, NULL, NULL, NULL, NULL);
-- Built-in types whose binary form is an OID of the source (reg*): text, so they name the
-- target's objects.
CREATE TABLE refs (id int PRIMARY KEY, c regclass, t regtype, ts regtype[]);
INSERT INTO refs VALUES (1, 'custom', 'mood', '{pair,posint}'), (2, 'refs', 'int4', NULL);
-- Built-in types of every kind in COPY binary.
CREATE TABLE builtins (id int PRIMARY KEY, r int4range, mr int4multirange, pt point,
                       c char(5), vc varchar(10), bo bool, m money, ip inet, vb bit varying,
                       u uuid, x xml, js json, tsv tsvector, nm name, ts timestamp, tt time,
                       ttz timetz, fa float4[], tsr tstzrange[], ch "char", o oid);
INSERT INTO builtins VALUES
  (1, '[1,5)', '{[1,2),[4,9)}', '(1.5,-2)', 'ab', 'xyz', true, 12.34, '10.1.0.0/16', B'10110',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '<a>ü</a>', '{"k": [1, "ü"]}', 'fat:2 rat:1',
   'some name', '2024-02-29 01:02:03.456789', '23:59:59.999999', '12:00+05:30',
   '{1.5,NaN,-Infinity}', ARRAY['[2024-01-01,2024-02-01)'::tstzrange, 'empty'], 'q', 4294967295),
  (2, 'empty', '{}', NULL, NULL, '', false, -0.01, '::1', B'', NULL, NULL, 'null', '', '',
   'infinity', '00:00', NULL, '{}', '{}', NULL, 0);

CREATE TABLE big (id bigint PRIMARY KEY, body text);
INSERT INTO big SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 60000) g;

CREATE TABLE parent (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
INSERT INTO parent (name) SELECT 'p' || g FROM generate_series(1, 50) g;
CREATE TABLE child (id serial PRIMARY KEY, parent_id int NOT NULL REFERENCES parent (id),
                    qty int, total int GENERATED ALWAYS AS (qty * 10) STORED);
CREATE INDEX child_parent_idx ON child (parent_id);
INSERT INTO child (parent_id, qty) SELECT 1 + g % 50, g FROM generate_series(1, 500) g;
-- A column default taken from a sequence it does not own, set past the rows.
CREATE SEQUENCE free_seq;
SELECT nextval('free_seq') FROM generate_series(1, 3);
CREATE TABLE uses_free (id bigint DEFAULT nextval('free_seq') PRIMARY KEY, v int);
INSERT INTO uses_free (id, v) VALUES (100, 1), (200, 2);

CREATE TABLE measurements (city int, logdate date, peak int, PRIMARY KEY (city, logdate))
  PARTITION BY RANGE (logdate);
CREATE TABLE measurements_2023 PARTITION OF measurements
  FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE measurements_2024 PARTITION OF measurements
  FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE INDEX measurements_peak ON measurements (peak);
INSERT INTO measurements SELECT g % 7, date '2023-01-01' + g, g FROM generate_series(0, 700) g;

CREATE TABLE ri (k int NOT NULL, v text);
CREATE UNIQUE INDEX ri_k ON ri (k);
ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_k;
INSERT INTO ri SELECT g, 'v' || g FROM generate_series(1, 10) g;
CREATE TABLE nokey (x text);
ALTER TABLE nokey REPLICA IDENTITY FULL;
INSERT INTO nokey VALUES ('dup'), ('dup'), (NULL);

CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."Mixed ""Case"" t" ("a b" int CONSTRAINT "p k" PRIMARY KEY, "c""d" text);
INSERT INTO "Odd Schema"."Mixed ""Case"" t" VALUES (1, 'one'), (2, NULL);
CREATE TABLE dropped_col (a int, b int, c text);
INSERT INTO dropped_col VALUES (1, 2, 'x');
ALTER TABLE dropped_col DROP COLUMN b;
CREATE TABLE nocols ();
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
CREATE TABLE empty_t (x int);
-- Copied in block ranges (split_blocks = 2 below): the parent's ranges must not read the child.
CREATE TABLE inh_parent (id int, v text);
CREATE TABLE inh_kid (extra int) INHERITS (inh_parent);
INSERT INTO inh_parent SELECT g, 'p' || g FROM generate_series(1, 2000) g;
INSERT INTO inh_kid SELECT g, 'k' || g, g FROM generate_series(1, 1500) g;
CREATE UNLOGGED TABLE scratch (x int);
INSERT INTO scratch VALUES (1);

CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER child_touch BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION touch();
CREATE VIEW child_totals AS SELECT parent_id, sum(total) AS total FROM child GROUP BY 1;

CREATE PUBLICATION pub FOR ALL TABLES;
CREATE PUBLICATION pub_root FOR TABLE measurements WITH (publish_via_partition_root = true);
"#;

/// An exported snapshot held open on an ordinary connection (equivalent, for `take`, to the one
/// a replication connection exports), and the WAL position at that moment.
async fn export_snapshot(client: &tokio_postgres::Client) -> (String, Lsn) {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT pg_export_snapshot(), pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .unwrap();
    let lsn: String = row.get(1);
    (row.get(0), lsn.parse().unwrap())
}

/// `pg_dump --schema-only` of `db`, without comments.
pub fn pg_dump_schema(cluster: &Cluster, db: &str) -> String {
    let pg_dump = tidemark::pgbin::find("pg_dump", None).unwrap();
    let out = std::process::Command::new(pg_dump)
        .args(["--schema-only", "--no-publications", "-d"])
        .arg(cluster.conninfo(db))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump {db}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        // Comments, and pg_dump's per-run random \restrict key.
        .filter(|l| {
            !l.starts_with("--") && !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn load_all(
    store: &Arc<dyn Store>,
    m: &Manifest,
    target: &ConnInfo,
) -> Result<(), backup::BackupError> {
    let loader = backup::Loader::new(store, m, target, 3);
    for phase in [
        LoadPhase::PreData,
        LoadPhase::Data,
        LoadPhase::Keys,
        LoadPhase::PostData,
    ] {
        loader.load(phase).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_and_load_round_trip() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("src");
    cluster.psql("src", SCHEMA);
    let source = ConnInfo::parse(&cluster.conninfo("src")).unwrap();
    let expected = snapshot_content(&cluster.client("src").await).await;

    let holder = cluster.client("src").await;
    let (snapshot, consistent_point) = export_snapshot(&holder).await;
    // Committed after the snapshot: must not be in the backup.
    cluster.psql(
        "src",
        "INSERT INTO kinds (i, t, u) VALUES (999, 'after the snapshot', 'late');
         INSERT INTO big VALUES (1000000, 'late');
         UPDATE parent SET name = 'renamed late' WHERE id = 1;
         INSERT INTO measurements VALUES (1, '2024-06-01', 1);",
    );
    let system_id: i64 = holder
        .query_one("SELECT system_identifier FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0);

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    let req = BackupRequest {
        source: &source,
        snapshot: &snapshot,
        consistent_point,
        system_id: system_id as u64,
        timeline: 1,
        generation: 1,
        publication: "pub",
        parallel: 3,
        origin: tidemark::backup::Origin::Manual,
        tag: None,
    };
    // Small block ranges, so that tables are copied in parallel ranges.
    let opts = backup::TakeOptions {
        split_blocks: 2,
        ..Default::default()
    };
    let m = backup::take_with(&store, req, opts).await.unwrap();
    let m_root = backup::take_with(
        &store,
        BackupRequest {
            publication: "pub_root",
            generation: 2,
            ..req
        },
        opts,
    )
    .await
    .unwrap();
    // All in COPY text (a backup read by tidemark releases that know format 1 only).
    let m_text = backup::take_with(
        &store,
        BackupRequest {
            generation: 3,
            ..req
        },
        backup::TakeOptions {
            binary: false,
            ..opts
        },
    )
    .await
    .unwrap();
    holder.batch_execute("COMMIT").await.unwrap();

    // The manifest.
    assert_eq!(m.id, format!("00000001-{}", consistent_point.to_hex16()));
    assert_eq!(m.system_id, system_id as u64);
    assert_eq!(m.database, "src");
    assert!(m.server_version_num >= 120000);
    assert!(m.started_at <= m.snapshot_time && m.snapshot_time <= m.finished_at);
    let names: Vec<String> = m
        .tables
        .iter()
        .map(|t| format!("{}.{}", t.schema, t.name))
        .collect();
    assert!(
        names.contains(&"public.measurements_2023".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"public.measurements".to_string()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"public.scratch".to_string()),
        "unlogged: {names:?}"
    );
    let big = m.tables.iter().find(|t| t.name == "big").unwrap();
    assert_eq!(big.rows, 60000);
    assert!(big.parts.len() >= 2, "{} parts", big.parts.len());
    assert!(big
        .parts
        .iter()
        .all(|p| p.raw_bytes <= backup::PART_LIMIT as u64));
    let inh = m.tables.iter().find(|t| t.name == "inh_parent").unwrap();
    assert_eq!(inh.rows, 2000, "the child's rows are not the parent's");
    // Ranges of 2 blocks: several parts, each a COPY of its own; keys in order, no gaps.
    for t in [big, inh] {
        assert!(t.parts.len() >= 3, "{}: {} parts", t.name, t.parts.len());
        for (i, p) in t.parts.iter().enumerate() {
            assert!(p.key.ends_with(&format!(".{i:04}.copy.lz4")), "{}", p.key);
        }
        assert_eq!(t.parts.iter().map(|p| p.rows).sum::<u64>(), t.rows);
    }
    let child = m.tables.iter().find(|t| t.name == "child").unwrap();
    assert_eq!(
        child.columns,
        ["id", "parent_id", "qty"],
        "generated column left out"
    );
    // COPY binary where every column type allows it.
    let format_of = |name: &str| m.tables.iter().find(|t| t.name == name).unwrap().format;
    for (name, format) in [
        ("kinds", CopyFormat::Binary),
        ("builtins", CopyFormat::Binary),
        ("big", CopyFormat::Binary),
        ("custom", CopyFormat::Text),
        ("refs", CopyFormat::Text),
        ("nocols", CopyFormat::Text),
    ] {
        assert_eq!(format_of(name), format, "{name}");
    }
    assert_eq!(m.format_version, 2);
    assert_eq!(m_root.tables[0].format, CopyFormat::Binary);
    let nocols = m.tables.iter().find(|t| t.name == "nocols").unwrap();
    assert_eq!((nocols.columns.len(), nocols.rows), (0, 2));
    let free = m.sequences.iter().find(|s| s.name == "free_seq").unwrap();
    assert_eq!((free.last_value, free.is_called), (3, true));
    assert_eq!(m_root.tables.len(), 1);
    assert!(m_root.tables[0].partitioned_root);
    assert_eq!(m_root.tables[0].rows, 701);

    // Parts are plain lz4 frames; a binary part is a whole binary COPY stream.
    if let Ok(out) = std::process::Command::new("lz4")
        .args(["-d", "-c"])
        .arg(dir.path().join(&big.parts[1].key))
        .output()
    {
        assert!(out.status.success());
        assert_eq!(out.stdout.len() as u64, big.parts[1].raw_bytes);
        assert!(out.stdout.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert!(out.stdout.ends_with(b"\xff\xff"));
    }

    let listed = backup::list_manifests(&store).await.unwrap();
    assert_eq!(listed, vec![m.clone(), m_root.clone(), m_text.clone()]);

    // Load, watching the Keys / PostData split.
    cluster.create_database("dst");
    let target = ConnInfo::parse(&cluster.conninfo("dst")).unwrap();
    let mut rows_loaded = 0;
    let loader = backup::Loader::new(&store, &m, &target, 3);
    for phase in [LoadPhase::PreData, LoadPhase::Data, LoadPhase::Keys] {
        let stats = loader.load(phase).await.unwrap();
        rows_loaded += stats.rows;
    }
    assert_eq!(rows_loaded, m.totals.rows);
    let after_keys = cluster.psql(
        "dst",
        "SELECT string_agg(conname || ':' || contype::text, ',' ORDER BY conname COLLATE \"C\") FROM pg_constraint
           WHERE connamespace <> 'pg_catalog'::regnamespace AND contype IN ('p', 'u', 'f');
         SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class
           WHERE relkind = 'i' AND relname IN ('ri_k', 'child_parent_idx', 'measurements_peak');
         SELECT relreplident FROM pg_class WHERE relname = 'ri';
         SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal;",
    );
    let lines: Vec<&str> = after_keys.lines().collect();
    // Keys of the published leaves, not of the unpublished partitioned root; no foreign key.
    assert_eq!(
        lines[0],
        "builtins_pkey:p,custom_pkey:p,child_pkey:p,kinds_pkey:p,kinds_u_key:u,measurements_2023_pkey:p,\
         measurements_2024_pkey:p,p k:p,parent_pkey:p,refs_pkey:p,uses_free_pkey:p,big_pkey:p"
            .split(',')
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(","),
        "{after_keys}"
    );
    assert_eq!(lines[1], "ri_k", "{after_keys}");
    assert_eq!(lines[2], "i", "{after_keys}");
    assert_eq!(lines[3], "0", "{after_keys}");
    let stats = loader.load(LoadPhase::PostData).await.unwrap();
    assert_eq!(stats.sequences, m.sequences.len() as u64);

    let actual = snapshot_content(&cluster.client("dst").await).await;
    assert_same_content(
        &expected,
        &actual,
        "restored database vs source at the snapshot",
    );
    assert_eq!(
        pg_dump_schema(&cluster, "src"),
        pg_dump_schema(&cluster, "dst"),
        "schema differs"
    );

    // Sequences: the application can insert; an unowned sequence keeps its value and is
    // raised past the column it feeds. kinds_id_seq was read after the late insert took 6
    // (sequences are not transactional), so it is ahead of the snapshot: harmless.
    let after = cluster.psql(
        "dst",
        "INSERT INTO kinds (t) VALUES ('new') RETURNING id;
         INSERT INTO parent (name) VALUES ('new') RETURNING id;
         INSERT INTO child (parent_id, qty) VALUES (1, 1) RETURNING id;
         SELECT last_value FROM free_seq;",
    );
    assert_eq!(after, "7\n51\n501\n200", "{after}");

    // The COPY text backup loads the same content.
    assert_eq!(m_text.format_version, 1);
    assert!(m_text.tables.iter().all(|t| t.format == CopyFormat::Text));
    cluster.create_database("dst_text");
    let target_text = ConnInfo::parse(&cluster.conninfo("dst_text")).unwrap();
    load_all(&store, &m_text, &target_text).await.unwrap();
    assert_same_content(
        &expected,
        &snapshot_content(&cluster.client("dst_text").await).await,
        "restored (COPY text) vs source at the snapshot",
    );

    // The partition-root backup loads through the root.
    cluster.create_database("dst_root");
    let target_root = ConnInfo::parse(&cluster.conninfo("dst_root")).unwrap();
    load_all(&store, &m_root, &target_root).await.unwrap();
    let root_content = snapshot_content(&cluster.client("dst_root").await).await;
    for t in ["measurements_2023", "measurements_2024"] {
        assert_eq!(root_content[t], expected[t], "{t}");
    }

    // A damaged part is refused, naming it.
    let victim = &m.tables.iter().find(|t| t.name == "kinds").unwrap().parts[0];
    let path = dir.path().join(&victim.key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    cluster.create_database("dst_bad");
    let target_bad = ConnInfo::parse(&cluster.conninfo("dst_bad")).unwrap();
    let loader_bad = backup::Loader::new(&store, &m, &target_bad, 2);
    loader_bad.load(LoadPhase::PreData).await.unwrap();
    let err = loader_bad.load(LoadPhase::Data).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&victim.key), "{msg}");
    assert!(msg.contains(&format!("{:08x}", victim.crc32)), "{msg}");
    // Nothing of the failed load is left: no table is half loaded.
    assert_eq!(
        cluster.psql(
            "dst_bad",
            "SELECT (SELECT count(*) FROM big) + (SELECT count(*) FROM inh_parent)
                  + (SELECT count(*) FROM child) + (SELECT count(*) FROM kinds)"
        ),
        "0"
    );
}

#[tokio::test]
async fn incomplete_backup_is_skipped_and_failed_take_leaves_nothing() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("src");
    cluster.psql("src", "CREATE TABLE t (x int); INSERT INTO t VALUES (1);");
    let source = ConnInfo::parse(&cluster.conninfo("src")).unwrap();
    let holder = cluster.client("src").await;
    let (snapshot, lsn) = export_snapshot(&holder).await;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    let req = BackupRequest {
        source: &source,
        snapshot: &snapshot,
        consistent_point: lsn,
        system_id: 1,
        timeline: 1,
        generation: 1,
        publication: "no_such_publication",
        parallel: 1,
        origin: tidemark::backup::Origin::Manual,
        tag: None,
    };
    let err = backup::take(&store, req).await.unwrap_err();
    assert!(err.to_string().contains("no_such_publication"), "{err}");
    assert!(store.list("basebackups/").await.unwrap().is_empty());

    let bad_snapshot = BackupRequest {
        snapshot: "00000003-0000000A-1",
        ..req
    };
    let err = backup::take(&store, bad_snapshot).await.unwrap_err();
    assert!(err.to_string().contains("importing snapshot"), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
}
