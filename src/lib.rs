//! tidemark: continuous archiving and point-in-time recovery for PostgreSQL over logical replication.
//!
//! ```text
//! Postgres ──pgoutput──▶ replication ──records──▶ archive (segment writer) ──sealed segments──▶ store
//!    ▲                                                                                      │
//!    └──────────── standby status update: flush LSN = highest LSN durably stored ◀──────────┘
//!
//! backup:  temporary slot + exported snapshot ──COPY──▶ store (basebackups/<id>/…, manifest last)
//! restore: plan (a path over the catalog: base backup → incrementals → segments → stop point)
//!          ──▶ apply (schema, COPY, replay, sequences, indexes)
//! ```
//!
//! Module map (one concept each):
//! * values and formats: [`lsn`] positions and timestamps, [`pgoutput`] the pure decoder,
//!   [`statement`] rendering row changes as SQL, [`segment`] the archive's file format;
//! * the outside world: [`conninfo`] connection strings, [`tls`] TLS to PostgreSQL (libpq's
//!   `sslmode`, one rustls configuration), [`replication`] the replication-protocol
//!   client, [`source`] preflight checks on the source, [`pgbin`] PostgreSQL's client programs,
//!   [`store`] where objects live (with [`store::class`] S3's storage classes and thaws),
//!   [`catalog`] the repository's content: one listing turned into generations and their
//!   restorable windows (used by `list` and restore's planner; damage removes only the instants
//!   that need it), with [`catalog::keys`] every object key and its parser (with the revision of
//!   a rewritten object), [`catalog::identity`] the repository's identity (`archive.json`),
//!   [`catalog::chain`] segment chains and their continuity, [`catalog::manifest`] the base
//!   backups' manifests and their reading, [`catalog::tiering`] which retained backups' parts
//!   move to the archive storage class, and [`catalog::audit`] the audit trail's records;
//!   [`object`] the one way objects are written and read (encoded once, above every retry),
//!   [`crypt`] the encryption envelope and the keyring (the encrypting codec);
//! * the work: [`archive`] the continuous archiver, [`lease`] the repository's create-only
//!   lease records (the archiver's writer lease and fence, the base-backup lock's records),
//!   [`backup`] base backups (taking one in
//!   `backup/take.rs`, loading one in `backup/load.rs`; both write or read the catalog's manifest),
//!   [`changelog`] segments read into committed transactions in commit order (reassembly,
//!   aborts, dedup, the one stop rule), [`restore`] point-in-time restore (plan, then apply, its
//!   replay a sink of the changelog reader), [`ddl`] schema changes and sequence
//!   values carried in the stream as logical messages (capture, replay, the schema guard);
//! * commands: [`setup`] (with [`grants`], the least privilege it prints), [`backup_cmd`],
//!   [`list`], [`verify`] (every object read and checked, and every window `list` shows proved),
//!   [`status`] (health, retention breaches, sizes by tier), [`prune`], [`rekey`] (key
//!   rotation's header sidecars and the retire check),
//!   [`audit_cmd`] (the audit trail's recording and `tidemark audit`), [`demo`] (with
//!   [`scratch`], a throwaway cluster), [`exit`] (the command line's values and errors) and
//!   [`cli`] (what every command shares: boolean environment variables, help, a closed stdout);
//! * shared by all: [`error`] the one error classification (every module error's exit code,
//!   checked variant by variant), [`retry`] the one backoff and retry loop (with jitter and
//!   cancellation), [`sql`] the one quoting of identifiers and literals, and [`session`] the
//!   one list of settings that decide how values read as text.
//!
//! Layers and dependency rule: a module uses modules of its own layer or of layers below it,
//! never above. (`cargo doc` and `grep -o 'crate::[a-z_]*'` show the edges.)
//!
//! | layer | modules | may use |
//! |---|---|---|
//! | 1. pure core (no I/O but the host's and the OS user's names) | `error`, `host`, `retry`, `lsn`, `sql`, `session`, `pgoutput`, `statement`, `segment`, `changelog` | layer 1 |
//! | 2. the outside world | `conninfo`, `tls`, `replication`, `source`, `pgbin`, `store`, `object`, `crypt`, `catalog`, `ddl` | layers 1–2 |
//! | 3. the work | `lease`, `backup`, `archive`, `restore` | layers 1–3 |
//! | 4. commands and the edge | `setup`, `grants`, `backup_cmd`, `list`, `verify`, `status`, `prune`, `rekey`, `audit_cmd`, `demo`, `scratch`, `exit`, `cli`, `telemetry`, `logging` | everything |
//!
//! Known exceptions, to be removed: `archive` and `lease` (layer 3) record their metrics under the names
//! `telemetry` (layer 4) owns (the metric names belong below the work, or `telemetry`'s server
//! apart from them); the unit tests of `segment` (layer 1) name segments with
//! [`catalog::keys`] (tests only: the format itself does not know object names). `exit` is the
//! only module that knows every error type: the exit-code ladder lives at the edge, so `error`
//! (the `Classify` trait) depends on nothing.
//!
//! Where the next features go: retention is a pure selection over a [`catalog::Catalog`]
//! (`catalog/retention.rs`) applied by [`prune`]; incremental backups are listed by the catalog
//! as [`catalog::IncrementalRef`]s (a type with no values yet) and fill the empty step of
//! [`restore::Plan`]'s path; the encryption envelope is an
//! [`object::Codec`] (applied once per object, above the retries); compaction and GDPR erasure
//! read with the [`changelog`] reader and write rewritten objects under a new revision of their
//! [`catalog::keys`] name; a `drill` stores its result under `drills/` (`proto/status.md`),
//! where [`status`] already reads it.

pub mod archive;
pub mod audit_cmd;
pub mod backup;
pub mod backup_cmd;
pub mod catalog;
pub mod changelog;
pub mod cli;
pub mod conninfo;
pub mod crypt;
pub mod ddl;
pub mod demo;
pub mod error;
pub mod exit;
pub mod grants;
pub mod host;
pub mod lease;
pub mod list;
pub mod logging;
pub mod lsn;
pub mod object;
pub mod pgbin;
pub mod pgoutput;
pub mod prune;
pub mod rekey;
pub mod replication;
pub mod restore;
pub mod retry;
pub mod scratch;
pub mod segment;
pub mod session;
pub mod setup;
pub mod source;
pub mod sql;
pub mod statement;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;
