//! The Open Inference Protocol's HTTP/REST API (KServe v2 with Triton's
//! binary tensor data extension) on `--http-addr`:
//!
//! - `GET /v2/health/live`, `GET /v2/health/ready` (no token needed, as
//!   gRPC health);
//! - `GET /v2`: server metadata;
//! - `GET /v2/models/{name}[/versions/{v}]`: model metadata;
//! - `GET /v2/models/{name}[/versions/{v}]/ready`;
//! - `POST /v2/models/{name}[/versions/{v}]/infer`: JSON, or JSON followed by
//!   binary tensor data (`Inference-Header-Content-Length`,
//!   `binary_data_size`, `binary_data` / `binary_data_output`).
//!
//! An inference request is turned into the gRPC `ModelInferRequest` and
//! answered by the same [`Models::infer`]; its response back into JSON here.
//! Requests pass the same admission policies as gRPC (server-wide shedding,
//! bearer tokens of the same table, the tenant's requests in progress).
//! Everything a client sends is bounded: header bytes, body bytes
//! (`--max-message-bytes`), the time to send them, and connections.
//! Errors are `{"error": "..."}` with the HTTP status of the gRPC code.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tracing::Instrument;

use super::convert::{OutputForm, OUTPUT};
use super::Models;
use crate::auth::Principal;
use crate::memory::budget::ALWAYS_ADMITTED_BYTES;
use crate::memory::{charge_unless_large, Charge, Kind, MemoryBudget};
use crate::proto::inference as pb;
use crate::transport::admission::Admit;
use crate::transport::auth::Gate;
use crate::transport::shedding::Shedder;

/// The header giving the JSON part's length when binary data follows it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Most bytes of a request's head (request line and headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most connections open at once; further ones are closed at accept.
const MAX_CONNECTIONS: usize = 1024;

/// What the HTTP listener bounds.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request body (`--max-message-bytes`).
    pub max_body_bytes: usize,
    /// Time to send a request's head and body, and the deadline of its
    /// computation (not started past it).
    pub request_timeout: Duration,
}

/// The HTTP front of [`Models`], with the admission policies of the gRPC
/// port.
pub struct HttpApi {
    pub models: Arc<Models>,
    pub shedder: Arc<Shedder>,
    pub gate: Arc<Gate>,
    pub limits: HttpLimits,
    /// The server-wide memory budget: request bodies are charged to it as
    /// they arrive (their declared length first), as gRPC messages are.
    pub budget: Arc<MemoryBudget>,
}

/// Serves `api` on `listener` until the returned future is dropped.
pub async fn serve_http(listener: TcpListener, api: Arc<HttpApi>) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: keep serving.
                tracing::warn!(%error, "OIP HTTP: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "OIP HTTP: too many connections; closing a new one"
            );
            continue;
        };
        // Small replies must not wait for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let timeout = api.limits.request_timeout;
            let service = service_fn(move |request: http::Request<Incoming>| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(api.respond(request).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that opens a connection and trickles its head
                // holds a connection slot for at most this long.
                .header_read_timeout(timeout)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "OIP HTTP: connection ended with an error");
            }
        });
    }
}

/// A route of the API.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Live,
    Ready,
    ServerMetadata,
    ModelMetadata { name: String, version: String },
    ModelReady { name: String, version: String },
    Infer { name: String, version: String },
}

impl Route {
    /// Its name in logs (a fixed set).
    fn name(&self) -> &'static str {
        match self {
            Route::Live => "live",
            Route::Ready => "ready",
            Route::ServerMetadata => "server_metadata",
            Route::ModelMetadata { .. } => "model_metadata",
            Route::ModelReady { .. } => "model_ready",
            Route::Infer { .. } => "infer",
        }
    }
}

