//! A failure-injecting wrapper around another store, for tests (compiled for the crate's own
//! tests and with the `testing` feature, never into the binary).
//!
//! Two ways to inject faults, usable together:
//! * by rule: [`FaultyStore::add_rule`] (or its shorthands [`FaultyStore::fail`] and
//!   [`FaultyStore::add_fault`]) makes the next N (or all) puts, gets, lists or deletes fail
//!   retryably, permanently, as a full disk (`StorageFull` inside [`StoreError::Io`]), or as a
//!   lost answer (carried out, then answered with a retryable error); a [`Rule`] may pick the
//!   keys it applies to, let the first matching operations through, and wait before answering;
//! * by key, for puts: [`FaultyStore::fail_put`] / [`FaultyStore::fail_put_retryable`] fail the
//!   puts of the keys a predicate picks, and [`FaultyStore::delay_put`] delays puts per key, so a
//!   test can order completions (a later segment stored before an earlier one fails, or after).
//!
//! [`FaultyStore::injected`] counts the failures injected so far, [`FaultyStore::injected_keys`]
//! names them, and [`FaultyStore::calls`] lists every operation asked of the store.
//!
//! An injected failure never reaches the wrapped store, but a lost answer ([`Fault::AnswerLost`]):
//! its operation does. A ranged read ([`Store::get_head`]) counts as a get and is passed on as
//! the wrapped store's ranged read. Everything else passes through. `check_writable` and the
//! storage-class operations are passed through untouched (`check_writable` is the wrapped
//! store's own put and delete).

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

    fn index(self) -> usize {
        Op::ALL.iter().position(|o| *o == self).unwrap()
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
    /// The operation is carried out by the wrapped store, but its answer is lost: the caller
    /// sees a retryable error (a connection dropped after the store took a put). Should the
    /// wrapped store fail, its own error is the answer.
    AnswerLost,
}

/// How many times a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Times {
    /// The next `n` operations of the kind, then it passes.
    N(u32),
    /// Every operation of the kind.
    Always,
}

/// One fault, the operations it applies to, and how many more times it fires.
pub struct Rule {
    op: Op,
    fault: Fault,
    /// `None`: always.
    remaining: Option<u32>,
    /// Matching operations still to let through before the fault fires.
    skip: u32,
    /// Which keys (prefixes, for a list) the rule applies to; `None`: all.
    keys: Option<KeyFn<bool>>,
    /// How long an operation it fails on waits before its answer.
    delay: Duration,
}

impl Rule {
    /// Operations of kind `op` fail with `fault`, `times` times.
    pub fn new(op: Op, fault: Fault, times: Times) -> Rule {
        let remaining = match times {
            Times::N(n) => Some(n),
            Times::Always => None,
        };
        Rule {
            op,
            fault,
            remaining,
            skip: 0,
            keys: None,
            delay: Duration::ZERO,
        }
    }

    /// Only operations on the keys `f` picks (for a list: its prefix); the predicate is asked
    /// once per operation of the rule's kind while the rule is live.
    pub fn keys(mut self, f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Rule {
        self.keys = Some(Box::new(f));
        self
    }

    /// The first `n` matching operations pass (to the next rule), then the fault fires.
    pub fn after(mut self, n: u32) -> Rule {
        self.skip = n;
        self
    }

    /// An operation the fault fires on waits `d` before its answer (so a test can let other
    /// operations complete meanwhile).
    pub fn delay(mut self, d: Duration) -> Rule {
        self.delay = d;
        self
    }
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
    /// Every operation asked, and each that got an injected failure: its kind and key.
    calls: Mutex<Vec<(Op, String)>>,
    injected_keys: Mutex<Vec<(Op, String)>>,
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
            calls: Mutex::new(Vec::new()),
            injected_keys: Mutex::new(Vec::new()),
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
        self.add_rule(Rule::new(op, fault, times));
    }

    /// Adds `rule` after the rules already there (they fire in the order they were added).
    pub fn add_rule(&self, rule: Rule) {
        self.rules.lock().unwrap().push(rule);
    }

