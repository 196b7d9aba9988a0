//! Restore's replay: the [`changelog`] reader's sink that applies the transactions it hands
//! out to the target as SQL (prepared statements, batching and pipelining, group commit).
//!
//! It owns how a transaction is written to the target, never which transactions are written
//! or in which order (the reader's). The invariant it protects: a target transaction's
//! boundaries are source commit boundaries, and every UPDATE and DELETE touched exactly one
//! row.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;

use super::RestoreError;
use crate::backup::Manifest;
use crate::changelog;
use crate::lsn::{Lsn, PgTimestamp};
use crate::pgoutput::{self, Message};
use crate::statement::{self, RelationInfo};

/// Applies the transactions the changelog reader hands out to the target.
///
/// Speed (replay must run many times faster than the source committed) comes from three
/// things, none of which changes what is applied or in which order:
/// * Prepared statements: each row change is a statement with `$n` placeholders (see
///   [`statement::Prepared`]), prepared once per shape (`PREPARE tidemark_N AS …`) and run as
///   `EXECUTE tidemark_N('v1', NULL, …)`, so the server parses and plans it once, not once per
///   row. Runs of inserts into one table are folded into multi-row INSERTs of a few fixed
///   sizes.
/// * Batching and pipelining: statements go as one simple query of about [`BATCH_BYTES`] (the
///   server answers them without a round trip each), and the next batch is rendered while the
///   target runs the previous one. Results come back in order, so a failure still names the
///   source transaction of the statement that failed.
/// * Group commit: up to [`GROUP_TXNS`] consecutive source transactions are applied as one
///   target transaction. This is safe because the group's boundaries are source commit
///   boundaries and nothing else runs on the target meanwhile: the statements run in the
///   source's commit order, so each one sees exactly the state the source had at that point,
///   and the state at the group's commit is the state after its last source transaction,
///   which satisfied every constraint on the source (a deferred constraint is checked on that
///   state). A restore to a target instant stops before the first transaction past it and
///   commits the group so far: the group never holds a transaction past the target. A group
///   ends after a transaction that ran DDL.
pub(super) struct Replayer<'a> {
    client: &'a tokio_postgres::Client,
    relations: HashMap<u32, RelationInfo>,
    /// Rendered operations not yet sent, in order.
    queue: Vec<(Op, Stmt)>,
    queue_bytes: usize,
    /// The run of inserts being folded into a multi-row INSERT.
    run: Option<InsertRun>,
    /// Statements written for the target, not yet sent (one simple query).
    batch: String,
    /// One entry per statement in `batch`, to check each one's result.
    statements: Vec<Stmt>,
    /// Sent batches whose results are not read yet, oldest first.
    in_flight: VecDeque<(InFlight<'a>, Vec<Stmt>)>,
    /// Prepared statements (`tidemark_N`) by text.
    prepared: HashMap<String, u64>,
    next_prepared: u64,
    /// The INSERT prefix of each relation (see [`statement::insert_prefix`]), by source OID.
    insert_prefixes: HashMap<u32, Option<Arc<str>>>,
    /// A target transaction is open (BEGIN queued or sent).
    group_open: bool,
    /// Source transactions in the open group.
    group_txns: usize,
    /// The open group ends with the current source transaction.
    group_break: bool,
    /// The source transaction being replayed (commit LSN and time), between `begin` and
    /// `commit`.
    txn: Option<(Lsn, PgTimestamp)>,
    pub(super) applied: u64,
    pub(super) last_commit: Option<(Lsn, PgTimestamp)>,
    /// Checks that every change of a table's columns is explained by a replayed DDL message.
    guard: crate::ddl::SchemaGuard,
}

/// An operation for the target.
enum Op {
    /// A statement over the simple-query protocol (BEGIN, COMMIT, TRUNCATE, setval…).
    Simple(String),
    /// A row change, executed with a prepared statement.
    Prepared(statement::Prepared),
}

/// The results of a batch sent to the target: the rows of each statement that completed,
/// then an error if one failed.
type InFlight<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = (Vec<u64>, Result<(), tokio_postgres::Error>)> + Send + 'a,
    >,
