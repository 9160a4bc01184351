//! The routing table: host and path prefix → the site that serves them and
//! its healthy upstreams.
//!
//! The table is immutable once built; the gateway swaps in a new one
//! atomically (`ArcSwap`), so an update never blocks or drops a request.
//! Passive health (an upstream that refused a connection is skipped for a
//! while) and per-site counters carry over from one table to the next.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::upstream::Sender;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What the platform says a route is: the input the table is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Lower-case host name, without port.
    pub host: String,
    /// Path prefix, `/` for the whole host.
    pub path: String,
    /// The deployment (site) the route belongs to.
    pub deployment: String,
    /// The component that serves it.
    pub component: String,
    /// Who runs the site (for usage events).
    pub operator: String,
    /// The running instances, healthy ones only.
    pub upstreams: Vec<SocketAddr>,
    /// Stopped for lack of traffic: a request wakes it.
    pub idle: bool,
    /// Path prefixes that need a signed-in user.
    #[serde(default)]
    pub login: Vec<String>,
    /// Largest request body accepted, in bytes.
    #[serde(default)]
    pub max_body: Option<u64>,
    /// Largest request head accepted, in bytes (below the gateway's own
    /// `max_header_bytes`).
    #[serde(default)]
    pub max_header: Option<usize>,
    /// How long the app may take to start its answer (the gateway's
    /// `upstream_timeout` otherwise).
    #[serde(default)]
    pub response_timeout_ms: Option<u64>,
    /// A header the app gets the signed-in user's id in (see
    /// `commons_blueprint::model::Route::user_header`).
    #[serde(default)]
    pub user_header: Option<String>,
}

/// Counters kept per site, across table rebuilds.
#[derive(Default, Debug)]
pub struct SiteStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// One running instance of a site.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Milliseconds (gateway clock) until which the upstream is skipped.
    down_until: Arc<AtomicU64>,
    /// Requests sent there and not finished yet.
    pub in_flight: Arc<AtomicU64>,
    /// Open connections to it with no request on them, shared by every
    /// client connection (an idle client holds none): hyper's, for
    /// requests with bodies and upgrades, and the gateway's own
    /// ([`crate::upstream`]) for the rest.
    idle: Arc<Mutex<Vec<Sender>>>,
    pub(crate) direct: Arc<crate::upstream::Pool>,
}

/// Idle connections kept per upstream at most: enough that a busy site
/// does not close and reopen connections under load.
pub const KEEP_IDLE: usize = 1024;

/// A request in flight at an upstream: counted while it lives, and the
/// connection it used goes back to the upstream's idle ones when the
/// response is finished (dropped).
pub struct InFlight {
    count: Arc<AtomicU64>,
    idle: Arc<Mutex<Vec<Sender>>>,
    pub(crate) conn: Option<Sender>,
}

impl Upstream {
    pub(crate) fn begin(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            count: self.in_flight.clone(),
            idle: self.idle.clone(),
            conn: None,
        }
    }

    /// An open idle connection of the gateway's own client, if there is one.
    pub(crate) fn take_direct(&self) -> Option<crate::upstream::Conn> {
        let mut idle = self.direct.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut c) = idle.pop() {
            if !c.is_stale() {
                return Some(c);
            }
        }
        None
    }

    /// An open idle connection, if there is one.
    pub(crate) fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(conn) = self.conn.take().filter(|c| !c.is_closed()) {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < KEEP_IDLE {
                idle.push(conn);
            }
        }
    }
}

/// A routed site, as the proxy sees it.
#[derive(Debug)]
pub struct Site {
    pub spec: RouteSpec,
    /// The spec's names, shared by every usage record.
    pub host: Arc<str>,
    pub deployment: Arc<str>,
    pub component: Arc<str>,
    pub operator: Arc<str>,
    /// The header the app gets the signed-in user in, if it asked for one.
    pub user_header: Option<http::HeaderName>,
    pub upstreams: Vec<Upstream>,
    pub stats: Arc<SiteStats>,
    next: AtomicUsize,
}

