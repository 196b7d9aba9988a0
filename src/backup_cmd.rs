//! `tidemark backup`: a base backup taken now, aligned with the change stream through a
//! temporary slot's exported snapshot, into the repository's current generation. Its manifest
//! records it as manual (retention's `manual` tier) with its `--tag`; `--pin` stores its pin
//! right after the manifest.
//!
//! One base backup runs per repository at a time: this one takes the base-backup lock
//! ([`crate::backup::lock`]) before its first object, waiting up to `lock_wait` while another
//! backup (a scheduled one of the archiver, another `tidemark backup`) holds it, then gives up
//! (exit 4, naming the holder).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::archive::{self, ArchiveError, ArchiveOptions};
use crate::backup::lock::BackupLock;
use crate::backup::{self, BackupRequest, Manifest, Origin};
use crate::catalog::{chain, identity, pin, Identity};
use crate::conninfo::ConnInfo;
use crate::replication::ReplicationClient;
use crate::source::{Source, SourceError};
use crate::store::Store;

/// What a manual backup is marked with.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LabelArgs {
    /// A name recorded in the backup's manifest (e.g. pre-deploy-v42); `list` shows it.
    #[arg(long, env = "TIDEMARK_TAG", value_parser = parse_tag)]
    pub tag: Option<String>,
    /// Pin the backup: prune keeps it until `tidemark unpin ID`.
    #[arg(long, env = "TIDEMARK_PIN")]
    pub pin: bool,
}

/// A tag: 1 to 128 characters, none of them a control character or a slash.
pub fn parse_tag(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().count() > 128 {
        return Err(format!(
            "a tag has 1 to 128 characters, {:?} has {}",
            s,
            s.chars().count()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control() || *c == '/') {
        return Err(format!(
            "a tag may not hold {c:?}: use letters, digits, '-', '_', '.'"
        ));
    }
    Ok(s.to_string())
}

/// Takes the backup; `lock_wait`: how long to wait for another base backup to finish.
pub async fn run(
    info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    label: &LabelArgs,
    lock_wait: Duration,
) -> anyhow::Result<Manifest> {
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
    // A backup writes no segment, but may create the repository: then it records the codec.
    let compression =
        identity::compression_for(&store.location(), identity.as_ref(), opts.compression)?;
    let lock =
        BackupLock::acquire(store.clone(), opts.backup_lock_ttl, &opts.slot, lock_wait).await?;
    let new_identity = identity
        .is_none()
        .then(|| Identity::new(sys.system_id, &source.database, compression));
    let r = take_locked(
        info,
        &store,
        opts,
        &lock,
        &sys,
        new_identity.as_ref(),
        label.tag.as_deref(),
    )
    .await;
    lock.release().await;
    let m = r?;
    if label.pin {
        pin::pin(&store, &m.id).await.with_context(|| {
            format!(
                "base backup {} is stored, but not pinned: pin it with `tidemark pin {}`",
                m.id, m.id
            )
        })?;
    }
    Ok(m)
}

/// The backup, under the lock: stopped if the lock is lost meanwhile. `new_identity`: the
/// repository's identity to write once the backup is stored, when this backup creates it.
async fn take_locked(
    info: &ConnInfo,
    store: &Arc<dyn Store>,
    opts: &ArchiveOptions,
    lock: &BackupLock,
    sys: &crate::replication::SystemInfo,
    new_identity: Option<&Identity>,
    tag: Option<&str>,
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
        origin: Origin::Manual,
        tag,
    };
    let lost = lock.lost();
    let m = tokio::select! {
        m = archive::take_backup_with_temporary_slot(store, base) => m?,
        _ = lost.cancelled() => {
            lock.check()?;
            return Err(ArchiveError::Internal("the base-backup lock's renewal stopped".into()));
        }
    };
    if let Some(id) = new_identity {
        identity::write_identity(store, id).await?;
    }
    Ok(m)
}
