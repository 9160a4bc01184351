//! Metering ingest with durable dedup: events/s on the embedded store, and
//! on PostgreSQL when `COMMONS_BENCH_POSTGRES` names a server (a schema of
//! the bench's own is made there and dropped).
//!
//!     cargo run --release -p commons-meter --example meter_bench
//!
//! Batches of 10,000 CloudEvents from 1,000 users over 50 sites; every batch
//! is one transaction with the WAL fsynced at commit; every event is checked
//! against the dedup key and aggregated into minute/hour/day windows by user,
//! site, operator and provider. A second pass resends every event (all
//! duplicates) to measure the dedup path alone.

use std::time::Instant;

use commons_meter::{Event, Meter, Outcome};

fn main() {
    let dir = std::env::temp_dir().join(format!("commons-meter-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    run(
        "sqlite",
        Meter::open(&dir.join("meter.db"), 86_400_000).unwrap(),
    );
    std::fs::remove_dir_all(dir).unwrap();
    if let Ok(url) = std::env::var("COMMONS_BENCH_POSTGRES") {
        let schema = format!("meter_bench_{}", std::process::id());
        run(
            "postgres",
            Meter::open_postgres(&url, &schema, 86_400_000).unwrap(),
        );
        let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }
}

fn run(store: &str, mut m: Meter) {
    let batch = 10_000;
    let batches = 20;
    let base = 1_795_000_000_000i64; // inside 2026-11
    let make = |b: usize| -> Vec<Event> {
        (0..batch)
            .map(|i| {
                let n = b * batch + i;
                let t = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis((base + n as i64 * 10) as u64);
                let data = serde_json::json!({
                    "user": format!("u{}", n % 1000), "site": format!("s{}", n % 50),
                    "operator": format!("o{}", n % 10), "provider": format!("p{}", n % 3),
                    "bytes_out": 1000 + n % 77, "duration_ms": n % 13,
                });
                Event {
                    specversion: "1.0".into(),
                    id: format!("ev-{n}"),
                    source: "gateway/node-1".into(),
                    kind: "request".into(),
                    subject: None,
                    time: humantime::format_rfc3339_millis(t).to_string(),
                    data: data.as_object().unwrap().clone(),
                }
            })
            .collect()
    };
    let all: Vec<Vec<Event>> = (0..batches).map(make).collect();
    let now = base + 1_000_000;
    let start = Instant::now();
    for b in &all {
        let r = m.ingest_at(b, None, now).unwrap();
        assert!(r.iter().all(|o| *o == Outcome::Accepted));
    }
    let secs = start.elapsed().as_secs_f64();
    let n = (batch * batches) as f64;
    println!("meter ingest on {store} (new events, dedup + aggregation, durable per batch of {batch}): {:.0} events/s", n / secs);
    let start = Instant::now();
    for b in &all {
        let r = m.ingest_at(b, None, now).unwrap();
        assert!(r.iter().all(|o| *o == Outcome::Duplicate));
    }
    println!(
        "meter ingest on {store} (all duplicates): {:.0} events/s",
        n / start.elapsed().as_secs_f64()
    );
}