/// The route of `path`, or None (404). Path segments are percent-decoded.
fn route(path: &str) -> Option<Route> {
    let segments: Vec<String> = path
        .strip_prefix('/')?
        .split('/')
        .map(percent_decode)
        .collect::<Option<_>>()?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (name, version, rest) = match segments.as_slice() {
        ["v2"] => return Some(Route::ServerMetadata),
        ["v2", "health", "live"] => return Some(Route::Live),
        ["v2", "health", "ready"] => return Some(Route::Ready),
        ["v2", "models", name, "versions", version, rest @ ..] => (*name, *version, rest),
        ["v2", "models", name, rest @ ..] => (*name, "", rest),
        _ => return None,
    };
    let (name, version) = (name.to_owned(), version.to_owned());
    match rest {
        [] => Some(Route::ModelMetadata { name, version }),
        ["ready"] => Some(Route::ModelReady { name, version }),
        ["infer"] => Some(Route::Infer { name, version }),
        _ => None,
    }
}

/// `%XX` escapes decoded; None for a malformed escape or non-UTF-8 result.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// The HTTP status of a gRPC code (a client's fault is never a 5xx).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange | Code::Cancelled => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal | Code::DataLoss | Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Reply {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn json_reply(status: StatusCode, value: &Value) -> Reply {
    reply(
        status,
        "application/json",
        Bytes::from(value.to_string().into_bytes()),
    )
}

fn error_reply(status: StatusCode, message: &str) -> Reply {
    json_reply(status, &json!({ "error": message }))
}

fn status_reply(status: &Status) -> Reply {
    error_reply(http_status(status.code()), status.message())
}

/// A request's failure: a gRPC status (mapped to its HTTP status) or an
/// HTTP status of its own.
enum Failure {
    Status(Status),
    Http(StatusCode, String),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        Failure::Status(status)
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::Http(StatusCode::BAD_REQUEST, message.into())
}

impl HttpApi {
    /// Answers `request` inside its span (route, tenant, session_id), with
    /// one log line when it is done, as the gRPC port's telemetry layer
    /// logs: health at DEBUG, the rest at INFO.
    async fn respond(&self, request: http::Request<Incoming>) -> Reply {
        let started = Instant::now();
        let route_name = route(request.uri().path()).map_or("other", |r| r.name());
        let span = tracing::info_span!(
            "http_request",
            route = route_name,
            tenant = tracing::field::Empty,
            session_id = tracing::field::Empty,
        );
        let reply = self.answer(request).instrument(span.clone()).await;
        let status = reply.status().as_u16();
        let duration_ms = started.elapsed().as_secs_f64() * 1e3;
        span.in_scope(|| {
            if matches!(route_name, "live" | "ready") {
                tracing::debug!(status, duration_ms, "OIP HTTP request finished");
            } else {
                tracing::info!(status, duration_ms, "OIP HTTP request finished");
            }
        });
        reply
    }

