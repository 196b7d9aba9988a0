//! The fault matrix: each fault, at a moment it can really happen, ends with an archive that
//! restores exactly at every instant noted while it ran (and `--latest` equals the source).
//! Rows here: kill -9 during base backups; a store answering retryable errors to puts, then full.
//! Faults elsewhere in the suite: kill -9 of the archiver while streaming (crash.rs), a dropped
//! connection and a source crash (resilience.rs), failed and lost uploads (faults.rs, s3.rs),
//! damaged objects (damage.rs), a restore killed or failing midway (bad_input.rs).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spine::{
    self, restore_each_instant, restore_latest_equals, server_now, wait_archived, workload_step,
    Archiver, Archiving, Prepared, SCHEMA,
};
use crate::support::{self, snapshot_content, ContentSnapshot};

/// Enough data that a base backup takes a while: it can be killed midway.
const BULK: &str = "CREATE TABLE bulk (id int PRIMARY KEY, pad text);
    INSERT INTO bulk SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 150000) g;";

/// Backup folders in the repository, each with whether it has its manifest.
fn backup_folders(repo: &Path) -> Vec<(String, bool, usize)> {
    let Ok(entries) = std::fs::read_dir(repo.join("basebackups")) else {
        return vec![];
    };
    let mut out: Vec<(String, bool, usize)> = entries
        .flatten()
        .map(|e| {
            let files = walk(&e.path());
            let name = e.file_name().to_string_lossy().into_owned();
            let complete = e.path().join("manifest.json").exists();
            (name, complete, files)
        })
        .collect();
    out.sort();
    out
}

