//! A small HTTP/1.1 client for the common case: a request without a body
//! (GET, HEAD) to an upstream. The exchange runs in the request's own task —
//! no connection task, no channel, no extra wake-ups per request, which is
//! most of what a general client costs a proxy. The response head is parsed
//! with `httparse`; the body is streamed as it arrives ([`DirectBody`]), and
//! the connection goes back to its upstream's pool when the body is done.
//!
//! Everything else (request bodies, upgrades) goes through hyper's client.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::BoxError;

/// An open HTTP/1.1 connection to an upstream, through hyper's client
/// (requests with bodies, upgrades).
pub(crate) type Sender = hyper::client::conn::http1::SendRequest<crate::request_body::RequestBody>;

/// Most headers a response may have.
const MAX_HEADERS: usize = 128;
/// Bytes read from an upstream at a time.
const READ_SIZE: usize = 16 * 1024;

/// An open connection to an upstream, with what was read but not used yet.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

/// Idle connections of one upstream, shared by every client connection.
pub type Pool = Mutex<Vec<Conn>>;

/// Why an exchange failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing of a response arrived: the upstream may never have seen the
    /// request (a reused connection it had closed), so it may be sent again.
    Unanswered(io::Error),
    /// The upstream answered with something that is not HTTP/1.x, or
    /// failed midway.
    Broken(String),
}

/// A response head and how its body is framed.
pub struct Head {
    pub status: StatusCode,
    /// The head as the upstream sent it (status line and headers).
    raw: Bytes,
    /// Where each header's name and value are in `raw` (start, end of
    /// each): the head is parsed once.
    fields: Vec<[u32; 4]>,
    framing: Framing,
    /// The connection may carry another request once the body is read.
    reusable: bool,
    /// `Connection` names headers (other than `close`, `keep-alive`) that
    /// are hop-by-hop.
    names_hops: bool,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Conn {
    pub async fn connect(addr: std::net::SocketAddr) -> io::Result<Conn> {
        let io = TcpStream::connect(addr).await?;
        io.set_nodelay(true)?;
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(READ_SIZE),
        })
    }

    /// True if the upstream closed the connection (or sent something
    /// unasked) while it sat idle: it must not be used again.
    pub fn is_stale(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self.io.try_read(&mut probe) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => !self.buf.is_empty(),
            _ => true,
        }
    }

    /// Writes `request` (a whole request: its head and any body) and reads
    /// the response head. `max_head` bounds the head's size.
    pub async fn send(
        mut self,
        request: &[u8],
        method: &Method,
        max_head: usize,
    ) -> Result<(Head, Conn), SendError> {
        self.io
            .write_all(request)
            .await
            .map_err(SendError::Unanswered)?;
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                match parse_head(&self.buf, method)? {
                    Parsed::Head(head, used) => {
                        self.buf.advance(used);
                        return Ok((head, self));
                    }
                    // 1xx (100 Continue, 103 Early Hints): read on.
                    Parsed::Informational(used) => {
                        self.buf.advance(used);
                        continue;
                    }
                    Parsed::Partial if self.buf.len() > max_head => {
                        return Err(SendError::Broken(format!(
                            "response head larger than {max_head} bytes"
                        )))
                    }
                    Parsed::Partial => {}
                }
            }
            make_room(&mut self.buf);
            let n = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf)
                .await
                .map_err(|e| {
                    if answered {
                        SendError::Broken(e.to_string())
                    } else {
                        SendError::Unanswered(e)
                    }
                })?;
            if n == 0 {
                return Err(if answered {
                    SendError::Broken("connection closed inside the response head".into())
                } else {
                    SendError::Unanswered(io::ErrorKind::UnexpectedEof.into())
                });
            }
        }
    }
}

enum Parsed {
    Head(Head, usize),
    Informational(usize),
    Partial,
}

