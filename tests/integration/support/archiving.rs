//! The archiving harness every scenario shares: an archiver run as the CLI ([`Archiver`]),
//! the usual start of a scenario ([`Archiving`]), `tidemark` invocations, restores compared
//! with the source, and waits for what the archive has stored.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, Cluster, ClusterOptions};

/// A running `tidemark archive` child process.
pub struct Archiver {
    child: Child,
    pub log: std::path::PathBuf,
}

impl Archiver {
    pub fn start(cluster: &Cluster, db: &str, repo: &Path, extra: &[&str]) -> Archiver {
        Archiver::start_with(cluster, db, repo.to_str().unwrap(), extra, &[])
    }

    /// Starts the archiver on any repository URL, with extra environment variables.
    pub fn start_with(
        cluster: &Cluster,
        db: &str,
        repo: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Archiver {
        Archiver::start_source(&cluster.conninfo(db), repo, extra, env)
    }

    /// Starts the archiver on any source connection string (e.g. through a proxy). Heartbeats
    /// and status updates every second, unless `extra` has `--heartbeat` or `--status-interval`.
    pub fn start_source(
        source: &str,
        repo: &str,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Archiver {
        let logs = std::env::temp_dir().join("tidemark-test-logs");
        std::fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!(
            "archiver-{}-{}.log",
            std::process::id(),
            rand_suffix()
        ));
        let child = Command::new(support::tidemark_bin())
            .args(["archive", "--source", source, "--repo", repo])
            .args(
                [["--heartbeat", "1s"], ["--status-interval", "1s"]]
                    .into_iter()
                    .filter(|[flag, _]| !extra.contains(flag))
                    .flatten(),
            )
            .args(extra)
            .env("TIDEMARK_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tidemark archive");
        Archiver { child, log }
    }

    /// The archiver's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the archiver now, in bytes.
    pub fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the archiver streams from its slot (base backup done).
    pub async fn wait_streaming(&mut self, client: &tokio_postgres::Client, slot: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let rows = client
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await
                .unwrap();
            // Active slot and the stream started (the first base backup, if any, is done).
            if !rows.is_empty() && self.log_text().contains("INFO archiving") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("archiver exited with {status}:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "archiver did not start streaming:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Panics with the log if the archiver has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("archiver exited with {status}:\n{}", self.log_text());
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id() as i32;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        let status = wait_timeout(&mut self.child, Duration::from_secs(60));
        assert_eq!(
            status,
            Some(0),
            "archiver did not stop cleanly:\n{}",
            self.log_text()
        );
    }

    /// kill -9.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

/// Creates database `db` and restores the archive at `repo` into it with the target options
/// `to` (e.g. `["--to-time", t]`): `tidemark`'s exit code, stdout and stderr.
pub fn restore_into(cluster: &Cluster, repo: &str, db: &str, to: &[&str]) -> (i32, String, String) {
    cluster.create_database(db);
    let target = cluster.conninfo(db);
    let mut args = vec!["restore", "--repo", repo, "--target", &target];
    args.extend_from_slice(to);
    tidemark(&args)
}

/// Runs `tidemark` with args; returns (exit code, stdout, stderr).
pub fn tidemark(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(support::tidemark_bin())
        .args(args)
        .env("TIDEMARK_LOG", "warn")
        .output()
        .expect("run tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `tidemark` with extra environment variables; returns (exit code, stdout, stderr).
pub fn tidemark_env(env: &[(&'static str, String)], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(support::tidemark_bin())
        .args(args)
        .env("TIDEMARK_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run tidemark");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Restores `repo` with `--latest` into a fresh database `db`, compares its content with
/// `expected`, and returns a client of it.
pub async fn restore_latest_equals(
    cluster: &Cluster,
    repo: &str,
    db: &str,
    expected: &support::ContentSnapshot,
) -> tokio_postgres::Client {
    cluster.create_database(db);
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo,
        "--target",
        &cluster.conninfo(db),
        "--latest",
    ]);
    assert_eq!(code, 0, "restore --latest failed: {out}{err}");
    let client = cluster.client(db).await;
    let restored = support::snapshot_content(&client).await;
    support::assert_same_content(expected, &restored, "restore --latest");
    client
}

/// Restores `repo` to each noted instant into a fresh database `{prefix}_{i}` and compares its
/// content with the source's at that instant.
pub async fn restore_each_instant(
    cluster: &Cluster,
    repo: &str,
    env: &[(&'static str, String)],
    instants: &[(String, support::ContentSnapshot)],
    prefix: &str,
) {
    for (i, (t, expected)) in instants.iter().enumerate() {
        let db = format!("{prefix}_{i}");
        cluster.create_database(&db);
        let (code, out, err) = tidemark_env(
            env,
            &[
                "restore",
                "--repo",
                repo,
                "--target",
                &cluster.conninfo(&db),
                "--to-time",
                t,
            ],
        );
        assert_eq!(code, 0, "restore to {t} failed: {out}{err}");
        let restored = support::snapshot_content(&cluster.client(&db).await).await;
        support::assert_same_content(expected, &restored, &format!("restore to {t} from {repo}"));
    }
}

/// Commits an application-level logical message and waits until the archiver has stored it
/// and acknowledged it on slot `slot` (`log`: the archiver's log, shown on timeout).
///
/// An application commit is stored within --seal-interval (heartbeats wait for the 60 s idle
/// interval), it dates the archive past every instant noted before this call, and it is
/// preceded in the stream by everything committed before it: after this, a SIGTERM loses
/// nothing and a restore to any instant noted so far is allowed. A restore ignores the
/// message (unknown prefix).
pub async fn wait_archived(src: &tokio_postgres::Client, slot: &str, log: &Path) {
    // The end of the message's record: the slot confirms past it only once a segment holding
    // this transaction's commit is stored.
    let lsn: String = src
        .query_one(
            "SELECT pg_logical_emit_message(true, 'test.sync', '')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_until(
        src,
        "SELECT coalesce(confirmed_flush_lsn > $1::text::pg_lsn, false)
           FROM pg_replication_slots WHERE slot_name = $2",
        &[&lsn, &slot],
        &format!("slot {slot} to confirm past the sync message at {lsn}"),
        log,
    )
    .await;
}

/// Waits until `n` heartbeats of the archiver (`log`: its log) started after the server
/// instant `after` and committed.
pub async fn wait_heartbeats(src: &tokio_postgres::Client, after: &str, n: usize, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        // The heartbeat's connection shows its last statement; idle: it committed.
        for row in src
            .query(
                "SELECT query_start::text FROM pg_stat_activity
                  WHERE state = 'idle' AND query LIKE 'SELECT pg_logical_emit_message(true, $1%'
                    AND query_start > $1::text::timestamptz",
                &[&after],
            )
            .await
            .unwrap()
        {
            seen.insert(row.get::<_, String>(0));
        }
        assert!(
            Instant::now() < deadline,
            "no {n} heartbeats after {after} (saw {}):\n{}",
            seen.len(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the archiver streaming from `slot` has received a heartbeat committed after
/// the server instant `after`, without committing anything itself: a clean stop then stores
/// it, and the archive sees the server's clock pass `after`.
pub async fn wait_heartbeat_received(
    src: &tokio_postgres::Client,
    slot: &str,
    after: &str,
    log: &Path,
) {
    wait_heartbeats(src, after, 1, log).await;
    let target: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // The archiver reports the position it received every --status-interval.
    wait_until(
        src,
        "SELECT coalesce(bool_or(r.write_lsn >= $1::text::pg_lsn), false)
           FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
          WHERE s.slot_name = $2",
        &[&target, &slot],
        &format!("the archiver on slot {slot} to receive up to {target}"),
        log,
    )
    .await;
}

/// Polls `query` (one boolean) until it is true; panics with `log` after 120 s.
async fn wait_until(
    src: &tokio_postgres::Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    what: &str,
    log: &Path,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !src
        .query_one(query, params)
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server's clock now, as a restore target (UTC, microseconds).
pub async fn server_now(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub const SCHEMA: &str = "
    CREATE TABLE kinds (
        id int PRIMARY KEY, big bigint, label text, amount numeric(20,6), at timestamptz,
        doc jsonb, raw bytea, tags text[], matrix int[], note text);
    CREATE TABLE docs (id bigserial PRIMARY KEY, title text NOT NULL, body text, version int NOT NULL DEFAULT 1);
    ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text, payload jsonb);
";

/// One step of the workload: inserts, updates (some touching only small columns of rows whose
/// large value is TOASTed), deletes, NULLs, all the types.
pub async fn workload_step(client: &tokio_postgres::Client, step: i32) {
    let base = step * 100;
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO kinds SELECT {base} + i, ({base} + i)::bigint * 1000000007, 'label ' || i || ' it''s \\ \"q\"',
                    round((random() * 1000000)::numeric, 6), '2026-01-01 00:00:00+00'::timestamptz + (i || ' minutes')::interval,
                    jsonb_build_object('i', i, 'nested', jsonb_build_array(i, 'x', NULL)), decode(md5(i::text), 'hex'),
                    ARRAY['a' || i, NULL, 'c'], ARRAY[[i, i + 1], [i + 2, i + 3]], CASE WHEN i % 3 = 0 THEN NULL ELSE 'n' END
               FROM generate_series(1, 20) i;
             INSERT INTO docs (title, body) SELECT 'doc {step}.' || i, repeat(md5(i::text || '{step}'), 300) FROM generate_series(1, 3) i;
             COMMIT;
             UPDATE docs SET version = version + 1, title = title || '+' WHERE id % 2 = {step} % 2;
             UPDATE kinds SET note = NULL, amount = amount + 0.000001 WHERE id % 7 = 0 AND id < {base};
             DELETE FROM kinds WHERE id % 11 = 0 AND id < {base};
             INSERT INTO events (kind, payload) VALUES ('step', '{{\"step\": {step}}}'), ('null', NULL);
             UPDATE kinds SET id = id + 100000 WHERE id = {base} + 5;"
        ))
        .await
        .unwrap();
    for i in 0..5 {
        client
            .execute(
                "UPDATE docs SET version = version + $1 WHERE id = (SELECT min(id) FROM docs)",
                &[&i],
            )
            .await
            .unwrap();
    }
}

/// The usual start of an archiving scenario: a cluster with database `app` holding [`SCHEMA`]
/// after one [`workload_step`], a repository folder, and an archiver streaming into it (its
/// first base backup stored). Destructure it: `let Archiving { cluster, src, mut archiver,
/// repo, dir: _dir, .. } = Archiving::start(&[]).await;` (a field left to `..` is dropped at
/// the end of that statement: bind `cluster`, `archiver` and, for a folder repository, `dir`,
/// even as `_name`, to keep them). [`Archiving::builder`] changes the
/// cluster, the source's SQL, the archiver's flags and environment, or the repository, and
/// [`ArchivingBuilder::prepare`] stops before the archiver, for a test that acts first.
pub struct Archiving {
    pub cluster: Cluster,
    pub src: tokio_postgres::Client,
    pub archiver: Archiver,
    /// The repository folder (inside `dir`).
    pub repo: PathBuf,
    /// The repository as `--repo` takes it: `repo`, or the URL given to the builder.
    pub url: String,
    /// Keeps the repository's temporary folder alive.
    pub dir: tempfile::TempDir,
}

impl Archiving {
    /// Starts it with the archiver's extra flags `extra`.
    pub async fn start(extra: &[&str]) -> Archiving {
        Archiving::builder().args(extra).start().await
    }

    /// A scenario other than the usual one.
    pub fn builder() -> ArchivingBuilder {
        ArchivingBuilder {
            cluster: ClusterOptions::default(),
            sql: Vec::new(),
            archiver: ArchiverOptions::default(),
            url: None,
        }
    }
}

/// What a scenario's archiver runs with besides its source and repository.
#[derive(Default)]
struct ArchiverOptions {
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
}

/// A scenario to start: see [`Archiving`].
pub struct ArchivingBuilder {
    cluster: ClusterOptions,
    /// Batches run on `app` in order; none: [`SCHEMA`] then [`workload_step`] 1.
    sql: Vec<String>,
    archiver: ArchiverOptions,
    url: Option<String>,
}

impl ArchivingBuilder {
    /// The cluster's options (e.g. server settings in `extra_conf`).
    pub fn cluster(mut self, options: ClusterOptions) -> Self {
        self.cluster = options;
        self
    }

    /// Runs `batch` on `app` before the archiver starts, instead of the spine's schema and
    /// first workload step; batches run in the order given, each on its own.
    pub fn sql(mut self, batch: impl Into<String>) -> Self {
        self.sql.push(batch.into());
        self
    }

    /// Extra flags of `tidemark archive` (a `--slot` there is the slot waited on).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.archiver
            .args
            .extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Extra environment of `tidemark archive`.
    pub fn env(mut self, env: &[(&'static str, String)]) -> Self {
        self.archiver.env.extend_from_slice(env);
        self
    }

    /// Archives into the repository `url` (e.g. `s3://bucket/prefix`, with the credentials in
    /// [`ArchivingBuilder::env`]) instead of the folder.
    pub fn repo_url(mut self, url: &str) -> Self {
        self.url = Some(url.to_string());
        self
    }

    /// The cluster, the source's content and the repository folder, without an archiver.
    pub async fn prepare(self) -> Prepared {
        let cluster = Cluster::start(self.cluster);
        cluster.create_database("app");
        let src = cluster.client("app").await;
        if self.sql.is_empty() {
            src.batch_execute(SCHEMA).await.unwrap();
            workload_step(&src, 1).await;
        }
        for batch in &self.sql {
            src.batch_execute(batch).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        let url = self
            .url
            .unwrap_or_else(|| repo.to_str().unwrap().to_string());
        Prepared {
            cluster,
            src,
            repo,
            url,
            dir,
            archiver: self.archiver,
        }
    }

    /// The scenario, its archiver streaming.
    pub async fn start(self) -> Archiving {
        self.prepare().await.archive().await
    }
}

/// A scenario before its archiver starts: its fields are [`Archiving`]'s.
pub struct Prepared {
    pub cluster: Cluster,
    pub src: tokio_postgres::Client,
    pub repo: PathBuf,
    pub url: String,
    pub dir: tempfile::TempDir,
    archiver: ArchiverOptions,
}

impl Prepared {
    /// Starts the archiver on database `app` and waits until it streams.
    pub async fn archive(self) -> Archiving {
        let source = self.cluster.conninfo("app");
        self.archive_from(&source).await
    }

    /// Starts the archiver on the connection string `source` (e.g. through a proxy) and waits
    /// until it streams.
    pub async fn archive_from(self, source: &str) -> Archiving {
        let Prepared {
            cluster,
            src,
            repo,
            url,
            dir,
            archiver: options,
        } = self;
        let args: Vec<&str> = options.args.iter().map(String::as_str).collect();
        let slot = args
            .iter()
            .position(|a| *a == "--slot")
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or("tidemark");
        let mut archiver = Archiver::start_source(source, &url, &args, &options.env);
        archiver.wait_streaming(&src, slot).await;
        Archiving {
            cluster,
            src,
            archiver,
            repo,
            url,
            dir,
        }
    }
}
