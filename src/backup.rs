//! Base backups: taking one at a snapshot aligned with the change stream, and loading one.
//!
//! Owns: the objects under `basebackups/<id>/` (see `proto/manifest.md`): the schema
//! (`pg_dump --schema-only -Fc`), the table data (COPY binary where every column type allows it,
//! else COPY text; cut into parts of at most
//! [`PART_LIMIT`] bytes at row boundaries, lz4-framed; big tables read in block ranges of
//! [`SPLIT_BLOCKS`] on all connections), the sequences' values, and the manifest, written last:
//! a folder without a manifest is an incomplete backup and is ignored.
//!
//! Throughput: the schema dump runs while the tables are copied; each connection's parts are
//! compressed and stored while its COPY keeps streaming; loading runs one COPY per part on every
//! connection, each fetching its next part while it loads one, and builds indexes only after
//! the data, with [`RESTORE_MAINTENANCE_WORK_MEM`].
//!
//! Taking: the caller holds a replication connection idle with an exported snapshot whose
//! position is `consistent_point` (a transaction is in the backup iff its commit LSN is below
//! it). Every read here — catalog, `pg_dump`, COPY — happens in that snapshot.
//!
//! Loading happens in four [`LoadPhase`]s so that the restore can replay archived changes
//! between `Keys` (which creates only what replay needs to find rows: primary keys, unique
//! constraints, replica-identity indexes) and `PostData` (everything else, then sequences).
//!
//! Does not own: the replication slot and snapshot (see `replication`), choosing a backup or
//! checking the target database is empty (see `restore`).

pub mod cut;
pub mod toc;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::conninfo::{ConnInfo, ConnInfoError};
use crate::lsn::{Lsn, PgTimestamp};
use crate::object;
use crate::pgbin::{self, PgBinError};
use crate::store::{Store, StoreError};

use crate::catalog::manifest;
pub use crate::catalog::manifest::{
    backup_id, manifest_key, part_key, schema_key, CopyFormat, KeyKind, KeyObject, Manifest,
    ManifestError, PartEntry, SchemaEntry, SequenceEntry, TableEntry, Totals, FORMAT_VERSION,
    MIN_FORMAT_VERSION,
};

/// Largest amount of COPY output (text, or rows of binary) in one stored part (a single larger row
/// makes a part of its own).
pub const PART_LIMIT: usize = 32 << 20;

/// What to back up, and where the stream stands.
#[derive(Clone, Copy, Debug)]
pub struct BackupRequest<'a> {
    pub source: &'a ConnInfo,
    /// Name of the snapshot exported by the replication connection (`CREATE_REPLICATION_SLOT
    /// … EXPORT_SNAPSHOT`), kept alive by the caller until `take` returns.
    pub snapshot: &'a str,
    /// Where the change stream continues after this backup.
    pub consistent_point: Lsn,
    pub system_id: u64,
    pub timeline: u32,
    pub generation: u32,
    pub publication: &'a str,
    /// Number of connections reading tables in parallel (at least one is used).
    pub parallel: usize,
}

/// The steps of loading a backup, in the order the restore runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadPhase {
    /// Types, tables, functions, views… (`pg_restore --section=pre-data`).
    PreData,
    /// Table contents, and the sequences' backed-up values.
    Data,
    /// Primary keys, unique constraints and replica-identity indexes: what replay needs.
    Keys,
    /// The rest of post-data (indexes, foreign keys, triggers, rules, policies…), then
    /// sequences raised past the values in the columns they feed.
    PostData,
}

/// What one load phase did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadStats {
    pub phase: LoadPhase,
    /// Tables loaded (Data) or dump entries restored (Keys, PostData).
    pub tables: u64,
    pub rows: u64,
    /// COPY bytes loaded (text, or whole binary streams).
    pub bytes: u64,
    /// Sequences set to their backed-up values (Data), or raised past the columns they feed
    /// where needed (PostData: the number checked).
    pub sequences: u64,
    pub elapsed: Duration,
}

/// Why a backup could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Connect(#[from] ConnInfoError),
    #[error("{context}: {}", crate::error::describe_pg(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    PgBin(#[from] PgBinError),
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: stored object is corrupt: its CRC-32 is {actual:08x} but the manifest records {expected:08x}\nHINT: this base backup cannot be loaded; restore from another base backup (an earlier --to-time), or from another copy of the repository")]
    Corrupt {
        key: String,
        expected: u32,
        actual: u32,
    },
    #[error("{key}: {message}")]
    BadObject { key: String, message: String },
    #[error("{location}: base backup {id} already exists")]
    Exists { location: String, id: String },
    #[error("publication {publication:?} does not exist in database {database:?}\nHINT: create it with `tidemark setup`, or pass the --publication that exists")]
    NoPublication {
        publication: String,
        database: String,
    },
}

impl crate::error::Classify for BackupError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            BackupError::Store(e) => e.exit_status(),
            BackupError::Connect(e) => e.exit_status(),
            BackupError::PgBin(e) => e.exit_status(),
            BackupError::Postgres { .. } | BackupError::Tool { .. } => Database,
            BackupError::NoPublication { .. } => Database,
            BackupError::Io { .. } => Unexpected,
            BackupError::Corrupt { .. } | BackupError::BadObject { .. } => Damaged,
            BackupError::Exists { .. } => Repository,
        }
    }
}

fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Postgres { context, source }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

pub use crate::sql::{qualified, quote_ident, quote_literal};

/// Session settings for every connection that reads or writes COPY text, so the text means the
/// same on both sides whatever the servers' and roles' defaults.
/// `row_security = off` makes a COPY fail rather than silently skip rows hidden by a policy.
fn session_settings() -> String {
    crate::session::set_statements(&[
        ("statement_timeout", "0"),
        ("lock_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
        ("row_security", "off"),
    ])
}

// ---------------------------------------------------------------------------------------------
// Taking a backup
// ---------------------------------------------------------------------------------------------

/// A table to copy, as found in the catalog.
#[derive(Clone, Debug)]
struct TableSpec {
    oid: u32,
    schema: String,
    name: String,
    partitioned_root: bool,
    columns: Vec<String>,
    /// The COPY format its data is read and stored in.
    format: CopyFormat,
    /// On-disk size (of all partitions for a root), to schedule big tables first.
    size: i64,
}

/// ` (FORMAT binary)` for binary COPY, nothing for text.
fn format_option(format: CopyFormat) -> &'static str {
    match format {
        CopyFormat::Text => "",
        CopyFormat::Binary => " (FORMAT binary)",
    }
}

fn column_list(columns: &[String]) -> String {
    if columns.is_empty() {
        return String::new();
    }
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(" ({})", cols.join(", "))
}

/// The COPY that reads a table's data.
fn copy_out_sql(t: &TableSpec) -> String {
    let table = qualified(&t.schema, &t.name);
    if t.partitioned_root {
        // COPY TO cannot read a partitioned table directly; a query can.
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
        let select = if cols.is_empty() {
            String::new()
        } else {
            cols.join(", ")
        };
        format!(
            "COPY (SELECT {select} FROM {table}) TO STDOUT{}",
            format_option(t.format)
        )
    } else {
        format!(
            "COPY {table}{} TO STDOUT{}",
            column_list(&t.columns),
            format_option(t.format)
        )
    }
}

