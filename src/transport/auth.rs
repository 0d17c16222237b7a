//! The authentication layer: a tower layer in front of every service that
//! checks the bearer token, puts the caller's [`Principal`] into the request's
//! extensions for the handlers, and enforces the per-tenant limit on requests
//! in progress.
//!
//! `grpc.health.v1.Health` passes without a token (probes carry none); every
//! other path, reflection included, needs one when a tokens file is
//! configured. Without one, every request is [`Principal::anonymous`].
//! Refusals never echo the token.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::Status;

use super::held_body::hold_until_end;
use crate::auth::{Principal, Tokens};

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// Who may call, and how many requests each tenant may have in progress.
pub struct Gate {
    tokens: Option<Arc<Tokens>>,
    max_in_flight: Option<u64>,
    in_flight: Mutex<HashMap<String, u64>>,
}

impl Gate {
    pub fn new(tokens: Option<Arc<Tokens>>, max_in_flight: Option<u64>) -> Gate {
        Gate {
            tokens,
            max_in_flight,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The caller of a request with these headers, or UNAUTHENTICATED.
    fn principal(&self, headers: &http::HeaderMap) -> Result<Principal, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(Principal::anonymous());
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing bearer token: send the metadata `authorization: Bearer <token>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "malformed authorization metadata: expected `Bearer <token>`",
            ));
        };
        tokens
            .authenticate(token)
            .ok_or_else(|| Status::unauthenticated("invalid or revoked bearer token"))
    }

    /// A place among the tenant's requests in progress, or RESOURCE_EXHAUSTED
    /// at once (requests are not queued).
    fn admit(self: &Arc<Self>, tenant: &str) -> Result<Option<InFlight>, Status> {
        let Some(limit) = self.max_in_flight else {
            return Ok(None);
        };
        let mut counts = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(tenant.to_owned()).or_insert(0);
        if *count >= limit {
            return Err(Status::resource_exhausted(format!(
                "tenant has {count} requests in progress, the limit is {limit} (tenant_max_concurrent_requests); retry later"
            )));
        }
        *count += 1;
        Ok(Some(InFlight {
            gate: self.clone(),
            tenant: tenant.to_owned(),
        }))
    }
}

/// One request in progress, counted until its response body ends (the whole
/// stream, for ForwardStream) or is dropped (the client went away).
struct InFlight {
    gate: Arc<Gate>,
    tenant: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self
            .gate
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// The tower layer of [`Gate`].
#[derive(Clone)]
pub struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    pub fn new(gate: Gate) -> AuthLayer {
        AuthLayer {
            gate: Arc::new(gate),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    gate: Arc<Gate>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the ready service handles this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let admitted = self
            .gate
            .principal(request.headers())
            .and_then(|principal| {
                let in_flight = self.gate.admit(&principal.tenant)?;
                Ok((principal, in_flight))
            });
        let (principal, in_flight) = match admitted {
            Ok(admitted) => admitted,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        // Into the request's span (transport's request layer), for its log line.
        tracing::Span::current().record("tenant", principal.tenant.as_str());
        request.extensions_mut().insert(principal);
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(hold_until_end(response, in_flight))
        })
    }
}

/// The caller of a request that passed the [`AuthLayer`].
pub fn principal<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    // Absent only if a service were served without the layer: refuse rather
    // than serve it unauthenticated.
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("request was not authenticated"))
}
