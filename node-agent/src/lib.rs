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
//! persisted last is loaded, the queues bound and the chains installed (or
//! adopted) before the first network call; NATS is connected in the
//! background. Shutdown stops the queues and leaves the chains in place,
//! so the node stays enforced through a restart or an upgrade: with
//! `--fail-mode closed` the kernel drops the SYNs nobody reads, with
//! `open` it lets them pass (both counted at the next start from the
//! chains' counters, which the stopping agent writes to its state
//! directory). Then the last decisions are aggregated and spooled, and the
//! sender is given a few seconds to drain. Only `--remove-chains`
//! ([`uninstall`]) takes the chains out.
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
pub mod interfaces;
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

pub use config::{Config, FailMode, QueueFull};

use crate::dataplane::chains::{self, ChainConfig, Chains};
use crate::dataplane::queue::{QueueConfig, QueueOptions, QueueSet};
use crate::decisions::Ring;
use crate::engine::Engine;
use crate::events::{Events, PublisherSettings};
use crate::identities::Identities;
use crate::interfaces::WorkloadInterfaces;
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

/// File in the state directory where a stopping agent leaves what its
/// chains had counted, so the next start can tell how many SYNs matched
/// while no agent read the queues.
pub const STOPPED_COUNTERS_FILE: &str = "stopped-chain-counters";

/// Removes the agent's chains (`--chain-prefix`, IPv4 and IPv6), as
/// `--remove-chains` does: the one way to take enforcement off a node.
pub fn uninstall(config: &Config) -> anyhow::Result<()> {
    chains::remove_prefix(&config.chain_prefix)
        .with_context(|| format!("removing the iptables chains of prefix {}", config.chain_prefix))?;
    tracing::info!(message = "Chains removed.", prefix = %config.chain_prefix);
    Ok(())
}

/// What the chains had counted when an agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StoppedCounters {
    queued: u64,
    fail_open: bool,
}

impl StoppedCounters {
    fn encode(&self) -> String {
        format!("queued {}\nfail_open {}\n", self.queued, self.fail_open)
    }

    fn decode(text: &str) -> Option<StoppedCounters> {
        let mut queued = None;
        let mut fail_open = None;
        for line in text.lines() {
            match line.split_once(' ')? {
                ("queued", value) => queued = value.parse().ok(),
                ("fail_open", value) => fail_open = value.parse().ok(),
                _ => {}
            }
        }
        Some(StoppedCounters {
            queued: queued?,
            fail_open: fail_open?,
        })
    }
}

/// The last values of the kernel counters the metrics follow.
#[derive(Debug, Default)]
struct Sampled {
    queued: u64,
    rate_limited: u64,
    bypassed: u64,
}

/// The running data plane: queues and chains. Stopping stops the queues
/// and leaves the chains.
struct Dataplane {
    chains: Arc<Mutex<Option<Chains>>>,
    queues: Arc<Mutex<Option<QueueSet>>>,
    interfaces: Arc<WorkloadInterfaces>,
    fail_open: bool,
    state_dir: PathBuf,
    sampled: Mutex<Sampled>,
}

impl Dataplane {
    fn start(config: &Config, engine: Arc<Engine>, metrics: &Metrics) -> anyhow::Result<Self> {
        let state_dir = config.common.data_dir.clone();
        count_unread_syns(&config.chain_prefix, &state_dir, metrics);
        let (first, count) = config.queues();
        let last = first + (count - 1);
        let interfaces = Arc::clone(engine.interfaces());
        // Bind the queues before any rule sends SYNs to them.
        let queues = QueueSet::start_with(
            QueueConfig {
                queues: first..=last,
                ..QueueConfig::default()
            },
            QueueOptions {
                fail_open_when_full: engine.fail_open_when_full(),
                ..QueueOptions::default()
            },
            engine,
        )
        .context("starting the NFQUEUE verdict threads")?;
        let fail_open = config.fail_mode == FailMode::Open;
        let chains = Chains::install(ChainConfig {
            prefix: config.chain_prefix.clone(),
            queues: first..=last,
            fail_open,
            hooks: config.hooks(),
            syn_rate_per_source: config.syn_rate_per_source,
            syn_burst_per_source: config.syn_burst_per_source,
        })
        .context("installing the iptables chains")?;
        Ok(Self {
            chains: Arc::new(Mutex::new(Some(chains))),
            queues: Arc::new(Mutex::new(Some(queues))),
            interfaces,
            fail_open,
            state_dir,
            sampled: Mutex::new(Sampled::default()),
        })
    }

    /// The sink the workloads task writes address and interface sets to:
    /// the engine's interface map first, then the chains.
    fn address_sink(&self) -> workloads::AddressSink {
        let chains = Arc::clone(&self.chains);
        let interfaces = Arc::clone(&self.interfaces);
        Box::new(
            move |addresses: &BTreeSet<IpAddr>, by_interface: &interfaces::InterfaceAddresses| {
                interfaces.set(by_interface.clone());
                let names: BTreeSet<String> = by_interface.keys().cloned().collect();
                let mut guard = chains.lock().unwrap_or_else(PoisonError::into_inner);
                match guard.as_mut() {
                    Some(chains) => Ok(chains.set_workloads(addresses, &names)?),
                    None => Ok(()),
                }
            },
        )
    }

