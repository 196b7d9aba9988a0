//! `tidemark list`: what a repository holds — base backups, segment chains, the windows of
//! instants and LSNs a restore can reach, and the damage that removed instants from them. The
//! windows come from the [`crate::catalog`], the same rules restore's planner uses, and are printed
//! with the same text a refused restore shows. Each backup shows the tiers the retention policy
//! (the `--retain-*` flags, as `prune` takes them) keeps it for. `--json` is specified in
//! `proto/list.md`.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use crate::catalog::retention::{self, Policy, Reason};
use crate::catalog::{expire, identity, pin, BackupRef, Catalog, Problem, Window, WindowEnd};
use crate::lsn::{Lsn, PgTimestamp};
use crate::store::Store;

#[derive(Serialize)]
struct Listing {
    repository: String,
    system_id: Option<String>,
    database: Option<String>,
    generations: Vec<GenerationListing>,
    earliest_restorable: Option<PgTimestamp>,
    latest_restorable_before: Option<PgTimestamp>,
    /// Every window, by (generation, start).
    windows: Vec<WindowListing>,
    /// The backups outside every window, by instant: each restores its own instant.
    points: Vec<PointListing>,
    /// Every problem found (also under its generation when it has one).
    problems: Vec<ProblemListing>,
}

#[derive(Serialize)]
struct GenerationListing {
    generation: u32,
    backups: Vec<BackupListing>,
    segments: usize,
    segment_bytes: u64,
    start_lsn: Option<Lsn>,
    end_lsn: Option<Lsn>,
    latest_commit: Option<PgTimestamp>,
    windows: Vec<WindowListing>,
    problems: Vec<ProblemListing>,
}

#[derive(Serialize)]
struct BackupListing {
    id: String,
    consistent_point: Lsn,
    snapshot_time: PgTimestamp,
    tables: usize,
    rows: u64,
    stored_bytes: u64,
    /// finished_at − started_at.
    duration_seconds: f64,
    /// initial, scheduled, manual, or null (a manifest that does not say).
    origin: Option<&'static str>,
    tag: Option<String>,
    pinned: bool,
    /// Why the policy keeps it (empty: the next prune removes it).
    tiers: Vec<Reason>,
}

#[derive(Serialize)]
struct PointListing {
    generation: u32,
    backup: String,
    consistent_point: Lsn,
    snapshot_time: PgTimestamp,
    text: String,
}

fn point_listing(b: &BackupRef) -> PointListing {
    PointListing {
        generation: b.generation,
        backup: b.id.clone(),
        consistent_point: b.consistent_point,
        snapshot_time: b.snapshot_time,
        text: crate::catalog::describe_point(b),
    }
}

/// The tiers as `list` prints them: `manual` with its tag.
fn tiers_text(b: &BackupListing) -> String {
    if b.tiers.is_empty() {
        return "none: the next prune removes it".into();
    }
    let words: Vec<String> = b
        .tiers
        .iter()
        .map(|r| match (r, &b.tag) {
            (Reason::Manual, Some(t)) => format!("manual ({t})"),
            _ => r.as_str().to_string(),
        })
        .collect();
    words.join(", ")
}

#[derive(Serialize)]
struct WindowListing {
    generation: u32,
    backups: Vec<String>,
    segments: usize,
    start_lsn: Lsn,
    end_lsn: Lsn,
    earliest: PgTimestamp,
    latest_commit: Option<PgTimestamp>,
    ends: WindowEnd,
    text: String,
}

#[derive(Serialize)]
struct ProblemListing {
    #[serde(flatten)]
    problem: Problem,
    text: String,
}

fn window_listing(w: &Window) -> WindowListing {
    WindowListing {
        generation: w.generation,
        backups: w.backups.iter().map(|b| b.id.clone()).collect(),
        segments: w.segments.len(),
        start_lsn: w.start_lsn,
        end_lsn: w.end_lsn,
        earliest: w.earliest,
        latest_commit: w.latest_commit,
        ends: w.ends.clone(),
        text: w.describe(),
    }
}

fn problem_listing(p: &Problem) -> ProblemListing {
    ProblemListing {
        problem: p.clone(),
        text: p.to_string(),
    }
}