/// The COPY that loads a table's data (a partitioned root routes rows to its partitions).
fn copy_in_sql(t: &TableEntry) -> String {
    format!(
        "COPY {}{} FROM STDIN{}",
        qualified(&t.schema, &t.name),
        column_list(&t.columns),
        format_option(t.format)
    )
}

/// Opens a connection inside the exported snapshot.
async fn open_in_snapshot(source: &ConnInfo, snapshot: &str) -> Result<Client, BackupError> {
    let client = source.connect().await?;
    client
        .batch_execute(&format!(
            "{}; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
             SET TRANSACTION SNAPSHOT {}",
            session_settings(),
            quote_literal(snapshot)
        ))
        .await
        .map_err(pg(format!(
            "importing snapshot {snapshot} (is the exporting replication connection still open and idle?)"
        )))?;
    Ok(client)
}

/// How a backup is cut into work.
#[derive(Clone, Copy, Debug)]
pub struct TakeOptions {
    /// Tables of more blocks than this are copied in ranges of this many blocks, in parallel
    /// (with more than one connection, on servers 14 and later).
    pub split_blocks: u32,
    /// Tables whose column types allow it are stored in COPY's binary format (the target
    /// server loads it with less work than text); `false`: every table in text.
    pub binary: bool,
}

impl Default for TakeOptions {
    fn default() -> Self {
        TakeOptions {
            split_blocks: SPLIT_BLOCKS,
            binary: true,
        }
    }
}

/// Takes a base backup of `req.source` at `req.snapshot` into `store`; returns its manifest,
/// which has been stored last.
pub async fn take(store: &Arc<dyn Store>, req: BackupRequest<'_>) -> Result<Manifest, BackupError> {
    take_with(store, req, TakeOptions::default()).await
}

/// [`take`], with options.
pub async fn take_with(
    store: &Arc<dyn Store>,
    req: BackupRequest<'_>,
    opts: TakeOptions,
) -> Result<Manifest, BackupError> {
    let id = backup_id(req.generation, req.consistent_point);
    let prefix = format!("{}{id}/", manifest::ROOT);
    let existing = store.list(&prefix).await?;
    if existing.iter().any(|o| o.key == manifest_key(&id)) {
        return Err(BackupError::Exists {
            location: store.location(),
            id,
        });
    }
    if !existing.is_empty() {
        tracing::warn!(backup = %id, objects = existing.len(), "removing the objects of an earlier, incomplete attempt at this backup");
        for o in &existing {
            store.delete(&o.key).await?;
        }
    }
    let result = take_inner(store, &req, &id, opts).await;
    if let Err(e) = &result {
        // Best effort: an incomplete backup has no manifest and is ignored anyway.
        tracing::warn!(backup = %id, error = %e, "base backup failed; removing its objects");
        if let Ok(objs) = store.list(&prefix).await {
            for o in objs {
                if let Err(e) = store.delete(&o.key).await {
                    tracing::warn!(key = %o.key, error = %e, "cannot remove object of failed backup");
                }
            }
        }
    }
    result
}

async fn take_inner(
    store: &Arc<dyn Store>,
    req: &BackupRequest<'_>,
    id: &str,
    opts: TakeOptions,
) -> Result<Manifest, BackupError> {
    let started_at = PgTimestamp::now();
    let n = req.parallel.max(1);
    let clients = futures_util::future::try_join_all(
        (0..n).map(|_| open_in_snapshot(req.source, req.snapshot)),
    )
    .await?;
    let main = &clients[0];

    // Read after the snapshot was exported: every transaction in it committed before this.
    let row = main
        .query_one(
            "SELECT clock_timestamp(), current_setting('server_version_num')::int4,
                    current_setting('block_size')::int8",
            &[],
        )
        .await
        .map_err(pg("reading the snapshot time"))?;
    let snapshot_time: std::time::SystemTime = row.get(0);
    let snapshot_time = PgTimestamp::from_datetime(snapshot_time.into());
    let server_version_num = row.get::<_, i32>(1) as u32;
    let block_size: i64 = row.get(2);

    let exists = main
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&req.publication],
        )
        .await
        .map_err(pg("looking up the publication"))?;
    if exists.is_none() {
        return Err(BackupError::NoPublication {
            publication: req.publication.to_string(),
            database: req.source.dbname().to_string(),
        });
    }

    let tables = list_tables(main, req.publication, opts.binary).await?;
    lock_tables(main, &tables).await?;
    let key_objects = list_key_objects(main, &tables).await?;
    let sequences = list_sequences(main).await?;

    // TID range scans (server 14+) make reading a range of blocks cheap.
    let split = n > 1 && server_version_num >= 140000;
    let tasks = plan_copy_tasks(&tables, block_size, split, opts.split_blocks.max(1));
    tracing::info!(backup = %id, tables = tables.len(), copies = tasks.len(), "dumping the schema and copying the tables");
    // pg_dump reads the catalog in the same snapshot while the tables are copied.
    let (schema, entries) = tokio::try_join!(
        dump_schema(store, id, req, server_version_num),
        copy_tables(store, id, clients, &tables, tasks)
    )?;

    let mut totals = Totals {
        tables: entries.len() as u64,
        stored_bytes: schema.bytes,
        ..Totals::default()
    };
    for t in &entries {
        totals.parts += t.parts.len() as u64;
        totals.rows += t.rows;
        totals.raw_bytes += t.raw_bytes;
        totals.stored_bytes += t.stored_bytes;
    }
    // A reader of format 1 would take binary parts for text: format 2 only when needed.
    let binary = entries.iter().any(|t| t.format == CopyFormat::Binary);
    let m = Manifest {
        format_version: if binary {
            FORMAT_VERSION
        } else {
            MIN_FORMAT_VERSION
        },
        id: id.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        system_id: req.system_id,
        timeline: req.timeline,
        generation: req.generation,
        database: req.source.dbname().to_string(),
        publication: req.publication.to_string(),
        consistent_point: req.consistent_point,
        snapshot_time,
        started_at,
        finished_at: PgTimestamp::now(),
        server_version_num,
        schema,
        tables: entries,
        sequences,
        key_objects,
        totals,
    };
    object::put_object(&**store, &m.key(), Bytes::from(m.to_json())).await?;
    tracing::info!(backup = %id, rows = m.totals.rows, bytes = m.totals.raw_bytes, "base backup complete");
    Ok(m)
}

