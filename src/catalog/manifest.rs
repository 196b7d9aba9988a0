//! The manifest of a base backup: `basebackups/<id>/manifest.json`, written last, and the
//! reading of every backup's manifest from a listing.
//!
//! The format is specified in `proto/manifest.md`. Readers accept unknown fields (additions that
//! keep `format_version`) and refuse an unknown `format_version`. A backup exists once its
//! manifest is stored: a folder without one is an incomplete backup, and a manifest that cannot
//! be read is recorded ([`ManifestScan`]), never fatal; only a failing store is an error.
//!
//! Owns: the manifest's types and format, and its reading. Does not own taking or loading a
//! backup (see `backup`, which writes the manifest).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::keys;
use crate::lsn::{Lsn, PgTimestamp};
use crate::object::{self, ObjectError};
use crate::store::{ObjectMeta, Store, StoreError};

/// The newest manifest format this build writes and reads: 2 when a table is stored in COPY's
/// binary format (a reader of format 1 would take binary parts for text).
pub const FORMAT_VERSION: u32 = 2;

/// The oldest manifest format this build reads (and writes, when every table is COPY text).
pub const MIN_FORMAT_VERSION: u32 = 1;

/// Folder under which every base backup lives.
pub const ROOT: &str = keys::BASEBACKUPS;

pub use keys::backup_id;

/// Key of the manifest of backup `id`.
pub fn manifest_key(id: &str) -> String {
    keys::manifest(id)
}

/// Key of the schema dump of backup `id`.
pub fn schema_key(id: &str) -> String {
    keys::schema(id)
}

/// Key of part `part` of table number `table` of backup `id`.
pub fn part_key(id: &str, table: usize, part: usize) -> String {
    keys::part(id, table, part)
}

/// Everything a restore needs to know about one base backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    pub tool_version: String,
    /// The server's system identifier (`IDENTIFY_SYSTEM`), as a decimal string: a u64 does not
    /// fit a JSON number safely.
    #[serde(with = "u64_string")]
    pub system_id: u64,
    pub timeline: u32,
    /// The archive generation this backup belongs to (a new slot starts a new generation).
    pub generation: u32,
    pub database: String,
    pub publication: String,
    /// Where the change stream continues: a transaction is in the backup iff its commit LSN is
    /// below this point.
    pub consistent_point: Lsn,
    /// `clock_timestamp()` read inside the snapshot after it was exported: every transaction in
    /// the backup committed before it. The earliest instant this backup can restore to.
    pub snapshot_time: PgTimestamp,
    pub started_at: PgTimestamp,
    pub finished_at: PgTimestamp,
    pub server_version_num: u32,
    pub schema: SchemaEntry,
    pub tables: Vec<TableEntry>,
    pub sequences: Vec<SequenceEntry>,
    /// The post-data objects the Keys load phase creates (what replay needs to find rows).
    pub key_objects: Vec<KeyObject>,
    pub totals: Totals,
    /// How the backup came to be (absent in manifests written before it was recorded: read as
    /// unknown, which retention does not count as manual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// `backup --tag NAME` (e.g. `pre-deploy-v42`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// How a base backup came to be: what retention's `manual` tier counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Taken by `archive` when it started a generation.
    Initial,
    /// Taken by `archive`'s schedule.
    Scheduled,
    /// Taken by hand: `tidemark backup`.
    Manual,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Initial => "initial",
            Origin::Scheduled => "scheduled",
            Origin::Manual => "manual",
        }
    }
}

/// The `pg_dump --schema-only -Fc` output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaEntry {
    pub key: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// One table's data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// The table's OID on the source: the relation id of the stream's row changes, so replay
    /// can apply changes to a table whose Relation message came before the backup's point.
    #[serde(default)]
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// A partitioned table published through its root (`publish_via_partition_root`): its data
    /// was read through the root and is loaded through the root.
    pub partitioned_root: bool,
    /// The columns in the COPY data, in order (stored, non-generated columns).
    pub columns: Vec<String>,
    /// The COPY format of the parts (text when absent: format 1 manifests).
    #[serde(default)]
    pub format: CopyFormat,
    pub rows: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub parts: Vec<PartEntry>,
}

