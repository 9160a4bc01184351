//! The API's HTTP server: every route (the REST API, the platform's own,
//! the console, OpenID Connect, the books), its limits, and serving them
//! on TCP and on the local socket until a signal or until the data
//! directory is gone.

use std::path::Path;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler as _;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use crate::web::problem;
use crate::{
    api, books, console, console_data, console_nodes, console_placements, local, my_money,
    my_usage, oidc, openapi, platform, statements, subscribe, AppState,
};

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(platform::healthz))
        .route("/api/openapi.json", get(openapi::openapi_json))
        .route("/readyz", get(platform::ready))
        .route(
            "/api/usage/events",
            post(platform::ingest).layer(DefaultBodyLimit::max(limits::EVENT_BATCH)),
        )
        .route(
            "/api/payments/stripe/webhook",
            post(platform::stripe_webhook).layer(DefaultBodyLimit::max(limits::WEBHOOK)),
        )
        .route("/api/users/{user}/tier", get(platform::tier))
        .route("/api/deployments/{name}/wake", post(platform::wake))
        .route("/api/deployments/{name}", get(platform::deployment_status))
        .route("/api/daemon", get(platform::daemon))
        .route("/api/periods/{period}/close", post(platform::close_period))
        .route("/api/payments/manual", post(platform::manual_payment))
        .route("/api/payments/{id}/refund", post(platform::refund))
        .route("/api/signup", post(api::accounts::signup))
        .route("/api/login", post(api::accounts::login))
        .route("/api/logout", post(api::accounts::logout))
        .route("/api/me", get(api::accounts::me))
        .route(
            "/api/orgs",
            get(api::orgs::orgs).post(api::orgs::create_org),
        )
        .route(
            "/api/orgs/{org}/members",
            get(api::orgs::members).put(api::orgs::set_members),
        )
        .route("/api/orgs/{org}/audit", get(api::orgs::audit))
        .route(
            "/api/orgs/{org}/sites",
            get(api::sites::sites)
                .post(api::sites::create_site.layer(DefaultBodyLimit::max(limits::UPLOAD))),
        )
        .route(
            "/api/orgs/{org}/plan",
            post(api::sites::plan).layer(DefaultBodyLimit::max(limits::UPLOAD)),
        )
        .route(
            "/api/tokens",
            get(api::tokens::tokens).post(api::tokens::create_token),
        )
        .route(
            "/api/tokens/{id}",
            axum::routing::delete(api::tokens::revoke_token),
        )
        .route(
            "/api/orgs/{org}/join-tokens",
            post(api::nodes::create_join_token),
        )
        .route("/api/orgs/{org}/nodes", get(api::nodes::nodes))
        .route(
            "/api/orgs/{org}/nodes/{id}",
            axum::routing::delete(api::nodes::revoke_node),
        )
        .route("/api/nodes", get(api::nodes::all_nodes))
        .route("/api/nodes/{id}/operations", post(api::nodes::assign))
        .route(
            "/api/placements",
            post(api::nodes::place).layer(DefaultBodyLimit::max(limits::UPLOAD)),
        )
        .route("/api/placements/{site}/move", post(api::nodes::move_site))
        .route(
            "/api/placements/{site}/confirm",
            post(api::nodes::confirm_move),
        )
        .merge(data_routes())
        .route(
            "/api/data/me",
            get(api::data::me).delete(api::data::erase_me),
        )
        .route("/api/data/me/export", get(api::data::export_me))
        .route(
            "/api/data/me/repo",
            post(api::data::import_repo_me).layer(DefaultBodyLimit::max(512 << 20)),
        )
        .route(
            "/api/data/users/{user}/repo",
            post(api::data::import_repo).layer(DefaultBodyLimit::max(512 << 20)),
        )
        .route(
            "/api/data/users/{user}",
            get(api::data::user_data).delete(api::data::erase_user),
        )
        .route("/api/data/users/{user}/export", get(api::data::export_user))
        .route(
            "/api/data/users/{user}/import",
            post(api::data::import).layer(DefaultBodyLimit::max(512 << 20)),
        )
        .route(
            "/api/data/consent/{site}",
            get(api::data::requests).post(api::data::consent),
        )
        .route("/api/data/forks/{source}", post(api::data::fork))
        .route("/api/data/forks/{source}/sync", post(api::data::sync))
        .route("/api/data/merges/{fork_user}", post(api::data::merge))
        .route(
            "/api/data/grants",
            post(api::data::grant).delete(api::data::revoke),
        )
        .route("/api/catalog", get(api::sites::catalog_list))
        .route(
            "/api/sites/{name}",
            get(api::sites::site)
                .put(api::sites::redeploy_site.layer(DefaultBodyLimit::max(limits::UPLOAD)))
                .delete(api::sites::destroy_site),
        )
        .route("/api/sites/{name}/logs", get(api::sites::logs))
        .route("/api/sites/{name}/history", get(api::sites::history))
        .route(
            "/api/sites/{name}/history/diff",
            get(api::sites::history_diff),
        )
        .route("/api/sites/{name}/backups", post(api::sites::backup))
        .route("/api/orgs/{org}/oidc-clients", post(oidc::register_client))
        .route("/api/me/usage", get(my_usage::usage_json))
        .route("/console/billing", get(subscribe::page_of_billing))
        .route(
            "/console/billing/checkout",
            post(subscribe::checkout_submit),
        )
        .route("/console/billing/cancel", post(subscribe::cancel_submit))
        .route("/console/billing/change", post(subscribe::change_submit))
        .route("/api/billing/tiers", get(api::billing::tiers))
        .route(
            "/api/me/subscription",
            get(api::billing::subscription)
                .put(api::billing::change)
                .delete(api::billing::cancel),
        )
        .route(
            "/api/me/subscription/checkout",
            post(api::billing::checkout),
        )
        .route("/console/data", get(console_data::my_data_page))
        .route("/console/data/export", get(console_data::export))
        .route("/console/data/erase", post(console_data::erase_submit))
        .route("/console/data/revoke", post(console_data::revoke_submit))
        .route("/console/data/forks", post(console_data::fork_submit))
        .route(
            "/console/data/forks/{source}/sync",
            post(console_data::sync_submit),
        )
        .route(
            "/console/data/merges/{fork_user}",
            post(console_data::merge_submit),
        )
        .route(
            "/console/data/consent/{site}",
            get(console_data::consent_page).post(console_data::consent_submit),
        )
        .route("/console/orgs/{org}/nodes", get(console_nodes::nodes_page))
        .route(
            "/console/placements",
            get(console_placements::placements_page),
        )
        .route(
            "/console/placements/plan",
            post(console_placements::plan_submit),
        )
        .route(
            "/console/placements/{site}/move",
            post(console_placements::move_submit),
        )
        .route(
            "/console/placements/{site}/confirm",
            post(console_placements::confirm_submit),
        )
        .route(
            "/console/orgs/{org}/join-tokens",
            post(console_nodes::join_token_submit),
        )
        .route(
            "/console/orgs/{org}/nodes/{id}/revoke",
            post(console_nodes::revoke_submit),
        )
        .route("/console/usage", get(my_usage::page))
        .route("/api/me/money", get(my_money::money_json))
        .route("/console/money", get(my_money::page))
        .route("/books/statement", get(statements::page))
        .route("/api/books/statement", get(statements::statement_json))
        .route("/api/books/proof", get(statements::proof_json))
        .route("/books", get(books::page))
        .route("/api/books", get(books::books_json))
        .route("/api/books/export", get(books::export))
        .merge(console::routes())
        .merge(oidc::routes())
        .fallback(|| async { problem(StatusCode::NOT_FOUND, "Not found", "no such route", None) })
        .method_not_allowed_fallback(|| async {
            problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "this route does not take this method; see /api/openapi.json",
                None,
            )
        })
        // Bodies are small JSON unless a route says otherwise (above).
        .layer(DefaultBodyLimit::max(limits::JSON))
        .layer(axum::middleware::map_response(limits::too_large_as_problem))
        .layer(axum::middleware::map_response(never_framed))
        .with_state(state)
}

