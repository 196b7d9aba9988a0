//! The object layer: every object of the archive is written and read through here, between
//! the formats (segments, manifests, parts, the identity) and the [`Store`].
//!
//! Owns the [`Codec`] applied to an object's bytes on their way to the store and back:
//! [`Plain`], the identity, or [`crate::crypt::Sealed`], the encryption envelope. A store
//! carries its repository's codec ([`Store::codec`], set by [`with_codec`] where a command opens
//! the repository), so every reader and writer below takes it from the store it is given. And
//! [`ObjectError`], what reading an object fails with: the store's error, stored bytes the codec
//! cannot decode ([`ObjectError::Undecodable`], a damaged object: exit 5), or an envelope whose
//! key the keyring lacks ([`ObjectError::Crypt`]). Does not own keys
//! ([`crate::catalog::keys`]), the formats, or retrying ([`Store::put`] retries what its kind of
//! storage can retry; the archiver's uploader retries on its own schedule above that).
//!
//! Invariant protected here: **an object is encoded once, and every attempt to store it puts
//! the same encoded bytes.** Writes are create-only and a retry succeeds only when its bytes are
//! identical to what an earlier attempt stored (see [`crate::store`]). An envelope draws a
//! fresh random nonce each time it encrypts: were it applied inside a retry loop, a first
//! attempt that was stored but whose answer was lost (a dropped connection, a timeout) would
//! make the retry offer different bytes under the same key, which the store refuses as a
//! conflict — and a conflict stops the archiver as if two of them were writing. So encoding
//! happens above every retry: [`encode`] makes an [`Encoded`] object, and whoever retries
//! ([`Encoded::put`] called again, or the store's own retries inside one put) re-sends those
//! bytes. (A deterministic, SIV-style envelope would also be safe; encoding once keeps any
//! codec safe.)

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::store::{ObjectMeta, Residence, StorageClass, Store, StoreError, ThawTier};

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The store could not give the object (missing, unreachable, …).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored bytes do not decode with the repository's codec: the object is damaged (or
    /// was written with a codec this repository does not use).
    #[error("object {key} is damaged: its stored bytes do not decode ({codec}): {detail}\nHINT: the object cannot be used; `tidemark list` shows what the archive can still restore")]
    Undecodable {
        key: String,
        /// The codec that could not decode it.
        codec: &'static str,
        detail: String,
    },
    /// The envelope is sound as far as it was read, but this keyring cannot open it: its key
    /// is not in the keyring (named with the object), or it is a newer envelope version.
    #[error(transparent)]
    Crypt(#[from] crate::crypt::CryptError),
}

impl crate::error::Classify for ObjectError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        match self {
            ObjectError::Store(e) => e.exit_status(),
            ObjectError::Undecodable { .. } => crate::error::ExitStatus::Damaged,
            ObjectError::Crypt(e) => e.exit_status(),
        }
    }
}

/// A transformation of an object's bytes on their way to the store and back.
///
/// `encode` may differ from call to call (a random nonce); `decode(encode(x)) == x` always.
/// Both are given the object's key (an envelope binds it as associated data).
pub trait Codec: Send + Sync + fmt::Debug {
    /// The stored form of `plain`.
    fn encode(&self, key: &str, plain: Bytes) -> Bytes;

    /// The original bytes of an object stored under `key`. Stored bytes that do not decode (an
    /// envelope that does not open: a damaged object) are [`ObjectError::Undecodable`]; an
    /// envelope of a key the keyring lacks is [`ObjectError::Crypt`]; both name the key.
    fn decode(&self, key: &str, stored: Bytes) -> Result<Bytes, ObjectError>;

    /// The id of the key new objects are encrypted with; `None` for a codec that does not
    /// encrypt.
    fn writing_key(&self) -> Option<String> {
        None
    }

