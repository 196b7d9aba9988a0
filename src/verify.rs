//! `tidemark verify`: reads the repository's objects and proves, or refutes, what `list` claims.
//!
//! One listing of the repository is taken and everything is judged against it (objects an
//! archiver stores meanwhile are not looked at, so verifying beside a running archiver finds no
//! false damage). Then:
//! 1. the manifests are read (one that does not parse is damage), and each segment chain is
//!    walked for gaps and overlaps;
//! 2. the windows `list` would show are computed from the same listing, exactly as the catalog
//!    computes them (reading the segments it reads);
//! 3. every segment and every base backup's schema dump and parts are checked: present in the
//!    listing (a part with the size its manifest records), and, but with `--quick`, read
//!    whole and checked as a restore checks them (a segment's structure, every block's
//!    checksums and decoding, its header against its name; a part's CRC-32, lz4 frame and
//!    size; the dump's CRC-32 and size), at most `parallel` objects in flight;
//! 4. each claimed window and point is checked object by object: every backup in it sound, every
//!    segment of it present and sound. A window that fails names what it needs.
//!
//! `--from T` limits steps 3 and 4 to what restoring an instant at or after T needs: in each
//! window that holds such instants, the newest backup at or before T (or the first) and every
//! backup and segment after it; the points from T on.
//!
//! Owns: the [`Finding`]s and the report (`--json` is specified in `proto/verify.md`). Uses the
//! catalog's rules and the segment and part checks restore uses; adds no rule of its own about
//! what is restorable. Invariant: a report without findings means every window and point it
//! lists restores from objects that were read and found intact (with `--quick`: that were
//! listed with the right sizes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;

use crate::backup::{check_part, check_schema};
use crate::catalog::{
    self, chain, identity, manifest, BackupRef, Catalog, Manifest, Problem, RepoError, SegmentFact,
    SegmentRef, Window,
};
use crate::error::{split_hints, Classify, ExitStatus};
use crate::lsn::{Lsn, PgTimestamp};
use crate::object::{self, ObjectError};
use crate::store::{ObjectMeta, Store, StoreError};

/// What to verify and how.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Only what restoring instants at or after this one needs.
    pub from: Option<PgTimestamp>,
    /// Listings, sizes and the chain only: no object body is read (manifests are).
    pub quick: bool,
    /// Objects read at once (each held whole while it is checked).
    pub parallel: usize,
}

impl Default for VerifyOptions {
    fn default() -> VerifyOptions {
        VerifyOptions {
            from: None,
            quick: false,
            parallel: 4,
        }
    }
}

/// Something wrong in the repository, naming the object and its LSN range or backup id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// No segment holds `from`..`to` (a segment is missing between `after` and `before`).
    Gap {
        generation: u32,
        from: Lsn,
        to: Lsn,
        after: String,
        before: String,
    },
    /// Two segments hold the same changes.
    Overlap {
        generation: u32,
        prev: String,
        next: String,
    },
    /// A segment that cannot be read or fails its checks.
    DamagedSegment {
        generation: u32,
        key: String,
        start_lsn: Lsn,
        end_lsn: Lsn,
        detail: String,
    },
    /// A manifest that cannot be read or parsed.
    DamagedManifest { key: String, detail: String },
    /// An object a manifest lists that the repository does not hold.
    MissingObject { backup: String, key: String },
    /// A base backup's object that is truncated or fails its checks.
    DamagedObject {
        backup: String,
        key: String,
        detail: String,
    },
    /// `archive.json` cannot be read.
    DamagedIdentity { detail: String },
    /// Segments no base backup reaches (as `list` reports them).
    Unreachable {
        generation: u32,
        from: Lsn,
        to: Lsn,
        segments: usize,
    },
    /// A window `list` shows that is not restorable as shown: the objects it needs that are
    /// damaged or missing.
    BrokenWindow {
        generation: u32,
        start_lsn: Lsn,
        end_lsn: Lsn,
        claimed: String,
        needs: Vec<String>,
    },
    /// A point (a backup outside every window) whose backup is damaged.
    BrokenPoint { backup: String, needs: Vec<String> },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Gap { generation, from, to, after, before } => write!(
                f,
                "generation {generation}: gap: no segment holds the changes from {from} to {to} (missing between {after} and {before})"
            ),
            Finding::Overlap { generation, prev, next } => write!(
                f,
                "generation {generation}: segments {prev} and {next} overlap"
            ),
            Finding::DamagedSegment { generation, key, start_lsn, end_lsn, detail } => write!(
                f,
                "generation {generation}: segment {start_lsn}-{end_lsn} ({key}) is damaged: {detail}"
            ),
            Finding::DamagedManifest { key, detail } => {
                write!(f, "manifest {key} cannot be used: {detail}")
            }
            Finding::MissingObject { backup, key } => write!(
                f,
                "base backup {backup}: {key} is missing (its manifest lists it)"
            ),
            Finding::DamagedObject { backup, key, detail } => {
                write!(f, "base backup {backup}: {key} is damaged: {detail}")
            }
            Finding::DamagedIdentity { detail } => write!(f, "{}: {detail}", catalog::keys::IDENTITY),
            Finding::Unreachable { generation, from, to, segments } => write!(
                f,
                "generation {generation}: {segments} segment(s) from {from} to {to} are reached by no usable base backup"
            ),
            Finding::BrokenWindow { claimed, needs, .. } => write!(
                f,
                "window not restorable as listed ({claimed}): it needs {}",
                needs.join(", ")
            ),
            Finding::BrokenPoint { backup, needs } => write!(
                f,
                "point --to-backup {backup} is not restorable: it needs {}",
                needs.join(", ")
            ),
        }
    }
}

