//! Bad inputs: each is refused with a clear message (`error: …` and a HINT line) and its
//! documented exit code, and nothing is written — not to the repository, not to the source,
//! not to the restore target.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::spine::{self, workload_step, Archiving};
use crate::support::{self, snapshot_content, Cluster, ClusterOptions};

/// Longest a refused command may take before the test calls it a hang.
const REFUSAL_LIMIT: Duration = Duration::from_secs(60);

/// Runs `tidemark args…` and returns (exit code, stdout, stderr); panics if it runs longer
/// than [`REFUSAL_LIMIT`] (an archiver that accepted a bad input would run forever).
fn tidemark_refusing(args: &[&str]) -> (i32, String, String) {
    let child = Command::new(support::tidemark_bin())
        .args(args)
        .env("TIDEMARK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tidemark");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(REFUSAL_LIMIT) {
        Ok(out) => out.expect("wait for tidemark"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let out = rx
                .recv()
                .expect("tidemark output")
                .expect("wait for tidemark");
            panic!(
                "`tidemark {}` still ran after {REFUSAL_LIMIT:?} instead of refusing:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every broken expectation about one refusal, reported together with the command's output
/// (so one run shows all that is wrong, not just the first thing).
struct Verdict {
    what: String,
    output: String,
    problems: Vec<String>,
}

impl Verdict {
    /// Checks the exit code and that stderr is an `error: …` message with a HINT line.
    fn of(what: &str, (code, out, err): &(i32, String, String), expected: i32) -> Verdict {
        let mut v = Verdict {
            what: what.to_string(),
            output: format!(
                "--- exit code {code} ---\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            ),
            problems: Vec::new(),
        };
        v.expect(
            *code == expected,
            format!("exit code {code}, expected {expected}"),
        );
        v.expect(
            err.lines().any(|l| l.starts_with("error: ")),
            "no `error: …` line on stderr",
        );
        v.expect(
            err.lines().any(|l| l.trim_start().starts_with("HINT")),
            "no HINT line on stderr",
        );
        v
    }

    fn expect(&mut self, ok: bool, problem: impl Into<String>) {
        if !ok {
            self.problems.push(problem.into());
        }
    }

    fn repo_untouched(&mut self, repo: &Path) {
        let files = files_below(repo);
        self.expect(
            files.is_empty(),
            format!("the repository must stay absent or empty, but holds {files:?}"),
        );
    }

    async fn source_untouched(&mut self, cluster: &Cluster, db: &str) {
        let created = source_objects(cluster, db).await;
        self.expect(
            created.is_empty(),
            format!("nothing may be created on the source, but it now has {created:?}"),
        );
    }

    async fn target_empty(&mut self, cluster: &Cluster, db: &str) {
        let objects = user_objects(&cluster.client(db).await).await;
        self.expect(
            objects.is_empty(),
            format!("the target database must stay empty, but has {objects:?}"),
        );
    }

    fn finish(self) {
        assert!(
            self.problems.is_empty(),
            "{}:\n- {}\n{}",
            self.what,
            self.problems.join("\n- "),
            self.output
        );
    }
}

/// Files below `path` (none if it does not exist).
fn files_below(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            if dir.is_file() {
                out.push(dir);
            }
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Relations and schemas in user namespaces of the client's database.
async fn user_objects(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT format('relation %I.%I (%s)', n.nspname, c.relname, c.relkind)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
                AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
             UNION ALL
             SELECT format('schema %I', nspname) FROM pg_namespace
              WHERE nspname NOT IN ('public', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Slots of `db` and publications in `db`: what an archive run may create on the source.
async fn source_objects(cluster: &Cluster, db: &str) -> Vec<String> {
    let client = cluster.client(db).await;
    let mut out: Vec<String> = client
        .query(
            "SELECT 'slot ' || slot_name FROM pg_replication_slots WHERE database = current_database()
             UNION ALL SELECT 'publication ' || pubname FROM pg_publication ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    out.sort();
    out
}

/// A cluster shared by the tests that run at the same time (each uses its own database); the
/// last one to finish stops it.
fn shared_cluster() -> Arc<Cluster> {
    static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(Cluster::start(ClusterOptions::default()));
    *shared = Arc::downgrade(&cluster);
    cluster
}

/// A finished archive of a small workload of database `app`, shared like [`shared_cluster`].
struct Archived {
    cluster: Cluster,
    repo: PathBuf,
    _repo_dir: tempfile::TempDir,
}

impl Archived {
    async fn build() -> Archived {
        let Archiving {
            cluster,
            src,
            archiver,
            repo,
            dir: repo_dir,
            ..
        } = Archiving::start(&[]).await;
        for step in 2..5 {
            workload_step(&src, step).await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        spine::wait_archived(&src, "tidemark", &archiver.log).await;
        archiver.stop();
        Archived {
            cluster,
            repo,
            _repo_dir: repo_dir,
        }
    }

    fn repo_arg(&self) -> &str {
        self.repo.to_str().unwrap()
    }
}

fn shared_archive() -> Arc<Archived> {
    static SHARED: Mutex<Weak<Archived>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(archived) = shared.upgrade() {
        return archived;
    }
    // Built on its own runtime: its client connections must not outlive it.
    let archived = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(Archived::build())
    })
    .join()
    .unwrap_or_else(|_| panic!("building the shared archive failed (see its panic above)"));
    let archived = Arc::new(archived);
    *shared = Arc::downgrade(&archived);
    archived
}

#[tokio::test]
async fn archive_from_an_unreachable_source_exits_3_and_writes_nothing() {
    let closed = support::ClosedPort::hold();
    let port = closed.port;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let source = format!("host=127.0.0.1 port={port} user=tidemark dbname=app connect_timeout=5");
    let result = tidemark_refusing(&[
        "archive",
        "--source",
        &source,
        "--repo",
        repo.to_str().unwrap(),
    ]);
    let mut v = Verdict::of("archive from an unreachable source", &result, 3);
    v.expect(
        result.2.contains("127.0.0.1") && result.2.contains(&port.to_string()),
        format!("the message must name the unreachable server (127.0.0.1 port {port})"),
    );
    v.repo_untouched(&repo);
    v.finish();
}

#[test]
fn archive_with_a_zero_status_interval_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let (code, _, err) = tidemark_refusing(&[
        "archive",
        "--source",
        "host=127.0.0.1 port=1",
        "--repo",
        repo.to_str().unwrap(),
        "--status-interval",
        "0s",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--status-interval") && err.contains("zero"),
        "the message must name the flag and say why: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!repo.exists());
}

#[tokio::test]
async fn archive_with_wal_level_replica_exits_3_with_the_fix() {
    let cluster = Cluster::start(ClusterOptions {
        wal_level: "replica",
        ..ClusterOptions::default()
    });
    cluster.create_database("app");
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let result = tidemark_refusing(&[
        "archive",
        "--source",
        &cluster.conninfo("app"),
        "--repo",
        repo.to_str().unwrap(),
    ]);
    let mut v = Verdict::of("archive with wal_level=replica", &result, 3);
    let hint: String = result
        .2
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("HINT"))
        .collect();
    v.expect(
        result.2.contains("wal_level"),
        "the message must name wal_level",
    );
    v.expect(
        hint.contains("wal_level") && hint.contains("logical"),
        "the HINT must give the fix (wal_level = logical)",
    );
    v.repo_untouched(&repo);
    let slots = cluster.psql("postgres", "SELECT count(*) FROM pg_replication_slots");
    v.expect(
        slots == "0",
        format!("no slot may be created, found {slots}"),
    );
    v.source_untouched(&cluster, "app").await;
    v.finish();
}

#[tokio::test]
async fn archive_with_a_missing_named_publication_exits_3() {
    let cluster = shared_cluster();
    let db = "missing_publication";
    cluster.create_database(db);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let result = tidemark_refusing(&[
        "archive",
        "--source",
        &cluster.conninfo(db),
        "--repo",
        repo.to_str().unwrap(),
        "--publication",
        "nosuch",
    ]);
    let mut v = Verdict::of("archive --publication nosuch (missing)", &result, 3);
    v.expect(
        result.2.contains("publication") && result.2.contains("nosuch"),
        "the message must name the missing publication",
    );
    v.repo_untouched(&repo);
    v.source_untouched(&cluster, db).await;
    v.finish();
}

#[tokio::test]
async fn archive_with_a_missing_named_slot_exits_3() {
    let cluster = shared_cluster();
    let db = "missing_slot";
    cluster.create_database(db);
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let result = tidemark_refusing(&[
        "archive",
        "--source",
        &cluster.conninfo(db),
        "--repo",
        repo.to_str().unwrap(),
        "--slot",
        "nosuch",
    ]);
    let mut v = Verdict::of("archive --slot nosuch (missing)", &result, 3);
    v.expect(
        result.2.contains("slot") && result.2.contains("nosuch"),
        "the message must name the missing slot",
    );
    v.repo_untouched(&repo);
    v.source_untouched(&cluster, db).await;
    v.finish();
}

#[tokio::test]
async fn archive_into_an_unwritable_repository_exits_4_and_creates_nothing_on_the_source() {
    let cluster = shared_cluster();
    let dir = tempfile::tempdir().unwrap();

    // Below a regular file: no folder can be created there, not even by root.
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a folder").unwrap();
    let mut repos = vec![("below a regular file", file.join("repo"))];
    // A read-only folder stops everyone but root (and holders of CAP_DAC_OVERRIDE).
    let read_only = dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::set_permissions(
        &read_only,
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )
    .unwrap();
    let probe = read_only.join("probe");
    if std::fs::write(&probe, b"").is_err() {
        repos.push(("in a 0555 folder", read_only.join("repo")));
    } else {
        let _ = std::fs::remove_file(&probe);
        eprintln!(
            "running as root: the 0555 folder case is skipped (permissions do not stop root)"
        );
    }

    let mut verdicts = Vec::new();
    for (i, (what, repo)) in repos.iter().enumerate() {
        // A database per case, so that what one case leaves behind cannot hide the next.
        let db = format!("unwritable_repo_{i}");
        cluster.create_database(&db);
        let result = tidemark_refusing(&[
            "archive",
            "--source",
            &cluster.conninfo(&db),
            "--repo",
            repo.to_str().unwrap(),
        ]);
        let mut v = Verdict::of(&format!("archive into a repository {what}"), &result, 4);
        v.expect(
            result.2.contains(repo.to_str().unwrap()),
            "the message must name the repository",
        );
        v.repo_untouched(repo);
        v.source_untouched(&cluster, &db).await;
        verdicts.push(v);
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a folder");
    assert!(files_below(&read_only).is_empty());
    for v in verdicts {
        v.finish();
    }
}

#[tokio::test]
async fn restore_into_a_non_empty_target_exits_3_and_changes_nothing() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let db = "not_empty";
    cluster.create_database(db);
    let target = cluster.client(db).await;
    target
        .batch_execute(
            "CREATE TABLE keep (id int PRIMARY KEY, v text);
             INSERT INTO keep VALUES (1, 'one'), (2, 'two'), (3, NULL);",
        )
        .await
        .unwrap();
    let objects_before = user_objects(&target).await;
    let content_before = snapshot_content(&target).await;

    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        archived.repo_arg(),
        "--target",
        &cluster.conninfo(db),
        "--latest",
    ]);
    let mut v = Verdict::of("restore into a non-empty database", &result, 3);
    v.expect(
        result.2.to_lowercase().contains("not empty"),
        "the message must say the target is not empty",
    );
    let objects_after = user_objects(&target).await;
    v.expect(
        objects_after == objects_before,
        format!("nothing may be created in the target: before {objects_before:?}, after {objects_after:?}"),
    );
    v.expect(
        snapshot_content(&target).await == content_before,
        "the target's table must be unchanged",
    );
    v.finish();
}

/// `2026-11-28T14:03:07.250000Z` (list --json) as `2026-11-28 14:03:07.250000+00` (messages).
fn as_message_time(json_time: &serde_json::Value) -> String {
    let s = json_time
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {json_time}"));
    s.replacen('T', " ", 1).replace('Z', "+00")
}

#[tokio::test]
async fn restore_to_before_the_first_base_backup_exits_6_naming_the_range() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let db = "too_early";
    cluster.create_database(db);

    let (code, listing, err) = spine::tidemark(&["list", "--repo", archived.repo_arg(), "--json"]);
    assert_eq!(code, 0, "list --json failed: {listing}{err}");
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let earliest = as_message_time(&listing["earliest_restorable"]);
    let latest = as_message_time(&listing["latest_restorable_before"]);

    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        archived.repo_arg(),
        "--target",
        &cluster.conninfo(db),
        "--to-time",
        "2000-01-01 00:00:00+00",
    ]);
    let mut v = Verdict::of("restore --to-time before the first base backup", &result, 6);
    v.expect(
        result.2.contains(&earliest) && result.2.contains(&latest),
        format!("the message must name the earliest ({earliest}) and latest ({latest}) restorable instants"),
    );
    v.target_empty(cluster, db).await;
    v.finish();
}

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

/// `0000000116B3748A` → `1/16B3748A`.
fn lsn_from_hex16(hex: &str) -> String {
    let v = u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{hex}: {e}"));
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

#[tokio::test]
async fn restore_of_a_corrupted_segment_exits_5_naming_its_range() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_tree(&archived.repo, &repo);
    let repo_arg = repo.to_str().unwrap();

    // The control: the intact copy restores.
    cluster.create_database("intact_copy");
    let (code, out, err) = spine::tidemark(&[
        "restore",
        "--repo",
        repo_arg,
        "--target",
        &cluster.conninfo("intact_copy"),
        "--latest",
    ]);
    assert_eq!(code, 0, "restoring the intact copy failed:\n{out}{err}");

    // Flip one byte in the middle of the largest segment (one with records).
    let mut segments: Vec<(u64, PathBuf)> = files_below(&repo.join("segments"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    segments.sort();
    let (size, victim) = segments.last().cloned().expect("the archive has segments");
    assert!(
        segments.len() >= 2 && size > segments[0].0,
        "expected segments of different sizes: {segments:?}"
    );
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&victim, &bytes).unwrap();
    let name = victim.file_stem().unwrap().to_str().unwrap();
    let (start, end) = name.split_once('-').expect("segment name start-end");
    let range = format!("{}-{}", lsn_from_hex16(start), lsn_from_hex16(end));

    let db = "from_corrupt";
    cluster.create_database(db);
    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        repo_arg,
        "--target",
        &cluster.conninfo(db),
        "--latest",
    ]);
    let mut v = Verdict::of(
        &format!("restore from segment {range} with a flipped byte at {middle} of {size}"),
        &result,
        5,
    );
    v.expect(
        result.2.contains(&range),
        format!("the message must name the damaged segment {range}"),
    );
    v.target_empty(cluster, db).await;
    v.finish();
}

/// The stored table parts of the base backups in a repository, largest first.
fn backup_parts(repo: &Path) -> Vec<PathBuf> {
    let mut parts: Vec<(u64, PathBuf)> = files_below(&repo.join("basebackups"))
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".copy.lz4"))
        .map(|p| (std::fs::metadata(&p).unwrap().len(), p))
        .collect();
    parts.sort();
    parts.into_iter().rev().map(|(_, p)| p).collect()
}

