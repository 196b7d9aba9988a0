//! Pure decoder (and encoder) of pgoutput logical replication messages.
//!
//! Owns: parsing the payload of one XLogData message produced by the `pgoutput` output plugin,
//! for logical replication protocol versions 1–4, into a [`Message`], and the exact inverse,
//! [`encode`], used to build fixtures and by property tests. The format is PostgreSQL's
//! "Logical Replication Message Formats" (protocol documentation, `proto.c` on the server).
//!
//! Does not own: any I/O, the replication protocol framing around the payload (XLogData
//! header, keepalives), or state across messages. The one piece of context a payload cannot
//! carry — whether it lies between Stream Start and Stream Stop, where Relation, Type, Insert,
//! Update, Delete, Truncate and Message carry an extra transaction id — is passed by the caller
//! as `in_stream`.
//!
//! Invariants:
//! - [`decode`] never panics, whatever the bytes: every read is bounds-checked, no length or
//!   count from the input is trusted for an allocation before the bytes backing it were seen.
//! - Every [`DecodeError`] names the message kind (and tag), the field and the byte offset.
//! - A payload is accepted only if it is consumed exactly: trailing bytes are an error.
//! - Column values are zero-copy slices of the input [`Bytes`].
//! - For every payload `p` that [`decode`] accepts, `encode(decode(p)) == p`.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::lsn::{Lsn, PgTimestamp};

/// Replica identity `d`: the primary key (pg_class.relreplident).
pub const REPLICA_IDENTITY_DEFAULT: u8 = b'd';
/// Replica identity `n`: nothing.
pub const REPLICA_IDENTITY_NOTHING: u8 = b'n';
/// Replica identity `f`: all columns.
pub const REPLICA_IDENTITY_FULL: u8 = b'f';
/// Replica identity `i`: a chosen unique index.
pub const REPLICA_IDENTITY_INDEX: u8 = b'i';

/// Column flag: the column is part of the replica identity key.
pub const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bit: `CASCADE` was given.
pub const TRUNCATE_CASCADE: u8 = 1;
/// Truncate option bit: `RESTART IDENTITY` was given.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Logical decoding message flag: the message is transactional.
pub const MESSAGE_TRANSACTIONAL: u8 = 1;

/// One column of a [`Message::Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// 0, or [`COLUMN_FLAG_KEY`] if the column is part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type (on the source server).
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 if none.
    pub type_modifier: i32,
}

impl Column {
    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & COLUMN_FLAG_KEY != 0
    }
}

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOASTed value; the actual value is not sent.
    UnchangedToast,
    /// `t`: the value in text format (the type's output function). Slice of the payload.
    Text(Bytes),
    /// `b`: the value in binary format (the type's send function). Slice of the payload.
    Binary(Bytes),
}

/// The column values of one row, in the column order of the Relation message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TupleData(pub Vec<Value>);

/// The old row sent with an Update or Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the replica identity key columns are set, the others are [`Value::Null`].
    Key(TupleData),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

impl OldTuple {
    /// The tuple, whichever kind it is.
    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// One decoded pgoutput message. Field names follow the PostgreSQL documentation.
///
/// `xid: Option<u32>` on Relation, Type, Insert, Update, Delete, Truncate and Message is the
/// transaction id that is present only inside a streamed transaction (protocol ≥ 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `B`: start of a transaction.
    Begin {
        final_lsn: Lsn,
        commit_time: PgTimestamp,
        xid: u32,
    },
    /// `C`: end of a transaction.
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// `O`: the transaction originated on another node.
    Origin { commit_lsn: Lsn, name: String },
    /// `R`: description of a relation, sent before its first change (and after it changed).
    Relation {
        xid: Option<u32>,
        oid: u32,
        /// Schema name; empty for pg_catalog.
        namespace: String,
        name: String,
        /// `pg_class.relreplident`: `d`, `n`, `f` or `i`.
        replica_identity: u8,
        columns: Vec<Column>,
    },
    /// `Y`: description of a data type.
    Type {
        xid: Option<u32>,
        oid: u32,
        namespace: String,
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        xid: Option<u32>,
        relid: u32,
        new: TupleData,
    },
    /// `U`: a row was updated.
    Update {
        xid: Option<u32>,
        relid: u32,
        old: Option<OldTuple>,
        new: TupleData,
    },
    /// `D`: a row was deleted.
    Delete {
        xid: Option<u32>,
        relid: u32,
        old: OldTuple,
    },
    /// `T`: relations were truncated.
    Truncate {
        xid: Option<u32>,
        /// Bits [`TRUNCATE_CASCADE`] and [`TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        relids: Vec<u32>,
    },
    /// `M`: a logical decoding message (`pg_logical_emit_message`).
    Message {
        xid: Option<u32>,
        /// [`MESSAGE_TRANSACTIONAL`] or 0.
        flags: u8,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// `S`: start of a chunk of a streamed (in-progress) transaction.
    StreamStart { xid: u32, first_segment: bool },
    /// `E`: end of a chunk of a streamed transaction.
    StreamStop,
    /// `c`: a streamed transaction committed.
    StreamCommit {
        xid: u32,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// `A`: a streamed (sub)transaction aborted.
    StreamAbort {
        xid: u32,
        subxid: u32,
        /// Abort LSN and time: only with protocol 4 and parallel streaming.
        abort: Option<(Lsn, PgTimestamp)>,
    },
    /// `b`: start of a prepared transaction (two-phase, protocol ≥ 3).
    BeginPrepare {
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: PgTimestamp,
        xid: u32,
        gid: String,
    },
    /// `P`: a transaction was prepared.
    Prepare {
        flags: u8,
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: PgTimestamp,
        xid: u32,
        gid: String,
    },
    /// `K`: a prepared transaction was committed.
    CommitPrepared {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
        xid: u32,
        gid: String,
    },
    /// `r`: a prepared transaction was rolled back.
    RollbackPrepared {
        flags: u8,
        prepare_end_lsn: Lsn,
        rollback_end_lsn: Lsn,
        prepare_time: PgTimestamp,
        rollback_time: PgTimestamp,
        xid: u32,
        gid: String,
    },
    /// `p`: a streamed transaction was prepared.
    StreamPrepare {
        flags: u8,
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: PgTimestamp,
        xid: u32,
        gid: String,
    },
}

/// Every message tag this module knows, with its kind name.
const KINDS: &[(u8, &str)] = &[
    (b'B', "Begin"),
    (b'C', "Commit"),
    (b'O', "Origin"),
    (b'R', "Relation"),
    (b'Y', "Type"),
    (b'I', "Insert"),
    (b'U', "Update"),
    (b'D', "Delete"),
    (b'T', "Truncate"),
    (b'M', "Message"),
    (b'S', "StreamStart"),
    (b'E', "StreamStop"),
    (b'c', "StreamCommit"),
    (b'A', "StreamAbort"),
    (b'b', "BeginPrepare"),
    (b'P', "Prepare"),
    (b'K', "CommitPrepared"),
    (b'r', "RollbackPrepared"),
    (b'p', "StreamPrepare"),
];

/// Kind name of a message tag, `"unknown"` if the tag is not a pgoutput message.
pub fn kind_of_tag(tag: u8) -> &'static str {
    KINDS
        .iter()
        .find(|(t, _)| *t == tag)
        .map_or("unknown", |(_, k)| k)
}

impl Message {
    /// The message's tag byte on the wire, as a char (`'B'`, `'I'`, …).
    pub fn tag(&self) -> char {
        (match self {
            Message::Begin { .. } => b'B',
            Message::Commit { .. } => b'C',
            Message::Origin { .. } => b'O',
            Message::Relation { .. } => b'R',
            Message::Type { .. } => b'Y',
            Message::Insert { .. } => b'I',
            Message::Update { .. } => b'U',
            Message::Delete { .. } => b'D',
            Message::Truncate { .. } => b'T',
            Message::Message { .. } => b'M',
            Message::StreamStart { .. } => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit { .. } => b'c',
            Message::StreamAbort { .. } => b'A',
            Message::BeginPrepare { .. } => b'b',
            Message::Prepare { .. } => b'P',
            Message::CommitPrepared { .. } => b'K',
            Message::RollbackPrepared { .. } => b'r',
            Message::StreamPrepare { .. } => b'p',
        }) as char
    }

