//! The gateway as `commons serve` runs it: routes from the engine's state,
//! wake-up through the engine, sessions from tokens, usage into the meter.
//!
//! Routes: a process component with a `route:` is served at its host and
//! path; every process with a port is also served at
//! `COMPONENT.DEPLOYMENT.localhost`, and a deployment without any `route:`
//! at `DEPLOYMENT.localhost` (its first process). A running process is an
//! upstream; an idle or stopped one makes the route wake the site.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use commons_engine::Engine;
use commons_gateway::{acme, identity, usage, BoxFuture, Gateway, Hooks, RouteSpec, User};

use crate::AppState;

/// Token scope that makes a token a sign-in for its owner (the token's name
/// is the user id until accounts exist).
pub const SESSION_SCOPE: &str = "session";

/// How often the gateway looks for state changes: a new instance is routed
/// within about this long of being recorded.
pub const ROUTES_EVERY: Duration = Duration::from_millis(100);

/// Routes are read from the engine at least this often, changed or not.
pub const FULL_REFRESH: Duration = Duration::from_secs(2);

/// How often certificates due for renewal are looked for.
const ACME_RENEWAL: Duration = Duration::from_secs(3600);
/// How often a gateway takes the certificates other instances issued.
const ACME_SYNC: Duration = Duration::from_secs(30);

/// Where the gateway listens and how it gets certificates.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub http: String,
    pub https: Option<String>,
    pub admin: Option<String>,
    /// Worker threads (1: a single-threaded event loop).
    pub threads: usize,
    pub acme: Option<AcmeSettings>,
    pub config: commons_gateway::Config,
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub root: Option<PathBuf>,
    pub contact: Option<String>,
    pub challenge: acme::Challenge,
}

/// The routes the engine's state calls for.
pub fn routes_of(engine: &Engine) -> Vec<RouteSpec> {
    let mut out = Vec::new();
    for d in engine.list().unwrap_or_default() {
        let Ok(status) = engine.observe(&d.name) else {
            continue;
        };
        // A route with a host of its own replaces DEPLOYMENT.localhost.
        let has_host = status
            .components
            .iter()
            .any(|c| c.route.as_ref().is_some_and(|r| r.host.is_some()));
        let mut first = true;
        let running = || {
            status
                .components
                .iter()
                .filter(|c| commons_blueprint::Kind::runs(&c.kind))
        };
        // Every instance of a component with replicas serves its route:
        // (upstreams, whether every instance is idle or down) by component.
        let mut instances: HashMap<&str, (Vec<SocketAddr>, bool)> = HashMap::new();
        for c in running() {
            let (of, _) = commons_blueprint::replica_of(&c.name);
            let entry = instances.entry(of).or_insert((Vec::new(), true));
            // A live process is an upstream, also while a deploy replaces
            // it (until its successor is recorded).
            if let (Some(_), Some(port)) = (c.pid, c.port) {
                entry.0.push(SocketAddr::from((
                    c.address.unwrap_or(std::net::Ipv4Addr::LOCALHOST),
                    port,
                )));
            }
            entry.1 &= c.state == "idle" || commons_engine::is_down(&c.state);
        }
        for c in running().filter(|c| commons_blueprint::replica_of(&c.name).1 == 1) {
            let (upstreams, idle) = instances.get(c.name.as_str()).cloned().unwrap_or_default();
            if c.port.is_none() && c.route.is_none() {
                continue;
            }
            let spec = |host: String, path: String| RouteSpec {
                host,
                path,
                deployment: d.name.clone(),
                component: c.name.clone(),
                operator: "local".into(),
                upstreams: upstreams.clone(),
                idle,
                login: c
                    .route
                    .as_ref()
                    .map(|r| r.login.clone())
                    .unwrap_or_default(),
                max_body: c.route.as_ref().and_then(|r| r.max_body_bytes),
                max_header: c
                    .route
                    .as_ref()
                    .and_then(|r| r.max_header_bytes)
                    .map(|b| b as usize),
                response_timeout_ms: c.route.as_ref().and_then(|r| r.response_timeout_ms),
                user_header: c.route.as_ref().and_then(|r| r.user_header.clone()),
            };
            let path = c.route.as_ref().map_or("/".to_string(), |r| r.path.clone());
            match c.route.as_ref().and_then(|r| r.host.as_ref()) {
                Some(host) => {
                    // Compared as the gateway compares request hosts.
                    if let Some(host) = commons_gateway::target::canonical_host(host) {
                        out.push(spec(host, path))
                    }
                }
                None if first && !has_host => out.push(spec(format!("{}.localhost", d.name), path)),
                None => {}
            }
            out.push(spec(format!("{}.{}.localhost", c.name, d.name), "/".into()));
            first = false;
        }
    }
    out
}

