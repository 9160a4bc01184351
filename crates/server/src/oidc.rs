//! One login for every hosted site: the platform is an OpenID Connect
//! provider (OpenID Connect Core 1.0, authorization-code flow).
//!
//! - `GET /.well-known/openid-configuration` — discovery;
//! - `GET /oidc/authorize` — signs the user in (the console's log-in page)
//!   and asks their consent, listing what the application asks for; PKCE
//!   with S256 is required (RFC 7636);
//! - `POST /oidc/token` — trades a code (once, within a minute) for an ID
//!   token and an access token; clients authenticate with their secret
//!   (`client_secret_basic` or `client_secret_post`);
//! - `GET /oidc/userinfo` — the claims the access token's scopes allow;
//! - DataCommons scopes mirror its grants: `data:NSID:read` and
//!   `data:NSID:write` (a collection some site declared) are listed on the
//!   consent screen with the collection's class; allowing them grants the
//!   application (`app:oidc:CLIENT_ID`) those actions, revocable under "My
//!   data", and its access token then calls the data API (`/data/v1/…`,
//!   `Authorization: Bearer`) within both the token's scopes and the
//!   grants still standing;
//! - `GET /oidc/jwks.json` — the platform's public key.
//!
//! ID tokens are signed RS256 with the provider's RSA key ([`crate::rs256`],
//! made on first use: `HOME/gateway/oidc-rsa.pk8`). Applications
//! are registered by an organisation (`POST /api/orgs/ORG/oidc-clients`).
//! Codes and access tokens live in memory: a restart signs users out of
//! applications, which then send them through the (quick) flow again.

use crate::error::ErrorKind;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::rs256::RsaSigner;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use commons_store::accounts::{AuditEntry, OidcClientRow};
use maud::html;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::accounts::Action;
use crate::api::Who;
use crate::app::orgs::known as known_org;
use crate::console::{csrf_field, page, problem_page, Posted};
use crate::schema::Problem;
use crate::tokens::{hash, random};
use crate::{AppError, AppState};
use commons_clock::now_ms;

/// How long a code may wait to be traded.
const CODE_MS: i64 = 60_000;
/// How long ID and access tokens are valid.
const TOKEN_S: i64 = 3600;
/// The scopes the provider knows, and what the consent screen says of each.
const SCOPES: &[(&str, &str)] = &[
    ("openid", "who you are (an identifier of your account)"),
    ("profile", "your name"),
    ("email", "your email address"),
];

struct Grant {
    client_id: String,
    redirect_uri: String,
    user_id: String,
    scopes: Vec<String>,
    nonce: Option<String>,
    challenge: String,
    auth_time_s: i64,
    expires_ms: i64,
}

struct Access {
    user_id: String,
    client_id: String,
    scopes: Vec<String>,
    expires_ms: i64,
}

/// The provider's key and what it has handed out.
pub struct Provider {
    key_path: std::path::PathBuf,
    /// Made or loaded on first use, so a platform nobody signs in to through
    /// it never spends the time to make one.
    signer: std::sync::OnceLock<RsaSigner>,
    /// By the SHA-256 of the code.
    codes: Mutex<HashMap<String, Grant>>,
    /// By the SHA-256 of the access token.
    access: Mutex<HashMap<String, Access>>,
}

impl Provider {
    pub fn new(key_path: std::path::PathBuf) -> Provider {
        Provider {
            key_path,
            signer: std::sync::OnceLock::new(),
            codes: Mutex::new(HashMap::new()),
            access: Mutex::new(HashMap::new()),
        }
    }
}

impl Provider {
    /// Who a current access token acts for, which application holds it,
    /// and its data scopes.
    pub fn data_access(&self, token: &str) -> Option<(String, String, Vec<String>)> {
        let access = self.access.lock().unwrap_or_else(|p| p.into_inner());
        let a = access
            .get(&hash(token))
            .filter(|a| a.expires_ms > now_ms())?;
        let scopes = a
            .scopes
            .iter()
            .filter(|s| crate::app::data::parse_data_scope(s).is_some())
            .cloned()
            .collect();
        Some((a.user_id.clone(), a.client_id.clone(), scopes))
    }

