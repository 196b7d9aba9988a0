//! moto's standalone S3 server (`moto_server`, from PyPI), for what s3s-fs does not model:
//! storage classes and thaws. Facts a test relies on, read from moto's source and checked by
//! the tests that use it:
//! * `PutObject`, `CreateMultipartUpload` and `CopyObject` keep `x-amz-storage-class`, and
//!   `ListObjectsV2` and `HeadObject` report it;
//! * a `GetObject` of a `GLACIER` or `DEEP_ARCHIVE` object fails `403 InvalidObjectState`
//!   until a `RestoreObject` has completed (`x-amz-restore: ongoing-request="false", …`);
//! * a thaw completes at once by default; [`MotoServer::thaw_takes`] makes it take a while
//!   (moto's state manager, model `s3::keyrestore`, "time" progression), so a waiting loop
//!   really waits.
//!
//! Each server is its own process on a free port, killed on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidemark::store::{S3Options, S3Store, Sse};

pub const REGION: &str = "us-east-1";
const KEY: &str = "moto-key";
const SECRET: &str = "moto-secret";

pub struct MotoServer {
    child: Child,
    pub endpoint: String,
    port: u16,
}

impl MotoServer {
    /// Starts `moto_server` (on `PATH`) and creates `bucket`.
    pub async fn with_bucket(bucket: &str) -> MotoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server (pip install 'moto[server]')");
        let server = MotoServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
            .store(&format!("s3://{bucket}"))
            .await
            .client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create the bucket");
        server
    }

    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.to_string()),
            sse: Sse::Aes256,
            path_style: Some(true),
            credentials: Some((KEY.to_string(), SECRET.to_string())),
            ca_bundle: None,
            storage_class: None,
        }
    }

    /// A store on `s3://BUCKET/PREFIX` of this server.
    pub async fn store(&self, url: &str) -> S3Store {
        S3Store::connect(url, &self.options())
            .await
            .expect("connect to moto")
    }

    /// Environment for a `tidemark` child process reaching this server.
    pub fn cli_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            ("AWS_CONFIG_FILE", "/dev/null".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_string()),
            ("TIDEMARK_S3_ENDPOINT", self.endpoint.clone()),
        ]
    }

    /// Makes every thaw (`RestoreObject`) from now on take `seconds` before the object reads.
    pub fn thaw_takes(&self, seconds: u64) {
        let body = format!(
            r#"{{"model_name": "s3::keyrestore", "transition": {{"progression": "time", "seconds": {seconds}}}}}"#
        );
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST /moto-api/state-manager/set-transition HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 201") || answer.starts_with("HTTP/1.1 200"),
            "moto refused the transition: {answer}"
        );
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