/// How many objects and bytes were checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Checked {
    pub segments: usize,
    pub segment_bytes: u64,
    pub backups: usize,
    pub backup_objects: usize,
    pub backup_bytes: u64,
    /// Bytes read from the store (0 with `--quick` but for the manifests).
    pub bytes_read: u64,
}

/// A window or point as `list` shows it, and whether it held up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Claim {
    pub generation: u32,
    /// The backup a point restores, or a window's first backup.
    pub backup: String,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub earliest: PgTimestamp,
    pub latest_commit: Option<PgTimestamp>,
    /// Checked (inside `--from`'s reach).
    pub checked: bool,
    pub restorable: bool,
    pub text: String,
}

/// What verify found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub repository: String,
    pub quick: bool,
    pub from: Option<PgTimestamp>,
    pub checked: Checked,
    pub windows: Vec<Claim>,
    pub points: Vec<Claim>,
    pub problems: Vec<FindingListing>,
    /// What is worth knowing but no damage (a backup still being written: no manifest yet).
    pub notes: Vec<String>,
    pub ok: bool,
}

/// A finding with its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FindingListing {
    #[serde(flatten)]
    pub finding: Finding,
    pub text: String,
}

/// The error a verify that found damage ends with (exit 5).
#[derive(Debug, thiserror::Error)]
#[error("verify found {count} problem(s) in {location}\nHINT: `tidemark list` shows what is still restorable; take a new base backup (`tidemark backup`) so the archive is whole from now on, and restore damaged objects from another copy of the repository if there is one")]
pub struct Damage {
    pub location: String,
    pub count: usize,
}

impl Classify for Damage {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::Damaged
    }
}

/// The error of a verify of a repository that holds nothing (exit 4): a wrong `--repo` must
/// not pass as a sound archive.
#[derive(Debug, thiserror::Error)]
#[error("{location} holds no archive: no base backup and no segment to verify\nHINT: check --repo (and the S3 flags); `tidemark list` shows what a repository holds")]
pub struct NothingToVerify {
    pub location: String,
}

impl Classify for NothingToVerify {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::Repository
    }
}

/// The message of an error without its `HINT:` lines, and without a leading `key: `.
fn detail(key: &str, e: &dyn std::fmt::Display) -> String {
    let (text, _) = split_hints(&e.to_string());
    let text = text.replace('\n', " ");
    text.strip_prefix(&format!("{key}: "))
        .map(str::to_string)
        .unwrap_or(text)
}

/// What instants from `from` need: the segment keys and backup ids (`None`: everything).
struct Needs {
    segments: BTreeSet<String>,
    backups: BTreeSet<String>,
    /// Per generation, the lowest position a needed window starts at.
    from_lsn: BTreeMap<u32, Lsn>,
}

