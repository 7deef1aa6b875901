//! The CNNF ingest service: the fleet-wide identity registry (address to
//! workload over time) and the gate of agent events.
//!
//! Container addresses are short-lived and reused, so every decision,
//! model and audit names endpoints by identity. This service is where an
//! address becomes an identity: it folds the workload events of every node
//! (`CNNF_WORKLOADS`, durable `ingest-workloads`) into a registry of who
//! held which address from when to when, publishes the current map to KV
//! bucket `cnnf-identities` for the agents, answers point-in-time questions
//! over gRPC, and releases the addresses of nodes that stop heartbeating
//! (`CNNF_HEARTBEATS`, durable `ingest-heartbeats`).
//!
//! ```text
//! cnnf.workload.<c>.<n> ─► runner ─► gate ─► registry (RocksDB) ─► commit ─► KV cnnf-identities
//!        ▲                             │ refused                    │         incidents (outbox)
//!        │                             ▼                            ▼
//!        │                  cnnf.dlq.ingest-workloads          gRPC IdentityRegistry
//!        │
//!        └── NodeGone ◄── liveness monitor ◄── newest heartbeat per node ◄── cnnf.heartbeat.<c>.<n>
//! ```
//!
//! - [`projection`]: the gate (what is refused and why) and the folds;
//!   every holding uses **event time** (`Envelope.time_unix_nanos`), so a
//!   replay gives the same answers. Address reuse, late stops and two
//!   workloads claiming one address are spelled out there.
//! - [`registry`]: tables and key layout in the store. All state is there,
//!   committed by the runner in the same write as the applied sequence, so
//!   the registry is exactly once and a rebuild gives it byte for byte.
//! - [`kv`]: the current map in the KV bucket (key encoding in
//!   [`address`]), written after the commit that caused it and reconciled
//!   with the registry at every start; incidents through an outbox.
//! - [`liveness`]: `NodeGone` for silent nodes, as an event on the log.
//! - [`api`]: the gRPC API.
//!
//! Agents can publish only on their own node's subjects: the NATS
//! permissions in `deploy/nats/agent-permissions.md` (shipped in
//! `deploy/nats/single-node.conf`) allow each agent user
//! `cnnf.{workload,flow,heartbeat}.<cluster>.<node>` and nothing else of
//! the event subjects. The gate covers what permissions cannot: an agent
//! naming another node inside the message body.
//!
//! Configuration (flags, or the environment), beside what every service
//! takes (`CNNF_NATS_URL`, `CNNF_CLUSTER`, `CNNF_DATA_DIR`, ...):
//!
//! | flag | environment | default | |
//! | --- | --- | --- | --- |
//! | `--node-timeout-seconds` | `CNNF_NODE_TIMEOUT_SECONDS` | 30 | silence after which a node is gone |
//! | `--grpc-addr` | `CNNF_GRPC_ADDR` | unix:/run/cnnf/ingest.sock | the `IdentityRegistry` API: `unix:<path>`, or `<ip>:<port>` with mutual TLS (`--grpc-tls-cert`, `--grpc-tls-key`, `--grpc-client-ca`; see `cnnf_service::grpc`) |
//! | `--max-event-bytes` | `CNNF_MAX_EVENT_BYTES` | 65536 | larger agent events are dead-lettered |
//!
//! The store is RocksDB at `<data dir>/registry`. To rebuild it, stop the
//! service, delete that directory and start it: the runner reads both
//! streams again from their first message, and the KV bucket is reconciled
//! once the registry has caught up (a rebuild re-publishes past conflict
//! incidents under their original ids; consumers dedupe by `incident_id`).
//!
//! A library with [`run`] so that tests and the all-in-one binary decide
//! when it stops; `main.rs` is only the process around it.
//!
//! Must never depend on the node agent or on another service.

#![forbid(unsafe_code)]

/// Address forms and KV keys, shared with the agents through the core crate.
pub use cnnf_core::address;
pub mod api;
pub mod kv;
pub mod liveness;
pub mod metrics;
pub mod projection;
pub mod registry;
pub mod service;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cnnf_bus::runner::CommitHook;
use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use cnnf_store::ProjectionStore;
use cnnf_store_rocksdb::RocksStore;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use registry::{REGISTRY_TABLES, TABLES};
pub use service::{HEARTBEATS_DURABLE, WORKLOADS_DURABLE};

/// The service's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-ingest";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9101";

