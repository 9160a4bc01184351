//! The scale-out store: the meter's tables in a schema of their own on
//! PostgreSQL, shared by every platform instance. A batch is a handful of
//! statements whatever its size: rows go in as arrays (`unnest`).
//!
//! Concurrent batches: a repeat of an event another batch is storing waits
//! for that batch's commit, then reads as a repeat; totals are added in
//! their key order, so two batches lock rows in one order; and a batch that
//! still meets a deadlock or a serialization failure runs again. A period's
//! close waits for the batches in flight (they hold `closed_periods` in
//! share mode), so no event of a closed period is counted after its close.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::{Aggregation, EventRow, MeterError, Outcome, Query, Store, Totals, Tx, Work};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    source TEXT NOT NULL, id TEXT NOT NULL, digest BYTEA NOT NULL,
    period TEXT NOT NULL, time_ms BIGINT NOT NULL, type TEXT NOT NULL,
    "user" TEXT, site TEXT, operator TEXT, provider TEXT, node TEXT,
    data TEXT NOT NULL, backfill TEXT,
    PRIMARY KEY (source, id));
-- Each B-tree on events costs every event a descent, and the key's is the
-- one dedup needs. Events arrive about in time order, so a BRIN range index
-- (a few pages, nearly free to keep) finds a period's or a window's events;
-- when a site last had a request is a row per site (last_requests).
CREATE INDEX IF NOT EXISTS events_by_time ON events USING brin (time_ms);
CREATE INDEX IF NOT EXISTS events_by_backfill ON events (backfill) WHERE backfill IS NOT NULL;
CREATE TABLE IF NOT EXISTS last_requests (site TEXT PRIMARY KEY, time_ms BIGINT NOT NULL);
ALTER TABLE last_requests SET (fillfactor = 70);
DO $$ BEGIN
  -- From an earlier schema, which found a site's last request by an index.
  IF to_regclass('events_by_site_time') IS NOT NULL THEN
    INSERT INTO last_requests
      SELECT site, MAX(time_ms) FROM events
      WHERE type = 'request' AND site IS NOT NULL AND backfill IS NULL GROUP BY site
      ON CONFLICT DO NOTHING;
    DROP INDEX events_by_site_time;
  END IF;
END $$;
DROP INDEX IF EXISTS events_by_period;
CREATE TABLE IF NOT EXISTS usage (
    period TEXT NOT NULL, "user" TEXT NOT NULL, site TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    events BIGINT NOT NULL,
    PRIMARY KEY (period, "user", site, adjustment));
CREATE TABLE IF NOT EXISTS usage_days (
    "user" TEXT NOT NULL, day_ms BIGINT NOT NULL, site TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    events BIGINT NOT NULL,
    PRIMARY KEY ("user", day_ms, site, adjustment));
CREATE TABLE IF NOT EXISTS aggregates (
    "window" TEXT NOT NULL, start_ms BIGINT NOT NULL, dim TEXT NOT NULL, value TEXT NOT NULL,
    metric TEXT NOT NULL, adjustment TEXT NOT NULL DEFAULT '',
    sum DOUBLE PRECISION NOT NULL, count BIGINT NOT NULL, max DOUBLE PRECISION NOT NULL,
    PRIMARY KEY ("window", dim, value, metric, start_ms, adjustment));
-- Totals are updated in place batch after batch: room left on each page
-- lets PostgreSQL write the new version beside the old (a HOT update)
-- without a new entry in the wide key's index.
ALTER TABLE aggregates SET (fillfactor = 70);
ALTER TABLE usage SET (fillfactor = 70);
ALTER TABLE usage_days SET (fillfactor = 70);
CREATE TABLE IF NOT EXISTS closed_periods (period TEXT PRIMARY KEY, closed_at_ms BIGINT NOT NULL);
"#;

/// How often a batch that met a deadlock or a serialization failure runs
/// again before its sender hears of it.
const ATTEMPTS: usize = 5;

