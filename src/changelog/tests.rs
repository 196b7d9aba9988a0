use bytes::BytesMut;
use futures_util::FutureExt;

use super::*;
use crate::segment::{CommitEntry, Record, SegmentBuilder};

/// Records what the reader hands out, and checks the sink's contract as it goes.
#[derive(Default)]
struct Fake {
    events: Vec<String>,
    open: bool,
}

impl Fake {
    fn push(&mut self, e: String) {
        self.events.push(e);
    }
}

impl ReplaySink for Fake {
    type Error = ChangelogError;

    fn begin(&mut self, commit_lsn: Lsn, _: PgTimestamp) {
        assert!(!self.open, "two transactions interleaved");
        self.open = true;
        self.push(format!("begin {:x}", commit_lsn.0));
    }

    fn relation(
        &mut self,
        msg: &Message,
        txn: Option<(Lsn, PgTimestamp)>,
        checked: bool,
    ) -> Result<(), ChangelogError> {
        if let Message::Relation { oid, .. } = msg {
            let at = txn.map_or("-".to_string(), |t| format!("{:x}", t.0 .0));
            self.push(format!("rel {oid} {at} {checked}"));
        }
        Ok(())
    }

    async fn change(&mut self, msg: Message) -> Result<(), ChangelogError> {
        assert!(self.open, "a change outside a transaction");
        match msg {
            Message::Insert { relid, .. } => self.push(format!("ins {relid}")),
            other => self.push(format!("other {:?}", other.tag())),
        }
        Ok(())
    }

    async fn logical_message(&mut self, msg: Message) -> Result<(), ChangelogError> {
        assert!(self.open, "a logical message outside a transaction");
        if let Message::Message { prefix, .. } = msg {
            self.push(format!("msg {prefix}"));
        }
        Ok(())
    }

    async fn commit(&mut self, commit_lsn: Lsn, _: PgTimestamp) -> Result<(), ChangelogError> {
        assert!(self.open, "a commit without begin");
        self.open = false;
        self.push(format!("commit {:x}", commit_lsn.0));
        Ok(())
    }
}

/// A segment `start..start + 0x1000` holding `msgs` (record `i` at `start + i`), with a commit
/// index of its Commits and Stream Commits.
fn seg(start: u64, msgs: &[Message]) -> Segment {
    let mut b = SegmentBuilder::new(1, 1, 1, "db", "slot", Lsn(start));
    let mut begin = 0;
    for (i, m) in msgs.iter().enumerate() {
        let mut out = BytesMut::new();
        pgoutput::encode(m, &mut out);
        b.push(&Record {
            lsn: Lsn(start + i as u64),
            server_time: PgTimestamp(0),
            payload: out.freeze(),
        });
        let entry = |commit_lsn: Lsn, commit_time, xid, first_record| CommitEntry {
            commit_lsn,
            end_lsn: Lsn(commit_lsn.0 + 1),
            xid,
            commit_time,
            first_record,
        };
        match m {
            Message::Begin { .. } => begin = i as u32,
            Message::Commit {
                commit_lsn,
                commit_time,
                ..
            } => b.commit(entry(*commit_lsn, *commit_time, 1, begin)),
            Message::StreamCommit {
                xid,
                commit_lsn,
                commit_time,
                ..
            } => b.commit(entry(*commit_lsn, *commit_time, *xid, i as u32)),
            _ => {}
        }
    }
    Segment::parse(b.finish(Lsn(start + 0x1000), PgTimestamp(0))).unwrap()
}

/// A plain transaction committed at `lsn`, at time `lsn` too, inserting into `relids`.
fn txn(lsn: u64, relids: &[u32]) -> Vec<Message> {
    timed(lsn, lsn as i64, relids)
}

/// A plain transaction committed at `lsn`, at `time`, inserting into `relids`.
fn timed(lsn: u64, time: i64, relids: &[u32]) -> Vec<Message> {
    let mut m = vec![Message::Begin {
        final_lsn: Lsn(lsn),
        commit_time: PgTimestamp(time),
        xid: lsn as u32,
    }];
    m.extend(relids.iter().map(|&r| ins(None, r)));
    m.push(Message::Commit {
        flags: 0,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        commit_time: PgTimestamp(time),
    });
    m
}

