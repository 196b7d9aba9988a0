//! Replay, in a restore: what to run for a `tidemark.ddl` message (its settings and schema
//! statements, classified and rewritten to run inside the replayed transaction on a target
//! restored without owners or privileges), the `setval` of a `tidemark.sequences` message, and
//! whether a restore's segments hold DDL at all.

use std::path::PathBuf;

use tracing::warn;

use crate::pgoutput::{self, Message};
use crate::sql::{quote_ident, quote_literal};

use super::lex::{lex, split_statements, upper, Tok, Token};
use super::message::{DdlMessage, SequenceValue, DDL_PREFIX};

/// What replay does with one statement of a captured query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A schema statement, to run (possibly rewritten).
    Run(String),
    /// A session setting, to run transaction-locally (`SET LOCAL …`).
    Setting(String),
    /// A schema statement deliberately not replayed, and why.
    Skip(&'static str),
    /// Not a schema statement (DML, a query, transaction control…): its effects are in the stream.
    NotSchema,
}

const GLOBAL_OBJECTS: &[&str] = &["ROLE", "USER", "GROUP", "DATABASE", "TABLESPACE"];
const NOT_RESTORED: &[&str] = &["PUBLICATION", "SUBSCRIPTION", "EVENT"];

/// Classifies one statement (as [`split_statements`] returns it).
pub fn classify(stmt: &str) -> Action {
    let toks = lex(stmt);
    let words: Vec<String> = toks.iter().map(|t| upper(stmt, t)).collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    // Words at parenthesis depth 0, with their token index.
    let mut top: Vec<(usize, &str)> = Vec::new();
    let mut depth = 0;
    let mut top_comma = false;
    for (i, t) in toks.iter().enumerate() {
        match t.kind {
            Tok::Punct(b'(') => depth += 1,
            Tok::Punct(b')') => depth -= 1,
            Tok::Punct(b',') if depth == 0 => top_comma = true,
            Tok::Word if depth == 0 => top.push((i, words[i].as_str())),
            _ => {}
        }
    }
    let has_top = |a: &str, b: &str| top.windows(2).any(|p| p[0].1 == a && p[1].1 == b);
    match w(0) {
        "CREATE" => {
            let mut k = 1;
            let mut temp = false;
            while matches!(
                w(k),
                "OR" | "REPLACE"
                    | "GLOBAL"
                    | "LOCAL"
                    | "TEMP"
                    | "TEMPORARY"
                    | "UNLOGGED"
                    | "UNIQUE"
                    | "TRUSTED"
                    | "PROCEDURAL"
                    | "DEFAULT"
                    | "RECURSIVE"
                    | "CONSTRAINT"
            ) {
                temp |= matches!(w(k), "TEMP" | "TEMPORARY");
                k += 1;
            }
            let kind = w(k);
            if temp {
                Action::Skip("temporary object")
            } else if GLOBAL_OBJECTS.contains(&kind) {
                Action::Skip("global object (not part of a database restore)")
            } else if NOT_RESTORED.contains(&kind) {
                Action::Skip("publications, subscriptions and event triggers are not restored")
            } else if kind == "TABLE" && top.iter().any(|(_, x)| *x == "AS") {
                Action::Run(with_no_data(stmt, &toks, &words))
            } else if kind == "SCHEMA" {
                Action::Run(without_authorization(stmt, &toks, &words, k + 1))
            } else {
                Action::Run(without_concurrently(stmt, &toks, &words))
            }
        }
        "ALTER" => {
            let kind = w(1);
            if GLOBAL_OBJECTS.contains(&kind) || kind == "SYSTEM" {
                Action::Skip("global object (not part of a database restore)")
            } else if NOT_RESTORED.contains(&kind) {
                Action::Skip("publications, subscriptions and event triggers are not restored")
            } else if kind == "DEFAULT" || (kind == "LARGE" && w(2) == "OBJECT") {
                Action::Skip("privileges and large objects are not restored")
            } else if has_top("OWNER", "TO") && !top_comma {
                Action::Skip("ownership is not restored (--no-owner)")
            } else {
                Action::Run(without_concurrently(stmt, &toks, &words))
            }
        }
        "DROP" => {
            let kind = w(1);
            if GLOBAL_OBJECTS.contains(&kind) {
                Action::Skip("global object (not part of a database restore)")
            } else if NOT_RESTORED.contains(&kind) || kind == "OWNED" {
                Action::Skip("publications, subscriptions, event triggers and owned objects are not replayed")
            } else {
                Action::Run(without_concurrently(stmt, &toks, &words))
            }
        }
        "COMMENT" | "IMPORT" | "REFRESH" => Action::Run(stmt.to_string()),
        "GRANT" | "REVOKE" => Action::Skip("privileges are not restored (--no-privileges)"),
        "SECURITY" => Action::Skip("security labels are not restored"),
        "REINDEX" => Action::Skip("maintenance"),
        "SET" => match w(1) {
            "ROLE" | "TRANSACTION" | "CONSTRAINTS" => Action::NotSchema,
            "SESSION" if w(2) == "AUTHORIZATION" || w(2) == "CHARACTERISTICS" => Action::NotSchema,
            "LOCAL" => Action::Setting(stmt.to_string()),
            "SESSION" => Action::Setting(format!("SET LOCAL {}", &stmt[toks[2].start..])),
            _ => Action::Setting(format!("SET LOCAL {}", &stmt[toks[1].start..])),
        },
        "RESET" => match w(1) {
            "ALL" | "ROLE" | "SESSION" | "" => Action::NotSchema,
            _ => Action::Setting(format!("SET LOCAL {} TO DEFAULT", &stmt[toks[1].start..])),
        },
        _ => Action::NotSchema,
    }
}

