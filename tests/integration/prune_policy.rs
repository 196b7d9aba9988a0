//! Pruning to a retention policy on real PostgreSQL: what stays restorable is every instant of
//! the change window and each retained backup's own instant; a pruned instant is refused naming
//! what is left; `--dry-run` deletes nothing; prune beside an archiver under load keeps the
//! archive restorable to its latest commit.

use std::path::Path;
use std::time::Duration;

use crate::support::archiving::{
    restore_into, restore_latest_equals, server_now, tidemark, tidemark_env, wait_archived,
    workload_step, Archiving,
};
use crate::support::s3::S3Server;
use crate::support::{self, snapshot_content};

/// Every file of the repository, recursively, relative to it.
fn files(repo: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(repo, repo, &mut out);
    out.sort();
    out
}

/// Takes a manual backup with `tag`; returns its id.
fn backup(source: &str, repo: &str, tag: &str) -> String {
    let (code, out, err) = tidemark(&["backup", "--source", source, "--repo", repo, "--tag", tag]);
    assert_eq!(code, 0, "backup failed: {out}{err}");
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no id in {out}"))
        .to_string()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_to_a_policy_keeps_the_change_window_and_the_retained_backups_instants() {
    let Archiving {
        cluster,
        src,
        mut archiver,
        repo,
        url,
        dir: _dir,
    } = Archiving::start(&[]).await;
    let source = cluster.conninfo("app");
    let log = archiver.log.clone();

    // The initial backup (B0), then an instant t1 that only B0's segments reach.
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &log).await;
    let t1 = server_now(&src).await;
    workload_step(&src, 3).await;
    wait_archived(&src, "tidemark", &log).await;

    // Two manual backups; nothing is written while each is taken, so the content after it is
    // the content at its instant.
    let b1 = backup(&source, &url, "first");
    let at_b1 = snapshot_content(&src).await;
    workload_step(&src, 4).await;
    wait_archived(&src, "tidemark", &log).await;
    let b2 = backup(&source, &url, "second");
    // The change window (4 s) will start after b2 and before t3.
    tokio::time::sleep(Duration::from_secs(6)).await;
    workload_step(&src, 5).await;
    wait_archived(&src, "tidemark", &log).await;
    let t3 = server_now(&src).await;
    let at_t3 = snapshot_content(&src).await;
    workload_step(&src, 6).await;
    wait_archived(&src, "tidemark", &log).await;
    let listed = json(&tidemark(&["list", "--repo", &url, "--json"]).1);
    let b0 = listed["generations"][0]["backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(listed["generations"][0]["backups"][0]["origin"], "initial");
    assert_ne!(b0, b1);

    let policy = [
        "--retain-daily",
        "0",
        "--retain-weekly",
        "0",
        "--retain-monthly",
        "0",
        "--retain-manual",
        "2",
        "--retain-changes",
        "4s",
    ];
    // --dry-run: the plan, and nothing deleted.
    let before = files(&repo);
    let mut args = vec!["prune", "--repo", &url, "--json", "--dry-run"];
    args.extend(policy);
    let (code, out, err) = tidemark(&args);
    assert_eq!(code, 0, "{out}{err}");
    let dry = json(&out);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["backups"][0]["id"], b0.as_str(), "{out}");
    assert!(
        dry["segments"].as_array().is_some_and(|s| !s.is_empty()),
        "{out}"
    );
    assert_eq!(files(&repo), before, "--dry-run deleted something");

    let mut args = vec!["prune", "--repo", &url, "--json"];
    args.extend(policy);
    let (code, out, err) = tidemark(&args);
    assert_eq!(code, 0, "{out}{err}");
    let report = json(&out);
    assert_eq!(report["backups"].as_array().unwrap().len(), 1, "{out}");
    let reasons = |id: &str| -> Vec<String> {
        report["kept"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id)
            .map(|k| {
                k["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(reasons(&b1), ["manual"], "{out}");
    assert_eq!(reasons(&b2), ["newest", "change_window", "manual"], "{out}");
    let after = files(&repo);
    assert!(
        !after.iter().any(|f| f.contains(&b0)),
        "B0 must be gone: {after:?}"
    );
    let removed: Vec<&str> = report["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert!(!removed.is_empty());
    assert!(removed.iter().all(|k| !after.iter().any(|f| f == k)));

    // list: B1 is a point, with its tiers and tag; B2 opens the window.
    let listed = json(&tidemark(&["list", "--repo", &url, "--json"]).1);
    assert_eq!(listed["points"][0]["backup"], b1.as_str(), "{listed}");
    let backups = listed["generations"][0]["backups"].as_array().unwrap();
    let l1 = backups.iter().find(|b| b["id"] == b1.as_str()).unwrap();
    assert_eq!(
        (&l1["tag"], &l1["origin"]),
        (&"first".into(), &"manual".into())
    );
    assert_eq!(listed["windows"][0]["backups"][0], b2.as_str(), "{listed}");

    // What stays restorable: the window's instants and --latest, and B1's own instant.
    let (code, out, err) = restore_into(&cluster, &url, "at_t3", &["--to-time", &t3]);
    assert_eq!(code, 0, "restore to {t3}: {out}{err}");
    support::assert_same_content(
        &at_t3,
        &snapshot_content(&cluster.client("at_t3").await).await,
        "restore to t3 after prune",
    );
    let (code, out, err) = restore_into(&cluster, &url, "at_b1", &["--to-backup", &b1]);
    assert_eq!(code, 0, "restore --to-backup {b1}: {out}{err}");
    support::assert_same_content(
        &at_b1,
        &snapshot_content(&cluster.client("at_b1").await).await,
        "restore --to-backup of a backup whose segments were pruned",
    );
    // A pruned instant is refused, naming the window and the nearest restorable instants.
    let (code, out, err) = restore_into(&cluster, &url, "at_t1", &["--to-time", &t1]);
    assert_eq!(
        code, 6,
        "restore to pruned {t1} must be refused: {out}{err}"
    );
    assert!(
        err.contains("nearest restorable instants")
            && err.contains(&format!("--to-backup {b1}"))
            && err.contains("generation 1: --to-time from"),
        "{err}"
    );

    // Prune beside the archiver under load: the archive stays restorable to its latest.
    let load = {
        let c = cluster.client("app").await;
        tokio::spawn(async move {
            for step in 10..25 {
                workload_step(&c, step).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    for _ in 0..3 {
        let mut args = vec!["prune", "--repo", &url];
        args.extend(&policy[..8]);
        args.extend(["--retain-changes", "1s"]);
        let (code, out, err) = tidemark(&args);
        assert_eq!(code, 0, "prune under load: {out}{err}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    load.await.unwrap();
    wait_archived(&src, "tidemark", &log).await;
    archiver.assert_running();
    let latest = snapshot_content(&src).await;
    restore_latest_equals(&cluster, &url, "latest_after_prune", &latest).await;
    archiver.stop();
}

/// Restores `url` (on S3, reached with `env`) with `to` into a new database `db`.
fn restore_env(
    cluster: &crate::support::Cluster,
    env: &[(&'static str, String)],
    url: &str,
    db: &str,
    to: &[&str],
) -> (i32, String, String) {
    cluster.create_database(db);
    let target = cluster.conninfo(db);
    let mut args = vec!["restore", "--repo", url, "--target", &target];
    args.extend_from_slice(to);
    tidemark_env(env, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_an_s3_repository_keeps_the_change_window() {
    let server = S3Server::with_bucket("archive");
    let env = server.cli_env(&server.endpoint);
    let Archiving {
        cluster,
        src,
        archiver,
        url,
        dir: _dir,
        ..
    } = Archiving::builder()
        .repo_url("s3://archive/app")
        .env(&env)
        .start()
        .await;
    let log = archiver.log.clone();
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &log).await;
    let t1 = server_now(&src).await;
    workload_step(&src, 3).await;
    wait_archived(&src, "tidemark", &log).await;
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "backup",
            "--source",
            &cluster.conninfo("app"),
            "--repo",
            &url,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let b1 = out.split_whitespace().nth(2).unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(5)).await;
    workload_step(&src, 4).await;
    wait_archived(&src, "tidemark", &log).await;
    let t2 = server_now(&src).await;
    let at_t2 = snapshot_content(&src).await;
    // A commit after t2, archived: t2 is restorable.
    workload_step(&src, 5).await;
    wait_archived(&src, "tidemark", &log).await;
    let before = server.objects("archive");
    let b0 = before
        .keys()
        .find_map(|k| {
            let id = k.strip_prefix("app/basebackups/")?.split('/').next()?;
            (id != b1).then(|| id.to_string())
        })
        .expect("the initial backup");

    let (code, out, err) = tidemark_env(
        &env,
        &[
            "prune",
            "--repo",
            &url,
            "--json",
            "--retain-daily",
            "0",
            "--retain-weekly",
            "0",
            "--retain-monthly",
            "0",
            "--retain-manual",
            "0",
            "--retain-changes",
            "3s",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let report = json(&out);
    assert_eq!(report["backups"][0]["id"], b0.as_str(), "{out}");
    let after = server.objects("archive");
    assert!(
        !after.keys().any(|k| k.contains(&b0)),
        "the dropped backup's objects must be gone"
    );
    let gone = report["segments"].as_array().unwrap();
    assert!(!gone.is_empty(), "{out}");
    for s in gone {
        let key = format!("app/{}", s["key"].as_str().unwrap());
        assert!(
            before.contains_key(&key) && !after.contains_key(&key),
            "{key}"
        );
    }

    let (code, out, err) = restore_env(&cluster, &env, &url, "s3_t2", &["--to-time", &t2]);
    assert_eq!(code, 0, "{out}{err}");
    support::assert_same_content(
        &at_t2,
        &snapshot_content(&cluster.client("s3_t2").await).await,
        "restore from S3 to an instant of the change window after prune",
    );
    let (code, out, err) = restore_env(&cluster, &env, &url, "s3_t1", &["--to-time", &t1]);
    assert_eq!(code, 6, "a pruned instant must be refused: {out}{err}");
    assert!(err.contains("nearest restorable instants"), "{err}");
    let latest = snapshot_content(&src).await;
    let (code, out, err) = restore_env(&cluster, &env, &url, "s3_latest", &["--latest"]);
    assert_eq!(code, 0, "{out}{err}");
    support::assert_same_content(
        &latest,
        &snapshot_content(&cluster.client("s3_latest").await).await,
        "restore --latest from S3 after prune",
    );
    archiver.stop();
}
