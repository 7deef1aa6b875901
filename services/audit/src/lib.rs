//! The CNNF audit service: audits for integrations, the forensic index,
//! replay and policy simulation.
//!
//! ```text
//! cnnf.flow.<c>.<n>      ─► runner audit-flows ─► audits (dedup per window) ─► index ─► outbox ─┐
//!                                  └─► port-scan detector ─► incident ──────────────► outbox ─┤
//!                                                                                             ▼
//!        cnnf.audit.v1.<c>.<n>.<verdict> (CNNF_AUDIT, protobuf Envelope{Audit}) ◄── drainer ──┤
//!        cnnf.audit.json.v1.<c>.<n>.<verdict> (core NATS, JSON twin)           ◄──────────────┤
//!        cnnf.incident.<c>.port-scan (CNNF_INCIDENTS)                          ◄──────────────┘
//! cnnf.workload.<c>.<n>  ─► runner audit-workloads ─► address history
//! cnnf.policy.<c>.<kind> ─► runner audit-policy    ─► policy history
//! cnnf.model.<image>     ─► runner audit-models    ─► model history
//! gRPC cnnf.v1.Audits: ListAudits, Tail, Replay, WhoHeld, StateAt, Simulate
//! ```
//!
//! Every decision an agent publishes with verdict alert, prevent or block
//! becomes part of an audit: when, cluster, node, both ends (identity,
//! container, address, destination port), protocol, verdict, and what
//! decided ([`projection`] explains windows and counting, [`scan`] the
//! port-scan detector). Audits go out only after the store committed them,
//! through an outbox, under ids derived from the decision's stream sequence
//! (`audit:CNNF_FLOWS:<seq>:<part>`), so a restart anywhere neither loses
//! nor doubles one. [`index`] answers queries, [`forensics`] replays ranges
//! and answers point-in-time questions, [`simulate`] evaluates a candidate
//! verdict table against recorded decisions. The candidate is a
//! `cnnf.v1.VerdictTable` (or its JSON form, [`simulate::CandidateJson`]):
//! the policy service's export format is not a dependency of this crate.
//!
//! Configuration (flags, or the environment), beside what every service
//! takes (`CNNF_NATS_URL`, `CNNF_CLUSTER`, `CNNF_DATA_DIR`, ...):
//!
//! | flag | environment | default | |
//! | --- | --- | --- | --- |
//! | `--window-seconds` | `CNNF_AUDIT_WINDOW_SECONDS` | 10 | identical audits within a window are one |
//! | `--grace-seconds` | `CNNF_AUDIT_GRACE_SECONDS` | 5 | event time past a window's end before its final counts are published |
//! | `--scan-ports` | `CNNF_SCAN_PORTS` | 20 | distinct ports in the scan window that make a port scan |
//! | `--scan-hosts` | `CNNF_SCAN_HOSTS` | 20 | distinct hosts in the scan window that make a port scan |
//! | `--scan-window-seconds` | `CNNF_SCAN_WINDOW_SECONDS` | 5 | the scan window |
//! | `--scan-cooldown-seconds` | `CNNF_SCAN_COOLDOWN_SECONDS` | 300 | quiet period of a detected scanner |
//! | `--lateness-seconds` | `CNNF_AUDIT_LATENESS_SECONDS` | 300 | default lateness of replays and simulations |
//! | `--retention-hours` | `CNNF_AUDIT_RETENTION_HOURS` | 720 | stored audits older than this are removed ([`retention`]) |
//! | `--grpc-addr` | `CNNF_GRPC_ADDR` | unix:/run/cnnf/audit.sock | the `Audits` API: `unix:<path>`, or `<ip>:<port>` with mutual TLS (`--grpc-tls-cert`, `--grpc-tls-key`, `--grpc-client-ca`; see `cnnf_service::grpc`) |
//!
//! The store is RocksDB at `<data dir>/audit`; replays build theirs under
//! `<data dir>/replays`. Runner counters are on `/metrics` as
//! `cnnf_audit_{flows,workloads,policy,models}_*`, the sweeps' as
//! `cnnf_audit_retention_*`.
//!
//! Must never depend on the node agent or on another service.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod forensics;
pub mod index;
pub mod projection;
pub mod retention;
pub mod scan;
pub mod service;
pub mod simulate;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cnnf_bus::runner::{CommitHook, RunnerMetrics};
use cnnf_bus::topology::{FLOWS, MODELS, POLICY, WORKLOADS};
use cnnf_proto::v1::audits_server::AuditsServer;
use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use cnnf_store::ProjectionStore;
use cnnf_store_rocksdb::RocksStore;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

