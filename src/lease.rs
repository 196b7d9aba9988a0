//! The writer lease: one archiver writes a repository's segments at a time; and the lease
//! records every repository lock is made of.
//!
//! Owns the lease objects (`locks/writer/<term>-<seq>.json`), the decision to take, keep or
//! refuse the lease, its renewal, its release, and the fence every segment passes before it
//! is put. It does not own the uploads themselves (`archive/upload.rs`) nor the resume point
//! (`archive/resume.rs`). A module of its own, beside `archive` rather than inside it, so that
//! the base-backup lock (`backup/lock.rs`, built on the same records) does not depend on the
//! archiver that depends on `backup`.
//!
//! Objects are create-only, so a lease is a sequence of immutable records. Each *term* (one
//! writer's tenure) starts with record `<term>-0000000000` and is renewed by records
//! `<term>-<seq>` with the next `seq`; the newest record (highest term, then highest seq)
//! decides:
//! * none, a release record, or one whose `expires_at` has passed: the lease is free and a new
//!   writer puts `<term + 1>-0` (create-only: when two race, the loser's put conflicts and it
//!   is refused like any other second writer);
//! * the record of another writer on the *same slot* while that slot is free: that writer is
//!   gone (PostgreSQL lets one connection stream from a slot, and an archiver holding a slot is
//!   streaming from it or about to), so it is taken over at once — a restarted or kill -9'd
//!   archiver does not wait for the expiry;
//! * otherwise another archiver writes this repository: refused (exit 4), naming its host,
//!   pid, slot and when its lease expires.
//!
//! Taking over a lease that is not released (expired, or of a free slot) first *closes* its
//! term: the taker puts the record that would be the holder's next renewal (`<term>-<seq + 1>`,
//! naming the taker, marked released), then its own `<term + 1>-0`. Two create-only puts race
//! for that one name: should the holder renew first, the taker's close conflicts and it decides
//! again on what it reads; should the taker close first, the holder's renewal conflicts.
//!
//! So the holder renews *write-only*: every sixth of the time to live it puts its next record,
//! create-only, and reads nothing. A renewal that conflicts is the one that reads: its name was
//! taken by an earlier attempt of ours whose answer was lost (then the lease is still ours), or
//! by another archiver closing our term (a takeover, which stops this one for good). Every
//! [`CHECK_EVERY`]th renewal also reads the newest record (a writer that took the next term
//! without closing ours, or records deleted by hand) and lists the current generation's tail
//! (the segments whose start shares the chain end's 16 MiB region), stopping the run if a
//! segment this run did not write appears there. An idle repository thus sees one PUT and one
//! DELETE (of the record it supersedes) per renewal, and reads twice per time to live at most.
//!
//! A renewal is written only until a third of the time to live before the expiry (the margin):
//! a lease that could not be renewed by then is left to expire and then taken anew with the
//! next term, like anyone's, so that a late renewal can never land beside another archiver's
//! takeover (two archivers taking the next term race for one create-only name, and one alone
//! wins).
//!
//! Invariant protected here (the fence): **a segment is put only while this archiver holds an
//! unexpired lease, and only if it starts exactly where the chain ends** (the chain end found at
//! resume, extended by each segment this run put, in seal order). A lease that could not be
//! renewed before it expired stops the attempt (the run starts over and takes the lease again
//! if nobody else did); one taken by another writer stops the run (exit 4). The expiry is read
//! on each machine's own clock, so the writers' clocks must agree to well within the margin
//! (100 s of the default 5 minutes). On a clean stop the holder writes a release record, so the next start need not wait.
//!
//! The records, the decision, the renewal and the release serve other locks too: a [`Kind`]
//! names their prefix and whether the same-slot takeover applies (the base-backup lock,
//! `backup/lock.rs`, is a lease without it and without a chain to fence; instead, a lock held
//! on behalf of a writer lease this process took over, [`Lease::superseded`], is taken over at
//! once).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::lsn::{Lsn, PgTimestamp};
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Prefix of the lease records.
pub const LEASE_PREFIX: &str = "locks/writer/";

/// What a lease guards: where its records live and how it is taken over. The writer lease is
/// one kind; the base-backup lock (`backup/lock.rs`) is another, built on the same records,
/// decision, renewal and release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Prefix of its records (`<prefix><term>-<seq>.json`).
    pub prefix: &'static str,
    /// Its name in logs ("writer lease").
    pub name: &'static str,
    /// A live record of the same slot is taken over when that slot is free (see the module
    /// doc); without it, only a released or expired record is.
    pub slot_takeover: bool,
    /// The gauge set to 1 while it is held.
    pub gauge: Option<&'static str>,
}

/// The writer lease.
pub const WRITER: Kind = Kind {
    prefix: LEASE_PREFIX,
    name: "writer lease",
    slot_takeover: true,
    gauge: Some(telemetry::WRITER_LEASE),
};
/// How long a lease lasts without renewal, unless `--lease-ttl` says otherwise. Renewed every
/// sixth of it (each renewal is a PUT and the DELETE of the record it supersedes; every
/// [`CHECK_EVERY`]th adds a LIST and a GET of the records and a LIST of the chain's tail), and
/// not renewed in its last third.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Every this many renewals (twice the time to live: 10 minutes by default), a renewal also
/// reads the newest lease record and lists the chain's tail; the others only write.
pub const CHECK_EVERY: u64 = 12;
/// How often taking the lease decides again after its close of the holder's term lost the race
/// to the holder's renewal.
const TAKE_ATTEMPTS: usize = 3;
/// Terms before the current one whose records are kept (the recent history of writers).
const KEEP_TERMS: u64 = 3;

/// One lease record, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub format_version: u32,
    pub term: u64,
    pub seq: u64,
    /// Random, one per archiver process.
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub slot: String,
    /// When the term started.
    pub acquired_at: PgTimestamp,
    /// Past this instant, without a newer record, the lease is free.
    pub expires_at: PgTimestamp,
    /// The holder stopped cleanly: the lease is free.
    #[serde(default)]
    pub released: bool,
    /// A base-backup lock held by an archiver: the `owner` of that archiver's writer lease.
    /// A taker whose writer lease took over that one (so its holder is dead or fenced) takes
    /// the lock over at once. Absent in writer-lease records and manual backups' locks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
}

