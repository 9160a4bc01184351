//! The gateway's own HTTP/1.1 server for the common request: one without a
//! body or with a small one (a form, an API call), for a routed site that is
//! awake. The request head is parsed in place with `httparse` and rewritten
//! straight into the bytes the upstream gets; a body is read whole and goes
//! after them (nginx's request buffering); the direct client (`upstream`)
//! sends them; the response head and as much of the body as has arrived go
//! back in one write. No header maps, no boxed services, no per-request
//! tasks: most of what a general server costs a proxy.
//!
//! Anything else — a chunked or large body, an upgrade, HTTP/1.0, a
//! platform path, a sign-in, a site to wake, a head that is malformed or too
//! large — hands the connection, with the bytes already read, to hyper's
//! server ([`Gateway::serve_hyper_h1`]), which serves it from then on. So
//! every rule and every error answer lives in one place (`proxy`); this
//! module only decides that none of them applies.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response};
use hyper::body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::body::{Metering, ResponseBody};
use crate::caller::{Credentials, OwnedCredentials, SERVICE_HEADER};
use crate::deadline::Deadline;
use crate::headers::{bearer_in, cookie_in, SESSION_PAIR};
use crate::routes::Site;
use crate::signin::SIGN_IN_PATH;
use crate::upstream::{put_header, put_status_line};
use crate::usage::RequestRecord;
use crate::{ConnInfo, Gateway, OpenConnection};

/// Most headers a request served here may have (more: hyper serves it).
const MAX_HEADERS: usize = 64;
/// Read buffer of a connection; a request head larger than this grows it.
const READ_SIZE: usize = 4096;
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Largest request body read whole here (nginx's `client_body_buffer_size`);
/// a larger one is streamed by hyper.
const WHOLE_BODY: u64 = 16 * 1024;

/// A request this module serves.
struct Fast {
    /// Length of its head in the read buffer.
    used: usize,
    site: Arc<Site>,
    method: Method,
    /// Length of its body, which follows the head.
    body: usize,
    /// The client waits for `100 Continue` before it sends the body.
    expects_continue: bool,
    record: RequestRecord,
    /// When its head was complete.
    started: Instant,
    /// The client asked to close the connection after this response.
    close: bool,
}

// Made and consumed once per request, by value: a box would cost an
// allocation each time.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// The head is not complete yet.
    Partial,
    /// hyper serves this connection from here on.
    HandOver,
    /// A credential the gateway has not seen lately: look it up (off the
    /// event loop), then read the head again.
    LookUp(Box<(OwnedCredentials, String)>),
    Serve(Fast),
}

/// A client connection, as `serve` needs it.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once a read would not wait (data, the end, or an error): an
    /// idle connection then holds no read buffer. By default at once.
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

impl Transport for tokio::net::TcpStream {
    fn wait_readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        // The stream's own reader slot, not `readable()`'s waiter (150
        // bytes more in every idle connection's state): one task reads.
        poll_fn(move |cx| self.poll_read_ready(cx))
    }
}

// rustls holds buffers of its own; a read goes through it.
impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {}

/// A connection's buffers while it has a request: what it read, the
/// upstream's request head, the response on its way out. Idle connections
/// give them back to their thread's spares.
#[derive(Default)]
struct Buffers {
    read: BytesMut,
    head: Vec<u8>,
    out: Vec<u8>,
}

/// Spare buffers kept per thread.
const SPARES: usize = 64;

thread_local! {
    // Boxes, kept as boxes: a connection takes one without an allocation.
    #[allow(clippy::vec_box)]
    static SPARE: RefCell<Vec<Box<Buffers>>> = const { RefCell::new(Vec::new()) };
}

impl Buffers {
    /// Boxed: a connection holds a pointer, and none while it is idle.
    fn take() -> Box<Buffers> {
        SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
    }

    /// Keeps the buffers for another connection, unless a large request or
    /// response grew them.
    fn give_back(mut self: Box<Self>) {
        if self.read.capacity() > 4 * READ_SIZE || self.out.capacity() > 2 * WRITE_BATCH {
            return;
        }
        self.read.clear();
        SPARE.with(|s| {
            let mut spare = s.borrow_mut();
            if spare.len() < SPARES {
                spare.push(self);
            }
        });
    }
}

