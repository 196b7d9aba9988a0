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
//!
//! The code is split along its jobs, each file private to this module: `write`
//! ([`SegmentBuilder`]: record framing, blocks, trailer and footer), `layout` (verifying
//! everything but the blocks' contents: magic, version, footer, header, trailer and block
//! table), `read` ([`Segment`], [`read_info`]: record framing and block decoding),
//! `commit_index` (the commit index of every version, both ways), `columns` (version 3's block
//! contents), `codec` (zstd contexts and the one-frame check) and `varint` (the LEB128 and
//! zigzag helpers). This file holds the format's constants, what the writer and the readers
//! share (`Version`, `BlockEntry`, `block_crc`) and the public types; the tests (`tests/`)
//! share one set of fixtures and the test vectors of `proto/vectors/`.

use std::fmt;

use bytes::Bytes;

use crate::lsn::{Lsn, PgTimestamp};

mod codec;
mod columns;
mod commit_index;
mod layout;
mod read;
mod varint;
mod write;

pub use codec::Compression;
pub use read::{read_info, Records, Segment};
pub use write::SegmentBuilder;

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

/// CRC-32 of a block header's first 16 bytes followed by the block's stored (compressed) bytes.
fn block_crc(entry: &BlockEntry, stored: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&entry.header_bytes()[..BLOCK_HEADER_CRC_COVERED]);
    hasher.update(stored);
    hasher.finalize()
}

#[cfg(test)]
mod tests;
