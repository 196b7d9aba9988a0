//! tidemark beside the tools a user would otherwise run, on the same machine in the same run.
//!
//! Every figure that has a reference is reported as a ratio to it, so a noisy machine moves both
//! sides and not the verdict. The harness starts its own throwaway PostgreSQL clusters (the
//! integration tests' harness, `tests/integration/support`), runs pgbench, `pg_recvlogical`,
//! `pg_dump`/`pg_restore` and, when installed, pgBackRest, and prints one table.
//!
//! * `cargo bench --bench compare` runs the full sizes of issues 6 and 16 (catch-up backlogs of
//!   600,000 and 2,000,000 pgbench transactions at scale 10 and of 200,000 inserts of a 2 KiB
//!   text row, each drained in two alternating rounds; 60 s live runs, a pgbench scale-50 base
//!   backup, a 10-million-row transaction).
//! * Under `cargo test --all-targets` (no `--bench` argument) it runs tiny sizes and checks only
//!   that every row produced a figure, so the harness cannot rot.
//! * `TIDEMARK_BENCH_ONLY=catchup,live,backup,schedule,s3,huge,crypt` runs a subset;
//!   `TIDEMARK_BENCH_BACKLOGS=pgbench:600000,wide:200000` picks the catch-up backlogs (one row
//!   each), `TIDEMARK_BENCH_CRYPT_TXNS` the encryption rows' backlog.
//!
//! pgBackRest (Debian package `pgbackrest`) is used for the archive-size comparison when it is on
//! PATH; without it that row compares with `gzip -6` of the WAL segments, labelled as such.

#[path = "../tests/integration/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Cluster, ClusterOptions};

struct Sizes {
    full: bool,
    /// The catch-up rows' backlogs, one row each.
    backlogs: Vec<Backlog>,
    /// The encryption rows' pgbench backlog (`TIDEMARK_BENCH_CRYPT_TXNS` overrides it).
    backlog_txns: u64,
    live: Duration,
    clients: u32,
    /// pgbench's scale for the catch-up and live rows.
    stream_scale: u32,
    scale: u32,
    huge_rows: u64,
    /// How long the S3 request count watches an idle, then a busy database.
    s3_idle: Duration,
    s3_busy: Duration,
}

impl Sizes {
    fn new(full: bool) -> Sizes {
        if full {
            Sizes {
                full,
                backlogs: Backlog::from_env("pgbench:600000,pgbench:2000000,wide:200000"),
                backlog_txns: env_count("TIDEMARK_BENCH_CRYPT_TXNS", 600_000),
                live: Duration::from_secs(60),
                clients: 4,
                stream_scale: 10,
                scale: 50,
                huge_rows: 10_000_000,
                s3_idle: Duration::from_secs(300),
                s3_busy: Duration::from_secs(60),
            }
        } else {
            Sizes {
                full,
                backlogs: Backlog::from_env("pgbench:400,wide:100"),
                backlog_txns: env_count("TIDEMARK_BENCH_CRYPT_TXNS", 400),
                live: Duration::from_secs(3),
                clients: 2,
                stream_scale: 1,
                scale: 1,
                huge_rows: 20_000,
                s3_idle: Duration::from_secs(3),
                s3_busy: Duration::from_secs(3),
            }
        }
    }
}

/// What the transactions of a catch-up backlog write.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Workload {
    /// pgbench's TPC-B transactions (three updates and an insert).
    Pgbench,
    /// One insert of a row with a 2 KiB text column into table `wide`.
    Wide,
}

/// One catch-up backlog: its workload and its number of transactions.
#[derive(Clone, Copy, Debug)]
struct Backlog {
    workload: Workload,
    txns: u64,
}

impl Backlog {
    /// `TIDEMARK_BENCH_BACKLOGS` (e.g. `pgbench:600000,wide:200000`), else `default`.
    fn from_env(default: &str) -> Vec<Backlog> {
        let text = std::env::var("TIDEMARK_BENCH_BACKLOGS").unwrap_or_else(|_| default.into());
        text.split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(|b| {
                let parsed = b.split_once(':').and_then(|(w, n)| {
                    let workload = match w {
                        "pgbench" => Workload::Pgbench,
                        "wide" => Workload::Wide,
                        _ => return None,
                    };
                    Some(Backlog {
                        workload,
                        txns: n.replace('_', "").parse().ok().filter(|n| *n > 0)?,
                    })
                });
                parsed.unwrap_or_else(|| {
                    panic!(
                        "TIDEMARK_BENCH_BACKLOGS: {b:?} is not WORKLOAD:TRANSACTIONS \
                         (pgbench:600000 or wide:200000)"
                    )
                })
            })
            .collect()
    }

    fn describe(&self) -> String {
        match self.workload {
            Workload::Pgbench => format!("{} pgbench transactions", thousands(self.txns)),
            Workload::Wide => format!("{} inserts of a 2 KiB text row", thousands(self.txns)),
        }
    }
}

/// A positive count from environment variable `name`, else `default`.
fn env_count(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name}: {v:?} is not a positive number of transactions")),
        Err(_) => default,
    }
}