pub(crate) struct PgStore {
    /// Reads take `&self`; the client needs `&mut` for any statement.
    client: Mutex<postgres::Client>,
    /// Where it connected, for another connection (never printed: the URL
    /// may hold a password).
    url: String,
    schema: String,
}

impl PgStore {
    /// Connects and makes the tables in `schema` if missing.
    pub(crate) fn connect(url: &str, schema: &str) -> Result<PgStore, MeterError> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(MeterError::Input(format!(
                "invalid schema name {schema:?}: use letters, digits and _"
            )));
        }
        let client = commons_blocking::outside_async(|| {
            let mut client = postgres::Client::connect(url, postgres::NoTls)?;
            // Instances starting at once would race to make the same schema.
            let mut tx = client.transaction()?;
            tx.batch_execute(&format!(
                "SELECT pg_advisory_xact_lock(hashtext('commons meter schema'));
                 CREATE SCHEMA IF NOT EXISTS {schema}; SET LOCAL search_path TO {schema}; {SCHEMA}"
            ))?;
            tx.commit()?;
            client.batch_execute(&format!("SET search_path TO {schema}"))?;
            Ok::<_, postgres::Error>(client)
        })?;
        Ok(PgStore {
            client: Mutex::new(client),
            url: url.to_string(),
            schema: schema.to_string(),
        })
    }

    /// Runs `f` with the client, off any async runtime's thread.
    fn with<R: Send>(&self, f: impl FnOnce(&mut postgres::Client) -> R + Send) -> R {
        let mut guard = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let client: &mut postgres::Client = &mut guard;
        commons_blocking::outside_async(move || f(client))
    }

    /// One batch on `client`: again on a deadlock or a serialization
    /// failure, up to [`ATTEMPTS`] times.
    fn transaction_on(
        client: &mut postgres::Client,
        work: &mut Work<'_>,
    ) -> Result<Vec<Outcome>, MeterError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut run =
                |client: &mut postgres::Client| -> Result<_, Result<MeterError, postgres::Error>> {
                    let mut tx = client.transaction().map_err(Err)?;
                    // A close waits for this batch; this batch for a close.
                    tx.batch_execute("LOCK TABLE closed_periods IN SHARE MODE")
                        .map_err(Err)?;
                    let mut ptx = PgTx(tx);
                    let out = work(&mut ptx).map_err(Ok)?;
                    ptx.0.commit().map_err(Err)?;
                    Ok(out)
                };
            // A conflict may surface from any statement of the batch.
            let failed: MeterError = match run(client) {
                Ok(out) => return Ok(out),
                Err(Err(e)) => e.into(),
                Err(Ok(e)) => e,
            };
            match failed {
                MeterError::Conflict(_) if attempt < ATTEMPTS => continue,
                e => return Err(e),
            }
        }
    }
}

struct PgTx<'c>(postgres::Transaction<'c>);

