//! The embedded store: one SQLite file, WAL, fsynced at each batch's commit.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::{Aggregation, Cube, EventRow, MeterError, Outcome, Query, Store, Tx, Work};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    source TEXT NOT NULL, id TEXT NOT NULL, digest BLOB NOT NULL,
    period TEXT NOT NULL, time_ms INTEGER NOT NULL, type TEXT NOT NULL,
    user TEXT, site TEXT, operator TEXT, provider TEXT, node TEXT,
    data TEXT NOT NULL, backfill TEXT,
    PRIMARY KEY (source, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_site_time ON events (site, time_ms);
-- Who used which site, per period: the weights of period close.
CREATE TABLE IF NOT EXISTS usage (
    period TEXT NOT NULL, user TEXT NOT NULL, site TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    events INTEGER NOT NULL,
    PRIMARY KEY (period, user, site, adjustment)) WITHOUT ROWID;
-- The same per day: what a user's usage page charts per site.
CREATE TABLE IF NOT EXISTS usage_days (
    user TEXT NOT NULL, day_ms INTEGER NOT NULL, site TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    events INTEGER NOT NULL,
    PRIMARY KEY (user, day_ms, site, adjustment)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aggregates (
    window TEXT NOT NULL, start_ms INTEGER NOT NULL, dim TEXT NOT NULL, value TEXT NOT NULL,
    metric TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    sum REAL NOT NULL, count INTEGER NOT NULL, max REAL NOT NULL,
    PRIMARY KEY (window, dim, value, metric, start_ms, adjustment)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS closed_periods (period TEXT PRIMARY KEY, closed_at_ms INTEGER NOT NULL);
";

/// When each site last had a request (the idler asks every pass), filled
/// from the events when the table is new.
const LAST_REQUESTS: &str = "
CREATE TABLE last_requests (site TEXT PRIMARY KEY, time_ms INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO last_requests
  SELECT site, MAX(time_ms) FROM events
  WHERE type = 'request' AND site IS NOT NULL AND backfill IS NULL GROUP BY site;
";

pub(crate) struct SqliteStore {
    conn: Connection,
    path: std::path::PathBuf,
}

impl SqliteStore {
    pub(crate) fn open(path: &Path) -> Result<SqliteStore, MeterError> {
        let mut conn = Connection::open(path)?;
        // The API and the supervisor share the file: wait for each other.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Events and aggregates are B-trees keyed by text; a page cache that
        // holds their hot part keeps inserts from re-reading pages.
        conn.pragma_update(None, "cache_size", -262_144)?; // 256 MiB
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        // Immediate: a meter opened at once elsewhere may be making the
        // table too, and a read transaction upgraded to a write after
        // another connection wrote fails at once instead of waiting.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let has_last_requests: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'last_requests')",
            [],
            |r| r.get(0),
        )?;
        if !has_last_requests {
            tx.execute_batch(LAST_REQUESTS)?;
        }
        tx.commit()?;
        Ok(SqliteStore {
            conn,
            path: path.to_path_buf(),
        })
    }
}

struct SqliteTx<'c>(rusqlite::Transaction<'c>);

impl Tx for SqliteTx<'_> {
    fn closed_at(&mut self, period: &str) -> Result<Option<i64>, MeterError> {
        Ok(self
            .0
            .prepare_cached("SELECT closed_at_ms FROM closed_periods WHERE period = ?1")?
            .query_row([period], |r| r.get(0))
            .optional()?)
    }

    fn digests(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Vec<u8>>>, MeterError> {
        let mut read = self
            .0
            .prepare_cached("SELECT digest FROM events WHERE source = ?1 AND id = ?2")?;
        keys.iter()
            .map(|(source, id)| {
                Ok(read
                    .query_row(params![source, id], |r| r.get(0))
                    .optional()?)
            })
            .collect()
    }

    fn insert_events(&mut self, rows: &[EventRow<'_>]) -> Result<Vec<Option<Vec<u8>>>, MeterError> {
        // A new event (the common case) costs one B-tree probe; only a
        // repeat reads back the stored digest, while its page is at hand.
        let mut read = self
            .0
            .prepare_cached("SELECT digest FROM events WHERE source = ?1 AND id = ?2")?;
        let mut insert = self.0.prepare_cached(
            "INSERT INTO events (source, id, digest, period, time_ms, type, user, site, operator, provider, node, data, backfill)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (source, id) DO NOTHING",
        )?;
        rows.iter()
            .map(|r| {
                let [user, site, operator, provider, node] = r.dims;
                let stored = insert.execute(params![
                    r.source, r.id, r.digest, r.period, r.time_ms, r.kind, user, site, operator,
                    provider, node, r.data, r.backfill
                ])? == 1;
                Ok(if stored {
                    None
                } else {
                    Some(read.query_row(params![r.source, r.id], |row| row.get(0))?)
                })
            })
            .collect()
    }

    fn add_totals(&mut self, cube: &Cube<'_>) -> Result<(), MeterError> {
        // One writer at a time: the totals are updated in place at once.
        let totals = cube.totals();
        let adjustment = totals.adjustment;
        let mut upsert = self.0.prepare_cached(
            "INSERT INTO aggregates (window, start_ms, dim, value, metric, adjustment, sum, count, max)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (window, dim, value, metric, start_ms, adjustment) DO UPDATE SET
               sum = sum + excluded.sum, count = count + excluded.count, max = MAX(max, excluded.max)",
        )?;
        for ((w, d, value, metric, start), a) in &totals.aggregates {
            upsert.execute(params![
                w.name(),
                start,
                d,
                value,
                metric,
                adjustment,
                a.sum,
                a.count,
                a.max
            ])?;
        }
        let mut usage = self.0.prepare_cached(
            "INSERT INTO usage (period, user, site, adjustment, events) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (period, user, site, adjustment) DO UPDATE SET events = events + excluded.events",
        )?;
        for (period, user, site, n) in &totals.usage {
            usage.execute(params![period, user, site, adjustment, n])?;
        }
        let mut usage_day = self.0.prepare_cached(
            "INSERT INTO usage_days (user, day_ms, site, adjustment, events) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (user, day_ms, site, adjustment) DO UPDATE SET events = events + excluded.events",
        )?;
        for (user, day, site, n) in &totals.usage_days {
            usage_day.execute(params![user, day, site, adjustment, n])?;
        }
        let mut last_request = self.0.prepare_cached(
            "INSERT INTO last_requests (site, time_ms) VALUES (?1, ?2)
             ON CONFLICT (site) DO UPDATE SET time_ms = MAX(time_ms, excluded.time_ms)",
        )?;
        for (site, time_ms) in &totals.last_requests {
            last_request.execute(params![site, time_ms])?;
        }
        Ok(())
    }
}

impl Store for SqliteStore {
    fn reopen(&self) -> Result<Box<dyn Store>, MeterError> {
        Ok(Box::new(SqliteStore::open(&self.path)?))
    }

    fn transaction(&mut self, work: &mut Work<'_>) -> Result<Vec<Outcome>, MeterError> {
        // Immediate: the write lock is taken (waiting out the busy timeout)
        // before anything is read; a read snapshot upgraded to a write
        // fails at once when another connection wrote since.
        let mut tx = SqliteTx(
            self.conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?,
        );
        let out = work(&mut tx)?;
        tx.0.commit()?;
        Ok(out)
    }

    fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute("DELETE FROM events WHERE backfill = ?1", [backfill])?;
        tx.execute("DELETE FROM aggregates WHERE adjustment = ?1", [backfill])?;
        tx.execute("DELETE FROM usage WHERE adjustment = ?1", [backfill])?;
        tx.execute("DELETE FROM usage_days WHERE adjustment = ?1", [backfill])?;
        tx.commit()?;
        Ok(n)
    }

    fn close_period(&self, period: &str, at_ms: i64) -> Result<(), MeterError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO closed_periods (period, closed_at_ms) VALUES (?1, ?2)",
            params![period, at_ms],
        )?;
        Ok(())
    }

    fn closed_at(&self, period: &str) -> Result<Option<i64>, MeterError> {
        Ok(self
            .conn
            .query_row(
                "SELECT closed_at_ms FROM closed_periods WHERE period = ?1",
                [period],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn aggregates(&self, q: &Query<'_>) -> Result<Vec<(i64, f64)>, MeterError> {
        let select = match q.aggregation {
            Aggregation::Sum => "SUM(sum)",
            Aggregation::Count => "SUM(count)",
            Aggregation::Max => "MAX(max)",
        };
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT start_ms, {select} FROM aggregates
             WHERE window = ?1 AND dim = ?2 AND value = ?3 AND metric = ?4 AND start_ms >= ?5 AND start_ms < ?6
             GROUP BY start_ms ORDER BY start_ms"
        ))?;
        let rows = stmt
            .query_map(
                params![
                    q.window.name(),
                    q.dim,
                    q.value,
                    q.metric,
                    q.from_ms,
                    q.to_ms
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn unique_count(
        &self,
        dim: &str,
        value: &str,
        field: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, MeterError> {
        let n: i64 = self.conn.query_row(
            &format!("SELECT COUNT(DISTINCT {field}) FROM events WHERE {dim} = ?1 AND time_ms >= ?2 AND time_ms < ?3"),
            params![value, from_ms, to_ms],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    fn usage(&self, period: &str) -> Result<Vec<(String, String, i64)>, MeterError> {
        let mut stmt = self.conn.prepare(
            "SELECT user, site, SUM(events) FROM usage WHERE period = ?1 GROUP BY user, site ORDER BY user, site",
        )?;
        let rows = stmt
            .query_map([period], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn provider_units(&self, period: &str) -> Result<Vec<(String, String, f64)>, MeterError> {
        let mut stmt = self.conn.prepare(
            "SELECT site, provider, SUM(CASE type
                 WHEN 'request' THEN COALESCE(json_extract(data, '$.count'), 1)
                 WHEN 'resources' THEN COALESCE(json_extract(data, '$.cpu_ms'), 0) / 1000.0
                     + COALESCE(json_extract(data, '$.memory_byte_seconds'), 0) / 1073741824.0
                 ELSE 0 END)
             FROM events WHERE period = ?1 AND site IS NOT NULL AND provider IS NOT NULL
             GROUP BY site, provider ORDER BY site, provider",
        )?;
        let rows = stmt
            .query_map([period], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn sites_used(&self, period: &str, user: &str) -> Result<Vec<(String, i64)>, MeterError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, SUM(events) FROM usage WHERE period = ?1 AND user = ?2
             GROUP BY site ORDER BY SUM(events) DESC, site",
        )?;
        let rows = stmt
            .query_map(params![period, user], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn site_days(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>, MeterError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT day_ms, site, SUM(events) FROM usage_days
             WHERE user = ?1 AND day_ms >= ?2 AND day_ms < ?3 GROUP BY day_ms, site ORDER BY day_ms, site",
        )?;
        let rows = stmt
            .query_map(params![user, from_ms, to_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError> {
        Ok(self.conn.query_row(
            "SELECT MAX(time_ms) FROM last_requests WHERE site = ?1",
            [site],
            |r| r.get(0),
        )?)
    }
}
