//! `tidemark status`: is the archive healthy? The last archived commit and the last base backup
//! with their ages, the restorable windows, retention breaches, the repository's size by tier,
//! and the last restore drill. Reads the catalog as `list` does (one listing, the manifests, the
//! few segments the windows need) and never writes. `--json` is specified in `proto/status.md`.
//!
//! **Retention breaches** (the pure part, [`breaches`]): a calendar tier (daily, weekly,
//! monthly) is breached when the policy keeps fewer backups for it than it asks for *and than
//! the repository's age allows*. The age allows one backup per complete period since the
//! oldest complete backup's period, that period included and the current one left out: a
//! repository whose oldest backup is from three days ago can hold three dailies (that day, the
//! next, yesterday; today's may not be due yet), so `--retain-daily 30` is no breach there
//! until one of those days lacks a backup. Weeks are ISO weeks, months calendar months, all
//! UTC, as prune counts them. The manual tier is never breached (nobody promises to take
//! backups by hand): its count is shown. The change window (`--retain-changes`) is breached
//! when the newest window does not reach back to its start (or to the oldest backup, in a
//! younger repository): a hole, damage, or a new generation inside it.
//!
//! Healthy means: something is restorable, no damage is listed, and no breach.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

use crate::catalog::retention::{self, Policy, Reason, Selection};
use crate::catalog::{expire, keys, pin, Catalog, Manifest, Problem};
use crate::lsn::{Lsn, PgTimestamp};
use crate::object;
use crate::store::{ObjectMeta, Store};

/// An instant and how long ago it was.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Aged {
    pub at: PgTimestamp,
    pub age_seconds: f64,
}

fn aged(at: PgTimestamp, now: PgTimestamp) -> Aged {
    Aged {
        at,
        age_seconds: (now.0 - at.0) as f64 / 1e6,
    }
}

/// The newest base backup.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastBackup {
    pub id: String,
    pub generation: u32,
    #[serde(flatten)]
    pub snapshot: Aged,
    pub origin: Option<&'static str>,
    pub stored_bytes: u64,
    pub duration_seconds: f64,
}

/// The newest stored segment of the newest generation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastSegment {
    pub key: String,
    pub generation: u32,
    pub end_lsn: Lsn,
    /// When the store says it was written (None: it does not say).
    pub stored: Option<Aged>,
}

/// One tier of the policy against what the repository holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tier {
    pub tier: Reason,
    /// What the policy asks for (`--retain-…`).
    pub policy: u32,
    /// The backups the policy keeps for this tier now.
    pub kept: u32,
    /// What the repository's age allows (min of it and `policy`): fewer kept is a breach.
    pub expected: u32,
    pub breached: bool,
}

/// The change window against the windows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangeWindow {
    pub seconds: u64,
    /// The instant from which every instant must restore: now − the window, or the oldest
    /// backup's instant in a younger repository.
    pub required_from: PgTimestamp,
    /// The earliest instant of the newest window, if `--latest` has one.
    pub restorable_from: Option<PgTimestamp>,
    pub breached: bool,
}

/// Retention against the policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retention {
    pub tiers: Vec<Tier>,
    pub change_window: ChangeWindow,
    /// One line per breach.
    pub breaches: Vec<String>,
}

/// Backups and bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Size {
    pub backups: usize,
    pub bytes: u64,
}

/// The repository's size: the backups each tier keeps (a backup in several tiers counts in
/// each), those no tier keeps (the next prune removes them), the change log, and the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sizes {
    pub total_bytes: u64,
    pub backups: Size,
    pub tiers: BTreeMap<&'static str, Size>,
    pub unkept: Size,
    pub change_log: ChangeLog,
    /// Manifests of incomplete backups, audit records, pins, locks, the identity.
    pub other_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChangeLog {
    pub segments: usize,
    pub bytes: u64,
}

/// A restore drill's stored result, as far as `status` reads it (`proto/status.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub started_at: PgTimestamp,
    pub finished_at: PgTimestamp,
    pub ok: bool,
    #[serde(default)]
    pub rto_seconds: Option<f64>,
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    #[serde(default)]
    pub detail: Option<String>,
}

/// The last drill.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Drill {
    pub key: String,
    pub age_seconds: f64,
    #[serde(flatten)]
    pub record: DrillRecord,
}

/// A window, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WindowStatus {
    pub generation: u32,
    pub earliest: PgTimestamp,
    pub latest_commit: Option<PgTimestamp>,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub text: String,
}

