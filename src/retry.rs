//! Retrying: the one backoff schedule and the one retry loop every caller uses.
//!
//! Owns the arithmetic of waiting between attempts ([`Backoff`]: first delay, growth factor,
//! cap, jitter), the budget of a retried operation ([`Policy`]: attempts and elapsed time) and
//! the loop itself ([`retry`]), which waits on a [`CancellationToken`] so a cancelled caller stops
//! at once instead of sleeping out its backoff. It does not decide *what* is retryable: each
//! caller passes its error classifier.
//!
//! The callers and their schedules (kept as they were before this module existed):
//! * the archiver's restart loop (`archive::run`): 1 s doubling to 30 s, no jitter, unlimited,
//!   reset after an attempt that streamed for a minute; it uses [`Backoff`] directly;
//! * the uploader's put of one segment (`archive::upload`): 200 ms doubling to 30 s, ±25 %
//!   jitter, unlimited, stopped by the pipeline's abandon token;
//! * each S3 call (`store::s3`): 100 ms doubling to 5 s, full jitter, at most 10 attempts and
//!   no new attempt once 30 s would have passed (its `RetryPolicy`).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How much of each delay is random.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Exactly the schedule's delay.
    None,
    /// Uniform in `[d × (1 − f), d × (1 + f))`, `f` in `[0, 1]` (`0.25`: ±25 %).
    Proportional(f64),
    /// Uniform in `[0, d)` ("full jitter").
    Full,
}

/// An exponential backoff schedule: `first`, then × `factor` per delay, capped at `max`; the
/// jitter is applied to the capped value.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    factor: f64,
    jitter: Jitter,
    /// The next delay before jitter.
    current: Duration,
}

impl Backoff {
    /// `first` doubling up to `max`, without jitter.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            factor: 2.0,
            jitter: Jitter::None,
            current: first.min(max),
        }
    }

    /// Growth per delay (clamped to at least 1: a backoff never shrinks).
    pub fn factor(mut self, factor: f64) -> Backoff {
        self.factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            1.0
        };
        self
    }

    /// Randomness of each delay (a proportional fraction is clamped to `[0, 1]`).
    pub fn jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = match jitter {
            Jitter::Proportional(f) if f.is_finite() => Jitter::Proportional(f.clamp(0.0, 1.0)),
            Jitter::Proportional(_) => Jitter::None,
            other => other,
        };
        self
    }

    /// The delay to wait now (with jitter); the schedule moves on to the next one.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = scale(self.current, self.factor).min(self.max);
        match self.jitter {
            Jitter::None => base,
            Jitter::Proportional(f) => scale(base, 1.0 - f + 2.0 * f * rand::random::<f64>()),
            Jitter::Full => scale(base, rand::random::<f64>()),
        }
    }

    /// Starts the schedule over at `first`.
    pub fn reset(&mut self) {
        self.current = self.first.min(self.max);
    }
}

/// `d × k`, saturating instead of panicking on overflow.
fn scale(d: Duration, k: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * k).unwrap_or(Duration::MAX)
}

/// Sleeps `delay` unless `cancel` fires first; `false` when cancelled.
pub async fn sleep(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// A retried operation's schedule and budget.
#[derive(Clone, Debug)]
pub struct Policy {
    pub backoff: Backoff,
    /// Attempts, the first included; `None`: no limit.
    pub max_attempts: Option<u32>,
    /// No retry whose wait would end this long after the first attempt started; `None`: no limit.
    pub max_elapsed: Option<Duration>,
}

impl Policy {
    /// Retries as long as it takes, on `backoff`'s schedule.
    pub fn unlimited(backoff: Backoff) -> Policy {
        Policy {
            backoff,
            max_attempts: None,
            max_elapsed: None,
        }
    }
}

/// One retry about to wait, as [`retry`] reports it to its caller (for logs and metrics).
#[derive(Clone, Copy, Debug)]
pub struct Retrying {
    /// The attempt that failed (1 for the first).
    pub attempt: u32,
    /// The wait before the next attempt.
    pub delay: Duration,
    /// Time since the first attempt started.
    pub elapsed: Duration,
}

/// Why [`retry`] stopped without a success; each carries the last error.
#[derive(Debug)]
pub enum RetryError<E> {
    /// The error is not retryable.
    Permanent(E),
    /// Retryable, but the policy's attempts or time are spent.
    Exhausted { last: E, attempts: u32 },
    /// The token was cancelled while waiting to retry.
    Cancelled(E),
}

impl<E> RetryError<E> {
    /// The last error, whatever the reason.
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Permanent(e)
            | RetryError::Exhausted { last: e, .. }
            | RetryError::Cancelled(e) => e,
        }
    }
}

