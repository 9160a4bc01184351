//! Routes through a JetStream key-value bucket, so that any number of
//! gateways follow a route change within milliseconds of one control-plane
//! instance seeing it, without each reading the whole state again.
//!
//! - One key per site (`NAME_ROUTES` bucket, key = the site's name), its
//!   value `{"rev": N, "routes": [...]}`: the site's routes as the
//!   control plane computed them from the state store at revision `N`. A
//!   site that no longer has routes keeps a value with none (not a delete),
//!   so the revision rule below holds for it too.
//! - Several control-plane instances publish the same state; one that read
//!   it a moment earlier may publish after one that read it later. A
//!   follower therefore keeps, per site, the value of the highest `rev`,
//!   and a publisher writes only the sites whose routes changed in its own
//!   view (seeded from the bucket when it connects).
//! - A follower loads the bucket (the last value of every key), hands the
//!   whole map on once caught up, then again after each burst of changes;
//!   after a lost connection it resumes after the last revision it saw.
//!   The state store stays the source of truth: while the bucket cannot be
//!   followed, gateways compute routes from it as before.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use serde_json::Value;

use crate::{err, BusError};

/// Where routes are published and followed.
#[derive(Debug, Clone)]
pub struct RoutesConfig {
    pub url: String,
    /// `NAME_ROUTES`.
    pub bucket: String,
}

impl RoutesConfig {
    /// The routes of the platform named `name` (see [`crate::valid_name`])
    /// on the NATS server at `url`.
    pub fn new(url: &str, name: &str) -> RoutesConfig {
        RoutesConfig {
            url: url.to_string(),
            bucket: format!("{}_ROUTES", name.to_ascii_uppercase()),
        }
    }
}

/// One site's routes as published: the state revision they were computed
/// at, and the routes (any JSON the gateway side reads back).
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRoutes {
    pub rev: i64,
    pub routes: Value,
}

impl SiteRoutes {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "rev": self.rev, "routes": self.routes }))
            .expect("json")
    }

    fn decode(bytes: &[u8]) -> Option<SiteRoutes> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        Some(SiteRoutes {
            rev: v.get("rev")?.as_i64()?,
            routes: v.get("routes")?.clone(),
        })
    }
}

async fn bucket(config: &RoutesConfig, up: Option<Arc<AtomicBool>>) -> Result<kv::Store, BusError> {
    crate::kv_bucket(
        &config.url,
        &config.bucket,
        "each site's routes, for every gateway",
        None,
        up,
    )
    .await
}

/// Writes each site's routes to the bucket when they changed.
pub struct RoutePublisher {
    store: kv::Store,
    /// What the bucket holds for each site, as far as this publisher knows
    /// (routes only: a newer rev of the same routes is not written again).
    held: HashMap<String, Value>,
}

impl RoutePublisher {
    /// Connects, and reads what the bucket holds already (an instance
    /// starting beside others writes only what differs).
    pub async fn connect(config: &RoutesConfig) -> Result<RoutePublisher, BusError> {
        let store = bucket(config, None).await?;
        let held = read_all(&store).await?;
        Ok(RoutePublisher { store, held })
    }

    /// Publishes every site's routes as of state revision `rev` (sites
    /// missing from `sites` have none); answers how many sites changed.
    pub async fn publish(
        &mut self,
        rev: i64,
        sites: &BTreeMap<String, Value>,
    ) -> Result<usize, BusError> {
        let none = Value::Array(Vec::new());
        let gone: Vec<String> = self
            .held
            .iter()
            .filter(|(site, routes)| !sites.contains_key(*site) && **routes != none)
            .map(|(site, _)| site.clone())
            .collect();
        let changed: Vec<(&String, &Value)> = sites
            .iter()
            .filter(|(site, routes)| self.held.get(*site) != Some(routes))
            .chain(gone.iter().map(|site| (site, &none)))
            .collect();
        let mut n = 0;
        for (site, routes) in changed {
            n += usize::from(self.put_if_newer(site, rev, routes).await?);
        }
        Ok(n)
    }
}

impl RoutePublisher {
    /// Writes `routes` for `site` unless the bucket holds a value of a
    /// later state revision (another instance's newer view): compared and
    /// set on the bucket's own revision, so the bucket never goes back.
    async fn put_if_newer(
        &mut self,
        site: &str,
        rev: i64,
        routes: &Value,
    ) -> Result<bool, BusError> {
        let value: bytes::Bytes = SiteRoutes {
            rev,
            routes: routes.clone(),
        }
        .encode()
        .into();
        loop {
            let entry = self
                .store
                .entry(site)
                .await
                .map_err(|e| err("reading a site's routes")(&e))?;
            let written = match entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    if let Some(held) = SiteRoutes::decode(&entry.value) {
                        if held.rev > rev {
                            self.held.insert(site.to_string(), held.routes);
                            return Ok(false);
                        }
                    }
                    match self.store.update(site, value.clone(), entry.revision).await {
                        Ok(_) => true,
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                        Err(e) => return Err(err("publishing a site's routes")(&e)),
                    }
                }
                _ => match self.store.create(site, value.clone()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(err("publishing a site's routes")(&e)),
                },
            };
            if written {
                self.held.insert(site.to_string(), routes.clone());
                return Ok(true);
            }
            // Another instance wrote meanwhile: compare again.
        }
    }

    /// Reads the bucket again into what this publisher believes it holds
    /// (other instances write too; a view not refreshed now and then
    /// could leave a value another wrote standing).
    pub async fn resync(&mut self) -> Result<(), BusError> {
        self.held = read_all(&self.store).await?;
        Ok(())
    }
}

