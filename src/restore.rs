//! Point-in-time restore: a pure *plan* (which base backup, which segments, where to stop),
//! then the *apply* (schema, data, replay, sequences, indexes) into an empty database.
//!
//! Which transactions are replayed, in which order and where replay stops (PostgreSQL's own
//! `recovery_target_time` / `recovery_target_lsn` with `recovery_target_inclusive = on`) is
//! the [`crate::changelog`] reader's; the replay here is its sink.
//!
//! Invariants:
//! * A target the archive cannot prove is refused, never moved: a time before the earliest base
//!   backup, not yet passed by an archived commit (the server's clock must be seen past it), or
//!   outside every window of the [`crate::catalog`] (in a hole, after damage) names the
//!   earliest and latest restorable instants and the windows. Damage outside the chosen window
//!   does not matter: a restore reads only that window's segments, and checks them only up to
//!   the one where replay stops.
//! * Nothing is written to the target before the target is checked empty and writable by its
//!   role, every segment the plan needs has been read and verified (checksums, continuity) and
//!   the base backup's objects are all there ([`backup::Loader::check`]). The first write marks
//!   the target as in progress and the last one removes the mark (see `target`): a target that
//!   is not complete always says so.
//! * Source transactions are applied whole and in the order the changelog reader hands them
//!   out, several consecutive ones per target transaction (see `Replayer`: group boundaries
//!   are source commit boundaries).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tracing::{debug, info};

use crate::backup::{self, LoadPhase, Manifest};
use crate::catalog::Catalog;
use crate::changelog;
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::repo::{self, SegmentRef};
use crate::segment::Segment;
use crate::statement::{self, RelationInfo};
use crate::store::Store;

mod target;
pub use target::MARKER_TABLE;

/// Where a restore stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every transaction that committed at or before this instant.
    Time(PgTimestamp),
    /// Every transaction whose commit record starts at or before this LSN.
    Lsn(Lsn),
    /// Everything archived.
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {t}"),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Latest => write!(f, "the latest archived commit"),
        }
    }
}

/// Errors of planning or applying a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("repository {0} holds no archive (no base backup found)\nHINT: check --repo; `tidemark list --repo …` shows what a repository holds")]
    Empty(String),
    #[error("{target} is outside what the archive covers: {covered}\n{windows}\nHINT: {hint}")]
    OutOfRange {
        target: Target,
        /// The earliest and latest restorable instants, or why there are none.
        covered: String,
        /// The catalog's windows and damage (as `list` prints them).
        windows: String,
        hint: String,
    },
    #[error("the target database {0} is not empty ({1})\nHINT: restore into a new, empty database: CREATE DATABASE …; tidemark never overwrites existing data")]
    TargetNotEmpty(String, String),
    #[error("segment {range}: {detail}\nHINT: the archive is damaged from this segment on; restore to a point before {start}, or from another copy of the repository")]
    Corrupt {
        range: String,
        start: Lsn,
        detail: String,
    },
    #[error(transparent)]
    Repo(#[from] repo::RepoError),
    #[error("repository: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error("target database: {0}")]
    TargetConnect(#[source] crate::conninfo::ConnInfoError),
    #[error("target database: {what}: {}", crate::error::describe_pg(.source))]
    TargetQuery {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{what}: {detail}\nHINT: check the free space and permissions of the temporary folder (TMPDIR)")]
    Local { what: String, detail: String },
    #[error("the target database {target} holds an incomplete restore ({detail}): a restore into it failed or was interrupted\nHINT: drop it (DROP DATABASE …) and restore into a new, empty database")]
    TargetIncomplete { target: String, detail: String },
    #[error("role {role:?} may not restore into {target}: it lacks {what}\nHINT: as the database's owner or a superuser: {grant} (or restore as a role that may)")]
    TargetPrivilege {
        target: String,
        role: String,
        what: String,
        grant: String,
    },
    #[error("{source}\nTHE TARGET DATABASE {target} IS INCOMPLETE: the restore stopped after writing to it (table public.{MARKER_TABLE} marks it); do not use it: drop it and restore again into a new, empty database")]
    Incomplete {
        target: String,
        #[source]
        source: Box<RestoreError>,
    },
    #[error("replaying the transaction committed at {commit_lsn} ({commit_time}): {detail}")]
    Replay {
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        detail: String,
    },
}

impl crate::error::Classify for RestoreError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            RestoreError::Empty(_) => Repository,
            RestoreError::OutOfRange { .. } => OutOfRange,
            RestoreError::TargetNotEmpty(..) | RestoreError::TargetQuery { .. } => Database,
            RestoreError::TargetConnect(e) => e.exit_status(),
            RestoreError::Corrupt { .. } => Damaged,
            RestoreError::Repo(e) => e.exit_status(),
            RestoreError::Store(e) => e.exit_status(),
            RestoreError::Backup(e) => e.exit_status(),
            RestoreError::Local { .. } => Unexpected,
            RestoreError::TargetIncomplete { .. } | RestoreError::TargetPrivilege { .. } => {
                Database
            }
            RestoreError::Incomplete { source, .. } => source.exit_status(),
            // The target refused a statement of an archived transaction.
            RestoreError::Replay { .. } => Database,
        }
    }
}

/// What a restore will do, computed without touching the target.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub backup_id: String,
    pub generation: u32,
    /// Replay starts here: the backup's consistent point.
    pub start: Lsn,
    pub target: String,
    /// Segments to read, in order.
    pub segments: Vec<String>,
    pub earliest: PgTimestamp,
    pub latest: Option<PgTimestamp>,
}

