//! A response body that holds a request's admission guard (a place among the
//! requests in progress, server-wide or per tenant) until the call ends: the
//! guard is released as the trailers (the status) are handed over, before the
//! client can see the call end, so its next call never finds the place still
//! taken; or when the body is dropped (the client went away). A stream thus
//! counts until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::Status;

/// `response` with `guard` held until its body ends; unchanged without one.
pub fn hold_until_end<G: Send + Unpin + 'static>(
    response: http::Response<Body>,
    guard: Option<G>,
) -> http::Response<Body> {
    match guard {
        Some(guard) => response.map(|body| {
            Body::new(HeldBody {
                body,
                guard: Some(guard),
            })
        }),
        None => response,
    }
}

struct HeldBody<G> {
    body: Body,
    guard: Option<G>,
}

impl<G: Send + Unpin + 'static> http_body::Body for HeldBody<G> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Ready(_) => true,
            Poll::Pending => false,
        };
        if ended {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
