//! What a request is called, for labels and logs: the RPC name of a request
//! path (from a fixed set, so a client cannot create metric series by
//! inventing paths), gRPC's names of status codes, and the RPC the current
//! task serves (a task-local the request layer sets and the compute pool reads
//! to label its job times).
//!
//! A leaf module: it depends on nothing else in the crate, so that both the
//! request layer and the compute pool can use it without reaching into each
//! other.

use tracing::Instrument;

/// The methods this server serves; any other path is counted as "other", so
/// that a client cannot create series by inventing paths.
const RPCS: [&str; 26] = [
    "CreateSession",
    "GetSession",
    "ListSessions",
    "DeleteSession",
    "ResetRunningStats",
    "UpdateParameters",
    "Forward",
    "ForwardStream",
    "ExportState",
    "ImportState",
    "MergeSession",
    "ReduceStatistics",
    "ReduceStatisticsStream",
    "Compare",
    "GetServerInfo",
    "Check",
    "Watch",
    "ServerReflectionInfo",
    // inference.GRPCInferenceService (the Open Inference Protocol).
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "other",
];

/// The `rpc` label of a request path `/package.Service/Method`: the method
/// name, or "other" for a method this server does not serve.
pub fn rpc_name(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("other")
}

/// Whether a request path is a `grpc.health.v1.Health` call (logged at DEBUG,
/// never refused by admission).
pub fn is_health_check(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// gRPC's name of a status code, as in the `code` label, the `status` log
/// field and the command line's error lines: one table, in the operator
/// command line's crate (which cannot depend on this one).
pub use normserve_ctl::code_name;

tokio::task_local! {
    static CURRENT_RPC: &'static str;
}

/// The `rpc` label of the request the current task serves, if any.
pub fn current_rpc() -> Option<&'static str> {
    CURRENT_RPC.try_with(|rpc| *rpc).ok()
}

/// Runs `future` as request `rpc`'s work (no span of its own).
pub async fn as_rpc<F: std::future::Future>(rpc: &'static str, future: F) -> F::Output {
    CURRENT_RPC.scope(rpc, future).await
}

/// Runs `future` as part of request `rpc` (for work a handler spawns onto
/// another task, such as a stream's loop), keeping the request's span.
pub fn in_request<F: std::future::Future>(
    rpc: Option<&'static str>,
    future: F,
) -> impl std::future::Future<Output = F::Output> {
    let span = tracing::Span::current();
    async move {
        match rpc {
            Some(rpc) => as_rpc(rpc, future).instrument(span).await,
            None => future.instrument(span).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_are_method_names_or_other() {
        assert_eq!(
            rpc_name("/normserve.v1.BatchNormService/Forward"),
            "Forward"
        );
        assert_eq!(
            rpc_name("/normserve.v1.BatchNormService/ForwardStream"),
            "ForwardStream"
        );
        assert_eq!(rpc_name("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(rpc_name("/x.Y/Invented"), "other");
        assert_eq!(rpc_name(""), "other");
    }
}
