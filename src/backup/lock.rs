//! The base-backup lock: at most one base backup is taken per repository at a time.
//!
//! Owns the lock's records (`locks/base-backup/<term>-<seq>.json`) and the waiting for them.
//! The records, the decision to take, keep or refuse, the renewal and the release are the
//! writer lease's ([`crate::archive::lease`], a [`Kind`] of its own): create-only puts (so it
//! works on S3), owner, host, pid and expiry in each record, renewed every sixth of its time
//! to live while the backup runs, released when it ends. Unlike the writer lease there is no
//! same-slot takeover: a live record is always waited for, and one whose holder was killed is
//! taken over once it has expired ([`DEFAULT_TTL`] after its last renewal).
//!
//! Held by the archiver's scheduled backups (`archive/schedule.rs`, which skips and retries
//! while another holds it) and by `tidemark backup` (which waits up to `--lock-wait`, then
//! gives up with exit 4). Does not own the backup itself (`take.rs`).
//!
//! Invariant: a backup's first object is stored only while its taker holds the lock; a lock
//! lost meanwhile (not renewed in time, or taken over after expiring) cancels [`BackupLock::lost`],
//! and the taker stops the backup (its objects are then an incomplete backup, never listed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::info;

use crate::archive::lease::{Kind, Lease, LeaseError, LeaseRecord};
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
        let lease = Arc::new(Lease::of_kind(KIND, store, ttl, slot));
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
            keys.contains(&crate::archive::lease::record_key(LOCK_PREFIX, 2, 0)),
            "{keys:?}"
        );
        assert!(
            store(dir.path())
                .list(crate::archive::lease::LEASE_PREFIX)
                .await
                .unwrap()
                .is_empty(),
            "the writer lease is untouched"
        );
    }
}
