//! TLS, mutual TLS, bearer tokens, tenant isolation and per-tenant quotas.
//! Certificates are made here with rcgen (a CA, a server certificate for
//! localhost/127.0.0.1, client certificates; and a second, unrelated CA);
//! tokens files are written to a temporary directory.

use std::path::PathBuf;

use normserve::proto::v1 as pb;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use normserve::proto::v1::compare_service_client::CompareServiceClient;
use normserve::proto::v1::server_service_client::ServerServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::server::TestServer;
use crate::support::requests::{bn1d, named};
use crate::support::tensors::f32_raw;

// ------------------------------------------------------------ certificates

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) for `names`, for a server or a client.
    fn issue(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "normserve test");
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A CA, a server certificate it signed, written to files for the server.
pub(crate) struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    other_ca: Ca,
}

impl Pki {
    pub(crate) fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("normserve test CA"),
            other_ca: Ca::new("unrelated CA"),
        };
        let (cert, key) = pki.ca.issue(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki.write("server.crt", &cert);
        pki.write("server.key", &key);
        pki.write("ca.crt", &pki.ca.pem());
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The PEM of the CA that signed the server's certificate.
    pub(crate) fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub(crate) fn serve_tls(&self, config: &mut normserve::config::Config) {
        config.tls_cert = Some(self.path("server.crt"));
        config.tls_key = Some(self.path("server.key"));
    }
}

/// Connects over TLS trusting `ca_pem`, presenting `identity` if any, and
/// checks health: Ok only when the handshake and a call both succeed.
async fn health_over_tls(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{}", server.address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

async fn plaintext_health(server: &TestServer) -> Result<(), String> {
    let channel = Endpoint::from_shared(format!("http://{}", server.address))
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("call: {e:?}"))
}

#[tokio::test]
async fn tls_handshake_succeeds_with_the_servers_ca_only() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| pki.serve_tls(c)).await;
    health_over_tls(&server, &pki.ca.pem(), None).await.unwrap();
    let wrong_ca = health_over_tls(&server, &pki.other_ca.pem(), None).await;
    assert!(
        wrong_ca.is_err(),
        "a server certificate from an untrusted CA was accepted"
    );
    assert!(
        plaintext_health(&server).await.is_err(),
        "plaintext was served on the TLS port"
    );
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_signed_by_the_client_ca() {
    let pki = Pki::new();
    let server = TestServer::start_with(|c| {
        pki.serve_tls(c);
        c.tls_client_ca = Some(pki.path("ca.crt"));
    })
    .await;
    let client = pki
        .ca
        .issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let stranger = pki
        .other_ca
        .issue(&["client"], ExtendedKeyUsagePurpose::ClientAuth);
    health_over_tls(&server, &pki.ca.pem(), Some(&client))
        .await
        .unwrap();
    assert!(
        health_over_tls(&server, &pki.ca.pem(), None).await.is_err(),
        "a client without a certificate got through"
    );
    assert!(
        health_over_tls(&server, &pki.ca.pem(), Some(&stranger))
            .await
            .is_err(),
        "a client certificate from another CA got through"
    );
}

#[test]
fn bad_tls_and_token_files_are_configuration_errors() {
    let pki = Pki::new();
    let garbage = pki.write("garbage.pem", "not a certificate\n");
    let tokens = pki.write("tokens", "only-two fields\n");
    let mut config = normserve::config::Config::with_defaults("127.0.0.1:0".parse().unwrap());
    let load = |config: &normserve::config::Config| {
        normserve::transport::Security::load(config)
            .err()
            .map(|e| e.to_string())
    };
    config.tls_cert = Some(garbage.clone());
    config.tls_key = Some(pki.path("server.key"));
    assert!(load(&config).unwrap().contains("--tls-cert"));
    config.tls_cert = Some(pki.path("server.crt"));
    config.tls_key = Some(pki.path("missing.key"));
    assert!(load(&config).unwrap().contains("missing.key"));
    config.tls_key = Some(pki.path("server.key"));
    config.tls_client_ca = Some(garbage);
    assert!(load(&config).unwrap().contains("--tls-client-ca"));
    config.tls_client_ca = None;
    assert_eq!(load(&config), None);
    config.auth_tokens = Some(tokens);
    let error = load(&config).unwrap();
    assert!(error.contains("line 1"), "{error}");
    assert!(
        !error.contains("only-two"),
        "the error echoes a credential: {error}"
    );
}

