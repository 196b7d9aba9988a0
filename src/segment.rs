//! Segment files: the archive's sealed, immutable unit of storage.
//!
//! A segment holds a run of the pgoutput change stream losslessly: every [`Record`] is the raw
//! payload of one XLogData message with its WAL start (`lsn`) and send time (`server_time`).
//! A segment covers the stream range `(start_lsn, end_lsn]` and only ever holds whole
//! transactions; its trailer indexes every commit it contains so that restore planning can pick
//! a stop point without decompressing anything.
//!
//! This module owns the byte layout (normatively specified in `proto/segment.md`), the writer
//! ([`SegmentBuilder`]), the reader ([`Segment`], [`read_info`]); a segment's object name is
//! the catalog's ([`crate::catalog::keys::segment`]). It does not do I/O, does not decode pgoutput
//! payloads (they are opaque bytes here), and does not check continuity between segments or
//! the meaning of commit entries: that is the restore planner's job.
//!
//! Format version 3 (written by default) stores each block's records *in columns*
//! (`columns`: the fields of Begin and Commit messages as deltas of each other, one group of
//! streams per table column, integers written as text stored as varints) and compresses them as
//! one zstd frame; its commit index is a zstd frame of columns too. Version 2 (zstd frames of
//! records framed with varint deltas, a varint commit index) and version 1 (LZ4 blocks,
//! fixed-width framing and commit entries) are still read, and written on request
//! ([`SegmentBuilder::with_format_version`]).
//!
//! Why this departs from the plain LZ4 (`lz4_flex`) of the project's first design (still used
//! for base-backup parts): the archive is what users pay to keep for months. On the same real
//! pgbench records, version 1 stores 188 B per transaction, version 2 (zstd of the records) 88 B
//! and version 3 (zstd of the columns) 35 B (bench/README.md). Version 3 writes about 300 MB/s
//! of payload (version 2: 370, version 1: 390; bench/segment.rs): a thousand pgbench
//! transactions a second cost the writer about a millisecond of CPU in every version.
//!
//! Invariant: **a segment that parses is byte-for-byte what was written.** Every byte of the
//! file is either compared with a constant or covered by a CRC-32 (header, each block's stored
//! bytes, each block's decompressed bytes, trailer, footer), and block headers are cross-checked
//! against the checksummed block index. Reading never panics and never allocates more than the
//! file's declared, bounds-checked sizes allow, whatever the input bytes are.

use std::fmt;

use bytes::Bytes;

mod columns;

use crate::lsn::{Lsn, PgTimestamp};

/// The 8 bytes at the start and at the very end of every segment file.
///
/// The non-ASCII first byte and the trailing line feed catch 7-bit and newline-translating
/// transfers, as in PNG.
pub const MAGIC: [u8; 8] = *b"\x89TDMSEG\n";

/// The format version this build writes by default and the newest one it reads.
///
/// Version 3 stores each block's records in columns (`columns`) compressed as a zstd frame,
/// and a compressed commit index; version 2 (zstd frames of varint-framed records) and version
/// 1 (LZ4 blocks, fixed 20-byte record framing, fixed 32-byte commit entries) are still read,
/// and written on request ([`SegmentBuilder::with_format_version`]).
pub const FORMAT_VERSION: u16 = 3;

/// The oldest format version this build reads.
pub const MIN_FORMAT_VERSION: u16 = 1;

/// zstd level the writer uses unless told otherwise ([`SegmentBuilder::with_zstd_level`]).
///
/// zstd's own default, 3: on real pgbench traffic in version 3's columns it stores 35.4 B per
/// transaction where level 1 stores 36.5, at about the same speed (the columns are a third of
/// the records' size; bench/README.md). Version 2, when written on request, keeps the level 1
/// its writers used.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Default target size of a version 3 block's records, framed as in version 2 (before the
/// columns and compression). Larger blocks give the columns more to work with: on pgbench
/// traffic 64 KiB blocks store 37 B per transaction, 1 MiB blocks 31-35. Versions 1 and 2
/// keep the 64 KiB their writers used.
pub const DEFAULT_BLOCK_SIZE: usize = 1024 * 1024;

/// Largest block size [`SegmentBuilder::with_block_size`] accepts (larger values are clamped).
pub const MAX_BLOCK_SIZE: usize = 16 * 1024 * 1024;

/// Largest record payload [`SegmentBuilder::push`] accepts (PostgreSQL messages are < 1 GiB).
pub const MAX_PAYLOAD_LEN: usize = i32::MAX as usize;

/// Header flag: the segment holds records of streamed (in-progress) transactions, as sent by
/// pgoutput with `streaming` on (protocol ≥ 2): Stream Start/Stop/Commit/Abort records, changes
/// that carry their (sub)transaction id, and commit entries whose `first_record` is the
/// transaction's Stream Commit record (its changes lie in this and earlier segments).
/// A reader that cannot replay such a stream must reject the file (§9 of proto/segment.md).
pub const FLAG_STREAMED: u16 = 0x0001;

/// Header flags this build understands.
const KNOWN_FLAGS: u16 = FLAG_STREAMED;

/// Header bytes that are not strings or extensions: fixed fields, two length prefixes, crc.
const HEADER_FIXED_LEN: usize = 56;
/// Offset of `created_at` in the header.
const HEADER_CREATED_AT_OFFSET: usize = 40;
/// Block header: compressed_len, uncompressed_len, record_count, data_crc, block_crc.
const BLOCK_HEADER_LEN: usize = 20;
/// Bytes of the block header covered by `block_crc` (all but the block_crc itself).
const BLOCK_HEADER_CRC_COVERED: usize = 16;
/// Version 1 record framing: lsn, server_time, payload_len.
const RECORD_HEADER_LEN: usize = 20;
/// Smallest version 2 record: three one-byte varints and an empty payload.
const MIN_RECORD_LEN_V2: usize = 3;
/// Block index entry: offset followed by a copy of the block header.
const BLOCK_ENTRY_LEN: usize = 8 + BLOCK_HEADER_LEN;
/// Version 1 commit index entry: commit_lsn, end_lsn, commit_time, xid, first_record.
const COMMIT_ENTRY_LEN: usize = 32;
/// Smallest version 2 commit index entry: five one-byte varints.
const MIN_COMMIT_ENTRY_LEN_V2: usize = 5;
/// Version 1 trailer bytes that are not index entries: fixed fields and crc.
const TRAILER_FIXED_LEN: usize = 36;
/// Version 2 trailer bytes that are not index entries: fixed fields, commit_index_len, crc.
const TRAILER_FIXED_LEN_V2: usize = 40;
/// Footer: trailer_offset, trailer_len, footer_crc, magic.
const FOOTER_LEN: usize = 28;
/// Upper bound of the LZ4 block format's expansion: one input byte yields at most 255 output
/// bytes. Caps the allocation for a block by its (bounds-checked) stored size.
const MAX_LZ4_RATIO: u64 = 255;
/// Upper bound of a zstd frame's expansion: every zstd block takes at least 4 stored bytes
/// (3-byte block header and 1 byte of content, an RLE block) and yields at most 128 KiB.
const MAX_ZSTD_RATIO: u64 = 32 * 1024;
/// The 4 bytes every zstd frame starts with (0xFD2FB528, little-endian).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// One XLogData message of the pgoutput stream, stored losslessly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// WAL start of the message (`dataStart` in the XLogData header).
    pub lsn: Lsn,
    /// Send time from the XLogData header.
    pub server_time: PgTimestamp,
    /// The raw pgoutput message (starts with its type byte: `B`, `I`, `C`, …).
    pub payload: Bytes,
}

/// One committed transaction in a segment's commit index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommitEntry {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction (the position to acknowledge once it is stored).
    pub end_lsn: Lsn,
    /// Transaction id.
    pub xid: u32,
    /// Commit time as reported by the server.
    pub commit_time: PgTimestamp,
    /// Index, within the segment, of the transaction's Begin record.
    pub first_record: u32,
}

/// Everything a segment says about itself, from its header and trailer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SegmentInfo {
    /// `pg_control` system identifier of the source cluster.
    pub system_id: u64,
    /// Timeline of the source cluster when the segment was written.
    pub timeline: u32,
    /// Archive generation (bumped when the slot is recreated and the stream restarts).
    pub generation: u32,
    /// Database the slot decodes.
    pub database: String,
    /// Replication slot the stream was read from.
    pub slot: String,
    /// Exclusive start of the covered range: the previous segment's `end_lsn`.
    pub start_lsn: Lsn,
    /// Inclusive end of the covered range: end LSN of the last commit, or an idle position.
    pub end_lsn: Lsn,
    /// Latest server time seen in the stream when the segment was sealed.
    pub last_server_time: PgTimestamp,
    /// Number of records in the segment.
    pub record_count: u64,
    /// When the writer opened the segment.
    pub created_at: PgTimestamp,
    /// Header flags ([`FLAG_STREAMED`]).
    pub flags: u16,
}

/// The part of a file an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// The whole file.
    File,
    /// The fixed header with the strings.
    Header,
    /// Block `n` (0-based) as stored.
    Block(u32),
    /// The trailer: totals, block index, commit index.
    Trailer,
    /// The fixed-size footer at the end of the file.
    Footer,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::File => f.write_str("file"),
            Region::Header => f.write_str("header"),
            Region::Block(n) => write!(f, "block {n}"),
            Region::Trailer => f.write_str("trailer"),
            Region::Footer => f.write_str("footer"),
        }
    }
}

/// Why a segment was rejected. Messages name the offending region, its file offset and both
/// the expected and the found value; callers add the segment's name or LSN range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The file does not start with [`MAGIC`].
    #[error(
        "not a tidemark segment: expected magic {} at offset 0, found {}",
        hex(expected),
        hex(found)
    )]
    BadMagic {
        /// [`MAGIC`].
        expected: [u8; 8],
        /// The first bytes of the file (fewer than 8 if the file is shorter).
        found: Vec<u8>,
    },
    /// The file was written in a format version this build cannot read.
    #[error(
        "unsupported segment format version {found}: this build reads versions \
         {MIN_FORMAT_VERSION} to {supported}\nHINT: a newer tidemark wrote this archive; \
         read it with that release or a later one"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u16,
        /// [`FORMAT_VERSION`], the newest version this build reads.
        supported: u16,
    },
    /// The file is shorter than the smallest valid segment.
    #[error(
        "file is {len} bytes, shorter than the smallest valid segment ({min} bytes): truncated"
    )]
    TooShort {
        /// File length.
        len: u64,
        /// Smallest valid length.
        min: u64,
    },
    /// The file does not end with the footer magic: truncated, or bytes appended.
    #[error(
        "no footer: expected magic {} at offset {offset} (the last 8 bytes), found {}: \
         the file is truncated or has bytes appended",
        hex(expected),
        hex(found)
    )]
    MissingFooter {
        /// Offset of the last 8 bytes.
        offset: u64,
        /// [`MAGIC`].
        expected: [u8; 8],
        /// The last 8 bytes of the file.
        found: Vec<u8>,
    },
    /// A stored CRC-32 does not match the bytes it covers.
    #[error("{region} at offset {offset}: crc32 mismatch: expected 0x{expected:08X}, got 0x{actual:08X}")]
    Checksum {
        /// Region whose checksum failed.
        region: Region,
        /// File offset where the region starts.
        offset: u64,
        /// Checksum stored in the file.
        expected: u32,
        /// Checksum computed over the bytes read.
        actual: u32,
    },
    /// A block's stored bytes were intact but decompressed to different bytes than were
    /// compressed (a compressor or memory fault on the writer's side).
    #[error(
        "block {block} at offset {offset}: crc32 mismatch in decompressed data: \
         expected 0x{expected:08X}, got 0x{actual:08X}"
    )]
    DataChecksum {
        /// Block index.
        block: u32,
        /// File offset of the block.
        offset: u64,
        /// Checksum stored in the block header.
        expected: u32,
        /// Checksum of the decompressed bytes.
        actual: u32,
    },
    /// The header sets flags this build does not know.
    #[error("header at offset 10: unknown flags 0x{found:04X} (this build knows 0x{known:04X})")]
    UnknownFlags {
        /// Flags in the file.
        found: u16,
        /// Flags this build understands.
        known: u16,
    },
    /// Decompression of a block failed or produced a different size than declared.
    #[error("block {block} at offset {offset}: {codec} decompression failed: {detail}")]
    Decompress {
        /// Block index.
        block: u32,
        /// File offset of the block.
        offset: u64,
        /// The block's compression: `lz4` (version 1) or `zstd` (version 2).
        codec: &'static str,
        /// What went wrong, with both sizes where applicable.
        detail: String,
    },
    /// A structural rule of the format is violated (lengths out of bounds, inconsistent
    /// counts, a record overrunning its block, …); `detail` names both values.
    #[error("{region} at offset {offset}: {detail}")]
    Malformed {
        /// Region the rule is about.
        region: Region,
        /// File offset of the offending field (for records: of their block).
        offset: u64,
        /// What is wrong.
        detail: String,
    },
}

impl crate::error::Classify for SegmentError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            // Written by a newer tidemark: not damage, the wrong binary for this repository.
            SegmentError::UnsupportedVersion { .. } | SegmentError::UnknownFlags { .. } => {
                Repository
            }
            SegmentError::BadMagic { .. }
            | SegmentError::TooShort { .. }
            | SegmentError::MissingFooter { .. }
            | SegmentError::Checksum { .. }
            | SegmentError::DataChecksum { .. }
            | SegmentError::Decompress { .. }
            | SegmentError::Malformed { .. } => Damaged,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02X}");
    }
    s
}

fn malformed(region: Region, offset: u64, detail: impl Into<String>) -> SegmentError {
    SegmentError::Malformed {
        region,
        offset,
        detail: detail.into(),
    }
}

/// A format version this build reads, with what differs between versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    /// LZ4 blocks, fixed 20-byte record framing, fixed 32-byte commit entries.
    V1,
    /// zstd frames, varint-delta record framing, compact commit index.
    V2,
    /// As version 2, but each block's records are stored in columns (`columns.rs`) and the
    /// commit index is a zstd frame of columns too.
    V3,
}

impl Version {
    fn from_u16(v: u16) -> Option<Version> {
        match v {
            1 => Some(Version::V1),
            2 => Some(Version::V2),
            3 => Some(Version::V3),
            _ => None,
        }
    }

