//! The control plane's HTTP API, run by `commons serve`.
//!
//! What it serves today:
//! - `POST /api/usage/events` — a batch of usage events (CloudEvents JSON
//!   array), bearer token with scope `usage:write`. 200 when every event was
//!   accepted or was a duplicate; otherwise the most serious rejection's
//!   status (409 conflict, 422 late, 400 invalid) with an RFC 9457 problem
//!   document listing every event's outcome. `?backfill=ID` admits late events
//!   as an adjustment.
//! - `POST /api/payments/stripe/webhook` — Stripe's notifications, verified
//!   with the endpoint's signing secret (`COMMONS_STRIPE_WEBHOOK_SECRET`).
//! - `GET /api/users/{user}/tier` — the tier the gateway tells apps
//!   (scope `billing:read`).
//! - `POST /api/deployments/{name}/wake` — starts an idle site and answers
//!   once it is healthy (scope `runtime:wake`).
//! - `GET /api/deployments/{name}` — a deployment's components and their
//!   states (scope `deployments:read`).
//! - `GET /api/daemon` — the daemon itself, over the local socket only.
//! - `GET /healthz` (alive), `GET /readyz` (every store answers).
//! - `GET /api/openapi.json` — this list as an OpenAPI 3.1 document,
//!   generated from the handlers' annotations (`openapi.rs`).
//!
//! Every store is the embedded one under `COMMONS_HOME`. Errors are RFC 9457
//! problem JSON; a secret never appears in a response or a log line.

pub mod accounts;
pub mod api;
pub mod books;
pub mod catalog;
pub mod client;
pub mod config;
pub mod console;
pub mod gateway;
pub mod hosts;
pub mod local;
pub mod my_usage;
pub mod oidc;
pub mod openapi;
pub mod periods;
pub mod rs256;
mod run;
pub mod schema;
pub mod supervisor;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::handler::Handler as _;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::schema::Problem;
use serde::Deserialize;

use commons_ledger::billing::{default_tiers, Billing, Tier};
use commons_ledger::cents::Cents;
use commons_ledger::journal::Journal;
use commons_ledger::payments::{PaymentProvider, Stripe};
use commons_meter::{Event, Meter, Outcome};

pub use run::{run, RunError};
pub use tokens::Tokens;

/// Creates a directory readable only by the platform (mode 0700).
pub use commons_runtime::layout::private_dir;

/// Late events for a period are taken this long after it ends.
pub const GRACE_MS: i64 = 3 * 86_400_000;

/// This machine's host name, as the kernel has it.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// What the handlers share. Each store is behind its own lock: SQLite
/// connections serve one caller at a time, and a request holds a lock only
/// for its own short transaction.
pub struct AppState {
    pub home: PathBuf,
    pub meter: Mutex<Meter>,
    pub journal: Mutex<Journal>,
    pub billing: Mutex<Billing>,
    pub stripe: Option<Stripe>,
    pub tokens: Tokens,
    pub accounts: accounts::Accounts,
    pub engine: commons_engine::Engine,
    /// The gateway's plain-HTTP address, once it listens: sites are at
    /// `http://SITE.localhost:PORT/` (the console links them).
    pub gateway_http: std::sync::OnceLock<std::net::SocketAddr>,
    /// The gateway's HTTPS address, once it listens.
    pub gateway_https: std::sync::OnceLock<std::net::SocketAddr>,
    /// The OpenID Connect provider (one login for every hosted site).
    pub oidc: oidc::Provider,
    /// Where users reach the platform (`COMMONS_PUBLIC_URL`, else the API's
    /// address): the OpenID Connect issuer.
    pub public_url: std::sync::OnceLock<String>,
    /// The last deploy the API started of each site, since this server
    /// started: what a client polls to learn when and how it ended.
    pub deploys: Mutex<std::collections::HashMap<String, api::DeployRun>>,
    /// Console users on their way to sites' hosts.
    pub sign_ins: gateway::SignIns,
    /// Sessions at sites' own hosts.
    pub site_sessions: gateway::SiteSessions,
    /// Proxies in front of the API whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Open(String),
}

