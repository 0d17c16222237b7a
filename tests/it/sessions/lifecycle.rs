//! Creating, listing, getting and deleting sessions; ids chosen by clients or
//! generated, and the answers for unknown or malformed ones.

use std::collections::HashMap;

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, create, expect_status, get, named, train, EPS};
use crate::support::state::{fingerprint, list_ids};
use crate::support::tensors::{batch, values};

fn ids(sessions: &[pb::Session]) -> Vec<String> {
    sessions.iter().map(|s| s.session_id.clone()).collect()
}

fn list_request(page_size: i32, page_token: &str) -> pb::ListSessionsRequest {
    pb::ListSessionsRequest {
        page_size,
        page_token: page_token.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_without_an_id_generates_one_with_pytorch_defaults() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let first = create(&mut client, bn1d(3)).await;
    let second = create(&mut client, bn1d(3)).await;
    assert!(!first.session_id.is_empty());
    assert_ne!(first.session_id, second.session_id);

    assert_eq!(first.version, 1);
    assert_eq!(first.num_batches_tracked, 0);
    let config = first.config.clone().unwrap();
    assert_eq!(config.kind, pb::BatchNormKind::BatchNorm1d as i32);
    assert_eq!(config.num_features, 3);
    assert_eq!(config.eps, EPS);
    assert_eq!(config.momentum, Some(0.1));
    assert!(!config.cumulative_average);
    assert!(config.affine);
    assert!(config.track_running_stats);
    assert_eq!(config.param_dtype, pb::DataType::Float32 as i32);
    assert_eq!(config.default_mode, pb::Mode::Train as i32);
    assert_eq!(values(first.weight.as_ref().unwrap()), [1.0; 3]);
    assert_eq!(values(first.bias.as_ref().unwrap()), [0.0; 3]);
    assert_eq!(values(first.running_mean.as_ref().unwrap()), [0.0; 3]);
    assert_eq!(values(first.running_var.as_ref().unwrap()), [1.0; 3]);
    assert_eq!(first.weight.as_ref().unwrap().shape, [3]);

    let fetched = get(&mut client, &first.session_id).await;
    assert_eq!(fingerprint(&fetched), fingerprint(&first));
    assert_eq!(fetched.config, first.config);
}

#[tokio::test]
async fn client_chosen_id_is_idempotent_only_for_the_same_configuration() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let request = named("layer-1.a_B", bn1d(3));
    let created = create(&mut client, request.clone()).await;
    assert_eq!(created.session_id, "layer-1.a_B");
    client
        .forward(train("layer-1.a_B", batch(4, 3)))
        .await
        .unwrap();

    // The same configuration again: the existing session, as it is now.
    let again = client
        .create_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_existed);
    let session = again.session.unwrap();
    assert_eq!(session.session_id, "layer-1.a_B");
    assert_eq!(session.version, 2);
    assert_eq!(session.num_batches_tracked, 1);
    assert_eq!(session.created_at, created.created_at);

    let different = [
        ("num_features", named("layer-1.a_B", bn1d(4))),
        (
            "eps",
            pb::CreateSessionRequest {
                eps: Some(1e-3),
                ..request.clone()
            },
        ),
        (
            "kind",
            pb::CreateSessionRequest {
                kind: pb::BatchNormKind::BatchNorm2d as i32,
                ..request.clone()
            },
        ),
    ];
    for (field, request) in different {
        expect_status(
            client.create_session(request).await,
            Code::AlreadyExists,
            field,
        );
    }
    assert_eq!(list_ids(&mut client).await, ["layer-1.a_B"]);
}

