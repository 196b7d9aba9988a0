//! `tidemark demo`: the whole cycle on a throwaway PostgreSQL, checked.
//!
//! Starts a scratch cluster (unless `--source` is given), creates a small schema, archives it
//! into a local folder while a workload runs, notes the exact content at an instant in the
//! middle, restores to that instant into a new database and compares row for row. On a server
//! given with `--source` it leaves nothing behind: its slot and both databases are dropped at
//! the end, after a failure too.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::archive::{self, ArchiveOptions};
use crate::conninfo::ConnInfo;
use crate::lsn::PgTimestamp;
use crate::restore::{self, Target};
use crate::scratch::ScratchCluster;

pub async fn run(
    source: Option<&str>,
    repo: Option<&str>,
    duration: Duration,
) -> anyhow::Result<()> {
    let scratch = match source {
        Some(_) => None,
        None => {
            println!("starting a throwaway PostgreSQL cluster…");
            Some(tokio::task::spawn_blocking(ScratchCluster::start).await??)
        }
    };
    let admin = match (&scratch, source) {
        (Some(c), _) => ConnInfo::parse(&c.conninfo("postgres"))?,
        (None, Some(s)) => ConnInfo::parse(s)?,
        _ => unreachable!(),
    };
    let suffix = rand::random::<u16>();
    let names = Names {
        src_db: format!("tidemark_demo_{suffix}"),
        dst_db: format!("tidemark_demo_{suffix}_restored"),
        slot: format!("tidemark_demo_{suffix}"),
    };
    let admin_client = admin.connect().await?;
    let stop = CancellationToken::new();
    let mut archiver = None;
    let r = exercise(
        &admin,
        &admin_client,
        &names,
        repo,
        duration,
        &stop,
        &mut archiver,
    )
    .await;
    // The archiver stops (its slot is released) before anything is dropped.
    stop.cancel();
    if let Some(a) = archiver {
        let _ = a.await;
    }
    // A server we were given keeps nothing of the demo's: an inactive slot would hold its WAL
    // for ever. A throwaway cluster goes as a whole.
    if scratch.is_none() {
        if let Err(e) = clean_up(&admin_client, &names).await {
            let e = e.context(format!(
                "cleaning up after the demo: drop slot {} and databases {} and {} by hand",
                names.slot, names.src_db, names.dst_db
            ));
            match r {
                Ok(()) => return Err(e),
                Err(_) => eprintln!("error: {}", crate::exit::render(&e)),
            }
        }
    }
    r?;
    let when = PgTimestamp::now();
    drop(scratch);
    println!("demo finished at {when}");
    Ok(())
}

/// What the demo creates on its server (and [`clean_up`] drops).
struct Names {
    src_db: String,
    dst_db: String,
    slot: String,
}

/// Archives a workload, restores to an instant in its middle, and compares.
async fn exercise(
    admin: &ConnInfo,
    admin_client: &tokio_postgres::Client,
    names: &Names,
    repo: Option<&str>,
    duration: Duration,
    stop: &CancellationToken,
    archiver: &mut Option<ArchiverTask>,
) -> anyhow::Result<()> {
    let Names {
        src_db,
        dst_db,
        slot,
    } = names;
    for db in [src_db, dst_db] {
        admin_client
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
    }
    let src = admin.with_dbname(src_db);
    let dst = admin.with_dbname(dst_db);
    let c = src.connect().await?;
    c.batch_execute(
        "CREATE TABLE accounts (id bigserial PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL, tags text[], meta jsonb, updated timestamptz DEFAULT now());
         CREATE TABLE ledger (id bigserial PRIMARY KEY, account bigint REFERENCES accounts, amount numeric(12,2), at timestamptz DEFAULT clock_timestamp());
         INSERT INTO accounts (owner, balance, tags, meta)
           SELECT 'owner ' || i, i * 10, ARRAY['t' || (i % 3)], jsonb_build_object('n', i) FROM generate_series(1, 200) i;",
    )
    .await?;

    let repo_dir = match repo {
        Some(r) => (std::path::PathBuf::from(r), None),
        None => {
            let d = tempfile::Builder::new()
                .prefix("tidemark-demo-repo-")
                .tempdir()?;
            (d.path().to_path_buf(), Some(d))
        }
    };
    let store = crate::store::open(&repo_dir.0.display().to_string())?;
    println!("archiving database {src_db} into {}", repo_dir.0.display());
    let opts = ArchiveOptions {
        slot: slot.clone(),
        heartbeat: Some(Duration::from_secs(1)),
        ..ArchiveOptions::default()
    };
    *archiver = Some({
        let (src, store, opts, stop) = (src.clone(), store.clone(), opts.clone(), stop.clone());
        tokio::spawn(async move { archive::run(&src, store, &opts, stop).await })
    });
    // Wait for the base backup: the slot appears once archiving starts.
    wait_for_slot(&c, &opts.slot, archiver).await?;

    let half = duration / 2;
    workload(&c, half).await?;
    let instant: String = c
        .query_one("SELECT clock_timestamp()::text", &[])
        .await?
        .get(0);
    let expected = content(&c).await?;
    println!(
        "noted the content at {instant}: {} accounts, {} ledger rows",
        expected["accounts"].len(),
        expected["ledger"].len()
    );
    workload(&c, duration - half).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let summary = archiver.take().expect("the archiver runs").await??;
    println!(
        "archived {} transactions up to {}",
        summary.transactions, summary.durable
    );

    let target = Target::Time(crate::exit::parse_time(&instant)?);
    let s = restore::run(&store, &dst, target, 2)
        .await
        .context("restoring the demo archive")?;
    println!(
        "restored to {instant}: base backup {} + {} transactions in {:.1}s",
        s.backup_id, s.transactions_replayed, s.seconds
    );
    let restored = content(&dst.connect().await?).await?;
    if restored != expected {
        bail!("the restored database differs from the source at {instant}");
    }
    println!("OK: the restored database equals the source at {instant}, row for row");
    Ok(())
}