/// Runs `op` until it succeeds, fails with an error `is_retryable` rejects, the policy's budget
/// is spent, or `cancel` fires during a wait. Before each wait `on_retry` sees the error and
/// the wait (to log it or count it). An attempt in progress is never interrupted: cancellation
/// only cuts the waits short.
pub async fn retry<T, E, F, Fut>(
    policy: &Policy,
    cancel: &CancellationToken,
    is_retryable: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(&E, Retrying),
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = policy.backoff.clone();
    backoff.reset();
    let start = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        let e = match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !is_retryable(&e) => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        let delay = backoff.next_delay();
        let elapsed = start.elapsed();
        let out_of_attempts = policy.max_attempts.is_some_and(|m| attempt >= m);
        let out_of_time = policy.max_elapsed.is_some_and(|m| elapsed + delay >= m);
        if out_of_attempts || out_of_time {
            return Err(RetryError::Exhausted {
                last: e,
                attempts: attempt,
            });
        }
        on_retry(
            &e,
            Retrying {
                attempt,
                delay,
                elapsed,
            },
        );
        if !sleep(delay, cancel).await {
            return Err(RetryError::Cancelled(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_grow_by_the_factor_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let seen: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [100, 200, 400, 800, 1000, 1000, 1000].map(|n| n * MS));
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);

        let mut b = Backoff::new(MS, 100 * MS).factor(3.0);
        let seen: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert_eq!(seen, [1, 3, 9, 27, 81, 100].map(|n| n * MS));
    }

    #[test]
    fn a_first_delay_above_the_cap_starts_at_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(30));
        assert_eq!(b.next_delay(), Duration::from_secs(30));
    }

    #[test]
    fn a_factor_below_one_does_not_shrink_the_delay() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(1)).factor(0.1);
        assert_eq!(b.next_delay(), 100 * MS);
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn huge_schedules_saturate_instead_of_panicking() {
        let mut b = Backoff::new(Duration::MAX / 2, Duration::MAX)
            .factor(1e300)
            .jitter(Jitter::Proportional(1.0));
        for _ in 0..4 {
            b.next_delay();
        }
    }

    #[test]
    fn proportional_jitter_stays_within_its_bounds_and_varies() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1))
            .jitter(Jitter::Proportional(0.25));
        let seen: Vec<_> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(seen
            .iter()
            .all(|d| (750 * MS..1250 * MS).contains(d) || *d == 1250 * MS));
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*lo < 850 * MS && *hi > 1150 * MS, "{lo:?}..{hi:?}");
    }

    #[test]
    fn full_jitter_stays_below_the_delay_and_varies() {
        let mut b =
            Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).jitter(Jitter::Full);
        let seen: Vec<_> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(seen.iter().all(|d| *d <= Duration::from_secs(1)));
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(*lo < 100 * MS && *hi > 900 * MS, "{lo:?}..{hi:?}");
    }

    #[test]
    fn jitter_applies_to_the_capped_delay() {
        let mut b = Backoff::new(Duration::from_secs(30), Duration::from_secs(30))
            .jitter(Jitter::Proportional(0.25));
        let max = (0..1000).map(|_| b.next_delay()).max().unwrap();
        assert!(max > Duration::from_secs(30), "{max:?}");
    }

    /// An operation that fails `fails` times with `err`, then returns the attempt count.
    fn flaky<'a>(
        calls: &'a Cell<u32>,
        fails: u32,
        err: &'static str,
    ) -> impl FnMut() -> std::future::Ready<Result<u32, &'static str>> + 'a {
        move || {
            calls.set(calls.get() + 1);
            std::future::ready(if calls.get() <= fails {
                Err(err)
            } else {
                Ok(calls.get())
            })
        }
    }

    fn policy() -> Policy {
        Policy::unlimited(Backoff::new(100 * MS, 1000 * MS))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_wait_the_schedule_then_succeed() {
        let calls = Cell::new(0);
        let mut waits = vec![];
        let start = Instant::now();
        let r = retry(
            &policy(),
            &CancellationToken::new(),
            |_| true,
            |_, r| waits.push((r.attempt, r.delay)),
            flaky(&calls, 5, "busy"),
        )
        .await;
        assert_eq!(r.unwrap(), 6);
        assert_eq!(
            waits,
            [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000)].map(|(a, d)| (a, d * MS))
        );
        assert_eq!(
            start.elapsed(),
            2500 * MS,
            "exactly the waits, under paused time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_returns_at_once() {
        let calls = Cell::new(0);
        let start = Instant::now();
        let r = retry(
            &policy(),
            &CancellationToken::new(),
            |e: &&str| *e != "denied",
            |_, _| panic!("no retry of a permanent error"),
            flaky(&calls, 5, "denied"),
        )
        .await;
        assert!(matches!(r, Err(RetryError::Permanent("denied"))), "{r:?}");
        assert_eq!(calls.get(), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_attempts_returns_the_last_error() {
        let calls = Cell::new(0);
        let p = Policy {
            max_attempts: Some(3),
            ..policy()
        };
        let r = retry(
            &p,
            &CancellationToken::new(),
            |_| true,
            |_, _| {},
            flaky(&calls, 10, "busy"),
        )
        .await;
        assert!(
            matches!(
                r,
                Err(RetryError::Exhausted {
                    last: "busy",
                    attempts: 3
                })
            ),
            "{r:?}"
        );
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_ends_past_the_time_budget() {
        let calls = Cell::new(0);
        let p = Policy {
            max_elapsed: Some(1000 * MS),
            ..policy()
        };
        let start = Instant::now();
        let r = retry(
            &p,
            &CancellationToken::new(),
            |_| true,
            |_, _| {},
            flaky(&calls, 10, "busy"),
        )
        .await;
        // Waits 100 + 200 + 400 = 700 ms; the next (800 ms) would end at 1.5 s.
        assert!(
            matches!(r, Err(RetryError::Exhausted { attempts: 4, .. })),
            "{r:?}"
        );
        assert_eq!(start.elapsed(), 700 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_wait_at_once() {
        let cancel = CancellationToken::new();
        let calls = Cell::new(0);
        let p = Policy::unlimited(Backoff::new(
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        ));
        let start = Instant::now();
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(10 * MS).await;
                cancel.cancel();
            })
        };
        let r = retry(&p, &cancel, |_| true, |_, _| {}, flaky(&calls, 10, "busy")).await;
        canceller.await.unwrap();
        assert!(matches!(r, Err(RetryError::Cancelled("busy"))), "{r:?}");
        assert_eq!(calls.get(), 1);
        assert_eq!(start.elapsed(), 10 * MS, "not the hour's backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn an_already_cancelled_token_still_makes_the_first_attempt() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let calls = Cell::new(0);
        let r = retry(
            &policy(),
            &cancel,
            |_| true,
            |_, _| {},
            flaky(&calls, 0, "busy"),
        )
        .await;
        assert_eq!(r.unwrap(), 1);
        let r = retry(
            &policy(),
            &cancel,
            |_| true,
            |_, _| {},
            flaky(&calls, 10, "busy"),
        )
        .await;
        assert!(matches!(r, Err(RetryError::Cancelled("busy"))), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_call_starts_the_schedule_over() {
        let p = policy();
        for _ in 0..2 {
            let calls = Cell::new(0);
            let mut first = None;
            retry(
                &p,
                &CancellationToken::new(),
                |_| true,
                |_, r| {
                    first.get_or_insert(r.delay);
                },
                flaky(&calls, 3, "busy"),
            )
            .await
            .unwrap();
            assert_eq!(first, Some(100 * MS));
        }
    }

    #[test]
    fn into_inner_gives_the_last_error() {
        assert_eq!(RetryError::Permanent(1).into_inner(), 1);
        assert_eq!(RetryError::Cancelled(2).into_inner(), 2);
        let e = RetryError::Exhausted {
            last: 3,
            attempts: 9,
        };
        assert_eq!(e.into_inner(), 3);
    }
}
