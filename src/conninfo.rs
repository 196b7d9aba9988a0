//! Connection strings: one parsed, validated description of how to reach a PostgreSQL server.
//!
//! Owns: parsing a libpq URI (`postgresql://user@host:5432/db`) or key=value string
//! (`host=… dbname=…`) — the parser is tokio-postgres's, so the syntax is libpq's — and filling
//! what it omits from the `PG*` environment variables and `~/.pgpass`, as libpq does. Hands out a
//! [`tokio_postgres::Config`] for ordinary connections, the same parameters for the replication
//! client, and a libpq string plus environment for child processes (`pg_dump`, `pg_restore`), so
//! that a password never appears on a command line. Sets short TCP keepalives and a TCP user
//! timeout on every connection unless the string names its own ([`KEEPALIVES_IDLE`]), reading
//! `keepalives_count` and `tcp_user_timeout` as libpq does.
//!
//! The TLS keywords (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, with their `PGSSL*`
//! variables) and `passfile` are taken out of the string by keyword, never by substring (a
//! password may hold any text), and handed to [`crate::tls`], which builds the one TLS
//! configuration of every connection to this server; [`ConnInfo::connect`] is the one place a
//! tokio-postgres connection is opened.
//!
//! Does not own: what the TLS modes mean (`tls`) or opening replication connections (see
//! `replication`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};

use crate::tls::{MakePgTls, PgTls, SslMode as TlsMode, TlsError, TlsSettings};

/// Why a connection string cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    #[error("invalid connection string: {0}")]
    Parse(String),
    #[error("{0}")]
    Tls(TlsError),
    #[error("cannot connect to {target}: {}", crate::error::describe_pg(.source))]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl crate::error::Classify for ConnInfoError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            ConnInfoError::Parse(_) => Usage,
            ConnInfoError::Tls(e) => e.exit_status(),
            ConnInfoError::Connect { .. } => Database,
        }
    }
}

/// A fully resolved connection description.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    /// The TLS keywords as given (handed on to child processes).
    tls: TlsSettings,
    /// The one TLS configuration of every connection (`None`: `sslmode=disable`).
    pg_tls: Option<PgTls>,
}