/// In window `w`, the backups and segments instants at or after `from` need, if any. Pure.
fn window_needs(w: &Window, from: PgTimestamp) -> Option<(Vec<&BackupRef>, Vec<&SegmentRef>)> {
    if w.latest_commit.is_some_and(|lc| lc <= from) {
        return None;
    }
    let base = w
        .backups
        .iter()
        .rposition(|b| b.snapshot_time <= from)
        .unwrap_or(0);
    let cp = w.backups[base].consistent_point;
    Some((
        w.backups[base..].iter().collect(),
        w.segments.iter().filter(|s| s.end > cp).collect(),
    ))
}

fn needs(claimed: &Catalog, from: PgTimestamp) -> Needs {
    let mut n = Needs {
        segments: BTreeSet::new(),
        backups: BTreeSet::new(),
        from_lsn: BTreeMap::new(),
    };
    for w in &claimed.windows {
        if let Some((backups, segments)) = window_needs(w, from) {
            let lsn = backups[0].consistent_point;
            let e = n.from_lsn.entry(w.generation).or_insert(lsn);
            *e = (*e).min(lsn);
            n.backups.extend(backups.iter().map(|b| b.id.clone()));
            n.segments.extend(segments.iter().map(|s| s.key.clone()));
        }
    }
    for p in claimed.points.iter().filter(|p| p.snapshot_time >= from) {
        n.backups.insert(p.id.clone());
    }
    n
}

/// Reads the segments `wanted` not in `facts` yet, `parallel` at once, into `facts`.
async fn read_facts(
    store: &Arc<dyn Store>,
    wanted: Vec<SegmentRef>,
    facts: &mut BTreeMap<String, SegmentFact>,
    parallel: usize,
    checked: &mut Checked,
) -> Result<(), ObjectError> {
    let todo: Vec<SegmentRef> = wanted
        .into_iter()
        .filter(|s| !facts.contains_key(&s.key))
        .collect();
    let mut reads = futures_util::stream::iter(todo)
        .map(|s| async move {
            let fact = catalog::read_fact(store, &s).await;
            (s, fact)
        })
        .buffer_unordered(parallel.max(1));
    while let Some((s, fact)) = reads.next().await {
        checked.bytes_read += s.size;
        facts.insert(s.key.clone(), fact?);
    }
    Ok(())
}

/// The catalog `list` shows for this listing: the windows computed as [`Catalog::load`]
/// computes them, reading the segments it reads (none with `quick`).
async fn claimed_catalog(
    store: &Arc<dyn Store>,
    backups: &[BackupRef],
    segments: &BTreeMap<u32, Vec<SegmentRef>>,
    problems: Vec<Problem>,
    opts: &VerifyOptions,
    facts: &mut BTreeMap<String, SegmentFact>,
    checked: &mut Checked,
) -> Result<Catalog, ObjectError> {
    let all: Vec<SegmentRef> = segments.values().flatten().cloned().collect();
    let mut seen: BTreeMap<String, SegmentFact> = BTreeMap::new();
    // With --quick nothing is read: every segment is taken as intact, as the windows rule does
    // for a segment it has no facts of.
    loop {
        let unread: Vec<SegmentRef> = catalog::windows(backups, &all, &seen)
            .into_iter()
            .filter_map(|w| w.unread)
            .collect();
        if opts.quick || unread.is_empty() {
            break;
        }
        read_facts(store, unread.clone(), facts, opts.parallel, checked).await?;
        for s in unread {
            seen.insert(s.key.clone(), facts[&s.key].clone());
        }
    }
    Ok(Catalog::build(
        store.location(),
        backups.to_vec(),
        segments.clone(),
        &seen,
        problems,
    ))
}

