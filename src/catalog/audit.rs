//! The audit trail: one create-only object per recorded command, `audit/<start>-<random>.json`
//! (`proto/audit.md`), saying when (UTC), who (OS user, host), with which tidemark, what
//! (command, arguments without secrets, repository), how it ended (ok, or the error with its
//! exit code and message), how long it took, and what only that kind of command knows (the
//! backup taken, what prune deleted, the target and backup of a restore).
//!
//! Owns: the record ([`Record`], with the kinds in [`Operation`]), its naming (through
//! [`super::keys::audit`]: names sort by start time and carry 64 random bits, so two hosts
//! never collide), its writing ([`record`], [`record_or_warn`]) and reading ([`read`]). Does
//! not own which commands record, nor building the arguments from the command line (both the
//! command line's: `audit_cmd`); the one exception is the backups `archive` takes, recorded by
//! [`crate::backup::take`] itself so that every backup the archiver takes (initial or
//! scheduled) is recorded without its caller doing anything.
//!
//! Kinds recorded today: `backup`, `prune`, `pin`, `unpin`, `restore`, `rekey`. A later command
//! adds one line to [`Operation`] (with its details type, if it has details): `drill` (the
//! restore checked and its verdict), `forget` (what was erased). Readers
//! take any kind, known or not ([`Record::kind`] is text and [`Record::details`] any JSON), so
//! an older tidemark lists a newer one's records.
//!
//! Records are written into an existing repository only (one with `archive.json` or a base
//! backup): a command run against a mistyped `--repo` does not create a repository there.
//!
//! Invariant: records are never rewritten and nothing deletes them — prune deletes only keys
//! under `basebackups/` and `segments/` ([`super::expire`]), the archiver's sweep only
//! segments, a failed backup only its own folder. Records go through [`crate::object`] like
//! every object, so an encrypted repository's records are encrypted too.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::expire::Expiry;
use super::keys;
use crate::error::Classify;
use crate::lsn::{Lsn, PgTimestamp};
use crate::store::{Store, StoreError};

/// The format of the records this build writes (`proto/audit.md`).
pub const FORMAT_VERSION: u32 = 1;

/// What this process was asked to do: the command and its arguments without secrets. Built
/// once by the command line from the parsed flags and set with [`set_invocation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    pub command: String,
    pub arguments: Vec<String>,
}

static INVOCATION: OnceLock<Invocation> = OnceLock::new();

/// Sets the process's invocation, once (later calls change nothing): a process runs one
/// command, and the backups the archiver takes deep below it are recorded with it.
pub fn set_invocation(invocation: Invocation) {
    let _ = INVOCATION.set(invocation);
}

/// The process's invocation; without one (tidemark used as a library), command `library`.
pub fn invocation() -> Invocation {
    INVOCATION.get().cloned().unwrap_or_else(|| Invocation {
        command: "library".into(),
        arguments: Vec::new(),
    })
}

/// When a recorded command started: the record's name and `started_at`, and its duration.
#[derive(Clone, Copy, Debug)]
pub struct Started {
    at: PgTimestamp,
    clock: Instant,
}

impl Started {
    pub fn now() -> Started {
        Started {
            at: PgTimestamp::now(),
            clock: Instant::now(),
        }
    }
}

/// What a recorded command was, with what only that kind knows. Serialized as `kind` (the
/// variant's name) and `details` (its fields). One variant per kind; add a kind here.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", content = "details", rename_all = "snake_case")]
pub enum Operation {
    Backup(BackupDetails),
    Prune(PruneDetails),
    Pin { backup_id: String },
    Unpin { backup_id: String },
    Restore(RestoreDetails),
    Rekey(RekeyDetails),
}

/// A base backup: manual (`tidemark backup`) or taken by `archive`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackupDetails {
    /// `initial`, `scheduled` or `manual`.
    pub origin: String,
    /// The backup taken (None: it failed before it had one).
    pub backup_id: Option<String>,
    pub consistent_point: Option<Lsn>,
    pub tag: Option<String>,
    /// `backup --pin` was asked.
    pub pin: bool,
}

/// A prune (dry runs delete nothing and are not recorded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PruneDetails {
    /// False with `--incomplete-backups`: only incomplete backups were considered.
    pub policy_applied: bool,
    /// What was deleted; None when prune failed (it stops at its first failed deletion, so
    /// some of its plan may be deleted: `list` shows what is left).
    pub deleted: Option<Deleted>,
}