/// The backup id recorded by the in-progress marker of a restore target, if it has one.
async fn marker_of(cluster: &Cluster, db: &str) -> Option<String> {
    let client = cluster.client(db).await;
    let exists: bool = client
        .query_one(
            &format!(
                "SELECT to_regclass('public.{}') IS NOT NULL",
                tidemark::restore::MARKER_TABLE
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return None;
    }
    let row = client
        .query_one(
            &format!(
                "SELECT backup_id FROM public.{}",
                tidemark::restore::MARKER_TABLE
            ),
            &[],
        )
        .await
        .unwrap();
    Some(row.get(0))
}

/// A second restore into a target an earlier one left incomplete is refused, naming that.
fn assert_refused_as_incomplete(cluster: &Cluster, repo: &str, db: &str) {
    let target = cluster.conninfo(db);
    let result = tidemark_refusing(&["restore", "--repo", repo, "--target", &target, "--latest"]);
    let mut v = Verdict::of("restore into an incomplete target", &result, 3);
    v.expect(
        result.2.contains("incomplete restore"),
        "the message must say the target holds an incomplete restore",
    );
    v.finish();
}

#[tokio::test]
async fn restore_with_a_missing_base_backup_part_exits_5_before_writing_anything() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_tree(&archived.repo, &repo);
    let victim = backup_parts(&repo)
        .into_iter()
        .next()
        .expect("the base backup has table parts");
    std::fs::remove_file(&victim).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();

    let db = "from_missing_part";
    cluster.create_database(db);
    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--target",
        &cluster.conninfo(db),
        "--latest",
    ]);
    let mut v = Verdict::of("restore with a missing base-backup part", &result, 5);
    v.expect(
        result.2.contains(&name) && result.2.contains("missing"),
        format!("the message must name the missing part {name}"),
    );
    v.target_empty(cluster, db).await;
    v.finish();
}

