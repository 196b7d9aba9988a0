//! The base-backup lock: at most one base backup is taken per repository at a time.
//!
//! Owns the lock's records (`locks/base-backup/<term>-<seq>.json`) and the waiting for them.
//! The records, the decision to take, keep or refuse, the renewal and the release are the
//! writer lease's ([`crate::lease`], a [`Kind`] of its own): create-only puts (so it
//! works on S3), owner, host, pid and expiry in each record, renewed every sixth of its time
//! to live while the backup runs, released when it ends. Unlike the writer lease there is no
//! same-slot takeover: a live record is waited for, and one whose holder was killed is taken
//! over once it has expired ([`DEFAULT_TTL`] after its last renewal) — with one exception. An
//! archiver holds the lock on behalf of its writer lease (each record names that lease's
//! owner, `writer`), and an archiver whose writer lease took over another's live term (a
//! restart after a kill -9: the same slot, free) knows that holder is dead or fenced: a lock
//! held for that writer is taken over at once ([`Takeover::WriterGone`]), its term closed so
//! that a holder still alive loses it at its next renewal and stops its backup. A manual
//! backup's lock names no writer and is always waited for.
//!
//! Held by the archiver's first base backup of a generation (`archive.rs`, which waits for
//! it), its scheduled backups (`archive/schedule.rs`, which skip and retry while another holds
//! it) and by `tidemark backup` (which waits up to `--lock-wait`, then gives up with exit 4).
//! Does not own the backup itself (`take.rs`).
//!
//! Invariant: a backup's first object is stored only while its taker holds the lock; a lock
//! lost meanwhile (not renewed in time, or taken over after expiring) cancels [`BackupLock::lost`],
//! and the taker stops the backup (its objects are then an incomplete backup, never listed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

#[cfg(doc)]
use crate::lease::Takeover;
use crate::lease::{Kind, Lease, LeaseError, LeaseRecord};
use crate::store::Store;

/// Prefix of the lock's records.
pub const LOCK_PREFIX: &str = "locks/base-backup/";

/// How long the lock lasts without renewal: a killed holder blocks other backups this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);

/// The lock, as a kind of lease.
pub const KIND: Kind = Kind {
    prefix: LOCK_PREFIX,
    name: "base-backup lock",
    slot_takeover: false,
    gauge: None,
};

/// How often a waiting taker looks at the lock again.
const POLL: Duration = Duration::from_millis(500);

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("repository {location}: another base backup is running: {holder} (lock record {key}); gave up after waiting {waited:?}\nHINT: one base backup runs per repository at a time: run `tidemark backup` again once it has finished, or give a longer --lock-wait; if that process is dead, its lock expires at {expires} and is then taken over", holder = holder.describe(), expires = holder.expires_at)]
    Held {
        location: String,
        key: String,
        holder: Box<LeaseRecord>,
        waited: Duration,
    },
    #[error("base-backup lock: {0}")]
    Lease(#[source] LeaseError),
}

impl crate::error::Classify for LockError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        match self {
            LockError::Held { .. } => crate::error::ExitStatus::Repository,
            LockError::Lease(e) => e.exit_status(),
        }
    }
}

/// The lock, held: renewed until released or dropped.
pub struct BackupLock {
    lease: Arc<Lease>,
    lost: CancellationToken,
    _renewal: DropGuard,
}

impl BackupLock {
    /// Takes the lock of `store`'s repository for a backup serving `slot`, waiting up to `wait`
    /// while another holds it (logged once, naming the holder). `ttl`: how long the lock lasts
    /// without renewal.
    pub async fn acquire(
        store: Arc<dyn Store>,
        ttl: Duration,
        slot: &str,
        wait: Duration,
    ) -> Result<BackupLock, LockError> {
        BackupLock::take(Lease::of_kind(KIND, store, ttl, slot), wait).await
    }

    /// [`acquire`](Self::acquire), for a backup of the archiver holding `writer` (its writer
    /// lease): the records name that lease, and a lock held for a writer lease `writer` took
    /// over is taken over at once.
    pub async fn acquire_for(
        writer: &Lease,
        store: Arc<dyn Store>,
        ttl: Duration,
        slot: &str,
        wait: Duration,
    ) -> Result<BackupLock, LockError> {
        let lease =
            Lease::of_kind(KIND, store, ttl, slot).for_writer(writer.owner(), writer.superseded());
        BackupLock::take(lease, wait).await
    }

    async fn take(lease: Lease, wait: Duration) -> Result<BackupLock, LockError> {
        let lease = Arc::new(lease);
        let started = Instant::now();
        let mut logged = false;
        loop {
            match lease.acquire(false).await {
                Ok(()) => break,
                Err(LeaseError::Held {
                    location,
                    key,
                    holder,
                }) => {
                    let waited = started.elapsed();
                    if waited >= wait {
                        return Err(LockError::Held {
                            location,
                            key,
                            holder,
                            waited,
                        });
                    }
                    if !logged {
                        info!(holder = %holder.describe(), record = %key, wait = ?wait, "another base backup is running: waiting for its lock");
                        logged = true;
                    }
                    tokio::time::sleep(POLL.min(wait - waited)).await;
                }
                Err(e) => return Err(LockError::Lease(e)),
            }
        }
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        tokio::spawn(lease.clone().keep_renewed(lost.clone(), stop.clone()));
        Ok(BackupLock {
            lease,
            lost,
            _renewal: stop.drop_guard(),
        })
    }

