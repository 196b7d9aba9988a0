//! Cutting a stream of COPY output (text or binary format) into parts at row boundaries.
//!
//! In COPY's text format every row ends with a newline byte, and a newline inside a value is
//! escaped (`\n`), so every 0x0A byte ends a row. A part holds whole rows and at most `limit`
//! bytes, except that a single row longer than `limit` forms a part of its own.

/// A finished part: whole rows of COPY text.
#[derive(Debug, PartialEq, Eq)]
pub struct RawPart {
    pub data: Vec<u8>,
    pub rows: u64,
}

/// Feeds on arbitrary chunks of COPY text, hands out parts.
#[derive(Debug)]
pub struct PartCutter {
    limit: usize,
    cur: Vec<u8>,
    cur_rows: u64,
    /// The beginning of a row whose newline has not arrived yet.
    tail: Vec<u8>,
}

/// COPY output that does not end with a newline.
#[derive(Debug, thiserror::Error)]
#[error("COPY output ended in the middle of a row ({0} bytes after the last newline)")]
pub struct TruncatedRow(pub usize);

impl PartCutter {
    pub fn new(limit: usize) -> PartCutter {
        assert!(limit > 0);
        PartCutter {
            limit,
            cur: Vec::new(),
            cur_rows: 0,
            tail: Vec::new(),
        }
    }

    /// Adds a chunk; returns the parts it completed.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<RawPart> {
        let mut out = Vec::new();
        if !self.tail.is_empty() {
            match memchr::memchr(b'\n', data) {
                None => {
                    self.tail.extend_from_slice(data);
                    return out;
                }
                Some(i) => {
                    self.tail.extend_from_slice(&data[..=i]);
                    let row = std::mem::take(&mut self.tail);
                    self.add_rows(&row, &mut out);
                    data = &data[i + 1..];
                }
            }
        }
        match memchr::memrchr(b'\n', data) {
            None => self.tail.extend_from_slice(data),
            Some(j) => {
                self.add_rows(&data[..=j], &mut out);
                self.tail.extend_from_slice(&data[j + 1..]);
            }
        }
        out
    }

    /// Ends the stream; returns the last part, if any rows are left.
    pub fn finish(mut self) -> Result<Option<RawPart>, TruncatedRow> {
        if !self.tail.is_empty() {
            return Err(TruncatedRow(self.tail.len()));
        }
        Ok(self.take_part())
    }

    /// `rows` is a run of whole rows (ends with a newline).
    fn add_rows(&mut self, mut rows: &[u8], out: &mut Vec<RawPart>) {
        while !rows.is_empty() {
            let room = self.limit.saturating_sub(self.cur.len());
            if rows.len() <= room {
                self.append(rows);
                return;
            }
            match memchr::memrchr(b'\n', &rows[..room]) {
                Some(k) => {
                    self.append(&rows[..=k]);
                    rows = &rows[k + 1..];
                }
                None if self.cur.is_empty() => {
                    // A single row longer than the limit: a part of its own.
                    let k = rows
                        .iter()
                        .position(|&b| b == b'\n')
                        .expect("rows end with a newline");
                    self.append(&rows[..=k]);
                    rows = &rows[k + 1..];
                }
                None => {}
            }
            out.extend(self.take_part());
        }
    }

    fn append(&mut self, rows: &[u8]) {
        if self.cur.capacity() == 0 {
            // Once, up front: growing by doubling would copy the part over and over. Untouched
            // capacity costs address space only.
            self.cur.reserve(self.limit.max(rows.len()));
        }
        self.cur_rows += memchr::memchr_iter(b'\n', rows).count() as u64;
        self.cur.extend_from_slice(rows);
    }

    fn take_part(&mut self) -> Option<RawPart> {
        if self.cur.is_empty() {
            return None;
        }
        let rows = std::mem::take(&mut self.cur_rows);
        Some(RawPart {
            data: std::mem::take(&mut self.cur),
            rows,
        })
    }
}

/// The header of a binary COPY stream with no flags and no header extension: what every stored
/// binary part starts with (signature, flags, extension length).
pub const BINARY_HEADER: [u8; 19] = *b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The trailer of a binary COPY stream (a field count of -1).
pub const BINARY_TRAILER: [u8; 2] = [0xff, 0xff];

