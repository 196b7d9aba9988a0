//! The catalog: one listing of the repository turned into generations, base backups and
//! segments, and the rules of what a restore can reach — its *windows*. `list` prints them and
//! `restore`'s planner chooses inside them, so the two always agree.
//!
//! A window is a maximal restorable interval of one generation: it opens at a base backup's
//! consistent point (and snapshot time) and extends over the contiguous, readable segments after
//! it. A hole in the chain (a gap or an overlap) or a damaged segment ends it; a later base
//! backup after the hole opens a new window. Damage therefore removes only the instants that
//! need the damaged object: a manifest that cannot be read is recorded as a [`Problem`] (its
//! backup is not used), never fatal, and segments outside every window are never read.
//!
//! Owns: the window rules ([`windows`], pure), the reading of the few segments those rules need
//! (the last segment of each window, checked completely, and, walking back, the segments until
//! one with a commit: the latest restorable instant is just before the last archived commit),
//! and the text that describes windows and problems. Does not own a restore's full
//! verification of the segments it replays.
//!
//! Its parts, each read by the windows above:
//! * [`keys`]: every object key and its parser (with the revision of a rewritten object);
//! * [`identity`]: the repository's `archive.json` (which cluster and database it archives);
//! * [`chain`]: segments grouped into generations, and the archiver's continuity checks;
//! * [`manifest`]: the base backups' manifests, and their reading from a listing;
//! * [`retention`]: which backups and segments a policy keeps (pure), and [`expire`] the
//!   deletion plan of its choice and its application;
//! * [`pin`]: the pins (`pins/<id>.json`) that keep a backup until it is unpinned;
//! * [`audit`]: the audit trail (`audit/<start>-<random>.json`), one record per command.
//!
//! A complete base backup outside every window (the segments at its position were pruned, or
//! lie behind a hole or damage) is a restorable *point*: its own consistent instant, restored
//! with no replay (`restore --to-backup`). Prune keeps daily, weekly and monthly backups long
//! after their segments are gone: they are points.
//!
//! Invariant: every instant inside a window, and every point, is provable from objects the
//! catalog listed and found intact where it looked; an instant outside every window and point
//! is refused by the planner.

pub mod audit;
pub mod chain;
mod error;
pub mod expire;
pub mod identity;
pub mod keys;
pub mod manifest;
pub mod pin;
pub mod retention;
pub mod tiering;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

use crate::lsn::{Lsn, PgTimestamp};
use crate::segment::Segment;
use crate::store::{Store, StoreError};

pub use chain::{Hole, SegmentRef};
pub use error::RepoError;
pub use identity::Identity;
pub use manifest::{Manifest, ManifestError, ManifestScan, Origin};
pub use pin::PinError;

/// A base backup as planning sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupRef {
    pub id: String,
    pub generation: u32,
    /// Replay from this backup starts here.
    pub consistent_point: Lsn,
    /// The earliest instant the backup restores to.
    pub snapshot_time: PgTimestamp,
}

impl BackupRef {
    pub fn of(m: &Manifest) -> BackupRef {
        BackupRef {
            id: m.id.clone(),
            generation: m.generation,
            consistent_point: m.consistent_point,
            snapshot_time: m.snapshot_time,
        }
    }
}

/// An incremental backup: the changes since an earlier backup, loaded on top of it. None are
/// taken yet, so this type has no values: a restore's path has an incrementals step that is
/// always empty, and the code that would use one is checked by the compiler to handle none. The
/// feature that takes them gives this type its fields and the catalog its list of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum IncrementalRef {}

/// What reading a segment found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegmentFact {
    /// Intact; the latest commit time it records (None: no commit in it).
    Good { latest_commit: Option<PgTimestamp> },
    /// Cannot be used: why.
    Corrupt(String),
}

/// Why a window ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WindowEnd {
    /// Where the generation's archive ends (so far).
    Tip,
    /// The chain breaks: no segment starts where the window ends; the next starts at `next`
    /// (after the end: a gap; before it: an overlap).
    Hole { next: Lsn },
    /// The next segment is damaged.
    Damaged { segment: String, detail: String },
}

/// A maximal restorable interval of one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub generation: u32,
    /// The base backups inside the window, by consistent point; the first opens it.
    pub backups: Vec<BackupRef>,
    /// The contiguous segments from the one holding the first backup's position on.
    pub segments: Vec<SegmentRef>,
    /// The first backup's consistent point.
    pub start_lsn: Lsn,
    /// The end of the last segment (or the last backup's position).
    pub end_lsn: Lsn,
    /// The first backup's snapshot time: the earliest instant.
    pub earliest: PgTimestamp,
    /// The last commit archived in the window: instants before it are restorable (None: no
    /// commit archived after the backup yet).
    pub latest_commit: Option<PgTimestamp>,
    pub ends: WindowEnd,
    /// A segment whose facts the window needs but that was not read yet.
    pub(crate) unread: Option<SegmentRef>,
}

