//! Choosing entries of a custom-format dump's table of contents (`pg_restore -l`), to restore a
//! subset with `pg_restore -L`.
//!
//! A TOC line reads `<dump id>; <catalog oid> <object oid> <type> <schema> <tag> <owner>`; the
//! type may contain spaces (`FK CONSTRAINT`, `INDEX ATTACH`) and so may the names (which are not
//! quoted), so entries are matched by `(catalog oid, object oid)`, which is exact. Lines starting
//! with `;` are comments; `pg_restore -L` restores the uncommented entries in file order.
//!
//! What pg_dump 15 emits in the post-data section, and where each goes:
//!
//! | TOC type (catalog)            | content                                        | phase    |
//! |-------------------------------|------------------------------------------------|----------|
//! | `CONSTRAINT` (2606)           | `ADD CONSTRAINT … PRIMARY KEY / UNIQUE / EXCLUDE` (+ `REPLICA IDENTITY USING INDEX`, `CLUSTER ON` of its index) | Keys if a PK/UNIQUE key object, else PostData |
//! | `INDEX` (1259)                | `CREATE INDEX` (+ `REPLICA IDENTITY USING INDEX`, `CLUSTER ON`) | Keys if the replica-identity index, else PostData |
//! | `INDEX ATTACH` (0)            | `ALTER INDEX parent ATTACH PARTITION child`    | PostData |
//! | `FK CONSTRAINT` (2606)        | `ADD CONSTRAINT … FOREIGN KEY`                  | PostData |
//! | `TRIGGER` (2620), `RULE` (2618), `POLICY` (3256), `ROW SECURITY` (0), `STATISTICS` (3381), `COMMENT` on post-data objects (0), `EVENT TRIGGER`, `PUBLICATION` (excluded at dump time) | | PostData |
//!
//! `REPLICA IDENTITY FULL / NOTHING` is part of the `TABLE` entry (pre-data).

use std::collections::HashSet;

/// OID of `pg_class` (indexes' catalog in the TOC).
pub const PG_CLASS: u32 = 1259;
/// OID of `pg_constraint`.
pub const PG_CONSTRAINT: u32 = 2606;

/// One parsed TOC line.
#[derive(Debug, PartialEq, Eq)]
pub struct TocEntry<'a> {
    pub dump_id: u32,
    pub catalog_oid: u32,
    pub oid: u32,
    /// `<type> <schema> <tag> <owner>` as printed (ambiguous when names contain spaces).
    pub description: &'a str,
}

/// Parses an entry line; `None` for comments, blank lines and anything else.
pub fn parse_line(line: &str) -> Option<TocEntry<'_>> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.starts_with(';') {
        return None;
    }
    let (id, rest) = line.split_once(';')?;
    let dump_id = id.trim().parse().ok()?;
    let mut it = rest.trim_start().splitn(3, ' ');
    let catalog_oid = it.next()?.parse().ok()?;
    let oid = it.next()?.parse().ok()?;
    let description = it.next()?;
    Some(TocEntry {
        dump_id,
        catalog_oid,
        oid,
        description,
    })
}

/// The result of splitting a TOC in two.
#[derive(Debug)]
pub struct Split {
    /// A list restoring only the chosen entries.
    pub chosen: String,
    /// A list restoring every entry but the chosen ones.
    pub rest: String,
    /// The chosen `(catalog oid, object oid)` pairs that were found.
    pub found: HashSet<(u32, u32)>,
}

