//! The target database of a restore: checked before the first write, marked while it is being
//! written.
//!
//! Before anything is written, the target must be empty (nothing but the catalogs) and its role
//! must be allowed to create what the base backup holds. The first write is the *marker*: a
//! table [`MARKER_TABLE`] in schema `public` with one row (when, what backup, which repository,
//! which process). It is dropped as the very last step of a successful restore, so a target
//! that still has it is incomplete: a restore into it failed or was killed. A later restore
//! into such a target is refused with a message that says so (it is not empty).

use tokio_postgres::Client;

use super::RestoreError;
use crate::backup::Manifest;
use crate::conninfo::ConnInfo;

/// The table that marks a target as holding a restore in progress.
pub const MARKER_TABLE: &str = "tidemark_restore_in_progress";

/// Checks that the target holds nothing but the catalogs (an interrupted restore is named as
/// such).
pub async fn check_empty(client: &Client, info: &ConnInfo) -> Result<(), RestoreError> {
    let query = |what: &'static str| {
        move |source| RestoreError::TargetQuery {
            what: what.into(),
            source,
        }
    };
    let marker = client
        .query_opt(
            &format!(
                "SELECT format('started at %s by %s, from base backup %s of %s', started_at,
                               host, backup_id, repository)
                   FROM public.{MARKER_TABLE} LIMIT 1"
            ),
            &[],
        )
        .await;
    match marker {
        Ok(row) => {
            let detail: String = row
                .map(|r| r.get(0))
                .unwrap_or_else(|| "its marker holds no details".into());
            return Err(RestoreError::TargetIncomplete {
                target: info.to_string(),
                detail,
            });
        }
        // 42P01: the marker table does not exist (the usual case); 3F000: no schema public.
        Err(e)
            if e.code()
                .is_some_and(|c| matches!(c.code(), "42P01" | "3F000")) => {}
        Err(e) => return Err(query("looking for an interrupted restore")(e)),
    }
    let row = client
        .query_one(
            "SELECT count(*), coalesce(string_agg(format('%I.%I', n.nspname, c.relname), ', '), '')
               FROM (SELECT * FROM pg_class LIMIT 1000) c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                AND n.nspname NOT LIKE 'pg\\_temp%' AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await
        .map_err(query("listing its relations"))?;
    let n: i64 = row.get(0);
    if n > 0 {
        let names: String = row.get(1);
        let shown: String = names.chars().take(200).collect();
        return Err(RestoreError::TargetNotEmpty(
            info.to_string(),
            format!("{n} relation(s): {shown}"),
        ));
    }
    Ok(())
}

/// Checks that the target's role may create what the backup holds: tables in `public` (and
/// the marker), and schemas when the backup has tables outside `public`. A superuser may.
pub async fn check_privileges(
    client: &Client,
    info: &ConnInfo,
    m: &Manifest,
) -> Result<(), RestoreError> {
    let row = client
        .query_one(
            "SELECT r.rolsuper, current_user::text, current_database()::text,
                    has_database_privilege(current_database(), 'CREATE'),
                    to_regnamespace('public') IS NOT NULL
                      AND has_schema_privilege('public', 'CREATE')
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|source| RestoreError::TargetQuery {
            what: "reading the role's privileges".into(),
            source,
        })?;
    let (superuser, role, db): (bool, String, String) = (row.get(0), row.get(1), row.get(2));
    let (create_db, create_public): (bool, bool) = (row.get(3), row.get(4));
    if superuser {
        return Ok(());
    }
    let ident = crate::sql::quote_ident;
    let missing = if !create_public {
        Some((
            "CREATE on schema public".to_string(),
            format!("GRANT CREATE ON SCHEMA public TO {};", ident(&role)),
        ))
    } else if !create_db && m.tables.iter().any(|t| t.schema != "public") {
        Some((
            format!("CREATE on database {db:?} (the backup has schemas other than public)"),
            format!(
                "GRANT CREATE ON DATABASE {} TO {};",
                ident(&db),
                ident(&role)
            ),
        ))
    } else {
        None
    };
    match missing {
        Some((what, grant)) => Err(RestoreError::TargetPrivilege {
            target: info.to_string(),
            role,
            what,
            grant,
        }),
        None => Ok(()),
    }
}

/// Writes the marker: the first write of a restore.
pub async fn mark_in_progress(
    client: &Client,
    m: &Manifest,
    repository: &str,
) -> Result<(), RestoreError> {
    let host = crate::host::hostname();
    let sql = format!(
        "CREATE TABLE public.{MARKER_TABLE} (started_at timestamptz NOT NULL, backup_id text NOT NULL,
                                              repository text NOT NULL, host text NOT NULL, pid int NOT NULL);
         COMMENT ON TABLE public.{MARKER_TABLE} IS {};
         INSERT INTO public.{MARKER_TABLE} VALUES (now(), {}, {}, {}, {});",
        crate::sql::quote_literal(
            "tidemark: a restore into this database is in progress, or was interrupted; \
             the database is complete only once this table is gone"
        ),
        crate::sql::quote_literal(&m.id),
        crate::sql::quote_literal(repository),
        crate::sql::quote_literal(&host),
        std::process::id(),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(|source| RestoreError::TargetQuery {
            what: "marking the restore as in progress".into(),
            source,
        })
}

/// Drops the marker: the last step of a successful restore. (Replayed DDL may have dropped
/// schema `public` with it.)
pub async fn mark_complete(client: &Client) -> Result<(), RestoreError> {
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS public.{MARKER_TABLE}"))
        .await
        .map_err(|source| RestoreError::TargetQuery {
            what: "removing the in-progress marker".into(),
            source,
        })
}
