//! The CNNF node agent, one per host, running as root.
//!
//! Its job is to decide every new TCP connection of the node's workloads
//! (iptables NFQUEUE on SYNs, verdicts from in-memory tables, never waiting
//! on I/O) and to publish every decision and workload change. At this
//! stage it announces itself: a boot id, and a heartbeat on
//! `cnnf.heartbeat.<cluster>.<node>` with ids `<node>:<boot>:<seq>`, which
//! ingest uses for node liveness. Discovery, iptables and the verdict loop
//! arrive with the node-agent issue.
//!
//! Must never depend on RocksDB or any service crate: the agent persists
//! its verdict table and event spool with plain files.

#![forbid(unsafe_code)]

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cnnf_bus::{OutgoingMessage, Publisher, PublisherConfig};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{envelope::Payload, Envelope, NodeHeartbeat};
use cnnf_service::{CommonConfig, Health};

/// The agent's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-agent";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9100";

/// Configuration of the agent.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "cnnf-agent", version, about = "CNNF node agent")]
pub struct Config {
    /// Settings every CNNF process shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// This node's name (default: the host name).
    #[arg(long, env = "CNNF_NODE")]
    pub node: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, env = "CNNF_HEARTBEAT_SECONDS", default_value_t = 5)]
    pub heartbeat_seconds: u64,
}

impl Config {
    /// The node name, from the flag or the host name.
    pub fn node_name(&self) -> anyhow::Result<Token> {
        let name = match &self.node {
            Some(node) => node.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_owned(),
        };
        Ok(Token::new("node", &name)?)
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let ready = health.component(NAME);
    let cluster = Token::new("cluster", &config.common.cluster)?;
    let node = config.node_name()?;
    anyhow::ensure!(config.heartbeat_seconds > 0, "--heartbeat-seconds must be at least 1");
    let boot_id = uuid::Uuid::new_v4().simple().to_string();
    let client = cnnf_bus::connect(&config.common.nats_url, NAME).await?;
    let mut publisher = Publisher::new(cnnf_bus::jetstream(client), PublisherConfig::default());
    let subject = subjects::heartbeat(&cluster, &node);
    ready.set(true);
    tracing::info!(message = "Agent started.", %cluster, %node, boot_id = %boot_id);

    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(config.heartbeat_seconds));
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let id = cnnf_core::ids::agent_event(node.as_str(), &boot_id, sequence);
        let envelope = Envelope {
            event_id: id.clone(),
            cluster: cluster.to_string(),
            node: node.to_string(),
            time_unix_nanos: now_nanos(),
            payload: Some(Payload::NodeHeartbeat(NodeHeartbeat {
                boot_id: boot_id.clone(),
                sequence,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let message = OutgoingMessage::new(subject.clone(), id, cnnf_core::envelope::encode(envelope));
        if let Err(error) = publisher.publish(message).await {
            tracing::warn!(message = "Heartbeat not published.", %error);
        }
    }
    if let Err(error) = tokio::time::timeout(Duration::from_secs(5), publisher.flush()).await {
        tracing::warn!(message = "Pending heartbeats not flushed at exit.", %error);
    }
    Ok(())
}
