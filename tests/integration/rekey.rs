//! Rekey end to end on a real PostgreSQL: on S3, where it reads only the objects' headers
//! (ranged GETs) and `keys retire` then leaves every instant restorable; and beside an archiver
//! that keeps archiving under load while a key is added, rekey runs and the old key retires.
//! Both are recorded in the audit trail with what they did.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidemark::crypt::envelope::{Header, HEADER_LEN};
use tidemark::crypt::{KeyId, Keyring};
use tidemark::rekey::is_encrypted_object;

use crate::spine::{
    restore_each_instant, server_now, tidemark, tidemark_env, wait_archived, workload_step,
    Archiving,
};
use crate::support::proxy::Mode;
use crate::support::s3::ProxiedS3;
use crate::support::{snapshot_content, ContentSnapshot};

/// A new keyring of one key in `dir`: its path, as an argument, and its key.
fn new_keyring(dir: &Path) -> (String, KeyId) {
    let path = dir.join("keyring.json");
    let arg = path.to_str().unwrap().to_string();
    let (code, out, err) = tidemark(&["keys", "generate", "--out", &arg]);
    assert_eq!(code, 0, "{out}{err}");
    (arg, Keyring::load(&path).unwrap().current().id)
}

/// `keys add`: the new key's id.
fn add_key(keyring: &str) -> KeyId {
    let (code, out, err) = tidemark(&["keys", "add", "--keyring", keyring]);
    assert_eq!(code, 0, "{out}{err}");
    Keyring::load(Path::new(keyring)).unwrap().current().id
}

/// The key id in the own header of every encrypted object of `objects` (keys relative to the
/// repository).
fn header_keys(objects: &BTreeMap<String, Vec<u8>>) -> BTreeMap<String, KeyId> {
    objects
        .iter()
        .filter(|(k, _)| is_encrypted_object(k))
        .map(|(k, b)| {
            let h = Header::parse(b).unwrap_or_else(|e| panic!("{k}: {e}"));
            (k.clone(), h.key_id)
        })
        .collect()
}

/// Every object of a repository folder, by key.
fn folder_objects(repo: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![repo.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if let Ok(bytes) = std::fs::read(e.path()) {
                let key = e
                    .path()
                    .strip_prefix(repo)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .into();
                out.insert(key, bytes);
            }
        }
    }
    out
}

/// Checks that every encrypted object of `objects` opens with `key` alone: its own header
/// names it, or its sidecar `rekeyed/<key>/<object>` exists.
fn all_under(objects: &BTreeMap<String, Vec<u8>>, key: &KeyId) {
    for (object, id) in header_keys(objects) {
        let sidecar = format!("rekeyed/{key}/{object}");
        assert!(
            id == *key || objects.get(&sidecar).is_some_and(|b| b.len() == HEADER_LEN),
            "{object} (key {id}) has neither key {key} nor its sidecar {sidecar}"
        );
    }
}

