//! Every object key of a repository, written and parsed in one place (`proto/layout.md`).
//!
//! Owns: the key of each kind of object — the identity (`archive.json`), segments
//! (`segments/…`), the objects of a base backup (`basebackups/<id>/…`) — and their parser
//! ([`Key::parse`]). Other prefixes (`locks/…`, say) get their kind here too when they come.
//! Does not own what the objects hold, nor the listing of a store.
//!
//! **Revisions.** Objects are create-only, so an object that must be rewritten (an erasure
//! rewrites a segment without some rows) is stored under a new key: its name carries a revision
//! before its extension (`….r2.seg`, `manifest.r3.json`). No suffix is revision 1. Readers that
//! find several revisions of one object use the highest and ignore the others
//! ([`super::chain::group_segments`] for segments).
//!
//! Invariant: names and keys map one to one. Only the canonical form parses (fixed-width
//! upper-case hex, no `.r1`, no leading zeros in a revision); anything else is not an object of
//! the archive and is ignored by readers.

use std::fmt;

use crate::lsn::Lsn;

/// Key of the identity object.
pub const IDENTITY: &str = "archive.json";
/// Folder of every segment.
pub const SEGMENTS: &str = "segments/";
/// Folder of every base backup.
pub const BASEBACKUPS: &str = "basebackups/";
/// Folder of the pins: `pins/<id>.json` exists while backup `<id>` is pinned.
pub const PINS: &str = "pins/";
/// Folder of the audit trail: one `audit/<record>.json` per recorded command
/// ([`super::audit`]). Nothing deletes these.
pub const AUDIT: &str = "audit/";
/// Folder of restore drills' results: `drills/<start>-<random>.json`, named as audit records
/// are, so a listing sorts by start time (`proto/status.md`). `status` reads the newest.
pub const DRILLS: &str = "drills/";

/// A revision of an object: 1 is the original (no suffix in its name), a rewrite is 2 or more.
pub type Revision = u32;

/// The first revision of every object.
pub const FIRST_REVISION: Revision = 1;

/// The key of one object of the archive.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `archive.json`.
    Identity,
    /// `segments/<G:8 hex>/<start:16 hex>-<end:16 hex>[.r<N>].seg`.
    Segment {
        generation: u32,
        start: Lsn,
        end: Lsn,
        revision: Revision,
    },
    /// `basebackups/<id>/manifest[.r<N>].json`.
    Manifest { backup: String, revision: Revision },
    /// `basebackups/<id>/schema[.r<N>].dump`.
    Schema { backup: String, revision: Revision },
    /// `basebackups/<id>/tables/<table:5+ digits>.<part:4+ digits>[.r<N>].copy.lz4`.
    Part {
        backup: String,
        table: usize,
        part: usize,
        revision: Revision,
    },
    /// `pins/<id>.json`: backup `<id>` is pinned (never rewritten: unpin deletes it).
    Pin { backup: String },
    /// `audit/<YYYYMMDD>T<HHMMSS>.<6 digits>Z-<16 lower hex>.json`: one audit record, named by
    /// its command's start (UTC) and a random suffix (never rewritten, never deleted).
    Audit { record: String },
}

/// `.r<N>` for a rewrite, nothing for the first revision.
fn suffix(revision: Revision) -> String {
    if revision <= FIRST_REVISION {
        String::new()
    } else {
        format!(".r{revision}")
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Identity => f.write_str(IDENTITY),
            Key::Segment {
                generation,
                start,
                end,
                revision,
            } => write!(
                f,
                "{SEGMENTS}{generation:08X}/{}-{}{}.seg",
                start.to_hex16(),
                end.to_hex16(),
                suffix(*revision)
            ),
            Key::Manifest { backup, revision } => {
                write!(
                    f,
                    "{BASEBACKUPS}{backup}/manifest{}.json",
                    suffix(*revision)
                )
            }
            Key::Schema { backup, revision } => {
                write!(f, "{BASEBACKUPS}{backup}/schema{}.dump", suffix(*revision))
            }
            Key::Part {
                backup,
                table,
                part,
                revision,
            } => write!(
                f,
                "{BASEBACKUPS}{backup}/tables/{table:05}.{part:04}{}.copy.lz4",
                suffix(*revision)
            ),
            Key::Pin { backup } => write!(f, "{PINS}{backup}.json"),
            Key::Audit { record } => write!(f, "{AUDIT}{record}.json"),
        }
    }
}

