//! With `[bus]`: routes go through the bus's key-value bucket (see
//! `commons_bus::routes`). Every instance publishes the routes it computes
//! from the state store, site by site when they change, and its gateway
//! follows the bucket, so a change one instance sees reaches every
//! gateway at once. While the bucket cannot be followed, the gateway goes
//! on with the routes this instance computes itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commons_bus::routes::{follow, RoutePublisher, RoutesConfig, SiteRoutes};
use commons_gateway::RouteSpec;
use serde_json::Value;

/// How often a publisher reads the bucket again (other instances write it too).
const RESYNC_EVERY: Duration = Duration::from_secs(30);

/// Routes by site, as this instance computed them at a state revision
/// and as followed from the bucket; the gateway serves, for each site,
/// whichever is newer.
#[derive(Default)]
pub struct Followed {
    /// Whether the bucket is followed (caught up and connected): set by
    /// `commons_bus::routes::follow`; the table does not depend on it (each
    /// site takes the newer of the two views either way).
    pub up: Arc<AtomicBool>,
    /// (the state revision, the routes of each site) computed here.
    local: Mutex<(i64, BTreeMap<String, Vec<RouteSpec>>)>,
    /// Each site's routes from the bucket, with the revision they were
    /// computed at.
    bucket: Mutex<BTreeMap<String, (i64, Vec<RouteSpec>)>>,
}

impl Followed {
    /// Sets what this instance computed at state revision `rev`.
    pub fn set_local(&self, rev: i64, routes: Vec<RouteSpec>) {
        let mut sites: BTreeMap<String, Vec<RouteSpec>> = BTreeMap::new();
        for r in routes {
            sites.entry(r.deployment.clone()).or_default().push(r);
        }
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = (rev, sites);
    }

    /// The routes `site` has now: the bucket's if they are of a later
    /// state revision than this instance's view, else its own.
    pub fn site(&self, site: &str) -> Vec<RouteSpec> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        match bucket.get(site) {
            Some((rev, routes)) if *rev > local.0 => routes.clone(),
            _ => local.1.get(site).cloned().unwrap_or_default(),
        }
    }

    /// For each site, the routes of the later revision: this instance's
    /// own view, or the bucket's when another instance saw a later state
    /// (a site only the bucket has comes from there if that is newer).
    pub fn routes(&self) -> Vec<RouteSpec> {
        let local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let newer = |site: &str| bucket.get(site).filter(|(rev, _)| *rev > local.0);
        let mut out = Vec::new();
        for (site, routes) in &local.1 {
            if newer(site).is_none() {
                out.extend(routes.iter().cloned());
            }
        }
        for (rev, routes) in bucket.values() {
            if *rev > local.0 {
                out.extend(routes.iter().cloned());
            }
        }
        out
    }
}

/// Routes grouped by the site they belong to, as the bucket holds them.
pub fn by_site(routes: &[RouteSpec]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Vec<&RouteSpec>> = BTreeMap::new();
    for r in routes {
        out.entry(r.deployment.clone()).or_default().push(r);
    }
    out.into_iter()
        .map(|(site, routes)| (site, serde_json::to_value(routes).expect("json")))
        .collect()
}

/// Starts publishing: send `(state revision, routes by site)` whenever they
/// were computed again; the latest is published, changed sites only.
pub fn spawn_publisher(
    runtime: &tokio::runtime::Handle,
    config: RoutesConfig,
) -> tokio::sync::watch::Sender<Option<(i64, BTreeMap<String, Value>)>> {
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    runtime.spawn(async move {
        loop {
            let mut publisher = match RoutePublisher::connect(&config).await {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{:>12} publishing routes: {e}; retrying", "Warning");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut synced = Instant::now();
            loop {
                let latest = rx.borrow_and_update().clone();
                if let Some((rev, sites)) = latest {
                    if synced.elapsed() >= RESYNC_EVERY {
                        if let Err(e) = publisher.resync().await {
                            eprintln!("{:>12} publishing routes: {e}; reconnecting", "Warning");
                            break;
                        }
                        synced = Instant::now();
                    }
                    if let Err(e) = publisher.publish(rev, &sites).await {
                        eprintln!("{:>12} publishing routes: {e}; reconnecting", "Warning");
                        // Published again whole once reconnected.
                        rx.mark_changed();
                        break;
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    tx
}

/// Starts following the bucket into `followed`; `applied` is called with
/// the sites that changed (to patch the gateway's table).
pub fn spawn_follower(
    runtime: &tokio::runtime::Handle,
    config: RoutesConfig,
    followed: Arc<Followed>,
    applied: impl Fn(&BTreeSet<String>) + Send + 'static,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let up = followed.up.clone();
    let apply = move |sites: &BTreeMap<String, SiteRoutes>, changed: &BTreeSet<String>| {
        {
            let mut bucket = followed.bucket.lock().unwrap_or_else(|p| p.into_inner());
            for name in changed {
                let Some(site) = sites.get(name) else {
                    bucket.remove(name);
                    continue;
                };
                match serde_json::from_value::<Vec<RouteSpec>>(site.routes.clone()) {
                    Ok(routes) => {
                        bucket.insert(name.clone(), (site.rev, routes));
                    }
                    Err(e) => eprintln!("{:>12} {name}'s routes in the bucket: {e}", "Warning"),
                }
            }
        }
        applied(changed);
    };
    runtime.spawn(follow(config, apply, up, stop));
}
