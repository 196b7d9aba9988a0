//! The [`Store`] contract as executable checks, run against every store (compiled for the
//! crate's own tests and with the `testing` feature, never into the binary).
//!
//! Each check works under a folder of its own below the `base` it is given (so a suite can run
//! in a store that holds other objects, and a failed check names its folder), and panics with a
//! message naming the store, the check and what differed. [`run`] runs them all; each is public
//! so a test can run one alone. The checks:
//! * a put is read back byte for byte, under nested folders too;
//! * a put of identical bytes over an existing object succeeds; of different bytes (same size or
//!   not) it is [`StoreError::Conflict`] and the stored object is unchanged;
//! * a get of a missing key is [`StoreError::NotFound`];
//! * a ranged read ([`Store::get_head`]) gives the object's first bytes (all of a shorter one,
//!   none of an empty one, none for a length of 0), and NotFound for a missing key;
//! * a list returns exactly the keys starting with the prefix (a string prefix, not a folder:
//!   `a/b` matches `a/b/x` and `a/bc`), sorted, with their sizes, and nothing for a prefix that
//!   matches nothing;
//! * a delete removes the object, a second delete (or one of a key never stored) succeeds, and the
//!   key can then be stored again, with other bytes;
//! * an empty object and a large one (several MiB: past S3's multipart threshold if the store
//!   is configured so) round-trip with their sizes;
//! * a put of a key that is not a relative path (empty, absolute, with an empty, `.` or `..`
//!   part) is refused and stores nothing;
//! * `check_writable` succeeds and leaves no object behind.

use bytes::Bytes;

use super::{ObjectMeta, Store, StoreError};

/// Size of the large object: 6 MiB and a bit, so it is not a whole number of 5 MiB parts.
pub const LARGE: usize = (6 << 20) + 12345;

/// Runs every check under `base` (`""` or a folder like `"conformance/"`).
pub async fn run(store: &dyn Store, base: &str) {
    round_trip(store, &format!("{base}round-trip/")).await;
    create_only(store, &format!("{base}create-only/")).await;
    missing(store, &format!("{base}missing/")).await;
    head(store, &format!("{base}head/")).await;
    listing(store, &format!("{base}listing/")).await;
    deletion(store, &format!("{base}deletion/")).await;
    empty_object(store, &format!("{base}empty/")).await;
    large_object(store, &format!("{base}large/")).await;
    invalid_keys(store, &format!("{base}invalid/")).await;
    writable(store).await;
}

fn fail(store: &dyn Store, check: &str, what: impl std::fmt::Display) -> ! {
    panic!(
        "store conformance: {} ({store:?}): {check}: {what}",
        store.location()
    )
}

async fn put(store: &dyn Store, check: &str, key: &str, data: &[u8]) {
    if let Err(e) = store.put(key, Bytes::copy_from_slice(data)).await {
        fail(
            store,
            check,
            format!("put {key} ({} bytes) failed: {e}", data.len()),
        )
    }
}

async fn get(store: &dyn Store, check: &str, key: &str) -> Bytes {
    store
        .get(key)
        .await
        .unwrap_or_else(|e| fail(store, check, format!("get {key} failed: {e}")))
}

/// Lists `prefix`; every object must carry a plausible write time (prune relies on it), which
/// is then cleared so listings compare by key and size.
async fn list(store: &dyn Store, check: &str, prefix: &str) -> Vec<ObjectMeta> {
    let mut out = store
        .list(prefix)
        .await
        .unwrap_or_else(|e| fail(store, check, format!("list {prefix:?} failed: {e}")));
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    for o in &mut out {
        match o.modified.take() {
            Some(t) if t > now - day && t < now + day => {}
            other => fail(
                store,
                check,
                format!(
                    "list {prefix:?}: {} has no plausible write time ({other:?})",
                    o.key
                ),
            ),
        }
    }
    out
}

async fn expect_bytes(store: &dyn Store, check: &str, key: &str, want: &[u8]) {
    let got = get(store, check, key).await;
    if got != want {
        fail(
            store,
            check,
            format!(
                "get {key}: {} bytes differ from the {} bytes stored",
                got.len(),
                want.len()
            ),
        )
    }
}

fn metas(keys: &[(&str, u64)]) -> Vec<ObjectMeta> {
    keys.iter()
        .map(|(key, size)| ObjectMeta {
            key: key.to_string(),
            size: *size,
            modified: None,
        })
        .collect()
}

