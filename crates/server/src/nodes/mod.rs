//! Providers' nodes as the control plane knows them (milestone 5): join
//! tokens, the nodes that joined with them and the certificates they hold,
//! the operations assigned to each, heartbeats and lost nodes, and where
//! each site is placed.
//!
//! What is kept is one file, `nodes/registry.json` (0600, replaced whole on
//! each change; join tokens by their SHA-256 only). Heartbeats are kept in
//! memory: a control plane that restarts gives every node `lost_after` to
//! beat again before it is called lost.
//!
//! A node is trusted with its own assignments and reports only: every call
//! is checked against the certificate it came with ([`Nodes::authenticate`]).

pub mod ca;
mod journal;
mod shared;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commons_agent::protocol::{
    split_join_token, Assigned, Assignments, Certified, Heartbeat, JoinRequest, NodeOffer,
    Operation, Report, Resources, SiteState, JOIN_TOKEN_PREFIX, OPERATIONS,
};
use serde::{Deserialize, Serialize};

use crate::placement::{self, Decision};
use crate::{AppError, ErrorKind};
use journal::{Journal, Key};

/// How nodes are looked after.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// How long a node's certificate lasts (renewed at two thirds).
    pub certificate_lifetime: Duration,
    /// How often agents send heartbeats.
    pub heartbeat: Duration,
    /// A node unheard of for this long is lost.
    pub lost_after: Duration,
}

impl Default for NodeSettings {
    fn default() -> NodeSettings {
        NodeSettings {
            certificate_lifetime: Duration::from_secs(3600),
            heartbeat: Duration::from_secs(5),
            lost_after: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Ready,
    Lost,
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeRecord {
    id: String,
    /// The provider: the organisation whose join token it used.
    provider: String,
    offer: NodeOffer,
    state: NodeState,
    joined_at_ms: i64,
    /// The latest revision of its assignments.
    revision: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinTokenRecord {
    id: String,
    org: String,
    created_by: String,
    expires_at_ms: i64,
    used_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CertRecord {
    node: String,
    not_after: i64,
}

/// Where a site runs, and what it takes there.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Placed {
    node: String,
    generation: u64,
    blueprint: String,
    needs: Resources,
    /// No volume, SQLite or PostgreSQL component: it can run anywhere at once.
    stateless: bool,
    /// The component `SITE.localhost` is routed to.
    #[serde(default)]
    web: Option<String>,
    /// That component's `route:` (its host, path, login-only paths and
    /// limits), which the gateway holds to as for a site of this machine.
    #[serde(default)]
    route: Option<commons_blueprint::model::Route>,
    /// The node it is moving to. It serves from `node` while its copy is
    /// built there, then `holding` from the freeze to the cut-over.
    #[serde(default)]
    moving: Option<String>,
    /// New connections to it wait (its move is cutting over).
    #[serde(default)]
    holding: bool,
    /// Nodes it moved away from that keep its stopped copy until the
    /// operator confirms the move.
    #[serde(default)]
    left_on: Vec<String>,
    request: PlaceRequest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpRecord {
    id: String,
    revision: u64,
    operation: Operation,
    report: Option<Report>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    nodes: BTreeMap<String, NodeRecord>,
    join_tokens: BTreeMap<String, JoinTokenRecord>,
    certificates: BTreeMap<String, CertRecord>,
    placements: BTreeMap<String, Placed>,
    operations: BTreeMap<String, Vec<OpRecord>>,
}

struct Inner {
    reg: Registry,
    /// The file journal, unless the registry is shared in PostgreSQL.
    journal: Option<Journal>,
    /// Shared: the sequence number of the latest row this holds.
    seq: i64,
    /// What the placements take of each node and how many each provider
    /// has: kept by `place` as it goes (placing one site must not count
    /// them all), made again after any other change of placements.
    load: Option<Load>,
    last_seen: HashMap<String, Instant>,
    sites: HashMap<String, Vec<SiteState>>,
}

/// A node as a provider or the platform sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub id: String,
    pub provider: String,
    #[schema(value_type = Object)]
    pub offer: NodeOffer,
    /// `ready`, `lost` or `revoked`.
    #[schema(value_type = String)]
    pub state: NodeState,
    pub joined_at_ms: i64,
    /// Milliseconds since its last heartbeat (none since this control plane started).
    pub last_heartbeat_ms_ago: Option<u64>,
    #[schema(value_type = Vec<Object>)]
    pub sites: Vec<SiteState>,
    /// The sites placed there.
    pub placed: Vec<String>,
    /// Those of them moving away.
    pub moving: Vec<String>,
    /// Sites that moved away and left a stopped copy here, until confirmed.
    pub kept: Vec<String>,
    /// The node's tunnel is open, until then (milliseconds since the
    /// epoch): when the certificate it was opened with expires. None while
    /// no tunnel is open.
    pub tunnel_until_ms: Option<i64>,
    /// Tunnels it holds open: the newest, which new connections take, and
    /// those of earlier certificates, which carry their connections until
    /// their certificate expires.
    pub tunnels_open: usize,
}

/// A site to place among the nodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceRequest {
    /// The site's name, as a deployment's: a DNS label.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub site: String,
    /// The blueprint, YAML, one file.
    pub blueprint: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub needs: Resources,
    #[serde(default)]
    pub features: BTreeSet<String>,
    /// Only these providers.
    pub providers: Option<BTreeSet<String>>,
    /// Only these regions.
    pub regions: Option<BTreeSet<String>>,
    /// Providers preferred, best first.
    #[serde(default)]
    pub preferred: Vec<String>,
    /// Decide only: place nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// The control plane's nodes.
pub struct Nodes {
    path: PathBuf,
    pub ca: ca::NodeCa,
    pub settings: NodeSettings,
    inner: Arc<Mutex<Inner>>,
    /// Who to tell of a change.
    wakes: Arc<Wakes>,
    /// The registry in PostgreSQL, when the platform's store is there.
    shared: Option<shared::SharedRegistry>,
}

/// Who waits for changes.
#[derive(Default)]
struct Wakes {
    /// Bumped on every change of placements or assignments (the gateway's
    /// routes, the tunnels).
    all: tokio::sync::watch::Sender<u64>,
    /// Bumped when a node's operations change: its long poll waits on its
    /// own, so an assignment wakes one poll rather than every node's.
    nodes: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Wakes {
    fn node(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.entry(node.to_string()).or_default().subscribe()
    }

    /// Tells those waiting on `nodes`, and on any change.
    fn assigned<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) {
        let polls = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut any = false;
        for node in nodes {
            any = true;
            if let Some(poll) = polls.get(node) {
                poll.send_modify(|n| *n += 1);
            }
        }
        drop(polls);
        if any {
            self.all.send_modify(|n| *n += 1);
        }
    }
}

/// The registry held to be changed: under the mutex and, when it is shared,
/// under the database's lock too, with every other instance's changes read
/// in. Dropped without [`Nodes::save`], the change is abandoned.
struct Changing<'a> {
    guard: std::sync::MutexGuard<'a, Inner>,
    shared: Option<&'a shared::SharedRegistry>,
}

impl std::ops::Deref for Changing<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.guard
    }
}

impl std::ops::DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.guard
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        // After a save this ends nothing: the change was committed.
        if let Some(shared) = self.shared {
            shared.rollback();
        }
    }
}

