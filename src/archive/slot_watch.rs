//! The slot's cost on the source: the WAL it retains, and the server's limit on it.
//!
//! Owns two metrics: [`SLOT_RETAINED_WAL`](crate::telemetry::SLOT_RETAINED_WAL), polled on the
//! attempt's normal (non-replication) connection every [`POLL`], and
//! [`MAX_SLOT_WAL_KEEP`](crate::telemetry::MAX_SLOT_WAL_KEEP), read once per attempt. A slot
//! keeps every WAL segment from its `restart_lsn` on: an archiver that stops reading (or a slot
//! left without an archiver) fills the source's disk unless `max_slot_wal_keep_size` bounds it
//! — and when it does, the server invalidates the slot past the bound, which starts a new
//! generation (a hole in the archive). Either way an operator must know before it happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry;

/// How often the retained WAL is read.
const POLL: Duration = Duration::from_secs(5);

/// Reads `max_slot_wal_keep_size` (bytes; -1 unlimited, as before PostgreSQL 13, which has no
/// such setting) into its gauge, and warns once per process when it is unlimited.
pub(super) async fn check_wal_keep(client: &tokio_postgres::Client) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let rows = client
        .query(
            "SELECT setting::float8, coalesce(unit, '') FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await;
    let bytes = match rows {
        Ok(rows) => rows
            .first()
            .map(|r| keep_size_bytes(r.get(0), r.get(1)))
            .unwrap_or(-1.0),
        Err(e) => {
            debug!(error = %e, "cannot read max_slot_wal_keep_size");
            return;
        }
    };
    metrics::gauge!(telemetry::MAX_SLOT_WAL_KEEP).set(bytes);
    if bytes < 0.0 && !WARNED.swap(true, Ordering::Relaxed) {
        warn!("the source's max_slot_wal_keep_size is unlimited: while the archiver does not read the slot (stopped, failing, or removed without dropping its slot) the server keeps all WAL from the slot's position and can fill its disk. HINT: set max_slot_wal_keep_size (e.g. ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf()) and alert on tidemark_slot_retained_wal_bytes");
    }
}

/// `max_slot_wal_keep_size` in bytes from `pg_settings` (`setting` in `unit`, MB on every
/// version that has it); -1 for unlimited.
fn keep_size_bytes(setting: f64, unit: String) -> f64 {
    if setting < 0.0 {
        return -1.0;
    }
    let scale = match unit.as_str() {
        "kB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    };
    setting * scale
}

/// Polls the WAL `slot` retains until `stop`, on `client` (the attempt's normal connection,
/// kept for this). A failed poll is logged at debug and tried again at the next one.
pub(super) async fn poll_retained_wal(
    client: tokio_postgres::Client,
    slot: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = client
            .query_opt(
                "SELECT ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END) - restart_lsn)::float8
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match r {
            Ok(Some(row)) => {
                if let Some(bytes) = row.get::<_, Option<f64>>(0) {
                    metrics::gauge!(telemetry::SLOT_RETAINED_WAL).set(bytes.max(0.0));
                }
            }
            Ok(None) => debug!(slot, "slot not found while reading its retained WAL"),
            Err(e) => debug!(error = %e, "cannot read the slot's retained WAL"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_size_is_converted_from_its_unit_and_unlimited_is_minus_one() {
        assert_eq!(keep_size_bytes(-1.0, "MB".into()), -1.0);
        assert_eq!(
            keep_size_bytes(1024.0, "MB".into()),
            1024.0 * 1024.0 * 1024.0
        );
        assert_eq!(keep_size_bytes(0.0, "MB".into()), 0.0);
        assert_eq!(keep_size_bytes(2.0, "kB".into()), 2048.0);
    }
}
