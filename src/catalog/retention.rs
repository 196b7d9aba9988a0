//! Retention: which base backups and segments a backup policy keeps. Pure: a list of
//! backups and the time in, a [`Selection`] out. [`super::expire`] turns it into the ordered
//! deletions `prune` applies (a dropped backup's manifest first, then its parts; segments
//! oldest first), and `list` shows its reasons as each backup's tiers.
//!
//! The tiers follow restic's `forget --keep-daily/--keep-weekly/--keep-monthly`: walking the
//! backups newest first, a tier keeps a backup when it is the newest of a day (ISO week,
//! calendar month; in UTC) that the tier has not seen yet, until the tier has kept its count.
//! So `--retain-weekly 52` keeps the newest backup of each of the last 52 ISO weeks *that
//! have a backup*. One backup can hold several tiers (a Sunday's daily is also its week's).
//! Manual backups (`backup --tag`, or without one) keep their newest `manual` by count; a
//! pinned backup is kept until unpinned; the newest complete backup is never dropped.
//!
//! What stays restorable (the promise `prune` keeps, and the one the README documents):
//! * every instant of the **change window**, the last `changes` before now: each generation
//!   the window reaches keeps the newest backup whose instant is at or before the window's
//!   start (or, for a generation that began inside the window, its first backup) and every
//!   segment from that backup's consistent point on;
//! * each retained backup's own instant (its consistent point: a restore that replays
//!   nothing), whatever segments around it are gone.
//!
//! Segments are only ever dropped below a kept backup's position, or in a generation whose
//! every backup is dropped and that a newer generation with a backup has replaced. A
//! generation without any backup is never touched: it may be the one an archiver is
//! starting right now (its segments can be stored before its first backup's manifest).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use serde::Serialize;

use crate::lsn::{Lsn, PgTimestamp};

/// How much a repository keeps. The defaults are the policy tidemark was built for: daily
/// full backups for 30 days, weekly archives for a year, monthly ones for five, the last three
/// manual backups, and a day of continuous change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub manual: u32,
    /// The continuous change window: every instant of the last `changes` restores.
    pub changes: Duration,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            daily: 30,
            weekly: 52,
            monthly: 60,
            manual: 3,
            changes: Duration::from_secs(24 * 3600),
        }
    }
}

/// A complete base backup, as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub generation: u32,
    pub consistent_point: Lsn,
    /// The backup's instant (its snapshot time): what the tiers bucket by.
    pub instant: PgTimestamp,
    /// Taken by hand (`tidemark backup`), not by the schedule or at the archiver's start.
    pub manual: bool,
    pub pinned: bool,
}

/// Why a backup stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The newest complete backup: never dropped.
    Newest,
    /// The change window replays from it.
    ChangeWindow,
    Daily,
    Weekly,
    Monthly,
    Manual,
    Pinned,
}

impl Reason {
    /// The word `list` and `prune --json` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Newest => "newest",
            Reason::ChangeWindow => "change_window",
            Reason::Daily => "daily",
            Reason::Weekly => "weekly",
            Reason::Monthly => "monthly",
            Reason::Manual => "manual",
            Reason::Pinned => "pinned",
        }
    }
}

/// What a generation's segments need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "keep", rename_all = "snake_case")]
pub enum SegmentNeed {
    /// Segments that end at or below `lsn` are not needed (the change window's backup of this
    /// generation starts there).
    From { lsn: Lsn },
    /// No restorable instant needs any of this generation's segments.
    None,
}

/// The decision for one repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Every kept backup and why, by id.
    pub kept: BTreeMap<String, BTreeSet<Reason>>,
    /// The backups that go, oldest first.
    pub dropped: Vec<String>,
    /// The start of the change window (now − changes).
    pub window_start: PgTimestamp,
    /// What each generation that has a backup needs of its segments. A generation absent here
    /// keeps all its segments.
    pub segments: BTreeMap<u32, SegmentNeed>,
}

impl Selection {
    /// Whether the segment of `generation` ending at `end` is still needed.
    pub fn needs_segment(&self, generation: u32, end: Lsn) -> bool {
        match self.segments.get(&generation) {
            None => true,
            Some(SegmentNeed::None) => false,
            Some(SegmentNeed::From { lsn }) => end > *lsn,
        }
    }
}

