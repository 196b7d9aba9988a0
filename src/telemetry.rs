//! Prometheus metrics and health of the archiver, served on `--metrics-address`: `GET /metrics`,
//! `GET /healthz` and `GET /readyz` ([`server`]).
//!
//! Owns the metric names and their help texts, the archiver's health ([`health`]) and the store
//! wrapper that measures every repository request ([`metered`]). The pipeline records through
//! the `metrics` facade, which costs nothing when no recorder is installed. Positions are
//! exported as byte offsets (an LSN as a number), so dashboards can subtract them; instants as
//! Unix seconds.
//!
//! Invariant: every counter and every gauge an alert rule reads exists from the start (at 0, or
//! -1 / absent where the value is unknown as said below), so that `increase()` sees the first
//! event and an archiver that never got as far as storing anything is not silent.
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `tidemark_build_info` | gauge | 1, labelled `version` and `git_commit` |
//! | `tidemark_archiving` | gauge | 1 while the stream is being archived, 0 otherwise |
//! | `tidemark_ready` | gauge | 1 once the first acknowledgement was sent to the slot (`/readyz`) |
//! | `tidemark_healthy` | gauge | 1 while `/healthz` answers 200 |
//! | `tidemark_received_lsn_bytes` | gauge | stream position received from the slot |
//! | `tidemark_durable_lsn_bytes` | gauge | position durably stored (and acknowledged to the slot) |
//! | `tidemark_lag_bytes` | gauge | received minus durable |
//! | `tidemark_last_durable_timestamp_seconds` | gauge | Unix time the durable position last moved (or the attempt started streaming) |
//! | `tidemark_last_stored_commit_timestamp_seconds` | gauge | commit time of the newest stored transaction (heartbeats included) |
//! | `tidemark_lag_seconds` | gauge | now minus that commit time, computed at each scrape |
//! | `tidemark_slot_retained_wal_bytes` | gauge | WAL the slot keeps on the source (`pg_current_wal_lsn() - restart_lsn`), polled every 5 s |
//! | `tidemark_max_slot_wal_keep_size_bytes` | gauge | the source's `max_slot_wal_keep_size`; -1: unlimited |
//! | `tidemark_segments_stored_total` | counter | segments stored |
//! | `tidemark_stored_bytes_total` | counter | bytes of segments stored |
//! | `tidemark_store_retries_total` | counter | segment writes retried after a retryable store error |
//! | `tidemark_store_request_duration_seconds` | histogram | repository requests by `operation` (put, get, list, delete, check_writable, storage_class) |
//! | `tidemark_store_errors_total` | counter | failed repository requests by `operation` and `kind` (transient, permanent, conflict; a missing object is an answer, not an error) |
//! | `tidemark_transactions_total` | counter | transactions written to segments |
//! | `tidemark_restarts_total` | counter | in-process restarts after a transient failure |
//! | `tidemark_new_generations_total` | counter | generations started after an existing one (`reason`: `slot_lost`, `publication_dropped`): each leaves a hole in the archive |
//! | `tidemark_schema_unexplained_changes_total` | counter | column changes no captured DDL explains (archiving stops) |
//! | `tidemark_segment_chain_holes` | gauge | holes (archived, acknowledged, then missing segments) in the chain being extended, as found at the last resume |
//! | `tidemark_writer_lease_held` | gauge | 1 while this archiver holds the repository's writer lease, 0 otherwise |
//! | `tidemark_base_backup_failures_total` | counter | scheduled base backups that failed (each is retried with backoff; the base-backup lock held by another backup counts) |
//! | `tidemark_last_base_backup_timestamp_seconds` | gauge | snapshot time of the newest complete base backup of the generation |
//! | `tidemark_last_base_backup_size_bytes` | gauge | its stored size |
//! | `tidemark_previous_base_backup_size_bytes` | gauge | the stored size of the one before it (absent with one backup) |
//! | `tidemark_last_base_backup_success` | gauge | 1 when the last base backup this archiver took succeeded, 0 when it failed |
//! | `tidemark_base_backup_running` | gauge | 1 while a scheduled base backup is being taken, 0 otherwise |
//! | `tidemark_base_backup_duration_seconds` | gauge | how long the newest base backup took |
//! | `tidemark_restorable_earliest_timestamp_seconds` | gauge | the earliest instant a restore can reach (the oldest window's first backup) |
//! | `tidemark_restorable_latest_timestamp_seconds` | gauge | restores reach instants just before this one (the newest archived commit of the newest window) |