/// The whole answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    pub repository: String,
    pub now: PgTimestamp,
    pub healthy: bool,
    /// Why it is not healthy (empty when it is).
    pub unhealthy: Vec<String>,
    /// The last archived commit a restore reaches (the newest window's).
    pub last_commit: Option<Aged>,
    pub last_segment: Option<LastSegment>,
    pub last_backup: Option<LastBackup>,
    pub windows: Vec<WindowStatus>,
    /// Backups outside every window (their own instant only).
    pub points: usize,
    pub problems: Vec<String>,
    pub retention: Retention,
    pub sizes: Sizes,
    /// None: no drill recorded.
    pub last_drill: Option<Drill>,
}

/// Months since year 0, for counting calendar months.
fn month_number(d: NaiveDate) -> i64 {
    i64::from(d.year()) * 12 + i64::from(d.month0())
}

/// The periods of `tier` the repository's age allows: complete periods from the one holding
/// `oldest` up to, not including, the one holding `now`. Pure.
pub fn periods_allowed(tier: Reason, oldest: PgTimestamp, now: PgTimestamp) -> u32 {
    let (a, b) = (
        oldest.to_datetime().date_naive(),
        now.to_datetime().date_naive(),
    );
    let n = match tier {
        Reason::Daily => (b - a).num_days(),
        Reason::Weekly => {
            let monday =
                |d: NaiveDate| d - chrono::Days::new(u64::from(d.weekday().num_days_from_monday()));
            (monday(b) - monday(a)).num_days() / 7
        }
        Reason::Monthly => month_number(b) - month_number(a),
        _ => 0,
    };
    n.clamp(0, i64::from(u32::MAX)) as u32
}

/// The calendar and manual tiers against `policy`, given what `selection` keeps. Pure.
pub fn breaches(
    selection: &Selection,
    policy: &Policy,
    oldest: Option<PgTimestamp>,
    now: PgTimestamp,
) -> Vec<Tier> {
    [
        (Reason::Daily, policy.daily),
        (Reason::Weekly, policy.weekly),
        (Reason::Monthly, policy.monthly),
        (Reason::Manual, policy.manual),
    ]
    .into_iter()
    .map(|(tier, asked)| {
        let kept = selection
            .kept
            .values()
            .filter(|r| r.contains(&tier))
            .count() as u32;
        let expected = match (tier, oldest) {
            (Reason::Manual, _) | (_, None) => 0,
            (_, Some(o)) => asked.min(periods_allowed(tier, o, now)),
        };
        Tier {
            tier,
            policy: asked,
            kept,
            expected,
            breached: kept < expected,
        }
    })
    .collect()
}

/// The change window against the catalog's newest window. Pure.
pub fn change_window(
    cat: &Catalog,
    policy: &Policy,
    oldest: Option<PgTimestamp>,
    now: PgTimestamp,
) -> ChangeWindow {
    let start = PgTimestamp(
        now.0
            .saturating_sub(i64::try_from(policy.changes.as_micros()).unwrap_or(i64::MAX)),
    );
    let required_from = oldest.map_or(start, |o| o.max(start));
    let restorable_from = cat.latest_window().ok().map(|w| w.earliest);
    ChangeWindow {
        seconds: policy.changes.as_secs(),
        required_from,
        restorable_from,
        // An empty repository has nothing to keep yet.
        breached: oldest.is_some() && restorable_from.is_none_or(|e| e > required_from),
    }
}

/// Sizes from one listing and the selection. Pure.
fn sizes(objects: &[ObjectMeta], manifests: &[Manifest], selection: &Selection) -> Sizes {
    let mut by_backup: BTreeMap<&str, u64> = BTreeMap::new();
    let mut s = Sizes::default();
    for o in objects {
        s.total_bytes += o.size;
        if keys::parse_segment(&o.key).is_some() {
            s.change_log.segments += 1;
            s.change_log.bytes += o.size;
        } else if let Some((id, _)) = keys::split_backup_key(&o.key) {
            *by_backup.entry(id).or_default() += o.size;
        }
    }
    for m in manifests {
        let bytes = by_backup.get(m.id.as_str()).copied().unwrap_or(0);
        s.backups.backups += 1;
        s.backups.bytes += bytes;
        match selection.kept.get(&m.id) {
            None => {
                s.unkept.backups += 1;
                s.unkept.bytes += bytes;
            }
            Some(reasons) => {
                for r in reasons {
                    let t = s.tiers.entry(r.as_str()).or_default();
                    t.backups += 1;
                    t.bytes += bytes;
                }
            }
        }
    }
    s.other_bytes = s.total_bytes - s.backups.bytes - s.change_log.bytes;
    s
}

