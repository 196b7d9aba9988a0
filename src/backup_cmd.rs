//! `tidemark backup`: a base backup taken now, aligned with the change stream through a
//! temporary slot's exported snapshot, into the repository's current generation.

use std::sync::Arc;

use crate::archive::{self, ArchiveError, ArchiveOptions};
use crate::backup::{self, BackupRequest, Manifest};
use crate::catalog::{chain, identity, Identity};
use crate::conninfo::ConnInfo;
use crate::replication::ReplicationClient;
use crate::source::{Source, SourceError};
use crate::store::Store;

pub async fn run(
    info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
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
    // A backup writes no segment, but may create the repository: then it records the codec.
    let compression =
        identity::compression_for(&store.location(), identity.as_ref(), opts.compression)?;
    let manifests = backup::list_manifests(&store).await?;
    let chains = chain::list_segments(&store).await?;
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
    let m = archive::take_backup_with_temporary_slot(&store, base).await?;
    if identity.is_none() {
        let id = Identity::new(sys.system_id, &source.database, compression);
        identity::write_identity(&store, &id).await?;
    }
    Ok(m)
}
