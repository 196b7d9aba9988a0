//! TLS to PostgreSQL: libpq's `sslmode` and certificate files read into one rustls client
//! configuration, which every connection uses (tokio-postgres through [`MakePgTls`], the
//! replication client through [`negotiate`]).
//!
//! Owns: what each `sslmode` means (libpq's table: `disable`, `allow`, `prefer` — the default —,
//! `require`, `verify-ca`, `verify-full`), where the root certificate and the client certificate
//! and key come from (`sslrootcert`, `sslcert`, `sslkey`, their `PGSSL*` variables, and libpq's
//! default files under `~/.postgresql/`), the `SSLRequest` exchange that opens TLS on a
//! PostgreSQL socket (libpq's `sslnegotiation=postgres`), and the wording of every TLS failure:
//! no TLS on the server, unknown CA, host name mismatch (with the names in the certificate),
//! missing or unreadable file. Protocol versions are TLS 1.2 and 1.3 (rustls offers no older).
//!
//! Verification, as libpq: `verify-full` checks the chain against the root certificates and the
//! host name; `verify-ca` the chain only; `require` encrypts without checking, unless a root
//! certificate file is there (named, or the default one exists), when it behaves as
//! `verify-ca`; `prefer` and `allow` never check. `sslrootcert=system` takes the operating
//! system's store and, as libpq 16, is refused with anything weaker than `verify-full`.
//! Unlike libpq, a root certificate file *named* with `require` must exist: a typo would
//! otherwise turn verification off without a word.
//!
//! Does not own: parsing connection strings (`conninfo` hands the keyword values here) or TLS to
//! S3 (the S3 store's HTTP client; [`load_ca_bundle`] reads its private CA bundle).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Why TLS could not be set up or established.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "invalid sslmode {0:?}: use disable, allow, prefer, require, verify-ca or verify-full"
    )]
    BadMode(String),
    #[error("{0}")]
    Settings(String),
    #[error("{what} {}: {reason}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the server at {host} does not support TLS (it answered no to SSLRequest), and sslmode={mode} requires it\nHINT: turn ssl on in the server's postgresql.conf, or use sslmode=prefer")]
    NotOffered { host: String, mode: SslMode },
    #[error("TLS handshake with {host} failed: {reason}")]
    Handshake { host: String, reason: String },
}

impl crate::error::Classify for TlsError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            TlsError::BadMode(_) | TlsError::Settings(_) | TlsError::File { .. } => Usage,
            TlsError::NotOffered { .. } | TlsError::Handshake { .. } => Database,
        }
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS if the plaintext attempt fails.
    Allow,
    /// TLS if the server offers it, else plaintext (the default).
    #[default]
    Prefer,
    /// TLS or nothing; verified as `verify-ca` when a root certificate file is there.
    Require,
    /// TLS, with the server's chain checked against the root certificates.
    VerifyCa,
    /// TLS, with the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, TlsError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(TlsError::BadMode(other.to_string())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS keywords of a connection string (or their `PGSSL*` variables), as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `sslrootcert`: a file, or `system`.
    pub rootcert: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Not at all (encryption only).
    None,
    /// The chain, against the root certificates.
    Chain,
    /// The chain and the host name.
    Full,
}

/// The one TLS client configuration of a connection description.
#[derive(Clone)]
pub struct PgTls {
    pub mode: SslMode,
    pub verify: Verify,
    /// Where the root certificates came from, for messages (`None` without verification).
    pub roots: Option<String>,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("verify", &self.verify)
            .field("roots", &self.roots)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// Builds the client configuration; `None` for `sslmode=disable`. `home` is where libpq's
    /// default files live (`$HOME/.postgresql/…`).
    pub fn build(&self, home: Option<&Path>) -> Result<Option<PgTls>, TlsError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let pg_dir = home.map(|h| h.join(".postgresql"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (verify, roots, store) = self.roots(pg_dir.as_deref())?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&store, verify) {
            (Some(store), Verify::Chain | Verify::Full) => {
                let inner = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store.clone()),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Settings(format!("root certificates: {e}")))?;
                Arc::new(Verifier {
                    inner: Some(inner),
                    check_name: verify == Verify::Full,
                    provider: provider.clone(),
                })
            }
            _ => Arc::new(Verifier {
                inner: None,
                check_name: false,
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Settings(format!("TLS configuration: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match self.client_cert(pg_dir.as_deref())? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::Settings(format!("client certificate and key do not match: {e}"))
            })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(PgTls {
            mode: self.mode,
            verify,
            roots,
            config: Arc::new(config),
        }))
    }

