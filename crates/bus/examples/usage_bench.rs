//! Usage end to end through JetStream: 3 gateways publish batches of
//! CloudEvents, the meter takes them from the stream (exactly once) into
//! its store; events/s from the first publish to the last event counted
//! (committed: every read counts it), and to the last one folded into the
//! totals (the same on SQLite; later on PostgreSQL, whose compactor folds
//! batches after their commit).
//!
//!     usage_bench NATS_URL EVENTS SITES [POSTGRES_URL]
//!
//! Without `POSTGRES_URL` the meter is the embedded SQLite file. The
//! `bench/scale.sh` script starts the NATS server and runs this at several
//! site counts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commons_bus::usage::{consume, Taken, UsageConfig, UsagePublisher, METER_WORKERS};
use commons_meter::{Event, Meter};

const GATEWAYS: u64 = 3;
const PER_BATCH: u64 = 1_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, events, sites) = match args.as_slice() {
        [_, url, events, sites, ..] => (
            url.clone(),
            events.parse::<u64>().expect("EVENTS is a number"),
            sites.parse::<u64>().expect("SITES is a number"),
        ),
        _ => {
            eprintln!("usage: usage_bench NATS_URL EVENTS SITES [POSTGRES_URL]");
            std::process::exit(2);
        }
    };
    let run = format!(
        "b{}x{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().unwrap().as_millis() % 100_000
    );
    let dir = std::env::temp_dir().join(format!("commons-usage-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (meter, store) = match args.get(4) {
        Some(pg) => (
            Meter::open_postgres(pg, &format!("usage_bench_{run}"), 86_400_000).unwrap(),
            "postgres",
        ),
        None => (
            Meter::open(&dir.join("meter.db"), 86_400_000).unwrap(),
            "sqlite",
        ),
    };
    // As many takers as an instance runs, each on a connection of its own.
    let workers: usize = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(METER_WORKERS);
    let meters: Vec<Meter> = (0..workers)
        .map(|_| meter.another_connection().unwrap())
        .collect();
    let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let config = UsageConfig::new(&url, &run);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    let batches: Vec<Vec<Vec<Event>>> = (0..GATEWAYS)
        .map(|g| {
            (0..events / GATEWAYS / PER_BATCH)
                .map(|b| {
                    (0..PER_BATCH)
                        .map(|i| {
                            let n = (g * 1_000_000_000) + b * PER_BATCH + i;
                            let data = serde_json::json!({
                                "user": format!("u{}", n % 1000), "site": format!("s{}", n % sites),
                                "operator": format!("o{}", n % 10), "bytes_out": 1000 + n % 77,
                            });
                            Event {
                                specversion: "1.0".into(),
                                id: format!("ev-{n}"),
                                source: format!("gateway/{g}"),
                                kind: "request".into(),
                                subject: None,
                                time: now.clone(),
                                data: data.as_object().unwrap().clone(),
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect();
    let total: u64 = batches.iter().flatten().map(|b| b.len() as u64).sum();
    let stop = Arc::new(AtomicBool::new(false));
    // The meter takes usage on threads of its own, as `commons serve` does.
    let metering: Vec<_> = meters
        .into_iter()
        .map(|mut meter| {
            let (config, counted, stop) = (config.clone(), counted.clone(), stop.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(consume(
                        config,
                        |events| match meter.ingest(&events, None) {
                            Ok(outcomes) => {
                                let accepted = outcomes
                                    .iter()
                                    .filter(|o| **o == commons_meter::Outcome::Accepted)
                                    .count();
                                counted.fetch_add(accepted as u64, Ordering::SeqCst);
                                Taken::Committed
                            }
                            Err(e) => Taken::Failed(e.to_string()),
                        },
                        stop,
                    ))
            })
        })
        .collect();
    let started = Instant::now();
    rt.block_on(async {
        let mut gateways = Vec::new();
        for (g, batches) in batches.into_iter().enumerate() {
            let config = config.clone();
            gateways.push(tokio::spawn(async move {
                let p = UsagePublisher::connect(&config, &format!("gateway/{g}"))
                    .await
                    .unwrap();
                for (b, events) in batches.iter().enumerate() {
                    // Kept until the stream holds it, as a gateway does.
                    while let Err(e) = p.publish(&b.to_string(), events).await {
                        eprintln!("gateway {g}: {e}; again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }));
        }
        for g in gateways {
            g.await.unwrap();
        }
    });
    let published = started.elapsed();
    while counted.load(Ordering::SeqCst) < total {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the meter took {} of {total}",
            counted.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let counted_at = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::SeqCst);
    for m in metering {
        let _ = m.join();
    }
    // Every read counts a batch from its commit. On PostgreSQL the totals
    // fold batches in after it, on a thread of their own: to the last fold
    // is printed too, so a fold that cannot keep up shows.
    meter.compact().unwrap();
    let folded_at = started.elapsed().as_secs_f64();
    drop(meter);
    println!(
        "usage through JetStream into the meter ({store}, {workers} takers), {sites} sites: {total} events counted in {counted_at:.2} s = {:.0} events/s end to end (published in {:.2} s); in the totals at {folded_at:.2} s = {:.0} events/s",
        total as f64 / counted_at,
        published.as_secs_f64(),
        total as f64 / folded_at,
    );
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(pg) = args.get(4) {
        let mut admin = postgres::Client::connect(pg, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("DROP SCHEMA usage_bench_{run} CASCADE"))
            .unwrap();
    }
}
