//! What every HTTP adapter over the application layer shares (the API, the
//! console, OpenID Connect, the platform's routes): errors as RFC 9457
//! problem documents, the session cookie, the client's address, and
//! request parts read with problem documents as their rejections.

use std::net::SocketAddr;

use axum::extract::{FromRequestParts, Query};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::accounts::SESSION_COOKIE;
use crate::error::{AppError, ErrorKind};

/// The status an error of this kind is answered with.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Malformed => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::TooMany => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut r = problem(status_of(self.kind), self.title, self.detail, None);
        if let Some(s) = self.retry_after_s {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// An RFC 9457 problem document, written by the gateway's builder; `extra`
/// members (an object) go beside the standard ones.
pub fn problem(
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

/// A JSON answer with `201 Created`.
pub fn created(body: serde_json::Value) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
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

/// The bearer token the request sends, if any.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
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

/// Query parameters: ones that do not parse are a 400 problem document
/// (axum's own rejection is plain text).
pub struct Params<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Params<T>, AppError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Params(q))
            .map_err(|e| AppError::new(ErrorKind::Malformed, "Invalid query", e.body_text()))
    }
}

/// A JSON request body, as the route documents it.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AppError> {
    // serde would read a struct from an array of its fields too: an object
    // is what every route documents.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(AppError::new(
            ErrorKind::Malformed,
            "Malformed request body",
            "expected a JSON object as documented",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        AppError::new(
            ErrorKind::Malformed,
            "Malformed request body",
            format!("expected a JSON object as documented: {e}"),
        )
    })
}
