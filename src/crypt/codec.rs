//! The encrypting [`Codec`]: objects sealed with the keyring's current key, opened with
//! whichever key of the keyring their header names.
//!
//! Owns when the keyring file is read again: before each object is sealed, when the file
//! changed (a `keys add` beside a running archiver takes effect at its next object), and once
//! more when an object names a key the loaded keyring lacks (and when the uploader asks whether
//! a sealed segment's key is still held, [`Codec::missing_key`]). A keyring that no longer reads
//! keeps the one loaded (with a warning): a half-edited file must not stop the archiver.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;

use super::envelope::{self, OpenError};
use super::{CryptError, Keyring};
use crate::object::Codec;
use crate::object::ObjectError;

/// The keyring file's modification time and size: when either changes, it is read again.
type Stamp = Option<(SystemTime, u64)>;

/// Encrypts every object with the envelope, under the keyring at a path.
#[derive(Debug)]
pub struct Sealed {
    path: PathBuf,
    loaded: Mutex<(Arc<Keyring>, Stamp)>,
}

impl Sealed {
    /// Loads the keyring at `path`.
    pub fn open(path: &Path) -> Result<Sealed, CryptError> {
        let stamp = stamp(path);
        let keyring = Keyring::load(path)?;
        Ok(Sealed {
            path: path.to_path_buf(),
            loaded: Mutex::new((Arc::new(keyring), stamp)),
        })
    }

    /// The keyring as loaded now, read again first if the file changed (or if `force`).
    fn keyring(&self, force: bool) -> Arc<Keyring> {
        let mut loaded = self.loaded.lock().expect("keyring lock");
        let now = stamp(&self.path);
        if force || now != loaded.1 {
            match Keyring::load(&self.path) {
                Ok(k) => {
                    if k.current().id != loaded.0.current().id {
                        tracing::info!(key = %k.current().id, keyring = %self.path.display(), "new objects are encrypted with a new key");
                    }
                    *loaded = (Arc::new(k), now);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the keyring loaded before");
                }
            }
        }
        loaded.0.clone()
    }
}

impl Codec for Sealed {
    fn encode(&self, key: &str, plain: Bytes) -> Bytes {
        let keyring = self.keyring(false);
        let k = keyring.current();
        Bytes::from(envelope::seal(&k.secret, k.id, key, &plain))
    }

    fn decode(&self, key: &str, stored: Bytes) -> Result<Bytes, ObjectError> {
        self.open_object(key, &stored, "")
    }

    fn writing_key(&self) -> Option<String> {
        Some(self.keyring(false).current().id.to_string())
    }

    fn missing_key(&self, stored: &[u8]) -> Option<String> {
        let head = envelope::Header::parse(stored).ok()?;
        let keyring = self.keyring(false);
        keyring
            .get(&head.key_id)
            .is_none()
            .then(|| head.key_id.to_string())
    }

    fn header_sidecars(&self, key: &str) -> Vec<String> {
        let keyring = self.keyring(false);
        // Keys are kept oldest first: the newest is the most preferred.
        keyring
            .keys()
            .iter()
            .rev()
            .map(|k| crate::catalog::keys::rekeyed(&k.id.to_string(), key))
            .collect()
    }

    fn decode_with_header(
        &self,
        key: &str,
        stored: Bytes,
        header: Bytes,
    ) -> Result<Bytes, ObjectError> {
        if header.len() != envelope::HEADER_LEN || stored.len() < envelope::HEADER_LEN {
            return Err(ObjectError::Undecodable {
                key: key.to_string(),
                codec: "aes-256-gcm envelope",
                detail: format!(
                    "its rekeyed header has {} bytes (expected {}), the object {}",
                    header.len(),
                    envelope::HEADER_LEN,
                    stored.len()
                ),
            });
        }
        let mut spliced = Vec::with_capacity(stored.len());
        spliced.extend_from_slice(&header);
        spliced.extend_from_slice(&stored[envelope::HEADER_LEN..]);
        self.open_object(key, &spliced, " (with its rekeyed header)")
    }
}

impl Sealed {
    /// Opens the envelope `stored` of the object `key`; `how` is added to a damage's detail.
    fn open_object(&self, key: &str, stored: &[u8], how: &str) -> Result<Bytes, ObjectError> {
        let try_open = |keyring: &Keyring| {
            envelope::open(|id| keyring.get(id).map(|k| &k.secret), key, stored)
        };
        let keyring = self.keyring(false);
        let opened = match try_open(&keyring) {
            Err(OpenError::UnknownKey(_)) => try_open(&self.keyring(true)),
            r => r,
        };
        opened.map(Bytes::from).map_err(|source| {
            let e = CryptError::Open {
                key: key.to_string(),
                source,
            };
            // Damage is the object layer's one kind of damaged object (exit 5, and the
            // catalog's "corrupt" for a segment); a missing key or a newer envelope is not.
            if e.is_damage() {
                ObjectError::Undecodable {
                    key: key.to_string(),
                    codec: "aes-256-gcm envelope",
                    detail: format!("{e}{how}"),
                }
            } else {
                e.into()
            }
        })
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}
