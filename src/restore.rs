//! Point-in-time restore: a pure *plan* (which base backup, which segments, where to stop),
//! then the *apply* (schema, data, replay, sequences, indexes) into an empty database.
//!
//! Stop semantics are PostgreSQL's own `recovery_target_time` / `recovery_target_lsn` with
//! `recovery_target_inclusive = on`: transactions are replayed in commit-LSN order, and replay
//! stops before the first transaction that committed after the target time (or whose commit
//! record lies beyond the target LSN). The result equals a physical PITR of the same cluster.
//!
//! Invariants:
//! * A target the archive cannot prove is refused, never moved: a time before the earliest base
//!   backup, or not yet passed by an archived commit (the server's clock must be seen past it),
//!   names the earliest and latest restorable instants.
//! * Nothing is written to the target before the target is checked empty and every segment the
//!   plan needs has been read and verified (checksums, continuity).
//! * Each source transaction is applied as one target transaction; one that the backup already
//!   holds (commit LSN below the backup's consistent point) is skipped.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tracing::{debug, info};

use crate::backup::{self, LoadPhase, Manifest};
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::repo::{self, SegmentRef};
use crate::segment::{self, Segment};
use crate::statement::{self, RelationInfo};
use crate::store::Store;

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
    #[error("{target} is outside what the archive covers: the earliest restorable instant is {earliest}, the latest is {latest}{lsn_hint}\nHINT: choose a target in that range{latest_hint}")]
    OutOfRange {
        target: Target,
        earliest: String,
        latest: String,
        lsn_hint: String,
        latest_hint: &'static str,
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
    Target(String),
    #[error("replaying the transaction committed at {commit_lsn} ({commit_time}): {detail}")]
    Replay {
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        detail: String,
    },
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

/// Facts about one generation, for planning.
#[derive(Clone, Debug)]
pub struct GenerationFacts {
    pub generation: u32,
    pub backups: Vec<(String, Lsn, PgTimestamp)>,
    pub segments: Vec<SegmentRef>,
    /// Latest commit time archived in this generation (None: no commit yet).
    pub latest_commit: Option<PgTimestamp>,
    pub end: Option<Lsn>,
}

/// Chooses the base backup and segments for `target`. Pure.
pub fn plan(gens: &[GenerationFacts], target: Target) -> Result<Plan, RestoreError> {
    let earliest = gens
        .iter()
        .flat_map(|g| g.backups.iter().map(|b| b.2))
        .min()
        .ok_or_else(|| RestoreError::Empty(String::new()))?;
    let newest = gens
        .iter()
        .filter(|g| !g.backups.is_empty())
        .max_by_key(|g| g.generation);
    let latest = newest.and_then(|g| g.latest_commit);
    let out_of_range = |lsn_hint: String| RestoreError::OutOfRange {
        target,
        earliest: earliest.to_string(),
        latest: match latest {
            Some(t) => format!("just before {t} (the last archived commit)"),
            None => "not yet known (no commit archived since the base backup)".into(),
        },
        lsn_hint,
        latest_hint: ", or --latest",
    };
    // Candidates: (generation, backup) newest first.
    let mut candidates: Vec<(&GenerationFacts, &(String, Lsn, PgTimestamp))> = gens
        .iter()
        .flat_map(|g| g.backups.iter().map(move |b| (g, b)))
        .collect();
    candidates.sort_by_key(|(g, b)| std::cmp::Reverse((g.generation, b.1)));
    let chosen = match target {
        Target::Latest => candidates.first().copied(),
        Target::Time(t) => candidates.iter().copied().find(|(_, b)| b.2 <= t),
        Target::Lsn(l) => candidates.iter().copied().find(|(_, b)| b.1 <= l),
    };
    let lsn_range = || {
        let lo = gens
            .iter()
            .flat_map(|g| g.backups.iter().map(|b| b.1))
            .min()
            .unwrap_or_default();
        let hi = newest.and_then(|g| g.end).unwrap_or(lo);
        format!(" (LSN {lo} to {hi})")
    };
    let Some((g, b)) = chosen else {
        return Err(out_of_range(lsn_range()));
    };
    // The target must be provably inside this generation's archived stream.
    match target {
        Target::Time(t) => {
            if g.latest_commit.is_none_or(|lc| t >= lc) {
                return Err(out_of_range(String::new()));
            }
        }
        Target::Lsn(l) => {
            if g.end.is_none_or(|e| l > e) && b.1 != l {
                return Err(out_of_range(lsn_range()));
            }
        }
        Target::Latest => {}
    }
    let segments: Vec<String> = g
        .segments
        .iter()
        .filter(|s| s.end > b.1)
        .map(|s| s.key.clone())
        .collect();
    Ok(Plan {
        backup_id: b.0.clone(),
        generation: g.generation,
        start: b.1,
        target: target.to_string(),
        segments,
        earliest,
        latest,
    })
}

/// Reads what planning needs from the repository.
pub async fn gather(
    store: &Arc<dyn Store>,
) -> Result<(Vec<GenerationFacts>, Vec<Manifest>), RestoreError> {
    let manifests = backup::list_manifests(store).await?;
    let chains = repo::list_segments(store).await?;
    let mut gens: BTreeMap<u32, GenerationFacts> = BTreeMap::new();
    for m in &manifests {
        gens.entry(m.generation)
            .or_insert_with(|| empty_facts(m.generation))
            .backups
            .push((m.id.clone(), m.consistent_point, m.snapshot_time));
    }
    for (generation, chain) in chains {
        let facts = gens
            .entry(generation)
            .or_insert_with(|| empty_facts(generation));
        facts.end = repo::check_chain(&chain)?;
        // The latest commit: walk back from the end to the last segment with a commit.
        for s in chain.iter().rev() {
            let bytes = store.get(&s.key).await?;
            let (_, commits) = segment::read_info(&bytes).map_err(|e| RestoreError::Corrupt {
                range: s.range(),
                start: s.start,
                detail: e.to_string(),
            })?;
            if let Some(t) = commits.iter().map(|c| c.commit_time).max() {
                facts.latest_commit = Some(t);
                break;
            }
        }
        facts.segments = chain;
    }
    Ok((gens.into_values().collect(), manifests))
}

fn empty_facts(generation: u32) -> GenerationFacts {
    GenerationFacts {
        generation,
        backups: vec![],
        segments: vec![],
        latest_commit: None,
        end: None,
    }
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreSummary {
    pub backup_id: String,
    pub transactions_replayed: u64,
    pub last_commit_lsn: Option<Lsn>,
    pub last_commit_time: Option<PgTimestamp>,
    pub seconds: f64,
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
    if manifests.is_empty() {
        return Err(RestoreError::Empty(store.location()));
    }
    let plan = plan(&gens, to)?;
    let manifest = manifests
        .iter()
        .find(|m| m.id == plan.backup_id)
        .expect("the plan chose a listed backup");
    info!(backup = %plan.backup_id, start = %plan.start, segments = plan.segments.len(), target = %plan.target, "restore plan");

    let client = target_info
        .connect()
        .await
        .map_err(|e| RestoreError::Target(e.to_string()))?;
    check_empty(&client, target_info).await?;

    // Read and verify every segment before writing anything.
    let spool =
        tempfile::tempdir().map_err(|e| RestoreError::Target(format!("temporary folder: {e}")))?;
    let verified = fetch_and_verify(store, &gens, &plan, to, spool.path()).await?;

    backup::load(store, manifest, target_info, parallel, LoadPhase::PreData).await?;
    backup::load(store, manifest, target_info, parallel, LoadPhase::Data).await?;
    backup::load(store, manifest, target_info, parallel, LoadPhase::Keys).await?;
    // Replayed DDL may name any object of the backup (DROP INDEX, RENAME COLUMN of an indexed
    // column…): with DDL in the archive, every post-data object exists before replay.
    let post_data_first = crate::ddl::segments_have_ddl(&verified)
        .await
        .map_err(RestoreError::Target)?;
    if post_data_first {
        backup::load(store, manifest, target_info, parallel, LoadPhase::PostData).await?;
    }

    let mut replayer = Replayer::new(&client, manifest, plan.start, to).await?;
    replayer.spool = verified.clone();
    for (seg_no, path) in verified.iter().enumerate() {
        let seg = read_spooled(path).await?;
        if !replayer.apply_segment(&seg, seg_no).await? {
            break;
        }
    }
    replayer.flush().await?;

    // Sequences: the backed-up values were set with the data; replay moved them as the source
    // did (recorded values from the archiver's `tidemark.sequences` messages, TRUNCATE …
    // RESTART IDENTITY); now each is raised past every value in the columns it feeds.
    if post_data_first {
        backup::raise_sequences(target_info)
            .await
            .map_err(RestoreError::from)?;
    } else {
        backup::load(store, manifest, target_info, parallel, LoadPhase::PostData).await?;
    }
    let summary = RestoreSummary {
        backup_id: plan.backup_id,
        transactions_replayed: replayer.applied,
        last_commit_lsn: replayer.last_commit.map(|c| c.0),
        last_commit_time: replayer.last_commit.map(|c| c.1),
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(?summary, "restore complete");
    Ok(summary)
}

async fn check_empty(client: &tokio_postgres::Client, info: &ConnInfo) -> Result<(), RestoreError> {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(string_agg(format('%I.%I', n.nspname, c.relname), ', '), '')
               FROM (SELECT * FROM pg_class LIMIT 1000) c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                AND n.nspname NOT LIKE 'pg\\_temp%' AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await
        .map_err(|e| RestoreError::Target(e.to_string()))?;
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

/// Downloads the planned segments (several at once), verifies each completely and checks that
/// they continue each other from the backup's position; returns the spooled files in order.
async fn fetch_and_verify(
    store: &Arc<dyn Store>,
    gens: &[GenerationFacts],
    plan: &Plan,
    target: Target,
    spool: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, RestoreError> {
    let refs: HashMap<&str, &SegmentRef> = gens
        .iter()
        .flat_map(|g| g.segments.iter())
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
        tokio::fs::write(&path, &bytes).await.map_err(|e| {
            RestoreError::Target(format!("spooling a segment to {}: {e}", path.display()))
        })?;
        out.push(path);
        // Replay stops in this segment: later ones are not needed.
        let stops_here = match target {
            Target::Time(t) => seg
                .commits
                .iter()
                .any(|c| c.commit_lsn >= plan.start && c.commit_time > t),
            Target::Lsn(l) => r.end > l,
            Target::Latest => false,
        };
        if stops_here {
            break;
        }
    }
    debug!(segments = out.len(), "segments verified");
    Ok(out)
}

/// Reads back a segment the restore fetched, verified and spooled.
async fn read_spooled(path: &std::path::Path) -> Result<Segment, RestoreError> {
    let bytes = tokio::fs::read(path).await.map_err(|e| {
        RestoreError::Target(format!(
            "reading the spooled segment {}: {e}",
            path.display()
        ))
    })?;
    Segment::parse(Bytes::from(bytes)).map_err(|e| RestoreError::Target(e.to_string()))
}

/// Applies decoded transactions to the target, batching several per round trip.
struct Replayer<'a> {
    client: &'a tokio_postgres::Client,
    relations: HashMap<u32, RelationInfo>,
    start: Lsn,
    target: Target,
    batch: String,
    /// One entry per statement in `batch`, to check each one's row count.
    statements: Vec<Stmt>,
    txn: Option<(Lsn, PgTimestamp)>,
    applied: u64,
    last_commit: Option<(Lsn, PgTimestamp)>,
    stopped: bool,
    /// Checks that every change of a table's columns is explained by a replayed DDL message.
    guard: crate::ddl::SchemaGuard,
    /// The spooled segments, in order, for re-reading the chunks of streamed transactions.
    spool: Vec<std::path::PathBuf>,
    /// Where the chunks of streamed transactions not yet committed lie.
    chunks: Chunks,
    /// The spooled segment last read for a streamed transaction (by number).
    cached: Option<(usize, Segment)>,
    /// The current transaction is a duplicate of one already applied: render nothing.
    skip_txn: bool,
    /// The batch's trailing INSERT: its text up to the VALUES list, and the batch length
    /// right after it (another INSERT with the same prefix is folded into it).
    open_insert: Option<(String, usize)>,
}

/// The chunks of the streamed transactions not yet committed or aborted, by position in the
/// spool, never their rows: each record of a chunk is noted as part of a run of consecutive
/// records of one (sub)transaction, and read again at the transaction's Stream Commit.
///
/// A chunk with the first-segment flag starts the transaction afresh: the server streams an
/// in-progress transaction again from its start after the archiver reconnected, so chunks an
/// earlier connection wrote are superseded, never applied twice. A chunk cut by a disconnection
/// (no Stream Stop) ends at the next Begin, Commit or Stream Start.
#[derive(Debug, Default)]
struct Chunks {
    streams: HashMap<u32, StreamedTxn>,
    /// Top-level xid of the chunk being read.
    in_chunk: Option<u32>,
}

/// What [`Chunks::note`] made of a message.
#[derive(Debug)]
enum Noted {
    /// Not part of a streamed transaction.
    Other,
    /// Noted.
    Done,
    /// A Stream Commit: the transaction's chunks.
    Commit {
        xid: u32,
        txn: StreamedTxn,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    },
}

impl Chunks {
    /// Notes message `msg`, record `index` of spooled segment `seg_no`.
    fn note(&mut self, msg: &Message, seg_no: usize, index: u64) -> Noted {
        match msg {
            Message::StreamStart { xid, first_segment } => {
                if *first_segment {
                    self.streams.insert(
                        *xid,
                        StreamedTxn {
                            whole: true,
                            ..StreamedTxn::default()
                        },
                    );
                } else {
                    self.streams.entry(*xid).or_default();
                }
                self.in_chunk = Some(*xid);
            }
            Message::StreamStop => self.in_chunk = None,
            Message::StreamAbort { xid, subxid, .. } => {
                self.in_chunk = None;
                if xid == subxid {
                    self.streams.remove(xid);
                } else if let Some(t) = self.streams.get_mut(xid) {
                    t.aborted.insert(*subxid);
                }
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                commit_time,
                ..
            } => {
                self.in_chunk = None;
                return Noted::Commit {
                    xid: *xid,
                    txn: self.streams.remove(xid).unwrap_or_default(),
                    commit_lsn: *commit_lsn,
                    commit_time: *commit_time,
                };
            }
            Message::Begin { .. } | Message::Commit { .. } => {
                self.in_chunk = None;
                return Noted::Other;
            }
            other => {
                let Some(top) = self.in_chunk else {
                    return Noted::Other;
                };
                let xid = match other {
                    Message::Relation { xid, .. }
                    | Message::Type { xid, .. }
                    | Message::Insert { xid, .. }
                    | Message::Update { xid, .. }
                    | Message::Delete { xid, .. }
                    | Message::Truncate { xid, .. }
                    | Message::Message { xid, .. } => xid.unwrap_or(top),
                    _ => top,
                };
                self.streams.entry(top).or_default().add(seg_no, index, xid);
            }
        }
        Noted::Done
    }
}

/// Where the chunks of one streamed transaction lie in the spooled segments.
#[derive(Debug, Default)]
struct StreamedTxn {
    /// A chunk with the first-segment flag was seen: the runs hold the whole transaction.
    whole: bool,
    runs: Vec<ChunkRun>,
    /// Subtransactions rolled back (Stream Abort with a subxid): their changes are skipped.
    aborted: std::collections::HashSet<u32>,
}

/// Consecutive records `first..=last` of spooled segment `seg`, all of (sub)transaction `xid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkRun {
    seg: usize,
    first: u64,
    last: u64,
    xid: u32,
}

impl StreamedTxn {
    fn add(&mut self, seg: usize, index: u64, xid: u32) {
        if let Some(r) = self.runs.last_mut() {
            if r.seg == seg && r.last + 1 == index && r.xid == xid {
                r.last = index;
                return;
            }
        }
        self.runs.push(ChunkRun {
            seg,
            first: index,
            last: index,
            xid,
        });
    }
}

const BATCH_BYTES: usize = 1 << 20;

impl<'a> Replayer<'a> {
    async fn new(
        client: &'a tokio_postgres::Client,
        manifest: &Manifest,
        start: Lsn,
        target: Target,
    ) -> Result<Replayer<'a>, RestoreError> {
        client
            .batch_execute(
                "SET synchronous_commit = off; SET extra_float_digits = 3; SET DateStyle = ISO;
                 SET IntervalStyle = postgres; SET TimeZone = 'UTC'; SET bytea_output = hex;
                 SET search_path = pg_catalog; SET lc_monetary = 'C';",
            )
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?;
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
            start,
            target,
            batch: String::new(),
            statements: Vec::new(),
            txn: None,
            applied: 0,
            last_commit: None,
            stopped: false,
            guard,
            spool: Vec::new(),
            chunks: Chunks::default(),
            cached: None,
            skip_txn: false,
            open_insert: None,
        })
    }

    /// Applies one segment (number `seg_no` of the spool); returns false once the target is
    /// reached.
    async fn apply_segment(&mut self, seg: &Segment, seg_no: usize) -> Result<bool, RestoreError> {
        for (index, rec) in seg.records().enumerate() {
            let rec = rec.map_err(|e| RestoreError::Target(e.to_string()))?;
            let msg =
                pgoutput::decode(&rec.payload, self.chunks.in_chunk.is_some()).map_err(|e| {
                    RestoreError::Replay {
                        commit_lsn: self.txn.map(|t| t.0).unwrap_or(rec.lsn),
                        commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
                        detail: format!("undecodable record at {}: {e}", rec.lsn),
                    }
                })?;
            if self.stream_message(&msg, seg_no, index as u64).await? {
                if self.stopped {
                    return Ok(false);
                }
                continue;
            }
            self.apply(msg).await?;
            if self.stopped {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn apply(&mut self, msg: Message) -> Result<(), RestoreError> {
        match msg {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                // Chunks an earlier run streamed of this transaction are superseded: the server
                // sent it whole this time.
                self.chunks.streams.remove(&xid);
                let past = match self.target {
                    Target::Time(t) => commit_time > t,
                    Target::Lsn(l) => final_lsn > l,
                    Target::Latest => false,
                };
                if past {
                    self.stopped = true;
                    return Ok(());
                }
                self.txn = Some((final_lsn, commit_time));
                self.skip_txn = self.already_applied(final_lsn);
                if final_lsn >= self.start && !self.skip_txn {
                    self.batch.push_str("BEGIN;\n");
                    self.statements.push(Stmt {
                        kind: b'B',
                        rel: None,
                        commit: final_lsn,
                    });
                }
            }
            Message::Commit {
                commit_lsn,
                commit_time,
                ..
            } => {
                let Some((final_lsn, _)) = self.txn.take() else {
                    return Err(self.replay_err("Commit without Begin"));
                };
                if final_lsn >= self.start && !std::mem::take(&mut self.skip_txn) {
                    self.commit(commit_lsn, commit_time).await?;
                }
            }
            Message::Relation { .. } => self.relation(&msg)?,
            Message::Message { .. } => self.logical_message(msg).await?,
            other => {
                let Some((final_lsn, _)) = self.txn else {
                    return Ok(());
                };
                if final_lsn < self.start || self.skip_txn {
                    return Ok(());
                }
                self.render(other)?;
            }
        }
        Ok(())
    }

    /// A logical message: tidemark's DDL runs at this point of the transaction, recorded
    /// sequence values are set here (then raised past the columns' values after replay); others
    /// (heartbeats, applications' own) change nothing.
    async fn logical_message(&mut self, msg: Message) -> Result<(), RestoreError> {
        let Message::Message {
            prefix, content, ..
        } = msg
        else {
            return Ok(());
        };
        let active = self.txn.is_some_and(|t| t.0 >= self.start);
        let decoded = match crate::ddl::decode_message(&prefix, &content) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) if active => return Err(self.replay_err(&e.to_string())),
            Err(_) => return Ok(()),
        };
        let Some((commit, _)) = self.txn.filter(|_| active) else {
            return Ok(());
        };
        if let crate::ddl::TidemarkMessage::Ddl(_) = decoded {
            self.guard.ddl();
        }
        let statements: Vec<String> = match decoded {
            crate::ddl::TidemarkMessage::Ddl(d) => {
                let statements =
                    crate::ddl::plan_replay(&d).map_err(|e| self.replay_err(&e.to_string()))?;
                // Run on their own (inside the open transaction) so a failure names the
                // statement.
                self.send_batch().await?;
                for sql in &statements {
                    if let Err(e) = self.client.simple_query(sql).await {
                        return Err(self.replay_err(&format!(
                            "the schema change {sql:?} failed on the target: {}\nHINT: the target may lack something the source had (an extension, a role, a tablespace…): provide it and restore again, or restore to an instant before this transaction",
                            crate::source::error_chain(&e)
                        )));
                    }
                }
                return Ok(());
            }
            crate::ddl::TidemarkMessage::Sequences(s) => {
                crate::ddl::setval_sql(&s.sequences).into_iter().collect()
            }
        };
        for sql in statements {
            self.batch.push_str(&sql);
            self.batch.push_str(";\n");
            self.statements.push(Stmt {
                kind: b'M',
                rel: None,
                commit,
            });
        }
        Ok(())
    }

    /// A transaction committed at or before the last one applied is a duplicate.
    fn already_applied(&self, commit_lsn: Lsn) -> bool {
        self.last_commit.is_some_and(|(l, _)| commit_lsn <= l)
    }

    /// Handles the messages of streamed transactions (see [`Chunks`]); returns false for any
    /// other message.
    async fn stream_message(
        &mut self,
        msg: &Message,
        seg_no: usize,
        index: u64,
    ) -> Result<bool, RestoreError> {
        let (xid, t, commit_lsn, commit_time) = match self.chunks.note(msg, seg_no, index) {
            Noted::Other => return Ok(false),
            Noted::Done => return Ok(true),
            Noted::Commit {
                xid,
                txn,
                commit_lsn,
                commit_time,
            } => (xid, txn, commit_lsn, commit_time),
        };
        let past = match self.target {
            Target::Time(target) => commit_time > target,
            Target::Lsn(l) => commit_lsn > l,
            Target::Latest => false,
        };
        if past {
            self.stopped = true;
        } else if commit_lsn >= self.start && !self.already_applied(commit_lsn) {
            if !t.whole {
                return Err(RestoreError::Replay {
                    commit_lsn,
                    commit_time,
                    detail: format!(
                        "the streamed transaction {xid} began before the base backup's position {}; its first changes are in segments before it\nHINT: restore from an earlier base backup (a target before this backup's time, or from a repository that still holds it)",
                        self.start
                    ),
                });
            }
            self.apply_streamed(t, commit_lsn, commit_time).await?;
        }
        Ok(true)
    }

    /// Applies a committed streamed transaction, reading its chunks again from the spool.
    /// Relation messages are taken from every chunk (also of rolled-back subtransactions: the
    /// server does not send them again); changes of rolled-back subtransactions are skipped.
    async fn apply_streamed(
        &mut self,
        t: StreamedTxn,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.txn = Some((commit_lsn, commit_time));
        self.batch.push_str("BEGIN;\n");
        self.statements.push(Stmt {
            kind: b'B',
            rel: None,
            commit: commit_lsn,
        });
        let mut i = 0;
        while i < t.runs.len() {
            let seg_no = t.runs[i].seg;
            let seg = match self.cached.take() {
                Some((n, seg)) if n == seg_no => seg,
                _ => read_spooled(&self.spool[seg_no]).await?,
            };
            let (records, at) = seg.records_from(t.runs[i].first);
            let mut records = records.zip(at..);
            while i < t.runs.len() && t.runs[i].seg == seg_no {
                let run = t.runs[i];
                let skip_changes = t.aborted.contains(&run.xid);
                for (rec, idx) in records.by_ref() {
                    if idx < run.first {
                        continue;
                    }
                    let rec = rec.map_err(|e| RestoreError::Target(e.to_string()))?;
                    let msg = pgoutput::decode(&rec.payload, true).map_err(|e| {
                        self.replay_err(&format!("undecodable record at {}: {e}", rec.lsn))
                    })?;
                    match msg {
                        // Kept even from an aborted subtransaction: the server does not send
                        // a relation again.
                        Message::Relation { .. } => self.relation(&msg)?,
                        Message::Message { .. } if !skip_changes => {
                            self.logical_message(msg).await?
                        }
                        other if !skip_changes => self.render(other)?,
                        _ => {}
                    }
                    if self.batch.len() >= BATCH_BYTES {
                        self.send_batch().await?;
                    }
                    if idx >= run.last {
                        break;
                    }
                }
                i += 1;
            }
            drop(records);
            self.cached = Some((seg_no, seg));
        }
        self.txn = None;
        self.commit(commit_lsn, commit_time).await
    }

    /// Ends the replayed transaction (outside `self.txn`), sending the batch once it is large.
    async fn commit(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.batch.push_str("COMMIT;\n");
        self.statements.push(Stmt {
            kind: b'C',
            rel: None,
            commit: commit_lsn,
        });
        self.applied += 1;
        self.last_commit = Some((commit_lsn, commit_time));
        if self.batch.len() >= BATCH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// A Relation message: checked against the captured DDL (the schema guard), then the
    /// relation map follows it.
    fn relation(&mut self, msg: &Message) -> Result<(), RestoreError> {
        if let Some(rel) = RelationInfo::from_message(msg) {
            // Before the backup's point the backup's own columns are authoritative.
            let check = self.txn.is_some_and(|t| t.0 >= self.start);
            let at = self.txn.map(|t| t.0.to_string()).unwrap_or_default();
            if let Err(e) = self.guard.relation(&rel, check, &at) {
                return Err(self.replay_err(&e.restore_detail()));
            }
            let rel = keep_relation_facts(self.relations.get(&rel.oid), rel);
            self.relations.insert(rel.oid, rel);
        }
        Ok(())
    }

    /// Appends one rendered INSERT, folding it into the batch's trailing INSERT into the same
    /// relation (a multi-row INSERT): replaying a large transaction row by row is too slow.
    fn push_insert(&mut self, one: &str, rel: Option<String>) {
        const MARK: &str = " OVERRIDING SYSTEM VALUE VALUES ";
        if let Some((prefix, end)) = &self.open_insert {
            if *end == self.batch.len() && one.starts_with(prefix.as_str()) {
                self.batch.pop(); // the trailing ';'
                self.batch.push(',');
                self.batch.push_str(&one[prefix.len()..]);
                self.open_insert = Some((prefix.clone(), self.batch.len()));
                return;
            }
        }
        self.batch.push_str(one);
        self.statements.push(Stmt {
            kind: b'I',
            rel,
            commit: self.txn.map(|t| t.0).unwrap_or_default(),
        });
        self.open_insert = match one.find(MARK) {
            Some(i) if one.ends_with(';') => {
                Some((one[..i + MARK.len()].to_string(), self.batch.len()))
            }
            _ => None,
        };
    }

    fn rel(&self, relid: u32) -> Result<&RelationInfo, RestoreError> {
        self.relations.get(&relid).ok_or_else(|| {
            self.replay_err(&format!(
                "a change to relation {relid}, which the archive never described"
            ))
        })
    }

    fn render(&mut self, msg: Message) -> Result<(), RestoreError> {
        if let Message::Insert { relid, new, .. } = &msg {
            let rel = self.rel(*relid)?;
            let mut one = String::new();
            statement::render_insert(rel, new, &mut one)
                .map_err(|e| self.replay_err(&e.to_string()))?;
            let name = rel.qualified_name();
            self.push_insert(&one, Some(name));
            return Ok(());
        }
        let mut out = std::mem::take(&mut self.batch);
        let before = out.len();
        let kind = msg.tag() as u8;
        let relid = match &msg {
            Message::Insert { relid, .. }
            | Message::Update { relid, .. }
            | Message::Delete { relid, .. } => Some(*relid),
            _ => None,
        };
        let r: Result<(), String> = match &msg {
            Message::Insert { relid, new, .. } => {
                let rel = self.rel(*relid)?;
                statement::render_insert(rel, new, &mut out).map_err(|e| e.to_string())
            }
            Message::Update {
                relid, old, new, ..
            } => {
                let rel = self.rel(*relid)?;
                statement::render_update(rel, old.as_ref(), new, &mut out)
                    .map_err(|e| e.to_string())
            }
            Message::Delete { relid, old, .. } => {
                let rel = self.rel(*relid)?;
                statement::render_delete(rel, old, &mut out).map_err(|e| e.to_string())
            }
            Message::Truncate {
                options, relids, ..
            } => {
                let rels: Result<Vec<&RelationInfo>, _> =
                    relids.iter().map(|r| self.rel(*r)).collect();
                statement::render_truncate(&rels?, *options, &mut out);
                Ok(())
            }
            // Type, Origin and logical messages (heartbeats) change no rows.
            _ => Ok(()),
        };
        self.batch = out;
        r.map_err(|d| self.replay_err(&d))?;
        if self.batch.len() > before {
            let rel = relid
                .and_then(|r| self.relations.get(&r))
                .map(|r| r.qualified_name());
            self.statements.push(Stmt {
                kind,
                rel,
                commit: self.txn.map(|t| t.0).unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn replay_err(&self, detail: &str) -> RestoreError {
        RestoreError::Replay {
            commit_lsn: self.txn.map(|t| t.0).unwrap_or_default(),
            commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
            detail: detail.to_string(),
        }
    }

    /// Sends the batched whole transactions and checks that every UPDATE and DELETE touched
    /// exactly one row: anything else means the target diverged from the source.
    async fn flush(&mut self) -> Result<(), RestoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.txn.is_some() {
            return Err(self.replay_err("internal: flush inside a transaction"));
        }
        self.send_batch().await
    }

    /// Sends what is batched, which may end inside the open transaction (the server keeps it
    /// open), and checks the row counts.
    async fn send_batch(&mut self) -> Result<(), RestoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.open_insert = None;
        let sql = std::mem::take(&mut self.batch);
        let statements = std::mem::take(&mut self.statements);
        let results = self
            .client
            .simple_query(&sql)
            .await
            .map_err(|e| RestoreError::Replay {
                commit_lsn: self
                    .txn
                    .or(self.last_commit)
                    .map(|c| c.0)
                    .unwrap_or_default(),
                commit_time: self
                    .txn
                    .or(self.last_commit)
                    .map(|c| c.1)
                    .unwrap_or_default(),
                detail: format!(
                    "the target refused a batch of transactions ending with this one: {}",
                    crate::source::error_chain(&e)
                ),
            })?;
        let counts = results.iter().filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        for (stmt, n) in statements.iter().zip(counts) {
            if matches!(stmt.kind, b'U' | b'D') && n != 1 {
                let what = if stmt.kind == b'U' {
                    "an UPDATE"
                } else {
                    "a DELETE"
                };
                return Err(RestoreError::Replay {
                    commit_lsn: stmt.commit,
                    commit_time: PgTimestamp::default(),
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
            .map_err(|e| {
                RestoreError::Target(format!("reading the replica identity of {qualified}: {e}"))
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

/// A statement of a batch, for checking its result.
struct Stmt {
    kind: u8,
    rel: Option<String>,
    commit: Lsn,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Vec<GenerationFacts> {
        let seg = |s: u64, e: u64| SegmentRef {
            generation: 1,
            start: Lsn(s),
            end: Lsn(e),
            key: format!("k{s}"),
            size: 1,
        };
        vec![GenerationFacts {
            generation: 1,
            backups: vec![
                ("b1".into(), Lsn(100), PgTimestamp(1000)),
                ("b2".into(), Lsn(300), PgTimestamp(3000)),
            ],
            segments: vec![seg(100, 200), seg(200, 300), seg(300, 400)],
            latest_commit: Some(PgTimestamp(4000)),
            end: Some(Lsn(400)),
        }]
    }

    fn ins(xid: u32) -> Message {
        Message::Insert {
            xid: Some(xid),
            relid: 1,
            new: pgoutput::TupleData(vec![]),
        }
    }

    fn start(xid: u32, first_segment: bool) -> Message {
        Message::StreamStart { xid, first_segment }
    }

    fn commit(xid: u32) -> Message {
        Message::StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: PgTimestamp(1),
        }
    }

    /// Feeds (segment, messages) and returns the runs of each Stream Commit.
    fn feed(input: &[(usize, Vec<Message>)]) -> Vec<(u32, StreamedTxn)> {
        let mut c = Chunks::default();
        let mut out = Vec::new();
        for (seg, msgs) in input {
            for (i, m) in msgs.iter().enumerate() {
                if let Noted::Commit { xid, txn, .. } = c.note(m, *seg, i as u64) {
                    out.push((xid, txn));
                }
            }
        }
        out
    }

    fn run(seg: usize, first: u64, last: u64, xid: u32) -> ChunkRun {
        ChunkRun {
            seg,
            first,
            last,
            xid,
        }
    }

    #[test]
    fn restreamed_chunks_supersede_the_earlier_connection() {
        let out = feed(&[
            // Connection 1: a chunk of 7, cut by the disconnection (no Stream Stop).
            (0, vec![start(7, true), ins(7), ins(7)]),
            // Connection 2: 7 again from its first chunk, a small transaction between chunks,
            // a subtransaction (8) rolled back, and the commit.
            (
                1,
                vec![
                    start(7, true),
                    ins(7),
                    ins(7),
                    Message::StreamStop,
                    Message::Begin {
                        final_lsn: Lsn(5),
                        commit_time: PgTimestamp(1),
                        xid: 9,
                    },
                    start(7, false),
                    ins(8),
                    ins(8),
                    Message::StreamStop,
                ],
            ),
            (
                2,
                vec![
                    Message::StreamAbort {
                        xid: 7,
                        subxid: 8,
                        abort: None,
                    },
                    start(7, false),
                    ins(7),
                    Message::StreamStop,
                    commit(7),
                ],
            ),
        ]);
        assert_eq!(out.len(), 1);
        let (xid, t) = &out[0];
        assert_eq!(*xid, 7);
        assert!(t.whole);
        assert_eq!(t.runs, [run(1, 1, 2, 7), run(1, 6, 7, 8), run(2, 2, 2, 7)]);
        assert!(t.aborted.contains(&8));
    }

    #[test]
    fn aborted_and_partial_streams_are_dropped_or_flagged() {
        let out = feed(&[
            (0, vec![start(7, true), ins(7), Message::StreamStop]),
            (
                1,
                vec![
                    Message::StreamAbort {
                        xid: 7,
                        subxid: 7,
                        abort: None,
                    },
                    // A transaction whose first chunk this restore did not read.
                    start(11, false),
                    ins(11),
                    Message::StreamStop,
                    commit(11),
                    // A stream commit of an aborted transaction never comes; 7 is gone.
                    commit(7),
                ],
            ),
        ]);
        assert_eq!(out.len(), 2);
        assert!(!out[0].1.whole, "11 began before what was read");
        assert!(out[1].1.runs.is_empty() && !out[1].1.whole);
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
        assert!(matches!(
            plan(&[], Target::Latest),
            Err(RestoreError::Empty(_))
        ));
    }
}