#[test]
fn tls_and_tenant_flags_are_checked_together() {
    let mut config = normserve::config::Config::with_defaults("127.0.0.1:0".parse().unwrap());
    config.tls_cert = Some("cert.pem".into());
    assert!(config.validate().is_err(), "--tls-cert without --tls-key");
    config.tls_cert = None;
    config.tls_client_ca = Some("ca.pem".into());
    assert!(config.validate().is_err(), "--tls-client-ca without TLS");
    config.tls_client_ca = None;
    config.tenant_max_sessions = Some(3);
    assert!(config.validate().is_err(), "a tenant quota without tokens");
    config.auth_tokens = Some("tokens".into());
    config.validate().unwrap();
    config.tenant_max_sessions = Some(0);
    assert!(config.validate().is_err(), "a zero quota");
}

// ------------------------------------------------------------------ tokens

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-9876543210";
const ROOT: &str = "root-token-abcdef";

/// Alice (tenant acme) by hash, Bob (tenant globex) in plain, and an admin.
fn tokens_file(dir: &tempfile::TempDir) -> PathBuf {
    let alice_hash: String = Sha256::digest(ALICE.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.path().join("tokens");
    std::fs::write(
        &path,
        format!(
            "# test tokens\nsha256:{alice_hash} acme user\n{BOB} globex user  # plain\n{ROOT} ops admin\n"
        ),
    )
    .unwrap();
    path
}

async fn start_with_tokens(
    adjust: impl FnOnce(&mut normserve::config::Config),
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = tokens_file(&dir);
    let server = TestServer::start_with(|c| {
        c.auth_tokens = Some(path);
        adjust(c);
    })
    .await;
    (server, dir)
}

/// Sends `authorization: Bearer <token>` (or nothing) with every call.
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Client = BatchNormServiceClient<InterceptedService<Channel, Bearer>>;

async fn client(server: &TestServer, token: Option<&str>) -> Client {
    BatchNormServiceClient::with_interceptor(
        server.channel().await,
        Bearer(token.map(str::to_owned)),
    )
}

fn create(id: &str, num_features: i64) -> pb::CreateSessionRequest {
    named(id, bn1d(num_features))
}

fn assert_unauthenticated<T: std::fmt::Debug>(
    result: Result<T, Status>,
    what: &str,
    token: Option<&str>,
) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        assert!(
            !status.message().contains(token),
            "{what} echoes the token: {status:?}"
        );
    }
}

