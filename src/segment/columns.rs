//! Format version 3's block contents: the records of a block rearranged into columns.
//!
//! A version 2 block compresses records one after the other: the 4-byte relation id, the
//! column headers, the Begin's copy of the Commit's LSN and time, and every key and balance
//! written out in text sit between each other, and zstd has to find each again. Version 3
//! splits the same records into *streams* (record kinds, LSN deltas, time deltas, the fields of
//! Begin and Commit messages, the tuple shapes, and the values of every table column, one
//! group of streams per column) and compresses the concatenated streams: like values follow
//! like, integers written as text are stored as varints (or varint deltas), and what one
//! message repeats of another (a Commit's LSN and time given by its Begin) is stored as a
//! difference of 0. On the same real pgbench records that takes the archive from 88 (version 2)
//! to about 35 bytes per transaction (bench/README.md).
//!
//! The transform is purely syntactic and lossless for every input: [`encode`] takes a block's
//! records as version 2 frames them (`proto/segment.md` §5.1) and [`decode`] gives back exactly
//! those bytes. A record whose payload is not a Begin, Commit, Insert, Update or Delete message
//! of the exact expected layout is stored verbatim (a *raw* record), so malformed, new or
//! rarely seen messages (Relation, Truncate, stream control, logical messages) cost nothing in
//! correctness. The block's `data_crc` covers the decoded (version 2 framed) bytes, so a fault
//! in this transform is caught when the block is read, like any other corruption.
//!
//! The layout is specified normatively in `proto/segment.md` §5.3.

use bytes::Buf;
use std::collections::HashMap;

use super::varint::{
    get_uvarint, put_uvarint, unzigzag, unzigzag32, uvarint_len, zigzag, zigzag32,
};

/// A block's decoded (framed) bytes are at most this many times its body: the format's bound,
/// checked before anything is allocated. [`encode`] never exceeds it (it stores the block raw,
/// ratio ≤ 1, in the impossible case that the columns would).
pub(super) const MAX_EXPANSION: u64 = 32;

/// Most column groups a block may have. A record that would add more is stored raw, so a
/// reader's per-group state is bounded whatever the body declares.
pub(super) const MAX_GROUPS: usize = 65_536;

// Record kinds (the KIND stream).
const RAW: u8 = 0;
const BEGIN: u8 = b'B';
const COMMIT: u8 = b'C';

// Fixed streams, in body order.
const S_KIND: usize = 0;
const S_LSN: usize = 1;
const S_TIME: usize = 2;
const S_RAW_LEN: usize = 3;
const S_RAW: usize = 4;
const S_BEGIN_FINAL: usize = 5;
const S_BEGIN_TIME: usize = 6;
const S_BEGIN_XID: usize = 7;
const S_COMMIT_FLAGS: usize = 8;
const S_COMMIT_LSN: usize = 9;
const S_COMMIT_END: usize = 10;
const S_COMMIT_TIME: usize = 11;
const S_CHANGE_XID: usize = 12;
const S_REL: usize = 13;
const S_TUPLE: usize = 14;
const FIXED_STREAMS: usize = 15;

// Streams of a column group, relative to the group's first stream.
const G_KIND: usize = 0;
const G_LEN: usize = 1;
const G_DATA: usize = 2;
const G_NUM: usize = 3;
const GROUP_STREAMS: usize = 4;

/// Column kind of a text value stored as an integer in the NUM stream.
const INT_TEXT: u8 = b'T';

/// How a group's NUM stream stores its integers.
const NUM_PLAIN: u8 = 0;
const NUM_DELTA: u8 = 1;

/// Longest text stored as an integer: 18 digits and a sign, so the value fits an `i64`.
const MAX_INT_TEXT: usize = 19;

const STREAM_NAMES: [&str; FIXED_STREAMS] = [
    "kind",
    "lsn",
    "server_time",
    "raw length",
    "raw payload",
    "Begin final_lsn",
    "Begin commit_time",
    "Begin xid",
    "Commit flags",
    "Commit commit_lsn",
    "Commit end_lsn",
    "Commit commit_time",
    "change xid",
    "relation",
    "tuple",
];
const GROUP_STREAM_NAMES: [&str; GROUP_STREAMS] = ["kind", "length", "data", "integer"];

/// The value of a text column if it is an integer in canonical form (what `int2out`, `int4out`
/// and `int8out` print): an optional `-`, no leading zero, at most 18 digits, and not `-0`.
fn int_text(v: &[u8]) -> Option<i64> {
    if v.is_empty() || v.len() > MAX_INT_TEXT {
        return None;
    }
    let (neg, digits) = match v {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, v),
    };
    match digits {
        [] => return None,
        [b'0'] if !neg => return Some(0),
        [b'0', ..] => return None,
        _ if digits.len() > 18 => return None,
        _ => {}
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(d - b'0');
    }
    Some(if neg { -n } else { n })
}

