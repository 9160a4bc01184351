//! DataCommons' tables on SQLite (the embedded default).
//!
//! Everything about a user is keyed by the user, so erasing them is a set
//! of deletes. Tree nodes are not stored: a repository's tree is rebuilt
//! from its records on load and checked against the signed head commit,
//! so a write touches a few append-friendly rows rather than a node per
//! tree level. The database runs with `secure_delete` (freed pages are
//! zeroed) and erase truncates the WAL, so erased bytes do not linger in
//! the files.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::model::Cid;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    user TEXT PRIMARY KEY,
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
    user TEXT NOT NULL,
    collection TEXT NOT NULL,
    rkey TEXT NOT NULL,
    cid BLOB NOT NULL,
    block BLOB NOT NULL,       -- the record's block (sealed for encrypted classes)
    sealed_by TEXT,            -- whose data key seals it, when not the owner's (a fork's copy)
    app TEXT NOT NULL,         -- provenance: the deployment that wrote it
    revision TEXT NOT NULL,    -- ... its blueprint revision
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (user, collection, rkey)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS record_index (
    user TEXT NOT NULL,
    collection TEXT NOT NULL,
    field TEXT NOT NULL,
    value TEXT NOT NULL,       -- plaintext for public records, a blind hash otherwise
    rkey TEXT NOT NULL,
    PRIMARY KEY (user, collection, field, value, rkey)
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
    user TEXT NOT NULL,
    grantee TEXT NOT NULL,     -- app:NAME or user:ID
    collection TEXT NOT NULL,
    action TEXT NOT NULL,      -- read or write
    granted_ms INTEGER NOT NULL,
    PRIMARY KEY (user, grantee, collection, action)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS access_log (
    user TEXT NOT NULL,
    app TEXT NOT NULL,
    collection TEXT NOT NULL,
    action TEXT NOT NULL,
    day INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (user, app, collection, action, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    user TEXT NOT NULL,
    cid BLOB NOT NULL,         -- raw codec: of the bytes as stored (sealed for encrypted classes)
    collection TEXT NOT NULL,  -- whose class and grants govern it
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,     -- of the plaintext
    bytes BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (user, cid)
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
    user TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    body BLOB NOT NULL         -- the event as JSON
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user);
";

/// Opens (creating) the database at `path`.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    // A 64 MiB page cache and fewer, larger checkpoints: a write touches a
    // handful of B-tree pages, and rereading or re-checkpointing them per
    // commit dominated the cost of a write.
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
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

pub fn account(conn: &Connection, user: &str) -> rusqlite::Result<Option<AccountRow>> {
    conn.prepare_cached(
        "SELECT did, algorithm, signing_key, data_key, head, erased_ms FROM accounts WHERE user = ?1",
    )?
    .query_row(params![user], |r| {
        Ok(AccountRow {
            did: r.get(0)?,
            algorithm: r.get(1)?,
            signing_key: r.get(2)?,
            data_key: r.get(3)?,
            head: cid_column(r.get(4)?),
            erased_ms: r.get(5)?,
        })
    })
    .optional()
}

pub fn insert_account(
    conn: &Connection,
    user: &str,
    row: &AccountRow,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO accounts (user, did, algorithm, signing_key, data_key, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![user, row.did, row.algorithm, row.signing_key, row.data_key, now_ms],
    )?;
    Ok(())
}

pub fn set_head(
    tx: &Transaction,
    user: &str,
    head: &Cid,
    block: &[u8],
    rev: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE accounts SET head = ?2, head_block = ?3, rev = ?4 WHERE user = ?1")?
        .execute(params![user, head.to_bytes(), block, rev])?;
    Ok(())
}

pub fn head_block(conn: &Connection, user: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    conn.prepare_cached("SELECT head_block FROM accounts WHERE user = ?1")?
        .query_row(params![user], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// Every (path, record CID) of a user's repository, in key order.
pub fn record_entries(conn: &Connection, user: &str) -> rusqlite::Result<Vec<(String, Cid)>> {
    let mut stmt =
        conn.prepare_cached("SELECT collection, rkey, cid FROM records WHERE user = ?1")?;
    let rows = stmt.query_map(params![user], |r| {
        Ok((
            format!("{}/{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (path, cid) = row?;
        if let Ok(cid) = Cid::try_from(cid.as_slice()) {
            out.push((path, cid));
        }
    }
    out.sort();
    Ok(out)
}

/// Every record block of a user's repository.
pub fn record_blocks(conn: &Connection, user: &str) -> rusqlite::Result<Vec<(Cid, Vec<u8>)>> {
    let mut stmt = conn.prepare_cached("SELECT cid, block FROM records WHERE user = ?1")?;
    let rows = stmt.query_map(params![user], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (cid, block) = row?;
        if let Ok(cid) = Cid::try_from(cid.as_slice()) {
            out.push((cid, block));
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
    tx: &Transaction,
    user: &str,
    collection: &str,
    rkey: &str,
    (cid, block, sealed_by): (&Cid, &[u8], Option<&str>),
    app: &str,
    revision: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO records (user, collection, rkey, cid, block, sealed_by, app, revision, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
         ON CONFLICT (user, collection, rkey) DO UPDATE SET
            cid = excluded.cid, block = excluded.block, sealed_by = excluded.sealed_by,
            app = excluded.app, revision = excluded.revision, updated_ms = excluded.updated_ms",
    )?
    .execute(params![user, collection, rkey, cid.to_bytes(), block, sealed_by, app, revision, now_ms])?;
    Ok(())
}

pub fn delete_record(
    tx: &Transaction,
    user: &str,
    collection: &str,
    rkey: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM records WHERE user = ?1 AND collection = ?2 AND rkey = ?3")?
        .execute(params![user, collection, rkey])?;
    tx.prepare_cached(
        "DELETE FROM record_index WHERE user = ?1 AND collection = ?2 AND rkey = ?3",
    )?
    .execute(params![user, collection, rkey])?;
    Ok(())
}

/// One record's provenance, CID and block.
#[allow(clippy::type_complexity)]
pub fn record(
    conn: &Connection,
    user: &str,
    collection: &str,
    rkey: &str,
) -> rusqlite::Result<Option<(RecordRow, Vec<u8>, Vec<u8>)>> {
    conn.prepare_cached(
        "SELECT collection, rkey, app, revision, created_ms, updated_ms, sealed_by, cid, block FROM records
         WHERE user = ?1 AND collection = ?2 AND rkey = ?3",
    )?
    .query_row(params![user, collection, rkey], |r| {
        Ok((record_row(r)?, r.get(7)?, r.get(8)?))
    })
    .optional()
}

fn record_row(r: &rusqlite::Row) -> rusqlite::Result<RecordRow> {
    Ok(RecordRow {
        collection: r.get(0)?,
        rkey: r.get(1)?,
        app: r.get(2)?,
        revision: r.get(3)?,
        created_ms: r.get(4)?,
        updated_ms: r.get(5)?,
        sealed_by: r.get(6)?,
    })
}

pub fn records_of(conn: &Connection, user: &str) -> rusqlite::Result<Vec<RecordRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT collection, rkey, app, revision, created_ms, updated_ms, sealed_by FROM records
         WHERE user = ?1 ORDER BY collection, rkey",
    )?;
    let rows = stmt.query_map(params![user], record_row)?;
    rows.collect()
}

pub fn index_value(
    tx: &Transaction,
    user: &str,
    collection: &str,
    field: &str,
    value: &str,
    rkey: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO record_index (user, collection, field, value, rkey) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![user, collection, field, value, rkey])?;
    Ok(())
}

pub fn unindex(tx: &Transaction, user: &str, collection: &str, rkey: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM record_index WHERE user = ?1 AND collection = ?2 AND rkey = ?3",
    )?
    .execute(params![user, collection, rkey])?;
    Ok(())
}

pub fn lookup(
    conn: &Connection,
    user: &str,
    collection: &str,
    field: &str,
    value: &str,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rkey FROM record_index WHERE user = ?1 AND collection = ?2 AND field = ?3 AND value = ?4
         ORDER BY rkey LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![user, collection, field, value, limit as i64], |r| {
        r.get(0)
    })?;
    rows.collect()
}

pub fn grant(
    conn: &Connection,
    user: &str,
    grantee: &str,
    collection: &str,
    action: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO grants (user, grantee, collection, action, granted_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![user, grantee, collection, action, now_ms],
    )?;
    Ok(())
}

pub fn revoke(
    conn: &Connection,
    user: &str,
    grantee: &str,
    collection: &str,
    action: &str,
) -> rusqlite::Result<bool> {
    Ok(conn.execute(
        "DELETE FROM grants WHERE user = ?1 AND grantee = ?2 AND collection = ?3 AND action = ?4",
        params![user, grantee, collection, action],
    )? > 0)
}

/// (user, grantee, collection, action, granted_ms)
pub type GrantRow = (String, String, String, String, i64);

pub fn all_grants(conn: &Connection) -> rusqlite::Result<Vec<GrantRow>> {
    let mut stmt =
        conn.prepare("SELECT user, grantee, collection, action, granted_ms FROM grants")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    rows.collect()
}

pub fn log_access(
    conn: &Connection,
    (user, app, collection, action): (&str, &str, &str, &str),
    count: i64,
    bytes: i64,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO access_log (user, app, collection, action, day, count, bytes, last_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (user, app, collection, action, day) DO UPDATE SET
            count = count + excluded.count, bytes = bytes + excluded.bytes, last_ms = excluded.last_ms",
    )?
    .execute(params![user, app, collection, action, now_ms / 86_400_000, count, bytes, now_ms])?;
    Ok(())
}

/// (app, collection, action, day, count, bytes, last_ms)
pub type AccessRow = (String, String, String, i64, i64, i64, i64);

pub fn access_log(conn: &Connection, user: &str) -> rusqlite::Result<Vec<AccessRow>> {
    let mut stmt = conn.prepare(
        "SELECT app, collection, action, day, count, bytes, last_ms FROM access_log WHERE user = ?1
         ORDER BY day DESC, app, collection, action",
    )?;
    let rows = stmt.query_map(params![user], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })?;
    rows.collect()
}

/// The sequence number the next event gets (the key is the events' order).
pub fn next_seq(tx: &Transaction) -> rusqlite::Result<i64> {
    tx.prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM events")?
        .query_row([], |r| r.get(0))
}

pub fn insert_event(
    tx: &Transaction,
    seq: i64,
    user: &str,
    time_ms: i64,
    body: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO events (seq, user, time_ms, body) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![seq, user, time_ms, body])?;
    Ok(())
}

/// Events after `cursor`, oldest first, at most `limit`.
pub fn events_after(
    conn: &Connection,
    cursor: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, Vec<u8>)>> {
    let mut stmt =
        conn.prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let rows = stmt.query_map(params![cursor, limit as i64], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    rows.collect()
}

/// The oldest and newest sequence numbers retained.
pub fn event_bounds(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(
        "SELECT COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM events",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

pub fn prune_events(conn: &Connection, keep_after: i64) -> rusqlite::Result<usize> {
    conn.execute("DELETE FROM events WHERE seq <= ?1", params![keep_after])
}

/// Removes everything held about `user` except the erased account's
/// tombstone (its DID and when it was erased).
pub fn erase_user(tx: &Transaction, user: &str, now_ms: i64) -> rusqlite::Result<()> {
    for table in ["records", "record_index", "grants", "access_log", "blobs"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE user = ?1"),
            params![user],
        )?;
    }
    tx.execute(
        "DELETE FROM forks WHERE fork_user = ?1 OR source = ?1",
        params![user],
    )?;
    tx.execute(
        "DELETE FROM grants WHERE grantee = ?1",
        params![format!("user:{user}")],
    )?;
    tx.execute(
        "UPDATE accounts SET signing_key = NULL, data_key = NULL, head = NULL, head_block = NULL, rev = NULL, erased_ms = ?2 WHERE user = ?1",
        params![user, now_ms],
    )?;
    Ok(())
}

/// Removes a user's earlier events except `keep` (the erase's own).
pub fn purge_events(tx: &Transaction, user: &str, keep: &[i64]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached("SELECT seq FROM events WHERE user = ?1")?;
    let seqs: Vec<i64> = stmt
        .query_map(params![user], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for seq in seqs.into_iter().filter(|s| !keep.contains(s)) {
        tx.execute("DELETE FROM events WHERE seq = ?1", params![seq])?;
    }
    Ok(())
}

pub fn save_collection(
    conn: &Connection,
    nsid: &str,
    class: &str,
    licence: Option<&str>,
    schema: &str,
    indexed: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO collections (nsid, class, licence, schema, indexed) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (nsid) DO UPDATE SET schema = excluded.schema, indexed = excluded.indexed, licence = excluded.licence",
        params![nsid, class, licence, schema, indexed],
    )?;
    Ok(())
}

/// (nsid, class, licence, schema JSON, indexed JSON)
pub type CollectionRow = (String, String, Option<String>, String, String);

pub fn collections(conn: &Connection) -> rusqlite::Result<Vec<CollectionRow>> {
    let mut stmt = conn.prepare("SELECT nsid, class, licence, schema, indexed FROM collections")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    rows.collect()
}

#[allow(clippy::too_many_arguments)]
pub fn save_app_collection(
    conn: &Connection,
    app: &str,
    revision: &str,
    nsid: &str,
    read: bool,
    write: bool,
    fields: Option<&str>,
    purpose: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO app_collections (app, revision, nsid, read, write, fields, purpose) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (app, nsid) DO UPDATE SET revision = excluded.revision, read = excluded.read,
            write = excluded.write, fields = excluded.fields, purpose = excluded.purpose",
        params![app, revision, nsid, read, write, fields, purpose],
    )?;
    Ok(())
}

/// (app, revision, nsid, read, write, fields JSON, purpose)
pub type AppCollectionRow = (String, String, String, bool, bool, Option<String>, String);

pub fn app_collections(conn: &Connection) -> rusqlite::Result<Vec<AppCollectionRow>> {
    let mut stmt = conn
        .prepare("SELECT app, revision, nsid, read, write, fields, purpose FROM app_collections")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })?;
    rows.collect()
}

/// Moves WAL content into the main file and truncates the WAL, so
/// deleted bytes (zeroed by `secure_delete`) leave no copy behind.
pub fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// A fork's base: path -> record CID at the fork point (or last merge).
pub fn fork_base(
    conn: &Connection,
    fork_user: &str,
    source: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT base FROM forks WHERE fork_user = ?1 AND source = ?2")?
        .query_row(params![fork_user, source], |r| r.get(0))
        .optional()
}

pub fn save_fork(
    conn: &Connection,
    fork_user: &str,
    source: &str,
    base: &str,
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
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
    conn: &Connection,
    user: &str,
    cid: &Cid,
    collection: &str,
    mime: &str,
    size: usize,
    bytes: &[u8],
    now_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO blobs (user, cid, collection, mime, size, bytes, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            user,
            cid.to_bytes(),
            collection,
            mime,
            size as i64,
            bytes,
            now_ms
        ],
    )?;
    Ok(())
}

pub fn blob(conn: &Connection, user: &str, cid: &Cid) -> rusqlite::Result<Option<BlobRow>> {
    conn.prepare_cached(
        "SELECT collection, mime, size, bytes FROM blobs WHERE user = ?1 AND cid = ?2",
    )?
    .query_row(params![user, cid.to_bytes()], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })
    .optional()
}

/// Every blob of a user: (cid, collection, mime, size, bytes as stored).
#[allow(clippy::type_complexity)]
pub fn blobs_of(
    conn: &Connection,
    user: &str,
) -> rusqlite::Result<Vec<(Vec<u8>, String, String, i64, Vec<u8>)>> {
    let mut stmt = conn.prepare(
        "SELECT cid, collection, mime, size, bytes FROM blobs WHERE user = ?1 ORDER BY cid",
    )?;
    let rows = stmt.query_map(params![user], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })?;
    rows.collect()
}
