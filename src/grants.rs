//! `tidemark setup --print-grants`: the least privilege each command needs, printed for an
//! administrator to apply, never applied by tidemark itself.
//!
//! Two documents:
//! * `sql`, a psql script with two parts. Part 1 is run once by a superuser on the source: the
//!   archiver's role (`LOGIN REPLICATION`, `SELECT` on what base backups read), and what that
//!   role may not create itself — the publication (`FOR ALL TABLES` needs a superuser) and DDL
//!   capture with the publication's guard (event triggers need a superuser; see
//!   [`crate::ddl`]). Part 2 is the restore role and an empty target database it owns. Every
//!   grant has a comment saying what needs it. No password is in it: `\password ROLE` sets one.
//! * `s3`, the IAM policies of the repository's prefix, one for each kind of command: the
//!   archiver (`archive`, `backup`), restore (`restore`, `list`) and prune (`prune`, `pin`,
//!   `unpin`), with exactly the S3 actions `crate::store::s3` calls for them.
//!
//! Without `--source` nothing is connected to: the database name comes from the connection
//! string's defaults and the grants are schema-wide (`ALL TABLES IN SCHEMA public`). With it,
//! the script names each table and sequence, the schemas holding them and their owners (for
//! the default privileges of tables created later), and says when a part is already there.
//!
//! The rendering ([`render_sql`], [`render_s3`]) is pure; only [`Inventory::read`] does I/O.

use std::collections::BTreeSet;
use std::fmt::Write;

use clap::{Args, ValueEnum};

use crate::exit::UsageError;
use crate::source::{Source, SourceError};
use crate::sql::{quote_ident, quote_literal};

/// Which document `--print-grants` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GrantsFormat {
    /// The PostgreSQL roles and grants, as a psql script.
    Sql,
    /// The S3 IAM policies of the repository's prefix, as one JSON object.
    S3,
}

/// The flags of `setup --print-grants` (flattened into `setup`'s).
#[derive(Args, Debug, Clone)]
pub struct GrantArgs {
    /// Print the least privilege tidemark needs instead of setting up, and change nothing:
    /// `sql` (the default) a psql script of the roles and grants for a superuser to run (with
    /// --source it names the tables; without, no connection is made); `s3` the IAM policies of
    /// --repo s3://BUCKET/PREFIX for the archiver, restore and prune.
    #[arg(long, env = "TIDEMARK_PRINT_GRANTS", value_enum, num_args = 0..=1, default_missing_value = "sql")]
    pub print_grants: Option<GrantsFormat>,
    /// The archiver's role in the printed grants (runs `archive` and `backup`).
    #[arg(
        long,
        env = "TIDEMARK_ARCHIVER_ROLE",
        default_value = "tidemark_archiver"
    )]
    pub archiver_role: String,
    /// The restore role in the printed grants (runs `restore`).
    #[arg(
        long,
        env = "TIDEMARK_RESTORE_ROLE",
        default_value = "tidemark_restore"
    )]
    pub restore_role: String,
    /// The empty target database the printed grants create for the restore role
    /// (default: the source database's name followed by `_restored`).
    #[arg(long, env = "TIDEMARK_RESTORE_DATABASE")]
    pub restore_database: Option<String>,
    /// The repository whose IAM policies `--print-grants s3` prints: s3://BUCKET/PREFIX.
    #[arg(long, env = "TIDEMARK_REPO")]
    pub repo: Option<String>,
}

/// What the script grants on the source, named one by one (read with `--source`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Permanent tables the publication carries (FOR ALL TABLES: all of them), quoted.
    pub published: Vec<String>,
    /// The other tables `pg_dump --schema-only` locks (unlogged ones, those outside a narrower
    /// publication), quoted.
    pub unpublished: Vec<String>,
    /// Every sequence, quoted.
    pub sequences: Vec<String>,
    /// The schemas holding them, quoted.
    pub schemas: Vec<String>,
    /// (owner, schema) of every table and sequence, both quoted: the default privileges.
    pub owners: BTreeSet<(String, String)>,
    /// Tables with row-level security enabled, quoted.
    pub row_security: Vec<String>,
    pub publication_exists: bool,
    pub capture_installed: bool,
}

