//! The Open Inference Protocol (KServe v2, with Triton's extensions): the
//! gRPC `inference.GRPCInferenceService` ([`grpc`], served beside the
//! normserve services on their port, behind the same layers) and the v2
//! HTTP/REST API ([`http`], on `--http-addr`). Both go through [`Models`]:
//! a model is a session, an inference one Forward.
//!
//! Owns the protocol's messages <-> domain conversion ([`convert`]) and the
//! HTTP listener. Contains no tensor math and no session logic: a
//! ModelInfer becomes the same domain Forward a BatchNormService Forward
//! becomes, through the same registry call.

pub mod convert;
mod grpc;
pub mod http;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::Status;

use self::convert::{InferCall, OutputForm};
use super::convert::Caller;
use crate::auth::Principal;
use crate::proto::inference as pb;
use crate::session::{Registry, SessionError};

pub use grpc::InferenceApi;

/// The protocol extensions ServerMetadata lists.
const EXTENSIONS: [&str; 2] = ["binary_tensor_data", "parameters"];

/// What both transports of the protocol serve: sessions as models.
pub struct Models {
    registry: Arc<Registry>,
    /// False once the server drains (ServerReady, `/v2/health/ready`).
    ready: Arc<AtomicBool>,
}

impl Models {
    pub fn new(registry: Arc<Registry>, ready: Arc<AtomicBool>) -> Models {
        Models { registry, ready }
    }

    /// The decoding context of `principal`'s requests.
    pub fn caller(&self, principal: Principal) -> Caller {
        Caller {
            principal,
            max_tensor_elements: self.registry.options().limits.max_tensor_elements,
            shared_memory: None,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn server_metadata(&self) -> pb::ServerMetadataResponse {
        pb::ServerMetadataResponse {
            name: "normserve".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    /// Whether the session exists, can be read and (when a version is named)
    /// is at that version. An unknown or unreadable session is not ready; an
    /// invalid name is an error.
    pub async fn model_ready(
        &self,
        principal: &Principal,
        name: &str,
        version: &str,
    ) -> Result<bool, Status> {
        let model = convert::model_ref(principal, name, version)?;
        match self.registry.get(&model.id).await {
            Ok(snapshot) => Ok(model.version.is_none_or(|v| v == snapshot.version)),
            Err(SessionError::NotFound(_) | SessionError::DataLoss { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// INPUT and OUTPUT of the session; NOT_FOUND when it is not at the
    /// version named.
    pub async fn model_metadata(
        &self,
        principal: &Principal,
        name: &str,
        version: &str,
    ) -> Result<pb::ModelMetadataResponse, Status> {
        let model = convert::model_ref(principal, name, version)?;
        let snapshot = self.registry.get(&model.id).await?;
        if let Some(version) = model.version.filter(|v| *v != snapshot.version) {
            return Err(Status::not_found(format!(
                "model {name:?} is at version {}, not {version}",
                snapshot.version
            )));
        }
        Ok(convert::model_metadata(principal, &snapshot))
    }

    /// One inference: the session's Forward.
    pub async fn infer(
        &self,
        caller: &Caller,
        request: pb::ModelInferRequest,
        output_form: Option<OutputForm>,
    ) -> Result<pb::ModelInferResponse, Status> {
        let InferCall {
            command,
            request_id,
            output_form,
        } = convert::infer_call(caller, request, output_form)?;
        let model = command.id.clone();
        let outcome = self.registry.forward(command).await?;
        Ok(convert::infer_response(
            &caller.principal,
            &model,
            request_id,
            output_form,
            outcome,
        ))
    }
}
