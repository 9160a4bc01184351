//! Test support: real HTTP upstreams and clients on loopback, and a gateway
//! wired to an in-memory usage sink and hooks the test controls.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use commons_gateway::{identity, usage, BoxFuture, Config, Gateway, Hooks, RouteSpec, User};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// An upstream that answers with what it received, as JSON:
/// `{"server", "method", "path", "headers", "body_len", "body_sum"}`.
/// `/sleep/MS` waits first; `/ws` accepts an upgrade and echoes bytes.
pub async fn upstream(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_upstream(listener, name));
    addr
}

pub async fn serve_upstream(listener: TcpListener, name: &'static str) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, name));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    mut req: Request<Incoming>,
    name: &str,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(ms) = path.strip_prefix("/sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if path == "/ws" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = upgrade.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let headers: HashMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let method = req.method().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "server": name, "method": method, "path": path, "headers": headers,
        "body_len": body.len(), "body_sum": body_sum(&body),
    });
    Ok(Response::new(Full::new(Bytes::from(json.to_string()))))
}

/// A checksum of a body that notices lost, added and reordered bytes.
pub fn body_sum(body: &[u8]) -> u64 {
    body.iter().enumerate().fold(0u64, |sum, (i, &b)| {
        sum.wrapping_mul(31)
            .wrapping_add((i as u64 + 1) * u64::from(b))
    })
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on a new connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender
        .send_request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    request(addr, "GET", host, path, &[], Bytes::new()).await
}

/// The usage events the gateway handed to its sink.
#[derive(Clone, Default)]
pub struct Events(pub Arc<Mutex<Vec<commons_meter::Event>>>);

impl usage::UsageSink for Events {
    fn write(&mut self, events: Vec<commons_meter::Event>) {
        self.0.lock().unwrap().extend(events);
    }
}

impl Events {
    /// Requests the events stand for (an event's `count`), per status.
    pub fn requests_by_status(&self) -> HashMap<u64, u64> {
        let mut out = HashMap::new();
        for e in self.0.lock().unwrap().iter() {
            *out.entry(e.data["status"].as_u64().unwrap()).or_default() +=
                e.data["count"].as_u64().unwrap();
        }
        out
    }

    pub fn total(&self) -> u64 {
        self.requests_by_status().values().sum()
    }

    /// Waits for the tap to flush until `n` requests are accounted for.
    pub async fn wait_for(&self, n: u64) -> u64 {
        for _ in 0..100 {
            if self.total() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.total()
    }
}

type WakeFn = dyn Fn(String) -> BoxFuture<Result<(), String>> + Send + Sync;

/// Hooks the test controls: sessions by credential and what waking does.
#[derive(Default)]
pub struct TestHooks {
    pub sessions: Mutex<HashMap<String, User>>,
    /// Service credential → the site it belongs to.
    pub services: Mutex<HashMap<String, String>>,
    /// How many times the platform was asked who a credential is.
    pub lookups: std::sync::atomic::AtomicU64,
    /// Where browsers are sent to sign in (None: no sign-in page).
    pub sign_in_at: Mutex<Option<String>>,
    /// One-time codes: code → (host, state, the credential it stands for).
    pub codes: Mutex<HashMap<String, (String, String, String)>>,
    pub wake: Mutex<Option<Arc<WakeFn>>>,
    pub wakes: Mutex<Vec<String>>,
}

impl Hooks for TestHooks {
    fn wake(&self, deployment: &str) -> BoxFuture<Result<(), String>> {
        self.wakes.lock().unwrap().push(deployment.to_string());
        match self.wake.lock().unwrap().clone() {
            Some(f) => f(deployment.to_string()),
            None => Box::pin(async { Err("this test cannot wake sites".to_string()) }),
        }
    }

    fn authenticate(&self, credential: &str) -> Option<User> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A platform that answers slowly (a store under load).
        if credential.starts_with("slow-") {
            std::thread::sleep(Duration::from_secs(2));
        }
        self.sessions.lock().unwrap().get(credential).cloned()
    }

    fn sign_in_url(&self, return_to: &str, state: &str) -> Option<String> {
        let base = self.sign_in_at.lock().unwrap().clone()?;
        Some(format!("{base}?to={return_to}&state={state}"))
    }

    fn redeem_sign_in(&self, code: &str, host: &str, state: &str) -> Option<String> {
        let (h, s, credential) = self.codes.lock().unwrap().remove(code)?;
        (h == host && s == state).then_some(credential)
    }

    fn service(&self, credential: &str) -> Option<String> {
        self.services.lock().unwrap().get(credential).cloned()
    }
}

pub struct Running {
    pub gateway: Arc<Gateway>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub events: Events,
    pub hooks: Arc<TestHooks>,
}

/// A gateway on loopback with HTTP, HTTPS and admin listeners.
pub async fn gateway(config: Config) -> Running {
    let events = Events::default();
    let hooks = Arc::new(TestHooks::default());
    let tap = usage::Tap::start(Box::new(events.clone()), None, "test-node".into());
    let signer = identity::Signer::from_seed([42; 32]);
    let gateway = Gateway::new(config, signer, tap, hooks.clone());
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (h, s, a) = (bind().await, bind().await, bind().await);
    let (http, https, admin) = (
        h.local_addr().unwrap(),
        s.local_addr().unwrap(),
        a.local_addr().unwrap(),
    );
    tokio::spawn(gateway.clone().serve_http(h));
    tokio::spawn(gateway.clone().serve_https(s));
    tokio::spawn(gateway.clone().serve_admin(a));
    Running {
        gateway,
        http,
        https,
        admin,
        events,
        hooks,
    }
}

/// A gateway routing `app.localhost` to one upstream named "app".
pub async fn gateway_with_app(config: Config) -> Running {
    let gw = gateway(config).await;
    let app = upstream("app").await;
    gw.gateway
        .set_routes(vec![route("app.localhost", "/", "app", &[app])]);
    gw
}

pub fn route(host: &str, path: &str, deployment: &str, upstreams: &[SocketAddr]) -> RouteSpec {
    RouteSpec {
        host: host.into(),
        path: path.into(),
        deployment: deployment.into(),
        component: "web".into(),
        operator: "op-1".into(),
        upstreams: upstreams.to_vec(),
        idle: false,
        login: vec![],
        max_body: None,
        max_header: None,
        response_timeout_ms: None,
        user_header: None,
    }
}

/// A TLS client that trusts exactly `roots`, offering `alpn`.
pub fn tls_client(
    roots: &[rustls::pki_types::CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}