/// What a prune deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Deleted {
    /// The base backups deleted by the policy, oldest first.
    pub backups: Vec<String>,
    /// The incomplete backups (no manifest) deleted.
    pub incomplete_backups: Vec<String>,
    pub segments: usize,
    pub segment_bytes: u64,
    /// The first and last segment deleted (keys).
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    /// Every object deleted, of backups and segments.
    pub objects: usize,
}

impl Deleted {
    /// What applying `e` deleted. Pure.
    pub fn of(e: &Expiry) -> Deleted {
        let incomplete: Vec<_> = e.incomplete.iter().filter(|f| f.removed).collect();
        Deleted {
            backups: e.backups.iter().map(|b| b.id.clone()).collect(),
            incomplete_backups: incomplete.iter().map(|f| f.id.clone()).collect(),
            segments: e.segments.len(),
            segment_bytes: e.segments.iter().map(|s| s.size).sum(),
            first_segment: e.segments.first().map(|s| s.key.clone()),
            last_segment: e.segments.last().map(|s| s.key.clone()),
            objects: e.deletions().len() + incomplete.iter().map(|f| f.objects).sum::<usize>(),
        }
    }
}

/// A restore: into which database (without its password), to which goal, from which backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RestoreDetails {
    /// `user@host:port/dbname`.
    pub target: String,
    /// The stop as asked: `--to-time …`, `--to-lsn …`, `--latest`, `--to-backup …`.
    pub goal: String,
    /// The base backup restored (None: the restore failed before or while choosing it).
    pub backup_id: Option<String>,
    pub transactions_replayed: Option<u64>,
    pub last_commit_lsn: Option<Lsn>,
    pub last_commit_time: Option<PgTimestamp>,
}

/// A rekey: the key objects were moved to and what became of each encrypted object (the
/// fields of `tidemark rekey --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RekeyDetails {
    /// The keyring's current key (None: the command failed before it read the keyring).
    pub key: Option<String>,
    /// Encrypted objects of the repository (its last listing).
    pub objects: u64,
    /// Objects rekeyed: header sidecars written.
    pub rewrapped: u64,
    /// Objects skipped: already under the key.
    pub already: u64,
    /// Objects that could not be rekeyed, and the first of them.
    pub failed: u64,
    pub failed_objects: Vec<String>,
    pub bytes_written: u64,
    pub passes: u32,
}

/// How a recorded command ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error {
        /// The exit code the command ended with (README's "Exit codes").
        exit_code: i32,
        /// The error and its causes, without hints.
        message: String,
    },
}

impl Outcome {
    /// An error's outcome: its exit code, and its message without `HINT:` lines.
    pub fn error(exit_code: i32, message: &str) -> Outcome {
        let (message, _) = crate::error::split_hints(message);
        Outcome::Error { exit_code, message }
    }

    /// The outcome of a module's result (its error classifies itself).
    pub fn of<T, E: std::error::Error + Classify>(r: &Result<T, E>) -> Outcome {
        match r {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::error(e.exit_status() as i32, &crate::error::chain(e)),
        }
    }
}

/// An audit record as stored (`proto/audit.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub format_version: u32,
    /// `backup`, `prune`, `pin`, `unpin`, `restore`, `rekey`, or a later command's kind.
    pub kind: String,
    pub started_at: PgTimestamp,
    pub finished_at: PgTimestamp,
    pub duration_seconds: f64,
    /// The OS user that ran the command.
    pub user: String,
    pub host: String,
    pub tidemark_version: String,
    /// The command run (`archive` for the backups an archiver takes).
    pub command: String,
    /// Its arguments, without secrets (see `audit_cmd`).
    pub arguments: Vec<String>,
    pub repository: String,
    pub result: Outcome,
    /// What only this kind of command knows (an object; its fields per kind in proto/audit.md).
    pub details: serde_json::Value,
}