/// Routes to the sites placed on providers' nodes, to the loopback
/// forwarder that carries each connection through the tunnel of the node
/// serving the site now (`crate::tunnels`). The routed component's
/// `route:` holds as for a site of this machine: its host (else
/// `SITE.localhost`), path, login-only paths, limits and user header; and
/// `COMPONENT.SITE.localhost` too.
pub fn node_routes(state: &AppState) -> Vec<RouteSpec> {
    let Some(runtime) = state.tunnels.runtime() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // With instances sharing the nodes, a node's tunnel ends at one of
    // them: only that one can reach its sites, and only it gives them a
    // forwarder (a listener each), so each instance holds its own nodes'
    // sites' forwarders rather than every site's.
    let here = state.nodes.is_shared().then(|| state.tunnels.open_nodes());
    if here.as_ref().is_some_and(|nodes| nodes.is_empty()) {
        return out;
    }
    let reachable = |node: &str| here.as_ref().is_none_or(|nodes| nodes.contains(node));
    for placed in state.nodes.routed_sites(reachable) {
        let Some(upstream) =
            state
                .tunnels
                .forwarder(&runtime, &placed.site, &placed.component, placed.epoch)
        else {
            continue;
        };
        let route = placed.route.as_ref();
        let spec = |host: String, path: String| RouteSpec {
            host,
            path,
            deployment: placed.site.clone(),
            component: placed.component.clone(),
            operator: "local".into(),
            upstreams: vec![upstream],
            idle: false,
            login: route.map(|r| r.login.clone()).unwrap_or_default(),
            max_body: route.and_then(|r| r.max_body_bytes),
            max_header: route.and_then(|r| r.max_header_bytes).map(|b| b as usize),
            response_timeout_ms: route.and_then(|r| r.response_timeout_ms),
            user_header: route.and_then(|r| r.user_header.clone()),
        };
        let path = route.map_or("/".to_string(), |r| r.path.clone());
        match route.and_then(|r| r.host.as_ref()) {
            Some(host) => {
                if let Some(host) = commons_gateway::target::canonical_host(host) {
                    out.push(spec(host, path));
                }
            }
            None => out.push(spec(format!("{}.localhost", placed.site), path)),
        }
        out.push(spec(
            format!("{}.{}.localhost", placed.component, placed.site),
            "/".into(),
        ));
    }
    out
}

/// Every route: this machine's sites and those on providers' nodes.
pub fn all_routes(engine: &Engine, state: &AppState) -> Vec<RouteSpec> {
    let mut routes = routes_of(engine);
    routes.extend(node_routes(state));
    routes
}

/// One-time codes that sign a console user in at a site's own host (its
/// cookie cannot reach another host): made by the console's
/// `/console/site-sign-in` for one host and one gateway-made `state`,
/// redeemed by the gateway at the site's `/.commons/sign-in` for a site
/// session of that host (never the console session itself), each once,
/// within a minute. Instances sharing a database keep them in its shared
/// entries (by the code's hash), so the gateway of any instance redeems a
/// code another instance's console made.
#[derive(Default)]
pub struct SignIns {
    pending: std::sync::Mutex<std::collections::HashMap<String, PendingSignIn>>,
    shared: Option<Arc<dyn commons_store::StateStore>>,
    minted: std::sync::atomic::AtomicU64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PendingSignIn {
    /// The console session's hash: the site session ends with it.
    session_hash: String,
    user: String,
    host: String,
    state: String,
    expires_ms: i64,
}

const SIGN_IN_CODE_MS: i64 = 60_000;
/// Codes pending at once at most (a code lives a minute).
const SIGN_INS_PENDING: usize = 100_000;
/// The shared entries' kind.
const SIGN_IN_KIND: &str = "sign-in";
/// Expired codes are swept from the shared entries once per this many made.
const SWEEP_EVERY: u64 = 256;

impl SignIns {
    /// Codes kept in `store`, for every instance sharing it.
    pub fn shared(store: Arc<dyn commons_store::StateStore>) -> SignIns {
        SignIns {
            shared: Some(store),
            ..SignIns::default()
        }
    }

