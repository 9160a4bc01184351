//! Sign-up, log-in, log-out and the caller's own account.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::{Reply, Who};
use crate::schema::Problem;
use crate::web::{client_address, created, json_body, session_cookie, session_set_cookie};
use crate::AppState;

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
    let m = crate::app::member(&who)?;
    Ok(Json(serde_json::json!({
        "user": m.user,
        "roles": m.roles,
        "csrf": m.csrf,
        "scopes": m.scopes,
    }))
    .into_response())
}
