//! The platform's own routes, for its services and operators rather than
//! its users: each takes a bearer token with a scope (or the local socket).
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
//! - `POST /api/periods/{period}/close` — closes a billing period: every
//!   subscriber's escrow is allocated by what they used (scope
//!   `periods:close`); closing twice changes nothing.
//! - `POST /api/payments/manual` — a payment made by hand (scope
//!   `billing:write`); `POST /api/payments/{id}/refund` — gives a payment
//!   back (scope `billing:write`): through Stripe for card payments.
//! - `GET /api/daemon` — the daemon itself, over the local socket only.
//! - `GET /healthz` (alive), `GET /readyz` (every store answers).
//!
//! Errors are RFC 9457 problem JSON; a secret never appears in a response
//! or a log line.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use commons_ledger::cents::Cents;
use commons_ledger::payments::{PaymentEvent, PaymentProvider};
use commons_meter::{Event, Outcome};

use crate::schema::Problem;
use crate::web::problem;
use crate::{local, AppState};

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
        Ok(Caller::Bearer(crate::web::bearer(&parts.headers)))
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
pub(crate) struct IngestParams {
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
pub(crate) async fn ingest(
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
pub(crate) async fn stripe_webhook(
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
    let now_s = commons_clock::now_secs() as i64;
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
    // A payment is for an account of this platform: one for anyone else
    // (a checkout it never started) is refused, and nothing is recorded.
    let customer = match &event {
        PaymentEvent::Paid { user, .. } | PaymentEvent::Refunded { user, .. } => Some(user),
        PaymentEvent::Ignored { .. } => None,
    };
    if let Some(user) = customer {
        match state.accounts.store().user(user) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Unknown customer",
                    format!(
                        "{} names user \"{user}\", who has no account here; nothing was recorded",
                        event.event_id()
                    ),
                    None,
                )
            }
            Err(e) => {
                return problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Payment not recorded",
                    e.to_string(),
                    None,
                )
            }
        }
    }
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
pub(crate) async fn tier(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(user): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "billing:read") {
        return *r;
    }
    let now = commons_clock::now_ms();
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
pub(crate) async fn wake(
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
pub(crate) async fn deployment_status(
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
pub(crate) async fn daemon(State(state): State<Arc<AppState>>, caller: Caller) -> Response {
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
            for c in s
                .components
                .iter()
                .filter(|c| commons_blueprint::Kind::runs(&c.kind))
            {
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
pub(crate) fn usable<T>(store: &Mutex<T>) -> Result<(), String> {
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
pub(crate) async fn ready(State(state): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

/// Closes a billing period in the server, the journal's one writer while
/// it runs.
#[utoipa::path(
    post, path = "/api/periods/{period}/close", tag = "usage",
    params(("period" = String, Path, pattern = r"^2[0-9]{3}-(0[1-9]|1[0-2])$", description = "`YYYY-MM`")),
    responses(
        (status = 200, description = "`{period, policy_version, subscribers, already_closed, tokens_allocated, shares, unknown_sites, paid_out_cents}`", body = Object),
        (status = 400, description = "not a period", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks periods:close", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["periods:close"]))
)]
pub(crate) async fn close_period(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(period): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "periods:close") {
        return *r;
    }
    let state2 = state.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let meter = state2.meter.lock().unwrap_or_else(|p| p.into_inner());
        let mut journal = state2.journal.lock().expect("journal lock");
        crate::periods::close_with(
            &state2.home,
            state2.engine.store_config(),
            &period,
            &meter,
            &mut journal,
        )
    })
    .await;
    match closed {
        Ok(Ok(c)) => Json(c).into_response(),
        Ok(Err(crate::periods::MoneyError::Input(e))) => {
            problem(StatusCode::BAD_REQUEST, "Invalid period", e, None)
        }
        Ok(Err(e)) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Period not closed",
            e.to_string(),
            None,
        ),
        Err(_) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Period not closed",
            "the task stopped",
            None,
        ),
    }
}

/// A payment recorded by hand.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ManualPayment {
    /// The operator's own reference (a bank transfer's): a repeat is harmless.
    reference: String,
    /// The paying user's id.
    user: String,
    /// A paid tier.
    tier: String,
    /// Cents received [default: the tier's price].
    amount: Option<u64>,
    /// Cents the bank kept [default: 0].
    #[serde(default)]
    fee: u64,
}

/// Records a payment made by hand, for platforms that take no cards.
#[utoipa::path(
    post, path = "/api/payments/manual", tag = "billing",
    request_body = ManualPayment,
    responses(
        (status = 201, description = "`{payment_id}`: recorded (again: nothing changed)", body = Object),
        (status = 400, description = "not such a payment", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks billing:write", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no such paid tier or user", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["billing:write"]))
)]
pub(crate) async fn manual_payment(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    body: Bytes,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "billing:write") {
        return *r;
    }
    let p: ManualPayment = match crate::web::json_body(&body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match crate::app::billing::record_manual(
        &state,
        &p.reference,
        &p.user,
        &p.tier,
        p.amount,
        p.fee,
    ) {
        Ok(id) => crate::web::created(serde_json::json!({ "payment_id": id })),
        Err(e) => e.into_response(),
    }
}

/// Gives a payment back before its tokens are allocated.
#[utoipa::path(
    post, path = "/api/payments/{id}/refund", tag = "billing",
    params(("id" = String, Path, description = "the payment's id (a Stripe invoice's, or `manual:REFERENCE`)")),
    responses(
        (status = 200, description = "`{payment_id, amount, status: refunded|requested, provider_refund}`: refunded in the ledger, or asked of Stripe, whose webhook records it", body = Object),
        crate::schema::NoBearer,
        (status = 403, description = "the token lacks billing:write", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such payment", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "refunded already, or its tokens are allocated", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the payment provider refused or could not be reached", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = ["billing:write"]))
)]
pub(crate) async fn refund(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if let Err(r) = authorise(&state, &caller, "billing:write") {
        return *r;
    }
    match crate::app::billing::refund(&state, &id).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}