    /// The signing key, loading or making it the first time (as every
    /// instance sharing `engine`'s database holds it).
    async fn signer(&self, engine: &commons_engine::Engine) -> Result<&RsaSigner, String> {
        if let Some(s) = self.signer.get() {
            return Ok(s);
        }
        let path = self.key_path.clone();
        let mut made = tokio::task::spawn_blocking(move || RsaSigner::open(&path))
            .await
            .map_err(|e| e.to_string())??;
        if crate::keys::adopt_shared(engine, "oidc", &self.key_path)? {
            made = RsaSigner::open(&self.key_path)?;
        }
        // Two first requests at once: whichever was set first is kept (both
        // read the same file, or the second made it over the first's).
        let _ = self.signer.set(made);
        Ok(self.signer.get().expect("just set"))
    }
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/oidc/jwks.json", get(jwks))
        .route("/oidc/authorize", get(authorize).post(consent))
        .route("/oidc/token", post(token))
        .route("/oidc/userinfo", get(userinfo).post(userinfo))
}

/// The issuer: the platform's public URL (`COMMONS_PUBLIC_URL`, else the
/// API's address as it listens).
fn issuer(state: &AppState, headers: &HeaderMap) -> String {
    match state.public_url.get() {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!(
            "http://{}",
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1")
        ),
    }
}

async fn discovery(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let iss = issuer(&state, &headers);
    Json(serde_json::json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/oidc/authorize"),
        "token_endpoint": format!("{iss}/oidc/token"),
        "userinfo_endpoint": format!("{iss}/oidc/userinfo"),
        "jwks_uri": format!("{iss}/oidc/jwks.json"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": SCOPES.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "name", "email", "email_verified"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn jwks(State(state): State<Arc<AppState>>) -> Response {
    match state.oidc.signer(&state.engine).await {
        Ok(s) => Json(serde_json::json!({ "keys": [s.jwk()] })).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "the OpenID provider's key");
            AppError::new(
                ErrorKind::Internal,
                "No signing key",
                "the provider's key cannot be read; see the platform's log",
            )
            .into_response()
        }
    }
}

#[derive(Deserialize, Default)]
struct AuthParams {
    #[serde(default)]
    response_type: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    redirect_uri: String,
    #[serde(default)]
    scope: String,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

/// Sends the browser back to the application with `params` (and the state).
fn back_to(redirect_uri: &str, state: Option<&str>, params: &[(&str, &str)]) -> Response {
    let mut query: Vec<(&str, &str)> = params.to_vec();
    if let Some(s) = state {
        query.push(("state", s));
    }
    let sep = if redirect_uri.contains('?') { '&' } else { '?' };
    let q = serde_urlencoded::to_string(&query).unwrap_or_default();
    Redirect::to(&format!("{redirect_uri}{sep}{q}")).into_response()
}

/// Checks a request for a code: an unknown application or address gets an
/// error page (a redirect there could be an attacker's); anything else wrong
/// goes back to the application as an OAuth error.
fn check_request(
    state: &AppState,
    p: &AuthParams,
) -> Result<(OidcClientRow, Vec<String>), Box<Response>> {
    let client = state
        .accounts
        .store()
        .oidc_client(&p.client_id)
        .map_err(|e| Box::new(problem_page(AppError::from(e), None)))?;
    let Some(client) = client.filter(|c| c.redirect_uris.contains(&p.redirect_uri)) else {
        return Err(Box::new(problem_page(
            AppError::new(
                ErrorKind::Malformed,
                "Unknown application",
                "this sign-in link names an application or a return address the platform does not know; tell the site's operator",
            ),
            None,
        )));
    };
    let fail = |error: &str, description: &str| {
        Box::new(back_to(
            &p.redirect_uri,
            p.state.as_deref(),
            &[("error", error), ("error_description", description)],
        ))
    };
    if p.response_type != "code" {
        return Err(fail(
            "unsupported_response_type",
            "only response_type=code is supported",
        ));
    }
    let scopes: Vec<String> = p.scope.split_whitespace().map(String::from).collect();
    if !scopes.iter().any(|s| s == "openid") {
        return Err(fail("invalid_scope", "the scope must include openid"));
    }
    for s in &scopes {
        if SCOPES.iter().any(|(k, _)| k == s) {
            continue;
        }
        match crate::app::data::parse_data_scope(s) {
            Some((nsid, _)) if state.data.commons.class_of(nsid).is_some() => {}
            Some((nsid, _)) => {
                return Err(fail(
                    "invalid_scope",
                    &format!("{s}: no site declared the collection {nsid}"),
                ))
            }
            None => return Err(fail("invalid_scope", &format!("unknown scope {s}"))),
        }
    }
    if p.code_challenge.as_deref().unwrap_or("").len() < 43
        || p.code_challenge_method.as_deref() != Some("S256")
    {
        return Err(fail(
            "invalid_request",
            "PKCE is required: send code_challenge with code_challenge_method=S256",
        ));
    }
    Ok((client, scopes))
}

/// Signs the user in if needed, then asks their consent.
async fn authorize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Query(p): Query<AuthParams>,
) -> Response {
    let (client, scopes) = match check_request(&state, &p) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let member = crate::web::session_cookie(&headers)
        .and_then(|c| state.accounts.by_session(&c).ok().flatten());
    let Some(m) = member else {
        let next = uri
            .path_and_query()
            .map_or("/oidc/authorize", |p| p.as_str());
        let q = serde_urlencoded::to_string([("next", next)]).unwrap_or_default();
        return Redirect::to(&format!("/console/login?{q}")).into_response();
    };
    let hidden = [
        ("client_id", p.client_id.as_str()),
        ("redirect_uri", p.redirect_uri.as_str()),
        ("scope", p.scope.as_str()),
        ("state", p.state.as_deref().unwrap_or("")),
        ("nonce", p.nonce.as_deref().unwrap_or("")),
        ("code_challenge", p.code_challenge.as_deref().unwrap_or("")),
        ("code_challenge_method", "S256"),
        ("response_type", "code"),
    ];
    let body = html! {
        p { strong { (client.name) } " (registered by " (client.org) ") asks to know:" }
        ul #asked {
            @for s in &scopes {
                li { (scope_said(&state, s)) }
            }
        }
        p { "You are signed in as " (m.user.email) ". After you answer, you go back to " code { (p.redirect_uri) } "." }
        form method="post" action="/oidc/authorize" {
            (csrf_field(&m))
            @for (k, v) in hidden { input type="hidden" name=(k) value=(v); }
            button #allow type="submit" name="decision" value="allow" { "Allow" }
            " "
            button.danger #deny type="submit" name="decision" value="deny" { "Deny" }
        }
    };
    page(
        &format!("Sign in to {}", client.name),
        Some(&m),
        false,
        body,
    )
}

