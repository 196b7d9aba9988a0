//! Every built-in type round-trips exactly: archive a workload over tables holding every
//! built-in type (and enums, domains, composites, ranges, multiranges, arrays of arrays,
//! generated and identity columns), restore to several instants, and compare the restored
//! database with the source then: the data as text, and the schema as `pg_dump --schema-only`
//! prints it.
//!
//! The same columns live in a table with a primary key and in one with REPLICA IDENTITY FULL
//! and no key, where replay must locate each updated or deleted row by comparing the text of
//! every column of every type.

use std::process::Command;
use std::time::Duration;

use crate::spine::{restore_into, server_now, wait_archived, Archiving};
use crate::support::assert_same_schema;
use crate::support::{self, Cluster, ClusterOptions};

/// `pg_dump --schema-only` of `db`, normalized for comparing two databases: comments, blank
/// lines and psql's `\restrict` guards dropped, and event triggers (installed on the source by
/// tidemark itself, not part of the application's schema) left out. Publications and
/// subscriptions are not dumped: a restore does not recreate them.
pub fn schema_of(cluster: &Cluster, db: &str) -> String {
    let out = Command::new(support::pg_bindir().join("pg_dump"))
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "-d",
            &cluster.conninfo(db),
        ])
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "pg_dump of {db} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    normalize_schema(&String::from_utf8_lossy(&out.stdout))
}

