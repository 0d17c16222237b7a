//! Admission: one tower layer, generic over a policy ([`Admit`]), that lets a
//! request through or refuses it with the policy's status, and holds the
//! place an admitted request was given until its call ends. Load shedding
//! ([`super::shedding`]) and authentication with the tenant limit
//! ([`super::auth`]) are its policies, checked in that order as a pair.
//!
//! Who the caller is is checked on the headers, at once. A place is taken
//! only once the request's first message has arrived (a unary request's
//! message, a stream's first one; or the body ended, or 1 MiB of it came):
//! a client that sends headers and nothing more holds no place, and ends
//! after `--request-idle-timeout-seconds` ([`super::idle`]). The call itself
//! goes on meanwhile (a stream's response headers are sent: some clients
//! send their first message only once they have them); its request body
//! asks for the place and hands the bytes read while waiting on unchanged,
//! or fails with the refusal, which tonic answers as the call's status.
//!
//! The place is released as the response's trailers (the status) are handed
//! over, before the client can see the call end, so its next call never finds
//! the place still taken; or when the body is dropped (the client went away).
//! A stream thus holds its place until it ends. Nothing waits in a queue for
//! a place.
//!
//! The admitted request then runs as its caller ([`crate::compute::Caller`]:
//! tenant and connection), the key the compute pool schedules fairly by.
//!
//! `grpc.health.v1.Health` is always admitted: probes carry no token, and an
//! overloaded server is still alive and must not be restarted by its liveness
//! probe.
//!
//! Owns no domain logic and knows nothing of sessions.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use super::idle::IdleBody;
use crate::auth::Principal;
use crate::compute::Caller;
use crate::telemetry::rpc::is_health_check;

/// A request is admitted once this much of its body has arrived, even when
/// its first message is larger: what waits for admission stays small.
const FIRST_MESSAGE_WAIT_BYTES: usize = 1 << 20;

/// Whether a request may proceed.
pub trait Admit: Send + Sync + 'static {
    /// What an admitted request holds until its call ends (a place among
    /// the requests in progress).
    type Place: Send + Unpin + 'static;

    /// Checked on the headers, before anything else: who the caller is
    /// (may add to the request's extensions), or the status refusing it.
    fn identify(
        &self,
        _headers: &http::HeaderMap,
        _extensions: &mut http::Extensions,
    ) -> Result<(), Status> {
        Ok(())
    }

    /// The request's place (`None` where no limit applies), or the status
    /// refusing it; asked once its first message has arrived.
    fn admit(
        &self,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Self::Place>, Status>;
}

/// Two policies, the first one's place taken first (and given back if the
/// second refuses).
impl<A: Admit, B: Admit> Admit for (Arc<A>, Arc<B>) {
    type Place = (Option<A::Place>, Option<B::Place>);

    fn identify(
        &self,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<(), Status> {
        self.0.identify(headers, extensions)?;
        self.1.identify(headers, extensions)
    }

    fn admit(
        &self,
        headers: &http::HeaderMap,
        extensions: &mut http::Extensions,
    ) -> Result<Option<Self::Place>, Status> {
        let first = self.0.admit(headers, extensions)?;
        let second = self.1.admit(headers, extensions)?;
        Ok(Some((first, second)))
    }
}

/// The tower layer admitting requests by `policy`.
pub struct AdmissionLayer<A> {
    policy: Arc<A>,
    idle_timeout: Option<Duration>,
}

impl<A> AdmissionLayer<A> {
    /// Requests admitted by `policy`, each ended once it has sent nothing
    /// for `idle_timeout` while awaited (None: never).
    pub fn new(policy: Arc<A>, idle_timeout: Option<Duration>) -> Self {
        AdmissionLayer {
            policy,
            idle_timeout,
        }
    }
}

impl<A> Clone for AdmissionLayer<A> {
    fn clone(&self) -> Self {
        AdmissionLayer {
            policy: self.policy.clone(),
            idle_timeout: self.idle_timeout,
        }
    }
}

impl<S, A> tower::Layer<S> for AdmissionLayer<A> {
    type Service = Admission<S, A>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            policy: self.policy.clone(),
            idle_timeout: self.idle_timeout,
        }
    }
}

pub struct Admission<S, A> {
    inner: S,
    policy: Arc<A>,
    idle_timeout: Option<Duration>,
}