/// Checks one backup's objects: present with the recorded size, and (unless `quick`) read
/// and checked. Returns the findings.
async fn check_backup(
    store: &Arc<dyn Store>,
    m: &Manifest,
    listed: &BTreeMap<String, u64>,
    opts: &VerifyOptions,
) -> Result<(Vec<Finding>, Checked), ObjectError> {
    let mut found = Vec::new();
    let mut checked = Checked {
        backups: 1,
        ..Checked::default()
    };
    let missing = |key: &str| Finding::MissingObject {
        backup: m.id.clone(),
        key: key.to_string(),
    };
    let damaged = |key: &str, detail: String| Finding::DamagedObject {
        backup: m.id.clone(),
        key: key.to_string(),
        detail,
    };
    // The schema dump: its recorded size is of the plain dump (a sealed one is larger).
    checked.backup_objects += 1;
    match listed.get(&m.schema.key) {
        None => found.push(missing(&m.schema.key)),
        Some(&size) => {
            checked.backup_bytes += size;
            if !opts.quick {
                checked.bytes_read += size;
                match read(store, &m.schema.key).await? {
                    Err(d) => found.push(damaged(&m.schema.key, d)),
                    Ok(dump) => {
                        if let Err(e) = check_schema(m, &dump) {
                            found.push(damaged(&m.schema.key, detail(&m.schema.key, &e)));
                        }
                    }
                }
            }
        }
    }
    let parts: Vec<_> = m.tables.iter().flat_map(|t| t.parts.iter()).collect();
    let mut to_read = Vec::new();
    for p in parts {
        checked.backup_objects += 1;
        match listed.get(&p.key) {
            None => found.push(missing(&p.key)),
            Some(&size) if size != p.stored_bytes => found.push(damaged(
                &p.key,
                format!(
                    "stored object is {size} bytes but the manifest records {}: truncated or replaced",
                    p.stored_bytes
                ),
            )),
            Some(&size) => {
                checked.backup_bytes += size;
                if !opts.quick {
                    to_read.push(p);
                }
            }
        }
    }
    let mut reads = futures_util::stream::iter(to_read)
        .map(|p| async move {
            let r = match read(store, &p.key).await {
                Ok(Ok(stored)) => Ok(check_part(p, &stored).err().map(|e| detail(&p.key, &e))),
                Ok(Err(d)) => Ok(Some(d)),
                Err(e) => Err(e),
            };
            (p, r)
        })
        .buffer_unordered(opts.parallel.max(1));
    while let Some((p, r)) = reads.next().await {
        checked.bytes_read += p.stored_bytes;
        if let Some(d) = r? {
            found.push(damaged(&p.key, d));
        }
    }
    Ok((found, checked))
}

/// Reads an object: its bytes, or why it is damaged (gone since the listing, or undecodable).
/// A failing store and a key missing from the keyring stop the command.
async fn read(
    store: &Arc<dyn Store>,
    key: &str,
) -> Result<Result<bytes::Bytes, String>, ObjectError> {
    match object::get_object(&**store, key).await {
        Ok(b) => Ok(Ok(b)),
        Err(ObjectError::Store(StoreError::NotFound { .. })) => {
            Ok(Err("listed, but gone when read".into()))
        }
        Err(e @ ObjectError::Undecodable { .. }) => Ok(Err(detail(key, &e))),
        Err(e) => Err(e),
    }
}

/// The gaps and overlaps of one chain, in LSN order, those ending after `from` only. Pure.
fn chain_findings(chain: &[SegmentRef], from: Option<Lsn>) -> Vec<Finding> {
    let mut out = Vec::new();
    for w in chain.windows(2) {
        let (prev, next) = (&w[0], &w[1]);
        if from.is_some_and(|f| next.start <= f) {
            continue;
        }
        if next.start > prev.end {
            out.push(Finding::Gap {
                generation: prev.generation,
                from: prev.end,
                to: next.start,
                after: prev.key.clone(),
                before: next.key.clone(),
            });
        } else if next.start < prev.end {
            out.push(Finding::Overlap {
                generation: prev.generation,
                prev: prev.key.clone(),
                next: next.key.clone(),
            });
        }
    }
    out
}

/// Whether reading the identity failed in a way that stops any reader: a failing store, a
/// repository of a newer format, or a keyring that does not fit it (as restore decides).
pub fn stops(e: &RepoError) -> bool {
    matches!(
        e,
        RepoError::NewerFormat { .. }
            | RepoError::Store(_)
            | RepoError::Object(ObjectError::Crypt(_))
    )
}

