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

/// What a table carries over by address (and counters by site) to routes
/// that changed, read from the sites they replace.
#[derive(Default)]
struct Carried {
    health: HashMap<SocketAddr, Arc<AtomicU64>>,
    load: HashMap<SocketAddr, Arc<AtomicU64>>,
    pools: HashMap<SocketAddr, Arc<Mutex<Vec<Sender>>>>,
    direct: HashMap<SocketAddr, Arc<crate::upstream::Pool>>,
    stats: HashMap<Arc<str>, Arc<SiteStats>>,
}

impl Carried {
    fn take<'a>(&mut self, retired: &[Retired], sites: impl Iterator<Item = &'a Arc<Site>>) {
        for (addr, n, _) in retired {
            self.load.insert(*addr, n.clone());
        }
        for site in sites {
            self.stats
                .entry(site.deployment.clone())
                .or_insert_with(|| site.stats.clone());
            for u in &site.upstreams {
                self.health.insert(u.addr, u.down_until.clone());
                self.load.insert(u.addr, u.in_flight.clone());
                self.pools.insert(u.addr, u.idle.clone());
                self.direct.insert(u.addr, u.direct.clone());
            }
        }
    }

    /// The site `spec` describes: `kept` when that is the same route
    /// unchanged, else a new one with the state its addresses had.
    fn site(&mut self, spec: &RouteSpec, host: &str, kept: Option<&Arc<Site>>) -> Arc<Site> {
        if let Some(site) = kept.filter(|site| site.spec == *spec) {
            return site.clone();
        }
        let stats = self
            .stats
            .entry(Arc::from(spec.deployment.as_str()))
            .or_default()
            .clone();
        Arc::new(Site {
            upstreams: spec
                .upstreams
                .iter()
                .map(|&addr| Upstream {
                    addr,
                    down_until: self.health.get(&addr).cloned().unwrap_or_default(),
                    in_flight: self.load.get(&addr).cloned().unwrap_or_default(),
                    idle: self.pools.get(&addr).cloned().unwrap_or_default(),
                    direct: self.direct.get(&addr).cloned().unwrap_or_default(),
                })
                .collect(),
            stats,
            next: AtomicUsize::new(0),
            host: Arc::from(host),
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
}

/// An upstream no longer routed, its requests in flight, and since when.
type Retired = (SocketAddr, Arc<AtomicU64>, Instant);

/// How many parts the table is kept in. A change copies only the parts
/// it touches (the rest are shared with the table before), so changing one
/// site costs the same with 100 sites routed or 100,000.
const SHARDS: usize = 64;

/// Which part a name (a host, or a site's name) is kept in: its first and
/// last eight bytes and its length, mixed by one multiplication; constant
/// time on the request path, whatever the name's length.
fn shard_of(name: &str) -> usize {
    let b = name.as_bytes();
    let word = |bytes: &[u8]| {
        let mut w = [0u8; 8];
        w[..bytes.len()].copy_from_slice(bytes);
        u64::from_le_bytes(w)
    };
    let n = b.len();
    let (head, tail) = (word(&b[..n.min(8)]), word(&b[n.saturating_sub(8)..]));
    let mixed = (head ^ tail.rotate_left(29) ^ n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> 58) as usize % SHARDS
}

/// A host as the table keys it.
fn lower(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

type Shard<T> = Arc<HashMap<Box<str>, T>>;

/// The table the proxy reads on every request.
#[derive(Debug)]
pub struct RouteTable {
    /// Per host, routes by path prefix, longest first (in [`SHARDS`] parts
    /// by host).
    hosts: Vec<Shard<Vec<Arc<Site>>>>,
    /// Each site's (deployment's) route specs (in parts by its name).
    specs: Vec<Shard<Vec<RouteSpec>>>,
    /// Upstreams no longer routed, with when they stopped being routed:
    /// reported as draining while requests are in flight there, and for
    /// [`RETIRED_GRACE`] anyway (a request that read the previous table may
    /// be about to start).
    retired: Vec<Retired>,
}

impl Default for RouteTable {
    fn default() -> RouteTable {
        RouteTable {
            hosts: (0..SHARDS).map(|_| Arc::default()).collect(),
            specs: (0..SHARDS).map(|_| Arc::default()).collect(),
            retired: Vec::new(),
        }
    }
}

/// How long an upstream counts as draining after it stopped being routed.
pub const RETIRED_GRACE: Duration = Duration::from_millis(250);

fn sort_by_path(sites: &mut [Arc<Site>]) {
    if sites.len() > 1 {
        sites.sort_by_key(|s| std::cmp::Reverse(s.spec.path.trim_end_matches('/').len()));
    }
}

impl RouteTable {
    /// Builds a table from `specs`, carrying passive health and counters over
    /// from `previous`; a route whose spec did not change keeps its [`Site`].
    pub fn build(specs: Vec<RouteSpec>, previous: &RouteTable) -> RouteTable {
        let mut by_site: HashMap<&str, Vec<RouteSpec>> = HashMap::new();
        for spec in &specs {
            by_site
                .entry(spec.deployment.as_str())
                .or_default()
                .push(spec.clone());
        }
        // Sites routed before and not now go.
        let mut gone = Vec::new();
        for shard in &previous.specs {
            for site in shard.keys() {
                if !by_site.contains_key(&**site) {
                    gone.push((site.to_string(), Vec::new()));
                }
            }
        }
        let mut changed: Vec<(String, Vec<RouteSpec>)> = by_site
            .into_iter()
            .map(|(site, specs)| (site.to_string(), specs))
            .collect();
        changed.extend(gone);
        if changed.len() > SHARDS * 4 {
            // Many sites: start from empty parts rather than copy and edit.
            let mut next = RouteTable::default();
            next.put(changed, previous, previous.sites().cloned().collect());
            return next;
        }
        previous.patch(changed)
    }

    /// This table with the routes of each site named in `changed` replaced
    /// (none: the site is no longer routed). Only the parts holding those
    /// sites' hosts are copied.
    pub fn patch(&self, changed: Vec<(String, Vec<RouteSpec>)>) -> RouteTable {
        let mut next = RouteTable {
            hosts: self.hosts.clone(),
            specs: self.specs.clone(),
            retired: Vec::new(),
        };
        let mut replaced: Vec<Arc<Site>> = Vec::new();
        for (site, _) in &changed {
            let Some(old) = self.specs[shard_of(site)].get(site.as_str()) else {
                continue;
            };
            for spec in old {
                let host = lower(&spec.host);
                let shard = Arc::make_mut(&mut next.hosts[shard_of(&host)]);
                if let Some(sites) = shard.get_mut(&*host) {
                    sites.retain(|s| {
                        let theirs = *s.deployment == **site;
                        if theirs {
                            replaced.push(s.clone());
                        }
                        !theirs
                    });
                    if sites.is_empty() {
                        shard.remove(&*host);
                    }
                }
            }
        }
        next.put(changed, self, replaced);
        next
    }

    /// Puts each site's routes of `changed` in (none: takes the site out),
    /// carrying the state of `replaced` (the routes they replace, from
    /// `previous`) over to them.
    fn put(
        &mut self,
        changed: Vec<(String, Vec<RouteSpec>)>,
        previous: &RouteTable,
        replaced: Vec<Arc<Site>>,
    ) {
        let mut carried = Carried::default();
        carried.take(&previous.retired, replaced.iter());
        let kept: HashMap<(&str, &str), &Arc<Site>> = replaced
            .iter()
            .map(|s| ((&*s.host, s.spec.path.as_str()), s))
            .collect();
        let mut routed = std::collections::HashSet::new();
        for (site, mut specs) in changed {
            // Kept as `specs()` gives them, for `holds`.
            specs.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
            for spec in &specs {
                let host = lower(&spec.host);
                let old = kept.get(&(&*host, spec.path.as_str())).copied();
                let new = carried.site(spec, &host, old);
                routed.extend(spec.upstreams.iter().copied());
                let shard = Arc::make_mut(&mut self.hosts[shard_of(&host)]);
                let sites = shard.entry(host.into()).or_default();
                sites.push(new);
                sort_by_path(sites);
            }
            let shard = Arc::make_mut(&mut self.specs[shard_of(&site)]);
            if specs.is_empty() {
                shard.remove(site.as_str());
            } else {
                shard.insert(site.into(), specs);
            }
        }
        let gone = replaced.iter().flat_map(|s| &s.upstreams);
        self.retired = retire(&previous.retired, gone, &routed);
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
        self.hosts[shard_of(host)]
            .get(host)?
            .iter()
            .find(|s| path_has_prefix(path, &s.spec.path))
    }

    /// Whether the table holds exactly `specs` (sorted by host and path, as
    /// [`RouteTable::specs`] gives them), compared site by site without
    /// copying the table's own.
    pub fn holds(&self, specs: &[RouteSpec]) -> bool {
        let mut by_site: HashMap<&str, Vec<&RouteSpec>> = HashMap::new();
        for spec in specs {
            by_site.entry(&spec.deployment).or_default().push(spec);
        }
        let held: usize = self.specs.iter().map(|shard| shard.len()).sum();
        held == by_site.len()
            && by_site.iter().all(|(site, given)| {
                self.specs[shard_of(site)].get(*site).is_some_and(|ours| {
                    ours.len() == given.len() && ours.iter().zip(given).all(|(a, b)| a == *b)
                })
            })
    }

    /// Every route's spec, by host and path.
    pub fn specs(&self) -> Vec<RouteSpec> {
        let mut out: Vec<RouteSpec> = self
            .specs
            .iter()
            .flat_map(|shard| shard.values().flatten().cloned())
            .collect();
        out.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        out
    }

    /// True when some route serves `host`: on-demand certificates are issued
    /// only for these.
    pub fn serves_host(&self, host: &str) -> bool {
        self.hosts[shard_of(host)].contains_key(host)
    }

    /// Every route once, for metrics.
    pub fn sites(&self) -> impl Iterator<Item = &Arc<Site>> {
        self.hosts.iter().flat_map(|shard| shard.values().flatten())
    }
}

/// Upstreams no longer routed: those retired before and those of `gone`
/// (routes replaced) that `routed` (the new routes) no longer names, kept
/// while requests are in flight there or for [`RETIRED_GRACE`].
fn retire<'a>(
    before: &[Retired],
    gone: impl Iterator<Item = &'a Upstream>,
    routed: &std::collections::HashSet<SocketAddr>,
) -> Vec<Retired> {
    let now = Instant::now();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (addr, n, at) in before {
        if !routed.contains(addr) && seen.insert(*addr) {
            out.push((*addr, n.clone(), *at));
        }
    }
    for u in gone {
        if !routed.contains(&u.addr) && seen.insert(u.addr) {
            out.push((u.addr, u.in_flight.clone(), now));
        }
    }
    out.retain(|(_, n, at)| n.load(Ordering::Relaxed) > 0 || at.elapsed() < RETIRED_GRACE);
    out
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
        // Few sites (parts copied and edited) and many (parts made anew).
        for others in [0, 300] {
            rebuild_with(others);
        }
    }

    fn rebuild_with(others: u16) {
        let filler: Vec<RouteSpec> = (0..others)
            .map(|i| spec(&format!("f{i}.test"), "/", &format!("f{i}"), &[10_000 + i]))
            .collect();
        let with = |specs: Vec<RouteSpec>| specs.into_iter().chain(filler.clone()).collect();
        let t = RouteTable::build(
            with(vec![
                spec("a.test", "/", "a", &[1]),
                spec("b.test", "/", "b", &[2, 3]),
            ]),
            &RouteTable::default(),
        );
        let b = t.lookup("b.test", "/").unwrap().clone();
        b.stats.requests.fetch_add(7, Ordering::Relaxed);
        b.mark_down(SocketAddr::from(([127, 0, 0, 1], 2)), 1000);
        // a's route is untouched; b's loses an upstream and gains one.
        let t2 = RouteTable::build(
            with(vec![
                spec("a.test", "/", "a", &[1]),
                spec("b.test", "/", "b", &[2, 4]),
            ]),
            &t,
        );
        assert_eq!(t2.specs().len(), 2 + others as usize);
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
        // A patch of one site: the rest stay as they were; a site patched
        // to no routes is gone.
        let t3 = t2.patch(vec![
            ("a".into(), vec![spec("a.test", "/", "a", &[5])]),
            ("b".into(), Vec::new()),
        ]);
        assert_eq!(
            t3.lookup("a.test", "/").unwrap().upstreams[0].addr.port(),
            5
        );
        assert!(t3.lookup("b.test", "/").is_none() && !t3.serves_host("b.test"));
        assert_eq!(t3.specs().len(), 1 + others as usize);
        assert!(t2.holds(&t2.specs()) && t3.holds(&t3.specs()));
        assert!(!t3.holds(&t2.specs()) && !t2.holds(&t3.specs()));
        if others > 0 {
            assert!(Arc::ptr_eq(
                t2.lookup("f7.test", "/").unwrap(),
                t3.lookup("f7.test", "/").unwrap()
            ));
        }
        assert!(t3
            .upstream_load()
            .contains_key(&SocketAddr::from(([127, 0, 0, 1], 4))));
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
        let t2 = RouteTable::build(t.specs(), &t);
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
