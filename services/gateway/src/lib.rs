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
//! The services trust the caller the gateway names, so they are reached
//! over Unix sockets or mutual TLS ([`Upstreams`], `cnnf_service::grpc`),
//! and the operator address itself listens on a non-loopback address only
//! with TLS (or `--insecure-listen`).

pub mod api;
pub mod auth;
pub mod radar;
pub mod roles;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use cnnf_service::grpc::upstream::{self, Upstream};
use cnnf_service::{CommonConfig, ConfigError, Health};

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
    /// Where the services are and how to reach them.
    #[command(flatten)]
    pub upstreams: Upstreams,
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
    /// Directory of the Radar page's static files, served at `/`.
    #[arg(long, env = "CNNF_GATEWAY_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    /// How far back the Radar looks for alerts and prevents.
    #[arg(long, env = "CNNF_GATEWAY_RADAR_AUDIT_WINDOW_SECONDS", default_value_t = 3600)]
    pub radar_audit_window_seconds: u64,
    /// Listen on a non-loopback `--listen` address without TLS: bearer
    /// tokens then cross the network in the clear (labs only).
    #[arg(long, env = "CNNF_GATEWAY_INSECURE_LISTEN")]
    pub insecure_listen: bool,
}

/// Default address of the ingest service (its default `--grpc-addr`).
pub const DEFAULT_INGEST_ADDR: &str = "unix:/run/cnnf/ingest.sock";
/// Default address of the modeler service.
pub const DEFAULT_MODELER_ADDR: &str = "unix:/run/cnnf/modeler.sock";
/// Default address of the policy service.
pub const DEFAULT_POLICY_ADDR: &str = "unix:/run/cnnf/policy.sock";
/// Default address of the audit service.
pub const DEFAULT_AUDIT_ADDR: &str = "unix:/run/cnnf/audit.sock";

/// Where the services are (`unix:<path>`, `https://host:port`, or
/// `http://host:port` with `--grpc-insecure`) and the TLS the gateway
/// speaks to them: the CA their certificates chain to, and the client
/// certificate their mutual TLS asks for.
#[derive(Debug, Clone, clap::Args)]
pub struct Upstreams {
    /// The ingest service's gRPC address (IdentityRegistry).
    #[arg(long, env = "CNNF_GATEWAY_INGEST_ADDR", default_value = DEFAULT_INGEST_ADDR)]
    pub ingest_addr: String,
    /// The modeler service's gRPC address (Models).
    #[arg(long, env = "CNNF_GATEWAY_MODELER_ADDR", default_value = DEFAULT_MODELER_ADDR)]
    pub modeler_addr: String,
    /// The policy service's gRPC address (Policy).
    #[arg(long, env = "CNNF_GATEWAY_POLICY_ADDR", default_value = DEFAULT_POLICY_ADDR)]
    pub policy_addr: String,
    /// The audit service's gRPC address (Audits).
    #[arg(long, env = "CNNF_GATEWAY_AUDIT_ADDR", default_value = DEFAULT_AUDIT_ADDR)]
    pub audit_addr: String,
    /// CA (PEM) of the services' certificates, for `https://` addresses.
    #[arg(long, env = "CNNF_GATEWAY_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// The gateway's client certificate chain (PEM) for the services' mutual TLS.
    #[arg(long, env = "CNNF_GATEWAY_UPSTREAM_CERT", requires_all = ["upstream_key", "upstream_ca"])]
    pub upstream_cert: Option<PathBuf>,
    /// The private key (PEM) of that certificate.
    #[arg(long, env = "CNNF_GATEWAY_UPSTREAM_KEY", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Allow `http://` service addresses, calls in the clear to services
    /// that trust every caller: for tests and labs only.
    #[arg(long, env = "CNNF_GRPC_INSECURE")]
    pub grpc_insecure: bool,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            ingest_addr: DEFAULT_INGEST_ADDR.to_owned(),
            modeler_addr: DEFAULT_MODELER_ADDR.to_owned(),
            policy_addr: DEFAULT_POLICY_ADDR.to_owned(),
            audit_addr: DEFAULT_AUDIT_ADDR.to_owned(),
            upstream_ca: None,
            upstream_cert: None,
            upstream_key: None,
            grpc_insecure: false,
        }
    }
}

