//! Expiry: a retention [`Selection`] turned into the ordered list
//! of objects that go, and its application to a store. `prune` runs it and prints it; the
//! archiver can run it after a scheduled backup ([`apply`]).
//!
//! The order protects every reader:
//! 1. each dropped backup, oldest first: its manifest (every revision) first, then its parts,
//!    so a half-deleted backup has no manifest and is never listed (it is an incomplete
//!    backup, which a later prune finishes);
//! 2. the segments no kept backup or change window needs, oldest first (by generation, then
//!    position), so what stays is always a contiguous chain from a backup;
//! 3. the parts of incomplete backups (no manifest) whose newest object is older than
//!    `older_than`: a backup still being written keeps writing parts.
//!
//! Then, with an archive storage class ([`PruneOptions::archive_class`], S3 only), the parts
//! of each backup that became a weekly or monthly archive move to it ([`super::tiering`]).
//! [`enact`] does both; `prune` and [`apply`] call it.
//!
//! Beside a running archiver: a generation with no backup is never touched (it may be the one
//! the archiver is starting), the newest generation keeps its segments from the change
//! window's backup on (the archiver only adds after them), a backup being taken has no
//! manifest yet and is recent, and the newest complete backup is never dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::retention::{self, Candidate, Policy, Reason, Selection};
use super::tiering::{self, Archived};
use super::{chain, keys, manifest, pin, Manifest, Origin, SegmentRef};
use crate::lsn::PgTimestamp;
use crate::store::{ObjectMeta, StorageClass, Store, StoreError};

/// What to prune besides the policy's choice.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Incomplete backups whose newest object is at least this old go.
    pub older_than: Duration,
    /// Report, delete nothing.
    pub dry_run: bool,
    /// Move the parts of weekly and monthly archives to this class (S3 only); `None`: they
    /// stay where they were written.
    pub archive_class: Option<StorageClass>,
}

impl Default for PruneOptions {
    fn default() -> PruneOptions {
        PruneOptions {
            older_than: Duration::from_secs(24 * 3600),
            dry_run: false,
            archive_class: None,
        }
    }
}

/// One incomplete backup folder and what prune does with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Incomplete {
    pub id: String,
    pub objects: usize,
    pub bytes: u64,
    /// Seconds since its newest object was written (None: the store does not say).
    pub age_seconds: Option<u64>,
    pub removed: bool,
    /// Why it is kept, when it is.
    pub kept_because: Option<String>,
}

/// A kept backup and why it stays.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kept {
    pub id: String,
    pub snapshot_time: PgTimestamp,
    pub reasons: Vec<Reason>,
}

/// A backup that goes, with its objects in deletion order (manifest first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub id: String,
    pub snapshot_time: PgTimestamp,
    pub objects: Vec<String>,
    pub bytes: u64,
}

/// Everything one prune removes and keeps, in deletion order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Expiry {
    /// The start of the change window: every instant from it on stays restorable.
    pub window_start: PgTimestamp,
    /// Every kept backup with its reasons, by id.
    pub kept: Vec<Kept>,
    /// The backups that go, oldest first.
    pub backups: Vec<Dropped>,
    /// The segments that go, oldest first.
    pub segments: Vec<SegmentRef>,
    /// Incomplete backups, each with the decision.
    pub incomplete: Vec<Incomplete>,
    /// The archives whose parts move to the archive storage class (none without one).
    pub archived: Vec<Archived>,
}

impl Expiry {
    /// Every key to delete, in order.
    pub fn deletions(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .backups
            .iter()
            .flat_map(|b| b.objects.iter().cloned())
            .collect();
        out.extend(self.segments.iter().map(|s| s.key.clone()));
        out
    }
}

/// The incomplete backup folders in a listing of `basebackups/`, each with the decision. Pure.
pub fn select_incomplete(
    objects: &[ObjectMeta],
    now: SystemTime,
    opts: &PruneOptions,
) -> Vec<Incomplete> {
    let mut folders: BTreeMap<&str, Vec<&ObjectMeta>> = BTreeMap::new();
    for o in objects {
        let Some((id, _)) = keys::split_backup_key(&o.key) else {
            continue;
        };
        folders.entry(id).or_default().push(o);
    }
    folders
        .into_iter()
        .filter(|(_, objs)| {
            !objs.iter().any(|o| {
                keys::split_backup_key(&o.key)
                    .and_then(|(_, f)| keys::manifest_revision(f))
                    .is_some()
            })
        })
        .map(|(id, objs)| {
            let newest = objs.iter().map(|o| o.modified).collect::<Option<Vec<_>>>();
            let age = newest
                .and_then(|t| t.into_iter().max())
                .map(|t| now.duration_since(t).unwrap_or_default());
            let kept_because = match age {
                None => Some("the store does not say when its objects were written".to_string()),
                Some(a) if a < opts.older_than => Some(format!(
                    "written {} ago, less than --older-than {}: it may still be being written",
                    humantime::format_duration(Duration::from_secs(a.as_secs())),
                    humantime::format_duration(opts.older_than)
                )),
                Some(_) => None,
            };
            Incomplete {
                id: id.to_string(),
                objects: objs.len(),
                bytes: objs.iter().map(|o| o.size).sum(),
                age_seconds: age.map(|a| a.as_secs()),
                removed: kept_because.is_none() && !opts.dry_run,
                kept_because,
            }
        })
        .collect()
}