impl Record {
    /// The record of `operation`, started at `started` and ending now with `result`.
    pub fn new(
        started: Started,
        invocation: Invocation,
        repository: String,
        operation: &Operation,
        result: Outcome,
    ) -> Record {
        let tagged = serde_json::to_value(operation).expect("an operation serializes");
        let kind = tagged["kind"].as_str().unwrap_or_default().to_string();
        let details = match tagged.get("details") {
            Some(d) => d.clone(),
            None => serde_json::Value::Object(Default::default()),
        };
        let elapsed = started.clock.elapsed().as_secs_f64();
        Record {
            format_version: FORMAT_VERSION,
            kind,
            started_at: started.at,
            finished_at: PgTimestamp(started.at.0 + (elapsed * 1e6) as i64),
            duration_seconds: (elapsed * 1000.0).round() / 1000.0,
            user: crate::host::os_user(),
            host: crate::host::hostname(),
            tidemark_version: env!("CARGO_PKG_VERSION").to_string(),
            command: invocation.command,
            arguments: invocation.arguments,
            repository,
            result,
            details,
        }
    }
}

/// Stores `record` under a new key of its own (create-only) and returns the key.
pub async fn write(store: &dyn Store, record: &Record) -> Result<String, StoreError> {
    let key = keys::audit(record.started_at, rand::random::<u64>());
    let body = serde_json::to_vec_pretty(record).expect("a record serializes");
    crate::object::put_object(store, &key, Bytes::from(body)).await?;
    Ok(key)
}

/// Records `operation`, started at `started`, ended with `result`, with this process's
/// [`invocation`]; returns the record's key. Into an existing repository only (None
/// otherwise): a command that failed on a mistyped `--repo` must not create a repository
/// there to record its failure.
pub async fn record(
    store: &dyn Store,
    started: Started,
    operation: &Operation,
    result: Outcome,
) -> Result<Option<String>, StoreError> {
    match repository_encrypted(store).await? {
        None => {
            tracing::debug!(
                repository = %store.location(),
                "no repository there: this command is not recorded"
            );
            return Ok(None);
        }
        // A command run without the keyring of an encrypted repository (or with one on a plain
        // repository) fails on that; its record would be the one object readers cannot open.
        Some(encrypted) if encrypted != store.codec().writing_key().is_some() => {
            tracing::warn!(
                repository = %store.location(),
                "this command is not recorded: its keyring does not fit the repository"
            );
            return Ok(None);
        }
        Some(_) => {}
    }
    let r = Record::new(started, invocation(), store.location(), operation, result);
    write(store, &r).await.map(Some)
}

/// Whether `store` holds a repository (its identity, or, for a repository whose first backup
/// is being taken or just was, a base backup's objects) and then whether it is encrypted (a
/// repository without its identity yet: as this command's codec).
async fn repository_encrypted(store: &dyn Store) -> Result<Option<bool>, StoreError> {
    use crate::object::{self, ObjectError, Plain};
    match object::get_object_with(store, &Plain, keys::IDENTITY).await {
        Ok(bytes) => {
            // An identity this build cannot parse: recorded as this command's codec says (the
            // command itself reports the identity's fault).
            let encrypted = super::identity::parse_identity(&store.location(), &bytes)
                .map_or(store.codec().writing_key().is_some(), |id| {
                    id.encryption.is_some()
                });
            Ok(Some(encrypted))
        }
        Err(ObjectError::Store(StoreError::NotFound { .. })) => {
            Ok((!store.list(keys::BASEBACKUPS).await?.is_empty())
                .then(|| store.codec().writing_key().is_some()))
        }
        Err(ObjectError::Store(e)) => Err(e),
        // The identity is stored plain: one that does not decode is the command's to report.
        Err(_) => Ok(Some(store.codec().writing_key().is_some())),
    }
}

/// [`record`], best effort: a record that cannot be stored is a warning, never the command's
/// failure. The command's own result (a backup stored, a restore done, or its error and exit
/// code) is what its caller acts on; turning a done restore into a failure because the
/// repository refused a small write would make scripts redo it, and the repository that
/// refuses the record is usually the one the error already names.
pub async fn record_or_warn(
    store: &dyn Store,
    started: Started,
    operation: &Operation,
    result: Outcome,
) {
    if let Err(e) = record(store, started, operation, result).await {
        tracing::warn!(
            error = %crate::error::chain(&e),
            "could not store the audit record of this command (the command's result stands)"
        );
    }
}

/// The audit trail as read: the records by start time, and the objects under `audit/` that
/// could not be read or parsed (with why).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trail {
    pub records: Vec<(String, Record)>,
    pub unreadable: Vec<(String, String)>,
}