/// Splits a `pg_restore -l` listing into the entries whose `(catalog oid, object oid)` is in
/// `wanted` and the others. Comment lines are kept in both lists.
pub fn split(listing: &str, wanted: &HashSet<(u32, u32)>) -> Split {
    let mut chosen = String::with_capacity(listing.len());
    let mut rest = String::with_capacity(listing.len());
    let mut found = HashSet::new();
    for line in listing.lines() {
        match parse_line(line) {
            Some(e) if e.oid != 0 && wanted.contains(&(e.catalog_oid, e.oid)) => {
                found.insert((e.catalog_oid, e.oid));
                chosen.push_str(line);
                rest.push(';');
                rest.push_str(line);
            }
            Some(_) => {
                chosen.push(';');
                chosen.push_str(line);
                rest.push_str(line);
            }
            None => {
                chosen.push_str(line);
                rest.push_str(line);
            }
        }
        chosen.push('\n');
        rest.push('\n');
    }
    Split {
        chosen,
        rest,
        found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Post-data part of `pg_restore -l` of a pg_dump 15 schema-only dump.
    const LISTING: &str = "\
;
; Archive created at 2024-01-01 00:00:00 UTC
;     dbname: toc
;
; Selected TOC Entries:
;
215; 1259 16386 TABLE public a postgres
3228; 2604 16389 DEFAULT public a id postgres
3231; 2606 16394 CONSTRAINT public a a_pkey postgres
3233; 2606 16396 CONSTRAINT public a a_u_key postgres
3245; 2606 16436 CONSTRAINT public ex ex_r_excl postgres
3243; 2606 16421 CONSTRAINT public p1 p1_pkey postgres
3252; 2606 16459 CONSTRAINT public we ird p k postgres
3234; 1259 16411 INDEX public a_v_idx postgres
3407; 0 0 COMMENT public INDEX a_v_idx postgres
3235; 1259 16410 INDEX public b_id_idx postgres
3248; 0 0 INDEX ATTACH public p1_pkey postgres
3251; 2620 16428 TRIGGER public a t postgres
3250; 2606 16405 FK CONSTRAINT public b b_aid_fkey postgres
3397; 0 16386 ROW SECURITY public a postgres
";

    fn entries(list: &str) -> Vec<u32> {
        list.lines()
            .filter_map(parse_line)
            .map(|e| e.dump_id)
            .collect()
    }

    #[test]
    fn parses_lines_with_spaces_in_types_and_names() {
        let e = parse_line("3252; 2606 16459 CONSTRAINT public we ird p k postgres").unwrap();
        assert_eq!(
            e,
            TocEntry {
                dump_id: 3252,
                catalog_oid: 2606,
                oid: 16459,
                description: "CONSTRAINT public we ird p k postgres"
            }
        );
        let e = parse_line("3248; 0 0 INDEX ATTACH public p1_pkey postgres").unwrap();
        assert_eq!((e.catalog_oid, e.oid), (0, 0));
        assert_eq!(
            parse_line(";3231; 2606 16394 CONSTRAINT public a a_pkey x"),
            None
        );
        assert_eq!(parse_line(";"), None);
        assert_eq!(parse_line(""), None);
    }

    #[test]
    fn splits_keys_from_the_rest() {
        let wanted: HashSet<(u32, u32)> = [
            (PG_CONSTRAINT, 16394),
            (PG_CONSTRAINT, 16396),
            (PG_CONSTRAINT, 16421),
            (PG_CONSTRAINT, 16459),
            (PG_CLASS, 16410),
            (PG_CLASS, 99999), // not in the dump
        ]
        .into_iter()
        .collect();
        let s = split(LISTING, &wanted);
        assert_eq!(entries(&s.chosen), [3231, 3233, 3243, 3252, 3235]);
        assert_eq!(
            entries(&s.rest),
            [215, 3228, 3245, 3234, 3407, 3248, 3251, 3250, 3397]
        );
        assert_eq!(s.found.len(), 5);
        assert!(!s.found.contains(&(PG_CLASS, 99999)));
        // An INDEX entry and a CONSTRAINT entry with the same object oid are different objects.
        let only_index: HashSet<_> = [(PG_CLASS, 16394)].into_iter().collect();
        assert!(entries(&split(LISTING, &only_index).chosen).is_empty());
        // Comments survive, and every line appears in both lists.
        assert!(s.chosen.starts_with(";\n; Archive created"));
        assert_eq!(s.chosen.lines().count(), LISTING.lines().count());
        assert_eq!(s.rest.lines().count(), LISTING.lines().count());
    }
}