/// The COPY format of a table's parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyFormat {
    /// COPY text: portable across major versions and types.
    #[default]
    Text,
    /// COPY binary: only for tables whose columns are all of built-in base, range or
    /// multirange types (or arrays of them), whose binary forms do not depend on OIDs of the
    /// source; the server reads it with less work than text.
    Binary,
}

/// One stored part of a table: lz4-framed COPY output (text, or a whole binary COPY stream),
/// cut at a row boundary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEntry {
    pub key: String,
    pub rows: u64,
    /// Size of the COPY output (text, or the whole binary stream).
    pub raw_bytes: u64,
    /// Size of the stored (compressed) object.
    pub stored_bytes: u64,
    /// CRC-32 (IEEE) of the stored object.
    pub crc32: u32,
}

/// A sequence's state as read during the backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceEntry {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// What kind of post-data object a [`KeyObject`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    PrimaryKey,
    Unique,
    /// An index (not backing a constraint) named by `REPLICA IDENTITY USING INDEX`.
    ReplicaIdentityIndex,
}

/// A primary key, unique constraint or replica-identity index of a backed-up table (or of a
/// partition of a backed-up partitioned root). Indexes of partitions are attached to their
/// parent's index (`INDEX ATTACH`) in the PostData phase: replay uses the partitions' own
/// indexes, which are valid from the start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyObject {
    pub kind: KeyKind,
    pub schema: String,
    pub table: String,
    /// Constraint name (for constraints) or index name.
    pub name: String,
    /// OID of the object in the source, as the dump's table of contents names it:
    /// `pg_constraint.oid` for constraints, `pg_class.oid` for indexes.
    pub oid: u32,
}

/// Sums over the backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub tables: u64,
    pub parts: u64,
    pub rows: u64,
    pub raw_bytes: u64,
    /// Stored bytes of all parts plus the schema dump.
    pub stored_bytes: u64,
}

/// Why a manifest cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest that does not decode (a store error converts to [`ManifestError::Store`]).
    #[error(transparent)]
    Object(ObjectError),
    #[error("{key}: not a tidemark manifest: {message}")]
    Invalid { key: String, message: String },
    #[error("{key}: manifest format_version {found} is not supported by tidemark {} (it reads format_version {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); use a tidemark release that knows this format", env!("CARGO_PKG_VERSION"))]
    UnsupportedVersion { key: String, found: u64 },
    /// The manifest in backup `<id>`'s folder describes another backup.
    #[error("{key}: the manifest names backup {named:?}")]
    OtherBackup { key: String, named: String },
}

impl crate::error::Classify for ManifestError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            ManifestError::Store(e) => e.exit_status(),
            ManifestError::Object(e) => e.exit_status(),
            ManifestError::Invalid { .. } | ManifestError::OtherBackup { .. } => Damaged,
            ManifestError::UnsupportedVersion { .. } => Repository,
        }
    }
}

impl From<ObjectError> for ManifestError {
    fn from(e: ObjectError) -> ManifestError {
        match e {
            ObjectError::Store(e) => ManifestError::Store(e),
            e => ManifestError::Object(e),
        }
    }
}

