//! What every CNNF service process shares, so each service's `main` stays
//! a few lines: the common configuration ([`CommonConfig`], from flags or
//! `CNNF_*` environment variables), logging, the HTTP endpoint serving
//! Prometheus `/metrics` and `/ready`, the NATS connection with the
//! topology ensured, the shutdown signal, and the services' gRPC listener
//! ([`grpc`]: a Unix socket, or TCP with mutual TLS).
//!
//! Must never depend on a storage engine or on a particular service.

#![forbid(unsafe_code)]

pub mod actor;
pub mod grpc;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Exit status for bad configuration (EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// A configuration mistake found when a process starts rather than when
/// its flags are parsed (flags that do not fit together, a certificate
/// that does not load). [`main`] exits with [`EXIT_BAD_CONFIG`] when the
/// error it gets holds one anywhere in its chain ([`is_config_error`]).
#[derive(Debug, Clone)]
pub struct ConfigError(String);

impl ConfigError {
    /// A configuration error saying `message` (name the flags involved).
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Whether `error` is, or was caused by, a [`ConfigError`].
pub fn is_config_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<ConfigError>())
}

/// Configuration every service takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonConfig {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "CNNF_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Cluster this process belongs to.
    #[arg(long, env = "CNNF_CLUSTER", default_value = "local")]
    pub cluster: String,
    /// Directory for this service's local state (RocksDB projections).
    #[arg(long, env = "CNNF_DATA_DIR", default_value = "./cnnf-data")]
    pub data_dir: PathBuf,
    /// Address of the /metrics and /ready endpoint.
    #[arg(long, env = "CNNF_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Replicas of streams and buckets (3 in a NATS cluster).
    #[arg(long, env = "CNNF_REPLICAS", default_value_t = 1)]
    pub replicas: usize,
    /// NATS credentials: a `.creds` file (`cnnf auth init`, `cnnf nodes
    /// enroll`).
    #[arg(long, env = "CNNF_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// PEM file of the CAs that sign the NATS server's certificate; the
    /// connection then requires TLS.
    #[arg(long, env = "CNNF_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// PEM client certificate for NATS servers that verify clients (with
    /// `--nats-key`).
    #[arg(long, env = "CNNF_NATS_CERT", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// PEM private key of `--nats-cert`.
    #[arg(long, env = "CNNF_NATS_KEY", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
}

impl CommonConfig {
    /// Checks what clap cannot: names that must be subject tokens.
    pub fn validate(&self) -> anyhow::Result<()> {
        cnnf_core::subjects::Token::new("cluster", &self.cluster)?;
        anyhow::ensure!(
            self.replicas >= 1 && self.replicas <= 5,
            "--replicas must be between 1 and 5, got {}",
            self.replicas
        );
        check_nats_files(&[
            ("--nats-creds", &self.nats_creds),
            ("--nats-ca", &self.nats_ca),
            ("--nats-cert", &self.nats_cert),
            ("--nats-key", &self.nats_key),
        ])
    }

    /// The NATS login and TLS settings (no inbox prefix: only node agents
    /// need one).
    pub fn nats_options(&self) -> cnnf_bus::NatsOptions {
        cnnf_bus::NatsOptions {
            credentials: self.nats_creds.clone(),
            ca: self.nats_ca.clone(),
            cert: self.nats_cert.clone(),
            key: self.nats_key.clone(),
            inbox_prefix: None,
        }
    }

    /// The topology settings this configuration implies.
    pub fn topology(&self) -> cnnf_bus::TopologyConfig {
        cnnf_bus::TopologyConfig {
            replicas: self.replicas,
            ..Default::default()
        }
    }
}

/// Checks that each given NATS file (creds, CA, certificate, key) is a
/// readable file; the error names the flag and the path.
pub fn check_nats_files(files: &[(&str, &Option<PathBuf>)]) -> anyhow::Result<()> {
    for (flag, path) in files {
        if let Some(path) = path {
            std::fs::File::open(path).with_context(|| format!("{flag} {}: cannot be read", path.display()))?;
            anyhow::ensure!(path.is_file(), "{flag} {}: not a file", path.display());
        }
    }
    Ok(())
}

