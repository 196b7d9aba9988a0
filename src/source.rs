//! The source database: what must be true of it before archiving, and the objects tidemark
//! creates there (the publication and the slot).
//!
//! Owns the preflight checks shared by `setup`, `archive` and `backup`. Every failed check is an
//! error that names the setting or object and the statement that fixes it; nothing is written to
//! the repository before these checks pass.

use crate::conninfo::{ConnInfo, ConnInfoError};
use crate::lsn::Lsn;
use crate::statement::quote_ident;

/// Errors found while checking or preparing the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot reach the source database {target}: {detail}\nHINT: check the connection string (--source / TIDEMARK_SOURCE, PG* variables), that the server is running and accepts connections from here (listen_addresses, pg_hba.conf)")]
    Unreachable {
        target: String,
        detail: String,
        /// The server is not accepting connections yet (refused, reset, timed out, starting
        /// up or shutting down), as opposed to refusing these credentials or this database.
        not_up: bool,
    },
    #[error("the source server has wal_level={0}, but logical decoding needs wal_level=logical\nHINT: run ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL")]
    WalLevel(String),
    #[error("role {0:?} may not use replication\nHINT: ALTER ROLE {1} REPLICATION; (or connect as a role that has it)")]
    NoReplicationPrivilege(String, String),
    #[error("publication {0:?} does not exist in database {1:?}\nHINT: create it with `tidemark setup --publication {0}`, or CREATE PUBLICATION {2} FOR ALL TABLES;")]
    NoPublication(String, String, String),
    #[error("replication slot {0:?} does not exist\nHINT: create it with `tidemark setup --slot {0}`, or omit --slot to let tidemark create its default slot")]
    NoSlot(String),
    #[error("replication slot {name:?} belongs to {detail}; tidemark needs a logical slot using pgoutput in database {database:?}\nHINT: choose another --slot name")]
    ForeignSlot {
        name: String,
        detail: String,
        database: String,
    },
    #[error("replication slot {0:?} is in use by another process (pid {1})\nHINT: is another archiver running for this slot? Stop it first")]
    SlotActive(String, String),
    #[error("no free replication slot: max_replication_slots={max} and {used} are in use\nHINT: raise max_replication_slots (needs a restart) or drop an unused slot")]
    NoFreeSlot { max: i64, used: i64 },
    #[error("query on the source failed ({what}): {}", crate::error::describe_pg(.source))]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl crate::error::Classify for SourceError {
    fn exit_status(&self) -> crate::error::ExitStatus {
        use crate::error::ExitStatus::*;
        match self {
            SourceError::Unreachable { .. }
            | SourceError::WalLevel(_)
            | SourceError::NoReplicationPrivilege(..)
            | SourceError::NoPublication(..)
            | SourceError::NoSlot(_)
            | SourceError::ForeignSlot { .. }
            | SourceError::SlotActive(..)
            | SourceError::NoFreeSlot { .. }
            | SourceError::Query { .. } => Database,
        }
    }
}

impl From<ConnInfoError> for SourceError {
    fn from(e: ConnInfoError) -> SourceError {
        match e {
            ConnInfoError::Connect { target, source } => SourceError::Unreachable {
                target,
                detail: crate::error::describe_pg(&source),
                not_up: server_not_up(&source),
            },
            other => SourceError::Unreachable {
                target: String::new(),
                detail: other.to_string(),
                not_up: false,
            },
        }
    }
}

/// A connection that failed because the server is not there or not ready yet (a socket error, a
/// closed connection, SQLSTATE class 08 or 57P01–57P03), not because it refused us.
fn server_not_up(e: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
    let code = e.code().map(|c| c.code()).unwrap_or_default();
    io || e.is_closed() || code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    move |source| SourceError::Query { what, source }
}

/// A replication slot as pg_replication_slots shows it.
#[derive(Clone, Debug)]
pub struct SlotState {
    pub confirmed_flush: Lsn,
    pub active_pid: Option<String>,
}

/// An ordinary connection to the source with the facts the checks need.
pub struct Source {
    pub client: tokio_postgres::Client,
    pub database: String,
    pub user: String,
}

impl Source {
    pub async fn connect(info: &ConnInfo) -> Result<Source, SourceError> {
        let client = info.connect().await?;
        let row = client
            .query_one("SELECT current_database()::text, current_user::text", &[])
            .await
            .map_err(q("identify database"))?;
        Ok(Source {
            client,
            database: row.get(0),
            user: row.get(1),
        })
    }

