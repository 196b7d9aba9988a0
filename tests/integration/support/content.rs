//! Table-content oracles: exact snapshots, per-table hashes, and readable diffs.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Table key -> that table's rows in PostgreSQL's text form of the whole row,
/// sorted bytewise. Key: `name` for tables in `public`, else `schema.name`.
pub type ContentSnapshot = BTreeMap<String, Vec<String>>;

/// Table key -> (row count, md5 over the table's rows); see [`content_hashes`].
pub type ContentHashes = BTreeMap<String, (i64, String)>;

/// Session settings that make row text deterministic across clusters.
const STABLE_OUTPUT: &str = "SET LOCAL extra_float_digits = 3; \
     SET LOCAL TimeZone = 'UTC'; \
     SET LOCAL DateStyle = 'ISO'; \
     SET LOCAL IntervalStyle = 'postgres'; \
     SET LOCAL bytea_output = 'hex';";

/// Permanent user tables (ordinary tables and leaf partitions; no catalogs,
/// no temporary or unlogged tables): (key, quoted qualified name), by key.
const USER_TABLES: &str = "SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text \
            ELSE n.nspname || '.' || c.relname END AS key, \
            format('%I.%I', n.nspname, c.relname) AS ident \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
       AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' \
     ORDER BY 1";

/// Exact content of every user table in the client's database, read in one
/// REPEATABLE READ snapshot: table key -> rows (`ROW(t.*)::text`), sorted.
///
/// Output settings are pinned (extra_float_digits=3, TimeZone=UTC,
/// DateStyle=ISO, IntervalStyle=postgres, bytea_output=hex) with `SET LOCAL`,
/// so the client's session is unchanged afterwards. Do not call it while the
/// client has a transaction open.
pub async fn snapshot_content(client: &tokio_postgres::Client) -> ContentSnapshot {
    read_tables(client, |ident| {
        format!("SELECT ROW(r.*)::text FROM {ident} AS r")
    })
    .await
    .into_iter()
    .map(|(key, rows)| {
        let mut rows: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        rows.sort();
        (key, rows)
    })
    .collect()
}

/// Per-table (row count, hash) for comparing large tables: the md5 of the
/// concatenated, sorted md5s of each row's text (computed in SQL), so it
/// depends only on the multiset of rows. Same settings and snapshot rules as
/// [`snapshot_content`]. Empty tables hash to `md5('')`.
pub async fn content_hashes(client: &tokio_postgres::Client) -> ContentHashes {
    read_tables(client, |ident| {
        format!(
            "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h COLLATE \"C\"), '')) \
             FROM (SELECT md5(ROW(r.*)::text) AS h FROM {ident} AS r) AS s"
        )
    })
    .await
    .into_iter()
    .map(|(key, rows)| {
        let row = &rows[0];
        (key, (row.get::<_, i64>(0), row.get::<_, String>(1)))
    })
    .collect()
}

/// Run `query_for(quoted table name)` for every user table in one snapshot.
async fn read_tables(
    client: &tokio_postgres::Client,
    query_for: impl Fn(&str) -> String,
) -> Vec<(String, Vec<tokio_postgres::Row>)> {
    let fail = |what: &str, e: tokio_postgres::Error| -> ! {
        panic!("reading table content: {what}: {e} ({:?})", e.as_db_error())
    };
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {STABLE_OUTPUT}"
        ))
        .await
        .unwrap_or_else(|e| fail("BEGIN", e));
    let tables = client
        .query(USER_TABLES, &[])
        .await
        .unwrap_or_else(|e| fail("list tables", e));
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        let key: String = table.get(0);
        let ident: String = table.get(1);
        let sql = query_for(&ident);
        let rows = client
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| fail(&sql, e));
        out.push((key, rows));
    }
    client
        .batch_execute("COMMIT")
        .await
        .unwrap_or_else(|e| fail("COMMIT", e));
    out
}

/// Rows shown per side when a table differs.
const SHOWN_ROWS: usize = 10;

