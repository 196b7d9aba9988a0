//! Throwaway PostgreSQL clusters and the physical PITR oracle.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::os::{client_command, give_to_server_user, run, server_command};
use super::{pg_bindir, SUPERUSER};

/// How long to wait for a server to start, finish recovery, or archive WAL.
const WAIT: Duration = Duration::from_secs(180);
/// Attempts at starting a server when its port turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// A restart waits this many times this long for its port to be free again.
const SAME_PORT_ATTEMPTS: usize = 15;
const SAME_PORT_WAIT: Duration = Duration::from_secs(2);

/// What starting the server does when its port is taken.
#[derive(Clone, Copy)]
enum PortTaken {
    /// Move to a free port (a first start: nobody knows the port yet).
    MoveOn,
    /// Try the same port again for a while (a restart: clients know the port).
    Wait,
}
/// Log lines shown in panic messages.
const LOG_TAIL_LINES: usize = 60;

/// How to set up a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `wal_level`; "logical" by default.
    pub wal_level: &'static str,
    /// Extra `postgresql.conf` lines, appended after the harness's own (so they win).
    pub extra_conf: Vec<String>,
    /// `pg_hba.conf` lines placed before initdb's (trust for local and 127.0.0.1).
    pub hba: Vec<String>,
    /// `archive_mode = on`, archiving every WAL segment to `<tempdir>/wal_archive`
    /// ([`Cluster::archive_dir`]). Needed for [`Cluster::base_backup`].
    pub archive_wal: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "logical",
            extra_conf: Vec::new(),
            hba: Vec::new(),
            archive_wal: false,
        }
    }
}

/// A running (or stopped) PostgreSQL cluster in its own temporary directory.
///
/// Layout of the temporary directory: `data/` (the data directory), the Unix
/// socket, `server.log` (kept outside `data/` so base backups don't carry it),
/// and `wal_archive/` when archiving. Dropping the cluster stops the server
/// (immediate mode) and removes the directory, unless a [`PhysicalBackup`]
/// taken from it still needs its WAL archive.
pub struct Cluster {
    pub port: u16,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    /// Where WAL is archived (`Some` with `archive_wal: true`).
    pub archive_dir: Option<PathBuf>,
    log_file: PathBuf,
    running: bool,
    dir: Arc<TempDir>,
    /// Directories this cluster still reads from (a recovered cluster's source archive).
    _keep: Vec<Arc<TempDir>>,
}

impl Cluster {
    /// initdb a new cluster and start it; see [`ClusterOptions`].
    pub fn start(opts: ClusterOptions) -> Cluster {
        let dir = new_server_dir();
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        let mut initdb = server_command(pg_bindir().join("initdb"), &root);
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            // Only skips initdb's final fsync of the new files; the server keeps fsync on.
            .arg("--no-sync");
        if let Err(e) = run(&mut initdb) {
            panic!("initdb failed: {e}");
        }

        let archive_dir = opts.archive_wal.then(|| {
            let dir = root.join("wal_archive");
            fs::create_dir(&dir).expect("create wal_archive");
            give_to_server_user(&dir);
            dir
        });

        let port = free_port();
        let mut conf = base_conf(&root, port, opts.wal_level);
        conf.push(archive_conf(archive_dir.as_deref()));
        conf.extend(opts.extra_conf.iter().cloned());
        append_lines(&data_dir.join("postgresql.conf"), &conf);
        if !opts.hba.is_empty() {
            let hba_path = data_dir.join("pg_hba.conf");
            let old = fs::read_to_string(&hba_path).expect("read pg_hba.conf");
            let new = format!("{}\n{old}", opts.hba.join("\n"));
            fs::write(&hba_path, new).expect("write pg_hba.conf");
        }

        let mut cluster = Cluster {
            port,
            data_dir,
            socket_dir: root.clone(),
            archive_dir,
            log_file: root.join("server.log"),
            running: false,
            dir: Arc::new(dir),
            _keep: Vec::new(),
        };
        cluster.start_server(PortTaken::MoveOn);
        cluster
    }