/// Everything the SQL script depends on.
#[derive(Clone, Debug)]
pub struct SqlRequest {
    pub database: String,
    pub publication: String,
    pub slot: String,
    pub archiver_role: String,
    pub restore_role: String,
    pub restore_database: String,
    /// `None` without `--source`: schema-wide grants on `public`.
    pub inventory: Option<Inventory>,
}

/// Prints the document `format` asks for. `source` is only connected to when `connect`.
pub async fn run(
    args: &GrantArgs,
    format: GrantsFormat,
    source: &crate::conninfo::ConnInfo,
    connect: bool,
    slot: &str,
    publication: &str,
) -> anyhow::Result<()> {
    match format {
        GrantsFormat::S3 => {
            let repo = args.repo.as_deref().unwrap_or_default();
            let (bucket, prefix) = s3_repo(repo)?;
            println!("{}", render_s3(&bucket, &prefix));
        }
        GrantsFormat::Sql => {
            let inventory = if connect {
                let source = Source::connect(source).await?;
                Some(Inventory::read(&source, publication).await?)
            } else {
                None
            };
            let database = source.dbname().to_string();
            let req = SqlRequest {
                restore_database: args
                    .restore_database
                    .clone()
                    .unwrap_or_else(|| format!("{database}_restored")),
                database,
                publication: publication.to_string(),
                slot: slot.to_string(),
                archiver_role: args.archiver_role.clone(),
                restore_role: args.restore_role.clone(),
                inventory,
            };
            print!("{}", render_sql(&req));
        }
    }
    Ok(())
}

/// The bucket and prefix of an `s3://` repository, or a usage error saying what to give.
fn s3_repo(repo: &str) -> Result<(String, String), UsageError> {
    if !repo.starts_with("s3://") {
        let given = if repo.is_empty() {
            "no --repo".to_string()
        } else {
            format!("--repo {repo:?}")
        };
        return Err(UsageError(format!(
            "--print-grants s3 needs the repository as s3://BUCKET/PREFIX, got {given}\nHINT: add --repo s3://BUCKET/PREFIX (a folder repository needs only file permissions: the archiver's OS user writes it, restore reads it)"
        )));
    }
    let (bucket, prefix) =
        crate::store::s3::parse_url(repo).map_err(|e| UsageError(e.to_string()))?;
    Ok((bucket, prefix.trim_matches('/').to_string()))
}

/// Tables (permanent and unlogged, partitioned ones too) and sequences in user schemas (not
/// the catalogs, TOAST, temporary schemas or tidemark's own): name, kind, persistence, row
/// security, owner, schema, and whether the publication carries it ($1; FOR ALL TABLES, as
/// `setup` creates it, when it does not exist yet).
const USER_RELATIONS_SQL: &str = "
SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text, c.relpersistence::text,
       c.relrowsecurity, quote_ident(pg_get_userbyid(c.relowner)), quote_ident(n.nspname),
       CASE WHEN NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
            THEN c.relpersistence = 'p'
            ELSE EXISTS (SELECT 1 FROM pg_publication_tables pt
                          WHERE pt.pubname = $1 AND pt.schemaname = n.nspname
                            AND pt.tablename = c.relname) END
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'S') AND c.relpersistence IN ('p', 'u')
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp)'
   AND n.nspname <> 'tidemark'
 ORDER BY 1";

impl Inventory {
    /// Reads the tables, sequences, schemas and owners of the source's database.
    pub async fn read(source: &Source, publication: &str) -> Result<Inventory, SourceError> {
        let q = |what: &'static str| move |source| SourceError::Query { what, source };
        let rows = source
            .client
            .query(USER_RELATIONS_SQL, &[&publication])
            .await
            .map_err(q("list the tables and sequences"))?;
        let mut inv = Inventory {
            publication_exists: source.publication_exists(publication).await?,
            capture_installed: crate::ddl::event_trigger_exists(
                &source.client,
                crate::ddl::END_TRIGGER,
            )
            .await
            .map_err(q("look up DDL capture"))?,
            ..Inventory::default()
        };
        let mut schemas = BTreeSet::new();
        for r in &rows {
            let (name, kind, rls, owner, schema, published): (
                String,
                String,
                bool,
                String,
                String,
                bool,
            ) = (r.get(0), r.get(1), r.get(3), r.get(4), r.get(5), r.get(6));
            match kind.as_str() {
                "S" => inv.sequences.push(name.clone()),
                // A partitioned table's rows are in its partitions; pg_dump locks it as well.
                _ if published => inv.published.push(name.clone()),
                _ => inv.unpublished.push(name.clone()),
            }
            if rls && kind != "S" {
                inv.row_security.push(name);
            }
            schemas.insert(schema.clone());
            inv.owners.insert((owner, schema));
        }
        inv.schemas = schemas.into_iter().collect();
        Ok(inv)
    }
}

