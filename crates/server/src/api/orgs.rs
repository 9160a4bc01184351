//! Organisations, their members and their audit log.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::{Reply, Who};
use crate::app;
use crate::schema::Problem;
use crate::web::{created, json_body, Params};
use crate::AppState;

/// The organisations the caller belongs to, with their roles in each.
#[utoipa::path(get, path = "/api/orgs", tag = "organisations",
    responses(
        (status = 200, description = "`{items: [{id, name, roles}]}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = ["orgs:read"])))]
pub async fn orgs(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let items = app::orgs::of_caller(&state, &who)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewOrg {
    /// Lower-case letters, digits and '-', starting with a letter.
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")]
    id: String,
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    name: String,
}

/// Creates an organisation; the caller becomes its admin.
#[utoipa::path(post, path = "/api/orgs", tag = "organisations",
    request_body = NewOrg,
    responses(
        (status = 201, description = "created", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not a user, or the token lacks orgs:write", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the id is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an invalid id", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["orgs:write"])))]
pub async fn create_org(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let n: NewOrg = json_body(&body)?;
    let org = app::orgs::create(&state, &who, &n.id, &n.name)?;
    Ok(created(serde_json::to_value(org).unwrap_or_default()))
}

/// The organisation's members and their roles.
#[utoipa::path(get, path = "/api/orgs/{org}/members", tag = "organisations",
    params(("org" = String, Path, description = "organisation id")),
    responses(
        (status = 200, description = "`{items: [{user_id, email, name, roles}]}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks orgs:read", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
    ), security(("bearer" = ["orgs:read"])))]
pub async fn members(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
) -> Reply {
    let items = app::orgs::members(&state, &who, &org)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct SetRoles {
    #[schema(format = Email)]
    email: String,
    /// admin, operator, provider, developer or custodian; none removes the member.
    #[schema(value_type = Vec<crate::schema::Role>)]
    roles: Vec<String>,
}

/// Gives a user exactly the listed roles in the organisation (an empty
/// list removes them). Admins only; an organisation keeps at least one admin.
#[utoipa::path(put, path = "/api/orgs/{org}/members", tag = "organisations",
    params(("org" = String, Path, description = "organisation id")),
    request_body = SetRoles,
    responses(
        (status = 200, description = "the members now", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not an admin of it, or a CSRF token is missing", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such organisation", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "it would leave no admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an unknown role, or no account has that email", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["orgs:write"])))]
pub async fn set_members(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let s: SetRoles = json_body(&body)?;
    let items = app::orgs::set_roles(&state, &who, &org, &s.email, &s.roles)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize)]
pub struct AuditQuery {
    before: Option<i64>,
    limit: Option<u32>,
}

/// The organisation's audit log, newest first (`?before=SEQ&limit=N`).
#[utoipa::path(get, path = "/api/orgs/{org}/audit", tag = "organisations",
    params(("org" = String, Path, description = "organisation id"),
        ("before" = Option<i64>, Query, description = "entries older than this sequence number"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "at most this many (default 50)")),
    responses(
        (status = 200, description = "`{items, next}`", body = Object),
        crate::schema::BadQuery,
        crate::schema::Unauthenticated,
        (status = 403, description = "neither admin nor custodian of it", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
    ), security(("bearer" = ["audit:read"])))]
pub async fn audit(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    Params(q): Params<AuditQuery>,
) -> Reply {
    let page = app::orgs::audit(&state, &who, &org, q.before, q.limit.unwrap_or(50))?;
    Ok(Json(page).into_response())
}