impl LeaseRecord {
    /// `host db1 pid 4242 slot "tidemark", lease term 3 until 2026-…`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "host {} pid {} slot {:?} (lease term {}, expires {})",
            self.host, self.pid, self.slot, self.term, self.expires_at
        )
    }
}

/// The name of record `seq` of term `term`; fixed width, so names sort by (term, seq).
pub fn lease_key(term: u64, seq: u64) -> String {
    record_key(LEASE_PREFIX, term, seq)
}

/// The name of record `seq` of term `term` of the lease whose records live under `prefix`.
pub fn record_key(prefix: &str, term: u64, seq: u64) -> String {
    format!("{prefix}{term:010}-{seq:010}.json")
}

/// Parses a name written by [`lease_key`]; other names are not lease records.
pub fn parse_lease_key(key: &str) -> Option<(u64, u64)> {
    parse_record_key(LEASE_PREFIX, key)
}

/// Parses a name written by [`record_key`] under `prefix`.
pub fn parse_record_key(prefix: &str, key: &str) -> Option<(u64, u64)> {
    let (term, seq) = key
        .strip_prefix(prefix)?
        .strip_suffix(".json")?
        .split_once('-')?;
    let digits = |s: &str| s.len() == 10 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(term) || !digits(seq) {
        return None;
    }
    Some((term.parse().ok()?, seq.parse().ok()?))
}

/// Why a free lease could be taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// No lease record at all.
    Fresh,
    /// The last holder released it.
    Released,
    /// The last holder's lease expired.
    Expired,
    /// The last holder archived the same slot, which is free now: it is gone.
    SlotFree,
    /// The last holder is a lock held for an archiver whose writer lease this process took
    /// over (a closed term: that archiver is dead or fenced).
    WriterGone,
}

/// What taking the lease does, given the newest record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ours already (an earlier attempt of this run): renew it with record `seq`.
    Renew { term: u64, seq: u64 },
    /// Start term `term`.
    Take { term: u64, why: Takeover },
    /// Another archiver holds it.
    Refuse,
    /// Ours, but too close to its expiry to be renewed safely: taken anew once expired.
    Wait,
    /// This run held it and another archiver has taken it since.
    Lost,
}

/// The lease decision, pure. `owner` and `slot` are this archiver's, `held` the term this run
/// held (if any), `slot_free` whether the slot is unused (absent or not streaming),
/// `gone_writer` the owner of a writer lease this process took over (a record held for that
/// writer is taken over), `margin` how long before its expiry a lease is no longer renewed
/// ([`renewable`]).
#[allow(clippy::too_many_arguments)]
pub fn decide(
    newest: Option<&LeaseRecord>,
    owner: &str,
    slot: &str,
    held: Option<u64>,
    slot_free: bool,
    gone_writer: Option<&str>,
    now: PgTimestamp,
    margin: Duration,
) -> Decision {
    let Some(r) = newest else {
        return Decision::Take {
            term: held.unwrap_or(0) + 1,
            why: Takeover::Fresh,
        };
    };
    if r.owner == owner && !r.released {
        if renewable(r.expires_at, now, margin) {
            return Decision::Renew {
                term: r.term,
                seq: r.seq + 1,
            };
        }
        if r.expires_at.0 > now.0 {
            return Decision::Wait;
        }
    }
    if held.is_some() && r.owner != owner {
        return Decision::Lost;
    }
    let why = if r.released {
        Takeover::Released
    } else if r.expires_at.0 <= now.0 {
        Takeover::Expired
    } else if r.slot == slot && slot_free {
        Takeover::SlotFree
    } else if gone_writer.is_some() && r.writer.as_deref() == gone_writer {
        Takeover::WriterGone
    } else {
        return Decision::Refuse;
    };
    Decision::Take {
        term: r.term + 1,
        why,
    }
}

/// Whether a lease expiring at `expires` may still be renewed at `now`: only until `margin`
/// before its expiry, so that a renewal never lands after another archiver saw the lease
/// expire (an expired lease, ours included, is only taken anew, through the create-only put of
/// the next term's first record, which one archiver alone can win).
pub fn renewable(expires: PgTimestamp, now: PgTimestamp, margin: Duration) -> bool {
    now.0.saturating_add(margin.as_micros() as i64) < expires.0
}

/// The newest record's key among `keys` (lease records only).
pub fn newest_key<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    newest_record_key(LEASE_PREFIX, keys)
}

/// The newest record's key among `keys` (records under `prefix` only).
pub fn newest_record_key<'a>(
    prefix: &str,
    keys: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    keys.into_iter()
        .filter_map(|k| parse_record_key(prefix, k).map(|ts| (ts, k)))
        .max()
        .map(|(_, k)| k)
}

/// Lease records that may go once term `term` is held: every term older than the last
/// `KEEP_TERMS`, and in `term` itself every renewal before `seq` but the first.
pub fn stale_keys<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    term: u64,
    seq: u64,
) -> Vec<&'a str> {
    stale_record_keys(LEASE_PREFIX, keys, term, seq)
}

/// [`stale_keys`] of the records under `prefix`.
pub fn stale_record_keys<'a>(
    prefix: &str,
    keys: impl IntoIterator<Item = &'a str>,
    term: u64,
    seq: u64,
) -> Vec<&'a str> {
    keys.into_iter()
        .filter(|k| match parse_record_key(prefix, k) {
            Some((t, s)) => t + KEEP_TERMS < term || (t == term && s > 0 && s < seq),
            None => false,
        })
        .collect()
}

/// The listing prefix of the segments whose start shares `lsn`'s 16 MiB region.
pub fn tail_prefix(generation: u32, lsn: Lsn) -> String {
    let name = crate::catalog::keys::segment(generation, lsn, lsn);
    let file_at = name.rfind('/').map_or(0, |i| i + 1);
    name[..file_at + 10].to_string()
}

