//! The continuous archiver: slot → segments → store, acknowledging only what is durable.
//!
//! ```text
//! receiver (reads the slot) ──events──▶ writer (builds and seals segments) ──sealed──▶ uploader
//!     ▲                                                                                   │
//!     └───────────────── durable LSN (watch channel): the only LSN ever acknowledged ◀─────┘
//! ```
//!
//! Owns the archiving run: choosing where the stream resumes (the archive's own end, never the
//! slot's word alone), taking the first base backup of a generation, the pipeline above, and the
//! clean shutdown order (stop reading, seal, store, acknowledge, finish the stream).
//!
//! Invariants:
//! * **received ≥ sealed ≥ durable**, and only *durable* (every segment up to it is stored)
//!   is sent to PostgreSQL as the flush LSN. A crash at any instant therefore loses nothing:
//!   the slot replays from at most the archive's end. A segment that fails to store stops
//!   durable for good; segments stored past it meanwhile are deleted again (`upload.rs`).
//! * Resuming, segments past a hole above the slot's confirmed position (a failed upload's
//!   leftovers) are deleted; a hole below it (an acknowledged segment gone) is reported and the
//!   chain extended from its last segment (`resume.rs`). An overlap stops the run.
//! * A segment holds whole transactions, except streamed ones (PostgreSQL ≥ 14, protocol 2,
//!   `streaming` on), whose chunks are written as they arrive and may span segments. A
//!   transaction cut by a shutdown or crash is received again on the next run (a streamed one
//!   from its first chunk, which supersedes the earlier chunks at replay). Segment ends, and so
//!   the acknowledged LSN, are *stream positions*: every commit below is archived, none at or
//!   above (see `stream.rs` for why a position inside an in-progress streamed transaction is one).
//! * The stream resumes at the archive's end; a transaction whose commit LSN is below it is a
//!   duplicate and is dropped; a slot already beyond the archive's end is a gap and stops the run.
//! * One writer per repository: a run takes the repository's writer lease before its first
//!   write and renews it while it runs; a live lease of another archiver refuses the run
//!   (exit 4, naming it), and every segment is put only while the lease is held and only if it
//!   starts where the chain ends ([`crate::lease`]).
//! * Memory is bounded: the channels between the stages are bounded, so a slow store makes the
//!   receiver stop reading (the slot holds the WAL meanwhile).
//!   A transaction sent whole is buffered until its commit: with streaming on, the server
//!   streams any transaction larger than `logical_decoding_work_mem`, which bounds that buffer;
//!   with protocol 1 (PostgreSQL 10–13) a transaction is buffered whole.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backup::lock::BackupLock;
use crate::backup::{self, BackupRequest};
use crate::catalog::{self, chain, identity, Identity};
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::replication::{
    ReceiveTimeout, ReplicationClient, ReplicationMessage, SilenceWatch, Verdict,
};
use crate::segment::Record;
use crate::source::{Source, SourceError};
use crate::store::Store;
use crate::telemetry;
use crate::telemetry::health::Stream;

/// Settings of an archiving run.
#[derive(Clone, Debug)]
pub struct ArchiveOptions {
    pub slot: String,
    pub publication: String,
    /// The slot was named explicitly: it must exist (never created).
    pub slot_explicit: bool,
    /// The publication was named explicitly: it must exist (never created).
    pub publication_explicit: bool,
    /// Seal the open segment this long after its first commit (the RPO knob).
    pub seal_interval: Duration,
    /// Seal when the open segment reaches this many bytes (at the next commit).
    pub segment_bytes: usize,
    /// While idle, record the stream's progress in an empty segment at most this often.
    pub idle_interval: Duration,
    /// Send a standby status update at least this often.
    pub status_interval: Duration,
    /// A server silent this long is presumed gone (the attempt fails and is retried); after
    /// half of it a reply is requested. None: two thirds of the server's `wal_sender_timeout`.
    pub receive_timeout: Option<Duration>,
    /// Commit a heartbeat (a transactional logical message) this often; None: never.
    pub heartbeat: Option<Duration>,
    /// Segments uploading at once.
    pub upload_concurrency: usize,
    /// Connections used by a base backup.
    pub backup_parallel: usize,
    /// How long to wait for a slot still held by another connection before giving up.
    pub slot_wait: Duration,
    /// How long the writer lease lasts without renewal (renewed every sixth of it).
    pub lease_ttl: Duration,
    /// Base backups taken while archiving, beside the stream (`schedule.rs`); None: only the
    /// first of each generation.
    pub base_backup_schedule: Option<schedule::Schedule>,
    /// How long the base-backup lock lasts without renewal (`backup/lock.rs`).
    pub backup_lock_ttl: Duration,
    /// The segments' codec asked for (`--compression`): recorded in a new repository's
    /// identity; on an existing repository it must be the one recorded there (see
    /// [`identity::compression_for`]). None: the repository's, zstd for a new one.
    pub compression: Option<crate::segment::Compression>,
    /// The retention policy applied after each scheduled base backup; None: not applied.
    pub retention: Option<crate::catalog::retention::Policy>,
    /// Where that retention moves weekly and monthly archives (`--archive-storage-class`).
    pub archive_class: Option<crate::store::StorageClass>,
    /// Before the first stream, retry this long while the source is not accepting connections
    /// yet (`--source-wait`: a server starting beside the archiver); zero: fail at once.
    pub source_wait: Duration,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            slot: "tidemark".into(),
            publication: "tidemark".into(),
            slot_explicit: false,
            publication_explicit: false,
            seal_interval: Duration::from_secs(1),
            segment_bytes: 8 << 20,
            idle_interval: Duration::from_secs(60),
            status_interval: Duration::from_secs(10),
            receive_timeout: None,
            heartbeat: Some(Duration::from_secs(10)),
            upload_concurrency: 4,
            backup_parallel: 2,
            slot_wait: Duration::from_secs(30),
            lease_ttl: lease::DEFAULT_TTL,
            base_backup_schedule: None,
            backup_lock_ttl: backup::lock::DEFAULT_TTL,
            compression: None,
            retention: None,
            archive_class: None,
            source_wait: Duration::ZERO,
        }
    }
}

