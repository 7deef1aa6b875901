//! The one home of the services' gRPC listener, and of the way to reach it.
//!
//! The services trust the caller named in [`crate::actor::ACTOR_HEADER`],
//! because the operator gateway authenticates every caller and sets it. So
//! nobody but the gateway may reach a service's API: `--grpc-addr` is
//! either a Unix socket (`unix:<path>`, the default, created owner-only) or
//! TCP, and TCP is served with mutual TLS only (`--grpc-tls-cert`,
//! `--grpc-tls-key`, `--grpc-client-ca`: a client whose certificate does
//! not chain to that CA is refused in the handshake). `--grpc-insecure`
//! serves TCP in the clear, for tests and labs; TCP with neither is a
//! configuration error ([`crate::ConfigError`], exit status 64).
//!
//! - [`GrpcAddr`] and [`ServerTls`]: the address and the TLS flags every
//!   service takes;
//! - [`Listener`]: binds them and hands tonic its connections
//!   ([`Listener::incoming`]);
//! - [`upstream`]: the client side, used by the gateway, tests and
//!   benchmarks to reach a service at a `unix:`, `https://` or `http://`
//!   address.

pub mod upstream;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::ConfigError;

/// Longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a service serves its gRPC API: `unix:<path>` or `<ip>:<port>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcAddr {
    /// A Unix socket at this path (created owner-only).
    Unix(PathBuf),
    /// TCP on this address (mutual TLS unless `--grpc-insecure`).
    Tcp(SocketAddr),
}

impl FromStr for GrpcAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, as in unix:/run/cnnf/policy.sock".to_owned());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>()
            .map(Self::Tcp)
            .map_err(|_| format!("expected unix:<path> or <ip>:<port> (an IP address, not a host name), got {text:?}"))
    }
}

impl fmt::Display for GrpcAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// How a service protects its gRPC API on TCP; the same flags for every
/// service (a Unix socket needs none of them).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTls {
    /// Server certificate chain (PEM) of the gRPC API on TCP (mutual TLS).
    #[arg(long, env = "CNNF_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of that certificate.
    #[arg(long, env = "CNNF_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the certificates of the clients allowed to call
    /// (the gateway's); every other client is refused in the handshake.
    #[arg(long, env = "CNNF_GRPC_CLIENT_CA")]
    pub grpc_client_ca: Option<PathBuf>,
    /// Serve the gRPC API on TCP without TLS, trusting every caller: for
    /// tests and labs only.
    #[arg(long, env = "CNNF_GRPC_INSECURE")]
    pub grpc_insecure: bool,
}

impl ServerTls {
    /// No TLS, TCP in the clear (tests and labs).
    pub fn insecure() -> Self {
        Self {
            grpc_insecure: true,
            ..Self::default()
        }
    }

    /// Mutual TLS from these PEM files.
    pub fn mutual(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, client_ca: impl Into<PathBuf>) -> Self {
        Self {
            grpc_tls_cert: Some(cert.into()),
            grpc_tls_key: Some(key.into()),
            grpc_client_ca: Some(client_ca.into()),
            grpc_insecure: false,
        }
    }

    fn any_file(&self) -> bool {
        self.grpc_tls_cert.is_some() || self.grpc_tls_key.is_some() || self.grpc_client_ca.is_some()
    }