/// `CREATE TABLE … AS query [WITH [NO] DATA]` → the same `WITH NO DATA`.
fn with_no_data(stmt: &str, toks: &[Token], words: &[String]) -> String {
    let n = words.len();
    let tail = |k: usize| words[n.saturating_sub(k)..].join(" ");
    if n >= 3 && tail(3) == "WITH NO DATA" {
        stmt.to_string()
    } else if n >= 2 && tail(2) == "WITH DATA" {
        format!("{} WITH NO DATA", &stmt[..toks[n - 2].start].trim_end())
    } else {
        format!("{stmt} WITH NO DATA")
    }
}

/// `CREATE SCHEMA [IF NOT EXISTS] [name] AUTHORIZATION role …` without the owner (a restore
/// carries no owners, and the role may not exist on the target): `AUTHORIZATION role` is removed,
/// or replaced by the role's name when it also names the schema. `after_schema` is the index of
/// the token after SCHEMA.
fn without_authorization(
    stmt: &str,
    toks: &[Token],
    words: &[String],
    after_schema: usize,
) -> String {
    let Some(a) = words.iter().position(|w| w == "AUTHORIZATION") else {
        return stmt.to_string();
    };
    let Some(role) = toks.get(a + 1) else {
        return stmt.to_string();
    };
    let mut first = after_schema;
    if words.get(first).map(String::as_str) == Some("IF") {
        first += 3; // IF NOT EXISTS
    }
    let replacement = if a > first {
        ""
    } else if matches!(
        words[a + 1].as_str(),
        "CURRENT_USER" | "SESSION_USER" | "CURRENT_ROLE"
    ) {
        return stmt.to_string(); // the schema is named after the role: keep it as it was
    } else {
        &stmt[role.start..role.end]
    };
    format!(
        "{}{replacement}{}",
        &stmt[..toks[a].start],
        &stmt[role.end..]
    )
}

/// Removes the keyword CONCURRENTLY (not allowed inside a transaction block).
fn without_concurrently(stmt: &str, toks: &[Token], words: &[String]) -> String {
    let mut out = String::with_capacity(stmt.len());
    let mut last = 0;
    for (t, w) in toks.iter().zip(words) {
        if w == "CONCURRENTLY" {
            out.push_str(&stmt[last..t.start]);
            last = t.end;
        }
    }
    out.push_str(&stmt[last..]);
    out
}

/// A DDL message that replay cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum ReplayDdlError {
    #[error("a schema change ({tag}) was made by a query that holds no schema statement, so it cannot be replayed: {query:?}. DDL run inside a function, procedure or DO block, and SELECT … INTO, are not supported\nHINT: restore to an instant before this transaction, or take a new base backup after it (tidemark backup) and restore from that")]
    NoStatement { tag: String, query: String },
}

/// The SQL that replays a DDL message, to run inside the replayed transaction: the source's
/// search path (transaction-local), then the query's settings and schema statements in order.
pub fn plan_replay(msg: &DdlMessage) -> Result<Vec<String>, ReplayDdlError> {
    let path: Vec<String> = msg.search_path.iter().map(|s| quote_ident(s)).collect();
    let mut out = vec![format!(
        "SELECT pg_catalog.set_config('search_path', {}, true)",
        quote_literal(&path.join(", "))
    )];
    let mut schema = 0;
    for stmt in split_statements(&msg.query) {
        match classify(stmt) {
            Action::Run(sql) => {
                schema += 1;
                if fills_rows_with_computed_values(&sql) {
                    warn!(statement = %sql, "a column added with a computed default (a function call, CURRENT_TIMESTAMP, serial…) gets values computed now, on the target, for the rows that existed: they may differ from the source's");
                }
                out.push(sql);
            }
            Action::Setting(sql) => out.push(sql),
            Action::Skip(_) => schema += 1,
            Action::NotSchema => {}
        }
    }
    if schema == 0 {
        let mut query: String = msg.query.chars().take(300).collect();
        if query.len() < msg.query.len() {
            query.push('…');
        }
        return Err(ReplayDdlError::NoStatement {
            tag: msg.tag.clone(),
            query,
        });
    }
    Ok(out)
}

