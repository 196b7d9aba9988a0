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
    Unreachable { target: String, detail: String },
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
    #[error("query on the source failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl From<ConnInfoError> for SourceError {
    fn from(e: ConnInfoError) -> SourceError {
        match e {
            ConnInfoError::Connect { target, source } => SourceError::Unreachable {
                target,
                detail: error_chain(&source),
            },
            other => SourceError::Unreachable {
                target: String::new(),
                detail: other.to_string(),
            },
        }
    }
}

/// The full text of an error and its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
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

    /// What the database uses that logical decoding does not carry.
    pub async fn not_covered(&self) -> Result<Vec<String>, SourceError> {
        let mut out = Vec::new();
        let rows = self
            .client
            .query(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' ORDER BY 1",
                &[],
            )
            .await
            .map_err(q("find unlogged tables"))?;
        for r in rows {
            out.push(format!(
                "unlogged table {} (its changes are not in the WAL, so they are not archived)",
                r.get::<_, String>(0)
            ));
        }
        let lo: i64 = self
            .client
            .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
            .await
            .map_err(q("count large objects"))?
            .get(0);
        if lo > 0 {
            out.push(format!(
                "{lo} large object(s) (pg_largeobject is not replicated by logical decoding)"
            ));
        }
        Ok(out)
    }
}