/// A table's columns in COPY order, each with whether its type may travel in COPY's binary
/// format: a built-in (OID below 16384, `FirstNormalObjectId`) base, range or multirange type
/// with binary I/O, or an array of one. Their binary forms hold no OIDs but built-in ones
/// (arrays name their element type), so they load into any server; composite types, enums,
/// domains and extension types name OIDs of the source, or may lack binary I/O, and the
/// built-in `reg*` types (regclass, regtype, …) *are* OIDs of the source's objects, where their
/// text names them: text.
const BINARY_COLUMNS_SQL: &str = "SELECT a.attname::text,
        t.oid < 16384 AND t.typtype IN ('b', 'r', 'm') AND t.typname !~ '^_?reg'
        AND t.typsend <> 0 AND t.typreceive <> 0
        AND (t.typelem = 0 OR EXISTS (
            SELECT FROM pg_catalog.pg_type e
            WHERE e.oid = t.typelem AND e.oid < 16384 AND e.typtype IN ('b', 'r', 'm')
              AND e.typname !~ '^reg' AND e.typsend <> 0 AND e.typreceive <> 0))
 FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 ORDER BY a.attnum";

/// The tables the publication publishes, with their columns, sorted by schema and name; a
/// table is read in COPY's binary format if `binary` and all its column types allow it.
async fn list_tables(
    client: &Client,
    publication: &str,
    binary: bool,
) -> Result<Vec<TableSpec>, BackupError> {
    // pg_publication_tables lists leaf partitions, or partition roots when the publication has
    // publish_via_partition_root. Unlogged and foreign tables are not replicated.
    let rows = client
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind = 'p',
                    CASE WHEN c.relkind = 'p'
                         THEN coalesce((SELECT sum(pg_relation_size(pt.relid))
                                        FROM pg_partition_tree(c.oid) pt), 0)::int8
                         ELSE pg_relation_size(c.oid) END
             FROM pg_publication_tables p
             JOIN pg_namespace n ON n.nspname = p.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename
             WHERE p.pubname = $1 AND c.relkind IN ('r', 'p') AND c.relpersistence <> 'u'
             ORDER BY 2, 3",
            &[&publication],
        )
        .await
        .map_err(pg("listing the published tables"))?;
    let mut tables = Vec::with_capacity(rows.len());
    for r in rows {
        let oid: u32 = r.get(0);
        let cols = client
            .query(BINARY_COLUMNS_SQL, &[&oid])
            .await
            .map_err(pg("listing columns"))?;
        let columns = cols.iter().map(|c| c.get(0)).collect();
        let format = if binary && !cols.is_empty() && cols.iter().all(|c| c.get::<_, bool>(1)) {
            CopyFormat::Binary
        } else {
            CopyFormat::Text
        };
        tables.push(TableSpec {
            oid,
            schema: r.get(1),
            name: r.get(2),
            partitioned_root: r.get(3),
            columns,
            format,
            size: r.get(4),
        });
    }
    Ok(tables)
}

/// Takes ACCESS SHARE locks on the tables for the rest of the backup, as pg_dump does, so that
/// no concurrent DDL drops or rewrites them under the COPYs.
async fn lock_tables(client: &Client, tables: &[TableSpec]) -> Result<(), BackupError> {
    for chunk in tables.chunks(1000) {
        let names: Vec<String> = chunk
            .iter()
            .map(|t| qualified(&t.schema, &t.name))
            .collect();
        client
            .batch_execute(&format!(
                "LOCK TABLE {} IN ACCESS SHARE MODE",
                names.join(", ")
            ))
            .await
            .map_err(pg("locking the published tables"))?;
    }
    Ok(())
}

/// Primary keys, unique constraints and replica-identity indexes of the tables (and of all
/// partitions of partitioned roots).
async fn list_key_objects(
    client: &Client,
    tables: &[TableSpec],
) -> Result<Vec<KeyObject>, BackupError> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let rows = client
        .query(
            "WITH rels AS (
                 SELECT pt.relid FROM unnest($1::oid[]) AS r(oid),
                      LATERAL pg_partition_tree(r.oid) pt
                 UNION SELECT unnest($1::oid[])
             )
             SELECT con.contype::text, n.nspname::text, c.relname::text, con.conname::text, con.oid
             FROM pg_constraint con
             JOIN pg_class c ON c.oid = con.conrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE con.conrelid IN (SELECT relid FROM rels) AND con.contype IN ('p', 'u')
             UNION ALL
             SELECT 'i', n.nspname::text, c.relname::text, i.relname::text, i.oid
             FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_class c ON c.oid = x.indrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE x.indrelid IN (SELECT relid FROM rels) AND x.indisreplident
               AND NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = x.indexrelid
                               AND con.conrelid = x.indrelid)
             ORDER BY 2, 3, 4",
            &[&oids],
        )
        .await
        .map_err(pg("listing keys"))?;
    Ok(rows
        .iter()
        .map(|r| KeyObject {
            kind: match r.get::<_, String>(0).as_str() {
                "p" => KeyKind::PrimaryKey,
                "u" => KeyKind::Unique,
                _ => KeyKind::ReplicaIdentityIndex,
            },
            schema: r.get(1),
            table: r.get(2),
            name: r.get(3),
            oid: r.get(4),
        })
        .collect())
}

/// Every sequence's state.
async fn list_sequences(client: &Client) -> Result<Vec<SequenceEntry>, BackupError> {
    // Sequences are not transactional: this reads their current state, which may be ahead of
    // the snapshot. That is harmless: the restore sets each sequence to this value, then at
    // least past the largest value of every column it feeds (after replay), so the restored
    // application can insert. last_value is NULL for a sequence never used (and for one we may
    // not read): setval(start, is_called => false) restores "not used yet".
    let rows = client
        .query(
            "SELECT schemaname::text, sequencename::text, coalesce(last_value, start_value),
                    last_value IS NOT NULL
             FROM pg_sequences ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(pg("reading sequences"))?;
    Ok(rows
        .iter()
        .map(|r| SequenceEntry {
            schema: r.get(0),
            name: r.get(1),
            last_value: r.get(2),
            is_called: r.get(3),
        })
        .collect())
}

/// Runs a PostgreSQL client program; returns its standard output.
async fn run_tool(
    program: &Path,
    args: &[&str],
    env: Vec<(String, String)>,
) -> Result<Vec<u8>, BackupError> {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string());
    tracing::debug!(program = %name, ?args, "running");
    let out = tokio::process::Command::new(program)
        .args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err(format!("running {}", program.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(BackupError::Tool {
            program: name,
            status: out.status.to_string(),
            stderr,
        });
    }
    if !stderr.is_empty() {
        tracing::warn!(program = %name, %stderr, "messages from a PostgreSQL program");
    }
    Ok(out.stdout)
}

async fn dump_schema(
    store: &Arc<dyn Store>,
    id: &str,
    req: &BackupRequest<'_>,
    server_version_num: u32,
) -> Result<SchemaEntry, BackupError> {
    let pg_dump = pgbin::find("pg_dump", Some(server_version_num / 10000))?;
    let snapshot = format!("--snapshot={}", req.snapshot);
    let conn = req.source.libpq_string();
    let dump = run_tool(
        &pg_dump,
        &[
            "--schema-only",
            &snapshot,
            "-Fc",
            "--no-publications",
            "--no-subscriptions",
            "-d",
            &conn,
        ],
        req.source.child_env(),
    )
    .await?;
    let key = schema_key(id);
    let entry = SchemaEntry {
        key: key.clone(),
        bytes: dump.len() as u64,
        crc32: crc32fast::hash(&dump),
    };
    object::put_object(&**store, &key, Bytes::from(dump)).await?;
    Ok(entry)
}

/// Tables bigger than this many blocks are read in ranges of this many blocks, each on its own
/// COPY, so that the connections share a big table (server 14+: TID range scans).
pub const SPLIT_BLOCKS: u32 = 4096;

/// Parts compressed and stored concurrently per connection while its COPY keeps streaming.
const PARTS_IN_FLIGHT: usize = 2;

/// One COPY: a whole table, or the rows of a range of its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CopyTask {
    table: usize,
    /// Blocks `[from, to)`; `to = None`: to the end, including blocks added since the size was
    /// read. `None` for the whole table.
    blocks: Option<(u32, Option<u32>)>,
    /// Bytes on disk, to schedule big tasks first.
    weight: i64,
}

