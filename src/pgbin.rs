//! Locating PostgreSQL client programs (`pg_dump`, `pg_restore`, `psql`).
//!
//! Owns: the search order and the version check. A program is looked for in
//! `$TIDEMARK_PG_BIN` (a folder), then in `PATH`, then in `pg_config --bindir`, then in the
//! Debian layout `/usr/lib/postgresql/<N>/bin`, highest `N` first. With a minimum major
//! version (the server's: `pg_dump` refuses to dump a server newer than itself), candidates
//! whose `--version` reports an older major are skipped.
//!
//! Debian and Ubuntu put `pg_wrapper` (postgresql-common, a Perl script) on `PATH` under each
//! program's name; it picks a version and runs `/usr/lib/postgresql/<N>/bin/<program>`. Perl's
//! start costs about 50 ms per run, and a restore runs `pg_restore` four or five times: a
//! `PATH` entry that resolves to `pg_wrapper` is passed over for the folders it dispatches to
//! (highest version first, which the version check needs anyway), and used only when none of
//! them has the program.
//!
//! Does not own: running the programs (callers do, with [`crate::conninfo::ConnInfo::child_env`]).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming a folder that holds the PostgreSQL client programs.
pub const ENV_PG_BIN: &str = "TIDEMARK_PG_BIN";

/// Folder holding one folder per installed major version on Debian and Ubuntu.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// Why no usable program was found.
#[derive(Debug, thiserror::Error)]
pub enum PgBinError {
    #[error("{}", describe_not_found(.program, *.min_major, .looked, .rejected))]
    NotFound {
        program: String,
        min_major: Option<u32>,
        /// Descriptions of the places searched, in order.
        looked: Vec<String>,
        /// Candidates found but refused: path and reported major version (None: unreadable).
        rejected: Vec<(PathBuf, Option<u32>)>,
    },
}

impl crate::error::Classify for PgBinError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        match self {
            // PostgreSQL's client programs belong with the database: install or point to them.
            PgBinError::NotFound { .. } => crate::error::ExitStatus::Database,
        }
    }
}

fn describe_not_found(
    program: &str,
    min_major: Option<u32>,
    looked: &[String],
    rejected: &[(PathBuf, Option<u32>)],
) -> String {
    let needed = min_major
        .map(|m| format!(" (version {m} or newer)"))
        .unwrap_or_default();
    let skipped = if rejected.is_empty() {
        String::new()
    } else {
        let items: Vec<String> = rejected
            .iter()
            .map(|(p, v)| match v {
                Some(v) => format!("{} is version {v}", p.display()),
                None => format!("{} did not report a version", p.display()),
            })
            .collect();
        format!(" (skipped: {})", items.join("; "))
    };
    let package = match min_major {
        Some(m) => format!("postgresql-client-{m}"),
        None => "postgresql-client-N".to_string(),
    };
    format!(
        "{program}{needed} not found; looked in {}{skipped}. Install the PostgreSQL client \
         programs ({package} on Debian/Ubuntu, matching the server's major version or newer) \
         or set {ENV_PG_BIN} to the folder that holds {program}",
        looked.join(", ")
    )
}

/// Finds `program`, at least of major version `min_major` when given (see the module doc).
pub fn find(program: &str, min_major: Option<u32>) -> Result<PathBuf, PgBinError> {
    let env_dir = std::env::var_os(ENV_PG_BIN)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path_dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    find_in(
        program,
        min_major,
        &Places {
            env_dir: env_dir.as_deref(),
            path_dirs: &path_dirs,
            pg_config_bindir: &pg_config_bindir,
            debian_root: Path::new(DEBIAN_ROOT),
        },
    )
}

/// Where [`find`] looks (separate for tests).
struct Places<'a> {
    env_dir: Option<&'a Path>,
    path_dirs: &'a [PathBuf],
    pg_config_bindir: &'a dyn Fn() -> Option<PathBuf>,
    debian_root: &'a Path,
}

