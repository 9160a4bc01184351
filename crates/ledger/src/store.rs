//! Where the journal lives: SQLite (the embedded default) or PostgreSQL
//! (scale-out). Both keep the same tables — the journal's entries, signed
//! checkpoints, and the statements and payouts written beside a batch — and
//! both write a batch and its side records in one durable transaction.

use std::path::Path;

use rusqlite::params;

use crate::book::{PeriodClosed, Statement};
use crate::journal::{Checkpoint, JournalError};

/// A record written in the same transaction as a batch of entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// Adds to a statement line; `seq` is the journal entry that commits
    /// it (the journal sets it when it appends that entry).
    Statement { statement: Statement, seq: u64 },
    /// A period's close, committed as an entry like a statement line.
    Close { close: PeriodClosed, seq: u64 },
    /// Adds to what a recipient has been paid for a period.
    Payout {
        period: String,
        recipient: String,
        paid: u64,
    },
    /// One subscriber's allocation: private to them (never exported), as
    /// parts of the statement lines of the same batch. Each part is
    /// (line, amount): the line's index among the batch's statement
    /// records, which the journal turns into its entry's sequence number.
    Shares {
        period: String,
        subscriber: String,
        parts: Vec<(u64, u64)>,
    },
}

/// Parts as stored: sorted by line, each as the LEB128 varints of the gap
/// from the previous line and of the amount (a few bytes a part, one row a
/// subscriber and period).
pub(crate) fn encode_parts(parts: &[(u64, u64)]) -> Vec<u8> {
    fn varint(mut n: u64, out: &mut Vec<u8>) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::with_capacity(sorted.len() * 4);
    let mut last = 0;
    for (line, amount) in sorted {
        varint(line - last, &mut out);
        varint(amount, &mut out);
        last = line;
    }
    out
}

/// The parts [`encode_parts`] wrote; `None` if the bytes are not such.
pub(crate) fn decode_parts(bytes: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut it = bytes.iter();
    let mut varint = || -> Option<Option<u64>> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = it.next() else {
                return if shift == 0 { Some(None) } else { None };
            };
            n |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Some(Some(n));
            }
        }
        None
    };
    let mut out = Vec::new();
    let mut line = 0u64;
    while let Some(gap) = varint()? {
        line = line.checked_add(gap)?;
        out.push((line, varint()??));
    }
    Some(out)
}

/// What one subscriber's tokens for a period paid to one recipient
/// through one site: "where my money went" (their part of a statement line).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SubscriberShare {
    pub period: String,
    pub subscriber: String,
    /// The recipient's account name (`tokens:project:example.org/lib`).
    pub recipient: String,
    /// Empty for the general fund's part.
    pub site: String,
    /// The project that passed it on (empty when it came from the site).
    pub via: String,
    pub amount: u64,
}

/// A line of a recipient's statement, as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StatementLine {
    pub period: String,
    pub site: String,
    /// How many subscribers' use it came from (never who).
    pub subscribers: u64,
    pub amount: u64,
    pub policy_version: u32,
}

