//! Cold tiers on a real S3-compatible server that models storage classes and thaws (moto):
//! `--s3-storage-class` on what `archive` and `backup` write; `prune --archive-storage-class`
//! moving a backup that became a weekly archive (its parts only, encryption kept); `list`
//! showing each backup's class; a restore from the cold backup refused naming its objects and
//! the thaw command; `--thaw standard` thawing (and waiting) then restoring equal to the
//! source. An object above the single-copy limit (lowered for the test) moved by a multipart
//! copy and read back identical after a thaw. And on a folder the storage-class flags are
//! refused (exit 2).

use std::time::{Duration, Instant};

use aws_sdk_s3::types::ServerSideEncryption;
use tidemark::catalog::Manifest;
use tidemark::lsn::PgTimestamp;

use crate::support::archiving::{tidemark, tidemark_env, wait_archived, workload_step, Archiving};
use crate::support::moto::MotoServer;
use crate::support::{self, snapshot_content};

const BUCKET: &str = "cold";
const URL: &str = "s3://cold/app";

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// Every object of the bucket with its storage class (as the listing says).
async fn classes(s3: &aws_sdk_s3::Client) -> Vec<(String, String)> {
    let out = s3.list_objects_v2().bucket(BUCKET).send().await.unwrap();
    assert_ne!(out.is_truncated(), Some(true));
    out.contents()
        .iter()
        .map(|o| {
            (
                o.key().unwrap().to_string(),
                o.storage_class()
                    .map_or("STANDARD".into(), |c| c.as_str().to_string()),
            )
        })
        .collect()
}

/// The objects of backup `id`'s folder: (manifests, other objects), each with its class.
type Listed = Vec<(String, String)>;
fn folder(all: &[(String, String)], id: &str) -> (Listed, Listed) {
    all.iter()
        .filter(|(k, _)| k.starts_with(&format!("app/basebackups/{id}/")))
        .cloned()
        .partition(|(k, _)| k.ends_with(".json"))
}

