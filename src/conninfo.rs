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
//! Does not own: TLS (connections are plaintext; `sslmode=require` and stricter are refused with a
//! clear error until TLS lands) or opening replication connections (see `replication`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};

/// Why a connection string cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnInfoError {
    #[error("invalid connection string: {0}")]
    Parse(String),
    #[error("sslmode={0} is not supported yet by tidemark (connections are plaintext); use sslmode=disable, allow or prefer, or a TLS-terminating proxy")]
    TlsUnsupported(String),
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
            ConnInfoError::Parse(_) | ConnInfoError::TlsUnsupported(_) => Usage,
            ConnInfoError::Connect { .. } => Database,
        }
    }
}

/// A fully resolved connection description.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
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
        let s = stripped.as_str();
        // sslmode is read here, not by the client library: it knows neither `allow` nor the
        // `verify-*` modes, and would answer only "invalid connection string".
        let sslmode = find_param(s, "sslmode");
        let parsed = match &sslmode {
            Some(p) if p.value == "allow" => {
                format!("{}{}{}", &s[..p.span.0], "disable", &s[p.span.1..])
            }
            Some(p) if !matches!(p.value.as_str(), "disable" | "prefer") => {
                return Err(ConnInfoError::TlsUnsupported(p.value.clone()));
            }
            _ => s.to_string(),
        };
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
        if sslmode.is_none() {
            if let Some(mode) = env("PGSSLMODE") {
                match mode.as_str() {
                    "disable" | "allow" | "prefer" => {}
                    other => return Err(ConnInfoError::TlsUnsupported(other.to_string())),
                };
            }
        }
        tcp.apply(&mut config, s);
        // Connections are plaintext; "prefer" then means "disable", as with a libpq built without SSL.
        config.ssl_mode(SslMode::Disable);
        let mut info = ConnInfo { config };
        if info.config.get_password().is_none() {
            if let Some(pw) = env("PGPASSWORD") {
                info.config.password(pw);
            } else if let Some(pw) = info.passfile_lookup(env) {
                info.config.password(pw);
            }
        }
        Ok(info)
    }

    fn passfile_lookup(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        let path = env("PGPASSFILE")
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

    /// Opens an ordinary connection and spawns its driver task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnInfoError> {
        let (client, connection) =
            self.config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|source| ConnInfoError::Connect {
                    target: self.to_string(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// A libpq key=value string without the password, for child processes; pass
    /// [`ConnInfo::child_env`] as their environment.
    pub fn libpq_string(&self) -> String {
        let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host={} port={} user={} dbname={} sslmode=disable application_name={}",
            q(&self.host_string()),
            self.port(),
            q(self.user()),
            q(self.dbname()),
            q(self.config.get_application_name().unwrap_or("tidemark"))
        )
    }

    /// Environment for child processes (the password, if any).
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
    fn tls_modes_we_cannot_honour_are_refused() {
        let e = env(&[]);
        assert!(matches!(
            ConnInfo::parse_with_env("host=x sslmode=require", &e),
            Err(ConnInfoError::TlsUnsupported(_))
        ));
        assert!(ConnInfo::parse_with_env("host=x sslmode=prefer", &e).is_ok());
        assert!(matches!(
            ConnInfo::parse_with_env("host=x", &env(&[("PGSSLMODE", "verify-full")])),
            Err(ConnInfoError::TlsUnsupported(_))
        ));
        assert!(matches!(
            ConnInfo::parse_with_env("host=x port=notaport", &e),
            Err(ConnInfoError::Parse(_))
        ));
    }

    #[test]
    fn sslmode_is_read_as_libpq_reads_it() {
        let e = env(&[]);
        for s in [
            "host=x sslmode=verify-full",
            "host=x sslmode = 'verify-ca'",
            "postgresql://u@x/db?application_name=a&sslmode=verify-full",
            "host=x sslmode=require",
        ] {
            let err = ConnInfo::parse_with_env(s, &e).expect_err(s).to_string();
            assert!(
                err.contains("sslmode=verify-") || err.contains("sslmode=require"),
                "{s}: {err}"
            );
        }
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
