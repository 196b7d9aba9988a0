//! The replication-protocol client: a `replication=database` connection to the walsender,
//! replication commands (IDENTIFY_SYSTEM, slots, START_REPLICATION) and the CopyBoth stream.
//!
//! Owns: connecting and authenticating (trust, cleartext, md5, SCRAM-SHA-256; TLS as the
//! connection string's `sslmode` says, through `tls`),
//! the simple-query state of a replication connection, framing of backend messages, and the
//! replication sub-protocol (XLogData, primary keepalive, standby status update), TCP keepalives
//! on its socket, and the rule that presumes a silent server gone (`liveness`: the caller sends
//! the reply request it calls for, per the invariant below). Hands out the
//! raw payload of every XLogData, zero-copy, for `pgoutput` to decode and `segment` to store.
//!
//! Does not own: decoding pgoutput, deciding what is durable, or when to acknowledge.
//!
//! **Invariant: this module never sends a standby status update on its own.** Only
//! [`ReplicationStream::send_status`] does, with exactly the LSNs the caller passes; keepalives
//! that request a reply are surfaced to the caller, never answered here, and
//! [`ReplicationStream::finish`] ends the stream without a final acknowledgement. The server
//! persists the `flushed` LSN as the slot's `confirmed_flush_lsn`, so acknowledging anything not
//! yet durably archived would lose it.
//!
//! Why our own layer: no published crate fits a lossless archiver. `postgres-replication` is not
//! published on crates.io; `pgwire-replication` 0.5 hard-codes `proto_version` '1', drops the raw
//! bytes of Begin/Commit and acknowledges the start LSN by default; `pg_walstream` 0.10 is large,
//! seeds its acknowledgement from the start LSN and sends a final ack on stop; tokio-postgres can
//! open neither a `replication=database` connection nor CopyBoth. So this is a thin client on
//! `postgres-protocol` (same maintainers as tokio-postgres): its frontend message builders and
//! md5/SCRAM implementations; backend message headers are read here (1-byte tag + i32 length)
//! because its backend parser does not know CopyBothResponse ('W').

mod error;
mod liveness;
mod startup;
mod wire;

use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use postgres_protocol::message::frontend;

pub use self::error::ReplicationError;
pub use self::liveness::{ReceiveTimeout, SilenceWatch, Verdict};
use self::wire::{parse_copy_data, unexpected, write_status_update, Conn, Cursor};
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::sql::{quote_ident, quote_literal};

/// What IDENTIFY_SYSTEM reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier (`pg_control_system().system_identifier`).
    pub system_id: u64,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database connected to (`None` for a physical replication connection).
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// The LSN from which the slot streams changes: everything committed before it is in the
    /// exported snapshot, everything after it will be streamed.
    pub consistent_point: Lsn,
    /// The exported snapshot, usable with `SET TRANSACTION SNAPSHOT` on another connection
    /// (repeatable read / serializable) only until the next command is sent on this connection.
    pub snapshot_name: Option<String>,
}

/// A message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for logical replication, one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time: PgTimestamp,
        /// The payload, a zero-copy slice of the read buffer.
        data: Bytes,
    },
    /// Primary keepalive. If `reply_requested`, the server disconnects after
    /// `wal_sender_timeout` unless the caller sends a status update.
    Keepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// A `replication=database` connection in the simple-query state.
pub struct ReplicationClient {
    conn: Conn,
}

impl fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("target", &self.conn.target)
            .finish_non_exhaustive()
    }
}

/// Parses `server_version` ("15.18 (Debian 15.18-1.pgdg120+1)", "9.6.24", "17beta1") into the
/// `server_version_num` form (150018, 90624, 170000).
fn parse_server_version(v: &str) -> Option<u32> {
    let numeric: String = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    if major >= 10 {
        Some(major * 10000 + minor)
    } else {
        let patch = parts.next().flatten().unwrap_or(0);
        Some(major * 10000 + minor * 100 + patch)
    }
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut c = Cursor::new(body);
    let n = c.i16()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = c.i32()?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let v = c.bytes(len as usize)?;
        let s = std::str::from_utf8(v)
            .map_err(|_| ReplicationError::protocol("DataRow value is not UTF-8"))?;
        row.push(Some(s.to_string()));
    }
    if !c.rest().is_empty() {
        return Err(ReplicationError::protocol("trailing bytes in DataRow"));
    }
    Ok(row)
}