    /// The verification the mode and the root certificate files call for, with the roots.
    fn roots(
        &self,
        pg_dir: Option<&Path>,
    ) -> Result<(Verify, Option<String>, Option<RootCertStore>), TlsError> {
        let wanted = match self.mode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::Chain,
            SslMode::Require => Verify::None,
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => {
                return Ok((Verify::None, None, None))
            }
        };
        if self.rootcert.as_deref() == Some("system") {
            if self.mode != SslMode::VerifyFull {
                return Err(TlsError::Settings(format!(
                    "weak sslmode={} may not be used with sslrootcert=system (use sslmode=verify-full)",
                    self.mode
                )));
            }
            return Ok((
                Verify::Full,
                Some("the system's trusted roots".into()),
                Some(system_roots()?),
            ));
        }
        let path = match (&self.rootcert, pg_dir) {
            (Some(p), _) => PathBuf::from(p),
            (None, Some(dir)) => dir.join("root.crt"),
            (None, None) if wanted == Verify::None => return Ok((Verify::None, None, None)),
            (None, None) => {
                return Err(TlsError::Settings(format!(
                    "sslmode={} needs a root certificate and no home folder is known to look for ~/.postgresql/root.crt\nHINT: set sslrootcert (or PGSSLROOTCERT) to the CA's certificate file, or sslrootcert=system",
                    self.mode
                )))
            }
        };
        if self.rootcert.is_none() && wanted == Verify::None && !path.exists() {
            // require without a root certificate: encryption only, as libpq.
            return Ok((Verify::None, None, None));
        }
        if self.rootcert.is_none() && !path.exists() {
            return Err(TlsError::File {
                what: "root certificate file",
                path,
                reason: format!(
                    "does not exist (sslmode={} checks the server's certificate)\nHINT: set sslrootcert (or PGSSLROOTCERT) to the CA's certificate file, use sslrootcert=system for the system's trusted roots, or sslmode=require to encrypt without checking",
                    self.mode
                ),
            });
        }
        let store = load_roots(&path)?;
        let verify = if wanted == Verify::None {
            Verify::Chain
        } else {
            wanted
        };
        Ok((verify, Some(path.display().to_string()), Some(store)))
    }

    /// The client certificate and key: named, or libpq's default files when they exist.
    #[allow(clippy::type_complexity)]
    fn client_cert(
        &self,
        pg_dir: Option<&Path>,
    ) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
        let cert_path = match (&self.cert, pg_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) if dir.join("postgresql.crt").exists() => dir.join("postgresql.crt"),
            _ => return Ok(None),
        };
        let key_path = match (&self.key, pg_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.join("postgresql.key"),
            (None, None) => {
                return Err(TlsError::Settings(
                    "sslcert is set but sslkey is not: name the client certificate's key file"
                        .into(),
                ))
            }
        };
        let what = "client certificate file (sslcert)";
        let pem = read_file(what, &cert_path)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_file(what, &cert_path, format!("is not PEM: {e}")))?;
        if certs.is_empty() {
            return Err(bad_file(what, &cert_path, "holds no certificate".into()));
        }
        let what = "client key file (sslkey)";
        check_key_private(&key_path)?;
        let pem = read_file(what, &key_path)?;
        let key = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|e| bad_file(what, &key_path, format!("holds no private key: {e}")))?;
        Ok(Some((certs, key)))
    }
}

fn bad_file(what: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::File {
        what,
        path: path.to_path_buf(),
        reason,
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(what, path, &e))
}

fn file_error(what: &'static str, path: &Path, e: &io::Error) -> TlsError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => "does not exist".to_string(),
        io::ErrorKind::PermissionDenied => "cannot be read: permission denied".to_string(),
        _ => format!("cannot be read: {e}"),
    };
    bad_file(what, path, reason)
}

