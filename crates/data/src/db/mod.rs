//! DataCommons' tables, on SQLite (the embedded default) or PostgreSQL.
//!
//! Everything about a user is keyed by its owner, so erasing them is a set
//! of deletes. Tree nodes are not stored: a repository's tree is rebuilt
//! from its records on load and checked against the signed head commit,
//! so a write touches a few append-friendly rows rather than a node per
//! tree level. SQLite runs with `secure_delete` (freed pages are zeroed)
//! and erase truncates the WAL; on PostgreSQL erase rewrites the accounts
//! table (where the wrapped keys live) and vacuums the rest, so erased
//! bytes do not linger in either.

pub mod sql;

use std::path::Path;

use sql::{params, Result, Row};
pub use sql::{Db, DbError, Dialect, Sql, Tx};

use crate::model::Cid;

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    owner TEXT PRIMARY KEY,
    did TEXT NOT NULL UNIQUE,
    algorithm TEXT NOT NULL,
    signing_key BLOB,          -- sealed by the platform key; NULL once erased
    data_key BLOB,             -- sealed by the platform key; NULL once erased
    head BLOB,                 -- the head commit's CID
    head_block BLOB,           -- ... and its bytes
    rev TEXT,
    created_ms INTEGER NOT NULL,
    erased_ms INTEGER
);
CREATE TABLE IF NOT EXISTS records (
    owner TEXT NOT NULL,
    collection TEXT NOT NULL,
    rkey TEXT NOT NULL,
    cid BLOB NOT NULL,
    block BLOB NOT NULL,       -- the record's block (sealed for encrypted classes)
    sealed_by TEXT,            -- whose data key seals it, when not the owner's (a fork's copy)
    app TEXT NOT NULL,         -- provenance: the deployment that wrote it
    revision TEXT NOT NULL,    -- ... its blueprint revision
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, collection, rkey)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS record_index (
    owner TEXT NOT NULL,
    collection TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,       -- plaintext for public records, a blind hash otherwise
    rkey TEXT NOT NULL,
    PRIMARY KEY (owner, collection, field, value, rkey)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collections (
    nsid TEXT PRIMARY KEY,
    class TEXT NOT NULL,
    licence TEXT,
    schema TEXT NOT NULL,
    indexed TEXT NOT NULL      -- JSON list of field names
);
CREATE TABLE IF NOT EXISTS app_collections (
    app TEXT NOT NULL,
    revision TEXT NOT NULL,
    nsid TEXT NOT NULL,
    read INTEGER NOT NULL,
    write INTEGER NOT NULL,
    fields TEXT,               -- JSON list a private collection releases; NULL = the schema's
    purpose TEXT NOT NULL,
    PRIMARY KEY (app, nsid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grants (
    owner TEXT NOT NULL,
    grantee TEXT NOT NULL,     -- app:NAME or user:ID
    collection TEXT NOT NULL,
    action TEXT NOT NULL,      -- read or write
    granted_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, grantee, collection, action)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS access_log (
    owner TEXT NOT NULL,
    app TEXT NOT NULL,
    collection TEXT NOT NULL,
    action TEXT NOT NULL,
    day INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, app, collection, action, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    owner TEXT NOT NULL,
    cid BLOB NOT NULL,         -- raw codec: of the bytes as stored (sealed for encrypted classes)
    collection TEXT NOT NULL,  -- whose class and grants govern it
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,     -- of the plaintext
    bytes BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (owner, cid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS forks (
    fork_user TEXT NOT NULL,
    source TEXT NOT NULL,
    base TEXT NOT NULL,        -- JSON: path -> record CID at the fork point (or the last merge)
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (fork_user, source)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    body BLOB NOT NULL         -- the event as JSON
);
CREATE INDEX IF NOT EXISTS events_by_owner ON events (owner);
CREATE TABLE IF NOT EXISTS key_check (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    sealed BLOB NOT NULL       -- a known text sealed with the platform key
);
";

/// The same tables on PostgreSQL (see [`SQLITE_SCHEMA`] for what each
/// column holds); keys sort by bytes, as in SQLite.
const POSTGRES_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS accounts (
    owner TEXT PRIMARY KEY, did TEXT NOT NULL UNIQUE, algorithm TEXT NOT NULL,
    signing_key BYTEA, data_key BYTEA, head BYTEA, head_block BYTEA, rev TEXT,
    created_ms BIGINT NOT NULL, erased_ms BIGINT);
CREATE TABLE IF NOT EXISTS records (
    owner TEXT NOT NULL, collection TEXT COLLATE "C" NOT NULL, rkey TEXT COLLATE "C" NOT NULL, cid BYTEA NOT NULL,
    block BYTEA NOT NULL, sealed_by TEXT, app TEXT NOT NULL, revision TEXT NOT NULL,
    created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, collection, rkey));
CREATE TABLE IF NOT EXISTS record_index (
    owner TEXT NOT NULL, collection TEXT COLLATE "C" NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL,
    rkey TEXT COLLATE "C" NOT NULL, PRIMARY KEY (owner, collection, field, value, rkey));
CREATE TABLE IF NOT EXISTS collections (
    nsid TEXT PRIMARY KEY, class TEXT NOT NULL, licence TEXT, schema TEXT NOT NULL,
    indexed TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS app_collections (
    app TEXT NOT NULL, revision TEXT NOT NULL, nsid TEXT NOT NULL, read BIGINT NOT NULL,
    write BIGINT NOT NULL, fields TEXT, purpose TEXT NOT NULL, PRIMARY KEY (app, nsid));
CREATE TABLE IF NOT EXISTS grants (
    owner TEXT NOT NULL, grantee TEXT NOT NULL, collection TEXT NOT NULL, action TEXT NOT NULL,
    granted_ms BIGINT NOT NULL, PRIMARY KEY (owner, grantee, collection, action));
CREATE TABLE IF NOT EXISTS access_log (
    owner TEXT NOT NULL, app TEXT NOT NULL, collection TEXT NOT NULL, action TEXT NOT NULL,
    day BIGINT NOT NULL, count BIGINT NOT NULL, bytes BIGINT NOT NULL, last_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, app, collection, action, day));
CREATE TABLE IF NOT EXISTS blobs (
    owner TEXT NOT NULL, cid BYTEA NOT NULL, collection TEXT NOT NULL, mime TEXT NOT NULL,
    size BIGINT NOT NULL, bytes BYTEA NOT NULL, created_ms BIGINT NOT NULL,
    PRIMARY KEY (owner, cid));
CREATE TABLE IF NOT EXISTS forks (
    fork_user TEXT NOT NULL, source TEXT NOT NULL, base TEXT NOT NULL, created_ms BIGINT NOT NULL,
    PRIMARY KEY (fork_user, source));
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT PRIMARY KEY, owner TEXT NOT NULL, time_ms BIGINT NOT NULL, body BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_owner ON events (owner);
CREATE TABLE IF NOT EXISTS key_check (id INTEGER PRIMARY KEY CHECK (id = 1), sealed BYTEA NOT NULL);
"#;

/// Where DataCommons keeps its tables.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Backend {
    /// `data.db` in the data directory.
    #[default]
    Embedded,
    /// A PostgreSQL server (a libpq connection string, which may hold a
    /// password), in a schema of its own.
    Postgres { url: String, schema: String },
}

// The URL may carry a password: it never reaches a log.
impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Embedded => f.write_str("Embedded"),
            Backend::Postgres { schema, .. } => {
                write!(f, "Postgres {{ url: <redacted>, schema: {schema:?} }}")
            }
        }
    }
}