    /// What serving on `addr` with these settings means: `None` for a Unix
    /// socket or insecure TCP, the TLS configuration for TCP with mutual
    /// TLS; a [`ConfigError`] naming the flags when they do not fit.
    pub fn server_config(&self, addr: &GrpcAddr) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        match addr {
            GrpcAddr::Unix(_) if self.any_file() => Err(ConfigError::new(format!(
                "--grpc-addr {addr} is a Unix socket, which is protected by its owner-only permissions: \
                 --grpc-tls-cert, --grpc-tls-key and --grpc-client-ca apply to TCP only"
            ))),
            GrpcAddr::Unix(_) => Ok(None),
            GrpcAddr::Tcp(_) if self.grpc_insecure && self.any_file() => Err(ConfigError::new(format!(
                "--grpc-addr {addr}: choose either mutual TLS (--grpc-tls-cert, --grpc-tls-key, --grpc-client-ca) \
                 or --grpc-insecure, not both"
            ))),
            GrpcAddr::Tcp(_) if self.grpc_insecure => Ok(None),
            GrpcAddr::Tcp(_) => match (&self.grpc_tls_cert, &self.grpc_tls_key, &self.grpc_client_ca) {
                (Some(cert), Some(key), Some(ca)) => server_tls(cert, key, ca).map(Some),
                _ => Err(ConfigError::new(format!(
                    "--grpc-addr {addr} is TCP, which needs mutual TLS: give --grpc-tls-cert, --grpc-tls-key \
                     and --grpc-client-ca (or --grpc-insecure, for tests and labs only; or a unix:<path> address)"
                ))),
            },
        }
    }
}

/// The certificates of a PEM file (at least one).
pub fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let error = |message: String| ConfigError::new(format!("{what} {}: {message}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no certificate in the file".to_owned()));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn private_key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| ConfigError::new(format!("{what} {}: {e}", path.display())))
}

/// Trust anchors from a PEM file of CA certificates.
pub fn roots(what: &str, path: &Path) -> Result<rustls::RootCertStore, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(what, path)? {
        roots
            .add(cert)
            .map_err(|e| ConfigError::new(format!("{what} {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// The crypto provider of every TLS configuration here.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration that requires a client certificate chaining
/// to `client_ca` (ALPN `h2`).
pub fn server_tls(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let chain = certificates("--grpc-tls-cert", cert)?;
    let key = private_key("--grpc-tls-key", key)?;
    let roots = roots("--grpc-client-ca", client_ca)?;
    let tls_error = |e: &dyn fmt::Display| ConfigError::new(format!("gRPC TLS configuration: {e}"));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_error(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A bound gRPC listener: a Unix socket, or TCP with or without TLS.
pub struct Listener {
    addr: GrpcAddr,
    kind: Kind,
}

enum Kind {
    Unix {
        listener: tokio::net::UnixListener,
        socket: SocketFile,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    },
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Checks the settings (a [`ConfigError`] when they do not fit or a
    /// certificate does not load) and binds `addr`. A Unix socket is
    /// created with mode 0600 (its directory, when missing, with 0700); a
    /// stale socket file there is replaced, a live one (another process
    /// answers on it) or any other file is an error. The socket file is
    /// removed when the [`Incoming`] stream is dropped.
    pub async fn bind(addr: &GrpcAddr, tls: &ServerTls) -> anyhow::Result<Self> {
        let server_config = tls.server_config(addr)?;
        match addr {
            GrpcAddr::Unix(path) => {
                let (listener, socket) = bind_unix(path).with_context(|| format!("binding the gRPC API on {addr}"))?;
                Ok(Self {
                    addr: addr.clone(),
                    kind: Kind::Unix { listener, socket },
                })
            }
            GrpcAddr::Tcp(socket_addr) => {
                let listener = tokio::net::TcpListener::bind(socket_addr)
                    .await
                    .with_context(|| format!("binding the gRPC API on {addr}"))?;
                let bound = GrpcAddr::Tcp(listener.local_addr()?);
                if server_config.is_none() {
                    tracing::warn!(
                        message = "The gRPC API is served on TCP without TLS (--grpc-insecure): anyone who reaches it bypasses the gateway.",
                        addr = %bound
                    );
                }
                Ok(Self {
                    addr: bound,
                    kind: Kind::Tcp {
                        listener,
                        tls: server_config.map(tokio_rustls::TlsAcceptor::from),
                    },
                })
            }
        }
    }

    /// The address bound (with the port chosen when it was 0).
    pub fn addr(&self) -> &GrpcAddr {
        &self.addr
    }

    /// Whether connections are TLS (mutual).
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, Kind::Tcp { tls: Some(_), .. })
    }

    /// The accepted connections, for `serve_with_incoming(_shutdown)`. TLS
    /// handshakes run beside the accept loop (one slow client does not hold
    /// the others up) and must finish within 10 s; a refused one is logged
    /// and never reaches the service.
    pub fn incoming(self) -> Incoming {
        let (sender, receiver) = mpsc::channel(64);
        let (accept, socket) = match self.kind {
            Kind::Unix { listener, socket } => (tokio::spawn(accept_unix(listener, sender)), Some(socket)),
            Kind::Tcp { listener, tls } => (tokio::spawn(accept_tcp(listener, tls, sender)), None),
        };
        Incoming {
            streams: ReceiverStream::new(receiver),
            accept: accept.abort_handle(),
            _socket: socket,
        }
    }
}

/// Binds a Unix socket at `path` owner-only. The socket's mode is set
/// to 0600 before `bind` (Linux creates the file with the mode of the
/// socket), so the file is never reachable with looser permissions, and
/// `ss -xl` shows it under its own name.
fn bind_unix(path: &Path) -> anyhow::Result<(tokio::net::UnixListener, SocketFile)> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ConfigError::new(format!(
            "unix:{} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            path.display(),
            path.as_os_str().len()
        ))
        .into());
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!("another process already serves on {}", path.display()),
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(message = "Replacing a stale socket file.", path = %path.display());
                std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
            }
            Err(error) => {
                return Err(error).with_context(|| format!("checking whether {} is stale", path.display()));
            }
        },
        Ok(_) => anyhow::bail!("{} exists and is not a socket; it is not replaced", path.display()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("looking at {}", path.display())),
    }
    let socket =
        socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).context("creating a Unix socket")?;
    // fchmod(2) on the socket itself: safe Rust through a File of its descriptor.
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(socket));
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .context("making the socket owner-only")?;
    let socket = socket2::Socket::from(std::os::fd::OwnedFd::from(file));
    let address = socket2::SockAddr::unix(path).with_context(|| format!("the socket address {}", path.display()))?;
    socket
        .bind(&address)
        .with_context(|| format!("binding a socket at {}", path.display()))?;
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("looking at {}", path.display()))?;
    let socket_file = SocketFile {
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
    };
    anyhow::ensure!(
        meta.permissions().mode() & 0o077 == 0,
        "{} was created with mode {:o}, not owner-only",
        path.display(),
        meta.permissions().mode() & 0o777
    );
    socket.listen(1024).context("listening on the socket")?;
    let listener = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    Ok((listener, socket_file))
}