>;

/// Consecutive inserts into one relation with the same columns (one source transaction).
struct InsertRun {
    relid: u32,
    prefix: Arc<str>,
    ncols: usize,
    /// The parameters of the rows not yet emitted, row after row.
    params: Vec<Option<Bytes>>,
    rows: usize,
    bytes: usize,
    stmt: Stmt,
}

/// Rendered operations are sent once they hold this many bytes of parameters.
const BATCH_BYTES: usize = 1 << 20;
/// Most batches sent and not yet answered.
const IN_FLIGHT_BATCHES: usize = 2;
/// Most source transactions applied as one target transaction.
const GROUP_TXNS: usize = 32;
/// Most rows of one multi-row INSERT (a power of two; fewer for wide tables: PostgreSQL takes
/// at most 65535 parameters).
const INSERT_ROWS: usize = 64;
/// Prepared statements kept (all are dropped when more are needed).
const MAX_PREPARED: usize = 2000;

impl<'a> Replayer<'a> {
    pub(super) async fn new(
        client: &'a tokio_postgres::Client,
        manifest: &Manifest,
    ) -> Result<Replayer<'a>, RestoreError> {
        client
            .batch_execute(&crate::session::set_statements(&[(
                "synchronous_commit",
                "off",
            )]))
            .await
            .map_err(|source| RestoreError::TargetQuery {
                what: "setting the replay session".into(),
                source,
            })?;
        // Replay reproduces the source's effects; the target's triggers and FK checks must not
        // fire again. Needs superuser; without it, triggers fire (logged).
        if let Err(e) = client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::warn!(error = %e, "cannot set session_replication_role = replica: triggers on the target will fire during replay");
        }
        let relations = relations_at_backup(client, manifest).await?;
        let mut guard = crate::ddl::SchemaGuard::new();
        for rel in relations.values() {
            guard.know(rel);
        }
        Ok(Replayer {
            client,
            relations,
            queue: Vec::new(),
            queue_bytes: 0,
            run: None,
            batch: String::new(),
            statements: Vec::new(),
            in_flight: VecDeque::new(),
            prepared: HashMap::new(),
            next_prepared: 0,
            insert_prefixes: HashMap::new(),
            group_open: false,
            group_txns: 0,
            group_break: false,
            txn: None,
            applied: 0,
            last_commit: None,
            guard,
        })
    }

    /// A logical message of the replayed transaction: tidemark's DDL runs at this point of
    /// the transaction, recorded sequence values are set here (then raised past the columns'
    /// values after replay); others (heartbeats, applications' own) change nothing.
    async fn logical(&mut self, msg: Message) -> Result<(), RestoreError> {
        let Message::Message {
            prefix, content, ..
        } = msg
        else {
            return Ok(());
        };
        let Some((commit, _)) = self.txn else {
            return Ok(());
        };
        let decoded = match crate::ddl::decode_message(&prefix, &content) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.replay_err(&e.to_string())),
        };
        if let crate::ddl::TidemarkMessage::Ddl(_) = decoded {
            self.guard.ddl();
        }
        let statements: Vec<String> = match decoded {
            crate::ddl::TidemarkMessage::Ddl(d) => {
                let statements =
                    crate::ddl::plan_replay(&d).map_err(|e| self.replay_err(&e.to_string()))?;
                // Run on their own (inside the open transaction) so a failure names the
                // statement; the group ends with this transaction, and statements prepared
                // before are dropped (they may name what the DDL changed).
                self.pump().await?;
                let stmt = self.stmt(b'X', None);
                self.deallocate_all(&stmt);
                self.drain().await?;
                self.insert_prefixes.clear();
                self.group_break = true;
                for sql in &statements {
                    if let Err(e) = self.client.simple_query(sql).await {
                        return Err(self.replay_err(&format!(
                            "the schema change {sql:?} failed on the target: {}\nHINT: the target may lack something the source had (an extension, a role, a tablespace…): provide it and restore again, or restore to an instant before this transaction",
                            crate::error::chain(&e)
                        )));
                    }
                }
                return Ok(());
            }
            crate::ddl::TidemarkMessage::Sequences(s) => {
                crate::ddl::setval_sql(&s.sequences).into_iter().collect()
            }
        };
        let commit_time = self.txn.map(|t| t.1).unwrap_or_default();
        for sql in statements {
            self.push_op(
                Op::Simple(sql),
                Stmt {
                    kind: b'M',
                    rel: None,
                    commit,
                    commit_time,
                },
            );
        }
        Ok(())
    }

    /// Opens a target transaction for the current source transaction, unless the group's is
    /// open.
    fn open_group(&mut self) {
        if self.group_open {
            return;
        }
        self.group_open = true;
        let stmt = self.stmt(b'B', None);
        self.push_op(Op::Simple("BEGIN".into()), stmt);
    }

    /// Ends the replayed source transaction (outside `self.txn`): ends the group when it is
    /// full or must end here, and sends what is rendered.
    async fn end_txn(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.close_run();
        self.applied += 1;
        self.last_commit = Some((commit_lsn, commit_time));
        self.group_txns += 1;
        if self.group_break || self.group_txns >= GROUP_TXNS {
            self.end_group(commit_lsn, commit_time);
        }
        self.pump().await
    }

    /// Queues the COMMIT of the open target transaction.
    fn end_group(&mut self, commit: Lsn, commit_time: PgTimestamp) {
        if !self.group_open {
            return;
        }
        self.push_op(
            Op::Simple("COMMIT".into()),
            Stmt {
                kind: b'C',
                rel: None,
                commit,
                commit_time,
            },
        );
        self.group_open = false;
        self.group_txns = 0;
        self.group_break = false;
    }

    fn stmt(&self, kind: u8, rel: Option<String>) -> Stmt {
        Stmt {
            kind,
            rel,
            commit: self.txn.map(|t| t.0).unwrap_or_default(),
            commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
        }
    }

    fn rel(&self, relid: u32) -> Result<&RelationInfo, RestoreError> {
        self.relations.get(&relid).ok_or_else(|| {
            self.replay_err(&format!(
                "a change to relation {relid}, which the archive never described"
            ))
        })
    }

    /// Queues an operation (after the run of inserts, which it ends).
    fn push_op(&mut self, op: Op, stmt: Stmt) {
        self.close_run();
        self.queue_op(op, stmt);
    }

    fn queue_op(&mut self, op: Op, stmt: Stmt) {
        self.queue_bytes += op_bytes(&op);
        self.queue.push((op, stmt));
    }

    /// Renders one change.
    fn render(&mut self, msg: Message) -> Result<(), RestoreError> {
        match &msg {
            Message::Insert { relid, new, .. } => self.insert(*relid, new),
            Message::Update {
                relid, old, new, ..
            } => {
                let rel = self.rel(*relid)?;
                let p = statement::prepare_update(rel, old.as_ref(), new)
                    .map_err(|e| self.replay_err(&e.to_string()))?;
                if let Some(p) = p {
                    let stmt = self.stmt(b'U', Some(rel.qualified_name()));
                    self.push_op(Op::Prepared(p), stmt);
                }
                Ok(())
            }
            Message::Delete { relid, old, .. } => {
                let rel = self.rel(*relid)?;
                let p = statement::prepare_delete(rel, old)
                    .map_err(|e| self.replay_err(&e.to_string()))?;
                let stmt = self.stmt(b'D', Some(rel.qualified_name()));
                self.push_op(Op::Prepared(p), stmt);
                Ok(())
            }
            Message::Truncate {
                options, relids, ..
            } => {
                let rels: Result<Vec<&RelationInfo>, _> =
                    relids.iter().map(|r| self.rel(*r)).collect();
                let mut sql = String::new();
                statement::render_truncate(&rels?, *options, &mut sql);
                if !sql.is_empty() {
                    let stmt = self.stmt(b'T', None);
                    self.push_op(Op::Simple(sql), stmt);
                }
                Ok(())
            }
            // Type, Origin and logical messages (heartbeats) change no rows.
            _ => Ok(()),
        }
    }

    /// An insert: added to the run of inserts into the same relation (a multi-row INSERT).
    fn insert(&mut self, relid: u32, new: &pgoutput::TupleData) -> Result<(), RestoreError> {
        let rel = self.rel(relid)?;
        let p = statement::prepare_insert_params(rel, new)
            .map_err(|e| self.replay_err(&e.to_string()))?;
        let prefix = match self.insert_prefixes.get(&relid) {
            Some(p) => p.clone(),
            None => {
                let p: Option<Arc<str>> = statement::insert_prefix(rel).map(Arc::from);
                self.insert_prefixes.insert(relid, p.clone());
                p
            }
        };
        let Some(prefix) = prefix else {
            // No columns: `INSERT … DEFAULT VALUES`, one per row.
            let rel = self.rel(relid)?;
            let p =
                statement::prepare_insert(rel, new).map_err(|e| self.replay_err(&e.to_string()))?;
            let stmt = self.stmt(b'I', None);
            self.push_op(Op::Prepared(p), stmt);
            return Ok(());
        };
        if self
            .run
            .as_ref()
            .is_some_and(|r| r.relid != relid || r.prefix != prefix)
        {
            self.close_run();
        }
        let ncols = p.len();
        let bytes: usize = p
            .iter()
            .map(|v| v.as_ref().map_or(0, |b| b.len()) + 4)
            .sum();
        let max_rows = max_insert_rows(ncols);
        if self.run.is_none() {
            self.run = Some(InsertRun {
                relid,
                prefix,
                ncols,
                params: Vec::with_capacity(ncols * max_rows),
                rows: 0,
                bytes: 0,
                stmt: self.stmt(b'I', None),
            });
        }
        let run = self.run.as_mut().expect("just set");
        run.params.extend(p);
        run.rows += 1;
        run.bytes += bytes;
        if run.rows >= max_rows {
            self.close_run();
        }
        Ok(())
    }

    /// Queues the run of inserts as multi-row INSERTs of power-of-two sizes (few shapes to
    /// prepare).
    fn close_run(&mut self) {
        let Some(mut run) = self.run.take() else {
            return;
        };
        let mut params = std::mem::take(&mut run.params).into_iter();
        let mut left = run.rows;
        while left > 0 {
            let rows = 1usize << (usize::BITS - 1 - left.leading_zeros());
            let mut sql = String::with_capacity(run.prefix.len() + rows * run.ncols * 5);
            sql.push_str(&run.prefix);
            let mut n = 0;
            for r in 0..rows {
                sql.push_str(if r == 0 { "(" } else { ",(" });
                for c in 0..run.ncols {
                    if c > 0 {
                        sql.push(',');
                    }
                    n += 1;
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                sql.push(')');
            }
            let op = Op::Prepared(statement::Prepared {
                sql,
                params: params.by_ref().take(rows * run.ncols).collect(),
            });
            let stmt = Stmt {
                kind: b'I',
                rel: None,
                commit: run.stmt.commit,
                commit_time: run.stmt.commit_time,
            };
            self.queue_op(op, stmt);
            left -= rows;
        }
    }

    fn replay_err(&self, detail: &str) -> RestoreError {
        RestoreError::Replay {
            commit_lsn: self.txn.map(|t| t.0).unwrap_or_default(),
            commit_time: self.txn.map(|t| t.1).unwrap_or_default(),
            detail: detail.to_string(),
        }
    }

    /// Commits the open group and waits for every result: every UPDATE and DELETE must have
    /// touched exactly one row, anything else means the target diverged from the source.
    pub(super) async fn flush(&mut self) -> Result<(), RestoreError> {
        if self.txn.is_some() {
            return Err(self.replay_err("internal: flush inside a transaction"));
        }
        let (commit, time) = self.last_commit.unwrap_or_default();
        self.end_group(commit, time);
        self.drain().await
    }

    /// Sends what is queued and waits for every result (the target transaction stays open).
    async fn drain(&mut self) -> Result<(), RestoreError> {
        self.pump().await?;
        self.send_batch().await?;
        while !self.in_flight.is_empty() {
            self.complete_one().await?;
        }
        Ok(())
    }

    /// Writes what is queued into the batch, and sends the batch once it is large.
    async fn pump(&mut self) -> Result<(), RestoreError> {
        self.close_run();
        let queue = std::mem::take(&mut self.queue);
        self.queue_bytes = 0;
        for (op, stmt) in queue {
            if let Op::Prepared(p) = &op {
                if !self.prepared.contains_key(&p.sql) {
                    self.prepare(&p.sql, &stmt).await?;
                }
            }
            self.write_op(op, stmt)?;
        }
        if self.batch.len() >= BATCH_BYTES {
            self.send_batch().await?;
        }
        Ok(())
    }

    /// Writes one operation into the batch: a prepared row change as `EXECUTE name(…)` with
    /// its parameters as literals, after the `PREPARE` of its statement the first time.
    fn write_op(&mut self, op: Op, stmt: Stmt) -> Result<(), RestoreError> {
        match op {
            Op::Simple(sql) => {
                self.batch.push_str(&sql);
                self.batch.push_str(";\n");
            }
            Op::Prepared(p) => {
                let Some(&name) = self.prepared.get(&p.sql) else {
                    return Err(RestoreError::Replay {
                        commit_lsn: stmt.commit,
                        commit_time: stmt.commit_time,
                        detail: "internal: a statement was not prepared".into(),
                    });
                };
                self.batch.push_str("EXECUTE tidemark_");
                self.batch.push_str(&name.to_string());
                for (i, v) in p.params.iter().enumerate() {
                    self.batch.push_str(if i == 0 { "(" } else { "," });
                    statement::push_param_literal(&mut self.batch, v.as_deref()).map_err(|e| {
                        RestoreError::Replay {
                            commit_lsn: stmt.commit,
                            commit_time: stmt.commit_time,
                            detail: e.to_string(),
                        }
                    })?;
                }
                if !p.params.is_empty() {
                    self.batch.push(')');
                }
                self.batch.push_str(";\n");
            }
        }
        self.statements.push(stmt);
        Ok(())
    }

    /// Prepares `sql` as the next `tidemark_N`, in a query of its own: the server keeps the
    /// whole query text with a prepared statement, and copies it at every EXECUTE.
    async fn prepare(&mut self, sql: &str, stmt: &Stmt) -> Result<(), RestoreError> {
        if self.prepared.len() >= MAX_PREPARED {
            self.deallocate_all(stmt);
        }
        self.send_batch().await?;
        self.next_prepared += 1;
        let n = self.next_prepared;
        self.batch = format!("PREPARE tidemark_{n} AS {sql}");
        self.statements.push(Stmt {
            kind: b'P',
            rel: stmt.rel.clone(),
            commit: stmt.commit,
            commit_time: stmt.commit_time,
        });
        self.send_batch().await?;
        self.prepared.insert(sql.to_string(), n);
        Ok(())
    }

    /// Deallocates every statement this replay prepared (they may name what a DDL changed).
    fn deallocate_all(&mut self, stmt: &Stmt) {
        for (_, n) in self.prepared.drain() {
            self.batch.push_str("DEALLOCATE tidemark_");
            self.batch.push_str(&n.to_string());
            self.batch.push_str(";\n");
            self.statements.push(Stmt {
                kind: b'X',
                rel: None,
                commit: stmt.commit,
                commit_time: stmt.commit_time,
            });
        }
    }

    /// Sends the batch (one simple query; the server answers the statements in order), without
    /// waiting for its results beyond [`IN_FLIGHT_BATCHES`]: the next batch is rendered
    /// meanwhile.
    async fn send_batch(&mut self) -> Result<(), RestoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let sql = std::mem::take(&mut self.batch);
        let statements = std::mem::take(&mut self.statements);
        let client = self.client;
        let mut fut: InFlight<'a> = Box::pin(async move {
            let mut counts = Vec::new();
            let stream = match client.simple_query_raw(&sql).await {
                Ok(s) => s,
                Err(e) => return (counts, Err(e)),
            };
            let mut stream = std::pin::pin!(stream);
            while let Some(m) = stream.next().await {
                match m {
                    Ok(tokio_postgres::SimpleQueryMessage::CommandComplete(n)) => counts.push(n),
                    Ok(_) => {}
                    Err(e) => return (counts, Err(e)),
                }
            }
            (counts, Ok(()))
        });
        // The first poll hands the query to the connection task: batches reach the server in
        // the order they are sent.
        if let std::task::Poll::Ready(r) =
            std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await
        {
            fut = Box::pin(std::future::ready(r));
        }
        self.in_flight.push_back((fut, statements));
        while self.in_flight.len() > IN_FLIGHT_BATCHES {
            self.complete_one().await?;
        }
        Ok(())
    }

    /// Waits for the oldest batch's results and checks them: a statement the target refused
    /// is named with its source transaction, and every UPDATE and DELETE must have touched
    /// exactly one row (anything else means the target diverged from the source).
    async fn complete_one(&mut self) -> Result<(), RestoreError> {
        let Some((fut, statements)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (counts, result) = fut.await;
        if let Err(e) = result {
            let stmt = statements.get(counts.len()).or(statements.last());
            let what = match stmt.map(|s| s.kind) {
                Some(b'B') => "BEGIN".to_string(),
                Some(b'C') => "the COMMIT of the transactions up to this one".to_string(),
                Some(b'I') => "an INSERT".to_string(),
                Some(b'U') => format!(
                    "an UPDATE of {}",
                    stmt.and_then(|s| s.rel.as_deref()).unwrap_or("?")
                ),
                Some(b'D') => format!(
                    "a DELETE of {}",
                    stmt.and_then(|s| s.rel.as_deref()).unwrap_or("?")
                ),
                Some(b'P') => "the preparation of a statement".to_string(),
                Some(b'T') => "a TRUNCATE".to_string(),
                _ => "a statement".to_string(),
            };
            return Err(RestoreError::Replay {
                commit_lsn: stmt.map(|s| s.commit).unwrap_or_default(),
                commit_time: stmt.map(|s| s.commit_time).unwrap_or_default(),
                detail: format!("the target refused {what}: {}", crate::error::chain(&e)),
            });
        }
        for (stmt, n) in statements.iter().zip(counts) {
            if matches!(stmt.kind, b'U' | b'D') && n != 1 {
                let what = if stmt.kind == b'U' {
                    "an UPDATE"
                } else {
                    "a DELETE"
                };
                return Err(RestoreError::Replay {
                    commit_lsn: stmt.commit,
                    commit_time: stmt.commit_time,
                    detail: format!(
                        "{what} of {} matched {n} rows instead of 1: the restored data diverged from the source",
                        stmt.rel.as_deref().unwrap_or("?")
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The replay sink: the changelog reader hands each transaction to replay here, whole and in
/// commit order; nothing here decides which transactions those are.
impl changelog::ReplaySink for Replayer<'_> {
    type Error = RestoreError;

    fn begin(&mut self, commit_lsn: Lsn, commit_time: PgTimestamp) {
        self.txn = Some((commit_lsn, commit_time));
        self.open_group();
    }

    /// A Relation message: checked against the captured DDL (the schema guard), then the
    /// relation map follows it.
    fn relation(
        &mut self,
        msg: &Message,
        txn: Option<(Lsn, PgTimestamp)>,
        checked: bool,
    ) -> Result<(), RestoreError> {
        if let Some(rel) = RelationInfo::from_message(msg) {
            // Before the backup's point the backup's own columns are authoritative.
            let at = txn.map(|t| t.0.to_string()).unwrap_or_default();
            if let Err(e) = self.guard.relation(&rel, checked, &at) {
                let (commit_lsn, commit_time) = txn.unwrap_or_default();
                return Err(RestoreError::Replay {
                    commit_lsn,
                    commit_time,
                    detail: e.restore_detail(),
                });
            }
            let rel = keep_relation_facts(self.relations.get(&rel.oid), rel);
            self.insert_prefixes.remove(&rel.oid);
            self.relations.insert(rel.oid, rel);
        }
        Ok(())
    }

    async fn change(&mut self, msg: Message) -> Result<(), RestoreError> {
        self.render(msg)?;
        if self.queue_bytes >= BATCH_BYTES {
            self.pump().await?;
        }
        Ok(())
    }

    async fn logical_message(&mut self, msg: Message) -> Result<(), RestoreError> {
        self.logical(msg).await?;
        if self.queue_bytes >= BATCH_BYTES {
            self.pump().await?;
        }
        Ok(())
    }

    async fn commit(
        &mut self,
        commit_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Result<(), RestoreError> {
        self.txn = None;
        self.end_txn(commit_lsn, commit_time).await
    }
}

/// Bytes an operation sends (for memory limits).
fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Simple(sql) => sql.len(),
        Op::Prepared(p) => p.sql.len() + p.param_bytes(),
    }
}

/// Rows of the largest multi-row INSERT for a table of `ncols` columns: a power of two, at
/// most [`INSERT_ROWS`], with at most 65535 parameters.
fn max_insert_rows(ncols: usize) -> usize {
    let mut rows = INSERT_ROWS;
    while rows > 1 && rows * ncols > 65535 {
        rows /= 2;
    }
    rows
}

/// The relations as they stood at the backup, keyed by their source OID: a change after the
/// backup's point may belong to a relation whose Relation message the stream sent earlier.
/// Columns are the manifest's (what pgoutput sends: stored, non-generated, in order); key
/// columns come from the restored replica identity (primary key or chosen index).
async fn relations_at_backup(
    client: &tokio_postgres::Client,
    manifest: &Manifest,
) -> Result<HashMap<u32, RelationInfo>, RestoreError> {
    let mut out = HashMap::new();
    for t in manifest.tables.iter().filter(|t| t.oid != 0) {
        let qualified = format!(
            "{}.{}",
            statement::quote_ident(&t.schema),
            statement::quote_ident(&t.name)
        );
        let row = client
            .query_one(
                "SELECT c.relreplident::text,
                        coalesce((SELECT array_agg(a.attname::text)
                           FROM pg_index i JOIN pg_attribute a
                             ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                          WHERE i.indrelid = c.oid
                            AND CASE c.relreplident WHEN 'i' THEN i.indisreplident
                                                    WHEN 'd' THEN i.indisprimary ELSE false END),
                                 '{}')
                   FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&qualified],
            )
            .await
            .map_err(|source| RestoreError::TargetQuery {
                what: format!("reading the replica identity of {qualified}"),
                source,
            })?;
        let ident: String = row.get(0);
        let keys: Vec<String> = row.get(1);
        out.insert(
            t.oid,
            RelationInfo {
                oid: t.oid,
                schema: t.schema.clone(),
                name: t.name.clone(),
                replica_identity: ident.bytes().next().unwrap_or(b'd'),
                columns: t
                    .columns
                    .iter()
                    .map(|c| statement::ColumnInfo {
                        name: c.clone(),
                        type_oid: 0,
                        is_key: keys.contains(c),
                    })
                    .collect(),
                partitioned: t.partitioned_root,
            },
        );
    }
    Ok(out)
}

/// A relation described again by the stream, with what the stream does not say carried over
/// from what was known of it (from the base backup): whether it is a partitioned table, whose
/// changes (sent via its root with `publish_via_partition_root`) must not use `ONLY`.
fn keep_relation_facts(known: Option<&RelationInfo>, mut rel: RelationInfo) -> RelationInfo {
    if let Some(known) = known {
        rel.partitioned = known.partitioned;
    }
    rel
}

/// What an operation is, for checking its result and naming it in errors.
struct Stmt {
    kind: u8,
    rel: Option<String>,
    commit: Lsn,
    commit_time: PgTimestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_inserts_stay_under_the_parameter_limit() {
        assert_eq!(max_insert_rows(1), INSERT_ROWS);
        assert_eq!(max_insert_rows(1000), 64);
        assert_eq!(max_insert_rows(1100), 32);
        assert_eq!(max_insert_rows(1600), 32);
        assert_eq!(max_insert_rows(40000), 1);
        for ncols in [1, 3, 1023, 1024, 1025, 1600] {
            let rows = max_insert_rows(ncols);
            assert!(rows.is_power_of_two() && (rows * ncols <= 65535 || rows == 1));
        }
    }
}