impl Window {
    /// Whether a restore to `t` can be planned in this window.
    pub fn holds_time(&self, t: PgTimestamp) -> bool {
        self.earliest <= t && self.latest_commit.is_some_and(|lc| t < lc)
    }

    /// Whether a restore to `l` can be planned in this window.
    pub fn holds_lsn(&self, l: Lsn) -> bool {
        self.start_lsn <= l && l <= self.end_lsn
    }

    /// One line: what the window covers and where it ends.
    pub fn describe(&self) -> String {
        let times = match self.latest_commit {
            Some(lc) => format!("--to-time from {} to just before {lc}", self.earliest),
            None => format!(
                "the base backup's instant {} (no commit archived after it yet)",
                self.earliest
            ),
        };
        let ends = match &self.ends {
            WindowEnd::Tip => "the end of the generation's archive".to_string(),
            WindowEnd::Hole { next } if *next > self.end_lsn => format!(
                "a hole: the changes from {} to {next} are missing",
                self.end_lsn
            ),
            WindowEnd::Hole { next } => format!(
                "an overlap: the next segment starts at {next}, before {}",
                self.end_lsn
            ),
            WindowEnd::Damaged { segment, .. } => format!("the damaged segment {segment}"),
        };
        format!(
            "generation {}: {times}, --to-lsn {} to {}; ends at {ends}",
            self.generation, self.start_lsn, self.end_lsn
        )
    }
}

/// Something in the repository that makes part of it unusable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// No segment covers `from`..`to`.
    Gap { generation: u32, from: Lsn, to: Lsn },
    /// Two segments cover the same changes.
    Overlap {
        generation: u32,
        prev: String,
        next: String,
    },
    /// A segment that cannot be read or fails its checks.
    DamagedSegment {
        generation: u32,
        segment: String,
        detail: String,
    },
    /// Segments no base backup reaches.
    Unreachable {
        generation: u32,
        from: Lsn,
        to: Lsn,
        segments: usize,
        /// The generation has no usable base backup at all.
        no_backup: bool,
    },
    /// A manifest that cannot be read or parsed: its backup is not used.
    DamagedManifest { key: String, detail: String },
    /// A backup folder without manifest.json.
    IncompleteBackup { id: String },
}

impl Problem {
    pub fn generation(&self) -> Option<u32> {
        match self {
            Problem::Gap { generation, .. }
            | Problem::Overlap { generation, .. }
            | Problem::DamagedSegment { generation, .. }
            | Problem::Unreachable { generation, .. } => Some(*generation),
            Problem::DamagedManifest { .. } | Problem::IncompleteBackup { .. } => None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Gap { generation, from, to } => write!(
                f,
                "generation {generation}: gap: no segment holds the changes from {from} to {to}"
            ),
            Problem::Overlap { generation, prev, next } => write!(
                f,
                "generation {generation}: segments {prev} and {next} overlap"
            ),
            Problem::DamagedSegment { generation, segment, detail } => write!(
                f,
                "generation {generation}: segment {segment} is damaged: {detail}"
            ),
            Problem::Unreachable { generation, from, to, segments, no_backup: true } => write!(
                f,
                "segments of generation {generation} exist ({segments} segment(s), LSN {from} to {to}) but no base backup: nothing is restorable from them"
            ),
            Problem::Unreachable { generation, from, to, segments, no_backup: false } => write!(
                f,
                "generation {generation}: {segments} segment(s) from {from} to {to} are not restorable: a hole or damage lies between them and every usable base backup before them"
            ),
            Problem::DamagedManifest { key, detail } => {
                write!(f, "{key} cannot be used ({detail}): that base backup is skipped")
            }
            Problem::IncompleteBackup { id } => write!(
                f,
                "{}{id}/ has no manifest.json (a backup still being written, or its manifest was deleted): skipped; `tidemark prune --incomplete-backups` removes it once it is a day old",
                manifest::ROOT
            ),
        }
    }
}

/// The repository as planning sees it.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub location: String,
    /// Usable base backups, by (generation, consistent point).
    pub backups: Vec<BackupRef>,
    /// Segment chains by generation, each sorted by LSN.
    pub segments: BTreeMap<u32, Vec<SegmentRef>>,
    /// Every window, by (generation, start).
    pub windows: Vec<Window>,
    /// The complete backups outside every window, by snapshot time: each restorable at its own
    /// instant only.
    pub points: Vec<BackupRef>,
    pub problems: Vec<Problem>,
}

