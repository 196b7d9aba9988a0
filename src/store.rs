//! Where archive objects live: one small interface, one implementation per kind of storage.
//!
//! Owns: the [`Store`] trait (put, get, list, delete of immutable objects by key) and the
//! choice of implementation from a repository URL (`/path`, `file:///path`, `s3://bucket/prefix`).
//!
//! Invariant protected here: **objects are immutable and writes are create-only.** A put of bytes
//! identical to an existing object is a no-op (so a re-upload after a crash is idempotent); a put
//! of different bytes under an existing key is [`StoreError::Conflict`], never an overwrite — it
//! means two writers or a split brain. A put that returns `Ok` is durable.
//!
//! Keys are `/`-separated relative paths (`segments/00000001/…seg`); stores map them to their
//! own namespace.

pub mod class;
#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod local;
pub mod s3;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub use class::{Residence, StorageClass, Thaw, ThawTier};
pub use local::LocalStore;
pub use s3::{S3Options, S3Store, Sse};

/// A stored object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was written, if the store says (a folder: the file's mtime; S3:
    /// `LastModified`).
    pub modified: Option<std::time::SystemTime>,
}

/// Errors of a store operation. Each names the store location and the key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{location}: object {key} not found")]
    NotFound { location: String, key: String },
    #[error("{location}: object {key} already exists with different content ({existing} bytes stored, {new} bytes offered); refusing to overwrite an archived object: is another archiver writing to this repository?")]
    Conflict {
        location: String,
        key: String,
        existing: u64,
        new: u64,
    },
    #[error("{location}: {op} {key}: {source}")]
    Io {
        location: String,
        op: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {op} {key}: {message}")]
    Remote {
        location: String,
        op: &'static str,
        key: String,
        message: String,
        retryable: bool,
    },
    #[error("repository {location} is not writable: {source}\nHINT: --repo must name a folder that tidemark can create and write (check the path, its owner and permissions, and free space)")]
    NotWritable {
        location: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid repository {0}")]
    InvalidUrl(String),
    #[error("{location}: {what} needs an S3 repository: a folder has no storage classes\nHINT: drop the storage-class flags (and TIDEMARK_S3_STORAGE_CLASS, TIDEMARK_ARCHIVE_STORAGE_CLASS) for a folder repository")]
    NoStorageClasses { location: String, what: String },
}

impl crate::error::Classify for StoreError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            StoreError::InvalidUrl(_) | StoreError::NoStorageClasses { .. } => Usage,
            StoreError::NotFound { .. }
            | StoreError::Conflict { .. }
            | StoreError::Io { .. }
            | StoreError::Remote { .. }
            | StoreError::NotWritable { .. } => Repository,
        }
    }
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            StoreError::Remote { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

/// The archive's storage.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Human-readable location (`/var/lib/tidemark`, `s3://bucket/prefix`), for messages.
    fn location(&self) -> String;

    /// Stores `data` under `key`, durably, create-only (see the module doc).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;

    /// Reads a whole object. `NotFound` if absent.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Reads the first `len` bytes of an object (all of it when shorter). `NotFound` if
    /// absent. For reading envelope headers (rekey) without the bodies; a store that cannot
    /// read a range reads the whole object.
    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        let mut b = self.get(key).await?;
        b.truncate(len);
        Ok(b)
    }

    /// Lists objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Deletes an object; deleting an absent object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Checks that the store can be written (creates and deletes a probe object).
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// Whether objects have storage classes (S3). A folder has none: the methods below then
    /// say every object is readable, and refuse to change a class or thaw.
    fn has_storage_classes(&self) -> bool {
        false
    }

    /// The storage class of every object whose key starts with `prefix` (one listing; what
    /// the listing does not say is `STANDARD`). A store without classes: none.
    async fn storage_classes(
        &self,
        _prefix: &str,
    ) -> Result<BTreeMap<String, StorageClass>, StoreError> {
        Ok(BTreeMap::new())
    }

    /// Where one object lives and whether it can be read now. `NotFound` if absent.
    async fn residence(&self, _key: &str) -> Result<Residence, StoreError> {
        Ok(Residence::standard())
    }

    /// Moves an existing object to `class` in place: same key, same bytes, same server-side
    /// encryption.
    async fn set_storage_class(&self, key: &str, class: &StorageClass) -> Result<(), StoreError> {
        Err(StoreError::NoStorageClasses {
            location: self.location(),
            what: format!("moving {key} to {class}"),
        })
    }

    /// Asks for a readable copy of a cold object, kept `days` days; an object already being
    /// thawed is not an error. Returns at once: [`Store::residence`] says when it is done.
    async fn thaw(&self, key: &str, _tier: ThawTier, _days: u32) -> Result<(), StoreError> {
        Err(StoreError::NoStorageClasses {
            location: self.location(),
            what: format!("thawing {key}"),
        })
    }

    /// The codec the repository's objects are stored with ([`crate::object`] applies it):
    /// [`crate::object::Plain`] unless the store was opened with a keyring
    /// ([`crate::object::with_codec`]).
    fn codec(&self) -> Arc<dyn crate::object::Codec> {
        Arc::new(crate::object::Plain)
    }
}

/// Opens the store a repository URL names: a folder path, a `file://` URL or an
/// `s3://BUCKET[/PREFIX]` URL (reached as `s3` says). Makes no request.
pub async fn open_with(repo: &str, s3: &S3Options) -> Result<Arc<dyn Store>, StoreError> {
    if repo.starts_with("s3://") {
        return Ok(Arc::new(S3Store::connect(repo, s3).await?));
    }
    let store = open(repo)?;
    if let Some(class) = &s3.storage_class {
        return Err(StoreError::NoStorageClasses {
            location: store.location(),
            what: format!("--s3-storage-class {class}"),
        });
    }
    Ok(store)
}

/// Opens a local repository: a folder path or `file://` URL (`s3://` needs [`open_with`]).
pub fn open(repo: &str) -> Result<Arc<dyn Store>, StoreError> {
    if repo.starts_with("s3://") {
        return Err(StoreError::InvalidUrl(format!(
            "{repo:?}: an s3:// repository is opened with store::open_with"
        )));
    }
    if let Some(path) = repo.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(StoreError::InvalidUrl(format!(
                "{repo:?}: a file:// URL needs an absolute path (file:///var/lib/tidemark)"
            )));
        }
        return Ok(Arc::new(LocalStore::new(path)));
    }
    if repo.contains("://") {
        return Err(StoreError::InvalidUrl(format!(
            "{repo:?}: unsupported scheme; use a folder path, a file:// URL or s3://BUCKET/PREFIX"
        )));
    }
    if repo.is_empty() {
        return Err(StoreError::InvalidUrl("an empty path".into()));
    }
    Ok(Arc::new(LocalStore::new(repo)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_folder_refuses_storage_classes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let opts = S3Options {
            storage_class: Some(StorageClass::StandardIa),
            ..S3Options::default()
        };
        let e = open_with(path, &opts).await.unwrap_err();
        assert!(matches!(e, StoreError::NoStorageClasses { .. }), "{e}");
        assert!(
            e.to_string().contains("--s3-storage-class STANDARD_IA"),
            "{e}"
        );
        assert_eq!(
            crate::error::Classify::exit_status(&e),
            crate::error::ExitStatus::Usage
        );
        let store = open_with(path, &S3Options::default()).await.unwrap();
        assert!(!store.has_storage_classes());
        assert_eq!(store.residence("k").await.unwrap(), Residence::standard());
        let e = store
            .set_storage_class("k", &StorageClass::Glacier)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::NoStorageClasses { .. }), "{e}");
    }
}
