//! A normserve server inside the test process: bound on `127.0.0.1:0`, served
//! by `normserve::transport::Server` in a spawned task, stopped through a
//! oneshot-driven shutdown future. The listener is bound before anyone
//! connects, so clients never wait for the server to come up.

use std::net::SocketAddr;

use normserve::config::Config;
use normserve::device::DeviceChoice;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use normserve::proto::v1::server_service_client::ServerServiceClient;
use normserve::transport::{self, ServeError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub type BatchNorm = BatchNormServiceClient<Channel>;

pub struct TestServer {
    pub address: SocketAddr,
    /// The metrics endpoint, for servers started with one.
    pub metrics_address: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    served: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    /// A server with every default, on the device `auto` resolves to.
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// A server whose configuration `adjust` changed first (limits, mostly).
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_serving(adjust, false).await
    }

    /// As [`TestServer::start_with`], with a metrics endpoint on its own
    /// ephemeral port (`metrics_address`).
    pub async fn start_with_metrics(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::start_serving(adjust, true).await
    }

    async fn start_serving(adjust: impl FnOnce(&mut Config), with_metrics: bool) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics_listener = match with_metrics {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let metrics_address = metrics_listener.as_ref().map(|l| l.local_addr().unwrap());
        let mut config = Config::with_defaults(address);
        adjust(&mut config);
        config.validate().unwrap();
        let mut server = transport::Server::new(config).unwrap();
        if let Some(metrics_listener) = metrics_listener {
            server = server.with_metrics_listener(metrics_listener);
        }
        let (shutdown, stop) = oneshot::channel::<()>();
        let served = tokio::spawn(server.serve(listener, async move {
            let _ = stop.await;
        }));
        TestServer {
            address,
            metrics_address,
            shutdown: Some(shutdown),
            served,
        }
    }

    /// A CPU server: for tests whose expected texts or devices are the CPU's.
    pub async fn start_on_cpu() -> TestServer {
        TestServer::start_with(|c| c.device = DeviceChoice::Cpu).await
    }

    /// A new connection (HTTP/2 connection of its own) to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.address))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn batch_norm(&self) -> BatchNorm {
        BatchNormServiceClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
    }

    /// A BatchNorm client on a bare HTTP/2 connection: unlike a tonic
    /// `Channel` it does not enforce `grpc-timeout` itself, so the caller
    /// sees the status the server answers when a deadline passes.
    pub async fn batch_norm_without_client_deadlines(&self) -> BatchNormServiceClient<BareHttp2> {
        let origin = format!("http://{}", self.address).parse().unwrap();
        BatchNormServiceClient::with_origin(self.bare_http2().await, origin)
    }

    /// A bare HTTP/2 connection to the server (hyper, no gRPC layers).
    pub async fn bare_http2(&self) -> BareHttp2 {
        let stream = tokio::net::TcpStream::connect(self.address).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        BareHttp2(sender)
    }

    pub async fn server_info(&self) -> ServerServiceClient<Channel> {
        ServerServiceClient::new(self.channel().await)
    }

    /// Fires the shutdown future without waiting for `serve` to return.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Fires the shutdown future and returns what `serve` returned.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        self.served.await.unwrap()
    }
}

/// A hyper HTTP/2 connection as a tonic transport (see
/// [`TestServer::batch_norm_without_client_deadlines`]).
#[derive(Clone)]
pub struct BareHttp2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for BareHttp2 {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}
