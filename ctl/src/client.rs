//! The connection to the operator gateway: one gRPC channel, the bearer
//! token on every call, and optional TLS and mutual TLS.
//!
//! TLS is done here with rustls through a custom connector rather than
//! tonic's own TLS features, so the workspace's tonic is built one way for
//! every crate (the services never need client TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::policy_client::PolicyClient;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{CtlError, Kind, Result};

/// How long to wait for the gateway to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach the gateway.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `http://host:port` or `https://host:port`.
    pub server: String,
    /// The bearer token, if any.
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the gateway's certificate.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    pub client_key: Option<PathBuf>,
}

/// An open connection to the gateway.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    authorization: Option<MetadataValue<Ascii>>,
}

impl Connection {
    /// Connects to the gateway (no call is made yet).
    pub async fn open(target: &Target) -> Result<Self> {
        let authorization = match &target.token {
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| CtlError::bad("--token", "the token holds characters a header cannot carry"))?,
            ),
            None => None,
        };
        let uri: Uri = target
            .server
            .parse()
            .map_err(|error| CtlError::bad("--server", format!("{:?} is not a URL: {error}", target.server)))?;
        let endpoint = Endpoint::from(uri.clone()).connect_timeout(CONNECT_TIMEOUT);
        let unreachable = |error: tonic::transport::Error| {
            CtlError::new(Kind::Unreachable, format!("connecting to {uri}"), chain(&error))
        };
        let channel = match uri.scheme_str() {
            Some("http") => {
                if target.ca_cert.is_some() || target.client_cert.is_some() {
                    return Err(CtlError::bad(
                        "--server",
                        "--ca-cert and --client-cert need an https:// server",
                    ));
                }
                endpoint.connect().await.map_err(unreachable)?
            }
            Some("https") => {
                let tls = tls_connector(target)?;
                let connector = tower::service_fn(move |uri: Uri| {
                    let tls = tls.clone();
                    async move {
                        let host = uri.host().ok_or("the server URL has no host")?.to_owned();
                        let port = uri.port_u16().unwrap_or(443);
                        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())?;
                        let stream = tls.connect(name, tcp).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await.map_err(unreachable)?
            }
            _ => {
                return Err(CtlError::bad(
                    "--server",
                    format!("{:?}: expected http://host:port or https://host:port", target.server),
                ))
            }
        };
        Ok(Self { channel, authorization })
    }

    /// Wraps a message into a request carrying the token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        request
    }

    /// A client of `cnnf.v1.Policy`.
    pub fn policy(&self) -> PolicyClient<Channel> {
        PolicyClient::new(self.channel.clone())
    }

    /// A client of `cnnf.v1.Models`.
    pub fn models(&self) -> ModelsClient<Channel> {
        ModelsClient::new(self.channel.clone())
    }

    /// A client of `cnnf.v1.Audits`.
    pub fn audits(&self) -> AuditsClient<Channel> {
        AuditsClient::new(self.channel.clone())
    }
}

/// An error and its sources, joined with `: `.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn pem_error(flag: &str, path: &Path, error: impl std::fmt::Display) -> CtlError {
    CtlError::bad(flag, format!("{}: {error}", path.display()))
}

/// The TLS client configuration: trust the given CA, present the client
/// certificate when given, offer HTTP/2 only (gRPC).
fn tls_connector(target: &Target) -> Result<tokio_rustls::TlsConnector> {
    let ca = target.ca_cert.as_deref().ok_or_else(|| {
        CtlError::bad(
            "--ca-cert",
            "an https:// server needs --ca-cert, the CA certificate (PEM) that signed the gateway's certificate",
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|error| pem_error("--ca-cert", ca, error))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|error| pem_error("--ca-cert", ca, error))?;
    if certs.is_empty() {
        return Err(pem_error("--ca-cert", ca, "no certificate in the file"));
    }
    for cert in certs {
        roots.add(cert).map_err(|error| pem_error("--ca-cert", ca, error))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| CtlError::new(Kind::Other, "TLS", error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&target.client_cert, &target.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|error| pem_error("--client-cert", cert, error))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|error| pem_error("--client-cert", cert, error))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|error| pem_error("--client-key", key, error))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|error| pem_error("--client-cert", cert, error))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(CtlError::bad(
                "--client-cert",
                "--client-cert and --client-key go together",
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
