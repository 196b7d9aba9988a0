//! Shared integration-test harness: throwaway PostgreSQL clusters, a physical
//! point-in-time-recovery oracle, and table-content comparison helpers.
//!
//! Every integration test lives in the one `integration` test binary
//! (`tests/integration/main.rs`); modules there use this as `crate::support`.
//!
//! PostgreSQL binaries come from [`pg_bindir`]. PostgreSQL refuses to run as
//! root, so when the test process runs as root every server-side program
//! (initdb, pg_ctl, pg_basebackup, the server itself) runs as the `postgres`
//! OS user and the temporary directories are handed to that user.

// Not every helper is used by every test module.
#![allow(dead_code)]

pub mod archiving;
mod cluster;
mod content;
pub mod metrics;
mod os;
pub mod proxy;
pub mod s3;
mod schema;
pub mod tcp_proxy;
pub mod tls;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

// Re-exported for test modules; not all of them are used by every build.
#[allow(unused_imports)]
pub use cluster::{Cluster, ClusterOptions, PhysicalBackup};
#[allow(unused_imports)]
pub use content::{
    assert_same_content, assert_same_hashes, content_hashes, snapshot_content, ContentHashes,
    ContentSnapshot,
};
#[allow(unused_imports)]
pub use schema::{assert_same_schema, schema_dump};

/// Superuser created by `initdb -U` in every test cluster.
pub const SUPERUSER: &str = "tidemark";

/// Directory holding the PostgreSQL server binaries (initdb, pg_ctl, psql, ...).
///
/// Order: `$TIDEMARK_PG_BIN`, then `pg_config --bindir` (if that folder has
/// `initdb`), then the highest `/usr/lib/postgresql/<major>/bin` (Debian layout).
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(find_pg_bindir).clone()
}

fn find_pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TIDEMARK_PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").is_file(),
            "TIDEMARK_PG_BIN={} has no initdb in it",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("initdb").is_file() {
                return dir;
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    candidates.sort();
    match candidates.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries found: set TIDEMARK_PG_BIN to the folder holding \
             initdb/pg_ctl/postgres, or install them (Debian: apt-get install postgresql-15; \
             `bash .ci/run` does this)"
        ),
    }
}

/// The `tidemark` binary built by cargo for this test run.
pub fn tidemark_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidemark"))
}

/// A TCP port on 127.0.0.1 where nothing listens, for as long as this value lives: the port
/// stays bound (without listening, so connecting is refused), so no other test of the binary
/// (a cluster, an S3 server, a proxy, all picking free ports) can take it meanwhile.
pub struct ClosedPort {
    _bound: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn hold() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind 127.0.0.1:0");
        let port = socket.local_addr().expect("local_addr").port();
        ClosedPort {
            _bound: socket,
            port,
        }
    }
}

/// Waits until the repository at `repo` (a folder) holds a complete base backup (a
/// `manifest.json` under `basebackups/`): an archiver's slot is active while it takes its first
/// one, so an active slot alone does not mean the archive covers "now" yet.
pub async fn wait_base_backup(repo: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let done = std::fs::read_dir(repo.join("basebackups"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| d.path().join("manifest.json").is_file());
        if done {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no base backup in {} after 90 s",
            repo.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The pid of the walsender serving slot `tidemark`, while it is active.
pub async fn walsender_pid(client: &tokio_postgres::Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'tidemark' AND active",
            &[],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}
