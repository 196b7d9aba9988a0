//! Decoded row changes rendered as SQL text, for replay over the simple-query protocol.
//!
//! Owns: turning one relation description ([`RelationInfo`], from a pgoutput Relation message)
//! plus one change (insert, update, delete, truncate) into exactly one SQL statement. Replay
//! sends one source transaction as `BEGIN; …; COMMIT;`; that framing, the connection, and
//! checking results are the caller's.
//!
//! Invariants:
//! - Identifiers and literals are always quoted ([`quote_ident`], [`quote_literal`]): nothing a
//!   value, a column or a table name contains can end the quoted token, so no injection.
//! - Literals are untyped (`'42'`): PostgreSQL coerces an unknown literal to the column's type.
//!   Type OIDs are never written, they differ between source and target.
//! - An [`Value::UnchangedToast`] value is never written: its real value is not in the stream.
//! - A change whose row cannot be located safely is an error, never a guess.
//! - On error nothing is appended to the output.
//!
//! Assumptions about the target, which the caller must ensure:
//! - `standard_conforming_strings = on` (backslashes in literals are literal), and the same
//!   output-affecting settings as the source's walsender (DateStyle, IntervalStyle, TimeZone,
//!   extra_float_digits, bytea_output, search_path, lc_monetary): row location under REPLICA
//!   IDENTITY FULL compares the target's text output with the source's, and regclass-like and
//!   money values are read back as they were printed.
//! - [`RelationInfo::partitioned`] says whether the relation is a partitioned table on the
//!   target (a publication with `publish_via_partition_root = true` sends changes of the
//!   partitions as changes of their root). UPDATE, DELETE and TRUNCATE of an ordinary table use
//!   `ONLY`, so that a change of a parent in table inheritance never reaches rows of its
//!   children; a partitioned table gets no `ONLY` (which would affect no row, or be refused by
//!   TRUNCATE), and PostgreSQL routes the change to the partition that holds the row.
//! - The caller should check that every UPDATE and DELETE reports exactly one row: zero means
//!   the target has diverged from the source, and nothing in the statement can detect that.

use std::cell::RefCell;
use std::fmt;

use bytes::Bytes;

use crate::pgoutput::{
    Message, OldTuple, TupleData, Value, REPLICA_IDENTITY_DEFAULT, REPLICA_IDENTITY_FULL,
    REPLICA_IDENTITY_INDEX, REPLICA_IDENTITY_NOTHING, TRUNCATE_RESTART_IDENTITY,
};

/// One column of a relation, as the source described it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// Type OID on the source (informational only: never written into SQL).
    pub type_oid: u32,
    /// Whether the column is part of the replica identity key (for REPLICA IDENTITY FULL,
    /// pgoutput flags every column).
    pub is_key: bool,
}

/// A relation as described by a pgoutput Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationInfo {
    /// Relation OID on the source; changes refer to it.
    pub oid: u32,
    /// Schema name; empty means `pg_catalog` (as pgoutput sends it).
    pub schema: String,
    /// Table name.
    pub name: String,
    /// `pg_class.relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full,
    /// `b'i'` index.
    pub replica_identity: u8,
    /// Columns in the order of the tuples.
    pub columns: Vec<ColumnInfo>,
    /// Whether the relation is a partitioned table (`relkind = 'p'`), whose rows live in its
    /// partitions. A Relation message does not say; the caller knows it from the base
    /// backup's manifest (see the module documentation).
    pub partitioned: bool,
}

impl RelationInfo {
    /// The relation described by a [`Message::Relation`]; `None` for any other message.
    pub fn from_message(msg: &Message) -> Option<RelationInfo> {
        match msg {
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
                ..
            } => Some(RelationInfo {
                oid: *oid,
                schema: namespace.clone(),
                name: name.clone(),
                replica_identity: *replica_identity,
                columns: columns
                    .iter()
                    .map(|c| ColumnInfo {
                        name: c.name.clone(),
                        type_oid: c.type_oid,
                        is_key: c.is_key(),
                    })
                    .collect(),
                partitioned: false,
            }),
            _ => None,
        }
    }

    /// `"schema"."table"`, both parts quoted with [`quote_ident`]; an empty schema is
    /// `pg_catalog`.
    pub fn qualified_name(&self) -> String {
        let schema = if self.schema.is_empty() {
            "pg_catalog"
        } else {
            &self.schema
        };
        format!("{}.{}", quote_ident(schema), quote_ident(&self.name))
    }

    /// The table as the target of UPDATE, DELETE or TRUNCATE: `ONLY "s"."t"`, or `"s"."t"`
    /// for a partitioned table (see the module documentation).
    pub fn target_name(&self) -> String {
        if self.partitioned {
            self.qualified_name()
        } else {
            format!("ONLY {}", self.qualified_name())
        }
    }
}

/// Why a value cannot be written as an SQL literal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiteralError {
    /// The bytes are not UTF-8 (text output of the source is UTF-8: the archiver asks for it).
    #[error("value is not valid UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    /// The bytes contain a NUL, which no PostgreSQL text value can hold.
    #[error("value contains a NUL byte at offset {offset}")]
    Nul { offset: usize },
}

/// Why a change cannot be rendered as a statement.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StatementError {
    /// The tuple does not have as many values as the relation has columns.
    #[error("{tuple} of {table} has {got} values but the relation has {expected} columns")]
    ColumnCount {
        table: String,
        tuple: &'static str,
        expected: usize,
        got: usize,
    },
    /// A value cannot be written as a literal.
    #[error("column {column} of {table}: {source}")]
    Literal {
        table: String,
        column: String,
        source: LiteralError,
    },
    /// A value came in binary format.
    #[error(
        "column {column} of {table}: binary tuple format is not supported; the archiver requests text"
    )]
    BinaryValue { table: String, column: String },
    /// An inserted row has an unchanged-TOAST value, whose real value is not in the stream.
    #[error("cannot insert into {table}: column {column} is an unchanged TOAST value, whose value was not sent")]
    UnchangedToastInInsert { table: String, column: String },
    /// The row an update or delete applies to cannot be located safely.
    #[error(
        "cannot locate the row to {action} in {table}: {reason}; \
         set REPLICA IDENTITY FULL on the source table or add a primary key"
    )]
    CannotLocateRow {
        table: String,
        action: &'static str,
        reason: String,
    },
}

pub use crate::sql::quote_ident;