/// Appends `v` in decimal (the inverse of [`int_text`] for the values it returns).
fn put_int_text(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    let mut digits = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One column value of a parsed tuple: its kind byte and, for `t` and `b`, where its bytes lie
/// in the payload (`n`, null, and `u`, unchanged TOAST, have none: an empty range).
#[derive(Clone, Copy)]
struct ValueAt {
    kind: u8,
    start: usize,
    end: usize,
}

/// An Insert, Update or Delete message's header; its tuples' values are in the encoder's
/// scratch vectors, in the order of `tags`.
struct ChangeHead {
    xid: Option<u32>,
    relid: u32,
    tags: [u8; 2],
    tuple_count: usize,
}

/// Reads a TupleData at `*pos` (pgoutput: Int16 column count, then per column a kind byte and,
/// for `t` and `b`, an Int32 length and the bytes).
fn parse_tuple(p: &[u8], pos: &mut usize, values: &mut Vec<ValueAt>) -> Option<()> {
    let n = u16::from_be_bytes(p.get(*pos..*pos + 2)?.try_into().ok()?);
    *pos += 2;
    values.clear();
    values.reserve(usize::from(n));
    for _ in 0..n {
        let kind = *p.get(*pos)?;
        *pos += 1;
        match kind {
            b'n' | b'u' => values.push(ValueAt {
                kind,
                start: 0,
                end: 0,
            }),
            b't' | b'b' => {
                let len = u32::from_be_bytes(p.get(*pos..*pos + 4)?.try_into().ok()?) as usize;
                *pos += 4;
                let end = pos.checked_add(len).filter(|&e| e <= p.len())?;
                values.push(ValueAt {
                    kind,
                    start: *pos,
                    end,
                });
                *pos = end;
            }
            _ => return None,
        }
    }
    Some(())
}

/// Tuple tags a message of `tag` may carry in first place, and whether a second (`N`) follows a
/// first `K` or `O`.
fn first_tags(tag: u8) -> &'static [u8] {
    match tag {
        b'I' => b"N",
        b'U' => b"KON",
        _ => b"KO", // D
    }
}

/// Parses an Insert, Update or Delete payload, with (`with_xid`) or without the transaction id
/// that messages inside a streamed transaction carry, its tuples' values into `tuples`. `None`
/// unless the layout is exactly right and uses the whole payload.
fn parse_change(p: &[u8], with_xid: bool, tuples: &mut [Vec<ValueAt>; 2]) -> Option<ChangeHead> {
    let tag = p[0];
    let mut pos = 1;
    let xid = if with_xid {
        let x = u32::from_be_bytes(p.get(1..5)?.try_into().ok()?);
        pos = 5;
        Some(x)
    } else {
        None
    };
    let relid = u32::from_be_bytes(p.get(pos..pos + 4)?.try_into().ok()?);
    pos += 4;
    let [a, b] = tuples;
    let t1 = *p.get(pos)?;
    if !first_tags(tag).contains(&t1) {
        return None;
    }
    pos += 1;
    parse_tuple(p, &mut pos, a)?;
    let mut tuple_count = 1;
    let mut t2 = 0;
    if tag == b'U' && t1 != b'N' {
        t2 = *p.get(pos)?;
        if t2 != b'N' {
            return None;
        }
        pos += 1;
        parse_tuple(p, &mut pos, b)?;
        tuple_count = 2;
    }
    (pos == p.len()).then_some(ChangeHead {
        xid,
        relid,
        tags: [t1, t2],
        tuple_count,
    })
}

/// A column group being written: the streams of one column of one relation.
#[derive(Default)]
struct Group {
    relid: u32,
    column: u16,
    streams: [Vec<u8>; GROUP_STREAMS],
    ints: Vec<i64>,
    /// How the NUM stream stores the integers, chosen when the body is written.
    mode: u8,
}

/// Groups kept for their buffers between blocks, at most (a block that needed more gives the
/// rest back).
const GROUP_POOL: usize = 1024;

/// Version 3's encoder of one block at a time. The writer hands it each record as it frames it
/// ([`Columns::push`]), so a block is never parsed back from its framed bytes, and every stream
/// keeps its buffer from one block to the next. [`Columns::finish_into`] writes the body.
#[derive(Default)]
pub(super) struct Columns {
    s: [Vec<u8>; FIXED_STREAMS],
    /// The block's groups are `groups[..live]`, in the order their columns first appeared; the
    /// rest are kept for their buffers.
    groups: Vec<Group>,
    live: usize,
    /// Each relation's groups, by column number.
    by_relid: HashMap<u32, Vec<usize>>,
    prev_lsn: u64,
    prev_time: i64,
    begin_final: u64,
    begin_time: i64,
    begin_xid: u32,
    change_xid: u32,
    /// The tuples of the change being added.
    tuples: [Vec<ValueAt>; 2],
    records: u32,
}

impl Columns {
    /// Adds the block's next record.
    pub(super) fn push(&mut self, lsn: u64, time: i64, p: &[u8]) {
        self.add(lsn, time, p, false);
    }

