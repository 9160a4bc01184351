//! The scale-out store: the meter's tables in a schema of their own on
//! PostgreSQL, shared by every platform instance. A batch is a handful of
//! statements whatever its size: rows go in as arrays (`unnest`).
//!
//! Totals are not updated by the batch. Updating a row in place costs
//! PostgreSQL several times what appending one does, and a batch touches
//! every site it has events of (at 50,000 sites, about as many totals as
//! events). So a batch appends its cube (its totals to the minute) to
//! `pending_totals`, and a compactor folds that table into the totals,
//! many batches at a time, one compactor per schema at once (an advisory
//! lock). Every read adds what is still pending in the same statement (one
//! snapshot), so a read after a batch sees it whether folded or not.
//!
//! Concurrent batches: a repeat of an event another batch is storing waits
//! for that batch's commit, then reads as a repeat; a batch that meets a
//! deadlock or a serialization failure runs again. A period's close waits
//! for the batches in flight (they hold `closed_periods` in share mode), so
//! no event of a closed period is counted after its close.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    Aggregation, Cube, EventRow, MeterError, Outcome, Query, Store, Tx, Window, Work, DIMENSIONS,
};

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
-- Totals are updated in place fold after fold: room left on each page
-- lets PostgreSQL write the new version beside the old (a HOT update)
-- without a new entry in the wide key's index.
ALTER TABLE aggregates SET (fillfactor = 70);
ALTER TABLE usage SET (fillfactor = 70);
ALTER TABLE usage_days SET (fillfactor = 70);
CREATE TABLE IF NOT EXISTS closed_periods (period TEXT PRIMARY KEY, closed_at_ms BIGINT NOT NULL);
-- Batches' cubes not yet folded into the totals: appended, then deleted
-- whole by the compactor. Kept small by it; read whole (but by site, for a
-- site's last request).
CREATE TABLE IF NOT EXISTS pending_totals (
    minute_ms BIGINT NOT NULL, period TEXT NOT NULL,
    "user" TEXT, site TEXT, operator TEXT, provider TEXT,
    metric TEXT NOT NULL, adjustment TEXT NOT NULL,
    sum DOUBLE PRECISION NOT NULL, count BIGINT NOT NULL, max DOUBLE PRECISION NOT NULL,
    events BIGINT NOT NULL, last_request_ms BIGINT);
CREATE INDEX IF NOT EXISTS pending_totals_by_site ON pending_totals (site);
ALTER TABLE pending_totals SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 20000);
"#;

/// A window's start, in SQL, for a time `ms` and a window length `w` (as
/// [`Window::start`]: the remainder taken toward minus infinity).
fn window_start(ms: &str, w: &str) -> String {
    format!("({ms} - mod(mod({ms}, {w}) + {w}, {w}))")
}

/// Folds everything pending into the totals, in one statement: the
/// aggregates per window and dimension, usage per period and per day, and
/// sites' last requests. Returns how many pending rows it folded. One fold
/// at a time (under [`totals_lock`]) and batches not updating totals: no
/// two writers take a total's lock, so no order is kept.
fn compaction_sql() -> String {
    let windows = Window::ALL
        .iter()
        .map(|w| format!("('{}', {}::bigint)", w.name(), w.ms()))
        .collect::<Vec<_>>()
        .join(", ");
    let dims = DIMENSIONS
        .iter()
        .map(|d| format!("('{d}', m.\"{d}\")"))
        .collect::<Vec<_>>()
        .join(", ");
    let start = window_start("m.minute_ms", "w.ms");
    let day = window_start("minute_ms", &Window::Day.ms().to_string());
    format!(
        r#"WITH moved AS (DELETE FROM pending_totals RETURNING *),
        -- Batches' cells of one key made one first: the grouping below
        -- multiplies each by its dimensions and windows.
        cells AS (
          SELECT minute_ms, period, "user", site, operator, provider, metric, adjustment,
                 SUM(sum) AS sum, SUM(count) AS count, MAX(max) AS max,
                 SUM(events) AS events, MAX(last_request_ms) AS last_request_ms
          FROM moved GROUP BY 1, 2, 3, 4, 5, 6, 7, 8),
        aggs AS (
          INSERT INTO aggregates ("window", start_ms, dim, value, metric, adjustment, sum, count, max)
          SELECT w.name, {start}, d.dim, d.value, m.metric, m.adjustment, SUM(m.sum), SUM(m.count), MAX(m.max)
          FROM cells m
          CROSS JOIN LATERAL (VALUES {dims}) AS d(dim, value)
          CROSS JOIN (VALUES {windows}) AS w(name, ms)
          WHERE d.value IS NOT NULL
          GROUP BY 1, 2, 3, 4, 5, 6
          ON CONFLICT ("window", dim, value, metric, start_ms, adjustment) DO UPDATE SET
            sum = aggregates.sum + excluded.sum, count = aggregates.count + excluded.count,
            max = GREATEST(aggregates.max, excluded.max)),
        periods AS (
          INSERT INTO usage (period, "user", site, adjustment, events)
          SELECT period, "user", site, adjustment, SUM(events) FROM cells
          WHERE "user" IS NOT NULL AND site IS NOT NULL AND events > 0
          GROUP BY 1, 2, 3, 4
          ON CONFLICT (period, "user", site, adjustment) DO UPDATE SET events = usage.events + excluded.events),
        days AS (
          INSERT INTO usage_days ("user", day_ms, site, adjustment, events)
          SELECT "user", {day}, site, adjustment, SUM(events) FROM cells
          WHERE "user" IS NOT NULL AND site IS NOT NULL AND events > 0
          GROUP BY 1, 2, 3, 4
          ON CONFLICT ("user", day_ms, site, adjustment) DO UPDATE SET events = usage_days.events + excluded.events),
        lasts AS (
          INSERT INTO last_requests (site, time_ms)
          SELECT site, MAX(last_request_ms) FROM cells
          WHERE site IS NOT NULL AND last_request_ms IS NOT NULL
          GROUP BY 1
          ON CONFLICT (site) DO UPDATE SET time_ms = GREATEST(last_requests.time_ms, excluded.time_ms))
        SELECT COUNT(*) FROM moved"#
    )
}