/// Quotes a text-format value as a string literal: `'` around, every `'` doubled. For a target
/// with `standard_conforming_strings = on`, where backslashes are ordinary characters.
/// Errors if the bytes are not UTF-8 or contain a NUL.
pub fn quote_literal(value: &[u8]) -> Result<String, LiteralError> {
    let mut out = String::with_capacity(value.len() + 2);
    push_literal(&mut out, value)?;
    Ok(out)
}

fn push_literal(out: &mut String, value: &[u8]) -> Result<(), LiteralError> {
    let text = std::str::from_utf8(value).map_err(|e| LiteralError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if let Some(offset) = value.iter().position(|&b| b == 0) {
        return Err(LiteralError::Nul { offset });
    }
    crate::sql::push_literal(out, text);
    Ok(())
}

/// Appends a parameter of a [`Prepared`] statement as an untyped literal (`'v'`, or `NULL`),
/// e.g. for `EXECUTE name('v', NULL)`. Errors (appending nothing) if the value is not UTF-8
/// or holds a NUL, which the `prepare_*` functions already refuse.
pub fn push_param_literal(out: &mut String, value: Option<&[u8]>) -> Result<(), LiteralError> {
    match value {
        Some(v) => {
            check_text(v)?;
            push_literal(out, v)
        }
        None => {
            out.push_str("NULL");
            Ok(())
        }
    }
}

/// Runs `render` on `out`, restoring `out` to its previous length if it fails.
fn atomically(
    out: &mut String,
    render: impl FnOnce(&mut String) -> Result<(), StatementError>,
) -> Result<(), StatementError> {
    let len = out.len();
    let result = render(out);
    if result.is_err() {
        out.truncate(len);
    }
    result
}

/// Context for the errors of one rendering.
struct Ctx<'a> {
    rel: &'a RelationInfo,
    action: &'static str,
    /// Parameter mode: values are written as `$n` placeholders and collected here (text
    /// format, `None` for NULL) instead of being written as literals.
    params: Option<&'a RefCell<Vec<Option<Bytes>>>>,
}

/// A statement with `$n` placeholders and its parameters, for the extended query protocol.
///
/// The parameters are text-format values of unspecified type: PostgreSQL resolves each
/// placeholder's type from its context exactly as it resolves an untyped literal (`'42'`) in
/// the same place, and converts the text with the type's input function, so a prepared
/// statement and the literal statement [`render_insert`] & co. write have the same effect.
/// The text depends only on the relation, the kind of change and which values are
/// unchanged TOAST (or NULL in a full-row locator): statements of the same shape share one
/// text, which the caller can prepare once and execute many times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The statement, without a trailing `;`.
    pub sql: String,
    /// `$1`, `$2`… in order; `None` is NULL.
    pub params: Vec<Option<Bytes>>,
}

impl Prepared {
    /// Bytes of parameter data (for memory limits).
    pub fn param_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.as_ref().map_or(0, |b| b.len()) + 4)
            .sum()
    }
}