/// The journal's persistence.
pub trait Store: Send {
    /// Every entry from sequence number `start` on, in order, as stored
    /// (text or bytes): what another writer appended, when `start` is
    /// where this one's copy ends.
    fn load_from(&mut self, start: u64) -> Result<Vec<Vec<u8>>, JournalError>;
    /// Appends `entries` at sequence numbers `start..` and applies `side`,
    /// all in one durable transaction; [`JournalError::Conflict`] if
    /// another writer took `start` first (nothing is written then). `fail_after` (tests) aborts it after
    /// that many entries, as a crash would.
    fn append(
        &mut self,
        start: u64,
        entries: &[Vec<u8>],
        side: &[Side],
        fail_after: Option<usize>,
    ) -> Result<(), JournalError>;
    fn put_checkpoint(&mut self, c: &Checkpoint) -> Result<(), JournalError>;
    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>, JournalError>;
    /// Statement lines of a recipient (account name), by period and site.
    fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, JournalError>;
    /// Per recipient of a period: (account, owed by the statements, paid so far).
    fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError>;
    /// The journal entries that commit a recipient's statement lines.
    fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError>;
    /// One entry's exact bytes.
    fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError>;
    /// The entries that record periods' closes, oldest first.
    fn close_entries(&mut self) -> Result<Vec<u64>, JournalError>;
    /// A subscriber's parts of statement lines, by period: (period, parts
    /// as [`encode_parts`] wrote them).
    fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError>;
    /// Every period's statements summed per recipient: (period, account, amount).
    fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError>;
    /// Deletes a subscriber's private shares (their account is erased; the
    /// statements keep only counts and sums).
    fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError>;
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size INTEGER PRIMARY KEY, root TEXT NOT NULL, timestamp_ms INTEGER NOT NULL,
    public_key TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statements (
    period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL, policy_version INTEGER NOT NULL,
    amount INTEGER NOT NULL, subscribers INTEGER NOT NULL,
    PRIMARY KEY (period, recipient, site, policy_version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS period_payouts (
    period TEXT NOT NULL, recipient TEXT NOT NULL, paid INTEGER NOT NULL,
    PRIMARY KEY (period, recipient)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS statement_entries (
    seq BIGINT PRIMARY KEY, period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS statement_entries_recipient ON statement_entries (recipient, period);
CREATE TABLE IF NOT EXISTS period_closes (seq BIGINT PRIMARY KEY, period TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriber_shares (
    subscriber TEXT NOT NULL, period TEXT NOT NULL, parts BLOB NOT NULL,
    PRIMARY KEY (subscriber, period));
";

const STATEMENT_SQL: &str =
    "SELECT period, site, subscribers, amount, policy_version FROM statements
     WHERE recipient = $1 AND ($2::text IS NULL OR period = $2) ORDER BY period, site";
const OWED_SQL: &str = "SELECT s.recipient, CAST(SUM(s.amount) AS BIGINT),
       COALESCE((SELECT paid FROM period_payouts p WHERE p.period = $1 AND p.recipient = s.recipient), 0)
     FROM statements s WHERE s.period = $1 GROUP BY s.recipient ORDER BY s.recipient";
const STATEMENT_ENTRIES_SQL: &str = "SELECT seq FROM statement_entries
     WHERE recipient = $1 AND ($2::text IS NULL OR period = $2) ORDER BY seq";
const SHARES_SQL: &str = "SELECT period, parts FROM subscriber_shares
     WHERE subscriber = $1 AND ($2::text IS NULL OR period = $2) ORDER BY period";
const TOTALS_SQL: &str = "SELECT period, recipient, CAST(SUM(amount) AS BIGINT) FROM statements
     GROUP BY period, recipient ORDER BY period, recipient";
const INSERT_STATEMENT_SQL: &str = "INSERT INTO statements (period, recipient, site, policy_version, amount, subscribers) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (period, recipient, site, policy_version) DO UPDATE SET
       amount = statements.amount + excluded.amount, subscribers = statements.subscribers + excluded.subscribers";
const INSERT_PAYOUT_SQL: &str =
    "INSERT INTO period_payouts (period, recipient, paid) VALUES ($1, $2, $3)
     ON CONFLICT (period, recipient) DO UPDATE SET paid = period_payouts.paid + excluded.paid";
const INSERT_CLOSE_SQL: &str = "INSERT INTO period_closes (seq, period) VALUES ($1, $2)";
const CLOSES_SQL: &str = "SELECT seq FROM period_closes ORDER BY seq";
const INSERT_STATEMENT_ENTRY_SQL: &str =
    "INSERT INTO statement_entries (seq, period, recipient, site) VALUES ($1, $2, $3, $4)";
const INSERT_SHARE_SQL: &str =
    "INSERT INTO subscriber_shares (subscriber, period, parts) VALUES ($1, $2, $3)";

/// The embedded store: one SQLite file in WAL mode, fsynced at every commit.
pub struct SqliteStore {
    conn: rusqlite::Connection,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, JournalError> {
        let conn = rusqlite::Connection::open(path)?;
        // The API and the supervisor share the file: wait for each other.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable: the WAL is fsynced at every commit, i.e. once per batch.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -262_144)?; // 256 MiB
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SQLITE_SCHEMA)?;
        Ok(SqliteStore { conn })
    }
}

impl Store for SqliteStore {
    fn load_from(&mut self, start: u64) -> Result<Vec<Vec<u8>>, JournalError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, entry FROM journal WHERE seq >= ?1 ORDER BY seq")?;
        let mut rows = stmt.query([start as i64])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)? as u64;
            if seq != start + out.len() as u64 {
                return Err(JournalError::Malformed {
                    seq,
                    message: format!("a gap: entry {} is missing", start + out.len() as u64),
                });
            }
            // Text or blob: an edited row must still be read and judged.
            let bytes = row
                .get_ref(1)?
                .as_bytes()
                .map_err(|e| JournalError::Malformed {
                    seq,
                    message: e.to_string(),
                })?;
            out.push(bytes.to_vec());
        }
        Ok(out)
    }

    fn append(
        &mut self,
        start: u64,
        entries: &[Vec<u8>],
        side: &[Side],
        fail_after: Option<usize>,
    ) -> Result<(), JournalError> {
        let tx = self.conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO journal (seq, entry) VALUES (?1, ?2)")?;
            for (i, b) in entries.iter().enumerate() {
                if fail_after == Some(i) {
                    // Dropping the transaction without commit: as if we died here.
                    return Err(JournalError::Injected);
                }
                insert
                    .execute(params![(start + i as u64) as i64, b])
                    .map_err(|e| match e.sqlite_error_code() {
                        Some(rusqlite::ErrorCode::ConstraintViolation) => {
                            JournalError::Conflict { seq: start }
                        }
                        _ => e.into(),
                    })?;
            }
            let mut statement =
                tx.prepare_cached(&crate::tables::sqlite_spelling(INSERT_STATEMENT_SQL))?;
            let mut statement_entry =
                tx.prepare_cached(&crate::tables::sqlite_spelling(INSERT_STATEMENT_ENTRY_SQL))?;
            let mut payout =
                tx.prepare_cached(&crate::tables::sqlite_spelling(INSERT_PAYOUT_SQL))?;
            let mut share = tx.prepare_cached(&crate::tables::sqlite_spelling(INSERT_SHARE_SQL))?;
            let mut close = tx.prepare_cached(&crate::tables::sqlite_spelling(INSERT_CLOSE_SQL))?;
            for s in side {
                match s {
                    Side::Statement { statement: l, seq } => {
                        statement.execute(params![
                            l.period,
                            l.recipient,
                            l.site,
                            l.policy_version,
                            l.amount as i64,
                            l.subscribers as i64
                        ])?;
                        statement_entry.execute(params![
                            *seq as i64,
                            l.period,
                            l.recipient,
                            l.site
                        ])?;
                    }
                    Side::Payout {
                        period,
                        recipient,
                        paid,
                    } => {
                        payout.execute(params![period, recipient, *paid as i64])?;
                    }
                    Side::Shares {
                        period,
                        subscriber,
                        parts,
                    } => {
                        share.execute(params![subscriber, period, encode_parts(parts)])?;
                    }
                    Side::Close { close: c, seq } => {
                        close.execute(params![*seq as i64, c.period])?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn put_checkpoint(&mut self, c: &Checkpoint) -> Result<(), JournalError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoints (tree_size, root, timestamp_ms, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![c.tree_size as i64, c.root, c.timestamp_ms as i64, c.public_key, c.signature],
        )?;
        Ok(())
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT tree_size, root, timestamp_ms, public_key, signature FROM checkpoints ORDER BY tree_size")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    tree_size: r.get::<_, i64>(0)? as u64,
                    root: r.get(1)?,
                    timestamp_ms: r.get::<_, i64>(2)? as u64,
                    public_key: r.get(3)?,
                    signature: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(&crate::tables::sqlite_spelling(STATEMENT_SQL))?;
        let rows = stmt
            .query_map(params![recipient, period], |r| {
                Ok(StatementLine {
                    period: r.get(0)?,
                    site: r.get(1)?,
                    subscribers: r.get::<_, i64>(2)? as u64,
                    amount: r.get::<_, i64>(3)? as u64,
                    policy_version: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(&crate::tables::sqlite_spelling(OWED_SQL))?;
        let rows = stmt
            .query_map([period], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(&crate::tables::sqlite_spelling(STATEMENT_ENTRIES_SQL))?;
        let rows = stmt
            .query_map(params![recipient, period], |r| {
                Ok(r.get::<_, i64>(0)? as u64)
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT entry FROM journal WHERE seq = ?1")?;
        let mut rows = stmt.query([seq as i64])?;
        match rows.next()? {
            None => Ok(None),
            Some(row) => Ok(Some(
                row.get_ref(0)?
                    .as_bytes()
                    .map_err(|e| JournalError::Malformed {
                        seq,
                        message: e.to_string(),
                    })?
                    .to_vec(),
            )),
        }
    }

    fn close_entries(&mut self) -> Result<Vec<u64>, JournalError> {
        let mut stmt = self.conn.prepare(CLOSES_SQL)?;
        let rows = stmt
            .query_map([], |r| Ok(r.get::<_, i64>(0)? as u64))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let mut stmt = self
            .conn
            .prepare(&crate::tables::sqlite_spelling(SHARES_SQL))?;
        let rows = stmt
            .query_map(params![subscriber, period], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError> {
        let mut stmt = self.conn.prepare(TOTALS_SQL)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError> {
        Ok(self.conn.execute(
            "DELETE FROM subscriber_shares WHERE subscriber = ?1",
            [subscriber],
        )? as u64)
    }
}

const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (seq BIGINT PRIMARY KEY, entry BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size BIGINT PRIMARY KEY, root TEXT NOT NULL, timestamp_ms BIGINT NOT NULL,
    public_key TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS statements (
    period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL, policy_version INTEGER NOT NULL,
    amount BIGINT NOT NULL, subscribers BIGINT NOT NULL,
    PRIMARY KEY (period, recipient, site, policy_version));
CREATE TABLE IF NOT EXISTS period_payouts (
    period TEXT NOT NULL, recipient TEXT NOT NULL, paid BIGINT NOT NULL,
    PRIMARY KEY (period, recipient));
CREATE TABLE IF NOT EXISTS statement_entries (
    seq BIGINT PRIMARY KEY, period TEXT NOT NULL, recipient TEXT NOT NULL, site TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS statement_entries_recipient ON statement_entries (recipient, period);
CREATE TABLE IF NOT EXISTS period_closes (seq BIGINT PRIMARY KEY, period TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subscriber_shares (
    subscriber TEXT NOT NULL, period TEXT NOT NULL, parts BYTEA NOT NULL,
    PRIMARY KEY (subscriber, period));
";

/// The scale-out store: PostgreSQL, one transaction per batch (committed
/// with the server's `synchronous_commit`, i.e. flushed to its WAL).
pub struct PgStore {
    conn: PgConnection,
}

/// The client, whose calls block: [`PgStore`] makes each off any async
/// runtime's thread.
struct PgConnection {
    client: postgres::Client,
}

fn pg(e: postgres::Error) -> JournalError {
    JournalError::Postgres(e.to_string())
}

impl PgStore {
    /// Connects (`host=127.0.0.1 user=postgres dbname=commons`, or a URL) and
    /// creates the tables in `schema` if they do not exist.
    pub fn connect(url: &str, schema: &str) -> Result<PgStore, JournalError> {
        if !schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(JournalError::Postgres(format!(
                "invalid schema name {schema:?}"
            )));
        }
        let client = commons_blocking::outside_async(|| {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            client.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}; {PG_SCHEMA}"
            ))?;
            Ok(client)
        })
        .map_err(pg)?;
        Ok(PgStore {
            conn: PgConnection { client },
        })
    }
}

/// Each call made by the connection, off any async runtime's thread.
impl Store for PgStore {
    fn load_from(&mut self, start: u64) -> Result<Vec<Vec<u8>>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.load_from(start))
    }
    fn append(
        &mut self,
        start: u64,
        entries: &[Vec<u8>],
        side: &[Side],
        fail_after: Option<usize>,
    ) -> Result<(), JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.append(start, entries, side, fail_after))
    }
    fn put_checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.put_checkpoint(checkpoint))
    }
    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.checkpoints())
    }
    fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.statement(recipient, period))
    }
    fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.owed(period))
    }
    fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.statement_entries(recipient, period))
    }
    fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.entry(seq))
    }
    fn close_entries(&mut self) -> Result<Vec<u64>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.close_entries())
    }
    fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.shares(subscriber, period))
    }
    fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.totals())
    }
    fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError> {
        let c = &mut self.conn;
        commons_blocking::outside_async(move || c.forget(subscriber))
    }
}

