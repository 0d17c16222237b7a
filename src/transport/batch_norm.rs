//! `normserve.v1.BatchNormService`: decode, call the session registry, encode.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use tonic::{Request, Response, Status, Streaming};

use super::convert::{
    Caller, DeleteSession, ForwardCall, MergeSession, Mutation, Representation, ResetRunningStats,
    Scope, StateDict, WrittenToSharedMemory,
};
use super::{auth, shared_memory, stream};
use crate::proto::v1 as pb;
use crate::proto::v1::batch_norm_service_server::BatchNormService;
use crate::session::synced::{ReduceStatistics, StepForward, StepForwardOutcome};
use crate::session::{CreateSession, Forward, ListSessions, Registry, SessionId, UpdateParameters};
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

/// One Forward (the unary RPC).
async fn forward(
    registry: &Arc<Registry>,
    caller: &Caller,
    request: pb::ForwardRequest,
) -> Result<pb::ForwardResponse, Status> {
    answer_call(registry, caller, caller.decode(request)?).await
}

/// One decoded Forward, alone: shared by the unary RPC and the stream's
/// Forwards that are not grouped.
async fn answer_call(
    registry: &Arc<Registry>,
    caller: &Caller,
    call: ForwardCall,
) -> Result<pb::ForwardResponse, Status> {
    let ForwardCall {
        command,
        representation,
        step,
        shared_input,
        shared_output,
        cuda_input,
        cuda_output,
    } = call;
    let outcome = match step {
        Some(spec) => {
            registry
                .step_forward(StepForward {
                    forward: command,
                    spec,
                })
                .await
        }
        None => registry
            .forward(command)
            .await
            .map(|forward| StepForwardOutcome {
                forward,
                statistics: None,
            }),
    };
    let mut outcome = match outcome {
        Ok(outcome) => outcome,
        Err(error) => {
            shared_memory::forget_faulted(caller, [&shared_input, &shared_output]);
            return Err(error.into());
        }
    };
    if let Some(input) = &shared_input {
        shared_memory::check_after_read(caller, input)?;
    }
    if let Some(input) = cuda_input {
        return shared_memory::answer_cuda(registry, input, cuda_output, outcome).await;
    }
    let Some(range) = shared_output else {
        return Ok(representation.of(outcome).into());
    };
    // Written during the step (straight into the range), or returned to be
    // copied in now: a replay's kept output, a synchronized step's shard,
    // an output computed beside its input's range (in place), a session
    // on another device.
    let written = match outcome.forward.output.take() {
        Some(output) => {
            shared_memory::write_output(registry, caller, &range, output.into_bytes()).await?;
            Some(range)
        }
        None if outcome.forward.written => Some(range),
        None => None,
    };
    Ok(WrittenToSharedMemory { outcome, written }.into())
}

/// The Forwards a stream has received together, answered in order (one
/// answer per request): Forwards without a synchronized step or shared
/// memory are handed to the registry as a group (each session's committed
/// once); the others are answered alone, in their place, after the ones
/// before them (a step waits for its other ranks; a shared-memory range is
/// checked after the read and written after the commit, per message).
async fn forward_group(
    registry: &Arc<Registry>,
    caller: &Caller,
    requests: Vec<pb::ForwardRequest>,
) -> Vec<Result<pb::ForwardResponse, Status>> {
    let mut answers: Vec<Result<pb::ForwardResponse, Status>> = Vec::with_capacity(requests.len());
    // Decoded plain Forwards not yet handed to the registry: their places
    // in `answers` (filled with placeholders until then).
    let mut plain: Vec<(usize, (Forward, Representation))> = Vec::new();
    for request in requests {
        let place = answers.len();
        answers.push(Err(Status::internal("not answered")));
        match caller.decode::<_, ForwardCall>(request) {
            Err(error) => answers[place] = Err(error.into()),
            Ok(ForwardCall {
                command,
                representation,
                step: None,
                shared_input: None,
                shared_output: None,
                cuda_input: None,
                cuda_output: None,
            }) => plain.push((place, (command, representation))),
            Ok(call) => {
                answer_plain(registry, std::mem::take(&mut plain), &mut answers).await;
                answers[place] = answer_call(registry, caller, call).await;
            }
        }
    }
    answer_plain(registry, plain, &mut answers).await;
    answers
}

/// Answers `plain` (places and decoded Forwards without a step) as one
/// registry group.
async fn answer_plain(
    registry: &Arc<Registry>,
    plain: Vec<(usize, (Forward, Representation))>,
    answers: &mut [Result<pb::ForwardResponse, Status>],
) {
    if plain.is_empty() {
        return;
    }
    let (places, calls): (Vec<usize>, Vec<(Forward, Representation)>) = plain.into_iter().unzip();
    let (commands, representations): (Vec<Forward>, Vec<Representation>) =
        calls.into_iter().unzip();
    let outcomes = registry.forward_group(commands).await;
    for ((place, representation), outcome) in places.into_iter().zip(representations).zip(outcomes)
    {
        answers[place] = outcome
            .map(|outcome| representation.of(outcome).into())
            .map_err(Status::from);
    }
}

