//! Taking a base backup: every read in the exported snapshot, the tables' COPY cut into parts
//! and stored while it streams, the schema dump alongside, the manifest last.
//!
//! The caller holds a replication connection idle with an exported snapshot whose position is
//! `consistent_point` (a transaction is in the backup iff its commit LSN is below it). Every
//! read here — catalog, `pg_dump`, COPY — happens in that snapshot.
//!
//! Invariant: the manifest is stored only after every object it lists; a failed attempt removes
//! what it stored (an attempt that cannot is an incomplete backup, ignored by readers).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures_util::{pin_mut, StreamExt};
use tokio_postgres::Client;

use super::{
    backup_id, column_list, compress, cut, format_option, io_err, manifest, manifest_key, part_key,
    pg, qualified, quote_ident, quote_literal, run_tool, schema_key, session_settings, BackupError,
    CopyFormat, KeyKind, KeyObject, Manifest, Origin, PartEntry, SchemaEntry, SequenceEntry,
    TableEntry, Totals, FORMAT_VERSION, MIN_FORMAT_VERSION,
};
use crate::catalog::audit;
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::object;
use crate::pgbin;
use crate::store::Store;

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
    /// How the backup came to be (recorded in its manifest: retention's `manual` tier).
    pub origin: Origin,
    /// `backup --tag NAME`, recorded in the manifest.
    pub tag: Option<&'a str>,
}

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

/// [`take`], with options. Every backup goes through here, so the backups `archive` takes
/// (initial and scheduled) are recorded in the audit trail here, success or failure (best
/// effort: an archiver does not stop because a record could not be stored). A manual backup is
/// recorded by its command instead (`audit_cmd`), which also records failures before this.
pub async fn take_with(
    store: &Arc<dyn Store>,
    req: BackupRequest<'_>,
    opts: TakeOptions,
) -> Result<Manifest, BackupError> {
    let started = audit::Started::now();
    let result = take_unrecorded(store, req, opts).await;
    if req.origin != Origin::Manual {
        let m = result.as_ref().ok();
        let op = audit::Operation::Backup(audit::BackupDetails {
            origin: req.origin.as_str().into(),
            backup_id: Some(backup_id(req.generation, req.consistent_point)),
            consistent_point: m.map(|m| m.consistent_point),
            tag: req.tag.map(str::to_string),
            pin: false,
        });
        audit::record_or_warn(&**store, started, &op, audit::Outcome::of(&result)).await;
    }
    result
}

async fn take_unrecorded(
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
        origin: Some(req.origin),
        tag: req.tag.map(str::to_string),
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
    let object = object::encode(&*store, key.clone(), Bytes::from(stored));
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
}