/// `ALTER TABLE … ADD [COLUMN] … DEFAULT f(…)` (or a serial type, or CURRENT_TIMESTAMP…): the
/// existing rows get values computed when the statement runs, which the change stream does not
/// carry, so replay computes its own.
pub fn fills_rows_with_computed_values(stmt: &str) -> bool {
    let toks = lex(stmt);
    let words: Vec<String> = toks.iter().map(|t| upper(stmt, t)).collect();
    if words.first().map(String::as_str) != Some("ALTER") || !words.iter().any(|w| w == "ADD") {
        return false;
    }
    words.iter().enumerate().any(|(i, w)| match w.as_str() {
        "SERIAL" | "BIGSERIAL" | "SMALLSERIAL" | "SERIAL2" | "SERIAL4" | "SERIAL8" => true,
        "DEFAULT" => {
            let next = words.get(i + 1).map(String::as_str).unwrap_or("");
            matches!(
                next,
                "CURRENT_TIMESTAMP"
                    | "CURRENT_DATE"
                    | "CURRENT_TIME"
                    | "LOCALTIMESTAMP"
                    | "LOCALTIME"
                    | "CURRENT_USER"
                    | "SESSION_USER"
                    | "USER"
            ) || (toks.get(i + 1).is_some_and(|t| t.kind == Tok::Word)
                && toks
                    .iter()
                    .skip(i + 2)
                    .find(|t| !matches!(t.kind, Tok::Punct(b'.') | Tok::Word | Tok::Quoted))
                    .is_some_and(|t| t.kind == Tok::Punct(b'(')))
        }
        _ => false,
    })
}

/// One statement that sets the values of a `tidemark.sequences` message; sequences that no
/// longer exist on the target are ignored. Its result is one row.
pub fn setval_sql(values: &[SequenceValue]) -> Option<String> {
    if values.is_empty() {
        return None;
    }
    let rows: Vec<String> = values
        .iter()
        .map(|s| {
            format!(
                "({}, {}::int8, {})",
                quote_literal(&format!(
                    "{}.{}",
                    quote_ident(&s.schema),
                    quote_ident(&s.name)
                )),
                s.last_value,
                s.is_called
            )
        })
        .collect();
    Some(format!(
        "SELECT pg_catalog.count(pg_catalog.setval(c.oid, v.last_value, v.is_called)) \
         FROM (VALUES {}) AS v(name, last_value, is_called) \
         JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(v.name) AND c.relkind = 'S'",
        rows.join(", ")
    ))
}

