//! Segment format throughput: how fast the archiver's writer can frame, checksum and compress
//! records, and how fast a restore can read them back, on pgoutput-like payloads.
//!
//! `cargo bench --bench segment` runs the full sizes; under `cargo test --all-targets` (no
//! `--bench` argument) it runs a tiny smoke version so the harness cannot rot.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tidemark::lsn::{Lsn, PgTimestamp};
use tidemark::segment::{CommitEntry, Record, Segment, SegmentBuilder};

/// A pgbench-like TPC-B transaction: Begin, three Updates and an Insert, Commit.
fn transaction(i: u64, lsn: &mut u64) -> (Vec<Record>, CommitEntry) {
    let mut recs = Vec::new();
    let mut push = |payload: Bytes, lsn: &mut u64| {
        recs.push(Record {
            lsn: Lsn(*lsn),
            server_time: PgTimestamp(i as i64 * 1000),
            payload,
        });
        *lsn += 120;
    };
    let begin_lsn = *lsn;
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(begin_lsn + 600);
    b.put_i64(i as i64 * 1000);
    b.put_u32(i as u32);
    push(b.freeze(), lsn);
    for (rel, cols) in [(16390u32, 4), (16387, 3), (16384, 3)] {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(rel);
        b.put_u8(b'N');
        b.put_u16(cols);
        for c in 0..cols {
            let v = format!("{}", i * 7 + c as u64 * 13);
            b.put_u8(b't');
            b.put_u32(v.len() as u32);
            b.put_slice(v.as_bytes());
        }
        push(b.freeze(), lsn);
    }
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16393);
    b.put_u8(b'N');
    b.put_u16(5);
    for v in [
        i.to_string(),
        "1".into(),
        (i % 100_000).to_string(),
        "-2345".into(),
        "2026-11-28 12:00:00.123456+00".into(),
    ] {
        b.put_u8(b't');
        b.put_u32(v.len() as u32);
        b.put_slice(v.as_bytes());
    }
    push(b.freeze(), lsn);
    let commit_lsn = *lsn;
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(commit_lsn);
    b.put_u64(commit_lsn + 56);
    b.put_i64(i as i64 * 1000);
    push(b.freeze(), lsn);
    let entry = CommitEntry {
        commit_lsn: Lsn(commit_lsn),
        end_lsn: Lsn(commit_lsn + 56),
        xid: i as u32,
        commit_time: PgTimestamp(i as i64 * 1000),
        first_record: 0,
    };
    (recs, entry)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let txns: u64 = if full { 200_000 } else { 2_000 };
    let runs = if full { 5 } else { 1 };
    let mut lsn = 0x1000_0000u64;
    let data: Vec<_> = (0..txns).map(|i| transaction(i, &mut lsn)).collect();
    let payload_bytes: usize = data
        .iter()
        .flat_map(|(r, _)| r.iter())
        .map(|r| r.payload.len())
        .sum();

    let mb = payload_bytes as f64 / 1e6;
    println!(
        "segment benchmark ({} transactions, {} records, {:.1} MB of pgoutput payload, best of {runs})",
        txns,
        txns * 6,
        mb
    );
    println!("| format | write | read (verify + decompress + iterate) | stored B/txn |");
    println!("|---|---|---|---|");
    for (label, version, level) in [
        ("v1 (lz4)", 1, 0),
        ("v2 (zstd -1)", 2, 1),
        ("v3 (columns, zstd -1)", 3, 1),
        ("v3 (columns, zstd -3, default)", 3, 3),
    ] {
        // Best of `runs`: the machine may be shared, and the best run is the least disturbed.
        let (mut write, mut read) = (Duration::MAX, Duration::MAX);
        let mut stored = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let mut builder = SegmentBuilder::new(1, 1, 1, "bench", "tidemark", Lsn(0x1000_0000))
                .with_format_version(version)
                .with_zstd_level(level);
            for (recs, entry) in &data {
                let first = builder.record_count() as u32;
                for r in recs {
                    builder.push(r);
                }
                builder.commit(CommitEntry {
                    first_record: first,
                    ..*entry
                });
            }
            let file = builder.finish(Lsn(lsn), PgTimestamp(0));
            write = write.min(t.elapsed());

            let t = Instant::now();
            let seg = Segment::parse(file.clone()).expect("parse");
            let mut n = 0u64;
            for r in seg.records() {
                r.expect("record");
                n += 1;
            }
            read = read.min(t.elapsed());
            assert_eq!(n, txns * 6);
            assert_eq!(seg.commits.len() as u64, txns);
            assert_eq!(seg.format_version(), version);
            stored = file.len();
        }

        println!(
            "| {label} | {:.0} MB/s, {:.0} k txn/s | {:.0} MB/s, {:.0} k txn/s | {:.1} B (payload {:.1} B) |",
            mb / write.as_secs_f64(),
            txns as f64 / write.as_secs_f64() / 1e3,
            mb / read.as_secs_f64(),
            txns as f64 / read.as_secs_f64() / 1e3,
            stored as f64 / txns as f64,
            payload_bytes as f64 / txns as f64
        );
    }
}
