//! `tidemark list`: what a repository holds — base backups, segment chains, and the range of
//! instants and LSNs a restore can reach.

use std::sync::Arc;

use serde::Serialize;

use crate::lsn::{Lsn, PgTimestamp};
use crate::repo;
use crate::restore;
use crate::store::Store;

#[derive(Serialize)]
struct Listing {
    repository: String,
    system_id: Option<String>,
    database: Option<String>,
    generations: Vec<GenerationListing>,
    earliest_restorable: Option<PgTimestamp>,
    latest_restorable_before: Option<PgTimestamp>,
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
}

#[derive(Serialize)]
struct BackupListing {
    id: String,
    consistent_point: Lsn,
    snapshot_time: PgTimestamp,
    tables: usize,
    rows: u64,
    stored_bytes: u64,
}

pub async fn run(store: &Arc<dyn Store>, json: bool) -> anyhow::Result<()> {
    let identity = repo::read_identity(store).await?;
    let (gens, manifests) = restore::gather(store).await?;
    let generations: Vec<GenerationListing> = gens
        .iter()
        .map(|g| GenerationListing {
            generation: g.generation,
            backups: manifests
                .iter()
                .filter(|m| m.generation == g.generation)
                .map(|m| BackupListing {
                    id: m.id.clone(),
                    consistent_point: m.consistent_point,
                    snapshot_time: m.snapshot_time,
                    tables: m.tables.len(),
                    rows: m.tables.iter().map(|t| t.rows).sum(),
                    stored_bytes: m.tables.iter().map(|t| t.stored_bytes).sum(),
                })
                .collect(),
            segments: g.segments.len(),
            segment_bytes: g.segments.iter().map(|s| s.size).sum(),
            start_lsn: g.segments.first().map(|s| s.start),
            end_lsn: g.end,
            latest_commit: g.latest_commit,
        })
        .collect();
    let listing = Listing {
        repository: store.location(),
        system_id: identity.as_ref().map(|i| i.system_id.clone()),
        database: identity.as_ref().map(|i| i.database.clone()),
        earliest_restorable: manifests.iter().map(|m| m.snapshot_time).min(),
        latest_restorable_before: generations
            .iter()
            .rev()
            .find(|g| !g.backups.is_empty())
            .and_then(|g| g.latest_commit),
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
                "  base backup {}  at {}  {}  {} tables, {} rows, {} bytes",
                b.id, b.consistent_point, b.snapshot_time, b.tables, b.rows, b.stored_bytes
            );
        }
        match (g.start_lsn, g.end_lsn) {
            (Some(s), Some(e)) => println!(
                "  segments: {} ({} bytes), LSN {s} to {e}",
                g.segments, g.segment_bytes
            ),
            _ => println!("  segments: none yet"),
        }
        if let Some(t) = g.latest_commit {
            println!("  last archived commit: {t}");
        }
    }
    match (
        listing.earliest_restorable,
        listing.latest_restorable_before,
    ) {
        (Some(a), Some(b)) => {
            println!("restorable: --to-time from {a} to just before {b}, or --latest")
        }
        (Some(a), None) => {
            println!("restorable: --latest (base backup at {a}); no commit archived after it yet")
        }
        _ => println!("restorable: nothing yet"),
    }
    Ok(())
}