fn unauthenticated(detail: impl Into<String>) -> AppError {
    AppError::new(
        ErrorKind::Unauthenticated,
        "Not a node of this platform",
        detail,
    )
}

fn forbidden(detail: impl Into<String>) -> AppError {
    AppError::new(ErrorKind::Forbidden, "Not allowed", detail)
}

fn internal(e: impl std::fmt::Display) -> AppError {
    AppError::new(ErrorKind::Internal, "Nodes", e.to_string())
}

/// What the placements take of each node, and how many sites each
/// provider's nodes have.
#[derive(Debug, Default, PartialEq, Eq)]
struct Load {
    taken: HashMap<String, Resources>,
    by_provider: BTreeMap<String, u32>,
}

impl Load {
    fn of(reg: &Registry) -> Load {
        let mut load = Load::default();
        for p in reg.placements.values() {
            load.count(p, reg, true);
        }
        load
    }

    /// Counts placement `p` in (`add`) or out.
    fn count(&mut self, p: &Placed, reg: &Registry, add: bool) {
        let t = self.taken.entry(p.node.clone()).or_default();
        let f = |a: u64, b: u64| if add { a + b } else { a.saturating_sub(b) };
        t.cpu_millis = f(t.cpu_millis, p.needs.cpu_millis);
        t.memory_bytes = f(t.memory_bytes, p.needs.memory_bytes);
        t.disk_bytes = f(t.disk_bytes, p.needs.disk_bytes);
        if *t == Resources::default() {
            self.taken.remove(&p.node);
        }
        if let Some(n) = reg.nodes.get(&p.node) {
            let c = self.by_provider.entry(n.provider.clone()).or_default();
            *c = if add { *c + 1 } else { c.saturating_sub(1) };
            if *c == 0 {
                self.by_provider.remove(&n.provider);
            }
        }
    }
}

/// What assigning an operation to `node` changes: its revision and its
/// operations.
fn assigned(node: &str) -> [Key; 2] {
    [Key::Node(node.to_string()), Key::Ops(node.to_string())]
}

/// A site on a provider's node as the gateway routes it.
#[derive(Debug, Clone)]
pub struct RoutedSite {
    pub site: String,
    /// The node it is placed on.
    pub node: String,
    /// The component its routes lead to.
    pub component: String,
    /// Changes with every placement and move (see `epoch`).
    pub epoch: u64,
    /// The component's `route:`, when its blueprint gives one.
    pub route: Option<commons_blueprint::model::Route>,
}

fn epoch(p: &Placed) -> u64 {
    p.generation * 2 + u64::from(p.holding)
}

/// What placement needs of a blueprint: whether it keeps data (a volume,
/// SQLite or PostgreSQL: such a site waits for its node, or for an explicit
/// move), the component its host is routed to and that component's route.
/// Read from the text alone: includes are not followed.
type Shape = (
    bool,
    Option<String>,
    Option<commons_blueprint::model::Route>,
);

fn shape(blueprint: &str) -> Result<Shape, AppError> {
    use commons_blueprint::model::Kind;
    let file = Path::new("/blueprint/commons.yaml");
    let sources =
        commons_blueprint::load::InMemory([(file.to_path_buf(), blueprint.to_string())].into());
    let bp = commons_blueprint::load(file, &sources).map_err(|d| {
        AppError::new(
            ErrorKind::Invalid,
            "Invalid blueprint",
            format!("the blueprint does not load: {d}"),
        )
    })?;
    let keeps_data = bp
        .components
        .values()
        .any(|c| matches!(c.kind, Kind::Volume | Kind::Sqlite | Kind::Postgres));
    let web = bp
        .components
        .iter()
        .find(|(_, c)| matches!(c.kind, Kind::Process { .. } | Kind::Image(_)));
    Ok((
        keeps_data,
        web.map(|(name, _)| name.clone()),
        web.and_then(|(_, c)| c.route.clone()),
    ))
}

