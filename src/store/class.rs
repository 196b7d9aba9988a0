//! Storage classes: where an S3 object lives (`STANDARD`, `STANDARD_IA`, `GLACIER`, …), whether
//! it can be read as it is, and the thaw (`RestoreObject`) a cold one needs first. Pure: the
//! values, their parsing and the `x-amz-restore` header; the S3 store does the requests.
//!
//! Cold means *not readable without a thaw*: `GLACIER` (Flexible Retrieval) and `DEEP_ARCHIVE`.
//! `GLACIER_IR` (Instant Retrieval) and the infrequent-access classes are cheaper to keep and
//! dearer to read, but a `GetObject` answers at once, so they are not cold.

use std::fmt;

use serde::Serialize;

/// An S3 storage class.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StorageClass {
    Standard,
    StandardIa,
    OnezoneIa,
    IntelligentTiering,
    GlacierIr,
    Glacier,
    DeepArchive,
    /// A class this version does not know (read from a listing; never written).
    Other(String),
}

/// The classes `--s3-storage-class` accepts: new objects must stay readable at once (the
/// archiver reads its lease and identity, `list` and `prune` read manifests).
pub const WRITE_CLASSES: [StorageClass; 5] = [
    StorageClass::Standard,
    StorageClass::StandardIa,
    StorageClass::OnezoneIa,
    StorageClass::IntelligentTiering,
    StorageClass::GlacierIr,
];

/// The classes `--archive-storage-class` accepts.
pub const ARCHIVE_CLASSES: [StorageClass; 4] = [
    StorageClass::Glacier,
    StorageClass::DeepArchive,
    StorageClass::GlacierIr,
    StorageClass::StandardIa,
];

impl StorageClass {
    /// The name S3 uses (`x-amz-storage-class`).
    pub fn as_str(&self) -> &str {
        match self {
            StorageClass::Standard => "STANDARD",
            StorageClass::StandardIa => "STANDARD_IA",
            StorageClass::OnezoneIa => "ONEZONE_IA",
            StorageClass::IntelligentTiering => "INTELLIGENT_TIERING",
            StorageClass::GlacierIr => "GLACIER_IR",
            StorageClass::Glacier => "GLACIER",
            StorageClass::DeepArchive => "DEEP_ARCHIVE",
            StorageClass::Other(s) => s,
        }
    }

    /// The class S3 names `name` (any case); an unknown name is [`StorageClass::Other`].
    pub fn from_name(name: &str) -> StorageClass {
        let known = [
            StorageClass::Standard,
            StorageClass::StandardIa,
            StorageClass::OnezoneIa,
            StorageClass::IntelligentTiering,
            StorageClass::GlacierIr,
            StorageClass::Glacier,
            StorageClass::DeepArchive,
        ];
        known
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(name))
            .unwrap_or_else(|| StorageClass::Other(name.to_string()))
    }

    /// Whether a `GetObject` needs a thaw (`RestoreObject`) first.
    pub fn is_cold(&self) -> bool {
        matches!(self, StorageClass::Glacier | StorageClass::DeepArchive)
    }

    /// Parses the value of `flag`, one of `allowed`.
    fn parse_among(flag: &str, value: &str, allowed: &[StorageClass]) -> Result<Self, String> {
        let c = StorageClass::from_name(value.trim());
        if allowed.contains(&c) {
            return Ok(c);
        }
        let names: Vec<&str> = allowed.iter().map(|c| c.as_str()).collect();
        let why = if c.is_cold() {
            " (a cold class is not readable without a thaw: it is for archives, --archive-storage-class)"
        } else {
            ""
        };
        Err(format!(
            "{flag} {value:?}: use one of {}{why}",
            names.join(", ")
        ))
    }

    /// Parses `--s3-storage-class`.
    pub fn parse_write(value: &str) -> Result<Self, String> {
        StorageClass::parse_among("--s3-storage-class", value, &WRITE_CLASSES)
    }

    /// Parses `--archive-storage-class`.
    pub fn parse_archive(value: &str) -> Result<Self, String> {
        StorageClass::parse_among("--archive-storage-class", value, &ARCHIVE_CLASSES)
    }
}