fn ins(xid: Option<u32>, relid: u32) -> Message {
    Message::Insert {
        xid,
        relid,
        new: pgoutput::TupleData(vec![]),
    }
}

fn rel(xid: Option<u32>, oid: u32) -> Message {
    Message::Relation {
        xid,
        oid,
        namespace: "public".into(),
        name: format!("t{oid}"),
        replica_identity: b'd',
        columns: vec![],
    }
}

fn logical(xid: Option<u32>, prefix: &str) -> Message {
    Message::Message {
        xid,
        flags: 1,
        lsn: Lsn(0),
        prefix: prefix.into(),
        content: bytes::Bytes::from_static(b"x"),
    }
}

fn start(xid: u32, first_segment: bool) -> Message {
    Message::StreamStart { xid, first_segment }
}

/// A Stream Commit of `xid` at `lsn` (time `lsn`).
fn stream_commit(xid: u32, lsn: u64) -> Message {
    Message::StreamCommit {
        xid,
        flags: 0,
        commit_lsn: Lsn(lsn),
        end_lsn: Lsn(lsn + 1),
        commit_time: PgTimestamp(lsn as i64),
    }
}

fn abort(xid: u32, subxid: u32) -> Message {
    Message::StreamAbort {
        xid,
        subxid,
        abort: None,
    }
}

/// Reads `segs` from `start` to `target`: what the sink got, and whether the target stopped it.
fn read(start: u64, target: Target, segs: Vec<Segment>) -> (Vec<String>, bool) {
    let mut reader = TxnReader::new(Lsn(start), target);
    let mut sink = Fake::default();
    let count = segs.len();
    let mut spool = segs;
    reader
        .read_all(count, &mut spool, &mut sink)
        .now_or_never()
        .expect("an in-memory read never waits")
        .unwrap();
    assert!(!sink.open, "a transaction left open");
    (sink.events, reader.stopped())
}

