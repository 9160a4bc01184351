//! The catalog and sites: list, plan, deploy, redeploy, status, logs,
//! history, back up, destroy.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{Reply, Who};
use crate::app::{self, deploys::Started, sites::NewSite};
use crate::error::{AppError, ErrorKind};
use crate::schema::Problem;
use crate::web::{created, json_body, Params};
use crate::{catalog, AppState};

/// A deploy started: 202, with where to follow it.
fn accepted(started: Started) -> Response {
    let location = format!("/api/sites/{}", started.site.name);
    let mut r = (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "site": started.site, "status": "deploying", "deploy": started.deploy })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

#[derive(Deserialize)]
pub struct LogQuery {
    component: Option<String>,
    lines: Option<u32>,
    after: Option<u64>,
}

/// The catalog's applications.
#[utoipa::path(get, path = "/api/catalog", tag = "sites",
    responses((status = 200, description = "`{items: [{name, summary, project, source}]}`", body = Object)))]
pub async fn catalog_list() -> Response {
    Json(serde_json::json!({ "items": catalog::ENTRIES })).into_response()
}

#[derive(Deserialize)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// One page of the organisation's sites, by name, with each one's last deploy status.
#[utoipa::path(get, path = "/api/orgs/{org}/sites", tag = "sites",
    params(("org" = String, Path, description = "organisation id"),
        ("after" = Option<String>, Query, description = "the `next` cursor of the previous page"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "at most this many (default 50)")),
    responses(
        (status = 200, description = "`{items: [{name, org, created_by, created_ms, status}], next}`", body = Object),
        crate::schema::BadQuery,
        crate::schema::Unauthenticated,
        crate::schema::LacksSitesRead,
        crate::schema::NoSuchOrg,
    ), security(("bearer" = ["sites:read"])))]
pub async fn sites(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    Params(q): Params<PageQuery>,
) -> Reply {
    let page = app::sites::list(
        &state,
        &who,
        &org,
        q.after.as_deref(),
        q.limit.unwrap_or(50),
    )?;
    Ok(Json(page).into_response())
}

