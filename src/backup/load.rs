//! Loading a base backup into an empty database, in four [`LoadPhase`]s, so that the restore
//! can replay archived changes between `Keys` (which creates only what replay needs to find
//! rows: primary keys, unique constraints, replica-identity indexes) and `PostData` (everything
//! else, then sequences).
//!
//! Invariant: every object loaded is checked against the manifest (its CRC-32, its size, its
//! rows) as it is loaded, and the data of all tables is committed at once: a damaged part leaves
//! no table half loaded.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{pin_mut, SinkExt};
use tokio_postgres::Client;

use super::{
    column_list, format_option, io_err, manifest, pg, pieces, qualified, quote_ident, run_tool,
    session_settings, toc, BackupError, KeyKind, KeyObject, Manifest, PartEntry, TableEntry,
};
use crate::conninfo::ConnInfo;
use crate::object;
use crate::pgbin;
use crate::store::Store;

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

/// The COPY that loads a table's data (a partitioned root routes rows to its partitions).
fn copy_in_sql(t: &TableEntry) -> String {
    format!(
        "COPY {}{} FROM STDIN{}",
        qualified(&t.schema, &t.name),
        column_list(&t.columns),
        format_option(t.format)
    )
}

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
        // The session settings go in the string's `options` (libpq reads PGOPTIONS only when
        // the string has none), before the target's own options, which win.
        let conn = target.libpq_string_with_options(&restore_pgoptions());
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
        run_tool(&self.pg_restore, &args, target.child_env()).await?;
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

/// Checks a stored part's bytes as loading it would, without a database: its CRC-32, that
/// its lz4 frame decompresses (in pieces, checking the frame's own checksum) to exactly the
/// size the manifest records. Pure; what `verify` runs on every part.
pub fn check_part(p: &PartEntry, stored: &[u8]) -> Result<(), BackupError> {
    verify(&p.key, stored, p.crc32)?;
    let bad = |message: String| BackupError::BadObject {
        key: p.key.clone(),
        message,
    };
    let mut raw = 0u64;
    for piece in pieces(stored, COPY_MESSAGE) {
        raw += piece
            .map_err(|e| bad(format!("cannot decompress: {e}")))?
            .len() as u64;
        if raw > p.raw_bytes {
            return Err(bad(format!(
                "decompresses to more than the {} bytes the manifest records",
                p.raw_bytes
            )));
        }
    }
    if raw != p.raw_bytes {
        return Err(bad(format!(
            "decompresses to {raw} bytes, the manifest records {}",
            p.raw_bytes
        )));
    }
    Ok(())
}

/// Checks the schema dump's bytes against the manifest: its CRC-32 and its size. Pure.
pub fn check_schema(m: &Manifest, dump: &[u8]) -> Result<(), BackupError> {
    verify(&m.schema.key, dump, m.schema.crc32)?;
    if dump.len() as u64 != m.schema.bytes {
        return Err(BackupError::BadObject {
            key: m.schema.key.clone(),
            message: format!(
                "it is {} bytes, the manifest records {}",
                dump.len(),
                m.schema.bytes
            ),
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
    fn corrupt_object_error_names_key_and_both_values() {
        let err = verify("basebackups/x/tables/00000.0000.copy.lz4", b"abc", 7).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("basebackups/x/tables/00000.0000.copy.lz4"));
        assert!(msg.contains("00000007"));
        assert!(msg.contains(&format!("{:08x}", crc32fast::hash(b"abc"))));
    }

    #[test]
    fn a_part_is_checked_by_checksum_frame_and_size() {
        let raw = b"1\tone\n2\ttwo\n".repeat(1000);
        let stored = super::super::compress(&raw).unwrap();
        let part = PartEntry {
            key: "basebackups/x/tables/00000.0000.copy.lz4".into(),
            rows: 2000,
            raw_bytes: raw.len() as u64,
            stored_bytes: stored.len() as u64,
            crc32: crc32fast::hash(&stored),
        };
        check_part(&part, &stored).unwrap();
        let mut flipped = stored.clone();
        flipped[stored.len() / 2] ^= 1;
        let e = check_part(&part, &flipped).unwrap_err();
        assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
        // A frame that checks out but holds other content than the manifest says.
        let short = PartEntry {
            raw_bytes: raw.len() as u64 + 1,
            ..part.clone()
        };
        let e = check_part(&short, &stored).unwrap_err().to_string();
        assert!(e.contains("the manifest records"), "{e}");
        // The right checksum over bytes that are no lz4 frame.
        let garbage = b"not a frame".to_vec();
        let bad = PartEntry {
            crc32: crc32fast::hash(&garbage),
            ..part
        };
        let e = check_part(&bad, &garbage).unwrap_err().to_string();
        assert!(e.contains("cannot decompress"), "{e}");
    }
}