/// As libpq: a key file others may read is refused (0600, or 0640 when owned by root).
#[cfg(unix)]
fn check_key_private(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let what = "client key file (sslkey)";
    let meta = std::fs::metadata(path).map_err(|e| file_error(what, path, &e))?;
    let mode = meta.mode();
    let private = mode & 0o077 == 0 || (meta.uid() == 0 && mode & 0o037 == 0);
    if !private {
        return Err(bad_file(
            what,
            path,
            format!(
                "has group or world access (mode {:o}); permissions should be u=rw (0600) or less",
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_private(_: &Path) -> Result<(), TlsError> {
    Ok(())
}

/// The certificates of a PEM file as root certificates; names the file when it is missing,
/// unreadable, not PEM, or holds no usable certificate.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let what = "root certificate file (sslrootcert)";
    let pem = read_file(what, path)?;
    roots_from_pem(&pem).map_err(|reason| bad_file(what, path, reason))
}

fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate".into());
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| format!("holds a certificate that cannot be used: {e}"))?;
    }
    Ok(store)
}

/// Reads a CA bundle for S3 (`--s3-ca-bundle`, `AWS_CA_BUNDLE`) and checks it holds usable
/// certificates; returns its PEM text for the HTTP client.
pub fn load_ca_bundle(path: &Path) -> Result<Vec<u8>, TlsError> {
    let what = "CA bundle (--s3-ca-bundle)";
    let pem = read_file(what, path)?;
    roots_from_pem(&pem).map_err(|reason| bad_file(what, path, reason))?;
    Ok(pem)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        return Err(TlsError::Settings(format!(
            "sslrootcert=system: no trusted root certificate found in the system's store{why}\nHINT: install the ca-certificates package, or name the CA's file in sslrootcert"
        )));
    }
    Ok(store)
}

/// libpq's checks over rustls's: the chain through WebPKI when there are roots, the host name
/// only for `verify-full`; the handshake's signatures always.
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // WebPKI checks the name last: its failure means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl PgTls {
    /// Runs the TLS handshake on `stream` (after the server said yes to SSLRequest).
    /// A failure TLS itself reports (a certificate, an alert) is a [`TlsError`]; a socket
    /// that fails mid-way stays an I/O error (retrying may help).
    pub async fn handshake<S>(
        &self,
        host: &str,
        stream: S,
    ) -> Result<tokio_rustls::client::TlsStream<S>, NegotiateError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(host).map_err(NegotiateError::Tls)?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| {
                let tls_failure = e
                    .get_ref()
                    .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some());
                if tls_failure {
                    NegotiateError::Tls(TlsError::Handshake {
                        host: host.to_string(),
                        reason: self.describe(&e),
                    })
                } else {
                    NegotiateError::Io(e)
                }
            })
    }

    /// What went wrong in a handshake, in libpq's terms where rustls has a precise error.
    fn describe(&self, e: &io::Error) -> String {
        let roots = self.roots.as_deref().unwrap_or("the root certificates");
        let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return e.to_string();
        };
        match err {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the server's certificate is not signed by a trusted CA (unknown CA; checked against {roots})\nHINT: set sslrootcert to the certificate of the CA that signed the server's certificate"
            ),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                expected,
                presented,
            }) => format!(
                "host name mismatch: connected to {}, but the server's certificate is for {} (sslmode=verify-full checks the name)\nHINT: connect with a host name the certificate names, or use sslmode=verify-ca to check the CA only",
                server_name_text(expected),
                if presented.is_empty() {
                    "no name".to_string()
                } else {
                    presented.join(", ")
                }
            ),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
                "host name mismatch: the server's certificate does not name the host connected to".into()
            }
            rustls::Error::InvalidCertificate(c) => format!("the server's certificate is not valid: {c:?}"),
            rustls::Error::AlertReceived(alert) => format!(
                "the server refused the handshake ({alert:?}); it may require a client certificate (sslcert, sslkey) it trusts"
            ),
            other => other.to_string(),
        }
    }
}

fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Handshake {
        host: host.to_string(),
        reason: format!("{host:?} is not a host name or address TLS can check: {e}"),
    })
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => format!("\"{}\"", d.as_ref()),
        ServerName::IpAddress(ip) => format!("{:?}", std::net::IpAddr::from(*ip)),
        other => format!("{other:?}"),
    }
}

/// The `SSLRequest` message: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why [`negotiate`] or [`PgTls::handshake`] failed.
#[derive(Debug)]
pub enum NegotiateError {
    /// The socket failed.
    Io(io::Error),
    /// TLS refused: not offered, or the handshake failed on a certificate or an alert.
    Tls(TlsError),
}

impl From<io::Error> for NegotiateError {
    fn from(e: io::Error) -> Self {
        NegotiateError::Io(e)
    }
}

impl From<NegotiateError> for TlsError {
    fn from(e: NegotiateError) -> Self {
        match e {
            NegotiateError::Tls(e) => e,
            NegotiateError::Io(e) => TlsError::Handshake {
                host: "the server".into(),
                reason: e.to_string(),
            },
        }
    }
}

/// What the server answered to `SSLRequest`.
pub enum Negotiated<S> {
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
    /// The server does not do TLS; allowed by the mode.
    Plain(S),
}

