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

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(any(test, feature = "testing"))]
pub mod faulty;
pub mod local;
pub mod s3;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

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
}

impl crate::error::Classify for StoreError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            StoreError::InvalidUrl(_) => Usage,
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
    open(repo)
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