/// The data API apps call (with their service token and the user's
/// assertion): on the API and, alone, on the data API's own listener.
fn data_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/data/v1/records/{collection}",
            get(api::data::list).post(api::data::create),
        )
        .route(
            "/data/v1/records/{collection}/{rkey}",
            get(api::data::get)
                .put(api::data::update)
                .delete(api::data::delete),
        )
        .route("/data/v1/subscribe", get(api::data::subscribe))
        .route(
            "/data/v1/batch",
            post(api::data::apply_writes).layer(DefaultBodyLimit::max(8 << 20)),
        )
        .route(
            "/data/v1/blobs/{collection}",
            post(api::data::put_blob).layer(DefaultBodyLimit::max(11 << 20)),
        )
        .route(
            "/data/v1/blobs/{collection}/{cid}",
            get(api::data::get_blob),
        )
}

/// The data API's own listener: its routes and nothing else.
fn data_router(state: Arc<AppState>) -> Router {
    data_routes()
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "Not found",
                "this listener serves the data API (/data/v1/...) only",
                None,
            )
        })
        .layer(DefaultBodyLimit::max(limits::JSON))
        .layer(axum::middleware::map_response(limits::too_large_as_problem))
        .layer(axum::middleware::map_response(never_framed))
        .with_state(state)
}

