//! The account-facing API: sign-up and log-in, organisations and their
//! members, API tokens, the catalog, and sites — deploy, plan, status, logs,
//! history, backups, destroy — each authorised against the caller's roles
//! (`accounts::Accounts::allow`) and recorded in the audit log.
//!
//! Lists paginate by name: `?limit=N&after=NAME`, answered with `next`, the
//! cursor of the following page (absent on the last).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use commons_store::accounts::{AuditEntry, SiteRow};

use crate::accounts::{now_ms, valid_slug, Action, Member, Principal, CSRF_HEADER, SESSION_COOKIE};
use crate::schema::Problem;
use crate::{catalog, ApiProblem, AppState};

type Reply = Result<Response, ApiProblem>;

/// The caller, authenticated: the local socket, a bearer token (a user's
/// `cmnu_` token or the platform's `admin` token), or a session cookie —
/// which, for anything but GET and HEAD, must come with the session's CSRF
/// token in `X-CSRF-Token`.
pub struct Who(pub Principal);

impl FromRequestParts<Arc<AppState>> for Who {
    type Rejection = ApiProblem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Who, ApiProblem> {
        if parts
            .extensions
            .get::<crate::local::LocalCaller>()
            .is_some()
        {
            return Ok(Who(Principal::Platform));
        }
        let unauthenticated = || {
            ApiProblem::new(
                StatusCode::UNAUTHORIZED,
                "Authentication required",
                "log in (POST /api/login) or send `Authorization: Bearer TOKEN`",
            )
        };
        if let Some(token) = bearer(parts) {
            if token.starts_with(crate::accounts::USER_TOKEN_PREFIX) {
                return match state.accounts.by_token(&token)? {
                    Some(m) => Ok(Who(Principal::User(Box::new(m)))),
                    None => Err(ApiProblem::new(
                        StatusCode::UNAUTHORIZED,
                        "Unknown token",
                        "this token is unknown or revoked; make a new one",
                    )),
                };
            }
            return match state.tokens.authorise(&token, "admin") {
                Some(_) => Ok(Who(Principal::Platform)),
                None => Err(ApiProblem::new(
                    StatusCode::UNAUTHORIZED,
                    "Unknown token",
                    "this token is unknown, revoked, or not the platform's admin token",
                )),
            };
        }
        let Some(cookie) = session_cookie(&parts.headers) else {
            return Err(unauthenticated());
        };
        let Some(member) = state.accounts.by_session(&cookie)? else {
            return Err(unauthenticated());
        };
        if !matches!(parts.method, Method::GET | Method::HEAD) {
            let sent = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if !same_secret(sent, member.csrf.as_deref()) {
                return Err(ApiProblem::new(
                    StatusCode::FORBIDDEN,
                    "CSRF token missing or wrong",
                    "send the session's CSRF token (from POST /api/login or GET /api/me) in X-CSRF-Token",
                ));
            }
        }
        Ok(Who(Principal::User(Box::new(member))))
    }
}

/// Whether two secrets (CSRF tokens, hashes of client secrets) are equal,
/// compared in constant time.
pub fn same_secret(sent: Option<&str>, expected: Option<&str>) -> bool {
    match (sent, expected) {
        (Some(a), Some(b)) if a.len() == b.len() => {
            a.bytes()
                .zip(b.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
        }
        _ => false,
    }
}

fn bearer(parts: &axum::http::request::Parts) -> Option<String> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(|t| t.trim().to_string())
}

/// The value of the session cookie, if the request carries one.
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value of a session; `Secure` unless the platform is
/// reached on a loopback address over plain HTTP (a local install).
pub fn session_set_cookie(value: &str, max_age_s: i64, host: Option<&str>) -> HeaderValue {
    let local = host.is_some_and(|h| {
        let h = h.rsplit_once(':').map_or(h, |(a, _)| a);
        matches!(h, "127.0.0.1" | "localhost" | "[::1]")
    });
    let secure = if local { "" } else { "; Secure" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age_s}{secure}"
    ))
    .expect("cookie values are ASCII")
}

/// Query parameters: ones that do not parse are a 400 problem document
/// (axum's own rejection is plain text).
pub struct Params<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = ApiProblem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Params<T>, ApiProblem> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| ApiProblem::new(StatusCode::BAD_REQUEST, "Invalid query", e.body_text()))
    }
}

/// A count given in a query, from 1 to `max`.
fn in_range(name: &str, value: u32, max: u32) -> Result<u32, ApiProblem> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "Invalid query",
            format!("`{name}` is {value}; give 1 to {max}"),
        ))
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiProblem> {
    serde_json::from_slice(body).map_err(|e| {
        ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "Malformed request body",
            format!("expected a JSON object as documented: {e}"),
        )
    })
}