/// Binary COPY output that cannot be cut into rows.
#[derive(Debug, thiserror::Error)]
pub enum BinaryStreamError {
    #[error("binary COPY output does not start with the PGCOPY signature")]
    Signature,
    #[error("binary COPY output has header flags {0:#x} (OIDs or unknown critical flags)")]
    Flags(u32),
    #[error("binary COPY output has a row with a field of length {0}")]
    FieldLength(i32),
    #[error("binary COPY output has a row with field count {0}")]
    FieldCount(i16),
    #[error("binary COPY output continues after its trailer")]
    AfterTrailer,
    #[error("binary COPY output ended without its trailer ({0} bytes of an unfinished row)")]
    Truncated(usize),
}

/// Cuts a stream of binary COPY output (`COPY … TO STDOUT (FORMAT binary)`) into parts of whole
/// rows. Every part is a complete binary COPY stream of its own: [`BINARY_HEADER`], rows,
/// [`BINARY_TRAILER`], at most `limit` bytes of rows (a single larger row makes a part of its
/// own).
#[derive(Debug)]
pub struct BinaryCutter {
    limit: usize,
    /// Header, then the rows of the part being filled (no trailer yet).
    cur: Vec<u8>,
    cur_rows: u64,
    /// Bytes of an unfinished row (or of the unfinished stream header).
    pending: Vec<u8>,
    header_done: bool,
    ended: bool,
}

/// Where the row starting at `data[0]` ends.
enum RowEnd {
    Row(usize),
    Trailer,
    Incomplete,
}

fn row_end(data: &[u8]) -> Result<RowEnd, BinaryStreamError> {
    let Some(n) = data.get(..2) else {
        return Ok(RowEnd::Incomplete);
    };
    let n = i16::from_be_bytes([n[0], n[1]]);
    if n == -1 {
        return Ok(RowEnd::Trailer);
    }
    if n < 0 {
        return Err(BinaryStreamError::FieldCount(n));
    }
    let mut i = 2usize;
    for _ in 0..n {
        let Some(l) = data.get(i..i + 4) else {
            return Ok(RowEnd::Incomplete);
        };
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        i += 4;
        match len {
            -1 => {}
            l if l < 0 => return Err(BinaryStreamError::FieldLength(l)),
            l => i += l as usize,
        }
        if i > data.len() {
            return Ok(RowEnd::Incomplete);
        }
    }
    Ok(RowEnd::Row(i))
}

impl BinaryCutter {
    pub fn new(limit: usize) -> BinaryCutter {
        assert!(limit > 0);
        BinaryCutter {
            limit,
            cur: Vec::new(),
            cur_rows: 0,
            pending: Vec::new(),
            header_done: false,
            ended: false,
        }
    }