/// Chooses the base backup and segments for `target` inside one of the catalog's windows.
/// Pure.
///
/// A time is restorable in a window from its first backup's snapshot time to just before its
/// last archived commit; an LSN from its first backup's position to its end. The newest window
/// holding the target is used, and in it the newest backup at or before the target. A target
/// in no window (in a hole, after damage, beyond the archive) is refused, naming the windows.
pub fn plan(cat: &Catalog, target: Target) -> Result<Plan, RestoreError> {
    if cat.is_empty() {
        return Err(RestoreError::Empty(cat.location.clone()));
    }
    let refuse = |why: Option<String>| {
        let covered = match (cat.earliest(), cat.latest_commit()) {
            (Some(a), Some(b)) => format!(
                "the earliest restorable instant is {a}, the latest is just before {b} (the last archived commit)"
            ),
            (Some(a), None) => format!(
                "the earliest restorable instant is {a}, the latest is not yet known (no commit archived since the base backup)"
            ),
            _ => "no base backup can be restored".to_string(),
        };
        let covered = match why {
            Some(why) if !cat.windows.is_empty() => format!("{covered}; {why}"),
            _ => covered,
        };
        let hint = if cat.windows.is_empty() {
            "restore from another copy of the repository; a new base backup (`tidemark backup`) starts a window from now on".to_string()
        } else if cat.latest_window().is_ok() {
            "choose a target inside one of these windows, or --latest".to_string()
        } else {
            "choose a target inside one of these windows; a new base backup (`tidemark backup`) opens a window after the damage".to_string()
        };
        RestoreError::OutOfRange {
            target,
            covered,
            windows: cat.describe(),
            hint,
        }
    };
    let (window, backup) = match target {
        Target::Latest => {
            let w = cat
                .latest_window()
                .map_err(|why| refuse(Some(format!("--latest cannot be restored: {why}"))))?;
            (w, w.backups.last().expect("a window has a backup"))
        }
        Target::Time(t) => {
            let w = cat
                .windows
                .iter()
                .rev()
                .find(|w| w.holds_time(t))
                .ok_or_else(|| refuse(None))?;
            let b = w.backups.iter().rev().find(|b| b.snapshot_time <= t);
            (w, b.expect("the window holds the time"))
        }
        Target::Lsn(l) => {
            let w = cat
                .windows
                .iter()
                .rev()
                .find(|w| w.holds_lsn(l))
                .ok_or_else(|| refuse(None))?;
            let b = w.backups.iter().rev().find(|b| b.consistent_point <= l);
            (w, b.expect("the window holds the LSN"))
        }
    };
    let segments: Vec<String> = window
        .segments
        .iter()
        .filter(|s| s.end > backup.consistent_point)
        .map(|s| s.key.clone())
        .collect();
    Ok(Plan {
        backup_id: backup.id.clone(),
        generation: window.generation,
        start: backup.consistent_point,
        target: target.to_string(),
        segments,
        earliest: window.earliest,
        latest: window.latest_commit,
    })
}

/// Reads what planning needs from the repository: its catalog and the usable manifests. The
/// damage found is logged: a restore that avoids it goes on.
pub async fn gather(store: &Arc<dyn Store>) -> Result<(Catalog, Vec<Manifest>), RestoreError> {
    let (cat, manifests) = Catalog::load(store).await.map_err(|e| match e {
        backup::BackupError::Store(e) => RestoreError::Store(e),
        e => RestoreError::Backup(e),
    })?;
    for p in &cat.problems {
        tracing::warn!(location = %cat.location, "{p}");
    }
    Ok((cat, manifests))
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub backup_id: String,
    pub transactions_replayed: u64,
    pub last_commit_lsn: Option<Lsn>,
    pub last_commit_time: Option<PgTimestamp>,
    pub seconds: f64,
    /// Of which replaying the archived transactions (from the end of the base backup's load to
    /// the last result of the target).
    pub replay_seconds: f64,
}

/// Restores the repository into `target` (an existing, empty database).
pub async fn run(
    store: &Arc<dyn Store>,
    target_info: &ConnInfo,
    to: Target,
    parallel: usize,
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let (gens, manifests) = gather(store).await?;
    let plan = plan(&gens, to)?;
    let manifest = manifests
        .iter()
        .find(|m| m.id == plan.backup_id)
        .expect("the plan chose a listed backup");
    info!(backup = %plan.backup_id, start = %plan.start, segments = plan.segments.len(), target = %plan.target, "restore plan");

    let client = target_info
        .connect()
        .await
        .map_err(RestoreError::TargetConnect)?;
    target::check_empty(&client, target_info).await?;
    target::check_privileges(&client, target_info, manifest).await?;

    // Read and verify every segment, and check the base backup, before writing anything.
    let spool = tempfile::tempdir().map_err(|e| RestoreError::Local {
        what: "creating a temporary folder for the segments".into(),
        detail: e.to_string(),
    })?;
    let verified = fetch_and_verify(store, &gens, &plan, to, spool.path()).await?;
    let loader = backup::Loader::new(store, manifest, target_info, parallel);
    loader.check().await?;

    target::mark_in_progress(&client, manifest, &store.location()).await?;
    let applied = apply(
        &client,
        &loader,
        manifest,
        &plan,
        to,
        target_info,
        &verified,
    )
    .await
    .map_err(|e| RestoreError::Incomplete {
        target: target_info.to_string(),
        source: Box::new(e),
    })?;
    let replayer = applied.replayer;
    let replay_seconds = applied.replay_seconds;
    let summary = RestoreSummary {
        backup_id: plan.backup_id,
        transactions_replayed: replayer.applied,
        last_commit_lsn: replayer.last_commit.map(|c| c.0),
        last_commit_time: replayer.last_commit.map(|c| c.1),
        seconds: started.elapsed().as_secs_f64(),
        replay_seconds,
    };
    info!(?summary, "restore complete");
    Ok(summary)
}

/// What [`apply`] did.
struct Applied {
    replayer: ReplayOutcome,
    replay_seconds: f64,
}

/// What replay did, past the borrow of the target's client.
struct ReplayOutcome {
    applied: u64,
    last_commit: Option<(Lsn, PgTimestamp)>,
}