/// The four services' addresses, checked and ready to connect.
#[derive(Debug, Clone)]
pub struct ResolvedUpstreams {
    /// Ingest.
    pub ingest: Upstream,
    /// The modeler.
    pub modeler: Upstream,
    /// Policy.
    pub policy: Upstream,
    /// Audit.
    pub audit: Upstream,
}

impl Upstreams {
    /// The four services on Unix sockets.
    pub fn unix(ingest: &Path, modeler: &Path, policy: &Path, audit: &Path) -> Self {
        let unix = |path: &Path| format!("unix:{}", path.display());
        Self {
            ingest_addr: unix(ingest),
            modeler_addr: unix(modeler),
            policy_addr: unix(policy),
            audit_addr: unix(audit),
            ..Self::default()
        }
    }

    /// Checks the addresses and loads the TLS files; a [`ConfigError`]
    /// names the flag that is wrong.
    pub fn resolve(&self) -> Result<ResolvedUpstreams, ConfigError> {
        let tls = match (&self.upstream_ca, &self.upstream_cert, &self.upstream_key) {
            (Some(ca), Some(cert), Some(key)) => Some(upstream::client_tls(ca, Some((cert, key)))?),
            (Some(ca), None, None) => Some(upstream::client_tls(ca, None)?),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "--upstream-cert and --upstream-key go together, and need --upstream-ca",
                ))
            }
        };
        let parse = |flag: &str, addr: &str| Upstream::parse(flag, addr, tls.as_ref(), self.grpc_insecure);
        Ok(ResolvedUpstreams {
            ingest: parse("--ingest-addr", &self.ingest_addr)?,
            modeler: parse("--modeler-addr", &self.modeler_addr)?,
            policy: parse("--policy-addr", &self.policy_addr)?,
            audit: parse("--audit-addr", &self.audit_addr)?,
        })
    }
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
            static_dir: None,
            radar_audit_window_seconds: 3600,
            insecure_listen: false,
        }
    }
}

impl Config {
    /// The default gateway settings, with the given common settings.
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            gateway: Settings::default(),
            upstreams: Upstreams::default(),
        }
    }
}

impl Settings {
    /// Refuses to serve bearer tokens in the clear beyond this machine:
    /// a non-loopback `listen` needs TLS or `--insecure-listen`.
    pub fn check_listen(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        let tls = self.tls_cert.is_some() && self.tls_key.is_some();
        if listen.ip().is_loopback() || tls || self.insecure_listen {
            return Ok(());
        }
        Err(ConfigError::new(format!(
            "--listen {listen} is not a loopback address and the gateway has no TLS: give --tls-cert and \
             --tls-key (tokens would cross the network in the clear), or --insecure-listen (labs only)"
        )))
    }
}

/// Runs the gateway on `config.gateway.listen` until `shutdown`.
pub async fn run(
    config: Config,
    health: Health,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let listen = config.gateway.listen;
    config.gateway.check_listen(listen)?;
    config.upstreams.resolve()?;
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
    settings.check_listen(listener.local_addr()?)?;
    let credentials = auth::Credentials::open(settings.tokens_file.clone())?;
    if settings.tokens_file.is_none() {
        tracing::warn!(message = "No tokens file configured: every call will be refused as unauthenticated.");
    }
    let tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(
            tls::server_config(cert, key, settings.tls_client_ca.as_deref())
                .map_err(|error| ConfigError::new(format!("--tls-cert, --tls-key, --tls-client-ca: {error}")))?,
        ),
        _ => None,
    };
    let gateway = server::Gateway::new(settings, &config.upstreams, credentials.clone())?;
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
