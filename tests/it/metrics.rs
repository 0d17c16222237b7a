//! The metrics endpoint: requests counted by RPC and gRPC code, durations in
//! histogram buckets, message bytes as sent on the wire (each message is a
//! 5-byte gRPC prefix and its protobuf encoding), live sessions; scraped over
//! plain HTTP as Prometheus would.

use normserve::proto::v1 as pb;
use prost::Message;
use tonic::Code;

use crate::server::TestServer;
use crate::support::metrics::{http_get, sample, scrape};
use crate::support::requests::{bn1d, named, train};
use crate::support::tensors::f32_raw;

fn wire_bytes(message: &impl Message) -> f64 {
    (5 + message.encoded_len()) as f64
}

#[tokio::test]
async fn requests_bytes_durations_and_sessions_are_counted() {
    let server = TestServer::start_with_metrics(|_| {}).await;
    let text = scrape(&server).await;
    assert_eq!(sample(&text, "normserve_sessions"), Some(0.0));
    assert_eq!(sample(&text, "normserve_inflight_requests"), Some(0.0));
    assert!(!text.contains("normserve_requests_total{"), "{text}");

    let mut client = server.batch_norm().await;
    let create = named("metrics", bn1d(3));
    client.create_session(create.clone()).await.unwrap();
    let missing = client
        .get_session(pb::GetSessionRequest {
            session_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let forward = train(
        "metrics",
        f32_raw(&[4, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9., 1., 0., 2.]),
    );
    let reply = client.forward(forward.clone()).await.unwrap().into_inner();
    let stream: Vec<_> = (0..2).map(|_| forward.clone()).collect();
    let mut replies = client
        .forward_stream(tokio_stream::iter(stream))
        .await
        .unwrap()
        .into_inner();
    let mut stream_sent = 0.0;
    while let Some(reply) = replies.message().await.unwrap() {
        stream_sent += wire_bytes(&reply);
    }

    let text = scrape(&server).await;
    let expected = [
        (
            "normserve_requests_total{rpc=\"CreateSession\",code=\"OK\"}",
            1.0,
        ),
        (
            "normserve_requests_total{rpc=\"GetSession\",code=\"NOT_FOUND\"}",
            1.0,
        ),
        ("normserve_requests_total{rpc=\"Forward\",code=\"OK\"}", 1.0),
        (
            "normserve_requests_total{rpc=\"ForwardStream\",code=\"OK\"}",
            1.0,
        ),
        (
            "normserve_request_duration_seconds_count{rpc=\"Forward\"}",
            1.0,
        ),
        (
            "normserve_request_duration_seconds_bucket{le=\"+Inf\",rpc=\"Forward\"}",
            1.0,
        ),
        (
            "normserve_request_duration_seconds_bucket{le=\"30.0\",rpc=\"Forward\"}",
            1.0,
        ),
        (
            "normserve_request_duration_seconds_bucket{le=\"0.00005\",rpc=\"Forward\"}",
            0.0,
        ),
        (
            "normserve_request_duration_seconds_count{rpc=\"ForwardStream\"}",
            1.0,
        ),
        (
            "normserve_compute_duration_seconds_count{rpc=\"Forward\"}",
            1.0,
        ),
        (
            "normserve_received_bytes_total{rpc=\"CreateSession\"}",
            wire_bytes(&create),
        ),
        (
            "normserve_received_bytes_total{rpc=\"Forward\"}",
            wire_bytes(&forward),
        ),
        (
            "normserve_sent_bytes_total{rpc=\"Forward\"}",
            wire_bytes(&reply),
        ),
        (
            "normserve_received_bytes_total{rpc=\"ForwardStream\"}",
            2.0 * wire_bytes(&forward),
        ),
        (
            "normserve_sent_bytes_total{rpc=\"ForwardStream\"}",
            stream_sent,
        ),
        ("normserve_sessions", 1.0),
        ("normserve_inflight_requests", 0.0),
        ("normserve_shed_requests_total", 0.0),
        ("normserve_session_evictions_total{action=\"evict\"}", 0.0),
        // --durability none: no store, no store operations.
        (
            "normserve_store_operation_duration_seconds_count{op=\"put\"}",
            0.0,
        ),
    ];
    for (series, value) in expected {
        assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
    }
    // One compute job per group of messages the stream had received: the
    // two sent together are one job, or two when the second arrived late.
    let stream_jobs = sample(
        &text,
        "normserve_compute_duration_seconds_count{rpc=\"ForwardStream\"}",
    );
    assert!(matches!(stream_jobs, Some(1.0 | 2.0)), "{stream_jobs:?}");
    // NOT_FOUND arrives without a message: GetSession has sent nothing.
    assert_eq!(
        sample(&text, "normserve_sent_bytes_total{rpc=\"GetSession\"}"),
        None
    );
    assert!(sample(&text, "normserve_queue_wait_seconds_count").unwrap() >= 3.0);
    // Durations are histograms with buckets, not only sums and counts.
    assert!(text.contains("# TYPE normserve_request_duration_seconds histogram\n"));
    // Without a GPU no device memory is reported at all.
    if !tch::Cuda::is_available() {
        assert!(!text.contains("normserve_cuda_memory_bytes{"), "{text}");
    }

    client
        .delete_session(pb::DeleteSessionRequest {
            session_id: "metrics".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        sample(&scrape(&server).await, "normserve_sessions"),
        Some(0.0)
    );
}

#[tokio::test]
async fn store_operations_are_timed_per_operation() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_metrics(|c| {
        c.durability = normserve::config::Durability::Sync;
        c.data_dir = data.path().to_owned();
    })
    .await;
    let mut client = server.batch_norm().await;
    client
        .create_session(named("stored", bn1d(3)))
        .await
        .unwrap();
    let text = scrape(&server).await;
    assert_eq!(
        sample(
            &text,
            "normserve_store_operation_duration_seconds_count{op=\"put\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "normserve_store_errors_total{op=\"put\"}"),
        Some(0.0)
    );
}

#[tokio::test]
async fn other_paths_are_not_found() {
    let server = TestServer::start_with_metrics(|_| {}).await;
    let (status, _) = http_get(server.metrics_address.unwrap(), "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn build_info_names_the_versions_get_server_info_reports() {
    let server = TestServer::start_with_metrics(|_| {}).await;
    let info = server
        .server_info()
        .await
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let text = scrape(&server).await;
    let series = format!(
        "normserve_build_info{{version=\"{}\",libtorch=\"{}\"}}",
        info.server_version, info.libtorch_version
    );
    assert_eq!(sample(&text, &series), Some(1.0), "{text}");
    assert_eq!(text.matches("normserve_build_info{").count(), 1, "{text}");
}

/// In-process, the server's process is this test binary, whose other tests
/// run alongside: the figures are checked loosely here, strictly against the
/// binary in tests/conformance/test_observability.py.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn process_metrics_describe_this_process() {
    let server = TestServer::start_with_metrics(|_| {}).await;
    let text = scrape(&server).await;
    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in\n{text}"));
    // The shell inherits this process' limit on open files.
    let ulimit = std::process::Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .unwrap();
    let soft_limit = String::from_utf8(ulimit.stdout).unwrap();
    if let Ok(soft_limit) = soft_limit.trim().parse::<f64>() {
        assert_eq!(value("process_max_fds"), soft_limit);
    }
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_open_fds") <= value("process_max_fds"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        started <= now && started > now - 3600.0,
        "{started} vs {now}"
    );
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
    assert!(value("process_threads") >= 2.0);
    assert!(value("process_cpu_seconds_total") > 0.0);
}
