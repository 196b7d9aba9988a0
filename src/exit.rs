//! The command line's edge: values given on it that cannot be used ([`UsageError`], exit code
//! 2), the parsing of times and durations, the exit code of an error ([`exit_code`]: the first
//! cause in its chain that classifies itself, see [`crate::error`]) and an error as data for
//! `--json` ([`Report`]).

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

pub use crate::error::{render, split_hints, Classify, ExitStatus};
use crate::lsn::PgTimestamp;

/// A value given on the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Classify for UsageError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::Usage
    }
}

/// The exit code for an error: that of the first cause in its chain that classifies itself.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(classify)
        .unwrap_or(ExitStatus::Unexpected) as i32
}

/// The classification of one cause, if it is one of tidemark's errors.
pub fn classify(e: &(dyn std::error::Error + 'static)) -> Option<ExitStatus> {
    macro_rules! try_types {
        ($($t:ty),* $(,)?) => {
            $(if let Some(e) = e.downcast_ref::<$t>() {
                return Some(e.exit_status());
            })*
        };
    }
    try_types!(
        UsageError,
        crate::lsn::ParseLsnError,
        crate::conninfo::ConnInfoError,
        crate::tls::TlsError,
        crate::source::SourceError,
        crate::replication::ReplicationError,
        crate::store::StoreError,
        crate::crypt::CryptError,
        crate::object::ObjectError,
        crate::rekey::RekeyError,
        crate::rekey::RekeyFailed,
        crate::catalog::RepoError,
        crate::archive::ArchiveError,
        crate::lease::LeaseError,
        crate::backup::lock::LockError,
        crate::backup::BackupError,
        crate::catalog::ManifestError,
        crate::catalog::PinError,
        crate::restore::RestoreError,
        crate::pgbin::PgBinError,
        crate::segment::SegmentError,
        crate::ddl::UnexplainedSchemaChange,
        crate::verify::Damage,
        crate::verify::NothingToVerify,
    );
    None
}

/// An error as data, for `--json`: the message and its causes without their hints, the hints
/// apart (each `HINT: …` line of any of them), and the exit code.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub error: String,
    pub causes: Vec<String>,
    pub hints: Vec<String>,
    pub exit_code: i32,
}

impl Report {
    pub fn of(e: &anyhow::Error) -> Report {
        let mut hints = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        for cause in e.chain() {
            let (text, mut h) = split_hints(&cause.to_string());
            for hint in h.drain(..) {
                if !hints.contains(&hint) {
                    hints.push(hint);
                }
            }
            if !texts.iter().any(|t| t.contains(&text)) {
                texts.push(text);
            }
        }
        Report {
            error: texts.remove(0),
            causes: texts,
            hints,
            exit_code: exit_code(e),
        }
    }
}

