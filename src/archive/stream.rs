//! The writer's state machine: which records go into the open segment, when, and up to which
//! stream position the segment may be sealed.
//!
//! Two kinds of transactions arrive from pgoutput:
//! * **Buffered** (Begin … Commit, sent whole when the server decodes the commit): held in
//!   memory until their Commit, then written. With `streaming` on (PostgreSQL ≥ 14) the server
//!   streams every transaction that outgrows `logical_decoding_work_mem`, so this buffer is
//!   bounded by that setting; with protocol 1 (PostgreSQL 10–13) it holds the whole transaction.
//! * **Streamed** (Stream Start … Stream Stop chunks, then Stream Commit or Stream Abort):
//!   every record is written to the open segment as it arrives, so memory stays flat whatever
//!   the size of the transaction. Segments are sealed between any two records, also inside a
//!   chunk. The Stream Commit gets a commit entry whose `first_record` is the Stream Commit
//!   record itself; such segments carry [`crate::segment::FLAG_STREAMED`]. Replay applies a streamed
//!   transaction at its Stream Commit, collecting its chunks from this and earlier segments.
//!
//! **The stream position `pos`** is where the open segment ends if sealed now (and where a new
//! run resumes, and what is acknowledged once stored). It is the maximum of the run's start,
//! the end LSN of every commit written, every idle keepalive position, and the LSN of every
//! streamed record written. Every such LSN is at or below the server's decoding position when
//! it was sent, and the server sends a commit when it decodes it, in WAL order. Hence, at any
//! instant, *a transaction whose commit record starts below `pos` has been received whole* (and
//! is in the archive), and *none whose commit starts at or above `pos` has been* (the last
//! commit received ends at or below `pos`). Resuming at `pos` therefore neither loses nor
//! duplicates a commit, even when `pos` lies inside the WAL of a transaction still in progress:
//! the server does not stream a transaction until it decodes past the requested start, and
//! then streams it again from its first chunk (first-segment flag 1), which supersedes the
//! chunks an earlier run wrote (replay keeps only the chunks from the last first chunk on).
//!
//! After a restart, the chunks the server streams again carry LSNs below the run's start, so
//! they do not advance `pos`; until something does (a commit, a keepalive, a newer change),
//! such chunks accumulate in the open segment (a known bound: the part of the transaction that
//! was streamed before the restart).

use tracing::debug;

use super::{decode, ArchiveError, Sealed, WriterContext};
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::segment::{CommitEntry, Record, SegmentBuilder};

/// Output plugin options for START_REPLICATION: protocol 2 with streaming of in-progress
/// transactions on PostgreSQL ≥ 14 (or when the version is unknown: 0 means not reported),
/// protocol 1 before. Two-phase decoding stays off: a prepared transaction then arrives as an
/// ordinary transaction at COMMIT PREPARED, and nothing at all for ROLLBACK PREPARED.
pub(super) fn plugin_options(server_version_num: u32, publications: &str) -> Vec<(&str, &str)> {
    let mut o = vec![
        ("proto_version", "1"),
        ("publication_names", publications),
        ("messages", "true"),
    ];
    if server_version_num >= 140000 {
        o[0].1 = "2";
        o.push(("streaming", "on"));
    }
    o
}

/// A transaction buffered until its Commit.
struct OpenTxn {
    final_lsn: Lsn,
    xid: u32,
    commit_time: PgTimestamp,
    records: Vec<Record>,
    skip: bool,
}

/// What one record did.
#[derive(Default)]
pub(super) struct Outcome {
    /// A transaction committed that carries more than tidemark's own bookkeeping (heartbeats,
    /// recorded sequence values): the application's data, whose RPO the seal interval sets.
    pub committed_data: bool,
    /// For a commit: how old it already was when the server sent it (the XLogData send time
    /// minus the commit time, both on the server's clock, so clock skew does not enter).
    pub commit_age: std::time::Duration,
}

/// `sent - committed`, clamped at zero.
fn age(sent: PgTimestamp, committed: PgTimestamp) -> std::time::Duration {
    std::time::Duration::from_micros(sent.0.saturating_sub(committed.0).max(0) as u64)
}

