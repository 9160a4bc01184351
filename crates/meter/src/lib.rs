//! Metering: usage events in, exact aggregates out.
//!
//! Events are CloudEvents (`id`, `source`, `type`, `subject`, `time`, `data`).
//! `data` names who and what (`user`, `site`, `operator`, `provider`,
//! `node`) and carries quantities (any numeric field: `bytes_in`,
//! `duration_ms`, `cpu_ms`, ...).
//!
//! - **Dedup** is durable for the whole billing period: (`source`, `id`) is
//!   the primary key of the event table. The same event again is accepted
//!   and changes nothing; the same key with a different payload is a
//!   [`Rejection::Conflict`] (HTTP 409).
//! - **Late events**: an event for a period whose end plus the grace time has
//!   passed (or that was closed) is refused unless sent as a *backfill*,
//!   which is recorded as an adjustment under its backfill id and can be
//!   reverted whole.
//! - **Aggregates** (SUM, COUNT, MAX per minute, hour and day, by user, site,
//!   operator and provider) are kept up to date per batch; UNIQUE_COUNT is
//!   computed exactly from the events.
//!
//! One batch is one SQLite transaction with the WAL fsynced at commit.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;

use commons_clock::now_ms;
use rusqlite::{params, Connection, OptionalExtension};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A usage event, CloudEvents 1.0 shaped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(default = "spec_version")]
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339.
    pub time: String,
    #[serde(default)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

fn spec_version() -> String {
    "1.0".into()
}

/// The dimensions usage is attributed to.
pub const DIMENSIONS: [&str; 4] = ["user", "site", "operator", "provider"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    Minute,
    Hour,
    Day,
}

impl Window {
    pub const ALL: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

    fn ms(self) -> i64 {
        match self {
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    pub fn start(self, time_ms: i64) -> i64 {
        time_ms - time_ms.rem_euclid(self.ms())
    }
}

/// Why an event was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    #[error("event {origin}/{id} was received before with a different payload")]
    Conflict {
        #[serde(rename = "source")]
        origin: String,
        id: String,
    },
    #[error("event {id} is for period {period}, closed to new events; send it as a backfill")]
    Late { id: String, period: String },
    #[error("event {id} is invalid: {message}")]
    Invalid { id: String, message: String },
}

impl Rejection {
    /// The HTTP status an API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Rejection::Conflict { .. } => 409,
            Rejection::Late { .. } => 422,
            Rejection::Invalid { .. } => 400,
        }
    }
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Accepted,
    /// Already recorded with the same payload: nothing changed.
    Duplicate,
    Rejected(Rejection),
}

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("meter store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Input(String),
}

/// Index of `period` in `list`, adding it if new (a batch spans few periods).
fn period_index(list: &mut Vec<String>, period: &str) -> usize {
    match list.iter().position(|p| p == period) {
        Some(i) => i,
        None => {
            list.push(period.to_string());
            list.len() - 1
        }
    }
}

/// Parses an RFC 3339 time to ms since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    // UTC only ("Z" or no zone): usage is billed in UTC periods.
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

/// A time (ms since the epoch) in RFC 3339, UTC, to the second.
pub fn format_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The billing period (calendar month, UTC) of a time: "2026-11".
pub fn period_of(time_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(time_ms.max(0) as u64);
    humantime::format_rfc3339(t).to_string()[..7].to_string()
}

/// Start and end (exclusive) of a period "YYYY-MM", in ms.
pub fn period_bounds(period: &str) -> Option<(i64, i64)> {
    let (y, m) = period.split_once('-')?;
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) {
        return None;
    }
    let start = parse_time(&format!("{y:04}-{m:02}-01T00:00:00Z"))?;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let end = parse_time(&format!("{ny:04}-{nm:02}-01T00:00:00Z"))?;
    Some((start, end))
}

/// The payload that must match for a repeat to count as the same event:
/// SHA-256 of the JSON array `[type, subject, time, data]`, written
/// straight into the hash. `data_json` is the event's data as JSON, which
/// is stored too: it is serialised once.
fn digest(e: &Event, data_json: &str) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"[");
    serde_json::to_writer(&mut hash, &e.kind).expect("json");
    hash.update(b",");
    serde_json::to_writer(&mut hash, &e.subject).expect("json");
    hash.update(b",");
    serde_json::to_writer(&mut hash, &e.time).expect("json");
    hash.update(b",");
    hash.update(data_json.as_bytes());
    hash.update(b"]");
    hash.finalize().into()
}

