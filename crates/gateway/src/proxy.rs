//! One request through the gateway: platform paths, route lookup, identity,
//! header hygiene, wake-up, forwarding with retries, metering.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use crate::body::{Counted, Metering, RequestBody, ResponseBody};
use crate::deadline::Deadline;
use crate::identity::{self, Claims};
use crate::routes::Site;
use crate::sessions;
use crate::target::{self, Refused};
use crate::upstream::put_header;
use crate::usage::RequestRecord;
use crate::{ConnInfo, Gateway, User};

/// An open HTTP/1.1 connection to an upstream.
pub(crate) type Sender = hyper::client::conn::http1::SendRequest<RequestBody>;

/// The platform's session cookie: read by the gateway, never shown to apps.
pub const SESSION_COOKIE: &str = "commons_session";
/// Attempts to find an upstream that accepts the request.
const ATTEMPTS: usize = 4;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static IDENTITY: HeaderName = HeaderName::from_static(identity::HEADER);
static SERVICE: HeaderName = HeaderName::from_static(SERVICE_HEADER);

/// The header a hosted service proves who it is with when it calls another
/// site on a user's behalf (with the user's assertion in
/// `X-Commons-Identity`); its value is the service's
/// `COMMONS_SERVICE_TOKEN`. Never passed on to apps.
pub const SERVICE_HEADER: &str = "x-commons-service";

/// An RFC 9457 problem response.
pub(crate) fn problem(status: StatusCode, title: &str, detail: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({
        "type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail,
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/problem+json")
        .body(ResponseBody::full(body.to_string()))
        .expect("valid response")
}

/// True for headers that must not cross the gateway in either direction:
/// hop-by-hop ones (RFC 9110 §7.6.1) and, on requests, anything claiming an
/// identity or a forwarding path that only the gateway may state.
fn is_stripped(name: &[u8], request: bool) -> bool {
    match name {
        b"connection"
        | b"keep-alive"
        | b"proxy-connection"
        | b"te"
        | b"trailer"
        | b"transfer-encoding"
        | b"upgrade"
        | b"proxy-authorization"
        | b"proxy-authenticate" => true,
        b"forwarded" | b"x-forwarded-for" | b"x-forwarded-host" | b"x-forwarded-proto"
        | b"x-forwarded-port" | b"x-real-ip" => request,
        n => request && n.starts_with(b"x-commons-"),
    }
}

/// [`is_stripped`] for a header name as a client wrote it (any case).
pub(crate) fn is_stripped_any_case(name: &[u8], request: bool) -> bool {
    // Every name on the list is shorter than this; a longer one can only
    // be an `x-commons-` one.
    const LONGEST: usize = 24;
    if name.len() > LONGEST {
        return request && name[..10].eq_ignore_ascii_case(b"x-commons-");
    }
    let mut lower = [0u8; LONGEST];
    let lower = &mut lower[..name.len()];
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    is_stripped(lower, request)
}

/// True if one of the `Connection` header values names `name` (hop-by-hop).
pub(crate) fn named_by_connection(name: &[u8], connection: &[&[u8]]) -> bool {
    connection.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(name))
    })
}

/// Removes stripped headers in one pass over what is there (usually none).
fn strip(headers: &mut http::HeaderMap, request: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_stripped(name.as_str().as_bytes(), request) {
            doomed.push(name.clone());
        }
    }
    // Headers the Connection header names are hop-by-hop too.
    for value in headers.get_all(header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            if let Ok(n) = HeaderName::from_bytes(token.trim().to_ascii_lowercase().as_bytes()) {
                doomed.push(n);
            }
        }
    }
    for name in doomed {
        headers.remove(&name);
    }
    if !request {
        remove_platform_set_cookies(headers);
    }
}

/// The authority a request is for, canonical: the absolute target's or
/// HTTP/2's `:authority` (which win over `Host`, RFC 9112 §3.2.2), else
/// the `Host` header. `Err` for one that is not a host and port; `Ok(None)`
/// for none at all.
fn request_authority(req: &Request<Incoming>) -> Result<Option<String>, Refused> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => match req.headers().get(header::HOST) {
            Some(h) => h.to_str().map_err(|_| Refused::BadHost)?,
            None => return Ok(None),
        },
    };
    Ok(Some(target::authority(raw)?.value.into_owned()))
}

/// The size of `req`'s head as HTTP/1.1 would carry it (request line and
/// headers): what a site's `max_header` limits, whatever the protocol.
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n ".len();
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + ": \r\n".len())
        .sum::<usize>()
        + line
        + "\r\n".len()
}

/// The value of the cookie whose pair starts with `pair` (`name=`).
fn cookie<'h>(headers: &'h http::HeaderMap, pair: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| cookie_in(v.to_str().unwrap_or(""), pair))
}

/// The value of the cookie whose pair starts with `pair`, in one `Cookie`
/// header value.
pub(crate) fn cookie_in<'v>(value: &'v str, pair: &str) -> Option<&'v str> {
    value.split(';').find_map(|p| p.trim().strip_prefix(pair))
}

/// Where the gateway finishes a browser's sign-in, on the site's own host.
pub const SIGN_IN_PATH: &str = "/.commons/sign-in";
/// The cookie binding a sign-in to the browser that started it (the
/// OAuth `state` pattern: nobody can sign a victim in as themselves by
/// sending them a link).
const SIGN_IN_STATE_COOKIE: &str = "commons_sign_in";
const SIGN_IN_STATE_PAIR: &str = "commons_sign_in=";

/// True for a redirect target that stays on the same origin: a path, not
/// a network path (`//host`), with no backslash (read as a slash by
/// browsers) and no control characters or spaces (which browsers drop, so
/// `/\t/evil.example` would become `//evil.example`).
pub fn is_local_path(to: &str) -> bool {
    to.starts_with('/')
        && !to.starts_with("//")
        && !to
            .bytes()
            .any(|b| b == b'\\' || b.is_ascii_control() || b == b' ' || b >= 0x80)
}