pub(super) struct Writer {
    ctx: WriterContext,
    segment_bytes: usize,
    /// The run's start: a transaction committed below it is already archived.
    start: Lsn,
    seg_start: Lsn,
    builder: SegmentBuilder,
    commits_in_segment: u64,
    pos: Lsn,
    last_server_time: PgTimestamp,
    /// The commit time of the newest transaction written (heartbeats included).
    last_commit: Option<PgTimestamp>,
    txn: Option<OpenTxn>,
    /// The (top-level) xid of the open stream chunk.
    chunk: Option<u32>,
    transactions: u64,
    /// `tidemark_transactions_total`, registered once (not looked up per commit).
    transactions_total: metrics::Counter,
    /// The records vector of the last committed transaction, emptied, for the next one (so a
    /// backlog of small transactions allocates none).
    spare_records: Vec<Record>,
    /// Size of the last sealed segment: the next one's buffer is reserved at about that size
    /// up front instead of growing by doubling.
    last_segment_len: usize,
    /// Stops the run on a change of a table's columns that no captured DDL explains.
    guard: crate::ddl::SchemaGuard,
}

impl Writer {
    pub fn new(ctx: WriterContext, segment_bytes: usize, start: Lsn) -> Writer {
        let builder = new_builder(&ctx, start);
        Writer {
            ctx,
            segment_bytes,
            start,
            seg_start: start,
            builder,
            commits_in_segment: 0,
            pos: start,
            last_server_time: PgTimestamp(0),
            last_commit: None,
            txn: None,
            chunk: None,
            transactions: 0,
            transactions_total: metrics::counter!(crate::telemetry::TRANSACTIONS),
            spare_records: Vec::new(),
            last_segment_len: 0,
            guard: crate::ddl::SchemaGuard::new(),
        }
    }

    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    pub fn in_buffered_txn(&self) -> bool {
        self.txn.is_some()
    }

    pub fn buffered_xid(&self) -> Option<u32> {
        self.txn.as_ref().map(|t| t.xid)
    }

    pub fn has_records(&self) -> bool {
        self.builder.record_count() > 0
    }

    /// The open segment can be sealed: the stream position moved past its start.
    pub fn can_seal(&self) -> bool {
        self.pos > self.seg_start
    }

    /// The open segment reached the size limit and can be sealed.
    pub fn size_due(&self) -> bool {
        self.builder.encoded_len() >= self.segment_bytes && self.can_seal()
    }

    /// An idle keepalive: the server has sent everything before `wal_end`.
    pub fn idle(&mut self, wal_end: Lsn, server_time: PgTimestamp) {
        self.last_server_time = self.last_server_time.max(server_time);
        if self.txn.is_none() && wal_end > self.pos {
            self.pos = wal_end;
        }
    }

    /// Seals the open segment at the stream position and opens the next one there.
    pub fn seal(&mut self) -> Sealed {
        let (start, end) = (self.seg_start, self.pos);
        // Room for a segment like the last one (a live stream's are small, a backlog's full),
        // never more than a full one and a block.
        let capacity = (self.last_segment_len + self.last_segment_len / 8)
            .min(self.segment_bytes + crate::segment::DEFAULT_BLOCK_SIZE);
        let next = new_builder(&self.ctx, end).with_capacity(capacity);
        let b = std::mem::replace(&mut self.builder, next);
        let bytes = b.finish(end, self.last_server_time);
        self.last_segment_len = bytes.len();
        self.seg_start = end;
        self.commits_in_segment = 0;
        Sealed {
            range: format!("{start}-{end}"),
            end,
            object: crate::object::encode_with(
                &*self.ctx.codec,
                crate::catalog::keys::segment(self.ctx.generation, start, end),
                bytes,
            ),
            last_commit: self.last_commit,
            admitted: None,
        }
    }

    /// Writes a record of a streamed transaction.
    fn write_streamed(&mut self, rec: &Record) {
        if !self.builder.is_streamed() {
            self.builder.mark_streamed();
        }
        self.builder.push(rec);
        self.pos = self.pos.max(rec.lsn);
    }

