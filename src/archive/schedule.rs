//! Scheduled base backups inside `archive`: when one is due, and taking it beside the stream.
//!
//! Owns the schedule (`--base-backup-schedule`, cron syntax in UTC, or `--base-backup-every`),
//! the decision of when the next backup is due (pure: [`Schedule::due`]), and the task that
//! waits for it and takes it ([`run`]) while the attempt streams. It does not own taking a
//! backup (the same [`super::take_backup_with_temporary_slot`] as `tidemark backup`: a
//! temporary slot's exported snapshot aligns it with the stream) nor the lock that keeps one
//! backup per repository at a time ([`crate::backup::lock`]).
//!
//! Invariants:
//! * **Archiving never waits for a backup**: the backup is its own task on its own
//!   connections; the stream, the writer and the uploader run on meanwhile.
//! * **A missed schedule runs at start** (as systemd's `Persistent=true`): with a cron
//!   schedule, when the newest complete base backup of the generation is older than the last
//!   fire time, one is taken at once; with an interval, when it is older than the interval.
//! * A failed backup (the lock held by another backup included) is logged, counted
//!   (`tidemark_base_backup_failures_total`) and retried with backoff until it succeeds or the
//!   attempt ends; a backup still running when the attempt ends (a shutdown, a restart after a
//!   transient failure) is abandoned: it has no manifest, so it is never listed, and the next
//!   attempt sees the schedule missed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backup::lock::BackupLock;
use crate::backup::{BackupRequest, Manifest};
use crate::conninfo::ConnInfo;
use crate::lsn::{Lsn, PgTimestamp};
use crate::retry::{Backoff, Jitter, Policy, RetryError};
use crate::store::Store;
use crate::telemetry;

use super::ArchiveError;

/// When base backups are taken.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// At each fire time of a cron expression, in UTC.
    Cron {
        expr: String,
        cron: Box<croner::Cron>,
    },
    /// This long after the newest complete base backup.
    Every(Duration),
}

impl Schedule {
    /// A cron schedule: five fields (minute hour day-of-month month day-of-week, in UTC), or six
    /// with seconds first. Refused when it does not parse or never fires.
    pub fn cron(expr: &str) -> Result<Schedule, String> {
        let hint = "HINT: five fields in UTC, minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\" for 02:00 every day";
        let cron: croner::Cron = expr.parse().map_err(|e| {
            format!("--base-backup-schedule {expr:?} is not a cron expression: {e}\n{hint}")
        })?;
        if cron.find_next_occurrence(&Utc::now(), false).is_err() {
            return Err(format!(
                "--base-backup-schedule {expr:?} never fires\n{hint}"
            ));
        }
        Ok(Schedule::Cron {
            expr: expr.to_string(),
            cron: Box::new(cron),
        })
    }

    /// An interval schedule; refused when zero.
    pub fn every(every: Duration) -> Result<Schedule, String> {
        if every.is_zero() {
            return Err(
                "--base-backup-every is zero; give an interval above zero, e.g. 24h".into(),
            );
        }
        Ok(Schedule::Every(every))
    }

    /// When the next base backup is due, given the newest complete one's instant (`None`: no
    /// backup): `now` or earlier when one is due already (a missed fire time), else the next
    /// fire time.
    pub fn due(&self, newest: Option<DateTime<Utc>>, now: DateTime<Utc>) -> DateTime<Utc> {
        let Some(newest) = newest else {
            return now;
        };
        match self {
            Schedule::Every(every) => {
                newest + chrono::Duration::from_std(*every).unwrap_or(chrono::Duration::MAX)
            }
            Schedule::Cron { cron, .. } => {
                if let Some(last) = self.last_fire(now) {
                    if last > newest {
                        return last;
                    }
                }
                cron.find_next_occurrence(&now, false)
                    // Checked at parse time; a schedule that stops firing never fires again.
                    .unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }

    /// The last fire time at or before `now` (cron schedules only).
    pub fn last_fire(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron { cron, .. } => cron.find_previous_occurrence(&now, true).ok(),
            Schedule::Every(_) => None,
        }
    }

    /// For logs: `cron "0 2 * * *" (UTC)` or `every 24h`.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Cron { expr, .. } => format!("cron {expr:?} (UTC)"),
            Schedule::Every(every) => format!("every {}", humantime::format_duration(*every)),
        }
    }
}