/// What the consent screen says of a scope.
fn scope_said(state: &AppState, scope: &str) -> String {
    if let Some((_, said)) = SCOPES.iter().find(|(k, _)| *k == scope) {
        return (*said).to_string();
    }
    match crate::app::data::parse_data_scope(scope) {
        Some((nsid, action)) => {
            let class = state.data.commons.class_of(nsid).map_or("", |c| c.name());
            let verb = match action {
                commons_data::service::Action::Read => "read",
                commons_data::service::Action::Write => "write",
            };
            format!("to {verb} your {nsid} records ({class}; you can revoke it under My data)")
        }
        None => scope.to_string(),
    }
}

#[derive(Deserialize)]
struct Consent {
    decision: String,
    #[serde(flatten)]
    params: AuthParams,
}

async fn consent(State(state): State<Arc<AppState>>, Posted(m, f): Posted<Consent>) -> Response {
    let p = f.params;
    let (client, scopes) = match check_request(&state, &p) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    if f.decision != "allow" {
        return back_to(
            &p.redirect_uri,
            p.state.as_deref(),
            &[
                ("error", "access_denied"),
                ("error_description", "the user said no"),
            ],
        );
    }
    // Data scopes become DataCommons grants, which the user can revoke
    // under "My data" (and which the data API checks on every call).
    let app = crate::app::data::client_app(&client.id);
    for s in &scopes {
        let Some((nsid, action)) = crate::app::data::parse_data_scope(s) else {
            continue;
        };
        let commons = &state.data.commons;
        let wants = (
            action == commons_data::service::Action::Read,
            action == commons_data::service::Action::Write,
        );
        let purpose = format!("asked at sign-in by {}", client.name);
        let granted = tokio::task::block_in_place(|| {
            commons
                .declare_use(&app, nsid, wants, &purpose)
                .and_then(|()| {
                    commons.grant(
                        &m.user.id,
                        &commons_data::service::Grantee::App(app.clone()),
                        nsid,
                        action,
                    )
                })
        });
        if let Err(e) = granted {
            return problem_page(crate::data::to_app_error(e), Some(&m));
        }
    }
    let code = format!("cmnk_{}", random(40));
    let now = now_ms();
    {
        let mut codes = state.oidc.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|_, g| g.expires_ms > now);
        codes.insert(
            hash(&code),
            Grant {
                client_id: client.id.clone(),
                redirect_uri: p.redirect_uri.clone(),
                user_id: m.user.id.clone(),
                scopes,
                nonce: p.nonce.clone().filter(|n| !n.is_empty()),
                challenge: p.code_challenge.clone().unwrap_or_default(),
                auth_time_s: now / 1000,
                expires_ms: now + CODE_MS,
            },
        );
    }
    let _ = state.accounts.store().record(&AuditEntry {
        at_ms: now,
        actor: m.user.id.clone(),
        org: Some(client.org.clone()),
        action: "oidc.consent".into(),
        target: client.id.clone(),
        detail: serde_json::json!({ "scope": p.scope }),
    });
    back_to(
        &p.redirect_uri,
        p.state.as_deref().filter(|s| !s.is_empty()),
        &[("code", &code)],
    )
}

