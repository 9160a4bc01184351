//! The outbox relayed to a real `nats-server -js` (started here, on
//! loopback): every change published once, in order — also when the
//! server is killed and started again mid-stream, and when the relay
//! itself restarts.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, nats, temp};

use commons_bus::{changes_stream, last_published, relay, rev_of, RelayConfig};
use commons_store::{DeploymentRow, SqliteStore, StateStore};

fn write(store: &Arc<dyn StateStore>, n: usize) {
    for i in 0..n {
        store
            .put_deployment(&DeploymentRow {
                name: format!("site{}", i % 7),
                blueprint: "commons.yaml".into(),
                inputs: serde_json::json!({}),
                status: "ok".into(),
                created_at_ms: 1,
                updated_at_ms: i as i64,
            })
            .unwrap();
    }
}

/// Every message of the stream: its rev, in the stream's order.
async fn revs_in_stream(url: &str, config: &RelayConfig) -> Vec<i64> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut stream = changes_stream(&js, config).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut revs = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        revs.push(rev_of(&m.headers).unwrap());
    }
    revs
}

/// A relay running until its flag is set.
fn start_relay(
    store: &Arc<dyn StateStore>,
    config: &RelayConfig,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let relaying = tokio::spawn(relay(
        store.clone(),
        config.clone(),
        Duration::from_millis(20),
        stop.clone(),
    ));
    (stop, relaying)
}

/// Waits until the stream's last change is `total`.
async fn caught_up(
    js: &async_nats::jetstream::Context,
    config: &RelayConfig,
    total: i64,
    who: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut stream = changes_stream(js, config).await.unwrap();
        if last_published(&mut stream).await.unwrap() == total {
            return;
        }
        assert!(Instant::now() < deadline, "{who} caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_published_once_in_order_across_server_and_relay_restarts() {
    let dir = temp("relay");
    let store: Arc<dyn StateStore> = Arc::new(SqliteStore::open(&dir.join("state.db")).unwrap());
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = nats(port, &dir.join("js"));
    let config = RelayConfig::new(&url, commons_bus::DEFAULT_NAME);

    write(&store, 300);
    let (stop, relaying) = start_relay(&store, &config);
    // Changes keep coming while the server is killed and started again.
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for _ in 0..30 {
                write(&store, 20);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.kill().unwrap();
    server.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut server = nats(port, &dir.join("js"));
    tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    let total = store.revision().unwrap();
    assert_eq!(total, 300 + 30 * 20);
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    caught_up(&js, &config, total, "the relay").await;
    // The relay stops, more changes come, another relay takes over.
    stop.store(true, Ordering::Relaxed);
    relaying.await.unwrap();
    write(&store, 50);
    let (stop, relaying) = start_relay(&store, &config);
    let total = total + 50;
    caught_up(&js, &config, total, "the second relay").await;
    stop.store(true, Ordering::Relaxed);
    relaying.await.unwrap();

    let revs = revs_in_stream(&url, &config).await;
    assert_eq!(
        revs,
        (1..=total).collect::<Vec<_>>(),
        "each change once, in order"
    );
    // A message is the change as the store recorded it.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = changes_stream(&js, &config).await.unwrap();
    let first = stream.get_raw_message(1).await.unwrap();
    assert_eq!(first.subject.as_str(), "commons.changes.deployment.put");
    let change: commons_store::Change = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(change, store.changes_since(0, 1).unwrap()[0]);
    server.kill().unwrap();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