/// Opens (creating) the database: `data.db` in `dir` or the server.
pub fn open(backend: &Backend, dir: &Path) -> Result<Db> {
    match backend {
        Backend::Embedded => open_sqlite(&dir.join("data.db")),
        Backend::Postgres { url, schema } => Ok(Db::Postgres(sql::Pg::connect(
            url,
            schema,
            POSTGRES_SCHEMA,
        )?)),
    }
}

fn open_sqlite(path: &Path) -> Result<Db> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    // A 64 MiB page cache and fewer, larger checkpoints: a write touches a
    // handful of B-tree pages, and rereading or re-checkpointing them per
    // commit dominated the cost of a write.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    rename_user_columns(&conn)?;
    conn.execute_batch(SQLITE_SCHEMA)?;
    Ok(Db::Sqlite(conn))
}

/// Data directories made before the tables were shared with PostgreSQL
/// (where `user` is a reserved word) name the owner column `user`.
fn rename_user_columns(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    for table in [
        "accounts",
        "records",
        "record_index",
        "grants",
        "access_log",
        "blobs",
        "events",
    ] {
        let old: i64 = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = 'user'",
            [table],
            |r| r.get(0),
        )?;
        if old > 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} RENAME COLUMN user TO owner"))?;
        }
    }
    Ok(())
}