impl Manifest {
    /// Serializes the manifest (pretty-printed: it is meant to be read by people too).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        v.push(b'\n');
        v
    }

    /// Parses a manifest stored under `key` (named in errors), refusing other format versions.
    pub fn from_json(key: &str, data: &[u8]) -> Result<Manifest, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            key: key.to_string(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| invalid(e.to_string()))?;
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| invalid("no numeric format_version".into()))?;
        if !(MIN_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&version) {
            return Err(ManifestError::UnsupportedVersion {
                key: key.to_string(),
                found: version,
            });
        }
        serde_json::from_value(value).map_err(|e| invalid(e.to_string()))
    }

    /// The manifest's own key.
    pub fn key(&self) -> String {
        manifest_key(&self.id)
    }

    /// Every object of the backup besides the manifest.
    pub fn object_keys(&self) -> Vec<String> {
        let mut keys = vec![self.schema.key.clone()];
        for t in &self.tables {
            keys.extend(t.parts.iter().map(|p| p.key.clone()));
        }
        keys
    }
}

/// The complete base backups in the store, sorted by id (generation, then position). A folder
/// without a manifest is an incomplete backup, and a manifest that cannot be read or parsed a
/// damaged one: each is skipped with a warning (see [`read_manifests`]).
pub async fn list_manifests(store: &Arc<dyn Store>) -> Result<Vec<Manifest>, ObjectError> {
    let objects = store.list(ROOT).await?;
    let scan = read_manifests(store, &objects).await?;
    for id in &scan.incomplete {
        tracing::warn!(backup = %id, location = %store.location(), "{ROOT}{id}/ has no manifest.json: an incomplete base backup, skipped (`tidemark prune --incomplete-backups` removes it once it is a day old)");
    }
    for (key, detail) in &scan.unreadable {
        tracing::warn!(location = %store.location(), "{key} cannot be used ({detail}): that base backup is skipped");
    }
    Ok(scan.manifests)
}

/// The base backups of a listing, read.
#[derive(Debug, Default)]
pub struct ManifestScan {
    /// The readable manifests, by id.
    pub manifests: Vec<Manifest>,
    /// Backup folders without `manifest.json` (being written, or the manifest was deleted).
    pub incomplete: Vec<String>,
    /// Manifests that cannot be read or parsed: (key, why). Their backups are not used.
    pub unreadable: Vec<(String, String)>,
}

/// Reads the manifest of every backup in `objects` (a listing that holds `basebackups/…`).
/// A manifest that is gone, unparsable or names another backup is recorded, not fatal; only a
/// failing store is an error.
pub async fn read_manifests(
    store: &Arc<dyn Store>,
    objects: &[ObjectMeta],
) -> Result<ManifestScan, ObjectError> {
    let mut folders: BTreeSet<String> = BTreeSet::new();
    // The highest revision of each backup's manifest (proto/layout.md, "Revisions").
    let mut complete: HashMap<String, (keys::Revision, String)> = HashMap::new();
    for o in objects {
        let Some((id, file)) = keys::split_backup_key(&o.key) else {
            continue;
        };
        folders.insert(id.to_string());
        if let Some(revision) = keys::manifest_revision(file) {
            let newest = complete
                .entry(id.to_string())
                .or_insert((revision, o.key.clone()));
            if revision > newest.0 {
                *newest = (revision, o.key.clone());
            }
        }
    }
    let mut scan = ManifestScan::default();
    for id in folders {
        let Some((_, key)) = complete.remove(&id) else {
            scan.incomplete.push(id);
            continue;
        };
        match read_manifest(store, &id, &key).await {
            Ok(m) => scan.manifests.push(m),
            Err(ManifestError::Store(e)) if !matches!(e, StoreError::NotFound { .. }) => {
                return Err(e.into())
            }
            // A key missing from the keyring is the command's problem, not the manifest's.
            Err(ManifestError::Object(e @ ObjectError::Crypt(_))) => return Err(e),
            Err(e) => {
                let detail = e.to_string();
                let detail = detail.strip_prefix(&format!("{key}: ")).unwrap_or(&detail);
                scan.unreadable.push((key, detail.to_string()));
            }
        }
    }
    Ok(scan)
}