/// The advisory lock one compaction (or a backfill's revert) holds.
fn totals_lock(schema: &str) -> String {
    format!("commons meter totals {schema}")
}

/// Folds the pending cubes into the totals on `client`: after the one in
/// flight when `wait`, else not at all when one is in flight. Returns how
/// many pending rows it folded.
fn compact_on(client: &mut postgres::Client, schema: &str, wait: bool) -> Result<i64, MeterError> {
    let mut tx = client.transaction()?;
    let lock = totals_lock(schema);
    if wait {
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock])?;
    } else if !tx
        .query_one("SELECT pg_try_advisory_xact_lock(hashtext($1))", &[&lock])?
        .get::<_, bool>(0)
    {
        return Ok(0);
    }
    // Grouping a fold's cells in memory rather than in files on disk.
    tx.batch_execute("SET LOCAL work_mem = '256MB'")?;
    let n: i64 = tx.query_one(&compaction_sql(), &[])?.get(0);
    tx.commit()?;
    Ok(n)
}

/// How often the compactor folds. Each fold updates every total its batches
/// touched once, however many batches touched it: the longer between folds,
/// the fewer updates per event (a site's totals once per fold rather than
/// once per batch), and the more a read adds from `pending_totals`.
const FOLD_EVERY: Duration = Duration::from_secs(10);
/// How long it waits after a failure (the server away, say).
const COMPACTOR_RETRY: Duration = Duration::from_secs(1);

/// The compactor of a store: a thread with a connection of its own, folding
/// pending cubes into the totals as long as the store is open.
struct Compactor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    fn start(url: String, schema: String) -> Compactor {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("meter-compactor".into())
            .spawn(move || {
                let mut client: Option<postgres::Client> = None;
                let mut pause = FOLD_EVERY;
                loop {
                    let until = std::time::Instant::now() + pause;
                    while std::time::Instant::now() < until {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let folded = (|| {
                        let c = match &mut client {
                            Some(c) if !c.is_closed() => c,
                            // Without making the schema: one dropped while
                            // this runs stays dropped.
                            _ => client.insert(session(&url, &schema)?),
                        };
                        compact_on(c, &schema, false)
                    })();
                    pause = match folded {
                        Ok(_) => FOLD_EVERY,
                        Err(e) => {
                            tracing::warn!(schema = %schema, error = %e, "folding usage into the totals failed; trying again");
                            client = None;
                            COMPACTOR_RETRY
                        }
                    };
                }
            })
            .expect("a thread for the meter's compactor");
        Compactor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A connection working in `schema` (which it does not make).
fn session(url: &str, schema: &str) -> Result<postgres::Client, MeterError> {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    client.batch_execute(&format!("SET search_path TO {schema}"))?;
    Ok(client)
}

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
    /// On the store first opened, not on its other connections.
    _compactor: Option<Compactor>,
}

impl PgStore {
    /// Connects, makes the tables in `schema` if missing, and starts the
    /// compactor that folds batches into the totals while this store is
    /// open.
    pub(crate) fn open(url: &str, schema: &str) -> Result<PgStore, MeterError> {
        let mut store = PgStore::connect(url, schema)?;
        store._compactor = Some(Compactor::start(url.to_string(), schema.to_string()));
        Ok(store)
    }

