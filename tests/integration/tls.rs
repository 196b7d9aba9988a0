//! TLS to PostgreSQL and to S3 against real servers, each with a throwaway CA: what passes,
//! and that each failure names what failed; secrets stay out of child processes' arguments.

use std::path::Path;

use tidemark::conninfo::ConnInfo;
use tidemark::replication::ReplicationClient;
use tidemark::store::{S3Store, Store};

use crate::spine::{tidemark_env, wait_archived};
use crate::support::archiving::Archiver;
use crate::support::s3::S3Server;
use crate::support::tls::{server_conf, TestCa, TlsFront};
use crate::support::{self, Cluster, ClusterOptions};

/// A cluster with TLS on (a certificate for `localhost` from `ca`) that refuses plaintext TCP.
fn tls_cluster(ca: &TestCa, files: &Path, extra_hba: &[&str]) -> Cluster {
    let mut hba: Vec<String> = extra_hba.iter().map(|s| s.to_string()).collect();
    hba.push("hostnossl all all 127.0.0.1/32 reject".into());
    Cluster::start(ClusterOptions {
        extra_conf: server_conf(ca, &["localhost"], files),
        hba,
        ..ClusterOptions::default()
    })
}

/// Connects both ways (tokio-postgres and the replication client); the error text of each.
async fn try_both(s: &str) -> (Result<(), String>, Result<(), String>) {
    let info = match ConnInfo::parse(s) {
        Ok(i) => i,
        Err(e) => return (Err(e.to_string()), Err(e.to_string())),
    };
    let ordinary = match info.connect().await {
        Ok(c) => c
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let replication = match ReplicationClient::connect(&info).await {
        Ok(mut c) => c
            .identify_system()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    (ordinary, replication)
}

fn assert_both_fail(r: (Result<(), String>, Result<(), String>), words: &[&str], what: &str) {
    for (kind, res) in [("ordinary", r.0), ("replication", r.1)] {
        let err = res.expect_err(&format!("{what}: {kind} connection should fail"));
        for w in words {
            assert!(err.contains(w), "{what}: {kind}: {w:?} not in: {err}");
        }
    }
}

fn assert_both_pass(r: (Result<(), String>, Result<(), String>), what: &str) {
    r.0.unwrap_or_else(|e| panic!("{what}: ordinary connection: {e}"));
    r.1.unwrap_or_else(|e| panic!("{what}: replication connection: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_passes_and_each_tls_failure_names_what_failed() {
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tidemark test CA");
    let other = TestCa::new("some other CA");
    let cluster = tls_cluster(&ca, files.path(), &[]);
    let ca_file = ca.write(files.path(), "ca.crt");
    let other_file = other.write(files.path(), "other.crt");
    let base = |host: &str| {
        format!(
            "host={host} port={} user={} dbname=postgres",
            cluster.port,
            support::SUPERUSER
        )
    };
    let ca_arg = format!("sslrootcert={}", ca_file.display());

    assert_both_pass(
        try_both(&format!(
            "{} sslmode=verify-full {ca_arg}",
            base("localhost")
        ))
        .await,
        "verify-full with the right host name",
    );
    // The certificate names localhost, not 127.0.0.1: verify-full says so; verify-ca does not check names.
    assert_both_fail(
        try_both(&format!(
            "{} sslmode=verify-full {ca_arg}",
            base("127.0.0.1")
        ))
        .await,
        &["host name mismatch", "127.0.0.1", "localhost"],
        "verify-full with another host name",
    );
    assert_both_pass(
        try_both(&format!("{} sslmode=verify-ca {ca_arg}", base("127.0.0.1"))).await,
        "verify-ca",
    );
    // require with a root certificate checks the chain, as libpq.
    assert_both_fail(
        try_both(&format!(
            "{} sslmode=require sslrootcert={}",
            base("localhost"),
            other_file.display()
        ))
        .await,
        &["unknown CA", "other.crt"],
        "a certificate from a CA not trusted",
    );
    let missing = files.path().join("nowhere.crt");
    assert_both_fail(
        try_both(&format!(
            "{} sslmode=verify-full sslrootcert={}",
            base("localhost"),
            missing.display()
        ))
        .await,
        &["nowhere.crt", "does not exist"],
        "a missing CA file",
    );
    // pg_hba.conf refuses plaintext: sslmode=disable fails with the server's reason.
    assert_both_fail(
        try_both(&format!("{} sslmode=disable", base("127.0.0.1"))).await,
        &["no encryption"],
        "sslmode=disable against hostssl only",
    );
    // prefer (the default) and allow end up on TLS.
    assert_both_pass(try_both(&base("127.0.0.1")).await, "sslmode=prefer");
    assert_both_pass(
        try_both(&format!("{} sslmode=allow", base("127.0.0.1"))).await,
        "sslmode=allow",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_against_a_server_without_tls_fails_clearly() {
    let cluster = Cluster::start(ClusterOptions::default());
    let s = format!("{} sslmode=require", cluster.conninfo("postgres"));
    assert_both_fail(
        try_both(&s).await,
        &["does not support TLS", "sslmode=require"],
        "require without TLS on the server",
    );
    assert_both_pass(
        try_both(&cluster.conninfo("postgres")).await,
        "prefer, plaintext",
    );
}

/// PostgreSQL client programs that record their arguments, then run the real ones.
fn recording_pg_bin(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let real = tidemark::pgbin::find("pg_dump", None).unwrap();
    let real_dir = real.parent().unwrap();
    for program in ["pg_dump", "pg_restore"] {
        let script = bin.join(program);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"{program} $*\" >> '{}'\nexec '{}' \"$@\"\n",
                dir.join("argv.log").display(),
                real_dir.join(program).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_backup_and_restore_over_verify_full_with_a_scram_password() {
    const PASSWORD: &str = "pw-Secret-7361";
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new("tidemark test CA");
    let cluster = tls_cluster(
        &ca,
        files.path(),
        &["hostssl all archivist 127.0.0.1/32 scram-sha-256"],
    );
    let ca_file = ca.write(files.path(), "ca.crt");
    cluster.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE archivist LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}';
             CREATE DATABASE app; CREATE DATABASE restored;"
        ),
    );
    cluster.psql(
        "app",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'before ' || g FROM generate_series(1, 100) g;",
    );
    let conn = |db: &str| {
        format!(
            "host=localhost port={} user=archivist dbname={db} sslmode=verify-full sslrootcert={}",
            cluster.port,
            ca_file.display()
        )
    };
    let pg_bin = recording_pg_bin(files.path());
    let env = vec![
        ("PGPASSWORD", PASSWORD.to_string()),
        ("TIDEMARK_PG_BIN", pg_bin.display().to_string()),
    ];
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path().to_str().unwrap().to_string();

    let (code, out, err) = tidemark_env(&env, &["setup", "--source", &conn("app")]);
    assert_eq!(code, 0, "setup: {out}{err}");
    let source = ConnInfo::parse(&format!("{} password={PASSWORD}", conn("app")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut archiver = Archiver::start_source(&conn("app"), &repo, &[], &env);
    archiver.wait_streaming(&source, "tidemark").await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", archiver.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(PASSWORD),
        "the archiver's arguments hold the password"
    );
    source
        .batch_execute("INSERT INTO t SELECT g, 'after ' || g FROM generate_series(101, 200) g")
        .await
        .unwrap();
    let (code, out, err) =
        tidemark_env(&env, &["backup", "--source", &conn("app"), "--repo", &repo]);
    assert_eq!(code, 0, "backup: {out}{err}");
    source
        .batch_execute("UPDATE t SET v = v || ' updated' WHERE id % 3 = 0")
        .await
        .unwrap();
    let expected = support::snapshot_content(&source).await;
    wait_archived(&source, "tidemark", &archiver.log).await;
    let log = archiver.log_text();
    archiver.stop();

    let (code, out, err) = tidemark_env(
        &env,
        &[
            "restore",
            "--repo",
            &repo,
            "--target",
            &conn("restored"),
            "--latest",
        ],
    );
    assert_eq!(code, 0, "restore: {out}{err}");
    let restored = ConnInfo::parse(&format!("{} password={PASSWORD}", conn("restored")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let actual = support::snapshot_content(&restored).await;
    support::assert_same_content(&expected, &actual, "restore over verify-full");

    // pg_dump and pg_restore ran over verify-full with the whole connection, and no password
    // in their arguments; nor is it in any output or log.
    let argv = std::fs::read_to_string(files.path().join("argv.log")).unwrap();
    let connecting: Vec<&str> = argv.lines().filter(|l| l.contains("dbname=")).collect();
    for program in ["pg_dump ", "pg_restore "] {
        assert!(
            connecting.iter().any(|l| l.starts_with(program)),
            "no {program}connection: {argv}"
        );
    }
    for line in connecting {
        assert!(line.contains("sslmode=verify-full"), "{line}");
        assert!(line.contains("sslrootcert="), "{line}");
        assert!(line.contains("host='localhost'"), "{line}");
    }
    assert!(
        !argv.contains(PASSWORD),
        "password in a child's arguments: {argv}"
    );
    for (what, text) in [
        ("archiver log", &log),
        ("restore output", &format!("{out}{err}")),
    ] {
        assert!(!text.contains(PASSWORD), "password in the {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_https_with_a_private_ca_bundle() {
    let server = S3Server::with_bucket("tls");
    let ca = TestCa::new("tidemark test CA");
    let front = TlsFront::start(&ca, server.addr);
    let dir = tempfile::tempdir().unwrap();
    let bundle = ca.write(dir.path(), "bundle.pem");
    let mut opts = server.options_via(&front.endpoint());

    opts.ca_bundle = Some(bundle);
    let store = S3Store::connect("s3://tls/x", &opts).await.unwrap();
    store
        .put("a", bytes::Bytes::from_static(b"over tls"))
        .await
        .unwrap();
    assert_eq!(&store.get("a").await.unwrap()[..], b"over tls");
    assert_eq!(server.objects("tls").len(), 1);

    // Another CA's bundle: the endpoint's certificate is not trusted.
    let other = TestCa::new("some other CA");
    opts.ca_bundle = Some(other.write(dir.path(), "other.pem"));
    let untrusted = S3Store::connect("s3://tls/x", &opts).await.unwrap();
    let err = untrusted.get("a").await.unwrap_err();
    assert!(
        !matches!(err, tidemark::store::StoreError::NotFound { .. }),
        "{err}"
    );

    // A bundle that is missing or not PEM is named when the store opens.
    for (file, words) in [
        ("missing.pem", vec!["missing.pem", "does not exist"]),
        ("junk.pem", vec!["junk.pem", "no certificate"]),
    ] {
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
        opts.ca_bundle = Some(dir.path().join(file));
        let err = S3Store::connect("s3://tls/x", &opts)
            .await
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(err.contains(w), "{w:?} not in: {err}");
        }
    }
}

#[test]
fn help_never_shows_a_connection_string_from_the_environment() {
    for cmd in ["archive", "setup", "backup", "restore", "demo"] {
        let out = std::process::Command::new(support::tidemark_bin())
            .args([cmd, "--help"])
            .env("TIDEMARK_SOURCE", "postgresql://u:pw-in-env-4411@h/db")
            .env("TIDEMARK_TARGET", "postgresql://u:pw-in-env-4411@h/db")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("--"), "{cmd} --help: {text}");
        assert!(
            !text.contains("pw-in-env-4411"),
            "{cmd} --help shows the password: {text}"
        );
    }
}
