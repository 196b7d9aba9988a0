//! TLS for tests: a throwaway certificate authority made with rcgen, PostgreSQL's TLS settings
//! for a test cluster ([`server_conf`]), and [`TlsFront`], a TLS-terminating proxy (tokio-rustls)
//! that puts HTTPS in front of the plain-HTTP S3 test server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::os::give_to_server_user;

/// A certificate authority that lives for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM.
    pub pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// Writes the CA's certificate as `dir/<file>`; returns its path.
    pub fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) signed by this CA: (cert
    /// PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// `postgresql.conf` lines turning TLS on with a certificate for `names` from `ca`; the files go
/// in `dir` (readable by the server's user only, as PostgreSQL demands of the key).
pub fn server_conf(ca: &TestCa, names: &[&str], dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let (cert, key) = ca.leaf(names);
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    for p in [&cert_path, &key_path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        give_to_server_user(p);
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    vec![
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{}'", cert_path.display()),
        format!("ssl_key_file = '{}'", key_path.display()),
    ]
}

/// A TLS-terminating proxy on 127.0.0.1: each connection's TLS is ended here with a
/// certificate for `localhost` and 127.0.0.1 from a CA, and its bytes relayed to `backend`.
pub struct TlsFront {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsFront {
    pub fn start(ca: &TestCa, backend: SocketAddr) -> TlsFront {
        let (cert, key) = ca.leaf(&["localhost", "127.0.0.1"]);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tls-front")
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            runtime: Some(runtime),
        }
    }

    /// `https://localhost:<port>`.
    pub fn endpoint(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
