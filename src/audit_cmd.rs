//! The audit trail at the command line: the invocation of this process built from its parsed
//! flags (with every secret left out), the recording of each audited command's end, and
//! `tidemark audit`, which lists the records (`--json`: `proto/audit.md`).
//!
//! Recorded here: `backup` (manual), `prune` (not `--dry-run`: it changes nothing), `pin`,
//! `unpin`, `restore`, `rekey`. The backups `archive` takes are recorded by the function that takes
//! every backup ([`crate::backup::take`]), with this process's invocation. A command whose
//! repository cannot be opened (a bad `--repo`) has nowhere to record and is not recorded.
//!
//! A record that cannot be stored is a warning and leaves the command's exit code alone (see
//! [`audit::record_or_warn`]), except for prune: its deletions are the one thing the trail
//! alone remembers (a backup's own manifest says when and how it was taken; nothing is left of
//! what prune deleted), so a prune that deleted something and could not record it exits 4,
//! naming what it deleted. Its deletions stand (a second prune finds nothing more to delete).
//!
//! Arguments: built from the parsed command, not from `argv`, so values from `TIDEMARK_…`
//! variables are recorded too and defaults are not. A secret-bearing flag (one whose
//! environment value `--help` hides, or whose name says password, secret or token) is never
//! recorded as given: a connection string is recorded as its libpq form without the password
//! (as child processes get it), anything else as `[redacted]`. Paths (a key file, a CA bundle)
//! are not secrets and are recorded. S3 credentials are never flags (the AWS chain reads them).

use std::sync::Arc;

use clap::parser::ValueSource;
use serde::Serialize;

use crate::backup::Manifest;
use crate::backup_cmd::LabelArgs;
use crate::catalog::audit::{
    self, BackupDetails, Deleted, Invocation, Operation, Outcome, PruneDetails, Record,
    RekeyDetails, RestoreDetails, Started,
};
use crate::catalog::expire::Expiry;
use crate::conninfo::ConnInfo;
use crate::lsn::PgTimestamp;
use crate::rekey::{RekeyFailed, RekeySummary};
use crate::restore::RestoreSummary;
use crate::store::Store;

/// What a secret value is recorded as.
pub const REDACTED: &str = "[redacted]";

/// Words in a flag's name that make it secret-bearing.
const SECRET_WORDS: &[&str] = &["password", "secret", "token", "passphrase"];

/// `tidemark audit`'s own flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ListArgs {
    /// Only records of commands started at or after this instant (e.g. "2026-12-01 00:00";
    /// without a zone, UTC).
    #[arg(long, env = "TIDEMARK_SINCE", value_parser = parse_since)]
    pub since: Option<PgTimestamp>,
    /// Print JSON instead of a table.
    #[arg(long, env = "TIDEMARK_JSON")]
    pub json: bool,
}

fn parse_since(s: &str) -> Result<PgTimestamp, String> {
    crate::exit::parse_time(s).map_err(|_| {
        format!("{s:?} is not a timestamp; use e.g. \"2026-12-01 00:00\" or 2026-12-01T00:00:00Z")
    })
}

/// The invocation of the subcommand `matches` holds (`cli` being the whole command line's
/// definition); `None` without a subcommand.
pub fn invocation_of(cli: &clap::Command, matches: &clap::ArgMatches) -> Option<Invocation> {
    let (name, sub_matches) = matches.subcommand()?;
    let sub = cli.find_subcommand(name)?;
    let mut arguments = Vec::new();
    for arg in sub.get_arguments() {
        let id = arg.get_id().as_str();
        match sub_matches.value_source(id) {
            Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {}
            _ => continue,
        }
        if !arg.get_action().takes_values() {
            if sub_matches.try_get_one::<bool>(id).ok().flatten() == Some(&true) {
                arguments.extend(arg.get_long().map(|l| format!("--{l}")));
            }
            continue;
        }
        let Ok(Some(values)) = sub_matches.try_get_raw(id) else {
            continue;
        };
        for value in values {
            let value = redacted(arg, &value.to_string_lossy());
            match arg.get_long() {
                Some(long) => {
                    arguments.push(format!("--{long}"));
                    arguments.push(value);
                }
                None => arguments.push(value),
            }
        }
    }
    Some(Invocation {
        command: name.to_string(),
        arguments,
    })
}

/// Whether `arg` may carry a secret.
fn secret_bearing(arg: &clap::Arg) -> bool {
    let id = arg.get_id().as_str().to_ascii_lowercase();
    arg.is_hide_env_values_set() || SECRET_WORDS.iter().any(|w| id.contains(w))
}