/// The retention candidates of these manifests and pins. Pure.
pub fn candidates(manifests: &[Manifest], pins: &BTreeSet<String>) -> Vec<Candidate> {
    manifests
        .iter()
        .map(|m| Candidate {
            id: m.id.clone(),
            generation: m.generation,
            consistent_point: m.consistent_point,
            instant: m.snapshot_time,
            manual: m.origin == Some(Origin::Manual),
            pinned: pins.contains(&m.id),
        })
        .collect()
}

/// The deletion plan of `selection` over a listing of the repository (`objects`: at least
/// `basebackups/`; `segments`: the chains of `segments/`). Pure.
pub fn plan(
    manifests: &[Manifest],
    selection: &Selection,
    objects: &[ObjectMeta],
    segments: &BTreeMap<u32, Vec<SegmentRef>>,
) -> Expiry {
    let by_id: BTreeMap<&str, &Manifest> = manifests.iter().map(|m| (m.id.as_str(), m)).collect();
    let kept = selection
        .kept
        .iter()
        .map(|(id, reasons)| Kept {
            id: id.clone(),
            snapshot_time: by_id
                .get(id.as_str())
                .map_or(PgTimestamp(0), |m| m.snapshot_time),
            reasons: reasons.iter().copied().collect(),
        })
        .collect();
    let backups = selection
        .dropped
        .iter()
        .map(|id| {
            let folder: Vec<&ObjectMeta> = objects
                .iter()
                .filter(|o| keys::split_backup_key(&o.key).is_some_and(|(b, _)| b == id))
                .collect();
            let is_manifest = |o: &ObjectMeta| {
                keys::split_backup_key(&o.key)
                    .and_then(|(_, f)| keys::manifest_revision(f))
                    .is_some()
            };
            let mut keys: Vec<String> = folder
                .iter()
                .filter(|o| is_manifest(o))
                .map(|o| o.key.clone())
                .collect();
            keys.extend(
                folder
                    .iter()
                    .filter(|o| !is_manifest(o))
                    .map(|o| o.key.clone()),
            );
            Dropped {
                id: id.clone(),
                snapshot_time: by_id
                    .get(id.as_str())
                    .map_or(PgTimestamp(0), |m| m.snapshot_time),
                objects: keys,
                bytes: folder.iter().map(|o| o.size).sum(),
            }
        })
        .collect();
    let segments = segments
        .iter()
        .flat_map(|(&g, chain)| {
            chain
                .iter()
                .filter(move |s| !selection.needs_segment(g, s.end))
                .cloned()
        })
        .collect();
    Expiry {
        window_start: selection.window_start,
        kept,
        backups,
        segments,
        incomplete: Vec::new(),
        archived: Vec::new(),
    }
}

/// Lists the repository and decides what `policy` removes at `now` (nothing deleted).
pub async fn decide(
    store: &Arc<dyn Store>,
    policy: &Policy,
    now: SystemTime,
    opts: &PruneOptions,
) -> Result<Expiry, crate::object::ObjectError> {
    let objects = store.list("").await?;
    let scan = manifest::read_manifests(store, &objects).await?;
    let pins = pin::pinned_in(&objects);
    let segments = chain::group_segments(
        objects
            .iter()
            .filter(|o| o.key.starts_with(chain::SEGMENTS_PREFIX))
            .map(|o| (o.key.clone(), o.size)),
    );
    let now_pg = PgTimestamp::from_datetime(now.into());
    let selection = retention::select(&candidates(&scan.manifests, &pins), policy, now_pg);
    let mut expiry = plan(&scan.manifests, &selection, &objects, &segments);
    expiry.incomplete = select_incomplete(&objects, now, opts);
    if let Some(class) = &opts.archive_class {
        expiry.archived = archives(store, &selection, &objects, class).await?;
    }
    Ok(expiry)
}

