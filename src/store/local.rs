//! A repository in a local folder (or any mounted filesystem).
//!
//! Durability: every put writes a temporary file beside the target, fsyncs it, renames it into
//! place with a create-only link, and fsyncs the directory, so an object is either absent or
//! complete after a crash. Folders are created one level at a time, each new one's parent
//! fsynced, so a stored object's path survives a crash too. A put that finds the identical
//! object already there (a retry) fsyncs it and its folder before it succeeds: the earlier
//! attempt may have died before its own fsync. Temporary files are named `.tmp-*` and ignored by
//! listings; the write probe's `.probe-*` file is removed whether the probe succeeds or not.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, Store, StoreError};

/// Makes a file or folder durable (`fsync`); replaceable in tests.
type SyncFn = Arc<dyn Fn(&Path) -> std::io::Result<()> + Send + Sync>;

/// A folder-backed store.
#[derive(Clone)]
pub struct LocalStore {
    root: PathBuf,
    sync: SyncFn,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("root", &self.root)
            .finish()
    }
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore {
            root: root.into(),
            sync: Arc::new(sync_path),
        }
    }

    /// A store whose fsyncs of existing files and of folders go through `sync`.
    #[cfg(test)]
    fn with_sync(
        root: impl Into<PathBuf>,
        sync: impl Fn(&Path) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> LocalStore {
        LocalStore {
            root: root.into(),
            sync: Arc::new(sync),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn io(&self, op: &'static str, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            location: self.location(),
            op,
            key: key.to_string(),
            source,
        }
    }

    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        validate_key(key).map_err(|m| self.io("put", key, std::io::Error::other(m)))?;
        let target = self.path(key);
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        if let Some(existing) = self.read_existing(key, &target)? {
            return self.confirm_existing(key, &target, &dir, &existing, data);
        }
        self.create_dirs(&dir)
            .map_err(|e| self.io("create folder for", key, e))?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            // Create-only: hard_link fails if the target appeared meanwhile.
            std::fs::hard_link(&tmp, &target)
        })();
        let _ = std::fs::remove_file(&tmp);
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let existing = std::fs::read(&target).map_err(|e| self.io("get", key, e))?;
                return self.confirm_existing(key, &target, &dir, &existing, data);
            }
            Err(e) => return Err(self.io("put", key, e)),
        }
        (self.sync)(&dir).map_err(|e| self.io("fsync folder of", key, e))?;
        Ok(())
    }

    /// A put found `existing` under the key: identical bytes succeed once they are durable
    /// (the attempt that wrote them may have failed before its fsync), others conflict.
    fn confirm_existing(
        &self,
        key: &str,
        target: &Path,
        dir: &Path,
        existing: &[u8],
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.compare(key, existing, data)?;
        (self.sync)(target).map_err(|e| self.io("fsync", key, e))?;
        (self.sync)(dir).map_err(|e| self.io("fsync folder of", key, e))
    }

    /// Creates `dir` and its missing parents one level at a time, fsyncing the parent of each
    /// folder it creates (so the new entry is durable before anything is stored under it).
    fn create_dirs(&self, dir: &Path) -> std::io::Result<()> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a folder", dir.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let parent = match dir.parent() {
            Some(p) if p.as_os_str().is_empty() => Path::new("."),
            Some(p) => p,
            // The filesystem's root exists; a missing one is not for us to create.
            None => return Ok(()),
        };
        self.create_dirs(parent)?;
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            // Created meanwhile by a concurrent put: its parent is synced all the same.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(e) => return Err(e),
        }
        (self.sync)(parent)
    }

    /// The write probe at `path`: creates it, writes it with `write`, fsyncs it, and removes it
    /// whatever happened after its creation.
    fn probe_at(
        &self,
        path: &Path,
        write: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.create_dirs(&self.root)?;
        let mut f = File::options().write(true).create_new(true).open(path)?;
        let written = write(&mut f).and_then(|()| f.sync_all());
        drop(f);
        let removed = std::fs::remove_file(path);
        written.and(removed)
    }

    fn read_existing(&self, key: &str, target: &Path) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(target) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("get", key, e)),
        }
    }

    fn compare(&self, key: &str, existing: &[u8], data: &[u8]) -> Result<(), StoreError> {
        if existing == data {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                location: self.location(),
                key: key.to_string(),
                existing: existing.len() as u64,
                new: data.len() as u64,
            })
        }
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out = Vec::new();
        // Walk from the deepest folder the prefix names.
        let base = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if base.is_empty() {
            self.root.clone()
        } else {
            self.root.join(base)
        };
        let mut stack = vec![(start, base.to_string())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", prefix, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io("list", prefix, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let ft = entry.file_type().map_err(|e| self.io("list", prefix, e))?;
                if ft.is_dir() {
                    stack.push((entry.path(), key));
                } else if key.starts_with(prefix) {
                    let meta = entry.metadata().map_err(|e| self.io("list", prefix, e))?;
                    out.push(ObjectMeta {
                        key,
                        size: meta.len(),
                        modified: meta.modified().ok(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(format!("invalid object key {key:?}"));
    }
    Ok(())
}

/// fsyncs a file or a folder.
fn sync_path(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

#[async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let this = self.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || this.put_blocking(&key, &data))
            .await
            .map_err(|e| self.io("put", "", std::io::Error::other(e)))?
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key);
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Bytes::from(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound {
                location: self.location(),
                key: key.to_string(),
            }),
            Err(e) => Err(self.io("get", key, e)),
        }
    }

    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        use tokio::io::AsyncReadExt;
        let path = self.path(key);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    location: self.location(),
                    key: key.to_string(),
                })
            }
            Err(e) => return Err(self.io("get", key, e)),
        };
        let mut out = Vec::with_capacity(len);
        file.take(len as u64)
            .read_to_end(&mut out)
            .await
            .map_err(|e| self.io("get", key, e))?;
        Ok(Bytes::from(out))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || this.list_blocking(&prefix))
            .await
            .map_err(|e| self.io("list", "", std::io::Error::other(e)))?
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key, e)),
        }
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let key = format!(".probe-{}", rand::random::<u64>());
        let path = self.path(&key);
        let this = self.clone();
        let res =
            tokio::task::spawn_blocking(move || this.probe_at(&path, |f| f.write_all(b"probe")))
                .await
                .map_err(|e| self.io("probe", &key, std::io::Error::other(e)))?;
        res.map_err(|source| StoreError::NotWritable {
            location: self.location(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn puts_are_create_only_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        s.put("a/b/x.seg", Bytes::from_static(b"one"))
            .await
            .unwrap();
        s.put("a/b/x.seg", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let err = s
            .put("a/b/x.seg", Bytes::from_static(b"two"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    existing: 3,
                    new: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            s.get("a/b/x.seg").await.unwrap(),
            Bytes::from_static(b"one")
        );
        assert!(matches!(
            s.get("nope").await,
            Err(StoreError::NotFound { .. })
        ));
        s.put("a/c.json", Bytes::from_static(b"{}")).await.unwrap();
        let keys: Vec<_> = s
            .list("a/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["a/b/x.seg", "a/c.json"]);
        let keys: Vec<_> = s
            .list("a/b")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["a/b/x.seg"]);
        s.delete("a/c.json").await.unwrap();
        s.delete("a/c.json").await.unwrap();
        assert_eq!(s.list("").await.unwrap().len(), 1);
        assert!(s.put("../evil", Bytes::new()).await.is_err());
    }

    #[tokio::test]
    async fn an_unusable_folder_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let s = LocalStore::new(file.join("repo"));
        let err = s.check_writable().await.unwrap_err();
        assert!(err.to_string().contains("repo"), "{err}");
    }

    /// What a test's sync hook saw; the hook fails while `fail` is set.
    #[derive(Clone, Default)]
    struct Syncs {
        seen: Arc<std::sync::Mutex<Vec<PathBuf>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Syncs {
        fn hook(&self) -> impl Fn(&Path) -> std::io::Result<()> + Send + Sync + 'static {
            let this = self.clone();
            move |p: &Path| {
                if this.fail.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(std::io::Error::other("injected fsync failure"));
                }
                this.seen.lock().unwrap().push(p.to_path_buf());
                sync_path(p)
            }
        }
    }

    #[tokio::test]
    async fn new_folders_are_created_level_by_level_each_parent_synced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let syncs = Syncs::default();
        let seen = &syncs.seen;
        let s = LocalStore::with_sync(&root, syncs.hook());
        s.put("segments/00000001/x.seg", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let seg = root.join("segments");
        let gen = seg.join("00000001");
        assert_eq!(
            *seen.lock().unwrap(),
            [
                dir.path().to_path_buf(),
                root.clone(),
                seg.clone(),
                // The object's own entry, after its link.
                gen.clone(),
            ],
            "each new folder's parent is synced, from the top down"
        );
        seen.lock().unwrap().clear();
        s.put("segments/00000001/y.seg", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [gen],
            "existing folders are not synced again"
        );
        // A level that is a file is reported, naming it.
        std::fs::write(root.join("plain"), b"x").unwrap();
        let err = s.create_dirs(&root.join("plain")).unwrap_err().to_string();
        assert!(
            err.contains("plain") && err.contains("not a folder"),
            "{err}"
        );
        assert!(s
            .put("plain/z.seg", Bytes::from_static(b"z"))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_identical_retry_succeeds_only_once_the_object_and_its_folder_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let syncs = Syncs::default();
        let (seen, fail) = (&syncs.seen, &syncs.fail);
        let s = LocalStore::with_sync(dir.path(), syncs.hook());
        s.put("a/x.seg", Bytes::from_static(b"one")).await.unwrap();
        seen.lock().unwrap().clear();
        s.put("a/x.seg", Bytes::from_static(b"one")).await.unwrap();
        let folder = dir.path().join("a");
        assert_eq!(*seen.lock().unwrap(), [folder.join("x.seg"), folder]);
        // The earlier attempt's bytes may not be durable: a failing fsync fails the retry.
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let err = s
            .put("a/x.seg", Bytes::from_static(b"one"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("fsync") && err.contains("a/x.seg"), "{err}");
    }

    #[test]
    fn a_failed_probe_leaves_no_probe_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path());
        let path = dir.path().join(".probe-test");
        let err = s
            .probe_at(&path, |_| Err(std::io::Error::other("disk full")))
            .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        s.probe_at(&path, |f| f.write_all(b"probe")).unwrap();
        assert!(!path.exists());
    }
}