#[tokio::test]
async fn every_rpc_but_health_needs_a_valid_token() {
    let (server, _dir) = start_with_tokens(|_| {}).await;
    let channel = server.channel().await;
    for token in [None, Some("wrong-token"), Some("")] {
        let bearer = Bearer(token.map(str::to_owned));
        let mut sessions =
            BatchNormServiceClient::with_interceptor(channel.clone(), bearer.clone());
        assert_unauthenticated(
            sessions.create_session(create("", 2)).await,
            "CreateSession",
            token,
        );
        assert_unauthenticated(
            sessions
                .list_sessions(pb::ListSessionsRequest::default())
                .await,
            "ListSessions",
            token,
        );
        let (sender, receiver) = mpsc::channel(1);
        drop(sender);
        assert_unauthenticated(
            sessions.forward_stream(ReceiverStream::new(receiver)).await,
            "ForwardStream",
            token,
        );
        let mut compare = CompareServiceClient::with_interceptor(channel.clone(), bearer.clone());
        assert_unauthenticated(
            compare.compare(pb::CompareRequest::default()).await,
            "Compare",
            token,
        );
        let mut info = ServerServiceClient::with_interceptor(channel.clone(), bearer.clone());
        assert_unauthenticated(
            info.get_server_info(pb::GetServerInfoRequest::default())
                .await,
            "GetServerInfo",
            token,
        );
        let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::with_interceptor(channel.clone(), bearer);
        let list = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        };
        assert_unauthenticated(
            reflection
                .server_reflection_info(tokio_stream::iter([list]))
                .await,
            "reflection",
            token,
        );
    }
    // Health needs none (probes carry no token).
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    // The same calls with a valid token get through.
    let bearer = Bearer(Some(BOB.into()));
    let mut info = ServerServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let reply = info
        .get_server_info(pb::GetServerInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.features.contains(&"auth".to_owned()),
        "{:?}",
        reply.features
    );
    let mut compare = CompareServiceClient::with_interceptor(channel.clone(), bearer);
    let input = f32_raw(&[2, 1], &[1.0, 3.0]);
    let compared = compare
        .compare(pb::CompareRequest {
            input: Some(input),
            training: true,
            ..Default::default()
        })
        .await;
    assert!(compared.is_ok(), "a valid token is refused: {compared:?}");
    // A malformed header is refused the same way.
    let mut request = Request::new(pb::ListSessionsRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Basic {BOB}").parse().unwrap());
    assert_unauthenticated(
        server.batch_norm().await.list_sessions(request).await,
        "Basic scheme",
        Some(BOB),
    );
}

// ----------------------------------------------------------------- tenants

