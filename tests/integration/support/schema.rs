//! Schema oracle: `pg_dump --schema-only` of a database, normalized so that a source at an
//! instant and a database restored to that instant print the same text.
//!
//! Normalization: comments (`-- Name: …; Owner: …`, version lines), blank lines and pg_dump's
//! per-run `\restrict` / `\unrestrict` keys are dropped. Owners and privileges are not dumped
//! (`--no-owner --no-privileges`: a restore does not carry them), nor publications and
//! subscriptions (not restored). tidemark's own objects (schema `tidemark`, its event
//! triggers) are kept: a restore carries them like any other object.

use super::os::{client_command, run};
use super::{pg_bindir, Cluster};

/// The normalized schema of database `db`.
pub fn schema_dump(cluster: &Cluster, db: &str) -> String {
    let mut cmd = client_command(pg_bindir().join("pg_dump"));
    cmd.args([
        "--schema-only",
        "--no-owner",
        "--no-privileges",
        "--no-publications",
        "--no-subscriptions",
        "-d",
    ])
    .arg(cluster.conninfo(db));
    let out = run(&mut cmd).unwrap_or_else(|e| panic!("pg_dump of {db}: {e}"));
    normalize(&String::from_utf8_lossy(&out.stdout))
}

fn normalize(dump: &str) -> String {
    dump.lines()
        .filter(|l| {
            !(l.trim().is_empty()
                || l.starts_with("--")
                || l.starts_with("\\restrict")
                || l.starts_with("\\unrestrict"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Panics unless the two normalized dumps are equal, showing the first differing lines.
pub fn assert_same_schema(expected: &str, actual: &str, context: &str) {
    if expected == actual {
        return;
    }
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let first = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    let from = first.saturating_sub(3);
    let show = |v: &[&str]| {
        v.iter()
            .skip(from)
            .take(25)
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
    };
    panic!(
        "schema differs: {context} (first difference at line {}; {} vs {} lines)\n--- expected (source) ---\n{}--- actual (restored) ---\n{}",
        first + 1,
        e.len(),
        a.len(),
        show(&e),
        show(&a)
    );
}
