//! The agent end to end: real network namespaces standing in for
//! containers, real TCP servers and clients inside them, real iptables and
//! NFQUEUE, a real nats-server.
//!
//! Each test owns a lab subnet `10.199.<k>.0/24` (a cross-process lock), and
//! derives from `k` its chain prefix (`CT<k>`), its queue number
//! (`2000 + k`) and its node name, so tests run in parallel without
//! touching each other's rules or queues.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use cnnf_proto::v1::{
    envelope::Payload, CompiledModel, ConnectionDecision, Envelope, Identity as ProtoIdentity, IdentityKind,
    LearnedConnection, Mode, ModelState, Protocol, Side, Verdict, VerdictTable, Workload,
};
use cnnf_service::Health;
use cnnf_testkit::{FakeContainer, Lab, NatsServer, TcpServerGuard};
use futures::StreamExt;
use prost::Message;

const CLUSTER: &str = "test";
const SERVER_PORT_KNOWN: u16 = 8080;
const SERVER_PORT_UNKNOWN: u16 = 9090;
/// How long a test waits for something that should happen.
const PATIENCE: Duration = Duration::from_secs(30);
/// Connect timeout: long enough for an accepted SYN, short enough that a
/// dropped one (the client retransmits after 1 s) fails quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

fn image_id(i: usize) -> String {
    format!("sha256:{:064x}", i + 1)
}

fn image_name(i: usize) -> String {
    format!("registry.test/app{i}:1")
}

fn image_identity(i: usize) -> ProtoIdentity {
    ProtoIdentity {
        kind: IdentityKind::Image as i32,
        id: image_id(i),
        name: image_name(i),
        ..Default::default()
    }
}

/// One test's world: NATS, a lab, a state directory, names, and the key
/// that signs its tables (the agent trusts it through `--table-keys`).
struct World {
    nats: NatsServer,
    key: cnnf_signing::SigningKey,
    js: jetstream::Context,
    lab: Lab,
    dir: tempfile::TempDir,
    node: String,
    prefix: String,
    queue: u16,
}

impl World {
    /// A NATS server with the topology, and a lab of `containers`, of which
    /// the first `local` are this node's workloads (in the inventory).
    async fn new(containers: usize, local: usize) -> World {
        let nats = NatsServer::start().await;
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
        let lab = tokio::task::spawn_blocking(move || Lab::new(containers).expect("lab (needs root)"))
            .await
            .unwrap();
        let k = lab.index();
        let world = World {
            nats,
            key: cnnf_signing::SigningKey::generate(),
            js,
            dir: tempfile::tempdir().unwrap(),
            node: format!("node-{k}"),
            prefix: format!("CT{k}"),
            queue: 2000 + u16::from(k),
            lab,
        };
        world.write_inventory(local);
        cnnf_signing::files::write_public_key(&world.keys_path(), world.key.public_key()).unwrap();
        world
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.path().join("trusted.pub")
    }

