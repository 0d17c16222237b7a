//! The request layer: one tower layer in front of every gRPC service that
//! measures each request from its headers to its status (the whole stream
//! for a streaming RPC) and logs it as one `tracing` span with one event at
//! its end.
//!
//! The span (`request`) carries `rpc`, `session_id` and `tenant` (recorded by
//! the code that learns them: `transport::convert` and the auth layer),
//! `status` (the gRPC code name) and `duration_ms`. Health checks log at
//! DEBUG, everything else at INFO. Nothing a client sends is logged but the
//! method and the session id: no tensors, no tokens.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::Frame;
use tonic::body::Body;
use tonic::Code;
use tracing::Instrument;

use super::metrics::Metrics;
use super::rpc::{as_rpc, code_name, is_health_check, rpc_name};

fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let number = value.to_str().ok()?.trim().parse::<i32>().ok()?;
    Some(code_name(Code::from_i32(number)))
}

/// The tower layer measuring every request.
#[derive(Clone)]
pub struct RequestLayer {
    metrics: Arc<Metrics>,
}

impl RequestLayer {
    pub fn new(metrics: Arc<Metrics>) -> RequestLayer {
        RequestLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = MeasureRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MeasureRequests {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MeasureRequests<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// One request until its status is known; reports itself exactly once,
/// as CANCELLED when dropped before (the client went away).
struct Finish {
    metrics: Arc<Metrics>,
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
        let duration_ms = elapsed.as_secs_f64() * 1e3;
        self.span.record("status", code);
        self.span.record("duration_ms", duration_ms);
        if self.health {
            tracing::debug!(parent: &self.span, status = code, duration_ms, "request finished");
        } else {
            tracing::info!(parent: &self.span, status = code, duration_ms, "request finished");
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
        // A span's level is part of its static callsite: one per level.
        macro_rules! request_span {
            ($level:expr) => {
                tracing::span!(
                    $level,
                    "request",
                    rpc,
                    session_id = tracing::field::Empty,
                    tenant = tracing::field::Empty,
                    status = tracing::field::Empty,
                    duration_ms = tracing::field::Empty,
                )
            };
        }
        let span = if health {
            request_span!(tracing::Level::DEBUG)
        } else {
            request_span!(tracing::Level::INFO)
        };
        let metrics = self.metrics.clone();
        metrics.inflight_started();
        let mut finish = Finish {
            metrics: metrics.clone(),
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
}