/// Reads every record whose command started at or after `since` (all without it). A damaged
/// or unparsable record is listed in [`Trail::unreadable`], never fatal; only a failing store
/// is an error.
pub async fn read(store: &Arc<dyn Store>, since: Option<PgTimestamp>) -> Result<Trail, StoreError> {
    let listed = store.list(keys::AUDIT).await?;
    let wanted: Vec<String> = listed
        .into_iter()
        .filter(|o| keys::parse_audit(&o.key).is_some_and(|t| since.is_none_or(|since| t >= since)))
        .map(|o| o.key)
        .collect();
    let mut reads = futures_util::stream::iter(wanted)
        .map(|key| async move {
            let got = crate::object::get_object(&**store, &key).await;
            (key, got)
        })
        .buffered(8);
    let mut trail = Trail::default();
    while let Some((key, got)) = reads.next().await {
        match got {
            Ok(bytes) => match parse(&bytes) {
                Ok(r) => trail.records.push((key, r)),
                Err(detail) => trail.unreadable.push((key, detail)),
            },
            Err(crate::object::ObjectError::Store(StoreError::NotFound { .. })) => {}
            Err(crate::object::ObjectError::Store(e)) => return Err(e),
            Err(e) => trail.unreadable.push((key, e.to_string())),
        }
    }
    Ok(trail)
}

