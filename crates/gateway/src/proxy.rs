//! One request through the gateway: the canonical target, platform paths,
//! route lookup, the caller (`caller`), header rules (`headers`), sign-in
//! (`signin`), wake-up, forwarding with retries, metering.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use crate::body::{Counted, Metering, RequestBody, ResponseBody};
use crate::caller::{Caller, Credentials};
use crate::deadline::Deadline;
use crate::headers::strip;
use crate::identity;
use crate::problem::response as problem;
use crate::routes::Site;
use crate::signin::SIGN_IN_PATH;
use crate::target::{self, Refused};
use crate::upstream::Sender;
use crate::usage::RequestRecord;
use crate::{ConnInfo, Gateway};

/// Attempts to find an upstream that accepts the request.
const ATTEMPTS: usize = 4;

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
            time_ms: commons_clock::now_ms(),
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
            if let Some(r) = self.platform_path(&req).await {
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
    async fn platform_path(&self, req: &Request<Incoming>) -> Option<Response<ResponseBody>> {
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            let local = self
                .challenges
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(token)
                .cloned();
            // Another gateway's order: its answer is in the shared store.
            let answer = match (local, self.acme()) {
                (Some(a), _) => Some(a),
                (None, Some(acme)) => acme.shared_answer(token).await,
                (None, None) => None,
            };
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
            Ok(Ok(())) => {
                // Awake: served once its routes reach this gateway (at once
                // when the hook set them; a gateway that follows another's
                // routes hears of them a moment later).
                loop {
                    if let Some(s) = routed() {
                        return Ok(s);
                    }
                    if Instant::now() >= deadline {
                        return Err(unavailable("2"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
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
