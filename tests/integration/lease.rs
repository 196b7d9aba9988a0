//! One writer per repository (issue 13 #1): a second archiver on another slot is refused while
//! the first holds the writer lease (on a folder and on S3), and takes over only once a dead
//! first archiver's lease has expired; a running archiver whose lease is taken, or whose chain
//! gets a segment it did not write, stops. The chain stays whole, and a restore equals the
//! source.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::spine::{
    restore_latest_equals, tidemark, tidemark_env, wait_archived, workload_step, Archiver,
    Archiving, Prepared, SCHEMA,
};
use crate::support::s3::S3Server;
use crate::support::{self, snapshot_content, Cluster};

/// A `tidemark archive` child whose exit code the test waits for.
struct Run {
    child: Child,
    err: tempfile::NamedTempFile,
}

impl Run {
    /// Starts `tidemark archive [--slot SLOT]` on `repo` with extra environment variables.
    fn start(cluster: &Cluster, repo: &str, slot: Option<&str>, env: &[(&str, String)]) -> Run {
        let err = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(support::tidemark_bin())
            .args(["archive", "--source", &cluster.conninfo("app")])
            .args(["--repo", repo])
            .args(slot.iter().flat_map(|s| ["--slot", s]))
            .args(["--heartbeat", "1s", "--status-interval", "1s"])
            .env("TIDEMARK_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(err.reopen().unwrap())
            .spawn()
            .expect("start tidemark archive");
        Run { child, err }
    }

    /// Waits at most `limit` for the exit: its code (None: still running, then killed).
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.err.path()).unwrap_or_default()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `tidemark archive --slot SLOT` on `repo` until it exits (at most a minute): its exit
/// code (None: it kept running) and its log.
fn archive_until_exit(
    cluster: &Cluster,
    repo: &str,
    slot: &str,
    env: &[(&str, String)],
) -> (Option<i32>, String) {
    let mut run = Run::start(cluster, repo, Some(slot), env);
    let code = run.wait_exit(Duration::from_secs(60));
    (code, run.log())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn setup_slot(cluster: &Cluster, slot: &str) {
    let (code, out, err) = tidemark(&[
        "setup",
        "--source",
        &cluster.conninfo("app"),
        "--slot",
        slot,
    ]);
    assert_eq!(code, 0, "setup --slot {slot}: {out}{err}");
}

/// The case: `setup --slot tm2`, then `archive --slot tm2` on the repository another
/// archiver is writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_archiver_on_another_slot_is_refused_naming_the_first() {
    let Archiving {
        cluster,
        src,
        archiver: mut first,
        repo,
        dir: _dir,
        ..
    } = Archiving::builder().sql(SCHEMA).start().await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", &first.log).await;

    setup_slot(&cluster, "tm2");
    let (code, err) = archive_until_exit(&cluster, repo.to_str().unwrap(), "tm2", &[]);
    assert_eq!(
        code,
        Some(4),
        "the second archiver is refused (exit 4):\n{err}"
    );
    for needle in [
        format!("pid {}", first.pid()),
        format!("host {}", hostname()),
        "slot \"tidemark\"".to_string(),
        "HINT".to_string(),
    ] {
        assert!(
            err.contains(&needle),
            "the refusal names {needle:?}:\n{err}"
        );
    }

    // The first goes on, and its chain is whole.
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &first.log).await;
    first.assert_running();
    first.stop();
    let (code, out, err) = tidemark(&["list", "--repo", repo.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "list after the refused second archiver: {out}{err}"
    );
    let expected = snapshot_content(&src).await;
    restore_latest_equals(&cluster, repo.to_str().unwrap(), "restored", &expected).await;

    // Stopped cleanly, the first released the lease: the next archiver starts at once.
    let mut next = Archiver::start(&cluster, "app", &repo, &["--slot", "tidemark"]);
    next.wait_streaming(&src, "tidemark").await;
    next.stop();
}

/// A dead (kill -9) archiver's lease holds another slot's archiver off until it expires; then
/// that archiver takes over and extends the same chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_archivers_lease_expires_and_another_slot_takes_over() {
    let ttl_env = [("TIDEMARK_LEASE_TTL", "8s".to_string())];
    let prepared = Archiving::builder()
        .sql(SCHEMA)
        .env(&ttl_env)
        .prepare()
        .await;
    // tm2 exists before the first archiver's first segment, so it can resume the chain.
    setup_slot(&prepared.cluster, "tm2");
    let Archiving {
        cluster,
        src,
        archiver: first,
        repo,
        dir: _dir,
        ..
    } = prepared.archive().await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", &first.log).await;
    let pid = first.pid();
    first.kill();
    let killed = Instant::now();