/// A user's account row.
#[derive(Debug, Clone)]
pub struct AccountRow {
    pub did: String,
    pub algorithm: String,
    pub signing_key: Option<Vec<u8>>,
    pub data_key: Option<Vec<u8>>,
    pub head: Option<Cid>,
    pub erased_ms: Option<i64>,
}

fn cid_column(bytes: Option<Vec<u8>>) -> Option<Cid> {
    bytes.and_then(|b| Cid::try_from(b.as_slice()).ok())
}

pub fn account(db: &mut impl Sql, user: &str) -> Result<Option<AccountRow>> {
    let Some(mut r) = db.query_opt(
        "SELECT did, algorithm, signing_key, data_key, head, erased_ms FROM accounts WHERE owner = ?1",
        params![user],
    )?
    else {
        return Ok(None);
    };
    Ok(Some(AccountRow {
        did: r.text(0)?,
        algorithm: r.text(1)?,
        signing_key: r.opt_blob(2)?,
        data_key: r.opt_blob(3)?,
        head: cid_column(r.opt_blob(4)?),
        erased_ms: r.opt_int(5)?,
    }))
}

pub fn insert_account(db: &mut impl Sql, user: &str, row: &AccountRow, now_ms: i64) -> Result<()> {
    db.exec(
        "INSERT INTO accounts (owner, did, algorithm, signing_key, data_key, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![user, &row.did, &row.algorithm, row.signing_key.as_ref(), row.data_key.as_ref(), now_ms],
    )?;
    Ok(())
}

pub fn set_head(db: &mut impl Sql, user: &str, head: &Cid, block: &[u8], rev: &str) -> Result<()> {
    let head = head.to_bytes();
    db.exec(
        "UPDATE accounts SET head = ?2, head_block = ?3, rev = ?4 WHERE owner = ?1",
        params![user, &head, block, rev],
    )?;
    Ok(())
}

pub fn head_block(db: &mut impl Sql, user: &str) -> Result<Option<Vec<u8>>> {
    match db.query_opt(
        "SELECT head_block FROM accounts WHERE owner = ?1",
        params![user],
    )? {
        Some(mut r) => r.opt_blob(0),
        None => Ok(None),
    }
}

/// Every (path, record CID) of a user's repository, in key order.
pub fn record_entries(db: &mut impl Sql, user: &str) -> Result<Vec<(String, Cid)>> {
    let mut out = Vec::new();
    for mut r in db.query(
        "SELECT collection, rkey, cid FROM records WHERE owner = ?1",
        params![user],
    )? {
        let path = format!("{}/{}", r.text(0)?, r.text(1)?);
        if let Ok(cid) = Cid::try_from(r.blob(2)?.as_slice()) {
            out.push((path, cid));
        }
    }
    out.sort();
    Ok(out)
}

/// Every record block of a user's repository.
pub fn record_blocks(db: &mut impl Sql, user: &str) -> Result<Vec<(Cid, Vec<u8>)>> {
    let mut out = Vec::new();
    for mut r in db.query(
        "SELECT cid, block FROM records WHERE owner = ?1",
        params![user],
    )? {
        if let Ok(cid) = Cid::try_from(r.blob(0)?.as_slice()) {
            out.push((cid, r.blob(1)?));
        }
    }
    Ok(out)
}

/// Provenance of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    pub collection: String,
    pub rkey: String,
    pub app: String,
    pub revision: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Whose data key seals it, when not the owner's.
    pub sealed_by: Option<String>,
}

#[allow(clippy::too_many_arguments)]
pub fn upsert_record(
    db: &mut impl Sql,
    user: &str,
    collection: &str,
    rkey: &str,
    (cid, block, sealed_by): (&Cid, &[u8], Option<&str>),
    app: &str,
    revision: &str,
    now_ms: i64,
) -> Result<()> {
    let cid = cid.to_bytes();
    db.exec(
        "INSERT INTO records (owner, collection, rkey, cid, block, sealed_by, app, revision, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
         ON CONFLICT (owner, collection, rkey) DO UPDATE SET
            cid = excluded.cid, block = excluded.block, sealed_by = excluded.sealed_by,
            app = excluded.app, revision = excluded.revision, updated_ms = excluded.updated_ms",
        params![user, collection, rkey, &cid, block, sealed_by, app, revision, now_ms],
    )?;
    Ok(())
}