/// The metering store.
pub struct Meter {
    conn: Connection,
    /// How long after a period ends its events are still accepted.
    pub grace_ms: i64,
}

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

/// (window, dimension, value, metric, window start): borrowed from the batch.
type AggKey<'a> = (Window, &'static str, &'a str, &'a str, i64);

#[derive(Default, Clone, Copy)]
struct Agg {
    sum: f64,
    count: i64,
    max: f64,
}

impl Agg {
    fn add(&mut self, sum: f64, count: i64, max: f64) {
        self.max = if self.count == 0 {
            max
        } else {
            self.max.max(max)
        };
        self.sum += sum;
        self.count += count;
    }
}

/// What to read from the aggregates.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub window: Window,
    /// One of [`DIMENSIONS`].
    pub dim: &'a str,
    pub value: &'a str,
    /// A numeric field of the events' data, or `events:TYPE` for counts.
    pub metric: &'a str,
    pub aggregation: Aggregation,
    /// Inclusive.
    pub from_ms: i64,
    /// Exclusive.
    pub to_ms: i64,
}

/// An aggregation to query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Sum,
    Count,
    Max,
}

impl Meter {
    /// Opens (creating) the store; `grace_ms` is how long late events for a
    /// period that ended are still taken.
    pub fn open(path: &Path, grace_ms: i64) -> Result<Meter, MeterError> {
        let conn = Connection::open(path)?;
        // The API and the supervisor share the file: wait for each other.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Events and aggregates are B-trees keyed by text; a page cache that
        // holds their hot part keeps inserts from re-reading pages.
        conn.pragma_update(None, "cache_size", -262_144)?; // 256 MiB
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Meter { conn, grace_ms })
    }

    /// Closes a period to new events now (backfills still go in).
    pub fn close_period(&self, period: &str) -> Result<(), MeterError> {
        if period_bounds(period).is_none() {
            return Err(MeterError::Input(format!(
                "\"{period}\" is not a period (YYYY-MM)"
            )));
        }
        self.conn.execute(
            "INSERT OR IGNORE INTO closed_periods (period, closed_at_ms) VALUES (?1, ?2)",
            params![period, now_ms()],
        )?;
        Ok(())
    }

    fn is_closed(&self, period: &str, now: i64) -> Result<bool, MeterError> {
        let explicit: Option<i64> = self
            .conn
            .query_row(
                "SELECT closed_at_ms FROM closed_periods WHERE period = ?1",
                [period],
                |r| r.get(0),
            )
            .optional()?;
        let (_, end) = period_bounds(period).unwrap_or((0, 0));
        Ok(explicit.is_some() || now > end + self.grace_ms)
    }

    /// Ingests a batch of events (one transaction). `backfill`, when given,
    /// admits events of closed periods as adjustments under that id.
    pub fn ingest(
        &mut self,
        events: &[Event],
        backfill: Option<&str>,
    ) -> Result<Vec<Outcome>, MeterError> {
        self.ingest_at(events, backfill, now_ms())
    }

    pub fn ingest_at(
        &mut self,
        events: &[Event],
        backfill: Option<&str>,
        now: i64,
    ) -> Result<Vec<Outcome>, MeterError> {
        let mut closed: HashMap<String, bool> = HashMap::new();
        let mut aggs: FxHashMap<AggKey<'_>, Agg> = FxHashMap::default();
        // (period, user, site) -> events, for the usage table.
        let mut periods: Vec<String> = Vec::new();
        let mut pairs: FxHashMap<(usize, &str, &str), i64> = FxHashMap::default();
        // (user, day, site) -> events, for the usage_days table.
        let mut days: FxHashMap<(&str, i64, &str), i64> = FxHashMap::default();
        // "events:TYPE" metric names, made once per type.
        let kinds: HashMap<&str, String> = events
            .iter()
            .map(|e| (e.kind.as_str(), format!("events:{}", e.kind)))
            .collect();
        let mut out = Vec::with_capacity(events.len());
        // Immediate: the write lock is taken (waiting out the busy timeout)
        // before anything is read; a read snapshot upgraded to a write
        // fails at once when another connection wrote since.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut existing =
                tx.prepare_cached("SELECT digest FROM events WHERE source = ?1 AND id = ?2")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (source, id, digest, period, time_ms, type, user, site, operator, provider, node, data, backfill)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT (source, id) DO NOTHING",
            )?;
            // Keys seen earlier in this batch, for dedup within the batch.
            let mut in_batch: FxHashMap<(&str, &str), [u8; 32]> = FxHashMap::default();
            for e in events {
                let invalid = |message: &str| {
                    Outcome::Rejected(Rejection::Invalid {
                        id: e.id.clone(),
                        message: message.into(),
                    })
                };
                if e.id.is_empty() || e.source.is_empty() || e.kind.is_empty() {
                    out.push(invalid("id, source and type are required"));
                    continue;
                }
                let Some(time_ms) = parse_time(&e.time) else {
                    out.push(invalid("time must be RFC 3339, e.g. 2026-11-24T10:00:00Z"));
                    continue;
                };
                let data_json = serde_json::to_string(&e.data).expect("json");
                let d = digest(e, &data_json);
                if let Some(prev) = in_batch.get(&(e.source.as_str(), e.id.as_str())) {
                    out.push(if *prev == d {
                        Outcome::Duplicate
                    } else {
                        Outcome::Rejected(Rejection::Conflict {
                            origin: e.source.clone(),
                            id: e.id.clone(),
                        })
                    });
                    continue;
                }
                let period = period_of(time_ms);
                let is_closed = match closed.get(&period) {
                    Some(c) => *c,
                    None => {
                        let c = {
                            let explicit: Option<i64> = tx
                                .query_row(
                                    "SELECT closed_at_ms FROM closed_periods WHERE period = ?1",
                                    [&period],
                                    |r| r.get(0),
                                )
                                .optional()?;
                            let (_, end) = period_bounds(&period).unwrap_or((0, 0));
                            explicit.is_some() || now > end + self.grace_ms
                        };
                        closed.insert(period.clone(), c);
                        c
                    }
                };
                if is_closed && backfill.is_none() {
                    // A repeat of an event recorded in time is still just a repeat.
                    let prev: Option<Vec<u8>> = existing
                        .query_row(params![e.source, e.id], |r| r.get(0))
                        .optional()?;
                    out.push(match prev {
                        Some(p) if p == d => Outcome::Duplicate,
                        Some(_) => Outcome::Rejected(Rejection::Conflict {
                            origin: e.source.clone(),
                            id: e.id.clone(),
                        }),
                        None => Outcome::Rejected(Rejection::Late {
                            id: e.id.clone(),
                            period,
                        }),
                    });
                    continue;
                }
                let dim = |k: &str| e.data.get(k).and_then(|v| v.as_str());
                // Insert first: a new event (the common case) costs one B-tree
                // probe; only a repeat reads back the stored digest.
                let inserted = insert.execute(params![
                    e.source,
                    e.id,
                    d,
                    period,
                    time_ms,
                    e.kind,
                    dim("user"),
                    dim("site"),
                    dim("operator"),
                    dim("provider"),
                    dim("node"),
                    data_json,
                    backfill
                ])?;
                if inserted == 0 {
                    let prev: Vec<u8> =
                        existing.query_row(params![e.source, e.id], |r| r.get(0))?;
                    out.push(if prev == d {
                        Outcome::Duplicate
                    } else {
                        Outcome::Rejected(Rejection::Conflict {
                            origin: e.source.clone(),
                            id: e.id.clone(),
                        })
                    });
                    continue;
                }
                in_batch.insert((e.source.as_str(), e.id.as_str()), d);
                // An aggregated event (the gateway's, under load) stands for
                // `count` events of its type.
                let weight = e
                    .data
                    .get("count")
                    .and_then(|v| v.as_i64())
                    .filter(|n| *n > 0)
                    .unwrap_or(1);
                let mut metrics: Vec<(&str, f64)> =
                    vec![(kinds[e.kind.as_str()].as_str(), weight as f64)];
                for (k, v) in &e.data {
                    if let Some(x) = v.as_f64() {
                        metrics.push((k.as_str(), x));
                    }
                }
                if let (Some(user), Some(site)) = (dim("user"), dim("site")) {
                    *pairs
                        .entry((period_index(&mut periods, &period), user, site))
                        .or_default() += weight;
                    *days
                        .entry((user, Window::Day.start(time_ms), site))
                        .or_default() += weight;
                }
                // Minutes here; hours and days are rolled up from them below.
                let minute = Window::Minute.start(time_ms);
                for d in DIMENSIONS {
                    let Some(value) = e.data.get(d).and_then(|v| v.as_str()) else {
                        continue;
                    };
                    for &(m, x) in &metrics {
                        aggs.entry((Window::Minute, d, value, m, minute))
                            .or_default()
                            .add(x, 1, x);
                    }
                }
                out.push(Outcome::Accepted);
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO aggregates (window, start_ms, dim, value, metric, adjustment, sum, count, max)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (window, dim, value, metric, start_ms, adjustment) DO UPDATE SET
                   sum = sum + excluded.sum, count = count + excluded.count, max = MAX(max, excluded.max)",
            )?;
            let adjustment = backfill.unwrap_or("");
            let minutes: Vec<(AggKey<'_>, Agg)> = aggs.iter().map(|(k, a)| (*k, *a)).collect();
            for ((_, d, value, metric, start), a) in minutes {
                for w in [Window::Hour, Window::Day] {
                    aggs.entry((w, d, value, metric, w.start(start)))
                        .or_default()
                        .add(a.sum, a.count, a.max);
                }
            }
            // In the table's key order: each upsert lands next to the last
            // one's B-tree page instead of anywhere in the table.
            let mut rows: Vec<(AggKey<'_>, Agg)> = aggs.into_iter().collect();
            rows.sort_unstable_by(|((w1, d1, v1, m1, s1), _), ((w2, d2, v2, m2, s2), _)| {
                (w1.name(), d1, v1, m1, s1).cmp(&(w2.name(), d2, v2, m2, s2))
            });
            for ((w, d, value, metric, start), a) in rows {
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
            let mut usage = tx.prepare_cached(
                "INSERT INTO usage (period, user, site, adjustment, events) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (period, user, site, adjustment) DO UPDATE SET events = events + excluded.events",
            )?;
            let mut pairs: Vec<((usize, &str, &str), i64)> = pairs.into_iter().collect();
            pairs.sort_unstable_by(|((p1, u1, s1), _), ((p2, u2, s2), _)| {
                (&periods[*p1], u1, s1).cmp(&(&periods[*p2], u2, s2))
            });
            for ((p, user, site), n) in pairs {
                usage.execute(params![periods[p], user, site, adjustment, n])?;
            }
            let mut usage_day = tx.prepare_cached(
                "INSERT INTO usage_days (user, day_ms, site, adjustment, events) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user, day_ms, site, adjustment) DO UPDATE SET events = events + excluded.events",
            )?;
            let mut days: Vec<((&str, i64, &str), i64)> = days.into_iter().collect();
            days.sort_unstable();
            for ((user, day, site), n) in days {
                usage_day.execute(params![user, day, site, adjustment, n])?;
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Removes a backfill's events and adjustments, whole.
    pub fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError> {
        // Immediate: the write lock is taken (waiting out the busy timeout)
        // before anything is read; a read snapshot upgraded to a write
        // fails at once when another connection wrote since.
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

    /// An aggregate for one dimension value, per window in a time range;
    /// adjustments (backfills) included.
    pub fn query(&self, q: &Query<'_>) -> Result<Vec<(i64, f64)>, MeterError> {
        let Query {
            window,
            dim,
            value,
            metric,
            aggregation: agg,
            from_ms,
            to_ms,
        } = *q;
        if !DIMENSIONS.contains(&dim) {
            return Err(MeterError::Input(format!(
                "unknown dimension \"{dim}\"; use one of {}",
                DIMENSIONS.join(", ")
            )));
        }
        let select = match agg {
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
                    window.name(),
                    dim,
                    value,
                    metric,
                    window.start(from_ms),
                    to_ms
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Distinct values of `field` (e.g. `user`) among events for one
    /// dimension value in a time range: exact, from the events themselves.
    pub fn unique_count(
        &self,
        dim: &str,
        value: &str,
        field: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, MeterError> {
        let cols = ["user", "site", "operator", "provider", "node"];
        if !DIMENSIONS.contains(&dim) || !cols.contains(&field) {
            return Err(MeterError::Input(format!(
                "unique counts are over {}",
                cols.join(", ")
            )));
        }
        let n: i64 = self.conn.query_row(
            &format!("SELECT COUNT(DISTINCT {field}) FROM events WHERE {dim} = ?1 AND time_ms >= ?2 AND time_ms < ?3"),
            params![value, from_ms, to_ms],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Per user, the sites they used in a period and how much (events,
    /// direct and indirect): the weights period close allocates by.
    pub fn usage_by_user(
        &self,
        period: &str,
    ) -> Result<HashMap<String, Vec<(String, u64)>>, MeterError> {
        let mut stmt = self.conn.prepare(
            "SELECT user, site, SUM(events) FROM usage WHERE period = ?1 GROUP BY user, site ORDER BY user, site",
        )?;
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        let rows = stmt.query_map([period], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (user, site, n) = row?;
            out.entry(user).or_default().push((site, n as u64));
        }
        Ok(out)
    }

    /// Per site, the providers whose nodes served it in `period` and how
    /// much, in thousandths of a resource unit: one request served, one
    /// CPU-second, one GiB-second of memory each count one unit. A site
    /// that moved mid-period has a share for each provider.
    pub fn providers_by_site(
        &self,
        period: &str,
    ) -> Result<HashMap<String, Vec<(String, u64)>>, MeterError> {
        let mut stmt = self.conn.prepare(
            "SELECT site, provider, SUM(CASE type
                 WHEN 'request' THEN COALESCE(json_extract(data, '$.count'), 1)
                 WHEN 'resources' THEN COALESCE(json_extract(data, '$.cpu_ms'), 0) / 1000.0
                     + COALESCE(json_extract(data, '$.memory_byte_seconds'), 0) / 1073741824.0
                 ELSE 0 END)
             FROM events WHERE period = ?1 AND site IS NOT NULL AND provider IS NOT NULL
             GROUP BY site, provider ORDER BY site, provider",
        )?;
        let rows = stmt.query_map([period], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f64>(2)?,
            ))
        })?;
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for row in rows {
            let (site, provider, units) = row?;
            let milli = (units * 1000.0).round() as u64;
            if milli > 0 {
                out.entry(site).or_default().push((provider, milli));
            }
        }
        Ok(out)
    }

    /// The sites `user` used in `period` and how much (events, direct and
    /// indirect, backfills included): what period close weighs their
    /// payment by.
    pub fn sites_used(&self, period: &str, user: &str) -> Result<Vec<(String, u64)>, MeterError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, SUM(events) FROM usage WHERE period = ?1 AND user = ?2
             GROUP BY site ORDER BY SUM(events) DESC, site",
        )?;
        let rows = stmt
            .query_map(params![period, user], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// What `user` used per day and site in `[from_ms, to_ms)` (events,
    /// backfills included): (day's start, site, events), by day then site.
    pub fn site_days(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, String, u64)>, MeterError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT day_ms, site, SUM(events) FROM usage_days
             WHERE user = ?1 AND day_ms >= ?2 AND day_ms < ?3 GROUP BY day_ms, site ORDER BY day_ms, site",
        )?;
        let rows = stmt
            .query_map(params![user, from_ms, to_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?.max(0) as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// When `site` last had a request (ms since the epoch), if ever.
    pub fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError> {
        Ok(self.conn.query_row(
            "SELECT MAX(time_ms) FROM events WHERE site = ?1 AND type = 'request'",
            [site],
            |r| r.get(0),
        )?)
    }

    /// Whether events for `period` are still accepted without a backfill.
    pub fn accepts(&self, period: &str) -> Result<bool, MeterError> {
        Ok(!self.is_closed(period, now_ms())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored digests outlive releases: an event resent after an upgrade
    /// must still be a duplicate, so the digest is pinned to its bytes.
    #[test]
    fn the_digest_is_sha256_of_the_canonical_array() {
        let data: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"user":"u1","site":"s1","bytes_out":1200,"note":"é \"q\""}"#)
                .unwrap();
        let e = Event {
            specversion: "1.0".into(),
            id: "ev-1".into(),
            source: "gateway/node-1".into(),
            kind: "request".into(),
            subject: None,
            time: "2026-11-24T10:00:00Z".into(),
            data,
        };
        let canon = r#"["request",null,"2026-11-24T10:00:00Z",{"user":"u1","site":"s1","bytes_out":1200,"note":"é \"q\""}]"#;
        let expected: [u8; 32] = Sha256::digest(canon.as_bytes()).into();
        let data = |e: &Event| serde_json::to_string(&e.data).unwrap();
        assert_eq!(digest(&e, &data(&e)), expected);
        let other = Event {
            subject: Some("x".into()),
            ..e
        };
        assert_ne!(digest(&other, &data(&other)), expected);
    }
}