    fn number(self) -> u16 {
        match self {
            Version::V1 => 1,
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    fn trailer_fixed_len(self) -> usize {
        match self {
            Version::V1 => TRAILER_FIXED_LEN,
            Version::V2 | Version::V3 => TRAILER_FIXED_LEN_V2,
        }
    }

    /// Smallest valid file: empty strings, no blocks, no commits.
    fn min_segment_len(self) -> usize {
        HEADER_FIXED_LEN + self.trailer_fixed_len() + FOOTER_LEN
    }

    /// Smallest framed record (empty payload).
    fn min_record_len(self) -> u64 {
        match self {
            Version::V1 => RECORD_HEADER_LEN as u64,
            // Version 3: a kind byte and the lsn and server_time varints.
            Version::V2 | Version::V3 => MIN_RECORD_LEN_V2 as u64,
        }
    }

    /// Largest possible ratio of decompressed to stored bytes.
    fn max_ratio(self) -> u64 {
        match self {
            Version::V1 => MAX_LZ4_RATIO,
            Version::V2 | Version::V3 => MAX_ZSTD_RATIO,
        }
    }
}

/// Maps a signed delta to an unsigned value with small magnitudes near 0 (0, -1, 1, -2 → 0, 1,
/// 2, 3), as protobuf's zigzag encoding.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint (7 bits a byte, low bits first, high bit set on
/// every byte but the last), in its shortest form.
fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes [`put_uvarint`] writes for `v`.
fn uvarint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Why a varint could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VarintError {
    /// The buffer ends before the varint's last byte.
    Truncated,
    /// A longer encoding than needed (a last byte of 0 after another byte).
    Overlong,
    /// More bits than the field has (64, or 32 for xid and first_record).
    Overflow,
}

impl fmt::Display for VarintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VarintError::Truncated => "runs past the end",
            VarintError::Overlong => "is not in its shortest form",
            VarintError::Overflow => "does not fit the field",
        })
    }
}

/// Reads an unsigned LEB128 varint of at most `bits` bits at `*pos`, advancing `*pos`. Only the
/// shortest encoding is accepted, so every value has exactly one encoding.
fn get_uvarint(buf: &[u8], pos: &mut usize, bits: u32) -> Result<u64, VarintError> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    let mut at = *pos;
    loop {
        let Some(&b) = buf.get(at) else {
            return Err(VarintError::Truncated);
        };
        at += 1;
        let low = u64::from(b & 0x7F);
        // Bits left for this byte's 7; the value must not need more.
        let room = bits.saturating_sub(shift);
        if room == 0 || (room < 7 && low >> room != 0) {
            return Err(VarintError::Overflow);
        }
        v |= low << shift;
        if b & 0x80 == 0 {
            if b == 0 && shift > 0 {
                return Err(VarintError::Overlong);
            }
            *pos = at;
            return Ok(v);
        }
        shift += 7;
    }
}

/// Index entry of one block; its last 20 bytes are the block header exactly as stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BlockEntry {
    offset: u64,
    compressed_len: u32,
    uncompressed_len: u32,
    record_count: u32,
    data_crc: u32,
    block_crc: u32,
}

impl BlockEntry {
    fn header_bytes(&self) -> [u8; BLOCK_HEADER_LEN] {
        let mut h = [0u8; BLOCK_HEADER_LEN];
        h[0..4].copy_from_slice(&self.compressed_len.to_le_bytes());
        h[4..8].copy_from_slice(&self.uncompressed_len.to_le_bytes());
        h[8..12].copy_from_slice(&self.record_count.to_le_bytes());
        h[12..16].copy_from_slice(&self.data_crc.to_le_bytes());
        h[16..20].copy_from_slice(&self.block_crc.to_le_bytes());
        h
    }

    /// First byte after the block.
    fn end(&self) -> u64 {
        self.offset + BLOCK_HEADER_LEN as u64 + u64::from(self.compressed_len)
    }
}

/// A zstd compression context, reused for every block of a builder (its tables are allocated
/// once), and a scratch buffer for the compressed frame.
struct Zstd {
    cctx: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Zstd {
    fn new(level: i32) -> Zstd {
        Zstd {
            cctx: zstd::bulk::Compressor::new(level)
                .expect("zstd compression context (out of memory?)"),
            scratch: Vec::new(),
        }
    }
}

impl Zstd {
    /// Compresses `data` into one frame (declaring its content size) in the scratch buffer.
    fn compress(&mut self, data: &[u8]) -> &[u8] {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let n = self
            .cctx
            .compress_to_buffer(data, &mut self.scratch)
            .expect("zstd output sized with compress_bound");
        &self.scratch[..n]
    }
}

impl fmt::Debug for Zstd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zstd").finish_non_exhaustive()
    }
}

/// The previous commit entry's fields, from which a version 2 entry's deltas are taken.
#[derive(Clone, Copy, Debug)]
struct CommitBase {
    commit_lsn: u64,
    commit_time: i64,
    xid: u32,
    first_record: u32,
}

impl CommitBase {
    /// The base of a segment's first commit entry.
    fn new(start_lsn: Lsn, created_at: PgTimestamp) -> CommitBase {
        CommitBase {
            commit_lsn: start_lsn.0,
            commit_time: created_at.0,
            xid: 0,
            first_record: 0,
        }
    }
}

/// Appends one commit index entry in the layout of `version`.
fn encode_commit(version: Version, out: &mut Vec<u8>, base: &mut CommitBase, c: &CommitEntry) {
    match version {
        Version::V1 => {
            out.extend_from_slice(&c.commit_lsn.0.to_le_bytes());
            out.extend_from_slice(&c.end_lsn.0.to_le_bytes());
            out.extend_from_slice(&c.commit_time.0.to_le_bytes());
            out.extend_from_slice(&c.xid.to_le_bytes());
            out.extend_from_slice(&c.first_record.to_le_bytes());
        }
        Version::V2 | Version::V3 => {
            put_uvarint(
                out,
                zigzag(c.commit_lsn.0.wrapping_sub(base.commit_lsn) as i64),
            );
            put_uvarint(out, c.end_lsn.0.wrapping_sub(c.commit_lsn.0));
            put_uvarint(out, zigzag(c.commit_time.0.wrapping_sub(base.commit_time)));
            put_uvarint(out, zigzag32(c.xid.wrapping_sub(base.xid)));
            put_uvarint(
                out,
                zigzag32(c.first_record.wrapping_sub(base.first_record)),
            );
        }
    }
    *base = CommitBase {
        commit_lsn: c.commit_lsn.0,
        commit_time: c.commit_time.0,
        xid: c.xid,
        first_record: c.first_record,
    };
}

/// Appends one commit entry to the five columns of a version 3 commit index: the same deltas
/// as a version 2 entry, each field in its own column.
fn encode_commit_columns(columns: &mut [Vec<u8>; 5], base: &mut CommitBase, c: &CommitEntry) {
    let mut entry = Vec::with_capacity(40);
    encode_commit(Version::V2, &mut entry, base, c);
    let mut pos = 0;
    for column in columns.iter_mut() {
        let start = pos;
        get_uvarint(&entry, &mut pos, 64).expect("encode_commit wrote five varints");
        column.extend_from_slice(&entry[start..pos]);
    }
}

/// Zigzag of a wrapping 32-bit difference read as an `i32`.
fn zigzag32(delta: u32) -> u64 {
    u64::from((delta << 1) ^ ((delta as i32 >> 31) as u32))
}

fn unzigzag32(u: u32) -> u32 {
    (u >> 1) ^ (u & 1).wrapping_neg()
}

/// Writes one segment in memory, block by block.
///
/// Records are framed into a reused buffer; when the next record would not fit in the block
/// size (or the block is exactly full) the block is compressed (a zstd frame in format version
/// 2, an LZ4 block in version 1) and checksummed into the output. A record larger than the
/// block size gets a block of its own.
#[derive(Debug)]
pub struct SegmentBuilder {
    /// Header followed by the sealed blocks.
    out: Vec<u8>,
    header_len: usize,
    version: Version,
    /// zstd level if set ([`SegmentBuilder::with_zstd_level`]), else the version's default.
    zstd_level: Option<i32>,
    /// Created at the first sealed block (versions 2 and 3).
    zstd: Option<Zstd>,
    /// Uncompressed contents of the block being filled.
    block: Vec<u8>,
    block_records: u32,
    /// lsn and server_time of the block's previous record (version 2 deltas; 0 at a block's
    /// start, so that every block decodes on its own).
    prev_lsn: u64,
    prev_time: i64,
    /// Target block size if set ([`SegmentBuilder::with_block_size`]), else the version's
    /// default.
    block_size: Option<usize>,
    blocks: Vec<BlockEntry>,
    /// The commit index, encoded as it grows (versions 1 and 2).
    commit_index: Vec<u8>,
    /// Version 3: the commit index's five columns, compressed into one frame by `finish`.
    commit_columns: [Vec<u8>; 5],
    commit_count: usize,
    commit_base: Option<CommitBase>,
    record_count: u64,
}

impl SegmentBuilder {
    /// Starts a segment covering the stream from `start_lsn` (exclusive), in format version
    /// [`FORMAT_VERSION`], with [`DEFAULT_BLOCK_SIZE`], [`DEFAULT_ZSTD_LEVEL`] and `created_at`
    /// set to now.
    ///
    /// # Panics
    /// If `database` or `slot` is longer than 65535 bytes (PostgreSQL limits names to 63).
    pub fn new(
        system_id: u64,
        timeline: u32,
        generation: u32,
        database: &str,
        slot: &str,
        start_lsn: Lsn,
    ) -> Self {
        let db_len = u16::try_from(database.len()).expect("database name longer than 65535 bytes");
        let slot_len = u16::try_from(slot.len()).expect("slot name longer than 65535 bytes");
        let header_len = HEADER_FIXED_LEN + database.len() + slot.len();
        let mut out = Vec::with_capacity(header_len + 64 * 1024);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&(header_len as u32).to_le_bytes());
        out.extend_from_slice(&system_id.to_le_bytes());
        out.extend_from_slice(&timeline.to_le_bytes());
        out.extend_from_slice(&generation.to_le_bytes());
        out.extend_from_slice(&start_lsn.0.to_le_bytes());
        out.extend_from_slice(&PgTimestamp::now().0.to_le_bytes());
        out.extend_from_slice(&db_len.to_le_bytes());
        out.extend_from_slice(database.as_bytes());
        out.extend_from_slice(&slot_len.to_le_bytes());
        out.extend_from_slice(slot.as_bytes());
        out.extend_from_slice(&[0; 4]); // header crc, set by seal_header
        debug_assert_eq!(out.len(), header_len);
        let mut builder = SegmentBuilder {
            out,
            header_len,
            version: Version::V3,
            zstd_level: None,
            zstd: None,
            block: Vec::new(),
            block_records: 0,
            prev_lsn: 0,
            prev_time: 0,
            block_size: None,
            blocks: Vec::new(),
            commit_index: Vec::new(),
            commit_columns: Default::default(),
            commit_count: 0,
            commit_base: None,
            record_count: 0,
        };
        builder.seal_header();
        builder
    }

    /// Sets the target uncompressed block size, clamped to `1..=`[`MAX_BLOCK_SIZE`].
    /// Applies from the next block on.
    pub fn with_block_size(mut self, bytes: usize) -> Self {
        self.block_size = Some(bytes.clamp(1, MAX_BLOCK_SIZE));
        self
    }

    /// Writes format `version` instead of [`FORMAT_VERSION`]: files that tidemark releases
    /// before that version can read (version 2: about 2.5 times the size, version 1: about 5
    /// times). For compatibility tests and benchmarks.
    ///
    /// # Panics
    /// If `version` is not one this build writes (1 to 3), or records were pushed already.
    pub fn with_format_version(mut self, version: u16) -> Self {
        let v = Version::from_u16(version)
            .unwrap_or_else(|| panic!("segment format version {version} cannot be written"));
        assert_eq!(
            self.record_count, 0,
            "the format version must be set before the first record"
        );
        self.version = v;
        self.out[8..10].copy_from_slice(&version.to_le_bytes());
        self.seal_header();
        self
    }

    /// Sets the zstd compression level of blocks (versions 2 and 3; default
    /// [`DEFAULT_ZSTD_LEVEL`] for version 3, 1 for version 2; zstd clamps it to its range).
    /// Applies from the next block on.
    pub fn with_zstd_level(mut self, level: i32) -> Self {
        self.zstd_level = Some(level);
        self.zstd = None;
        self
    }

    /// Overrides the `created_at` header field (default: the time of [`SegmentBuilder::new`]).
    pub fn with_created_at(mut self, created_at: PgTimestamp) -> Self {
        let at = HEADER_CREATED_AT_OFFSET;
        self.out[at..at + 8].copy_from_slice(&created_at.0.to_le_bytes());
        self.seal_header();
        self
    }

    /// Sets [`FLAG_STREAMED`]: the segment holds records of a streamed transaction.
    pub fn mark_streamed(&mut self) {
        let flags = u16::from_le_bytes([self.out[10], self.out[11]]) | FLAG_STREAMED;
        self.out[10..12].copy_from_slice(&flags.to_le_bytes());
        self.seal_header();
    }

    /// Whether [`SegmentBuilder::mark_streamed`] was called.
    pub fn is_streamed(&self) -> bool {
        u16::from_le_bytes([self.out[10], self.out[11]]) & FLAG_STREAMED != 0
    }

    /// The block size in effect: as set, or [`DEFAULT_BLOCK_SIZE`] (version 3) or 64 KiB
    /// (versions 1 and 2, as their writers used).
    fn block_size(&self) -> usize {
        self.block_size.unwrap_or(match self.version {
            Version::V3 => DEFAULT_BLOCK_SIZE,
            Version::V1 | Version::V2 => 64 * 1024,
        })
    }

    /// The zstd level in effect: as set, or [`DEFAULT_ZSTD_LEVEL`] (version 3) or 1 (version 2,
    /// as its writers used).
    fn zstd_level(&self) -> i32 {
        self.zstd_level.unwrap_or(match self.version {
            Version::V3 => DEFAULT_ZSTD_LEVEL,
            Version::V1 | Version::V2 => 1,
        })
    }

    fn seal_header(&mut self) {
        let crc_at = self.header_len - 4;
        let crc = crc32fast::hash(&self.out[..crc_at]);
        self.out[crc_at..self.header_len].copy_from_slice(&crc.to_le_bytes());
    }

    /// Bytes `rec` takes framed in the current block.
    fn framed_len(&self, rec: &Record) -> usize {
        match self.version {
            Version::V1 => RECORD_HEADER_LEN + rec.payload.len(),
            Version::V2 | Version::V3 => {
                let dl = rec.lsn.0.wrapping_sub(self.prev_lsn) as i64;
                let dt = rec.server_time.0.wrapping_sub(self.prev_time);
                uvarint_len(zigzag(dl))
                    + uvarint_len(zigzag(dt))
                    + uvarint_len(rec.payload.len() as u64)
                    + rec.payload.len()
            }
        }
    }

    /// Appends a record. Compresses the current block first if the record would not fit.
    ///
    /// # Panics
    /// If the payload is longer than [`MAX_PAYLOAD_LEN`].
    pub fn push(&mut self, rec: &Record) {
        let payload_len = rec.payload.len();
        assert!(
            payload_len <= MAX_PAYLOAD_LEN,
            "record payload of {payload_len} bytes exceeds the format's limit of {MAX_PAYLOAD_LEN}"
        );
        let mut framed = self.framed_len(rec);
        let block_size = self.block_size();
        if self.block_records > 0 && self.block.len() + framed > block_size {
            self.seal_block();
            framed = self.framed_len(rec);
        }
        if self.block.capacity() == 0 {
            self.block.reserve(block_size.max(framed));
        }
        match self.version {
            Version::V1 => {
                self.block.extend_from_slice(&rec.lsn.0.to_le_bytes());
                self.block
                    .extend_from_slice(&rec.server_time.0.to_le_bytes());
                self.block
                    .extend_from_slice(&(payload_len as u32).to_le_bytes());
            }
            Version::V2 | Version::V3 => {
                let dl = rec.lsn.0.wrapping_sub(self.prev_lsn) as i64;
                let dt = rec.server_time.0.wrapping_sub(self.prev_time);
                put_uvarint(&mut self.block, zigzag(dl));
                put_uvarint(&mut self.block, zigzag(dt));
                put_uvarint(&mut self.block, payload_len as u64);
                self.prev_lsn = rec.lsn.0;
                self.prev_time = rec.server_time.0;
            }
        }
        self.block.extend_from_slice(&rec.payload);
        self.block_records += 1;
        self.record_count += 1;
        if self.block.len() >= block_size {
            self.seal_block();
        }
    }

    /// Records a commit in the commit index. Call it after pushing the transaction's records;
    /// `entry.first_record` must be the index of its Begin record in this segment (for a
    /// streamed transaction: of its Stream Commit record, see [`FLAG_STREAMED`]).
    pub fn commit(&mut self, entry: CommitEntry) {
        debug_assert!(
            u64::from(entry.first_record) < self.record_count,
            "commit's first_record {} is not a record of this segment ({} records)",
            entry.first_record,
            self.record_count
        );
        let base = self.commit_base.get_or_insert_with(|| {
            let start = u64::from_le_bytes(self.out[32..40].try_into().expect("8 bytes"));
            let at = HEADER_CREATED_AT_OFFSET;
            let created = i64::from_le_bytes(self.out[at..at + 8].try_into().expect("8 bytes"));
            CommitBase::new(Lsn(start), PgTimestamp(created))
        });
        if self.version == Version::V3 {
            encode_commit_columns(&mut self.commit_columns, base, &entry);
        } else {
            encode_commit(self.version, &mut self.commit_index, base, &entry);
        }
        self.commit_count += 1;
    }

    /// Number of records pushed so far.
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    /// Approximate size of the finished file if it were finished now, never less: the block
    /// being filled counts at zstd's worst case for its framed records (versions 2 and 3; it
    /// compresses to a tenth of that on pgbench traffic) and version 3's commit index
    /// uncompressed. For deciding when to seal on size, so a segment sealed on size may end up
    /// to about a block smaller than the limit.
    pub fn encoded_len(&self) -> usize {
        let pending = match (self.block_records, self.version) {
            (0, _) => 0,
            (_, Version::V1) => BLOCK_HEADER_LEN + self.block.len(),
            (_, Version::V2 | Version::V3) => {
                BLOCK_HEADER_LEN + zstd::zstd_safe::compress_bound(self.block.len())
            }
        };
        let commit_index: usize =
            self.commit_index.len() + self.commit_columns.iter().map(Vec::len).sum::<usize>();
        let blocks = self.blocks.len() + usize::from(self.block_records > 0);
        self.out.len()
            + pending
            + self.version.trailer_fixed_len()
            + blocks * BLOCK_ENTRY_LEN
            + commit_index
            + FOOTER_LEN
    }

    /// Compresses and checksums the current block into the output.
    fn seal_block(&mut self) {
        if self.block_records == 0 {
            return;
        }
        let data_crc = crc32fast::hash(&self.block);
        let level = self.zstd_level();
        let entry = match self.version {
            Version::V1 => append_block(
                &mut self.out,
                &self.block,
                data_crc,
                self.block_records,
                None,
            ),
            Version::V2 => {
                let zstd = self.zstd.get_or_insert_with(|| Zstd::new(level));
                append_block(
                    &mut self.out,
                    &self.block,
                    data_crc,
                    self.block_records,
                    Some(zstd),
                )
            }
            Version::V3 => {
                let body = columns::encode(&self.block, self.block_records);
                let zstd = self.zstd.get_or_insert_with(|| Zstd::new(level));
                append_block(
                    &mut self.out,
                    &body,
                    data_crc,
                    self.block_records,
                    Some(zstd),
                )
            }
        };
        self.blocks.push(entry);
        self.block.clear();
        self.block_records = 0;
        self.prev_lsn = 0;
        self.prev_time = 0;
    }

    /// Seals the segment at `end_lsn` and returns the complete file.
    ///
    /// # Panics
    /// If the segment has more than `u32::MAX` blocks or commits (each would take a trailer of
    /// over 100 GiB).
    pub fn finish(mut self, end_lsn: Lsn, last_server_time: PgTimestamp) -> Bytes {
        self.seal_block();
        let level = self.zstd_level();
        if self.version == Version::V3 && self.commit_count > 0 {
            let columns = self.commit_columns.concat();
            let zstd = self.zstd.get_or_insert_with(|| Zstd::new(level));
            self.commit_index = zstd.compress(&columns).to_vec();
        }
        let mut out = std::mem::take(&mut self.out);
        append_trailer_and_footer(
            &mut out,
            self.version,
            Totals {
                end_lsn,
                last_server_time,
                record_count: self.record_count,
            },
            &self.blocks,
            self.commit_count,
            &self.commit_index,
        );
        Bytes::from(out)
    }
}