#[tokio::test]
async fn restore_with_a_flipped_byte_in_a_base_backup_part_exits_5_and_says_the_target_is_incomplete(
) {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_tree(&archived.repo, &repo);
    let victim = backup_parts(&repo)
        .into_iter()
        .next()
        .expect("the base backup has table parts");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let repo_arg = repo.to_str().unwrap();

    let db = "from_flipped_part";
    cluster.create_database(db);
    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        repo_arg,
        "--target",
        &cluster.conninfo(db),
        "--latest",
    ]);
    let mut v = Verdict::of("restore with a corrupt base-backup part", &result, 5);
    v.expect(
        result.2.contains("CRC-32") || result.2.contains("corrupt"),
        "the message must say the part is corrupt",
    );
    v.expect(
        result.2.contains("INCOMPLETE"),
        "the message must say loudly that the target is incomplete",
    );
    v.expect(
        marker_of(cluster, db).await.is_some(),
        "the target must keep its in-progress marker",
    );
    v.finish();
    assert_refused_as_incomplete(cluster, repo_arg, db);
}

#[tokio::test]
async fn a_killed_restore_leaves_its_target_marked_incomplete() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let db = "killed_restore";
    cluster.create_database(db);
    let mut child = Command::new(support::tidemark_bin())
        .args([
            "restore",
            "--repo",
            archived.repo_arg(),
            "--target",
            &cluster.conninfo(db),
            "--latest",
        ])
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed as soon as its first write (the marker) is visible.
    let client = cluster.client(db).await;
    let probe = format!(
        "SELECT to_regclass('public.{}') IS NOT NULL",
        tidemark::restore::MARKER_TABLE
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let marked: bool = client.query_one(&probe, &[]).await.unwrap().get(0);
        if marked {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before its marker was seen"
        );
        assert!(std::time::Instant::now() < deadline, "no marker appeared");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the restore was to be killed midway");
    drop(client);
    assert!(
        marker_of(cluster, db).await.is_some(),
        "a killed restore must leave its target marked as incomplete"
    );
    assert_refused_as_incomplete(cluster, archived.repo_arg(), db);

    // The control: a restore that completes leaves no marker.
    let (code, out, err) =
        spine::restore_into(cluster, archived.repo_arg(), "unkilled", &["--latest"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(marker_of(cluster, "unkilled").await, None);
}

#[tokio::test]
async fn restore_as_a_role_without_create_exits_3_with_the_grant_and_writes_nothing() {
    let archived = shared_archive();
    let cluster = &archived.cluster;
    let db = "weak_target";
    cluster.create_database(db);
    cluster.psql(
        db,
        "CREATE ROLE weak_restorer LOGIN; REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
    );
    let target = cluster
        .conninfo(db)
        .replace("user=tidemark", "user=weak_restorer");
    assert!(target.contains("user=weak_restorer"), "{target}");
    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        archived.repo_arg(),
        "--target",
        &target,
        "--latest",
    ]);
    let mut v = Verdict::of("restore as a role without CREATE", &result, 3);
    v.expect(
        result
            .2
            .contains("GRANT CREATE ON SCHEMA public TO \"weak_restorer\""),
        "the message must give the GRANT that fixes it",
    );
    v.target_empty(cluster, db).await;
    v.finish();
}