fn events(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn transactions_come_out_whole_and_in_commit_order() {
    let a = seg(0x1000, &[txn(0x1010, &[1, 2]), txn(0x1020, &[3])].concat());
    let b = seg(0x2000, &txn(0x2010, &[4]));
    let (got, stopped) = read(0x1000, Target::Latest, vec![a, b]);
    assert!(!stopped);
    assert_eq!(
        got,
        events(&[
            "begin 1010",
            "ins 1",
            "ins 2",
            "commit 1010",
            "begin 1020",
            "ins 3",
            "commit 1020",
            "begin 2010",
            "ins 4",
            "commit 2010",
        ])
    );
}

#[test]
fn a_streamed_transaction_is_replayed_at_its_commit_from_the_segments_it_was_written_in() {
    // 7 streams two chunks around a plain transaction that commits first, over two segments,
    // with a Relation message in its first chunk and a logical message in the second.
    let a = seg(
        0x1000,
        &[
            vec![
                start(7, true),
                rel(Some(7), 5),
                ins(Some(7), 5),
                ins(Some(7), 5),
                Message::StreamStop,
            ],
            txn(0x1010, &[1]),
        ]
        .concat(),
    );
    let b = seg(
        0x2000,
        &[
            start(7, false),
            logical(Some(7), "app"),
            ins(Some(7), 6),
            Message::StreamStop,
            stream_commit(7, 0x2010),
        ],
    );
    let (got, _) = read(0x1000, Target::Latest, vec![a, b]);
    assert_eq!(
        got,
        events(&[
            "begin 1010",
            "ins 1",
            "commit 1010",
            "begin 2010",
            "rel 5 2010 true",
            "ins 5",
            "ins 5",
            "msg app",
            "ins 6",
            "commit 2010",
        ])
    );
}

#[test]
fn aborted_streamed_transactions_and_subtransactions_are_dropped() {
    let a = seg(
        0x1000,
        &[
            // 7 rolls back whole.
            start(7, true),
            ins(Some(7), 7),
            Message::StreamStop,
            // 8 commits; its subtransaction 9 (with a Relation message) rolls back.
            start(8, true),
            ins(Some(8), 8),
            rel(Some(9), 9),
            ins(Some(9), 9),
            Message::StreamStop,
            abort(7, 7),
            abort(8, 9),
            start(8, false),
            ins(Some(8), 10),
            Message::StreamStop,
            stream_commit(8, 0x1020),
            // A Stream Commit of 7 never comes after its abort; were it there, it is empty.
        ],
    );
    let (got, _) = read(0x1000, Target::Latest, vec![a]);
    assert_eq!(
        got,
        events(&[
            "begin 1020",
            "ins 8",
            "rel 9 1020 true",
            "ins 10",
            "commit 1020"
        ])
    );
}

#[test]
fn a_transaction_restreamed_after_a_reconnect_is_applied_once() {
    let a = seg(
        0x1000,
        &[
            // Connection 1: a chunk of 7, cut by the disconnection (no Stream Stop).
            start(7, true),
            ins(Some(7), 1),
            ins(Some(7), 2),
        ],
    );
    let b = seg(
        0x2000,
        &[
            // Connection 2: 7 again from its first chunk, then a plain transaction.
            vec![
                start(7, true),
                ins(Some(7), 1),
                ins(Some(7), 2),
                Message::StreamStop,
            ],
            txn(0x2010, &[3]),
            vec![
                start(7, false),
                ins(Some(7), 4),
                Message::StreamStop,
                stream_commit(7, 0x2020),
            ],
        ]
        .concat(),
    );
    let (got, _) = read(0x1000, Target::Latest, vec![a, b]);
    assert_eq!(
        got,
        events(&[
            "begin 2010",
            "ins 3",
            "commit 2010",
            "begin 2020",
            "ins 1",
            "ins 2",
            "ins 4",
            "commit 2020",
        ])
    );
}

#[test]
fn transactions_in_the_backup_and_duplicates_are_skipped_whole() {
    let mut below = txn(0x1010, &[1]);
    below.insert(1, rel(None, 5));
    let mut dup = txn(0x1030, &[3]);
    dup.insert(1, logical(None, "tidemark"));
    let a = seg(
        0x1000,
        &[below, txn(0x1020, &[2]), txn(0x1030, &[3]), dup.clone()].concat(),
    );
    // Sent again after a reconnection, in the next segment; and a streamed duplicate.
    let b = seg(
        0x2000,
        &[
            dup,
            vec![
                start(9, true),
                ins(Some(9), 9),
                Message::StreamStop,
                stream_commit(9, 0x1020),
            ],
            txn(0x2010, &[4]),
        ]
        .concat(),
    );
    let (got, _) = read(0x1020, Target::Latest, vec![a, b]);
    assert_eq!(
        got,
        events(&[
            // The backup's relation map still follows the stream, unchecked.
            "rel 5 1010 false",
            "begin 1020",
            "ins 2",
            "commit 1020",
            "begin 1030",
            "ins 3",
            "commit 1030",
            "begin 2010",
            "ins 4",
            "commit 2010",
        ])
    );
}

#[test]
fn a_time_target_keeps_a_commit_at_the_instant_and_stops_before_one_after_it() {
    let segs = || {
        vec![seg(
            0x1000,
            &[txn(0x1010, &[1]), txn(0x1020, &[2])].concat(),
        )]
    };
    let (got, stopped) = read(0x1000, Target::Time(PgTimestamp(0x1010)), segs());
    assert!(stopped);
    assert_eq!(got, events(&["begin 1010", "ins 1", "commit 1010"]));
    let (got, stopped) = read(0x1000, Target::Time(PgTimestamp(0x101f)), segs());
    assert!(stopped);
    assert_eq!(got.len(), 3);
    let (got, stopped) = read(0x1000, Target::Time(PgTimestamp(0x1020)), segs());
    assert!(!stopped);
    assert_eq!(got.len(), 6);
}

#[test]
fn an_lsn_target_keeps_the_commit_at_it_and_stops_before_one_beyond_it() {
    let segs = || {
        vec![seg(
            0x1000,
            &[txn(0x1010, &[1]), txn(0x1020, &[2])].concat(),
        )]
    };
    let (got, stopped) = read(0x1000, Target::Lsn(Lsn(0x1010)), segs());
    assert!(stopped);
    assert_eq!(got, events(&["begin 1010", "ins 1", "commit 1010"]));
    // Inside the second transaction (between its first record and its commit record).
    let (got, stopped) = read(0x1000, Target::Lsn(Lsn(0x101f)), segs());
    assert!(stopped);
    assert_eq!(got.len(), 3);
    let (got, _) = read(0x1000, Target::Lsn(Lsn(0x1020)), segs());
    assert_eq!(got.len(), 6);
}

#[test]
fn the_stop_rule_applies_to_streamed_commits_and_never_to_skipped_transactions() {
    let segs = || {
        vec![seg(
            0x1000,
            &[
                // In the backup, with a commit time past the target: skipped, no stop.
                timed(0x1010, 0x9999, &[1]),
                vec![start(7, true), ins(Some(7), 7), Message::StreamStop],
                txn(0x1020, &[2]),
                vec![stream_commit(7, 0x1030)],
                txn(0x1040, &[4]),
            ]
            .concat(),
        )]
    };
    let (got, stopped) = read(0x1020, Target::Time(PgTimestamp(0x1020)), segs());
    assert!(stopped);
    assert_eq!(got, events(&["begin 1020", "ins 2", "commit 1020"]));
    let (got, stopped) = read(0x1020, Target::Lsn(Lsn(0x1030)), segs());
    assert!(stopped);
    assert_eq!(
        got,
        events(&[
            "begin 1020",
            "ins 2",
            "commit 1020",
            "begin 1030",
            "ins 7",
            "commit 1030"
        ])
    );
    // The reader stopped: later segments are not read.
    let mut reader = TxnReader::new(Lsn(0x1020), Target::Lsn(Lsn(0x1020)));
    let mut sink = Fake::default();
    let mut spool = segs();
    let one = spool[0].clone();
    let more = reader
        .read_segment(&one, 0, &mut spool, &mut sink)
        .now_or_never()
        .unwrap()
        .unwrap();
    assert!(!more && reader.stopped());
}

#[test]
fn a_streamed_transaction_begun_before_what_was_read_is_refused() {
    let a = seg(
        0x1000,
        &[
            start(11, false),
            ins(Some(11), 1),
            Message::StreamStop,
            stream_commit(11, 0x1010),
        ],
    );
    let mut reader = TxnReader::new(Lsn(0x1000), Target::Latest);
    let mut sink = Fake::default();
    let mut spool = vec![a];
    let err = reader
        .read_all(1, &mut spool, &mut sink)
        .now_or_never()
        .unwrap()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("streamed transaction 11 began before the base backup's position"),
        "{err}"
    );
    // The same transaction committed below the start is in the backup: no error.
    let (got, _) = read(0x1011, Target::Latest, spool);
    assert!(got.is_empty());
}

