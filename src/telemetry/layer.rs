//! The request layer: one tower layer in front of every gRPC service that
//! measures each request from its headers to its status (the whole stream
//! for a streaming RPC) and logs it as one `tracing` span with one event at
//! its end.
//!
//! The span (`request`) carries `rpc`, `session_id` and `tenant` (recorded by
//! the code that learns them: `transport::convert` and the auth layer),
//! `status` (the gRPC code name) and `duration_ms` (rounded to the
//! microsecond). The event's level is the [`RequestLog`] policy's: DEBUG for
//! an ordinary request, INFO for a slow or sampled one, WARN or ERROR for a
//! server fault, so that a server at INFO does not write a line per request.
//! Nothing a client sends is logged but the method and the session id: no
//! tensors, no tokens.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tonic::Code;
use tracing::{Instrument, Level};

use super::metrics::Metrics;
use super::rpc::{as_rpc, code_name, is_health_check, rpc_name};

/// Which finished requests get a line at INFO or above; every other one is
/// logged at DEBUG. One policy per process, as the subscriber it feeds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLog {
    /// Unary requests at least this long are logged at INFO (`None`: off).
    /// Streams are exempt: their duration is their whole life, not a latency.
    pub slow: Option<Duration>,
    /// The share of requests (0 to 1) logged at INFO whatever their duration:
    /// the access log. Health checks are never sampled.
    pub sample_rate: f64,
}

impl Default for RequestLog {
    /// The flags' defaults: slow from 1 s, no access log.
    fn default() -> Self {
        RequestLog {
            slow: Some(Duration::from_secs(1)),
            sample_rate: 0.0,
        }
    }
}

static REQUEST_LOG: OnceLock<RequestLog> = OnceLock::new();

impl RequestLog {
    /// Makes `self` the policy of every request layer built afterwards; the
    /// first call wins (`telemetry::init` makes it, from the configuration).
    pub fn install(self) {
        // A second installation (an embedder calling init twice) keeps the
        // first policy, as the global subscriber keeps the first subscriber.
        let _ = REQUEST_LOG.set(self);
    }

    /// The installed policy, or the default one.
    pub fn installed() -> RequestLog {
        REQUEST_LOG.get().copied().unwrap_or_default()
    }

    /// The level of the line of a request to `rpc` that ended with `code`
    /// after `elapsed`.
    fn level(&self, rpc: &str, health: bool, code: &str, elapsed: Duration) -> Level {
        if let Some(level) = server_fault_level(code) {
            return level;
        }
        if health {
            return Level::DEBUG;
        }
        let slow = self
            .slow
            .is_some_and(|threshold| elapsed >= threshold && !is_stream(rpc));
        if slow || sampled(self.sample_rate) {
            Level::INFO
        } else {
            Level::DEBUG
        }
    }
}

/// The level of a status that is the server's fault rather than the
/// client's: ERROR for a bug or lost data, WARN for UNAVAILABLE (a store out
/// of reach, a server draining: transient, the client may retry).
fn server_fault_level(code: &str) -> Option<Level> {
    match code {
        "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => Some(Level::ERROR),
        "UNAVAILABLE" => Some(Level::WARN),
        _ => None,
    }
}

/// RPCs whose request or response is a stream.
fn is_stream(rpc: &str) -> bool {
    matches!(
        rpc,
        "ForwardStream" | "ReduceStatisticsStream" | "Watch" | "ServerReflectionInfo"
    )
}

/// Requests finished so far, the sampler's sequence.
static FINISHED: AtomicU64 = AtomicU64::new(0);

/// Whether to log this request in the access log of `rate`: each request
/// draws a number in [0, 1) from a hash of its sequence number (splitmix64),
/// so rate 1 logs all and 0 none, without a random generator, and requests
/// that come in a regular pattern are not sampled in step with it.
fn sampled(rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    let mut x = FINISHED
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let draw = (x >> 11) as f64 / (1u64 << 53) as f64;
    draw < rate
}