    /// The id of the key the stored form `stored` was encoded with, when this codec's
    /// keyring, as it is now, no longer holds it (retired since). `None` for a codec without
    /// keys, and for bytes it did not encode.
    fn missing_key(&self, _stored: &[u8]) -> Option<String> {
        None
    }

    /// Keys of objects that may stand in for the header of the object stored under `key`
    /// when that header names a key this codec lacks: rekey sidecars
    /// ([`crate::catalog::keys::rekeyed`]), the most preferred (newest key) first. Empty for a
    /// codec without keys.
    fn header_sidecars(&self, _key: &str) -> Vec<String> {
        Vec::new()
    }

    /// Decodes `stored`, the object under `key`, with `header` (a sidecar's bytes) in place of
    /// its own header.
    fn decode_with_header(
        &self,
        key: &str,
        stored: Bytes,
        _header: Bytes,
    ) -> Result<Bytes, ObjectError> {
        self.decode(key, stored)
    }
}

/// The identity codec: objects are stored as they are (all repositories so far).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plain;

impl Codec for Plain {
    fn encode(&self, _key: &str, plain: Bytes) -> Bytes {
        plain
    }

    fn decode(&self, _key: &str, stored: Bytes) -> Result<Bytes, ObjectError> {
        Ok(stored)
    }
}

/// A store whose objects are encoded with `codec`: every other call goes to `inner` as it is.
pub fn with_codec(inner: Arc<dyn Store>, codec: Arc<dyn Codec>) -> Arc<dyn Store> {
    Arc::new(WithCodec { inner, codec })
}

#[derive(Debug)]
struct WithCodec {
    inner: Arc<dyn Store>,
    codec: Arc<dyn Codec>,
}

#[async_trait]
impl Store for WithCodec {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        self.inner.get_head(key, len).await
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
    fn has_storage_classes(&self) -> bool {
        self.inner.has_storage_classes()
    }
    async fn storage_classes(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, StorageClass>, StoreError> {
        self.inner.storage_classes(prefix).await
    }
    async fn residence(&self, key: &str) -> Result<Residence, StoreError> {
        self.inner.residence(key).await
    }
    async fn set_storage_class(&self, key: &str, class: &StorageClass) -> Result<(), StoreError> {
        self.inner.set_storage_class(key, class).await
    }
    async fn thaw(&self, key: &str, tier: ThawTier, days: u32) -> Result<(), StoreError> {
        self.inner.thaw(key, tier, days).await
    }
    fn codec(&self) -> Arc<dyn Codec> {
        self.codec.clone()
    }
}

/// An object encoded once, ready to be stored — and stored again, byte for byte, by a retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    key: String,
    bytes: Bytes,
}

impl Encoded {
    /// The object's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The bytes as stored.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The stored size.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the stored form is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Stores the encoded bytes under the key (create-only; see [`Store::put`]). Calling it
    /// again after an error is a safe retry: the bytes are the same.
    pub async fn put(&self, store: &dyn Store) -> Result<(), StoreError> {
        store.put(&self.key, self.bytes.clone()).await
    }
}

/// Encodes `plain`, the object to store under `key` in `store`, with the store's codec.
pub fn encode(store: &dyn Store, key: impl Into<String>, plain: Bytes) -> Encoded {
    encode_with(&*store.codec(), key, plain)
}

/// Encodes `plain`, the object to store under `key`, with `codec`.
pub fn encode_with(codec: &dyn Codec, key: impl Into<String>, plain: Bytes) -> Encoded {
    let key = key.into();
    let bytes = codec.encode(&key, plain);
    Encoded { key, bytes }
}

/// Encodes `plain` once and stores it under `key` (the store's own retries re-send the same
/// bytes).
pub async fn put_object(store: &dyn Store, key: &str, plain: Bytes) -> Result<(), StoreError> {
    encode(store, key, plain).put(store).await
}