    let (code, err) = archive_until_exit(&cluster, repo.to_str().unwrap(), "tm2", &ttl_env);
    if killed.elapsed() < Duration::from_secs(5) {
        assert_eq!(
            code,
            Some(4),
            "refused while the dead one's lease is live:\n{err}"
        );
        assert!(err.contains(&format!("pid {pid}")), "{err}");
    }

    // Past the expiry, the second takes over.
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(killed.elapsed())).await;
    workload_step(&src, 2).await;
    let mut second = Archiver::start_with(
        &cluster,
        "app",
        repo.to_str().unwrap(),
        &["--slot", "tm2"],
        &ttl_env,
    );
    second.wait_streaming(&src, "tm2").await;
    assert!(
        second.log_text().contains("lease expired"),
        "the takeover is logged:\n{}",
        second.log_text()
    );
    workload_step(&src, 3).await;
    wait_archived(&src, "tm2", &second.log).await;
    second.stop();
    let expected = snapshot_content(&src).await;
    restore_latest_equals(&cluster, repo.to_str().unwrap(), "restored", &expected).await;
}

/// The newest lease record in the folder repository `repo`: its file and its JSON.
fn newest_record(repo: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let dir = repo.join("locks/writer");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    let path = names.pop().expect("a lease record");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, json)
}

