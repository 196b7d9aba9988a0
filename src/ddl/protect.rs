//! Protection of the publications tidemark archives through.
//!
//! A publication dropped (or renamed) under a running archiver cannot simply be created again:
//! the slot decodes with the catalog as it was at each change, where the new publication does
//! not exist yet, so every later attempt fails the same way (the archiver then starts a new
//! generation: see `archive`). An event trigger refuses that: `DROP PUBLICATION`, `ALTER
//! PUBLICATION` (a `publish` option or a rename would silently narrow what is archived) and
//! `DROP OWNED` of a protected publication fail with a message saying why and what to do, as
//! long as a pgoutput slot exists in the database. Once no such slot is left (the archiver was
//! retired and its slot dropped), the publication may go.
//!
//! The protected names are the value of `tidemark.protected_publications_v1()`, a function the
//! archiver (re)defines when its publication is not among them yet, so a database with several
//! archivers protects each one's publication. Installing it needs a superuser, like DDL capture.

use tracing::{info, warn};

use crate::sql::quote_literal;

/// Name of the event trigger on `sql_drop` that refuses dropping a protected publication.
pub const GUARD_DROP_TRIGGER: &str = "tidemark_publication_guard_drop_v1";
/// Name of the event trigger on `ddl_command_end` that refuses altering one.
pub const GUARD_END_TRIGGER: &str = "tidemark_publication_guard_v1";

const GUARD_FUNCTION_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS tidemark;
CREATE OR REPLACE FUNCTION tidemark.publication_guard_v1() RETURNS event_trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  hit text;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots
                  WHERE database = pg_catalog.current_database() AND plugin = 'pgoutput') THEN
    RETURN;
  END IF;
  IF tg_event = 'sql_drop' THEN
    SELECT o.object_identity INTO hit FROM pg_catalog.pg_event_trigger_dropped_objects() o
     WHERE o.object_type = 'publication'
       AND o.object_identity = ANY (tidemark.protected_publications_v1()) LIMIT 1;
  ELSE
    SELECT p INTO hit FROM pg_catalog.unnest(tidemark.protected_publications_v1()) p
     WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() c
                    WHERE c.object_type = 'publication'
                      AND (c.object_identity = p
                           OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication
                                           WHERE pubname = p)))
     LIMIT 1;
  END IF;
  IF hit IS NOT NULL THEN
    RAISE EXCEPTION 'publication % is archived by tidemark: dropping or altering it would stop the archive at this point', hit
      USING ERRCODE = 'object_in_use',
            HINT = 'to retire the archive, stop the archiver and drop its replication slot first (SELECT pg_drop_replication_slot(...)); the publication may be dropped once no pgoutput slot is left in this database';
  END IF;
END
$fn$;
"#;

/// Makes sure `publication` is protected: the guard's function and triggers exist and its name
/// is among the protected ones. Only what is missing is created (each creation is archived as
/// DDL). A role that may not create event triggers is reported, not an error.
pub async fn ensure_protected(client: &tokio_postgres::Client, publication: &str) {
    match protect(client, publication).await {
        Ok(Some(done)) => info!("{done}"),
        Ok(None) => {}
        Err(e) => warn!(
            publication,
            error = %crate::error::chain(&e),
            "cannot protect the publication against DROP and ALTER; dropping it would force a new generation"
        ),
    }
}

/// The statements that install the guard protecting `publications` (sorted, each once): its
/// function, the list of protected names, and the event `triggers` named (of
/// [`GUARD_DROP_TRIGGER`], [`GUARD_END_TRIGGER`]). Needs a superuser; run in one transaction.
pub fn guard_install_sql(publications: &[String], triggers: &[&str]) -> String {
    let list = publications
        .iter()
        .map(|n| quote_literal(n))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!(
        "{GUARD_FUNCTION_SQL}
CREATE OR REPLACE FUNCTION tidemark.protected_publications_v1() RETURNS text[]
  LANGUAGE sql IMMUTABLE AS $fn$ SELECT ARRAY[{list}]::text[] $fn$;\n"
    );
    for (name, event) in [
        (GUARD_DROP_TRIGGER, "sql_drop"),
        (GUARD_END_TRIGGER, "ddl_command_end"),
    ] {
        if triggers.contains(&name) {
            sql.push_str(&format!(
                "CREATE EVENT TRIGGER {name} ON {event} WHEN TAG IN ('DROP PUBLICATION', 'ALTER PUBLICATION', 'DROP OWNED') EXECUTE FUNCTION tidemark.publication_guard_v1();\n"
            ));
        }
    }
    sql
}

async fn protect(
    client: &tokio_postgres::Client,
    publication: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user),
                    (SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtname IN ($1, $2)),
                    to_regproc('tidemark.protected_publications_v1') IS NOT NULL",
            &[&GUARD_DROP_TRIGGER, &GUARD_END_TRIGGER],
        )
        .await?;
    let (superuser, triggers, listed): (Option<bool>, i64, bool) =
        (row.get(0), row.get(1), row.get(2));
    let mut names: Vec<String> = if listed {
        client
            .query_one("SELECT tidemark.protected_publications_v1()", &[])
            .await?
            .get(0)
    } else {
        Vec::new()
    };
    if triggers == 2 && names.iter().any(|n| n == publication) {
        return Ok(None);
    }
    if superuser != Some(true) {
        warn!(
            publication,
            "the publication is not protected against DROP and ALTER: that needs a superuser (run `tidemark setup` as one); dropping it would force a new generation"
        );
        return Ok(None);
    }
    if !names.iter().any(|n| n == publication) {
        names.push(publication.to_string());
        names.sort();
    }
    let mut triggers = Vec::new();
    for name in [GUARD_DROP_TRIGGER, GUARD_END_TRIGGER] {
        if !super::event_trigger_exists(client, name).await? {
            triggers.push(name);
        }
    }
    let mut sql = format!("BEGIN; {}", guard_install_sql(&names, &triggers));
    sql.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    Ok(Some(format!(
        "publication {publication:?} is protected against DROP and ALTER while a slot uses it (event triggers {GUARD_END_TRIGGER}, {GUARD_DROP_TRIGGER})"
    )))
}
