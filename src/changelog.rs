//! The changelog reader: archived segments, read in order, turned into the committed
//! transactions they hold, in commit order, each one once, up to a restore target.
//!
//! It owns the rules of what the archive *means* as a sequence of transactions; it does not
//! own what is done with them (a [`ReplaySink`]: restore's replay renders them as SQL for the
//! target) nor where segments come from (a [`Spool`]: restore's spooled, verified files). It
//! does no I/O of its own.
//!
//! The rules:
//! * **Order.** Transactions come out in the order of their commit records, which is the order
//!   the segments hold them in: a plain transaction is sent whole at its commit (Begin …
//!   Commit); a streamed one is sent in chunks while it runs, interleaved with others, and is
//!   replayed at its Stream Commit from the chunks noted so far, read again from the segments
//!   where they were written (runs of records by position, never the rows: a 10-million-row
//!   transaction does not sit in memory).
//! * **Aborts.** A streamed transaction rolled back (Stream Abort of the top-level xid) is
//!   dropped; the changes of a rolled-back subtransaction are skipped (its Relation messages are
//!   kept: the server does not send them again). A plain transaction that never commits is
//!   never sent.
//! * **Reconnects.** A chunk with the first-segment flag starts the streamed transaction afresh
//!   (the server streams it again from its start after the archiver reconnected), and a Begin of
//!   an xid supersedes its streamed chunks (the server sent it whole this time): what an earlier
//!   connection wrote is never applied twice. A chunk cut by a disconnection (no Stream Stop)
//!   ends at the next Begin, Commit or Stream Start.
//! * **Dedup.** A transaction whose commit LSN lies below the start (the base backup's
//!   consistent point: the backup holds it), or at or below the last one handed out (sent again
//!   after a reconnection), is skipped whole; it is never a reason to stop.
//! * **Stop.** PostgreSQL's `recovery_target_time` / `recovery_target_lsn` with
//!   `recovery_target_inclusive = on`: reading stops before the first transaction that
//!   committed after the target time, or whose commit record lies beyond the target LSN
//!   ([`passes_target`], the one place this rule is written; [`stops_in`] applies it to a whole
//!   segment for a restore's look-ahead). The result equals a physical PITR of the same cluster.
//!
//! Invariant: the sink sees `begin`, the transaction's messages, `commit`, for each transaction
//! to replay and for no other, never two transactions interleaved, never one past the target.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::segment::Segment;

/// Where a restore stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every transaction that committed at or before this instant.
    Time(PgTimestamp),
    /// Every transaction whose commit record starts at or before this LSN.
    Lsn(Lsn),
    /// Everything archived.
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {t}"),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Latest => write!(f, "the latest archived commit"),
        }
    }
}

/// The stop rule: whether the transaction committed at `commit_lsn`, `commit_time` lies past
/// `target` (reading stops before it).
pub fn passes_target(target: Target, commit_lsn: Lsn, commit_time: PgTimestamp) -> bool {
    match target {
        Target::Time(t) => commit_time > t,
        Target::Lsn(l) => commit_lsn > l,
        Target::Latest => false,
    }
}

/// Whether reading from `start` to `target` stops in `seg`: the segments after it are not
/// needed. A transaction of the segment's commit index past the target (and not below the
/// start) stops it; for an LSN target, so does an end past the target, since every commit of a
/// later segment lies at or after this one's end.
pub fn stops_in(target: Target, start: Lsn, seg: &Segment) -> bool {
    let later_passes = match target {
        Target::Lsn(_) => passes_target(target, seg.info.end_lsn, PgTimestamp::default()),
        Target::Time(_) | Target::Latest => false,
    };
    later_passes
        || seg
            .commits
            .iter()
            .any(|c| c.commit_lsn >= start && passes_target(target, c.commit_lsn, c.commit_time))
}

/// What reading the changelog found wrong.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    /// Record of segment `seg` (its number in the read order) could not be read.
    #[error("reading spooled segment {seg}: {detail}")]
    Record { seg: usize, detail: String },
    /// The transaction committed at `commit_lsn` cannot be read (zero when not known).
    #[error("replaying the transaction committed at {commit_lsn} ({commit_time}): {detail}")]
    Txn {
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        detail: String,
    },
}

/// What a replayed transaction goes to. The reader calls `begin`, then the transaction's
/// messages in order, then `commit`; [`relation`](ReplaySink::relation) also for transactions
/// it skips (the relation map follows the stream).
pub trait ReplaySink {
    type Error: From<ChangelogError>;

    /// A transaction to replay begins; it commits at `commit_lsn`, `commit_time`.
    fn begin(&mut self, commit_lsn: Lsn, commit_time: PgTimestamp);

