//! A repository in an S3 bucket (AWS S3, or an S3-compatible store: MinIO, Ceph, GCS's XML API).
//!
//! URL: `s3://BUCKET[/PREFIX]`; archive keys are joined under `PREFIX/`.
//!
//! Create-only puts (see [`crate::store`]): a `PutObject` carries `If-None-Match: *`; a `412
//! Precondition Failed` means the key exists, so the object is read back and compared: identical
//! bytes are a successful (idempotent) put, different bytes are [`StoreError::Conflict`]. The same
//! check covers a retried put whose first attempt did land before the connection dropped. A store
//! that answers `501 Not Implemented` to the conditional header is remembered and from then on
//! gets a `HEAD` before each `PUT` (racy, but still refuses an overwrite in the common case). A put
//! returns `Ok` only after S3 acknowledged it, and S3 acknowledges only durably stored objects.
//!
//! Large objects (base-backup tables) above [`S3Store::multipart_threshold`] go up as a multipart
//! upload, parts uploaded concurrently (bounded by [`S3Store::part_concurrency`]); any failure
//! aborts the upload (`AbortMultipartUpload`), so no half-written upload is left behind, and the
//! completion is conditional (`If-None-Match: *`) like a single put. A `CreateMultipartUpload`
//! that needed a retry may have created an upload whose answer was lost: those uploads of the key
//! are listed and aborted. A retried completion answered `NoSuchUpload` checks whether the object
//! landed. On AWS each part carries a CRC32 that the completion lists; with `--s3-endpoint` the
//! SDK's flexible checksums are off (many S3-compatible stores reject their aws-chunked bodies)
//! and SigV4's payload hash protects each request.
//!
//! Server-side encryption: every `PutObject` and `CreateMultipartUpload` sends
//! `x-amz-server-side-encryption` (`AES256` by default, or `aws:kms` with an optional key id), because
//! bucket policies that deny unencrypted writes are common. `--s3-sse none` sends no header, for
//! stores that reject it.
//!
//! Retries: the SDK's own retries are off (one attempt per call) and this module retries each
//! operation itself ([`crate::retry`]: exponential backoff with full jitter) on what retrying
//! can fix: throttling (`503 SlowDown`), other 5xx, `429`, timeouts, refused or dropped
//! connections, truncated bodies (a `GetObject` whose body breaks mid-way is retried whole: the
//! SDK does not retry a body). The number of attempts and the total time are bounded
//! ([`RetryPolicy`]), and connect/read timeouts are set (and the SDK's stalled-stream protection
//! is on), so a retryable error comes back within tens of seconds, never hangs; the archiver
//! then retries on its own schedule. What retrying cannot fix — no such bucket, access
//! denied, unknown access key, bad signature — fails at once with a message naming the bucket,
//! the operation and a HINT.
//!
//! Credentials and region come from the standard AWS chain (environment, shared config and
//! credentials files, web identity, ECS/EC2 metadata). `--s3-endpoint` (or `AWS_ENDPOINT_URL`)
//! points at an S3-compatible store; path-style addressing is then the default.
//!
//! TLS: HTTPS with the system's trusted roots, or with `--s3-ca-bundle` / `AWS_CA_BUNDLE` (a
//! PEM file checked when the store opens) in their place for a private CA.
//!
//! Build choices (compile time on small CI machines): `aws-config`/`aws-sdk-s3` without default
//! features (no SSO, no SigV4a, no aws-lc), and an HTTPS client built here with rustls on `ring`.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, ServerSideEncryption,
};
use aws_sdk_s3::Client;
use aws_smithy_types::retry::ErrorKind;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::class::{Residence, StorageClass, ThawTier};
use super::{ObjectMeta, Store, StoreError};
use crate::retry;

mod tiers;

/// Server-side encryption requested on every write.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Sse {
    /// No header (the bucket's default encryption applies; GCS always encrypts at rest).
    None,
    /// `x-amz-server-side-encryption: AES256` (SSE-S3).
    #[default]
    Aes256,
    /// `x-amz-server-side-encryption: aws:kms`, with a key id or the account's default key.
    Kms { key_id: Option<String> },
}

