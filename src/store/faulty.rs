//! A failure-injecting wrapper around another store, for tests (compiled for the crate's own
//! tests and with the `testing` feature, never into the binary).
//!
//! Two ways to inject faults, usable together:
//! * by operation kind: [`FaultyStore::fail`] makes the next N (or all) puts, gets, lists or
//!   deletes fail retryably, permanently, or as a full disk (`StorageFull` inside
//!   [`StoreError::Io`]); [`FaultyStore::injected`] counts the failures injected so far;
//! * by key, for puts: [`FaultyStore::fail_put`] / [`FaultyStore::fail_put_retryable`] fail the
//!   puts of the keys a predicate picks, and [`FaultyStore::delay_put`] delays puts per key, so a
//!   test can order completions (a later segment stored before an earlier one fails, or after).
//!
//! An injected failure never reaches the wrapped store; everything else passes through.
//! `check_writable` is passed through untouched (it is the wrapped store's own put and delete).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, Store, StoreError};

type KeyFn<T> = Box<dyn Fn(&str) -> T + Send + Sync>;

/// An operation kind of the [`Store`] trait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
}

impl Op {
    const ALL: [Op; 4] = [Op::Put, Op::Get, Op::List, Op::Delete];

    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::List => "list",
            Op::Delete => "delete",
        }
    }
}

/// The failure an operation reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A remote error that retrying may fix (`is_retryable()`).
    Retryable,
    /// A remote error that retrying cannot fix.
    Permanent,
    /// `io::ErrorKind::StorageFull` inside [`StoreError::Io`] (not retryable).
    DiskFull,
}

/// How many times a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Times {
    /// The next `n` operations of the kind, then it passes.
    N(u32),
    /// Every operation of the kind.
    Always,
}

/// One configured fault and how many more times it fires (`None`: always).
struct Rule {
    op: Op,
    fault: Fault,
    remaining: Option<u32>,
}