/// How long an upstream that failed is left out.
pub const DOWN_FOR_MS: u64 = 2_000;

impl Site {
    /// The next healthy upstream, round robin; when every one failed lately,
    /// the next one anyway (it may have recovered).
    pub fn pick(&self, now_ms: u64) -> Option<&Upstream> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let start = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        (0..n)
            .map(|i| &self.upstreams[(start + i) % n])
            .find(|u| u.down_until.load(Ordering::Relaxed) <= now_ms)
            .or(Some(&self.upstreams[start % n]))
    }

    /// Leaves `addr` out for a while (passive health).
    pub fn mark_down(&self, addr: SocketAddr, now_ms: u64) {
        for u in self.upstreams.iter().filter(|u| u.addr == addr) {
            u.down_until.store(now_ms + DOWN_FOR_MS, Ordering::Relaxed);
        }
    }

    pub fn needs_login(&self, path: &str) -> bool {
        self.spec.login.iter().any(|p| path_has_prefix(path, p))
    }
}

/// True when `path` is `prefix` or lies under it (`/app` covers `/app/x`,
/// not `/apple`).
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" || prefix.is_empty() {
        return true;
    }
    let prefix = prefix.trim_end_matches('/');
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

/// What a table carries over by address (and counters by site), for
/// routes that changed: read from the previous table once, when needed.
struct Carried {
    health: HashMap<SocketAddr, Arc<AtomicU64>>,
    load: HashMap<SocketAddr, Arc<AtomicU64>>,
    pools: HashMap<SocketAddr, Arc<Mutex<Vec<Sender>>>>,
    direct: HashMap<SocketAddr, Arc<crate::upstream::Pool>>,
    stats: HashMap<String, Arc<SiteStats>>,
}

impl Carried {
    fn of(previous: &RouteTable) -> Carried {
        let mut c = Carried {
            health: HashMap::new(),
            load: HashMap::new(),
            pools: HashMap::new(),
            direct: HashMap::new(),
            stats: HashMap::new(),
        };
        for (addr, n, _) in &previous.retired {
            c.load.insert(*addr, n.clone());
        }
        for site in previous.hosts.values().flatten() {
            c.stats
                .entry(site.spec.deployment.clone())
                .or_insert_with(|| site.stats.clone());
            for u in &site.upstreams {
                c.health.insert(u.addr, u.down_until.clone());
                c.load.insert(u.addr, u.in_flight.clone());
                c.pools.insert(u.addr, u.idle.clone());
                c.direct.insert(u.addr, u.direct.clone());
            }
        }
        c
    }
}

/// The table the proxy reads on every request.
#[derive(Default, Debug)]
pub struct RouteTable {
    /// Per host, routes by path prefix, longest first.
    hosts: HashMap<Box<str>, Vec<Arc<Site>>>,
    specs: Vec<RouteSpec>,
    /// Upstreams no longer routed, with when they stopped being routed:
    /// reported as draining while requests are in flight there, and for
    /// [`RETIRED_GRACE`] anyway (a request that read the previous table may
    /// be about to start).
    retired: Vec<(SocketAddr, Arc<AtomicU64>, Instant)>,
}

/// How long an upstream counts as draining after it stopped being routed.
pub const RETIRED_GRACE: Duration = Duration::from_millis(250);