/// Deterministic, incompressible-looking bytes.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9E37_79B9_u32 ^ u32::from(seed);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A put is read back byte for byte, in a flat and in a deeply nested folder.
pub async fn round_trip(store: &dyn Store, base: &str) {
    const CHECK: &str = "round trip";
    for key in [format!("{base}flat.seg"), format!("{base}a/b/c/d/deep.seg")] {
        let data = pattern(1000, 1);
        put(store, CHECK, &key, &data).await;
        expect_bytes(store, CHECK, &key, &data).await;
    }
}

/// Identical re-put: Ok. Different bytes: Conflict, and the stored object is unchanged.
pub async fn create_only(store: &dyn Store, base: &str) {
    const CHECK: &str = "create-only put";
    let key = format!("{base}x.seg");
    put(store, CHECK, &key, b"original").await;
    put(store, CHECK, &key, b"original").await;
    for other in [&b"same len"[..], b"longer than the original", b""] {
        match store.put(&key, Bytes::copy_from_slice(other)).await {
            Err(StoreError::Conflict { existing, new, .. }) => {
                if (existing, new) != (8, other.len() as u64) {
                    fail(
                        store,
                        CHECK,
                        format!(
                            "Conflict says {existing} stored and {new} offered, expected 8 and {}",
                            other.len()
                        ),
                    )
                }
            }
            Err(e) => fail(
                store,
                CHECK,
                format!("a put of different bytes over {key} is not Conflict but: {e}"),
            ),
            Ok(()) => fail(
                store,
                CHECK,
                format!("a put of different bytes over {key} succeeded"),
            ),
        }
        expect_bytes(store, CHECK, &key, b"original").await;
    }
}

/// A get of a key never stored is NotFound, in an existing folder and in a missing one.
pub async fn missing(store: &dyn Store, base: &str) {
    const CHECK: &str = "missing object";
    put(store, CHECK, &format!("{base}here.seg"), b"x").await;
    for key in [
        format!("{base}absent.seg"),
        format!("{base}no/such/folder.seg"),
    ] {
        match store.get(&key).await {
            Err(StoreError::NotFound { key: k, .. }) if k == key => {}
            Err(StoreError::NotFound { key: k, .. }) => {
                fail(store, CHECK, format!("get {key}: NotFound names {k}"))
            }
            Err(e) => fail(store, CHECK, format!("get {key}: not NotFound but: {e}")),
            Ok(b) => fail(
                store,
                CHECK,
                format!("get {key}: returned {} bytes", b.len()),
            ),
        }
    }
}

/// A ranged read gives the object's first bytes, as many as asked or as it has.
pub async fn head(store: &dyn Store, base: &str) {
    const CHECK: &str = "ranged read";
    let key = format!("{base}object.seg");
    let data = pattern(1000, 3);
    put(store, CHECK, &key, &data).await;
    let empty = format!("{base}empty.seg");
    put(store, CHECK, &empty, b"").await;
    for (key, len, want) in [
        (&key, 80, &data[..80]),
        (&key, 1, &data[..1]),
        (&key, 0, &data[..0]),
        (&key, 999, &data[..999]),
        (&key, 1000, &data[..]),
        (&key, 5000, &data[..]),
        (&empty, 80, &data[..0]),
    ] {
        match store.get_head(key, len).await {
            Ok(b) if b[..] == *want => {}
            Ok(b) => fail(
                store,
                CHECK,
                format!(
                    "get_head({key}, {len}) gave {} bytes, not the first {}",
                    b.len(),
                    want.len()
                ),
            ),
            Err(e) => fail(store, CHECK, format!("get_head({key}, {len}) failed: {e}")),
        }
    }
    let absent = format!("{base}absent.seg");
    match store.get_head(&absent, 80).await {
        Err(StoreError::NotFound { key: k, .. }) if k == absent => {}
        r => fail(
            store,
            CHECK,
            format!("get_head of missing {absent} is not NotFound naming it: {r:?}"),
        ),
    }
}