impl AppState {
    /// Opens every store under `home`.
    pub fn open(
        home: &Path,
        store: &commons_store::StoreConfig,
        tiers: Option<Vec<Tier>>,
        stripe_secret: Option<String>,
    ) -> Result<AppState, ServeError> {
        let err = |what: &str, e: &dyn std::fmt::Display| ServeError::Open(format!("{what}: {e}"));
        for dir in ["meter", "ledger", "gateway"] {
            private_dir(&home.join(dir)).map_err(|e| err(dir, &e))?;
        }
        let engine = commons_engine::Engine::open(home, store).map_err(|e| err("engine", &e))?;
        let layout = engine.layout.clone();
        let site_sessions = gateway::SiteSessions::new(&engine);
        Ok(AppState {
            home: home.to_path_buf(),
            meter: Mutex::new(
                Meter::open(&layout.meter_db(), GRACE_MS).map_err(|e| err("meter", &e))?,
            ),
            journal: Mutex::new(Journal::open(&layout.ledger_db()).map_err(|e| err("ledger", &e))?),
            billing: Mutex::new(
                Billing::open(&layout.billing_db(), tiers.unwrap_or_else(default_tiers))
                    .map_err(|e| err("billing", &e))?,
            ),
            stripe: stripe_secret.map(Stripe::new),
            tokens: Tokens::new(home),
            accounts: accounts::Accounts::new(
                store
                    .open_accounts(&layout.state_db())
                    .map_err(|e| err("accounts", &e))?,
            ),
            trusted_proxies: Vec::new(),
            engine,
            gateway_http: std::sync::OnceLock::new(),
            gateway_https: std::sync::OnceLock::new(),
            oidc: oidc::Provider::new(layout.oidc_key()),
            public_url: std::sync::OnceLock::new(),
            deploys: Mutex::new(std::collections::HashMap::new()),
            sign_ins: gateway::SignIns::default(),
            site_sessions,
        })
    }
}

/// An error answer: an RFC 9457 problem document with a 4xx or 5xx status.
#[derive(Debug)]
pub struct ApiProblem {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    retry_after_s: Option<i64>,
}

impl ApiProblem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> ApiProblem {
        ApiProblem {
            status,
            title,
            detail: detail.into(),
            retry_after_s: None,
        }
    }

    /// Tells the client when to try again (`Retry-After`).
    pub fn retry_after(mut self, seconds: i64) -> ApiProblem {
        self.retry_after_s = Some(seconds);
        self
    }
}

