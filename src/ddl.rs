//! Schema changes and sequence values carried by the archive, as transactional logical messages.
//!
//! Logical decoding carries row changes only. tidemark adds two kinds of `pg_logical_emit_message`
//! records to the stream, so they are archived in commit order like any change (their exact
//! format is specified in `proto/messages.md`):
//!
//! * `tidemark.ddl`: emitted by an event trigger that `setup` installs (and `archive`, when it is
//!   missing and the role may), once per top-level client query that changed the schema. It holds
//!   the query text (`current_query()`), the first command tag, and the schemas of the
//!   `search_path` in effect. Replay runs the query's schema statements at that point of the
//!   stream ([`plan_replay`]), before any row change that depends on them.
//! * `tidemark.sequences`: emitted by the archiver with its heartbeat ([`emit_changed_sequences`]):
//!   the sequences whose value changed since the last emission. Replay applies `setval` at that
//!   point and once more after the restore's own sequence step, so that a restored sequence is
//!   never behind its value at the target instant by more than one heartbeat interval, and is
//!   always past every value of the columns it feeds.
//!
//! And one check, [`SchemaGuard`]: a Relation message whose columns (names, types) differ from
//! what was last known of that relation, with no `tidemark.ddl` message since, means the schema
//! changed without being captured. The archiver stops with [`UnexplainedSchemaChange`] (the
//! archive could not be restored past that point) and the restore refuses to go past it.
//!
//! Decisions:
//! * The trigger emits **once per top-level query**: the key `statement_timestamp()` +
//!   `current_query()` is remembered in a custom setting, so a multi-statement query string with
//!   several DDL statements gives one message, and the DML of that string is never replayed
//!   twice: replay runs only its schema statements (pgoutput already carries the rows).
//! * Replay splits the query with a small lexer aware of quotes, dollar quotes, comments and
//!   `BEGIN ATOMIC … END` bodies ([`split_statements`]) and classifies each statement
//!   ([`classify`]): CREATE / ALTER / DROP / COMMENT / REFRESH / IMPORT run; `SET` runs as
//!   `SET LOCAL`; GRANT / REVOKE / `OWNER TO` / SECURITY LABEL are skipped (the base backup is
//!   restored with `--no-owner --no-privileges`); temporary objects, global objects (roles,
//!   databases, tablespaces), publications, subscriptions and event triggers are skipped; DML,
//!   queries, COPY, CALL, DO, transaction control and maintenance are skipped. `CREATE TABLE … AS`
//!   is run `WITH NO DATA` (its rows are in the stream); `CONCURRENTLY` is removed (replay runs
//!   inside a transaction).
//! * Temporary objects: the trigger ignores commands whose objects are all temporary.
//! * Names resolve as on the source: replay sets `search_path` (transaction-local) to the schemas
//!   of the source's path (`current_schemas(false)`, so `"$user"` is already resolved).
//! * The trigger has no exception block: a subtransaction would let PostgreSQL decode the message
//!   *after* the next change of the parent transaction (it queues a message at its record's end
//!   LSN, which ties with the next record's start); a trailing `tidemark.ddl_end` message takes
//!   that tie when the DDL itself runs in a SAVEPOINT.
//! * A restore whose segments hold DDL loads every post-data object of the base backup before
//!   replay ([`segments_have_ddl`]), so replayed DDL finds what it names; event triggers
//!   (tidemark's own among them) are left out for a target role that is not a superuser
//!   (`backup`'s `post_data_for_target`).
//! * The archiver's guard knows a table from its first Relation message in the run (a change
//!   made while it was stopped is not seen); the restore's guard knows every table from the base
//!   backup.
//!
//! Not handled (documented in `proto/messages.md`): DDL run inside a function, procedure or DO
//! block called by a non-DDL statement (replay finds no schema statement in `SELECT f()` and
//! stops with an error naming the query); `SELECT … INTO new_table`; a query string whose DDL
//! statements are separated by DML on the same table (all of its DDL runs at the first one's
//! position); objects tidemark itself creates after a base backup (schema `tidemark`); the
//! values a column added with a computed default (`now()`, a serial…) gives existing rows (not in
//! the stream: replay computes its own, with a warning).

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::pgoutput::{self, Message};
use crate::statement::{quote_ident, RelationInfo};