    /// The message's kind name (`"Begin"`, `"Insert"`, …), for logs and errors.
    pub fn kind(&self) -> &'static str {
        kind_of_tag(self.tag() as u8)
    }

    /// The streamed-transaction xid of the messages that carry one only inside a stream
    /// (Relation, Type, Insert, Update, Delete, Truncate, Message); `None` for all others.
    /// `decode(&encoded, m.stream_xid().is_some())` is the way to decode an encoded `m`.
    pub fn stream_xid(&self) -> Option<u32> {
        match self {
            Message::Relation { xid, .. }
            | Message::Type { xid, .. }
            | Message::Insert { xid, .. }
            | Message::Update { xid, .. }
            | Message::Delete { xid, .. }
            | Message::Truncate { xid, .. }
            | Message::Message { xid, .. } => *xid,
            _ => None,
        }
    }
}

impl fmt::Display for Message {
    /// The kind and tag, e.g. `Insert ('I')`; not the content (which may be large or private).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ('{}')", self.kind(), self.tag())
    }
}

/// The field a decode error is about: a static name and, inside a list, the element's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// What is being read, e.g. `"relation name"` or `"new tuple value length"`.
    pub name: &'static str,
    /// Index of the column / relation id / tuple value, when the field is inside a list.
    pub index: Option<usize>,
}

impl Field {
    const fn new(name: &'static str) -> Field {
        Field { name, index: None }
    }

    fn at(name: &'static str, index: usize) -> Field {
        Field {
            name,
            index: Some(index),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{} #{}", self.name, i),
            None => f.write_str(self.name),
        }
    }
}

/// Why a payload could not be decoded. Offsets are byte offsets into the payload (the tag is
/// at offset 0).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload has no bytes at all.
    #[error("empty pgoutput payload: no message tag")]
    Empty,
    /// The first byte is not a known message tag.
    #[error("unknown pgoutput message tag {:?} (0x{tag:02X}) at offset 0", *tag as char)]
    UnknownTag { tag: u8 },
    /// The payload ended inside a field.
    #[error(
        "{} ('{}') message truncated: {field} at offset {offset} needs {needed} bytes, {available} left",
        kind_of_tag(*tag), *tag as char
    )]
    Truncated {
        tag: u8,
        field: Field,
        offset: usize,
        needed: usize,
        available: usize,
    },
    /// A string field has no terminating NUL before the end of the payload.
    #[error(
        "{} ('{}') message: string {field} at offset {offset} has no terminating NUL",
        kind_of_tag(*tag), *tag as char
    )]
    UnterminatedString {
        tag: u8,
        field: Field,
        offset: usize,
    },
    /// A string field is not valid UTF-8.
    #[error(
        "{} ('{}') message: string {field} at offset {offset} is not valid UTF-8 (invalid byte at offset {bad_offset})",
        kind_of_tag(*tag), *tag as char
    )]
    InvalidUtf8 {
        tag: u8,
        field: Field,
        offset: usize,
        bad_offset: usize,
    },
    /// A field holds a value the format does not allow (unknown tuple kind, negative length…).
    #[error(
        "{} ('{}') message: invalid {field} at offset {offset}: {detail}",
        kind_of_tag(*tag), *tag as char
    )]
    InvalidValue {
        tag: u8,
        field: Field,
        offset: usize,
        detail: String,
    },
    /// Bytes remain after a complete message.
    #[error(
        "{} ('{}') message: {count} trailing bytes after the complete message, at offset {offset}",
        kind_of_tag(*tag), *tag as char
    )]
    TrailingBytes {
        tag: u8,
        offset: usize,
        count: usize,
    },
}