impl Tx for PgTx<'_> {
    fn closed_at(&mut self, period: &str) -> Result<Option<i64>, MeterError> {
        Ok(self
            .0
            .query_opt(
                "SELECT closed_at_ms FROM closed_periods WHERE period = $1",
                &[&period],
            )?
            .map(|r| r.get(0)))
    }

    fn digests(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Vec<u8>>>, MeterError> {
        let (sources, ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let rows = self.0.query(
            "SELECT e.source, e.id, e.digest FROM events e
             JOIN unnest($1::text[], $2::text[]) AS k(source, id) ON e.source = k.source AND e.id = k.id",
            &[&sources, &ids],
        )?;
        let mut found: std::collections::HashMap<(String, String), Vec<u8>> = rows
            .into_iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        Ok(keys
            .iter()
            .map(|(s, i)| found.remove(&(s.to_string(), i.to_string())))
            .collect())
    }

    fn insert_events(&mut self, rows: &[EventRow<'_>]) -> Result<Vec<Option<Vec<u8>>>, MeterError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // In key order: two batches repeating each other's events take the
        // key's locks in one order, so they wait rather than deadlock.
        let mut sorted: Vec<&EventRow<'_>> = rows.iter().collect();
        sorted.sort_unstable_by_key(|r| (r.source, r.id));
        let sources: Vec<&str> = sorted.iter().map(|r| r.source).collect();
        let ids: Vec<&str> = sorted.iter().map(|r| r.id).collect();
        let digests: Vec<&[u8]> = sorted.iter().map(|r| r.digest.as_slice()).collect();
        let periods: Vec<&str> = sorted.iter().map(|r| r.period.as_str()).collect();
        let times: Vec<i64> = sorted.iter().map(|r| r.time_ms).collect();
        let kinds: Vec<&str> = sorted.iter().map(|r| r.kind).collect();
        let dims: Vec<Vec<Option<&str>>> = (0..5)
            .map(|d| sorted.iter().map(|r| r.dims[d]).collect())
            .collect();
        let data: Vec<&str> = sorted.iter().map(|r| r.data.as_str()).collect();
        let backfills: Vec<Option<&str>> = sorted.iter().map(|r| r.backfill).collect();
        let columns: [&(dyn postgres::types::ToSql + Sync); 13] = [
            &sources, &ids, &digests, &periods, &times, &kinds, &dims[0], &dims[1], &dims[2],
            &dims[3], &dims[4], &data, &backfills,
        ];
        const ROWS: &str = r#"INSERT INTO events (source, id, digest, period, time_ms, type, "user", site, operator, provider, node, data, backfill)
               SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::bigint[], $6::text[],
                                    $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])"#;
        // Most batches repeat nothing, and a plain insert costs half what
        // one that looks for conflicts does: tried first, in a savepoint;
        // a repeated key undoes it, and the careful insert follows. A batch
        // delivered again repeats whole: its first key, stored already,
        // sends it to the careful insert at once.
        let first_stored = self
            .0
            .query_opt(
                "SELECT 1 FROM events WHERE source = $1 AND id = $2",
                &[&sources[0], &ids[0]],
            )?
            .is_some();
        if !first_stored {
            let mut attempt = self.0.savepoint("events")?;
            match attempt.execute(ROWS, &columns) {
                Ok(_) => {
                    attempt.commit()?;
                    return Ok(vec![None; rows.len()]);
                }
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    attempt.rollback()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let stored = self.0.query(
            &format!("{ROWS} ON CONFLICT (source, id) DO NOTHING RETURNING source, id"),
            &columns,
        )?;
        // Keys are unique within `rows`: as many stored as given is all of
        // them, the usual case, and no key needs reading back.
        let repeats: Vec<usize> = if stored.len() == rows.len() {
            Vec::new()
        } else {
            let new: HashSet<(&str, &str)> = stored.iter().map(|r| (r.get(0), r.get(1))).collect();
            (0..rows.len())
                .filter(|&i| !new.contains(&(rows[i].source, rows[i].id)))
                .collect()
        };
        let mut out = vec![None; rows.len()];
        if !repeats.is_empty() {
            let keys: Vec<(&str, &str)> = repeats
                .iter()
                .map(|&i| (rows[i].source, rows[i].id))
                .collect();
            for (i, digest) in repeats.into_iter().zip(self.digests(&keys)?) {
                // Stored, since the insert met it (a revert in between would
                // have had to wait for this batch's row locks).
                out[i] = Some(digest.ok_or_else(|| {
                    MeterError::Store(format!(
                        "event {}/{} vanished while stored",
                        rows[i].source, rows[i].id
                    ))
                })?);
            }
        }
        Ok(out)
    }

    fn add_totals(&mut self, totals: &Totals<'_>) -> Result<(), MeterError> {
        let adjustment = totals.adjustment;
        if !totals.aggregates.is_empty() {
            let a = &totals.aggregates;
            let windows: Vec<&str> = a.iter().map(|((w, ..), _)| w.name()).collect();
            let starts: Vec<i64> = a.iter().map(|((.., s), _)| *s).collect();
            let dims: Vec<&str> = a.iter().map(|((_, d, ..), _)| *d).collect();
            let values: Vec<&str> = a.iter().map(|((_, _, v, ..), _)| *v).collect();
            let metrics: Vec<&str> = a.iter().map(|((_, _, _, m, _), _)| *m).collect();
            let sums: Vec<f64> = a.iter().map(|(_, g)| g.sum).collect();
            let counts: Vec<i64> = a.iter().map(|(_, g)| g.count).collect();
            let maxes: Vec<f64> = a.iter().map(|(_, g)| g.max).collect();
            self.0.execute(
                r#"INSERT INTO aggregates ("window", start_ms, dim, value, metric, adjustment, sum, count, max)
                   SELECT w, s, d, v, m, $9, su, c, mx
                   FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                               $6::float8[], $7::bigint[], $8::float8[]) AS t(w, s, d, v, m, su, c, mx)
                   ON CONFLICT ("window", dim, value, metric, start_ms, adjustment) DO UPDATE SET
                     sum = aggregates.sum + excluded.sum, count = aggregates.count + excluded.count,
                     max = GREATEST(aggregates.max, excluded.max)"#,
                &[
                    &windows, &starts, &dims, &values, &metrics, &sums, &counts, &maxes,
                    &adjustment,
                ],
            )?;
        }
        if !totals.usage.is_empty() {
            let u = &totals.usage;
            let periods: Vec<&str> = u.iter().map(|r| r.0).collect();
            let users: Vec<&str> = u.iter().map(|r| r.1).collect();
            let sites: Vec<&str> = u.iter().map(|r| r.2).collect();
            let events: Vec<i64> = u.iter().map(|r| r.3).collect();
            self.0.execute(
                r#"INSERT INTO usage (period, "user", site, adjustment, events)
                   SELECT p, u, s, $5, n FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS t(p, u, s, n)
                   ON CONFLICT (period, "user", site, adjustment) DO UPDATE SET events = usage.events + excluded.events"#,
                &[&periods, &users, &sites, &events, &adjustment],
            )?;
        }
        if !totals.usage_days.is_empty() {
            let u = &totals.usage_days;
            let users: Vec<&str> = u.iter().map(|r| r.0).collect();
            let days: Vec<i64> = u.iter().map(|r| r.1).collect();
            let sites: Vec<&str> = u.iter().map(|r| r.2).collect();
            let events: Vec<i64> = u.iter().map(|r| r.3).collect();
            self.0.execute(
                r#"INSERT INTO usage_days ("user", day_ms, site, adjustment, events)
                   SELECT u, d, s, $5, n FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) AS t(u, d, s, n)
                   ON CONFLICT ("user", day_ms, site, adjustment) DO UPDATE SET events = usage_days.events + excluded.events"#,
                &[&users, &days, &sites, &events, &adjustment],
            )?;
        }
        if !totals.last_requests.is_empty() {
            let (sites, times): (Vec<&str>, Vec<i64>) =
                totals.last_requests.iter().copied().unzip();
            self.0.execute(
                "INSERT INTO last_requests (site, time_ms) SELECT * FROM unnest($1::text[], $2::bigint[])
                 ON CONFLICT (site) DO UPDATE SET time_ms = GREATEST(last_requests.time_ms, excluded.time_ms)",
                &[&sites, &times],
            )?;
        }
        Ok(())
    }
}

