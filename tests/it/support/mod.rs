//! What the test modules share: request builders and status checks
//! (`requests`), tensors packed and read as any client would (`tensors`),
//! sessions read back (`state`) and the metrics endpoint scraped
//! (`metrics`). No tests here; starting servers is `crate::server`'s job.

pub mod metrics;
pub mod requests;
pub mod state;
pub mod tensors;