    /// wal_level and the replication privilege.
    pub async fn check_server(&self) -> Result<(), SourceError> {
        let level: String = self
            .client
            .query_one("SELECT current_setting('wal_level')", &[])
            .await
            .map_err(q("read wal_level"))?
            .get(0);
        if level != "logical" {
            return Err(SourceError::WalLevel(level));
        }
        let row = self
            .client
            .query_one(
                "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(q("read role privileges"))?;
        if !row.get::<_, bool>(0) {
            return Err(SourceError::NoReplicationPrivilege(
                self.user.clone(),
                quote_ident(&self.user),
            ));
        }
        Ok(())
    }

    pub async fn publication_exists(&self, name: &str) -> Result<bool, SourceError> {
        let rows = self
            .client
            .query("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
            .await
            .map_err(q("look up the publication"))?;
        Ok(!rows.is_empty())
    }

    pub async fn create_publication(&self, name: &str) -> Result<(), SourceError> {
        self.client
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR ALL TABLES",
                quote_ident(name)
            ))
            .await
            .map_err(q("create the publication"))
    }

    /// The slot's state, or None if it does not exist. A slot of another plugin or database
    /// is an error.
    pub async fn slot(&self, name: &str) -> Result<Option<SlotState>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT coalesce(plugin, ''), coalesce(database::text, ''), slot_type::text,
                        coalesce(confirmed_flush_lsn::text, '0/0'), active_pid::text
                   FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await
            .map_err(q("look up the replication slot"))?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let (plugin, db, kind): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        if kind != "logical" || plugin != "pgoutput" || db != self.database {
            return Err(SourceError::ForeignSlot {
                name: name.to_string(),
                detail: format!("a {kind} slot with plugin {plugin:?} in database {db:?}"),
                database: self.database.clone(),
            });
        }
        let flush: String = row.get(3);
        Ok(Some(SlotState {
            confirmed_flush: flush.parse().unwrap_or(Lsn::ZERO),
            active_pid: row.get(4),
        }))
    }

    /// Fails unless a slot can be created.
    pub async fn check_free_slot(&self) -> Result<(), SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('max_replication_slots')::bigint,
                        (SELECT count(*) FROM pg_replication_slots)",
                &[],
            )
            .await
            .map_err(q("count replication slots"))?;
        let (max, used): (i64, i64) = (row.get(0), row.get(1));
        if used >= max {
            return Err(SourceError::NoFreeSlot { max, used });
        }
        Ok(())
    }

    /// Tables whose updates and deletes cannot be replicated: no primary key and REPLICA
    /// IDENTITY DEFAULT, or REPLICA IDENTITY NOTHING. Returns (table, fix statement).
    pub async fn unreplicable_tables(&self) -> Result<Vec<(String, String)>, SourceError> {
        let rows = self
            .client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p'
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                    AND n.nspname NOT LIKE 'pg\\_%'
                    AND (c.relreplident = 'n'
                         OR (c.relreplident = 'd' AND NOT EXISTS (
                               SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
                  ORDER BY 1",
                &[],
            )
            .await
            .map_err(q("find tables without a replica identity"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let t: String = r.get(0);
                let fix = format!("ALTER TABLE {t} REPLICA IDENTITY FULL;");
                (t, fix)
            })
            .collect())
    }

    /// What the database uses that the archive will not carry, each with what a restore does
    /// about it. `publication` is the publication the archive reads (tables outside it are
    /// reported). Empty when everything is covered.
    pub async fn not_covered(&self, publication: &str) -> Result<Vec<NotCovered>, SourceError> {
        let mut out = Vec::new();
        for check in NOT_COVERED_CHECKS {
            let sql = format!(
                "SELECT x, count(*) OVER ()::int8 FROM ({}) q(x) LIMIT {SHOWN_NAMES}",
                check.query
            );
            let rows = self
                .client
                .query(&sql, &[&publication])
                .await
                .map_err(q(check.what))?;
            if let Some(first) = rows.first() {
                out.push(NotCovered {
                    kind: check.kind,
                    count: first.get(1),
                    names: rows.iter().map(|r| r.get(0)).collect(),
                    at_restore: check.at_restore,
                });
            }
        }
        Ok(out)
    }
}

/// Something the database uses that the archive does not carry (see [`Source::not_covered`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotCovered {
    /// What it is, plural: "unlogged tables".
    pub kind: &'static str,
    /// How many there are.
    pub count: i64,
    /// The first [`SHOWN_NAMES`] of them (qualified, quoted where needed).
    pub names: Vec<String>,
    /// What a restore does about them.
    pub at_restore: &'static str,
}