/// Whether any of the (verified, spooled) segments holds a DDL message: the restore then creates
/// every post-data object (indexes, constraints, triggers) before replay, so replayed DDL finds
/// the objects it names (`DROP INDEX`, `RENAME COLUMN` of an indexed column…).
pub async fn segments_have_ddl(paths: &[PathBuf]) -> Result<bool, String> {
    for path in paths {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| format!("reading the spooled segment {}: {e}", path.display()))?;
        let seg =
            crate::segment::Segment::parse(bytes::Bytes::from(bytes)).map_err(|e| e.to_string())?;
        for rec in seg.records() {
            let rec = rec.map_err(|e| e.to_string())?;
            if rec.payload.first() != Some(&b'M') {
                continue;
            }
            if let Ok(Message::Message { prefix, .. }) = pgoutput::decode(&rec.payload, false) {
                if prefix == DDL_PREFIX {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statements() {
        let run = |s: &str| match classify(s) {
            Action::Run(x) => x,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(run("create table t (id int)"), "create table t (id int)");
        assert_eq!(
            run("CREATE TABLE t2 AS SELECT * FROM t"),
            "CREATE TABLE t2 AS SELECT * FROM t WITH NO DATA"
        );
        assert_eq!(
            run("CREATE TABLE t2 AS SELECT 1 WITH DATA"),
            "CREATE TABLE t2 AS SELECT 1 WITH NO DATA"
        );
        assert_eq!(
            run("CREATE TABLE g (a int, b int GENERATED ALWAYS AS (a * 2) STORED)"),
            "CREATE TABLE g (a int, b int GENERATED ALWAYS AS (a * 2) STORED)"
        );
        assert_eq!(
            run("CREATE UNIQUE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE UNIQUE INDEX  i ON t (a)"
        );
        assert_eq!(
            run("ALTER TABLE t RENAME COLUMN a TO b"),
            "ALTER TABLE t RENAME COLUMN a TO b"
        );
        assert_eq!(
            run("ALTER TABLE t ADD c int, OWNER TO bob"),
            "ALTER TABLE t ADD c int, OWNER TO bob"
        );
        assert_eq!(
            run("COMMENT ON TABLE t IS 'x'"),
            "COMMENT ON TABLE t IS 'x'"
        );
        assert_eq!(run("DROP INDEX CONCURRENTLY i"), "DROP INDEX  i");
        assert_eq!(
            run("CREATE SCHEMA app AUTHORIZATION bob"),
            "CREATE SCHEMA app "
        );
        assert_eq!(
            run("create schema if not exists app authorization \"Bob\" create table t (a int)"),
            "create schema if not exists app  create table t (a int)"
        );
        assert_eq!(run("CREATE SCHEMA AUTHORIZATION bob"), "CREATE SCHEMA bob");
        assert_eq!(run("CREATE SCHEMA app"), "CREATE SCHEMA app");
        for s in [
            "CREATE TEMP TABLE x (a int)",
            "create global temporary table x (a int)",
            "ALTER TABLE t OWNER TO bob",
            "GRANT SELECT ON t TO bob",
            "CREATE ROLE bob",
            "CREATE PUBLICATION p FOR ALL TABLES",
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO bob",
        ] {
            assert!(matches!(classify(s), Action::Skip(_)), "{s}");
        }
        for s in [
            "INSERT INTO t VALUES (1)",
            "select 1",
            "BEGIN",
            "COMMIT",
            "WITH x AS (SELECT 1) DELETE FROM t",
            "COPY t FROM STDIN",
            "DO $$ BEGIN END $$",
            "SET ROLE bob",
        ] {
            assert_eq!(classify(s), Action::NotSchema, "{s}");
        }
        assert_eq!(
            classify("SET search_path = a, b"),
            Action::Setting("SET LOCAL search_path = a, b".into())
        );
        assert_eq!(
            classify("set session lock_timeout = 1"),
            Action::Setting("SET LOCAL lock_timeout = 1".into())
        );
        assert_eq!(
            classify("RESET lock_timeout"),
            Action::Setting("SET LOCAL lock_timeout TO DEFAULT".into())
        );
    }

    #[test]
    fn notices_columns_added_with_computed_values() {
        for s in [
            "ALTER TABLE t ADD COLUMN at timestamptz NOT NULL DEFAULT now()",
            "alter table t add c uuid default public.gen_random_uuid()",
            "ALTER TABLE t ADD COLUMN id bigserial",
            "ALTER TABLE t ADD COLUMN d date DEFAULT CURRENT_DATE",
        ] {
            assert!(fills_rows_with_computed_values(s), "{s}");
        }
        for s in [
            "ALTER TABLE t ADD COLUMN n text DEFAULT 'none'",
            "ALTER TABLE t ADD COLUMN n int DEFAULT 0",
            "ALTER TABLE t ALTER COLUMN n SET DEFAULT now()",
            "CREATE TABLE t (at timestamptz DEFAULT now())",
        ] {
            assert!(!fills_rows_with_computed_values(s), "{s}");
        }
    }

    #[test]
    fn plans_the_replay_of_a_multi_statement_query() {
        let m = DdlMessage {
            v: 1,
            query: "CREATE TABLE t (id int); INSERT INTO t VALUES (1); ALTER TABLE t ADD b text"
                .into(),
            tag: "CREATE TABLE".into(),
            search_path: vec!["app".into(), "we'ird".into()],
            role: "app".into(),
        };
        let plan = plan_replay(&m).unwrap();
        assert_eq!(
            plan,
            [
                "SELECT pg_catalog.set_config('search_path', '\"app\", \"we''ird\"', true)",
                "CREATE TABLE t (id int)",
                "ALTER TABLE t ADD b text"
            ]
        );
        let in_function = DdlMessage {
            query: "SELECT make_tables()".into(),
            ..m.clone()
        };
        let e = plan_replay(&in_function).unwrap_err().to_string();
        assert!(
            e.contains("SELECT make_tables()") && e.contains("HINT"),
            "{e}"
        );
        let grant_only = DdlMessage {
            query: "GRANT SELECT ON t TO bob".into(),
            ..m
        };
        assert_eq!(plan_replay(&grant_only).unwrap().len(), 1);
    }

    #[test]
    fn setval_statement_quotes_names() {
        let sql = setval_sql(&[SequenceValue {
            schema: "a'b".into(),
            name: "s\"q".into(),
            last_value: -5,
            is_called: true,
        }])
        .unwrap();
        assert!(
            sql.contains(r#"('"a''b"."s""q"', -5::int8, true)"#),
            "{sql}"
        );
        assert!(setval_sql(&[]).is_none());
    }
}
