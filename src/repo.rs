//! The repository: one archive of one database, and the views over its objects.
//!
//! Owns the identity object (`archive.json`: which cluster and database this archive belongs
//! to), and the reading of segment chains from a listing. A repository holds one or more
//! *generations*: a generation is an unbroken chain of segments that starts at a base backup's
//! stream position. A lost or recreated slot starts a new generation (with a new base backup);
//! progress of two generations is never mixed.
//!
//! Invariant checked here: within a generation, each segment starts exactly where the previous
//! one ended. A gap or an overlap is an error naming both segments, never skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::catalog::keys;
use crate::lsn::{Lsn, PgTimestamp};
use crate::object;
use crate::store::{Store, StoreError};

/// Key of the identity object.
pub const IDENTITY_KEY: &str = keys::IDENTITY;
/// Prefix of all segment objects.
pub const SEGMENTS_PREFIX: &str = keys::SEGMENTS;

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

/// Errors about the repository's content.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
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
            RepoError::BadIdentity { .. }
            | RepoError::NewerFormat { .. }
            | RepoError::WrongSource { .. } => Repository,
            RepoError::Broken { .. } => Damaged,
        }
    }
}

/// A segment as its object name describes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentRef {
    pub generation: u32,
    pub start: Lsn,
    pub end: Lsn,
    pub key: String,
    pub size: u64,
}

impl SegmentRef {
    /// `0/16B3748-0/16C0000`, for messages.
    pub fn range(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }
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

/// Lists every segment of the repository, grouped by generation, each chain sorted by LSN.
pub async fn list_segments(
    store: &Arc<dyn Store>,
) -> Result<BTreeMap<u32, Vec<SegmentRef>>, RepoError> {
    let objects = store.list(SEGMENTS_PREFIX).await?;
    Ok(group_segments(objects.into_iter().map(|o| (o.key, o.size))))
}

/// Groups segment object names by generation; names that are not segments are ignored. Of
/// several revisions of one segment (same generation and range), the highest is used and the
/// others are ignored (`proto/layout.md`, "Revisions").
pub fn group_segments(
    objects: impl IntoIterator<Item = (String, u64)>,
) -> BTreeMap<u32, Vec<SegmentRef>> {
    let mut newest: BTreeMap<(u32, Lsn, Lsn), (keys::Revision, String, u64)> = BTreeMap::new();
    for (key, size) in objects {
        let Some(k) = keys::parse_segment(&key) else {
            continue;
        };
        let slot = (k.generation, k.start, k.end);
        if newest.get(&slot).is_none_or(|(r, _, _)| k.revision > *r) {
            newest.insert(slot, (k.revision, key, size));
        }
    }
    let mut out: BTreeMap<u32, Vec<SegmentRef>> = BTreeMap::new();
    // Sorted by (generation, start, end): each chain comes out sorted.
    for ((generation, start, end), (_, key, size)) in newest {
        out.entry(generation).or_default().push(SegmentRef {
            generation,
            start,
            end,
            key,
            size,
        });
    }
    out
}

/// Checks the continuity of one generation's chain and returns its end, if any.
pub fn check_chain(chain: &[SegmentRef]) -> Result<Option<Lsn>, RepoError> {
    for w in chain.windows(2) {
        let (prev, next) = (&w[0], &w[1]);
        if next.start != prev.end {
            return Err(RepoError::Broken {
                generation: prev.generation,
                prev: prev.range(),
                prev_end: prev.end,
                next: next.range(),
                next_start: next.start,
                kind: if next.start > prev.end {
                    "gap"
                } else {
                    "overlap"
                },
            });
        }
    }
    Ok(chain.last().map(|s| s.end))
}

/// A hole in one generation's chain: no segment covers `from..to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hole {
    pub generation: u32,
    /// The end of the segment before the hole.
    pub from: Lsn,
    /// The start of the segment after it.
    pub to: Lsn,
    /// The index, in the chain, of the segment after the hole.
    pub next: usize,
}

impl Hole {
    /// `0/16B3748-0/16C0000`, for messages.
    pub fn range(&self) -> String {
        format!("{}-{}", self.from, self.to)
    }
}