/// The archives of `selection` and what of them moves to `class`: one more listing, of
/// `basebackups/` with its classes. Refused on a store without classes.
async fn archives(
    store: &Arc<dyn Store>,
    selection: &Selection,
    objects: &[ObjectMeta],
    class: &StorageClass,
) -> Result<Vec<Archived>, StoreError> {
    if !store.has_storage_classes() {
        return Err(StoreError::NoStorageClasses {
            location: store.location(),
            what: format!("--archive-storage-class {class}"),
        });
    }
    let classes = store.storage_classes(keys::BASEBACKUPS).await?;
    let listed: BTreeMap<String, (StorageClass, u64)> = objects
        .iter()
        .filter(|o| o.key.starts_with(keys::BASEBACKUPS))
        .map(|o| {
            let c = classes
                .get(&o.key)
                .cloned()
                .unwrap_or(StorageClass::Standard);
            (o.key.clone(), (c, o.size))
        })
        .collect();
    Ok(tiering::plan(selection, &listed, class))
}

/// Carries `expiry` out: the deletions in their order (see [`delete`]), then the moves of the
/// archives to their class. The one place a retention decision is applied.
pub async fn enact(
    store: &Arc<dyn Store>,
    expiry: &Expiry,
    objects: &[ObjectMeta],
) -> Result<(), StoreError> {
    delete(store, expiry, objects).await?;
    tiering::apply(store, &expiry.archived).await
}

/// Deletes what `expiry` says goes, in its order (incomplete backups last).
pub async fn delete(
    store: &Arc<dyn Store>,
    expiry: &Expiry,
    objects: &[ObjectMeta],
) -> Result<(), StoreError> {
    for key in expiry.deletions() {
        store.delete(&key).await?;
    }
    for f in expiry.incomplete.iter().filter(|f| f.removed) {
        let folder = keys::backup_folder(&f.id);
        for o in objects.iter().filter(|o| o.key.starts_with(&folder)) {
            store.delete(&o.key).await?;
        }
    }
    delete_orphan_sidecars(store).await
}

/// Deletes the rekey sidecars ([`keys::REKEYED`]) whose object is gone: those of the objects
/// just deleted, and any a crash between an object's deletion and its sidecars' left. The
/// sidecars are listed before the objects: a sidecar is stored only after its object, so a
/// listed sidecar's object is in the later listing unless it was deleted.
pub async fn delete_orphan_sidecars(store: &Arc<dyn Store>) -> Result<(), StoreError> {
    let sidecars = store.list(keys::REKEYED).await?;
    if sidecars.is_empty() {
        return Ok(());
    }
    let live: std::collections::HashSet<String> =
        store.list("").await?.into_iter().map(|o| o.key).collect();
    for s in sidecars {
        let orphan = match keys::parse_rekeyed(&s.key) {
            Some((_, object)) => !live.contains(object),
            None => false,
        };
        if orphan {
            store.delete(&s.key).await?;
        }
    }
    Ok(())
}