impl Sse {
    /// Parses `--s3-sse` (`AES256`, `aws:kms`, `none`) with `--s3-sse-kms-key-id`.
    pub fn parse(value: &str, kms_key_id: Option<&str>) -> Result<Sse, String> {
        let sse = match value.to_ascii_lowercase().as_str() {
            "aes256" => Sse::Aes256,
            "aws:kms" | "kms" => Sse::Kms {
                key_id: kms_key_id.map(str::to_string),
            },
            "none" | "" => Sse::None,
            _ => {
                return Err(format!(
                    "--s3-sse {value:?}: use AES256 (the default), aws:kms (with --s3-sse-kms-key-id for a specific key) or none"
                ))
            }
        };
        if kms_key_id.is_some() && !matches!(sse, Sse::Kms { .. }) {
            return Err("--s3-sse-kms-key-id needs --s3-sse aws:kms".into());
        }
        Ok(sse)
    }
}

/// How an S3 repository is reached (the `--s3-*` flags).
#[derive(Clone, Default)]
pub struct S3Options {
    /// Endpoint of an S3-compatible store (`http://127.0.0.1:9000`); `None`: AWS (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Region; `None`: the AWS chain, else `us-east-1` when an endpoint is set.
    pub region: Option<String>,
    /// Server-side encryption for writes.
    pub sse: Sse,
    /// Path-style addressing; `None`: on when an endpoint is set.
    pub path_style: Option<bool>,
    /// Fixed credentials instead of the AWS chain (for embedding and tests): key id, secret.
    pub credentials: Option<(String, String)>,
    /// PEM file of the CA certificates to trust instead of the system's roots
    /// (`--s3-ca-bundle`); `None`: `AWS_CA_BUNDLE`, else the system's roots.
    pub ca_bundle: Option<PathBuf>,
    /// Storage class of new objects (`--s3-storage-class`); `None`: `STANDARD` (no header sent).
    pub storage_class: Option<StorageClass>,
}

impl fmt::Debug for S3Options {
    /// The secret access key prints `[redacted]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("sse", &self.sse)
            .field("path_style", &self.path_style)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(id, _)| format!("{id}:[redacted]")),
            )
            .field("ca_bundle", &self.ca_bundle)
            .field("storage_class", &self.storage_class)
            .finish()
    }
}

/// The CA bundle to trust: `--s3-ca-bundle`, else a non-empty `AWS_CA_BUNDLE` (as the AWS CLI,
/// it replaces the system's roots), read and checked once so a bad file is named at start.
fn ca_bundle(opts: &S3Options) -> Result<Option<Vec<u8>>, StoreError> {
    let path = opts.ca_bundle.clone().or_else(|| {
        std::env::var_os("AWS_CA_BUNDLE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    path.map(|p| {
        crate::tls::load_ca_bundle(&p).map_err(|e| {
            StoreError::InvalidUrl(format!(
                "{e}\nHINT: name a PEM file of the CA certificates that sign the S3 endpoint's certificate"
            ))
        })
    })
    .transpose()
}

/// Bounds of this module's own retry loop around each S3 call.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per operation, the first included.
    pub max_attempts: u32,
    /// First backoff; doubled per attempt, with full jitter.
    pub base_delay: Duration,
    /// Cap of one backoff.
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first.
    pub max_elapsed: Duration,
}

