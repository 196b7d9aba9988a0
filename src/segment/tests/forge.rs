//! Files whose checksums are all valid but whose contents break a rule: blocks rebuilt from
//! edited contents ([`relayout`]), a trailer around another commit index
//! ([`with_commit_index`]), every checksum recomputed after an edit ([`reseal`]).

use super::*;

/// Rebuilds a file from `header` and the blocks of `seg`, letting `edit` replace any block's
/// uncompressed contents and header fields before they are compressed and checksummed.
/// Produces files whose checksums are all valid but whose contents break a rule.
pub(super) fn relayout(
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

pub(super) struct Forge {
    pub(super) data: Vec<u8>,
    pub(super) record_count: u32,
    pub(super) uncompressed_len: Option<u32>,
    pub(super) data_crc: Option<u32>,
    pub(super) compressed: Option<Vec<u8>>,
}

pub(super) fn forged_error(edit: impl FnMut(usize, &mut Forge)) -> String {
    forged_error_v(1, edit)
}

pub(super) fn forged_error_v(version: u16, edit: impl FnMut(usize, &mut Forge)) -> String {
    let mut f = one_transaction_fixture();
    f.version = version;
    let bytes = f.encode();
    let seg = Segment::parse(bytes.clone()).unwrap();
    let header_len = u32_at(&bytes, 12).unwrap() as usize;
    let forged = relayout(bytes[..header_len].to_vec(), &seg, edit);
    decode_all(&forged).unwrap_err().to_string()
}

/// `f` encoded, with its trailer rebuilt around `count` commit entries in `index`.
pub(super) fn with_commit_index(f: &Fixture, count: usize, index: &[u8]) -> Vec<u8> {
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

/// Recomputes every checksum of a (possibly damaged) segment from the structure its own
/// fields describe, so that the reader gets past the CRC checks to the checks of meaning
/// (lengths, counts, offsets, the index agreeing with the blocks). Never panics: fields
/// pointing outside the file are left alone.
pub(super) fn reseal(bytes: &mut [u8]) {
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