/// Removes `Set-Cookie`s of the platform's own cookies from an app's
/// response: an app must not sign its visitors in as someone else.
fn remove_platform_set_cookies(headers: &mut http::HeaderMap) {
    let platform = |v: &HeaderValue| is_platform_set_cookie(v.as_bytes());
    if !headers.get_all(header::SET_COOKIE).iter().any(platform) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !platform(v))
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// True for a `Set-Cookie` value that sets one of the platform's cookies,
/// with the cookie's name read as browsers read it (RFC 6265bis §5.6: up
/// to the first `=`, whitespace around it trimmed; no `=` at all is a
/// nameless cookie). Compared without regard to case, and with the
/// `__Secure-`/`__Host-` prefixes taken off, so no spelling gets past.
pub(crate) fn is_platform_set_cookie(value: &[u8]) -> bool {
    let pair = value.split(|&b| b == b';').next().unwrap_or(b"");
    let Some(eq) = pair.iter().position(|&b| b == b'=') else {
        return false;
    };
    let mut name = pair[..eq].trim_ascii();
    for prefix in [&b"__secure-"[..], b"__host-"] {
        if name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix) {
            name = &name[prefix.len()..];
        }
    }
    [SESSION_COOKIE, SIGN_IN_STATE_COOKIE]
        .iter()
        .any(|platform| name.eq_ignore_ascii_case(platform.as_bytes()))
}

/// How the session cookie's pair starts.
pub(crate) const SESSION_PAIR: &str = "commons_session=";
const _: () = assert!(SESSION_PAIR.len() == SESSION_COOKIE.len() + 1);

/// Removes the platform session cookie, keeping the app's own cookies.
fn remove_session_cookie(headers: &mut http::HeaderMap) {
    let mut kept = Vec::new();
    for pair in headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| cookies_but_session(v.as_bytes()))
    {
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept) {
            headers.insert(header::COOKIE, v);
        }
    }
}

/// The cookie pairs of a `Cookie` header value other than the platform
/// session.
pub(crate) fn cookies_but_session(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty() && !p.starts_with(SESSION_PAIR.as_bytes()))
}

/// The token of an `Authorization: Bearer` header value.
pub(crate) fn bearer_in(value: &str) -> Option<&str> {
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
}

/// The credentials a request carries.
#[derive(Default)]
pub(crate) struct Credentials<'a> {
    /// The platform session cookie's value.
    pub session: Option<&'a str>,
    pub bearer: Option<&'a str>,
    /// An identity assertion the gateway signed for another site.
    pub assertion: Option<&'a str>,
    /// A hosted service's own credential (`X-Commons-Service`).
    pub service: Option<&'a str>,
}

impl<'a> Credentials<'a> {
    fn of(headers: &'a http::HeaderMap) -> Credentials<'a> {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        Credentials {
            session: cookie(headers, SESSION_PAIR),
            bearer: text(&header::AUTHORIZATION).and_then(bearer_in),
            assertion: text(&IDENTITY),
            service: text(&SERVICE),
        }
    }
}

/// Who a request is from.
pub(crate) struct Caller {
    pub identity: Option<Arc<Identity>>,
    /// The platform bearer token was used: it does not go on to the app.
    strip_bearer: bool,
}

impl Caller {
    fn anonymous() -> Caller {
        Caller {
            identity: None,
            strip_bearer: false,
        }
    }
}

/// Whether recognising a caller may ask the platform.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lookups {
    /// Only what the gateway remembers.
    CacheOnly,
    /// Ask the platform for what it does not (blocking: not on the event
    /// loop).
    Ask,
}

/// [`Credentials`] that outlive their request, for a look-up on another
/// thread.
pub(crate) struct OwnedCredentials {
    session: Option<String>,
    bearer: Option<String>,
    assertion: Option<String>,
    service: Option<String>,
}

impl OwnedCredentials {
    pub(crate) fn of(c: &Credentials) -> OwnedCredentials {
        OwnedCredentials {
            session: c.session.map(str::to_owned),
            bearer: c.bearer.map(str::to_owned),
            assertion: c.assertion.map(str::to_owned),
            service: c.service.map(str::to_owned),
        }
    }

    pub(crate) fn borrow(&self) -> Credentials<'_> {
        Credentials {
            session: self.session.as_deref(),
            bearer: self.bearer.as_deref(),
            assertion: self.assertion.as_deref(),
            service: self.service.as_deref(),
        }
    }
}

impl RequestRecord {
    /// The record of a request about to be proxied (the rest is filled in
    /// as it goes).
    pub(crate) fn new(
        site: &Site,
        host: &str,
        caller: &Caller,
        method: &Method,
        path: &str,
        conn: &ConnInfo,
    ) -> RequestRecord {
        RequestRecord {
            time_ms: crate::now_ms() as i64,
            user: caller.identity.as_ref().map(|i| i.id.clone()),
            site: site.deployment.clone(),
            component: site.component.clone(),
            operator: site.operator.clone(),
            via: caller.identity.as_ref().and_then(|i| i.via.clone()),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            duration_us: 0,
            method: method.clone(),
            host: if *site.host == *host {
                site.host.clone()
            } else {
                Arc::from(host)
            },
            path: path.into(),
            peer: conn.peer_text.clone(),
            upstream: None,
        }
    }
}

/// A credential the platform recognised, cached with the assertions made
/// for it (signing costs more than the rest of a request).
pub(crate) struct Identity {
    user: User,
    id: Arc<str>,
    /// The site that made the request on the user's behalf (the credential
    /// was an assertion the gateway gave that site).
    via: Option<Arc<str>>,
    /// The credential assertions made for this identity refer to (`sid`).
    sid: Arc<str>,
    /// No assertion made for this identity outlives this (seconds): a
    /// service's assertion cannot be exchanged for a longer-lived one.
    expires_s: Option<u64>,
    /// Site → (assertion, its expiry in seconds).
    assertions: std::sync::Mutex<std::collections::HashMap<Arc<str>, (HeaderValue, u64)>>,
}

