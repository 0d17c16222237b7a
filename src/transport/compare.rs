//! `normserve.v1.CompareService`: decode, run the comparison on the compute
//! pool, encode. Stateless: it holds no reference to the session registry,
//! so a Compare cannot read or change a session.

use tonic::{Request, Response, Status};

use super::convert::{CompareCall, CompareLimits, Scope};
use crate::compute::ComputePool;
use crate::numerics::compare::compare;
use crate::proto::v1 as pb;
use crate::proto::v1::compare_service_server::CompareService;

pub struct CompareApi {
    pool: ComputePool,
    limits: CompareLimits,
    max_num_features: i64,
}

impl CompareApi {
    pub fn new(pool: ComputePool, limits: CompareLimits, max_num_features: i64) -> Self {
        CompareApi {
            pool,
            limits,
            max_num_features,
        }
    }
}

#[tonic::async_trait]
impl CompareService for CompareApi {
    async fn compare(
        &self,
        request: Request<pb::CompareRequest>,
    ) -> Result<Response<pb::CompareResponse>, Status> {
        let CompareCall {
            request,
            device,
            representation,
        } = self.limits.decode(request.into_inner())?;
        let max_num_features = self.max_num_features;
        let comparison = self
            .pool
            .run(move || compare(request, device, max_num_features))
            .await??;
        Ok(Response::new(representation.of(comparison).into()))
    }
}