fn normalize_schema(dump: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in dump.lines() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            skipping = header.contains("; Type: EVENT TRIGGER;");
            continue;
        }
        if skipping
            || line.starts_with("--")
            || line.trim().is_empty()
            || line.starts_with("\\restrict")
            || line.starts_with("\\unrestrict")
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Waits until the repository holds a complete base backup (`archive.json` is written after
/// it): the slot is active while the archiver takes the backup, so `wait_streaming` alone
/// returns before the restorable window opens.
pub async fn wait_base_backup(repo: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !repo.join("archive.json").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no base backup in {} after 60 s",
            repo.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The columns shared by the keyed and the keyless table: every built-in type and more.
const COLUMNS: &str = "
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, n numeric, n2 numeric(40,20),
    m money, c char(5), vc varchar(10), t text, nm name, ch \"char\", by bytea, d date,
    tm time, ttz timetz, ts timestamp(3), tstz timestamptz, iv interval, iv2 interval day to second(2),
    u uuid, ip inet, cidr cidr, mac macaddr, mac8 macaddr8, bt bit(4), vb varbit,
    tsv tsvector, tsq tsquery, j json, jb jsonb, jp jsonpath, x xml,
    pt point, ln line, ls lseg, bx box, pth path, pg polygon, ci circle,
    o oid, rc regclass, rc2 regclass, rt regtype, pl pg_lsn, snap pg_snapshot,
    r4 int4range, r8 int8range, nr numrange, tsr tsrange, tstzr tstzrange, dr daterange,
    mr int4multirange, dmr datemultirange,
    e mood, dom short_text, cit text COLLATE ci,
    ai int[], aai int[][], aat text[][], af float8[], comp pair, nest nested, comps pair[],
    big text,
    gen int GENERATED ALWAYS AS (i4 * 2) STORED,
    gen_t text GENERATED ALWAYS AS (upper(t)) STORED";

const COLUMN_NAMES: &str =
    "b, i2, i4, i8, f4, f8, n, n2, m, c, vc, t, nm, ch, by, d, tm, ttz, ts, tstz, iv, iv2,
    u, ip, cidr, mac, mac8, bt, vb, tsv, tsq, j, jb, jp, x, pt, ln, ls, bx, pth, pg, ci,
    o, rc, rc2, rt, pl, snap, r4, r8, nr, tsr, tstzr, dr, mr, dmr, e, dom, cit,
    ai, aai, aat, af, comp, nest, comps, big";

fn schema() -> String {
    format!(
        "CREATE SCHEMA \"Odd \"\"Schema\"\"\";
         CREATE SCHEMA hidden;
         CREATE TABLE hidden.\"Only Here\" (id int PRIMARY KEY);
         CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s \"quoted\"');
         CREATE DOMAIN short_text AS text CHECK (length(VALUE) < 100) NOT NULL DEFAULT 'd';
         CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE TYPE pair AS (a int, b text);
         CREATE TYPE nested AS (p pair, tags text[], m mood);
         CREATE TABLE typed_pk (id int PRIMARY KEY, {COLUMNS});
         ALTER TABLE typed_pk ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE typed_full ({COLUMNS}, id int);
         ALTER TABLE typed_full REPLICA IDENTITY FULL;
         ALTER TABLE typed_full ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             by_default int GENERATED BY DEFAULT AS IDENTITY (START WITH 100 INCREMENT BY 7),
             \"Mixed Case\" text, doubled int GENERATED ALWAYS AS (by_default * 2) STORED);
         CREATE TABLE serials (id serial PRIMARY KEY, s bigserial, v text);"
    )
}

/// Rows `from..from+count` of every type; `i % 4` selects the edge cases.
fn insert_rows(table: &str, from: i32, count: i32) -> String {
    "INSERT INTO $TABLE (id, $COLUMNS)
         SELECT i,
           CASE i % 3 WHEN 0 THEN NULL ELSE i % 2 = 0 END,
           (i * 7 % 65536 - 32768)::int2, i * 1000003, i::int8 * 9000000000000007,
           (ARRAY['NaN', 'Infinity', '-Infinity', '-0', '1.17549435e-38', '3.4028235e+38', '0.1'])[i % 7 + 1]::float4,
           (ARRAY['NaN', '-Infinity', 'Infinity', '-0', '2.2250738585072014e-308', '0.1', '1e300'])[i % 7 + 1]::float8
               + CASE WHEN i % 7 = 5 THEN i ELSE 0 END,
           (ARRAY['NaN', 'Infinity', '-Infinity', '0.000000000000000000000000000000000000000000000000000000000001',
                  '123456789012345678901234567890.123456789012345678901234567890', '-0.00', '1.50'])[i % 7 + 1]::numeric,
           (i::numeric / 7)::numeric(40,20),
           (i * 12345.67)::numeric::money,
           left('ab''' || i, 5), 'v\\' || i,
           CASE i % 4 WHEN 0 THEN E'tab\\there\\nnewline \\\\N ''q'' \"dq\" \\\\ back' WHEN 1 THEN '\\N'
                      WHEN 2 THEN 'ünïcødé ☃ 𝄞 ' || i ELSE '' END,
           'name ' || i, chr(65 + i % 26)::\"char\",
           CASE WHEN i % 4 = 0 THEN (SELECT decode(string_agg(lpad(to_hex(b), 2, '0'), ''), 'hex')
                                       FROM generate_series(0, 255) b)
                ELSE decode(md5(i::text), 'hex') END,
           (ARRAY['infinity', '-infinity', '2000-02-29', '0044-03-15 BC'])[i % 4 + 1]::date,
           ('12:34:56.789' ::time + i * interval '1 second'),
           ('23:59:59.999999+14:30'::timetz),
           (ARRAY['infinity', '-infinity', '2026-03-29 02:30:00.123', '1999-12-31 23:59:59.999'])[i % 4 + 1]::timestamp(3),
           (ARRAY['infinity', '-infinity', '2026-03-29 02:30:00.123456+05:45', '1900-01-01 00:00:00 Europe/Paris'])[i % 4 + 1]::timestamptz,
           (ARRAY['1 year 2 mons 3 days 04:05:06.789', '-1 days +02:00', '00:00:00', '-178000000 years'])[i % 4 + 1]::interval,
           make_interval(days => i, secs => 1.235)::interval day to second(2),
           md5(i::text)::uuid,
           (ARRAY['192.168.0.1/24', '::ffff:1.2.3.4', '10.0.0.1', '2001:db8::1/64'])[i % 4 + 1]::inet,
           (ARRAY['192.168.0.0/24', '2001:db8::/32', '10.0.0.0/8', '0.0.0.0/0'])[i % 4 + 1]::cidr,
           ('08:00:2b:01:02:' || lpad(to_hex(i % 256), 2, '0'))::macaddr,
           ('08:00:2b:01:02:03:04:' || lpad(to_hex(i % 256), 2, '0'))::macaddr8,
           (i % 16)::bit(4), (i::bit(12) || B'101')::varbit,
           to_tsvector('english', 'The fat cats ' || i || ' ate the rats') || 'a:1A b:2B,3C'::tsvector,
           ('fat & (rat | cat) & !dog & ' || 'w' || i || ':*')::tsquery,
           ('{\"a\": 1, \"u\": \"\\u00e9\\ud83d\\ude00\\u0000\", \"dup\": 1, \"dup\": 2,  \"sp\" : [ 1 , 2 ] }')::json,
           jsonb_build_object('i', i, 'u', E'\\u00e9 \\U0001F600 \"q\" \\\\', 'n', 1.50, 'e', '1e400'::numeric,
                              'arr', jsonb_build_array(NULL, true, 'x''y')) || '{\"esc\": \"\\u00e9\\ud83d\\ude00\"}'::jsonb,
           ('$.a[*] ? (@ > ' || i || ')')::jsonpath,
           ('<doc a=\"1\">x &amp; ' || i || ' <![CDATA[<raw>]]></doc>')::xml,
           point(i, -i / 3.0), line(point(0, 0), point(i, i + 1)), lseg(point(0, i), point(1, 1)),
           box(point(0, 0), point(i, i)), ('[(0,0),(' || i || ',1),(2,2)]')::path,
           ('((0,0),(' || i || ',0),(0,1))')::polygon, circle(point(i, 1), 2.5),
           (i % 5000)::oid, 'typed_pk'::regclass, 'hidden.\"Only Here\"'::regclass, 'int4[]'::regtype,
           (i || '/' || to_hex(i * 4096))::pg_lsn, '10:20:10,14,15'::pg_snapshot,
           (ARRAY['empty', '[1,10)', '(,5)', '[3,)'])[i % 4 + 1]::int4range,
           int8range(i, NULL), numrange(1.5, i + 1.75, '[]'),
           (ARRAY['[2026-01-01,infinity)', 'empty', '(,)', '[-infinity,2000-01-01 00:00:00.5]'])[i % 4 + 1]::tsrange,
           (ARRAY['[2026-01-01 00:00+00,infinity)', '(-infinity,2026-01-01 00:00+02]', 'empty', '(,)'])[i % 4 + 1]::tstzrange,
           (ARRAY['[2000-01-01,2000-01-02)', '[-infinity,infinity)', 'empty', '[2000-01-01,)'])[i % 4 + 1]::daterange,
           (ARRAY['{}', '{[1,3), [5,7)}', '{(,0), [10,)}', '{[2,3]}'])[i % 4 + 1]::int4multirange,
           '{[2000-01-01,2000-02-01), [2001-01-01,)}'::datemultirange,
           (ARRAY['sad', 'ok', 'happy', 'it''s \"quoted\"'])[i % 4 + 1]::mood,
           'dom ' || i, CASE i % 2 WHEN 0 THEN 'CaSe' ELSE 'case' END,
           ARRAY[i, NULL, -i], ARRAY[[i, NULL], [3, 4]],
           ARRAY[['a\"b', NULL], ['c,d', 'NULL'], ['{x}', E'back\\\\slash '' q']],
           ARRAY['NaN', '-0', 'Infinity']::float8[],
           CASE i % 3 WHEN 0 THEN ROW(NULL, NULL)::pair WHEN 1 THEN ROW(i, 'x\"y,(z)')::pair ELSE NULL END,
           ROW(ROW(i, '')::pair, ARRAY['t1', NULL, ''], 'ok')::nested,
           ARRAY[ROW(1, 'a')::pair, NULL, ROW(NULL, 'b\\c')::pair],
           CASE WHEN i % 2 = 0 THEN repeat(md5(i::text), 3000) ELSE 'small' END
         FROM generate_series($FROM, $TO) i;"
        .replace("$TABLE", table)
        .replace("$COLUMNS", COLUMN_NAMES)
        .replace("$FROM", &from.to_string())
        .replace("$TO", &(from + count - 1).to_string())
}

/// One step of the workload on `table`: inserts, updates (some leave the TOASTed `big`
/// unchanged), deletes.
fn workload(table: &str, step: i32) -> String {
    let base = step * 100;
    format!(
        "{}
         UPDATE {table} SET t = t || ' upd', f8 = '-0', n = 'NaN' WHERE id % 5 = 1 AND id < {base};
         UPDATE {table} SET i4 = i4 + 1 WHERE id % 4 = 2 AND id < {base};
         UPDATE {table} SET comp = ROW(NULL, NULL), ai = '{{}}', big = big || 'x' WHERE id % 6 = 3 AND id < {base};
         UPDATE {table} SET jb = jb || '{{\"more\": \"\\u00e9\"}}', e = 'it''s \"quoted\"', cit = 'CASE' WHERE id % 7 = 4 AND id < {base};
         DELETE FROM {table} WHERE id % 9 = 0 AND id < {base};",
        insert_rows(table, base, 12)
    )
}

fn idents_step(step: i32) -> String {
    format!(
        "INSERT INTO \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" (\"Mixed Case\") SELECT 'row ' || i FROM generate_series(1, 3) i;
         INSERT INTO \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" (by_default, \"Mixed Case\") VALUES ({step} * 1000, 'explicit');
         UPDATE \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" SET \"Mixed Case\" = \"Mixed Case\" || '!' WHERE id % 2 = 0;
         UPDATE \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" SET by_default = by_default + 1 WHERE id % 3 = 0;
         DELETE FROM \"Odd \"\"Schema\"\"\".\"Idents \"\"q\"\"\" WHERE id % 5 = 0;
         INSERT INTO serials (v) VALUES ('s{step}'), (NULL);"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_at_each_instant() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = Archiving::builder()
        .cluster(ClusterOptions {
            extra_conf: vec!["lc_monetary = 'C'".into()],
            ..ClusterOptions::default()
        })
        .sql(schema())
        // Text output of regclass depends on the search path: the source's walsender sees a
        // schema that a restore session does not.
        .sql("ALTER DATABASE app SET search_path = \"$user\", public, hidden")
        // Rows in the base backup.
        .sql(format!(
            "{} {} {}",
            workload("typed_pk", 0),
            workload("typed_full", 0),
            idents_step(0)
        ))
        .start()
        .await;
    wait_base_backup(&repo).await;

    let mut instants = Vec::new();
    for step in 1..4 {
        src.batch_execute(&format!(
            "BEGIN; {} COMMIT; {} {}",
            workload("typed_pk", step),
            workload("typed_full", step),
            idents_step(step)
        ))
        .await
        .unwrap();
        let t = server_now(&src).await;
        let content = support::snapshot_content(&src).await;
        instants.push((t, content));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Something after the last instant, so that the archive has seen the clock pass it.
    src.batch_execute("INSERT INTO serials (v) VALUES ('after')")
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    // The test must be able to fail: the rows differ between instants, and the edge cases are
    // really there.
    assert_ne!(instants[0].1, instants[2].1);
    let probe: i64 = src
        .query_one(
            "SELECT count(*) FROM typed_full WHERE f4 = 'NaN' OR d = 'infinity' OR r4 = 'empty'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(probe > 0);

    let source_schema = schema_of(&cluster, "app");
    for (i, (t, expected)) in instants.iter().enumerate() {
        let db = format!("restored_{i}");
        let (code, out, err) =
            restore_into(&cluster, repo.to_str().unwrap(), &db, &["--to-time", t]);
        assert_eq!(code, 0, "restore to {t} failed: {out}{err}");
        let restored = support::snapshot_content(&cluster.client(&db).await).await;
        support::assert_same_content(expected, &restored, &format!("restore to {t}"));
        assert_same_schema(
            &source_schema,
            &schema_of(&cluster, &db),
            &format!("restore to {t}"),
        );
    }
}