/// Errors of the writer lease and the chain fence.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("repository {location} is being written by another archiver: {holder}\nHINT: a repository has one writer: stop the other archiver, or give this one its own --repo; if that archiver is dead, start this one again after its lease expires ({expires}, unless it is renewed) or delete {key} from the repository by hand", holder = holder.describe(), expires = holder.expires_at)]
    Held {
        location: String,
        key: String,
        holder: Box<LeaseRecord>,
    },
    #[error("lost the writer lease of repository {location} (term {term}): {by}; stopping without storing anything more\nHINT: a repository has one writer: stop the other archiver (or give one of them its own --repo)")]
    Lost {
        location: String,
        term: u64,
        /// Who took it, or what showed another writer.
        by: String,
    },
    #[error("the writer lease of repository {location} (term {term}) expired at {expired} without being renewed (the repository did not accept the renewal in time); no segment is stored until it is taken again")]
    Expired {
        location: String,
        term: u64,
        expired: PgTimestamp,
    },
    #[error("the writer lease of repository {location} (term {term}) could not be renewed before {until} and expires at {expires}; it is taken anew once it has expired")]
    TooLate {
        location: String,
        term: u64,
        until: PgTimestamp,
        expires: PgTimestamp,
    },
    #[error("repository {location}: segment {key} appeared in the chain this archiver is extending, and this archiver did not write it: another writer is storing segments into generation {generation}; stopping\nHINT: stop the other writer (every archiver of this repository must be a tidemark that takes the writer lease), then run `tidemark list` to see the damage")]
    Foreign {
        location: String,
        key: String,
        generation: u32,
    },
    #[error("repository {location}: segment {key} does not start where the chain ends ({expected}); refusing to store it")]
    NotContiguous {
        location: String,
        key: String,
        expected: Lsn,
    },
    #[error("repository {location}: lease record {key} is not valid: {detail}\nHINT: delete {key} from the repository by hand if no archiver is running")]
    BadRecord {
        location: String,
        key: String,
        detail: String,
    },
    #[error("writer lease: {0}")]
    Store(#[from] StoreError),
}

impl crate::error::Classify for LeaseError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            LeaseError::Store(e) => e.exit_status(),
            LeaseError::Held { .. }
            | LeaseError::Lost { .. }
            | LeaseError::Expired { .. }
            | LeaseError::TooLate { .. }
            | LeaseError::Foreign { .. }
            | LeaseError::NotContiguous { .. }
            | LeaseError::BadRecord { .. } => Repository,
        }
    }
}

impl LeaseError {
    /// Whether starting the attempt over may succeed: the store was unreachable (and the lease
    /// expired meanwhile). Another writer, a foreign segment, a broken record are not.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Store(e) => e.is_retryable(),
            LeaseError::Expired { .. } | LeaseError::TooLate { .. } => true,
            LeaseError::Held { .. }
            | LeaseError::Lost { .. }
            | LeaseError::Foreign { .. }
            | LeaseError::NotContiguous { .. }
            | LeaseError::BadRecord { .. } => false,
        }
    }
}

/// The term this archiver holds.
#[derive(Clone, Debug)]
struct Held {
    term: u64,
    seq: u64,
    acquired_at: PgTimestamp,
    expires_at: PgTimestamp,
}

/// The chain being extended: where the next segment must start, and what this run put.
#[derive(Debug, Default)]
struct Chain {
    generation: u32,
    /// Where this attempt resumed.
    start: Lsn,
    /// Where the next segment must start.
    next: Lsn,
    /// Segments this run put (start → end), in the tail's region and after.
    put: BTreeMap<Lsn, Lsn>,
}

/// How this run lost the lease for good.
#[derive(Clone, Debug)]
enum Lost {
    /// Another archiver took it (its record).
    Taken(Box<LeaseRecord>),
    /// Another writer's segment appeared in the chain.
    Foreign { key: String, generation: u32 },
}

#[derive(Debug, Default)]
struct State {
    held: Option<Held>,
    /// The term this run held last, kept once the lease is lost or released.
    last_term: Option<u64>,
    /// Why the lease is lost for good (another writer, a foreign segment).
    lost: Option<Lost>,
    chain: Option<Chain>,
    /// The owner of the live term this run closed to take the lease over (expired, or of a
    /// free slot): that holder is dead or fenced.
    superseded: Option<String>,
}

/// This archiver's writer lease on one repository, shared by the run, its renewal task and
/// the uploader.
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn Store>,
    kind: Kind,
    ttl: Duration,
    owner: String,
    host: String,
    pid: u32,
    slot: String,
    /// Written into each record: the writer lease on whose behalf this lock is held.
    writer: Option<String>,
    /// A record held for this writer is taken over at once ([`Takeover::WriterGone`]).
    gone_writer: Option<String>,
    state: Mutex<State>,
    /// Serializes the writes of records (a renewal and the release never race).
    io: tokio::sync::Mutex<()>,
}

impl Lease {
    /// The writer lease of the archiver of `slot`.
    pub fn new(store: Arc<dyn Store>, ttl: Duration, slot: &str) -> Lease {
        Lease::of_kind(WRITER, store, ttl, slot)
    }

    /// A lease of `kind`, held on behalf of `slot`.
    pub fn of_kind(kind: Kind, store: Arc<dyn Store>, ttl: Duration, slot: &str) -> Lease {
        Lease {
            store,
            kind,
            ttl,
            owner: format!("{:032x}", rand::random::<u128>()),
            host: crate::host::hostname(),
            pid: std::process::id(),
            slot: slot.to_string(),
            writer: None,
            gone_writer: None,
            state: Mutex::new(State::default()),
            io: tokio::sync::Mutex::new(()),
        }
    }

    /// This lease held on behalf of the archiver whose writer lease's owner is `writer`,
    /// taking over at once a record held for `gone_writer` (a writer lease that archiver took
    /// over: see [`Lease::superseded`]).
    pub fn for_writer(mut self, writer: &str, gone_writer: Option<String>) -> Lease {
        self.writer = Some(writer.to_string());
        self.gone_writer = gone_writer;
        self
    }

    /// The random id this lease's records carry as `owner`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The owner of another holder's live term this lease took over (closing it): that holder
    /// is dead or fenced, and so are the locks held on its behalf.
    pub fn superseded(&self) -> Option<String> {
        self.state().superseded.clone()
    }

    fn location(&self) -> String {
        self.store.location()
    }