    /// A code for the user of the console session `session` at `host`,
    /// good only with `state`.
    pub fn mint(&self, session: &str, user: &str, host: &str, state: &str) -> String {
        let code = crate::tokens::random(32);
        let now = commons_clock::now_ms();
        let pending = PendingSignIn {
            session_hash: crate::tokens::hash(session),
            user: user.to_string(),
            host: host.to_string(),
            state: state.to_string(),
            expires_ms: now + SIGN_IN_CODE_MS,
        };
        if let Some(store) = &self.shared {
            let body = serde_json::to_vec(&pending).expect("json");
            match store.put_shared(SIGN_IN_KIND, &crate::tokens::hash(&code), &body) {
                Ok(_) => {
                    use std::sync::atomic::Ordering;
                    if self
                        .minted
                        .fetch_add(1, Ordering::Relaxed)
                        .is_multiple_of(SWEEP_EVERY)
                    {
                        sweep_expired(store.as_ref(), now);
                    }
                    return code;
                }
                // This instance's gateway still redeems it.
                Err(e) => tracing::warn!(error = %e, "a sign-in code is kept here only"),
            }
        }
        let mut all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, p| p.expires_ms > now);
        if all.len() >= SIGN_INS_PENDING {
            all.clear();
        }
        all.insert(crate::tokens::hash(&code), pending);
        code
    }

    /// (console session hash, user) of `code`, if it was made for `host`
    /// and `state`, in time; a code is good once, whatever the outcome.
    fn redeem(&self, code: &str, host: &str, state: &str) -> Option<(String, String)> {
        let hash = crate::tokens::hash(code);
        let local = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&hash);
        let pending = match (local, &self.shared) {
            (Some(p), _) => p,
            (None, Some(store)) => {
                serde_json::from_slice(&store.take_shared(SIGN_IN_KIND, &hash).ok()??).ok()?
            }
            (None, None) => return None,
        };
        (pending.host == host
            && pending.state == state
            && pending.expires_ms > commons_clock::now_ms())
        .then_some((pending.session_hash, pending.user))
    }
}

/// Removes the shared codes that expired unused.
fn sweep_expired(store: &dyn commons_store::StateStore, now_ms: i64) {
    let Ok(all) = store.shared_since(SIGN_IN_KIND, 0) else {
        return;
    };
    for e in all {
        let expired = serde_json::from_slice::<PendingSignIn>(&e.body)
            .map_or(true, |p| p.expires_ms <= now_ms);
        if expired {
            let _ = store.delete_shared(SIGN_IN_KIND, &e.name);
        }
    }
}

/// How site sessions start.
pub const SITE_SESSION_PREFIX: &str = "cmst_";

/// A site session: the cookie a user is signed in with at one site's host.
/// It names the user, the host, the console session it came from and its
/// expiry, signed with a key derived from the platform's; it holds only at
/// that host and only while that console session does (logging out of the
/// console ends it everywhere).
pub struct SiteSessions {
    key: ring::hmac::Key,
}

impl SiteSessions {
    pub fn new(engine: &Engine) -> SiteSessions {
        SiteSessions {
            key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                engine.derived_key("site-session").as_bytes(),
            ),
        }
    }

    fn mint(&self, user: &str, host: &str, session_hash: &str, expires_ms: i64) -> String {
        use base64::Engine as _;
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{user}\n{host}\n{session_hash}\n{expires_ms}"));
        let tag = ring::hmac::sign(&self.key, body.as_bytes());
        format!(
            "{SITE_SESSION_PREFIX}{body}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// (user, host, console session hash) of a site session whose
    /// signature holds and that has not expired.
    fn open(&self, credential: &str) -> Option<(String, String, String)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (body, tag) = credential
            .strip_prefix(SITE_SESSION_PREFIX)?
            .split_once('.')?;
        ring::hmac::verify(&self.key, body.as_bytes(), &b64.decode(tag).ok()?).ok()?;
        let text = String::from_utf8(b64.decode(body).ok()?).ok()?;
        let mut parts = text.split('\n');
        let (user, host, session, expires) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        (expires.parse::<i64>().ok()? > commons_clock::now_ms())
            .then(|| (user.to_string(), host.to_string(), session.to_string()))
    }
}

