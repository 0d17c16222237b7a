//! The shared-memory scenarios' object: a /dev/shm object holding the input
//! (at 0) and the output (after it), registered with the server
//! (SharedMemoryService), the Forward naming both ranges instead of carrying
//! bytes; unregistered and removed when dropped. Only for a server on this
//! host.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use normserve::proto::v1 as pb;
use normserve::proto::v1::shared_memory_service_client::SharedMemoryServiceClient;
use tonic::transport::Channel;

use crate::fatal;
use crate::scenarios::Scenario;

pub struct SharedObject {
    pub name: String,
    path: String,
    file: File,
    input_bytes: u64,
    /// Where the output goes in the object.
    output_offset: u64,
    channel: Channel,
}

impl SharedObject {
    /// An object for `raw` (the input, written once) and an output of the
    /// same size, registered on `channel`.
    pub async fn create(channel: &Channel, raw: &Bytes) -> SharedObject {
        let name = format!("normserve-bench-{}-{:x}", std::process::id(), rand_suffix());
        let path = format!("/dev/shm/{name}");
        let input_bytes = raw.len() as u64;
        let output_offset = input_bytes.div_ceil(4096) * 4096;
        let file = match OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) => fatal(&format!("cannot create {path}: {e}")),
        };
        if let Err(e) = file
            .set_len(output_offset + input_bytes)
            .and_then(|()| file.write_all_at(raw, 0))
        {
            let _ = std::fs::remove_file(&path);
            fatal(&format!("cannot fill {path}: {e}"));
        }
        let object = SharedObject {
            name,
            path,
            file,
            input_bytes,
            output_offset,
            channel: channel.clone(),
        };
        let registered = SharedMemoryServiceClient::new(channel.clone())
            .register_shared_memory(pb::RegisterSharedMemoryRequest {
                name: object.name.clone(),
                offset: 0,
                byte_size: output_offset + input_bytes,
                cuda_ipc: None,
            })
            .await;
        if let Err(status) = registered {
            fatal(&format!(
                "RegisterSharedMemory: {status} (shared-memory scenarios need the server on this host)"
            ));
        }
        object
    }

    /// The Forward of `scenario` on `session_id` through the object.
    pub fn forward_request(&self, scenario: &Scenario, session_id: String) -> pb::ForwardRequest {
        let range = |offset| pb::SharedMemoryRange {
            region: self.name.clone(),
            offset,
            byte_size: self.input_bytes,
        };
        pb::ForwardRequest {
            session_id,
            input: Some(pb::Tensor {
                dtype: pb::DataType::Float32 as i32,
                shape: scenario.shape.clone(),
                values: None,
            }),
            mode: scenario.mode(),
            input_region: Some(range(0)),
            output_region: Some(range(self.output_offset)),
            ..Default::default()
        }
    }

    /// A client's copy of `raw` into the input range (what
    /// `session.forward(x, shm=True)` does for an array outside shared memory).
    pub fn copy_in(&self, raw: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(raw, 0)
    }

    /// A client's copy of the output out of the object.
    pub fn copy_out(&self, into: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(into, self.output_offset)
    }

    /// Unregisters and removes the object.
    pub async fn remove(self) {
        let _ = SharedMemoryServiceClient::new(self.channel.clone())
            .unregister_shared_memory(pb::UnregisterSharedMemoryRequest {
                name: self.name.clone(),
            })
            .await;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}
