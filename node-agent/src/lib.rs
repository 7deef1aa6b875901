//! The CNNF node agent, one per host, running as root.
//!
//! It decides every new TCP connection of the node's workloads and
//! publishes every decision and workload change, and no I/O ever delays a
//! verdict. The parts, and who talks to whom:
//!
//! ```text
//! discovery ──changes──► workloads ──► identities (local map)
//!                           │     └──► iptables chains (addresses queued)
//!                           └──► events ──► spool (disk) ──sender──► JetStream
//! KV cnnf-verdicts ──watch──► tables (ArcSwap, persisted)          ▲
//! KV cnnf-identities ──watch──► identities (fleet map)             │
//! NFQUEUE threads ──► engine: resolve, decide, verdict ──► ring ──► publisher
//!                                                    (aggregation windows)
//! ```
//!
//! - [`dataplane`]: iptables chains, packet decoding and one verdict thread
//!   per queue; asks the [`engine`] for each SYN.
//! - [`engine`]: resolves both ends ([`identities`]), decides with the
//!   core crate's compiled table ([`tables`]), records into the ring
//!   ([`decisions`]). In memory only.
//! - [`events`]: aggregation windows to `DecisionBatch` messages and
//!   workload events, written to the disk spool (`cnnf-spool`) whose sender
//!   drains it to JetStream with deterministic ids: NATS down means events
//!   wait on disk, NATS back means each arrives exactly once.
//! - [`workloads`]: discovery's changes applied to identities, chains and
//!   events.
//! - [`metrics`]: Prometheus metrics on `/metrics`.
//!
//! Start-up order is chosen so enforcement never waits on NATS: the table
//! persisted last is loaded, the chains installed and the queues bound
//! before the first network call; NATS is connected in the background.
//! Shutdown reverses it: chains removed first (no SYN is queued to a
//! queue nobody reads), then the queues stopped, then the last decisions
//! aggregated and spooled, and the sender given a few seconds to drain.
//!
//! Must never depend on RocksDB or any service crate: the agent persists
//! its verdict table and event spool with plain files.

#![forbid(unsafe_code)]

pub mod config;
pub mod dataplane;
pub mod decisions;
pub mod engine;
pub mod events;
pub mod identities;
pub mod metrics;
pub mod tables;
pub mod workloads;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use cnnf_bus::{OutgoingMessage, Publisher, PublisherConfig};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{envelope::Payload, NodeHeartbeat};
use cnnf_service::Health;
use tokio::sync::watch;

pub use config::{Config, FailMode};

use crate::dataplane::chains::{ChainConfig, Chains};
use crate::dataplane::queue::{QueueConfig, QueueOptions, QueueSet};
use crate::decisions::Ring;
use crate::engine::Engine;
use crate::events::{Events, PublisherSettings};
use crate::identities::Identities;
use crate::metrics::{Metrics, QueueLabels};
use crate::tables::Tables;

/// The agent's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-agent";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9100";

/// Subdirectory of the state directory holding the event spool.
pub const SPOOL_DIR: &str = "spool";

/// How long a stopping agent lets the spool's sender deliver what is left.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How often kernel queue counters and the spool depth are sampled.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// The running data plane: chains and queues, stopped in that order.
struct Dataplane {
    chains: Arc<Mutex<Option<Chains>>>,
    queues: Arc<Mutex<Option<QueueSet>>>,
}

impl Dataplane {
    fn start(config: &Config, engine: Arc<Engine>) -> anyhow::Result<Self> {
        let (first, count) = config.queues();
        let last = first + (count - 1);
        // Bind the queues before any rule sends SYNs to them.
        let queues = QueueSet::start_with(
            QueueConfig {
                queues: first..=last,
                ..QueueConfig::default()
            },
            QueueOptions {
                fail_open_when_full: config.fail_mode == FailMode::Open,
                ..QueueOptions::default()
            },
            engine,
        )
        .context("starting the NFQUEUE verdict threads")?;
        let chains = Chains::install(ChainConfig {
            prefix: config.chain_prefix.clone(),
            queues: first..=last,
            fail_open: config.fail_mode == FailMode::Open,
            hooks: config.hooks(),
        })
        .context("installing the iptables chains")?;
        Ok(Self {
            chains: Arc::new(Mutex::new(Some(chains))),
            queues: Arc::new(Mutex::new(Some(queues))),
        })
    }

    /// The sink the workloads task writes address sets to.
    fn address_sink(&self) -> workloads::AddressSink {
        let chains = Arc::clone(&self.chains);
        Box::new(move |addresses: &BTreeSet<IpAddr>| {
            let mut guard = chains.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_mut() {
                Some(chains) => Ok(chains.set_addresses(addresses)?),
                None => Ok(()),
            }
        })
    }

