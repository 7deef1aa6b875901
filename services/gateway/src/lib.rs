//! The one operator address of CNNF.
//!
//! Operators, `cnnfctl` and the Radar page talk to a single port that
//! serves HTTP/2 cleartext and HTTP/1.1 (or TLS, optionally with client
//! certificates). Behind it:
//!
//! - gRPC calls to `cnnf.v1.Policy`, `Models`, `Audits` and
//!   `IdentityRegistry` are authenticated, checked against the role table
//!   ([`roles`]) and forwarded byte for byte to the service that owns them,
//!   streams included: the gateway does not depend on message types for
//!   this, so services can grow methods without a gateway release (new
//!   methods need `admin` until listed);
//! - `POST /api/v1/<Service>/<Method>` offers every unary method as proto3
//!   JSON, for curl and the page ([`api`]);
//! - `GET /api/v1/radar` and `/api/v1/radar/stream` serve the Radar graph,
//!   pushed again when models, policy or audits change ([`radar`]);
//! - everything else is the Radar page's static files.
//!
//! The gateway holds no state of its own and talks to the services over
//! gRPC only, so it never depends on a storage engine or a service crate.

pub mod api;
pub mod auth;
pub mod radar;
pub mod roles;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use cnnf_service::{CommonConfig, Health};

/// Process name, for logs and the NATS connection.
pub const NAME: &str = "cnnf-gateway";
/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9106";
/// Default operator address.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:9443";

/// Configuration of the gateway process.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cnnf-gateway", version, about = "The CNNF operator address")]
pub struct Config {
    /// Settings every service shares (NATS, cluster, metrics address).
    #[command(flatten)]
    pub common: CommonConfig,
    /// The gateway's own settings.
    #[command(flatten)]
    pub gateway: Settings,
}

/// The gateway's own settings, apart from the common ones so that the
/// all-in-one process can take them too.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Operator address: gRPC, JSON API and the Radar page.
    #[arg(long, env = "CNNF_GATEWAY_LISTEN", default_value = DEFAULT_LISTEN_ADDR)]
    pub listen: SocketAddr,
    /// Tokens file (JSON, see docs/operator-api.md). Without one every call
    /// is refused as unauthenticated.
    #[arg(long, env = "CNNF_GATEWAY_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// How often the tokens file is checked for changes (it is also re-read on SIGHUP).
    #[arg(long, env = "CNNF_GATEWAY_TOKENS_POLL_SECONDS", default_value_t = 5)]
    pub tokens_poll_seconds: u64,
    /// Server certificate chain (PEM); with `--tls-key` the gateway speaks TLS only.
    #[arg(long, env = "CNNF_GATEWAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "CNNF_GATEWAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA whose client certificates authenticate by subject CN (mTLS).
    #[arg(long, env = "CNNF_GATEWAY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The ingest service's gRPC address (IdentityRegistry).
    #[arg(long, env = "CNNF_GATEWAY_INGEST_ADDR", default_value = "127.0.0.1:9201")]
    pub ingest_addr: String,
    /// The modeler service's gRPC address (Models).
    #[arg(long, env = "CNNF_GATEWAY_MODELER_ADDR", default_value = "127.0.0.1:9202")]
    pub modeler_addr: String,
    /// The policy service's gRPC address (Policy).
    #[arg(long, env = "CNNF_GATEWAY_POLICY_ADDR", default_value = "127.0.0.1:9203")]
    pub policy_addr: String,
    /// The audit service's gRPC address (Audits).
    #[arg(long, env = "CNNF_GATEWAY_AUDIT_ADDR", default_value = "127.0.0.1:9204")]
    pub audit_addr: String,
    /// Directory of the Radar page's static files, served at `/`.
    #[arg(long, env = "CNNF_GATEWAY_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    /// How far back the Radar looks for alerts and prevents.
    #[arg(long, env = "CNNF_GATEWAY_RADAR_AUDIT_WINDOW_SECONDS", default_value_t = 3600)]
    pub radar_audit_window_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN_ADDR.parse().expect("valid default address"),
            tokens_file: None,
            tokens_poll_seconds: 5,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            ingest_addr: "127.0.0.1:9201".to_owned(),
            modeler_addr: "127.0.0.1:9202".to_owned(),
            policy_addr: "127.0.0.1:9203".to_owned(),
            audit_addr: "127.0.0.1:9204".to_owned(),
            static_dir: None,
            radar_audit_window_seconds: 3600,
        }
    }
}

impl Config {
    /// The default gateway settings, with the given common settings.
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            gateway: Settings::default(),
        }
    }
}

/// Runs the gateway on `config.gateway.listen` until `shutdown`.
pub async fn run(
    config: Config,
    health: Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listen = config.gateway.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the operator address {listen}"))?;
    run_on(listener, config, health, shutdown).await
}

/// Runs the gateway on an already bound listener until `shutdown`.
pub async fn run_on(
    listener: tokio::net::TcpListener,
    config: Config,
    health: Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let settings = &config.gateway;
    let credentials = auth::Credentials::open(settings.tokens_file.clone())?;
    if settings.tokens_file.is_none() {
        tracing::warn!(message = "No tokens file configured: every call will be refused as unauthenticated.");
    }
    let tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key, settings.tls_client_ca.as_deref())?),
        _ => None,
    };
    let gateway = server::Gateway::new(settings, credentials.clone())?;
    let ready = health.component("gateway");
    let watcher = tokio::spawn(credentials.watch(Duration::from_secs(settings.tokens_poll_seconds.max(1))));
    let changes = tokio::spawn(radar::watch_changes(
        config.common.nats_url.clone(),
        config.common.nats_options(),
        gateway.radar.clone(),
        health.component("gateway-radar-subscription"),
    ));
    let addr = listener.local_addr()?;
    tracing::info!(message = "Operator address open.", %addr, tls = tls.is_some());
    ready.set(true);
    let result = server::serve(listener, gateway, tls, shutdown).await;
    watcher.abort();
    changes.abort();
    result
}
