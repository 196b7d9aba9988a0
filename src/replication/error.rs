//! The error type of the replication client and the parsing of `ErrorResponse` fields.

use std::fmt;
use std::io;

use super::wire::Cursor;

/// Why a replication-protocol operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed (connect, read, write, timeout, or the server hung up).
    #[error("I/O error on replication connection to {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: io::Error,
    },
    /// The server sent something this client does not understand.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// Authentication failed on our side (no password, bad SCRAM exchange, …).
    #[error("authentication ({method}) failed: {message}")]
    Auth {
        method: &'static str,
        message: String,
    },
    /// The server reported an error (`ErrorResponse`).
    #[error("{}", ServerErrorDisplay { message, code, detail, hint })]
    Server {
        severity: String,
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// TLS was required and refused, or its handshake failed on a certificate: retrying does
    /// not help until someone changes the server or the connection string.
    #[error("replication connection to {target}: {source}")]
    Tls {
        target: String,
        #[source]
        source: crate::tls::TlsError,
    },
    /// The server asked for an authentication method this client does not implement.
    #[error("server requested unsupported authentication method {0}")]
    UnsupportedAuth(String),
}

impl crate::error::Classify for ReplicationError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            ReplicationError::Io { .. }
            | ReplicationError::Protocol(_)
            | ReplicationError::Auth { .. }
            | ReplicationError::Server { .. }
            | ReplicationError::Tls { .. }
            | ReplicationError::UnsupportedAuth(_) => Database,
        }
    }
}

struct ServerErrorDisplay<'a> {
    message: &'a str,
    code: &'a str,
    detail: &'a Option<String>,
    hint: &'a Option<String>,
}

impl fmt::Display for ServerErrorDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether reconnecting later may succeed without anyone changing anything: I/O errors,
    /// connection exceptions (08xxx), administrator/crash shutdown and "cannot connect now"
    /// (57P01, 57P02, 57P03). Everything else — authentication (28xxx), a missing slot (42704),
    /// wrong state such as `wal_level` or an active slot (55000, 55006), missing privilege
    /// (42501), no free slot (53400), protocol errors — needs a human.
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplicationError::Io { .. } => true,
            ReplicationError::Server { code, .. } => {
                code.starts_with("08") || matches!(code.as_str(), "57P01" | "57P02" | "57P03")
            }
            ReplicationError::Protocol(_)
            | ReplicationError::Auth { .. }
            | ReplicationError::Tls { .. }
            | ReplicationError::UnsupportedAuth(_) => false,
        }
    }

    pub(crate) fn io(target: &str, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: target.to_string(),
            source,
        }
    }

    pub(crate) fn protocol(msg: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol(msg.into())
    }
}

/// The fields of an `ErrorResponse` or `NoticeResponse` we keep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ServerFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// Parses the body of an `ErrorResponse`/`NoticeResponse`: `(type byte, C string)*` then `\0`.
pub(crate) fn parse_fields(body: &[u8]) -> Result<ServerFields, ReplicationError> {
    let mut cur = Cursor::new(body);
    let mut f = ServerFields::default();
    let mut localized_severity = None;
    loop {
        let t = cur.u8()?;
        if t == 0 {
            break;
        }
        let v = cur.cstr()?.to_string();
        match t {
            b'V' => f.severity = v,
            b'S' => localized_severity = Some(v),
            b'C' => f.code = v,
            b'M' => f.message = v,
            b'D' => f.detail = Some(v),
            b'H' => f.hint = Some(v),
            _ => {}
        }
    }
    if f.severity.is_empty() {
        f.severity = localized_severity.unwrap_or_default();
    }
    Ok(f)
}

/// Turns an `ErrorResponse` body into [`ReplicationError::Server`].
pub(crate) fn server_error(body: &[u8]) -> ReplicationError {
    match parse_fields(body) {
        Ok(f) => ReplicationError::Server {
            severity: f.severity,
            code: f.code,
            message: f.message,
            detail: f.detail,
            hint: f.hint,
        },
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(u8, &str)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (t, s) in pairs {
            v.push(*t);
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn error_fields_parse_and_display() {
        let body = fields(&[
            (b'S', "FEHLER"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (b'M', "replication slot \"x\" does not exist"),
            (b'H', "create it first"),
            (b'F', "slot.c"),
            (b'L', "123"),
        ]);
        let e = server_error(&body);
        assert_eq!(e.sqlstate(), Some("42704"));
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "replication slot \"x\" does not exist (SQLSTATE 42704); HINT: create it first"
        );
        match e {
            ReplicationError::Server {
                severity, detail, ..
            } => {
                assert_eq!(severity, "ERROR");
                assert_eq!(detail, None);
            }
            other => panic!("{other:?}"),
        }
        let body = fields(&[(b'S', "FATAL"), (b'C', "57P01"), (b'M', "bye")]);
        let e = server_error(&body);
        assert!(e.is_retryable());
        assert!(matches!(&e, ReplicationError::Server { severity, .. } if severity == "FATAL"));
    }

    #[test]
    fn truncated_error_fields_are_protocol_errors() {
        for body in [&b""[..], b"Cabc", b"C42704\0M"] {
            assert!(matches!(server_error(body), ReplicationError::Protocol(_)));
        }
    }

    #[test]
    fn retryability_by_class() {
        let s = |code: &str| ReplicationError::Server {
            severity: "FATAL".into(),
            code: code.into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        for code in ["57P01", "57P03", "08006", "08P01"] {
            assert!(s(code).is_retryable(), "{code}");
        }
        for code in [
            "28P01", "28000", "42704", "55000", "55006", "42501", "53400",
        ] {
            assert!(!s(code).is_retryable(), "{code}");
        }
        assert!(ReplicationError::io("x", io::ErrorKind::UnexpectedEof.into()).is_retryable());
        assert!(!ReplicationError::protocol("x").is_retryable());
    }
}