/// A store that fails is not the caller's fault: 500, with the cause.
impl From<commons_store::StoreError> for ApiProblem {
    fn from(e: commons_store::StoreError) -> ApiProblem {
        ApiProblem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Store failed",
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiProblem {
    fn into_response(self) -> Response {
        let mut r = problem(self.status, self.title, self.detail, None);
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// An RFC 9457 problem document, as the gateway writes them too.
fn problem(
    status: StatusCode,
    title: &str,
    detail: impl Into<String>,
    extra: Option<serde_json::Value>,
) -> Response {
    let extra = match extra {
        Some(serde_json::Value::Object(members)) => Some(members),
        _ => None,
    };
    let body = commons_gateway::problem::document(status.as_u16(), title, &detail.into(), extra);
    (
        status,
        [(header::CONTENT_TYPE, commons_gateway::problem::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// Who calls: the platform's administrator over the local socket (see
/// [`local`]), or whoever holds the bearer token sent over TCP.
pub enum Caller {
    Local,
    Bearer(Option<String>),
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Caller, Self::Rejection> {
        if parts.extensions.get::<local::LocalCaller>().is_some() {
            return Ok(Caller::Local);
        }
        Ok(Caller::Bearer(
            parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| t.trim().to_string()),
        ))
    }
}

/// Lets the call through if its caller may act with `scope`.
fn authorise(state: &AppState, caller: &Caller, scope: &str) -> Result<(), Box<Response>> {
    match caller {
        Caller::Local => Ok(()),
        Caller::Bearer(None) => Err(Box::new(problem(
            StatusCode::UNAUTHORIZED,
            "Authentication required",
            format!("send `Authorization: Bearer TOKEN`; `commons token create --scope {scope}` makes one"),
            None,
        ))),
        Caller::Bearer(Some(t)) if state.tokens.authorise(t, scope).is_some() => Ok(()),
        Caller::Bearer(Some(_)) => Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "Not allowed",
            format!("this token is unknown, revoked, or lacks the scope {scope}"),
            None,
        ))),
    }
}

#[derive(Deserialize)]
struct IngestParams {
    backfill: Option<String>,
}

#[utoipa::path(
    post, path = "/api/usage/events", tag = "usage",
    params(("backfill" = Option<String>, Query, description = "admit late events as this adjustment")),
    request_body(content = Vec<crate::schema::UsageEvent>, description = "CloudEvents", content_type = "application/json"),
    responses(
        (status = 200, description = "every event accepted or a duplicate", body = Object),
        (status = 400, description = "not a batch of events", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks usage:write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an id seen before with another payload", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "too many events in one batch", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "events too late for their period", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["usage:write"]))
)]
async fn ingest(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(params): Query<IngestParams>,
    body: Bytes,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "usage:write") {
        return *r;
    }
    let events: Vec<Event> = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Malformed events",
                format!("expected a JSON array of CloudEvents: {e}"),
                None,
            )
        }
    };
    if events.len() > 100_000 {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Batch too large",
            "send at most 100,000 events per request",
            None,
        );
    }
    let state2 = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut meter = state2.meter.lock().unwrap_or_else(|p| p.into_inner());
        meter.ingest(&events, params.backfill.as_deref())
    })
    .await;
    let outcomes = match result {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Metering failed",
                e.to_string(),
                None,
            )
        }
        Err(_) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Metering failed",
                "the ingest task stopped",
                None,
            )
        }
    };
    let worst = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Rejected(r) => Some(r.status()),
            _ => None,
        })
        .max_by_key(|s| match s {
            409 => 3,
            422 => 2,
            _ => 1,
        });
    let accepted = outcomes.iter().filter(|o| **o == Outcome::Accepted).count();
    let duplicates = outcomes
        .iter()
        .filter(|o| **o == Outcome::Duplicate)
        .count();
    let body =
        serde_json::json!({ "accepted": accepted, "duplicates": duplicates, "outcomes": outcomes });
    match worst {
        None => (StatusCode::OK, Json(body)).into_response(),
        Some(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
            let title = match code {
                409 => "Conflicting events",
                422 => "Late events",
                _ => "Invalid events",
            };
            let rejected = outcomes.len() - accepted - duplicates;
            problem(
                status,
                title,
                format!(
                    "{rejected} of {} events were rejected; the others were recorded",
                    outcomes.len()
                ),
                Some(body),
            )
        }
    }
}

#[utoipa::path(
    post, path = "/api/payments/stripe/webhook", tag = "payments",
    request_body(content = Object, description = "a Stripe event, signed (Stripe-Signature)", content_type = "application/json"),
    responses(
        (status = 200, description = "handled (or ignored)", body = Object),
        (status = 400, description = "bad signature or payload", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "the webhook is not configured", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "recording the payment failed", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn stripe_webhook(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(stripe) = &state.stripe else {
        return problem(
            StatusCode::NOT_FOUND,
            "Stripe is not configured",
            "set COMMONS_STRIPE_WEBHOOK_SECRET",
            None,
        );
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let event = match stripe.webhook(signature, &body, now_s) {
        Ok(e) => e,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Webhook refused",
                e.to_string(),
                None,
            )
        }
    };
    let state2 = state.clone();
    let handled = tokio::task::spawn_blocking(move || {
        let billing = state2.billing.lock().expect("billing lock");
        let mut journal = state2.journal.lock().expect("journal lock");
        let mut cents = Cents {
            journal: &mut journal,
        };
        billing.handle(&event, &mut cents, now_s * 1000)
    })
    .await;
    match handled {
        Ok(Ok(h)) => (StatusCode::OK, Json(serde_json::json!({ "handled": h }))).into_response(),
        // A failure we can fix by retrying later: Stripe retries on 5xx.
        Ok(Err(e)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Payment not recorded",
            e.to_string(),
            None,
        ),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Payment not recorded",
            "the task stopped",
            None,
        ),
    }
}

