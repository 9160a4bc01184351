//! The usage tap: one usage record per proxied request, handed to the meter
//! without ever blocking a response.
//!
//! The proxy puts a record on a bounded queue. A writer thread drains it
//! every [`DRAIN_EVERY`] and, every [`FLUSH_EVERY`], folds records with the same (user, site, operator,
//! status, via) into one CloudEvent of type `request` whose `count` says how
//! many requests it stands for, writes the access log, and hands the events
//! to the [`UsageSink`]. When the queue is full the proxy folds the record
//! into an overflow table instead (aggregated, not lost); only when that
//! table is full too is a request dropped, and every drop is counted in
//! `commons_gateway_usage_lost_total`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the writer hands events to the meter.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often the writer takes the queued records.
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// Records waiting in the queue at most: 327,680 requests a second before
/// records are folded on the proxy's side.
pub const QUEUE: usize = 16_384;
/// Distinct aggregation keys kept while the queue is full.
pub const OVERFLOW_KEYS: usize = 100_000;

/// What one request used.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub time_ms: i64,
    pub user: Option<Arc<str>>,
    pub site: Arc<str>,
    pub component: Arc<str>,
    pub operator: Arc<str>,
    /// The site that made this request on the user's behalf.
    pub via: Option<Arc<str>>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_us: u64,
    // For the access log only.
    pub method: http::Method,
    pub host: Arc<str>,
    pub path: Box<str>,
    /// The client's address, formatted once per connection.
    pub peer: Arc<str>,
    pub upstream: Option<std::net::SocketAddr>,
}

/// Where aggregated usage events go (the meter, in `commons serve`).
pub trait UsageSink: Send + 'static {
    fn write(&mut self, events: Vec<commons_meter::Event>);
}

type Key = (
    Option<Arc<str>>,
    Arc<str>,
    Arc<str>,
    Arc<str>,
    u16,
    Option<Arc<str>>,
);

#[derive(Default, Debug, Clone, Copy)]
struct Totals {
    count: u64,
    bytes_in: u64,
    bytes_out: u64,
    duration_us: u64,
    max_duration_us: u64,
    first_ms: i64,
}

impl Totals {
    fn add(&mut self, r: &RequestRecord, count: u64) {
        if self.count == 0 || r.time_ms < self.first_ms {
            self.first_ms = r.time_ms;
        }
        self.count += count;
        self.bytes_in += r.bytes_in;
        self.bytes_out += r.bytes_out;
        self.duration_us += r.duration_us;
        self.max_duration_us = self.max_duration_us.max(r.duration_us);
    }

    /// Adds what `other` counted.
    fn merge(&mut self, other: &Totals) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 || other.first_ms < self.first_ms {
            self.first_ms = other.first_ms;
        }
        self.count += other.count;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.duration_us += other.duration_us;
        self.max_duration_us = self.max_duration_us.max(other.max_duration_us);
    }
}

/// True when two records fold into the same event (see [`key`]); the
/// names are compared by address first, as records of one site share them.
fn same_key(a: &RequestRecord, b: &RequestRecord) -> bool {
    fn same(a: &Arc<str>, b: &Arc<str>) -> bool {
        Arc::ptr_eq(a, b) || a == b
    }
    fn same_opt(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => same(a, b),
            (None, None) => true,
            _ => false,
        }
    }
    a.status == b.status
        && same(&a.site, &b.site)
        && same(&a.component, &b.component)
        && same(&a.operator, &b.operator)
        && same_opt(&a.user, &b.user)
        && same_opt(&a.via, &b.via)
}

fn key(r: &RequestRecord) -> Key {
    (
        r.user.clone(),
        r.site.clone(),
        r.component.clone(),
        r.operator.clone(),
        r.status,
        r.via.clone(),
    )
}

/// Counters the tap exposes as metrics.
#[derive(Default, Debug)]
pub struct TapStats {
    pub recorded: AtomicU64,
    /// Records handed to the sink (folded into events) or counted lost.
    pub handled: AtomicU64,
    pub overflowed: AtomicU64,
    pub lost: AtomicU64,
    pub events: AtomicU64,
}

