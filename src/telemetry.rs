//! Prometheus metrics of the archiver, served on `--metrics-address` (`GET /metrics`).
//!
//! Owns the metric names and their help texts; the pipeline records through the `metrics`
//! facade, which costs nothing when no exporter is installed. Positions are exported as byte
//! offsets (an LSN as a number), so dashboards can subtract them.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `tidemark_archiving` | gauge | 1 while the stream is being archived, 0 otherwise |
//! | `tidemark_received_lsn_bytes` | gauge | stream position received from the slot |
//! | `tidemark_durable_lsn_bytes` | gauge | position durably stored (and acknowledged to the slot) |
//! | `tidemark_lag_bytes` | gauge | received minus durable |
//! | `tidemark_last_durable_timestamp_seconds` | gauge | Unix time the durable position last moved |
//! | `tidemark_segments_stored_total` | counter | segments stored |
//! | `tidemark_stored_bytes_total` | counter | bytes of segments stored |
//! | `tidemark_store_retries_total` | counter | segment writes retried after a retryable store error |
//! | `tidemark_transactions_total` | counter | transactions written to segments |
//! | `tidemark_restarts_total` | counter | in-process restarts after a transient failure |
//! | `tidemark_new_generations_total` | counter | generations started after an existing one (`reason`: `slot_lost`, `publication_dropped`): each leaves a hole in the archive |
//! | `tidemark_schema_unexplained_changes_total` | counter | column changes no captured DDL explains (archiving stops) |
//! | `tidemark_segment_chain_holes` | gauge | holes (archived, acknowledged, then missing segments) in the chain being extended, as found at the last resume |
//! | `tidemark_writer_lease_held` | gauge | 1 while this archiver holds the repository's writer lease, 0 otherwise |
//! | `tidemark_base_backup_failures_total` | counter | scheduled base backups that failed (each is retried with backoff; the base-backup lock held by another backup counts) |
//! | `tidemark_last_base_backup_timestamp_seconds` | gauge | Unix time of the newest complete base backup of the generation (set by the schedule) |
//! | `tidemark_base_backup_running` | gauge | 1 while a scheduled base backup is being taken, 0 otherwise |
//! | `tidemark_base_backup_duration_seconds` | gauge | how long the last scheduled base backup took |

use std::net::SocketAddr;

use metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::PrometheusBuilder;

pub const ARCHIVING: &str = "tidemark_archiving";
pub const RECEIVED_LSN: &str = "tidemark_received_lsn_bytes";
pub const DURABLE_LSN: &str = "tidemark_durable_lsn_bytes";
pub const LAG_BYTES: &str = "tidemark_lag_bytes";
pub const LAST_DURABLE: &str = "tidemark_last_durable_timestamp_seconds";
pub const SEGMENTS_STORED: &str = "tidemark_segments_stored_total";
pub const STORED_BYTES: &str = "tidemark_stored_bytes_total";
pub const STORE_RETRIES: &str = "tidemark_store_retries_total";
pub const TRANSACTIONS: &str = "tidemark_transactions_total";
pub const RESTARTS: &str = "tidemark_restarts_total";
pub const SCHEMA_UNEXPLAINED: &str = "tidemark_schema_unexplained_changes_total";
pub const CHAIN_HOLES: &str = "tidemark_segment_chain_holes";
pub const NEW_GENERATIONS: &str = "tidemark_new_generations_total";
pub const WRITER_LEASE: &str = "tidemark_writer_lease_held";
pub const BASE_BACKUP_FAILURES: &str = "tidemark_base_backup_failures_total";
pub const LAST_BASE_BACKUP: &str = "tidemark_last_base_backup_timestamp_seconds";
pub const BASE_BACKUP_RUNNING: &str = "tidemark_base_backup_running";
pub const BASE_BACKUP_SECONDS: &str = "tidemark_base_backup_duration_seconds";

/// Starts the scrape endpoint (needs a running tokio runtime).
pub fn install(addr: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    describe_gauge!(
        ARCHIVING,
        "1 while the stream is being archived, 0 otherwise"
    );
    describe_gauge!(
        RECEIVED_LSN,
        Unit::Bytes,
        "stream position received from the slot"
    );
    describe_gauge!(
        DURABLE_LSN,
        Unit::Bytes,
        "stream position durably stored and acknowledged"
    );
    describe_gauge!(LAG_BYTES, Unit::Bytes, "received minus durable position");
    describe_gauge!(
        LAST_DURABLE,
        Unit::Seconds,
        "Unix time the durable position last moved"
    );
    describe_counter!(SEGMENTS_STORED, "segments stored");
    describe_counter!(STORED_BYTES, Unit::Bytes, "bytes of segments stored");
    describe_counter!(STORE_RETRIES, "segment writes retried");
    describe_counter!(TRANSACTIONS, "transactions written to segments");
    describe_counter!(RESTARTS, "in-process restarts after a transient failure");
    describe_counter!(
        NEW_GENERATIONS,
        "generations started after an existing one, by reason (slot_lost, publication_dropped): each leaves a hole in the archive"
    );
    describe_counter!(
        SCHEMA_UNEXPLAINED,
        "column changes no captured DDL explains; archiving stopped"
    );
    describe_gauge!(
        CHAIN_HOLES,
        "holes (missing acknowledged segments) in the chain being extended, at the last resume"
    );
    describe_gauge!(
        WRITER_LEASE,
        "1 while this archiver holds the repository's writer lease, 0 otherwise"
    );
    describe_counter!(
        BASE_BACKUP_FAILURES,
        "scheduled base backups that failed (each is retried with backoff)"
    );
    describe_gauge!(
        LAST_BASE_BACKUP,
        Unit::Seconds,
        "Unix time of the newest complete base backup of the generation"
    );
    describe_gauge!(
        BASE_BACKUP_RUNNING,
        "1 while a scheduled base backup is being taken, 0 otherwise"
    );
    describe_gauge!(
        BASE_BACKUP_SECONDS,
        Unit::Seconds,
        "how long the last scheduled base backup took"
    );
    Ok(())
}

/// Now as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
