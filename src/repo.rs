//! The repository's identity and segment chains under their former path: both now live in the
//! catalog ([`crate::catalog::identity`], [`crate::catalog::chain`], [`crate::catalog::RepoError`]),
//! so that the catalog depends on nothing above it and on nothing that depends on it.
//!
//! Nothing in the crate uses this path; it is kept for code outside the crate written against it
//! (the integration tests), and goes once that code names the catalog's modules.

pub use crate::catalog::chain::{
    chain_holes, check_chain, group_segments, list_segments, Hole, SegmentRef, SEGMENTS_PREFIX,
};
pub use crate::catalog::identity::{
    check_identity, parse_identity, read_identity, write_identity, Identity,
    IDENTITY_FORMAT_VERSION, IDENTITY_KEY,
};
pub use crate::catalog::RepoError;