/// Serves HTTP/1.1 on `io` until the client closes it, it idles past the
/// header timeout, or the gateway shuts down.
///
/// An async block rather than an async fn: an async fn's state keeps its
/// arguments twice, and every idle connection is this state.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<I: Transport>(
    open: OpenConnection,
    mut io: I,
    info: Arc<ConnInfo>,
) -> impl Future<Output = ()> {
    async move {
        // The count of open connections holds the gateway already.
        let gw: &Arc<Gateway> = &open.0;
        // Made once: registering a waiter per request would cost a lock each.
        let mut stop = gw.shutdown.subscribe();
        let stopping = stop.wait_for(|s| *s);
        tokio::pin!(stopping);
        let mut held: Option<Box<Buffers>> = None;
        // One timer for the head, the body and the upstream's answer, which
        // come one after the other: each phase moves the deadline.
        let mut deadline = Deadline::new(tokio::time::Instant::now() + gw.config.header_timeout);
        loop {
            // Wait for a whole request head, within the header timeout.
            deadline.set(tokio::time::Instant::now() + gw.config.header_timeout);
            let mut looked_up = false;
            let fast = loop {
                match held.as_mut().filter(|b| !b.read.is_empty()) {
                    Some(bufs) => {
                        // Decided before anything is awaited: what `next` returns
                        // is not kept in the connection's state.
                        let pending = match next(gw, &bufs.read, &info, &mut bufs.head) {
                            Next::Serve(fast) => break fast,
                            Next::LookUp(pending) if !looked_up => Some(pending),
                            // hyper answers a head over the limit with 431.
                            Next::Partial if bufs.read.len() <= gw.config.max_header_bytes => None,
                            Next::HandOver | Next::Partial | Next::LookUp(_) => {
                                let read = std::mem::take(&mut bufs.read).freeze();
                                let rest = Rewind { read, io };
                                return Box::pin(gw.serve_hyper_h1(rest, info)).await;
                            }
                        };
                        if let Some(pending) = pending {
                            looked_up = true;
                            let asked = Box::pin(async {
                                let (credentials, host) = *pending;
                                gw.caller(&credentials.borrow(), &host).await
                            });
                            if deadline.within(asked).await.is_none() {
                                return;
                            }
                            continue;
                        }
                    }
                    None => {
                        // Idle: no buffers held, and nothing in flight to
                        // finish if the gateway stops.
                        let readable = deadline.within(io.wait_readable());
                        tokio::select! {
                            biased;
                            r = readable => match r {
                                Some(Ok(())) => {}
                                _ => return,
                            },
                            _ = &mut stopping => return,
                        }
                    }
                }
                let bufs = held.get_or_insert_with(Buffers::take);
                if bufs.read.capacity() - bufs.read.len() < 1024 {
                    bufs.read.reserve(READ_SIZE);
                }
                match deadline.within(io.read_buf(&mut bufs.read)).await {
                    Some(Ok(n)) if n > 0 => {}
                    // Closed, failed, or too slow to send its head.
                    _ => return,
                }
            };
            let bufs = held.as_mut().expect("a request was read");
            // Boxed: a request's state (about 4 KB: its body read, the
            // upstream exchange) lives only while it is in flight, not in every
            // idle connection's task.
            let kept_alive = Box::pin(exchange(gw, &mut io, fast, bufs, &mut deadline)).await;
            if !kept_alive {
                return;
            }
            if bufs.read.is_empty() {
                if let Some(bufs) = held.take() {
                    bufs.give_back();
                }
            }
        }
    }
}

/// Reads the body of `fast` (a request whose head `bufs.read` held), sends
/// it upstream and the answer back; false when the connection is done
/// (closed, failed, or to be closed after this response).
async fn exchange<I: Transport>(
    gw: &Arc<Gateway>,
    io: &mut I,
    mut fast: Fast,
    bufs: &mut Buffers,
    deadline: &mut Deadline,
) -> bool {
    bufs.read.advance(fast.used);
    if fast.body > 0 {
        // The whole body, within what is left of the head's time,
        // before anything goes upstream.
        if fast.expects_continue && bufs.read.len() < fast.body {
            let asked = deadline
                .within(async {
                    io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                    io.flush().await
                })
                .await;
            if !matches!(asked, Some(Ok(()))) {
                record_unfinished(gw, fast, 0, 0);
                return false;
            }
        }
        while bufs.read.len() < fast.body {
            bufs.read.reserve(fast.body - bufs.read.len());
            match deadline.within(io.read_buf(&mut bufs.read)).await {
                Some(Ok(n)) if n > 0 => {}
                cut => {
                    let status = if cut.is_none() { 408 } else { 0 };
                    record_unfinished(gw, fast, status, bufs.read.len());
                    return false;
                }
            }
        }
        bufs.head.extend_from_slice(&bufs.read[..fast.body]);
        bufs.read.advance(fast.body);
        fast.record.bytes_in = fast.body as u64;
    }
    let close = fast.close || *gw.shutdown.borrow();
    let done = respond(gw, io, fast, close, &bufs.head, &mut bufs.out, deadline).await;
    if done.is_err() || close {
        let _ = io.shutdown().await;
        return false;
    }
    true
}