/// An OAuth error answer (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut r = (
        status,
        Json(serde_json::json!({ "error": error, "error_description": description })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"commons\""),
        );
    }
    r
}

/// The client's id and secret: HTTP Basic, else the form.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Option<(String, String)> {
    if let Some(basic) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = STANDARD.decode(basic.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (id, secret) = text.split_once(':')?;
        return Some((percent_decode(id), percent_decode(secret)));
    }
    Some((
        form.get("client_id")?.clone(),
        form.get("client_secret")?.clone(),
    ))
}

/// `application/x-www-form-urlencoded` decoding of one value (RFC 6749
/// §2.3.1 encodes Basic credentials that way).
fn percent_decode(s: &str) -> String {
    serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={s}"))
        .ok()
        .and_then(|v| v.into_iter().next())
        .map_or_else(|| s.to_string(), |(_, v)| v)
}

async fn token(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let Some((client_id, secret)) = client_credentials(&headers, &form) else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "authenticate the client: HTTP Basic or client_id and client_secret",
        );
    };
    let client = match state.accounts.store().oidc_client(&client_id) {
        Ok(c) => c,
        Err(e) => {
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &e.to_string(),
            )
        }
    };
    let Some(client) =
        client.filter(|c| crate::web::same_secret(Some(&hash(&secret)), Some(&c.secret_hash)))
    else {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "unknown client or wrong secret",
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("authorization_code") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only authorization_code is supported",
        );
    }
    let code = form.get("code").map(String::as_str).unwrap_or("");
    // A code is used once, whatever happens next.
    let grant = state
        .oidc
        .codes
        .lock()
        .expect("codes lock")
        .remove(&hash(code));
    let now = now_ms();
    let Some(grant) = grant.filter(|g| g.expires_ms > now && g.client_id == client.id) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the code is unknown, used, expired or another client's",
        );
    };
    if form.get("redirect_uri") != Some(&grant.redirect_uri) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "redirect_uri is not the one the code was sent to",
        );
    }
    let verifier = form.get("code_verifier").map(String::as_str).unwrap_or("");
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if !crate::web::same_secret(Some(&computed), Some(&grant.challenge)) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code_verifier does not match the code_challenge",
        );
    }
    let user = match state.accounts.store().user(&grant.user_id) {
        Ok(Some(u)) => u,
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "the account is gone",
            )
        }
    };
    let iat = now / 1000;
    let mut claims = serde_json::json!({
        "iss": issuer(&state, &headers),
        "sub": user.id,
        "aud": client.id,
        "iat": iat,
        "exp": iat + TOKEN_S,
        "auth_time": grant.auth_time_s,
    });
    if let Some(n) = &grant.nonce {
        claims["nonce"] = n.clone().into();
    }
    add_scoped_claims(&mut claims, &grant.scopes, &user);
    let access = format!("cmnt_{}", random(40));
    {
        let mut all = state.oidc.access.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, a| a.expires_ms > now);
        all.insert(
            hash(&access),
            Access {
                user_id: user.id.clone(),
                client_id: grant.client_id.clone(),
                scopes: grant.scopes.clone(),
                expires_ms: now + TOKEN_S * 1000,
            },
        );
    }
    let id_token = match state.oidc.signer(&state.engine).await {
        Ok(s) => s.sign(&claims),
        Err(e) => {
            tracing::error!(error = %e, "the OpenID provider's key");
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the provider's key cannot be read; see the platform's log",
            );
        }
    };
    let mut r = Json(serde_json::json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": TOKEN_S,
        "id_token": id_token,
        "scope": grant.scopes.join(" "),
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn add_scoped_claims(
    claims: &mut serde_json::Value,
    scopes: &[String],
    user: &commons_store::accounts::UserRow,
) {
    if scopes.iter().any(|s| s == "profile") {
        claims["name"] = user.name.clone().into();
    }
    if scopes.iter().any(|s| s == "email") {
        claims["email"] = user.email.clone().into();
        // Addresses are not verified yet (no mail is sent).
        claims["email_verified"] = false.into();
    }
}

async fn userinfo(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let found = state
        .oidc
        .access
        .lock()
        .expect("access lock")
        .get(&hash(bearer.trim()))
        .filter(|a| a.expires_ms > now_ms())
        .map(|a| (a.user_id.clone(), a.scopes.clone()));
    let unauthorised = || {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        r
    };
    let Some((user_id, scopes)) = found else {
        return unauthorised();
    };
    let Ok(Some(user)) = state.accounts.store().user(&user_id) else {
        return unauthorised();
    };
    let mut claims = serde_json::json!({ "sub": user.id });
    add_scoped_claims(&mut claims, &scopes, &user);
    Json(claims).into_response()
}

#[derive(Deserialize, utoipa::ToSchema)]
struct NewClient {
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    name: String,
    /// Absolute http(s) URLs the platform may send the user back to.
    #[schema(value_type = Vec<RedirectUri>, min_items = 1)]
    redirect_uris: Vec<String>,
}

/// An absolute http(s) URL: a host name or IPv4 address, perhaps a port,
/// then a path and query of URL characters (non-ASCII percent-encoded), and
/// no fragment.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // described: they arrive as strings
#[schema(value_type = String, pattern = "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?][A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?$")]
struct RedirectUri(String);

/// Whether `u` is what [`RedirectUri`] describes.
fn valid_redirect_uri(u: &str) -> bool {
    let Some(rest) = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
    else {
        return false;
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let tail_ok = tail
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._~!$&'()*+,;=:@%/?-".contains(c));
    host_ok && port_ok && tail_ok
}

/// Registers an application that signs its users in with the platform;
/// answers its client id and secret (the secret only here).
#[utoipa::path(post, path = "/api/orgs/{org}/oidc-clients", tag = "organisations",
    params(("org" = String, Path, description = "organisation id")),
    request_body = NewClient,
    responses(
        (status = 201, description = "`{client_id, client_secret, ...}`: the secret is shown only here", body = Object),
        crate::schema::Malformed,
        crate::schema::Unauthenticated,
        (status = 403, description = "neither admin nor operator of it; or no CSRF token", body = Problem, content_type = "application/problem+json"),
        crate::schema::NoSuchOrg,
        (status = 422, description = "no name or an invalid redirect URI", body = Problem, content_type = "application/problem+json"),
    ), security(("bearer" = ["sites:write"])))]
