//! Noticing a replication connection that went silent without a reset (a network partition, a
//! host gone): TCP alone notices it only after about 15 minutes of retransmissions, or never
//! when a middlebox keeps acknowledging.
//!
//! The rule, pure: a live walsender answers a status update with "reply requested" at once
//! (it reads replies between every two WAL records it decodes). So once the server has been
//! silent for half the bound, the caller asks it for a reply; silent for the whole bound, the
//! connection is presumed dead. The bound defaults to two thirds
//! of the server's `wal_sender_timeout` (40 s of its default 60 s), so the client gives up
//! before the server would time out the walsender (and releases the slot) on its side.

use std::fmt;
use std::time::{Duration, Instant};

/// The bound used when the server's `wal_sender_timeout` is 0 (disabled) or cannot be read:
/// two thirds of its default, 60 s.
pub const DEFAULT_RECEIVE_TIMEOUT: Duration = Duration::from_secs(40);
/// The shortest bound derived from `wal_sender_timeout`: a round trip must fit in half of it.
pub const MIN_RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the bound came from, for the message that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutSource {
    /// Two thirds of the server's `wal_sender_timeout`.
    WalSenderTimeout(Duration),
    /// The server's `wal_sender_timeout` is 0 (disabled) or unknown: the default.
    Default,
    /// Set explicitly (`--receive-timeout`).
    Explicit,
}

/// How long the server may stay silent before the connection is presumed dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveTimeout {
    pub bound: Duration,
    pub source: TimeoutSource,
}

impl ReceiveTimeout {
    /// The bound derived from the server's `wal_sender_timeout` (`None` or zero: disabled or
    /// unknown, so `DEFAULT_RECEIVE_TIMEOUT`).
    pub fn derived(wal_sender_timeout: Option<Duration>) -> ReceiveTimeout {
        match wal_sender_timeout.filter(|w| !w.is_zero()) {
            Some(w) => ReceiveTimeout {
                bound: Duration::from_millis((w.as_millis() * 2 / 3) as u64)
                    .max(MIN_RECEIVE_TIMEOUT),
                source: TimeoutSource::WalSenderTimeout(w),
            },
            None => ReceiveTimeout {
                bound: DEFAULT_RECEIVE_TIMEOUT,
                source: TimeoutSource::Default,
            },
        }
    }

    /// A bound set explicitly.
    pub fn explicit(bound: Duration) -> ReceiveTimeout {
        ReceiveTimeout {
            bound,
            source: TimeoutSource::Explicit,
        }
    }

    /// Silence after which a reply is requested.
    pub fn reply_after(&self) -> Duration {
        self.bound / 2
    }

    /// Why the connection is presumed dead, for the error.
    pub fn dead_message(&self) -> String {
        format!(
            "no message from the server for {} ({self}): the connection is presumed dead; reconnecting",
            secs(self.bound)
        )
    }
}

impl fmt::Display for ReceiveTimeout {
    /// Where the bound comes from: `wal_sender_timeout 60 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            TimeoutSource::WalSenderTimeout(w) => write!(f, "wal_sender_timeout {}", secs(w)),
            TimeoutSource::Default => f.write_str("wal_sender_timeout is off: the default bound"),
            TimeoutSource::Explicit => f.write_str("--receive-timeout"),
        }
    }
}

/// `40 s`, `2.7 s`, `0.5 s`.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// What the caller does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing yet: check again at this instant.
    WaitUntil(Instant),
    /// Send a status update with "reply requested" (once per silence), then check again at
    /// this instant.
    RequestReply(Instant),
    /// The connection is presumed dead.
    Dead,
}

/// Tracks the server's silence against a [`ReceiveTimeout`].
#[derive(Debug, Clone)]
pub struct SilenceWatch {
    timeout: ReceiveTimeout,
    last_heard: Instant,
    reply_requested: bool,
}

impl SilenceWatch {
    /// Silence counts from `now`.
    pub fn new(timeout: ReceiveTimeout, now: Instant) -> SilenceWatch {
        SilenceWatch {
            timeout,
            last_heard: now,
            reply_requested: false,
        }
    }

    pub fn timeout(&self) -> ReceiveTimeout {
        self.timeout
    }

    /// The server was heard from at `at` (bytes arrived), or silence counts afresh from `at`
    /// (reading resumed after a pause, when unread bytes may be waiting). Earlier instants than
    /// the last one are ignored.
    pub fn heard(&mut self, at: Instant) {
        if at > self.last_heard {
            self.last_heard = at;
            self.reply_requested = false;
        }
    }

    /// When [`SilenceWatch::check`] has something new to say.
    pub fn next_check(&self) -> Instant {
        if self.reply_requested {
            self.last_heard + self.timeout.bound
        } else {
            self.last_heard + self.timeout.reply_after()
        }
    }

