//! `tidemark backup`: a base backup taken now, aligned with the change stream through a
//! temporary slot's exported snapshot, into the repository's current generation. Its manifest
//! records it as manual (retention's `manual` tier) with its `--tag`; `--pin` stores its pin
//! right after the manifest.

use std::sync::Arc;

use anyhow::Context;

use crate::archive::{self, ArchiveOptions};
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

pub async fn run(
    info: &ConnInfo,
    store: Arc<dyn Store>,
    opts: &ArchiveOptions,
    label: &LabelArgs,
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
        origin: Origin::Manual,
        tag: label.tag.as_deref(),
    };
    let m = archive::take_backup_with_temporary_slot(&store, base).await?;
    if identity.is_none() {
        let id = Identity::new(sys.system_id, &source.database, compression);
        identity::write_identity(&store, &id).await?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_printable_names() {
        assert_eq!(parse_tag("pre-deploy-v42").unwrap(), "pre-deploy-v42");
        assert!(parse_tag("").is_err());
        assert!(parse_tag(&"x".repeat(129)).is_err());
        assert!(parse_tag("a/b").unwrap_err().contains("'/'"));
        assert!(parse_tag("a\nb").is_err());
    }
}
