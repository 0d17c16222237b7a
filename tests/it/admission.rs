//! Admission that cannot be held hostage: calls take a place only once their
//! first message has arrived, calls and connections that send nothing are
//! ended after their timeouts, half handshakes are closed, and the compute
//! pool serves a polite caller between a flood's jobs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use normserve::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tower::{Service, ServiceExt};

use crate::security::Pki;
use crate::server::{BareHttp2, TestServer};
use crate::support::metrics::{sample, scrape};
use crate::support::requests::{bn1d, check_status, create, eval, train};
use crate::support::tensors::{batch, f32_raw};

/// Generous bound on waits that must end by the server's doing: a failure
/// guard, never the thing tested.
const GUARD: Duration = Duration::from_secs(30);

type Frames = mpsc::Sender<Result<http_body::Frame<Bytes>, tonic::Status>>;

/// A gRPC POST to `path` whose body is whatever is sent on the returned
/// sender (nothing, for a client that sends headers only); the response
/// comes when the server answers.
fn open_call(
    server: &TestServer,
    connection: &BareHttp2,
    path: &str,
) -> (
    Frames,
    tokio::task::JoinHandle<http::Response<hyper::body::Incoming>>,
) {
    let (frames, receiver) = mpsc::channel(4);
    let body = http_body_util::StreamBody::new(ReceiverStream::new(receiver));
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", server.address))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let mut connection = connection.clone();
    let response = tokio::spawn(async move {
        connection
            .ready()
            .await
            .unwrap()
            .call(request)
            .await
            .unwrap()
    });
    (frames, response)
}