    /// The verdict at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.timeout.bound {
            Verdict::Dead
        } else if silent >= self.timeout.reply_after() && !self.reply_requested {
            self.reply_requested = true;
            Verdict::RequestReply(self.next_check())
        } else {
            Verdict::WaitUntil(self.next_check())
        }
    }
}

/// Parses a duration as `SHOW` prints a time setting: `60s`, `1min`, `500ms`, `2h`, `1d`, `0`
/// (a bare number is in `unit_if_bare`, the setting's base unit).
pub fn parse_setting_duration(s: &str, unit_if_bare: Duration) -> Option<Duration> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = match s[digits..].trim() {
        "" => unit_if_bare,
        "us" => Duration::from_micros(1),
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86400),
        _ => return None,
    };
    unit.checked_mul(u32::try_from(n).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_bound_is_two_thirds_of_wal_sender_timeout_or_the_default() {
        let t = ReceiveTimeout::derived(Some(S(60)));
        assert_eq!(t.bound, S(40));
        assert_eq!(t.reply_after(), S(20));
        assert_eq!(
            t.dead_message(),
            "no message from the server for 40 s (wal_sender_timeout 60 s): the connection is presumed dead; reconnecting"
        );
        let t = ReceiveTimeout::derived(Some(S(4)));
        assert_eq!(t.bound, Duration::from_millis(2666));
        assert!(t
            .dead_message()
            .contains("for 2.7 s (wal_sender_timeout 4 s)"));
        assert_eq!(
            ReceiveTimeout::derived(Some(Duration::from_millis(300))).bound,
            MIN_RECEIVE_TIMEOUT
        );
        for off in [None, Some(Duration::ZERO)] {
            let t = ReceiveTimeout::derived(off);
            assert_eq!(t.bound, DEFAULT_RECEIVE_TIMEOUT);
            assert!(t.dead_message().contains("wal_sender_timeout is off"));
        }
        let t = ReceiveTimeout::explicit(S(90));
        assert_eq!(t.reply_after(), S(45));
        assert!(t.dead_message().contains("90 s (--receive-timeout)"));
    }

    #[test]
    fn silence_asks_for_a_reply_at_half_the_bound_and_is_dead_at_the_bound() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(ReceiveTimeout::explicit(S(40)), t0);
        assert_eq!(w.next_check(), t0 + S(20));
        assert_eq!(w.check(t0 + S(19)), Verdict::WaitUntil(t0 + S(20)));
        // Half the bound: one reply request, then wait for the rest of the bound.
        assert_eq!(w.check(t0 + S(20)), Verdict::RequestReply(t0 + S(40)));
        assert_eq!(w.check(t0 + S(30)), Verdict::WaitUntil(t0 + S(40)));
        assert_eq!(w.next_check(), t0 + S(40));
        assert_eq!(w.check(t0 + S(40)), Verdict::Dead);
        assert_eq!(w.check(t0 + S(400)), Verdict::Dead);
    }

    #[test]
    fn hearing_from_the_server_starts_the_silence_over() {
        let t0 = Instant::now();
        let mut w = SilenceWatch::new(ReceiveTimeout::explicit(S(40)), t0);
        assert_eq!(w.check(t0 + S(25)), Verdict::RequestReply(t0 + S(40)));
        // The reply arrives: silence counts from it, and a new silence gets a new request.
        w.heard(t0 + S(26));
        assert_eq!(w.check(t0 + S(40)), Verdict::WaitUntil(t0 + S(46)));
        assert_eq!(w.check(t0 + S(46)), Verdict::RequestReply(t0 + S(66)));
        // An older instant changes nothing.
        w.heard(t0 + S(1));
        assert_eq!(w.check(t0 + S(66)), Verdict::Dead);
        // A check long after the last one (the loop was busy) says dead at once.
        let mut w = SilenceWatch::new(ReceiveTimeout::explicit(S(40)), t0);
        assert_eq!(w.check(t0 + S(41)), Verdict::Dead);
    }

    #[test]
    fn settings_parse_as_show_prints_them() {
        let ms = Duration::from_millis(1);
        assert_eq!(parse_setting_duration("1min", ms), Some(S(60)));
        assert_eq!(parse_setting_duration("4s", ms), Some(S(4)));
        assert_eq!(
            parse_setting_duration("1500ms", ms),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_setting_duration("2h", ms), Some(S(7200)));
        assert_eq!(parse_setting_duration("1d", ms), Some(S(86400)));
        assert_eq!(parse_setting_duration("0", ms), Some(Duration::ZERO));
        assert_eq!(parse_setting_duration("250", ms), Some(S(0) + 250 * ms));
        for bad in ["", "s", "-1s", "1.5s", "10 fortnights", "99999999999s"] {
            assert_eq!(parse_setting_duration(bad, ms), None, "{bad}");
        }
    }
}
