//! Tests of the segment format, on one set of fixtures: realistic pgoutput messages and the
//! [`Fixture`]s built from them (every expectation comes from the builder's input, not from
//! decoding). The tests themselves are grouped by what they check: `round_trip` (what is
//! written reads back, in every version), `damage` (every change to a file is an error naming
//! what is wrong), `vectors` (the checked-in files of `proto/vectors/`) and `properties`
//! (property tests over arbitrary fixtures and bytes); `forge` makes files whose checksums are
//! valid but whose contents break a rule.

use super::codec::*;
use super::commit_index::*;
use super::layout::*;
use super::read::*;
use super::varint::*;
use super::write::*;
use super::*;

mod damage;
mod forge;
mod properties;
mod round_trip;
mod vectors;

fn object_name(generation: u32, start: Lsn, end: Lsn) -> String {
    crate::catalog::keys::segment(generation, start, end)
}

fn parse_object_name(name: &str) -> Option<(u32, Lsn, Lsn)> {
    crate::catalog::keys::parse_segment(name).map(|k| (k.generation, k.start, k.end))
}

// ---- realistic pgoutput messages (protocol version 1, big-endian) ----

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// `B`: final (commit) LSN, commit time, xid.
fn begin(final_lsn: Lsn, commit_time: PgTimestamp, xid: u32) -> Bytes {
    let mut m = vec![b'B'];
    m.extend_from_slice(&final_lsn.0.to_be_bytes());
    m.extend_from_slice(&commit_time.0.to_be_bytes());
    m.extend_from_slice(&xid.to_be_bytes());
    m.into()
}

/// `C`: flags, commit LSN, end LSN, commit time.
fn commit(commit_lsn: Lsn, end_lsn: Lsn, commit_time: PgTimestamp) -> Bytes {
    let mut m = vec![b'C', 0];
    m.extend_from_slice(&commit_lsn.0.to_be_bytes());
    m.extend_from_slice(&end_lsn.0.to_be_bytes());
    m.extend_from_slice(&commit_time.0.to_be_bytes());
    m.into()
}

const ORDERS: u32 = 16385;