/// Applies `policy` at `now` to the repository: decides, then deletes (unless
/// `opts.dry_run`). What the archiver calls after a scheduled backup.
pub async fn apply(
    store: &Arc<dyn Store>,
    policy: &Policy,
    now: SystemTime,
    opts: &PruneOptions,
) -> Result<Expiry, crate::object::ObjectError> {
    let expiry = decide(store, policy, now, opts).await?;
    if !opts.dry_run {
        let objects = store.list(keys::BASEBACKUPS).await?;
        enact(store, &expiry, &objects).await?;
        tracing::info!(
            backups = expiry.backups.len(),
            segments = expiry.segments.len(),
            incomplete = expiry.incomplete.iter().filter(|f| f.removed).count(),
            archived = expiry.archived.len(),
            "pruned to the retention policy"
        );
    }
    Ok(expiry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn obj(key: &str, size: u64, written: Option<SystemTime>) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            modified: written,
        }
    }

    fn manifest_at(cp: u64, t: i64, origin: Origin) -> Manifest {
        let id = keys::backup_id(1, Lsn(cp));
        Manifest {
            id: id.clone(),
            generation: 1,
            consistent_point: Lsn(cp),
            snapshot_time: PgTimestamp(t),
            origin: Some(origin),
            ..crate::catalog::manifest::tests::sample()
        }
    }

    fn seg(g: u32, s: u64, e: u64) -> SegmentRef {
        SegmentRef {
            generation: g,
            start: Lsn(s),
            end: Lsn(e),
            key: keys::segment(g, Lsn(s), Lsn(e)),
            size: 10,
        }
    }

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn a_dropped_backup_goes_manifest_first_and_segments_oldest_first() {
        // Three backups an hour apart (the middle one manual), segments over all of them, and
        // generation 2 with segments but no backup yet (an archiver starting it).
        let ms = vec![
            manifest_at(100, 10 * HOUR, Origin::Initial),
            manifest_at(300, 11 * HOUR, Origin::Manual),
            manifest_at(500, 12 * HOUR, Origin::Scheduled),
        ];
        let mut objects = Vec::new();
        for m in &ms {
            objects.push(obj(&keys::part(&m.id, 0, 0), 5, None));
            objects.push(obj(&keys::schema(&m.id), 7, None));
            objects.push(obj(&m.key(), 1, None));
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        let mut chains = BTreeMap::new();
        chains.insert(
            1,
            vec![
                seg(1, 100, 200),
                seg(1, 200, 400),
                seg(1, 400, 500),
                seg(1, 500, 600),
            ],
        );
        chains.insert(2, vec![seg(2, 10, 20)]);
        let policy = Policy {
            daily: 0,
            weekly: 0,
            monthly: 0,
            manual: 1,
            changes: Duration::from_secs(1800),
        };
        // Now: 12:40, the window starts at 12:10, after the newest backup: it replays from it.
        let now = PgTimestamp(12 * HOUR + 40 * 60_000_000);
        let sel = retention::select(&candidates(&ms, &BTreeSet::new()), &policy, now);
        let e = plan(&ms, &sel, &objects, &chains);
        assert_eq!(e.backups.len(), 1);
        let dropped = &e.backups[0];
        assert_eq!(dropped.id, ms[0].id);
        assert_eq!(dropped.objects[0], ms[0].key(), "the manifest goes first");
        assert_eq!(dropped.objects.len(), 3);
        assert_eq!(dropped.bytes, 13);
        // The manual backup stays (a point), the newest is the window's base.
        let kept: Vec<(&str, Vec<Reason>)> = e
            .kept
            .iter()
            .map(|k| (k.id.as_str(), k.reasons.clone()))
            .collect();
        assert_eq!(
            kept,
            [
                (ms[1].id.as_str(), vec![Reason::Manual]),
                (
                    ms[2].id.as_str(),
                    vec![Reason::Newest, Reason::ChangeWindow]
                ),
            ]
        );
        // Segments ending at or before the base's position go, oldest first; generation 2
        // (no backup) and everything after the base stay.
        let gone: Vec<&str> = e.segments.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            gone,
            [
                chains[&1][0].key.as_str(),
                &chains[&1][1].key,
                &chains[&1][2].key
            ]
        );
        let order = e.deletions();
        assert_eq!(order.len(), 6);
        assert_eq!(order[0], ms[0].key());
        assert_eq!(order[3], chains[&1][0].key);

        // A pin keeps the oldest; with a longer window (from 10:30) its segments stay too.
        let pins = BTreeSet::from([ms[0].id.clone()]);
        let long = Policy {
            changes: Duration::from_secs(2 * 3600 + 600),
            ..policy
        };
        let sel = retention::select(&candidates(&ms, &pins), &long, now);
        let e = plan(&ms, &sel, &objects, &chains);
        assert!(e.backups.is_empty());
        assert_eq!(
            e.kept[0].reasons,
            vec![Reason::ChangeWindow, Reason::Pinned]
        );
        assert!(e.segments.is_empty(), "{:?}", e.segments);
    }

    #[test]
    fn only_old_folders_without_a_manifest_are_selected() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let objects = [
            // Complete: never touched.
            obj("basebackups/A/manifest.json", 10, ago(90_000)),
            obj("basebackups/A/tables/00000.0000.copy.lz4", 5, ago(90_000)),
            // Incomplete and old: goes, whole.
            obj("basebackups/B/schema.dump", 7, ago(100_000)),
            obj("basebackups/B/tables/00000.0000.copy.lz4", 8, ago(90_000)),
            // Incomplete but written to an hour ago: may still be running.
            obj("basebackups/C/schema.dump", 1, ago(200_000)),
            obj("basebackups/C/tables/00001.0000.copy.lz4", 1, ago(3_600)),
            // No write times: kept.
            obj("basebackups/D/schema.dump", 1, None),
            obj("segments/00000001/x.seg", 1, ago(100_000)),
        ];
        let opts = PruneOptions {
            older_than: Duration::from_secs(86_400),
            dry_run: false,
            archive_class: None,
        };
        let found = select_incomplete(&objects, now, &opts);
        let ids: Vec<(&str, bool)> = found.iter().map(|f| (f.id.as_str(), f.removed)).collect();
        assert_eq!(ids, [("B", true), ("C", false), ("D", false)]);
        assert_eq!((found[0].objects, found[0].bytes), (2, 15));
        assert_eq!(found[0].age_seconds, Some(90_000));
        assert!(found[1].kept_because.as_deref().unwrap().contains("still"));
        let dry = select_incomplete(
            &objects,
            now,
            &PruneOptions {
                dry_run: true,
                ..opts
            },
        );
        assert!(dry.iter().all(|f| !f.removed));
        assert!(dry[0].kept_because.is_none());
    }
}
