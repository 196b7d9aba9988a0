//! Framing of backend messages, the connection's socket and buffers, and the byte layouts of the
//! replication sub-protocol (XLogData, primary keepalive, standby status update).
//!
//! Backend messages are a 1-byte tag and a big-endian i32 length that counts itself but not the
//! tag. We parse headers ourselves because postgres-protocol's backend parser does not know
//! CopyBothResponse ('W').

use std::collections::HashMap;
use std::io;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{parse_fields, server_error, ReplicationError};
use super::ReplicationMessage;
use crate::lsn::{Lsn, PgTimestamp};

/// The largest backend message we accept (length field, excluding the tag).
pub(crate) const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Size of a fresh read buffer: one socket read takes up to this much of a backlog (about a
/// thousand pgbench messages).
const READ_BUFFER: usize = 256 * 1024;
/// A read buffer with less room left than this is replaced before the next read.
const READ_ROOM: usize = 16 * 1024;

/// Backend message tags this client understands (simple query, COPY, startup).
const KNOWN_TAGS: &[u8] = b"RKSZTDCENIWHGdcAv";

/// One complete backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// Takes one complete message off the front of `buf`, or returns `Ok(None)` (leaving `buf`
/// untouched apart from reserving capacity) if it is not complete yet.
pub(crate) fn parse_frame(buf: &mut BytesMut) -> Result<Option<BackendMessage>, ReplicationError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if !KNOWN_TAGS.contains(&tag) {
        return Err(ReplicationError::protocol(format!(
            "unexpected backend message type 0x{tag:02x} ({:?})",
            tag as char
        )));
    }
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 || len as usize > MAX_MESSAGE_LEN {
        return Err(ReplicationError::protocol(format!(
            "invalid length {len} for backend message {:?}",
            tag as char
        )));
    }
    let total = 1 + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    // One split off the shared read buffer per message (a reference count, no copy); the
    // header is skipped in place.
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(BackendMessage {
        tag,
        body: frame.freeze(),
    }))
}

