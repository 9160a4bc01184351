//! The web console: server-rendered pages (maud) over the same calls as the
//! API — sign up and log in, sites with their status, deploy from the
//! catalog or a blueprint after a plan preview, a site's components, logs,
//! deployment history with diffs, backups, organisations and members, tokens.
//!
//! No JavaScript: plain forms, each carrying the session's CSRF token; pages
//! that follow something in progress refresh themselves. Labels on every
//! field, visible focus, contrast above WCAG AA, one column on a phone.

use crate::error::ErrorKind;
use std::sync::Arc;

use axum::extract::{
    DefaultBodyLimit, Form, FromRequest, FromRequestParts, Path as UrlPath, Query, State,
};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::{html, Markup, DOCTYPE};
use serde::Deserialize;

use crate::accounts::{Action, Member, Principal, ROLES, USER_SCOPES};
use crate::app::{self, sites::NewSite};
use crate::web;
use crate::{catalog, AppError, AppState};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(home))
        .route("/console/signup", get(signup_page).post(signup_submit))
        .route("/console/login", get(login_page).post(login_submit))
        .route("/console/logout", post(logout_submit))
        .route("/console/orgs/{org}", get(org_page))
        .route(
            "/console/orgs/{org}/plan",
            post(plan_submit).layer(DefaultBodyLimit::max(crate::limits::UPLOAD)),
        )
        .route(
            "/console/orgs/{org}/sites",
            post(deploy_submit).layer(DefaultBodyLimit::max(crate::limits::UPLOAD)),
        )
        .route("/console/orgs/{org}/members", post(members_submit))
        .route("/console/sites/{name}", get(site_page))
        .route("/console/sites/{name}/diff", get(diff_page))
        .route("/console/sites/{name}/backups", post(backup_submit))
        .route("/console/sites/{name}/destroy", post(destroy_submit))
        .route("/console/tokens", get(tokens_page).post(token_submit))
        .route("/console/tokens/{id}/revoke", post(revoke_submit))
        .route("/console/site-sign-in", get(site_sign_in))
}

