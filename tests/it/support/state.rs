//! Reading sessions back: the ids a listing returns, and the part of a
//! session's state a refused request must leave untouched.

use normserve::proto::v1 as pb;

use crate::server::BatchNorm;
use crate::support::tensors::values;

/// The ids of every session the client sees, in listing order (one page
/// holds them all).
pub async fn list_ids(client: &mut BatchNorm) -> Vec<String> {
    let request = pb::ListSessionsRequest {
        page_size: 1000,
        ..Default::default()
    };
    let page = client.list_sessions(request).await.unwrap().into_inner();
    assert!(page.next_page_token.is_empty());
    page.sessions.into_iter().map(|s| s.session_id).collect()
}

/// The state a refused request must leave untouched: version, counter and
/// the four (C,) tensors.
pub fn fingerprint(session: &pb::Session) -> (u64, i64, Vec<Vec<f64>>) {
    let tensors = [
        &session.weight,
        &session.bias,
        &session.running_mean,
        &session.running_var,
    ];
    (
        session.version,
        session.num_batches_tracked,
        tensors
            .iter()
            .map(|t| t.as_ref().map(values).unwrap_or_default())
            .collect(),
    )
}