/// Checks that a text value can be a PostgreSQL text value: UTF-8, without NUL.
fn check_text(value: &[u8]) -> Result<(), LiteralError> {
    std::str::from_utf8(value).map_err(|e| LiteralError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    if let Some(offset) = value.iter().position(|&b| b == 0) {
        return Err(LiteralError::Nul { offset });
    }
    Ok(())
}

fn push_placeholder(out: &mut String, params: &RefCell<Vec<Option<Bytes>>>, v: Option<Bytes>) {
    let mut p = params.borrow_mut();
    p.push(v);
    out.push('$');
    out.push_str(&p.len().to_string());
}

impl Ctx<'_> {
    fn table(&self) -> String {
        self.rel.qualified_name()
    }

    fn check_count(&self, tuple: &TupleData, which: &'static str) -> Result<(), StatementError> {
        if tuple.0.len() != self.rel.columns.len() {
            return Err(StatementError::ColumnCount {
                table: self.table(),
                tuple: which,
                expected: self.rel.columns.len(),
                got: tuple.0.len(),
            });
        }
        Ok(())
    }

    fn cannot_locate(&self, reason: impl Into<String>) -> StatementError {
        StatementError::CannotLocateRow {
            table: self.table(),
            action: self.action,
            reason: reason.into(),
        }
    }

    /// Appends `NULL` or the literal of a text value. Unchanged TOAST must be handled by
    /// the caller; here it is an error naming the column.
    fn push_value(
        &self,
        out: &mut String,
        column: &ColumnInfo,
        value: &Value,
    ) -> Result<(), StatementError> {
        let literal_error = |source| StatementError::Literal {
            table: self.table(),
            column: quote_ident(&column.name),
            source,
        };
        match value {
            Value::Null => {
                match self.params {
                    Some(p) => push_placeholder(out, p, None),
                    None => out.push_str("NULL"),
                }
                Ok(())
            }
            Value::Text(bytes) => match self.params {
                Some(p) => {
                    check_text(bytes).map_err(literal_error)?;
                    push_placeholder(out, p, Some(bytes.clone()));
                    Ok(())
                }
                None => push_literal(out, bytes).map_err(literal_error),
            },
            Value::Binary(_) => Err(StatementError::BinaryValue {
                table: self.table(),
                column: quote_ident(&column.name),
            }),
            Value::UnchangedToast => Err(StatementError::UnchangedToastInInsert {
                table: self.table(),
                column: quote_ident(&column.name),
            }),
        }
    }

    /// `WHERE "k1" = 'v1' AND "k2" = 'v2'` from the key columns of `tuple`.
    fn push_key_where(
        &self,
        out: &mut String,
        tuple: &TupleData,
        source: &str,
    ) -> Result<(), StatementError> {
        let mut any = false;
        for (column, value) in self.rel.columns.iter().zip(&tuple.0) {
            if !column.is_key {
                continue;
            }
            match value {
                Value::Text(_) | Value::Binary(_) => {}
                Value::Null => {
                    return Err(self.cannot_locate(format!(
                        "key column {} is NULL in the {source}",
                        quote_ident(&column.name)
                    )))
                }
                Value::UnchangedToast => {
                    return Err(self.cannot_locate(format!(
                        "key column {} is an unchanged TOAST value in the {source}",
                        quote_ident(&column.name)
                    )))
                }
            }
            out.push_str(if any { " AND " } else { " WHERE " });
            crate::sql::push_ident(out, &column.name);
            out.push_str(" = ");
            self.push_value(out, column, value)?;
            any = true;
        }
        if !any {
            return Err(self.cannot_locate("the relation has no replica identity key columns"));
        }
        Ok(())
    }

    /// `WHERE ctid = (SELECT ctid FROM ONLY t WHERE <every column equal> LIMIT 1)` from a full
    /// old row (REPLICA IDENTITY FULL): duplicates are indistinguishable, any one will do.
    /// For a partitioned table, whose partitions each have their own ctids, the row is the
    /// pair `(tableoid, ctid)`, chosen once in a CTE which is returned, for the caller to
    /// write before the statement: `WITH tidemark_row AS MATERIALIZED (SELECT tableoid, ctid
    /// FROM t WHERE … LIMIT 1) … WHERE tableoid = (SELECT tableoid FROM tidemark_row) AND
    /// ctid = (SELECT ctid FROM tidemark_row)`.
    ///
    /// Each column is compared by its text output, `pg_catalog.format('%s', "c") = 'v'`:
    /// not `"c" = 'v'`, because some types (json, point, xml…) have no equality operator, and
    /// not `"c"::text = 'v'`, because for some types the cast to text is not the output
    /// function whose result pgoutput sent (`true::text` is `true`, the output is `t`;
    /// `inet` casts with its netmask, `char(n)` without its padding), which would silently
    /// match no row. A NULL is matched with `pg_catalog.num_nulls("c") = 1`, not `IS NULL`,
    /// which is also true for a composite value whose fields are all NULL.
    /// Unchanged TOAST values are skipped.
    fn push_full_where(
        &self,
        out: &mut String,
        tuple: &TupleData,
    ) -> Result<Option<String>, StatementError> {
        let table = self.table();
        let mut conds = String::new();
        for (column, value) in self.rel.columns.iter().zip(&tuple.0) {
            if matches!(value, Value::UnchangedToast) {
                continue;
            }
            if !conds.is_empty() {
                conds.push_str(" AND ");
            }
            if matches!(value, Value::Null) {
                conds.push_str("pg_catalog.num_nulls(");
                crate::sql::push_ident(&mut conds, &column.name);
                conds.push_str(") = 1");
            } else {
                conds.push_str("pg_catalog.format('%s', ");
                crate::sql::push_ident(&mut conds, &column.name);
                conds.push_str(") = ");
                self.push_value(&mut conds, column, value)?;
            }
        }
        if conds.is_empty() {
            return Err(self.cannot_locate(
                "the old row has no column to compare (all are unchanged TOAST values)",
            ));
        }
        if self.rel.partitioned {
            out.push_str(
                " WHERE tableoid = (SELECT tableoid FROM tidemark_row) \
                 AND ctid = (SELECT ctid FROM tidemark_row)",
            );
            return Ok(Some(format!(
                "WITH tidemark_row AS MATERIALIZED (SELECT tableoid, ctid FROM {table} WHERE {conds} LIMIT 1) "
            )));
        }
        out.push_str(" WHERE ctid = (SELECT ctid FROM ONLY ");
        out.push_str(&table);
        out.push_str(" WHERE ");
        out.push_str(&conds);
        out.push_str(" LIMIT 1)");
        Ok(None)
    }

    /// The WHERE clause locating the old row given by an old tuple; returns the CTE to write
    /// before the statement, if it needs one.
    fn push_old_where(
        &self,
        out: &mut String,
        old: &OldTuple,
    ) -> Result<Option<String>, StatementError> {
        match old {
            OldTuple::Key(t) => {
                self.check_count(t, "old key tuple")?;
                self.push_key_where(out, t, "old key").map(|()| None)
            }
            OldTuple::Full(t) => {
                self.check_count(t, "old tuple")?;
                self.push_full_where(out, t)
            }
        }
    }
}

/// Appends `INSERT INTO "s"."t" ("a","b") OVERRIDING SYSTEM VALUE VALUES ('1',NULL);`.
///
/// `OVERRIDING SYSTEM VALUE` makes the source's value win over a `GENERATED ALWAYS AS
/// IDENTITY` column (and is a no-op otherwise). A table without columns gets
/// `INSERT INTO "s"."t" DEFAULT VALUES;`. An unchanged-TOAST value is an error.
pub fn render_insert(
    rel: &RelationInfo,
    new: &TupleData,
    out: &mut String,
) -> Result<(), StatementError> {
    insert_sql(rel, new, out, None)
}

/// [`render_insert`] as a [`Prepared`] statement (without the trailing `;`).
pub fn prepare_insert(rel: &RelationInfo, new: &TupleData) -> Result<Prepared, StatementError> {
    let params = RefCell::new(Vec::with_capacity(new.0.len()));
    let mut sql = String::new();
    insert_sql(rel, new, &mut sql, Some(&params))?;
    sql.pop();
    Ok(Prepared {
        sql,
        params: params.into_inner(),
    })
}

/// The parameters of [`prepare_insert`]'s statement for `new`, checked as it checks them,
/// without writing the statement.
pub fn prepare_insert_params(
    rel: &RelationInfo,
    new: &TupleData,
) -> Result<Vec<Option<Bytes>>, StatementError> {
    let params = RefCell::new(Vec::with_capacity(new.0.len()));
    let ctx = Ctx {
        rel,
        action: "insert",
        params: Some(&params),
    };
    ctx.check_count(new, "new tuple")?;
    let mut scratch = String::new();
    for (column, value) in rel.columns.iter().zip(&new.0) {
        scratch.clear();
        ctx.push_value(&mut scratch, column, value)?;
    }
    Ok(params.into_inner())
}

/// The start of [`prepare_insert`]'s statement, up to and including `VALUES ` (`None` for a
/// table without columns): a multi-row INSERT is this followed by one `($n,…)` per row, the
/// rows' parameters in order.
pub fn insert_prefix(rel: &RelationInfo) -> Option<String> {
    if rel.columns.is_empty() {
        return None;
    }
    let mut out = String::from("INSERT INTO ");
    out.push_str(&rel.qualified_name());
    out.push_str(" (");
    for (i, column) in rel.columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        crate::sql::push_ident(&mut out, &column.name);
    }
    out.push_str(") OVERRIDING SYSTEM VALUE VALUES ");
    Some(out)
}