fn date(t: PgTimestamp) -> NaiveDate {
    t.to_datetime().date_naive()
}

/// The bucket of a tier: backups in one bucket are one day (week, month) of that tier.
fn bucket(reason: Reason, t: PgTimestamp) -> i64 {
    let d = date(t);
    match reason {
        Reason::Daily => i64::from(d.num_days_from_ce()),
        Reason::Weekly => {
            let w = d.iso_week();
            i64::from(w.year()) * 100 + i64::from(w.week())
        }
        Reason::Monthly => i64::from(d.year()) * 100 + i64::from(d.month()),
        _ => unreachable!("only the calendar tiers have buckets"),
    }
}

/// Applies `policy` at `now` to the complete backups `backups` (any order). Pure.
pub fn select(backups: &[Candidate], policy: &Policy, now: PgTimestamp) -> Selection {
    let mut order: Vec<&Candidate> = backups.iter().collect();
    // Newest first; ties broken by position, then id, so the result never depends on the input order.
    order.sort_by(|a, b| {
        (b.instant, b.generation, b.consistent_point, &b.id).cmp(&(
            a.instant,
            a.generation,
            a.consistent_point,
            &a.id,
        ))
    });
    let mut kept: BTreeMap<String, BTreeSet<Reason>> = BTreeMap::new();
    let mut keep = |id: &str, r: Reason| {
        kept.entry(id.to_string()).or_default().insert(r);
    };
    if let Some(newest) = order.first() {
        keep(&newest.id, Reason::Newest);
    }
    for (reason, count) in [
        (Reason::Daily, policy.daily),
        (Reason::Weekly, policy.weekly),
        (Reason::Monthly, policy.monthly),
    ] {
        let mut left = count;
        let mut last = None;
        for b in &order {
            if left == 0 {
                break;
            }
            let k = bucket(reason, b.instant);
            if last != Some(k) {
                keep(&b.id, reason);
                last = Some(k);
                left -= 1;
            }
        }
    }
    for b in order
        .iter()
        .filter(|b| b.manual)
        .take(policy.manual as usize)
    {
        keep(&b.id, Reason::Manual);
    }
    for b in order.iter().filter(|b| b.pinned) {
        keep(&b.id, Reason::Pinned);
    }

    let window_start = PgTimestamp(
        now.0
            .saturating_sub(i64::try_from(policy.changes.as_micros()).unwrap_or(i64::MAX)),
    );
    let generations: BTreeSet<u32> = backups.iter().map(|b| b.generation).collect();
    let newest_generation = generations.last().copied();
    let mut segments = BTreeMap::new();
    for &g in &generations {
        let mut of_g: Vec<&Candidate> = order
            .iter()
            .copied()
            .filter(|b| b.generation == g)
            .collect();
        of_g.reverse(); // oldest first
                        // A generation lasts until the next one's first backup: the window reaches it when that
                        // is after the window's start (or when it is the newest).
        let replaced_at = generations.range(g + 1..).next().and_then(|next| {
            backups
                .iter()
                .filter(|b| b.generation == *next)
                .map(|b| b.instant)
                .min()
        });
        let reached = Some(g) == newest_generation || replaced_at.is_some_and(|t| t > window_start);
        if !reached {
            segments.insert(g, SegmentNeed::None);
            continue;
        }
        let base = of_g
            .iter()
            .rev()
            .find(|b| b.instant <= window_start)
            .or(of_g.first())
            .expect("a generation with backups has one");
        keep(&base.id, Reason::ChangeWindow);
        segments.insert(
            g,
            SegmentNeed::From {
                lsn: base.consistent_point,
            },
        );
    }
    // A generation whose every backup is kept only for its instant still needs no segment; one
    // whose backups all go needs none either (handled above by `reached`).
    let mut dropped: Vec<&Candidate> = order
        .iter()
        .copied()
        .filter(|b| !kept.contains_key(&b.id))
        .collect();
    dropped.reverse();
    Selection {
        kept,
        dropped: dropped.into_iter().map(|b| b.id.clone()).collect(),
        window_start,
        segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc, Weekday};
    use proptest::prelude::*;

    fn at(t: DateTime<Utc>) -> PgTimestamp {
        PgTimestamp::from_datetime(t)
    }

    fn day(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    /// One backup per day at 02:00 from `from` to `to` (inclusive), in generation 1, with
    /// positions growing with time.
    fn dailies(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Candidate> {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            out.push(Candidate {
                id: t.format("%Y%m%dT%H%M%S").to_string(),
                generation: 1,
                consistent_point: Lsn(t.timestamp() as u64 * 1000),
                instant: at(t),
                manual: false,
                pinned: false,
            });
            t += chrono::Duration::days(1);
        }
        out
    }

    fn reasons(s: &Selection, id: &str) -> Vec<Reason> {
        s.kept
            .get(id)
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default()
    }

    #[test]
    fn five_years_of_dailies_keep_exactly_the_policys_set() {
        let first = day(2021, 12, 1, 2);
        let now = day(2026, 12, 3, 9);
        let mut backups = dailies(first, day(2026, 12, 3, 2));
        // Manual backups: five pre-deploy ones, the last three stay by count.
        for (i, d) in [(1, 10), (2, 20), (3, 25), (4, 28), (5, 30)] {
            let t = day(2026, 11, d, 15);
            backups.push(Candidate {
                id: format!("manual-{i}"),
                generation: 1,
                consistent_point: Lsn(t.timestamp() as u64 * 1000),
                instant: at(t),
                manual: true,
                pinned: false,
            });
        }
        let s = select(&backups, &Policy::default(), at(now));

        // Expected, computed by the definition rather than by the algorithm: for each tier, the
        // newest backup of each of the last N buckets that have one.
        let mut expect: BTreeMap<String, BTreeSet<Reason>> = BTreeMap::new();
        let mut sorted = backups.clone();
        sorted.sort_by_key(|b| std::cmp::Reverse(b.instant));
        let mut tier = |reason: Reason, n: usize, key: &dyn Fn(NaiveDate) -> (i32, u32)| {
            let mut seen = Vec::new();
            for b in &sorted {
                let k = key(date(b.instant));
                if !seen.contains(&k) {
                    if seen.len() == n {
                        break;
                    }
                    seen.push(k);
                    expect.entry(b.id.clone()).or_default().insert(reason);
                }
            }
        };
        tier(Reason::Daily, 30, &|d| (d.year(), d.ordinal()));
        tier(Reason::Weekly, 52, &|d| {
            (d.iso_week().year(), d.iso_week().week())
        });
        tier(Reason::Monthly, 60, &|d| (d.year(), d.month()));
        for id in ["manual-3", "manual-4", "manual-5"] {
            expect.entry(id.into()).or_default().insert(Reason::Manual);
        }
        // The newest: today's 02:00 backup; the change window (24 h before 09:00) replays from
        // yesterday's 02:00 backup.
        expect
            .entry("20261203T020000".into())
            .or_default()
            .insert(Reason::Newest);
        expect
            .entry("20261202T020000".into())
            .or_default()
            .insert(Reason::ChangeWindow);
        assert_eq!(s.kept, expect);

        // The counts the policy promises.
        let count = |r: Reason| s.kept.values().filter(|rs| rs.contains(&r)).count();
        assert_eq!(count(Reason::Daily), 30);
        assert_eq!(count(Reason::Weekly), 52);
        assert_eq!(count(Reason::Monthly), 60);
        assert_eq!(count(Reason::Manual), 3);
        // A weekly is the newest of its ISO week: a Sunday, except for the current week.
        for (id, rs) in &s.kept {
            if rs.contains(&Reason::Weekly) && !rs.contains(&Reason::Daily) {
                let b = backups.iter().find(|b| &b.id == id).unwrap();
                assert_eq!(date(b.instant).weekday(), Weekday::Sun, "{id}");
            }
        }
        // Sixty months, the current one included: the oldest monthly is January 2022's last.
        let oldest_monthly = s
            .kept
            .iter()
            .filter(|(_, rs)| rs.contains(&Reason::Monthly))
            .map(|(id, _)| id.clone())
            .min()
            .unwrap();
        assert_eq!(oldest_monthly, "20220131T020000");
        // Everything not kept is dropped, nothing twice.
        assert_eq!(s.kept.len() + s.dropped.len(), backups.len());
        assert!(s.dropped.iter().all(|id| !s.kept.contains_key(id)));
        // Segments from the change window's backup on.
        let base = backups.iter().find(|b| b.id == "20261202T020000").unwrap();
        assert_eq!(
            s.segments.get(&1),
            Some(&SegmentNeed::From {
                lsn: base.consistent_point
            })
        );
        assert!(!s.needs_segment(1, base.consistent_point));
        assert!(s.needs_segment(1, Lsn(base.consistent_point.0 + 1)));
    }

    #[test]
    fn the_newest_backup_is_kept_by_a_policy_that_keeps_nothing() {
        let backups = dailies(day(2026, 1, 1, 2), day(2026, 1, 10, 2));
        let policy = Policy {
            daily: 0,
            weekly: 0,
            monthly: 0,
            manual: 0,
            changes: Duration::ZERO,
        };
        let s = select(&backups, &policy, at(day(2026, 3, 1, 0)));
        assert_eq!(s.kept.len(), 1);
        // The newest is also the change window's base (the window is empty, just now).
        assert_eq!(
            reasons(&s, "20260110T020000"),
            vec![Reason::Newest, Reason::ChangeWindow]
        );
        assert_eq!(s.dropped.len(), 9);
        assert_eq!(
            s.dropped.first().map(String::as_str),
            Some("20260101T020000")
        );
    }

    #[test]
    fn pinned_and_manual_backups_stay_by_their_own_rules() {
        let mut backups = dailies(day(2026, 1, 1, 2), day(2026, 1, 5, 2));
        backups[0].pinned = true;
        backups[1].manual = true;
        backups[2].manual = true;
        let policy = Policy {
            daily: 1,
            weekly: 0,
            monthly: 0,
            manual: 1,
            changes: Duration::from_secs(3600),
        };
        let s = select(&backups, &policy, at(day(2026, 1, 5, 12)));
        assert_eq!(reasons(&s, "20260101T020000"), vec![Reason::Pinned]);
        assert_eq!(reasons(&s, "20260102T020000"), Vec::<Reason>::new());
        assert_eq!(reasons(&s, "20260103T020000"), vec![Reason::Manual]);
        assert_eq!(
            reasons(&s, "20260105T020000"),
            vec![Reason::Newest, Reason::ChangeWindow, Reason::Daily]
        );
        assert_eq!(s.dropped, vec!["20260102T020000", "20260104T020000"]);
    }

    #[test]
    fn a_generation_replaced_inside_the_window_keeps_its_tail_and_older_ones_none() {
        // Generation 1 until Jan 3 12:00, generation 2 until Jan 5 20:00, then generation 3.
        let mut backups = dailies(day(2026, 1, 1, 2), day(2026, 1, 3, 2));
        let mut g2 = dailies(day(2026, 1, 4, 2), day(2026, 1, 5, 2));
        g2.iter_mut().for_each(|b| b.generation = 2);
        let g3_first = Candidate {
            id: "g3".into(),
            generation: 3,
            consistent_point: Lsn(10),
            instant: at(day(2026, 1, 5, 20)),
            manual: false,
            pinned: false,
        };
        backups.extend(g2.clone());
        backups.push(g3_first);
        let policy = Policy {
            daily: 0,
            weekly: 0,
            monthly: 0,
            manual: 0,
            changes: Duration::from_secs(24 * 3600),
        };
        // The window starts Jan 5 10:00: inside generation 2, whose newest backup before it is
        // Jan 5 02:00.
        let s = select(&backups, &policy, at(day(2026, 1, 6, 10)));
        assert_eq!(s.segments.get(&1), Some(&SegmentNeed::None));
        assert_eq!(
            s.segments.get(&2),
            Some(&SegmentNeed::From {
                lsn: g2[1].consistent_point
            })
        );
        assert_eq!(
            s.segments.get(&3),
            Some(&SegmentNeed::From { lsn: Lsn(10) })
        );
        assert_eq!(reasons(&s, "20260105T020000"), vec![Reason::ChangeWindow]);
        assert_eq!(
            reasons(&s, "g3"),
            vec![Reason::Newest, Reason::ChangeWindow]
        );
        // A generation with segments but no backup (an archiver starting it) keeps them all.
        assert!(s.needs_segment(4, Lsn(1)));
        assert!(!s.needs_segment(1, Lsn(u64::MAX)));
    }

    fn arb_backups() -> impl Strategy<Value = (Vec<Candidate>, Policy, i64)> {
        // Up to 60 backups over ~400 days in up to 3 generations; times in minutes.
        let one = (
            0i64..400 * 24 * 60,
            0u32..3,
            any::<bool>(),
            prop::bool::weighted(0.05),
        );
        (
            prop::collection::vec(one, 1..60),
            (0u32..10, 0u32..6, 0u32..4, 0u32..3, 0u64..(30 * 24 * 60)),
            0i64..30 * 24 * 60,
        )
            .prop_map(|(raw, (d, w, m, man, ch), after)| {
                let base = day(2025, 1, 1, 0).timestamp_micros();
                let mut raw = raw;
                raw.sort();
                // Generations grow with time: sort by time and never go back.
                let mut g = 1;
                let backups: Vec<Candidate> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, (min, bump, manual, pinned))| {
                        if *bump == 2 && i > 0 {
                            g += 1;
                        }
                        let t = DateTime::from_timestamp_micros(base + min * 60_000_000).unwrap();
                        Candidate {
                            id: format!("b{i:03}"),
                            generation: g,
                            consistent_point: Lsn(*min as u64 * 100 + i as u64),
                            instant: at(t),
                            manual: *manual,
                            pinned: *pinned,
                        }
                    })
                    .collect();
                let last = raw.last().unwrap().0;
                let policy = Policy {
                    daily: d,
                    weekly: w,
                    monthly: m,
                    manual: man,
                    changes: Duration::from_secs(ch * 60),
                };
                (backups, policy, base + (last + after) * 60_000_000)
            })
    }

    proptest! {
        /// No instant of the change window, and no kept backup's own instant, loses an object
        /// it needs: for every instant of the window, in the generation that holds it, a kept
        /// backup at or before it from which every segment on is kept.
        #[test]
        fn no_instant_inside_the_window_loses_an_object((backups, policy, now) in arb_backups()) {
            let now = PgTimestamp::from_datetime(DateTime::from_timestamp_micros(now).unwrap());
            let s = select(&backups, &policy, now);
            // Never drop the newest.
            let newest = backups.iter().max_by_key(|b| (b.instant, b.generation, b.consistent_point, &b.id)).unwrap();
            prop_assert!(s.kept.contains_key(&newest.id));
            // Pinned stay.
            for b in backups.iter().filter(|b| b.pinned) {
                prop_assert!(s.kept.contains_key(&b.id));
            }
            // Sample instants of the window: each backup's instant inside it, its start, now.
            let mut instants: Vec<PgTimestamp> = backups.iter().map(|b| b.instant).filter(|t| *t >= s.window_start).collect();
            instants.push(s.window_start);
            instants.push(now);
            for t in instants {
                // The generation that holds t: the newest generation whose first backup is at or
                // before t (instants before the first backup restore from nothing).
                let Some(holder) = backups.iter().filter(|b| b.instant <= t).max_by_key(|b| (b.instant, b.generation)) else { continue };
                let g = holder.generation;
                // A kept backup of g at or before t ...
                let usable: Vec<&Candidate> = backups.iter()
                    .filter(|b| b.generation == g && b.instant <= t && s.kept.contains_key(&b.id))
                    .collect();
                prop_assert!(!usable.is_empty(), "no kept backup for {t} in generation {g}");
                // ... from whose position on every segment stays.
                prop_assert!(
                    usable.iter().any(|b| s.needs_segment(g, Lsn(b.consistent_point.0 + 1))),
                    "no kept backup of generation {g} before {t} keeps its segments"
                );
            }
        }
    }
}
