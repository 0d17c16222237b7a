//! The serving skeleton: health, reflection, server info, shutdown.

use std::collections::BTreeSet;

use normserve::proto::v1 as pb;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::server::TestServer;
use crate::support::requests::{bn1d, create, expect_status, get, train};
use crate::support::tensors::batch;

/// What the server serves, by full gRPC name (reflection itself aside).
const SERVED: [&str; 6] = [
    "grpc.health.v1.Health",
    "inference.GRPCInferenceService",
    "normserve.v1.BatchNormService",
    "normserve.v1.CompareService",
    "normserve.v1.ServerService",
    "normserve.v1.SharedMemoryService",
];

fn check_request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

#[tokio::test]
async fn health_says_serving_for_the_server_and_its_services() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in [
        "",
        "normserve.v1.BatchNormService",
        "normserve.v1.ServerService",
        "normserve.v1.CompareService",
    ] {
        let reply = health.check(check_request(service)).await.unwrap();
        assert_eq!(
            reply.into_inner().status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
    // Unknown names are NOT_FOUND, not SERVING.
    let unknown = health
        .check(check_request("normserve.v1.NoSuchService"))
        .await;
    expect_status(unknown, Code::NotFound, "");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_turns_not_serving_once_shutdown_begins() {
    let mut server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    // A Watch stream is an open request: the drain waits for it, and it
    // receives every status change, so the transition is observed without
    // polling.
    let mut watch = health
        .watch(check_request("normserve.v1.BatchNormService"))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    server.begin_shutdown();
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);

    drop(watch);
    drop(health);
    server.stop().await.unwrap();
}

mod reflection_v1 {
    pub use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    pub use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    pub use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    pub use tonic_reflection::pb::v1::ServerReflectionRequest;
}

async fn ask_reflection_v1(
    channel: Channel,
    question: reflection_v1::MessageRequest,
) -> reflection_v1::MessageResponse {
    use reflection_v1::*;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(question),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    reply.message_response.unwrap()
}

async fn services_listed_by_reflection_v1(channel: Channel) -> BTreeSet<String> {
    use reflection_v1::*;
    let reply = ask_reflection_v1(channel, MessageRequest::ListServices(String::new())).await;
    let MessageResponse::ListServicesResponse(list) = reply else {
        panic!("not a list of services: {reply:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

async fn services_listed_by_reflection_v1alpha(channel: Channel) -> BTreeSet<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = ServerReflectionClient::new(channel);
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("not a list of services: {reply:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// Reflection's own services are left out: they are an implementation detail
/// of each reflection version.
fn without_reflection(names: BTreeSet<String>) -> BTreeSet<String> {
    names
        .into_iter()
        .filter(|name| !name.starts_with("grpc.reflection."))
        .collect()
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_exactly_the_served_services() {
    let server = TestServer::start().await;
    let served: BTreeSet<String> = SERVED.iter().map(|s| s.to_string()).collect();

    let v1 = services_listed_by_reflection_v1(server.channel().await).await;
    assert_eq!(without_reflection(v1), served);
    let v1alpha = services_listed_by_reflection_v1alpha(server.channel().await).await;
    assert_eq!(without_reflection(v1alpha), served);

    // A listed service resolves to its descriptor, as grpcurl asks next.
    let symbol = reflection_v1::MessageRequest::FileContainingSymbol(
        "normserve.v1.BatchNormService".to_owned(),
    );
    let reply = ask_reflection_v1(server.channel().await, symbol).await;
    let reflection_v1::MessageResponse::FileDescriptorResponse(files) = reply else {
        panic!("not a file descriptor: {reply:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn server_info_reports_libtorch_the_cpu_and_the_configured_limits() {
    let server = TestServer::start_with(|c| {
        c.max_sessions = 7;
        c.max_tensor_elements = 12_345;
        c.max_num_features = 99;
        c.max_message_bytes = 3 << 20;
        c.memory_budget = Some(64 << 20);
        c.replay_cache_total_bytes = 1 << 20;
        c.shared_memory_max_bytes = 5 << 20;
    })
    .await;
    let mut client = server.server_info().await;
    let info = client
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(info.libtorch_version, "2.11.0");
    assert_eq!(info.server_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.devices[0].name, "cpu");
    // Nothing but this call's own request is charged (no sessions, no store).
    let charged = info.limits.as_ref().map_or(0, |l| l.memory_charged_bytes);
    assert!(charged < 1024, "{charged}");
    assert_eq!(
        info.limits,
        Some(pb::Limits {
            max_sessions: 7,
            max_tensor_elements: 12_345,
            max_num_features: 99,
            max_message_bytes: 3 << 20,
            memory_budget_bytes: 64 << 20,
            memory_charged_bytes: charged,
            replay_cache_total_bytes: 1 << 20,
            shared_memory_max_bytes: 5 << 20,
            shared_memory_mapped_bytes: 0,
            shared_memory_regions: 0,
        })
    );
    if tch::Cuda::is_available() {
        println!("skipping the default_device check: CUDA is present, so `auto` picks cuda:0");
    } else {
        assert_eq!(info.default_device, "cpu");
        assert_eq!(info.cuda_device_count, 0);
        assert_eq!(info.devices.len(), 1);
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn serve_returns_ok_once_the_shutdown_future_fires() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    client.forward(train(&id, batch(4, 3))).await.unwrap();
    assert_eq!(get(&mut client, &id).await.num_batches_tracked, 1);
    drop(client);

    server.stop().await.unwrap();
}