    pub fn record(&mut self, rec: Record) -> Result<Outcome, ArchiveError> {
        self.last_server_time = self.last_server_time.max(rec.server_time);
        let tag = rec.payload.first().copied();
        let bad = |detail: &str| ArchiveError::Decode {
            lsn: rec.lsn,
            detail: detail.into(),
        };
        if let Some(t) = &mut self.txn {
            match tag {
                Some(b'C') => return self.commit_buffered(rec),
                Some(b'B' | b'S' | b'E' | b'c' | b'A') => {
                    return Err(bad(
                        "a transaction or stream message inside an open transaction",
                    ))
                }
                _ => {
                    // Only Relation and logical messages concern the guard: no LSN text is
                    // made for the others.
                    if matches!(tag, Some(b'R' | b'M')) {
                        self.guard.observe(&rec.payload, &rec.lsn.to_string())?;
                    }
                    if !t.skip {
                        t.records.push(rec);
                    }
                    return Ok(Outcome::default());
                }
            }
        }
        match tag {
            Some(b'B') => {
                let Message::Begin {
                    final_lsn,
                    commit_time,
                    xid,
                } = decode(&rec)?
                else {
                    return Err(bad("expected Begin"));
                };
                if self.chunk.is_some() {
                    return Err(bad("Begin inside a stream chunk"));
                }
                // A transaction committed below our start is already archived.
                let skip = final_lsn < self.start;
                if skip {
                    debug!(commit = %final_lsn, "dropping duplicate transaction");
                }
                let mut records = std::mem::take(&mut self.spare_records);
                records.push(rec);
                self.txn = Some(OpenTxn {
                    final_lsn,
                    xid,
                    commit_time,
                    records,
                    skip,
                });
            }
            Some(b'C') => return Err(bad("Commit without Begin")),
            Some(b'S') => {
                let Message::StreamStart { xid, .. } = decode(&rec)? else {
                    return Err(bad("expected Stream Start"));
                };
                if self.chunk.is_some() {
                    return Err(bad("Stream Start inside a stream chunk"));
                }
                self.chunk = Some(xid);
                self.write_streamed(&rec);
            }
            Some(b'E') => {
                if self.chunk.take().is_none() {
                    return Err(bad("Stream Stop outside a stream chunk"));
                }
                self.write_streamed(&rec);
            }
            Some(b'A') => {
                if self.chunk.is_some() {
                    return Err(bad("Stream Abort inside a stream chunk"));
                }
                self.write_streamed(&rec);
            }
            Some(b'c') => {
                let Message::StreamCommit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    ..
                } = decode(&rec)?
                else {
                    return Err(bad("expected Stream Commit"));
                };
                if self.chunk.is_some() {
                    return Err(bad("Stream Commit inside a stream chunk"));
                }
                if commit_lsn < self.start {
                    // Already archived; its chunks just written (if any) stay orphans, which
                    // replay ignores.
                    debug!(commit = %commit_lsn, xid, "dropping duplicate streamed commit");
                    return Ok(Outcome::default());
                }
                let first_record = self.builder.record_count() as u32;
                self.write_streamed(&rec);
                self.builder.commit(CommitEntry {
                    commit_lsn,
                    end_lsn,
                    xid,
                    commit_time,
                    first_record,
                });
                self.pos = self.pos.max(end_lsn);
                self.commits_in_segment += 1;
                self.transactions += 1;
                self.transactions_total.increment(1);
                self.last_commit = self.last_commit.max(Some(commit_time));
                return Ok(Outcome {
                    committed_data: true,
                    commit_age: age(rec.server_time, commit_time),
                });
            }
            _ if self.chunk.is_some() => {
                if matches!(tag, Some(b'R' | b'M')) {
                    if let Ok(msg) = pgoutput::decode(&rec.payload, true) {
                        self.guard.observe_message(&msg, &rec.lsn.to_string())?;
                    }
                }
                self.write_streamed(&rec)
            }
            _ => {
                // Non-transactional logical messages arrive outside transactions; tidemark
                // emits only transactional ones, so they are not archived.
                debug!(lsn = %rec.lsn, tag = ?tag.map(|t| t as char), "record outside a transaction ignored");
            }
        }
        Ok(Outcome::default())
    }

    fn commit_buffered(&mut self, rec: Record) -> Result<Outcome, ArchiveError> {
        let sent = rec.server_time;
        let Message::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
            ..
        } = decode(&rec)?
        else {
            return Err(ArchiveError::Decode {
                lsn: rec.lsn,
                detail: "expected Commit".into(),
            });
        };
        let mut t = self.txn.take().expect("called with an open transaction");
        if t.skip {
            self.recycle(t.records);
            return Ok(Outcome::default());
        }
        if commit_lsn != t.final_lsn {
            tracing::warn!(begin = %t.final_lsn, commit = %commit_lsn, "commit LSN differs from Begin's final LSN");
        }
        t.records.push(rec);
        let first_record = self.builder.record_count() as u32;
        for r in &t.records {
            self.builder.push(r);
        }
        self.builder.commit(CommitEntry {
            commit_lsn,
            end_lsn,
            xid: t.xid,
            commit_time: commit_time.max(t.commit_time),
            first_record,
        });
        self.last_commit = self.last_commit.max(Some(commit_time.max(t.commit_time)));
        self.pos = self.pos.max(end_lsn);
        self.commits_in_segment += 1;
        self.transactions += 1;
        self.transactions_total.increment(1);
        let bookkeeping = t.records[1..t.records.len() - 1]
            .iter()
            .all(|r| is_bookkeeping(&r.payload));
        self.recycle(t.records);
        Ok(Outcome {
            committed_data: !bookkeeping,
            commit_age: age(sent, commit_time),
        })
    }

    /// Keeps a transaction's records vector for the next one, unless a large transaction made
    /// it large (then it goes, so that memory returns to a backlog's usual size).
    fn recycle(&mut self, mut records: Vec<Record>) {
        const KEEP: usize = 1024;
        if records.capacity() <= KEEP {
            records.clear();
            self.spare_records = records;
        }
    }
}

