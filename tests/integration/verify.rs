//! `tidemark verify` and `tidemark status` on real archives: a sound archive verifies (exit 0);
//! a flipped byte in a segment, a truncated object, a missing segment and a missing base-backup
//! part are each named, exit 5; `--quick` finds what listings show (the missing segment, the
//! truncated part) but not the flipped byte. The same on an S3 repository. `status` reports a
//! healthy archive, and the hole a missing segment leaves.

use std::path::{Path, PathBuf};

use crate::damage::{copy_of, manifests, segments};
use crate::encryption::{flip_bit, key_of};
use crate::spine::{
    server_now, tidemark, tidemark_env, wait_archived, wait_heartbeat_received, workload_step,
    Archiving,
};
use crate::support::s3::S3Server;

/// The first table part of the repository's first base backup: its file.
fn first_part(repo: &Path) -> PathBuf {
    let m = &manifests(repo)[0];
    let manifest =
        tidemark::catalog::Manifest::from_json("manifest", &std::fs::read(m).unwrap()).unwrap();
    let part = manifest
        .tables
        .iter()
        .flat_map(|t| t.parts.iter())
        .next()
        .expect("a backup with a table part");
    repo.join(&part.key)
}

/// Cuts a file to half its length.
fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
}

fn verify(repo: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["verify", "--repo", repo.to_str().unwrap()];
    args.extend_from_slice(extra);
    tidemark(&args)
}

/// Verifies and expects damage: exit 5, every name in `names` on stdout.
fn damaged(repo: &Path, extra: &[&str], names: &[&str]) -> String {
    let (code, out, err) = verify(repo, extra);
    assert_eq!(
        code, 5,
        "verify {extra:?} must exit 5 on damage: {out}{err}"
    );
    for n in names {
        assert!(out.contains(n), "verify {extra:?} must name {n}:\n{out}");
    }
    assert!(
        err.contains("verify found") && err.contains("HINT"),
        "{err}"
    );
    out
}

