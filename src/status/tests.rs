use std::time::Duration;

use super::*;
use crate::catalog::retention::Candidate;

fn at(s: &str) -> PgTimestamp {
    crate::exit::parse_time(s).unwrap()
}

#[test]
fn the_age_allows_one_period_per_complete_period_since_the_oldest() {
    let now = at("2026-12-04 01:00:00");
    // Three days old: that day, the next and yesterday; today's backup may not be due yet.
    assert_eq!(
        periods_allowed(Reason::Daily, at("2026-12-01 02:00:00"), now),
        3
    );
    assert_eq!(
        periods_allowed(Reason::Daily, at("2026-12-04 00:30:00"), now),
        0
    );
    // 2026-12-04 is a Friday of the ISO week that starts on Monday 30 November.
    assert_eq!(
        periods_allowed(Reason::Weekly, at("2026-11-16 02:00:00"), now),
        2
    );
    assert_eq!(
        periods_allowed(Reason::Weekly, at("2026-11-29 23:00:00"), now),
        1
    );
    assert_eq!(
        periods_allowed(Reason::Weekly, at("2026-11-30 02:00:00"), now),
        0
    );
    assert_eq!(
        periods_allowed(Reason::Monthly, at("2026-10-31 23:00:00"), now),
        2
    );
    assert_eq!(
        periods_allowed(Reason::Monthly, at("2025-12-04 00:00:00"), now),
        12
    );
    assert_eq!(
        periods_allowed(Reason::Manual, at("2020-01-01 00:00:00"), now),
        0
    );
}

fn daily_backups(days: &[&str]) -> Vec<Candidate> {
    days.iter()
        .enumerate()
        .map(|(i, d)| Candidate {
            id: format!("b{i}"),
            generation: 1,
            consistent_point: Lsn(0x100 * (i as u64 + 1)),
            instant: at(d),
            manual: false,
            pinned: false,
        })
        .collect()
}

fn tier(tiers: &[Tier], r: Reason) -> &Tier {
    tiers.iter().find(|t| t.tier == r).unwrap()
}

#[test]
fn a_young_repository_is_no_breach_a_missed_day_is() {
    let policy = Policy::default();
    let now = at("2026-12-04 01:00:00");
    let backups = daily_backups(&[
        "2026-12-01 02:00:00",
        "2026-12-02 02:00:00",
        "2026-12-03 02:00:00",
    ]);
    let sel = retention::select(&backups, &policy, now);
    let tiers = breaches(&sel, &policy, Some(backups[0].instant), now);
    let d = tier(&tiers, Reason::Daily);
    assert_eq!((d.kept, d.expected, d.breached), (3, 3, false), "{tiers:?}");
    assert!(tiers.iter().all(|t| !t.breached), "{tiers:?}");
    // The manual tier asks for 3 and has none: never a breach.
    assert_eq!(tier(&tiers, Reason::Manual).kept, 0);

    // The backup of 2 December is missing: two dailies where three days have passed.
    let gap = daily_backups(&["2026-12-01 02:00:00", "2026-12-03 02:00:00"]);
    let sel = retention::select(&gap, &policy, now);
    let tiers = breaches(&sel, &policy, Some(gap[0].instant), now);
    let d = tier(&tiers, Reason::Daily);
    assert_eq!((d.kept, d.expected, d.breached), (2, 3, true), "{tiers:?}");

    // A policy asking for fewer than the age allows asks for no more.
    let two = Policy {
        daily: 2,
        ..Policy::default()
    };
    let sel = retention::select(&gap, &two, now);
    assert!(
        !tier(
            &breaches(&sel, &two, Some(gap[0].instant), now),
            Reason::Daily
        )
        .breached
    );
    // An empty repository breaches nothing.
    let sel = retention::select(&[], &policy, now);
    assert!(breaches(&sel, &policy, None, now)
        .iter()
        .all(|t| !t.breached));
}

#[test]
fn the_change_window_needs_the_newest_window_to_reach_back_to_its_start() {
    use crate::catalog::{BackupRef, SegmentFact, SegmentRef};
    let now = at("2026-12-04 12:00:00");
    let policy = Policy {
        changes: Duration::from_secs(3600),
        ..Policy::default()
    };
    let b = |t: &str| BackupRef {
        id: "b".into(),
        generation: 1,
        consistent_point: Lsn(0x100),
        snapshot_time: at(t),
    };
    let s = SegmentRef {
        generation: 1,
        start: Lsn(0x100),
        end: Lsn(0x200),
        key: "s".into(),
        size: 1,
    };
    let facts = BTreeMap::from([(
        "s".to_string(),
        SegmentFact::Good {
            latest_commit: Some(now),
        },
    )]);
    let cat = |backup: BackupRef| {
        Catalog::build(
            "repo".into(),
            vec![backup],
            BTreeMap::from([(1, vec![s.clone()])]),
            &facts,
            vec![],
        )
    };
    // A backup two hours old and a window from it: the last hour restores.
    let old = b("2026-12-04 10:00:00");
    let w = change_window(&cat(old.clone()), &policy, Some(old.snapshot_time), now);
    assert!(!w.breached, "{w:?}");
    assert_eq!(w.required_from, at("2026-12-04 11:00:00"));
    // A repository younger than the window: from its first backup on.
    let young = b("2026-12-04 11:30:00");
    let w = change_window(&cat(young.clone()), &policy, Some(young.snapshot_time), now);
    assert!(
        !w.breached && w.required_from == young.snapshot_time,
        "{w:?}"
    );
    // The newest window starts later than the oldest backup (a new generation, a hole): breach.
    let w = change_window(&cat(young), &policy, Some(old.snapshot_time), now);
    assert!(w.breached, "{w:?}");
}
