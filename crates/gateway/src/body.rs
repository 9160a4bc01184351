//! Bodies streamed through the gateway, counted on the way.
//!
//! [`RequestBody`] wraps what the client sends: it counts bytes and cuts a
//! body off at the site's limit. [`ResponseBody`] wraps what goes back: it
//! counts bytes and, when dropped (response finished, failed or abandoned by
//! the client), hands the request's usage record to the tap — so every
//! metered request yields exactly one record.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::routes::Site;
use crate::usage::RequestRecord;
use crate::Gateway;

pub use crate::BoxError;

pub use crate::request_body::{BadBody, RequestBody, TooLarge};

/// The status recorded for a request its client abandoned before the answer.
pub const CLIENT_CLOSED: u16 = 499;

/// The usage of one request, recorded when its response body is dropped.
pub struct Metering {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) site: Arc<Site>,
    /// Taken when recorded.
    pub(crate) record: Option<RequestRecord>,
    pub(crate) started: Instant,
    pub(crate) bytes_in: Option<Arc<AtomicU64>>,
    /// The request counts as in flight at its upstream until recorded.
    pub(crate) in_flight: Option<crate::routes::InFlight>,
}

impl Drop for Metering {
    fn drop(&mut self) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let r = &mut record;
        if r.status == 0 {
            // Dropped before an answer: the client went away (nginx's 499).
            r.status = CLIENT_CLOSED;
        }
        r.duration_us = self.started.elapsed().as_micros() as u64;
        if let Some(seen) = &self.bytes_in {
            r.bytes_in = seen.load(Ordering::Relaxed);
        }
        let stats = &self.site.stats;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if r.status >= 500 {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        stats.bytes_in.fetch_add(r.bytes_in, Ordering::Relaxed);
        stats.bytes_out.fetch_add(r.bytes_out, Ordering::Relaxed);
        self.gateway.metrics.observe(r.status, r.duration_us);
        self.gateway.tap.record(record);
        self.in_flight.take();
    }
}

enum Inner {
    Upstream(Incoming),
    Direct(crate::upstream::DirectBody),
    Full(Option<Bytes>),
}

/// What the gateway answers with.
pub struct ResponseBody {
    inner: Inner,
    metering: Option<Box<Metering>>,
}

impl ResponseBody {
    pub fn upstream(body: Incoming) -> ResponseBody {
        ResponseBody {
            inner: Inner::Upstream(body),
            metering: None,
        }
    }

    /// A body read straight off an upstream connection.
    pub fn direct(body: crate::upstream::DirectBody) -> ResponseBody {
        ResponseBody {
            inner: Inner::Direct(body),
            metering: None,
        }
    }

    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        ResponseBody {
            inner: Inner::Full(Some(bytes.into())),
            metering: None,
        }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: Inner::Full(None),
            metering: None,
        }
    }

    /// The whole body, for one the gateway made itself.
    pub(crate) fn into_bytes(self) -> Option<Bytes> {
        match self.inner {
            Inner::Full(b) => Some(b.unwrap_or_default()),
            _ => None,
        }
    }

    /// Records `metering` once this body is finished or dropped.
    pub(crate) fn metered(mut self, mut metering: Box<Metering>, status: u16) -> ResponseBody {
        if let Some(r) = metering.record.as_mut() {
            r.status = status;
        }
        self.metering = Some(metering);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Inner::Direct(b) => Pin::new(b).poll_frame(cx),
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(m)) = (&polled, this.metering.as_mut()) {
            if let (Some(data), Some(r)) = (frame.data_ref(), m.record.as_mut()) {
                r.bytes_out += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Direct(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Direct(b) => b.size_hint(),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// A connection that counts the bytes read from it: the two ends of an
/// upgraded (WebSocket) tunnel, whose traffic is the request's usage.
pub(crate) struct Counted<T> {
    io: T,
    pub(crate) read: u64,
}

impl<T> Counted<T> {
    pub(crate) fn new(io: T) -> Counted<T> {
        Counted { io, read: 0 }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