#[tokio::test]
async fn list_pages_through_every_session_once_in_id_order() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let mut created = Vec::new();
    for i in 0..10 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let request = pb::CreateSessionRequest {
            labels: HashMap::from([("team".to_owned(), team.to_owned())]),
            ..named(&format!("s{i:02}"), bn1d(2))
        };
        created.push(create(&mut client, request).await.session_id);
    }

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sessions(list_request(3, &token))
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(page.sessions.len());
        // Without include_tensors the pages carry no tensors.
        assert!(page.sessions.iter().all(|s| s.weight.is_none()));
        seen.extend(ids(&page.sessions));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(page_sizes, [3, 3, 3, 1]);
    assert_eq!(seen, created);

    let team_a = pb::ListSessionsRequest {
        label_selector: HashMap::from([("team".to_owned(), "a".to_owned())]),
        include_tensors: true,
        ..Default::default()
    };
    let page = client.list_sessions(team_a).await.unwrap().into_inner();
    assert_eq!(ids(&page.sessions), ["s00", "s02", "s04", "s06", "s08"]);
    assert!(page.sessions.iter().all(|s| s.weight.is_some()));

    let nobody = pb::ListSessionsRequest {
        label_selector: HashMap::from([
            ("team".to_owned(), "a".to_owned()),
            ("tier".to_owned(), "gold".to_owned()),
        ]),
        ..Default::default()
    };
    let page = client.list_sessions(nobody).await.unwrap().into_inner();
    assert!(page.sessions.is_empty());

    expect_status(
        client.list_sessions(list_request(-1, "")).await,
        Code::InvalidArgument,
        "page_size",
    );
    expect_status(
        client.list_sessions(list_request(3, "not/a/token")).await,
        Code::InvalidArgument,
        "page_token",
    );
}

#[tokio::test]
async fn deleted_session_is_not_found_afterwards() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let delete = || pb::DeleteSessionRequest {
        session_id: id.clone(),
        expected_version: None,
    };
    client.delete_session(delete()).await.unwrap();

    let get = pb::GetSessionRequest {
        session_id: id.clone(),
    };
    expect_status(client.get_session(get).await, Code::NotFound, &id);
    expect_status(client.delete_session(delete()).await, Code::NotFound, &id);
    assert!(list_ids(&mut client).await.is_empty());
}

#[tokio::test]
async fn unknown_session_is_not_found_on_every_rpc() {
    let server = TestServer::start().await;
    let mut c = server.batch_norm().await;
    let id = "no-such-session";
    let s = || id.to_owned();
    let outcomes = [
        (
            "GetSession",
            c.get_session(pb::GetSessionRequest { session_id: s() })
                .await
                .err(),
        ),
        (
            "DeleteSession",
            c.delete_session(pb::DeleteSessionRequest {
                session_id: s(),
                expected_version: None,
            })
            .await
            .err(),
        ),
        (
            "ResetRunningStats",
            c.reset_running_stats(pb::ResetRunningStatsRequest {
                session_id: s(),
                ..Default::default()
            })
            .await
            .err(),
        ),
        (
            "UpdateParameters",
            c.update_parameters(pb::UpdateParametersRequest {
                session_id: s(),
                eps: Some(1e-3),
                ..Default::default()
            })
            .await
            .err(),
        ),
        ("Forward", c.forward(train(id, batch(2, 3))).await.err()),
        (
            "ExportState",
            c.export_state(pb::ExportStateRequest { session_id: s() })
                .await
                .err(),
        ),
        (
            "ImportState",
            c.import_state(pb::ImportStateRequest {
                session_id: s(),
                ..Default::default()
            })
            .await
            .err(),
        ),
    ];
    for (rpc, status) in outcomes {
        let status = status.unwrap_or_else(|| panic!("{rpc} succeeded on an unknown session"));
        assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
        assert!(status.message().contains(id), "{rpc}: {status:?}");
    }
}

#[tokio::test]
async fn malformed_session_ids_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let too_long = "x".repeat(129);
    for bad in ["a/b", "has space", "ünï", "semi;colon", too_long.as_str()] {
        expect_status(
            client.create_session(named(bad, bn1d(2))).await,
            Code::InvalidArgument,
            "session_id",
        );
        let get = pb::GetSessionRequest {
            session_id: bad.to_owned(),
        };
        expect_status(
            client.get_session(get).await,
            Code::InvalidArgument,
            "session_id",
        );
        expect_status(
            client.forward(train(bad, batch(2, 2))).await,
            Code::InvalidArgument,
            "session_id",
        );
    }
    // Empty means "generate one" only for CreateSession.
    let get = pb::GetSessionRequest::default();
    expect_status(
        client.get_session(get).await,
        Code::InvalidArgument,
        "session_id",
    );
    // 128 characters is the longest valid id.
    let longest = "y".repeat(128);
    create(&mut client, named(&longest, bn1d(2))).await;
    assert_eq!(list_ids(&mut client).await, [longest]);
}