/// The command line's schedule flags (`tidemark archive`).
#[derive(clap::Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// Take a base backup at each fire time of this cron expression, in UTC (five fields:
    /// minute hour day-of-month month day-of-week, e.g. "0 2 * * *" for 02:00 daily; six with
    /// seconds first), beside the stream. A fire time missed while the archiver was down is
    /// taken at start.
    #[arg(
        long,
        env = "TIDEMARK_BASE_BACKUP_SCHEDULE",
        conflicts_with = "base_backup_every"
    )]
    pub base_backup_schedule: Option<String>,
    /// Take a base backup this long after the newest complete one (e.g. 24h), beside the
    /// stream; at start when the newest is older already.
    #[arg(long, env = "TIDEMARK_BASE_BACKUP_EVERY", value_parser = humantime::parse_duration)]
    pub base_backup_every: Option<Duration>,
    #[command(flatten)]
    pub lock: LockArgs,
}

impl ScheduleArgs {
    /// The schedule the flags give, if any.
    pub fn schedule(&self) -> Result<Option<Schedule>, String> {
        match (&self.base_backup_schedule, self.base_backup_every) {
            (Some(expr), _) => Schedule::cron(expr).map(Some),
            (None, Some(every)) => Schedule::every(every).map(Some),
            (None, None) => Ok(None),
        }
    }
}

/// The base-backup lock's flags, shared by `archive` and `backup`.
#[derive(clap::Args, Debug, Clone)]
pub struct LockArgs {
    /// How long the base-backup lock lasts without renewal: a killed backup blocks others this
    /// long (for tests).
    #[arg(long, env = "TIDEMARK_BASE_BACKUP_LOCK_TTL", default_value = "2m", value_parser = crate::exit::parse_positive_duration, hide = true)]
    pub base_backup_lock_ttl: Duration,
}

/// Everything the scheduled backups of one attempt need, owned (the task outlives no borrow).
#[derive(Clone)]
pub struct Context {
    pub schedule: Schedule,
    pub source: ConnInfo,
    pub store: Arc<dyn Store>,
    pub system_id: u64,
    pub timeline: u32,
    pub generation: u32,
    pub publication: String,
    pub parallel: usize,
    /// The archiver's slot, recorded in the lock.
    pub slot: String,
    /// The base-backup lock's time to live.
    pub lock_ttl: Duration,
    /// The archiver's writer lease, which its locks name (a restarted archiver takes a lock
    /// held for the writer lease it took over at once: `backup/lock.rs`).
    pub writer: Arc<crate::lease::Lease>,
    /// The newest complete base backup of the generation when the attempt started.
    pub newest: Option<DateTime<Utc>>,
    /// The retention policy applied after each scheduled backup (as `tidemark prune` applies
    /// it); None: `--no-prune`.
    pub retention: Option<crate::catalog::retention::Policy>,
    /// Where that retention moves weekly and monthly archives (`--archive-storage-class`).
    pub archive_class: Option<crate::store::StorageClass>,
}

/// Retries of a failed scheduled backup: 1 s doubling to 10 minutes, ±25 %, as long as it takes.
fn retry_policy() -> Policy {
    Policy::unlimited(
        Backoff::new(Duration::from_secs(1), Duration::from_secs(600))
            .jitter(Jitter::Proportional(0.25)),
    )
}

/// A scheduled backup's failure.
#[derive(Debug)]
enum Failure {
    Failed(ArchiveError),
    /// The attempt ended first.
    Stopped,
}

/// The instant of the newest complete base backup among `manifests` of `generation`.
pub fn newest_of(manifests: &[Manifest], generation: u32) -> Option<DateTime<Utc>> {
    manifests
        .iter()
        .filter(|m| m.generation == generation)
        .map(|m| m.snapshot_time.to_datetime())
        .max()
}