/// Why an archiving run stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("replication: {0}")]
    Replication(#[from] crate::replication::ReplicationError),
    #[error(transparent)]
    Repo(#[from] catalog::RepoError),
    #[error("storing segment {range}: {source}")]
    Upload {
        range: String,
        #[source]
        source: crate::store::StoreError,
    },
    /// A segment sealed with a key that was retired before it could be stored (see
    /// `upload`): not stored; starting the run over seals its changes again.
    #[error("segment {range} was sealed with key {key_id}, which the keyring no longer holds (retired while the segment waited to be stored); it was not stored, and its changes are sealed again with the current key when archiving starts over from the archive's end\nHINT: retire a key only once every archiver has stored what it sealed before `keys add` (`tidemark rekey` run after that)")]
    KeyRetired { range: String, key_id: String },
    #[error("repository: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("base backup: {0}")]
    Backup(#[from] backup::BackupError),
    #[error("the slot {slot:?} has confirmed position {confirmed} but the archive (generation {generation}) ends at {archive_end}: the changes between were consumed elsewhere and are not in the archive\nHINT: if this is expected (the slot was advanced by hand), drop the slot (SELECT pg_drop_replication_slot('{slot}')) and run archive again: it starts a new generation with a fresh base backup")]
    Gap {
        slot: String,
        confirmed: Lsn,
        archive_end: Lsn,
        generation: u32,
    },
    #[error("decoding the change stream at {lsn}: {detail}")]
    Decode { lsn: Lsn, detail: String },
    #[error("the replication stream ended unexpectedly")]
    StreamEnded,
    #[error(transparent)]
    SchemaChange(#[from] crate::ddl::UnexplainedSchemaChange),
    #[error("publication {publication:?} was dropped while slot {slot:?} needed it: the slot can never decode past that point, even with the publication created again\nHINT: the slot was named with --slot, so tidemark does not drop it: drop it (SELECT pg_drop_replication_slot('{slot}')), create it again (tidemark setup --slot {slot}) and run archive: it starts a new generation with a new base backup (the changes in between are not archived)")]
    PublicationLost { publication: String, slot: String },
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error(transparent)]
    BackupLock(#[from] backup::lock::LockError),
    #[error("internal: {0}")]
    Internal(String),
}

impl crate::error::Classify for ArchiveError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            ArchiveError::Source(e) => e.exit_status(),
            ArchiveError::Replication(e) => e.exit_status(),
            ArchiveError::Repo(e) => e.exit_status(),
            ArchiveError::Upload { source, .. } => source.exit_status(),
            ArchiveError::KeyRetired { .. } => Usage,
            ArchiveError::Store(e) => e.exit_status(),
            ArchiveError::Backup(e) => e.exit_status(),
            ArchiveError::SchemaChange(e) => e.exit_status(),
            ArchiveError::Lease(e) => e.exit_status(),
            ArchiveError::BackupLock(e) => e.exit_status(),
            ArchiveError::Gap { .. } => Damaged,
            ArchiveError::StreamEnded => Database,
            ArchiveError::Decode { .. } | ArchiveError::Internal(_) => Unexpected,
            ArchiveError::PublicationLost { .. } => Database,
        }
    }
}

impl ArchiveError {
    /// The walsender could not decode because `publication` does not exist at the slot's
    /// position (it was dropped, or dropped and created again, after that point).
    pub fn lost_publication(&self, publication: &str) -> bool {
        matches!(self, ArchiveError::Replication(crate::replication::ReplicationError::Server { code, message, .. })
            if code == "42704" && *message == format!("publication \"{publication}\" does not exist"))
    }

    /// The source is not accepting connections yet: refused, unreachable, or starting up. A
    /// wrong password, a missing database or privilege is not.
    pub fn source_not_up(&self) -> bool {
        match self {
            ArchiveError::Source(SourceError::Unreachable { not_up, .. }) => *not_up,
            ArchiveError::Replication(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// Whether starting the run over (after a pause) may succeed: the server or the store went
    /// away for a while. Configuration, privilege, identity and continuity errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ArchiveError::Replication(e) => e.is_retryable(),
            ArchiveError::StreamEnded => true,
            ArchiveError::Source(e) => source_transient(e),
            ArchiveError::Store(e) => e.is_retryable(),
            ArchiveError::Upload { source, .. } => source.is_retryable(),
            // Started over, the run seals the segment's changes with the current key.
            ArchiveError::KeyRetired { .. } => true,
            ArchiveError::Lease(e) => e.is_transient(),
            // The generation's first backup waited its time for another backup: try again.
            ArchiveError::BackupLock(backup::lock::LockError::Held { .. }) => true,
            ArchiveError::BackupLock(backup::lock::LockError::Lease(e)) => e.is_transient(),
            ArchiveError::Backup(e) => match e {
                backup::BackupError::Store(s) => s.is_retryable(),
                backup::BackupError::Connect(_) => true,
                backup::BackupError::Postgres { source, .. } => pg_transient(source),
                _ => false,
            },
            ArchiveError::Repo(_)
            | ArchiveError::Gap { .. }
            | ArchiveError::Decode { .. }
            | ArchiveError::SchemaChange(_)
            | ArchiveError::PublicationLost { .. }
            | ArchiveError::Internal(_) => false,
        }
    }
}

fn source_transient(e: &SourceError) -> bool {
    match e {
        SourceError::Unreachable { .. } => true,
        // Our own previous connection may hold the slot until the server notices it is gone.
        SourceError::SlotActive(..) => true,
        SourceError::Query { source, .. } => pg_transient(source),
        _ => false,
    }
}

/// A closed connection, a server shutting down or starting up, a connection exception.
fn pg_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        // No SQLSTATE: an I/O error under the client.
        None => true,
    }
}

/// What a finished run did.
#[derive(Clone, Debug, Default)]
pub struct ArchiveSummary {
    pub generation: u32,
    pub start: Lsn,
    pub durable: Lsn,
    pub segments: u64,
    pub transactions: u64,
}

/// Where the stream resumes and in which generation.
struct Resume {
    generation: u32,
    start: Lsn,
}

/// Runs the archiver until `shutdown` is cancelled (clean stop) or an error that retrying cannot
/// fix occurs.
///
/// The first attempt fails fast on any error (a wrong connection string, a missing privilege, an
/// unreachable repository are the operator's to fix). Once the stream has run, a transient failure
/// (the server restarted, the connection dropped, the store is unreachable) does not end the
/// process: the pipeline drains what is whole, then the run starts over from the archive's end
/// after a backoff (1 s doubling to 30 s), as many times as it takes. Each attempt resumes exactly
/// where the durable archive ends, so a retry neither loses nor duplicates.
///
/// The repository's writer lease ([`crate::lease`]) is taken by the first attempt, kept across
/// attempts, and released when the run ends, however it ends.
pub async fn run(
    source_info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    shutdown: CancellationToken,
) -> Result<ArchiveSummary, ArchiveError> {
    // Every repository request of the run is measured (latency, errors, health).
    let store = telemetry::metered::metered(store);
    let lease = Arc::new(Lease::new(store.clone(), opts.lease_ttl, &opts.slot));
    let r = run_attempts(source_info, store, opts, shutdown, &lease).await;
    lease.release().await;
    let health = telemetry::health::health();
    match &r {
        Ok(_) => health.set_stream(Stream::Stopped("shut down".into())),
        // The message's first line (its hints are in the log).
        Err(e) => health.set_stream(Stream::Stopped(
            e.to_string().lines().next().unwrap_or_default().to_string(),
        )),
    }
    r
}