fn find_in(program: &str, min_major: Option<u32>, places: &Places) -> Result<PathBuf, PgBinError> {
    let mut s = Search {
        program,
        min_major,
        looked: Vec::new(),
        rejected: Vec::new(),
        seen: Vec::new(),
        wrapper: None,
    };
    if let Some(dir) = places.env_dir {
        s.looked.push(format!("${ENV_PG_BIN} ({})", dir.display()));
        if let Some(p) = s.try_dir(dir, false) {
            return Ok(p);
        }
    }
    s.looked.push("PATH".into());
    for dir in places.path_dirs {
        if let Some(p) = s.try_dir(dir, true) {
            return Ok(p);
        }
    }
    // With pg_wrapper on PATH, the folders it dispatches to come first.
    let debian_first = s.wrapper.is_some();
    if debian_first {
        if let Some(p) = s.try_debian(places.debian_root) {
            return Ok(p);
        }
    }
    s.looked.push("pg_config --bindir".into());
    if let Some(dir) = (places.pg_config_bindir)() {
        if let Some(p) = s.try_dir(&dir, false) {
            return Ok(p);
        }
    }
    if !debian_first {
        if let Some(p) = s.try_debian(places.debian_root) {
            return Ok(p);
        }
    }
    if let Some(w) = s.wrapper.take() {
        if let Some(p) = s.accept(w) {
            return Ok(p);
        }
    }
    Err(PgBinError::NotFound {
        program: program.to_string(),
        min_major,
        looked: s.looked,
        rejected: s.rejected,
    })
}

/// The state of one [`find_in`].
struct Search<'a> {
    program: &'a str,
    min_major: Option<u32>,
    looked: Vec<String>,
    rejected: Vec<(PathBuf, Option<u32>)>,
    /// Canonical paths already tried.
    seen: Vec<PathBuf>,
    /// The first `PATH` entry that is Debian's pg_wrapper: the last resort.
    wrapper: Option<PathBuf>,
}

impl Search<'_> {
    fn try_dir(&mut self, dir: &Path, on_path: bool) -> Option<PathBuf> {
        let candidate = dir.join(self.program);
        if !is_executable(&candidate) {
            return None;
        }
        let canonical = std::fs::canonicalize(&candidate).unwrap_or_else(|_| candidate.clone());
        if on_path && canonical.file_name().is_some_and(|n| n == "pg_wrapper") {
            self.wrapper.get_or_insert(candidate);
            return None;
        }
        if self.seen.contains(&canonical) {
            return None;
        }
        self.seen.push(canonical);
        self.accept(candidate)
    }

    fn try_debian(&mut self, root: &Path) -> Option<PathBuf> {
        self.looked.push(format!("{}/<N>/bin", root.display()));
        debian_bindirs(root)
            .iter()
            .find_map(|dir| self.try_dir(dir, false))
    }

    /// The candidate if its version is new enough.
    fn accept(&mut self, candidate: PathBuf) -> Option<PathBuf> {
        let Some(min) = self.min_major else {
            return Some(candidate);
        };
        match program_major(&candidate) {
            Some(m) if m >= min => Some(candidate),
            other => {
                self.rejected.push((candidate, other));
                None
            }
        }
    }
}

/// The major version `program --version` reports (None: it does not run or says no version).
///
/// An exec can fail with "text file busy" while another thread of this process forks with a
/// file being written still open (an installer, or a test writing a script): that is retried
/// a few times rather than taken for "not a PostgreSQL program".
pub fn program_major(program: &Path) -> Option<u32> {
    let mut tries = 0;
    let out = loop {
        match Command::new(program).arg("--version").output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            r => break r.ok()?,
        }
    };
    if !out.status.success() {
        return None;
    }
    parse_version_major(&String::from_utf8_lossy(&out.stdout))
}