/// A logical message tidemark itself commits to keep the archive current (heartbeat, sequence
/// values): it carries no application data, so it need not be stored within the RPO.
fn is_bookkeeping(payload: &bytes::Bytes) -> bool {
    if payload.first() != Some(&b'M') {
        return false;
    }
    matches!(
        pgoutput::decode(payload, false),
        Ok(Message::Message { prefix, .. })
            if prefix == super::HEARTBEAT_PREFIX || prefix == crate::ddl::SEQUENCES_PREFIX
    )
}

fn new_builder(ctx: &WriterContext, start: Lsn) -> SegmentBuilder {
    SegmentBuilder::new(
        ctx.system_id,
        ctx.timeline,
        ctx.generation,
        &ctx.database,
        &ctx.slot,
        start,
    )
    .with_compression(ctx.compression)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{encode, TupleData, Value};
    use crate::segment::Segment;
    use bytes::Bytes;

    fn ctx() -> WriterContext {
        WriterContext {
            system_id: 1,
            timeline: 1,
            generation: 1,
            database: "db".into(),
            slot: "s".into(),
            codec: std::sync::Arc::new(crate::object::Plain),
            compression: crate::segment::Compression::Zstd,
        }
    }

    fn rec(lsn: u64, msg: &Message) -> Record {
        Record {
            lsn: Lsn(lsn),
            server_time: PgTimestamp(lsn as i64),
            payload: {
                let mut b = bytes::BytesMut::new();
                encode(msg, &mut b);
                b.freeze()
            },
        }
    }

    fn ins(xid: Option<u32>, v: &str) -> Message {
        Message::Insert {
            xid,
            relid: 1,
            new: TupleData(vec![Value::Text(Bytes::copy_from_slice(v.as_bytes()))]),
        }
    }

    #[test]
    fn protocol_2_with_streaming_from_postgresql_14() {
        let o = plugin_options(130010, "\"p\"");
        assert_eq!(o[0], ("proto_version", "1"));
        assert!(!o.iter().any(|(k, _)| *k == "streaming"));
        let o = plugin_options(150004, "\"p\"");
        assert_eq!(o[0], ("proto_version", "2"));
        assert!(o.contains(&("streaming", "on")));
    }

    #[test]
    fn streamed_records_are_written_at_once_and_sealable_mid_chunk() {
        let mut w = Writer::new(ctx(), 1 << 20, Lsn(1000));
        w.record(rec(
            900,
            &Message::StreamStart {
                xid: 7,
                first_segment: true,
            },
        ))
        .unwrap();
        // Re-streamed change below the start: written, but the position stays.
        w.record(rec(950, &ins(Some(7), "a"))).unwrap();
        assert!(w.has_records() && !w.can_seal());
        w.record(rec(1100, &ins(Some(7), "b"))).unwrap();
        assert!(w.can_seal());
        let s = w.seal();
        assert_eq!(s.end, Lsn(1100));
        let seg = Segment::parse(s.object.bytes().clone()).unwrap();
        assert_eq!(seg.info.flags, crate::segment::FLAG_STREAMED);
        assert_eq!(seg.info.record_count, 3);
        assert!(seg.commits.is_empty());
        w.record(rec(1100, &Message::StreamStop)).unwrap();
        // A buffered transaction between chunks.
        let begin = Message::Begin {
            final_lsn: Lsn(1200),
            commit_time: PgTimestamp(5),
            xid: 8,
        };
        w.record(rec(1150, &begin)).unwrap();
        w.record(rec(1150, &ins(None, "c"))).unwrap();
        assert!(w.in_buffered_txn());
        w.idle(Lsn(5000), PgTimestamp(6)); // ignored inside a buffered transaction
        let commit = Message::Commit {
            flags: 0,
            commit_lsn: Lsn(1200),
            end_lsn: Lsn(1240),
            commit_time: PgTimestamp(5),
        };
        assert!(w.record(rec(1240, &commit)).unwrap().committed_data);
        let sc = Message::StreamCommit {
            xid: 7,
            flags: 0,
            commit_lsn: Lsn(1300),
            end_lsn: Lsn(1340),
            commit_time: PgTimestamp(9),
        };
        assert!(w.record(rec(1340, &sc)).unwrap().committed_data);
        let s = w.seal();
        assert_eq!(s.range, format!("{}-{}", Lsn(1100), Lsn(1340)));
        let seg = Segment::parse(s.object.bytes().clone()).unwrap();
        let c: Vec<(u32, u32)> = seg
            .commits
            .iter()
            .map(|c| (c.xid, c.first_record))
            .collect();
        // StreamStop (0), Begin (1), Insert, Commit, StreamCommit (4).
        assert_eq!(c, [(8, 1), (7, 4)]);
        assert_eq!(w.transactions(), 2);
    }

    #[test]
    fn heartbeat_and_sequence_transactions_are_bookkeeping_only() {
        let mut w = Writer::new(ctx(), 1 << 20, Lsn(1000));
        let txn = |w: &mut Writer, at: u64, prefix: &str| {
            let begin = Message::Begin {
                final_lsn: Lsn(at + 50),
                commit_time: PgTimestamp(1),
                xid: at as u32,
            };
            w.record(rec(at, &begin)).unwrap();
            let m = Message::Message {
                xid: None,
                flags: 1,
                lsn: Lsn(at + 10),
                prefix: prefix.into(),
                content: bytes::Bytes::new(),
            };
            w.record(rec(at + 10, &m)).unwrap();
            let commit = Message::Commit {
                flags: 0,
                commit_lsn: Lsn(at + 50),
                end_lsn: Lsn(at + 60),
                commit_time: PgTimestamp(1),
            };
            w.record(rec(at + 60, &commit)).unwrap()
        };
        assert!(!txn(&mut w, 1100, super::super::HEARTBEAT_PREFIX).committed_data);
        assert!(!txn(&mut w, 1200, crate::ddl::SEQUENCES_PREFIX).committed_data);
        // An application's own logical message is its data.
        assert!(txn(&mut w, 1300, "app.audit").committed_data);
        assert_eq!(w.transactions(), 3);
    }

    #[test]
    fn duplicates_below_the_start_are_dropped() {
        let mut w = Writer::new(ctx(), 1 << 20, Lsn(1000));
        let sc = Message::StreamCommit {
            xid: 7,
            flags: 0,
            commit_lsn: Lsn(900),
            end_lsn: Lsn(940),
            commit_time: PgTimestamp(9),
        };
        assert!(!w.record(rec(940, &sc)).unwrap().committed_data);
        assert!(!w.has_records());
        assert!(w.record(rec(1, &Message::StreamStop)).is_err());
    }
}