fn member(who: &Principal) -> Result<&Member, ApiProblem> {
    match who {
        Principal::User(m) => Ok(m),
        Principal::Platform => Err(ApiProblem::new(
            StatusCode::FORBIDDEN,
            "Not a user",
            "the platform's administrator has no account of its own; sign up or log in as a user",
        )),
    }
}

pub fn engine_failed(e: commons_engine::EngineError) -> ApiProblem {
    if e.is_bad_input() {
        ApiProblem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid request",
            e.to_string(),
        )
    } else {
        ApiProblem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The engine failed",
            e.to_string(),
        )
    }
}

fn created(body: serde_json::Value) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

// --- sign-up, log-in -----------------------------------------------------

#[derive(Deserialize, utoipa::ToSchema)]
struct Signup {
    #[schema(format = Email)]
    email: String,
    /// The name shown to others.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    name: String,
    #[schema(min_length = 10, max_length = 1024)]
    password: String,
}

/// Creates an account and an organisation of its own (its admin).
#[utoipa::path(post, path = "/api/signup", tag = "accounts",
    request_body = Signup,
    responses(
        (status = 201, description = "the account and its organisation", body = Object),
        crate::schema::Malformed,
        (status = 409, description = "the email has an account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "an invalid email, name or password", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn signup(State(state): State<Arc<AppState>>, body: Bytes) -> Reply {
    let s: Signup = json_body(&body)?;
    let (user, org) = state.accounts.signup(&s.email, &s.name, &s.password)?;
    Ok(created(serde_json::json!({ "user": user, "org": org })))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct Login {
    #[schema(format = Email)]
    email: String,
    password: String,
}

/// Opens a session: sets the session cookie and answers the CSRF token that
/// changes made with it must send.
#[utoipa::path(post, path = "/api/login", tag = "accounts",
    request_body = Login,
    responses(
        (status = 200, description = "logged in; the session cookie is set", body = Object),
        crate::schema::Malformed,
        (status = 401, description = "wrong email or password", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "too many failed log-ins; see Retry-After", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(state): State<Arc<AppState>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Reply {
    let l: Login = json_body(&body)?;
    let address = client_address(peer.map(|p| p.0 .0), &headers, &state.trusted_proxies);
    let (cookie, session, user) = state.accounts.login(&l.email, &l.password, &address)?;
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let mut r = Json(serde_json::json!({ "user": user, "csrf": session.csrf })).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session_set_cookie(&cookie, crate::accounts::SESSION_MS / 1000, host),
    );
    Ok(r)
}

/// The client's address, as the log-in limiters key on it: the peer's,
/// unless the peer is a trusted proxy, whose `X-Forwarded-For` then names
/// the client (its rightmost address that is not itself a trusted proxy:
/// what a client wrote further left is not believed).
pub fn client_address(
    peer: Option<SocketAddr>,
    headers: &axum::http::HeaderMap,
    trusted: &[std::net::IpAddr],
) -> String {
    let Some(peer) = peer.map(|p| p.ip().to_canonical()) else {
        return String::new();
    };
    if !trusted.contains(&peer) {
        return peer.to_string();
    }
    let hops: Vec<std::net::IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    hops.into_iter()
        .rev()
        .find(|ip| !trusted.contains(ip))
        .unwrap_or(peer)
        .to_string()
}

/// Ends the session the cookie names (if any) and clears the cookie.
#[utoipa::path(post, path = "/api/logout", tag = "accounts",
    responses((status = 204, description = "logged out")))]
pub async fn logout(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Reply {
    let (parts, _) = request.into_parts();
    if let Some(cookie) = session_cookie(&parts.headers) {
        state.accounts.logout(&cookie)?;
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, session_set_cookie("", 0, host));
    Ok(r)
}

/// The caller's account, roles and (for a session) CSRF token.
#[utoipa::path(get, path = "/api/me", tag = "accounts",
    responses(
        (status = 200, description = "the caller's account and roles", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = [])))]
pub async fn me(Who(who): Who) -> Reply {
    let m = member(&who)?;
    Ok(Json(serde_json::json!({
        "user": m.user,
        "roles": m.roles,
        "csrf": m.csrf,
        "scopes": m.scopes,
    }))
    .into_response())
}

// --- organisations ---------------------------------------------------------

