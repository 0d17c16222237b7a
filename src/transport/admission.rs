//! Admission: one tower layer, generic over a policy ([`Admit`]), that lets a
//! request through or refuses it at once with the policy's status, and holds
//! the place an admitted request was given until its call ends. Load
//! shedding ([`super::shedding`]) and authentication with the tenant limit
//! ([`super::auth`]) are its two policies.
//!
//! The place is released as the response's trailers (the status) are handed
//! over, before the client can see the call end, so its next call never finds
//! the place still taken; or when the body is dropped (the client went away).
//! A stream thus holds its place until it ends. Nothing waits in a queue.
//!
//! `grpc.health.v1.Health` is always admitted: probes carry no token, and an
//! overloaded server is still alive and must not be restarted by its liveness
//! probe.
//!
//! Owns no domain logic and knows nothing of sessions.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::Status;

use crate::telemetry::rpc::is_health_check;

/// Whether a request may proceed.
pub trait Admit: Send + Sync + 'static {
    /// What an admitted request holds until its call ends (a place among
    /// the requests in progress).
    type Place: Send + Unpin + 'static;

    /// The request's place (`None` where no limit applies), or the status
    /// refusing it. May add to the request's extensions (who the caller is).
    fn admit(
        &self,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Self::Place>, Status>;
}

/// The tower layer admitting requests by `policy`.
pub struct AdmissionLayer<A> {
    policy: Arc<A>,
}

impl<A> AdmissionLayer<A> {
    pub fn new(policy: Arc<A>) -> Self {
        AdmissionLayer { policy }
    }
}

impl<A> Clone for AdmissionLayer<A> {
    fn clone(&self) -> Self {
        AdmissionLayer {
            policy: self.policy.clone(),
        }
    }
}

impl<S, A> tower::Layer<S> for AdmissionLayer<A> {
    type Service = Admission<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            policy: self.policy.clone(),
        }
    }
}

pub struct Admission<S, A> {
    inner: S,
    policy: Arc<A>,
}

impl<S: Clone, A> Clone for Admission<S, A> {
    fn clone(&self) -> Self {
        Admission {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, A, B> tower::Service<http::Request<B>> for Admission<S, A>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    A: Admit,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the ready service handles this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if is_health_check(request.uri().path()) {
            return Box::pin(inner.call(request));
        }
        let (mut parts, body) = request.into_parts();
        let place = match self.policy.admit(&parts.headers, &mut parts.extensions) {
            Ok(place) => place,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let request = http::Request::from_parts(parts, body);
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(hold_until_end(response, place))
        })
    }
}

/// `response` with `place` held until its body ends; unchanged without one.
fn hold_until_end<P: Send + Unpin + 'static>(
    response: http::Response<Body>,
    place: Option<P>,
) -> http::Response<Body> {
    match place {
        Some(place) => response.map(|body| {
            Body::new(HeldBody {
                body,
                place: Some(place),
            })
        }),
        None => response,
    }
}

struct HeldBody<P> {
    body: Body,
    place: Option<P>,
}

impl<P: Send + Unpin + 'static> http_body::Body for HeldBody<P> {
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
            self.place = None;
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