/// Deploys a new site owned by the organisation, from the catalog or a
/// blueprint. Answers 202 at once; the site's status follows the deploy.
#[utoipa::path(post, path = "/api/orgs/{org}/sites", tag = "sites",
    params(("org" = String, Path, description = "organisation id")),
    request_body(content = NewSite, description = "one of `catalog`, `blueprint` or `source`"),
    responses(
        (status = 202, description = "`{site, status: deploying, deploy: ID}`: GET /api/sites/{name} follows it (its `deploy`)", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "neither admin nor operator of it; the token lacks sites:write; no CSRF token; a route names a host that is not the organisation's; or the platform is not sandboxed", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
        (status = 409, description = "the name is taken, or a route's host and path are another site's", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an invalid name, blueprint or inputs", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn create_site(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let n: NewSite = json_body(&body)?;
    Ok(accepted(app::sites::create(&state, &who, &org, &n)?))
}

/// Deploys the site again with another blueprint, catalog entry or inputs
/// (its secrets and data kept). Answers 202 at once.
#[utoipa::path(put, path = "/api/sites/{name}", tag = "sites",
    params(("name" = String, Path, description = "site name")),
    request_body(content = NewSite, description = "one of `catalog`, `blueprint` or `source`; the name is the path's"),
    responses(
        (status = 202, description = "`{site, status: deploying, deploy: ID}`: GET /api/sites/{name} follows it (its `deploy`)", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        crate::schema::MayNotChangeSite,
        crate::schema::NoSuchSite,
        crate::schema::RouteTaken,
        (status = 422, description = "an invalid blueprint or inputs", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn redeploy_site(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let n: NewSite = json_body(&body)?;
    Ok(accepted(app::sites::redeploy(&state, &who, &name, n)?))
}

/// What deploying would do, changing nothing.
#[utoipa::path(post, path = "/api/orgs/{org}/plan", tag = "sites",
    params(("org" = String, Path, description = "organisation id")),
    request_body(content = NewSite, description = "as for POST /api/orgs/{org}/sites"),
    responses(
        (status = 200, description = "the plan: each component's action and changed attributes", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "the caller may not deploy in it, or a route names a host that is not the organisation's", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
        (status = 409, description = "the name is another organisation's site, or a route's host and path are another site's", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an invalid name, blueprint or inputs", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn plan(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let n: NewSite = json_body(&body)?;
    Ok(Json(app::sites::plan(&state, &who, &org, &n)?).into_response())
}

/// A site's components and their states, as `commons status --json`.
#[utoipa::path(get, path = "/api/sites/{name}", tag = "sites",
    params(("name" = String, Path, description = "site name")),
    responses(
        (status = 200, description = "`{site, status, deploy}`: its owner, its components' states, and the last deploy started through the API (`{state: running|ok|failed, started_ms, finished_ms?, outcome?, error?}`, or null)", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::LacksSitesRead,
        crate::schema::NoSuchSite,
    ), security(("bearer" = ["sites:read"])))]
pub async fn site(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
) -> Reply {
    let s = app::sites::status(&state, &who, &name)?;
    let deploy = s.deploy.map(|run| {
        let mut v = serde_json::to_value(&run).unwrap_or_default();
        v["state"] = run.state().into();
        v
    });
    Ok(
        Json(serde_json::json!({ "site": s.site, "status": s.now, "deploy": deploy }))
            .into_response(),
    )
}

/// Stops and removes the site and everything it holds.
#[utoipa::path(delete, path = "/api/sites/{name}", tag = "sites",
    params(("name" = String, Path, description = "site name")),
    responses(
        (status = 200, description = "destroyed: what was removed", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::MayNotChangeSite,
        crate::schema::NoSuchSite,
        crate::schema::RouteTaken,
        (status = 500, description = "removing failed", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn destroy_site(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
) -> Reply {
    Ok(Json(app::sites::destroy(&state, &who, &name).await?).into_response())
}

/// What each component printed: its last lines (`?component=C&lines=N`,
/// default 200), or, to follow a log, the lines after an offset an earlier
/// answer gave (`?component=C&after=OFFSET`).
#[utoipa::path(get, path = "/api/sites/{name}/logs", tag = "sites",
    params(("name" = String, Path, description = "site name"),
        ("component" = Option<String>, Query, description = "only this component"),
        ("lines" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "the last N lines of each (default 200)"),
        ("after" = Option<u64>, Query, description = "with `component`: only the lines written after this byte offset (its `offsets` entry in an earlier answer)")),
    responses(
        (status = 200, description = "`{components: {NAME: [line]}, offsets: {NAME: OFFSET}}`", body = Object),
        crate::schema::BadQuery,
        crate::schema::Unauthenticated,
        crate::schema::LacksSitesRead,
        crate::schema::NoSuchSite,
        (status = 422, description = "no such component", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:read"])))]
pub async fn logs(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
    Params(q): Params<LogQuery>,
) -> Reply {
    let logs = app::sites::logs(
        &state,
        &who,
        &name,
        q.component.as_deref(),
        q.lines.unwrap_or(200),
        q.after,
    )?;
    Ok(Json(logs).into_response())
}

/// The site's deployment record, one entry per deploy, oldest first.
#[utoipa::path(get, path = "/api/sites/{name}/history", tag = "sites",
    params(("name" = String, Path, description = "site name")),
    responses(
        (status = 200, description = "`{items: [{revision, commit, time, summary}]}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::LacksSitesRead,
        crate::schema::NoSuchSite,
    ), security(("bearer" = ["sites:read"])))]
pub async fn history(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
) -> Reply {
    let items = app::sites::history(&state, &who, &name)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize)]
pub struct DiffQuery {
    a: String,
    b: String,
}

/// What changed between two deploys of the site: a diff of their records.
#[utoipa::path(get, path = "/api/sites/{name}/history/diff", tag = "sites",
    params(("name" = String, Path, description = "site name"),
        ("a" = String, Query, description = "a revision (1 for the first deploy) or commit"),
        ("b" = String, Query, description = "another")),
    responses(
        (status = 200, description = "`{diff}`: a unified diff of the two records", body = Object),
        (status = 400, description = "a or b is missing", body = Problem, content_type = "application/problem+json"),
        crate::schema::Unauthenticated,
        crate::schema::LacksSitesRead,
        crate::schema::NoSuchSite,
        (status = 422, description = "no such revision", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:read"])))]
pub async fn history_diff(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Ok(Query(q)) = q else {
        return Err(AppError::new(
            ErrorKind::Malformed,
            "Which deploys",
            "give two revisions: ?a=1&b=2",
        ));
    };
    let diff = app::sites::history_diff(&state, &who, &name, &q.a, &q.b)?;
    Ok(Json(serde_json::json!({ "diff": diff })).into_response())
}

/// Backs the site up (data, volumes, databases, record) into the archive.
#[utoipa::path(post, path = "/api/sites/{name}/backups", tag = "sites",
    params(("name" = String, Path, description = "site name")),
    responses(
        (status = 201, description = "`{sha256, bytes, manifest}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::MayNotChangeSite,
        crate::schema::NoSuchSite,
        crate::schema::RouteTaken,
        (status = 500, description = "the backup failed", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn backup(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(name): UrlPath<String>,
) -> Reply {
    let b = app::sites::backup(&state, &who, &name).await?;
    Ok(created(serde_json::json!({
        "sha256": b.sha256,
        "bytes": b.bytes,
        "manifest": b.manifest,
    })))
}