#[tokio::test]
async fn prune_removes_an_old_incomplete_base_backup_and_keeps_a_recent_one() {
    let archived = shared_archive();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    copy_tree(&archived.repo, &repo);
    let repo_arg = repo.to_str().unwrap();
    // Two copies of the backup's folder without their manifest, as a killed backup leaves
    // them: one last written two days ago, one just now.
    let backups = repo.join("basebackups");
    let complete = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .next()
        .expect("the archive has a base backup")
        .path();
    let old = backups.join("00000001-00000000FFFFFF00");
    let recent = backups.join("00000001-00000000FFFFFF80");
    for folder in [&old, &recent] {
        copy_tree(&complete, folder);
        std::fs::remove_file(folder.join("manifest.json")).unwrap();
    }
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
    for f in files_below(&old) {
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
    }
    let (code, out, err) = spine::tidemark(&[
        "prune",
        "--repo",
        repo_arg,
        "--incomplete-backups",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("would remove incomplete base backup 00000001-00000000FFFFFF00"),
        "{out}"
    );
    assert!(
        out.contains("kept incomplete base backup 00000001-00000000FFFFFF80"),
        "{out}"
    );
    assert!(old.exists(), "a dry run removes nothing");

    let (code, out, err) = spine::tidemark(&["prune", "--repo", repo_arg, "--incomplete-backups"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("removed incomplete base backup 00000001-00000000FFFFFF00"),
        "{out}"
    );
    assert!(
        files_below(&old).is_empty(),
        "the old incomplete backup must be gone"
    );
    assert!(
        !files_below(&recent).is_empty(),
        "a recent one may still be running"
    );
    assert!(
        !files_below(&complete).is_empty(),
        "a complete backup is never pruned"
    );

    // The repository still restores.
    let (code, out, err) =
        spine::restore_into(&archived.cluster, repo_arg, "after_prune", &["--latest"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test]
async fn setup_without_a_free_slot_exits_3_before_creating_anything() {
    let cluster = Cluster::start(ClusterOptions {
        extra_conf: vec!["max_replication_slots = 1".into()],
        ..ClusterOptions::default()
    });
    cluster.create_database("app");
    cluster.psql(
        "app",
        "SELECT pg_create_logical_replication_slot('someone_else', 'pgoutput')",
    );
    let result = tidemark_refusing(&["setup", "--source", &cluster.conninfo("app")]);
    let mut v = Verdict::of("setup without a free slot", &result, 3);
    v.expect(
        result.2.contains("max_replication_slots"),
        "the message must name max_replication_slots",
    );
    let created = cluster.psql(
        "app",
        "SELECT (SELECT count(*) FROM pg_publication) || ' ' || (SELECT count(*) FROM pg_event_trigger)",
    );
    v.expect(
        created.trim() == "0 0",
        format!("no publication and no event trigger may be created (publications, event triggers: {created})"),
    );
    v.finish();
}

#[tokio::test]
async fn restore_into_a_missing_database_exits_3_with_the_servers_reason() {
    let archived = shared_archive();
    let target = archived.cluster.conninfo("no_such_database");
    let result = tidemark_refusing(&[
        "restore",
        "--repo",
        archived.repo_arg(),
        "--target",
        &target,
        "--latest",
    ]);
    assert_eq!(result.0, 3, "{}", result.2);
    assert!(
        result
            .2
            .contains("database \"no_such_database\" does not exist"),
        "the server's own reason must be shown, not just \"db error\": {}",
        result.2
    );
}

#[test]
fn with_json_a_failure_is_one_json_object_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("archive.json"), "{ not json").unwrap();
    let (code, out, err) =
        tidemark_refusing(&["list", "--repo", dir.path().to_str().unwrap(), "--json"]);
    assert_eq!(code, 4, "{out}{err}");
    let last = err.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("stderr's last line is not JSON ({e}): {err}"));
    assert_eq!(report["exit_code"], 4, "{report}");
    assert!(
        report["error"].as_str().unwrap().contains("archive.json"),
        "{report}"
    );
    assert!(
        report["hints"].is_array() && report["causes"].is_array(),
        "{report}"
    );
}
