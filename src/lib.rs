//! tidemark: continuous archiving and point-in-time recovery for PostgreSQL over logical replication.
//!
//! ```text
//! Postgres ──pgoutput──▶ replication ──records──▶ archive (segment writer) ──sealed segments──▶ store
//!    ▲                                                                                      │
//!    └──────────── standby status update: flush LSN = highest LSN durably stored ◀──────────┘
//!
//! backup:  temporary slot + exported snapshot ──COPY──▶ store (basebackups/<id>/…, manifest last)
//! restore: plan (pick base backup, segments, stop point) ──▶ apply (schema, COPY, replay, sequences, indexes)
//! ```
//!
//! Module map (one concept each): [`lsn`] positions and timestamps, [`conninfo`] connection
//! strings, [`replication`] the replication-protocol client, [`pgoutput`] the pure decoder,
//! [`segment`] the archive's file format, [`store`] where objects live,
//! [`archive`] the continuous archiver, [`backup`] base backups, [`restore`] point-in-time restore.

pub mod archive;
pub mod backup;
pub mod backup_cmd;
pub mod conninfo;
pub mod demo;
pub mod exit;
pub mod list;
pub mod lsn;
pub mod pgbin;
pub mod pgoutput;
pub mod replication;
pub mod repo;
pub mod restore;
pub mod scratch;
pub mod segment;
pub mod setup;
pub mod source;
pub mod statement;
pub mod store;