/// A store whose operations fail or wait as the test says.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    fail_put: KeyFn<bool>,
    fail_put_retryable: KeyFn<bool>,
    delay_put: KeyFn<Duration>,
    rules: Mutex<Vec<Rule>>,
    /// Failures injected so far, by [`Op`] (in `Op::ALL` order).
    injected: [AtomicU32; 4],
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
            rules: Mutex::new(Vec::new()),
            injected: Default::default(),
        }
    }

    /// Operations of kind `op` fail with `fault`, `times` times. Rules fire in the order they
    /// were added: a rule that has run out passes the operation to the next.
    pub fn fail(self, op: Op, fault: Fault, times: Times) -> Self {
        self.add_fault(op, fault, times);
        self
    }

    /// [`FaultyStore::fail`] on a store already shared (a test that changes faults midway).
    pub fn add_fault(&self, op: Op, fault: Fault, times: Times) {
        let remaining = match times {
            Times::N(n) => Some(n),
            Times::Always => None,
        };
        self.rules.lock().unwrap().push(Rule {
            op,
            fault,
            remaining,
        });
    }

    /// Removes every fault added by [`FaultyStore::fail`] or [`FaultyStore::add_fault`].
    pub fn clear_faults(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Failures of kind `op` injected so far (by rules and by the put predicates).
    pub fn injected(&self, op: Op) -> u32 {
        self.injected[Self::index(op)].load(Ordering::SeqCst)
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

    fn index(op: Op) -> usize {
        Op::ALL.iter().position(|o| *o == op).unwrap()
    }

    /// The fault the next `op` reports, if any (consuming one of a rule's times).
    fn take_fault(&self, op: Op) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let rule = rules
            .iter_mut()
            .find(|r| r.op == op && r.remaining != Some(0))?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.fault)
    }

    fn error(&self, op: Op, key: &str, fault: Fault) -> StoreError {
        self.injected[Self::index(op)].fetch_add(1, Ordering::SeqCst);
        match fault {
            Fault::Retryable | Fault::Permanent => StoreError::Remote {
                location: self.location(),
                op: op.name(),
                key: key.to_string(),
                message: "injected failure".into(),
                retryable: fault == Fault::Retryable,
            },
            Fault::DiskFull => StoreError::Io {
                location: self.location(),
                op: op.name(),
                key: key.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "injected failure: no space left on device",
                ),
            },
        }
    }

    fn check(&self, op: Op, key: &str) -> Result<(), StoreError> {
        match self.take_fault(op) {
            Some(fault) => Err(self.error(op, key, fault)),
            None => Ok(()),
        }
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
            let fault = if retryable {
                Fault::Retryable
            } else {
                Fault::Permanent
            };
            return Err(self.error(Op::Put, key, fault));
        }
        self.check(Op::Put, key)?;
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.check(Op::Get, key)?;
        self.inner.get(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.check(Op::List, prefix)?;
        self.inner.list(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check(Op::Delete, key)?;
        self.inner.delete(key).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.check_writable().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn faulty(dir: &std::path::Path) -> FaultyStore {
        FaultyStore::new(Arc::new(LocalStore::new(dir)))
    }

    /// Runs one operation of kind `op` on `s`.
    async fn run(s: &FaultyStore, op: Op) -> Result<(), StoreError> {
        match op {
            Op::Put => s.put("a/x", Bytes::from_static(b"x")).await,
            Op::Get => s.get("a/x").await.map(drop),
            Op::List => s.list("a/").await.map(drop),
            Op::Delete => s.delete("a/x").await,
        }
    }

    #[tokio::test]
    async fn each_kind_fails_n_times_as_configured_then_passes() {
        for op in Op::ALL {
            for fault in [Fault::Retryable, Fault::Permanent, Fault::DiskFull] {
                let dir = tempfile::tempdir().unwrap();
                let inner = LocalStore::new(dir.path());
                let s = faulty(dir.path());
                inner.put("a/x", Bytes::from_static(b"x")).await.unwrap();
                s.add_fault(op, fault, Times::N(2));
                for other in Op::ALL.into_iter().filter(|o| *o != op) {
                    run(&s, other).await.unwrap_or_else(|e| {
                        panic!("{other:?} failed with a fault on {op:?} only: {e}")
                    });
                    // A delete removed the object the next get needs.
                    inner.put("a/x", Bytes::from_static(b"x")).await.unwrap();
                }
                for _ in 0..2 {
                    let e = run(&s, op).await.unwrap_err();
                    assert_eq!(e.is_retryable(), fault == Fault::Retryable, "{e}");
                    let full = matches!(&e, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull);
                    assert_eq!(full, fault == Fault::DiskFull, "{e}");
                    assert!(e.to_string().contains(op.name()), "{e}");
                }
                run(&s, op).await.unwrap();
                assert_eq!(s.injected(op), 2);
            }
        }
    }

    #[tokio::test]
    async fn an_injected_put_does_not_reach_the_wrapped_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = faulty(dir.path()).fail(Op::Put, Fault::DiskFull, Times::Always);
        for _ in 0..3 {
            assert!(s.put("a/x", Bytes::from_static(b"x")).await.is_err());
        }
        assert_eq!(s.injected(Op::Put), 3);
        assert!(LocalStore::new(dir.path())
            .list("")
            .await
            .unwrap()
            .is_empty());
        s.clear_faults();
        s.put("a/x", Bytes::from_static(b"x")).await.unwrap();
    }

    #[tokio::test]
    async fn rules_fire_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = faulty(dir.path())
            .fail(Op::Get, Fault::Retryable, Times::N(1))
            .fail(Op::Get, Fault::Permanent, Times::N(1));
        assert!(s.get("k").await.unwrap_err().is_retryable());
        let e = s.get("k").await.unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::Remote {
                    retryable: false,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(s.get("k").await, Err(StoreError::NotFound { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_helper_gets_through_retryable_faults_and_not_a_full_disk() {
        use crate::retry::{retry, Backoff, Policy, RetryError};
        let dir = tempfile::tempdir().unwrap();
        let s = faulty(dir.path()).fail(Op::Put, Fault::Retryable, Times::N(3));
        let policy = Policy::unlimited(Backoff::new(
            Duration::from_millis(10),
            Duration::from_secs(1),
        ));
        let never = tokio_util::sync::CancellationToken::new();
        let put = || s.put("a/x", Bytes::from_static(b"x"));
        retry(&policy, &never, StoreError::is_retryable, |_, _| {}, put)
            .await
            .unwrap();
        assert_eq!(s.injected(Op::Put), 3);

        s.add_fault(Op::Put, Fault::DiskFull, Times::Always);
        let put = || s.put("a/y", Bytes::from_static(b"y"));
        let r = retry(&policy, &never, StoreError::is_retryable, |_, _| {}, put).await;
        assert!(
            matches!(r, Err(RetryError::Permanent(StoreError::Io { .. }))),
            "{r:?}"
        );
        assert_eq!(s.injected(Op::Put), 4, "a full disk is not retried");
    }
}