/// Serves the data API alone on `listener` until the process ends.
pub async fn serve_data_api(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
) -> std::io::Result<()> {
    serve_tcp(listener, data_router(state)).await
}

/// Limits of the API's listener: it faces the same clients as the
/// gateway, so it holds them to the same rules.
pub mod limits {
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use std::time::Duration;

    /// A JSON request body (sign-up, log-in, tokens, members...).
    pub const JSON: usize = 64 << 10;
    /// A blueprint with the files it needs (`source.files`), or a console
    /// form carrying one.
    pub const UPLOAD: usize = 64 << 20;
    /// A batch of usage events.
    pub const EVENT_BATCH: usize = 16 << 20;
    /// A payment provider's notification.
    pub const WEBHOOK: usize = 1 << 20;
    /// A client must send a whole request head within this, and an idle
    /// keep-alive connection is closed after it (as at the gateway).
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
    /// Largest request head.
    pub const HEAD: usize = 64 << 10;

    /// A body over its route's limit is answered as a problem document.
    pub async fn too_large_as_problem(r: Response) -> Response {
        let is_problem = r
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
        if r.status() != StatusCode::PAYLOAD_TOO_LARGE || is_problem {
            return r;
        }
        crate::AppError::new(
            crate::ErrorKind::TooLarge,
            "Content too large",
            "the request body is larger than this route takes",
        )
        .into_response()
    }
}

/// No page of the platform may be framed by another site (the OIDC
/// "Allow" and a site's "Destroy" buttons would be clickjacked).
async fn never_framed(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::X_FRAME_OPTIONS,
        axum::http::HeaderValue::from_static("DENY"),
    );
    h.entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(axum::http::HeaderValue::from_static(
            "frame-ancestors 'none'",
        ));
    r
}

/// Serves `router` on `listener` over HTTP/1.1 with the limits above; each
/// request carries its peer's address (`ConnectInfo`).
async fn serve_tcp(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower_service::Service as _;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::Extension(axum::extract::ConnectInfo(peer)));
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let mut router = router.clone();
                    async move { router.call(req).await }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits::HEADER_TIMEOUT)
                .max_buf_size(limits::HEAD)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// Resolves once the data directory, or (when it listens there) the local
/// socket, is gone: a daemon whose data was removed must not hold the
/// platform's ports for the next one.
async fn orphaned(home: &Path, has_socket: bool) {
    let socket = local::socket_path(home);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if !home.is_dir() || (has_socket && !socket.exists()) {
            return;
        }
    }
}

/// Serves the API on `listener` (scoped tokens) and on the local socket
/// `local` (the platform's administrator) until SIGTERM or SIGINT, then
/// withdraws the socket and `daemon.json`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    local: Option<tokio::net::UnixListener>,
    state: Arc<AppState>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let home = state.home.clone();
    let tcp = serve_tcp(listener, router(state.clone()));
    let has_socket = local.is_some();
    let socket = async {
        match local {
            Some(l) => {
                axum::serve(l, router(state).layer(axum::Extension(local::LocalCaller))).await
            }
            None => std::future::pending().await,
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = tcp => r,
        r = socket => r,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        _ = orphaned(&home, has_socket) => {
            eprintln!(
                "{:>12} {} or its socket was removed: the platform stops",
                "Stopping",
                home.display()
            );
            Ok(())
        }
    };
    local::withdraw(&home);
    result
}
