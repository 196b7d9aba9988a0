//! Exit codes and the rendering of errors at the command line's edge.
//!
//! The codes are stable (scripts and alert rules may depend on them):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | unexpected error |
//! | 2 | usage error (bad flag or value) |
//! | 3 | source or target database: unreachable, misconfigured, missing slot or publication, target not empty |
//! | 4 | repository: not writable, belongs to another database, storage error |
//! | 5 | archive damaged or incomplete: corrupt segment, gap in the chain |
//! | 6 | restore target outside what the archive covers |
//! | 130 | aborted by a second signal |

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::archive::ArchiveError;
use crate::conninfo::ConnInfoError;
use crate::lsn::PgTimestamp;
use crate::restore::RestoreError;
use crate::source::SourceError;
use crate::store::StoreError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitStatus {
    Unexpected = 1,
    Usage = 2,
    Database = 3,
    Repository = 4,
    Damaged = 5,
    OutOfRange = 6,
    Aborted = 130,
}

/// A value given on the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(code) = code_of(cause) {
            return code as i32;
        }
    }
    ExitStatus::Unexpected as i32
}

fn code_of(e: &(dyn std::error::Error + 'static)) -> Option<ExitStatus> {
    use ExitStatus::*;
    if e.is::<UsageError>() || e.is::<crate::lsn::ParseLsnError>() {
        return Some(Usage);
    }
    if let Some(e) = e.downcast_ref::<ConnInfoError>() {
        return Some(match e {
            ConnInfoError::Parse(_) | ConnInfoError::TlsUnsupported(_) => Usage,
            ConnInfoError::Connect { .. } => Database,
        });
    }
    if e.is::<SourceError>() || e.is::<crate::replication::ReplicationError>() {
        return Some(Database);
    }
    if let Some(e) = e.downcast_ref::<StoreError>() {
        return Some(match e {
            StoreError::InvalidUrl(_) => Usage,
            _ => Repository,
        });
    }
    if let Some(e) = e.downcast_ref::<crate::repo::RepoError>() {
        return Some(match e {
            crate::repo::RepoError::Broken { .. } => Damaged,
            crate::repo::RepoError::Store(_) => Repository,
            _ => Repository,
        });
    }
    if let Some(e) = e.downcast_ref::<ArchiveError>() {
        return match e {
            ArchiveError::Source(s) => code_of(s),
            ArchiveError::Repo(r) => code_of(r),
            ArchiveError::Store(s) | ArchiveError::Upload { source: s, .. } => code_of(s),
            ArchiveError::Replication(_) => Some(Database),
            ArchiveError::Gap { .. } => Some(Damaged),
            ArchiveError::SchemaChange(_) => Some(Database),
            _ => None,
        };
    }
    if let Some(e) = e.downcast_ref::<RestoreError>() {
        return match e {
            RestoreError::OutOfRange { .. } => Some(OutOfRange),
            RestoreError::Corrupt { .. } => Some(Damaged),
            RestoreError::Empty(_) => Some(Repository),
            RestoreError::TargetNotEmpty(..) | RestoreError::Target(_) => Some(Database),
            RestoreError::Repo(r) => code_of(r),
            RestoreError::Store(s) => code_of(s),
            _ => None,
        };
    }
    None
}

/// The error's message followed by its causes, each once.
pub fn render(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let s = cause.to_string();
        if !out.contains(&s) {
            out.push_str("\n  caused by: ");
            out.push_str(&s);
        }
    }
    out
}

/// Parses a restore target time: RFC 3339, or `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM]]` as
/// PostgreSQL prints timestamptz; without a zone the time is UTC.
pub fn parse_time(s: &str) -> Result<PgTimestamp, UsageError> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(PgTimestamp::from_datetime(d.with_timezone(&Utc)));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, fmt) {
            return Ok(PgTimestamp::from_datetime(d.with_timezone(&Utc)));
        }
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(PgTimestamp::from_datetime(d.and_utc()));
        }
    }
    Err(UsageError(format!(
        "--to-time {s:?} is not a timestamp; use e.g. \"2026-11-28 14:03:07.25+00\" or 2026-11-28T14:03:07Z"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times_parse_in_postgres_and_rfc3339_forms() {
        let a = parse_time("2026-11-28 14:03:07.25+00").unwrap();
        let b = parse_time("2026-11-28T14:03:07.250Z").unwrap();
        let c = parse_time("2026-11-28 15:03:07.25+01:00").unwrap();
        let d = parse_time("2026-11-28 14:03:07.25").unwrap();
        assert!(a == b && b == c && c == d);
        assert_eq!(a.to_string(), "2026-11-28 14:03:07.250000+00");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn codes_follow_the_error_kind() {
        let e = anyhow::Error::new(SourceError::WalLevel("replica".into()));
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::Error::new(UsageError("x".into()));
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("?")), 1);
    }
}