/// The organisations the caller belongs to, with their roles in each.
#[utoipa::path(get, path = "/api/orgs", tag = "organisations",
    responses(
        (status = 200, description = "`{items: [{id, name, roles}]}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = ["orgs:read"])))]
pub async fn orgs(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let m = member(&who)?;
    let mut by_org: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in &m.roles {
        if m.token_org.as_deref().is_none_or(|o| o == r.org) {
            by_org.entry(&r.org).or_default().push(&r.role);
        }
    }
    let mut items = Vec::new();
    for (id, roles) in by_org {
        let org = state.accounts.store().org(id)?;
        items.push(serde_json::json!({
            "id": id,
            "name": org.map(|o| o.name),
            "roles": roles,
        }));
    }
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
    let m = member(&who)?;
    if !who.has_scope("orgs:write") {
        return Err(ApiProblem::new(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "this token lacks the scope orgs:write",
        ));
    }
    let n: NewOrg = json_body(&body)?;
    match state.accounts.create_org(&m.user, &n.id, &n.name)? {
        Some(org) => Ok(created(serde_json::to_value(org).unwrap_or_default())),
        None => Err(ApiProblem::new(
            StatusCode::CONFLICT,
            "Organisation id taken",
            format!("\"{}\" is taken; choose another id", n.id),
        )),
    }
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
    known_org(&state, &org)?;
    state.accounts.allow(&who, &org, Action::ReadOrg)?;
    let rows = state.accounts.store().members(&org)?;
    members_json(&state, rows)
}

fn members_json(state: &AppState, rows: Vec<commons_store::accounts::MemberRow>) -> Reply {
    let mut by_user: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        by_user.entry(r.user_id).or_default().push(r.role);
    }
    let mut items = Vec::new();
    for (id, roles) in by_user {
        let user = state.accounts.store().user(&id)?;
        items.push(serde_json::json!({
            "user_id": id,
            "email": user.as_ref().map(|u| &u.email),
            "name": user.as_ref().map(|u| &u.name),
            "roles": roles,
        }));
    }
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

pub fn known_org(state: &AppState, org: &str) -> Result<(), ApiProblem> {
    match state.accounts.store().org(org)? {
        Some(_) => Ok(()),
        None => Err(ApiProblem::new(
            StatusCode::NOT_FOUND,
            "No such organisation",
            format!("there is no organisation \"{org}\""),
        )),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
struct SetRoles {
    #[schema(format = Email)]
    email: String,
    /// admin, operator, provider, developer or custodian; none removes the member.
    #[schema(value_type = Vec<Role>)]
    roles: Vec<String>,
}

/// What a user's token may do.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described: scopes arrive as strings
#[schema(value_type = String, pattern = "^(sites:read|sites:write|orgs:read|orgs:write|audit:read|tokens:write)$")]
struct Scope(String);

/// A role in an organisation.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described: roles arrive as strings
#[schema(value_type = String, pattern = "^(admin|operator|provider|developer|custodian)$")]
struct Role(String);

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
    known_org(&state, &org)?;
    state.accounts.allow(&who, &org, Action::ManageMembers)?;
    let s: SetRoles = json_body(&body)?;
    let rows = state.accounts.set_roles(&who, &org, &s.email, &s.roles)?;
    members_json(&state, rows)
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
    known_org(&state, &org)?;
    state.accounts.allow(&who, &org, Action::ReadAudit)?;
    let limit = in_range("limit", q.limit.unwrap_or(50), 500)?;
    let items = state.accounts.store().audit(Some(&org), q.before, limit)?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|a| a.seq))
        .flatten();
    Ok(Json(serde_json::json!({ "items": items, "next": next })).into_response())
}

// --- tokens ------------------------------------------------------------------

/// The caller's API tokens (never their values).
#[utoipa::path(get, path = "/api/tokens", tag = "tokens",
    responses(
        (status = 200, description = "`{items}`", body = Object),
        crate::schema::Unauthenticated,
        crate::schema::AdminHasNoAccount,
    ), security(("bearer" = [])))]
