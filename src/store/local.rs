//! A repository in a local folder (or any mounted filesystem).
//!
//! Durability: every put writes a temporary file beside the target, fsyncs it, renames it into
//! place with a create-only link, and fsyncs the directory, so an object is either absent or
//! complete after a crash. Temporary files are named `.tmp-*` and ignored by listings.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, Store, StoreError};

/// A folder-backed store.
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
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
        if let Some(existing) = self.read_existing(key, &target)? {
            return self.compare(key, &existing, data);
        }
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| self.io("create folder for", key, e))?;
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
                return self.compare(key, &existing, data);
            }
            Err(e) => return Err(self.io("put", key, e)),
        }
        sync_dir(&dir).map_err(|e| self.io("fsync folder of", key, e))?;
        Ok(())
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
                    let size = entry
                        .metadata()
                        .map_err(|e| self.io("list", prefix, e))?
                        .len();
                    out.push(ObjectMeta { key, size });
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

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
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
        let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&this.root)?;
            let mut f = std::fs::File::create(&path)?;
            f.write_all(b"probe")?;
            f.sync_all()?;
            std::fs::remove_file(&path)
        })
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
}
