//! `fleet`: a fleet of simulated node agents against the whole control
//! plane, each figure beside a raw baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin fleet -- --agents 1000
//! ```
//!
//! The control plane (ingest, modeler, policy, audit and the gateway) runs
//! in this process (`cnnf_allinone::run`, free ports, a temporary data
//! directory) against the nats-server at `--nats-url` or one started here.
//! Each simulated agent is a few tokio tasks with its own NATS connection
//! (`--agents-per-connection` shares them), a node name, `--workloads`
//! containers (images from a pool of `--images`, one address each), and
//! does what a real agent does on the wire: the same subjects and
//! envelopes, ids `<node>:<boot>:<seq>` as `Nats-Msg-Id` (so JetStream's
//! dedup applies), heartbeats every `--heartbeat-seconds`, workload
//! started/stopped events, decision batches once per `--window-ms`, and a
//! watch on its key of KV `cnnf-verdicts` (`watch_with_history`, like the
//! agent) whose every value is verified (the policy's ed25519 signature,
//! `cnnf-signing`), decoded, checked and compiled with
//! `CompiledTable::build`, older versions ignored. (The agent also persists
//! each table with an fsync; a thousand agents sharing one disk would
//! measure the disk, so the simulator does not.)
//!
//! Phases and figures:
//!
//! 1. start: every agent publishes its workloads; timed until every agent
//!    holds a compiled table (informational).
//! 2. steady: `--seconds` of decisions at `--rate` per second over the
//!    fleet, `--churn` container restarts per second, heartbeats. Projection
//!    lag p50/p99 per durable consumer: from handing a message to JetStream
//!    to the consumer's ack floor covering it (the runners ack after their
//!    store commit), sampled every `--sample-ms`. Baseline: a plain pull
//!    consumer on the same stream acking every message, sampled alike.
//! 3. burst: every agent publishes `--burst-messages` batches of
//!    `--burst-decisions` decisions as fast as its `--in-flight` window
//!    allows. Decisions/s accepted (JetStream acks) and applied end to end
//!    (the slowest of `modeler-flows` and `audit-flows`), per projection
//!    too. Baseline: the same agents publishing the same envelopes to a
//!    scratch stream with nothing consuming it.
//! 4. propagation: `--writes` rule writes through the policy gRPC API
//!    (`Apply`); each timed from the call until every agent holds a table
//!    compiled from that policy revision or later; p50/p99 over the writes.
//!    Baseline: `--writes` rounds of plain KV puts of the same tables, one
//!    key per node in a scratch bucket (signed beforehand by a key of the
//!    simulator's own), each timed until every agent's watcher of that
//!    bucket (same verification, decode, check and compile) holds it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, kv, stream};
use bytes::Bytes;
use clap::Parser;
use cnnf_core::eval::CompiledTable;
use cnnf_core::subjects::{self, Token};
use cnnf_loadtest::results::{Figure, Results};
use cnnf_proto::v1::policy_client::PolicyClient;
use cnnf_proto::v1::{
    decided_by, envelope::Payload, policy_event, ConnectionDecision, DecidedBy, DecisionBatch, Direction, Endpoint,
    Envelope, GetPolicyRequest, Identity, IdentityKind, Mode, NetworkObject, NodeHeartbeat, PolicyCommand, PolicyEvent,
    PortRange, Protocol, Rule, RuleDestination, RuleEffect, Verdict, VerdictTable, Workload, WorkloadStarted,
    WorkloadStopped,
};
use cnnf_signing::PublicKey;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Debug, Parser)]
#[command(about = "A fleet of simulated agents against the whole control plane, against raw baselines")]
struct Args {
    /// Simulated agents (nodes).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Containers per agent.
    #[arg(long, default_value_t = 3)]
    workloads: usize,
    /// Images in the shared pool.
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Peer images each image talks to.
    #[arg(long, default_value_t = 3)]
    peers: usize,
    /// Decisions per second over the whole fleet in the steady phase.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of the steady phase.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// An agent's aggregation window: one decision message per window.
    #[arg(long, default_value_t = 1000)]
    window_ms: u64,
    /// Seconds between an agent's heartbeats.
    #[arg(long, default_value_t = 5)]
    heartbeat_seconds: u64,
    /// Container restarts per second over the fleet in the steady phase.
    #[arg(long, default_value_t = 10)]
    churn: u64,
    /// Decision messages per agent in the burst phase.
    #[arg(long, default_value_t = 10)]
    burst_messages: u64,
    /// Decisions per message in the burst phase.
    #[arg(long, default_value_t = 50)]
    burst_decisions: u64,
    /// Unacknowledged publishes per agent in the burst phase.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Rule writes timed for the policy propagation.
    #[arg(long, default_value_t = 20)]
    writes: usize,
    /// Milliseconds between samples of the consumers' ack floors.
    #[arg(long, default_value_t = 10)]
    sample_ms: u64,
    /// Agents sharing one NATS connection (1: each its own, like real nodes).
    #[arg(long, default_value_t = 1)]
    agents_per_connection: usize,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

const CLUSTER: &str = "fleet";
/// Image objects the rule writes name.
const RULE_OBJECTS: usize = 40;
/// Longest wait for any one thing the run waits on.
const PATIENCE: Duration = Duration::from_secs(600);
/// Longest wait for every agent to hold a table.
const WAIT_ALL: Duration = Duration::from_secs(120);
/// The scratch bucket of the propagation baseline.
const BASELINE_BUCKET: &str = "fleet-baseline";
/// The scratch stream of the burst baseline.
const RAW_STREAM: &str = "FLEET_RAW";

/// The durable consumers whose lag is measured: (stream, durable).
const TRACKED: &[(&str, &str)] = &[
    (cnnf_bus::topology::FLOWS, "modeler-flows"),
    (cnnf_bus::topology::FLOWS, "audit-flows"),
    (cnnf_bus::topology::WORKLOADS, "ingest-workloads"),
    (cnnf_bus::topology::WORKLOADS, "modeler-workloads"),
    (cnnf_bus::topology::WORKLOADS, "policy-workloads"),
    (cnnf_bus::topology::HEARTBEATS, "ingest-heartbeats"),
];

/// The plain consumers of the lag baseline: (stream, durable).
const RAW_CONSUMERS: &[(&str, &str)] = &[
    (cnnf_bus::topology::FLOWS, "fleet-raw-flows"),
    (cnnf_bus::topology::WORKLOADS, "fleet-raw-workloads"),
    (cnnf_bus::topology::HEARTBEATS, "fleet-raw-heartbeats"),
];

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Where every container of the fleet runs and what it talks to.
#[derive(Debug, Clone, Copy)]
struct Layout {
    agents: usize,
    per_agent: usize,
    images: usize,
    peers: usize,
}

impl Layout {
    fn total(&self) -> usize {
        self.agents * self.per_agent
    }