/// Drops the demo's slot and databases on the server it was given (those that exist: the demo
/// may have failed before creating them). The slot goes first: a database with a logical slot
/// cannot be dropped.
async fn clean_up(admin: &tokio_postgres::Client, names: &Names) -> anyhow::Result<()> {
    for _ in 0..300 {
        let rows = admin
            .query(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&names.slot],
            )
            .await?;
        match rows.first().map(|r| r.get::<_, bool>(0)) {
            None => break,
            Some(true) => tokio::time::sleep(Duration::from_millis(100)).await,
            Some(false) => {
                admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[&names.slot])
                    .await?;
                break;
            }
        }
    }
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    // WITH (FORCE) (PostgreSQL 13) ends the demo's own connections still closing.
    let force = if version >= 130000 {
        " WITH (FORCE)"
    } else {
        ""
    };
    for db in [&names.dst_db, &names.src_db] {
        let sql = format!(
            "DROP DATABASE IF EXISTS {}{force}",
            crate::sql::quote_ident(db)
        );
        let mut tries = 0;
        while let Err(e) = admin.batch_execute(&sql).await {
            tries += 1;
            if tries == 50 {
                return Err(e.into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "dropped the demo's slot {} and databases {} and {}",
        names.slot, names.src_db, names.dst_db
    );
    Ok(())
}

/// The archiver's task, as the demo runs it.
type ArchiverTask = tokio::task::JoinHandle<Result<archive::ArchiveSummary, archive::ArchiveError>>;

/// Waits until the archiver streams from `slot`, or returns its error if it stopped.
async fn wait_for_slot(
    c: &tokio_postgres::Client,
    slot: &str,
    archiver: &mut Option<ArchiverTask>,
) -> anyhow::Result<()> {
    for _ in 0..600 {
        if archiver.as_ref().is_some_and(|a| a.is_finished()) {
            let ended = archiver.take().expect("checked above").await?;
            ended.context("archiving the demo database")?;
            bail!("the archiver stopped before streaming");
        }
        let rows = c
            .query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await?;
        if !rows.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the archiver did not start within 60 s")
}

async fn workload(c: &tokio_postgres::Client, duration: Duration) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + duration;
    while std::time::Instant::now() < until {
        c.batch_execute(
            "BEGIN;
             WITH a AS (SELECT (random() * 199)::bigint + 1 AS id, round((random() * 100)::numeric, 2) AS amt)
             INSERT INTO ledger (account, amount) SELECT id, amt FROM a;
             UPDATE accounts SET balance = balance + 1, updated = now(), meta = meta || '{\"touched\": true}'
              WHERE id = (SELECT account FROM ledger ORDER BY id DESC LIMIT 1);
             DELETE FROM ledger WHERE id IN (SELECT id FROM ledger ORDER BY random() LIMIT 1) AND random() < 0.1;
             COMMIT;",
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn content(c: &tokio_postgres::Client) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for t in ["accounts", "ledger"] {
        let rows = c
            .query(&format!("SELECT {t}::text FROM {t} ORDER BY 1"), &[])
            .await?;
        out.insert(
            t.to_string(),
            rows.iter().map(|r| r.get::<_, String>(0)).collect(),
        );
    }
    Ok(out)
}
