//! DataCommons' feed across instances, against a real `nats-server -js`:
//! each instance hears the others' sequence numbers and not its own, a
//! number published twice arrives once, and a follower picks up again after
//! the server restarts.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use commons_bus::feed::{follow, FeedConfig, FeedPublisher};

struct Instance {
    heard: Arc<Mutex<Vec<i64>>>,
    up: Arc<AtomicBool>,
}

fn instance(config: &FeedConfig, origin: &str, stop: &Arc<AtomicBool>) -> Instance {
    let heard: Arc<Mutex<Vec<i64>>> = Arc::default();
    let up: Arc<AtomicBool> = Arc::default();
    let h = heard.clone();
    tokio::spawn(follow(
        config.clone(),
        origin.to_string(),
        move |seq| h.lock().unwrap().push(seq),
        up.clone(),
        stop.clone(),
    ));
    Instance { heard, up }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_hear_each_others_commits_once_and_not_their_own() {
    let dir = temp("feed");
    let port = free_port();
    let mut server = nats(port, &dir);
    let config = FeedConfig::new(&format!("nats://127.0.0.1:{port}"), "t_feed");
    let stop = Arc::new(AtomicBool::new(false));
    let a = instance(&config, "a", &stop);
    let b = instance(&config, "b", &stop);
    until("both following", || {
        a.up.load(Ordering::SeqCst) && b.up.load(Ordering::SeqCst)
    })
    .await;

    let from_a = FeedPublisher::connect(&config, "a").await.unwrap();
    let from_b = FeedPublisher::connect(&config, "b").await.unwrap();
    for seq in 1..=50 {
        if seq % 2 == 1 {
            from_a.publish(seq).await.unwrap();
        } else {
            from_b.publish(seq).await.unwrap();
        }
    }
    // A notice sent again (after a lost acknowledgement) is dropped.
    from_a.publish(49).await.unwrap();
    from_b.publish(51).await.unwrap();
    until("b's last", || a.heard.lock().unwrap().contains(&51)).await;
    until("a's last", || b.heard.lock().unwrap().contains(&49)).await;
    let evens: Vec<i64> = (2..=50).step_by(2).chain([51]).collect();
    let odds: Vec<i64> = (1..=49).step_by(2).collect();
    assert_eq!(
        *a.heard.lock().unwrap(),
        evens,
        "a hears b's, in order, once"
    );
    assert_eq!(*b.heard.lock().unwrap(), odds, "b hears a's, once");

    // The server restarts: the followers pick up what comes after.
    server.kill().unwrap();
    server.wait().unwrap();
    let mut server = nats(port, &dir);
    until("following again", || {
        a.up.load(Ordering::SeqCst) && b.up.load(Ordering::SeqCst)
    })
    .await;
    let mut published = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !published {
        assert!(Instant::now() < deadline, "publishing after the restart");
        match FeedPublisher::connect(&config, "b").await {
            Ok(p) => published = p.publish(52).await.is_ok(),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    until("52 after the restart", || {
        a.heard.lock().unwrap().contains(&52)
    })
    .await;
    assert!(!b.heard.lock().unwrap().contains(&52), "not its own");

    stop.store(true, Ordering::SeqCst);
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