/// An archive of a few workload steps, each its own segments, stopped after a heartbeat.
async fn archive() -> Archiving {
    let a = Archiving::start(&[]).await;
    for step in 2..=5 {
        workload_step(&a.src, step).await;
        wait_archived(&a.src, "tidemark", &a.archiver.log).await;
    }
    let quiet = server_now(&a.src).await;
    wait_heartbeat_received(&a.src, "tidemark", &quiet, &a.archiver.log).await;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_damaged_or_missing_object_and_quick_only_what_listings_show() {
    let Archiving {
        archiver,
        repo,
        dir: _dir,
        ..
    } = archive().await;
    archiver.stop();
    let stored = segments(&repo);
    assert!(stored.len() >= 3, "{} segments", stored.len());

    // Sound: exit 0, every window checked and restorable.
    let (code, out, err) = verify(&repo, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("no damage found") && out.contains("— ok"),
        "{out}"
    );
    let (code, out, err) = verify(&repo, &["--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(
        report["checked"]["segments"].as_u64(),
        Some(stored.len() as u64)
    );
    assert!(report["windows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|w| w["restorable"] == true));
    assert!(report["checked"]["bytes_read"].as_u64().unwrap() > 0);

    // A repository that holds nothing (a wrong --repo) is no sound archive: exit 4.
    let empty = repo.with_file_name("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, out, err) = verify(&empty, &[]);
    assert!(
        code == 4 && err.contains("holds no archive"),
        "{code} {out}{err}"
    );

    // A flipped byte in the first segment (list reads only the last ones): named, exit 5;
    // --quick reads no segment and does not see it.
    let flipped = copy_of(&repo, "flipped");
    let first = &segments(&flipped)[0].path;
    let first_key = key_of(&flipped, first);
    flip_bit(first);
    let (code, out, err) = tidemark(&["list", "--repo", flipped.to_str().unwrap()]);
    assert!(
        code == 0 && !out.contains("damaged"),
        "list does not read it: {out}{err}"
    );
    let out = damaged(
        &flipped,
        &[],
        &[&first_key, "is damaged", "window not restorable"],
    );
    assert!(out.contains("NOT RESTORABLE"), "{out}");
    let (code, out, err) = verify(&flipped, &["--quick"]);
    assert_eq!(code, 0, "--quick does not read bodies: {out}{err}");
    let (code, out, _) = verify(&flipped, &["--json"]);
    assert_eq!(code, 5);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"damaged_segment") && kinds.contains(&"broken_window"),
        "{report:#}"
    );

    // A truncated segment and a truncated part: each named; --quick sees the part (its size
    // is in the manifest).
    let cut = copy_of(&repo, "truncated");
    let segment = &segments(&cut)[1].path;
    let segment_key = key_of(&cut, segment);
    truncate(segment);
    let part = first_part(&cut);
    let part_key = key_of(&cut, &part);
    truncate(&part);
    damaged(&cut, &[], &[&segment_key, &part_key, "truncated"]);
    let out = damaged(&cut, &["--quick"], &[&part_key]);
    assert!(
        !out.contains(&segment_key),
        "--quick cannot see a segment's truncation: {out}"
    );

    // A missing segment in the middle: the gap between its neighbours, named by LSN range and
    // both neighbours; --quick finds it too.
    let gone = copy_of(&repo, "missing_segment");
    let chain = segments(&gone);
    let (before, middle, after) = (&chain[0].path, &chain[1].path, &chain[2].path);
    let (before, after) = (key_of(&gone, before), key_of(&gone, after));
    std::fs::remove_file(middle).unwrap();
    for extra in [&[][..], &["--quick"][..]] {
        damaged(&gone, extra, &["gap", &before, &after]);
    }

    // A missing base-backup part: named with its backup.
    let no_part = copy_of(&repo, "missing_part");
    let part = first_part(&no_part);
    let part_key = key_of(&no_part, &part);
    let backup = part_key.split('/').nth(1).unwrap().to_string();
    std::fs::remove_file(&part).unwrap();
    for extra in [&[][..], &["--quick"][..]] {
        damaged(&no_part, extra, &[&part_key, &backup, "missing"]);
    }

    // --from: only what instants from then on need. From the first instant, the window's one
    // backup and every segment after it (the flipped one too); from the last archived commit
    // on, nothing is restorable, so nothing is needed.
    let earliest = listed(&flipped, "earliest_restorable");
    damaged(&flipped, &["--from", &earliest], &[&first_key]);
    let last = listed(&flipped, "latest_restorable_before");
    let (code, out, err) = verify(&flipped, &["--from", &last]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("not checked (before --from)") && out.contains("0 segment(s)"),
        "{out}"
    );
}

/// A field of `list --json` (an instant).
fn listed(repo: &Path, field: &str) -> String {
    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[field].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_on_s3_names_a_flipped_segment_and_a_missing_part() {
    let server = S3Server::with_bucket("archive");
    let env = server.cli_env(&server.endpoint);
    let a = Archiving::builder()
        .repo_url("s3://archive/app")
        .env(&env)
        .start()
        .await;
    for step in 2..=4 {
        workload_step(&a.src, step).await;
        wait_archived(&a.src, "tidemark", &a.archiver.log).await;
    }
    a.archiver.stop();
    let url = a.url.clone();
    let (code, out, err) = tidemark_env(&env, &["verify", "--repo", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no damage found"), "{out}");

    // Damage two objects where the S3 server keeps them.
    let root = server.bucket_dir("archive").join("app");
    let segment = segments(&root).remove(0).path;
    let segment_key = key_of(&root, &segment);
    let part = first_part(&root);
    let part_key = key_of(&root, &part);
    flip_bit(&segment);
    std::fs::remove_file(&part).unwrap();
    let (code, out, err) = tidemark_env(&env, &["verify", "--repo", &url]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        out.contains(&segment_key) && out.contains(&part_key),
        "{out}"
    );
    let (code, out, err) = tidemark_env(&env, &["verify", "--repo", &url, "--quick"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        out.contains(&part_key) && !out.contains(&segment_key),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_healthy_archive_and_the_hole_a_missing_segment_leaves() {
    let Archiving {
        archiver,
        repo,
        dir: _dir,
        ..
    } = archive().await;
    archiver.stop();
    let r = repo.to_str().unwrap();
    let (code, out, err) = tidemark(&["status", "--repo", r]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("healthy") && !out.contains("NOT HEALTHY"),
        "{out}"
    );
    assert!(out.contains("last drill: no drill recorded"), "{out}");
    let (code, out, err) = tidemark(&["status", "--repo", r, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["healthy"], true, "{s:#}");
    let backup = manifests(&repo)[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        s["last_backup"]["id"].as_str(),
        Some(backup.as_str()),
        "{s:#}"
    );
    let age = s["last_commit"]["age_seconds"].as_f64().unwrap();
    assert!((0.0..600.0).contains(&age), "{s:#}");
    assert_eq!(s["windows"].as_array().unwrap().len(), 1, "{s:#}");
    assert!(s["last_drill"].is_null(), "{s:#}");
    // A repository a few minutes old is no breach of 30 dailies.
    let daily = s["retention"]["tiers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tier"] == "daily")
        .unwrap();
    assert_eq!(
        (
            daily["kept"].as_u64(),
            daily["expected"].as_u64(),
            daily["breached"].as_bool()
        ),
        (Some(1), Some(0), Some(false)),
        "{s:#}"
    );
    let stored: u64 = segments(&repo)
        .iter()
        .map(|seg| std::fs::metadata(&seg.path).unwrap().len())
        .sum();
    assert_eq!(
        s["sizes"]["change_log"]["bytes"].as_u64(),
        Some(stored),
        "{s:#}"
    );
    assert_eq!(
        s["sizes"]["tiers"]["daily"]["backups"].as_u64(),
        Some(1),
        "{s:#}"
    );

    // A missing segment: the damage, and a change window no longer restorable to its end.
    let gone = copy_of(&repo, "missing_segment");
    std::fs::remove_file(&segments(&gone)[1].path).unwrap();
    let (code, out, err) = tidemark(&["status", "--repo", gone.to_str().unwrap()]);
    assert_eq!(code, 0, "status reports, it does not fail: {out}{err}");
    assert!(
        out.contains("NOT HEALTHY") && out.contains("gap") && out.contains("change window"),
        "{out}"
    );

    // A drill's stored result (proto/status.md) is shown.
    let drilled = copy_of(&repo, "drilled");
    std::fs::create_dir_all(drilled.join("drills")).unwrap();
    std::fs::write(
        drilled.join("drills/20261201T020000.000000Z-00000000000000ab.json"),
        br#"{"format_version": 1, "started_at": "2026-12-01T02:00:00.000000Z", "finished_at": "2026-12-01T02:03:00.000000Z", "ok": false, "rto_seconds": 180.5, "rpo_seconds": 1.0}"#,
    )
    .unwrap();
    let (code, out, err) = tidemark(&["status", "--repo", drilled.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("last drill: 2026-12-01 02:03:00") && out.contains("FAILED, RTO 180.5s"),
        "{out}"
    );
}