    fn set_gauge(&self, value: f64) {
        if let Some(name) = self.kind.gauge {
            metrics::gauge!(name).set(value);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The renewal period: a sixth of the time to live, so that a few renewals may fail
    /// before the [`margin`](Self::margin).
    pub fn period(&self) -> Duration {
        (self.ttl / 6).max(Duration::from_millis(100))
    }

    /// No renewal is written later than this before the lease's expiry: the time a renewal's
    /// write may take, and the clocks' disagreement, must stay below it.
    pub fn margin(&self) -> Duration {
        self.ttl / 3
    }

    fn too_late(&self, term: u64, expires: PgTimestamp) -> LeaseError {
        LeaseError::TooLate {
            location: self.location(),
            term,
            until: PgTimestamp(expires.0.saturating_sub(self.margin().as_micros() as i64)),
            expires,
        }
    }

    /// Reads the newest lease record and every record's key.
    async fn newest(&self) -> Result<(Option<(String, LeaseRecord)>, Vec<String>), LeaseError> {
        // A record deleted between the listing and the read (old terms are deleted) is
        // listed again.
        for _ in 0..5 {
            let keys: Vec<String> = self
                .store
                .list(self.kind.prefix)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect();
            let Some(key) = newest_record_key(self.kind.prefix, keys.iter().map(String::as_str))
                .map(str::to_string)
            else {
                return Ok((None, keys));
            };
            match self.store.get(&key).await {
                Ok(bytes) => {
                    let r: LeaseRecord =
                        serde_json::from_slice(&bytes).map_err(|e| LeaseError::BadRecord {
                            location: self.location(),
                            key: key.clone(),
                            detail: e.to_string(),
                        })?;
                    return Ok((Some((key, r)), keys));
                }
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LeaseError::BadRecord {
            location: self.location(),
            key: self.kind.prefix.into(),
            detail: "the newest record keeps disappearing while it is read".into(),
        })
    }

    fn record(&self, term: u64, seq: u64, acquired_at: PgTimestamp, released: bool) -> LeaseRecord {
        let now = PgTimestamp::now();
        LeaseRecord {
            format_version: 1,
            term,
            seq,
            owner: self.owner.clone(),
            host: self.host.clone(),
            pid: self.pid,
            slot: self.slot.clone(),
            acquired_at,
            expires_at: if released {
                now
            } else {
                PgTimestamp(now.0.saturating_add(self.ttl.as_micros() as i64))
            },
            released,
            writer: self.writer.clone(),
        }
    }

    async fn put_record(&self, r: &LeaseRecord) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(r).expect("a lease record serializes");
        self.store
            .put(
                &record_key(self.kind.prefix, r.term, r.seq),
                Bytes::from(body),
            )
            .await
    }

    /// Writes renewal `r` of a lease expiring at `expires`, giving up when it has not landed
    /// by the margin before that expiry.
    async fn put_renewal(
        &self,
        r: &LeaseRecord,
        expires: Option<PgTimestamp>,
    ) -> Result<(), LeaseError> {
        let expires = expires.unwrap_or(r.expires_at);
        let left = expires.0 - self.margin().as_micros() as i64 - PgTimestamp::now().0;
        let left = Duration::from_micros(left.max(0) as u64);
        match tokio::time::timeout(left, self.put_record(r)).await {
            Ok(put) => Ok(put?),
            Err(_) => Err(self.too_late(r.term, expires)),
        }
    }

    /// Closes the term of `holder`'s record before taking the lease over: puts the record that
    /// would be the holder's next renewal, naming this archiver and marked released. `false`
    /// when the holder's renewal took that name first (the holder is alive).
    async fn close_term(&self, holder: &LeaseRecord) -> Result<bool, LeaseError> {
        let close = self.record(holder.term, holder.seq + 1, PgTimestamp::now(), true);
        match self.put_record(&close).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the lease, or renews it when this run holds it already. `slot_free`: the slot
    /// this archiver streams from is absent or not streaming (see the module doc).
    pub async fn acquire(&self, slot_free: bool) -> Result<(), LeaseError> {
        let _io = self.io.lock().await;
        let lost = self.state().lost.clone();
        if let Some(lost) = lost {
            return Err(self.lost_error(&lost));
        }
        let mut attempt = 0;
        let (newest, keys, term, seq, acquired_at) = loop {
            attempt += 1;
            let (newest, keys) = self.newest().await?;
            let last_term = self.state().last_term;
            let decision = decide(
                newest.as_ref().map(|(_, r)| r),
                &self.owner,
                &self.slot,
                last_term,
                slot_free && self.kind.slot_takeover,
                self.gone_writer.as_deref(),
                PgTimestamp::now(),
                self.margin(),
            );
            match decision {
                Decision::Renew { term, seq } => {
                    let acquired_at = newest
                        .as_ref()
                        .map_or(PgTimestamp::now(), |(_, r)| r.acquired_at);
                    break (newest, keys, term, seq, acquired_at);
                }
                Decision::Take { term, why } => {
                    if let Some((key, r)) = &newest {
                        let live = matches!(
                            why,
                            Takeover::Expired | Takeover::SlotFree | Takeover::WriterGone
                        );
                        if live && !self.close_term(r).await? {
                            // The holder renewed first: it is alive after all. Decide again
                            // on its new record.
                            if attempt < TAKE_ATTEMPTS {
                                continue;
                            }
                            let (newest, _) = self.newest().await?;
                            let (key, holder) = newest.unwrap_or_else(|| (key.clone(), r.clone()));
                            return Err(LeaseError::Held {
                                location: self.location(),
                                key,
                                holder: Box::new(holder),
                            });
                        }
                        match why {
                            Takeover::Expired => {
                                warn!(previous = %r.describe(), record = %key, "the previous holder's {} expired: taking it over", self.kind.name)
                            }
                            Takeover::SlotFree => {
                                info!(previous = %r.describe(), record = %key, "the previous archiver of slot {:?} is gone (the slot is free): taking the repository over", r.slot)
                            }
                            Takeover::WriterGone => {
                                info!(previous = %r.describe(), record = %key, "the {} was held by the archiver whose writer lease this one took over: taking it over", self.kind.name)
                            }
                            Takeover::Released | Takeover::Fresh => {}
                        }
                        if live && r.owner != self.owner {
                            self.state().superseded = Some(r.owner.clone());
                        }
                    }
                    break (newest, keys, term, 0, PgTimestamp::now());
                }
                Decision::Refuse => {
                    let (key, holder) = newest.expect("a refusal names a holder");
                    return Err(LeaseError::Held {
                        location: self.location(),
                        key,
                        holder: Box::new(holder),
                    });
                }
                Decision::Lost => {
                    let (_, holder) = newest.expect("a lost lease names the new holder");
                    return Err(self.lose(holder));
                }
                Decision::Wait => {
                    let (_, r) = newest.expect("waiting on our own record");
                    return Err(self.too_late(r.term, r.expires_at));
                }
            }
        };
        let r = self.record(term, seq, acquired_at, false);
        let put = if seq == 0 {
            self.put_record(&r).await.map_err(LeaseError::from)
        } else {
            self.put_renewal(&r, newest.as_ref().map(|(_, r)| r.expires_at))
                .await
        };
        match put {
            Ok(()) => {}
            Err(LeaseError::Store(StoreError::Conflict { .. })) => {
                // Another archiver put the same record name first: it won the race.
                let (newest, _) = self.newest().await?;
                let (key, holder) =
                    newest.unwrap_or_else(|| (record_key(self.kind.prefix, term, seq), r.clone()));
                return Err(LeaseError::Held {
                    location: self.location(),
                    key,
                    holder: Box::new(holder),
                });
            }
            Err(e) => return Err(e),
        }
        {
            let mut st = self.state();
            st.held = Some(Held {
                term,
                seq,
                acquired_at,
                expires_at: r.expires_at,
            });
            st.last_term = Some(term);
        }
        if seq == 0 {
            info!(term, slot = %self.slot, host = %self.host, pid = self.pid, ttl = ?self.ttl, "took the {} of the repository", self.kind.name);
        }
        self.set_gauge(1.0);
        self.delete_stale(&keys, term, seq).await;
        Ok(())
    }

    async fn delete_stale(&self, keys: &[String], term: u64, seq: u64) {
        for key in stale_record_keys(self.kind.prefix, keys.iter().map(String::as_str), term, seq) {
            if let Err(e) = self.store.delete(key).await {
                warn!(record = %key, error = %e, "cannot delete an old writer-lease record");
            }
        }
    }

    /// Marks the lease lost to `holder` and returns the error that says so.
    fn lose(&self, holder: LeaseRecord) -> LeaseError {
        self.mark_lost(Lost::Taken(Box::new(holder)))
    }

    fn mark_lost(&self, lost: Lost) -> LeaseError {
        {
            let mut st = self.state();
            st.held = None;
            st.lost = Some(lost.clone());
        }
        self.set_gauge(0.0);
        self.lost_error(&lost)
    }

    fn lost_error(&self, lost: &Lost) -> LeaseError {
        match lost {
            Lost::Taken(holder) => LeaseError::Lost {
                location: self.location(),
                term: self.state().last_term.unwrap_or_default(),
                by: format!("taken by {}", holder.describe()),
            },
            Lost::Foreign { key, generation } => LeaseError::Foreign {
                location: self.location(),
                key: key.clone(),
                generation: *generation,
            },
        }
    }

    /// Renews the lease once: writes the next renewal (create-only, nothing read first; a
    /// conflict means a takeover or a lost answer, and only then are the records read). Every
    /// [`CHECK_EVERY`]th renewal first reads the records (a newer term is a takeover) and then
    /// checks the chain's tail for a foreign segment.
    pub async fn renew(&self) -> Result<(), LeaseError> {
        let _io = self.io.lock().await;
        let Some(held) = self.state().held.clone() else {
            return Ok(());
        };
        let seq = held.seq + 1;
        let check = seq.is_multiple_of(CHECK_EVERY);
        let mut keys = Vec::new();
        if check {
            let (newest, listed) = self.newest().await?;
            match newest {
                Some((_, r)) if r.owner == self.owner && r.term == held.term => {}
                Some((_, r)) => return Err(self.lose(r)),
                // The records were deleted by hand: write ours again.
                None => {}
            }
            keys = listed;
        }
        if !renewable(held.expires_at, PgTimestamp::now(), self.margin()) {
            return Err(self.too_late(held.term, held.expires_at));
        }
        let r = self.record(held.term, seq, held.acquired_at, false);
        let (seq, expires_at) = match self.put_renewal(&r, Some(held.expires_at)).await {
            Ok(()) => (seq, r.expires_at),
            Err(LeaseError::Store(StoreError::Conflict { key, .. })) => {
                self.after_conflict(&held, &key).await?
            }
            Err(e) => return Err(e),
        };
        if let Some(h) = self.state().held.as_mut() {
            h.seq = seq;
            h.expires_at = expires_at;
        }
        // The record this one supersedes (a term's first record is kept).
        if held.seq > 0 && held.seq < seq {
            let key = record_key(self.kind.prefix, held.term, held.seq);
            match self.store.delete(&key).await {
                Ok(()) | Err(StoreError::NotFound { .. }) => {}
                Err(e) => {
                    warn!(record = %key, error = %e, "cannot delete an old writer-lease record")
                }
            }
        }
        if !check {
            return Ok(());
        }
        self.delete_stale(&keys, held.term, seq).await;
        self.check_tail().await
    }

    /// A renewal's name `key` was taken: reads the records to learn by whom. Ours (an earlier
    /// attempt whose answer was lost): the lease is held as that record says. Another
    /// archiver's (it closed our term, or took the next one): the lease is lost.
    async fn after_conflict(
        &self,
        held: &Held,
        key: &str,
    ) -> Result<(u64, PgTimestamp), LeaseError> {
        let (newest, _) = self.newest().await?;
        match newest {
            Some((_, r)) if r.owner == self.owner && r.term == held.term && !r.released => {
                Ok((r.seq, r.expires_at))
            }
            Some((_, r)) => Err(self.lose(r)),
            None => Err(LeaseError::BadRecord {
                location: self.location(),
                key: key.to_string(),
                detail: "the renewal's name is taken, but no lease record is listed".into(),
            }),
        }
    }

    /// Whether a segment may be put now: the lease is held and unexpired.
    pub fn check(&self) -> Result<(), LeaseError> {
        let st = self.state();
        if let Some(lost) = st.lost.clone() {
            drop(st);
            return Err(self.lost_error(&lost));
        }
        match &st.held {
            Some(h) if PgTimestamp::now().0 < h.expires_at.0 => Ok(()),
            Some(h) => Err(LeaseError::Expired {
                location: self.location(),
                term: h.term,
                expired: h.expires_at,
            }),
            None => Err(LeaseError::Expired {
                location: self.location(),
                term: st.last_term.unwrap_or_default(),
                expired: PgTimestamp::now(),
            }),
        }
    }

    /// Starts the fence of an attempt that extends `generation`'s chain from `start`.
    pub fn begin_chain(&self, generation: u32, start: Lsn) {
        self.state().chain = Some(Chain {
            generation,
            start,
            next: start,
            put: BTreeMap::new(),
        });
    }

    /// The fence before a segment's first put (in seal order): the lease is held and the
    /// segment `key` starts where the chain ends. Records it as this run's.
    pub fn admit(&self, key: &str) -> Result<(), LeaseError> {
        self.check()?;
        let mut st = self.state();
        let chain = st.chain.as_mut().ok_or_else(|| LeaseError::NotContiguous {
            location: self.store.location(),
            key: key.to_string(),
            expected: Lsn::ZERO,
        })?;
        match crate::catalog::keys::parse_segment(key).map(|k| (k.generation, k.start, k.end)) {
            Some((g, start, end)) if g == chain.generation && start == chain.next => {
                chain.next = end;
                chain.put.insert(start, end);
                Ok(())
            }
            _ => Err(LeaseError::NotContiguous {
                location: self.store.location(),
                key: key.to_string(),
                expected: chain.next,
            }),
        }
    }

    /// Lists the chain's tail and fails if a segment this run did not put is there.
    pub async fn check_tail(&self) -> Result<(), LeaseError> {
        let Some((generation, start, next)) = self
            .state()
            .chain
            .as_ref()
            .map(|c| (c.generation, c.start, c.next))
        else {
            return Ok(());
        };
        let prefix = tail_prefix(generation, next);
        let listed = self.store.list(&prefix).await?;
        let mut st = self.state();
        let Some(chain) = st.chain.as_mut() else {
            return Ok(());
        };
        for o in &listed {
            let Some((_, s, e)) =
                crate::catalog::keys::parse_segment(&o.key).map(|k| (k.generation, k.start, k.end))
            else {
                continue;
            };
            if e <= start {
                // Before this attempt: resume checked it.
                continue;
            }
            if chain.put.get(&s) != Some(&e) {
                drop(st);
                return Err(self.mark_lost(Lost::Foreign {
                    key: o.key.clone(),
                    generation,
                }));
            }
        }
        // Segments wholly before the listed region are not listed again.
        let region = listed_region_start(&prefix);
        chain.put.retain(|_, end| *end >= region);
        Ok(())
    }

    /// Renews the lease every period until `stop`, cancelling `run` (and leaving the lease
    /// unheld) when it is lost, a foreign segment appears, or renewals fail until it expires.
    pub async fn keep_renewed(self: Arc<Self>, run: CancellationToken, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.renew().await {
                Ok(()) => {}
                Err(e) if e.is_transient() && self.check().is_ok() => {
                    warn!(error = %e, "cannot renew the {}; retrying", self.kind.name);
                }
                Err(e) => {
                    if e.is_transient() {
                        warn!(error = %e, "the {} expired before it could be renewed; stopping", self.kind.name);
                    } else {
                        // The error itself ends the run, and is reported there.
                        warn!(
                            "this process no longer holds the repository's {}; stopping",
                            self.kind.name
                        );
                    }
                    run.cancel();
                    return;
                }
            }
        }
    }

    /// Writes a release record, so the next archiver need not wait (a clean stop).
    pub async fn release(&self) {
        let _io = self.io.lock().await;
        let Some(held) = self.state().held.take() else {
            return;
        };
        self.set_gauge(0.0);
        let r = self.record(held.term, held.seq + 1, held.acquired_at, true);
        match self.put_record(&r).await {
            Ok(()) => info!(term = held.term, "released the {}", self.kind.name),
            Err(e) => {
                warn!(error = %e, term = held.term, "cannot release the {}; the next taker waits until it expires", self.kind.name)
            }
        }
    }
}

/// The lowest LSN whose segments a listing of `prefix` (from [`tail_prefix`]) shows.
fn listed_region_start(prefix: &str) -> Lsn {
    let hex = &prefix[prefix.rfind('/').map_or(0, |i| i + 1)..];
    Lsn::from_hex16(&format!("{hex:0<16}")).unwrap_or(Lsn::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    const NOW: i64 = 1_000_000_000;
    const MARGIN: i64 = 20_000_000;

    fn rec(term: u64, seq: u64, owner: &str, slot: &str, expires: i64) -> LeaseRecord {
        LeaseRecord {
            format_version: 1,
            term,
            seq,
            owner: owner.into(),
            host: "db1".into(),
            pid: 42,
            slot: slot.into(),
            acquired_at: PgTimestamp(0),
            expires_at: PgTimestamp(expires),
            released: false,
            writer: None,
        }
    }

    fn d(newest: Option<&LeaseRecord>, held: Option<u64>, slot_free: bool) -> Decision {
        decide(
            newest,
            "me",
            "tidemark",
            held,
            slot_free,
            None,
            PgTimestamp(NOW),
            Duration::from_micros(MARGIN as u64),
        )
    }

    #[test]
    fn an_absent_released_or_expired_lease_is_taken_with_the_next_term() {
        assert_eq!(
            d(None, None, false),
            Decision::Take {
                term: 1,
                why: Takeover::Fresh
            }
        );
        let mut released = rec(4, 7, "other", "tm2", NOW + 1);
        released.released = true;
        assert_eq!(
            d(Some(&released), None, false),
            Decision::Take {
                term: 5,
                why: Takeover::Released
            }
        );
        // Expired exactly now.
        let expired = rec(4, 7, "other", "tm2", NOW);
        assert_eq!(
            d(Some(&expired), None, false),
            Decision::Take {
                term: 5,
                why: Takeover::Expired
            }
        );
    }

    #[test]
    fn a_live_lease_of_another_slot_is_refused_whatever_the_slot_state() {
        let live = rec(4, 7, "other", "tm2", NOW + 1);
        assert_eq!(d(Some(&live), None, true), Decision::Refuse);
        assert_eq!(d(Some(&live), None, false), Decision::Refuse);
    }

    #[test]
    fn a_live_lease_of_the_same_slot_is_taken_over_only_when_the_slot_is_free() {
        let live = rec(4, 7, "other", "tidemark", NOW + 1);
        assert_eq!(
            d(Some(&live), None, true),
            Decision::Take {
                term: 5,
                why: Takeover::SlotFree
            }
        );
        assert_eq!(d(Some(&live), None, false), Decision::Refuse);
    }

    #[test]
    fn a_live_lock_is_taken_over_only_when_held_for_the_writer_taken_over() {
        let decide_gone = |r: &LeaseRecord, gone: Option<&str>| {
            decide(
                Some(r),
                "me",
                "tidemark",
                None,
                false,
                gone,
                PgTimestamp(NOW),
                Duration::from_micros(MARGIN as u64),
            )
        };
        let mut lock = rec(4, 7, "other", "tidemark", NOW + 1);
        lock.writer = Some("dead-archiver".into());
        assert_eq!(
            decide_gone(&lock, Some("dead-archiver")),
            Decision::Take {
                term: 5,
                why: Takeover::WriterGone
            }
        );
        assert_eq!(decide_gone(&lock, Some("another")), Decision::Refuse);
        assert_eq!(decide_gone(&lock, None), Decision::Refuse);
        // A manual backup's lock names no writer: always waited for.
        lock.writer = None;
        assert_eq!(decide_gone(&lock, Some("dead-archiver")), Decision::Refuse);
    }

    #[test]
    fn our_own_lease_is_renewed_until_the_margin_then_only_taken_anew_once_expired() {
        let ours = rec(4, 7, "me", "tidemark", NOW + MARGIN + 1);
        assert_eq!(
            d(Some(&ours), Some(4), false),
            Decision::Renew { term: 4, seq: 8 }
        );
        let late = rec(4, 7, "me", "tidemark", NOW + MARGIN);
        assert_eq!(d(Some(&late), Some(4), false), Decision::Wait);
        let expired = rec(4, 7, "me", "tidemark", NOW);
        assert_eq!(
            d(Some(&expired), Some(4), false),
            Decision::Take {
                term: 5,
                why: Takeover::Expired
            },
            "an expired lease is taken through the next term's create-only put, never renewed"
        );
    }

    #[test]
    fn a_newer_holder_means_lost() {
        // Taken while this run held it: lost, even if the taker's lease has expired since.
        let taker = rec(5, 0, "other", "tm2", NOW - 1);
        assert_eq!(d(Some(&taker), Some(4), true), Decision::Lost);
        // The records were deleted by hand: a new term above the one held.
        assert_eq!(
            d(None, Some(4), false),
            Decision::Take {
                term: 5,
                why: Takeover::Fresh
            }
        );
    }

    #[test]
    fn keys_sort_by_term_then_seq_and_stale_records_are_chosen() {
        assert_eq!(lease_key(3, 12), "locks/writer/0000000003-0000000012.json");
        assert_eq!(parse_lease_key(&lease_key(3, 12)), Some((3, 12)));
        assert_eq!(parse_lease_key("locks/writer/3-12.json"), None);
        assert_eq!(parse_lease_key("locks/writer/probe"), None);
        let keys: Vec<String> = [(1, 0), (1, 9), (2, 0), (5, 0), (6, 0), (6, 3), (6, 4)]
            .iter()
            .map(|&(t, s)| lease_key(t, s))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        assert_eq!(newest_key(keys.clone()), Some(lease_key(6, 4).as_str()));
        assert_eq!(newest_key(["locks/writer/x"]), None);
        let stale = stale_keys(keys, 6, 4);
        assert_eq!(
            stale,
            [
                lease_key(1, 0).as_str(),
                lease_key(1, 9).as_str(),
                lease_key(2, 0).as_str(),
                lease_key(6, 3).as_str()
            ]
        );
    }

    #[test]
    fn the_tail_prefix_is_the_chain_ends_16_mib_region() {
        let p = tail_prefix(1, Lsn(0x16_B374_D848));
        assert_eq!(p, "segments/00000001/00000016B3");
        assert_eq!(listed_region_start(&p), Lsn(0x16_B300_0000));
    }

    fn seg(start: u64, end: u64) -> String {
        crate::catalog::keys::segment(1, Lsn(start), Lsn(end))
    }

    async fn lease_on(dir: &std::path::Path, slot: &str) -> (Arc<dyn Store>, Lease) {
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir));
        (store.clone(), Lease::new(store, DEFAULT_TTL, slot))
    }

    #[tokio::test]
    async fn a_second_writer_is_refused_naming_the_first_and_release_frees_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (_, a) = lease_on(dir.path(), "tidemark").await;
        let (_, b) = lease_on(dir.path(), "tm2").await;
        a.acquire(false).await.unwrap();
        let err = b.acquire(true).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, LeaseError::Held { .. }), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id()))
                && text.contains("slot \"tidemark\"")
                && text.contains("HINT"),
            "{text}"
        );
        // A renewal keeps it; a new attempt of the same run renews too.
        a.renew().await.unwrap();
        a.acquire(false).await.unwrap();
        a.check().unwrap();
        a.release().await;
        assert!(a.check().is_err(), "released: no more puts");
        b.acquire(false).await.unwrap();
        // The first writer, coming back, finds it lost.
        let err = a.acquire(true).await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_renewal_that_finds_a_newer_term_loses_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let (_, a) = lease_on(dir.path(), "tidemark").await;
        let (_, b) = lease_on(dir.path(), "tidemark").await;
        a.acquire(false).await.unwrap();
        // Same slot, free: the second takes over (the first is presumed gone).
        b.acquire(true).await.unwrap();
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Lost { .. }), "{err}");
        assert!(a.check().is_err());
        a.begin_chain(1, Lsn(0x100));
        assert!(a.admit(&seg(0x100, 0x200)).is_err(), "fenced off");
    }

    #[tokio::test]
    async fn segments_pass_the_fence_only_in_chain_order_and_a_foreign_one_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let (store, a) = lease_on(dir.path(), "tidemark").await;
        a.acquire(false).await.unwrap();
        a.begin_chain(1, Lsn(0x100));
        a.admit(&seg(0x100, 0x200)).unwrap();
        let err = a.admit(&seg(0x180, 0x300)).unwrap_err();
        assert!(
            matches!(&err, LeaseError::NotContiguous { expected, .. } if *expected == Lsn(0x200)),
            "{err}"
        );
        a.admit(&seg(0x200, 0x300)).unwrap();
        store
            .put(&seg(0x100, 0x200), Bytes::from_static(b"a"))
            .await
            .unwrap();
        store
            .put(&seg(0x200, 0x300), Bytes::from_static(b"b"))
            .await
            .unwrap();
        a.check_tail().await.unwrap();
        // Another writer's segment, overlapping: the renewals that only write do not see it,
        // the next one that checks does.
        store
            .put(&seg(0x150, 0x250), Bytes::from_static(b"c"))
            .await
            .unwrap();
        for _ in 1..CHECK_EVERY {
            a.renew().await.unwrap();
        }
        let err = a.renew().await.unwrap_err();
        assert!(matches!(err, LeaseError::Foreign { .. }), "{err}");
        assert!(err.to_string().contains(&seg(0x150, 0x250)), "{err}");
        assert!(a.check().is_err(), "a foreign segment stops the puts");
    }

    #[tokio::test]
    async fn a_lease_not_renewed_in_time_stops_the_puts_and_is_taken_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let a = Lease::new(store.clone(), Duration::from_millis(600), "tidemark");
        a.acquire(false).await.unwrap();
        a.check().unwrap();
        // Past the margin (200 ms before the expiry): no renewal is written.
        tokio::time::sleep(Duration::from_millis(450)).await;
        let err = a.renew().await.unwrap_err();
        assert!(
            matches!(err, LeaseError::TooLate { .. }) && err.is_transient(),
            "{err}"
        );
        assert_eq!(
            store.list(LEASE_PREFIX).await.unwrap().len(),
            1,
            "nothing written"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = a.check().unwrap_err();
        assert!(
            matches!(err, LeaseError::Expired { .. }) && err.is_transient(),
            "{err}"
        );
        // The next attempt takes the next term (nobody else did).
        a.acquire(false).await.unwrap();
        a.check().unwrap();
        let newest = store.list(LEASE_PREFIX).await.unwrap().pop().unwrap().key;
        assert_eq!(newest, lease_key(2, 0));
    }

    #[tokio::test]
    async fn renewals_only_write_and_every_twelfth_reads() {
        use crate::store::faulty::{FaultyStore, Op};
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let faulty = Arc::new(FaultyStore::new(local));
        let store: Arc<dyn Store> = faulty.clone();
        let a = Lease::new(store, DEFAULT_TTL, "tidemark");
        a.acquire(false).await.unwrap();
        a.begin_chain(1, Lsn(0x100));
        let reads = || faulty.calls(Op::Get).len() + faulty.calls(Op::List).len();
        let (reads0, puts0) = (reads(), faulty.calls(Op::Put).len());
        for _ in 1..CHECK_EVERY {
            a.renew().await.unwrap();
        }
        assert_eq!(reads(), reads0, "a renewal between checks reads nothing");
        assert_eq!(
            faulty.calls(Op::Put).len() - puts0,
            CHECK_EVERY as usize - 1,
            "one put per renewal"
        );
        a.renew().await.unwrap();
        let lists = faulty.calls(Op::List);
        assert!(
            lists.iter().any(|k| k == LEASE_PREFIX)
                && lists.iter().any(|k| k.starts_with("segments/")),
            "the twelfth renewal reads the records and lists the tail: {lists:?}"
        );
    }

    #[tokio::test]
    async fn a_renewal_whose_answer_was_lost_keeps_the_lease() {
        use crate::store::faulty::{Fault, FaultyStore, Op, Rule, Times};
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let faulty = Arc::new(FaultyStore::new(local.clone()));
        let store: Arc<dyn Store> = faulty.clone();
        let a = Lease::new(store, DEFAULT_TTL, "tidemark");
        a.acquire(false).await.unwrap();
        // Stored, but answered with an error: the next renewal offers other bytes (a later
        // expiry) under the same name, conflicts, reads, and finds its own record.
        faulty.add_rule(Rule::new(Op::Put, Fault::AnswerLost, Times::N(1)));
        let err = a.renew().await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        a.renew().await.unwrap();
        a.check().unwrap();
        a.renew().await.unwrap();
        let keys: Vec<String> = local
            .list(LEASE_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, [lease_key(1, 0), lease_key(1, 2)]);
    }

    #[tokio::test]
    async fn a_takeover_closes_the_term_and_loses_to_a_renewal_that_came_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, a) = lease_on(dir.path(), "tidemark").await;
        let (_, b) = lease_on(dir.path(), "tidemark").await;
        a.acquire(false).await.unwrap();
        a.renew().await.unwrap();
        // b takes over (same slot, free): it closes term 1 with the name of a's next renewal.
        b.acquire(true).await.unwrap();
        let closed: LeaseRecord =
            serde_json::from_slice(&store.get(&lease_key(1, 2)).await.unwrap()).unwrap();
        assert!(closed.released && closed.owner == b.owner, "{closed:?}");
        store.get(&lease_key(2, 0)).await.unwrap();
        // a's renewal (write-only) conflicts with the close and learns of the takeover.
        let err = a.renew().await.unwrap_err();
        assert!(
            matches!(&err, LeaseError::Lost { by, .. } if by.contains("lease term 2")),
            "{err}"
        );
        assert!(
            store.get(&lease_key(1, 3)).await.is_err(),
            "a writes nothing more"
        );
    }

    #[tokio::test]
    async fn renewals_do_not_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let (store, a) = lease_on(dir.path(), "tidemark").await;
        a.acquire(false).await.unwrap();
        for _ in 0..5 {
            a.renew().await.unwrap();
        }
        let keys: Vec<String> = store
            .list(LEASE_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, [lease_key(1, 0), lease_key(1, 5)]);
    }
}
