//! The audit trail on real PostgreSQL, on a folder repository and on S3: the archiver's initial
//! backup, a manual backup, prune, pin and unpin, a restore and a failing restore each leave a
//! record that `tidemark audit --json` lists with the right result, and no audit object holds
//! a password given in a connection string or the S3 secret.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::archiving::{tidemark_env, wait_archived, workload_step, Archiving};
use crate::support::s3::{S3Server, SECRET_KEY};
use crate::support::Cluster;

/// A password in every connection string given (the test cluster trusts, so it is not used):
/// it must appear in no audit record.
const PASSWORD: &str = "Audit-Pw-7f3a9c";

fn with_password(conninfo: &str) -> String {
    format!("{conninfo} password={PASSWORD}")
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `tidemark audit --json` (with `extra` flags): its records.
fn audit(env: &[(&'static str, String)], url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "--repo", url, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = tidemark_env(env, &args);
    assert_eq!(code, 0, "audit: {out}{err}");
    let listing = json(&out);
    assert_eq!(listing["repository"], url, "{listing}");
    assert_eq!(listing["unreadable"], serde_json::json!([]), "{listing}");
    listing["records"].as_array().unwrap().clone()
}

/// The one record of `kind` whose details have `field` = `value`.
fn find<'a>(
    records: &'a [serde_json::Value],
    kind: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> &'a serde_json::Value {
    let found: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == kind && pred(r))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} record expected in {records:#?}");
    found[0]
}

fn assert_ok(r: &serde_json::Value) {
    assert_eq!(r["result"], serde_json::json!({"status": "ok"}), "{r:#}");
}

fn assert_failed(r: &serde_json::Value, code: i64, words: &str) {
    assert_eq!(r["result"]["status"], "error", "{r:#}");
    assert_eq!(r["result"]["exit_code"], code, "{r:#}");
    let message = r["result"]["message"].as_str().unwrap();
    assert!(message.contains(words), "{r:#}");
}

/// Runs the recorded commands against `url` (reached with `env`); returns the records and
/// the id of the manual backup.
async fn scenario(
    cluster: &Cluster,
    src: &tokio_postgres::Client,
    log: &std::path::Path,
    env: &[(&'static str, String)],
    url: &str,
) -> Vec<serde_json::Value> {
    let source = with_password(&cluster.conninfo("app"));
    workload_step(src, 2).await;
    wait_archived(src, "tidemark", log).await;
    let (code, out, err) = tidemark_env(
        env,
        &[
            "backup", "--source", &source, "--repo", url, "--tag", "audited",
        ],
    );
    assert_eq!(code, 0, "backup: {out}{err}");
    let b1 = out.split_whitespace().nth(2).unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    workload_step(src, 3).await;
    wait_archived(src, "tidemark", log).await;

    let (code, out, err) = tidemark_env(
        env,
        &[
            "prune",
            "--repo",
            url,
            "--retain-daily",
            "0",
            "--retain-weekly",
            "0",
            "--retain-monthly",
            "0",
            "--retain-manual",
            "1",
            "--retain-changes",
            "1s",
        ],
    );
    assert_eq!(code, 0, "prune: {out}{err}");
    // A dry run changes nothing and is not recorded.
    let (code, out, err) = tidemark_env(env, &["prune", "--repo", url, "--dry-run"]);
    assert_eq!(code, 0, "prune --dry-run: {out}{err}");
    let (code, out, err) = tidemark_env(env, &["pin", "--repo", url, &b1]);
    assert_eq!(code, 0, "pin: {out}{err}");
    let (code, out, err) = tidemark_env(env, &["unpin", "--repo", url, &b1]);
    assert_eq!(code, 0, "unpin: {out}{err}");
    let (code, _, err) = tidemark_env(env, &["unpin", "--repo", url, &b1]);
    assert_eq!(code, 2, "unpin of an unpinned backup: {err}");

    cluster.create_database("audited_latest");
    let target = with_password(&cluster.conninfo("audited_latest"));
    let (code, out, err) = tidemark_env(
        env,
        &["restore", "--repo", url, "--target", &target, "--latest"],
    );
    assert_eq!(code, 0, "restore: {out}{err}");
    // Before every restorable instant: refused (exit 6), recorded as such.
    let since = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    cluster.create_database("audited_early");
    let target = with_password(&cluster.conninfo("audited_early"));
    let (code, out, err) = tidemark_env(
        env,
        &[
            "restore",
            "--repo",
            url,
            "--target",
            &target,
            "--to-time",
            "2001-01-01 00:00:00+00",
        ],
    );
    assert_eq!(code, 6, "restore before the archive: {out}{err}");

    let records = audit(env, url, &[]);
    // The archiver's initial backup: recorded by `archive`, though prune removed the backup.
    let initial = find(&records, "backup", |r| r["details"]["origin"] == "initial");
    assert_ok(initial);
    assert_eq!(initial["command"], "archive", "{initial:#}");
    let b0 = initial["details"]["backup_id"].as_str().unwrap();
    assert_ne!(b0, b1);

    let manual = find(&records, "backup", |r| r["details"]["origin"] == "manual");
    assert_ok(manual);
    assert_eq!(manual["details"]["backup_id"], b1.as_str(), "{manual:#}");
    assert_eq!(manual["details"]["tag"], "audited", "{manual:#}");
    assert_eq!(manual["repository"], url);
    let args: Vec<&str> = manual["arguments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--tag") && args.contains(&"audited") && args.contains(&"--source"),
        "{args:?}"
    );

    let prune = find(&records, "prune", |_| true);
    assert_ok(prune);
    let deleted = &prune["details"]["deleted"];
    assert_eq!(deleted["backups"], serde_json::json!([b0]), "{prune:#}");
    assert!(deleted["segments"].as_u64().unwrap() > 0, "{prune:#}");

    assert_ok(find(&records, "pin", |r| {
        r["details"]["backup_id"] == b1.as_str()
    }));
    let unpins: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "unpin").collect();
    assert_eq!(unpins.len(), 2, "{records:#?}");
    assert_ok(unpins[0]);
    assert_failed(unpins[1], 2, "is not pinned");

    let restored = find(&records, "restore", |r| r["details"]["goal"] == "--latest");
    assert_ok(restored);
    assert_eq!(
        restored["details"]["backup_id"],
        b1.as_str(),
        "{restored:#}"
    );
    assert!(
        restored["details"]["target"]
            .as_str()
            .unwrap()
            .ends_with("/audited_latest"),
        "{restored:#}"
    );
    let refused = find(&records, "restore", |r| r["details"]["goal"] != "--latest");
    assert_failed(refused, 6, "");
    assert_eq!(refused["details"]["backup_id"], serde_json::Value::Null);

    // By start time, each with who and where.
    let starts: Vec<&str> = records
        .iter()
        .map(|r| r["started_at"].as_str().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "{starts:?}");
    for r in &records {
        for field in ["user", "host", "tidemark_version"] {
            assert!(
                r[field].as_str().is_some_and(|v| !v.is_empty()),
                "{field}: {r:#}"
            );
        }
        assert!(r["duration_seconds"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(records.len(), 8, "{records:#?}");
    // --since: only the failed restore started after `since`.
    let recent = audit(env, url, &["--since", &since]);
    assert_eq!(recent.len(), 1, "{recent:#?}");
    assert_eq!(recent[0]["key"], refused["key"]);
    // The table names each of them.
    let (code, out, err) = tidemark_env(env, &["audit", "--repo", url]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("\n  20").count(), 8, "{out}");
    assert!(out.contains("error 6") && out.contains(&b1), "{out}");
    records
}

/// No audit object holds any of `secrets`.
fn assert_no_secret(objects: &BTreeMap<String, Vec<u8>>, secrets: &[&str]) {
    assert!(!objects.is_empty());
    for (key, bytes) in objects {
        let text = String::from_utf8_lossy(bytes);
        for s in secrets {
            assert!(!text.contains(s), "{key} holds a secret:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_command_leaves_a_record_in_a_folder_repository() {
    let prepared = Archiving::builder().prepare().await;
    let source = with_password(&prepared.cluster.conninfo("app"));
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        url,
        dir: _dir,
    } = prepared.archive_from(&source).await;
    let log = archiver.log.clone();
    let records = scenario(&cluster, &src, &log, &[], &url).await;
    let audit_dir = repo.join("audit");
    let objects: BTreeMap<String, Vec<u8>> = std::fs::read_dir(&audit_dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    assert_eq!(objects.len(), records.len());
    assert_no_secret(&objects, &[PASSWORD]);
    archiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_command_leaves_a_record_in_an_s3_repository() {
    let server = S3Server::with_bucket("audited");
    let env = server.cli_env(&server.endpoint);
    let prepared = Archiving::builder()
        .repo_url("s3://audited/app")
        .env(&env)
        .prepare()
        .await;
    let source = with_password(&prepared.cluster.conninfo("app"));
    let Archiving {
        cluster,
        src,
        archiver,
        url,
        dir: _dir,
        ..
    } = prepared.archive_from(&source).await;
    let log = archiver.log.clone();
    let records = scenario(&cluster, &src, &log, &env, &url).await;
    let objects: BTreeMap<String, Vec<u8>> = server
        .objects("audited")
        .into_iter()
        .filter(|(k, _)| k.starts_with("app/audit/"))
        .collect();
    assert_eq!(objects.len(), records.len());
    assert_no_secret(&objects, &[PASSWORD, SECRET_KEY]);
    archiver.stop();
}