/// Cuts the tables into COPY tasks, biggest last (the queue is popped from the end).
fn plan_copy_tasks(
    tables: &[TableSpec],
    block_size: i64,
    split: bool,
    split_blocks: u32,
) -> Vec<CopyTask> {
    let mut tasks = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let blocks = (t.size / block_size.max(1)).clamp(0, u32::MAX as i64) as u32;
        if !split || t.partitioned_root || blocks <= split_blocks {
            tasks.push(CopyTask {
                table: i,
                blocks: None,
                weight: t.size,
            });
            continue;
        }
        let mut from = 0u32;
        while from < blocks {
            let to = from.saturating_add(split_blocks);
            let last = to >= blocks;
            tasks.push(CopyTask {
                table: i,
                blocks: Some((from, (!last).then_some(to))),
                weight: i64::from(split_blocks) * block_size,
            });
            from = to;
        }
    }
    // Stable: among equal weights, lower tables and lower ranges are popped first.
    tasks.reverse();
    tasks.sort_by_key(|t| t.weight);
    tasks
}

/// The COPY that reads a task's rows.
fn copy_task_sql(t: &TableSpec, blocks: Option<(u32, Option<u32>)>) -> String {
    let Some((from, to)) = blocks else {
        return copy_out_sql(t);
    };
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(c)).collect();
    // ONLY: COPY of a table does not read its inheritance children; neither may this.
    let mut sql = format!(
        "COPY (SELECT {} FROM ONLY {} WHERE ctid >= '({from},0)'::pg_catalog.tid",
        cols.join(", "),
        qualified(&t.schema, &t.name)
    );
    if let Some(to) = to {
        sql.push_str(&format!(" AND ctid < '({to},0)'::pg_catalog.tid"));
    }
    sql.push_str(") TO STDOUT");
    sql.push_str(format_option(t.format));
    sql
}

/// Copies the tables over the connections, biggest first, big tables in block ranges on all
/// connections at once; returns entries in table order, each with its parts in key order.
async fn copy_tables(
    store: &Arc<dyn Store>,
    id: &str,
    clients: Vec<Client>,
    tables: &[TableSpec],
    tasks: Vec<CopyTask>,
) -> Result<Vec<TableEntry>, BackupError> {
    // Each connection in a task of its own, so that their streams are read on all threads.
    let shared = Arc::new((
        Mutex::new(tasks),
        tables
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect::<Vec<_>>(),
        tables.to_vec(),
        id.to_string(),
    ));
    // Dropping the set (on an error) aborts the other connections' copies.
    let mut workers = tokio::task::JoinSet::new();
    for client in clients {
        let shared = shared.clone();
        let store = store.clone();
        workers.spawn(async move {
            let (queue, next_part, tables, id) = &*shared;
            let mut done = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").pop();
                let Some(task) = next else { break };
                let t = &tables[task.table];
                let parts = copy_task(&client, &store, id, task, t, &next_part[task.table]).await?;
                done.push((task.table, parts));
            }
            // Ends the read-only transaction; nothing to keep.
            let _ = client.batch_execute("COMMIT").await;
            Ok::<_, BackupError>(done)
        });
    }
    let mut results = Vec::new();
    while let Some(r) = workers.join_next().await {
        results.push(r.map_err(|e| BackupError::Io {
            context: "copying tables".into(),
            source: std::io::Error::other(e),
        })??);
    }
    let mut entries: Vec<TableEntry> = tables
        .iter()
        .map(|t| TableEntry {
            oid: t.oid,
            schema: t.schema.clone(),
            name: t.name.clone(),
            partitioned_root: t.partitioned_root,
            columns: t.columns.clone(),
            format: t.format,
            rows: 0,
            raw_bytes: 0,
            stored_bytes: 0,
            parts: Vec::new(),
        })
        .collect();
    for (table, parts) in results.into_iter().flatten() {
        let e = &mut entries[table];
        for p in parts {
            e.rows += p.rows;
            e.raw_bytes += p.raw_bytes;
            e.stored_bytes += p.stored_bytes;
            e.parts.push(p);
        }
    }
    for e in &mut entries {
        e.parts.sort_by(|a, b| a.key.cmp(&b.key));
    }
    Ok(entries)
}

/// Runs one COPY task; its parts are compressed and stored while the COPY goes on.
async fn copy_task(
    client: &Client,
    store: &Arc<dyn Store>,
    id: &str,
    task: CopyTask,
    t: &TableSpec,
    next_part: &AtomicUsize,
) -> Result<Vec<PartEntry>, BackupError> {
    let shown = qualified(&t.schema, &t.name);
    let started = Instant::now();
    let stream = client
        .copy_out(copy_task_sql(t, task.blocks).as_str())
        .await
        .map_err(pg(format!("COPY {shown} TO STDOUT")))?;
    pin_mut!(stream);
    let mut cutter = Cutter::new(t.format);
    // Dropping the set (on an error) aborts the parts still being stored.
    let mut storing = tokio::task::JoinSet::new();
    let mut parts = Vec::new();
    let spawn = |storing: &mut tokio::task::JoinSet<_>, part: cut::RawPart| {
        let key = part_key(id, task.table, next_part.fetch_add(1, Ordering::Relaxed));
        storing.spawn(store_part(store.clone(), key, part));
    };
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| pg(format!("COPY {shown} TO STDOUT"))(e))?;
        let cut = cutter
            .push(&chunk)
            .map_err(|message| BackupError::BadObject {
                key: shown.clone(),
                message,
            })?;
        for part in cut {
            while storing.len() >= PARTS_IN_FLIGHT {
                parts.push(joined(storing.join_next().await)?);
            }
            spawn(&mut storing, part);
        }
    }
    let last = cutter.finish().map_err(|message| BackupError::BadObject {
        key: shown.clone(),
        message,
    })?;
    if let Some(part) = last {
        spawn(&mut storing, part);
    }
    while let Some(r) = storing.join_next().await {
        parts.push(joined(Some(r))?);
    }
    tracing::debug!(table = %shown, blocks = ?task.blocks, rows = parts.iter().map(|p| p.rows).sum::<u64>(), parts = parts.len(), elapsed = ?started.elapsed(), "table copied");
    Ok(parts)
}

