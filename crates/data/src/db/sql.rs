//! One small SQL surface over the two databases DataCommons runs on:
//! SQLite in the data directory (the embedded default) and PostgreSQL (the
//! scale-out configuration). Queries are written once, with `?N`
//! placeholders and the SQL both dialects share; only the schema and the
//! reclaiming of freed space differ.
//!
//! The PostgreSQL client is synchronous and runs its own runtime, so it
//! lives on a thread of its own and is handed one statement at a time:
//! callers may be on an async runtime's threads, where blocking on another
//! runtime is not allowed. Transactions are `BEGIN` … `COMMIT` on that one
//! connection; the service serialises its writers, so no two interleave.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::Mutex;

use rusqlite::types::{ToSqlOutput, ValueRef};

/// A database failure. Not the caller's fault: it carries the cause for
/// the operator.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("column {column} holds {found}, not {wanted}")]
    Type {
        column: usize,
        found: &'static str,
        wanted: &'static str,
    },
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// A statement parameter, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Param<'_> {
    fn from(v: i64) -> Self {
        Param::Int(v)
    }
}

impl From<bool> for Param<'_> {
    fn from(v: bool) -> Self {
        Param::Int(v as i64)
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(v: &'a str) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(v: &'a String) -> Self {
        Param::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Param<'a> {
    fn from(v: &'a [u8]) -> Self {
        Param::Blob(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Param::Blob(v)
    }
}

impl<'a, T: Into<Param<'a>>> From<Option<T>> for Param<'a> {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Param::Null)
    }
}

/// `params![a, b, c]` as a slice of [`Param`].
macro_rules! params {
    ($($p:expr),* $(,)?) => { &[$($crate::db::sql::Param::from($p)),*] };
}
pub(crate) use params;

/// A column value, owned.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }

    fn of(p: &Param<'_>) -> Value {
        match *p {
            Param::Null => Value::Null,
            Param::Int(i) => Value::Int(i),
            Param::Text(s) => Value::Text(s.to_owned()),
            Param::Blob(b) => Value::Blob(b.to_vec()),
        }
    }
}

/// One result row; columns are taken out by position.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn take(&mut self, i: usize) -> Value {
        self.0
            .get_mut(i)
            .map(|v| std::mem::replace(v, Value::Null))
            .unwrap_or(Value::Null)
    }

    fn wrong(i: usize, found: &Value, wanted: &'static str) -> DbError {
        DbError::Type {
            column: i,
            found: found.kind(),
            wanted,
        }
    }

    pub fn int(&mut self, i: usize) -> Result<i64> {
        match self.take(i) {
            Value::Int(v) => Ok(v),
            other => Err(Self::wrong(i, &other, "an integer")),
        }
    }

    pub fn opt_int(&mut self, i: usize) -> Result<Option<i64>> {
        match self.take(i) {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(v)),
            other => Err(Self::wrong(i, &other, "an integer")),
        }
    }

    pub fn text(&mut self, i: usize) -> Result<String> {
        match self.take(i) {
            Value::Text(v) => Ok(v),
            other => Err(Self::wrong(i, &other, "text")),
        }
    }

    pub fn opt_text(&mut self, i: usize) -> Result<Option<String>> {
        match self.take(i) {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v)),
            other => Err(Self::wrong(i, &other, "text")),
        }
    }

    pub fn blob(&mut self, i: usize) -> Result<Vec<u8>> {
        match self.take(i) {
            Value::Blob(v) => Ok(v),
            other => Err(Self::wrong(i, &other, "bytes")),
        }
    }

    pub fn opt_blob(&mut self, i: usize) -> Result<Option<Vec<u8>>> {
        match self.take(i) {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v)),
            other => Err(Self::wrong(i, &other, "bytes")),
        }
    }
}

/// What the queries need of a connection or a transaction.
pub trait Sql {
    /// Runs one statement; how many rows it changed.
    fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64>;
    /// Runs one query; every row.
    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>>;
    /// Runs statements without parameters or results.
    fn batch(&mut self, sql: &str) -> Result<()>;
    /// Which database this is.
    fn dialect(&self) -> Dialect;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// An open database.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Pg),
}

impl Db {
    /// Starts a transaction: committed by [`Tx::commit`], rolled back if
    /// dropped before.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        self.batch("BEGIN")?;
        Ok(Tx {
            db: self,
            done: false,
        })
    }
}

impl Sql for Db {
    fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        match self {
            Db::Sqlite(conn) => {
                let mut stmt = conn.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(params.iter()))? as u64)
            }
            Db::Postgres(pg) => pg.exec(sql, params),
        }
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        match self {
            Db::Sqlite(conn) => sqlite_query(conn, sql, params),
            Db::Postgres(pg) => pg.query(sql, params),
        }
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        match self {
            Db::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Db::Postgres(pg) => pg.batch(sql),
        }
    }

    fn dialect(&self) -> Dialect {
        match self {
            Db::Sqlite(_) => Dialect::Sqlite,
            Db::Postgres(_) => Dialect::Postgres,
        }
    }
}