const STYLE: &str = "
*{box-sizing:border-box}
body{font:16px/1.5 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fafafa}
header{background:#14365d;color:#fff;padding:.6rem 1rem;display:flex;flex-wrap:wrap;gap:1rem;align-items:center}
header a,header button{color:#fff}
header nav{display:flex;gap:1rem;flex-wrap:wrap;align-items:center}
main{max-width:60rem;margin:0 auto;padding:1rem}
a{color:#0b4f9c}
a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #f5a623;outline-offset:2px}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
th,td{text-align:left;padding:.4rem;border-bottom:1px solid #ccc;vertical-align:top}
form.stack{display:grid;gap:.6rem;max-width:30rem}
label{font-weight:600}
input,select,textarea{font:inherit;padding:.4rem;border:1px solid #555;border-radius:4px;width:100%}
textarea{font-family:ui-monospace,monospace;min-height:10rem}
button{font:inherit;padding:.4rem 1rem;border-radius:4px;border:1px solid #14365d;background:#14365d;color:#fff;cursor:pointer}
button.danger{background:#a4161a;border-color:#a4161a}
header form button{background:none;border:1px solid #fff}
pre{background:#111;color:#eee;padding:.6rem;overflow:auto;max-height:24rem;font-size:.85rem}
.error{background:#fde8e8;border:1px solid #a4161a;padding:.6rem;border-radius:4px}
.note{background:#e8f1fd;border:1px solid #0b4f9c;padding:.6rem;border-radius:4px}
.state-running,.state-ok{color:#146c2e;font-weight:600}
.state-crashed,.state-oom,.state-error,.state-failed{color:#a4161a;font-weight:600}
.inline{display:inline}
.visually-hidden{position:absolute;left:-9999px}
.bar-row{display:grid;grid-template-columns:10rem 1fr 12rem;gap:.6rem;align-items:center;margin:.2rem 0}
.bar{display:block;height:1rem;background:#0b4f9c;border-radius:2px;min-width:2px}
code.value{word-break:break-all;font-size:.85rem}
@media (max-width:40rem){th:nth-child(n+4),td:nth-child(n+4){display:none}}
";

/// A whole page.
pub(crate) fn page(title: &str, who: Option<&Member>, refresh: bool, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if refresh { meta http-equiv="refresh" content="2"; }
                title { (title) " — OneCommons" }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { a href="/console" { "OneCommons" } }
                a href="/books" { "Open books" }
                    @if let Some(m) = who {
                        nav aria-label="main" {
                            a href="/console" { "Sites" }
                            a href="/console/usage" { "Usage" }
                            a href="/console/data" { "My data" }
                            a href="/console/money" { "Your money" }
                            a href="/console/billing" { "Subscription" }
                            a href="/console/tokens" { "Tokens" }
                            @if m.user.platform_admin {
                                a href="/console/placements" { "Placements" }
                            }
                            span { (m.user.name) }
                            form.inline method="post" action="/console/logout" {
                                input type="hidden" name="csrf" value=(m.csrf.as_deref().unwrap_or(""));
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                }
                @if commons_runtime::sandbox::single_user() && !commons_runtime::sandbox::enabled() {
                    p.note role="status" {
                        "Single-user mode: sites run unsandboxed, as the platform's own user. \
                         Do not let anyone else deploy here."
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    };
    let mut r = (StatusCode::OK, markup.into_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// A problem, as a page with its status.
pub(crate) fn problem_page(p: AppError, who: Option<&Member>) -> Response {
    let status = web::status_of(p.kind);
    let mut r = page(
        p.title,
        who,
        false,
        html! {
            p.error role="alert" { (p.detail) }
            p { a href="/console" { "Back to your sites" } }
        },
    );
    *r.status_mut() = status;
    r
}

/// The signed-in member, or a redirect to the log-in page.
fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<Member, Box<Response>> {
    let member = web::session_cookie(headers)
        .map(|c| state.accounts.by_session(&c))
        .transpose()
        .map_err(|p| Box::new(problem_page(p, None)))?
        .flatten();
    member.ok_or_else(|| Box::new(Redirect::to("/console/login").into_response()))
}

/// The member, if the form's CSRF token is the session's.
fn checked(state: &AppState, headers: &HeaderMap, csrf: &str) -> Result<Member, Box<Response>> {
    let m = signed_in(state, headers)?;
    if !web::same_secret(Some(csrf), m.csrf.as_deref()) {
        return Err(Box::new(problem_page(
            AppError::new(
                ErrorKind::Forbidden,
                "Form expired",
                "this form's CSRF token is not your session's; reload the page and send it again",
            ),
            Some(&m),
        )));
    }
    Ok(m)
}

/// A signed-in member viewing a page; anyone else is sent to log in.
pub(crate) struct Viewer(pub Member);

impl FromRequestParts<Arc<AppState>> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Viewer, Response> {
        signed_in(state, &parts.headers).map(Viewer).map_err(|r| *r)
    }
}

/// A form posted by a signed-in member, carrying their session's CSRF token
/// (field `csrf`); its other fields read as `T`.
pub(crate) struct Posted<T>(pub Member, pub T);

impl<T: serde::de::DeserializeOwned> FromRequest<Arc<AppState>> for Posted<T> {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Posted<T>, Response> {
        let (parts, body) = request.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20)
            .await
            .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE.into_response())?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes).unwrap_or_default();
        let csrf = pairs
            .iter()
            .find(|(k, _)| k == "csrf")
            .map_or("", |(_, v)| v.as_str());
        let m = checked(state, &parts.headers, csrf).map_err(|r| *r)?;
        match serde_urlencoded::from_bytes(&bytes) {
            Ok(form) => Ok(Posted(m, form)),
            Err(e) => Err(problem_page(
                AppError::new(ErrorKind::Malformed, "Malformed form", e.to_string()),
                Some(&m),
            )),
        }
    }
}

fn principal(m: &Member) -> Principal {
    Principal::User(Box::new(m.clone()))
}

pub(crate) fn csrf_field(m: &Member) -> Markup {
    html! { input type="hidden" name="csrf" value=(m.csrf.as_deref().unwrap_or("")); }
}

// --- sign-up, log-in ---------------------------------------------------------

fn credentials_form(action: &str, signup: bool, error: Option<&str>, next: &str) -> Markup {
    html! {
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.stack method="post" action=(action) {
            input type="hidden" name="next" value=(next);
            @if signup {
                label for="name" { "Name" }
                input #name name="name" autocomplete="name" required;
            }
            label for="email" { "Email" }
            input #email name="email" type="email" autocomplete="email" required;
            label for="password" { "Password" @if signup { " (at least 10 characters)" } }
            input #password name="password" type="password" minlength="10" required
                autocomplete=(if signup { "new-password" } else { "current-password" });
            button type="submit" { @if signup { "Sign up" } @else { "Log in" } }
        }
        @if signup {
            p { "Have an account? " a href="/console/login" { "Log in" } }
        } @else {
            p { "New here? " a href="/console/signup" { "Sign up" } }
        }
    }
}

async fn signup_page() -> Response {
    page(
        "Sign up",
        None,
        false,
        credentials_form("/console/signup", true, None, ""),
    )
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

async fn login_page(Query(q): Query<Next>) -> Response {
    page(
        "Log in",
        None,
        false,
        credentials_form(
            "/console/login",
            false,
            None,
            q.next.as_deref().unwrap_or(""),
        ),
    )
}

/// Where to go after logging in: a path of this platform (never another
/// site: `//host`, `/\\host` and paths with control characters, which
/// browsers drop, are refused), else the console.
fn local_path(next: &str) -> &str {
    if commons_gateway::is_local_path(next) {
        next
    } else {
        "/console"
    }
}

#[derive(Deserialize)]
struct Credentials {
    #[serde(default)]
    name: String,
    email: String,
    password: String,
    #[serde(default)]
    next: String,
}

/// The peer's address, as the log-in limiter keys on it.
type Peer = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

async fn signup_submit(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Form(f): Form<Credentials>,
) -> Response {
    match state.accounts.signup(&f.email, &f.name, &f.password) {
        Ok(_) => start_session(&state, &headers, peer, &f, true),
        Err(p) => {
            let mut r = page(
                "Sign up",
                None,
                false,
                credentials_form("/console/signup", true, Some(&p.detail), &f.next),
            );
            *r.status_mut() = web::status_of(p.kind);
            r
        }
    }
}

async fn login_submit(
    State(state): State<Arc<AppState>>,
    peer: Peer,
    headers: HeaderMap,
    Form(f): Form<Credentials>,
) -> Response {
    start_session(&state, &headers, peer, &f, false)
}

fn start_session(
    state: &AppState,
    headers: &HeaderMap,
    peer: Peer,
    f: &Credentials,
    signup: bool,
) -> Response {
    // The limiter keys on the account and the client's address, as the
    // API's does: X-Forwarded-For counts only from a trusted proxy.
    let address = web::client_address(peer.map(|p| p.0 .0), headers, &state.trusted_proxies);
    match state.accounts.login(&f.email, &f.password, &address) {
        Ok((cookie, _, _)) => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let mut r = Redirect::to(local_path(&f.next)).into_response();
            r.headers_mut().insert(
                header::SET_COOKIE,
                web::session_set_cookie(&cookie, crate::accounts::SESSION_MS / 1000, host),
            );
            r
        }
        Err(p) => {
            let (title, action) = if signup {
                ("Sign up", "/console/signup")
            } else {
                ("Log in", "/console/login")
            };
            let mut r = page(
                title,
                None,
                false,
                credentials_form(action, signup, Some(&p.detail), &f.next),
            );
            *r.status_mut() = web::status_of(p.kind);
            r
        }
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    csrf: String,
}

async fn logout_submit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Err(r) = checked(&state, &headers, &f.csrf) {
        return *r;
    }
    if let Some(c) = web::session_cookie(&headers) {
        let _ = state.accounts.logout(&c);
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let mut r = Redirect::to("/console/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, web::session_set_cookie("", 0, host));
    r
}

// --- sites -------------------------------------------------------------------

fn state_class(state: &str) -> String {
    format!("state-{state}")
}

/// Where the gateway serves a site.
fn site_url(state: &AppState, name: &str) -> Option<String> {
    state
        .gateway_http
        .get()
        .map(|a| format!("http://{name}.localhost:{}/", a.port()))
}

async fn home(State(state): State<Arc<AppState>>, Viewer(m): Viewer) -> Response {
    let mut orgs: Vec<&str> = m.roles.iter().map(|r| r.org.as_str()).collect();
    orgs.dedup();
    let mut sections = Vec::new();
    for org in orgs {
        let sites = match state.accounts.store().sites(org, None, 100) {
            Ok(s) => s,
            Err(e) => return problem_page(AppError::from(e), Some(&m)),
        };
        sections.push((org.to_string(), sites));
    }
    let body = html! {
        @for (org, sites) in &sections {
            section aria-labelledby=(format!("org-{org}")) {
                h2 id=(format!("org-{org}")) { a href=(format!("/console/orgs/{org}")) { (org) } }
                @if sites.is_empty() {
                    p { "No sites yet. " a href=(format!("/console/orgs/{org}#deploy")) { "Deploy one" } }
                } @else {
                    (sites_table(&state, sites))
                }
            }
        }
    };
    page("Your sites", Some(&m), false, body)
}

fn sites_table(state: &AppState, sites: &[commons_store::accounts::SiteRow]) -> Markup {
    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let statuses = state.engine.store().statuses(&names).unwrap_or_default();
    html! {
        table {
            thead { tr { th scope="col" { "Site" } th scope="col" { "Status" } th scope="col" { "Open" } th scope="col" { "Created" } } }
            tbody {
                @for s in sites {
                    @let status = statuses.get(&s.name).map_or("deploying", String::as_str);
                    tr {
                        td { a href=(format!("/console/sites/{}", s.name)) { (s.name) } }
                        td class=(state_class(status)) { (status) }
                        td { @if let Some(u) = site_url(state, &s.name) { a href=(u) { (u) } } }
                        td { (humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(s.created_ms as u64))) }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
struct DeployForm {
    name: String,
    #[serde(default)]
    catalog: String,
    #[serde(default)]
    blueprint: String,
    #[serde(default)]
    hosting: String,
}

impl DeployForm {
    fn new_site(&self) -> NewSite {
        let given = |s: &str| (!s.trim().is_empty()).then(|| s.to_string());
        NewSite {
            name: self.name.trim().to_string(),
            catalog: given(&self.catalog).filter(|_| self.blueprint.trim().is_empty()),
            blueprint: given(&self.blueprint),
            source: None,
            inputs: Default::default(),
            hosting: match self.hosting.as_str() {
                "always-on" => Some(commons_engine::Hosting::AlwaysOn),
                "free" => Some(commons_engine::Hosting::Free),
                _ => None,
            },
        }
    }
}

fn deploy_form(m: &Member, org: &str, f: &DeployForm) -> Markup {
    html! {
        form.stack #deploy method="post" action=(format!("/console/orgs/{org}/plan")) {
            (csrf_field(m))
            label for="site-name" { "Site name" }
            input #site-name name="name" required pattern="[a-z][a-z0-9-]*" value=(f.name)
                aria-describedby="site-name-help";
            small #site-name-help { "Lower-case letters, digits and dashes. The site is served at NAME.localhost." }
            label for="catalog" { "From the catalog" }
            select #catalog name="catalog" {
                @for e in catalog::ENTRIES {
                    option value=(e.name) selected[f.catalog == e.name] { (e.name) " — " (e.summary) }
                }
            }
            label for="blueprint" { "…or a blueprint (YAML; used instead when given)" }
            textarea #blueprint name="blueprint" { (f.blueprint) }
            label for="hosting" { "Hosting" }
            select #hosting name="hosting" {
                option value="free" selected[f.hosting != "always-on"] { "Free: stopped when unused, woken by the next visit" }
                option value="always-on" selected[f.hosting == "always-on"] { "Always on" }
            }
            button type="submit" { "Preview the plan" }
        }
    }
}

/// Sites shown per page of an organisation.
const PAGE: u32 = 100;

#[derive(Deserialize)]
struct After {
    after: Option<String>,
}

async fn org_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    UrlPath(org): UrlPath<String>,
    Query(q): Query<After>,
) -> Response {
    let who = principal(&m);
    let read = app::orgs::known(&state, &org)
        .and_then(|_| state.accounts.allow(&who, &org, Action::ReadSites))
        .and_then(|_| {
            state
                .accounts
                .store()
                .sites(&org, q.after.as_deref(), PAGE)
                .map_err(AppError::from)
        });
    let sites = match read {
        Ok(s) => s,
        Err(p) => return problem_page(p, Some(&m)),
    };
    let can_deploy = state.accounts.allow(&who, &org, Action::WriteSites).is_ok();
    let can_manage = state
        .accounts
        .allow(&who, &org, Action::ManageMembers)
        .is_ok();
    let members = state.accounts.store().members(&org).unwrap_or_default();
    let audit = state
        .accounts
        .allow(&who, &org, Action::ReadAudit)
        .ok()
        .and_then(|_| state.accounts.store().audit(Some(&org), None, 20).ok());
    let body = html! {
        h2 { "Sites" }
        @if sites.is_empty() { p { "No sites yet." } } @else { (sites_table(&state, &sites)) }
        @if sites.len() == PAGE as usize {
            @if let Some(last) = sites.last() {
                p { a rel="next" href=(format!("/console/orgs/{org}?after={}", last.name)) { "Next sites" } }
            }
        }
        @if can_deploy {
            h2 { "Deploy a site" }
            (deploy_form(&m, &org, &DeployForm::default()))
        }
        @if state.accounts.allow(&who, &org, Action::ReadNodes).is_ok() {
            p { a href=(format!("/console/orgs/{org}/nodes")) { "Nodes this organisation provides" } }
        }
        h2 { "Members" }
        table {
            thead { tr { th scope="col" { "User" } th scope="col" { "Role" } } }
            tbody {
                @for r in &members {
                    @let email = state.accounts.store().user(&r.user_id).ok().flatten().map(|u| u.email).unwrap_or_default();
                    tr { td { (email) } td { (r.role) } }
                }
            }
        }
        @if can_manage {
            form.stack method="post" action=(format!("/console/orgs/{org}/members")) {
                (csrf_field(&m))
                label for="member-email" { "Member's email" }
                input #member-email name="email" type="email" required;
                label for="member-role" { "Role" }
                select #member-role name="role" {
                    @for r in ROLES { option value=(r) { (r) } }
                    option value="" { "(remove from the organisation)" }
                }
                button type="submit" { "Set role" }
            }
        }
        @if let Some(entries) = audit {
            h2 { "Recent changes" }
            table {
                thead { tr { th scope="col" { "Seq" } th scope="col" { "What" } th scope="col" { "Target" } th scope="col" { "Who" } } }
                tbody {
                    @for a in &entries {
                        tr { td { (a.seq) } td { (a.entry.action) } td { (a.entry.target) } td { (a.entry.actor) } }
                    }
                }
            }
        }
    };
    page(&format!("Organisation {org}"), Some(&m), false, body)
}

async fn plan_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(org): UrlPath<String>,
    Posted(m, f): Posted<DeployForm>,
) -> Response {
    let plan = match app::sites::plan(&state, &principal(&m), &org, &f.new_site()) {
        Ok(p) => p,
        Err(p) => {
            let status = web::status_of(p.kind);
            let mut r = page(
                "Deploy a site",
                Some(&m),
                false,
                html! {
                    p.error role="alert" { (p.detail) }
                    (deploy_form(&m, &org, &f))
                },
            );
            *r.status_mut() = status;
            return r;
        }
    };
    let body = html! {
        p.note { "Nothing has changed yet: this is what deploying " strong { (f.name) } " will do. " (plan.summary()) "." }
        table {
            thead { tr { th scope="col" { "Component" } th scope="col" { "Kind" } th scope="col" { "Action" } th scope="col" { "Why" } } }
            tbody {
                @for c in &plan.changes {
                    tr { td { (c.component) } td { (c.kind) } td { (c.action.as_str()) } td { (c.reason.as_deref().unwrap_or("")) } }
                }
            }
        }
        form method="post" action=(format!("/console/orgs/{org}/sites")) {
            (csrf_field(&m))
            input type="hidden" name="name" value=(f.name);
            input type="hidden" name="catalog" value=(f.catalog);
            input type="hidden" name="blueprint" value=(f.blueprint);
            input type="hidden" name="hosting" value=(f.hosting);
            button type="submit" { "Deploy" }
        }
    };
    page("Plan preview", Some(&m), false, body)
}

async fn deploy_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(org): UrlPath<String>,
    Posted(m, f): Posted<DeployForm>,
) -> Response {
    match app::sites::create(&state, &principal(&m), &org, &f.new_site()) {
        Ok(_) => Redirect::to(&format!("/console/sites/{}", f.name.trim())).into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
struct MemberForm {
    email: String,
    role: String,
}

async fn members_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(org): UrlPath<String>,
    Posted(m, f): Posted<MemberForm>,
) -> Response {
    let roles: Vec<String> = Some(f.role).filter(|r| !r.is_empty()).into_iter().collect();
    match state
        .accounts
        .set_roles(&principal(&m), &org, &f.email, &roles)
    {
        Ok(_) => Redirect::to(&format!("/console/orgs/{org}")).into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
struct Follow {
    #[serde(default)]
    follow: bool,
}

async fn site_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<Follow>,
) -> Response {
    let who = principal(&m);
    let site = match app::sites::site_for(&state, &who, &name, Action::ReadSites) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return problem_page(
                AppError::new(
                    ErrorKind::NotFound,
                    "No such site",
                    format!("there is no site \"{name}\" in your organisations"),
                ),
                Some(&m),
            )
        }
        Err(p) => return problem_page(p, Some(&m)),
    };
    let status = state.engine.status(&name).ok();
    let settled = status.as_ref().is_some_and(|s| {
        s.status != "running" && s.components.iter().all(|c| c.state != "starting")
    });
    let can_write = state
        .accounts
        .allow(&who, &site.org, Action::WriteSites)
        .is_ok();
    let logs = state.engine.log_files(&name, None).unwrap_or_default();
    let history = state.engine.history(&name).unwrap_or_default();
    let body = html! {
        p {
            "Organisation " a href=(format!("/console/orgs/{}", site.org)) { (site.org) } ". "
            @if let Some(u) = site_url(&state, &name) { "Served at " a #open href=(u) { (u) } "." }
        }
        @match &status {
            None => p.note role="status" { "Deploying… this page refreshes itself." },
            Some(s) => {
                p role="status" { "Deploy status: " span class=(state_class(&s.status)) #deploy-status { (s.status) } }
                table {
                    thead { tr { th scope="col" { "Component" } th scope="col" { "Kind" } th scope="col" { "State" } th scope="col" { "Restarts" } th scope="col" { "Last exit" } } }
                    tbody {
                        @for c in &s.components {
                            tr {
                                td { (c.name) } td { (c.kind) }
                                td class=(state_class(&c.state)) { (c.state) }
                                td { (c.restarts) }
                                td { (c.last_exit.as_ref().map(|e| e.reason.clone()).unwrap_or_default()) }
                            }
                        }
                    }
                }
                @for c in s.components.iter().filter(|c| c.error.is_some()) {
                    p.error { (c.name) ": " (c.error.as_deref().unwrap_or("")) }
                }
            }
        }
        h2 { "Logs" }
        p {
            @if q.follow {
                "Following: this page refreshes every 2 s. " a href=(format!("/console/sites/{name}")) { "Stop" }
            } @else {
                a href=(format!("/console/sites/{name}?follow=true")) { "Follow the logs live" }
            }
        }
        @for (component, path) in &logs {
            @let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            @let lines: Vec<&str> = text.lines().collect();
            h3 { (component) }
            pre aria-label=(format!("log of {component}")) { (lines[lines.len().saturating_sub(100)..].join("\n")) }
        }
        h2 { "History" }
        ol {
            @for e in &history {
                li {
                    (e.time) " — " (e.summary)
                    @if e.revision > 1 {
                        " " a href=(format!("/console/sites/{name}/diff?a={}&b={}", e.revision - 1, e.revision)) { "diff" }
                    }
                }
            }
        }
        @if can_write {
            h2 { "Manage" }
            form.inline method="post" action=(format!("/console/sites/{name}/backups")) {
                (csrf_field(&m)) button type="submit" { "Back up now" }
            }
            " "
            form.inline method="post" action=(format!("/console/sites/{name}/destroy")) {
                (csrf_field(&m)) button.danger type="submit" { "Destroy" }
            }
        }
    };
    page(
        &format!("Site {name}"),
        Some(&m),
        !settled || q.follow,
        body,
    )
}

#[derive(Deserialize)]
struct DiffQuery {
    a: String,
    b: String,
}

async fn diff_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<DiffQuery>,
) -> Response {
    if let Err(p) = app::sites::site_for(&state, &principal(&m), &name, Action::ReadSites) {
        return problem_page(p, Some(&m));
    }
    match state.engine.history_diff(&name, &q.a, &q.b) {
        Ok(diff) => page(
            &format!("{name}: deploy {} → {}", q.a, q.b),
            Some(&m),
            false,
            html! { pre { (diff) } p { a href=(format!("/console/sites/{name}")) { "Back to the site" } } },
        ),
        Err(e) => problem_page(AppError::from(e), Some(&m)),
    }
}

async fn backup_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    match app::sites::backup(&state, &principal(&m), &name).await {
        Ok(b) => page(
            "Backed up",
            Some(&m),
            false,
            html! {
                p.note role="status" { "Backup " code { (b.sha256) } " (" (b.bytes) " bytes) is in the archive." }
                p { a href=(format!("/console/sites/{name}")) { "Back to the site" } }
            },
        ),
        Err(p) => problem_page(p, Some(&m)),
    }
}

async fn destroy_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    let org = state
        .accounts
        .store()
        .site(&name)
        .ok()
        .flatten()
        .map(|s| s.org);
    match app::sites::destroy(&state, &principal(&m), &name).await {
        Ok(_) => Redirect::to(&org.map_or("/console".into(), |o| format!("/console/orgs/{o}")))
            .into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

// --- tokens ------------------------------------------------------------------

fn tokens_body(state: &AppState, m: &Member, made: Option<&str>) -> Markup {
    let tokens = state
        .accounts
        .store()
        .tokens(&m.user.id)
        .unwrap_or_default();
    html! {
        @if let Some(t) = made {
            p.note role="status" { "Your new token — copy it now, it is not shown again:" }
            pre #new-token { (t) }
        }
        table {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Scopes" } th scope="col" { "Organisation" } th scope="col" { "" } } }
            tbody {
                @for t in &tokens {
                    tr {
                        td { (t.name) }
                        td { (t.scopes.join(", ")) }
                        td { (t.org.as_deref().unwrap_or("all")) }
                        td {
                            @if t.revoked_ms.is_some() { "revoked" } @else {
                                form.inline method="post" action=(format!("/console/tokens/{}/revoke", t.id)) {
                                    (csrf_field(m)) button.danger type="submit" { "Revoke " span.visually-hidden { (t.name) } }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "New token" }
        form.stack method="post" action="/console/tokens" {
            (csrf_field(m))
            label for="token-name" { "Name" }
            input #token-name name="name" required;
            fieldset {
                legend { "Scopes" }
                @for s in USER_SCOPES {
                    label { input type="checkbox" name="scope" value=(s) style="width:auto"; " " (s) }
                    br;
                }
            }
            button type="submit" { "Make token" }
        }
    }
}

async fn tokens_page(State(state): State<Arc<AppState>>, Viewer(m): Viewer) -> Response {
    page("API tokens", Some(&m), false, tokens_body(&state, &m, None))
}

async fn token_submit(
    State(state): State<Arc<AppState>>,
    // Repeated `scope` fields: read the pairs as they come.
    Posted(m, pairs): Posted<Vec<(String, String)>>,
) -> Response {
    let field = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .map_or("", |(_, v)| v.as_str())
    };
    let scopes: Vec<String> = pairs
        .iter()
        .filter(|(n, _)| n == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    match state
        .accounts
        .create_token(&m.user, field("name"), &scopes, None)
    {
        Ok((token, _)) => page(
            "API tokens",
            Some(&m),
            false,
            tokens_body(&state, &m, Some(&token)),
        ),
        Err(p) => problem_page(p, Some(&m)),
    }
}

async fn revoke_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    match state.accounts.revoke_token(&m.user, &id) {
        Ok(_) => Redirect::to("/console/tokens").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
struct SiteSignIn {
    /// The page on a site the browser asked for.
    to: String,
    /// The gateway's state, handed back to it.
    state: String,
}

/// Signs the browser in at a site whose page needs login: with a console
/// session, back to the site's host with a one-time code (the gateway
/// there turns it into the session cookie of that host); without one, to
/// the log-in page first.
async fn site_sign_in(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<SiteSignIn>,
) -> Response {
    let session = web::session_cookie(&headers);
    let member = match &session {
        Some(c) => match state.accounts.by_session(c) {
            Ok(m) => m,
            Err(p) => return problem_page(p, None),
        },
        None => None,
    };
    let (Some(session), Some(member)) = (session, member) else {
        let here = format!(
            "/console/site-sign-in?{}",
            serde_urlencoded::to_string([("to", &q.to), ("state", &q.state)]).unwrap_or_default()
        );
        let next = serde_urlencoded::to_string([("next", here)]).unwrap_or_default();
        return Redirect::to(&format!("/console/login?{next}")).into_response();
    };
    let unknown = |detail: String| {
        problem_page(
            AppError::new(ErrorKind::Malformed, "Unknown site", detail),
            Some(&member),
        )
    };
    let uri = q.to.parse::<axum::http::Uri>().ok();
    let Some((scheme, host, port)) = uri.as_ref().and_then(|u| {
        let scheme = u.scheme_str().filter(|s| *s == "http" || *s == "https")?;
        let host = commons_gateway::target::canonical_host(u.host()?)?;
        let port = u
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Some((scheme, host, port))
    }) else {
        return unknown(format!("\"{}\" is not the address of a page", q.to));
    };
    // Only to sites this platform serves, at the very address the gateway
    // serves them on: never an open redirect, and never a code handed to
    // another listener on a site's host name.
    if !crate::gateway::routes_of(&state.engine)
        .iter()
        .any(|r| r.host == host)
    {
        return unknown(format!("no site of this platform is served at {host}"));
    }
    let served_at = if scheme == "https" {
        state.gateway_https.get()
    } else {
        state.gateway_http.get()
    }
    .map(|a| a.port());
    if served_at != Some(port) {
        return unknown(format!(
            "this platform serves no sites over {scheme} on port {port}"
        ));
    }
    let code = state
        .sign_ins
        .mint(&session, &member.user.id, &host, &q.state);
    let path = uri
        .as_ref()
        .and_then(|u| u.path_and_query())
        .map_or("/", |p| p.as_str());
    let port = uri
        .as_ref()
        .and_then(|u| u.port_u16())
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let query =
        serde_urlencoded::to_string([("code", code.as_str()), ("state", &q.state), ("to", path)])
            .unwrap_or_default();
    Redirect::to(&format!(
        "{scheme}://{host}{port}{}?{query}",
        commons_gateway::SIGN_IN_PATH
    ))
    .into_response()
}