fn parse_head(buf: &[u8], method: &Method) -> Result<Parsed, SendError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let used = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(SendError::Broken(format!("bad response head: {e}"))),
    };
    let code = res.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| SendError::Broken(format!("bad status {code}")))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(SendError::Broken("switched protocols unasked".into()));
        }
        return Ok(Parsed::Informational(used));
    }
    let http10 = res.version == Some(0);
    let (mut length, mut chunked, mut close, mut keep_alive) = (None, false, http10, false);
    let mut names_hops = false;
    let mut fields = Vec::with_capacity(res.headers.len());
    let offset = |part: &[u8]| (part.as_ptr() as usize - buf.as_ptr() as usize) as u32;
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        let (n, v) = (offset(name), offset(h.value));
        fields.push([n, n + name.len() as u32, v, v + h.value.len() as u32]);
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| SendError::Broken("bad content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Broken("conflicting content-lengths".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Chunked only counts as the last coding.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                let is_close = token.eq_ignore_ascii_case(b"close");
                let is_keep_alive = token.eq_ignore_ascii_case(b"keep-alive");
                close |= is_close;
                keep_alive |= is_keep_alive;
                names_hops |= !is_close && !is_keep_alive && !token.is_empty();
            }
        }
    }
    if http10 && keep_alive {
        close = false;
    }
    let no_body = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if chunked {
        // A length beside chunked is ignored (RFC 9112 6.3), and dropped.
        Framing::Chunked
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::UntilClose
    };
    let reusable = !close && !matches!(framing, Framing::UntilClose);
    Ok(Parsed::Head(
        Head {
            status,
            raw: Bytes::copy_from_slice(&buf[..used]),
            fields,
            framing,
            reusable,
            names_hops,
        },
        used,
    ))
}

impl Head {
    /// Calls `each` with every header (name, value) as the upstream sent it.
    fn for_each_header(&self, mut each: impl FnMut(&[u8], &[u8])) {
        for &[ns, ne, vs, ve] in &self.fields {
            let range = |a: u32, b: u32| &self.raw[a as usize..b as usize];
            each(range(ns, ne), range(vs, ve));
        }
    }

    /// True for a header that does not go on to the client: a hop-by-hop
    /// one, a `Set-Cookie` of the platform's cookies, or a length the
    /// framing overrides.
    fn withheld(&self, name_bytes: &[u8], value: &[u8], connection: &[&[u8]]) -> bool {
        crate::headers::is_stripped_any_case(name_bytes, false)
            || crate::headers::named_by_connection(name_bytes, connection)
            || (name_bytes.eq_ignore_ascii_case(b"set-cookie")
                && crate::headers::is_platform_set_cookie(value))
            || (matches!(self.framing, Framing::Chunked)
                && name_bytes.eq_ignore_ascii_case(b"content-length"))
    }

    /// The `Connection` header values naming hop-by-hop headers.
    fn connection_values(&self) -> Vec<Vec<u8>> {
        let mut values = Vec::new();
        if !self.names_hops {
            return values;
        }
        self.for_each_header(|name, value| {
            if name.eq_ignore_ascii_case(b"connection") {
                values.push(value.to_vec());
            }
        });
        values
    }