/// Cuts one COPY's output into parts, in the table's format.
enum Cutter {
    Text(cut::PartCutter),
    Binary(cut::BinaryCutter),
}

impl Cutter {
    fn new(format: CopyFormat) -> Cutter {
        match format {
            CopyFormat::Text => Cutter::Text(cut::PartCutter::new(PART_LIMIT)),
            CopyFormat::Binary => Cutter::Binary(cut::BinaryCutter::new(PART_LIMIT)),
        }
    }

    fn push(&mut self, chunk: &[u8]) -> Result<Vec<cut::RawPart>, String> {
        match self {
            Cutter::Text(c) => Ok(c.push(chunk)),
            Cutter::Binary(c) => c.push(chunk).map_err(|e| e.to_string()),
        }
    }

    fn finish(self) -> Result<Option<cut::RawPart>, String> {
        match self {
            Cutter::Text(c) => c.finish().map_err(|e| e.to_string()),
            Cutter::Binary(c) => c.finish().map_err(|e| e.to_string()),
        }
    }
}

fn joined(
    r: Option<Result<Result<PartEntry, BackupError>, tokio::task::JoinError>>,
) -> Result<PartEntry, BackupError> {
    match r.expect("a part is being stored") {
        Ok(r) => r,
        Err(e) => Err(BackupError::Io {
            context: "storing a part".into(),
            source: std::io::Error::other(e),
        }),
    }
}

async fn store_part(
    store: Arc<dyn Store>,
    key: String,
    part: cut::RawPart,
) -> Result<PartEntry, BackupError> {
    let raw_bytes = part.data.len() as u64;
    let rows = part.rows;
    let (stored, crc32) = tokio::task::spawn_blocking(move || {
        compress(&part.data).map(|c| {
            let crc = crc32fast::hash(&c);
            (c, crc)
        })
    })
    .await
    .map_err(|e| BackupError::Io {
        context: format!("compressing {key}"),
        source: std::io::Error::other(e),
    })?
    .map_err(io_err(format!("compressing {key}")))?;
    // The recorded size is the object's, as stored; the checksum is of its decoded bytes.
    let object = object::encode(key.clone(), Bytes::from(stored));
    let stored_bytes = object.len() as u64;
    object.put(&*store).await?;
    Ok(PartEntry {
        key,
        rows,
        raw_bytes,
        stored_bytes,
        crc32,
    })
}

/// lz4 frame format (readable by `lz4 -d`), with the content size and a content checksum.
fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let info = lz4_flex::frame::FrameInfo::new()
        .content_size(Some(data.len() as u64))
        .content_checksum(true);
    let mut enc =
        lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 3));
    enc.write_all(data)?;
    enc.finish().map_err(std::io::Error::other)
}

/// Decompresses an lz4 frame in pieces of at most `size` bytes; the frame's content checksum
/// is checked when the end is read (the last item is then an error if it does not match).
struct Pieces<'a> {
    decoder: lz4_flex::frame::FrameDecoder<&'a [u8]>,
    size: usize,
    failed: bool,
}

fn pieces(data: &[u8], size: usize) -> Pieces<'_> {
    Pieces {
        decoder: lz4_flex::frame::FrameDecoder::new(data),
        size,
        failed: false,
    }
}

impl Iterator for Pieces<'_> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut piece = Vec::with_capacity(self.size);
        match (&mut self.decoder)
            .take(self.size as u64)
            .read_to_end(&mut piece)
        {
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
            Ok(0) => None,
            Ok(_) => Some(Ok(piece)),
        }
    }
}

/// The complete base backups in the store ([`manifest::list_manifests`]), with a failing store
/// reported as a base-backup error: what the archiver and `backup` read before taking one.
pub async fn list_manifests(store: &Arc<dyn Store>) -> Result<Vec<Manifest>, BackupError> {
    Ok(manifest::list_manifests(store).await?)
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Loads backup `m` into `target` (an existing, empty database), phase by phase
/// ([`Loader::load`]). The schema dump is fetched, checked and listed once, whichever phases
/// need it.
pub struct Loader<'a> {
    store: &'a Arc<dyn Store>,
    m: &'a Manifest,
    target: &'a ConnInfo,
    parallel: usize,
    schema: tokio::sync::OnceCell<SchemaFile>,
    listing: tokio::sync::OnceCell<String>,
}

impl<'a> Loader<'a> {
    /// A loader using up to `parallel` connections (at least 1).
    pub fn new(
        store: &'a Arc<dyn Store>,
        m: &'a Manifest,
        target: &'a ConnInfo,
        parallel: usize,
    ) -> Loader<'a> {
        Loader {
            store,
            m,
            target,
            parallel: parallel.max(1),
            schema: tokio::sync::OnceCell::new(),
            listing: tokio::sync::OnceCell::new(),
        }
    }

    async fn schema(&self) -> Result<&SchemaFile, BackupError> {
        self.schema
            .get_or_try_init(|| SchemaFile::fetch(self.store, self.m))
            .await
    }

    /// `pg_restore -l` of the schema dump.
    async fn listing(&self) -> Result<&str, BackupError> {
        let dump = self.schema().await?;
        let listing = self.listing.get_or_try_init(|| dump.listing()).await?;
        Ok(listing)
    }

    /// Checks, before anything is written, what can be checked without reading every part:
    /// the schema dump is fetched and its checksum verified, `pg_restore` reads its listing,
    /// and every table part the manifest lists is in the repository with the recorded size.
    /// (A part's own checksum is verified as it is loaded.)
    pub async fn check(&self) -> Result<(), BackupError> {
        self.listing().await?;
        let prefix = format!("{}{}/", manifest::ROOT, self.m.id);
        let stored: HashMap<String, u64> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        for p in self.m.tables.iter().flat_map(|t| t.parts.iter()) {
            let problem = match stored.get(&p.key) {
                None => "missing: the manifest lists this part but the repository does not hold it".to_string(),
                Some(&size) if size != p.stored_bytes => format!(
                    "stored object is {size} bytes but the manifest records {}: truncated or replaced",
                    p.stored_bytes
                ),
                Some(_) => continue,
            };
            return Err(BackupError::BadObject {
                key: p.key.clone(),
                message: format!(
                    "{problem}\nHINT: base backup {} cannot be loaded; restore from another base backup (an earlier --to-time) or another copy of the repository",
                    self.m.id
                ),
            });
        }
        Ok(())
    }

    /// Loads one phase.
    pub async fn load(&self, phase: LoadPhase) -> Result<LoadStats, BackupError> {
        load(self, phase).await
    }
}

