//! Errors of the encryption layer: the keyring file, and objects that do not open.

use std::path::PathBuf;

use super::envelope::OpenError;

/// Errors of the keyring and the envelope.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("cannot read the keyring {}: {source}\nHINT: --encryption-key-file (TIDEMARK_ENCRYPTION_KEY_FILE) must name a keyring made by `tidemark keys generate`", path.display())]
    ReadKeyring {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the keyring {} is not valid: {detail}", path.display())]
    BadKeyring { path: PathBuf, detail: String },
    #[error("the keyring {} already exists; `keys generate` never replaces a keyring (its keys may still open objects)\nHINT: add a key to it with `tidemark keys add --keyring {}`, or pass another --out", path.display(), path.display())]
    KeyringExists { path: PathBuf },
    #[error("cannot write the keyring {}: {source}", path.display())]
    WriteKeyring {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object {key}: {source}{}", open_hint(source))]
    Open {
        key: String,
        #[source]
        source: OpenError,
    },
    #[error("repository {location} is encrypted (with key {first_key} at first), but no keyring was given\nHINT: pass --encryption-key-file FILE (or TIDEMARK_ENCRYPTION_KEY_FILE) with the repository's keyring")]
    KeyringNeeded { location: String, first_key: String },
    #[error("repository {location} is not encrypted, but a keyring was given\nHINT: drop --encryption-key-file (and TIDEMARK_ENCRYPTION_KEY_FILE) for this repository; an archive is encrypted from its first object or not at all")]
    NotEncrypted { location: String },
}

fn open_hint(e: &OpenError) -> &'static str {
    match e {
        OpenError::UnknownKey(_) => "\nHINT: pass a keyring that holds this key (`tidemark keys list --keyring FILE` shows a keyring's ids); a key is retired only after `tidemark rekey` moved every object off it",
        OpenError::WrappedKey(_) | OpenError::Chunk { .. } | OpenError::Malformed(_) => {
            ": the object is damaged, truncated, reordered, or was stored under another name"
        }
        OpenError::NotEnvelope | OpenError::Version(_) => "",
    }
}

impl crate::error::Classify for CryptError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            CryptError::ReadKeyring { .. }
            | CryptError::BadKeyring { .. }
            | CryptError::KeyringExists { .. }
            | CryptError::KeyringNeeded { .. }
            | CryptError::NotEncrypted { .. } => Usage,
            CryptError::WriteKeyring { .. } => Unexpected,
            CryptError::Open { source, .. } => match source {
                OpenError::UnknownKey(_) => Usage,
                OpenError::Version(_) => Repository,
                OpenError::NotEnvelope
                | OpenError::Malformed(_)
                | OpenError::WrappedKey(_)
                | OpenError::Chunk { .. } => Damaged,
            },
        }
    }
}

impl CryptError {
    /// The key id an object names that the keyring lacks, if that is the error.
    pub fn missing_key(&self) -> Option<super::KeyId> {
        match self {
            CryptError::Open {
                source: OpenError::UnknownKey(id),
                ..
            } => Some(*id),
            _ => None,
        }
    }

    /// Whether the error says an object's bytes are damaged (as opposed to a missing key).
    pub fn is_damage(&self) -> bool {
        use crate::error::Classify;
        matches!(self, CryptError::Open { .. })
            && self.exit_status() == crate::error::ExitStatus::Damaged
    }
}
