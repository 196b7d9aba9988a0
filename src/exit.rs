//! The command line's edge: values given on it that cannot be used ([`UsageError`], exit code
//! 2), the parsing of times and durations, and (re-exported from [`crate::error`]) the exit codes
//! and the rendering of errors.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

pub use crate::error::{exit_code, render, Classify, ExitStatus};
use crate::lsn::PgTimestamp;

/// A value given on the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl Classify for UsageError {
    fn exit_status(&self) -> ExitStatus {
        ExitStatus::Usage
    }
}

/// Parses a duration that must be more than zero (`10s`, `1m 30s`, `500ms`).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero; give a duration above zero, e.g. 10s"
        ));
    }
    Ok(d)
}

/// Parses a restore target time: RFC 3339, or `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM]]` as
/// PostgreSQL prints timestamptz; without a zone the time is UTC.
pub fn parse_time(s: &str) -> Result<PgTimestamp, UsageError> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(PgTimestamp::from_datetime(d.with_timezone(&Utc)));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, fmt) {
            return Ok(PgTimestamp::from_datetime(d.with_timezone(&Utc)));
        }
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(d) = NaiveDateTime::parse_from_str(t, fmt) {
            return Ok(PgTimestamp::from_datetime(d.and_utc()));
        }
    }
    Err(UsageError(format!(
        "--to-time {s:?} is not a timestamp; use e.g. \"2026-11-28 14:03:07.25+00\" or 2026-11-28T14:03:07Z"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times_parse_in_postgres_and_rfc3339_forms() {
        let a = parse_time("2026-11-28 14:03:07.25+00").unwrap();
        let b = parse_time("2026-11-28T14:03:07.250Z").unwrap();
        let c = parse_time("2026-11-28 15:03:07.25+01:00").unwrap();
        let d = parse_time("2026-11-28 14:03:07.25").unwrap();
        assert!(a == b && b == c && c == d);
        assert_eq!(a.to_string(), "2026-11-28 14:03:07.250000+00");
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn positive_durations_refuse_zero_and_keep_humantime_forms() {
        assert_eq!(
            parse_positive_duration("1m 30s").unwrap(),
            Duration::from_secs(90)
        );
        assert_eq!(
            parse_positive_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        for zero in ["0s", "0", "0ms"] {
            assert!(parse_positive_duration(zero).unwrap_err().contains("zero"));
        }
        assert!(parse_positive_duration("soon").is_err());
    }

    #[test]
    fn codes_follow_the_error_kind() {
        let e = anyhow::Error::new(crate::source::SourceError::WalLevel("replica".into()));
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::Error::new(UsageError("x".into()));
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("?")), 1);
    }
}