/// Appends a block to `out`: header, then `data` compressed, as a zstd frame made with `zstd`
/// if given (versions 2 and 3), else as an LZ4 block (version 1). `data` is the framed records
/// (versions 1 and 2) or their columns (version 3); `data_crc` is the CRC-32 of the framed
/// records.
fn append_block(
    out: &mut Vec<u8>,
    data: &[u8],
    data_crc: u32,
    record_count: u32,
    zstd: Option<&mut Zstd>,
) -> BlockEntry {
    let offset = out.len();
    let data_start = offset + BLOCK_HEADER_LEN;
    let compressed_len = match zstd {
        Some(z) => {
            out.resize(data_start, 0);
            out.extend_from_slice(z.compress(data));
            out.len() - data_start
        }
        None => {
            let max = lz4_flex::block::get_maximum_output_size(data.len());
            out.resize(data_start + max, 0);
            let n = lz4_flex::block::compress_into(data, &mut out[data_start..])
                .expect("output sized with get_maximum_output_size");
            out.truncate(data_start + n);
            n
        }
    };
    let mut entry = BlockEntry {
        offset: offset as u64,
        // Both fit: uncompressed ≤ max(MAX_BLOCK_SIZE, 30 + MAX_PAYLOAD_LEN) < 2^31 + 2^24, and
        // compressed ≤ 1.1 × that + 20.
        compressed_len: compressed_len as u32,
        uncompressed_len: data.len() as u32,
        record_count,
        data_crc,
        block_crc: 0,
    };
    entry.block_crc = block_crc(&entry, &out[data_start..]);
    out[offset..data_start].copy_from_slice(&entry.header_bytes());
    entry
}

/// CRC-32 of a block header's first 16 bytes followed by the block's stored (compressed) bytes.
fn block_crc(entry: &BlockEntry, stored: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&entry.header_bytes()[..BLOCK_HEADER_CRC_COVERED]);
    hasher.update(stored);
    hasher.finalize()
}

/// The trailer's totals.
#[derive(Clone, Copy, Debug)]
struct Totals {
    end_lsn: Lsn,
    last_server_time: PgTimestamp,
    record_count: u64,
}

/// Appends the trailer (totals, block index, commit index, crc) and the footer. `commit_index`
/// holds `commit_count` entries encoded by [`encode_commit`] for `version`.
fn append_trailer_and_footer(
    out: &mut Vec<u8>,
    version: Version,
    totals: Totals,
    blocks: &[BlockEntry],
    commit_count: usize,
    commit_index: &[u8],
) {
    let block_count = u32::try_from(blocks.len()).expect("more than u32::MAX blocks");
    let commit_count = u32::try_from(commit_count).expect("more than u32::MAX commits");
    let trailer_offset = out.len();
    let trailer_len =
        version.trailer_fixed_len() + blocks.len() * BLOCK_ENTRY_LEN + commit_index.len();
    out.reserve(trailer_len + FOOTER_LEN);
    out.extend_from_slice(&totals.end_lsn.0.to_le_bytes());
    out.extend_from_slice(&totals.last_server_time.0.to_le_bytes());
    out.extend_from_slice(&totals.record_count.to_le_bytes());
    out.extend_from_slice(&block_count.to_le_bytes());
    out.extend_from_slice(&commit_count.to_le_bytes());
    if version != Version::V1 {
        let len = u32::try_from(commit_index.len()).expect("commit index over 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
    }
    for b in blocks {
        out.extend_from_slice(&b.offset.to_le_bytes());
        out.extend_from_slice(&b.header_bytes());
    }
    out.extend_from_slice(commit_index);
    let crc = crc32fast::hash(&out[trailer_offset..]);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), trailer_offset + trailer_len);
    let footer_offset = out.len();
    out.extend_from_slice(&(trailer_offset as u64).to_le_bytes());
    out.extend_from_slice(&(trailer_len as u64).to_le_bytes());
    let crc = crc32fast::hash(&out[footer_offset..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&MAGIC);
}