    /// Cancelled when the lock is lost while held: the backup must stop.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether the lock is still held (and unexpired).
    pub fn check(&self) -> Result<(), LockError> {
        self.lease.check().map_err(LockError::Lease)
    }

    /// Stops the renewal and writes the release record, so the next backup need not wait.
    pub async fn release(self) {
        let BackupLock {
            lease, _renewal, ..
        } = self;
        drop(_renewal);
        lease.release().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn store(dir: &std::path::Path) -> Arc<dyn Store> {
        Arc::new(LocalStore::new(dir))
    }

    /// The newest record under `prefix` of the repository in `dir`.
    async fn newest_record(dir: &std::path::Path, prefix: &str) -> LeaseRecord {
        let store = store(dir);
        let newest = store.list(prefix).await.unwrap().pop().unwrap();
        serde_json::from_slice(&store.get(&newest.key).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_second_taker_waits_then_gives_up_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let a = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tidemark", Duration::ZERO)
            .await
            .unwrap();
        let started = Instant::now();
        let err = BackupLock::acquire(
            store(dir.path()),
            DEFAULT_TTL,
            "tidemark",
            Duration::from_millis(700),
        )
        .await
        .err()
        .expect("held");
        assert!(started.elapsed() >= Duration::from_millis(700), "it waited");
        let text = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{text}");
        assert!(
            text.contains("another base backup is running")
                && text.contains(&format!("pid {}", std::process::id()))
                && text.contains("--lock-wait"),
            "{text}"
        );
        assert_eq!(
            crate::error::Classify::exit_status(&err),
            crate::error::ExitStatus::Repository
        );
        a.check().unwrap();
        a.release().await;
        let b = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tidemark", Duration::ZERO)
            .await
            .expect("released: free at once");
        b.release().await;
    }

    #[tokio::test]
    async fn a_waiting_taker_gets_the_lock_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let a = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tidemark", Duration::ZERO)
            .await
            .unwrap();
        let s = store(dir.path());
        let waiter = tokio::spawn(async move {
            BackupLock::acquire(s, DEFAULT_TTL, "tidemark", Duration::from_secs(30)).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "waits while held");
        a.release().await;
        let b = waiter.await.unwrap().expect("taken after the release");
        b.check().unwrap();
    }

    #[tokio::test]
    async fn a_lock_held_for_a_writer_lease_taken_over_is_taken_over_at_once() {
        use crate::lease::{DEFAULT_TTL as LEASE_TTL, LEASE_PREFIX};
        let dir = tempfile::tempdir().unwrap();
        // Archiver a, holding its writer lease and, for it, the lock of a backup.
        let a = Lease::new(store(dir.path()), LEASE_TTL, "tm");
        a.acquire(false).await.unwrap();
        let a_lock =
            BackupLock::acquire_for(&a, store(dir.path()), DEFAULT_TTL, "tm", Duration::ZERO)
                .await
                .unwrap();
        // A manual backup waits for it, and so does an archiver that took nothing over.
        let manual = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tm", Duration::ZERO)
            .await
            .err()
            .expect("held");
        assert!(matches!(manual, LockError::Held { .. }), "{manual}");
        let b = Lease::new(store(dir.path()), LEASE_TTL, "tm");
        let early =
            BackupLock::acquire_for(&b, store(dir.path()), DEFAULT_TTL, "tm", Duration::ZERO)
                .await
                .err()
                .expect("held for a writer b has not taken over");
        assert!(matches!(early, LockError::Held { .. }), "{early}");
        // b takes a's writer lease over (its slot free: a is gone): a's lock goes to b at once.
        b.acquire(true).await.unwrap();
        assert_eq!(b.superseded().as_deref(), Some(a.owner()));
        let b_lock =
            BackupLock::acquire_for(&b, store(dir.path()), DEFAULT_TTL, "tm", Duration::ZERO)
                .await
                .expect("taken over at once");
        b_lock.check().unwrap();
        // a, were it alive, loses the lock at its next renewal, and its backup stops.
        let err = a_lock.lease.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
        assert!(a_lock.check().is_err());
        // The lock's records name the writer lease they serve; the writer's do not.
        let r = newest_record(dir.path(), LOCK_PREFIX).await;
        assert_eq!(r.writer.as_deref(), Some(b.owner()));
        let r = newest_record(dir.path(), LEASE_PREFIX).await;
        assert_eq!(r.writer, None);
    }

    #[tokio::test]
    async fn the_same_slot_is_no_takeover_but_an_expired_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        // A holder killed without releasing: its lease is dropped without a release record,
        // and nothing renews it any more.
        let dead = Lease::of_kind(KIND, store(dir.path()), Duration::from_millis(900), "tm");
        dead.acquire(true).await.unwrap();
        drop(dead);
        let err = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tm", Duration::ZERO)
            .await
            .err()
            .expect("a live lock of the same slot is not taken over");
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        let b = BackupLock::acquire(store(dir.path()), DEFAULT_TTL, "tm", Duration::from_secs(5))
            .await
            .expect("taken over once expired");
        b.check().unwrap();
        let keys: Vec<String> = store(dir.path())
            .list(LOCK_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert!(
            keys.contains(&crate::lease::record_key(LOCK_PREFIX, 2, 0)),
            "{keys:?}"
        );
        assert!(
            store(dir.path())
                .list(crate::lease::LEASE_PREFIX)
                .await
                .unwrap()
                .is_empty(),
            "the writer lease is untouched"
        );
    }
}
