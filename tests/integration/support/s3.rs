//! A real S3-compatible HTTP server for tests: s3s-fs (objects as files in a temporary folder)
//! served by hyper on 127.0.0.1, with SigV4 authentication (fixed access key and secret), in
//! this process on its own thread and runtime (so it outlives any test's runtime and keeps
//! serving while a test blocks on a `tidemark` child process).
//!
//! s3s-fs is wrapped by [`Guarded`], which behaves like a bucket policy: it can refuse every
//! write (`AccessDenied`), and by default refuses writes without a server-side-encryption
//! header — as the common "deny unencrypted PutObject" policy does — so every test that writes
//! proves tidemark sends it. It also answers `NoSuchBucket` for a missing bucket on every
//! operation and keeps the set of open multipart uploads (s3s-fs has no ListMultipartUploads).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::*;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use tidemark::store::s3::RetryPolicy;
use tidemark::store::{S3Options, S3Store, Sse};

use crate::support::proxy::{FaultProxy, Mode};

pub const ACCESS_KEY: &str = "tidemark-test-key";
pub const SECRET_KEY: &str = "tidemark-test-secret";
pub const REGION: &str = "us-east-1";

/// What the "bucket policy" allows; shared with the running server.
#[derive(Debug, Default)]
pub struct Policy {
    /// Refuse PutObject, CreateMultipartUpload, UploadPart, CompleteMultipartUpload, DeleteObject.
    pub deny_writes: AtomicBool,
    /// Refuse PutObject and CreateMultipartUpload without `x-amz-server-side-encryption`.
    pub require_sse: AtomicBool,
    /// Uploads created and neither completed nor aborted: upload id → (bucket, key).
    pub open_uploads: Mutex<BTreeMap<String, (String, String)>>,
    /// Answer `501 NotImplemented` to a PutObject with `If-None-Match` (as some S3-compatible
    /// stores do).
    pub no_conditional_writes: AtomicBool,
    /// Server-side encryption values seen on writes (`AES256`, `aws:kms`).
    pub sse_seen: Mutex<Vec<String>>,
}

/// s3s-fs behind a policy.
#[derive(Debug)]
pub struct Guarded {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    policy: Arc<Policy>,
}

impl Guarded {
    fn bucket_exists(&self, bucket: &str) -> S3Result<()> {
        if self.root.join(bucket).is_dir() {
            Ok(())
        } else {
            Err(s3_error!(
                NoSuchBucket,
                "The specified bucket does not exist"
            ))
        }
    }