pub async fn run(store: &Arc<dyn Store>, policy: &Policy, json: bool) -> anyhow::Result<()> {
    let identity = identity::read_identity(store).await?;
    let (cat, manifests) = Catalog::load(store).await?;
    let pins = pin::read_pins(store).await?;
    let selection = retention::select(
        &expire::candidates(&manifests, &pins),
        policy,
        PgTimestamp::now(),
    );
    let numbers: BTreeSet<u32> = cat
        .backups
        .iter()
        .map(|b| b.generation)
        .chain(cat.segments.keys().copied())
        .collect();
    let generations: Vec<GenerationListing> = numbers
        .into_iter()
        .map(|g| {
            let chain = cat.segments.get(&g).map(Vec::as_slice).unwrap_or(&[]);
            let windows: Vec<&Window> = cat.windows.iter().filter(|w| w.generation == g).collect();
            GenerationListing {
                generation: g,
                backups: manifests
                    .iter()
                    .filter(|m| m.generation == g)
                    .map(|m| BackupListing {
                        id: m.id.clone(),
                        consistent_point: m.consistent_point,
                        snapshot_time: m.snapshot_time,
                        tables: m.tables.len(),
                        rows: m.tables.iter().map(|t| t.rows).sum(),
                        stored_bytes: m.tables.iter().map(|t| t.stored_bytes).sum(),
                        duration_seconds: (m.finished_at.0 - m.started_at.0).max(0) as f64 / 1e6,
                        origin: m.origin.map(|o| o.as_str()),
                        tag: m.tag.clone(),
                        pinned: pins.contains(&m.id),
                        tiers: selection
                            .kept
                            .get(&m.id)
                            .map(|r| r.iter().copied().collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
                segments: chain.len(),
                segment_bytes: chain.iter().map(|s| s.size).sum(),
                start_lsn: chain.first().map(|s| s.start),
                end_lsn: chain.last().map(|s| s.end),
                latest_commit: windows.iter().filter_map(|w| w.latest_commit).max(),
                windows: windows.iter().map(|w| window_listing(w)).collect(),
                problems: cat
                    .problems
                    .iter()
                    .filter(|p| p.generation() == Some(g))
                    .map(problem_listing)
                    .collect(),
            }
        })
        .collect();
    let listing = Listing {
        repository: store.location(),
        system_id: identity.as_ref().map(|i| i.system_id.clone()),
        database: identity.as_ref().map(|i| i.database.clone()),
        earliest_restorable: cat.earliest(),
        latest_restorable_before: cat.latest_commit(),
        windows: cat.windows.iter().map(window_listing).collect(),
        points: cat.points.iter().map(point_listing).collect(),
        problems: cat.problems.iter().map(problem_listing).collect(),
        generations,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    println!("repository {}", listing.repository);
    match (&listing.system_id, &listing.database) {
        (Some(s), Some(d)) => println!("  database {d:?} of cluster {s}"),
        _ => println!("  (no archive yet)"),
    }
    for g in &listing.generations {
        println!("generation {}", g.generation);
        for b in &g.backups {
            println!(
                "  base backup {}  at {}  {}  {} tables, {} rows, {} bytes, {:.1}s{}{}",
                b.id,
                b.consistent_point,
                b.snapshot_time,
                b.tables,
                b.rows,
                b.stored_bytes,
                b.duration_seconds,
                b.origin.map(|o| format!(", {o}")).unwrap_or_default(),
                if b.pinned { ", pinned" } else { "" }
            );
            println!("    tiers: {}", tiers_text(b));
        }
        match (g.start_lsn, g.end_lsn) {
            (Some(s), Some(e)) => println!(
                "  segments: {} ({} bytes), LSN {s} to {e}",
                g.segments, g.segment_bytes
            ),
            _ => println!("  segments: none yet"),
        }
        if let Some(t) = g.latest_commit {
            println!("  last restorable commit: {t}");
        }
    }
    if cat.is_empty() {
        println!("restorable: nothing yet");
        return Ok(());
    }
    println!("{}", cat.describe());
    if cat.latest_window().is_ok() {
        println!("  (--latest restores the end of the last window)");
    }
    Ok(())
}