pub async fn tokens(State(state): State<Arc<AppState>>, Who(who): Who) -> Reply {
    let m = member(&who)?;
    let mut items = state.accounts.store().tokens(&m.user.id)?;
    // A token limited to an organisation sees only that organisation's.
    if let Some(org) = &m.token_org {
        items.retain(|t| t.org.as_ref() == Some(org));
    }
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewToken {
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    name: String,
    #[schema(value_type = Vec<Scope>, min_items = 1)]
    scopes: Vec<String>,
    /// Only this organisation's sites.
    org: Option<String>,
}

fn may_manage_tokens(who: &Principal) -> Result<&Member, ApiProblem> {
    let m = member(who)?;
    if !who.has_scope("tokens:write") {
        return Err(ApiProblem::new(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "this token lacks the scope tokens:write",
        ));
    }
    Ok(m)
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
    let m = may_manage_tokens(&who)?;
    let n: NewToken = json_body(&body)?;
    if let Some(org) = &n.org {
        // A token limited to an organisation makes tokens for it alone.
        let outside_token = m.token_org.as_ref().is_some_and(|t| t != org);
        if !m.roles.iter().any(|r| &r.org == org) || outside_token {
            return Err(ApiProblem::new(
                StatusCode::NOT_FOUND,
                "No such organisation",
                format!("you are not a member of \"{org}\" (or this token is not for it)"),
            ));
        }
    }
    // A token can only be as narrow as, or narrower than, the one making it.
    let org = n.org.as_deref().or(m.token_org.as_deref());
    if let Some(s) = n.scopes.iter().find(|s| !who.has_scope(s)) {
        return Err(ApiProblem::new(
            StatusCode::FORBIDDEN,
            "Not allowed",
            format!("a token cannot grant {s}, which the token making it lacks"),
        ));
    }
    let (token, record) = state
        .accounts
        .create_token(&m.user, &n.name, &n.scopes, org)?;
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
    let m = may_manage_tokens(&who)?;
    // A token limited to an organisation revokes only that organisation's.
    let in_reach = match &m.token_org {
        None => true,
        Some(org) => state
            .accounts
            .store()
            .tokens(&m.user.id)?
            .iter()
            .any(|t| t.id == id && t.org.as_ref() == Some(org)),
    };
    if in_reach && state.accounts.revoke_token(&m.user, &id)? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiProblem::new(
            StatusCode::NOT_FOUND,
            "No such token",
            format!("you have no live token \"{id}\""),
        ))
    }
}

// --- catalog and sites -------------------------------------------------------

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
    known_org(&state, &org)?;
    state.accounts.allow(&who, &org, Action::ReadSites)?;
    let limit = in_range("limit", q.limit.unwrap_or(50), 1000)?;
    let rows = state
        .accounts
        .store()
        .sites(&org, q.after.as_deref(), limit)?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|r| r.name.clone()))
        .flatten();
    let names: Vec<String> = rows.iter().map(|r| r.name.clone()).collect();
    let statuses = state.engine.store().statuses(&names)?;
    let items: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let status = statuses.get(&r.name).cloned();
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            v["status"] = status.into();
            v
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items, "next": next })).into_response())
}

/// What to deploy as a new site.
#[derive(Deserialize, serde::Serialize, Default, utoipa::ToSchema)]
pub struct NewSite {
    /// Required for a new site; a redeploy takes it from the path.
    #[serde(default)]
    #[schema(pattern = "^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")]
    pub name: String,
    /// A catalog entry's name...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catalog: Option<String>,
    /// ...or a blueprint's YAML...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blueprint: Option<String>,
    /// ...or a blueprint with the files it needs (its includes, what its
    /// static components serve).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The blueprint's inputs, by name.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    #[schema(value_type = Option<crate::schema::Hosting>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosting: Option<commons_engine::Hosting>,
}

/// A blueprint's files, as `commons deploy` sends them to a remote platform.
#[derive(Deserialize, serde::Serialize, Default, utoipa::ToSchema)]
pub struct Source {
    /// The root blueprint file, one of `files`.
    pub root: String,
    /// Relative path (`/`-separated, no `..`) → content, base64.
    pub files: BTreeMap<String, String>,
}

/// A blueprint sent through the API could not be written down.
fn cannot_store(e: std::io::Error) -> ApiProblem {
    ApiProblem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Cannot store the blueprint",
        e.to_string(),
    )
}