/// `tidemark rekey --json` with `env`: exit code and the summary (or the error text).
fn rekey(env: &[(&'static str, String)], url: &str) -> (i32, serde_json::Value, String) {
    let (code, out, err) = tidemark_env(env, &["rekey", "--repo", url, "--json"]);
    let summary = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (code, summary, format!("{out}{err}"))
}

/// The rekey records of the audit trail of `url`, oldest first.
fn rekey_records(env: &[(&'static str, String)], url: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = tidemark_env(env, &["audit", "--repo", url, "--json"]);
    assert_eq!(code, 0, "audit: {out}{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listing["unreadable"], serde_json::json!([]), "{listing:#}");
    listing["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "rekey")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_on_s3_reads_only_headers_and_after_retire_every_instant_restores() {
    let keys = tempfile::tempdir().unwrap();
    let (keyring, first) = new_keyring(keys.path());
    let s3 = ProxiedS3::start("rekeyed", Mode::Pass);
    let mut env = s3.cli_env();
    env.push(("TIDEMARK_ENCRYPTION_KEY_FILE", keyring.clone()));
    let Archiving {
        cluster,
        src,
        archiver,
        url,
        ..
    } = Archiving::builder()
        .repo_url("s3://rekeyed/app")
        .env(&env)
        .start()
        .await;

    let mut instants = Vec::new();
    for step in 2..4 {
        workload_step(&src, step).await;
        instants.push((server_now(&src).await, snapshot_content(&src).await));
    }
    wait_archived(&src, "tidemark", &archiver.log).await;
    let second = add_key(&keyring);
    for step in 4..6 {
        workload_step(&src, step).await;
        instants.push((server_now(&src).await, snapshot_content(&src).await));
    }
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.stop();

    let stored = || -> BTreeMap<String, Vec<u8>> {
        s3.server
            .objects("rekeyed")
            .into_iter()
            .filter_map(|(k, b)| Some((k.strip_prefix("app/")?.to_string(), b)))
            .collect()
    };
    let keys_of = header_keys(&stored());
    let under_first = keys_of.values().filter(|k| **k == first).count() as u64;
    assert!(under_first > 0 && keys_of.values().any(|k| *k == second));

    // Before the rekey the first key cannot retire.
    let first_arg = first.to_string();
    let retire = [
        "keys",
        "retire",
        "--keyring",
        &keyring,
        "--repo",
        &url,
        &first_arg,
    ];
    let (code, out, err) = tidemark_env(&env, &retire);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("still opens"), "{err}");

    // A keyring without the first key cannot rekey its objects: each is counted, the rest
    // done, and the run fails (exit 2) naming the key; the audit trail records it so.
    let mut lacking = Keyring::load(Path::new(&keyring)).unwrap();
    lacking.remove(&first).unwrap();
    let lacking_path = keys.path().join("lacking.json");
    lacking.create(&lacking_path).unwrap();
    let mut lacking_env = env.clone();
    lacking_env.retain(|(k, _)| *k != "TIDEMARK_ENCRYPTION_KEY_FILE");
    lacking_env.push((
        "TIDEMARK_ENCRYPTION_KEY_FILE",
        lacking_path.to_str().unwrap().to_string(),
    ));
    let (code, _, text) = rekey(&lacking_env, &url);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(&format!("{under_first} object(s) could not be rekeyed"))
            && text.contains(&first_arg),
        "{text}"
    );
    let records = rekey_records(&env, &url);
    assert_eq!(records.len(), 1, "{records:#?}");
    let r = &records[0];
    assert_eq!(r["result"]["status"], "error", "{r:#}");
    assert_eq!(r["result"]["exit_code"], 2, "{r:#}");
    assert_eq!(r["details"]["failed"], under_first, "{r:#}");
    assert_eq!(r["details"]["rewrapped"], 0, "{r:#}");
    assert!(
        !r["details"]["failed_objects"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{r:#}"
    );

    // Rekey reads each object's 80-byte header and nothing more of it (the failed run's
    // record is one more object, under the second key).
    let before = stored();
    let keys_of = header_keys(&before);
    let stored_bytes: u64 = before.values().map(|b| b.len() as u64).sum();
    let seen = s3.proxy.responses().len();
    let (code, summary, text) = rekey(&env, &url);
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["rewrapped"], under_first, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["objects"], keys_of.len() as u64, "{summary}");
    let reads: Vec<(String, u64)> = s3.proxy.responses()[seen..]
        .iter()
        .filter(|(line, _)| {
            // GetObject of an encrypted object: not a listing, not the identity.
            line.starts_with("GET ")
                && !line.contains("list-type=")
                && !line.contains("/archive.json")
        })
        .cloned()
        .collect();
    let read_bytes: u64 = reads.iter().map(|(_, n)| n).sum();
    assert_eq!(
        reads.len(),
        keys_of.len(),
        "one header read per encrypted object: {reads:#?}"
    );
    assert_eq!(
        read_bytes,
        HEADER_LEN as u64 * reads.len() as u64,
        "{reads:#?}"
    );
    assert!(
        read_bytes * 20 < stored_bytes,
        "rekey read {read_bytes} bytes of an archive of {stored_bytes}"
    );
    let sidecars = s3
        .server
        .objects("rekeyed")
        .into_keys()
        .filter(|k| k.starts_with(&format!("app/rekeyed/{second}/")))
        .count() as u64;
    assert_eq!(sidecars, under_first);

    // The first key retires (the archiver stopped: no store under way to wait for), and every
    // instant restores exactly without it.
    let mut no_wait = env.clone();
    no_wait.push(("TIDEMARK_RETIRE_SETTLE", "0s".into()));
    let (code, out, err) = tidemark_env(&no_wait, &retire);
    assert_eq!(code, 0, "{out}{err}");
    assert!(Keyring::load(Path::new(&keyring))
        .unwrap()
        .get(&first)
        .is_none());
    restore_each_instant(&cluster, &url, &env, &instants, "s3_rekeyed").await;

    // The rekey is in the audit trail with what it did.
    let records = rekey_records(&env, &url);
    assert_eq!(records.len(), 2, "{records:#?}");
    let r = &records[1];
    assert_eq!(r["result"], serde_json::json!({"status": "ok"}), "{r:#}");
    assert_eq!(r["command"], "rekey", "{r:#}");
    assert_eq!(r["details"]["key"], second.to_string(), "{r:#}");
    for field in ["objects", "rewrapped", "already", "failed", "bytes_written"] {
        assert_eq!(r["details"][field], summary[field], "{field}: {r:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_beside_an_archiver_under_load_keeps_every_instant_restorable() {
    let keys = tempfile::tempdir().unwrap();
    let (keyring, first) = new_keyring(keys.path());
    let env = [("TIDEMARK_ENCRYPTION_KEY_FILE", keyring.clone())];
    let Archiving {
        cluster,
        src,
        mut archiver,
        repo,
        url,
        dir: _dir,
    } = Archiving::builder().env(&env).start().await;

    // The load: workload steps one after another, paused only while an instant is noted (so
    // the content noted is the content at that instant).
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (c, gate, stop) = (cluster.client("app").await, gate.clone(), stop.clone());
        tokio::spawn(async move {
            let mut step = 10;
            while !stop.load(Ordering::SeqCst) && step < 900 {
                {
                    let _held = gate.lock().await;
                    workload_step(&c, step).await;
                }
                step += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            step - 10
        })
    };
    let note = |label: &'static str| {
        let (src, gate) = (&src, gate.clone());
        async move {
            let _held = gate.lock().await;
            let at: (String, ContentSnapshot) =
                (server_now(src).await, snapshot_content(src).await);
            eprintln!("instant {label}: {}", at.0);
            at
        }
    };

    let mut instants = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    instants.push(note("before the rotation").await);
    let before_rotation = header_keys(&folder_objects(&repo));

    let second = add_key(&keyring);
    tokio::time::sleep(Duration::from_secs(3)).await;
    instants.push(note("between the rotation and the rekey").await);

    let (code, summary, text) = rekey(&env, &url);
    assert_eq!(code, 0, "{text}");
    assert!(summary["rewrapped"].as_u64().unwrap() > 0, "{summary}");
    let first_arg = first.to_string();
    let (code, out, err) = tidemark(&[
        "keys",
        "retire",
        "--keyring",
        &keyring,
        "--repo",
        &url,
        "--settle",
        "2s",
        &first_arg,
    ]);
    assert_eq!(code, 0, "retire beside the archiver: {out}{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    archiver.assert_running();
    stop.store(true, Ordering::SeqCst);
    let steps = load.await.unwrap();
    assert!(steps > 10, "the load barely ran: {steps} steps");
    // The last instant, then a commit the archive stores after it.
    instants.push(note("latest").await);
    wait_archived(&src, "tidemark", &archiver.log).await;
    let log = archiver.log_text();
    archiver.stop();

    // The archiver took the new key from its next segment (it read the keyring file again),
    // so objects it wrote meanwhile need no sidecar; everything else has one.
    assert!(
        log.contains("new objects are encrypted with a new key")
            && log.contains(&second.to_string()),
        "the archiver did not say it took the new key:\n{log}"
    );
    let objects = folder_objects(&repo);
    let now = header_keys(&objects);
    let written_after: Vec<&String> = now
        .keys()
        .filter(|k| k.starts_with("segments/") && !before_rotation.contains_key(*k))
        .collect();
    assert!(
        written_after.iter().filter(|k| now[**k] == second).count() > 1,
        "segments written after the rotation are under the new key: {written_after:?}"
    );
    all_under(&objects, &second);
    restore_each_instant(&cluster, &url, &env, &instants, "live_rekeyed").await;
    let records = rekey_records(&env, &url);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["details"]["rewrapped"], summary["rewrapped"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_sealed_before_the_rotation_and_stored_after_retire_is_sealed_again() {
    let keys = tempfile::tempdir().unwrap();
    let (keyring, first) = new_keyring(keys.path());
    let s3 = ProxiedS3::start("retired", Mode::Pass);
    let key_env = ("TIDEMARK_ENCRYPTION_KEY_FILE", keyring.clone());
    // The archiver reaches S3 through the proxy; rekey and retire (another host) directly.
    let mut env = s3.cli_env();
    env.push(key_env.clone());
    let mut direct = s3.server.cli_env(&s3.server.endpoint);
    direct.push(key_env);
    let Archiving {
        cluster,
        src,
        mut archiver,
        url,
        ..
    } = Archiving::builder()
        .repo_url("s3://retired/app")
        .env(&env)
        .start()
        .await;
    let mut instants = Vec::new();
    workload_step(&src, 2).await;
    instants.push((server_now(&src).await, snapshot_content(&src).await));
    wait_archived(&src, "tidemark", &archiver.log).await;

    // The archiver cannot reach S3: it seals the next changes with the first key and retries.
    s3.proxy.set_mode(Mode::Down);
    workload_step(&src, 3).await;
    instants.push((server_now(&src).await, snapshot_content(&src).await));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Meanwhile a new key, a rekey and the first key's retirement, all from elsewhere. Retire
    // waits out the archiver's store call in flight (S3's retries last at most 30 s); the
    // archiver's next attempt sees the key gone and does not store the segment.
    let second = add_key(&keyring);
    let (code, summary, text) = rekey(&direct, &url);
    assert_eq!(code, 0, "{text}");
    assert!(summary["rewrapped"].as_u64().unwrap() > 0, "{summary}");
    let first_arg = first.to_string();
    let (code, out, err) = tidemark_env(
        &direct,
        &[
            "keys",
            "retire",
            "--keyring",
            &keyring,
            "--repo",
            &url,
            "--settle",
            "40s",
            &first_arg,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    archiver.assert_running();

    // S3 back: the segment of the first key is not stored; its changes are sealed again.
    s3.proxy.set_mode(Mode::Pass);
    workload_step(&src, 4).await;
    instants.push((server_now(&src).await, snapshot_content(&src).await));
    wait_archived(&src, "tidemark", &archiver.log).await;
    archiver.assert_running();
    let log = archiver.log_text();
    archiver.stop();
    assert!(
        log.contains(&format!(
            "was sealed with key {first}, which the keyring no longer holds"
        )),
        "the archiver did not refuse the segment of the retired key:\n{log}"
    );
    let stored: BTreeMap<String, Vec<u8>> = s3
        .server
        .objects("retired")
        .into_iter()
        .filter_map(|(k, b)| Some((k.strip_prefix("app/")?.to_string(), b)))
        .collect();
    all_under(&stored, &second);
    restore_each_instant(&cluster, &url, &env, &instants, "resealed").await;
}
