//! The uploader stage: stores sealed segments, several at once, and publishes the durable LSN.
//!
//! Owns the upload of each segment (retrying what retrying can fix), and what happens when one
//! fails for good: no new upload starts, those in flight finish or give up, and the segments
//! stored past the failed one are deleted again. The acknowledgement rule itself is
//! [`DurablePrefix`](crate::archive::durable::DurablePrefix)'s.
//!
//! Every segment passes the writer's fence ([`Lease::admit`]) before its first put, in seal
//! order: the lease is held and the segment starts where the chain ends; every retry checks
//! the lease again. A refusal is a failure like any other (nothing past it is acknowledged).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::durable::DurablePrefix;
use super::{ArchiveError, AttemptStats, Flow, Sealed};
use crate::lease::Lease;
use crate::lsn::Lsn;
use crate::retry::{retry, Backoff, Jitter, Policy, RetryError, Retrying};
use crate::store::{Store, StoreError};
use crate::telemetry;

/// Uploads sealed segments with bounded concurrency and publishes the durable LSN: the end
/// of the longest prefix of segments (in seal order) that are all stored ([`DurablePrefix`]).
///
/// When a segment fails for good, no new upload starts, the uploads in flight are awaited
/// (those still retrying give up), and every segment stored past the failed one is deleted
/// again, so the repository is left without a hole followed by objects. The first failure is
/// the run's error.
#[allow(clippy::too_many_arguments)]
pub(super) async fn uploader_task(
    mut sealed: mpsc::Receiver<Sealed>,
    store: Arc<dyn Store>,
    durable: watch::Sender<Lsn>,
    concurrency: usize,
    failed: CancellationToken,
    stats: Arc<AttemptStats>,
    flow: Arc<Flow>,
    lease: Arc<Lease>,
) -> Result<u64, ArchiveError> {
    let mut prefix = DurablePrefix::new(*durable.borrow());
    // The newest commit time at or below each segment end still in flight: what the lag in
    // seconds becomes once the prefix reaches that end.
    let mut commits: std::collections::BTreeMap<Lsn, crate::lsn::PgTimestamp> =
        std::collections::BTreeMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, PutOutcome)>();
    // Cancelled at the first failure: puts waiting to retry stop trying.
    let abandon = CancellationToken::new();
    let mut stored = 0u64;
    let mut input_open = true;
    let mut first_error: Option<ArchiveError> = None;
    loop {
        let accepting = input_open && !prefix.has_failed();
        if !accepting && prefix.in_flight() == 0 {
            break;
        }
        tokio::select! {
            item = sealed.recv(), if accepting && prefix.in_flight() < concurrency => {
                let Some(seg) = item else { input_open = false; continue };
                let id = prefix.push(seg.end, seg.object.key().to_string());
                if let Some(t) = seg.last_commit {
                    commits.insert(seg.end, t);
                }
                if let Err(e) = lease.admit(seg.object.key()) {
                    prefix.failed(id);
                    failed.cancel();
                    abandon.cancel();
                    first_error.get_or_insert(e.into());
                    continue;
                }
                let store = store.clone();
                let lease = lease.clone();
                let done = done_tx.clone();
                let flow = flow.clone();
                let abandon = abandon.clone();
                tokio::spawn(async move {
                    let r = put_with_retry(&*store, &seg, &flow, &abandon, &lease).await;
                    // Releases the segment's share of the memory budget.
                    drop(seg);
                    let _ = done.send((id, r));
                });
            }
            Some((id, r)) = done_rx.recv() => match r {
                PutOutcome::Stored => {
                    stored += 1;
                    stats.segments.fetch_add(1, Ordering::SeqCst);
                    metrics::counter!(telemetry::SEGMENTS_STORED).increment(1);
                    if let Some(lsn) = prefix.stored(id) {
                        let rest = commits.split_off(&Lsn(lsn.0.saturating_add(1)));
                        if let Some(t) = std::mem::replace(&mut commits, rest).into_values().max() {
                            telemetry::stored_commit(t);
                        }
                        durable.send_replace(lsn);
                    }
                }
                PutOutcome::Abandoned => prefix.failed(id),
                PutOutcome::Failed(e) => {
                    prefix.failed(id);
                    failed.cancel();
                    abandon.cancel();
                    first_error.get_or_insert(e);
                }
            },
        }
    }
    let Some(e) = first_error else {
        return Ok(stored);
    };
    for key in prefix.stored_past_failure() {
        match store.delete(&key).await {
            Ok(()) => {
                warn!(object = %key, durable = %prefix.end(), "deleted a segment stored past the one that failed, so the archive has no hole")
            }
            Err(de) => {
                tracing::error!(object = %key, error = %de, "cannot delete a segment stored past the one that failed; the next run deletes it when it resumes")
            }
        }
    }
    Err(e)
}