pub use projection::{AuditSettings, FlowsProjection, ModelsProjection, PolicyProjection, WorkloadsProjection};
pub use scan::ScanSettings;

/// The service's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-audit";
/// Producer name in the ids of what the service publishes.
pub const PRODUCER: &str = "audit";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9104";
/// Default address of the `Audits` gRPC API.
pub const DEFAULT_GRPC_ADDR: &str = "unix:/run/cnnf/audit.sock";

/// Durable consumer of decisions.
pub const FLOWS_DURABLE: &str = "audit-flows";
/// Durable consumer of workload events (address history).
pub const WORKLOADS_DURABLE: &str = "audit-workloads";
/// Durable consumer of policy changes.
pub const POLICY_DURABLE: &str = "audit-policy";
/// Durable consumer of model changes.
pub const MODELS_DURABLE: &str = "audit-models";

/// Configuration of the audit service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cnnf-audit",
    version,
    about = "CNNF audit service: audits for integrations, the forensic index, replay and policy simulation"
)]
pub struct Config {
    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// Identical audits within this many seconds (aligned windows of
    /// decision time) are one audit with a count (1 to 86400).
    #[arg(long, env = "CNNF_AUDIT_WINDOW_SECONDS", default_value_t = projection::DEFAULT_WINDOW_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub window_seconds: u64,
    /// Seconds of event time past a window's end before its final counts
    /// are published (0 to 3600).
    #[arg(long, env = "CNNF_AUDIT_GRACE_SECONDS", default_value_t = projection::DEFAULT_GRACE_SECONDS, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub grace_seconds: u64,
    /// Distinct destination ports within the scan window that make a port
    /// scan (2 to 65536).
    #[arg(long, env = "CNNF_SCAN_PORTS", default_value_t = scan::DEFAULT_PORTS, value_parser = clap::value_parser!(u32).range(2..=65_536))]
    pub scan_ports: u32,
    /// Distinct destination addresses within the scan window that make a
    /// port scan (2 to 1000000).
    #[arg(long, env = "CNNF_SCAN_HOSTS", default_value_t = scan::DEFAULT_HOSTS, value_parser = clap::value_parser!(u32).range(2..=1_000_000))]
    pub scan_hosts: u32,
    /// The scan window, seconds of event time (1 to 3600).
    #[arg(long, env = "CNNF_SCAN_WINDOW_SECONDS", default_value_t = scan::DEFAULT_WINDOW_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub scan_window_seconds: u64,
    /// How long a detected scanner raises no new incident and has its
    /// audits aggregated over ports, seconds (1 to 86400).
    #[arg(long, env = "CNNF_SCAN_COOLDOWN_SECONDS", default_value_t = scan::DEFAULT_COOLDOWN_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub scan_cooldown_seconds: u64,
    /// Default lateness of replays and simulations: how long after its
    /// time a decision may have reached the stream (0 to 604800).
    #[arg(long, env = "CNNF_AUDIT_LATENESS_SECONDS", default_value_t = forensics::DEFAULT_LATENESS.as_secs(), value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub lateness_seconds: u64,
    /// Stored audits first seen longer ago than this many hours are removed
    /// from the store with their index entries (1 to 876000).
    #[arg(long, env = "CNNF_AUDIT_RETENTION_HOURS", default_value_t = retention::DEFAULT_RETENTION_HOURS, value_parser = clap::value_parser!(u64).range(1..=876_000))]
    pub retention_hours: u64,
    /// Address of the Audits gRPC API.
    #[arg(long, env = "CNNF_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: GrpcAddr,
    /// How the gRPC API is protected on TCP (mutual TLS, or `--grpc-insecure`).
    #[command(flatten)]
    pub grpc_tls: ServerTls,
}