    async fn answer(&self, request: http::Request<Incoming>) -> Reply {
        let Some(route) = route(request.uri().path()) else {
            return error_reply(
                StatusCode::NOT_FOUND,
                "not found: the API is under /v2 (see the Open Inference Protocol)",
            );
        };
        let expected = if matches!(route, Route::Infer { .. }) {
            Method::POST
        } else {
            Method::GET
        };
        if request.method() != expected
            && !(expected == Method::GET && request.method() == Method::HEAD)
        {
            return error_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} only", expected.as_str()),
            );
        }
        // Health is exempt from admission, as gRPC health is: probes carry no
        // token, and must see a busy server as live.
        if let Some(reply) = self.health(&route) {
            return reply;
        }
        let mut extensions = http::Extensions::new();
        if let Err(status) = self.gate.identify(request.headers(), &mut extensions) {
            return status_reply(&status);
        }
        let _shed_place = match self.shedder.admit(request.headers(), &mut extensions) {
            Ok(place) => place,
            Err(status) => return status_reply(&status),
        };
        let _tenant_place = match self.gate.admit(request.headers(), &mut extensions) {
            Ok(place) => place,
            Err(status) => return status_reply(&status),
        };
        let Some(principal) = extensions.get::<Principal>().cloned() else {
            return status_reply(&Status::unauthenticated("request was not authenticated"));
        };
        let deadline = Instant::now() + self.limits.request_timeout;
        let handled =
            crate::compute::with_deadline(Some(deadline), self.handle(route, principal, request))
                .await;
        match handled {
            Ok(reply) => reply,
            Err(Failure::Status(status)) => status_reply(&status),
            Err(Failure::Http(code, message)) => error_reply(code, &message),
        }
    }

    /// The reply of a health route; None for the other routes.
    fn health(&self, route: &Route) -> Option<Reply> {
        match route {
            Route::Live => Some(reply(StatusCode::OK, "application/json", Bytes::new())),
            Route::Ready if self.models.is_ready() => {
                Some(reply(StatusCode::OK, "application/json", Bytes::new()))
            }
            Route::Ready => Some(error_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            )),
            _ => None,
        }
    }

    async fn handle(
        &self,
        route: Route,
        principal: Principal,
        request: http::Request<Incoming>,
    ) -> Result<Reply, Failure> {
        match route {
            // Answered before admission by `answer`; here for completeness.
            Route::Live | Route::Ready => self
                .health(&route)
                .ok_or_else(|| Failure::Status(Status::internal("health route"))),
            Route::ServerMetadata => {
                let metadata = self.models.server_metadata();
                Ok(json_reply(
                    StatusCode::OK,
                    &json!({
                        "name": metadata.name,
                        "version": metadata.version,
                        "extensions": metadata.extensions,
                    }),
                ))
            }
            Route::ModelReady { name, version } => {
                if self.models.model_ready(&principal, &name, &version).await? {
                    Ok(reply(StatusCode::OK, "application/json", Bytes::new()))
                } else {
                    Err(bad_request(format!("model {name:?} is not ready")))
                }
            }
            Route::ModelMetadata { name, version } => {
                let metadata = self
                    .models
                    .model_metadata(&principal, &name, &version)
                    .await?;
                Ok(json_reply(StatusCode::OK, &metadata_json(metadata)))
            }
            Route::Infer { name, version } => {
                let header_length = header_length(request.headers())?;
                // The body's charge is held until the answer is built.
                let (body, _charge) = self.body(request).await?;
                let (infer, output_form) = infer_request(name, version, &body, header_length)?;
                check_json_output_size(&infer, output_form, self.limits.max_body_bytes)?;
                let caller = self.models.caller(principal);
                let response = self.models.infer(&caller, infer, Some(output_form)).await?;
                infer_reply(response)
            }
        }
    }

    /// The request's body: at most `max_body_bytes`, sent within the request
    /// timeout, and charged to the memory budget (a declared length before
    /// reading, then what arrives beyond it, chunk by chunk; at most
    /// [`ALWAYS_ADMITTED_BYTES`](crate::memory::budget::ALWAYS_ADMITTED_BYTES)
    /// never refused). A declared length over the limit, or a body that
    /// does not fit in the budget, is refused before it is read further.
    async fn body(&self, request: http::Request<Incoming>) -> Result<(Bytes, Charge), Failure> {
        let max = self.limits.max_body_bytes;
        let too_large = || {
            Failure::Http(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {max} bytes (max_message_bytes)"),
            )
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max as u64) {
            return Err(too_large());
        }
        let mut charge = charge_unless_large(&self.budget, declared.unwrap_or(0), Kind::Requests)
            .map_err(|refused| Status::resource_exhausted(refused.to_string()))?;
        let charging = &mut charge;
        let collect = async move {
            let mut body = Limited::new(request.into_body(), max);
            // The declared length (at most `max`, and charged) sized at once,
            // so a large body is not copied again as the buffer grows.
            let capacity = declared.map_or(0, |length| length as usize);
            let mut chunks = bytes::BytesMut::with_capacity(capacity);
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue; // trailers
                };
                let beyond = (chunks.len() + data.len()) as u64;
                if beyond > charging.bytes() {
                    let more = beyond - charging.bytes();
                    if beyond <= ALWAYS_ADMITTED_BYTES {
                        charging.grow_anyway(more);
                    } else if let Err(refused) = charging.try_grow(more) {
                        return Ok(Err(refused));
                    }
                }
                chunks.extend_from_slice(&data);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Ok(chunks.freeze()))
        };
        match tokio::time::timeout(self.limits.request_timeout, collect).await {
            Err(_) => Err(Failure::Http(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received within the request timeout".to_owned(),
            )),
            Ok(Ok(Ok(bytes))) => Ok((bytes, charge)),
            Ok(Ok(Err(refused))) => Err(Status::resource_exhausted(refused.to_string()).into()),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(error)) => Err(bad_request(format!("request body: {error}"))),
        }
    }
}

