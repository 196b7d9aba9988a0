//! Cutting a stream of COPY text into parts at row boundaries.
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
}
