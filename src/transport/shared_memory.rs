//! `normserve.v1.SharedMemoryService` (register, unregister, status of the
//! caller's tenant's regions) and what Forward does with shared memory
//! besides decoding: the check after its input was read, the regions that
//! lost pages during a failed call unregistered, and an output the step did
//! not compute into its range (a replay's, a synchronized step's, one in
//! place) copied in on the compute pool.

use std::sync::Arc;

use bytes::Bytes;
use tonic::{Request, Response, Status};

use super::auth;
use super::convert::{self, Caller};
use crate::proto::v1 as pb;
use crate::proto::v1::shared_memory_service_server::SharedMemoryService;
use crate::session::Registry;
use crate::shm::{Range, SharedMemory, ShmError};

pub struct SharedMemoryApi {
    shared_memory: Arc<SharedMemory>,
}

impl SharedMemoryApi {
    pub fn new(shared_memory: Arc<SharedMemory>) -> Self {
        SharedMemoryApi { shared_memory }
    }
}

#[tonic::async_trait]
impl SharedMemoryService for SharedMemoryApi {
    async fn register_shared_memory(
        &self,
        request: Request<pb::RegisterSharedMemoryRequest>,
    ) -> Result<Response<pb::RegisterSharedMemoryResponse>, Status> {
        let principal = auth::principal(&request)?;
        let register = convert::RegisterRegion::from(request.into_inner());
        let (info, already) = self.shared_memory.register(
            &principal.tenant,
            &register.name,
            register.offset,
            register.byte_size,
        )?;
        Ok(Response::new(convert::registered_to_proto(info, already)))
    }

    async fn unregister_shared_memory(
        &self,
        request: Request<pb::UnregisterSharedMemoryRequest>,
    ) -> Result<Response<pb::UnregisterSharedMemoryResponse>, Status> {
        let principal = auth::principal(&request)?;
        let name = convert::UnregisterRegion::from(request.into_inner()).name;
        let count = self
            .shared_memory
            .unregister(&principal.tenant, name.as_deref())?;
        Ok(Response::new(convert::unregistered_to_proto(count)))
    }

    async fn shared_memory_status(
        &self,
        request: Request<pb::SharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SharedMemoryStatusResponse>, Status> {
        let principal = auth::principal(&request)?;
        let name = convert::RegionStatus::from(request.into_inner()).name;
        let regions = self
            .shared_memory
            .status(&principal.tenant, name.as_deref())?;
        Ok(Response::new(convert::region_status_to_proto(
            regions,
            self.shared_memory.limits(),
        )))
    }
}

/// After a Forward read its input from `input`: fails the call when the
/// object was truncated meanwhile (the SIGBUS guard replaced pages with
/// zeros), unregistering the region.
pub fn check_after_read(caller: &Caller, input: &Range) -> Result<(), Status> {
    if !input.region().faulted() {
        return Ok(());
    }
    if let Some(shared_memory) = &caller.shared_memory {
        shared_memory.forget_broken(&caller.principal.tenant, input);
    }
    Err(ShmError::TruncatedDuringUse {
        region: input.region().name().to_owned(),
        during: "read its input",
    }
    .into())
}

/// After a Forward failed: unregisters the regions of `ranges` that lost
/// pages during the call (their objects truncated under them).
pub fn forget_faulted<'r>(caller: &Caller, ranges: impl IntoIterator<Item = &'r Option<Range>>) {
    let Some(shared_memory) = &caller.shared_memory else {
        return;
    };
    for range in ranges.into_iter().flatten() {
        if range.region().faulted() {
            shared_memory.forget_broken(&caller.principal.tenant, range);
        }
    }
}

/// Writes a Forward's `output` into `range` (which was checked to hold it
/// exactly) as a compute job: one copy straight from the result's memory.
pub async fn write_output(
    registry: &Registry,
    caller: &Caller,
    range: &Range,
    output: Bytes,
) -> Result<(), Status> {
    let target = range.clone();
    let written = registry
        .pool()
        .run_sized(output.len(), move || target.write(&output))
        .await?;
    let Err(error) = written else {
        return Ok(());
    };
    if let Some(shared_memory) = &caller.shared_memory {
        shared_memory.forget_broken(&caller.principal.tenant, range);
    }
    Err(match error {
        ShmError::Truncated(region) => ShmError::TruncatedDuringUse {
            region,
            during: "wrote its output",
        },
        other => other,
    }
    .into())
}
