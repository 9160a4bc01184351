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

/// A node's newest tunnel.
struct Open {
    /// Tells one dial from the next.
    dial: u64,
    sender: Sender,
    /// When the certificate it was opened with expires (seconds since the
    /// epoch): it is closed then.
    until: i64,
}

pub struct Tunnels {
    nodes: Arc<Nodes>,
    /// Each node's newest tunnel: new connections go there. An older one,
    /// replaced when the node renewed its certificate and dialled again,
    /// carries its connections until its own certificate expires.
    open: Mutex<HashMap<String, Open>>,
    /// How many tunnels each node holds open, the newest and older ones.
    live: Mutex<HashMap<String, usize>>,
    /// Bumped when a node is revoked: every tunnel looks whether it was its.
    revocations: tokio::sync::watch::Sender<u64>,
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
            live: Mutex::new(HashMap::new()),
            revocations: tokio::sync::watch::Sender::new(0),
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
    /// until it drops, the certificate it was opened with expires at
    /// `until` (seconds since the epoch), or the node is revoked —
    /// whichever comes first. A tunnel is never worth more than the
    /// credential that opened it.
    pub async fn serve<Io>(self: Arc<Self>, node: String, until: i64, io: Io)
    where
        Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
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
        *self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node.clone())
            .or_default() += 1;
        let mut revocations = self.revocations.subscribe();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            node.clone(),
            Open {
                dial,
                sender,
                until,
            },
        );
        self.nodes.reachability_changed();
        let expires_in = (until * 1000 - commons_clock::now_ms()).max(0) as u64;
        let revoked = async {
            // Checked once here too: a revocation may have come between
            // the call's authentication and now.
            while !self.nodes.is_revoked(&node) {
                if revocations.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        // Dropping the connection closes it, with every stream it carries.
        tokio::select! {
            _ = conn => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(expires_in)) => {}
            _ = revoked => {}
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.get(&node).is_some_and(|o| o.dial == dial) {
            open.remove(&node);
            drop(open);
            self.nodes.reachability_changed();
        }
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                live.remove(&node);
            }
        }
    }

    /// The nodes with a tunnel open to this instance.
    pub fn open_nodes(&self) -> std::collections::HashSet<String> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// How many tunnels `node` holds open.
    pub fn live(&self, node: &str) -> usize {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
            .unwrap_or(0)
    }

    /// Closes the tunnels of nodes that were revoked.
    pub fn close_revoked(&self) {
        self.revocations.send_modify(|n| *n += 1);
    }

    /// Until when `node`'s newest tunnel stays open (seconds since the
    /// epoch), if it has one.
    pub fn open_until(&self, node: &str) -> Option<i64> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|o| o.until)
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
            .map(|o| o.sender.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use commons_agent::protocol::{JoinRequest, NodeOffer, Resources};
    use std::time::Duration;

    /// A node joined to a fresh registry.
    fn joined() -> (Arc<Nodes>, String, std::path::PathBuf) {
        let home = std::env::temp_dir().join(format!(
            "commons-tunnels-{}-{}",
            std::process::id(),
            crate::tokens::random(6)
        ));
        let nodes = Nodes::open(
            &home,
            Default::default(),
            &commons_store::StoreConfig::Embedded,
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .unwrap();
        let (token, _, _) = nodes
            .make_join_token("acme", "test", Duration::from_secs(60))
            .unwrap();
        let certified = nodes
            .join(&JoinRequest {
                token,
                csr,
                offer: NodeOffer {
                    region: "eu".into(),
                    capacity: Resources {
                        cpu_millis: 1000,
                        memory_bytes: 1 << 30,
                        disk_bytes: 1 << 30,
                    },
                    price: 1,
                    features: Default::default(),
                },
                node: None,
            })
            .unwrap();
        (Arc::new(nodes), certified.node, home)
    }

    /// A node's end of a tunnel that answers every stream and holds it
    /// open, and never closes by itself (as a node ignoring its expiry or
    /// revocation would).
    fn stubborn_node(io: tokio::io::DuplexStream) {
        let service =
            hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                tokio::spawn(async move {
                    if let Ok(up) = hyper::upgrade::on(req).await {
                        // Held, never read or closed.
                        std::future::pending::<()>().await;
                        drop(up);
                    }
                });
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service),
        );
    }

    /// Opens a tunnel for `node` good until `until`, with one stream
    /// carried on it, and answers the task serving it.
    async fn tunnel_with_a_stream(
        tunnels: &Arc<Tunnels>,
        node: &str,
        until: i64,
    ) -> tokio::task::JoinHandle<()> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        stubborn_node(theirs);
        let serving = tokio::spawn(tunnels.clone().serve(
            node.to_string(),
            until,
            TokioIo::new(ours),
        ));
        let mut sender = loop {
            if let Some(o) = tunnels.open.lock().unwrap().get(node) {
                break o.sender.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        sender.ready().await.unwrap();
        let resp = sender
            .send_request(
                Request::builder()
                    .method(Method::CONNECT)
                    .uri(authority("site", "web"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let stream = hyper::upgrade::on(resp).await.unwrap();
        // The stream stays open on our side too.
        tokio::spawn(async move {
            std::future::pending::<()>().await;
            drop(stream);
        });
        serving
    }

    #[tokio::test]
    async fn a_tunnel_closes_when_its_certificate_expires_though_it_carries_a_stream() {
        let (nodes, node, home) = joined();
        let tunnels = Tunnels::new(nodes);
        let until = commons_clock::now_secs() as i64 + 2;
        let serving = tunnel_with_a_stream(&tunnels, &node, until).await;
        assert_eq!(tunnels.live(&node), 1);
        assert_eq!(tunnels.open_until(&node), Some(until));
        tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("closed at the certificate's expiry")
            .unwrap();
        assert!(commons_clock::now_secs() as i64 >= until);
        assert_eq!(tunnels.live(&node), 0);
        assert_eq!(tunnels.open_until(&node), None);
        let _ = std::fs::remove_dir_all(home);
    }

    #[tokio::test]
    async fn a_revoked_nodes_tunnel_closes_at_once() {
        let (nodes, node, home) = joined();
        let tunnels = Tunnels::new(nodes.clone());
        let until = commons_clock::now_secs() as i64 + 3600;
        let serving = tunnel_with_a_stream(&tunnels, &node, until).await;
        // Another node's revocation leaves it be.
        tunnels.close_revoked();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!serving.is_finished());
        nodes.revoke(Some("acme"), &node).unwrap();
        tunnels.close_revoked();
        tokio::time::timeout(Duration::from_secs(2), serving)
            .await
            .expect("closed on revocation")
            .unwrap();
        assert_eq!(tunnels.live(&node), 0);
        let _ = std::fs::remove_dir_all(home);
    }
}