impl Config {
    /// The defaults around `common` (for the all-in-one process).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            window_seconds: projection::DEFAULT_WINDOW_SECONDS,
            grace_seconds: projection::DEFAULT_GRACE_SECONDS,
            scan_ports: scan::DEFAULT_PORTS,
            scan_hosts: scan::DEFAULT_HOSTS,
            scan_window_seconds: scan::DEFAULT_WINDOW_SECONDS,
            scan_cooldown_seconds: scan::DEFAULT_COOLDOWN_SECONDS,
            lateness_seconds: forensics::DEFAULT_LATENESS.as_secs(),
            retention_hours: retention::DEFAULT_RETENTION_HOURS,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("the default gRPC address parses"),
            grpc_tls: ServerTls::default(),
        }
    }

    /// Where the RocksDB store lives: `<data dir>/audit`.
    pub fn store_path(&self) -> PathBuf {
        self.common.data_dir.join("audit")
    }

    /// Where replays build their stores: `<data dir>/replays`.
    pub fn replay_path(&self) -> PathBuf {
        self.common.data_dir.join("replays")
    }

    /// How long stored audits are kept.
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.saturating_mul(3600))
    }

    /// The fold's settings.
    pub fn settings(&self) -> AuditSettings {
        AuditSettings {
            window: Duration::from_secs(self.window_seconds),
            grace: Duration::from_secs(self.grace_seconds),
            scan: ScanSettings {
                ports: self.scan_ports,
                hosts: self.scan_hosts,
                window: Duration::from_secs(self.scan_window_seconds),
                cooldown: Duration::from_secs(self.scan_cooldown_seconds),
            },
        }
    }
}

/// Settings tests use; production leaves them at their defaults.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Called by the flows runner after each commit, before the ack: a
    /// failpoint where a crash hurts most.
    pub flows_after_commit: Option<CommitHook>,
    /// Time between two retention sweeps (default: a minute).
    pub retention_sweep_interval: Option<Duration>,
}

/// Opens the audit store at `path` (creating it).
pub fn open_store(path: &std::path::Path) -> anyhow::Result<RocksStore> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    RocksStore::open(path, store::TABLES).with_context(|| format!("opening the audit store at {}", path.display()))
}

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Not ready while the store opens (run_with_store takes the flag up).
    let _starting = health.component(NAME);
    let path = config.store_path();
    let store = tokio::task::spawn_blocking(move || open_store(&path)).await??;
    run_with_store(config, Arc::new(store), health, RunOptions::default(), shutdown).await
}

