//! Load shedding: the admission policy that caps the requests in progress across the
//! whole server (`--max-concurrent-requests`) and refuses the others at once
//! with RESOURCE_EXHAUSTED. Nothing waits in a queue: a client that is shed
//! learns it in one round trip and can back off or go to another replica,
//! and the server's memory stays bounded by the limit × the message size.
//!
//! A policy of [`super::admission`], which exempts health checks. Owns no
//! domain logic and knows nothing of sessions.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::admission::Admit;
use crate::telemetry::metrics::Metrics;

/// The server-wide limit on requests in progress; refusals are counted as
/// `normserve_shed_requests_total`.
pub struct Shedder {
    /// `None`: no limit (`--max-concurrent-requests 0`).
    permits: Option<Arc<Semaphore>>,
    limit: u64,
    metrics: Arc<Metrics>,
}

impl Shedder {
    /// A limit of `max_in_flight` requests in progress; 0 means no limit.
    pub fn new(max_in_flight: u64, metrics: Arc<Metrics>) -> Shedder {
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
            metrics,
        }
    }
}

impl Admit for Shedder {
    type Place = OwnedSemaphorePermit;

    /// A place among the requests in progress (`None` without a limit), or
    /// RESOURCE_EXHAUSTED at once.
    fn admit(
        &self,
        _headers: &http::HeaderMap,
        _extensions: &mut http::Extensions,
    ) -> Result<Option<OwnedSemaphorePermit>, Status> {
        let Some(permits) = &self.permits else {
            return Ok(None);
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.metrics.shed();
                Err(Status::resource_exhausted(format!(
                    "server has {} requests in progress, its limit (max_concurrent_requests); retry later with backoff",
                    self.limit
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(shedder: &Shedder) -> Result<Option<OwnedSemaphorePermit>, Status> {
        shedder.admit(&http::HeaderMap::new(), &mut http::Extensions::new())
    }

    fn shed_total(metrics: &Metrics) -> String {
        let text = metrics.encode().unwrap();
        text.lines()
            .find(|line| line.starts_with("normserve_shed_requests_total "))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn places_return_when_released_and_refusals_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let shedder = Shedder::new(2, metrics.clone());
        let first = admit(&shedder).unwrap();
        let second = admit(&shedder).unwrap();
        assert!(first.is_some() && second.is_some());
        let refused = admit(&shedder).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("max_concurrent_requests"));
        assert_eq!(shed_total(&metrics), "normserve_shed_requests_total 1");
        drop(first);
        assert!(admit(&shedder).unwrap().is_some());
        assert_eq!(shed_total(&metrics), "normserve_shed_requests_total 1");
    }

    #[test]
    fn zero_means_no_limit() {
        let metrics = Arc::new(Metrics::new());
        let shedder = Shedder::new(0, metrics.clone());
        let held: Vec<_> = (0..1000).map(|_| admit(&shedder).unwrap()).collect();
        assert!(held.iter().all(Option::is_none));
        assert_eq!(shed_total(&metrics), "normserve_shed_requests_total 0");
    }
}
