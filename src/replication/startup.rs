//! Opening a `replication=database` connection: socket, TLS (the connection's one
//! configuration, see `tls`), StartupMessage, authentication, and the server's parameters up
//! to the first ReadyForQuery.

use std::io;
use std::time::Duration;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::net::TcpStream;
use tokio_postgres::config::Host;

use super::error::ReplicationError;
use super::wire::{unexpected, Conn, Cursor, Socket};
use crate::conninfo::ConnInfo;
use crate::tls::{negotiate, NegotiateError, Negotiated, SslMode};

/// Tries each host in order, each within the connect timeout; returns the first connection
/// that reaches ReadyForQuery, or the last error.
pub(crate) async fn connect(info: &ConnInfo) -> Result<Conn, ReplicationError> {
    let ports = info.config().get_ports();
    let timeout = info.connect_timeout();
    let mut last = None;
    // sslmode=allow: plaintext first, TLS if that fails (libpq's order).
    let tries: &[bool] = match (info.tls(), info.ssl_mode()) {
        (None, _) => &[false],
        (Some(_), SslMode::Allow) => &[false, true],
        (Some(_), _) => &[true],
    };
    for (i, host) in info.hosts().iter().enumerate() {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let target = target_name(info, host, port);
        for &tls in tries {
            let attempt = async {
                let sock = open_socket(host, port, info, tls, &target).await?;
                let mut conn = Conn::new(sock, target.clone());
                startup(&mut conn, info).await?;
                Ok::<_, ReplicationError>(conn)
            };
            let err = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e)) => e,
                Err(_) => ReplicationError::io(&target, timed_out(timeout)),
            };
            tracing::debug!(%target, tls, error = %err, "replication connection attempt failed");
            last = Some(err);
        }
    }
    Err(last.unwrap_or_else(|| ReplicationError::protocol("connection string names no host")))
}

fn timed_out(after: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connection not established within {after:?}"),
    )
}

fn target_name(info: &ConnInfo, host: &Host, port: u16) -> String {
    let host = match host {
        Host::Tcp(h) => h.clone(),
        #[cfg(unix)]
        Host::Unix(dir) => dir.display().to_string(),
    };
    format!("{}@{}:{}/{}", info.user(), host, port, info.dbname())
}

/// Opens the socket; over TCP with `tls`, asks for TLS and runs the handshake (as libpq, never
/// on a Unix-domain socket).
async fn open_socket(
    host: &Host,
    port: u16,
    info: &ConnInfo,
    tls: bool,
    target: &str,
) -> Result<Box<dyn Socket>, ReplicationError> {
    let io = |e| ReplicationError::io(target, e);
    match host {
        Host::Tcp(h) => {
            let sock = connect_tcp(h, port, info).await.map_err(io)?;
            let Some(config) = info.tls().filter(|_| tls) else {
                return Ok(Box::new(sock));
            };
            match negotiate(config, h, sock).await {
                Ok(Negotiated::Tls(s)) => Ok(Box::new(s)),
                Ok(Negotiated::Plain(s)) => Ok(Box::new(s)),
                Err(NegotiateError::Io(e)) => Err(io(e)),
                Err(NegotiateError::Tls(source)) => Err(ReplicationError::Tls {
                    target: target.to_string(),
                    source,
                }),
            }
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok(Box::new(
                tokio::net::UnixStream::connect(path).await.map_err(io)?,
            ))
        }
    }
}

async fn connect_tcp(host: &str, port: u16, info: &ConnInfo) -> io::Result<TcpStream> {
    let s = TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    tune_tcp(&s, info)?;
    Ok(s)
}

/// TCP keepalives and the user timeout of the connection string (or tidemark's defaults, see
/// `conninfo`), so that a server that vanished without a reset fails the socket in seconds,
/// not after TCP's quarter of an hour of retransmissions.
fn tune_tcp(s: &TcpStream, info: &ConnInfo) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    if let Some(keepalive) = info.tcp_keepalive() {
        sock.set_tcp_keepalive(&keepalive)?;
    }
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    if let Some(timeout) = info.tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

async fn startup(conn: &mut Conn, info: &ConnInfo) -> Result<(), ReplicationError> {
    let app = info
        .config()
        .get_application_name()
        .unwrap_or("tidemark")
        .to_string();
    let mut params: Vec<(&str, &str)> = vec![
        ("user", info.user()),
        ("database", info.dbname()),
        ("replication", "database"),
        ("application_name", &app),
    ];
    // The string's `options` first: the server applies the settings below after them.
    if let Some(options) = info.options().filter(|o| !o.trim().is_empty()) {
        params.push(("options", options));
    }
    // pgoutput's text values are printed with the settings a restore parses them with.
    params.push(("client_encoding", "UTF8"));
    params.extend_from_slice(crate::session::TEXT_SETTINGS);
    frontend::startup_message(params, &mut conn.wbuf).map_err(|e| conn.io_err(e))?;
    conn.flush().await?;
    authenticate(conn, info).await?;
    loop {
        let msg = conn.read().await?;
        match msg.tag {
            b'K' => {}
            b'Z' => return Ok(()),
            b'v' => tracing::debug!("server negotiated protocol version"),
            _ => return Err(unexpected(&msg, "ReadyForQuery after authentication")),
        }
    }
}

