//! The envelope against its test vectors (`proto/envelope-vectors/`, made with another
//! implementation of AES-GCM), and against damage: every change to an object's bytes or name
//! fails to open, naming what failed.

use bytes::Bytes;

use super::envelope::{self, open, seal, seal_with, OpenError, SealParams, HEADER_LEN, TAG_LEN};
use super::{KeyId, Keyring, SecretKey};
use crate::object::Codec;

const NAME: &str = "segments/00000001/0000000001000000-0000000001000100.seg";

fn key(b: u8) -> SecretKey {
    SecretKey::from_bytes([b; 32])
}

fn id(b: u8) -> KeyId {
    KeyId([b; 8])
}

/// Seals with 16-byte chunks, so that a short object has several.
fn small_chunks(plain: &[u8], name: &str) -> Vec<u8> {
    seal_with(
        &SealParams {
            kek: &key(1),
            key_id: id(1),
            data_key: &key(9),
            wrap_nonce: [7; 12],
            chunk_size: 16,
        },
        name,
        plain,
    )
}

fn open_1(name: &str, stored: &[u8]) -> Result<Vec<u8>, OpenError> {
    let k = key(1);
    open(|i| (*i == id(1)).then_some(&k), name, stored)
}

#[test]
fn sealed_objects_open_to_their_bytes() {
    for len in [0usize, 1, 15, 16, 17, 32, 100, 70_000, 200_000] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let stored = seal(&key(1), id(1), NAME, &plain);
        let chunks = len.div_ceil(envelope::DEFAULT_CHUNK as usize).max(1);
        assert_eq!(stored.len(), HEADER_LEN + len + chunks * TAG_LEN, "{len}");
        assert_eq!(open_1(NAME, &stored).unwrap(), plain, "{len}");
        assert_eq!(open_1(NAME, &small_chunks(&plain, NAME)).unwrap(), plain);
        // A fresh data key and nonce each time: no two sealings are alike.
        assert_ne!(seal(&key(1), id(1), NAME, &plain), stored);
    }
}

#[test]
fn every_flipped_bit_is_detected() {
    let stored = small_chunks(b"one row\tmarker\nanother row\tmarker\n", NAME);
    for byte in 0..stored.len() {
        for bit in [0, 3, 7] {
            let mut bad = stored.clone();
            bad[byte] ^= 1 << bit;
            assert!(open_1(NAME, &bad).is_err(), "byte {byte} bit {bit}");
        }
    }
    let mut bad = stored.clone();
    *bad.last_mut().unwrap() ^= 1;
    assert_eq!(
        open_1(NAME, &bad).unwrap_err(),
        OpenError::Chunk { index: 2, count: 3 }
    );
    let mut bad = stored.clone();
    bad[40] ^= 1;
    assert_eq!(
        open_1(NAME, &bad).unwrap_err(),
        OpenError::WrappedKey(id(1))
    );
}

#[test]
fn truncated_or_extended_objects_are_detected() {
    let plain = b"0123456789abcdef0123456789abcdef0123";
    let stored = small_chunks(plain, NAME);
    for len in 0..stored.len() {
        assert!(open_1(NAME, &stored[..len]).is_err(), "cut at {len}");
    }
    // Cut at a chunk boundary: what is left authenticates chunk by chunk, but its last chunk
    // was not sealed as the last.
    let two_chunks = HEADER_LEN + 2 * (16 + TAG_LEN);
    assert_eq!(
        open_1(NAME, &stored[..two_chunks]).unwrap_err(),
        OpenError::Chunk { index: 1, count: 2 }
    );
    let mut longer = stored.clone();
    longer.extend_from_slice(&stored[HEADER_LEN..HEADER_LEN + 16 + TAG_LEN]);
    assert!(open_1(NAME, &longer).is_err());
}

#[test]
fn swapped_chunks_are_detected() {
    let stored = small_chunks(b"first chunk 16b!second chunk 16b third", NAME);
    let c = 16 + TAG_LEN;
    let mut swapped = stored[..HEADER_LEN].to_vec();
    swapped.extend_from_slice(&stored[HEADER_LEN + c..HEADER_LEN + 2 * c]);
    swapped.extend_from_slice(&stored[HEADER_LEN..HEADER_LEN + c]);
    swapped.extend_from_slice(&stored[HEADER_LEN + 2 * c..]);
    assert_eq!(
        open_1(NAME, &swapped).unwrap_err(),
        OpenError::Chunk { index: 0, count: 3 }
    );
}

#[test]
fn an_object_under_another_name_does_not_open() {
    let stored = seal(&key(1), id(1), NAME, b"a segment");
    let other = "segments/00000001/0000000001000100-0000000001000200.seg";
    assert_eq!(
        open_1(other, &stored).unwrap_err(),
        OpenError::WrappedKey(id(1))
    );
    // Even with the header rewrapped for the other name, the chunks are bound to the first.
    let head = envelope::rewrap(&key(1), &key(1), id(1), NAME, &stored).unwrap();
    let mut moved = head.to_vec();
    moved.extend_from_slice(&stored[HEADER_LEN..]);
    assert!(open_1(NAME, &moved).is_ok());
    assert!(open_1(other, &moved).is_err());
}