    fn sample(&self, metrics: &Metrics) {
        self.interfaces.refresh();
        // Order matters for the bypass count: the chain's counter first,
        // then the kernel's queue counters, then the verdicts (`stats`
        // reads the kernel file before the threads' counters). A SYN the
        // rule counted has, by the later reads, been queued (in the queue,
        // dropped by the kernel, or given a verdict) or bypassed, so the
        // difference never counts a SYN that was answered.
        let counters = {
            let guard = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(chains) = guard.as_ref() else {
                return;
            };
            match chains.counters() {
                Ok(counters) => Some(counters),
                Err(error) => {
                    tracing::warn!(message = "Chain counters not read.", %error);
                    None
                }
            }
        };
        let guard = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(queues) = guard.as_ref() else {
            return;
        };
        let stats = queues.stats();
        if let Some(counters) = counters {
            let total = stats.total();
            let kernel = total.kernel.unwrap_or_default();
            let answered = total.packets + kernel.queue_total + kernel.queue_dropped + kernel.user_dropped;
            let mut sampled = self.sampled.lock().unwrap_or_else(PoisonError::into_inner);
            metrics.syn_queued.inc_by(growth(&mut sampled.queued, counters.queued));
            metrics
                .syn_rate_limited
                .inc_by(growth(&mut sampled.rate_limited, counters.rate_limited));
            let unanswered = counters.queued.saturating_sub(answered);
            if unanswered > sampled.bypassed {
                metrics.syn_bypassed.inc_by(unanswered - sampled.bypassed);
                sampled.bypassed = unanswered;
            }
        }
        for stat in stats.queues {
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
            metrics
                .queue_fail_open
                .get_or_create(&labels)
                .set(i64::from(stat.fail_open_when_full));
        }
    }

    /// Stops the queues and leaves the chains: from now on the kernel
    /// drops (fail-closed) or passes (fail-open) the SYNs they queue. What
    /// the chains counted so far is written to the state directory, so the
    /// next start counts the SYNs that matched in between.
    fn stop(&self) {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(queues) = queues {
            queues.stop();
        }
        let chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(chains) = chains else {
            return;
        };
        let stopped = match chains.counters() {
            Ok(counters) => StoppedCounters {
                queued: counters.queued,
                fail_open: self.fail_open,
            },
            Err(error) => {
                tracing::warn!(message = "Chain counters not read at stop.", %error);
                return;
            }
        };
        let path = self.state_dir.join(STOPPED_COUNTERS_FILE);
        if let Err(error) = tables::persist(&path, stopped.encode().as_bytes()) {
            tracing::warn!(message = "Chain counters not saved at stop.", path = %path.display(), %error);
        }
        tracing::info!(
            message = "Queues stopped; chains left in place.",
            prefix = %chains.config().prefix,
            fail_open = self.fail_open
        );
    }
}

/// Raises `last` to `now` and returns by how much it grew; a counter that
/// went back (the chain was written anew) grew by all of `now`.
fn growth(last: &mut u64, now: u64) -> u64 {
    let grown = if now >= *last { now - *last } else { now };
    *last = now;
    grown
}

/// Counts the SYNs the chains queued since the previous agent stopped
/// cleanly (bypassed with fail-open, dropped by the kernel with
/// fail-closed), from what it left in the state directory and the chains'
/// counters now. After a crash, or if the chains were written anew in
/// between, nothing is counted.
fn count_unread_syns(prefix: &str, state_dir: &std::path::Path, metrics: &Metrics) {
    let path = state_dir.join(STOPPED_COUNTERS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let _ = std::fs::remove_file(&path);
    let Some(stopped) = StoppedCounters::decode(&text) else {
        tracing::warn!(message = "Unreadable chain counters of the last stop ignored.", path = %path.display());
        return;
    };
    let now = match chains::counters_of(prefix) {
        Ok(counters) => counters.queued,
        Err(error) => {
            tracing::warn!(message = "Chain counters not read at start.", %error);
            return;
        }
    };
    if now < stopped.queued {
        return;
    }
    let unread = now - stopped.queued;
    if stopped.fail_open {
        metrics.syn_bypassed.inc_by(unread);
    } else {
        metrics.syn_unread_dropped.inc_by(unread);
    }
    tracing::info!(
        message = "SYNs matched while no agent read the queues.",
        syns = unread,
        outcome = if stopped.fail_open { "bypassed" } else { "dropped" }
    );
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.validate()?;
    if config.remove_chains {
        return tokio::task::spawn_blocking(move || uninstall(&config)).await?;
    }
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
    let engine = Arc::new(
        Engine::new(
            Arc::clone(&tables),
            Arc::clone(&identities),
            ring,
            metrics.clone(),
            config.fail_mode == FailMode::Closed,
        )
        .with_queue_full(config.queue_full),
    );
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
        let metrics = metrics.clone();
        Some(Arc::new(
            tokio::task::spawn_blocking(move || Dataplane::start(&config, engine, &metrics)).await??,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_counters_round_trip_and_bad_files_are_refused() {
        let stopped = StoppedCounters {
            queued: 42,
            fail_open: false,
        };
        assert_eq!(StoppedCounters::decode(&stopped.encode()), Some(stopped));
        assert_eq!(StoppedCounters::decode("queued 1\n"), None);
        assert_eq!(StoppedCounters::decode("queued x\nfail_open true\n"), None);
        assert_eq!(StoppedCounters::decode(""), None);
    }

    #[test]
    fn growth_follows_a_counter_through_a_reset() {
        let mut last = 0;
        assert_eq!(growth(&mut last, 10), 10);
        assert_eq!(growth(&mut last, 15), 5);
        assert_eq!(growth(&mut last, 3), 3, "written anew: all of it is new");
        assert_eq!(last, 3);
    }
}
