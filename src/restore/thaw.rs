//! A base backup in a cold storage class: found before a restore writes anything, and thawed
//! on request (`--thaw TIER`).
//!
//! [`cold_objects`] lists the backup's folder once (the listing names each object's class)
//! and asks a `HEAD` only of the objects in a cold class (`GLACIER`, `DEEP_ARCHIVE`), whose
//! thaw state the listing does not give. Without `--thaw` a restore that needs any of them is
//! refused ([`super::RestoreError::Cold`]) with the objects and the command that thaws them.
//! With it, [`thaw`] asks S3 for a temporary readable copy of each (`RestoreObject`, kept
//! [`THAW_DAYS`] days) and waits, checking with a `HEAD` per object still thawing, at
//! intervals doubling from one second to a minute, logging progress as objects become
//! readable and every ten minutes in between (a standard GLACIER thaw takes hours).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backup::Manifest;
use crate::catalog::keys;
use crate::store::{Residence, Store, StoreError, Thaw, ThawTier};

/// How long a thawed copy stays readable: long enough to rerun a failed restore.
pub const THAW_DAYS: u32 = 2;

/// The longest wait between two checks of a thaw.
const MAX_POLL: Duration = Duration::from_secs(60);

/// How often a thaw that makes no progress is still logged.
const QUIET_LOG: Duration = Duration::from_secs(600);

/// An object of a backup that cannot be read now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColdObject {
    pub key: String,
    pub residence: Residence,
}

impl std::fmt::Display for ColdObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.residence.thaw {
            Thaw::Ongoing => ", thaw under way",
            _ => "",
        };
        write!(f, "{} ({}{state})", self.key, self.residence.class)
    }
}

/// The objects of `manifest`'s backup that are in a cold class and not thawed. None on a
/// store without classes.
pub async fn cold_objects(
    store: &Arc<dyn Store>,
    manifest: &Manifest,
) -> Result<Vec<ColdObject>, StoreError> {
    if !store.has_storage_classes() {
        return Ok(Vec::new());
    }
    let classes = store
        .storage_classes(&keys::backup_folder(&manifest.id))
        .await?;
    let mut out = Vec::new();
    for key in manifest.object_keys() {
        if !classes.get(&key).is_some_and(|c| c.is_cold()) {
            continue;
        }
        let residence = store.residence(&key).await?;
        if !residence.readable() {
            out.push(ColdObject { key, residence });
        }
    }
    Ok(out)
}

/// Thaws `objects` at `tier` and returns once every one is readable.
pub async fn thaw(
    store: &Arc<dyn Store>,
    backup: &str,
    objects: &[ColdObject],
    tier: ThawTier,
) -> Result<(), StoreError> {
    for o in objects.iter().filter(|o| o.residence.thaw == Thaw::None) {
        store.thaw(&o.key, tier, THAW_DAYS).await?;
    }
    let total = objects.len();
    tracing::info!(
        backup,
        objects = total,
        tier = tier.as_str(),
        "thawing the backup's objects (RestoreObject, readable for {THAW_DAYS} days); waiting for S3"
    );
    let started = Instant::now();
    let mut pending: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    let mut delay = Duration::from_secs(1);
    let mut logged = Instant::now();
    while !pending.is_empty() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_POLL);
        let before = pending.len();
        let mut still = Vec::with_capacity(before);
        for key in pending {
            if !store.residence(key).await?.readable() {
                still.push(key);
            }
        }
        pending = still;
        if pending.len() < before || logged.elapsed() >= QUIET_LOG {
            logged = Instant::now();
            tracing::info!(
                backup,
                "thaw: {} of {total} objects readable after {}",
                total - pending.len(),
                humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StorageClass;

    #[test]
    fn a_cold_object_names_its_class_and_a_thaw_under_way() {
        let o = |thaw| ColdObject {
            key: "basebackups/X/schema.dump".into(),
            residence: Residence {
                class: StorageClass::DeepArchive,
                thaw,
            },
        };
        assert_eq!(
            o(Thaw::None).to_string(),
            "basebackups/X/schema.dump (DEEP_ARCHIVE)"
        );
        assert_eq!(
            o(Thaw::Ongoing).to_string(),
            "basebackups/X/schema.dump (DEEP_ARCHIVE, thaw under way)"
        );
    }
}
