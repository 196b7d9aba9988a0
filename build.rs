//! Records the git commit the binary is built from, for the `tidemark_build_info` metric:
//! `TIDEMARK_GIT_COMMIT` when the build sets it (a packager, a Docker build without `.git`),
//! else `git rev-parse --short=12 HEAD`, else "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TIDEMARK_GIT_COMMIT");
    let commit = std::env::var("TIDEMARK_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Rebuilt when HEAD moves: HEAD itself, and the branch it points at (not every
            // branch: a commit elsewhere changes nothing here).
            let branch = git(&["symbolic-ref", "-q", "HEAD"]);
            for path in ["HEAD"].into_iter().chain(branch.as_deref()) {
                if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TIDEMARK_GIT_COMMIT={commit}");
}
