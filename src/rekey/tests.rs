use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::crypt::Sealed;
use crate::lsn::Lsn;
use crate::object::{get_object, put_object, with_codec, ObjectError};
use crate::store::LocalStore;

fn meta(key: &str) -> ObjectMeta {
    ObjectMeta {
        key: key.to_string(),
        size: 1,
        modified: None,
    }
}

#[test]
fn pending_skips_objects_with_a_sidecar_of_the_current_key_and_non_envelopes() {
    let a = keys::segment(1, Lsn(0x10), Lsn(0x20));
    let b = keys::segment(1, Lsn(0x20), Lsn(0x30));
    let listing = vec![
        meta("archive.json"),
        meta("locks/writer/0000000001-0000000001.json"),
        meta(&keys::rekeyed("1111111111111111", &a)),
        meta(&keys::rekeyed("2222222222222222", &b)),
        meta(&a),
        meta(&b),
    ];
    let keys_of = |v: Vec<&ObjectMeta>| v.into_iter().map(|o| o.key.clone()).collect::<Vec<_>>();
    assert_eq!(
        keys_of(pending(&listing, "1111111111111111")),
        vec![b.clone()]
    );
    assert_eq!(
        keys_of(pending(&listing, "2222222222222222")),
        vec![a.clone()]
    );
    assert_eq!(
        keys_of(pending(&listing, "3333333333333333")),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(sidecars(&listing)[&a].len(), 1);
}

/// A folder repository whose objects are sealed with the keyring at `path`.
fn sealed(dir: &std::path::Path, path: &std::path::Path) -> (Arc<dyn Store>, Arc<dyn Store>) {
    let plain: Arc<dyn Store> = Arc::new(LocalStore::new(dir));
    let codec = Arc::new(Sealed::open(path).unwrap());
    (plain.clone(), with_codec(plain, codec))
}

#[tokio::test]
async fn rekey_writes_headers_only_resumes_and_lets_the_old_key_go() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let old = keyring.current().id;
    let dir = tempfile::tempdir().unwrap();
    let (plain, store) = sealed(dir.path(), &path);
    let names: Vec<String> = (0..5u64)
        .map(|i| keys::segment(1, Lsn(i * 16), Lsn(i * 16 + 16)))
        .collect();
    let body = |i: usize| Bytes::from(vec![i as u8; 200_000]);
    for (i, n) in names.iter().enumerate().take(3) {
        put_object(&*store, n, body(i)).await.unwrap();
    }
    keyring.add();
    keyring.replace(&path).unwrap();
    // Written after the rotation: already under the new key, no sidecar needed.
    for (i, n) in names.iter().enumerate().skip(3) {
        put_object(&*store, n, body(i)).await.unwrap();
    }

    // An interrupted run: one sidecar stored, by hand here.
    let first = store.get_head(&names[0], HEADER_LEN).await.unwrap();
    let k_old = keyring.get(&old).unwrap();
    let cur = keyring.current();
    let side = envelope::rewrap(&k_old.secret, &cur.secret, cur.id, &names[0], &first).unwrap();
    plain
        .put(
            &keys::rekeyed(&cur.id.to_string(), &names[0]),
            Bytes::copy_from_slice(&side),
        )
        .await
        .unwrap();

    let s = rekey(&plain, &keyring).await.unwrap();
    assert_eq!((s.objects, s.rewrapped, s.already), (5, 2, 3), "{s:?}");
    assert_eq!(s.bytes_written, 2 * HEADER_LEN as u64);
    assert!(s.bytes_written * 100 < s.bytes_stored, "{s:?}");
    // A rerun finds nothing to write.
    let again = rekey(&plain, &keyring).await.unwrap();
    assert_eq!((again.rewrapped, again.already), (0, 5), "{again:?}");

    // Before retiring, nothing needs the old key alone; then it goes and all still opens.
    assert!(needing_only(&plain, &old, &[cur.id])
        .await
        .unwrap()
        .is_empty());
    keyring.remove(&old).unwrap();
    keyring.replace(&path).unwrap();
    let (_, store) = sealed(dir.path(), &path);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(get_object(&*store, n).await.unwrap(), body(i), "{n}");
    }
}

