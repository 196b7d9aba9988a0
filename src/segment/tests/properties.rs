//! Property tests: arbitrary fixtures round-trip, and no bytes (arbitrary, corrupted, or behind
//! recomputed checksums) make the reader panic.

use proptest::prelude::*;

use super::forge::reseal;
use super::*;

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