/// Verifies the repository (see the module doc). Damage is in the report; only a failing
/// store, a newer format or a keyring that cannot open an object is an error.
pub async fn verify(
    store: &Arc<dyn Store>,
    opts: &VerifyOptions,
) -> Result<VerifyReport, RepoError> {
    let mut findings: Vec<Finding> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut checked = Checked::default();
    match identity::read_identity(store).await {
        Ok(_) => {}
        Err(e) if stops(&e) => return Err(e),
        Err(e) => findings.push(Finding::DamagedIdentity {
            detail: detail(catalog::keys::IDENTITY, &e),
        }),
    }
    let objects: Vec<ObjectMeta> = store.list("").await?;
    let scan = manifest::read_manifests(store, &objects).await?;
    for id in &scan.incomplete {
        notes.push(format!(
            "{}{id}/ has no manifest.json: a base backup still being written, or one whose manifest was deleted; not checked",
            manifest::ROOT
        ));
    }
    for (key, d) in &scan.unreadable {
        findings.push(Finding::DamagedManifest {
            key: key.clone(),
            detail: d.clone(),
        });
    }
    let listed: BTreeMap<String, u64> = objects.iter().map(|o| (o.key.clone(), o.size)).collect();
    let segments = chain::group_segments(
        objects
            .iter()
            .filter(|o| o.key.starts_with(chain::SEGMENTS_PREFIX))
            .map(|o| (o.key.clone(), o.size)),
    );
    let backups: Vec<BackupRef> = scan.manifests.iter().map(BackupRef::of).collect();
    let mut facts: BTreeMap<String, SegmentFact> = BTreeMap::new();
    let claimed = claimed_catalog(
        store,
        &backups,
        &segments,
        Vec::new(),
        opts,
        &mut facts,
        &mut checked,
    )
    .await?;
    let reach = opts.from.map(|t| needs(&claimed, t));

    // The chains.
    for (g, chain) in &segments {
        let from = match &reach {
            None => None,
            Some(n) => match n.from_lsn.get(g) {
                Some(l) => Some(*l),
                None => continue,
            },
        };
        findings.extend(chain_findings(chain, from));
    }
    if reach.is_none() {
        for p in &claimed.problems {
            if let Problem::Unreachable {
                generation,
                from,
                to,
                segments,
                ..
            } = p
            {
                findings.push(Finding::Unreachable {
                    generation: *generation,
                    from: *from,
                    to: *to,
                    segments: *segments,
                });
            }
        }
    }

    // Every segment needed.
    let wanted: Vec<SegmentRef> = segments
        .values()
        .flatten()
        .filter(|s| reach.as_ref().is_none_or(|n| n.segments.contains(&s.key)))
        .cloned()
        .collect();
    checked.segments = wanted.len();
    checked.segment_bytes = wanted.iter().map(|s| s.size).sum();
    if opts.quick {
        for s in &wanted {
            if s.size == 0 {
                facts.insert(s.key.clone(), SegmentFact::Corrupt("empty object".into()));
            }
        }
    } else {
        read_facts(
            store,
            wanted.clone(),
            &mut facts,
            opts.parallel,
            &mut checked,
        )
        .await?;
    }
    for s in &wanted {
        if let Some(SegmentFact::Corrupt(d)) = facts.get(&s.key) {
            findings.push(Finding::DamagedSegment {
                generation: s.generation,
                key: s.key.clone(),
                start_lsn: s.start,
                end_lsn: s.end,
                detail: d.clone(),
            });
        }
    }

    // Every backup needed.
    let mut broken_backups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in scan
        .manifests
        .iter()
        .filter(|m| reach.as_ref().is_none_or(|n| n.backups.contains(&m.id)))
    {
        let (found, c) = check_backup(store, m, &listed, opts).await?;
        checked.backups += c.backups;
        checked.backup_objects += c.backup_objects;
        checked.backup_bytes += c.backup_bytes;
        checked.bytes_read += c.bytes_read;
        for f in &found {
            if let Finding::MissingObject { key, .. } | Finding::DamagedObject { key, .. } = f {
                broken_backups
                    .entry(m.id.clone())
                    .or_default()
                    .push(key.clone());
            }
        }
        findings.extend(found);
    }

    // The claims.
    let backup_needs = |b: &BackupRef| -> Vec<String> {
        broken_backups
            .get(&b.id)
            .map(|keys| {
                keys.iter()
                    .map(|k| format!("{k} of base backup {}", b.id))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut windows = Vec::new();
    for w in &claimed.windows {
        let (bs, ss): (Vec<&BackupRef>, Vec<&SegmentRef>) = match opts.from {
            None => (w.backups.iter().collect(), w.segments.iter().collect()),
            Some(t) => window_needs(w, t).unwrap_or_default(),
        };
        let mut needs: Vec<String> = bs.iter().flat_map(|b| backup_needs(b)).collect();
        // (A missing segment is a gap, which already ends the window where list shows it.)
        for s in &ss {
            if let Some(SegmentFact::Corrupt(_)) = facts.get(&s.key) {
                needs.push(format!("the damaged segment {} ({})", s.range(), s.key));
            }
        }
        let claim = Claim {
            generation: w.generation,
            backup: w.backups[0].id.clone(),
            start_lsn: w.start_lsn,
            end_lsn: w.end_lsn,
            earliest: w.earliest,
            latest_commit: w.latest_commit,
            checked: !bs.is_empty(),
            restorable: needs.is_empty(),
            text: w.describe(),
        };
        if !needs.is_empty() {
            findings.push(Finding::BrokenWindow {
                generation: w.generation,
                start_lsn: w.start_lsn,
                end_lsn: w.end_lsn,
                claimed: w.describe(),
                needs,
            });
        }
        windows.push(claim);
    }
    let mut points = Vec::new();
    for b in &claimed.points {
        let checked_it = opts.from.is_none_or(|t| b.snapshot_time >= t);
        let needs = if checked_it {
            backup_needs(b)
        } else {
            Vec::new()
        };
        points.push(Claim {
            generation: b.generation,
            backup: b.id.clone(),
            start_lsn: b.consistent_point,
            end_lsn: b.consistent_point,
            earliest: b.snapshot_time,
            latest_commit: None,
            checked: checked_it,
            restorable: needs.is_empty(),
            text: catalog::describe_point(b),
        });
        if !needs.is_empty() {
            findings.push(Finding::BrokenPoint {
                backup: b.id.clone(),
                needs,
            });
        }
    }
    Ok(VerifyReport {
        repository: store.location(),
        quick: opts.quick,
        from: opts.from,
        checked,
        windows,
        points,
        ok: findings.is_empty(),
        problems: findings
            .into_iter()
            .map(|f| FindingListing {
                text: f.to_string(),
                finding: f,
            })
            .collect(),
        notes,
    })
}

/// `tidemark verify`: verifies, prints the report (text or JSON), and ends with [`Damage`]
/// (exit 5) when anything is wrong.
pub async fn run(store: &Arc<dyn Store>, opts: &VerifyOptions, json: bool) -> anyhow::Result<()> {
    let r = verify(store, opts).await?;
    if r.ok && r.windows.is_empty() && r.points.is_empty() && r.checked.segments == 0 {
        return Err(NothingToVerify {
            location: r.repository,
        }
        .into());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", describe(&r));
    }
    if r.ok {
        return Ok(());
    }
    Err(Damage {
        location: r.repository.clone(),
        count: r.problems.len(),
    }
    .into())
}

/// The report as text.
pub fn describe(r: &VerifyReport) -> String {
    let c = &r.checked;
    let mut out = format!(
        "verified {}{}{}: {} segment(s) ({} bytes), {} base backup(s) ({} objects, {} bytes); {} bytes read\n",
        r.repository,
        if r.quick { " (quick: listings, sizes and the chain; no object read but the manifests)" } else { "" },
        r.from.map(|t| format!(" for instants from {t}")).unwrap_or_default(),
        c.segments,
        c.segment_bytes,
        c.backups,
        c.backup_objects,
        c.backup_bytes,
        c.bytes_read,
    );
    for w in &r.windows {
        let verdict = match (w.checked, w.restorable) {
            (false, _) => "not checked (before --from)",
            (true, true) => "ok",
            (true, false) => "NOT RESTORABLE as listed",
        };
        out.push_str(&format!("  window: {} — {verdict}\n", w.text));
    }
    for p in &r.points {
        let verdict = match (p.checked, p.restorable) {
            (false, _) => "not checked (before --from)",
            (true, true) => "ok",
            (true, false) => "NOT RESTORABLE",
        };
        out.push_str(&format!("  point: {} — {verdict}\n", p.text));
    }
    for n in &r.notes {
        out.push_str(&format!("  note: {n}\n"));
    }
    for p in &r.problems {
        out.push_str(&format!("  damage: {}\n", p.text));
    }
    if r.ok {
        out.push_str("no damage found\n");
    }
    out
}

#[cfg(test)]
mod tests;
