//! The durable prefix: how far the archive may be acknowledged while segments upload in parallel.
//!
//! Owns the bookkeeping of sealed segments between their seal and their store, in seal order.
//! Does no I/O: the uploader marks each segment stored or failed and publishes
//! [`DurablePrefix::end`](crate::archive::durable::DurablePrefix::end).
//!
//! Invariant protected here: the prefix end is the end of the longest run of segments, in seal
//! order from the start, that are all stored. It never passes a segment that failed (or was
//! abandoned): once one has, it stops there for good, and every segment stored after it is
//! reported by
//! [`DurablePrefix::stored_past_failure`](crate::archive::durable::DurablePrefix::stored_past_failure)
//! so that the uploader removes it again —
//! the repository never holds an object past a hole that the archiver made.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// What became of one sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    InFlight,
    Stored,
    /// Will not be stored by this run (a permanent failure, or abandoned after one).
    Failed,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    end: Lsn,
    key: String,
    state: State,
}

/// Sealed segments not yet counted in the durable prefix, in seal order.
#[derive(Debug)]
pub(super) struct DurablePrefix {
    /// Front: the first segment past the prefix end.
    entries: VecDeque<Entry>,
    next_id: u64,
    end: Lsn,
}

impl DurablePrefix {
    /// An empty prefix that ends at `start` (where the stream resumed).
    pub(super) fn new(start: Lsn) -> DurablePrefix {
        DurablePrefix {
            entries: VecDeque::new(),
            next_id: 0,
            end: start,
        }
    }

    /// Records a segment sealed after every one recorded before; returns its id.
    pub(super) fn push(&mut self, end: Lsn, key: String) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back(Entry {
            id,
            end,
            key,
            state: State::InFlight,
        });
        id
    }

    /// Marks a segment stored; returns the new prefix end when the prefix grew.
    pub(super) fn stored(&mut self, id: u64) -> Option<Lsn> {
        self.mark(id, State::Stored);
        let before = self.end;
        while self
            .entries
            .front()
            .is_some_and(|e| e.state == State::Stored)
        {
            let e = self.entries.pop_front().expect("front exists");
            self.end = e.end;
        }
        (self.end != before).then_some(self.end)
    }

    /// Marks a segment as one this run will not store: the prefix never passes it.
    pub(super) fn failed(&mut self, id: u64) {
        self.mark(id, State::Failed);
    }

    fn mark(&mut self, id: u64, state: State) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            debug_assert_eq!(e.state, State::InFlight, "segment {id} marked twice");
            e.state = state;
        }
    }

    /// The end of the longest stored prefix: the only position that may be acknowledged.
    pub(super) fn end(&self) -> Lsn {
        self.end
    }

    /// Whether some segment failed (no new segment should be started).
    pub(super) fn has_failed(&self) -> bool {
        self.entries.iter().any(|e| e.state == State::Failed)
    }

    /// Segments whose store has not finished.
    pub(super) fn in_flight(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.state == State::InFlight)
            .count()
    }

    /// Keys of the segments stored past the first failed one, in seal order: objects beyond a
    /// hole, which must not stay in the repository.
    pub(super) fn stored_past_failure(&self) -> Vec<String> {
        self.entries
            .iter()
            .skip_while(|e| e.state != State::Failed)
            .filter(|e| e.state == State::Stored)
            .map(|e| e.key.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix_of(ends: &[u64]) -> (DurablePrefix, Vec<u64>) {
        let mut p = DurablePrefix::new(Lsn(0x100));
        let ids = ends
            .iter()
            .map(|&e| p.push(Lsn(e), format!("k{e:X}")))
            .collect();
        (p, ids)
    }

    #[test]
    fn the_prefix_grows_in_seal_order_whatever_the_completion_order() {
        let (mut p, ids) = prefix_of(&[0x200, 0x300, 0x400]);
        assert_eq!(p.end(), Lsn(0x100));
        assert_eq!(p.in_flight(), 3);
        // The third stores first: nothing is durable yet.
        assert_eq!(p.stored(ids[2]), None);
        assert_eq!(p.end(), Lsn(0x100));
        assert_eq!(p.stored(ids[0]), Some(Lsn(0x200)));
        // The second closes the gap: the prefix jumps over the third.
        assert_eq!(p.stored(ids[1]), Some(Lsn(0x400)));
        assert_eq!(p.in_flight(), 0);
        assert!(!p.has_failed());
        assert!(p.stored_past_failure().is_empty());
    }

    #[test]
    fn the_prefix_never_passes_a_failed_segment() {
        let (mut p, ids) = prefix_of(&[0x200, 0x300, 0x400, 0x500]);
        // Stored before the failure is known, then the failure, then one stored after it.
        assert_eq!(p.stored(ids[2]), None);
        p.failed(ids[1]);
        assert!(p.has_failed());
        assert_eq!(p.stored(ids[3]), None);
        // The segment before the failure still counts.
        assert_eq!(p.stored(ids[0]), Some(Lsn(0x200)));
        assert_eq!(
            p.end(),
            Lsn(0x200),
            "the prefix stops at the failed segment's start"
        );
        assert_eq!(p.in_flight(), 0);
        assert_eq!(p.stored_past_failure(), ["k400", "k500"]);
    }

    #[test]
    fn everything_past_the_earliest_failure_is_reported_but_not_failed_ones() {
        let (mut p, ids) = prefix_of(&[0x200, 0x300, 0x400]);
        p.failed(ids[2]);
        p.stored(ids[1]);
        // An earlier segment fails later: the one stored between becomes past the hole too.
        p.failed(ids[0]);
        assert_eq!(p.end(), Lsn(0x100));
        assert_eq!(p.stored_past_failure(), ["k300"]);
    }
}