/// 2000000 as "2,000,000".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One line of the result table.
struct Row {
    what: String,
    tidemark: String,
    reference: String,
    ratio: Option<f64>,
    target: &'static str,
    met: Option<bool>,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = Sizes::new(full);
    let only = std::env::var("TIDEMARK_BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let started = Instant::now();
    rt.block_on(async {
        if wanted("catchup") || wanted("live") {
            rows.extend(stream_rows(&sizes, wanted("catchup"), wanted("live")).await);
        }
        if wanted("backup") {
            rows.extend(backup_rows(&sizes).await);
        }
        if wanted("schedule") {
            rows.extend(schedule_rows(&sizes).await);
        }
        if wanted("s3") {
            rows.extend(s3_rows(&sizes).await);
        }
        if wanted("huge") {
            rows.extend(huge_row(&sizes).await);
        }
        if wanted("crypt") {
            rows.extend(crypt_rows(&sizes).await);
        }
    });
    print_table(&rows, &sizes, started.elapsed());
    if !sizes.full {
        // The smoke run proves every row still produces a figure.
        for r in &rows {
            assert!(
                !r.tidemark.is_empty() && r.tidemark != "-",
                "row {:?} produced no figure",
                r.what
            );
        }
    }
}

fn print_table(rows: &[Row], sizes: &Sizes, took: Duration) {
    println!();
    println!(
        "tidemark compare ({} sizes: backlogs {}, live {:?} x {} clients, scale {}, huge txn {} rows; {} cores; took {:.0?})",
        if sizes.full { "full" } else { "smoke" },
        sizes
            .backlogs
            .iter()
            .map(Backlog::describe)
            .collect::<Vec<_>>()
            .join(" / "),
        sizes.live,
        sizes.clients,
        sizes.scale,
        sizes.huge_rows,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        took
    );
    println!();
    println!("| what | tidemark | reference (same run) | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.what,
            r.tidemark,
            r.reference,
            r.ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.target,
            match (sizes.full, r.met) {
                (false, _) => "(smoke)",
                (true, Some(true)) => "yes",
                (true, Some(false)) => "**no**",
                (true, None) => "-",
            }
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// Processes and queries.

fn bin(name: &str) -> PathBuf {
    support::pg_bindir().join(name)
}

/// The bench's cluster settings (room for a large backlog's WAL, shared buffers for pgbench's
/// tables) with `extra` lines added.
fn bench_options(extra: &[&str]) -> ClusterOptions {
    let mut extra_conf = vec![
        "max_wal_size = 4GB".to_string(),
        "shared_buffers = 256MB".to_string(),
    ];
    extra_conf.extend(extra.iter().map(|line| line.to_string()));
    ClusterOptions {
        extra_conf,
        ..ClusterOptions::default()
    }
}

/// Creates database `db` in `cluster`, fills it with `pgbench -i` at `scale`; a client of it.
async fn pgbench_init(cluster: &Cluster, db: &str, scale: u32) -> tokio_postgres::Client {
    cluster.create_database(db);
    run_ok(
        Command::new(bin("pgbench"))
            .args(["-i", "-q", "-s", &scale.to_string()])
            .args(["-d", &cluster.conninfo(db)])
            .stdout(Stdio::null()),
    );
    cluster.client(db).await
}

/// A cluster of [`bench_options`] with `extra`, holding a pgbench database `db` at `scale`.
async fn pgbench_cluster(
    db: &str,
    scale: u32,
    extra: &[&str],
) -> (Cluster, tokio_postgres::Client) {
    let cluster = Cluster::start(bench_options(extra));
    let client = pgbench_init(&cluster, db, scale).await;
    (cluster, client)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn timed(cmd: &mut Command) -> (Duration, String) {
    let t = Instant::now();
    let out = run_ok(cmd);
    (t.elapsed(), out)
}

/// Runs pgbench; returns its tps (without connection time) and the transactions processed.
fn pgbench(cluster: &Cluster, db: &str, args: &[&str]) -> (f64, u64) {
    pgbench_env(cluster, db, args, "")
}

/// pgbench with `PGOPTIONS` (e.g. `-c synchronous_commit=off` to build a backlog quickly).
fn pgbench_env(cluster: &Cluster, db: &str, args: &[&str], pgoptions: &str) -> (f64, u64) {
    let out = run_ok(
        Command::new(bin("pgbench"))
            .args(["-n", "-d", &cluster.conninfo(db)])
            .args(args)
            .env("PGOPTIONS", pgoptions),
    );
    let tps = out
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench output:\n{out}"));
    let txns = out
        .lines()
        .find(|l| l.starts_with("number of transactions actually processed"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{out}"));
    (tps, txns)
}

fn tidemark(args: &[&str]) -> String {
    run_ok(
        Command::new(support::tidemark_bin())
            .args(args)
            .env("TIDEMARK_LOG", "warn"),
    )
}

fn spawn_archiver(cluster: &Cluster, db: &str, repo: &Path, extra: &[&str]) -> Child {
    Command::new(support::tidemark_bin())
        .args(["archive", "--source", &cluster.conninfo(db), "--repo"])
        .arg(repo)
        .args(extra)
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tidemark archive")
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// User and system CPU seconds process `pid` has used so far (`/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = 100.0; // USER_HZ, what /proc reports in on Linux
    (ticks(11) / hz, ticks(12) / hz)
}

/// Records (pgoutput messages) in the segments under `dir`.
fn segment_records(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            total += segment_records(&path);
        } else if let Ok(bytes) = std::fs::read(&path) {
            if let Ok((info, _)) = tidemark::segment::read_info(&bytes) {
                total += info.record_count;
            }
        }
    }
    total
}

/// An LSN-valued query's result as a byte position.
async fn lsn_of(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(&format!("SELECT (({sql}) - '0/0'::pg_lsn)::int8"), &[])
        .await
        .unwrap()
        .get(0)
}

async fn confirmed(client: &tokio_postgres::Client, slot: &str) -> i64 {
    lsn_of(
        client,
        &format!(
            "SELECT coalesce(confirmed_flush_lsn, '0/0') FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    )
    .await
}

/// Drops a slot once its consumer's walsender has let go of it.
async fn drop_slot(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("dropping slot {slot}: {e}"),
        }
    }
}

async fn wait_active(client: &tokio_postgres::Client, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = client
            .query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .len();
        if n > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "slot {slot} never became active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_confirmed(client: &tokio_postgres::Client, slot: &str, lsn: i64) -> Duration {
    let t = Instant::now();
    while confirmed(client, slot).await < lsn {
        assert!(
            t.elapsed() < Duration::from_secs(3600),
            "slot {slot} never reached the target"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                total += dir_bytes(&p);
            } else if let Ok(m) = p.metadata() {
                total += m.len();
            }
        }
    }
    total
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / (1 << 20) as f64)
}

// ---------------------------------------------------------------------------------------------
// Lag sampling: bytes and seconds between the server's WAL position and a slot's confirmed
// position, every 100 ms. Seconds: how long ago the server's WAL passed the confirmed position.

struct LagSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Vec<f64>, Vec<f64>, Vec<u64>)>,
}

impl LagSampler {
    async fn start(cluster: &Cluster, db: &str, slot: &str, pid: Option<u32>) -> LagSampler {
        Self::start_from(cluster, db, slot, pid, 0).await
    }

