//! `cnnf-allinone`: the ingest, modeler, policy and audit services and the
//! operator gateway in one process, sharing one configuration and one `/metrics` + `/ready`
//! endpoint. Meant for a single node and the demo; a fleet runs the
//! services as separate processes that scale out independently.
//!
//! The four services listen on Unix sockets in the data directory,
//! `<data-dir>/grpc/<service>.sock` (the directory 0700 when created here,
//! each socket 0600), and the gateway reaches them there: no service gRPC
//! port is open on the network, so the gateway's authentication and roles
//! cannot be bypassed. Only the gateway's operator address (`--listen`) is.
//!
//! The policy service keeps its data under `<data dir>/policy`, so its
//! table-signing key is `<data dir>/policy/table-signing.key` (public key
//! `table-signing.pub` beside it, for the agents) unless
//! `--table-signing-key` names one.

use std::future::Future;
use std::path::{Path, PathBuf};

use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use futures::FutureExt;

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9105";

/// The services, by the name of their socket and data directory.
pub const SERVICES: [&str; 4] = ["ingest", "modeler", "policy", "audit"];

/// Configuration of the all-in-one process.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cnnf-allinone", version, about = "All CNNF services in one process")]
pub struct Config {
    /// Settings every service shares (NATS, cluster, data directory, metrics address).
    #[command(flatten)]
    pub common: CommonConfig,
    /// The gateway's settings (the services' addresses are the sockets in the data directory).
    #[command(flatten)]
    pub gateway: cnnf_gateway::Settings,
    /// The policy service's table-signing key (see `cnnf-policy
    /// --table-signing-key`); default `<data dir>/policy/table-signing.key`,
    /// generated at the first start.
    #[arg(long, env = "CNNF_TABLE_SIGNING_KEY")]
    pub table_signing_key: Option<PathBuf>,
}

impl Config {
    /// The Unix socket `service` (one of [`SERVICES`]) serves its gRPC API on.
    pub fn socket(&self, service: &str) -> PathBuf {
        socket(&self.common.data_dir, service)
    }

    /// The policy service's configuration as this process runs it: data in
    /// `<data dir>/policy`, API on its socket, this process's signing key.
    pub fn policy(&self) -> cnnf_policy::Config {
        let mut common = self.common.clone();
        common.data_dir = common.data_dir.join("policy");
        cnnf_policy::Config {
            grpc_addr: GrpcAddr::Unix(self.socket("policy")),
            grpc_tls: ServerTls::default(),
            table_signing_key: self.table_signing_key.clone(),
            ..cnnf_policy::Config::new(common)
        }
    }

    /// How the gateway reaches the four services: their sockets.
    pub fn upstreams(&self) -> cnnf_gateway::Upstreams {
        let [ingest, modeler, policy, audit] = SERVICES.map(|service| self.socket(service));
        cnnf_gateway::Upstreams::unix(&ingest, &modeler, &policy, &audit)
    }
}

fn socket(data_dir: &Path, service: &str) -> PathBuf {
    data_dir.join("grpc").join(format!("{service}.sock"))
}

/// Runs the four services and the gateway until `shutdown`; the first to fail stops them all.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let shutdown = shutdown.shared();
    let upstreams = config.upstreams();
    let policy = config.policy();
    let common = config.common;
    let with_data = |service: &str| {
        let mut common = common.clone();
        common.data_dir = common.data_dir.join(service);
        common
    };
    let listen = |service: &str| GrpcAddr::Unix(socket(&common.data_dir, service));
    let ingest = cnnf_ingest::Config {
        grpc_addr: listen("ingest"),
        grpc_tls: ServerTls::default(),
        ..cnnf_ingest::Config::new(with_data("ingest"))
    };
    let modeler = cnnf_modeler::Config {
        grpc_addr: listen("modeler"),
        grpc_tls: ServerTls::default(),
        ..cnnf_modeler::Config::new(with_data("modeler"))
    };
    let audit = cnnf_audit::Config {
        grpc_addr: listen("audit"),
        grpc_tls: ServerTls::default(),
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
                upstreams,
            },
            health.clone(),
            shutdown.clone()
        ),
    )?;
    Ok(())
}