pub fn delete_record(db: &mut impl Sql, user: &str, collection: &str, rkey: &str) -> Result<()> {
    db.exec(
        "DELETE FROM records WHERE owner = ?1 AND collection = ?2 AND rkey = ?3",
        params![user, collection, rkey],
    )?;
    unindex(db, user, collection, rkey)
}

/// One record's provenance, CID and block.
#[allow(clippy::type_complexity)]
pub fn record(
    db: &mut impl Sql,
    user: &str,
    collection: &str,
    rkey: &str,
) -> Result<Option<(RecordRow, Vec<u8>, Vec<u8>)>> {
    let Some(mut r) = db.query_opt(
        "SELECT collection, rkey, app, revision, created_ms, updated_ms, sealed_by, cid, block FROM records
         WHERE owner = ?1 AND collection = ?2 AND rkey = ?3",
        params![user, collection, rkey],
    )?
    else {
        return Ok(None);
    };
    Ok(Some((record_row(&mut r)?, r.blob(7)?, r.blob(8)?)))
}

fn record_row(r: &mut Row) -> Result<RecordRow> {
    Ok(RecordRow {
        collection: r.text(0)?,
        rkey: r.text(1)?,
        app: r.text(2)?,
        revision: r.text(3)?,
        created_ms: r.int(4)?,
        updated_ms: r.int(5)?,
        sealed_by: r.opt_text(6)?,
    })
}

pub fn records_of(db: &mut impl Sql, user: &str) -> Result<Vec<RecordRow>> {
    db.query(
        "SELECT collection, rkey, app, revision, created_ms, updated_ms, sealed_by FROM records
         WHERE owner = ?1 ORDER BY collection, rkey",
        params![user],
    )?
    .iter_mut()
    .map(record_row)
    .collect()
}

pub fn index_value(
    db: &mut impl Sql,
    user: &str,
    collection: &str,
    field: &str,
    value: &str,
    rkey: &str,
) -> Result<()> {
    db.exec(
        "INSERT INTO record_index (owner, collection, field, value, rkey) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO NOTHING",
        params![user, collection, field, value, rkey],
    )?;
    Ok(())
}

pub fn unindex(db: &mut impl Sql, user: &str, collection: &str, rkey: &str) -> Result<()> {
    db.exec(
        "DELETE FROM record_index WHERE owner = ?1 AND collection = ?2 AND rkey = ?3",
        params![user, collection, rkey],
    )?;
    Ok(())
}

pub fn lookup(
    db: &mut impl Sql,
    user: &str,
    collection: &str,
    field: &str,
    value: &str,
    limit: usize,
) -> Result<Vec<String>> {
    db.query(
        "SELECT rkey FROM record_index WHERE owner = ?1 AND collection = ?2 AND field = ?3 AND value = ?4
         ORDER BY rkey LIMIT ?5",
        params![user, collection, field, value, limit as i64],
    )?
    .iter_mut()
    .map(|r| r.text(0))
    .collect()
}

pub fn grant(
    db: &mut impl Sql,
    user: &str,
    grantee: &str,
    collection: &str,
    action: &str,
    now_ms: i64,
) -> Result<()> {
    db.exec(
        "INSERT INTO grants (owner, grantee, collection, action, granted_ms) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO NOTHING",
        params![user, grantee, collection, action, now_ms],
    )?;
    Ok(())
}

pub fn revoke(
    db: &mut impl Sql,
    user: &str,
    grantee: &str,
    collection: &str,
    action: &str,
) -> Result<bool> {
    Ok(db.exec(
        "DELETE FROM grants WHERE owner = ?1 AND grantee = ?2 AND collection = ?3 AND action = ?4",
        params![user, grantee, collection, action],
    )? > 0)
}

/// (user, grantee, collection, action, granted_ms)
pub type GrantRow = (String, String, String, String, i64);

pub fn all_grants(db: &mut impl Sql) -> Result<Vec<GrantRow>> {
    db.query(
        "SELECT owner, grantee, collection, action, granted_ms FROM grants",
        &[],
    )?
    .iter_mut()
    .map(|r| Ok((r.text(0)?, r.text(1)?, r.text(2)?, r.text(3)?, r.int(4)?)))
    .collect()
}

