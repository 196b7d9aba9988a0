//! What every command shares, run as an operator runs it: boolean environment variables take
//! `1`/`0`, a closed standard output ends the command quietly, read-only commands' `--help`
//! leaves out the S3 write options, shell completions, and `demo --source` leaving nothing on
//! the server it was given.

use std::process::{Command, Stdio};

use crate::spine::{tidemark, tidemark_env};
use crate::support::{self, Cluster, ClusterOptions};

#[test]
fn boolean_environment_variables_take_one_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("nothing-here");
    let repo = repo.to_str().unwrap();
    // `list` of a folder with no archive yet: with --json (TIDEMARK_JSON) one JSON object,
    // without it text.
    for (value, json) in [
        ("1", true),
        ("yes", true),
        ("true", true),
        ("0", false),
        ("no", false),
    ] {
        let (code, out, err) = tidemark_env(
            &[("TIDEMARK_JSON", value.into())],
            &["list", "--repo", repo],
        );
        assert_eq!(code, 0, "TIDEMARK_JSON={value}: {err}");
        let parsed = serde_json::from_str::<serde_json::Value>(out.trim());
        assert_eq!(parsed.is_ok(), json, "TIDEMARK_JSON={value}: {out}");
        if !json {
            assert!(
                out.contains("no archive yet"),
                "TIDEMARK_JSON={value}: {out}"
            );
        }
    }
    let (code, _, err) = tidemark_env(
        &[("TIDEMARK_JSON", "maybe".into())],
        &["list", "--repo", repo],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("maybe") && err.contains("--json"), "{err}");
}

/// Runs `tidemark args…` with a standard output whose reader is gone: exit code and stderr.
fn with_closed_stdout(args: &[&str]) -> (i32, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(support::tidemark_bin())
        .args(args)
        .env("TIDEMARK_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // `| head -0`: what was printed after the reader left is nobody's loss, and no panic
    // (exit 101) is reported.
    for args in [
        &["setup", "--print-grants"][..],
        &["completions", "bash"][..],
        &["--help"][..],
    ] {
        let (code, err) = with_closed_stdout(args);
        assert_eq!(code, 0, "tidemark {}: {err}", args.join(" "));
        assert!(err.is_empty(), "tidemark {}: {err}", args.join(" "));
    }
}

#[test]
fn read_only_commands_show_no_s3_write_options() {
    for read_only in [&["list"][..], &["restore"], &["audit"], &["keys", "retire"]] {
        let h = crate::deploy::help(read_only);
        for write in ["--s3-sse", "--s3-sse-kms-key-id", "--s3-storage-class"] {
            assert!(
                !h.flags.contains(&write[2..]),
                "{read_only:?} --help shows {write}"
            );
        }
        assert!(
            h.flags.contains("s3-endpoint"),
            "{read_only:?} --help: {}",
            h.text
        );
    }
    for writer in [&["archive"][..], &["backup"], &["prune"], &["pin"]] {
        let h = crate::deploy::help(writer);
        for write in ["s3-sse", "s3-sse-kms-key-id", "s3-storage-class"] {
            assert!(h.flags.contains(write), "{writer:?} --help lacks --{write}");
        }
    }
    // Still accepted (an environment or a script shared with the archiver keeps working).
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = tidemark(&[
        "list",
        "--repo",
        dir.path().to_str().unwrap(),
        "--s3-sse",
        "none",
    ]);
    assert_ne!(code, 2, "{err}");
    assert!(!err.contains("unexpected argument"), "{err}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, check) in [
        ("bash", &["-n"][..]),
        ("zsh", &["-n"][..]),
        ("fish", &["--no-execute"][..]),
    ] {
        let (code, script, err) = tidemark(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for word in [
            "archive",
            "restore",
            "repo",
            "to-time",
            "base-backup-schedule",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        if let Ok(status) = Command::new(shell)
            .args(check)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
        {
            assert!(
                status.status.success(),
                "{shell} {check:?} rejects the script: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        } else {
            eprintln!("{shell} is not installed: its script's syntax is not checked");
        }
    }
    let (code, _, err) = tidemark(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
}

/// What a demo may leave on a server: slots and databases named `tidemark_demo…`.
async fn demo_leftovers(cluster: &Cluster) -> (Vec<String>, Vec<String>) {
    let c = cluster.client("postgres").await;
    let names = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
    (
        names(
            c.query(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'tidemark_demo%'",
                &[],
            )
            .await
            .unwrap(),
        ),
        names(
            c.query(
                "SELECT datname::text FROM pg_database WHERE datname LIKE 'tidemark_demo%'",
                &[],
            )
            .await
            .unwrap(),
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_a_given_server_leaves_no_slot_and_no_database() {
    let cluster = Cluster::start(ClusterOptions::default());
    let admin = cluster.conninfo("postgres");
    let (code, out, err) = tidemark(&["demo", "--source", &admin, "--duration", "2s"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("OK: the restored database equals the source"),
        "{out}"
    );
    assert!(out.contains("dropped the demo's slot"), "{out}");
    assert_eq!(demo_leftovers(&cluster).await, (vec![], vec![]), "{out}");

    // A demo that fails (its repository is a file, not a folder) cleans up all the same.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let (code, out, err) = tidemark(&[
        "demo",
        "--source",
        &admin,
        "--duration",
        "2s",
        "--repo",
        file.to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(
        demo_leftovers(&cluster).await,
        (vec![], vec![]),
        "{out}{err}"
    );
}