/// Parses configuration the way every CNNF binary does: `--help` and
/// `--version` print and exit 0; anything wrong prints what and exits 64.
pub fn parse_or_exit<T: clap::Parser>() -> Result<T, ExitCode> {
    match T::try_parse() {
        Ok(config) => Ok(config),
        Err(error) => {
            let _ = error.print();
            Err(if error.use_stderr() {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// Installs the log subscriber: `RUST_LOG` filters (default `info`);
/// `CNNF_LOG_FORMAT=json` logs JSON lines.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if std::env::var("CNNF_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!(message = "Shutdown requested.");
}

/// Readiness and metrics of one process (one service, or all of them in
/// the all-in-one binary). `/ready` answers 200 once every component that
/// asked for a [`Readiness`] handle has said it is ready.
#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<Vec<Component>>>,
    registry: Arc<Mutex<Registry>>,
}

/// A registered component: its name and readiness flag.
type Component = (String, Arc<AtomicBool>);

/// One component's readiness flag.
#[derive(Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the component ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
}

impl Health {
    /// Registers a component, not ready yet; a name registered before
    /// gets its existing flag back, so a service can register before its
    /// slow start-up (opening its store) and take the flag up afterwards.
    pub fn component(&self, name: &str) -> Readiness {
        let mut components = self.components.lock().expect("health lock poisoned");
        if let Some((_, flag)) = components.iter().find(|(known, _)| known == name) {
            return Readiness(Arc::clone(flag));
        }
        let flag = Arc::new(AtomicBool::new(false));
        components.push((name.to_owned(), Arc::clone(&flag)));
        Readiness(flag)
    }

    /// Components not ready yet (empty: ready).
    pub fn not_ready(&self) -> Vec<String> {
        let components = self.components.lock().expect("health lock poisoned");
        if components.is_empty() {
            return vec!["(no component registered)".to_owned()];
        }
        components
            .iter()
            .filter(|(_, flag)| !flag.load(Ordering::SeqCst))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Lets a component register its metrics.
    pub fn register(&self, with: impl FnOnce(&mut Registry)) {
        with(&mut self.registry.lock().expect("registry lock poisoned"));
    }

    /// The metrics in the Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock poisoned");
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The value of one sample, named as the text format writes it
    /// (`name` or `name{label="value",...}`); `None` when it is not there.
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        metric_value(&self.encode_metrics(), name_and_labels)
    }

    /// Serves `/metrics` and `/ready` on `addr` until `shutdown`.
    pub async fn serve(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = axum::Router::new()
            .route("/metrics", get(metrics))
            .route("/ready", get(ready))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP endpoint on {addr}"))?;
        tracing::info!(message = "Serving /metrics and /ready.", %addr);
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
        Ok(())
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        health.encode_metrics(),
    )
}

async fn ready(State(health): State<Health>) -> impl IntoResponse {
    let waiting = health.not_ready();
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for: {}\n", waiting.join(", ")),
        )
    }
}

/// Connects to NATS and declares the topology (idempotent); retries until
/// NATS answers, so a service can start before the server.
pub async fn connect_and_ensure(name: &str, config: &CommonConfig) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = cnnf_bus::connect(&config.nats_url, name, &config.nats_options())
        .await
        .with_context(|| format!("connecting to NATS at {}", config.nats_url))?;
    let js = cnnf_bus::jetstream(client);
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match cnnf_bus::topology::ensure(&js, &config.topology()).await {
            Ok(()) => return Ok(js),
            Err(error) => {
                tracing::warn!(message = "Declaring the topology failed; retrying.", %error);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// The value of one sample in Prometheus text `exposition`, named as the
/// format writes it (`name` or `name{label="value",...}`); `None` when it
/// is not there or not a number. For tools that read a `/metrics` page.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.trim().parse::<f64>().ok())?
    })
}

/// The whole `main` of a service binary: parse and check configuration
/// (exit 64 when wrong), start logging and the runtime, serve `/metrics`
/// and `/ready` (on `--http-addr`, else `default_http_addr`), and run the
/// service until SIGINT or SIGTERM. A [`ConfigError`] from the service
/// (see [`is_config_error`]) also exits 64.
pub fn main<C, F, Fut>(name: &str, default_http_addr: &str, common: fn(&C) -> &CommonConfig, run: F) -> ExitCode
where
    C: clap::Parser,
    F: FnOnce(C, Health) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config: C = match parse_or_exit() {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Err(error) = common(&config).validate() {
        eprintln!("{name}: invalid configuration: {error:#}");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    let addr = match common(&config).http_addr {
        Some(addr) => addr,
        None => match default_http_addr.parse() {
            Ok(addr) => addr,
            Err(error) => {
                eprintln!("{name}: invalid default HTTP address {default_http_addr:?}: {error}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
    };
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{name}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let health = Health::default();
        let server = tokio::spawn(health.clone().serve(addr, shutdown_signal()));
        let result = run(config, health).await;
        server.abort();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_config_error(&error) => {
            eprintln!("{name}: invalid configuration: {error:#}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(error) => {
            tracing::error!(message = "Service failed.", error = %format!("{error:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the parts of a service (runners, API servers, timers) until
/// `shutdown` completes or one part stops on its own, then tells every part
/// to stop through `stop` and waits for all of them. Returns the first
/// failure: a part that stopped on its own is one, since parts run until
/// told to stop.
pub async fn run_parts(
    mut parts: tokio::task::JoinSet<anyhow::Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let early = tokio::select! {
        () = &mut shutdown => None,
        Some(joined) = parts.join_next() => Some(joined),
    };
    stop.send_replace(true);
    let mut result = match early {
        None => Ok(()),
        Some(Ok(Ok(()))) => Err(anyhow::anyhow!("a part of the service stopped on its own")),
        Some(Ok(Err(error))) => Err(error),
        Some(Err(error)) => Err(error.into()),
    };
    while let Some(joined) = parts.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|outcome| outcome);
        if let Err(error) = outcome {
            if result.is_ok() {
                result = Err(error);
            } else {
                tracing::error!(message = "Part of the service failed while stopping.", error = %format!("{error:#}"));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sample_is_found_by_its_name_and_labels() {
        let page =
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{kind=\"a\"} 3\nx_total{kind=\"b\"} 4.5\ny 7\n";
        assert_eq!(super::metric_value(page, "x_total{kind=\"b\"}"), Some(4.5));
        assert_eq!(super::metric_value(page, "y"), Some(7.0));
        assert_eq!(
            super::metric_value(page, "x_total"),
            None,
            "a name alone does not match a labelled sample"
        );
        assert_eq!(super::metric_value(page, "z"), None);
    }
}