    /// The headers as hyper's server takes them, less those withheld.
    pub fn header_map(&self) -> HeaderMap {
        let connection = self.connection_values();
        let connection: Vec<&[u8]> = connection.iter().map(Vec::as_slice).collect();
        let mut map = HeaderMap::new();
        self.for_each_header(|name, value| {
            if self.withheld(name, value, &connection) {
                return;
            }
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                map.append(n, v);
            }
        });
        map
    }

    /// True when the body goes to an HTTP/1.1 client chunked (its length is
    /// not known up front).
    pub fn chunked_to_client(&self) -> bool {
        matches!(self.framing, Framing::Chunked | Framing::UntilClose)
    }

    /// Writes the response head for an HTTP/1.1 client: the upstream's
    /// headers less those withheld, the framing, and `Connection: close`
    /// when the client connection ends with this response.
    pub fn write_for_client(&self, out: &mut Vec<u8>, close: bool) {
        put_status_line(out, self.status);
        let connection = self.connection_values();
        let connection: Vec<&[u8]> = connection.iter().map(Vec::as_slice).collect();
        self.for_each_header(|name, value| {
            if !self.withheld(name, value, &connection) {
                put_header(out, name, value);
            }
        });
        if self.chunked_to_client() {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Where a chunked body's decoder is.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Reading a size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines until an empty one.
    Trailers,
}

/// A response body read straight off the upstream connection.
pub struct DirectBody {
    conn: Option<Conn>,
    framing: Framing,
    chunk: Chunk,
    reusable: bool,
    pool: Arc<Pool>,
    keep: usize,
    done: bool,
}

impl DirectBody {
    /// The body that follows `head` on `conn`; the connection goes back to
    /// `pool` (holding at most `keep`) when the body is done.
    pub fn new(head: &Head, conn: Conn, pool: Arc<Pool>, keep: usize) -> DirectBody {
        let mut body = DirectBody {
            conn: Some(conn),
            framing: head.framing,
            chunk: Chunk::Size,
            reusable: head.reusable,
            pool,
            keep,
            done: false,
        };
        if matches!(head.framing, Framing::Empty) {
            body.finish();
        }
        body
    }

    /// The body is read whole: the connection may serve another request.
    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take() {
            if self.reusable && conn.buf.is_empty() {
                let mut idle = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < self.keep {
                    idle.push(conn);
                }
            }
        }
    }

    /// Appends to `out` what has arrived of a body framed by its length,
    /// without making a frame of it: the number of bytes, or `None` when
    /// there is nothing to take this way (then `poll_frame` goes on).
    pub fn take_buffered(&mut self, out: &mut Vec<u8>) -> Option<usize> {
        let Framing::Length(left) = self.framing else {
            return None;
        };
        let conn = self.conn.as_mut().filter(|c| !c.buf.is_empty())?;
        let n = (conn.buf.len() as u64).min(left) as usize;
        out.extend_from_slice(&conn.buf[..n]);
        conn.buf.advance(n);
        self.framing = Framing::Length(left - n as u64);
        if left == n as u64 {
            self.finish();
        }
        Some(n)
    }

    /// Reads more from the upstream into the buffer; `Ok(0)` at its end.
    fn poll_fill(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        make_room(&mut conn.buf);
        let spare = conn.buf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        ready!(Pin::new(&mut conn.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: poll_read initialised the first n bytes of the spare capacity.
        unsafe { conn.buf.set_len(conn.buf.len() + n) };
        Poll::Ready(Ok(n))
    }
}

/// Spare room for the next read, growing the buffer only when it is nearly
/// full (a buffer nobody else holds is compacted in place, not reallocated).
fn make_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_SIZE);
    }
}

/// The first `n` bytes of `buf`. Small pieces are copied, so the read
/// buffer stays the connection's own and is reused; large ones are handed
/// over without a copy.
fn take(buf: &mut BytesMut, n: usize) -> Bytes {
    if n <= 4096 {
        let data = Bytes::copy_from_slice(&buf[..n]);
        buf.advance(n);
        data
    } else {
        buf.split_to(n).freeze()
    }
}

fn broken(what: &str) -> BoxError {
    Box::new(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing {
                Framing::Empty => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    if conn.buf.is_empty() {
                        match ready!(Self::poll_fill(conn, cx)) {
                            Ok(0) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(broken(
                                    "the upstream closed the connection inside the body",
                                ))));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(Box::new(e))));
                            }
                        }
                    }
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = take(&mut conn.buf, n);
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::UntilClose => {
                    if conn.buf.is_empty() {
                        match ready!(Self::poll_fill(conn, cx)) {
                            Ok(0) => {
                                this.reusable = false;
                                this.finish();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(Box::new(e))));
                            }
                        }
                    }
                    let n = conn.buf.len();
                    let data = take(&mut conn.buf, n);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked => match decode_chunk(&mut this.chunk, &mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => match ready!(Self::poll_fill(conn, cx)) {
                        Ok(0) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(broken(
                                "the upstream closed the connection inside a chunked body",
                            ))));
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            this.conn = None;
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                    },
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(broken(e))));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