mod protect;
pub use protect::{ensure_protected, GUARD_DROP_TRIGGER, GUARD_END_TRIGGER};

/// Prefix of the DDL messages.
pub const DDL_PREFIX: &str = "tidemark.ddl";
/// Prefix of the sequence-value messages.
pub const SEQUENCES_PREFIX: &str = "tidemark.sequences";
/// Version of the message formats this build writes (and the highest it reads).
pub const MESSAGE_VERSION: u32 = 1;
/// Name of the event trigger on `ddl_command_end` (versioned with its function).
pub const END_TRIGGER: &str = "tidemark_ddl_v1";
/// Name of the event trigger on `sql_drop`.
pub const DROP_TRIGGER: &str = "tidemark_ddl_drop_v1";

/// What installs DDL capture: a schema, two functions and two event triggers. Idempotent for the
/// functions; the triggers are created only when missing (see [`ensure_capture`]).
pub const CAPTURE_FUNCTIONS_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS tidemark;
COMMENT ON SCHEMA tidemark IS 'tidemark: DDL capture for continuous archiving (see tidemark setup)';
CREATE OR REPLACE FUNCTION tidemark.ddl_drop_v1() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  -- Remember whether this DROP removed temporary objects only: ddl_command_end then skips it.
  PERFORM pg_catalog.set_config('tidemark.ddl_drop_temp',
    CASE WHEN pg_catalog.bool_and(is_temporary) THEN 'on' ELSE 'off' END, true)
    FROM pg_catalog.pg_event_trigger_dropped_objects();
END
$fn$;
CREATE OR REPLACE FUNCTION tidemark.ddl_end_v1() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  q text := pg_catalog.current_query();
  k text;
  n_all int;
  n_temp int;
BEGIN
  IF pg_catalog.current_setting('tidemark.ddl_drop_temp', true) = 'on' THEN
    PERFORM pg_catalog.set_config('tidemark.ddl_drop_temp', '', true);
    RETURN;
  END IF;
  SELECT pg_catalog.count(*), pg_catalog.count(*) FILTER (WHERE schema_name = 'pg_temp')
    INTO n_all, n_temp FROM pg_catalog.pg_event_trigger_ddl_commands();
  IF n_all > 0 AND n_all = n_temp THEN
    RETURN;
  END IF;
  -- Once per top-level client query (a multi-statement string fires once per DDL statement).
  k := pg_catalog.md5(pg_catalog.statement_timestamp()::text || coalesce(q, ''));
  IF pg_catalog.current_setting('tidemark.ddl_query', true) IS NOT DISTINCT FROM k THEN
    RETURN;
  END IF;
  PERFORM pg_catalog.set_config('tidemark.ddl_query', k, false);
  PERFORM pg_catalog.pg_logical_emit_message(true, 'tidemark.ddl', pg_catalog.json_build_object(
    'v', 1, 'query', q, 'tag', tg_tag,
    'search_path', pg_catalog.current_schemas(false), 'role', current_user::text)::text);
  -- Decoding queues a message at its record's *end* LSN: inside a subtransaction (a SAVEPOINT)
  -- it would tie with the parent's next change and be decoded after it. A trailing record of
  -- the same (sub)transaction takes the tie instead.
  PERFORM pg_catalog.pg_logical_emit_message(true, 'tidemark.ddl_end', '');
END
$fn$;
"#;

/// Creates the event triggers (run after [`CAPTURE_FUNCTIONS_SQL`], each when missing).
pub const CAPTURE_TRIGGERS_SQL: [(&str, &str); 2] = [
    (
        DROP_TRIGGER,
        "CREATE EVENT TRIGGER tidemark_ddl_drop_v1 ON sql_drop EXECUTE FUNCTION tidemark.ddl_drop_v1();",
    ),
    (
        END_TRIGGER,
        "CREATE EVENT TRIGGER tidemark_ddl_v1 ON ddl_command_end EXECUTE FUNCTION tidemark.ddl_end_v1();",
    ),
];

