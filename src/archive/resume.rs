//! Where a run extends the current generation's chain, when the chain has holes.
//!
//! Pure: reads a chain and the slot's confirmed position, decides; the caller logs and deletes.
//!
//! The slot is acknowledged only up to the durable prefix (see `durable.rs`), so a hole that
//! starts at or beyond the slot's confirmed position was never acknowledged: the segments past
//! it are leftovers of a failed upload (the slot sends those changes again) and are deleted,
//! and the run resumes at the end of the contiguous prefix. A hole below the confirmed position
//! is real damage (a segment removed after it was stored): it is reported, and the run extends
//! the chain from its last segment, so that archiving goes on. An overlap (two writers) is an
//! error.

use crate::catalog::chain::{self, Hole, SegmentRef};
use crate::catalog::RepoError;
use crate::lsn::Lsn;

/// What resuming on a chain does.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ChainPlan<'a> {
    /// Holes below the confirmed position: changes that were archived and are gone.
    pub(super) damage: Vec<Hole>,
    /// The hole, at or beyond the confirmed position, that the orphans follow.
    pub(super) orphan_hole: Option<Hole>,
    /// Segments past `orphan_hole`: never acknowledged, to be deleted.
    pub(super) orphans: &'a [SegmentRef],
    /// The end of the chain once the orphans are gone (None: an empty chain).
    pub(super) end: Option<Lsn>,
}

/// Plans the resume on `chain` (one generation, sorted) for a slot confirmed at `confirmed`.
pub(super) fn plan_chain(chain: &[SegmentRef], confirmed: Lsn) -> Result<ChainPlan<'_>, RepoError> {
    let holes = chain::chain_holes(chain)?;
    let (damage, orphan_hole) = match holes.iter().position(|h| h.from >= confirmed) {
        Some(i) => (holes[..i].to_vec(), Some(holes[i].clone())),
        None => (holes, None),
    };
    let kept = orphan_hole.as_ref().map_or(chain.len(), |h| h.next);
    Ok(ChainPlan {
        damage,
        orphan_hole,
        orphans: &chain[kept..],
        end: chain[..kept].last().map(|s| s.end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(ranges: &[(u64, u64)]) -> Vec<SegmentRef> {
        let names = ranges
            .iter()
            .map(|&(s, e)| (crate::catalog::keys::segment(1, Lsn(s), Lsn(e)), 10));
        chain::group_segments(names).remove(&1).unwrap_or_default()
    }

    #[test]
    fn a_whole_chain_resumes_at_its_end() {
        let c = chain(&[(0x100, 0x200), (0x200, 0x300)]);
        let p = plan_chain(&c, Lsn(0x300)).unwrap();
        assert!(p.damage.is_empty() && p.orphans.is_empty() && p.orphan_hole.is_none());
        assert_eq!(p.end, Some(Lsn(0x300)));
        assert_eq!(plan_chain(&[], Lsn(0x300)).unwrap().end, None);
    }

    #[test]
    fn segments_past_an_unacknowledged_hole_are_orphans() {
        // The upload of 0x300-0x400 failed; 0x400-0x500 and 0x500-0x600 were stored.
        let c = chain(&[
            (0x100, 0x200),
            (0x200, 0x300),
            (0x400, 0x500),
            (0x500, 0x600),
        ]);
        for confirmed in [0x200, 0x300] {
            let p = plan_chain(&c, Lsn(confirmed)).unwrap();
            assert!(p.damage.is_empty());
            assert_eq!(p.orphan_hole.as_ref().unwrap().range(), "0/300-0/400");
            assert_eq!(p.orphans, &c[2..]);
            assert_eq!(
                p.end,
                Some(Lsn(0x300)),
                "resumes at the contiguous prefix's end"
            );
        }
    }

    #[test]
    fn a_hole_below_the_confirmed_position_is_damage_and_the_chain_goes_on() {
        // 0x200-0x300 was stored, acknowledged, then deleted by hand.
        let c = chain(&[(0x100, 0x200), (0x300, 0x400), (0x400, 0x500)]);
        let p = plan_chain(&c, Lsn(0x500)).unwrap();
        assert_eq!(p.damage.len(), 1);
        assert_eq!(p.damage[0].range(), "0/200-0/300");
        assert!(p.orphans.is_empty());
        assert_eq!(p.end, Some(Lsn(0x500)));
        // Confirmed inside the hole: that position was acknowledged, so it is damage as well.
        let p = plan_chain(&c, Lsn(0x250)).unwrap();
        assert_eq!(p.damage.len(), 1);
        assert_eq!(p.end, Some(Lsn(0x500)));
    }

    #[test]
    fn damage_below_and_orphans_above_are_told_apart() {
        let c = chain(&[(0x100, 0x200), (0x300, 0x400), (0x500, 0x600)]);
        let p = plan_chain(&c, Lsn(0x400)).unwrap();
        assert_eq!(p.damage.len(), 1);
        assert_eq!(p.damage[0].range(), "0/200-0/300");
        assert_eq!(p.orphans, &c[2..]);
        assert_eq!(p.end, Some(Lsn(0x400)));
    }

    #[test]
    fn an_overlap_stays_an_error() {
        let c = chain(&[(0x100, 0x200), (0x180, 0x300)]);
        let err = plan_chain(&c, Lsn(0x100)).unwrap_err().to_string();
        assert!(err.contains("overlap"), "{err}");
    }
}