impl Catalog {
    /// Lists the repository once, reads its manifests and the segments the windows need.
    /// Damaged objects become [`Problem`]s; only a failing store, or an object whose key the
    /// keyring lacks ([`ObjectError::Crypt`](crate::object::ObjectError::Crypt)), is an error.
    pub async fn load(
        store: &Arc<dyn Store>,
    ) -> Result<(Catalog, Vec<Manifest>), crate::object::ObjectError> {
        let objects = store.list("").await?;
        let scan = manifest::read_manifests(store, &objects).await?;
        let problems: Vec<Problem> = scan
            .incomplete
            .into_iter()
            .map(|id| Problem::IncompleteBackup { id })
            .chain(
                scan.unreadable
                    .into_iter()
                    .map(|(key, detail)| Problem::DamagedManifest { key, detail }),
            )
            .collect();
        let segments = chain::group_segments(
            objects
                .into_iter()
                .filter(|o| o.key.starts_with(chain::SEGMENTS_PREFIX))
                .map(|o| (o.key, o.size)),
        );
        let backups: Vec<BackupRef> = scan.manifests.iter().map(BackupRef::of).collect();
        let all: Vec<SegmentRef> = segments.values().flatten().cloned().collect();
        let mut facts: BTreeMap<String, SegmentFact> = BTreeMap::new();
        loop {
            let unread: Vec<SegmentRef> = windows(&backups, &all, &facts)
                .into_iter()
                .filter_map(|w| w.unread)
                .collect();
            if unread.is_empty() {
                break;
            }
            let mut reads = futures_util::stream::iter(unread)
                .map(|s| async move {
                    let fact = read_fact(store, &s).await;
                    (s, fact)
                })
                .buffer_unordered(4);
            while let Some((s, fact)) = reads.next().await {
                facts.insert(s.key.clone(), fact?);
            }
        }
        let catalog = Catalog::build(store.location(), backups, segments, &facts, problems);
        Ok((catalog, scan.manifests))
    }

    /// The catalog of these backups and segments, given what reading segments found. Pure.
    pub fn build(
        location: String,
        mut backups: Vec<BackupRef>,
        segments: BTreeMap<u32, Vec<SegmentRef>>,
        facts: &BTreeMap<String, SegmentFact>,
        mut problems: Vec<Problem>,
    ) -> Catalog {
        backups.sort_by_key(|b| (b.generation, b.consistent_point));
        let all: Vec<SegmentRef> = segments.values().flatten().cloned().collect();
        let windows = windows(&backups, &all, facts);
        let points = points(&backups, &windows);
        let mut found = chain_problems(&backups, &segments, facts, &windows);
        found.append(&mut problems);
        Catalog {
            location,
            backups,
            segments,
            windows,
            points,
            problems: found,
        }
    }

    /// Whether the repository holds nothing at all (no backup, segment or damaged object).
    pub fn is_empty(&self) -> bool {
        self.backups.is_empty()
            && self.segments.is_empty()
            && self
                .problems
                .iter()
                .all(|p| matches!(p, Problem::IncompleteBackup { .. }))
    }

    /// The windows and problems as text: a heading line, then one indented line each (what
    /// `list` prints and a refused restore names).
    pub fn describe(&self) -> String {
        let nothing = self.windows.is_empty() && self.points.is_empty();
        let mut out = String::from(
            match (nothing, self.windows.is_empty(), self.problems.is_empty()) {
                (false, false, _) => "restorable windows:",
                (false, true, _) => "restorable windows: none",
                (true, _, false) => "nothing is restorable:",
                (true, _, true) => "nothing is restorable",
            },
        );
        for (i, w) in self.windows.iter().enumerate() {
            if let Some(prev) = i.checked_sub(1).map(|i| &self.windows[i]) {
                if prev.generation != w.generation {
                    out.push_str(&format!(
                        "\n  hole: instants from {} to before {} are not restorable: generation {} started anew (its slot was recreated)",
                        prev.latest_commit.unwrap_or(prev.earliest),
                        w.earliest,
                        w.generation
                    ));
                }
            }
            out.push_str("\n  ");
            out.push_str(&w.describe());
        }
        if !self.points.is_empty() {
            out.push_str("\nrestorable points outside every window (a base backup's own instant, no replay):");
            for b in &self.points {
                out.push_str(&format!("\n  {}", describe_point(b)));
            }
        }
        for p in &self.problems {
            out.push_str(match p {
                Problem::IncompleteBackup { .. } => "\n  note: ",
                _ => "\n  damage: ",
            });
            out.push_str(&p.to_string());
        }
        out
    }

    /// The earliest restorable instant (of any window or point).
    pub fn earliest(&self) -> Option<PgTimestamp> {
        self.windows
            .iter()
            .map(|w| w.earliest)
            .chain(self.points.iter().map(|b| b.snapshot_time))
            .min()
    }

    /// The point that restores exactly `t` (a backup outside every window whose instant it is).
    pub fn point_at_time(&self, t: PgTimestamp) -> Option<&BackupRef> {
        self.points.iter().find(|b| b.snapshot_time == t)
    }