/// Takes base backups on `ctx.schedule` until `stop` (the attempt's end).
pub async fn run(ctx: Context, stop: CancellationToken) {
    let mut newest = ctx.newest;
    if let Some(t) = newest {
        metrics::gauge!(telemetry::LAST_BASE_BACKUP).set(unix_seconds(t));
    }
    info!(schedule = %ctx.schedule.describe(), "scheduled base backups");
    loop {
        let due = ctx.schedule.due(newest, Utc::now());
        if due > Utc::now() {
            info!(at = %due.format("%Y-%m-%d %H:%M:%S%.3f UTC"), "next scheduled base backup");
            if !sleep_until(due, &stop).await {
                return;
            }
        } else {
            let last = ctx.schedule.last_fire(Utc::now());
            info!(
                newest = %newest.map_or("none".into(), |t| t.to_rfc3339()),
                missed = %last.unwrap_or(due).to_rfc3339(),
                "a scheduled base backup was missed (the newest complete one is older than the last fire time): taking one now"
            );
        }
        let policy = retry_policy();
        let r = crate::retry::retry(
            &policy,
            &stop,
            |f: &Failure| matches!(f, Failure::Failed(_)),
            |f, r| {
                metrics::counter!(telemetry::BASE_BACKUP_FAILURES).increment(1);
                metrics::gauge!(telemetry::LAST_BASE_BACKUP_SUCCESS).set(0.0);
                if let Failure::Failed(e) = f {
                    warn!(error = %crate::error::chain(e), attempt = r.attempt, retry_in = ?r.delay, "scheduled base backup failed; retrying");
                }
            },
            || take_one(&ctx, &stop),
        )
        .await;
        let m = match r {
            Ok(m) => m,
            Err(RetryError::Permanent(_)) | Err(RetryError::Cancelled(_)) => return,
            Err(RetryError::Exhausted { last, .. }) => {
                // An unlimited policy is never exhausted; counted like any failure.
                metrics::counter!(telemetry::BASE_BACKUP_FAILURES).increment(1);
                warn!(error = ?last, "scheduled base backup failed");
                return;
            }
        };
        let at = m.snapshot_time.to_datetime();
        metrics::gauge!(telemetry::LAST_BASE_BACKUP).set(unix_seconds(at));
        info!(backup = %m.id, point = %m.consistent_point, "scheduled base backup stored");
        // A server clock behind ours must not make the same fire time due again.
        newest = Some(at.max(due));

        metrics::gauge!(telemetry::LAST_BASE_BACKUP_SUCCESS).set(1.0);
        if let Some(policy) = &ctx.retention {
            expire(&ctx.store, policy, &ctx.archive_class).await;
        }
        if telemetry::server::installed() {
            telemetry::catalog::record(&ctx.store, ctx.generation, None).await;
        }
    }
}

/// Applies the retention policy after a scheduled backup, as `tidemark prune` does. A failure
/// is logged and left for the next backup (or a `tidemark prune`): archiving goes on.
async fn expire(
    store: &Arc<dyn Store>,
    policy: &crate::catalog::retention::Policy,
    archive_class: &Option<crate::store::StorageClass>,
) {
    use crate::catalog::expire;
    let opts = expire::PruneOptions {
        archive_class: archive_class.clone(),
        ..expire::PruneOptions::default()
    };
    match expire::apply(store, policy, std::time::SystemTime::now(), &opts).await {
        Ok(e) => info!(
            backups = e.backups.len(),
            segments = e.segments.len(),
            kept = e.kept.len(),
            "retention applied after the scheduled base backup"
        ),
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "cannot apply the retention policy after the scheduled base backup; it is applied again after the next one")
        }
    }
}

/// One scheduled backup under the base-backup lock: refused at once when another backup holds
/// it (retried by the caller), stopped when the lock is lost or the attempt ends.
async fn take_one(ctx: &Context, stop: &CancellationToken) -> Result<Manifest, Failure> {
    let lock = tokio::select! {
        l = BackupLock::acquire_for(&ctx.writer, ctx.store.clone(), ctx.lock_ttl, &ctx.slot, Duration::ZERO) => {
            l.map_err(|e| Failure::Failed(e.into()))?
        }
        _ = stop.cancelled() => return Err(Failure::Stopped),
    };
    metrics::gauge!(telemetry::BASE_BACKUP_RUNNING).set(1.0);
    info!(
        generation = ctx.generation,
        "taking a scheduled base backup"
    );
    let req = BackupRequest {
        source: &ctx.source,
        snapshot: "",
        consistent_point: Lsn::ZERO,
        system_id: ctx.system_id,
        timeline: ctx.timeline,
        generation: ctx.generation,
        publication: &ctx.publication,
        parallel: ctx.parallel,
        origin: crate::backup::Origin::Scheduled,
        tag: None,
    };
    let lost = lock.lost();
    let started = PgTimestamp::now();
    let r = tokio::select! {
        r = super::take_backup_with_temporary_slot(&ctx.store, req) => r.map_err(Failure::Failed),
        _ = lost.cancelled() => Err(Failure::Failed(match lock.check() {
            Err(e) => e.into(),
            Ok(()) => ArchiveError::Internal("the base-backup lock's renewal stopped".into()),
        })),
        _ = stop.cancelled() => {
            info!("abandoning the scheduled base backup in progress: the archiving attempt ended (it has no manifest and is never listed)");
            Err(Failure::Stopped)
        }
    };
    metrics::gauge!(telemetry::BASE_BACKUP_RUNNING).set(0.0);
    lock.release().await;
    if let Ok(m) = &r {
        let took = (PgTimestamp::now().0 - started.0).max(0) as f64 / 1e6;
        metrics::gauge!(telemetry::BASE_BACKUP_SECONDS).set(took);
        info!(backup = %m.id, seconds = took, raw_bytes = m.totals.raw_bytes, stored_bytes = m.totals.stored_bytes, "base backup taken");
    }
    r
}