impl RetryPolicy {
    /// As the shared retry loop takes it: full jitter over `base_delay` doubling to `max_delay`.
    pub fn policy(&self) -> retry::Policy {
        retry::Policy {
            backoff: retry::Backoff::new(self.base_delay, self.max_delay)
                .jitter(retry::Jitter::Full),
            max_attempts: Some(self.max_attempts),
            max_elapsed: Some(self.max_elapsed),
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

/// An S3-backed store.
#[derive(Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Key prefix without a trailing slash; empty for the bucket's root.
    prefix: String,
    sse: Sse,
    /// Objects larger than this go up as a multipart upload.
    pub multipart_threshold: usize,
    /// Size of each part but the last (S3's minimum is 5 MiB).
    pub part_size: usize,
    /// Parts uploaded at once.
    pub part_concurrency: usize,
    /// This module's retry loop.
    pub retry: RetryPolicy,
    /// Send CRC32 checksums with parts and the completion (AWS; S3-compatible stores often
    /// reject the SDK's flexible checksums, so they are off with `--s3-endpoint`).
    pub multipart_checksums: bool,
    /// Set once the store answered 501 to `If-None-Match`: HEAD before PUT from then on.
    no_conditional_put: AtomicBool,
    /// Storage class of new objects; `None`: the bucket's default (`STANDARD`), no header.
    pub storage_class: Option<StorageClass>,
    /// A move to another class copies objects larger than this with a multipart copy
    /// (`UploadPartCopy`), the others with one `CopyObject` (at most 5 GiB).
    pub copy_threshold: u64,
    /// Size of each part of such a multipart copy but the last (at least 5 MiB; raised when the
    /// object would need more than 10,000 parts).
    pub copy_part_size: u64,
}

/// Parses `s3://BUCKET[/PREFIX]` into bucket and prefix (no leading or trailing slash).
pub fn parse_url(url: &str) -> Result<(String, String), StoreError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::InvalidUrl(format!("{url:?}: not an s3:// URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric();
    if !valid_bucket {
        return Err(StoreError::InvalidUrl(format!(
            "{url:?}: {bucket:?} is not a valid bucket name (3 to 63 lowercase letters, digits, '-' and '.'); use s3://BUCKET/PREFIX"
        )));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
        return Err(StoreError::InvalidUrl(format!(
            "{url:?}: the prefix {prefix:?} has an empty, '.' or '..' part"
        )));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// What went wrong with one attempt, before it becomes a [`StoreError`].
struct Failure {
    status: Option<u16>,
    code: Option<String>,
    error: StoreError,
}

impl S3Store {
    /// Connects to `s3://BUCKET[/PREFIX]`: loads the AWS configuration (credentials, region) and
    /// builds the client. Makes no request.
    pub async fn connect(url: &str, opts: &S3Options) -> Result<S3Store, StoreError> {
        let (bucket, prefix) = parse_url(url)?;
        let (config, endpoint_set) = load_config(url, opts).await?;
        let mut store =
            S3Store::from_client(Client::from_conf(config), bucket, prefix, opts.sse.clone());
        store.multipart_checksums = !endpoint_set;
        store.storage_class = opts.storage_class.clone();
        Ok(store)
    }

    /// A store over an already configured client.
    pub fn from_client(client: Client, bucket: String, prefix: String, sse: Sse) -> S3Store {
        S3Store {
            client,
            bucket,
            prefix: prefix.trim_matches('/').to_string(),
            sse,
            multipart_threshold: 16 << 20,
            part_size: 8 << 20,
            part_concurrency: 4,
            retry: RetryPolicy::default(),
            multipart_checksums: true,
            no_conditional_put: AtomicBool::new(false),
            storage_class: None,
            copy_threshold: tiers::MAX_COPY_BYTES,
            copy_part_size: tiers::DEFAULT_COPY_PART,
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The SDK client (for tests and tools).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The full S3 key of an archive key.
    pub fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        }
    }

    fn relative_key<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(&self.prefix)?.strip_prefix('/')
        }
    }

    fn remote(&self, op: &'static str, key: &str, message: String, retryable: bool) -> StoreError {
        StoreError::Remote {
            location: self.location(),
            op,
            key: key.to_string(),
            message,
            retryable,
        }
    }

    /// Sorts an SDK error into retryable or not, with a message that says what to check.
    fn classify<E>(&self, op: &'static str, key: &str, err: SdkError<E>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        // A service error says it best with its code and message; the rest with their causes.
        let detail = match &err {
            SdkError::ServiceError(_) => err.message().unwrap_or("(no message)").to_string(),
            _ => crate::error::chain(&err),
        };
        let (retryable, hint) = match &err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => (true, None),
            // Refused, reset or closed connections, timeouts, and what the HTTP client itself
            // calls transient (a connection closed before the response).
            SdkError::DispatchFailure(d)
                if d.is_io()
                    || d.is_timeout()
                    || matches!(
                        d.as_other(),
                        Some(
                            ErrorKind::TransientError
                                | ErrorKind::ThrottlingError
                                | ErrorKind::ServerError
                        )
                    ) =>
            {
                (true, Some(ENDPOINT_HINT))
            }
            // Everything else before a response: no credentials, a malformed endpoint.
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => {
                (false, Some(CREDENTIALS_HINT))
            }
            _ => match (status, code.as_deref()) {
                (
                    _,
                    Some(
                        "SlowDown"
                        | "InternalError"
                        | "ServiceUnavailable"
                        | "RequestTimeout"
                        | "RequestTimeTooSkewed"
                        | "ConditionalRequestConflict"
                        | "OperationAborted"
                        | "Throttling"
                        | "ThrottlingException"
                        | "RequestLimitExceeded",
                    ),
                ) => (true, None),
                (Some(s), _) if s >= 500 || s == 429 || s == 408 => (true, None),
                (_, Some("NoSuchBucket")) => (false, Some(BUCKET_HINT)),
                (_, Some("InvalidObjectState" | "ObjectNotInActiveTierError")) => {
                    (false, Some(COLD_HINT))
                }
                (
                    _,
                    Some(
                        "InvalidAccessKeyId"
                        | "SignatureDoesNotMatch"
                        | "NotSignedUp"
                        | "ExpiredToken"
                        | "InvalidToken"
                        | "TokenRefreshRequired",
                    ),
                ) => (false, Some(CREDENTIALS_HINT)),
                (Some(301), _)
                | (_, Some("PermanentRedirect" | "AuthorizationHeaderMalformed")) => {
                    (false, Some(REGION_HINT))
                }
                (Some(403), _) => (false, Some(POLICY_HINT)),
                (Some(404), None) => (false, Some(BUCKET_HINT)),
                _ => (false, None),
            },
        };
        let mut message = match (&code, status) {
            (Some(c), Some(s)) => format!("{c} (HTTP {s}): {detail}"),
            (None, Some(s)) => format!("HTTP {s}: {detail}"),
            _ => detail,
        };
        if let Some(h) = hint {
            message.push_str("\nHINT: ");
            message.push_str(&h.replace("{bucket}", &self.bucket));
        }
        Failure {
            status,
            code,
            error: self.remote(op, key, message, retryable),
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retry budget is spent.
    async fn retrying<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        // Store calls take no cancellation token: the budget bounds each call instead.
        let never = CancellationToken::new();
        let on_retry = |e: &StoreError, r: retry::Retrying| {
            tracing::debug!(op, key, attempt = r.attempt, delay = ?r.delay, "retrying: {e}");
        };
        match retry::retry(
            &self.retry.policy(),
            &never,
            StoreError::is_retryable,
            on_retry,
            attempt,
        )
        .await
        {
            Ok(v) => Ok(v),
            Err(retry::RetryError::Exhausted { last, attempts }) => {
                tracing::debug!(op, key, attempts, "giving up: {last}");
                Err(last)
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    fn sse_put(
        &self,
        b: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        match &self.sse {
            Sse::None => b,
            Sse::Aes256 => b.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms { key_id } => b
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
        }
    }

    /// One `PutObject` attempt: `Ok(true)` created, `Ok(false)` the key exists.
    async fn put_once(
        &self,
        op: &'static str,
        full: &str,
        key: &str,
        data: &Bytes,
    ) -> Result<bool, StoreError> {
        let conditional = !self.no_conditional_put.load(Ordering::Relaxed);
        if !conditional && self.head_once(key).await?.is_some() {
            return Ok(false);
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .content_length(data.len() as i64)
            .body(ByteStream::from(data.clone()));
        if conditional {
            req = req.if_none_match("*");
        }
        req = req.set_storage_class(self.storage_class.as_ref().map(tiers::sdk_class));
        match self.sse_put(req).send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let f = self.classify(op, key, e);
                match (f.status, f.code.as_deref()) {
                    (Some(412), _) => Ok(false),
                    (Some(501), _) | (_, Some("NotImplemented")) if conditional => {
                        tracing::warn!(
                            "{}: the store does not support conditional writes (If-None-Match); checking for existing objects before each write instead",
                            self.location()
                        );
                        self.no_conditional_put.store(true, Ordering::Relaxed);
                        Err(self.remote(op, key, "retrying without If-None-Match".into(), true))
                    }
                    _ => Err(f.error),
                }
            }
        }
    }

    /// `HEAD`, retried: the object's size, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.retrying("HeadObject", key, || self.head_once(key))
            .await
    }

    async fn head_once(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let full = self.full_key(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => {
                let not_found = matches!(&e, SdkError::ServiceError(s) if s.err().is_not_found());
                if not_found {
                    // A HEAD of an object in a missing bucket is a 404 too; tell them apart.
                    self.check_bucket("HeadObject", key).await?;
                    return Ok(None);
                }
                Err(self.classify("HeadObject", key, e).error)
            }
        }
    }

    async fn check_bucket(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = self.classify(op, key, e);
                if f.status == Some(404) {
                    Err(self.remote(
                        op,
                        key,
                        format!(
                            "NoSuchBucket: the bucket does not exist\nHINT: {}",
                            BUCKET_HINT.replace("{bucket}", &self.bucket)
                        ),
                        false,
                    ))
                } else {
                    Err(f.error)
                }
            }
        }
    }

    /// Compares an existing object with the bytes a put offered.
    async fn compare_existing(&self, key: &str, data: &Bytes) -> Result<(), StoreError> {
        let existing = match self.get(key).await {
            Ok(b) => b,
            // Deleted between the 412 and now: let the caller retry the put.
            Err(StoreError::NotFound { .. }) => {
                return Err(self.remote(
                    "PutObject",
                    key,
                    "the object vanished while it was being compared".into(),
                    true,
                ))
            }
            Err(e) => return Err(e),
        };
        if existing == *data {
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

    async fn put_single(&self, key: &str, data: &Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key);
        let created = self
            .retrying("PutObject", key, || {
                self.put_once("PutObject", &full, key, data)
            })
            .await?;
        if created {
            Ok(())
        } else {
            self.compare_existing(key, data).await
        }
    }

    async fn put_multipart(&self, key: &str, data: &Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key);
        if self.head(key).await?.is_some() {
            return self.compare_existing(key, data).await;
        }
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let upload_id = self
            .retrying("CreateMultipartUpload", key, || async {
                attempts.fetch_add(1, Ordering::Relaxed);
                let mut req = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full);
                if self.multipart_checksums {
                    req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
                }
                req = req.set_storage_class(self.storage_class.as_ref().map(tiers::sdk_class));
                req = match &self.sse {
                    Sse::None => req,
                    Sse::Aes256 => req.server_side_encryption(ServerSideEncryption::Aes256),
                    Sse::Kms { key_id } => req
                        .server_side_encryption(ServerSideEncryption::AwsKms)
                        .set_ssekms_key_id(key_id.clone()),
                };
                let out = req
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
        if attempts.load(Ordering::Relaxed) > 1 {
            // An earlier attempt may have created an upload whose answer was lost.
            self.abort_orphans(key, &full, &upload_id).await;
        }
        let result = self
            .upload_parts_and_complete(key, &full, &upload_id, data)
            .await;
        match result {
            Ok(true) => Ok(()),
            Ok(false) => self.compare_existing(key, data).await,
            Err(e) => {
                self.abort(key, &full, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Uploads every part and completes: `Ok(true)` created, `Ok(false)` the key exists (the
    /// upload was aborted).
    async fn upload_parts_and_complete(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        data: &Bytes,
    ) -> Result<bool, StoreError> {
        let part_size = self.part_size.max(1);
        let ranges: Vec<(i32, usize, usize)> = (0..data.len())
            .step_by(part_size)
            .enumerate()
            .map(|(i, start)| (i as i32 + 1, start, (start + part_size).min(data.len())))
            .collect();
        let mut parts: Vec<CompletedPart> = stream::iter(ranges)
            .map(|(number, start, end)| {
                let body = data.slice(start..end);
                async move {
                    self.retrying("UploadPart", key, || async {
                        let mut req = self
                            .client
                            .upload_part()
                            .bucket(&self.bucket)
                            .key(full)
                            .upload_id(upload_id)
                            .part_number(number)
                            .content_length(body.len() as i64)
                            .body(ByteStream::from(body.clone()));
                        if self.multipart_checksums {
                            req = req.checksum_algorithm(ChecksumAlgorithm::Crc32);
                        }
                        let out = req
                            .send()
                            .await
                            .map_err(|e| self.classify("UploadPart", key, e).error)?;
                        // With a checksum algorithm on the upload, the completion must list
                        // each part's checksum.
                        Ok(CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                            .build())
                    })
                    .await
                }
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
                .if_none_match("*")
                .send()
                .await;
            match res {
                Ok(_) => Ok(true),
                Err(e) => {
                    let f = self.classify("CompleteMultipartUpload", key, e);
                    match (f.status, f.code.as_deref()) {
                        (Some(412), _) => Ok(false),
                        // A retried completion whose first attempt did complete.
                        (_, Some("NoSuchUpload")) => match self.head_once(key).await? {
                            Some(_) => Ok(false),
                            None => Err(f.error),
                        },
                        _ => Err(f.error),
                    }
                }
            }
        })
        .await
    }

    /// Aborts the multipart uploads of `full` other than `keep` (created by attempts whose
    /// response was lost). Best effort: a store without ListMultipartUploads is skipped.
    async fn abort_orphans(&self, key: &str, full: &str, keep: &str) {
        let listed = self
            .retrying("ListMultipartUploads", key, || async {
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(full)
                    .send()
                    .await
                    .map_err(|e| self.classify("ListMultipartUploads", key, e).error)
            })
            .await;
        match listed {
            Ok(out) => {
                for u in out.uploads() {
                    if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                        if k == full && id != keep {
                            self.abort(key, full, id).await;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("could not look for abandoned uploads of {key}: {e}"),
        }
    }

    /// Aborts a multipart upload, retrying; failures are logged (a bucket lifecycle rule for
    /// incomplete uploads is the backstop).
    async fn abort(&self, key: &str, full: &str, upload_id: &str) {
        let res = self
            .retrying("AbortMultipartUpload", key, || async {
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(upload_id)
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let f = self.classify("AbortMultipartUpload", key, e);
                        if f.code.as_deref() == Some("NoSuchUpload") {
                            Ok(())
                        } else {
                            Err(f.error)
                        }
                    }
                }
            })
            .await;
        if let Err(e) = res {
            tracing::warn!("could not abort the multipart upload {upload_id} of {key}: {e}");
        }
    }

    /// One GetObject of `key`, of its first `head` bytes when given (a `Range` header; the
    /// whole object when it is shorter).
    async fn get_once(&self, key: &str, head: Option<usize>) -> Result<Bytes, StoreError> {
        let full = self.full_key(key);
        let mut request = self.client.get_object().bucket(&self.bucket).key(&full);
        if let Some(len) = head {
            request = request.range(format!("bytes=0-{}", len.saturating_sub(1)));
        }
        let out = match request.send().await {
            Ok(o) => o,
            Err(e) => {
                if matches!(&e, SdkError::ServiceError(s) if s.err().is_no_such_key()) {
                    return Err(StoreError::NotFound {
                        location: self.location(),
                        key: key.to_string(),
                    });
                }
                let f = self.classify("GetObject", key, e);
                // A range that starts past the end: the object is empty (S3 answers 416
                // InvalidRange rather than an empty body).
                if head.is_some() && f.code.as_deref() == Some("InvalidRange") {
                    return Ok(Bytes::new());
                }
                return Err(f.error);
            }
        };
        let expected = out.content_length();
        let body = out.body.collect().await.map_err(|e| {
            self.remote(
                "GetObject",
                key,
                format!("the response body broke off: {}", crate::error::chain(&e)),
                true,
            )
        })?;
        let bytes = body.into_bytes();
        if let Some(n) = expected {
            if n >= 0 && bytes.len() as u64 != n as u64 {
                return Err(self.remote(
                    "GetObject",
                    key,
                    format!("got {} of {n} bytes", bytes.len()),
                    true,
                ));
            }
        }
        Ok(bytes)
    }

    async fn list_all(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let mut out: Vec<ObjectMeta> = self
            .list_raw(prefix)
            .await?
            .into_iter()
            .map(|(key, o)| ObjectMeta {
                key,
                size: o.size().unwrap_or(0).max(0) as u64,
                modified: o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Every object under `prefix` as `ListObjectsV2` gives it, with its archive key.
    async fn list_raw(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, aws_sdk_s3::types::Object)>, StoreError> {
        let full_prefix = self.full_key(prefix);
        let full_prefix = if prefix.is_empty() && !self.prefix.is_empty() {
            format!("{}/", self.prefix)
        } else {
            full_prefix
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .retrying("ListObjectsV2", prefix, || async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| self.classify("ListObjectsV2", prefix, e).error)
                })
                .await?;
            for o in page.contents() {
                let Some(k) = o.key() else { continue };
                let Some(rel) = self.relative_key(k) else {
                    continue;
                };
                out.push((rel.to_string(), o.clone()));
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(out)
    }
}

const ENDPOINT_HINT: &str = "the store could not be reached or did not answer in time, even after retries: check the endpoint (--s3-endpoint, AWS_ENDPOINT_URL), the region and the network";
const BUCKET_HINT: &str = "check the bucket name in --repo s3://{bucket}/…, the region (--s3-region, AWS_REGION) and the endpoint (--s3-endpoint, AWS_ENDPOINT_URL); tidemark does not create buckets";
const CREDENTIALS_HINT: &str = "check the credentials for bucket {bucket}: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and the shared credentials file, or the instance role), and that they belong to the account or store --s3-endpoint names";
const POLICY_HINT: &str = "the credentials were refused for this operation on bucket {bucket}: check the IAM and bucket policy (tidemark needs s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject, s3:AbortMultipartUpload and s3:ListBucketMultipartUploads), and whether the policy requires a server-side encryption tidemark does not send (--s3-sse AES256 or aws:kms with --s3-sse-kms-key-id)";
const COLD_HINT: &str = "the object is in a cold storage class (GLACIER or DEEP_ARCHIVE) and must be thawed before it can be read: `tidemark restore … --thaw standard` thaws what a restore needs (or `aws s3api restore-object` for one object)";
const REGION_HINT: &str =
    "bucket {bucket} is in another region: set --s3-region (or AWS_REGION) to the bucket's region";

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

/// Loads the SDK configuration: the AWS chain for credentials and region, our HTTP client,
/// timeouts, and the SDK's own retries off (this module retries).
async fn load_config(
    url: &str,
    opts: &S3Options,
) -> Result<(aws_sdk_s3::Config, bool), StoreError> {
    use aws_config::retry::RetryConfig;
    use aws_config::timeout::TimeoutConfig;
    use aws_config::{BehaviorVersion, Region};
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    use aws_smithy_http_client::tls::{TlsContext, TrustStore};

    // HTTPS (TLS 1.2+) with the system's roots, or only the CA bundle's.
    let trust = match ca_bundle(opts)? {
        Some(pem) => TrustStore::empty().with_pem_certificate(pem),
        None => TrustStore::default(),
    };
    let tls = TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| StoreError::InvalidUrl(format!("{url}: TLS configuration: {e}")))?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(tls)
        .build_https();
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(1));
    if let Some((id, secret)) = &opts.credentials {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            id, secret, None, None, "tidemark",
        ));
    }
    if let Some(endpoint) = &opts.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    // Without an explicit region the loader's own chain (AWS_REGION, profile, IMDS) applies; it
    // uses the HTTP client above (a standalone RegionProviderChain would not).
    let has_region = opts.region.is_some();
    if let Some(r) = &opts.region {
        loader = loader.region(Region::new(r.clone()));
    }
    let sdk = loader.load().await;
    // AWS_ENDPOINT_URL lands in the SdkConfig; the S3-only AWS_ENDPOINT_URL_S3 in the S3 config.
    let endpoint_set = sdk.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some_and(|v| !v.is_empty());
    let mut b = aws_sdk_s3::config::Builder::from(&sdk);
    if sdk.region().is_none() {
        if endpoint_set || has_region {
            b = b.region(Region::new("us-east-1"));
        } else {
            return Err(StoreError::InvalidUrl(format!(
                "{url}: no AWS region is configured\nHINT: set --s3-region (TIDEMARK_S3_REGION) or AWS_REGION to the bucket's region"
            )));
        }
    }
    b = b.force_path_style(opts.path_style.unwrap_or(endpoint_set));
    // S3-compatible stores (GCS, older MinIO and Ceph) reject the aws-chunked bodies with
    // trailing checksums that the SDK sends by default since 2025: with an endpoint, checksums
    // only where an operation requires them (SigV4 still signs each payload's SHA-256), unless
    // AWS_REQUEST_CHECKSUM_CALCULATION says otherwise.
    if endpoint_set && std::env::var_os("AWS_REQUEST_CHECKSUM_CALCULATION").is_none() {
        b = b.request_checksum_calculation(
            aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
        );
    }
    Ok((b.build(), endpoint_set))
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        validate_key(key).map_err(|m| self.remote("PutObject", key, m, false))?;
        if data.len() > self.multipart_threshold {
            self.put_multipart(key, &data).await
        } else {
            self.put_single(key, &data).await
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.retrying("GetObject", key, || self.get_once(key, None))
            .await
    }

    /// A ranged GetObject: only the first `len` bytes cross the network.
    async fn get_head(&self, key: &str, len: usize) -> Result<Bytes, StoreError> {
        if len == 0 {
            // `bytes=0--1` is no range; a zero-length read needs only the object to exist.
            self.retrying("GetObject", key, || self.get_once(key, Some(1)))
                .await?;
            return Ok(Bytes::new());
        }
        let mut b = self
            .retrying("GetObject", key, || self.get_once(key, Some(len)))
            .await?;
        // A server that ignores Range sends the whole object.
        b.truncate(len);
        Ok(b)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.list_all(prefix).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key);
        self.retrying("DeleteObject", key, || async {
            match self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => {
                    let f = self.classify("DeleteObject", key, e);
                    if f.code.as_deref() == Some("NoSuchKey") {
                        Ok(())
                    } else {
                        Err(f.error)
                    }
                }
            }
        })
        .await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let key = format!(".probe-{:016x}", rand::random::<u64>());
        self.put_single(&key, &Bytes::from_static(b"probe")).await?;
        if let Err(e) = self.delete(&key).await {
            tracing::warn!("could not delete the write probe {key}: {e}");
        }
        Ok(())
    }

    fn has_storage_classes(&self) -> bool {
        true
    }

    async fn storage_classes(
        &self,
        prefix: &str,
    ) -> Result<std::collections::BTreeMap<String, StorageClass>, StoreError> {
        self.classes_under(prefix).await
    }

    async fn residence(&self, key: &str) -> Result<Residence, StoreError> {
        self.residence_of(key).await
    }

    async fn set_storage_class(&self, key: &str, class: &StorageClass) -> Result<(), StoreError> {
        self.copy_to_class(key, class).await
    }

    async fn thaw(&self, key: &str, tier: ThawTier, days: u32) -> Result<(), StoreError> {
        self.restore_object(key, tier, days).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_store(retry: RetryPolicy) -> S3Store {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .build();
        let mut s = S3Store::from_client(Client::from_conf(conf), "b".into(), "".into(), Sse::None);
        s.retry = retry;
        s
    }

    #[tokio::test(start_paused = true)]
    async fn each_call_is_retried_within_its_attempts_and_a_final_error_is_not() {
        let s = offline_store(RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_elapsed: Duration::from_secs(3600),
        });
        for retryable in [true, false] {
            let calls = std::sync::atomic::AtomicU32::new(0);
            let r: Result<(), _> = s
                .retrying("PutObject", "k", || async {
                    let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                    Err(s.remote("PutObject", "k", format!("attempt {n}"), retryable))
                })
                .await;
            let expected = if retryable { 3 } else { 1 };
            assert_eq!(calls.load(Ordering::Relaxed), expected);
            let e = r.unwrap_err();
            assert!(
                e.to_string().contains(&format!("attempt {expected}")),
                "the last error is returned: {e}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_waits_past_the_elapsed_budget() {
        let s = offline_store(RetryPolicy {
            max_attempts: 1000,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(2),
        });
        let start = tokio::time::Instant::now();
        let r: Result<(), _> = s
            .retrying("GetObject", "k", || async {
                Err(s.remote("GetObject", "k", "busy".into(), true))
            })
            .await;
        assert!(r.unwrap_err().is_retryable());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn urls_name_a_bucket_and_an_optional_prefix() {
        let p = |u: &str| parse_url(u).map_err(|e| e.to_string());
        assert_eq!(p("s3://bucket").unwrap(), ("bucket".into(), "".into()));
        assert_eq!(p("s3://bucket/").unwrap(), ("bucket".into(), "".into()));
        assert_eq!(
            p("s3://my.bucket-1/pg/main/").unwrap(),
            ("my.bucket-1".into(), "pg/main".into())
        );
        for bad in [
            "s3://",
            "s3://Bucket/x",
            "s3://b_c/x",
            "s3://ab",
            "s3://bucket/a//b",
            "s3://bucket/../x",
        ] {
            assert!(p(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sse_choices_parse_and_a_kms_key_needs_kms() {
        assert_eq!(Sse::parse("AES256", None).unwrap(), Sse::Aes256);
        assert_eq!(Sse::parse("none", None).unwrap(), Sse::None);
        assert_eq!(
            Sse::parse("aws:kms", Some("alias/x")).unwrap(),
            Sse::Kms {
                key_id: Some("alias/x".into())
            }
        );
        assert!(Sse::parse("AES256", Some("alias/x")).is_err());
        assert!(Sse::parse("rot13", None).is_err());
    }
}
