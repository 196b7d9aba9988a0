//! Scheduled base backups inside `archive`, and the one-backup-at-a-time lock: the schedule
//! fires while archiving under writes and a restore from its backup equals the source; a
//! manual `backup` while a scheduled one runs waits or gives up clearly; kill -9 in the middle
//! of a scheduled backup leaves no backup listed and the next run takes the missed one at start;
//! on S3 a manual `backup` beside a running one gives up naming it, and runs once it ends.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::archiving::{
    restore_latest_equals, tidemark, tidemark_env, wait_archived, workload_step, Archiver,
    Archiving,
};
use crate::support::{self, snapshot_content, Cluster, ClusterOptions};

/// The ids of the complete base backups `list --json` shows, oldest first.
fn listed_backups(repo: &str) -> Vec<String> {
    let (code, out, err) = tidemark(&["list", "--repo", repo, "--json"]);
    assert_eq!(code, 0, "list failed: {out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    listing["generations"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["backups"].as_array().cloned().unwrap_or_default())
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the archiver's log holds `needle` at least `n` times.
fn wait_log(archiver: &mut Archiver, needle: &str, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while archiver.log_text().matches(needle).count() < n {
        archiver.assert_running();
        assert!(
            Instant::now() < deadline,
            "no {n} × {needle:?} in the archiver's log:\n{}",
            archiver.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A table big enough (about 70 MB of COPY text) that a base backup of it takes seconds.
const BIG: &str = "
    CREATE TABLE big (id int PRIMARY KEY, pad text);
    INSERT INTO big SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 500000) i;
    CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());
";

/// Waits until the archiver has started a scheduled backup and written its first part.
fn wait_scheduled_backup_running(archiver: &mut Archiver, repo: &Path) {
    wait_log(
        archiver,
        "taking a scheduled base backup",
        1,
        Duration::from_secs(60),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !backup_in_progress(repo) {
        assert!(Instant::now() < deadline, "no scheduled backup in progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backup folder with objects and no manifest: a backup being taken (or killed).
fn backup_in_progress(repo: &Path) -> bool {
    let Ok(dirs) = std::fs::read_dir(repo.join("basebackups")) else {
        return false;
    };
    dirs.flatten().any(|d| {
        let p = d.path();
        !p.join("manifest.json").exists()
            && std::fs::read_dir(&p).is_ok_and(|mut f| f.next().is_some())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_fire_while_archiving_and_restore_to_latest_from_them() {
    let Archiving {
        cluster,
        src,
        mut archiver,
        url,
        dir: _dir,
        ..
    } = Archiving::start(&["--base-backup-every", "4s"]).await;
    // Writes all along, from another connection.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = cluster.client("app").await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut step = 2;
            while !stop.load(Ordering::SeqCst) {
                workload_step(&client, step).await;
                step += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            step
        })
    };
    let log = archiver.log.clone();
    tokio::task::block_in_place(|| {
        wait_log(
            &mut archiver,
            "scheduled base backup stored",
            2,
            Duration::from_secs(120),
        )
    });
    let steps = {
        stop.store(true, Ordering::SeqCst);
        writer.await.unwrap()
    };
    assert!(steps > 4, "the workload ran during the backups ({steps})");
    src.execute("INSERT INTO docs (title) VALUES ('after')", &[])
        .await
        .unwrap();
    let expected = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &log).await;
    let text = archiver.log_text();
    archiver.stop();
    assert!(text.contains("scheduled base backups"), "{text}");

    // Retention (the defaults: one daily per day) ran after each scheduled backup: of the
    // backups taken today only the newest stays as a daily, plus the oldest, which is the base
    // the change window needs.
    assert!(
        text.contains("retention applied after the scheduled base backup"),
        "{text}"
    );
    let stored = text.matches("scheduled base backup stored").count();
    let backups = listed_backups(&url);
    // A backup stored after the last retention pass (just before the stop) may still be listed.
    assert!(
        backups.len() >= 2 && backups.len() <= stored,
        "the window's base and the newest daily of {stored} scheduled: {backups:?}"
    );
    let newest = backups.last().unwrap();
    assert!(
        text.contains(&format!("backup={newest}")) || text.contains(newest.as_str()),
        "the newest listed backup is a scheduled one: {newest}\n{text}"
    );
    cluster.create_database("restored");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        &url,
        "--target",
        &cluster.conninfo("restored"),
        "--latest",
    ]);
    assert_eq!(code, 0, "restore --latest failed: {out}{err}");
    assert!(
        out.contains(newest.as_str()),
        "restored from the newest scheduled backup {newest}: {out}"
    );
    let restored = snapshot_content(&cluster.client("restored").await).await;
    support::assert_same_content(
        &expected,
        &restored,
        "restore --latest from a scheduled backup",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_backup_while_a_scheduled_one_runs_gives_up_or_waits_for_it() {
    let Archiving {
        cluster,
        mut archiver,
        repo,
        url,
        dir: _dir,
        ..
    } = Archiving::builder()
        .sql(BIG)
        .args(&["--base-backup-every", "3s", "--parallel", "1"])
        .start()
        .await;
    let source = cluster.conninfo("app");
    tokio::task::block_in_place(|| wait_scheduled_backup_running(&mut archiver, &repo));
    let (code, out, err) = tidemark(&[
        "backup",
        "--source",
        &source,
        "--repo",
        &url,
        "--lock-wait",
        "1s",
    ]);
    assert!(
        !archiver.log_text().contains("scheduled base backup stored"),
        "the scheduled backup finished before the manual one gave up: make BIG bigger"
    );
    assert_eq!(code, 4, "gives up with exit 4: {out}{err}");
    assert!(
        err.contains("another base backup is running")
            && err.contains(&format!("pid {}", archiver.pid()))
            && err.contains("--lock-wait"),
        "names the holder and what to do: {err}"
    );
    // With time to wait, it waits (saying so), then takes its own after the scheduled one.
    let before = listed_backups(&url).len();
    let (code, out, err) = tidemark_env(
        &[("TIDEMARK_LOG", "info".into())],
        &[
            "backup",
            "--source",
            &source,
            "--repo",
            &url,
            "--lock-wait",
            "5m",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("another base backup is running: waiting for its lock"),
        "{err}"
    );
    assert!(
        archiver.log_text().contains("scheduled base backup stored"),
        "it waited for the scheduled one:\n{}",
        archiver.log_text()
    );
    assert!(listed_backups(&url).len() >= before + 2);
    archiver.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_scheduled_backup_lists_no_backup_and_the_next_run_takes_the_missed_one() {
    let flags = [
        "--base-backup-every",
        "6s",
        "--base-backup-lock-ttl",
        "4s",
        "--parallel",
        "1",
    ];
    let Archiving {
        cluster,
        src,
        mut archiver,
        repo,
        url,
        dir: _dir,
        ..
    } = Archiving::builder().sql(BIG).args(&flags).start().await;
    src.execute("INSERT INTO ticks DEFAULT VALUES", &[])
        .await
        .unwrap();
    tokio::task::block_in_place(|| wait_scheduled_backup_running(&mut archiver, &repo));
    assert!(
        !archiver.log_text().contains("scheduled base backup stored"),
        "the backup finished before the kill: make BIG bigger"
    );
    archiver.kill();
    let backups = listed_backups(&url);
    assert_eq!(
        backups.len(),
        1,
        "only the first backup: the killed one is not listed: {backups:?}"
    );
    assert!(backup_in_progress(&repo), "its parts are left for prune");

    // Restarted more than the interval after the newest backup: the missed one runs at start,
    // once the dead archiver's lock has expired.
    src.execute("INSERT INTO ticks DEFAULT VALUES", &[])
        .await
        .unwrap();
    let mut archiver = Archiver::start(&cluster, "app", &repo, &flags);
    archiver.wait_streaming(&src, "tidemark").await;
    tokio::task::block_in_place(|| {
        wait_log(
            &mut archiver,
            "a scheduled base backup was missed",
            1,
            Duration::from_secs(30),
        );
        wait_log(
            &mut archiver,
            "scheduled base backup stored",
            1,
            Duration::from_secs(180),
        );
    });
    let expected = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    let after = listed_backups(&url);
    assert!(after.len() >= 2, "the missed backup was taken: {after:?}");
    cluster.create_database("restored");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        &url,
        "--target",
        &cluster.conninfo("restored"),
        "--latest",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(after.last().unwrap().as_str()), "{out}");
    let restored = snapshot_content(&cluster.client("restored").await).await;
    support::assert_same_content(&expected, &restored, "restore after the missed backup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_archive_waits_for_a_running_manual_backup_and_takes_it_as_its_base() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("app");
    cluster.psql("app", BIG);
    let source = cluster.conninfo("app");
    let (code, out, err) = tidemark(&["setup", "--source", &source]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let url = repo.to_str().unwrap().to_string();
    let manual = {
        let (source, url) = (source.clone(), url.clone());
        std::thread::spawn(move || {
            tidemark(&[
                "backup",
                "--source",
                &source,
                "--repo",
                &url,
                "--parallel",
                "1",
            ])
        })
    };
    tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !backup_in_progress(&repo) {
            assert!(Instant::now() < deadline, "the manual backup never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut archiver = Archiver::start(&cluster, "app", &repo, &[]);
    tokio::task::block_in_place(|| {
        wait_log(
            &mut archiver,
            "another base backup is running: waiting for its lock",
            1,
            Duration::from_secs(60),
        )
    });
    assert!(
        !archiver.log_text().contains("created slot"),
        "no slot while waiting"
    );
    let (code, out, err) = manual.join().unwrap();
    assert_eq!(code, 0, "the manual backup: {out}{err}");
    // Listed again under the lock, the manual backup is the slot's generation's base: the
    // archiver takes none of its own and streams from the slot.
    tokio::task::block_in_place(|| {
        wait_log(&mut archiver, "archiving", 1, Duration::from_secs(120))
    });
    let src = cluster.client("app").await;
    src.execute("INSERT INTO ticks DEFAULT VALUES", &[])
        .await
        .unwrap();
    let expected = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log.clone()).await;
    let text = archiver.log_text();
    archiver.stop();
    assert!(
        text.contains("released the base-backup lock")
            && !text.contains("base backup stored")
            && !text.contains("created slot"),
        "waited, then used the manual backup:\n{text}"
    );
    assert_eq!(listed_backups(&url).len(), 1, "the manual one only");
    restore_latest_equals(&cluster, &url, "restored", &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_manual_backup_beside_a_running_one_gives_up_naming_it_then_runs_once_it_ends() {
    let s3 = support::s3::S3Server::with_bucket("locks");
    let env = s3.cli_env(&s3.endpoint);
    let url = "s3://locks/app";
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("app");
    cluster.psql("app", BIG);
    let source = cluster.conninfo("app");
    let (code, out, err) = tidemark(&["setup", "--source", &source]);
    assert_eq!(code, 0, "{out}{err}");
    let backup = [
        "backup",
        "--source",
        &source,
        "--repo",
        url,
        "--parallel",
        "1",
    ];
    let mut first = std::process::Command::new(support::tidemark_bin())
        .args(backup)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TIDEMARK_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Its first part stored (the server keeps objects as files): it holds the lock, taken
    // before any object of the backup.
    let stored = s3.bucket_dir("locks").join("app");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !backup_in_progress(&stored) {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first backup ended early"
        );
        assert!(Instant::now() < deadline, "the first backup never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = backup.to_vec();
    second.extend(["--lock-wait", "0s"]);
    let (code, out, err) = tidemark_env(&env, &second);
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("another base backup is running")
            && err.contains(&format!("pid {}", first.id()))
            && err.contains("--lock-wait"),
        "names the running backup: {err}"
    );
    assert!(first.wait().unwrap().success(), "the first backup");
    // Released: the next one takes the lock at once.
    let (code, out, err) = tidemark_env(&env, &second);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", url, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listing["generations"][0]["backups"]
            .as_array()
            .map(Vec::len),
        Some(2),
        "{out}"
    );
}
