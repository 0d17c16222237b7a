//! Load shedding: a tower layer that caps the requests in progress across the
//! whole server (`--max-concurrent-requests`) and refuses the others at once
//! with RESOURCE_EXHAUSTED. Nothing waits in a queue: a client that is shed
//! learns it in one round trip and can back off or go to another replica,
//! and the server's memory stays bounded by the limit × the message size.
//!
//! `grpc.health.v1.Health` is never shed: an overloaded server is still alive
//! and must not be restarted by its liveness probe.
//!
//! Owns no domain logic and knows nothing of sessions.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::Status;

use super::held_body::hold_until_end;

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// The server-wide limit on requests in progress, and how many it refused.
pub struct Shedder {
    /// `None`: no limit (`--max-concurrent-requests 0`).
    permits: Option<Arc<Semaphore>>,
    limit: u64,
    shed: AtomicU64,
    /// Counts refusals as `normserve_shed_requests_total` when set.
    metrics: Option<Arc<crate::telemetry::metrics::Metrics>>,
}

impl Shedder {
    /// A limit of `max_in_flight` requests in progress; 0 means no limit.
    pub fn new(max_in_flight: u64) -> Shedder {
        // The semaphore's capacity is a usize bounded by MAX_PERMITS; a limit
        // beyond it is no limit in practice.
        let permits = (max_in_flight > 0).then(|| {
            let capacity = usize::try_from(max_in_flight)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(capacity))
        });
        Shedder {
            permits,
            limit: max_in_flight,
            shed: AtomicU64::new(0),
            metrics: None,
        }
    }

    /// Also counts refusals in the server's metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::metrics::Metrics>) -> Shedder {
        self.metrics = Some(metrics);
        self
    }

    /// Requests refused so far.
    pub fn shed_total(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// A place among the requests in progress (`None` without a limit), or
    /// RESOURCE_EXHAUSTED at once.
    fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, Status> {
        let Some(permits) = &self.permits else {
            return Ok(None);
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.shed.fetch_add(1, Ordering::Relaxed);
                if let Some(metrics) = &self.metrics {
                    metrics.shed();
                }
                Err(Status::resource_exhausted(format!(
                    "server has {} requests in progress, its limit (max_concurrent_requests); retry later with backoff",
                    self.limit
                )))
            }
        }
    }
}

/// The tower layer of [`Shedder`].
#[derive(Clone)]
pub struct ShedLayer {
    shedder: Arc<Shedder>,
}

impl ShedLayer {
    pub fn new(shedder: Arc<Shedder>) -> ShedLayer {
        ShedLayer { shedder }
    }
}

impl<S> tower::Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            shedder: self.shedder.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    shedder: Arc<Shedder>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Shed<S>
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone is not ready; the ready service handles this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with(HEALTH_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let permit = match self.shedder.admit() {
            Ok(permit) => permit,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(hold_until_end(response, permit))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_return_when_released_and_refusals_are_counted() {
        let shedder = Shedder::new(2);
        let first = shedder.admit().unwrap();
        let second = shedder.admit().unwrap();
        assert!(first.is_some() && second.is_some());
        let refused = shedder.admit().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_concurrent_requests"));
        assert_eq!(shedder.shed_total(), 1);
        drop(first);
        assert!(shedder.admit().unwrap().is_some());
        assert_eq!(shedder.shed_total(), 1);
    }

    #[test]
    fn zero_means_no_limit() {
        let shedder = Shedder::new(0);
        let held: Vec<_> = (0..1000).map(|_| shedder.admit().unwrap()).collect();
        assert!(held.iter().all(Option::is_none));
        assert_eq!(shedder.shed_total(), 0);
    }
}
