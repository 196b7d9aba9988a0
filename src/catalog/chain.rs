//! Segment chains: the segments of a listing grouped into generations, and their continuity.
//!
//! A repository holds one or more *generations*: a generation is an unbroken chain of segments
//! that starts at a base backup's stream position. A lost or recreated slot starts a new
//! generation (with a new base backup); progress of two generations is never mixed.
//!
//! Owns: [`SegmentRef`] (a segment as its name describes it), the grouping of a listing into
//! chains (the highest revision of a segment wins), and the archiver's continuity checks
//! ([`check_chain`], [`chain_holes`]). Does not own the windows a restore can reach (see
//! [`super::windows`]: a hole ends a window there, it is not an error).
//!
//! Invariant checked here: within a generation, each segment starts exactly where the previous
//! one ended. A gap or an overlap is an error naming both segments, never skipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::keys;
use super::RepoError;
use crate::lsn::Lsn;
use crate::store::Store;

/// Prefix of all segment objects.
pub const SEGMENTS_PREFIX: &str = keys::SEGMENTS;

/// A segment as its object name describes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct SegmentRef {
    pub generation: u32,
    pub start: Lsn,
    pub end: Lsn,
    pub key: String,
    pub size: u64,
}

impl SegmentRef {
    /// `0/16B3748-0/16C0000`, for messages.
    pub fn range(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }
}

/// Lists every segment of the repository, grouped by generation, each chain sorted by LSN.
pub async fn list_segments(
    store: &Arc<dyn Store>,
) -> Result<BTreeMap<u32, Vec<SegmentRef>>, RepoError> {
    let objects = store.list(SEGMENTS_PREFIX).await?;
    Ok(group_segments(objects.into_iter().map(|o| (o.key, o.size))))
}

/// Groups segment object names by generation; names that are not segments are ignored. Of
/// several revisions of one segment (same generation and range), the highest is used and the
/// others are ignored (`proto/layout.md`, "Revisions").
pub fn group_segments(
    objects: impl IntoIterator<Item = (String, u64)>,
) -> BTreeMap<u32, Vec<SegmentRef>> {
    let mut newest: BTreeMap<(u32, Lsn, Lsn), (keys::Revision, String, u64)> = BTreeMap::new();
    for (key, size) in objects {
        let Some(k) = keys::parse_segment(&key) else {
            continue;
        };
        let slot = (k.generation, k.start, k.end);
        if newest.get(&slot).is_none_or(|(r, _, _)| k.revision > *r) {
            newest.insert(slot, (k.revision, key, size));
        }
    }
    let mut out: BTreeMap<u32, Vec<SegmentRef>> = BTreeMap::new();
    // Sorted by (generation, start, end): each chain comes out sorted.
    for ((generation, start, end), (_, key, size)) in newest {
        out.entry(generation).or_default().push(SegmentRef {
            generation,
            start,
            end,
            key,
            size,
        });
    }
    out
}

/// Checks the continuity of one generation's chain and returns its end, if any.
pub fn check_chain(chain: &[SegmentRef]) -> Result<Option<Lsn>, RepoError> {
    for w in chain.windows(2) {
        let (prev, next) = (&w[0], &w[1]);
        if next.start != prev.end {
            return Err(RepoError::Broken {
                generation: prev.generation,
                prev: prev.range(),
                prev_end: prev.end,
                next: next.range(),
                next_start: next.start,
                kind: if next.start > prev.end {
                    "gap"
                } else {
                    "overlap"
                },
            });
        }
    }
    Ok(chain.last().map(|s| s.end))
}

/// A hole in one generation's chain: no segment covers `from..to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hole {
    pub generation: u32,
    /// The end of the segment before the hole.
    pub from: Lsn,
    /// The start of the segment after it.
    pub to: Lsn,
    /// The index, in the chain, of the segment after the hole.
    pub next: usize,
}

impl Hole {
    /// `0/16B3748-0/16C0000`, for messages.
    pub fn range(&self) -> String {
        format!("{}-{}", self.from, self.to)
    }
}

