//! The agent listener: the control plane's side of the node protocol
//! (`commons_agent::protocol`), on an address of its own, TLS only. The
//! server's certificate is the node CA's; a client certificate, when one is
//! presented, must be the CA's too, and every call but joining needs one.
//! Each call then acts only for the node its certificate names
//! (`Nodes::authenticate`): a node reads its own assignments, reports its
//! own operations and sends usage only as itself.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use commons_agent::protocol::{Heartbeat, JoinRequest, RenewRequest, Report, UsageBatch};
use commons_meter::Event;

use crate::web::json_body;
use crate::{AppError, AppState, ErrorKind};

type Reply = Result<Response, AppError>;

/// The certificate a connection presented: the hex SHA-256 of its DER.
#[derive(Clone)]
pub struct Peer(Option<String>);

/// The node a call acts for: the one its path names, proven by the
/// certificate the connection presented. Every call but joining takes it,
/// so none can act without it.
struct AsNode(String, CertificateExpiry);

/// When the certificate a call presented expires, in seconds since the
/// epoch.
struct CertificateExpiry(i64);

impl FromRequestParts<Arc<AppState>> for AsNode {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<AsNode, AppError> {
        let UrlPath(params) =
            UrlPath::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|e| {
                    AppError::new(ErrorKind::Malformed, "Malformed path", e.body_text())
                })?;
        let node = params.get("node").cloned().unwrap_or_default();
        let peer = parts.extensions.get::<Peer>().and_then(|p| p.0.as_deref());
        let expires = state.nodes.authenticate(peer, &node)?;
        Ok(AsNode(node, CertificateExpiry(expires)))
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/agent/v1/join", post(join))
        .route("/agent/v1/nodes/{node}/renew", post(renew))
        .route("/agent/v1/nodes/{node}/heartbeat", post(heartbeat))
        .route("/agent/v1/nodes/{node}/assignments", get(assignments))
        .route("/agent/v1/nodes/{node}/operations/{op}", post(report))
        .route("/agent/v1/nodes/{node}/tunnel", post(tunnel))
        .route(
            "/agent/v1/nodes/{node}/snapshots/{site}",
            get(fetch_snapshot)
                .put(ship_snapshot)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/agent/v1/nodes/{node}/usage",
            post(usage).layer(DefaultBodyLimit::max(8 << 20)),
        )
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

/// Serves agents on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AppState>) -> Result<(), String> {
    let tls = state.nodes.ca.server_config()?;
    state.tunnels.run_here();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(state);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let peer = Peer(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| commons_agent::protocol::pin_of(c)),
            );
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    let mut app = app.clone();
                    async move { tower_service::Service::call(&mut app, req).await }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn join(State(state): State<Arc<AppState>>, body: Bytes) -> Reply {
    let req: JoinRequest = json_body(&body)?;
    let nodes = state.clone();
    let certified = tokio::task::spawn_blocking(move || nodes.nodes.join(&req))
        .await
        .map_err(|e| AppError::new(ErrorKind::Internal, "Join", e.to_string()))??;
    Ok((StatusCode::CREATED, Json(certified)).into_response())
}

/// The node's tunnel: the connection is upgraded, and the control plane
/// speaks HTTP/2 on it as the client (`crate::tunnels`).
async fn tunnel(
    State(state): State<Arc<AppState>>,
    AsNode(node, CertificateExpiry(until)): AsNode,
    mut req: axum::extract::Request,
) -> Reply {
    use commons_agent::tunnel::UPGRADE;
    let asked = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|u| u.as_bytes() == UPGRADE.as_bytes());
    if !asked {
        return Err(AppError::new(
            ErrorKind::Malformed,
            "Not an upgrade",
            format!("ask for `Upgrade: {UPGRADE}`"),
        ));
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let tunnels = state.tunnels.clone();
    tokio::spawn(async move {
        if let Ok(io) = upgrade.await {
            tunnels.serve(node, until, io).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(axum::http::header::CONNECTION, "upgrade")
        .header(axum::http::header::UPGRADE, UPGRADE)
        .body(axum::body::Body::empty())
        .expect("a valid response"))
}

/// A node ships an increment of a site while the site moves away from it;
/// it is streamed to a file under `nodes/snapshots/` (never into a
/// database, never whole in memory) and hashed on the way, so the node it
/// goes to can check it got those bytes.
async fn ship_snapshot(
    State(state): State<Arc<AppState>>,
    AsNode(node, _): AsNode,
    UrlPath((_, site)): UrlPath<(String, String)>,
    body: axum::body::Body,
) -> Reply {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    if !state.nodes.may_carry_snapshot(&node, &site, true) {
        return Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            format!("{site} is not moving away from node {node}"),
        ));
    }
    let path = state.nodes.snapshot_path(&site);
    let io = |e: std::io::Error| AppError::new(ErrorKind::Internal, "Snapshot", e.to_string());
    crate::private_dir(path.parent().expect("in a directory")).map_err(io)?;
    let partial = path.with_extension("part");
    let file = tokio::fs::File::create(&partial).await.map_err(io)?;
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut hash = <sha2::Sha256 as sha2::Digest>::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            AppError::new(ErrorKind::Malformed, "Snapshot cut short", e.to_string())
        })?;
        if let Ok(data) = frame.into_data() {
            sha2::Digest::update(&mut hash, &data);
            file.write_all(&data).await.map_err(io)?;
        }
    }
    file.flush().await.map_err(io)?;
    let sha256: String = sha2::Digest::finalize(hash)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    tokio::fs::write(path.with_extension("sha256"), &sha256)
        .await
        .map_err(io)?;
    tokio::fs::rename(&partial, &path).await.map_err(io)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The node a site moves to fetches its snapshot.
