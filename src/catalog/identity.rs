//! The repository's identity: `archive.json`, which cluster and database this archive belongs
//! to, written once by the first command that stores anything.
//!
//! Owns: the identity's format and its version check (an identity of a newer format than this
//! build reads is refused: this build would misread the repository), the check that a source
//! is the one the repository archives, and the repository's segment [`Compression`] (recorded
//! when it is created; writers take it from here, [`compression_for`]). Does not own the key
//! (see [`keys::IDENTITY`]).
//!
//! Invariants: a repository archives one database of one cluster; a command for another source
//! is refused before it writes anything. A repository's segments are written with the codec
//! its identity records, whatever the command line says (a `--compression` naming another is
//! refused). A repository is encrypted from its first object or not at all: its identity says
//! which (itself always in plain text, so that a command without the keyring is told why it
//! cannot go on), and a command whose store's codec disagrees is refused.
//!
//! Extending the identity: a new field is optional with a serde default (an `archive.json`
//! written before it has no such field, and reads as the default: what those releases did), so
//! it needs no new `format_version`. A field that an older build must not ignore — it would
//! misread or corrupt the repository, as an encryption field would — raises
//! [`IDENTITY_FORMAT_VERSION`], so that older builds refuse the repository.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::keys;
use super::RepoError;
use crate::crypt::CryptError;
use crate::lsn::PgTimestamp;
use crate::object::{self, ObjectError, Plain};
use crate::segment::Compression;
use crate::store::{Store, StoreError};

/// Key of the identity object.
pub const IDENTITY_KEY: &str = keys::IDENTITY;
/// The newest `archive.json` format (and repository layout) this build reads and writes:
/// 2 for an encrypted repository (older builds refuse it rather than misread its objects).
pub const IDENTITY_FORMAT_VERSION: u32 = 2;
/// The format of a repository that is not encrypted (still read by older builds).
pub const PLAIN_FORMAT_VERSION: u32 = 1;

/// Which cluster and database a repository archives, and how its segments are written.
///
/// Fields added after the first release are optional, with serde defaults (see the module doc);
/// fields this build does not know are ignored (a newer build that adds one an older build
/// must not ignore raises `format_version`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format_version: u32,
    /// The cluster's system identifier (as a string: JSON numbers cannot carry every u64).
    pub system_id: String,
    pub database: String,
    pub created_at: PgTimestamp,
    /// The segments' codec. Absent from identities written before it was recorded: zstd, what
    /// every release wrote since segment format 2 (older segments, LZ4, stay readable: each
    /// segment names its own format).
    #[serde(default)]
    pub compression: Compression,
    /// Present when every other object is encrypted (`proto/encryption.md`). No secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How an encrypted repository's objects are encrypted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// The envelope: `"aes-256-gcm"` of `proto/encryption.md`.
    pub envelope: String,
    /// The id of the key the first objects were encrypted with (later ones may use newer keys).
    pub first_key: String,
}

/// The envelope of [`Encryption::envelope`].
pub const ENVELOPE: &str = "aes-256-gcm";

impl Identity {
    /// The identity of a new repository for (system_id, database), its segments compressed
    /// with `compression`.
    pub fn new(system_id: u64, database: &str, compression: Compression) -> Identity {
        Identity {
            format_version: PLAIN_FORMAT_VERSION,
            system_id: system_id.to_string(),
            database: database.to_string(),
            created_at: PgTimestamp::now(),
            compression,
            encryption: None,
        }
    }
}

/// The codec a writer uses on the repository at `location`: the one its identity records
/// (`found`), or for a new repository the one `asked` (the `--compression` flag; zstd
/// without it). A flag that names another codec than an existing repository's is refused
/// ([`RepoError::CompressionMismatch`], exit 2) rather than ignored: an operator who asks for a
/// codec expects to get it, and a repository keeps the one it was created with.
pub fn compression_for(
    location: &str,
    found: Option<&Identity>,
    asked: Option<Compression>,
) -> Result<Compression, RepoError> {
    match (found, asked) {
        (Some(id), Some(asked)) if id.compression != asked => Err(RepoError::CompressionMismatch {
            location: location.to_string(),
            recorded: id.compression,
            asked,
        }),
        (Some(id), _) => Ok(id.compression),
        (None, asked) => Ok(asked.unwrap_or_default()),
    }
}