pub mod catalog;
pub mod health;
pub mod metered;
pub mod server;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use crate::lsn::PgTimestamp;

pub const BUILD_INFO: &str = "tidemark_build_info";
pub const ARCHIVING: &str = "tidemark_archiving";
pub const READY: &str = "tidemark_ready";
pub const HEALTHY: &str = "tidemark_healthy";
pub const RECEIVED_LSN: &str = "tidemark_received_lsn_bytes";
pub const DURABLE_LSN: &str = "tidemark_durable_lsn_bytes";
pub const LAG_BYTES: &str = "tidemark_lag_bytes";
pub const LAST_DURABLE: &str = "tidemark_last_durable_timestamp_seconds";
pub const LAST_STORED_COMMIT: &str = "tidemark_last_stored_commit_timestamp_seconds";
pub const LAG_SECONDS: &str = "tidemark_lag_seconds";
pub const SLOT_RETAINED_WAL: &str = "tidemark_slot_retained_wal_bytes";
pub const MAX_SLOT_WAL_KEEP: &str = "tidemark_max_slot_wal_keep_size_bytes";
pub const SEGMENTS_STORED: &str = "tidemark_segments_stored_total";
pub const STORED_BYTES: &str = "tidemark_stored_bytes_total";
pub const STORE_RETRIES: &str = "tidemark_store_retries_total";
pub const STORE_LATENCY: &str = "tidemark_store_request_duration_seconds";
pub const STORE_ERRORS: &str = "tidemark_store_errors_total";
pub const TRANSACTIONS: &str = "tidemark_transactions_total";
pub const RESTARTS: &str = "tidemark_restarts_total";
pub const SCHEMA_UNEXPLAINED: &str = "tidemark_schema_unexplained_changes_total";
pub const CHAIN_HOLES: &str = "tidemark_segment_chain_holes";
pub const NEW_GENERATIONS: &str = "tidemark_new_generations_total";
pub const WRITER_LEASE: &str = "tidemark_writer_lease_held";
pub const BASE_BACKUP_FAILURES: &str = "tidemark_base_backup_failures_total";
pub const LAST_BASE_BACKUP: &str = "tidemark_last_base_backup_timestamp_seconds";
pub const LAST_BASE_BACKUP_SIZE: &str = "tidemark_last_base_backup_size_bytes";
pub const PREVIOUS_BASE_BACKUP_SIZE: &str = "tidemark_previous_base_backup_size_bytes";
pub const LAST_BASE_BACKUP_SUCCESS: &str = "tidemark_last_base_backup_success";
pub const BASE_BACKUP_RUNNING: &str = "tidemark_base_backup_running";
pub const BASE_BACKUP_SECONDS: &str = "tidemark_base_backup_duration_seconds";
pub const RESTORABLE_EARLIEST: &str = "tidemark_restorable_earliest_timestamp_seconds";
pub const RESTORABLE_LATEST: &str = "tidemark_restorable_latest_timestamp_seconds";

/// The `reason` labels of [`NEW_GENERATIONS`].
pub const NEW_GENERATION_REASONS: [&str; 2] = ["slot_lost", "publication_dropped"];

/// The git commit the binary was built from (`build.rs`).
pub const GIT_COMMIT: &str = env!("TIDEMARK_GIT_COMMIT");

/// Buckets of [`STORE_LATENCY`], in seconds: a local folder answers in milliseconds, S3 in tens
/// of milliseconds, a struggling endpoint in seconds.
pub const STORE_LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Commit time of the newest stored transaction, in Unix microseconds (0: none yet).
static LAST_COMMIT_MICROS: AtomicI64 = AtomicI64::new(0);
/// The archiver extends the newest restorable window: each stored commit moves its latest
/// instant ([`RESTORABLE_LATEST`]) on.
static EXTENDS_WINDOW: AtomicBool = AtomicBool::new(false);