pub async fn register_client(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    UrlPath(org): UrlPath<String>,
    body: Bytes,
) -> Result<Response, AppError> {
    known_org(&state, &org)?;
    state.accounts.allow(&who, &org, Action::WriteSites)?;
    let n: NewClient = serde_json::from_slice(&body).map_err(|e| {
        AppError::new(
            ErrorKind::Malformed,
            "Malformed request body",
            format!("expected {{name, redirect_uris}}: {e}"),
        )
    })?;
    let bad = |d: String| AppError::new(ErrorKind::Invalid, "Invalid application", d);
    if !crate::accounts::valid_display_name(&n.name) {
        return Err(bad(
            "give the application a name of 1 to 100 characters".into()
        ));
    }
    if n.redirect_uris.is_empty() {
        return Err(bad("give at least one redirect URI".into()));
    }
    if let Some(u) = n.redirect_uris.iter().find(|u| !valid_redirect_uri(u)) {
        return Err(bad(format!(
            "\"{u}\" is not an absolute http(s) URL with a host name or IPv4 address and without a fragment (percent-encode other characters)"
        )));
    }
    let secret = format!("cmnx_{}", random(40));
    let client = OidcClientRow {
        id: format!("c_{}", random(16)),
        secret_hash: hash(&secret),
        org: org.clone(),
        name: n.name.trim().into(),
        redirect_uris: n.redirect_uris,
        created_ms: now_ms(),
    };
    state
        .accounts
        .store()
        .create_oidc_client(
            &client,
            &AuditEntry {
                at_ms: client.created_ms,
                actor: who.actor(),
                org: Some(org),
                action: "oidc.client".into(),
                target: client.id.clone(),
                detail: serde_json::json!({ "name": client.name, "redirect_uris": client.redirect_uris }),
            },
        )?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "client_id": client.id,
            "client_secret": secret,
            "name": client.name,
            "redirect_uris": client.redirect_uris,
        })),
    )
        .into_response())
}