impl fmt::Display for StorageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StorageClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How fast (and how dear) a thaw is: S3's `GlacierJobParameters.Tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ThawTier {
    /// Minutes (GLACIER only; not available for DEEP_ARCHIVE).
    Expedited,
    /// Hours (3–5 for GLACIER, up to 12 for DEEP_ARCHIVE).
    Standard,
    /// The cheapest: 5–12 hours for GLACIER, up to 48 for DEEP_ARCHIVE.
    Bulk,
}

impl ThawTier {
    pub fn as_str(self) -> &'static str {
        match self {
            ThawTier::Expedited => "expedited",
            ThawTier::Standard => "standard",
            ThawTier::Bulk => "bulk",
        }
    }
}

/// Where a thaw of a cold object stands (`x-amz-restore`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Thaw {
    /// None asked for (or the thawed copy expired).
    None,
    /// Asked for, not done yet.
    Ongoing,
    /// A readable copy exists (until the header's expiry date).
    Done,
}

impl Thaw {
    /// Reads the `x-amz-restore` header (`ongoing-request="true"`, or `ongoing-request="false",
    /// expiry-date="…"`); absent, `Thaw::None`.
    pub fn from_header(value: Option<&str>) -> Thaw {
        let Some(v) = value else {
            return Thaw::None;
        };
        let v = v.to_ascii_lowercase().replace(' ', "");
        if v.contains("ongoing-request=\"true\"") {
            Thaw::Ongoing
        } else if v.contains("ongoing-request=\"false\"") {
            Thaw::Done
        } else {
            Thaw::None
        }
    }
}

/// An object's storage class and the state of its thaw, as a `HeadObject` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Residence {
    pub class: StorageClass,
    pub thaw: Thaw,
}

impl Residence {
    /// In the standard class: what a store without classes says of every object.
    pub fn standard() -> Residence {
        Residence {
            class: StorageClass::Standard,
            thaw: Thaw::None,
        }
    }

    /// Whether a `GetObject` answers now.
    pub fn readable(&self) -> bool {
        !self.class.is_cold() || self.thaw == Thaw::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for c in WRITE_CLASSES.iter().chain(&ARCHIVE_CLASSES) {
            assert_eq!(&StorageClass::from_name(c.as_str()), c);
            assert_eq!(&StorageClass::from_name(&c.as_str().to_lowercase()), c);
        }
        assert_eq!(
            StorageClass::from_name("EXPRESS_ONEZONE"),
            StorageClass::Other("EXPRESS_ONEZONE".into())
        );
        assert!(StorageClass::Glacier.is_cold() && StorageClass::DeepArchive.is_cold());
        assert!(!StorageClass::GlacierIr.is_cold() && !StorageClass::StandardIa.is_cold());
    }

    #[test]
    fn the_flags_accept_their_classes_and_name_the_others() {
        assert_eq!(
            StorageClass::parse_write("standard_ia").unwrap(),
            StorageClass::StandardIa
        );
        let e = StorageClass::parse_write("GLACIER").unwrap_err();
        assert!(
            e.contains("--s3-storage-class") && e.contains("--archive-storage-class"),
            "{e}"
        );
        assert_eq!(
            StorageClass::parse_archive("DEEP_ARCHIVE").unwrap(),
            StorageClass::DeepArchive
        );
        let e = StorageClass::parse_archive("STANDARD").unwrap_err();
        assert!(
            e.contains("GLACIER, DEEP_ARCHIVE, GLACIER_IR, STANDARD_IA"),
            "{e}"
        );
        assert!(StorageClass::parse_archive("COLDER").is_err());
    }

    #[test]
    fn the_restore_header_says_where_a_thaw_stands() {
        assert_eq!(Thaw::from_header(None), Thaw::None);
        assert_eq!(
            Thaw::from_header(Some("ongoing-request=\"true\"")),
            Thaw::Ongoing
        );
        assert_eq!(
            Thaw::from_header(Some(
                "ongoing-request=\"false\", expiry-date=\"Fri, 21 Dec 2012 00:00:00 GMT\""
            )),
            Thaw::Done
        );
        let cold = |thaw| Residence {
            class: StorageClass::Glacier,
            thaw,
        };
        assert!(!cold(Thaw::None).readable() && !cold(Thaw::Ongoing).readable());
        assert!(cold(Thaw::Done).readable() && Residence::standard().readable());
    }
}