/// Reads and checks the manifest of backup `id` stored under `key` (a revision of
/// [`manifest_key`]).
pub async fn read_manifest(
    store: &Arc<dyn Store>,
    id: &str,
    key: &str,
) -> Result<Manifest, ManifestError> {
    let data = object::get_object(&**store, key).await?;
    let m = Manifest::from_json(key, &data)?;
    if m.id != id {
        return Err(ManifestError::OtherBackup {
            key: key.to_string(),
            named: m.id,
        });
    }
    Ok(m)
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;

    pub(crate) fn sample() -> Manifest {
        let id = backup_id(3, Lsn(0x16_B374_D848));
        Manifest {
            format_version: FORMAT_VERSION,
            id: id.clone(),
            tool_version: "0.1.0".into(),
            system_id: 7_300_000_000_000_000_123,
            timeline: 1,
            generation: 3,
            database: "app".into(),
            publication: "tidemark".into(),
            consistent_point: Lsn(0x16_B374_D848),
            snapshot_time: PgTimestamp(800_000_000_123_456),
            started_at: PgTimestamp(800_000_000_000_000),
            finished_at: PgTimestamp(800_000_060_000_000),
            server_version_num: 150004,
            schema: SchemaEntry {
                key: schema_key(&id),
                bytes: 1234,
                crc32: 0xDEAD_BEEF,
            },
            tables: vec![TableEntry {
                oid: 16384,
                schema: "public".into(),
                name: "t \"quoted\"".into(),
                partitioned_root: false,
                columns: vec!["id".into(), "body".into()],
                format: CopyFormat::Binary,
                rows: 10,
                raw_bytes: 100,
                stored_bytes: 60,
                parts: vec![PartEntry {
                    key: part_key(&id, 0, 0),
                    rows: 10,
                    raw_bytes: 100,
                    stored_bytes: 60,
                    crc32: 1,
                }],
            }],
            sequences: vec![SequenceEntry {
                schema: "public".into(),
                name: "t_id_seq".into(),
                last_value: 10,
                is_called: true,
            }],
            key_objects: vec![KeyObject {
                kind: KeyKind::PrimaryKey,
                schema: "public".into(),
                table: "t \"quoted\"".into(),
                name: "t_pkey".into(),
                oid: 16394,
            }],
            totals: Totals {
                tables: 1,
                parts: 1,
                rows: 10,
                raw_bytes: 100,
                stored_bytes: 1294,
            },
            origin: None,
            tag: None,
        }
    }

    #[test]
    fn origin_and_tag_are_optional_fields() {
        // A manifest without them (written before they were recorded) reads as unknown.
        let old = sample();
        let text = String::from_utf8(old.to_json()).unwrap();
        assert!(!text.contains("origin") && !text.contains("tag"), "{text}");
        assert_eq!(
            Manifest::from_json("k", text.as_bytes()).unwrap().origin,
            None
        );
        let m = Manifest {
            origin: Some(Origin::Manual),
            tag: Some("pre-deploy-v42".into()),
            ..sample()
        };
        let json = m.to_json();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.contains("\"origin\": \"manual\""), "{text}");
        assert!(text.contains("\"tag\": \"pre-deploy-v42\""), "{text}");
        assert_eq!(Manifest::from_json("k", &json).unwrap(), m);
    }

    #[test]
    fn keys_sort_by_generation_then_position() {
        assert_eq!(
            backup_id(3, Lsn(0x16_B374_D848)),
            "00000003-00000016B374D848"
        );
        assert_eq!(
            part_key("X", 7, 12),
            "basebackups/X/tables/00007.0012.copy.lz4"
        );
        assert!(backup_id(1, Lsn(u64::MAX)) < backup_id(2, Lsn(0)));
        assert!(backup_id(2, Lsn(0xFF)) < backup_id(2, Lsn(0x100)));
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let json = m.to_json();
        let text = std::str::from_utf8(&json).unwrap();
        assert!(text.contains("\"system_id\": \"7300000000000000123\""));
        assert!(text.contains("\"consistent_point\": \"16/B374D848\""));
        assert!(text.contains("\"snapshot_time\": \"2025-05-08T06:13:20.123456Z\""));
        assert!(text.contains("\"kind\": \"primary_key\""));
        assert_eq!(Manifest::from_json("k", &json).unwrap(), m);
    }

    #[test]
    fn accepts_unknown_fields_of_the_same_format() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["some_future_field"] = serde_json::json!({"x": 1});
        let data = serde_json::to_vec(&v).unwrap();
        assert_eq!(Manifest::from_json("k", &data).unwrap(), sample());
    }

    #[test]
    fn reads_format_1_as_copy_text() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        assert_eq!(v["tables"][0]["format"], "binary");
        v["format_version"] = serde_json::json!(1);
        v["tables"][0].as_object_mut().unwrap().remove("format");
        let m = Manifest::from_json("k", &serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(m.tables[0].format, CopyFormat::Text);
    }

    #[test]
    fn refuses_other_format_versions() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = serde_json::json!(3);
        let data = serde_json::to_vec(&v).unwrap();
        let err = Manifest::from_json("basebackups/x/manifest.json", &data).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            ManifestError::UnsupportedVersion { found: 3, .. }
        ));
        assert!(msg.contains("basebackups/x/manifest.json"), "{msg}");
        assert!(msg.contains("format_version 3"), "{msg}");

        let err = Manifest::from_json("k", b"{\"id\": \"x\"}").unwrap_err();
        assert!(err.to_string().contains("no numeric format_version"));
        let err = Manifest::from_json("k", b"not json").unwrap_err();
        assert!(matches!(err, ManifestError::Invalid { .. }));
    }

    #[tokio::test]
    async fn list_manifests_skips_incomplete_backups() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let m = sample();
        store.put(&m.key(), Bytes::from(m.to_json())).await.unwrap();
        store
            .put(
                "basebackups/00000003-0000001700000000/schema.dump",
                Bytes::from_static(b"x"),
            )
            .await
            .unwrap();
        let list = list_manifests(&store).await.unwrap();
        assert_eq!(list, vec![m]);
    }

    #[tokio::test]
    async fn a_garbage_manifest_is_recorded_and_the_others_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let m = sample();
        store.put(&m.key(), Bytes::from(m.to_json())).await.unwrap();
        let garbage = manifest_key("00000001-0000000000000100");
        store
            .put(&garbage, Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        let objects = store.list(ROOT).await.unwrap();
        let scan = read_manifests(&store, &objects).await.unwrap();
        assert_eq!(scan.manifests, vec![m.clone()]);
        assert_eq!(scan.unreadable.len(), 1);
        assert_eq!(scan.unreadable[0].0, garbage);
        assert_eq!(list_manifests(&store).await.unwrap(), vec![m]);
    }

    #[tokio::test]
    async fn the_highest_revision_of_a_manifest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::LocalStore::new(dir.path()));
        let m = sample();
        let mut rewritten = m.clone();
        rewritten.tool_version = "rewritten".into();
        let revision = |r| {
            keys::Key::Manifest {
                backup: m.id.clone(),
                revision: r,
            }
            .to_string()
        };
        store.put(&m.key(), Bytes::from(m.to_json())).await.unwrap();
        store
            .put(&revision(3), Bytes::from(rewritten.to_json()))
            .await
            .unwrap();
        store
            .put(&revision(2), Bytes::from_static(b"{superseded"))
            .await
            .unwrap();
        assert_eq!(list_manifests(&store).await.unwrap(), vec![rewritten]);
        // A folder holding only a rewritten manifest is complete.
        store.delete(&m.key()).await.unwrap();
        let objects = store.list(ROOT).await.unwrap();
        let scan = read_manifests(&store, &objects).await.unwrap();
        assert!(scan.incomplete.is_empty() && scan.unreadable.is_empty());
        assert_eq!(scan.manifests.len(), 1);
    }
}