/// The psql script of the roles and grants (see the module's doc).
pub fn render_sql(r: &SqlRequest) -> String {
    let mut s = String::new();
    let arch = quote_ident(&r.archiver_role);
    let rest = quote_ident(&r.restore_role);
    let db = quote_ident(&r.database);
    let _ = writeln!(
        s,
        "-- tidemark: the least privilege for archiving database {} and restoring it.\n\
         -- Generated by `tidemark setup --print-grants`; review it, then run it as a superuser:\n\
         --   psql -v ON_ERROR_STOP=1 -d {} -f grants.sql\n\
         -- It sets no password: give each role one with \\password ROLE in psql (SCRAM), and\n\
         -- pass it to tidemark with PGPASSWORD, ~/.pgpass or passfile, never on the command line.\n",
        quote_literal(&r.database),
        r.database
    );
    let _ = writeln!(
        s,
        "-- Part 1: on the source, connected to database {db}.\n\n\
         -- The archiver's role: runs `tidemark archive` and `tidemark backup`.\n\
         --   LOGIN REPLICATION: the replication connection, creating slot {} (the archiver\n\
         --   creates it, and base backups' temporary slots, itself), streaming pgoutput, and\n\
         --   exporting the snapshot a base backup reads in. Not a superuser.\n\
         CREATE ROLE {arch} LOGIN REPLICATION;\n\
         -- CONNECT: PUBLIC has it by default; granted in case it was revoked.\n\
         GRANT CONNECT ON DATABASE {db} TO {arch};",
        quote_literal(&r.slot)
    );
    archiver_reads(&mut s, r, &arch);
    admin_objects(&mut s, r, &arch);
    restore_part(&mut s, r, &rest);
    s
}

