//! Errors about the repository's content: its identity, and the continuity of its segment
//! chains.

use super::identity::{IDENTITY_FORMAT_VERSION, IDENTITY_KEY};
use crate::lsn::Lsn;
use crate::object::ObjectError;
use crate::segment::Compression;
use crate::store::StoreError;

/// Errors about the repository's content.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object that does not decode (an [`ObjectError`] of the store converts to
    /// [`RepoError::Store`]).
    #[error(transparent)]
    Object(ObjectError),
    #[error("repository {location} records compression {recorded} in {IDENTITY_KEY}, but --compression {asked} was given: a repository keeps the compression it was created with\nHINT: omit --compression (and TIDEMARK_COMPRESSION) to write {recorded}, as this repository does, or archive to a new --repo to use {asked}")]
    CompressionMismatch {
        location: String,
        recorded: Compression,
        asked: Compression,
    },
    #[error("repository {location}: {IDENTITY_KEY} is not valid: {detail}")]
    BadIdentity { location: String, detail: String },
    #[error("repository {location}: {IDENTITY_KEY} has format_version {found}, but this build of tidemark reads format_version {IDENTITY_FORMAT_VERSION} at most: the repository was written by a newer tidemark; use a newer tidemark")]
    NewerFormat { location: String, found: u64 },
    #[error("repository {location} archives database {repo_db:?} of cluster {repo_system}, but the source is database {src_db:?} of cluster {src_system}; use another --repo for this source")]
    WrongSource {
        location: String,
        repo_system: String,
        repo_db: String,
        src_system: String,
        src_db: String,
    },
    #[error("segment chain of generation {generation} is broken: {prev} ends at {prev_end} but the next segment {next} starts at {next_start}; the archive has a {kind} there")]
    Broken {
        generation: u32,
        prev: String,
        prev_end: Lsn,
        next: String,
        next_start: Lsn,
        kind: &'static str,
    },
}

impl crate::error::Classify for RepoError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            RepoError::Store(e) => e.exit_status(),
            RepoError::Object(e) => e.exit_status(),
            RepoError::CompressionMismatch { .. } => Usage,
            RepoError::BadIdentity { .. }
            | RepoError::NewerFormat { .. }
            | RepoError::WrongSource { .. } => Repository,
            RepoError::Broken { .. } => Damaged,
        }
    }
}

impl From<ObjectError> for RepoError {
    fn from(e: ObjectError) -> RepoError {
        match e {
            ObjectError::Store(e) => RepoError::Store(e),
            e => RepoError::Object(e),
        }
    }
}
