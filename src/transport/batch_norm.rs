//! `normserve.v1.BatchNormService`: decode, call the session registry, encode.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{auth, convert, status};
use crate::auth::Principal;
use crate::device::DeviceChoice;
use crate::proto::v1 as pb;
use crate::proto::v1::batch_norm_service_server::BatchNormService;
use crate::session::{
    parse_request_id, CreateSession, Forward, Preconditions, Registry, SessionError,
    UpdateParameters,
};

/// Default and largest ListSessions page.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

pub struct BatchNormApi {
    registry: Arc<Registry>,
}

impl BatchNormApi {
    pub fn new(registry: Arc<Registry>) -> Self {
        BatchNormApi { registry }
    }

    fn max_elements(&self) -> u64 {
        self.registry.options().limits.max_tensor_elements
    }
}

fn guard(expected_version: Option<u64>, request_id: &str) -> Result<Preconditions, SessionError> {
    Ok(Preconditions {
        expected_version,
        request_id: parse_request_id(request_id)?,
    })
}

/// One Forward, shared by the unary and the streaming RPC.
async fn forward(
    registry: &Registry,
    principal: &Principal,
    request: pb::ForwardRequest,
) -> Result<pb::ForwardResponse, Status> {
    let max_elements = registry.options().limits.max_tensor_elements;
    let id = convert::session_id(principal, &request.session_id)?;
    let (input, representation) = convert::required_tensor("input", request.input, max_elements)?;
    let command = Forward {
        id,
        input,
        mode: convert::mode(request.mode)?,
        preconditions: guard(request.expected_version, &request.request_id)?,
    };
    let outcome = registry.forward(command).await?;
    Ok(pb::ForwardResponse {
        output: outcome
            .output
            .map(|o| convert::tensor_to_proto(o, representation)),
        version: outcome.version,
        num_batches_tracked: outcome.num_batches_tracked,
        replayed: outcome.replayed,
    })
}