    /// Connects and makes the tables in `schema` if missing.
    fn connect(url: &str, schema: &str) -> Result<PgStore, MeterError> {
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
            _compactor: None,
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

    fn add_totals(&mut self, cube: &Cube<'_>) -> Result<(), MeterError> {
        if cube.cells.is_empty() {
            return Ok(());
        }
        let c = &cube.cells;
        let minutes: Vec<i64> = c.iter().map(|((m, ..), _)| *m).collect();
        let periods: Vec<&str> = c.iter().map(|((_, p, ..), _)| *p).collect();
        let dims: Vec<Vec<Option<&str>>> = (0..DIMENSIONS.len())
            .map(|d| c.iter().map(|((_, _, dims, _), _)| dims[d]).collect())
            .collect();
        let metrics: Vec<&str> = c.iter().map(|((.., m), _)| *m).collect();
        let sums: Vec<f64> = c.iter().map(|(_, cell)| cell.agg.sum).collect();
        let counts: Vec<i64> = c.iter().map(|(_, cell)| cell.agg.count).collect();
        let maxes: Vec<f64> = c.iter().map(|(_, cell)| cell.agg.max).collect();
        let events: Vec<i64> = c.iter().map(|(_, cell)| cell.events).collect();
        let lasts: Vec<Option<i64>> = c.iter().map(|(_, cell)| cell.last_request_ms).collect();
        self.0.execute(
            r#"INSERT INTO pending_totals (minute_ms, period, "user", site, operator, provider, metric,
                                          adjustment, sum, count, max, events, last_request_ms)
               SELECT mi, p, u, s, o, pr, me, $13, su, c, mx, n, l
               FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                           $7::text[], $8::float8[], $9::bigint[], $10::float8[], $11::bigint[], $12::bigint[])
                    AS t(mi, p, u, s, o, pr, me, su, c, mx, n, l)"#,
            &[
                &minutes, &periods, &dims[0], &dims[1], &dims[2], &dims[3], &metrics, &sums,
                &counts, &maxes, &events, &lasts, &cube.adjustment,
            ],
        )?;
        Ok(())
    }
}

impl Store for PgStore {
    fn reopen(&self) -> Result<Box<dyn Store>, MeterError> {
        Ok(Box::new(PgStore::connect(&self.url, &self.schema)?))
    }

    fn compact(&self) -> Result<i64, MeterError> {
        let schema = self.schema.clone();
        self.with(move |client| compact_on(client, &schema, true))
    }

    fn transaction(&mut self, work: &mut Work<'_>) -> Result<Vec<Outcome>, MeterError> {
        self.with(|client| Self::transaction_on(client, work))
    }

    fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError> {
        let lock = totals_lock(&self.schema);
        self.with(|client| {
            let mut tx = client.transaction()?;
            // Not while a compaction moves the backfill's pending rows.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock])?;
            let n = tx.execute("DELETE FROM events WHERE backfill = $1", &[&backfill])?;
            for table in ["aggregates", "usage", "usage_days", "pending_totals"] {
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
        // The column of the dimension, named only from the known ones.
        let Some(dim) = DIMENSIONS.iter().find(|d| **d == q.dim) else {
            return Err(MeterError::Input(format!("unknown dimension {:?}", q.dim)));
        };
        let pending_start = window_start("minute_ms", "$7");
        let sql = format!(
            r#"SELECT start_ms, {select} FROM (
                 SELECT start_ms, sum, count, max FROM aggregates
                 WHERE "window" = $1 AND dim = $2 AND value = $3 AND metric = $4 AND start_ms >= $5 AND start_ms < $6
                 UNION ALL
                 SELECT start_ms, sum, count, max FROM (
                   SELECT {pending_start} AS start_ms, sum, count, max FROM pending_totals
                   WHERE "{dim}" = $3 AND metric = $4) AS p
                 WHERE start_ms >= $5 AND start_ms < $6) AS t
               GROUP BY start_ms ORDER BY start_ms"#
        );
        let window_ms = q.window.ms();
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
                    &window_ms,
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
                r#"SELECT "user", site, SUM(events)::bigint FROM (
                     SELECT "user", site, events FROM usage WHERE period = $1
                     UNION ALL
                     SELECT "user", site, events FROM pending_totals
                     WHERE period = $1 AND "user" IS NOT NULL AND site IS NOT NULL AND events > 0) AS t
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
                r#"SELECT site, SUM(events)::bigint AS n FROM (
                     SELECT site, events FROM usage WHERE period = $1 AND "user" = $2
                     UNION ALL
                     SELECT site, events FROM pending_totals
                     WHERE period = $1 AND "user" = $2 AND site IS NOT NULL AND events > 0) AS t
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
        let pending_day = window_start("minute_ms", &Window::Day.ms().to_string());
        let sql = format!(
            r#"SELECT day_ms, site, SUM(events)::bigint FROM (
                 SELECT day_ms, site, events FROM usage_days WHERE "user" = $1
                 UNION ALL
                 SELECT {pending_day}, site, events FROM pending_totals
                 WHERE "user" = $1 AND site IS NOT NULL AND events > 0) AS t (day_ms, site, events)
               WHERE day_ms >= $2 AND day_ms < $3 GROUP BY day_ms, site ORDER BY day_ms, site"#
        );
        let rows = self.with(|c| c.query(&sql, &[&user, &from_ms, &to_ms]))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError> {
        Ok(self
            .with(|c| {
                c.query_one(
                    "SELECT GREATEST(
                       (SELECT time_ms FROM last_requests WHERE site = $1),
                       (SELECT MAX(last_request_ms) FROM pending_totals WHERE site = $1))",
                    &[&site],
                )
            })?
            .get(0))
    }
}