/// A stored record's bytes as a [`Record`]; why not.
fn parse(bytes: &[u8]) -> Result<Record, String> {
    let r: Record = serde_json::from_slice(bytes).map_err(|e| format!("not a record: {e}"))?;
    if r.format_version > FORMAT_VERSION {
        return Err(format!(
            "format_version {} is newer than this tidemark reads ({FORMAT_VERSION}): use a newer tidemark",
            r.format_version
        ));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn sample(op: &Operation, result: Outcome) -> Record {
        let inv = Invocation {
            command: "backup".into(),
            arguments: vec!["--repo".into(), "/r".into()],
        };
        Record::new(Started::now(), inv, "/r".into(), op, result)
    }

    #[test]
    fn a_record_serializes_kind_details_and_result_as_specified() {
        let op = Operation::Backup(BackupDetails {
            origin: "manual".into(),
            backup_id: Some("00000001-00000000016B3748".into()),
            consistent_point: Some(Lsn(0x16B_3748)),
            tag: Some("pre-deploy".into()),
            pin: true,
        });
        let r = sample(&op, Outcome::Ok);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(v["kind"], "backup");
        assert_eq!(v["command"], "backup");
        assert_eq!(v["result"], serde_json::json!({"status": "ok"}));
        assert_eq!(v["details"]["backup_id"], "00000001-00000000016B3748");
        assert_eq!(v["details"]["consistent_point"], "0/16B3748");
        assert_eq!(v["details"]["pin"], true);
        assert_eq!(v["tidemark_version"], env!("CARGO_PKG_VERSION"));
        assert!(!v["user"].as_str().unwrap().is_empty());
        assert!(v["started_at"].as_str().unwrap().ends_with('Z'), "{v}");
        for field in [
            "finished_at",
            "duration_seconds",
            "host",
            "arguments",
            "repository",
        ] {
            assert!(!v[field].is_null(), "{field} missing: {v}");
        }
        // It reads back as it was written.
        let back = parse(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);

        let failed = sample(
            &Operation::Unpin {
                backup_id: "x".into(),
            },
            Outcome::error(
                2,
                "base backup x is not pinned\nHINT: `tidemark list` shows",
            ),
        );
        let v = serde_json::to_value(&failed).unwrap();
        assert_eq!(v["kind"], "unpin");
        assert_eq!(v["details"], serde_json::json!({"backup_id": "x"}));
        assert_eq!(
            v["result"],
            serde_json::json!({"status": "error", "exit_code": 2, "message": "base backup x is not pinned"})
        );
    }

    #[test]
    fn every_kind_has_its_name() {
        let kinds = [
            (Operation::Backup(BackupDetails::default()), "backup"),
            (
                Operation::Prune(PruneDetails {
                    policy_applied: true,
                    deleted: None,
                }),
                "prune",
            ),
            (
                Operation::Pin {
                    backup_id: "x".into(),
                },
                "pin",
            ),
            (
                Operation::Unpin {
                    backup_id: "x".into(),
                },
                "unpin",
            ),
            (Operation::Restore(RestoreDetails::default()), "restore"),
            (Operation::Rekey(RekeyDetails::default()), "rekey"),
        ];
        for (op, kind) in kinds {
            let r = sample(&op, Outcome::Ok);
            assert_eq!(r.kind, kind);
            assert!(r.details.is_object(), "{kind}: {:?}", r.details);
        }
    }

    #[test]
    fn an_unknown_kind_reads_and_a_newer_format_does_not() {
        let mut v = serde_json::to_value(sample(
            &Operation::Backup(BackupDetails::default()),
            Outcome::Ok,
        ))
        .unwrap();
        v["kind"] = "drill".into();
        v["details"] = serde_json::json!({"objects": 3, "new_field": [1]});
        v["a_later_field"] = true.into();
        let r = parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(r.kind, "drill");
        v["format_version"] = 2.into();
        let e = parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        assert!(parse(b"{\"kind\": 1}")
            .unwrap_err()
            .contains("not a record"));
    }

    #[tokio::test]
    async fn records_are_objects_of_their_own_read_back_by_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path().join("repo")));
        let first = Started::now();
        let op = Operation::Pin {
            backup_id: "a".into(),
        };
        // No repository there: nothing is recorded, nothing created.
        assert_eq!(
            record(&*store, first, &op, Outcome::Ok).await.unwrap(),
            None
        );
        assert!(!dir.path().join("repo").exists());
        store
            .put(keys::IDENTITY, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let k1 = record(&*store, first, &op, Outcome::Ok)
            .await
            .unwrap()
            .unwrap();
        // The same start twice (two hosts in one microsecond): two objects.
        let k2 = record(&*store, first, &op, Outcome::Ok)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(k1, k2);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = Started::now();
        let k3 = record(&*store, later, &op, Outcome::error(4, "refused"))
            .await
            .unwrap()
            .unwrap();
        store
            .put("audit/garbage.json", Bytes::from_static(b"x"))
            .await
            .unwrap();
        let damaged = keys::audit(PgTimestamp(later.at.0 + 1), 5);
        store
            .put(&damaged, Bytes::from_static(b"{not json"))
            .await
            .unwrap();

        let trail = read(&store, None).await.unwrap();
        let got: Vec<&str> = trail.records.iter().map(|(k, _)| k.as_str()).collect();
        let mut firsts = [k1.as_str(), k2.as_str()];
        firsts.sort();
        assert_eq!(got, [firsts[0], firsts[1], k3.as_str()]);
        assert_eq!(trail.unreadable.len(), 1, "{:?}", trail.unreadable);
        assert_eq!(trail.unreadable[0].0, damaged);
        let (_, r3) = &trail.records[2];
        assert_eq!(r3.result, Outcome::error(4, "refused"));
        assert_eq!(r3.repository, store.location());
        assert_eq!(r3.command, "library", "no invocation set in unit tests");

        let since = read(&store, Some(later.at)).await.unwrap();
        assert_eq!(since.records.len(), 1);
        assert_eq!(since.records[0].0, k3);
    }

    #[tokio::test]
    async fn prune_never_deletes_audit_records() {
        use crate::catalog::expire::{self, PruneOptions};
        use crate::catalog::retention::Policy;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let id = keys::backup_id(1, Lsn(0x100));
        // An incomplete backup (no manifest) and segments no backup reaches.
        for key in [
            keys::schema(&id),
            keys::part(&id, 0, 0),
            keys::segment(1, Lsn(0x10), Lsn(0x20)),
        ] {
            store.put(&key, Bytes::from_static(b"x")).await.unwrap();
        }
        let op = Operation::Pin {
            backup_id: id.clone(),
        };
        let mut records = Vec::new();
        for _ in 0..3 {
            records.push(
                record(&*store, Started::now(), &op, Outcome::Ok)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let opts = PruneOptions {
            older_than: std::time::Duration::from_millis(1),
            dry_run: false,
            archive_class: None,
        };
        let keep_nothing = Policy {
            daily: 0,
            weekly: 0,
            monthly: 0,
            manual: 0,
            changes: std::time::Duration::from_secs(1),
        };
        let e = expire::apply(&store, &keep_nothing, std::time::SystemTime::now(), &opts)
            .await
            .unwrap();
        assert!(e.incomplete.iter().any(|f| f.removed), "{e:?}");
        assert!(store
            .list(&keys::backup_folder(&id))
            .await
            .unwrap()
            .is_empty());
        let left: Vec<String> = store
            .list(keys::AUDIT)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        records.sort();
        assert_eq!(left, records);
        assert!(e.deletions().iter().all(|k| !k.starts_with(keys::AUDIT)));
    }
}