    /// libpq key=value connection string (TCP to 127.0.0.1, superuser `tidemark`).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={}",
            self.port,
            conninfo_value(db)
        )
    }

    /// `CREATE DATABASE name`.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        );
    }

    /// A connected client; its connection task is spawned on the current tokio runtime.
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let conninfo = self.conninfo(db);
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connect to {conninfo:?}: {e}\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                )
            });
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("test connection ended with error: {e}");
            }
        });
        client
    }

    /// Run `sql` (any number of statements, psql meta-commands allowed) with
    /// `psql -XAtq -v ON_ERROR_STOP=1`; returns stdout without its final newline.
    /// Panics with psql's stderr and the server log tail on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let mut cmd = client_command(pg_bindir().join("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo(db))
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn psql");
        {
            let mut stdin = child.stdin.take().expect("psql stdin");
            stdin.write_all(sql.as_bytes()).expect("write SQL to psql");
        }
        let out = child.wait_with_output().expect("wait for psql");
        if !out.status.success() {
            panic!(
                "psql on db {db:?} failed ({})\n--- SQL ---\n{sql}\n--- stderr ---\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.ends_with('\n') {
            stdout.pop();
        }
        stdout
    }

    /// Whole server log (empty if the server never wrote one).
    pub fn log(&self) -> String {
        fs::read(&self.log_file)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Last `lines` lines of the server log, labelled, for panic messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "--- server log tail ({}) ---\n{tail}\n--- end of server log ---",
            self.log_file.display()
        )
    }

    /// Whether the harness believes the server is running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// PID of the postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> u32 {
        let pidfile = fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .unwrap_or_else(|e| panic!("read postmaster.pid: {e}"));
        pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad postmaster.pid: {pidfile:?}"))
    }

    /// `pg_ctl stop -m fast` (clean shutdown with a checkpoint). No-op if stopped.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// `pg_ctl stop -m immediate`: no checkpoint, so the next start runs crash
    /// recovery — the way to simulate a server crash. No-op if stopped.
    pub fn stop_immediate(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    /// Start a stopped cluster again (same data, same port: clients such as a running
    /// archiver keep its address; panics if the port stays taken).
    pub fn start_again(&mut self) {
        assert!(!self.running, "start_again: the cluster is already running");
        self.start_server(PortTaken::Wait);
    }

    /// Append `postgresql.conf` lines, then stop (fast) and start the server.
    pub fn restart_with(&mut self, extra_conf: &[&str]) {
        let lines: Vec<String> = extra_conf.iter().map(|s| s.to_string()).collect();
        append_lines(&self.data_dir.join("postgresql.conf"), &lines);
        self.stop();
        self.start_server(PortTaken::Wait);
    }

    /// `SELECT pg_switch_wal()`, then wait until the just-finished segment
    /// (the one holding everything written so far) is in the WAL archive.
    /// Returns that segment's file name. Needs `archive_wal: true`.
    pub fn switch_wal_and_wait_archived(&self) -> String {
        let archive = self.archive_dir.as_ref().unwrap_or_else(|| {
            panic!("switch_wal_and_wait_archived needs ClusterOptions {{ archive_wal: true }}")
        });
        // pg_walfile_name maps a segment-boundary LSN to the segment before it,
        // i.e. the one pg_switch_wal just completed.
        let segment = self.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
        let deadline = Instant::now() + WAIT;
        while !archive.join(&segment).exists() {
            if Instant::now() > deadline {
                let stats = self.psql(
                    "postgres",
                    "SELECT format('archived_count=%s last_archived_wal=%s failed_count=%s \
                     last_failed_wal=%s', archived_count, last_archived_wal, failed_count, \
                     last_failed_wal) FROM pg_stat_archiver",
                );
                panic!(
                    "WAL segment {segment} not archived after {WAIT:?} ({stats})\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        segment
    }

    /// `pg_basebackup -X none -c fast` into a new temporary directory; the WAL
    /// it needs comes from this cluster's archive (this waits until the backup's
    /// end is archived). Needs `archive_wal: true`.
    pub fn base_backup(&self) -> PhysicalBackup {
        let archive_dir = self
            .archive_dir
            .clone()
            .unwrap_or_else(|| panic!("base_backup needs ClusterOptions {{ archive_wal: true }}"));
        let dir = new_server_dir();
        let backup_dir = dir.path().join("backup");
        let mut cmd = server_command(pg_bindir().join("pg_basebackup"), dir.path());
        cmd.arg("-D")
            .arg(&backup_dir)
            .args(["-X", "none", "-c", "fast", "--no-sync", "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER]);
        if let Err(e) = run(&mut cmd) {
            panic!(
                "pg_basebackup failed: {e}\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        // The backup is usable only once the WAL up to its end point is archived.
        self.switch_wal_and_wait_archived();
        PhysicalBackup {
            backup_dir,
            archive_dir,
            _dir: dir,
            _source: Arc::clone(&self.dir),
        }
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let mut cmd = server_command(pg_bindir().join("pg_ctl"), &self.socket_dir);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "120", "stop"]);
        if let Err(e) = run(&mut cmd) {
            panic!(
                "pg_ctl stop -m {mode}: {e}\n{}",
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.running = false;
    }

    /// pg_ctl start -w; if the port is taken, moves to a new one or waits for it to be free.
    fn start_server(&mut self, taken: PortTaken) {
        let attempts = match taken {
            PortTaken::MoveOn => PORT_ATTEMPTS,
            PortTaken::Wait => SAME_PORT_ATTEMPTS,
        };
        for attempt in 1..=attempts {
            let log_len_before = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
            let mut cmd = server_command(pg_bindir().join("pg_ctl"), &self.socket_dir);
            cmd.arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", &WAIT.as_secs().to_string(), "start"]);
            let Err(e) = run(&mut cmd) else {
                self.running = true;
                return;
            };
            let log = self.log();
            let new_log = log.get(log_len_before as usize..).unwrap_or(&log);
            let port_taken = new_log.contains("could not bind")
                || new_log.contains("could not create any TCP/IP sockets");
            if !port_taken || attempt == attempts {
                let why = match (port_taken, taken) {
                    (true, PortTaken::Wait) => format!(
                        "; port {} stayed taken by another process while the cluster was \
                         stopped (a restart keeps its port: clients hold its address)",
                        self.port
                    ),
                    _ => String::new(),
                };
                panic!(
                    "could not start PostgreSQL (attempt {attempt}){why}: {e}\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            if let PortTaken::Wait = taken {
                std::thread::sleep(SAME_PORT_WAIT);
                continue;
            }
            self.port = free_port();
            append_lines(
                &self.data_dir.join("postgresql.conf"),
                &[format!("port = {}", self.port)],
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = server_command(pg_bindir().join("pg_ctl"), &self.socket_dir);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "60", "stop"]);
        if let Err(e) = run(&mut cmd) {
            // Never panic in drop (we may already be unwinding).
            eprintln!("warning: could not stop test cluster: {e}");
        }
    }
}

/// A plain-format base backup plus the WAL archive it recovers from.
/// Keeps the source cluster's archive directory alive while it exists.
pub struct PhysicalBackup {
    /// The base backup (a data directory without WAL).
    pub backup_dir: PathBuf,
    /// The source cluster's WAL archive.
    pub archive_dir: PathBuf,
    _dir: TempDir,
    _source: Arc<TempDir>,
}

impl PhysicalBackup {
    /// Restore this backup into a new cluster recovered to `target` (a
    /// timestamptz literal, e.g. `'2026-11-28 12:00:00.123456+00'` without the
    /// quotes): `recovery_target_time = target`, inclusive, then promote.
    /// Returns once recovery has finished (`pg_is_in_recovery()` is false).
    ///
    /// The WAL holding the first commit after `target` must already be archived
    /// ([`Cluster::switch_wal_and_wait_archived`]), or recovery fails
    /// ("recovery ended before configured recovery target was reached").
    /// The new cluster archives its own WAL to its own `wal_archive/`.
    pub fn recover_to_time(&self, target: &str) -> Cluster {
        let dir = new_server_dir();
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        // cp -a as the server user keeps ownership and the 0700 mode PostgreSQL demands.
        let mut cp = server_command("cp", &root);
        cp.arg("-a").arg(&self.backup_dir).arg(&data_dir);
        if let Err(e) = run(&mut cp) {
            panic!("copy base backup: {e}");
        }
        let own_archive = root.join("wal_archive");
        fs::create_dir(&own_archive).expect("create wal_archive");
        give_to_server_user(&own_archive);

        let port = free_port();
        let mut conf = base_conf(&root, port, "");
        conf.push(archive_conf(Some(&own_archive)));
        conf.extend([
            format!(
                "restore_command = 'cp \"{}/%f\" \"%p\"'",
                conf_escape(&self.archive_dir)
            ),
            format!("recovery_target_time = '{}'", target.replace('\'', "''")),
            "recovery_target_inclusive = on".to_string(),
            "recovery_target_action = 'promote'".to_string(),
        ]);
        append_lines(&data_dir.join("postgresql.conf"), &conf);
        let signal = data_dir.join("recovery.signal");
        fs::write(&signal, "").expect("create recovery.signal");
        give_to_server_user(&signal);

        let mut cluster = Cluster {
            port,
            data_dir,
            socket_dir: root.clone(),
            archive_dir: Some(own_archive),
            log_file: root.join("server.log"),
            running: false,
            dir: Arc::new(dir),
            _keep: vec![Arc::clone(&self._source)],
        };
        cluster.start_server(PortTaken::MoveOn);

        let deadline = Instant::now() + WAIT;
        loop {
            if !cluster.is_postmaster_alive() {
                cluster.running = false;
                panic!(
                    "recovery to {target:?} failed: the server stopped\n{}",
                    cluster.log_tail(LOG_TAIL_LINES)
                );
            }
            let mut cmd = client_command(pg_bindir().join("psql"));
            cmd.args(["-XAtq", "-d", &cluster.conninfo("postgres")])
                .args(["-c", "SELECT pg_is_in_recovery()"]);
            if let Ok(out) = run(&mut cmd) {
                if String::from_utf8_lossy(&out.stdout).trim() == "f" {
                    return cluster;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "recovery to {target:?} did not finish within {WAIT:?}\n{}",
                    cluster.log_tail(LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Cluster {
    fn is_postmaster_alive(&self) -> bool {
        let mut cmd = server_command(pg_bindir().join("pg_ctl"), &self.socket_dir);
        cmd.arg("-D").arg(&self.data_dir).arg("status");
        run(&mut cmd).is_ok()
    }
}

/// A temporary directory the server user owns.
fn new_server_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("tidemark-pg-")
        .tempdir()
        .expect("create temporary directory");
    give_to_server_user(dir.path());
    // The socket path must fit in sun_path (107 bytes) with "/.s.PGSQL.NNNNN".
    assert!(
        dir.path().as_os_str().len() <= 80,
        "temporary directory path {} is too long for a Unix socket; set TMPDIR to a short path",
        dir.path().display()
    );
    dir
}

/// The harness's own postgresql.conf lines.
/// An empty `wal_level` keeps whatever the file already says.
fn base_conf(root: &Path, port: u16, wal_level: &str) -> Vec<String> {
    let mut conf = vec![
        String::new(),
        "# --- tidemark test harness ---".to_string(),
        "listen_addresses = '127.0.0.1'".to_string(),
        format!("port = {port}"),
        format!("unix_socket_directories = '{}'", conf_escape(root)),
        "max_replication_slots = 20".to_string(),
        "max_wal_senders = 20".to_string(),
        // Crash tests rely on durability: keep fsync on.
        "fsync = on".to_string(),
        "log_line_prefix = '%m [%p] %q%a '".to_string(),
    ];
    if !wal_level.is_empty() {
        conf.push(format!("wal_level = {wal_level}"));
    }
    conf
}

fn archive_conf(archive_dir: Option<&Path>) -> String {
    match archive_dir {
        // Copy then rename, so a segment appears in the archive only when complete.
        Some(dir) => {
            let dir = conf_escape(dir);
            format!(
                "archive_mode = on\narchive_command = 'cp \"%p\" \"{dir}/%f.tmp\" && mv -f \"{dir}/%f.tmp\" \"{dir}/%f\"'"
            )
        }
        None => "archive_mode = off".to_string(),
    }
}

/// Append lines to a config file (keeps its owner).
fn append_lines(path: &Path, lines: &[String]) {
    let mut file = OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    for line in lines {
        writeln!(file, "{line}").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

/// A path inside a single-quoted postgresql.conf value.
fn conf_escape(path: &Path) -> String {
    let s = path.to_str().expect("temporary paths are UTF-8");
    assert!(
        !s.contains(['\'', '"', '\\']),
        "unexpected quote in path {s}"
    );
    s.to_string()
}

/// A libpq connection-string value, quoted when needed.
fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An SQL identifier, always double-quoted.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process
/// has not handed out before.
fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}