#[test]
fn an_unknown_key_id_is_named() {
    let stored = seal(&key(2), id(2), NAME, b"x");
    let err = open_1(NAME, &stored).unwrap_err();
    assert_eq!(err, OpenError::UnknownKey(id(2)));
    assert!(err.to_string().contains("0202020202020202"), "{err}");
    assert_eq!(
        open_1(NAME, b"PGSEG...").unwrap_err(),
        OpenError::NotEnvelope
    );
    let mut newer = stored.clone();
    newer[4] = 2;
    assert_eq!(open_1(NAME, &newer).unwrap_err(), OpenError::Version(2));
}

#[test]
fn a_rewrapped_header_opens_with_the_new_key_only() {
    let plain = b"rows of an old segment";
    let stored = seal(&key(1), id(1), NAME, plain);
    let head = envelope::rewrap(&key(1), &key(2), id(2), NAME, &stored).unwrap();
    let mut rekeyed = head.to_vec();
    rekeyed.extend_from_slice(&stored[HEADER_LEN..]);
    let k2 = key(2);
    assert_eq!(
        open(|i| (*i == id(2)).then_some(&k2), NAME, &rekeyed).unwrap(),
        plain
    );
    assert_eq!(
        open_1(NAME, &rekeyed).unwrap_err(),
        OpenError::UnknownKey(id(2))
    );
}

/// One case of `proto/envelope-vectors/`.
#[derive(serde::Deserialize)]
struct Vector {
    kek: String,
    key_id: String,
    data_key: String,
    wrap_nonce: String,
    chunk_size: u32,
    name: String,
    plain: String,
    stored: String,
}

#[test]
fn the_test_vectors_seal_and_open() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/envelope-vectors");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let v: Vector = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let h32 = |s: &str| -> [u8; 32] { hex::decode(s).unwrap().try_into().unwrap() };
        let kek = SecretKey::from_bytes(h32(&v.kek));
        let key_id = KeyId::parse(&v.key_id).unwrap();
        let (plain, stored) = (
            hex::decode(&v.plain).unwrap(),
            hex::decode(&v.stored).unwrap(),
        );
        let params = SealParams {
            kek: &kek,
            key_id,
            data_key: &SecretKey::from_bytes(h32(&v.data_key)),
            wrap_nonce: hex::decode(&v.wrap_nonce).unwrap().try_into().unwrap(),
            chunk_size: v.chunk_size,
        };
        assert_eq!(
            seal_with(&params, &v.name, &plain),
            stored,
            "{}",
            path.display()
        );
        let opened = open(|i| (*i == key_id).then_some(&kek), &v.name, &stored);
        assert_eq!(opened.unwrap(), plain, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 4, "{seen} vectors in {}", dir.display());
}

#[test]
fn a_keyring_round_trips_and_never_prints_its_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    assert!(
        keyring.create(&path).is_err(),
        "an existing keyring is replaced"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let first = keyring.current().id;
    let second = keyring.add();
    keyring.replace(&path).unwrap();
    let loaded = Keyring::load(&path).unwrap();
    assert_eq!(loaded.current().id, second);
    assert_eq!(loaded.keys().len(), 2);
    assert_eq!(
        loaded.get(&first).unwrap().secret.expose(),
        keyring.get(&first).unwrap().secret.expose()
    );
    let debug = format!("{loaded:?}");
    for k in loaded.keys() {
        assert!(!debug.contains(&hex::encode(k.secret.expose())), "{debug}");
    }
    assert!(debug.contains("[redacted]"), "{debug}");
    let err = Keyring::parse(
        &path,
        br#"{"format": "tidemark-keyring", "version": 1, "current": "00", "keys": []}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("names no key"), "{err}");
}

#[test]
fn the_codec_takes_a_new_key_at_once_and_reads_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.json");
    let mut keyring = Keyring::generate();
    keyring.create(&path).unwrap();
    let codec = super::Sealed::open(&path).unwrap();
    let old = codec.encode(NAME, Bytes::from_static(b"before"));
    let second = keyring.add();
    keyring.replace(&path).unwrap();
    let new = codec.encode(NAME, Bytes::from_static(b"after"));
    assert_eq!(envelope::Header::parse(&new).unwrap().key_id, second);
    assert_eq!(codec.writing_key(), Some(second.to_string()));
    assert_eq!(codec.decode(NAME, old).unwrap(), "before");
    assert_eq!(codec.decode(NAME, new.clone()).unwrap(), "after");

    let mut bad = new.to_vec();
    bad[HEADER_LEN] ^= 1;
    let err = codec.decode(NAME, bad.into()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(NAME) && msg.contains("does not authenticate"),
        "{msg}"
    );
    use crate::error::Classify;
    assert_eq!(err.exit_status(), crate::error::ExitStatus::Damaged);

    let other = Keyring::generate();
    let stranger = envelope::seal(&other.current().secret, other.current().id, NAME, b"x");
    let err = codec.decode(NAME, stranger.into()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(NAME) && msg.contains(&other.current().id.to_string()),
        "{msg}"
    );
    assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
}