#[tonic::async_trait]
impl BatchNormService for BatchNormApi {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let config = convert::session_config(&request)?;
        let device: DeviceChoice = request.device.parse()?;
        let initial = convert::state_tensors(
            request.weight,
            request.bias,
            request.running_mean,
            request.running_var,
            self.max_elements(),
        )?;
        let command = CreateSession {
            id: convert::optional_session_id(&principal, &request.session_id)?,
            tenant: principal.tenant.clone(),
            config,
            device,
            initial,
            num_batches_tracked: request.num_batches_tracked,
        };
        let created = self.registry.create(command).await?;
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(convert::session_to_proto(&principal, created.snapshot)),
            already_existed: created.already_existed,
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let id = convert::session_id(&principal, &request.into_inner().session_id)?;
        let snapshot = self.registry.get(&id).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(convert::session_to_proto(&principal, snapshot)),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                return Err(Status::invalid_argument(format!(
                    "page_size must be >= 0, got {n}"
                )))
            }
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after =
            convert::optional_session_id(&principal, &request.page_token).map_err(|_| {
                Status::invalid_argument("page_token: not a token returned by ListSessions")
            })?;
        let selector = request.label_selector.into_iter().collect();
        let page = self
            .registry
            .list(
                (!principal.is_admin()).then_some(principal.tenant.as_str()),
                after.as_ref(),
                page_size,
                &selector,
                request.include_tensors,
            )
            .await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: page
                .sessions
                .into_iter()
                .map(|s| convert::session_to_proto(&principal, s))
                .collect(),
            next_page_token: page
                .next_after
                .map(|id| convert::shown_session_id(&principal, &id))
                .unwrap_or_default(),
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let id = convert::session_id(&principal, &request.session_id)?;
        self.registry.delete(&id, request.expected_version).await?;
        Ok(Response::new(pb::DeleteSessionResponse {}))
    }

    async fn reset_running_stats(
        &self,
        request: Request<pb::ResetRunningStatsRequest>,
    ) -> Result<Response<pb::ResetRunningStatsResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let id = convert::session_id(&principal, &request.session_id)?;
        let guard = guard(request.expected_version, &request.request_id)?;
        let applied = self.registry.reset_running_stats(&id, guard).await?;
        Ok(Response::new(pb::ResetRunningStatsResponse {
            session: Some(convert::session_to_proto(&principal, applied.value)),
            replayed: applied.replayed,
        }))
    }

    async fn update_parameters(
        &self,
        request: Request<pb::UpdateParametersRequest>,
    ) -> Result<Response<pb::UpdateParametersResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let id = convert::session_id(&principal, &request.session_id)?;
        let guard = guard(request.expected_version, &request.request_id)?;
        let cumulative = request.cumulative_average.unwrap_or(false);
        if request.cumulative_average == Some(false) && request.momentum.is_none() {
            return Err(Status::invalid_argument(
                "cumulative_average=false needs a momentum to switch to",
            ));
        }
        let update = UpdateParameters {
            tensors: convert::state_tensors(
                request.weight,
                request.bias,
                request.running_mean,
                request.running_var,
                self.max_elements(),
            )?,
            num_batches_tracked: request.num_batches_tracked,
            eps: request.eps,
            momentum: convert::momentum(request.momentum, cumulative)?,
        };
        let applied = self.registry.update_parameters(&id, update, guard).await?;
        Ok(Response::new(pb::UpdateParametersResponse {
            session: Some(convert::session_to_proto(&principal, applied.value)),
            replayed: applied.replayed,
        }))
    }

    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        let principal = auth::principal(&request)?;
        Ok(Response::new(
            forward(&self.registry, &principal, request.into_inner()).await?,
        ))
    }

    type ForwardStreamStream = ReceiverStream<Result<pb::ForwardStreamResponse, Status>>;

    async fn forward_stream(
        &self,
        request: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let principal = auth::principal(&request)?;
        let mut inbound = request.into_inner();
        let (replies, receiver) = mpsc::channel(16);
        let registry = self.registry.clone();
        // The stream's loop stays part of this request: its span, its RPC label.
        let rpc = crate::telemetry::current_rpc();
        // ... and its deadline: messages computed after it are refused.
        let deadline = crate::compute::current_deadline();
        let stream_loop = crate::telemetry::in_request(rpc, async move {
            let mut index: u64 = 0;
            loop {
                let request = match inbound.message().await {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    // A broken or oversized frame ends the stream: the bytes
                    // that follow cannot be trusted to start a new message.
                    Err(status) => {
                        let _ = replies.send(Err(status::decoding_error(status))).await;
                        break;
                    }
                };
                let result = match forward(&registry, &principal, request).await {
                    Ok(response) => pb::forward_stream_response::Result::Response(response),
                    Err(status) => pb::forward_stream_response::Result::Error(pb::StreamError {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    }),
                };
                let reply = pb::ForwardStreamResponse {
                    index,
                    result: Some(result),
                };
                if replies.send(Ok(reply)).await.is_err() {
                    break; // the client went away
                }
                index += 1;
            }
        });
        tokio::spawn(crate::compute::with_deadline(deadline, stream_loop));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn export_state(
        &self,
        request: Request<pb::ExportStateRequest>,
    ) -> Result<Response<pb::ExportStateResponse>, Status> {
        let principal = auth::principal(&request)?;
        let id = convert::session_id(&principal, &request.into_inner().session_id)?;
        let exported = self.registry.export_state(&id).await?;
        Ok(Response::new(pb::ExportStateResponse {
            safetensors: exported.safetensors,
            version: exported.version,
        }))
    }

    async fn import_state(
        &self,
        request: Request<pb::ImportStateRequest>,
    ) -> Result<Response<pb::ImportStateResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let id = convert::session_id(&principal, &request.session_id)?;
        let guard = guard(request.expected_version, &request.request_id)?;
        let strict = request.strict.unwrap_or(true);
        let applied = self
            .registry
            .import_state(&id, request.safetensors, strict, guard)
            .await?;
        Ok(Response::new(pb::ImportStateResponse {
            session: Some(convert::session_to_proto(&principal, applied.value)),
            replayed: applied.replayed,
        }))
    }
}