/// The `Inference-Header-Content-Length` header: None when absent.
fn header_length(headers: &HeaderMap) -> Result<Option<usize>, Failure> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| bad_request("Inference-Header-Content-Length: not a byte count"))
}

fn metadata_json(metadata: pb::ModelMetadataResponse) -> Value {
    let tensors = |tensors: Vec<pb::model_metadata_response::TensorMetadata>| -> Vec<Value> {
        tensors
            .into_iter()
            .map(|t| json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape }))
            .collect()
    };
    json!({
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": tensors(metadata.inputs),
        "outputs": tensors(metadata.outputs),
    })
}

fn parameter_from_json(field: &str, value: &Value) -> Result<pb::InferParameter, Failure> {
    use pb::infer_parameter::ParameterChoice;
    let choice = match value {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                ParameterChoice::Int64Param(i)
            } else if let Some(u) = n.as_u64() {
                ParameterChoice::Uint64Param(u)
            } else {
                ParameterChoice::DoubleParam(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        _ => {
            return Err(bad_request(format!(
                "{field}: a parameter is a boolean, number or string"
            )))
        }
    };
    Ok(pb::InferParameter {
        parameter_choice: Some(choice),
    })
}

fn parameters_from_json(
    field: &str,
    parameters: Option<Map<String, Value>>,
) -> Result<HashMap<String, pb::InferParameter>, Failure> {
    parameters
        .into_iter()
        .flatten()
        .map(|(key, value)| {
            let parameter = parameter_from_json(&format!("{field}.{key}"), &value)?;
            Ok((key, parameter))
        })
        .collect()
}

fn bool_parameter(parameters: &HashMap<String, pb::InferParameter>, key: &str) -> bool {
    matches!(
        parameters
            .get(key)
            .and_then(|p| p.parameter_choice.as_ref()),
        Some(pb::infer_parameter::ParameterChoice::BoolParam(true))
    )
}

fn size_parameter(parameters: &HashMap<String, pb::InferParameter>, key: &str) -> Option<u64> {
    use pb::infer_parameter::ParameterChoice;
    match parameters.get(key)?.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(i) => u64::try_from(*i).ok(),
        ParameterChoice::Uint64Param(u) => Some(*u),
        _ => None,
    }
}

/// A JSON inference request (the protocol's `$inference_request`). Fields
/// the protocol may add are skipped, as the protocol asks of servers.
#[derive(Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Numbers>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A tensor's `data`: numbers, in arrays nested to any depth (the protocol
/// allows both the flat and the nested form), flattened row-major. Decoded
/// straight into f64s: 8 bytes per value, whatever the body holds.
struct Numbers(Vec<f64>);

impl<'de> Deserialize<'de> for Numbers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut values = Vec::new();
        deserializer.deserialize_any(Flatten(&mut values))?;
        Ok(Numbers(values))
    }
}

/// Appends every number of a (nested) array to its vector.
struct Flatten<'a>(&'a mut Vec<f64>);

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("numbers, or arrays of numbers")
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        self.0.push(value);
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.0.push(value as f64);
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.push(value as f64);
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

