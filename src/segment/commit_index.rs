//! The commit index, in every version: version 1's fixed 32-byte entries, version 2's five
//! varints of deltas from the previous entry, version 3's same deltas column by column in a
//! zstd frame. [`encode_commit`] and [`encode_commit_columns`] write entries as the builder
//! records commits; [`decode_commits`] and [`decode_commit_columns`] read them back for
//! `layout`, which checked the index's length against the trailer.

use crate::lsn::{Lsn, PgTimestamp};

use super::codec::{check_zstd_frame, zstd_decompress};
use super::varint::{get_uvarint, put_uvarint, unzigzag, unzigzag32, zigzag, zigzag32};
use super::{
    malformed, CommitEntry, Region, SegmentError, Version, MAX_ZSTD_RATIO, MIN_COMMIT_ENTRY_LEN_V2,
};

/// The previous commit entry's fields, from which a version 2 entry's deltas are taken.
#[derive(Clone, Copy, Debug)]
pub(super) struct CommitBase {
    commit_lsn: u64,
    commit_time: i64,
    xid: u32,
    first_record: u32,
}

impl CommitBase {
    /// The base of a segment's first commit entry.
    pub(super) fn new(start_lsn: Lsn, created_at: PgTimestamp) -> CommitBase {
        CommitBase {
            commit_lsn: start_lsn.0,
            commit_time: created_at.0,
            xid: 0,
            first_record: 0,
        }
    }
}

/// Appends one commit index entry in the layout of `version`.
pub(super) fn encode_commit(
    version: Version,
    out: &mut Vec<u8>,
    base: &mut CommitBase,
    c: &CommitEntry,
) {
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
pub(super) fn encode_commit_columns(
    columns: &mut [Vec<u8>; 5],
    base: &mut CommitBase,
    c: &CommitEntry,
) {
    let mut entry = Vec::with_capacity(40);
    encode_commit(Version::V2, &mut entry, base, c);
    let mut pos = 0;
    for column in columns.iter_mut() {
        let start = pos;
        get_uvarint(&entry, &mut pos, 64).expect("encode_commit wrote five varints");
        column.extend_from_slice(&entry[start..pos]);
    }
}

/// Decodes a version 2 commit index (`index` at file offset `offset`) of `count` entries into
/// `commits`; the entries must fill `index` exactly.
pub(super) fn decode_commits(
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
pub(super) fn decompress_commit_index(
    index: &[u8],
    offset: u64,
    count: u32,
) -> Result<Vec<u8>, SegmentError> {
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
pub(super) fn decode_commit_columns(
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