/// The proxy's end of the tap.
#[derive(Clone)]
pub struct Tap {
    queue: Arc<Queue>,
    overflow: Arc<Mutex<HashMap<Key, Totals>>>,
    pub stats: Arc<TapStats>,
}

impl Tap {
    /// Starts the writer thread. `log` receives one JSON line per request
    /// (the access log); `node` names this gateway in event ids.
    pub fn start(
        sink: Box<dyn UsageSink>,
        log: Option<Box<dyn Write + Send>>,
        node: String,
    ) -> Tap {
        let queue = Arc::new(Queue::default());
        let tap = Tap {
            queue: queue.clone(),
            overflow: Default::default(),
            stats: Default::default(),
        };
        let writer = Writer {
            queue,
            overflow: tap.overflow.clone(),
            stats: tap.stats.clone(),
            sink,
            log: log.map(|w| std::io::BufWriter::with_capacity(64 * 1024, w)),
            node,
            boot_ms: commons_clock::now_ms(),
            seq: 0,
            log_time: (i64::MIN, String::new()),
            log_upstream: (None, String::new()),
            line: Vec::with_capacity(512),
        };
        std::thread::Builder::new()
            .name("commons-usage".into())
            .spawn(move || {
                crate::background_priority();
                writer.run()
            })
            .expect("the usage thread starts");
        tap
    }

