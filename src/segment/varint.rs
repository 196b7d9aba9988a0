//! The integer encodings of format versions 2 and 3: unsigned LEB128 varints (only the shortest
//! form is read, so every value has one encoding) and zigzag, which maps small signed deltas
//! to small unsigned values. Shared by the record framing, the commit index and the columns.

use std::fmt;

/// Maps a signed delta to an unsigned value with small magnitudes near 0 (0, -1, 1, -2 → 0, 1,
/// 2, 3), as protobuf's zigzag encoding.
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(super) fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint (7 bits a byte, low bits first, high bit set on
/// every byte but the last), in its shortest form.
pub(super) fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes [`put_uvarint`] writes for `v`.
pub(super) fn uvarint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Why a varint could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum VarintError {
    /// The buffer ends before the varint's last byte.
    Truncated,
    /// A longer encoding than needed (a last byte of 0 after another byte).
    Overlong,
    /// More bits than the field has (64, or 32 for xid and first_record).
    Overflow,
}

impl fmt::Display for VarintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VarintError::Truncated => "runs past the end",
            VarintError::Overlong => "is not in its shortest form",
            VarintError::Overflow => "does not fit the field",
        })
    }
}

/// Reads an unsigned LEB128 varint of at most `bits` bits at `*pos`, advancing `*pos`. Only the
/// shortest encoding is accepted, so every value has exactly one encoding.
pub(super) fn get_uvarint(buf: &[u8], pos: &mut usize, bits: u32) -> Result<u64, VarintError> {
    let mut v: u64 = 0;
    let mut shift = 0u32;
    let mut at = *pos;
    loop {
        let Some(&b) = buf.get(at) else {
            return Err(VarintError::Truncated);
        };
        at += 1;
        let low = u64::from(b & 0x7F);
        // Bits left for this byte's 7; the value must not need more.
        let room = bits.saturating_sub(shift);
        if room == 0 || (room < 7 && low >> room != 0) {
            return Err(VarintError::Overflow);
        }
        v |= low << shift;
        if b & 0x80 == 0 {
            if b == 0 && shift > 0 {
                return Err(VarintError::Overlong);
            }
            *pos = at;
            return Ok(v);
        }
        shift += 7;
    }
}

/// Zigzag of a wrapping 32-bit difference read as an `i32`.
pub(super) fn zigzag32(delta: u32) -> u64 {
    u64::from((delta << 1) ^ ((delta as i32 >> 31) as u32))
}

pub(super) fn unzigzag32(u: u32) -> u32 {
    (u >> 1) ^ (u & 1).wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_leb128_and_canonical() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_uvarint(&mut out, v);
            assert_eq!(out.len(), uvarint_len(v), "{v}");
            let mut pos = 0;
            assert_eq!(get_uvarint(&out, &mut pos, 64), Ok(v));
            assert_eq!(pos, out.len());
        }
        let mut out = Vec::new();
        put_uvarint(&mut out, 300);
        assert_eq!(out, [0xAC, 0x02]);
        for (bytes, bits, err) in [
            (&[0x80, 0x00][..], 64, VarintError::Overlong),
            (&[0xFF, 0x80, 0x00][..], 64, VarintError::Overlong),
            (&[0x80][..], 64, VarintError::Truncated),
            (&[][..], 64, VarintError::Truncated),
            (
                &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02][..],
                64,
                VarintError::Overflow,
            ),
            (
                &[
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x81, 0x00,
                ][..],
                64,
                VarintError::Overflow,
            ),
            (
                &[0xFF, 0xFF, 0xFF, 0xFF, 0x10][..],
                32,
                VarintError::Overflow,
            ),
        ] {
            let mut pos = 0;
            assert_eq!(get_uvarint(bytes, &mut pos, bits), Err(err), "{bytes:02X?}");
            assert_eq!(pos, 0);
        }
        let mut pos = 0;
        assert_eq!(
            get_uvarint(&[0xFF, 0xFF, 0xFF, 0xFF, 0x0F], &mut pos, 32),
            Ok(u64::from(u32::MAX))
        );
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!([zigzag(0), zigzag(-1), zigzag(1), zigzag(-2)], [0, 1, 2, 3]);
        for d in [0u32, 1, u32::MAX, 0x8000_0000, 0x7FFF_FFFF] {
            assert_eq!(unzigzag32(zigzag32(d) as u32), d);
        }
        assert_eq!(zigzag32(u32::MAX), 1, "-1 wraps to 1");
    }
}
