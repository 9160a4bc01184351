//! Providers' nodes and the platform's placements.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use super::{Reply, Who};
use crate::app::{self, nodes::NewJoinToken};
use crate::nodes::PlaceRequest;
use crate::schema::Problem;
use crate::web::{created, json_body};
use crate::AppState;

/// Makes a single-use join token for the organisation's nodes (a provider's).
#[utoipa::path(post, path = "/api/orgs/{org}/join-tokens", tag = "nodes",
    params(("org" = String, Path, description = "the provider organisation")),
    request_body = NewJoinToken,
    responses(
        (status = 201, description = "the token, shown only here", body = app::nodes::JoinToken),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not an admin or provider of the organisation", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
        (status = 422, description = "a lifetime out of range", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["nodes:write"])))]
pub async fn create_join_token(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let n: NewJoinToken = json_body(&body)?;
    let t = app::nodes::create_join_token(&state, &who, &org, &n)?;
    Ok(created(serde_json::to_value(t).expect("serialisable")))
}

/// The organisation's nodes: state, last heartbeat, sites.
#[utoipa::path(get, path = "/api/orgs/{org}/nodes", tag = "nodes",
    params(("org" = String, Path, description = "the provider organisation")),
    responses(
        (status = 200, description = "`{items}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks nodes:read, or the caller's roles do not permit it", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
    ), security(("bearer" = ["nodes:read"])))]
pub async fn nodes(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
) -> Reply {
    let items = app::nodes::list(&state, &who, &org)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// Revokes a node: its certificates stop working at once.
#[utoipa::path(delete, path = "/api/orgs/{org}/nodes/{id}", tag = "nodes",
    params(("org" = String, Path), ("id" = String, Path, description = "node id")),
    responses(
        (status = 204, description = "revoked"),
        crate::schema::Unauthenticated,
        (status = 403, description = "the token lacks nodes:write, or the caller is not an admin or provider of the organisation", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such node of the organisation", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["nodes:write"])))]
pub async fn revoke_node(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath((org, id)): UrlPath<(String, String)>,
) -> Reply {
    app::nodes::revoke(&state, &who, &org, &id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Every node (the platform's administrator).
#[utoipa::path(get, path = "/api/nodes", tag = "nodes",
    responses(
        (status = 200, description = "`{items}`", body = Object),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn all_nodes(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let items = app::nodes::list_all(&state, &who)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// Assigns one operation of the closed set to a node.
#[utoipa::path(post, path = "/api/nodes/{id}/operations", tag = "nodes",
    params(("id" = String, Path, description = "node id")),
    request_body(content = Object, description = "`{op: apply_site|stop|remove|snapshot|restore|ship_increment|freeze|cut_over|drain, ...}`"),
    responses(
        (status = 202, description = "assigned", body = app::nodes::Assigned),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such node", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "not an operation a node accepts", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn assign(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let op: serde_json::Value = json_body(&body)?;
    let a = app::nodes::assign(&state, &who, &id, op)?;
    Ok((StatusCode::ACCEPTED, Json(a)).into_response())
}

/// Places a site among the nodes; with `dry_run`, says only where it would
/// go and why (every node's verdict).
#[utoipa::path(post, path = "/api/placements", tag = "nodes",
    request_body = PlaceRequest,
    responses(
        (status = 200, description = "the decision: `{site, node, verdicts}`", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the name is a site on the control plane's own machine", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "the blueprint does not load", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn place(State(state): State<Arc<AppState>>, Who(who): Who, body: Bytes) -> Reply {
    let req: PlaceRequest = json_body(&body)?;
    let state2 = state.clone();
    let decision = tokio::task::spawn_blocking(move || app::nodes::place(&state2, &who, req))
        .await
        .map_err(|e| {
            crate::AppError::new(crate::ErrorKind::Internal, "Placement", e.to_string())
        })??;
    Ok(Json(decision).into_response())
}

/// The node a site moves to.
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveTo {
    /// A node id, or a provider (its best node for the site).
    pub to: String,
}

/// Moves a placed site with its data to another node; requests wait
/// rather than fail meanwhile. Answers at once; the move runs on.
#[utoipa::path(post, path = "/api/placements/{site}/move", tag = "nodes",
    params(("site" = String, Path)),
    request_body = MoveTo,
    responses(
        (status = 202, description = "the move started", body = app::nodes::MoveStarted),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "the site is not placed on a node", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "moving already, there already, or it does not fit there", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn move_site(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(site): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let m: MoveTo = json_body(&body)?;
    let started = app::nodes::move_site(&state, &who, &site, &m.to)?;
    Ok((StatusCode::ACCEPTED, Json(started)).into_response())
}

/// Confirms a site's move: the nodes it left remove their stopped copies.
#[utoipa::path(post, path = "/api/placements/{site}/confirm", tag = "nodes",
    params(("site" = String, Path)),
    responses(
        (status = 200, description = "the nodes told to remove their copies", body = app::nodes::Confirmed),
        crate::schema::Unauthenticated,
        (status = 403, description = "not the platform's administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "the site is not placed on a node", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "the site is still moving", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["admin"])))]
pub async fn confirm_move(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(site): UrlPath<String>,
) -> Reply {
    Ok(Json(app::nodes::confirm_move(&state, &who, &site)?).into_response())
}
