//! normserve's integration tests, one binary: each test starts a server in
//! process on `127.0.0.1:0` and talks to it through the generated tonic
//! clients, as any client would. Expected values are PyTorch's texts or
//! numbers derivable by hand, never the server's own computations.

// Tests fail by panicking; the crate-wide denials are for server paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admission;
mod budget;
mod concurrency;
mod expiry;
mod foundation;
mod link;
mod metrics;
mod protection;
mod security;
mod server;
mod sessions;
mod steps_stream;
mod stream;
mod support;
