//! `setup` and `backup`: the commands around the archiver.

use crate::spine::{server_now, tidemark, wait_archived, workload_step, Archiving};
use crate::support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_what_archiving_needs_and_names_unreplicable_tables() {
    let prepared = Archiving::builder()
        .sql("CREATE TABLE keyed (id int PRIMARY KEY); CREATE TABLE \"No Key\" (v text); CREATE UNLOGGED TABLE scratch (v int);")
        .args(&["--slot", "s1", "--publication", "p1"])
        .prepare()
        .await;
    let cluster = &prepared.cluster;
    let src = cluster.conninfo("app");
    let (code, out, err) = tidemark(&[
        "setup",
        "--source",
        &src,
        "--slot",
        "s1",
        "--publication",
        "p1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ALTER TABLE public.\"No Key\" REPLICA IDENTITY FULL;"),
        "{out}"
    );
    assert!(!out.contains("keyed"), "{out}");
    assert!(out.contains("unlogged tables (1): public.scratch"), "{out}");
    assert_eq!(
        cluster.psql(
            "app",
            "SELECT count(*) FROM pg_publication WHERE pubname = 'p1' AND puballtables"
        ),
        "1"
    );
    assert_eq!(
        cluster.psql(
            "app",
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = 's1'"
        ),
        "pgoutput"
    );
    // Idempotent.
    let (code, out, err) = tidemark(&[
        "setup",
        "--source",
        &src,
        "--slot",
        "s1",
        "--publication",
        "p1",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("slot \"s1\" exists"), "{out}");

    cluster.psql("app", "ALTER TABLE \"No Key\" REPLICA IDENTITY FULL");
    prepared
        .src
        .batch_execute("INSERT INTO keyed VALUES (1); INSERT INTO \"No Key\" VALUES ('a'), ('b')")
        .await
        .unwrap();
    // The slot made by setup is used by archive, named explicitly.
    let Archiving {
        cluster,
        src: c,
        archiver,
        repo,
        dir: _repo_dir,
        ..
    } = prepared.archive().await;
    c.batch_execute("UPDATE \"No Key\" SET v = 'c' WHERE v = 'a'; DELETE FROM keyed; INSERT INTO keyed VALUES (2)").await.unwrap();
    let expected = support::snapshot_content(&c).await;
    wait_archived(&c, "s1", &archiver.log).await;
    archiver.stop();
    cluster.create_database("restored");
    let (code, out, err) = tidemark(&[
        "restore",
        "--repo",
        repo.to_str().unwrap(),
        "--target",
        &cluster.conninfo("restored"),
        "--latest",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let restored = support::snapshot_content(&cluster.client("restored").await).await;
    support::assert_same_content(&expected, &restored, "restore --latest after setup");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_backup_is_used_for_later_targets() {
    let Archiving {
        cluster,
        src: c,
        archiver,
        repo,
        url: repo_s,
        dir: _repo_dir,
    } = Archiving::start(&[]).await;
    support::wait_base_backup(&repo).await;
    workload_step(&c, 2).await;
    let (code, out, err) = tidemark(&[
        "backup",
        "--source",
        &cluster.conninfo("app"),
        "--repo",
        &repo_s,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("base backup"), "{out}");
    workload_step(&c, 3).await;
    let t = server_now(&c).await;
    let expected = support::snapshot_content(&c).await;
    workload_step(&c, 4).await;
    wait_archived(&c, "tidemark", &archiver.log).await;
    archiver.stop();

    let (code, out, err) = tidemark(&["list", "--repo", &repo_s, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backups = listing["generations"][0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2, "{out}");
    let second = backups[1]["id"].as_str().unwrap().to_string();

    let (code, out, err) =
        crate::spine::restore_into(&cluster, &repo_s, "restored", &["--to-time", &t]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&second),
        "the later backup should be chosen: {out}"
    );
    let restored = support::snapshot_content(&cluster.client("restored").await).await;
    support::assert_same_content(&expected, &restored, "restore from the second backup");
}

/// The repository's identity records the segments' codec: an archiver asked for lz4 on a new
/// repository writes segment format 1 and records `"compression": "lz4"`; a command that asks
/// for another codec on it is refused before it writes, naming both; the archive restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_keeps_the_compression_it_was_created_with() {
    let Archiving {
        cluster,
        src: c,
        archiver,
        repo,
        url: repo_s,
        dir: _repo_dir,
    } = Archiving::start(&["--compression", "lz4"]).await;
    support::wait_base_backup(&repo).await;
    workload_step(&c, 2).await;
    wait_archived(&c, "tidemark", &archiver.log).await;
    archiver.stop();

    let id: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("archive.json")).unwrap()).unwrap();
    assert_eq!(id["compression"], "lz4", "{id}");
    let gen_dir = repo.join("segments/00000001");
    let mut segments = 0;
    for e in std::fs::read_dir(&gen_dir).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        // The format version, after the 8-byte magic: 1 is LZ4's.
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1);
        segments += 1;
    }
    assert!(segments > 0, "no segment in {}", gen_dir.display());

    let files_before = std::fs::read_dir(repo.join("basebackups")).unwrap().count();
    let (code, out, err) = tidemark(&[
        "backup",
        "--source",
        &cluster.conninfo("app"),
        "--repo",
        &repo_s,
        "--compression",
        "zstd",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("records compression lz4") && err.contains("--compression zstd"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(repo.join("basebackups")).unwrap().count(),
        files_before,
        "refused before writing"
    );
    let (code, out, err) = tidemark(&["backup", "--repo", &repo_s, "--compression", "brotli"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("expected zstd or lz4"), "{err}");

    let expected = support::snapshot_content(&c).await;
    crate::spine::restore_latest_equals(&cluster, &repo_s, "restored", &expected).await;
}