/// Panic unless `expected` and `actual` hold the same tables with the same rows.
/// The message names tables present on one side only, then, for the first
/// table whose rows differ, row counts and the first rows found only in
/// `expected` / only in `actual` (not the whole dump).
pub fn assert_same_content(expected: &ContentSnapshot, actual: &ContentSnapshot, context: &str) {
    if expected == actual {
        return;
    }
    let mut msg = format!("table content differs: {context}\n");
    describe_table_sets(&mut msg, expected, actual);
    let differing = expected
        .iter()
        .find(|(table, rows)| actual.get(*table).is_some_and(|a| a != *rows));
    if let Some((table, exp_rows)) = differing {
        let act_rows = &actual[table];
        let (only_exp, only_act) = multiset_difference(exp_rows, act_rows);
        let _ = writeln!(
            msg,
            "first differing table {table:?}: expected {} rows, actual {} rows; \
             {} rows only in expected, {} only in actual",
            exp_rows.len(),
            act_rows.len(),
            only_exp.len(),
            only_act.len()
        );
        show_rows(&mut msg, "only in expected", &only_exp);
        show_rows(&mut msg, "only in actual", &only_act);
        if only_exp.is_empty() && only_act.is_empty() {
            let _ = writeln!(msg, "  (same rows, different order: were the rows sorted?)");
        }
    }
    panic!("{msg}");
}

/// Panic unless both sides hold the same tables with equal (count, hash).
pub fn assert_same_hashes(expected: &ContentHashes, actual: &ContentHashes, context: &str) {
    if expected == actual {
        return;
    }
    let mut msg = format!("table content hashes differ: {context}\n");
    describe_table_sets(&mut msg, expected, actual);
    for (table, exp) in expected {
        if let Some(act) = actual.get(table).filter(|act| *act != exp) {
            let _ = writeln!(
                msg,
                "table {table:?}: expected {} rows md5 {}, actual {} rows md5 {}",
                exp.0, exp.1, act.0, act.1
            );
        }
    }
    panic!("{msg}");
}

fn describe_table_sets<V: TableSize>(
    msg: &mut String,
    expected: &BTreeMap<String, V>,
    actual: &BTreeMap<String, V>,
) {
    for (table, v) in expected {
        if !actual.contains_key(table) {
            let _ = writeln!(
                msg,
                "table {table:?} ({} rows) missing from actual",
                v.rows()
            );
        }
    }
    for (table, v) in actual {
        if !expected.contains_key(table) {
            let _ = writeln!(msg, "table {table:?} ({} rows) not expected", v.rows());
        }
    }
}

trait TableSize {
    fn rows(&self) -> i64;
}

impl TableSize for Vec<String> {
    fn rows(&self) -> i64 {
        self.len() as i64
    }
}

impl TableSize for (i64, String) {
    fn rows(&self) -> i64 {
        self.0
    }
}

fn show_rows(msg: &mut String, label: &str, rows: &[&String]) {
    for row in rows.iter().take(SHOWN_ROWS) {
        let _ = writeln!(msg, "  {label}: {row}");
    }
    if rows.len() > SHOWN_ROWS {
        let _ = writeln!(msg, "  {label}: ... and {} more", rows.len() - SHOWN_ROWS);
    }
}

/// Rows in `a` but not `b`, and in `b` but not `a`, counting duplicates.
fn multiset_difference<'a>(a: &'a [String], b: &'a [String]) -> (Vec<&'a String>, Vec<&'a String>) {
    let mut a: Vec<&String> = a.iter().collect();
    let mut b: Vec<&String> = b.iter().collect();
    a.sort();
    b.sort();
    let (mut i, mut j) = (0, 0);
    let (mut only_a, mut only_b) = (Vec::new(), Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(b[j]) {
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => {
                only_a.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                only_b.push(b[j]);
                j += 1;
            }
        }
    }
    only_a.extend(&a[i..]);
    only_b.extend(&b[j..]);
    (only_a, only_b)
}
