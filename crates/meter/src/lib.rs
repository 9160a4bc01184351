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
//!   operator and provider) count every batch from its commit on (SQLite
//!   updates them in the batch; PostgreSQL appends the batch's cube and
//!   folds it in later, reads adding what is not folded yet); UNIQUE_COUNT
//!   is computed exactly from the events.
//!
//! One batch is one transaction: in SQLite (the embedded default, its WAL
//! fsynced at commit; `sqlite.rs`) or in PostgreSQL (scale-out, any number
//! of writers; `pg.rs`). What a batch does is decided here, once; a store
//! only reads and writes rows.

#![forbid(unsafe_code)]

mod pg;
mod sqlite;

use std::collections::HashMap;
use std::path::Path;

use commons_clock::now_ms;
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

    pub(crate) fn ms(self) -> i64 {
        match self {
            Window::Minute => 60_000,
            Window::Hour => 3_600_000,
            Window::Day => 86_400_000,
        }
    }

    pub(crate) fn name(self) -> &'static str {
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
    /// The store could not do it now (not the events' fault): their sender
    /// keeps them and sends them again.
    #[error("meter store: {0}")]
    Store(String),
    /// Concurrent writers met (a deadlock, a serialization failure): the
    /// batch runs again (the PostgreSQL store does so itself).
    #[error("meter store: {0}")]
    Conflict(String),
    #[error("{0}")]
    Input(String),
}

impl From<rusqlite::Error> for MeterError {
    fn from(e: rusqlite::Error) -> Self {
        MeterError::Store(e.to_string())
    }
}

impl From<postgres::Error> for MeterError {
    fn from(e: postgres::Error) -> Self {
        use postgres::error::SqlState;
        // The server's own message, not only "db error".
        let message = match e.as_db_error() {
            Some(db) => format!("PostgreSQL: {}", db.message()),
            None => format!("PostgreSQL: {e}"),
        };
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                MeterError::Conflict(message)
            }
            _ => MeterError::Store(message),
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
    store: Box<dyn Store>,
    /// How long after a period ends its events are still accepted.
    pub grace_ms: i64,
}

/// (window, dimension, value, metric, window start): borrowed from the batch.
pub(crate) type AggKey<'a> = (Window, &'static str, &'a str, &'a str, i64);