    fn agent_of(&self, workload: usize) -> usize {
        workload / self.per_agent
    }

    fn image_of(&self, workload: usize) -> usize {
        workload % self.images
    }

    /// Workload `workload`'s address (10.0.0.1 onwards).
    fn address(workload: usize) -> String {
        let n = workload + 1;
        format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
    }

    /// The `k`-th container running image `image` (containers of an image
    /// are spread over the fleet).
    fn container_of_image(&self, image: usize, k: usize) -> usize {
        let per_image = (self.total() / self.images).max(1);
        (image + self.images * (k % per_image)) % self.total()
    }
}

fn image_id(image: usize) -> String {
    format!("sha256:{image:064x}")
}

fn image_name(image: usize) -> String {
    format!("registry.example/team-{}/svc-{image}:1.{}", image % 20, image % 7)
}

fn container_id(workload: usize, generation: u32) -> String {
    format!("{workload:056x}{generation:08x}")
}

fn node_name(agent: usize) -> String {
    format!("node-{agent:04}")
}

/// A message handed to JetStream: its stream sequence and when it was sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    sequence: u64,
    at: Instant,
}

/// What the steady phase sent, per stream.
#[derive(Debug, Default)]
struct Recorder {
    on: AtomicBool,
    flows: Mutex<Vec<Sent>>,
    workloads: Mutex<Vec<Sent>>,
    heartbeats: Mutex<Vec<Sent>>,
}

impl Recorder {
    fn record(&self, stream: &str, sent: Sent) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let list = match stream {
            cnnf_bus::topology::FLOWS => &self.flows,
            cnnf_bus::topology::WORKLOADS => &self.workloads,
            _ => &self.heartbeats,
        };
        list.lock().expect("recorder lock").push(sent);
    }

    fn take(&self, stream: &str) -> Vec<Sent> {
        let list = match stream {
            cnnf_bus::topology::FLOWS => &self.flows,
            cnnf_bus::topology::WORKLOADS => &self.workloads,
            _ => &self.heartbeats,
        };
        std::mem::take(&mut *list.lock().expect("recorder lock"))
    }
}

/// A table an agent's watcher took.
#[derive(Debug)]
struct Taken {
    agent: usize,
    policy_revision: u64,
    at: Instant,
}

/// One simulated agent: its identity on the wire and its counters.
struct Agent {
    index: usize,
    node: String,
    js: jetstream::Context,
    boot: String,
    sequence: AtomicU64,
    table_version: Arc<AtomicU64>,
    generations: Mutex<Vec<u32>>,
    decisions_sent: AtomicU64,
    layout: Layout,
}

impl Agent {
    fn next_id(&self) -> String {
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        cnnf_core::ids::agent_event(&self.node, &self.boot, sequence)
    }

    fn subject(&self, stream: &str) -> String {
        let cluster = Token::new("cluster", CLUSTER).expect("valid cluster");
        let node = Token::new("node", &self.node).expect("valid node");
        match stream {
            cnnf_bus::topology::FLOWS => subjects::flow(&cluster, &node),
            cnnf_bus::topology::WORKLOADS => subjects::workload(&cluster, &node),
            _ => subjects::heartbeat(&cluster, &node),
        }
    }

    /// Publishes `payload` on the agent's subject of `stream` (with `prefix`
    /// in front, for the scratch stream), returning the ack to await.
    async fn send(&self, stream: &str, payload: Payload, prefix: Option<&str>) -> anyhow::Result<PublishAckFuture> {
        let id = self.next_id();
        let envelope = Envelope {
            schema_version: cnnf_proto::SCHEMA_VERSION,
            event_id: id.clone(),
            cluster: CLUSTER.into(),
            node: self.node.clone(),
            time_unix_nanos: now_nanos(),
            payload: Some(payload),
            ..Default::default()
        };
        let subject = match prefix {
            Some(prefix) => format!("{prefix}.{}", self.subject(stream)),
            None => self.subject(stream),
        };
        let message = jetstream::message::PublishMessage::build()
            .payload(Bytes::from(cnnf_core::envelope::encode(envelope)))
            .message_id(id);
        Ok(self.js.send_publish(subject, message).await?)
    }

    /// Publishes and waits for the ack; records the sequence.
    async fn publish(&self, stream: &str, payload: Payload, recorder: &Recorder) -> anyhow::Result<()> {
        let at = Instant::now();
        let ack = self.send(stream, payload, None).await?.await?;
        recorder.record(
            stream,
            Sent {
                sequence: ack.sequence,
                at,
            },
        );
        Ok(())
    }

    fn workload(&self, slot: usize, generation: u32) -> Workload {
        let workload = self.index * self.layout.per_agent + slot;
        let image = self.layout.image_of(workload);
        Workload {
            container_id: container_id(workload, generation),
            container_name: format!("svc-{image}-{workload}-{generation}"),
            image_id: image_id(image),
            image_name: image_name(image),
            addresses: vec![Layout::address(workload)],
            labels: [("app".to_owned(), format!("svc-{image}"))].into(),
            cluster: CLUSTER.into(),
            node: self.node.clone(),
            namespace: format!("team-{}", image % 20),
            pod: format!("svc-{image}-{workload:x}-{generation}"),
            interface: String::new(),
        }
    }