/// Every session RPC on `id`, each answer reduced to (code, message).
async fn every_session_rpc(client: &mut Client, id: &str) -> Vec<(&'static str, Code, String)> {
    let outcome = |name: &'static str, result: Result<(), Status>| match result {
        Ok(()) => (name, Code::Ok, String::new()),
        Err(status) => (name, status.code(), status.message().to_owned()),
    };
    let forward = pb::ForwardRequest {
        session_id: id.into(),
        input: Some(f32_raw(&[2, 2], &[1.0, 2.0, 3.0, 4.0])),
        ..Default::default()
    };
    let mut results = vec![
        outcome(
            "GetSession",
            client
                .get_session(pb::GetSessionRequest {
                    session_id: id.into(),
                })
                .await
                .map(drop),
        ),
        outcome(
            "ResetRunningStats",
            client
                .reset_running_stats(pb::ResetRunningStatsRequest {
                    session_id: id.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        outcome(
            "UpdateParameters",
            client
                .update_parameters(pb::UpdateParametersRequest {
                    session_id: id.into(),
                    eps: Some(1e-3),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        outcome("Forward", client.forward(forward.clone()).await.map(drop)),
        outcome(
            "ExportState",
            client
                .export_state(pb::ExportStateRequest {
                    session_id: id.into(),
                })
                .await
                .map(drop),
        ),
        outcome(
            "ImportState",
            client
                .import_state(pb::ImportStateRequest {
                    session_id: id.into(),
                    safetensors: b"not safetensors"[..].to_vec().into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    // ForwardStream answers in band.
    let replies = client
        .forward_stream(tokio_stream::iter([forward]))
        .await
        .unwrap()
        .into_inner();
    let replies: Vec<_> = tokio_stream::StreamExt::collect::<Vec<_>>(replies).await;
    let streamed = match &replies[..] {
        [Ok(pb::ForwardStreamResponse {
            result: Some(pb::forward_stream_response::Result::Error(e)),
            ..
        })] => ("ForwardStream", Code::from(e.code), e.message.clone()),
        [Ok(_)] => ("ForwardStream", Code::Ok, String::new()),
        other => panic!("ForwardStream: {other:?}"),
    };
    results.push(streamed);
    results.push(outcome(
        "DeleteSession",
        client
            .delete_session(pb::DeleteSessionRequest {
                session_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop),
    ));
    results
}

async fn list_ids(client: &mut Client) -> Vec<String> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                page_size: 2,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.sessions.into_iter().map(|s| s.session_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn another_tenants_sessions_answer_exactly_like_missing_ones() {
    let (server, _dir) = start_with_tokens(|_| {}).await;
    let mut alice = client(&server, Some(ALICE)).await;
    let mut bob = client(&server, Some(BOB)).await;

    // What Bob gets for ids that exist nowhere...
    let before_named = every_session_rpc(&mut bob, "layer-1").await;
    assert!(
        before_named
            .iter()
            .all(|(_, code, _)| *code == Code::NotFound),
        "{before_named:?}"
    );
    // ... is what he gets once Alice has sessions under those ids.
    alice.create_session(create("layer-1", 2)).await.unwrap();
    let generated = alice
        .create_session(create("", 2))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id;
    assert!(
        !generated.contains('/'),
        "a user sees plain names: {generated}"
    );
    let after_named = every_session_rpc(&mut bob, "layer-1").await;
    assert_eq!(after_named, before_named);
    let for_generated = every_session_rpc(&mut bob, &generated).await;
    let missing = every_session_rpc(&mut bob, "s-000000000000000000000000").await;
    let texts = |r: &[(&str, Code, String)]| {
        r.iter()
            .map(|(n, c, m)| {
                (
                    n.to_string(),
                    *c,
                    m.replace(&generated, "ID")
                        .replace("s-000000000000000000000000", "ID"),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&for_generated), texts(&missing));

    // Alice's sessions are untouched (Bob's Delete and Update did nothing).
    let got = alice
        .get_session(pb::GetSessionRequest {
            session_id: "layer-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((got.version, got.config.unwrap().eps), (1, 1e-5));

    // Bob may use the same name: it is his own session, not Alice's.
    let bobs = bob
        .create_session(create("layer-1", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(!bobs.already_existed);
    assert_eq!(bobs.session.unwrap().config.unwrap().num_features, 3);
    bob.create_session(create("bob-2", 1)).await.unwrap();

    // Lists are scoped; page tokens stay within the tenant.
    let mut alice_ids = list_ids(&mut alice).await;
    alice_ids.sort();
    let mut expected = vec!["layer-1".to_owned(), generated.clone()];
    expected.sort();
    assert_eq!(alice_ids, expected);
    assert_eq!(list_ids(&mut bob).await, vec!["bob-2", "layer-1"]);

    // Every session RPC works on one's own session.
    let own = every_session_rpc(&mut alice, "layer-1").await;
    let codes: Vec<_> = own.iter().map(|(n, c, _)| (*n, *c)).collect();
    assert_eq!(
        codes,
        vec![
            ("GetSession", Code::Ok),
            ("ResetRunningStats", Code::Ok),
            ("UpdateParameters", Code::Ok),
            ("Forward", Code::Ok),
            ("ExportState", Code::Ok),
            ("ImportState", Code::InvalidArgument),
            ("ForwardStream", Code::Ok),
            ("DeleteSession", Code::Ok),
        ]
    );

    // The admin sees every tenant's sessions by key and can act on them.
    let mut admin = client(&server, Some(ROOT)).await;
    let mut all = list_ids(&mut admin).await;
    all.sort();
    let mut expected = vec![
        format!("acme/{generated}"),
        "globex/bob-2".to_owned(),
        "globex/layer-1".to_owned(),
    ];
    expected.sort();
    assert_eq!(all, expected);
    let seen = admin
        .get_session(pb::GetSessionRequest {
            session_id: "globex/layer-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(seen.config.unwrap().num_features, 3);
    admin
        .delete_session(pb::DeleteSessionRequest {
            session_id: "globex/bob-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list_ids(&mut bob).await, vec!["layer-1"]);
    // A user cannot use the key form to reach into another tenant.
    let status = bob
        .get_session(pb::GetSessionRequest {
            session_id: format!("acme/{generated}"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Users count their own sessions only.
    let mut info =
        ServerServiceClient::with_interceptor(server.channel().await, Bearer(Some(BOB.into())));
    let reply = info
        .get_server_info(pb::GetServerInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.sessions, 1);
}

// ------------------------------------------------------------------ quotas

#[tokio::test]
async fn a_tenant_cannot_create_more_sessions_than_its_quota() {
    let (server, _dir) = start_with_tokens(|c| c.tenant_max_sessions = Some(2)).await;
    let mut alice = client(&server, Some(ALICE)).await;
    let mut bob = client(&server, Some(BOB)).await;
    alice.create_session(create("a", 1)).await.unwrap();
    alice.create_session(create("", 1)).await.unwrap();
    let status = alice.create_session(create("c", 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("tenant_max_sessions"),
        "{status:?}"
    );
    // An idempotent repeat of an existing session is not a new session.
    assert!(
        alice
            .create_session(create("a", 1))
            .await
            .unwrap()
            .into_inner()
            .already_existed
    );
    // Other tenants have their own quota.
    bob.create_session(create("a", 1)).await.unwrap();
    bob.create_session(create("b", 1)).await.unwrap();
    // Deleting frees a place.
    alice
        .delete_session(pb::DeleteSessionRequest {
            session_id: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    alice.create_session(create("c", 1)).await.unwrap();
}

#[tokio::test]
async fn a_tenant_over_its_concurrent_requests_is_refused_at_once() {
    let (server, _dir) = start_with_tokens(|c| c.tenant_max_concurrent_requests = Some(1)).await;
    let mut alice = client(&server, Some(ALICE)).await;
    let mut bob = client(&server, Some(BOB)).await;
    alice.create_session(create("s", 2)).await.unwrap();
    // An open ForwardStream is one request in progress until it ends.
    let (sender, receiver) = mpsc::channel(4);
    let mut replies = alice
        .forward_stream(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let forward = pb::ForwardRequest {
        session_id: "s".into(),
        input: Some(f32_raw(&[2, 2], &[1.0, 2.0, 3.0, 4.0])),
        ..Default::default()
    };
    sender.send(forward.clone()).await.unwrap();
    replies.message().await.unwrap().unwrap();

    let status = alice
        .get_session(pb::GetSessionRequest {
            session_id: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("tenant_max_concurrent_requests"),
        "{status:?}"
    );
    // Another tenant is not affected.
    bob.list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap();

    drop(sender);
    assert!(replies.message().await.unwrap().is_none());
    // The stream's place is free once the client has seen it end.
    alice
        .get_session(pb::GetSessionRequest {
            session_id: "s".into(),
        })
        .await
        .unwrap();
    alice.forward(forward).await.unwrap();
}

#[tokio::test]
async fn tenants_survive_a_restart_of_the_embedded_store() {
    let data = tempfile::tempdir().unwrap();
    let durable = |c: &mut normserve::config::Config| {
        c.durability = normserve::config::Durability::Sync;
        c.data_dir = data.path().to_owned();
    };
    let (server, dir) = start_with_tokens(durable).await;
    let mut alice = client(&server, Some(ALICE)).await;
    alice.create_session(create("kept", 2)).await.unwrap();
    server.stop().await.unwrap();

    let tokens = dir.path().join("tokens");
    let server = TestServer::start_with(|c| {
        durable(c);
        c.auth_tokens = Some(tokens);
    })
    .await;
    let mut alice = client(&server, Some(ALICE)).await;
    let mut bob = client(&server, Some(BOB)).await;
    assert_eq!(list_ids(&mut alice).await, vec!["kept"]);
    assert_eq!(list_ids(&mut bob).await, Vec::<String>::new());
    let status = bob
        .get_session(pb::GetSessionRequest {
            session_id: "kept".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mut admin = client(&server, Some(ROOT)).await;
    assert_eq!(list_ids(&mut admin).await, vec!["acme/kept"]);
}
