//! Usage through a real `nats-server -js` (started here, on loopback) into a
//! real meter: every event counted once — while the NATS server is killed
//! and started again mid-stream, and while the meter is stopped and two
//! takers of a new one take over from the same store.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, nats, temp};

use commons_bus::usage::{consume, Taken, UsageConfig, UsagePublisher};
use commons_meter::{Aggregation, Event, Meter, Query, Window};

const BATCHES: u64 = 200;
const PER_BATCH: u64 = 100;

fn batch(b: u64) -> Vec<Event> {
    let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    (0..PER_BATCH)
        .map(|i| {
            let n = b * PER_BATCH + i;
            let data = serde_json::json!({ "user": format!("u{}", n % 10), "site": "wiki", "bytes_out": 10 });
            Event {
                specversion: "1.0".into(),
                id: format!("e-{n}"),
                source: "gateway/test".into(),
                kind: "request".into(),
                subject: None,
                time: time.clone(),
                data: data.as_object().unwrap().clone(),
            }
        })
        .collect()
}

/// The requests the meter counted for the site.
fn counted(meter: &Mutex<Meter>) -> u64 {
    let m = meter.lock().unwrap();
    m.query(&Query {
        window: Window::Day,
        dim: "site",
        value: "wiki",
        metric: "events:request",
        aggregation: Aggregation::Sum,
        from_ms: 0,
        to_ms: i64::MAX,
    })
    .unwrap()
    .iter()
    .map(|(_, n)| *n as u64)
    .sum()
}

/// A meter taking usage from the stream until stopped.
fn start_meter(
    config: &UsageConfig,
    meter: &Arc<Mutex<Meter>>,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let meter = meter.clone();
    let task = tokio::spawn(consume(
        config.clone(),
        move |events| match meter.lock().unwrap().ingest(&events, None) {
            Ok(_) => Taken::Committed,
            Err(e) => Taken::Failed(e.to_string()),
        },
        stop.clone(),
    ));
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_the_meter_once_across_server_and_meter_restarts() {
    let dir = temp("usage");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = nats(port, &dir.join("nats"));
    let config = UsageConfig::new(&url, "commons");
    let db = dir.join("meter.db");
    let meter = Arc::new(Mutex::new(Meter::open(&db, 86_400_000).unwrap()));
    let (stop_meter, metering) = start_meter(&config, &meter);

    // The publisher: each batch kept until the stream said it holds it.
    let published = Arc::new(AtomicU64::new(0));
    let publishing = {
        let (config, published) = (config.clone(), published.clone());
        tokio::spawn(async move {
            let mut publisher = None;
            let mut b = 0;
            while b < BATCHES {
                if publisher.is_none() {
                    publisher = UsagePublisher::connect(&config, "gateway/test").await.ok();
                }
                let done = match &publisher {
                    Some(p) => p.publish(&b.to_string(), &batch(b)).await.is_ok(),
                    None => false,
                };
                if done {
                    b += 1;
                    published.store(b, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };

    let wait = |n: u64, what: &'static str| {
        let published = published.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while published.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The server dies mid-stream and comes back with its files.
    wait(50, "50 batches published").await;
    server.kill().unwrap();
    server.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut server = nats(port, &dir.join("nats"));
    // The meter stops mid-stream; a new one takes over from the same file.
    wait(120, "120 batches published").await;
    stop_meter.store(true, Ordering::SeqCst);
    metering.abort();
    let _ = metering.await;
    drop(meter);
    let meter = Arc::new(Mutex::new(Meter::open(&db, 86_400_000).unwrap()));
    // Two takers now, as an instance runs, each handing every batch over
    // on its own, in the middle of a fetch.
    let one_by_one = UsageConfig {
        fetch_bytes: 1,
        ..config.clone()
    };
    let (stop_meter, metering) = start_meter(&one_by_one, &meter);
    let (stop_other, other) = start_meter(&one_by_one, &meter);
    publishing.await.unwrap();

    let total = BATCHES * PER_BATCH;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counted(&meter) < total {
        assert!(
            Instant::now() < deadline,
            "every event reaches the meter: {} of {total}",
            counted(&meter)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the consumer's ack wait: anything delivered again was a repeat.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(counted(&meter), total, "no event counted twice");
    let by_user = meter
        .lock()
        .unwrap()
        .usage_by_user(&commons_meter::period_of(now_ms()))
        .unwrap();
    assert_eq!(
        by_user.values().flatten().map(|(_, n)| n).sum::<u64>(),
        total
    );
    for (stop, task) in [(stop_meter, metering), (stop_other, other)] {
        stop.store(true, Ordering::SeqCst);
        task.abort();
    }
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
