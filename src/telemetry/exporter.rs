//! The metrics endpoint: a small HTTP/1.1 server answering `GET /metrics`
//! with the exposition of [`Metrics`] (404 for any other path), on its own
//! listener (`--metrics-addr`), apart from the gRPC port.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::metrics::Metrics;

/// The content type of prometheus-client's text encoding (OpenMetrics text,
/// which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `metrics` on `listener` until the returned future is dropped.
/// `sample` runs before each scrape to set the gauges that are read rather
/// than counted (live sessions).
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    sample: Arc<dyn Fn(&Metrics) + Send + Sync>,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let sample = sample.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let response = respond(request.method(), request.uri().path(), &metrics, &*sample);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "metrics endpoint: connection ended with an error");
            }
        });
    }
}

fn respond(
    method: &http::Method,
    path: &str,
    metrics: &Metrics,
    sample: &(dyn Fn(&Metrics) + Send + Sync),
) -> http::Response<Full<Bytes>> {
    let (status, content_type, body) = if path != "/metrics" {
        (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n".to_owned(),
        )
    } else if method != http::Method::GET && method != http::Method::HEAD {
        (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_owned(),
        )
    } else {
        sample(metrics);
        match metrics.encode() {
            Ok(text) => (http::StatusCode::OK, CONTENT_TYPE, text),
            Err(error) => {
                tracing::error!(%error, "metrics endpoint: cannot encode the metrics");
                (
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "cannot encode the metrics\n".to_owned(),
                )
            }
        }
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}