impl Store for PgStore {
    fn reopen(&self) -> Result<Box<dyn Store>, MeterError> {
        Ok(Box::new(PgStore::connect(&self.url, &self.schema)?))
    }

    fn transaction(&mut self, work: &mut Work<'_>) -> Result<Vec<Outcome>, MeterError> {
        self.with(|client| Self::transaction_on(client, work))
    }

    fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            let n = tx.execute("DELETE FROM events WHERE backfill = $1", &[&backfill])?;
            for table in ["aggregates", "usage", "usage_days"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE adjustment = $1"),
                    &[&backfill],
                )?;
            }
            tx.commit()?;
            Ok(n as usize)
        })
    }

    fn close_period(&self, period: &str, at_ms: i64) -> Result<(), MeterError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO closed_periods (period, closed_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&period, &at_ms],
            )
        })?;
        Ok(())
    }

    fn closed_at(&self, period: &str) -> Result<Option<i64>, MeterError> {
        let row = self.with(|c| {
            c.query_opt(
                "SELECT closed_at_ms FROM closed_periods WHERE period = $1",
                &[&period],
            )
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    fn aggregates(&self, q: &Query<'_>) -> Result<Vec<(i64, f64)>, MeterError> {
        let select = match q.aggregation {
            Aggregation::Sum => "SUM(sum)",
            Aggregation::Count => "SUM(count)::float8",
            Aggregation::Max => "MAX(max)",
        };
        let sql = format!(
            r#"SELECT start_ms, {select} FROM aggregates
               WHERE "window" = $1 AND dim = $2 AND value = $3 AND metric = $4 AND start_ms >= $5 AND start_ms < $6
               GROUP BY start_ms ORDER BY start_ms"#
        );
        let rows = self.with(|c| {
            c.query(
                &sql,
                &[
                    &q.window.name(),
                    &q.dim,
                    &q.value,
                    &q.metric,
                    &q.from_ms,
                    &q.to_ms,
                ],
            )
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn unique_count(
        &self,
        dim: &str,
        value: &str,
        field: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, MeterError> {
        let sql = format!(
            r#"SELECT COUNT(DISTINCT "{field}") FROM events WHERE "{dim}" = $1 AND time_ms >= $2 AND time_ms < $3"#
        );
        let n: i64 = self
            .with(|c| c.query_one(&sql, &[&value, &from_ms, &to_ms]))?
            .get(0);
        Ok(n as u64)
    }

    fn usage(&self, period: &str) -> Result<Vec<(String, String, i64)>, MeterError> {
        let rows = self.with(|c| {
            c.query(
                r#"SELECT "user", site, SUM(events)::bigint FROM usage WHERE period = $1
                   GROUP BY "user", site ORDER BY "user", site"#,
                &[&period],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn provider_units(&self, period: &str) -> Result<Vec<(String, String, f64)>, MeterError> {
        // A period's events are those of its time span (the time range lets
        // the range index find them).
        let (start, end) = crate::period_bounds(period)
            .ok_or_else(|| MeterError::Input(format!("invalid period {period:?}: use YYYY-MM")))?;
        let rows = self.with(|c| {
            c.query(
                "SELECT site, provider, SUM(CASE type
                     WHEN 'request' THEN COALESCE((data::jsonb->>'count')::float8, 1)
                     WHEN 'resources' THEN COALESCE((data::jsonb->>'cpu_ms')::float8, 0) / 1000.0
                         + COALESCE((data::jsonb->>'memory_byte_seconds')::float8, 0) / 1073741824.0
                     ELSE 0 END)::float8
                 FROM events WHERE period = $1 AND time_ms >= $2 AND time_ms < $3
                     AND site IS NOT NULL AND provider IS NOT NULL
                 GROUP BY site, provider ORDER BY site, provider",
                &[&period, &start, &end],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn sites_used(&self, period: &str, user: &str) -> Result<Vec<(String, i64)>, MeterError> {
        let rows = self.with(|c| {
            c.query(
                r#"SELECT site, SUM(events)::bigint AS n FROM usage WHERE period = $1 AND "user" = $2
                   GROUP BY site ORDER BY n DESC, site"#,
                &[&period, &user],
            )
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn site_days(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>, MeterError> {
        let rows = self.with(|c| {
            c.query(
                r#"SELECT day_ms, site, SUM(events)::bigint FROM usage_days
                   WHERE "user" = $1 AND day_ms >= $2 AND day_ms < $3 GROUP BY day_ms, site ORDER BY day_ms, site"#,
                &[&user, &from_ms, &to_ms],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError> {
        Ok(self
            .with(|c| {
                c.query_opt(
                    "SELECT time_ms FROM last_requests WHERE site = $1",
                    &[&site],
                )
            })?
            .map(|r| r.get(0)))
    }
}