fn insert_sql(
    rel: &RelationInfo,
    new: &TupleData,
    out: &mut String,
    params: Option<&RefCell<Vec<Option<Bytes>>>>,
) -> Result<(), StatementError> {
    let ctx = Ctx {
        rel,
        action: "insert",
        params,
    };
    ctx.check_count(new, "new tuple")?;
    atomically(out, |out| {
        out.push_str("INSERT INTO ");
        out.push_str(&rel.qualified_name());
        if rel.columns.is_empty() {
            out.push_str(" DEFAULT VALUES;");
            return Ok(());
        }
        out.push_str(" (");
        for (i, column) in rel.columns.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            crate::sql::push_ident(out, &column.name);
        }
        out.push_str(") OVERRIDING SYSTEM VALUE VALUES (");
        for (i, (column, value)) in rel.columns.iter().zip(&new.0).enumerate() {
            if i > 0 {
                out.push(',');
            }
            ctx.push_value(out, column, value)?;
        }
        out.push_str(");");
        Ok(())
    })
}

/// Appends `UPDATE ONLY "s"."t" SET "a" = '1', "b" = NULL WHERE …;`.
///
/// SET lists every column of `new` except unchanged-TOAST ones and those the stream proves
/// unchanged (see below). The row is located by:
/// - an old key tuple (`K`, the key changed): `"k" = 'v'` for each key column;
/// - an old full tuple (`O`, REPLICA IDENTITY FULL): see the `ctid` form of [`render_delete`];
/// - no old tuple (replica identity default or index, key unchanged): the key columns of
///   `new`.
///
/// Proven unchanged, and left out of SET: the key columns when there is no old tuple, and any
/// column whose old value is sent and equal to the new one. Setting them would change
/// nothing, but setting a `GENERATED ALWAYS` identity column, even to its own value, is an
/// error in PostgreSQL. If no column is left to set, nothing is appended. Replica identity NOTHING or FULL without
/// an old tuple, or no usable key, is an error.
pub fn render_update(
    rel: &RelationInfo,
    old: Option<&OldTuple>,
    new: &TupleData,
    out: &mut String,
) -> Result<(), StatementError> {
    update_sql(rel, old, new, out, None)
}

/// [`render_update`] as a [`Prepared`] statement; `None` when nothing is left to set.
pub fn prepare_update(
    rel: &RelationInfo,
    old: Option<&OldTuple>,
    new: &TupleData,
) -> Result<Option<Prepared>, StatementError> {
    let params = RefCell::new(Vec::with_capacity(new.0.len()));
    let mut sql = String::new();
    update_sql(rel, old, new, &mut sql, Some(&params))?;
    if sql.pop().is_none() {
        return Ok(None);
    }
    Ok(Some(Prepared {
        sql,
        params: params.into_inner(),
    }))
}

fn update_sql(
    rel: &RelationInfo,
    old: Option<&OldTuple>,
    new: &TupleData,
    out: &mut String,
    params: Option<&RefCell<Vec<Option<Bytes>>>>,
) -> Result<(), StatementError> {
    let ctx = Ctx {
        rel,
        action: "update",
        params,
    };
    ctx.check_count(new, "new tuple")?;
    if old.is_none()
        && rel.replica_identity != REPLICA_IDENTITY_DEFAULT
        && rel.replica_identity != REPLICA_IDENTITY_INDEX
    {
        let reason = match rel.replica_identity {
            REPLICA_IDENTITY_NOTHING => "the replica identity is NOTHING".to_string(),
            REPLICA_IDENTITY_FULL => {
                "the replica identity is FULL but no old row was sent".to_string()
            }
            other => format!("unknown replica identity {:?}", other as char),
        };
        return Err(ctx.cannot_locate(reason));
    }
    if let Some(old) = old {
        let which = match old {
            OldTuple::Key(_) => "old key tuple",
            OldTuple::Full(_) => "old tuple",
        };
        ctx.check_count(old.tuple(), which)?;
    }
    let mut set = String::new();
    for (i, (column, value)) in rel.columns.iter().zip(&new.0).enumerate() {
        if matches!(value, Value::UnchangedToast) || known_unchanged(old, i, column, value) {
            continue;
        }
        set.push_str(if set.is_empty() { " SET " } else { ", " });
        crate::sql::push_ident(&mut set, &column.name);
        set.push_str(" = ");
        ctx.push_value(&mut set, column, value)?;
    }
    let mut locate = String::new();
    let cte = match old {
        Some(old) => ctx.push_old_where(&mut locate, old)?,
        None => {
            ctx.push_key_where(&mut locate, new, "new row (no old key was sent)")?;
            None
        }
    };
    if set.is_empty() {
        return Ok(());
    }
    out.reserve(set.len() + locate.len() + 64);
    if let Some(cte) = cte {
        out.push_str(&cte);
    }
    out.push_str("UPDATE ");
    out.push_str(&rel.target_name());
    out.push_str(&set);
    out.push_str(&locate);
    out.push(';');
    Ok(())
}

/// Whether the stream proves that column `i` keeps its value, so that SET can leave it out:
/// a key column when no old tuple was sent (the key did not change), or a column whose old
/// value (a key column of a `K` tuple, any column of an `O` tuple) equals the new one.
/// Leaving such columns out changes nothing, and lets an update succeed on a table whose key
/// is a `GENERATED ALWAYS` identity column, which may not be set even to its own value.
fn known_unchanged(old: Option<&OldTuple>, i: usize, column: &ColumnInfo, new: &Value) -> bool {
    let same = |t: &TupleData| match (t.0.get(i), new) {
        (Some(Value::Text(a)), Value::Text(b)) => a == b,
        (Some(Value::Null), Value::Null) => true,
        _ => false,
    };
    match old {
        None => column.is_key,
        Some(OldTuple::Key(t)) => column.is_key && same(t),
        Some(OldTuple::Full(t)) => same(t),
    }
}

/// Appends `DELETE FROM ONLY "s"."t" WHERE …;`.
///
/// With an old key tuple (`K`): `WHERE "k" = 'v' AND …` over the key columns.
/// With an old full tuple (`O`, REPLICA IDENTITY FULL), exactly one matching row is deleted:
/// `WHERE ctid = (SELECT ctid FROM ONLY "s"."t" WHERE pg_catalog.format('%s', "c") = 'v' AND
/// pg_catalog.num_nulls("d") = 1 … LIMIT 1)`, skipping unchanged-TOAST columns.
pub fn render_delete(
    rel: &RelationInfo,
    old: &OldTuple,
    out: &mut String,
) -> Result<(), StatementError> {
    delete_sql(rel, old, out, None)
}

