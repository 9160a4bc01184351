//! The gateway: the router in front of every hosted site.
//!
//! It terminates TLS (certificates from ACME, self-signed for `*.localhost`),
//! routes by host and path prefix to the healthy upstreams of a site's
//! current version, wakes idle sites, tells apps who the user is with a
//! signed assertion, and meters every request. The platform feeds it routes
//! ([`Gateway::set_routes`]) and answers its questions through [`Hooks`]; it
//! knows nothing of blueprints or engines.
//!
//! Modules: `routes` (the table), `proxy` (one request), `headers` (what
//! crosses the gateway and what it states), `caller` (who a request is
//! from), `signin` (a browser's sign-in at a site), `h1` (the HTTP/1.1
//! server for the common request), `upstream` (the client for it),
//! `deadline` (lazy timeouts), `body` (counted bodies), `target` (the
//! canonical path and host), `sessions` (credentials the gateway
//! recognised, sign-in state), `identity` (assertions, JWKS), `usage` (the tap to the meter), `tls` (certificates,
//! SNI), `acme` (issuance, renewal), `metrics`.

pub mod acme;
pub mod body;
mod caller;
mod deadline;
mod forward;
mod h1;
mod headers;
pub mod identity;
pub mod metrics;
pub mod problem;
mod proxy;
mod request_body;
pub mod routes;
mod sessions;
mod signin;
pub mod target;
pub mod tls;
pub mod upstream;
pub mod usage;

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

pub use caller::SERVICE_HEADER;
pub use headers::SESSION_COOKIE;
pub use routes::RouteSpec;
pub use signin::{is_local_path, SIGN_IN_PATH};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A signed-in user, as the platform knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub tier: String,
    /// The one host the credential signs the user in at (a site session);
    /// `None` for a credential good at every site (a bearer token made for
    /// programs).
    pub only_host: Option<String>,
}

/// What the gateway asks the platform.
pub trait Hooks: Send + Sync + 'static {
    /// Starts an idle site; resolves once it is healthy and the gateway's
    /// routes name its upstreams.
    fn wake(&self, deployment: &str) -> BoxFuture<Result<(), String>>;
    /// The user a session cookie or bearer token belongs to. Called off
    /// the gateway's hot path at most once per credential and cache period
    /// (unknown credentials included), so it may read a store.
    fn authenticate(&self, credential: &str) -> Option<User>;
    /// The site (deployment) a service credential belongs to: what a
    /// hosted service sends as `X-Commons-Service` (its
    /// `COMMONS_SERVICE_TOKEN`) when it calls another site on a user's
    /// behalf. `None`: not a service credential.
    fn service(&self, _credential: &str) -> Option<String> {
        None
    }
    /// Where to send a browser to sign in before it comes back to
    /// `return_to` (an absolute URL on a site), carrying `state` through;
    /// `None` when the platform has no sign-in page (a 401 is answered).
    fn sign_in_url(&self, _return_to: &str, _state: &str) -> Option<String> {
        None
    }
    /// A session credential of the user a one-time sign-in code was made
    /// for, good at `host` only, if the code was made for `host` and for
    /// `state` and has not been used or expired.
    fn redeem_sign_in(&self, _code: &str, _host: &str, _state: &str) -> Option<String> {
        None
    }
}

/// Limits and timeouts. Defaults suit a public edge.
#[derive(Debug, Clone)]
pub struct Config {
    /// Names this gateway in usage events.
    pub node: String,
    /// Largest request body, unless the site says otherwise.
    pub max_body: u64,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// A client must send a whole request head within this, and an idle
    /// keep-alive connection is closed after it: slow clients cannot hold
    /// connections.
    pub header_timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// From request sent to response head.
    pub upstream_timeout: Duration,
    /// How long a request waits for an idle site to wake.
    pub wake_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// The public HTTPS port, for redirects (None: 443).
    pub https_port: Option<u16>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            node: "local".into(),
            max_body: 16 << 20,
            max_header_bytes: 64 << 10,
            header_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(60),
            wake_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            https_port: None,
        }
    }
}

