//! `normserve.v1.ServerService`: facts about the running server.

use tonic::{Request, Response, Status};

use crate::proto::v1 as pb;
use crate::proto::v1::server_service_server::ServerService;

/// Built once at start-up; the answer never changes while the server runs.
pub struct ServerInfoApi {
    info: pb::GetServerInfoResponse,
}

impl ServerInfoApi {
    pub fn new(info: pb::GetServerInfoResponse) -> Self {
        ServerInfoApi { info }
    }
}

#[tonic::async_trait]
impl ServerService for ServerInfoApi {
    async fn get_server_info(
        &self,
        _request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}