/// The state of DDL capture on the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Both event triggers exist and are enabled.
    Present,
    /// This call installed them.
    Installed,
    /// Missing, and this role may not create event triggers (PostgreSQL requires a superuser).
    NotPermitted { role: String },
    /// Present but disabled (`ALTER EVENT TRIGGER … DISABLE`).
    Disabled,
}

impl Capture {
    /// A line for the operator.
    pub fn describe(&self) -> String {
        match self {
            Capture::Present => "DDL capture is installed (event triggers tidemark_ddl_v1, tidemark_ddl_drop_v1)".into(),
            Capture::Installed => "installed DDL capture (schema tidemark, event triggers tidemark_ddl_v1, tidemark_ddl_drop_v1)".into(),
            Capture::NotPermitted { role } => format!(
                "DDL capture is NOT installed: role {role:?} may not create event triggers (superuser only). Schema changes will not be archived; a change to a table's columns will stop the archiver.\nHINT: run `tidemark setup` once as a superuser"
            ),
            Capture::Disabled => "DDL capture is installed but DISABLED: schema changes are not archived\nHINT: ALTER EVENT TRIGGER tidemark_ddl_v1 ENABLE; ALTER EVENT TRIGGER tidemark_ddl_drop_v1 ENABLE;".into(),
        }
    }
}

/// Installs DDL capture unless it is present; a role that may not is reported, not an error.
pub async fn ensure_capture(
    client: &tokio_postgres::Client,
) -> Result<Capture, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE evtname IN ($1, $2)),
                    count(*) FILTER (WHERE evtname IN ($1, $2) AND evtenabled = 'D'),
                    (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user)
               FROM pg_catalog.pg_event_trigger",
            &[&END_TRIGGER, &DROP_TRIGGER],
        )
        .await?;
    let (present, disabled, superuser): (i64, i64, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    if present == 2 {
        return Ok(if disabled > 0 {
            Capture::Disabled
        } else {
            Capture::Present
        });
    }
    if superuser != Some(true) {
        let role: String = client
            .query_one("SELECT current_user::text", &[])
            .await?
            .get(0);
        return Ok(Capture::NotPermitted { role });
    }
    let mut sql = format!("BEGIN; {CAPTURE_FUNCTIONS_SQL}");
    for (name, create) in CAPTURE_TRIGGERS_SQL {
        if !event_trigger_exists(client, name).await? {
            sql.push_str(create);
            sql.push('\n');
        }
    }
    sql.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    Ok(Capture::Installed)
}

/// Whether an event trigger of that name exists in the database.
pub(crate) async fn event_trigger_exists(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = $1",
            &[&name],
        )
        .await?
        .is_some())
}

/// [`ensure_capture`] for a run that must go on without it: logs the outcome.
pub async fn ensure_capture_logged(client: &tokio_postgres::Client) -> Option<Capture> {
    match ensure_capture(client).await {
        Ok(c @ (Capture::Present | Capture::Installed)) => {
            info!("{}", c.describe());
            Some(c)
        }
        Ok(c) => {
            warn!("{}", c.describe());
            Some(c)
        }
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "cannot check or install DDL capture; schema changes may not be archived");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// A `tidemark.ddl` message: one top-level query that changed the schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlMessage {
    pub v: u32,
    /// The client's whole query string (may hold several statements, DML too).
    pub query: String,
    /// Command tag of the first DDL command of the query.
    #[serde(default)]
    pub tag: String,
    /// The schemas of the search path in effect, in order (`current_schemas(false)`).
    #[serde(default)]
    pub search_path: Vec<String>,
    /// The role that ran it (informational).
    #[serde(default)]
    pub role: String,
}

/// One sequence's value in a `tidemark.sequences` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceValue {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// A `tidemark.sequences` message: the sequences whose value changed since the last one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencesMessage {
    pub v: u32,
    pub sequences: Vec<SequenceValue>,
}

/// A tidemark logical message, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TidemarkMessage {
    Ddl(DdlMessage),
    Sequences(SequencesMessage),
}

/// Why a tidemark message cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("logical message {prefix:?} is not valid: {detail}")]
    Invalid { prefix: String, detail: String },
    #[error("logical message {prefix:?} has format version {v}, newer than this tidemark reads ({MESSAGE_VERSION})\nHINT: restore with a newer tidemark")]
    TooNew { prefix: String, v: u32 },
}