    /// A Relation message, of transaction `txn` (commit LSN and time) when inside one; `checked`
    /// when that transaction lies at or past the start (before it, the base backup's own
    /// columns are authoritative).
    fn relation(
        &mut self,
        msg: &Message,
        txn: Option<(Lsn, PgTimestamp)>,
        checked: bool,
    ) -> Result<(), Self::Error>;

    /// A row change (Insert, Update, Delete, Truncate) or another message of the transaction
    /// (Type, Origin) that changes no rows.
    fn change(&mut self, msg: Message) -> impl Future<Output = Result<(), Self::Error>>;

    /// A logical message of the transaction (tidemark's DDL and sequence values, heartbeats,
    /// applications' own).
    fn logical_message(&mut self, msg: Message) -> impl Future<Output = Result<(), Self::Error>>;

    /// The transaction begun last commits.
    fn commit(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> impl Future<Output = Result<(), Self::Error>>;
}

/// Where the reader finds segment `seg_no` (its number in the read order) again, to read the
/// chunks of a streamed transaction.
pub trait Spool<E> {
    fn read(&mut self, seg_no: usize) -> impl Future<Output = Result<Segment, E>>;
}

/// Segments in memory (tests, small tools).
impl<E> Spool<E> for Vec<Segment> {
    async fn read(&mut self, seg_no: usize) -> Result<Segment, E> {
        Ok(self[seg_no].clone())
    }
}

/// Reads segments, in order, into committed transactions for a [`ReplaySink`] (see the module
/// doc for the rules).
pub struct TxnReader {
    start: Lsn,
    target: Target,
    /// Where the chunks of streamed transactions not yet committed lie.
    chunks: Chunks,
    /// The plain transaction being read (between Begin and Commit).
    txn: Option<OpenTxn>,
    /// Commit LSN of the last transaction handed to the sink.
    last_commit: Option<Lsn>,
    stopped: bool,
    /// The segment last read again for a streamed transaction (by number).
    cached: Option<(usize, Segment)>,
}

#[derive(Clone, Copy, Debug)]
struct OpenTxn {
    commit_lsn: Lsn,
    commit_time: PgTimestamp,
    replayed: bool,
}

/// What becomes of a transaction, by its commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// In the base backup already, or handed out already.
    Skip,
    /// Past the target: reading stops before it.
    Stop,
    Replay,
}

impl TxnReader {
    /// Reads transactions that commit at or after `start`, up to `target`.
    pub fn new(start: Lsn, target: Target) -> TxnReader {
        TxnReader {
            start,
            target,
            chunks: Chunks::default(),
            txn: None,
            last_commit: None,
            stopped: false,
            cached: None,
        }
    }

    /// Whether the target was reached (nothing more will be handed out).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Reads segments `0..count` of `spool` in order, until the target is reached.
    pub async fn read_all<K: ReplaySink>(
        &mut self,
        count: usize,
        spool: &mut impl Spool<K::Error>,
        sink: &mut K,
    ) -> Result<(), K::Error> {
        for seg_no in 0..count {
            let seg = spool.read(seg_no).await?;
            if !self.read_segment(&seg, seg_no, spool, sink).await? {
                break;
            }
        }
        Ok(())
    }

