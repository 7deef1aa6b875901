//! `cnnf-allinone`: the ingest, modeler, policy and audit services and the
//! operator gateway in one process, sharing one configuration and one `/metrics` + `/ready`
//! endpoint. Meant for a single node and the demo; a fleet runs the
//! services as separate processes that scale out independently.
//!
//! Each service listens on the address the gateway is told to reach it at
//! (`--ingest-addr`, `--modeler-addr`, `--policy-addr`, `--audit-addr`), so
//! one set of flags places them and the gateway cannot disagree with them.
//!
//! The policy service keeps its data under `<data dir>/policy`, so its
//! table-signing key is `<data dir>/policy/table-signing.key` (public key
//! `table-signing.pub` beside it, for the agents) unless
//! `--table-signing-key` names one.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use cnnf_service::{CommonConfig, Health};
use futures::FutureExt;

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9105";

/// Configuration of the all-in-one process.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cnnf-allinone", version, about = "All CNNF services in one process")]
pub struct Config {
    /// Settings every service shares (NATS, cluster, data directory, metrics address).
    #[command(flatten)]
    pub common: CommonConfig,
    /// The gateway's settings; its backend addresses are where the services listen.
    #[command(flatten)]
    pub gateway: cnnf_gateway::Settings,
    /// The policy service's table-signing key (see `cnnf-policy
    /// --table-signing-key`); default `<data dir>/policy/table-signing.key`,
    /// generated at the first start.
    #[arg(long, env = "CNNF_TABLE_SIGNING_KEY")]
    pub table_signing_key: Option<PathBuf>,
}

impl Config {
    /// The policy service's configuration as this process runs it.
    pub fn policy(&self) -> anyhow::Result<cnnf_policy::Config> {
        let mut common = self.common.clone();
        common.data_dir = common.data_dir.join("policy");
        Ok(cnnf_policy::Config {
            grpc_addr: self.gateway.policy_addr.parse().with_context(|| {
                format!(
                    "--policy-addr {:?}: the all-in-one listens there, so it must be an IP:port",
                    self.gateway.policy_addr
                )
            })?,
            table_signing_key: self.table_signing_key.clone(),
            ..cnnf_policy::Config::new(common)
        })
    }
}

/// Runs the four services and the gateway until `shutdown`; the first to fail stops them all.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shutdown = shutdown.shared();
    let policy = config.policy()?;
    let common = config.common;
    let with_data = |service: &str| {
        let mut common = common.clone();
        common.data_dir = common.data_dir.join(service);
        common
    };
    let listen = |flag: &str, addr: &str| -> anyhow::Result<SocketAddr> {
        addr.parse()
            .with_context(|| format!("--{flag} {addr:?}: the all-in-one listens there, so it must be an IP:port"))
    };
    let ingest = cnnf_ingest::Config {
        grpc_addr: listen("ingest-addr", &config.gateway.ingest_addr)?,
        ..cnnf_ingest::Config::new(with_data("ingest"))
    };
    let modeler = cnnf_modeler::Config {
        grpc_addr: listen("modeler-addr", &config.gateway.modeler_addr)?,
        ..cnnf_modeler::Config::new(with_data("modeler"))
    };
    let audit = cnnf_audit::Config {
        grpc_addr: listen("audit-addr", &config.gateway.audit_addr)?,
        ..cnnf_audit::Config::new(with_data("audit"))
    };
    tokio::try_join!(
        cnnf_ingest::run(ingest, health.clone(), shutdown.clone()),
        cnnf_modeler::run(modeler, health.clone(), shutdown.clone()),
        cnnf_policy::run(policy, health.clone(), shutdown.clone()),
        cnnf_audit::run(audit, health.clone(), shutdown.clone()),
        cnnf_gateway::run(
            cnnf_gateway::Config {
                common: common.clone(),
                gateway: config.gateway,
            },
            health.clone(),
            shutdown.clone()
        ),
    )?;
    Ok(())
}
