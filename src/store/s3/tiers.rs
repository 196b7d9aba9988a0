//! Storage classes on S3: the class of listed objects, `HeadObject`'s class and thaw state, a
//! move to another class in place (`CopyObject` onto the same key), and thaws
//! (`RestoreObject`). Each call goes through the store's retry loop and error classification.
//!
//! Why a copy in place and not tags for a bucket lifecycle rule: the move happens when
//! retention decides (a backup becomes a weekly or monthly archive), with no rule to install or
//! keep in step with the `--retain-*` flags, and on every S3-compatible store that models
//! classes; a lifecycle rule could only act on an object's age. The copy names the object's
//! server-side encryption (read by a `HEAD` just before) so it is kept, and is conditional on
//! the `ETag` that `HEAD` saw, so it never copies an object that changed meanwhile. One
//! `CopyObject` moves up to 5 GiB, far above a base-backup part.

use std::collections::BTreeMap;

use aws_sdk_s3::error::SdkError;
use aws_sdk_s3::types::{
    GlacierJobParameters, MetadataDirective, RestoreRequest, ServerSideEncryption, Tier,
};

use super::S3Store;
use crate::store::class::{Residence, StorageClass, Thaw, ThawTier};
use crate::store::{Store, StoreError};

/// The largest object one `CopyObject` copies.
const MAX_COPY_BYTES: i64 = 5 << 30;

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
    size: i64,
    etag: Option<String>,
    sse: Option<ServerSideEncryption>,
    kms_key_id: Option<String>,
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
                    size: o.content_length().unwrap_or(0),
                    etag: o.e_tag().map(str::to_string),
                    sse: o.server_side_encryption().cloned(),
                    kms_key_id: o.ssekms_key_id().map(str::to_string),
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
        if head.size > MAX_COPY_BYTES {
            return Err(self.remote(
                "CopyObject",
                key,
                format!(
                    "{} bytes is above the 5 GiB one CopyObject moves; tidemark does not write objects that large",
                    head.size
                ),
                false,
            ));
        }
        let full = self.full_key(key);
        let source = format!("{}/{}", self.bucket, encode_path(&full));
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
            req = match (&head.sse, &self.sse) {
                (Some(sse), _) => req
                    .server_side_encryption(sse.clone())
                    .set_ssekms_key_id(head.kms_key_id.clone()),
                (None, super::Sse::None) => req,
                (None, super::Sse::Aes256) => {
                    req.server_side_encryption(ServerSideEncryption::Aes256)
                }
                (None, super::Sse::Kms { key_id }) => req
                    .server_side_encryption(ServerSideEncryption::AwsKms)
                    .set_ssekms_key_id(key_id.clone()),
            };
            req.send()
                .await
                .map(|_| ())
                .map_err(|e| self.classify("CopyObject", key, e).error)
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
    #[test]
    fn copy_sources_are_percent_encoded_but_for_slashes() {
        assert_eq!(
            super::encode_path("p/basebackups/00000001-0A/tables/00000.0000.copy"),
            "p/basebackups/00000001-0A/tables/00000.0000.copy"
        );
        assert_eq!(super::encode_path("a b+c/ü"), "a%20b%2Bc/%C3%BC");
    }
}
