//! Reaching a service's gRPC API: the client side of [`super::Listener`].
//!
//! An [`Upstream`] is one service's address, `unix:<path>`,
//! `https://host:port` (TLS, verified against a CA, usually with a client
//! certificate for the service's mutual TLS) or `http://host:port` (in the
//! clear, only when asked for). It is a connector: a tonic channel
//! ([`Upstream::channel`]) or a hyper client built on it reaches that one
//! service whatever the request's URI says.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use super::{certificates, private_key, provider, roots};
use crate::ConfigError;

/// The URI requests to an upstream carry; the connector ignores it.
pub const ORIGIN: &str = "http://cnnf-upstream";

/// One service's gRPC address and how to connect to it.
#[derive(Clone)]
pub struct Upstream {
    target: Arc<Target>,
    text: Arc<str>,
}

enum Target {
    Unix(PathBuf),
    Plain {
        host: String,
        port: u16,
    },
    Tls {
        host: String,
        port: u16,
        name: ServerName<'static>,
        connector: tokio_rustls::TlsConnector,
    },
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Upstream").field(&self.text).finish()
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Upstream {
    /// Parses `addr` (the value of `flag`, named in errors): `unix:<path>`;
    /// `https://host:port`, which needs `tls`; or `http://host:port`,
    /// which needs `insecure`.
    pub fn parse(
        flag: &str,
        addr: &str,
        tls: Option<&Arc<rustls::ClientConfig>>,
        insecure: bool,
    ) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::new(format!("{flag} {addr:?}: {why}"));
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("unix: needs a socket path"));
            }
            return Ok(Self::unix(path));
        }
        let (scheme, rest) = addr.split_once("://").ok_or_else(|| {
            bad("expected unix:<path>, https://host:port, or http://host:port (with --grpc-insecure)")
        })?;
        let uri: Uri = format!("{scheme}://{rest}").parse().map_err(|_| bad("not a URL"))?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("a service address has no path"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
        let target = match scheme {
            "https" => {
                let tls = tls.ok_or_else(|| {
                    bad("https:// needs --upstream-ca (and, for mutual TLS, --upstream-cert and --upstream-key)")
                })?;
                let name =
                    ServerName::try_from(host.clone()).map_err(|_| bad("the host is not a valid TLS server name"))?;
                Target::Tls {
                    host,
                    port,
                    name,
                    connector: tokio_rustls::TlsConnector::from(Arc::clone(tls)),
                }
            }
            "http" if insecure => Target::Plain { host, port },
            "http" => {
                return Err(bad(
                    "http:// sends calls in the clear to a service that trusts every caller; \
                     use https:// or unix:, or give --grpc-insecure (tests and labs only)",
                ))
            }
            _ => return Err(bad("the scheme must be unix:, https:// or http://")),
        };
        Ok(Self {
            target: Arc::new(target),
            text: addr.into(),
        })
    }

    /// The Unix socket at `path`.
    pub fn unix(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref().to_owned();
        Self {
            text: format!("unix:{}", path.display()).into(),
            target: Arc::new(Target::Unix(path)),
        }
    }

    /// A channel to this upstream with `endpoint`'s settings (timeouts,
    /// keep-alive); it connects on first use and again after a failure.
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.clone())
    }

    /// A channel with default settings: `Upstream::channel(Endpoint::from_static(ORIGIN))`.
    pub fn default_channel(&self) -> Channel {
        self.channel(Endpoint::from_static(ORIGIN))
    }

    /// Opens one connection.
    pub async fn connect(&self) -> io::Result<ClientStream> {
        match self.target.as_ref() {
            Target::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .map(ClientStream::Unix)
                .map_err(|e| io::Error::new(e.kind(), format!("connecting to unix:{}: {e}", path.display()))),
            Target::Plain { host, port } => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .map(ClientStream::Tcp)
                .map_err(|e| io::Error::new(e.kind(), format!("connecting to {host}:{port}: {e}"))),
            Target::Tls {
                host,
                port,
                name,
                connector,
            } => {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("connecting to {host}:{port}: {e}")))?;
                tcp.set_nodelay(true)?;
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS with {host}:{port}: {e}")))?;
                Ok(ClientStream::Tls(Box::new(tls)))
            }
        }
    }
}

/// A TLS client configuration for upstreams: servers verified against
/// the CA in `ca`, and the client certificate chain and key in
/// `identity` (the service's mutual TLS needs one). ALPN `h2`.
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let roots = roots("--upstream-ca", ca)?;
    let tls_error = |e: &dyn fmt::Display| ConfigError::new(format!("upstream TLS configuration: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&e))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certificates("--upstream-cert", cert)?,
                private_key("--upstream-key", key)?,
            )
            .map_err(|e| tls_error(&e))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl tower::Service<Uri> for Upstream {
    type Response = TokioIo<ClientStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let upstream = self.clone();
        Box::pin(async move { upstream.connect().await.map(TokioIo::new) })
    }
}

/// One connection to an upstream.
#[derive(Debug)]
pub enum ClientStream {
    /// On a Unix socket.
    Unix(tokio::net::UnixStream),
    /// Plain TCP.
    Tcp(tokio::net::TcpStream),
    /// TCP with TLS.
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Connection for ClientStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

super::delegate_io!(ClientStream { Unix, Tcp, Tls });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_the_right_settings() {
        let unix = Upstream::parse("--policy-addr", "unix:/run/cnnf/policy.sock", None, false).unwrap();
        assert_eq!(unix.to_string(), "unix:/run/cnnf/policy.sock");
        let plain = Upstream::parse("--policy-addr", "http://127.0.0.1:9203", None, false)
            .unwrap_err()
            .to_string();
        assert!(
            plain.contains("--policy-addr") && plain.contains("--grpc-insecure"),
            "{plain}"
        );
        assert!(Upstream::parse("--policy-addr", "http://127.0.0.1:9203", None, true).is_ok());
        let https = Upstream::parse("--policy-addr", "https://policy:9203", None, false)
            .unwrap_err()
            .to_string();
        assert!(https.contains("--upstream-ca"), "{https}");
        for bad in [
            "127.0.0.1:9203",
            "unix:",
            "https://policy",
            "ftp://policy:1",
            "http://h:1/x",
        ] {
            assert!(Upstream::parse("--policy-addr", bad, None, true).is_err(), "{bad}");
        }
    }
}