    /// Samples lag only once the slot's confirmed position reached `from`.
    async fn start_from(
        cluster: &Cluster,
        db: &str,
        slot: &str,
        pid: Option<u32>,
        from: i64,
    ) -> LagSampler {
        let client = cluster.client(db).await;
        let slot = slot.to_string();
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut history: std::collections::VecDeque<(Instant, i64)> = Default::default();
            let (mut bytes, mut secs, mut rss) = (Vec::new(), Vec::new(), Vec::new());
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let row = client
                    .query_one(
                        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8,
                                (coalesce((SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1), '0/0') - '0/0'::pg_lsn)::int8",
                        &[&slot],
                    )
                    .await
                    .unwrap();
                let (now_lsn, conf): (i64, i64) = (row.get(0), row.get(1));
                if conf < from {
                    continue;
                }
                let now = Instant::now();
                history.push_back((now, now_lsn));
                bytes.push((now_lsn - conf).max(0) as f64);
                // The oldest sample whose WAL position was already past the confirmed one.
                while history.len() > 1 && history[1].1 <= conf {
                    history.pop_front();
                }
                let lag = match history.front() {
                    Some((t, l)) if *l > conf => now.duration_since(*t).as_secs_f64(),
                    Some((_, _)) if history.len() > 1 => {
                        now.duration_since(history[1].0).as_secs_f64()
                    }
                    _ => 0.0,
                };
                secs.push(if now_lsn > conf { lag } else { 0.0 });
                if let Some(pid) = pid {
                    rss.push(rss_bytes(pid).unwrap_or(0));
                }
            }
            (bytes, secs, rss)
        });
        LagSampler { stop, task }
    }

    /// (p99 bytes, p99 seconds, max RSS)
    async fn finish(self) -> (f64, f64, u64) {
        let (bytes, secs, rss) = self.samples().await;
        (
            percentile(bytes, 0.99),
            percentile(secs, 0.99),
            rss.into_iter().max().unwrap_or(0),
        )
    }

    /// Every sample: (lag bytes, lag seconds, RSS).
    async fn samples(self) -> (Vec<f64>, Vec<f64>, Vec<u64>) {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Catch-up, live TPS, lag, RPO, archive size, replay speed, memory under load.

struct PgBackRest {
    config: PathBuf,
    repo: PathBuf,
}

/// Prepares pgBackRest's archive-push for a cluster to be started, if pgbackrest is installed.
fn pgbackrest_conf(dir: &Path) -> Option<PgBackRest> {
    let found = Command::new("pgbackrest")
        .arg("version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        return None;
    }
    std::fs::create_dir_all(dir.join("repo")).unwrap();
    std::fs::create_dir_all(dir.join("log")).unwrap();
    std::fs::create_dir_all(dir.join("lock")).unwrap();
    chown_to_postgres(dir);
    Some(PgBackRest {
        config: dir.join("pgbackrest.conf"),
        repo: dir.join("repo"),
    })
}

fn chown_to_postgres(dir: &Path) {
    if is_root() {
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir),
        );
        run_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(dir));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn as_server_user(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

async fn stream_rows(sizes: &Sizes, catchup: bool, live: bool) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let pgbr_dir = work.path().join("pgbackrest");
    let pgbr = pgbackrest_conf(&pgbr_dir);
    let mut opts = bench_options(&["checkpoint_timeout = 30min"]);
    match &pgbr {
        Some(p) => opts.extra_conf.extend([
            "archive_mode = on".to_string(),
            format!(
                "archive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
                p.config.display()
            ),
        ]),
        None => opts.archive_wal = true,
    }
    let cluster = Cluster::start(opts);
    if let Some(p) = &pgbr {
        std::fs::write(
            &p.config,
            format!(
                "[global]\nrepo1-path={}\ncompress-type=gz\nlog-path={}\nlock-path={}\nlog-level-console=warn\nlog-level-file=off\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user={}\n",
                p.repo.display(),
                pgbr_dir.join("log").display(),
                pgbr_dir.join("lock").display(),
                cluster.data_dir.display(),
                cluster.port,
                cluster.socket_dir.display(),
                support::SUPERUSER
            ),
        )
        .unwrap();
        chown_to_postgres(&pgbr_dir);
        run_ok(
            as_server_user("pgbackrest")
                .arg(format!("--config={}", p.config.display()))
                .args(["--stanza=bench", "stanza-create"]),
        );
    }
    let client = pgbench_init(&cluster, "bench", sizes.stream_scale).await;
    let repo = work.path().join("repo");
    let repo_s = repo.to_str().unwrap().to_string();
    let mut rows = Vec::new();

    // The archive's first base backup, then a clean stop: the slot now rests at the archive's end.
    let a = spawn_archiver(&cluster, "bench", &repo, &["--heartbeat", "0s"]);
    wait_active(&client, "tidemark").await;
    stop(a);

    if catchup {
        let mut wide = false;
        for (i, backlog) in sizes.backlogs.iter().enumerate() {
            if backlog.workload == Workload::Wide && !wide {
                client
                    .batch_execute("CREATE TABLE wide (id bigserial PRIMARY KEY, v text NOT NULL)")
                    .await
                    .unwrap();
                wide = true;
            }
            let repo2 = work.path().join(format!("repo2-{i}"));
            rows.push(catchup_row(sizes, &cluster, &client, *backlog, [&repo, &repo2]).await);
        }
    }

    if live {
        let secs = sizes.live.as_secs().max(1).to_string();
        let clients = sizes.clients.to_string();
        let args = ["-c", clients.as_str(), "-j", "2", "-T", secs.as_str()];
        // tidemark attached, with its defaults (first: its slot is at the stream's end now).
        switch_and_wait_archived(&client).await;
        let wal_before = lsn_of(&client, "SELECT pg_current_wal_lsn()").await;
        let archive_before = archived_bytes(pgbr.as_ref().map(|p| p.repo.as_path()), &cluster);
        let seg_before = dir_bytes(&repo.join("segments"));
        let first = live_tidemark(&cluster, &client, &repo, &args).await;
        let (tps_tm, txns, rss) = (first.tps, first.txns, first.rss);
        let wal_after = lsn_of(&client, "SELECT pg_current_wal_lsn()").await;
        let seg_after = dir_bytes(&repo.join("segments"));
        switch_and_wait_archived(&client).await;
        let archive_after = archived_bytes(pgbr.as_ref().map(|p| p.repo.as_path()), &cluster);

        // Then the references, with the tidemark slot at rest (it keeps their WAL, unread).
        // No consumer.
        let (tps_none, _) = pgbench(&cluster, "bench", &args);
        let recv = live_recvlogical(&cluster, &client, &args).await;
        let mut ratios = vec![tps_tm / recv.tps];
        let mut tm_lag = (first.lag_bytes, first.lag_secs);
        let mut recv_lag = (recv.lag_bytes, recv.lag_secs);
        let mut tps = (vec![tps_tm], vec![recv.tps]);
        if sizes.full {
            // A second round in the other order: one pair of 60 s runs on a shared machine
            // moves by several percent. The TPS ratio is the rounds' mean; the lags their worst.
            let recv = live_recvlogical(&cluster, &client, &args).await;
            let again = live_tidemark(&cluster, &client, &repo, &args).await;
            ratios.push(again.tps / recv.tps);
            tm_lag = (tm_lag.0.max(again.lag_bytes), tm_lag.1.max(again.lag_secs));
            recv_lag = (
                recv_lag.0.max(recv.lag_bytes),
                recv_lag.1.max(recv.lag_secs),
            );
            tps.0.push(again.tps);
            tps.1.push(recv.tps);
        }
        let (tm_lag_bytes, tm_lag_secs) = tm_lag;
        let (recv_lag_bytes, recv_lag_secs) = recv_lag;
        let tps_text = |v: &[f64]| {
            v.iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let ratio = ratios.iter().sum::<f64>() / ratios.len() as f64;
        rows.push(Row {
            what: "live: pgbench TPS with the consumer attached".into(),
            tidemark: format!("{} tps", tps_text(&tps.0)),
            reference: format!(
                "pg_recvlogical -s 1 -F 1: {} tps; no consumer: {tps_none:.0} tps",
                tps_text(&tps.1)
            ),
            ratio: Some(ratio),
            target: ">= 0.97",
            met: Some(ratio >= 0.97),
        });
        rows.push(Row {
            what: "live lag, p99".into(),
            tidemark: format!("{tm_lag_secs:.2} s, {}", mib(tm_lag_bytes)),
            reference: format!(
                "pg_recvlogical: {recv_lag_secs:.2} s, {}",
                mib(recv_lag_bytes)
            ),
            ratio: None,
            target: "<= 1 s",
            met: Some(tm_lag_secs <= 1.0),
        });
        rows.push(Row {
            what: "RPO, p99: commit -> segment stored (local folder)".into(),
            tidemark: format!("{tm_lag_secs:.2} s"),
            reference: "the slot is acknowledged only when stored".into(),
            ratio: None,
            target: "<= 1.5 s",
            met: Some(tm_lag_secs <= 1.5),
        });
        let per = |b: f64| b / txns.max(1) as f64;
        let tm_bytes = per(seg_after.saturating_sub(seg_before) as f64);
        let wal_bytes = per((wal_after - wal_before) as f64);
        let archive_label = if pgbr.is_some() {
            "pgBackRest gz archive"
        } else {
            "gzip -6 of WAL segments (pgBackRest not installed)"
        };
        let ref_bytes = per(archive_after.saturating_sub(archive_before) as f64);
        let ratio = tm_bytes / ref_bytes;
        rows.push(Row {
            what: "archive bytes per pgbench transaction".into(),
            tidemark: format!("{tm_bytes:.0} B"),
            reference: format!("{archive_label}: {ref_bytes:.0} B; WAL written: {wal_bytes:.0} B"),
            ratio: Some(ratio),
            target: "<= 0.25",
            met: Some(ratio <= 0.25),
        });
        rows.push(Row {
            what: "memory: archiver RSS under load (max)".into(),
            tidemark: mib(rss as f64),
            reference: "-".into(),
            ratio: None,
            target: "<= 64 MiB",
            met: Some(rss <= 64 << 20),
        });

        // Replay speed: restore everything archived; compare with the source's commit rate.
        cluster.create_database("replayed");
        let out = run_ok(
            Command::new(support::tidemark_bin())
                .args(["restore", "--repo", &repo_s, "--latest", "--target"])
                .arg(cluster.conninfo("replayed"))
                .env("TIDEMARK_LOG", "warn"),
        );
        let (replayed, replay_secs) = parse_restore(&out);
        let rate = replayed as f64 / replay_secs.max(1e-3);
        let ratio = rate / tps_tm;
        rows.push(Row {
            what: "replay during restore".into(),
            tidemark: format!("{rate:.0} txn/s ({replayed} txns)"),
            reference: format!("source commit rate: {tps_tm:.0} txn/s"),
            ratio: Some(ratio),
            target: ">= 10",
            met: Some(ratio >= 10.0),
        });
    }
    rows
}

/// The catch-up row of one backlog. The backlog is built once and drained by four consumers
/// whose slots all rest at its start: in round 0 pg_recvlogical (slot `twin`) then tidemark
/// (slot `tidemark`, repository `repos[0]`), in round 1 tidemark (slot `tidemark2`, a new
/// repository `repos[1]`) then pg_recvlogical (`twin2`). The order alternates (a drain on a
/// shared machine moves by several percent), and the backlog is built once (on this machine
/// pgbench builds it at a few thousand transactions a second). The ratio is the median of the
/// rounds'. On return the slot `tidemark` rests at the backlog's end; the others are dropped.
async fn catchup_row(
    sizes: &Sizes,
    cluster: &Cluster,
    client: &tokio_postgres::Client,
    backlog: Backlog,
    repos: [&Path; 2],
) -> Row {
    let rounds: usize = if sizes.full { 2 } else { 1 };
    let ours = [("tidemark", repos[0]), ("tidemark2", repos[1])];
    let twins = ["twin", "twin2"];
    if rounds > 1 {
        // A slot named on the command line must exist; the archiver takes the new
        // repository's base backup, then rests at the slot's position.
        create_slot(client, "tidemark2").await;
        let a = spawn_archiver(
            cluster,
            "bench",
            repos[1],
            &["--heartbeat", "0s", "--slot", "tidemark2"],
        );
        wait_active(client, "tidemark2").await;
        stop(a);
    }
    for twin in &twins[..rounds] {
        create_slot(client, twin).await;
    }
    build_backlog(sizes, cluster, backlog, repos[0].parent().unwrap());
    let end = lsn_of(client, "SELECT pg_current_wal_lsn()").await;
    let end_text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let mut drains = Pair::default();
    let mut cpu = Vec::new();
    for round in 0..rounds {
        let recv = || {
            timed(recvlogical(cluster, twins[round]).args([
                "--endpos",
                &end_text,
                "--no-loop",
                "-f",
                "/dev/null",
            ]))
            .0
        };
        let (slot, dir) = ours[round];
        let archiver = || async {
            let before = segment_records(&dir.join("segments"));
            let a = spawn_archiver(
                cluster,
                "bench",
                dir,
                &["--heartbeat", "0s", "--slot", slot],
            );
            let t = wait_confirmed(client, slot, end).await;
            let used = cpu_seconds(a.id());
            stop(a);
            let messages = segment_records(&dir.join("segments")) - before;
            (t, used, messages)
        };
        let (recv_time, (tm_time, used, messages)) = if round.is_multiple_of(2) {
            let r = recv();
            (r, archiver().await)
        } else {
            let t = archiver().await;
            (recv(), t)
        };
        drains.reference.push(recv_time.as_secs_f64());
        drains.ours.push(tm_time.as_secs_f64());
        cpu.push((used, messages));
    }
    for twin in &twins[..rounds] {
        drop_slot(client, twin).await;
    }
    if rounds > 1 {
        drop_slot(client, "tidemark2").await;
        // Its repository is not read again; the disk is the next backlog's.
        let _ = std::fs::remove_dir_all(repos[1]);
    }
    let recv_time = Duration::from_secs_f64(median(drains.reference.clone()));
    let tm_time = Duration::from_secs_f64(median(drains.ours.clone()));
    // In rate: the median of the rounds' reference / ours in time.
    let ratio = median(
        drains
            .reference
            .iter()
            .zip(&drains.ours)
            .map(|(r, o)| r / o)
            .collect(),
    );
    let n = backlog.txns as f64;
    let per_message: Vec<String> = cpu
        .iter()
        .map(|((user, sys), m)| {
            format!(
                "{:.2} µs ({user:.2} s user + {sys:.2} s sys / {m} messages)",
                (user + sys) * 1e6 / (*m).max(1) as f64
            )
        })
        .collect();
    Row {
        what: format!("catch-up: drain a backlog of {}", backlog.describe()),
        tidemark: format!(
            "{:.0} txn/s ({:.1?}; rounds {}); archiver CPU per message: {}",
            n / tm_time.as_secs_f64(),
            tm_time,
            times_text(&drains.ours),
            per_message.join(", ")
        ),
        reference: format!(
            "pg_recvlogical: {:.0} txn/s ({:.1?}; rounds {})",
            n / recv_time.as_secs_f64(),
            recv_time,
            times_text(&drains.reference)
        ),
        ratio: Some(ratio),
        target: ">= 0.95",
        met: Some(ratio >= 0.95),
    }
}

/// Writes `backlog` into database `bench` with 4 clients (pgbench `-c 4 -j 2`, the clients of
/// the run's sizes) and `synchronous_commit=off`: built fast (no wait for a WAL flush at each
/// commit); only draining it is timed. The wide rows' pgbench script is written in `scratch`.
fn build_backlog(sizes: &Sizes, cluster: &Cluster, backlog: Backlog, scratch: &Path) {
    let per_client = (backlog.txns / sizes.clients as u64).max(1).to_string();
    let clients = sizes.clients.to_string();
    let mut args = vec!["-c", &clients, "-j", "2", "-t", &per_client];
    let script = scratch.join("wide.sql");
    if backlog.workload == Workload::Wide {
        // 64 md5 digests: 2,048 characters that zstd cannot fold into each other.
        std::fs::write(
            &script,
            "INSERT INTO wide (v) SELECT string_agg(md5(random()::text), '') \
             FROM generate_series(1, 64);\n",
        )
        .unwrap();
        args.extend(["-f", script.to_str().unwrap()]);
    }
    pgbench_env(cluster, "bench", &args, "-c synchronous_commit=off");
    let _ = std::fs::remove_file(&script);
}

/// One live pgbench run with a consumer attached.
struct LiveRun {
    tps: f64,
    txns: u64,
    /// p99 lag of the consumer's slot, bytes and seconds.
    lag_bytes: f64,
    lag_secs: f64,
    /// The consumer's peak RSS (tidemark only).
    rss: u64,
}

/// pgbench with `tidemark archive` (its defaults) attached; returns once everything the run
/// wrote is archived and the archiver stopped.
async fn live_tidemark(
    cluster: &Cluster,
    client: &tokio_postgres::Client,
    repo: &Path,
    args: &[&str],
) -> LiveRun {
    let a = spawn_archiver(cluster, "bench", repo, &[]);
    let pid = a.id();
    wait_active(client, "tidemark").await;
    // The slot rested while other runs wrote WAL: the run starts once it caught up (to a
    // commit: what follows the last one is confirmed only at the idle store).
    let caught_up = lsn_of(
        client,
        "SELECT pg_logical_emit_message(true, 'bench', 'start')",
    )
    .await;
    wait_confirmed(client, "tidemark", caught_up).await;
    let wal_before = lsn_of(client, "SELECT pg_current_wal_lsn()").await;
    // A WAL switch before the run skips to a new WAL file: lag counts once the slot has passed
    // the run's start (at its first commit), so that the jump is not counted.
    let sampler = LagSampler::start_from(cluster, "bench", "tidemark", Some(pid), wal_before).await;
    let (tps, txns) = pgbench(cluster, "bench", args);
    let (lag_bytes, lag_secs, rss) = sampler.finish().await;
    let wal_after = lsn_of(client, "SELECT pg_current_wal_lsn()").await;
    wait_confirmed(client, "tidemark", wal_after).await;
    stop(a);
    LiveRun {
        tps,
        txns,
        lag_bytes,
        lag_secs,
        rss,
    }
}

/// The reference consumer's slot, `twin`, at the WAL's end.
async fn create_twin(client: &tokio_postgres::Client) {
    create_slot(client, "twin").await;
}

/// A pgoutput slot named `slot` at the WAL's end.
async fn create_slot(client: &tokio_postgres::Client, slot: &str) {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
}

/// `pg_recvlogical --start` on `slot`, with pgoutput's options for the `tidemark` publication.
fn recvlogical(cluster: &Cluster, slot: &str) -> Command {
    let mut c = Command::new(bin("pg_recvlogical"));
    c.args(["-d", &cluster.conninfo("bench"), "--slot", slot, "--start"])
        .args(["-o", "proto_version=1", "-o", "publication_names=tidemark"]);
    c
}

/// pgbench with `pg_recvlogical -s 1 -F 1` attached to a slot of its own (dropped after).
async fn live_recvlogical(
    cluster: &Cluster,
    client: &tokio_postgres::Client,
    args: &[&str],
) -> LiveRun {
    create_twin(client).await;
    let recv = recvlogical(cluster, "twin")
        .args(["-s", "1", "-F", "1", "-f", "/dev/null"])
        .spawn()
        .unwrap();
    wait_active(client, "twin").await;
    let sampler = LagSampler::start(cluster, "bench", "twin", None).await;
    let (tps, txns) = pgbench(cluster, "bench", args);
    let (lag_bytes, lag_secs, _) = sampler.finish().await;
    stop(recv);
    drop_slot(client, "twin").await;
    LiveRun {
        tps,
        txns,
        lag_bytes,
        lag_secs,
        rss: 0,
    }
}

/// (transactions replayed, seconds of replay) from `tidemark restore`'s summary line; the
/// replay time when printed, else the whole restore's.
fn parse_restore(out: &str) -> (u64, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("restored base backup"))
        .unwrap_or_else(|| panic!("no summary in restore output:\n{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let n = words
        .iter()
        .position(|w| *w == "transaction(s)")
        .and_then(|i| words[i - 1].parse().ok())
        .unwrap_or(0);
    let secs = |marker: &str| {
        line.find(marker).and_then(|i| {
            line[i + marker.len()..]
                .trim_start()
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
    };
    let t = secs("replay").or_else(|| secs(" in ")).unwrap_or(0.0);
    (n, t)
}

async fn switch_and_wait_archived(client: &tokio_postgres::Client) {
    let wal: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let last: Option<String> = client
            .query_one("SELECT last_archived_wal FROM pg_stat_archiver", &[])
            .await
            .unwrap()
            .get(0);
        if last.as_deref() >= Some(wal.as_str()) {
            return;
        }
        assert!(Instant::now() < deadline, "WAL {wal} never archived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bytes in the WAL archive: pgBackRest's repository, or the harness's plain archive gzipped.
fn archived_bytes(pgbr_repo: Option<&Path>, cluster: &Cluster) -> u64 {
    match pgbr_repo {
        Some(repo) => dir_bytes(&repo.join("archive")),
        None => {
            let dir = cluster.archive_dir.as_ref().expect("WAL archive");
            let mut total = 0;
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(format!("gzip -6 -c '{}' | wc -c", e.path().display()))
                    .output()
                    .unwrap();
                total += String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
            total
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Base backup and restore of a pgbench database, beside pg_dump -Fd -j 2 / pg_restore -j 2.

async fn backup_rows(sizes: &Sizes) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    // Autovacuum off: the second restore would otherwise share the machine with the vacuum of
    // the tables the first one just loaded.
    let (cluster, client) = pgbench_cluster("big", sizes.scale, &["autovacuum = off"]).await;
    client.batch_execute("CHECKPOINT").await.unwrap();
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    tidemark(&["setup", "--source", &cluster.conninfo("big")]);
    let repo = work.path().join("repo");
    let repo_s = repo.to_str().unwrap();
    let dump = work.path().join("dump");
    // Several rounds, the order of the two tools alternating, each figure the median: one pair
    // of runs on a shared machine spreads by ±15 %.
    let rounds = if sizes.full { 5 } else { 1 };
    let mut backups = Pair::default();
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&dump);
        let run_dump = || {
            timed(
                Command::new(bin("pg_dump"))
                    .args(["-Fd", "-j", "2", "-f"])
                    .arg(&dump)
                    .args(["-d", &cluster.conninfo("big")]),
            )
            .0
        };
        let run_backup = || {
            timed(
                Command::new(support::tidemark_bin())
                    .args(["backup", "--parallel", "2", "--repo", repo_s, "--source"])
                    .arg(cluster.conninfo("big"))
                    .env("TIDEMARK_LOG", "warn"),
            )
            .0
        };
        backups.run(round, run_dump, run_backup);
    }
    let mut restores = Pair::default();
    for round in 0..rounds {
        let (from_dump, from_tidemark) = (format!("from_dump_{round}"), format!("from_tm_{round}"));
        if round > 0 {
            // Keep one restored pair for the row-count check; drop the others' disk space.
            for db in [
                format!("from_dump_{}", round - 1),
                format!("from_tm_{}", round - 1),
            ] {
                client
                    .batch_execute(&format!("DROP DATABASE {db}"))
                    .await
                    .unwrap();
            }
        }
        cluster.create_database(&from_dump);
        cluster.create_database(&from_tidemark);
        // Each restore starts from a checkpoint: the one timed second must not share the disk
        // with the write-back of what the first one loaded.
        let checkpoint = || {
            run_ok(
                Command::new(bin("psql"))
                    .args(["-qc", "CHECKPOINT", "-d", &cluster.conninfo("big")])
                    .stdout(Stdio::null()),
            );
        };
        let run_pg_restore = || {
            checkpoint();
            timed(
                Command::new(bin("pg_restore"))
                    .args(["-j", "2", "-d", &cluster.conninfo(&from_dump)])
                    .arg(&dump),
            )
            .0
        };
        let run_restore = || {
            checkpoint();
            timed(
                Command::new(support::tidemark_bin())
                    .args(["restore", "--parallel", "2", "--latest", "--repo", repo_s])
                    .args(["--target", &cluster.conninfo(&from_tidemark)])
                    .env("TIDEMARK_LOG", "warn"),
            )
            .0
        };
        restores.run(round, run_pg_restore, run_restore);
    }
    let last = rounds - 1;
    let count = |db: String| {
        let c = &cluster;
        async move {
            c.client(&db)
                .await
                .query_one("SELECT count(*) FROM pgbench_accounts", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        count(format!("from_dump_{last}")).await,
        count(format!("from_tm_{last}")).await
    );
    let b = backups.ratio();
    let r = restores.ratio();
    vec![
        Row {
            what: "base backup of a pgbench database".into(),
            tidemark: format!(
                "{}, {}",
                backups.ours_text(),
                mib(dir_bytes(&repo) as f64 / rounds as f64)
            ),
            reference: format!(
                "pg_dump -Fd -j 2: {}, {}",
                backups.reference_text(),
                mib(dir_bytes(&dump) as f64)
            ),
            ratio: Some(b),
            target: "<= 1.0",
            met: Some(b <= 1.0),
        },
        Row {
            what: "restore of that base backup".into(),
            tidemark: restores.ours_text(),
            reference: format!("pg_restore -j 2: {}", restores.reference_text()),
            ratio: Some(r),
            target: "<= 0.8",
            met: Some(r <= 0.8),
        },
    ]
}

/// Wall times of a reference tool and of ours over rounds run in alternating order.
#[derive(Default)]
struct Pair {
    reference: Vec<f64>,
    ours: Vec<f64>,
}

impl Pair {
    /// Runs both, the reference first in even rounds and ours first in odd ones.
    fn run(&mut self, round: usize, reference: impl Fn() -> Duration, ours: impl Fn() -> Duration) {
        let (r, o) = if round.is_multiple_of(2) {
            let r = reference();
            (r, ours())
        } else {
            let o = ours();
            (reference(), o)
        };
        self.reference.push(r.as_secs_f64());
        self.ours.push(o.as_secs_f64());
    }

    /// The median of the rounds' ratios (ours / reference).
    fn ratio(&self) -> f64 {
        median(
            self.ours
                .iter()
                .zip(&self.reference)
                .map(|(o, r)| o / r)
                .collect(),
        )
    }

    fn ours_text(&self) -> String {
        times_text(&self.ours)
    }

    fn reference_text(&self) -> String {
        times_text(&self.reference)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "5.4s" for one round, "5.4s (median of 5: 5.1-6.0s)" for more.
fn times_text(v: &[f64]) -> String {
    let m = median(v.to_vec());
    if v.len() == 1 {
        return format!("{m:.1}s");
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{m:.1}s (median of {}: {lo:.1}-{hi:.1}s)", v.len())
}

// ---------------------------------------------------------------------------------------------
// Memory through one huge transaction.

async fn huge_row(sizes: &Sizes) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("huge");
    let client = cluster.client("huge").await;
    client
        .batch_execute("CREATE TABLE huge (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let repo = work.path().join("repo");
    let a = spawn_archiver(&cluster, "huge", &repo, &[]);
    let pid = a.id();
    wait_active(&client, "tidemark").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss_bytes(pid).unwrap_or(0);
    let sampler = LagSampler::start(&cluster, "huge", "tidemark", Some(pid)).await;
    let t = Instant::now();
    client
        .execute(
            "INSERT INTO huge SELECT i, md5(i::text) FROM generate_series(1, $1::int8) i",
            &[&(sizes.huge_rows as i64)],
        )
        .await
        .unwrap();
    let end = lsn_of(&client, "SELECT pg_current_wal_lsn()").await;
    wait_confirmed(&client, "tidemark", end).await;
    let took = t.elapsed();
    let (_, _, rss) = sampler.samples().await;
    stop(a);
    // Flat: the RSS does not grow with the transaction. The samples (every 100 ms while it is
    // written and archived) in four quarters of time; each quarter's maximum within ±10 % of
    // their mean.
    let max_rss = rss.iter().copied().max().unwrap_or(0);
    let quarter = rss.len().div_ceil(4).max(1);
    let peaks: Vec<f64> = rss
        .chunks(quarter)
        .map(|q| q.iter().copied().max().unwrap_or(0) as f64)
        .collect();
    let mean = peaks.iter().sum::<f64>() / peaks.len().max(1) as f64;
    let spread = peaks
        .iter()
        .map(|p| (p / mean.max(1.0) - 1.0).abs())
        .fold(0.0, f64::max);
    vec![Row {
        what: "memory through one huge transaction (RSS)".into(),
        tidemark: format!(
            "{} max ({} idle); quarter peaks {} MiB (±{:.0} %); archived in {took:.1?}",
            mib(max_rss as f64),
            mib(baseline as f64),
            peaks
                .iter()
                .map(|p| format!("{:.1}", p / (1 << 20) as f64))
                .collect::<Vec<_>>()
                .join(" / "),
            spread * 100.0
        ),
        reference: "-".into(),
        ratio: None,
        target: "<= 64 MiB, flat (±10 %)",
        met: Some(max_rss <= 64 << 20 && spread <= 0.10),
    }]
}

// ---------------------------------------------------------------------------------------------
// S3: requests per hour for an idle and a busy database, and the RPO on an S3 store. The S3
// server is the tests' in-process S3-compatible server; requests are counted by the tests' proxy.

async fn s3_rows(sizes: &Sizes) -> Vec<Row> {
    use support::proxy::{FaultProxy, Mode};
    use support::s3::S3Server;

    let server = S3Server::start();
    server.create_bucket("bench");
    let proxy = FaultProxy::start(&server.endpoint);
    proxy.set_mode(Mode::Pass);
    let env = server.cli_env(&proxy.endpoint);
    let cluster = Cluster::start(ClusterOptions::default());
    let client = pgbench_init(&cluster, "bench", 1).await;
    let child = Command::new(support::tidemark_bin())
        .args(["archive", "--source", &cluster.conninfo("bench")])
        .args(["--repo", "s3://bench/db"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tidemark archive");
    wait_active(&client, "tidemark").await;
    // Past the first base backup and the first heartbeat's segment.
    let end = lsn_of(&client, "SELECT pg_current_wal_lsn()").await;
    wait_confirmed(&client, "tidemark", end).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let count = |p: &FaultProxy| (p.requests(), p.requests_by("PUT"), p.requests_by("GET"));
    let per_hour = |n: u64, d: Duration| n as f64 * 3600.0 / d.as_secs_f64();
    let (r0, p0, g0) = count(&proxy);
    let t = Instant::now();
    tokio::time::sleep(sizes.s3_idle).await;
    let idle = t.elapsed();
    let (r1, p1, g1) = count(&proxy);

    let secs = sizes.s3_busy.as_secs().max(1).to_string();
    let clients = sizes.clients.to_string();
    let sampler = LagSampler::start(&cluster, "bench", "tidemark", Some(child.id())).await;
    let t = Instant::now();
    let (tps, _) = pgbench(&cluster, "bench", &["-c", &clients, "-j", "2", "-T", &secs]);
    let busy = t.elapsed();
    let (_, rpo, _) = sampler.finish().await;
    let (r2, p2, g2) = count(&proxy);
    stop(child);

    let idle_puts_per_min = (p1 - p0) as f64 * 60.0 / idle.as_secs_f64();
    vec![
        Row {
            what: "S3 requests, idle database".into(),
            tidemark: format!(
                "{:.0}/h ({:.0} PUT/h = {idle_puts_per_min:.1} PUT/min, {:.0} GET/h incl. LIST)",
                per_hour(r1 - r0, idle),
                per_hour(p1 - p0, idle),
                per_hour(g1 - g0, idle)
            ),
            reference: format!("watched {idle:.0?}"),
            ratio: None,
            target: "a few PUTs per minute, no LIST",
            met: Some(idle_puts_per_min <= 3.0 && g1 == g0),
        },
        Row {
            what: "S3 requests, busy database (pgbench)".into(),
            tidemark: format!(
                "{:.0}/h ({:.0} PUT/h, {:.0} GET/h incl. LIST)",
                per_hour(r2 - r1, busy),
                per_hour(p2 - p1, busy),
                per_hour(g2 - g1, busy)
            ),
            reference: format!("{tps:.0} tps for {busy:.0?}"),
            ratio: None,
            target: "report",
            met: None,
        },
        Row {
            what: "RPO, p99: commit -> segment stored (S3 store)".into(),
            tidemark: format!("{rpo:.2} s"),
            reference: "the slot is acknowledged only when stored".into(),
            ratio: None,
            target: "<= 1.5 s",
            met: Some(rpo <= 1.5),
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Scheduled base backups beside the stream.

/// One live pgbench run with the archiver attached, with or without scheduled base backups
/// (`--base-backup-every 1s`: one backup after another for the whole run, the worst case):
/// the TPS and, with backups, the backups' (seconds, raw bytes) from the archiver's log.
async fn live_scheduled(
    cluster: &Cluster,
    client: &tokio_postgres::Client,
    repo: &Path,
    args: &[&str],
    scheduled: bool,
) -> (f64, Vec<(f64, f64)>) {
    let log = repo.with_extension(format!("log-{}", rand::random::<u32>()));
    let mut cmd = Command::new(support::tidemark_bin());
    cmd.args(["archive", "--source", &cluster.conninfo("sched"), "--repo"])
        .arg(repo)
        .args(["--parallel", "2"])
        .env("TIDEMARK_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if scheduled {
        cmd.args(["--base-backup-every", "1s"]);
    }
    let a = cmd.spawn().expect("start tidemark archive");
    wait_active(client, "tidemark").await;
    let caught_up = lsn_of(
        client,
        "SELECT pg_logical_emit_message(true, 'bench', 'start')",
    )
    .await;
    wait_confirmed(client, "tidemark", caught_up).await;
    let text_before = std::fs::read_to_string(&log).unwrap_or_default();
    let (tps, _) = pgbench(cluster, "sched", args);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    stop(a);
    let _ = std::fs::remove_file(&log);
    // Backups that finished during the pgbench run.
    let backups = text[text_before.len().min(text.len())..]
        .lines()
        .filter(|l| l.contains("base backup taken"))
        .filter_map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<f64>().ok())
            };
            Some((field("seconds=")?, field("raw_bytes=")?))
        })
        .collect();
    (tps, backups)
}

async fn schedule_rows(sizes: &Sizes) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let (cluster, client) = pgbench_cluster("sched", sizes.scale, &[]).await;
    client.batch_execute("VACUUM ANALYZE").await.unwrap();
    tidemark(&["setup", "--source", &cluster.conninfo("sched")]);
    let repo = work.path().join("repo");
    let clients = sizes.clients.to_string();
    let secs = sizes.live.as_secs().to_string();
    let args = ["-c", clients.as_str(), "-j", "2", "-T", secs.as_str()];
    // Rounds, the order alternating; the ratio is the mean of the rounds' ratios.
    let rounds = if sizes.full { 2 } else { 1 };
    let (mut ratios, mut plain, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let mut backups = Vec::new();
    for round in 0..rounds {
        let (p, (w, b)) = if round % 2 == 0 {
            let p = live_scheduled(&cluster, &client, &repo, &args, false)
                .await
                .0;
            (
                p,
                live_scheduled(&cluster, &client, &repo, &args, true).await,
            )
        } else {
            let w = live_scheduled(&cluster, &client, &repo, &args, true).await;
            (
                live_scheduled(&cluster, &client, &repo, &args, false)
                    .await
                    .0,
                w,
            )
        };
        ratios.push(w / p);
        plain.push(p);
        with.push(w);
        backups.extend(b);
    }
    let ratio = ratios.iter().sum::<f64>() / ratios.len() as f64;
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let rates: Vec<f64> = backups.iter().map(|(s, b)| b / s.max(1e-6) / 1e6).collect();
    let mb = backups.first().map_or(0.0, |(_, b)| b / 1e6);
    let throughput = if rates.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.0} MB/s (median of {} backups of {:.0} MB of table data, under pgbench)",
            median(rates.clone()),
            rates.len(),
            mb
        )
    };
    vec![
        Row {
            what: "live: pgbench TPS during scheduled base backups (back to back)".into(),
            tidemark: format!("{} tps", list(&with)),
            reference: format!("same archiver, no schedule: {} tps", list(&plain)),
            ratio: Some(ratio),
            target: "report",
            met: None,
        },
        Row {
            what: "scheduled base backup throughput (table data read)".into(),
            tidemark: throughput,
            reference: "-".into(),
            ratio: None,
            target: "report",
            met: None,
        },
    ]
}

/// Client-side encryption against none, in the same run: the archiver's CPU to drain the same
/// pgbench backlog into a plain and into an encrypted repository (each from its own base backup
/// on a slot of its own, both slots resting at the backlog's start, built once), then restores
/// of both alternating, five rounds in the full run (the ratio is the median of the rounds').
async fn crypt_rows(sizes: &Sizes) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let (cluster, client) = pgbench_cluster("bench", sizes.stream_scale, &[]).await;
    let keyring = work.path().join("keyring.json");
    tidemark(&["keys", "generate", "--out", keyring.to_str().unwrap()]);
    let key_flag = ["--encryption-key-file", keyring.to_str().unwrap()];

    // (repository, extra flags, the archiver's flags, its slot)
    let mut runs: Vec<(PathBuf, Vec<&str>, Vec<&str>, &str)> = Vec::new();
    for (name, slot, extra) in [
        ("plain", "tidemark", vec![]),
        ("encrypted", "tidemark2", key_flag.to_vec()),
    ] {
        let repo = work.path().join(name);
        let mut flags = vec!["--heartbeat", "0s"];
        flags.extend(&extra);
        if slot != "tidemark" {
            // A slot named on the command line must exist; the default one is created.
            create_slot(&client, slot).await;
            flags.extend(["--slot", slot]);
        }
        let a = spawn_archiver(&cluster, "bench", &repo, &flags);
        wait_active(&client, slot).await;
        stop(a);
        runs.push((repo, extra, flags, slot));
    }
    let backlog = Backlog {
        workload: Workload::Pgbench,
        txns: sizes.backlog_txns,
    };
    build_backlog(sizes, &cluster, backlog, work.path());
    let end = lsn_of(&client, "SELECT pg_current_wal_lsn()").await;
    // Archiver CPU seconds for the backlog, plain then encrypted.
    let mut cpu = Vec::new();
    for (repo, _, flags, slot) in &runs {
        let a = spawn_archiver(&cluster, "bench", repo, flags);
        wait_confirmed(&client, slot, end).await;
        let (user, sys) = cpu_seconds(a.id());
        cpu.push(user + sys);
        stop(a);
    }

    let rounds = if sizes.full { 5 } else { 1 };
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let db = format!("crypt_{round}_{i}");
            cluster.create_database(&db);
            let (repo, extra, _, _) = &runs[i];
            let (t, _) = timed(
                Command::new(support::tidemark_bin())
                    .args(["restore", "--repo", repo.to_str().unwrap()])
                    .args(extra)
                    .args(["--target", &cluster.conninfo(&db), "--latest"])
                    .env("TIDEMARK_LOG", "warn"),
            );
            times[i].push(t.as_secs_f64());
        }
    }
    let ratios: Vec<f64> = times[0].iter().zip(&times[1]).map(|(p, e)| e / p).collect();
    let restore_ratio = percentile(ratios, 0.5);
    let (plain_cpu, enc_cpu) = (cpu[0], cpu[1]);
    let (plain_bytes, enc_bytes) = (dir_bytes(&runs[0].0), dir_bytes(&runs[1].0));
    let median = |v: &[f64]| percentile(v.to_vec(), 0.5);
    vec![
        Row {
            what: "encryption: archiver CPU to drain a backlog".into(),
            tidemark: format!("{enc_cpu:.2} s encrypted ({})", mib(enc_bytes as f64)),
            reference: format!("{plain_cpu:.2} s plain ({})", mib(plain_bytes as f64)),
            ratio: Some(enc_cpu / plain_cpu.max(0.01)),
            target: "-",
            met: None,
        },
        Row {
            what: "encryption: restore --latest".into(),
            tidemark: format!("{:.2} s encrypted", median(&times[1])),
            reference: format!("{:.2} s plain", median(&times[0])),
            ratio: Some(restore_ratio),
            target: "<= 1.05",
            met: Some(restore_ratio <= 1.05),
        },
    ]
}