/// A list returns exactly the keys starting with the prefix, sorted, with sizes.
pub async fn listing(store: &dyn Store, base: &str) {
    const CHECK: &str = "list by prefix";
    // Stored out of order, with sizes that tell the objects apart.
    let objects: [(&str, u64); 6] = [
        ("b/2.seg", 2),
        ("a/x/1.seg", 11),
        ("b/10.seg", 10),
        ("ab", 3),
        ("a/y", 4),
        ("b/1.seg", 1),
    ];
    for (key, size) in objects {
        put(
            store,
            CHECK,
            &format!("{base}{key}"),
            &pattern(size as usize, size as u8),
        )
        .await;
    }
    let cases: [(&str, &[(&str, u64)]); 6] = [
        (
            "",
            &[
                ("a/x/1.seg", 11),
                ("a/y", 4),
                ("ab", 3),
                ("b/1.seg", 1),
                ("b/10.seg", 10),
                ("b/2.seg", 2),
            ],
        ),
        ("a/", &[("a/x/1.seg", 11), ("a/y", 4)]),
        ("a", &[("a/x/1.seg", 11), ("a/y", 4), ("ab", 3)]),
        ("b/1", &[("b/1.seg", 1), ("b/10.seg", 10)]),
        ("a/x/1.seg", &[("a/x/1.seg", 11)]),
        ("c/", &[]),
    ];
    for (prefix, want) in cases {
        let prefix = format!("{base}{prefix}");
        let want: Vec<(String, u64)> = want
            .iter()
            .map(|(k, s)| (format!("{base}{k}"), *s))
            .collect();
        let got = list(store, CHECK, &prefix).await;
        let want = metas(
            &want
                .iter()
                .map(|(k, s)| (k.as_str(), *s))
                .collect::<Vec<_>>(),
        );
        if got != want {
            fail(
                store,
                CHECK,
                format!("list {prefix:?}: got {got:?}, expected {want:?}"),
            )
        }
    }
}

/// A delete removes the object; deleting again, or a key never stored, succeeds; the key can
/// then be stored again with other bytes.
pub async fn deletion(store: &dyn Store, base: &str) {
    const CHECK: &str = "delete";
    let key = format!("{base}d/x.seg");
    let keep = format!("{base}d/keep.seg");
    put(store, CHECK, &key, b"first").await;
    put(store, CHECK, &keep, b"keep").await;
    for round in ["first", "second"] {
        if let Err(e) = store.delete(&key).await {
            fail(store, CHECK, format!("{round} delete of {key} failed: {e}"))
        }
    }
    if let Err(e) = store.delete(&format!("{base}never/stored.seg")).await {
        fail(
            store,
            CHECK,
            format!("a delete of a key never stored failed: {e}"),
        )
    }
    if !matches!(store.get(&key).await, Err(StoreError::NotFound { .. })) {
        fail(
            store,
            CHECK,
            format!("{key} can still be read after its delete"),
        )
    }
    let left = list(store, CHECK, base).await;
    if left != metas(&[(&keep, 4)]) {
        fail(
            store,
            CHECK,
            format!("after the delete, list {base:?} is {left:?}"),
        )
    }
    put(store, CHECK, &key, b"second life").await;
    expect_bytes(store, CHECK, &key, b"second life").await;
}

/// An empty object round-trips, lists with size 0, re-puts, and is create-only too.
pub async fn empty_object(store: &dyn Store, base: &str) {
    const CHECK: &str = "empty object";
    let key = format!("{base}empty.seg");
    put(store, CHECK, &key, b"").await;
    put(store, CHECK, &key, b"").await;
    expect_bytes(store, CHECK, &key, b"").await;
    let listed = list(store, CHECK, base).await;
    if listed != metas(&[(&key, 0)]) {
        fail(store, CHECK, format!("list {base:?} is {listed:?}"))
    }
    if !matches!(
        store.put(&key, Bytes::from_static(b"x")).await,
        Err(StoreError::Conflict { .. })
    ) {
        fail(
            store,
            CHECK,
            format!("a put of 1 byte over the empty {key} is not Conflict"),
        )
    }
}

/// A large object ([`LARGE`] bytes) round-trips, lists with its size, re-puts, and a copy with
/// one byte changed far into it is Conflict.
pub async fn large_object(store: &dyn Store, base: &str) {
    const CHECK: &str = "large object";
    let key = format!("{base}big.copy");
    let data = pattern(LARGE, 7);
    put(store, CHECK, &key, &data).await;
    expect_bytes(store, CHECK, &key, &data).await;
    let listed = list(store, CHECK, base).await;
    if listed != metas(&[(&key, LARGE as u64)]) {
        fail(store, CHECK, format!("list {base:?} is {listed:?}"))
    }
    put(store, CHECK, &key, &data).await;
    let mut other = data.clone();
    other[LARGE - 100] ^= 1;
    match store.put(&key, Bytes::from(other)).await {
        Err(StoreError::Conflict { .. }) => {}
        r => fail(
            store,
            CHECK,
            format!("a put differing in one byte near the end is not Conflict: {r:?}"),
        ),
    }
    expect_bytes(store, CHECK, &key, &data).await;
}

