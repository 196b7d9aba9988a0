//! Every change to a file is an error that names what is wrong, including changes behind valid
//! checksums (forged with `forge`): the content rules of each version, the commit index rules.

use super::forge::*;
use super::*;

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
