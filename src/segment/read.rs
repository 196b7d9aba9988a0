//! The reader: [`read_info`] for listings and restore planning, [`Segment`] for the records.
//! A block is checksummed, decompressed, checksummed again and fully framed before any of its
//! records is yielded ([`Records`]); the payloads are zero-copy slices of the decompressed
//! block.

use std::fmt;

use bytes::Bytes;

use crate::lsn::{Lsn, PgTimestamp};

use super::codec::{check_zstd_frame, zstd_decompress};
use super::columns;
use super::layout::{parse_layout, Cursor, Layout};
use super::varint::{get_uvarint, unzigzag};
use super::{
    block_crc, malformed, BlockEntry, CommitEntry, Record, Region, SegmentError, SegmentInfo,
    Version, BLOCK_HEADER_LEN, RECORD_HEADER_LEN,
};

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
    pub(super) version: Version,
    pub(super) blocks: Vec<BlockEntry>,
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
pub(super) struct Framed {
    pub(super) lsn: u64,
    pub(super) server_time: i64,
    pub(super) payload: std::ops::Range<usize>,
}

/// Reads the record framed at `pos` of a decompressed block. `prev` is the lsn and server time
/// of the block's previous record (0 for its first), from which version 2 records are deltas.
/// On error, says what is wrong with the record (to follow "record N at offset P of the
/// decompressed block").
pub(super) fn frame_at(
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
    pub(super) fn decode_block(&self, index: usize) -> Result<Bytes, SegmentError> {
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