    /// The nearest restorable instants before and after `t` (of the windows and the points),
    /// each described with how to reach it. Pure.
    pub fn nearest_instants(&self, t: PgTimestamp) -> (Option<Nearest>, Option<Nearest>) {
        let mut before: Option<Nearest> = None;
        let mut after: Option<Nearest> = None;
        let mut offer = |n: Nearest| {
            if n.instant <= t {
                if before.as_ref().is_none_or(|b| n.instant > b.instant) {
                    before = Some(n);
                }
            } else if after.as_ref().is_none_or(|a| n.instant < a.instant) {
                after = Some(n);
            }
        };
        for w in &self.windows {
            if w.earliest > t {
                offer(Nearest {
                    instant: w.earliest,
                    text: format!(
                        "{} (the start of a window of generation {}: --to-time {})",
                        w.earliest, w.generation, w.earliest
                    ),
                });
            } else {
                match w.latest_commit {
                    Some(lc) if lc <= t => offer(Nearest {
                        instant: lc,
                        text: format!(
                            "just before {lc} (the end of a window of generation {}: --to-time before {lc})",
                            w.generation
                        ),
                    }),
                    Some(_) => {}
                    None => offer(Nearest {
                        instant: w.earliest,
                        text: format!(
                            "{} (base backup {}: --to-backup {})",
                            w.earliest, w.backups[0].id, w.backups[0].id
                        ),
                    }),
                }
            }
        }
        for b in &self.points {
            offer(Nearest {
                instant: b.snapshot_time,
                text: format!(
                    "{} (base backup {}: --to-backup {})",
                    b.snapshot_time, b.id, b.id
                ),
            });
        }
        (before, after)
    }

    /// The latest commit of any window (instants before it are restorable).
    pub fn latest_commit(&self) -> Option<PgTimestamp> {
        self.windows.iter().filter_map(|w| w.latest_commit).max()
    }

    /// The window `--latest` restores, or why there is none: the newest window, if nothing
    /// archived lies beyond it.
    pub fn latest_window(&self) -> Result<&Window, String> {
        let Some(w) = self.windows.last() else {
            return Err("nothing is restorable".into());
        };
        if w.ends != WindowEnd::Tip {
            return Err(format!(
                "the archive of generation {} continues past damage after {}",
                w.generation, w.end_lsn
            ));
        }
        if let Some((g, _)) = self.segments.range(w.generation + 1..).next() {
            return Err(format!(
                "generation {g} holds the latest archived changes but no window reaches them"
            ));
        }
        Ok(w)
    }
}

/// A restorable instant near a refused target, and how to restore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nearest {
    pub instant: PgTimestamp,
    pub text: String,
}

/// One line: a point and how to restore it.
pub fn describe_point(b: &BackupRef) -> String {
    format!(
        "generation {}: base backup {} at {} (LSN {}): --to-backup {}",
        b.generation, b.id, b.snapshot_time, b.consistent_point, b.id
    )
}

/// The backups in no window, by snapshot time: restorable points. Pure.
fn points(backups: &[BackupRef], windows: &[Window]) -> Vec<BackupRef> {
    let mut out: Vec<BackupRef> = backups
        .iter()
        .filter(|b| {
            !windows
                .iter()
                .any(|w| w.backups.iter().any(|x| x.id == b.id))
        })
        .cloned()
        .collect();
    out.sort_by_key(|b| (b.snapshot_time, b.generation, b.consistent_point));
    out
}