impl<S: Clone, A> Clone for Admission<S, A> {
    fn clone(&self) -> Self {
        Admission {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
            idle_timeout: self.idle_timeout,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, A> tower::Service<http::Request<Body>> for Admission<S, A>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    A: Admit,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the ready service handles this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if is_health_check(request.uri().path()) {
            return Box::pin(inner.call(request));
        }
        let (mut parts, body) = request.into_parts();
        if let Err(status) = self.policy.identify(&parts.headers, &mut parts.extensions) {
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let caller = caller(&parts.extensions);
        // The call goes on at once (a stream's response headers must not
        // wait for its first message: some clients send only once they have
        // them); its body asks for the place when the first message is in.
        let place = Arc::new(Mutex::new(None));
        let body = Admitting {
            body: IdleBody::new(body, self.idle_timeout),
            waiting: Some(Waiting {
                policy: self.policy.clone(),
                headers: parts.headers.clone(),
                extensions: parts.extensions.clone(),
                prefix: Vec::with_capacity(5),
                received: 0,
                place: place.clone(),
            }),
            frames: VecDeque::new(),
            ended: false,
        };
        let request = http::Request::from_parts(parts, Body::new(body));
        Box::pin(async move {
            let response = crate::compute::as_caller(caller, inner.call(request)).await?;
            Ok(hold_until_end(response, Some(place)))
        })
    }
}

/// The caller the compute pool schedules by: the tenant (from the
/// [`Principal`] the policies put in) and the connection (its peer address).
fn caller(extensions: &http::Extensions) -> Caller {
    let tenant = extensions
        .get::<Principal>()
        .map_or_else(String::new, |principal| principal.tenant.clone());
    let peer = extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        });
    Caller::new(tenant, peer)
}

/// The request's place, once its first message has arrived (shared by the
/// request body that takes it and the response that gives it back).
type PlaceSlot<P> = Arc<Mutex<Option<P>>>;

/// The request body, which takes the request's place once its first message
/// has arrived (or the body ended, or ended in trailers, or
/// [`FIRST_MESSAGE_WAIT_BYTES`] arrived, or its first message announced more
/// than that: the handler then answers what tonic makes of it) and hands the
/// frames read so far on unchanged. A refusal is the body's error, which
/// tonic answers as the call's status.
struct Admitting<A: Admit> {
    body: IdleBody,
    /// Some until the place is taken (or refused).
    waiting: Option<Waiting<A>>,
    frames: VecDeque<http_body::Frame<Bytes>>,
    /// The client's body ended (or was refused): nothing more to poll.
    ended: bool,
}

struct Waiting<A: Admit> {
    policy: Arc<A>,
    headers: http::HeaderMap,
    extensions: http::Extensions,
    /// The gRPC message prefix: a compression flag, the length (u32 BE).
    prefix: Vec<u8>,
    received: usize,
    place: PlaceSlot<A::Place>,
}

impl<A: Admit> Waiting<A> {
    /// Counts `frame`; whether the first message is now in.
    fn arrived(&mut self, frame: &http_body::Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            let mut data = data.clone();
            self.received = self.received.saturating_add(data.len());
            while self.prefix.len() < 5 && data.has_remaining() {
                self.prefix.push(data.get_u8());
            }
        }
        if frame.is_trailers() || self.received >= FIRST_MESSAGE_WAIT_BYTES {
            return true;
        }
        match self.prefix[..] {
            [_, a, b, c, d] => {
                let length = u32::from_be_bytes([a, b, c, d]) as usize;
                self.received >= length.saturating_add(5)
            }
            _ => false,
        }
    }

    /// Takes the place (into the slot the response holds), or the refusal.
    fn admit(mut self) -> Result<(), Status> {
        let place = self.policy.admit(&self.headers, &mut self.extensions)?;
        *self.place.lock().unwrap_or_else(|p| p.into_inner()) = place;
        Ok(())
    }
}

impl<A: Admit> http_body::Body for Admitting<A> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        let this = &mut *self;
        while this.waiting.is_some() {
            let polled = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(polled) => polled,
                Poll::Pending => return Poll::Pending,
            };
            let complete = match polled {
                None => {
                    this.ended = true;
                    true
                }
                Some(Err(status)) => {
                    // Idle, or reset: the call ends without a place.
                    this.waiting = None;
                    this.ended = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Some(Ok(frame)) => {
                    let complete = this.waiting.as_mut().is_some_and(|w| w.arrived(&frame));
                    this.frames.push_back(frame);
                    complete
                }
            };
            if complete {
                if let Some(waiting) = this.waiting.take() {
                    if let Err(refused) = waiting.admit() {
                        this.frames.clear();
                        this.ended = true;
                        return Poll::Ready(Some(Err(refused)));
                    }
                }
            }
        }
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none()
            && self.frames.is_empty()
            && (self.ended || self.body.is_end_stream())
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