impl ReplicationClient {
    /// Connects and authenticates, trying each host of `info` in order, each within
    /// `info.connect_timeout()`. The session is set up with `client_encoding=UTF8`,
    /// `DateStyle=ISO`, `IntervalStyle=postgres`, `TimeZone=UTC`, `extra_float_digits=3`,
    /// `bytea_output=hex`, `search_path=pg_catalog` and `lc_monetary=C`, so that pgoutput's
    /// text values are unambiguous and identical to what a restore session prints.
    pub async fn connect(info: &ConnInfo) -> Result<Self, ReplicationError> {
        let conn = startup::connect(info).await?;
        tracing::debug!(target = %conn.target, "replication connection established");
        Ok(ReplicationClient { conn })
    }

    /// Where this client is connected (`user@host:port/db`, no password).
    pub fn target(&self) -> &str {
        &self.conn.target
    }

    /// A parameter the server reported (`server_version`, `server_encoding`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.params.get(name).map(String::as_str)
    }

    /// The server version as in `server_version_num` (e.g. 150018), 0 if not reported.
    pub fn server_version_num(&self) -> u32 {
        self.parameter("server_version_num")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                self.parameter("server_version")
                    .and_then(parse_server_version)
            })
            .unwrap_or(0)
    }

    /// Runs one command in the simple-query protocol and returns the rows of the last result
    /// set as text (`None` for NULL). Replication commands and, on a `replication=database`
    /// connection, ordinary SQL are accepted. COPY is refused.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        frontend::query(sql, &mut self.conn.wbuf).map_err(|e| self.conn.io_err(e))?;
        self.conn.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let msg = match self.conn.read().await {
                Ok(m) => m,
                // A FATAL error is followed by the server hanging up: report the error.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match msg.tag {
                b'T' => rows.clear(),
                b'D' => rows.push(parse_data_row(&msg.body)?),
                b'C' | b'I' => {}
                b'E' => {
                    error.get_or_insert(error::server_error(&msg.body));
                }
                b'Z' => break,
                b'G' => {
                    frontend::copy_fail("COPY is not supported here", &mut self.conn.wbuf)
                        .map_err(|e| self.conn.io_err(e))?;
                    self.conn.flush().await?;
                }
                b'H' | b'd' | b'c' => {
                    error.get_or_insert(ReplicationError::protocol(
                        "COPY TO STDOUT is not supported by simple_query",
                    ));
                }
                _ => return Err(unexpected(&msg, "a query result")),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Runs a command that must return exactly one row with at least `min_cols` columns.
    async fn one_row(
        &mut self,
        sql: &str,
        min_cols: usize,
    ) -> Result<Vec<Option<String>>, ReplicationError> {
        let mut rows = self.simple_query(sql).await?;
        if rows.len() != 1 || rows[0].len() < min_cols {
            return Err(ReplicationError::protocol(format!(
                "{} returned {} rows, expected one with {min_cols} columns",
                sql.split_whitespace().next().unwrap_or(""),
                rows.len()
            )));
        }
        Ok(rows.swap_remove(0))
    }

    /// IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let row = self.one_row("IDENTIFY_SYSTEM", 4).await?;
        let bad = |what: &str| ReplicationError::protocol(format!("IDENTIFY_SYSTEM: bad {what}"));
        Ok(SystemInfo {
            system_id: row[0]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("systemid"))?,
            timeline: row[1]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("timeline"))?,
            xlogpos: row[2]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("xlogpos"))?,
            dbname: row[3].clone(),
        })
    }

    /// Creates a logical replication slot using pgoutput.
    ///
    /// With `export_snapshot`, the returned [`SlotInfo::snapshot_name`] can be imported by other
    /// connections (`SET TRANSACTION SNAPSHOT`) **only until the next command is sent on this
    /// connection** (or it is closed): keep this client idle while the snapshot is in use.
    /// Fails inside a transaction.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        export_snapshot: bool,
    ) -> Result<SlotInfo, ReplicationError> {
        let temp = if temporary { " TEMPORARY" } else { "" };
        let sql = if self.server_version_num() >= 150000 || self.server_version_num() == 0 {
            let snap = if export_snapshot { "export" } else { "nothing" };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput (SNAPSHOT '{snap}')",
                quote_ident(name)
            )
        } else {
            let snap = if export_snapshot {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            };
            format!(
                "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput {snap}",
                quote_ident(name)
            )
        };
        let row = self.one_row(&sql, 3).await?;
        Ok(SlotInfo {
            name: row[0].clone().unwrap_or_else(|| name.to_string()),
            consistent_point: row[1]
                .as_deref()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    ReplicationError::protocol("CREATE_REPLICATION_SLOT: bad consistent_point")
                })?,
            snapshot_name: row[2].clone(),
        })
    }

    /// DROP_REPLICATION_SLOT; with `wait`, waits for an active slot to become inactive instead
    /// of failing.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(name)
        ))
        .await
        .map(drop)
    }

    /// The server's `wal_sender_timeout` (`SHOW wal_sender_timeout`); `None` when it is 0
    /// (disabled).
    pub async fn wal_sender_timeout(&mut self) -> Result<Option<Duration>, ReplicationError> {
        let row = self.one_row("SHOW wal_sender_timeout", 1).await?;
        let text = row[0].as_deref().unwrap_or("");
        let timeout =
            liveness::parse_setting_duration(text, Duration::from_millis(1)).ok_or_else(|| {
                ReplicationError::protocol(format!(
                    "SHOW wal_sender_timeout: cannot read {text:?} as a duration"
                ))
            })?;
        Ok(Some(timeout).filter(|t| !t.is_zero()))
    }

    /// START_REPLICATION of a logical slot from `start` (`Lsn::ZERO`: from the slot's
    /// `confirmed_flush_lsn`), with output plugin options such as `("proto_version", "2")`,
    /// `("publication_names", "\"pub\"")`, `("messages", "true")`. Names and values are quoted
    /// here. Returns once the server has entered CopyBoth mode.
    ///
    /// First reads the server's `wal_sender_timeout` ([`ReplicationStream::wal_sender_timeout`]),
    /// from which a caller bounds the server's silence ([`ReceiveTimeout::derived`]).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let wal_sender_timeout = match self.wal_sender_timeout().await {
            Ok(t) => t,
            Err(e @ ReplicationError::Io { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the server's wal_sender_timeout; the receive timeout takes its default");
                None
            }
        };
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_ident(slot)
        );
        if !options.is_empty() {
            let opts: Vec<String> = options
                .iter()
                .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
                .collect();
            sql.push_str(&format!(" ({})", opts.join(", ")));
        }
        tracing::debug!(command = %sql, "starting replication");
        frontend::query(&sql, &mut self.conn.wbuf).map_err(|e| self.conn.io_err(e))?;
        self.conn.flush().await?;
        let msg = self.conn.read().await?;
        match msg.tag {
            b'W' => {}
            b'E' => {
                let err = error::server_error(&msg.body);
                return Err(self.conn.drain_until_ready(err).await);
            }
            _ => return Err(unexpected(&msg, "CopyBothResponse")),
        }
        Ok(ReplicationStream {
            conn: self.conn,
            state: StreamState::Copying,
            wal_sender_timeout,
        })
    }

    /// Sends Terminate and closes the connection.
    pub async fn close(self) {
        self.conn.terminate().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// In CopyBoth.
    Copying,
    /// The server sent CopyDone; it waits for ours.
    ServerCopyDone,
    /// The server left copy mode (CommandComplete seen); ReadyForQuery follows.
    Ended,
    /// ReadyForQuery seen.
    Ready,
}