/// Writes the restore into the marked target: the base backup, replay, sequences, indexes;
/// then removes the marker.
async fn apply(
    client: &tokio_postgres::Client,
    loader: &backup::Loader<'_>,
    manifest: &Manifest,
    plan: &Plan,
    to: Target,
    target_info: &ConnInfo,
    verified: &[std::path::PathBuf],
) -> Result<Applied, RestoreError> {
    loader.load(LoadPhase::PreData).await?;
    loader.load(LoadPhase::Data).await?;
    loader.load(LoadPhase::Keys).await?;
    // Replayed DDL may name any object of the backup (DROP INDEX, RENAME COLUMN of an indexed
    // column…): with DDL in the archive, every post-data object exists before replay.
    let post_data_first = crate::ddl::segments_have_ddl(verified)
        .await
        .map_err(|detail| RestoreError::Local {
            what: "reading the spooled segments".into(),
            detail,
        })?;
    if post_data_first {
        loader.load(LoadPhase::PostData).await?;
    }

    let replay_started = Instant::now();
    let mut replayer = Replayer::new(client, manifest).await?;
    let mut reader = changelog::TxnReader::new(plan.start, to);
    reader
        .read_all(verified.len(), &mut Spooled(verified), &mut replayer)
        .await?;
    replayer.flush().await?;
    let replay_seconds = replay_started.elapsed().as_secs_f64();

    // Sequences: the backed-up values were set with the data; replay moved them as the source
    // did (recorded values from the archiver's `tidemark.sequences` messages, TRUNCATE …
    // RESTART IDENTITY); now each is raised past every value in the columns it feeds.
    if post_data_first {
        backup::raise_sequences(target_info)
            .await
            .map_err(RestoreError::from)?;
    } else {
        loader.load(LoadPhase::PostData).await?;
    }
    target::mark_complete(client).await?;
    Ok(Applied {
        replayer: ReplayOutcome {
            applied: replayer.applied,
            last_commit: replayer.last_commit,
        },
        replay_seconds,
    })
}

/// Downloads the planned segments (several at once), verifies each completely and checks that
/// they continue each other from the backup's position; returns the spooled files in order.
async fn fetch_and_verify(
    store: &Arc<dyn Store>,
    gens: &Catalog,
    plan: &Plan,
    target: Target,
    spool: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, RestoreError> {
    let refs: HashMap<&str, &SegmentRef> = gens
        .segments
        .values()
        .flatten()
        .map(|s| (s.key.as_str(), s))
        .collect();
    let mut expected_start: Option<Lsn> = None;
    let mut out = Vec::new();
    let mut fetches = futures_util::stream::iter(plan.segments.iter().cloned())
        .map(|key| {
            let store = store.clone();
            async move { store.get(&key).await.map(|b| (key, b)) }
        })
        .buffered(4);
    while let Some(item) = fetches.next().await {
        let (key, bytes) = item?;
        let r = refs[key.as_str()];
        let corrupt = |detail: String| RestoreError::Corrupt {
            range: r.range(),
            start: r.start,
            detail,
        };
        match expected_start {
            None if r.start > plan.start => {
                return Err(corrupt(format!(
                    "the archive continues only from {} but the base backup is at {}: the changes between are missing",
                    r.start, plan.start
                )))
            }
            Some(e) if r.start != e => {
                return Err(corrupt(format!("expected the segment starting at {e}: the chain has a gap")))
            }
            _ => {}
        }
        let seg = Segment::parse(bytes.clone()).map_err(|e| corrupt(e.to_string()))?;
        if seg.info.start_lsn != r.start || seg.info.end_lsn != r.end {
            return Err(corrupt(format!(
                "its header says {}-{}, which does not match its name",
                seg.info.start_lsn, seg.info.end_lsn
            )));
        }
        for rec in seg.records() {
            rec.map_err(|e| corrupt(e.to_string()))?;
        }
        expected_start = Some(r.end);
        let path = spool.join(format!("{:06}.seg", out.len()));
        tokio::fs::write(&path, &bytes)
            .await
            .map_err(|e| RestoreError::Local {
                what: format!("spooling a segment to {}", path.display()),
                detail: e.to_string(),
            })?;
        out.push(path);
        // Replay stops in this segment: later ones are not needed.
        if changelog::stops_in(target, plan.start, &seg) {
            break;
        }
    }
    debug!(segments = out.len(), "segments verified");
    Ok(out)
}

/// Reads back a segment the restore fetched, verified and spooled.
async fn read_spooled(path: &std::path::Path) -> Result<Segment, RestoreError> {
    let local = |detail: String| RestoreError::Local {
        what: format!("reading the spooled segment {}", path.display()),
        detail,
    };
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| local(e.to_string()))?;
    Segment::parse(Bytes::from(bytes)).map_err(|e| local(e.to_string()))
}

/// Applies decoded transactions to the target.
///
/// Speed (replay must run many times faster than the source committed) comes from three
/// things, none of which changes what is applied or in which order:
/// * Prepared statements: each row change is a statement with `$n` placeholders (see
///   [`statement::Prepared`]), prepared once per shape (`PREPARE tidemark_N AS …`) and run as
///   `EXECUTE tidemark_N('v1', NULL, …)`, so the server parses and plans it once, not once per
///   row. Runs of inserts into one table are folded into multi-row INSERTs of a few fixed
///   sizes.
/// * Batching and pipelining: statements go as one simple query of about [`BATCH_BYTES`] (the
///   server answers them without a round trip each), and the next batch is rendered while the
///   target runs the previous one. Results come back in order, so a failure still names the
///   source transaction of the statement that failed.
/// * Group commit: up to [`GROUP_TXNS`] consecutive source transactions are applied as one
///   target transaction. This is safe because the group's boundaries are source commit
///   boundaries and nothing else runs on the target meanwhile: the statements run in the
///   source's commit order, so each one sees exactly the state the source had at that point,
///   and the state at the group's commit is the state after its last source transaction,
///   which satisfied every constraint on the source (a deferred constraint is checked on that
///   state). A restore to a target instant stops before the first transaction past it and
///   commits the group so far: the group never holds a transaction past the target. A group
///   ends after a transaction that ran DDL.
struct Replayer<'a> {
    client: &'a tokio_postgres::Client,
    relations: HashMap<u32, RelationInfo>,
    /// Rendered operations not yet sent, in order.
    queue: Vec<(Op, Stmt)>,
    queue_bytes: usize,
    /// The run of inserts being folded into a multi-row INSERT.
    run: Option<InsertRun>,
    /// Statements written for the target, not yet sent (one simple query).
    batch: String,
    /// One entry per statement in `batch`, to check each one's result.
    statements: Vec<Stmt>,
    /// Sent batches whose results are not read yet, oldest first.
    in_flight: VecDeque<(InFlight<'a>, Vec<Stmt>)>,
    /// Prepared statements (`tidemark_N`) by text.
    prepared: HashMap<String, u64>,
    next_prepared: u64,
    /// The INSERT prefix of each relation (see [`statement::insert_prefix`]), by source OID.
    insert_prefixes: HashMap<u32, Option<Arc<str>>>,
    /// A target transaction is open (BEGIN queued or sent).
    group_open: bool,
    /// Source transactions in the open group.
    group_txns: usize,
    /// The open group ends with the current source transaction.
    group_break: bool,
    /// The source transaction being replayed (commit LSN and time), between `begin` and
    /// `commit`.
    txn: Option<(Lsn, PgTimestamp)>,
    applied: u64,
    last_commit: Option<(Lsn, PgTimestamp)>,
    /// Checks that every change of a table's columns is explained by a replayed DDL message.
    guard: crate::ddl::SchemaGuard,
}

