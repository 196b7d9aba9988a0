//! Client-side encryption end to end on a real PostgreSQL: an encrypted archive restores equal
//! to the source at instants before and after a key rotation, holds no row value in plain
//! text, and every damaged, moved or unkeyed object stops the restore naming the object.
//!
//! One archive, then restores of copies of it.

use std::path::{Path, PathBuf};

use tidemark::crypt::{envelope, Keyring};

use crate::spine::{
    restore_each_instant, restore_into, server_now, tidemark, tidemark_env, wait_archived,
    workload_step, Archiving, SCHEMA,
};
use crate::support::snapshot_content;

/// Values that must never appear in a stored object in plain text.
const MARKERS: [&str; 3] = [
    "marker-in-the-base-backup-5f1c",
    "marker-before-rotation-9a2e",
    "marker-after-rotation-c7d4",
];

/// Every file of a repository folder, sorted.
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub(crate) fn key_of(repo: &Path, file: &Path) -> String {
    file.strip_prefix(repo)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn copy_of(repo: &Path, name: &str) -> PathBuf {
    let to = repo.with_file_name(name);
    for f in files(repo) {
        let target = to.join(f.strip_prefix(repo).unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&f, &target).unwrap();
    }
    to
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Flips one bit in the middle of `file`.
pub(crate) fn flip_bit(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x10;
    std::fs::write(file, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_archive_restores_exactly_across_a_key_rotation_and_detects_damage() {
    let keys = tempfile::tempdir().unwrap();
    let keyring = keys.path().join("keyring.json");
    let keyring_arg = keyring.to_str().unwrap().to_string();
    let (code, out, err) = tidemark(&["keys", "generate", "--out", &keyring_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let first = Keyring::load(&keyring).unwrap().current().id;
    assert!(out.contains(&first.to_string()), "{out}");
    let env = [("TIDEMARK_ENCRYPTION_KEY_FILE", keyring_arg.clone())];

    let Archiving {
        cluster,
        src,
        archiver,
        repo,
        dir: _dir,
        ..
    } = Archiving::builder()
        .sql(SCHEMA)
        .sql(format!(
            "INSERT INTO docs (title, body) VALUES ('{}', 'in the first backup')",
            MARKERS[0]
        ))
        .env(&env)
        .start()
        .await;
    let url = repo.to_str().unwrap().to_string();

    let mut instants = Vec::new();
    workload_step(&src, 2).await;
    src.execute(
        "INSERT INTO docs (title, body) VALUES ($1, 'before')",
        &[&MARKERS[1]],
    )
    .await
    .unwrap();
    instants.push((server_now(&src).await, snapshot_content(&src).await));
    wait_archived(&src, "tidemark", &archiver.log).await;
    let before_rotation: Vec<PathBuf> = files(&repo.join("segments"));

    // Rotation beside the running archiver: its next segment is under the new key.
    let (code, out, err) = tidemark(&["keys", "add", "--keyring", &keyring_arg]);
    assert_eq!(code, 0, "{out}{err}");
    let second = Keyring::load(&keyring).unwrap().current().id;
    assert_ne!(first, second);
    let (code, out, _) = tidemark(&["keys", "list", "--keyring", &keyring_arg]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&first.to_string()) && out.contains(&format!("{second}  ")),
        "{out}"
    );
    let secrets = Keyring::load(&keyring).unwrap();
    for k in secrets.keys() {
        assert!(
            !out.contains(&hex::encode(k.secret.expose())),
            "keys list printed a secret"
        );
    }
    workload_step(&src, 3).await;
    src.execute(
        "INSERT INTO docs (title, body) VALUES ($1, 'after')",
        &[&MARKERS[2]],
    )
    .await
    .unwrap();
    instants.push((server_now(&src).await, snapshot_content(&src).await));
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    // Every object but the identity and the lease records is an envelope of a key of the
    // keyring: the first key before the rotation, the second after it.
    let mut plain_all = Vec::new();
    let mut key_ids = std::collections::BTreeMap::new();
    for f in files(&repo) {
        let key = key_of(&repo, &f);
        let bytes = std::fs::read(&f).unwrap();
        for m in MARKERS {
            assert!(!contains(&bytes, m), "{key} holds {m} in plain text");
        }
        if key == "archive.json" || key.starts_with("locks/") {
            continue;
        }
        let header = envelope::Header::parse(&bytes).unwrap_or_else(|e| panic!("{key}: {e}"));
        key_ids.insert(key.clone(), header.key_id);
        let opened = envelope::open(|id| secrets.get(id).map(|k| &k.secret), &key, &bytes)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        if key.ends_with(".seg") {
            let segment = tidemark::segment::Segment::parse(opened.into()).unwrap();
            for r in segment.records() {
                plain_all.extend_from_slice(&r.unwrap().payload);
            }
        }
    }
    let identity = std::fs::read_to_string(repo.join("archive.json")).unwrap();
    assert!(
        identity.contains("\"encryption\"") && identity.contains(&first.to_string()),
        "{identity}"
    );
    // The markers of the stream are in the decrypted segments' records: the search for plain
    // text above could have found them.
    for m in &MARKERS[1..] {
        assert!(contains(&plain_all, m), "{m} not in any decrypted segment");
    }
    for f in &before_rotation {
        assert_eq!(key_ids[&key_of(&repo, f)], first, "{}", f.display());
    }
    let segments = files(&repo.join("segments"));
    let after: Vec<&PathBuf> = segments
        .iter()
        .filter(|f| !before_rotation.contains(f))
        .collect();
    assert!(!after.is_empty());
    assert!(
        after.iter().any(|f| key_ids[&key_of(&repo, f)] == second),
        "no segment under the new key"
    );

    // Restores to an instant before the rotation and one after it are exact.
    restore_each_instant(&cluster, &url, &env, &instants, "rotated").await;
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", &url]);
    assert_eq!(code, 0, "{out}{err}");
    // verify opens every object, under both keys.
    let (code, out, err) = tidemark_env(&env, &["verify", "--repo", &url]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no damage found"), "{out}");

    // Without the key: refused, saying what to pass.
    let (code, out, err) = restore_into(&cluster, &url, "nokey", &["--latest"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("is encrypted") && err.contains("--encryption-key-file"),
        "{err}"
    );
    // With a keyring that lacks the repository's keys: the key id and the object are named.
    let stranger = keys.path().join("other.json");
    Keyring::generate().create(&stranger).unwrap();
    let other_env = [(
        "TIDEMARK_ENCRYPTION_KEY_FILE",
        stranger.to_str().unwrap().to_string(),
    )];
    let (code, out, err) = tidemark_env(&other_env, &["list", "--repo", &url]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("not in the keyring")
            && err.contains(&first.to_string())
            && err.contains("basebackups/"),
        "{err}"
    );

    // Damage: each copy fails its restore naming the damaged object.
    let restore_damaged = |repo: PathBuf, db: &str| {
        cluster.create_database(db);
        let target = cluster.conninfo(db);
        tidemark_env(
            &env,
            &[
                "restore",
                "--repo",
                repo.to_str().unwrap(),
                "--target",
                &target,
                "--latest",
            ],
        )
    };
    let last_segment = key_of(&repo, segments.last().unwrap());
    let bad = copy_of(&repo, "flipped-segment");
    flip_bit(&bad.join(&last_segment));
    let (code, out, err) = tidemark_env(&env, &["verify", "--repo", bad.to_str().unwrap()]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        out.contains(&last_segment) && out.contains("does not authenticate"),
        "{out}"
    );
    let (code, out, err) = restore_damaged(bad, "flipped_segment");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&last_segment) && err.contains("does not authenticate"),
        "{err}"
    );

    let all = files(&repo);
    let part = key_of(
        &repo,
        all.iter()
            .find(|f| f.to_str().unwrap().ends_with(".copy.lz4"))
            .unwrap(),
    );
    let bad = copy_of(&repo, "flipped-part");
    flip_bit(&bad.join(&part));
    let (code, out, err) = restore_damaged(bad, "flipped_part");
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        err.contains(&part) && err.contains("does not authenticate"),
        "{err}"
    );

    let manifest = key_of(
        &repo,
        all.iter().find(|f| f.ends_with("manifest.json")).unwrap(),
    );
    let bad = copy_of(&repo, "flipped-manifest");
    flip_bit(&bad.join(&manifest));
    let (code, out, err) = restore_damaged(bad, "flipped_manifest");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&manifest) && err.contains("does not authenticate"),
        "{err}"
    );

    // Two segments renamed over each other: each is bound to its own name.
    let (a, b) = (
        key_of(&repo, &segments[segments.len() - 2]),
        key_of(&repo, &segments[segments.len() - 1]),
    );
    let bad = copy_of(&repo, "swapped");
    let tmp = bad.join("swap.tmp");
    std::fs::rename(bad.join(&a), &tmp).unwrap();
    std::fs::rename(bad.join(&b), bad.join(&a)).unwrap();
    std::fs::rename(&tmp, bad.join(&b)).unwrap();
    let (code, out, err) = restore_damaged(bad, "swapped");
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains(&a) && err.contains("does not authenticate"),
        "{err}"
    );

    // keys generate never replaces a keyring: usage, pointing at keys add.
    let (code, out, err) = tidemark(&["keys", "generate", "--out", &keyring_arg]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("already exists") && err.contains("keys add --keyring"),
        "{err}"
    );

    // Before rekey the first key still opens the objects written before the rotation: retire
    // refuses (and without the repository it cannot check).
    let first_arg = first.to_string();
    let (code, out, err) = tidemark(&["keys", "retire", "--keyring", &keyring_arg, &first_arg]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("--repo"), "{err}");
    let retire = [
        "keys",
        "retire",
        "--keyring",
        &keyring_arg,
        "--repo",
        &url,
        &first_arg,
    ];
    let (code, out, err) = tidemark(&retire);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("still opens") && err.contains("tidemark rekey"),
        "{err}"
    );
    let second_arg = second.to_string();
    let (code, out, err) = tidemark(&[
        "keys",
        "retire",
        "--keyring",
        &keyring_arg,
        "--repo",
        &url,
        &second_arg,
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("current key"), "{err}");

    // Without rekey, a keyring lacking the first key fails naming the key id and an object.
    let mut lacking = Keyring::load(&keyring).unwrap();
    lacking.remove(&first).unwrap();
    let lacking_path = keys.path().join("lacking.json");
    lacking.create(&lacking_path).unwrap();
    let lacking_env = [(
        "TIDEMARK_ENCRYPTION_KEY_FILE",
        lacking_path.to_str().unwrap().to_string(),
    )];
    let unrekeyed = copy_of(&repo, "unrekeyed");
    cluster.create_database("unrekeyed");
    let (code, out, err) = tidemark_env(
        &lacking_env,
        &[
            "restore",
            "--repo",
            unrekeyed.to_str().unwrap(),
            "--target",
            &cluster.conninfo("unrekeyed"),
            "--latest",
        ],
    );
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains(&first_arg)
            && err.contains("not in the keyring")
            && err.contains("basebackups/"),
        "{err}"
    );

    // Rekey writes one header per object of the first key, and a rerun none.
    let (code, out, err) = tidemark_env(&env, &["rekey", "--repo", &url, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let under_first = key_ids.values().filter(|k| **k == first).count() as u64;
    assert_eq!(summary["rewrapped"], under_first, "{out}");
    assert_eq!(summary["bytes_written"], under_first * 80, "{out}");
    let sidecars = files(&repo.join("rekeyed").join(&second_arg));
    assert_eq!(sidecars.len() as u64, under_first);
    assert!(sidecars
        .iter()
        .all(|f| std::fs::metadata(f).unwrap().len() == 80));
    let (code, out, err) = tidemark_env(&env, &["rekey", "--repo", &url, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let again: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["rewrapped"], 0, "{out}");

    // Then the first key retires (no writer runs: nothing to wait for), and every instant
    // still restores exactly without it.
    let (code, out, err) = tidemark_env(&[("TIDEMARK_RETIRE_SETTLE", "0s".into())], &retire);
    assert_eq!(code, 0, "{out}{err}");
    let left = Keyring::load(&keyring).unwrap();
    assert!(left.get(&first).is_none() && left.get(&second).is_some());
    restore_each_instant(&cluster, &url, &env, &instants, "retired").await;
    let (code, out, err) = tidemark_env(&env, &["list", "--repo", &url]);
    assert_eq!(code, 0, "{out}{err}");
}