#[tokio::test]
async fn without_rekey_the_old_key_is_needed_and_its_absence_names_key_and_object() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let old = keyring.current().id;
    let dir = tempfile::tempdir().unwrap();
    let (plain, store) = sealed(dir.path(), &path);
    let name = keys::segment(1, Lsn(0), Lsn(16));
    put_object(&*store, &name, Bytes::from_static(b"rows"))
        .await
        .unwrap();
    let new = keyring.add();
    assert_eq!(
        needing_only(&plain, &old, &[new]).await.unwrap(),
        vec![name.clone()]
    );
    keyring.remove(&old).unwrap();
    keyring.replace(&path).unwrap();
    let (_, store) = sealed(dir.path(), &path);
    let err = get_object(&*store, &name).await.unwrap_err();
    assert!(matches!(err, ObjectError::Crypt(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&old.to_string()) && msg.contains(&name),
        "{msg}"
    );
    use crate::error::Classify;
    assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
    let err = rekey(&plain, &keyring).await.unwrap_err();
    let RekeyError::Incomplete { failed: 1, first } = &err.error else {
        panic!("{err:?}")
    };
    assert!(matches!(**first, RekeyError::KeyMissing { .. }), "{err}");
    assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
    assert_eq!(err.summary.failed_objects, vec![name.clone()]);
}

#[tokio::test]
async fn an_object_rekey_cannot_move_is_counted_and_named_and_the_others_are_moved() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (plain, store) = sealed(dir.path(), &path);
    let names: Vec<String> = (0..4u64)
        .map(|i| keys::segment(1, Lsn(i * 16), Lsn(i * 16 + 16)))
        .collect();
    for n in &names {
        put_object(&*store, n, Bytes::from_static(b"rows"))
            .await
            .unwrap();
    }
    // The second object's wrapped data key is damaged: its header no longer opens.
    let file = dir.path().join(&names[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    keyring.add();
    keyring.replace(&path).unwrap();

    let err = rekey(&plain, &keyring).await.unwrap_err();
    use crate::error::Classify;
    assert_eq!(err.exit_status(), crate::error::ExitStatus::Damaged);
    let msg = err.to_string();
    assert!(
        msg.contains("1 object(s) could not be rekeyed") && msg.contains(&names[1]),
        "{msg}"
    );
    let s = &err.summary;
    assert_eq!(
        (s.objects, s.rewrapped, s.already, s.failed),
        (4, 3, 0, 1),
        "{s:?}"
    );
    assert_eq!(s.failed_objects, vec![names[1].clone()]);
    // Every other object has its sidecar; a rerun tries only the damaged one again.
    let cur = keyring.current().id.to_string();
    for n in names.iter().filter(|n| **n != names[1]) {
        assert!(plain.get(&keys::rekeyed(&cur, n)).await.is_ok(), "{n}");
    }
    let again = rekey(&plain, &keyring).await.unwrap_err();
    assert_eq!(
        (
            again.summary.rewrapped,
            again.summary.already,
            again.summary.failed
        ),
        (0, 3, 1),
        "{:?}",
        again.summary
    );
}

#[tokio::test]
async fn prune_deletes_the_sidecars_of_objects_gone_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    let live = keys::segment(1, Lsn(0), Lsn(16));
    let gone = keys::segment(1, Lsn(16), Lsn(32));
    store.put(&live, Bytes::from_static(b"x")).await.unwrap();
    for o in [&live, &gone] {
        store
            .put(
                &keys::rekeyed("0123456789abcdef", o),
                Bytes::from_static(b"h"),
            )
            .await
            .unwrap();
    }
    crate::catalog::expire::delete_orphan_sidecars(&store)
        .await
        .unwrap();
    let left: Vec<String> = store
        .list(keys::REKEYED)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, vec![keys::rekeyed("0123456789abcdef", &live)]);
}