    fn identity(&self, workload: usize, generation: u32) -> Identity {
        let image = self.layout.image_of(workload);
        Identity {
            kind: IdentityKind::Image as i32,
            id: image_id(image),
            name: image_name(image),
            container_id: container_id(workload, generation),
            cluster: CLUSTER.into(),
            node: node_name(self.layout.agent_of(workload)),
        }
    }

    /// Message `message` of this agent: `count` decisions of its containers
    /// towards their images' peers; one in a hundred is an alert.
    fn decisions(&self, message: u64, count: u64) -> Payload {
        let layout = self.layout;
        let now = now_nanos();
        let version = self.table_version.load(Ordering::Relaxed);
        let generations = self.generations.lock().expect("generations lock").clone();
        let decisions = (0..count)
            .map(|j| {
                let n = message * count + j;
                let slot = (j as usize) % layout.per_agent;
                let source = self.index * layout.per_agent + slot;
                let source_image = layout.image_of(source);
                let peer = (source_image + 1 + (j as usize / layout.per_agent) % layout.peers) % layout.images;
                let destination = layout.container_of_image(peer, n as usize + self.index);
                let destination_image = layout.image_of(destination);
                let alert = n % 100 == 99;
                ConnectionDecision {
                    source: Some(Endpoint {
                        address: Layout::address(source),
                        port: 32768 + (n % 28000) as u32,
                        identity: Some(self.identity(source, generations[slot])),
                    }),
                    destination: Some(Endpoint {
                        address: Layout::address(destination),
                        port: 8000 + (destination_image % 50) as u32,
                        identity: Some(self.identity(destination, 0)),
                    }),
                    protocol: Protocol::Tcp as i32,
                    direction: Direction::Egress as i32,
                    verdict: if alert { Verdict::Alert } else { Verdict::Learn } as i32,
                    decided_by: Some(DecidedBy {
                        kind: if alert {
                            decided_by::Kind::Mode
                        } else {
                            decided_by::Kind::Model
                        } as i32,
                        rule_id: String::new(),
                        model_image_id: if alert { String::new() } else { image_id(source_image) },
                    }),
                    verdict_table_version: version,
                    mode: if alert { Mode::Alert } else { Mode::Disabled } as i32,
                    first_seen_unix_nanos: now,
                    last_seen_unix_nanos: now,
                    count: 1 + n % 3,
                }
            })
            .collect();
        Payload::Decisions(DecisionBatch {
            decisions,
            overflow_count: 0,
        })
    }
}

/// Watch failures over all agents (each is retried, as the agent does).
static WATCH_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Values that did not decode, check or compile (the agent keeps its table).
static TABLES_REJECTED: AtomicU64 = AtomicU64::new(0);

/// Follows `key` of `bucket` as the agent does and reports every table
/// taken (decoded, checked, compiled, newer than the one held). A failed
/// watch is set up again after a back-off, like the agent's.
async fn follow_tables(
    js: jetstream::Context,
    bucket: &'static str,
    trusted: Arc<[PublicKey]>,
    agent: usize,
    table_version: Arc<AtomicU64>,
    taken: mpsc::UnboundedSender<Taken>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let node = node_name(agent);
    let key = subjects::verdict_key(&Token::new("cluster", CLUSTER)?, &Token::new("node", &node)?);
    let mut held: Option<u64> = None;
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let store = js.get_key_value(bucket).await?;
            let mut entries = store.watch_with_history(&key).await?;
            while let Some(entry) = entries.next().await {
                let entry = entry?;
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                match take(&entry.value, &node, &trusted) {
                    Ok((version, policy_revision)) => {
                        if held.is_some_and(|held| version <= held) {
                            continue;
                        }
                        held = Some(version);
                        table_version.store(version, Ordering::Relaxed);
                        let _ = taken.send(Taken {
                            agent,
                            policy_revision,
                            at: Instant::now(),
                        });
                    }
                    Err(error) => {
                        TABLES_REJECTED.fetch_add(1, Ordering::Relaxed);
                        eprintln!("{key}: table rejected, keeping the one held: {error:#}");
                    }
                }
            }
            anyhow::Ok(())
        };
        let outcome = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            outcome = attempt => outcome,
        };
        WATCH_FAILURES.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => eprintln!("{key}: the watch ended; watching again"),
            Err(error) => eprintln!("{key}: the watch failed; retrying: {error:#}"),
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Verifies, decodes, checks and compiles a table as the agent does: its
/// version and policy revision.
fn take(value: &[u8], node: &str, trusted: &[PublicKey]) -> anyhow::Result<(u64, u64)> {
    let opened = cnnf_signing::open(value, trusted)?;
    let table = VerdictTable::decode(opened.table.as_slice())?;
    anyhow::ensure!(
        (table.cluster.is_empty() || table.cluster == CLUSTER) && (table.node.is_empty() || table.node == node),
        "the table is for {}/{}",
        table.cluster,
        table.node
    );
    let policy_revision = table.policy_revision;
    let compiled = CompiledTable::build(table)?;
    Ok((compiled.version(), policy_revision))
}

/// Which policy revision each agent holds, fed by the watchers.
struct Holdings {
    receiver: mpsc::UnboundedReceiver<Taken>,
    held: Vec<u64>,
}

impl Holdings {
    fn new(agents: usize, receiver: mpsc::UnboundedReceiver<Taken>) -> Self {
        Self {
            receiver,
            held: vec![0; agents],
        }
    }

    /// Takes what arrived so far.
    fn drain(&mut self) {
        while let Ok(taken) = self.receiver.try_recv() {
            self.held[taken.agent] = self.held[taken.agent].max(taken.policy_revision);
        }
    }