pub fn log_access(
    db: &mut impl Sql,
    (user, app, collection, action): (&str, &str, &str, &str),
    count: i64,
    bytes: i64,
    now_ms: i64,
) -> Result<()> {
    db.exec(
        "INSERT INTO access_log (owner, app, collection, action, day, count, bytes, last_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (owner, app, collection, action, day) DO UPDATE SET
            count = access_log.count + excluded.count, bytes = access_log.bytes + excluded.bytes,
            last_ms = excluded.last_ms",
        params![
            user,
            app,
            collection,
            action,
            now_ms / 86_400_000,
            count,
            bytes,
            now_ms
        ],
    )?;
    Ok(())
}

/// (app, collection, action, day, count, bytes, last_ms)
pub type AccessRow = (String, String, String, i64, i64, i64, i64);

pub fn access_log(db: &mut impl Sql, user: &str) -> Result<Vec<AccessRow>> {
    db.query(
        "SELECT app, collection, action, day, count, bytes, last_ms FROM access_log WHERE owner = ?1
         ORDER BY day DESC, app, collection, action",
        params![user],
    )?
    .iter_mut()
    .map(|r| {
        Ok((
            r.text(0)?,
            r.text(1)?,
            r.text(2)?,
            r.int(3)?,
            r.int(4)?,
            r.int(5)?,
            r.int(6)?,
        ))
    })
    .collect()
}

/// The sequence number the next event gets (the key is the events' order).
pub fn next_seq(db: &mut impl Sql) -> Result<i64> {
    // Instances sharing PostgreSQL take numbers one at a time: the lock is
    // held until the event's transaction ends, so none reads the same MAX.
    if db.dialect() == Dialect::Postgres {
        db.batch(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ' datacommons feed'))",
        )?;
    }
    match db.query_opt("SELECT COALESCE(MAX(seq), 0) + 1 FROM events", &[])? {
        Some(mut r) => r.int(0),
        None => Ok(1),
    }
}

/// The platform key's check: `sealed` kept by the first to open the
/// database; what is kept is returned either way.
pub fn key_check(db: &mut impl Sql, sealed: &[u8]) -> Result<Vec<u8>> {
    db.exec(
        "INSERT INTO key_check (id, sealed) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
        params![sealed],
    )?;
    match db.query_opt("SELECT sealed FROM key_check WHERE id = 1", &[])? {
        Some(mut r) => r.blob(0),
        None => Ok(sealed.to_vec()),
    }
}

pub fn insert_event(
    db: &mut impl Sql,
    seq: i64,
    user: &str,
    time_ms: i64,
    body: &[u8],
) -> Result<()> {
    db.exec(
        "INSERT INTO events (seq, owner, time_ms, body) VALUES (?1, ?2, ?3, ?4)",
        params![seq, user, time_ms, body],
    )?;
    Ok(())
}

/// Events after `cursor`, oldest first, at most `limit`.
pub fn events_after(db: &mut impl Sql, cursor: i64, limit: usize) -> Result<Vec<(i64, Vec<u8>)>> {
    db.query(
        "SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        params![cursor, limit as i64],
    )?
    .iter_mut()
    .map(|r| Ok((r.int(0)?, r.blob(1)?)))
    .collect()
}

/// Event `seq`: whose it is and its body, if it is retained.
pub fn event(db: &mut impl Sql, seq: i64) -> Result<Option<(String, Vec<u8>)>> {
    match db.query_opt(
        "SELECT owner, body FROM events WHERE seq = ?1",
        params![seq],
    )? {
        Some(mut r) => Ok(Some((r.text(0)?, r.blob(1)?))),
        None => Ok(None),
    }
}

/// Whose event `seq` is.
pub fn event_owner(db: &mut impl Sql, seq: i64) -> Result<Option<String>> {
    match db.query_opt("SELECT owner FROM events WHERE seq = ?1", params![seq])? {
        Some(mut r) => Ok(Some(r.text(0)?)),
        None => Ok(None),
    }
}

/// The oldest and newest sequence numbers retained.
pub fn event_bounds(db: &mut impl Sql) -> Result<(i64, i64)> {
    match db.query_opt(
        "SELECT COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM events",
        &[],
    )? {
        Some(mut r) => Ok((r.int(0)?, r.int(1)?)),
        None => Ok((0, 0)),
    }
}