/// Describes every metric and sets the counters and the gauges alert rules read to their
/// start values (see the module's invariant). Called once the recorder is installed.
pub fn describe_and_initialise() {
    describe_gauge!(BUILD_INFO, "1, labelled with the version and git commit");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_commit" => GIT_COMMIT)
        .set(1.0);
    describe_gauge!(
        ARCHIVING,
        "1 while the stream is being archived, 0 otherwise"
    );
    metrics::gauge!(ARCHIVING).set(0.0);
    describe_gauge!(
        READY,
        "1 once the first acknowledgement was sent to the slot"
    );
    metrics::gauge!(READY).set(0.0);
    describe_gauge!(HEALTHY, "1 while /healthz answers 200");
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
    metrics::gauge!(LAG_BYTES).set(0.0);
    describe_gauge!(
        LAST_DURABLE,
        Unit::Seconds,
        "Unix time the durable position last moved (or the attempt started streaming)"
    );
    describe_gauge!(
        LAST_STORED_COMMIT,
        Unit::Seconds,
        "commit time of the newest stored transaction"
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "now minus the commit time of the newest stored transaction"
    );
    describe_gauge!(
        SLOT_RETAINED_WAL,
        Unit::Bytes,
        "WAL the slot keeps on the source (current WAL position minus the slot's restart_lsn)"
    );
    describe_gauge!(
        MAX_SLOT_WAL_KEEP,
        Unit::Bytes,
        "the source's max_slot_wal_keep_size; -1 when unlimited"
    );
    describe_counter!(SEGMENTS_STORED, "segments stored");
    describe_counter!(STORED_BYTES, Unit::Bytes, "bytes of segments stored");
    describe_counter!(STORE_RETRIES, "segment writes retried");
    describe_histogram!(
        STORE_LATENCY,
        Unit::Seconds,
        "repository requests by operation"
    );
    describe_counter!(
        STORE_ERRORS,
        "failed repository requests by operation and kind (transient, permanent, conflict)"
    );
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
    metrics::gauge!(CHAIN_HOLES).set(0.0);
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
        "snapshot time of the newest complete base backup of the generation"
    );
    describe_gauge!(
        LAST_BASE_BACKUP_SIZE,
        Unit::Bytes,
        "stored size of the newest complete base backup of the generation"
    );
    describe_gauge!(
        PREVIOUS_BASE_BACKUP_SIZE,
        Unit::Bytes,
        "stored size of the base backup before the newest one"
    );
    describe_gauge!(
        LAST_BASE_BACKUP_SUCCESS,
        "1 when the last base backup this archiver took succeeded, 0 when it failed"
    );
    describe_gauge!(
        BASE_BACKUP_RUNNING,
        "1 while a scheduled base backup is being taken, 0 otherwise"
    );
    metrics::gauge!(BASE_BACKUP_RUNNING).set(0.0);
    describe_gauge!(
        BASE_BACKUP_SECONDS,
        Unit::Seconds,
        "how long the newest base backup took"
    );
    describe_gauge!(
        RESTORABLE_EARLIEST,
        Unit::Seconds,
        "the earliest instant a restore can reach"
    );
    describe_gauge!(
        RESTORABLE_LATEST,
        Unit::Seconds,
        "restores reach the instants just before this one (the newest archived commit)"
    );
    for name in [
        SEGMENTS_STORED,
        STORED_BYTES,
        STORE_RETRIES,
        TRANSACTIONS,
        RESTARTS,
        SCHEMA_UNEXPLAINED,
        BASE_BACKUP_FAILURES,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in NEW_GENERATION_REASONS {
        metrics::counter!(NEW_GENERATIONS, "reason" => reason).absolute(0);
    }
    metered::initialise();
}

/// Records the commit time of the newest stored transaction ([`LAST_STORED_COMMIT`]); the lag
/// in seconds is computed from it at each scrape ([`refresh_lag`]).
pub fn stored_commit(t: PgTimestamp) {
    let micros = t.to_datetime().timestamp_micros();
    let before = LAST_COMMIT_MICROS.fetch_max(micros, Ordering::Relaxed);
    if micros > before {
        metrics::gauge!(LAST_STORED_COMMIT).set(micros as f64 / 1e6);
        if EXTENDS_WINDOW.load(Ordering::Relaxed) {
            metrics::gauge!(RESTORABLE_LATEST).set(micros as f64 / 1e6);
        }
    }
}

/// Sets [`LAG_SECONDS`] to now minus the newest stored commit (nothing before one is known).
pub fn refresh_lag() {
    let micros = LAST_COMMIT_MICROS.load(Ordering::Relaxed);
    if micros > 0 {
        metrics::gauge!(LAG_SECONDS).set((unix_now() - micros as f64 / 1e6).max(0.0));
    }
}

/// Now as Unix seconds.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An instant as Unix seconds.
pub fn unix_seconds(t: PgTimestamp) -> f64 {
    t.to_datetime().timestamp_micros() as f64 / 1e6
}
