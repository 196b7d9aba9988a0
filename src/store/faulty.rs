//! A failure-injecting wrapper around another store, for tests.
//!
//! Puts of keys a predicate picks fail (permanently, or retryably every time); puts can be
//! delayed per key, so a test can order completions (a later segment stored before an earlier
//! one fails, or after). Everything else passes through to the wrapped store.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, Store, StoreError};

type KeyFn<T> = Box<dyn Fn(&str) -> T + Send + Sync>;

/// A store whose puts fail or wait as the test says.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fail_put: KeyFn<bool>,
    fail_put_retryable: KeyFn<bool>,
    delay_put: KeyFn<Duration>,
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({:?})", self.inner)
    }
}

impl FaultyStore {
    /// Wraps `inner`; no faults until configured.
    pub fn new(inner: Arc<dyn Store>) -> FaultyStore {
        FaultyStore {
            inner,
            fail_put: Box::new(|_| false),
            fail_put_retryable: Box::new(|_| false),
            delay_put: Box::new(|_| Duration::ZERO),
        }
    }

    /// Puts of keys for which `f` is true fail, permanently, after their delay.
    pub fn fail_put(mut self, f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.fail_put = Box::new(f);
        self
    }

    /// Puts of keys for which `f` is true fail with a retryable error, every time.
    pub fn fail_put_retryable(mut self, f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.fail_put_retryable = Box::new(f);
        self
    }

    /// Each put first waits `f(key)`.
    pub fn delay_put(mut self, f: impl Fn(&str) -> Duration + Send + Sync + 'static) -> Self {
        self.delay_put = Box::new(f);
        self
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        tokio::time::sleep((self.delay_put)(key)).await;
        let retryable = (self.fail_put_retryable)(key);
        if retryable || (self.fail_put)(key) {
            return Err(StoreError::Remote {
                location: self.location(),
                op: "put",
                key: key.to_string(),
                message: "injected failure".into(),
                retryable,
            });
        }
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.check_writable().await
    }
}