/// An operation for the target.
enum Op {
    /// A statement over the simple-query protocol (BEGIN, COMMIT, TRUNCATE, setval…).
    Simple(String),
    /// A row change, executed with a prepared statement.
    Prepared(statement::Prepared),
}

/// The results of a batch sent to the target: the rows of each statement that completed,
/// then an error if one failed.
type InFlight<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Vec<u64>, Result<(), tokio_postgres::Error>)> + Send + 'a,
    >,
>;

/// Consecutive inserts into one relation with the same columns (one source transaction).
struct InsertRun {
    relid: u32,
    prefix: Arc<str>,
    ncols: usize,
    /// The parameters of the rows not yet emitted, row after row.
    params: Vec<Option<Bytes>>,
    rows: usize,
    bytes: usize,
    stmt: Stmt,
}

/// Rendered operations are sent once they hold this many bytes of parameters.
const BATCH_BYTES: usize = 1 << 20;
/// Most batches sent and not yet answered.
const IN_FLIGHT_BATCHES: usize = 2;
/// Most source transactions applied as one target transaction.
const GROUP_TXNS: usize = 32;
/// Most rows of one multi-row INSERT (a power of two; fewer for wide tables: PostgreSQL takes
/// at most 65535 parameters).
const INSERT_ROWS: usize = 64;
/// Prepared statements kept (all are dropped when more are needed).
const MAX_PREPARED: usize = 2000;