/// A logical replication stream (CopyBoth mode).
pub struct ReplicationStream {
    conn: Conn,
    state: StreamState,
    wal_sender_timeout: Option<Duration>,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("target", &self.conn.target)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// The server's `wal_sender_timeout` as read when the stream started; `None`: disabled, or
    /// it could not be read.
    pub fn wal_sender_timeout(&self) -> Option<Duration> {
        self.wal_sender_timeout
    }

    /// When bytes last arrived from the server (a whole message or part of one).
    pub fn last_received(&self) -> Instant {
        self.conn.last_read
    }

    /// The error that ends a stream whose server stayed silent for `timeout`'s bound: an I/O
    /// error (retryable: reconnecting may succeed) naming the bound.
    pub fn presumed_dead(&self, timeout: &ReceiveTimeout) -> ReplicationError {
        ReplicationError::io(
            &self.conn.target,
            std::io::Error::new(std::io::ErrorKind::TimedOut, timeout.dead_message()),
        )
    }

    /// Next message; `Ok(None)` once the server ended the copy (CopyDone / CommandComplete).
    ///
    /// Cancel-safe: partial reads stay buffered, so it can be used in `tokio::select!`.
    /// Never answers keepalives: a `reply_requested` keepalive is returned to the caller.
    pub async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        if self.state != StreamState::Copying {
            return Ok(None);
        }
        let msg = self.conn.read().await?;
        self.copy_message(msg)
    }

    /// The next message if a whole one is already received, without waiting for the socket:
    /// `None` when none is (or the copy has ended). With [`ReplicationStream::next`], lets the
    /// caller hand on everything one socket read brought at once.
    pub fn next_buffered(&mut self) -> Option<Result<ReplicationMessage, ReplicationError>> {
        if self.state != StreamState::Copying {
            return None;
        }
        match self.conn.read_buffered() {
            Ok(Some(msg)) => self.copy_message(msg).transpose(),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn copy_message(
        &mut self,
        msg: wire::BackendMessage,
    ) -> Result<Option<ReplicationMessage>, ReplicationError> {
        match msg.tag {
            b'd' => parse_copy_data(msg.body).map(Some),
            b'c' => {
                self.state = StreamState::ServerCopyDone;
                Ok(None)
            }
            b'C' => {
                self.state = StreamState::Ended;
                Ok(None)
            }
            b'Z' => {
                self.state = StreamState::Ready;
                Ok(None)
            }
            _ => Err(unexpected(&msg, "replication data")),
        }
    }

    /// Sends a standby status update ('r'): the `written`, `flushed` and `applied` LSNs, our
    /// clock, and whether we ask the server to reply with a keepalive. The server persists
    /// `flushed` as the slot's `confirmed_flush_lsn` (`Lsn::ZERO` confirms nothing).
    ///
    /// Not cancel-safe: do not race it against other futures.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        write_status_update(
            written,
            flushed,
            applied,
            PgTimestamp::now(),
            reply_requested,
            &mut self.conn.wbuf,
        );
        self.conn.flush().await
    }

    /// Ends the stream cleanly: CopyDone, read (and discard) until the server's ReadyForQuery,
    /// then Terminate. Sends no status update. Data the server sent after our last
    /// acknowledgement is dropped here and will be streamed again on the next start.
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        if matches!(
            self.state,
            StreamState::Copying | StreamState::ServerCopyDone
        ) {
            frontend::copy_done(&mut self.conn.wbuf);
            self.conn.flush().await?;
        }
        let mut discarded = 0usize;
        let mut error = None;
        while self.state != StreamState::Ready {
            let msg = match self.conn.read().await {
                Ok(m) => m,
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match msg.tag {
                b'd' => discarded += 1,
                b'c' | b'C' => {}
                b'E' => {
                    error.get_or_insert(error::server_error(&msg.body));
                }
                b'Z' => self.state = StreamState::Ready,
                _ => return Err(unexpected(&msg, "the end of replication")),
            }
        }
        if discarded > 0 {
            tracing::debug!(discarded, "discarded replication messages after CopyDone");
        }
        self.conn.terminate().await;
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
impl ReplicationStream {
    /// A stream over any socket, for tests with a scripted server.
    pub(crate) fn from_socket(sock: Box<dyn wire::Socket>) -> Self {
        ReplicationStream {
            conn: Conn::new(sock, "test".into()),
            state: StreamState::Copying,
            wal_sender_timeout: None,
        }
    }
}

#[cfg(test)]
mod tests;
