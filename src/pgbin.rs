//! Locating PostgreSQL client programs (`pg_dump`, `pg_restore`, `psql`).
//!
//! Owns: the search order and the version check. A program is looked for in
//! `$TIDEMARK_PG_BIN` (a folder), then in `PATH`, then in `pg_config --bindir`, then in the
//! Debian layout `/usr/lib/postgresql/<N>/bin`, highest `N` first. With a minimum major
//! version (the server's: `pg_dump` refuses to dump a server newer than itself), candidates
//! whose `--version` reports an older major are skipped.
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
    let mut looked = Vec::new();
    let mut rejected = Vec::new();
    let mut seen: Vec<PathBuf> = Vec::new();

    let mut try_dir = |dir: &Path,
                       looked_label: Option<String>,
                       looked: &mut Vec<String>,
                       rejected: &mut Vec<(PathBuf, Option<u32>)>|
     -> Option<PathBuf> {
        if let Some(label) = looked_label {
            looked.push(label);
        }
        let candidate = dir.join(program);
        if !is_executable(&candidate) {
            return None;
        }
        let canonical = std::fs::canonicalize(&candidate).unwrap_or_else(|_| candidate.clone());
        if seen.contains(&canonical) {
            return None;
        }
        seen.push(canonical);
        match min_major {
            None => Some(candidate),
            Some(min) => {
                let major = program_major(&candidate);
                match major {
                    Some(m) if m >= min => Some(candidate),
                    other => {
                        rejected.push((candidate, other));
                        None
                    }
                }
            }
        }
    };

    if let Some(dir) = std::env::var_os(ENV_PG_BIN).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let label = format!("${ENV_PG_BIN} ({})", dir.display());
        if let Some(p) = try_dir(&dir, Some(label), &mut looked, &mut rejected) {
            return Ok(p);
        }
    }

    looked.push("PATH".into());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if let Some(p) = try_dir(&dir, None, &mut looked, &mut rejected) {
                return Ok(p);
            }
        }
    }

    looked.push("pg_config --bindir".into());
    if let Some(dir) = pg_config_bindir() {
        if let Some(p) = try_dir(&dir, None, &mut looked, &mut rejected) {
            return Ok(p);
        }
    }

    looked.push(format!("{DEBIAN_ROOT}/<N>/bin"));
    for dir in debian_bindirs(Path::new(DEBIAN_ROOT)) {
        if let Some(p) = try_dir(&dir, None, &mut looked, &mut rejected) {
            return Ok(p);
        }
    }

    Err(PgBinError::NotFound {
        program: program.to_string(),
        min_major,
        looked,
        rejected,
    })
}

/// The major version a program reports with `--version`, if it runs and reports one.
pub fn program_major(program: &Path) -> Option<u32> {
    let out = Command::new(program).arg("--version").output().ok()?;
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

    #[test]
    fn finds_installed_pg_dump_when_present() {
        // Skipped silently where no PostgreSQL client is installed.
        if let Ok(p) = find("pg_dump", None) {
            assert!(program_major(&p).is_some());
            assert!(find("pg_dump", Some(1000)).is_err());
        }
    }
}