/// Runs the service on an open store until `shutdown` completes: the
/// runners, the outbox drainer and the gRPC API.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn ProjectionStore>,
    health: Health,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ready = health.component(NAME);
    let listener = cnnf_service::grpc::Listener::bind(&config.grpc_addr, &config.grpc_tls).await?;
    let js = cnnf_service::connect_and_ensure(NAME, &config.common).await?;
    let settings = config.settings();
    let metrics: [RunnerMetrics; 4] = Default::default();
    let retention_metrics = retention::RetentionMetrics::default();
    health.register(|registry| {
        retention_metrics.register(registry);
        for (runner, prefix) in metrics.iter().zip([
            "cnnf_audit_flows",
            "cnnf_audit_workloads",
            "cnnf_audit_policy",
            "cnnf_audit_models",
        ]) {
            runner.register(registry, prefix);
        }
    });
    let api = api::AuditsApi::new(
        Arc::clone(&store),
        js.clone(),
        settings,
        config.replay_path(),
        Duration::from_secs(config.lateness_seconds),
    );

    let listener_addr = listener.addr().clone();
    let (stop, stopping) = watch::channel(false);
    let notify = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_api(listener, api, stopping.clone()));
    let [flows_metrics, workloads_metrics, policy_metrics, models_metrics] = metrics;
    let flows_store = Arc::clone(&store);
    tasks.spawn(service::supervise_runner(
        js.clone(),
        Arc::clone(&store),
        FLOWS,
        FLOWS_DURABLE,
        move || Ok(FlowsProjection::open(flows_store.as_ref(), settings)?),
        Some(service::waking_hook(
            Arc::clone(&notify),
            options.flows_after_commit.clone(),
        )),
        flows_metrics,
        stopping.clone(),
    ));
    tasks.spawn(service::supervise_runner(
        js.clone(),
        Arc::clone(&store),
        WORKLOADS,
        WORKLOADS_DURABLE,
        || Ok(WorkloadsProjection),
        None,
        workloads_metrics,
        stopping.clone(),
    ));
    tasks.spawn(service::supervise_runner(
        js.clone(),
        Arc::clone(&store),
        POLICY,
        POLICY_DURABLE,
        || Ok(PolicyProjection),
        None,
        policy_metrics,
        stopping.clone(),
    ));
    tasks.spawn(service::supervise_runner(
        js.clone(),
        Arc::clone(&store),
        MODELS,
        MODELS_DURABLE,
        || Ok(ModelsProjection),
        None,
        models_metrics,
        stopping.clone(),
    ));
    tasks.spawn(retention::run(
        Arc::clone(&store),
        settings,
        config.retention(),
        options
            .retention_sweep_interval
            .unwrap_or(retention::DEFAULT_SWEEP_INTERVAL),
        retention_metrics,
        stopping.clone(),
    ));
    tasks.spawn(service::drain_outbox(js, store, notify, stopping));
    ready.set(true);
    tracing::info!(
        message = "Service started.",
        service = NAME,
        cluster = %config.common.cluster,
        grpc_addr = %listener_addr,
        window_seconds = config.window_seconds,
        scan_ports = config.scan_ports,
        scan_hosts = config.scan_hosts,
        retention_hours = config.retention_hours
    );
    let result = cnnf_service::run_parts(tasks, stop, shutdown).await;
    tracing::info!(message = "Service stopped.", service = NAME);
    result
}

async fn serve_api(
    listener: cnnf_service::grpc::Listener,
    api: api::AuditsApi,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let addr = listener.addr().clone();
    tracing::info!(message = "Serving the Audits gRPC API.", %addr);
    tonic::transport::Server::builder()
        .add_service(AuditsServer::new(api))
        .serve_with_incoming_shutdown(listener.incoming(), service::stopped(stop))
        .await
        .with_context(|| format!("serving gRPC on {addr}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_match_the_all_in_one_constructor() {
        let parsed = Config::try_parse_from(["cnnf-audit"]).unwrap();
        let built = Config::new(parsed.common.clone());
        assert_eq!(parsed.settings(), built.settings());
        assert_eq!(parsed.grpc_addr, built.grpc_addr);
        assert_eq!(parsed.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert!(!parsed.grpc_tls.grpc_insecure);
        assert_eq!(parsed.lateness_seconds, built.lateness_seconds);
        assert_eq!(parsed.retention(), built.retention());
        assert_eq!(parsed.retention(), Duration::from_secs(30 * 24 * 3600));
        assert_eq!(parsed.settings(), AuditSettings::default());
    }

    #[test]
    fn bad_flags_are_refused_with_their_name() {
        let error = Config::try_parse_from(["cnnf-audit", "--window-seconds", "0"]).unwrap_err();
        assert!(error.to_string().contains("--window-seconds"), "{error}");
        let error = Config::try_parse_from(["cnnf-audit", "--scan-ports", "1"]).unwrap_err();
        assert!(error.to_string().contains("--scan-ports"), "{error}");
        let error = Config::try_parse_from(["cnnf-audit", "--retention-hours", "0"]).unwrap_err();
        assert!(error.to_string().contains("--retention-hours"), "{error}");
    }
}