impl Nodes {
    /// The nodes kept under `home/nodes` — or, with the platform's store in
    /// PostgreSQL, in the database, shared by every instance (see
    /// [`shared`]) — and the CA, made on first use.
    pub fn open(
        home: &Path,
        settings: NodeSettings,
        store: &commons_store::StoreConfig,
    ) -> Result<Nodes, String> {
        let dir = commons_runtime::Layout::new(home).nodes_dir();
        crate::private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ca = ca::NodeCa::open(&dir)?;
        let path = dir.join("registry.json");
        let (journal, reg, shared, seq) = match store {
            commons_store::StoreConfig::Embedded => {
                let (journal, reg) = Journal::open(&dir)?;
                (Some(journal), reg, None, 0)
            }
            commons_store::StoreConfig::Postgres { url, schema } => {
                let (registry, rows) = shared::SharedRegistry::open(url, schema)?;
                let mut reg = Registry::default();
                let mut seq = 0;
                for row in rows {
                    seq = row.seq;
                    row.line.apply(&mut reg);
                }
                (None, reg, Some(registry), seq)
            }
        };
        let now = Instant::now();
        let last_seen = reg.nodes.keys().map(|id| (id.clone(), now)).collect();
        let inner = Arc::new(Mutex::new(Inner {
            reg,
            journal,
            seq,
            load: None,
            last_seen,
            sites: HashMap::new(),
        }));
        let wakes = Arc::new(Wakes::default());
        let shared = match shared {
            Some(registry) => {
                registry.follow(Arc::downgrade(&inner), Arc::downgrade(&wakes))?;
                Some(registry)
            }
            None => None,
        };
        Ok(Nodes {
            path,
            ca,
            settings,
            inner,
            wakes,
            shared,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registry held to be changed (see [`Changing`]).
    fn lock_to_change(&self) -> Result<Changing<'_>, AppError> {
        let guard = self.lock();
        let Some(shared) = &self.shared else {
            return Ok(Changing {
                guard,
                shared: None,
            });
        };
        let after = guard.seq;
        let mut changing = Changing {
            guard,
            shared: Some(shared),
        };
        let news = shared.begin(after).map_err(internal)?;
        let assigned = shared::absorb(&mut changing, news);
        self.wakes.assigned(assigned.iter().map(String::as_str));
        Ok(changing)
    }

    /// Reads in what other instances changed, now rather than at the
    /// follower's next turn (for a caller that would refuse what it does
    /// not know of yet).
    fn catch_up(&self) {
        let Some(shared) = &self.shared else { return };
        let after = self.lock().seq;
        match shared.since(after) {
            Ok(news) => {
                let assigned = shared::absorb(&mut self.lock(), news);
                self.wakes.assigned(assigned.iter().map(String::as_str));
            }
            Err(e) => tracing::warn!(error = %e, "reading the nodes' registry"),
        }
    }

    /// Keeps the entries `changed` (as `inner` holds them now): on disk, or
    /// in the shared registry, ending the change.
    fn save(&self, inner: &mut Inner, changed: &[Key]) -> Result<(), AppError> {
        self.keep(inner, changed)?;
        self.wakes.assigned(changed.iter().filter_map(|k| match k {
            Key::Ops(node) => Some(node.as_str()),
            _ => None,
        }));
        Ok(())
    }

    fn keep(&self, inner: &mut Inner, changed: &[Key]) -> Result<(), AppError> {
        if let Some(shared) = &self.shared {
            let keys: BTreeSet<&Key> = changed.iter().collect();
            let lines: Vec<journal::Line> = keys
                .into_iter()
                .map(|k| journal::Line::of(&inner.reg, k))
                .collect();
            return match shared.commit(&lines, inner.seq) {
                Ok(seq) => {
                    inner.seq = seq;
                    Ok(())
                }
                Err(e) => {
                    // What this instance holds is the registry as kept.
                    inner.reg = Registry::default();
                    inner.seq = 0;
                    inner.load = None;
                    if let Ok(rows) = shared.since(0) {
                        shared::absorb(inner, rows);
                    }
                    Err(internal(e))
                }
            };
        }
        let Inner { journal, reg, .. } = inner;
        let journal = journal.as_mut().expect("a file journal when not shared");
        journal.record(reg, changed).map_err(internal)
    }

    /// Makes a single-use join token for `org`'s nodes, good for `ttl`:
    /// `cmnj_PIN_SECRET`, where PIN is the CA's (the agent refuses any
    /// other CA) and SECRET is kept only as its hash.
    pub fn make_join_token(
        &self,
        org: &str,
        actor: &str,
        ttl: Duration,
    ) -> Result<(String, String, i64), AppError> {
        let secret = crate::tokens::random(40);
        let id = format!("jt-{}", crate::tokens::random(12));
        let expires_at_ms = commons_clock::now_ms() + ttl.as_millis() as i64;
        let mut inner = self.lock_to_change()?;
        let key = crate::tokens::hash(&secret);
        inner.reg.join_tokens.insert(
            key.clone(),
            JoinTokenRecord {
                id: id.clone(),
                org: org.to_string(),
                created_by: actor.to_string(),
                expires_at_ms,
                used_by: None,
            },
        );
        self.save(&mut inner, &[Key::Token(key)])?;
        let token = format!("{JOIN_TOKEN_PREFIX}{}_{secret}", self.ca.pin());
        Ok((token, id, expires_at_ms))
    }

    /// A node joins: its token is taken (once, unexpired, this CA's) and its
    /// key certified.
    pub fn join(&self, req: &JoinRequest) -> Result<Certified, AppError> {
        let Some((pin, secret)) = split_join_token(&req.token) else {
            return Err(unauthenticated("that is not a join token of this platform"));
        };
        if pin != self.ca.pin() {
            return Err(unauthenticated(
                "that join token is for another platform's CA",
            ));
        }
        if req.offer.region.trim().is_empty() {
            return Err(AppError::new(
                ErrorKind::Invalid,
                "Invalid offer",
                "say the node's region (`--region`)",
            ));
        }
        let mut inner = self.lock_to_change()?;
        let key = crate::tokens::hash(secret);
        let now = commons_clock::now_ms();
        let Some(token) = inner.reg.join_tokens.get(&key).cloned() else {
            return Err(unauthenticated("that is not a join token of this platform"));
        };
        if let Some(node) = &token.used_by {
            return Err(unauthenticated(format!(
                "join token {} was used already (by node {node}); ask the provider for a new one",
                token.id
            )));
        }
        if token.expires_at_ms <= now {
            return Err(unauthenticated(format!(
                "join token {} expired; ask the provider for a new one",
                token.id
            )));
        }
        // A node whose certificate expired comes back as itself, on its
        // provider's new token: the token is the provider's consent, and
        // only its own nodes, never a revoked one, can be named.
        let node = match &req.node {
            None => format!("node-{}", crate::tokens::random(12)),
            Some(known) => match inner.reg.nodes.get(known) {
                Some(n) if n.provider != token.org => {
                    return Err(forbidden(format!(
                        "node {known} is not one of {}'s nodes",
                        token.org
                    )))
                }
                None => {
                    return Err(forbidden(format!(
                        "there is no node {known} here: join as a new node (remove the \
                         machine's agent directory first)"
                    )))
                }
                Some(n) if n.state == NodeState::Revoked => {
                    return Err(forbidden(format!(
                        "node {known} was revoked: join as a new node (remove the machine's \
                         agent directory first)"
                    )))
                }
                Some(_) => known.clone(),
            },
        };
        let lifetime = self.settings.certificate_lifetime.as_secs() as i64;
        let signed = self
            .ca
            .sign_node(&req.csr, &node, lifetime)
            .map_err(|e| AppError::new(ErrorKind::Invalid, "Invalid certificate request", e))?;
        inner
            .reg
            .join_tokens
            .get_mut(&key)
            .expect("found above")
            .used_by = Some(node.clone());
        inner.reg.certificates.insert(
            signed.fingerprint.clone(),
            CertRecord {
                node: node.clone(),
                not_after: signed.not_after,
            },
        );
        match inner.reg.nodes.get_mut(&node) {
            // Its offer, placements and operations stay as they were; the
            // heartbeats that follow make it ready again if it was lost.
            Some(_) => {}
            None => {
                inner.reg.nodes.insert(
                    node.clone(),
                    NodeRecord {
                        id: node.clone(),
                        provider: token.org.clone(),
                        offer: req.offer.clone(),
                        state: NodeState::Ready,
                        joined_at_ms: now,
                        revision: 0,
                    },
                );
                inner.last_seen.insert(node.clone(), Instant::now());
            }
        }
        self.save(
            &mut inner,
            &[
                Key::Token(key),
                Key::Cert(signed.fingerprint.clone()),
                Key::Node(node.clone()),
            ],
        )?;
        let verb = if req.node.is_some() {
            "Rejoined"
        } else {
            "Joined"
        };
        eprintln!("{:>12} node {node} of {}", verb, token.org);
        Ok(self.certified(node, signed))
    }

    fn certified(&self, node: String, signed: ca::Signed) -> Certified {
        Certified {
            node,
            certificate: signed.pem,
            not_after: signed.not_after,
            lifetime_secs: self.settings.certificate_lifetime.as_secs() as i64,
            heartbeat_secs: self.settings.heartbeat.as_secs().max(1),
        }
    }

    /// Who the certificate `fingerprint` is, if it may act as `node`: a
    /// certificate this CA issued, to that node, not revoked, not expired
    /// (the handshake checks that too, but a connection may outlive it).
    /// Answers when it expires, in seconds since the epoch.
    pub fn authenticate(&self, fingerprint: Option<&str>, node: &str) -> Result<i64, AppError> {
        let Some(fingerprint) = fingerprint else {
            return Err(unauthenticated(
                "present the node's certificate (only joining goes without one)",
            ));
        };
        // A certificate another instance issued a moment ago.
        if !self.lock().reg.certificates.contains_key(fingerprint) {
            self.catch_up();
        }
        let inner = self.lock();
        let Some(cert) = inner.reg.certificates.get(fingerprint) else {
            return Err(forbidden(
                "this certificate was revoked or never issued here",
            ));
        };
        if cert.node != node {
            return Err(forbidden(format!(
                "this certificate is node {}'s: a node acts only for itself",
                cert.node
            )));
        }
        if cert.not_after <= commons_clock::now_secs() as i64 {
            return Err(forbidden(
                "this certificate expired: an agent renews it before then, and a node that was \
                 down longer joins again with a new token",
            ));
        }
        match inner.reg.nodes.get(node).map(|n| n.state) {
            Some(NodeState::Revoked) | None => Err(forbidden(format!("node {node} was revoked"))),
            _ => Ok(cert.not_after),
        }
    }

    /// Whether `node` was revoked (or never joined).
    pub fn is_revoked(&self, node: &str) -> bool {
        self.lock()
            .reg
            .nodes
            .get(node)
            .is_none_or(|n| n.state == NodeState::Revoked)
    }

    /// A new certificate for a new key of `node` (already authenticated).
    pub fn renew(&self, node: &str, csr: &str) -> Result<Certified, AppError> {
        let lifetime = self.settings.certificate_lifetime.as_secs() as i64;
        let signed = self
            .ca
            .sign_node(csr, node, lifetime)
            .map_err(|e| AppError::new(ErrorKind::Invalid, "Invalid certificate request", e))?;
        let mut inner = self.lock_to_change()?;
        let now = commons_clock::now_secs() as i64;
        let mut changed: Vec<Key> = inner
            .reg
            .certificates
            .iter()
            .filter(|(_, c)| c.not_after <= now)
            .map(|(k, _)| Key::Cert(k.clone()))
            .collect();
        inner.reg.certificates.retain(|_, c| c.not_after > now);
        inner.reg.certificates.insert(
            signed.fingerprint.clone(),
            CertRecord {
                node: node.to_string(),
                not_after: signed.not_after,
            },
        );
        changed.push(Key::Cert(signed.fingerprint.clone()));
        self.save(&mut inner, &changed)?;
        Ok(self.certified(node.to_string(), signed))
    }

    /// A heartbeat from `node`: it is alive, and runs these sites. A lost
    /// node that beats again is ready again.
    pub fn heartbeat(&self, node: &str, hb: Heartbeat) -> Result<(), AppError> {
        if let Some(shared) = &self.shared {
            shared.beat(node, &hb.sites);
        }
        let mut inner = self.lock();
        inner.last_seen.insert(node.to_string(), Instant::now());
        inner.sites.insert(node.to_string(), hb.sites);
        let lost = |inner: &Inner| {
            inner
                .reg
                .nodes
                .get(node)
                .is_some_and(|n| n.state == NodeState::Lost)
        };
        if !lost(&inner) {
            return Ok(());
        }
        drop(inner);
        let mut inner = self.lock_to_change()?;
        if !lost(&inner) {
            return Ok(());
        }
        if let Some(n) = inner.reg.nodes.get_mut(node) {
            n.state = NodeState::Ready;
        }
        eprintln!("{:>12} node {node} is back", "Node");
        self.save(&mut inner, &[Key::Node(node.to_string())])
    }

    /// The operations assigned to `node` after revision `after`.
    pub fn assignments(&self, node: &str, after: u64) -> Assignments {
        let inner = self.lock();
        let revision = inner.reg.nodes.get(node).map(|n| n.revision).unwrap_or(0);
        let operations = inner
            .reg
            .operations
            .get(node)
            .map(|ops| {
                ops.iter()
                    .filter(|o| o.revision > after)
                    .map(|o| Assigned {
                        id: o.id.clone(),
                        revision: o.revision,
                        operation: serde_json::to_value(&o.operation).expect("serialisable"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Assignments {
            revision,
            operations,
        }
    }

    /// Wakes when anything is assigned to any node, or placed.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakes.all.subscribe()
    }

    /// Whether the registry is shared with other instances (kept in
    /// PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Tells those following placements (the gateway's routes) that where
    /// sites can be reached from here changed: a node's tunnel opened or
    /// closed.
    pub fn reachability_changed(&self) {
        self.wakes.all.send_modify(|n| *n += 1);
    }

    /// Wakes when `node`'s operations change (an assignment, a report).
    pub fn watch_node(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        self.wakes.node(node)
    }

    /// `node`'s report of one of its operations.
    pub fn report(&self, node: &str, op: &str, report: Report) -> Result<(), AppError> {
        let mut inner = self.lock_to_change()?;
        let Some(record) = inner
            .reg
            .operations
            .get_mut(node)
            .and_then(|ops| ops.iter_mut().find(|o| o.id == op))
        else {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such operation",
                format!("node {node} has no operation {op}"),
            ));
        };
        if record.report.is_none() {
            eprintln!(
                "{:>12} {op} on {node}: {} {}",
                "Operation", report.outcome, report.detail
            );
        }
        record.report = Some(report);
        self.save(&mut inner, &[Key::Ops(node.to_string())])
    }

    /// The report of one operation, if it came.
    pub fn report_of(&self, node: &str, op: &str) -> Option<Report> {
        self.lock()
            .reg
            .operations
            .get(node)?
            .iter()
            .find(|o| o.id == op)?
            .report
            .clone()
    }

    /// Assigns `operation` to `node`: its id and revision.
    pub fn assign(&self, node: &str, operation: Operation) -> Result<(String, u64), AppError> {
        let mut inner = self.lock_to_change()?;
        let r = Self::assign_locked(&mut inner.reg, node, operation)?;
        self.save(&mut inner, &assigned(node))?;
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok(r)
    }

    fn assign_locked(
        reg: &mut Registry,
        node: &str,
        operation: Operation,
    ) -> Result<(String, u64), AppError> {
        let Some(n) = reg.nodes.get_mut(node) else {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such node",
                format!("no node \"{node}\""),
            ));
        };
        if n.state == NodeState::Revoked {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Node revoked",
                format!("node {node} was revoked: it takes no operations"),
            ));
        }
        n.revision += 1;
        let revision = n.revision;
        let id = format!("op-{}", crate::tokens::random(16));
        let ops = reg.operations.entry(node.to_string()).or_default();
        ops.push(OpRecord {
            id: id.clone(),
            revision,
            operation,
            report: None,
        });
        // Reported operations beyond the last 256 are history.
        let reported = ops.iter().filter(|o| o.report.is_some()).count();
        if reported > 256 {
            let mut drop = reported - 256;
            ops.retain(|o| {
                if drop > 0 && o.report.is_some() {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
        Ok((id, revision))
    }

    /// Decodes an operation someone asked for: only the closed set decodes.
    pub fn operation(value: serde_json::Value) -> Result<Operation, AppError> {
        serde_json::from_value(value).map_err(|e| {
            AppError::new(
                ErrorKind::Invalid,
                "Not an operation a node accepts",
                format!("{e}; a node accepts {}", OPERATIONS.join(", ")),
            )
        })
    }

    /// Revokes `org`'s node `id`: its certificates stop working at once.
    pub fn revoke(&self, org: Option<&str>, id: &str) -> Result<(), AppError> {
        let mut inner = self.lock_to_change()?;
        match inner.reg.nodes.get_mut(id) {
            Some(n) if org.is_none_or(|o| o == n.provider) => n.state = NodeState::Revoked,
            _ => {
                return Err(AppError::new(
                    ErrorKind::NotFound,
                    "No such node",
                    format!("no node \"{id}\" of yours"),
                ))
            }
        }
        let mut changed: Vec<Key> = inner
            .reg
            .certificates
            .iter()
            .filter(|(_, c)| c.node == id)
            .map(|(k, _)| Key::Cert(k.clone()))
            .collect();
        inner.reg.certificates.retain(|_, c| c.node != id);
        changed.push(Key::Node(id.to_string()));
        self.save(&mut inner, &changed)?;
        eprintln!("{:>12} node {id}", "Revoked");
        Ok(())
    }

    /// The nodes of `org` (every node: `None`).
    pub fn list(&self, org: Option<&str>) -> Vec<NodeView> {
        let inner = self.lock();
        // One pass over the placements, not one per node.
        #[derive(Default)]
        struct Here {
            placed: Vec<String>,
            moving: Vec<String>,
            kept: Vec<String>,
        }
        let mut here: std::collections::HashMap<&str, Here> = Default::default();
        for (site, p) in &inner.reg.placements {
            let on = here.entry(p.node.as_str()).or_default();
            on.placed.push(site.clone());
            if p.moving.is_some() {
                on.moving.push(site.clone());
            }
            for left in &p.left_on {
                here.entry(left.as_str())
                    .or_default()
                    .kept
                    .push(site.clone());
            }
        }
        inner
            .reg
            .nodes
            .values()
            .filter(|n| org.is_none_or(|o| o == n.provider))
            .map(|n| {
                let Here {
                    placed,
                    moving,
                    kept,
                } = here.remove(n.id.as_str()).unwrap_or_default();
                NodeView {
                    id: n.id.clone(),
                    provider: n.provider.clone(),
                    offer: n.offer.clone(),
                    state: n.state,
                    joined_at_ms: n.joined_at_ms,
                    last_heartbeat_ms_ago: inner
                        .last_seen
                        .get(&n.id)
                        .map(|t| t.elapsed().as_millis() as u64),
                    sites: inner.sites.get(&n.id).cloned().unwrap_or_default(),
                    placed,
                    moving,
                    kept,
                    tunnel_until_ms: None,
                    tunnels_open: 0,
                }
            })
            .collect()
    }

    /// The node a site is placed on.
    pub fn placed_on(&self, site: &str) -> Option<String> {
        self.lock().reg.placements.get(site).map(|p| p.node.clone())
    }

    /// The nodes as placement sees them: ready ones alive, with what the
    /// sites placed there take.
    fn candidates(reg: &Registry, load: &Load) -> Vec<placement::Node> {
        let taken = &load.taken;
        reg.nodes
            .values()
            .filter(|n| n.state != NodeState::Revoked)
            .map(|n| placement::Node {
                id: n.id.clone(),
                provider: n.provider.clone(),
                region: n.offer.region.clone(),
                alive: n.state == NodeState::Ready,
                capacity: n.offer.capacity,
                allocated: taken.get(n.id.as_str()).copied().unwrap_or_default(),
                price: n.offer.price,
                features: n.offer.features.clone(),
            })
            .collect()
    }

    fn placement_request(
        req: &PlaceRequest,
        load: &Load,
        data_on: Option<String>,
    ) -> placement::Request {
        let operator_sites = load.by_provider.clone();
        placement::Request {
            site: req.site.clone(),
            needs: req.needs,
            features: req.features.clone(),
            providers: req.providers.clone(),
            regions: req.regions.clone(),
            preferred: req.preferred.clone(),
            avoid: BTreeSet::new(),
            data_on,
            operator_sites,
        }
    }

    /// Places a site: decides among the nodes and, unless it is a dry run,
    /// assigns it to the chosen node — in one step under one lock, so two
    /// placements never overcommit a node. A site placed before is applied
    /// again where it is when it still fits there, at the next generation.
    pub fn place(&self, req: PlaceRequest) -> Result<Decision, AppError> {
        let (keeps_data, web, route) = shape(&req.blueprint)?;
        let stateless = !keeps_data;
        let site = req.site.clone();
        let mut guard = self.lock_to_change()?;
        let inner = &mut *guard;
        let load = inner.load.get_or_insert_with(|| Load::of(&inner.reg));
        let previous = inner.reg.placements.remove(&req.site);
        if let Some(p) = &previous {
            load.count(p, &inner.reg, false);
        }
        let request =
            Self::placement_request(&req, load, previous.as_ref().map(|p| p.node.clone()));
        let decision = placement::decide(&Self::candidates(&inner.reg, load), &request);
        if req.dry_run || decision.node.is_none() {
            if let Some(p) = previous {
                load.count(&p, &inner.reg, true);
                inner.reg.placements.insert(req.site.clone(), p);
            }
            return Ok(decision);
        }
        let node = decision.node.clone().expect("checked above");
        let generation = previous.as_ref().map(|p| p.generation + 1).unwrap_or(1);
        let mut changed = vec![Key::Placement(req.site.clone())];
        changed.extend(assigned(&node));
        if let Some(old) = previous.as_ref().filter(|p| p.node != node) {
            changed.extend(assigned(&old.node));
            Self::assign_locked(
                &mut inner.reg,
                &old.node,
                Operation::Remove {
                    site: req.site.clone(),
                },
            )?;
        }
        Self::assign_locked(
            &mut inner.reg,
            &node,
            Operation::ApplySite {
                site: req.site.clone(),
                generation,
                blueprint: req.blueprint.clone(),
            },
        )?;
        inner.reg.placements.insert(
            req.site.clone(),
            Placed {
                node,
                generation,
                blueprint: req.blueprint.clone(),
                needs: req.needs,
                stateless,
                web,
                route,
                moving: None,
                holding: false,
                left_on: Vec::new(),
                request: PlaceRequest {
                    dry_run: false,
                    ..req
                },
            },
        );
        if let (Some(load), Some(p)) = (inner.load.as_mut(), inner.reg.placements.get(&site)) {
            load.count(p, &inner.reg, true);
        }
        #[cfg(debug_assertions)]
        assert_eq!(
            inner.load.as_ref(),
            Some(&Load::of(&inner.reg)),
            "placements' load"
        );
        self.save(inner, &changed)?;
        drop(guard);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok(decision)
    }

    /// Marks nodes unheard of for `lost_after` lost, and places their
    /// stateless sites elsewhere (the lost node is told to remove them when
    /// it comes back). Sites with data stay: they wait for their node, or
    /// for an operator's move. Returns the nodes newly lost.
    pub fn sweep(&self) -> Vec<String> {
        let lost_after = self.settings.lost_after;
        let lost_now = |inner: &Inner| -> Vec<String> {
            inner
                .reg
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Ready)
                .filter(|n| {
                    inner
                        .last_seen
                        .get(&n.id)
                        .is_none_or(|t| t.elapsed() >= lost_after)
                })
                .map(|n| n.id.clone())
                .collect()
        };
        // Looked at first without the registry's lock, which another
        // instance sharing it would wait for.
        if lost_now(&self.lock()).is_empty() {
            return Vec::new();
        }
        let mut inner = match self.lock_to_change() {
            Ok(inner) => inner,
            Err(e) => {
                eprintln!("{:>12} nodes: {}", "Warning", e.detail);
                return Vec::new();
            }
        };
        let lost = lost_now(&inner);
        if lost.is_empty() {
            return lost;
        }
        let mut changed = Vec::new();
        for id in &lost {
            if let Some(n) = inner.reg.nodes.get_mut(id) {
                n.state = NodeState::Lost;
            }
            changed.push(Key::Node(id.clone()));
            eprintln!("{:>12} node {id}: no heartbeat for {lost_after:?}", "Lost");
        }
        let moving: Vec<(String, Placed)> = inner
            .reg
            .placements
            .iter()
            .filter(|(_, p)| p.stateless && lost.contains(&p.node))
            .map(|(s, p)| (s.clone(), p.clone()))
            .collect();
        for (site, placed) in moving {
            inner.reg.placements.remove(&site);
            // Rare (a node was lost): counted afresh for each site.
            inner.load = None;
            let load = Load::of(&inner.reg);
            let request = Self::placement_request(&placed.request, &load, None);
            let decision = placement::decide(&Self::candidates(&inner.reg, &load), &request);
            let Some(node) = decision.node else {
                eprintln!(
                    "{:>12} no node can take {site}, whose node was lost",
                    "Warning"
                );
                inner.reg.placements.insert(site, placed);
                continue;
            };
            let generation = placed.generation + 1;
            changed.push(Key::Placement(site.clone()));
            changed.extend(assigned(&placed.node));
            changed.extend(assigned(&node));
            let _ = Self::assign_locked(
                &mut inner.reg,
                &placed.node,
                Operation::Remove { site: site.clone() },
            );
            if let Err(e) = Self::assign_locked(
                &mut inner.reg,
                &node,
                Operation::ApplySite {
                    site: site.clone(),
                    generation,
                    blueprint: placed.blueprint.clone(),
                },
            ) {
                eprintln!("{:>12} cannot assign {site}: {}", "Warning", e.detail);
                inner.reg.placements.insert(site, placed);
                continue;
            }
            eprintln!("{:>12} {site} from {} to {node}", "Placed", placed.node);
            inner.reg.placements.insert(
                site,
                Placed {
                    node,
                    generation,
                    ..placed
                },
            );
        }
        if let Err(e) = self.save(&mut inner, &changed) {
            eprintln!("{:>12} nodes: {}", "Warning", e.detail);
        }
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        lost
    }

    /// The node that serves `site` now: where it is placed, while that node
    /// is ready.
    pub fn serving_node(&self, site: &str) -> Option<String> {
        let inner = self.lock();
        let node = &inner.reg.placements.get(site)?.node;
        (inner.reg.nodes.get(node)?.state == NodeState::Ready).then(|| node.clone())
    }

    /// The sites placed on nodes, the component each host is routed to, and
    /// the placement's epoch: it changes when a move starts and when it
    /// ends, and with it the upstream the gateway is given, so requests
    /// in flight finish where they started while new ones wait.
    /// Only those on nodes `reachable` says this instance reaches are
    /// counted (and copied).
    pub fn routed_sites(&self, reachable: impl Fn(&str) -> bool) -> Vec<RoutedSite> {
        self.lock()
            .reg
            .placements
            .iter()
            .filter(|(_, p)| reachable(&p.node))
            .filter_map(|(site, p)| {
                Some(RoutedSite {
                    site: site.clone(),
                    node: p.node.clone(),
                    component: p.web.clone()?,
                    epoch: epoch(p),
                    route: p.route.clone(),
                })
            })
            .collect()
    }

    /// `site`'s routed component and epoch (see [`Nodes::routed_sites`]).
    pub fn route_of(&self, site: &str) -> Option<(String, u64)> {
        let inner = self.lock();
        let p = inner.reg.placements.get(site)?;
        Some((p.web.clone()?, epoch(p)))
    }

    /// Who served `site` (its node and that node's provider), for usage.
    pub fn attribution(&self, site: &str) -> Option<(String, String)> {
        let inner = self.lock();
        let node = &inner.reg.placements.get(site)?.node;
        Some((node.clone(), inner.reg.nodes.get(node)?.provider.clone()))
    }

    /// Marks each event with the node and provider that served its site
    /// (a request to a site on a provider's node is theirs).
    pub fn attribute(&self, events: &mut [commons_meter::Event]) {
        for e in events {
            let site = e.data.get("site").and_then(|s| s.as_str()).unwrap_or("");
            if let Some((node, provider)) = self.attribution(site) {
                e.data.insert("node".into(), node.into());
                e.data.insert("provider".into(), provider.into());
            }
        }
    }

    /// A number that changes whenever placements do.
    pub fn version(&self) -> u64 {
        *self.wakes.all.borrow()
    }

    /// Starts moving `site` to node `to` (or to the best node of provider
    /// `to`): it must fit there. Answers the nodes it moves from and to.
    pub fn begin_move(&self, site: &str, to: &str) -> Result<(String, String), AppError> {
        let mut inner = self.lock_to_change()?;
        let Some(placed) = inner.reg.placements.get(site).cloned() else {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such placement",
                format!("\"{site}\" is not placed on a node"),
            ));
        };
        if let Some(other) = &placed.moving {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Already moving",
                format!("{site} is moving to {other} already"),
            ));
        }
        if placed.node == to {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Already there",
                format!("{site} runs on {to} already"),
            ));
        }
        // The target must take it as placement would: filters and room,
        // the site's own share not counted twice.
        inner.reg.placements.remove(site);
        inner.load = None;
        let load = Load::of(&inner.reg);
        let mut request = Self::placement_request(&placed.request, &load, None);
        request.needs = placed.needs;
        // `to` names a node, or a provider: then its best node for the site.
        let candidates: Vec<placement::Node> = Self::candidates(&inner.reg, &load)
            .into_iter()
            .filter(|n| (n.id == to || n.provider == to) && n.id != placed.node)
            .collect();
        inner
            .reg
            .placements
            .insert(site.to_string(), placed.clone());
        let decision = placement::decide(&candidates, &request);
        if decision.node.is_none() {
            let why = match decision.verdicts.first() {
                Some(v) => serde_json::to_string(v).unwrap_or_default(),
                None => {
                    format!("no node, or provider with a node besides its own, is named \"{to}\"")
                }
            };
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Cannot move there",
                format!("{site} cannot go to {to}: {why}"),
            ));
        }
        let target = decision.node.expect("checked above");
        inner
            .reg
            .placements
            .get_mut(site)
            .expect("kept above")
            .moving = Some(target.clone());
        self.save(&mut inner, &[Key::Placement(site.to_string())])?;
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok((placed.node, target))
    }

    /// `site`'s move cuts over: new connections to it wait from now on,
    /// until [`Nodes::finish_move`].
    pub fn hold_move(&self, site: &str) -> Result<(), AppError> {
        let mut inner = self.lock_to_change()?;
        if let Some(p) = inner.reg.placements.get_mut(site) {
            p.holding = p.moving.is_some();
        }
        self.save(&mut inner, &[Key::Placement(site.to_string())])?;
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Ends `site`'s move: on `to` when it succeeded, where it was when not.
    pub fn finish_move(&self, site: &str, succeeded: bool) -> Result<(), AppError> {
        let mut inner = self.lock_to_change()?;
        // The site's node may change: its load is counted afresh.
        inner.load = None;
        if let Some(p) = inner.reg.placements.get_mut(site) {
            p.holding = false;
            if let Some(to) = p.moving.take() {
                if succeeded {
                    let from = std::mem::replace(&mut p.node, to);
                    p.left_on.retain(|n| *n != p.node);
                    if !p.left_on.contains(&from) {
                        p.left_on.push(from);
                    }
                    p.generation += 1;
                }
            }
        }
        self.save(&mut inner, &[Key::Placement(site.to_string())])?;
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The operator is content with `site`'s move: the nodes it left remove
    /// their stopped copies. Answers those nodes.
    pub fn confirm_move(&self, site: &str) -> Result<Vec<String>, AppError> {
        let mut inner = self.lock_to_change()?;
        let Some(p) = inner.reg.placements.get_mut(site) else {
            return Err(AppError::new(
                ErrorKind::NotFound,
                "No such placement",
                format!("\"{site}\" is not placed on a node"),
            ));
        };
        if p.moving.is_some() {
            return Err(AppError::new(
                ErrorKind::Conflict,
                "Still moving",
                format!("{site} is moving: confirm once it serves from its new node"),
            ));
        }
        let left = std::mem::take(&mut p.left_on);
        let mut changed = vec![Key::Placement(site.to_string())];
        for node in &left {
            // A node that was revoked since has nothing to be told.
            let _ = Self::assign_locked(
                &mut inner.reg,
                node,
                Operation::Remove {
                    site: site.to_string(),
                },
            );
            changed.extend(assigned(node));
        }
        self.save(&mut inner, &changed)?;
        drop(inner);
        self.wakes.all.send_modify(|n| *n += 1);
        Ok(left)
    }

    /// Whether a connection that came in on `site`'s forwarder of `epoch`
    /// waits: the site is moving and that is the moving epoch's forwarder.
    /// (The forwarder of the epoch before the move carries its connections
    /// on to the source: the move waits for those to finish first.)
    pub fn holds(&self, site: &str, epoch: u64) -> bool {
        self.lock()
            .reg
            .placements
            .get(site)
            .is_some_and(|p| p.holding && self::epoch(p) == epoch)
    }

    /// Whether `node` may send (`sending`) or fetch `site`'s snapshot: the
    /// node it moves from sends it, the node it moves to fetches it.
    pub fn may_carry_snapshot(&self, node: &str, site: &str, sending: bool) -> bool {
        let inner = self.lock();
        inner
            .reg
            .placements
            .get(site)
            .is_some_and(|p| match &p.moving {
                Some(_) if sending => p.node == node,
                Some(to) => to == node,
                None => false,
            })
    }

    /// Where the latest increment of `site` waits while it moves (and,
    /// beside it with the extension `sha256`, its hash).
    pub fn snapshot_path(&self, site: &str) -> PathBuf {
        self.path
            .parent()
            .expect("in the nodes directory")
            .join("snapshots")
            .join(format!("{site}.increment"))
    }

    /// Waits for `node`'s report of operation `op`, up to `limit`.
    pub async fn wait_report(&self, node: &str, op: &str, limit: Duration) -> Option<Report> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(r) = self.report_of(node, op) {
                return Some(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The nodes that keep a stopped copy of `site` from its earlier moves.
    pub fn left_on(&self, site: &str) -> Vec<String> {
        self.lock()
            .reg
            .placements
            .get(site)
            .map(|p| p.left_on.clone())
            .unwrap_or_default()
    }

    /// The provider a node belongs to.
    pub fn provider_of(&self, node: &str) -> Option<String> {
        self.lock().reg.nodes.get(node).map(|n| n.provider.clone())
    }
}