    /// Adds a chunk; returns the parts it completed.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<RawPart>, BinaryStreamError> {
        let mut out = Vec::new();
        if self.ended {
            if data.is_empty() {
                return Ok(out);
            }
            return Err(BinaryStreamError::AfterTrailer);
        }
        if self.pending.is_empty() {
            let used = self.consume(data, &mut out)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(data);
            let used = self.consume(&pending, &mut out)?;
            pending.drain(..used);
            self.pending = pending;
        }
        if self.ended && !self.pending.is_empty() {
            return Err(BinaryStreamError::AfterTrailer);
        }
        Ok(out)
    }

    /// Ends the stream; returns the last part, if any rows are left.
    pub fn finish(mut self) -> Result<Option<RawPart>, BinaryStreamError> {
        if !self.ended {
            return Err(BinaryStreamError::Truncated(self.pending.len()));
        }
        Ok(self.take_part())
    }

    /// Cuts what it can of `data`; returns how many bytes it used.
    fn consume(&mut self, data: &[u8], out: &mut Vec<RawPart>) -> Result<usize, BinaryStreamError> {
        let mut i = 0;
        if !self.header_done {
            if data.len() < BINARY_HEADER.len() {
                if !BINARY_HEADER[..11].starts_with(&data[..data.len().min(11)]) {
                    return Err(BinaryStreamError::Signature);
                }
                return Ok(0);
            }
            if data[..11] != BINARY_HEADER[..11] {
                return Err(BinaryStreamError::Signature);
            }
            let flags = u32::from_be_bytes([data[11], data[12], data[13], data[14]]);
            // Bit 16: OIDs included; bits 17-31 are critical (unknown); 0-15 may be ignored.
            if flags & 0xffff_0000 != 0 {
                return Err(BinaryStreamError::Flags(flags));
            }
            let ext = u32::from_be_bytes([data[15], data[16], data[17], data[18]]) as usize;
            if data.len() < 19 + ext {
                return Ok(0);
            }
            i = 19 + ext;
            self.header_done = true;
        }
        // A run of whole rows not yet appended to the current part.
        let mut run = i;
        let mut run_rows = 0u64;
        loop {
            let end = match row_end(&data[i..])? {
                RowEnd::Incomplete => break,
                RowEnd::Trailer => {
                    self.ended = true;
                    self.append(&data[run..i], run_rows);
                    return Ok(i + 2);
                }
                RowEnd::Row(len) => i + len,
            };
            let filled = self.cur.len().saturating_sub(BINARY_HEADER.len()) + (i - run);
            if filled + (end - i) > self.limit && filled > 0 {
                self.append(&data[run..i], run_rows);
                out.extend(self.take_part());
                run = i;
                run_rows = 0;
            }
            run_rows += 1;
            i = end;
        }
        self.append(&data[run..i], run_rows);
        Ok(i)
    }

    fn append(&mut self, rows: &[u8], n: u64) {
        if n == 0 {
            return;
        }
        if self.cur.is_empty() {
            // Once, up front (see PartCutter::append).
            self.cur
                .reserve(BINARY_HEADER.len() + self.limit.max(rows.len()) + BINARY_TRAILER.len());
            self.cur.extend_from_slice(&BINARY_HEADER);
        }
        self.cur.extend_from_slice(rows);
        self.cur_rows += n;
    }

    fn take_part(&mut self) -> Option<RawPart> {
        if self.cur_rows == 0 {
            return None;
        }
        self.cur.extend_from_slice(&BINARY_TRAILER);
        Some(RawPart {
            data: std::mem::take(&mut self.cur),
            rows: std::mem::take(&mut self.cur_rows),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(input: &[u8], chunk: usize, limit: usize) -> Vec<RawPart> {
        let mut c = PartCutter::new(limit);
        let mut parts = Vec::new();
        for ch in input.chunks(chunk.max(1)) {
            parts.extend(c.push(ch));
        }
        parts.extend(c.finish().unwrap());
        parts
    }

    fn check(input: &[u8], parts: &[RawPart], limit: usize) {
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.data.clone()).collect();
        assert_eq!(joined, input, "parts concatenate to the input");
        let total_rows: u64 = parts.iter().map(|p| p.rows).sum();
        assert_eq!(
            total_rows,
            input.iter().filter(|&&b| b == b'\n').count() as u64
        );
        for p in parts {
            assert!(p.data.ends_with(b"\n"), "parts end at a row boundary");
            assert_eq!(
                p.rows,
                p.data.iter().filter(|&&b| b == b'\n').count() as u64
            );
            assert!(
                p.data.len() <= limit || p.rows == 1,
                "only a single oversized row may exceed the limit"
            );
            assert!(!p.data.is_empty());
        }
    }

    #[test]
    fn cuts_at_row_boundaries_for_any_chunking() {
        let mut input = Vec::new();
        for i in 0..200 {
            input.extend_from_slice(format!("{i}\t{}\n", "x".repeat(i % 37)).as_bytes());
        }
        for limit in [1, 5, 16, 40, 100, 1000, 100_000] {
            for chunk in [1, 3, 7, 64, 1000, input.len()] {
                let parts = cut(&input, chunk, limit);
                check(&input, &parts, limit);
                // Greedy: a part is only cut when the next row would not fit.
                for w in parts.windows(2) {
                    let next_row_len = w[1].data.iter().position(|&b| b == b'\n').unwrap() + 1;
                    assert!(w[0].data.len() + next_row_len > limit);
                }
            }
        }
    }

    #[test]
    fn oversized_row_is_its_own_part() {
        let input = b"a\nbbbbbbbbbbbb\nc\n";
        let parts = cut(input, 4, 5);
        let datas: Vec<&[u8]> = parts.iter().map(|p| p.data.as_slice()).collect();
        assert_eq!(datas, [&b"a\n"[..], b"bbbbbbbbbbbb\n", b"c\n"]);
    }

    #[test]
    fn exact_fit_and_empty_input() {
        let parts = cut(b"ab\ncd\n", 100, 6);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].rows, 2);
        assert!(cut(b"", 10, 10).is_empty());
    }

    #[test]
    fn truncated_row_is_an_error() {
        let mut c = PartCutter::new(10);
        assert!(c.push(b"a\nb").len() <= 1);
        assert_eq!(c.finish().unwrap_err().0, 1);
    }

    fn binary_stream(rows: &[Vec<Option<Vec<u8>>>]) -> Vec<u8> {
        let mut s = BINARY_HEADER.to_vec();
        for r in rows {
            s.extend_from_slice(&(r.len() as i16).to_be_bytes());
            for f in r {
                match f {
                    None => s.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(v) => {
                        s.extend_from_slice(&(v.len() as i32).to_be_bytes());
                        s.extend_from_slice(v);
                    }
                }
            }
        }
        s.extend_from_slice(&BINARY_TRAILER);
        s
    }

    fn binary_rows(n: usize) -> Vec<Vec<Option<Vec<u8>>>> {
        (0..n)
            .map(|i| {
                vec![
                    Some((i as i32).to_be_bytes().to_vec()),
                    (i % 5 != 0).then(|| vec![b'x'; i % 41]),
                ]
            })
            .collect()
    }

    #[test]
    fn binary_parts_are_whole_streams_for_any_chunking() {
        let rows = binary_rows(150);
        let input = binary_stream(&rows);
        for limit in [1, 7, 30, 200, 100_000] {
            for chunk in [1, 2, 5, 19, 20, 64, input.len()] {
                let mut c = BinaryCutter::new(limit);
                let mut parts = Vec::new();
                for ch in input.chunks(chunk) {
                    parts.extend(c.push(ch).unwrap());
                }
                parts.extend(c.finish().unwrap());
                // Each part is a stream of its own; their rows concatenate to the input's.
                let mut joined = BINARY_HEADER.to_vec();
                let mut total = 0;
                for p in &parts {
                    assert!(p.data.starts_with(&BINARY_HEADER));
                    assert!(p.data.ends_with(&BINARY_TRAILER));
                    let body = &p.data[BINARY_HEADER.len()..p.data.len() - 2];
                    assert!(body.len() <= limit || p.rows == 1, "{limit} {chunk}");
                    let mut i = 0;
                    let mut n = 0;
                    while i < body.len() {
                        match row_end(&body[i..]).unwrap() {
                            RowEnd::Row(l) => i += l,
                            _ => panic!("a part holds whole rows"),
                        }
                        n += 1;
                    }
                    assert_eq!(n, p.rows);
                    total += n;
                    joined.extend_from_slice(body);
                }
                joined.extend_from_slice(&BINARY_TRAILER);
                assert_eq!(joined, input, "limit {limit} chunk {chunk}");
                assert_eq!(total, 150);
            }
        }
    }

    #[test]
    fn binary_stream_errors() {
        let input = binary_stream(&binary_rows(3));
        let mut c = BinaryCutter::new(100);
        c.push(&input[..input.len() - 1]).unwrap();
        assert!(matches!(c.finish(), Err(BinaryStreamError::Truncated(_))));
        let mut c = BinaryCutter::new(100);
        assert!(matches!(
            c.push(b"PGCOPY\nX"),
            Err(BinaryStreamError::Signature)
        ));
        let mut c = BinaryCutter::new(100);
        let mut after = input.clone();
        after.push(0);
        assert!(matches!(
            c.push(&after),
            Err(BinaryStreamError::AfterTrailer)
        ));
        let mut oids = input.clone();
        oids[12] = 1;
        assert!(matches!(
            BinaryCutter::new(100).push(&oids),
            Err(BinaryStreamError::Flags(0x10000))
        ));
        // No rows: no part.
        let mut c = BinaryCutter::new(100);
        assert!(c.push(&binary_stream(&[])).unwrap().is_empty());
        assert!(c.finish().unwrap().is_none());
    }
}
