//! Damage containment: a damaged or missing object removes only the instants that need it.
//! `list` shows the restorable windows with the holes between them, restores inside a window
//! work (and equal the source at that instant), and a target in a hole or after damage is
//! refused with exit code 6 and the same windows.
//!
//! Each test archives once and damages copies of the repository (the helpers that copy and
//! damage are shared with `verify`).

use std::path::{Path, PathBuf};

use tidemark::lsn::PgTimestamp;

use crate::spine::{
    restore_into, server_now, tidemark, wait_archived, wait_heartbeat_received, workload_step,
    Archiver, Archiving,
};
use crate::support::{self, snapshot_content, Cluster, ContentSnapshot};

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A copy of `repo` next to it, named `name`.
pub(crate) fn copy_of(repo: &Path, name: &str) -> PathBuf {
    let to = repo.with_file_name(name);
    copy_tree(repo, &to);
    to
}

/// A stored segment: its file, generation and commit times.
pub(crate) struct StoredSegment {
    pub(crate) path: PathBuf,
    pub(crate) generation: u32,
    pub(crate) commits: Vec<PgTimestamp>,
}

/// The segments of a local repository, by generation and LSN.
pub(crate) fn segments(repo: &Path) -> Vec<StoredSegment> {
    let mut out = Vec::new();
    let mut gens: Vec<_> = std::fs::read_dir(repo.join("segments"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    gens.sort();
    for g in gens {
        let mut files: Vec<_> = std::fs::read_dir(&g)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        files.sort();
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            let (info, commits) = tidemark::segment::read_info(&bytes).unwrap();
            out.push(StoredSegment {
                path,
                generation: info.generation,
                commits: commits.iter().map(|c| c.commit_time).collect(),
            });
        }
    }
    out
}

/// The manifests of a local repository, by backup id.
pub(crate) fn manifests(repo: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo.join("basebackups"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("manifest.json"))
        .filter(|p| p.exists())
        .collect();
    out.sort();
    out
}

fn at(t: &str) -> PgTimestamp {
    tidemark::exit::parse_time(t).unwrap()
}

fn list_text(repo: &Path) -> String {
    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "list of a damaged repository must still work: {out}{err}"
    );
    out
}

fn list_json(repo: &Path) -> serde_json::Value {
    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "list --json failed: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{out}"))
}

/// Restores `repo` to time `t` into a new database `db` and compares it with `expected`;
/// returns the restore's stdout.
async fn restores_to(
    cluster: &Cluster,
    repo: &Path,
    db: &str,
    t: &str,
    expected: &ContentSnapshot,
) -> String {
    let (code, out, err) = restore_into(cluster, repo.to_str().unwrap(), db, &["--to-time", t]);
    assert_eq!(
        code,
        0,
        "restore of {} to {t} failed: {out}{err}",
        repo.display()
    );
    let restored = snapshot_content(&cluster.client(db).await).await;
    support::assert_same_content(expected, &restored, &format!("restore to {t} ({db})"));
    out
}

