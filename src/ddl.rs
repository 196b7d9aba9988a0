//! Schema changes and sequence values carried by the archive, as transactional logical messages.
//!
//! Logical decoding carries row changes only. tidemark adds two kinds of `pg_logical_emit_message`
//! records to the stream, so they are archived in commit order like any change (their exact
//! format is specified in `proto/messages.md`):
//!
//! * `tidemark.ddl`: emitted by an event trigger that `setup` installs (and `archive`, when it is
//!   missing and the role may), once per top-level client query that changed the schema. It holds
//!   the query text (`current_query()`), the first command tag, and the schemas of the
//!   `search_path` in effect. Replay runs the query's schema statements at that point of the
//!   stream ([`plan_replay`]), before any row change that depends on them.
//! * `tidemark.sequences`: emitted by the archiver with its heartbeat ([`emit_changed_sequences`]):
//!   the sequences whose value changed since the last emission. Replay applies `setval` at that
//!   point and once more after the restore's own sequence step, so that a restored sequence is
//!   never behind its value at the target instant by more than one heartbeat interval, and is
//!   always past every value of the columns it feeds.
//!
//! And one check, [`SchemaGuard`]: a Relation message whose columns (names, types) differ from
//! what was last known of that relation, with no `tidemark.ddl` message since, means the schema
//! changed without being captured. The archiver stops with [`UnexplainedSchemaChange`] (the
//! archive could not be restored past that point) and the restore refuses to go past it.
//!
//! Decisions:
//! * The trigger emits **once per top-level query**: the key `statement_timestamp()` +
//!   `current_query()` is remembered in a custom setting, so a multi-statement query string with
//!   several DDL statements gives one message, and the DML of that string is never replayed
//!   twice: replay runs only its schema statements (pgoutput already carries the rows).
//! * Replay splits the query with a small lexer aware of quotes, dollar quotes, comments and
//!   `BEGIN ATOMIC … END` bodies ([`split_statements`]) and classifies each statement
//!   ([`classify`]): CREATE / ALTER / DROP / COMMENT / REFRESH / IMPORT run; `SET` runs as
//!   `SET LOCAL`; GRANT / REVOKE / `OWNER TO` / SECURITY LABEL are skipped (the base backup is
//!   restored with `--no-owner --no-privileges`); temporary objects, global objects (roles,
//!   databases, tablespaces), publications, subscriptions and event triggers are skipped; DML,
//!   queries, COPY, CALL, DO, transaction control and maintenance are skipped. `CREATE TABLE … AS`
//!   is run `WITH NO DATA` (its rows are in the stream); `CONCURRENTLY` is removed (replay runs
//!   inside a transaction).
//! * Temporary objects: the trigger ignores commands whose objects are all temporary.
//! * Names resolve as on the source: replay sets `search_path` (transaction-local) to the schemas
//!   of the source's path (`current_schemas(false)`, so `"$user"` is already resolved).
//! * The trigger has no exception block: a subtransaction would let PostgreSQL decode the message
//!   *after* the next change of the parent transaction (it queues a message at its record's end
//!   LSN, which ties with the next record's start); a trailing `tidemark.ddl_end` message takes
//!   that tie when the DDL itself runs in a SAVEPOINT.
//! * A restore whose segments hold DDL loads every post-data object of the base backup before
//!   replay ([`segments_have_ddl`]), so replayed DDL finds what it names; event triggers
//!   (tidemark's own among them) are left out for a target role that is not a superuser
//!   (`backup`'s `post_data_for_target`).
//! * The archiver's guard knows a table from its first Relation message in the run (a change
//!   made while it was stopped is not seen); the restore's guard knows every table from the base
//!   backup.
//!
//! Not handled (documented in `proto/messages.md`): DDL run inside a function, procedure or DO
//! block called by a non-DDL statement (replay finds no schema statement in `SELECT f()` and
//! stops with an error naming the query); `SELECT … INTO new_table`; a query string whose DDL
//! statements are separated by DML on the same table (all of its DDL runs at the first one's
//! position); objects tidemark itself creates after a base backup (schema `tidemark`); the
//! values a column added with a computed default (`now()`, a serial…) gives existing rows (not in
//! the stream: replay computes its own, with a warning).
//!
//! The code is split along these jobs: `message` (the two message formats and their decoding,
//! shared by both sides), `capture` (what runs on the source: the event triggers that emit
//! `tidemark.ddl`, and the archiver's `tidemark.sequences` emission), `lex` (the SQL lexer and
//! statement splitter), `replay` (what a restore runs for each message: statement
//! classification and rewriting, the replay plan, `setval`), `guard` (the [`SchemaGuard`]) and
//! `protect` (the event trigger that keeps the publications tidemark archives through from
//! being dropped or altered under it). Each depends only on the ones before it.

mod capture;
mod guard;
mod lex;
mod message;
mod protect;
mod replay;

pub(crate) use capture::event_trigger_exists;
pub use capture::{
    emit_changed_sequences, ensure_capture, ensure_capture_logged, Capture, CAPTURE_FUNCTIONS_SQL,
    CAPTURE_TRIGGERS_SQL, DROP_TRIGGER, END_TRIGGER,
};
pub use guard::{SchemaGuard, UnexplainedSchemaChange};
pub use lex::split_statements;
pub use message::{
    decode_message, DdlMessage, MessageError, SequenceValue, SequencesMessage, TidemarkMessage,
    DDL_PREFIX, MESSAGE_VERSION, SEQUENCES_PREFIX,
};
pub use protect::{ensure_protected, guard_install_sql, GUARD_DROP_TRIGGER, GUARD_END_TRIGGER};
pub use replay::{
    classify, fills_rows_with_computed_values, plan_replay, segments_have_ddl, setval_sql, Action,
    ReplayDdlError,
};
