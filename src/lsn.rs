//! Log sequence numbers and PostgreSQL timestamps: the two coordinates of the change stream.
//!
//! Owns parsing and printing of LSNs (`16/B374D848`, as PostgreSQL prints them, and the
//! fixed-width 16-digit hex form used in object names so that listings sort by LSN) and of
//! PostgreSQL's wire timestamps (microseconds since 2000-01-01 00:00:00 UTC).
//! Pure values; no I/O.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);

    /// Fixed-width form used in object names: 16 upper-case hex digits, no separator.
    pub fn to_hex16(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses the fixed-width form written by [`Lsn::to_hex16`].
    pub fn from_hex16(s: &str) -> Option<Lsn> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Error for an LSN that is not of the form `HEX/HEX`.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 0/16B3748")]
pub struct ParseLsnError(String);

impl crate::error::Classify for ParseLsnError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        crate::error::ExitStatus::Usage
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;
    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A timestamp as PostgreSQL sends it on the wire: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub fn from_datetime(t: DateTime<Utc>) -> PgTimestamp {
        PgTimestamp(t.timestamp_micros() - PG_EPOCH_OFFSET_MICROS)
    }

    pub fn to_datetime(self) -> DateTime<Utc> {
        Utc.timestamp_micros(self.0.saturating_add(PG_EPOCH_OFFSET_MICROS))
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn now() -> PgTimestamp {
        PgTimestamp::from_datetime(Utc::now())
    }
}

impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.to_datetime().format("%Y-%m-%d %H:%M:%S%.6f+00")
        )
    }
}

impl serde::Serialize for PgTimestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        )
    }
}

impl<'de> serde::Deserialize<'de> for PgTimestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PgTimestamp, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| PgTimestamp::from_datetime(t.with_timezone(&Utc)))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_both_forms() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(lsn.to_hex16(), "00000016B374D848");
        assert_eq!(Lsn::from_hex16(&lsn.to_hex16()), Some(lsn));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("0/xyz".parse::<Lsn>().is_err());
        assert_eq!(Lsn::from_hex16("0000"), None);
    }

    #[test]
    fn pg_epoch_is_2000() {
        let t = PgTimestamp(0).to_datetime();
        assert_eq!(t.to_rfc3339(), "2000-01-01T00:00:00+00:00");
        let json = serde_json::to_string(&PgTimestamp(1_500_000)).unwrap();
        assert_eq!(json, "\"2000-01-01T00:00:01.500000Z\"");
        assert_eq!(
            serde_json::from_str::<PgTimestamp>(&json).unwrap(),
            PgTimestamp(1_500_000)
        );
    }
}