async fn fetch_snapshot(
    State(state): State<Arc<AppState>>,
    AsNode(node, _): AsNode,
    UrlPath((_, site)): UrlPath<(String, String)>,
) -> Reply {
    if !state.nodes.may_carry_snapshot(&node, &site, false) {
        return Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            format!("{site} is not moving to node {node}"),
        ));
    }
    let file = tokio::fs::File::open(state.nodes.snapshot_path(&site))
        .await
        .map_err(|e| AppError::new(ErrorKind::NotFound, "No snapshot", e.to_string()))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn renew(State(state): State<Arc<AppState>>, AsNode(node, _): AsNode, body: Bytes) -> Reply {
    let req: RenewRequest = json_body(&body)?;
    Ok(Json(state.nodes.renew(&node, &req.csr)?).into_response())
}

async fn heartbeat(
    State(state): State<Arc<AppState>>,
    AsNode(node, _): AsNode,
    body: Bytes,
) -> Reply {
    let hb: Heartbeat = json_body(&body)?;
    state.nodes.heartbeat(&node, hb)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(serde::Deserialize)]
struct Poll {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    wait: u64,
}

/// A node's operations after a revision, waiting (up to 60 s) for one.
async fn assignments(
    State(state): State<Arc<AppState>>,
    AsNode(node, _): AsNode,
    Query(poll): Query<Poll>,
) -> Reply {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(poll.wait.min(60));
    let mut changed = state.nodes.watch_node(&node);
    loop {
        changed.borrow_and_update();
        let a = state.nodes.assignments(&node, poll.after);
        if !a.operations.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(a).into_response());
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            return Ok(Json(state.nodes.assignments(&node, poll.after)).into_response());
        }
    }
}

async fn report(
    State(state): State<Arc<AppState>>,
    AsNode(node, _): AsNode,
    UrlPath((_, op)): UrlPath<(String, String)>,
    body: Bytes,
) -> Reply {
    let r: Report = json_body(&body)?;
    state.nodes.report(&node, &op, r)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Usage a node measured. Each event is stated as this node's and its
/// provider's, whatever it says; an event that names another node refuses
/// the whole batch.
async fn usage(State(state): State<Arc<AppState>>, AsNode(node, _): AsNode, body: Bytes) -> Reply {
    let batch: UsageBatch = json_body(&body)?;
    let provider = state.nodes.provider_of(&node).unwrap_or_default();
    let mut events = Vec::with_capacity(batch.events.len());
    for value in batch.events {
        let mut e: Event = serde_json::from_value(value).map_err(|e| {
            AppError::new(
                ErrorKind::Malformed,
                "Malformed usage event",
                format!("expected CloudEvents as the meter takes them: {e}"),
            )
        })?;
        for (field, own) in [("node", &node), ("provider", &provider)] {
            match e.data.get(field).and_then(|v| v.as_str()) {
                Some(other) if other != own.as_str() => {
                    return Err(AppError::new(
                        ErrorKind::Forbidden,
                        "Not allowed",
                        format!("an event names {field} \"{other}\": node {node} reports only its own usage"),
                    ))
                }
                _ => {
                    e.data.insert(field.into(), own.as_str().into());
                }
            }
        }
        e.source = format!("node:{node}");
        events.push(e);
    }
    let meter_state = state.clone();
    let outcomes = tokio::task::spawn_blocking(move || {
        let mut meter = meter_state.meter.lock().unwrap_or_else(|p| p.into_inner());
        meter.ingest(&events, None)
    })
    .await
    .map_err(|e| AppError::new(ErrorKind::Internal, "Metering failed", e.to_string()))?
    .map_err(|e| match e {
        // The store could not take it now: the node keeps it and sends it again.
        commons_meter::MeterError::Store(_) | commons_meter::MeterError::Conflict(_) => {
            AppError::new(
                ErrorKind::Unavailable,
                "Metering unavailable",
                e.to_string(),
            )
        }
        commons_meter::MeterError::Input(_) => {
            AppError::new(ErrorKind::Invalid, "Usage refused", e.to_string())
        }
    })?;
    // The rest were recorded; the node hears why these were not.
    if let Some(why) = outcomes.iter().find_map(|o| match o {
        commons_meter::Outcome::Rejected(r) => Some(r.to_string()),
        _ => None,
    }) {
        return Err(AppError::new(ErrorKind::Invalid, "Usage refused", why));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
