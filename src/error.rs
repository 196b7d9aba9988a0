//! One error classification: which exit code each error of every module means.
//!
//! Every module error implements [`Classify`] with a `match` that names each of its variants
//! (no catch-all arm), so a new variant cannot be added without deciding its code; an error that
//! wraps another (`#[error(transparent)]`, `#[from]`) asks the inner one. [`exit_code`] walks an
//! error's chain and takes the first cause that classifies itself. The codes are stable (scripts
//! and alert rules depend on them; README's "Exit codes" mirrors this table):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | unexpected error, or a local failure (temporary folder, local disk) |
//! | 2 | usage error (bad flag or value) |
//! | 3 | source or target database: unreachable, misconfigured, missing slot or publication, target not empty, missing privilege |
//! | 4 | repository: not writable, full, belongs to another database, storage error |
//! | 5 | archive damaged or incomplete: corrupt object, gap in the chain |
//! | 6 | restore target outside what the archive covers |
//! | 130 | aborted by a second signal |
//!
//! Also here: [`render`] (an error and its causes, each once) and the two helpers that put a
//! cause chain ([`chain`]) or a PostgreSQL client error ([`describe_pg`]) into words.

/// An exit code of the table above.
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

/// An error that knows its exit code.
pub trait Classify {
    fn exit_status(&self) -> ExitStatus;
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
        crate::exit::UsageError,
        crate::lsn::ParseLsnError,
        crate::conninfo::ConnInfoError,
        crate::source::SourceError,
        crate::replication::ReplicationError,
        crate::store::StoreError,
        crate::repo::RepoError,
        crate::archive::ArchiveError,
        crate::archive::lease::LeaseError,
        crate::backup::BackupError,
        crate::backup::ManifestError,
        crate::restore::RestoreError,
        crate::pgbin::PgBinError,
        crate::segment::SegmentError,
        crate::ddl::UnexplainedSchemaChange,
    );
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

/// A message without its `HINT: …` lines, and those hints (without the prefix).
pub fn split_hints(message: &str) -> (String, Vec<String>) {
    let mut text = Vec::new();
    let mut hints = Vec::new();
    for line in message.lines() {
        match line.trim_start().strip_prefix("HINT:") {
            Some(h) => hints.push(h.trim().to_string()),
            None => text.push(line),
        }
    }
    (text.join("\n"), hints)
}

/// An error and its causes on one line, `a: b: c`, each cause once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// A PostgreSQL client error in words: the server's own message when the server sent one
/// (`ERROR: permission denied for schema public`, with its DETAIL and HINT), else the cause the
/// client library keeps apart from its one-word summary ("db error", "invalid connection
/// string").
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.to_string(),
        None => chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_keep_their_cause() {
        let e = "port=notaport"
            .parse::<tokio_postgres::Config>()
            .unwrap_err();
        assert_eq!(e.to_string(), "invalid connection string");
        assert_eq!(
            describe_pg(&e),
            "invalid connection string: invalid value for option `port`"
        );
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
        use crate::archive::lease::LeaseError;
        use crate::archive::ArchiveError;
        use crate::backup::{BackupError, ManifestError};
        use crate::conninfo::ConnInfoError;
        use crate::lsn::{Lsn, PgTimestamp};
        use crate::replication::ReplicationError;
        use crate::repo::RepoError;
        use crate::restore::{RestoreError, Target};
        use crate::segment::{Region, SegmentError};
        use crate::source::SourceError;
        use crate::store::StoreError;
        use ExitStatus::*;

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
        let bad_manifest = || {
            BackupError::Manifest(ManifestError::Invalid {
                key: s(),
                message: s(),
            })
        };
        let cases: Vec<(&str, anyhow::Error, ExitStatus)> = vec![
            ("usage", crate::exit::UsageError(s()).into(), Usage),
            ("lsn", "x".parse::<Lsn>().unwrap_err().into(), Usage),
            ("conninfo parse", ConnInfoError::Parse(s()).into(), Usage),
            (
                "conninfo tls",
                ConnInfoError::TlsUnsupported(s()).into(),
                Usage,
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
            ("backup bad manifest", bad_manifest().into(), Damaged),
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
            ("restore empty", RestoreError::Empty(s()).into(), Repository),
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
                "restore bad manifest",
                RestoreError::Backup(bad_manifest()).into(),
                Damaged,
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