impl ConnInfo {
    /// Parses `s` and fills omitted parameters from the environment (`PGHOST`, `PGPORT`,
    /// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`,
    /// `PGPASSFILE` or `~/.pgpass`) and libpq's defaults.
    pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
        Self::parse_with_env(s, &|k| std::env::var(k).ok())
    }

    /// Like [`ConnInfo::parse`] with an explicit environment (for tests).
    pub fn parse_with_env(
        s: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnInfo, ConnInfoError> {
        let (stripped, tcp) = take_tcp_params(s)?;
        // The TLS keywords and `passfile` are read here, not by the client library: it knows
        // neither `allow`, the `verify-*` modes, the certificate files nor `passfile`.
        let (parsed, tls, passfile) = take_tls_params(&stripped, env)?;
        let s = stripped.as_str();
        let mut config = if parsed.trim().is_empty() {
            tokio_postgres::Config::new()
        } else {
            tokio_postgres::Config::from_str(&parsed)
                .map_err(|e| ConnInfoError::Parse(crate::error::describe_pg(&e)))?
        };
        if config.get_hosts().is_empty() {
            match env("PGHOST").filter(|h| !h.is_empty()) {
                Some(hosts) => {
                    for h in hosts.split(',') {
                        add_host(&mut config, h);
                    }
                }
                None => {
                    let dir = ["/var/run/postgresql", "/tmp"]
                        .into_iter()
                        .find(|d| Path::new(d).is_dir());
                    match dir {
                        Some(d) => config.host_path(d),
                        None => config.host("localhost"),
                    };
                }
            }
        }
        if config.get_ports().is_empty() {
            let port = match env("PGPORT") {
                Some(p) => p
                    .parse::<u16>()
                    .map_err(|_| ConnInfoError::Parse(format!("PGPORT={p:?} is not a port")))?,
                None => 5432,
            };
            config.port(port);
        }
        if config.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .or_else(|| env("LOGNAME"))
                .unwrap_or_else(|| "postgres".to_string());
            config.user(&user);
        }
        if config.get_dbname().is_none() {
            let db = env("PGDATABASE")
                .unwrap_or_else(|| config.get_user().unwrap_or("postgres").to_string());
            config.dbname(&db);
        }
        if config.get_application_name().is_none() {
            config.application_name(env("PGAPPNAME").unwrap_or_else(|| "tidemark".to_string()));
        }
        if config.get_connect_timeout().is_none() {
            let secs = env("PGCONNECT_TIMEOUT")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(10);
            config.connect_timeout(Duration::from_secs(secs.max(2)));
        }
        tcp.apply(&mut config, s);
        let home = env("HOME").map(PathBuf::from);
        let pg_tls = tls.build(home.as_deref()).map_err(ConnInfoError::Tls)?;
        // tokio-postgres negotiates TLS on its own for prefer and require; allow is our retry
        // (see `connect`), verify-* are require with our verifier.
        config.ssl_mode(match tls.mode {
            TlsMode::Disable | TlsMode::Allow => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        let mut info = ConnInfo {
            config,
            tls,
            pg_tls,
        };
        if info.config.get_password().is_none() {
            if let Some(pw) = env("PGPASSWORD") {
                info.config.password(pw);
            } else if let Some(pw) = info.passfile_lookup(passfile, env) {
                info.config.password(pw);
            }
        }
        Ok(info)
    }

    /// The password for this connection in the password file: `passfile`, else `PGPASSFILE`,
    /// else `~/.pgpass`.
    fn passfile_lookup(
        &self,
        passfile: Option<String>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Option<String> {
        let path = passfile
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
        // As libpq: a password file others can read is not used (nor anything but a file).
        let meta = std::fs::metadata(&path).ok()?;
        if !meta.is_file() {
            tracing::warn!("password file {} is not a plain file", path.display());
            return None;
        }
        if !passfile_private(&meta) {
            tracing::warn!(
                "password file {} has group or world access; permissions should be u=rw (0600) or less: it is ignored",
                path.display()
            );
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let host = self.host_string();
        let host = if host.starts_with('/') {
            "localhost".to_string()
        } else {
            host
        };
        passfile_match(
            &text,
            &host,
            &self.port().to_string(),
            self.dbname(),
            self.user(),
        )
    }

    /// The configuration for an ordinary (non-replication) connection.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("postgres")
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    pub fn password(&self) -> Option<&[u8]> {
        self.config.get_password()
    }

    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    pub fn hosts(&self) -> &[Host] {
        self.config.get_hosts()
    }

    pub fn connect_timeout(&self) -> Duration {
        self.config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10))
    }

    /// The first host as text: a name, an address, or a socket directory.
    pub fn host_string(&self) -> String {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        }
    }

    /// TCP keepalive settings for a socket to the server, `None` with `keepalives=0` (see
    /// [`KEEPALIVES_IDLE`] for the defaults).
    pub fn tcp_keepalive(&self) -> Option<socket2::TcpKeepalive> {
        if !self.config.get_keepalives() {
            return None;
        }
        let keepalive = socket2::TcpKeepalive::new().with_time(self.config.get_keepalives_idle());
        #[cfg(not(any(
            target_os = "aix",
            target_os = "redox",
            target_os = "solaris",
            target_os = "openbsd"
        )))]
        let keepalive = match self.config.get_keepalives_interval() {
            Some(interval) => keepalive.with_interval(interval),
            None => keepalive,
        };
        #[cfg(not(any(
            target_os = "aix",
            target_os = "redox",
            target_os = "solaris",
            target_os = "windows",
            target_os = "openbsd"
        )))]
        let keepalive = match self.config.get_keepalives_retries() {
            Some(retries) => keepalive.with_retries(retries),
            None => keepalive,
        };
        Some(keepalive)
    }

    /// How long sent data may stay unacknowledged before the connection is dropped (Linux's
    /// `TCP_USER_TIMEOUT`; see [`TCP_USER_TIMEOUT`]); `None`: the system's default.
    pub fn tcp_user_timeout(&self) -> Option<Duration> {
        self.config.get_tcp_user_timeout().copied()
    }

    /// Returns a copy pointing at another database on the same server.
    pub fn with_dbname(&self, db: &str) -> ConnInfo {
        let mut c = self.clone();
        c.config.dbname(db);
        c
    }

    /// The TLS configuration every connection to this server uses (`None`: `sslmode=disable`).
    pub fn tls(&self) -> Option<&PgTls> {
        self.pg_tls.as_ref()
    }

    /// The `sslmode` in force (the string's, `PGSSLMODE`, or libpq's default `prefer`).
    pub fn ssl_mode(&self) -> TlsMode {
        self.tls.mode
    }

    /// The `options` of the connection string (server settings for the session).
    pub fn options(&self) -> Option<&str> {
        self.config.get_options()
    }

    /// Opens an ordinary connection and spawns its driver task. With `sslmode=allow`, a
    /// plaintext attempt that fails is tried again over TLS, as libpq does.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnInfoError> {
        let first = self.connect_with(&self.config).await;
        match first {
            Err(_) if self.tls.mode == TlsMode::Allow && self.pg_tls.is_some() => {
                let mut config = self.config.clone();
                config.ssl_mode(SslMode::Require);
                self.connect_with(&config).await
            }
            other => other,
        }
    }

    async fn connect_with(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, ConnInfoError> {
        let res = match &self.pg_tls {
            Some(tls) => spawn_driver(config.connect(MakePgTls(tls.clone())).await),
            None => spawn_driver(config.connect(tokio_postgres::NoTls).await),
        };
        res.map_err(|source| self.connect_error(source))
    }

    /// tokio-postgres's "server does not support TLS" said as `tls` says it; other failures
    /// with the target named.
    fn connect_error(&self, source: tokio_postgres::Error) -> ConnInfoError {
        use std::error::Error as _;
        if source
            .source()
            .is_some_and(|s| s.to_string() == "server does not support TLS")
        {
            return ConnInfoError::Tls(TlsError::NotOffered {
                host: self.to_string(),
                mode: self.tls.mode,
            });
        }
        ConnInfoError::Connect {
            target: self.to_string(),
            source,
        }
    }

    /// A libpq key=value string of the whole connection without the password, for child
    /// processes: every host and port, `options`, `application_name`, the connect timeout and
    /// the TLS keywords. Pass [`ConnInfo::child_env`] as their environment.
    pub fn libpq_string(&self) -> String {
        self.libpq_string_with_options("")
    }

    /// Like [`ConnInfo::libpq_string`], with `extra` server options before the string's own
    /// `options` (which win).
    pub fn libpq_string_with_options(&self, extra: &str) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let hosts: Vec<String> = self
            .hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(h) => h.clone(),
                #[cfg(unix)]
                Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = self.config.get_ports().iter().map(u16::to_string).collect();
        let mut out = format!(
            "host={} port={} user={} dbname={} application_name={} connect_timeout={}",
            q(&hosts.join(",")),
            q(&ports.join(",")),
            q(self.user()),
            q(self.dbname()),
            q(self.config.get_application_name().unwrap_or("tidemark")),
            self.connect_timeout().as_secs().max(2),
        );
        let options = [extra, self.options().unwrap_or("")]
            .iter()
            .filter(|o| !o.trim().is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        if !options.is_empty() {
            out.push_str(&format!(" options={}", q(&options)));
        }
        out.push_str(&format!(" sslmode={}", self.tls.mode));
        if let Some(r) = &self.tls.rootcert {
            out.push_str(&format!(" sslrootcert={}", q(r)));
        }
        if let Some(c) = &self.tls.cert {
            out.push_str(&format!(" sslcert={}", q(&c.display().to_string())));
        }
        if let Some(k) = &self.tls.key {
            out.push_str(&format!(" sslkey={}", q(&k.display().to_string())));
        }
        out
    }

    /// Environment for child processes: the password, if any (never on a command line).
    pub fn child_env(&self) -> Vec<(String, String)> {
        match self.password() {
            Some(pw) => vec![(
                "PGPASSWORD".into(),
                String::from_utf8_lossy(pw).into_owned(),
            )],
            None => vec![],
        }
    }
}