/// `value` of `arg` as recorded: as given, or without its secret.
fn redacted(arg: &clap::Arg, value: &str) -> String {
    if !secret_bearing(arg) {
        return value.to_string();
    }
    match ConnInfo::parse(value) {
        Ok(c) => c.libpq_string(),
        Err(_) => REDACTED.to_string(),
    }
}

/// A connection string as a record names its database: `user@host:port/dbname`, never the
/// password.
pub fn database_of(conninfo: &str) -> String {
    match ConnInfo::parse(conninfo) {
        Ok(c) => c.to_string(),
        Err(_) => format!("{REDACTED} (not a valid connection string)"),
    }
}

/// The outcome of a command's result: ok, or its exit code and message.
pub fn outcome<T>(r: &anyhow::Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::error(crate::exit::exit_code(e), &crate::exit::render(e)),
    }
}

/// Records a manual backup (best effort) and hands its result on.
pub async fn finish_backup(
    store: &Arc<dyn Store>,
    started: Started,
    label: &LabelArgs,
    r: anyhow::Result<Manifest>,
) -> anyhow::Result<Manifest> {
    let m = r.as_ref().ok();
    let op = Operation::Backup(BackupDetails {
        origin: crate::backup::Origin::Manual.as_str().into(),
        backup_id: m.map(|m| m.id.clone()),
        consistent_point: m.map(|m| m.consistent_point),
        tag: label.tag.clone(),
        pin: label.pin,
    });
    audit::record_or_warn(&**store, started, &op, outcome(&r)).await;
    r
}

/// Records a prune (not a dry run) and hands its result on; a prune that deleted and could
/// not record it fails (see the module doc).
pub async fn finish_prune(
    store: &Arc<dyn Store>,
    started: Started,
    dry_run: bool,
    incomplete_only: bool,
    r: anyhow::Result<Expiry>,
) -> anyhow::Result<Expiry> {
    if dry_run {
        return r;
    }
    let deleted = r.as_ref().ok().map(Deleted::of);
    let op = Operation::Prune(PruneDetails {
        policy_applied: !incomplete_only,
        deleted: deleted.clone(),
    });
    let written = audit::record(&**store, started, &op, outcome(&r)).await;
    match (r, written, deleted) {
        (Err(e), Err(w), _) => {
            tracing::warn!(error = %crate::error::chain(&w), "could not store the audit record of this failed prune");
            Err(e)
        }
        (Ok(_), Err(w), Some(d)) if d.objects > 0 => Err(anyhow::Error::new(w).context(format!(
            "prune deleted {} object(s) (base backups {:?}, incomplete backups {:?}, {} segment(s)) from {}, but could not store its audit record\nHINT: let tidemark write under audit/ in the repository; what was deleted stays deleted",
            d.objects, d.backups, d.incomplete_backups, d.segments, store.location()
        ))),
        (r, Err(w), _) => {
            tracing::warn!(error = %crate::error::chain(&w), "could not store the audit record of this prune (it deleted nothing)");
            r
        }
        (r, Ok(_), _) => r,
    }
}

/// Records a pin or an unpin (best effort) and hands its result on.
pub async fn finish_pin(
    store: &Arc<dyn Store>,
    started: Started,
    pin: bool,
    id: &str,
    r: anyhow::Result<()>,
) -> anyhow::Result<()> {
    let backup_id = id.to_string();
    let op = if pin {
        Operation::Pin { backup_id }
    } else {
        Operation::Unpin { backup_id }
    };
    audit::record_or_warn(&**store, started, &op, outcome(&r)).await;
    r
}

/// Records a restore into `target` (a connection string) towards `goal` (as asked), best
/// effort, and hands its result on.
pub async fn finish_restore(
    store: &Arc<dyn Store>,
    started: Started,
    target: &str,
    goal: String,
    r: anyhow::Result<RestoreSummary>,
) -> anyhow::Result<RestoreSummary> {
    let s = r.as_ref().ok();
    let op = Operation::Restore(RestoreDetails {
        target: database_of(target),
        goal,
        backup_id: s.map(|s| s.backup_id.clone()),
        transactions_replayed: s.map(|s| s.transactions_replayed),
        last_commit_lsn: s.and_then(|s| s.last_commit_lsn),
        last_commit_time: s.and_then(|s| s.last_commit_time),
    });
    audit::record_or_warn(&**store, started, &op, outcome(&r)).await;
    r
}

