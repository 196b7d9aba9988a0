//! Segment format throughput and size: how fast the archiver's writer can frame, checksum and
//! compress records, how fast a restore can read them back, and how many bytes a transaction
//! takes, on generated pgbench-like pgoutput payloads.
//!
//! `cargo bench --bench segment` runs the full sizes; under `cargo test --all-targets` (no
//! `--bench` argument) it runs a tiny smoke version so the harness cannot rot.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use tidemark::lsn::{Lsn, PgTimestamp};
use tidemark::segment::{CommitEntry, Record, Segment, SegmentBuilder};

/// A small deterministic generator (xorshift64*), so every run sees the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
}

/// State the generated workload keeps, like pgbench's database at scale 50.
struct Bench {
    rng: Rng,
    lsn: u64,
    time: i64,
    xid: u32,
    tellers: Vec<i64>,
    branches: Vec<i64>,
}

fn text_columns(b: &mut BytesMut, cols: &[Option<String>]) {
    b.put_u16(cols.len() as u16);
    for c in cols {
        match c {
            None => b.put_u8(b'n'),
            Some(v) => {
                b.put_u8(b't');
                b.put_u32(v.len() as u32);
                b.put_slice(v.as_bytes());
            }
        }
    }
}

/// A pgbench TPC-B transaction as pgoutput sends it: Begin, Updates of an account, a teller
/// and a branch, an Insert into the history, Commit; random keys and deltas, cumulative teller
/// and branch balances, WAL positions and times advancing irregularly.
fn transaction(w: &mut Bench) -> (Vec<Record>, CommitEntry) {
    let (aid, tid) = (w.rng.range(1, 5_000_000), w.rng.range(1, 500));
    let (bid, delta) = ((tid - 1) / 10 + 1, w.rng.range(-5000, 5000));
    w.xid += 1 + (w.rng.next() % 4) as u32;
    w.time += w.rng.range(200, 1500);
    let first_lsn = w.lsn + w.rng.range(0, 2000) as u64;
    let mut recs = Vec::new();
    let mut lsn = first_lsn;
    let mut server_time = w.time + w.rng.range(100, 400);
    let mut push = |payload: Bytes, lsn: u64, rng: &mut Rng| {
        server_time += rng.range(2, 8);
        recs.push(Record {
            lsn: Lsn(lsn),
            server_time: PgTimestamp(server_time),
            payload,
        });
    };
    let commit_lsn = first_lsn + w.rng.range(700, 1100) as u64;
    let end_lsn = commit_lsn + 48;
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(commit_lsn);
    b.put_i64(w.time);
    b.put_u32(w.xid);
    push(b.freeze(), lsn, &mut w.rng);
    let t = &mut w.tellers[tid as usize - 1];
    *t += delta;
    let t = *t;
    let br = &mut w.branches[bid as usize - 1];
    *br += delta;
    let br = *br;
    let updates: [(u32, Vec<Option<String>>); 3] = [
        (
            16390,
            vec![
                Some(aid.to_string()),
                Some(((aid - 1) / 100_000 + 1).to_string()),
                Some(w.rng.range(-20_000, 20_000).to_string()),
                Some(" ".repeat(84)),
            ],
        ),
        (
            16387,
            vec![
                Some(tid.to_string()),
                Some(bid.to_string()),
                Some(t.to_string()),
                None,
            ],
        ),
        (
            16393,
            vec![Some(bid.to_string()), Some(br.to_string()), None],
        ),
    ];
    for (rel, cols) in updates {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(rel);
        b.put_u8(b'N');
        text_columns(&mut b, &cols);
        push(b.freeze(), lsn, &mut w.rng);
        lsn += w.rng.range(80, 760) as u64;
    }
    let micros = w.time.rem_euclid(60_000_000);
    let mtime = format!(
        "2026-11-28 12:00:{:02}.{:06}",
        micros / 1_000_000,
        micros % 1_000_000
    );
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    text_columns(
        &mut b,
        &[
            Some(tid.to_string()),
            Some(bid.to_string()),
            Some(aid.to_string()),
            Some(delta.to_string()),
            Some(mtime),
            None,
        ],
    );
    push(b.freeze(), lsn, &mut w.rng);
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(commit_lsn);
    b.put_u64(end_lsn);
    b.put_i64(w.time);
    push(b.freeze(), end_lsn, &mut w.rng);
    w.lsn = end_lsn;
    let entry = CommitEntry {
        commit_lsn: Lsn(commit_lsn),
        end_lsn: Lsn(end_lsn),
        xid: w.xid,
        commit_time: PgTimestamp(w.time),
        first_record: 0,
    };
    (recs, entry)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let txns: u64 = if full { 200_000 } else { 2_000 };
    let runs = if full { 5 } else { 1 };
    let mut w = Bench {
        rng: Rng(0x9E37_79B9_7F4A_7C15),
        lsn: 0x1000_0000,
        time: 849_226_070_000_000,
        xid: 1000,
        tellers: vec![0; 500],
        branches: vec![0; 50],
    };
    let data: Vec<_> = (0..txns).map(|_| transaction(&mut w)).collect();
    let lsn = w.lsn;
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