/// The bench row of `bench/README.md` (rekey's bytes written against bytes stored):
/// `cargo test --lib rekey::tests::bench_rekey_bytes_written -- --ignored --nocapture`, with
/// `TIDEMARK_BENCH_SEGMENTS` (default 2000) segments of `TIDEMARK_BENCH_SEGMENT_BYTES` (default
/// 1 MiB) sealed under one key, then rekeyed to a second.
#[tokio::test]
#[ignore = "a bench: writes segments × bytes to a temporary folder"]
async fn bench_rekey_bytes_written() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let count = env("TIDEMARK_BENCH_SEGMENTS", 2000);
    let size = env("TIDEMARK_BENCH_SEGMENT_BYTES", 1 << 20);
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (plain, store) = sealed(dir.path(), &path);
    let body = Bytes::from(vec![0x5a; size]);
    for i in 0..count as u64 {
        let key = keys::segment(1, Lsn(i << 32), Lsn((i + 1) << 32));
        put_object(&*store, &key, body.clone()).await.unwrap();
    }
    keyring.add();
    keyring.replace(&path).unwrap();
    let started = std::time::Instant::now();
    let s = rekey(&plain, &keyring).await.unwrap();
    let ratio = s.bytes_written as f64 / s.bytes_stored as f64;
    println!(
        "rekey of {count} segments of {size} bytes: {} headers, {} bytes written of {} stored = {:.5} % ({:.2?}); per segment {} bytes, so for 100,000 segments of 8 MiB {:.5} %",
        s.rewrapped,
        s.bytes_written,
        s.bytes_stored,
        100.0 * ratio,
        started.elapsed(),
        s.bytes_written / s.rewrapped,
        100.0 * (s.bytes_written / s.rewrapped) as f64
            / (envelope::HEADER_LEN as f64 + (8 << 20) as f64 + 16.0 * 128.0)
    );
    assert_eq!(s.rewrapped, count as u64);
    assert!(ratio < 0.01, "{s:?}");
}

/// A store where, at rekey's first sidecar, a writer with the old keyring stores one more
/// object (as an archiver that sealed a segment just before `keys add` reached it).
#[derive(Debug)]
struct LateWriter {
    inner: Arc<dyn Store>,
    late: std::sync::Mutex<Option<(String, Bytes)>>,
}

#[async_trait::async_trait]
impl Store for LateWriter {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let late = self.late.lock().unwrap().take();
        if let Some((k, b)) = late.filter(|_| key.starts_with(keys::REKEYED)) {
            self.inner.put(&k, b).await?;
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

#[tokio::test]
async fn an_object_of_the_old_key_written_during_a_rekey_is_rekeyed_by_its_next_pass() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let old = keyring.current().clone();
    let dir = tempfile::tempdir().unwrap();
    let (plain, store) = sealed(dir.path(), &path);
    let first = keys::segment(1, Lsn(0), Lsn(16));
    put_object(&*store, &first, Bytes::from_static(b"one"))
        .await
        .unwrap();
    let late_key = keys::segment(1, Lsn(16), Lsn(32));
    let late = envelope::seal(&old.secret, old.id, &late_key, b"two");
    keyring.add();
    let racing: Arc<dyn Store> = Arc::new(LateWriter {
        inner: plain.clone(),
        late: std::sync::Mutex::new(Some((late_key.clone(), Bytes::from(late)))),
    });
    let s = rekey(&racing, &keyring).await.unwrap();
    assert_eq!((s.rewrapped, s.passes), (2, 3), "{s:?}");
    assert!(needing_only(&plain, &old.id, &[keyring.current().id])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn an_object_of_the_key_stored_while_retire_waits_puts_the_key_back() {
    let keys_dir = tempfile::tempdir().unwrap();
    let path = keys_dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let old = keyring.current().clone();
    keyring.add();
    keyring.replace(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    let id = old.id.to_string();
    // Nothing needs the old key yet; a writer that sealed with it stores while retire waits.
    let late = keys::segment(1, Lsn(0), Lsn(16));
    let sealed = Bytes::from(envelope::seal(&old.secret, old.id, &late, b"rows"));
    let writer = {
        let (store, late) = (plain.clone(), late.clone());
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            store.put(&late, sealed).await.unwrap();
        })
    };
    let settle = std::time::Duration::from_millis(500);
    let err = retire(&path, &id, Some(&plain), settle).await.unwrap_err();
    writer.await.unwrap();
    let e = err.downcast_ref::<RekeyError>().expect("a rekey error");
    assert!(
        matches!(e, RekeyError::StoredMeanwhile { count: 1, example, .. } if *example == late),
        "{e}"
    );
    // Back in the keyring, in its place, and the object opens.
    let back = Keyring::load(&path).unwrap();
    assert_eq!(back.keys()[0].id, old.id);
    assert_eq!(back.keys().len(), 2);
    // Once rekeyed, it retires.
    rekey(&plain, &back).await.unwrap();
    let left = retire(&path, &id, Some(&plain), settle).await.unwrap();
    assert!(left.get(&old.id).is_none());
}
