//! The encryption envelope of one object (`proto/encryption.md`): a plaintext header that
//! carries the wrapped data key, then the object's bytes in authenticated chunks.
//!
//! Owns the byte format and the AEAD calls (AES-256-GCM from `ring`; no cipher of our own).
//! Does not own keys (the [`super::Keyring`] hands them in) nor the object's name (the caller
//! passes it, and it is bound as associated data).
//!
//! Invariants: a data key is drawn at random for every object and never used for another, so
//! chunk nonces can be a counter; every chunk's nonce carries its index and whether it is the
//! last, so a reordered, truncated or extended object fails to open; the chunks' associated
//! data leaves out the key id and the wrapped key, so a rotation can rewrap the header alone.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::keyring::{KeyId, SecretKey};

/// The first bytes of every envelope.
pub const MAGIC: [u8; 4] = *b"TMEV";
/// The envelope format this build writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the header, before the first chunk.
pub const HEADER_LEN: usize = 80;
/// Bytes of the authentication tag ending every chunk and the wrapped key.
pub const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk written by this build.
pub const DEFAULT_CHUNK: u32 = 64 * 1024;
/// The largest chunk a reader accepts (its memory bound per chunk).
pub const MAX_CHUNK: u32 = 1 << 24;

/// Bytes of the header that the wrapped key's associated data covers (magic to key id).
const WRAP_AAD_LEN: usize = 20;
/// Bytes of the header that every chunk's associated data covers (magic to chunk size).
const CHUNK_AAD_LEN: usize = 12;

/// Why an envelope did not open (the caller adds the object's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not an encrypted object (no envelope header)")]
    NotEnvelope,
    #[error("envelope format version {0}; this build reads version {VERSION}")]
    Version(u8),
    #[error("{0}")]
    Malformed(String),
    #[error("encrypted with key {0}, which is not in the keyring")]
    UnknownKey(KeyId),
    #[error("its data key does not authenticate under key {0}")]
    WrappedKey(KeyId),
    #[error("chunk {index} of {count} does not authenticate")]
    Chunk { index: u32, count: u32 },
}

/// The parsed plaintext header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub chunk_size: u32,
    pub key_id: KeyId,
    pub wrap_nonce: [u8; NONCE_LEN],
    pub wrapped_key: [u8; 32 + TAG_LEN],
}

impl Header {
    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[8..12].copy_from_slice(&self.chunk_size.to_be_bytes());
        h[12..20].copy_from_slice(&self.key_id.0);
        h[20..32].copy_from_slice(&self.wrap_nonce);
        h[32..80].copy_from_slice(&self.wrapped_key);
        h
    }

    /// Parses the header at the start of `stored`.
    pub fn parse(stored: &[u8]) -> Result<Header, OpenError> {
        if !stored.starts_with(&MAGIC) {
            return Err(OpenError::NotEnvelope);
        }
        let h = stored.get(..HEADER_LEN).ok_or_else(|| {
            OpenError::Malformed(format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                stored.len()
            ))
        })?;
        if h[4] != VERSION {
            return Err(OpenError::Version(h[4]));
        }
        if h[5..8] != [0, 0, 0] {
            return Err(OpenError::Malformed(
                "reserved header bytes are not zero".into(),
            ));
        }
        let chunk_size = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
        if chunk_size == 0 || chunk_size > MAX_CHUNK {
            return Err(OpenError::Malformed(format!(
                "chunk size {chunk_size} outside 1..={MAX_CHUNK}"
            )));
        }
        Ok(Header {
            chunk_size,
            key_id: KeyId(h[12..20].try_into().expect("8 bytes")),
            wrap_nonce: h[20..32].try_into().expect("12 bytes"),
            wrapped_key: h[32..80].try_into().expect("48 bytes"),
        })
    }
}

/// What [`seal_with`] needs besides the object: everything random is passed in, so that test
/// vectors are reproducible.
pub struct SealParams<'a> {
    pub kek: &'a SecretKey,
    pub key_id: KeyId,
    pub data_key: &'a SecretKey,
    pub wrap_nonce: [u8; NONCE_LEN],
    pub chunk_size: u32,
}

/// Encrypts `plain`, the object named `name`, under `kek` (key `key_id`) with a fresh random
/// data key.
pub fn seal(kek: &SecretKey, key_id: KeyId, name: &str, plain: &[u8]) -> Vec<u8> {
    let rng = SystemRandom::new();
    let data_key = SecretKey::random(&rng);
    let mut wrap_nonce = [0u8; NONCE_LEN];
    rng.fill(&mut wrap_nonce)
        .expect("the operating system's random source");
    seal_with(
        &SealParams {
            kek,
            key_id,
            data_key: &data_key,
            wrap_nonce,
            chunk_size: DEFAULT_CHUNK,
        },
        name,
        plain,
    )
}