/// Bounds-checked little-endian reader over a region of the file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
    region: Region,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], base: u64, region: Region) -> Self {
        Cursor {
            buf,
            pos: 0,
            base,
            region,
        }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SegmentError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(malformed(
                self.region,
                self.offset(),
                format!(
                    "{what} needs {n} bytes, only {left} left in the {}",
                    self.region
                ),
            ));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SegmentError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u16(&mut self, what: &str) -> Result<u16, SegmentError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, SegmentError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, SegmentError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn i64(&mut self, what: &str) -> Result<i64, SegmentError> {
        self.array(what).map(i64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String, SegmentError> {
        let len = self.u16(what)?;
        let at = self.offset();
        let bytes = self.take(usize::from(len), what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|e| malformed(self.region, at, format!("{what} is not valid UTF-8: {e}")))
    }
}

/// Reads a little-endian u32 at `at`, which the caller has bounds-checked.
fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Verifies a stored CRC-32 (little-endian, right after `covered`).
fn check_crc(covered: &[u8], stored: u32, region: Region, offset: u64) -> Result<(), SegmentError> {
    let actual = crc32fast::hash(covered);
    if actual != stored {
        return Err(SegmentError::Checksum {
            region,
            offset,
            expected: stored,
            actual,
        });
    }
    Ok(())
}

/// Header, trailer and block table of a file, verified.
struct Layout {
    version: Version,
    info: SegmentInfo,
    commits: Vec<CommitEntry>,
    blocks: Vec<BlockEntry>,
}

/// Verifies everything but the blocks' contents: magic, version, footer, header, trailer and
/// the block table (contiguity, block headers equal to their index entries, counts, sizes).
fn parse_layout(file: &[u8]) -> Result<Layout, SegmentError> {
    let len = file.len();
    // 1. Identify the file: magic, then version, so that a future version is reported as such.
    let head = &file[..len.min(8)];
    if head != MAGIC {
        return Err(SegmentError::BadMagic {
            expected: MAGIC,
            found: head.to_vec(),
        });
    }
    // A file too short for a version is reported as too short for the oldest one.
    let mut version = Version::V1;
    if let Some(v) = file.get(8..10) {
        let found = u16::from_le_bytes([v[0], v[1]]);
        version = Version::from_u16(found).ok_or(SegmentError::UnsupportedVersion {
            found,
            supported: FORMAT_VERSION,
        })?;
    }
    let min_len = version.min_segment_len();
    if len < min_len {
        return Err(SegmentError::TooShort {
            len: len as u64,
            min: min_len as u64,
        });
    }
    let trailer_fixed_len = version.trailer_fixed_len();

    // 2. Footer: find the trailer from the end.
    let footer_offset = len - FOOTER_LEN;
    let tail = &file[len - 8..];
    if tail != MAGIC {
        return Err(SegmentError::MissingFooter {
            offset: (len - 8) as u64,
            expected: MAGIC,
            found: tail.to_vec(),
        });
    }
    let mut f = Cursor::new(&file[footer_offset..], footer_offset as u64, Region::Footer);
    let trailer_offset = f.u64("trailer offset")?;
    let trailer_len = f.u64("trailer length")?;
    let footer_crc = f.u32("footer crc")?;
    check_crc(
        &file[footer_offset..footer_offset + 16],
        footer_crc,
        Region::Footer,
        footer_offset as u64,
    )?;

    // 3. Header.
    let mut h = Cursor::new(file, 0, Region::Header);
    h.pos = 12; // magic, version and flags; flags are checked once the crc vouches for them
    let header_len = h.u32("header length")? as usize;
    let header_max = footer_offset - trailer_fixed_len;
    if header_len < HEADER_FIXED_LEN || header_len > header_max {
        return Err(malformed(
            Region::Header,
            12,
            format!(
                "header length {header_len} is outside the possible range \
                 {HEADER_FIXED_LEN}..={header_max} for a {len}-byte file"
            ),
        ));
    }
    let header = &file[..header_len];
    let stored = u32_at(header, header_len - 4).unwrap_or_default();
    check_crc(&header[..header_len - 4], stored, Region::Header, 0)?;
    let flags = u16::from_le_bytes([file[10], file[11]]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(SegmentError::UnknownFlags {
            found: flags,
            known: KNOWN_FLAGS,
        });
    }
    // Fields end 4 bytes before header_len; whatever lies between the strings and the crc is
    // an extension area that version 1 readers skip.
    let mut h = Cursor::new(&file[..header_len - 4], 0, Region::Header);
    h.pos = 16;
    let system_id = h.u64("system_id")?;
    let timeline = h.u32("timeline")?;
    let generation = h.u32("generation")?;
    let start_lsn = Lsn(h.u64("start_lsn")?);
    let created_at = PgTimestamp(h.i64("created_at")?);
    let database = h.string("database name")?;
    let slot = h.string("slot name")?;

    // 4. Trailer: it must sit between the header and the footer, exactly.
    let trailer_end = trailer_offset.checked_add(trailer_len);
    if trailer_offset < header_len as u64
        || trailer_len < trailer_fixed_len as u64
        || trailer_end != Some(footer_offset as u64)
    {
        return Err(malformed(
            Region::Footer,
            footer_offset as u64,
            format!(
                "trailer at offset {trailer_offset} with length {trailer_len} must lie between \
                 the header (ends at {header_len}) and the footer (starts at {footer_offset}) \
                 and end where the footer starts"
            ),
        ));
    }
    // In bounds: header_len ≤ trailer_offset < trailer_offset + trailer_len = footer_offset.
    let trailer_start = trailer_offset as usize;
    let trailer = &file[trailer_start..footer_offset];
    let crc_at = trailer.len() - 4;
    let stored = u32_at(trailer, crc_at).unwrap_or_default();
    check_crc(&trailer[..crc_at], stored, Region::Trailer, trailer_offset)?;
    let mut t = Cursor::new(&trailer[..crc_at], trailer_offset, Region::Trailer);
    let end_lsn = Lsn(t.u64("end_lsn")?);
    let last_server_time = PgTimestamp(t.i64("last_server_time")?);
    let record_count = t.u64("record_count")?;
    let block_count = t.u32("block_count")?;
    let commit_count = t.u32("commit_count")?;
    let commit_index_len = match version {
        Version::V1 => u64::from(commit_count) * COMMIT_ENTRY_LEN as u64,
        Version::V2 | Version::V3 => u64::from(t.u32("commit_index_len")?),
    };
    let expected_len = trailer_fixed_len as u64
        + u64::from(block_count) * BLOCK_ENTRY_LEN as u64
        + commit_index_len;
    if expected_len != trailer_len {
        let what = match version {
            Version::V1 => format!("{commit_count} commits"),
            Version::V2 | Version::V3 => format!("a {commit_index_len}-byte commit index"),
        };
        return Err(malformed(
            Region::Trailer,
            trailer_offset + 24,
            format!(
                "{block_count} blocks and {what} need a trailer of {expected_len} bytes, \
                 the footer declares {trailer_len}"
            ),
        ));
    }
    // Version 3's index is compressed: entries take at least 5 bytes once decompressed, which
    // is at most MAX_ZSTD_RATIO times the stored bytes.
    let (min_commit_len, index_ratio) = match version {
        Version::V1 => (COMMIT_ENTRY_LEN as u64, 1),
        Version::V2 => (MIN_COMMIT_ENTRY_LEN_V2 as u64, 1),
        Version::V3 => (MIN_COMMIT_ENTRY_LEN_V2 as u64, MAX_ZSTD_RATIO),
    };
    if version == Version::V3 && (commit_count == 0) != (commit_index_len == 0) {
        return Err(malformed(
            Region::Trailer,
            trailer_offset + 28,
            format!(
                "{commit_count} commits with a {commit_index_len}-byte commit index (an index \
                 is empty exactly when there are no commits)"
            ),
        ));
    }
    if u64::from(commit_count) * min_commit_len > commit_index_len * index_ratio {
        return Err(malformed(
            Region::Trailer,
            trailer_offset + 28,
            format!(
                "{commit_count} commits cannot fit in a {commit_index_len}-byte commit index \
                 (each takes at least {min_commit_len} bytes{})",
                if index_ratio > 1 { " decompressed" } else { "" }
            ),
        ));
    }
    // The counts are now bounded by the file length, so these allocations are too.
    let mut blocks = Vec::with_capacity(block_count as usize);
    for _ in 0..block_count {
        blocks.push(BlockEntry {
            offset: t.u64("block offset")?,
            compressed_len: t.u32("compressed length")?,
            uncompressed_len: t.u32("uncompressed length")?,
            record_count: t.u32("block record count")?,
            data_crc: t.u32("data crc")?,
            block_crc: t.u32("block crc")?,
        });
    }
    let mut commits = Vec::with_capacity(commit_count as usize);
    match version {
        Version::V1 => {
            for _ in 0..commit_count {
                commits.push(CommitEntry {
                    commit_lsn: Lsn(t.u64("commit_lsn")?),
                    end_lsn: Lsn(t.u64("end_lsn")?),
                    commit_time: PgTimestamp(t.i64("commit_time")?),
                    xid: t.u32("xid")?,
                    first_record: t.u32("first_record")?,
                });
            }
        }
        Version::V2 => {
            // In bounds: the trailer length check above makes the rest of the trailer exactly
            // commit_index_len bytes.
            let index_offset = t.offset();
            let index = t.take(commit_index_len as usize, "commit index")?;
            decode_commits(
                index,
                index_offset,
                commit_count,
                CommitBase::new(start_lsn, created_at),
                &mut commits,
            )?;
        }
        Version::V3 => {
            let index_offset = t.offset();
            let index = t.take(commit_index_len as usize, "commit index")?;
            if commit_count > 0 {
                let columns = decompress_commit_index(index, index_offset, commit_count)?;
                decode_commit_columns(
                    &columns,
                    index_offset,
                    commit_count,
                    CommitBase::new(start_lsn, created_at),
                    &mut commits,
                )?;
            }
        }
    }

    // 5. Block table: blocks tile the space between header and trailer exactly, each block
    // header equals its index entry, and the counts add up.
    let mut expected_offset = header_len as u64;
    let mut records_in_blocks: u64 = 0;
    for (i, b) in blocks.iter().enumerate() {
        let i = i as u32;
        let entry_offset = trailer_offset + 32 + u64::from(i) * BLOCK_ENTRY_LEN as u64;
        if b.offset != expected_offset {
            return Err(malformed(
                Region::Trailer,
                entry_offset,
                format!(
                    "block {i} is indexed at offset {}, expected {expected_offset} \
                     (blocks must follow the header and each other without gaps)",
                    b.offset
                ),
            ));
        }
        if b.end() > trailer_offset {
            return Err(malformed(
                Region::Block(i),
                b.offset,
                format!(
                    "block of {} bytes ends at offset {}, past the trailer at offset {trailer_offset}",
                    BLOCK_HEADER_LEN as u64 + u64::from(b.compressed_len),
                    b.end()
                ),
            ));
        }
        // In bounds: b.offset + 20 ≤ b.end() ≤ trailer_offset ≤ file length.
        let start = b.offset as usize;
        let stored = &file[start..start + BLOCK_HEADER_LEN];
        let indexed = b.header_bytes();
        if stored != indexed {
            return Err(malformed(
                Region::Block(i),
                b.offset,
                format!(
                    "block header {} differs from its index entry {}",
                    hex(stored),
                    hex(&indexed)
                ),
            ));
        }
        if b.record_count == 0 {
            return Err(malformed(
                Region::Block(i),
                b.offset,
                "block holds no records",
            ));
        }
        let min_len = u64::from(b.record_count) * version.min_record_len();
        let max_len = u64::from(b.compressed_len) * version.max_ratio();
        let ulen = u64::from(b.uncompressed_len);
        if ulen < min_len || ulen > max_len {
            return Err(malformed(
                Region::Block(i),
                b.offset,
                format!(
                    "uncompressed length {ulen} is impossible for {} records in {} compressed \
                     bytes (must be {min_len}..={max_len})",
                    b.record_count, b.compressed_len
                ),
            ));
        }
        records_in_blocks += u64::from(b.record_count);
        expected_offset = b.end();
    }
    if expected_offset != trailer_offset {
        return Err(malformed(
            Region::Trailer,
            trailer_offset,
            format!(
                "blocks end at offset {expected_offset} but the trailer starts at offset \
                 {trailer_offset}"
            ),
        ));
    }
    if records_in_blocks != record_count {
        return Err(malformed(
            Region::Trailer,
            trailer_offset + 16,
            format!(
                "record count {record_count} differs from the blocks' total {records_in_blocks}"
            ),
        ));
    }

    Ok(Layout {
        version,
        info: SegmentInfo {
            system_id,
            timeline,
            generation,
            database,
            slot,
            start_lsn,
            end_lsn,
            last_server_time,
            record_count,
            created_at,
            flags,
        },
        commits,
        blocks,
    })
}

/// Decodes a version 2 commit index (`index` at file offset `offset`) of `count` entries into
/// `commits`; the entries must fill `index` exactly.
fn decode_commits(
    index: &[u8],
    offset: u64,
    count: u32,
    mut base: CommitBase,
    commits: &mut Vec<CommitEntry>,
) -> Result<(), SegmentError> {
    let mut pos = 0;
    for k in 0..count {
        let entry_at = pos;
        let mut field = |name: &str, bits: u32| {
            get_uvarint(index, &mut pos, bits).map_err(|e| {
                malformed(
                    Region::Trailer,
                    offset + entry_at as u64,
                    format!("commit entry {k}: the {name} varint at offset {pos} of the commit index {e}"),
                )
            })
        };
        let d_lsn = field("commit_lsn delta", 64)?;
        let d_end = field("end_lsn delta", 64)?;
        let d_time = field("commit_time delta", 64)?;
        let d_xid = field("xid delta", 32)?;
        let d_first = field("first_record delta", 32)?;
        let entry = CommitEntry {
            commit_lsn: Lsn(base.commit_lsn.wrapping_add(unzigzag(d_lsn) as u64)),
            end_lsn: Lsn(0),
            commit_time: PgTimestamp(base.commit_time.wrapping_add(unzigzag(d_time))),
            xid: base.xid.wrapping_add(unzigzag32(d_xid as u32)),
            first_record: base.first_record.wrapping_add(unzigzag32(d_first as u32)),
        };
        let entry = CommitEntry {
            end_lsn: Lsn(entry.commit_lsn.0.wrapping_add(d_end)),
            ..entry
        };
        base = CommitBase {
            commit_lsn: entry.commit_lsn.0,
            commit_time: entry.commit_time.0,
            xid: entry.xid,
            first_record: entry.first_record,
        };
        commits.push(entry);
    }
    if pos != index.len() {
        return Err(malformed(
            Region::Trailer,
            offset + pos as u64,
            format!(
                "the {count} commit entries end at offset {pos} of the commit index, which is {} \
                 bytes long",
                index.len()
            ),
        ));
    }
    Ok(())
}

/// Decompresses a version 3 commit index: one zstd frame declaring its content size, at least 5
/// and at most 50 bytes an entry (five varints of at most 10 bytes).
fn decompress_commit_index(index: &[u8], offset: u64, count: u32) -> Result<Vec<u8>, SegmentError> {
    let fail =
        |detail: String| malformed(Region::Trailer, offset, format!("commit index: {detail}"));
    let min = u64::from(count) * MIN_COMMIT_ENTRY_LEN_V2 as u64;
    let max = (u64::from(count) * 50).min(index.len() as u64 * MAX_ZSTD_RATIO);
    let size = check_zstd_frame(index).map_err(fail)?;
    if size < min || size > max {
        return Err(fail(format!(
            "the frame declares {size} bytes of content, {count} entries take {min}..={max}"
        )));
    }
    zstd_decompress(index, size as usize).map_err(fail)
}

/// Decodes a version 3 commit index's decompressed columns: the five varints of every entry
/// (as in version 2), column by column.
fn decode_commit_columns(
    columns: &[u8],
    offset: u64,
    count: u32,
    base: CommitBase,
    commits: &mut Vec<CommitEntry>,
) -> Result<(), SegmentError> {
    // Re-interleave into version 2's entry order and decode that: one varint parser, one set
    // of checks.
    let mut fields: [Vec<&[u8]>; 5] = Default::default();
    let mut pos = 0;
    for (f, column) in fields.iter_mut().enumerate() {
        let bits = if f < 3 { 64 } else { 32 };
        column.reserve(count as usize);
        for k in 0..count {
            let start = pos;
            get_uvarint(columns, &mut pos, bits).map_err(|e| {
                malformed(
                    Region::Trailer,
                    offset,
                    format!("commit entry {k}: field {} at offset {start} of the decompressed commit index {e}", f + 1),
                )
            })?;
            column.push(&columns[start..pos]);
        }
    }
    if pos != columns.len() {
        return Err(malformed(
            Region::Trailer,
            offset,
            format!(
                "the {count} commit entries end at offset {pos} of the decompressed commit index, \
                 which is {} bytes long",
                columns.len()
            ),
        ));
    }
    let mut entries = Vec::with_capacity(columns.len());
    for k in 0..count as usize {
        for column in &fields {
            entries.extend_from_slice(column[k]);
        }
    }
    decode_commits(&entries, offset, count, base, commits)
}

/// Reads and verifies a segment's header, trailer and block table without decompressing any
/// block: enough for listings and restore planning.
pub fn read_info(bytes: &[u8]) -> Result<(SegmentInfo, Vec<CommitEntry>), SegmentError> {
    let layout = parse_layout(bytes)?;
    Ok((layout.info, layout.commits))
}

/// A parsed segment. Blocks are decompressed lazily by [`Segment::records`].
#[derive(Clone)]
pub struct Segment {
    /// Header and trailer fields.
    pub info: SegmentInfo,
    /// The commit index, in the order the commits were recorded.
    pub commits: Vec<CommitEntry>,
    version: Version,
    blocks: Vec<BlockEntry>,
    bytes: Bytes,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment")
            .field("version", &self.version.number())
            .field("info", &self.info)
            .field("commits", &self.commits.len())
            .field("blocks", &self.blocks.len())
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Where a record sits in a decompressed block.
struct Framed {
    lsn: u64,
    server_time: i64,
    payload: std::ops::Range<usize>,
}

/// Reads the record framed at `pos` of a decompressed block. `prev` is the lsn and server time
/// of the block's previous record (0 for its first), from which version 2 records are deltas.
/// On error, says what is wrong with the record (to follow "record N at offset P of the
/// decompressed block").
fn frame_at(
    version: Version,
    block: &[u8],
    pos: usize,
    prev: (u64, i64),
) -> Result<Framed, String> {
    let left = block.len() - pos.min(block.len());
    match version {
        Version::V1 => {
            let overrun = |needed: usize| format!("overruns it: needs {needed} bytes, {left} left");
            let header = block
                .get(pos..pos + RECORD_HEADER_LEN)
                .ok_or_else(|| overrun(RECORD_HEADER_LEN))?;
            let mut c = Cursor::new(header, 0, Region::File);
            let (lsn, server_time, len) = match (c.u64(""), c.i64(""), c.u32("")) {
                (Ok(l), Ok(t), Ok(n)) => (l, t, n as usize),
                _ => return Err(overrun(RECORD_HEADER_LEN)),
            };
            let start = pos + RECORD_HEADER_LEN;
            let needed = RECORD_HEADER_LEN + len;
            if needed > left {
                return Err(overrun(needed));
            }
            Ok(Framed {
                lsn,
                server_time,
                payload: start..start + len,
            })
        }
        Version::V2 | Version::V3 => {
            let mut at = pos;
            let mut field = |name: &str| {
                let field_at = at;
                get_uvarint(block, &mut at, 64)
                    .map_err(|e| format!("has a {name} varint at offset {field_at} that {e}"))
            };
            let d_lsn = field("lsn delta")?;
            let d_time = field("server_time delta")?;
            let len = field("payload length")?;
            let left = block.len() - at;
            if len > left as u64 {
                return Err(format!(
                    "overruns it: a payload of {len} bytes at offset {at}, {left} bytes left"
                ));
            }
            let len = len as usize;
            Ok(Framed {
                lsn: prev.0.wrapping_add(unzigzag(d_lsn) as u64),
                server_time: prev.1.wrapping_add(unzigzag(d_time)),
                payload: at..at + len,
            })
        }
    }
}

impl Segment {
    /// Parses and verifies a segment: magic, version, footer, header and trailer checksums and
    /// the block table. Block contents are verified as [`Segment::records`] reaches them.
    pub fn parse(bytes: Bytes) -> Result<Segment, SegmentError> {
        let Layout {
            version,
            info,
            commits,
            blocks,
        } = parse_layout(&bytes)?;
        Ok(Segment {
            info,
            commits,
            version,
            blocks,
            bytes,
        })
    }

    /// The file's format version (1 to 3).
    pub fn format_version(&self) -> u16 {
        self.version.number()
    }

    /// Number of blocks in the segment.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The records in order. Each block is checksummed, decompressed, checksummed again and
    /// fully framed before any of its records is yielded; payloads are zero-copy slices of the
    /// decompressed block. After the first error the iterator ends.
    pub fn records(&self) -> Records<'_> {
        Records {
            segment: self,
            next_block: 0,
            block: Bytes::new(),
            pos: 0,
            prev: (0, 0),
            left: 0,
            done: false,
        }
    }

    /// Iterates over the records from record `first` on (numbered across the segment), without
    /// decompressing the blocks before the one holding it. Returns the iterator and the number
    /// of the first record it yields (≤ `first`: the first record of that block), or the record
    /// count if `first` is past the end.
    pub fn records_from(&self, first: u64) -> (Records<'_>, u64) {
        let mut skipped = 0u64;
        let mut next_block = 0;
        while let Some(b) = self.blocks.get(next_block) {
            if skipped + u64::from(b.record_count) > first {
                break;
            }
            skipped += u64::from(b.record_count);
            next_block += 1;
        }
        let mut it = self.records();
        it.next_block = next_block;
        (it, skipped)
    }

    /// Decodes every block, discarding the records: a full integrity check.
    pub fn verify(&self) -> Result<(), SegmentError> {
        self.records().try_for_each(|r| r.map(drop))
    }

    /// Verifies, decompresses and frames block `index`.
    fn decode_block(&self, index: usize) -> Result<Bytes, SegmentError> {
        let b = self.blocks[index];
        let n = index as u32;
        // parse_layout checked b.offset + 20 + compressed_len ≤ trailer offset ≤ file length.
        let start = b.offset as usize;
        let data_start = start + BLOCK_HEADER_LEN;
        let stored = self
            .bytes
            .get(data_start..b.end() as usize)
            .ok_or_else(|| malformed(Region::Block(n), b.offset, "block lies outside the file"))?;
        let actual = block_crc(&b, stored);
        if actual != b.block_crc {
            return Err(SegmentError::Checksum {
                region: Region::Block(n),
                offset: b.offset,
                expected: b.block_crc,
                actual,
            });
        }
        let data = match self.version {
            Version::V1 => decompress_lz4(stored, &b, n)?,
            Version::V2 => decompress_zstd(stored, &b, n)?,
            Version::V3 => {
                let body = decompress_zstd(stored, &b, n)?;
                columns::decode(&body, b.record_count).map_err(|detail| {
                    malformed(
                        Region::Block(n),
                        b.offset,
                        format!("its columns do not decode: {detail}"),
                    )
                })?
            }
        };
        let actual = crc32fast::hash(&data);
        if actual != b.data_crc {
            return Err(SegmentError::DataChecksum {
                block: n,
                offset: b.offset,
                expected: b.data_crc,
                actual,
            });
        }
        let mut pos = 0;
        let mut prev = (0, 0);
        for r in 0..b.record_count {
            match frame_at(self.version, &data, pos, prev) {
                Ok(f) => {
                    pos = f.payload.end;
                    prev = (f.lsn, f.server_time);
                }
                Err(detail) => {
                    return Err(malformed(
                        Region::Block(n),
                        b.offset,
                        format!("record {r} at offset {pos} of the decompressed block {detail}"),
                    ))
                }
            }
        }
        if pos != data.len() {
            return Err(malformed(
                Region::Block(n),
                b.offset,
                format!(
                    "its {} records end at offset {pos} of the decompressed block, \
                     which is {} bytes long",
                    b.record_count,
                    data.len()
                ),
            ));
        }
        Ok(Bytes::from(data))
    }
}

fn decompress_error(b: &BlockEntry, n: u32, codec: &'static str, detail: String) -> SegmentError {
    SegmentError::Decompress {
        block: n,
        offset: b.offset,
        codec,
        detail,
    }
}

/// Decompresses a version 1 block: an LZ4 block of exactly `uncompressed_len` bytes.
fn decompress_lz4(stored: &[u8], b: &BlockEntry, n: u32) -> Result<Vec<u8>, SegmentError> {
    let fail = |detail| Err(decompress_error(b, n, "lz4", detail));
    // Bounded by 255 × compressed_len (checked by parse_layout).
    let mut data = vec![0u8; b.uncompressed_len as usize];
    match lz4_flex::block::decompress_into(stored, &mut data) {
        Ok(got) if got == data.len() => Ok(data),
        Ok(got) => fail(format!(
            "decompressed to {got} bytes, the header declares {}",
            b.uncompressed_len
        )),
        Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => fail(format!(
            "decompresses to more than the {} bytes the header declares",
            b.uncompressed_len
        )),
        Err(e) => fail(e.to_string()),
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused for every block.
    static ZSTD_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a version 2 or 3 block: exactly one zstd frame, no dictionary, whose header
/// declares the content size `uncompressed_len`, decompressing to exactly that many bytes.
fn decompress_zstd(stored: &[u8], b: &BlockEntry, n: u32) -> Result<Vec<u8>, SegmentError> {
    let fail = |detail| decompress_error(b, n, "zstd", detail);
    let declared = b.uncompressed_len;
    let size = check_zstd_frame(stored).map_err(fail)?;
    if size != u64::from(declared) {
        return Err(fail(format!(
            "the frame declares {size} bytes of content, the block header {declared}"
        )));
    }
    // Bounded by MAX_ZSTD_RATIO × compressed_len (checked by parse_layout).
    zstd_decompress(stored, declared as usize).map_err(fail)
}

/// Checks that `stored` is exactly one zstd frame that declares its content size, and returns
/// that size.
fn check_zstd_frame(stored: &[u8]) -> Result<u64, String> {
    if stored.get(..4) != Some(&ZSTD_MAGIC[..]) {
        return Err(format!(
            "not a zstd frame: starts with {}, expected {}",
            hex(&stored[..stored.len().min(4)]),
            hex(&ZSTD_MAGIC)
        ));
    }
    match zstd::zstd_safe::find_frame_compressed_size(stored) {
        Ok(len) if len == stored.len() => {}
        Ok(len) => {
            return Err(format!(
                "the zstd frame takes {len} of the {} stored bytes (exactly one frame is allowed)",
                stored.len()
            ))
        }
        Err(code) => return Err(zstd::zstd_safe::get_error_name(code).to_string()),
    }
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(size)) => Ok(size),
        Ok(None) => Err("the frame does not declare its content size".to_string()),
        Err(_) => Err("the frame header is malformed".to_string()),
    }
}

/// Decompresses a checked frame ([`check_zstd_frame`]) that declares `size` bytes. The frame's
/// content size is checked by zstd, so more output is an error, not a write.
fn zstd_decompress(stored: &[u8], size: usize) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(size);
    let result = ZSTD_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let dctx = slot.as_mut().expect("set above");
        dctx.decompress_to_buffer(stored, &mut data)
    });
    match result {
        Ok(got) if got == size && data.len() == got => Ok(data),
        Ok(got) => Err(format!(
            "decompressed to {got} bytes, the frame declares {size}"
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Iterator over a segment's records; see [`Segment::records`].
pub struct Records<'a> {
    segment: &'a Segment,
    next_block: usize,
    /// Decompressed current block.
    block: Bytes,
    pos: usize,
    /// lsn and server time of the previous record in the block.
    prev: (u64, i64),
    /// Records left in the current block.
    left: u32,
    done: bool,
}

impl Iterator for Records<'_> {
    type Item = Result<Record, SegmentError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if self.left > 0 {
                // decode_block framed every record of the block already.
                let Ok(f) = frame_at(self.segment.version, &self.block, self.pos, self.prev) else {
                    self.done = true;
                    return Some(Err(malformed(
                        Region::Block(self.next_block.saturating_sub(1) as u32),
                        0,
                        "record framing changed after verification",
                    )));
                };
                self.left -= 1;
                self.pos = f.payload.end;
                self.prev = (f.lsn, f.server_time);
                return Some(Ok(Record {
                    lsn: Lsn(f.lsn),
                    server_time: PgTimestamp(f.server_time),
                    payload: self.block.slice(f.payload),
                }));
            }
            if self.next_block == self.segment.blocks.len() {
                self.done = true;
                break;
            }
            match self.segment.decode_block(self.next_block) {
                Ok(block) => {
                    self.left = self.segment.blocks[self.next_block].record_count;
                    self.block = block;
                    self.pos = 0;
                    self.prev = (0, 0);
                    self.next_block += 1;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl std::iter::FusedIterator for Records<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn object_name(generation: u32, start: Lsn, end: Lsn) -> String {
        crate::catalog::keys::segment(generation, start, end)
    }

    fn parse_object_name(name: &str) -> Option<(u32, Lsn, Lsn)> {
        crate::catalog::keys::parse_segment(name).map(|k| (k.generation, k.start, k.end))
    }
    use proptest::prelude::*;

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

    // ---- unit tests ----

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

    #[test]
    fn fixtures_round_trip() {
        check_round_trip(&empty_fixture());
        check_round_trip(&one_transaction_fixture());
        check_round_trip(&multi_block_fixture());
    }

    #[test]
    fn empty_segment_is_minimal() {
        let f = empty_fixture();
        let bytes = f.encode();
        let expected = HEADER_FIXED_LEN
            + "shop".len()
            + "tidemark_shop".len()
            + TRAILER_FIXED_LEN_V2
            + FOOTER_LEN;
        assert_eq!(bytes.len(), expected);
        let seg = Segment::parse(bytes).unwrap();
        assert_eq!(seg.block_count(), 0);
        assert!(seg.records().next().is_none());
    }

    #[test]
    fn blocks_respect_the_block_size() {
        let f = multi_block_fixture();
        let seg = Segment::parse(f.encode()).unwrap();
        assert!(seg.block_count() > 3, "{} blocks", seg.block_count());
        // The block size bounds the framed records (version 3 stores them as columns).
        let framed: Vec<usize> = (0..seg.block_count())
            .map(|i| seg.decode_block(i).unwrap().len())
            .collect();
        for (b, len) in seg.blocks.iter().zip(&framed) {
            assert!(*len <= f.block_size || b.record_count == 1, "{b:?}");
        }
        // The oversized update sits alone in its block.
        assert!(seg
            .blocks
            .iter()
            .zip(&framed)
            .any(|(b, len)| b.record_count == 1 && *len > f.block_size));
    }

    #[test]
    fn payloads_share_their_block() {
        let f = one_transaction_fixture();
        let seg = Segment::parse(f.encode()).unwrap();
        assert_eq!(seg.block_count(), 1);
        let records: Vec<Record> = seg.records().map(Result::unwrap).collect();
        // Consecutive slices of one decompressed buffer, the next record's framing apart.
        let mut prev = (0u64, 0i64);
        let mut framing = Vec::new();
        for r in &records {
            let len = uvarint_len(zigzag(r.lsn.0.wrapping_sub(prev.0) as i64))
                + uvarint_len(zigzag(r.server_time.0.wrapping_sub(prev.1)))
                + uvarint_len(r.payload.len() as u64);
            framing.push(len);
            prev = (r.lsn.0, r.server_time.0);
        }
        for i in 1..records.len() {
            let end = records[i - 1].payload.as_ptr() as usize + records[i - 1].payload.len();
            assert_eq!(
                records[i].payload.as_ptr() as usize,
                end + framing[i],
                "record {i}"
            );
        }
    }

    #[test]
    fn encoded_len_tracks_the_file_size() {
        let f = multi_block_fixture();
        let mut b = SegmentBuilder::new(1, 1, 1, "db", "slot", Lsn(0)).with_block_size(256);
        for r in &f.records {
            b.push(r);
        }
        let estimate = b.encoded_len();
        let actual = b.finish(Lsn(1), PgTimestamp(0)).len();
        // The estimate only counts the pending block uncompressed.
        assert!(
            estimate >= actual && estimate <= actual + 256 + 64,
            "{estimate} vs {actual}"
        );
    }

    #[test]
    fn block_size_is_clamped() {
        let b = SegmentBuilder::new(1, 1, 1, "db", "slot", Lsn(0)).with_block_size(0);
        assert_eq!(b.block_size(), 1);
        let b = b.with_block_size(usize::MAX);
        assert_eq!(b.block_size(), MAX_BLOCK_SIZE);
    }

    #[test]
    fn object_names_sort_and_round_trip() {
        let name = object_name(1, Lsn(0x16B_3700), Lsn(0x16_B374_D848));
        assert_eq!(
            name,
            "segments/00000001/00000000016B3700-00000016B374D848.seg"
        );
        assert_eq!(
            parse_object_name(&name),
            Some((1, Lsn(0x16B_3700), Lsn(0x16_B374_D848)))
        );
        let a = object_name(1, Lsn(0xF), Lsn(0x10));
        let b = object_name(1, Lsn(0x10), Lsn(0x1_0000_0000));
        let c = object_name(2, Lsn(0), Lsn(1));
        assert!(a < b && b < c);
        for bad in [
            "segments/00000001/00000000016b3700-00000016B374D848.seg",
            "segments/1/00000000016B3700-00000016B374D848.seg",
            "segments/00000001/16B3700-00000016B374D848.seg",
            "segments/00000001/00000000016B3700-00000016B374D848",
            "segments/00000001/00000000016B3700_00000016B374D848.seg",
            "other/00000001/00000000016B3700-00000016B374D848.seg",
            "segments/0000000G/00000000016B3700-00000016B374D848.seg",
            "segments/+0000001/00000000016B3700-00000016B374D848.seg",
            "segments/00000001/00000000016B3700-00000016B374D848.seg/x",
        ] {
            assert_eq!(parse_object_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn crc32_is_the_ieee_one() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn every_single_byte_change_is_detected() {
        let mut v1 = multi_block_fixture();
        v1.version = 1;
        for bytes in [multi_block_fixture().encode(), v1.encode()] {
            for at in 0..bytes.len() {
                for xor in [0x01u8, 0x80, 0xFF] {
                    let mut bad = bytes.to_vec();
                    bad[at] ^= xor;
                    assert!(
                        decode_all(&bad).is_err(),
                        "flip 0x{xor:02X} at {at} went unnoticed"
                    );
                }
            }
        }
    }

    #[test]
    fn every_truncation_and_extension_is_detected() {
        let bytes = multi_block_fixture().encode();
        for len in 0..bytes.len() {
            assert!(decode_all(&bytes[..len]).is_err(), "truncation to {len}");
        }
        for extra in [&[0u8][..], &MAGIC, &bytes[bytes.len() - FOOTER_LEN..]] {
            let mut long = bytes.to_vec();
            long.extend_from_slice(extra);
            assert!(decode_all(&long).is_err(), "appended {extra:?}");
        }
    }

    #[test]
    fn header_errors_name_both_values() {
        let bytes = one_transaction_fixture().encode();
        let mut v4 = bytes.to_vec();
        v4[8] = 4;
        assert_eq!(
            Segment::parse(v4.into()).unwrap_err().to_string(),
            "unsupported segment format version 4: this build reads versions 1 to 3\n\
             HINT: a newer tidemark wrote this archive; read it with that release or a later one"
        );
        let mut flagged = bytes.to_vec();
        flagged[10] = 0x04;
        let header_len = u32_at(&flagged, 12).unwrap() as usize;
        let crc = crc32fast::hash(&flagged[..header_len - 4]);
        flagged[header_len - 4..header_len].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Segment::parse(flagged.into()).unwrap_err(),
            SegmentError::UnknownFlags {
                found: 4,
                known: FLAG_STREAMED
            }
        );
        assert!(matches!(
            Segment::parse(Bytes::from_static(b"\x89TDMSEG")),
            Err(SegmentError::BadMagic { .. })
        ));
        assert!(matches!(
            Segment::parse(Bytes::from_static(b"\x89TDMSEG\n\x01\x00")),
            Err(SegmentError::TooShort { len: 10, .. })
        ));
    }

    #[test]
    fn header_extension_area_is_skipped() {
        let f = one_transaction_fixture();
        let bytes = f.encode();
        let header_len = u32_at(&bytes, 12).unwrap() as usize;
        // Insert 5 extension bytes before the header crc and fix every dependent field.
        let mut header = bytes[..header_len - 4].to_vec();
        header.extend_from_slice(b"ext!!");
        let new_len = header.len() + 4;
        header[12..16].copy_from_slice(&(new_len as u32).to_le_bytes());
        let crc = crc32fast::hash(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        let seg = Segment::parse(bytes.clone()).unwrap();
        let forged = relayout(header, &seg, |_, _| {});
        let (seg2, records) = decode_all(&forged).unwrap();
        assert_eq!(seg2.info, f.info());
        assert_eq!(records, f.records);
    }

    /// Rebuilds a file from `header` and the blocks of `seg`, letting `edit` replace any block's
    /// uncompressed contents and header fields before they are compressed and checksummed.
    /// Produces files whose checksums are all valid but whose contents break a rule.
    fn relayout(
        header: Vec<u8>,
        seg: &Segment,
        mut edit: impl FnMut(usize, &mut Forge),
    ) -> Vec<u8> {
        let mut out = header;
        let mut blocks = Vec::new();
        let mut zstd = Zstd::new(DEFAULT_ZSTD_LEVEL);
        for (i, b) in seg.blocks.iter().enumerate() {
            let data = seg.decode_block(i).unwrap().to_vec();
            let mut forge = Forge {
                data,
                record_count: b.record_count,
                uncompressed_len: None,
                data_crc: None,
                compressed: None,
            };
            edit(i, &mut forge);
            let crc = crc32fast::hash(&forge.data);
            let mut e = match seg.version {
                Version::V1 => append_block(&mut out, &forge.data, crc, forge.record_count, None),
                Version::V2 => append_block(
                    &mut out,
                    &forge.data,
                    crc,
                    forge.record_count,
                    Some(&mut zstd),
                ),
                Version::V3 => {
                    let body = columns::encode(&forge.data, forge.record_count);
                    append_block(&mut out, &body, crc, forge.record_count, Some(&mut zstd))
                }
            };
            let start = e.offset as usize + BLOCK_HEADER_LEN;
            if let Some(c) = forge.compressed {
                out.truncate(start);
                out.extend_from_slice(&c);
                e.compressed_len = c.len() as u32;
            }
            e.uncompressed_len = forge.uncompressed_len.unwrap_or(e.uncompressed_len);
            e.data_crc = forge.data_crc.unwrap_or(e.data_crc);
            e.block_crc = block_crc(&e, &out[start..]);
            out[e.offset as usize..start].copy_from_slice(&e.header_bytes());
            blocks.push(e);
        }
        let records = blocks.iter().map(|b| u64::from(b.record_count)).sum();
        let mut index = Vec::new();
        let mut base = CommitBase::new(seg.info.start_lsn, seg.info.created_at);
        let mut columns: [Vec<u8>; 5] = Default::default();
        for c in &seg.commits {
            if seg.version == Version::V3 {
                encode_commit_columns(&mut columns, &mut base, c);
            } else {
                encode_commit(seg.version, &mut index, &mut base, c);
            }
        }
        if seg.version == Version::V3 && !seg.commits.is_empty() {
            index = zstd.compress(&columns.concat()).to_vec();
        }
        append_trailer_and_footer(
            &mut out,
            seg.version,
            Totals {
                end_lsn: seg.info.end_lsn,
                last_server_time: seg.info.last_server_time,
                record_count: records,
            },
            &blocks,
            seg.commits.len(),
            &index,
        );
        out
    }

    struct Forge {
        data: Vec<u8>,
        record_count: u32,
        uncompressed_len: Option<u32>,
        data_crc: Option<u32>,
        compressed: Option<Vec<u8>>,
    }

    fn forged_error(edit: impl FnMut(usize, &mut Forge)) -> String {
        forged_error_v(1, edit)
    }

    fn forged_error_v(version: u16, edit: impl FnMut(usize, &mut Forge)) -> String {
        let mut f = one_transaction_fixture();
        f.version = version;
        let bytes = f.encode();
        let seg = Segment::parse(bytes.clone()).unwrap();
        let header_len = u32_at(&bytes, 12).unwrap() as usize;
        let forged = relayout(bytes[..header_len].to_vec(), &seg, edit);
        decode_all(&forged).unwrap_err().to_string()
    }

    #[test]
    fn v1_content_rules_are_enforced_even_with_valid_checksums() {
        let at = HEADER_FIXED_LEN + 4 + 13; // the only block follows the header
        let len: usize = one_transaction_fixture()
            .records
            .iter()
            .map(|r| 20 + r.payload.len())
            .sum();
        let commit_at = len - 46; // the Commit record: 20 bytes of framing, 26 of payload
                                  // A record claiming more payload than the block holds.
        let msg = forged_error(|_, f| {
            // The commit record is the last 20 + 26 bytes; claim one byte more payload.
            let commit = f.data.len() - 46;
            f.data[commit + 16..commit + 20].copy_from_slice(&27u32.to_le_bytes());
        });
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: record 3 at offset {commit_at} of the decompressed block \
                 overruns it: needs 47 bytes, 46 left"
            )
        );
        // Bytes after the last record.
        let msg = forged_error(|_, f| f.data.extend_from_slice(&[0; 3]));
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: its 4 records end at offset {len} of the decompressed \
                 block, which is {} bytes long",
                len + 3
            )
        );
        // Fewer records declared than present is the same rule seen from the other side.
        let msg = forged_error(|_, f| f.record_count = 3);
        assert!(
            msg.contains(&format!("its 3 records end at offset {commit_at}")),
            "{msg}"
        );
        // Declared uncompressed size larger or smaller than the real one.
        let msg = forged_error(|_, f| f.uncompressed_len = Some(len as u32 + 1));
        assert_eq!(
            msg,
            format!("block 0 at offset {at}: lz4 decompression failed: decompressed to {len} bytes, the header declares {}", len + 1)
        );
        let msg = forged_error(|_, f| f.uncompressed_len = Some(len as u32 - 1));
        assert_eq!(
            msg,
            format!("block 0 at offset {at}: lz4 decompression failed: decompresses to more than the {} bytes the header declares", len - 1)
        );
        // A data crc that does not match (compressor fault on the writer side).
        let msg = forged_error(|_, f| f.data_crc = Some(0xDEAD_BEEF));
        assert!(
            msg.starts_with(&format!(
                "block {} at offset {at}: crc32 mismatch in decompressed data: expected 0xDEADBEEF, got 0x",
                0
            )),
            "{msg}"
        );
        // Not LZ4 at all.
        let msg = forged_error(|_, f| f.compressed = Some(vec![0xF0; 40]));
        assert!(msg.contains("lz4 decompression failed"), "{msg}");
        // A block without records.
        let msg = forged_error(|_, f| {
            f.data.clear();
            f.record_count = 0;
        });
        assert_eq!(
            msg,
            format!("block 0 at offset {at}: block holds no records")
        );
        // An uncompressed size beyond what LZ4 can express (allocation guard).
        let msg = forged_error(|_, f| f.uncompressed_len = Some(u32::MAX));
        assert!(
            msg.contains("uncompressed length 4294967295 is impossible"),
            "{msg}"
        );
    }

    /// Where each record of a decompressed version 2 block starts, and its payload.
    fn v2_layout(data: &[u8], count: u32) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut pos = 0;
        let mut prev = (0, 0);
        let mut out = Vec::new();
        for _ in 0..count {
            let f = frame_at(Version::V2, data, pos, prev).unwrap();
            out.push((pos, f.payload.clone()));
            pos = f.payload.end;
            prev = (f.lsn, f.server_time);
        }
        out
    }

    #[test]
    fn v2_content_rules_are_enforced_even_with_valid_checksums() {
        let at = HEADER_FIXED_LEN + 4 + 13; // the only block follows the header
        let f = one_transaction_fixture();
        let seg = Segment::parse(f.encode()).unwrap();
        let data = seg.decode_block(0).unwrap().to_vec();
        let len = data.len();
        let layout = v2_layout(&data, 4);
        let (commit_at, commit_payload) = layout[3].clone();
        let forged = |edit: &dyn Fn(&mut Forge)| forged_error_v(2, |_, f| edit(f));
        // The Commit record claims one byte more payload than the block holds.
        let msg = forged(&|f| f.data[commit_payload.start - 1] = 27);
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: record 3 at offset {commit_at} of the decompressed block \
                 overruns it: a payload of 27 bytes at offset {}, 26 bytes left",
                commit_payload.start
            )
        );
        // The same length in a longer varint than needed.
        let msg = forged(&|f| {
            let p = commit_payload.start - 1;
            f.data.splice(p..p + 1, [26 | 0x80, 0]);
        });
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: record 3 at offset {commit_at} of the decompressed block \
                 has a payload length varint at offset {} that is not in its shortest form",
                commit_payload.start - 1
            )
        );
        // An lsn delta of more than 64 bits.
        let msg = forged(&|f| {
            let mut bad = vec![0xFF; 9];
            bad.push(0x02);
            let first = layout[0].1.start;
            let mut rest = f.data[first..].to_vec();
            f.data = bad;
            f.data.extend_from_slice(&[0, 21]);
            f.data.append(&mut rest);
        });
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: record 0 at offset 0 of the decompressed block has a \
                 lsn delta varint at offset 0 that does not fit the field"
            )
        );
        // A varint cut by the end of the block.
        let msg = forged(&|f| {
            f.data = vec![0x80; 3];
            f.record_count = 1;
        });
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: record 0 at offset 0 of the decompressed block has a \
                 lsn delta varint at offset 0 that runs past the end"
            )
        );
        // Bytes after the last record.
        let msg = forged(&|f| f.data.extend_from_slice(&[0; 3]));
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: its 4 records end at offset {len} of the decompressed \
                 block, which is {} bytes long",
                len + 3
            )
        );
        // Declared uncompressed size larger or smaller than the frame's content size.
        for declared in [len + 1, len - 1] {
            let msg = forged(&|f| f.uncompressed_len = Some(declared as u32));
            assert_eq!(
                msg,
                format!(
                    "block 0 at offset {at}: zstd decompression failed: the frame declares {len} \
                     bytes of content, the block header {declared}"
                )
            );
        }
        // Not zstd at all (an LZ4 block, say).
        let msg = forged(&|f| f.compressed = Some(lz4_flex::block::compress(&f.data)));
        assert!(
            msg.contains("zstd decompression failed: not a zstd frame: starts with"),
            "{msg}"
        );
        // Two frames, or a frame with bytes after it.
        let msg = forged(&|f| {
            let (a, b) = f.data.split_at(10);
            let mut two = zstd::bulk::compress(a, 3).unwrap();
            two.extend(zstd::bulk::compress(b, 3).unwrap());
            f.compressed = Some(two);
        });
        assert!(msg.contains("the zstd frame takes "), "{msg}");
        let msg = forged(&|f| {
            let mut one = zstd::bulk::compress(&f.data, 3).unwrap();
            one.push(0);
            f.compressed = Some(one);
        });
        assert!(msg.contains("the zstd frame takes "), "{msg}");
        // A truncated frame.
        let msg = forged(&|f| {
            let mut one = zstd::bulk::compress(&f.data, 3).unwrap();
            one.truncate(one.len() - 3);
            f.compressed = Some(one);
        });
        assert!(msg.contains("zstd decompression failed: "), "{msg}");
        // A frame without a content size (as a streaming compressor writes it).
        let msg = forged(&|f| {
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
                .unwrap();
            f.compressed = Some(c.compress(&f.data).unwrap());
        });
        assert_eq!(
            msg,
            format!(
                "block 0 at offset {at}: zstd decompression failed: the frame does not declare \
                 its content size"
            )
        );
        // A data crc that does not match (compressor fault on the writer side).
        let msg = forged(&|f| f.data_crc = Some(0xDEAD_BEEF));
        assert!(
            msg.starts_with(&format!(
                "block 0 at offset {at}: crc32 mismatch in decompressed data: expected 0xDEADBEEF, got 0x"
            )),
            "{msg}"
        );
        // An uncompressed size beyond what zstd can express (allocation guard).
        let msg = forged(&|f| f.uncompressed_len = Some(u32::MAX));
        assert!(
            msg.contains("uncompressed length 4294967295 is impossible"),
            "{msg}"
        );
        // Fewer bytes than 3 per record.
        let msg = forged(&|f| f.record_count = len as u32);
        assert!(
            msg.contains(&format!(
                "uncompressed length {len} is impossible for {len} records"
            )),
            "{msg}"
        );
    }

    /// `f` encoded, with its trailer rebuilt around `count` commit entries in `index`.
    fn with_commit_index(f: &Fixture, count: usize, index: &[u8]) -> Vec<u8> {
        let bytes = f.encode();
        let seg = Segment::parse(bytes.clone()).unwrap();
        let trailer_offset = seg
            .blocks
            .last()
            .map_or(u32_at(&bytes, 12).unwrap() as u64, |b| b.end());
        let mut out = bytes[..trailer_offset as usize].to_vec();
        let totals = Totals {
            end_lsn: seg.info.end_lsn,
            last_server_time: seg.info.last_server_time,
            record_count: seg.info.record_count,
        };
        append_trailer_and_footer(&mut out, seg.version, totals, &seg.blocks, count, index);
        out
    }

    #[test]
    fn v3_commit_index_rules_are_enforced() {
        let f = multi_block_fixture();
        assert_eq!(f.version, 3);
        let seg = Segment::parse(f.encode()).unwrap();
        let n = seg.commits.len();
        let mut base = CommitBase::new(seg.info.start_lsn, seg.info.created_at);
        let mut columns: [Vec<u8>; 5] = Default::default();
        for c in &seg.commits {
            encode_commit_columns(&mut columns, &mut base, c);
        }
        let plain = columns.concat();
        let frame = |content: &[u8]| zstd::bulk::compress(content, 3).unwrap();
        // Rebuilt unchanged, it reads back the same.
        assert_eq!(
            with_commit_index(&f, n, &frame(&plain)),
            f.encode().to_vec()
        );
        let trailer = seg.blocks.last().unwrap().end();
        let index_at = trailer + 36 + 28 * seg.blocks.len() as u64;
        let err = |bytes: Vec<u8>| decode_all(&bytes).unwrap_err().to_string();
        // Commits without an index, and an index without commits.
        assert!(err(with_commit_index(&f, n, &[])).contains("an index is empty exactly when"));
        assert!(err(with_commit_index(&f, 0, &frame(&plain))).contains("0 commits with a"));
        // The columns must hold exactly n entries: one field short, one byte over.
        let short = &plain[..plain.len() - 1];
        assert!(err(with_commit_index(&f, n, &frame(short))).contains("runs past the end"));
        let mut long = plain.clone();
        long.push(0);
        assert_eq!(
            err(with_commit_index(&f, n, &frame(&long))),
            format!(
                "trailer at offset {index_at}: the {n} commit entries end at offset {} of the \
                 decompressed commit index, which is {} bytes long",
                plain.len(),
                plain.len() + 1
            )
        );
        // A frame that declares less than 5 bytes an entry is refused before decompressing.
        assert_eq!(
            err(with_commit_index(&f, n, &frame(&plain[..4 * n]))),
            format!(
                "trailer at offset {index_at}: commit index: the frame declares {} bytes of \
                 content, {n} entries take {}..={}",
                4 * n,
                5 * n,
                50 * n
            )
        );
        // Not a zstd frame.
        assert!(err(with_commit_index(&f, n, &plain)).contains("not a zstd frame"));
    }

    #[test]
    fn v2_commit_index_rules_are_enforced() {
        let mut f = multi_block_fixture();
        f.version = 2;
        let seg = Segment::parse(f.encode()).unwrap();
        let mut index = Vec::new();
        let mut base = CommitBase::new(seg.info.start_lsn, seg.info.created_at);
        for c in &seg.commits {
            encode_commit(Version::V2, &mut index, &mut base, c);
        }
        let n = seg.commits.len();
        // Rebuilt unchanged, it reads back the same.
        let same = with_commit_index(&f, n, &index);
        assert_eq!(same, f.encode().to_vec());
        let trailer = seg.blocks.last().unwrap().end();
        let index_at = trailer + 36 + 28 * seg.blocks.len() as u64;
        let err = |bytes: Vec<u8>| decode_all(&bytes).unwrap_err().to_string();
        // One entry too many for the bytes.
        assert_eq!(
            err(with_commit_index(&f, n + 1, &index)),
            format!(
                "trailer at offset {}: commit entry {n}: the commit_lsn delta varint at offset {} \
                 of the commit index runs past the end",
                index_at + index.len() as u64,
                index.len()
            )
        );
        // A byte left over.
        let mut long = index.clone();
        long.push(0);
        assert_eq!(
            err(with_commit_index(&f, n, &long)),
            format!(
                "trailer at offset {}: the {n} commit entries end at offset {} of the commit \
                 index, which is {} bytes long",
                index_at + index.len() as u64,
                index.len(),
                index.len() + 1
            )
        );
        // More entries than the bytes can hold at 5 bytes each.
        assert_eq!(
            err(with_commit_index(&f, 1000, &index)),
            format!(
                "trailer at offset {}: 1000 commits cannot fit in a {}-byte commit index (each \
                 takes at least 5 bytes)",
                trailer + 28,
                index.len()
            )
        );
        // An overlong varint in the first entry's xid delta.
        let mut overlong = Vec::new();
        let c = seg.commits[0];
        put_uvarint(
            &mut overlong,
            zigzag(c.commit_lsn.0.wrapping_sub(seg.info.start_lsn.0) as i64),
        );
        put_uvarint(&mut overlong, c.end_lsn.0 - c.commit_lsn.0);
        put_uvarint(
            &mut overlong,
            zigzag(c.commit_time.0 - seg.info.created_at.0),
        );
        let xid_at = overlong.len();
        put_uvarint(&mut overlong, zigzag32(c.xid));
        let last = overlong.len() - 1;
        overlong[last] |= 0x80;
        overlong.push(0);
        put_uvarint(&mut overlong, 0);
        assert_eq!(
            err(with_commit_index(&f, 1, &overlong)),
            format!(
                "trailer at offset {index_at}: commit entry 0: the xid delta varint at offset \
                 {xid_at} of the commit index is not in its shortest form"
            )
        );
        // A first_record delta of more than 32 bits.
        let mut wide = overlong[..xid_at].to_vec();
        put_uvarint(&mut wide, zigzag32(c.xid));
        let first_at = wide.len();
        put_uvarint(&mut wide, 1 << 32);
        assert_eq!(
            err(with_commit_index(&f, 1, &wide)),
            format!(
                "trailer at offset {index_at}: commit entry 0: the first_record delta varint at \
                 offset {first_at} of the commit index does not fit the field"
            )
        );
        // The trailer's length must agree with the declared commit index length.
        let mut bytes = f.encode().to_vec();
        let len_at = trailer as usize + 32;
        let declared = u32_at(&bytes, len_at).unwrap();
        bytes[len_at..len_at + 4].copy_from_slice(&(declared + 1).to_le_bytes());
        reseal(&mut bytes);
        assert!(err(bytes).contains(&format!(
            "a {}-byte commit index need a trailer of",
            declared + 1
        )),);
    }

    #[test]
    fn commit_deltas_round_trip_at_the_extremes() {
        let mut f = one_transaction_fixture();
        let c = f.commits[0];
        f.commits = vec![
            CommitEntry {
                commit_lsn: Lsn(u64::MAX),
                end_lsn: Lsn(0),
                xid: u32::MAX,
                commit_time: PgTimestamp(i64::MIN),
                first_record: 3,
            },
            CommitEntry {
                commit_lsn: Lsn(0),
                end_lsn: Lsn(u64::MAX),
                xid: 0,
                commit_time: PgTimestamp(i64::MAX),
                first_record: 0,
            },
            c,
        ];
        f.start_lsn = Lsn(u64::MAX / 2);
        f.created_at = PgTimestamp(i64::MIN);
        check_round_trip(&f);
    }

    #[test]
    fn varints_are_leb128_and_canonical() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_uvarint(&mut out, v);
            assert_eq!(out.len(), uvarint_len(v), "{v}");
            let mut pos = 0;
            assert_eq!(get_uvarint(&out, &mut pos, 64), Ok(v));
            assert_eq!(pos, out.len());
        }
        let mut out = Vec::new();
        put_uvarint(&mut out, 300);
        assert_eq!(out, [0xAC, 0x02]);
        for (bytes, bits, err) in [
            (&[0x80, 0x00][..], 64, VarintError::Overlong),
            (&[0xFF, 0x80, 0x00][..], 64, VarintError::Overlong),
            (&[0x80][..], 64, VarintError::Truncated),
            (&[][..], 64, VarintError::Truncated),
            (
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02][..],
                64,
                VarintError::Overflow,
            ),
            (
                &[
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x81, 0x00,
                ][..],
                64,
                VarintError::Overflow,
            ),
            (
                &[0xFF, 0xFF, 0xFF, 0xFF, 0x10][..],
                32,
                VarintError::Overflow,
            ),
        ] {
            let mut pos = 0;
            assert_eq!(get_uvarint(bytes, &mut pos, bits), Err(err), "{bytes:02X?}");
            assert_eq!(pos, 0);
        }
        let mut pos = 0;
        assert_eq!(
            get_uvarint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F], &mut pos, 32),
            Ok(u64::from(u32::MAX))
        );
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!([zigzag(0), zigzag(-1), zigzag(1), zigzag(-2)], [0, 1, 2, 3]);
        for d in [0u32, 1, u32::MAX, 0x8000_0000, 0x7FFF_FFFF] {
            assert_eq!(unzigzag32(zigzag32(d) as u32), d);
        }
        assert_eq!(zigzag32(u32::MAX), 1, "-1 wraps to 1");
    }

    #[test]
    fn v1_segments_are_still_read() {
        for (_, mut f) in valid_cases() {
            f.version = 1;
            let bytes = f.encode();
            assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 1);
            check_round_trip(&f);
            assert_eq!(Segment::parse(bytes).unwrap().format_version(), 1);
        }
    }

    #[test]
    fn v2_is_smaller_than_v1_on_many_small_transactions() {
        let mut v2 = Fixture::new(Lsn(0x1000));
        let mut lsn = 0x1028u64;
        for xid in 1000..1400u32 {
            let idt = xid.to_string();
            let changes = vec![(lsn, insert(ORDERS, &[Some(&idt), Some("grace"), None]))];
            v2.txn(xid, lsn, changes, lsn + 0x40);
            lsn += 0x100;
        }
        let mut v1 = v2.clone();
        v1.version = 1;
        let (a, b) = (v1.encode().len(), v2.encode().len());
        assert!(b * 2 < a, "v2 {b} bytes, v1 {a} bytes");
        check_round_trip(&v2);
    }

    // ---- test vectors: proto/vectors/<case>/ ----

    fn vectors_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/vectors")
    }

    fn to_hex_lower(bytes: &[u8]) -> String {
        hex(bytes).to_ascii_lowercase()
    }

    /// The JSON shape of `expected.json`: LSNs as PostgreSQL prints them, timestamps as integer
    /// microseconds since 2000-01-01 UTC, the system id as a decimal string (it exceeds 2^53),
    /// payloads as lower-case hex.
    fn vector_json(
        version: u16,
        info: &SegmentInfo,
        block_count: usize,
        commits: &[CommitEntry],
        records: &[Record],
    ) -> serde_json::Value {
        serde_json::json!({
            "object_name": object_name(info.generation, info.start_lsn, info.end_lsn),
            "info": {
                "format_version": version,
                "system_id": info.system_id.to_string(),
                "timeline": info.timeline,
                "generation": info.generation,
                "database": info.database,
                "slot": info.slot,
                "start_lsn": info.start_lsn.to_string(),
                "end_lsn": info.end_lsn.to_string(),
                "last_server_time": info.last_server_time.0,
                "record_count": info.record_count,
                "created_at": info.created_at.0,
                "block_count": block_count,
                "flags": info.flags,
            },
            "commits": commits.iter().map(|c| serde_json::json!({
                "commit_lsn": c.commit_lsn.to_string(),
                "end_lsn": c.end_lsn.to_string(),
                "xid": c.xid,
                "commit_time": c.commit_time.0,
                "first_record": c.first_record,
            })).collect::<Vec<_>>(),
            "records": records.iter().map(|r| serde_json::json!({
                "lsn": r.lsn.to_string(),
                "server_time": r.server_time.0,
                "payload": to_hex_lower(&r.payload),
            })).collect::<Vec<_>>(),
        })
    }

    /// Version 3 vectors under their plain names; the version 2 and 1 ones (what earlier
    /// writers produced, still readable) under `v2-<name>` and `v1-<name>`.
    fn valid_cases() -> Vec<(&'static str, Fixture)> {
        let v1 = |mut f: Fixture| {
            f.version = 1;
            f
        };
        let v2 = |mut f: Fixture| {
            f.version = 2;
            f
        };
        vec![
            ("empty", empty_fixture()),
            ("one-transaction", one_transaction_fixture()),
            ("multi-block", multi_block_fixture()),
            ("streamed", streamed_fixture()),
            ("v2-empty", v2(empty_fixture())),
            ("v2-one-transaction", v2(one_transaction_fixture())),
            ("v2-multi-block", v2(multi_block_fixture())),
            ("v2-streamed", v2(streamed_fixture())),
            ("v1-empty", v1(empty_fixture())),
            ("v1-one-transaction", v1(one_transaction_fixture())),
            ("v1-multi-block", v1(multi_block_fixture())),
            ("v1-streamed", v1(streamed_fixture())),
        ]
    }

    /// Flips the lowest bit of `bytes[at]`.
    fn flip(mut bytes: Vec<u8>, at: usize) -> Vec<u8> {
        bytes[at] ^= 0x01;
        bytes
    }

    fn corrupt_cases() -> Vec<(&'static str, Vec<u8>)> {
        let one = one_transaction_fixture().encode().to_vec();
        let multi = multi_block_fixture().encode().to_vec();
        let seg = Segment::parse(Bytes::from(multi.clone())).unwrap();
        let block1 = seg.blocks[1];
        let trailer_offset = seg.blocks.last().unwrap().end() as usize;
        let commit0 =
            trailer_offset + TRAILER_FIXED_LEN_V2 - 4 + seg.blocks.len() * BLOCK_ENTRY_LEN;
        let mut garbage = one.clone();
        garbage.extend_from_slice(b"\n\n");
        let mut v4 = one.clone();
        v4[8] = 4;
        vec![
            // A flipped bit inside block 1's compressed bytes.
            (
                "corrupt-block",
                flip(multi.clone(), block1.offset as usize + BLOCK_HEADER_LEN + 5),
            ),
            // A flipped bit in the header's database name.
            (
                "corrupt-header",
                flip(one.clone(), HEADER_FIXED_LEN - 4 + 2),
            ),
            // A flipped bit in the first commit entry (its commit_lsn delta).
            ("corrupt-trailer", flip(multi.clone(), commit0)),
            ("truncated", multi[..multi.len() - 100].to_vec()),
            ("trailing-garbage", garbage),
            ("bad-magic", {
                let mut b = one.clone();
                b[1] = b'X';
                b
            }),
            ("unsupported-version", v4),
        ]
    }

    fn first_error(bytes: &[u8]) -> Option<SegmentError> {
        decode_all(bytes).err()
    }

    /// Writes the vectors. Run with
    /// `TIDEMARK_WRITE_VECTORS=1 cargo test segment::tests::write_vectors -- --ignored`.
    #[test]
    #[ignore = "writes proto/vectors; set TIDEMARK_WRITE_VECTORS=1"]
    fn write_vectors() {
        if std::env::var("TIDEMARK_WRITE_VECTORS").as_deref() != Ok("1") {
            eprintln!("set TIDEMARK_WRITE_VECTORS=1 to write the vectors");
            return;
        }
        let root = vectors_dir();
        for (name, f) in valid_cases() {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let bytes = f.encode();
            let blocks = Segment::parse(bytes.clone()).unwrap().block_count();
            let json = vector_json(f.version, &f.info(), blocks, &f.commits, &f.records);
            std::fs::write(dir.join("segment.bin"), &bytes).unwrap();
            let mut text = serde_json::to_string_pretty(&json).unwrap();
            text.push('\n');
            std::fs::write(dir.join("expected.json"), text).unwrap();
        }
        for (name, bytes) in corrupt_cases() {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let err = first_error(&bytes).expect("corrupt vector must fail");
            std::fs::write(dir.join("segment.bin"), &bytes).unwrap();
            std::fs::write(dir.join("expected-error.txt"), format!("{err}\n")).unwrap();
        }
    }

    fn read_vector(name: &str, file: &str) -> Vec<u8> {
        let path = vectors_dir().join(name).join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Re-encodes every segment under `TIDEMARK_REENCODE_DIR` (an archive's directory) in
    /// version 1 and in version 2 at zstd levels 1 and 3, and prints the total sizes: the same
    /// records and commits, so the figures compare the formats on real traffic. Run with
    /// `TIDEMARK_REENCODE_DIR=… cargo test --release --lib reencode_archive -- --ignored --nocapture`.
    #[test]
    #[ignore = "measures an archive given in TIDEMARK_REENCODE_DIR"]
    fn reencode_archive() {
        let Ok(dir) = std::env::var("TIDEMARK_REENCODE_DIR") else {
            eprintln!("set TIDEMARK_REENCODE_DIR to an archive directory");
            return;
        };
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "seg") {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(std::path::Path::new(&dir), &mut files);
        let variants = [
            ("v1 lz4", 1u16, 0i32),
            ("v2 zstd-1", 2, 1),
            ("v3 zstd-1", 3, 1),
            ("v3 zstd-3", 3, 3),
        ];
        let mut sizes = [0usize; 4];
        let mut times = [std::time::Duration::ZERO; 4];
        let (mut stored, mut commits, mut records, mut payload) = (0usize, 0usize, 0usize, 0usize);
        for path in &files {
            let bytes = Bytes::from(std::fs::read(path).unwrap());
            stored += bytes.len();
            let seg = Segment::parse(bytes).unwrap();
            let recs: Vec<Record> = seg.records().map(Result::unwrap).collect();
            commits += seg.commits.len();
            records += recs.len();
            payload += recs.iter().map(|r| r.payload.len()).sum::<usize>();
            for (i, (_, version, level)) in variants.iter().enumerate() {
                let t = std::time::Instant::now();
                let mut b = SegmentBuilder::new(
                    seg.info.system_id,
                    seg.info.timeline,
                    seg.info.generation,
                    &seg.info.database,
                    &seg.info.slot,
                    seg.info.start_lsn,
                )
                .with_format_version(*version)
                .with_zstd_level(*level)
                .with_created_at(seg.info.created_at);
                if seg.info.flags & FLAG_STREAMED != 0 {
                    b.mark_streamed();
                }
                for r in &recs {
                    b.push(r);
                }
                for c in &seg.commits {
                    b.commit(*c);
                }
                let out = b.finish(seg.info.end_lsn, seg.info.last_server_time);
                times[i] += t.elapsed();
                sizes[i] += out.len();
                // Read back: the same records and commits.
                let again = Segment::parse(out).unwrap();
                assert_eq!(again.commits, seg.commits);
                let back: Vec<Record> = again.records().map(Result::unwrap).collect();
                assert!(
                    back == recs,
                    "records differ after re-encoding {}",
                    path.display()
                );
            }
        }
        println!(
            "{} segments, {commits} commits, {records} records, {payload} payload bytes, \
             {stored} bytes stored",
            files.len()
        );
        for (i, (name, _, _)) in variants.iter().enumerate() {
            println!(
                "{name}: {} bytes, {:.1} B/commit, write {:.0} MB/s of payload",
                sizes[i],
                sizes[i] as f64 / commits.max(1) as f64,
                payload as f64 / times[i].as_secs_f64() / 1e6
            );
        }
    }

    #[test]
    fn records_from_skips_whole_blocks() {
        let f = multi_block_fixture();
        let seg = Segment::parse(f.encode()).unwrap();
        let all: Vec<Record> = seg.records().map(Result::unwrap).collect();
        for first in [0u64, 1, 5, 17, 32, 33, 40] {
            let (it, at) = seg.records_from(first);
            assert!(at <= first.min(all.len() as u64));
            let got: Vec<Record> = it.map(Result::unwrap).collect();
            assert_eq!(got, all[at as usize..], "from {first}");
            if (first as usize) < all.len() {
                assert!(first - at < 33, "skipped whole blocks only");
            }
        }
        let (_, at) = seg.records_from(17);
        assert!(at > 0, "blocks before record 17 are skipped");
    }

    #[test]
    fn vectors_decode_as_expected() {
        for (name, f) in valid_cases() {
            let bytes = read_vector(name, "segment.bin");
            let expected: serde_json::Value =
                serde_json::from_slice(&read_vector(name, "expected.json")).unwrap();
            let (seg, records) =
                decode_all(&bytes).unwrap_or_else(|e| panic!("vector {name}: {e}"));
            let got = vector_json(
                seg.format_version(),
                &seg.info,
                seg.block_count(),
                &seg.commits,
                &records,
            );
            assert_eq!(
                got, expected,
                "vector {name}: decoded contents differ from expected.json"
            );
            assert_eq!(
                read_info(&bytes).unwrap(),
                (seg.info.clone(), seg.commits.clone())
            );
            assert_eq!(
                parse_object_name(expected["object_name"].as_str().unwrap()),
                Some((seg.info.generation, seg.info.start_lsn, seg.info.end_lsn))
            );
            // The writer must still produce the same bytes. If only the compressor's output
            // changed (a zstd or lz4_flex upgrade), check that the old vectors still decode
            // (above), then regenerate.
            assert!(
                f.encode() == bytes,
                "vector {name}: the writer's output drifted from the checked-in segment.bin"
            );
        }
    }

    #[test]
    fn corrupt_vectors_fail_as_expected() {
        for (name, generated) in corrupt_cases() {
            let bytes = read_vector(name, "segment.bin");
            assert!(
                generated == bytes,
                "vector {name}: generator drifted from segment.bin"
            );
            let expected = String::from_utf8(read_vector(name, "expected-error.txt")).unwrap();
            let err = first_error(&bytes).unwrap_or_else(|| panic!("vector {name} decoded"));
            assert_eq!(err.to_string(), expected.trim_end(), "vector {name}");
        }
    }

    #[test]
    fn every_vector_directory_is_checked() {
        let mut known: Vec<&str> = valid_cases().iter().map(|c| c.0).collect();
        known.extend(corrupt_cases().iter().map(|c| c.0));
        known.sort_unstable();
        let mut found: Vec<String> = std::fs::read_dir(vectors_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort_unstable();
        assert_eq!(found, known);
    }

    // ---- property tests ----

    fn arb_payload() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            // Compressible: long runs from a tiny alphabet.
            proptest::collection::vec(0u8..3, 0..3000),
        ]
    }

    fn arb_fixture() -> impl Strategy<Value = Fixture> {
        let records = proptest::collection::vec((any::<u64>(), any::<i64>(), arb_payload()), 0..40);
        let commits = proptest::collection::vec(
            (
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<i64>(),
                any::<prop::sample::Index>(),
            ),
            0..8,
        );
        let ids = (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
        );
        let times = (any::<i64>(), any::<i64>());
        let names = ("\\PC{0,20}", "\\PC{0,70}");
        (records, commits, ids, times, names, 1usize..2000).prop_map(
            |(records, commits, ids, times, names, block_size)| {
                let records: Vec<Record> = records
                    .into_iter()
                    .map(|(lsn, t, p)| Record {
                        lsn: Lsn(lsn),
                        server_time: PgTimestamp(t),
                        payload: p.into(),
                    })
                    .collect();
                let mut commits: Vec<CommitEntry> = if records.is_empty() {
                    Vec::new()
                } else {
                    commits
                        .into_iter()
                        .map(|(c, e, xid, t, i)| CommitEntry {
                            commit_lsn: Lsn(c),
                            end_lsn: Lsn(e),
                            xid,
                            commit_time: PgTimestamp(t),
                            first_record: i.index(records.len()) as u32,
                        })
                        .collect()
                };
                commits.sort_by_key(|c| c.first_record);
                Fixture {
                    system_id: ids.0,
                    timeline: ids.1,
                    generation: ids.2,
                    database: names.0,
                    slot: names.1,
                    start_lsn: Lsn(ids.3),
                    end_lsn: Lsn(ids.4),
                    created_at: PgTimestamp(times.0),
                    last_server_time: PgTimestamp(times.1),
                    block_size,
                    flags: if ids.0 % 2 == 0 { FLAG_STREAMED } else { 0 },
                    version: if ids.1 % 3 == 0 { 1 } else { 2 },
                    records,
                    commits,
                }
            },
        )
    }

    /// Recomputes every checksum of a (possibly damaged) segment from the structure its own
    /// fields describe, so that the reader gets past the CRC checks to the checks of meaning
    /// (lengths, counts, offsets, the index agreeing with the blocks). Never panics: fields
    /// pointing outside the file are left alone.
    fn reseal(bytes: &mut [u8]) {
        fn u32_at(b: &[u8], at: usize) -> Option<u32> {
            Some(u32::from_le_bytes(
                b.get(at..at.checked_add(4)?)?.try_into().ok()?,
            ))
        }
        fn u64_at(b: &[u8], at: usize) -> Option<u64> {
            Some(u64::from_le_bytes(
                b.get(at..at.checked_add(8)?)?.try_into().ok()?,
            ))
        }
        fn put_crc(b: &mut [u8], from: usize, to: usize) {
            if from <= to && to.checked_add(4).is_some_and(|end| end <= b.len()) {
                let crc = crc32fast::hash(&b[from..to]);
                b[to..to + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
        let n = bytes.len();
        if let Some(header_len) = u32_at(bytes, 12) {
            if header_len >= 4 {
                put_crc(bytes, 0, header_len as usize - 4);
            }
        }
        if n < 28 {
            return;
        }
        let footer = n - 28;
        let (Some(t_off), Some(t_len)) = (u64_at(bytes, footer), u64_at(bytes, footer + 8)) else {
            return;
        };
        let (t_off, t_len) = (t_off as usize, t_len as usize);
        let blocks = u32_at(bytes, t_off.saturating_add(24)).unwrap_or(0) as usize;
        let index_at = if bytes.get(8) == Some(&1) { 32 } else { 36 };
        for i in 0..blocks.min(1000) {
            let entry = t_off.saturating_add(index_at).saturating_add(28 * i);
            let Some(offset) = u64_at(bytes, entry) else {
                break;
            };
            let offset = offset as usize;
            let (Some(c), Some(u)) = (
                u32_at(bytes, offset),
                u32_at(bytes, offset.saturating_add(4)),
            ) else {
                break;
            };
            let data_start = offset.saturating_add(20);
            let Some(stored) = bytes.get(data_start..data_start.saturating_add(c as usize)) else {
                break;
            };
            let plain = if u >= (1 << 20) {
                None
            } else if bytes[8] == 1 {
                lz4_flex::block::decompress(stored, u as usize).ok()
            } else {
                zstd::bulk::decompress(stored, u as usize).ok()
            };
            // Version 3's data_crc covers the decoded records, not the columns.
            let records = u32_at(bytes, offset.saturating_add(8)).unwrap_or(0);
            let plain = match plain {
                Some(body) if bytes[8] == 3 => columns::decode(&body, records).ok(),
                other => other,
            };
            if let Some(plain) = plain {
                let crc = crc32fast::hash(&plain);
                bytes[offset + 12..offset + 16].copy_from_slice(&crc.to_le_bytes());
            }
            let mut h = crc32fast::Hasher::new();
            h.update(&bytes[offset..offset + 16]);
            h.update(&bytes[data_start..data_start + c as usize]);
            let crc = h.finalize();
            bytes[offset + 16..offset + 20].copy_from_slice(&crc.to_le_bytes());
            let header: [u8; 20] = bytes[offset..offset + 20].try_into().unwrap();
            if let Some(copy) = bytes.get_mut(entry.saturating_add(8)..entry.saturating_add(28)) {
                copy.copy_from_slice(&header);
            }
        }
        if t_len >= 4 {
            put_crc(bytes, t_off, t_off.saturating_add(t_len - 4));
        }
        put_crc(bytes, footer, footer + 16);
    }

    #[test]
    fn reseal_keeps_a_valid_segment_valid() {
        let bytes = multi_block_fixture().encode();
        let mut copy = bytes.to_vec();
        reseal(&mut copy);
        assert_eq!(copy, bytes.to_vec());
        // A changed field behind recomputed checksums is read (system_id is free), or refused
        // for what it means, never for its checksum.
        copy[16] ^= 1;
        reseal(&mut copy);
        assert!(decode_all(&copy).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip(f in arb_fixture()) {
            let bytes = f.encode();
            let (seg, records) = decode_all(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&seg.info, &f.info());
            prop_assert_eq!(&seg.commits, &f.commits);
            prop_assert_eq!(&records, &f.records);
            prop_assert_eq!(read_info(&bytes).unwrap(), (f.info(), f.commits.clone()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            version in 1u16..=3,
        ) {
            let _ = decode_all(&bytes);
            let _ = read_info(&bytes);
            // Past the magic and version checks too.
            let mut prefixed = MAGIC.to_vec();
            prefixed.extend_from_slice(&version.to_le_bytes());
            prefixed.extend_from_slice(&bytes);
            prefixed.extend_from_slice(&MAGIC);
            let _ = decode_all(&prefixed);
        }

        #[test]
        fn corruptions_are_errors(
            f in arb_fixture(),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
            cut in any::<prop::sample::Index>(),
        ) {
            let bytes = f.encode();
            let mut bad = bytes.to_vec();
            bad[at.index(bytes.len())] ^= xor;
            prop_assert!(decode_all(&bad).is_err());
            prop_assert!(decode_all(&bytes[..cut.index(bytes.len())]).is_err());
        }

        #[test]
        fn garbage_behind_valid_checksums_never_panics(
            f in arb_fixture(),
            at in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 1..12),
            multi in any::<bool>(),
        ) {
            // Overwrite a few bytes anywhere, then recompute every checksum: the reader must
            // refuse (or accept) the result on its meaning, without panicking.
            let bytes = if multi { multi_block_fixture().encode() } else { f.encode() };
            let mut bad = bytes.to_vec();
            let start = at.index(bad.len());
            for (i, b) in junk.iter().enumerate() {
                if let Some(slot) = bad.get_mut(start + i) {
                    *slot = *b;
                }
            }
            reseal(&mut bad);
            let _ = read_info(&bad);
            if let Ok(seg) = Segment::parse(Bytes::from(bad)) {
                let _ = seg.verify();
                for rec in seg.records() {
                    if rec.is_err() {
                        break;
                    }
                }
            }
        }

        #[test]
        fn overwritten_ranges_never_panic(
            at in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let bytes = multi_block_fixture().encode();
            let mut bad = bytes.to_vec();
            let start = at.index(bad.len());
            for (i, b) in junk.iter().enumerate() {
                if let Some(slot) = bad.get_mut(start + i) {
                    *slot = *b;
                }
            }
            if bad != bytes.to_vec() {
                prop_assert!(decode_all(&bad).is_err());
            }
        }
    }
}
