//! Least privilege and secrets (issue 15, points 5 and 6): archive, backup, prune and restore
//! run as the roles and under the IAM policies `setup --print-grants` prints, with nothing
//! more; and a full run with a SCRAM password, an S3 secret key and an encryption keyring (a
//! key added and a rekey on the way) leaves none of them in any output, log, metric, stored
//! object (encrypted or decrypted), error or process argument list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::archiving::{
    server_now, tidemark_env, wait_archived, wait_heartbeats, Archiver,
};
use tidemark::crypt::envelope;

use crate::support::s3::{S3Server, SECRET_KEY};
use crate::support::{self, Cluster, ClusterOptions};

const ARCHIVER: &str = "tidemark_archiver";
const RESTORER: &str = "tidemark_restore";

/// A schema across two schemas, with a sequence no column owns, an unlogged table (pg_dump
/// locks it: SELECT), and a trigger whose inserts replay must not repeat
/// (session_replication_role).
const SCHEMA: &str = "
    CREATE SCHEMA shop;
    CREATE TABLE public.items (id int PRIMARY KEY, label text);
    CREATE TABLE shop.orders (id bigserial PRIMARY KEY, item int NOT NULL REFERENCES public.items, qty int NOT NULL);
    CREATE TABLE shop.audit (id bigserial PRIMARY KEY, order_id bigint NOT NULL);
    CREATE FUNCTION shop.log_order() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN INSERT INTO shop.audit (order_id) VALUES (NEW.id); RETURN NEW; END $$;
    CREATE TRIGGER log_order AFTER INSERT ON shop.orders FOR EACH ROW EXECUTE FUNCTION shop.log_order();
    CREATE SEQUENCE shop.invoice_no;
    CREATE UNLOGGED TABLE public.scratch (x int);
    INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
    INSERT INTO shop.orders (item, qty) SELECT 1 + g % 50, g FROM generate_series(1, 200) g;
    SELECT nextval('shop.invoice_no') FROM generate_series(1, 5);
";

fn conn(cluster: &Cluster, user: &str, db: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname={db}",
        cluster.port
    )
}

async fn invoice_no(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT last_value FROM shop.invoice_no", &[])
        .await
        .unwrap()
        .get(0)
}