    /// Waits (at most `limit`) until every record so far is with the sink:
    /// what a stopping gateway does last, so no request goes unmetered.
    pub fn wait_handled(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let recorded = self.stats.recorded.load(Ordering::Acquire);
            let done = self.stats.handled.load(Ordering::Acquire)
                + self.stats.lost.load(Ordering::Acquire);
            if done >= recorded {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Records one request. Never blocks on the meter.
    pub fn record(&self, r: RequestRecord) {
        self.stats.recorded.fetch_add(1, Ordering::Relaxed);
        match self.queue.push(r) {
            None => {}
            Some(r) => {
                let mut over = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
                let len = over.len();
                match over.get_mut(&key(&r)) {
                    Some(t) => t.add(&r, 1),
                    None if len < OVERFLOW_KEYS => over.entry(key(&r)).or_default().add(&r, 1),
                    None => {
                        self.stats.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                self.stats.overflowed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Records on their way to the writer: a vector the proxy appends to and the
/// writer swaps out whole. A lock held for a push or a swap is cheaper than
/// a channel here: std's bounded channel makes a sender spin while the
/// receiver — on the same CPU, at a lower priority — is preempted in the
/// middle of a receive, and its ring of slots is cold memory.
#[derive(Default)]
struct Queue {
    records: Mutex<Vec<RequestRecord>>,
}

impl Queue {
    /// Appends `r`, or gives it back when the queue is full.
    fn push(&self, r: RequestRecord) -> Option<RequestRecord> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() >= QUEUE {
            return Some(r);
        }
        records.push(r);
        None
    }

    /// Everything queued, swapped for `empty` (a drained vector, so its
    /// memory is reused).
    fn take(&self, empty: Vec<RequestRecord>) -> Vec<RequestRecord> {
        std::mem::replace(
            &mut *self.records.lock().unwrap_or_else(|p| p.into_inner()),
            empty,
        )
    }
}

struct Writer {
    queue: Arc<Queue>,
    overflow: Arc<Mutex<HashMap<Key, Totals>>>,
    stats: Arc<TapStats>,
    sink: Box<dyn UsageSink>,
    log: Option<std::io::BufWriter<Box<dyn Write + Send>>>,
    node: String,
    /// When this gateway started: with `seq`, a unique event id.
    boot_ms: i64,
    seq: u64,
    /// The access log's last second and upstream, formatted (most lines
    /// repeat them).
    log_time: (i64, String),
    log_upstream: (Option<std::net::SocketAddr>, String),
    /// The access log line being written.
    line: Vec<u8>,
}

/// Records the writer handles between two offers of the CPU to others.
const YIELD_EVERY: u32 = 256;

impl Writer {
    fn run(mut self) {
        // The writer never blocks on the queue: a receiver waiting there
        // would make every request pay for waking it (a futex call and a
        // context switch). It sleeps, then takes whatever came.
        let mut batch: HashMap<Key, Totals> = HashMap::new();
        let mut flushed = std::time::Instant::now();
        let mut spare = Vec::new();
        loop {
            std::thread::sleep(DRAIN_EVERY);
            // Only the writer holds the queue once every tap is gone.
            let last = Arc::strong_count(&self.queue) == 1;
            let mut records = self.queue.take(spare);
            // Consecutive records mostly share their key: they are summed
            // first, and the map is touched once per run.
            let mut run: Option<(&RequestRecord, Totals)> = None;
            for (i, r) in records.iter().enumerate() {
                self.log_line(r);
                match &mut run {
                    Some((first, totals)) if same_key(first, r) => totals.add(r, 1),
                    _ => {
                        if let Some((first, totals)) = run.take() {
                            batch.entry(key(first)).or_default().merge(&totals);
                        }
                        let mut totals = Totals::default();
                        totals.add(r, 1);
                        run = Some((r, totals));
                    }
                }
                // Thousands of records pile up between two looks: on a CPU
                // shared with the proxy, give way now and then, so a
                // request never waits a scheduler slice (milliseconds)
                // behind the bookkeeping.
                if (i as u32 + 1).is_multiple_of(YIELD_EVERY) {
                    std::thread::yield_now();
                }
            }
            if let Some((first, totals)) = run.take() {
                batch.entry(key(first)).or_default().merge(&totals);
            }
            records.clear();
            spare = records;
            if last {
                self.flush(&mut batch);
                return;
            }
            if flushed.elapsed() >= FLUSH_EVERY {
                self.flush(&mut batch);
                flushed = std::time::Instant::now();
            }
        }
    }

    fn flush(&mut self, batch: &mut HashMap<Key, Totals>) {
        let over = std::mem::take(&mut *self.overflow.lock().unwrap_or_else(|p| p.into_inner()));
        for (k, t) in over {
            batch.entry(k).or_default().merge(&t);
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.flush();
        }
        if batch.is_empty() {
            return;
        }
        let records: u64 = batch.values().map(|t| t.count).sum();
        let mut events = Vec::with_capacity(batch.len());
        for ((user, site, component, operator, status, via), t) in batch.drain() {
            self.seq += 1;
            let mut data = serde_json::Map::new();
            if let Some(u) = user {
                data.insert("user".into(), u.as_ref().into());
            }
            data.insert("site".into(), site.as_ref().into());
            data.insert("component".into(), component.as_ref().into());
            data.insert("operator".into(), operator.as_ref().into());
            data.insert("node".into(), self.node.clone().into());
            data.insert("status".into(), status.into());
            data.insert("count".into(), t.count.into());
            data.insert("bytes_in".into(), t.bytes_in.into());
            data.insert("bytes_out".into(), t.bytes_out.into());
            data.insert("duration_ms".into(), (t.duration_us as f64 / 1000.0).into());
            data.insert(
                "max_duration_ms".into(),
                (t.max_duration_us as f64 / 1000.0).into(),
            );
            if let Some(v) = via {
                data.insert("via".into(), v.as_ref().into());
            }
            events.push(commons_meter::Event {
                specversion: "1.0".into(),
                // Unique across restarts (the start time) and across
                // instances on one machine started in the same millisecond
                // (the process id): they share the source.
                id: format!("{}-{}-{}", self.boot_ms, std::process::id(), self.seq),
                source: format!("gateway/{}", self.node),
                kind: "request".into(),
                subject: Some(site.to_string()),
                time: commons_meter::format_time(t.first_ms),
                data,
            });
        }
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.sink.write(events);
        self.stats.handled.fetch_add(records, Ordering::Release);
    }

    fn log_line(&mut self, r: &RequestRecord) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        // One JSON object per line, written byte by byte into a reused
        // line (a JSON value, or `write!`, per request would cost more
        // than the rest of the line). The path only: a query string may
        // carry secrets.
        let line = &mut self.line;
        line.clear();
        let second = r.time_ms.div_euclid(1000);
        if self.log_time.0 != second {
            self.log_time = (second, commons_meter::format_time(r.time_ms));
        }
        let mut n = itoa::Buffer::new();
        line.extend_from_slice(b"{\"time\":\"");
        line.extend_from_slice(self.log_time.1.as_bytes());
        line.extend_from_slice(b"\",\"peer\":");
        json_str(line, &r.peer);
        line.extend_from_slice(b",\"method\":");
        json_str(line, r.method.as_str());
        line.extend_from_slice(b",\"host\":");
        json_str(line, &r.host);
        line.extend_from_slice(b",\"path\":");
        json_str(line, &r.path);
        line.extend_from_slice(b",\"status\":");
        line.extend_from_slice(n.format(r.status).as_bytes());
        line.extend_from_slice(b",\"bytes_in\":");
        line.extend_from_slice(n.format(r.bytes_in).as_bytes());
        line.extend_from_slice(b",\"bytes_out\":");
        line.extend_from_slice(n.format(r.bytes_out).as_bytes());
        // Milliseconds with three decimals, exactly.
        line.extend_from_slice(b",\"duration_ms\":");
        line.extend_from_slice(n.format(r.duration_us / 1000).as_bytes());
        let fraction = n.format(1000 + r.duration_us % 1000);
        line.push(b'.');
        line.extend_from_slice(&fraction.as_bytes()[1..]);
        line.extend_from_slice(b",\"site\":");
        json_str(line, &r.site);
        for (name, value) in [(&b",\"user\":"[..], &r.user), (b",\"via\":", &r.via)] {
            if let Some(v) = value {
                line.extend_from_slice(name);
                json_str(line, v);
            }
        }
        if let Some(u) = r.upstream {
            if self.log_upstream.0 != Some(u) {
                self.log_upstream = (Some(u), u.to_string());
            }
            line.extend_from_slice(b",\"upstream\":");
            json_str(line, &self.log_upstream.1);
        }
        line.extend_from_slice(b"}\n");
        let _ = log.write_all(line);
    }
}

/// Appends `s` as a JSON string: as is when nothing in it needs escaping
/// (the usual case), else escaped by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct Collect(Arc<Mutex<Vec<commons_meter::Event>>>);
    impl UsageSink for Collect {
        fn write(&mut self, events: Vec<commons_meter::Event>) {
            self.0.lock().unwrap().extend(events);
        }
    }

    fn record(user: Option<&str>, status: u16, path: &str) -> RequestRecord {
        RequestRecord {
            time_ms: 1_795_000_000_000,
            user: user.map(Arc::from),
            site: Arc::from("blog"),
            component: Arc::from("web"),
            operator: Arc::from("op"),
            via: None,
            status,
            bytes_in: 10,
            bytes_out: 100,
            duration_us: 1500,
            method: http::Method::GET,
            host: Arc::from("blog.localhost"),
            path: path.into(),
            peer: Arc::from("127.0.0.1"),
            upstream: None,
        }
    }

    #[test]
    fn records_fold_into_counted_events_and_log_lines_are_json() {
        let log = Shared::default();
        let events = Arc::new(Mutex::new(Vec::new()));
        let tap = Tap::start(
            Box::new(Collect(events.clone())),
            Some(Box::new(log.clone())),
            "n1".into(),
        );
        for _ in 0..5 {
            tap.record(record(Some("alice"), 200, "/a"));
        }
        tap.record(record(None, 404, "/we\"ird\npath"));
        // A run of alice's, another key, then alice again: one sum.
        tap.record(record(Some("alice"), 200, "/b"));
        std::thread::sleep(FLUSH_EVERY * 3);
        let events = events.lock().unwrap().clone();
        let count = |user: Option<&str>| {
            events
                .iter()
                .filter(|e| e.data.get("user").and_then(|u| u.as_str()) == user)
                .map(|e| e.data["count"].as_u64().unwrap())
                .sum::<u64>()
        };
        assert_eq!(count(Some("alice")), 6);
        assert_eq!(count(None), 1);
        let alice = events
            .iter()
            .find(|e| e.data.get("user").is_some())
            .unwrap();
        assert_eq!(alice.data["bytes_out"], 600);
        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[5]["path"], "/we\"ird\npath");
        assert_eq!(lines[0]["user"], "alice");
        assert_eq!(lines[0]["duration_ms"], 1.5);
    }
}