async fn load(loader: &Loader<'_>, phase: LoadPhase) -> Result<LoadStats, BackupError> {
    let Loader {
        store,
        m,
        target,
        parallel,
        ..
    } = *loader;
    let started = Instant::now();
    let mut stats = LoadStats {
        phase,
        tables: 0,
        rows: 0,
        bytes: 0,
        sequences: 0,
        elapsed: Duration::ZERO,
    };
    match phase {
        LoadPhase::PreData => {
            let dump = loader.schema().await?;
            dump.restore(target, &["--section=pre-data"], None, 1)
                .await?;
        }
        LoadPhase::Data => {
            load_data(store, m, target, parallel, &mut stats).await?;
            stats.sequences = set_backed_up_sequences(m, target).await?;
        }
        LoadPhase::Keys | LoadPhase::PostData => {
            let dump = loader.schema().await?;
            let listing = loader.listing().await?;
            // A key object's entry in the dump's listing: (catalog, oid).
            let entry = |k: &KeyObject| match k.kind {
                KeyKind::PrimaryKey | KeyKind::Unique => (toc::PG_CONSTRAINT, k.oid),
                KeyKind::ReplicaIdentityIndex => (toc::PG_CLASS, k.oid),
            };
            let wanted: HashSet<(u32, u32)> = m.key_objects.iter().map(entry).collect();
            let split = toc::split(listing, &wanted);
            let list = if phase == LoadPhase::Keys {
                for k in &m.key_objects {
                    if !split.found.contains(&entry(k)) {
                        tracing::warn!(schema = %k.schema, table = %k.table, name = %k.name, "key object not found in the schema dump");
                    }
                }
                &split.chosen
            } else {
                &split.rest
            };
            let list = &post_data_for_target(target, list).await?;
            stats.tables = list
                .lines()
                .filter(|l| toc::parse_line(l).is_some())
                .count() as u64;
            dump.restore(target, &["--section=post-data"], Some(list), parallel)
                .await?;
            if phase == LoadPhase::PostData {
                stats.sequences = raise_sequences(target).await?;
            }
        }
    }
    stats.elapsed = started.elapsed();
    tracing::info!(backup = %m.id, ?phase, tables = stats.tables, rows = stats.rows, elapsed = ?stats.elapsed, "load phase done");
    Ok(stats)
}

/// A temporary file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn create(suffix: &str, data: &[u8]) -> Result<TempFile, BackupError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "tidemark-{}-{:016x}{suffix}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        let file = TempFile(path);
        f.write_all(data)
            .and_then(|_| f.flush())
            .map_err(io_err(format!("writing {}", file.0.display())))?;
        Ok(file)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The schema dump, fetched, checked and written to a temporary file for pg_restore.
struct SchemaFile {
    file: TempFile,
    /// Looked up once per restore ([`Loader`]): looking one up runs it (`--version`).
    pg_restore: PathBuf,
}

impl SchemaFile {
    async fn fetch(store: &Arc<dyn Store>, m: &Manifest) -> Result<SchemaFile, BackupError> {
        let data = object::get_object(&**store, &m.schema.key).await?;
        verify(&m.schema.key, &data, m.schema.crc32)?;
        // pg_restore must read the archive format of the pg_dump that wrote it, at least as
        // new as the source server.
        let pg_restore = pgbin::find("pg_restore", Some(m.server_version_num / 10000))?;
        let file = TempFile::create(".dump", &data)?;
        Ok(SchemaFile { file, pg_restore })
    }

    /// `pg_restore -l` of the dump.
    async fn listing(&self) -> Result<String, BackupError> {
        let out = run_tool(&self.pg_restore, &["-l", &self.file.arg()], Vec::new()).await?;
        String::from_utf8(out).map_err(|e| BackupError::BadObject {
            key: "pg_restore -l".into(),
            message: e.to_string(),
        })
    }

    async fn restore(
        &self,
        target: &ConnInfo,
        section: &[&str],
        list: Option<&str>,
        jobs: usize,
    ) -> Result<(), BackupError> {
        let list_file = list
            .map(|l| TempFile::create(".list", l.as_bytes()))
            .transpose()?;
        let conn = target.libpq_string();
        let jobs = jobs.to_string();
        let mut args: Vec<&str> = vec![
            "--no-owner",
            "--no-privileges",
            "--exit-on-error",
            "-d",
            &conn,
        ];
        args.extend_from_slice(section);
        let list_arg = list_file.as_ref().map(|f| f.arg());
        if let Some(l) = &list_arg {
            args.extend_from_slice(&["-L", l]);
        }
        if jobs != "1" {
            args.extend_from_slice(&["-j", &jobs]);
        }
        let dump = self.file.arg();
        args.push(&dump);
        let mut env = target.child_env();
        env.push(("PGOPTIONS".into(), restore_pgoptions()));
        run_tool(&self.pg_restore, &args, env).await?;
        Ok(())
    }
}

/// Memory for each index build of the restore (`pg_restore` would use the server's default,
/// 64 MB unless configured): sorts in memory, and lets a big index be built by parallel workers.
pub const RESTORE_MAINTENANCE_WORK_MEM: &str = "512MB";

/// `PGOPTIONS` for pg_restore: [`RESTORE_MAINTENANCE_WORK_MEM`], then the caller's own
/// `PGOPTIONS` (which win).
fn restore_pgoptions() -> String {
    let mut opts = format!("-c maintenance_work_mem={RESTORE_MAINTENANCE_WORK_MEM}");
    if let Ok(own) = std::env::var("PGOPTIONS") {
        opts.push(' ');
        opts.push_str(&own);
    }
    opts
}