#[test]
fn a_commit_without_begin_is_an_error() {
    let mut t = txn(0x1010, &[1]);
    t.remove(0);
    let mut reader = TxnReader::new(Lsn(0x1000), Target::Latest);
    let mut spool = vec![seg(0x1000, &t)];
    let err = reader
        .read_all(1, &mut spool, &mut Fake::default())
        .now_or_never()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("Commit without Begin"), "{err}");
}

#[test]
fn the_look_ahead_stops_in_the_segment_where_reading_stops() {
    let s = seg(0x1000, &[txn(0x1010, &[1]), txn(0x1020, &[2])].concat());
    let t = |x: i64| Target::Time(PgTimestamp(x));
    assert!(stops_in(t(0x1010), Lsn(0x1000), &s));
    assert!(!stops_in(t(0x1020), Lsn(0x1000), &s));
    // The later commit is below the start: not a reason to stop.
    assert!(!stops_in(t(0x1010), Lsn(0x1021), &s));
    // Any LSN before the segment's end: the rest of the archive lies beyond it.
    assert!(stops_in(Target::Lsn(Lsn(0x1fff)), Lsn(0x1000), &s));
    assert!(!stops_in(Target::Lsn(Lsn(0x2000)), Lsn(0x1000), &s));
    assert!(!stops_in(Target::Latest, Lsn(0x1000), &s));
}

// The streamed-chunk bookkeeping on its own.

