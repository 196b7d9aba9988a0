//! The keyring: a local file of key-encryption keys (`proto/encryption.md`, "Keyring file"),
//! one of which writes.
//!
//! Owns the file's format, its creation with mode 0600, adding a key (written to a new file
//! then renamed over the old one, so a crash leaves the old keyring or the new one), and the
//! secret types, whose `Debug` prints `[redacted]`. Does not own what keys encrypt
//! ([`super::envelope`]).
//!
//! Invariant: a keyring's `current` names one of its keys; key ids are unique in it.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::CryptError;

/// The `format` field of every keyring file.
pub const KEYRING_FORMAT: &str = "tidemark-keyring";
/// The keyring file version this build reads and writes.
pub const KEYRING_VERSION: u32 = 1;

/// A 256-bit secret key: zeroed when dropped, never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    /// A key from the operating system's random source.
    pub fn random(rng: &SystemRandom) -> SecretKey {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill(&mut k[..])
            .expect("the operating system's random source");
        SecretKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> SecretKey {
        SecretKey(Zeroizing::new(bytes))
    }

    /// The key's bytes, for the cipher.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A key's id: 8 random bytes, shown as 16 lower-case hex digits (not secret).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn parse(s: &str) -> Option<KeyId> {
        let mut b = [0u8; 8];
        (s.len() == 16 && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| hex::decode_to_slice(s, &mut b).ok())
            .flatten()
            .map(|()| KeyId(b))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why [`Keyring::remove`] removed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveError {
    /// The key is the current one.
    Current,
    /// The keyring has no such key.
    Absent,
}

/// One key of a keyring.
#[derive(Clone, Debug)]
pub struct Key {
    pub id: KeyId,
    /// When it was made (RFC 3339, UTC).
    pub created: String,
    pub secret: SecretKey,
}

/// The keys that open a repository's objects; `current` encrypts new ones.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<Key>,
    current: KeyId,
}

/// The file's JSON form.
#[derive(Serialize, Deserialize)]
struct KeyringFile {
    format: String,
    version: u32,
    current: String,
    keys: Vec<KeyFile>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    id: String,
    created: String,
    /// 64 hex digits.
    secret: String,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl Keyring {
    /// A keyring of one new key.
    pub fn generate() -> Keyring {
        let key = new_key(&SystemRandom::new());
        Keyring {
            current: key.id,
            keys: vec![key],
        }
    }

    /// Adds a new key, which becomes the current one; returns its id.
    pub fn add(&mut self) -> KeyId {
        let rng = SystemRandom::new();
        let key = loop {
            let k = new_key(&rng);
            if self.get(&k.id).is_none() {
                break k;
            }
        };
        self.current = key.id;
        self.keys.push(key);
        self.current
    }

    /// Removes key `id` (a retire: the caller checked that no object needs it). The current
    /// key cannot be removed: new objects are encrypted with it.
    pub fn remove(&mut self, id: &KeyId) -> Result<Key, RemoveError> {
        if *id == self.current {
            return Err(RemoveError::Current);
        }
        let i = self
            .keys
            .iter()
            .position(|k| k.id == *id)
            .ok_or(RemoveError::Absent)?;
        Ok(self.keys.remove(i))
    }

    /// Puts back `key`, removed by [`Keyring::remove`] from position `at` (a retire undone).
    /// A keyring that holds its id already is left as it is.
    pub fn reinstate(&mut self, at: usize, key: Key) {
        if self.get(&key.id).is_none() {
            self.keys.insert(at.min(self.keys.len()), key);
        }
    }

    /// The key that encrypts new objects.
    pub fn current(&self) -> &Key {
        self.keys
            .iter()
            .find(|k| k.id == self.current)
            .expect("current names a key")
    }

    /// The key `id`, if the keyring holds it.
    pub fn get(&self, id: &KeyId) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == *id)
    }

    /// Every key, oldest first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Parses a keyring file's bytes (`path` is for messages).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Keyring, CryptError> {
        let bad = |detail: String| CryptError::BadKeyring {
            path: path.to_path_buf(),
            detail,
        };
        let f: KeyringFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if f.format != KEYRING_FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {KEYRING_FORMAT:?}",
                f.format
            )));
        }
        if f.version != KEYRING_VERSION {
            return Err(bad(format!(
                "version {}; this build reads version {KEYRING_VERSION}",
                f.version
            )));
        }
        let mut keys: Vec<Key> = Vec::with_capacity(f.keys.len());
        for k in &f.keys {
            let id = KeyId::parse(&k.id)
                .ok_or_else(|| bad(format!("key id {:?} is not 16 hex digits", k.id)))?;
            if keys.iter().any(|o| o.id == id) {
                return Err(bad(format!("key {id} appears twice")));
            }
            let mut secret = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(k.secret.as_bytes(), &mut secret[..])
                .map_err(|_| bad(format!("the secret of key {id} is not 64 hex digits")))?;
            keys.push(Key {
                id,
                created: k.created.clone(),
                secret: SecretKey(secret),
            });
        }
        let current = KeyId::parse(&f.current)
            .filter(|c| keys.iter().any(|k| k.id == *c))
            .ok_or_else(|| bad(format!("current {:?} names no key of the file", f.current)))?;
        Ok(Keyring { keys, current })
    }

    /// The keyring file's bytes.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let f = KeyringFile {
            format: KEYRING_FORMAT.into(),
            version: KEYRING_VERSION,
            current: self.current.to_string(),
            keys: self
                .keys
                .iter()
                .map(|k| KeyFile {
                    id: k.id.to_string(),
                    created: k.created.clone(),
                    secret: hex::encode(k.secret.expose()),
                })
                .collect(),
        };
        let mut v = serde_json::to_vec_pretty(&f).expect("a keyring serializes");
        v.push(b'\n');
        Zeroizing::new(v)
    }

    /// Reads the keyring file at `path`.
    pub fn load(path: &Path) -> Result<Keyring, CryptError> {
        let bytes =
            Zeroizing::new(
                std::fs::read(path).map_err(|source| CryptError::ReadKeyring {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        warn_if_readable_by_others(path);
        Keyring::parse(path, &bytes)
    }

    /// Writes a new keyring file at `path` with mode 0600; an existing file is not replaced.
    pub fn create(&self, path: &Path) -> Result<(), CryptError> {
        write_new(path, &self.to_bytes()).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CryptError::KeyringExists {
                    path: path.to_path_buf(),
                }
            } else {
                CryptError::WriteKeyring {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
    }

    /// Replaces the keyring file at `path` (mode 0600): written beside it, then renamed over it.
    pub fn replace(&self, path: &Path) -> Result<(), CryptError> {
        let err = |source| CryptError::WriteKeyring {
            path: path.to_path_buf(),
            source,
        };
        let tmp = sibling(path, ".new");
        let _ = std::fs::remove_file(&tmp);
        write_new(&tmp, &self.to_bytes()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

fn new_key(rng: &SystemRandom) -> Key {
    let mut id = [0u8; 8];
    rng.fill(&mut id)
        .expect("the operating system's random source");
    Key {
        id: KeyId(id),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        secret: SecretKey::random(rng),
    }
}

/// Creates `path` (it must not exist) with mode 0600, writes `bytes` and syncs it.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                keyring = %path.display(),
                mode = format!("{mode:o}"),
                "the keyring file can be read by other users; chmod 600 it"
            );
        }
    }
}