/// The id in `backup`'s "base backup ID at …" line.
fn backup_id(out: &str) -> String {
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no backup id in {out:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_backup_prune_and_restore_run_with_only_the_printed_grants() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.create_database("app");
    cluster.psql("app", SCHEMA);
    let source = cluster.client("app").await;

    // The script, printed from the source (as its superuser), run by the superuser as it is.
    let (code, sql, err) = tidemark_env(
        &[],
        &[
            "setup",
            "--print-grants",
            "--source",
            &cluster.conninfo("app"),
            "--restore-database",
            "restored",
        ],
    );
    assert_eq!(code, 0, "print-grants: {sql}{err}");
    for named in [
        "public.items",
        "shop.orders",
        "shop.invoice_no",
        "public.scratch",
    ] {
        assert!(sql.contains(named), "{named} not granted:\n{sql}");
    }
    cluster.psql("app", &sql);
    let roles = cluster.psql(
        "postgres",
        &format!(
            "SELECT rolname, rolsuper, rolreplication, rolcreatedb, rolcreaterole, rolbypassrls
               FROM pg_roles WHERE rolname IN ('{ARCHIVER}', '{RESTORER}') ORDER BY 1"
        ),
    );
    assert_eq!(
        roles,
        format!("{ARCHIVER}|f|t|f|f|f\n{RESTORER}|f|f|f|f|f"),
        "the roles have exactly LOGIN (and REPLICATION for the archiver)"
    );

    // The IAM policies of the repository's prefix, each enforced by the S3 server in turn.
    let server = S3Server::with_bucket("lpriv");
    let repo = "s3://lpriv/pg/main";
    let (code, json, err) = tidemark_env(&[], &["setup", "--print-grants", "s3", "--repo", repo]);
    assert_eq!(code, 0, "print-grants s3: {json}{err}");
    let policies: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut env = server.cli_env(&server.endpoint);
    env.push(("TIDEMARK_LOG", "info".to_string()));

    server.set_iam(Some(&policies["archiver"]));
    let mut archiver = Archiver::start_source(&conn(&cluster, ARCHIVER, "app"), repo, &[], &env);
    archiver.wait_streaming(&source, "tidemark").await;
    // Schema changes (captured by the event triggers the script installed) and a table created
    // after the grants: the next base backup reads it through the default privileges.
    source
        .batch_execute(
            "ALTER TABLE items ADD COLUMN note text;
             UPDATE items SET note = 'n' || id WHERE id % 4 = 0;
             CREATE TABLE shop.later (id int PRIMARY KEY, v text);
             INSERT INTO shop.later SELECT g, 'later ' || g FROM generate_series(1, 30) g;
             INSERT INTO shop.orders (item, qty) SELECT 1 + g % 50, -g FROM generate_series(1, 40) g;
             DELETE FROM shop.orders WHERE id % 7 = 0;
             SELECT nextval('shop.invoice_no');",
        )
        .await
        .unwrap();
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "backup",
            "--source",
            &conn(&cluster, ARCHIVER, "app"),
            "--repo",
            repo,
        ],
    );
    assert_eq!(code, 0, "backup as {ARCHIVER}: {out}{err}");
    let backup = backup_id(&out);
    source
        .batch_execute(
            "UPDATE shop.later SET v = v || ' updated' WHERE id % 3 = 0;
             INSERT INTO shop.orders (item, qty) VALUES (3, 1000);
             SELECT nextval('shop.invoice_no') FROM generate_series(1, 3);",
        )
        .await
        .unwrap();
    // The heartbeat carries the sequence's new value (read only with SELECT on it).
    let now = server_now(&source).await;
    wait_heartbeats(&source, &now, 2, &archiver.log).await;
    let expected = support::snapshot_content(&source).await;
    let expected_invoice = invoice_no(&source).await;
    wait_archived(&source, "tidemark", &archiver.log).await;
    let log = archiver.log_text();
    archiver.stop();
    for missing in [
        "permission denied",
        "NOT installed",
        "not protected",
        "cannot ",
    ] {
        assert!(
            !log.contains(missing),
            "archiver log has {missing:?}:\n{log}"
        );
    }
    assert_eq!(server.take_iam_denied(), Vec::<String>::new(), "archiver");

    server.set_iam(Some(&policies["prune"]));
    for args in [
        vec!["pin", "--repo", repo, &backup],
        vec!["unpin", "--repo", repo, &backup],
        vec!["prune", "--repo", repo],
    ] {
        let (code, out, err) = tidemark_env(&env, &args);
        assert_eq!(code, 0, "{args:?} under the prune policy: {out}{err}");
    }
    assert_eq!(server.take_iam_denied(), Vec::<String>::new(), "prune");

    server.set_iam(Some(&policies["restore"]));
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", repo, "--json"]);
    assert_eq!(code, 0, "list under the restore policy: {out}{err}");
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "restore",
            "--repo",
            repo,
            "--target",
            &conn(&cluster, RESTORER, "restored"),
            "--latest",
        ],
    );
    assert_eq!(code, 0, "restore as {RESTORER}: {out}{err}");
    assert_eq!(server.take_iam_denied(), Vec::<String>::new(), "restore");
    let restored = cluster.client("restored").await;
    let actual = support::snapshot_content(&restored).await;
    support::assert_same_content(&expected, &actual, "restore as the restore role");
    assert_eq!(
        invoice_no(&restored).await,
        expected_invoice,
        "shop.invoice_no"
    );

    // The policies are what the commands need, not more: the restore policy cannot write.
    let (code, out, err) = tidemark_env(&env, &["pin", "--repo", repo, &backup]);
    assert_ne!(code, 0, "pin under the restore policy: {out}{err}");
    assert!(!server.take_iam_denied().is_empty());
}

