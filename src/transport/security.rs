//! What the server needs for TLS and authentication, read from the files the
//! configuration names: everything that can be wrong with them is found here,
//! at start-up, before the server announces itself.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::auth::{Tokens, TokensError};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{flag} {path}: {error}")]
    Read {
        flag: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{flag} {path}: {message}")]
    Pem {
        flag: &'static str,
        path: String,
        message: &'static str,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Tokens(#[from] TokensError),
}

/// TLS settings and tokens, loaded and checked.
#[derive(Clone, Default)]
pub struct Security {
    /// The TLS acceptor's settings: the identity, the client CA's verifier
    /// with `--tls-client-ca`, ALPN `h2`.
    pub tls: Option<Arc<ServerConfig>>,
    /// None: authentication is off.
    pub tokens: Option<Arc<Tokens>>,
}

impl Security {
    /// Reads and checks the files of `--tls-*` and `--auth-tokens`.
    pub fn load(config: &Config) -> Result<Security, SecurityError> {
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                Some(tls_config(cert, key, config.tls_client_ca.as_deref())?)
            }
            _ => None,
        };
        let tokens = match &config.auth_tokens {
            Some(path) => {
                let tokens = Tokens::load(path)?;
                if tokens.is_empty() {
                    tracing::warn!(path = %path.display(), "the tokens file lists no token: every RPC but health is refused");
                }
                Some(Arc::new(tokens))
            }
            None => None,
        };
        Ok(Security { tls, tokens })
    }
}

fn read_pem(
    flag: &'static str,
    path: &Path,
    marker: &str,
    missing: &'static str,
) -> Result<Vec<u8>, SecurityError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| SecurityError::Read {
        flag,
        path: shown.clone(),
        error,
    })?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(SecurityError::Pem {
            flag,
            path: shown,
            message: missing,
        });
    }
    Ok(bytes)
}

fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, SecurityError> {
    const CERT: &str = "-----BEGIN CERTIFICATE-----";
    let cert = read_pem("--tls-cert", cert, CERT, "no PEM certificate in the file")?;
    let key = read_pem(
        "--tls-key",
        key,
        "PRIVATE KEY-----",
        "no PEM private key in the file",
    )?;
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecurityError::Tls(format!("--tls-cert: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| SecurityError::Tls(format!("--tls-key: {e}")))?;
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let ca = read_pem(
                "--tls-client-ca",
                ca,
                CERT,
                "no PEM certificate in the file",
            )?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&ca) {
                let cert = cert.map_err(|e| SecurityError::Tls(format!("--tls-client-ca: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| SecurityError::Tls(format!("--tls-client-ca: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| SecurityError::Tls(format!("--tls-client-ca: {}", error_chain(&e))))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // Parses the certificate and checks that the key matches it: a bad file
    // fails here rather than at the first handshake.
    let mut tls = builder
        .with_single_cert(certs, key)
        .map_err(|e| SecurityError::Tls(error_chain(&e)))?;
    tls.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(tls))
}

/// An error and its sources, "outer: inner: ...".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
