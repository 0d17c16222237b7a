//! The state-changing RPCs besides Forward: UpdateParameters and
//! ResetRunningStats.

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, create, expect_status, get, train};
use crate::support::state::fingerprint;
use crate::support::tensors::{batch, f32_raw, typed_f32, values};

#[tokio::test]
async fn update_parameters_with_a_wrong_shape_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let before = get(&mut client, &id).await;

    // A valid bias with an invalid weight: all or nothing.
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        weight: Some(f32_raw(&[4], &[2.0; 4])),
        bias: Some(f32_raw(&[3], &[5.0; 3])),
        eps: Some(1e-3),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(update).await,
        Code::InvalidArgument,
        "size mismatch for weight",
    );
    let after = get(&mut client, &id).await;
    assert_eq!(fingerprint(&after), fingerprint(&before));
    assert_eq!(after.config, before.config);

    // The valid update applies whole.
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        weight: Some(f32_raw(&[3], &[2.0; 3])),
        bias: Some(typed_f32(&[3], &[5.0; 3])),
        eps: Some(1e-3),
        num_batches_tracked: Some(40),
        ..Default::default()
    };
    let session = client
        .update_parameters(update)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((session.version, session.num_batches_tracked), (2, 40));
    assert_eq!(values(session.weight.as_ref().unwrap()), [2.0; 3]);
    assert_eq!(values(session.bias.as_ref().unwrap()), [5.0; 3]);
    assert_eq!(session.config.unwrap().eps, 1e-3);
}

#[tokio::test]
async fn reset_running_stats_restores_zero_mean_unit_var_and_zero_count() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    for _ in 0..3 {
        client.forward(train(&id, batch(4, 2))).await.unwrap();
    }
    let trained = get(&mut client, &id).await;
    assert_eq!(trained.num_batches_tracked, 3);
    assert_ne!(values(trained.running_mean.as_ref().unwrap()), [0.0; 2]);

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        ..Default::default()
    };
    let session = client
        .reset_running_stats(reset)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((session.version, session.num_batches_tracked), (5, 0));
    assert_eq!(values(session.running_mean.as_ref().unwrap()), [0.0; 2]);
    assert_eq!(values(session.running_var.as_ref().unwrap()), [1.0; 2]);
    assert_eq!(
        fingerprint(&get(&mut client, &id).await),
        fingerprint(&session)
    );
}
