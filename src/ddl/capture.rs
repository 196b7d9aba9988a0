//! Capture, on the source: the schema, functions and event triggers that emit a `tidemark.ddl`
//! message for every top-level query that changes the schema (installed by `setup`, or by
//! `archive` when missing and the role may), and the archiver's emission of changed sequence
//! values as `tidemark.sequences` messages with its heartbeat.

use std::collections::HashMap;

use tracing::{info, warn};

use super::message::{SequenceValue, SequencesMessage, MESSAGE_VERSION, SEQUENCES_PREFIX};

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
