//! tidemark's publication: protected against DROP and ALTER while its slot exists; dropped
//! anyway (past the guard), the archiver starts a new generation by itself instead of failing
//! on every start, and both generations restore.

use std::time::{Duration, Instant};

use crate::spine::{self, server_now, wait_archived, workload_step, Archiving};
use crate::support::{assert_same_content, snapshot_content};

#[tokio::test]
async fn the_publication_is_protected_and_a_forced_drop_starts_a_new_generation() {
    let Archiving {
        cluster,
        src,
        mut archiver,
        repo,
        dir: _dir,
        ..
    } = Archiving::start(&[]).await;
    let repo_arg = repo.to_str().unwrap();
    workload_step(&src, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let instant = server_now(&src).await;
    let at_instant = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;

    // Refused while the slot exists, with the reason and the way out.
    for ddl in [
        "DROP PUBLICATION tidemark",
        "ALTER PUBLICATION tidemark SET (publish = 'insert')",
        "ALTER PUBLICATION tidemark RENAME TO other",
    ] {
        let err = src.batch_execute(ddl).await.expect_err(ddl);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{ddl}: {err}"));
        assert_eq!(db.code().code(), "55006", "{ddl}: {db}");
        assert!(db.message().contains("archived by tidemark"), "{ddl}: {db}");
        assert!(
            db.hint()
                .is_some_and(|h| h.contains("pg_drop_replication_slot")),
            "{ddl}: {db:?}"
        );
    }
    let others: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname <> 'tidemark'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(others, 0);
    // Other publications are not the guard's business.
    src.batch_execute("CREATE PUBLICATION unrelated FOR TABLE kinds; DROP PUBLICATION unrelated")
        .await
        .unwrap();

    // Past the guard (event triggers do not fire for session_replication_role = replica).
    src.batch_execute(
        "SET session_replication_role = replica; DROP PUBLICATION tidemark; RESET session_replication_role;",
    )
    .await
    .unwrap();
    workload_step(&src, 3).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(archiver.log_text().contains("was dropped while slot")
        && repo
            .join("basebackups")
            .read_dir()
            .map(|d| d.count())
            .unwrap_or(0)
            >= 2
        && archiver.log_text().matches("INFO archiving").count() >= 2)
    {
        archiver.assert_running();
        assert!(
            Instant::now() < deadline,
            "no new generation after the publication was dropped:\n{}",
            archiver.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    workload_step(&src, 4).await;
    let latest = snapshot_content(&src).await;
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        log.contains("NOT in the archive"),
        "the loss must be said plainly:\n{log}"
    );

    let (code, out, err) = spine::tidemark(&["list", "--repo", repo_arg, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    let generations = listing["generations"].as_array().expect("generations");
    assert_eq!(generations.len(), 2, "{out}");

    for (db, to, expected) in [
        (
            "gen1_instant",
            vec!["--to-time", instant.as_str()],
            &at_instant,
        ),
        ("gen2_latest", vec!["--latest"], &latest),
    ] {
        let (code, out, err) = spine::restore_into(&cluster, repo_arg, db, &to);
        assert_eq!(code, 0, "restore {to:?}: {out}{err}");
        let restored = snapshot_content(&cluster.client(db).await).await;
        assert_same_content(expected, &restored, &format!("restore {to:?}"));
    }
}
