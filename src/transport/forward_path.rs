//! `BatchNormService` as served: the unary Forward read and written here
//! ([`super::wire`]: the request decoded from the DATA frames as received,
//! the reply's tensor bytes handed to the connection as they are), every
//! other method (ForwardStream included) by tonic's generated server.
//!
//! The unary Forward keeps tonic's behaviour on the wire: the same statuses
//! for compressed, oversized, truncated, empty and malformed requests (as
//! [`super::status::decoding_error`] maps tonic's), errors as trailers-only
//! responses, the same message limits. The layers around the service (the
//! request's span and metrics, deadline, memory budget, admission) see it
//! as any other call.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::BodyExt;
use tonic::codegen::BoxFuture;
use tonic::server::NamedService;
use tonic::Status;

use super::status::decoding_error;
use super::wire::{self, Frames, FramingError, PREFIX_BYTES};
use super::BatchNormApi;
use crate::proto::v1::batch_norm_service_server::BatchNormServiceServer;

/// The unary Forward's path.
pub const FORWARD_PATH: &str = "/normserve.v1.BatchNormService/Forward";

/// The service served under `BatchNormService`'s name.
#[derive(Clone)]
pub struct BatchNormRoutes {
    api: Arc<BatchNormApi>,
    generated: BatchNormServiceServer<BatchNormApi>,
    max_message_bytes: usize,
}

impl BatchNormRoutes {
    /// `api`'s methods, messages up to `max_message_bytes` each way.
    pub fn new(api: BatchNormApi, max_message_bytes: usize) -> Self {
        let api = Arc::new(api);
        BatchNormRoutes {
            generated: BatchNormServiceServer::from_arc(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            api,
            max_message_bytes,
        }
    }
}

impl NamedService for BatchNormRoutes {
    const NAME: &'static str = <BatchNormServiceServer<BatchNormApi> as NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for BatchNormRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != FORWARD_PATH {
            return self.generated.call(request);
        }
        let api = self.api.clone();
        let limit = self.max_message_bytes;
        Box::pin(async move {
            Ok(match forward(&api, limit, request).await {
                Ok(chunks) => reply(chunks),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// One unary Forward: the request read, the call, the reply's chunks.
async fn forward(
    api: &BatchNormApi,
    limit: usize,
    request: http::Request<tonic::body::Body>,
) -> Result<Vec<Bytes>, Status> {
    if let Some(encoding) = request.headers().get("grpc-encoding") {
        if encoding.as_bytes() != b"identity" {
            let name = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{name}` which isn't supported"
            ));
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            return Err(status);
        }
    }
    let (parts, mut body) = request.into_parts();
    let mut frames = Frames::default();
    let length = loop {
        match wire::message_length(&frames, limit) {
            Some(Ok(length)) => break length,
            Some(Err(FramingError::TooLarge { declared, limit })) => {
                return Err(decoding_error(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {declared} bytes, the limit is: {limit} bytes"
                ))));
            }
            Some(Err(FramingError::Compressed(flag))) => {
                return Err(Status::invalid_argument(format!(
                    "message compression flag {flag}, but the request is not compressed (no grpc-encoding)"
                )));
            }
            None => {}
        }
        if !read_frame(&mut body, &mut frames).await? {
            let text = if frames.remaining() == 0 {
                "Missing request message."
            } else {
                "Unexpected EOF decoding stream."
            };
            return Err(decoding_error(Status::internal(text)));
        }
    };
    while frames.remaining() < PREFIX_BYTES + length {
        if !read_frame(&mut body, &mut frames).await? {
            return Err(decoding_error(Status::internal(
                "Unexpected EOF decoding stream.",
            )));
        }
    }
    // prost's text starts "failed to decode Protobuf message", as tonic's.
    let message = wire::decode_request(frames, length)
        .map_err(|error| decoding_error(Status::internal(error.to_string())))?;
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    let response = api.forward_message(request).await?;
    wire::encode_reply(response, limit).map_err(|found| {
        Status::resource_exhausted(format!(
            "Error, encoded message length too large: found {found} bytes, the limit is: {limit} bytes (max_message_bytes)"
        ))
    })
}

/// Reads the next DATA frame into `frames`; false at the end of the body.
async fn read_frame(body: &mut tonic::body::Body, frames: &mut Frames) -> Result<bool, Status> {
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                    return Ok(true);
                }
            }
            Some(Err(status)) => return Err(status),
            None => return Ok(false),
        }
    }
}

/// A successful reply: the message's chunks, then `grpc-status: 0`.
fn reply(chunks: Vec<Bytes>) -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::new(ReplyBody {
        chunks: chunks.into(),
        trailers: true,
    }));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// The reply message's chunks, each a DATA frame, then the trailers.
struct ReplyBody {
    chunks: VecDeque<Bytes>,
    trailers: bool,
}

impl http_body::Body for ReplyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if std::mem::take(&mut self.trailers) {
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && !self.trailers
    }
}
