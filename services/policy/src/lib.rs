//! The CNNF policy service: network objects, rules and modes; conflict
//! detection; compiled verdict tables for the agents.
//!
//! ```text
//! gRPC Policy.Apply / Import ─► checked at the caller's revision ─► conflicts (warnings)
//!        │  publish with Nats-Expected-Last-Subject-Sequence (optimistic concurrency)
//!        ▼
//! cnnf.policy.<cluster>.<kind> ─► runner policy-policy ─► objects, rules, modes ──┐
//! cnnf.model.<image>           ─► runner policy-models ─► models, learned ────────┤ marks (after commit)
//! cnnf.workload.<cluster>.<n>  ─► runner policy-workloads ─► containers per node ─┤
//!                                                                                   ▼
//!                          compiler: one VerdictTable per affected node ─► KV cnnf-verdicts <cluster>.<node>
//! ```
//!
//! - The log is the truth: a write is valid when it is checked, but it
//!   takes effect when the policy runner applies it from `CNNF_POLICY`
//!   (checking it again, so a bad event from elsewhere is dead-lettered).
//! - Every write is based on a revision and refused if the policy moved
//!   ([`api`]): no lost updates between operators.
//! - The compiler ([`compile`], [`verdicts`]) recompiles only the nodes an
//!   applied change affects, and only from committed state.
//! - Export and import ([`document`]): JSON of schema `cnnf.policy/v1`
//!   (docs/policy-json.md), and Kubernetes NetworkPolicy YAML of the
//!   learned policy.
//!
//! Configuration (flags, or the environment), beside what every service
//! takes (`CNNF_NATS_URL`, `CNNF_CLUSTER`, `CNNF_DATA_DIR`, ...):
//!
//! | flag | environment | default | |
//! | --- | --- | --- | --- |
//! | `--grpc-addr` | `CNNF_GRPC_ADDR` | unix:/run/cnnf/policy.sock | the `Policy` API: `unix:<path>`, or `<ip>:<port>` with mutual TLS (`--grpc-tls-cert`, `--grpc-tls-key`, `--grpc-client-ca`; see `cnnf_service::grpc`) |
//! | `--table-signing-key` | `CNNF_TABLE_SIGNING_KEY` | `<data dir>/table-signing.key` | ed25519 key signing every verdict table |
//!
//! Every table put in the bucket is signed (`cnnf-signing`); agents enforce
//! only tables signed by a key they trust. Without `--table-signing-key`
//! the key is `<data dir>/table-signing.key`, generated at the first start
//! with its public key beside it (`table-signing.pub`: what agents are
//! given with `--table-keys`); a key named by the flag must exist.
//!
//! The store is RocksDB at `<data dir>/policy`. Counters are on `/metrics`
//! as `cnnf_policy_{policy,models,workloads}_*` and `cnnf_policy_table*`.
//!
//! Must never depend on the node agent or on another service.

#![forbid(unsafe_code)]

pub mod api;
pub mod compile;
pub mod conflicts;
pub mod document;
pub mod policy;
pub mod projection;
pub mod service;
pub mod store;
pub mod verdicts;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use cnnf_bus::runner::CommitHook;
use cnnf_core::subjects::Token;
use cnnf_proto::v1::policy_server::PolicyServer;
use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use cnnf_store::ProjectionStore;
use cnnf_store_rocksdb::RocksStore;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use service::{MODELS_DURABLE, POLICY_DURABLE, WORKLOADS_DURABLE};
pub use store::TABLES;

/// The service's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-policy";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9103";

/// Default address of the `Policy` gRPC API.
pub const DEFAULT_GRPC_ADDR: &str = "unix:/run/cnnf/policy.sock";

/// File name of the default table-signing key inside the data directory
/// (its public key is beside it as `table-signing.pub`).
pub const SIGNING_KEY_FILE: &str = "table-signing.key";

/// Configuration of the policy service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cnnf-policy",
    version,
    about = "CNNF policy service: network objects, rules and modes; conflict detection; compiled verdict tables for the agents"
)]
pub struct Config {
    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// Address of the Policy gRPC API.
    #[arg(long, env = "CNNF_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: GrpcAddr,
    /// How the gRPC API is protected on TCP (mutual TLS, or `--grpc-insecure`).
    #[command(flatten)]
    pub grpc_tls: ServerTls,
    /// Secret ed25519 key that signs every verdict table (a
    /// `cnnf-ed25519-secret` line; `cnnf-table-key generate` makes one).
    /// Default: `<data dir>/table-signing.key`, generated at the first
    /// start with its public key beside it (`table-signing.pub`).
    #[arg(long, env = "CNNF_TABLE_SIGNING_KEY")]
    pub table_signing_key: Option<PathBuf>,
}

impl Config {
    /// The defaults around `common` (for the all-in-one process).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("the default gRPC address parses"),
            grpc_tls: ServerTls::default(),
            table_signing_key: None,
        }
    }

    /// The secret key file: `--table-signing-key`, else
    /// `<data dir>/table-signing.key`.
    pub fn signing_key_path(&self) -> PathBuf {
        self.table_signing_key
            .clone()
            .unwrap_or_else(|| self.common.data_dir.join(SIGNING_KEY_FILE))
    }

    /// Checks the signing key without creating anything: a key named by
    /// the flag must be readable, a default key must be readable when it
    /// exists (bad values exit with status 64).
    pub fn validate(&self) -> anyhow::Result<()> {
        let path = self.signing_key_path();
        match cnnf_signing::files::read_signing_key(&path) {
            Ok(_) => Ok(()),
            Err(error) if error.is_not_found() && self.table_signing_key.is_none() => Ok(()),
            Err(error) => Err(anyhow::anyhow!("--table-signing-key {error}")),
        }
    }

    /// The signing key: read, or generated at the default path when
    /// absent (true then).
    pub fn signing_key(&self) -> anyhow::Result<(cnnf_signing::SigningKey, bool)> {
        let path = self.signing_key_path();
        let loaded = if self.table_signing_key.is_some() {
            cnnf_signing::files::read_signing_key(&path).map(|key| (key, false))
        } else {
            cnnf_signing::files::load_or_generate(&path)
        };
        loaded.map_err(|error| anyhow::anyhow!("--table-signing-key {error}"))
    }

    /// Where the RocksDB store lives: `<data dir>/policy`.
    pub fn store_path(&self) -> PathBuf {
        self.common.data_dir.join("policy")
    }
}