/// Writes `source` under `dir` (emptied first); returns the root file's path.
fn unpack_source(dir: &std::path::Path, source: &Source) -> Result<std::path::PathBuf, ApiProblem> {
    use base64::Engine as _;
    let bad = |detail: String| {
        ApiProblem::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid source", detail)
    };
    // Every path stays inside `dir`: plain names only, no `..`, no root.
    let safe = |rel: &str| -> Result<std::path::PathBuf, ApiProblem> {
        let p = std::path::Path::new(rel);
        // What a filesystem takes: names of up to 255 bytes, no NUL.
        if rel.len() > 1024 || rel.contains('\0') || rel.split('/').any(|n| n.len() > 255) {
            return Err(bad(format!(
                "\"{}\" is not a file name this platform can store: names are at most 255 bytes \
                 (paths 1024), without NUL",
                rel.chars().take(80).collect::<String>().escape_default()
            )));
        }
        let plain = !rel.is_empty()
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if plain {
            Ok(dir.join(p))
        } else {
            Err(bad(format!(
                "\"{rel}\" is not a relative path inside the blueprint's directory"
            )))
        }
    };
    if !source.files.contains_key(&source.root) {
        return Err(bad(format!(
            "the root \"{}\" is not one of the files sent",
            source.root
        )));
    }
    let mut decoded = Vec::with_capacity(source.files.len());
    for (rel, b64) in &source.files {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| bad(format!("\"{rel}\" is not base64: {e}")))?;
        decoded.push((safe(rel)?, bytes));
    }
    let _ = std::fs::remove_dir_all(dir);
    crate::private_dir(dir).map_err(cannot_store)?;
    for (path, bytes) in decoded {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(cannot_store)?;
        }
        std::fs::write(&path, bytes).map_err(cannot_store)?;
    }
    safe(&source.root)
}

/// Finds the blueprint a request names and settles its inputs.
fn site_target(state: &AppState, n: &NewSite) -> Result<commons_engine::Target, ApiProblem> {
    if !valid_slug(&n.name) {
        return Err(ApiProblem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid site name",
            format!("\"{}\" is not a site name: use lower-case letters, digits and '-', starting with a letter", n.name),
        ));
    }
    let uploads = state.engine.layout.upload_dir(&n.name);
    let path = match (&n.catalog, &n.blueprint, &n.source) {
        (Some(c), None, None) => catalog::materialize(&state.home, c).map_err(|e| {
            ApiProblem::new(StatusCode::UNPROCESSABLE_ENTITY, "Unknown catalog entry", e)
        })?,
        (None, Some(yaml), None) => {
            let _ = std::fs::remove_dir_all(&uploads);
            crate::private_dir(&uploads).map_err(cannot_store)?;
            let path = uploads.join(commons_blueprint::FILE_NAME);
            commons_runtime::layout::write_whole(&path, yaml.as_bytes()).map_err(cannot_store)?;
            path
        }
        (None, None, Some(source)) => unpack_source(&uploads, source)?,
        _ => {
            return Err(ApiProblem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "What to deploy",
                "give one of `catalog` (an entry of GET /api/catalog), `blueprint` (its YAML) \
                 or `source` (`{root, files}`: a blueprint and the files it needs)",
            ))
        }
    };
    let inputs: Vec<(String, String)> = n.inputs.clone().into_iter().collect();
    // A blueprint someone sent reads nothing outside what they sent.
    if n.catalog.is_none() {
        // Sandboxed, the site's own user reads its files, and no other.
        if commons_runtime::sandbox::enabled() {
            use commons_runtime::sandbox;
            sandbox::uid_for(&state.home, &n.name)
                .and_then(|uid| sandbox::give_tree(&uploads, uid))
                .and_then(|_| match uploads.parent() {
                    // Up to it, passable; the site's directory itself stays
                    // its user's alone (0700).
                    Some(parent) => sandbox::traversable(&state.home, parent),
                    None => Ok(()),
                })
                .map_err(cannot_store)?;
        }
        return state
            .engine
            .target_confined(&path, &uploads, Some(&n.name), &inputs)
            .map_err(engine_failed);
    }
    state
        .engine
        .target(Some(&path.to_string_lossy()), Some(&n.name), &inputs)
        .map_err(engine_failed)
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
    deploy_new_site(&state, &who, &org, &n).await
}

/// Sites that come from users run sandboxed: unsandboxed, a workload runs
/// as the platform's own user and could read its keys. Only the platform's
/// administrator deploys then, unless the platform is explicitly one
/// person's (`COMMONS_SINGLE_USER=1`).
fn may_run_code_of(who: &Principal) -> Result<(), ApiProblem> {
    let sandboxed = commons_runtime::sandbox::enabled();
    if sandboxed || commons_runtime::sandbox::single_user() || matches!(who, Principal::Platform) {
        return Ok(());
    }
    Err(ApiProblem::new(
        StatusCode::FORBIDDEN,
        "Sandbox required",
        "this platform runs workloads unsandboxed, so it takes sites from its administrator \
         only; run `commons serve` as root with COMMONS_SANDBOX=1 (or, on your own machine, \
         COMMONS_SINGLE_USER=1)",
    ))
}