/// A put of a key that is not a relative `/`-separated path is refused and stores nothing.
pub async fn invalid_keys(store: &dyn Store, base: &str) {
    const CHECK: &str = "invalid key";
    let before = list(store, CHECK, "").await;
    for key in [
        String::new(),
        format!("/{base}abs"),
        format!("{base}a//b"),
        format!("{base}./a"),
        format!("{base}../escape"),
        format!("{base}a/"),
    ] {
        if store.put(&key, Bytes::from_static(b"x")).await.is_ok() {
            fail(store, CHECK, format!("a put of {key:?} succeeded"))
        }
    }
    let after = list(store, CHECK, "").await;
    if before != after {
        fail(
            store,
            CHECK,
            format!("refused puts left objects: {before:?} before, {after:?} after"),
        )
    }
}

/// `check_writable` succeeds and leaves the listing as it was.
pub async fn writable(store: &dyn Store) {
    const CHECK: &str = "check_writable";
    let before = list(store, CHECK, "").await;
    if let Err(e) = store.check_writable().await {
        fail(store, CHECK, format!("failed: {e}"))
    }
    let after = list(store, CHECK, "").await;
    if before != after {
        fail(
            store,
            CHECK,
            format!("the probe left objects: {before:?} before, {after:?} after"),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::faulty::FaultyStore;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn a_local_folder_conforms() {
        let dir = tempfile::tempdir().unwrap();
        run(&LocalStore::new(dir.path()), "").await;
    }

    #[tokio::test]
    async fn a_local_folder_conforms_below_a_base_beside_other_objects() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("conformanceX", Bytes::from_static(b"neighbour"))
            .await
            .unwrap();
        run(&s, "conformance/").await;
    }

    #[tokio::test]
    async fn a_faulty_store_without_faults_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStore::new(Arc::new(LocalStore::new(dir.path())));
        run(&s, "").await;
    }

    #[tokio::test]
    async fn a_faulty_store_whose_live_rules_pick_no_key_of_the_suite_conforms() {
        use crate::store::faulty::{Fault, Op, Rule, Times};
        let dir = tempfile::tempdir().unwrap();
        let s = FaultyStore::new(Arc::new(LocalStore::new(dir.path())));
        for op in [Op::Put, Op::Get, Op::List, Op::Delete] {
            s.add_rule(
                Rule::new(op, Fault::Permanent, Times::Always)
                    .keys(|k| k.starts_with("elsewhere/")),
            );
            s.add_rule(Rule::new(op, Fault::AnswerLost, Times::Always).after(u32::MAX));
        }
        run(&s, "").await;
        for op in [Op::Put, Op::Get, Op::List, Op::Delete] {
            assert_eq!(s.injected(op), 0, "{op:?}");
            assert!(!s.calls(op).is_empty(), "the suite ran no {op:?}");
        }
    }

    #[derive(Debug)]
    struct Careless(LocalStore);

    /// A store that breaks the contract in a small way per method, chosen by key.
    #[async_trait::async_trait]
    impl Store for Careless {
        fn location(&self) -> String {
            self.0.location()
        }
        async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
            match self.0.put(key, data.clone()).await {
                // Overwrites instead of refusing.
                Err(StoreError::Conflict { .. }) if key.contains("overwrite") => {
                    self.0.delete(key).await?;
                    self.0.put(key, data).await
                }
                r => r,
            }
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.0.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            let mut v = self.0.list(prefix).await?;
            if prefix.contains("unsorted") {
                v.reverse();
            }
            Ok(v)
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.0.delete(key).await
        }
        async fn check_writable(&self) -> Result<(), StoreError> {
            self.0.check_writable().await
        }
    }

    #[tokio::test]
    async fn the_suite_catches_an_overwrite_and_an_unsorted_listing() {
        for (base, check) in [
            ("overwrite/", "create-only put"),
            ("unsorted/", "list by prefix"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let s = Careless(LocalStore::new(dir.path()));
            let r = tokio::spawn(async move {
                create_only(&s, base).await;
                listing(&s, base).await;
            })
            .await;
            let panic = r.expect_err("the careless store fails").into_panic();
            let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains(check), "{base}: {msg}");
        }
    }
}
