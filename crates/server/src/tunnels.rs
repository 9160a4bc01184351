//! Requests to sites on providers' nodes. Each node's agent keeps a tunnel
//! open to the agent listener (an upgraded mutual-TLS connection on which
//! the control plane speaks HTTP/2 as the client); for each site placed on
//! a node the gateway is given a loopback forwarder as the site's upstream,
//! and each connection the gateway makes to it becomes one `CONNECT` stream
//! to the node that runs the site *now*. A move or a lost node changes
//! where the next connection goes without a new route: route changes are
//! as fast as the placement.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use commons_agent::tunnel::authority;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::nodes::Nodes;

type Sender = SendRequest<Empty<Bytes>>;

/// A loopback listener the gateway sends a site's connections to, and the
/// task accepting them.
struct Forwarder {
    addr: SocketAddr,
    accepting: tokio::task::AbortHandle,
}

/// How long a connection waits for a moving site.
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Tunnels {
    nodes: Arc<Nodes>,
    /// Each node's open tunnel, with a number telling one dial from the next.
    open: Mutex<HashMap<String, (u64, Sender)>>,
    dials: std::sync::atomic::AtomicU64,
    /// By (site, component, placement epoch).
    forwarders: Mutex<HashMap<(String, String, u64), Forwarder>>,
    /// The runtime forwarders run on: the agent listener's, once it runs.
    runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Tunnels {
    pub fn new(nodes: Arc<Nodes>) -> Arc<Tunnels> {
        Arc::new(Tunnels {
            nodes,
            open: Mutex::new(HashMap::new()),
            dials: Default::default(),
            forwarders: Mutex::new(HashMap::new()),
            runtime: std::sync::OnceLock::new(),
        })
    }

    /// Forwarders run on the current runtime from now on.
    pub fn run_here(&self) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
    }

    pub fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.get().cloned()
    }

    /// Serves a tunnel `node` dialled, on the upgraded connection `io`,
    /// until it drops.
    pub async fn serve(self: Arc<Self>, node: String, io: hyper::upgrade::Upgraded) {
        let Ok((sender, conn)) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(std::time::Duration::from_secs(10)))
            .handshake::<_, Empty<Bytes>>(io)
            .await
        else {
            return;
        };
        let dial = self
            .dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.clone(), (dial, sender));
        let _ = conn.await;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.get(&node).is_some_and(|(d, _)| *d == dial) {
            open.remove(&node);
        }
    }

    /// Whether `node` has a tunnel open.
    pub fn is_open(&self, node: &str) -> bool {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(node)
    }

    /// The forwarders made for `site` at epochs other than `epoch`.
    pub fn others(&self, site: &str, epoch: u64) -> Vec<SocketAddr> {
        self.forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((s, _, e), _)| s == site && *e != epoch)
            .map(|(_, f)| f.addr)
            .collect()
    }

    /// The forwarder made for `site`'s `component` at `epoch`, if any.
    pub fn existing(&self, site: &str, component: &str, epoch: u64) -> Option<SocketAddr> {
        let key = (site.to_string(), component.to_string(), epoch);
        self.forwarders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|f| f.addr)
    }

    /// The loopback address the gateway sends `site`'s `component` to at
    /// placement `epoch`, made on first use (on `runtime`). Each epoch has
    /// its own, so a move gives the gateway a new upstream: requests in
    /// flight on the old one finish, new ones wait on the new one.
    pub fn forwarder(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        site: &str,
        component: &str,
        epoch: u64,
    ) -> Option<SocketAddr> {
        let key = (site.to_string(), component.to_string(), epoch);
        let mut forwarders = self.forwarders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = forwarders.get(&key) {
            return Some(f.addr);
        }
        // Two epochs back, the gateway stopped routing there a whole move
        // ago: no new connection comes, so the listener goes (connections
        // it carries go on to their end).
        forwarders.retain(|(s, c, e), f| {
            let stale = *s == key.0 && *c == key.1 && e + 2 < epoch;
            if stale {
                f.accepting.abort();
            }
            !stale
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        listener.set_nonblocking(true).ok()?;
        let addr = listener.local_addr().ok()?;
        let me = self.clone();
        let (site, component, epoch) = key.clone();
        let accepting = runtime.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(
                    me.clone()
                        .carry(tcp, site.clone(), component.clone(), epoch),
                );
            }
        });
        forwarders.insert(
            key,
            Forwarder {
                addr,
                accepting: accepting.abort_handle(),
            },
        );
        Some(addr)
    }

    /// One connection from the gateway, carried to the node that runs the
    /// site now (closed at once when none can).
    async fn carry(
        self: Arc<Self>,
        mut tcp: tokio::net::TcpStream,
        site: String,
        component: String,
        epoch: u64,
    ) {
        let _ = tcp.set_nodelay(true);
        // While the site moves, the connection waits (not refused), and
        // goes to wherever the site serves once the move ends.
        let held = std::time::Instant::now();
        let mut changed = self.nodes.watch();
        while self.nodes.holds(&site, epoch) {
            if held.elapsed() > HOLD_AT_MOST {
                return;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), changed.changed())
                .await;
        }
        let Some(node) = self.nodes.serving_node(&site) else {
            return;
        };
        let Some(mut sender) = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .map(|(_, s)| s.clone())
        else {
            return;
        };
        if sender.ready().await.is_err() {
            return;
        }
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority(&site, &component))
            .body(Empty::new())
            .expect("a valid request");
        let Ok(resp) = sender.send_request(req).await else {
            return;
        };
        if resp.status() != StatusCode::OK {
            return;
        }
        if let Ok(upgraded) = hyper::upgrade::on(resp).await {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut tcp).await;
        }
    }
}
