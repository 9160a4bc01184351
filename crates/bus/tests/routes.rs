//! Routes through the JetStream key-value bucket, against a real
//! `nats-server -js`: followers see every change, an older view published
//! late never wins, a publisher that starts beside others writes only what
//! differs, and a follower resumes after the server restarts.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use commons_bus::routes::{follow, RoutePublisher, RoutesConfig, SiteRoutes};
use serde_json::{json, Value};

struct Seen {
    sites: Arc<Mutex<BTreeMap<String, SiteRoutes>>>,
    up: Arc<AtomicBool>,
}

impl Seen {
    fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
}

fn follower(config: &RoutesConfig, stop: &tokio::sync::watch::Sender<bool>) -> Seen {
    let seen = Seen {
        sites: Arc::default(),
        up: Arc::default(),
    };
    let sites = seen.sites.clone();
    tokio::spawn(follow(
        config.clone(),
        move |all: &BTreeMap<String, SiteRoutes>, changed: &std::collections::BTreeSet<String>| {
            let mut held = sites.lock().unwrap();
            // Only what changed is read: the rest must be as held.
            for name in changed {
                match all.get(name) {
                    Some(site) => held.insert(name.clone(), site.clone()),
                    None => held.remove(name),
                };
            }
            assert_eq!(*held, *all, "a change went unreported");
        },
        seen.up.clone(),
        stop.subscribe(),
    ));
    seen
}

/// The routes `seen` holds for `site` (null: none known).
fn routes(seen: &Seen, site: &str) -> Value {
    seen.sites
        .lock()
        .unwrap()
        .get(site)
        .map_or(Value::Null, |s| s.routes.clone())
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn site(host: &str, port: u16) -> Value {
    json!([{ "host": host, "path": "/", "upstreams": [format!("127.0.0.1:{port}")] }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_follow_route_changes_and_an_older_view_never_wins() {
    let dir = temp("routes");
    let port = free_port();
    let mut server = nats(port, &dir);
    let config = RoutesConfig::new(&format!("nats://127.0.0.1:{port}"), "t_routes");
    let (stop, _) = tokio::sync::watch::channel(false);

    let mut a = RoutePublisher::connect(&config).await.unwrap();
    let followers: Vec<Seen> = (0..3).map(|_| follower(&config, &stop)).collect();
    for f in &followers {
        until("a follower of the empty bucket", || f.up()).await;
    }
    let mut sites = BTreeMap::new();
    sites.insert("shop".to_string(), site("shop.localhost", 1001));
    sites.insert("wiki".to_string(), site("wiki.localhost", 1002));
    assert_eq!(a.publish(10, &sites).await.unwrap(), 2);
    // Nothing changed: nothing written.
    assert_eq!(a.publish(11, &sites).await.unwrap(), 0);
    for f in &followers {
        until("both sites", || {
            routes(f, "wiki") == site("wiki.localhost", 1002)
        })
        .await;
        assert_eq!(routes(f, "shop"), site("shop.localhost", 1001));
    }

    // A second instance starts: it reads the bucket and writes only what
    // its view changes.
    let mut b = RoutePublisher::connect(&config).await.unwrap();
    sites.insert("shop".to_string(), site("shop.localhost", 2001));
    assert_eq!(b.publish(12, &sites).await.unwrap(), 1);
    for f in &followers {
        until("the moved upstream", || {
            routes(f, "shop") == site("shop.localhost", 2001)
        })
        .await;
    }
    // The first instance, a read behind, publishes its older view late:
    // the followers keep the newer one.
    let mut older = sites.clone();
    older.insert("shop".to_string(), site("shop.localhost", 1001));
    assert_eq!(a.publish(11, &older).await.unwrap(), 0, "a held the same");
    a.publish(11, &{
        let mut o = older.clone();
        o.insert("shop".to_string(), site("shop.localhost", 1500));
        o
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in &followers {
        assert_eq!(routes(f, "shop"), site("shop.localhost", 2001));
    }

    // A site gone: its routes go with it, and a late older view does not
    // bring them back.
    sites.remove("wiki");
    assert_eq!(b.publish(13, &sites).await.unwrap(), 1);
    for f in &followers {
        until("wiki's routes gone", || routes(f, "wiki") == json!([])).await;
    }
    let mut c = RoutePublisher::connect(&config).await.unwrap();
    assert_eq!(
        c.publish(11, &older).await.unwrap(),
        0,
        "the bucket holds newer views: nothing is written"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in &followers {
        assert_eq!(routes(f, "wiki"), json!([]));
    }
    // Nor does a gateway that starts now see an older view.
    let late = follower(&config, &stop);
    until("a late follower", || late.up()).await;
    assert_eq!(routes(&late, "shop"), site("shop.localhost", 2001));
    assert_eq!(routes(&late, "wiki"), json!([]));

    // The server restarts: followers say so, resume after the last
    // revision they saw, and see what was published since.
    server.kill().unwrap();
    server.wait().unwrap();
    for f in &followers {
        until("the follower to notice", || !f.up()).await;
    }
    let mut server = nats(port, &dir);
    for f in &followers {
        until("the follower to reconnect", || f.up()).await;
    }
    let mut d = RoutePublisher::connect(&config).await.unwrap();
    sites.insert("blog".to_string(), site("blog.localhost", 3001));
    assert_eq!(d.publish(14, &sites).await.unwrap(), 1, "d read the bucket");
    for f in &followers {
        until("the site added after the restart", || {
            routes(f, "blog") == site("blog.localhost", 3001)
        })
        .await;
        assert_eq!(routes(f, "shop"), site("shop.localhost", 2001));
    }
    let _ = stop.send(true);
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
