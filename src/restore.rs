//! Point-in-time restore: a pure *plan*, then the *apply* (schema, data, replay, sequences,
//! indexes) into an empty database.
//!
//! The plan is a path chosen over the [`crate::catalog`]'s windows: base backup → incremental
//! backups (none exist yet: an empty step) → the tail of segments → the stop point, each step
//! naming the catalog's objects ([`BackupRef`], [`IncrementalRef`], [`SegmentRef`]).
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

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use tracing::{debug, info};

use crate::backup::{self, LoadPhase, Manifest};
use crate::catalog::{identity, BackupRef, Catalog, IncrementalRef, RepoError, SegmentRef, Window};
use crate::changelog;
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::segment::Segment;
use crate::store::{Store, ThawTier};

mod replay;
mod target;
pub mod thaw;
use replay::Replayer;
pub use target::MARKER_TABLE;

pub use crate::changelog::Target;

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
    #[error("repository {location} has no usable base backup {id:?}\nHINT: `tidemark list --repo …` shows the backups; {known}")]
    UnknownBackup {
        location: String,
        id: String,
        /// The ids there are, or that there are none.
        known: String,
    },
    #[error("base backup {backup} of {location} is in cold storage: {count} of its objects must be thawed before they can be read: {listed}\nHINT: thaw them and restore (a standard thaw takes hours; expedited minutes, bulk is the cheapest): {command}")]
    Cold {
        backup: String,
        location: String,
        count: usize,
        /// The first cold objects, each with its class.
        listed: String,
        /// This restore with `--thaw standard`.
        command: String,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("repository: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A segment that does not decode (a store error converts to [`RestoreError::Store`]).
    #[error(transparent)]
    Object(crate::object::ObjectError),
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
            RestoreError::Empty(_) | RestoreError::Cold { .. } => Repository,
            RestoreError::OutOfRange { .. } | RestoreError::UnknownBackup { .. } => OutOfRange,
            RestoreError::TargetNotEmpty(..) | RestoreError::TargetQuery { .. } => Database,
            RestoreError::TargetConnect(e) => e.exit_status(),
            RestoreError::Corrupt { .. } => Damaged,
            RestoreError::Repo(e) => e.exit_status(),
            RestoreError::Store(e) => e.exit_status(),
            RestoreError::Object(e) => e.exit_status(),
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

impl From<crate::object::ObjectError> for RestoreError {
    fn from(e: crate::object::ObjectError) -> RestoreError {
        match e {
            crate::object::ObjectError::Store(e) => RestoreError::Store(e),
            e => RestoreError::Object(e),
        }
    }
}

/// What a restore will do, computed without touching the target: a path through the catalog,
/// from a base backup through the incremental backups on top of it and the tail of segments
/// after them, to the stop point. Every step names the catalog's own objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub generation: u32,
    /// Where the path starts: the base backup loaded first.
    pub base: BackupRef,
    /// The incremental backups loaded on top of the base, in order (none exist yet: the type
    /// has no values, so this step is always empty until incremental backups come).
    pub incrementals: Vec<IncrementalRef>,
    /// The segments replayed after the base and incrementals, in LSN order: the window's
    /// segments that end after [`Plan::start`].
    pub tail: Vec<SegmentRef>,
    /// Where replay stops.
    #[serde(serialize_with = "as_text")]
    pub stop: Target,
    /// The chosen window's earliest instant and last archived commit.
    pub earliest: PgTimestamp,
    pub latest: Option<PgTimestamp>,
}

impl Plan {
    /// Where replay starts: the position of the last backup on the path.
    pub fn start(&self) -> Lsn {
        match self.incrementals.last() {
            Some(i) => match *i {},
            None => self.base.consistent_point,
        }
    }
}

fn as_text<S: serde::Serializer>(t: &Target, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

/// Chooses the path to `target` inside one of the catalog's windows, or at one of its points.
/// Pure.
///
/// A time is restorable in a window from its first backup's snapshot time to just before its
/// last archived commit; an LSN from its first backup's position to its end. The newest window
/// holding the target is used, and in it the newest backup at or before the target. A time
/// that is exactly a point's instant restores that backup with no replay. A target in no
/// window and at no point (in a hole, after damage, pruned, beyond the archive) is refused,
/// naming the windows and the nearest restorable instants before and after it.
pub fn plan(cat: &Catalog, target: Target) -> Result<Plan, RestoreError> {
    if cat.is_empty() {
        return Err(RestoreError::Empty(cat.location.clone()));
    }
    if let Target::Time(t) = target {
        if !cat.windows.iter().any(|w| w.holds_time(t)) {
            if let Some(b) = cat.point_at_time(t) {
                return Ok(point_plan(b));
            }
        }
    }
    let (window, base) = choose_base(cat, target).map_err(|why| refuse(cat, target, why))?;
    let mut path = Plan {
        generation: window.generation,
        base: base.clone(),
        // The catalog lists no incremental backups yet (`IncrementalRef` has no values).
        incrementals: Vec::new(),
        tail: Vec::new(),
        stop: target,
        earliest: window.earliest,
        latest: window.latest_commit,
    };
    path.tail = segment_tail(window, path.start());
    Ok(path)
}

/// The path to exactly backup `id`'s own instant: the backup alone, nothing replayed (inside
/// a window too). Pure.
pub fn plan_backup(cat: &Catalog, id: &str) -> Result<Plan, RestoreError> {
    match cat.backups.iter().find(|b| b.id == id) {
        Some(b) => Ok(point_plan(b)),
        None => Err(RestoreError::UnknownBackup {
            location: cat.location.clone(),
            id: id.to_string(),
            known: if cat.backups.is_empty() {
                "it holds none".to_string()
            } else {
                let ids: Vec<&str> = cat.backups.iter().map(|b| b.id.as_str()).collect();
                format!("it holds {}", ids.join(", "))
            },
        }),
    }
}

/// A backup restored at its own instant: an empty tail, the stop at its snapshot time.
fn point_plan(b: &BackupRef) -> Plan {
    Plan {
        generation: b.generation,
        base: b.clone(),
        incrementals: Vec::new(),
        tail: Vec::new(),
        stop: Target::Time(b.snapshot_time),
        earliest: b.snapshot_time,
        latest: None,
    }
}

/// The window holding `target` and the base backup to start from in it, or why there is none
/// (`None`: the target is simply outside every window).
fn choose_base(cat: &Catalog, target: Target) -> Result<(&Window, &BackupRef), Option<String>> {
    match target {
        Target::Latest => {
            let w = cat
                .latest_window()
                .map_err(|why| Some(format!("--latest cannot be restored: {why}")))?;
            Ok((w, w.backups.last().expect("a window has a backup")))
        }
        Target::Time(t) => {
            let w = cat
                .windows
                .iter()
                .rev()
                .find(|w| w.holds_time(t))
                .ok_or(None)?;
            let b = w.backups.iter().rev().find(|b| b.snapshot_time <= t);
            Ok((w, b.expect("the window holds the time")))
        }
        Target::Lsn(l) => {
            let w = cat
                .windows
                .iter()
                .rev()
                .find(|w| w.holds_lsn(l))
                .ok_or(None)?;
            let b = w.backups.iter().rev().find(|b| b.consistent_point <= l);
            Ok((w, b.expect("the window holds the LSN")))
        }
    }
}

/// The window's segments replay needs from `start` on, in LSN order.
fn segment_tail(window: &Window, start: Lsn) -> Vec<SegmentRef> {
    window
        .segments
        .iter()
        .filter(|s| s.end > start)
        .cloned()
        .collect()
}

/// The refusal of a target outside every window: the earliest and latest restorable instants,
/// the windows and damage, and what to try.
fn refuse(cat: &Catalog, target: Target, why: Option<String>) -> RestoreError {
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
    let covered = match target {
        Target::Time(t) => match cat.nearest_instants(t) {
            (None, None) => covered,
            (before, after) => format!(
                "{covered}; the nearest restorable instants are {} before it and {} after it",
                before.map_or("none".to_string(), |n| n.text),
                after.map_or("none".to_string(), |n| n.text),
            ),
        },
        _ => covered,
    };
    let hint = if cat.windows.is_empty() && !cat.points.is_empty() {
        "restore one of the points with --to-backup ID; a new base backup (`tidemark backup`) starts a window from now on".to_string()
    } else if cat.windows.is_empty() {
        "restore from another copy of the repository; a new base backup (`tidemark backup`) starts a window from now on".to_string()
    } else if cat.latest_window().is_ok() {
        "choose a target inside one of these windows, a point's --to-backup ID, or --latest"
            .to_string()
    } else {
        "choose a target inside one of these windows; a new base backup (`tidemark backup`) opens a window after the damage".to_string()
    };
    RestoreError::OutOfRange {
        target,
        covered,
        windows: cat.describe(),
        hint,
    }
}

/// Reads what planning needs from the repository: its catalog and the usable manifests. The
/// damage found is logged: a restore that avoids it goes on. A repository of a newer format
/// than this build reads is refused first.
pub async fn gather(store: &Arc<dyn Store>) -> Result<(Catalog, Vec<Manifest>), RestoreError> {
    match identity::read_identity(store).await {
        Ok(_) => {}
        // So is a keyring that does not fit the repository (none for an encrypted one, one for
        // a plain one): nothing could be read.
        Err(
            e @ (RepoError::NewerFormat { .. }
            | RepoError::Store(_)
            | RepoError::Object(crate::object::ObjectError::Crypt(_))),
        ) => return Err(e.into()),
        // A damaged identity does not stop a restore: nothing it needs is in it.
        Err(e) => tracing::warn!("{e}"),
    }
    let (cat, manifests) = Catalog::load(store).await?;
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

/// The summary an operator reads: `restored base backup ID and N transactions (last commit LSN
/// at TIME) in 12.3s (replay 4.56s)`; with nothing replayed, the backup alone.
impl std::fmt::Display for RestoreSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "restored base backup {}", self.backup_id)?;
        match (self.last_commit_lsn, self.last_commit_time) {
            (Some(lsn), Some(time)) => write!(
                f,
                " and {} transaction(s) (last commit {lsn} at {time})",
                self.transactions_replayed
            )?,
            _ => write!(f, " (no transaction replayed)")?,
        }
        write!(
            f,
            " in {:.1}s (replay {:.2}s)",
            self.seconds, self.replay_seconds
        )
    }
}

