//! Tiers and the caller's subscription.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::{Reply, Who};
use crate::app;
use crate::schema::Problem;
use crate::web::{created, json_body};
use crate::AppState;

/// The tiers on offer and their prices (minor units per 30-day term).
#[utoipa::path(get, path = "/api/billing/tiers", tag = "billing",
    responses((status = 200, description = "`{items: [{name, price}]}`, cheapest first", body = Object)))]
pub async fn tiers(State(state): State<Arc<AppState>>) -> Reply {
    Ok(Json(serde_json::json!({ "items": app::billing::tiers(&state) })).into_response())
}

/// The caller's subscription (null if they never had one).
#[utoipa::path(get, path = "/api/me/subscription", tag = "billing",
    responses(
        (status = 200, description = "`{subscription: {tier, status, term_start_ms, term_end_ms, next_tier} | null}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = [])))]
pub async fn subscription(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let s = app::billing::subscription(&state, &who)?;
    Ok(Json(serde_json::json!({ "subscription": s })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct NewCheckout {
    /// A paid tier of GET /api/billing/tiers.
    tier: String,
}

/// Starts subscribing: a hosted checkout page to send the user to. The
/// subscription starts when the payment provider confirms the payment.
#[utoipa::path(post, path = "/api/me/subscription/checkout", tag = "billing",
    request_body = NewCheckout,
    responses(
        (status = 201, description = "`{id, url}`: the checkout session; send the user to `url`", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
        (status = 409, description = "the caller already subscribes (change the tier instead)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no such tier, or a free one", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the platform takes no card payments, or the payment provider refused", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
pub async fn checkout(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let n: NewCheckout = json_body(&body)?;
    let return_to = format!("{}/console/billing", state.public_base());
    let session = app::billing::checkout(&state, &who, &n.tier, &return_to).await?;
    Ok(created(serde_json::to_value(session).unwrap_or_default()))
}

/// Cancels the caller's subscription: it does not renew, and the tier
/// lasts to the end of the term paid for.
#[utoipa::path(delete, path = "/api/me/subscription", tag = "billing",
    responses(
        (status = 200, description = "`{subscription}`: cancelled, with the term it runs to", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
        (status = 409, description = "no subscription, or one cancelled already", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the payment provider refused or could not be reached", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
pub async fn cancel(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let s = app::billing::cancel(&state, &who).await?;
    Ok(Json(serde_json::json!({ "subscription": s })).into_response())
}

/// Changes the caller's tier: an upgrade at once, its prorated difference
/// charged now; a downgrade from the next renewal, nothing refunded.
#[utoipa::path(put, path = "/api/me/subscription", tag = "billing",
    request_body = NewCheckout,
    responses(
        (status = 200, description = "`{change: {from, to, effective, charge_now}, subscription}`", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
        (status = 409, description = "no running subscription, or already on that tier", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "no such tier, or a free one", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "the payment provider refused or could not be reached", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
pub async fn change(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let n: NewCheckout = json_body(&body)?;
    let (change, s) = app::billing::change(&state, &who, &n.tier).await?;
    Ok(Json(serde_json::json!({ "change": change, "subscription": s })).into_response())
}
