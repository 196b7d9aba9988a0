//! Cold tiers: which objects move to the archive storage class (`--archive-storage-class`) when
//! a retained backup becomes a weekly or monthly archive, and the move. The choice is pure
//! ([`plan`]); [`super::expire`] runs it where the retention policy is applied (`prune`, and
//! the archiver after a scheduled backup), after the deletions.
//!
//! A backup is an **archive** when the calendar tiers alone keep it: `weekly` or `monthly`,
//! perhaps `pinned`, and nothing that wants it at hand — not the newest backup, not the change
//! window's base, not a daily or manual backup (those stay in `--s3-storage-class`). With the
//! default policy a Sunday backup so moves once it leaves the 30 dailies.
//!
//! Only the backup's parts move (schema dump, table parts). Its manifest stays where it was
//! written, so `list`, `prune` and the restore planner read every backup without a thaw; and
//! segments never move (the change window needs them, and a retained backup's own instant
//! needs none). Objects already in a cold class (`GLACIER`, `DEEP_ARCHIVE`) are left there: a
//! copy out of one needs a thaw first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Serialize;

use super::keys;
use super::retention::{Reason, Selection};
use crate::store::{StorageClass, Store, StoreError};

/// A backup whose parts move to the archive class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Archived {
    pub id: String,
    /// The class they move to.
    pub class: StorageClass,
    /// The objects that move (the others already are in `class`, or cold).
    pub objects: Vec<String>,
    pub bytes: u64,
}

/// Whether these reasons make a backup an archive (see the module doc).
pub fn is_archive(reasons: &BTreeSet<Reason>) -> bool {
    reasons
        .iter()
        .any(|r| matches!(r, Reason::Weekly | Reason::Monthly))
        && reasons
            .iter()
            .all(|r| matches!(r, Reason::Weekly | Reason::Monthly | Reason::Pinned))
}

/// The archives of `selection` with the objects of each that move to `class`. `objects`: the
/// class and size of every object under `basebackups/`. A backup with nothing left to move is
/// not listed. Pure.
pub fn plan(
    selection: &Selection,
    objects: &BTreeMap<String, (StorageClass, u64)>,
    class: &StorageClass,
) -> Vec<Archived> {
    selection
        .kept
        .iter()
        .filter(|(_, reasons)| is_archive(reasons))
        .filter_map(|(id, _)| {
            let folder = keys::backup_folder(id);
            let moving: Vec<(&String, u64)> = objects
                .range(folder.clone()..)
                .take_while(|(k, _)| k.starts_with(&folder))
                .filter(|(k, _)| {
                    keys::split_backup_key(k)
                        .is_some_and(|(_, file)| keys::manifest_revision(file).is_none())
                })
                .filter(|(_, (c, _))| c != class && !c.is_cold())
                .map(|(k, (_, size))| (k, *size))
                .collect();
            (!moving.is_empty()).then(|| Archived {
                id: id.clone(),
                class: class.clone(),
                bytes: moving.iter().map(|(_, s)| s).sum(),
                objects: moving.into_iter().map(|(k, _)| k.clone()).collect(),
            })
        })
        .collect()
}

/// Moves each archive's objects to its class, in order.
pub async fn apply(store: &Arc<dyn Store>, archived: &[Archived]) -> Result<(), StoreError> {
    for a in archived {
        for key in &a.objects {
            store.set_storage_class(key, &a.class).await?;
        }
        tracing::info!(
            backup = %a.id,
            objects = a.objects.len(),
            bytes = a.bytes,
            "moved the archive's parts to {}",
            a.class
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::PgTimestamp;
    use Reason::*;

    fn selection(kept: &[(&str, &[Reason])]) -> Selection {
        Selection {
            kept: kept
                .iter()
                .map(|(id, r)| (id.to_string(), r.iter().copied().collect()))
                .collect(),
            dropped: Vec::new(),
            window_start: PgTimestamp(0),
            segments: BTreeMap::new(),
        }
    }

    #[test]
    fn only_backups_the_calendar_tiers_alone_keep_are_archives() {
        let set = |r: &[Reason]| r.iter().copied().collect::<BTreeSet<_>>();
        assert!(is_archive(&set(&[Weekly])));
        assert!(is_archive(&set(&[Weekly, Monthly, Pinned])));
        assert!(is_archive(&set(&[Monthly])));
        for hot in [
            &[Newest, ChangeWindow, Weekly][..],
            &[Daily, Weekly],
            &[Manual, Monthly],
            &[Pinned],
            &[ChangeWindow, Monthly],
        ] {
            assert!(!is_archive(&set(hot)), "{hot:?}");
        }
    }

    #[test]
    fn an_archive_moves_its_parts_but_not_its_manifest_nor_what_is_already_there() {
        let (a, b, c, d) = ("00000001-0A", "00000001-0B", "00000001-0C", "00000001-0D");
        let sel = selection(&[
            (a, &[Weekly]),
            (b, &[Newest, ChangeWindow, Weekly, Daily]),
            (c, &[Monthly, Pinned]),
            (d, &[Weekly]),
        ]);
        let mut objects = BTreeMap::new();
        let std = |n| (StorageClass::Standard, n);
        for id in [a, b, c, d] {
            objects.insert(keys::manifest(id), std(1));
            objects.insert(keys::manifest(id).replace(".json", ".r2.json"), std(1));
            objects.insert(keys::schema(id), std(10));
            objects.insert(keys::part(id, 0, 0), std(100));
            objects.insert(keys::part(id, 1, 0), std(1000));
        }
        // C was half moved by an interrupted prune; D was moved already (and one part is in
        // DEEP_ARCHIVE by a lifecycle rule: left there).
        objects.insert(keys::part(c, 0, 0), (StorageClass::Glacier, 100));
        for k in [keys::schema(d), keys::part(d, 0, 0)] {
            objects.get_mut(&k).unwrap().0 = StorageClass::Glacier;
        }
        objects.get_mut(&keys::part(d, 1, 0)).unwrap().0 = StorageClass::DeepArchive;
        // Another folder whose name starts like A's.
        objects.insert(
            format!("{}0/x", keys::backup_folder(a).trim_end_matches('/')),
            std(1),
        );

        let plan = plan(&sel, &objects, &StorageClass::Glacier);
        let got: Vec<(&str, Vec<String>, u64)> = plan
            .iter()
            .map(|p| (p.id.as_str(), p.objects.clone(), p.bytes))
            .collect();
        let mut a_parts = vec![keys::schema(a), keys::part(a, 0, 0), keys::part(a, 1, 0)];
        a_parts.sort();
        let mut c_parts = vec![keys::schema(c), keys::part(c, 1, 0)];
        c_parts.sort();
        assert_eq!(got, [(a, a_parts, 1110), (c, c_parts, 1010)]);
        assert!(plan.iter().all(|p| p.class == StorageClass::Glacier));
    }
}
