//! The test vectors of `proto/vectors/<case>/`: each valid one decodes to its `expected.json`
//! and is what the writer still produces, byte for byte; each corrupt one fails with its
//! `expected-error.txt`.

use super::*;

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
pub(super) fn valid_cases() -> Vec<(&'static str, Fixture)> {
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
    let commit0 = trailer_offset + TRAILER_FIXED_LEN_V2 - 4 + seg.blocks.len() * BLOCK_ENTRY_LEN;
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
/// `TIDEMARK_WRITE_VECTORS=1 cargo test segment::tests::vectors::write_vectors -- --ignored`.
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

#[test]
fn vectors_decode_as_expected() {
    for (name, f) in valid_cases() {
        let bytes = read_vector(name, "segment.bin");
        let expected: serde_json::Value =
            serde_json::from_slice(&read_vector(name, "expected.json")).unwrap();
        let (seg, records) = decode_all(&bytes).unwrap_or_else(|e| panic!("vector {name}: {e}"));
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
