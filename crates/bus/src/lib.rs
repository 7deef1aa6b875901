//! CNNF's use of NATS JetStream, in one place.
//!
//! - [`topology`]: every stream, KV bucket and durable consumer, declared in
//!   code and created or updated idempotently at start-up.
//! - [`publisher`]: publishes with deterministic `Nats-Msg-Id`s and a
//!   bounded window of in-flight acks, resending what was not acked, so
//!   events arrive exactly once across a server restart.
//! - [`kv`]: KV watches whose consumer requests name their filter, so
//!   permissions can confine a node to its own key.
//! - [`runner`]: the projection runner, which folds a stream into a
//!   projection store exactly once: one atomic store write per batch holds
//!   the changes and the last applied stream sequence; only then are the
//!   messages acked; what cannot be decoded is dead-lettered.
//!
//! Must never depend on a storage engine (it sees stores only through
//! `cnnf-store`'s trait) nor on any service crate.

#![forbid(unsafe_code)]

pub mod kv;
pub mod outbox;
pub mod publisher;
pub mod runner;
pub mod topology;

pub use publisher::{OutgoingMessage, Publisher, PublisherConfig};
pub use runner::{Event, Projection, ProjectionRunner, RunnerConfig, RunnerHooks, RunnerMetrics};
pub use topology::TopologyConfig;

use std::path::PathBuf;
use std::time::Duration;

/// How to log in to NATS and check the server: a creds file, TLS files,
/// and the inbox prefix replies come back under. `Default`: none of them
/// (a plain connection, as the tests use).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsOptions {
    /// A `.creds` file (user JWT and nkey seed).
    pub credentials: Option<PathBuf>,
    /// A PEM file of the certificate authorities the server's certificate
    /// must chain to; TLS is required when it is set.
    pub ca: Option<PathBuf>,
    /// A PEM client certificate, for servers that verify clients (with
    /// `key`).
    pub cert: Option<PathBuf>,
    /// The PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The prefix of reply subjects instead of `_INBOX` (a node may
    /// subscribe to its own prefix only).
    pub inbox_prefix: Option<String>,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The creds file could not be read.
    #[error("reading the NATS credentials {path}: {source}")]
    Credentials {
        /// The creds file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A client certificate without its key, or the other way round.
    #[error("a NATS client certificate needs both a certificate and a key file")]
    HalfClientCertificate,
    /// The connection itself failed.
    #[error(transparent)]
    Nats(#[from] async_nats::ConnectError),
}

/// Connects to NATS for a CNNF component: unlimited reconnects, and a
/// first connection that keeps retrying in the background so a component
/// can start before the server does.
pub async fn connect(url: &str, name: &str, options: &NatsOptions) -> Result<async_nats::Client, ConnectError> {
    connect_options(name, options)
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(url)
        .await
        .map_err(ConnectError::from)
}

/// The connect options of [`connect`] without its retries: name, 5 s
/// connection timeout, creds, TLS and inbox prefix. For tools that should
/// fail at once when the server is not there.
pub async fn connect_options(name: &str, options: &NatsOptions) -> Result<async_nats::ConnectOptions, ConnectError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5));
    if let Some(path) = &options.credentials {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: path.clone(),
                source,
            })?;
    }
    if let Some(ca) = &options.ca {
        connect = connect.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&options.cert, &options.key) {
        (Some(cert), Some(key)) => connect = connect.add_client_certificate(cert.clone(), key.clone()),
        (None, None) => {}
        _ => return Err(ConnectError::HalfClientCertificate),
    }
    if let Some(prefix) = &options.inbox_prefix {
        connect = connect.custom_inbox_prefix(prefix);
    }
    Ok(connect)
}

/// A JetStream context with CNNF's defaults: API and ack timeout of 10 s.
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(16_384)
        .build(client)
}