fn password<'a>(info: &'a ConnInfo, method: &'static str) -> Result<&'a [u8], ReplicationError> {
    info.password().ok_or(ReplicationError::Auth {
        method,
        message: "the server requires a password and none was supplied".into(),
    })
}

/// Reads an Authentication ('R') message and returns its code and the rest of its body.
async fn read_auth(conn: &mut Conn) -> Result<(i32, bytes::Bytes), ReplicationError> {
    let msg = conn.read().await?;
    if msg.tag != b'R' {
        return Err(unexpected(&msg, "an authentication request"));
    }
    let code = Cursor::new(&msg.body).i32()?;
    Ok((code, msg.body.slice(4..)))
}

async fn authenticate(conn: &mut Conn, info: &ConnInfo) -> Result<(), ReplicationError> {
    let (code, body) = read_auth(conn).await?;
    match code {
        0 => return Ok(()),
        3 => {
            let pw = password(info, "password")?;
            frontend::password_message(pw, &mut conn.wbuf).map_err(|e| conn.io_err(e))?;
            conn.flush().await?;
        }
        5 => {
            let pw = password(info, "md5")?;
            let salt = Cursor::new(&body).bytes(4)?;
            let hash = md5_hash(
                info.user().as_bytes(),
                pw,
                [salt[0], salt[1], salt[2], salt[3]],
            );
            frontend::password_message(hash.as_bytes(), &mut conn.wbuf)
                .map_err(|e| conn.io_err(e))?;
            conn.flush().await?;
        }
        10 => scram(conn, info, &body).await?,
        2 => return Err(ReplicationError::UnsupportedAuth("Kerberos V5".into())),
        6 => return Err(ReplicationError::UnsupportedAuth("SCM credentials".into())),
        7 | 8 => return Err(ReplicationError::UnsupportedAuth("GSSAPI".into())),
        9 => return Err(ReplicationError::UnsupportedAuth("SSPI".into())),
        other => {
            return Err(ReplicationError::UnsupportedAuth(format!(
                "authentication request code {other}"
            )))
        }
    }
    match read_auth(conn).await? {
        (0, _) => Ok(()),
        (code, _) => Err(ReplicationError::protocol(format!(
            "unexpected authentication request {code} after the password was sent"
        ))),
    }
}

const SCRAM: &str = "SCRAM-SHA-256";

async fn scram(conn: &mut Conn, info: &ConnInfo, body: &[u8]) -> Result<(), ReplicationError> {
    let mut mechanisms = Vec::new();
    let mut c = Cursor::new(body);
    loop {
        let m = c.cstr()?;
        if m.is_empty() {
            break;
        }
        mechanisms.push(m.to_string());
    }
    if !mechanisms.iter().any(|m| m == SCRAM) {
        return Err(ReplicationError::UnsupportedAuth(format!(
            "SASL ({})",
            mechanisms.join(", ")
        )));
    }
    let pw = password(info, SCRAM)?;
    // No channel binding ("n,,"), over TLS too: SCRAM-SHA-256, not -PLUS.
    let mut scram = ScramSha256::new(pw, ChannelBinding::unsupported());
    frontend::sasl_initial_response(SCRAM, scram.message(), &mut conn.wbuf)
        .map_err(|e| conn.io_err(e))?;
    conn.flush().await?;

    let auth_err = |e: io::Error| ReplicationError::Auth {
        method: SCRAM,
        message: e.to_string(),
    };
    let (code, data) = read_auth(conn).await?;
    if code != 11 {
        return Err(ReplicationError::protocol(format!(
            "expected SASLContinue, got authentication request {code}"
        )));
    }
    scram.update(&data).map_err(auth_err)?;
    frontend::sasl_response(scram.message(), &mut conn.wbuf).map_err(|e| conn.io_err(e))?;
    conn.flush().await?;

    let (code, data) = read_auth(conn).await?;
    if code != 12 {
        return Err(ReplicationError::protocol(format!(
            "expected SASLFinal, got authentication request {code}"
        )));
    }
    scram.finish(&data).map_err(auth_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket options land on the socket: defaults, and the connection string's values.
    #[tokio::test]
    async fn replication_sockets_get_keepalives_and_the_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let none = |_: &str| None;
        for (s, idle, interval, count, user_timeout) in [
            ("host=127.0.0.1", 10, 5, 3, Some(30_000)),
            (
                "host=127.0.0.1 keepalives_idle=20 keepalives_interval=2 keepalives_count=4 tcp_user_timeout=1500",
                20,
                2,
                4,
                Some(1500),
            ),
        ] {
            let info = ConnInfo::parse_with_env(s, &none).unwrap();
            let s = connect_tcp("127.0.0.1", port, &info).await.unwrap();
            let r = socket2::SockRef::from(&s);
            assert!(r.keepalive().unwrap());
            assert_eq!(r.tcp_keepalive_time().unwrap(), Duration::from_secs(idle));
            assert_eq!(
                r.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(interval)
            );
            assert_eq!(r.tcp_keepalive_retries().unwrap(), count);
            assert_eq!(
                r.tcp_user_timeout().unwrap(),
                user_timeout.map(Duration::from_millis)
            );
        }
        let info = ConnInfo::parse_with_env("host=127.0.0.1 keepalives=0", &none).unwrap();
        let s = connect_tcp("127.0.0.1", port, &info).await.unwrap();
        assert!(!socket2::SockRef::from(&s).keepalive().unwrap());
    }
}