pub fn prune_events(db: &mut impl Sql, keep_after: i64) -> Result<u64> {
    db.exec("DELETE FROM events WHERE seq <= ?1", params![keep_after])
}

/// Removes everything held about `user` except the erased account's
/// tombstone (its DID and when it was erased).
pub fn erase_user(db: &mut impl Sql, user: &str, now_ms: i64) -> Result<()> {
    db.exec("DELETE FROM records WHERE owner = ?1", params![user])?;
    db.exec("DELETE FROM record_index WHERE owner = ?1", params![user])?;
    db.exec("DELETE FROM grants WHERE owner = ?1", params![user])?;
    db.exec("DELETE FROM access_log WHERE owner = ?1", params![user])?;
    db.exec("DELETE FROM blobs WHERE owner = ?1", params![user])?;
    db.exec(
        "DELETE FROM forks WHERE fork_user = ?1 OR source = ?1",
        params![user],
    )?;
    let as_grantee = format!("user:{user}");
    db.exec(
        "DELETE FROM grants WHERE grantee = ?1",
        params![&as_grantee],
    )?;
    db.exec(
        "UPDATE accounts SET signing_key = NULL, data_key = NULL, head = NULL, head_block = NULL, rev = NULL, erased_ms = ?2 WHERE owner = ?1",
        params![user, now_ms],
    )?;
    Ok(())
}

/// Removes a user's earlier events except `keep` (the erase's own).
pub fn purge_events(db: &mut impl Sql, user: &str, keep: &[i64]) -> Result<()> {
    let seqs = db
        .query("SELECT seq FROM events WHERE owner = ?1", params![user])?
        .iter_mut()
        .map(|r| r.int(0))
        .collect::<Result<Vec<i64>>>()?;
    for seq in seqs.into_iter().filter(|s| !keep.contains(s)) {
        db.exec("DELETE FROM events WHERE seq = ?1", params![seq])?;
    }
    Ok(())
}

pub fn save_collection(
    db: &mut impl Sql,
    nsid: &str,
    class: &str,
    licence: Option<&str>,
    schema: &str,
    indexed: &str,
) -> Result<()> {
    db.exec(
        "INSERT INTO collections (nsid, class, licence, schema, indexed) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (nsid) DO UPDATE SET schema = excluded.schema, indexed = excluded.indexed, licence = excluded.licence",
        params![nsid, class, licence, schema, indexed],
    )?;
    Ok(())
}

/// (nsid, class, licence, schema JSON, indexed JSON)
pub type CollectionRow = (String, String, Option<String>, String, String);

pub fn collections(db: &mut impl Sql) -> Result<Vec<CollectionRow>> {
    db.query(
        "SELECT nsid, class, licence, schema, indexed FROM collections",
        &[],
    )?
    .iter_mut()
    .map(|r| {
        Ok((
            r.text(0)?,
            r.text(1)?,
            r.opt_text(2)?,
            r.text(3)?,
            r.text(4)?,
        ))
    })
    .collect()
}

#[allow(clippy::too_many_arguments)]
pub fn save_app_collection(
    db: &mut impl Sql,
    app: &str,
    revision: &str,
    nsid: &str,
    read: bool,
    write: bool,
    fields: Option<&str>,
    purpose: &str,
) -> Result<()> {
    db.exec(
        "INSERT INTO app_collections (app, revision, nsid, read, write, fields, purpose) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (app, nsid) DO UPDATE SET revision = excluded.revision, read = excluded.read,
            write = excluded.write, fields = excluded.fields, purpose = excluded.purpose",
        params![app, revision, nsid, read, write, fields, purpose],
    )?;
    Ok(())
}

/// (app, revision, nsid, read, write, fields JSON, purpose)
pub type AppCollectionRow = (String, String, String, bool, bool, Option<String>, String);

pub fn app_collections(db: &mut impl Sql) -> Result<Vec<AppCollectionRow>> {
    db.query(
        "SELECT app, revision, nsid, read, write, fields, purpose FROM app_collections",
        &[],
    )?
    .iter_mut()
    .map(|r| {
        Ok((
            r.text(0)?,
            r.text(1)?,
            r.text(2)?,
            r.int(3)? != 0,
            r.int(4)? != 0,
            r.opt_text(5)?,
            r.text(6)?,
        ))
    })
    .collect()
}

