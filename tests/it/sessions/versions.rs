//! Optimistic concurrency and retries: expected_version, request ids replayed
//! or refused when reused by a different call.

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, create, eval, expect_status, get, train};
use crate::support::state::fingerprint;
use crate::support::tensors::batch;

#[tokio::test]
async fn expected_version_mismatch_is_aborted_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let before = get(&mut client, &id).await;

    let stale_forward = pb::ForwardRequest {
        expected_version: Some(7),
        ..train(&id, batch(2, 2))
    };
    expect_status(client.forward(stale_forward).await, Code::Aborted, "7");
    let stale_eval = pb::ForwardRequest {
        expected_version: Some(7),
        ..eval(&id, batch(2, 2))
    };
    expect_status(client.forward(stale_eval).await, Code::Aborted, "7");
    let stale_update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        eps: Some(1e-3),
        expected_version: Some(0),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(stale_update).await,
        Code::Aborted,
        "",
    );
    let stale_reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        expected_version: Some(2),
        ..Default::default()
    };
    expect_status(
        client.reset_running_stats(stale_reset).await,
        Code::Aborted,
        "",
    );
    let stale_delete = pb::DeleteSessionRequest {
        session_id: id.clone(),
        expected_version: Some(2),
    };
    expect_status(client.delete_session(stale_delete).await, Code::Aborted, "");

    let after = get(&mut client, &id).await;
    assert_eq!(fingerprint(&after), fingerprint(&before));
    assert_eq!(after.config, before.config);

    // The current version applies.
    let current = pb::ForwardRequest {
        expected_version: Some(1),
        ..train(&id, batch(2, 2))
    };
    assert_eq!(
        client.forward(current).await.unwrap().into_inner().version,
        2
    );
}

#[tokio::test]
async fn retried_request_id_is_replayed_and_counted_once() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let request = pb::ForwardRequest {
        request_id: "batch-17".into(),
        ..train(&id, batch(4, 3))
    };
    let first = client.forward(request.clone()).await.unwrap().into_inner();
    let retry = client.forward(request).await.unwrap().into_inner();
    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(retry.output, first.output);
    assert_eq!((retry.version, retry.num_batches_tracked), (2, 1));

    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (2, 1));

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        request_id: "reset-1".into(),
        ..Default::default()
    };
    let first = client
        .reset_running_stats(reset.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = client
        .reset_running_stats(reset)
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed && retry.replayed);
    assert_eq!(retry.session.unwrap().version, 3);
    assert_eq!(get(&mut client, &id).await.version, 3);
}

#[tokio::test]
async fn request_id_reused_by_a_different_call_is_already_exists() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let forward = pb::ForwardRequest {
        request_id: "r1".into(),
        ..train(&id, batch(4, 3))
    };
    client.forward(forward).await.unwrap();
    let before = get(&mut client, &id).await;

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        request_id: "r1".into(),
        ..Default::default()
    };
    expect_status(
        client.reset_running_stats(reset).await,
        Code::AlreadyExists,
        "r1",
    );
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        eps: Some(1e-3),
        request_id: "r1".into(),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(update.clone()).await,
        Code::AlreadyExists,
        "r1",
    );
    assert_eq!(
        fingerprint(&get(&mut client, &id).await),
        fingerprint(&before)
    );

    // And the other way round: an update's id reused by a forward.
    let update = pb::UpdateParametersRequest {
        request_id: "u1".into(),
        ..update
    };
    client.update_parameters(update).await.unwrap();
    let forward = pb::ForwardRequest {
        request_id: "u1".into(),
        ..train(&id, batch(4, 3))
    };
    expect_status(client.forward(forward).await, Code::AlreadyExists, "u1");
    assert_eq!(get(&mut client, &id).await.num_batches_tracked, 1);
}