/// Reads the repository's identity; `None` for a new repository. An identity of a newer format
/// than this build knows is refused ([`RepoError::NewerFormat`]): this build would misread the
/// repository. So is a store opened with a keyring for a plain repository, or without one for
/// an encrypted repository ([`check_encryption`]).
pub async fn read_identity(store: &Arc<dyn Store>) -> Result<Option<Identity>, RepoError> {
    // The identity is never encrypted: a reader must learn whether the rest is before it reads.
    let id = match object::get_object_with(&**store, &Plain, IDENTITY_KEY).await {
        Ok(bytes) => parse_identity(&store.location(), &bytes)?,
        Err(ObjectError::Store(StoreError::NotFound { .. })) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    check_encryption(store, &id)?;
    Ok(Some(id))
}

/// Checks that the store's codec encrypts exactly when the repository is encrypted.
pub fn check_encryption(store: &Arc<dyn Store>, id: &Identity) -> Result<(), RepoError> {
    let error = match (&id.encryption, store.codec().writing_key()) {
        (Some(e), None) => CryptError::KeyringNeeded {
            location: store.location(),
            first_key: e.first_key.clone(),
        },
        (None, Some(_)) => CryptError::NotEncrypted {
            location: store.location(),
        },
        _ => return Ok(()),
    };
    Err(ObjectError::from(error).into())
}

/// Parses `archive.json` of the repository at `location`, checking its format version first.
pub fn parse_identity(location: &str, bytes: &[u8]) -> Result<Identity, RepoError> {
    let bad = |detail: String| RepoError::BadIdentity {
        location: location.to_string(),
        detail,
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let found = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| bad("no numeric format_version".into()))?;
    if found > u64::from(IDENTITY_FORMAT_VERSION) {
        return Err(RepoError::NewerFormat {
            location: location.to_string(),
            found,
        });
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// Checks that the repository belongs to (system_id, database), or is new.
pub fn check_identity(
    store: &Arc<dyn Store>,
    found: Option<&Identity>,
    system_id: u64,
    database: &str,
) -> Result<(), RepoError> {
    match found {
        Some(id) if id.system_id != system_id.to_string() || id.database != database => {
            Err(RepoError::WrongSource {
                location: store.location(),
                repo_system: id.system_id.clone(),
                repo_db: id.database.clone(),
                src_system: system_id.to_string(),
                src_db: database.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Writes the repository's identity (`archive.json`), once, and returns the identity in
/// effect: `id`, or the one another command wrote first.
///
/// Two commands starting on a fresh repository at once (an archiver and a `backup`) may both
/// write it: the loser's create-only put conflicts (by its creation time at least), so it
/// accepts the winner's identity when that names the same cluster and database; the caller
/// then writes with the winner's codec ([`compression_for`] again).
///
/// The identity records whether the repository is encrypted from the store's codec (and an
/// encrypted one has `format_version` 2, a plain one keeps 1: older builds still read it).
pub async fn write_identity(store: &Arc<dyn Store>, id: &Identity) -> Result<Identity, RepoError> {
    let mut id = id.clone();
    if let Some(first_key) = store.codec().writing_key() {
        id.format_version = IDENTITY_FORMAT_VERSION;
        id.encryption = Some(Encryption {
            envelope: ENVELOPE.into(),
            first_key,
        });
    }
    let body = serde_json::to_vec_pretty(&id).expect("identity serializes");
    let object = object::encode_with(&Plain, IDENTITY_KEY, Bytes::from(body));
    match object.put(&**store).await {
        Ok(()) => Ok(id),
        Err(StoreError::Conflict { .. }) => {
            let found = read_identity(store).await?;
            let system_id = id.system_id.parse::<u64>().unwrap_or_default();
            check_identity(store, found.as_ref(), system_id, &id.database)?;
            Ok(found.unwrap_or_else(|| id.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_of_a_newer_format_is_refused() {
        use crate::error::Classify;
        let id = Identity::new(7439262451939043512, "app", Compression::Zstd);
        let body = serde_json::to_vec(&id).unwrap();
        assert_eq!(parse_identity("/repo", &body).unwrap(), id);
        let mut newer = serde_json::to_value(&id).unwrap();
        newer["format_version"] = (IDENTITY_FORMAT_VERSION + 1).into();
        newer["new_field"] = "x".into();
        let err = parse_identity("/repo", &serde_json::to_vec(&newer).unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/repo")
                && msg.contains("format_version 3")
                && msg.contains("format_version 2 at most")
                && msg.contains("use a newer tidemark"),
            "{msg}"
        );
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Repository);
        let err = parse_identity("/repo", br#"{"system_id": "1"}"#).unwrap_err();
        assert!(matches!(err, RepoError::BadIdentity { .. }), "{err}");
    }

    #[test]
    fn an_identity_without_compression_is_zstd_and_unknown_fields_are_ignored() {
        // archive.json as every release before the field wrote it.
        let old = br#"{"format_version": 1, "system_id": "7439262451939043512",
            "database": "app", "created_at": "2026-11-20T08:00:00.000000Z"}"#;
        let id = parse_identity("/repo", old).unwrap();
        assert_eq!(id.compression, Compression::Zstd);
        // A field of a later release (of the same format_version) is ignored.
        let mut later = serde_json::to_value(Identity::new(1, "app", Compression::Lz4)).unwrap();
        later["a_later_field"] = serde_json::json!({"x": 1});
        let id = parse_identity("/repo", &serde_json::to_vec(&later).unwrap()).unwrap();
        assert_eq!(id.compression, Compression::Lz4);
        assert_eq!(later["compression"], "lz4", "stored by its name");
        let err = parse_identity("/repo", br#"{"format_version": 1, "system_id": "1", "database": "app", "created_at": "2026-11-20T08:00:00Z", "compression": "brotli"}"#).unwrap_err();
        assert!(matches!(err, RepoError::BadIdentity { .. }), "{err}");
    }

    #[test]
    fn writers_take_the_codec_of_the_identity_and_a_flag_for_another_is_refused() {
        use crate::error::Classify;
        let lz4 = Identity::new(1, "app", Compression::Lz4);
        assert_eq!(
            compression_for("/repo", None, None).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            compression_for("/repo", None, Some(Compression::Lz4)).unwrap(),
            Compression::Lz4
        );
        assert_eq!(
            compression_for("/repo", Some(&lz4), None).unwrap(),
            Compression::Lz4
        );
        assert_eq!(
            compression_for("/repo", Some(&lz4), Some(Compression::Lz4)).unwrap(),
            Compression::Lz4
        );
        let err = compression_for("/repo", Some(&lz4), Some(Compression::Zstd)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/repo")
                && msg.contains("records compression lz4")
                && msg.contains("--compression zstd"),
            "{msg}"
        );
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
    }

    #[tokio::test]
    async fn a_second_writer_of_a_new_repository_takes_the_first_ones_codec() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let first = Identity::new(1, "app", Compression::Lz4);
        assert_eq!(write_identity(&store, &first).await.unwrap(), first);
        let second = Identity::new(1, "app", Compression::Zstd);
        assert_eq!(write_identity(&store, &second).await.unwrap(), first);
        let other = Identity::new(2, "app", Compression::Lz4);
        let err = write_identity(&store, &other).await.unwrap_err();
        assert!(matches!(err, RepoError::WrongSource { .. }), "{err}");
    }

    #[tokio::test]
    async fn read_identity_checks_the_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        assert_eq!(read_identity(&store).await.unwrap(), None);
        let mut newer = serde_json::to_value(Identity::new(1, "app", Compression::Zstd)).unwrap();
        newer["format_version"] = 9.into();
        store
            .put(
                IDENTITY_KEY,
                Bytes::from(serde_json::to_vec(&newer).unwrap()),
            )
            .await
            .unwrap();
        let err = read_identity(&store).await.unwrap_err();
        assert!(
            matches!(err, RepoError::NewerFormat { found: 9, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_encrypted_repository_needs_its_keyring_and_a_plain_one_refuses_one() {
        use crate::error::Classify;
        let keys = tempfile::tempdir().unwrap();
        let path = keys.path().join("keyring.json");
        let keyring = crate::crypt::Keyring::generate();
        keyring.create(&path).unwrap();
        let sealed = || -> Arc<dyn crate::object::Codec> {
            Arc::new(crate::crypt::Sealed::open(&path).unwrap())
        };

        let dir = tempfile::tempdir().unwrap();
        let plain: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let keyed = object::with_codec(plain.clone(), sealed());
        write_identity(&keyed, &Identity::new(1, "app", Compression::Zstd))
            .await
            .unwrap();
        let id = read_identity(&keyed).await.unwrap().unwrap();
        let e = id.encryption.unwrap();
        assert_eq!((e.envelope.as_str(), id.format_version), (ENVELOPE, 2));
        assert_eq!(e.first_key, keyring.current().id.to_string());
        let stored = plain.get(IDENTITY_KEY).await.unwrap();
        assert!(
            stored.starts_with(b"{"),
            "the identity is stored in plain text"
        );
        let err = read_identity(&plain).await.unwrap_err();
        assert!(err.to_string().contains("no keyring was given"), "{err}");
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);

        let dir = tempfile::tempdir().unwrap();
        let plain: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        write_identity(&plain, &Identity::new(1, "app", Compression::Zstd))
            .await
            .unwrap();
        let id = read_identity(&plain).await.unwrap().unwrap();
        assert_eq!((id.encryption, id.format_version), (None, 1));
        let keyed = object::with_codec(plain.clone(), sealed());
        let err = read_identity(&keyed).await.unwrap_err();
        assert!(err.to_string().contains("is not encrypted"), "{err}");
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Usage);
    }
}