/// A bodiless request an upstream answered.
pub(crate) struct Exchanged {
    pub head: crate::upstream::Head,
    pub body: crate::upstream::DirectBody,
    pub upstream: SocketAddr,
    pub in_flight: crate::routes::InFlight,
}

impl Exchanged {
    /// The body, with the upstream and its in-flight count now part of the
    /// request's usage record.
    pub(crate) fn begin(self, metering: &mut Metering) -> crate::upstream::DirectBody {
        if let Some(r) = metering.record.as_mut() {
            r.upstream = Some(self.upstream);
            r.status = self.head.status.as_u16();
        }
        metering.in_flight = Some(self.in_flight);
        self.body
    }
}

enum Failure {
    /// No upstream took the request (which comes back, unsent, when it
    /// can be sent again).
    Unavailable(Option<Box<Request<RequestBody>>>),
    /// The upstream failed after the request was sent.
    Upstream,
    TooLarge,
    /// The client's body was malformed.
    BadBody,
}

impl Gateway {
    pub(crate) async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        if req.uri().path().starts_with("/.well-known/") {
            if let Some(r) = self.platform_path(&req) {
                return r;
            }
        }
        let bad = |why: Refused| problem(StatusCode::BAD_REQUEST, "Bad Request", why.detail());
        let authority = match request_authority(&req) {
            Ok(Some(a)) => a,
            Ok(None) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Bad Request",
                    "the request names no host (send a Host header)",
                )
            }
            Err(why) => return bad(why),
        };
        let host = match authority.rfind(':') {
            Some(i) if !authority.ends_with(']') => &authority[..i],
            _ => authority.as_str(),
        };
        // Route, check and forward the path the upstream will read: the
        // request continues in origin form with its canonical path.
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match target::normalize_target(pq) {
            Err(why) => return bad(why),
            Ok(std::borrow::Cow::Owned(canonical)) => {
                *req.uri_mut() = Uri::try_from(canonical).unwrap_or_else(|_| Uri::from_static("/"));
            }
            Ok(std::borrow::Cow::Borrowed(_)) if req.uri().scheme().is_some() => {
                *req.uri_mut() =
                    Uri::try_from(pq.to_string()).unwrap_or_else(|_| Uri::from_static("/"));
            }
            Ok(_) => {}
        }
        if head_size(&req) > self.config.max_header_bytes {
            return problem(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                &format!(
                    "the gateway accepts request heads of up to {} bytes",
                    self.config.max_header_bytes
                ),
            );
        }
        let Some(site) = self.routes.load().lookup(host, req.uri().path()).cloned() else {
            return problem(
                StatusCode::NOT_FOUND,
                "Not Found",
                &format!("no site is served at {host}"),
            );
        };
        if !conn.tls && self.acme().is_some() && self.certs.has_acme(host) {
            return self.redirect_to_https(host, req.uri());
        }
        if req.uri().path() == SIGN_IN_PATH {
            return self.finish_sign_in(&req, host, conn.tls);
        }
        let caller = self.caller(&Credentials::of(req.headers()), host).await;
        let record =
            RequestRecord::new(&site, host, &caller, req.method(), req.uri().path(), &conn);
        let bytes_in = (!req.body().is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
        let mut metering = Box::new(Metering {
            gateway: self.clone(),
            site: site.clone(),
            record: Some(record),
            started,
            bytes_in: bytes_in.clone(),
            in_flight: None,
        });
        let response = self
            .proxy(
                req,
                &conn,
                site,
                (host, &authority),
                caller,
                bytes_in,
                &mut metering,
            )
            .await;
        let status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.metered(metering, status))
    }

    #[allow(clippy::too_many_arguments)]
    async fn proxy(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        mut site: Arc<Site>,
        (host, authority): (&str, &str),
        caller: Caller,
        bytes_in: Option<Arc<AtomicU64>>,
        metering: &mut Metering,
    ) -> Response<ResponseBody> {
        if let Some(max) = site.spec.max_header.filter(|&max| head_size(&req) > max) {
            return problem(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "Request Header Fields Too Large",
                &format!("this site accepts request heads of up to {max} bytes"),
            );
        }
        if caller.identity.is_none() && site.needs_login(req.uri().path()) {
            if let Some(r) = self.start_sign_in(&req, authority, conn.tls) {
                return r;
            }
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "sign in to use this page: send the platform session cookie or a bearer token",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"commons\""),
            );
            return r;
        }
        let limit = site.spec.max_body.unwrap_or(self.config.max_body);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Content Too Large",
                &format!("this site accepts request bodies of up to {limit} bytes"),
            );
        }
        if site.spec.idle || site.upstreams.is_empty() {
            match self.wake(&site, host, req.uri().path(), false).await {
                Ok(woken) => site = woken,
                Err(r) => return r,
            }
        }
        let upgrade = req.version() == Version::HTTP_11
            && req.headers().contains_key(header::UPGRADE)
            && req
                .headers()
                .get(header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
        let upgrade_to = upgrade
            .then(|| req.headers().get(header::UPGRADE).cloned())
            .flatten();
        let client_version = req.version();
        // Most requests have no body: the gateway's own client sends them,
        // in this task (see `upstream`).
        if !upgrade
            && (req.method() == Method::GET || req.method() == Method::HEAD)
            && req.body().is_end_stream()
        {
            let mut head = Vec::with_capacity(512);
            self.write_upstream_head(
                &mut head,
                req.method().as_str(),
                req.uri().path_and_query().map_or("/", |p| p.as_str()),
                || {
                    req.headers()
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_bytes()))
                },
                authority.as_bytes(),
                conn,
                &site,
                &caller,
            );
            let exchanged = match self
                .exchange_waking(
                    site,
                    host,
                    req.method(),
                    req.uri().path(),
                    &head,
                    metering.started,
                    &mut Deadline::new(metering.started.into()),
                )
                .await
            {
                Ok(e) => e,
                Err(r) => return r,
            };
            let status = exchanged.head.status;
            let headers = exchanged.head.header_map();
            let mut response = Response::new(ResponseBody::direct(exchanged.begin(metering)));
            *response.status_mut() = status;
            // Hop-by-hop and platform headers are left out already.
            *response.headers_mut() = headers;
            *response.version_mut() = client_version;
            return response;
        }
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        self.rewrite_request(&mut req, conn, &site, authority, &caller, upgrade_to);
        let (parts, body) = req.into_parts();
        let req = Request::from_parts(parts, RequestBody::new(body, limit, bytes_in.clone()));
        let path = req.uri().path().to_string();
        let mut unsent = req;
        let mut woken = false;
        let sent = loop {
            let sent = tokio::time::timeout(
                self.response_timeout(&site),
                self.forward(&site, host, unsent, upgrade),
            )
            .await;
            match sent {
                // Every upstream refused: the site may have been idled or
                // have died since the table was read. Wake it, once.
                Ok(Err(Failure::Unavailable(Some(req)))) if !woken => {
                    woken = true;
                    match self.wake(&site, host, &path, true).await {
                        Ok(s) => site = s,
                        Err(r) => return r,
                    }
                    unsent = *req;
                }
                other => break other,
            }
        };
        let (mut response, upstream, in_flight) = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(failure)) => return self.failed(Some(failure), limit, bytes_in.as_deref()),
            Err(_) => return self.failed(None, limit, bytes_in.as_deref()),
        };
        if let Some(r) = metering.record.as_mut() {
            r.upstream = Some(upstream);
        }
        metering.in_flight = Some(in_flight);
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let server = hyper::upgrade::on(&mut response);
                // The tunnel's traffic is this request's usage: recorded
                // when the tunnel closes, with what crossed it each way.
                let mut tunnel = Metering {
                    gateway: metering.gateway.clone(),
                    site: metering.site.clone(),
                    record: metering.record.take(),
                    started: metering.started,
                    bytes_in: metering.bytes_in.take(),
                    in_flight: None,
                };
                if let Some(r) = tunnel.record.as_mut() {
                    r.status = StatusCode::SWITCHING_PROTOCOLS.as_u16();
                }
                tokio::spawn(async move {
                    if let (Ok(c), Ok(s)) = (client.await, server.await) {
                        let mut c = Counted::new(TokioIo::new(c));
                        let mut s = Counted::new(TokioIo::new(s));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                        let head = tunnel
                            .bytes_in
                            .take()
                            .map_or(0, |b| b.load(Ordering::Relaxed));
                        if let Some(r) = tunnel.record.as_mut() {
                            r.bytes_in = head + c.read;
                            r.bytes_out += s.read;
                        }
                    }
                    drop(tunnel);
                });
            }
            let (parts, body) = response.into_parts();
            return Response::from_parts(parts, ResponseBody::upstream(body));
        }
        strip(response.headers_mut(), false);
        // The client's protocol, whatever the app spoke: an HTTP/1.0 app must
        // not make the gateway close every client connection.
        *response.version_mut() = client_version;
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, ResponseBody::upstream(body))
    }

    /// How long `site`'s app may take to start its answer.
    pub(crate) fn response_timeout(&self, site: &Site) -> Duration {
        site.spec
            .response_timeout_ms
            .map_or(self.config.upstream_timeout, Duration::from_millis)
    }

    /// Sends a request whose body, if any, is at hand (`head`, written by
    /// [`Gateway::write_upstream_head`], the body after it) with the
    /// gateway's own client, on an idle connection of the chosen upstream
    /// or a new one. Like [`Gateway::forward`], a request no upstream
    /// answered goes to the next, and when all refuse the site is woken
    /// once. `Err` is the answer to give instead.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn exchange_waking(
        self: &Arc<Self>,
        mut site: Arc<Site>,
        host: &str,
        method: &Method,
        path: &str,
        head: &[u8],
        started: Instant,
        deadline: &mut Deadline,
    ) -> Result<Exchanged, Response<ResponseBody>> {
        let mut woken = false;
        // From the request's start: no clock read of its own.
        deadline.set((started + self.response_timeout(&site)).into());
        let sent = loop {
            let sent = deadline
                .within(self.exchange(&site, host, method, path, head, started))
                .await;
            match sent {
                Some(Err(Failure::Unavailable(_))) if !woken => {
                    woken = true;
                    deadline.set((Instant::now() + self.response_timeout(&site)).into());
                    // Boxed, like the other rare paths below: a connection
                    // holds its request's future while idle.
                    site = Box::pin(self.wake(&site, host, path, true)).await?;
                }
                other => break other,
            }
        };
        match sent {
            Some(Ok(r)) => Ok(r),
            Some(Err(failure)) => Err(self.failed(Some(failure), 0, None)),
            None => Err(self.failed(None, 0, None)),
        }
    }

    /// One attempt after another at sending a request (`head`: its head
    /// and whole body, if any) to an upstream of `site` and reading the
    /// response head.
    async fn exchange(
        &self,
        site: &Arc<Site>,
        host: &str,
        method: &Method,
        path: &str,
        head: &[u8],
        started: Instant,
    ) -> Result<Exchanged, Failure> {
        use crate::upstream::{Conn, DirectBody, SendError};
        let mut site = site.clone();
        let max_head = self.config.max_header_bytes.max(8192) * 2;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                if let Some(fresh) = self.routes.load().lookup(host, path) {
                    site = fresh.clone();
                }
            }
            let now = if attempt == 0 {
                self.mono_ms_at(started)
            } else {
                self.mono_ms()
            };
            let Some(upstream) = site.pick(now) else {
                return Err(Failure::Unavailable(None));
            };
            let addr = upstream.addr;
            let in_flight = upstream.begin();
            let conn = match upstream.take_direct() {
                Some(c) => c,
                None => {
                    let connect =
                        tokio::time::timeout(self.config.connect_timeout, Conn::connect(addr));
                    match Box::pin(connect).await {
                        Ok(Ok(c)) => c,
                        _ => {
                            Box::pin(self.connect_failed(&site, addr, now, attempt)).await;
                            continue;
                        }
                    }
                }
            };
            match conn.send(head, method, max_head).await {
                Ok((answer, conn)) => {
                    let body = DirectBody::new(
                        &answer,
                        conn,
                        upstream.direct.clone(),
                        crate::routes::KEEP_IDLE,
                    );
                    return Ok(Exchanged {
                        head: answer,
                        body,
                        upstream: addr,
                        in_flight,
                    });
                }
                // Closed before answering (an idle connection the upstream
                // had given up on, or an instance going away): a request
                // that may be repeated is sent again. Others may have been
                // acted on (as nginx, they are not sent twice).
                Err(SendError::Unanswered(_)) if method.is_idempotent() => continue,
                Err(SendError::Unanswered(_)) => return Err(Failure::Upstream),
                Err(SendError::Broken(_)) => {
                    self.metrics
                        .upstream_protocol_errors
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Failure::Upstream);
                }
            }
        }
        Err(Failure::Unavailable(None))
    }

    /// The answer for a request that could not be forwarded (`None`: the
    /// upstream was too slow). `limit` and `bytes_in` tell a body cut at the
    /// site's limit from an upstream failure.
    fn failed(
        &self,
        failure: Option<Failure>,
        limit: u64,
        bytes_in: Option<&AtomicU64>,
    ) -> Response<ResponseBody> {
        let too_large = || {
            problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Content Too Large",
                &format!("this site accepts request bodies of up to {limit} bytes"),
            )
        };
        match failure {
            Some(Failure::TooLarge) => too_large(),
            Some(Failure::BadBody) => problem(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "the request body is malformed (its chunked framing is invalid or it ended early)",
            ),
            Some(Failure::Upstream) => {
                if bytes_in.is_some_and(|b| b.load(Ordering::Relaxed) > limit) {
                    return too_large();
                }
                problem(
                    StatusCode::BAD_GATEWAY,
                    "Bad Gateway",
                    "the site failed while answering; try again",
                )
            }
            Some(Failure::Unavailable(_)) => {
                let mut r = problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service Unavailable",
                    "the site is not accepting connections; try again shortly",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                r
            }
            None => {
                self.metrics
                    .upstream_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                problem(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Gateway Timeout",
                    "the site took too long to answer",
                )
            }
        }
    }

    /// Answers the platform's own paths on every host.
    fn platform_path(&self, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            let answer = self
                .challenges
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(token)
                .cloned();
            return Some(match answer {
                Some(a) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .body(ResponseBody::full(a))
                    .expect("valid response"),
                None => problem(StatusCode::NOT_FOUND, "Not Found", "no such ACME challenge"),
            });
        }
        if path == identity::JWKS_PATH {
            return Some(
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/jwk-set+json")
                    .header(header::CACHE_CONTROL, "public, max-age=300")
                    .body(ResponseBody::full(self.signer.jwks().to_string()))
                    .expect("valid response"),
            );
        }
        None
    }

    /// Sends a browser that asked for a page needing login to the
    /// platform's sign-in, with a state cookie to come back with. `None` for
    /// other clients (they get a 401), or when the platform has no sign-in.
    fn start_sign_in(
        &self,
        req: &Request<Incoming>,
        authority: &str,
        tls: bool,
    ) -> Option<Response<ResponseBody>> {
        let wants_page = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
            && req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
        if !wants_page {
            return None;
        }
        let scheme = if tls { "https" } else { "http" };
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let return_to = format!("{scheme}://{authority}{pq}");
        let host = target::authority(authority).ok()?.host.into_owned();
        let state = self.sign_in_states.mint(&host, crate::now_ms() / 1000);
        let url = self.hooks.sign_in_url(&return_to, &state)?;
        let secure = if tls { "; Secure" } else { "" };
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, url)
            .header(
                header::SET_COOKIE,
                format!(
                    "{SIGN_IN_STATE_PAIR}{state}; Path=/.commons; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
                    sessions::SIGN_IN_FOR_S
                ),
            )
            .header(header::CACHE_CONTROL, "no-store")
            .body(ResponseBody::empty())
            .ok()
    }

    /// The browser is back from the platform's sign-in with a one-time
    /// code: the session cookie is set for this host, and it goes on to the
    /// page it asked for.
    fn finish_sign_in(
        &self,
        req: &Request<Incoming>,
        host: &str,
        tls: bool,
    ) -> Response<ResponseBody> {
        let failed = || {
            problem(
                StatusCode::BAD_REQUEST,
                "Sign-in link expired",
                "this sign-in link was used already, is more than a minute old, or was \
                 started in another browser; open the page you wanted again",
            )
        };
        let mut code = None;
        let mut state = None;
        let mut to = None;
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "to" => to = Some(v.into_owned()),
                _ => {}
            }
        }
        let (Some(code), Some(state), Some(to)) = (code, state, to) else {
            return failed();
        };
        // Only a path on this host: never a redirect elsewhere.
        if !is_local_path(&to) {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "`to` must be a path on this site",
            );
        }
        // The state is one this gateway made for this host, and the
        // browser that started the sign-in holds it.
        let expected = cookie(req.headers(), SIGN_IN_STATE_PAIR).unwrap_or("");
        if expected.is_empty()
            || expected != state
            || !self
                .sign_in_states
                .check(&state, host, crate::now_ms() / 1000)
        {
            return failed();
        }
        let Some(credential) = self.hooks.redeem_sign_in(&code, host, &state) else {
            return failed();
        };
        let secure = if tls { "; Secure" } else { "" };
        let Ok(session) = HeaderValue::from_str(&format!(
            "{SESSION_PAIR}{credential}; Path=/; HttpOnly; SameSite=Lax{secure}"
        )) else {
            return failed();
        };
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, to)
            .header(header::SET_COOKIE, session)
            .header(
                header::SET_COOKIE,
                format!("{SIGN_IN_STATE_PAIR}; Path=/.commons; Max-Age=0; HttpOnly; SameSite=Lax{secure}"),
            )
            .header(header::CACHE_CONTROL, "no-store")
            .body(ResponseBody::empty())
            .unwrap_or_else(|_| failed())
    }

    fn redirect_to_https(&self, host: &str, uri: &Uri) -> Response<ResponseBody> {
        let port = match self.config.https_port {
            Some(443) | None => String::new(),
            Some(p) => format!(":{p}"),
        };
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header(header::LOCATION, format!("https://{host}{port}{pq}"))
            .body(ResponseBody::empty())
            .expect("valid response")
    }

    /// Recognises, for a request to `host`: the platform session cookie
    /// (a site session of this host, or a token good everywhere), a
    /// platform bearer token, or — only from a hosted service that proves
    /// who it is with its service credential — an assertion the gateway
    /// made for that very service, whose underlying credential still holds.
    ///
    /// A credential the gateway has not seen lately is looked up on a
    /// blocking thread: however slow the platform answers, the event loop
    /// goes on serving everyone else.
    pub(crate) async fn caller(
        self: &Arc<Self>,
        credentials: &Credentials<'_>,
        host: &str,
    ) -> Caller {
        if let Some(known) = self.caller_known(credentials, host) {
            return known;
        }
        let owned = OwnedCredentials::of(credentials);
        let (gw, host) = (self.clone(), host.to_string());
        tokio::task::spawn_blocking(move || {
            gw.caller_with(&owned.borrow(), &host, Lookups::Ask)
                .unwrap_or_else(Caller::anonymous)
        })
        .await
        .unwrap_or_else(|_| Caller::anonymous())
    }

    /// [`Gateway::caller`] from what the gateway knows already; `None` when
    /// the platform must be asked (the request is then served where it can
    /// wait for the answer).
    pub(crate) fn caller_known(&self, credentials: &Credentials, host: &str) -> Option<Caller> {
        self.caller_with(credentials, host, Lookups::CacheOnly)
    }

    fn caller_with(
        &self,
        credentials: &Credentials,
        host: &str,
        lookups: Lookups,
    ) -> Option<Caller> {
        let at_host = |i: &Arc<Identity>| i.user.only_host.as_deref().is_none_or(|h| h == host);
        if let Some(cookie) = credentials.session {
            if let Some(identity) = self.user_identity(cookie, lookups)?.filter(at_host) {
                return Some(Caller {
                    identity: Some(identity),
                    strip_bearer: false,
                });
            }
        }
        if let Some(token) = credentials.bearer {
            if let Some(identity) = self.user_identity(token, lookups)?.filter(at_host) {
                return Some(Caller {
                    identity: Some(identity),
                    strip_bearer: true,
                });
            }
        }
        if let (Some(jwt), Some(service)) = (credentials.assertion, credentials.service) {
            return Some(Caller {
                identity: self.delegated_identity(jwt, service, lookups)?,
                strip_bearer: false,
            });
        }
        Some(Caller::anonymous())
    }

    /// The user a session cookie or bearer token stands for (`None`: not
    /// known without asking, and `lookups` said not to).
    fn user_identity(&self, credential: &str, lookups: Lookups) -> Option<Option<Arc<Identity>>> {
        self.identity(credential, lookups, |c| {
            let user = self.hooks.authenticate(c)?;
            Some((user, None, None, sessions::session_ref(c)))
        })
    }

    /// The user a service calls on behalf of: `jwt` must be an assertion
    /// this gateway made for the calling service (its audience), unexpired,
    /// whose underlying credential is still recognised.
    fn delegated_identity(
        &self,
        jwt: &str,
        service: &str,
        lookups: Lookups,
    ) -> Option<Option<Arc<Identity>>> {
        let Some(calling) = self.hooks.service(service) else {
            return Some(None);
        };
        let identity = self.identity(jwt, lookups, |jwt| {
            let c = self.signer.verify(jwt, crate::now_ms() / 1000).ok()?;
            let sid: Arc<str> = Arc::from(c.sid.as_deref()?);
            let credential = self.delegations.get(&sid)?;
            let original = self.user_identity(&credential, Lookups::Ask)??;
            (original.id.as_ref() == c.sub).then_some(())?;
            let user = User {
                id: c.sub,
                tier: c.tier,
                only_host: None,
            };
            Some((user, Some(Arc::from(c.aud.as_str())), Some(c.exp), sid))
        })?;
        let Some(identity) = identity else {
            return Some(None);
        };
        // Revoked since: the credential the chain started from no longer
        // holds (checked as often as that credential itself is).
        let Some(credential) = self.delegations.get(&identity.sid) else {
            return Some(None);
        };
        if self.user_identity(&credential, lookups)?.is_none() {
            return Some(None);
        }
        Some((identity.via.as_deref() == Some(calling.as_str())).then_some(identity))
    }

    /// What `credential` stands for, from the cache or from `look_up`
    /// (which returns the user, the site it came through, when the
    /// credential expires, in seconds, and the session it refers to). The
    /// cache's lock is not held while `look_up` runs. `None` when the cache
    /// does not know and `lookups` is [`Lookups::CacheOnly`].
    fn identity(
        &self,
        credential: &str,
        lookups: Lookups,
        look_up: impl FnOnce(&str) -> Option<(User, Option<Arc<str>>, Option<u64>, Arc<str>)>,
    ) -> Option<Option<Arc<Identity>>> {
        if credential.is_empty() || credential.len() > 4096 {
            return Some(None);
        }
        let now = Instant::now();
        if let Some((identity, until)) = self.sessions.get(credential) {
            if until > now {
                return Some(identity);
            }
        }
        if lookups == Lookups::CacheOnly {
            return None;
        }
        let found = look_up(credential);
        let mut until = now
            + if found.is_some() {
                sessions::KNOWN_FOR
            } else {
                sessions::UNKNOWN_FOR
            };
        let identity = found.map(|(user, via, expires_s, sid)| {
            if let Some(exp) = expires_s {
                let left = exp.saturating_sub(crate::now_ms() / 1000);
                until = until.min(now + Duration::from_secs(left));
            }
            Arc::new(Identity {
                id: Arc::from(user.id.as_str()),
                user,
                via,
                sid,
                expires_s,
                assertions: Default::default(),
            })
        });
        self.sessions
            .insert(credential.into(), (identity.clone(), until));
        if let Some(i) = identity.as_ref().filter(|i| i.via.is_none()) {
            self.delegations.insert(i.sid.clone(), credential.into());
        }
        Some(identity)
    }

    /// The assertion for `identity` at `site`, re-signed when half its life
    /// is gone; never valid past the identity's own expiry.
    fn assertion(&self, identity: &Identity, site: &Arc<str>) -> HeaderValue {
        let now = crate::now_ms() / 1000;
        let mut cache = identity
            .assertions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((v, exp)) = cache.get(site) {
            if *exp > now + identity::LIFETIME_S / 2 || identity.expires_s == Some(*exp) {
                return v.clone();
            }
        }
        let exp = (now + identity::LIFETIME_S).min(identity.expires_s.unwrap_or(u64::MAX));
        let claims = Claims {
            iss: identity::ISSUER.into(),
            sub: identity.user.id.clone(),
            tier: identity.user.tier.clone(),
            aud: site.to_string(),
            iat: now,
            exp,
            via: identity.via.as_deref().map(str::to_string),
            sid: Some(identity.sid.to_string()),
        };
        let v = HeaderValue::from_str(&self.signer.sign(&claims)).expect("a JWT is ASCII");
        cache.insert(site.clone(), (v.clone(), claims.exp));
        v
    }

    /// Calls `put` with each header the gateway states to the app about a
    /// request, in place of anything the client said: the host, the
    /// forwarding path, and who the user is.
    fn for_each_stated(
        &self,
        conn: &ConnInfo,
        site: &Site,
        host_value: &[u8],
        caller: &Caller,
        mut put: impl FnMut(&HeaderName, &[u8]),
    ) {
        let proto: &[u8] = if conn.tls { b"https" } else { b"http" };
        let mut forwarded = Vec::with_capacity(64);
        forwarded.extend_from_slice(conn.forwarded_for.as_bytes());
        forwarded.extend_from_slice(b";proto=");
        forwarded.extend_from_slice(proto);
        forwarded.extend_from_slice(b";host=\"");
        forwarded.extend_from_slice(host_value);
        forwarded.push(b'"');
        put(&header::HOST, host_value);
        put(&FORWARDED, &forwarded);
        put(&X_FORWARDED_FOR, conn.peer_ip.as_bytes());
        put(&X_FORWARDED_PROTO, proto);
        put(&X_FORWARDED_HOST, host_value);
        if let Some(identity) = &caller.identity {
            put(
                &IDENTITY,
                self.assertion(identity, &site.deployment).as_bytes(),
            );
            // An app that takes a trusted user header gets the signed-in
            // user there, and never what a client put in it.
            if let Some(name) = &site.user_header {
                put(name, identity.user.id.as_bytes());
            }
        }
    }

    /// True for a client header that does not go on to the app: stripped
    /// ones, ones the gateway states itself, and the platform bearer token.
    /// A name with underscores counts as its dashed form: CGI and WSGI
    /// servers read `X_Remote_User` as `X-Remote-User` (nginx drops such
    /// headers too, `underscores_in_headers off`).
    fn withheld(name: &[u8], site: &Site, caller: &Caller, connection: &[&[u8]]) -> bool {
        if name.contains(&b'_') {
            let dashed: Vec<u8> = name
                .iter()
                .map(|&b| if b == b'_' { b'-' } else { b })
                .collect();
            return Self::withheld_as_named(&dashed, site, caller, connection)
                || Self::withheld_as_named(name, site, caller, connection);
        }
        Self::withheld_as_named(name, site, caller, connection)
    }

    fn withheld_as_named(name: &[u8], site: &Site, caller: &Caller, connection: &[&[u8]]) -> bool {
        is_stripped_any_case(name, true)
            || name.eq_ignore_ascii_case(b"host")
            || (caller.strip_bearer && name.eq_ignore_ascii_case(b"authorization"))
            || site
                .user_header
                .as_ref()
                .is_some_and(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
            || named_by_connection(name, connection)
    }

    /// Writes the head of a bodiless request as the upstream gets it: the
    /// client's `headers` less those withheld (and the session cookie),
    /// then what the gateway states. `host_value` is the request's
    /// canonical authority.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_upstream_head<'h, I>(
        &self,
        out: &mut Vec<u8>,
        method: &str,
        target: &str,
        headers: impl Fn() -> I,
        host_value: &[u8],
        conn: &ConnInfo,
        site: &Site,
        caller: &Caller,
    ) where
        I: Iterator<Item = (&'h str, &'h [u8])>,
    {
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let connection: Vec<&[u8]> = headers()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .map(|(_, v)| v)
            .collect();
        for (name, value) in headers() {
            if Self::withheld(name.as_bytes(), site, caller, &connection) {
                continue;
            }
            if name.eq_ignore_ascii_case("cookie") {
                let mut pairs = cookies_but_session(value).peekable();
                if pairs.peek().is_some() {
                    out.extend_from_slice(b"cookie: ");
                    for (i, pair) in pairs.enumerate() {
                        if i > 0 {
                            out.extend_from_slice(b"; ");
                        }
                        out.extend_from_slice(pair);
                    }
                    out.extend_from_slice(b"\r\n");
                }
                continue;
            }
            put_header(out, name.as_bytes(), value);
        }
        self.for_each_stated(conn, site, host_value, caller, |name, value| {
            put_header(out, name.as_str().as_bytes(), value)
        });
        out.extend_from_slice(b"\r\n");
    }

    /// Rewrites a request for hyper's client (requests with bodies,
    /// upgrades): the same headers [`Gateway::write_upstream_head`] sends.
    fn rewrite_request(
        &self,
        req: &mut Request<Incoming>,
        conn: &ConnInfo,
        site: &Site,
        authority: &str,
        caller: &Caller,
        upgrade: Option<HeaderValue>,
    ) {
        // The request is in origin form already (see `handle`); the
        // upstream speaks HTTP/1.1, whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        let h = req.headers_mut();
        let connection: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        let connection: Vec<&[u8]> = connection.iter().map(HeaderValue::as_bytes).collect();
        let withheld: Vec<HeaderName> = h
            .keys()
            .filter(|n| Self::withheld(n.as_str().as_bytes(), site, caller, &connection))
            .cloned()
            .collect();
        for name in withheld {
            h.remove(name);
        }
        if h.contains_key(header::COOKIE) {
            remove_session_cookie(h);
        }
        self.for_each_stated(conn, site, authority.as_bytes(), caller, |name, value| {
            if let Ok(v) = HeaderValue::from_bytes(value) {
                h.insert(name.clone(), v);
            }
        });
        if let Some(proto) = upgrade {
            h.insert(header::UPGRADE, proto);
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }

    /// Sends `req` to an upstream of `site`: on an idle connection to it if
    /// there is one, else a new one. A request the upstream
    /// never received (refused connection, connection closed under it) goes
    /// to the next upstream, with the routing table read afresh.
    async fn forward(
        &self,
        site: &Arc<Site>,
        host: &str,
        mut req: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, SocketAddr, crate::routes::InFlight), Failure> {
        let mut site = site.clone();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                if let Some(fresh) = self.routes.load().lookup(host, req.uri().path()) {
                    site = fresh.clone();
                }
            }
            let now = self.mono_ms();
            let Some(upstream) = site.pick(now) else {
                return Err(Failure::Unavailable(Some(Box::new(req))));
            };
            let addr = upstream.addr;
            let mut in_flight = upstream.begin();
            let reused = if upgrade { None } else { upstream.take_idle() };
            let mut sender = match reused {
                Some(s) => s,
                None => match self.connect(addr).await {
                    Ok(s) => s,
                    Err(_) => {
                        self.connect_failed(&site, addr, now, attempt).await;
                        continue;
                    }
                },
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // Back to the idle ones once the response is finished.
                    if !upgrade {
                        in_flight.conn = Some(sender);
                    }
                    return Ok((response, addr, in_flight));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        let cause = std::error::Error::source(e.error());
                        if cause.is_some_and(|s| s.is::<crate::body::TooLarge>()) {
                            return Err(Failure::TooLarge);
                        }
                        if cause.is_some_and(|s| s.is::<crate::body::BadBody>()) {
                            return Err(Failure::BadBody);
                        }
                        self.metrics
                            .upstream_protocol_errors
                            .fetch_add(1, Ordering::Relaxed);
                        return Err(Failure::Upstream);
                    }
                },
            }
        }
        Err(Failure::Unavailable(Some(Box::new(req))))
    }

    /// An upstream refused a connection: counted, left out for a while, and
    /// (a deploy may be swapping instances) the routing table is given a
    /// moment to catch up before the next attempt.
    async fn connect_failed(&self, site: &Site, addr: SocketAddr, now: u64, attempt: usize) {
        self.metrics
            .upstream_connect_errors
            .fetch_add(1, Ordering::Relaxed);
        site.mark_down(addr, now);
        tokio::time::sleep(Duration::from_millis(25 << attempt)).await;
    }

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Sender> {
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(self.config.max_header_bytes.max(8192) * 2)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    /// Wakes an idle site and waits (bounded) until the routing table names
    /// a healthy upstream for it.
    async fn wake(
        &self,
        site: &Arc<Site>,
        host: &str,
        path: &str,
        even_if_routed: bool,
    ) -> Result<Arc<Site>, Response<ResponseBody>> {
        let unavailable = |retry: &'static str| {
            let mut r = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "the site is starting; try again shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(retry));
            r
        };
        let deployment = site.spec.deployment.clone();
        let lock = self
            .wakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(deployment.clone())
            .or_default()
            .clone();
        let deadline = Instant::now() + self.config.wake_timeout;
        let routed = || {
            self.routes
                .load()
                .lookup(host, path)
                .filter(|s| !s.spec.idle && !s.upstreams.is_empty())
                .cloned()
        };
        // One wake per site at a time; the others wait for its outcome.
        let Ok(_waking) = tokio::time::timeout_at(deadline.into(), lock.lock()).await else {
            self.metrics.wake_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(unavailable("5"));
        };
        // Another request may have woken it meanwhile (unless its routed
        // upstreams are what just refused).
        if !even_if_routed {
            if let Some(s) = routed() {
                return Ok(s);
            }
        }
        self.metrics.wakes.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout_at(deadline.into(), self.hooks.wake(&deployment)).await {
            Ok(Ok(())) => routed().ok_or_else(|| unavailable("2")),
            Ok(Err(why)) => {
                tracing::warn!(site = %deployment, error = %why, "wake failed");
                Err(unavailable("10"))
            }
            Err(_) => {
                self.metrics.wake_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(unavailable("5"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_hop_headers_are_stripped_from_requests_only() {
        for name in [
            "x-commons-identity",
            "x-commons-user",
            "forwarded",
            "x-forwarded-for",
        ] {
            assert!(is_stripped_any_case(name.as_bytes(), true), "{name}");
            assert!(!is_stripped_any_case(name.as_bytes(), false), "{name}");
        }
        assert!(is_stripped_any_case(b"Connection", false));
        assert!(is_stripped_any_case(
            b"X-Commons-A-Very-Long-Header-Name-Indeed",
            true
        ));
        assert!(!is_stripped_any_case(b"cookie", true));
        let mut h = http::HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-app", HeaderValue::from_static("1"));
        strip(&mut h, true);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn only_the_session_cookie_is_removed() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; commons_session=s3cret; b=2"),
        );
        assert_eq!(Credentials::of(&h).session, Some("s3cret"));
        remove_session_cookie(&mut h);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}