/// Reads the request head at the start of `buf` and decides who serves it;
/// for a request served here, writes the upstream's request head into
/// `head`.
fn next(gw: &Gateway, buf: &[u8], conn: &ConnInfo, head: &mut Vec<u8>) -> Next {
    let started = Instant::now();
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        // Over the limit, hyper answers 431.
        Ok(httparse::Status::Complete(n)) if n <= gw.config.max_header_bytes => n,
        Ok(httparse::Status::Partial) => return Next::Partial,
        _ => return Next::HandOver,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        Some("POST") => Method::POST,
        Some(m) => match Method::from_bytes(m.as_bytes()) {
            Ok(m) if m != Method::CONNECT => m,
            _ => return Next::HandOver,
        },
        None => return Next::HandOver,
    };
    let raw_target = req.path.unwrap_or("");
    if req.version != Some(1)
        || !raw_target.starts_with('/')
        || raw_target.starts_with("/.well-known/")
    {
        return Next::HandOver;
    }
    // Routed, checked and forwarded as the upstream will read it; a path
    // that cannot be made canonical gets hyper's server and `proxy`'s 400.
    let Ok(target) = crate::target::normalize_target(raw_target) else {
        return Next::HandOver;
    };
    let path = target.split_once('?').map_or(&*target, |(p, _)| p);
    if path == SIGN_IN_PATH {
        return Next::HandOver;
    }
    let mut host_value: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut close = false;
    let mut body: Option<u64> = None;
    let mut expects_continue = false;
    let mut credentials = Credentials::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let text = || std::str::from_utf8(h.value).ok();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        // By length first: most headers are none of these.
        match name.len() {
            4 if is("host") => {
                hosts += 1;
                host_value = Some(h.value);
            }
            14 if is("content-length") => match (body, content_length(h.value)) {
                (None, Some(n)) => body = Some(n),
                // Repeated or not a number: hyper's answer.
                _ => return Next::HandOver,
            },
            17 if is("transfer-encoding") => return Next::HandOver,
            7 if is("upgrade") => return Next::HandOver,
            // Answered here (the upstream gets the body whole, so it
            // is not asked); any other expectation gets hyper's 417.
            6 if is("expect") && h.value.eq_ignore_ascii_case(b"100-continue") => {
                expects_continue = true
            }
            6 if is("expect") => return Next::HandOver,
            10 if is("connection") => {
                close |= h
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
            6 if is("cookie") && credentials.session.is_none() => {
                credentials.session = text().and_then(|v| cookie_in(v, SESSION_PAIR));
            }
            13 if is("authorization") => credentials.bearer = text().and_then(bearer_in),
            _ if is(crate::identity::HEADER) => credentials.assertion = text(),
            _ if is(SERVICE_HEADER) => credentials.service = text(),
            _ => {}
        }
    }
    let (1, Some(host_value)) = (hosts, host_value) else {
        return Next::HandOver;
    };
    let Some(authority) = std::str::from_utf8(host_value)
        .ok()
        .and_then(|h| crate::target::authority(h).ok())
    else {
        return Next::HandOver;
    };
    let host = &*authority.host;
    let Some(site) = gw.routes.load().lookup(host, path).cloned() else {
        return Next::HandOver;
    };
    let body = body.unwrap_or(0);
    // Over the site's limits: hyper's 413 or 431.
    if body > WHOLE_BODY.min(site.spec.max_body.unwrap_or(gw.config.max_body))
        || site.spec.max_header.is_some_and(|max| used > max)
        || site.spec.idle
        || site.upstreams.is_empty()
        || (!conn.tls && gw.acme().is_some() && gw.certs.has_acme(host))
    {
        return Next::HandOver;
    }
    let Some(caller) = gw.caller_known(&credentials, host) else {
        let pending = (OwnedCredentials::of(&credentials), host.to_string());
        return Next::LookUp(Box::new(pending));
    };
    if caller.identity.is_none() && site.needs_login(path) {
        return Next::HandOver;
    }
    gw.write_upstream_head(
        head,
        method.as_str(),
        &target,
        || {
            req.headers
                .iter()
                .filter(move |h| !(expects_continue && h.name.eq_ignore_ascii_case("expect")))
                .map(|h| (h.name, h.value))
        },
        authority.value.as_bytes(),
        conn,
        &site,
        &caller,
    );
    let record = RequestRecord::new(&site, host, &caller, &method, path, conn);
    Next::Serve(Fast {
        used,
        site,
        method,
        body: body as usize,
        expects_continue,
        record,
        started,
        close,
    })
}

