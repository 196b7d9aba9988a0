//! Verifying a file's layout without decompressing any block: magic and version first (so a
//! future version is reported as such), then the footer, the header, the trailer with its
//! commit index, and the block table (blocks tile the space between header and trailer, each
//! block header equals its index entry, the counts add up). Every read is bounds-checked
//! ([`Cursor`]) and every count is bounded by the file's length before anything is allocated.

use crate::lsn::{Lsn, PgTimestamp};

use super::commit_index::{
    decode_commit_columns, decode_commits, decompress_commit_index, CommitBase,
};
use super::{
    hex, malformed, BlockEntry, CommitEntry, Region, SegmentError, SegmentInfo, Version,
    BLOCK_ENTRY_LEN, BLOCK_HEADER_LEN, COMMIT_ENTRY_LEN, FOOTER_LEN, FORMAT_VERSION,
    HEADER_FIXED_LEN, KNOWN_FLAGS, MAGIC, MAX_ZSTD_RATIO, MIN_COMMIT_ENTRY_LEN_V2,
};

/// Bounds-checked little-endian reader over a region of the file.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
    region: Region,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8], base: u64, region: Region) -> Self {
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

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, SegmentError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, SegmentError> {
        self.array(what).map(u64::from_le_bytes)
    }

    pub(super) fn i64(&mut self, what: &str) -> Result<i64, SegmentError> {
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
pub(super) fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
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
pub(super) struct Layout {
    pub(super) version: Version,
    pub(super) info: SegmentInfo,
    pub(super) commits: Vec<CommitEntry>,
    pub(super) blocks: Vec<BlockEntry>,
}

/// Verifies everything but the blocks' contents: magic, version, footer, header, trailer and
/// the block table (contiguity, block headers equal to their index entries, counts, sizes).
pub(super) fn parse_layout(file: &[u8]) -> Result<Layout, SegmentError> {
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