/// The archiver's read privileges: schemas, tables, sequences, and those created later.
fn archiver_reads(s: &mut String, r: &SqlRequest, arch: &str) {
    let Some(inv) = &r.inventory else {
        let _ = writeln!(
            s,
            "-- USAGE on each schema holding tables (repeat for every schema other than public, or\n\
             -- run `tidemark setup --print-grants --source …` to have them listed).\n\
             GRANT USAGE ON SCHEMA public TO {arch};\n\
             -- SELECT on every table: base backups COPY the published ones (FOR ALL TABLES: all),\n\
             -- and pg_dump --schema-only takes an ACCESS SHARE lock on each table it dumps.\n\
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {arch};\n\
             -- SELECT on sequences: base backups and the heartbeat record their values (without it\n\
             -- PostgreSQL shows them as NULL and a restore starts them over).\n\
             GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO {arch};\n\
             -- Tables and sequences created later are published at once (FOR ALL TABLES), so the\n\
             -- next base backup must read them too. This covers those the role running this\n\
             -- script creates; add FOR ROLE owner for every other role that creates tables.\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {arch};\n\
             ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON SEQUENCES TO {arch};\n\
             -- A table with row-level security needs BYPASSRLS (base backups COPY with\n\
             -- row_security = off, which fails rather than skip hidden rows):\n\
             --   ALTER ROLE {arch} BYPASSRLS;"
        );
        return;
    };
    if !inv.schemas.is_empty() {
        let _ = writeln!(
            s,
            "-- USAGE on the schemas holding tables and sequences: to name them.\n\
             GRANT USAGE ON SCHEMA {} TO {arch};",
            inv.schemas.join(", ")
        );
    }
    if !inv.published.is_empty() {
        let _ = writeln!(
            s,
            "-- SELECT on the published tables: base backups COPY them (and lock them, as pg_dump).\n\
             GRANT SELECT ON TABLE {} TO {arch};",
            inv.published.join(", ")
        );
    }
    if !inv.unpublished.is_empty() {
        let _ = writeln!(
            s,
            "-- SELECT on the other tables: pg_dump --schema-only takes an ACCESS SHARE lock on\n\
             -- every table it dumps, which needs SELECT.\n\
             GRANT SELECT ON TABLE {} TO {arch};",
            inv.unpublished.join(", ")
        );
    }
    if !inv.sequences.is_empty() {
        let _ = writeln!(
            s,
            "-- SELECT on sequences: base backups and the heartbeat record their values (without it\n\
             -- PostgreSQL shows them as NULL and a restore starts them over).\n\
             GRANT SELECT ON SEQUENCE {} TO {arch};",
            inv.sequences.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "-- Tables and sequences created later are published at once (FOR ALL TABLES), so the\n\
         -- next base backup must read them too: default privileges for each role that creates\n\
         -- them (a new schema needs GRANT USAGE as well)."
    );
    for (owner, schema) in &inv.owners {
        let _ = writeln!(
            s,
            "ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT SELECT ON TABLES TO {arch};\n\
             ALTER DEFAULT PRIVILEGES FOR ROLE {owner} IN SCHEMA {schema} GRANT SELECT ON SEQUENCES TO {arch};"
        );
    }
    if !inv.row_security.is_empty() {
        let _ = writeln!(
            s,
            "-- Row-level security is enabled on {}: base backups COPY with row_security = off\n\
             -- (which fails rather than skip hidden rows), and that needs BYPASSRLS.\n\
             ALTER ROLE {arch} BYPASSRLS;",
            inv.row_security.join(", ")
        );
    }
}

/// What only a superuser may create: the publication, DDL capture and the publication's guard.
fn admin_objects(s: &mut String, r: &SqlRequest, arch: &str) {
    let publication = vec![r.publication.clone()];
    let publication_exists = r.inventory.as_ref().is_some_and(|i| i.publication_exists);
    let capture_installed = r.inventory.as_ref().is_some_and(|i| i.capture_installed);
    let _ = writeln!(
        s,
        "\n-- Run once by the administrator, for the archiver's role may not (`tidemark setup`, run\n\
         -- as a superuser, does the same):"
    );
    if publication_exists {
        let _ = writeln!(
            s,
            "-- publication {} exists.",
            quote_literal(&r.publication)
        );
    } else {
        let _ = writeln!(
            s,
            "-- The publication: CREATE PUBLICATION … FOR ALL TABLES needs a superuser.\n\
             CREATE PUBLICATION {} FOR ALL TABLES;",
            quote_ident(&r.publication)
        );
    }
    if capture_installed {
        let _ = writeln!(s, "-- DDL capture is installed.");
    } else {
        let _ = writeln!(
            s,
            "-- DDL capture: event triggers (superuser only) emit each schema change into the stream,\n\
             -- so a restore replays it; without them a change to a table's columns stops the archiver.\n\
             BEGIN;{}",
            crate::ddl::CAPTURE_FUNCTIONS_SQL
        );
        for (_, create) in crate::ddl::CAPTURE_TRIGGERS_SQL {
            let _ = writeln!(s, "{create}");
        }
        let _ = writeln!(s, "COMMIT;");
    }
    let _ = writeln!(
        s,
        "-- The publication's guard: event triggers refusing DROP and ALTER PUBLICATION of it\n\
         -- while a slot uses it (it would force a new generation). If other archivers' publications\n\
         -- are protected in this database, list them too (`tidemark setup` as a superuser merges them).\n\
         BEGIN;{}COMMIT;",
        crate::ddl::guard_install_sql(
            &publication,
            &[crate::ddl::GUARD_DROP_TRIGGER, crate::ddl::GUARD_END_TRIGGER]
        )
    );
    let _ = writeln!(
        s,
        "-- USAGE on schema tidemark: the archiver checks at each start that its publication is\n\
         -- among the protected ones (tidemark.protected_publications_v1()).\n\
         GRANT USAGE ON SCHEMA tidemark TO {arch};"
    );
}

/// Part 2: the restore role and its target database.
fn restore_part(s: &mut String, r: &SqlRequest, rest: &str) {
    let target = quote_ident(&r.restore_database);
    let _ = writeln!(
        s,
        "\n-- Part 2: on the restore target's server (here or another), as a superuser.\n\n\
         -- The restore role: runs `tidemark restore` (and reads the repository; it never connects\n\
         -- to the source). Not a superuser, no REPLICATION.\n\
         CREATE ROLE {rest} LOGIN;\n\
         -- The target: an empty database it owns, so it may create the schemas, tables, indexes\n\
         -- and sequences of the base backup (pg_restore --no-owner) and replay into them. Every\n\
         -- restore needs a new empty database made like this one.\n\
         CREATE DATABASE {target} OWNER {rest};\n\
         -- Replay sets session_replication_role = replica so the target's triggers and foreign\n\
         -- keys do not fire again for changes the source already made (PostgreSQL 15 and later;\n\
         -- on older servers only a superuser may, and triggers fire during replay).\n\
         GRANT SET ON PARAMETER session_replication_role TO {rest};\n\
         -- Not granted, so not restored: event triggers (superuser only; DDL capture is not\n\
         -- installed on the restored database), and extensions that are not trusted.\n\
         -- `tidemark list` needs no database role at all."
    );
}

/// An IAM policy document.
fn policy(statements: Vec<serde_json::Value>) -> serde_json::Value {
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements })
}