/// A stream's answer to its `index`-th message.
fn stream_response(
    index: u64,
    answer: Result<pb::ForwardResponse, Status>,
) -> pb::ForwardStreamResponse {
    let result = match answer {
        Ok(response) => pb::forward_stream_response::Result::Response(response),
        Err(status) => pb::forward_stream_response::Result::Error(pb::StreamError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }),
    };
    pb::ForwardStreamResponse {
        index,
        result: Some(result),
    }
}

/// A ReduceStatisticsStream's group of received messages, answered in
/// order: each session's messages one after another (a rank's steps of one
/// session are sequential), the sessions side by side, so that the messages
/// of different sessions wait in their barriers at the same time.
async fn reduce_group(
    registry: &Arc<Registry>,
    caller: &Caller,
    requests: Vec<pb::ReduceStatisticsRequest>,
) -> Vec<Result<pb::ReduceStatisticsResponse, Status>> {
    let mut answers: Vec<Option<Result<pb::ReduceStatisticsResponse, Status>>> =
        (0..requests.len()).map(|_| None).collect();
    // Each session's decoded messages with their places, in arrival order.
    let mut chains: Vec<(SessionId, Vec<(usize, ReduceStatistics)>)> = Vec::new();
    for (place, request) in requests.into_iter().enumerate() {
        match caller.decode::<_, ReduceStatistics>(request) {
            Err(error) => answers[place] = Some(Err(error.into())),
            Ok(command) => match chains.iter_mut().find(|(id, _)| *id == command.id) {
                Some((_, chain)) => chain.push((place, command)),
                None => chains.push((command.id.clone(), vec![(place, command)])),
            },
        }
    }
    let runs: Vec<Chain<'_>> = chains
        .into_iter()
        .map(|(_, chain)| -> Chain<'_> {
            Box::pin(async move {
                let mut answered = Vec::with_capacity(chain.len());
                for (place, command) in chain {
                    let answer = registry
                        .reduce_statistics(command)
                        .await
                        .map(pb::ReduceStatisticsResponse::from)
                        .map_err(Status::from);
                    answered.push((place, answer));
                }
                answered
            })
        })
        .collect();
    for (place, answer) in join_all(runs).await.into_iter().flatten() {
        answers[place] = Some(answer);
    }
    answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Status::internal("a message was not answered"))))
        .collect()
}

/// One session's messages of a group, answered: (place, answer) each.
type Chain<'a> = Pin<
    Box<
        dyn Future<Output = Vec<(usize, Result<pb::ReduceStatisticsResponse, Status>)>> + Send + 'a,
    >,
>;

/// Runs `futures` side by side; their outputs in the order given.
async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut running: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = running.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, output) in running.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A ReduceStatisticsStream's answer to its `index`-th message.
fn reduce_stream_response(
    index: u64,
    answer: Result<pb::ReduceStatisticsResponse, Status>,
) -> pb::ReduceStatisticsStreamResponse {
    let result = match answer {
        Ok(response) => pb::reduce_statistics_stream_response::Result::Response(response),
        Err(status) => pb::reduce_statistics_stream_response::Result::Error(pb::StreamError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }),
    };
    pb::ReduceStatisticsStreamResponse {
        index,
        result: Some(result),
    }
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
        let mut next_index: u64 = 0;
        // The messages already received are answered as a group: each
        // session's Forwards among them share one commit.
        let replies = stream::answer_groups(
            request.into_inner(),
            credential,
            self.look_ahead.clone(),
            move |requests: Vec<pb::ForwardRequest>| {
                let (registry, caller) = (registry.clone(), caller.clone());
                let first = next_index;
                next_index += requests.len() as u64;
                async move {
                    let answers = forward_group(&registry, &caller, requests).await;
                    (first..)
                        .zip(answers)
                        .map(|(index, answer)| stream_response(index, answer))
                        .collect()
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

    type ReduceStatisticsStreamStream = stream::Replies<pb::ReduceStatisticsStreamResponse>;

    async fn reduce_statistics_stream(
        &self,
        request: Request<Streaming<pb::ReduceStatisticsRequest>>,
    ) -> Result<Response<Self::ReduceStatisticsStreamStream>, Status> {
        let caller = Arc::new(self.caller(&request)?);
        let credential = auth::credential(&request);
        let registry = self.registry.clone();
        let mut next_index: u64 = 0;
        // When the client goes away, the group being answered is dropped:
        // its messages waiting in barriers withdraw (their ranks missing).
        let replies = stream::answer_waiting_groups(
            request.into_inner(),
            credential,
            self.look_ahead.clone(),
            move |requests: Vec<pb::ReduceStatisticsRequest>| {
                let (registry, caller) = (registry.clone(), caller.clone());
                let first = next_index;
                next_index += requests.len() as u64;
                async move {
                    let answers = reduce_group(&registry, &caller, requests).await;
                    (first..)
                        .zip(answers)
                        .map(|(index, answer)| reduce_stream_response(index, answer))
                        .collect()
                }
            },
        );
        Ok(Response::new(replies))
    }
}