/// Settings tests use; production leaves them at their defaults.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Called by the policy runner after each commit, before the ack: a
    /// failpoint where a crash hurts most.
    pub policy_after_commit: Option<CommitHook>,
}

/// Now, Unix nanoseconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Opens the policy store at `path` (creating it).
pub fn open_store(path: &std::path::Path) -> anyhow::Result<RocksStore> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    RocksStore::open(path, TABLES).with_context(|| format!("opening the policy store at {}", path.display()))
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
/// runners, the verdict writer and the gRPC API.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn ProjectionStore>,
    health: Health,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ready = health.component(NAME);
    let cluster = Token::new("cluster", &config.common.cluster)?;
    let signing = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || config.signing_key()).await??
    };
    let (key, generated) = signing;
    let key_path = config.signing_key_path();
    let public_path = cnnf_signing::files::public_key_path(&key_path);
    if generated {
        tracing::info!(
            message = "Generated the verdict-table signing key; give its public key to every agent (--table-keys).",
            key_id = %key.id(),
            secret = %key_path.display(),
            public = %public_path.display()
        );
    } else {
        tracing::info!(
            message = "Signing verdict tables.",
            key_id = %key.id(),
            secret = %key_path.display(),
            public = %public_path.display()
        );
    }
    let listener = cnnf_service::grpc::Listener::bind(&config.grpc_addr, &config.grpc_tls).await?;
    let js = cnnf_service::connect_and_ensure(NAME, &config.common).await?;
    let metrics: [cnnf_bus::runner::RunnerMetrics; 3] = Default::default();
    let writer = verdicts::WriterMetrics::default();
    health.register(|registry| {
        for (runner, prefix) in
            metrics
                .iter()
                .zip(["cnnf_policy_policy", "cnnf_policy_models", "cnnf_policy_workloads"])
        {
            runner.register(registry, prefix);
        }
        writer.register(registry);
    });
    let shared = Arc::new(service::Shared {
        js: js.clone(),
        store: Arc::clone(&store),
        cluster: cluster.clone(),
        dirty: Arc::default(),
        metrics,
        writer,
        signing_key: Arc::new(key),
        policy_after_commit: options.policy_after_commit,
    });
    let api = api::PolicyApi::new(Arc::clone(&store), js, cluster);

    let listener_addr = listener.addr().clone();
    let (stop, stopping) = watch::channel(false);
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_api(listener, api, stopping.clone()));
    tasks.spawn(service::runners(Arc::clone(&shared), stopping.clone()));
    tasks.spawn(service::verdict_writer(shared, stopping));
    ready.set(true);
    tracing::info!(
        message = "Service started.",
        service = NAME,
        cluster = %config.common.cluster,
        grpc_addr = %listener_addr
    );
    let result = cnnf_service::run_parts(tasks, stop, shutdown).await;
    tracing::info!(message = "Service stopped.", service = NAME);
    result
}

async fn serve_api(
    listener: cnnf_service::grpc::Listener,
    api: api::PolicyApi,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let addr = listener.addr().clone();
    tracing::info!(message = "Serving the Policy gRPC API.", %addr);
    tonic::transport::Server::builder()
        .add_service(PolicyServer::new(api).max_decoding_message_size(8 * 1024 * 1024))
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
        let parsed = Config::try_parse_from(["cnnf-policy"]).unwrap();
        let built = Config::new(parsed.common.clone());
        assert_eq!(parsed.grpc_addr, built.grpc_addr);
        assert_eq!(parsed.table_signing_key, built.table_signing_key);
        assert_eq!(parsed.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert!(!parsed.grpc_tls.grpc_insecure);
    }

    #[test]
    fn a_bad_grpc_address_is_refused_with_its_flag() {
        let error = Config::try_parse_from(["cnnf-policy", "--grpc-addr=somewhere"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--grpc-addr"), "{error}");
    }

    #[test]
    fn the_default_key_is_generated_once_and_a_named_key_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().to_str().unwrap();
        let config = Config::try_parse_from(["cnnf-policy", "--data-dir", data]).unwrap();
        config.validate().unwrap();
        let (key, generated) = config.signing_key().unwrap();
        assert!(generated);
        let public = cnnf_signing::files::read_public_keys(&dir.path().join("table-signing.pub")).unwrap();
        assert_eq!(public, vec![key.public_key().clone()]);
        let (again, generated) = config.signing_key().unwrap();
        assert!(!generated);
        assert_eq!(again.id(), key.id());

        let missing = dir.path().join("other.key");
        let named = Config::try_parse_from(["cnnf-policy", "--table-signing-key", missing.to_str().unwrap()]).unwrap();
        let error = named.validate().unwrap_err().to_string();
        assert!(
            error.contains("--table-signing-key") && error.contains("other.key"),
            "{error}"
        );
        assert!(named.signing_key().is_err());
        assert!(!missing.exists(), "a named key is never generated");

        std::fs::write(dir.path().join("table-signing.key"), "garbage\n").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("line 1"));
    }
}