#[utoipa::path(
    get, path = "/api/users/{user}/tier", tag = "billing",
    params(("user" = String, Path, description = "user id")),
    responses(
        (status = 200, description = "the user's tier", body = Object),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks billing:read", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "lookup failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["billing:read"]))
)]
async fn tier(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(user): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "billing:read") {
        return *r;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let billing = state.billing.lock().expect("billing lock");
    match billing.current_tier(&user, now) {
        Ok(t) => Json(serde_json::json!({ "user": user, "tier": t })).into_response(),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Tier lookup failed",
            e.to_string(),
            None,
        ),
    }
}

/// Starts an idle site and answers once it is healthy: what the gateway
/// calls on a request for a site that is asleep (scope `runtime:wake`).
#[utoipa::path(
    post, path = "/api/deployments/{name}/wake", tag = "deployments",
    params(("name" = String, Path, description = "deployment name")),
    responses(
        (status = 200, description = "healthy", body = Object),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks runtime:wake", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such deployment", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "it did not wake", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["runtime:wake"]))
)]
async fn wake(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "runtime:wake") {
        return *r;
    }
    match state.engine.wake(&name).await {
        Ok(o) if o.ok => {
            Json(serde_json::json!({ "deployment": name, "woken": o.tasks.len() })).into_response()
        }
        Ok(o) => {
            let errors: Vec<String> = o.tasks.iter().filter_map(|t| t.error.clone()).collect();
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Site did not wake",
                errors.join("; "),
                None,
            )
        }
        Err(e) if e.is_bad_input() => {
            problem(StatusCode::NOT_FOUND, "No such site", e.to_string(), None)
        }
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Site did not wake",
            e.to_string(),
            None,
        ),
    }
}

/// A deployment's components and their states, as `commons status --json`
/// shows them (scope `deployments:read`).
#[utoipa::path(
    get, path = "/api/deployments/{name}", tag = "deployments",
    params(("name" = String, Path, description = "deployment name")),
    responses(
        (status = 200, description = "its components and their states, as `commons status --json`", body = Object),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks deployments:read", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such deployment", body = Problem, content_type = "application/problem+json"),
        (status = 500, description = "the state store failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["deployments:read"]))
)]
async fn deployment_status(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "deployments:read") {
        return *r;
    }
    match state.engine.status(&name) {
        Ok(s) => Json(s).into_response(),
        Err(e) if e.is_bad_input() => {
            problem(StatusCode::NOT_FOUND, "No such site", e.to_string(), None)
        }
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Status unavailable",
            e.to_string(),
            None,
        ),
    }
}

