//! The tunnel requests reach this node's sites through. The agent dials
//! the control plane (mutual TLS, like every call), asks to upgrade the
//! connection, and then serves HTTP/2 on it with the roles turned: the
//! control plane sends a `CONNECT SITE.COMPONENT:80` stream for each
//! connection its gateway makes to a site here, and the agent joins the
//! stream to that component's port. Only its own sites' components are
//! reachable so; nothing else on the node is, and the node opens no port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;

use crate::ops::Executor;
use crate::protocol::CONTROL_PLANE_NAME;
use crate::tls::{client_config, ClientCert};
use crate::AgentError;

/// The protocol name of the upgrade.
pub const UPGRADE: &str = "commons-tunnel/1";

/// The authority a stream for `site`'s `component` names.
pub fn authority(site: &str, component: &str) -> String {
    format!("{site}.{component}:80")
}

fn parse_authority(authority: &str) -> Option<(&str, &str)> {
    authority.strip_suffix(":80")?.split_once('.')
}

/// Keeps a tunnel open, dialling again when it drops, until the process
/// stops. `cert` is read anew for each dial. The control plane closes a
/// tunnel when the certificate it was opened with expires, so when
/// `renewed` says the certificate was renewed a new tunnel is dialled at
/// once: new connections go there, and the old one carries its own until
/// it is closed.
pub async fn keep_open(
    control_plane: String,
    pin: String,
    node: String,
    read_cert: impl Fn() -> Result<String, AgentError>,
    executor: Arc<Executor>,
    mut renewed: tokio::sync::watch::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = std::time::Instant::now();
        let dialled = match read_cert() {
            Ok(pem) => tokio::spawn(open(
                control_plane.clone(),
                pin.clone(),
                node.clone(),
                pem,
                executor.clone(),
            )),
            Err(e) => {
                eprintln!("{:>12} tunnel: {e}", "Warning");
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let renewal = async {
            if renewed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            ended = dialled => {
                if let Ok(Err(e)) = ended {
                    eprintln!("{:>12} tunnel: {e}", "Warning");
                }
            }
            // The old tunnel's task goes on by itself.
            _ = renewal => continue,
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(250);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One tunnel, served until it drops.
async fn open(
    control_plane: String,
    pin: String,
    node: String,
    pem: String,
    executor: Arc<Executor>,
) -> Result<(), AgentError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| AgentError::Failed(format!("{what}: {e}"));
    let tls = client_config(
        &pin,
        Some(ClientCert {
            certificate_pem: &pem,
            key_pem: &pem,
        }),
    )?;
    let address = control_plane
        .strip_prefix("https://")
        .unwrap_or(&control_plane)
        .trim_end_matches('/');
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| failed(address, &e))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(CONTROL_PLANE_NAME).expect("a valid DNS name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| failed("TLS", &e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed("handshake", &e))?;
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("/agent/v1/nodes/{node}/tunnel"))
        .header("host", CONTROL_PLANE_NAME)
        .header("connection", "upgrade")
        .header("upgrade", UPGRADE)
        .body(Empty::<Bytes>::new())
        .expect("a valid request");
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| failed("tunnel", &e))?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(AgentError::Refused(format!(
            "the control plane did not open a tunnel ({})",
            resp.status()
        )));
    }
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| failed("upgrade", &e))?;
    let service = hyper::service::service_fn(move |req| {
        let executor = executor.clone();
        async move { Ok::<_, Infallible>(stream_to_site(req, &executor)) }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(20))
        .serve_connection(upgraded, service)
        .await
        .map_err(|e| failed("tunnel", &e))
}

fn answer(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}

/// A `CONNECT SITE.COMPONENT:80` stream, joined to that component's port.
fn stream_to_site(
    req: Request<hyper::body::Incoming>,
    executor: &Executor,
) -> Response<Empty<Bytes>> {
    if req.method() != Method::CONNECT {
        return answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(upstream) = req
        .uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
        .and_then(|(site, component)| executor.upstream(site, component))
    else {
        return answer(StatusCode::NOT_FOUND);
    };
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        if let Ok(mut site) = tokio::net::TcpStream::connect(upstream).await {
            let _ = site.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut site).await;
        }
    });
    answer(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stream_names_one_component_of_one_site() {
        let a = super::authority("wiki", "web");
        assert_eq!(super::parse_authority(&a), Some(("wiki", "web")));
        assert_eq!(super::parse_authority("wiki.web:22"), None);
        assert_eq!(super::parse_authority("localhost:80"), None);
    }
}