async fn run_attempts(
    source_info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    shutdown: CancellationToken,
    lease: &Arc<Lease>,
) -> Result<ArchiveSummary, ArchiveError> {
    let mut total = ArchiveSummary::default();
    let mut streamed_once = false;
    let mut backoff = crate::retry::Backoff::new(RETRY_FIRST, RETRY_MAX);
    let waiting_since = Instant::now();
    for attempt in 0u64.. {
        let stats = Arc::new(AttemptStats::default());
        let started = Instant::now();
        let r = run_once(
            source_info,
            store.clone(),
            opts,
            shutdown.clone(),
            stats.clone(),
            lease,
        )
        .await;
        let streamed = stats.streamed.load(Ordering::SeqCst);
        streamed_once |= streamed;
        total.segments += stats.segments.load(Ordering::SeqCst);
        total.transactions += stats.transactions.load(Ordering::SeqCst);
        if attempt == 0 {
            total.start = Lsn(stats.start.load(Ordering::SeqCst));
        }
        total.generation = stats.generation.load(Ordering::SeqCst) as u32;
        total.durable = total.durable.max(Lsn(stats.durable.load(Ordering::SeqCst)));
        match r {
            Ok(()) => return Ok(total),
            Err(e) if e.lost_publication(&opts.publication) && !shutdown.is_cancelled() => {
                if opts.slot_explicit {
                    return Err(ArchiveError::PublicationLost {
                        publication: opts.publication.clone(),
                        slot: opts.slot.clone(),
                    });
                }
                metrics::counter!(telemetry::NEW_GENERATIONS, "reason" => "publication_dropped")
                    .increment(1);
                tracing::error!(
                    publication = %opts.publication,
                    slot = %opts.slot,
                    durable = %total.durable,
                    "publication {:?} was dropped while slot {:?} needed it: the slot can never decode past that point. Dropping the slot and starting a new generation with a new base backup: the changes from {} until the new base backup are NOT in the archive",
                    opts.publication, opts.slot, total.durable
                );
                drop_slot_when_released(source_info, &opts.slot, opts.slot_wait).await?;
                streamed_once = true;
            }
            Err(e)
                if !streamed_once
                    && e.source_not_up()
                    && waiting_since.elapsed() < opts.source_wait
                    && !shutdown.is_cancelled() =>
            {
                let left = opts.source_wait.saturating_sub(waiting_since.elapsed());
                let delay = backoff.next_delay().min(left);
                warn!(error = %e, retry_in = ?delay, "the source is not accepting connections yet; retrying for up to {} more (--source-wait)", humantime::format_duration(Duration::from_secs(left.as_secs())));
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(total),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) if streamed_once && e.is_transient() && !shutdown.is_cancelled() => {
                metrics::counter!(telemetry::RESTARTS).increment(1);
                if streamed && started.elapsed() >= RETRY_RESET_AFTER {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                telemetry::health::health().set_stream(Stream::Down(
                    e.to_string().lines().next().unwrap_or_default().to_string(),
                ));
                warn!(error = %e, retry_in = ?delay, durable = %total.durable, "archiving interrupted; starting over from the archive's end");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(total),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                if matches!(e, ArchiveError::SchemaChange(_)) {
                    metrics::counter!(telemetry::SCHEMA_UNEXPLAINED).increment(1);
                }
                return Err(e);
            }
        }
    }
    unreachable!("the attempt counter does not run out")
}

/// Drops `slot` once no connection holds it (the failed stream's may take a moment to go).
async fn drop_slot_when_released(
    source_info: &ConnInfo,
    slot: &str,
    wait: Duration,
) -> Result<(), ArchiveError> {
    let mut repl = ReplicationClient::connect(source_info).await?;
    match tokio::time::timeout(wait.max(Duration::from_secs(1)), repl.drop_slot(slot, true)).await {
        Ok(r) => r.map_err(ArchiveError::from),
        Err(_) => Err(SourceError::SlotActive(slot.to_string(), "unknown".into()).into()),
    }
}

/// How long the generation's first base backup waits for another backup holding the
/// repository's base-backup lock (as `backup --lock-wait`'s default) before the attempt fails
/// and is retried.
const FIRST_BACKUP_LOCK_WAIT: Duration = Duration::from_secs(600);

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// An attempt that streamed at least this long resets the backoff (no jitter: one archiver per
/// repository, so there is no herd to spread).
const RETRY_RESET_AFTER: Duration = Duration::from_secs(60);

/// What one attempt did, readable after it failed.
#[derive(Default)]
struct AttemptStats {
    /// The stream started (the attempt got past every check).
    streamed: AtomicBool,
    generation: AtomicU64,
    start: AtomicU64,
    durable: AtomicU64,
    segments: AtomicU64,
    transactions: AtomicU64,
}

/// One attempt: preflight, resume point, stream until stopped or failed.
async fn run_once(
    source_info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    shutdown: CancellationToken,
    stats: Arc<AttemptStats>,
    lease: &Arc<Lease>,
) -> Result<(), ArchiveError> {
    let source = Source::connect(source_info).await?;
    source.check_server().await?;
    // Every check comes before the first write to the source or the repository.
    let publication_exists = source.publication_exists(&opts.publication).await?;
    if !publication_exists && opts.publication_explicit {
        return Err(SourceError::NoPublication(
            opts.publication.clone(),
            source.database.clone(),
            crate::statement::quote_ident(&opts.publication),
        )
        .into());
    }
    // A slot still held by a previous run (killed, its connection not yet noticed as gone by
    // the server) is waited for, a bounded time.
    let waited = Instant::now();
    let slot = loop {
        let slot = source.slot(&opts.slot).await?;
        match &slot {
            Some(s) if s.active_pid.is_some() => {
                if waited.elapsed() >= opts.slot_wait {
                    let pid = s.active_pid.clone().unwrap_or_default();
                    return Err(SourceError::SlotActive(opts.slot.clone(), pid).into());
                }
                debug!(slot = %opts.slot, "slot is active; waiting for it to be released");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => break slot,
        }
    };
    match &slot {
        None if opts.slot_explicit => return Err(SourceError::NoSlot(opts.slot.clone()).into()),
        None => source.check_free_slot().await?,
        Some(_) => {}
    }
    store.check_writable().await?;
    let mut repl = ReplicationClient::connect(source_info).await?;
    let sys = repl.identify_system().await?;
    let identity = identity::read_identity(&store).await?;
    identity::check_identity(&store, identity.as_ref(), sys.system_id, &source.database)?;
    let mut compression =
        identity::compression_for(&store.location(), identity.as_ref(), opts.compression)?;
    // The first write to the repository: from here on this archiver is its one writer. The
    // slot is free here (absent, or waited for above), so a lease left by a dead archiver of
    // the same slot is taken over; one of another archiver, alive or not, is not.
    let slot_free = slot.as_ref().is_none_or(|s| s.active_pid.is_none());
    lease.acquire(slot_free).await?;
    // Renewed until this attempt ends (through the base backup too); a lost lease stops the
    // attempt, and the uploader's fence refuses every segment from then on.
    let run_token = shutdown.child_token();
    let _renewal = {
        let stop = CancellationToken::new();
        tokio::spawn(lease.clone().keep_renewed(run_token.clone(), stop.clone()));
        stop.drop_guard()
    };

    if !publication_exists {
        info!(publication = %opts.publication, "creating publication FOR ALL TABLES");
        source.create_publication(&opts.publication).await?;
    }
    crate::ddl::ensure_capture_logged(&source.client).await;
    crate::ddl::ensure_protected(&source.client, &opts.publication).await;
    match source.not_covered(&opts.publication).await {
        Ok(items) => items
            .iter()
            .for_each(|m| tracing::warn!("not archived: {m}")),
        Err(e) => tracing::warn!(error = %e, "cannot list what the archive will not carry"),
    }
    let (mut manifests, mut chains) = list_backups_and_segments(&store).await?;
    // At most one base backup per repository at a time (a `tidemark backup` may be running):
    // a run that takes its generation's first backup takes the lock first (before it creates
    // a slot, which then holds no WAL while this waits), then lists again under it, so a
    // backup that finished meanwhile is seen (and, in the slot's generation, is the base).
    // A lock left by the archiver whose writer lease this one took over (killed during its
    // own first backup) is taken over at once; a live manual backup's is waited for.
    let mut first_backup_lock = None;
    if needs_first_backup(slot.is_some(), &manifests, &chains) {
        let lock = tokio::select! {
            l = BackupLock::acquire_for(
                lease,
                store.clone(),
                opts.backup_lock_ttl,
                &opts.slot,
                FIRST_BACKUP_LOCK_WAIT,
            ) => l?,
            e = fenced(lease, &run_token) => return Err(e.into()),
            _ = shutdown.cancelled() => {
                info!("stopping while waiting for the base-backup lock; nothing was written");
                return Ok(());
            }
        };
        match list_backups_and_segments(&store).await {
            Ok(l) => (manifests, chains) = l,
            Err(e) => {
                lock.release().await;
                return Err(e);
            }
        }
        first_backup_lock = Some(lock);
    }
    let current_gen = manifests
        .iter()
        .map(|m| m.generation)
        .chain(chains.keys().copied())
        .max()
        .unwrap_or(0);

    let backup_req = |generation: u32| BackupRequest {
        source: source_info,
        snapshot: "",
        consistent_point: Lsn::ZERO,
        system_id: sys.system_id,
        timeline: sys.timeline,
        generation,
        publication: &opts.publication,
        parallel: opts.backup_parallel,
        origin: backup::Origin::Initial,
        tag: None,
    };

    // The generation's first base backup, when this attempt takes it.
    let mut taken = None;
    let resume = async {
    Ok::<_, ArchiveError>(match slot {
        None => {
            let generation = current_gen + 1;
            if chains.contains_key(&current_gen) {
                metrics::counter!(telemetry::NEW_GENERATIONS, "reason" => "slot_lost").increment(1);
                warn!(slot = %opts.slot, generation, "the slot is gone: starting a new generation; changes after the end of generation {current_gen} were not archived");
            } else if current_gen > 0 {
                // Backups taken by `tidemark backup` before any archiving: nothing was lost.
                info!(slot = %opts.slot, generation, "the repository has base backups but no change archive yet: starting generation {generation}");
            }
            let lock = first_backup_lock.take().ok_or_else(|| {
                ArchiveError::Internal("no base-backup lock for the first backup".into())
            })?;
            let (created, m) = take_under(lock, fenced(lease, &run_token), async {
                let created = repl.create_logical_slot(&opts.slot, false, true).await?;
                let snapshot = created.snapshot_name.clone().ok_or_else(|| {
                    ArchiveError::Internal("CREATE_REPLICATION_SLOT returned no snapshot".into())
                })?;
                info!(slot = %opts.slot, point = %created.consistent_point, "created slot; taking the base backup of generation {generation}");
                let req = BackupRequest {
                    snapshot: &snapshot,
                    consistent_point: created.consistent_point,
                    ..backup_req(generation)
                };
                let m = backup::take(&store, req).await?;
                Ok((created, m))
            })
            .await?;
            info!(backup = %m.id, "base backup stored");
            taken = Some(m.snapshot_time.to_datetime());
            Resume {
                generation,
                start: created.consistent_point,
            }
        }
        Some(slot) => {
            let generation = current_gen.max(1);
            let chain = chains.get(&generation).map(Vec::as_slice).unwrap_or(&[]);
            let chain_end = mend_chain(&store, chain, slot.confirmed_flush).await?;
            let has_backup = manifests.iter().any(|m| m.generation == generation);
            let start = chain_end.unwrap_or(slot.confirmed_flush);
            if slot.confirmed_flush > start {
                return Err(ArchiveError::Gap {
                    slot: opts.slot.clone(),
                    confirmed: slot.confirmed_flush,
                    archive_end: start,
                    generation,
                });
            }
            if !has_backup {
                info!(
                    generation,
                    "no base backup in this generation yet: taking one"
                );
                let lock = first_backup_lock.take().ok_or_else(|| {
                    ArchiveError::Internal("no base-backup lock for the first backup".into())
                })?;
                let m = take_under(
                    lock,
                    fenced(lease, &run_token),
                    take_backup_with_temporary_slot(&store, backup_req(generation)),
                )
                .await?;
                info!(backup = %m.id, "base backup stored");
                taken = Some(m.snapshot_time.to_datetime());
            }
            Resume { generation, start }
        }
    })
    }
    .await;
    // Not taken (a backup of the slot's generation finished while this waited), or left by an
    // error: released now rather than at its expiry.
    if let Some(lock) = first_backup_lock.take() {
        lock.release().await;
    }
    let resume = resume?;
    if taken.is_some() {
        metrics::gauge!(telemetry::LAST_BASE_BACKUP_SUCCESS).set(1.0);
    }
    if identity.is_none() {
        let id = Identity::new(sys.system_id, &source.database, compression);
        // Another command may have created the repository meanwhile: its codec is the one.
        let written = identity::write_identity(&store, &id).await?;
        compression =
            identity::compression_for(&store.location(), Some(&written), opts.compression)?;
    }
    slot_watch::check_wal_keep(&source.client).await;
    // The normal connection stays open for the retained-WAL poll until the attempt ends.
    let _retained = {
        let stop = run_token.child_token();
        tokio::spawn(slot_watch::poll_retained_wal(
            source.client,
            opts.slot.clone(),
            stop.clone(),
        ));
        stop.drop_guard()
    };
    if telemetry::server::installed() {
        telemetry::catalog::record(&store, resume.generation, Some(resume.start)).await;
    }

    let pubs = crate::sql::quote_ident(&opts.publication);
    let plugin_options = stream::plugin_options(repl.server_version_num(), &pubs);
    let stream = repl
        .start_replication(&opts.slot, resume.start, &plugin_options)
        .await?;
    info!(slot = %opts.slot, generation = resume.generation, start = %resume.start, "archiving");

    let ctx = WriterContext {
        system_id: sys.system_id,
        timeline: sys.timeline,
        generation: resume.generation,
        database: sys.dbname.clone().unwrap_or_default(),
        slot: opts.slot.clone(),
        codec: store.codec(),
        compression,
    };
    stats
        .generation
        .store(resume.generation as u64, Ordering::SeqCst);
    stats.start.store(resume.start.0, Ordering::SeqCst);
    stats.durable.store(resume.start.0, Ordering::SeqCst);
    stats.streamed.store(true, Ordering::SeqCst);
    lease.check()?;
    lease.begin_chain(resume.generation, resume.start);
    let scheduled = opts.base_backup_schedule.clone().map(|schedule| {
        let ctx = schedule::Context {
            schedule,
            source: source_info.clone(),
            store: store.clone(),
            system_id: sys.system_id,
            timeline: sys.timeline,
            generation: resume.generation,
            publication: opts.publication.clone(),
            parallel: opts.backup_parallel,
            slot: opts.slot.clone(),
            lock_ttl: opts.backup_lock_ttl,
            writer: lease.clone(),
            newest: schedule::newest_of(&manifests, resume.generation).max(taken),
            retention: opts.retention.clone(),
            archive_class: opts.archive_class.clone(),
        };
        let stop = run_token.child_token();
        (tokio::spawn(schedule::run(ctx, stop.clone())), stop)
    });
    let piped = pipeline(
        stream,
        store,
        opts,
        ctx,
        resume.start,
        source_info.clone(),
        run_token.clone(),
        stats,
        lease.clone(),
    )
    .await;
    if let Some((task, stop)) = scheduled {
        // A backup in progress is abandoned, its lock released.
        stop.cancel();
        if tokio::time::timeout(SCHEDULE_STOP, task).await.is_err() {
            warn!("the scheduled base backup did not stop in time; its lock expires by itself");
        }
    }
    piped?;
    if run_token.is_cancelled() && !shutdown.is_cancelled() {
        // Stopped by the lease's renewal, with nothing left to store.
        lease.check()?;
        return Err(ArchiveError::Internal(
            "the attempt stopped without a shutdown or an error".into(),
        ));
    }
    Ok(())
}

/// Prepares the current generation's chain for extension (see `resume.rs`): reports holes
/// below the slot's confirmed position, deletes the segments a failed upload left past a hole
/// above it, and returns the end the run resumes at.
async fn mend_chain(
    store: &Arc<dyn Store>,
    chain: &[catalog::SegmentRef],
    confirmed: Lsn,
) -> Result<Option<Lsn>, ArchiveError> {
    let plan = resume::plan_chain(chain, confirmed)?;
    for hole in &plan.damage {
        warn!(
            generation = hole.generation,
            missing = %hole.range(),
            before = %chain[hole.next - 1].key,
            after = %chain[hole.next].key,
            "the archive has a hole: no segment covers {}, which was archived and acknowledged (was a segment deleted?); restores cannot cross it; archiving continues past it. HINT: run `tidemark backup` so that the instants from now on can be restored",
            hole.range()
        );
    }
    metrics::gauge!(telemetry::CHAIN_HOLES).set(plan.damage.len() as f64);
    if let Some(hole) = &plan.orphan_hole {
        warn!(
            generation = hole.generation,
            hole = %hole.range(),
            segments = plan.orphans.len(),
            confirmed = %confirmed,
            "deleting segments stored past a hole by a failed upload; the slot sends their changes again"
        );
    }
    for seg in plan.orphans {
        store.delete(&seg.key).await?;
        info!(object = %seg.key, "deleted a segment stored past a hole");
    }
    Ok(plan.end)
}

/// Segment chains by generation, each sorted by LSN.
type Chains = std::collections::BTreeMap<u32, Vec<catalog::SegmentRef>>;

/// The repository's complete base backups and its segment chains, by generation.
async fn list_backups_and_segments(
    store: &Arc<dyn Store>,
) -> Result<(Vec<backup::Manifest>, Chains), ArchiveError> {
    let manifests = backup::list_manifests(store).await?;
    Ok((manifests, chain::list_segments(store).await?))
}

/// Whether this run takes its generation's first base backup: with no slot it starts a new
/// generation (which needs one); with the slot, when the newest generation has none yet.
fn needs_first_backup(has_slot: bool, manifests: &[backup::Manifest], chains: &Chains) -> bool {
    let newest = manifests
        .iter()
        .map(|m| m.generation)
        .chain(chains.keys().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    !has_slot || !manifests.iter().any(|m| m.generation == newest)
}

/// Runs `backup` under the base-backup `lock`, stopped when the lock is lost or when `fenced`
/// ends (the writer lease is lost); releases the lock however it ends (a lock left behind
/// would hold the next attempt up to its expiry).
async fn take_under<T>(
    lock: BackupLock,
    fenced: impl std::future::Future<Output = lease::LeaseError>,
    backup: impl std::future::Future<Output = Result<T, ArchiveError>>,
) -> Result<T, ArchiveError> {
    let lost = lock.lost();
    let r = tokio::select! {
        m = backup => m,
        _ = lost.cancelled() => Err(match lock.check() {
            Err(e) => e.into(),
            Ok(()) => ArchiveError::Internal("the base-backup lock's renewal stopped".into()),
        }),
        e = fenced => Err(e.into()),
    };
    lock.release().await;
    r
}

/// Ends when this run's writer lease is lost (its renewal cancelled `run` and the lease is no
/// longer held): another archiver took the repository over, and this one's first backup must
/// stop. Never ends on a shutdown (`run` cancelled, the lease still held).
async fn fenced(lease: &Lease, run: &CancellationToken) -> lease::LeaseError {
    run.cancelled().await;
    match lease.check() {
        Err(e) => e,
        Ok(()) => std::future::pending().await,
    }
}

/// Takes a base backup aligned with the stream through a temporary slot's exported snapshot.
/// `base` gives everything but the snapshot and the consistent point.
pub async fn take_backup_with_temporary_slot(
    store: &Arc<dyn Store>,
    base: BackupRequest<'_>,
) -> Result<backup::Manifest, ArchiveError> {
    let mut tmp = ReplicationClient::connect(base.source).await?;
    let name = format!("tidemark_backup_{}", rand::random::<u32>());
    let slot = tmp.create_logical_slot(&name, true, true).await?;
    let snapshot = slot
        .snapshot_name
        .clone()
        .ok_or_else(|| ArchiveError::Internal("temporary slot returned no snapshot".into()))?;
    let req = BackupRequest {
        snapshot: &snapshot,
        consistent_point: slot.consistent_point,
        ..base
    };
    let m = backup::take(store, req).await?;
    // The temporary slot disappears with its connection.
    drop(tmp);
    Ok(m)
}

/// Identity fields every segment of this run carries.
#[derive(Clone)]
struct WriterContext {
    system_id: u64,
    timeline: u32,
    generation: u32,
    database: String,
    slot: String,
    /// The repository's codec: a segment is encoded once, when sealed.
    codec: Arc<dyn crate::object::Codec>,
    /// The repository's segment codec (its identity's).
    compression: crate::segment::Compression,
}

enum Event {
    Data(Record),
    Idle {
        wal_end: Lsn,
        server_time: PgTimestamp,
    },
}

struct Sealed {
    range: String,
    end: Lsn,
    /// The segment as stored, encoded once at seal time so that every retry puts the same bytes
    /// (`crate::object`).
    object: crate::object::Encoded,
    /// The commit time of the newest transaction at or below its end (this segment's or an
    /// earlier one's; None: none committed this run yet): the lag in seconds once it is stored.
    last_commit: Option<PgTimestamp>,
    /// Its share of the in-memory budget, released when it is stored (dropped).
    admitted: Option<tokio::sync::OwnedSemaphorePermit>,
}

#[allow(clippy::too_many_arguments)]
async fn pipeline(
    mut stream: crate::replication::ReplicationStream,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    ctx: WriterContext,
    start: Lsn,
    source_info: ConnInfo,
    shutdown: CancellationToken,
    stats: Arc<AttemptStats>,
    lease: Arc<Lease>,
) -> Result<(), ArchiveError> {
    let (event_tx, event_rx) = mpsc::channel::<Vec<Event>>(EVENT_QUEUE);
    let (sealed_tx, sealed_rx) = mpsc::channel::<Sealed>(opts.upload_concurrency.max(1));
    let (durable_tx, mut durable_rx) = watch::channel(start);
    let failed = CancellationToken::new();
    let flow = Arc::new(Flow::new(in_flight_budget(opts.segment_bytes)));

    let writer = tokio::spawn(writer_task(
        event_rx,
        sealed_tx,
        opts.clone(),
        ctx.clone(),
        start,
        flow.clone(),
    ));
    let uploader = tokio::spawn(uploader_task(
        sealed_rx,
        store,
        durable_tx,
        opts.upload_concurrency.max(1),
        failed.clone(),
        stats.clone(),
        flow.clone(),
        lease,
    ));
    let heartbeat = opts.heartbeat.map(|every| {
        let token = shutdown.child_token();
        tokio::spawn(heartbeat_task(source_info, every, token))
    });

    let mut status_tick = tokio::time::interval(opts.status_interval);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lag_tick = tokio::time::interval(LAG_REPORT_INTERVAL);
    lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A server silent too long is presumed gone (a partition without a reset): see
    // `replication::liveness`. The timer is moved on lazily, when it fires.
    let receive_timeout = match opts.receive_timeout {
        Some(bound) => ReceiveTimeout::explicit(bound),
        None => ReceiveTimeout::derived(stream.wal_sender_timeout()),
    };
    debug!(bound = ?receive_timeout.bound, from = %receive_timeout, "receive timeout");
    let mut silence = SilenceWatch::new(receive_timeout, Instant::now());
    let silence_timer = tokio::time::sleep_until(silence.next_check().into());
    tokio::pin!(silence_timer);
    let mut acked = start;
    let mut received = start;
    let mut acked_at = Instant::now();
    // Messages read from the stream that the writer has no room for yet. While they wait, the
    // stream is not read (the slot keeps the WAL), but status updates keep flowing so the
    // server does not time the connection out (wal_sender_timeout).
    let mut pending: Option<Vec<Event>> = None;
    let mut result: Result<(), ArchiveError> = Ok(());
    metrics::gauge!(telemetry::ARCHIVING).set(1.0);
    metrics::gauge!(telemetry::DURABLE_LSN).set(start.0 as f64);
    // An attempt that stores nothing from here on shows as stalled from its start.
    metrics::gauge!(telemetry::LAST_DURABLE).set(telemetry::unix_now());
    let health = telemetry::health::health();
    health.set_stream(Stream::Live);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = failed.cancelled() => break,
            changed = durable_rx.changed() => {
                if changed.is_err() { break; }
                let durable = *durable_rx.borrow();
                if durable > acked {
                    acked = durable;
                    acked_at = Instant::now();
                    metrics::gauge!(telemetry::DURABLE_LSN).set(acked.0 as f64);
                    metrics::gauge!(telemetry::LAST_DURABLE).set(telemetry::unix_now());
                    if let Err(e) = stream.send_status(received.max(acked), acked, acked, false).await {
                        result = Err(e.into());
                        break;
                    }
                    if !health.ready() {
                        health.set_ready();
                        metrics::gauge!(telemetry::READY).set(1.0);
                    }
                }
            }
            _ = status_tick.tick() => {
                metrics::gauge!(telemetry::RECEIVED_LSN).set(received.max(acked).0 as f64);
                metrics::gauge!(telemetry::LAG_BYTES).set(received.0.saturating_sub(acked.0) as f64);
                if let Err(e) = stream.send_status(received.max(acked), acked, acked, false).await {
                    result = Err(e.into());
                    break;
                }
            }
            _ = lag_tick.tick() => {
                let behind = received.0.saturating_sub(acked.0);
                // Sealed segments waiting to be stored that long, or reading paused. (Heartbeats
                // alone wait for the idle interval by design: not a lag.)
                let unstored = flow.unstored.load(Ordering::Relaxed) > 0;
                if pending.is_some() || (unstored && acked_at.elapsed() >= LAG_REPORT_INTERVAL) {
                    warn!(
                        received = %received,
                        durable = %acked,
                        lag_bytes = behind,
                        since = ?acked_at.elapsed(),
                        reading_paused = pending.is_some(),
                        "the archive is falling behind the stream: nothing stored for a while (is the repository reachable?); the slot keeps the WAL meanwhile"
                    );
                }
            }
            () = &mut silence_timer, if pending.is_none() => {
                silence.heard(stream.last_received());
                match silence.check(Instant::now()) {
                    Verdict::Dead => {
                        result = Err(stream.presumed_dead(&receive_timeout).into());
                        break;
                    }
                    Verdict::RequestReply(_) => {
                        debug!(silent_for = ?receive_timeout.reply_after(), "no message from the server for a while: requesting a reply");
                        if let Err(e) = stream.send_status(received.max(acked), acked, acked, true).await {
                            result = Err(e.into());
                            break;
                        }
                    }
                    Verdict::WaitUntil(_) => {}
                }
                silence_timer.as_mut().reset(silence.next_check().into());
            }
            permit = event_tx.reserve(), if pending.is_some() => {
                match permit {
                    Ok(p) => {
                        p.send(pending.take().expect("pending event"));
                        // Reading resumes: what the server sent meanwhile may be unread.
                        silence.heard(Instant::now());
                    }
                    Err(_) => break,
                }
            }
            msg = stream.next(), if pending.is_none() => {
                // This message and every whole one the same socket read brought go to the
                // writer as one batch: one hand-over (and one wake-up) per read, not per
                // message.
                let mut batch = Vec::with_capacity(BATCH_MESSAGES);
                let mut batch_bytes = 0usize;
                let mut next = msg.transpose();
                let mut ended = false;
                while let Some(msg) = next.take() {
                    match msg {
                        Ok(ReplicationMessage::XLogData { wal_start, server_time, data, .. }) => {
                            received = received.max(wal_start);
                            batch_bytes += data.len();
                            batch.push(Event::Data(Record { lsn: wal_start, server_time, payload: data }));
                        }
                        Ok(ReplicationMessage::Keepalive { wal_end, server_time, reply_requested }) => {
                            if reply_requested {
                                if let Err(e) = stream.send_status(received.max(acked), acked, acked, false).await {
                                    result = Err(e.into());
                                    ended = true;
                                    break;
                                }
                            }
                            batch.push(Event::Idle { wal_end, server_time });
                        }
                        Err(e) => { result = Err(e.into()); ended = true; break; }
                    }
                    if batch.len() < BATCH_MESSAGES && batch_bytes < BATCH_BYTES {
                        next = stream.next_buffered();
                    }
                }
                if batch.is_empty() && !ended {
                    // `next()` returned Ok(None): the server ended the copy.
                    result = Err(ArchiveError::StreamEnded);
                    ended = true;
                }
                if !batch.is_empty() {
                    // Hand the batch over at once when there is room (the common case).
                    match event_tx.try_send(batch) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(b)) => pending = Some(b),
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                if ended {
                    break;
                }
            }
        }
    }
    metrics::gauge!(telemetry::ARCHIVING).set(0.0);
    // Shutdown order: stop reading (done), seal what is whole, store it, acknowledge, finish.
    if let Some(h) = heartbeat {
        h.abort();
    }
    drop(event_tx);
    let writer_result = writer
        .await
        .map_err(|e| ArchiveError::Internal(e.to_string()))?;
    let upload_result = uploader
        .await
        .map_err(|e| ArchiveError::Internal(e.to_string()))?;
    let durable = *durable_rx.borrow();
    stats.durable.store(durable.0, Ordering::SeqCst);
    if let Ok(n) = &writer_result {
        stats.transactions.fetch_add(*n, Ordering::SeqCst);
    }
    // A failed upload comes first: the writer then fails only because the uploader stopped.
    upload_result?;
    writer_result?;
    result?;
    stream.send_status(durable, durable, durable, false).await?;
    if let Err(e) = stream.finish().await {
        debug!(error = %e, "finishing the replication stream");
    }
    info!(durable = %durable, segments = stats.segments.load(Ordering::SeqCst), "archiver stopped cleanly");
    Ok(())
}

/// Batches of messages between the receiver and the writer. Together with the budget of sealed
/// segments ([`in_flight_budget`]) this bounds the archiver's memory while the store is slow or
/// unreachable: at most `EVENT_QUEUE × BATCH_MESSAGES` messages (16,384) and, but for single
/// messages larger than `BATCH_BYTES`, `EVENT_QUEUE × BATCH_BYTES` (4 MiB) of them, plus the
/// segment being built (about `segment_bytes`), plus the budget.
const EVENT_QUEUE: usize = 16;
/// A batch ends after this many messages (a socket read of a backlog brings about a thousand
/// pgbench messages; fewer hand-overs per read, each a wake-up of the writer)…
const BATCH_MESSAGES: usize = 1024;
/// …or once it holds this many payload bytes.
const BATCH_BYTES: usize = 256 * 1024;

/// Bytes of sealed segments held in memory at once, queued or uploading: two full segments
/// (one uploading while the next waits, so the writer never waits for a whole upload), and
/// never less than 4 MiB so that the small segments of a live stream can upload
/// `upload_concurrency` at a time. With the segment being built, this keeps the archiver's
/// memory flat through a transaction of any size.
fn in_flight_budget(segment_bytes: usize) -> usize {
    segment_bytes.saturating_mul(2).max(4 << 20)
}
/// Prefix of the heartbeat's logical message.
pub const HEARTBEAT_PREFIX: &str = "tidemark.heartbeat";
/// How often a growing lag is logged.
const LAG_REPORT_INTERVAL: Duration = Duration::from_secs(15);

/// The writer's state machine (streamed transactions, segment positions), apart from I/O.
mod stream;

/// Which sealed segments may be acknowledged.
mod durable;

/// The uploader: sealed segments to the store, the durable LSN back.
mod upload;
use upload::uploader_task;

/// Holes and orphans in the chain being extended.
mod resume;

/// The WAL the slot retains on the source.
mod slot_watch;

/// Base backups on a schedule, beside the stream.
pub mod schedule;
/// How long the end of an attempt waits for its scheduled backup to stop and release its lock.
const SCHEDULE_STOP: Duration = Duration::from_secs(15);
use crate::lease::{self, Lease};

async fn writer_task(
    mut events: mpsc::Receiver<Vec<Event>>,
    sealed: mpsc::Sender<Sealed>,
    opts: ArchiveOptions,
    ctx: WriterContext,
    start: Lsn,
    flow: Arc<Flow>,
) -> Result<u64, ArchiveError> {
    let mut w = stream::Writer::new(ctx, opts.segment_bytes, start);
    // When the open segment is due for its application commits (see `commit_deadline`).
    let mut commit_due: Option<Instant> = None;
    let mut last_seal = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = sleep_until_some(commit_due) => {
                if !w.in_buffered_txn() && w.can_seal() {
                    send_sealed(&sealed, &flow, w.seal()).await?;
                    commit_due = None;
                    last_seal = Instant::now();
                } else {
                    // A transaction is arriving: look again in a moment.
                    commit_due = Some(Instant::now() + Duration::from_millis(5));
                }
                continue;
            }
            _ = tick.tick() => {
                // Anything but application commits — heartbeats, recorded sequence values,
                // stream chunks not yet committed, keepalive progress — waits for
                // `idle_interval`, so that a quiet database costs about one PUT a minute.
                if !w.in_buffered_txn() && w.can_seal() && last_seal.elapsed() >= opts.idle_interval {
                    send_sealed(&sealed, &flow, w.seal()).await?;
                    commit_due = None;
                    last_seal = Instant::now();
                }
                continue;
            }
        };
        let Some(batch) = ev else { break };
        for ev in batch {
            let outcome = match ev {
                Event::Idle {
                    wal_end,
                    server_time,
                } => {
                    w.idle(wal_end, server_time);
                    stream::Outcome::default()
                }
                Event::Data(rec) => w.record(rec)?,
            };
            if outcome.committed_data && commit_due.is_none() {
                let wait =
                    commit_deadline(opts.seal_interval, outcome.commit_age, flow.store_latency());
                commit_due = Some(Instant::now() + wait);
            }
            if w.size_due() {
                send_sealed(&sealed, &flow, w.seal()).await?;
                commit_due = None;
                last_seal = Instant::now();
            }
        }
    }
    // Input closed: seal what is written. A buffered (non-streamed) transaction is dropped and
    // received again; chunks of an open streamed transaction are sealed and superseded when the
    // server streams it again from its first chunk.
    if let Some(xid) = w.buffered_xid() {
        info!(
            xid,
            "dropping the transaction in progress; it will be received again"
        );
    }
    if w.can_seal() {
        send_sealed(&sealed, &flow, w.seal()).await?;
    } else if w.has_records() {
        info!("dropping re-streamed chunks that do not advance the stream position; they will be received again");
    }
    Ok(w.transactions())
}