    fn add(&mut self, lsn: u64, time: i64, p: &[u8], all_raw: bool) {
        self.records += 1;
        let prev_lsn = self.prev_lsn;
        let s = &mut self.s;
        put_uvarint(&mut s[S_TIME], zigzag(time.wrapping_sub(self.prev_time)));
        (self.prev_lsn, self.prev_time) = (lsn, time);
        let lsn_delta = |from: u64| zigzag(lsn.wrapping_sub(from) as i64);
        let tag = if all_raw {
            RAW
        } else {
            p.first().copied().unwrap_or(RAW)
        };
        match tag {
            BEGIN if p.len() == 21 => {
                let mut b = &p[1..];
                let (final_lsn, ts, xid) = (b.get_u64(), b.get_i64(), b.get_u32());
                s[S_KIND].push(BEGIN);
                put_uvarint(&mut s[S_LSN], lsn_delta(prev_lsn));
                put_uvarint(
                    &mut s[S_BEGIN_FINAL],
                    zigzag(final_lsn.wrapping_sub(lsn) as i64),
                );
                put_uvarint(
                    &mut s[S_BEGIN_TIME],
                    zigzag(ts.wrapping_sub(self.begin_time)),
                );
                put_uvarint(
                    &mut s[S_BEGIN_XID],
                    zigzag32(xid.wrapping_sub(self.begin_xid)),
                );
                (self.begin_final, self.begin_time, self.begin_xid) = (final_lsn, ts, xid);
            }
            COMMIT if p.len() == 26 => {
                let mut b = &p[2..];
                let (commit_lsn, end_lsn, ts) = (b.get_u64(), b.get_u64(), b.get_i64());
                s[S_KIND].push(COMMIT);
                put_uvarint(&mut s[S_LSN], lsn_delta(end_lsn));
                s[S_COMMIT_FLAGS].push(p[1]);
                put_uvarint(
                    &mut s[S_COMMIT_LSN],
                    zigzag(commit_lsn.wrapping_sub(self.begin_final) as i64),
                );
                put_uvarint(&mut s[S_COMMIT_END], end_lsn.wrapping_sub(commit_lsn));
                put_uvarint(
                    &mut s[S_COMMIT_TIME],
                    zigzag(ts.wrapping_sub(self.begin_time)),
                );
            }
            b'I' | b'U' | b'D' => {
                if !self.add_change(p, lsn_delta(prev_lsn)) {
                    put_raw(&mut self.s, p, lsn_delta(prev_lsn));
                }
            }
            _ => put_raw(s, p, lsn_delta(prev_lsn)),
        }
    }

    /// Adds a change in columns; `false` (nothing added) if its layout is not exactly right or
    /// its columns would take the block over [`MAX_GROUPS`].
    fn add_change(&mut self, p: &[u8], lsn_delta: u64) -> bool {
        let Some(c) = parse_change(p, false, &mut self.tuples)
            .or_else(|| parse_change(p, true, &mut self.tuples))
        else {
            return false;
        };
        let known = self.by_relid.get(&c.relid).map_or(0, Vec::len);
        let widest = self.tuples[..c.tuple_count].iter().map(Vec::len).max();
        if self.live + widest.unwrap_or(0).saturating_sub(known) > MAX_GROUPS {
            return false;
        }
        let tag = p[0];
        let s = &mut self.s;
        s[S_KIND].push(if c.xid.is_some() {
            tag.to_ascii_lowercase()
        } else {
            tag
        });
        put_uvarint(&mut s[S_LSN], lsn_delta);
        if let Some(xid) = c.xid {
            put_uvarint(
                &mut s[S_CHANGE_XID],
                zigzag32(xid.wrapping_sub(self.change_xid)),
            );
            self.change_xid = xid;
        }
        put_uvarint(&mut s[S_REL], u64::from(c.relid));
        let columns = self.by_relid.entry(c.relid).or_default();
        for (t, values) in c.tags.iter().zip(&self.tuples[..c.tuple_count]) {
            s[S_TUPLE].push(*t);
            put_uvarint(&mut s[S_TUPLE], values.len() as u64);
            for (i, v) in values.iter().enumerate() {
                if columns.len() <= i {
                    if self.live == self.groups.len() {
                        self.groups.push(Group::default());
                    }
                    let g = &mut self.groups[self.live];
                    (g.relid, g.column) = (c.relid, i as u16);
                    columns.push(self.live);
                    self.live += 1;
                }
                let g = &mut self.groups[columns[i]];
                let data = &p[v.start..v.end];
                match v.kind {
                    k @ (b'n' | b'u') => g.streams[G_KIND].push(k),
                    k => match if k == b't' { int_text(data) } else { None } {
                        Some(n) => {
                            g.streams[G_KIND].push(INT_TEXT);
                            g.ints.push(n);
                        }
                        None => {
                            g.streams[G_KIND].push(k);
                            put_uvarint(&mut g.streams[G_LEN], data.len() as u64);
                            g.streams[G_DATA].extend_from_slice(data);
                        }
                    },
                }
            }
        }
        true
    }

    /// Writes the body of the block whose records were added (`framed`: the same records
    /// framed as in version 2) into `body`, replacing its contents, and starts the next block.
    /// The body is what the block's zstd frame holds.
    ///
    /// # Panics
    /// If `framed` is not the added records, framed (the writer made both).
    pub(super) fn finish_into(&mut self, framed: &[u8], body: &mut Vec<u8>) {
        self.write_body(framed.len(), body);
        if framed.len() as u64 > MAX_EXPANSION * body.len() as u64 {
            // Cannot happen for any input we know of (the worst case is about 12x), but the
            // bound is the format's and raw records always meet it.
            let records = self.records;
            self.reset();
            let (mut pos, mut prev) = (0, (0, 0));
            for _ in 0..records {
                let f = super::read::frame_at(super::Version::V2, framed, pos, prev)
                    .expect("the writer framed this block");
                self.add(f.lsn, f.server_time, &framed[f.payload.clone()], true);
                (pos, prev) = (f.payload.end, (f.lsn, f.server_time));
            }
            self.write_body(framed.len(), body);
        }
        self.reset();
    }