/// Lowers the calling thread's CPU priority (nice 10): background work
/// (usage writing, route refreshes) must not delay the proxy's event loop
/// when they share a CPU.
pub fn background_priority() {
    // On Linux, PRIO_PROCESS with who = 0 applies to the calling thread.
    // SAFETY: setpriority takes plain integers.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// What a connection's requests share.
pub(crate) struct ConnInfo {
    pub tls: bool,
    /// The client's address as text: X-Forwarded-For, `for=` of the
    /// Forwarded header, the access log. One allocation, made once; idle
    /// connections are many.
    pub peer_text: Arc<str>,
}

/// The gateway. Cheap to share: everything inside is behind `Arc`s or
/// atomics.
pub struct Gateway {
    pub config: Config,
    routes: ArcSwap<routes::RouteTable>,
    routes_update: Mutex<()>,
    pub signer: identity::Signer,
    pub tap: usage::Tap,
    pub metrics: metrics::Metrics,
    pub certs: Arc<tls::CertStore>,
    /// HTTP-01 challenge responses by token.
    pub(crate) challenges: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01 challenge certificates by host.
    pub(crate) alpn_challenges: RwLock<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    acme: OnceLock<Arc<acme::Acme>>,
    hooks: Arc<dyn Hooks>,
    /// credential → (who it is, until when to trust that).
    sessions: sessions::Generations<Box<str>, sessions::Entry<caller::Identity>>,
    /// An assertion's `sid` → the credential it was made from.
    delegations: sessions::Generations<Arc<str>, Box<str>>,
    sign_in_states: sessions::SignInStates,
    wakes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    epoch: Instant,
}

impl Gateway {
    pub fn new(
        config: Config,
        signer: identity::Signer,
        tap: usage::Tap,
        hooks: Arc<dyn Hooks>,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            config,
            routes: ArcSwap::from_pointee(routes::RouteTable::default()),
            routes_update: Mutex::new(()),
            signer,
            tap,
            metrics: Default::default(),
            certs: Default::default(),
            challenges: Default::default(),
            alpn_challenges: Default::default(),
            acme: OnceLock::new(),
            hooks,
            sessions: sessions::Generations::new(sessions::CACHE_GENERATION),
            delegations: sessions::Generations::new(sessions::CACHE_GENERATION),
            sign_in_states: sessions::SignInStates::new(),
            wakes: Default::default(),
            shutdown: tokio::sync::watch::channel(false).0,
            epoch: Instant::now(),
        })
    }

    /// Replaces the routing table when `specs` differ from the current one;
    /// in-flight requests keep the table they started with. True when it
    /// changed.
    pub fn set_routes(&self, mut specs: Vec<RouteSpec>) -> bool {
        specs.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        let _one_writer = self.routes_update.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.routes.load();
        if current.holds(&specs) {
            return false;
        }
        let table = routes::RouteTable::build(specs, &current);
        self.routes.store(Arc::new(table));
        true
    }

    /// Replaces the routes of the sites (deployments) named in `changed`
    /// (none: no longer routed), copying only the parts of the table they
    /// touch: what a follower of route changes calls, however many sites
    /// are routed.
    pub fn patch_routes(&self, changed: Vec<(String, Vec<RouteSpec>)>) {
        if changed.is_empty() {
            return;
        }
        let _one_writer = self.routes_update.lock().unwrap_or_else(|p| p.into_inner());
        let table = self.routes.load().patch(changed);
        self.routes.store(Arc::new(table));
    }

    /// Requests in flight per upstream, draining ones included (see
    /// [`routes::RouteTable::upstream_load`]).
    pub fn upstream_load(&self) -> std::collections::BTreeMap<SocketAddr, u64> {
        self.routes.load().upstream_load()
    }

    pub fn routes(&self) -> Vec<RouteSpec> {
        self.routes.load().specs()
    }

    /// Turns on ACME for hosts without a certificate.
    pub fn enable_acme(&self, acme: Arc<acme::Acme>) {
        let _ = self.acme.set(acme);
    }

    pub(crate) fn acme(&self) -> Option<&Arc<acme::Acme>> {
        self.acme.get()
    }

    /// Milliseconds since the gateway started (passive health's clock).
    pub(crate) fn mono_ms(&self) -> u64 {
        self.mono_ms_at(Instant::now())
    }

    /// [`Gateway::mono_ms`] at `t`.
    pub(crate) fn mono_ms_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Asks every listener to stop accepting and every connection to finish
    /// its in-flight request and close.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Serves plain HTTP on `listener` until shutdown, then drains.
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener) {
        self.serve(listener, None).await
    }

    /// Serves HTTPS (HTTP/2 and HTTP/1.1 by ALPN) on `listener`.
    pub async fn serve_https(self: Arc<Self>, listener: TcpListener) {
        let config = tls::server_config(self.certs.clone());
        self.serve(listener, Some(config)).await
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let tls = tls.clone();
            let info = Arc::new(ConnInfo::new(peer, tls.is_some()));
            let open = OpenConnection::new(gw.clone());
            // A connection's task lives as long as it does: plain HTTP/1.1
            // ones (most) hold only what `h1` needs; TLS handshakes and
            // HTTP/2 live in boxes of their own.
            match tls {
                // The h1 server's future is the task itself: a block
                // around it would hold its arguments a second time.
                None => {
                    tokio::spawn(h1::serve(open, stream, info));
                }
                Some(config) => {
                    tokio::spawn(async move {
                        let handshake = Box::pin(gw.handshake(stream, config)).await;
                        if let Some((stream, h2)) = handshake {
                            if h2 {
                                let _open = open;
                                Box::pin(gw.serve_h2(stream, info)).await
                            } else {
                                h1::serve(open, stream, info).await
                            }
                        }
                    });
                }
            }
        }
        drop(listener);
        let deadline = Instant::now() + self.config.drain_timeout;
        while self.metrics.connections_open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn handshake(
        &self,
        stream: tokio::net::TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, bool)> {
        let limit = self.config.handshake_timeout;
        let failed = || {
            self.metrics
                .tls_handshake_errors
                .fetch_add(1, Ordering::Relaxed);
        };
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let Ok(Ok(start)) = tokio::time::timeout(limit, acceptor).await else {
            failed();
            return None;
        };
        let hello = start.client_hello();
        if hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == acme::ACME_TLS_ALPN))
        {
            // An ACME server validating a TLS-ALPN-01 challenge: it gets the
            // challenge certificate, and the connection ends there.
            let host = hello.server_name().map(str::to_ascii_lowercase)?;
            let key = self
                .alpn_challenges
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&host)
                .cloned()?;
            let config = tls::challenge_config(key);
            let _ = tokio::time::timeout(limit, start.into_stream(config)).await;
            return None;
        }
        if let Some(host) = start.client_hello().server_name() {
            let host = host.to_ascii_lowercase();
            if let Some(acme) = self.acme() {
                if self.certs.get(&host).is_none() && !tls::is_local(&host) {
                    // On demand, and only for a host a deployed site serves.
                    if self.routes.load().serves_host(&host) {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(60), acme.ensure(self, &host))
                                .await;
                    }
                }
            }
        }
        match tokio::time::timeout(limit, start.into_stream(config)).await {
            Ok(Ok(tls)) => {
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                Some((tls, h2))
            }
            _ => {
                failed();
                None
            }
        }
    }

    async fn serve_h2<I>(self: &Arc<Self>, io: I, info: Arc<ConnInfo>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(self.config.max_header_bytes as u32)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .serve_connection(TokioIo::new(io), self.service(info));
        self.until_done_or_drained(conn).await
    }

    /// Serves an HTTP/1.x connection with hyper, from where the gateway's
    /// own server (`h1`) handed it over.
    async fn serve_hyper_h1<I>(self: &Arc<Self>, io: I, info: Arc<ConnInfo>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics
            .connections_handed_over
            .fetch_add(1, Ordering::Relaxed);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .max_buf_size(self.config.max_header_bytes.max(8192))
            .serve_connection(TokioIo::new(io), self.service(info))
            .with_upgrades();
        self.until_done_or_drained(conn).await
    }

    /// Runs a hyper connection until it ends or, once the gateway shuts
    /// down, until its in-flight requests are answered.
    async fn until_done_or_drained<C: Drain>(&self, conn: C) {
        tokio::pin!(conn);
        let mut stop = self.shutdown.subscribe();
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.wait_for(|s| *s) => {}
        }
        conn.as_mut().drain();
        let _ = conn.await;
    }

    /// The hyper service answering a connection's requests.
    fn service(
        self: &Arc<Self>,
        info: Arc<ConnInfo>,
    ) -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<body::ResponseBody>,
        Error = std::convert::Infallible,
        Future = impl Future<
            Output = Result<http::Response<body::ResponseBody>, std::convert::Infallible>,
        > + Send,
    > + Clone {
        let gw = self.clone();
        hyper::service::service_fn(move |req| {
            let gw = gw.clone();
            let info = info.clone();
            async move { Ok::<_, std::convert::Infallible>(gw.handle(req, info).await) }
        })
    }

    /// Serves `/metrics`, `/routes` and `/healthz` for operators, on a
    /// listener of its own (keep it on loopback or a private network).
    pub async fn serve_admin(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let gw = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let gw = gw.clone();
                    async move { Ok::<_, std::convert::Infallible>(gw.admin(req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn admin(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<body::ResponseBody> {
        let (ctype, body) = match req.uri().path() {
            "/metrics" => ("text/plain; version=0.0.4", self.render_metrics()),
            "/routes" => (
                "application/json",
                serde_json::to_string_pretty(&self.routes()).expect("json"),
            ),
            "/healthz" => ("text/plain", "ok\n".to_string()),
            _ => {
                return problem::response(
                    http::StatusCode::NOT_FOUND,
                    "Not Found",
                    "the admin listener serves /metrics, /routes and /healthz",
                )
            }
        };
        http::Response::builder()
            .header(http::header::CONTENT_TYPE, ctype)
            .body(body::ResponseBody::full(body))
            .expect("valid response")
    }

    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut extra = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let table = self.routes.load();
        let mut seen = std::collections::BTreeMap::new();
        for site in table.sites() {
            seen.entry(site.spec.deployment.clone())
                .or_insert_with(|| site.stats.clone());
        }
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&routes::SiteStats) -> &AtomicU64,
        );
        let series: [Series; 4] = [
            (
                "commons_gateway_site_requests_total",
                "Requests per site.",
                "",
                |s| &s.requests,
            ),
            (
                "commons_gateway_site_errors_total",
                "5xx responses per site.",
                "",
                |s| &s.errors,
            ),
            (
                "commons_gateway_site_bytes_total",
                "Bytes per site and direction.",
                ",direction=\"in\"",
                |s| &s.bytes_in,
            ),
            (
                "commons_gateway_site_bytes_total",
                "Bytes per site and direction.",
                ",direction=\"out\"",
                |s| &s.bytes_out,
            ),
        ];
        for (i, (name, help, labels, field)) in series.iter().enumerate() {
            if i == 0 || series[i - 1].0 != *name {
                let _ = writeln!(extra, "# HELP {name} {help}\n# TYPE {name} counter");
            }
            for (site, s) in &seen {
                let _ = writeln!(extra, "{name}{{site=\"{site}\"{labels}}} {}", get(field(s)));
            }
        }
        extra.push_str("# HELP commons_gateway_certificate_expiry_seconds When each certificate expires (Unix time).\n# TYPE commons_gateway_certificate_expiry_seconds gauge\n");
        for (host, c) in self.certs.all() {
            let _ = writeln!(
                extra,
                "commons_gateway_certificate_expiry_seconds{{host=\"{host}\",issuer=\"{}\"}} {}",
                if c.acme { "acme" } else { "self-signed" },
                c.not_after
            );
        }
        let tap = &self.tap.stats;
        for (name, help, v) in [
            (
                "commons_gateway_usage_records_total",
                "Requests handed to the usage tap.",
                get(&tap.recorded),
            ),
            (
                "commons_gateway_usage_aggregated_total",
                "Requests folded into an aggregate because the meter fell behind.",
                get(&tap.overflowed),
            ),
            (
                "commons_gateway_usage_lost_total",
                "Requests whose usage could not be recorded.",
                get(&tap.lost),
            ),
            (
                "commons_gateway_usage_events_total",
                "Usage events handed to the meter.",
                get(&tap.events),
            ),
        ] {
            let _ = writeln!(
                extra,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        self.metrics.render(&extra)
    }
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        ConnInfo {
            tls,
            peer_text: Arc::from(peer.ip().to_canonical().to_string().as_str()),
        }
    }

    /// Whether the client's address is IPv6 (quoted and bracketed in
    /// `for=`).
    pub(crate) fn peer_is_v6(&self) -> bool {
        self.peer_text.contains(':')
    }
}

/// A hyper server connection that can be asked to finish what is in
/// flight and close (hyper's two kinds share no trait for it).
trait Drain: Future {
    fn drain(self: Pin<&mut Self>);
}

impl<I, S, B> Drain for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<body::BoxError>,
    B: hyper::body::Body + 'static,
    B::Error: Into<body::BoxError>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

impl<I, S, E, B> Drain for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<body::BoxError>,
    B: hyper::body::Body + 'static,
    B::Error: Into<body::BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn drain(self: Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Counts a connection as open for as long as it lives; its gateway.
pub(crate) struct OpenConnection(Arc<Gateway>);

impl OpenConnection {
    fn new(gw: Arc<Gateway>) -> OpenConnection {
        gw.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        gw.metrics.connections_total.fetch_add(1, Ordering::Relaxed);
        OpenConnection(gw)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}
