//! The client's body on its way upstream: counted, and cut off at the
//! site's limit. A leaf, so the upstream connections can name it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::BoxError;

/// The client's body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: Option<Arc<AtomicU64>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds the site's limit of {0} bytes")]
pub struct TooLarge(pub u64);

/// The client sent a body that is not valid HTTP (a malformed chunk size,
/// a connection cut mid-body): the client's error, answered 400, never
/// counted against the site.
#[derive(Debug, thiserror::Error)]
#[error("the request body is malformed: {0}")]
pub struct BadBody(hyper::Error);

impl RequestBody {
    /// `seen` receives the byte count (None when the request has no body).
    pub fn new(inner: Incoming, limit: u64, seen: Option<Arc<AtomicU64>>) -> RequestBody {
        RequestBody { inner, limit, seen }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(seen)) = (frame.data_ref(), &this.seen) {
                    let total =
                        seen.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                    if total > this.limit {
                        return Poll::Ready(Some(Err(Box::new(TooLarge(this.limit)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(BadBody(e))))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