/// Where a restore goes: a stop target, or exactly one backup's instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Goal {
    Target(Target),
    /// `--to-backup ID`: the backup alone, nothing replayed.
    Backup(String),
}

/// Restores the repository into `target` (an existing, empty database).
pub async fn run(
    store: &Arc<dyn Store>,
    target_info: &ConnInfo,
    to: Target,
    parallel: usize,
) -> Result<RestoreSummary, RestoreError> {
    run_to(store, target_info, &Goal::Target(to), parallel).await
}

/// Restores the repository into `target` (an existing, empty database), to `goal`.
pub async fn run_to(
    store: &Arc<dyn Store>,
    target_info: &ConnInfo,
    goal: &Goal,
    parallel: usize,
) -> Result<RestoreSummary, RestoreError> {
    run_with(store, target_info, goal, parallel, None).await
}

/// The flags of `goal` on the command line.
fn goal_flags(goal: &Goal) -> String {
    match goal {
        Goal::Backup(id) => format!("--to-backup {id}"),
        Goal::Target(Target::Latest) => "--latest".into(),
        Goal::Target(Target::Lsn(l)) => format!("--to-lsn {l}"),
        Goal::Target(Target::Time(t)) => format!("--to-time '{t}'"),
    }
}

/// Refuses a backup with cold objects, or thaws them with `thaw` (see [`thaw`]).
async fn ensure_readable(
    store: &Arc<dyn Store>,
    manifest: &Manifest,
    target_info: &ConnInfo,
    goal: &Goal,
    tier: Option<ThawTier>,
) -> Result<(), RestoreError> {
    let cold = thaw::cold_objects(store, manifest).await?;
    if cold.is_empty() {
        return Ok(());
    }
    if let Some(tier) = tier {
        thaw::thaw(store, &manifest.id, &cold, tier).await?;
        return Ok(());
    }
    const SHOWN: usize = 5;
    let mut listed: Vec<String> = cold.iter().take(SHOWN).map(|o| o.to_string()).collect();
    if cold.len() > SHOWN {
        listed.push(format!("and {} more", cold.len() - SHOWN));
    }
    Err(RestoreError::Cold {
        backup: manifest.id.clone(),
        location: store.location(),
        count: cold.len(),
        listed: listed.join(", "),
        command: format!(
            "tidemark restore --repo {} {} --thaw standard (with this restore's --target {target_info} and S3 flags)",
            store.location(),
            goal_flags(goal)
        ),
    })
}