enum Decoded {
    Data(Bytes),
    End,
    NeedMore,
}

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 8 * 1024;

/// Takes what it can of a chunked body from `buf`.
fn decode_chunk(state: &mut Chunk, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
    loop {
        match *state {
            Chunk::Size => {
                let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() > MAX_LINE {
                        return Err("chunk size line too long");
                    }
                    return Ok(Decoded::NeedMore);
                };
                let line = &buf[..end];
                let digits = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                let size = std::str::from_utf8(digits)
                    .ok()
                    .filter(|d| !d.is_empty() && d.len() <= 16)
                    .and_then(|d| u64::from_str_radix(d, 16).ok())
                    .ok_or("bad chunk size")?;
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = (buf.len() as u64).min(left) as usize;
                let data = take(buf, n);
                *state = if left == n as u64 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n as u64)
                };
                return Ok(Decoded::Data(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF");
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() > MAX_LINE {
                        return Err("trailer line too long");
                    }
                    return Ok(Decoded::NeedMore);
                };
                buf.advance(end + 2);
                if end == 0 {
                    return Ok(Decoded::End);
                }
                // Trailers are dropped (few apps send them; none rely on a proxy passing them).
            }
        }
    }
}

/// Appends one header line.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 status line.
pub(crate) fn put_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, &'static str> {
        let mut state = Chunk::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split) {
            buf.extend_from_slice(piece);
            loop {
                match decode_chunk(&mut state, &mut buf)? {
                    Decoded::Data(d) => out.extend_from_slice(&d),
                    Decoded::End => return Ok(out),
                    Decoded::NeedMore => break,
                }
            }
        }
        Err("unfinished")
    }

    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
        for split in [1, 2, 3, 7, body.len()] {
            assert_eq!(decode_all(body, split).unwrap(), b"hello, world", "{split}");
        }
        assert_eq!(decode_all(b"zz\r\n", 4), Err("bad chunk size"));
        assert_eq!(
            decode_all(b"2\r\nabXY0\r\n\r\n", 16),
            Err("chunk data not followed by CRLF")
        );
        assert_eq!(decode_all(b"5\r\nhel", 16), Err("unfinished"));
    }

    #[test]
    fn heads_tell_how_the_body_is_framed() {
        let head = |raw: &[u8], method: Method| match parse_head(raw, &method) {
            Ok(Parsed::Head(h, _)) => h,
            _ => panic!("not a head"),
        };
        let h = head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET);
        assert!(matches!(h.framing, Framing::Length(5)) && h.reusable);
        let h = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            Method::HEAD,
        );
        assert!(matches!(h.framing, Framing::Empty));
        let h = head(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            Method::GET,
        );
        assert!(matches!(h.framing, Framing::Chunked));
        assert!(!h.header_map().contains_key(http::header::CONTENT_LENGTH));
        let h = head(b"HTTP/1.0 200 OK\r\n\r\n", Method::GET);
        assert!(matches!(h.framing, Framing::UntilClose) && !h.reusable);
        let h = head(
            b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            Method::GET,
        );
        assert!(matches!(h.framing, Framing::Empty) && !h.reusable);
        assert!(matches!(
            parse_head(b"HTTP/1.1 100 Continue\r\n\r\n", &Method::GET),
            Ok(Parsed::Informational(25))
        ));
        assert!(matches!(
            parse_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &Method::GET
            ),
            Err(SendError::Broken(_))
        ));
    }
}