/// Waits until the server counts at least `count` requests in progress
/// (from their headers on, refused or waiting ones included).
async fn until_in_flight(server: &TestServer, count: f64) {
    tokio::time::timeout(GUARD, async {
        loop {
            let text = scrape(server).await;
            if sample(&text, "normserve_inflight_requests").unwrap_or(0.0) >= count {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the server saw the calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_sent_only_headers_hold_no_place() {
    const LIMIT: u64 = 8;
    let server = TestServer::start_with_metrics(|c| c.max_concurrent_requests = LIMIT).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;

    // 8 header-only Forwards on one connection, no grpc-timeout.
    let hostage = server.bare_http2().await;
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        held.push(open_call(
            &server,
            &hostage,
            "/normserve.v1.BatchNormService/Forward",
        ));
    }
    // And 8 ForwardStreams that never send a message (opened: the server
    // sends their response headers at once).
    let mut streams = Vec::new();
    for _ in 0..LIMIT {
        let (sender, receiver) = mpsc::channel::<pb::ForwardRequest>(1);
        let mut client = server.batch_norm().await;
        let replies = client
            .forward_stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        streams.push((sender, replies));
    }
    until_in_flight(&server, (2 * LIMIT) as f64).await;

    // Every other call is still served: the 16 hold no place.
    for _ in 0..LIMIT {
        let reply = client.forward(eval(&id, batch(4, 2))).await.unwrap();
        assert!(reply.into_inner().output.is_some());
    }
    let created = client.create_session(bn1d(3)).await;
    assert!(created.is_ok(), "{created:?}");
    // None of the waiting calls was answered meanwhile.
    assert!(held.iter().all(|(_, response)| !response.is_finished()));

    // A stream that sends its message then takes a place and is answered.
    let (sender, mut replies) = streams.pop().unwrap();
    sender.send(train(&id, batch(4, 2))).await.unwrap();
    let first = replies.message().await.unwrap().unwrap();
    assert!(first.result.is_some(), "{first:?}");
    // With all 8 places taken by streams that sent their message, the next
    // call is refused: the limit itself still holds.
    let mut busy = vec![(sender, replies)];
    for (sender, mut replies) in streams {
        sender.send(train(&id, batch(4, 2))).await.unwrap();
        assert!(replies.message().await.unwrap().unwrap().result.is_some());
        busy.push((sender, replies));
    }
    let refused = client.forward(eval(&id, batch(4, 2))).await.unwrap_err();
    check_status(&refused, Code::ResourceExhausted, "max_concurrent_requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_sends_nothing_ends_after_the_idle_timeout_and_frees_its_place() {
    let server = TestServer::start_with(|c| {
        c.max_concurrent_requests = 1;
        c.request_idle_timeout_seconds = 1;
    })
    .await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;

    // Headers only: ended by the server with a status naming the timeout.
    let connection = server.bare_http2().await;
    let (_frames, response) = open_call(
        &server,
        &connection,
        "/normserve.v1.BatchNormService/Forward",
    );
    let response = tokio::time::timeout(GUARD, response)
        .await
        .expect("the server ends an idle call")
        .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a status");
    check_status(
        &status,
        Code::DeadlineExceeded,
        "request_idle_timeout_seconds",
    );

    // A stream answered once, then silent: it holds the one place...
    let (sender, receiver) = mpsc::channel(1);
    sender.send(train(&id, batch(4, 2))).await.unwrap();
    let mut stream_client = server.batch_norm().await;
    let mut replies = stream_client
        .forward_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    assert!(replies.message().await.unwrap().unwrap().result.is_some());
    let refused = client.forward(eval(&id, batch(4, 2))).await.unwrap_err();
    check_status(&refused, Code::ResourceExhausted, "max_concurrent_requests");
    // ...until the idle timeout ends it,
    let ended = tokio::time::timeout(GUARD, replies.message())
        .await
        .expect("the server ends an idle stream")
        .unwrap_err();
    check_status(
        &ended,
        Code::DeadlineExceeded,
        "request_idle_timeout_seconds",
    );
    // and the place is free again.
    assert!(client.forward(eval(&id, batch(4, 2))).await.is_ok());
    drop(sender);
}

/// Reads `stream` until the server closes it; whether it did within the guard.
async fn closed_by_server(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(GUARD, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's own SETTINGS
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_the_preface_is_closed() {
    let server = TestServer::start_with(|c| c.handshake_timeout_seconds = 1).await;
    // A connection that did send its preface is kept.
    let mut kept = server.batch_norm_without_client_deadlines().await;
    let mut silent = tokio::net::TcpStream::connect(server.address)
        .await
        .unwrap();
    assert!(closed_by_server(&mut silent).await, "still open");
    // Half a preface is no better.
    let mut half = tokio::net::TcpStream::connect(server.address)
        .await
        .unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    assert!(closed_by_server(&mut half).await, "still open");
    // The connection opened before both, idle since, still serves calls.
    let created = kept.create_session(bn1d(2)).await;
    assert!(created.is_ok(), "{created:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_tls_handshakes_are_closed() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| {
        pki.serve_tls(c);
        c.handshake_timeout_seconds = 1;
    })
    .await;
    // A TLS record header announcing a 512-byte ClientHello, then: nothing;
    // or its first 100 bytes (past the bytes a preface would be).
    let header = [0x16u8, 0x03, 0x01, 0x02, 0x00];
    let mut start = header.to_vec();
    start.extend_from_slice(&[0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]);
    start.resize(105, 0x2a);
    for sent in [&header[..], &start[..]] {
        let mut stream = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        stream.write_all(sent).await.unwrap();
        assert!(
            closed_by_server(&mut stream).await,
            "a connection that sent {} bytes of a handshake is still open",
            sent.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_never_send_the_preface_are_closed() {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let pki = Pki::new();
    let server = TestServer::start_with(|c| {
        pki.serve_tls(c);
        c.handshake_timeout_seconds = 1;
    })
    .await;
    // A TLS gRPC connection opened first, idle while the others time out.
    let channel = Endpoint::from_shared(format!("https://{}", server.address))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pki.ca_pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kept = pb::batch_norm_service_client::BatchNormServiceClient::new(channel);

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    // A complete handshake, then nothing; or then half the HTTP/2 preface.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let tcp = tokio::net::TcpStream::connect(server.address)
            .await
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(sent).await.unwrap();
        tls.flush().await.unwrap();
        assert!(
            closed_by_server(&mut tls).await,
            "a TLS connection that sent {} bytes of the preface is still open",
            sent.len()
        );
    }
    // The TLS connection opened before both, idle since, still serves calls.
    let created = kept.create_session(bn1d(2)).await;
    assert!(created.is_ok(), "{created:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polite_call_is_served_before_a_floods_queue_drains() {
    // One call per session: they queue for the compute pool, not behind
    // each other's session lock.
    const SESSIONS: usize = 48;
    let flood_calls = SESSIONS;
    let server = TestServer::start_with_metrics(|c| c.compute_threads = 1).await;
    let mut flooder = server.batch_norm().await;
    // 1 MiB inputs: each job runs on a blocking thread and takes a while.
    let input = f32_raw(&[4096, 64], &vec![0.5; 4096 * 64]);
    let mut ids = Vec::new();
    for _ in 0..SESSIONS {
        ids.push(create(&mut flooder, bn1d(64)).await.session_id);
    }
    let mut polite = server.batch_norm().await;
    let polite_id = create(&mut polite, bn1d(2)).await.session_id;

    // The flood: every call at once, on one connection.
    let finished = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for id in &ids {
        let (mut client, id, input) = (flooder.clone(), id.clone(), input.clone());
        let finished = finished.clone();
        flood.push(tokio::spawn(async move {
            client.forward(eval(&id, input)).await.unwrap();
            finished.fetch_add(1, Ordering::SeqCst);
        }));
    }
    until_in_flight(&server, flood_calls as f64 / 2.0).await;

    let before = finished.load(Ordering::SeqCst);
    polite.forward(eval(&polite_id, batch(4, 2))).await.unwrap();
    let after = finished.load(Ordering::SeqCst);
    // First come, first served would have run the queued flood first.
    assert!(
        after - before < flood_calls / 4 && after < flood_calls,
        "{} of the flood's {flood_calls} calls finished while the polite call waited",
        after - before
    );
    for call in flood {
        call.await.unwrap();
    }
}
