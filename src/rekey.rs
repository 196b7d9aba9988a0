//! `tidemark rekey` and the check behind `tidemark keys retire` (`proto/encryption.md`,
//! "Rekey and retire").
//!
//! Rekey moves every encrypted object's data key to the keyring's current key without
//! rewriting the object: objects are create-only and their chunks bind their name, so the
//! object's 80-byte header is rewrapped and stored beside it as a sidecar,
//! `rekeyed/<current key id>/<object key>` ([`keys::rekeyed`]). Readers that lack the key of
//! an object's own header use the sidecar of the newest key they hold
//! ([`crate::object::get_object_with`]).
//!
//! Owns: which objects need a sidecar, writing them (create-only, encoded once), going on
//! after an interruption (an object whose sidecar under the current key is listed is skipped),
//! and the passes that catch objects written meanwhile. Beside a running archiver: it seals
//! each object with the keyring it has read last (it reads the file again when it changes),
//! so after `keys add` its objects already use the new key; an object it sealed just before
//! with the old key is listed by the next pass, which rekeys it. Rekey ends when a pass finds
//! nothing to do; passes that keep finding new objects of old keys mean a writer uses an older
//! copy of the keyring ([`RekeyError::StillWritten`]).
//!
//! An object it cannot move (damaged, or of a key neither the keyring nor a sidecar holds) does
//! not stop it: it moves every other object, counts the ones it could not, and then fails
//! ([`RekeyError::Incomplete`], with the first one's error) — a rerun after the fix has only
//! those left. A failing store stops it at once. Either way the caller gets what was done
//! ([`RekeyFailed::summary`]), which `tidemark rekey` records in the audit trail.
//!
//! Does not own the envelope ([`crate::crypt::envelope::rewrap`]) nor deleting sidecars with
//! their objects ([`crate::catalog::expire::delete`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::catalog::keys::{self, Key};
use crate::crypt::envelope::{self, Header, OpenError, HEADER_LEN};
use crate::crypt::{KeyId, Keyring};
use crate::object::{self, Plain};
use crate::store::{ObjectMeta, Store, StoreError};

/// Passes over the repository before rekey gives up on objects that keep appearing.
pub const MAX_PASSES: u32 = 4;

/// Errors of rekey and of the retire check.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object none of whose headers (its own, its sidecars) names a key of the keyring.
    #[error("object {object} is encrypted with key {key_id}, which is not in the keyring (nor is the key of any of its rekeyed headers)\nHINT: rekey with a keyring that still holds key {key_id}; a key is retired only after rekey moved every object off it")]
    KeyMissing { object: String, key_id: String },
    /// An object whose header or sidecar does not parse or authenticate.
    #[error("object {object}: {detail}\nHINT: the object is damaged; `tidemark list` shows what the archive can still restore")]
    Damaged { object: String, detail: String },
    /// `keys retire` of a key some object still needs.
    #[error("key {key_id} still opens {count} object(s) that no other key of the keyring opens (e.g. {example}); retiring it would make them unreadable\nHINT: run `tidemark rekey --repo REPO --encryption-key-file KEYRING` first, then retire the key")]
    StillNeeded {
        key_id: String,
        count: usize,
        example: String,
    },
    /// `keys retire` found, after the key left the keyring, an object stored meanwhile that
    /// only it opens (a store already under way); the key was put back.
    #[error("key {key_id} was put back into the keyring: {count} object(s) that only it opens were stored while retire waited (e.g. {example}), by a writer that sealed them before it had the new key\nHINT: run `tidemark rekey` again, then retire the key again")]
    StoredMeanwhile {
        key_id: String,
        count: usize,
        example: String,
    },
    /// `keys retire` without the repository to check.
    #[error("retiring key {key_id} needs the repository, to check that no object needs it any more\nHINT: pass --repo REPO (after `tidemark rekey` of that repository)")]
    RetireUnchecked { key_id: String },
    /// `keys retire` of the key that writes, or of a key not in the keyring.
    #[error("cannot retire key {key_id}: {why}\nHINT: `tidemark keys list --keyring KEYRING` shows the keys; `keys add` makes a new writing key")]
    NotRetirable { key_id: String, why: &'static str },
    #[error("objects under older keys were still being written after {passes} passes (the last: {example})\nHINT: a writer (an archiver on another host?) uses an older copy of the keyring: give it the keyring with the new key, then run rekey again")]
    StillWritten { passes: u32, example: String },
    /// Some objects could not be moved (every other one was); `first` is the first one's error.
    #[error(
        "{failed} object(s) could not be rekeyed (every other object was); the first: {first}"
    )]
    Incomplete { failed: u64, first: Box<RekeyError> },
}