/// [`render_delete`] as a [`Prepared`] statement.
pub fn prepare_delete(rel: &RelationInfo, old: &OldTuple) -> Result<Prepared, StatementError> {
    let params = RefCell::new(Vec::new());
    let mut sql = String::new();
    delete_sql(rel, old, &mut sql, Some(&params))?;
    sql.pop();
    Ok(Prepared {
        sql,
        params: params.into_inner(),
    })
}

fn delete_sql(
    rel: &RelationInfo,
    old: &OldTuple,
    out: &mut String,
    params: Option<&RefCell<Vec<Option<Bytes>>>>,
) -> Result<(), StatementError> {
    let ctx = Ctx {
        rel,
        action: "delete",
        params,
    };
    let mut locate = String::new();
    let cte = ctx.push_old_where(&mut locate, old)?;
    if let Some(cte) = cte {
        out.push_str(&cte);
    }
    out.push_str("DELETE FROM ");
    out.push_str(&rel.target_name());
    out.push_str(&locate);
    out.push(';');
    Ok(())
}

/// Appends `TRUNCATE ONLY "a"."b", ONLY "c"."d" [RESTART IDENTITY];`, nothing if `rels` is
/// empty.
///
/// pgoutput lists every truncated relation explicitly, including those a `CASCADE` reached
/// and the partitions of a truncated partitioned table (or, with `publish_via_partition_root`,
/// the partitioned table instead of its partitions), so each ordinary table gets `ONLY`
/// (which binds to one name, not to the list) and a partitioned table none (PostgreSQL refuses
/// `TRUNCATE ONLY` of one) and the CASCADE bit is deliberately not replayed: the list is
/// already complete, and on the target CASCADE could only empty tables the stream does not
/// say were emptied. If the target has a referencing table outside the list, the statement
/// fails instead, which is what PostgreSQL's own subscriber does too.
/// RESTART IDENTITY (option bit 2) is kept.
pub fn render_truncate(rels: &[&RelationInfo], options: u8, out: &mut String) {
    if rels.is_empty() {
        return;
    }
    out.push_str("TRUNCATE ");
    for (i, rel) in rels.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&rel.target_name());
    }
    if options & TRUNCATE_RESTART_IDENTITY != 0 {
        out.push_str(" RESTART IDENTITY");
    }
    out.push(';');
}

impl fmt::Display for RelationInfo {
    /// The quoted qualified name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qualified_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{Column, COLUMN_FLAG_KEY, TRUNCATE_CASCADE};
    use bytes::Bytes;

