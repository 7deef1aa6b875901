//! Node liveness: a node that stops heartbeating loses its workloads.
//!
//! The heartbeat projection keeps each node's newest heartbeat (by the
//! heartbeat envelope's time). This monitor looks at them periodically;
//! when `now >= last heartbeat + timeout` and that silence was not released
//! yet, it publishes a `NodeGone` envelope on the node's own workload
//! subject `cnnf.workload.<cluster>.<node>`. The registry applies it from
//! the log like any other event, so a replay reproduces it exactly:
//!
//! - event id `ingest:node-gone:<cluster>:<node>:<last heartbeat nanos>`,
//!   so a republication (a crash, two ticks before it was applied) is
//!   dropped by JetStream, and the projection ignores a second `NodeGone`
//!   for a silence it already released;
//! - event time `last heartbeat + timeout`: the holdings end there, a time
//!   derived from the log rather than from when the monitor happened to run.
//!
//! The monitor acts only when both projections have caught up (the
//! heartbeat runner with its stream's last sequence, the registry with
//! the KV reconciled), so a service that was down does not declare the
//! fleet gone on stale state. Nodes that never heartbeated (static
//! inventories, the demo fleet) are never declared gone. Agents and the
//! ingest service compare clocks through event times: keep node clocks
//! synchronised (NTP) well within the timeout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream;
use cnnf_bus::topology::HEARTBEATS;
use cnnf_bus::{OutgoingMessage, Publisher, PublisherConfig};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{envelope::Payload, Envelope, NodeGone};
use cnnf_store::{applied_sequence, ProjectionStore};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::projection::PRODUCER;
use crate::registry::{self, Liveness};

/// The current time, Unix nanoseconds.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// When a node whose newest heartbeat is `last_heartbeat` is gone, if it
/// is gone at `now`: `last_heartbeat + timeout`, never earlier. `None`
/// while it may still be alive, or when the silence was already released
/// (`released` is the last heartbeat of the silence released last).
pub fn gone_at(last_heartbeat: i64, released: Option<i64>, now: i64, timeout: Duration) -> Option<i64> {
    let timeout = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
    let deadline = last_heartbeat.saturating_add(timeout);
    let already = released.is_some_and(|released| released >= last_heartbeat);
    (now >= deadline && !already).then_some(deadline)
}

/// The deterministic id of the `NodeGone` for one silence.
pub fn node_gone_id(cluster: &str, node: &str, last_heartbeat: i64) -> String {
    format!("{PRODUCER}:node-gone:{cluster}:{node}:{last_heartbeat}")
}

/// What the monitor shares with the rest of the service.
pub struct Monitor {
    /// The stream the heartbeats come from.
    pub js: jetstream::Context,
    /// The ingest store.
    pub store: Arc<dyn ProjectionStore>,
    /// Durable name of the heartbeat runner (its applied sequence).
    pub heartbeat_durable: String,
    /// How long a node may stay silent.
    pub timeout: Duration,
    /// Set while the registry is caught up.
    pub registry_live: Arc<AtomicBool>,
    /// Counters.
    pub metrics: Metrics,
}

impl Monitor {
    /// How often the monitor looks: a quarter of the timeout, between
    /// 100 ms and 5 s.
    fn period(&self) -> Duration {
        (self.timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Looks at every node until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut publisher = Publisher::new(self.js.clone(), PublisherConfig::default());
        let mut ticker = tokio::time::interval(self.period());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.check(&mut publisher).await {
                tracing::warn!(message = "Liveness check failed; trying again.", error = %format!("{error:#}"));
            }
        }
    }

    async fn caught_up(&self) -> anyhow::Result<bool> {
        if !self.registry_live.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut stream = self
            .js
            .get_stream(HEARTBEATS)
            .await
            .context("reading the heartbeat stream")?;
        let last = stream
            .info()
            .await
            .context("reading the heartbeat stream")?
            .state
            .last_sequence;
        Ok(applied_sequence(self.store.as_ref(), &self.heartbeat_durable)? >= last)
    }