/// Waits until the archiver `run` streams from `slot`.
async fn wait_streaming(src: &tokio_postgres::Client, run: &mut Run, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let active = src
            .query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap();
        if !active.is_empty() && run.log().contains("INFO archiving") {
            return;
        }
        if let Ok(Some(status)) = run.child.try_wait() {
            panic!("archiver exited with {status}:\n{}", run.log());
        }
        assert!(Instant::now() < deadline, "not streaming:\n{}", run.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// While an archiver runs, another writer takes its lease (a newer term), and later another
/// writer's segment appears at the chain's end: each time the archiver stops (exit 4) at its
/// next renewal, naming what it found, and the chain it wrote stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_archiver_stops_when_its_lease_is_taken_or_a_foreign_segment_appears() {
    let Prepared {
        cluster,
        src,
        repo,
        dir: _dir,
        ..
    } = Archiving::builder().sql(SCHEMA).prepare().await;
    let repo_url = repo.to_str().unwrap();
    // Renewed every second.
    let env = [("TIDEMARK_LEASE_TTL", "6s".to_string())];

    let mut first = Run::start(&cluster, repo_url, None, &env);
    wait_streaming(&src, &mut first, "tidemark").await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", first.err.path()).await;

    // Another writer's record of the next term (as a second archiver would write it).
    let (_, mut record) = newest_record(&repo);
    let term = record["term"].as_u64().unwrap() + 1;
    record["term"] = term.into();
    record["seq"] = 0.into();
    record["owner"] = "intruder".into();
    record["host"] = "elsewhere".into();
    record["pid"] = 4242.into();
    record["slot"] = "tm9".into();
    let intruder = repo.join(format!("locks/writer/{term:010}-{:010}.json", 0));
    std::fs::write(&intruder, serde_json::to_vec(&record).unwrap()).unwrap();
    let code = first.wait_exit(Duration::from_secs(30));
    let log = first.log();
    assert_eq!(
        code,
        Some(4),
        "the archiver stops when its lease is taken:\n{log}"
    );
    assert!(
        log.contains("lost the writer lease") && log.contains("host elsewhere pid 4242"),
        "{log}"
    );
    let (code, out, err) = tidemark(&["list", "--repo", repo_url]);
    assert_eq!(code, 0, "{out}{err}");

    // The intruder's record deleted by hand (as the hint says), the next archiver of the
    // same slot starts at once: the slot is free, its previous archiver gone.
    std::fs::remove_file(&intruder).unwrap();
    let mut second = Run::start(&cluster, repo_url, Some("tidemark"), &env);
    wait_streaming(&src, &mut second, "tidemark").await;
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", second.err.path()).await;

    // A segment overlapping the last one, as another writer would store it.
    let gen_dir = repo.join("segments/00000001");
    let mut segs: Vec<_> = std::fs::read_dir(&gen_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    segs.sort();
    let last = segs.last().expect("segments").clone();
    let (start, end) = last.strip_suffix(".seg").unwrap().split_once('-').unwrap();
    let foreign_end = u64::from_str_radix(end, 16).unwrap() + 1;
    let foreign = format!("{start}-{foreign_end:016X}.seg");
    std::fs::copy(gen_dir.join(&last), gen_dir.join(&foreign)).unwrap();
    let code = second.wait_exit(Duration::from_secs(30));
    let log = second.log();
    assert_eq!(
        code,
        Some(4),
        "the archiver stops at a foreign segment:\n{log}"
    );
    assert!(
        log.contains(&foreign) && log.contains("did not write it"),
        "{log}"
    );

    // Without the foreign segment, the chain is whole and restores to the source.
    std::fs::remove_file(gen_dir.join(&foreign)).unwrap();
    let expected = snapshot_content(&src).await;
    restore_latest_equals(&cluster, repo_url, "restored", &expected).await;
}

/// The case on an S3 repository: the second archiver is refused, naming the first; the
/// first (renewing twice a second, each time listing the chain's tail) archives on, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_a_second_archiver_is_refused_and_the_first_archives_on() {
    let server = S3Server::with_bucket("archive");
    let env = server.cli_env(&server.endpoint);
    let repo = "s3://archive/app";
    let Archiving {
        cluster,
        src,
        archiver: mut first,
        ..
    } = Archiving::builder()
        .sql(SCHEMA)
        .repo_url(repo)
        .env(&env)
        .env(&[("TIDEMARK_LEASE_TTL", "3s".to_string())])
        .start()
        .await;
    workload_step(&src, 1).await;
    wait_archived(&src, "tidemark", &first.log).await;

    setup_slot(&cluster, "tm2");
    let (code, err) = archive_until_exit(&cluster, repo, "tm2", &env);
    assert_eq!(
        code,
        Some(4),
        "the second archiver is refused (exit 4):\n{err}"
    );
    assert!(
        err.contains(&format!("pid {}", first.pid())) && err.contains("slot \"tidemark\""),
        "the refusal names the first archiver:\n{err}"
    );

    for step in 2..5 {
        workload_step(&src, step).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_archived(&src, "tidemark", &first.log).await;
    first.assert_running();
    first.stop();
    let lease_objects = server
        .objects("archive")
        .into_keys()
        .filter(|k| k.contains("locks/writer/"))
        .count();
    assert!(
        lease_objects <= 3,
        "renewals do not pile up: {lease_objects} lease records"
    );
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", repo]);
    assert_eq!(code, 0, "{out}{err}");
    cluster.create_database("restored");
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "restore",
            "--repo",
            repo,
            "--target",
            &cluster.conninfo("restored"),
            "--latest",
        ],
    );
    assert_eq!(code, 0, "restore from S3: {out}{err}");
    let restored = snapshot_content(&cluster.client("restored").await).await;
    support::assert_same_content(&snapshot_content(&src).await, &restored, "restore from S3");
}