/// Records a rekey (best effort) and hands its result on. A rekey that failed records what
/// it did before and beside its failure ([`RekeyFailed::summary`]).
pub async fn finish_rekey(
    store: &Arc<dyn Store>,
    started: Started,
    r: anyhow::Result<RekeySummary>,
) -> anyhow::Result<RekeySummary> {
    let done = match &r {
        Ok(s) => Some(s),
        Err(e) => e.downcast_ref::<RekeyFailed>().map(|f| &f.summary),
    };
    let op = Operation::Rekey(done.map_or_else(RekeyDetails::default, |s| RekeyDetails {
        key: Some(s.key.clone()),
        objects: s.objects,
        rewrapped: s.rewrapped,
        already: s.already,
        failed: s.failed,
        failed_objects: s.failed_objects.clone(),
        bytes_written: s.bytes_written,
        passes: s.passes,
    }));
    audit::record_or_warn(&**store, started, &op, outcome(&r)).await;
    r
}

#[derive(Serialize)]
struct Listing<'a> {
    repository: String,
    records: Vec<Listed<'a>>,
    unreadable: Vec<Unreadable<'a>>,
}

#[derive(Serialize)]
struct Listed<'a> {
    key: &'a str,
    #[serde(flatten)]
    record: &'a Record,
}

#[derive(Serialize)]
struct Unreadable<'a> {
    key: &'a str,
    detail: &'a str,
}