    /// The body: lengths first, then the streams.
    fn write_body(&mut self, framed_len: usize, body: &mut Vec<u8>) {
        let groups = &mut self.groups[..self.live];
        for g in groups.iter_mut() {
            g.mode = choose_num_mode(&g.ints, &mut g.streams[G_NUM]);
        }
        let streams = self
            .s
            .iter()
            .chain(groups.iter().flat_map(|g| g.streams.iter()));
        let total: usize = streams.clone().map(Vec::len).sum();
        body.clear();
        body.reserve(total + 16 + groups.len() * 16);
        put_uvarint(body, framed_len as u64);
        put_uvarint(body, groups.len() as u64);
        for g in groups.iter() {
            put_uvarint(body, u64::from(g.relid));
            put_uvarint(body, u64::from(g.column));
            body.push(g.mode);
        }
        for st in streams.clone() {
            put_uvarint(body, st.len() as u64);
        }
        for st in streams {
            body.extend_from_slice(st);
        }
    }

    /// Empties every stream (keeping its buffer) for the next block.
    fn reset(&mut self) {
        self.s.iter_mut().for_each(Vec::clear);
        for g in &mut self.groups[..self.live] {
            g.streams.iter_mut().for_each(Vec::clear);
            g.ints.clear();
        }
        self.groups.truncate(GROUP_POOL);
        self.live = 0;
        self.by_relid.clear();
        (self.prev_lsn, self.prev_time) = (0, 0);
        (self.begin_final, self.begin_time, self.begin_xid) = (0, 0, 0);
        self.change_xid = 0;
        self.records = 0;
    }
}

impl std::fmt::Debug for Columns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Columns")
            .field("records", &self.records)
            .field("groups", &self.live)
            .finish_non_exhaustive()
    }
}

/// Encodes a block: `framed` holds `records` records framed as in version 2. Returns the body
/// (what the block's zstd frame holds): what [`Columns`] writes for the same records.
///
/// # Panics
/// If `framed` is not `records` well-formed version 2 records.
#[cfg(test)]
pub(super) fn encode(framed: &[u8], records: u32) -> Vec<u8> {
    let mut c = Columns::default();
    let (mut pos, mut prev) = (0, (0, 0));
    for _ in 0..records {
        let f = super::read::frame_at(super::Version::V2, framed, pos, prev)
            .expect("well-formed records");
        c.push(f.lsn, f.server_time, &framed[f.payload.clone()]);
        (pos, prev) = (f.payload.end, (f.lsn, f.server_time));
    }
    assert_eq!(pos, framed.len(), "records fill the framed block");
    let mut body = Vec::new();
    c.finish_into(framed, &mut body);
    body
}

fn put_raw(s: &mut [Vec<u8>; FIXED_STREAMS], p: &[u8], lsn_delta: u64) {
    s[S_KIND].push(RAW);
    put_uvarint(&mut s[S_LSN], lsn_delta);
    put_uvarint(&mut s[S_RAW_LEN], p.len() as u64);
    s[S_RAW].extend_from_slice(p);
}

/// Writes the NUM stream of a group into `out` (replacing its contents) and returns its mode:
/// the integers as zigzag varints, or as zigzag varints of their differences (from 0 for the
/// first), whichever takes fewer bytes (plain on a tie).
fn choose_num_mode(ints: &[i64], out: &mut Vec<u8>) -> u8 {
    let mut plain = 0usize;
    let mut delta = 0usize;
    let mut prev = 0i64;
    for &v in ints {
        plain += uvarint_len(zigzag(v));
        delta += uvarint_len(zigzag(v.wrapping_sub(prev)));
        prev = v;
    }
    let mode = if delta < plain { NUM_DELTA } else { NUM_PLAIN };
    out.clear();
    out.reserve(plain.min(delta));
    let mut prev = 0i64;
    for &v in ints {
        let x = if mode == NUM_DELTA {
            v.wrapping_sub(prev)
        } else {
            v
        };
        put_uvarint(out, zigzag(x));
        prev = v;
    }
    mode
}

/// Which stream, for error messages (built only when one is reported).
#[derive(Clone, Copy)]
enum Name {
    Fixed(usize),
    Group { relid: u32, column: u16, k: usize },
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Name::Fixed(i) => f.write_str(STREAM_NAMES[i]),
            Name::Group { relid, column, k } => write!(
                f,
                "relation {relid} column {column} {}",
                GROUP_STREAM_NAMES[k]
            ),
        }
    }
}

/// A stream being read.
struct Stream<'a> {
    name: Name,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Stream<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = self
            .buf
            .get(self.pos)
            .copied()
            .ok_or_else(|| self.exhausted())?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], String> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "the {} stream has {left} bytes left, a value needs {n}",
                self.name
            ));
        }
        let out = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn varint(&mut self, bits: u32) -> Result<u64, String> {
        let at = self.pos;
        get_uvarint(self.buf, &mut self.pos, bits).map_err(|e| {
            format!(
                "the {} stream has a varint at offset {at} that {e}",
                self.name
            )
        })
    }

    fn delta64(&mut self) -> Result<i64, String> {
        self.varint(64).map(unzigzag)
    }

    fn delta32(&mut self) -> Result<u32, String> {
        self.varint(32).map(|u| unzigzag32(u as u32))
    }

    fn exhausted(&self) -> String {
        format!("the {} stream ends early", self.name)
    }
}

/// A column group being read.
struct ReadGroup<'a> {
    mode: u8,
    prev: i64,
    streams: [Stream<'a>; GROUP_STREAMS],
}