#[derive(Default, Clone, Copy)]
pub(crate) struct Agg {
    pub sum: f64,
    pub count: i64,
    pub max: f64,
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

/// One event as stored.
pub(crate) struct EventRow<'a> {
    pub source: &'a str,
    pub id: &'a str,
    pub digest: [u8; 32],
    pub period: String,
    pub time_ms: i64,
    pub kind: &'a str,
    /// The dimensions and the node, in the order of [`DIMENSIONS`] then node.
    pub dims: [Option<&'a str>; 5],
    pub data: String,
    pub backfill: Option<&'a str>,
}

/// A cell of the cube: (minute's start, period, [user, site, operator,
/// provider], metric).
pub(crate) type CellKey<'a> = (i64, &'a str, [Option<&'a str>; 4], &'a str);

/// What the events of one cell add up to.
#[derive(Default, Clone, Copy)]
pub(crate) struct Cell {
    pub agg: Agg,
    /// How many events the usage tables count (on the `events:TYPE` cell
    /// only, so each event is counted once).
    pub events: i64,
    /// The latest request on time among them.
    pub last_request_ms: Option<i64>,
}

/// What a batch adds to the running totals, cell by cell.
pub(crate) struct Cube<'a> {
    /// Backfill id, or "" for events on time.
    pub adjustment: &'a str,
    pub cells: Vec<(CellKey<'a>, Cell)>,
}

/// The running totals a cube adds to, each list in its table's key
/// order (so concurrent writers take row locks in the same order).
pub(crate) struct Totals<'a> {
    /// Backfill id, or "" for events on time.
    pub adjustment: &'a str,
    pub aggregates: Vec<(AggKey<'a>, Agg)>,
    /// (period, user, site, events)
    pub usage: Vec<(&'a str, &'a str, &'a str, i64)>,
    /// (user, day's start, site, events)
    pub usage_days: Vec<(&'a str, i64, &'a str, i64)>,
    /// (site, its latest request in the batch), for events on time only: a
    /// backfill's are of a closed period, and go with its revert.
    pub last_requests: Vec<(&'a str, i64)>,
}

/// A batch's transaction, as the ingest logic sees it.
pub(crate) trait Tx {
    /// When `period` was closed explicitly, if it was.
    fn closed_at(&mut self, period: &str) -> Result<Option<i64>, MeterError>;
    /// The stored digest of each (source, id), if stored.
    fn digests(&mut self, keys: &[(&str, &str)]) -> Result<Vec<Option<Vec<u8>>>, MeterError>;
    /// Stores the rows whose key is new. For each row: `None` if it was
    /// stored now, or the digest its key was stored with before.
    fn insert_events(&mut self, rows: &[EventRow<'_>]) -> Result<Vec<Option<Vec<u8>>>, MeterError>;
    /// Adds a batch's new events to the running totals.
    fn add_totals(&mut self, cube: &Cube<'_>) -> Result<(), MeterError>;
}

/// A batch's work: run in a transaction, again if the store asks.
pub(crate) type Work<'w> = dyn FnMut(&mut dyn Tx) -> Result<Vec<Outcome>, MeterError> + Send + 'w;

/// Where the meter's rows live.
pub(crate) trait Store: Send {
    /// The same store on a new connection.
    fn reopen(&self) -> Result<Box<dyn Store>, MeterError>;
    /// Folds what batches added but the totals do not hold yet into them,
    /// returning how many rows that was (none where batches update the
    /// totals themselves).
    fn compact(&self) -> Result<i64, MeterError> {
        Ok(0)
    }
    /// Runs `work` in one transaction and commits it.
    fn transaction(&mut self, work: &mut Work<'_>) -> Result<Vec<Outcome>, MeterError>;
    fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError>;
    fn close_period(&self, period: &str, at_ms: i64) -> Result<(), MeterError>;
    fn closed_at(&self, period: &str) -> Result<Option<i64>, MeterError>;
    /// Per window start: the aggregation of the matching aggregates.
    fn aggregates(&self, q: &Query<'_>) -> Result<Vec<(i64, f64)>, MeterError>;
    /// `dim` and `field` are checked column names.
    fn unique_count(
        &self,
        dim: &str,
        value: &str,
        field: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<u64, MeterError>;
    /// (user, site, events) in a period, by user then site.
    fn usage(&self, period: &str) -> Result<Vec<(String, String, i64)>, MeterError>;
    /// (site, provider, resource units) in a period, by site then provider.
    fn provider_units(&self, period: &str) -> Result<Vec<(String, String, f64)>, MeterError>;
    /// (site, events) of one user in a period, most used first.
    fn sites_used(&self, period: &str, user: &str) -> Result<Vec<(String, i64)>, MeterError>;
    /// (day's start, site, events) of one user, by day then site.
    fn site_days(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, String, i64)>, MeterError>;
    fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError>;
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
    /// Opens (creating) the embedded store, a SQLite file; `grace_ms` is how
    /// long late events for a period that ended are still taken.
    pub fn open(path: &Path, grace_ms: i64) -> Result<Meter, MeterError> {
        Ok(Meter {
            store: Box::new(sqlite::SqliteStore::open(path)?),
            grace_ms,
        })
    }

    /// Opens (creating) the meter's tables in `schema` on a PostgreSQL
    /// server, which any number of platform instances may share. While it
    /// is open, a thread of its own folds batches into the totals.
    pub fn open_postgres(url: &str, schema: &str, grace_ms: i64) -> Result<Meter, MeterError> {
        Ok(Meter {
            store: Box::new(pg::PgStore::open(url, schema)?),
            grace_ms,
        })
    }

    /// The same meter on a connection of its own, for work beside this
    /// one's: batches in two connections' transactions go on at once (on
    /// PostgreSQL; SQLite's writers take turns).
    pub fn another_connection(&self) -> Result<Meter, MeterError> {
        Ok(Meter {
            store: self.store.reopen()?,
            grace_ms: self.grace_ms,
        })
    }

    /// Folds the batches stored so far into the totals now, rather than when
    /// the PostgreSQL store's compactor comes to them (reads count them
    /// either way). Returns how many pending rows were folded.
    pub fn compact(&self) -> Result<i64, MeterError> {
        self.store.compact()
    }

    /// Closes a period to new events now (backfills still go in).
    pub fn close_period(&self, period: &str) -> Result<(), MeterError> {
        if period_bounds(period).is_none() {
            return Err(MeterError::Input(format!(
                "\"{period}\" is not a period (YYYY-MM)"
            )));
        }
        self.store.close_period(period, now_ms())
    }

    fn is_closed(&self, period: &str, now: i64) -> Result<bool, MeterError> {
        let explicit = self.store.closed_at(period)?;
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
        let grace_ms = self.grace_ms;
        self.store
            .transaction(&mut |tx| ingest_in(tx, events, backfill, now, grace_ms))
    }

    /// Removes a backfill's events and adjustments, whole.
    pub fn revert_backfill(&mut self, backfill: &str) -> Result<usize, MeterError> {
        self.store.revert_backfill(backfill)
    }

    /// An aggregate for one dimension value, per window in a time range;
    /// adjustments (backfills) included.
    pub fn query(&self, q: &Query<'_>) -> Result<Vec<(i64, f64)>, MeterError> {
        if !DIMENSIONS.contains(&q.dim) {
            return Err(MeterError::Input(format!(
                "unknown dimension \"{}\"; use one of {}",
                q.dim,
                DIMENSIONS.join(", ")
            )));
        }
        self.store.aggregates(&Query {
            from_ms: q.window.start(q.from_ms),
            ..*q
        })
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
        self.store.unique_count(dim, value, field, from_ms, to_ms)
    }

    /// Per user, the sites they used in a period and how much (events,
    /// direct and indirect): the weights period close allocates by.
    pub fn usage_by_user(
        &self,
        period: &str,
    ) -> Result<HashMap<String, Vec<(String, u64)>>, MeterError> {
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for (user, site, n) in self.store.usage(period)? {
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
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for (site, provider, units) in self.store.provider_units(period)? {
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
        Ok(self
            .store
            .sites_used(period, user)?
            .into_iter()
            .map(|(site, n)| (site, n.max(0) as u64))
            .collect())
    }

    /// What `user` used per day and site in `[from_ms, to_ms)` (events,
    /// backfills included): (day's start, site, events), by day then site.
    pub fn site_days(
        &self,
        user: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(i64, String, u64)>, MeterError> {
        Ok(self
            .store
            .site_days(user, from_ms, to_ms)?
            .into_iter()
            .map(|(day, site, n)| (day, site, n.max(0) as u64))
            .collect())
    }

    /// When `site` last had a request (ms since the epoch), if ever.
    pub fn last_request(&self, site: &str) -> Result<Option<i64>, MeterError> {
        self.store.last_request(site)
    }

    /// Whether events for `period` are still accepted without a backfill.
    pub fn accepts(&self, period: &str) -> Result<bool, MeterError> {
        Ok(!self.is_closed(period, now_ms())?)
    }
}

/// A repeat's outcome: the same payload is a duplicate, another a conflict.
fn repeat(e: &Event, stored: &[u8], digest: &[u8; 32]) -> Outcome {
    if stored == digest {
        Outcome::Duplicate
    } else {
        Outcome::Rejected(Rejection::Conflict {
            origin: e.source.clone(),
            id: e.id.clone(),
        })
    }
}

/// One batch, inside its transaction: each event checked, deduplicated
/// (within the batch and against the store), stored if new, and the new
/// ones added to the running totals.
fn ingest_in(
    tx: &mut dyn Tx,
    events: &[Event],
    backfill: Option<&str>,
    now: i64,
    grace_ms: i64,
) -> Result<Vec<Outcome>, MeterError> {
    let mut out: Vec<Option<Outcome>> = vec![None; events.len()];
    let mut closed: HashMap<String, bool> = HashMap::new();
    // Keys seen earlier in this batch, for dedup within the batch.
    let mut in_batch: FxHashMap<(&str, &str), [u8; 32]> = FxHashMap::default();
    // Events of closed periods (no backfill): a repeat of one recorded in
    // time is still just a repeat; anything else is late.
    let mut late: Vec<(usize, [u8; 32], String)> = Vec::new();
    let mut rows: Vec<EventRow<'_>> = Vec::with_capacity(events.len());
    // The event each row is.
    let mut row_event: Vec<usize> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let invalid = |message: &str| {
            Some(Outcome::Rejected(Rejection::Invalid {
                id: e.id.clone(),
                message: message.into(),
            }))
        };
        if e.id.is_empty() || e.source.is_empty() || e.kind.is_empty() {
            out[i] = invalid("id, source and type are required");
            continue;
        }
        let Some(time_ms) = parse_time(&e.time) else {
            out[i] = invalid("time must be RFC 3339, e.g. 2026-11-24T10:00:00Z");
            continue;
        };
        // PostgreSQL keeps no NUL in text: refused on either store alike.
        let dims_nul = ["user", "site", "operator", "provider", "node"]
            .iter()
            .any(|k| {
                e.data
                    .get(*k)
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| v.contains('\0'))
            });
        if dims_nul || [&e.id, &e.source, &e.kind].iter().any(|t| t.contains('\0')) {
            out[i] = invalid("text may not contain the NUL character (U+0000)");
            continue;
        }
        let data_json = serde_json::to_string(&e.data).expect("json");
        let d = digest(e, &data_json);
        let key = (e.source.as_str(), e.id.as_str());
        if let Some(prev) = in_batch.get(&key) {
            out[i] = Some(repeat(e, prev, &d));
            continue;
        }
        let period = period_of(time_ms);
        let is_closed = match closed.get(&period) {
            Some(c) => *c,
            None => {
                let (_, end) = period_bounds(&period).unwrap_or((0, 0));
                let c = tx.closed_at(&period)?.is_some() || now > end + grace_ms;
                closed.insert(period.clone(), c);
                c
            }
        };
        if is_closed && backfill.is_none() {
            late.push((i, d, period));
            continue;
        }
        in_batch.insert(key, d);
        let dim = |k: &str| e.data.get(k).and_then(|v| v.as_str());
        rows.push(EventRow {
            source: &e.source,
            id: &e.id,
            digest: d,
            period,
            time_ms,
            kind: &e.kind,
            dims: [
                dim("user"),
                dim("site"),
                dim("operator"),
                dim("provider"),
                dim("node"),
            ],
            data: data_json,
            backfill,
        });
        row_event.push(i);
    }
    if !late.is_empty() {
        let keys: Vec<(&str, &str)> = late
            .iter()
            .map(|(i, ..)| (events[*i].source.as_str(), events[*i].id.as_str()))
            .collect();
        for ((i, d, period), stored) in late.into_iter().zip(tx.digests(&keys)?) {
            let e = &events[i];
            out[i] = Some(match stored {
                Some(s) => repeat(e, &s, &d),
                None => Outcome::Rejected(Rejection::Late {
                    id: e.id.clone(),
                    period,
                }),
            });
        }
    }
    let stored_before = tx.insert_events(&rows)?;
    let inserted: Vec<bool> = stored_before.iter().map(Option::is_none).collect();
    for (r, stored) in stored_before.iter().enumerate() {
        if let Some(stored) = stored {
            out[row_event[r]] = Some(repeat(&events[row_event[r]], stored, &rows[r].digest));
        }
    }
    let new_rows = (0..rows.len())
        .filter(|r| inserted[*r])
        .map(|r| (&rows[r], &events[row_event[r]]));
    // "events:TYPE" metric names, made once per type.
    let kinds: HashMap<&str, String> = events
        .iter()
        .map(|e| (e.kind.as_str(), format!("events:{}", e.kind)))
        .collect();
    tx.add_totals(&cube(new_rows, &kinds, backfill.unwrap_or("")))?;
    for (r, &i) in row_event.iter().enumerate() {
        if inserted[r] {
            out[i] = Some(Outcome::Accepted);
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every event has an outcome"))
        .collect())
}

/// What new events add to the running totals, to the minute: one cell per
/// (minute, period, dimensions, metric), the finest grain every total is
/// made of (aggregates per window, usage per period and per day, a site's
/// last request).
fn cube<'a>(
    new: impl Iterator<Item = (&'a EventRow<'a>, &'a Event)>,
    kinds: &'a HashMap<&'a str, String>,
    adjustment: &'a str,
) -> Cube<'a> {
    let mut cells: FxHashMap<CellKey<'a>, Cell> = FxHashMap::default();
    for (row, e) in new {
        // An aggregated event (the gateway's, under load) stands for
        // `count` events of its type.
        let weight = e
            .data
            .get("count")
            .and_then(|v| v.as_i64())
            .filter(|n| *n > 0)
            .unwrap_or(1);
        let minute = Window::Minute.start(row.time_ms);
        let [user, site, operator, provider, _] = row.dims;
        let dims = [user, site, operator, provider];
        let kind = kinds[e.kind.as_str()].as_str();
        let cell = cells
            .entry((minute, row.period.as_str(), dims, kind))
            .or_default();
        cell.agg.add(weight as f64, 1, weight as f64);
        cell.events += weight;
        if let (Some(_), "request", "") = (site, row.kind, adjustment) {
            cell.last_request_ms = Some(cell.last_request_ms.unwrap_or(i64::MIN).max(row.time_ms));
        }
        for (k, v) in &e.data {
            if let Some(x) = v.as_f64() {
                cells
                    .entry((minute, row.period.as_str(), dims, k.as_str()))
                    .or_default()
                    .agg
                    .add(x, 1, x);
            }
        }
    }
    Cube {
        adjustment,
        cells: cells.into_iter().collect(),
    }
}

impl<'a> Cube<'a> {
    /// The totals the cube adds to, each list in its table's key order.
    fn totals(&self) -> Totals<'a> {
        let mut aggs: FxHashMap<AggKey<'a>, Agg> = FxHashMap::default();
        // (period, user, site) -> events, for the usage table.
        let mut pairs: FxHashMap<(&'a str, &'a str, &'a str), i64> = FxHashMap::default();
        // (user, day, site) -> events, for the usage_days table.
        let mut days: FxHashMap<(&'a str, i64, &'a str), i64> = FxHashMap::default();
        let mut last_requests: FxHashMap<&'a str, i64> = FxHashMap::default();
        for &((minute, period, dims, metric), ref cell) in &self.cells {
            let [user, site, ..] = dims;
            if let Some(site) = site {
                if let Some(t) = cell.last_request_ms {
                    let last = last_requests.entry(site).or_insert(t);
                    *last = (*last).max(t);
                }
            }
            if let (Some(user), Some(site), true) = (user, site, cell.events > 0) {
                *pairs.entry((period, user, site)).or_default() += cell.events;
                *days
                    .entry((user, Window::Day.start(minute), site))
                    .or_default() += cell.events;
            }
            for (d, value) in DIMENSIONS.iter().zip(dims) {
                let Some(value) = value else {
                    continue;
                };
                for w in Window::ALL {
                    aggs.entry((w, d, value, metric, w.start(minute)))
                        .or_default()
                        .add(cell.agg.sum, cell.agg.count, cell.agg.max);
                }
            }
        }
        // In the table's key order: each upsert lands next to the last one's
        // B-tree page, and concurrent writers lock rows in one order.
        let mut aggregates: Vec<(AggKey<'a>, Agg)> = aggs.into_iter().collect();
        aggregates.sort_unstable_by(|((w1, d1, v1, m1, s1), _), ((w2, d2, v2, m2, s2), _)| {
            (w1.name(), d1, v1, m1, s1).cmp(&(w2.name(), d2, v2, m2, s2))
        });
        let mut usage: Vec<(&'a str, &'a str, &'a str, i64)> = pairs
            .into_iter()
            .map(|((p, u, s), n)| (p, u, s, n))
            .collect();
        usage.sort_unstable();
        let mut usage_days: Vec<(&'a str, i64, &'a str, i64)> = days
            .into_iter()
            .map(|((u, d, s), n)| (u, d, s, n))
            .collect();
        usage_days.sort_unstable();
        let mut last_requests: Vec<(&'a str, i64)> = last_requests.into_iter().collect();
        last_requests.sort_unstable();
        Totals {
            adjustment: self.adjustment,
            aggregates,
            usage,
            usage_days,
            last_requests,
        }
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
