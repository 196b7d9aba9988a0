//! The repository's identity: `archive.json`, which cluster and database this archive belongs
//! to, written once by the first command that stores anything.
//!
//! Owns: the identity's format and its version check (an identity of a newer format than this
//! build reads is refused: this build would misread the repository), and the check that a
//! source is the one the repository archives. Does not own the key (see [`keys::IDENTITY`]).
//!
//! Invariant: a repository archives one database of one cluster; a command for another source
//! is refused before it writes anything.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::keys;
use super::RepoError;
use crate::lsn::PgTimestamp;
use crate::object;
use crate::store::{Store, StoreError};

/// Key of the identity object.
pub const IDENTITY_KEY: &str = keys::IDENTITY;
/// The newest `archive.json` format (and repository layout) this build reads and writes.
pub const IDENTITY_FORMAT_VERSION: u32 = 1;

/// Which cluster and database a repository archives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format_version: u32,
    /// The cluster's system identifier (as a string: JSON numbers cannot carry every u64).
    pub system_id: String,
    pub database: String,
    pub created_at: PgTimestamp,
}

impl Identity {
    /// The identity of a new repository for (system_id, database).
    pub fn new(system_id: u64, database: &str) -> Identity {
        Identity {
            format_version: IDENTITY_FORMAT_VERSION,
            system_id: system_id.to_string(),
            database: database.to_string(),
            created_at: PgTimestamp::now(),
        }
    }
}

/// Reads the repository's identity; `None` for a new repository. An identity of a newer format
/// than this build knows is refused ([`RepoError::NewerFormat`]): this build would misread the
/// repository.
pub async fn read_identity(store: &Arc<dyn Store>) -> Result<Option<Identity>, RepoError> {
    match object::get_object(&**store, IDENTITY_KEY).await {
        Ok(bytes) => parse_identity(&store.location(), &bytes).map(Some),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
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

/// Writes the repository's identity (`archive.json`), once.
///
/// Two commands starting on a fresh repository at once (an archiver and a `backup`) may both
/// write it: the loser's create-only put conflicts only by its creation time, so it accepts the
/// winner's identity when that names the same cluster and database.
pub async fn write_identity(store: &Arc<dyn Store>, id: &Identity) -> Result<(), RepoError> {
    let body = serde_json::to_vec_pretty(id).expect("identity serializes");
    match object::put_object(&**store, IDENTITY_KEY, Bytes::from(body)).await {
        Ok(()) => Ok(()),
        Err(StoreError::Conflict { .. }) => {
            let found = read_identity(store).await?;
            let system_id = id.system_id.parse::<u64>().unwrap_or_default();
            check_identity(store, found.as_ref(), system_id, &id.database)
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
        let id = Identity::new(7439262451939043512, "app");
        let body = serde_json::to_vec(&id).unwrap();
        assert_eq!(parse_identity("/repo", &body).unwrap(), id);
        let mut newer = serde_json::to_value(&id).unwrap();
        newer["format_version"] = (IDENTITY_FORMAT_VERSION + 1).into();
        newer["new_field"] = "x".into();
        let err = parse_identity("/repo", &serde_json::to_vec(&newer).unwrap()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/repo")
                && msg.contains("format_version 2")
                && msg.contains("format_version 1 at most")
                && msg.contains("use a newer tidemark"),
            "{msg}"
        );
        assert_eq!(err.exit_status(), crate::error::ExitStatus::Repository);
        let err = parse_identity("/repo", br#"{"system_id": "1"}"#).unwrap_err();
        assert!(matches!(err, RepoError::BadIdentity { .. }), "{err}");
    }

    #[tokio::test]
    async fn read_identity_checks_the_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        assert_eq!(read_identity(&store).await.unwrap(), None);
        let mut newer = serde_json::to_value(Identity::new(1, "app")).unwrap();
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
}