/// `tidemark audit`: prints the records by start time (a table, or JSON).
pub async fn run(store: &Arc<dyn Store>, args: &ListArgs) -> anyhow::Result<()> {
    let trail = audit::read(store, args.since).await?;
    if args.json {
        let listing = Listing {
            repository: store.location(),
            records: trail
                .records
                .iter()
                .map(|(key, record)| Listed { key, record })
                .collect(),
            unreadable: trail
                .unreadable
                .iter()
                .map(|(key, detail)| Unreadable { key, detail })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    print!("{}", table(&store.location(), &trail));
    Ok(())
}

/// The trail as text: a heading, one line per record (and its error's message under it).
fn table(location: &str, trail: &audit::Trail) -> String {
    let mut out = format!("audit trail of {location}\n");
    if trail.records.is_empty() && trail.unreadable.is_empty() {
        out.push_str("  no records\n");
        return out;
    }
    out.push_str(&format!(
        "  {:<30} {:>9}  {:<8} {:<8} {:<9} {:<24} {}\n",
        "started (UTC)", "duration", "kind", "command", "result", "user@host", "what"
    ));
    for (_, r) in &trail.records {
        let result = match &r.result {
            Outcome::Ok => "ok".to_string(),
            Outcome::Error { exit_code, .. } => format!("error {exit_code}"),
        };
        out.push_str(&format!(
            "  {:<30} {:>8.1}s  {:<8} {:<8} {:<9} {:<24} {}\n",
            r.started_at.to_string(),
            r.duration_seconds,
            r.kind,
            r.command,
            result,
            format!("{}@{}", r.user, r.host),
            summary(r)
        ));
        if let Outcome::Error { message, .. } = &r.result {
            let first = message.lines().next().unwrap_or_default();
            out.push_str(&format!("      {first}\n"));
        }
    }
    for (key, detail) in &trail.unreadable {
        out.push_str(&format!("  unreadable record {key}: {detail}\n"));
    }
    out
}

/// One line of what a record's details say.
fn summary(r: &Record) -> String {
    let d = &r.details;
    let s = |k: &str| d[k].as_str().map(str::to_string);
    match r.kind.as_str() {
        "backup" => {
            let mut out = s("backup_id").unwrap_or_else(|| "no backup".into());
            out.push_str(&format!(" ({}", s("origin").unwrap_or_default()));
            if let Some(t) = s("tag") {
                out.push_str(&format!(", tag {t}"));
            }
            if d["pin"] == true {
                out.push_str(", pin");
            }
            out.push(')');
            out
        }
        "prune" => match d["deleted"].as_object() {
            None => "deleted: unknown (failed)".into(),
            Some(x) => format!(
                "deleted {} backup(s), {} incomplete, {} segment(s){}",
                x["backups"].as_array().map_or(0, Vec::len),
                x["incomplete_backups"].as_array().map_or(0, Vec::len),
                x["segments"],
                if d["policy_applied"] == false {
                    " (--incomplete-backups)"
                } else {
                    ""
                }
            ),
        },
        "pin" | "unpin" => s("backup_id").unwrap_or_default(),
        "restore" => format!(
            "{} into {}{}",
            s("goal").unwrap_or_default(),
            s("target").unwrap_or_default(),
            s("backup_id")
                .map(|b| format!(" from {b}"))
                .unwrap_or_default()
        ),
        "rekey" => match s("key") {
            None => "no key read".into(),
            Some(k) => format!(
                "to key {k}: {} rekeyed, {} skipped, {} failed of {} object(s)",
                d["rewrapped"], d["already"], d["failed"], d["objects"]
            ),
        },
        _ => d.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Cmd,
    }

    #[derive(Subcommand, Debug)]
    enum Cmd {
        Restore {
            #[arg(long)]
            repo: String,
            #[arg(long, hide_env_values = true)]
            target: String,
            #[arg(long, env = "AUDIT_TEST_SOURCE", hide_env_values = true)]
            source: Option<String>,
            #[arg(long)]
            encryption_key_file: Option<String>,
            #[arg(long)]
            s3_secret_access_key: Option<String>,
            #[arg(long, default_value = "AES256")]
            s3_sse: String,
            #[arg(long)]
            latest: bool,
            #[arg(long)]
            dry_run: bool,
            id: Option<String>,
        },
    }

    fn invocation(args: &[&str]) -> Invocation {
        let cmd = Cli::command();
        let matches = cmd.clone().try_get_matches_from(args).unwrap();
        Cli::from_arg_matches(&matches).unwrap();
        invocation_of(&cmd, &matches).unwrap()
    }

    #[test]
    fn arguments_come_from_the_parsed_command_without_secrets() {
        let inv = invocation(&[
            "tidemark",
            "restore",
            "--repo",
            "s3://b/p",
            "--target",
            "host=db1 port=5433 user=app password=Hunter2-in-conninfo dbname=x",
            "--encryption-key-file",
            "/etc/tidemark/keyring",
            "--s3-secret-access-key",
            "S3-SECRET-VALUE",
            "--latest",
            "00000001-00000000016B3748",
        ]);
        assert_eq!(inv.command, "restore");
        let all = inv.arguments.join(" ");
        assert!(!all.contains("Hunter2"), "{all}");
        assert!(!all.contains("S3-SECRET-VALUE"), "{all}");
        // The connection string stays, without its password; a key's path is no secret.
        let target =
            &inv.arguments[inv.arguments.iter().position(|a| a == "--target").unwrap() + 1];
        assert!(
            target.contains("host='db1'")
                && target.contains("port='5433'")
                && target.contains("dbname='x'"),
            "{target}"
        );
        assert!(
            all.contains("--encryption-key-file /etc/tidemark/keyring"),
            "{all}"
        );
        assert!(
            all.contains(&format!("--s3-secret-access-key {REDACTED}")),
            "{all}"
        );
        // Flags given are there; defaults and flags not given are not.
        assert!(
            all.contains("--latest") && !all.contains("--dry-run"),
            "{all}"
        );
        assert!(!all.contains("--s3-sse"), "{all}");
        assert!(inv
            .arguments
            .ends_with(&["00000001-00000000016B3748".to_string()]));
    }

    #[test]
    fn a_uri_password_and_an_unparsable_secret_are_left_out() {
        let inv = invocation(&[
            "tidemark",
            "restore",
            "--repo",
            "/r",
            "--target",
            "postgresql://app:UriSecret99@db1:5432/x",
            "--source",
            "host=db1 password='unterminated",
        ]);
        let all = inv.arguments.join(" ");
        assert!(
            !all.contains("UriSecret99") && !all.contains("unterminated"),
            "{all}"
        );
        assert!(all.contains(&format!("--source {REDACTED}")), "{all}");
        assert!(all.contains("user='app'"), "{all}");
        assert_eq!(
            database_of("postgresql://app:UriSecret99@db1:5432/x"),
            "app@db1:5432/x"
        );
        assert!(!database_of("password='x").contains('x'));
    }

    #[test]
    fn the_table_names_each_record_and_an_errors_message() {
        let started = Started::now();
        let inv = Invocation {
            command: "restore".into(),
            arguments: vec![],
        };
        let ok = Record::new(
            started,
            inv.clone(),
            "/r".into(),
            &Operation::Restore(RestoreDetails {
                target: "app@db1:5432/x".into(),
                goal: "--latest".into(),
                backup_id: Some("00000001-00000000016B3748".into()),
                ..Default::default()
            }),
            Outcome::Ok,
        );
        let failed = Record::new(
            started,
            Invocation {
                command: "prune".into(),
                arguments: vec![],
            },
            "/r".into(),
            &Operation::Prune(PruneDetails {
                policy_applied: true,
                deleted: None,
            }),
            Outcome::error(4, "/r: delete segments/x: permission denied\nHINT: fix it"),
        );
        let rekeyed = Record::new(
            started,
            Invocation {
                command: "rekey".into(),
                arguments: vec![],
            },
            "/r".into(),
            &Operation::Rekey(RekeyDetails {
                key: Some("0123456789abcdef".into()),
                objects: 9,
                rewrapped: 5,
                already: 3,
                failed: 1,
                ..Default::default()
            }),
            Outcome::error(5, "1 object(s) could not be rekeyed"),
        );
        let trail = audit::Trail {
            records: vec![
                ("a".into(), ok),
                ("b".into(), failed),
                ("r".into(), rekeyed),
            ],
            unreadable: vec![("audit/c.json".into(), "not a record".into())],
        };
        let text = table("/r", &trail);
        assert!(
            text.contains("--latest into app@db1:5432/x from 00000001-00000000016B3748"),
            "{text}"
        );
        assert!(
            text.contains("error 4") && text.contains("deleted: unknown (failed)"),
            "{text}"
        );
        assert!(
            text.contains("      /r: delete segments/x: permission denied\n"),
            "{text}"
        );
        assert!(!text.contains("HINT"), "{text}");
        assert!(
            text.contains("to key 0123456789abcdef: 5 rekeyed, 3 skipped, 1 failed of 9 object(s)"),
            "{text}"
        );
        assert!(
            text.contains("unreadable record audit/c.json: not a record"),
            "{text}"
        );
        assert!(table("/r", &audit::Trail::default()).contains("no records"));
    }

    #[tokio::test]
    async fn an_unrecorded_prune_that_deleted_fails_and_other_commands_stand() {
        use crate::catalog::expire::{Dropped, Expiry};
        use crate::catalog::keys;
        use crate::store::faulty::{Fault, FaultyStore, Op, Times};
        use crate::store::LocalStore;
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        local
            .put(keys::IDENTITY, bytes::Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let refusing: Arc<dyn Store> = Arc::new(FaultyStore::new(local.clone()).fail(
            Op::Put,
            Fault::Permanent,
            Times::Always,
        ));
        let deleted = Expiry {
            window_start: PgTimestamp(0),
            kept: vec![],
            backups: vec![Dropped {
                id: "00000001-0000000000000100".into(),
                snapshot_time: PgTimestamp(0),
                objects: vec!["basebackups/00000001-0000000000000100/manifest.json".into()],
                bytes: 1,
            }],
            segments: vec![],
            incomplete: vec![],
            archived: vec![],
        };
        let e = finish_prune(&refusing, Started::now(), false, false, Ok(deleted.clone()))
            .await
            .unwrap_err();
        assert_eq!(crate::exit::exit_code(&e), 4, "{e:#}");
        let text = crate::exit::render(&e);
        assert!(
            text.contains("prune deleted 1 object(s)")
                && text.contains("00000001-0000000000000100")
                && text.contains("audit record"),
            "{text}"
        );
        // Nothing deleted, a dry run, a restore: the command's own result stands.
        let nothing = Expiry {
            backups: vec![],
            ..deleted.clone()
        };
        finish_prune(&refusing, Started::now(), false, false, Ok(nothing))
            .await
            .unwrap();
        finish_prune(&refusing, Started::now(), true, false, Ok(deleted.clone()))
            .await
            .unwrap();
        finish_pin(&refusing, Started::now(), true, "x", Ok(()))
            .await
            .unwrap();
        // A failed prune keeps its own error.
        let failed = finish_prune(
            &refusing,
            Started::now(),
            false,
            false,
            Err(anyhow::anyhow!("the listing failed")),
        )
        .await
        .unwrap_err();
        assert_eq!(failed.to_string(), "the listing failed");
        assert!(local.list(keys::AUDIT).await.unwrap().is_empty());
        // With a writable store the same prune is recorded, with what it deleted.
        finish_prune(&local, Started::now(), false, false, Ok(deleted))
            .await
            .unwrap();
        let trail = audit::read(&local, None).await.unwrap();
        assert_eq!(trail.records.len(), 1);
        let d = &trail.records[0].1.details["deleted"];
        assert_eq!(
            d["backups"],
            serde_json::json!(["00000001-0000000000000100"])
        );
        assert_eq!(d["objects"], 1);
    }
}