/// Milliseconds to the microsecond (truncated): `0.189`, not
/// `0.18940400000000002`.
fn rounded_ms(elapsed: Duration) -> f64 {
    // An integer number of microseconds over 1000 is the double nearest the
    // three-decimal value, which is what both formatters print.
    elapsed.as_micros() as f64 / 1e3
}

fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let number = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(code_name(Code::from_i32(number)))
}

/// The tower layer measuring every request.
#[derive(Clone)]
pub struct RequestLayer {
    metrics: Arc<Metrics>,
    log: RequestLog,
}

impl RequestLayer {
    /// Measures into `metrics` and logs by the installed [`RequestLog`].
    pub fn new(metrics: Arc<Metrics>) -> RequestLayer {
        RequestLayer {
            metrics,
            log: RequestLog::installed(),
        }
    }
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = MeasureRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MeasureRequests {
            inner,
            metrics: self.metrics.clone(),
            log: self.log,
        }
    }
}

#[derive(Clone)]
pub struct MeasureRequests<S> {
    inner: S,
    metrics: Arc<Metrics>,
    log: RequestLog,
}

/// One request until its status is known; reports itself exactly once,
/// as CANCELLED when dropped before (the client went away).
struct Finish {
    metrics: Arc<Metrics>,
    log: RequestLog,
    rpc: &'static str,
    health: bool,
    started: Instant,
    span: tracing::Span,
    done: bool,
}