/// Who wakes an idle site for a request, and who computes the routes.
#[derive(Debug, Clone)]
pub enum Role {
    /// The gateway of `commons serve`: its engine wakes sites, and it
    /// computes routes from the state (and publishes them to the bus).
    Platform,
    /// A gateway on its own (`commons gateway`): a control plane's API
    /// wakes sites, and routes come from the bus's bucket (from the state
    /// store, on the sites' host, without a bus). It runs no workload.
    Edge(ControlPlane),
}

/// A control plane's API as a gateway on its own calls it.
#[derive(Clone)]
pub struct ControlPlane {
    /// `http(s)://…` of any `commons serve` instance of the platform.
    pub url: String,
    /// A platform token with the scope `runtime:wake`.
    pub token: String,
    /// Made at the first wake, kept for the next.
    http: Arc<OnceLock<Client>>,
}

type Client = hyper_util::client::legacy::Client<
    crate::outbound::Https,
    http_body_util::Full<hyper::body::Bytes>,
>;

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("token", &"(secret)")
            .finish()
    }
}

impl ControlPlane {
    pub fn new(url: String, token: String) -> ControlPlane {
        ControlPlane {
            url,
            token,
            http: Arc::default(),
        }
    }

    /// Asks the control plane to wake `deployment`; returns once it answers
    /// that the site is healthy.
    async fn wake(&self, deployment: &str) -> Result<(), String> {
        use http_body_util::BodyExt;
        let http = match self.http.get() {
            Some(http) => http,
            None => {
                let made = crate::outbound::https_client()?;
                self.http.get_or_init(|| made)
            }
        };
        let url = format!(
            "{}/api/deployments/{}/wake",
            self.url.trim_end_matches('/'),
            crate::outbound::segment(deployment)
        );
        let request = hyper::Request::post(&url)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .body(http_body_util::Full::new(hyper::body::Bytes::new()))
            .map_err(|e| e.to_string())?;
        let answer = http
            .request(request)
            .await
            .map_err(|e| format!("cannot reach the control plane at {}: {e}", self.url))?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        let body = answer
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|p| p["detail"].as_str().map(str::to_string))
            .unwrap_or_default();
        Err(format!(
            "the control plane did not wake it ({status}): {detail}"
        ))
    }
}

/// The platform's answers to the gateway.
struct Platform {
    state: Arc<AppState>,
    gateway: OnceLock<Weak<Gateway>>,
    role: Role,
}