    fn may_write(&self, sse: Option<&ServerSideEncryption>) -> S3Result<()> {
        if self.policy.deny_writes.load(Ordering::SeqCst) {
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        match sse {
            Some(s) => self
                .policy
                .sse_seen
                .lock()
                .unwrap()
                .push(s.as_str().to_string()),
            None if self.policy.require_sse.load(Ordering::SeqCst) => {
                return Err(s3_error!(
                    AccessDenied,
                    "Access Denied (the bucket policy requires x-amz-server-side-encryption)"
                ))
            }
            None => {}
        }
        Ok(())
    }

    /// As S3 does (s3s-fs would say AccessDenied): an unknown or finished upload is NoSuchUpload.
    fn upload_open(&self, id: &str) -> S3Result<()> {
        if self.policy.open_uploads.lock().unwrap().contains_key(id) {
            Ok(())
        } else {
            Err(s3_error!(
                NoSuchUpload,
                "The specified multipart upload does not exist"
            ))
        }
    }

    fn deny_writes(&self) -> S3Result<()> {
        if self.policy.deny_writes.load(Ordering::SeqCst) {
            return Err(s3_error!(AccessDenied, "Access Denied"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl S3 for Guarded {
    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.inner.head_bucket(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.bucket_exists(&req.input.bucket)?;
        self.inner.list_objects_v2(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.inner.head_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.inner.get_object(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.may_write(req.input.server_side_encryption.as_ref())?;
        if req.input.if_none_match.is_some()
            && self.policy.no_conditional_writes.load(Ordering::SeqCst)
        {
            return Err(s3_error!(
                NotImplemented,
                "A header you provided implies functionality that is not implemented"
            ));
        }
        self.inner.put_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.deny_writes()?;
        self.inner.delete_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.may_write(req.input.server_side_encryption.as_ref())?;
        let target = (req.input.bucket.clone(), req.input.key.clone());
        let out = self.inner.create_multipart_upload(req).await?;
        if let Some(id) = &out.output.upload_id {
            self.policy
                .open_uploads
                .lock()
                .unwrap()
                .insert(id.clone(), target);
        }
        Ok(out)
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.bucket_exists(&input.bucket)?;
        let prefix = input.prefix.unwrap_or_default();
        let uploads = self
            .policy
            .open_uploads
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (b, k))| *b == input.bucket && k.starts_with(&prefix))
            .map(|(id, (_, k))| MultipartUpload {
                key: Some(k.clone()),
                upload_id: Some(id.clone()),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: Some(prefix),
            is_truncated: Some(false),
            uploads: Some(uploads),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.deny_writes()?;
        self.upload_open(&req.input.upload_id)?;
        self.inner.upload_part(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        self.deny_writes()?;
        let id = req.input.upload_id.clone();
        self.upload_open(&id)?;
        let out = self.inner.complete_multipart_upload(req).await?;
        self.policy.open_uploads.lock().unwrap().remove(&id);
        Ok(out)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.bucket_exists(&req.input.bucket)?;
        let id = req.input.upload_id.clone();
        self.upload_open(&id)?;
        let out = self.inner.abort_multipart_upload(req).await?;
        self.policy.open_uploads.lock().unwrap().remove(&id);
        Ok(out)
    }
}

/// A running test S3 server.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub addr: SocketAddr,
    pub policy: Arc<Policy>,
    root: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
}

impl S3Server {
    /// Starts a server (see [`S3Server::start`]) holding the empty bucket `bucket`.
    pub fn with_bucket(bucket: &str) -> S3Server {
        let server = S3Server::start();
        server.create_bucket(bucket);
        server
    }

    /// Starts a server that requires server-side encryption on writes.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("temporary folder for the S3 server");
        let policy = Arc::new(Policy::default());
        policy.require_sse.store(true, Ordering::SeqCst);
        let guarded = Guarded {
            inner: s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the folder"),
            root: root.path().canonicalize().unwrap(),
            policy: policy.clone(),
        };
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(guarded);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-test-server")
            .enable_all()
            .build()
            .unwrap();
        // Bound here (std), served on the runtime: block_on would panic inside a test's runtime.
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the S3 test server");
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        S3Server {
            endpoint: format!("http://{addr}"),
            addr,
            policy,
            root,
            runtime: Some(runtime),
        }
    }

    /// The folder holding bucket `name`'s objects.
    pub fn bucket_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Creates a bucket (a folder, as s3s-fs keeps them).
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.bucket_dir(name)).unwrap();
    }

    /// Every object in a bucket with its bytes, by key (read from the server's folder, not over S3).
    pub fn objects(&self, bucket: &str) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let base = self.bucket_dir(bucket);
        walk(&base, &base, &mut out);
        out
    }

    /// Multipart uploads neither completed nor aborted.
    pub fn open_uploads(&self) -> Vec<String> {
        self.policy
            .open_uploads
            .lock()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    }

    pub fn set_deny_writes(&self, on: bool) {
        self.policy.deny_writes.store(on, Ordering::SeqCst);
    }

    pub fn set_require_sse(&self, on: bool) {
        self.policy.require_sse.store(on, Ordering::SeqCst);
    }

    /// Store options reaching this server (or `endpoint`, e.g. a proxy in front of it).
    pub fn options_via(&self, endpoint: &str) -> S3Options {
        S3Options {
            endpoint: Some(endpoint.to_string()),
            region: Some(REGION.to_string()),
            sse: Sse::Aes256,
            path_style: Some(true),
            credentials: Some((ACCESS_KEY.to_string(), SECRET_KEY.to_string())),
            ca_bundle: None,
        }
    }

    /// A store on `s3://BUCKET/PREFIX` of this server.
    pub async fn store(&self, url: &str) -> S3Store {
        S3Store::connect(url, &self.options_via(&self.endpoint))
            .await
            .expect("connect to the S3 test server")
    }

    /// Environment for a `tidemark` child process reaching `endpoint` (this server or a proxy):
    /// credentials, region and endpoint, and no EC2 metadata lookups.
    pub fn cli_env(&self, endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ("AWS_CONFIG_FILE", "/dev/null".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_string()),
            ("TIDEMARK_S3_ENDPOINT", endpoint.to_string()),
        ]
    }
}

/// A test S3 server holding one bucket, behind the fault-injecting proxy: what a test that
/// reaches S3 through faults starts with.
pub struct ProxiedS3 {
    pub server: S3Server,
    pub proxy: FaultProxy,
}

impl ProxiedS3 {
    /// Starts a server holding the empty bucket `bucket`, and the proxy in front of it in `mode`.
    pub fn start(bucket: &str, mode: Mode) -> ProxiedS3 {
        let server = S3Server::with_bucket(bucket);
        let proxy = FaultProxy::start(&server.endpoint);
        proxy.set_mode(mode);
        ProxiedS3 { server, proxy }
    }

    /// A store on `s3://BUCKET/PREFIX` reaching the server through the proxy, retrying
    /// [`quick_retry`].
    pub async fn store(&self, url: &str) -> S3Store {
        let mut store = S3Store::connect(url, &self.server.options_via(&self.proxy.endpoint))
            .await
            .expect("connect to the S3 test server through the proxy");
        store.retry = quick_retry();
        store
    }

    /// Environment for a `tidemark` child process reaching the server through the proxy.
    pub fn cli_env(&self) -> Vec<(&'static str, String)> {
        self.server.cli_env(&self.proxy.endpoint)
    }
}

/// Retries quick enough for a test, many enough to get through a fifth of 503s.
pub fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 30,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(200),
        max_elapsed: Duration::from_secs(30),
    }
}

/// Multipart uploads from 5 MiB on, in parts of 5 MiB (S3's smallest), so that an object of a
/// few MiB goes up in parts.
pub fn small_parts(store: &mut S3Store) {
    store.multipart_threshold = 5 << 20;
    store.part_size = 5 << 20;
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            walk(base, &path, out);
        } else {
            let key = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.insert(key, std::fs::read(&path).unwrap());
        }
    }
}
