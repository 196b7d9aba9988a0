//! Storage classes on S3: the class of listed objects, `HeadObject`'s class and thaw state, a
//! move to another class in place (`CopyObject` onto the same key), and thaws
//! (`RestoreObject`). Each call goes through the store's retry loop and error classification.
//!
//! Why a copy in place and not tags for a bucket lifecycle rule: the move happens when
//! retention decides (a backup becomes a weekly or monthly archive), with no rule to install or
//! keep in step with the `--retain-*` flags, and on every S3-compatible store that models
//! classes; a lifecycle rule could only act on an object's age. The copy names the object's
//! server-side encryption (read by a `HEAD` just before) so it is kept, and is conditional on
//! the `ETag` that `HEAD` saw, so it never copies an object that changed meanwhile.
//!
//! One `CopyObject` moves up to 5 GiB. A larger object (above [`S3Store::copy_threshold`]) is
//! moved by a multipart copy onto itself: `CreateMultipartUpload` with the new class, the
//! object's encryption, metadata and content type (a multipart copy cannot copy them by
//! directive), then `UploadPartCopy` of consecutive byte ranges
//! ([`S3Store::copy_part_size`] each), each conditional on the `ETag` `HEAD` saw, and a
//! `CompleteMultipartUpload` conditional on it too (`If-Match`: the object still is the one
//! copied; stores that ignore the header, such as moto, get the part conditions only). A
//! completion whose answer is a precondition failure, a missing upload or unreadable is judged
//! by a `HEAD` (in the new class, the same size: done). Any other failure aborts the upload,
//! leaving the object as it was. The object's `ETag` changes (a
//! multipart one); its bytes do not.

use std::collections::BTreeMap;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, GlacierJobParameters, MetadataDirective,
    RestoreRequest, ServerSideEncryption, Tier,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::S3Store;
use crate::store::class::{Residence, StorageClass, Thaw, ThawTier};
use crate::store::{Store, StoreError};

/// The largest object one `CopyObject` copies.
pub(super) const MAX_COPY_BYTES: u64 = 5 << 30;
/// The part size of a multipart copy, unless [`S3Store::copy_part_size`] says otherwise.
pub(super) const DEFAULT_COPY_PART: u64 = 512 << 20;
/// S3's smallest part (but the last) and most parts of one upload.
const MIN_PART: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;

/// The byte ranges (first, last, inclusive) of a multipart copy of `size` bytes in parts of
/// `part` bytes (at least [`MIN_PART`], raised to fit [`MAX_PARTS`]).
fn copy_ranges(size: u64, part: u64) -> Vec<(u64, u64)> {
    let part = part.max(MIN_PART).max(size.div_ceil(MAX_PARTS));
    (0..size)
        .step_by(part as usize)
        .map(|start| (start, (start + part).min(size) - 1))
        .collect()
}

/// The SDK's value of a class.
pub(super) fn sdk_class(c: &StorageClass) -> aws_sdk_s3::types::StorageClass {
    aws_sdk_s3::types::StorageClass::from(c.as_str())
}

fn sdk_tier(t: ThawTier) -> Tier {
    match t {
        ThawTier::Expedited => Tier::Expedited,
        ThawTier::Standard => Tier::Standard,
        ThawTier::Bulk => Tier::Bulk,
    }
}

/// What a `HEAD` says of an object, for a copy in place.
struct Head {
    residence: Residence,
    size: u64,
    etag: Option<String>,
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
    metadata: Option<std::collections::HashMap<String, String>>,
    content_type: Option<String>,
}

impl S3Store {
    /// The class of every object under `prefix`, from one listing (absent: `STANDARD`).
    pub(super) async fn classes_under(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, StorageClass>, StoreError> {
        Ok(self
            .list_raw(prefix)
            .await?
            .into_iter()
            .map(|(key, o)| {
                let class = o.storage_class().map_or(StorageClass::Standard, |c| {
                    StorageClass::from_name(c.as_str())
                });
                (key, class)
            })
            .collect())
    }

    pub(super) async fn residence_of(&self, key: &str) -> Result<Residence, StoreError> {
        Ok(self.head_full(key).await?.residence)
    }

    async fn head_full(&self, key: &str) -> Result<Head, StoreError> {
        let full = self.full_key(key);
        self.retrying("HeadObject", key, || async {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(o) => Ok(Head {
                    residence: Residence {
                        class: o.storage_class().map_or(StorageClass::Standard, |c| {
                            StorageClass::from_name(c.as_str())
                        }),
                        thaw: Thaw::from_header(o.restore()),
                    },
                    size: o.content_length().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(str::to_string),
                    sse: o.server_side_encryption().cloned(),
                    kms_key_id: o.ssekms_key_id().map(str::to_string),
                    metadata: o.metadata().cloned(),
                    content_type: o.content_type().map(str::to_string),
                }),
                Err(e) => {
                    if matches!(&e, SdkError::ServiceError(s) if s.err().is_not_found()) {
                        self.check_bucket("HeadObject", key).await?;
                        return Err(StoreError::NotFound {
                            location: self.location(),
                            key: key.to_string(),
                        });
                    }
                    Err(self.classify("HeadObject", key, e).error)
                }
            }
        })
        .await
    }

