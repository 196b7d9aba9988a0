//! A store wrapper that measures every repository request: its latency
//! ([`STORE_LATENCY`](super::STORE_LATENCY), by operation), its failures
//! ([`STORE_ERRORS`](super::STORE_ERRORS), by operation and kind), and the repository's health
//! ([`super::health`]: requests in flight, failing since when).
//!
//! Everything else passes through to the wrapped store unchanged, the codec and the storage
//! classes included.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use super::health::health;
use crate::store::{ObjectMeta, Residence, StorageClass, Store, StoreError, ThawTier};

/// The `operation` labels.
const OPERATIONS: [&str; 6] = [
    "put",
    "get",
    "list",
    "delete",
    "check_writable",
    "storage_class",
];
/// The `kind` labels of [`super::STORE_ERRORS`].
const KINDS: [&str; 3] = ["transient", "permanent", "conflict"];

/// Wraps `inner` so that its requests are measured.
pub fn metered(inner: Arc<dyn Store>) -> Arc<dyn Store> {
    Arc::new(Metered { inner })
}

/// Registers every (operation, kind) error counter at 0.
pub(super) fn initialise() {
    for operation in OPERATIONS {
        for kind in KINDS {
            metrics::counter!(super::STORE_ERRORS, "operation" => operation, "kind" => kind)
                .absolute(0);
        }
    }
}

/// How a failed request is counted: None for an answer that is no failure (a missing object).
fn kind(e: &StoreError) -> Option<&'static str> {
    match e {
        StoreError::NotFound { .. } => None,
        StoreError::Conflict { .. } => Some("conflict"),
        e if e.is_retryable() => Some("transient"),
        _ => Some("permanent"),
    }
}

/// Whether the error says the repository is not working (rather than answering no).
fn is_failure(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Io { .. } | StoreError::Remote { .. } | StoreError::NotWritable { .. }
    )
}

/// Ends the request's in-flight record when dropped (a cancelled request too).
struct InFlight {
    id: u64,
    answered: Option<Result<(), String>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        health().request_ended(self.id, self.answered.take(), Instant::now());
    }
}

async fn measure<T, F>(op: &'static str, f: F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let mut in_flight = InFlight {
        id: health().request_started(op, started),
        answered: None,
    };
    let r = f.await;
    metrics::histogram!(super::STORE_LATENCY, "operation" => op)
        .record(started.elapsed().as_secs_f64());
    in_flight.answered = Some(match &r {
        Ok(_) => Ok(()),
        Err(e) if is_failure(e) => Err(e.to_string()),
        Err(_) => Ok(()),
    });
    if let Err(e) = &r {
        if let Some(kind) = kind(e) {
            metrics::counter!(super::STORE_ERRORS, "operation" => op, "kind" => kind).increment(1);
        }
    }
    r
}

#[derive(Debug)]
struct Metered {
    inner: Arc<dyn Store>,
}

#[async_trait]
impl Store for Metered {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        measure("put", self.inner.put(key, data)).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        measure("get", self.inner.get(key)).await
    }
    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        measure("get", self.inner.get_head(key, len)).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        measure("list", self.inner.list(prefix)).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        measure("delete", self.inner.delete(key)).await
    }
    async fn check_writable(&self) -> Result<(), StoreError> {
        measure("check_writable", self.inner.check_writable()).await
    }
    fn has_storage_classes(&self) -> bool {
        self.inner.has_storage_classes()
    }
    async fn storage_classes(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, StorageClass>, StoreError> {
        measure("storage_class", self.inner.storage_classes(prefix)).await
    }
    async fn residence(&self, key: &str) -> Result<Residence, StoreError> {
        measure("storage_class", self.inner.residence(key)).await
    }
    async fn set_storage_class(&self, key: &str, class: &StorageClass) -> Result<(), StoreError> {
        measure("storage_class", self.inner.set_storage_class(key, class)).await
    }
    async fn thaw(&self, key: &str, tier: ThawTier, days: u32) -> Result<(), StoreError> {
        measure("storage_class", self.inner.thaw(key, tier, days)).await
    }
    fn codec(&self) -> Arc<dyn crate::object::Codec> {
        self.inner.codec()
    }
}
