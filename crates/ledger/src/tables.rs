//! A few tables in SQLite (the embedded default) or PostgreSQL (scale-out),
//! behind one small interface: statements are written once, in
//! PostgreSQL's `$n` spelling, with values that are integers, text or
//! null. What billing keeps goes through it.

use std::cell::RefCell;
use std::path::Path;

/// A value in or out of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Int(i64),
    Text(String),
    Null,
}

impl Val {
    pub fn int(&self) -> i64 {
        match self {
            Val::Int(n) => *n,
            _ => 0,
        }
    }

    pub fn text(&self) -> String {
        match self {
            Val::Text(s) => s.clone(),
            _ => String::new(),
        }
    }

    pub fn opt_text(&self) -> Option<String> {
        match self {
            Val::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl From<i64> for Val {
    fn from(n: i64) -> Val {
        Val::Int(n)
    }
}

impl From<u64> for Val {
    fn from(n: u64) -> Val {
        Val::Int(n as i64)
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.to_string())
    }
}

impl From<&String> for Val {
    fn from(s: &String) -> Val {
        Val::Text(s.clone())
    }
}

impl From<&Option<String>> for Val {
    fn from(s: &Option<String>) -> Val {
        s.as_ref().map_or(Val::Null, |s| Val::Text(s.clone()))
    }
}

/// Failures of either database, as text (the caller says which store).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TableError(pub String);

impl From<rusqlite::Error> for TableError {
    fn from(e: rusqlite::Error) -> TableError {
        TableError(e.to_string())
    }
}

impl From<postgres::Error> for TableError {
    fn from(e: postgres::Error) -> TableError {
        TableError(e.to_string())
    }
}

/// One connection to one of the two.
pub enum Tables {
    Sqlite(rusqlite::Connection),
    /// A cell: the client needs `&mut`, readers hold `&self` (a `Tables`
    /// is owned by one thread at a time, behind its owner's lock).
    Postgres(RefCell<postgres::Client>),
}

impl Tables {
    /// The SQLite file at `path`, in WAL mode and durable at every commit,
    /// with `schema` made.
    pub fn sqlite(path: &Path, schema: &str) -> Result<Tables, TableError> {
        let conn = rusqlite::Connection::open(path)?;
        // Processes share the file (the API, the CLI): wait for each other.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(schema)?;
        Ok(Tables::Sqlite(conn))
    }

    /// PostgreSQL at `url`, its tables in `namespace` (made with `schema`
    /// if they are not there).
    pub fn postgres(url: &str, namespace: &str, schema: &str) -> Result<Tables, TableError> {
        if !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(TableError(format!("invalid schema name {namespace:?}")));
        }
        let client = commons_blocking::outside_async(|| {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            client.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {namespace}; SET search_path TO {namespace}; {schema}"
            ))?;
            Ok::<_, postgres::Error>(client)
        })?;
        Ok(Tables::Postgres(RefCell::new(client)))
    }

    /// Runs a statement; how many rows it changed.
    pub fn execute(&self, sql: &str, params: &[Val]) -> Result<u64, TableError> {
        match self {
            Tables::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_spelling(sql))?;
                Ok(
                    stmt.execute(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?
                        as u64,
                )
            }
            Tables::Postgres(c) => {
                let values = pg_values(params);
                let mut client = c.borrow_mut();
                let client: &mut postgres::Client = &mut client;
                // The client blocks: off any async runtime's thread.
                Ok(commons_blocking::outside_async(move || {
                    client.execute(sql, &pg_refs(&values))
                })?)
            }
        }
    }

    /// The rows a query answers, each its columns' values.
    pub fn query(&self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, TableError> {
        match self {
            Tables::Sqlite(c) => {
                let mut stmt = c.prepare_cached(&sqlite_spelling(sql))?;
                let columns = stmt.column_count();
                let rows = stmt
                    .query_map(
                        rusqlite::params_from_iter(params.iter().map(sqlite_value)),
                        |r| {
                            (0..columns)
                                .map(|i| {
                                    Ok(match r.get_ref(i)? {
                                        rusqlite::types::ValueRef::Integer(n) => Val::Int(n),
                                        rusqlite::types::ValueRef::Real(x) => Val::Int(x as i64),
                                        rusqlite::types::ValueRef::Text(t) => {
                                            Val::Text(String::from_utf8_lossy(t).into_owned())
                                        }
                                        rusqlite::types::ValueRef::Blob(b) => {
                                            Val::Text(String::from_utf8_lossy(b).into_owned())
                                        }
                                        rusqlite::types::ValueRef::Null => Val::Null,
                                    })
                                })
                                .collect::<rusqlite::Result<Vec<Val>>>()
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            }
            Tables::Postgres(c) => {
                let values = pg_values(params);
                let mut client = c.borrow_mut();
                let client: &mut postgres::Client = &mut client;
                let rows =
                    commons_blocking::outside_async(move || client.query(sql, &pg_refs(&values)))?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| {
                                use postgres::types::Type;
                                let t = r.columns()[i].type_().clone();
                                if t == Type::INT8 {
                                    r.get::<_, Option<i64>>(i).map_or(Val::Null, Val::Int)
                                } else if t == Type::INT4 {
                                    r.get::<_, Option<i32>>(i)
                                        .map_or(Val::Null, |n| Val::Int(n as i64))
                                } else {
                                    r.get::<_, Option<String>>(i).map_or(Val::Null, Val::Text)
                                }
                            })
                            .collect()
                    })
                    .collect())
            }
        }
    }

    /// The first row a query answers, if any.
    pub fn query_one(&self, sql: &str, params: &[Val]) -> Result<Option<Vec<Val>>, TableError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Tables::Postgres(_))
    }
}

/// SQLite takes `?n` where PostgreSQL takes `$n`, and has no `::text` casts.
pub(crate) fn sqlite_spelling(sql: &str) -> String {
    sql.replace("::text", "").replace('$', "?")
}

fn sqlite_value(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::Int(n) => rusqlite::types::Value::Integer(*n),
        Val::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Val::Null => rusqlite::types::Value::Null,
    }
}

/// PostgreSQL's values: integers as BIGINT, text and null as TEXT.
enum PgVal {
    Int(i64),
    Text(Option<String>),
}

fn pg_values(params: &[Val]) -> Vec<PgVal> {
    params
        .iter()
        .map(|v| match v {
            Val::Int(n) => PgVal::Int(*n),
            Val::Text(s) => PgVal::Text(Some(s.clone())),
            Val::Null => PgVal::Text(None),
        })
        .collect()
}

fn pg_refs(values: &[PgVal]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| match v {
            PgVal::Int(n) => n as &(dyn postgres::types::ToSql + Sync),
            PgVal::Text(s) => s as &(dyn postgres::types::ToSql + Sync),
        })
        .collect()
}