/// A rekey that failed, with what it did before and beside its failure. Shows as its error
/// (the same message and causes).
#[derive(Debug)]
pub struct RekeyFailed {
    /// What was done: the sidecars written stay valid (a rerun skips them).
    pub summary: RekeySummary,
    pub error: RekeyError,
}

impl std::fmt::Display for RekeyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for RekeyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl crate::error::Classify for RekeyFailed {
    fn exit_status(&self) -> crate::error::ExitStatus {
        self.error.exit_status()
    }
}

impl crate::error::Classify for RekeyError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            RekeyError::Store(e) => e.exit_status(),
            RekeyError::KeyMissing { .. }
            | RekeyError::StillNeeded { .. }
            | RekeyError::StoredMeanwhile { .. }
            | RekeyError::RetireUnchecked { .. }
            | RekeyError::NotRetirable { .. } => Usage,
            RekeyError::Damaged { .. } => Damaged,
            RekeyError::StillWritten { .. } => Repository,
            RekeyError::Incomplete { first, .. } => first.exit_status(),
        }
    }
}

/// What a rekey did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RekeySummary {
    /// The key every object can now be opened with.
    pub key: String,
    /// Encrypted objects of the repository (the last pass's listing).
    pub objects: u64,
    /// Sidecars written by this run.
    pub rewrapped: u64,
    /// Objects skipped: already under the key (their own header, or a sidecar of an earlier
    /// run).
    pub already: u64,
    /// Bytes this run wrote (its sidecars).
    pub bytes_written: u64,
    /// Bytes the repository stores (the last listing, sidecars included).
    pub bytes_stored: u64,
    pub passes: u32,
    /// Objects that could not be moved (damaged, or of a key the keyring lacks).
    pub failed: u64,
    /// The first [`MAX_FAILED_NAMED`] of them.
    pub failed_objects: Vec<String>,
}

/// How many of the objects a rekey could not move it names.
pub const MAX_FAILED_NAMED: usize = 10;

/// Whether the object under `key` is an envelope in an encrypted repository: every archive
/// object but the identity (writer leases, sidecars and unknown names are not archive objects).
pub fn is_encrypted_object(key: &str) -> bool {
    matches!(Key::parse(key), Some(k) if k != Key::Identity)
}

/// The sidecars of a listing: object key to the key ids of its sidecars.
pub fn sidecars(objects: &[ObjectMeta]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in objects {
        if let Some((id, object)) = keys::parse_rekeyed(&o.key) {
            out.entry(object.to_string())
                .or_default()
                .insert(id.to_string());
        }
    }
    out
}

/// The objects of a listing that a rekey to `current` must still look at: encrypted objects
/// without a sidecar of `current`. Pure: what makes a rerun skip what an earlier one did.
pub fn pending<'a>(objects: &'a [ObjectMeta], current: &str) -> Vec<&'a ObjectMeta> {
    let side = sidecars(objects);
    objects
        .iter()
        .filter(|o| is_encrypted_object(&o.key))
        .filter(|o| !side.get(&o.key).is_some_and(|ids| ids.contains(current)))
        .collect()
}

/// Moves every encrypted object of `store` to `keyring`'s current key (see the module doc).
pub async fn rekey(store: &Arc<dyn Store>, keyring: &Keyring) -> Result<RekeySummary, RekeyFailed> {
    let mut summary = RekeySummary {
        key: keyring.current().id.to_string(),
        ..RekeySummary::default()
    };
    match passes(store, keyring, &mut summary).await {
        Ok(()) => Ok(summary),
        Err(error) => Err(RekeyFailed { summary, error }),
    }
}

/// Whether `e` is about one object (rekey goes on with the others) rather than the store.
fn is_per_object(e: &RekeyError) -> bool {
    matches!(
        e,
        RekeyError::KeyMissing { .. } | RekeyError::Damaged { .. }
    )
}

