//! A route change seen by 3 gateways through the JetStream bucket: the
//! time from a control plane's publish to each gateway's table serving it,
//! with SITES sites routed (two routes each, as `routes_of` makes them).
//! Each follower does what `commons serve`'s does: reads the sites that
//! changed and patches its table with them.
//!
//!     routes_bench NATS_URL SITES [CHANGES]
//!
//! `bench/scale.sh` starts the NATS server and runs this at several site
//! counts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use commons_bus::routes::{follow, RoutePublisher, RoutesConfig, SiteRoutes};
use commons_gateway::routes::RouteTable;
use commons_gateway::RouteSpec;
use serde_json::Value;

const GATEWAYS: usize = 3;

fn site_routes(i: usize, port: u16) -> Value {
    let spec = |host: String| RouteSpec {
        host,
        path: "/".into(),
        deployment: format!("site{i}"),
        component: "web".into(),
        operator: "local".into(),
        upstreams: vec![SocketAddr::from(([127, 0, 0, 1], port))],
        idle: false,
        login: Vec::new(),
        max_body: None,
        max_header: None,
        response_timeout_ms: None,
        user_header: None,
    };
    serde_json::to_value(vec![
        spec(format!("site{i}.localhost")),
        spec(format!("web.site{i}.localhost")),
    ])
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// One gateway's follower: its table, rebuilt after each burst; reports
/// (gateway, the port `site0`'s route now has, when).
fn gateway(
    runtime: &tokio::runtime::Runtime,
    config: &RoutesConfig,
    n: usize,
    seen: mpsc::Sender<(usize, u16, Instant)>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut table = RouteTable::default();
    let apply = move |sites: &BTreeMap<String, SiteRoutes>, changed: &BTreeSet<String>| {
        let changed: Vec<(String, Vec<RouteSpec>)> = changed
            .iter()
            .map(|name| {
                let routes = sites.get(name).map_or(Vec::new(), |site| {
                    serde_json::from_value(site.routes.clone()).unwrap()
                });
                (name.clone(), routes)
            })
            .collect();
        table = table.patch(changed);
        if let Some(site) = table.lookup("site0.localhost", "/") {
            let _ = seen.send((n, site.upstreams[0].addr.port(), Instant::now()));
        }
    };
    runtime.spawn(follow(
        config.clone(),
        apply,
        Arc::new(AtomicBool::new(false)),
        stop,
    ));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, sites, changes) = match args.as_slice() {
        [_, url, sites, rest @ ..] => (
            url.clone(),
            sites.parse::<usize>().expect("SITES is a number"),
            rest.first()
                .map_or(100, |c| c.parse::<u16>().expect("CHANGES is a number")),
        ),
        _ => {
            eprintln!("usage: routes_bench NATS_URL SITES [CHANGES]");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = RoutesConfig::new(&url, &format!("rb{}_{sites}", std::process::id()));
    let mut publisher = runtime.block_on(RoutePublisher::connect(&config)).unwrap();
    let mut state: BTreeMap<String, Value> = (0..sites)
        .map(|i| {
            (
                format!("site{i}"),
                site_routes(i, 10_000 + (i % 50_000) as u16),
            )
        })
        .collect();
    let t = Instant::now();
    runtime.block_on(publisher.publish(1, &state)).unwrap();
    let loaded = t.elapsed();

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (tx, rx) = mpsc::channel();
    let t = Instant::now();
    for n in 0..GATEWAYS {
        gateway(&runtime, &config, n, tx.clone(), stop.clone());
    }
    let mut ready = [false; GATEWAYS];
    while !ready.iter().all(|r| *r) {
        let (n, _, _) = rx.recv_timeout(Duration::from_secs(120)).unwrap();
        ready[n] = true;
    }
    let caught_up = t.elapsed();

    let mut seen = Vec::with_capacity(changes as usize * GATEWAYS);
    for k in 0..changes {
        let port = 60_000 + k;
        state.insert("site0".into(), site_routes(0, port));
        let t = Instant::now();
        let written = runtime
            .block_on(publisher.publish(2 + k as i64, &state))
            .unwrap();
        assert_eq!(written, 1);
        let mut got = [false; GATEWAYS];
        while !got.iter().all(|g| *g) {
            let (n, p, at) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
            if p == port && !got[n] {
                got[n] = true;
                seen.push(at.duration_since(t));
            }
        }
        // Changes a moment apart, as deploys come.
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = stop_tx.send(true);
    seen.sort();
    println!(
        "route change → {GATEWAYS} gateways, {sites} sites: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         ({changes} changes; first publish of every site {:.2} s; {GATEWAYS} gateways caught up in {:.2} s)",
        percentile(&seen, 0.50).as_secs_f64() * 1e3,
        percentile(&seen, 0.99).as_secs_f64() * 1e3,
        seen.last().unwrap().as_secs_f64() * 1e3,
        loaded.as_secs_f64(),
        caught_up.as_secs_f64(),
    );
}