/// Spawns the driver task of a new connection.
fn spawn_driver<S, T>(
    res: Result<(tokio_postgres::Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = res?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Takes the TLS keywords (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslnegotiation`)
/// and `passfile` out of `s`, filling the TLS ones from `PGSSLMODE`, `PGSSLROOTCERT`,
/// `PGSSLCERT` and `PGSSLKEY`; returns the rest of the string, the settings and the password
/// file.
fn take_tls_params(
    s: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, TlsSettings, Option<String>), ConnInfoError> {
    let mut rest = s.to_string();
    let mut take = |key: &str, var: Option<&str>| {
        let (r, v) = take_param(&rest, key);
        rest = r;
        v.or_else(|| var.and_then(env)).filter(|v| !v.is_empty())
    };
    let mode = take("sslmode", Some("PGSSLMODE"));
    let rootcert = take("sslrootcert", Some("PGSSLROOTCERT"));
    let cert = take("sslcert", Some("PGSSLCERT"));
    let key = take("sslkey", Some("PGSSLKEY"));
    let negotiation = take("sslnegotiation", Some("PGSSLNEGOTIATION"));
    let passfile = take("passfile", None);
    if let Some(n) = negotiation.filter(|n| n != "postgres") {
        return Err(ConnInfoError::Parse(format!(
            "sslnegotiation={n} is not supported by tidemark: use sslnegotiation=postgres (the default)"
        )));
    }
    let settings = TlsSettings {
        mode: match mode {
            Some(m) => TlsMode::parse(&m).map_err(ConnInfoError::Tls)?,
            None => TlsMode::default(),
        },
        rootcert,
        cert: cert.map(PathBuf::from),
        key: key.map(PathBuf::from),
    };
    Ok((rest, settings, passfile))
}

/// Idle time before the first TCP keepalive probe, unless the connection string says
/// `keepalives_idle`. With [`KEEPALIVES_INTERVAL`] and [`KEEPALIVES_COUNT`], an idle connection
/// to a server that vanished without a reset (a partition, a host gone) fails within about 25 s,
/// not the system's default of over two hours. libpq's `keepalives=0` turns probes off.
pub const KEEPALIVES_IDLE: Duration = Duration::from_secs(10);
/// Time between unanswered keepalive probes, unless the string says `keepalives_interval`.
pub const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped, unless the string says
/// `keepalives_count` (libpq's name; tokio-postgres's `keepalives_retries` is accepted too).
pub const KEEPALIVES_COUNT: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is dropped (Linux), unless
/// the string says `tcp_user_timeout` (in milliseconds, as libpq reads it; 0: the system's
/// default, about 15 minutes). Keepalives cover an idle connection; this one, a connection
/// with data in flight.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// The TCP parameters of a connection string that tokio-postgres does not read as libpq does,
/// taken out of the string: `keepalives_count` (unknown to it) and `tcp_user_timeout` (read in
/// seconds, where libpq's unit is the millisecond). Outer `None`: not in the string; inner
/// `None`: 0, the system's default.
#[derive(Debug, Default, PartialEq, Eq)]
struct TcpParams {
    keepalives_count: Option<Option<u32>>,
    tcp_user_timeout: Option<Option<Duration>>,
}

impl TcpParams {
    /// Sets the named values, and tidemark's defaults for what `s` (the string tokio-postgres
    /// parsed into `config`) does not name.
    fn apply(&self, config: &mut tokio_postgres::Config, s: &str) {
        if find_param(s, "keepalives_idle").is_none() {
            config.keepalives_idle(KEEPALIVES_IDLE);
        }
        if find_param(s, "keepalives_interval").is_none() {
            config.keepalives_interval(KEEPALIVES_INTERVAL);
        }
        match self.keepalives_count {
            Some(Some(n)) => {
                config.keepalives_retries(n);
            }
            Some(None) => {}
            None if find_param(s, "keepalives_retries").is_none() => {
                config.keepalives_retries(KEEPALIVES_COUNT);
            }
            None => {}
        }
        match self.tcp_user_timeout {
            Some(Some(t)) => {
                config.tcp_user_timeout(t);
            }
            Some(None) => {}
            None => {
                config.tcp_user_timeout(TCP_USER_TIMEOUT);
            }
        }
    }
}

/// Takes `keepalives_count` and `tcp_user_timeout` (every occurrence; the last one's value
/// counts, as with libpq) out of `s`; see [`TcpParams`].
fn take_tcp_params(s: &str) -> Result<(String, TcpParams), ConnInfoError> {
    let (s, count) = take_param(s, "keepalives_count");
    let (s, user_timeout) = take_param(&s, "tcp_user_timeout");
    let number = |key: &str, v: &str, unit: &str| {
        v.trim().parse::<u32>().map_err(|_| {
            ConnInfoError::Parse(format!(
                "invalid value for parameter `{key}`: {v:?} is not a whole number{unit}"
            ))
        })
    };
    let params = TcpParams {
        keepalives_count: count
            .map(|v| number("keepalives_count", &v, "").map(|n| (n > 0).then_some(n)))
            .transpose()?,
        tcp_user_timeout: user_timeout
            .map(|v| {
                number("tcp_user_timeout", &v, " of milliseconds")
                    .map(|ms| (ms > 0).then(|| Duration::from_millis(ms.into())))
            })
            .transpose()?,
    };
    Ok((s, params))
}

/// Removes every `key=value` of `key` from a connection string; returns the string and the
/// last value.
fn take_param(s: &str, key: &str) -> (String, Option<String>) {
    let uri = {
        let t = s.trim_start();
        t.starts_with("postgres://") || t.starts_with("postgresql://")
    };
    let mut s = s.to_string();
    let mut last = None;
    while let Some(p) = find_param(&s, key) {
        // find_param finds the last occurrence: the first one taken is the one that counts.
        last.get_or_insert(p.value);
        let (mut from, mut to) = p.pair;
        if uri {
            // Keep the query well formed: take one `&` with the pair.
            if s[to..].starts_with('&') {
                to += 1;
            } else if s[..from].ends_with('&') {
                from -= 1;
            }
        }
        s.replace_range(from..to, "");
    }
    (s, last)
}

fn add_host(config: &mut tokio_postgres::Config, h: &str) {
    if h.starts_with('/') {
        config.host_path(h);
    } else {
        config.host(h);
    }
}

#[cfg(unix)]
fn passfile_private(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o077 == 0
}

#[cfg(not(unix))]
fn passfile_private(_: &std::fs::Metadata) -> bool {
    true
}

/// A parameter of a connection string: its value, where the value's text is in the string, and
/// where the whole `key=value` is.
#[derive(Debug, PartialEq, Eq)]
struct Param {
    value: String,
    span: (usize, usize),
    pair: (usize, usize),
}

/// The last `key` in a connection string, URI (`postgresql://…?sslmode=require`) or key=value
/// (`host=h sslmode='require'`), as libpq reads them: the last occurrence wins.
fn find_param(s: &str, key: &str) -> Option<Param> {
    let t = s.trim_start();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        let q = s.find('?')? + 1;
        let mut found = None;
        let mut at = q;
        for pair in s[q..].split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if percent_decode(k) == key {
                    let start = at + k.len() + 1;
                    found = Some(Param {
                        value: percent_decode(v),
                        span: (start, start + v.len()),
                        pair: (at, at + pair.len()),
                    });
                }
            }
            at += pair.len() + 1;
        }
        return found;
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut found = None;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            return found;
        }
        let k0 = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let k = &s[k0..i];
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            return found; // not key=value: the client library reports it
        }
        i = skip_ws(i + 1);
        let v0 = i;
        let mut value = String::new();
        if b.get(i) == Some(&b'\'') {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let c = s[i..].chars().next().expect("in bounds");
                value.push(c);
                i += c.len_utf8();
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let c = s[i..].chars().next().expect("in bounds");
                value.push(c);
                i += c.len_utf8();
            }
        }
        if k == key {
            found = Some(Param {
                value,
                span: (v0, i),
                pair: (k0, i),
            });
        }
    }
}