    /// Waits until every agent holds a table of `revision` or later; returns
    /// when the last one took it and, per agent, how long after `since`.
    async fn wait_all(&mut self, revision: u64, since: Instant) -> anyhow::Result<(Instant, Vec<Duration>)> {
        let mut missing = self.held.iter().filter(|held| **held < revision).count();
        let mut last = since;
        let mut each = Vec::with_capacity(missing);
        let deadline = tokio::time::Instant::now() + WAIT_ALL;
        while missing > 0 {
            let Ok(taken) = tokio::time::timeout_at(deadline, self.receiver.recv()).await else {
                let names: Vec<String> = (0..self.held.len())
                    .filter(|agent| self.held[*agent] < revision)
                    .take(5)
                    .map(node_name)
                    .collect();
                anyhow::bail!(
                    "{missing} agents (such as {}) held no table of policy revision {revision} after {} s \
                     ({} watch failures, {} tables rejected)",
                    names.join(", "),
                    WAIT_ALL.as_secs(),
                    WATCH_FAILURES.load(Ordering::Relaxed),
                    TABLES_REJECTED.load(Ordering::Relaxed)
                );
            };
            let taken = taken.context("every watcher ended")?;
            let held = &mut self.held[taken.agent];
            if *held < revision && taken.policy_revision >= revision {
                missing -= 1;
                last = last.max(taken.at);
                each.push(taken.at.saturating_duration_since(since));
            }
            *held = (*held).max(taken.policy_revision);
        }
        Ok((last, each))
    }
}

/// Says, for the agents that miss `revision`, what the bucket holds for them:
/// tells a policy service that did not publish from a watch that did not
/// deliver.
async fn describe_missing(js: &jetstream::Context, holdings: &Holdings, revision: u64) {
    let Ok(bucket) = js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET).await else {
        return;
    };
    let Ok(cluster) = Token::new("cluster", CLUSTER) else {
        return;
    };
    for agent in (0..holdings.held.len())
        .filter(|agent| holdings.held[*agent] < revision)
        .take(5)
    {
        let Ok(node) = Token::new("node", &node_name(agent)) else {
            continue;
        };
        let key = subjects::verdict_key(&cluster, &node);
        let held = holdings.held[agent];
        match bucket.entry(&key).await {
            Ok(Some(entry)) => match cnnf_signing::unverified_table(entry.value.as_ref())
                .map_err(anyhow::Error::from)
                .and_then(|table| Ok(VerdictTable::decode(table.as_slice())?))
            {
                Ok(table) => eprintln!(
                    "{key}: the bucket holds version {} of policy revision {} (revision {}); the agent holds policy revision {held}",
                    table.version, table.policy_revision, entry.revision
                ),
                Err(error) => eprintln!("{key}: the bucket holds no table: {error}"),
            },
            Ok(None) => eprintln!("{key}: the bucket holds nothing; the agent holds policy revision {held}"),
            Err(error) => eprintln!("{key}: cannot read the bucket: {error}"),
        }
    }
}

/// Samples a consumer's ack floor every `every` until `stop`.
fn sample_ack_floor(
    js: jetstream::Context,
    stream: &'static str,
    durable: &'static str,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<(Instant, u64)>>> {
    tokio::spawn(async move {
        let stream = js.get_stream(stream).await?;
        let mut samples = Vec::new();
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => return Ok(samples),
                _ = ticker.tick() => {}
            }
            let info = stream
                .consumer_info(durable)
                .await
                .with_context(|| format!("consumer {durable}"))?;
            samples.push((Instant::now(), info.ack_floor.stream_sequence));
        }
    })
}

/// A plain pull consumer acking every message: the lag baseline.
async fn raw_consumer(
    js: jetstream::Context,
    stream: &'static str,
    durable: &'static str,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stream = js.get_stream(stream).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            durable,
            consumer::pull::Config {
                durable_name: Some(durable.into()),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::Explicit,
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.stream().max_messages_per_batch(500).messages().await?;
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            message = messages.next() => message,
        };
        let message = message.context("the raw consumer's stream ended")??;
        message.ack().await.map_err(|error| anyhow::anyhow!(error))?;
    }
}