/// Samples `/proc` while it runs: the argument list of every registered tidemark process and
/// of its descendants (`pg_dump`, `pg_restore`), by pid.
struct ProcSampler {
    roots: Arc<Mutex<BTreeSet<u32>>>,
    seen: Arc<Mutex<BTreeMap<u32, String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProcSampler {
    fn start() -> ProcSampler {
        let roots = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (roots.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                sample(&r.lock().unwrap().clone(), &s);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        ProcSampler {
            roots,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn watch(&self, pid: u32) {
        self.roots.lock().unwrap().insert(pid);
    }

    /// Runs `tidemark` with `env`, its process and its children sampled.
    fn tidemark(&self, env: &[(&'static str, String)], args: &[&str]) -> (i32, String, String) {
        let child = Command::new(support::tidemark_bin())
            .args(args)
            .env("TIDEMARK_LOG", "debug")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tidemark");
        self.watch(child.id());
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn finish(mut self) -> BTreeMap<u32, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// One pass over `/proc`: the descendants of `roots` (and the roots), their argument lists.
fn sample(roots: &BTreeSet<u32>, seen: &Mutex<BTreeMap<u32, String>>) {
    let mut parent = BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    for (&pid, _) in parent.iter() {
        let mut p = pid;
        let mut watched = roots.contains(&p);
        for _ in 0..16 {
            if watched {
                break;
            }
            match parent.get(&p) {
                Some(&pp) if pp > 1 => {
                    p = pp;
                    watched = roots.contains(&p);
                }
                _ => break,
            }
        }
        if watched {
            if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if !raw.is_empty() {
                    let args = String::from_utf8_lossy(&raw).replace('\0', " ");
                    seen.lock().unwrap().entry(pid).or_insert(args);
                }
            }
        }
    }
}

/// `pg_dump` and `pg_restore` that wait a moment before running the real programs, so that
/// the sampler sees their arguments (the wrapper's own argument list holds them all).
fn slow_pg_bin(dir: &Path) -> std::path::PathBuf {
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
                "#!/bin/sh\nsleep 0.2\nexec '{}' \"$@\"\n",
                real_dir.join(program).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_outputs_logs_metrics_objects_errors_or_process_arguments() {
    const PASSWORD: &str = "pw-Scram-5092-secret";
    let cluster = Cluster::start(ClusterOptions {
        hba: vec!["host all archivist 127.0.0.1/32 scram-sha-256".into()],
        ..ClusterOptions::default()
    });
    cluster.psql(
        "postgres",
        &format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE archivist LOGIN SUPERUSER REPLICATION PASSWORD '{PASSWORD}';
             CREATE DATABASE app; CREATE DATABASE restored;"
        ),
    );
    cluster.psql("app", SCHEMA);
    let source = cluster.client("app").await;
    let files = tempfile::tempdir().unwrap();
    // The archiver reads the password from a password file, the other commands from
    // PGPASSWORD: both ways libpq offers.
    let passfile = files.path().join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{}:*:archivist:{PASSWORD}\n", cluster.port),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let server = S3Server::with_bucket("secrets");
    let repo = "s3://secrets/pg";
    let keyring = files.path().join("keyring.json");
    let mut env = server.cli_env(&server.endpoint);
    env.push((
        "TIDEMARK_ENCRYPTION_KEY_FILE",
        keyring.display().to_string(),
    ));
    env.push((
        "TIDEMARK_PG_BIN",
        slow_pg_bin(files.path()).display().to_string(),
    ));
    let with_password = {
        let mut e = env.clone();
        e.push(("PGPASSWORD", PASSWORD.to_string()));
        e
    };
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let app = conn(&cluster, "archivist", "app");
    let sampler = ProcSampler::start();
    let mut texts: Vec<(String, String)> = Vec::new();
    let keyring_arg = keyring.display().to_string();
    let (code, out, err) = sampler.tidemark(&[], &["keys", "generate", "--out", &keyring_arg]);
    assert_eq!(code, 0, "keys generate: {out}{err}");
    texts.push(("keys generate output".into(), format!("{out}{err}")));

    let mut archiver_env = env.clone();
    archiver_env.push(("PGPASSFILE", passfile.display().to_string()));
    archiver_env.push(("TIDEMARK_LOG", "debug".to_string()));
    let mut archiver = Archiver::start_source(
        &app,
        repo,
        &["--metrics-address", &metrics_addr],
        &archiver_env,
    );
    sampler.watch(archiver.pid());
    archiver.wait_streaming(&source, "tidemark").await;
    source
        .batch_execute(
            "INSERT INTO shop.orders (item, qty) SELECT 1 + g % 50, g FROM generate_series(1, 100) g;
             UPDATE items SET label = label || ' changed' WHERE id % 5 = 0;",
        )
        .await
        .unwrap();
    let (code, out, err) = sampler.tidemark(
        &with_password,
        &["backup", "--source", &app, "--repo", repo],
    );
    assert_eq!(code, 0, "backup: {out}{err}");
    texts.push(("backup output".into(), format!("{out}{err}")));
    // A rotation beside the archiver: it takes the new key from its next segment.
    for args in [
        ["keys", "add", "--keyring", keyring_arg.as_str()],
        ["keys", "list", "--keyring", keyring_arg.as_str()],
    ] {
        let (code, out, err) = sampler.tidemark(&[], &args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        texts.push((args[..2].join(" ") + " output", format!("{out}{err}")));
    }
    source
        .batch_execute("DELETE FROM shop.orders WHERE id % 9 = 0")
        .await
        .unwrap();
    let expected = support::snapshot_content(&source).await;
    wait_archived(&source, "tidemark", &archiver.log).await;
    let scrape = support::metrics::scrape(&metrics_addr);
    assert!(scrape.contains("tidemark_"), "no metrics: {scrape}");
    texts.push(("/metrics".into(), scrape));
    texts.push(("archiver log".into(), archiver.log_text()));
    archiver.stop();

    let (code, out, err) = sampler.tidemark(&env, &["list", "--repo", repo, "--json"]);
    assert_eq!(code, 0, "list --json: {out}{err}");
    texts.push(("list --json".into(), format!("{out}{err}")));
    let target = conn(&cluster, "archivist", "restored");
    let (code, out, err) = sampler.tidemark(
        &with_password,
        &["restore", "--repo", repo, "--target", &target, "--latest"],
    );
    assert_eq!(code, 0, "restore: {out}{err}");
    texts.push(("restore output".into(), format!("{out}{err}")));
    let restored = cluster.client("restored").await;
    let actual = support::snapshot_content(&restored).await;
    support::assert_same_content(&expected, &actual, "restore with a SCRAM password");
    for args in [
        vec!["rekey", "--repo", repo, "--json"],
        vec!["audit", "--repo", repo, "--json"],
    ] {
        let (code, out, err) = sampler.tidemark(&env, &args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        texts.push((format!("{} output", args[0]), format!("{out}{err}")));
    }

    // Failing commands: a target that is not empty, a bucket that does not exist, a wrong
    // password, and a password given (against advice) in the connection string itself.
    let wrong_password = {
        let mut e = env.clone();
        e.push(("PGPASSWORD", format!("{PASSWORD}-wrong")));
        e
    };
    let inline = format!("{target} password={PASSWORD}");
    // A keyring of other keys: its secrets must not show either.
    let stranger = files.path().join("stranger.json");
    tidemark::crypt::Keyring::generate()
        .create(&stranger)
        .unwrap();
    let stranger_env = {
        let mut e = env.clone();
        e.retain(|(k, _)| *k != "TIDEMARK_ENCRYPTION_KEY_FILE");
        e.push((
            "TIDEMARK_ENCRYPTION_KEY_FILE",
            stranger.display().to_string(),
        ));
        e
    };
    for (what, env, args) in [
        (
            "list with a keyring of other keys",
            &stranger_env,
            vec!["list", "--repo", repo],
        ),
        (
            "rekey with a keyring of other keys",
            &stranger_env,
            vec!["rekey", "--repo", repo],
        ),
        (
            "restore into a database that is not empty",
            &with_password,
            vec!["restore", "--repo", repo, "--target", &target, "--latest"],
        ),
        (
            "list of a missing bucket",
            &env,
            vec!["list", "--repo", "s3://no-such-bucket/pg", "--json"],
        ),
        (
            "backup with a wrong password",
            &wrong_password,
            vec!["backup", "--source", &app, "--repo", repo],
        ),
    ] {
        let (code, out, err) = sampler.tidemark(env, &args);
        assert_ne!(code, 0, "{what} should fail: {out}{err}");
        texts.push((what.into(), format!("{out}{err}")));
    }
    // Not sampled: its own argument list holds the password, by the caller's choice.
    let (code, out, err) = tidemark_env(
        &env,
        &["restore", "--repo", repo, "--target", &inline, "--latest"],
    );
    assert_ne!(code, 0, "a restore into a non-empty target should fail");
    texts.push((
        "error with a password in --target".into(),
        format!("{out}{err}"),
    ));
    let processes = sampler.finish();

    // Every stored object as stored and, when it is an envelope, decrypted.
    // (The failed rekey with the other keyring recorded itself under that keyring's key.)
    let keys = tidemark::crypt::Keyring::load(&keyring).unwrap();
    assert_eq!(keys.keys().len(), 2, "keys add added a key");
    let stranger_keys = tidemark::crypt::Keyring::load(&stranger).unwrap();
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    for (key, bytes) in server.objects("secrets") {
        let name = key.strip_prefix("pg/").unwrap_or(&key).to_string();
        if tidemark::rekey::is_encrypted_object(&name) {
            let secret_of = |id: &tidemark::crypt::KeyId| {
                keys.get(id)
                    .or_else(|| stranger_keys.get(id))
                    .map(|k| &k.secret)
            };
            let plain =
                envelope::open(secret_of, &name, &bytes).unwrap_or_else(|e| panic!("{key}: {e}"));
            blobs.push((format!("object {key}, decrypted"), plain));
        }
        blobs.push((format!("object {key}"), bytes));
    }
    for (pid, args) in &processes {
        texts.push((format!("arguments of pid {pid}: {args}"), args.clone()));
    }
    blobs.extend(texts.into_iter().map(|(w, t)| (w, t.into_bytes())));
    // Key material in every encoding it could leak in: raw, hex (both cases), base64 (both
    // alphabets, padded or not), and the keyring files' text.
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("the password".into(), PASSWORD.into()),
        ("the S3 secret".into(), SECRET_KEY.into()),
    ];
    for k in keys.keys().iter().chain(stranger_keys.keys()) {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let raw = k.secret.expose();
        let id = k.id;
        secrets.push((format!("key {id}, raw"), raw.to_vec()));
        secrets.push((format!("key {id}, hex"), hex::encode(raw).into_bytes()));
        secrets.push((
            format!("key {id}, HEX"),
            hex::encode_upper(raw).into_bytes(),
        ));
        for (name, engine) in [
            ("base64", &STANDARD),
            ("base64 unpadded", &STANDARD_NO_PAD),
            ("base64url", &URL_SAFE_NO_PAD),
        ] {
            secrets.push((format!("key {id}, {name}"), engine.encode(raw).into_bytes()));
        }
    }
    for file in [&keyring, &stranger] {
        secrets.push((
            format!("the text of {}", file.display()),
            std::fs::read(file).unwrap(),
        ));
    }
    for (what, blob) in &blobs {
        for (secret, needle) in &secrets {
            assert!(
                !blob.windows(needle.len()).any(|w| w == &needle[..]),
                "{secret} in the {what}:\n{}",
                String::from_utf8_lossy(blob)
            );
        }
    }
    // The sampler saw the children connect, so their argument lists were checked.
    for program in ["pg_dump ", "pg_restore "] {
        assert!(
            processes
                .values()
                .any(|a| a.contains(program) && a.contains("dbname=")),
            "no {program}seen: {processes:#?}"
        );
    }
}