/// Deploys `n` as a new site of `org`, if `who` may.
pub async fn deploy_new_site(
    state: &Arc<AppState>,
    who: &Principal,
    org: &str,
    n: &NewSite,
) -> Reply {
    known_org(state, org)?;
    state.accounts.allow(who, org, Action::WriteSites)?;
    may_run_code_of(who)?;
    let taken = || {
        ApiProblem::new(
            StatusCode::CONFLICT,
            "Site name taken",
            format!("a site named \"{}\" exists; choose another name", n.name),
        )
    };
    if state.engine.store().deployment(&n.name)?.is_some() {
        return Err(taken());
    }
    let target = site_target(state, n)?;
    crate::hosts::check(state, org, &target)?;
    let now = now_ms();
    let site = SiteRow {
        name: n.name.clone(),
        org: org.into(),
        created_by: who.actor(),
        created_ms: now,
    };
    let entry = AuditEntry {
        at_ms: now,
        actor: who.actor(),
        org: Some(org.into()),
        action: "site.create".into(),
        target: n.name.clone(),
        detail: serde_json::json!({ "catalog": n.catalog, "inputs": n.inputs }),
    };
    if !state.accounts.store().create_site(&site, &entry)? {
        return Err(taken());
    }
    Ok(start_deploy(state, who, org, target, n.hosting, site))
}

/// A deploy the API started: running until `finished_ms` is set, then its
/// outcome (as `commons deploy --json` prints it) or why it could not run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeployRun {
    /// Counts up with every deploy this server starts.
    pub id: u64,
    pub started_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<commons_engine::Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeployRun {
    /// `running`, `ok` or `failed`.
    pub fn state(&self) -> &'static str {
        match (&self.finished_ms, &self.outcome) {
            (None, _) => "running",
            (Some(_), Some(o)) if o.ok => "ok",
            _ => "failed",
        }
    }
}

fn deploy_json(state: &AppState, name: &str) -> serde_json::Value {
    let deploys = state.deploys.lock().unwrap_or_else(|e| e.into_inner());
    match deploys.get(name) {
        Some(run) => {
            let mut v = serde_json::to_value(run).unwrap_or_default();
            v["state"] = run.state().into();
            v
        }
        None => serde_json::Value::Null,
    }
}

/// Runs the deploy of `target` in the background, recording its outcome in
/// the audit log and in [`AppState::deploys`]; answers 202 with where to
/// follow it.
fn start_deploy(
    state: &Arc<AppState>,
    who: &Principal,
    org: &str,
    target: commons_engine::Target,
    hosting: Option<commons_engine::Hosting>,
    site: SiteRow,
) -> Response {
    let (state2, actor, org2) = (state.clone(), who.actor(), org.to_string());
    let location = format!("/api/sites/{}", target.name);
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let started_ms = now_ms();
    let run = DeployRun {
        id,
        started_ms,
        finished_ms: None,
        outcome: None,
        error: None,
    };
    state
        .deploys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(target.name.clone(), run);
    tokio::spawn(async move {
        let outcome = state2
            .engine
            .deploy(&target, 4, &commons_engine::apply::Quiet)
            .await;
        let finished = DeployRun {
            id,
            started_ms,
            finished_ms: Some(now_ms()),
            outcome: outcome.as_ref().ok().cloned(),
            error: outcome.as_ref().err().map(|e| e.to_string()),
        };
        // Hosting is kept per deployment, so it is set once the deploy recorded one.
        if let Some(h) = hosting {
            let _ = state2.engine.set_hosting(&target.name, h);
        }
        let detail = match &outcome {
            Ok(o) => serde_json::json!({ "ok": o.ok }),
            Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
        };
        let _ = state2.accounts.store().record(&AuditEntry {
            at_ms: now_ms(),
            actor,
            org: Some(org2),
            action: "site.deploy".into(),
            target: target.name.clone(),
            detail,
        });
        // Last, so a client that sees it finished also finds it audited.
        let mut deploys = state2.deploys.lock().unwrap_or_else(|e| e.into_inner());
        // A newer deploy of the same site may have started meanwhile.
        if deploys.get(&target.name).map(|r| r.id) == Some(id) {
            deploys.insert(target.name.clone(), finished);
        }
    });
    let mut r = (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "site": site, "status": "deploying", "deploy": id })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
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
    let Some(site) = site_for(&state, &who, &name, Action::WriteSites)? else {
        return Err(ApiProblem::new(
            StatusCode::NOT_FOUND,
            "No such site",
            format!("\"{name}\" belongs to no organisation; deploy it with `commons deploy`"),
        ));
    };
    may_run_code_of(&who)?;
    let mut n: NewSite = json_body(&body)?;
    n.name = name;
    let target = site_target(&state, &n)?;
    let org = site.org.clone();
    crate::hosts::check(&state, &org, &target)?;
    Ok(start_deploy(&state, &who, &org, target, n.hosting, site))
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
    Ok(Json(plan_site(&state, &who, &org, &n)?).into_response())
}