/// Decodes a logical message of tidemark's; `Ok(None)` for any other prefix (heartbeats, other
/// applications' messages).
pub fn decode_message(
    prefix: &str,
    content: &[u8],
) -> Result<Option<TidemarkMessage>, MessageError> {
    let invalid = |e: serde_json::Error| MessageError::Invalid {
        prefix: prefix.to_string(),
        detail: e.to_string(),
    };
    let msg = match prefix {
        DDL_PREFIX => {
            let m: DdlMessage = serde_json::from_slice(content).map_err(invalid)?;
            check_version(prefix, m.v)?;
            TidemarkMessage::Ddl(m)
        }
        SEQUENCES_PREFIX => {
            let m: SequencesMessage = serde_json::from_slice(content).map_err(invalid)?;
            check_version(prefix, m.v)?;
            TidemarkMessage::Sequences(m)
        }
        _ => return Ok(None),
    };
    Ok(Some(msg))
}

fn check_version(prefix: &str, v: u32) -> Result<(), MessageError> {
    if v > MESSAGE_VERSION || v == 0 {
        return Err(MessageError::TooNew {
            prefix: prefix.to_string(),
            v,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Splitting and classifying a query string
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    Word,
    Quoted,
    Str,
    Punct(u8),
    Other,
}

#[derive(Clone, Copy, Debug)]
struct Token {
    kind: Tok,
    start: usize,
    end: usize,
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Tokens of SQL text (standard_conforming_strings on). Unterminated quotes and comments end at
/// the end of the text.
fn lex(sql: &str) -> Vec<Token> {
    let s = sql.as_bytes();
    let n = s.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let b = s[i];
        if b.is_ascii_whitespace() {
            i += 1;
        } else if b == b'-' && s.get(i + 1) == Some(&b'-') {
            while i < n && s[i] != b'\n' {
                i += 1;
            }
        } else if b == b'/' && s.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < n {
                if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b == b'\'' {
            let start = i;
            i = skip_string(s, i, false);
            out.push(Token {
                kind: Tok::Str,
                start,
                end: i,
            });
        } else if b == b'"' {
            let start = i;
            i += 1;
            while i < n {
                if s[i] == b'"' {
                    if s.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
            out.push(Token {
                kind: Tok::Quoted,
                start,
                end: i,
            });
        } else if b == b'$' {
            let start = i;
            // $1 (a parameter) or $tag$…$tag$ (a dollar-quoted string).
            let mut j = i + 1;
            if j < n && s[j].is_ascii_digit() {
                while j < n && s[j].is_ascii_digit() {
                    j += 1;
                }
                out.push(Token {
                    kind: Tok::Other,
                    start,
                    end: j,
                });
                i = j;
                continue;
            }
            while j < n && is_ident_char(s[j]) && s[j] != b'$' {
                j += 1;
            }
            if j < n && s[j] == b'$' {
                let delim = &sql[i..=j];
                match sql[j + 1..].find(delim) {
                    Some(p) => i = j + 1 + p + delim.len(),
                    None => i = n,
                }
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
            } else {
                out.push(Token {
                    kind: Tok::Other,
                    start,
                    end: i + 1,
                });
                i += 1;
            }
        } else if is_ident_start(b) {
            let start = i;
            while i < n && is_ident_char(s[i]) {
                i += 1;
            }
            // E'…' (backslash escapes), and B'…', X'…', N'…', U&'…' (plain).
            let word = &s[start..i];
            if i < n && s[i] == b'\'' && word.len() == 1 && b"eEbBxXnN".contains(&word[0]) {
                i = skip_string(s, i, word[0].eq_ignore_ascii_case(&b'e'));
                out.push(Token {
                    kind: Tok::Str,
                    start,
                    end: i,
                });
                continue;
            }
            out.push(Token {
                kind: Tok::Word,
                start,
                end: i,
            });
        } else if b.is_ascii_digit() {
            let start = i;
            while i < n && (s[i].is_ascii_alphanumeric() || s[i] == b'.' || s[i] == b'_') {
                i += 1;
            }
            out.push(Token {
                kind: Tok::Other,
                start,
                end: i,
            });
        } else {
            out.push(Token {
                kind: Tok::Punct(b),
                start: i,
                end: i + 1,
            });
            i += 1;
        }
    }
    out
}

/// Skips a quoted string starting at `i` (the opening quote); returns the index after it.
fn skip_string(s: &[u8], mut i: usize, backslash: bool) -> usize {
    i += 1;
    while i < s.len() {
        match s[i] {
            b'\\' if backslash => i += 2,
            b'\'' => {
                if s.get(i + 1) == Some(&b'\'') {
                    i += 2;
                } else {
                    return i + 1;
                }
            }
            _ => i += 1,
        }
    }
    s.len()
}

fn upper(sql: &str, t: &Token) -> String {
    if t.kind == Tok::Word {
        sql[t.start..t.end].to_ascii_uppercase()
    } else {
        String::new()
    }
}

/// Splits a query string into its statements (without the `;`, comments before a statement
/// dropped), as PostgreSQL's simple-query protocol would run them.
pub fn split_statements(sql: &str) -> Vec<&str> {
    split_tokens(sql)
        .into_iter()
        .map(|toks| &sql[toks[0].start..toks[toks.len() - 1].end])
        .collect()
}

fn split_tokens(sql: &str) -> Vec<Vec<Token>> {
    let mut out = Vec::new();
    let mut cur: Vec<Token> = Vec::new();
    let mut parens = 0i32;
    let mut atomic = 0i32;
    for t in lex(sql) {
        if t.kind == Tok::Punct(b';') && parens <= 0 && atomic <= 0 {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            parens = 0;
            atomic = 0;
            continue;
        }
        match t.kind {
            Tok::Punct(b'(') => parens += 1,
            Tok::Punct(b')') => parens -= 1,
            Tok::Word if is_routine(sql, &cur) => match upper(sql, &t).as_str() {
                // SQL-standard bodies: CREATE FUNCTION … BEGIN ATOMIC …; …; END
                "BEGIN" => atomic += 1,
                "CASE" if atomic > 0 => atomic += 1,
                "END" if atomic > 0 => atomic -= 1,
                _ => {}
            },
            _ => {}
        }
        cur.push(t);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The statement so far is CREATE [OR REPLACE] FUNCTION/PROCEDURE.
fn is_routine(sql: &str, cur: &[Token]) -> bool {
    let words: Vec<String> = cur.iter().take(4).map(|t| upper(sql, t)).collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["CREATE", "FUNCTION" | "PROCEDURE", ..]
            | ["CREATE", "OR", "REPLACE", "FUNCTION" | "PROCEDURE"]
    )
}

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
        quote_str(&path.join(", "))
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

fn quote_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
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
                quote_str(&format!(
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

// ---------------------------------------------------------------------------------------------
// Emitting sequence values
// ---------------------------------------------------------------------------------------------

/// Reads every sequence's value and emits a `tidemark.sequences` message with those that changed
/// since `last` (all of them the first time); returns how many were emitted.
pub async fn emit_changed_sequences(
    client: &tokio_postgres::Client,
    last: &mut HashMap<(String, String), (i64, bool)>,
) -> Result<usize, tokio_postgres::Error> {
    // last_value is NULL for a sequence never used (or one this role may not read): skipped.
    let rows = client
        .query(
            "SELECT schemaname::text, sequencename::text, last_value
               FROM pg_catalog.pg_sequences
              WHERE last_value IS NOT NULL AND schemaname !~ '^pg_temp'",
            &[],
        )
        .await?;
    let mut changed = Vec::new();
    for r in &rows {
        let key: (String, String) = (r.get(0), r.get(1));
        let value: (i64, bool) = (r.get(2), true);
        if last.get(&key) != Some(&value) {
            changed.push(SequenceValue {
                schema: key.0.clone(),
                name: key.1.clone(),
                last_value: value.0,
                is_called: value.1,
            });
            last.insert(key, value);
        }
    }
    if changed.is_empty() {
        return Ok(0);
    }
    let count = changed.len();
    let body = serde_json::to_string(&SequencesMessage {
        v: MESSAGE_VERSION,
        sequences: changed,
    })
    .expect("serializable");
    if let Err(e) = client
        .execute(
            "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2::text)",
            &[&SEQUENCES_PREFIX, &body],
        )
        .await
    {
        // Not emitted: emit everything again next time.
        last.clear();
        return Err(e);
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------------
// The schema guard
// ---------------------------------------------------------------------------------------------

/// A table's columns changed in the stream with no captured DDL to explain it.
#[derive(Debug, thiserror::Error)]
#[error("the columns of table {table} changed from ({before}) to ({after}) at {lsn} without a captured schema change: DDL capture (tidemark's event trigger) is not installed or was bypassed, so the archive cannot be restored past this change\nHINT: install DDL capture (run `tidemark setup` as a superuser), then take a new base backup (`tidemark backup`) so that restores after this change start from a backup that has it; restores to earlier instants are unaffected")]
pub struct UnexplainedSchemaChange {
    pub table: String,
    pub before: String,
    pub after: String,
    pub lsn: String,
}

impl crate::error::Classify for UnexplainedSchemaChange {
    fn exit_status(&self) -> crate::error::ExitStatus {
        crate::error::ExitStatus::Database
    }
}

impl UnexplainedSchemaChange {
    /// The same fact, worded for a restore.
    pub fn restore_detail(&self) -> String {
        format!(
            "the columns of table {} changed from ({}) to ({}) with no captured schema change in the archive (DDL capture was not installed on the source): replay cannot go past it\nHINT: restore to an instant before this transaction; for later instants, restore from a base backup taken after the change",
            self.table, self.before, self.after
        )
    }
}

#[derive(Clone, Debug)]
struct Known {
    /// (name, type OID; 0 when unknown).
    columns: Vec<(String, u32)>,
    /// [`SchemaGuard::ddl_seen`] when these columns were recorded.
    epoch: u64,
}

/// Checks that every change of a relation's columns is explained by a captured DDL message.
#[derive(Debug, Default)]
pub struct SchemaGuard {
    known: HashMap<u32, Known>,
    ddl_seen: u64,
}

fn columns_text(cols: &[(String, u32)]) -> String {
    cols.iter()
        .map(|c| c.0.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SchemaGuard {
    pub fn new() -> SchemaGuard {
        SchemaGuard::default()
    }

    /// Seeds what is known of a relation (column names; types 0 when unknown).
    pub fn know(&mut self, rel: &RelationInfo) {
        self.known.insert(
            rel.oid,
            Known {
                columns: rel
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_oid))
                    .collect(),
                epoch: self.ddl_seen,
            },
        );
    }

    /// Notes a captured DDL message.
    pub fn ddl(&mut self) {
        self.ddl_seen += 1;
    }

    /// A Relation message: an error if its columns differ from what was known with no DDL
    /// message since. `check: false` ignores it (a restore's messages from before its base
    /// backup's point: the backup's columns are authoritative).
    pub fn relation(
        &mut self,
        rel: &RelationInfo,
        check: bool,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        if !check {
            return Ok(());
        }
        let columns: Vec<(String, u32)> = rel
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        if let Some(k) = self.known.get(&rel.oid) {
            let same = k.columns.len() == columns.len()
                && k.columns
                    .iter()
                    .zip(&columns)
                    .all(|(a, b)| a.0 == b.0 && (a.1 == 0 || b.1 == 0 || a.1 == b.1));
            if !same && k.epoch == self.ddl_seen {
                return Err(UnexplainedSchemaChange {
                    table: rel.qualified_name(),
                    before: columns_text(&k.columns),
                    after: columns_text(&columns),
                    lsn: lsn.to_string(),
                });
            }
        }
        self.known.insert(
            rel.oid,
            Known {
                columns,
                epoch: self.ddl_seen,
            },
        );
        Ok(())
    }

    /// The archiver's check of one raw record of the stream (any pgoutput message outside a
    /// streamed chunk).
    pub fn observe(
        &mut self,
        payload: &bytes::Bytes,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        match payload.first() {
            Some(b'R') | Some(b'M') => {}
            _ => return Ok(()),
        }
        let Ok(msg) = pgoutput::decode(payload, false) else {
            return Ok(()); // the writer reports undecodable records itself
        };
        self.observe_message(&msg, lsn)
    }

    /// [`Self::observe`] for a decoded message (one of a streamed chunk is decoded `in_stream`).
    pub fn observe_message(
        &mut self,
        msg: &Message,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        match msg {
            Message::Message {
                prefix, content, ..
            } if prefix == DDL_PREFIX => {
                self.ddl();
                if let Ok(Some(TidemarkMessage::Ddl(m))) = decode_message(prefix, content) {
                    if let Err(e) = plan_replay(&m) {
                        warn!(%lsn, "a captured schema change will stop restores past it: {e}");
                    }
                }
                Ok(())
            }
            Message::Relation { .. } => match RelationInfo::from_message(msg) {
                Some(rel) => self.relation(&rel, true, lsn),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restore support
// ---------------------------------------------------------------------------------------------

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
    fn splits_around_quotes_comments_and_bodies() {
        let sql = "CREATE TABLE t (a text DEFAULT 'x;y'); -- c;omment\n\
                   INSERT INTO t VALUES ($$a;b$$), (E'it\\'s;'), ($q$ $$ ; $q$);\
                   /* a /* nested; */ comment */ CREATE FUNCTION f() RETURNS int LANGUAGE sql \
                   BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; SELECT 2; END; \
                   ALTER TABLE \"we;ird\" ADD COLUMN b int;;  ";
        let parts = split_statements(sql);
        assert_eq!(parts.len(), 4, "{parts:#?}");
        assert_eq!(parts[0], "CREATE TABLE t (a text DEFAULT 'x;y')");
        assert!(parts[1].starts_with("INSERT") && parts[1].ends_with("$q$ $$ ; $q$)"));
        assert!(
            parts[2].starts_with("CREATE FUNCTION") && parts[2].ends_with("SELECT 2; END"),
            "{}",
            parts[2]
        );
        assert_eq!(parts[3], "ALTER TABLE \"we;ird\" ADD COLUMN b int");
        // A parameter is not a dollar quote.
        assert_eq!(split_statements("SELECT $1; SELECT 2").len(), 2);
    }

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
    fn decodes_messages_and_refuses_newer_versions() {
        let m = decode_message(DDL_PREFIX, br#"{"v":1,"query":"DROP TABLE t","tag":"DROP TABLE","search_path":["public"],"role":"x"}"#)
            .unwrap()
            .unwrap();
        assert!(matches!(m, TidemarkMessage::Ddl(d) if d.query == "DROP TABLE t"));
        assert!(decode_message("tidemark.heartbeat", b"").unwrap().is_none());
        assert!(matches!(
            decode_message(SEQUENCES_PREFIX, br#"{"v":2,"sequences":[]}"#),
            Err(MessageError::TooNew { .. })
        ));
        assert!(decode_message(DDL_PREFIX, b"not json").is_err());
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

    #[test]
    fn guard_accepts_explained_changes_only() {
        let rel = |cols: &[(&str, u32)]| RelationInfo {
            oid: 42,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            partitioned: false,
            columns: cols
                .iter()
                .map(|(n, t)| crate::statement::ColumnInfo {
                    name: n.to_string(),
                    type_oid: *t,
                    is_key: false,
                })
                .collect(),
        };
        let mut g = SchemaGuard::new();
        g.relation(&rel(&[("a", 23)]), true, "0/1").unwrap();
        // Sent again unchanged (any relcache invalidation does that): fine.
        g.relation(&rel(&[("a", 23)]), true, "0/2").unwrap();
        g.ddl();
        g.relation(&rel(&[("a", 20), ("b", 25)]), true, "0/3")
            .unwrap();
        let e = g
            .relation(&rel(&[("a", 20)]), true, "0/4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"public\".\"t\"") && e.contains("(a, b) to (a)") && e.contains("HINT"),
            "{e}"
        );
        // Unknown types (a base backup's manifest) compare by name.
        let mut g = SchemaGuard::new();
        g.know(&rel(&[("a", 0)]));
        g.relation(&rel(&[("a", 23)]), true, "0/5").unwrap();
    }
}