/// Default address of the `IdentityRegistry` gRPC API.
pub const DEFAULT_GRPC_ADDR: &str = "unix:/run/cnnf/ingest.sock";

/// Configuration of the ingest service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cnnf-ingest",
    version,
    about = "CNNF ingest service: the fleet-wide identity registry (address to workload over time) and the gate of agent events"
)]
pub struct Config {
    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// Seconds without a heartbeat after which a node is declared gone and
    /// its addresses released (1 to 86400).
    #[arg(long, env = "CNNF_NODE_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub node_timeout_seconds: u64,
    /// Address of the IdentityRegistry gRPC API.
    #[arg(long, env = "CNNF_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: GrpcAddr,
    /// How the gRPC API is protected on TCP (mutual TLS, or `--grpc-insecure`).
    #[command(flatten)]
    pub grpc_tls: ServerTls,
    /// Largest agent event accepted, bytes (1024 to 1048576); larger ones
    /// are dead-lettered as oversized.
    #[arg(long, env = "CNNF_MAX_EVENT_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024))]
    pub max_event_bytes: u64,
}

impl Config {
    /// The defaults around `common` (for the all-in-one process).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            node_timeout_seconds: 30,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("the default gRPC address parses"),
            grpc_tls: ServerTls::default(),
            max_event_bytes: 64 * 1024,
        }
    }

    /// Where the RocksDB store lives: `<data dir>/registry`.
    pub fn store_path(&self) -> PathBuf {
        self.common.data_dir.join("registry")
    }

    /// How long a node may stay silent.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_secs(self.node_timeout_seconds)
    }
}

/// Settings tests use; production leaves them empty.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Called by the workload runner after each commit, before the ack and
    /// before the KV writes: a failpoint where a crash hurts most.
    pub after_commit: Option<CommitHook>,
}

/// Opens the ingest store at `path` (creating it).
pub fn open_store(path: &std::path::Path) -> anyhow::Result<RocksStore> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    RocksStore::open(path, TABLES).with_context(|| format!("opening the ingest store at {}", path.display()))
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
/// projections, the KV writer, the liveness monitor and the gRPC API.
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
    let metrics = metrics::Metrics::default();
    health.register(|registry| metrics.register(registry));
    let registry_live = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(service::Shared {
        js: js.clone(),
        store: Arc::clone(&store),
        metrics: metrics.clone(),
        max_event_bytes: usize::try_from(config.max_event_bytes).unwrap_or(usize::MAX),
        registry_live: Arc::clone(&registry_live),
        ready,
        options,
    });
    let monitor = liveness::Monitor {
        js,
        store: Arc::clone(&store),
        heartbeat_durable: HEARTBEATS_DURABLE.to_owned(),
        timeout: config.node_timeout(),
        registry_live,
        metrics,
    };

    let listener_addr = listener.addr().clone();
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(service::serve_api(listener, store, stopping.clone()));
    tasks.spawn(service::workloads(Arc::clone(&shared), stopping.clone()));
    tasks.spawn(service::heartbeats(shared, stopping.clone()));
    tasks.spawn(monitor.run(stopping));
    tracing::info!(
        message = "Service started.",
        service = NAME,
        cluster = %config.common.cluster,
        grpc_addr = %listener_addr,
        node_timeout_seconds = config.node_timeout_seconds
    );

    let result = cnnf_service::run_parts(tasks, stop, shutdown).await;
    tracing::info!(message = "Service stopped.", service = NAME);
    result
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_match_the_all_in_one_constructor() {
        let parsed = Config::try_parse_from(["cnnf-ingest"]).unwrap();
        let built = Config::new(parsed.common.clone());
        assert_eq!(parsed.node_timeout_seconds, built.node_timeout_seconds);
        assert_eq!(parsed.grpc_addr, built.grpc_addr);
        assert_eq!(parsed.max_event_bytes, built.max_event_bytes);
        assert_eq!(parsed.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert!(!parsed.grpc_tls.grpc_insecure);
    }

    #[test]
    fn bad_flags_are_refused_with_their_name() {
        for (flag, value) in [
            ("--node-timeout-seconds", "0"),
            ("--node-timeout-seconds", "-3"),
            ("--node-timeout-seconds", "soon"),
            ("--grpc-addr", "localhost"),
            ("--max-event-bytes", "10"),
        ] {
            let argument = format!("{flag}={value}");
            let error = Config::try_parse_from(["cnnf-ingest", &argument])
                .unwrap_err()
                .to_string();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }
}
