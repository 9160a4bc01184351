//! A user's API tokens.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use super::{Reply, Who};
use crate::app::{self, tokens::NewToken};
use crate::schema::Problem;
use crate::web::{created, json_body};
use crate::AppState;

/// The caller's API tokens (never their values).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses(
        (status = 200, description = "`{items}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = [])))]
pub async fn tokens(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let items = app::tokens::list(&state, &who)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// Makes an API token: answered once, stored hashed.
#[utoipa::path(post, path = "/api/tokens", tag = "tokens",
    request_body = NewToken,
    responses(
        (status = 201, description = "`{token, record}`: the token is shown only here", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "the caller may not make tokens", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
        (status = 422, description = "an unknown scope", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["tokens:write"])))]
pub async fn create_token(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let n: NewToken = json_body(&body)?;
    let (token, record) = app::tokens::create(&state, &who, &n)?;
    Ok(created(
        serde_json::json!({ "token": token, "record": record }),
    ))
}

/// Revokes one of the caller's tokens.
#[utoipa::path(delete, path = "/api/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        crate::schema::Unauthenticated,
        (status = 403, description = "the caller may not manage tokens", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such live token of yours", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["tokens:write"])))]
pub async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(id): UrlPath<String>,
) -> Reply {
    app::tokens::revoke(&state, &who, &id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