    /// Moves `key` to `class` with a `CopyObject` onto itself (see the module doc); an object
    /// already in `class` is left alone.
    pub(super) async fn copy_to_class(
        &self,
        key: &str,
        class: &StorageClass,
    ) -> Result<(), StoreError> {
        let head = self.head_full(key).await?;
        if &head.residence.class == class {
            return Ok(());
        }
        if !head.residence.readable() {
            return Err(self.remote(
                "CopyObject",
                key,
                format!(
                    "the object is in {} and not thawed: it cannot be copied to {class}",
                    head.residence.class
                ),
                false,
            ));
        }
        let full = self.full_key(key);
        let source = format!("{}/{}", self.bucket, encode_path(&full));
        if head.size > self.copy_threshold.min(MAX_COPY_BYTES) {
            return self
                .multipart_copy_to_class(key, &full, &source, &head, class)
                .await;
        }
        self.retrying("CopyObject", key, || async {
            let mut req = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(&full)
                .copy_source(&source)
                .metadata_directive(MetadataDirective::Copy)
                .storage_class(sdk_class(class))
                .set_copy_source_if_match(head.etag.clone());
            // Keep the object's own encryption; with none recorded, the store's setting.
            let (sse, kms_key_id) = self.copy_sse(&head);
            req = req
                .set_server_side_encryption(sse)
                .set_ssekms_key_id(kms_key_id);
            req.send()
                .await
                .map(|_| ())
                .map_err(|e| self.classify("CopyObject", key, e).error)
        })
        .await
    }

    /// The encryption a copy of an object `head` describes names: the object's own; with none
    /// recorded, the store's setting.
    fn copy_sse(&self, head: &Head) -> (Option<ServerSideEncryption>, Option<String>) {
        match (&head.sse, &self.sse) {
            (Some(sse), _) => (Some(sse.clone()), head.kms_key_id.clone()),
            (None, super::Sse::None) => (None, None),
            (None, super::Sse::Aes256) => (Some(ServerSideEncryption::Aes256), None),
            (None, super::Sse::Kms { key_id }) => {
                (Some(ServerSideEncryption::AwsKms), key_id.clone())
            }
        }
    }

