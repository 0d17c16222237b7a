//! `normserve.v1.BatchNormService`: decode, call the session registry, encode.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    Caller, DeleteSession, ForwardCall, MergeSession, Mutation, ResetRunningStats, Scope,
    StateDict, WrittenToSharedMemory,
};
use super::{auth, shared_memory, stream};
use crate::proto::v1 as pb;
use crate::proto::v1::batch_norm_service_server::BatchNormService;
use crate::session::synced::{ReduceStatistics, StepForward, StepForwardOutcome};
use crate::session::{CreateSession, ListSessions, Registry, SessionId, UpdateParameters};
use crate::shm::SharedMemory;

pub struct BatchNormApi {
    registry: Arc<Registry>,
    look_ahead: stream::LookAhead,
    shared_memory: Arc<SharedMemory>,
}

impl BatchNormApi {
    /// The service over `registry`, ForwardStream answering at most
    /// `look_ahead` ahead of its client, Forward reading and writing the
    /// regions of `shared_memory`.
    pub fn new(
        registry: Arc<Registry>,
        look_ahead: stream::LookAhead,
        shared_memory: Arc<SharedMemory>,
    ) -> Self {
        BatchNormApi {
            registry,
            look_ahead,
            shared_memory,
        }
    }

    /// One unary Forward, its request decoded.
    pub(super) async fn forward_message(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<pb::ForwardResponse, Status> {
        let caller = self.caller(&request)?;
        forward(&self.registry, &caller, request.into_inner()).await
    }

    /// Who sent `request`, and the limits its message is decoded under.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Ok(Caller {
            principal: auth::principal(request)?,
            max_tensor_elements: self.registry.options().limits.max_tensor_elements,
            shared_memory: Some(self.shared_memory.clone()),
        })
    }
}

/// One Forward, shared by the unary and the streaming RPC.
async fn forward(
    registry: &Arc<Registry>,
    caller: &Caller,
    request: pb::ForwardRequest,
) -> Result<pb::ForwardResponse, Status> {
    let ForwardCall {
        command,
        representation,
        step,
        shared_input,
        shared_output,
    } = caller.decode(request)?;
    let mut outcome = match step {
        Some(spec) => {
            registry
                .step_forward(StepForward {
                    forward: command,
                    spec,
                })
                .await?
        }
        None => StepForwardOutcome {
            forward: registry.forward(command).await?,
            statistics: None,
        },
    };
    if let Some(input) = &shared_input {
        shared_memory::check_after_read(caller, input)?;
    }
    let Some(range) = shared_output else {
        return Ok(representation.of(outcome).into());
    };
    let written = match outcome.forward.output.take() {
        Some(output) => {
            shared_memory::write_output(registry, caller, &range, output.into_bytes()).await?;
            Some(range)
        }
        None => None,
    };
    Ok(WrittenToSharedMemory { outcome, written }.into())
}

#[tonic::async_trait]
impl BatchNormService for BatchNormApi {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let caller = self.caller(&request)?;
        let command: CreateSession = caller.decode(request.into_inner())?;
        let created = self.registry.create(command).await?;
        Ok(Response::new(caller.encode(created)))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let caller = self.caller(&request)?;
        let id: SessionId = caller.decode(request.into_inner())?;
        let snapshot = self.registry.get(&id).await?;
        Ok(Response::new(caller.encode(snapshot)))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = self.caller(&request)?;
        let query: ListSessions = caller.decode(request.into_inner())?;
        let page = self.registry.list(&query).await?;
        Ok(Response::new(caller.encode(page)))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = self.caller(&request)?;
        let delete: DeleteSession = caller.decode(request.into_inner())?;
        self.registry
            .delete(&delete.id, delete.expected_version)
            .await?;
        Ok(Response::new(pb::DeleteSessionResponse {}))
    }

    async fn reset_running_stats(
        &self,
        request: Request<pb::ResetRunningStatsRequest>,
    ) -> Result<Response<pb::ResetRunningStatsResponse>, Status> {
        let caller = self.caller(&request)?;
        let reset: ResetRunningStats = caller.decode(request.into_inner())?;
        let applied = self
            .registry
            .reset_running_stats(&reset.id, reset.preconditions)
            .await?;
        Ok(Response::new(caller.encode(applied)))
    }

    async fn update_parameters(
        &self,
        request: Request<pb::UpdateParametersRequest>,
    ) -> Result<Response<pb::UpdateParametersResponse>, Status> {
        let caller = self.caller(&request)?;
        let update: Mutation<UpdateParameters> = caller.decode(request.into_inner())?;
        let applied = self
            .registry
            .update_parameters(&update.id, update.change, update.preconditions)
            .await?;
        Ok(Response::new(caller.encode(applied)))
    }

    /// Served by `forward_path` (this one only if the service were served
    /// by tonic's generated server alone).
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        Ok(Response::new(self.forward_message(request).await?))
    }

    type ForwardStreamStream = stream::Replies<pb::ForwardStreamResponse>;

    async fn forward_stream(
        &self,
        request: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let caller = Arc::new(self.caller(&request)?);
        let credential = auth::credential(&request);
        let registry = self.registry.clone();
        let mut index: u64 = 0;
        let replies = stream::answer_each(
            request.into_inner(),
            credential,
            self.look_ahead.clone(),
            move |request| {
                let (registry, caller) = (registry.clone(), caller.clone());
                let this = index;
                index += 1;
                async move {
                    let result = match forward(&registry, &caller, request).await {
                        Ok(response) => pb::forward_stream_response::Result::Response(response),
                        Err(status) => {
                            pb::forward_stream_response::Result::Error(pb::StreamError {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                            })
                        }
                    };
                    pb::ForwardStreamResponse {
                        index: this,
                        result: Some(result),
                    }
                }
            },
        );
        Ok(Response::new(replies))
    }

    async fn export_state(
        &self,
        request: Request<pb::ExportStateRequest>,
    ) -> Result<Response<pb::ExportStateResponse>, Status> {
        let caller = self.caller(&request)?;
        let id: SessionId = caller.decode(request.into_inner())?;
        let exported = self.registry.export_state(&id).await?;
        Ok(Response::new(exported.into()))
    }

    async fn import_state(
        &self,
        request: Request<pb::ImportStateRequest>,
    ) -> Result<Response<pb::ImportStateResponse>, Status> {
        let caller = self.caller(&request)?;
        let import: Mutation<StateDict> = caller.decode(request.into_inner())?;
        let applied = self
            .registry
            .import_state(
                &import.id,
                import.change.safetensors,
                import.change.strict,
                import.preconditions,
            )
            .await?;
        Ok(Response::new(caller.encode(applied)))
    }

    async fn merge_session(
        &self,
        request: Request<pb::MergeSessionRequest>,
    ) -> Result<Response<pb::MergeSessionResponse>, Status> {
        let caller = self.caller(&request)?;
        let merge: MergeSession = caller.decode(request.into_inner())?;
        let applied = self
            .registry
            .merge(&merge.id, &merge.change, merge.preconditions)
            .await?;
        Ok(Response::new(caller.encode(applied)))
    }

    async fn reduce_statistics(
        &self,
        request: Request<pb::ReduceStatisticsRequest>,
    ) -> Result<Response<pb::ReduceStatisticsResponse>, Status> {
        let caller = self.caller(&request)?;
        let command: ReduceStatistics = caller.decode(request.into_inner())?;
        let outcome = self.registry.reduce_statistics(command).await?;
        Ok(Response::new(outcome.into()))
    }
}