    fn sample(&self, metrics: &Metrics) {
        let guard = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queues) = guard.as_ref() else {
            return;
        };
        for stat in queues.stats().queues {
            let labels = QueueLabels {
                queue: stat.queue.to_string(),
            };
            if let Some(kernel) = stat.kernel {
                metrics
                    .queue_packets
                    .get_or_create(&labels)
                    .set(kernel.id_sequence as i64);
                metrics
                    .queue_dropped
                    .get_or_create(&labels)
                    .set(kernel.queue_dropped as i64);
                metrics
                    .queue_user_dropped
                    .get_or_create(&labels)
                    .set(kernel.user_dropped as i64);
            }
            metrics
                .queue_verdict_errors
                .get_or_create(&labels)
                .set(stat.receive_errors as i64);
        }
    }

    /// Removes the chains, then stops the queues.
    fn stop(&self) {
        let chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(chains) = chains {
            if let Err(error) = chains.remove() {
                tracing::error!(message = "iptables chains not removed.", %error);
            }
        }
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(queues) = queues {
            queues.stop();
        }
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.validate()?;
    let ready = health.component(NAME);
    let cluster = Token::new("cluster", &config.common.cluster)?;
    let node = config.node_name()?;
    let boot_id = uuid::Uuid::new_v4().simple().to_string();
    let metrics = Metrics::default();
    health.register(|registry| metrics.register(registry));
    let state_dir: PathBuf = config.common.data_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;

    // Everything enforcement needs, from local state only.
    let trust = config.table_trust()?;
    let key_ids: Vec<String> = trust.trusted().iter().map(|key| key.id().to_string()).collect();
    tracing::info!(
        message = "Enforcing verdict tables signed by these keys.",
        key_ids = %key_ids.join(",")
    );
    if trust.allows_unsigned() {
        tracing::warn!(
            message = "Unsigned verdict tables are allowed (--allow-unsigned-tables): anyone able to write KV cnnf-verdicts can change this node's enforcement. For labs only.",
            trusted_keys = trust.trusted().len()
        );
    }
    let tables = Arc::new(Tables::load(&state_dir, &cluster, &node, trust, metrics.clone()));
    let identities = Arc::new(Identities::new(metrics.clone()));
    let (ring, ring_receiver) = Ring::new(config.ring_size, metrics.clone());
    let engine = Arc::new(Engine::new(
        Arc::clone(&tables),
        Arc::clone(&identities),
        ring,
        metrics.clone(),
        config.fail_mode == FailMode::Closed,
    ));
    let spool_metrics = cnnf_spool::SpoolMetrics::default();
    health.register(|registry| spool_metrics.register(registry, "cnnf_agent_spool"));
    let spool = cnnf_spool::Spool::open_with_metrics(
        state_dir.join(SPOOL_DIR),
        cnnf_spool::SpoolConfig::default(),
        spool_metrics.clone(),
    )
    .with_context(|| format!("opening the event spool in {}", state_dir.join(SPOOL_DIR).display()))?;
    let spool = cnnf_spool::SpoolHandle::new(spool);
    let events = Arc::new(Events::new(
        cluster.clone(),
        node.clone(),
        boot_id.clone(),
        spool.clone(),
        metrics.clone(),
    ));
    let dataplane = if config.no_dataplane {
        None
    } else {
        let engine = Arc::clone(&engine);
        let config = config.clone();
        Some(Arc::new(
            tokio::task::spawn_blocking(move || Dataplane::start(&config, engine)).await??,
        ))
    };
    ready.set(true);
    tracing::info!(
        message = "Agent started.",
        %cluster,
        %node,
        boot_id = %boot_id,
        table_version = tables.version(),
        dataplane = dataplane.is_some()
    );

    // The network: NATS in the background (the client connects and
    // reconnects on its own).
    // Replies come back under the node's own inbox prefix: its credentials
    // allow it to subscribe to nothing else.
    let nats = cnnf_bus::NatsOptions {
        inbox_prefix: Some(format!("_INBOX_{cluster}.{node}")),
        ..config.common.nats_options()
    };
    let client = cnnf_bus::connect(&config.common.nats_url, NAME, &nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", config.common.nats_url))?;
    let js = cnnf_bus::jetstream(client);
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(tables::watch(
        js.clone(),
        subjects::verdict_key(&cluster, &node),
        format!("agent_verdicts_{cluster}_{node}_{boot_id}"),
        Arc::clone(&tables),
        stop.clone(),
    ));
    tasks.spawn(identities::watch_fleet(
        js.clone(),
        format!("agent_identities_{cluster}_{node}_{boot_id}"),
        Arc::clone(&identities),
        stop.clone(),
    ));
    tasks.spawn(heartbeats(
        js.clone(),
        subjects::heartbeat(&cluster, &node),
        Arc::clone(&events),
        Arc::clone(&tables),
        config.heartbeat_seconds,
        stop.clone(),
    ));
    if let Some(dataplane) = &dataplane {
        let dataplane = Arc::clone(dataplane);
        let metrics = metrics.clone();
        let mut stop = stop.clone();
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval(STATS_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                    _ = ticker.tick() => {}
                }
                let (dataplane, metrics) = (Arc::clone(&dataplane), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || dataplane.sample(&metrics)).await;
            }
        });
    }
    let (workloads_task, discovery_task) = match config.workloads.clone() {
        Some(source) => {
            let (changes_tx, changes_rx) = tokio::sync::mpsc::channel(1024);
            let discovery_metrics = cnnf_discovery::DiscoveryMetrics::default();
            health.register(|registry| discovery_metrics.register(registry, "cnnf_agent_discovery"));
            let mut discovery_stop = stop.clone();
            let discovery = tokio::spawn(cnnf_discovery::watch_with_metrics(
                source,
                changes_tx,
                async move {
                    let _ = discovery_stop.wait_for(|stopped| *stopped).await;
                },
                discovery_metrics,
            ));
            let follow = tokio::spawn(workloads::follow(
                changes_rx,
                Arc::clone(&identities),
                dataplane.as_ref().map(|dataplane| dataplane.address_sink()),
                Arc::clone(&events),
                metrics.clone(),
            ));
            (Some(follow), Some(discovery))
        }
        None => (None, None),
    };
    // The publisher stops after the verdict threads, so it sees their last
    // decisions; the sender after the publisher, so it sends them.
    let (publisher_stop_tx, publisher_stop) = watch::channel(false);
    let publisher = tokio::spawn(events::publish_decisions(
        ring_receiver,
        Arc::clone(&events),
        PublisherSettings {
            window: config.window(),
            max_distinct: config.max_distinct,
            batch_decisions: config.batch_decisions,
        },
        publisher_stop,
    ));
    let (sender_stop_tx, mut sender_stop) = watch::channel(false);
    let sender = {
        let sender = cnnf_spool::Sender::new(spool.clone(), js.clone(), cnnf_spool::SenderConfig::default())?;
        tokio::spawn(sender.run(async move {
            let _ = sender_stop.wait_for(|stopped| *stopped).await;
        }))
    };

    // Run until told to stop, or until discovery fails (bad inventory).
    let mut failure = None;
    tokio::pin!(shutdown);
    let discovery_done = async {
        match discovery_task {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = &mut shutdown => {}
        outcome = discovery_done => {
            let error = match outcome {
                Ok(Ok(())) => anyhow::anyhow!("workload discovery stopped on its own"),
                Ok(Err(error)) => anyhow::Error::from(error).context("workload discovery failed"),
                Err(error) => anyhow::Error::from(error).context("workload discovery panicked"),
            };
            tracing::error!(message = "Workload discovery stopped; stopping the agent.", error = %format!("{error:#}"));
            failure = Some(error);
        }
        Some(joined) = tasks.join_next() => {
            failure = Some(match joined {
                Ok(Ok(())) => anyhow::anyhow!("a part of the agent stopped on its own"),
                Ok(Err(error)) => error,
                Err(error) => error.into(),
            });
        }
    }
    tracing::info!(message = "Agent stopping.");
    stop_tx.send_replace(true);
    if let Some(dataplane) = dataplane {
        tokio::task::spawn_blocking(move || dataplane.stop()).await?;
    }
    if let Some(task) = workloads_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    publisher_stop_tx.send_replace(true);
    publisher.await?;
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while spool.metrics().depth_records.get() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = spool.metrics().depth_records.get();
    if left > 0 {
        tracing::warn!(message = "Events left in the spool for the next start.", events = left);
    }
    sender_stop_tx.send_replace(true);
    sender.await??;
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(error)) = joined {
            tracing::warn!(message = "Agent part failed while stopping.", error = %format!("{error:#}"));
        }
    }
    tracing::info!(message = "Agent stopped.");
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Publishes a heartbeat every `seconds` until `stop` (not spooled: see
/// [`events`]).
async fn heartbeats(
    js: async_nats::jetstream::Context,
    subject: String,
    events: Arc<Events>,
    tables: Arc<Tables>,
    seconds: u64,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(
        js,
        PublisherConfig {
            // A heartbeat not acked within this is stale anyway.
            give_up_after: Some(Duration::from_secs(seconds.max(1) * 3)),
            ..PublisherConfig::default()
        },
    );
    let mut ticker = tokio::time::interval(Duration::from_secs(seconds));
    let mut sequence = 0u64;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            _ = ticker.tick() => {}
        }
        sequence += 1;
        let (_, id) = events.next_id();
        let envelope = events.envelope(
            id.clone(),
            Payload::NodeHeartbeat(NodeHeartbeat {
                boot_id: events.boot_id().to_owned(),
                sequence,
                verdict_table_version: tables.version(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                ..Default::default()
            }),
        );
        let message = OutgoingMessage::new(subject.clone(), id, cnnf_core::envelope::encode(envelope));
        let published = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            published = publisher.publish(message) => published,
        };
        if let Err(error) = published {
            tracing::warn!(message = "Heartbeat not published.", %error);
        }
    }
    if let Err(error) = tokio::time::timeout(Duration::from_secs(2), publisher.flush()).await {
        tracing::warn!(message = "Pending heartbeats not flushed at exit.", %error);
    }
    Ok(())
}