impl Finish {
    fn finish(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        self.metrics.request_finished(self.rpc, code, elapsed);
        self.metrics.inflight_ended();
        let duration_ms = rounded_ms(elapsed);
        self.span.record("status", code);
        self.span.record("duration_ms", duration_ms);
        // An event's level is part of its static callsite: one per level.
        macro_rules! finished {
            ($level:expr) => {
                tracing::event!(parent: &self.span, $level, status = code, duration_ms, "request finished")
            };
        }
        match self.log.level(self.rpc, self.health, code, elapsed) {
            Level::ERROR => finished!(Level::ERROR),
            Level::WARN => finished!(Level::WARN),
            Level::INFO => finished!(Level::INFO),
            _ => finished!(Level::DEBUG),
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for MeasureRequests<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
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
        let path = request.uri().path();
        let rpc = rpc_name(path);
        let health = is_health_check(path);
        // The span exists at every level a request's line can have, up to
        // ERROR: at a lower one, a server run with `--log warn` would print
        // its fault lines without the request's rpc, session and tenant.
        let span = tracing::span!(
            Level::ERROR,
            "request",
            rpc,
            session_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            status = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let metrics = self.metrics.clone();
        metrics.inflight_started();
        let mut finish = Finish {
            metrics: metrics.clone(),
            log: self.log,
            rpc,
            health,
            started: Instant::now(),
            span: span.clone(),
            done: false,
        };
        let request = request.map(|body| {
            Body::new(Counted {
                body,
                count: Count::Received(metrics.clone(), rpc),
                finish: None,
            })
        });
        // Inner layers (auth) record into the span as they take the request.
        let response = {
            let _entered = span.enter();
            as_rpc(rpc, inner.call(request))
        };
        Box::pin(async move {
            let response = match response.instrument(span).await {
                Ok(response) => response,
                Err(error) => {
                    finish.finish("INTERNAL");
                    return Err(error);
                }
            };
            // A trailers-only response (an error before any message) carries
            // its status in the headers.
            if let Some(code) = grpc_status(response.headers()) {
                finish.finish(code);
                return Ok(response);
            }
            Ok(response.map(|body| {
                Body::new(Counted {
                    body,
                    count: Count::Sent(metrics, rpc),
                    finish: Some(finish),
                })
            }))
        })
    }
}

enum Count {
    Received(Arc<Metrics>, &'static str),
    Sent(Arc<Metrics>, &'static str),
}

/// A body that counts its data bytes; a response body also finishes its
/// request when the status (trailers) passes or the body ends or fails.
struct Counted {
    body: Body,
    count: Count,
    finish: Option<Finish>,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let bytes = data.len() as u64;
                    match &self.count {
                        Count::Received(metrics, rpc) => metrics.received_bytes(rpc, bytes),
                        Count::Sent(metrics, rpc) => metrics.sent_bytes(rpc, bytes),
                    }
                }
                frame
                    .trailers_ref()
                    .map(|trailers| grpc_status(trailers).unwrap_or("UNKNOWN"))
            }
            Poll::Ready(Some(Err(_))) => Some("INTERNAL"),
            Poll::Ready(None) => Some("UNKNOWN"),
            Poll::Pending => None,
        };
        if let (Some(code), Some(finish)) = (ended, self.finish.as_mut()) {
            finish.finish(code);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_header_names_the_code() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(grpc_status(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&headers), Some("NOT_FOUND"));
        headers.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert_eq!(grpc_status(&headers), Some("OK"));
    }

    const QUICK: Duration = Duration::from_millis(3);
    const LONG: Duration = Duration::from_millis(1500);

    #[test]
    fn by_default_only_slow_requests_and_server_faults_are_above_debug() {
        let log = RequestLog::default();
        assert_eq!(log.level("Forward", false, "OK", QUICK), Level::DEBUG);
        assert_eq!(
            log.level("Forward", false, "NOT_FOUND", QUICK),
            Level::DEBUG
        );
        assert_eq!(log.level("Forward", false, "OK", LONG), Level::INFO);
        assert_eq!(
            log.level("Forward", false, "OK", Duration::from_secs(1)),
            Level::INFO
        );
        // A stream's duration is its life: never "slow".
        assert_eq!(log.level("ForwardStream", false, "OK", LONG), Level::DEBUG);
        assert_eq!(log.level("Watch", true, "OK", LONG), Level::DEBUG);
        for (code, level) in [
            ("INTERNAL", Level::ERROR),
            ("UNKNOWN", Level::ERROR),
            ("DATA_LOSS", Level::ERROR),
            ("UNAVAILABLE", Level::WARN),
        ] {
            assert_eq!(log.level("Forward", false, code, QUICK), level, "{code}");
            assert_eq!(
                log.level("ForwardStream", false, code, QUICK),
                level,
                "{code}"
            );
        }
        for client_fault in [
            "INVALID_ARGUMENT",
            "CANCELLED",
            "DEADLINE_EXCEEDED",
            "RESOURCE_EXHAUSTED",
        ] {
            assert_eq!(
                log.level("Forward", false, client_fault, QUICK),
                Level::DEBUG
            );
        }
    }

    #[test]
    fn a_zero_threshold_turns_slow_requests_off() {
        let log = RequestLog {
            slow: None,
            sample_rate: 0.0,
        };
        assert_eq!(log.level("Compare", false, "OK", LONG * 100), Level::DEBUG);
    }

    #[test]
    fn sampling_logs_all_none_or_about_the_rate() {
        let all = RequestLog {
            slow: None,
            sample_rate: 1.0,
        };
        assert!((0..1000).all(|_| all.level("Forward", false, "OK", QUICK) == Level::INFO));
        // Health checks are never sampled.
        assert_eq!(all.level("Check", true, "OK", QUICK), Level::DEBUG);
        let none = RequestLog {
            slow: None,
            sample_rate: 0.0,
        };
        assert!((0..1000).all(|_| none.level("Forward", false, "OK", QUICK) == Level::DEBUG));
        let tenth = RequestLog {
            slow: None,
            sample_rate: 0.1,
        };
        let logged = (0..20_000)
            .filter(|_| tenth.level("Forward", false, "OK", QUICK) == Level::INFO)
            .count();
        // 2000 expected; the standard deviation is about 42.
        assert!((1750..=2250).contains(&logged), "{logged}");
    }

    #[test]
    fn durations_are_rounded_to_the_microsecond() {
        assert_eq!(
            rounded_ms(Duration::from_nanos(189_404)).to_string(),
            "0.189"
        );
        assert_eq!(
            rounded_ms(Duration::from_nanos(1_234_567_890)).to_string(),
            "1234.567"
        );
        assert_eq!(rounded_ms(Duration::from_micros(7)).to_string(), "0.007");
        assert_eq!(rounded_ms(Duration::ZERO).to_string(), "0");
    }
}