/// Encrypts `plain`, the object named `name`, with the given data key and nonce (which must
/// never be used again: [`seal`] draws them).
pub fn seal_with(p: &SealParams<'_>, name: &str, plain: &[u8]) -> Vec<u8> {
    let mut header = Header {
        chunk_size: p.chunk_size,
        key_id: p.key_id,
        wrap_nonce: p.wrap_nonce,
        wrapped_key: [0; 48],
    };
    header.wrapped_key = wrap(p.kek, &header, name, p.data_key);
    let cs = p.chunk_size as usize;
    let count = plain.len().div_ceil(cs).max(1);
    let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + count * TAG_LEN);
    let head = header.to_bytes();
    out.extend_from_slice(&head);
    let aead = aead_key(p.data_key);
    let aad = chunk_aad(&head, name);
    for i in 0..count {
        let chunk = &plain[(i * cs).min(plain.len())..((i + 1) * cs).min(plain.len())];
        let start = out.len();
        out.extend_from_slice(chunk);
        let nonce = chunk_nonce(i as u32, i + 1 == count);
        let tag = aead
            .seal_in_place_separate_tag(nonce, Aad::from(&aad), &mut out[start..])
            .expect("a chunk is within AES-GCM's length limit");
        out.extend_from_slice(tag.as_ref());
    }
    out
}

/// Decrypts an envelope of the object named `name`, asking `lookup` for the key its header
/// names.
pub fn open<'k>(
    lookup: impl Fn(&KeyId) -> Option<&'k SecretKey>,
    name: &str,
    stored: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let header = Header::parse(stored)?;
    let kek = lookup(&header.key_id).ok_or(OpenError::UnknownKey(header.key_id))?;
    let data_key = unwrap(kek, &header, name)?;
    let head = &stored[..HEADER_LEN];
    let body = &stored[HEADER_LEN..];
    let full = header.chunk_size as usize + TAG_LEN;
    let count = body.len().div_ceil(full).max(1);
    let last_len = body.len() - (count - 1) * full;
    if last_len < TAG_LEN {
        return Err(OpenError::Malformed(format!(
            "its last chunk has {last_len} bytes, shorter than a tag: truncated"
        )));
    }
    let count32 = u32::try_from(count)
        .map_err(|_| OpenError::Malformed(format!("{count} chunks, more than 2^32")))?;
    let aead = aead_key(&data_key);
    let aad = chunk_aad(head, name);
    let mut out = Vec::with_capacity(body.len() - count * TAG_LEN);
    let mut buf = Vec::with_capacity(full.min(body.len()));
    for (i, chunk) in body.chunks(full).enumerate() {
        buf.clear();
        buf.extend_from_slice(chunk);
        let nonce = chunk_nonce(i as u32, i + 1 == count);
        let plain = aead
            .open_in_place(nonce, Aad::from(&aad), &mut buf)
            .map_err(|_| OpenError::Chunk {
                index: i as u32,
                count: count32,
            })?;
        out.extend_from_slice(plain);
    }
    Ok(out)
}

/// The header of `stored` rewrapped under `new_kek` (key `new_id`): the data key and every
/// chunk stay as they are. For a rotation that rewrites headers only.
pub fn rewrap(
    old_kek: &SecretKey,
    new_kek: &SecretKey,
    new_id: KeyId,
    name: &str,
    stored: &[u8],
) -> Result<[u8; HEADER_LEN], OpenError> {
    let header = Header::parse(stored)?;
    let data_key = unwrap(old_kek, &header, name)?;
    let mut wrap_nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut wrap_nonce)
        .expect("the operating system's random source");
    let mut new = Header {
        key_id: new_id,
        wrap_nonce,
        ..header
    };
    new.wrapped_key = wrap(new_kek, &new, name, &data_key);
    Ok(new.to_bytes())
}

/// The data key wrapped under `kek`, bound to the header's first bytes and the name.
fn wrap(kek: &SecretKey, header: &Header, name: &str, data_key: &SecretKey) -> [u8; 48] {
    let aad = prefixed(&header.to_bytes()[..WRAP_AAD_LEN], name);
    let mut out = [0u8; 48];
    out[..32].copy_from_slice(data_key.expose());
    let tag = aead_key(kek)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(header.wrap_nonce),
            Aad::from(&aad),
            &mut out[..32],
        )
        .expect("32 bytes are within AES-GCM's length limit");
    out[32..].copy_from_slice(tag.as_ref());
    out
}

fn unwrap(kek: &SecretKey, header: &Header, name: &str) -> Result<SecretKey, OpenError> {
    let aad = prefixed(&header.to_bytes()[..WRAP_AAD_LEN], name);
    let mut buf = header.wrapped_key;
    let key = aead_key(kek)
        .open_in_place(
            Nonce::assume_unique_for_key(header.wrap_nonce),
            Aad::from(&aad),
            &mut buf,
        )
        .map_err(|_| OpenError::WrappedKey(header.key_id))?;
    let key = SecretKey::from_bytes(key.try_into().expect("32 bytes"));
    zeroize::Zeroize::zeroize(&mut buf);
    Ok(key)
}

fn aead_key(k: &SecretKey) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.expose()).expect("a 32-byte key"))
}

/// Chunk `index`'s nonce: seven zero bytes, the index (u32, big-endian), then 1 for the last
/// chunk and 0 for the others (the STREAM construction).
fn chunk_nonce(index: u32, last: bool) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    Nonce::assume_unique_for_key(n)
}

/// Every chunk's associated data: the header's magic, version and chunk size, then the name.
fn chunk_aad(head: &[u8], name: &str) -> Vec<u8> {
    prefixed(&head[..CHUNK_AAD_LEN], name)
}

fn prefixed(prefix: &[u8], name: &str) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}