/// A socket file this process created: removed on drop, unless another
/// file took its place meanwhile.
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

type Accepted = io::Result<ServerStream>;

async fn accept_unix(listener: tokio::net::UnixListener, sender: mpsc::Sender<Accepted>) {
    loop {
        tokio::select! {
            () = sender.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if sender.send(Ok(ServerStream::Unix(stream))).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(message = "Accepting a gRPC connection failed.", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn accept_tcp(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    sender: mpsc::Sender<Accepted>,
) {
    let mut handshakes = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = sender.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => match &tls {
                    None => ServerStream::Tcp(tcp),
                    Some(acceptor) => {
                        let accept = acceptor.accept(tcp);
                        handshakes.spawn(async move { (peer, tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await) });
                        continue;
                    }
                },
                Err(error) => {
                    tracing::warn!(message = "Accepting a gRPC connection failed.", %error);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => match done {
                Ok((_, Ok(Ok(stream)))) => ServerStream::Tls(Box::new(stream)),
                Ok((peer, Ok(Err(error)))) => {
                    tracing::info!(message = "gRPC client refused in the TLS handshake.", %peer, %error);
                    continue;
                }
                Ok((peer, Err(_))) => {
                    tracing::info!(message = "gRPC client did not finish the TLS handshake in time.", %peer);
                    continue;
                }
                Err(_) => continue,
            },
        };
        if sender.send(Ok(stream)).await.is_err() {
            return;
        }
    }
}

/// The connections of a [`Listener`], a stream for tonic. Dropping it
/// stops accepting and removes the Unix socket file.
pub struct Incoming {
    streams: ReceiverStream<Accepted>,
    accept: tokio::task::AbortHandle,
    _socket: Option<SocketFile>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = Accepted;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.streams).poll_next(cx)
    }
}

/// One accepted connection.
#[derive(Debug)]
pub enum ServerStream {
    /// On the Unix socket.
    Unix(tokio::net::UnixStream),
    /// Plain TCP (`--grpc-insecure`).
    Tcp(tokio::net::TcpStream),
    /// TCP with mutual TLS; the client's certificate chains to the client CA.
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// What the service may learn about a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's TCP address (none on a Unix socket).
    pub remote: Option<SocketAddr>,
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        let remote = match self {
            Self::Unix(_) => None,
            Self::Tcp(tcp) => tcp.peer_addr().ok(),
            Self::Tls(tls) => tls.get_ref().0.peer_addr().ok(),
        };
        PeerInfo { remote }
    }
}