/// [`run_to`], thawing a base backup in a cold storage class at `thaw` (`--thaw`); without
/// it such a backup is refused ([`RestoreError::Cold`]).
pub async fn run_with(
    store: &Arc<dyn Store>,
    target_info: &ConnInfo,
    goal: &Goal,
    parallel: usize,
    thaw: Option<ThawTier>,
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let (cat, manifests) = gather(store).await?;
    let plan = match goal {
        Goal::Target(to) => plan(&cat, *to)?,
        Goal::Backup(id) => plan_backup(&cat, id)?,
    };
    let manifest = manifests
        .iter()
        .find(|m| m.id == plan.base.id)
        .expect("the plan chose a listed backup");
    info!(backup = %plan.base.id, start = %plan.start(), segments = plan.tail.len(), target = %plan.stop, "restore plan");

    let client = target_info
        .connect()
        .await
        .map_err(RestoreError::TargetConnect)?;
    target::check_empty(&client, target_info).await?;
    target::check_privileges(&client, target_info, manifest).await?;
    ensure_readable(store, manifest, target_info, goal, thaw).await?;

    // Read and verify every segment, and check the base backup, before writing anything.
    let spool = tempfile::tempdir().map_err(|e| RestoreError::Local {
        what: "creating a temporary folder for the segments".into(),
        detail: e.to_string(),
    })?;
    let verified = fetch_and_verify(store, &plan, spool.path()).await?;
    let loader = backup::Loader::new(store, manifest, target_info, parallel);
    loader.check().await?;

    target::mark_in_progress(&client, manifest, &store.location()).await?;
    let applied = apply(&client, &loader, manifest, &plan, target_info, &verified)
        .await
        .map_err(|e| RestoreError::Incomplete {
            target: target_info.to_string(),
            source: Box::new(e),
        })?;
    let replayer = applied.replayer;
    let replay_seconds = applied.replay_seconds;
    let summary = RestoreSummary {
        backup_id: plan.base.id,
        transactions_replayed: replayer.applied,
        last_commit_lsn: replayer.last_commit.map(|c| c.0),
        last_commit_time: replayer.last_commit.map(|c| c.1),
        seconds: started.elapsed().as_secs_f64(),
        replay_seconds,
    };
    info!("restore complete: {summary}");
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
    let mut reader = changelog::TxnReader::new(plan.start(), plan.stop);
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
/// they continue each other from the plan's start; returns the spooled files in order.
async fn fetch_and_verify(
    store: &Arc<dyn Store>,
    plan: &Plan,
    spool: &std::path::Path,
) -> Result<Vec<std::path::PathBuf>, RestoreError> {
    let start = plan.start();
    let mut expected_start: Option<Lsn> = None;
    let mut out = Vec::new();
    let mut fetches = futures_util::stream::iter(plan.tail.iter())
        .map(|r| {
            let store = store.clone();
            async move {
                crate::object::get_object(&*store, &r.key)
                    .await
                    .map(|b| (r, b))
            }
        })
        .buffered(4);
    while let Some(item) = fetches.next().await {
        let (r, bytes) = item?;
        let corrupt = |detail: String| RestoreError::Corrupt {
            range: r.range(),
            start: r.start,
            detail,
        };
        match expected_start {
            None if r.start > start => {
                return Err(corrupt(format!(
                    "the archive continues only from {} but the base backup is at {}: the changes between are missing",
                    r.start, start
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
        if changelog::stops_in(plan.stop, start, &seg) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_repository_of_a_newer_format_is_not_restored() {
        use crate::error::Classify;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let mut id = serde_json::to_value(identity::Identity::new(
            1,
            "app",
            crate::segment::Compression::Zstd,
        ))
        .unwrap();
        id["format_version"] = (identity::IDENTITY_FORMAT_VERSION + 1).into();
        store
            .put(
                identity::IDENTITY_KEY,
                bytes::Bytes::from(serde_json::to_vec(&id).unwrap()),
            )
            .await
            .unwrap();
        let err = gather(&store).await.unwrap_err();
        assert!(
            matches!(err, RestoreError::Repo(RepoError::NewerFormat { .. })),
            "{err}"
        );
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Repository);
    }

    #[test]
    fn the_summary_reads_as_a_sentence_not_a_struct() {
        let mut s = RestoreSummary {
            backup_id: "20261128T020000Z".into(),
            transactions_replayed: 42,
            last_commit_lsn: Some(Lsn(0x16B3748)),
            last_commit_time: Some(PgTimestamp(0)),
            seconds: 12.34,
            replay_seconds: 4.567,
        };
        assert_eq!(
            s.to_string(),
            "restored base backup 20261128T020000Z and 42 transaction(s) (last commit 0/16B3748 at 2000-01-01 00:00:00.000000+00) in 12.3s (replay 4.57s)"
        );
        (
            s.last_commit_lsn,
            s.last_commit_time,
            s.transactions_replayed,
        ) = (None, None, 0);
        assert_eq!(
            s.to_string(),
            "restored base backup 20261128T020000Z (no transaction replayed) in 12.3s (replay 4.57s)"
        );
    }

    fn keys(p: &Plan) -> Vec<&str> {
        p.tail.iter().map(|s| s.key.as_str()).collect()
    }

    /// A segment of generation 1 from `s` to `e`, stored under `key`.
    fn seg_ref(s: u64, e: u64, key: &str) -> SegmentRef {
        SegmentRef {
            generation: 1,
            start: Lsn(s),
            end: Lsn(e),
            key: key.into(),
            size: 1,
        }
    }

    /// A base backup of generation 1 at `cp`, its snapshot at `t`.
    fn backup(id: &str, cp: u64, t: i64) -> crate::catalog::BackupRef {
        crate::catalog::BackupRef {
            id: id.into(),
            generation: 1,
            consistent_point: Lsn(cp),
            snapshot_time: PgTimestamp(t),
        }
    }

    fn facts() -> Catalog {
        use crate::catalog::SegmentFact;
        let seg = |s: u64, e: u64| seg_ref(s, e, &format!("k{s}"));
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
    fn picks_the_newest_backup_before_the_target() {
        let p = plan(&facts(), Target::Time(PgTimestamp(2000))).unwrap();
        assert_eq!((p.base.id.as_str(), p.start()), ("b1", Lsn(100)));
        assert_eq!(keys(&p), ["k100", "k200", "k300"]);
        let p = plan(&facts(), Target::Time(PgTimestamp(3000))).unwrap();
        assert_eq!((p.base.id.as_str(), p.tail.len()), ("b2", 1));
        let p = plan(&facts(), Target::Latest).unwrap();
        assert_eq!(p.base.id, "b2");
        let p = plan(&facts(), Target::Lsn(Lsn(250))).unwrap();
        assert_eq!(p.base.id, "b1");
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
        assert_eq!((p.base.id.as_str(), p.tail.len()), ("b1-100", 2));
        let p = plan(&cat, Target::Time(PgTimestamp(5500))).unwrap();
        assert_eq!((p.base.id.as_str(), keys(&p)), ("b2-500", vec!["g2-500"]));
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

    /// One generation with three base backups and a hole: b1 and b2 open and join window A
    /// (segments 100..400), the hole 400..500 ends it, b3 opens window B after it (500..700).
    /// Every segment's last commit is at 10 × its end.
    fn path_catalog() -> Catalog {
        use crate::catalog::SegmentFact;
        let seg = |s: u64, e: u64| seg_ref(s, e, &format!("s{s}"));
        let chain = vec![
            seg(100, 200),
            seg(200, 300),
            seg(300, 400),
            seg(500, 600),
            seg(600, 700),
        ];
        let facts = chain
            .iter()
            .map(|s| {
                let latest_commit = Some(PgTimestamp(s.end.0 as i64 * 10));
                (s.key.clone(), SegmentFact::Good { latest_commit })
            })
            .collect();
        Catalog::build(
            "repo".into(),
            vec![
                backup("b3", 550, 5500),
                backup("b1", 100, 1000),
                backup("b2", 250, 2500),
            ],
            [(1, chain)].into_iter().collect(),
            &facts,
            vec![],
        )
    }

    #[test]
    fn the_path_runs_from_the_newest_base_before_the_target_through_the_tail_to_the_stop() {
        let cat = path_catalog();
        assert_eq!(cat.windows.len(), 2, "{}", cat.describe());
        // (target, base, tail): targets inside window A, before and after b2, and inside B.
        let inside = [
            (
                Target::Time(PgTimestamp(1000)),
                "b1",
                vec!["s100", "s200", "s300"],
            ),
            (
                Target::Time(PgTimestamp(2499)),
                "b1",
                vec!["s100", "s200", "s300"],
            ),
            (Target::Time(PgTimestamp(2500)), "b2", vec!["s200", "s300"]),
            (Target::Time(PgTimestamp(3999)), "b2", vec!["s200", "s300"]),
            (Target::Time(PgTimestamp(6000)), "b3", vec!["s500", "s600"]),
            (Target::Lsn(Lsn(100)), "b1", vec!["s100", "s200", "s300"]),
            (Target::Lsn(Lsn(400)), "b2", vec!["s200", "s300"]),
            (Target::Lsn(Lsn(700)), "b3", vec!["s500", "s600"]),
            (Target::Latest, "b3", vec!["s500", "s600"]),
        ];
        for (target, base, tail) in inside {
            let p = plan(&cat, target).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!((p.base.id.as_str(), keys(&p)), (base, tail), "{target}");
            assert_eq!(p.start(), p.base.consistent_point, "{target}");
            assert!(p.incrementals.is_empty(), "{target}");
            assert_eq!(p.stop, target);
            assert_eq!(p.generation, 1);
            let window = if base == "b3" {
                &cat.windows[1]
            } else {
                &cat.windows[0]
            };
            assert_eq!(
                (p.earliest, p.latest),
                (window.earliest, window.latest_commit)
            );
        }
        // Before the first window, in the hole between the windows, after the last one.
        let outside = [
            Target::Time(PgTimestamp(999)),
            Target::Time(PgTimestamp(4000)),
            Target::Time(PgTimestamp(5499)),
            Target::Time(PgTimestamp(7000)),
            Target::Lsn(Lsn(99)),
            Target::Lsn(Lsn(450)),
            Target::Lsn(Lsn(701)),
        ];
        for target in outside {
            match plan(&cat, target) {
                Err(RestoreError::OutOfRange { windows, .. }) => {
                    assert_eq!(windows, cat.describe(), "{target}")
                }
                other => panic!("{target}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_backup_whose_segments_were_pruned_restores_its_own_instant_only() {
        // path_catalog without the segments before b2's position: b1 is a point.
        let full = path_catalog();
        let mut chains = full.segments.clone();
        chains.get_mut(&1).unwrap().retain(|s| s.end > Lsn(250));
        let facts = chains
            .values()
            .flatten()
            .map(|s| {
                let latest_commit = Some(PgTimestamp(s.end.0 as i64 * 10));
                (
                    s.key.clone(),
                    crate::catalog::SegmentFact::Good { latest_commit },
                )
            })
            .collect();
        let cat = Catalog::build("repo".into(), full.backups.clone(), chains, &facts, vec![]);
        assert_eq!(
            cat.points.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["b1"]
        );
        // Its exact instant restores, with nothing replayed.
        let p = plan(&cat, Target::Time(PgTimestamp(1000))).unwrap();
        assert_eq!((p.base.id.as_str(), p.tail.len()), ("b1", 0));
        // An instant after it, before the next window, is refused naming both neighbours.
        let err = plan(&cat, Target::Time(PgTimestamp(1500))).unwrap_err();
        assert!(matches!(err, RestoreError::OutOfRange { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("the nearest restorable instants are 2000-01-01 00:00:00.001000+00 (base backup b1: --to-backup b1) before it and 2000-01-01 00:00:00.002500+00 (the start of a window"),
            "{msg}"
        );
        assert!(msg.contains("--to-backup b1"), "{msg}");
        // --to-backup: exactly the backup, inside a window too.
        for id in ["b1", "b2", "b3"] {
            let p = plan_backup(&cat, id).unwrap();
            assert_eq!((p.base.id.as_str(), p.tail.len()), (id, 0));
            assert_eq!(p.stop, Target::Time(p.base.snapshot_time));
        }
        let err = plan_backup(&cat, "nope").unwrap_err();
        assert!(matches!(err, RestoreError::UnknownBackup { .. }));
        assert!(err.to_string().contains("it holds b1, b2, b3"), "{err}");
        use crate::error::Classify;
        assert_eq!(err.exit_status(), crate::error::ExitStatus::OutOfRange);
    }
}
