//! `inference.GRPCInferenceService`: decode, call [`Models`], encode. Served
//! on the normserve port, so the telemetry, admission (shedding, tokens,
//! tenant limits) and deadline layers apply to it as to every service.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::super::{auth, stream};
use super::Models;
use crate::proto::inference as pb;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;

pub struct InferenceApi {
    models: Arc<Models>,
    look_ahead: stream::LookAhead,
}

impl InferenceApi {
    /// The service over `models`, ModelStreamInfer answering at most
    /// `look_ahead` ahead of its client.
    pub fn new(models: Arc<Models>, look_ahead: stream::LookAhead) -> Self {
        InferenceApi { models, look_ahead }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceApi {
    async fn server_live(
        &self,
        _request: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.models.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        let ready = self
            .models
            .model_ready(&principal, &request.name, &request.version)
            .await?;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(self.models.server_metadata()))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let principal = auth::principal(&request)?;
        let request = request.into_inner();
        Ok(Response::new(
            self.models
                .model_metadata(&principal, &request.name, &request.version)
                .await?,
        ))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let caller = self.models.caller(auth::principal(&request)?);
        Ok(Response::new(
            self.models
                .infer(&caller, request.into_inner(), None)
                .await?,
        ))
    }

    type ModelStreamInferStream = stream::Replies<pb::ModelStreamInferResponse>;

    /// Requests answered one at a time, in order; a failed request is
    /// answered in-band (`error_message`) and the stream goes on, as Triton
    /// does.
    async fn model_stream_infer(
        &self,
        request: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let caller = Arc::new(self.models.caller(auth::principal(&request)?));
        let credential = auth::credential(&request);
        let models = self.models.clone();
        let replies = stream::answer_each(
            request.into_inner(),
            credential,
            self.look_ahead,
            move |request| {
                let (models, caller) = (models.clone(), caller.clone());
                async move {
                    let id = request.id.clone();
                    match models.infer(&caller, request, None).await {
                        Ok(response) => pb::ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        // The request's id goes with its error, so a client
                        // matching replies by id can tell which one failed.
                        Err(status) => pb::ModelStreamInferResponse {
                            error_message: status.message().to_owned(),
                            infer_response: Some(pb::ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    }
                }
            },
        );
        Ok(Response::new(replies))
    }
}
