//! `normserve.v1.ServerService`: facts about the running server.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth;
use super::convert::{ServerFacts, ServerInfo};
use crate::proto::v1 as pb;
use crate::proto::v1::server_service_server::ServerService;
use crate::session::Registry;
use crate::shm::SharedMemory;

/// The facts are gathered once at start-up; session counts are read per call.
pub struct ServerInfoApi {
    facts: ServerFacts,
    registry: Arc<Registry>,
    shared_memory: Arc<SharedMemory>,
}

impl ServerInfoApi {
    pub fn new(
        facts: ServerFacts,
        registry: Arc<Registry>,
        shared_memory: Arc<SharedMemory>,
    ) -> Self {
        ServerInfoApi {
            facts,
            registry,
            shared_memory,
        }
    }
}

#[tonic::async_trait]
impl ServerService for ServerInfoApi {
    async fn get_server_info(
        &self,
        request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        let principal = auth::principal(&request)?;
        // Users of a tenant count their tenant's sessions only: the others' are
        // not theirs to know. Without authentication everything is one tenant.
        let tenant = (!principal.is_admin() && !principal.tenant.is_empty())
            .then_some(principal.tenant.as_str());
        let sessions = match tenant {
            None => self.registry.len(),
            Some(tenant) => self.registry.tenant_len(tenant),
        };
        let budget = self.registry.memory_budget();
        let (mapped_bytes, regions) = match tenant {
            None => self.shared_memory.totals(),
            Some(_) => (0, 0),
        };
        Ok(Response::new(
            ServerInfo {
                facts: &self.facts,
                sessions: sessions as u64,
                unreadable_sessions: self.registry.unreadable_count(tenant) as u64,
                memory_budget_bytes: budget.limit(),
                memory_charged_bytes: match tenant {
                    None => budget.charged(),
                    Some(_) => 0,
                },
                shared_memory_mapped_bytes: mapped_bytes,
                shared_memory_regions: regions,
            }
            .into(),
        ))
    }
}