/// Time from each send to the first sample whose ack floor covers it; and
/// how many were never covered.
fn lags(sent: &[Sent], samples: &[(Instant, u64)]) -> (Vec<Duration>, usize) {
    let mut out = Vec::with_capacity(sent.len());
    let mut missed = 0;
    for sent in sent {
        let index = samples.partition_point(|(_, floor)| *floor < sent.sequence);
        match samples.get(index) {
            Some((at, _)) => out.push(at.saturating_duration_since(sent.at)),
            None => missed += 1,
        }
    }
    out.sort();
    (out, missed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Free loopback addresses for the services.
fn free_addrs(count: usize) -> anyhow::Result<Vec<String>> {
    // All bound at once, so no two are the same.
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut addrs = Vec::with_capacity(count);
    for listener in &listeners {
        addrs.push(listener.local_addr()?.to_string());
    }
    Ok(addrs)
}

/// Waits until `durable`'s ack floor reaches `sequence`.
async fn wait_floor(js: &jetstream::Context, stream: &str, durable: &str, sequence: u64) -> anyhow::Result<Instant> {
    let stream_handle = js.get_stream(stream).await?;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = stream_handle.consumer_info(durable).await?;
        if info.ack_floor.stream_sequence >= sequence {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{durable} reached {} of {sequence}",
            info.ack_floor.stream_sequence
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn last_sequence(js: &jetstream::Context, stream: &str) -> anyhow::Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.last_sequence)
}

/// Applies `change` at the current revision (retrying when another write
/// came in between); returns the new revision.
async fn apply(
    client: &mut PolicyClient<tonic::transport::Channel>,
    change: policy_event::Change,
) -> anyhow::Result<u64> {
    loop {
        let revision = client.get_policy(GetPolicyRequest {}).await?.into_inner().revision;
        let command = PolicyCommand {
            expected_revision: revision,
            change: Some(PolicyEvent {
                revision: 0,
                actor: "fleet".into(),
                change: Some(change.clone()),
            }),
        };
        match client.apply(command).await {
            Ok(result) => return Ok(result.into_inner().revision),
            Err(status) if status.code() == tonic::Code::Aborted => continue,
            Err(status) => anyhow::bail!("Apply refused: {status}"),
        }
    }
}

/// The process's resident set, MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Publishes `messages` decision messages from every agent with at most
/// `in_flight` unacknowledged each (on the scratch stream when `prefix` is
/// given); returns when every ack arrived.
async fn burst(
    agents: &[Arc<Agent>],
    messages: u64,
    decisions: u64,
    in_flight: usize,
    prefix: Option<&'static str>,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for agent in agents {
        let agent = Arc::clone(agent);
        tasks.spawn(async move {
            let mut pending = VecDeque::with_capacity(in_flight);
            for m in 0..messages {
                if pending.len() >= in_flight.max(1) {
                    let ack: PublishAckFuture = pending.pop_front().expect("non-empty");
                    ack.await?;
                }
                let payload = agent.decisions(1_000_000 + m, decisions);
                pending.push_back(agent.send(cnnf_bus::topology::FLOWS, payload, prefix).await?);
            }
            for ack in pending {
                ack.await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.agents >= 1 && args.agents <= 9999,
        "--agents must be between 1 and 9999"
    );
    anyhow::ensure!(
        args.workloads >= 1 && args.images >= 2 && args.peers >= 1,
        "--workloads, --peers must be at least 1 and --images at least 2"
    );
    anyhow::ensure!(
        args.agents * args.workloads < 1 << 24,
        "too many containers for 10.0.0.0/8"
    );
    anyhow::ensure!(
        args.window_ms >= 1 && args.heartbeat_seconds >= 1 && args.sample_ms >= 1,
        "--window-ms, --heartbeat-seconds and --sample-ms must be at least 1"
    );
    let layout = Layout {
        agents: args.agents,
        per_agent: args.workloads,
        images: args.images,
        peers: args.peers.min(args.images - 1),
    };
    let (_server, js, url) = cnnf_loadtest::nats(args.nats_url.as_deref()).await?;
    println!(
        "{} agents x {} containers ({} images, {} peers each), nats-server at {url}",
        args.agents, args.workloads, args.images, layout.peers
    );
    let mut results = Results::new("fleet");

    // The control plane, in this process.
    let data = tempfile::tempdir()?;
    let addrs = free_addrs(1)?;
    let data_dir = data.path().display().to_string();
    let config = <cnnf_allinone::Config as Parser>::try_parse_from([
        "cnnf-allinone",
        "--nats-url",
        &url,
        "--cluster",
        CLUSTER,
        "--data-dir",
        &data_dir,
        "--listen",
        &addrs[0],
    ])?;
    let policy_socket = config.socket("policy");
    let health = cnnf_service::Health::default();
    let (stop_services, services_stopped) = oneshot::channel::<()>();
    let services = tokio::spawn(cnnf_allinone::run(config, health.clone(), async move {
        let _ = services_stopped.await;
    }));
    let started = Instant::now();
    while !health.not_ready().is_empty() {
        if services.is_finished() {
            services.await??;
            anyhow::bail!("the control plane ended before it was ready");
        }
        anyhow::ensure!(started.elapsed() < PATIENCE, "the control plane never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut policy = loop {
        let channel = cnnf_service::grpc::upstream::Upstream::unix(&policy_socket).default_channel();
        let mut client = PolicyClient::new(channel);
        match client.get_policy(GetPolicyRequest {}).await {
            Ok(_) => break client,
            Err(error) => {
                anyhow::ensure!(started.elapsed() < PATIENCE, "the policy API never answered: {error}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    println!("control plane ready in {:.2} s", started.elapsed().as_secs_f64());
    // The simulated agents trust what a real agent would: the policy's
    // public key (written beside its signing key at its start), and the
    // key the baseline signs its tables with.
    let baseline_key = cnnf_signing::SigningKey::generate();
    let policy_key =
        cnnf_signing::files::public_key_path(&data.path().join("policy").join(cnnf_policy::SIGNING_KEY_FILE));
    let trusted: Arc<[PublicKey]> = cnnf_signing::files::read_public_keys(&policy_key)?
        .into_iter()
        .chain([baseline_key.public_key().clone()])
        .collect();

    // The image objects the rules will name.
    let mut revision = 0;
    for object in 0..RULE_OBJECTS.min(args.images) {
        revision = apply(
            &mut policy,
            policy_event::Change::ObjectPut(policy_event::ObjectPut {
                object: Some(NetworkObject {
                    name: format!("svc-{object:03}"),
                    kind: cnnf_proto::v1::network_object::Kind::Image as i32,
                    image_id: image_id(object),
                    ..Default::default()
                }),
            }),
        )
        .await?;
    }

    // The agents.
    let (stop_agents, agents_stopped) = watch::channel(false);
    let (taken_sender, taken_receiver) = mpsc::unbounded_channel();
    let mut holdings = Holdings::new(args.agents, taken_receiver);
    let recorder = Arc::new(Recorder::default());
    let mut background = tokio::task::JoinSet::new();
    let mut agents: Vec<Arc<Agent>> = Vec::with_capacity(args.agents);
    let mut connection = None;
    let boot_base = now_nanos();
    for index in 0..args.agents {
        if index % args.agents_per_connection.max(1) == 0 {
            connection = Some(cnnf_bus::jetstream(async_nats::connect(&url).await?));
        }
        let agent = Arc::new(Agent {
            index,
            node: node_name(index),
            js: connection.clone().expect("connected"),
            boot: format!("{:x}", boot_base.wrapping_add(index as i64)),
            sequence: AtomicU64::new(0),
            table_version: Arc::new(AtomicU64::new(0)),
            generations: Mutex::new(vec![0; args.workloads]),
            decisions_sent: AtomicU64::new(0),
            layout,
        });
        background.spawn(follow_tables(
            agent.js.clone(),
            cnnf_bus::topology::VERDICTS_BUCKET,
            Arc::clone(&trusted),
            index,
            Arc::clone(&agent.table_version),
            taken_sender.clone(),
            agents_stopped.clone(),
        ));
        // Heartbeats, spread over the period.
        let heartbeat_agent = Arc::clone(&agent);
        let heartbeat_recorder = Arc::clone(&recorder);
        let mut stop = agents_stopped.clone();
        let period = Duration::from_secs(args.heartbeat_seconds);
        let offset = period.mul_f64(index as f64 / args.agents as f64);
        background.spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            let mut sequence = 0u64;
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => return anyhow::Ok(()),
                    _ = ticker.tick() => {}
                }
                sequence += 1;
                let payload = Payload::NodeHeartbeat(NodeHeartbeat {
                    boot_id: heartbeat_agent.boot.clone(),
                    sequence,
                    workload_count: heartbeat_agent.layout.per_agent as u32,
                    verdict_table_version: heartbeat_agent.table_version.load(Ordering::Relaxed),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                });
                heartbeat_agent
                    .publish(cnnf_bus::topology::HEARTBEATS, payload, &heartbeat_recorder)
                    .await?;
            }
        });
        agents.push(agent);
    }

    // 1. Start: every agent announces its containers.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for agent in &agents {
        let agent = Arc::clone(agent);
        let recorder = Arc::clone(&recorder);
        tasks.spawn(async move {
            for slot in 0..agent.layout.per_agent {
                let payload = Payload::WorkloadStarted(WorkloadStarted {
                    workload: Some(agent.workload(slot, 0)),
                });
                agent.publish(cnnf_bus::topology::WORKLOADS, payload, &recorder).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let published = started.elapsed();
    if let Err(error) = holdings.wait_all(revision.max(1), started).await {
        describe_missing(&js, &holdings, revision.max(1)).await;
        return Err(error);
    }
    let fleet_ready = started.elapsed();
    println!(
        "start: {} containers announced in {:.2} s; every agent held a compiled table after {:.2} s",
        layout.total(),
        published.as_secs_f64(),
        fleet_ready.as_secs_f64()
    );
    results.push(Figure::lower(
        "fleet start: every agent holds its first table",
        fleet_ready.as_secs_f64(),
        "s",
    ));

    // 2. Steady load: lag per consumer, beside plain consumers.
    let (stop_sampling, sampling_stopped) = watch::channel(false);
    let mut raw_tasks = Vec::new();
    for (stream, durable) in RAW_CONSUMERS {
        raw_tasks.push(tokio::spawn(raw_consumer(
            js.clone(),
            stream,
            durable,
            sampling_stopped.clone(),
        )));
    }
    // Let the plain consumers exist before anything is recorded.
    for (stream, durable) in RAW_CONSUMERS {
        let stream_handle = js.get_stream(*stream).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while stream_handle.consumer_info(*durable).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the plain consumer {durable} never appeared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let every = Duration::from_millis(args.sample_ms);
    let mut samplers = Vec::new();
    for (stream, durable) in TRACKED.iter().chain(RAW_CONSUMERS) {
        samplers.push((
            *stream,
            *durable,
            sample_ack_floor(js.clone(), stream, durable, every, sampling_stopped.clone()),
        ));
    }
    recorder.on.store(true, Ordering::SeqCst);
    let steady_started = Instant::now();
    let steady_end = tokio::time::Instant::now() + Duration::from_secs(args.seconds);
    let window = Duration::from_millis(args.window_ms);
    let per_window = args.rate as f64 * window.as_secs_f64() / args.agents as f64;
    let mut tasks = tokio::task::JoinSet::new();
    for agent in &agents {
        let agent = Arc::clone(agent);
        let recorder = Arc::clone(&recorder);
        let offset = window.mul_f64(agent.index as f64 / args.agents as f64);
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, window);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut owed = 0.0f64;
            let mut message = 0u64;
            loop {
                ticker.tick().await;
                if tokio::time::Instant::now() >= steady_end {
                    return anyhow::Ok(());
                }
                owed += per_window;
                let count = owed.floor() as u64;
                if count == 0 {
                    continue;
                }
                owed -= count as f64;
                agent
                    .publish(cnnf_bus::topology::FLOWS, agent.decisions(message, count), &recorder)
                    .await?;
                agent.decisions_sent.fetch_add(count, Ordering::Relaxed);
                message += 1;
            }
        });
    }
    // Container restarts: the old container stops, a new one takes its address.
    if args.churn > 0 {
        let agents = agents.clone();
        let recorder = Arc::clone(&recorder);
        let churn = args.churn;
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / churn as f64));
            let mut restart = 0usize;
            loop {
                ticker.tick().await;
                if tokio::time::Instant::now() >= steady_end {
                    return anyhow::Ok(());
                }
                let workload = (restart * 7919) % layout.total();
                restart += 1;
                let agent = &agents[layout.agent_of(workload)];
                let slot = workload % layout.per_agent;
                let generation = agent.generations.lock().expect("generations lock")[slot];
                let stopped = Payload::WorkloadStopped(WorkloadStopped {
                    workload: Some(agent.workload(slot, generation)),
                    reason: "restarted".into(),
                });
                agent.publish(cnnf_bus::topology::WORKLOADS, stopped, &recorder).await?;
                agent.generations.lock().expect("generations lock")[slot] = generation + 1;
                let restarted = Payload::WorkloadStarted(WorkloadStarted {
                    workload: Some(agent.workload(slot, generation + 1)),
                });
                agent
                    .publish(cnnf_bus::topology::WORKLOADS, restarted, &recorder)
                    .await?;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    recorder.on.store(false, Ordering::SeqCst);
    let steady = steady_started.elapsed();
    // Let every consumer apply what was sent before the samplers stop.
    let mut drained = Instant::now();
    for (stream, durable) in TRACKED.iter().chain(RAW_CONSUMERS) {
        let last = last_sequence(&js, stream).await?;
        drained = drained.max(wait_floor(&js, stream, durable, last).await?);
    }
    tokio::time::sleep(every * 2).await;
    let _ = stop_sampling.send(true);
    let decisions_sent: u64 = agents
        .iter()
        .map(|agent| agent.decisions_sent.swap(0, Ordering::Relaxed))
        .sum();
    let mut samples = std::collections::HashMap::new();
    for (stream, durable, sampler) in samplers {
        let taken = sampler.await??;
        samples.insert(durable, (stream, taken));
    }
    for task in raw_tasks {
        task.await??;
    }
    for (stream, durable) in RAW_CONSUMERS {
        js.get_stream(*stream).await?.delete_consumer(durable).await?;
    }
    let sent_by_stream = [
        (
            cnnf_bus::topology::FLOWS,
            recorder.take(cnnf_bus::topology::FLOWS),
            "fleet-raw-flows",
        ),
        (
            cnnf_bus::topology::WORKLOADS,
            recorder.take(cnnf_bus::topology::WORKLOADS),
            "fleet-raw-workloads",
        ),
        (
            cnnf_bus::topology::HEARTBEATS,
            recorder.take(cnnf_bus::topology::HEARTBEATS),
            "fleet-raw-heartbeats",
        ),
    ];
    println!(
        "steady: {} decisions in {} messages over {:.1} s ({:.0} decisions/s offered), {} workload events, {} heartbeats; all applied {:.2} s after the load stopped",
        decisions_sent,
        sent_by_stream[0].1.len(),
        steady.as_secs_f64(),
        cnnf_loadtest::rate(decisions_sent, steady),
        sent_by_stream[1].1.len(),
        sent_by_stream[2].1.len(),
        drained.saturating_duration_since(steady_started + steady).as_secs_f64()
    );
    println!(
        "projection lag (publish -> ack floor covers it; sampled every {} ms):",
        args.sample_ms
    );
    for (stream, sent, raw) in &sent_by_stream {
        let (raw_lags, raw_missed) = lags(sent, &samples[raw].1);
        for (_, durable) in TRACKED.iter().filter(|(s, _)| s == stream) {
            let (lag, missed) = lags(sent, &samples[durable].1);
            for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
                let (ours, theirs) = (percentile(&lag, p), percentile(&raw_lags, p));
                println!(
                    "  {durable:<18} {label} {:>9.1} ms   plain pull + ack {label} {:>9.1} ms   ratio {:.2}   ({} messages{})",
                    ms(ours),
                    ms(theirs),
                    ms(ours) / ms(theirs).max(1e-6),
                    lag.len(),
                    if missed + raw_missed > 0 {
                        format!(", {missed} never applied, {raw_missed} never consumed")
                    } else {
                        String::new()
                    }
                );
                results.push(
                    Figure::lower(format!("projection lag {durable} {label}"), ms(ours), "ms")
                        .baseline(format!("plain pull + ack on {stream} {label}"), ms(theirs)),
                );
            }
        }
    }

    // 3. Burst: decisions accepted and applied, beside plain publishes.
    let flows_before = last_sequence(&js, cnnf_bus::topology::FLOWS).await?;
    let burst_decisions = args.agents as u64 * args.burst_messages * args.burst_decisions;
    let started = Instant::now();
    burst(&agents, args.burst_messages, args.burst_decisions, args.in_flight, None).await?;
    let accepted = started.elapsed();
    let flows_last = last_sequence(&js, cnnf_bus::topology::FLOWS).await?;
    anyhow::ensure!(
        flows_last - flows_before == args.agents as u64 * args.burst_messages,
        "the burst stored {} messages, not {}",
        flows_last - flows_before,
        args.agents as u64 * args.burst_messages
    );
    let mut applied = Vec::new();
    for durable in ["modeler-flows", "audit-flows"] {
        let done = wait_floor(&js, cnnf_bus::topology::FLOWS, durable, flows_last).await?;
        applied.push((durable, done.saturating_duration_since(started)));
    }
    let end_to_end = applied.iter().map(|(_, took)| *took).max().unwrap_or_default();

    let _ = js.delete_stream(RAW_STREAM).await;
    js.create_stream(stream::Config {
        name: RAW_STREAM.into(),
        subjects: vec!["fleetraw.>".into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let started = Instant::now();
    burst(
        &agents,
        args.burst_messages,
        args.burst_decisions,
        args.in_flight,
        Some("fleetraw"),
    )
    .await?;
    let raw = started.elapsed();
    js.delete_stream(RAW_STREAM).await?;
    let raw_rate = cnnf_loadtest::rate(burst_decisions, raw);
    println!(
        "burst: {} agents x {} messages x {} decisions ({} decisions), {} in flight per agent",
        args.agents, args.burst_messages, args.burst_decisions, burst_decisions, args.in_flight
    );
    cnnf_loadtest::report(
        "decisions accepted (JetStream acks)",
        cnnf_loadtest::rate(burst_decisions, accepted),
        "plain publish, nothing consuming",
        raw_rate,
    );
    results.push(
        Figure::higher(
            "burst: decisions accepted by JetStream, control plane consuming",
            cnnf_loadtest::rate(burst_decisions, accepted),
            "decisions/s",
        )
        .baseline("plain publish of the same envelopes, nothing consuming", raw_rate),
    );
    cnnf_loadtest::report(
        "decisions applied end to end",
        cnnf_loadtest::rate(burst_decisions, end_to_end),
        "plain publish, nothing consuming",
        raw_rate,
    );
    results.push(
        Figure::higher(
            "burst: decisions applied end to end (modeler and audit)",
            cnnf_loadtest::rate(burst_decisions, end_to_end),
            "decisions/s",
        )
        .baseline("plain publish of the same envelopes, nothing consuming", raw_rate)
        .target("≥ 100k events/s per projection"),
    );
    for (durable, took) in &applied {
        cnnf_loadtest::report(
            &format!("  applied by {durable}"),
            cnnf_loadtest::rate(burst_decisions, *took),
            "plain publish, nothing consuming",
            raw_rate,
        );
        results.push(
            Figure::higher(
                format!("burst: decisions applied by {durable}"),
                cnnf_loadtest::rate(burst_decisions, *took),
                "decisions/s",
            )
            .baseline("plain publish of the same envelopes, nothing consuming", raw_rate)
            .target("≥ 100k events/s"),
        );
    }

    // 4. Policy propagation: rule writes until every agent holds them.
    // Let the burst's model changes reach the tables first.
    let settle = Instant::now();
    for (stream, durable) in [
        (cnnf_bus::topology::MODELS, "modeler-models"),
        (cnnf_bus::topology::MODELS, "policy-models"),
    ] {
        let last = last_sequence(&js, stream).await?;
        wait_floor(&js, stream, durable, last).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    holdings.drain();
    println!("models settled in {:.2} s", settle.elapsed().as_secs_f64());
    let objects = RULE_OBJECTS.min(args.images);
    let mut propagation = Vec::with_capacity(args.writes);
    let mut per_agent = Vec::new();
    for write in 0..args.writes {
        let change = policy_event::Change::RulePut(policy_event::RulePut {
            rule: Some(Rule {
                id: format!("fleet-rule-{write:03}"),
                source: format!("svc-{:03}", write % objects),
                destinations: vec![RuleDestination {
                    object: format!("svc-{:03}", (write + 1) % objects),
                    ports: vec![PortRange {
                        first: 9000 + write as u32,
                        last: 0,
                    }],
                    protocol: Protocol::Tcp as i32,
                    effect: RuleEffect::Unspecified as i32,
                }],
                allow_learned: true,
                effect: RuleEffect::Alert as i32,
                ..Default::default()
            }),
        });
        holdings.drain();
        let started = Instant::now();
        let revision = apply(&mut policy, change).await?;
        let (last, each) = holdings.wait_all(revision, started).await?;
        propagation.push(last.saturating_duration_since(started));
        per_agent.extend(each);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    propagation.sort();
    per_agent.sort();

    // Baseline: plain KV puts of the same tables to watchers doing the same work.
    let verdicts = js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET).await?;
    let cluster = Token::new("cluster", CLUSTER)?;
    let mut tables = Vec::with_capacity(args.agents);
    for agent in &agents {
        let key = subjects::verdict_key(&cluster, &Token::new("node", &agent.node)?);
        let value = verdicts
            .get(&key)
            .await?
            .with_context(|| format!("{key} has no table"))?;
        let table = cnnf_signing::unverified_table(value.as_ref())?;
        tables.push((key, VerdictTable::decode(table.as_slice())?));
    }
    let _ = js.delete_key_value(BASELINE_BUCKET).await;
    let scratch = js
        .create_key_value(kv::Config {
            bucket: BASELINE_BUCKET.into(),
            history: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let (stop_baseline, baseline_stopped) = watch::channel(false);
    let (baseline_sender, baseline_receiver) = mpsc::unbounded_channel();
    let mut baseline_holdings = Holdings::new(args.agents, baseline_receiver);
    let mut baseline_watchers = tokio::task::JoinSet::new();
    for agent in &agents {
        baseline_watchers.spawn(follow_tables(
            agent.js.clone(),
            BASELINE_BUCKET,
            Arc::clone(&trusted),
            agent.index,
            Arc::new(AtomicU64::new(0)),
            baseline_sender.clone(),
            baseline_stopped.clone(),
        ));
    }
    drop(baseline_sender);
    let mut baseline = Vec::with_capacity(args.writes);
    let base_version = tables.iter().map(|(_, table)| table.version).max().unwrap_or(0);
    for round in 1..=args.writes as u64 {
        let values: Vec<(String, Bytes)> = tables
            .iter()
            .map(|(key, table)| {
                let mut table = table.clone();
                table.version = base_version + round;
                table.policy_revision = round;
                (
                    key.clone(),
                    Bytes::from(baseline_key.sign_table_bytes(&table.encode_to_vec())),
                )
            })
            .collect();
        baseline_holdings.drain();
        let started = Instant::now();
        for (key, value) in values {
            scratch.put(&key, value).await?;
        }
        let (last, _) = baseline_holdings.wait_all(round, started).await?;
        baseline.push(last.saturating_duration_since(started));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    baseline.sort();
    let _ = stop_baseline.send(true);
    while let Some(joined) = baseline_watchers.join_next().await {
        joined??;
    }
    js.delete_key_value(BASELINE_BUCKET).await?;
    println!(
        "policy propagation, {} rule writes, {} agents (write -> every agent holds the new table):",
        args.writes, args.agents
    );
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (ours, theirs) = (percentile(&propagation, p), percentile(&baseline, p));
        println!(
            "  {label} {:>9.1} ms   plain KV puts -> every watcher {label} {:>9.1} ms   ratio {:.2}   (per agent {label} {:.1} ms)",
            ms(ours),
            ms(theirs),
            ms(ours) / ms(theirs).max(1e-6),
            ms(percentile(&per_agent, p))
        );
        let mut figure = Figure::lower(format!("policy propagation to every agent {label}"), ms(ours), "ms")
            .baseline(format!("plain KV put per node -> every watcher {label}"), ms(theirs));
        if label == "p99" {
            figure = figure.target("p99 ≤ 1 s (1000 agents)");
        }
        results.push(figure);
    }
    println!(
        "simulator process (control plane and agents): VmRSS {:.0} MiB; {} watch failures (retried), {} tables rejected",
        rss_mib(),
        WATCH_FAILURES.load(Ordering::Relaxed),
        TABLES_REJECTED.load(Ordering::Relaxed)
    );

    let _ = stop_agents.send(true);
    while let Some(joined) = background.join_next().await {
        joined??;
    }
    let _ = stop_services.send(());
    services.await??;
    results.write(args.json.as_deref())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_first_sample_covering_each_message() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let samples = vec![(at(10), 0), (at(20), 2), (at(30), 2), (at(40), 5)];
        let sent = vec![
            Sent { sequence: 1, at: at(5) },
            Sent {
                sequence: 3,
                at: at(15),
            },
            Sent {
                sequence: 5,
                at: at(35),
            },
            Sent {
                sequence: 6,
                at: at(36),
            },
        ];
        let (lags, missed) = lags(&sent, &samples);
        assert_eq!(missed, 1, "sequence 6 is never covered");
        assert_eq!(
            lags,
            vec![
                Duration::from_millis(5),
                Duration::from_millis(15),
                Duration::from_millis(25)
            ]
        );
    }

    #[test]
    fn every_container_of_an_image_runs_that_image() {
        let layout = Layout {
            agents: 10,
            per_agent: 3,
            images: 7,
            peers: 2,
        };
        for image in 0..7 {
            for k in 0..10 {
                let container = layout.container_of_image(image, k);
                assert!(container < layout.total());
                assert_eq!(layout.image_of(container), image);
            }
        }
        assert_eq!(Layout::address(0), "10.0.0.1");
        assert_eq!(Layout::address(255), "10.0.1.0");
    }
}
