//! A throwaway local PostgreSQL cluster for `tidemark demo`: initdb in a temporary folder,
//! wal_level=logical, listening on a free loopback port and a private socket folder, stopped
//! and deleted when dropped. When running as root, the server runs as the `postgres` user
//! (PostgreSQL refuses root).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

pub struct ScratchCluster {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    pub port: u16,
    owner: Option<(u32, u32)>,
    running: bool,
}

impl ScratchCluster {
    pub fn start() -> anyhow::Result<ScratchCluster> {
        let initdb = crate::pgbin::find("initdb", None)
            .context("a throwaway cluster needs the PostgreSQL server programs (initdb, pg_ctl)")?;
        let bindir = initdb.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-demo-")
            .tempdir()?;
        let owner = if effective_uid_is_root() {
            Some(postgres_ids()?)
        } else {
            None
        };
        if let Some((uid, gid)) = owner {
            chown_recursive(dir.path(), uid, gid)?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut c = ScratchCluster {
            dir,
            bindir,
            port,
            owner,
            running: false,
        };
        let data = c.data_dir();
        c.run(
            Command::new(c.bindir.join("initdb"))
                .args([
                    "-U",
                    "tidemark",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&data),
        )?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n",
            c.dir.path().display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)?;
        let log = c.dir.path().join("server.log");
        c.run(
            Command::new(c.bindir.join("pg_ctl"))
                .args(["-w", "-t", "60", "-D"])
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .arg("start"),
        )?;
        c.running = true;
        Ok(c)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, cmd: &mut Command) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{:?} failed: {}{}",
                cmd.get_program(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A connection string for database `db`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=tidemark dbname={db}",
            self.port
        )
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.run(
                Command::new(self.bindir.join("pg_ctl"))
                    .args(["-w", "-m", "immediate", "-D"])
                    .arg(&data)
                    .arg("stop"),
            );
        }
    }
}

fn effective_uid_is_root() -> bool {
    // /proc/self/status holds "Uid: real effective saved fs".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        .unwrap_or(false)
}

fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("running as root, and there is no `postgres` user to run the throwaway server as (PostgreSQL refuses to run as root)")
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    Ok(())
}