/// The newest drill record under `drills/`, if any. One that cannot be read is a problem.
async fn last_drill(
    store: &Arc<dyn Store>,
    objects: &[ObjectMeta],
    now: PgTimestamp,
) -> Result<Result<Option<Drill>, String>, object::ObjectError> {
    let Some(newest) = objects
        .iter()
        .filter(|o| o.key.starts_with(keys::DRILLS) && o.key.ends_with(".json"))
        .max_by(|a, b| a.key.cmp(&b.key))
    else {
        return Ok(Ok(None));
    };
    let bytes = match object::get_object(&**store, &newest.key).await {
        Ok(b) => b,
        Err(e @ object::ObjectError::Crypt(_)) => return Err(e),
        Err(e) => return Ok(Err(format!("{} cannot be read: {e}", newest.key))),
    };
    match serde_json::from_slice::<DrillRecord>(&bytes) {
        Ok(record) => Ok(Ok(Some(Drill {
            key: newest.key.clone(),
            age_seconds: (now.0 - record.finished_at.0) as f64 / 1e6,
            record,
        }))),
        Err(e) => Ok(Err(format!("{} is not a drill record: {e}", newest.key))),
    }
}

/// Reads the repository's status at `now`.
pub async fn status(
    store: &Arc<dyn Store>,
    policy: &Policy,
    now: PgTimestamp,
) -> anyhow::Result<Status> {
    let identity_problem = match crate::catalog::identity::read_identity(store).await {
        Ok(_) => None,
        Err(e) if crate::verify::stops(&e) => return Err(e.into()),
        Err(e) => Some(e.to_string()),
    };
    let (cat, manifests) = Catalog::load(store).await?;
    let objects = store.list("").await?;
    let pins = pin::read_pins(store).await?;
    let selection = retention::select(&expire::candidates(&manifests, &pins), policy, now);
    let oldest = manifests.iter().map(|m| m.snapshot_time).min();
    let tiers = breaches(&selection, policy, oldest, now);
    let window = change_window(&cat, policy, oldest, now);
    let mut lines: Vec<String> = tiers
        .iter()
        .filter(|t| t.breached)
        .map(|t| {
            format!(
                "retention: the {} tier keeps {} backup(s); the policy asks for {} and the repository's age allows {}",
                t.tier.as_str(),
                t.kept,
                t.policy,
                t.expected
            )
        })
        .collect();
    if window.breached {
        lines.push(match window.restorable_from {
            Some(e) => format!(
                "retention: the change window ({}) must restore every instant from {}, but the newest window starts at {e}",
                humantime::format_duration(policy.changes),
                window.required_from
            ),
            None => format!(
                "retention: the change window ({}) must restore every instant from {}, but no window reaches the end of the archive (--latest cannot be restored)",
                humantime::format_duration(policy.changes),
                window.required_from
            ),
        });
    }
    let newest = manifests
        .iter()
        .max_by_key(|m| (m.snapshot_time, m.generation, m.consistent_point));
    let backup_bytes = |m: &Manifest| {
        objects
            .iter()
            .filter(|o| keys::split_backup_key(&o.key).is_some_and(|(id, _)| id == m.id))
            .map(|o| o.size)
            .sum::<u64>()
    };
    let last_segment = cat
        .segments
        .iter()
        .next_back()
        .and_then(|(_, chain)| chain.last())
        .map(|s| LastSegment {
            key: s.key.clone(),
            generation: s.generation,
            end_lsn: s.end,
            stored: objects
                .iter()
                .find(|o| o.key == s.key)
                .and_then(|o| o.modified)
                .map(|t| aged(PgTimestamp::from_datetime(t.into()), now)),
        });
    let (drill, drill_problem) = match last_drill(store, &objects, now).await? {
        Ok(d) => (d, None),
        Err(p) => (None, Some(p)),
    };
    let problems: Vec<String> = cat
        .problems
        .iter()
        .filter(|p| !matches!(p, Problem::IncompleteBackup { .. }))
        .map(|p| p.to_string())
        .chain(identity_problem)
        .chain(drill_problem)
        .collect();
    let mut unhealthy = Vec::new();
    if cat.windows.is_empty() && cat.points.is_empty() {
        unhealthy.push("nothing is restorable".to_string());
    }
    unhealthy.extend(problems.iter().map(|p| format!("damage: {p}")));
    unhealthy.extend(lines.iter().cloned());
    Ok(Status {
        repository: store.location(),
        now,
        healthy: unhealthy.is_empty(),
        unhealthy,
        last_commit: cat.latest_commit().map(|t| aged(t, now)),
        last_segment,
        last_backup: newest.map(|m| LastBackup {
            id: m.id.clone(),
            generation: m.generation,
            snapshot: aged(m.snapshot_time, now),
            origin: m.origin.map(|o| o.as_str()),
            stored_bytes: backup_bytes(m),
            duration_seconds: (m.finished_at.0 - m.started_at.0).max(0) as f64 / 1e6,
        }),
        windows: cat
            .windows
            .iter()
            .map(|w| WindowStatus {
                generation: w.generation,
                earliest: w.earliest,
                latest_commit: w.latest_commit,
                start_lsn: w.start_lsn,
                end_lsn: w.end_lsn,
                text: w.describe(),
            })
            .collect(),
        points: cat.points.len(),
        problems,
        retention: Retention {
            tiers,
            change_window: window,
            breaches: lines,
        },
        sizes: sizes(&objects, &manifests, &selection),
        last_drill: drill,
    })
}