/// Rewrites backup `id`'s manifest as if it had been taken `ago` earlier (test scaffolding:
/// a backup of an earlier ISO week, without waiting a week).
async fn age_backup(s3: &aws_sdk_s3::Client, id: &str, ago: Duration) {
    let key = format!("app/basebackups/{id}/manifest.json");
    let body = s3
        .get_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    let mut m = Manifest::from_json(&key, &body).unwrap();
    let shift = ago.as_micros() as i64;
    for t in [&mut m.snapshot_time, &mut m.started_at, &mut m.finished_at] {
        *t = PgTimestamp(t.0 - shift);
    }
    s3.put_object()
        .bucket(BUCKET)
        .key(&key)
        .body(m.to_json().into())
        .server_side_encryption(ServerSideEncryption::Aes256)
        .storage_class(aws_sdk_s3::types::StorageClass::StandardIa)
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weekly_archive_moves_to_glacier_is_refused_cold_and_restores_after_a_thaw() {
    let moto = MotoServer::with_bucket(BUCKET).await;
    let s3 = moto.store(URL).await.client().clone();
    let mut env = moto.cli_env();
    env.push(("TIDEMARK_S3_STORAGE_CLASS", "STANDARD_IA".into()));
    let prepared = Archiving::builder().repo_url(URL).env(&env).prepare().await;
    // The initial backup (B0) holds the content from before the archiver starts.
    let at_b0 = snapshot_content(&prepared.src).await;
    let Archiving {
        cluster,
        src,
        archiver,
        dir: _dir,
        ..
    } = prepared.archive().await;
    let log = archiver.log.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    let b0 = loop {
        let (_, out, _) = tidemark_env(&env, &["list", "--repo", URL, "--json"]);
        if let Some(id) = serde_json::from_str::<serde_json::Value>(&out)
            .ok()
            .and_then(|l| {
                l["generations"][0]["backups"][0]["id"]
                    .as_str()
                    .map(String::from)
            })
        {
            break id;
        }
        assert!(Instant::now() < deadline, "no initial backup: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    workload_step(&src, 2).await;
    wait_archived(&src, "tidemark", &log).await;
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "backup",
            "--source",
            &cluster.conninfo("app"),
            "--repo",
            URL,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let b1 = out.split_whitespace().nth(2).unwrap().to_string();

    // Everything tidemark wrote is in the class it was asked for.
    let all = classes(&s3).await;
    assert!(
        all.iter().any(|(k, _)| k.starts_with("app/segments/")),
        "{all:?}"
    );
    let written: Vec<_> = all
        .iter()
        .filter(|(k, _)| k.contains("/segments/") || k.contains("/basebackups/"))
        .collect();
    assert!(
        written.iter().all(|(_, c)| c == "STANDARD_IA"),
        "--s3-storage-class not applied: {written:?}"
    );

    // B0 becomes last week's backup: the weekly tier alone keeps it, so it is an archive
    // (once the change window, the last second, starts after B1).
    tokio::time::sleep(Duration::from_secs(2)).await;
    age_backup(&s3, &b0, Duration::from_secs(8 * 24 * 3600)).await;
    let policy = [
        "--retain-daily",
        "0",
        "--retain-weekly",
        "4",
        "--retain-monthly",
        "0",
        "--retain-manual",
        "1",
        "--retain-changes",
        "1s",
        "--archive-storage-class",
        "GLACIER",
    ];
    let mut args = vec!["prune", "--repo", URL, "--json"];
    args.extend(policy);
    let (code, out, err) = tidemark_env(&env, &args);
    assert_eq!(code, 0, "{out}{err}");
    let report = json(&out);
    let archived = report["archived"].as_array().unwrap();
    assert_eq!(archived.len(), 1, "{out}");
    assert_eq!(archived[0]["id"], b0.as_str());
    assert_eq!(archived[0]["class"], "GLACIER");

    // Only B0's parts moved; its manifest, B1 and the segments stayed; encryption was kept.
    let all = classes(&s3).await;
    let (manifests, parts) = folder(&all, &b0);
    assert!(
        !parts.is_empty() && parts.iter().all(|(_, c)| c == "GLACIER"),
        "{parts:?}"
    );
    assert!(
        manifests.iter().all(|(_, c)| c == "STANDARD_IA"),
        "{manifests:?}"
    );
    let (m1, p1) = folder(&all, &b1);
    assert!(
        m1.iter().chain(&p1).all(|(_, c)| c == "STANDARD_IA"),
        "{p1:?}"
    );
    assert!(all
        .iter()
        .filter(|(k, _)| k.contains("/segments/"))
        .all(|(_, c)| c == "STANDARD_IA"));
    let head = s3
        .head_object()
        .bucket(BUCKET)
        .key(&parts[0].0)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.server_side_encryption(),
        Some(&ServerSideEncryption::Aes256)
    );
    // moto models a cold object: unreadable until thawed.
    let get = s3.get_object().bucket(BUCKET).key(&parts[0].0).send().await;
    assert!(
        format!("{:?}", get.unwrap_err()).contains("InvalidObjectState"),
        "a GLACIER object read without a thaw"
    );

    // A second prune has nothing left to move.
    let (code, out, err) = tidemark_env(&env, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)["archived"], serde_json::json!([]), "{out}");

    // list: each backup's class.
    let listed = json(&tidemark_env(&env, &["list", "--repo", URL, "--json"]).1);
    let backups = listed["generations"][0]["backups"].as_array().unwrap();
    let class_of =
        |id: &str| backups.iter().find(|b| b["id"] == id).unwrap()["storage_class"].clone();
    assert_eq!(class_of(&b0), "GLACIER", "{listed}");
    assert_eq!(class_of(&b1), "STANDARD_IA", "{listed}");
    let (_, text, _) = tidemark_env(&env, &["list", "--repo", URL]);
    assert!(text.contains(", GLACIER"), "{text}");

    // A restore from the cold backup is refused before writing, naming the objects and the
    // command that thaws them.
    cluster.create_database("cold_refused");
    let target = cluster.conninfo("cold_refused");
    let (code, out, err) = tidemark_env(
        &env,
        &[
            "restore",
            "--repo",
            URL,
            "--target",
            &target,
            "--to-backup",
            &b0,
        ],
    );
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains(&parts[0].0["app/".len()..])
            && err.contains("(GLACIER)")
            && err.contains(&format!(
                "tidemark restore --repo {URL} --to-backup {b0} --thaw standard"
            )),
        "{err}"
    );

    // --thaw standard: the thaw takes a few seconds on moto; tidemark waits, then restores.
    moto.thaw_takes(3);
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.create_database("thawed");
    let target = cluster.conninfo("thawed");
    let mut log_env = env.clone();
    log_env.push(("TIDEMARK_LOG", "info".into()));
    let started = Instant::now();
    let (code, out, err) = tidemark_env(
        &log_env,
        &[
            "restore",
            "--repo",
            URL,
            "--target",
            &target,
            "--to-backup",
            &b0,
            "--thaw",
            "standard",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("thawing the backup's objects"), "{err}");
    assert!(err.contains("objects readable after"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "no wait for the thaw"
    );
    support::assert_same_content(
        &at_b0,
        &snapshot_content(&cluster.client("thawed").await).await,
        "restore --to-backup of a thawed GLACIER backup",
    );
}

#[test]
fn a_folder_repository_refuses_the_storage_class_flags() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let repo = repo.to_str().unwrap();
    let (code, out, err) = tidemark(&["list", "--repo", repo, "--s3-storage-class", "STANDARD_IA"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--s3-storage-class STANDARD_IA needs an S3 repository"),
        "{err}"
    );
    let (code, out, err) = tidemark(&[
        "prune",
        "--repo",
        repo,
        "--archive-storage-class",
        "GLACIER",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("--archive-storage-class GLACIER needs an S3 repository"),
        "{err}"
    );
    // A cold class for new objects is refused wherever the repository is.
    let (code, _, err) = tidemark(&["list", "--repo", repo, "--s3-storage-class", "GLACIER"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--archive-storage-class"), "{err}");
}

/// An object above the single-copy threshold (lowered here from 5 GiB to 5 MiB) moves to the
/// archive class with a multipart copy onto itself: in the new class, encrypted as before,
/// unreadable until thawed, then byte for byte the object it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_above_the_copy_threshold_moves_by_multipart_copy_and_reads_after_a_thaw() {
    use tidemark::store::{StorageClass, Store, ThawTier};
    let moto = MotoServer::with_bucket(BUCKET).await;
    let mut store = moto.store(URL).await;
    store.copy_threshold = 5 << 20;
    store.copy_part_size = 5 << 20;
    let s3 = store.client().clone();
    let big: bytes::Bytes = (0..(12usize << 20) + 4321)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let small = bytes::Bytes::from_static(b"below the threshold: one CopyObject");
    let (big_key, small_key) = ("basebackups/b/tables/big.copy", "basebackups/b/toc.json");
    store.put(big_key, big.clone()).await.unwrap();
    store.put(small_key, small.clone()).await.unwrap();

    store
        .set_storage_class(big_key, &StorageClass::Glacier)
        .await
        .unwrap();
    store
        .set_storage_class(small_key, &StorageClass::Glacier)
        .await
        .unwrap();
    let head = |key: &'static str| {
        let s3 = s3.clone();
        async move {
            s3.head_object()
                .bucket(BUCKET)
                .key(format!("app/{key}"))
                .send()
                .await
                .unwrap()
        }
    };
    let (h, hs) = (head(big_key).await, head(small_key).await);
    assert_eq!(
        h.storage_class().map(|c| c.as_str()),
        Some("GLACIER"),
        "{h:?}"
    );
    assert_eq!(h.content_length(), Some(big.len() as i64));
    assert_eq!(
        h.server_side_encryption(),
        Some(&ServerSideEncryption::Aes256)
    );
    // A multipart ETag names its parts: 12 MiB and a bit in 5 MiB parts is three.
    assert!(
        h.e_tag()
            .is_some_and(|e| e.trim_matches('"').ends_with("-3")),
        "not a three-part copy: {:?}",
        h.e_tag()
    );
    assert_eq!(hs.storage_class().map(|c| c.as_str()), Some("GLACIER"));
    assert!(
        hs.e_tag().is_some_and(|e| !e.contains('-')),
        "a small object is copied whole: {:?}",
        hs.e_tag()
    );
    assert!(
        store.get(big_key).await.is_err(),
        "a GLACIER object read without a thaw"
    );
    // Moving again to the class it is in does nothing.
    store
        .set_storage_class(big_key, &StorageClass::Glacier)
        .await
        .unwrap();
    assert_eq!(head(big_key).await.e_tag(), h.e_tag());

    store.thaw(big_key, ThawTier::Standard, 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store.residence(big_key).await.unwrap().readable() {
        assert!(Instant::now() < deadline, "the thaw never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        store.get(big_key).await.unwrap() == big,
        "the thawed object's bytes differ from the original's"
    );
}