fn verify(key: &str, data: &[u8], expected: u32) -> Result<(), BackupError> {
    let actual = crc32fast::hash(data);
    if actual != expected {
        return Err(BackupError::Corrupt {
            key: key.to_string(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// A post-data TOC list (`pg_restore -l`) the target's role can restore: event triggers (such as
/// tidemark's own DDL capture, which a base backup of a captured source holds) need a superuser,
/// so for any other role they are left out, with a warning.
async fn post_data_for_target(target: &ConnInfo, list: &str) -> Result<String, BackupError> {
    let is_event_trigger =
        |l: &str| toc::parse_line(l).is_some_and(|e| e.description.starts_with("EVENT TRIGGER "));
    if !list.lines().any(is_event_trigger) {
        return Ok(list.to_string());
    }
    let client = target.connect().await?;
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|source| BackupError::Postgres {
            context: "checking whether the target role is a superuser".into(),
            source,
        })?
        .get(0);
    if superuser {
        return Ok(list.to_string());
    }
    let mut out = String::with_capacity(list.len());
    for l in list.lines() {
        if is_event_trigger(l) {
            tracing::warn!(entry = %l, "not restoring an event trigger: the target role is not a superuser (schema changes made on the restored database are not captured)");
            out.push(';');
        }
        out.push_str(l);
        out.push('\n');
    }
    Ok(out)
}

async fn open_for_load(target: &ConnInfo) -> Result<Client, BackupError> {
    let client = target.connect().await?;
    client
        .batch_execute(&session_settings())
        .await
        .map_err(pg("setting up a load connection"))?;
    Ok(client)
}

/// A spawned task aborted when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A part fetched and checked (still compressed: [`load_part`] decompresses it as it sends it).
type Fetched = Result<Bytes, BackupError>;

fn start_fetch(store: &Arc<dyn Store>, p: &PartEntry) -> AbortOnDrop<Fetched> {
    let store = store.clone();
    let p = p.clone();
    AbortOnDrop(tokio::spawn(async move {
        let data = object::get_object(&*store, &p.key).await?;
        verify(&p.key, &data, p.crc32)?;
        Ok(data)
    }))
}

async fn fetched(f: AbortOnDrop<Fetched>, key: &str) -> Fetched {
    match (&mut { f }.0).await {
        Ok(r) => r,
        Err(e) => Err(BackupError::Io {
            context: format!("reading {key}"),
            source: std::io::Error::other(e),
        }),
    }
}

/// Loads every part with its own COPY, on `parallel` connections at once (parts of one table
/// too), biggest parts first, each connection fetching its next part while it loads one.
/// Every connection loads inside one transaction, committed only once all parts are loaded:
/// a failure leaves no table half loaded.
async fn load_data(
    store: &Arc<dyn Store>,
    m: &Manifest,
    target: &ConnInfo,
    parallel: usize,
    stats: &mut LoadStats,
) -> Result<(), BackupError> {
    let mut jobs: Vec<(usize, usize)> = Vec::new();
    for (i, t) in m.tables.iter().enumerate() {
        let (rows, raw): (u64, u64) = t
            .parts
            .iter()
            .fold((0, 0), |a, p| (a.0 + p.rows, a.1 + p.raw_bytes));
        if rows != t.rows || raw != t.raw_bytes {
            return Err(BackupError::BadObject {
                key: m.key(),
                message: format!(
                    "table {}: its parts hold {rows} rows and {raw} bytes, the table entry \
                     records {} rows and {} bytes",
                    qualified(&t.schema, &t.name),
                    t.rows,
                    t.raw_bytes
                ),
            });
        }
        jobs.extend((0..t.parts.len()).map(|p| (i, p)));
    }
    // Popped from the end: biggest parts first.
    jobs.sort_by_key(|&(t, p)| (m.tables[t].parts[p].raw_bytes, std::cmp::Reverse((t, p))));
    let workers_n = parallel.min(jobs.len()).max(1);
    let clients = futures_util::future::try_join_all((0..workers_n).map(|_| async {
        let client = open_for_load(target).await?;
        client
            .batch_execute("BEGIN")
            .await
            .map_err(pg("starting a load transaction"))?;
        Ok::<_, BackupError>(client)
    }))
    .await?;
    // Each connection in a task of its own, so that they run on all threads. Dropping the set
    // (on an error) aborts the others: their connections close, their transactions roll back.
    let shared = Arc::new((Mutex::new(jobs), m.clone()));
    let mut workers = tokio::task::JoinSet::new();
    for client in clients {
        let shared = shared.clone();
        let store = store.clone();
        workers.spawn(async move {
            let (queue, m) = &*shared;
            let pop = || queue.lock().expect("queue lock").pop();
            let mut rows = 0u64;
            let mut bytes = 0u64;
            let mut current =
                pop().map(|(t, p)| ((t, p), start_fetch(&store, &m.tables[t].parts[p])));
            while let Some(((t, p), fetch)) = current.take() {
                let part = &m.tables[t].parts[p];
                let data = fetched(fetch, &part.key).await?;
                current = pop().map(|(t, p)| ((t, p), start_fetch(&store, &m.tables[t].parts[p])));
                rows += load_part(&client, &m.tables[t], part, data).await?;
                bytes += part.raw_bytes;
            }
            Ok::<_, BackupError>((client, rows, bytes))
        });
    }
    let mut done = Vec::new();
    while let Some(r) = workers.join_next().await {
        done.push(r.map_err(|e| BackupError::Io {
            context: "loading tables".into(),
            source: std::io::Error::other(e),
        })??);
    }
    for (client, rows, bytes) in &done {
        client
            .batch_execute("COMMIT")
            .await
            .map_err(pg("committing the loaded data"))?;
        stats.rows += rows;
        stats.bytes += bytes;
    }
    stats.tables = m.tables.iter().filter(|t| !t.parts.is_empty()).count() as u64;
    Ok(())
}

/// Loads one part with one COPY, checking its size and row count. The part is decompressed
/// message by message as it is sent: each message's buffer is small enough to stay in cache
/// and to be reused by the allocator, where a whole decompressed part (32 MiB) costs page
/// faults and misses. A part that turns out damaged aborts its COPY (and so the load).
async fn load_part(
    client: &Client,
    t: &TableEntry,
    p: &PartEntry,
    stored: Bytes,
) -> Result<u64, BackupError> {
    let display = qualified(&t.schema, &t.name);
    let ctx = || format!("COPY {display} FROM STDIN ({})", p.key);
    let bad = |message: String| BackupError::BadObject {
        key: p.key.clone(),
        message,
    };
    let sink = client
        .copy_in::<_, Bytes>(copy_in_sql(t).as_str())
        .await
        .map_err(pg(ctx()))?;
    pin_mut!(sink);
    // Returning early drops the sink, which aborts the COPY.
    let mut sent = 0u64;
    for piece in pieces(&stored, COPY_MESSAGE) {
        let piece = piece.map_err(|e| bad(format!("cannot decompress: {e}")))?;
        sent += piece.len() as u64;
        if sent > p.raw_bytes {
            return Err(bad(format!(
                "decompresses to more than the {} bytes the manifest records",
                p.raw_bytes
            )));
        }
        sink.feed(Bytes::from(piece))
            .await
            .map_err(|e| pg(ctx())(e))?;
    }
    if sent != p.raw_bytes {
        return Err(bad(format!(
            "decompresses to {sent} bytes, the manifest records {}",
            p.raw_bytes
        )));
    }
    let rows = sink.finish().await.map_err(pg(ctx()))?;
    if rows != p.rows {
        return Err(BackupError::BadObject {
            key: p.key.clone(),
            message: format!(
                "COPY {display} loaded {rows} rows from it, the manifest records {}",
                p.rows
            ),
        });
    }
    Ok(rows)
}

/// Size of the CopyData messages sent: the server starts on a message once it has all of it.
const COPY_MESSAGE: usize = 1 << 20;

/// Sets every sequence to its backed-up value. Done with the data, before the restore replays
/// the archived changes, so that a replayed `TRUNCATE … RESTART IDENTITY` restarts the
/// sequences as it did on the source (and [`raise_sequences`] then moves them just past the
/// rows inserted since). Returns the number of sequences set.
async fn set_backed_up_sequences(m: &Manifest, target: &ConnInfo) -> Result<u64, BackupError> {
    let client = open_for_load(target).await?;
    for s in &m.sequences {
        client
            .execute(
                "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                &[&qualified(&s.schema, &s.name), &s.last_value, &s.is_called],
            )
            .await
            .map_err(pg(format!(
                "setting sequence {}",
                qualified(&s.schema, &s.name)
            )))?;
    }
    Ok(m.sequences.len() as u64)
}

/// Raises every sequence past the largest value of every integer column it feeds (owned-by,
/// identity, or named in a column default), so that the restored application's next insert
/// does not collide. Returns the number of (sequence, column) pairs checked.
pub async fn raise_sequences(target: &ConnInfo) -> Result<u64, BackupError> {
    let client = open_for_load(target).await?;
    let users = client
        .query(
            "SELECT DISTINCT sn.nspname::text, s.relname::text, tn.nspname::text, t.relname::text,
                    a.attname::text, q.seqincrement
             FROM (SELECT d.objid AS seqid, d.refobjid AS relid, d.refobjsubid AS attnum
                   FROM pg_depend d
                   WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                     AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
                   UNION
                   SELECT d.refobjid, ad.adrelid, ad.adnum
                   FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                   WHERE d.classid = 'pg_attrdef'::regclass
                     AND d.refclassid = 'pg_class'::regclass) u
             JOIN pg_class s ON s.oid = u.seqid AND s.relkind = 'S'
             JOIN pg_namespace sn ON sn.oid = s.relnamespace
             JOIN pg_sequence q ON q.seqrelid = s.oid
             JOIN pg_class t ON t.oid = u.relid AND t.relkind IN ('r', 'p')
             JOIN pg_namespace tn ON tn.oid = t.relnamespace
             JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = u.attnum
                  AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype)
             ORDER BY 1, 2, 3, 4, 5",
            &[],
        )
        .await
        .map_err(pg("finding the columns sequences feed"))?;
    for u in &users {
        let seq = qualified(u.get(0), u.get(1));
        let table = qualified(u.get(2), u.get(3));
        let column = quote_ident(u.get(4));
        let increment: i64 = u.get(5);
        let ctx = || format!("raising sequence {seq} past {table}.{column}");
        let agg = if increment > 0 { "max" } else { "min" };
        let extreme: Option<i64> = client
            .query_one(&format!("SELECT {agg}({column})::int8 FROM {table}"), &[])
            .await
            .map_err(pg(ctx()))?
            .get(0);
        let Some(extreme) = extreme else { continue };
        let row = client
            .query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[])
            .await
            .map_err(pg(ctx()))?;
        let (last, called): (i64, bool) = (row.get(0), row.get(1));
        let next = if called {
            last.saturating_add(increment)
        } else {
            last
        };
        let collides = if increment > 0 {
            next <= extreme
        } else {
            next >= extreme
        };
        if collides {
            client
                .execute(
                    "SELECT pg_catalog.setval($1::text::regclass, $2, true)",
                    &[&seq, &extreme],
                )
                .await
                .map_err(pg(ctx()))?;
        }
    }
    Ok(users.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_statements() {
        let mut t = TableSpec {
            oid: 1,
            schema: "s".into(),
            name: "T x".into(),
            partitioned_root: false,
            columns: vec!["a".into(), "b\"c".into()],
            format: CopyFormat::Text,
            size: 0,
        };
        assert_eq!(
            copy_out_sql(&t),
            "COPY \"s\".\"T x\" (\"a\", \"b\"\"c\") TO STDOUT"
        );
        t.partitioned_root = true;
        assert_eq!(
            copy_out_sql(&t),
            "COPY (SELECT \"a\", \"b\"\"c\" FROM \"s\".\"T x\") TO STDOUT"
        );
        t.columns.clear();
        t.partitioned_root = false;
        assert_eq!(copy_out_sql(&t), "COPY \"s\".\"T x\" TO STDOUT");
        t.format = CopyFormat::Binary;
        t.columns = vec!["a".into()];
        assert_eq!(
            copy_out_sql(&t),
            "COPY \"s\".\"T x\" (\"a\") TO STDOUT (FORMAT binary)"
        );
        assert_eq!(
            copy_task_sql(&t, Some((4, None))),
            "COPY (SELECT \"a\" FROM ONLY \"s\".\"T x\" WHERE ctid >= '(4,0)'::pg_catalog.tid) \
             TO STDOUT (FORMAT binary)"
        );
    }

    #[test]
    fn big_tables_are_cut_into_block_ranges() {
        let spec = |name: &str, size: i64, root: bool| TableSpec {
            oid: 1,
            schema: "s".into(),
            name: name.into(),
            partitioned_root: root,
            columns: vec!["a".into()],
            format: CopyFormat::Text,
            size,
        };
        let tables = [
            spec("small", 8192 * 3, false),
            spec("big", 8192 * 10, false),
            spec("root", 8192 * 100, true),
        ];
        let mut tasks = plan_copy_tasks(&tables, 8192, true, 4);
        let mut popped = Vec::new();
        while let Some(t) = tasks.pop() {
            popped.push((t.table, t.blocks));
        }
        assert_eq!(
            popped,
            [
                (2, None),
                (1, Some((0, Some(4)))),
                (1, Some((4, Some(8)))),
                (1, Some((8, None))),
                (0, None),
            ]
        );
        let whole = plan_copy_tasks(&tables, 8192, false, 4);
        assert!(whole.iter().all(|t| t.blocks.is_none()) && whole.len() == 3);
        assert_eq!(
            copy_task_sql(&tables[1], Some((4, Some(8)))),
            "COPY (SELECT \"a\" FROM ONLY \"s\".\"big\" WHERE ctid >= '(4,0)'::pg_catalog.tid \
             AND ctid < '(8,0)'::pg_catalog.tid) TO STDOUT"
        );
        assert_eq!(
            copy_task_sql(&tables[1], Some((8, None))),
            "COPY (SELECT \"a\" FROM ONLY \"s\".\"big\" WHERE ctid >= '(8,0)'::pg_catalog.tid) TO STDOUT"
        );
        assert_eq!(copy_task_sql(&tables[1], None), copy_out_sql(&tables[1]));
    }

    fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
        Ok(pieces(data, 1000).collect::<Result<Vec<_>, _>>()?.concat())
    }

    #[test]
    fn parts_decompress_in_pieces() {
        let data: Vec<u8> = (0..=255u8).cycle().take(2500).collect();
        let c = compress(&data).unwrap();
        let got: Vec<Vec<u8>> = pieces(&c, 1000).map(Result::unwrap).collect();
        assert_eq!(
            got.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(got.concat(), data);
        assert_eq!(pieces(&compress(b"").unwrap(), 1000).count(), 0);
    }

    #[test]
    fn compression_is_lz4_frame_with_checksum() {
        let data = b"1\thello\n2\tworld\n".repeat(1000);
        let c = compress(&data).unwrap();
        assert_eq!(&c[..4], &[0x04, 0x22, 0x4d, 0x18], "lz4 frame magic");
        assert!(c.len() < data.len());
        assert_eq!(decompress(&c).unwrap(), data);
        let mut bad = c.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(decompress(&bad).is_err(), "content checksum catches damage");
    }

    #[test]
    fn corrupt_object_error_names_key_and_both_values() {
        let err = verify("basebackups/x/tables/00000.0000.copy.lz4", b"abc", 7).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("basebackups/x/tables/00000.0000.copy.lz4"));
        assert!(msg.contains("00000007"));
        assert!(msg.contains(&format!("{:08x}", crc32fast::hash(b"abc"))));
    }
}
