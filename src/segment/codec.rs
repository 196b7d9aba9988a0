//! The segments' compression: [`Compression`], the codec a repository records for its
//! segments (and the format version each one is written in), and the zstd side of the format: a
//! compression context reused for every block of a builder, one decompression context per
//! thread, and the check that stored bytes are exactly one frame that declares its content size
//! (blocks of versions 2 and 3, version 3's commit index). LZ4 (version 1) needs no state: the
//! writer and the reader call `lz4_flex` directly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{hex, FORMAT_VERSION, ZSTD_MAGIC};

/// How a repository's segments are compressed: chosen when the repository is created,
/// recorded in its identity (`archive.json`'s `compression`), and used by every writer after.
/// A reader needs none of it: every segment's header names its own format version, and so its
/// codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd frames of columns, format version 3 (about 35 B per pgbench transaction). What
    /// every release wrote since segment format 2, so what an identity without the field means.
    #[default]
    Zstd,
    /// LZ4 blocks, format version 1 (about 190 B per pgbench transaction, a little less CPU).
    Lz4,
}

impl Compression {
    /// Every codec, in the order `--help` names them.
    pub const ALL: [Compression; 2] = [Compression::Zstd, Compression::Lz4];

    /// The name in `archive.json` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    /// The segment format version a writer of this codec writes.
    pub fn format_version(self) -> u16 {
        match self {
            Compression::Zstd => FORMAT_VERSION,
            Compression::Lz4 => 1,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Compression, String> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown compression {s:?}: expected zstd or lz4"))
    }
}

/// A zstd compression context, reused for every block of a builder (its tables are allocated
/// once), and a scratch buffer for the compressed frame.
pub(super) struct Zstd {
    cctx: zstd::bulk::Compressor<'static>,
    scratch: Vec<u8>,
}

impl Zstd {
    pub(super) fn new(level: i32) -> Zstd {
        Zstd {
            cctx: zstd::bulk::Compressor::new(level)
                .expect("zstd compression context (out of memory?)"),
            scratch: Vec::new(),
        }
    }
}

impl Zstd {
    /// Compresses `data` into one frame (declaring its content size) in the scratch buffer.
    pub(super) fn compress(&mut self, data: &[u8]) -> &[u8] {
        self.scratch.clear();
        self.scratch
            .reserve(zstd::zstd_safe::compress_bound(data.len()));
        let n = self
            .cctx
            .compress_to_buffer(data, &mut self.scratch)
            .expect("zstd output sized with compress_bound");
        &self.scratch[..n]
    }
}

impl fmt::Debug for Zstd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Zstd").finish_non_exhaustive()
    }
}

thread_local! {
    /// One zstd decompression context per thread, reused for every block.
    static ZSTD_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Checks that `stored` is exactly one zstd frame that declares its content size, and returns
/// that size.
pub(super) fn check_zstd_frame(stored: &[u8]) -> Result<u64, String> {
    if stored.get(..4) != Some(&ZSTD_MAGIC[..]) {
        return Err(format!(
            "not a zstd frame: starts with {}, expected {}",
            hex(&stored[..stored.len().min(4)]),
            hex(&ZSTD_MAGIC)
        ));
    }
    match zstd::zstd_safe::find_frame_compressed_size(stored) {
        Ok(len) if len == stored.len() => {}
        Ok(len) => {
            return Err(format!(
                "the zstd frame takes {len} of the {} stored bytes (exactly one frame is allowed)",
                stored.len()
            ))
        }
        Err(code) => return Err(zstd::zstd_safe::get_error_name(code).to_string()),
    }
    match zstd::zstd_safe::get_frame_content_size(stored) {
        Ok(Some(size)) => Ok(size),
        Ok(None) => Err("the frame does not declare its content size".to_string()),
        Err(_) => Err("the frame header is malformed".to_string()),
    }
}

/// Decompresses a checked frame ([`check_zstd_frame`]) that declares `size` bytes. The frame's
/// content size is checked by zstd, so more output is an error, not a write.
pub(super) fn zstd_decompress(stored: &[u8], size: usize) -> Result<Vec<u8>, String> {
    let mut data = Vec::with_capacity(size);
    let result = ZSTD_DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        let dctx = slot.as_mut().expect("set above");
        dctx.decompress_to_buffer(stored, &mut data)
    });
    match result {
        Ok(got) if got == size && data.len() == got => Ok(data),
        Ok(got) => Err(format!(
            "decompressed to {got} bytes, the frame declares {size}"
        )),
        Err(e) => Err(e.to_string()),
    }
}