/// The passes of [`rekey`], counting into `summary` as they go.
async fn passes(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    summary: &mut RekeySummary,
) -> Result<(), RekeyError> {
    let current = keyring.current();
    let current_id = current.id.to_string();
    // Objects already found under the current key by their own header (no sidecar needed),
    // and objects that could not be moved (not tried again by a later pass).
    let mut native: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut first_failure: Option<RekeyError> = None;
    for pass in 1..=MAX_PASSES + 1 {
        let objects = store.list("").await?;
        summary.objects = objects
            .iter()
            .filter(|o| is_encrypted_object(&o.key))
            .count() as u64;
        summary.bytes_stored = objects.iter().map(|o| o.size).sum();
        let side = sidecars(&objects);
        let todo: Vec<&ObjectMeta> = pending(&objects, &current_id)
            .into_iter()
            .filter(|o| !native.contains(&o.key) && !failed.contains(&o.key))
            .collect();
        if pass == 1 {
            summary.already = (summary.objects as usize - todo.len()) as u64;
        }
        let mut wrote = 0u64;
        let mut last = None;
        for o in todo {
            let moved = match readable_header(store, keyring, &o.key, &side).await {
                Ok((head, opener)) if opener == current.id && head.key_id == current.id => {
                    native.insert(o.key.clone());
                    summary.already += 1;
                    continue;
                }
                Ok(_) if pass > MAX_PASSES => {
                    return Err(RekeyError::StillWritten {
                        passes: MAX_PASSES,
                        example: o.key.clone(),
                    });
                }
                Ok((head, opener)) => move_one(store, keyring, &o.key, &head, &opener).await,
                Err(e) => Err(e),
            };
            match moved {
                Ok(Some(bytes)) => {
                    wrote += 1;
                    summary.bytes_written += bytes;
                }
                Ok(None) => summary.already += 1,
                Err(e) if is_per_object(&e) => {
                    tracing::warn!(object = %o.key, "cannot rekey: {e}");
                    failed.insert(o.key.clone());
                    summary.failed += 1;
                    if summary.failed_objects.len() < MAX_FAILED_NAMED {
                        summary.failed_objects.push(o.key.clone());
                    }
                    first_failure.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            last = Some(o.key.clone());
        }
        summary.rewrapped += wrote;
        summary.passes = pass;
        if last.is_none() {
            break;
        }
        tracing::info!(pass, rewrapped = wrote, key = %current_id, "rekey pass done; listing again for objects written meanwhile");
    }
    match first_failure {
        None => Ok(()),
        Some(first) => Err(RekeyError::Incomplete {
            failed: summary.failed,
            first: Box::new(first),
        }),
    }
}

/// Stores the sidecar of `object` under the current key, its data key unwrapped from `head`
/// with key `opener`: the bytes written, or None when another rekey stored it first.
async fn move_one(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    object: &str,
    head: &Header,
    opener: &KeyId,
) -> Result<Option<u64>, RekeyError> {
    let current = keyring.current();
    let old = keyring.get(opener).expect("readable_header names a key");
    let new = envelope::rewrap(
        &old.secret,
        &current.secret,
        current.id,
        object,
        &head.to_bytes(),
    )
    .map_err(|e| damaged(object, e))?;
    let sidecar = keys::rekeyed(&current.id.to_string(), object);
    // Encoded once: a retry of the put re-sends these bytes (the wrap nonce is random).
    let encoded = object::encode_with(&Plain, sidecar.clone(), Bytes::copy_from_slice(&new));
    match encoded.put(&**store).await {
        Ok(()) => Ok(Some(new.len() as u64)),
        // Another rekey stored one first: as good, once it is checked.
        Err(StoreError::Conflict { .. }) => {
            check_sidecar(store, keyring, object, &sidecar).await?;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The header of `object` that this keyring opens, and the key that opens it: the object's
/// own header when its key is in the keyring, else its sidecar of the newest key held.
async fn readable_header(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    object: &str,
    side: &BTreeMap<String, BTreeSet<String>>,
) -> Result<(Header, KeyId), RekeyError> {
    let own = store.get_head(object, HEADER_LEN).await?;
    let head = Header::parse(&own).map_err(|e| damaged(object, e))?;
    if keyring.get(&head.key_id).is_some() {
        let id = head.key_id;
        return Ok((head, id));
    }
    for k in keyring.keys().iter().rev() {
        let id = k.id.to_string();
        if side.get(object).is_some_and(|ids| ids.contains(&id)) {
            let bytes = store.get(&keys::rekeyed(&id, object)).await?;
            let sidecar = Header::parse(&bytes).map_err(|e| damaged(object, e))?;
            return Ok((sidecar, k.id));
        }
    }
    Err(RekeyError::KeyMissing {
        object: object.to_string(),
        key_id: head.key_id.to_string(),
    })
}

/// Checks that the sidecar stored under `sidecar` opens `object`'s data key.
async fn check_sidecar(
    store: &Arc<dyn Store>,
    keyring: &Keyring,
    object: &str,
    sidecar: &str,
) -> Result<(), RekeyError> {
    let bytes = store.get(sidecar).await?;
    let head = Header::parse(&bytes).map_err(|e| damaged(sidecar, e))?;
    let k = keyring
        .get(&head.key_id)
        .ok_or_else(|| RekeyError::KeyMissing {
            object: sidecar.to_string(),
            key_id: head.key_id.to_string(),
        })?;
    // Rewrapping to the same key proves the wrapped data key authenticates under `object`.
    envelope::rewrap(&k.secret, &k.secret, k.id, object, &bytes)
        .map_err(|e| damaged(sidecar, e))?;
    Ok(())
}

fn damaged(object: &str, e: OpenError) -> RekeyError {
    RekeyError::Damaged {
        object: object.to_string(),
        detail: e.to_string(),
    }
}

/// The encrypted objects of `store` that only key `id` opens, given the keys a retire keeps
/// (`kept`): neither their own header nor any sidecar names a kept key. What `keys retire`
/// refuses on. Reads the header only of objects without a sidecar of a kept key.
pub async fn needing_only(
    store: &Arc<dyn Store>,
    id: &KeyId,
    kept: &[KeyId],
) -> Result<Vec<String>, RekeyError> {
    let objects = store.list("").await?;
    let side = sidecars(&objects);
    let kept: BTreeSet<String> = kept.iter().map(KeyId::to_string).collect();
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| is_encrypted_object(&o.key)) {
        if side
            .get(&o.key)
            .is_some_and(|ids| ids.iter().any(|i| kept.contains(i)))
        {
            continue;
        }
        let own = store.get_head(&o.key, HEADER_LEN).await?;
        let head = Header::parse(&own).map_err(|e| damaged(&o.key, e))?;
        if head.key_id == *id {
            out.push(o.key.clone());
        }
    }
    Ok(out)
}

/// `tidemark keys retire`: removes key `id` from the keyring file at `path` once `store` (the
/// repository it encrypts) holds no object that only `id` opens. Without a repository nothing
/// can be checked, and nothing is removed. Returns the keys that remain.
///
/// A writer may have sealed an object with `id` before it read the keyring with the new key
/// and be storing it still, within one store call (the archiver checks before each attempt
/// that the key is still held, [`crate::object::Codec::missing_key`], but not during one). So
/// once the key is out of the file, retire waits `settle` (longer than a store call with its
/// retries) and checks the repository again: an object stored meanwhile that only `id` opens
/// puts the key back ([`RekeyError::StoredMeanwhile`]).
pub async fn retire(
    path: &std::path::Path,
    id: &str,
    store: Option<&Arc<dyn Store>>,
    settle: std::time::Duration,
) -> anyhow::Result<Keyring> {
    let mut keyring = Keyring::load(path)?;
    let key_id = KeyId::parse(id).ok_or_else(|| RekeyError::NotRetirable {
        key_id: id.to_string(),
        why: "not a key id (16 lower-case hex digits)",
    })?;
    let mut kept = keyring.clone();
    kept.remove(&key_id).map_err(|e| RekeyError::NotRetirable {
        key_id: id.to_string(),
        why: match e {
            crate::crypt::RemoveError::Current => {
                "it is the current key, which encrypts new objects"
            }
            crate::crypt::RemoveError::Absent => "the keyring has no such key",
        },
    })?;
    let Some(store) = store else {
        return Err(RekeyError::RetireUnchecked {
            key_id: id.to_string(),
        }
        .into());
    };
    let others: Vec<KeyId> = kept.keys().iter().map(|k| k.id).collect();
    let needing = needing_only(store, &key_id, &others).await?;
    if let Some(example) = needing.first() {
        return Err(RekeyError::StillNeeded {
            key_id: id.to_string(),
            count: needing.len(),
            example: example.clone(),
        }
        .into());
    }
    let at = keyring
        .keys()
        .iter()
        .position(|k| k.id == key_id)
        .expect("checked above");
    let removed = keyring.remove(&key_id).expect("checked above");
    keyring.replace(path)?;
    if settle.is_zero() {
        return Ok(keyring);
    }
    tracing::warn!(key = id, settle = ?settle, "key removed from the keyring; waiting for stores already under way, then checking the repository again");
    tokio::time::sleep(settle).await;
    let needing = needing_only(store, &key_id, &others).await?;
    if let Some(example) = needing.first() {
        let mut back = Keyring::load(path)?;
        back.reinstate(at, removed);
        back.replace(path)?;
        return Err(RekeyError::StoredMeanwhile {
            key_id: id.to_string(),
            count: needing.len(),
            example: example.clone(),
        }
        .into());
    }
    Ok(keyring)
}

#[cfg(test)]
mod tests;