fn feed(input: &[(usize, Vec<Message>)]) -> Vec<(u32, StreamedTxn)> {
    let mut c = Chunks::default();
    let mut out = Vec::new();
    for (seg, msgs) in input {
        for (i, m) in msgs.iter().enumerate() {
            if let Noted::Commit { xid, txn, .. } = c.note(m, *seg, i as u64) {
                out.push((xid, txn));
            }
        }
    }
    out
}

fn run(seg: usize, first: u64, last: u64, xid: u32) -> ChunkRun {
    ChunkRun {
        seg,
        first,
        last,
        xid,
    }
}

#[test]
fn restreamed_chunks_supersede_the_earlier_connection() {
    let out = feed(&[
        // Connection 1: a chunk of 7, cut by the disconnection (no Stream Stop).
        (0, vec![start(7, true), ins(Some(7), 1), ins(Some(7), 1)]),
        // Connection 2: 7 again from its first chunk, a small transaction between chunks,
        // a subtransaction (8) rolled back, and the commit.
        (
            1,
            vec![
                start(7, true),
                ins(Some(7), 1),
                ins(Some(7), 1),
                Message::StreamStop,
                Message::Begin {
                    final_lsn: Lsn(5),
                    commit_time: PgTimestamp(1),
                    xid: 9,
                },
                start(7, false),
                ins(Some(8), 1),
                ins(Some(8), 1),
                Message::StreamStop,
            ],
        ),
        (
            2,
            vec![
                abort(7, 8),
                start(7, false),
                ins(Some(7), 1),
                Message::StreamStop,
                stream_commit(7, 10),
            ],
        ),
    ]);
    assert_eq!(out.len(), 1);
    let (xid, t) = &out[0];
    assert_eq!(*xid, 7);
    assert!(t.whole);
    assert_eq!(t.runs, [run(1, 1, 2, 7), run(1, 6, 7, 8), run(2, 2, 2, 7)]);
    assert!(t.aborted.contains(&8));
}

#[test]
fn aborted_and_partial_streams_are_dropped_or_flagged() {
    let out = feed(&[
        (
            0,
            vec![start(7, true), ins(Some(7), 1), Message::StreamStop],
        ),
        (
            1,
            vec![
                abort(7, 7),
                // A transaction whose first chunk this restore did not read.
                start(11, false),
                ins(Some(11), 1),
                Message::StreamStop,
                stream_commit(11, 10),
                // A stream commit of an aborted transaction never comes; 7 is gone.
                stream_commit(7, 10),
            ],
        ),
    ]);
    assert_eq!(out.len(), 2);
    assert!(!out[0].1.whole, "11 began before what was read");
    assert!(out[1].1.runs.is_empty() && !out[1].1.whole);
}

/// A spool that counts what it is asked for.
struct Counting {
    segs: Vec<Segment>,
    reads: Vec<usize>,
}

impl Spool<ChangelogError> for Counting {
    async fn read(&mut self, seg_no: usize) -> Result<Segment, ChangelogError> {
        self.reads.push(seg_no);
        Ok(self.segs[seg_no].clone())
    }
}

#[test]
fn streamed_chunks_are_read_again_from_the_spool_not_kept() {
    let a = seg(
        0x1000,
        &[start(7, true), ins(Some(7), 1), Message::StreamStop],
    );
    let b = seg(
        0x2000,
        &[
            start(7, false),
            ins(Some(7), 2),
            Message::StreamStop,
            start(7, false),
            ins(Some(7), 3),
            Message::StreamStop,
            stream_commit(7, 0x2010),
        ],
    );
    let mut spool = Counting {
        segs: vec![a.clone(), b.clone()],
        reads: vec![],
    };
    let mut reader = TxnReader::new(Lsn(0x1000), Target::Latest);
    let mut sink = Fake::default();
    for (n, s) in [a, b].iter().enumerate() {
        reader
            .read_segment(s, n, &mut spool, &mut sink)
            .now_or_never()
            .unwrap()
            .unwrap();
    }
    // Each segment holding chunks is read again once (two runs of the second one included).
    assert_eq!(spool.reads, [0, 1]);
    assert_eq!(
        sink.events,
        events(&["begin 2010", "ins 1", "ins 2", "ins 3", "commit 2010"])
    );
}