    /// Reads segment `seg`, number `seg_no` of the read order (the segments before it were
    /// read); returns false once the target is reached.
    pub async fn read_segment<K: ReplaySink>(
        &mut self,
        seg: &Segment,
        seg_no: usize,
        spool: &mut impl Spool<K::Error>,
        sink: &mut K,
    ) -> Result<bool, K::Error> {
        if self.stopped {
            return Ok(false);
        }
        for (index, rec) in seg.records().enumerate() {
            let rec = rec.map_err(|e| ChangelogError::Record {
                seg: seg_no,
                detail: e.to_string(),
            })?;
            let msg =
                pgoutput::decode(&rec.payload, self.chunks.in_chunk.is_some()).map_err(|e| {
                    ChangelogError::Txn {
                        commit_lsn: self.txn.map_or(rec.lsn, |t| t.commit_lsn),
                        commit_time: self.txn.map(|t| t.commit_time).unwrap_or_default(),
                        detail: format!("undecodable record at {}: {e}", rec.lsn),
                    }
                })?;
            self.message(msg, seg_no, index as u64, spool, sink).await?;
            if self.stopped {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The one decision per transaction: dedup first, then the stop rule.
    fn verdict(&self, commit_lsn: Lsn, commit_time: PgTimestamp) -> Verdict {
        if commit_lsn < self.start || self.last_commit.is_some_and(|l| commit_lsn <= l) {
            Verdict::Skip
        } else if passes_target(self.target, commit_lsn, commit_time) {
            Verdict::Stop
        } else {
            Verdict::Replay
        }
    }

    async fn message<K: ReplaySink>(
        &mut self,
        msg: Message,
        seg_no: usize,
        index: u64,
        spool: &mut impl Spool<K::Error>,
        sink: &mut K,
    ) -> Result<(), K::Error> {
        match self.chunks.note(&msg, seg_no, index) {
            Noted::Other => {}
            Noted::Done => return Ok(()),
            Noted::Commit {
                xid,
                txn,
                commit_lsn,
                commit_time,
            } => {
                return self
                    .streamed(xid, txn, commit_lsn, commit_time, spool, sink)
                    .await
            }
        }
        let replayed = self.txn.is_some_and(|t| t.replayed);
        match msg {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                // Chunks an earlier connection streamed of this transaction are superseded: the
                // server sent it whole this time.
                self.chunks.streams.remove(&xid);
                let verdict = self.verdict(final_lsn, commit_time);
                if verdict == Verdict::Stop {
                    self.stopped = true;
                    return Ok(());
                }
                let replayed = verdict == Verdict::Replay;
                self.txn = Some(OpenTxn {
                    commit_lsn: final_lsn,
                    commit_time,
                    replayed,
                });
                if replayed {
                    sink.begin(final_lsn, commit_time);
                }
            }
            Message::Commit {
                commit_lsn,
                commit_time,
                ..
            } => {
                let Some(open) = self.txn.take() else {
                    return Err(ChangelogError::Txn {
                        commit_lsn: Lsn::default(),
                        commit_time: PgTimestamp::default(),
                        detail: "Commit without Begin".into(),
                    }
                    .into());
                };
                if open.replayed {
                    sink.commit(commit_lsn, commit_time).await?;
                    self.last_commit = Some(commit_lsn);
                }
            }
            Message::Relation { .. } => {
                let txn = self.txn.map(|t| (t.commit_lsn, t.commit_time));
                let checked = self.txn.is_some_and(|t| t.commit_lsn >= self.start);
                sink.relation(&msg, txn, checked)?;
            }
            Message::Message { .. } if replayed => sink.logical_message(msg).await?,
            Message::Message { .. } => {}
            other if replayed => sink.change(other).await?,
            _ => {}
        }
        Ok(())
    }

    /// A Stream Commit: the transaction's chunks are replayed, skipped or the stop.
    async fn streamed<K: ReplaySink>(
        &mut self,
        xid: u32,
        t: StreamedTxn,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        spool: &mut impl Spool<K::Error>,
        sink: &mut K,
    ) -> Result<(), K::Error> {
        match self.verdict(commit_lsn, commit_time) {
            Verdict::Skip => Ok(()),
            Verdict::Stop => {
                self.stopped = true;
                Ok(())
            }
            Verdict::Replay if !t.whole => Err(ChangelogError::Txn {
                commit_lsn,
                commit_time,
                detail: format!(
                    "the streamed transaction {xid} began before the base backup's position {}; its first changes are in segments before it\nHINT: restore from an earlier base backup (a target before this backup's time, or from a repository that still holds it)",
                    self.start
                ),
            }
            .into()),
            Verdict::Replay => self.replay_streamed(t, commit_lsn, commit_time, spool, sink).await,
        }
    }

    /// Replays a committed streamed transaction, reading its chunks again from the spool.
    /// Relation messages are taken from every chunk (also of rolled-back subtransactions: the
    /// server does not send them again); changes of rolled-back subtransactions are skipped.
    async fn replay_streamed<K: ReplaySink>(
        &mut self,
        t: StreamedTxn,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
        spool: &mut impl Spool<K::Error>,
        sink: &mut K,
    ) -> Result<(), K::Error> {
        let txn_err = |detail: String| ChangelogError::Txn {
            commit_lsn,
            commit_time,
            detail,
        };
        sink.begin(commit_lsn, commit_time);
        let mut i = 0;
        while i < t.runs.len() {
            let seg_no = t.runs[i].seg;
            let seg = match self.cached.take() {
                Some((n, seg)) if n == seg_no => seg,
                _ => spool.read(seg_no).await?,
            };
            let (records, at) = seg.records_from(t.runs[i].first);
            let mut records = records.zip(at..);
            while i < t.runs.len() && t.runs[i].seg == seg_no {
                let run = t.runs[i];
                let skip_changes = t.aborted.contains(&run.xid);
                for (rec, idx) in records.by_ref() {
                    if idx < run.first {
                        continue;
                    }
                    let rec = rec.map_err(|e| ChangelogError::Record {
                        seg: seg_no,
                        detail: e.to_string(),
                    })?;
                    let msg = pgoutput::decode(&rec.payload, true)
                        .map_err(|e| txn_err(format!("undecodable record at {}: {e}", rec.lsn)))?;
                    match msg {
                        // Kept even from an aborted subtransaction: the server does not send
                        // a relation again.
                        Message::Relation { .. } => {
                            sink.relation(&msg, Some((commit_lsn, commit_time)), true)?
                        }
                        Message::Message { .. } if !skip_changes => {
                            sink.logical_message(msg).await?
                        }
                        other if !skip_changes => sink.change(other).await?,
                        _ => {}
                    }
                    if idx >= run.last {
                        break;
                    }
                }
                i += 1;
            }
            drop(records);
            self.cached = Some((seg_no, seg));
        }
        sink.commit(commit_lsn, commit_time).await?;
        self.last_commit = Some(commit_lsn);
        Ok(())
    }
}

/// The chunks of the streamed transactions not yet committed or aborted, by position in the
/// spool, never their rows: each record of a chunk is noted as part of a run of consecutive
/// records of one (sub)transaction, and read again at the transaction's Stream Commit.
///
/// A chunk with the first-segment flag starts the transaction afresh: the server streams an
/// in-progress transaction again from its start after the archiver reconnected, so chunks an
/// earlier connection wrote are superseded, never applied twice. A chunk cut by a disconnection
/// (no Stream Stop) ends at the next Begin, Commit or Stream Start.
#[derive(Debug, Default)]
struct Chunks {
    streams: HashMap<u32, StreamedTxn>,
    /// Top-level xid of the chunk being read.
    in_chunk: Option<u32>,
}

/// What [`Chunks::note`] made of a message.
#[derive(Debug)]
enum Noted {
    /// Not part of a streamed transaction.
    Other,
    /// Noted.
    Done,
    /// A Stream Commit: the transaction's chunks.
    Commit {
        xid: u32,
        txn: StreamedTxn,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    },
}

impl Chunks {
    /// Notes message `msg`, record `index` of spooled segment `seg_no`.
    fn note(&mut self, msg: &Message, seg_no: usize, index: u64) -> Noted {
        match msg {
            Message::StreamStart { xid, first_segment } => {
                if *first_segment {
                    self.streams.insert(
                        *xid,
                        StreamedTxn {
                            whole: true,
                            ..StreamedTxn::default()
                        },
                    );
                } else {
                    self.streams.entry(*xid).or_default();
                }
                self.in_chunk = Some(*xid);
            }
            Message::StreamStop => self.in_chunk = None,
            Message::StreamAbort { xid, subxid, .. } => {
                self.in_chunk = None;
                if xid == subxid {
                    self.streams.remove(xid);
                } else if let Some(t) = self.streams.get_mut(xid) {
                    t.aborted.insert(*subxid);
                }
            }
            Message::StreamCommit {
                xid,
                commit_lsn,
                commit_time,
                ..
            } => {
                self.in_chunk = None;
                return Noted::Commit {
                    xid: *xid,
                    txn: self.streams.remove(xid).unwrap_or_default(),
                    commit_lsn: *commit_lsn,
                    commit_time: *commit_time,
                };
            }
            Message::Begin { .. } | Message::Commit { .. } => {
                self.in_chunk = None;
                return Noted::Other;
            }
            other => {
                let Some(top) = self.in_chunk else {
                    return Noted::Other;
                };
                let xid = match other {
                    Message::Relation { xid, .. }
                    | Message::Type { xid, .. }
                    | Message::Insert { xid, .. }
                    | Message::Update { xid, .. }
                    | Message::Delete { xid, .. }
                    | Message::Truncate { xid, .. }
                    | Message::Message { xid, .. } => xid.unwrap_or(top),
                    _ => top,
                };
                self.streams.entry(top).or_default().add(seg_no, index, xid);
            }
        }
        Noted::Done
    }
}

/// Where the chunks of one streamed transaction lie in the spooled segments.
#[derive(Debug, Default)]
struct StreamedTxn {
    /// A chunk with the first-segment flag was seen: the runs hold the whole transaction.
    whole: bool,
    runs: Vec<ChunkRun>,
    /// Subtransactions rolled back (Stream Abort with a subxid): their changes are skipped.
    aborted: HashSet<u32>,
}

/// Consecutive records `first..=last` of spooled segment `seg`, all of (sub)transaction `xid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkRun {
    seg: usize,
    first: u64,
    last: u64,
    xid: u32,
}

impl StreamedTxn {
    fn add(&mut self, seg: usize, index: u64, xid: u32) {
        if let Some(r) = self.runs.last_mut() {
            if r.seg == seg && r.last + 1 == index && r.xid == xid {
                r.last = index;
                return;
            }
        }
        self.runs.push(ChunkRun {
            seg,
            first: index,
            last: index,
            xid,
        });
    }
}

#[cfg(test)]
mod tests;