/// A duration in seconds as people read it (`3h 2m`), to the second.
fn age(seconds: f64) -> String {
    let d = std::time::Duration::from_secs(seconds.max(0.0) as u64);
    format!("{} ago", humantime::format_duration(d))
}

/// The status as text.
pub fn describe(s: &Status) -> String {
    let mut out = format!(
        "repository {}: {}\n",
        s.repository,
        if s.healthy { "healthy" } else { "NOT HEALTHY" }
    );
    for u in &s.unhealthy {
        out.push_str(&format!("  {u}\n"));
    }
    match &s.last_commit {
        Some(c) => out.push_str(&format!(
            "last archived commit: {} ({})\n",
            c.at,
            age(c.age_seconds)
        )),
        None => out.push_str("last archived commit: none restorable yet\n"),
    }
    if let Some(seg) = &s.last_segment {
        out.push_str(&format!(
            "last segment: generation {} to {}{}\n",
            seg.generation,
            seg.end_lsn,
            seg.stored
                .as_ref()
                .map(|a| format!(", stored {}", age(a.age_seconds)))
                .unwrap_or_default()
        ));
    }
    match &s.last_backup {
        Some(b) => out.push_str(&format!(
            "last base backup: {} at {} ({}), {} bytes, {:.1}s{}\n",
            b.id,
            b.snapshot.at,
            age(b.snapshot.age_seconds),
            b.stored_bytes,
            b.duration_seconds,
            b.origin.map(|o| format!(", {o}")).unwrap_or_default()
        )),
        None => out.push_str("last base backup: none\n"),
    }
    out.push_str(&format!(
        "restorable windows: {}{}\n",
        s.windows.len(),
        if s.points > 0 {
            format!(" (and {} point(s) outside them)", s.points)
        } else {
            String::new()
        }
    ));
    for w in &s.windows {
        out.push_str(&format!("  {}\n", w.text));
    }
    out.push_str("retention:\n");
    for t in &s.retention.tiers {
        out.push_str(&format!(
            "  {:<8} {} kept, policy {}, age allows {}{}\n",
            t.tier.as_str(),
            t.kept,
            t.policy,
            t.expected,
            if t.breached { ": BREACHED" } else { "" }
        ));
    }
    let cw = &s.retention.change_window;
    out.push_str(&format!(
        "  changes  every instant from {} restorable: {}\n",
        cw.required_from,
        if cw.breached { "BREACHED" } else { "yes" }
    ));
    let z = &s.sizes;
    out.push_str(&format!(
        "size: {} bytes: {} base backup(s) {} bytes, change log {} segment(s) {} bytes, other {} bytes\n",
        z.total_bytes, z.backups.backups, z.backups.bytes, z.change_log.segments, z.change_log.bytes, z.other_bytes
    ));
    for (tier, size) in &z.tiers {
        out.push_str(&format!(
            "  {tier:<13} {} backup(s), {} bytes\n",
            size.backups, size.bytes
        ));
    }
    if z.unkept.backups > 0 {
        out.push_str(&format!(
            "  {:<13} {} backup(s), {} bytes (the next prune removes them)\n",
            "unkept", z.unkept.backups, z.unkept.bytes
        ));
    }
    match &s.last_drill {
        None => out.push_str("last drill: no drill recorded\n"),
        Some(d) => out.push_str(&format!(
            "last drill: {} ({}): {}{}\n",
            d.record.finished_at,
            age(d.age_seconds),
            if d.record.ok { "ok" } else { "FAILED" },
            d.record
                .rto_seconds
                .map(|r| format!(", RTO {r:.1}s"))
                .unwrap_or_default()
        )),
    }
    out
}

/// `tidemark status`: prints the status (text or JSON). Exits 0 whether healthy or not (the
/// answer is in the output: `healthy`); errors only when the repository cannot be read.
pub async fn run(store: &Arc<dyn Store>, policy: &Policy, json: bool) -> anyhow::Result<()> {
    let s = status(store, policy, PgTimestamp::now()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", describe(&s));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