/// Splits `stem[.r<N>]` into the stem and its revision (1 without a suffix). The revision is
/// not checked for canonical form here: [`Key::parse`] re-renders the key and compares.
fn split_revision(s: &str) -> Option<(&str, Revision)> {
    match s.rsplit_once(".r") {
        Some((stem, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            Some((stem, n.parse().ok()?))
        }
        _ => Some((s, FIRST_REVISION)),
    }
}

fn upper_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn decimal(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Whether `id` is a backup id as [`backup_id`] writes it.
fn is_backup_id(id: &str) -> bool {
    matches!(id.split_once('-'), Some((g, p)) if upper_hex(g, 8) && upper_hex(p, 16))
}

/// Whether `s` is an audit record's name as [`audit`] writes it:
/// `YYYYMMDDTHHMMSS.ffffffZ-` and 16 lower-case hex digits.
fn is_audit_record(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    b.len() == 40
        && digits(0..8)
        && b[8] == b'T'
        && digits(9..15)
        && b[15] == b'.'
        && digits(16..22)
        && b[22] == b'Z'
        && b[23] == b'-'
        && b[24..]
            .iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

impl Key {
    /// Parses a key written by this module; `None` for anything else (not an archive object,
    /// or not in canonical form).
    pub fn parse(name: &str) -> Option<Key> {
        let key = Key::parse_loose(name)?;
        // Canonical form only: widths, case, no `.r1`, no leading zeros.
        (key.to_string() == name).then_some(key)
    }

    fn parse_loose(name: &str) -> Option<Key> {
        if name == IDENTITY {
            return Some(Key::Identity);
        }
        if let Some(rest) = name.strip_prefix(SEGMENTS) {
            let (generation, file) = rest.split_once('/')?;
            let (stem, revision) = split_revision(file.strip_suffix(".seg")?)?;
            let (start, end) = stem.split_once('-')?;
            if !upper_hex(generation, 8) || !upper_hex(start, 16) || !upper_hex(end, 16) {
                return None;
            }
            return Some(Key::Segment {
                generation: u32::from_str_radix(generation, 16).ok()?,
                start: Lsn::from_hex16(start)?,
                end: Lsn::from_hex16(end)?,
                revision,
            });
        }
        if let Some(file) = name.strip_prefix(PINS) {
            let backup = file.strip_suffix(".json")?;
            return is_backup_id(backup).then(|| Key::Pin {
                backup: backup.to_string(),
            });
        }
        if let Some(file) = name.strip_prefix(AUDIT) {
            let record = file.strip_suffix(".json")?;
            return is_audit_record(record).then(|| Key::Audit {
                record: record.to_string(),
            });
        }
        let (backup, file) = name.strip_prefix(BASEBACKUPS)?.split_once('/')?;
        if !is_backup_id(backup) {
            return None;
        }
        let backup = backup.to_string();
        if let Some(part) = file.strip_prefix("tables/") {
            let (stem, revision) = split_revision(part.strip_suffix(".copy.lz4")?)?;
            let (table, part) = stem.split_once('.')?;
            return Some(Key::Part {
                backup,
                table: decimal(table)?,
                part: decimal(part)?,
                revision,
            });
        }
        if let Some(stem) = file.strip_suffix(".json") {
            let (stem, revision) = split_revision(stem)?;
            return (stem == "manifest").then_some(Key::Manifest { backup, revision });
        }
        if let Some(stem) = file.strip_suffix(".dump") {
            let (stem, revision) = split_revision(stem)?;
            return (stem == "schema").then_some(Key::Schema { backup, revision });
        }
        None
    }

    /// The object's revision (1 for the identity, which is never rewritten).
    pub fn revision(&self) -> Revision {
        match self {
            Key::Identity | Key::Pin { .. } | Key::Audit { .. } => FIRST_REVISION,
            Key::Segment { revision, .. }
            | Key::Manifest { revision, .. }
            | Key::Schema { revision, .. }
            | Key::Part { revision, .. } => *revision,
        }
    }
}

/// A segment's key, as [`parse_segment`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentKey {
    pub generation: u32,
    pub start: Lsn,
    pub end: Lsn,
    pub revision: Revision,
}

/// Key of the first revision of a segment:
/// `segments/<generation:8 hex>/<start:16 hex>-<end:16 hex>.seg`, upper-case hex, so that a
/// lexical listing sorts by generation, then LSN.
pub fn segment(generation: u32, start: Lsn, end: Lsn) -> String {
    segment_revision(generation, start, end, FIRST_REVISION)
}

/// Key of revision `revision` of a segment (`….r<N>.seg` from 2 on).
pub fn segment_revision(generation: u32, start: Lsn, end: Lsn, revision: Revision) -> String {
    Key::Segment {
        generation,
        start,
        end,
        revision,
    }
    .to_string()
}

/// Parses a segment's key (any revision); `None` for anything else.
pub fn parse_segment(name: &str) -> Option<SegmentKey> {
    match Key::parse(name)? {
        Key::Segment {
            generation,
            start,
            end,
            revision,
        } => Some(SegmentKey {
            generation,
            start,
            end,
            revision,
        }),
        _ => None,
    }
}

/// The id of a backup: `<generation, 8 hex digits>-<consistent point, 16 hex digits>`, so that
/// ids sort by generation, then stream position.
pub fn backup_id(generation: u32, consistent_point: Lsn) -> String {
    format!("{generation:08X}-{}", consistent_point.to_hex16())
}

/// The folder of backup `id`: `basebackups/<id>/`.
pub fn backup_folder(id: &str) -> String {
    format!("{BASEBACKUPS}{id}/")
}

/// Splits a key inside a backup's folder into (backup id, path inside the folder); `None` for
/// a key outside `basebackups/<id>/`. Listing-level: the id is not checked for canonical form.
pub fn split_backup_key(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(BASEBACKUPS)?.split_once('/')
}

/// The revision of the manifest that `file` (a path inside a backup's folder) names; `None`
/// when it names no manifest.
pub fn manifest_revision(file: &str) -> Option<Revision> {
    let (stem, revision) = split_revision(file.strip_suffix(".json")?)?;
    let canonical = format!("manifest{}.json", suffix(revision));
    (stem == "manifest" && canonical == file).then_some(revision)
}

/// Key of the manifest of backup `id` (first revision).
pub fn manifest(id: &str) -> String {
    Key::Manifest {
        backup: id.to_string(),
        revision: FIRST_REVISION,
    }
    .to_string()
}

/// Key of the pin of backup `id`.
pub fn pin(id: &str) -> String {
    Key::Pin {
        backup: id.to_string(),
    }
    .to_string()
}

/// The backup a pin's key names; `None` for any other key.
pub fn parse_pin(name: &str) -> Option<String> {
    match Key::parse(name)? {
        Key::Pin { backup } => Some(backup),
        _ => None,
    }
}

/// Key of the audit record of a command started at `started` (UTC) with the random `suffix`:
/// `audit/<YYYYMMDD>T<HHMMSS>.<micros>Z-<suffix:16 hex>.json`, fixed width, so that a lexical
/// listing sorts by start time, and two hosts starting in the same microsecond do not collide.
pub fn audit(started: crate::lsn::PgTimestamp, suffix: u64) -> String {
    Key::Audit {
        record: format!(
            "{}-{suffix:016x}",
            started.to_datetime().format("%Y%m%dT%H%M%S%.6fZ")
        ),
    }
    .to_string()
}

/// The start time an audit record's key names; `None` for any other key.
pub fn parse_audit(name: &str) -> Option<crate::lsn::PgTimestamp> {
    let Key::Audit { record } = Key::parse(name)? else {
        return None;
    };
    let t = chrono::NaiveDateTime::parse_from_str(&record[..22], "%Y%m%dT%H%M%S%.6f").ok()?;
    Some(crate::lsn::PgTimestamp::from_datetime(t.and_utc()))
}

/// Key of the schema dump of backup `id` (first revision).
pub fn schema(id: &str) -> String {
    Key::Schema {
        backup: id.to_string(),
        revision: FIRST_REVISION,
    }
    .to_string()
}

/// Key of part `part` of table number `table` of backup `id` (first revision).
pub fn part(id: &str, table: usize, part: usize) -> String {
    Key::Part {
        backup: id.to_string(),
        table,
        part,
        revision: FIRST_REVISION,
    }
    .to_string()
}

/// Folder of the rekey sidecars: `rekeyed/<key id>/<object key>` holds the 80-byte envelope
/// header of `<object key>` rewrapped under key `<key id>` (`proto/encryption.md`, "Rekey").
/// Objects are create-only, so a rekey stores a header beside its object instead of
/// rewriting it.
pub const REKEYED: &str = "rekeyed/";

/// Key of the sidecar of `object` whose header is wrapped by key `key_id` (16 lower-case hex
/// digits).
pub fn rekeyed(key_id: &str, object: &str) -> String {
    format!("{REKEYED}{key_id}/{object}")
}

/// The key id and the object a sidecar's key names; `None` for any other key (a malformed key
/// id, or an object key that is not an archive object's, or the identity, never encrypted).
pub fn parse_rekeyed(name: &str) -> Option<(&str, &str)> {
    let (id, object) = name.strip_prefix(REKEYED)?.split_once('/')?;
    let hex = id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let encrypted = !matches!(Key::parse(object)?, Key::Identity);
    (hex && encrypted).then_some((id, object))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "00000001-00000000016B3748";

    fn every_kind(revision: Revision) -> Vec<Key> {
        let backup = ID.to_string();
        vec![
            Key::Segment {
                generation: 1,
                start: Lsn(0x16B_3700),
                end: Lsn(0x16_B374_D848),
                revision,
            },
            Key::Manifest {
                backup: backup.clone(),
                revision,
            },
            Key::Schema {
                backup: backup.clone(),
                revision,
            },
            Key::Part {
                backup: backup.clone(),
                table: 7,
                part: 12,
                revision,
            },
            Key::Part {
                backup,
                table: 123_456,
                part: 98_765,
                revision,
            },
        ]
    }

    #[test]
    fn every_key_kind_round_trips_with_and_without_a_revision() {
        assert_eq!(Key::parse(IDENTITY), Some(Key::Identity));
        assert_eq!(Key::Identity.to_string(), "archive.json");
        for revision in [1, 2, 3, 10, 4_000_000_000] {
            for key in every_kind(revision) {
                let name = key.to_string();
                assert_eq!(Key::parse(&name), Some(key.clone()), "{name}");
                assert_eq!(key.revision(), revision);
                assert_eq!(name.contains(".r"), revision > 1, "{name}");
            }
        }
    }

    #[test]
    fn names_are_the_documented_ones() {
        let (s, e) = (Lsn(0x16B_3700), Lsn(0x16_B374_D848));
        assert_eq!(
            segment(1, s, e),
            "segments/00000001/00000000016B3700-00000016B374D848.seg"
        );
        assert_eq!(
            segment_revision(1, s, e, 2),
            "segments/00000001/00000000016B3700-00000016B374D848.r2.seg"
        );
        assert_eq!(segment_revision(1, s, e, 1), segment(1, s, e));
        assert_eq!(
            manifest(ID),
            format!("basebackups/{ID}/manifest.json"),
            "the first revision has no suffix"
        );
        assert_eq!(schema(ID), format!("basebackups/{ID}/schema.dump"));
        assert_eq!(
            part(ID, 7, 12),
            format!("basebackups/{ID}/tables/00007.0012.copy.lz4")
        );
        let r3 = Key::Manifest {
            backup: ID.into(),
            revision: 3,
        };
        assert_eq!(r3.to_string(), format!("basebackups/{ID}/manifest.r3.json"));
        assert_eq!(backup_id(1, s), "00000001-00000000016B3700");
        assert_eq!(
            parse_segment(&segment_revision(2, s, e, 5)),
            Some(SegmentKey {
                generation: 2,
                start: s,
                end: e,
                revision: 5
            })
        );
        assert_eq!(parse_segment(&manifest(ID)), None, "not a segment");
        assert_eq!(pin(ID), format!("pins/{ID}.json"));
        assert_eq!(parse_pin(&pin(ID)).as_deref(), Some(ID));
        assert_eq!(Key::parse(&pin(ID)).map(|k| k.revision()), Some(1));
        assert_eq!(parse_pin(&manifest(ID)), None, "not a pin");
        assert_eq!(parse_pin("pins/x.json"), None, "not a backup id");
        assert_eq!(parse_pin(&format!("pins/{ID}.json.tmp")), None);
    }

    #[test]
    fn garbage_names_are_ignored() {
        let seg = "segments/00000001/00000000016B3700-00000016B374D848";
        for bad in [
            "",
            "archive.json.tmp",
            "segments/",
            "segments/00000001/",
            &format!("{seg}.r1.seg"),
            &format!("{seg}.r0.seg"),
            &format!("{seg}.r02.seg"),
            &format!("{seg}.r.seg"),
            &format!("{seg}.rx.seg"),
            &format!("{seg}.r2"),
            &format!("{seg}.seg.tmp"),
            "segments/00000001/00000000016b3700-00000016B374D848.seg",
            "segments/0001/00000000016B3700-00000016B374D848.seg",
            "segments/00000001/16B3700-16B374D848.seg",
            "segments/00000001/00000000016B3700_00000016B374D848.seg",
            "segments/00000001/x/00000000016B3700-00000016B374D848.seg",
            ".tmp-1234",
            "basebackups/x/manifest.json",
            &format!("basebackups/{ID}"),
            &format!("basebackups/{ID}/manifest.r1.json"),
            &format!("basebackups/{ID}/manifest.json.tmp"),
            &format!("basebackups/{ID}/notes.json"),
            &format!("basebackups/{ID}/schema.sql"),
            &format!("basebackups/{ID}/tables/7.12.copy.lz4"),
            &format!("basebackups/{ID}/tables/00007.0012.copy"),
            &format!("basebackups/{ID}/tables/00007.0012.r1.copy.lz4"),
            &format!("basebackups/{ID}/tables/0000x.0012.copy.lz4"),
            "locks/archiver",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn manifest_files_are_recognised_at_every_revision() {
        assert_eq!(manifest_revision("manifest.json"), Some(1));
        assert_eq!(manifest_revision("manifest.r2.json"), Some(2));
        assert_eq!(manifest_revision("manifest.r1.json"), None);
        assert_eq!(manifest_revision("manifest.json.tmp"), None);
        assert_eq!(manifest_revision("schema.dump"), None);
        assert_eq!(manifest_revision("tables/00000.0000.copy.lz4"), None);
        assert_eq!(split_backup_key(&manifest(ID)), Some((ID, "manifest.json")));
        assert_eq!(split_backup_key("segments/x"), None);
        assert_eq!(backup_folder(ID), format!("basebackups/{ID}/"));
    }

    #[test]
    fn audit_keys_sort_by_start_time_and_parse_back() {
        use crate::lsn::PgTimestamp;
        let t = PgTimestamp(849_634_512_123_456); // 2026-12-03 17:35:12.123456 UTC
        let k = audit(t, 0x1f2e_3d4c_5b6a_7980);
        assert_eq!(k, "audit/20261203T173512.123456Z-1f2e3d4c5b6a7980.json");
        assert_eq!(parse_audit(&k), Some(t));
        assert_eq!(Key::parse(&k).map(|k| k.revision()), Some(1));
        // Later starts sort later whatever the suffix; the same microsecond on two hosts
        // differs by the suffix.
        let mut names = vec![
            audit(PgTimestamp(t.0 + 1), 0),
            audit(t, u64::MAX),
            audit(PgTimestamp(t.0 + 86_400_000_000), 7),
            audit(t, 1),
            audit(PgTimestamp(t.0 - 1_000_000), 9),
        ];
        let by_time: Vec<PgTimestamp> = {
            names.sort();
            names.iter().map(|n| parse_audit(n).unwrap()).collect()
        };
        assert!(by_time.windows(2).all(|w| w[0] <= w[1]), "{names:?}");
        assert_ne!(audit(t, 1), audit(t, 2));
        for bad in [
            "audit/20261203T173512.123456Z-1f2e3d4c5b6a7980",
            "audit/20261203T173512.123456Z-1F2E3D4C5B6A7980.json",
            "audit/20261203T173512Z-1f2e3d4c5b6a7980.json",
            "audit/20261203T173512.123456Z-1f2e.json",
            "audit/x.json",
            "audit/20261203T173512.123456Z-1f2e3d4c5b6a7980.json.tmp",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
            assert_eq!(parse_audit(bad), None, "{bad:?}");
        }
        assert_eq!(parse_audit(&pin(ID)), None, "not an audit record");
    }

    #[test]
    fn a_sidecar_names_its_key_and_its_object_and_nothing_else_parses() {
        let seg = segment(1, Lsn(0x10), Lsn(0x20));
        let key = rekeyed("0123456789abcdef", &seg);
        assert_eq!(
            key,
            "rekeyed/0123456789abcdef/segments/00000001/0000000000000010-0000000000000020.seg"
        );
        assert_eq!(
            parse_rekeyed(&key),
            Some(("0123456789abcdef", seg.as_str()))
        );
        let part = part(ID, 7, 12);
        assert_eq!(
            parse_rekeyed(&rekeyed("ffffffffffffffff", &part)),
            Some(("ffffffffffffffff", part.as_str()))
        );
        for bad in [
            "rekeyed/0123456789ABCDEF/segments/00000001/0000000000000010-0000000000000020.seg",
            "rekeyed/0123456789abcde/segments/00000001/0000000000000010-0000000000000020.seg",
            "rekeyed/0123456789abcdef/archive.json",
            "rekeyed/0123456789abcdef/locks/writer/0000000003-0000000012.json",
            "rekeyed/0123456789abcdef",
            "segments/00000001/0000000000000010-0000000000000020.seg",
        ] {
            assert_eq!(parse_rekeyed(bad), None, "{bad:?}");
        }
    }
}