/// AsyncRead and AsyncWrite of an enum of Unpin streams, by delegation.
macro_rules! delegate_io {
    ($type:ident { $($variant:ident),+ }) => {
        impl AsyncRead for $type {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(stream) => Pin::new(stream).poll_read(cx, buf),)+
                }
            }
        }

        impl AsyncWrite for $type {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(stream) => Pin::new(stream).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$variant(stream) => stream.is_write_vectored(),)+
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(stream) => Pin::new(stream).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(stream) => Pin::new(stream).poll_shutdown(cx),)+
                }
            }
        }
    };
}
pub(crate) use delegate_io;

delegate_io!(ServerStream { Unix, Tcp, Tls });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_back() {
        for text in [
            "unix:/run/cnnf/policy.sock",
            "unix:relative.sock",
            "127.0.0.1:9203",
            "[::1]:0",
        ] {
            let addr: GrpcAddr = text.parse().unwrap();
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!(
            "unix:/a".parse::<GrpcAddr>().unwrap(),
            GrpcAddr::Unix(PathBuf::from("/a"))
        );
        for bad in ["unix:", "localhost:9203", "127.0.0.1", "http://127.0.0.1:9203", ""] {
            let error = bad.parse::<GrpcAddr>().unwrap_err();
            assert!(error.contains("unix:"), "{bad}: {error}");
        }
    }

    #[test]
    fn tcp_without_tls_or_insecure_is_a_configuration_error_naming_the_flags() {
        let tcp: GrpcAddr = "127.0.0.1:9203".parse().unwrap();
        let error = ServerTls::default().server_config(&tcp).unwrap_err().to_string();
        for flag in [
            "--grpc-tls-cert",
            "--grpc-tls-key",
            "--grpc-client-ca",
            "--grpc-insecure",
        ] {
            assert!(error.contains(flag), "{error}");
        }
        let half = ServerTls {
            grpc_tls_cert: Some("cert.pem".into()),
            ..ServerTls::default()
        };
        assert!(half.server_config(&tcp).is_err());
        assert!(ServerTls::insecure().server_config(&tcp).unwrap().is_none());
        let both = ServerTls {
            grpc_insecure: true,
            ..ServerTls::mutual("c", "k", "ca")
        };
        assert!(both.server_config(&tcp).unwrap_err().to_string().contains("not both"));
        let unix: GrpcAddr = "unix:/tmp/x.sock".parse().unwrap();
        assert!(ServerTls::default().server_config(&unix).unwrap().is_none());
        assert!(ServerTls::mutual("c", "k", "ca").server_config(&unix).is_err());
        let missing = ServerTls::mutual("/nonexistent/c.pem", "/nonexistent/k.pem", "/nonexistent/ca.pem")
            .server_config(&tcp)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("--grpc-tls-cert /nonexistent/c.pem"), "{missing}");
    }
}