/// Decodes a block body of `records` records back into version 2 framing. The result is
/// exactly what [`encode`] was given; an error says what is inconsistent (the caller adds
/// the block). Allocates at most the decoded length (≤ [`MAX_EXPANSION`] times the body) plus
/// a state bounded by the group count (≤ the body's size / 7 and [`MAX_GROUPS`]).
pub(super) fn decode(body: &[u8], records: u32) -> Result<Vec<u8>, String> {
    let mut pos = 0;
    let head = |pos: &mut usize, what: &str, bits: u32| {
        let at = *pos;
        get_uvarint(body, pos, bits)
            .map_err(|e| format!("the {what} varint at offset {at} of the block body {e}"))
    };
    let framed_len = head(&mut pos, "decoded length", 64)?;
    if framed_len > MAX_EXPANSION * body.len() as u64 {
        return Err(format!(
            "declares {framed_len} decoded bytes, more than {MAX_EXPANSION} times its {}-byte body",
            body.len()
        ));
    }
    let group_count = head(&mut pos, "column group count", 64)?;
    // Every group takes at least 3 bytes of directory and 4 of stream lengths.
    if group_count > (body.len() as u64 / 7).min(MAX_GROUPS as u64) {
        return Err(format!(
            "declares {group_count} column groups, more than its {}-byte body can hold or the \
             format's {MAX_GROUPS}",
            body.len()
        ));
    }
    let mut dir = Vec::with_capacity(group_count as usize);
    for g in 0..group_count {
        let relid = head(&mut pos, "group relation", 32)? as u32;
        let column = head(&mut pos, "group column", 16)? as u16;
        let mode = *body
            .get(pos)
            .ok_or_else(|| format!("the directory entry of column group {g} ends early"))?;
        pos += 1;
        if mode != NUM_PLAIN && mode != NUM_DELTA {
            return Err(format!("column group {g} has unknown integer mode {mode}"));
        }
        dir.push((relid, column, mode));
    }
    let stream_count = FIXED_STREAMS + GROUP_STREAMS * dir.len();
    let mut lens = Vec::with_capacity(stream_count);
    for _ in 0..stream_count {
        lens.push(head(&mut pos, "stream length", 64)?);
    }
    let total = lens.iter().try_fold(0u64, |a, &l| a.checked_add(l));
    let left = (body.len() - pos) as u64;
    if total != Some(left) {
        return Err(format!(
            "its streams' lengths do not add up to the {left} bytes after the directory"
        ));
    }
    let mut start = pos;
    let mut streams = lens.iter().enumerate().map(|(i, &len)| {
        let buf = &body[start..start + len as usize];
        start += len as usize;
        let name = if i < FIXED_STREAMS {
            Name::Fixed(i)
        } else {
            let (g, k) = (
                (i - FIXED_STREAMS) / GROUP_STREAMS,
                (i - FIXED_STREAMS) % GROUP_STREAMS,
            );
            let (relid, column, _) = dir[g];
            Name::Group { relid, column, k }
        };
        Stream { name, buf, pos: 0 }
    });
    let mut s: [Stream; FIXED_STREAMS] =
        std::array::from_fn(|_| streams.next().expect("FIXED_STREAMS lengths"));
    let mut groups: HashMap<(u32, u16), ReadGroup> = HashMap::with_capacity(dir.len());
    for &(relid, column, mode) in &dir {
        let g = ReadGroup {
            mode,
            prev: 0,
            streams: std::array::from_fn(|_| streams.next().expect("4 lengths a group")),
        };
        if groups.insert((relid, column), g).is_some() {
            return Err(format!(
                "column group relation {relid} column {column} appears twice"
            ));
        }
    }

    let mut out = Vec::with_capacity((framed_len as usize).min(64 << 20));
    let mut payload = Vec::new();
    let (mut prev_lsn, mut prev_time) = (0u64, 0i64);
    let (mut begin_final, mut begin_time, mut begin_xid) = (0u64, 0i64, 0u32);
    let mut change_xid = 0u32;
    for r in 0..records {
        let fail = |e: String| format!("record {r}: {e}");
        let kind = s[S_KIND].byte().map_err(fail)?;
        let time = prev_time.wrapping_add(s[S_TIME].delta64().map_err(fail)?);
        payload.clear();
        let lsn = match kind {
            RAW => {
                let lsn = prev_lsn.wrapping_add(s[S_LSN].delta64().map_err(fail)? as u64);
                let len = s[S_RAW_LEN].varint(64).map_err(fail)?;
                payload.extend_from_slice(s[S_RAW].take(len).map_err(fail)?);
                lsn
            }
            BEGIN => {
                let lsn = prev_lsn.wrapping_add(s[S_LSN].delta64().map_err(fail)? as u64);
                begin_final = lsn.wrapping_add(s[S_BEGIN_FINAL].delta64().map_err(fail)? as u64);
                begin_time = begin_time.wrapping_add(s[S_BEGIN_TIME].delta64().map_err(fail)?);
                begin_xid = begin_xid.wrapping_add(s[S_BEGIN_XID].delta32().map_err(fail)?);
                payload.push(BEGIN);
                payload.extend_from_slice(&begin_final.to_be_bytes());
                payload.extend_from_slice(&begin_time.to_be_bytes());
                payload.extend_from_slice(&begin_xid.to_be_bytes());
                lsn
            }
            COMMIT => {
                let flags = s[S_COMMIT_FLAGS].byte().map_err(fail)?;
                let commit_lsn =
                    begin_final.wrapping_add(s[S_COMMIT_LSN].delta64().map_err(fail)? as u64);
                let end_lsn = commit_lsn.wrapping_add(s[S_COMMIT_END].varint(64).map_err(fail)?);
                let ts = begin_time.wrapping_add(s[S_COMMIT_TIME].delta64().map_err(fail)?);
                payload.push(COMMIT);
                payload.push(flags);
                payload.extend_from_slice(&commit_lsn.to_be_bytes());
                payload.extend_from_slice(&end_lsn.to_be_bytes());
                payload.extend_from_slice(&ts.to_be_bytes());
                end_lsn.wrapping_add(s[S_LSN].delta64().map_err(fail)? as u64)
            }
            b'I' | b'U' | b'D' | b'i' | b'u' | b'd' => {
                let lsn = prev_lsn.wrapping_add(s[S_LSN].delta64().map_err(fail)? as u64);
                let tag = kind.to_ascii_uppercase();
                payload.push(tag);
                if kind.is_ascii_lowercase() {
                    change_xid = change_xid.wrapping_add(s[S_CHANGE_XID].delta32().map_err(fail)?);
                    payload.extend_from_slice(&change_xid.to_be_bytes());
                }
                let relid = s[S_REL].varint(32).map_err(fail)? as u32;
                payload.extend_from_slice(&relid.to_be_bytes());
                let first = s[S_TUPLE].byte().map_err(fail)?;
                if !first_tags(tag).contains(&first) {
                    return Err(fail(format!(
                        "tuple tag {first:#04x} is not one a {} message starts with",
                        tag as char
                    )));
                }
                decode_tuple(first, relid, &mut s[S_TUPLE], &mut groups, &mut payload)
                    .map_err(fail)?;
                if tag == b'U' && first != b'N' {
                    let second = s[S_TUPLE].byte().map_err(fail)?;
                    if second != b'N' {
                        return Err(fail(format!(
                            "an Update's second tuple tag is {second:#04x}, not 'N'"
                        )));
                    }
                    decode_tuple(second, relid, &mut s[S_TUPLE], &mut groups, &mut payload)
                        .map_err(fail)?;
                }
                lsn
            }
            other => return Err(fail(format!("unknown record kind {other:#04x}"))),
        };
        let d_lsn = zigzag(lsn.wrapping_sub(prev_lsn) as i64);
        let d_time = zigzag(time.wrapping_sub(prev_time));
        let framing = uvarint_len(d_lsn) + uvarint_len(d_time) + uvarint_len(payload.len() as u64);
        if (out.len() + framing + payload.len()) as u64 > framed_len {
            return Err(fail(format!(
                "decodes past the {framed_len} bytes the block body declares"
            )));
        }
        put_uvarint(&mut out, d_lsn);
        put_uvarint(&mut out, d_time);
        put_uvarint(&mut out, payload.len() as u64);
        out.extend_from_slice(&payload);
        (prev_lsn, prev_time) = (lsn, time);
    }
    if out.len() as u64 != framed_len {
        return Err(format!(
            "its {records} records decode to {} bytes, the body declares {framed_len}",
            out.len()
        ));
    }
    let leftover = s
        .iter()
        .chain(groups.values().flat_map(|g| g.streams.iter()))
        .find(|st| st.pos != st.buf.len());
    if let Some(st) = leftover {
        return Err(format!(
            "the {} stream has {} bytes left after the last record",
            st.name,
            st.buf.len() - st.pos
        ));
    }
    Ok(out)
}