fn walk(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        // A killed put's temporary file is not an object (no listing shows it).
                        usize::from(!e.file_name().to_string_lossy().starts_with(".tmp-"))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Waits until a backup folder beyond the first `known` holds table parts, without a manifest.
async fn wait_backup_midway(repo: &Path, known: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let folders = backup_folders(repo);
        if folders.len() > known {
            let (name, complete, files) = &folders[folders.len() - 1];
            assert!(
                !complete,
                "{what}: backup {name} completed before it could be killed"
            );
            if *files >= 2 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no backup started: {folders:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn note_instant(
    src: &tokio_postgres::Client,
    step: i32,
    instants: &mut Vec<(String, ContentSnapshot)>,
) {
    workload_step(src, step).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    instants.push((server_now(src).await, snapshot_content(src).await));
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn kill_9_during_base_backups_loses_nothing() {
    let Prepared {
        cluster,
        src,
        repo,
        dir: _dir,
        ..
    } = Archiving::builder().sql(SCHEMA).sql(BULK).prepare().await;
    workload_step(&src, 1).await;
    let repo_arg = repo.to_str().unwrap();

    // The archiver killed during the repository's first base backup.
    let archiver = Archiver::start(&cluster, "app", &repo, &[]);
    wait_backup_midway(&repo, 0, "first base backup").await;
    archiver.kill();

    let mut instants = Vec::new();
    let mut archiver = Archiver::start(&cluster, "app", &repo, &[]);
    archiver.wait_streaming(&src, "tidemark").await;
    // The killed archiver's base-backup lock is taken over at once (its writer lease was),
    // not waited for until it expires.
    let text = archiver.log_text();
    assert!(
        text.contains("held by the archiver whose writer lease this one took over"),
        "the dead archiver's lock taken over:\n{text}"
    );
    for step in 2..3 {
        note_instant(&src, step, &mut instants).await;
    }

    // `tidemark backup` killed midway while the archiver runs.
    let known = backup_folders(&repo).len();
    let mut backup = Command::new(support::tidemark_bin())
        .args([
            "backup",
            "--source",
            &cluster.conninfo("app"),
            "--repo",
            repo_arg,
        ])
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_backup_midway(&repo, known, "tidemark backup").await;
    backup.kill().unwrap();
    let _ = backup.wait();
    for step in 4..6 {
        note_instant(&src, step, &mut instants).await;
    }
    let latest = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    archiver.stop();

    let folders = backup_folders(&repo);
    assert_eq!(
        folders.iter().filter(|f| !f.1).count(),
        2,
        "both killed backups leave an incomplete folder: {folders:?}"
    );
    let (code, out, err) = spine::tidemark(&["list", "--repo", repo_arg]);
    assert_eq!(code, 0, "{out}{err}");
    restore_each_instant(&cluster, repo_arg, &[], &instants, "after_backup_kills").await;
    restore_latest_equals(&cluster, repo_arg, "after_backup_kills_latest", &latest).await;

    // prune removes both leftovers; the archive still restores.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (code, out, err) = spine::tidemark(&[
        "prune",
        "--repo",
        repo_arg,
        "--incomplete-backups",
        "--older-than",
        "1s",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let folders = backup_folders(&repo);
    assert!(
        folders.iter().all(|f| f.1 || f.2 == 0),
        "prune must remove the killed backups' objects: {folders:?}\n{out}"
    );
    restore_latest_equals(&cluster, repo_arg, "after_prune_latest", &latest).await;
}

/// Waits until the slot is streaming and the first base backup is stored.
async fn wait_in_process_streaming(src: &tokio_postgres::Client, repo: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let active = src
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'tidemark' AND active",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if active && backup_folders(repo).iter().any(|f| f.1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the archiver did not start streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_puts_and_a_full_store_lose_nothing() {
    use tidemark::store::faulty::{Fault, FaultyStore, Op, Times};
    use tidemark::store::{LocalStore, Store};

    let Prepared {
        cluster,
        src,
        repo,
        dir: _dir,
        ..
    } = Archiving::builder().prepare().await;
    let repo_arg = repo.to_str().unwrap();
    let local: Arc<dyn Store> = Arc::new(LocalStore::new(&repo));
    let faulty = Arc::new(FaultyStore::new(local));
    let store: Arc<dyn Store> = faulty.clone();
    let info = tidemark::conninfo::ConnInfo::parse(&cluster.conninfo("app")).unwrap();
    let opts = tidemark::archive::ArchiveOptions {
        heartbeat: Some(Duration::from_secs(1)),
        status_interval: Duration::from_secs(1),
        ..tidemark::archive::ArchiveOptions::default()
    };
    let run = tokio::spawn(async move {
        tidemark::archive::run(
            &info,
            store,
            &opts,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
    });
    wait_in_process_streaming(&src, &repo).await;
    let mut instants = Vec::new();
    note_instant(&src, 2, &mut instants).await;

    // Puts answer retryable errors six times: the uploader retries them, nothing is lost.
    faulty.add_fault(Op::Put, Fault::Retryable, Times::N(6));
    note_instant(&src, 3, &mut instants).await;
    note_instant(&src, 4, &mut instants).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while faulty.injected(Op::Put) < 6 {
        assert!(Instant::now() < deadline, "the faults were not met");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored_before_full = snapshot_content(&src).await;
    // Waits until everything so far is stored (a commit past it is acknowledged).
    let marker: String = src
        .query_one(
            "SELECT pg_logical_emit_message(true, 'test.sync', 'x')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let marker: tidemark::lsn::Lsn = marker.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed: String = src
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'tidemark'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if confirmed.parse::<tidemark::lsn::Lsn>().unwrap() >= marker {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing acknowledged after the retryable faults"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    instants.push((server_now(&src).await, stored_before_full));

    // The store fills up: the run stops with a storage error (exit code 4), and nothing past
    // what is stored is acknowledged.
    faulty.add_fault(Op::Put, Fault::DiskFull, Times::Always);
    note_instant(&src, 5, &mut instants).await;
    let e = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("a full store stops the run")
        .unwrap()
        .expect_err("a full store stops the run");
    let e = anyhow::Error::new(e);
    assert_eq!(
        tidemark::exit::exit_code(&e),
        4,
        "{}",
        tidemark::exit::render(&e)
    );
    note_instant(&src, 6, &mut instants).await;

    // Space is freed; the next run resumes at the archive's end.
    faulty.clear_faults();
    let mut archiver = Archiver::start(&cluster, "app", &repo, &[]);
    archiver.wait_streaming(&src, "tidemark").await;
    note_instant(&src, 7, &mut instants).await;
    let latest = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    archiver.stop();
    restore_each_instant(&cluster, repo_arg, &[], &instants, "after_store_faults").await;
    restore_latest_equals(&cluster, repo_arg, "after_store_faults_latest", &latest).await;
}