/// `s3:ListBucket` limited to the repository's prefix. `IfExists`: a HEAD or GET of a missing
/// key is answered 404 (not 403) only when the caller may list, and that check carries no
/// prefix; the same holds for `HeadBucket`, which tidemark sends to tell a missing key from a
/// missing bucket.
fn list_statement(sid: &str, bucket: &str, prefix: &str, actions: &[&str]) -> serde_json::Value {
    let pattern = if prefix.is_empty() {
        "*".to_string()
    } else {
        format!("{prefix}/*")
    };
    serde_json::json!({
        "Sid": sid,
        "Effect": "Allow",
        "Action": actions,
        "Resource": format!("arn:aws:s3:::{bucket}"),
        "Condition": { "StringLikeIfExists": { "s3:prefix": [pattern] } }
    })
}

fn objects_statement(sid: &str, bucket: &str, under: &str, actions: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "Sid": sid,
        "Effect": "Allow",
        "Action": actions,
        "Resource": format!("arn:aws:s3:::{bucket}/{under}*"),
    })
}

/// The three IAM policies of `s3://bucket/prefix`, as one JSON object keyed by who uses each:
/// `archiver`, `restore`, `prune` (and `notes`, what each action is for).
pub fn render_s3(bucket: &str, prefix: &str) -> String {
    let under = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let archiver = policy(vec![
        list_statement(
            "ListTheRepository",
            bucket,
            prefix,
            &["s3:ListBucket", "s3:ListBucketMultipartUploads"],
        ),
        objects_statement(
            "WriteAndReadTheRepository",
            bucket,
            &under,
            &[
                "s3:PutObject",
                "s3:GetObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
            ],
        ),
    ]);
    let audit = || {
        objects_statement(
            "WriteAuditRecords",
            bucket,
            &format!("{under}{}", crate::catalog::keys::AUDIT),
            &["s3:PutObject"],
        )
    };
    let restore = policy(vec![
        list_statement("ListTheRepository", bucket, prefix, &["s3:ListBucket"]),
        objects_statement("ReadTheRepository", bucket, &under, &["s3:GetObject"]),
        objects_statement(
            "ThawColdBackups",
            bucket,
            &format!("{under}{}", crate::catalog::keys::BASEBACKUPS),
            &["s3:RestoreObject"],
        ),
        audit(),
    ]);
    let prune = policy(vec![
        list_statement("ListTheRepository", bucket, prefix, &["s3:ListBucket"]),
        objects_statement(
            "ReadAndDeleteTheRepository",
            bucket,
            &under,
            &["s3:GetObject", "s3:DeleteObject"],
        ),
        objects_statement(
            "WritePins",
            bucket,
            &format!("{under}{}", crate::catalog::keys::PINS),
            &["s3:PutObject"],
        ),
        objects_statement(
            "MoveArchivesToTheArchiveClass",
            bucket,
            &format!("{under}{}", crate::catalog::keys::BASEBACKUPS),
            &["s3:PutObject", "s3:AbortMultipartUpload"],
        ),
        audit(),
    ]);
    let notes = serde_json::json!({
        "archiver": "tidemark archive and tidemark backup. s3:ListBucket: ListObjectsV2 of the repository (segments, base backups, the writer lease) and HeadBucket (a missing bucket told from a missing key); s3:ListBucketMultipartUploads: uploads left by a retried CreateMultipartUpload; s3:PutObject: segments, base backups, archive.json, writer-lease records, the write probe (PutObject and the multipart calls); s3:GetObject: GetObject and HeadObject (identity, lease, a retried write compared); s3:DeleteObject: the write probe, superseded lease records, segments stored past a failed upload, the objects of a failed base backup; s3:AbortMultipartUpload: a failed large upload.",
        "restore": "tidemark restore and tidemark list: s3:ListBucket (ListObjectsV2) and s3:GetObject; s3:RestoreObject under basebackups/ (restore --thaw of a backup in a cold class); s3:PutObject under audit/ only (restore's audit record); nothing else is written.",
        "prune": "tidemark prune, pin and unpin: s3:ListBucket and s3:GetObject (the catalog), s3:DeleteObject (what the policy does not keep, a pin), s3:PutObject under pins/ (a pin), audit/ (the command's audit record) and basebackups/ (with --archive-storage-class: each part copied onto itself in the archive class, one above 5 GiB by a multipart copy, whose failure aborts it: s3:AbortMultipartUpload; drop that statement without it).",
        "kms": "with --s3-sse aws:kms, writers also need kms:GenerateDataKey and readers kms:Decrypt on the key (multipart uploads need both)."
    });
    let all = serde_json::json!({
        "archiver": archiver,
        "restore": restore,
        "prune": prune,
        "notes": notes,
    });
    serde_json::to_string_pretty(&all).expect("a policy serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(inventory: Option<Inventory>) -> SqlRequest {
        SqlRequest {
            database: "app".into(),
            publication: "tidemark".into(),
            slot: "tidemark".into(),
            archiver_role: "arch".into(),
            restore_role: "rest".into(),
            restore_database: "app_restored".into(),
            inventory,
        }
    }

    #[test]
    fn without_a_source_the_grants_are_schema_wide_and_complete() {
        let sql = render_sql(&request(None));
        for line in [
            "CREATE ROLE \"arch\" LOGIN REPLICATION;",
            "GRANT USAGE ON SCHEMA public TO \"arch\";",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO \"arch\";",
            "GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO \"arch\";",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO \"arch\";",
            "CREATE PUBLICATION \"tidemark\" FOR ALL TABLES;",
            "CREATE EVENT TRIGGER tidemark_ddl_v1 ON ddl_command_end",
            "CREATE EVENT TRIGGER tidemark_publication_guard_v1 ON ddl_command_end",
            "CREATE ROLE \"rest\" LOGIN;",
            "CREATE DATABASE \"app_restored\" OWNER \"rest\";",
            "GRANT SET ON PARAMETER session_replication_role TO \"rest\";",
            "GRANT USAGE ON SCHEMA tidemark TO \"arch\";",
        ] {
            assert!(sql.contains(line), "{line} not in:\n{sql}");
        }
        // Least privilege: nothing more than that.
        for word in [
            "SUPERUSER",
            "pg_read_all_data",
            "CREATEDB",
            "CREATEROLE",
            "PASSWORD",
        ] {
            let granted = sql
                .lines()
                .filter(|l| !l.starts_with("--"))
                .any(|l| l.contains(word));
            assert!(!granted, "{word} granted:\n{sql}");
        }
        // Every statement of the roles' part has a comment saying why, right above it.
        let lines: Vec<&str> = sql.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.starts_with("GRANT ") || l.starts_with("CREATE ROLE") {
                assert!(
                    lines[..i].last().is_some_and(|p| p.starts_with("--")),
                    "no comment above {l}"
                );
            }
        }
    }

    #[test]
    fn with_a_source_each_table_sequence_schema_and_owner_is_named() {
        let inv = Inventory {
            published: vec!["\"public\".\"t\"".into(), "\"s\".\"u\"".into()],
            unpublished: vec!["\"public\".\"scratch\"".into()],
            sequences: vec!["\"s\".\"counter\"".into()],
            schemas: vec!["\"public\"".into(), "\"s\"".into()],
            owners: [("\"app\"".to_string(), "\"s\"".to_string())].into(),
            row_security: vec!["\"s\".\"u\"".into()],
            publication_exists: true,
            capture_installed: true,
        };
        let sql = render_sql(&request(Some(inv)));
        for line in [
            "GRANT USAGE ON SCHEMA \"public\", \"s\" TO \"arch\";",
            "GRANT SELECT ON TABLE \"public\".\"t\", \"s\".\"u\" TO \"arch\";",
            "GRANT SELECT ON TABLE \"public\".\"scratch\" TO \"arch\";",
            "GRANT SELECT ON SEQUENCE \"s\".\"counter\" TO \"arch\";",
            "ALTER DEFAULT PRIVILEGES FOR ROLE \"app\" IN SCHEMA \"s\" GRANT SELECT ON TABLES TO \"arch\";",
            "ALTER ROLE \"arch\" BYPASSRLS;",
            "-- publication 'tidemark' exists.",
            "-- DDL capture is installed.",
        ] {
            assert!(sql.contains(line), "{line} not in:\n{sql}");
        }
        assert!(!sql.contains("CREATE PUBLICATION"), "{sql}");
        assert!(!sql.contains("ALL TABLES IN SCHEMA"), "{sql}");
    }

    #[test]
    fn names_are_quoted() {
        let mut r = request(None);
        r.archiver_role = "we\"ird".into();
        r.database = "my db".into();
        let sql = render_sql(&r);
        assert!(
            sql.contains("CREATE ROLE \"we\"\"ird\" LOGIN REPLICATION;"),
            "{sql}"
        );
        assert!(sql.contains("GRANT CONNECT ON DATABASE \"my db\""), "{sql}");
    }

    #[test]
    fn s3_policies_give_each_command_only_its_actions_on_the_prefix() {
        let v: serde_json::Value = serde_json::from_str(&render_s3("b", "pg/main")).unwrap();
        let actions = |who: &str| -> BTreeSet<String> {
            v[who]["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|s| s["Action"].as_array().unwrap().clone())
                .map(|a| a.as_str().unwrap().to_string())
                .collect()
        };
        let set = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            actions("archiver"),
            set(&[
                "s3:AbortMultipartUpload",
                "s3:DeleteObject",
                "s3:GetObject",
                "s3:ListBucket",
                "s3:ListBucketMultipartUploads",
                "s3:PutObject"
            ])
        );
        assert_eq!(
            actions("restore"),
            set(&[
                "s3:GetObject",
                "s3:ListBucket",
                "s3:PutObject",
                "s3:RestoreObject"
            ])
        );
        for who in ["restore", "prune"] {
            let last = v[who]["Statement"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .clone();
            assert_eq!(last["Resource"], "arn:aws:s3:::b/pg/main/audit/*", "{who}");
            assert_eq!(last["Action"], serde_json::json!(["s3:PutObject"]), "{who}");
        }
        assert_eq!(
            actions("prune"),
            set(&[
                "s3:AbortMultipartUpload",
                "s3:DeleteObject",
                "s3:GetObject",
                "s3:ListBucket",
                "s3:PutObject"
            ])
        );
        for who in ["archiver", "restore", "prune"] {
            for s in v[who]["Statement"].as_array().unwrap() {
                let resource = s["Resource"].as_str().unwrap();
                assert!(
                    resource == "arn:aws:s3:::b" || resource.starts_with("arn:aws:s3:::b/pg/main/"),
                    "{who}: {resource}"
                );
                if resource == "arn:aws:s3:::b" {
                    assert_eq!(
                        s["Condition"]["StringLikeIfExists"]["s3:prefix"][0],
                        "pg/main/*"
                    );
                }
            }
        }
        assert_eq!(
            v["prune"]["Statement"][2]["Resource"],
            "arn:aws:s3:::b/pg/main/pins/*"
        );
    }

    #[test]
    fn s3_policies_need_an_s3_repository() {
        for repo in ["", "/var/lib/tidemark"] {
            let err = s3_repo(repo).unwrap_err().to_string();
            assert!(err.contains("s3://BUCKET/PREFIX"), "{err}");
        }
        assert_eq!(
            s3_repo("s3://bkt/pg/main/").unwrap(),
            ("bkt".into(), "pg/main".into())
        );
        assert_eq!(s3_repo("s3://bkt").unwrap(), ("bkt".into(), String::new()));
        let err = s3_repo("s3://B").unwrap_err().to_string();
        assert!(err.contains("not a valid bucket name"), "{err}");
    }
}