/// Appends one tuple (tag, column count and values) read from the streams to `payload`.
fn decode_tuple(
    tag: u8,
    relid: u32,
    tuple: &mut Stream,
    groups: &mut HashMap<(u32, u16), ReadGroup>,
    payload: &mut Vec<u8>,
) -> Result<(), String> {
    let n = tuple.varint(16)? as u16;
    payload.push(tag);
    payload.extend_from_slice(&n.to_be_bytes());
    for column in 0..n {
        let g = groups
            .get_mut(&(relid, column))
            .ok_or_else(|| format!("no column group for relation {relid} column {column}"))?;
        let [kind_s, len_s, data_s, num_s] = &mut g.streams;
        match kind_s.byte()? {
            k @ (b'n' | b'u') => payload.push(k),
            k @ (b't' | b'b') => {
                let len = len_s.varint(32)?;
                payload.push(k);
                payload.extend_from_slice(&(len as u32).to_be_bytes());
                payload.extend_from_slice(data_s.take(len)?);
            }
            INT_TEXT => {
                let x = num_s.delta64()?;
                let v = if g.mode == NUM_DELTA {
                    g.prev.wrapping_add(x)
                } else {
                    x
                };
                g.prev = v;
                payload.push(b't');
                let len_at = payload.len();
                payload.extend_from_slice(&[0; 4]);
                put_int_text(payload, v);
                let len = (payload.len() - len_at - 4) as u32;
                payload[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            }
            other => {
                return Err(format!(
                    "relation {relid} column {column} has unknown value kind {other:#04x}"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(records: &[(u64, i64, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut pl, mut pt) = (0u64, 0i64);
        for (l, t, p) in records {
            put_uvarint(&mut out, zigzag(l.wrapping_sub(pl) as i64));
            put_uvarint(&mut out, zigzag(t.wrapping_sub(pt)));
            put_uvarint(&mut out, p.len() as u64);
            out.extend_from_slice(p);
            (pl, pt) = (*l, *t);
        }
        out
    }

    fn round_trip(records: &[(u64, i64, Vec<u8>)]) -> Vec<u8> {
        let framed = frame(records);
        let body = encode(&framed, records.len() as u32);
        let back = decode(&body, records.len() as u32).expect("decodes");
        assert_eq!(back, framed);
        body
    }

    fn tuple(cols: &[Option<&[u8]>]) -> Vec<u8> {
        let mut m = (cols.len() as u16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => m.push(b'n'),
                Some(v) => {
                    m.push(b't');
                    m.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    m.extend_from_slice(v);
                }
            }
        }
        m
    }

    fn change(tag: u8, xid: Option<u32>, relid: u32, tuples: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![tag];
        if let Some(x) = xid {
            m.extend_from_slice(&x.to_be_bytes());
        }
        m.extend_from_slice(&relid.to_be_bytes());
        for (t, body) in tuples {
            m.push(*t);
            m.extend_from_slice(body);
        }
        m
    }

    fn begin(final_lsn: u64, ts: i64, xid: u32) -> Vec<u8> {
        let mut m = vec![b'B'];
        m.extend_from_slice(&final_lsn.to_be_bytes());
        m.extend_from_slice(&ts.to_be_bytes());
        m.extend_from_slice(&xid.to_be_bytes());
        m
    }

    fn commit(flags: u8, commit_lsn: u64, end_lsn: u64, ts: i64) -> Vec<u8> {
        let mut m = vec![b'C', flags];
        m.extend_from_slice(&commit_lsn.to_be_bytes());
        m.extend_from_slice(&end_lsn.to_be_bytes());
        m.extend_from_slice(&ts.to_be_bytes());
        m
    }

    #[test]
    fn integer_text_is_canonical_only() {
        for (text, want) in [
            (&b"0"[..], Some(0)),
            (b"7", Some(7)),
            (b"-12", Some(-12)),
            (b"999999999999999999", Some(999_999_999_999_999_999)),
            (b"-999999999999999999", Some(-999_999_999_999_999_999)),
            (b"1000000000000000000", None),
            (b"-0", None),
            (b"007", None),
            (b"-", None),
            (b"", None),
            (b"+1", None),
            (b"1.0", None),
            (b" 1", None),
        ] {
            assert_eq!(int_text(text), want, "{:?}", String::from_utf8_lossy(text));
            if let Some(v) = want {
                let mut out = Vec::new();
                put_int_text(&mut out, v);
                assert_eq!(out, text);
            }
        }
        let mut out = Vec::new();
        put_int_text(&mut out, i64::MIN);
        assert_eq!(out, i64::MIN.to_string().as_bytes());
    }

    #[test]
    fn a_pgbench_transaction_round_trips_in_columns() {
        let acc: &[Option<&[u8]>] = &[
            Some(b"989718"),
            Some(b"10"),
            Some(b"-1617"),
            Some(&[b' '; 84]),
        ];
        let hist: &[Option<&[u8]>] = &[
            Some(b"223"),
            Some(b"34"),
            Some(b"989718"),
            Some(b"-1617"),
            Some(b"2026-11-29 00:08:02.123456"),
            None,
        ];
        let recs = vec![
            (0x2801bdd0, 1000, begin(0x2801c3d0, 999, 8635)),
            (
                0x2801bdd0,
                1005,
                change(b'U', None, 16390, &[(b'N', tuple(acc))]),
            ),
            (
                0x2801c0c8,
                1009,
                change(
                    b'U',
                    None,
                    16387,
                    &[
                        (b'K', tuple(&[Some(b"1")])),
                        (b'N', tuple(&[Some(b"1"), None])),
                    ],
                ),
            ),
            (
                0x2801c1b8,
                1012,
                change(b'I', None, 16384, &[(b'N', tuple(hist))]),
            ),
            (
                0x2801c1c8,
                1013,
                change(b'D', None, 16384, &[(b'O', tuple(hist))]),
            ),
            (0x2801c400, 1015, commit(0, 0x2801c3d0, 0x2801c400, 999)),
        ];
        let body = round_trip(&recs);
        // Every record was stored in columns: the raw streams are empty.
        let framed = frame(&recs);
        assert!(body.len() < framed.len());
    }

    #[test]
    fn streamed_changes_and_odd_messages_round_trip() {
        let recs = vec![
            (
                10,
                1,
                change(
                    b'I',
                    Some(77),
                    16384,
                    &[(b'N', tuple(&[Some(b"1"), Some(b"x")]))],
                ),
            ),
            (
                11,
                2,
                change(b'U', Some(77), 16384, &[(b'N', tuple(&[Some(b"2"), None]))]),
            ),
            (
                12,
                3,
                change(b'D', Some(78), 16384, &[(b'K', tuple(&[Some(b"2")]))]),
            ),
            // Layouts that are not quite right stay raw.
            (13, 4, b"I".to_vec()),
            (
                14,
                5,
                change(b'I', None, 5, &[(b'K', tuple(&[Some(b"1")]))]),
            ),
            (
                15,
                6,
                change(b'U', None, 5, &[(b'K', tuple(&[])), (b'K', tuple(&[]))]),
            ),
            (16, 7, vec![b'B'; 20]),
            (17, 8, vec![b'C'; 27]),
            (18, 9, b"R\x00\x00\x40\x00public\x00t\x00d\x00\x00".to_vec()),
            (19, 10, Vec::new()),
            (20, 11, vec![0, 1, 2]),
            // A binary value and unchanged TOAST.
            (21, 12, {
                let mut t = 2u16.to_be_bytes().to_vec();
                t.extend_from_slice(b"b\x00\x00\x00\x02\x00\xff");
                t.push(b'u');
                change(b'U', None, 9, &[(b'N', t)])
            }),
            (u64::MAX, i64::MIN, commit(1, 0, u64::MAX, i64::MAX)),
        ];
        round_trip(&recs);
    }

    #[test]
    fn sequential_keys_are_stored_as_deltas() {
        let recs: Vec<_> = (0..1000u64)
            .map(|i| {
                let key = (1_000_000 + i).to_string();
                (
                    i,
                    i as i64,
                    change(b'I', None, 1, &[(b'N', tuple(&[Some(key.as_bytes())]))]),
                )
            })
            .collect();
        let body = round_trip(&recs);
        // The keys' group (the only one) chose deltas: its directory entry is relation 1,
        // column 0, mode 1, right after the decoded length and the group count.
        let mut pos = 0;
        get_uvarint(&body, &mut pos, 64).unwrap();
        assert_eq!(&body[pos..pos + 4], &[1, 1, 0, NUM_DELTA]);
        // 1000 keys of 7 digits, each 1 more than the last: a run of equal bytes.
        let stored = zstd::bulk::compress(&body, 3).unwrap();
        assert!(stored.len() < 200, "{} bytes", stored.len());
    }

    #[test]
    fn column_groups_are_capped() {
        // 70 relations of 1000 null columns each: 70,000 groups would exceed the cap, so the
        // records past it are stored raw, and everything still round-trips.
        let nulls: Vec<Option<&[u8]>> = vec![None; 1000];
        let recs: Vec<_> = (0..70u32)
            .map(|r| {
                (
                    u64::from(r),
                    0,
                    change(b'I', None, r, &[(b'N', tuple(&nulls))]),
                )
            })
            .collect();
        let body = round_trip(&recs);
        let mut pos = 0;
        get_uvarint(&body, &mut pos, 64).unwrap();
        let groups = get_uvarint(&body, &mut pos, 64).unwrap();
        assert_eq!(groups, 65_000);
        // A body declaring more groups than the cap is refused before anything is allocated.
        let mut big = Vec::new();
        put_uvarint(&mut big, 0);
        put_uvarint(&mut big, MAX_GROUPS as u64 + 1);
        big.resize(8 * (MAX_GROUPS + 1), 0);
        assert!(decode(&big, 0).unwrap_err().contains("the format's 65536"));
    }

    #[test]
    fn corrupt_bodies_are_rejected_not_trusted() {
        let recs = vec![
            (100, 1, begin(200, 5, 9)),
            (
                100,
                2,
                change(
                    b'I',
                    None,
                    1,
                    &[(b'N', tuple(&[Some(b"42"), Some(b"abc")]))],
                ),
            ),
            (230, 3, commit(0, 200, 230, 5)),
        ];
        let framed = frame(&recs);
        let body = encode(&framed, 3);
        assert!(
            decode(&body, 2).is_err(),
            "fewer records than encoded leaves stream bytes"
        );
        assert!(
            decode(&body, 4).is_err(),
            "more records than encoded runs out"
        );
        for cut in 0..body.len() {
            assert!(decode(&body[..cut], 3).is_err(), "truncated at {cut}");
        }
        // Any single flipped byte either fails or decodes to something data_crc would catch;
        // it never panics or over-allocates.
        for i in 0..body.len() {
            let mut b = body.clone();
            b[i] ^= 0x55;
            if let Ok(out) = decode(&b, 3) {
                assert!(out.len() as u64 <= MAX_EXPANSION * b.len() as u64);
            }
        }
    }

    fn arb_value() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            (-100_000i64..100_000).prop_map(|v| Some(v.to_string().into_bytes())),
            proptest::collection::vec(any::<u8>(), 0..12).prop_map(Some),
            proptest::sample::select(vec!["0", "-0", "01", "-", "9999999999999999999"])
                .prop_map(|v| Some(v.as_bytes().to_vec())),
        ]
    }

    fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
        fn tuple_s() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(arb_value(), 0..5).prop_map(|cols| {
                let refs: Vec<Option<&[u8]>> = cols.iter().map(|c| c.as_deref()).collect();
                tuple(&refs)
            })
        }
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(a, b, c)| begin(a, b, c)),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>())
                .prop_map(|(f, a, b, c)| commit(f, a, b, c)),
            (
                prop_oneof![Just(b'I'), Just(b'U'), Just(b'D')],
                proptest::option::of(any::<u32>()),
                0u32..4,
                prop_oneof![Just(b'N'), Just(b'K'), Just(b'O'), any::<u8>()],
                tuple_s(),
                proptest::option::of(tuple_s()),
            )
                .prop_map(|(tag, xid, rel, t1, a, b)| {
                    let mut tuples = vec![(t1, a)];
                    if let Some(b) = b {
                        tuples.push((b'N', b));
                    }
                    change(tag, xid, rel, &tuples)
                }),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    proptest! {
        #[test]
        fn any_records_round_trip(
            recs in proptest::collection::vec((any::<u64>(), any::<i64>(), arb_payload()), 1..40)
        ) {
            let framed = frame(&recs);
            let body = encode(&framed, recs.len() as u32);
            prop_assert!(framed.len() as u64 <= MAX_EXPANSION * body.len() as u64);
            prop_assert_eq!(decode(&body, recs.len() as u32).unwrap(), framed);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), n in 0u32..8) {
            let _ = decode(&body, n);
        }
    }
}