/// A bounds-checked reader over a message body.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ReplicationError> {
        if self.buf.len() < n {
            return Err(ReplicationError::protocol("backend message is truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, ReplicationError> {
        Ok(self.take(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, ReplicationError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, ReplicationError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ReplicationError> {
        self.take(n)
    }

    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// A NUL-terminated UTF-8 string.
    pub fn cstr(&mut self) -> Result<&'a str, ReplicationError> {
        let end =
            self.buf.iter().position(|&b| b == 0).ok_or_else(|| {
                ReplicationError::protocol("unterminated string in backend message")
            })?;
        let s = std::str::from_utf8(&self.buf[..end])
            .map_err(|_| ReplicationError::protocol("backend message string is not UTF-8"))?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Parses the payload of a CopyData message received during streaming. An XLogData's data is
/// `body` itself past its header (no new reference to the read buffer).
pub(crate) fn parse_copy_data(mut body: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    match body.first() {
        Some(b'w') => {
            if body.len() < 25 {
                return Err(ReplicationError::protocol(format!(
                    "XLogData message of {} bytes is shorter than its 25-byte header",
                    body.len()
                )));
            }
            let wal_start = Lsn(be_u64(&body[1..9]));
            let wal_end = Lsn(be_u64(&body[9..17]));
            let server_time = PgTimestamp(be_u64(&body[17..25]) as i64);
            body.advance(25);
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: body,
            })
        }
        Some(b'k') => {
            if body.len() < 18 {
                return Err(ReplicationError::protocol(format!(
                    "keepalive message of {} bytes is shorter than 18 bytes",
                    body.len()
                )));
            }
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(be_u64(&body[1..9])),
                server_time: PgTimestamp(be_u64(&body[9..17]) as i64),
                reply_requested: body[17] != 0,
            })
        }
        Some(&t) => Err(ReplicationError::protocol(format!(
            "unexpected replication message type 0x{t:02x} ({:?})",
            t as char
        ))),
        None => Err(ReplicationError::protocol("empty CopyData message")),
    }
}

/// Appends a standby status update ('r') wrapped in CopyData to `out`.
pub(crate) fn write_status_update(
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    now: PgTimestamp,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    let mut body = [0u8; 34];
    body[0] = b'r';
    body[1..9].copy_from_slice(&written.0.to_be_bytes());
    body[9..17].copy_from_slice(&flushed.0.to_be_bytes());
    body[17..25].copy_from_slice(&applied.0.to_be_bytes());
    body[25..33].copy_from_slice(&now.0.to_be_bytes());
    body[33] = reply_requested as u8;
    // 34 bytes cannot overflow the length field.
    if let Ok(msg) = frontend::CopyData::new(&body[..]) {
        msg.write(out);
    }
}

/// A socket: TCP or Unix-domain.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Socket for T {}

/// An open connection: socket, read buffer, pending output, and the server's parameters.
pub(crate) struct Conn {
    sock: Box<dyn Socket>,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
    /// Where we are connected, for error messages (never contains the password).
    pub target: String,
    /// ParameterStatus values reported by the server.
    pub params: HashMap<String, String>,
    /// When bytes last arrived from the server (or the connection opened).
    pub last_read: Instant,
}

impl Conn {
    pub fn new(sock: Box<dyn Socket>, target: String) -> Conn {
        Conn {
            sock,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: BytesMut::with_capacity(1024),
            target,
            params: HashMap::new(),
            last_read: Instant::now(),
        }
    }

    pub fn io_err(&self, e: io::Error) -> ReplicationError {
        ReplicationError::io(&self.target, e)
    }

    /// Reads the next message other than NoticeResponse, ParameterStatus and
    /// NotificationResponse, which are handled here.
    ///
    /// Cancel-safe: bytes are accumulated in the read buffer and a message is only taken off it
    /// once complete, with no await point between taking it and returning it.
    pub async fn read(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            if let Some(msg) = self.read_buffered()? {
                return Ok(msg);
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_ROOM {
                // The messages handed out share the buffer, so the room left at its end is
                // all a read could fill: start a new one (copying only a partial message)
                // rather than read its last few bytes in a call of their own.
                self.rbuf.reserve(READ_BUFFER);
            }
            let n = self
                .sock
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| self.io_err(e))?;
            if n == 0 {
                return Err(self.io_err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
            self.last_read = Instant::now();
        }
    }

    /// Like [`Conn::read`], but only from what is already received: `Ok(None)` when no whole
    /// message is buffered. Lets a reader take everything one socket read brought in one go.
    pub fn read_buffered(&mut self) -> Result<Option<BackendMessage>, ReplicationError> {
        while let Some(msg) = parse_frame(&mut self.rbuf)? {
            match msg.tag {
                b'N' => log_notice(&msg.body),
                b'S' => {
                    let mut c = Cursor::new(&msg.body);
                    let (k, v) = (c.cstr()?, c.cstr()?);
                    tracing::trace!(parameter = k, value = v, "server parameter");
                    self.params.insert(k.to_string(), v.to_string());
                }
                b'A' => tracing::debug!("ignoring NotificationResponse"),
                _ => return Ok(Some(msg)),
            }
        }
        Ok(None)
    }

    /// Writes and flushes everything in the output buffer. Not cancel-safe.
    pub async fn flush(&mut self) -> Result<(), ReplicationError> {
        let res = async {
            self.sock.write_all(&self.wbuf).await?;
            self.sock.flush().await
        }
        .await;
        self.wbuf.clear();
        res.map_err(|e| self.io_err(e))
    }

    /// Sends Terminate and shuts the socket down, ignoring errors (the server may be gone).
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.sock.shutdown().await;
    }

    /// Reads the rest of a failed exchange up to ReadyForQuery and returns `err`; if the
    /// connection dies first (a FATAL error), `err` is still what the caller gets.
    pub async fn drain_until_ready(&mut self, err: ReplicationError) -> ReplicationError {
        loop {
            match self.read().await {
                Ok(m) if m.tag == b'Z' => return err,
                Ok(_) => {}
                Err(_) => return err,
            }
        }
    }
}

/// Logs a NoticeResponse at a level matching its severity.
fn log_notice(body: &[u8]) {
    match parse_fields(body) {
        Ok(f) => match f.severity.as_str() {
            "WARNING" => {
                tracing::warn!(code = %f.code, detail = ?f.detail, "server: {}", f.message)
            }
            "DEBUG" => tracing::debug!(code = %f.code, "server: {}", f.message),
            _ => tracing::info!(code = %f.code, detail = ?f.detail, "server: {}", f.message),
        },
        Err(e) => tracing::warn!(error = %e, "unparsable NoticeResponse"),
    }
}

/// Returns the error of an ErrorResponse, or a protocol error naming what was expected.
pub(crate) fn unexpected(msg: &BackendMessage, expecting: &str) -> ReplicationError {
    if msg.tag == b'E' {
        server_error(&msg.body)
    } else {
        ReplicationError::protocol(format!(
            "unexpected backend message {:?} while waiting for {expecting}",
            msg.tag as char
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_survive_a_split_at_every_byte() {
        let mut wire = msg(b'd', b"kdata-one");
        wire.extend(msg(b'c', b""));
        wire.extend(msg(b'C', b"COPY 0\0"));
        let expected = vec![
            BackendMessage {
                tag: b'd',
                body: Bytes::from_static(b"kdata-one"),
            },
            BackendMessage {
                tag: b'c',
                body: Bytes::new(),
            },
            BackendMessage {
                tag: b'C',
                body: Bytes::from_static(b"COPY 0\0"),
            },
        ];
        for split in 0..=wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(chunk);
                while let Some(m) = parse_frame(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, expected, "split at {split}");
            assert!(buf.is_empty());
        }
        // And byte by byte.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in &wire {
            buf.extend_from_slice(&[*b]);
            while let Some(m) = parse_frame(&mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn bad_lengths_and_tags_are_protocol_errors() {
        for wire in [
            &[b'd', 0, 0, 0, 3][..],
            &[b'd', 0xff, 0xff, 0xff, 0xff],
            &[b'd', 0x40, 0, 0, 1],
            b"x",
            &[0],
        ] {
            let mut buf = BytesMut::from(wire);
            assert!(
                matches!(parse_frame(&mut buf), Err(ReplicationError::Protocol(_))),
                "{wire:?}"
            );
        }
        // Exactly the cap is accepted as a (not yet complete) header.
        let mut buf = BytesMut::from(&[b'd', 0x40, 0, 0, 0][..]);
        assert!(matches!(parse_frame(&mut buf), Ok(None)));
    }

    #[test]
    fn xlogdata_and_keepalive_parse() {
        let mut w = vec![b'w'];
        w.extend(0x16_B374_D848u64.to_be_bytes());
        w.extend(0x16_B374_D900u64.to_be_bytes());
        w.extend(12345i64.to_be_bytes());
        w.extend(b"Bpayload");
        match parse_copy_data(Bytes::from(w)).unwrap() {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                assert_eq!(wal_start.to_string(), "16/B374D848");
                assert_eq!(wal_end, Lsn(0x16_B374_D900));
                assert_eq!(server_time, PgTimestamp(12345));
                assert_eq!(&data[..], b"Bpayload");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend(7u64.to_be_bytes());
        k.extend((-1i64).to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k.clone())).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(7),
                server_time: PgTimestamp(-1),
                reply_requested: true
            }
        );
        for bad in [&k[..17], &[b'w'; 24][..], b"", b"zzzz"] {
            assert!(matches!(
                parse_copy_data(Bytes::copy_from_slice(bad)),
                Err(ReplicationError::Protocol(_))
            ));
        }
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        write_status_update(Lsn(1), Lsn(2), Lsn(3), PgTimestamp(4), true, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(be_u64(&out[6..]), 1);
        assert_eq!(be_u64(&out[14..]), 2);
        assert_eq!(be_u64(&out[22..]), 3);
        assert_eq!(be_u64(&out[30..]), 4);
        assert_eq!(out[38], 1);
    }
}