/// Bounds-checked cursor over one payload; every read names its field for errors.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next `n` bytes as a range into `buf`.
    fn take(&mut self, n: usize, field: Field) -> Result<std::ops::Range<usize>, DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                tag: self.tag,
                field,
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(start..self.pos)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], DecodeError> {
        let range = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[range]);
        Ok(out)
    }

    fn u8(&mut self, field: Field) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: Field) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: Field) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: Field) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: Field) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn lsn(&mut self, field: Field) -> Result<Lsn, DecodeError> {
        self.u64(field).map(Lsn)
    }

    fn timestamp(&mut self, field: Field) -> Result<PgTimestamp, DecodeError> {
        Ok(PgTimestamp(i64::from_be_bytes(self.array(field)?)))
    }

    fn invalid(&self, field: Field, offset: usize, detail: String) -> DecodeError {
        DecodeError::InvalidValue {
            tag: self.tag,
            field,
            offset,
            detail,
        }
    }

    /// A NUL-terminated UTF-8 string; the NUL is consumed, not returned.
    fn string(&mut self, field: Field) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString {
                tag: self.tag,
                field,
                offset: start,
            })?;
        let s = std::str::from_utf8(&rest[..len]).map_err(|e| DecodeError::InvalidUtf8 {
            tag: self.tag,
            field,
            offset: start,
            bad_offset: start + e.valid_up_to(),
        })?;
        self.pos = start + len + 1;
        Ok(s.to_owned())
    }

    /// An Int32 length (must not be negative) followed by that many bytes, zero-copy.
    fn counted_bytes(&mut self, len_field: Field, data_field: Field) -> Result<Bytes, DecodeError> {
        let offset = self.pos;
        let len = self.i32(len_field)?;
        let len = usize::try_from(len)
            .map_err(|_| self.invalid(len_field, offset, format!("negative length {len}")))?;
        let range = self.take(len, data_field)?;
        Ok(self.buf.slice(range))
    }

    /// The xid present only inside a streamed transaction.
    fn stream_xid(&mut self, in_stream: bool) -> Result<Option<u32>, DecodeError> {
        if in_stream {
            self.u32(Field::new("xid")).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Tuple data: Int16 column count, then per column a kind byte and maybe a value.
    fn tuple(&mut self, which: TupleWhich) -> Result<TupleData, DecodeError> {
        let count = self.u16(Field::new(which.count_field()))? as usize;
        // Each value takes at least one byte: don't reserve more than the payload can hold.
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for i in 0..count {
            let offset = self.pos;
            let kind_field = Field::at(which.kind_field(), i);
            let value = match self.u8(kind_field)? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.counted_bytes(
                    Field::at(which.length_field(), i),
                    Field::at(which.data_field(), i),
                )?),
                b'b' => Value::Binary(self.counted_bytes(
                    Field::at(which.length_field(), i),
                    Field::at(which.data_field(), i),
                )?),
                other => {
                    return Err(self.invalid(
                        kind_field,
                        offset,
                        format!(
                            "value kind {:?} (0x{other:02X}), expected 'n', 'u', 't' or 'b'",
                            other as char
                        ),
                    ))
                }
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    /// Fails if any byte is left.
    fn finish(self) -> Result<(), DecodeError> {
        if self.remaining() > 0 {
            return Err(DecodeError::TrailingBytes {
                tag: self.tag,
                offset: self.pos,
                count: self.remaining(),
            });
        }
        Ok(())
    }
}

/// Which tuple of a message is being read, to name fields in errors.
#[derive(Clone, Copy)]
enum TupleWhich {
    New,
    Old,
}

impl TupleWhich {
    fn count_field(self) -> &'static str {
        match self {
            TupleWhich::New => "new tuple column count",
            TupleWhich::Old => "old tuple column count",
        }
    }
    fn kind_field(self) -> &'static str {
        match self {
            TupleWhich::New => "new tuple value kind",
            TupleWhich::Old => "old tuple value kind",
        }
    }
    fn length_field(self) -> &'static str {
        match self {
            TupleWhich::New => "new tuple value length",
            TupleWhich::Old => "old tuple value length",
        }
    }
    fn data_field(self) -> &'static str {
        match self {
            TupleWhich::New => "new tuple value data",
            TupleWhich::Old => "old tuple value data",
        }
    }
}

/// Decodes the payload of one XLogData message from pgoutput.
///
/// `in_stream` is true when the message lies between Stream Start and Stream Stop (protocol
/// ≥ 2); Relation, Type, Insert, Update, Delete, Truncate and Message then carry an `xid`.
/// Never panics; see [`DecodeError`] for what is rejected.
pub fn decode(payload: &Bytes, in_stream: bool) -> Result<Message, DecodeError> {
    let tag = *payload.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        buf: payload,
        pos: 1,
        tag,
    };
    let f = Field::new;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.lsn(f("final LSN"))?,
            commit_time: r.timestamp(f("commit timestamp"))?,
            xid: r.u32(f("xid"))?,
        },
        b'C' => Message::Commit {
            flags: r.u8(f("flags"))?,
            commit_lsn: r.lsn(f("commit LSN"))?,
            end_lsn: r.lsn(f("end LSN"))?,
            commit_time: r.timestamp(f("commit timestamp"))?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.lsn(f("origin commit LSN"))?,
            name: r.string(f("origin name"))?,
        },
        b'R' => {
            let xid = r.stream_xid(in_stream)?;
            let oid = r.u32(f("relation oid"))?;
            let namespace = r.string(f("namespace"))?;
            let name = r.string(f("relation name"))?;
            let replica_identity = r.u8(f("replica identity"))?;
            let count = r.u16(f("column count"))? as usize;
            // A column takes at least 10 bytes (flags, empty name, type oid, modifier).
            let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
            for i in 0..count {
                columns.push(Column {
                    flags: r.u8(Field::at("column flags", i))?,
                    name: r.string(Field::at("column name", i))?,
                    type_oid: r.u32(Field::at("column type oid", i))?,
                    type_modifier: r.i32(Field::at("column type modifier", i))?,
                });
            }
            Message::Relation {
                xid,
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            xid: r.stream_xid(in_stream)?,
            oid: r.u32(f("type oid"))?,
            namespace: r.string(f("namespace"))?,
            name: r.string(f("type name"))?,
        },
        b'I' => {
            let xid = r.stream_xid(in_stream)?;
            let relid = r.u32(f("relation oid"))?;
            expect_marker(&mut r, b'N', "new tuple marker")?;
            Message::Insert {
                xid,
                relid,
                new: r.tuple(TupleWhich::New)?,
            }
        }
        b'U' => {
            let xid = r.stream_xid(in_stream)?;
            let relid = r.u32(f("relation oid"))?;
            let offset = r.pos;
            let marker = r.u8(f("tuple marker"))?;
            let old = match marker {
                b'K' => Some(OldTuple::Key(r.tuple(TupleWhich::Old)?)),
                b'O' => Some(OldTuple::Full(r.tuple(TupleWhich::Old)?)),
                b'N' => None,
                other => {
                    return Err(r.invalid(
                        f("tuple marker"),
                        offset,
                        format!("{:?}, expected 'K', 'O' or 'N'", other as char),
                    ))
                }
            };
            if old.is_some() {
                expect_marker(&mut r, b'N', "new tuple marker")?;
            }
            Message::Update {
                xid,
                relid,
                old,
                new: r.tuple(TupleWhich::New)?,
            }
        }
        b'D' => {
            let xid = r.stream_xid(in_stream)?;
            let relid = r.u32(f("relation oid"))?;
            let offset = r.pos;
            let old = match r.u8(f("old tuple marker"))? {
                b'K' => OldTuple::Key(r.tuple(TupleWhich::Old)?),
                b'O' => OldTuple::Full(r.tuple(TupleWhich::Old)?),
                other => {
                    return Err(r.invalid(
                        f("old tuple marker"),
                        offset,
                        format!("{:?}, expected 'K' or 'O'", other as char),
                    ))
                }
            };
            Message::Delete { xid, relid, old }
        }
        b'T' => {
            let xid = r.stream_xid(in_stream)?;
            let count = r.u32(f("relation count"))? as usize;
            let options = r.u8(f("options"))?;
            let mut relids = Vec::with_capacity(count.min(r.remaining() / 4));
            for i in 0..count {
                relids.push(r.u32(Field::at("relation oid", i))?);
            }
            Message::Truncate {
                xid,
                options,
                relids,
            }
        }
        b'M' => Message::Message {
            xid: r.stream_xid(in_stream)?,
            flags: r.u8(f("flags"))?,
            lsn: r.lsn(f("message LSN"))?,
            prefix: r.string(f("prefix"))?,
            content: r.counted_bytes(f("content length"), f("content"))?,
        },
        b'S' => {
            let xid = r.u32(f("xid"))?;
            let offset = r.pos;
            let first_segment = match r.u8(f("first segment"))? {
                0 => false,
                1 => true,
                other => {
                    return Err(r.invalid(
                        f("first segment"),
                        offset,
                        format!("{other}, expected 0 or 1"),
                    ))
                }
            };
            Message::StreamStart { xid, first_segment }
        }
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32(f("xid"))?,
            flags: r.u8(f("flags"))?,
            commit_lsn: r.lsn(f("commit LSN"))?,
            end_lsn: r.lsn(f("end LSN"))?,
            commit_time: r.timestamp(f("commit timestamp"))?,
        },
        b'A' => {
            let xid = r.u32(f("xid"))?;
            let subxid = r.u32(f("subtransaction xid"))?;
            // The abort LSN and time are sent only with protocol 4 and streaming = parallel;
            // the payload itself tells: nothing more, or exactly both.
            let abort = if r.remaining() == 0 {
                None
            } else {
                Some((r.lsn(f("abort LSN"))?, r.timestamp(f("abort timestamp"))?))
            };
            Message::StreamAbort { xid, subxid, abort }
        }
        b'b' => Message::BeginPrepare {
            prepare_lsn: r.lsn(f("prepare LSN"))?,
            end_lsn: r.lsn(f("end LSN"))?,
            prepare_time: r.timestamp(f("prepare timestamp"))?,
            xid: r.u32(f("xid"))?,
            gid: r.string(f("gid"))?,
        },
        b'P' | b'p' => {
            let flags = r.u8(f("flags"))?;
            let prepare_lsn = r.lsn(f("prepare LSN"))?;
            let end_lsn = r.lsn(f("end LSN"))?;
            let prepare_time = r.timestamp(f("prepare timestamp"))?;
            let xid = r.u32(f("xid"))?;
            let gid = r.string(f("gid"))?;
            if tag == b'P' {
                Message::Prepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                }
            } else {
                Message::StreamPrepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                }
            }
        }
        b'K' => Message::CommitPrepared {
            flags: r.u8(f("flags"))?,
            commit_lsn: r.lsn(f("commit LSN"))?,
            end_lsn: r.lsn(f("end LSN"))?,
            commit_time: r.timestamp(f("commit timestamp"))?,
            xid: r.u32(f("xid"))?,
            gid: r.string(f("gid"))?,
        },
        b'r' => Message::RollbackPrepared {
            flags: r.u8(f("flags"))?,
            prepare_end_lsn: r.lsn(f("prepare end LSN"))?,
            rollback_end_lsn: r.lsn(f("rollback end LSN"))?,
            prepare_time: r.timestamp(f("prepare timestamp"))?,
            rollback_time: r.timestamp(f("rollback timestamp"))?,
            xid: r.u32(f("xid"))?,
            gid: r.string(f("gid"))?,
        },
        other => return Err(DecodeError::UnknownTag { tag: other }),
    };
    r.finish()?;
    Ok(msg)
}

