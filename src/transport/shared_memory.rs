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
use super::convert::{self, Caller, WrittenToCudaMemory};
use crate::proto::v1 as pb;
use crate::proto::v1::shared_memory_service_server::SharedMemoryService;
use crate::session::synced::StepForwardOutcome;
use crate::session::Registry;
use crate::shm::{CudaRange, Range, SharedMemory, ShmError};

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
        let (info, already) = match &register.cuda_ipc {
            None => self.shared_memory.register(
                &principal.tenant,
                &register.name,
                register.offset,
                register.byte_size,
            )?,
            // Opening a handle can take a while (the driver maps the memory
            // into this process): off the async threads.
            Some((handle, device)) => {
                let shared_memory = self.shared_memory.clone();
                let tenant = principal.tenant.clone();
                let (handle, device) = (handle.clone(), *device);
                tokio::task::spawn_blocking(move || {
                    shared_memory.register_cuda(
                        &tenant,
                        &register.name,
                        &handle,
                        device,
                        register.offset,
                        register.byte_size,
                    )
                })
                .await
                .map_err(|_| Status::internal("the registration was cancelled"))??
            }
        };
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

/// Answers a Forward whose input was viewed in a CUDA IPC range: its
/// output written into `output` (on the compute pool: a copy to the device
/// and a wait for it), or carried in the reply; in both cases the device is
/// synchronized first, so nothing of the call still reads the client's
/// memory once it is answered.
pub async fn answer_cuda(
    registry: &Registry,
    input: CudaRange,
    output: Option<CudaRange>,
    mut outcome: StepForwardOutcome,
) -> Result<pb::ForwardResponse, Status> {
    let result = outcome.forward.output.take();
    let produced = result.is_some();
    let size = result.as_ref().map_or(0, |r| r.bytes().len());
    let target = output.clone();
    // The result back when it goes in the reply.
    let in_reply = registry
        .pool()
        .run_sized(size, move || {
            input.synchronize()?;
            let (Some(target), Some(result)) = (target, result.as_ref()) else {
                return Ok::<_, ShmError>(result);
            };
            let host = result
                .input_tensor(tch::Device::Cpu)
                .map_err(|e| ShmError::Device(format!("writing the output: {e}")))?;
            target.write(&host)?;
            Ok(None)
        })
        .await??;
    match output {
        Some(written) if produced => Ok(WrittenToCudaMemory { outcome, written }.into()),
        // A replay whose output is no longer held: nothing was written.
        Some(_) => Ok(convert::Representation::Raw.of(outcome).into()),
        None => {
            outcome.forward.output = in_reply;
            Ok(convert::Representation::Raw.of(outcome).into())
        }
    }
}
