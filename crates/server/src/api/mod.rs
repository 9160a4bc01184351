//! The account-facing REST API: sign-up and log-in, organisations and
//! their members, API tokens, the catalog, and sites. Each handler is an
//! adapter over the application layer (`app`): it extracts the request,
//! calls an operation and renders its answer as JSON, or its error as an
//! RFC 9457 problem document.
//!
//! Lists paginate by name: `?limit=N&after=NAME`, answered with `next`, the
//! cursor of the following page (absent on the last).

pub mod accounts;
pub mod billing;
pub mod data;
pub mod nodes;
pub mod orgs;
pub mod sites;
pub mod tokens;

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::Method;
use axum::response::Response;

use crate::accounts::{Principal, CSRF_HEADER};
use crate::error::{AppError, ErrorKind};
use crate::web::{bearer, same_secret, session_cookie};
use crate::AppState;

/// What a handler answers.
type Reply = Result<Response, AppError>;

/// The caller, authenticated: the local socket, a bearer token (a user's
/// `cmnu_` token or the platform's `admin` token), or a session cookie —
/// which, for anything but GET and HEAD, must come with the session's CSRF
/// token in `X-CSRF-Token`.
pub struct Who(pub Principal);

impl FromRequestParts<Arc<AppState>> for Who {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Who, AppError> {
        if parts
            .extensions
            .get::<crate::local::LocalCaller>()
            .is_some()
        {
            return Ok(Who(Principal::Platform));
        }
        let unauthenticated = || {
            AppError::new(
                ErrorKind::Unauthenticated,
                "Authentication required",
                "log in (POST /api/login) or send `Authorization: Bearer TOKEN`",
            )
        };
        if let Some(token) = bearer(&parts.headers) {
            if token.starts_with(crate::accounts::USER_TOKEN_PREFIX) {
                return match state.accounts.by_token(&token)? {
                    Some(m) => Ok(Who(Principal::User(Box::new(m)))),
                    None => Err(AppError::new(
                        ErrorKind::Unauthenticated,
                        "Unknown token",
                        "this token is unknown or revoked; make a new one",
                    )),
                };
            }
            return match state.tokens.authorise(&token, "admin") {
                Some(_) => Ok(Who(Principal::Platform)),
                None => Err(AppError::new(
                    ErrorKind::Unauthenticated,
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
                return Err(AppError::new(
                    ErrorKind::Forbidden,
                    "CSRF token missing or wrong",
                    "send the session's CSRF token (from POST /api/login or GET /api/me) in X-CSRF-Token",
                ));
            }
        }
        Ok(Who(Principal::User(Box::new(member))))
    }
}