    /// Removes every rule added so far.
    pub fn clear_faults(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Failures of kind `op` injected so far (by rules and by the put predicates).
    pub fn injected(&self, op: Op) -> u32 {
        self.injected[op.index()].load(Ordering::SeqCst)
    }

    /// The keys (for a list: prefixes) of the operations of kind `op` that got an injected
    /// failure, in order.
    pub fn injected_keys(&self, op: Op) -> Vec<String> {
        Self::of(&self.injected_keys, op)
    }

    /// The keys (for a list: prefixes) of every operation of kind `op` asked so far, failed or
    /// not, in the order they came.
    pub fn calls(&self, op: Op) -> Vec<String> {
        Self::of(&self.calls, op)
    }

    fn of(log: &Mutex<Vec<(Op, String)>>, op: Op) -> Vec<String> {
        let log = log.lock().unwrap();
        log.iter()
            .filter(|(o, _)| *o == op)
            .map(|(_, k)| k.clone())
            .collect()
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

    /// The fault the next `op` on `key` reports and how long it waits first, if any
    /// (consuming one of a rule's times, or one of the operations it lets through).
    fn take_fault(&self, op: Op, key: &str) -> Option<(Fault, Duration)> {
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.op != op
                || rule.remaining == Some(0)
                || !rule.keys.as_ref().is_none_or(|f| f(key))
            {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if let Some(n) = rule.remaining.as_mut() {
                *n -= 1;
            }
            return Some((rule.fault, rule.delay));
        }
        None
    }

    fn error(&self, op: Op, key: &str, fault: Fault) -> StoreError {
        self.injected[op.index()].fetch_add(1, Ordering::SeqCst);
        self.injected_keys
            .lock()
            .unwrap()
            .push((op, key.to_string()));
        match fault {
            Fault::Retryable | Fault::Permanent => StoreError::Remote {
                location: self.location(),
                op: op.name(),
                key: key.to_string(),
                message: "injected failure".into(),
                retryable: fault == Fault::Retryable,
            },
            Fault::AnswerLost => StoreError::Remote {
                location: self.location(),
                op: op.name(),
                key: key.to_string(),
                message: "injected failure: the answer was lost after the store carried it out"
                    .into(),
                retryable: true,
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

    /// Runs `op` on `key`: notes the call, then answers the fault a rule picks (after its
    /// delay; a lost answer after `inner` ran), or `inner`'s own answer.
    async fn run<T>(
        &self,
        op: Op,
        key: &str,
        inner: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.calls.lock().unwrap().push((op, key.to_string()));
        let Some((fault, delay)) = self.take_fault(op, key) else {
            return inner.await;
        };
        tokio::time::sleep(delay).await;
        if fault == Fault::AnswerLost {
            inner.await?;
        }
        Err(self.error(op, key, fault))
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
            self.calls.lock().unwrap().push((Op::Put, key.to_string()));
            let fault = if retryable {
                Fault::Retryable
            } else {
                Fault::Permanent
            };
            return Err(self.error(Op::Put, key, fault));
        }
        self.run(Op::Put, key, self.inner.put(key, data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run(Op::Get, key, self.inner.get(key)).await
    }

    /// A ranged read is a get: the rules of [`Op::Get`] apply to it.
    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        self.run(Op::Get, key, self.inner.get_head(key, len)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.run(Op::List, prefix, self.inner.list(prefix)).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run(Op::Delete, key, self.inner.delete(key)).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.check_writable().await
    }

    fn has_storage_classes(&self) -> bool {
        self.inner.has_storage_classes()
    }

    async fn storage_classes(
        &self,
        prefix: &str,
    ) -> Result<std::collections::BTreeMap<String, super::StorageClass>, StoreError> {
        self.inner.storage_classes(prefix).await
    }

    async fn residence(&self, key: &str) -> Result<super::Residence, StoreError> {
        self.inner.residence(key).await
    }

    async fn set_storage_class(
        &self,
        key: &str,
        class: &super::StorageClass,
    ) -> Result<(), StoreError> {
        self.inner.set_storage_class(key, class).await
    }

    async fn thaw(&self, key: &str, tier: super::ThawTier, days: u32) -> Result<(), StoreError> {
        self.inner.thaw(key, tier, days).await
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

    #[tokio::test]
    async fn a_lost_answer_is_carried_out_and_answered_with_a_retryable_error() {
        let dir = tempfile::tempdir().unwrap();
        let inner = LocalStore::new(dir.path());
        let s = faulty(dir.path());
        for op in Op::ALL {
            s.add_fault(op, Fault::AnswerLost, Times::N(1));
        }
        // The put is stored; a retry of the same bytes is an identical put, so it succeeds.
        let e = s.put("a/x", Bytes::from_static(b"x")).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("answer was lost"), "{e}");
        assert_eq!(inner.get("a/x").await.unwrap(), Bytes::from_static(b"x"));
        s.put("a/x", Bytes::from_static(b"x")).await.unwrap();
        // A get and a list ran (nothing to see but the error), a delete deleted.
        assert!(s.get("a/x").await.unwrap_err().is_retryable());
        assert!(s.list("a/").await.unwrap_err().is_retryable());
        assert!(s.delete("a/x").await.unwrap_err().is_retryable());
        assert!(matches!(
            inner.get("a/x").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(Op::ALL.map(|op| s.injected(op)), [1; 4]);

        // The wrapped store's own failure is the answer: a conflicting put stays a conflict.
        inner.put("a/y", Bytes::from_static(b"y")).await.unwrap();
        s.add_fault(Op::Put, Fault::AnswerLost, Times::N(1));
        let e = s
            .put("a/y", Bytes::from_static(b"other"))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict { .. }), "{e}");
        assert_eq!(s.injected(Op::Put), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rule_fails_only_the_keys_it_picks_after_letting_some_through_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(faulty(dir.path()));
        // The second put under seg/ fails, permanently, after a second.
        s.add_rule(
            Rule::new(Op::Put, Fault::Permanent, Times::N(1))
                .keys(|k| k.starts_with("seg/"))
                .after(1)
                .delay(Duration::from_secs(1)),
        );
        let put = |k: &'static str| {
            let s = s.clone();
            tokio::spawn(async move { s.put(k, Bytes::from_static(b"x")).await })
        };
        put("other/1").await.unwrap().unwrap();
        put("seg/1").await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        let failing = put("seg/2");
        while s.calls(Op::Put).len() < 3 {
            tokio::task::yield_now().await;
        }
        // Meanwhile, later puts go through: the rule has fired its one time.
        put("seg/3").await.unwrap().unwrap();
        put("other/2").await.unwrap().unwrap();
        assert!(!failing.is_finished(), "the failing put waits its delay");
        let e = failing.await.unwrap().unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(s.injected_keys(Op::Put), ["seg/2"]);
        assert_eq!(
            s.calls(Op::Put),
            ["other/1", "seg/1", "seg/2", "seg/3", "other/2"]
        );
        let stored: Vec<String> = LocalStore::new(dir.path())
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(stored, ["other/1", "other/2", "seg/1", "seg/3"]);
        assert!(s.calls(Op::Get).is_empty());
    }

    #[tokio::test]
    async fn a_rule_letting_operations_through_passes_them_to_the_next_rule() {
        let dir = tempfile::tempdir().unwrap();
        let s = faulty(dir.path()).fail(Op::Get, Fault::Retryable, Times::N(1));
        s.add_rule(Rule::new(Op::Get, Fault::Permanent, Times::Always).after(1));
        s.add_rule(Rule::new(Op::Get, Fault::Permanent, Times::Always).keys(|k| k == "never"));
        // 1: the first rule; 2: the second lets it through, nothing else fails it; then the
        // second rule fires, always.
        assert!(s.get("k").await.unwrap_err().is_retryable());
        assert!(matches!(s.get("k").await, Err(StoreError::NotFound { .. })));
        for _ in 0..2 {
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
        }
        assert_eq!(s.injected(Op::Get), 3);
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