impl RouteTable {
    /// Builds a table from `specs`, carrying passive health and counters over
    /// from `previous`. A route whose spec did not change keeps its [`Site`]
    /// whole, so a change to one site costs little however many are routed
    /// (the state carried by address is read only for routes that changed).
    pub fn build(specs: Vec<RouteSpec>, previous: &RouteTable) -> RouteTable {
        let unchanged: HashMap<(&str, &str), &Arc<Site>> = previous
            .hosts
            .values()
            .flatten()
            .map(|site| ((&*site.host, site.spec.path.as_str()), site))
            .collect();
        let mut carried: Option<Carried> = None;
        // Counters of the sites first routed in this table.
        let mut new_stats: HashMap<&str, Arc<SiteStats>> = HashMap::new();
        let mut hosts: HashMap<Box<str>, Vec<Arc<Site>>> = HashMap::with_capacity(specs.len());
        for spec in &specs {
            let host = if spec.host.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(spec.host.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(spec.host.as_str())
            };
            let kept = unchanged
                .get(&(&*host, spec.path.as_str()))
                .filter(|site| site.spec == *spec);
            let site = match kept {
                Some(site) => Arc::clone(site),
                None => {
                    let c = carried.get_or_insert_with(|| Carried::of(previous));
                    let stats = match c.stats.get(spec.deployment.as_str()) {
                        Some(s) => s.clone(),
                        None => new_stats
                            .entry(spec.deployment.as_str())
                            .or_default()
                            .clone(),
                    };
                    Arc::new(Site {
                        upstreams: spec
                            .upstreams
                            .iter()
                            .map(|&addr| Upstream {
                                addr,
                                down_until: c.health.get(&addr).cloned().unwrap_or_default(),
                                in_flight: c.load.get(&addr).cloned().unwrap_or_default(),
                                idle: c.pools.get(&addr).cloned().unwrap_or_default(),
                                direct: c.direct.get(&addr).cloned().unwrap_or_default(),
                            })
                            .collect(),
                        stats,
                        next: AtomicUsize::new(0),
                        host: Arc::from(&*host),
                        deployment: Arc::from(spec.deployment.as_str()),
                        component: Arc::from(spec.component.as_str()),
                        operator: Arc::from(spec.operator.as_str()),
                        user_header: spec
                            .user_header
                            .as_deref()
                            .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
                        spec: spec.clone(),
                    })
                }
            };
            hosts.entry(host.into()).or_default().push(site);
        }
        for sites in hosts.values_mut() {
            if sites.len() > 1 {
                sites.sort_by_key(|s| std::cmp::Reverse(s.spec.path.trim_end_matches('/').len()));
            }
        }
        let routed: std::collections::HashSet<SocketAddr> = specs
            .iter()
            .flat_map(|s| s.upstreams.iter().copied())
            .collect();
        // Upstreams no longer routed: still draining, or only just retired.
        let now = Instant::now();
        let mut retired = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (addr, n, at) in &previous.retired {
            if !routed.contains(addr) && seen.insert(*addr) {
                retired.push((*addr, n.clone(), *at));
            }
        }
        for u in previous.hosts.values().flatten().flat_map(|s| &s.upstreams) {
            if !routed.contains(&u.addr) && seen.insert(u.addr) {
                retired.push((u.addr, u.in_flight.clone(), now));
            }
        }
        retired.retain(|(_, n, at)| n.load(Ordering::Relaxed) > 0 || at.elapsed() < RETIRED_GRACE);
        RouteTable {
            hosts,
            specs,
            retired,
        }
    }

    /// Requests in flight per upstream: every routed one, and those no
    /// longer routed that are still finishing requests (draining).
    pub fn upstream_load(&self) -> std::collections::BTreeMap<SocketAddr, u64> {
        let mut out = std::collections::BTreeMap::new();
        for site in self.sites() {
            for u in &site.upstreams {
                out.insert(u.addr, u.in_flight.load(Ordering::Relaxed));
            }
        }
        for (addr, n, at) in &self.retired {
            let n = n.load(Ordering::Relaxed);
            if n > 0 || at.elapsed() < RETIRED_GRACE {
                out.insert(*addr, n);
            }
        }
        out
    }