/// Reads one marker byte that must equal `expected`.
fn expect_marker(r: &mut Reader<'_>, expected: u8, name: &'static str) -> Result<(), DecodeError> {
    let offset = r.pos;
    let got = r.u8(Field::new(name))?;
    if got != expected {
        return Err(r.invalid(
            Field::new(name),
            offset,
            format!("{:?}, expected {:?}", got as char, expected as char),
        ));
    }
    Ok(())
}

/// Appends the wire form of `msg` to `out`: the exact inverse of [`decode`] (decode it with
/// `in_stream = msg.stream_xid().is_some()`).
///
/// # Panics
/// If `msg` cannot be represented on the wire — these are bugs in the caller, never caused by
/// decoded input: a string containing a NUL byte, more than 65535 columns or tuple values,
/// more than `u32::MAX` truncated relations, or a value or message content longer than
/// `i32::MAX` bytes.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    out.put_u8(msg.tag() as u8);
    match msg {
        Message::Begin {
            final_lsn,
            commit_time,
            xid,
        } => {
            out.put_u64(final_lsn.0);
            out.put_i64(commit_time.0);
            out.put_u32(*xid);
        }
        Message::Commit {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.put_u8(*flags);
            out.put_u64(commit_lsn.0);
            out.put_u64(end_lsn.0);
            out.put_i64(commit_time.0);
        }
        Message::Origin { commit_lsn, name } => {
            out.put_u64(commit_lsn.0);
            put_string(out, name);
        }
        Message::Relation {
            xid,
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } => {
            put_xid(out, *xid);
            out.put_u32(*oid);
            put_string(out, namespace);
            put_string(out, name);
            out.put_u8(*replica_identity);
            out.put_u16(count16(columns.len(), "columns"));
            for c in columns {
                out.put_u8(c.flags);
                put_string(out, &c.name);
                out.put_u32(c.type_oid);
                out.put_i32(c.type_modifier);
            }
        }
        Message::Type {
            xid,
            oid,
            namespace,
            name,
        } => {
            put_xid(out, *xid);
            out.put_u32(*oid);
            put_string(out, namespace);
            put_string(out, name);
        }
        Message::Insert { xid, relid, new } => {
            put_xid(out, *xid);
            out.put_u32(*relid);
            out.put_u8(b'N');
            put_tuple(out, new);
        }
        Message::Update {
            xid,
            relid,
            old,
            new,
        } => {
            put_xid(out, *xid);
            out.put_u32(*relid);
            if let Some(old) = old {
                put_old_tuple(out, old);
            }
            out.put_u8(b'N');
            put_tuple(out, new);
        }
        Message::Delete { xid, relid, old } => {
            put_xid(out, *xid);
            out.put_u32(*relid);
            put_old_tuple(out, old);
        }
        Message::Truncate {
            xid,
            options,
            relids,
        } => {
            put_xid(out, *xid);
            let count = u32::try_from(relids.len()).expect("more than u32::MAX relations");
            out.put_u32(count);
            out.put_u8(*options);
            for relid in relids {
                out.put_u32(*relid);
            }
        }
        Message::Message {
            xid,
            flags,
            lsn,
            prefix,
            content,
        } => {
            put_xid(out, *xid);
            out.put_u8(*flags);
            out.put_u64(lsn.0);
            put_string(out, prefix);
            put_counted_bytes(out, content);
        }
        Message::StreamStart { xid, first_segment } => {
            out.put_u32(*xid);
            out.put_u8(u8::from(*first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit {
            xid,
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
        } => {
            out.put_u32(*xid);
            out.put_u8(*flags);
            out.put_u64(commit_lsn.0);
            out.put_u64(end_lsn.0);
            out.put_i64(commit_time.0);
        }
        Message::StreamAbort { xid, subxid, abort } => {
            out.put_u32(*xid);
            out.put_u32(*subxid);
            if let Some((lsn, time)) = abort {
                out.put_u64(lsn.0);
                out.put_i64(time.0);
            }
        }
        Message::BeginPrepare {
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } => {
            out.put_u64(prepare_lsn.0);
            out.put_u64(end_lsn.0);
            out.put_i64(prepare_time.0);
            out.put_u32(*xid);
            put_string(out, gid);
        }
        Message::Prepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        }
        | Message::StreamPrepare {
            flags,
            prepare_lsn,
            end_lsn,
            prepare_time,
            xid,
            gid,
        } => {
            out.put_u8(*flags);
            out.put_u64(prepare_lsn.0);
            out.put_u64(end_lsn.0);
            out.put_i64(prepare_time.0);
            out.put_u32(*xid);
            put_string(out, gid);
        }
        Message::CommitPrepared {
            flags,
            commit_lsn,
            end_lsn,
            commit_time,
            xid,
            gid,
        } => {
            out.put_u8(*flags);
            out.put_u64(commit_lsn.0);
            out.put_u64(end_lsn.0);
            out.put_i64(commit_time.0);
            out.put_u32(*xid);
            put_string(out, gid);
        }
        Message::RollbackPrepared {
            flags,
            prepare_end_lsn,
            rollback_end_lsn,
            prepare_time,
            rollback_time,
            xid,
            gid,
        } => {
            out.put_u8(*flags);
            out.put_u64(prepare_end_lsn.0);
            out.put_u64(rollback_end_lsn.0);
            out.put_i64(prepare_time.0);
            out.put_i64(rollback_time.0);
            out.put_u32(*xid);
            put_string(out, gid);
        }
    }
}

fn put_xid(out: &mut BytesMut, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

fn put_string(out: &mut BytesMut, s: &str) {
    assert!(
        !s.as_bytes().contains(&0),
        "pgoutput strings cannot contain NUL: {s:?}"
    );
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn count16(n: usize, what: &str) -> u16 {
    u16::try_from(n).unwrap_or_else(|_| panic!("{n} {what} do not fit the wire's Int16 count"))
}

fn put_counted_bytes(out: &mut BytesMut, data: &[u8]) {
    let len = i32::try_from(data.len())
        .unwrap_or_else(|_| panic!("{} bytes do not fit the wire's Int32 length", data.len()));
    out.put_i32(len);
    out.put_slice(data);
}

fn put_old_tuple(out: &mut BytesMut, old: &OldTuple) {
    match old {
        OldTuple::Key(t) => {
            out.put_u8(b'K');
            put_tuple(out, t);
        }
        OldTuple::Full(t) => {
            out.put_u8(b'O');
            put_tuple(out, t);
        }
    }
}

fn put_tuple(out: &mut BytesMut, tuple: &TupleData) {
    out.put_u16(count16(tuple.0.len(), "tuple values"));
    for value in &tuple.0 {
        match value {
            Value::Null => out.put_u8(b'n'),
            Value::UnchangedToast => out.put_u8(b'u'),
            Value::Text(data) => {
                out.put_u8(b't');
                put_counted_bytes(out, data);
            }
            Value::Binary(data) => {
                out.put_u8(b'b');
                put_counted_bytes(out, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Concatenates wire fragments into one payload.
    fn wire(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    fn be32(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    fn be64(v: u64) -> [u8; 8] {
        v.to_be_bytes()
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Asserts that `payload` decodes to `expected` and that `expected` encodes to `payload`.
    fn check(payload: Bytes, in_stream: bool, expected: Message) {
        let decoded = decode(&payload, in_stream)
            .unwrap_or_else(|e| panic!("{expected} did not decode: {e}"));
        assert_eq!(decoded, expected);
        let mut out = BytesMut::new();
        encode(&expected, &mut out);
        assert_eq!(out.freeze(), payload, "encoding of {expected}");
    }

    const LSN1: u64 = 0x0000_0016_B374_D848;
    const LSN2: u64 = 0x0000_0016_B374_D900;
    const TIME: i64 = 0x0002_9C7E_0F3C_1A2B;

    #[test]
    fn begin() {
        check(
            wire(&[b"B", &be64(LSN1), &TIME.to_be_bytes(), &be32(771)]),
            false,
            Message::Begin {
                final_lsn: Lsn(LSN1),
                commit_time: PgTimestamp(TIME),
                xid: 771,
            },
        );
    }

    #[test]
    fn commit() {
        check(
            wire(&[b"C\0", &be64(LSN1), &be64(LSN2), &TIME.to_be_bytes()]),
            false,
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                commit_time: PgTimestamp(TIME),
            },
        );
    }

    #[test]
    fn origin() {
        check(
            wire(&[b"O", &be64(LSN1), b"pg_16389\0"]),
            false,
            Message::Origin {
                commit_lsn: Lsn(LSN1),
                name: "pg_16389".into(),
            },
        );
    }

    fn relation_wire(xid: Option<u32>) -> Bytes {
        let xid = xid.map(|x| be32(x).to_vec()).unwrap_or_default();
        wire(&[
            b"R",
            &xid,
            &be32(16390),
            b"public\0",
            b"caf\xc3\xa9\0",
            b"d",
            &2u16.to_be_bytes(),
            b"\x01id\0",
            &be32(23),
            &(-1i32).to_be_bytes(),
            b"\x00name\0",
            &be32(1043),
            &68i32.to_be_bytes(),
        ])
    }

    fn relation_message(xid: Option<u32>) -> Message {
        Message::Relation {
            xid,
            oid: 16390,
            namespace: "public".into(),
            name: "café".into(),
            replica_identity: REPLICA_IDENTITY_DEFAULT,
            columns: vec![
                Column {
                    flags: COLUMN_FLAG_KEY,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "name".into(),
                    type_oid: 1043,
                    type_modifier: 68,
                },
            ],
        }
    }

    #[test]
    fn relation_outside_and_inside_a_stream() {
        check(relation_wire(None), false, relation_message(None));
        check(relation_wire(Some(900)), true, relation_message(Some(900)));
        if let Message::Relation { columns, .. } = relation_message(None) {
            assert!(columns[0].is_key());
            assert!(!columns[1].is_key());
        }
    }

    #[test]
    fn relation_in_pg_catalog_has_empty_namespace() {
        check(
            wire(&[b"R", &be32(1), b"\0", b"t\0", b"n", &0u16.to_be_bytes()]),
            false,
            Message::Relation {
                xid: None,
                oid: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: REPLICA_IDENTITY_NOTHING,
                columns: vec![],
            },
        );
    }

    #[test]
    fn type_message() {
        check(
            wire(&[b"Y", &be32(16400), b"public\0", b"mood\0"]),
            false,
            Message::Type {
                xid: None,
                oid: 16400,
                namespace: "public".into(),
                name: "mood".into(),
            },
        );
        check(
            wire(&[b"Y", &be32(5), &be32(16400), b"public\0", b"mood\0"]),
            true,
            Message::Type {
                xid: Some(5),
                oid: 16400,
                namespace: "public".into(),
                name: "mood".into(),
            },
        );
    }

    #[test]
    fn insert_with_text_null_unchanged_toast_and_binary_values() {
        let payload = wire(&[
            b"I",
            &be32(16390),
            b"N",
            &4u16.to_be_bytes(),
            b"t",
            &be32(2),
            b"42",
            b"n",
            b"u",
            b"b",
            &be32(3),
            b"\x00\x01\xff",
        ]);
        let expected = Message::Insert {
            xid: None,
            relid: 16390,
            new: TupleData(vec![
                text("42"),
                Value::Null,
                Value::UnchangedToast,
                Value::Binary(Bytes::from_static(b"\x00\x01\xff")),
            ]),
        };
        check(payload.clone(), false, expected);
        // Zero-copy: the value points into the payload.
        if let Ok(Message::Insert { new, .. }) = decode(&payload, false) {
            if let Value::Text(v) = &new.0[0] {
                assert_eq!(v.as_ptr(), payload[13..].as_ptr());
            } else {
                panic!("expected a text value");
            }
        }
    }

    #[test]
    fn insert_in_stream_and_empty_text_value() {
        check(
            wire(&[
                b"I",
                &be32(77),
                &be32(16390),
                b"N",
                &1u16.to_be_bytes(),
                b"t",
                &be32(0),
            ]),
            true,
            Message::Insert {
                xid: Some(77),
                relid: 16390,
                new: TupleData(vec![Value::Text(Bytes::new())]),
            },
        );
    }

    #[test]
    fn update_without_old_tuple_with_key_and_with_full_old_tuple() {
        let new = || TupleData(vec![text("1"), text("b")]);
        let new_wire: &[u8] = b"N\x00\x02t\x00\x00\x00\x011t\x00\x00\x00\x01b";
        check(
            wire(&[b"U", &be32(16390), new_wire]),
            false,
            Message::Update {
                xid: None,
                relid: 16390,
                old: None,
                new: new(),
            },
        );
        check(
            wire(&[
                b"U",
                &be32(16390),
                b"K\x00\x02t\x00\x00\x00\x010n",
                new_wire,
            ]),
            false,
            Message::Update {
                xid: None,
                relid: 16390,
                old: Some(OldTuple::Key(TupleData(vec![text("0"), Value::Null]))),
                new: new(),
            },
        );
        check(
            wire(&[
                b"U",
                &be32(3),
                &be32(16390),
                b"O\x00\x02t\x00\x00\x00\x011u",
                new_wire,
            ]),
            true,
            Message::Update {
                xid: Some(3),
                relid: 16390,
                old: Some(OldTuple::Full(TupleData(vec![
                    text("1"),
                    Value::UnchangedToast,
                ]))),
                new: new(),
            },
        );
    }

    #[test]
    fn delete_with_key_and_full_old_tuple() {
        check(
            wire(&[b"D", &be32(16390), b"K\x00\x02t\x00\x00\x00\x017n"]),
            false,
            Message::Delete {
                xid: None,
                relid: 16390,
                old: OldTuple::Key(TupleData(vec![text("7"), Value::Null])),
            },
        );
        check(
            wire(&[b"D", &be32(9), &be32(16390), b"O\x00\x01n"]),
            true,
            Message::Delete {
                xid: Some(9),
                relid: 16390,
                old: OldTuple::Full(TupleData(vec![Value::Null])),
            },
        );
    }

    #[test]
    fn truncate() {
        check(
            wire(&[b"T", &be32(2), &[3], &be32(16390), &be32(16400)]),
            false,
            Message::Truncate {
                xid: None,
                options: TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
                relids: vec![16390, 16400],
            },
        );
        check(
            wire(&[b"T", &be32(4), &be32(1), &[0], &be32(16390)]),
            true,
            Message::Truncate {
                xid: Some(4),
                options: 0,
                relids: vec![16390],
            },
        );
    }

    #[test]
    fn logical_decoding_message() {
        check(
            wire(&[b"M\x01", &be64(LSN1), b"tidemark\0", &be32(3), b"a\0b"]),
            false,
            Message::Message {
                xid: None,
                flags: MESSAGE_TRANSACTIONAL,
                lsn: Lsn(LSN1),
                prefix: "tidemark".into(),
                content: Bytes::from_static(b"a\0b"),
            },
        );
        check(
            wire(&[b"M", &be32(8), b"\x00", &be64(LSN1), b"p\0", &be32(0)]),
            true,
            Message::Message {
                xid: Some(8),
                flags: 0,
                lsn: Lsn(LSN1),
                prefix: "p".into(),
                content: Bytes::new(),
            },
        );
    }

    #[test]
    fn stream_start_stop_commit() {
        check(
            wire(&[b"S", &be32(600), &[1]]),
            false,
            Message::StreamStart {
                xid: 600,
                first_segment: true,
            },
        );
        check(
            wire(&[b"S", &be32(600), &[0]]),
            false,
            Message::StreamStart {
                xid: 600,
                first_segment: false,
            },
        );
        check(wire(&[b"E"]), true, Message::StreamStop);
        check(
            wire(&[
                b"c",
                &be32(600),
                &[0],
                &be64(LSN1),
                &be64(LSN2),
                &TIME.to_be_bytes(),
            ]),
            false,
            Message::StreamCommit {
                xid: 600,
                flags: 0,
                commit_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                commit_time: PgTimestamp(TIME),
            },
        );
    }

    #[test]
    fn stream_abort_with_and_without_parallel_fields() {
        check(
            wire(&[b"A", &be32(600), &be32(601)]),
            false,
            Message::StreamAbort {
                xid: 600,
                subxid: 601,
                abort: None,
            },
        );
        check(
            wire(&[
                b"A",
                &be32(600),
                &be32(600),
                &be64(LSN1),
                &TIME.to_be_bytes(),
            ]),
            false,
            Message::StreamAbort {
                xid: 600,
                subxid: 600,
                abort: Some((Lsn(LSN1), PgTimestamp(TIME))),
            },
        );
        // Anything between the two lengths is a truncated parallel abort.
        let err = decode(&wire(&[b"A", &be32(600), &be32(600), &be64(LSN1)]), false);
        assert!(
            matches!(err, Err(DecodeError::Truncated { offset: 17, .. })),
            "{err:?}"
        );
    }

    #[test]
    fn two_phase_messages() {
        let times = TIME.to_be_bytes();
        check(
            wire(&[
                b"b",
                &be64(LSN1),
                &be64(LSN2),
                &times,
                &be32(700),
                b"gid-1\0",
            ]),
            false,
            Message::BeginPrepare {
                prepare_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                prepare_time: PgTimestamp(TIME),
                xid: 700,
                gid: "gid-1".into(),
            },
        );
        check(
            wire(&[
                b"P\0",
                &be64(LSN1),
                &be64(LSN2),
                &times,
                &be32(700),
                b"gid-1\0",
            ]),
            false,
            Message::Prepare {
                flags: 0,
                prepare_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                prepare_time: PgTimestamp(TIME),
                xid: 700,
                gid: "gid-1".into(),
            },
        );
        check(
            wire(&[
                b"K\0",
                &be64(LSN1),
                &be64(LSN2),
                &times,
                &be32(700),
                b"gid-1\0",
            ]),
            false,
            Message::CommitPrepared {
                flags: 0,
                commit_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                commit_time: PgTimestamp(TIME),
                xid: 700,
                gid: "gid-1".into(),
            },
        );
        check(
            wire(&[
                b"r\0",
                &be64(LSN1),
                &be64(LSN2),
                &times,
                &(TIME + 1).to_be_bytes(),
                &be32(700),
                b"gid-1\0",
            ]),
            false,
            Message::RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(LSN1),
                rollback_end_lsn: Lsn(LSN2),
                prepare_time: PgTimestamp(TIME),
                rollback_time: PgTimestamp(TIME + 1),
                xid: 700,
                gid: "gid-1".into(),
            },
        );
        check(
            wire(&[
                b"p\0",
                &be64(LSN1),
                &be64(LSN2),
                &times,
                &be32(700),
                b"gid-1\0",
            ]),
            false,
            Message::StreamPrepare {
                flags: 0,
                prepare_lsn: Lsn(LSN1),
                end_lsn: Lsn(LSN2),
                prepare_time: PgTimestamp(TIME),
                xid: 700,
                gid: "gid-1".into(),
            },
        );
    }

    #[test]
    fn tag_kind_and_display() {
        assert_eq!(Message::StreamStop.tag(), 'E');
        assert_eq!(Message::StreamStop.kind(), "StreamStop");
        assert_eq!(relation_message(None).to_string(), "Relation ('R')");
        assert_eq!(kind_of_tag(b'x'), "unknown");
    }

    #[test]
    fn errors_name_message_field_and_offset() {
        assert_eq!(decode(&Bytes::new(), false), Err(DecodeError::Empty));
        assert_eq!(
            decode(&wire(&[b"x"]), false),
            Err(DecodeError::UnknownTag { tag: b'x' })
        );

        let err = decode(&wire(&[b"B", &be64(LSN1)]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Begin ('B') message truncated: commit timestamp at offset 9 needs 8 bytes, 0 left"
        );

        let err = decode(&wire(&[b"E", b"\0"]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "StreamStop ('E') message: 1 trailing bytes after the complete message, at offset 1"
        );

        let err = decode(&wire(&[b"O", &be64(LSN1), b"abc"]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Origin ('O') message: string origin name at offset 9 has no terminating NUL"
        );

        let err = decode(&wire(&[b"Y", &be32(1), b"ok\0", b"a\xffb\0"]), false).unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidUtf8 {
                tag: b'Y',
                field: Field::new("type name"),
                offset: 8,
                bad_offset: 9,
            }
        );

        let err = decode(&wire(&[b"I", &be32(1), b"N\x00\x02nx"]), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Insert ('I') message: invalid new tuple value kind #1 at offset 9: \
             value kind 'x' (0x78), expected 'n', 'u', 't' or 'b'"
        );

        let err = decode(
            &wire(&[b"I", &be32(1), b"N\x00\x01t", &(-1i32).to_be_bytes()]),
            false,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("new tuple value length #0 at offset 9: negative length -1"),
            "{err}"
        );

        let err = decode(&wire(&[b"I", &be32(1), b"K\x00\x00"]), false).unwrap_err();
        assert!(err.to_string().contains("new tuple marker"), "{err}");

        let err = decode(&wire(&[b"U", &be32(1), b"X"]), false).unwrap_err();
        assert!(
            err.to_string().contains("expected 'K', 'O' or 'N'"),
            "{err}"
        );

        let err = decode(&wire(&[b"D", &be32(1), b"N\x00\x00"]), false).unwrap_err();
        assert!(err.to_string().contains("expected 'K' or 'O'"), "{err}");

        let err = decode(&wire(&[b"S", &be32(1), &[2]]), false).unwrap_err();
        assert!(err.to_string().contains("first segment"), "{err}");

        // A streamed message decoded as if outside a stream: the xid is read as the oid and
        // the rest is shifted.
        let streamed = relation_wire(Some(900));
        assert!(decode(&streamed, false).is_err());
        // The other way round it may even parse, into garbage: `in_stream` must be right.
        assert_ne!(
            decode(&relation_wire(None), true),
            Ok(relation_message(None))
        );
    }

    #[test]
    fn huge_counts_do_not_allocate_before_the_bytes_exist() {
        let err = decode(&wire(&[b"T", &be32(u32::MAX), &[0]]), false).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Truncated {
                    field: Field { index: Some(0), .. },
                    ..
                }
            ),
            "{err:?}"
        );
        let err = decode(
            &wire(&[b"M\0", &be64(1), b"p\0", &be32(i32::MAX as u32)]),
            false,
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Truncated { .. }), "{err:?}");
    }

    // ---- property tests ----

    fn arb_string() -> impl Strategy<Value = String> {
        "[^\u{0}]{0,12}"
    }

    fn arb_bytes() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::UnchangedToast),
            arb_bytes().prop_map(Value::Text),
            arb_bytes().prop_map(Value::Binary),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = TupleData> {
        proptest::collection::vec(arb_value(), 0..6).prop_map(TupleData)
    }

    fn arb_old_tuple() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            arb_tuple().prop_map(OldTuple::Key),
            arb_tuple().prop_map(OldTuple::Full),
        ]
    }

    fn arb_column() -> impl Strategy<Value = Column> {
        (any::<u8>(), arb_string(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| Column {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        )
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn ts() -> impl Strategy<Value = PgTimestamp> {
        any::<i64>().prop_map(PgTimestamp)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let xid = || proptest::option::of(any::<u32>());
        prop_oneof![
            (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                Message::Begin {
                    final_lsn,
                    commit_time,
                    xid,
                }
            }),
            (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, t)| {
                Message::Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time: t,
                }
            }),
            (lsn(), arb_string())
                .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name }),
            (
                xid(),
                any::<u32>(),
                arb_string(),
                arb_string(),
                any::<u8>(),
                proptest::collection::vec(arb_column(), 0..5)
            )
                .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                    Message::Relation {
                        xid,
                        oid,
                        namespace,
                        name,
                        replica_identity,
                        columns,
                    }
                }),
            (xid(), any::<u32>(), arb_string(), arb_string()).prop_map(
                |(xid, oid, namespace, name)| Message::Type {
                    xid,
                    oid,
                    namespace,
                    name
                }
            ),
            (xid(), any::<u32>(), arb_tuple()).prop_map(|(xid, relid, new)| Message::Insert {
                xid,
                relid,
                new
            }),
            (
                xid(),
                any::<u32>(),
                proptest::option::of(arb_old_tuple()),
                arb_tuple()
            )
                .prop_map(|(xid, relid, old, new)| Message::Update {
                    xid,
                    relid,
                    old,
                    new
                }),
            (xid(), any::<u32>(), arb_old_tuple()).prop_map(|(xid, relid, old)| Message::Delete {
                xid,
                relid,
                old
            }),
            (
                xid(),
                any::<u8>(),
                proptest::collection::vec(any::<u32>(), 0..5)
            )
                .prop_map(|(xid, options, relids)| Message::Truncate {
                    xid,
                    options,
                    relids
                }),
            (xid(), any::<u8>(), lsn(), arb_string(), arb_bytes()).prop_map(
                |(xid, flags, lsn, prefix, content)| Message::Message {
                    xid,
                    flags,
                    lsn,
                    prefix,
                    content
                }
            ),
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| { Message::StreamStart { xid, first_segment } }),
            Just(Message::StreamStop),
            (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, commit_time)| Message::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                }
            ),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::option::of((lsn(), ts()))
            )
                .prop_map(|(xid, subxid, abort)| Message::StreamAbort {
                    xid,
                    subxid,
                    abort
                }),
            (lsn(), lsn(), ts(), any::<u32>(), arb_string()).prop_map(
                |(prepare_lsn, end_lsn, prepare_time, xid, gid)| Message::BeginPrepare {
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid
                }
            ),
            (
                any::<u8>(),
                lsn(),
                lsn(),
                ts(),
                any::<u32>(),
                arb_string(),
                any::<bool>()
            )
                .prop_map(
                    |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid, streamed)| {
                        if streamed {
                            Message::StreamPrepare {
                                flags,
                                prepare_lsn,
                                end_lsn,
                                prepare_time,
                                xid,
                                gid,
                            }
                        } else {
                            Message::Prepare {
                                flags,
                                prepare_lsn,
                                end_lsn,
                                prepare_time,
                                xid,
                                gid,
                            }
                        }
                    }
                ),
            (any::<u8>(), lsn(), lsn(), ts(), any::<u32>(), arb_string()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time, xid, gid)| Message::CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid
                }
            ),
            (
                any::<u8>(),
                lsn(),
                lsn(),
                ts(),
                ts(),
                any::<u32>(),
                arb_string()
            )
                .prop_map(
                    |(
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_time,
                        rollback_time,
                        xid,
                        gid,
                    )| {
                        Message::RollbackPrepared {
                            flags,
                            prepare_end_lsn,
                            rollback_end_lsn,
                            prepare_time,
                            rollback_time,
                            xid,
                            gid,
                        }
                    }
                ),
        ]
    }

    fn encoded(m: &Message) -> Bytes {
        let mut out = BytesMut::new();
        encode(m, &mut out);
        out.freeze()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decode_inverts_encode(m in arb_message()) {
            let payload = encoded(&m);
            prop_assert_eq!(decode(&payload, m.stream_xid().is_some()), Ok(m));
        }

        #[test]
        fn decode_never_panics_on_arbitrary_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            in_stream in any::<bool>(),
        ) {
            let payload = Bytes::from(bytes);
            if let Ok(m) = decode(&payload, in_stream) {
                // Whatever is accepted re-encodes to the same bytes.
                prop_assert_eq!(encoded(&m), payload);
            }
        }

        #[test]
        fn decode_never_panics_on_garbage_after_a_valid_tag(
            tag in proptest::sample::select(b"BCORYIUDTMSEcAbPKrp".to_vec()),
            tail in proptest::collection::vec(any::<u8>(), 0..160),
            in_stream in any::<bool>(),
        ) {
            // Past the tag, so that every message's field parser sees arbitrary bytes.
            let mut bytes = vec![tag];
            bytes.extend_from_slice(&tail);
            let payload = Bytes::from(bytes);
            if let Ok(m) = decode(&payload, in_stream) {
                prop_assert_eq!(m.tag() as u8, tag);
                prop_assert_eq!(encoded(&m), payload);
            }
        }

        #[test]
        fn decode_never_panics_on_truncated_or_mutated_messages(
            m in arb_message(),
            flip in any::<(usize, u8)>(),
        ) {
            let payload = encoded(&m);
            let in_stream = m.stream_xid().is_some();
            for len in 0..payload.len() {
                let truncated = payload.slice(..len);
                match decode(&truncated, in_stream) {
                    Err(_) => {}
                    // The one ambiguity of the format: a parallel Stream Abort cut right before
                    // its optional abort LSN and time is a complete non-parallel Stream Abort.
                    Ok(Message::StreamAbort { abort: None, .. })
                        if len == 9 && matches!(m, Message::StreamAbort { abort: Some(_), .. }) => {}
                    Ok(other) => prop_assert!(false, "prefix of {} bytes decoded as {:?}", len, other),
                }
            }
            let mut mutated = payload.to_vec();
            let at = flip.0 % mutated.len();
            mutated[at] ^= flip.1;
            let mutated = Bytes::from(mutated);
            for in_stream in [false, true] {
                if let Ok(m) = decode(&mutated, in_stream) {
                    prop_assert_eq!(encoded(&m), mutated.clone());
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn tuples_with_many_columns_round_trip(
            xid in proptest::option::of(any::<u32>()),
            relid in any::<u32>(),
            values in proptest::collection::vec(arb_value(), 0..300),
            big in proptest::collection::vec(any::<u8>(), 0..70_000),
        ) {
            // Wide rows, and a value longer than 64 KiB (lengths are 32-bit on the wire).
            let mut values = values;
            values.push(Value::Text(Bytes::from(big)));
            let m = Message::Insert { xid, relid, new: TupleData(values) };
            prop_assert_eq!(decode(&encoded(&m), xid.is_some()), Ok(m));
        }
    }
}