/// Leaves no copy of deleted bytes behind. SQLite: moves the WAL into
/// the main file (whose freed pages `secure_delete` zeroed) and truncates
/// it. PostgreSQL: rewrites the accounts table, so the dead row versions
/// holding an erased user's wrapped keys are gone from disk, and vacuums
/// the tables that held their rows.
pub fn reclaim(db: &mut Db) -> Result<()> {
    match db.dialect() {
        Dialect::Sqlite => {
            db.query("PRAGMA wal_checkpoint(TRUNCATE)", &[])?;
            Ok(())
        }
        // One statement each: several in one message would be one
        // transaction, and VACUUM runs outside any.
        Dialect::Postgres => {
            db.batch("VACUUM FULL accounts")?;
            db.batch("VACUUM records, record_index, grants, access_log, blobs, forks, events")
        }
    }
}

/// The forks `user` made or that were made of `user`'s repository:
/// (fork_user, source, created_ms), oldest first.
pub fn forks_of(db: &mut impl Sql, user: &str) -> Result<Vec<(String, String, i64)>> {
    db.query(
        "SELECT fork_user, source, created_ms FROM forks WHERE fork_user = ?1 OR source = ?1
         ORDER BY created_ms, fork_user, source",
        params![user],
    )?
    .iter_mut()
    .map(|r| Ok((r.text(0)?, r.text(1)?, r.int(2)?)))
    .collect()
}

/// Whose repository `did` is (not an erased one's).
pub fn owner_of_did(db: &mut impl Sql, did: &str) -> Result<Option<String>> {
    match db.query_opt(
        "SELECT owner FROM accounts WHERE did = ?1 AND erased_ms IS NULL",
        params![did],
    )? {
        Some(mut r) => Ok(Some(r.text(0)?)),
        None => Ok(None),
    }
}

/// A fork's base: path -> record CID at the fork point (or last merge).
pub fn fork_base(db: &mut impl Sql, fork_user: &str, source: &str) -> Result<Option<String>> {
    match db.query_opt(
        "SELECT base FROM forks WHERE fork_user = ?1 AND source = ?2",
        params![fork_user, source],
    )? {
        Some(mut r) => Ok(Some(r.text(0)?)),
        None => Ok(None),
    }
}

pub fn save_fork(
    db: &mut impl Sql,
    fork_user: &str,
    source: &str,
    base: &str,
    now_ms: i64,
) -> Result<()> {
    db.exec(
        "INSERT INTO forks (fork_user, source, base, created_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (fork_user, source) DO UPDATE SET base = excluded.base",
        params![fork_user, source, base, now_ms],
    )?;
    Ok(())
}

/// A stored blob: (collection, mime, size, bytes as stored).
pub type BlobRow = (String, String, i64, Vec<u8>);

#[allow(clippy::too_many_arguments)]
pub fn put_blob(
    db: &mut impl Sql,
    user: &str,
    cid: &Cid,
    collection: &str,
    mime: &str,
    size: usize,
    bytes: &[u8],
    now_ms: i64,
) -> Result<()> {
    let cid = cid.to_bytes();
    db.exec(
        "INSERT INTO blobs (owner, cid, collection, mime, size, bytes, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        params![user, &cid, collection, mime, size as i64, bytes, now_ms],
    )?;
    Ok(())
}

pub fn blob(db: &mut impl Sql, user: &str, cid: &Cid) -> Result<Option<BlobRow>> {
    let cid = cid.to_bytes();
    let Some(mut r) = db.query_opt(
        "SELECT collection, mime, size, bytes FROM blobs WHERE owner = ?1 AND cid = ?2",
        params![user, &cid],
    )?
    else {
        return Ok(None);
    };
    Ok(Some((r.text(0)?, r.text(1)?, r.int(2)?, r.blob(3)?)))
}

/// Every blob of a user: (cid, collection, mime, size, bytes as stored).
#[allow(clippy::type_complexity)]
pub fn blobs_of(
    db: &mut impl Sql,
    user: &str,
) -> Result<Vec<(Vec<u8>, String, String, i64, Vec<u8>)>> {
    db.query(
        "SELECT cid, collection, mime, size, bytes FROM blobs WHERE owner = ?1 ORDER BY cid",
        params![user],
    )?
    .iter_mut()
    .map(|r| Ok((r.blob(0)?, r.text(1)?, r.text(2)?, r.int(3)?, r.blob(4)?)))
    .collect()
}