/// What deploying `n` in `org` would do, if `who` may deploy there.
pub fn plan_site(
    state: &AppState,
    who: &Principal,
    org: &str,
    n: &NewSite,
) -> Result<commons_engine::plan::Plan, ApiProblem> {
    known_org(state, org)?;
    state.accounts.allow(who, org, Action::WriteSites)?;
    if let Some(site) = state.accounts.store().site(&n.name)? {
        if site.org != org {
            return Err(ApiProblem::new(
                StatusCode::CONFLICT,
                "Site name taken",
                format!("a site named \"{}\" exists; choose another name", n.name),
            ));
        }
    }
    let target = site_target(state, n)?;
    crate::hosts::check(state, org, &target)?;
    state.engine.plan(&target).map_err(engine_failed)
}

/// The site, if the caller may `action` it: 404 for anyone outside its
/// organisation, so other organisations' sites stay unseen.
pub fn site_for(
    state: &AppState,
    who: &Principal,
    name: &str,
    action: Action,
) -> Result<Option<SiteRow>, ApiProblem> {
    let site = state.accounts.store().site(name)?;
    let unseen = || {
        ApiProblem::new(
            StatusCode::NOT_FOUND,
            "No such site",
            format!("there is no site \"{name}\" in your organisations"),
        )
    };
    match (&site, who) {
        // An outsider learns no more than of a site that does not exist.
        (Some(s), _) => state.accounts.allow(who, &s.org, action).map_err(|p| {
            if p.status == StatusCode::NOT_FOUND {
                unseen()
            } else {
                p
            }
        })?,
        // Sites made with the CLI have no organisation: the platform's own.
        (None, Principal::Platform) => {}
        (None, Principal::User(_)) => return Err(unseen()),
    }
    Ok(site)
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
    let site = site_for(&state, &who, &name, Action::ReadSites)?;
    let status = match state.engine.status(&name) {
        Ok(s) => serde_json::to_value(s).unwrap_or_default(),
        // Owned, not deployed yet (the deploy has not recorded anything).
        Err(e) if e.is_bad_input() && site.is_some() => {
            serde_json::json!({ "status": "deploying" })
        }
        Err(e) if e.is_bad_input() => {
            return Err(ApiProblem::new(
                StatusCode::NOT_FOUND,
                "No such site",
                e.to_string(),
            ))
        }
        Err(e) => return Err(engine_failed(e)),
    };
    let deploy = deploy_json(&state, &name);
    Ok(
        Json(serde_json::json!({ "site": site, "status": status, "deploy": deploy }))
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
    let site = site_for(&state, &who, &name, Action::WriteSites)?;
    let outcome = state
        .engine
        .destroy(&name, 4, &commons_engine::apply::Quiet)
        .await;
    let (ok, body) = match outcome {
        Ok(o) => (o.ok, serde_json::to_value(&o).unwrap_or_default()),
        // Never deployed (or already gone): only the ownership row is left.
        Err(e) if e.is_bad_input() && site.is_some() => (
            true,
            serde_json::json!({ "deployment": name, "ok": true, "tasks": [] }),
        ),
        Err(e) if e.is_bad_input() => {
            return Err(ApiProblem::new(
                StatusCode::NOT_FOUND,
                "No such site",
                e.to_string(),
            ))
        }
        Err(e) => return Err(engine_failed(e)),
    };
    let entry = AuditEntry {
        at_ms: now_ms(),
        actor: who.actor(),
        org: site.as_ref().map(|s| s.org.clone()),
        action: "site.delete".into(),
        target: name.clone(),
        detail: serde_json::json!({ "ok": ok }),
    };
    if ok {
        state
            .deploys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        state.accounts.store().delete_site(&name, &entry)?;
    } else {
        state.accounts.store().record(&entry)?;
    }
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
pub struct LogQuery {
    component: Option<String>,
    lines: Option<u32>,
    after: Option<u64>,
}

/// The most of a log one answer reads.
const LOG_WINDOW: u64 = 1 << 20;

/// Lines of the log at `path`: the last `n` (from its last MiB), or, with
/// `after`, the complete lines written after that byte offset (a MiB of
/// them at most; from the start again if the log was cut shorter). Also the
/// offset just past the last complete line read: where to go on from.
fn log_lines(path: &std::path::Path, n: usize, after: Option<u64>) -> (Vec<String>, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return (Vec::new(), 0);
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = match after {
        Some(a) if a <= len => a,
        Some(_) => 0,
        None => len.saturating_sub(LOG_WINDOW),
    };
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err()
        || (&mut file).take(LOG_WINDOW).read_to_end(&mut buf).is_err()
    {
        return (Vec::new(), start);
    }
    let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let next = start + complete as u64;
    let shown = if after.is_some() {
        &buf[..complete]
    } else {
        &buf[..]
    };
    let text = String::from_utf8_lossy(shown);
    let mut lines: Vec<&str> = text.lines().collect();
    // A window that starts mid-file starts mid-line.
    if after.is_none() && start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let keep = if after.is_some() { lines.len() } else { n };
    let tail = &lines[lines.len().saturating_sub(keep)..];
    (tail.iter().map(|l| l.to_string()).collect(), next)
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
    site_for(&state, &who, &name, Action::ReadSites)?;
    let n = in_range("lines", q.lines.unwrap_or(200), 10_000)? as usize;
    if q.after.is_some() && q.component.is_none() {
        return Err(ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "Invalid query",
            "`after` is an offset in one component's log: give `component` too",
        ));
    }
    let files = state
        .engine
        .log_files(&name, q.component.as_deref())
        .map_err(|e| not_found_or(e, &name))?;
    let mut out = serde_json::Map::new();
    let mut offsets = serde_json::Map::new();
    for (component, path) in files {
        let (lines, next) = log_lines(&path, n, q.after);
        out.insert(component.clone(), lines.into());
        offsets.insert(component, next.into());
    }
    Ok(Json(serde_json::json!({ "components": out, "offsets": offsets })).into_response())
}

/// A bad-input engine error about a missing deployment is a 404; others as usual.
fn not_found_or(e: commons_engine::EngineError, name: &str) -> ApiProblem {
    if e.is_bad_input()
        && e.to_string()
            .contains(&format!("no deployment named \"{name}\""))
    {
        ApiProblem::new(StatusCode::NOT_FOUND, "No such site", e.to_string())
    } else {
        engine_failed(e)
    }
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
    site_for(&state, &who, &name, Action::ReadSites)?;
    let items = state
        .engine
        .history(&name)
        .map_err(|e| not_found_or(e, &name))?;
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
    site_for(&state, &who, &name, Action::ReadSites)?;
    let Ok(Query(q)) = q else {
        return Err(ApiProblem::new(
            StatusCode::BAD_REQUEST,
            "Which deploys",
            "give two revisions: ?a=1&b=2",
        ));
    };
    let diff = state
        .engine
        .history_diff(&name, &q.a, &q.b)
        .map_err(|e| not_found_or(e, &name))?;
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
    let site = site_for(&state, &who, &name, Action::WriteSites)?;
    let state2 = state.clone();
    let name2 = name.clone();
    let b = tokio::task::spawn_blocking(move || state2.engine.backup(&name2))
        .await
        .map_err(|_| {
            ApiProblem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Backup failed",
                "the backup task stopped",
            )
        })?
        .map_err(|e| not_found_or(e, &name))?;
    state.accounts.store().record(&AuditEntry {
        at_ms: now_ms(),
        actor: who.actor(),
        org: site.map(|s| s.org),
        action: "site.backup".into(),
        target: name,
        detail: serde_json::json!({ "sha256": b.sha256, "bytes": b.bytes }),
    })?;
    Ok(created(serde_json::json!({
        "sha256": b.sha256,
        "bytes": b.bytes,
        "manifest": b.manifest,
    })))
}

#[cfg(test)]
mod log_tests {
    use super::log_lines;

    #[test]
    fn tails_then_follows_complete_lines_only() {
        let dir = std::env::temp_dir().join(format!("commons-log-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.log");
        std::fs::write(&path, "one\ntwo\nthree\npart").unwrap();
        let (tail, next) = log_lines(&path, 2, None);
        assert_eq!(tail, ["three", "part"]);
        assert_eq!(next, 14, "just past the last complete line");
        // Following: nothing new until the partial line is complete.
        assert_eq!(log_lines(&path, 2, Some(next)), (vec![], 14));
        std::fs::write(&path, "one\ntwo\nthree\npartial\nfive\n").unwrap();
        assert_eq!(
            log_lines(&path, 2, Some(next)),
            (vec!["partial".to_string(), "five".to_string()], 27)
        );
        // A log cut shorter is followed from its start again.
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(log_lines(&path, 2, Some(27)), (vec!["new".to_string()], 4));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