/// The holes of one generation's chain (sorted by LSN), in LSN order. Unlike [`check_chain`] a
/// hole is not an error here; an overlap still is (two writers).
pub fn chain_holes(chain: &[SegmentRef]) -> Result<Vec<Hole>, RepoError> {
    let mut holes = Vec::new();
    for (i, w) in chain.windows(2).enumerate() {
        let (prev, next) = (&w[0], &w[1]);
        if next.start > prev.end {
            holes.push(Hole {
                generation: prev.generation,
                from: prev.end,
                to: next.start,
                next: i + 1,
            });
        } else if next.start < prev.end {
            return Err(RepoError::Broken {
                generation: prev.generation,
                prev: prev.range(),
                prev_end: prev.end,
                next: next.range(),
                next_start: next.start,
                kind: "overlap",
            });
        }
    }
    Ok(holes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(g: u32, s: u64, e: u64) -> (String, u64) {
        (keys::segment(g, Lsn(s), Lsn(e)), 10)
    }

    #[test]
    fn the_highest_revision_of_a_segment_wins() {
        let rev = |g, s, e, r, size| (keys::segment_revision(g, Lsn(s), Lsn(e), r), size);
        // Listed in any order: a rewrite (r2, r3) replaces the original, whatever sorts first.
        let groups = group_segments([
            rev(1, 0x200, 0x300, 3, 33),
            seg(1, 0x100, 0x200),
            rev(1, 0x200, 0x300, 1, 11),
            rev(1, 0x100, 0x200, 2, 22),
            rev(1, 0x200, 0x300, 2, 22),
            rev(2, 0x200, 0x300, 1, 44),
        ]);
        let chain: Vec<(String, u64)> =
            groups[&1].iter().map(|s| (s.key.clone(), s.size)).collect();
        assert_eq!(
            chain,
            [rev(1, 0x100, 0x200, 2, 22), rev(1, 0x200, 0x300, 3, 33)]
        );
        assert_eq!(check_chain(&groups[&1]).unwrap(), Some(Lsn(0x300)));
        assert_eq!(groups[&2].len(), 1, "generations do not mix revisions");
        assert_eq!(groups[&2][0].size, 44);
    }

    #[test]
    fn chains_group_by_generation_and_check_continuity() {
        let groups = group_segments([
            seg(1, 0x200, 0x300),
            seg(1, 0x100, 0x200),
            seg(2, 0x900, 0xA00),
            ("basebackups/x".into(), 1),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(check_chain(&groups[&1]).unwrap(), Some(Lsn(0x300)));
        let groups = group_segments([seg(1, 0x100, 0x200), seg(1, 0x250, 0x300)]);
        let err = check_chain(&groups[&1]).unwrap_err().to_string();
        assert!(
            err.contains("gap") && err.contains("0/200") && err.contains("0/250"),
            "{err}"
        );
        let groups = group_segments([seg(1, 0x100, 0x200), seg(1, 0x150, 0x300)]);
        assert!(check_chain(&groups[&1])
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        assert_eq!(check_chain(&[]).unwrap(), None);
    }

    #[test]
    fn chain_holes_lists_gaps_and_refuses_overlaps() {
        let groups = group_segments([
            seg(1, 0x100, 0x200),
            seg(1, 0x200, 0x300),
            seg(1, 0x380, 0x400),
            seg(1, 0x500, 0x600),
        ]);
        let holes = chain_holes(&groups[&1]).unwrap();
        assert_eq!(
            holes,
            [
                Hole {
                    generation: 1,
                    from: Lsn(0x300),
                    to: Lsn(0x380),
                    next: 2
                },
                Hole {
                    generation: 1,
                    from: Lsn(0x400),
                    to: Lsn(0x500),
                    next: 3
                },
            ]
        );
        assert_eq!(holes[0].range(), "0/300-0/380");
        let whole = group_segments([seg(1, 0x100, 0x200), seg(1, 0x200, 0x300)]);
        assert!(chain_holes(&whole[&1]).unwrap().is_empty());
        assert!(chain_holes(&[]).unwrap().is_empty());
        let overlap = group_segments([seg(1, 0x100, 0x200), seg(1, 0x150, 0x300)]);
        let err = chain_holes(&overlap[&1]).unwrap_err().to_string();
        assert!(err.contains("overlap") && err.contains("0/150"), "{err}");
    }
}