/// Sleeps until the wall clock reaches `at` (looking again at least every minute, so that a
/// clock set forward or a suspended machine does not oversleep); `false` when stopped.
async fn sleep_until(at: DateTime<Utc>, stop: &CancellationToken) -> bool {
    loop {
        let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if left.is_zero() {
            return true;
        }
        if !crate::retry::sleep(left.min(Duration::from_secs(60)), stop).await {
            return false;
        }
    }
}

fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_micros() as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_daily_cron_fires_at_its_next_time_after_a_fresh_backup() {
        let s = Schedule::cron("0 2 * * *").unwrap();
        // Backed up at 02:00:05 today; now 13:00: next is 02:00 tomorrow.
        assert_eq!(
            s.due(Some(at("2026-12-03T02:00:05Z")), at("2026-12-03T13:00:00Z")),
            at("2026-12-04T02:00:00Z")
        );
        // Before today's fire time, with yesterday's backup: today 02:00.
        assert_eq!(
            s.due(Some(at("2026-12-02T02:00:07Z")), at("2026-12-03T01:59:59Z")),
            at("2026-12-03T02:00:00Z")
        );
    }

    #[test]
    fn a_missed_cron_fire_is_due_at_once() {
        let s = Schedule::cron("0 2 * * *").unwrap();
        let now = at("2026-12-03T13:00:00Z");
        // The archiver was down over 02:00: the newest backup is yesterday's.
        let due = s.due(Some(at("2026-12-02T02:00:05Z")), now);
        assert!(due <= now, "{due}");
        assert_eq!(due, at("2026-12-03T02:00:00Z"));
        assert_eq!(s.last_fire(now), Some(at("2026-12-03T02:00:00Z")));
        // Exactly at the fire time, it is due.
        assert!(
            s.due(Some(at("2026-12-02T02:00:05Z")), at("2026-12-03T02:00:00Z"))
                <= at("2026-12-03T02:00:00Z")
        );
        // No backup at all: due now.
        assert_eq!(s.due(None, now), now);
    }

    #[test]
    fn weekly_and_six_field_crons_follow_utc() {
        // Sundays at 03:30 UTC; 2026-12-03 is a Thursday.
        let s = Schedule::cron("30 3 * * SUN").unwrap();
        assert_eq!(
            s.due(Some(at("2026-11-29T03:30:01Z")), at("2026-12-03T12:00:00Z")),
            at("2026-12-06T03:30:00Z")
        );
        // Seconds first: every 10 seconds.
        let s = Schedule::cron("*/10 * * * * *").unwrap();
        assert_eq!(
            s.due(
                Some(at("2026-12-03T12:00:00.5Z")),
                at("2026-12-03T12:00:01Z")
            ),
            at("2026-12-03T12:00:10Z")
        );
    }

    #[test]
    fn an_interval_runs_that_long_after_the_newest_backup() {
        let s = Schedule::every(Duration::from_secs(24 * 3600)).unwrap();
        let newest = at("2026-12-02T09:00:00Z");
        assert_eq!(
            s.due(Some(newest), at("2026-12-02T20:00:00Z")),
            at("2026-12-03T09:00:00Z")
        );
        // Down for two days: due (in the past), so taken at once.
        let now = at("2026-12-04T20:00:00Z");
        assert!(s.due(Some(newest), now) <= now);
        assert_eq!(s.last_fire(now), None);
    }

    #[test]
    fn bad_schedules_are_refused_with_a_hint() {
        let e = Schedule::cron("every night").unwrap_err();
        assert!(e.contains("\"every night\"") && e.contains("HINT"), "{e}");
        let e = Schedule::cron("0 0 30 2 *").unwrap_err();
        assert!(e.contains("never fires"), "{e}");
        let e = Schedule::every(Duration::ZERO).unwrap_err();
        assert!(e.contains("--base-backup-every"), "{e}");
    }
}