/// A transaction on a [`Db`].
pub struct Tx<'a> {
    db: &'a mut Db,
    done: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> Result<()> {
        self.db.batch("COMMIT")?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            // The connection is unusable for the next caller otherwise; a
            // failure here leaves nothing more to undo.
            let _ = self.db.batch("ROLLBACK");
        }
    }
}

impl Sql for Tx<'_> {
    fn exec(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        self.db.exec(sql, params)
    }

    fn query(&mut self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        self.db.query(sql, params)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.db.batch(sql)
    }

    fn dialect(&self) -> Dialect {
        self.db.dialect()
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Param::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Param::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(i)),
            Param::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Param::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

fn sqlite_query(conn: &rusqlite::Connection, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(v) => Value::Int(v),
                ValueRef::Real(v) => Value::Int(v as i64),
                ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            });
        }
        out.push(Row(values));
    }
    Ok(out)
}

type Job = Box<dyn FnOnce(&mut PgConn) + Send>;

struct PgConn {
    client: ::postgres::Client,
    statements: HashMap<String, ::postgres::Statement>,
}

/// A PostgreSQL connection on its own thread.
pub struct Pg {
    jobs: Mutex<mpsc::Sender<Job>>,
}

fn pg_error(e: ::postgres::Error) -> DbError {
    DbError::Postgres(
        e.as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| e.to_string()),
    )
}

/// `?N` placeholders as PostgreSQL's `$N`.
fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

impl Pg {
    /// Connects (a URL or `host=... user=... dbname=...`), creates
    /// `schema` if needed and runs `setup` in it.
    pub fn connect(url: &str, schema: &str, setup: &'static str) -> Result<Pg> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(DbError::Postgres(format!(
                "invalid schema name {schema:?}: use letters, digits and _"
            )));
        }
        let (url, schema) = (url.to_owned(), schema.to_owned());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (jobs, queue) = mpsc::channel::<Job>();
        ::std::thread::Builder::new()
            .name("commons-data-pg".into())
            .spawn(move || {
                let connected =
                    ::postgres::Client::connect(&url, ::postgres::NoTls).and_then(|mut c| {
                        c.batch_execute(&format!(
                        "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}; {setup}"
                    ))
                        .map(|_| c)
                    });
                let client = match connected {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(pg_error(e)));
                        return;
                    }
                };
                let mut conn = PgConn {
                    client,
                    statements: HashMap::new(),
                };
                // Runs until the database is dropped (the sender closes).
                for job in queue {
                    job(&mut conn);
                }
            })
            .map_err(|e| DbError::Postgres(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| DbError::Postgres("the connection thread stopped".into()))??;
        Ok(Pg {
            jobs: Mutex::new(jobs),
        })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut PgConn) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| DbError::Postgres("the connection thread stopped".into()))?;
        rx.recv()
            .map_err(|_| DbError::Postgres("the connection thread stopped".into()))?
    }

    fn exec(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        let sql = sql.to_owned();
        let values: Vec<Value> = params.iter().map(Value::of).collect();
        self.run(move |c| {
            let stmt = c.prepared(&sql)?;
            let refs: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                values.iter().map(|v| v as _).collect();
            c.client.execute(&stmt, &refs).map_err(pg_error)
        })
    }

    fn query(&self, sql: &str, params: &[Param<'_>]) -> Result<Vec<Row>> {
        let sql = sql.to_owned();
        let values: Vec<Value> = params.iter().map(Value::of).collect();
        self.run(move |c| {
            let stmt = c.prepared(&sql)?;
            let refs: Vec<&(dyn ::postgres::types::ToSql + Sync)> =
                values.iter().map(|v| v as _).collect();
            let rows = c.client.query(&stmt, &refs).map_err(pg_error)?;
            rows.iter().map(pg_row).collect()
        })
    }

    fn batch(&self, sql: &str) -> Result<()> {
        let sql = sql.to_owned();
        self.run(move |c| c.client.batch_execute(&sql).map_err(pg_error))
    }
}

impl PgConn {
    fn prepared(&mut self, sql: &str) -> Result<::postgres::Statement> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self
            .client
            .prepare(&pg_placeholders(sql))
            .map_err(pg_error)?;
        self.statements.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }
}

fn pg_row(r: &::postgres::Row) -> Result<Row> {
    use ::postgres::types::Type;
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i).map(|v| v.map(Value::Int))
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)
                .map(|v| v.map(|v| Value::Int(v.into())))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)
                .map(|v| v.map(Value::Blob))
        } else {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map(Value::Text))
        };
        values.push(value.map_err(pg_error)?.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ::postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &::postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<::postgres::types::IsNull, Box<dyn ::std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(::postgres::types::IsNull::Yes),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &::postgres::types::Type) -> bool {
        true
    }

    ::postgres::types::to_sql_checked!();
}