/// Reads one segment completely and checks it against its name.
/// A segment that does not decode is damage like a bad checksum; a key missing from the
/// keyring is not (it stops the command: exit 2).
pub async fn read_fact(
    store: &Arc<dyn Store>,
    s: &SegmentRef,
) -> Result<SegmentFact, crate::object::ObjectError> {
    use crate::object::ObjectError;
    match crate::object::get_object(&**store, &s.key).await {
        Ok(bytes) => Ok(check_segment(s, bytes)),
        Err(ObjectError::Store(StoreError::NotFound { .. })) => {
            Ok(SegmentFact::Corrupt("listed, but gone when read".into()))
        }
        Err(e @ ObjectError::Undecodable { .. }) => Ok(SegmentFact::Corrupt(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Checks a segment's bytes (structure, every block's checksum, header against name). Pure.
pub fn check_segment(s: &SegmentRef, bytes: Bytes) -> SegmentFact {
    let seg = match Segment::parse(bytes) {
        Ok(seg) => seg,
        Err(e) => return SegmentFact::Corrupt(e.to_string()),
    };
    let i = &seg.info;
    if i.start_lsn != s.start || i.end_lsn != s.end || i.generation != s.generation {
        return SegmentFact::Corrupt(format!(
            "its header says generation {} {}-{}, which does not match its name",
            i.generation, i.start_lsn, i.end_lsn
        ));
    }
    if let Err(e) = seg.verify() {
        return SegmentFact::Corrupt(e.to_string());
    }
    SegmentFact::Good {
        latest_commit: seg.commits.iter().map(|c| c.commit_time).max(),
    }
}

/// A run of contiguous, not known-damaged segments of one generation.
struct Run<'a> {
    segments: Vec<&'a SegmentRef>,
    ends: WindowEnd,
}

/// Splits one generation's sorted chain at holes and damaged segments.
fn runs<'a>(chain: &[&'a SegmentRef], facts: &BTreeMap<String, SegmentFact>) -> Vec<Run<'a>> {
    let mut out = Vec::new();
    let mut current: Vec<&SegmentRef> = Vec::new();
    let mut prev_end: Option<Lsn> = None;
    for s in chain {
        if let Some(SegmentFact::Corrupt(detail)) = facts.get(&s.key) {
            out.push(Run {
                segments: std::mem::take(&mut current),
                ends: WindowEnd::Damaged {
                    segment: s.range(),
                    detail: detail.clone(),
                },
            });
            prev_end = Some(s.end);
            continue;
        }
        if prev_end.is_some_and(|e| e != s.start) {
            out.push(Run {
                segments: std::mem::take(&mut current),
                ends: WindowEnd::Hole { next: s.start },
            });
        }
        current.push(s);
        prev_end = Some(s.end);
    }
    out.push(Run {
        segments: current,
        ends: WindowEnd::Tip,
    });
    out.retain(|r| !r.segments.is_empty() || r.ends == WindowEnd::Tip);
    out
}

/// The windows of every generation, by (generation, start). Pure.
///
/// A segment missing from `facts` is taken as intact; a window that needs one's facts (its
/// last segment, then walking back to the last commit) names it in `unread`.
pub fn windows(
    backups: &[BackupRef],
    segments: &[SegmentRef],
    facts: &BTreeMap<String, SegmentFact>,
) -> Vec<Window> {
    let generations: BTreeSet<u32> = backups
        .iter()
        .map(|b| b.generation)
        .chain(segments.iter().map(|s| s.generation))
        .collect();
    let mut out = Vec::new();
    for g in generations {
        let mut chain: Vec<&SegmentRef> = segments.iter().filter(|s| s.generation == g).collect();
        chain.sort();
        let mut backups: Vec<&BackupRef> = backups.iter().filter(|b| b.generation == g).collect();
        backups.sort_by_key(|b| b.consistent_point);
        let runs = runs(&chain, facts);
        // Each backup joins the run whose segments hold its position (or that ends there).
        let mut members: Vec<Vec<&BackupRef>> = vec![Vec::new(); runs.len()];
        let mut at_tip: Vec<&BackupRef> = Vec::new();
        for b in backups {
            let cp = b.consistent_point;
            let holds = |r: &Run| {
                r.segments
                    .first()
                    .is_some_and(|f| f.start <= cp && cp < r.segments.last().unwrap().end)
            };
            let ends_at = |r: &Run| r.segments.last().is_some_and(|l| l.end == cp);
            if let Some(i) = runs
                .iter()
                .position(holds)
                .or_else(|| runs.iter().position(ends_at))
            {
                members[i].push(b);
            } else if !chain.iter().any(|s| s.end > cp) {
                // Nothing archived after it yet: the backup's own instant.
                at_tip.push(b);
            }
        }
        for (run, members) in runs.iter().zip(members) {
            let Some(first) = members.first() else {
                continue;
            };
            let cp = first.consistent_point;
            let segs: Vec<SegmentRef> = run
                .segments
                .iter()
                .filter(|s| s.end > cp)
                .map(|s| (*s).clone())
                .collect();
            let mut latest_commit = None;
            let mut unread = None;
            for s in segs.iter().rev() {
                match facts.get(&s.key) {
                    None => {
                        unread = Some(s.clone());
                        break;
                    }
                    Some(SegmentFact::Good {
                        latest_commit: Some(t),
                    }) => {
                        latest_commit = Some(*t);
                        break;
                    }
                    Some(_) => {}
                }
            }
            let ends = run.ends.clone();
            out.push(Window {
                generation: g,
                start_lsn: cp,
                end_lsn: segs.last().map_or(cp, |s| s.end),
                earliest: first.snapshot_time,
                latest_commit,
                ends,
                unread,
                segments: segs,
                backups: members.into_iter().cloned().collect(),
            });
        }
        if let Some(first) = at_tip.first() {
            out.push(Window {
                generation: g,
                start_lsn: first.consistent_point,
                end_lsn: at_tip.last().unwrap().consistent_point,
                earliest: first.snapshot_time,
                latest_commit: None,
                ends: WindowEnd::Tip,
                unread: None,
                segments: vec![],
                backups: at_tip.into_iter().cloned().collect(),
            });
        }
    }
    out.sort_by_key(|w| (w.generation, w.start_lsn));
    out
}