    fn t(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn tuple(values: Vec<Value>) -> TupleData {
        TupleData(values)
    }

    /// `public.users (id int key, name text, bio text)` with the given replica identity.
    fn users(replica_identity: u8) -> RelationInfo {
        let key = |name: &str| ColumnInfo {
            name: name.into(),
            type_oid: 23,
            is_key: true,
        };
        let plain = |name: &str| ColumnInfo {
            name: name.into(),
            type_oid: 25,
            is_key: replica_identity == REPLICA_IDENTITY_FULL,
        };
        RelationInfo {
            oid: 16390,
            schema: "public".into(),
            name: "users".into(),
            replica_identity,
            columns: vec![key("id"), plain("name"), plain("bio")],
            partitioned: false,
        }
    }

    fn insert(rel: &RelationInfo, new: &TupleData) -> Result<String, StatementError> {
        let mut out = String::new();
        render_insert(rel, new, &mut out).map(|()| out)
    }

    fn update(
        rel: &RelationInfo,
        old: Option<&OldTuple>,
        new: &TupleData,
    ) -> Result<String, StatementError> {
        let mut out = String::new();
        render_update(rel, old, new, &mut out).map(|()| out)
    }

    fn delete(rel: &RelationInfo, old: &OldTuple) -> Result<String, StatementError> {
        let mut out = String::new();
        render_delete(rel, old, &mut out).map(|()| out)
    }

    #[test]
    fn relation_info_from_message() {
        let msg = Message::Relation {
            xid: None,
            oid: 7,
            namespace: "app".into(),
            name: "Orders".into(),
            replica_identity: REPLICA_IDENTITY_INDEX,
            columns: vec![
                Column {
                    flags: COLUMN_FLAG_KEY,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    flags: 0,
                    name: "total".into(),
                    type_oid: 1700,
                    type_modifier: 655366,
                },
            ],
        };
        let rel = RelationInfo::from_message(&msg).expect("a relation");
        assert_eq!(rel.oid, 7);
        assert_eq!(rel.qualified_name(), r#""app"."Orders""#);
        assert_eq!(rel.replica_identity, b'i');
        assert!(rel.columns[0].is_key && !rel.columns[1].is_key);
        assert_eq!(rel.columns[1].type_oid, 1700);
        assert_eq!(RelationInfo::from_message(&Message::StreamStop), None);
    }

    #[test]
    fn quoting_identifiers() {
        assert_eq!(quote_ident("users"), r#""users""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(
            quote_ident(r#"x"; DROP TABLE t; --"#),
            r#""x""; DROP TABLE t; --""#
        );
        assert_eq!(quote_ident("Ünïcødé 表"), "\"Ünïcødé 表\"");
        let mut rel = users(REPLICA_IDENTITY_DEFAULT);
        rel.schema = String::new();
        assert_eq!(rel.qualified_name(), r#""pg_catalog"."users""#);
        rel.schema = r#"s"s"#.into();
        rel.name = "t.t".into();
        assert_eq!(rel.qualified_name(), r#""s""s"."t.t""#);
        assert_eq!(rel.to_string(), r#""s""s"."t.t""#);
    }

    #[test]
    fn quoting_literals() {
        assert_eq!(quote_literal(b"O'Reilly").unwrap(), "'O''Reilly'");
        assert_eq!(quote_literal(b"''").unwrap(), "''''''");
        assert_eq!(quote_literal(b"").unwrap(), "''");
        assert_eq!(quote_literal(br"C:\path\n").unwrap(), r"'C:\path\n'");
        assert_eq!(quote_literal(r#"a"b"#.as_bytes()).unwrap(), r#"'a"b'"#);
        assert_eq!(
            quote_literal("naïve ☃ 𝄞".as_bytes()).unwrap(),
            "'naïve ☃ 𝄞'"
        );
        assert_eq!(
            quote_literal(b"x'); DROP TABLE t; --").unwrap(),
            "'x''); DROP TABLE t; --'"
        );
        assert_eq!(
            quote_literal(b"ab\xffc"),
            Err(LiteralError::NotUtf8 { offset: 2 })
        );
        assert_eq!(
            quote_literal(b"ab\0c"),
            Err(LiteralError::Nul { offset: 2 })
        );
    }

    #[test]
    fn insert_with_nulls_and_nasty_values() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        assert_eq!(
            insert(&rel, &tuple(vec![t("1"), t("O'Reilly"), Value::Null])).unwrap(),
            r#"INSERT INTO "public"."users" ("id","name","bio") OVERRIDING SYSTEM VALUE VALUES ('1','O''Reilly',NULL);"#
        );
        assert_eq!(
            insert(&rel, &tuple(vec![t("2"), t(r"back\slash"), t("日本")])).unwrap(),
            r#"INSERT INTO "public"."users" ("id","name","bio") OVERRIDING SYSTEM VALUE VALUES ('2','back\slash','日本');"#
        );
    }

    #[test]
    fn insert_quotes_nasty_column_names() {
        let mut rel = users(REPLICA_IDENTITY_DEFAULT);
        rel.columns[1].name = r#"na"me"#.into();
        rel.columns[2].name = "Bio Text".into();
        assert_eq!(
            insert(&rel, &tuple(vec![t("1"), t("a"), t("b")])).unwrap(),
            r#"INSERT INTO "public"."users" ("id","na""me","Bio Text") OVERRIDING SYSTEM VALUE VALUES ('1','a','b');"#
        );
    }

    #[test]
    fn insert_into_a_table_without_columns() {
        let mut rel = users(REPLICA_IDENTITY_DEFAULT);
        rel.columns.clear();
        assert_eq!(
            insert(&rel, &tuple(vec![])).unwrap(),
            r#"INSERT INTO "public"."users" DEFAULT VALUES;"#
        );
    }

    #[test]
    fn insert_errors() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let err = insert(&rel, &tuple(vec![t("1"), t("a"), Value::UnchangedToast])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"cannot insert into "public"."users": column "bio" is an unchanged TOAST value, whose value was not sent"#
        );
        let err = insert(&rel, &tuple(vec![t("1"), t("a")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"new tuple of "public"."users" has 2 values but the relation has 3 columns"#
        );
        let err = insert(
            &rel,
            &tuple(vec![
                Value::Binary(Bytes::from_static(b"\0\0\0\x01")),
                t("a"),
                t("b"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"column "id" of "public"."users": binary tuple format is not supported; the archiver requests text"#
        );
        let err = insert(&rel, &tuple(vec![t("1"), t("a\0b"), t("b")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"column "name" of "public"."users": value contains a NUL byte at offset 1"#
        );
        let err = insert(
            &rel,
            &tuple(vec![
                t("1"),
                Value::Text(Bytes::from_static(b"\xc3")),
                t("b"),
            ]),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            StatementError::Literal {
                source: LiteralError::NotUtf8 { offset: 0 },
                ..
            }
        ));
    }

    #[test]
    fn failed_render_appends_nothing() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let mut out = String::from("BEGIN;");
        assert!(render_insert(&rel, &tuple(vec![t("1"), t("a"), t("\0")]), &mut out).is_err());
        assert!(render_delete(
            &rel,
            &OldTuple::Key(tuple(vec![Value::Null, Value::Null, Value::Null])),
            &mut out
        )
        .is_err());
        assert!(
            render_update(&rel, None, &tuple(vec![t("1"), t("\0"), t("b")]), &mut out).is_err()
        );
        assert_eq!(out, "BEGIN;");
    }

    #[test]
    fn update_by_primary_key_leaves_the_key_out_of_set() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        assert_eq!(
            update(&rel, None, &tuple(vec![t("5"), t("Bob"), Value::Null])).unwrap(),
            r#"UPDATE ONLY "public"."users" SET "name" = 'Bob', "bio" = NULL WHERE "id" = '5';"#
        );
    }

    #[test]
    fn update_that_changes_the_key_uses_the_old_key() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let old = OldTuple::Key(tuple(vec![t("5"), Value::Null, Value::Null]));
        assert_eq!(
            update(&rel, Some(&old), &tuple(vec![t("6"), t("Bob"), t("x")])).unwrap(),
            r#"UPDATE ONLY "public"."users" SET "id" = '6', "name" = 'Bob', "bio" = 'x' WHERE "id" = '5';"#
        );
    }

    #[test]
    fn update_with_composite_key_sets_only_the_changed_key_part() {
        let mut rel = users(REPLICA_IDENTITY_INDEX);
        rel.columns[1].is_key = true;
        let old = OldTuple::Key(tuple(vec![t("5"), t("a"), Value::Null]));
        assert_eq!(
            update(&rel, Some(&old), &tuple(vec![t("5"), t("b"), Value::Null])).unwrap(),
            r#"UPDATE ONLY "public"."users" SET "name" = 'b', "bio" = NULL WHERE "id" = '5' AND "name" = 'a';"#
        );
    }

    #[test]
    fn update_skips_unchanged_toast() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        assert_eq!(
            update(
                &rel,
                None,
                &tuple(vec![t("5"), t("Bob"), Value::UnchangedToast])
            )
            .unwrap(),
            r#"UPDATE ONLY "public"."users" SET "name" = 'Bob' WHERE "id" = '5';"#
        );
        // Nothing left to set: nothing rendered.
        let mut out = String::from("BEGIN;");
        render_update(
            &rel,
            None,
            &tuple(vec![t("5"), Value::UnchangedToast, Value::UnchangedToast]),
            &mut out,
        )
        .unwrap();
        assert_eq!(out, "BEGIN;");
    }

    #[test]
    fn update_with_replica_identity_full() {
        let rel = users(REPLICA_IDENTITY_FULL);
        let old = OldTuple::Full(tuple(vec![t("5"), t("O'Reilly"), Value::Null]));
        assert_eq!(
            update(&rel, Some(&old), &tuple(vec![t("5"), t("Bob"), t("x")])).unwrap(),
            r#"UPDATE ONLY "public"."users" SET "name" = 'Bob', "bio" = 'x' WHERE ctid = (SELECT ctid FROM ONLY "public"."users" WHERE pg_catalog.format('%s', "id") = '5' AND pg_catalog.format('%s', "name") = 'O''Reilly' AND pg_catalog.num_nulls("bio") = 1 LIMIT 1);"#
        );
        // Unchanged TOAST is skipped both in SET and in the locator.
        let old = OldTuple::Full(tuple(vec![t("5"), Value::UnchangedToast, t("b")]));
        assert_eq!(
            update(
                &rel,
                Some(&old),
                &tuple(vec![t("5"), Value::UnchangedToast, t("c")])
            )
            .unwrap(),
            r#"UPDATE ONLY "public"."users" SET "bio" = 'c' WHERE ctid = (SELECT ctid FROM ONLY "public"."users" WHERE pg_catalog.format('%s', "id") = '5' AND pg_catalog.format('%s', "bio") = 'b' LIMIT 1);"#
        );
        // A no-op update renders nothing.
        let old = OldTuple::Full(tuple(vec![t("5"), t("a"), Value::Null]));
        assert_eq!(
            update(&rel, Some(&old), &tuple(vec![t("5"), t("a"), Value::Null])).unwrap(),
            ""
        );
    }

    #[test]
    fn update_errors_when_the_row_cannot_be_located() {
        let new = tuple(vec![t("5"), t("a"), t("b")]);
        let err = update(&users(REPLICA_IDENTITY_NOTHING), None, &new).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"cannot locate the row to update in "public"."users": the replica identity is NOTHING; set REPLICA IDENTITY FULL on the source table or add a primary key"#
        );
        let err = update(&users(REPLICA_IDENTITY_FULL), None, &new).unwrap_err();
        assert!(
            err.to_string().contains("FULL but no old row was sent"),
            "{err}"
        );

        // Replica identity default, but no primary key: no key column.
        let mut rel = users(REPLICA_IDENTITY_DEFAULT);
        rel.columns[0].is_key = false;
        let err = update(&rel, None, &new).unwrap_err();
        assert!(
            err.to_string().contains("no replica identity key columns"),
            "{err}"
        );

        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let err = update(&rel, None, &tuple(vec![Value::Null, t("a"), t("b")])).unwrap_err();
        assert!(
            err.to_string().contains(r#"key column "id" is NULL"#),
            "{err}"
        );
        let err = update(
            &rel,
            None,
            &tuple(vec![Value::UnchangedToast, t("a"), t("b")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"key column "id" is an unchanged TOAST value"#),
            "{err}"
        );

        let rel = users(REPLICA_IDENTITY_FULL);
        let old = OldTuple::Full(tuple(vec![
            Value::UnchangedToast,
            Value::UnchangedToast,
            Value::UnchangedToast,
        ]));
        let err = update(&rel, Some(&old), &new).unwrap_err();
        assert!(err.to_string().contains("no column to compare"), "{err}");

        let err = update(&rel, Some(&OldTuple::Full(tuple(vec![t("1")]))), &new).unwrap_err();
        assert!(matches!(
            err,
            StatementError::ColumnCount {
                tuple: "old tuple",
                ..
            }
        ));
    }

    #[test]
    fn delete_by_key_and_by_full_row() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let old = OldTuple::Key(tuple(vec![t("O'Reilly"), Value::Null, Value::Null]));
        assert_eq!(
            delete(&rel, &old).unwrap(),
            r#"DELETE FROM ONLY "public"."users" WHERE "id" = 'O''Reilly';"#
        );
        let rel = users(REPLICA_IDENTITY_FULL);
        let old = OldTuple::Full(tuple(vec![t("5"), t(r"a\b"), Value::UnchangedToast]));
        assert_eq!(
            delete(&rel, &old).unwrap(),
            r#"DELETE FROM ONLY "public"."users" WHERE ctid = (SELECT ctid FROM ONLY "public"."users" WHERE pg_catalog.format('%s', "id") = '5' AND pg_catalog.format('%s', "name") = 'a\b' LIMIT 1);"#
        );
    }

    #[test]
    fn delete_errors() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let err = delete(
            &rel,
            &OldTuple::Key(tuple(vec![Value::Null, Value::Null, Value::Null])),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"cannot locate the row to delete in "public"."users": key column "id" is NULL in the old key; set REPLICA IDENTITY FULL on the source table or add a primary key"#
        );
        let err = delete(&rel, &OldTuple::Key(tuple(vec![t("1")]))).unwrap_err();
        assert!(matches!(
            err,
            StatementError::ColumnCount {
                tuple: "old key tuple",
                ..
            }
        ));
    }

    #[test]
    fn partitioned_tables_get_no_only_and_a_tableoid_locator() {
        let mut rel = users(REPLICA_IDENTITY_DEFAULT);
        rel.partitioned = true;
        assert_eq!(
            update(&rel, None, &tuple(vec![t("5"), t("Bob"), Value::Null])).unwrap(),
            r#"UPDATE "public"."users" SET "name" = 'Bob', "bio" = NULL WHERE "id" = '5';"#
        );
        let old = OldTuple::Key(tuple(vec![t("5"), Value::Null, Value::Null]));
        assert_eq!(
            delete(&rel, &old).unwrap(),
            r#"DELETE FROM "public"."users" WHERE "id" = '5';"#
        );
        let mut out = String::new();
        render_truncate(&[&rel], TRUNCATE_RESTART_IDENTITY, &mut out);
        assert_eq!(out, r#"TRUNCATE "public"."users" RESTART IDENTITY;"#);

        let mut rel = users(REPLICA_IDENTITY_FULL);
        rel.partitioned = true;
        let old = OldTuple::Full(tuple(vec![t("5"), t("a"), Value::Null]));
        assert_eq!(
            update(&rel, Some(&old), &tuple(vec![t("6"), t("a"), Value::Null])).unwrap(),
            r#"WITH tidemark_row AS MATERIALIZED (SELECT tableoid, ctid FROM "public"."users" WHERE pg_catalog.format('%s', "id") = '5' AND pg_catalog.format('%s', "name") = 'a' AND pg_catalog.num_nulls("bio") = 1 LIMIT 1) UPDATE "public"."users" SET "id" = '6' WHERE tableoid = (SELECT tableoid FROM tidemark_row) AND ctid = (SELECT ctid FROM tidemark_row);"#
        );
        assert_eq!(
            delete(&rel, &old).unwrap(),
            r#"WITH tidemark_row AS MATERIALIZED (SELECT tableoid, ctid FROM "public"."users" WHERE pg_catalog.format('%s', "id") = '5' AND pg_catalog.format('%s', "name") = 'a' AND pg_catalog.num_nulls("bio") = 1 LIMIT 1) DELETE FROM "public"."users" WHERE tableoid = (SELECT tableoid FROM tidemark_row) AND ctid = (SELECT ctid FROM tidemark_row);"#
        );
    }

    fn b(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn prepared_statements_have_placeholders_and_text_parameters() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let p = prepare_insert(&rel, &tuple(vec![t("1"), t("O'Reilly"), Value::Null])).unwrap();
        assert_eq!(
            p.sql,
            r#"INSERT INTO "public"."users" ("id","name","bio") OVERRIDING SYSTEM VALUE VALUES ($1,$2,$3)"#
        );
        assert_eq!(p.params, vec![b("1"), b("O'Reilly"), None]);
        assert_eq!(
            format!("{}($1,$2,$3)", insert_prefix(&rel).unwrap()),
            p.sql,
            "a multi-row INSERT starts like the single-row one"
        );
        assert_eq!(
            prepare_insert_params(&rel, &tuple(vec![t("1"), t("O'Reilly"), Value::Null])).unwrap(),
            p.params
        );

        // SET parameters first, then the key; the text does not depend on the values.
        let p = prepare_update(&rel, None, &tuple(vec![t("5"), t("Bob"), Value::Null]))
            .unwrap()
            .unwrap();
        assert_eq!(
            p.sql,
            r#"UPDATE ONLY "public"."users" SET "name" = $1, "bio" = $2 WHERE "id" = $3"#
        );
        assert_eq!(p.params, vec![b("Bob"), None, b("5")]);
        let q = prepare_update(&rel, None, &tuple(vec![t("6"), t("x"), t("y")]))
            .unwrap()
            .unwrap();
        assert_eq!(q.sql, p.sql);
        // Nothing to set: no statement.
        assert_eq!(
            prepare_update(
                &rel,
                None,
                &tuple(vec![t("5"), Value::UnchangedToast, Value::UnchangedToast])
            )
            .unwrap(),
            None
        );

        let rel = users(REPLICA_IDENTITY_FULL);
        let old = OldTuple::Full(tuple(vec![t("5"), t("a"), Value::Null]));
        let p = prepare_delete(&rel, &old).unwrap();
        assert_eq!(
            p.sql,
            r#"DELETE FROM ONLY "public"."users" WHERE ctid = (SELECT ctid FROM ONLY "public"."users" WHERE pg_catalog.format('%s', "id") = $1 AND pg_catalog.format('%s', "name") = $2 AND pg_catalog.num_nulls("bio") = 1 LIMIT 1)"#
        );
        assert_eq!(p.params, vec![b("5"), b("a")]);

        // Partitioned, full row: the CTE's parameters are numbered after SET's.
        let mut rel = users(REPLICA_IDENTITY_FULL);
        rel.partitioned = true;
        let p = prepare_update(&rel, Some(&old), &tuple(vec![t("6"), t("a"), Value::Null]))
            .unwrap()
            .unwrap();
        assert_eq!(
            p.sql,
            r#"WITH tidemark_row AS MATERIALIZED (SELECT tableoid, ctid FROM "public"."users" WHERE pg_catalog.format('%s', "id") = $2 AND pg_catalog.format('%s', "name") = $3 AND pg_catalog.num_nulls("bio") = 1 LIMIT 1) UPDATE "public"."users" SET "id" = $1 WHERE tableoid = (SELECT tableoid FROM tidemark_row) AND ctid = (SELECT ctid FROM tidemark_row)"#
        );
        assert_eq!(p.params, vec![b("6"), b("5"), b("a")]);
    }

    #[test]
    fn prepared_statements_check_values_like_literals() {
        let rel = users(REPLICA_IDENTITY_DEFAULT);
        let err = prepare_insert(&rel, &tuple(vec![t("1"), t("a\0b"), t("b")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"column "name" of "public"."users": value contains a NUL byte at offset 1"#
        );
        let err = prepare_insert_params(&rel, &tuple(vec![t("1"), t("a"), Value::UnchangedToast]))
            .unwrap_err();
        assert!(matches!(err, StatementError::UnchangedToastInInsert { .. }));
        let err = prepare_delete(
            &rel,
            &OldTuple::Key(tuple(vec![Value::Null, t("a"), t("b")])),
        )
        .unwrap_err();
        assert!(matches!(err, StatementError::CannotLocateRow { .. }));
        assert_eq!(
            prepare_insert(&users(REPLICA_IDENTITY_DEFAULT), &tuple(vec![]))
                .unwrap_err()
                .to_string(),
            r#"new tuple of "public"."users" has 0 values but the relation has 3 columns"#
        );
        let mut empty = users(REPLICA_IDENTITY_DEFAULT);
        empty.columns.clear();
        assert_eq!(insert_prefix(&empty), None);
        assert_eq!(
            prepare_insert(&empty, &tuple(vec![])).unwrap().sql,
            r#"INSERT INTO "public"."users" DEFAULT VALUES"#
        );
    }

    #[test]
    fn parameters_as_literals() {
        let mut out = String::new();
        push_param_literal(&mut out, Some(b"it's")).unwrap();
        out.push(',');
        push_param_literal(&mut out, None).unwrap();
        out.push(',');
        push_param_literal(&mut out, Some(br"a\b")).unwrap();
        assert_eq!(out, r"'it''s',NULL,'a\b'");
        assert!(push_param_literal(&mut out, Some(b"a\0")).is_err());
        assert!(push_param_literal(&mut out, Some(b"\xff")).is_err());
        assert_eq!(out, r"'it''s',NULL,'a\b'");
    }

    #[test]
    fn truncate() {
        let a = users(REPLICA_IDENTITY_DEFAULT);
        let mut b = users(REPLICA_IDENTITY_DEFAULT);
        b.schema = "Other Schema".into();
        b.name = r#"we"ird"#.into();
        let mut out = String::new();
        render_truncate(
            &[&a, &b],
            TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY,
            &mut out,
        );
        assert_eq!(
            out,
            r#"TRUNCATE ONLY "public"."users", ONLY "Other Schema"."we""ird" RESTART IDENTITY;"#
        );
        let mut out = String::new();
        render_truncate(&[&a], TRUNCATE_CASCADE, &mut out);
        assert_eq!(out, r#"TRUNCATE ONLY "public"."users";"#);
        let mut out = String::new();
        render_truncate(&[], 0, &mut out);
        assert_eq!(out, "");
    }
}
