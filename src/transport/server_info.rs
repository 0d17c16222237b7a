//! `normserve.v1.ServerService`: facts about the running server.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth;
use crate::proto::v1 as pb;
use crate::proto::v1::server_service_server::ServerService;
use crate::session::Registry;

/// The static part is built once at start-up; session counts are read per call.
pub struct ServerInfoApi {
    info: pb::GetServerInfoResponse,
    registry: Arc<Registry>,
}

impl ServerInfoApi {
    pub fn new(info: pb::GetServerInfoResponse, registry: Arc<Registry>) -> Self {
        ServerInfoApi { info, registry }
    }
}

#[tonic::async_trait]
impl ServerService for ServerInfoApi {
    async fn get_server_info(
        &self,
        request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        let principal = auth::principal(&request)?;
        let mut info = self.info.clone();
        // Users of a tenant count their tenant's sessions only: the others' are
        // not theirs to know. Without authentication everything is one tenant.
        info.sessions = if principal.is_admin() || principal.tenant.is_empty() {
            self.registry.len()
        } else {
            self.registry.tenant_len(&principal.tenant)
        } as u64;
        info.unreadable_sessions = self.registry.unreadable_count() as u64;
        info.store = self.registry.store_name().to_owned();
        Ok(Response::new(info))
    }
}