impl std::fmt::Display for NotCovered {
    /// `unlogged tables (2): public.a, public.b` then an indented `at restore: …` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind,
            self.count,
            self.names.join(", ")
        )?;
        let more = self.count - self.names.len() as i64;
        if more > 0 {
            write!(f, ", and {more} more")?;
        }
        write!(f, "\n    at restore: {}", self.at_restore)
    }
}

/// Names shown per kind of [`NotCovered`] object.
pub const SHOWN_NAMES: usize = 20;

struct NotCoveredCheck {
    kind: &'static str,
    what: &'static str,
    /// Takes the publication name as $1 (unused by most); returns one text column.
    query: &'static str,
    at_restore: &'static str,
}

/// User schemas: not the catalogs, not TOAST or temporary schemas.
macro_rules! user_ns {
    ($n:literal) => {
        concat!(
            $n,
            ".nspname NOT IN ('pg_catalog', 'information_schema') AND ",
            $n,
            ".nspname !~ '^pg_(toast|temp)' AND $1::text IS NOT NULL"
        )
    };
}

const NOT_COVERED_CHECKS: &[NotCoveredCheck] = &[
    NotCoveredCheck {
        kind: "large objects",
        what: "find large objects",
        query: "SELECT oid::text FROM pg_largeobject_metadata
                 WHERE $1::text IS NOT NULL ORDER BY oid",
        at_restore: "absent: logical decoding does not carry pg_largeobject, and the base backup \
                     holds no large objects; columns holding their OIDs point to nothing",
    },
    NotCoveredCheck {
        kind: "unlogged tables",
        what: "find unlogged tables",
        query: concat!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' AND ",
            user_ns!("n"),
            " ORDER BY 1"
        ),
        at_restore: "created empty: their changes are not in the WAL, so neither their rows \
                     nor their changes are archived",
    },
    NotCoveredCheck {
        kind: "foreign tables",
        what: "find foreign tables",
        query: concat!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'f' AND ",
            user_ns!("n"),
            " ORDER BY 1"
        ),
        at_restore: "defined again, pointing at the same foreign server; their data lives \
                     there and is not archived",
    },
    NotCoveredCheck {
        kind: "materialized views",
        what: "find materialized views",
        query: concat!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'm' AND ",
            user_ns!("n"),
            " ORDER BY 1"
        ),
        at_restore: "defined again but not populated (their contents are not archived): run \
                     REFRESH MATERIALIZED VIEW on each after the restore",
    },
    NotCoveredCheck {
        kind: "tables outside the publication",
        what: "find tables outside the publication",
        // Permanent tables, partitions counted through their leaves: a table is covered when
        // it, or (for a partition) one of its ancestors, is published.
        query: concat!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND ",
            user_ns!("n"),
            " AND NOT EXISTS (
                    SELECT 1 FROM pg_publication_tables pt
                      JOIN pg_namespace pn ON pn.nspname = pt.schemaname
                      JOIN pg_class pc ON pc.relnamespace = pn.oid AND pc.relname = pt.tablename
                     WHERE pt.pubname = $1
                       AND (pc.oid = c.oid OR pc.oid IN (SELECT pg_partition_ancestors(c.oid))))
                AND EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)
              ORDER BY 1"
        ),
        at_restore: "created empty: only the publication's tables are backed up and archived",
    },
    NotCoveredCheck {
        kind: "sequences not owned by a column",
        what: "find sequences not owned by a column",
        query: concat!(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'S' AND ",
            user_ns!("n"),
            " AND NOT EXISTS (SELECT 1 FROM pg_depend d
                               WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                 AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i'))
              ORDER BY 1"
        ),
        at_restore: "set to their value at the base backup (sequences are not carried by \
                     logical decoding), then past the largest value of any column whose default \
                     uses them; nextval() calls since the base backup are otherwise lost",
    },
    NotCoveredCheck {
        kind: "event triggers",
        what: "find event triggers",
        query: "SELECT quote_ident(evtname) FROM pg_event_trigger
                 WHERE evtname !~ '^tidemark' AND $1::text IS NOT NULL ORDER BY 1",
        at_restore: "recreated from the base backup's schema; schema changes after the base \
                     backup are not replayed, only the row changes they cause in published tables",
    },
    NotCoveredCheck {
        kind: "subscriptions",
        what: "find subscriptions",
        query: "SELECT quote_ident(subname) FROM pg_subscription
                 WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND $1::text IS NOT NULL ORDER BY 1",
        at_restore: "not recreated; the rows they replicated into published tables are \
                     restored as ordinary data",
    },
];