/// How long after its arrival the first application commit of the open segment may wait before
/// the segment is sealed, so that it is stored about `seal_interval` after it committed on the
/// source: the seal interval less the time the commit took to reach us (measured on the
/// server's clock) and less the store's recent write latency. At least half the seal interval,
/// so that an archiver catching up on a backlog (every commit already old) still writes
/// segments of a useful size.
fn commit_deadline(
    seal_interval: Duration,
    commit_age: Duration,
    store_latency: Duration,
) -> Duration {
    seal_interval
        .saturating_sub(commit_age.saturating_add(store_latency))
        .max(seal_interval / 2)
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Shared between the writer and the uploader: the budget of sealed-segment bytes in memory
/// (queued or uploading), and the store's recent write latency.
struct Flow {
    /// Permits in KiB.
    budget: Arc<Semaphore>,
    budget_kib: u32,
    /// Exponentially weighted mean of successful segment writes, in microseconds.
    latency_us: AtomicU64,
    /// Segments sealed and not stored yet.
    unstored: std::sync::atomic::AtomicUsize,
}

impl Flow {
    fn new(budget_bytes: usize) -> Flow {
        let budget_kib = (budget_bytes / 1024).clamp(1, u32::MAX as usize / 2) as u32;
        Flow {
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
            latency_us: AtomicU64::new(0),
            unstored: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Waits until a sealed segment of `len` bytes fits in the budget (one segment larger than
    /// the whole budget takes all of it).
    async fn admit(&self, len: usize) -> tokio::sync::OwnedSemaphorePermit {
        let kib = (len.div_ceil(1024)).clamp(1, self.budget_kib as usize) as u32;
        self.budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("budget semaphore is never closed")
    }

    fn store_latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    fn observe_store(&self, took: Duration) {
        let sample = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.latency_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        self.latency_us.store(new, Ordering::Relaxed);
    }
}

async fn send_sealed(
    sealed: &mpsc::Sender<Sealed>,
    flow: &Flow,
    mut s: Sealed,
) -> Result<(), ArchiveError> {
    debug!(range = %s.range, bytes = s.object.len(), "sealed segment");
    s.admitted = Some(flow.admit(s.object.len()).await);
    flow.unstored.fetch_add(1, Ordering::Relaxed);
    sealed
        .send(s)
        .await
        .map_err(|_| ArchiveError::Internal("uploader stopped".into()))
}

fn decode(rec: &Record) -> Result<Message, ArchiveError> {
    pgoutput::decode(&rec.payload, false).map_err(|e| ArchiveError::Decode {
        lsn: rec.lsn,
        detail: e.to_string(),
    })
}

/// Keeps a quiet database's restore window current: a transactional logical message commits
/// every `every`, so the archive sees the server's clock pass. With it, the sequences whose value
/// changed are recorded (`tidemark.sequences`, see [`crate::ddl`]), so a restore sets them to
/// at most one interval behind the source.
async fn heartbeat_task(info: ConnInfo, every: Duration, stop: CancellationToken) {
    let client = match info.connect().await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "heartbeat disabled: cannot connect");
            return;
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequences = std::collections::HashMap::new();
    let mut sequences_failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                // A failure (a sequence dropped while read…) is retried at the next tick.
                match crate::ddl::emit_changed_sequences(&client, &mut sequences).await {
                    Ok(_) => sequences_failing = false,
                    Err(e) if !sequences_failing => {
                        warn!(error = %crate::error::chain(&e), "cannot record sequence values (retrying every heartbeat); meanwhile a restore sets sequences from the base backup and past the values of the columns they feed");
                        sequences_failing = true;
                    }
                    Err(_) => {}
                }
                let r = client
                    .execute("SELECT pg_logical_emit_message(true, $1, '')", &[&HEARTBEAT_PREFIX])
                    .await;
                if let Err(e) = r {
                    warn!(error = %e, "heartbeat disabled: cannot emit a logical message; a quiet database's restore window advances only with its own commits");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_deadline_subtracts_arrival_and_store_latency_down_to_half() {
        let s = Duration::from_secs(1);
        let ms = Duration::from_millis;
        assert_eq!(commit_deadline(s, ms(0), ms(0)), s);
        assert_eq!(commit_deadline(s, ms(30), ms(120)), ms(850));
        // A backlog: every commit is already old; segments still cover half a second.
        assert_eq!(commit_deadline(s, ms(5000), ms(10)), ms(500));
        assert_eq!(commit_deadline(s, ms(400), ms(400)), ms(500));
    }

    #[tokio::test]
    async fn flow_budget_bounds_sealed_bytes_and_tracks_latency() {
        let flow = Flow::new(4 << 20);
        let a = flow.admit(3 << 20).await;
        // A second 3 MiB segment does not fit until the first is released.
        let waiting = tokio::time::timeout(Duration::from_millis(50), flow.admit(3 << 20)).await;
        assert!(waiting.is_err(), "admitted past the budget");
        drop(a);
        let _b = flow.admit(3 << 20).await;
        // One segment larger than the whole budget takes all of it rather than waiting forever.
        drop(_b);
        let _huge = tokio::time::timeout(Duration::from_millis(50), flow.admit(64 << 20))
            .await
            .expect("an oversized segment is admitted alone");
        assert_eq!(flow.store_latency(), Duration::ZERO);
        flow.observe_store(Duration::from_millis(100));
        assert_eq!(flow.store_latency(), Duration::from_millis(100));
        flow.observe_store(Duration::from_millis(200));
        assert_eq!(flow.store_latency(), Duration::from_millis(120));
    }
}