    fn inventory_path(&self) -> PathBuf {
        self.dir.path().join("inventory.json")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Lists the first `local` containers as this node's workloads,
    /// container `i` running image `i`.
    fn write_inventory(&self, local: usize) {
        let workloads: Vec<_> = self.lab.containers()[..local]
            .iter()
            .enumerate()
            .map(|(i, container)| {
                serde_json::json!({
                    "container_id": format!("c{i}"),
                    "container_name": container.name(),
                    "image_id": image_id(i),
                    "image_name": image_name(i),
                    "addresses": [container.ip().to_string()],
                    "interface": container.host_veth(),
                })
            })
            .collect();
        let text = serde_json::json!({ "workloads": workloads }).to_string();
        let temporary = self.dir.path().join("inventory.tmp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, self.inventory_path()).unwrap();
    }

    fn args(&self) -> Vec<String> {
        [
            "cnnf-agent",
            "--nats-url",
            &self.nats.url(),
            "--cluster",
            CLUSTER,
            "--node",
            &self.node,
            "--data-dir",
            self.state_dir().to_str().unwrap(),
            "--workloads",
            &format!("inventory:{}", self.inventory_path().display()),
            "--chain-prefix",
            &self.prefix,
            "--queue-first",
            &self.queue.to_string(),
            "--queue-count",
            "1",
            "--aggregation-ms",
            "200",
            "--table-keys",
            self.keys_path().to_str().unwrap(),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect()
    }

    fn config(&self, extra: &[&str]) -> cnnf_agent::Config {
        let mut args = self.args();
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        <cnnf_agent::Config as clap::Parser>::try_parse_from(args).unwrap()
    }

    fn container(&self, i: usize) -> &FakeContainer {
        self.lab.container(i)
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        self.container(i).ip()
    }

    /// Publishes `table` (version, mode, models) as this node's table,
    /// signed as the policy service signs it.
    async fn publish_table(&self, table: VerdictTable) {
        let kv = self
            .js
            .get_key_value(cnnf_bus::topology::VERDICTS_BUCKET)
            .await
            .unwrap();
        let key = format!("{CLUSTER}.{}", self.node);
        kv.put(key, self.key.sign_table_bytes(&table.encode_to_vec()).into())
            .await
            .unwrap();
    }

    fn table(&self, version: u64, mode: Mode, models: Vec<CompiledModel>) -> VerdictTable {
        VerdictTable {
            version,
            cluster: CLUSTER.into(),
            node: self.node.clone(),
            mode: mode as i32,
            models,
            ..Default::default()
        }
    }

    fn flow_subject(&self) -> String {
        format!("cnnf.flow.{CLUSTER}.{}", self.node)
    }

    /// Every decision envelope on this node's flow subject so far.
    async fn flow_envelopes(&self) -> Vec<Envelope> {
        let stream = self.js.get_stream(cnnf_bus::topology::FLOWS).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.flow_subject(),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = consumer.cached_info().num_pending;
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        for _ in 0..pending {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .expect("stream message")
                .unwrap()
                .unwrap();
            let envelope = Envelope::decode(message.payload.as_ref()).unwrap();
            let msg_id = message
                .headers
                .as_ref()
                .unwrap()
                .get("Nats-Msg-Id")
                .unwrap()
                .to_string();
            assert_eq!(msg_id, envelope.event_id, "message id is the event id");
            out.push(envelope);
        }
        out
    }

    /// The first `count` workload events of this node, as `started <id>` or
    /// `stopped <id>`, checking that they name this node.
    async fn workload_changes(&self, count: usize) -> Vec<String> {
        let stream = self.js.get_stream(cnnf_bus::topology::WORKLOADS).await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: format!("cnnf.workload.{CLUSTER}.{}", self.node),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while out.len() < count {
            let message = tokio::time::timeout(PATIENCE, messages.next())
                .await
                .expect("workload event")
                .unwrap()
                .unwrap();
            let envelope = Envelope::decode(message.payload.as_ref()).unwrap();
            let (kind, workload) = match envelope.payload {
                Some(Payload::WorkloadStarted(started)) => ("started", started.workload.unwrap()),
                Some(Payload::WorkloadStopped(stopped)) => ("stopped", stopped.workload.unwrap()),
                other => panic!("not a workload event: {other:?}"),
            };
            assert_eq!(
                (workload.cluster.as_str(), workload.node.as_str()),
                (CLUSTER, self.node.as_str())
            );
            out.push(format!("{kind} {}", workload.container_id));
        }
        out
    }

    /// Every decision on the flow subject so far, and the overflow counts.
    async fn decisions(&self) -> (Vec<ConnectionDecision>, u64) {
        let mut decisions = Vec::new();
        let mut overflow = 0;
        for envelope in self.flow_envelopes().await {
            assert_eq!(envelope.cluster, CLUSTER);
            assert_eq!(envelope.node, self.node);
            let Some(Payload::Decisions(batch)) = envelope.payload else {
                panic!("not a decision batch: {envelope:?}");
            };
            overflow += batch.overflow_count;
            decisions.extend(batch.decisions);
        }
        (decisions, overflow)
    }

    /// Waits until the decisions on the stream satisfy `done`.
    async fn wait_decisions(
        &self,
        what: &str,
        done: impl Fn(&[ConnectionDecision]) -> bool,
    ) -> Vec<ConnectionDecision> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (decisions, _) = self.decisions().await;
            if done(&decisions) {
                return decisions;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {decisions:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// iptables-save lines of one family that mention the prefix.
    fn rules_of(&self, command: &str) -> Vec<String> {
        let out = Command::new(command).output().unwrap();
        assert!(out.status.success(), "{command} failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains(&format!("{}-", self.prefix)))
            .map(str::to_owned)
            .collect()
    }

    /// iptables-save lines (both families) that mention the prefix.
    fn rules(&self) -> Vec<String> {
        let mut lines = self.rules_of("iptables-save");
        lines.extend(self.rules_of("ip6tables-save"));
        lines
    }

    /// Asserts the rules of a running agent, per family: one jump per hook
    /// and exactly two rules per workload address and hook, none twice.
    fn assert_rules_installed(&self, addresses: &[Ipv4Addr]) {
        for command in ["iptables-save", "ip6tables-save"] {
            let rules = self.rules_of(command);
            let unique: HashSet<_> = rules.iter().collect();
            assert_eq!(unique.len(), rules.len(), "duplicate rules: {rules:#?}");
            for hook in ["FORWARD", "INPUT", "OUTPUT"] {
                let jumps = rules
                    .iter()
                    .filter(|line| line.starts_with(&format!("-A {hook} ")) && line.contains("-j "))
                    .count();
                assert_eq!(jumps, 1, "one {hook} jump in {command}: {rules:#?}");
            }
        }
        let rules = self.rules_of("iptables-save");
        let to_queue = format!("-j {}-SYN", self.prefix);
        for address in addresses {
            let matching = rules
                .iter()
                .filter(|line| line.contains(&format!("{address}/32")) && line.contains(&to_queue))
                .count();
            assert_eq!(
                matching,
                2 * 3,
                "-s and -d rules in each hook chain for {address}: {rules:#?}"
            );
        }
    }

    /// Asserts that a stopped agent left its chains, then removes them as
    /// `--remove-chains` does and checks that nothing is left.
    fn assert_kept_then_removed(&self) {
        assert!(
            self.rules().iter().any(|line| line.contains("NFQUEUE")),
            "a clean exit keeps the chains: {:#?}",
            self.rules()
        );
        cnnf_agent::uninstall(&self.config(&[])).unwrap();
        assert_eq!(self.rules(), Vec::<String>::new(), "--remove-chains leaves nothing");
    }

    /// Listens on `port` in container `i`.
    async fn serve(&self, i: usize, port: u16) -> TcpServerGuard {
        let container = self.container(i).clone();
        tokio::task::spawn_blocking(move || container.tcp_listen(port).unwrap())
            .await
            .unwrap()
    }

    /// One TCP connect from container `from` to container `to`:`port`.
    async fn connect(&self, from: usize, to: usize, port: u16) -> std::io::Result<Duration> {
        let container = self.container(from).clone();
        let destination = SocketAddrV4::new(self.ip(to), port);
        tokio::task::spawn_blocking(move || container.tcp_connect(destination, CONNECT_TIMEOUT))
            .await
            .unwrap()
    }
}

impl Drop for World {
    /// Removes whatever a failed test left of its agent's chains (a passing
    /// test has already checked that none are left).
    fn drop(&mut self) {
        let _ = cnnf_agent::dataplane::chains::remove_prefix(&self.prefix);
    }
}

/// A model of image `i`.
fn model(
    i: usize,
    state: ModelState,
    inbound: Vec<LearnedConnection>,
    outbound: Vec<LearnedConnection>,
) -> CompiledModel {
    CompiledModel {
        image_id: image_id(i),
        state: state as i32,
        inbound,
        outbound,
    }
}

fn learned(side: Side, peer: usize, port: u16) -> LearnedConnection {
    LearnedConnection {
        side: side as i32,
        peer: Some(image_identity(peer)),
        port: u32::from(port),
        protocol: Protocol::Tcp as i32,
        count: 1,
        ..Default::default()
    }
}

/// Images 0 and 1 enforcing, knowing 0 → 1 on `port` only.
fn enforcing_pair(port: u16) -> Vec<CompiledModel> {
    vec![
        model(0, ModelState::Enforcing, vec![], vec![learned(Side::Outbound, 1, port)]),
        model(1, ModelState::Enforcing, vec![learned(Side::Inbound, 0, port)], vec![]),
    ]
}

/// The value of one metric line (`name{labels} value`), 0 if absent.
fn metric(health: &Health, name_and_labels: &str) -> f64 {
    health.metric(name_and_labels).unwrap_or(0.0)
}

async fn wait_metric(health: &Health, name_and_labels: &str, done: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = metric(health, name_and_labels);
        if done(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {name_and_labels} (now {value})\n{}",
            health.encode_metrics()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `server` accepted `count` connections (its accept loop
/// polls), and checks it accepted no more.
async fn wait_accepted(server: &TcpServerGuard, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.accepted() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server accepted {} of {count}",
            server.accepted()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.accepted(), count);
}

/// An agent running in this process.
struct Agent {
    health: Health,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    fn start(config: cnnf_agent::Config) -> Agent {
        let health = Health::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_agent::run(config, health.clone(), async {
            let _ = stopped.await;
        }));
        Agent {
            health,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until the chains queue `addresses` workload addresses and the
    /// table of `version` is in force.
    async fn ready(&self, addresses: usize, version: u64) {
        wait_metric(&self.health, "cnnf_agent_workload_addresses", |v| v == addresses as f64).await;
        wait_metric(&self.health, "cnnf_agent_table_version", |v| v == version as f64).await;
    }

    fn verdicts(&self, verdict: &str, action: &str) -> u64 {
        metric(
            &self.health,
            &format!("cnnf_agent_verdicts_total{{verdict=\"{verdict}\",action=\"{action}\"}}"),
        ) as u64
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap();
    }
}

fn count_where(decisions: &[ConnectionDecision], pred: impl Fn(&ConnectionDecision) -> bool) -> u64 {
    decisions.iter().filter(|d| pred(d)).map(|d| d.count).sum()
}

fn port_of(decision: &ConnectionDecision) -> u32 {
    decision.destination.as_ref().unwrap().port
}

fn verdict_of(decision: &ConnectionDecision) -> Verdict {
    Verdict::try_from(decision.verdict).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learning_model_allows_and_records() {
    let world = World::new(3, 2).await;
    // Image 0's model is learning; image 1 has no model yet (new to the
    // fleet, so learning too). Prevent mode: only learning lets it pass.
    world
        .publish_table(world.table(1, Mode::Prevent, vec![model(0, ModelState::Learning, vec![], vec![])]))
        .await;
    // Container 2 is another node's workload, known from KV identities.
    let remote = Workload {
        container_id: "remote-1".into(),
        image_id: image_id(7),
        image_name: image_name(7),
        addresses: vec![world.ip(2).to_string()],
        cluster: CLUSTER.into(),
        node: "elsewhere".into(),
        ..Default::default()
    };
    let identities = world
        .js
        .get_key_value(cnnf_bus::topology::IDENTITIES_BUCKET)
        .await
        .unwrap();
    identities
        .put(world.ip(2).to_string(), remote.encode_to_vec().into())
        .await
        .unwrap();

    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 1).await;
    wait_metric(&agent.health, "cnnf_agent_identities{source=\"fleet\"}", |v| v == 1.0).await;
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    let _server1 = world.serve(1, SERVER_PORT_UNKNOWN).await;
    let _server2 = world.serve(2, SERVER_PORT_UNKNOWN).await;

    world.connect(0, 1, SERVER_PORT_UNKNOWN).await.expect("learning allows");
    world.connect(0, 2, SERVER_PORT_UNKNOWN).await.expect("learning allows");

    let decisions = world
        .wait_decisions("two learned decisions", |d| {
            count_where(d, |d| verdict_of(d) == Verdict::Learn) >= 2
        })
        .await;
    let local = decisions
        .iter()
        .find(|d| d.destination.as_ref().unwrap().address == world.ip(1).to_string())
        .unwrap();
    assert_eq!(local.source.as_ref().unwrap().address, world.ip(0).to_string());
    let source = local.source.as_ref().unwrap().identity.as_ref().unwrap();
    assert_eq!(source.id, image_id(0));
    assert_eq!(source.container_id, "c0");
    assert_eq!(source.node, world.node);
    assert_eq!(port_of(local), u32::from(SERVER_PORT_UNKNOWN));
    assert_eq!(local.verdict_table_version, 1);
    assert_eq!(local.mode, Mode::Prevent as i32);
    assert_eq!(local.count, 1);
    // Both ends on this node: decided as egress (both sides checked).
    assert_eq!(local.direction, cnnf_proto::v1::Direction::Egress as i32);
    let remote_decision = decisions
        .iter()
        .find(|d| d.destination.as_ref().unwrap().address == world.ip(2).to_string())
        .unwrap();
    let destination = remote_decision.destination.as_ref().unwrap().identity.as_ref().unwrap();
    assert_eq!(destination.id, image_id(7), "resolved from the fleet map");
    assert_eq!(destination.node, "elsewhere");
    assert_eq!(verdict_of(remote_decision), Verdict::Learn);

    agent.stop().await;
    world.assert_kept_then_removed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforcing_model_in_alert_mode_allows_and_alerts() {
    let world = World::new(2, 2).await;
    world
        .publish_table(world.table(3, Mode::Alert, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 3).await;
    let _known = world.serve(1, SERVER_PORT_KNOWN).await;
    let unknown = world.serve(1, SERVER_PORT_UNKNOWN).await;

    world.connect(0, 1, SERVER_PORT_KNOWN).await.expect("known: allowed");
    world
        .connect(0, 1, SERVER_PORT_UNKNOWN)
        .await
        .expect("alert mode allows");
    wait_accepted(&unknown, 1).await;

    let decisions = world
        .wait_decisions("an allow and an alert", |d| {
            count_where(d, |d| verdict_of(d) == Verdict::Alert) == 1
                && count_where(d, |d| verdict_of(d) == Verdict::Allow) == 1
        })
        .await;
    let alert = decisions.iter().find(|d| verdict_of(d) == Verdict::Alert).unwrap();
    assert_eq!(port_of(alert), u32::from(SERVER_PORT_UNKNOWN));
    assert_eq!(
        alert.decided_by.as_ref().unwrap().kind,
        cnnf_proto::v1::decided_by::Kind::Mode as i32
    );
    let allow = decisions.iter().find(|d| verdict_of(d) == Verdict::Allow).unwrap();
    assert_eq!(port_of(allow), u32::from(SERVER_PORT_KNOWN));
    assert_eq!(allow.decided_by.as_ref().unwrap().model_image_id, image_id(0));
    assert_eq!(agent.verdicts("alert", "accept"), 1);

    // Workloads come and go: the chains follow, and each change is an event.
    world.write_inventory(1);
    wait_metric(&agent.health, "cnnf_agent_workload_addresses", |v| v == 1.0).await;
    let rules = world.rules_of("iptables-save");
    assert!(
        !rules.iter().any(|line| line.contains(&format!("{}/32", world.ip(1)))),
        "{rules:#?}"
    );
    world.write_inventory(2);
    wait_metric(&agent.health, "cnnf_agent_workload_addresses", |v| v == 2.0).await;
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    let changes = world.workload_changes(4).await;
    assert_eq!(
        changes,
        ["started c0", "started c1", "stopped c1", "started c1"]
            .map(String::from)
            .to_vec()
    );

    agent.stop().await;
    world.assert_kept_then_removed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prevent_drops_the_unknown_port_and_a_new_table_applies_from_the_next_syn() {
    let world = World::new(2, 2).await;
    world
        .publish_table(world.table(4, Mode::Prevent, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 4).await;
    let known = world.serve(1, SERVER_PORT_KNOWN).await;
    let unknown = world.serve(1, SERVER_PORT_UNKNOWN).await;

    world
        .connect(0, 1, SERVER_PORT_KNOWN)
        .await
        .expect("known port connects");
    let error = world
        .connect(0, 1, SERVER_PORT_UNKNOWN)
        .await
        .expect_err("unknown port is dropped");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "SYN dropped, not refused");
    wait_accepted(&known, 1).await;
    assert_eq!(unknown.accepted(), 0);
    assert!(agent.verdicts("prevent", "drop") >= 1);
    world
        .wait_decisions("a prevent decision", |d| {
            d.iter()
                .any(|d| verdict_of(d) == Verdict::Prevent && port_of(d) == u32::from(SERVER_PORT_UNKNOWN))
        })
        .await;

    // Policy learns the other port: version 5, published to KV, no restart.
    let mut models = enforcing_pair(SERVER_PORT_KNOWN);
    models[0].outbound.push(learned(Side::Outbound, 1, SERVER_PORT_UNKNOWN));
    models[1].inbound.push(learned(Side::Inbound, 0, SERVER_PORT_UNKNOWN));
    world.publish_table(world.table(5, Mode::Prevent, models)).await;
    wait_metric(&agent.health, "cnnf_agent_table_version", |v| v == 5.0).await;
    world
        .connect(0, 1, SERVER_PORT_UNKNOWN)
        .await
        .expect("the next SYN after the swap is allowed");
    wait_accepted(&unknown, 1).await;
    let decisions = world
        .wait_decisions("an allow under version 5", |d| {
            d.iter()
                .any(|d| verdict_of(d) == Verdict::Allow && d.verdict_table_version == 5)
        })
        .await;
    assert!(decisions
        .iter()
        .filter(|d| d.verdict_table_version == 5)
        .all(|d| verdict_of(d) == Verdict::Allow));

    // An older table, and garbage, change nothing.
    world.publish_table(world.table(2, Mode::Alert, vec![])).await;
    let kv = world
        .js
        .get_key_value(cnnf_bus::topology::VERDICTS_BUCKET)
        .await
        .unwrap();
    kv.put(format!("{CLUSTER}.{}", world.node), vec![0xff, 0xff, 0xff].into())
        .await
        .unwrap();
    wait_metric(
        &agent.health,
        "cnnf_agent_table_rejects_total{reason=\"decode\"}",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(metric(&agent.health, "cnnf_agent_table_version"), 5.0);

    agent.stop().await;
    world.assert_kept_then_removed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_enforcement_goes_on_decisions_spool_and_arrive_exactly_once() {
    let mut world = World::new(2, 2).await;
    world
        .publish_table(world.table(6, Mode::Prevent, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 6).await;
    let known = world.serve(1, SERVER_PORT_KNOWN).await;
    let unknown = world.serve(1, SERVER_PORT_UNKNOWN).await;
    world.connect(0, 1, SERVER_PORT_KNOWN).await.unwrap();
    world.wait_decisions("the first decision", |d| !d.is_empty()).await;

    world.nats.stop().await;
    const CONNECTS: u64 = 20;
    for _ in 0..CONNECTS {
        world
            .connect(0, 1, SERVER_PORT_KNOWN)
            .await
            .expect("enforcement goes on");
    }
    assert!(
        world.connect(0, 1, SERVER_PORT_UNKNOWN).await.is_err(),
        "still prevents"
    );
    wait_accepted(&known, 1 + CONNECTS as usize).await;
    assert_eq!(unknown.accepted(), 0);
    // The decisions wait on disk.
    wait_metric(&agent.health, "cnnf_agent_spool_depth_records", |v| v >= 1.0).await;

    world.nats.restart().await;
    world
        .wait_decisions("every allowed decision", |d| {
            count_where(d, |d| verdict_of(d) == Verdict::Allow) > CONNECTS
        })
        .await;
    // Let the sender settle, then check nothing arrived twice.
    wait_metric(&agent.health, "cnnf_agent_spool_depth_records", |v| v == 0.0).await;
    agent.stop().await;
    let (decisions_after, _) = world.decisions().await;
    assert_eq!(
        count_where(&decisions_after, |d| verdict_of(d) == Verdict::Allow),
        1 + CONNECTS,
        "every allowed connection arrived exactly once"
    );
    let ids: Vec<String> = world.flow_envelopes().await.into_iter().map(|e| e.event_id).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event stored twice");
    assert!(count_where(&decisions_after, |d| verdict_of(d) == Verdict::Prevent) >= 1);
    world.assert_kept_then_removed();
}

/// The built agent binary as a child process.
fn spawn_binary(world: &World) -> std::process::Child {
    let mut args = world.args();
    args.remove(0);
    args.extend(["--http-addr".into(), "127.0.0.1:0".into()]);
    Command::new(env!("CARGO_BIN_EXE_cnnf-agent"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

fn signal(child: &std::process::Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until the agent's chains queue every address in `addresses`.
async fn wait_rules(world: &World, addresses: &[Ipv4Addr]) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let rules = world.rules();
        if addresses
            .iter()
            .all(|a| rules.iter().any(|line| line.contains(&format!("{a}/32"))))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rules never installed: {rules:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects until the unknown port is dropped (a table is in force).
async fn wait_enforced(world: &World) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while world.connect(0, 1, SERVER_PORT_UNKNOWN).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "never enforced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_restarts_from_its_persisted_table_without_duplicate_chains() {
    let mut world = World::new(2, 2).await;
    world
        .publish_table(world.table(7, Mode::Prevent, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let _known = world.serve(1, SERVER_PORT_KNOWN).await;
    let unknown = world.serve(1, SERVER_PORT_UNKNOWN).await;

    let mut child = spawn_binary(&world);
    wait_rules(&world, &[world.ip(0), world.ip(1)]).await;
    wait_enforced(&world).await;
    world
        .connect(0, 1, SERVER_PORT_KNOWN)
        .await
        .expect("known port connects");
    assert!(world.state_dir().join(cnnf_agent::tables::TABLE_FILE).exists());

    // SIGKILL: no clean-up at all. Its rules stay (failing open meanwhile).
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert!(!world.rules().is_empty(), "a killed agent leaves its rules");

    // Restart with NATS gone: only the persisted table can say "prevent".
    world.nats.stop().await;
    let mut child = spawn_binary(&world);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // Fail-open bypass lets SYNs through until the new agent binds its
        // queue; from then on its persisted table drops them.
        if world.connect(0, 1, SERVER_PORT_UNKNOWN).await.is_err() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "restarted agent never enforced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    world
        .connect(0, 1, SERVER_PORT_KNOWN)
        .await
        .expect("the persisted table still allows the known port");
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    let accepted_before = unknown.accepted();

    // A clean exit (SIGTERM) exits 0 and keeps every rule (the node stays
    // enforced until the next start); `--remove-chains` takes them out.
    signal(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "clean exit: {status}");
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    let mut args = world.args();
    args.remove(0);
    args.push("--remove-chains".into());
    let removed = Command::new(env!("CARGO_BIN_EXE_cnnf-agent"))
        .args(&args)
        .output()
        .unwrap();
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    assert!(world.rules().is_empty(), "{:#?}", world.rules());
    assert_eq!(unknown.accepted(), accepted_before);
}

/// What [`send_malformed`] sent.
struct Malformed {
    /// Packets the decoder must refuse.
    undecodable: u64,
    /// Odd but valid SYNs to the known port, decided normally.
    valid: u64,
}

/// An IPv4 header (no options unless given) with TTL 77, protocol
/// `protocol`, then `payload`; the kernel fills in length, id and checksum.
fn ipv4(from: Ipv4Addr, to: Ipv4Addr, protocol: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let mut packet = vec![0x40 | ihl as u8, 0, 0, 0, 0, 0, 0, 0, 77, protocol, 0, 0];
    packet.extend_from_slice(&from.octets());
    packet.extend_from_slice(&to.octets());
    packet.extend_from_slice(options);
    packet.extend_from_slice(payload);
    packet
}

/// A TCP header with `flags` and data offset `offset` (32-bit words),
/// followed by `options`.
fn tcp(destination: u16, flags: u8, offset: u8, options: &[u8]) -> Vec<u8> {
    let mut header = vec![0xc0, 0x01];
    header.extend_from_slice(&destination.to_be_bytes());
    header.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, offset << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    header.extend_from_slice(options);
    header
}

/// Sends hostile packets from `from` to `to` through a raw socket (run
/// inside the sender's namespace): truncated and lying TCP headers, an
/// unknown protocol, and two odd but valid SYNs (IP options, garbage TCP
/// options) that must be decided normally.
fn send_malformed(from: Ipv4Addr, to: Ipv4Addr) -> Malformed {
    use nix::sys::socket::{sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(AddressFamily::Inet, SockType::Raw, SockFlag::empty(), SockProtocol::Raw).expect("raw socket");
    let destination = SockaddrIn::from(SocketAddrV4::new(to, 0));
    let undecodable = [
        // A TCP header cut short after 5 bytes.
        ipv4(from, to, 6, &[], &[0xc0, 0x01, 0x1f, 0x90, 0x00]),
        // A data offset below the minimum header.
        ipv4(from, to, 6, &[], &tcp(SERVER_PORT_KNOWN, 0x02, 2, &[])),
        // An unknown protocol with garbage.
        ipv4(from, to, 253, &[], &[0xa5; 40]),
        // No TCP header at all.
        ipv4(from, to, 6, &[], &[]),
    ];
    let odd_but_valid = [
        // A SYN whose data offset claims 60 bytes of header while 20 are
        // there: read as a SYN (the copy range may cut options off).
        ipv4(from, to, 6, &[], &tcp(SERVER_PORT_KNOWN, 0x02, 15, &[])),
        // IP options (NOP NOP NOP EOL) before a SYN to the known port.
        ipv4(from, to, 6, &[1, 1, 1, 0], &tcp(SERVER_PORT_KNOWN, 0x02, 5, &[])),
        // A SYN with garbage TCP options (kind 0xfe, length 0xff, ...).
        ipv4(
            from,
            to,
            6,
            &[],
            &tcp(SERVER_PORT_KNOWN, 0x02, 8, &[0xfe, 0xff, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ),
    ];
    const ROUNDS: u64 = 10;
    for _ in 0..ROUNDS {
        for packet in undecodable.iter().chain(odd_but_valid.iter()) {
            sendto(fd.as_raw_fd(), packet, &destination, MsgFlags::empty()).expect("raw send");
        }
    }
    Malformed {
        undecodable: ROUNDS * undecodable.len() as u64,
        valid: ROUNDS * odd_but_valid.len() as u64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_a_syn_flood_leave_the_agent_running_and_the_stream_bounded() {
    let world = World::new(2, 2).await;
    world
        .publish_table(world.table(8, Mode::Prevent, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 8).await;
    let known = world.serve(1, SERVER_PORT_KNOWN).await;
    let target = world.ip(1).to_string();

    // Malformed packets reach the decoder: container 0 writes raw IP
    // packets (TTL 77), and a test rule ahead of everything queues exactly
    // those to the agent's queue, bypassing the kernel's own TCP checks.
    let source = format!("{}/32", world.ip(0));
    let queue = world.queue.to_string();
    let rule = [
        "FORWARD",
        "-s",
        &source,
        "-m",
        "ttl",
        "--ttl-eq",
        "77",
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue,
        "--queue-bypass",
    ];
    let iptables = |action: &str| {
        let mut args = vec![action];
        args.extend_from_slice(&rule);
        assert!(Command::new("iptables").args(&args).status().unwrap().success());
    };
    iptables("-I");
    let (from, to) = (world.ip(0), world.ip(1));
    let sent = world.container(0).run_in(move || send_malformed(from, to)).unwrap();
    iptables("-D");
    let undecodable = agent.verdicts("undecodable", "accept");
    assert_eq!(
        undecodable, sent.undecodable,
        "every malformed packet reached the decoder"
    );
    assert_eq!(
        agent.verdicts("allow", "accept"),
        sent.valid,
        "odd but valid SYNs are decided"
    );
    assert!(!agent.task.is_finished(), "the agent survived malformed packets");

    // A SYN flood from container 0 to an unknown port (every SYN dropped).
    let container = world.container(0).clone();
    let flooded = tokio::task::spawn_blocking(move || {
        container
            .exec("timeout", &["3", "hping3", "-S", "-p", "9999", "--flood", &target])
            .unwrap()
    })
    .await
    .unwrap();
    assert!(flooded.status.code().is_some());
    assert!(!agent.task.is_finished(), "the agent survived the flood");
    world
        .connect(0, 1, SERVER_PORT_KNOWN)
        .await
        .expect("still decides after the flood");
    wait_accepted(&known, 1).await;
    let prevented = agent.verdicts("prevent", "drop");
    assert!(
        prevented > 1000,
        "the flood reached the agent: {prevented} SYNs dropped"
    );
    // The kernel's own queue counters are exported (sampled each second).
    let queued = format!("cnnf_agent_queue_packets{{queue=\"{}\"}}", world.queue);
    wait_metric(&agent.health, &queued, |v| v >= prevented as f64).await;
    let kernel_drops = metric(
        &agent.health,
        &format!("cnnf_agent_queue_dropped{{queue=\"{}\"}}", world.queue),
    );

    let decided: u64 = ["allow", "learn", "observe", "alert", "prevent"]
        .iter()
        .map(|v| agent.verdicts(v, if *v == "prevent" { "drop" } else { "accept" }))
        .sum();
    agent.stop().await;
    let envelopes = world.flow_envelopes().await;
    let (decisions, overflow) = world.decisions().await;
    let recorded: u64 = decisions.iter().map(|d| d.count).sum();
    assert_eq!(
        recorded + overflow,
        decided,
        "every decision is in the stream, aggregated or counted as overflow"
    );
    // Aggregation: the flood is one decision per window, not one per SYN.
    let flood_decisions = decisions.iter().filter(|d| port_of(d) == 9999).count();
    assert!(
        (flood_decisions as u64) < prevented / 100,
        "{flood_decisions} flood decisions for {prevented} SYNs"
    );
    assert!(envelopes.len() < 200, "{} messages", envelopes.len());
    let by_port: BTreeMap<u32, u64> = decisions.iter().fold(BTreeMap::new(), |mut map, d| {
        *map.entry(port_of(d)).or_default() += d.count;
        map
    });
    eprintln!(
        "flood: {prevented} SYNs dropped by verdict, kernel queue drops {kernel_drops}, {} messages, {} decisions, overflow {overflow}, by port {by_port:?}",
        envelopes.len(),
        decisions.len()
    );
    world.assert_kept_then_removed();
}

/// Sum of every verdict an agent gave.
fn all_verdicts(agent: &Agent) -> u64 {
    [
        ("allow", "accept"),
        ("learn", "accept"),
        ("observe", "accept"),
        ("alert", "accept"),
        ("prevent", "drop"),
        ("undecodable", "accept"),
        ("undecodable", "drop"),
    ]
    .iter()
    .map(|(verdict, action)| agent.verdicts(verdict, action))
    .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syn_flood_is_rate_limited_per_source_and_nothing_bypasses_in_prevent() {
    let world = World::new(3, 3).await;
    // 0 → 1 on the known port is learned; image 2 enforces and knows
    // nothing, so its connects to 1 are prevented.
    let mut models = enforcing_pair(SERVER_PORT_KNOWN);
    models.push(model(2, ModelState::Enforcing, vec![], vec![]));
    world.publish_table(world.table(10, Mode::Prevent, models)).await;
    // Default settings: --queue-full auto, 1000 SYN/s per source.
    let agent = Agent::start(world.config(&[]));
    agent.ready(3, 10).await;
    let fail_open = format!("cnnf_agent_queue_fail_open{{queue=\"{}\"}}", world.queue);
    // A prevent table: a full queue must drop, not accept.
    wait_metric(&agent.health, &fail_open, |v| v == 0.0).await;
    let _known = world.serve(1, SERVER_PORT_KNOWN).await;
    let never = world.serve(1, SERVER_PORT_UNKNOWN).await;

    let flooder = world.container(0).clone();
    let target = world.ip(1).to_string();
    let flood = tokio::task::spawn_blocking(move || {
        flooder
            .exec(
                "timeout",
                &[
                    "4",
                    "hping3",
                    "-q",
                    "-S",
                    "-p",
                    &SERVER_PORT_KNOWN.to_string(),
                    "--flood",
                    &target,
                ],
            )
            .unwrap()
    });
    // Meanwhile container 2 keeps trying the never-allowed port.
    let mut attempts = 0;
    let mut connected = 0;
    while !flood.is_finished() || attempts < 3 {
        attempts += 1;
        if world.connect(2, 1, SERVER_PORT_UNKNOWN).await.is_ok() {
            connected += 1;
        }
    }
    flood.await.unwrap();
    assert_eq!(
        connected, 0,
        "{connected} of {attempts} connects to a never-allowed port succeeded"
    );
    assert_eq!(never.accepted(), 0);

    wait_metric(&agent.health, "cnnf_agent_syn_rate_limited_total", |v| v > 0.0).await;
    // Once a sample has seen every SYN that was answered, nothing may be
    // left unanswered-and-accepted.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metric(&agent.health, "cnnf_agent_syn_queued_total") < all_verdicts(&agent) as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            agent.health.encode_metrics()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limited = metric(&agent.health, "cnnf_agent_syn_rate_limited_total");
    let queued = metric(&agent.health, "cnnf_agent_syn_queued_total");
    let kernel_drops = metric(
        &agent.health,
        &format!("cnnf_agent_queue_dropped{{queue=\"{}\"}}", world.queue),
    );
    eprintln!(
        "flood: {limited} SYNs rate-limited, {queued} queued, {} verdicts, kernel queue drops {kernel_drops}, {attempts} connects to the never-allowed port, all failed",
        all_verdicts(&agent)
    );
    assert_eq!(metric(&agent.health, "cnnf_agent_syn_bypassed_total"), 0.0);
    assert!(agent.verdicts("prevent", "drop") >= 1);
    agent.stop().await;
    world.assert_kept_then_removed();
}

/// Connects from container `from` to `to`:`port` in a loop until `stop`,
/// counting attempts, on a thread of its own.
fn connect_loop(
    world: &World,
    from: usize,
    to: usize,
    ports: &[u16],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    attempts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    let container = world.container(from).clone();
    let destinations: Vec<SocketAddrV4> = ports
        .iter()
        .map(|port| SocketAddrV4::new(world.ip(to), *port))
        .collect();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for destination in &destinations {
                let _ = container.tcp_connect(*destination, CONNECT_TIMEOUT);
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

/// Waits until `attempts` reached `count`.
async fn wait_attempts(attempts: &std::sync::atomic::AtomicUsize, count: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while attempts.load(std::sync::atomic::Ordering::Relaxed) < count {
        assert!(tokio::time::Instant::now() < deadline, "the connect loop stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_closed_agent_restarts_without_one_unchecked_connection() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let world = World::new(2, 2).await;
    world
        .publish_table(world.table(11, Mode::Prevent, enforcing_pair(SERVER_PORT_KNOWN)))
        .await;
    let known = world.serve(1, SERVER_PORT_KNOWN).await;
    let never = world.serve(1, SERVER_PORT_UNKNOWN).await;
    let closed = ["--fail-mode", "closed"];
    let first = Agent::start(world.config(&closed));
    first.ready(2, 11).await;

    // Client 0 connects to the never-allowed and the allowed port, over and
    // over, through the stop and the start.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let connects = connect_loop(
        &world,
        0,
        1,
        &[SERVER_PORT_UNKNOWN, SERVER_PORT_KNOWN],
        Arc::clone(&stop),
        Arc::clone(&attempts),
    );
    wait_attempts(&attempts, 4).await;
    let first_allowed = first.verdicts("allow", "accept");
    first.stop().await;
    // The chains stay: the kernel drops what nobody reads.
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    let accepted_at_stop = known.accepted();
    let at_stop = attempts.load(Ordering::Relaxed);
    wait_attempts(&attempts, at_stop + 4).await;
    let accepted_while_down = known.accepted() - accepted_at_stop;

    let second = Agent::start(world.config(&closed));
    second.ready(2, 11).await;
    let at_start = attempts.load(Ordering::Relaxed);
    wait_attempts(&attempts, at_start + 4).await;
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || connects.join().unwrap())
        .await
        .unwrap();

    assert_eq!(never.accepted(), 0, "a never-allowed connection got through");
    assert_eq!(accepted_while_down, 0, "connections accepted while no agent ran");
    let decided = first_allowed + second.verdicts("allow", "accept");
    assert!(known.accepted() >= 1, "the allowed port worked before and after");
    assert!(
        decided >= known.accepted() as u64,
        "{} connections accepted, {decided} allowed by a verdict",
        known.accepted()
    );
    // The SYNs of the gap were counted at the start, as dropped.
    assert!(metric(&second.health, "cnnf_agent_syn_unread_dropped_total") >= 1.0);
    assert_eq!(metric(&second.health, "cnnf_agent_syn_bypassed_total"), 0.0);
    eprintln!(
        "restart: {} attempts, {} accepted (all decided: {decided} allow verdicts), unread SYNs dropped {}",
        attempts.load(Ordering::Relaxed),
        known.accepted(),
        metric(&second.health, "cnnf_agent_syn_unread_dropped_total")
    );
    world.assert_rules_installed(&[world.ip(0), world.ip(1)]);
    second.stop().await;
    world.assert_kept_then_removed();
}

/// Whether a TCP connect from `source` (an address of container `from`)
/// to `destination` succeeds within `CONNECT_TIMEOUT`.
async fn connect_from(world: &World, from: usize, source: Ipv4Addr, destination: SocketAddrV4) -> bool {
    let container = world.container(from).clone();
    let script = format!(
        "import socket,sys\ns=socket.socket()\ns.bind(('{source}',0))\ns.settimeout({})\n\
         try:\n  s.connect(('{}',{}))\nexcept OSError:\n  sys.exit(1)\n",
        CONNECT_TIMEOUT.as_secs_f64(),
        destination.ip(),
        destination.port()
    );
    let output = tokio::task::spawn_blocking(move || container.exec("python3", &["-c", &script]).unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.is_empty() || output.status.code() == Some(1),
        "python3: {stderr}"
    );
    output.status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_added_inside_a_workload_is_queued_and_dropped_in_prevent() {
    const TO_OUTSIDE: u16 = 9091;
    // Containers 0 and 1 are this node's workloads; 2 is an outside server
    // nobody knows.
    let world = World::new(3, 2).await;
    let mut models = enforcing_pair(SERVER_PORT_KNOWN);
    models[0].outbound.push(LearnedConnection {
        side: Side::Outbound as i32,
        peer: Some(ProtoIdentity {
            kind: IdentityKind::Unknown as i32,
            ..Default::default()
        }),
        port: u32::from(TO_OUTSIDE),
        protocol: Protocol::Tcp as i32,
        count: 1,
        ..Default::default()
    });
    world.publish_table(world.table(12, Mode::Prevent, models)).await;
    let agent = Agent::start(world.config(&[]));
    agent.ready(2, 12).await;
    let known = world.serve(1, SERVER_PORT_KNOWN).await;
    let outside = world.serve(2, TO_OUTSIDE).await;

    // From its own address, container 0 reaches both (learned).
    let own = world.ip(0);
    assert!(connect_from(&world, 0, own, SocketAddrV4::new(world.ip(1), SERVER_PORT_KNOWN)).await);
    assert!(connect_from(&world, 0, own, SocketAddrV4::new(world.ip(2), TO_OUTSIDE)).await);
    wait_accepted(&known, 1).await;
    wait_accepted(&outside, 1).await;

    // An address the inventory does not list, added inside the namespace.
    let octets = own.octets();
    let extra = Ipv4Addr::new(octets[0], octets[1], octets[2], 200);
    let added = world
        .container(0)
        .exec("ip", &["addr", "add", &format!("{extra}/24"), "dev", "eth0"])
        .unwrap();
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let prevented = agent.verdicts("prevent", "drop");
    assert!(
        !connect_from(&world, 0, extra, SocketAddrV4::new(world.ip(1), SERVER_PORT_KNOWN)).await,
        "a SYN from an unknown address inside a workload is dropped"
    );
    assert!(
        !connect_from(&world, 0, extra, SocketAddrV4::new(world.ip(2), TO_OUTSIDE)).await,
        "also towards an address the agent does not know"
    );
    assert_eq!(known.accepted(), 1);
    assert_eq!(outside.accepted(), 1);
    assert!(
        agent.verdicts("prevent", "drop") >= prevented + 2,
        "queued and prevented"
    );
    assert!(metric(&agent.health, "cnnf_agent_unowned_sources_total") >= 2.0);
    world
        .wait_decisions("a prevent decision from the unknown address", |d| {
            d.iter().any(|d| {
                verdict_of(d) == Verdict::Prevent
                    && d.source.as_ref().is_some_and(|s| {
                        s.address == extra.to_string()
                            && s.identity
                                .as_ref()
                                .is_some_and(|i| i.kind == IdentityKind::Unknown as i32)
                    })
            })
        })
        .await;
    agent.stop().await;
    world.assert_kept_then_removed();
}