/// Restores `repo` with `to` into a new database `db`, expecting exit code 6 (target outside
/// the windows); returns stderr.
fn refused(cluster: &Cluster, repo: &Path, db: &str, to: &[&str]) -> String {
    let (code, out, err) = restore_into(cluster, repo.to_str().unwrap(), db, to);
    assert_eq!(
        code, 6,
        "restore {to:?} must be refused with exit code 6: {out}{err}"
    );
    assert!(
        (err.contains("restorable windows:") || err.contains("nothing is restorable"))
            && err.contains("HINT"),
        "the refusal must list the windows: {err}"
    );
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_missing_objects_remove_only_the_instants_that_need_them() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _dir,
        ..
    } = Archiving::start(&[]).await;
    // Instants 2..=5, each followed by a stored commit (so each is restorable), and a second
    // base backup after instant 2.
    let mut instants: Vec<(String, ContentSnapshot)> = Vec::new();
    for step in 2..=5 {
        workload_step(&src, step).await;
        let t = server_now(&src).await;
        instants.push((t, snapshot_content(&src).await));
        wait_archived(&src, "tidemark", &archiver.log).await;
        if step == 2 {
            let (code, out, err) = tidemark(&[
                "backup",
                "--source",
                &cluster.conninfo("app"),
                "--repo",
                repo.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "{out}{err}");
        }
    }
    let quiet = server_now(&src).await;
    wait_heartbeat_received(&src, "tidemark", &quiet, &archiver.log).await;
    archiver.stop();
    let (t3, at3) = &instants[1];
    let (t4, _) = &instants[2];
    let (t5, at5) = &instants[3];
    let backups = manifests(&repo);
    assert_eq!(backups.len(), 2, "two base backups expected");

    // 1. A segment deleted in the middle: the one with the first commit after instant 4.
    let deleted = copy_of(&repo, "deleted_segment");
    let hole = segments(&deleted)
        .into_iter()
        .find(|s| s.commits.iter().any(|c| *c > at(t4)))
        .expect("a segment after instant 4");
    std::fs::remove_file(&hole.path).unwrap();
    let text = list_text(&deleted);
    assert!(text.contains("gap"), "list must show the hole:\n{text}");
    restores_to(&cluster, &deleted, "deleted_t3", t3, at3).await;
    for (db, t) in [("deleted_t4", t4), ("deleted_t5", t5)] {
        let err = refused(&cluster, &deleted, db, &["--to-time", t]);
        assert!(err.contains("gap"), "the refusal must name the hole: {err}");
    }

    // 2. A flipped byte in the newest segment (where the latest commit time is read).
    let flipped = copy_of(&repo, "flipped_byte");
    let newest = segments(&flipped).pop().unwrap();
    let mut bytes = std::fs::read(&newest.path).unwrap();
    let i = bytes.len() - 40;
    bytes[i] ^= 0x20;
    assert!(
        tidemark::segment::read_info(&bytes).is_err(),
        "the flipped byte must be one the segment's checks see"
    );
    std::fs::write(&newest.path, &bytes).unwrap();
    let text = list_text(&flipped);
    assert!(
        text.contains("damaged"),
        "list must show the damage:\n{text}"
    );
    restores_to(&cluster, &flipped, "flipped_t5", t5, at5).await;
    let err = refused(&cluster, &flipped, "flipped_latest", &["--latest"]);
    assert!(err.contains("damaged"), "{err}");

    // The same for a byte flipped in the middle of it (a block, where the file has room for
    // one: only reading the whole segment sees that).
    let in_block = copy_of(&repo, "flipped_block");
    let newest = segments(&in_block).pop().unwrap();
    let mut bytes = std::fs::read(&newest.path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(&newest.path, &bytes).unwrap();
    let text = list_text(&in_block);
    assert!(
        text.contains("damaged"),
        "list must show the damage:\n{text}"
    );
    let err = refused(&cluster, &in_block, "flipped_block_latest", &["--latest"]);
    assert!(err.contains("damaged"), "{err}");

    // 3. One garbage manifest (the second backup's): the first one still serves.
    let garbage = copy_of(&repo, "garbage_manifest");
    let first_id = backups[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::write(
        garbage.join(backups[1].strip_prefix(&repo).unwrap()),
        b"{garbage",
    )
    .unwrap();
    let text = list_text(&garbage);
    assert!(
        text.contains("manifest.json cannot be used") && text.contains(&first_id),
        "list must name the garbage manifest and still show the other backup:\n{text}"
    );
    let out = restores_to(&cluster, &garbage, "garbage_t3", t3, at3).await;
    assert!(out.contains(&first_id), "the first backup serves: {out}");

    // 4. Every manifest deleted: the segments are there, nothing is restorable.
    let orphans = copy_of(&repo, "no_manifest");
    for m in &backups {
        std::fs::remove_file(orphans.join(m.strip_prefix(&repo).unwrap())).unwrap();
    }
    let text = list_text(&orphans);
    assert!(
        text.contains("segments of generation 1 exist") && text.contains("no base backup"),
        "{text}"
    );
    let err = refused(&cluster, &orphans, "no_manifest_latest", &["--latest"]);
    assert!(
        err.contains("segments of generation 1 exist") && !err.contains("holds no archive"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_leaves_a_hole_that_list_and_restore_agree_on() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _dir,
        ..
    } = Archiving::start(&[]).await;
    workload_step(&src, 2).await;
    let t_a = server_now(&src).await;
    let at_a = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    // More segments in generation 1, for a gap there later.
    for step in 3..=4 {
        workload_step(&src, step).await;
        wait_archived(&src, "tidemark", &archiver.log).await;
    }
    archiver.stop();

    // An administrator drops the slot; changes meanwhile are not archived.
    src.execute("SELECT pg_drop_replication_slot('tidemark')", &[])
        .await
        .unwrap();
    workload_step(&src, 5).await;
    let t_hole = server_now(&src).await;
    workload_step(&src, 6).await;

    let mut archiver = Archiver::start(&cluster, "app", &repo, &[]);
    archiver.wait_streaming(&src, "tidemark").await;
    assert!(
        archiver.log_text().contains("starting a new generation"),
        "{}",
        archiver.log_text()
    );
    workload_step(&src, 7).await;
    let t_b = server_now(&src).await;
    let at_b = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    let quiet = server_now(&src).await;
    wait_heartbeat_received(&src, "tidemark", &quiet, &archiver.log).await;
    archiver.stop();

    // list: two windows, one per generation, with the hole between them.
    let listing = list_json(&repo);
    let windows = listing["windows"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no windows:\n{listing:#}"));
    assert_eq!(windows.len(), 2, "{listing:#}");
    assert_eq!(
        (
            windows[0]["generation"].as_u64(),
            windows[1]["generation"].as_u64()
        ),
        (Some(1), Some(2)),
        "{listing:#}"
    );
    let time =
        |v: &serde_json::Value| -> PgTimestamp { serde_json::from_value(v.clone()).unwrap() };
    let hole = at(&t_hole);
    assert!(
        time(&windows[0]["latest_commit"]) <= hole && hole < time(&windows[1]["earliest"]),
        "{t_hole} must lie between the windows:\n{listing:#}"
    );
    let text = list_text(&repo);
    let lines: Vec<&str> = windows
        .iter()
        .map(|w| w["text"].as_str().unwrap())
        .collect();
    assert!(lines.iter().all(|l| text.contains(l)), "{text}");
    assert!(text.contains("generation 2 started anew"), "{text}");

    // restore agrees: the hole is refused naming both windows; either window restores.
    let err = refused(&cluster, &repo, "in_hole", &["--to-time", &t_hole]);
    assert!(lines.iter().all(|l| err.contains(l)), "{err}");
    restores_to(&cluster, &repo, "gen1", &t_a, &at_a).await;
    restores_to(&cluster, &repo, "gen2", &t_b, &at_b).await;

    // A gap in the old generation does not matter to a restore in the new one.
    let gap = copy_of(&repo, "old_gap");
    let old: Vec<StoredSegment> = segments(&gap)
        .into_iter()
        .filter(|s| s.generation == 1)
        .collect();
    assert!(old.len() >= 3, "generation 1 has {} segments", old.len());
    std::fs::remove_file(&old[old.len() / 2].path).unwrap();
    restores_to(&cluster, &gap, "gap_gen2", &t_b, &at_b).await;
}