/// A `Content-Length` value: digits only.
fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Records a request whose body never came whole: the client closed the
/// connection (0: recorded as 499) or was too slow (408). The connection
/// ends without an answer.
fn record_unfinished(gw: &Arc<Gateway>, fast: Fast, status: u16, bytes_in: usize) {
    let Fast {
        site,
        mut record,
        started,
        ..
    } = fast;
    record.status = status;
    record.bytes_in = bytes_in as u64;
    drop(Metering {
        gateway: gw.clone(),
        site,
        record: Some(record),
        started,
        bytes_in: None,
        in_flight: None,
    });
}

/// Sends the request upstream and streams the answer back. `Err` when the
/// client connection cannot go on (its write failed, or the upstream broke
/// off inside the body).
async fn respond<I>(
    gw: &Arc<Gateway>,
    io: &mut I,
    fast: Fast,
    close: bool,
    head: &[u8],
    out: &mut Vec<u8>,
    upstream_deadline: &mut Deadline,
) -> io::Result<()>
where
    I: AsyncWrite + Unpin,
{
    let Fast {
        site,
        method,
        record,
        started,
        ..
    } = fast;
    let host = record.host.clone();
    let path = record.path.clone();
    let mut metering = Metering {
        gateway: gw.clone(),
        site: site.clone(),
        record: Some(record),
        started,
        bytes_in: None,
        in_flight: None,
    };
    out.clear();
    let exchanged = match gw
        .exchange_waking(
            site,
            &host,
            &method,
            &path,
            head,
            started,
            upstream_deadline,
        )
        .await
    {
        Ok(e) => e,
        Err(answer) => {
            if let Some(r) = metering.record.as_mut() {
                r.status = answer.status().as_u16();
            }
            write_full(answer, close, out);
            io.write_all(out).await?;
            return io.flush().await;
        }
    };
    exchanged.head.write_for_client(out, close);
    let chunked = exchanged.head.chunked_to_client();
    let mut body = exchanged.begin(&mut metering);
    loop {
        // What has arrived goes out with the head, in one write.
        let done = match take_ready(&mut body, out, chunked, &mut metering) {
            Ok(done) => done,
            Err(e) => {
                io.write_all(out).await?;
                return Err(io::Error::other(e));
            }
        };
        if !out.is_empty() {
            io.write_all(out).await?;
            io.flush().await?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        // Wait for more of the body.
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    push_data(out, data, chunked, &mut metering);
                }
            }
            None => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                io.write_all(out).await?;
                return io.flush().await;
            }
            Some(Err(e)) => return Err(io::Error::other(e)),
        }
    }
}

/// Moves the body frames that are there already into `out` (up to a
/// batch); true when the body is done (its end is in `out`).
fn take_ready(
    body: &mut crate::upstream::DirectBody,
    out: &mut Vec<u8>,
    chunked: bool,
    metering: &mut Metering,
) -> Result<bool, crate::body::BoxError> {
    let mut cx = Context::from_waker(Waker::noop());
    while out.len() < WRITE_BATCH {
        if !chunked {
            if let Some(n) = body.take_buffered(out) {
                if let Some(r) = metering.record.as_mut() {
                    r.bytes_out += n as u64;
                }
                continue;
            }
        }
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    push_data(out, data, chunked, metering);
                }
            }
            Poll::Ready(None) => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                return Ok(true);
            }
            Poll::Ready(Some(Err(e))) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(false)
}

/// Appends body bytes, as a chunk when the body goes chunked.
fn push_data(out: &mut Vec<u8>, data: &[u8], chunked: bool, metering: &mut Metering) {
    if data.is_empty() {
        return;
    }
    if let Some(r) = metering.record.as_mut() {
        r.bytes_out += data.len() as u64;
    }
    if chunked {
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// Writes one of the gateway's own answers (a problem document, whole).
fn write_full(answer: Response<ResponseBody>, close: bool, out: &mut Vec<u8>) {
    let (parts, body) = answer.into_parts();
    let body = body.into_bytes().unwrap_or_default();
    put_status_line(out, parts.status);
    for (name, value) in &parts.headers {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    put_header(out, b"content-length", body.len().to_string().as_bytes());
    if close {
        put_header(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
}

/// A connection with bytes already read from it, read again first: what
/// hyper gets when it takes a connection over.
pub(crate) struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what an async fn taking three arguments returns.
    fn future_size<A, B, C, F>(_: impl Fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle keep-alive connection is its task: what a request needs while
    /// in flight is boxed apart (it was 4.8 KB inline).
    #[test]
    fn an_idle_connections_task_stays_small() {
        let size = future_size(serve::<tokio::net::TcpStream>);
        assert!(size <= 1024, "h1::serve's state over TCP: {size} bytes");
    }
}