/// A JSON (+ binary) inference request as the gRPC request, and the form its
/// output goes back in: binary when `binary_data_output` or OUTPUT's
/// `binary_data` asks for it.
fn infer_request(
    model_name: String,
    model_version: String,
    body: &Bytes,
    header_length: Option<usize>,
) -> Result<(pb::ModelInferRequest, OutputForm), Failure> {
    let json_length = header_length.unwrap_or(body.len());
    if json_length > body.len() {
        return Err(bad_request(format!(
            "Inference-Header-Content-Length {json_length} is over the body's {} bytes",
            body.len()
        )));
    }
    let mut binary = body.slice(json_length..);
    let json: InferRequestJson = serde_json::from_slice(&body[..json_length])
        .map_err(|error| bad_request(format!("request JSON: {error}")))?;
    let parameters = parameters_from_json("parameters", json.parameters)?;
    let mut request = pb::ModelInferRequest {
        model_name,
        model_version,
        id: json.id.unwrap_or_default(),
        ..Default::default()
    };
    for (index, input) in json.inputs.into_iter().enumerate() {
        let field = format!("inputs[{index}]");
        let tensor_parameters =
            parameters_from_json(&format!("{field}.parameters"), input.parameters)?;
        let mut tensor = pb::model_infer_request::InferInputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            parameters: HashMap::new(),
            contents: None,
        };
        if let Some(size) = size_parameter(&tensor_parameters, "binary_data_size") {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > binary.len() {
                return Err(bad_request(format!(
                    "{field}.parameters.binary_data_size: {size} bytes, but {} binary bytes remain",
                    binary.len()
                )));
            }
            request.raw_input_contents.push(binary.split_to(size));
        } else {
            let Some(Numbers(values)) = input.data else {
                return Err(bad_request(format!(
                    "{field}: no values: set data or the binary_data_size parameter"
                )));
            };
            let contents = if tensor.datatype == "FP64" {
                pb::InferTensorContents {
                    fp64_contents: values,
                    ..Default::default()
                }
            } else {
                pb::InferTensorContents {
                    fp32_contents: values.into_iter().map(|v| v as f32).collect(),
                    ..Default::default()
                }
            };
            tensor.contents = Some(contents);
        }
        request.inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(bad_request(format!(
            "{} binary bytes after the inputs' binary_data_size",
            binary.len()
        )));
    }
    let mut binary_output = bool_parameter(&parameters, "binary_data_output");
    for (index, output) in json.outputs.into_iter().flatten().enumerate() {
        let output_parameters =
            parameters_from_json(&format!("outputs[{index}].parameters"), output.parameters)?;
        if output.name == OUTPUT {
            binary_output = bool_parameter(&output_parameters, "binary_data");
        }
        request
            .outputs
            .push(pb::model_infer_request::InferRequestedOutputTensor {
                name: output.name,
                parameters: HashMap::new(),
            });
    }
    request.parameters = parameters;
    let form = if binary_output {
        OutputForm::Raw
    } else {
        OutputForm::Typed
    };
    Ok((request, form))
}

fn parameter_json(parameter: &pb::InferParameter) -> Value {
    use pb::infer_parameter::ParameterChoice;
    match &parameter.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        Some(ParameterChoice::DoubleParam(d)) => json!(d),
        Some(ParameterChoice::Uint64Param(u)) => json!(u),
        None => Value::Null,
    }
}

/// The JSON part of an inference response (the protocol's
/// `$inference_response`), serialized without building a `Value` per number.
#[derive(Serialize)]
struct InferResponseJson {
    model_name: String,
    model_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    id: String,
    parameters: Map<String, Value>,
    outputs: Vec<OutputTensorJson>,
}

#[derive(Serialize)]
struct OutputTensorJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<OutputData>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutputData {
    Float(Vec<f32>),
    Double(Vec<f64>),
}

/// Most bytes one value takes in JSON output, with its comma: a float32 as
/// `-1.1754944e-38,`, a float64 as `-2.2250738585072014e-308,`.
fn json_bytes_per_value(datatype: &str) -> u64 {
    if datatype == "FP64" {
        26
    } else {
        16
    }
}