    /// Moves `key` (`full`, copy source `source`), larger than one `CopyObject` moves, to
    /// `class` with a multipart copy onto itself (see the module doc).
    async fn multipart_copy_to_class(
        &self,
        key: &str,
        full: &str,
        source: &str,
        head: &Head,
        class: &StorageClass,
    ) -> Result<(), StoreError> {
        let (sse, kms_key_id) = self.copy_sse(head);
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let upload_id = self
            .retrying("CreateMultipartUpload", key, || async {
                attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let out = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .storage_class(sdk_class(class))
                    .set_server_side_encryption(sse.clone())
                    .set_ssekms_key_id(kms_key_id.clone())
                    .set_metadata(head.metadata.clone())
                    .set_content_type(head.content_type.clone())
                    .send()
                    .await
                    .map_err(|e| self.classify("CreateMultipartUpload", key, e).error)?;
                out.upload_id().map(str::to_string).ok_or_else(|| {
                    self.remote(
                        "CreateMultipartUpload",
                        key,
                        "the response has no upload id".into(),
                        false,
                    )
                })
            })
            .await?;
        if attempts.load(std::sync::atomic::Ordering::Relaxed) > 1 {
            self.abort_orphans(key, full, &upload_id).await;
        }
        match self
            .copy_parts_and_complete(key, full, source, &upload_id, head, class)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                self.abort(key, full, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn copy_parts_and_complete(
        &self,
        key: &str,
        full: &str,
        source: &str,
        upload_id: &str,
        head: &Head,
        class: &StorageClass,
    ) -> Result<(), StoreError> {
        let ranges = copy_ranges(head.size, self.copy_part_size);
        tracing::debug!(
            key,
            bytes = head.size,
            parts = ranges.len(),
            "moving an object with a multipart copy"
        );
        let mut parts: Vec<CompletedPart> = stream::iter(ranges.into_iter().enumerate())
            .map(|(i, (first, last))| async move {
                let number = i as i32 + 1;
                self.retrying("UploadPartCopy", key, || async {
                    let out = self
                        .client
                        .upload_part_copy()
                        .bucket(&self.bucket)
                        .key(full)
                        .upload_id(upload_id)
                        .part_number(number)
                        .copy_source(source)
                        .copy_source_range(format!("bytes={first}-{last}"))
                        .set_copy_source_if_match(head.etag.clone())
                        .send()
                        .await
                        .map_err(|e| self.classify("UploadPartCopy", key, e).error)?;
                    let etag = out
                        .copy_part_result()
                        .and_then(|r| r.e_tag())
                        .map(str::to_string);
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(etag)
                        .build())
                })
                .await
            })
            .buffer_unordered(self.part_concurrency.max(1))
            .try_collect()
            .await?;
        parts.sort_by_key(|p| p.part_number());
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        self.retrying("CompleteMultipartUpload", key, || async {
            let res = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .multipart_upload(completed.clone())
                .set_if_match(head.etag.clone())
                .send()
                .await;
            match res {
                Ok(_) => Ok(()),
                Err(e) => {
                    let f = self.classify("CompleteMultipartUpload", key, e);
                    match (f.status, f.code.as_deref()) {
                        // Told apart by a HEAD: a retried completion whose first attempt did
                        // complete (412, the object's ETag is the copy's now; or NoSuchUpload),
                        // or the object changed since the HEAD; and a 200 whose body the SDK
                        // cannot read (moto roots it `CompleteMultipartUploadResponse`).
                        (Some(412) | Some(200), _) | (_, Some("NoSuchUpload")) => {
                            let now = self.head_full(key).await?;
                            if &now.residence.class == class && now.size == head.size {
                                Ok(())
                            } else {
                                Err(self.remote(
                                    "CompleteMultipartUpload",
                                    key,
                                    format!("the object changed while it was being copied to {class}; nothing was moved"),
                                    false,
                                ))
                            }
                        }
                        _ => Err(f.error),
                    }
                }
            }
        })
        .await
    }

    /// Asks for a thawed copy of `key` for `days` days (`RestoreObject`); one already under
    /// way is not an error.
    pub(super) async fn restore_object(
        &self,
        key: &str,
        tier: ThawTier,
        days: u32,
    ) -> Result<(), StoreError> {
        let full = self.full_key(key);
        let params = GlacierJobParameters::builder()
            .tier(sdk_tier(tier))
            .build()
            .map_err(|e| self.remote("RestoreObject", key, e.to_string(), false))?;
        let request = RestoreRequest::builder()
            .days(i32::try_from(days).unwrap_or(i32::MAX))
            .glacier_job_parameters(params)
            .build();
        self.retrying("RestoreObject", key, || async {
            match self
                .client
                .restore_object()
                .bucket(&self.bucket)
                .key(&full)
                .restore_request(request.clone())
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => {
                    let f = self.classify("RestoreObject", key, e);
                    if f.code.as_deref() == Some("RestoreAlreadyInProgress") {
                        Ok(())
                    } else {
                        Err(f.error)
                    }
                }
            }
        })
        .await
    }
}

/// Percent-encodes a key for `x-amz-copy-source` (`/` kept).
fn encode_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{copy_ranges, MAX_PARTS, MIN_PART};

    #[test]
    fn copy_ranges_cover_the_object_once_in_order() {
        let size = 12 * MIN_PART + 3;
        let r = copy_ranges(size, MIN_PART);
        assert_eq!(r.len(), 13);
        assert_eq!(r[0], (0, MIN_PART - 1));
        assert_eq!(*r.last().unwrap(), (12 * MIN_PART, size - 1));
        assert!(r.windows(2).all(|w| w[1].0 == w[0].1 + 1), "contiguous");
        // Below S3's minimum part size: raised to it.
        assert_eq!(copy_ranges(size, 1), r);
        // An exact multiple ends on a full part.
        assert_eq!(copy_ranges(2 * MIN_PART, MIN_PART).len(), 2);
        // 5 TiB in parts of 5 MiB would be a million parts: the part grows to fit 10,000.
        let huge = 5u64 << 40;
        let r = copy_ranges(huge, MIN_PART);
        assert!(r.len() as u64 <= MAX_PARTS, "{}", r.len());
        assert_eq!(r.last().unwrap().1, huge - 1);
    }
    #[test]
    fn copy_sources_are_percent_encoded_but_for_slashes() {
        assert_eq!(
            super::encode_path("p/basebackups/00000001-0A/tables/00000.0000.copy"),
            "p/basebackups/00000001-0A/tables/00000.0000.copy"
        );
        assert_eq!(super::encode_path("a b+c/ü"), "a%20b%2Bc/%C3%BC");
    }
}
