//! The gauges read from the repository's catalog: the newest base backups (instant, size,
//! duration) and the restorable window (earliest and latest instants).
//!
//! Read at the start of each archiving attempt and after each scheduled base backup (with its
//! retention); in between, each stored commit moves the latest restorable instant on when the
//! archiver extends the newest window ([`super::stored_commit`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::warn;

use super::{unix_seconds, EXTENDS_WINDOW};
use crate::catalog::{Catalog, Manifest};
use crate::lsn::Lsn;
use crate::store::Store;

/// Reads the catalog into the gauges. `tip`: where the stream of `generation` resumes, when the
/// attempt starts (the latest instant then moves with each stored commit if the newest window
/// ends there); None: leave that as it is.
pub async fn record(store: &Arc<dyn Store>, generation: u32, tip: Option<Lsn>) {
    let (cat, manifests) = match Catalog::load(store).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "cannot read the catalog for the base-backup and restorable-window metrics");
            return;
        }
    };
    backups(&manifests, generation);
    if let Some(t) = cat.earliest() {
        metrics::gauge!(super::RESTORABLE_EARLIEST).set(unix_seconds(t));
    }
    if let Some(t) = cat.latest_commit() {
        metrics::gauge!(super::RESTORABLE_LATEST).set(unix_seconds(t));
    }
    if let Some(tip) = tip {
        let newest = cat
            .latest_window()
            .ok()
            .filter(|w| w.generation == generation && w.end_lsn == tip);
        EXTENDS_WINDOW.store(newest.is_some(), Ordering::Relaxed);
        if let Some(t) = newest.and_then(|w| w.latest_commit) {
            super::stored_commit(t);
        }
    }
}

/// The newest two complete base backups of `generation`.
fn backups(manifests: &[Manifest], generation: u32) {
    let mut of_gen: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| m.generation == generation)
        .collect();
    of_gen.sort_by_key(|m| m.snapshot_time);
    let mut newest_first = of_gen.iter().rev();
    if let Some(m) = newest_first.next() {
        metrics::gauge!(super::LAST_BASE_BACKUP).set(unix_seconds(m.snapshot_time));
        metrics::gauge!(super::LAST_BASE_BACKUP_SIZE).set(m.totals.stored_bytes as f64);
        metrics::gauge!(super::BASE_BACKUP_SECONDS)
            .set((m.finished_at.0 - m.started_at.0).max(0) as f64 / 1e6);
    }
    if let Some(m) = newest_first.next() {
        metrics::gauge!(super::PREVIOUS_BASE_BACKUP_SIZE).set(m.totals.stored_bytes as f64);
    }
}