/// Holes, damaged segments and segments outside every window. Pure. (A backup in no window
/// is not a problem: it is a point.)
fn chain_problems(
    backups: &[BackupRef],
    segments: &BTreeMap<u32, Vec<SegmentRef>>,
    facts: &BTreeMap<String, SegmentFact>,
    windows: &[Window],
) -> Vec<Problem> {
    let mut out = Vec::new();
    let used: BTreeSet<&str> = windows
        .iter()
        .flat_map(|w| w.segments.iter().map(|s| s.key.as_str()))
        .collect();
    for (&generation, chain) in segments {
        for w in chain.windows(2) {
            let (prev, next) = (&w[0], &w[1]);
            if next.start > prev.end {
                out.push(Problem::Gap {
                    generation,
                    from: prev.end,
                    to: next.start,
                });
            } else if next.start < prev.end {
                out.push(Problem::Overlap {
                    generation,
                    prev: prev.range(),
                    next: next.range(),
                });
            }
        }
        for s in chain {
            if let Some(SegmentFact::Corrupt(detail)) = facts.get(&s.key) {
                out.push(Problem::DamagedSegment {
                    generation,
                    segment: s.range(),
                    detail: detail.clone(),
                });
            }
        }
        let no_backup = !backups.iter().any(|b| b.generation == generation);
        let mut pending: Vec<&SegmentRef> = Vec::new();
        let flush = |pending: &mut Vec<&SegmentRef>, out: &mut Vec<Problem>| {
            if let (Some(f), Some(l)) = (pending.first(), pending.last()) {
                out.push(Problem::Unreachable {
                    generation,
                    from: f.start,
                    to: l.end,
                    segments: pending.len(),
                    no_backup,
                });
            }
            pending.clear();
        };
        for s in chain {
            let corrupt = matches!(facts.get(&s.key), Some(SegmentFact::Corrupt(_)));
            if used.contains(s.key.as_str()) || corrupt {
                flush(&mut pending, &mut out);
            } else {
                pending.push(s);
            }
        }
        flush(&mut pending, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(g: u32, s: u64, e: u64) -> SegmentRef {
        SegmentRef {
            generation: g,
            start: Lsn(s),
            end: Lsn(e),
            key: format!("g{g}-{s}"),
            size: 1,
        }
    }

    fn backup(g: u32, cp: u64, t: i64) -> BackupRef {
        BackupRef {
            id: format!("b{g}-{cp}"),
            generation: g,
            consistent_point: Lsn(cp),
            snapshot_time: PgTimestamp(t),
        }
    }

    /// Every segment intact, with a commit at 10 × its end.
    fn good(segs: &[SegmentRef]) -> BTreeMap<String, SegmentFact> {
        segs.iter()
            .map(|s| {
                (
                    s.key.clone(),
                    SegmentFact::Good {
                        latest_commit: Some(PgTimestamp(s.end.0 as i64 * 10)),
                    },
                )
            })
            .collect()
    }

    fn catalog(
        backups: Vec<BackupRef>,
        segs: Vec<SegmentRef>,
        facts: &BTreeMap<String, SegmentFact>,
    ) -> Catalog {
        let mut chains: BTreeMap<u32, Vec<SegmentRef>> = BTreeMap::new();
        for s in segs {
            chains.entry(s.generation).or_default().push(s);
        }
        Catalog::build("repo".into(), backups, chains, facts, vec![])
    }

    fn spans(ws: &[Window]) -> Vec<(u32, u64, u64, Option<i64>)> {
        ws.iter()
            .map(|w| {
                (
                    w.generation,
                    w.start_lsn.0,
                    w.end_lsn.0,
                    w.latest_commit.map(|t| t.0),
                )
            })
            .collect()
    }

    #[test]
    fn a_whole_chain_is_one_window_holding_every_backup() {
        let segs = vec![seg(1, 100, 200), seg(1, 200, 300), seg(1, 300, 400)];
        let ws = windows(
            &[backup(1, 100, 1000), backup(1, 250, 2500)],
            &segs,
            &good(&segs),
        );
        assert_eq!(spans(&ws), [(1, 100, 400, Some(4000))]);
        assert_eq!(ws[0].backups.len(), 2);
        assert_eq!(ws[0].ends, WindowEnd::Tip);
        assert!(ws[0].unread.is_none());
    }

    #[test]
    fn a_hole_in_the_middle_ends_the_window() {
        let segs = vec![seg(1, 100, 200), seg(1, 300, 400)];
        let c = catalog(vec![backup(1, 100, 1000)], segs.clone(), &good(&segs));
        assert_eq!(spans(&c.windows), [(1, 100, 200, Some(2000))]);
        assert_eq!(c.windows[0].ends, WindowEnd::Hole { next: Lsn(300) });
        assert!(c.problems.contains(&Problem::Gap {
            generation: 1,
            from: Lsn(200),
            to: Lsn(300)
        }));
        assert!(
            c.problems.iter().any(|p| matches!(
                p,
                Problem::Unreachable {
                    segments: 1,
                    no_backup: false,
                    ..
                }
            )),
            "{:?}",
            c.problems
        );
        assert!(
            c.latest_window().is_err(),
            "--latest must not skip the hole"
        );
    }

    #[test]
    fn a_backup_whose_segments_are_gone_is_a_point() {
        // The segment holding the backup's position is gone (pruned, or lost).
        let segs = vec![seg(1, 200, 300)];
        let c = catalog(vec![backup(1, 100, 1000)], segs.clone(), &good(&segs));
        assert!(c.windows.is_empty());
        assert_eq!(c.points, vec![backup(1, 100, 1000)]);
        assert_eq!(c.earliest(), Some(PgTimestamp(1000)));
        let text = c.describe();
        assert!(
            text.contains("restorable points outside every window")
                && text.contains("base backup b1-100 at 2000-01-01 00:00:00.001000+00 (LSN 0/64): --to-backup b1-100"),
            "{text}"
        );
        // The segments after it reach no backup: named, as before.
        assert!(c.problems.iter().any(|p| matches!(
            p,
            Problem::Unreachable {
                no_backup: false,
                ..
            }
        )));
    }

    #[test]
    fn points_between_windows_are_the_nearest_instants_of_a_refused_time() {
        // Window 100..200 (commit at 2000), a point at 3000 whose segments are gone, and a
        // window from a backup at 5000 over 500..600 (commit at 6000).
        let segs = vec![seg(1, 100, 200), seg(1, 500, 600)];
        let c = catalog(
            vec![
                backup(1, 100, 1000),
                backup(1, 300, 3000),
                backup(1, 500, 5000),
            ],
            segs.clone(),
            &good(&segs),
        );
        assert_eq!(c.windows.len(), 2);
        assert_eq!(c.points.len(), 1);
        assert_eq!(
            c.point_at_time(PgTimestamp(3000)).map(|b| b.id.as_str()),
            Some("b1-300")
        );
        assert!(c.point_at_time(PgTimestamp(3001)).is_none());
        let (b, a) = c.nearest_instants(PgTimestamp(2500));
        assert_eq!(b.unwrap().instant, PgTimestamp(2000));
        let a = a.unwrap();
        assert_eq!(a.instant, PgTimestamp(3000));
        assert!(a.text.contains("--to-backup b1-300"), "{}", a.text);
        let (b, a) = c.nearest_instants(PgTimestamp(4000));
        assert_eq!(b.unwrap().instant, PgTimestamp(3000));
        assert!(a.unwrap().text.contains("start of a window"));
        let (b, a) = c.nearest_instants(PgTimestamp(999));
        assert!(b.is_none());
        assert_eq!(a.unwrap().instant, PgTimestamp(1000));
    }

    #[test]
    fn a_backup_after_a_hole_opens_a_new_window() {
        let segs = vec![seg(1, 100, 200), seg(1, 300, 400), seg(1, 400, 500)];
        let ws = windows(
            &[backup(1, 100, 1000), backup(1, 350, 3500)],
            &segs,
            &good(&segs),
        );
        assert_eq!(
            spans(&ws),
            [(1, 100, 200, Some(2000)), (1, 350, 500, Some(5000))]
        );
        assert_eq!(ws[1].segments.len(), 2);
    }

    #[test]
    fn two_generations_have_their_own_windows() {
        let segs = vec![seg(1, 100, 200), seg(2, 900, 1000)];
        let c = catalog(
            vec![backup(1, 100, 1000), backup(2, 900, 9000)],
            segs.clone(),
            &good(&segs),
        );
        assert_eq!(
            spans(&c.windows),
            [(1, 100, 200, Some(2000)), (2, 900, 1000, Some(10000))]
        );
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!(c.latest_window().unwrap().generation, 2);
        assert!(
            c.describe().contains("hole: instants from 2000-01-01 00:00:00.002000+00 to before 2000-01-01 00:00:00.009000+00 are not restorable: generation 2 started anew"),
            "{}",
            c.describe()
        );
    }

    #[test]
    fn a_corrupt_last_segment_ends_the_window_before_it() {
        let segs = vec![seg(1, 100, 200), seg(1, 200, 300)];
        let mut facts = good(&segs);
        facts.insert(
            segs[1].key.clone(),
            SegmentFact::Corrupt("checksum mismatch".into()),
        );
        let c = catalog(vec![backup(1, 100, 1000)], segs, &facts);
        assert_eq!(spans(&c.windows), [(1, 100, 200, Some(2000))]);
        assert!(
            matches!(&c.windows[0].ends, WindowEnd::Damaged { segment, .. } if segment == "0/C8-0/12C")
        );
        assert!(
            c.describe().contains("checksum mismatch"),
            "{}",
            c.describe()
        );
        assert!(c.latest_window().is_err());
    }

    #[test]
    fn segments_without_a_backup_are_named() {
        let segs = vec![seg(3, 100, 200), seg(3, 200, 300)];
        let c = catalog(vec![], segs.clone(), &good(&segs));
        assert!(c.windows.is_empty() && !c.is_empty());
        let text = c.describe();
        assert!(
            text.contains("segments of generation 3 exist") && text.contains("but no base backup"),
            "{text}"
        );
    }

    #[test]
    fn the_facts_needed_are_the_last_segment_then_back_to_a_commit() {
        let segs = vec![seg(1, 100, 200), seg(1, 200, 300)];
        let b = [backup(1, 100, 1000)];
        let mut facts = BTreeMap::new();
        let ws = windows(&b, &segs, &facts);
        assert_eq!(ws[0].unread.as_ref().unwrap().key, segs[1].key);
        facts.insert(
            segs[1].key.clone(),
            SegmentFact::Good {
                latest_commit: None,
            },
        );
        let ws = windows(&b, &segs, &facts);
        assert_eq!(ws[0].unread.as_ref().unwrap().key, segs[0].key);
        facts.insert(
            segs[0].key.clone(),
            SegmentFact::Good {
                latest_commit: Some(PgTimestamp(1500)),
            },
        );
        let ws = windows(&b, &segs, &facts);
        assert!(ws[0].unread.is_none());
        assert_eq!(ws[0].latest_commit, Some(PgTimestamp(1500)));
    }

    #[test]
    fn a_backup_with_nothing_after_it_is_its_own_instant() {
        let segs = vec![seg(1, 100, 200)];
        let ws = windows(
            &[backup(1, 100, 1000), backup(1, 250, 2500)],
            &segs,
            &good(&segs),
        );
        assert_eq!(spans(&ws), [(1, 100, 200, Some(2000)), (1, 250, 250, None)]);
        assert_eq!(ws[1].ends, WindowEnd::Tip);
        let ws = windows(&[backup(2, 900, 9000)], &[], &BTreeMap::new());
        assert_eq!(spans(&ws), [(2, 900, 900, None)]);
    }

    #[test]
    fn a_segment_is_checked_completely_and_against_its_name() {
        use crate::segment::{CommitEntry, Record, SegmentBuilder};
        let mut b = SegmentBuilder::new(1, 1, 1, "app", "tidemark", Lsn(0x100));
        for i in 0..200u64 {
            b.push(&Record {
                lsn: Lsn(0x100 + i),
                server_time: PgTimestamp(i as i64),
                payload: Bytes::from(
                    format!(
                        "M{:x}",
                        i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
                    )
                    .repeat(4),
                ),
            });
        }
        b.commit(CommitEntry {
            commit_lsn: Lsn(0x150),
            end_lsn: Lsn(0x160),
            xid: 7,
            commit_time: PgTimestamp(4242),
            first_record: 0,
        });
        let bytes = b.finish(Lsn(0x200), PgTimestamp(5000));
        let s = seg(1, 0x100, 0x200);
        assert_eq!(
            check_segment(&s, bytes.clone()),
            SegmentFact::Good {
                latest_commit: Some(PgTimestamp(4242))
            }
        );
        let renamed = seg(1, 0x100, 0x300);
        assert!(
            matches!(check_segment(&renamed, bytes.clone()), SegmentFact::Corrupt(d) if d.contains("does not match its name"))
        );
        // A flipped byte inside a block (which the header and trailer checks do not cover).
        let mut flipped = bytes.to_vec();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x20;
        assert!(
            crate::segment::read_info(&flipped).is_ok(),
            "the byte lies in a block"
        );
        assert!(matches!(
            check_segment(&s, Bytes::from(flipped)),
            SegmentFact::Corrupt(_)
        ));
    }

    #[test]
    fn an_overlap_ends_the_window_like_a_gap() {
        let segs = vec![seg(1, 100, 200), seg(1, 150, 300)];
        let c = catalog(vec![backup(1, 100, 1000)], segs.clone(), &good(&segs));
        assert_eq!(spans(&c.windows), [(1, 100, 200, Some(2000))]);
        assert!(
            c.describe()
                .contains("an overlap: the next segment starts at 0/96, before 0/C8"),
            "{}",
            c.describe()
        );
        assert!(c
            .problems
            .iter()
            .any(|p| matches!(p, Problem::Overlap { .. })));
    }
}