/// Reads the object under `key` and decodes it with the store's codec.
pub async fn get_object(store: &dyn Store, key: &str) -> Result<Bytes, ObjectError> {
    get_object_with(store, &*store.codec(), key).await
}

/// Reads the object under `key` and decodes it with `codec`.
///
/// An object whose own header names a key the codec lacks (a retired key) is opened with the
/// first of its rekey sidecars that exists ([`Codec::header_sidecars`]): one more read for
/// each key tried, only for such objects, so that reading a repository nobody rekeyed costs
/// nothing more.
pub async fn get_object_with(
    store: &dyn Store,
    codec: &dyn Codec,
    key: &str,
) -> Result<Bytes, ObjectError> {
    let stored = store.get(key).await?;
    match codec.decode(key, stored.clone()) {
        Err(ObjectError::Crypt(e)) if e.missing_key().is_some() => {
            for sidecar in codec.header_sidecars(key) {
                match store.get(&sidecar).await {
                    Ok(header) => return codec.decode_with_header(key, stored, header),
                    Err(StoreError::NotFound { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(ObjectError::Crypt(e))
        }
        decoded => decoded,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::store::faulty::{Fault, FaultyStore, Op, Times};
    use crate::store::LocalStore;

    /// A codec whose output differs on every call, like an envelope with a random nonce:
    /// an 8-byte counter, then the bytes xor-ed with its low byte.
    #[derive(Debug, Default)]
    pub(crate) struct Nonced(AtomicU64);

    impl Codec for Nonced {
        fn encode(&self, _key: &str, plain: Bytes) -> Bytes {
            let nonce = self.0.fetch_add(1, Ordering::Relaxed) + 1;
            let mut out = nonce.to_be_bytes().to_vec();
            out.extend(plain.iter().map(|b| b ^ nonce as u8));
            Bytes::from(out)
        }

        fn decode(&self, key: &str, stored: Bytes) -> Result<Bytes, ObjectError> {
            let (nonce, body) =
                stored
                    .split_at_checked(8)
                    .ok_or_else(|| ObjectError::Undecodable {
                        key: key.into(),
                        codec: "nonced",
                        detail: format!("{} bytes, shorter than its 8-byte nonce", stored.len()),
                    })?;
            let n = u64::from_be_bytes(nonce.try_into().unwrap()) as u8;
            Ok(body.iter().map(|b| b ^ n).collect::<Vec<u8>>().into())
        }
    }

    /// A store whose first put is stored but answered with a retryable error, as when the
    /// connection drops after the store took the object.
    pub(crate) fn loses_first_answer(inner: Arc<dyn Store>) -> FaultyStore {
        FaultyStore::new(inner).fail(Op::Put, Fault::AnswerLost, Times::N(1))
    }

    #[tokio::test]
    async fn a_retry_after_a_lost_answer_stores_the_same_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let store = loses_first_answer(local.clone());
        let codec = Nonced::default();
        let plain = Bytes::from_static(b"a segment's bytes");

        let object = encode_with(&codec, "segments/x", plain.clone());
        let first = object.put(&store).await.unwrap_err();
        assert!(first.is_retryable(), "{first}");
        // The retry re-sends the bytes encoded once: the store sees an identical put.
        object.put(&store).await.unwrap();
        assert_eq!(
            get_object_with(&*local, &codec, "segments/x")
                .await
                .unwrap(),
            plain
        );

        // Encoding again for the retry (a fresh nonce) is what the layer prevents: a conflict.
        let store = loses_first_answer(local.clone());
        encode_with(&codec, "segments/y", plain.clone())
            .put(&store)
            .await
            .unwrap_err();
        let again = encode_with(&codec, "segments/y", plain.clone())
            .put(&store)
            .await
            .unwrap_err();
        assert!(matches!(again, StoreError::Conflict { .. }), "{again}");
    }

    #[tokio::test]
    async fn the_default_codec_stores_objects_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let plain = Bytes::from_static(b"{\"format_version\": 1}");
        put_object(&store, "archive.json", plain.clone())
            .await
            .unwrap();
        assert_eq!(store.get("archive.json").await.unwrap(), plain);
        assert_eq!(get_object(&store, "archive.json").await.unwrap(), plain);
        let encoded = encode(&store, "k", plain.clone());
        assert_eq!((encoded.key(), encoded.bytes()), ("k", &plain));
        assert!(matches!(
            get_object(&store, "missing").await,
            Err(ObjectError::Store(StoreError::NotFound { .. }))
        ));
    }

    #[tokio::test]
    async fn an_object_that_does_not_decode_is_damaged_not_a_store_error() {
        use crate::error::{Classify, ExitStatus};
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .put("segments/short", Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let err = get_object_with(&store, &Nonced::default(), "segments/short")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::Undecodable { .. }), "{err}");
        assert_eq!(err.exit_status(), ExitStatus::Damaged);
        let msg = err.to_string();
        assert!(
            msg.contains("segments/short") && msg.contains("nonced") && msg.contains("damaged"),
            "{msg}"
        );
        // Through the errors of the readers above, the code stays the damaged object's.
        let repo: crate::catalog::RepoError = err.into();
        assert_eq!(repo.exit_status(), ExitStatus::Damaged);
        let missing: crate::catalog::RepoError =
            get_object(&store, "missing").await.unwrap_err().into();
        assert!(
            matches!(missing, crate::catalog::RepoError::Store(_)),
            "{missing}"
        );
    }

    /// A store with storage classes that records which class calls reach it.
    #[derive(Debug, Default)]
    struct Classy(std::sync::Mutex<Vec<String>>);

    #[async_trait]
    impl Store for Classy {
        fn location(&self) -> String {
            "classy".into()
        }
        async fn put(&self, _key: &str, _data: Bytes) -> Result<(), StoreError> {
            Ok(())
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            Err(StoreError::NotFound {
                location: self.location(),
                key: key.into(),
            })
        }
        async fn list(&self, _prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            Ok(Vec::new())
        }
        async fn delete(&self, _key: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn check_writable(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn has_storage_classes(&self) -> bool {
            true
        }
        async fn storage_classes(
            &self,
            prefix: &str,
        ) -> Result<BTreeMap<String, StorageClass>, StoreError> {
            self.0.lock().unwrap().push(format!("classes {prefix}"));
            Ok(BTreeMap::new())
        }
        async fn residence(&self, key: &str) -> Result<Residence, StoreError> {
            self.0.lock().unwrap().push(format!("residence {key}"));
            Ok(Residence::standard())
        }
        async fn set_storage_class(
            &self,
            key: &str,
            class: &StorageClass,
        ) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(format!("set {key} {class}"));
            Ok(())
        }
        async fn thaw(&self, key: &str, _tier: ThawTier, days: u32) -> Result<(), StoreError> {
            self.0.lock().unwrap().push(format!("thaw {key} {days}"));
            Ok(())
        }
    }

    /// An encrypted repository on S3 keeps its storage classes: the codec wrapper passes every
    /// class call to the store beneath (it once answered as a folder would, refusing them).
    #[tokio::test]
    async fn a_codec_keeps_the_storage_classes_of_the_store_beneath() {
        let inner = Arc::new(Classy::default());
        let store = with_codec(inner.clone(), Arc::new(Plain));
        assert!(store.has_storage_classes());
        store.storage_classes("basebackups/").await.unwrap();
        store.residence("k").await.unwrap();
        store
            .set_storage_class("k", &StorageClass::Glacier)
            .await
            .unwrap();
        store.thaw("k", ThawTier::Bulk, 3).await.unwrap();
        assert_eq!(
            *inner.0.lock().unwrap(),
            [
                "classes basebackups/",
                "residence k",
                "set k GLACIER",
                "thaw k 3"
            ]
        );
    }
}