/// Asks the server for TLS on a fresh socket (libpq's `sslnegotiation=postgres`) and runs the
/// handshake if it agrees; with a mode that requires TLS, a refusal is an error.
pub async fn negotiate<S>(
    tls: &PgTls,
    host: &str,
    mut stream: S,
) -> Result<Negotiated<S>, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&SSL_REQUEST).await?;
    stream.flush().await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => Ok(Negotiated::Tls(Box::new(
            tls.handshake(host, stream).await?,
        ))),
        b'N' if tls.mode.requires_tls() => Err(NegotiateError::Tls(TlsError::NotOffered {
            host: host.to_string(),
            mode: tls.mode,
        })),
        b'N' => Ok(Negotiated::Plain(stream)),
        // An ErrorResponse ('E'): a server too old for SSLRequest, or one refusing us.
        other => Err(NegotiateError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer {:?} to SSLRequest", other as char),
        ))),
    }
}

/// [`PgTls`] as tokio-postgres's TLS connector.
#[derive(Clone, Debug)]
pub struct MakePgTls(pub PgTls);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakePgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, TlsError> {
        Ok(PgTlsConnect {
            tls: self.0.clone(),
            host: domain.to_string(),
        })
    }
}

/// One connection's TLS connector (see [`MakePgTls`]).
pub struct PgTlsConnect {
    tls: PgTls,
    host: String,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<PgTlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = self.tls.handshake(&self.host, stream).await?;
            Ok(PgTlsStream(s))
        })
    }
}

/// A TLS stream for tokio-postgres (no channel binding: SCRAM runs without `-PLUS`).
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: &str, rootcert: Option<&str>) -> TlsSettings {
        TlsSettings {
            mode: SslMode::parse(mode).unwrap(),
            rootcert: rootcert.map(str::to_string),
            cert: None,
            key: None,
        }
    }

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn modes_parse_as_libpq_spells_them() {
        for m in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        let err = SslMode::parse("verify_full").unwrap_err().to_string();
        assert!(
            err.contains("\"verify_full\"") && err.contains("verify-full"),
            "{err}"
        );
        assert!(SslMode::Require.requires_tls() && !SslMode::Prefer.requires_tls());
    }

    #[test]
    fn verification_follows_the_mode_and_the_root_file() {
        let home = tempfile::tempdir().unwrap();
        let h = Some(home.path());
        assert!(settings("disable", None).build(h).unwrap().is_none());
        for m in ["allow", "prefer", "require"] {
            assert_eq!(
                settings(m, None).build(h).unwrap().unwrap().verify,
                Verify::None,
                "{m}"
            );
        }
        // verify-* without a root file: the default file is named.
        let err = settings("verify-full", None)
            .build(h)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(".postgresql/root.crt") && err.contains("does not exist"),
            "{err}"
        );
        // A named file that is not there is named, whatever the mode.
        for m in ["require", "verify-ca", "verify-full"] {
            let err = settings(m, Some("/nonexistent/ca.pem"))
                .build(h)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/nonexistent/ca.pem") && err.contains("does not exist"),
                "{m}: {err}"
            );
        }
        // The default root file makes require check the chain, as libpq.
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(".postgresql/root.crt"), ca_pem()).unwrap();
        let v = |m: &str| settings(m, None).build(h).unwrap().unwrap().verify;
        assert_eq!(v("require"), Verify::Chain);
        assert_eq!(v("verify-ca"), Verify::Chain);
        assert_eq!(v("verify-full"), Verify::Full);
        assert_eq!(v("prefer"), Verify::None);
        // Not a certificate: named.
        let junk = home.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let err = settings("verify-ca", junk.to_str())
            .build(h)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("junk.pem") && err.contains("no certificate"),
            "{err}"
        );
    }

    #[test]
    fn system_roots_need_verify_full() {
        let err = settings("verify-ca", Some("system"))
            .build(None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sslrootcert=system") && err.contains("verify-full"),
            "{err}"
        );
    }

    #[test]
    fn a_client_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let s = TlsSettings {
            mode: SslMode::Require,
            rootcert: None,
            cert: Some(c),
            key: Some(k.clone()),
        };
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = s.build(None).unwrap_err().to_string();
        assert!(
            err.contains("c.key") && err.contains("group or world access"),
            "{err}"
        );
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(s.build(None).unwrap().is_some());
        let missing = TlsSettings {
            key: Some(dir.path().join("none.key")),
            ..s
        };
        let err = missing.build(None).unwrap_err().to_string();
        assert!(
            err.contains("none.key") && err.contains("does not exist"),
            "{err}"
        );
    }
}