/// `R` for `public.orders (id int4 key, customer text, note text)`.
fn relation_orders() -> Bytes {
    let mut m = vec![b'R'];
    m.extend_from_slice(&ORDERS.to_be_bytes());
    cstr(&mut m, "public");
    cstr(&mut m, "orders");
    m.push(b'd');
    m.extend_from_slice(&3i16.to_be_bytes());
    for (flags, name, oid) in [(1u8, "id", 23u32), (0, "customer", 25), (0, "note", 25)] {
        m.push(flags);
        cstr(&mut m, name);
        m.extend_from_slice(&oid.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
    }
    m.into()
}

fn tuple(m: &mut Vec<u8>, cols: &[Option<&str>]) {
    m.extend_from_slice(&(cols.len() as i16).to_be_bytes());
    for c in cols {
        match c {
            Some(text) => {
                m.push(b't');
                m.extend_from_slice(&(text.len() as i32).to_be_bytes());
                m.extend_from_slice(text.as_bytes());
            }
            None => m.push(b'n'),
        }
    }
}

/// `I`: relation id, `N`, new tuple in text format.
fn insert(relid: u32, cols: &[Option<&str>]) -> Bytes {
    let mut m = vec![b'I'];
    m.extend_from_slice(&relid.to_be_bytes());
    m.push(b'N');
    tuple(&mut m, cols);
    m.into()
}

/// `U`: relation id, `N`, new tuple.
fn update(relid: u32, cols: &[Option<&str>]) -> Bytes {
    let mut m = vec![b'U'];
    m.extend_from_slice(&relid.to_be_bytes());
    m.push(b'N');
    tuple(&mut m, cols);
    m.into()
}

/// `D`: relation id, `K`, key tuple.
fn delete(relid: u32, key: &[Option<&str>]) -> Bytes {
    let mut m = vec![b'D'];
    m.extend_from_slice(&relid.to_be_bytes());
    m.push(b'K');
    tuple(&mut m, key);
    m.into()
}

// ---- fixtures ----

/// 2025-01-15 10:30:00 UTC.
const T0: i64 = 790_252_200_000_000;
const SYSTEM_ID: u64 = 7_345_290_987_201_234_567;

/// Everything a builder is given, so expectations come from the input, not from decoding.
#[derive(Clone, Debug)]
struct Fixture {
    system_id: u64,
    timeline: u32,
    generation: u32,
    database: String,
    slot: String,
    start_lsn: Lsn,
    end_lsn: Lsn,
    created_at: PgTimestamp,
    last_server_time: PgTimestamp,
    block_size: usize,
    flags: u16,
    version: u16,
    records: Vec<Record>,
    commits: Vec<CommitEntry>,
}

impl Fixture {
    fn new(start_lsn: Lsn) -> Fixture {
        Fixture {
            system_id: SYSTEM_ID,
            timeline: 1,
            generation: 1,
            database: "shop".into(),
            slot: "tidemark_shop".into(),
            start_lsn,
            end_lsn: start_lsn,
            created_at: PgTimestamp(T0),
            last_server_time: PgTimestamp(T0),
            block_size: DEFAULT_BLOCK_SIZE,
            flags: 0,
            version: FORMAT_VERSION,
            records: Vec::new(),
            commits: Vec::new(),
        }
    }

    /// Appends one transaction as walsender sends it: Begin at `first_lsn`, each change
    /// at its own LSN, Commit at the end LSN.
    fn txn(&mut self, xid: u32, first_lsn: u64, changes: Vec<(u64, Bytes)>, commit_lsn: u64) {
        let commit_lsn = Lsn(commit_lsn);
        let end_lsn = Lsn(commit_lsn.0 + 0x30);
        let commit_time = PgTimestamp(self.last_server_time.0 + 1_250);
        let first_record = self.records.len() as u32;
        let mut sent = self.last_server_time.0;
        let mut push = |records: &mut Vec<Record>, lsn: u64, payload: Bytes| {
            sent += 37;
            records.push(Record {
                lsn: Lsn(lsn),
                server_time: PgTimestamp(sent),
                payload,
            });
        };
        push(
            &mut self.records,
            first_lsn,
            begin(commit_lsn, commit_time, xid),
        );
        for (lsn, payload) in changes {
            push(&mut self.records, lsn, payload);
        }
        push(
            &mut self.records,
            end_lsn.0,
            commit(commit_lsn, end_lsn, commit_time),
        );
        self.last_server_time = PgTimestamp(sent);
        self.end_lsn = end_lsn;
        self.commits.push(CommitEntry {
            commit_lsn,
            end_lsn,
            xid,
            commit_time,
            first_record,
        });
    }

    fn encode(&self) -> Bytes {
        let mut b = SegmentBuilder::new(
            self.system_id,
            self.timeline,
            self.generation,
            &self.database,
            &self.slot,
            self.start_lsn,
        )
        .with_format_version(self.version)
        .with_block_size(self.block_size)
        .with_created_at(self.created_at);
        if self.flags & FLAG_STREAMED != 0 {
            b.mark_streamed();
        }
        let mut commits = self.commits.iter().peekable();
        for (i, r) in self.records.iter().enumerate() {
            b.push(r);
            // Record each commit right after its transaction's last record.
            while let Some(c) = commits.next_if(|c| {
                c.first_record as usize <= i
                    && self
                        .records
                        .get(i + 1)
                        .is_none_or(|n| n.payload.first() == Some(&b'B'))
            }) {
                b.commit(*c);
            }
        }
        for c in commits {
            b.commit(*c);
        }
        assert_eq!(b.record_count(), self.records.len() as u64);
        b.finish(self.end_lsn, self.last_server_time)
    }

    fn info(&self) -> SegmentInfo {
        SegmentInfo {
            system_id: self.system_id,
            timeline: self.timeline,
            generation: self.generation,
            database: self.database.clone(),
            slot: self.slot.clone(),
            start_lsn: self.start_lsn,
            end_lsn: self.end_lsn,
            last_server_time: self.last_server_time,
            record_count: self.records.len() as u64,
            created_at: self.created_at,
            flags: self.flags,
        }
    }
}

fn empty_fixture() -> Fixture {
    let mut f = Fixture::new(Lsn(0x16B_3800));
    f.end_lsn = Lsn(0x16B_3900);
    f.last_server_time = PgTimestamp(T0 + 10_000_000);
    f
}

fn one_transaction_fixture() -> Fixture {
    let mut f = Fixture::new(Lsn(0x16B_3700));
    f.txn(
        750,
        0x16B_3748,
        vec![
            (0x16B_3748, relation_orders()),
            (0x16B_3748, insert(ORDERS, &[Some("1"), Some("ada"), None])),
        ],
        0x16B_37D0,
    );
    f
}

fn multi_block_fixture() -> Fixture {
    let mut f = Fixture::new(Lsn(0x1_0000_0000));
    f.generation = 2;
    f.timeline = 3;
    f.block_size = 256;
    let mut lsn = 0x1_0000_0028u64;
    let mut id = 1;
    for xid in 900..905u32 {
        let first = lsn;
        let mut changes = Vec::new();
        if xid == 900 {
            changes.push((lsn, relation_orders()));
        }
        for _ in 0..4 {
            let idt = id.to_string();
            let note = format!("order {id}: two widgets, deliver to the back door");
            changes.push((
                lsn,
                insert(ORDERS, &[Some(&idt), Some("grace"), Some(&note)]),
            ));
            lsn += 0x58;
            id += 1;
        }
        if xid == 902 {
            // A record larger than the block size gets a block of its own.
            let big = "lorem ipsum dolor sit amet ".repeat(30);
            changes.push((lsn, update(ORDERS, &[Some("3"), Some("grace"), Some(&big)])));
            lsn += 0x400;
        }
        if xid == 904 {
            changes.push((lsn, delete(ORDERS, &[Some("1"), None, None])));
            lsn += 0x40;
        }
        f.txn(xid, first, changes, lsn);
        lsn += 0x60;
    }
    f
}

/// `S`: xid, first-segment flag.
fn stream_start(xid: u32, first: bool) -> Bytes {
    let mut m = vec![b'S'];
    m.extend_from_slice(&xid.to_be_bytes());
    m.push(u8::from(first));
    m.into()
}

/// `I` inside a stream: xid, relation id, `N`, new tuple.
fn stream_insert(xid: u32, relid: u32, cols: &[Option<&str>]) -> Bytes {
    let mut m = vec![b'I'];
    m.extend_from_slice(&xid.to_be_bytes());
    m.extend_from_slice(&relid.to_be_bytes());
    m.push(b'N');
    tuple(&mut m, cols);
    m.into()
}

/// `c`: xid, flags, commit LSN, end LSN, commit time.
fn stream_commit(xid: u32, commit_lsn: Lsn, end_lsn: Lsn, t: PgTimestamp) -> Bytes {
    let mut m = vec![b'c'];
    m.extend_from_slice(&xid.to_be_bytes());
    m.push(0);
    m.extend_from_slice(&commit_lsn.0.to_be_bytes());
    m.extend_from_slice(&end_lsn.0.to_be_bytes());
    m.extend_from_slice(&t.0.to_be_bytes());
    m.into()
}

/// `A`: xid, subtransaction xid.
fn stream_abort(xid: u32, subxid: u32) -> Bytes {
    let mut m = vec![b'A'];
    m.extend_from_slice(&xid.to_be_bytes());
    m.extend_from_slice(&subxid.to_be_bytes());
    m.into()
}

/// A streamed transaction (xid 800, two chunks, a rolled-back subtransaction 801) with a
/// small transaction (xid 802) committed between its chunks, then its Stream Commit.
fn streamed_fixture() -> Fixture {
    let mut f = Fixture::new(Lsn(0x200_0000));
    f.flags = FLAG_STREAMED;
    let push = |f: &mut Fixture, lsn: u64, payload: Bytes| {
        let sent = f.last_server_time.0 + 37;
        f.records.push(Record {
            lsn: Lsn(lsn),
            server_time: PgTimestamp(sent),
            payload,
        });
        f.last_server_time = PgTimestamp(sent);
    };
    push(&mut f, 0x200_0028, stream_start(800, true));
    let mut rel = relation_orders().to_vec();
    rel.splice(1..1, 800u32.to_be_bytes());
    push(&mut f, 0x200_0028, rel.into());
    push(
        &mut f,
        0x200_0028,
        stream_insert(800, ORDERS, &[Some("1"), Some("ada"), None]),
    );
    push(
        &mut f,
        0x200_0080,
        stream_insert(801, ORDERS, &[Some("2"), Some("bob"), None]),
    );
    push(&mut f, 0x200_0080, Bytes::from_static(b"E"));
    push(&mut f, 0x200_00C0, stream_abort(800, 801));
    f.txn(
        802,
        0x200_0100,
        vec![(0x200_0100, insert(ORDERS, &[Some("3"), Some("cy"), None]))],
        0x200_0150,
    );
    push(&mut f, 0x200_0200, stream_start(800, false));
    push(
        &mut f,
        0x200_0200,
        stream_insert(800, ORDERS, &[Some("4"), Some("di"), None]),
    );
    push(&mut f, 0x200_0200, Bytes::from_static(b"E"));
    let (commit_lsn, end_lsn) = (Lsn(0x200_0280), Lsn(0x200_02B0));
    let t = PgTimestamp(f.last_server_time.0 + 1_250);
    let first_record = f.records.len() as u32;
    push(
        &mut f,
        end_lsn.0,
        stream_commit(800, commit_lsn, end_lsn, t),
    );
    f.commits.push(CommitEntry {
        commit_lsn,
        end_lsn,
        xid: 800,
        commit_time: t,
        first_record,
    });
    f.end_lsn = end_lsn;
    f
}

fn decode_all(bytes: &[u8]) -> Result<(Segment, Vec<Record>), SegmentError> {
    let seg = Segment::parse(Bytes::copy_from_slice(bytes))?;
    let records = seg.records().collect::<Result<Vec<_>, _>>()?;
    Ok((seg, records))
}

fn check_round_trip(f: &Fixture) {
    let bytes = f.encode();
    let (seg, records) = decode_all(&bytes).expect("valid segment");
    assert_eq!(seg.info, f.info());
    assert_eq!(seg.commits, f.commits);
    assert_eq!(records, f.records);
    assert_eq!(read_info(&bytes).unwrap(), (f.info(), f.commits.clone()));
}