/// How one segment's store ended.
enum PutOutcome {
    Stored,
    /// A failure retrying cannot fix.
    Failed(ArchiveError),
    /// Given up (between retries) because another segment failed.
    Abandoned,
}

/// The uploader's schedule: 200 ms doubling to 30 s, ±25 % jitter (so the puts of several
/// segments failing together spread out), as long as it takes.
fn put_policy() -> Policy {
    Policy::unlimited(
        Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
            .jitter(Jitter::Proportional(0.25)),
    )
}

/// Stores one segment, retrying retryable errors with backoff until it is stored, fails for
/// good, or `abandon` is cancelled. Every attempt puts the bytes encoded at seal time: a retry
/// after a lost answer is then an identical put, never a conflict (`crate::object`).
async fn put_with_retry(
    store: &dyn Store,
    seg: &Sealed,
    flow: &Flow,
    abandon: &CancellationToken,
    lease: &Lease,
) -> PutOutcome {
    /// Why an attempt failed: the store, the fence (the lease is no longer held), or the key
    /// the segment was sealed with is no longer in the keyring.
    enum Attempt {
        Store(StoreError),
        Fence(crate::lease::LeaseError),
        KeyRetired(String),
    }
    let codec = store.codec();
    let put = || async {
        lease.check().map_err(Attempt::Fence)?;
        // Sealed before a `keys add`, waiting (retrying) past the `rekey` and `keys retire`
        // that followed: stored now, no key would open it. Not stored, it is streamed and
        // sealed again with the current key when the run starts over.
        if let Some(id) = codec.missing_key(seg.object.bytes()) {
            return Err(Attempt::KeyRetired(id));
        }
        let attempt = Instant::now();
        seg.object.put(store).await.map_err(Attempt::Store)?;
        Ok(attempt.elapsed())
    };
    let retryable = |e: &Attempt| matches!(e, Attempt::Store(s) if s.is_retryable());
    let on_retry = |e: &Attempt, r: Retrying| {
        if let Attempt::Store(e) = e {
            metrics::counter!(telemetry::STORE_RETRIES).increment(1);
            warn!(segment = %seg.range, error = %e, waited = ?r.elapsed, "storing the segment failed; retrying");
        }
    };
    match retry(&put_policy(), abandon, retryable, on_retry, put).await {
        Ok(took) => {
            flow.observe_store(took);
            flow.unstored.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(telemetry::STORED_BYTES).increment(seg.object.len() as u64);
            PutOutcome::Stored
        }
        Err(RetryError::Cancelled(_)) => PutOutcome::Abandoned,
        Err(e) => PutOutcome::Failed(match e.into_inner() {
            Attempt::Store(source) => ArchiveError::Upload {
                range: seg.range.clone(),
                source,
            },
            Attempt::Fence(e) => e.into(),
            Attempt::KeyRetired(key_id) => ArchiveError::KeyRetired {
                range: seg.range.clone(),
                key_id,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseError;
    use crate::store::faulty::{Fault, FaultyStore, Op, Times};
    use crate::store::LocalStore;
    use bytes::Bytes;

    const START: u64 = 0x1000;

    /// Segment `i` of a run that resumed at `START`: 0x100 bytes of stream each.
    fn seg(i: u64) -> Sealed {
        let (start, end) = (Lsn(START + i * 0x100), Lsn(START + (i + 1) * 0x100));
        Sealed {
            range: format!("{start}-{end}"),
            end,
            object: crate::object::encode_with(
                &crate::object::Plain,
                crate::catalog::keys::segment(1, start, end),
                Bytes::from(format!("segment {i}")),
            ),
            last_commit: None,
            admitted: None,
        }
    }

    fn key(i: u64) -> String {
        seg(i).object.key().to_string()
    }

    /// Feeds `count` segments to the uploader; returns its result, the last durable LSN it
    /// published, and the keys left in the folder.
    async fn upload(
        dir: &std::path::Path,
        faulty: impl FnOnce(FaultyStore) -> FaultyStore,
        count: u64,
    ) -> (Result<u64, ArchiveError>, Lsn, Vec<String>) {
        upload_segments(dir, faulty, (0..count).map(seg).collect()).await
    }

    /// Feeds `segments` to the uploader, in order, under a held lease.
    async fn upload_segments(
        dir: &std::path::Path,
        faulty: impl FnOnce(FaultyStore) -> FaultyStore,
        segments: Vec<Sealed>,
    ) -> (Result<u64, ArchiveError>, Lsn, Vec<String>) {
        let wrap = |local| -> Arc<dyn Store> { Arc::new(faulty(FaultyStore::new(local))) };
        upload_segments_to(dir, wrap, segments).await
    }

    /// [`upload_segments`] into the folder `dir` as `wrap` makes it the uploader's store.
    async fn upload_segments_to(
        dir: &std::path::Path,
        wrap: impl FnOnce(Arc<dyn Store>) -> Arc<dyn Store>,
        segments: Vec<Sealed>,
    ) -> (Result<u64, ArchiveError>, Lsn, Vec<String>) {
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir));
        let store = wrap(local.clone());
        let (tx, rx) = mpsc::channel(4);
        let (durable_tx, durable_rx) = watch::channel(Lsn(START));
        let flow = Arc::new(Flow::new(4 << 20));
        let failed = CancellationToken::new();
        let stats = Arc::new(AttemptStats::default());
        let lease = Arc::new(Lease::new(
            local.clone(),
            Duration::from_secs(60),
            "tidemark",
        ));
        lease.acquire(true).await.unwrap();
        lease.begin_chain(1, Lsn(START));
        let task = tokio::spawn(uploader_task(
            rx,
            store,
            durable_tx,
            4,
            failed.clone(),
            stats,
            flow.clone(),
            lease,
        ));
        for s in segments {
            flow.unstored.fetch_add(1, Ordering::Relaxed);
            if tx.send(s).await.is_err() {
                break;
            }
        }
        drop(tx);
        let r = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the uploader finishes")
            .expect("the uploader does not panic");
        if r.is_err() {
            assert!(failed.is_cancelled(), "a failed upload stops the pipeline");
        }
        let keys = local
            .list("segments/")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        let durable = *durable_rx.borrow();
        (r, durable, keys)
    }

    #[tokio::test]
    async fn a_segment_whose_key_was_retired_before_it_was_stored_is_not_stored() {
        use crate::crypt::{Keyring, Sealed as SealedCodec};
        let keys = tempfile::tempdir().unwrap();
        let path = keys.path().join("keyring.json");
        let mut keyring = Keyring::generate();
        keyring.create(&path).unwrap();
        let old = keyring.current().id;
        let codec = Arc::new(SealedCodec::open(&path).unwrap());
        let sealed_with = |codec: &SealedCodec, i: u64| {
            let mut s = seg(i);
            s.object = crate::object::encode_with(codec, key(i), Bytes::from("rows"));
            s
        };
        // Segment 0 sealed under the old key; then keys add, and segment 1 under the new one.
        let first = sealed_with(&codec, 0);
        keyring.add();
        keyring.replace(&path).unwrap();
        let second = sealed_with(&codec, 1);
        // Then the old key is retired while both wait to be stored.
        keyring.remove(&old).unwrap();
        keyring.replace(&path).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let wrap = |local| crate::object::with_codec(local, codec.clone());
        let (r, durable, keys) = upload_segments_to(dir.path(), wrap, vec![first, second]).await;
        match &r {
            Err(e @ ArchiveError::KeyRetired { range, key_id }) => {
                assert_eq!((range, key_id), (&seg(0).range, &old.to_string()));
                assert!(e.is_transient(), "the run starts over and seals it again");
            }
            other => panic!("expected KeyRetired for segment 0, got {other:?}"),
        }
        assert_eq!(durable, Lsn(START));
        assert!(
            keys.is_empty(),
            "nothing stored past the refused one: {keys:?}"
        );
    }

    fn assert_failed_at(r: &Result<u64, ArchiveError>, i: u64) {
        match r {
            Err(ArchiveError::Upload { range, .. }) => assert_eq!(*range, seg(i).range),
            other => panic!("expected the upload of segment {i} to fail, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_retry_after_a_lost_answer_puts_the_bytes_sealed_once() {
        use crate::object::tests::{loses_first_answer, Nonced};
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::new(dir.path()));
        let store = loses_first_answer(local.clone());
        // Sealed with a codec whose every encoding differs (a random nonce).
        let codec = Nonced::default();
        let plain = Bytes::from_static(b"segment 0");
        let mut s = seg(0);
        s.object = crate::object::encode_with(&codec, key(0), plain.clone());
        let flow = Flow::new(4 << 20);
        flow.unstored.fetch_add(1, Ordering::Relaxed);
        let lease = Lease::new(local.clone(), Duration::from_secs(60), "tidemark");
        lease.acquire(true).await.unwrap();
        lease.begin_chain(1, Lsn(START));
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            put_with_retry(&store, &s, &flow, &CancellationToken::new(), &lease),
        )
        .await
        .expect("the retry comes within the first backoff");
        assert!(
            matches!(outcome, PutOutcome::Stored),
            "the first answer was lost; the retry must not conflict"
        );
        assert_eq!(
            crate::object::get_object_with(&*local, &codec, &key(0))
                .await
                .unwrap(),
            plain
        );
    }

    #[tokio::test]
    async fn all_stored_makes_everything_durable() {
        let dir = tempfile::tempdir().unwrap();
        // Completion order differs from seal order.
        let (r, durable, keys) = upload(
            dir.path(),
            |f| {
                f.delay_put(|k| {
                    if k == key(0) {
                        Duration::from_millis(100)
                    } else {
                        Duration::ZERO
                    }
                })
            },
            3,
        )
        .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(durable, seg(2).end);
        assert_eq!(keys, [key(0), key(1), key(2)]);
    }

    #[tokio::test]
    async fn a_later_segment_stored_before_a_failure_is_deleted_again() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 fails after a while; segment 2 is stored meanwhile.
        let (r, durable, keys) = upload(
            dir.path(),
            |f| {
                f.fail_put(|k| k == key(1)).delay_put(|k| {
                    if k == key(1) {
                        Duration::from_millis(300)
                    } else {
                        Duration::ZERO
                    }
                })
            },
            3,
        )
        .await;
        assert_failed_at(&r, 1);
        assert_eq!(
            durable,
            seg(0).end,
            "durable stops at the failed segment's start"
        );
        assert_eq!(keys, [key(0)], "no object past the failed segment");
    }

    #[tokio::test]
    async fn a_later_segment_stored_after_a_failure_neither_counts_nor_stays() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 fails at once; segments 0 and 2 are still uploading and then succeed.
        let (r, durable, keys) = upload(
            dir.path(),
            |f| {
                f.fail_put(|k| k == key(1)).delay_put(|k| {
                    if k == key(1) {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(300)
                    }
                })
            },
            3,
        )
        .await;
        assert_failed_at(&r, 1);
        assert_eq!(
            durable,
            seg(0).end,
            "durable never passes the failed segment"
        );
        assert_eq!(
            keys,
            [key(0)],
            "the segment before the failure stays, the one after goes"
        );
    }

    #[tokio::test]
    async fn a_later_segment_still_retrying_is_abandoned_at_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 2 would retry forever; segment 1 fails for good after a while.
        let (r, durable, keys) = upload(
            dir.path(),
            |f| {
                f.fail_put_retryable(|k| k == key(2))
                    .fail_put(|k| k == key(1))
                    .delay_put(|k| {
                        if k == key(1) {
                            Duration::from_millis(300)
                        } else {
                            Duration::ZERO
                        }
                    })
            },
            4,
        )
        .await;
        assert_failed_at(&r, 1);
        assert_eq!(durable, seg(0).end);
        assert_eq!(
            keys,
            [key(0)],
            "segment 3, stored past the failure, is deleted"
        );
    }

    #[tokio::test]
    async fn a_segment_that_does_not_start_at_the_chain_end_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 is missing: segment 2 would leave a hole after segment 0.
        let (r, durable, keys) =
            upload_segments(dir.path(), |f| f, vec![seg(0), seg(2), seg(3)]).await;
        match &r {
            Err(ArchiveError::Lease(LeaseError::NotContiguous { key, expected, .. })) => {
                assert_eq!(key, seg(2).object.key());
                assert_eq!(*expected, seg(0).end);
            }
            other => panic!("expected the fence to refuse segment 2, got {other:?}"),
        }
        assert_eq!(durable, seg(0).end);
        assert_eq!(keys, [key(0)], "nothing is stored past the refused segment");
    }

    #[tokio::test]
    async fn retryable_failures_are_retried_until_the_segment_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (r, durable, keys) = upload(
            dir.path(),
            |f| f.fail(Op::Put, Fault::Retryable, Times::N(2)),
            2,
        )
        .await;
        assert_eq!(r.unwrap(), 2);
        assert_eq!(durable, seg(1).end);
        assert_eq!(keys, [key(0), key(1)]);
    }

    #[tokio::test]
    async fn a_full_disk_fails_the_upload_without_retrying() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let (r, durable, keys) = upload(
            dir.path(),
            |f| f.fail(Op::Put, Fault::DiskFull, Times::Always),
            1,
        )
        .await;
        assert_failed_at(&r, 0);
        match r {
            Err(ArchiveError::Upload { source, .. }) => assert!(
                matches!(&source, crate::store::StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull),
                "{source}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_millis(150), "no backoff");
        assert_eq!(durable, Lsn(START));
        assert!(keys.is_empty());
    }

    #[test]
    fn the_put_schedule_is_200_ms_doubling_to_30_s_with_a_quarter_of_jitter_unbounded() {
        let p = put_policy();
        assert!(p.max_attempts.is_none() && p.max_elapsed.is_none());
        let mut b = p.backoff;
        let ms = Duration::from_millis;
        let first = b.next_delay();
        assert!((ms(150)..=ms(250)).contains(&first), "{first:?}");
        let second = b.next_delay();
        assert!((ms(300)..=ms(500)).contains(&second), "{second:?}");
        for _ in 0..20 {
            b.next_delay();
        }
        let capped = b.next_delay();
        assert!((ms(22_500)..=ms(37_500)).contains(&capped), "{capped:?}");
    }
}