/// Parses a duration that must be more than zero (`10s`, `1m 30s`, `500ms`).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero; give a duration above zero, e.g. 10s"
        ));
    }
    Ok(d)
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
    fn positive_durations_refuse_zero_and_keep_humantime_forms() {
        assert_eq!(
            parse_positive_duration("1m 30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_positive_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        for zero in ["0s", "0", "0ms"] {
            assert!(parse_positive_duration(zero).unwrap_err().contains("zero"));
        }
        assert!(parse_positive_duration("soon").is_err());
    }

    #[test]
    fn codes_follow_the_error_kind() {
        let e = anyhow::Error::new(crate::source::SourceError::WalLevel("replica".into()));
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::Error::new(UsageError("x".into()));
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("?")), 1);
    }

    #[test]
    fn a_report_keeps_hints_apart_from_the_message() {
        let e = anyhow::Error::new(crate::source::SourceError::WalLevel("replica".into()))
            .context("checking the source");
        let r = Report::of(&e);
        assert_eq!(r.error, "checking the source");
        assert_eq!(
            r.causes,
            ["the source server has wal_level=replica, but logical decoding needs wal_level=logical"]
        );
        assert_eq!(
            r.hints,
            ["run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"]
        );
        assert_eq!(r.exit_code, 3);
        assert_eq!(
            split_hints("a\nHINT: b\nc"),
            ("a\nc".into(), vec!["b".into()])
        );
    }

    /// One case per error variant of every module, each asserting its exit code; the wrapping
    /// cases check that a wrapped error keeps its code however deep it sits (`transparent`
    /// hides the inner error from the cause chain, so the wrapper must ask it).
    #[test]
    fn every_error_variant_has_its_exit_code() {
        use crate::archive::ArchiveError;
        use crate::backup::BackupError;
        use crate::catalog::ManifestError;
        use crate::catalog::RepoError;
        use crate::conninfo::ConnInfoError;
        use crate::crypt::envelope::OpenError;
        use crate::crypt::{CryptError, KeyId};
        use crate::lease::LeaseError;
        use crate::lsn::{Lsn, PgTimestamp};
        use crate::rekey::RekeyError;
        use crate::replication::ReplicationError;
        use crate::restore::{RestoreError, Target};
        use crate::segment::{Region, SegmentError};
        use crate::source::SourceError;
        use crate::store::StoreError;
        use ExitStatus::*;

        let open = |source| CryptError::Open {
            key: "segments/x".into(),
            source,
        };

        let pg = || "port=x".parse::<tokio_postgres::Config>().unwrap_err();
        let io = || std::io::Error::other("disk");
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        let s = String::new;
        let store_io = || StoreError::Io {
            location: s(),
            op: "put",
            key: s(),
            source: full(),
        };
        let corrupt_part = || BackupError::Corrupt {
            key: s(),
            expected: 1,
            actual: 2,
        };
        let missing_part = || {
            BackupError::Store(StoreError::NotFound {
                location: s(),
                key: s(),
            })
        };
        let undecodable = || crate::object::ObjectError::Undecodable {
            key: s(),
            codec: "test",
            detail: s(),
        };
        let cases: Vec<(&str, anyhow::Error, ExitStatus)> = vec![
            ("usage", UsageError(s()).into(), Usage),
            (
                "verify found damage",
                crate::verify::Damage {
                    location: s(),
                    count: 1,
                }
                .into(),
                Damaged,
            ),
            (
                "verify of an empty repository",
                crate::verify::NothingToVerify { location: s() }.into(),
                Repository,
            ),
            ("lsn", "x".parse::<Lsn>().unwrap_err().into(), Usage),
            ("conninfo parse", ConnInfoError::Parse(s()).into(), Usage),
            (
                "conninfo tls",
                ConnInfoError::Tls(crate::tls::TlsError::BadMode(s())).into(),
                Usage,
            ),
            (
                "tls not offered",
                crate::tls::TlsError::NotOffered {
                    host: s(),
                    mode: crate::tls::SslMode::Require,
                }
                .into(),
                Database,
            ),
            (
                "tls file",
                crate::tls::TlsError::File {
                    what: "x",
                    path: s().into(),
                    reason: s(),
                }
                .into(),
                Usage,
            ),
            (
                "tls handshake",
                crate::tls::TlsError::Handshake {
                    host: s(),
                    reason: s(),
                }
                .into(),
                Database,
            ),
            (
                "tls settings",
                crate::tls::TlsError::Settings(s()).into(),
                Usage,
            ),
            (
                "replication tls",
                ReplicationError::Tls {
                    target: s(),
                    source: crate::tls::TlsError::Settings(s()),
                }
                .into(),
                Database,
            ),
            (
                "conninfo connect",
                ConnInfoError::Connect {
                    target: s(),
                    source: pg(),
                }
                .into(),
                Database,
            ),
            (
                "source unreachable",
                SourceError::Unreachable {
                    target: s(),
                    detail: s(),
                    not_up: true,
                }
                .into(),
                Database,
            ),
            ("wal_level", SourceError::WalLevel(s()).into(), Database),
            (
                "no replication",
                SourceError::NoReplicationPrivilege(s(), s()).into(),
                Database,
            ),
            (
                "no publication",
                SourceError::NoPublication(s(), s(), s()).into(),
                Database,
            ),
            ("no slot", SourceError::NoSlot(s()).into(), Database),
            (
                "foreign slot",
                SourceError::ForeignSlot {
                    name: s(),
                    detail: s(),
                    database: s(),
                }
                .into(),
                Database,
            ),
            (
                "slot active",
                SourceError::SlotActive(s(), s()).into(),
                Database,
            ),
            (
                "no free slot",
                SourceError::NoFreeSlot { max: 1, used: 1 }.into(),
                Database,
            ),
            (
                "source query",
                SourceError::Query {
                    what: "x",
                    source: pg(),
                }
                .into(),
                Database,
            ),
            (
                "replication io",
                ReplicationError::Io {
                    target: s(),
                    source: io(),
                }
                .into(),
                Database,
            ),
            (
                "replication protocol",
                ReplicationError::Protocol(s()).into(),
                Database,
            ),
            (
                "replication auth",
                ReplicationError::Auth {
                    method: "x",
                    message: s(),
                }
                .into(),
                Database,
            ),
            (
                "replication server",
                ReplicationError::Server {
                    severity: s(),
                    code: s(),
                    message: s(),
                    detail: None,
                    hint: None,
                }
                .into(),
                Database,
            ),
            (
                "replication auth method",
                ReplicationError::UnsupportedAuth(s()).into(),
                Database,
            ),
            (
                "store not found",
                StoreError::NotFound {
                    location: s(),
                    key: s(),
                }
                .into(),
                Repository,
            ),
            (
                "store conflict",
                StoreError::Conflict {
                    location: s(),
                    key: s(),
                    existing: 1,
                    new: 2,
                }
                .into(),
                Repository,
            ),
            ("store full", store_io().into(), Repository),
            (
                "store remote",
                StoreError::Remote {
                    location: s(),
                    op: "put",
                    key: s(),
                    message: s(),
                    retryable: false,
                }
                .into(),
                Repository,
            ),
            (
                "store not writable",
                StoreError::NotWritable {
                    location: s(),
                    source: io(),
                }
                .into(),
                Repository,
            ),
            ("store url", StoreError::InvalidUrl(s()).into(), Usage),
            (
                "store classes",
                StoreError::NoStorageClasses {
                    location: s(),
                    what: s(),
                }
                .into(),
                Usage,
            ),
            (
                "keyring unreadable",
                CryptError::ReadKeyring {
                    path: "k".into(),
                    source: io(),
                }
                .into(),
                Usage,
            ),
            (
                "keyring invalid",
                CryptError::BadKeyring {
                    path: "k".into(),
                    detail: s(),
                }
                .into(),
                Usage,
            ),
            (
                "keyring exists",
                CryptError::KeyringExists { path: "k".into() }.into(),
                Usage,
            ),
            (
                "rekey: key missing",
                RekeyError::KeyMissing {
                    object: s(),
                    key_id: s(),
                }
                .into(),
                Usage,
            ),
            (
                "rekey: damaged header",
                RekeyError::Damaged {
                    object: s(),
                    detail: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "rekey: still written",
                RekeyError::StillWritten {
                    passes: 4,
                    example: s(),
                }
                .into(),
                Repository,
            ),
            (
                "rekey: store",
                RekeyError::Store(store_io()).into(),
                Repository,
            ),
            (
                "rekey: incomplete, as its first failure",
                RekeyError::Incomplete {
                    failed: 2,
                    first: Box::new(RekeyError::Damaged {
                        object: s(),
                        detail: s(),
                    }),
                }
                .into(),
                Damaged,
            ),
            (
                "rekey failed, with its summary",
                crate::rekey::RekeyFailed {
                    summary: Default::default(),
                    error: RekeyError::KeyMissing {
                        object: s(),
                        key_id: s(),
                    },
                }
                .into(),
                Usage,
            ),
            (
                "retire: still needed",
                RekeyError::StillNeeded {
                    key_id: s(),
                    count: 1,
                    example: s(),
                }
                .into(),
                Usage,
            ),
            (
                "retire: stored meanwhile",
                RekeyError::StoredMeanwhile {
                    key_id: s(),
                    count: 1,
                    example: s(),
                }
                .into(),
                Usage,
            ),
            (
                "retire: unchecked",
                RekeyError::RetireUnchecked { key_id: s() }.into(),
                Usage,
            ),
            (
                "retire: current",
                RekeyError::NotRetirable {
                    key_id: s(),
                    why: "it writes",
                }
                .into(),
                Usage,
            ),
            (
                "keyring unwritable",
                CryptError::WriteKeyring {
                    path: "k".into(),
                    source: io(),
                }
                .into(),
                Unexpected,
            ),
            (
                "keyring needed",
                CryptError::KeyringNeeded {
                    location: s(),
                    first_key: s(),
                }
                .into(),
                Usage,
            ),
            (
                "repository not encrypted",
                CryptError::NotEncrypted { location: s() }.into(),
                Usage,
            ),
            (
                "object key unknown",
                crate::object::ObjectError::from(open(OpenError::UnknownKey(KeyId([1; 8])))).into(),
                Usage,
            ),
            (
                "object of a newer envelope",
                open(OpenError::Version(9)).into(),
                Repository,
            ),
            (
                "object not an envelope",
                open(OpenError::NotEnvelope).into(),
                Damaged,
            ),
            (
                "object malformed",
                open(OpenError::Malformed(s())).into(),
                Damaged,
            ),
            (
                "object key does not authenticate",
                RepoError::Object(open(OpenError::WrappedKey(KeyId([1; 8]))).into()).into(),
                Damaged,
            ),
            (
                "object chunk does not authenticate",
                open(OpenError::Chunk { index: 0, count: 1 }).into(),
                Damaged,
            ),
            (
                "repo store",
                RepoError::Store(store_io()).into(),
                Repository,
            ),
            (
                "repo identity",
                RepoError::BadIdentity {
                    location: s(),
                    detail: s(),
                }
                .into(),
                Repository,
            ),
            ("object undecodable", undecodable().into(), Damaged),
            (
                "repo undecodable object",
                RepoError::from(undecodable()).into(),
                Damaged,
            ),
            (
                "manifest undecodable",
                ManifestError::from(undecodable()).into(),
                Damaged,
            ),
            (
                "backup part undecodable",
                BackupError::from(undecodable()).into(),
                Damaged,
            ),
            (
                "restore segment undecodable",
                RestoreError::from(undecodable()).into(),
                Damaged,
            ),
            (
                "repo compression mismatch",
                RepoError::CompressionMismatch {
                    location: s(),
                    recorded: crate::segment::Compression::Lz4,
                    asked: crate::segment::Compression::Zstd,
                }
                .into(),
                Usage,
            ),
            (
                "repo newer format",
                RepoError::NewerFormat {
                    location: s(),
                    found: 2,
                }
                .into(),
                Repository,
            ),
            (
                "repo wrong source",
                RepoError::WrongSource {
                    location: s(),
                    repo_system: s(),
                    repo_db: s(),
                    src_system: s(),
                    src_db: s(),
                }
                .into(),
                Repository,
            ),
            (
                "repo broken",
                RepoError::Broken {
                    generation: 1,
                    prev: s(),
                    prev_end: Lsn(1),
                    next: s(),
                    next_start: Lsn(2),
                    kind: "gap",
                }
                .into(),
                Damaged,
            ),
            (
                "manifest invalid",
                ManifestError::Invalid {
                    key: s(),
                    message: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "manifest version",
                ManifestError::UnsupportedVersion { key: s(), found: 9 }.into(),
                Repository,
            ),
            (
                "manifest of another backup",
                ManifestError::OtherBackup {
                    key: s(),
                    named: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "manifest store full",
                ManifestError::Store(store_io()).into(),
                Repository,
            ),
            (
                "backup store full",
                BackupError::Store(store_io()).into(),
                Repository,
            ),
            ("backup missing part", missing_part().into(), Repository),
            (
                "backup connect",
                BackupError::Connect(ConnInfoError::Parse(s())).into(),
                Usage,
            ),
            (
                "backup postgres",
                BackupError::Postgres {
                    context: s(),
                    source: pg(),
                }
                .into(),
                Database,
            ),
            (
                "backup tools",
                BackupError::PgBin(crate::pgbin::PgBinError::NotFound {
                    program: s(),
                    min_major: None,
                    looked: vec![],
                    rejected: vec![],
                })
                .into(),
                Database,
            ),
            (
                "backup tool failed",
                BackupError::Tool {
                    program: s(),
                    status: s(),
                    stderr: s(),
                }
                .into(),
                Database,
            ),
            (
                "backup local io",
                BackupError::Io {
                    context: s(),
                    source: io(),
                }
                .into(),
                Unexpected,
            ),
            ("backup corrupt part", corrupt_part().into(), Damaged),
            (
                "backup bad object",
                BackupError::BadObject {
                    key: s(),
                    message: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "backup exists",
                BackupError::Exists {
                    location: s(),
                    id: s(),
                }
                .into(),
                Repository,
            ),
            (
                "backup no publication",
                BackupError::NoPublication {
                    publication: s(),
                    database: s(),
                }
                .into(),
                Database,
            ),
            (
                "archive source",
                ArchiveError::Source(SourceError::NoSlot(s())).into(),
                Database,
            ),
            (
                "archive replication",
                ArchiveError::Replication(ReplicationError::Protocol(s())).into(),
                Database,
            ),
            (
                "archive repo",
                ArchiveError::Repo(RepoError::Store(store_io())).into(),
                Repository,
            ),
            (
                "archive upload",
                ArchiveError::Upload {
                    range: s(),
                    source: store_io(),
                }
                .into(),
                Repository,
            ),
            (
                "archive: key retired before the segment was stored",
                ArchiveError::KeyRetired {
                    range: s(),
                    key_id: s(),
                }
                .into(),
                Usage,
            ),
            (
                "archive store",
                ArchiveError::Store(store_io()).into(),
                Repository,
            ),
            (
                "archive backup store full",
                ArchiveError::Backup(BackupError::Store(store_io())).into(),
                Repository,
            ),
            (
                "archive gap",
                ArchiveError::Gap {
                    slot: s(),
                    confirmed: Lsn(2),
                    archive_end: Lsn(1),
                    generation: 1,
                }
                .into(),
                Damaged,
            ),
            (
                "archive decode",
                ArchiveError::Decode {
                    lsn: Lsn(1),
                    detail: s(),
                }
                .into(),
                Unexpected,
            ),
            (
                "archive stream ended",
                ArchiveError::StreamEnded.into(),
                Database,
            ),
            (
                "archive schema change",
                ArchiveError::SchemaChange(crate::ddl::UnexplainedSchemaChange {
                    table: s(),
                    before: s(),
                    after: s(),
                    lsn: s(),
                })
                .into(),
                Database,
            ),
            (
                "archive internal",
                ArchiveError::Internal(s()).into(),
                Unexpected,
            ),
            (
                "archive lease held",
                ArchiveError::Lease(LeaseError::Lost {
                    location: s(),
                    term: 1,
                    by: s(),
                })
                .into(),
                Repository,
            ),
            (
                "lease expired",
                LeaseError::Expired {
                    location: s(),
                    term: 1,
                    expired: PgTimestamp::default(),
                }
                .into(),
                Repository,
            ),
            (
                "lease too late",
                LeaseError::TooLate {
                    location: s(),
                    term: 1,
                    until: PgTimestamp::default(),
                    expires: PgTimestamp::default(),
                }
                .into(),
                Repository,
            ),
            (
                "lease foreign segment",
                LeaseError::Foreign {
                    location: s(),
                    key: s(),
                    generation: 1,
                }
                .into(),
                Repository,
            ),
            (
                "lease not contiguous",
                LeaseError::NotContiguous {
                    location: s(),
                    key: s(),
                    expected: Lsn(1),
                }
                .into(),
                Repository,
            ),
            (
                "lease bad record",
                LeaseError::BadRecord {
                    location: s(),
                    key: s(),
                    detail: s(),
                }
                .into(),
                Repository,
            ),
            (
                "lease store",
                LeaseError::Store(store_io()).into(),
                Repository,
            ),
            (
                "backup lock held",
                ArchiveError::BackupLock(crate::backup::lock::LockError::Held {
                    location: s(),
                    key: s(),
                    holder: Box::new(crate::lease::LeaseRecord {
                        format_version: 1,
                        term: 1,
                        seq: 0,
                        owner: s(),
                        host: s(),
                        pid: 1,
                        slot: s(),
                        acquired_at: PgTimestamp::default(),
                        expires_at: PgTimestamp::default(),
                        released: false,
                        writer: None,
                    }),
                    waited: std::time::Duration::ZERO,
                })
                .into(),
                Repository,
            ),
            (
                "backup lock store",
                crate::backup::lock::LockError::Lease(LeaseError::Store(StoreError::NotFound {
                    location: s(),
                    key: s(),
                }))
                .into(),
                Repository,
            ),
            ("restore empty", RestoreError::Empty(s()).into(), Repository),
            (
                "restore cold",
                RestoreError::Cold {
                    backup: s(),
                    location: s(),
                    count: 1,
                    listed: s(),
                    command: s(),
                }
                .into(),
                Repository,
            ),
            (
                "restore out of range",
                RestoreError::OutOfRange {
                    target: Target::Latest,
                    covered: s(),
                    windows: s(),
                    hint: s(),
                }
                .into(),
                OutOfRange,
            ),
            (
                "restore unknown backup",
                RestoreError::UnknownBackup {
                    location: s(),
                    id: s(),
                    known: s(),
                }
                .into(),
                OutOfRange,
            ),
            (
                "pin store",
                crate::catalog::PinError::Store(store_io()).into(),
                Repository,
            ),
            (
                "pin no backup",
                crate::catalog::PinError::NoBackup {
                    location: s(),
                    id: s(),
                }
                .into(),
                Usage,
            ),
            (
                "unpin not pinned",
                crate::catalog::PinError::NotPinned {
                    location: s(),
                    id: s(),
                    key: s(),
                }
                .into(),
                Usage,
            ),
            (
                "restore not empty",
                RestoreError::TargetNotEmpty(s(), s()).into(),
                Database,
            ),
            (
                "restore corrupt segment",
                RestoreError::Corrupt {
                    range: s(),
                    start: Lsn(1),
                    detail: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "restore repo",
                RestoreError::Repo(RepoError::Broken {
                    generation: 1,
                    prev: s(),
                    prev_end: Lsn(1),
                    next: s(),
                    next_start: Lsn(2),
                    kind: "gap",
                })
                .into(),
                Damaged,
            ),
            (
                "restore store",
                RestoreError::Store(store_io()).into(),
                Repository,
            ),
            (
                "restore corrupt part",
                RestoreError::Backup(corrupt_part()).into(),
                Damaged,
            ),
            (
                "restore missing part",
                RestoreError::Backup(missing_part()).into(),
                Repository,
            ),
            (
                "restore target connect",
                RestoreError::TargetConnect(ConnInfoError::Connect {
                    target: s(),
                    source: pg(),
                })
                .into(),
                Database,
            ),
            (
                "restore target query",
                RestoreError::TargetQuery {
                    what: s(),
                    source: pg(),
                }
                .into(),
                Database,
            ),
            (
                "restore local",
                RestoreError::Local {
                    what: s(),
                    detail: s(),
                }
                .into(),
                Unexpected,
            ),
            (
                "restore replay",
                RestoreError::Replay {
                    commit_lsn: Lsn(1),
                    commit_time: PgTimestamp::default(),
                    detail: s(),
                }
                .into(),
                Database,
            ),
            (
                "segment version",
                SegmentError::UnsupportedVersion {
                    found: 9,
                    supported: 3,
                }
                .into(),
                Repository,
            ),
            (
                "segment flags",
                SegmentError::UnknownFlags { found: 1, known: 0 }.into(),
                Repository,
            ),
            (
                "segment magic",
                SegmentError::BadMagic {
                    expected: [0; 8],
                    found: vec![],
                }
                .into(),
                Damaged,
            ),
            (
                "segment short",
                SegmentError::TooShort { len: 1, min: 2 }.into(),
                Damaged,
            ),
            (
                "segment footer",
                SegmentError::MissingFooter {
                    offset: 0,
                    expected: [0; 8],
                    found: vec![],
                }
                .into(),
                Damaged,
            ),
            (
                "segment crc",
                SegmentError::Checksum {
                    region: Region::File,
                    offset: 0,
                    expected: 1,
                    actual: 2,
                }
                .into(),
                Damaged,
            ),
            (
                "segment data crc",
                SegmentError::DataChecksum {
                    block: 0,
                    offset: 0,
                    expected: 1,
                    actual: 2,
                }
                .into(),
                Damaged,
            ),
            (
                "segment decompress",
                SegmentError::Decompress {
                    block: 0,
                    offset: 0,
                    codec: "zstd",
                    detail: s(),
                }
                .into(),
                Damaged,
            ),
            (
                "segment malformed",
                SegmentError::Malformed {
                    region: Region::Block(0),
                    offset: 0,
                    detail: s(),
                }
                .into(),
                Damaged,
            ),
            ("anything else", anyhow::anyhow!("?"), Unexpected),
        ];
        for (name, e, want) in cases {
            assert_eq!(exit_code(&e), want as i32, "{name}: {}", render(&e));
            // Context added on top never changes the code.
            let e = e.context("while doing something");
            assert_eq!(exit_code(&e), want as i32, "{name} with context");
        }
    }
}
