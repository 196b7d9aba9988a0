//! Pins: `pins/<id>.json` exists while base backup `<id>` is pinned (`backup --pin`,
//! `tidemark pin`), and `tidemark unpin` deletes it. Retention never drops a pinned backup.
//!
//! A pin is an object of its own, not a field of the manifest, so that manifests stay
//! create-only: pinning and unpinning never rewrite a backup. Its content (who pinned, when) is
//! for people; only its presence counts (`proto/layout.md`, "Pins").
//!
//! Owns: the pin objects, their listing and their writing. Does not own what retention does
//! with them.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::keys;
use crate::lsn::PgTimestamp;
use crate::store::{ObjectMeta, Store, StoreError};

/// Why a pin could not be set or removed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("repository {location} has no base backup {id:?}\nHINT: `tidemark list --repo …` shows the backups and their ids")]
    NoBackup { location: String, id: String },
    #[error("base backup {id} of {location} is not pinned (no {key})\nHINT: `tidemark list --repo …` shows which backups are pinned")]
    NotPinned {
        location: String,
        id: String,
        key: String,
    },
}

impl crate::error::Classify for PinError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            PinError::Store(e) => e.exit_status(),
            PinError::NoBackup { .. } | PinError::NotPinned { .. } => Usage,
        }
    }
}

/// What a pin object holds (for people: only its presence counts).
#[derive(Serialize)]
struct PinRecord<'a> {
    format_version: u32,
    backup: &'a str,
    pinned_at: PgTimestamp,
    host: String,
}

/// The pinned backups of a listing (any listing that holds `pins/…`). Pure.
pub fn pinned_in(objects: &[ObjectMeta]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(|o| keys::parse_pin(&o.key))
        .collect()
}

/// The pinned backups of the store.
pub async fn read_pins(store: &Arc<dyn Store>) -> Result<BTreeSet<String>, StoreError> {
    Ok(pinned_in(&store.list(keys::PINS).await?))
}

/// Pins backup `id` (which must have a manifest); pinning a pinned backup changes nothing.
pub async fn pin(store: &Arc<dyn Store>, id: &str) -> Result<(), PinError> {
    let folder = store.list(&keys::backup_folder(id)).await?;
    if !folder.iter().any(|o| {
        keys::split_backup_key(&o.key)
            .and_then(|(_, f)| keys::manifest_revision(f))
            .is_some()
    }) {
        return Err(PinError::NoBackup {
            location: store.location(),
            id: id.to_string(),
        });
    }
    if read_pins(store).await?.contains(id) {
        return Ok(());
    }
    let record = PinRecord {
        format_version: 1,
        backup: id,
        pinned_at: PgTimestamp::now(),
        host: crate::host::hostname(),
    };
    let body = serde_json::to_vec_pretty(&record).expect("a pin serializes");
    crate::object::put_object(&**store, &keys::pin(id), Bytes::from(body)).await?;
    Ok(())
}

/// Unpins backup `id`: deletes its pin. Refused when it is not pinned.
pub async fn unpin(store: &Arc<dyn Store>, id: &str) -> Result<(), PinError> {
    let key = keys::pin(id);
    if !read_pins(store).await?.contains(id) {
        return Err(PinError::NotPinned {
            location: store.location(),
            id: id.to_string(),
            key,
        });
    }
    store.delete(&key).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::manifest;
    use crate::error::Classify;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn a_pin_is_an_object_that_unpin_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let id = manifest::backup_id(1, crate::lsn::Lsn(0x100));
        let err = pin(&store, &id).await.unwrap_err();
        assert!(matches!(err, PinError::NoBackup { .. }), "{err}");
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
        store
            .put(&manifest::manifest_key(&id), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        pin(&store, &id).await.unwrap();
        pin(&store, &id).await.unwrap();
        assert_eq!(
            read_pins(&store).await.unwrap(),
            BTreeSet::from([id.clone()])
        );
        unpin(&store, &id).await.unwrap();
        assert!(read_pins(&store).await.unwrap().is_empty());
        let err = unpin(&store, &id).await.unwrap_err();
        assert!(matches!(err, PinError::NotPinned { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("pins/{id}.json")),
            "{err}"
        );
    }
}