/// The holes of one generation's chain (sorted by LSN), in LSN order. Unlike [`check_chain`] a
/// hole is not an error here; an overlap still is (two writers).
pub fn chain_holes(chain: &[SegmentRef]) -> Result<Vec<Hole>, RepoError> {
    let mut holes = Vec::new();
    for (i, w) in chain.windows(2).enumerate() {
        let (prev, next) = (&w[0], &w[1]);
        if next.start > prev.end {
            holes.push(Hole {
                generation: prev.generation,
                from: prev.end,
                to: next.start,
                next: i + 1,
            });
        } else if next.start < prev.end {
            return Err(RepoError::Broken {
                generation: prev.generation,
                prev: prev.range(),
                prev_end: prev.end,
                next: next.range(),
                next_start: next.start,
                kind: "overlap",
            });
        }
    }
    Ok(holes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(g: u32, s: u64, e: u64) -> (String, u64) {
        (keys::segment(g, Lsn(s), Lsn(e)), 10)
    }

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

    #[test]
    fn the_highest_revision_of_a_segment_wins() {
        let rev = |g, s, e, r, size| (keys::segment_revision(g, Lsn(s), Lsn(e), r), size);
        // Listed in any order: a rewrite (r2, r3) replaces the original, whatever sorts first.
        let groups = group_segments([
            rev(1, 0x200, 0x300, 3, 33),
            seg(1, 0x100, 0x200),
            rev(1, 0x200, 0x300, 1, 11),
            rev(1, 0x100, 0x200, 2, 22),
            rev(1, 0x200, 0x300, 2, 22),
            rev(2, 0x200, 0x300, 1, 44),
        ]);
        let chain: Vec<(String, u64)> =
            groups[&1].iter().map(|s| (s.key.clone(), s.size)).collect();
        assert_eq!(
            chain,
            [rev(1, 0x100, 0x200, 2, 22), rev(1, 0x200, 0x300, 3, 33)]
        );
        assert_eq!(check_chain(&groups[&1]).unwrap(), Some(Lsn(0x300)));
        assert_eq!(groups[&2].len(), 1, "generations do not mix revisions");
        assert_eq!(groups[&2][0].size, 44);
    }

    #[test]
    fn chains_group_by_generation_and_check_continuity() {
        let groups = group_segments([
            seg(1, 0x200, 0x300),
            seg(1, 0x100, 0x200),
            seg(2, 0x900, 0xA00),
            ("basebackups/x".into(), 1),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(check_chain(&groups[&1]).unwrap(), Some(Lsn(0x300)));
        let groups = group_segments([seg(1, 0x100, 0x200), seg(1, 0x250, 0x300)]);
        let err = check_chain(&groups[&1]).unwrap_err().to_string();
        assert!(
            err.contains("gap") && err.contains("0/200") && err.contains("0/250"),
            "{err}"
        );
        let groups = group_segments([seg(1, 0x100, 0x200), seg(1, 0x150, 0x300)]);
        assert!(check_chain(&groups[&1])
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        assert_eq!(check_chain(&[]).unwrap(), None);
    }

    #[test]
    fn chain_holes_lists_gaps_and_refuses_overlaps() {
        let groups = group_segments([
            seg(1, 0x100, 0x200),
            seg(1, 0x200, 0x300),
            seg(1, 0x380, 0x400),
            seg(1, 0x500, 0x600),
        ]);
        let holes = chain_holes(&groups[&1]).unwrap();
        assert_eq!(
            holes,
            [
                Hole {
                    generation: 1,
                    from: Lsn(0x300),
                    to: Lsn(0x380),
                    next: 2
                },
                Hole {
                    generation: 1,
                    from: Lsn(0x400),
                    to: Lsn(0x500),
                    next: 3
                },
            ]
        );
        assert_eq!(holes[0].range(), "0/300-0/380");
        let whole = group_segments([seg(1, 0x100, 0x200), seg(1, 0x200, 0x300)]);
        assert!(chain_holes(&whole[&1]).unwrap().is_empty());
        assert!(chain_holes(&[]).unwrap().is_empty());
        let overlap = group_segments([seg(1, 0x100, 0x200), seg(1, 0x150, 0x300)]);
        let err = chain_holes(&overlap[&1]).unwrap_err().to_string();
        assert!(err.contains("overlap") && err.contains("0/150"), "{err}");
    }
}
