//! Client deadlines: a tower layer that reads a request's `grpc-timeout`
//! header and runs its handling under that deadline
//! ([`crate::compute::with_deadline`]), so that work which would start after
//! the client has given up is not done.
//!
//! A handler still waiting when the deadline fires is dropped and answered
//! DEADLINE_EXCEEDED (tonic's own timer would say CANCELLED); this also covers
//! the rest — a request whose deadline passed while its
//! body was arriving, or while it waited for its session or a compute
//! permit, reaches the compute pool late and is refused there with
//! DEADLINE_EXCEEDED before anything runs.
//!
//! Owns no domain logic and knows nothing of sessions.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::body::Body;
use tonic::Status;

const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The duration a `grpc-timeout` header value states: 1 to 8 ASCII digits
/// and a unit (`H`ours, `M`inutes, `S`econds, `m`illiseconds,
/// `u`microseconds, `n`anoseconds), per gRPC over HTTP/2. `None` for
/// anything else: a malformed header means no deadline, as in tonic.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The tower layer of [`Deadlines`].
#[derive(Clone, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadlines<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadlines { inner }
    }
}

#[derive(Clone)]
pub struct Deadlines<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadlines<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Counted from when the headers arrive: the client's clock started
        // earlier, so the server's deadline is never the earlier of the two.
        let deadline = request
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|value| parse_grpc_timeout(value.as_bytes()))
            .and_then(|timeout| Instant::now().checked_add(timeout));
        let future = crate::compute::with_deadline(deadline, self.inner.call(request));
        let Some(deadline) = deadline else {
            return Box::pin(future);
        };
        // tonic's own timer would answer CANCELLED ("Timeout expired") at the
        // same instant; this one answers what the client's deadline means.
        Box::pin(async move {
            tokio::select! {
                biased;
                response = future => response,
                () = tokio::time::sleep_until(deadline.into()) => Ok(Status::deadline_exceeded(
                    "the request's deadline (grpc-timeout) passed while it was waiting; nothing was applied",
                )
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service};

    #[tokio::test]
    async fn a_request_still_waiting_at_its_deadline_is_answered_deadline_exceeded() {
        let never = tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<Result<http::Response<Body>, std::convert::Infallible>>()
        });
        let mut service = DeadlineLayer.layer(never);
        let request = http::Request::builder()
            .header(GRPC_TIMEOUT, "5m")
            .body(())
            .unwrap();
        let started = Instant::now();
        let response = service.call(request).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(5));
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    }

    #[tokio::test]
    async fn without_grpc_timeout_a_request_has_no_deadline() {
        let deadline = tower::service_fn(|_: http::Request<()>| async {
            assert!(crate::compute::current_deadline().is_none());
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let request = http::Request::builder().body(()).unwrap();
        DeadlineLayer.layer(deadline).call(request).await.unwrap();
    }

    #[test]
    fn grpc_timeout_values_parse_per_the_spec() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("1n", Some(Duration::from_nanos(1))),
            ("250u", Some(Duration::from_micros(250))),
            ("100m", Some(Duration::from_millis(100))),
            ("30S", Some(Duration::from_secs(30))),
            ("2M", Some(Duration::from_secs(120))),
            ("99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            ("", None),
            ("m", None),
            ("123456789m", None), // more than 8 digits
            ("10s", None),        // units are case-sensitive
            ("-1S", None),
            ("1.5S", None),
            (" 1S", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_grpc_timeout(text.as_bytes()), *expected, "{text:?}");
        }
    }
}
