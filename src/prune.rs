//! `tidemark prune`: removes objects no restore can use. For now one kind: the parts of base
//! backups that never got their `manifest.json` (a `backup` or an archiver killed while taking
//! one). Such a folder is ignored by every reader (a backup exists only once its manifest is
//! stored, last), but it costs storage and a warning on every command.
//!
//! A backup still being written has no manifest either, so only a folder whose newest object is
//! older than `--older-than` (default 24 h; parts are written continuously while a backup runs)
//! is removed. A store that does not report write times keeps its folders.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::catalog::manifest;
use crate::store::{ObjectMeta, Store};

/// What to prune.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Incomplete backups whose newest object is at least this old go.
    pub older_than: Duration,
    /// Report, delete nothing.
    pub dry_run: bool,
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

/// The incomplete backup folders in a listing of `basebackups/`, each with the decision. Pure.
pub fn select(objects: &[ObjectMeta], now: SystemTime, opts: &PruneOptions) -> Vec<Incomplete> {
    let mut folders: BTreeMap<&str, Vec<&ObjectMeta>> = BTreeMap::new();
    for o in objects {
        let Some(rest) = o.key.strip_prefix(manifest::ROOT) else {
            continue;
        };
        let Some((id, _)) = rest.split_once('/') else {
            continue;
        };
        folders.entry(id).or_default().push(o);
    }
    folders
        .into_iter()
        .filter(|(id, objs)| !objs.iter().any(|o| o.key == manifest::manifest_key(id)))
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

/// Runs prune: lists, decides, deletes (unless a dry run), and prints what it did.
pub async fn run(store: &Arc<dyn Store>, opts: &PruneOptions, json: bool) -> anyhow::Result<()> {
    let objects = store.list(manifest::ROOT).await?;
    let found = select(&objects, SystemTime::now(), opts);
    for f in found.iter().filter(|f| f.removed) {
        let prefix = format!("{}{}/", manifest::ROOT, f.id);
        for o in objects.iter().filter(|o| o.key.starts_with(&prefix)) {
            store.delete(&o.key).await?;
        }
        tracing::info!(backup = %f.id, objects = f.objects, "removed an incomplete base backup");
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "repository": store.location(),
                "dry_run": opts.dry_run,
                "incomplete_backups": found,
            }))?
        );
        return Ok(());
    }
    if found.is_empty() {
        println!("{}: no incomplete base backup", store.location());
    }
    for f in &found {
        let what = format!(
            "incomplete base backup {} ({} objects, {} bytes)",
            f.id, f.objects, f.bytes
        );
        match (&f.kept_because, opts.dry_run) {
            (Some(why), _) => println!("kept {what}: {why}"),
            (None, true) => println!("would remove {what}"),
            (None, false) => println!("removed {what}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, size: u64, written: Option<SystemTime>) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            modified: written,
        }
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
        };
        let found = select(&objects, now, &opts);
        let ids: Vec<(&str, bool)> = found.iter().map(|f| (f.id.as_str(), f.removed)).collect();
        assert_eq!(ids, [("B", true), ("C", false), ("D", false)]);
        assert_eq!((found[0].objects, found[0].bytes), (2, 15));
        assert_eq!(found[0].age_seconds, Some(90_000));
        assert!(found[1].kept_because.as_deref().unwrap().contains("still"));
        let dry = select(
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