/// Refuses, before anything is applied, a request whose JSON output could
/// exceed `max_bytes` (binary output is the input's size, already bounded).
fn check_json_output_size(
    request: &pb::ModelInferRequest,
    form: OutputForm,
    max_bytes: usize,
) -> Result<(), Failure> {
    if form == OutputForm::Raw {
        return Ok(());
    }
    let bound = request
        .inputs
        .iter()
        .map(|input| {
            let values = input
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
            values.map_or(u64::MAX, |n| {
                n.saturating_mul(json_bytes_per_value(&input.datatype))
            })
        })
        .fold(1024u64, u64::saturating_add);
    if bound > max_bytes as u64 {
        return Err(bad_request(format!(
            "the output as JSON could take {bound} bytes, over max_message_bytes ({max_bytes}); \
             ask for binary output (the binary_data parameter)"
        )));
    }
    Ok(())
}

/// The inference response: JSON, or JSON then the binary output
/// (`Inference-Header-Content-Length` giving the JSON's length).
fn infer_reply(response: pb::ModelInferResponse) -> Result<Reply, Failure> {
    let mut binary = response.raw_output_contents.into_iter();
    let mut tail: Vec<Bytes> = Vec::new();
    let outputs = response
        .outputs
        .into_iter()
        .map(|output| {
            let mut tensor = OutputTensorJson {
                name: output.name,
                datatype: output.datatype,
                shape: output.shape,
                parameters: None,
                data: None,
            };
            if let Some(contents) = output.contents {
                tensor.data = Some(if contents.fp64_contents.is_empty() {
                    OutputData::Float(contents.fp32_contents)
                } else {
                    OutputData::Double(contents.fp64_contents)
                });
            } else if let Some(bytes) = binary.next() {
                tensor.parameters = Some(json!({ "binary_data_size": bytes.len() }));
                tail.push(bytes);
            }
            tensor
        })
        .collect();
    let header = InferResponseJson {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: response
            .parameters
            .iter()
            .map(|(key, value)| (key.clone(), parameter_json(value)))
            .collect(),
        outputs,
    };
    let mut body = serde_json::to_vec(&header).map_err(|error| {
        tracing::error!(%error, "OIP HTTP: cannot encode a response");
        Failure::Status(Status::internal("cannot encode the response"))
    })?;
    if tail.is_empty() {
        return Ok(reply(StatusCode::OK, "application/json", Bytes::from(body)));
    }
    let header_length = body.len();
    for bytes in tail {
        body.extend_from_slice(&bytes);
    }
    let mut reply = reply(
        StatusCode::OK,
        "application/octet-stream",
        Bytes::from(body),
    );
    reply
        .headers_mut()
        .insert(HEADER_LENGTH, http::HeaderValue::from(header_length));
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_protocol_paths() {
        assert_eq!(route("/v2"), Some(Route::ServerMetadata));
        assert_eq!(route("/v2/health/live"), Some(Route::Live));
        assert_eq!(
            route("/v2/models/a%2Fb/versions/3/infer"),
            Some(Route::Infer {
                name: "a/b".to_owned(),
                version: "3".to_owned()
            })
        );
        assert_eq!(
            route("/v2/models/m/ready"),
            Some(Route::ModelReady {
                name: "m".to_owned(),
                version: String::new()
            })
        );
        assert_eq!(route("/v2/models/m/other"), None);
        assert_eq!(route("/v2/models/%zz"), None);
        assert_eq!(route("/metrics"), None);
    }

    #[test]
    fn binary_inputs_are_cut_from_the_body_after_the_json() {
        let json = br#"{"inputs":[{"name":"INPUT","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[0u8; 8]);
        let parsed = infer_request(
            "m".to_owned(),
            String::new(),
            &Bytes::from(body),
            Some(json.len()),
        );
        let Ok((request, form)) = parsed else {
            panic!("request refused");
        };
        assert_eq!(request.raw_input_contents.len(), 1);
        assert_eq!(request.raw_input_contents[0].len(), 8);
        assert_eq!(form, OutputForm::Typed);
    }

    #[test]
    fn a_binary_size_beyond_the_body_is_refused() {
        let json = br#"{"inputs":[{"name":"INPUT","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":800}}]}"#;
        let parsed = infer_request(
            "m".to_owned(),
            String::new(),
            &Bytes::from(json.to_vec()),
            Some(json.len()),
        );
        assert!(parsed.is_err());
    }
}
