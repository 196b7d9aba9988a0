//! Base backups: taking one at a snapshot aligned with the change stream, and loading one.
//!
//! Owns: the objects under `basebackups/<id>/` (see `proto/manifest.md`): the schema
//! (`pg_dump --schema-only -Fc`), the table data (COPY binary where every column type allows it,
//! else COPY text; cut into parts of at most
//! [`PART_LIMIT`] bytes at row boundaries, lz4-framed; big tables read in block ranges of
//! [`SPLIT_BLOCKS`] on all connections), the sequences' values, and the manifest, written last:
//! a folder without a manifest is an incomplete backup and is ignored. The manifest's types and
//! its reading are the catalog's ([`crate::catalog::manifest`], re-exported here).
//!
//! Two jobs, one file each: `take.rs` takes a backup ([`take()`], [`take_with`]: the snapshot's
//! reads, the COPY of table parts, the cutter), `load.rs` loads one ([`Loader`], phase by
//! phase, and [`raise_sequences`]). This file holds what both share: the error, the session
//! settings and COPY column lists, the running of PostgreSQL's client programs, and the lz4
//! framing of a stored part.
//!
//! Throughput: the schema dump runs while the tables are copied; each connection's parts are
//! compressed and stored while its COPY keeps streaming; loading runs one COPY per part on every
//! connection, each fetching its next part while it loads one, and builds indexes only after
//! the data, with [`RESTORE_MAINTENANCE_WORK_MEM`].
//!
//! Does not own: the replication slot and snapshot (see `replication`), choosing a backup or
//! checking the target database is empty (see `restore`).

pub mod cut;
mod load;
pub mod lock;
mod take;
pub mod toc;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::conninfo::ConnInfoError;
use crate::pgbin::PgBinError;
use crate::store::{Store, StoreError};

use crate::catalog::manifest;
pub use crate::catalog::manifest::{
    backup_id, manifest_key, part_key, schema_key, CopyFormat, KeyKind, KeyObject, Manifest,
    ManifestError, Origin, PartEntry, SchemaEntry, SequenceEntry, TableEntry, Totals,
    FORMAT_VERSION, MIN_FORMAT_VERSION,
};
pub use load::{
    check_part, check_schema, raise_sequences, LoadPhase, LoadStats, Loader,
    RESTORE_MAINTENANCE_WORK_MEM,
};
pub use take::{take, take_with, BackupRequest, TakeOptions, PART_LIMIT, SPLIT_BLOCKS};

/// Why a backup could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A part or schema dump that does not decode (a store error converts to
    /// [`BackupError::Store`]).
    #[error(transparent)]
    Object(crate::object::ObjectError),
    #[error(transparent)]
    Connect(#[from] ConnInfoError),
    #[error("{context}: {}", crate::error::describe_pg(.source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    PgBin(#[from] PgBinError),
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: stored object is corrupt: its CRC-32 is {actual:08x} but the manifest records {expected:08x}\nHINT: this base backup cannot be loaded; restore from another base backup (an earlier --to-time), or from another copy of the repository")]
    Corrupt {
        key: String,
        expected: u32,
        actual: u32,
    },
    #[error("{key}: {message}")]
    BadObject { key: String, message: String },
    #[error("{location}: base backup {id} already exists")]
    Exists { location: String, id: String },
    #[error("publication {publication:?} does not exist in database {database:?}\nHINT: create it with `tidemark setup`, or pass the --publication that exists")]
    NoPublication {
        publication: String,
        database: String,
    },
}

impl crate::error::Classify for BackupError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            BackupError::Store(e) => e.exit_status(),
            BackupError::Object(e) => e.exit_status(),
            BackupError::Connect(e) => e.exit_status(),
            BackupError::PgBin(e) => e.exit_status(),
            BackupError::Postgres { .. } | BackupError::Tool { .. } => Database,
            BackupError::NoPublication { .. } => Database,
            BackupError::Io { .. } => Unexpected,
            BackupError::Corrupt { .. } | BackupError::BadObject { .. } => Damaged,
            BackupError::Exists { .. } => Repository,
        }
    }
}

impl From<crate::object::ObjectError> for BackupError {
    fn from(e: crate::object::ObjectError) -> BackupError {
        match e {
            crate::object::ObjectError::Store(e) => BackupError::Store(e),
            e => BackupError::Object(e),
        }
    }
}

fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Postgres { context, source }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

pub use crate::sql::{qualified, quote_ident, quote_literal};

/// Session settings for every connection that reads or writes COPY text, so the text means the
/// same on both sides whatever the servers' and roles' defaults.
/// `row_security = off` makes a COPY fail rather than silently skip rows hidden by a policy.
fn session_settings() -> String {
    crate::session::set_statements(&[
        ("statement_timeout", "0"),
        ("lock_timeout", "0"),
        ("idle_in_transaction_session_timeout", "0"),
        ("row_security", "off"),
    ])
}

/// ` (FORMAT binary)` for binary COPY, nothing for text.
fn format_option(format: CopyFormat) -> &'static str {
    match format {
        CopyFormat::Text => "",
        CopyFormat::Binary => " (FORMAT binary)",
    }
}

fn column_list(columns: &[String]) -> String {
    if columns.is_empty() {
        return String::new();
    }
    let cols: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    format!(" ({})", cols.join(", "))
}

/// Runs a PostgreSQL client program; returns its standard output.
async fn run_tool(
    program: &Path,
    args: &[&str],
    env: Vec<(String, String)>,
) -> Result<Vec<u8>, BackupError> {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.display().to_string());
    tracing::debug!(program = %name, ?args, "running");
    let out = tokio::process::Command::new(program)
        .args(args)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(io_err(format!("running {}", program.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(BackupError::Tool {
            program: name,
            status: out.status.to_string(),
            stderr,
        });
    }
    if !stderr.is_empty() {
        tracing::warn!(program = %name, %stderr, "messages from a PostgreSQL program");
    }
    Ok(out.stdout)
}

/// lz4 frame format (readable by `lz4 -d`), with the content size and a content checksum.
fn compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let info = lz4_flex::frame::FrameInfo::new()
        .content_size(Some(data.len() as u64))
        .content_checksum(true);
    let mut enc =
        lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::with_capacity(data.len() / 3));
    enc.write_all(data)?;
    enc.finish().map_err(std::io::Error::other)
}

/// Decompresses an lz4 frame in pieces of at most `size` bytes; the frame's content checksum
/// is checked when the end is read (the last item is then an error if it does not match).
struct Pieces<'a> {
    decoder: lz4_flex::frame::FrameDecoder<&'a [u8]>,
    size: usize,
    failed: bool,
}

fn pieces(data: &[u8], size: usize) -> Pieces<'_> {
    Pieces {
        decoder: lz4_flex::frame::FrameDecoder::new(data),
        size,
        failed: false,
    }
}

impl Iterator for Pieces<'_> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut piece = Vec::with_capacity(self.size);
        match (&mut self.decoder)
            .take(self.size as u64)
            .read_to_end(&mut piece)
        {
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
            Ok(0) => None,
            Ok(_) => Some(Ok(piece)),
        }
    }
}

/// The complete base backups in the store ([`manifest::list_manifests`]), with a failing store
/// reported as a base-backup error: what the archiver and `backup` read before taking one.
pub async fn list_manifests(store: &Arc<dyn Store>) -> Result<Vec<Manifest>, BackupError> {
    Ok(manifest::list_manifests(store).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
        Ok(pieces(data, 1000).collect::<Result<Vec<_>, _>>()?.concat())
    }

    #[test]
    fn parts_decompress_in_pieces() {
        let data: Vec<u8> = (0..=255u8).cycle().take(2500).collect();
        let c = compress(&data).unwrap();
        let got: Vec<Vec<u8>> = pieces(&c, 1000).map(Result::unwrap).collect();
        assert_eq!(
            got.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(got.concat(), data);
        assert_eq!(pieces(&compress(b"").unwrap(), 1000).count(), 0);
    }

    #[test]
    fn compression_is_lz4_frame_with_checksum() {
        let data = b"1\thello\n2\tworld\n".repeat(1000);
        let c = compress(&data).unwrap();
        assert_eq!(&c[..4], &[0x04, 0x22, 0x4d, 0x18], "lz4 frame magic");
        assert!(c.len() < data.len());
        assert_eq!(decompress(&c).unwrap(), data);
        let mut bad = c.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        assert!(decompress(&bad).is_err(), "content checksum catches damage");
    }
}
