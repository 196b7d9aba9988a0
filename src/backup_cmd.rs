//! `tidemark backup`: a base backup taken now, aligned with the change stream through a
//! temporary slot's exported snapshot, into the repository's current generation.
//!
//! One base backup runs per repository at a time: this one takes the base-backup lock
//! ([`crate::backup::lock`]) before its first object, waiting up to `lock_wait` while another
//! backup (a scheduled one of the archiver, another `tidemark backup`) holds it, then gives up
//! (exit 4, naming the holder).

use std::sync::Arc;
use std::time::Duration;

use crate::archive::{self, ArchiveError, ArchiveOptions};
use crate::backup::lock::BackupLock;
use crate::backup::{self, BackupRequest, Manifest};
use crate::catalog::{chain, identity, Identity};
use crate::conninfo::ConnInfo;
use crate::replication::ReplicationClient;
use crate::source::{Source, SourceError};
use crate::store::Store;

/// Takes the backup; `lock_wait`: how long to wait for another base backup to finish.
pub async fn run(
    info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    lock_wait: Duration,
) -> Result<Manifest, ArchiveError> {
    let source = Source::connect(info).await?;
    source.check_server().await?;
    if !source.publication_exists(&opts.publication).await? {
        return Err(SourceError::NoPublication(
            opts.publication.clone(),
            source.database.clone(),
            crate::statement::quote_ident(&opts.publication),
        )
        .into());
    }
    source.check_free_slot().await?;
    store.check_writable().await?;
    let sys = ReplicationClient::connect(info)
        .await?
        .identify_system()
        .await?;
    let identity = identity::read_identity(&store).await?;
    identity::check_identity(&store, identity.as_ref(), sys.system_id, &source.database)?;
    let lock =
        BackupLock::acquire(store.clone(), opts.backup_lock_ttl, &opts.slot, lock_wait).await?;
    let r = take_locked(info, &store, opts, &lock, &source, &sys, identity.is_none()).await;
    lock.release().await;
    r
}

/// The backup, under the lock: stopped if the lock is lost meanwhile.
async fn take_locked(
    info: &ConnInfo,
    store: &Arc<dyn Store>,
    opts: &ArchiveOptions,
    lock: &BackupLock,
    source: &Source,
    sys: &crate::replication::SystemInfo,
    first: bool,
) -> Result<Manifest, ArchiveError> {
    // Listed under the lock: a backup that finished while this one waited is seen.
    let manifests = backup::list_manifests(store).await?;
    let chains = chain::list_segments(store).await?;
    let generation = manifests
        .iter()
        .map(|m| m.generation)
        .chain(chains.keys().copied())
        .max()
        .unwrap_or(1);
    let base = BackupRequest {
        source: info,
        snapshot: "",
        consistent_point: crate::lsn::Lsn::ZERO,
        system_id: sys.system_id,
        timeline: sys.timeline,
        generation,
        publication: &opts.publication,
        parallel: opts.backup_parallel,
    };
    let lost = lock.lost();
    let m = tokio::select! {
        m = archive::take_backup_with_temporary_slot(store, base) => m?,
        _ = lost.cancelled() => {
            lock.check()?;
            return Err(ArchiveError::Internal("the base-backup lock's renewal stopped".into()));
        }
    };
    if first {
        identity::write_identity(store, &Identity::new(sys.system_id, &source.database)).await?;
    }
    Ok(m)
}
