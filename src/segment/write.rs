//! The writer: [`SegmentBuilder`] frames records into blocks, compresses and checksums each
//! block as it fills, grows the commit index, and seals the file with its trailer and footer.
//! `append_block` and `append_trailer_and_footer` are also what the tests use to forge files
//! whose checksums are valid but whose contents break a rule.

use bytes::Bytes;

use crate::lsn::{Lsn, PgTimestamp};

use super::codec::{Compression, Zstd};
use super::columns;
use super::commit_index::{encode_commit, encode_commit_columns, CommitBase};
use super::varint::{put_uvarint, uvarint_len, zigzag};
use super::{
    block_crc, BlockEntry, CommitEntry, Record, Version, BLOCK_ENTRY_LEN, BLOCK_HEADER_LEN,
    DEFAULT_BLOCK_SIZE, DEFAULT_ZSTD_LEVEL, FLAG_STREAMED, FOOTER_LEN, FORMAT_VERSION,
    HEADER_CREATED_AT_OFFSET, HEADER_FIXED_LEN, MAGIC, MAX_BLOCK_SIZE, MAX_PAYLOAD_LEN,
    RECORD_HEADER_LEN,
};

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
    /// Version 3: the block's records in columns, added as they are pushed.
    columns: columns::Columns,
    /// Version 3: the body of the block being sealed (its buffer reused for every block).
    body: Vec<u8>,
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
            columns: columns::Columns::default(),
            body: Vec::new(),
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

    /// Reserves room for a file of about `bytes` in one go, so that the output does not grow
    /// (and move) by doubling as blocks are sealed. The file's bytes are the same either way.
    pub fn with_capacity(mut self, bytes: usize) -> Self {
        self.out.reserve(bytes.saturating_sub(self.out.len()));
        self
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

    /// Writes the format version of `compression` ([`Compression::format_version`]): what a
    /// repository's writers do with the codec its identity records.
    ///
    /// # Panics
    /// If records were pushed already.
    pub fn with_compression(self, compression: Compression) -> Self {
        self.with_format_version(compression.format_version())
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
    pub(super) fn block_size(&self) -> usize {
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
        if self.version == Version::V3 {
            self.columns
                .push(rec.lsn.0, rec.server_time.0, &rec.payload);
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
                self.columns.finish_into(&self.block, &mut self.body);
                let zstd = self.zstd.get_or_insert_with(|| Zstd::new(level));
                append_block(
                    &mut self.out,
                    &self.body,
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
pub(super) fn append_block(
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

/// The trailer's totals.
#[derive(Clone, Copy, Debug)]
pub(super) struct Totals {
    pub(super) end_lsn: Lsn,
    pub(super) last_server_time: PgTimestamp,
    pub(super) record_count: u64,
}

/// Appends the trailer (totals, block index, commit index, crc) and the footer. `commit_index`
/// holds `commit_count` entries encoded by [`encode_commit`] for `version`.
pub(super) fn append_trailer_and_footer(
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