/// `%XX` escapes of a URI component decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the password for (host, port, db, user) in the text of a `.pgpass` file.
fn passfile_match(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let ok = |pat: &str, v: &str| pat == "*" || pat == v;
        if ok(&fields[0], host)
            && ok(&fields[1], port)
            && ok(&fields[2], db)
            && ok(&fields[3], user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

impl fmt::Display for ConnInfo {
    /// Prints the target without the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user(),
            self.host_string(),
            self.port(),
            self.dbname()
        )
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self}, password: [redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn uri_and_keyvalue_forms_parse_alike() {
        let e = env(&[]);
        let a = ConnInfo::parse_with_env("postgresql://alice:pw@db.example:6543/app", &e).unwrap();
        let b = ConnInfo::parse_with_env(
            "host=db.example port=6543 user=alice password=pw dbname=app",
            &e,
        )
        .unwrap();
        for c in [&a, &b] {
            assert_eq!(c.host_string(), "db.example");
            assert_eq!(c.port(), 6543);
            assert_eq!(c.user(), "alice");
            assert_eq!(c.dbname(), "app");
            assert_eq!(c.password(), Some(&b"pw"[..]));
        }
        assert!(!format!("{a:?} {a}").contains("pw"));
        assert!(!a.libpq_string().contains("pw"));
    }

    #[test]
    fn environment_fills_what_the_string_omits() {
        let e = env(&[
            ("PGHOST", "/sock"),
            ("PGPORT", "7777"),
            ("PGUSER", "bob"),
            ("PGDATABASE", "shop"),
            ("PGPASSWORD", "s3"),
        ]);
        let c = ConnInfo::parse_with_env("", &e).unwrap();
        assert_eq!(
            (c.host_string().as_str(), c.port(), c.user(), c.dbname()),
            ("/sock", 7777, "bob", "shop")
        );
        assert_eq!(c.password(), Some(&b"s3"[..]));
        let c = ConnInfo::parse_with_env("dbname=other port=1", &e).unwrap();
        assert_eq!((c.port(), c.dbname()), (1, "other"));
    }

    #[test]
    fn tls_modes_parse_from_the_string_or_pgsslmode() {
        let e = env(&[]);
        let mode = |s: &str, e: &dyn Fn(&str) -> Option<String>| {
            ConnInfo::parse_with_env(s, e)
                .unwrap_or_else(|err| panic!("{s}: {err}"))
                .ssl_mode()
        };
        assert_eq!(mode("host=x", &e), TlsMode::Prefer);
        for (s, m) in [
            ("host=x sslmode=disable", TlsMode::Disable),
            ("host=x sslmode=allow", TlsMode::Allow),
            ("host=x sslmode = 'require' port=5", TlsMode::Require),
            ("postgresql://u@x/db?sslmode=require", TlsMode::Require),
            (
                "postgresql://u@x/db?application_name=a&sslmode=prefer",
                TlsMode::Prefer,
            ),
        ] {
            assert_eq!(mode(s, &e), m, "{s}");
        }
        let pg = env(&[("PGSSLMODE", "require")]);
        assert_eq!(mode("host=x", &pg), TlsMode::Require);
        // The string wins over the variable.
        assert_eq!(mode("host=x sslmode=disable", &pg), TlsMode::Disable);
        for s in ["host=x sslmode=sometimes", "host=x sslnegotiation=direct"] {
            let err = ConnInfo::parse_with_env(s, &e).expect_err(s).to_string();
            assert!(
                err.contains("sometimes") || err.contains("direct"),
                "{s}: {err}"
            );
        }
        assert!(matches!(
            ConnInfo::parse_with_env("host=x port=notaport", &e),
            Err(ConnInfoError::Parse(_))
        ));
    }

    #[test]
    fn tls_files_come_from_the_string_or_pgssl_variables() {
        let home = tempfile::tempdir().unwrap();
        let h = home.path().to_str().unwrap().to_string();
        let e = env(&[("HOME", &h)]);
        // verify-full with no root certificate names libpq's default file.
        let err = ConnInfo::parse_with_env("host=x sslmode=verify-full", &e)
            .unwrap_err()
            .to_string();
        assert!(err.contains(".postgresql/root.crt"), "{err}");
        // A named file is named, from the string or from PGSSLROOTCERT.
        for (s, vars) in [
            (
                "host=x sslmode=verify-ca sslrootcert=/no/such/ca.pem",
                vec![],
            ),
            (
                "host=x sslmode=verify-ca",
                vec![("PGSSLROOTCERT", "/no/such/ca.pem")],
            ),
            (
                "postgresql://u@x/db?sslrootcert=%2Fno%2Fsuch%2Fca.pem&sslmode=verify-full",
                vec![],
            ),
        ] {
            let mut vars = vars;
            vars.push(("HOME", &h));
            let err = ConnInfo::parse_with_env(s, &env(&vars))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("/no/such/ca.pem") && err.contains("does not exist"),
                "{s}: {err}"
            );
        }
        for (s, vars, file) in [
            (
                "host=x sslmode=require sslcert=/no/c.crt sslkey=/no/c.key",
                vec![],
                "/no/c.crt",
            ),
            (
                "host=x",
                vec![("PGSSLCERT", "/no/c2.crt"), ("PGSSLKEY", "/no/k")],
                "/no/c2.crt",
            ),
        ] {
            let mut vars = vars;
            vars.push(("HOME", &h));
            let err = ConnInfo::parse_with_env(s, &env(&vars))
                .unwrap_err()
                .to_string();
            assert!(err.contains(file), "{s}: {err}");
        }
        // require without a root certificate: encryption without verification.
        let c = ConnInfo::parse_with_env("host=x sslmode=require", &e).unwrap();
        assert_eq!(c.tls().unwrap().verify, crate::tls::Verify::None);
        assert!(ConnInfo::parse_with_env("host=x sslmode=disable", &e)
            .unwrap()
            .tls()
            .is_none());
    }

    #[test]
    fn sslmode_is_read_as_libpq_reads_it() {
        let e = env(&[]);
        for s in [
            "host=x sslmode=allow",
            "host=x sslmode='allow' port=5",
            "postgresql://u@x/db?sslmode=allow",
            "host=x sslmode=disable",
            // A password or another value that merely contains an sslmode word is no sslmode.
            "host=x password='verify-full sslmode=require'",
            "postgresql://u:verify-full@x/db",
        ] {
            let c = ConnInfo::parse_with_env(s, &e).unwrap_or_else(|err| panic!("{s}: {err}"));
            assert_eq!(c.host_string(), "x");
        }
        let c =
            ConnInfo::parse_with_env("host=x password='verify-full sslmode=require'", &e).unwrap();
        assert_eq!(c.password(), Some(&b"verify-full sslmode=require"[..]));
        assert_eq!(c.ssl_mode(), TlsMode::Prefer);
        let c = ConnInfo::parse_with_env("host='sslmode=require' sslmode=disable", &e).unwrap();
        assert_eq!(
            (c.host_string().as_str(), c.ssl_mode()),
            ("sslmode=require", TlsMode::Disable)
        );
        assert_eq!(
            find_param("host=x  sslmode='a\\'b'", "sslmode"),
            Some(Param {
                value: "a'b".into(),
                span: (16, 22),
                pair: (8, 22)
            })
        );
    }

    #[test]
    fn children_get_the_whole_connection_and_no_password() {
        let e = env(&[]);
        let c = ConnInfo::parse_with_env(
            "host=a,b port=5433,5434 user=u password='s3cr et' dbname=d options='-c work_mem=64MB' sslmode=require sslrootcert=/ca.pem application_name=app",
            &env(&[]),
        );
        // The root certificate must exist: name one that does.
        assert!(c.is_err());
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let s = format!(
            "host=a,b port=5433,5434 user=u password='s3cr et' dbname=d options='-c work_mem=64MB' sslmode=verify-full sslrootcert={} application_name=app",
            ca.display()
        );
        let c = ConnInfo::parse_with_env(&s, &e).unwrap();
        let child = c.libpq_string();
        assert!(!child.contains("s3cr"), "{child}");
        for part in [
            "host='a,b'",
            "port='5433,5434'",
            "user='u'",
            "dbname='d'",
            "application_name='app'",
            "options='-c work_mem=64MB'",
            "sslmode=verify-full",
            &format!("sslrootcert='{}'", ca.display()),
        ] {
            assert!(child.contains(part), "{part} not in {child}");
        }
        assert!(c
            .libpq_string_with_options("-c maintenance_work_mem=1GB")
            .contains("options='-c maintenance_work_mem=1GB -c work_mem=64MB'"));
        assert_eq!(
            c.child_env(),
            vec![("PGPASSWORD".to_string(), "s3cr et".to_string())]
        );
        assert!(!format!("{c:?} {c}").contains("s3cr"));
        // The child's string parses back to the same connection.
        let back = ConnInfo::parse_with_env(&child, &e).unwrap();
        assert_eq!(back.hosts(), c.hosts());
        assert_eq!(back.config().get_ports(), c.config().get_ports());
        assert_eq!(back.ssl_mode(), TlsMode::VerifyFull);
        assert_eq!(back.options(), Some("-c work_mem=64MB"));
    }

    #[test]
    fn passfile_keyword_names_the_password_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "h:5432:d:u:from-passfile\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = format!("host=h user=u dbname=d passfile={}", path.display());
        let c = ConnInfo::parse_with_env(&s, &env(&[("PGPASSFILE", "/nonexistent")])).unwrap();
        assert_eq!(c.password(), Some(&b"from-passfile"[..]));
    }

    #[test]
    fn tcp_keepalives_and_user_timeout_default_short_and_honour_libpq_parameters() {
        let e = env(&[]);
        let c = ConnInfo::parse_with_env("host=x", &e).unwrap();
        let cfg = c.config();
        assert!(cfg.get_keepalives());
        assert_eq!(cfg.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(cfg.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(cfg.get_keepalives_retries(), Some(KEEPALIVES_COUNT));
        assert_eq!(c.tcp_user_timeout(), Some(TCP_USER_TIMEOUT));
        assert!(c.tcp_keepalive().is_some());

        // libpq's names and units: keepalives_count, tcp_user_timeout in milliseconds.
        for s in [
            "host=x keepalives_idle=60 keepalives_interval=7 keepalives_count=9 tcp_user_timeout=2500",
            "host=x keepalives_count=1 keepalives_idle=60 keepalives_count=9 keepalives_interval=7 tcp_user_timeout = '2500'",
            "postgresql://u@x/db?keepalives_count=9&keepalives_idle=60&keepalives_interval=7&tcp_user_timeout=2500",
            "postgresql://u@x/db?keepalives_idle=60&keepalives_interval=7&tcp_user_timeout=2500&keepalives_count=9",
            "postgresql://u@x/db?keepalives_idle=60&keepalives_interval=7&keepalives_retries=9&tcp_user_timeout=2500",
        ] {
            let c = ConnInfo::parse_with_env(s, &e).unwrap_or_else(|err| panic!("{s}: {err}"));
            let cfg = c.config();
            assert_eq!(cfg.get_keepalives_idle(), Duration::from_secs(60), "{s}");
            assert_eq!(cfg.get_keepalives_interval(), Some(Duration::from_secs(7)), "{s}");
            assert_eq!(cfg.get_keepalives_retries(), Some(9), "{s}");
            assert_eq!(c.tcp_user_timeout(), Some(Duration::from_millis(2500)), "{s}");
            assert_eq!(c.host_string(), "x", "{s}");
        }
        // 0: the system's default; keepalives=0: no probes.
        let c = ConnInfo::parse_with_env(
            "host=x keepalives=0 keepalives_count=0 tcp_user_timeout=0",
            &e,
        )
        .unwrap();
        assert!(c.tcp_keepalive().is_none());
        assert_eq!(c.config().get_keepalives_retries(), None);
        assert_eq!(c.tcp_user_timeout(), None);
        // The rest of a URI's query survives the parameters taken out of it.
        let c = ConnInfo::parse_with_env(
            "postgresql://u@x/db?tcp_user_timeout=100&application_name=a&keepalives_count=2",
            &e,
        )
        .unwrap();
        assert_eq!(c.config().get_application_name(), Some("a"));
        for (s, key) in [
            ("host=x keepalives_count=many", "`keepalives_count`"),
            ("host=x tcp_user_timeout=1.5", "`tcp_user_timeout`"),
        ] {
            let err = ConnInfo::parse_with_env(s, &e).expect_err(s).to_string();
            assert!(err.contains(key), "{s}: {err}");
        }
    }

    #[test]
    fn a_bad_connection_string_names_the_keyword() {
        let e = env(&[]);
        for (s, keyword) in [
            ("host=x port=notaport", "`port`"),
            ("host=x frobnicate=1", "`frobnicate`"),
            ("postgresql://x:99999999/db", "port"),
        ] {
            let err = ConnInfo::parse_with_env(s, &e).expect_err(s).to_string();
            assert!(err.contains(keyword), "{s}: {err}");
            assert_ne!(err, "invalid connection string: invalid connection string");
        }
    }

    #[test]
    fn a_password_file_with_group_or_world_access_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:secret\n").unwrap();
        let file = path.to_str().unwrap().to_string();
        let lookup = || {
            let e = env(&[("PGPASSFILE", &file)]);
            ConnInfo::parse_with_env("host=h user=u dbname=d", &e)
                .unwrap()
                .password()
                .map(<[u8]>::to_vec)
        };
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(lookup().as_deref(), Some(&b"secret"[..]), "{mode:o}");
        }
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(lookup(), None, "{mode:o}");
        }
    }

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:bob:nope\n*:5432:shop:bob:pa\\:ss\n";
        assert_eq!(
            passfile_match(text, "h", "5432", "shop", "bob").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(passfile_match(text, "h", "5433", "shop", "bob"), None);
    }
}
