//! Process and file-ownership plumbing: running PostgreSQL programs as the
//! `postgres` OS user when the tests run as root.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// uid/gid that server-side programs must run as: `Some(postgres)` when this
/// process is root, `None` (run as ourselves) otherwise.
pub(crate) fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if effective_uid() != 0 {
            return None;
        }
        Some(lookup_user("postgres").unwrap_or_else(|| {
            panic!(
                "tests run as root, but PostgreSQL refuses to run as root and there is no \
                 `postgres` user in /etc/passwd to run it as (installing Debian's postgresql \
                 packages creates it; or run the tests as an ordinary user)"
            )
        }))
    })
}

/// Effective uid of this process: the owner of a file we just created.
fn effective_uid() -> u32 {
    let file = tempfile::tempfile().expect("create a temporary file to learn our uid");
    file.metadata().expect("stat temporary file").uid()
}

/// (uid, gid) of `name` from /etc/passwd.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            Some((fields[2].parse().ok()?, fields[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// Give `path` (not recursive) to the server user, if we switch users.
pub(crate) fn give_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// A command for `program` that runs as the server user, in `cwd`, with a
/// clean PostgreSQL environment (no inherited PG* variables) and the C locale.
pub(crate) fn server_command(program: impl AsRef<OsStr>, cwd: &Path) -> Command {
    let mut cmd = client_command(program);
    cmd.current_dir(cwd);
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
        // The server user cannot read root's home; keep tools from trying.
        cmd.env("HOME", cwd);
    }
    cmd
}

/// A command for `program` run as ourselves, with no inherited PG* variables.
pub(crate) fn client_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C");
    cmd.stdin(Stdio::null());
    cmd
}

/// Run to completion, capturing output; `Err` carries a readable account of
/// the failure (command line, exit status, stdout, stderr).
pub(crate) fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {shown}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{shown} failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