    /// One look: publishes a `NodeGone` for every node silent too long.
    async fn check(&self, publisher: &mut Publisher) -> anyhow::Result<()> {
        if !self.caught_up().await? {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let (nodes, released) = tokio::task::spawn_blocking(move || {
            Ok::<_, cnnf_store::StoreError>((
                registry::liveness(store.as_ref())?,
                registry::gone_records(store.as_ref())?,
            ))
        })
        .await??;
        let now = now_nanos();
        for node in nodes {
            let key = registry::node_key(&node.cluster, &node.node);
            let released = released.get(&key).map(|record| record.last_heartbeat_unix_nanos);
            let Some(gone) = gone_at(node.last_heartbeat_unix_nanos, released, now, self.timeout) else {
                continue;
            };
            self.declare_gone(publisher, &node, gone).await?;
        }
        publisher.flush().await.context("publishing NodeGone")?;
        Ok(())
    }

    async fn declare_gone(&self, publisher: &mut Publisher, node: &Liveness, gone: i64) -> anyhow::Result<()> {
        let cluster = Token::new("cluster", &node.cluster)?;
        let name = Token::new("node", &node.node)?;
        let store = Arc::clone(&self.store);
        let (cluster_name, node_name) = (node.cluster.clone(), node.node.clone());
        let open = tokio::task::spawn_blocking(move || {
            registry::open_holdings_of_node(store.as_ref(), &cluster_name, &node_name)
        })
        .await??;
        let mut addresses = Vec::with_capacity(open.len());
        let mut containers = Vec::new();
        for holding in &open {
            addresses.push(holding.address.clone());
            let container = holding.decode_workload()?.container_id;
            if !containers.contains(&container) {
                containers.push(container);
            }
        }
        let id = node_gone_id(&node.cluster, &node.node, node.last_heartbeat_unix_nanos);
        tracing::warn!(
            message = "Node stopped heartbeating: declaring it gone.",
            cluster = %cluster,
            node = %name,
            last_heartbeat_unix_nanos = node.last_heartbeat_unix_nanos,
            timeout_seconds = self.timeout.as_secs_f64(),
            addresses = addresses.len(),
            id = %id
        );
        let envelope = Envelope {
            event_id: id.clone(),
            cluster: node.cluster.clone(),
            node: node.node.clone(),
            time_unix_nanos: gone,
            payload: Some(Payload::NodeGone(NodeGone {
                last_heartbeat_unix_nanos: node.last_heartbeat_unix_nanos,
                released_addresses: addresses,
                container_ids: containers,
            })),
            ..Default::default()
        };
        publisher
            .publish(OutgoingMessage::new(
                subjects::workload(&cluster, &name),
                id,
                cnnf_core::envelope::encode(envelope),
            ))
            .await
            .context("publishing NodeGone")?;
        self.metrics.nodes_gone.inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn a_node_is_gone_at_the_timeout_and_not_before() {
        let timeout = Duration::from_secs(30);
        let last = 1_000 * SECOND;
        assert_eq!(gone_at(last, None, last, timeout), None);
        assert_eq!(gone_at(last, None, last + 30 * SECOND - 1, timeout), None);
        assert_eq!(
            gone_at(last, None, last + 30 * SECOND, timeout),
            Some(last + 30 * SECOND)
        );
        // The time of release does not depend on when the monitor looked.
        assert_eq!(
            gone_at(last, None, last + 90 * SECOND, timeout),
            Some(last + 30 * SECOND)
        );
    }

    #[test]
    fn a_silence_is_released_once_and_a_new_one_again() {
        let timeout = Duration::from_secs(2);
        let last = 50 * SECOND;
        let later = last + 10 * SECOND;
        assert_eq!(gone_at(last, Some(last), later, timeout), None);
        assert_eq!(
            gone_at(later, Some(last), later + 2 * SECOND, timeout),
            Some(later + 2 * SECOND)
        );
    }

    #[test]
    fn node_gone_ids_are_deterministic() {
        assert_eq!(node_gone_id("prod", "n1", 42), "ingest:node-gone:prod:n1:42");
    }
}
