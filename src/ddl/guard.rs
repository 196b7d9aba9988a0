//! The schema guard: a Relation message whose columns (names, types) differ from what was last
//! known of that relation, with no `tidemark.ddl` message since, is a schema change that was
//! not captured ([`UnexplainedSchemaChange`]). The archiver stops on it; a restore refuses to
//! replay past it.

use std::collections::HashMap;

use tracing::warn;

use crate::pgoutput::{self, Message};
use crate::statement::RelationInfo;

use super::message::{decode_message, TidemarkMessage, DDL_PREFIX};
use super::replay::plan_replay;

/// A table's columns changed in the stream with no captured DDL to explain it.
#[derive(Debug, thiserror::Error)]
#[error("the columns of table {table} changed from ({before}) to ({after}) at {lsn} without a captured schema change: DDL capture (tidemark's event trigger) is not installed or was bypassed, so the archive cannot be restored past this change\nHINT: install DDL capture (run `tidemark setup` as a superuser), then take a new base backup (`tidemark backup`) so that restores after this change start from a backup that has it; restores to earlier instants are unaffected")]
pub struct UnexplainedSchemaChange {
    pub table: String,
    pub before: String,
    pub after: String,
    pub lsn: String,
}

impl crate::error::Classify for UnexplainedSchemaChange {
    fn exit_status(&self) -> crate::error::ExitStatus {
        crate::error::ExitStatus::Database
    }
}

impl UnexplainedSchemaChange {
    /// The same fact, worded for a restore.
    pub fn restore_detail(&self) -> String {
        format!(
            "the columns of table {} changed from ({}) to ({}) with no captured schema change in the archive (DDL capture was not installed on the source): replay cannot go past it\nHINT: restore to an instant before this transaction; for later instants, restore from a base backup taken after the change",
            self.table, self.before, self.after
        )
    }
}

#[derive(Clone, Debug)]
struct Known {
    /// (name, type OID; 0 when unknown).
    columns: Vec<(String, u32)>,
    /// [`SchemaGuard::ddl_seen`] when these columns were recorded.
    epoch: u64,
}

/// Checks that every change of a relation's columns is explained by a captured DDL message.
#[derive(Debug, Default)]
pub struct SchemaGuard {
    known: HashMap<u32, Known>,
    ddl_seen: u64,
}

fn columns_text(cols: &[(String, u32)]) -> String {
    cols.iter()
        .map(|c| c.0.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SchemaGuard {
    pub fn new() -> SchemaGuard {
        SchemaGuard::default()
    }

    /// Seeds what is known of a relation (column names; types 0 when unknown).
    pub fn know(&mut self, rel: &RelationInfo) {
        self.known.insert(
            rel.oid,
            Known {
                columns: rel
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_oid))
                    .collect(),
                epoch: self.ddl_seen,
            },
        );
    }

    /// Notes a captured DDL message.
    pub fn ddl(&mut self) {
        self.ddl_seen += 1;
    }

    /// A Relation message: an error if its columns differ from what was known with no DDL
    /// message since. `check: false` ignores it (a restore's messages from before its base
    /// backup's point: the backup's columns are authoritative).
    pub fn relation(
        &mut self,
        rel: &RelationInfo,
        check: bool,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        if !check {
            return Ok(());
        }
        let columns: Vec<(String, u32)> = rel
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        if let Some(k) = self.known.get(&rel.oid) {
            let same = k.columns.len() == columns.len()
                && k.columns
                    .iter()
                    .zip(&columns)
                    .all(|(a, b)| a.0 == b.0 && (a.1 == 0 || b.1 == 0 || a.1 == b.1));
            if !same && k.epoch == self.ddl_seen {
                return Err(UnexplainedSchemaChange {
                    table: rel.qualified_name(),
                    before: columns_text(&k.columns),
                    after: columns_text(&columns),
                    lsn: lsn.to_string(),
                });
            }
        }
        self.known.insert(
            rel.oid,
            Known {
                columns,
                epoch: self.ddl_seen,
            },
        );
        Ok(())
    }

    /// The archiver's check of one raw record of the stream (any pgoutput message outside a
    /// streamed chunk).
    pub fn observe(
        &mut self,
        payload: &bytes::Bytes,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        match payload.first() {
            Some(b'R') | Some(b'M') => {}
            _ => return Ok(()),
        }
        let Ok(msg) = pgoutput::decode(payload, false) else {
            return Ok(()); // the writer reports undecodable records itself
        };
        self.observe_message(&msg, lsn)
    }

    /// [`Self::observe`] for a decoded message (one of a streamed chunk is decoded `in_stream`).
    pub fn observe_message(
        &mut self,
        msg: &Message,
        lsn: &str,
    ) -> Result<(), UnexplainedSchemaChange> {
        match msg {
            Message::Message {
                prefix, content, ..
            } if prefix == DDL_PREFIX => {
                self.ddl();
                if let Ok(Some(TidemarkMessage::Ddl(m))) = decode_message(prefix, content) {
                    if let Err(e) = plan_replay(&m) {
                        warn!(%lsn, "a captured schema change will stop restores past it: {e}");
                    }
                }
                Ok(())
            }
            Message::Relation { .. } => match RelationInfo::from_message(msg) {
                Some(rel) => self.relation(&rel, true, lsn),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_accepts_explained_changes_only() {
        let rel = |cols: &[(&str, u32)]| RelationInfo {
            oid: 42,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            partitioned: false,
            columns: cols
                .iter()
                .map(|(n, t)| crate::statement::ColumnInfo {
                    name: n.to_string(),
                    type_oid: *t,
                    is_key: false,
                })
                .collect(),
        };
        let mut g = SchemaGuard::new();
        g.relation(&rel(&[("a", 23)]), true, "0/1").unwrap();
        // Sent again unchanged (any relcache invalidation does that): fine.
        g.relation(&rel(&[("a", 23)]), true, "0/2").unwrap();
        g.ddl();
        g.relation(&rel(&[("a", 20), ("b", 25)]), true, "0/3")
            .unwrap();
        let e = g
            .relation(&rel(&[("a", 20)]), true, "0/4")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"public\".\"t\"") && e.contains("(a, b) to (a)") && e.contains("HINT"),
            "{e}"
        );
        // Unknown types (a base backup's manifest) compare by name.
        let mut g = SchemaGuard::new();
        g.know(&rel(&[("a", 0)]));
        g.relation(&rel(&[("a", 23)]), true, "0/5").unwrap();
    }
}