/// Parses the major version out of `pg_dump (PostgreSQL) 15.4 (Debian 15.4-1)`-style output:
/// `15`; `9.6.24` gives `9`; pre-releases such as `17beta1` or `16devel` give `17` and `16`.
pub fn parse_version_major(version_output: &str) -> Option<u32> {
    let line = version_output.lines().next()?;
    // The version is the first word after the "(PostgreSQL)" marker, or failing that the first
    // word that starts with a digit.
    let after_marker = line
        .find(')')
        .map(|i| &line[i + 1..])
        .unwrap_or(line)
        .trim_start();
    let word = after_marker
        .split_whitespace()
        .next()
        .filter(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .or_else(|| {
            line.split_whitespace()
                .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        })?;
    let digits: String = word.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// `<root>/<N>/bin` folders, highest `N` first.
fn debian_bindirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut versions: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Older layouts use "9.6"; sort those by their first component.
            let major: u32 = name.split('.').next()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions.into_iter().map(|(_, p)| p).collect()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_version_major("pg_dump (PostgreSQL) 15.4 (Debian 15.4-1.pgdg120+1)\n"),
            Some(15)
        );
        assert_eq!(
            parse_version_major("pg_restore (PostgreSQL) 16.0"),
            Some(16)
        );
        assert_eq!(parse_version_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(
            parse_version_major("pg_dump (PostgreSQL) 17beta1"),
            Some(17)
        );
        assert_eq!(parse_version_major("psql (PostgreSQL) 16devel"), Some(16));
        assert_eq!(parse_version_major("pg_dump 14.2"), Some(14));
        assert_eq!(parse_version_major("pg_dump (PostgreSQL)"), None);
        assert_eq!(parse_version_major(""), None);
    }

    #[test]
    fn debian_dirs_sort_highest_first() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9.6", "13", "15", "not-a-version"] {
            std::fs::create_dir_all(root.path().join(v).join("bin")).unwrap();
        }
        let dirs = debian_bindirs(root.path());
        let names: Vec<String> = dirs
            .iter()
            .map(|d| {
                d.parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, ["15", "13", "9.6"]);
    }

    #[test]
    fn missing_program_error_names_program_places_and_hint() {
        let err = find("tidemark-no-such-program", Some(15)).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tidemark-no-such-program (version 15 or newer) not found"));
        assert!(msg.contains("PATH"));
        assert!(msg.contains("pg_config --bindir"));
        assert!(msg.contains("postgresql-client-15"));
        assert!(msg.contains(ENV_PG_BIN));
    }

    /// An executable script at `path` that reports `version` like a PostgreSQL program.
    fn fake_program(path: &Path, version: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!("#!/bin/sh\necho \"pg_restore (PostgreSQL) {version}\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A Debian-like layout: `usr/bin/pg_restore` → `share/postgresql-common/pg_wrapper`
    /// (reporting `wrapper_version`), and `lib/postgresql/<v>/bin/pg_restore` for each of
    /// `versions`; plus a non-wrapper `local/bin/pg_restore` when `local` is given.
    struct Layout {
        root: tempfile::TempDir,
    }

    impl Layout {
        fn new(wrapper_version: &str, versions: &[&str], local: Option<&str>) -> Layout {
            let root = tempfile::tempdir().unwrap();
            let r = root.path();
            let wrapper = r.join("share/postgresql-common/pg_wrapper");
            fake_program(&wrapper, wrapper_version);
            std::fs::create_dir_all(r.join("usr/bin")).unwrap();
            std::os::unix::fs::symlink(&wrapper, r.join("usr/bin/pg_restore")).unwrap();
            for v in versions {
                fake_program(&r.join(format!("lib/postgresql/{v}/bin/pg_restore")), v);
            }
            if let Some(v) = local {
                fake_program(&r.join("local/bin/pg_restore"), v);
            }
            Layout { root }
        }

        fn find(&self, path: &[&str], min: Option<u32>) -> Result<PathBuf, PgBinError> {
            let r = self.root.path();
            let path_dirs: Vec<PathBuf> = path.iter().map(|d| r.join(d)).collect();
            find_in(
                "pg_restore",
                min,
                &Places {
                    env_dir: None,
                    path_dirs: &path_dirs,
                    pg_config_bindir: &|| None,
                    debian_root: &r.join("lib/postgresql"),
                },
            )
        }

        fn rel(&self, p: PathBuf) -> String {
            p.strip_prefix(self.root.path())
                .unwrap()
                .display()
                .to_string()
        }
    }

    #[test]
    fn debian_pg_wrapper_on_path_is_passed_over_for_the_folders_it_dispatches_to() {
        let l = Layout::new("16.2", &["15", "16"], None);
        let found = l.find(&["usr/bin"], Some(15)).unwrap();
        assert_eq!(l.rel(found), "lib/postgresql/16/bin/pg_restore");
        // Too old everywhere: the error names the versioned binary and the wrapper it skipped.
        let err = l.find(&["usr/bin"], Some(17)).unwrap_err().to_string();
        assert!(
            err.contains("lib/postgresql/16/bin/pg_restore is version 16"),
            "{err}"
        );
        assert!(err.contains("usr/bin/pg_restore is version 16"), "{err}");
    }

    #[test]
    fn pg_wrapper_is_the_last_resort_and_other_path_entries_keep_their_priority() {
        // Nothing in the versioned folders: the wrapper is used.
        let l = Layout::new("15.4", &[], None);
        assert_eq!(
            l.rel(l.find(&["usr/bin"], Some(15)).unwrap()),
            "usr/bin/pg_restore"
        );
        // A real program earlier or later on PATH wins over the wrapper and the Debian folders.
        let l = Layout::new("16.2", &["16"], Some("15.1"));
        assert_eq!(
            l.rel(l.find(&["usr/bin", "local/bin"], Some(15)).unwrap()),
            "local/bin/pg_restore"
        );
    }

    #[test]
    fn finds_installed_pg_dump_when_present() {
        // Skipped silently where no PostgreSQL client is installed.
        if let Ok(p) = find("pg_dump", None) {
            assert!(program_major(&p).is_some());
            assert!(find("pg_dump", Some(1000)).is_err());
        }
    }
}
