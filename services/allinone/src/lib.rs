//! `cnnf-allinone`: the ingest, modeler, policy and audit services and the
//! operator gateway in one process, sharing one configuration and one `/metrics` + `/ready`
//! endpoint. Meant for a single node and the demo; a fleet runs the
//! services as separate processes that scale out independently.
//!
//! Each service listens on the address the gateway is told to reach it at
//! (`--ingest-addr`, `--modeler-addr`, `--policy-addr`, `--audit-addr`), so
//! one set of flags places them and the gateway cannot disagree with them.

use std::future::Future;
use std::net::SocketAddr;

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
}

/// Runs the four services and the gateway until `shutdown`; the first to fail stops them all.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shutdown = shutdown.shared();
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
    let policy = cnnf_policy::Config {
        grpc_addr: listen("policy-addr", &config.gateway.policy_addr)?,
        ..cnnf_policy::Config::new(with_data("policy"))
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