/// The routes of every site the bucket holds.
async fn read_all(store: &kv::Store) -> Result<HashMap<String, Value>, BusError> {
    let mut held = HashMap::new();
    let values = store
        .status()
        .await
        .map_err(|e| err("reading the routes' bucket")(&e))?
        .values();
    if values == 0 {
        return Ok(held);
    }
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| err("reading the routes' bucket")(&e))?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| err("reading the routes' bucket")(&e))?;
        if let Some(site) = SiteRoutes::decode(&entry.value) {
            held.insert(entry.key.clone(), site.routes);
        }
        if entry.delta == 0 {
            break;
        }
    }
    Ok(held)
}

/// Follows the bucket until `stop` turns true: calls `apply` with every
/// site's routes (some may have none) and the sites that changed (all of
/// them, once caught up), then again after each burst of changes, so a
/// gateway updates its table once per burst, and only for those sites. `up` says whether what was applied is current: false until
/// caught up, while the connection is lost, and after an error (then the
/// caller falls back on the state store); the watch resumes after the last
/// revision seen.
pub async fn follow(
    config: RoutesConfig,
    mut apply: impl FnMut(&BTreeMap<String, SiteRoutes>, &BTreeSet<String>) + Send,
    up: Arc<AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut sites: BTreeMap<String, SiteRoutes> = BTreeMap::new();
    let mut last_revision = 0u64;
    while !*stop.borrow() {
        let run = follow_once(&config, &mut sites, &mut last_revision, &mut apply, &up);
        let result = tokio::select! {
            r = run => r,
            _ = stop.changed() => return,
        };
        up.store(false, Ordering::SeqCst);
        if let Err(e) = result {
            eprintln!("{:>12} following routes: {e}; retrying", "Warning");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn follow_once(
    config: &RoutesConfig,
    sites: &mut BTreeMap<String, SiteRoutes>,
    last_revision: &mut u64,
    apply: &mut (impl FnMut(&BTreeMap<String, SiteRoutes>, &BTreeSet<String>) + Send),
    up: &Arc<AtomicBool>,
) -> Result<(), BusError> {
    let connected = Arc::new(AtomicBool::new(true));
    let store = bucket(config, Some(connected.clone())).await?;
    let mut watch = if *last_revision == 0 {
        store.watch_with_history(">").await
    } else {
        store.watch_all_from_revision(*last_revision + 1).await
    }
    .map_err(|e| err("watching the routes' bucket")(&e))?;
    let pending = store
        .status()
        .await
        .map_err(|e| err("reading the routes' bucket")(&e))?
        .values();
    // Caught up at once when there is nothing to load (or only what was
    // seen before the connection was lost).
    let mut caught_up = pending == 0 || *last_revision > 0;
    if caught_up {
        up.store(connected.load(Ordering::SeqCst), Ordering::SeqCst);
        apply(sites, &sites.keys().cloned().collect());
    }
    let mut touched = BTreeSet::new();
    loop {
        up.store(
            caught_up && connected.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
        // Woken now and then to say whether the connection holds.
        let next = tokio::time::timeout(Duration::from_millis(200), watch.next()).await;
        let entry = match next {
            Err(_) => continue,
            Ok(None) => return Err(BusError("the bucket's watch ended".into())),
            Ok(Some(entry)) => entry.map_err(|e| err("watching the routes' bucket")(&e))?,
        };
        *last_revision = (*last_revision).max(entry.revision);
        take(sites, &entry);
        touched.insert(entry.key.clone());
        if !caught_up && entry.delta > 0 {
            continue;
        }
        // A burst: take what else has arrived already before applying.
        loop {
            match tokio::time::timeout(Duration::from_millis(2), watch.next()).await {
                Ok(Some(Ok(entry))) => {
                    *last_revision = (*last_revision).max(entry.revision);
                    take(sites, &entry);
                    touched.insert(entry.key.clone());
                }
                Ok(Some(Err(e))) => return Err(err("watching the routes' bucket")(&e)),
                Ok(None) => return Err(BusError("the bucket's watch ended".into())),
                Err(_) => break,
            }
        }
        caught_up = true;
        up.store(connected.load(Ordering::SeqCst), Ordering::SeqCst);
        apply(sites, &touched);
        touched.clear();
    }
}

/// One entry into the followed map: kept if it is at least as new (by
/// state revision) as what is held for its site.
fn take(sites: &mut BTreeMap<String, SiteRoutes>, entry: &kv::Entry) {
    match entry.operation {
        kv::Operation::Put => {
            let Some(new) = SiteRoutes::decode(&entry.value) else {
                return;
            };
            // A site without routes keeps its rev here, so an older value
            // published late cannot bring them back.
            if sites.get(&entry.key).is_some_and(|held| held.rev > new.rev) {
                return;
            }
            sites.insert(entry.key.clone(), new);
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            sites.remove(&entry.key);
        }
    }
}