/// The daemon itself: its addresses and what it supervises. Only over the
/// local socket.
#[utoipa::path(
    get, path = "/api/daemon", tag = "platform",
    responses(
        (status = 200, description = "the daemon's addresses and what it supervises (local socket only)", body = Object),
        (status = 403, description = "asked over TCP", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn daemon(State(state): State<Arc<AppState>>, caller: Caller) -> Response {
    if !matches!(caller, Caller::Local) {
        return problem(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "the daemon answers this only over its local socket (`commons daemon status`)",
            None,
        );
    }
    let info = std::fs::read(local::info_path(&state.home))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    let (mut sites, mut running, mut down) = (0, 0, 0);
    for d in state.engine.list().unwrap_or_default() {
        sites += 1;
        if let Ok(s) = state.engine.observe(&d.name) {
            for c in s.components.iter().filter(|c| c.kind == "process") {
                match c.state.as_str() {
                    "running" => running += 1,
                    s if commons_engine::is_down(s) => down += 1,
                    _ => {}
                }
            }
        }
    }
    Json(serde_json::json!({
        "daemon": info,
        "deployments": sites,
        "processes_running": running,
        "processes_down": down,
    }))
    .into_response()
}

/// A store behind a lock is usable unless a request panicked holding it
/// (busy is fine: it answers the next one).
fn usable<T>(store: &Mutex<T>) -> Result<(), String> {
    match store.try_lock() {
        Ok(_) | Err(std::sync::TryLockError::WouldBlock) => Ok(()),
        Err(std::sync::TryLockError::Poisoned(_)) => Err("a request failed holding it".into()),
    }
}

/// Ready to serve: every store answers. 503 with what does not.
#[utoipa::path(
    get, path = "/readyz", tag = "platform",
    responses(
        (status = 200, description = "every store answers", body = Object),
        (status = 503, description = "a store does not", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    let mut check = |name: &str, result: Result<(), String>| {
        ok &= result.is_ok();
        checks.insert(
            name.into(),
            result.err().unwrap_or_else(|| "ok".into()).into(),
        );
    };
    check(
        "state",
        state.engine.list().map(|_| ()).map_err(|e| e.to_string()),
    );
    check("meter", usable(&state.meter));
    check("ledger", usable(&state.journal));
    if ok {
        Json(serde_json::json!({ "ready": true, "checks": checks })).into_response()
    } else {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not ready",
            "a store does not answer; see checks",
            Some(serde_json::json!({ "checks": checks })),
        )
    }
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "platform",
    responses((status = 200, description = "the process answers", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "platform",
    responses((status = 200, description = "the OpenAPI 3.1 description of this API", body = Object)))]
async fn openapi_json() -> Response {
    Json(openapi::document()).into_response()
}

/// The API's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/openapi.json", get(openapi_json))
        .route("/readyz", get(ready))
        .route(
            "/api/usage/events",
            post(ingest).layer(DefaultBodyLimit::max(limits::EVENT_BATCH)),
        )
        .route(
            "/api/payments/stripe/webhook",
            post(stripe_webhook).layer(DefaultBodyLimit::max(limits::WEBHOOK)),
        )
        .route("/api/users/{user}/tier", get(tier))
        .route("/api/deployments/{name}/wake", post(wake))
        .route("/api/deployments/{name}", get(deployment_status))
        .route("/api/daemon", get(daemon))
        .route("/api/signup", post(api::signup))
        .route("/api/login", post(api::login))
        .route("/api/logout", post(api::logout))
        .route("/api/me", get(api::me))
        .route("/api/orgs", get(api::orgs).post(api::create_org))
        .route(
            "/api/orgs/{org}/members",
            get(api::members).put(api::set_members),
        )
        .route("/api/orgs/{org}/audit", get(api::audit))
        .route(
            "/api/orgs/{org}/sites",
            get(api::sites).post(api::create_site.layer(DefaultBodyLimit::max(limits::UPLOAD))),
        )
        .route(
            "/api/orgs/{org}/plan",
            post(api::plan).layer(DefaultBodyLimit::max(limits::UPLOAD)),
        )
        .route("/api/tokens", get(api::tokens).post(api::create_token))
        .route("/api/tokens/{id}", axum::routing::delete(api::revoke_token))
        .route("/api/catalog", get(api::catalog_list))
        .route(
            "/api/sites/{name}",
            get(api::site)
                .put(api::redeploy_site.layer(DefaultBodyLimit::max(limits::UPLOAD)))
                .delete(api::destroy_site),
        )
        .route("/api/sites/{name}/logs", get(api::logs))
        .route("/api/sites/{name}/history", get(api::history))
        .route("/api/sites/{name}/history/diff", get(api::history_diff))
        .route("/api/sites/{name}/backups", post(api::backup))
        .route("/api/orgs/{org}/oidc-clients", post(oidc::register_client))
        .route("/api/me/usage", get(my_usage::usage_json))
        .route("/console/usage", get(my_usage::page))
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
        crate::ApiProblem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
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
