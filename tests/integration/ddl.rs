//! Schema changes and sequences carried by the archive: DDL captured by tidemark's event trigger
//! is replayed at its place in the stream; a column change the archive cannot explain stops the
//! archiver (and a restore past it); sequences are restored not behind the source.

use std::path::Path;
use std::time::Duration;

use std::process::{Child, Command, Stdio};

use crate::spine::{
    server_now, tidemark, wait_archived, wait_heartbeat_received, wait_heartbeats, Archiving,
    Prepared,
};
use crate::support::metrics::{metric, scrape};
use crate::support::{self, wait_base_backup, Cluster, ContentSnapshot};

/// What the source looked like at an instant.
struct Instant {
    time: String,
    content: ContentSnapshot,
    schema: String,
}

async fn note_instant(cluster: &Cluster, client: &tokio_postgres::Client) -> Instant {
    let time = server_now(client).await;
    Instant {
        time,
        content: support::snapshot_content(client).await,
        schema: support::schema_dump(cluster, "app"),
    }
}

fn restore(cluster: &Cluster, repo: &Path, db: &str, to: &[&str]) -> (i32, String, String) {
    crate::spine::restore_into(cluster, repo.to_str().unwrap(), db, to)
}

async fn assert_restores_to(cluster: &Cluster, repo: &Path, db: &str, at: &Instant) {
    let (code, out, err) = restore(cluster, repo, db, &["--to-time", &at.time]);
    assert_eq!(code, 0, "restore to {} failed: {out}{err}", at.time);
    let restored = support::snapshot_content(&cluster.client(db).await).await;
    support::assert_same_content(&at.content, &restored, &format!("restore to {}", at.time));
    support::assert_same_schema(
        &at.schema,
        &support::schema_dump(cluster, db),
        &format!("restore to {}", at.time),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_are_replayed_at_their_place_in_the_stream() {
    let prepared = Archiving::builder()
        .sql(
            "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL, qty int);
             INSERT INTO items (name, qty) SELECT 'item ' || i, i FROM generate_series(1, 20) i;
             CREATE INDEX items_qty ON items (qty);",
        )
        .prepare()
        .await;
    let source = prepared.cluster.conninfo("app");
    let (code, out, err) = tidemark(&["setup", "--source", &source]);
    assert_eq!(code, 0, "setup failed: {out}{err}");
    assert!(out.contains("installed DDL capture"), "{out}");
    let (code, out, _) = tidemark(&["setup", "--source", &source]);
    assert_eq!(code, 0);
    assert!(
        out.contains("DDL capture is installed"),
        "setup is idempotent: {out}"
    );

    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = prepared.archive().await;
    wait_base_backup(&repo).await;
    let mut instants = Vec::new();

    // New schema, enum, domain, table using them; ADD COLUMN with a default; DML around it.
    src.batch_execute(
        "CREATE SCHEMA app;
         CREATE TYPE app.mood AS ENUM ('sad', 'ok');
         CREATE DOMAIN app.posint AS int CHECK (VALUE > 0);
         CREATE TABLE app.people (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                  name text NOT NULL, mood app.mood, age app.posint);",
    )
    .await
    .unwrap();
    src.batch_execute(
        "INSERT INTO app.people (name, mood, age) VALUES ('ann', 'ok', 31), ('bob', 'sad', 42);
         ALTER TABLE items ADD COLUMN note text DEFAULT 'none';
         UPDATE items SET note = 'even' WHERE id % 2 = 0;
         INSERT INTO items (name, qty, note) VALUES ('new', 1, 'after add');",
    )
    .await
    .unwrap();
    instants.push(note_instant(&cluster, &src).await);

    // A multi-statement query mixing DDL and DML (the rows must not be replayed twice), RENAME
    // and ALTER TYPE of columns, an index, a view, an enum value, the search path.
    src.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item int, amount numeric);
         INSERT INTO orders VALUES (1, 1, 9.5), (2, 2, 3);
         ALTER TABLE items RENAME COLUMN qty TO quantity;
         CREATE INDEX items_name ON items (name);
         CREATE VIEW app.big_orders AS SELECT id, item FROM orders WHERE item > 1;
         UPDATE items SET quantity = quantity + 1 WHERE id < 5;",
    )
    .await
    .unwrap();
    src.batch_execute("ALTER TABLE orders ALTER COLUMN amount TYPE numeric(12, 2)")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO orders VALUES (3, 3, 1.239)")
        .await
        .unwrap();
    src.batch_execute("ALTER TYPE app.mood ADD VALUE 'happy'")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO app.people (name, mood) VALUES ('cy', 'happy')")
        .await
        .unwrap();
    src.batch_execute("SET search_path = app, public")
        .await
        .unwrap();
    src.batch_execute("CREATE TABLE tagged (id int PRIMARY KEY, tag mood)")
        .await
        .unwrap();
    src.batch_execute("INSERT INTO tagged VALUES (1, 'ok'); RESET search_path")
        .await
        .unwrap();
    instants.push(note_instant(&cluster, &src).await);

    // DROP COLUMN (indexed by nothing) and DROP of an indexed column's index, DROP VIEW/TABLE,
    // CREATE TABLE AS (its rows are in the stream), CREATE INDEX CONCURRENTLY, temporary
    // tables (not replayed), a COMMENT.
    src.batch_execute(
        "ALTER TABLE items DROP COLUMN note;
         DROP INDEX items_qty;
         DROP VIEW app.big_orders;
         DROP TABLE orders;
         CREATE TABLE items_copy AS SELECT id, name FROM items WHERE id <= 10;
         ALTER TABLE items_copy ADD PRIMARY KEY (id);
         COMMENT ON TABLE items_copy IS 'a copy';",
    )
    .await
    .unwrap();
    src.batch_execute("CREATE INDEX CONCURRENTLY items_copy_name ON items_copy (name)")
        .await
        .unwrap();
    src.batch_execute(
        "CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1); DROP TABLE scratch;",
    )
    .await
    .unwrap();
    src.batch_execute("DELETE FROM items_copy WHERE id = 3; UPDATE items SET name = name || '!'")
        .await
        .unwrap();
    instants.push(note_instant(&cluster, &src).await);

    // DDL run inside a function called by a SELECT cannot be replayed: the archiver warns when
    // it sees it, and a restore past it stops there with an error naming the query.
    src.batch_execute(
        "CREATE FUNCTION make_table() RETURNS void LANGUAGE plpgsql AS
           $$ BEGIN EXECUTE 'CREATE TABLE made_in_function (id int PRIMARY KEY)'; END $$;",
    )
    .await
    .unwrap();
    src.batch_execute("SELECT make_table()").await.unwrap();
    src.batch_execute("INSERT INTO made_in_function VALUES (1)")
        .await
        .unwrap();

    // The warning is logged when the archiver decodes the change.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let log = archiver.log_text();
        if log.contains("a captured schema change will stop restores past it")
            && log.contains("SELECT make_table()")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The archive holds a commit past the last instant, then stop.
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    let (code, out, err) = restore(&cluster, &repo, "restored_latest", &["--latest"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("holds no schema statement") && err.contains("SELECT make_table()"),
        "{err}"
    );

    for (i, at) in instants.iter().enumerate() {
        assert_restores_to(&cluster, &repo, &format!("restored_{i}"), at).await;
    }
    // A restore into a database of a role that is not a superuser (it cannot create event
    // triggers, nor set session_replication_role).
    cluster.psql(
        "postgres",
        "CREATE ROLE restorer LOGIN; CREATE DATABASE restored_plain OWNER restorer;",
    );
    let target = cluster
        .conninfo("restored_plain")
        .replace(&format!("user={}", support::SUPERUSER), "user=restorer");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--target",
        &target,
        "--to-time",
        &instants[2].time,
    ]);
    assert_eq!(code, 0, "restore as a plain role failed: {out}{err}");
    let restored = support::snapshot_content(&cluster.client("restored_plain").await).await;
    support::assert_same_content(&instants[2].content, &restored, "restore as a plain role");

    // The restored database has tidemark's event trigger (from the backup's schema) and the
    // application can go on changing its schema and inserting.
    let c = cluster.client("restored_2").await;
    c.batch_execute(
        "ALTER TABLE items ADD COLUMN later int; INSERT INTO items (name) VALUES ('later');
         INSERT INTO app.people (name) VALUES ('later'); INSERT INTO items_copy VALUES (1000, 'x');",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_change_without_ddl_capture_stops_the_archiver() {
    // The archiver runs as a role that may replicate but not create event triggers.
    let Prepared {
        cluster,
        src,
        repo,
        dir: _repo_dir,
        ..
    } = Archiving::builder()
        .sql(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, 'one');
             CREATE ROLE archiver LOGIN REPLICATION;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO archiver;
             CREATE PUBLICATION tidemark FOR ALL TABLES;",
        )
        .prepare()
        .await;
    let as_archiver = cluster
        .conninfo("app")
        .replace(&format!("user={}", support::SUPERUSER), "user=archiver");
    assert_ne!(as_archiver, cluster.conninfo("app"));
    let start = || OtherRoleArchiver::start(&as_archiver, &repo, &[]);
    // A free port is picked, then bound by the archiver: another test may take it between.
    let mut attempts = 0;
    let (mut archiver, metrics_addr) = loop {
        let metrics_addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut archiver =
            OtherRoleArchiver::start(&as_archiver, &repo, &["--metrics-address", &metrics_addr]);
        match archiver.try_wait_streaming(&src).await {
            Ok(()) => break (archiver, metrics_addr),
            Err(log) if log.contains("cannot serve metrics") && attempts < 10 => attempts += 1,
            Err(log) => panic!("{log}"),
        }
    };
    wait_base_backup(&repo).await;
    assert!(
        archiver.log_text().contains("DDL capture is NOT installed"),
        "the archiver warns that schema changes are not captured:\n{}",
        archiver.log_text()
    );
    src.batch_execute("INSERT INTO t VALUES (2, 'two')")
        .await
        .unwrap();
    let before = note_instant(&cluster, &src).await;
    // Stored before the change stops the archiver (which loses the segment it was building):
    // a commit past `before`.
    wait_archived(&src, "tidemark", &archiver.log).await;
    src.batch_execute("ALTER TABLE t ADD COLUMN w int; INSERT INTO t VALUES (3, 'three', 3)")
        .await
        .unwrap();
    // With metrics served, the stopped archiver stays up and says so until it is signalled.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let m = scrape(&metrics_addr);
        if metric(&m, "tidemark_schema_unexplained_changes_total") == Some(1.0) {
            assert_eq!(metric(&m, "tidemark_archiving"), Some(0.0), "{m}");
            assert!(
                metric(&m, "tidemark_segments_stored_total") >= Some(1.0),
                "{m}"
            );
            assert!(metric(&m, "tidemark_durable_lsn_bytes") > Some(0.0), "{m}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no schema-change metric:\n{m}\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        archiver.child.try_wait().unwrap().is_none(),
        "the stopped archiver stays up while serving metrics:\n{}",
        archiver.log_text()
    );
    // …and /healthz says why.
    let (status, body) = crate::support::metrics::get(&metrics_addr, "/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("archiving stopped") && body.contains("without a captured schema change"),
        "{body}"
    );
    Command::new("kill")
        .args(["-TERM", &archiver.child.id().to_string()])
        .status()
        .unwrap();
    let code = archiver.wait_exit(Duration::from_secs(30));
    let log = archiver.log_text();
    assert_eq!(
        code,
        Some(3),
        "the archiver must stop with exit code 3:\n{log}"
    );
    assert!(
        log.contains("the columns of table \"public\".\"t\" changed from (id, v) to (id, v, w)")
            && log.contains("HINT: install DDL capture"),
        "{log}"
    );
    // Everything before the change is archived and restorable.
    assert_restores_to(&cluster, &repo, "restored_before", &before).await;

    // A new run cannot tell (it has not seen the table before the change): it archives on,
    // and the restore refuses to replay past the unexplained change.
    let mut archiver = start();
    archiver.wait_streaming(&src).await;
    wait_base_backup(&repo).await;
    src.batch_execute("INSERT INTO t VALUES (4, 'four', 4)")
        .await
        .unwrap();
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();
    let (code, out, err) = restore(&cluster, &repo, "restored_latest", &["--latest"]);
    assert_ne!(code, 0, "the restore must refuse: {out}{err}");
    assert!(
        err.contains("no captured schema change")
            && err.contains("HINT: restore to an instant before"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sequences_are_not_behind_the_source() {
    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = Archiving::builder()
        .sql(
            "CREATE TABLE s1 (id serial PRIMARY KEY, v text);
             CREATE TABLE s2 (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);
             CREATE SEQUENCE free_seq;
             INSERT INTO s1 (v) SELECT 'x' FROM generate_series(1, 5);",
        )
        .start()
        .await;
    wait_base_backup(&repo).await;

    // Values handed out without any row (nothing in the change stream shows them), a table
    // created after the base backup, an identity column given explicit values beyond its
    // sequence.
    src.batch_execute(
        "SELECT nextval('free_seq') FROM generate_series(1, 100);
         SELECT nextval('s1_id_seq') FROM generate_series(1, 50);
         INSERT INTO s1 (v) VALUES ('after gap');
         CREATE TABLE s3 (id serial PRIMARY KEY);
         INSERT INTO s3 DEFAULT VALUES; INSERT INTO s3 DEFAULT VALUES;
         SELECT nextval('s3_id_seq') FROM generate_series(1, 30);
         INSERT INTO s2 (v) VALUES ('a'), ('b');
         INSERT INTO s2 (id, v) VALUES (1000, 'explicit');",
    )
    .await
    .unwrap();
    // A heartbeat tick records the values: of two ticks started after t0, the second read the
    // sequences after t0, and both committed before the instant noted next.
    let t0 = server_now(&src).await;
    wait_heartbeats(&src, &t0, 2, &archiver.log).await;
    let at = note_instant(&cluster, &src).await;
    let values = |c: tokio_postgres::Client| async move {
        let mut out = Vec::new();
        for s in ["free_seq", "s1_id_seq", "s2_id_seq", "s3_id_seq"] {
            let v: i64 = c
                .query_one(&format!("SELECT last_value FROM {s}"), &[])
                .await
                .unwrap()
                .get(0);
            out.push((s, v));
        }
        out
    };
    let source_values = values(cluster.client("app").await).await;
    // More values after the instant must not leak into a restore to it... beyond a heartbeat.
    src.batch_execute("SELECT nextval('free_seq') FROM generate_series(1, 1000)")
        .await
        .unwrap();
    // Received before the stop: the recorded values and a heartbeat past the instant.
    wait_heartbeat_received(&src, "tidemark", &at.time, &archiver.log).await;
    archiver.stop();

    assert_restores_to(&cluster, &repo, "restored", &at).await;
    let restored_values = values(cluster.client("restored").await).await;
    for ((name, src_v), (_, got)) in source_values.iter().zip(&restored_values) {
        if *name == "s2_id_seq" {
            // Raised past the explicit 1000.
            assert!(
                *got >= 1000,
                "{name}: restored {got}, the column holds 1000"
            );
        } else {
            assert!(
                got >= src_v,
                "{name}: restored {got} is behind the source's {src_v}"
            );
        }
        if *name == "free_seq" {
            assert!(
                *got < 1000,
                "{name}: restored {got} includes values handed out after the instant"
            );
        }
    }
    let c = cluster.client("restored").await;
    c.batch_execute(
        "INSERT INTO s1 (v) VALUES ('restored'); INSERT INTO s2 (v) VALUES ('restored');
         INSERT INTO s3 DEFAULT VALUES;",
    )
    .await
    .unwrap();
}

/// `tidemark archive` with a source connection string of our choosing (another role).
struct OtherRoleArchiver {
    child: Child,
    log: std::path::PathBuf,
}

impl OtherRoleArchiver {
    fn start(source: &str, repo: &Path, extra: &[&str]) -> OtherRoleArchiver {
        let log = repo.with_extension(format!("other-{}.log", rand::random::<u32>()));
        let child = Command::new(support::tidemark_bin())
            .args(["archive", "--source", source, "--repo"])
            .arg(repo)
            .args(["--heartbeat", "1s", "--status-interval", "1s"])
            .args(extra)
            .env("TIDEMARK_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start tidemark archive");
        OtherRoleArchiver { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_streaming(&mut self, client: &tokio_postgres::Client) {
        if let Err(e) = self.try_wait_streaming(client).await {
            panic!("{e}");
        }
    }

    /// Waits until the archiver streams; Err(what happened, with the log) if it exited.
    async fn try_wait_streaming(&mut self, client: &tokio_postgres::Client) -> Result<(), String> {
        for _ in 0..900 {
            let rows = client
                .query(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'tidemark' AND active",
                    &[],
                )
                .await
                .unwrap();
            if !rows.is_empty() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "archiver exited with {status}:\n{}",
                    self.log_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "archiver did not start streaming:\n{}",
            self.log_text()
        ))
    }

    /// Waits for the process to exit by itself; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let code = self.wait_exit(Duration::from_secs(60));
        assert_eq!(
            code,
            Some(0),
            "archiver did not stop cleanly:\n{}",
            self.log_text()
        );
    }
}
