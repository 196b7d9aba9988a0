use std::io::Write;

use bytes::Bytes;

use super::*;
use crate::catalog::keys;
use crate::catalog::manifest::{PartEntry, SchemaEntry};
use crate::segment::{CommitEntry, Record, SegmentBuilder};
use crate::store::LocalStore;

fn seg(g: u32, s: u64, e: u64) -> SegmentRef {
    SegmentRef {
        generation: g,
        start: Lsn(s),
        end: Lsn(e),
        key: keys::segment(g, Lsn(s), Lsn(e)),
        size: 1,
    }
}

#[test]
fn the_chain_names_both_segments_around_a_gap_or_an_overlap() {
    let chain = [
        seg(1, 0x100, 0x200),
        seg(1, 0x300, 0x400),
        seg(1, 0x380, 0x500),
    ];
    let found = chain_findings(&chain, None);
    assert_eq!(found.len(), 2, "{found:?}");
    let text = found[0].to_string();
    assert!(
        text.contains("0/200 to 0/300")
            && text.contains(&chain[0].key)
            && text.contains(&chain[1].key),
        "{text}"
    );
    assert!(
        matches!(&found[1], Finding::Overlap { prev, next, .. } if *prev == chain[1].key && *next == chain[2].key)
    );
    // --from's reach: a gap ending before the first needed position is not reported.
    assert_eq!(chain_findings(&chain, Some(Lsn(0x300))).len(), 1);
    assert!(chain_findings(&chain[..1], None).is_empty());
}

fn backup(id: &str, cp: u64, t: i64) -> BackupRef {
    BackupRef {
        id: id.into(),
        generation: 1,
        consistent_point: Lsn(cp),
        snapshot_time: PgTimestamp(t),
    }
}

#[test]
fn from_needs_the_newest_backup_before_it_and_everything_after() {
    let segments = vec![
        seg(1, 0x100, 0x200),
        seg(1, 0x200, 0x300),
        seg(1, 0x300, 0x400),
    ];
    let w = Window {
        generation: 1,
        backups: vec![backup("a", 0x100, 1000), backup("b", 0x250, 2500)],
        segments: segments.clone(),
        start_lsn: Lsn(0x100),
        end_lsn: Lsn(0x400),
        earliest: PgTimestamp(1000),
        latest_commit: Some(PgTimestamp(4000)),
        ends: catalog::WindowEnd::Tip,
        unread: None,
    };
    let ids = |from| {
        window_needs(&w, PgTimestamp(from))
            .map(|(b, s)| (b.iter().map(|b| b.id.clone()).collect::<Vec<_>>(), s.len()))
    };
    assert_eq!(ids(0), Some((vec!["a".into(), "b".into()], 3)));
    assert_eq!(ids(1500), Some((vec!["a".into(), "b".into()], 3)));
    assert_eq!(
        ids(3000),
        Some((vec!["b".into()], 2)),
        "from b's position on"
    );
    assert_eq!(
        ids(4000),
        None,
        "no instant of the window is at or after it"
    );
}

/// A segment of generation 1 from `start` to `end` with one commit at `t`.
fn segment_bytes(start: u64, end: u64, t: i64) -> Bytes {
    let mut b = SegmentBuilder::new(1, 1, 1, "app", "tidemark", Lsn(start));
    for i in 0..200u64 {
        b.push(&Record {
            lsn: Lsn(start + i),
            server_time: PgTimestamp(t),
            payload: Bytes::from(format!("M{:x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).repeat(8)),
        });
    }
    b.commit(CommitEntry {
        commit_lsn: Lsn(start + 100),
        end_lsn: Lsn(start + 110),
        xid: 7,
        commit_time: PgTimestamp(t),
        first_record: 0,
    });
    b.finish(Lsn(end), PgTimestamp(t))
}

/// A repository with a backup at 0x100 (one part) and three segments after it.
async fn repository() -> (tempfile::TempDir, Arc<dyn Store>, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
    for (i, (s, e)) in [(0x100, 0x200), (0x200, 0x300), (0x300, 0x400)]
        .into_iter()
        .enumerate()
    {
        let bytes = segment_bytes(s, e, 2000 + 1000 * i as i64);
        store
            .put(&keys::segment(1, Lsn(s), Lsn(e)), bytes)
            .await
            .unwrap();
    }
    let id = keys::backup_id(1, Lsn(0x100));
    let raw = b"1\tone\n".repeat(500);
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::new());
    enc.write_all(&raw).unwrap();
    let part = enc.finish().unwrap();
    let dump = b"a schema dump".to_vec();
    let mut m = crate::catalog::manifest::tests::sample();
    m.id = id.clone();
    m.generation = 1;
    m.consistent_point = Lsn(0x100);
    m.snapshot_time = PgTimestamp(1000);
    m.schema = SchemaEntry {
        key: keys::schema(&id),
        bytes: dump.len() as u64,
        crc32: crc32fast::hash(&dump),
    };
    m.tables[0].rows = 500;
    m.tables[0].raw_bytes = raw.len() as u64;
    m.tables[0].stored_bytes = part.len() as u64;
    m.tables[0].parts = vec![PartEntry {
        key: keys::part(&id, 0, 0),
        rows: 500,
        raw_bytes: raw.len() as u64,
        stored_bytes: part.len() as u64,
        crc32: crc32fast::hash(&part),
    }];
    store.put(&m.schema.key, Bytes::from(dump)).await.unwrap();
    store
        .put(&m.tables[0].parts[0].key, Bytes::from(part))
        .await
        .unwrap();
    store.put(&m.key(), Bytes::from(m.to_json())).await.unwrap();
    (dir, store, m)
}

/// `verify --quick` of `store`.
async fn verify_quick(store: &Arc<dyn Store>) -> VerifyReport {
    verify(
        store,
        &VerifyOptions {
            quick: true,
            ..VerifyOptions::default()
        },
    )
    .await
    .unwrap()
}

fn kinds(r: &VerifyReport) -> Vec<&'static str> {
    r.problems
        .iter()
        .map(|p| match p.finding {
            Finding::Gap { .. } => "gap",
            Finding::Overlap { .. } => "overlap",
            Finding::DamagedSegment { .. } => "damaged_segment",
            Finding::DamagedManifest { .. } => "damaged_manifest",
            Finding::MissingObject { .. } => "missing_object",
            Finding::DamagedObject { .. } => "damaged_object",
            Finding::DamagedIdentity { .. } => "damaged_identity",
            Finding::Unreachable { .. } => "unreachable",
            Finding::BrokenWindow { .. } => "broken_window",
            Finding::BrokenPoint { .. } => "broken_point",
        })
        .collect()
}

