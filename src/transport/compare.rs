//! `normserve.v1.CompareService`: decode, run the comparison on the compute
//! pool, encode. Stateless: it holds no reference to the session registry,
//! so a Compare cannot read or change a session.

use tch::Device;
use tonic::{Request, Response, Status};

use super::convert;
use crate::compute::ComputePool;
use crate::device::DeviceChoice;
use crate::numerics::compare::compare;
use crate::proto::v1 as pb;
use crate::proto::v1::compare_service_server::CompareService;

pub struct CompareApi {
    pool: ComputePool,
    default_device: Device,
    max_tensor_elements: u64,
    max_num_features: i64,
}

impl CompareApi {
    pub fn new(
        pool: ComputePool,
        default_device: Device,
        max_tensor_elements: u64,
        max_num_features: i64,
    ) -> Self {
        CompareApi {
            pool,
            default_device,
            max_tensor_elements,
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
        let mut request = request.into_inner();
        let device = std::mem::take(&mut request.device)
            .parse::<DeviceChoice>()?
            .resolve(Some(self.default_device))?;
        let (domain, representation) = convert::compare_request(request, self.max_tensor_elements)?;
        let max_num_features = self.max_num_features;
        let comparison = self
            .pool
            .run(move || compare(domain, device, max_num_features))
            .await??;
        Ok(Response::new(convert::comparison_to_proto(
            comparison,
            representation,
        )))
    }
}
