//! Where the server is and how to talk to it: address, TLS, bearer token,
//! timeouts, and the output format every command shares.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use crate::CliError;

/// Where the server is and how to talk to it.
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Server address (host:port or http://host:port).
    #[arg(long, env = "NORMSERVE_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token sent with every call.
    #[arg(long, env = "NORMSERVE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate: connect
    /// with TLS.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to check the server's certificate against (default: the host of --addr).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Seconds to wait for the connection and for each call.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the response in proto3 JSON (lowerCamelCase names, enums by
    /// name, 64-bit integers as strings, defaults included) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A channel that sends the bearer token with every call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Remote {
    /// Connects (TLS when --tls-ca is given); no connection is exit code 2.
    pub async fn channel(&self) -> Result<(Channel, Bearer), CliError> {
        let tls = self.tls_ca.is_some();
        let uri = if self.addr.contains("://") {
            self.addr.clone()
        } else if tls {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        };
        let timeout = Duration::try_from_secs_f64(self.timeout)
            .map_err(|_| CliError::Usage(format!("--timeout: bad value {}", self.timeout)))?;
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| CliError::Usage(format!("--addr {}: {e}", self.addr)))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(ca) = &self.tls_ca {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
            };
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let Some(name) = &self.tls_server_name {
                config = config.domain_name(name.clone());
            }
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CliError::Usage(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Usage(format!("cannot connect to {}: {e}", self.addr)))?;
        let bearer = match &self.token {
            None => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| CliError::Usage("--token: not a valid header value".into()))?,
            ),
        };
        Ok((channel, Bearer(bearer)))
    }

    /// A BatchNormService client without message size limits (exports and
    /// imports carry whole state_dicts).
    pub async fn batch_norm(&self) -> Result<BatchNormServiceClient<Authed>, CliError> {
        let (channel, bearer) = self.channel().await?;
        Ok(BatchNormServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}