impl Store for PgConnection {
    fn load_from(&mut self, start: u64) -> Result<Vec<Vec<u8>>, JournalError> {
        let rows = self
            .client
            .query(
                "SELECT seq, entry FROM journal WHERE seq >= $1 ORDER BY seq",
                &[&(start as i64)],
            )
            .map_err(pg)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            if seq as u64 != start + out.len() as u64 {
                return Err(JournalError::Malformed {
                    seq: seq as u64,
                    message: format!("a gap: entry {} is missing", start + out.len() as u64),
                });
            }
            out.push(row.get::<_, Vec<u8>>(1));
        }
        Ok(out)
    }

    fn append(
        &mut self,
        start: u64,
        entries: &[Vec<u8>],
        side: &[Side],
        fail_after: Option<usize>,
    ) -> Result<(), JournalError> {
        let mut tx = self.client.transaction().map_err(pg)?;
        let n = fail_after.unwrap_or(entries.len()).min(entries.len());
        // One round trip for the whole batch.
        let seqs: Vec<i64> = (0..n as u64).map(|i| (start + i) as i64).collect();
        let bytes: Vec<&[u8]> = entries[..n].iter().map(Vec::as_slice).collect();
        tx.execute(
            "INSERT INTO journal (seq, entry) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
            &[&seqs, &bytes],
        )
        .map_err(|e| {
            if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) {
                JournalError::Conflict { seq: start }
            } else {
                pg(e)
            }
        })?;
        if fail_after.is_some_and(|f| f < entries.len()) {
            // Dropping the transaction rolls it back: as if we died here.
            return Err(JournalError::Injected);
        }
        for s in side {
            match s {
                Side::Statement { statement: l, seq } => {
                    tx.execute(
                        INSERT_STATEMENT_SQL,
                        &[
                            &l.period,
                            &l.recipient,
                            &l.site,
                            &(l.policy_version as i32),
                            &(l.amount as i64),
                            &(l.subscribers as i64),
                        ],
                    )
                    .map_err(pg)?;
                    tx.execute(
                        INSERT_STATEMENT_ENTRY_SQL,
                        &[&(*seq as i64), &l.period, &l.recipient, &l.site],
                    )
                    .map_err(pg)?;
                }
                Side::Payout {
                    period,
                    recipient,
                    paid,
                } => {
                    tx.execute(INSERT_PAYOUT_SQL, &[period, recipient, &(*paid as i64)])
                        .map_err(pg)?;
                }
                Side::Shares {
                    period,
                    subscriber,
                    parts,
                } => {
                    tx.execute(
                        INSERT_SHARE_SQL,
                        &[subscriber, period, &encode_parts(parts)],
                    )
                    .map_err(pg)?;
                }
                Side::Close { close, seq } => {
                    tx.execute(INSERT_CLOSE_SQL, &[&(*seq as i64), &close.period])
                        .map_err(pg)?;
                }
            }
        }
        tx.commit().map_err(pg)
    }

    fn put_checkpoint(&mut self, c: &Checkpoint) -> Result<(), JournalError> {
        self.client
            .execute(
                "INSERT INTO checkpoints (tree_size, root, timestamp_ms, public_key, signature) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (tree_size) DO UPDATE SET root = $2, timestamp_ms = $3, public_key = $4, signature = $5",
                &[&(c.tree_size as i64), &c.root, &(c.timestamp_ms as i64), &c.public_key, &c.signature],
            )
            .map_err(pg)?;
        Ok(())
    }

    fn checkpoints(&mut self) -> Result<Vec<Checkpoint>, JournalError> {
        let rows = self
            .client
            .query("SELECT tree_size, root, timestamp_ms, public_key, signature FROM checkpoints ORDER BY tree_size", &[])
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| Checkpoint {
                tree_size: r.get::<_, i64>(0) as u64,
                root: r.get(1),
                timestamp_ms: r.get::<_, i64>(2) as u64,
                public_key: r.get(3),
                signature: r.get(4),
            })
            .collect())
    }

    fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, JournalError> {
        let rows = self
            .client
            .query(STATEMENT_SQL, &[&recipient, &period])
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| StatementLine {
                period: r.get(0),
                site: r.get(1),
                subscribers: r.get::<_, i64>(2) as u64,
                amount: r.get::<_, i64>(3) as u64,
                policy_version: r.get::<_, i32>(4) as u32,
            })
            .collect())
    }

    fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError> {
        let rows = self.client.query(OWED_SQL, &[&period]).map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                )
            })
            .collect())
    }

    fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError> {
        let rows = self
            .client
            .query(STATEMENT_ENTRIES_SQL, &[&recipient, &period])
            .map_err(pg)?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        let row = self
            .client
            .query_opt("SELECT entry FROM journal WHERE seq = $1", &[&(seq as i64)])
            .map_err(pg)?;
        Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))
    }

    fn close_entries(&mut self) -> Result<Vec<u64>, JournalError> {
        let rows = self.client.query(CLOSES_SQL, &[]).map_err(pg)?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let rows = self
            .client
            .query(SHARES_SQL, &[&subscriber, &period])
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError> {
        let rows = self.client.query(TOTALS_SQL, &[]).map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
            .collect())
    }

    fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError> {
        self.client
            .execute(
                "DELETE FROM subscriber_shares WHERE subscriber = $1",
                &[&subscriber],
            )
            .map_err(pg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_bad_bytes_are_refused() {
        let parts = vec![
            (1_000_000, 207),
            (7, 0),
            (u64::MAX, u64::MAX),
            (1_000_001, 1),
        ];
        let bytes = encode_parts(&parts);
        let mut sorted = parts.clone();
        sorted.sort_unstable();
        assert_eq!(decode_parts(&bytes), Some(sorted));
        assert_eq!(decode_parts(&[]), Some(vec![]));
        // Cut off after a line, or in the middle of a number.
        assert_eq!(decode_parts(&bytes[..1]), None);
        assert_eq!(decode_parts(&[0x80]), None);
        // More than 64 bits.
        assert_eq!(decode_parts(&[0xff; 11]), None);
    }
}