impl Hooks for Platform {
    fn wake(&self, deployment: &str) -> BoxFuture<Result<(), String>> {
        let state = self.state.clone();
        let gateway = self.gateway.get().and_then(Weak::upgrade);
        let name = deployment.to_string();
        if let Role::Edge(control_plane) = &self.role {
            // The routes follow (from the bucket, or the state); the
            // gateway waits for them.
            let control_plane = control_plane.clone();
            return Box::pin(async move { control_plane.wake(&name).await });
        }
        Box::pin(async move {
            // The supervisor or the idler may hold the deployment for a
            // moment: try again until it is free (the gateway bounds the wait).
            loop {
                match state.engine.wake(&name).await {
                    Ok(_) => break,
                    Err(commons_engine::EngineError::Busy(_)) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            if let Some(g) = gateway {
                g.set_routes(all_routes(&state.engine, &state));
            }
            Ok(())
        })
    }

    /// A site session (good at its own host only, while the console
    /// session it came from lasts), or a platform token with the `session`
    /// scope (its name is the user id). Console sessions are not accepted
    /// at sites; nor is anything without a known prefix (no store is read
    /// for it).
    fn authenticate(&self, credential: &str) -> Option<User> {
        let (id, only_host) = if credential.starts_with(SITE_SESSION_PREFIX) {
            let (user, host, session) = self.state.site_sessions.open(credential)?;
            let live = self.state.accounts.session_user(&session).ok()??;
            (live == user).then_some(())?;
            (user, Some(host))
        } else if credential.starts_with(crate::tokens::TOKEN_PREFIX) {
            (
                self.state.tokens.authorise(credential, SESSION_SCOPE)?.name,
                None,
            )
        } else {
            return None;
        };
        let now = commons_clock::now_ms();
        let tier = self
            .state
            .billing
            .lock()
            .ok()
            .and_then(|b| b.current_tier(&id, now).ok())
            .unwrap_or_else(|| "free".into());
        Some(User {
            id,
            tier,
            only_host,
        })
    }

    fn service(&self, credential: &str) -> Option<String> {
        self.state.engine.service_of(credential)
    }

    /// The console's sign-in, which comes back through [`SignIns`].
    fn sign_in_url(&self, return_to: &str, state: &str) -> Option<String> {
        let base = self.state.public_url.get()?;
        let query = serde_urlencoded::to_string([("to", return_to), ("state", state)]).ok()?;
        Some(format!("{base}/console/site-sign-in?{query}"))
    }

    fn redeem_sign_in(&self, code: &str, host: &str, state: &str) -> Option<String> {
        let (session_hash, user) = self.state.sign_ins.redeem(code, host, state)?;
        let expires = commons_clock::now_ms() + crate::accounts::SESSION_MS;
        Some(
            self.state
                .site_sessions
                .mint(&user, host, &session_hash, expires),
        )
    }
}

/// Usage events go to the meter directly (no bus).
struct MeterSink(commons_meter::Meter, Arc<crate::nodes::Nodes>);

impl usage::UsageSink for MeterSink {
    fn write(&mut self, mut events: Vec<commons_meter::Event>) {
        self.1.attribute(&mut events);
        if let Err(e) = self.0.ingest(&events, None) {
            tracing::warn!(error = %e, "the meter refused gateway usage");
        }
    }
}

/// Opens the gateway's state under `home/gateway` and starts it on a thread
/// of its own; returns once the listeners are bound (so a bad address is an
/// error here, not later).
pub fn spawn(
    home: &Path,
    state: Arc<AppState>,
    settings: GatewaySettings,
    usage_bus: Option<commons_bus::usage::UsageConfig>,
    bus: Option<commons_bus::RelayConfig>,
    role: Role,
) -> Result<RunningGateway, String> {
    // A gateway on its own with a bus serves what the bucket holds: the
    // state's processes are another host's, which it cannot look at.
    let computes_routes = matches!(role, Role::Platform) || bus.is_none();
    let routes_bus = bus
        .as_ref()
        .map(|b| commons_bus::routes::RoutesConfig::new(&b.url, &b.name));
    let layout = commons_runtime::Layout::new(home);
    let dir = layout.gateway_dir();
    crate::private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let signer = identity::Signer::open(&layout.identity_key()).map_err(|e| e.to_string())?;

    let log_dir = layout.platform_logs();
    crate::private_dir(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
    let access_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.access_log())
        .map_err(|e| format!("access log: {e}"))?;
    let sink: Box<dyn usage::UsageSink> = match usage_bus {
        Some(config) => Box::new(crate::usage_bus::PublishingSink::new(
            config,
            &format!("gateway/{}", settings.config.node),
            state.nodes.clone(),
        )),
        None => Box::new(MeterSink(
            crate::periods::meter(home, state.engine.store_config())
                .map_err(|e| format!("meter: {e}"))?,
            state.nodes.clone(),
        )),
    };
    let tap = usage::Tap::start(
        sink,
        Some(Box::new(access_log)),
        settings.config.node.clone(),
    );
    let hooks = Arc::new(Platform {
        state: state.clone(),
        gateway: OnceLock::new(),
        role: role.clone(),
    });
    let gateway = Gateway::new(settings.config.clone(), signer, tap, hooks.clone());
    let _ = hooks.gateway.set(Arc::downgrade(&gateway));
    if computes_routes {
        gateway.set_routes(all_routes(&state.engine, &state));
    }

    let bind = |what: &str, addr: &str| {
        let l = std::net::TcpListener::bind(addr)
            .map_err(|e| format!("the gateway cannot listen on {addr} ({what}): {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>(l)
    };
    let http = bind("http", &settings.http)?;
    let https = settings
        .https
        .as_deref()
        .map(|a| bind("https", a))
        .transpose()?;
    let admin = settings
        .admin
        .as_deref()
        .map(|a| bind("admin", a))
        .transpose()?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let _ = state.gateway_http.set(http_addr);
    let mut bound = vec![("http".to_string(), http_addr)];
    if let Some(l) = &https {
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let _ = state.gateway_https.set(addr);
        bound.push(("https".into(), addr));
    }
    if let Some(l) = &admin {
        bound.push(("admin".into(), l.local_addr().map_err(|e| e.to_string())?));
    }

    let acme = settings.acme.as_ref().map(|a| {
        let config = acme::AcmeConfig {
            directory: a.directory.clone(),
            root: a.root.clone(),
            contact: a.contact.clone(),
            dir: dir.join("acme"),
            challenge: a.challenge,
        };
        // Instances sharing a database share their certificates, orders
        // and challenge answers; one alone keeps them in its directory.
        match state.engine.store_config() {
            commons_store::StoreConfig::Postgres { .. } => acme::Acme::shared(
                config,
                Arc::new(crate::acme_shared::SharedStoreAcme::new(
                    state.clone(),
                    bus.clone(),
                )),
            ),
            commons_store::StoreConfig::Embedded => acme::Acme::new(config),
        }
    });
    if let Some(acme) = &acme {
        acme.load(&gateway).map_err(|e| e.to_string())?;
        gateway.enable_acme(acme.clone());
    }

    // With a bus, routes go through its bucket: published by every
    // instance, followed by every gateway (`routes_bus`).
    let followed = Arc::new(crate::routes_bus::Followed::default());
    if routes_bus.is_some() && computes_routes {
        // What the gateway serves from the start, whatever the bucket holds.
        let rev = state.engine.store().revision().unwrap_or(0);
        followed.set_local(rev, routes_of(&state.engine));
    }
    let (stop_following, following) = tokio::sync::watch::channel(false);
    let publisher = match (&routes_bus, tokio::runtime::Handle::try_current()) {
        (Some(config), Ok(runtime)) => {
            let weak = Arc::downgrade(&gateway);
            let routes = followed.clone();
            crate::routes_bus::spawn_follower(
                &runtime,
                config.clone(),
                followed.clone(),
                move |changed: &std::collections::BTreeSet<String>| {
                    if let Some(gateway) = weak.upgrade() {
                        let sites = changed
                            .iter()
                            .map(|site| (site.clone(), routes.site(site)))
                            .collect();
                        gateway.patch_routes(sites);
                    }
                },
                following,
            );
            computes_routes.then(|| crate::routes_bus::spawn_publisher(&runtime, config.clone()))
        }
        _ => None,
    };
    if routes_bus.is_some() && !computes_routes {
        eprintln!("{:>12} routes from the bus's bucket", "Following");
    }

    // Where instances share a database, every gateway says there which
    // upstreams it uses, so an instance retiring a replaced process waits
    // for all of them to drain it (`OtherGateways`).
    let shared_load = SharedLoad::open(&state, &settings.config.node);

    // Routes follow the engine's state from a thread of their own, so the
    // proxy's event loop never waits on the state store.
    let routes_gateway = gateway.clone();
    let routes_engine = state.engine.reopen().map_err(|e| format!("engine: {e}"))?;
    let routes_state = state.clone();
    let thread_load = shared_load.clone();
    std::thread::Builder::new()
        .name("commons-routes".into())
        .spawn(move || {
            // Not at a lower priority: a redeploy and a wake wait for it.
            let engine = routes_engine;
            let state_file = engine.layout.gateway_state();
            let mut last = (String::new(), std::time::Instant::now());
            let mut seen = (None, std::time::Instant::now());
            // Held for as long as routes are followed.
            let _stop_following = stop_following;
            loop {
                // Routes follow recorded state: read it again when the state
                // store's outbox has a new change (a deploy, a restart, an
                // idle or a wake all write one, on this instance or another
                // sharing the store), and every FULL_REFRESH anyway (a
                // process that died unrecorded).
                // Placements on nodes change routes too.
                let rev = engine.store().revision().ok();
                let version = rev.map(|v| (v, routes_state.nodes.version()));
                if !computes_routes {
                    // What the bucket holds (patched as it changes).
                    if seen.1.elapsed() >= FULL_REFRESH {
                        routes_gateway.set_routes(followed.routes());
                        seen = (version, std::time::Instant::now());
                    }
                } else if version.is_none() || version != seen.0 || seen.1.elapsed() >= FULL_REFRESH
                {
                    let mut routes = routes_of(&engine);
                    if let (Some(publisher), Some(rev)) = (&publisher, rev) {
                        let _ = publisher.send(Some((rev, crate::routes_bus::by_site(&routes))));
                        // Each site as of the later of this view and the bucket's.
                        followed.set_local(rev, routes);
                        routes = followed.routes();
                    }
                    routes.extend(node_routes(&routes_state));
                    routes_gateway.set_routes(routes);
                    seen = (version, std::time::Instant::now());
                }
                // The engine reads this before it stops a replaced instance.
                let load: std::collections::BTreeMap<String, u64> = routes_gateway
                    .upstream_load()
                    .into_iter()
                    .map(|(a, n)| (a.to_string(), n))
                    .collect();
                let body = serde_json::to_string(&load).expect("json");
                if body != last.0 || last.1.elapsed() >= Duration::from_secs(1) {
                    let json = format!(
                        "{{\"updated_ms\":{},\"upstreams\":{body}}}",
                        commons_clock::now_ms()
                    );
                    let _ = commons_runtime::layout::write_whole(&state_file, json.as_bytes());
                    if let Some(shared) = &thread_load {
                        shared.say(json.as_bytes());
                    }
                    last = (body, std::time::Instant::now());
                }
                std::thread::sleep(ROUTES_EVERY);
            }
        })
        .map_err(|e| e.to_string())?;

    let threads = settings.threads.max(1);
    let serving = gateway.clone();
    let thread = std::thread::Builder::new()
        .name("commons-gateway".into())
        .spawn(move || {
            let rt = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .enable_all()
                    .build()
            }
            .expect("the gateway's runtime starts");
            rt.block_on(async move {
                let listener =
                    |l: std::net::TcpListener| tokio::net::TcpListener::from_std(l).expect("tokio");
                if let Some(acme) = &acme {
                    if let Err(e) = acme.sync(&gateway).await {
                        tracing::warn!(error = %e, "cannot read the shared certificates");
                    }
                    acme.spawn_renewal(gateway.clone(), ACME_RENEWAL, ACME_SYNC);
                }
                if let Some(l) = admin {
                    tokio::spawn(gateway.clone().serve_admin(listener(l)));
                }
                if let Some(l) = https {
                    tokio::spawn(gateway.clone().serve_https(listener(l)));
                }
                gateway.serve_http(listener(http)).await;
            });
        })
        .map_err(|e| e.to_string())?;
    Ok(RunningGateway {
        bound,
        gateway: serving,
        thread,
        shared_load,
    })
}

/// This gateway's entry among the shared entries of [`GATEWAY_LOAD_KIND`]
/// (instances sharing a database only).
///
/// [`GATEWAY_LOAD_KIND`]: commons_runtime::drivers::GATEWAY_LOAD_KIND
#[derive(Clone)]
struct SharedLoad {
    store: Arc<dyn commons_store::StateStore>,
    id: String,
}

/// Entries of gateways that stopped without removing theirs are removed
/// after this long.
const STALE_LOAD_MS: u64 = 3_600_000;

impl SharedLoad {
    fn open(state: &AppState, node: &str) -> Option<SharedLoad> {
        use commons_runtime::drivers::{GatewayLoad, GATEWAY_LOAD_KIND};
        if !matches!(
            state.engine.store_config(),
            commons_store::StoreConfig::Postgres { .. }
        ) {
            return None;
        }
        let store = state.engine.shared_store();
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).ok()?;
        let id = format!("{node}-{:016x}", u64::from_be_bytes(random));
        // What gateways killed long ago left.
        let now = commons_clock::now_ms() as u64;
        for entry in store.shared_since(GATEWAY_LOAD_KIND, 0).unwrap_or_default() {
            let stale = serde_json::from_slice::<GatewayLoad>(&entry.body)
                .map_or(true, |l| now.saturating_sub(l.updated_ms) > STALE_LOAD_MS);
            if stale {
                let _ = store.delete_shared(GATEWAY_LOAD_KIND, &entry.name);
            }
        }
        Some(SharedLoad { store, id })
    }

    fn say(&self, load: &[u8]) {
        let kind = commons_runtime::drivers::GATEWAY_LOAD_KIND;
        if let Err(e) = self.store.put_shared(kind, &self.id, load) {
            tracing::warn!(error = %e, "cannot share the gateway's load");
        }
    }

    fn forget(&self) {
        let kind = commons_runtime::drivers::GATEWAY_LOAD_KIND;
        let _ = self.store.delete_shared(kind, &self.id);
    }
}

/// The gateway `commons serve` runs, and where it listens.
pub struct RunningGateway {
    /// ("http" | "https" | "admin", address).
    pub bound: Vec<(String, SocketAddr)>,
    gateway: Arc<Gateway>,
    thread: std::thread::JoinHandle<()>,
    shared_load: Option<SharedLoad>,
}

impl RunningGateway {
    /// Stops accepting, lets in-flight requests finish (up to the drain
    /// timeout), and waits until every request's usage is with the meter.
    pub fn stop(self) {
        self.gateway.shutdown();
        let _ = self.thread.join();
        if !self.gateway.tap.wait_handled(Duration::from_secs(5)) {
            eprintln!("gateway: some requests' usage was not written before stopping");
        }
        // Nothing in flight any more: no retiring instance waits for it.
        if let Some(shared) = &self.shared_load {
            shared.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_made_by_one_instance_is_redeemed_once_by_another() {
        let store: Arc<dyn commons_store::StateStore> =
            Arc::new(commons_store::SqliteStore::memory().unwrap());
        let (console, gateway) = (
            SignIns::shared(store.clone()),
            SignIns::shared(store.clone()),
        );
        let code = console.mint("cmss_session", "ann", "shop.example.test", "st");
        assert!(
            console.pending.lock().unwrap().is_empty(),
            "kept in the store"
        );
        let (session, user) = gateway
            .redeem(&code, "shop.example.test", "st")
            .expect("the other instance redeems it");
        assert_eq!(
            (session.as_str(), user.as_str()),
            (crate::tokens::hash("cmss_session").as_str(), "ann")
        );
        assert_eq!(
            console.redeem(&code, "shop.example.test", "st"),
            None,
            "once"
        );

        // A code tried at another host or with another state is spent.
        let code = console.mint("cmss_session", "ann", "shop.example.test", "st");
        assert_eq!(gateway.redeem(&code, "evil.example.test", "st"), None);
        assert_eq!(gateway.redeem(&code, "shop.example.test", "st"), None);
        let code = console.mint("cmss_session", "ann", "shop.example.test", "st");
        assert_eq!(gateway.redeem(&code, "shop.example.test", "other"), None);
        assert!(store.shared_since(SIGN_IN_KIND, 0).unwrap().is_empty());

        // Codes nobody redeemed are swept once expired.
        let stale = serde_json::to_vec(&PendingSignIn {
            session_hash: String::new(),
            user: "bob".into(),
            host: "h".into(),
            state: "s".into(),
            expires_ms: 1,
        })
        .unwrap();
        store.put_shared(SIGN_IN_KIND, "stale", &stale).unwrap();
        let live = console.mint("cmss_session", "ann", "shop.example.test", "st");
        sweep_expired(store.as_ref(), commons_clock::now_ms());
        let left: Vec<String> = store
            .shared_since(SIGN_IN_KIND, 0)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(left, [crate::tokens::hash(&live)]);
    }
}