    /// The site serving `host` (lower case, no port) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Site>> {
        self.hosts
            .get(host)?
            .iter()
            .find(|s| path_has_prefix(path, &s.spec.path))
    }

    pub fn specs(&self) -> &[RouteSpec] {
        &self.specs
    }

    /// True when some route serves `host`: on-demand certificates are issued
    /// only for these.
    pub fn serves_host(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// Every site once (per deployment), for metrics.
    pub fn sites(&self) -> impl Iterator<Item = &Arc<Site>> {
        self.hosts.values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, path: &str, dep: &str, ports: &[u16]) -> RouteSpec {
        RouteSpec {
            host: host.into(),
            path: path.into(),
            deployment: dep.into(),
            component: "web".into(),
            operator: "local".into(),
            upstreams: ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
            idle: false,
            login: vec![],
            max_body: None,
            max_header: None,
            response_timeout_ms: None,
            user_header: None,
        }
    }

    #[test]
    fn longest_prefix_wins_and_prefixes_respect_segments() {
        let t = RouteTable::build(
            vec![
                spec("a.test", "/", "root", &[1]),
                spec("a.test", "/api", "api", &[2]),
                spec("a.test", "/api/v2/", "v2", &[3]),
            ],
            &RouteTable::default(),
        );
        let dep = |p| t.lookup("a.test", p).map(|s| s.spec.deployment.as_str());
        assert_eq!(dep("/"), Some("root"));
        assert_eq!(dep("/api"), Some("api"));
        assert_eq!(dep("/api/x"), Some("api"));
        assert_eq!(dep("/apix"), Some("root"));
        assert_eq!(dep("/api/v2/users"), Some("v2"));
        assert!(t.lookup("b.test", "/").is_none());
    }

    #[test]
    fn a_rebuild_keeps_unchanged_routes_and_carries_state_to_changed_ones() {
        let t = RouteTable::build(
            vec![
                spec("a.test", "/", "a", &[1]),
                spec("b.test", "/", "b", &[2, 3]),
            ],
            &RouteTable::default(),
        );
        let b = t.lookup("b.test", "/").unwrap().clone();
        b.stats.requests.fetch_add(7, Ordering::Relaxed);
        b.mark_down(SocketAddr::from(([127, 0, 0, 1], 2)), 1000);
        // a's route is untouched; b's loses an upstream and gains one.
        let t2 = RouteTable::build(
            vec![
                spec("a.test", "/", "a", &[1]),
                spec("b.test", "/", "b", &[2, 4]),
            ],
            &t,
        );
        assert!(Arc::ptr_eq(
            t.lookup("a.test", "/").unwrap(),
            t2.lookup("a.test", "/").unwrap()
        ));
        let b2 = t2.lookup("b.test", "/").unwrap();
        assert!(!Arc::ptr_eq(&b, b2));
        assert_eq!(
            b2.stats.requests.load(Ordering::Relaxed),
            7,
            "counters go on"
        );
        // Upstream 2 is still marked down; 4 is new.
        assert_eq!(b2.pick(1500).unwrap().addr.port(), 4);
        assert_eq!(b2.pick(1500).unwrap().addr.port(), 4);
        // 3 is no longer routed: retired, briefly reported as draining.
        assert!(t2
            .upstream_load()
            .contains_key(&SocketAddr::from(([127, 0, 0, 1], 3))));
    }

    #[test]
    fn passive_health_skips_a_failed_upstream_and_survives_rebuilds() {
        let t = RouteTable::build(
            vec![spec("a.test", "/", "s", &[1, 2])],
            &RouteTable::default(),
        );
        let site = t.lookup("a.test", "/").unwrap();
        site.mark_down(SocketAddr::from(([127, 0, 0, 1], 1)), 1000);
        for _ in 0..4 {
            assert_eq!(site.pick(1500).unwrap().addr.port(), 2);
        }
        let t2 = RouteTable::build(t.specs().to_vec(), &t);
        let site2 = t2.lookup("a.test", "/").unwrap();
        assert_eq!(site2.pick(1500).unwrap().addr.port(), 2);
        assert_eq!(site2.pick(1500).unwrap().addr.port(), 2);
        // After the penalty both take turns again.
        let ports: std::collections::BTreeSet<u16> = (0..4)
            .map(|_| site2.pick(10_000).unwrap().addr.port())
            .collect();
        assert_eq!(ports.len(), 2);
    }
}