impl<'a> Replayer<'a> {
    async fn new(
        client: &'a tokio_postgres::Client,
        manifest: &Manifest,
    ) -> Result<Replayer<'a>, RestoreError> {
        client
            .batch_execute(&crate::session::set_statements(&[(
                "synchronous_commit",
                "off",
            )]))
            .await
            .map_err(|source| RestoreError::TargetQuery {
                what: "setting the replay session".into(),
                source,
            })?;
        // Replay reproduces the source's effects; the target's triggers and FK checks must not
        // fire again. Needs superuser; without it, triggers fire (logged).
        if let Err(e) = client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::warn!(error = %e, "cannot set session_replication_role = replica: triggers on the target will fire during replay");
        }
        let relations = relations_at_backup(client, manifest).await?;
        let mut guard = crate::ddl::SchemaGuard::new();
        for rel in relations.values() {
            guard.know(rel);
        }
        Ok(Replayer {
            client,
            relations,
            queue: Vec::new(),
            queue_bytes: 0,
            run: None,
            batch: String::new(),
            statements: Vec::new(),
            in_flight: VecDeque::new(),
            prepared: HashMap::new(),
            next_prepared: 0,
            insert_prefixes: HashMap::new(),
            group_open: false,
            group_txns: 0,
            group_break: false,
            txn: None,
            applied: 0,
            last_commit: None,
            guard,
        })
    }

    /// A logical message of the replayed transaction: tidemark's DDL runs at this point of
    /// the transaction, recorded sequence values are set here (then raised past the columns'
    /// values after replay); others (heartbeats, applications' own) change nothing.
    async fn logical(&mut self, msg: Message) -> Result<(), RestoreError> {
        let Message::Message {
            prefix, content, ..
        } = msg
        else {
            return Ok(());
        };
        let Some((commit, _)) = self.txn else {
            return Ok(());
        };
        let decoded = match crate::ddl::decode_message(&prefix, &content) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.replay_err(&e.to_string())),
        };
        if let crate::ddl::TidemarkMessage::Ddl(_) = decoded {
            self.guard.ddl();
        }
        let statements: Vec<String> = match decoded {
            crate::ddl::TidemarkMessage::Ddl(d) => {
                let statements =
                    crate::ddl::plan_replay(&d).map_err(|e| self.replay_err(&e.to_string()))?;
                // Run on their own (inside the open transaction) so a failure names the
                // statement; the group ends with this transaction, and statements prepared
                // before are dropped (they may name what the DDL changed).
                self.pump().await?;
                let stmt = self.stmt(b'X', None);
                self.deallocate_all(&stmt);
                self.drain().await?;
                self.insert_prefixes.clear();
                self.group_break = true;
                for sql in &statements {
                    if let Err(e) = self.client.simple_query(sql).await {
                        return Err(self.replay_err(&format!(
                            "the schema change {sql:?} failed on the target: {}\nHINT: the target may lack something the source had (an extension, a role, a tablespace…): provide it and restore again, or restore to an instant before this transaction",
                            crate::error::chain(&e)
                        )));
                    }
                }
                return Ok(());
            }
            crate::ddl::TidemarkMessage::Sequences(s) => {
                crate::ddl::setval_sql(&s.sequences).into_iter().collect()
            }
        };
        let commit_time = self.txn.map(|t| t.1).unwrap_or_default();
        for sql in statements {
            self.push_op(
                Op::Simple(sql),
                Stmt {
                    kind: b'M',
                    rel: None,
                    commit,
                    commit_time,
                },
            );
        }
        Ok(())
    }

    /// Opens a target transaction for the current source transaction, unless the group's is
    /// open.
    fn open_group(&mut self) {
        if self.group_open {
            return;
        }
        self.group_open = true;
        let stmt = self.stmt(b'B', None);
        self.push_op(Op::Simple("BEGIN".into()), stmt);
    }

    /// Ends the replayed source transaction (outside `self.txn`): ends the group when it is
    /// full or must end here, and sends what is rendered.
    async fn end_txn(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.close_run();
        self.applied += 1;
        self.last_commit = Some((commit_lsn, commit_time));
        self.group_txns += 1;
        if self.group_break || self.group_txns >= GROUP_TXNS {
            self.end_group(commit_lsn, commit_time);
        }
        self.pump().await
    }

    /// Queues the COMMIT of the open target transaction.
    fn end_group(&mut self, commit: Lsn, commit_time: PgTimestamp) {
        if !self.group_open {
            return;
        }
        self.push_op(
            Op::Simple("COMMIT".into()),
            Stmt {
                kind: b'C',
                rel: None,
                commit,
                commit_time,
            },
        );
        self.group_open = false;
        self.group_txns = 0;
        self.group_break = false;
    }

    fn stmt(&self, kind: u8, rel: Option<String>) -> Stmt {
        Stmt {
            kind,
            rel,
            commit: self.txn.map(|t| t.0).unwrap_or_default(),
            commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
        }
    }

    fn rel(&self, relid: u32) -> Result<&RelationInfo, RestoreError> {
        self.relations.get(&relid).ok_or_else(|| {
            self.replay_err(&format!(
                "a change to relation {relid}, which the archive never described"
            ))
        })
    }

    /// Queues an operation (after the run of inserts, which it ends).
    fn push_op(&mut self, op: Op, stmt: Stmt) {
        self.close_run();
        self.queue_op(op, stmt);
    }

    fn queue_op(&mut self, op: Op, stmt: Stmt) {
        self.queue_bytes += op_bytes(&op);
        self.queue.push((op, stmt));
    }

    /// Renders one change.
    fn render(&mut self, msg: Message) -> Result<(), RestoreError> {
        match &msg {
            Message::Insert { relid, new, .. } => self.insert(*relid, new),
            Message::Update {
                relid, old, new, ..
            } => {
                let rel = self.rel(*relid)?;
                let p = statement::prepare_update(rel, old.as_ref(), new)
                    .map_err(|e| self.replay_err(&e.to_string()))?;
                if let Some(p) = p {
                    let stmt = self.stmt(b'U', Some(rel.qualified_name()));
                    self.push_op(Op::Prepared(p), stmt);
                }
                Ok(())
            }
            Message::Delete { relid, old, .. } => {
                let rel = self.rel(*relid)?;
                let p = statement::prepare_delete(rel, old)
                    .map_err(|e| self.replay_err(&e.to_string()))?;
                let stmt = self.stmt(b'D', Some(rel.qualified_name()));
                self.push_op(Op::Prepared(p), stmt);
                Ok(())
            }
            Message::Truncate {
                options, relids, ..
            } => {
                let rels: Result<Vec<&RelationInfo>, _> =
                    relids.iter().map(|r| self.rel(*r)).collect();
                let mut sql = String::new();
                statement::render_truncate(&rels?, *options, &mut sql);
                if !sql.is_empty() {
                    let stmt = self.stmt(b'T', None);
                    self.push_op(Op::Simple(sql), stmt);
                }
                Ok(())
            }
            // Type, Origin and logical messages (heartbeats) change no rows.
            _ => Ok(()),
        }
    }

    /// An insert: added to the run of inserts into the same relation (a multi-row INSERT).
    fn insert(&mut self, relid: u32, new: &pgoutput::TupleData) -> Result<(), RestoreError> {
        let rel = self.rel(relid)?;
        let p = statement::prepare_insert_params(rel, new)
            .map_err(|e| self.replay_err(&e.to_string()))?;
        let prefix = match self.insert_prefixes.get(&relid) {
            Some(p) => p.clone(),
            None => {
                let p: Option<Arc<str>> = statement::insert_prefix(rel).map(Arc::from);
                self.insert_prefixes.insert(relid, p.clone());
                p
            }
        };
        let Some(prefix) = prefix else {
            // No columns: `INSERT … DEFAULT VALUES`, one per row.
            let rel = self.rel(relid)?;
            let p =
                statement::prepare_insert(rel, new).map_err(|e| self.replay_err(&e.to_string()))?;
            let stmt = self.stmt(b'I', None);
            self.push_op(Op::Prepared(p), stmt);
            return Ok(());
        };
        if self
            .run
            .as_ref()
            .is_some_and(|r| r.relid != relid || r.prefix != prefix)
        {
            self.close_run();
        }
        let ncols = p.len();
        let bytes: usize = p
            .iter()
            .map(|v| v.as_ref().map_or(0, |b| b.len()) + 4)
            .sum();
        let max_rows = max_insert_rows(ncols);
        if self.run.is_none() {
            self.run = Some(InsertRun {
                relid,
                prefix,
                ncols,
                params: Vec::with_capacity(ncols * max_rows),
                rows: 0,
                bytes: 0,
                stmt: self.stmt(b'I', None),
            });
        }
        let run = self.run.as_mut().expect("just set");
        run.params.extend(p);
        run.rows += 1;
        run.bytes += bytes;
        if run.rows >= max_rows {
            self.close_run();
        }
        Ok(())
    }

    /// Queues the run of inserts as multi-row INSERTs of power-of-two sizes (few shapes to
    /// prepare).
    fn close_run(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        let mut params = std::mem::take(&mut run.params).into_iter();
        let mut left = run.rows;
        while left > 0 {
            let rows = 1usize << (usize::BITS - 1 - left.leading_zeros());
            let mut sql = String::with_capacity(run.prefix.len() + rows * run.ncols * 5);
            sql.push_str(&run.prefix);
            let mut n = 0;
            for r in 0..rows {
                sql.push_str(if r == 0 { "(" } else { ",(" });
                for c in 0..run.ncols {
                    if c > 0 {
                        sql.push(',');
                    }
                    n += 1;
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                sql.push(')');
            }
            let op = Op::Prepared(statement::Prepared {
                sql,
                params: params.by_ref().take(rows * run.ncols).collect(),
            });
            let stmt = Stmt {
                kind: b'I',
                rel: None,
                commit: run.stmt.commit,
                commit_time: run.stmt.commit_time,
            };
            self.queue_op(op, stmt);
            left -= rows;
        }
    }

    fn replay_err(&self, detail: &str) -> RestoreError {
        RestoreError::Replay {
            commit_lsn: self.txn.map(|t| t.0).unwrap_or_default(),
            commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
            detail: detail.to_string(),
        }
    }

    /// Commits the open group and waits for every result: every UPDATE and DELETE must have
    /// touched exactly one row, anything else means the target diverged from the source.
    async fn flush(&mut self) -> Result<(), RestoreError> {
        if self.txn.is_some() {
            return Err(self.replay_err("internal: flush inside a transaction"));
        }
        let (commit, time) = self.last_commit.unwrap_or_default();
        self.end_group(commit, time);
        self.drain().await
    }

    /// Sends what is queued and waits for every result (the target transaction stays open).
    async fn drain(&mut self) -> Result<(), RestoreError> {
        self.pump().await?;
        self.send_batch().await?;
        while !self.in_flight.is_empty() {
            self.complete_one().await?;
        }
        Ok(())
    }

    /// Writes what is queued into the batch, and sends the batch once it is large.
    async fn pump(&mut self) -> Result<(), RestoreError> {
        self.close_run();
        let queue = std::mem::take(&mut self.queue);
        self.queue_bytes = 0;
        for (op, stmt) in queue {
            if let Op::Prepared(p) = &op {
                if !self.prepared.contains_key(&p.sql) {
                    self.prepare(&p.sql, &stmt).await?;
                }
            }
            self.write_op(op, stmt)?;
        }
        if self.batch.len() >= BATCH_BYTES {
            self.send_batch().await?;
        }
        Ok(())
    }

    /// Writes one operation into the batch: a prepared row change as `EXECUTE name(…)` with
    /// its parameters as literals, after the `PREPARE` of its statement the first time.
    fn write_op(&mut self, op: Op, stmt: Stmt) -> Result<(), RestoreError> {
        match op {
            Op::Simple(sql) => {
                self.batch.push_str(&sql);
                self.batch.push_str(";\n");
            }
            Op::Prepared(p) => {
                let Some(&name) = self.prepared.get(&p.sql) else {
                    return Err(RestoreError::Replay {
                        commit_lsn: stmt.commit,
                        commit_time: stmt.commit_time,
                        detail: "internal: a statement was not prepared".into(),
                    });
                };
                self.batch.push_str("EXECUTE tidemark_");
                self.batch.push_str(&name.to_string());
                for (i, v) in p.params.iter().enumerate() {
                    self.batch.push_str(if i == 0 { "(" } else { "," });
                    statement::push_param_literal(&mut self.batch, v.as_deref()).map_err(|e| {
                        RestoreError::Replay {
                            commit_lsn: stmt.commit,
                            commit_time: stmt.commit_time,
                            detail: e.to_string(),
                        }
                    })?;
                }
                if !p.params.is_empty() {
                    self.batch.push(')');
                }
                self.batch.push_str(";\n");
            }
        }
        self.statements.push(stmt);
        Ok(())
    }

    /// Prepares `sql` as the next `tidemark_N`, in a query of its own: the server keeps the
    /// whole query text with a prepared statement, and copies it at every EXECUTE.
    async fn prepare(&mut self, sql: &str, stmt: &Stmt) -> Result<(), RestoreError> {
        if self.prepared.len() >= MAX_PREPARED {
            self.deallocate_all(stmt);
        }
        self.send_batch().await?;
        self.next_prepared += 1;
        let n = self.next_prepared;
        self.batch = format!("PREPARE tidemark_{n} AS {sql}");
        self.statements.push(Stmt {
            kind: b'P',
            rel: stmt.rel.clone(),
            commit: stmt.commit,
            commit_time: stmt.commit_time,
        });
        self.send_batch().await?;
        self.prepared.insert(sql.to_string(), n);
        Ok(())
    }

    /// Deallocates every statement this replay prepared (they may name what a DDL changed).
    fn deallocate_all(&mut self, stmt: &Stmt) {
        for (_, n) in self.prepared.drain() {
            self.batch.push_str("DEALLOCATE tidemark_");
            self.batch.push_str(&n.to_string());
            self.batch.push_str(";\n");
            self.statements.push(Stmt {
                kind: b'X',
                rel: None,
                commit: stmt.commit,
                commit_time: stmt.commit_time,
            });
        }
    }

    /// Sends the batch (one simple query; the server answers the statements in order), without
    /// waiting for its results beyond [`IN_FLIGHT_BATCHES`]: the next batch is rendered
    /// meanwhile.
    async fn send_batch(&mut self) -> Result<(), RestoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let sql = std::mem::take(&mut self.batch);
        let statements = std::mem::take(&mut self.statements);
        let client = self.client;
        let mut fut: InFlight<'a> = Box::pin(async move {
            let mut counts = Vec::new();
            let stream = match client.simple_query_raw(&sql).await {
                Ok(s) => s,
                Err(e) => return (counts, Err(e)),
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(m) = stream.next().await {
                match m {
                    Ok(tokio_postgres::SimpleQueryMessage::CommandComplete(n)) => counts.push(n),
                    Ok(_) => {}
                    Err(e) => return (counts, Err(e)),
                }
            }
            (counts, Ok(()))
        });
        // The first poll hands the query to the connection task: batches reach the server in
        // the order they are sent.
        if let std::task::Poll::Ready(r) =
            std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await
        {
            fut = Box::pin(std::future::ready(r));
        }
        self.in_flight.push_back((fut, statements));
        while self.in_flight.len() > IN_FLIGHT_BATCHES {
            self.complete_one().await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch's results and checks them: a statement the target refused
    /// is named with its source transaction, and every UPDATE and DELETE must have touched
    /// exactly one row (anything else means the target diverged from the source).
    async fn complete_one(&mut self) -> Result<(), RestoreError> {
        let Some((fut, statements)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (counts, result) = fut.await;
        if let Err(e) = result {
            let stmt = statements.get(counts.len()).or(statements.last());
            let what = match stmt.map(|s| s.kind) {
                Some(b'B') => "BEGIN".to_string(),
                Some(b'C') => "the COMMIT of the transactions up to this one".to_string(),
                Some(b'I') => "an INSERT".to_string(),
                Some(b'U') => format!(
                    "an UPDATE of {}",
                    stmt.and_then(|s| s.rel.as_deref()).unwrap_or("?")
                ),
                Some(b'D') => format!(
                    "a DELETE of {}",
                    stmt.and_then(|s| s.rel.as_deref()).unwrap_or("?")
                ),
                Some(b'P') => "the preparation of a statement".to_string(),
                Some(b'T') => "a TRUNCATE".to_string(),
                _ => "a statement".to_string(),
            };
            return Err(RestoreError::Replay {
                commit_lsn: stmt.map(|s| s.commit).unwrap_or_default(),
                commit_time: stmt.map(|s| s.commit_time).unwrap_or_default(),
                detail: format!("the target refused {what}: {}", crate::error::chain(&e)),
            });
        }
        for (stmt, n) in statements.iter().zip(counts) {
            if matches!(stmt.kind, b'U' | b'D') && n != 1 {
                let what = if stmt.kind == b'U' {
                    "an UPDATE"
                } else {
                    "a DELETE"
                };
                return Err(RestoreError::Replay {
                    commit_lsn: stmt.commit,
                    commit_time: stmt.commit_time,
                    detail: format!(
                        "{what} of {} matched {n} rows instead of 1: the restored data diverged from the source",
                        stmt.rel.as_deref().unwrap_or("?")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The replay sink: the changelog reader hands each transaction to replay here, whole and in
/// commit order; nothing here decides which transactions those are.
impl changelog::ReplaySink for Replayer<'_> {
    type Error = RestoreError;

    fn begin(&mut self, commit_lsn: Lsn, commit_time: PgTimestamp) {
        self.txn = Some((commit_lsn, commit_time));
        self.open_group();
    }

    /// A Relation message: checked against the captured DDL (the schema guard), then the
    /// relation map follows it.
    fn relation(
        &mut self,
        msg: &Message,
        txn: Option<(Lsn, PgTimestamp)>,
        checked: bool,
    ) -> Result<(), RestoreError> {
        if let Some(rel) = RelationInfo::from_message(msg) {
            // Before the backup's point the backup's own columns are authoritative.
            let at = txn.map(|t| t.0.to_string()).unwrap_or_default();
            if let Err(e) = self.guard.relation(&rel, checked, &at) {
                let (commit_lsn, commit_time) = txn.unwrap_or_default();
                return Err(RestoreError::Replay {
                    commit_lsn,
                    commit_time,
                    detail: e.restore_detail(),
                });
            }
            let rel = keep_relation_facts(self.relations.get(&rel.oid), rel);
            self.insert_prefixes.remove(&rel.oid);
            self.relations.insert(rel.oid, rel);
        }
        Ok(())
    }

    async fn change(&mut self, msg: Message) -> Result<(), RestoreError> {
        self.render(msg)?;
        if self.queue_bytes >= BATCH_BYTES {
            self.pump().await?;
        }
        Ok(())
    }

    async fn logical_message(&mut self, msg: Message) -> Result<(), RestoreError> {
        self.logical(msg).await?;
        if self.queue_bytes >= BATCH_BYTES {
            self.pump().await?;
        }
        Ok(())
    }

    async fn commit(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.txn = None;
        self.end_txn(commit_lsn, commit_time).await
    }
}

impl From<changelog::ChangelogError> for RestoreError {
    fn from(e: changelog::ChangelogError) -> RestoreError {
        match e {
            changelog::ChangelogError::Record { seg, detail } => RestoreError::Local {
                what: format!("reading spooled segment {seg}"),
                detail,
            },
            changelog::ChangelogError::Txn {
                commit_lsn,
                commit_time,
                detail,
            } => RestoreError::Replay {
                commit_lsn,
                commit_time,
                detail,
            },
        }
    }
}

/// The restore's verified segments, spooled to local files in order.
struct Spooled<'p>(&'p [std::path::PathBuf]);

impl changelog::Spool<RestoreError> for Spooled<'_> {
    async fn read(&mut self, seg_no: usize) -> Result<Segment, RestoreError> {
        read_spooled(&self.0[seg_no]).await
    }
}

/// Bytes an operation sends (for memory limits).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Simple(sql) => sql.len(),
        Op::Prepared(p) => p.sql.len() + p.param_bytes(),
    }
}

/// Rows of the largest multi-row INSERT for a table of `ncols` columns: a power of two, at
/// most [`INSERT_ROWS`], with at most 65535 parameters.
fn max_insert_rows(ncols: usize) -> usize {
    let mut rows = INSERT_ROWS;
    while rows > 1 && rows * ncols > 65535 {
        rows /= 2;
    }
    rows
}

/// The relations as they stood at the backup, keyed by their source OID: a change after the
/// backup's point may belong to a relation whose Relation message the stream sent earlier.
/// Columns are the manifest's (what pgoutput sends: stored, non-generated, in order); key
/// columns come from the restored replica identity (primary key or chosen index).
async fn relations_at_backup(
    client: &tokio_postgres::Client,
    manifest: &Manifest,
) -> Result<HashMap<u32, RelationInfo>, RestoreError> {
    let mut out = HashMap::new();
    for t in manifest.tables.iter().filter(|t| t.oid != 0) {
        let qualified = format!(
            "{}.{}",
            statement::quote_ident(&t.schema),
            statement::quote_ident(&t.name)
        );
        let row = client
            .query_one(
                "SELECT c.relreplident::text,
                        coalesce((SELECT array_agg(a.attname::text)
                           FROM pg_index i JOIN pg_attribute a
                             ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                          WHERE i.indrelid = c.oid
                            AND CASE c.relreplident WHEN 'i' THEN i.indisreplident
                                                    WHEN 'd' THEN i.indisprimary ELSE false END),
                                 '{}')
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .map_err(|source| RestoreError::TargetQuery {
                what: format!("reading the replica identity of {qualified}"),
                source,
            })?;
        let ident: String = row.get(0);
        let keys: Vec<String> = row.get(1);
        out.insert(
            t.oid,
            RelationInfo {
                oid: t.oid,
                schema: t.schema.clone(),
                name: t.name.clone(),
                replica_identity: ident.bytes().next().unwrap_or(b'd'),
                columns: t
                    .columns
                    .iter()
                    .map(|c| statement::ColumnInfo {
                        name: c.clone(),
                        type_oid: 0,
                        is_key: keys.contains(c),
                    })
                    .collect(),
                partitioned: t.partitioned_root,
            },
        );
    }
    Ok(out)
}

/// A relation described again by the stream, with what the stream does not say carried over
/// from what was known of it (from the base backup): whether it is a partitioned table, whose
/// changes (sent via its root with `publish_via_partition_root`) must not use `ONLY`.
fn keep_relation_facts(known: Option<&RelationInfo>, mut rel: RelationInfo) -> RelationInfo {
    if let Some(known) = known {
        rel.partitioned = known.partitioned;
    }
    rel
}

/// What an operation is, for checking its result and naming it in errors.
struct Stmt {
    kind: u8,
    rel: Option<String>,
    commit: Lsn,
    commit_time: PgTimestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Catalog {
        use crate::catalog::{BackupRef, SegmentFact};
        let seg = |s: u64, e: u64| SegmentRef {
            generation: 1,
            start: Lsn(s),
            end: Lsn(e),
            key: format!("k{s}"),
            size: 1,
        };
        let backup = |id: &str, cp: u64, t: i64| BackupRef {
            id: id.into(),
            generation: 1,
            consistent_point: Lsn(cp),
            snapshot_time: PgTimestamp(t),
        };
        let segments = vec![seg(100, 200), seg(200, 300), seg(300, 400)];
        let facts = [(
            "k300".to_string(),
            SegmentFact::Good {
                latest_commit: Some(PgTimestamp(4000)),
            },
        )]
        .into_iter()
        .collect();
        Catalog::build(
            "repo".into(),
            vec![backup("b1", 100, 1000), backup("b2", 300, 3000)],
            [(1, segments)].into_iter().collect(),
            &facts,
            vec![],
        )
    }

    #[test]
    fn multi_row_inserts_stay_under_the_parameter_limit() {
        assert_eq!(max_insert_rows(1), INSERT_ROWS);
        assert_eq!(max_insert_rows(1000), 64);
        assert_eq!(max_insert_rows(1100), 32);
        assert_eq!(max_insert_rows(1600), 32);
        assert_eq!(max_insert_rows(40000), 1);
        for ncols in [1, 3, 1023, 1024, 1025, 1600] {
            let rows = max_insert_rows(ncols);
            assert!(rows.is_power_of_two() && (rows * ncols <= 65535 || rows == 1));
        }
    }

    #[test]
    fn picks_the_newest_backup_before_the_target() {
        let p = plan(&facts(), Target::Time(PgTimestamp(2000))).unwrap();
        assert_eq!((p.backup_id.as_str(), p.start), ("b1", Lsn(100)));
        assert_eq!(p.segments, ["k100", "k200", "k300"]);
        let p = plan(&facts(), Target::Time(PgTimestamp(3000))).unwrap();
        assert_eq!((p.backup_id.as_str(), p.segments.len()), ("b2", 1));
        let p = plan(&facts(), Target::Latest).unwrap();
        assert_eq!(p.backup_id, "b2");
        let p = plan(&facts(), Target::Lsn(Lsn(250))).unwrap();
        assert_eq!(p.backup_id, "b1");
    }

    #[test]
    fn refuses_targets_the_archive_cannot_prove() {
        let before = plan(&facts(), Target::Time(PgTimestamp(999)))
            .unwrap_err()
            .to_string();
        assert!(
            before.contains("earliest restorable instant is 2000-01-01 00:00:00.001000+00"),
            "{before}"
        );
        // Not yet passed by an archived commit: refused, not moved.
        let after = plan(&facts(), Target::Time(PgTimestamp(4000)))
            .unwrap_err()
            .to_string();
        assert!(
            after.contains("latest is just before 2000-01-01 00:00:00.004000+00"),
            "{after}"
        );
        assert!(plan(&facts(), Target::Lsn(Lsn(401))).is_err());
        assert!(plan(&facts(), Target::Lsn(Lsn(99))).is_err());
        let empty = Catalog::build(
            "repo".into(),
            vec![],
            Default::default(),
            &Default::default(),
            vec![],
        );
        assert!(matches!(
            plan(&empty, Target::Latest),
            Err(RestoreError::Empty(_))
        ));
    }

    /// Two generations (a slot dropped between them) and a hole in the second one.
    fn damaged() -> Catalog {
        use crate::catalog::{BackupRef, SegmentFact};
        let seg = |g: u32, s: u64, e: u64| SegmentRef {
            generation: g,
            start: Lsn(s),
            end: Lsn(e),
            key: format!("g{g}-{s}"),
            size: 1,
        };
        let backup = |g: u32, cp: u64, t: i64| BackupRef {
            id: format!("b{g}-{cp}"),
            generation: g,
            consistent_point: Lsn(cp),
            snapshot_time: PgTimestamp(t),
        };
        let chains: std::collections::BTreeMap<u32, Vec<SegmentRef>> = [
            (1, vec![seg(1, 100, 200), seg(1, 200, 300)]),
            (2, vec![seg(2, 500, 600), seg(2, 700, 800)]),
        ]
        .into_iter()
        .collect();
        let facts = chains
            .values()
            .flatten()
            .map(|s| {
                let t = PgTimestamp(s.end.0 as i64 * 10);
                (
                    s.key.clone(),
                    SegmentFact::Good {
                        latest_commit: Some(t),
                    },
                )
            })
            .collect();
        Catalog::build(
            "repo".into(),
            vec![backup(1, 100, 1000), backup(2, 500, 5000)],
            chains,
            &facts,
            vec![],
        )
    }

    #[test]
    fn targets_in_a_window_restore_and_targets_in_a_hole_are_refused() {
        let cat = damaged();
        let p = plan(&cat, Target::Time(PgTimestamp(2500))).unwrap();
        assert_eq!((p.backup_id.as_str(), p.segments.len()), ("b1-100", 2));
        let p = plan(&cat, Target::Time(PgTimestamp(5500))).unwrap();
        assert_eq!(
            (p.backup_id.as_str(), p.segments.as_slice()),
            ("b2-500", &["g2-500".to_string()][..])
        );
        // Between the generations, and after the hole of generation 2.
        for t in [3500, 7500] {
            let err = plan(&cat, Target::Time(PgTimestamp(t))).unwrap_err();
            assert!(matches!(err, RestoreError::OutOfRange { .. }));
            let msg = err.to_string();
            assert!(msg.contains(&cat.describe()), "{msg}");
            assert!(
                msg.contains("generation 1: --to-time from") && msg.contains("gap"),
                "{msg}"
            );
        }
        assert!(plan(&cat, Target::Lsn(Lsn(650))).is_err());
        assert_eq!(plan(&cat, Target::Lsn(Lsn(250))).unwrap().generation, 1);
        // --latest would skip the hole: refused.
        let err = plan(&cat, Target::Latest).unwrap_err().to_string();
        assert!(err.contains("--latest cannot be restored"), "{err}");
    }
}
