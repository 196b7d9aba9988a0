//! The archiver's health and readiness, as `/healthz` and `/readyz` answer them.
//!
//! Owns the state the archiver reports (the stream starting, live, down or stopped; the first
//! acknowledgement; the repository's requests in flight and its failures) and the verdict drawn
//! from it. Does no I/O: the archiver and the metered store ([`super::metered`]) report, the
//! server asks [`Health::verdict`].
//!
//! Healthy: the stream is live (or still starting: taking the generation's first base backup
//! is progress) and the repository has not been failing for longer than the threshold. The
//! repository is *failing* from its first failed request (an I/O or remote error; a missing
//! object or a conflict is an answer) until a request succeeds, and while a request has been
//! waiting for an answer: a store that stops answering is as unhealthy as one that says no.
//! Ready: the first acknowledgement was sent to the slot; it stays so.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The default of `--health-store-timeout`.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the stream stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Not streamed yet (connecting, checking, taking the generation's first base backup).
    Starting,
    Live,
    /// The last attempt failed; the archiver retries.
    Down(String),
    /// Archiving ended and is not retried (shutting down, or stopped for good).
    Stopped(String),
}

#[derive(Debug)]
struct State {
    stream: Stream,
    ready: bool,
    /// The first failed request since the last success, and the error.
    failing: Option<(Instant, String)>,
    /// Requests waiting for an answer, by id: when each started and what it is.
    in_flight: BTreeMap<u64, (Instant, &'static str)>,
    next_id: u64,
    store_timeout: Duration,
}

/// Health of this process's archiver (one per process: [`health`]).
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

/// What `/healthz` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub healthy: bool,
    /// One line: what is wrong, or what is going on.
    pub reason: String,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(DEFAULT_STORE_TIMEOUT)
    }
}

impl Health {
    pub fn new(store_timeout: Duration) -> Health {
        Health {
            state: Mutex::new(State {
                stream: Stream::Starting,
                ready: false,
                failing: None,
                in_flight: BTreeMap::new(),
                next_id: 0,
                store_timeout,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long the repository may fail (or not answer) before the archiver is unhealthy.
    pub fn set_store_timeout(&self, timeout: Duration) {
        self.lock().store_timeout = timeout;
    }

    pub fn set_stream(&self, stream: Stream) {
        self.lock().stream = stream;
    }

    /// The first acknowledgement was sent to the slot.
    pub fn set_ready(&self) {
        self.lock().ready = true;
    }

    pub fn ready(&self) -> bool {
        self.lock().ready
    }

    /// A repository request starts; its id goes to [`Health::request_ended`].
    pub fn request_started(&self, op: &'static str, now: Instant) -> u64 {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.in_flight.insert(id, (now, op));
        id
    }

    /// A request ended (or was dropped: `answered` None): an answer clears the failure, an
    /// error starts one.
    pub fn request_ended(&self, id: u64, answered: Option<Result<(), String>>, now: Instant) {
        let mut s = self.lock();
        s.in_flight.remove(&id);
        match answered {
            Some(Ok(())) => s.failing = None,
            Some(Err(e)) => {
                let since = s.failing.as_ref().map_or(now, |(t, _)| *t);
                s.failing = Some((since, e));
            }
            None => {}
        }
    }

    /// The verdict at `now`.
    pub fn verdict(&self, now: Instant) -> Verdict {
        let s = self.lock();
        let stream = match &s.stream {
            Stream::Down(why) => Some(format!("stream down, retrying: {why}")),
            Stream::Stopped(why) => Some(format!("archiving stopped: {why}")),
            Stream::Starting | Stream::Live => None,
        };
        if let Some(reason) = stream {
            return Verdict {
                healthy: false,
                reason,
            };
        }
        let waiting = s
            .in_flight
            .values()
            .min_by_key(|(t, _)| *t)
            .filter(|(t, _)| now.saturating_duration_since(*t) >= s.store_timeout);
        if let Some((since, op)) = waiting {
            return Verdict {
                healthy: false,
                reason: format!(
                    "repository not answering: a {op} has waited {}s",
                    now.saturating_duration_since(*since).as_secs()
                ),
            };
        }
        if let Some((since, e)) = &s.failing {
            let for_ = now.saturating_duration_since(*since);
            if for_ >= s.store_timeout {
                return Verdict {
                    healthy: false,
                    reason: format!("repository failing for {}s: {e}", for_.as_secs()),
                };
            }
        }
        Verdict {
            healthy: true,
            reason: match s.stream {
                Stream::Starting => "starting (not streaming yet)".into(),
                _ => "archiving".into(),
            },
        }
    }
}

/// This process's health.
pub fn health() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    #[test]
    fn starting_and_live_are_healthy_down_and_stopped_are_not() {
        let h = Health::new(T);
        let now = Instant::now();
        assert!(h.verdict(now).healthy);
        assert!(h.verdict(now).reason.contains("starting"));
        h.set_stream(Stream::Live);
        assert!(h.verdict(now).healthy);
        h.set_stream(Stream::Down("connection reset".into()));
        let v = h.verdict(now);
        assert!(!v.healthy);
        assert!(v.reason.contains("connection reset"), "{v:?}");
        h.set_stream(Stream::Live);
        assert!(h.verdict(now).healthy);
        h.set_stream(Stream::Stopped("schema change".into()));
        let v = h.verdict(now);
        assert!(!v.healthy && v.reason.contains("schema change"), "{v:?}");
    }

    #[test]
    fn a_failing_store_is_unhealthy_only_past_the_threshold_and_until_an_answer() {
        let h = Health::new(T);
        h.set_stream(Stream::Live);
        let t0 = Instant::now();
        let a = h.request_started("put", t0);
        h.request_ended(a, Some(Err("503 SlowDown".into())), t0);
        assert!(h.verdict(t0 + Duration::from_secs(59)).healthy);
        let b = h.request_started("put", t0 + Duration::from_secs(30));
        h.request_ended(b, Some(Err("timeout".into())), t0 + Duration::from_secs(30));
        // The failure counts from the first error, and names the last.
        let v = h.verdict(t0 + Duration::from_secs(61));
        assert!(!v.healthy, "{v:?}");
        assert!(
            v.reason.contains("61s") && v.reason.contains("timeout"),
            "{v:?}"
        );
        let c = h.request_started("put", t0 + Duration::from_secs(62));
        h.request_ended(c, Some(Ok(())), t0 + Duration::from_secs(62));
        assert!(h.verdict(t0 + Duration::from_secs(63)).healthy);
    }

    #[test]
    fn a_request_without_an_answer_is_unhealthy_past_the_threshold() {
        let h = Health::new(T);
        h.set_stream(Stream::Live);
        let t0 = Instant::now();
        let quick = h.request_started("get", t0);
        let hung = h.request_started("put", t0);
        h.request_ended(quick, Some(Ok(())), t0);
        assert!(h.verdict(t0 + Duration::from_secs(59)).healthy);
        let v = h.verdict(t0 + Duration::from_secs(60));
        assert!(!v.healthy && v.reason.contains("put"), "{v:?}");
        // Dropped (cancelled) without an answer: no longer waiting, nothing learnt.
        h.request_ended(hung, None, t0 + Duration::from_secs(61));
        assert!(h.verdict(t0 + Duration::from_secs(61)).healthy);
    }

    #[test]
    fn ready_once_acknowledged_and_stays_so() {
        let h = Health::new(T);
        assert!(!h.ready());
        h.set_ready();
        h.set_stream(Stream::Down("x".into()));
        assert!(h.ready());
    }
}