#[tokio::test]
async fn a_sound_repository_verifies_and_every_object_is_read() {
    let (_dir, store, _) = repository().await;
    let r = verify(&store, &VerifyOptions::default()).await.unwrap();
    assert!(r.ok, "{}", describe(&r));
    assert_eq!(
        (
            r.checked.segments,
            r.checked.backups,
            r.checked.backup_objects
        ),
        (3, 1, 2)
    );
    assert!(r.checked.bytes_read >= r.checked.segment_bytes + r.checked.backup_bytes);
    assert_eq!(r.windows.len(), 1);
    assert!(r.windows[0].restorable && r.windows[0].checked);
    let quick = verify_quick(&store).await;
    assert!(
        quick.ok && quick.checked.bytes_read == 0,
        "{}",
        describe(&quick)
    );
}

#[tokio::test]
async fn damage_in_the_middle_of_a_window_is_named_and_quick_does_not_read_it() {
    let (dir, store, m) = repository().await;
    // A flipped byte in the middle segment: list reads only the last one and claims the window.
    let middle = keys::segment(1, Lsn(0x200), Lsn(0x300));
    let path = dir.path().join(&middle);
    let mut bytes = std::fs::read(&path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let r = verify(&store, &VerifyOptions::default()).await.unwrap();
    assert_eq!(
        kinds(&r),
        ["damaged_segment", "broken_window"],
        "{}",
        describe(&r)
    );
    let text = describe(&r);
    assert!(
        text.contains(&middle) && text.contains("0/200-0/300"),
        "{text}"
    );
    assert!(!r.windows[0].restorable);
    let quick = verify_quick(&store).await;
    assert!(quick.ok, "--quick reads no segment: {}", describe(&quick));
    // --from after the damaged segment's commit: a restore to those instants still replays
    // it (the window's only backup lies before it).
    let from = verify(
        &store,
        &VerifyOptions {
            from: Some(PgTimestamp(3500)),
            ..VerifyOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(!from.ok, "{}", describe(&from));

    // A part deleted and the schema dump truncated: each named with its backup.
    std::fs::remove_file(dir.path().join(&m.tables[0].parts[0].key)).unwrap();
    let schema = dir.path().join(&m.schema.key);
    std::fs::write(&schema, b"a schema").unwrap();
    let r = verify_quick(&store).await;
    assert_eq!(
        kinds(&r),
        ["missing_object", "broken_window"],
        "{}",
        describe(&r)
    );
    assert!(
        r.problems[0].text.contains(&m.tables[0].parts[0].key)
            && r.problems[0].text.contains(&m.id)
    );
    let r = verify(&store, &VerifyOptions::default()).await.unwrap();
    let text = describe(&r);
    assert!(
        kinds(&r).contains(&"damaged_object") && text.contains(&m.schema.key),
        "{text}"
    );
}

#[tokio::test]
async fn a_missing_segment_is_a_gap_named_by_its_neighbours() {
    let (dir, store, _) = repository().await;
    let middle = keys::segment(1, Lsn(0x200), Lsn(0x300));
    std::fs::remove_file(dir.path().join(&middle)).unwrap();
    for quick in [false, true] {
        let r = verify(
            &store,
            &VerifyOptions {
                quick,
                ..VerifyOptions::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(kinds(&r), ["gap", "unreachable"], "{}", describe(&r));
        assert!(
            r.problems[0].text.contains("0/200 to 0/300"),
            "{}",
            r.problems[0].text
        );
    }
}
