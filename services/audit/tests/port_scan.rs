//! A real port scan through the whole chain: `nmap` in one network
//! namespace scans another, the real node agent (iptables, NFQUEUE, a
//! PREVENT-mode verdict table) drops every probe and publishes its
//! decisions, and the audit service turns them into ONE port-scan incident
//! and a bounded number of audits whose counts add up to the SYNs dropped.
//!
//! The lab owns a subnet `10.199.<k>.0/24` (a cross-process lock); the
//! agent's chain prefix (`AS<k>`), queue number (`3100 + k`) and node name
//! derive from `k`, so the test runs beside the agent's own tests without
//! touching their rules or queues.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser as _;
use cnnf_audit::FLOWS_DURABLE;
use cnnf_bus::topology::{AUDIT, FLOWS, INCIDENTS, VERDICTS_BUCKET};
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::{
    envelope::Payload, incident, Audit, AuditFilter, CompiledModel, ConnectionDecision, Envelope, Identity,
    IdentityKind, LearnedConnection, ListAuditsRequest, Mode, ModelState, Protocol, Side, Verdict, VerdictTable,
};
use cnnf_service::Health;
use cnnf_store::{applied_sequence, ProjectionStore};
use cnnf_testkit::{FakeContainer, Lab, NatsServer, TcpServerGuard};
use prost::Message as _;

const CLUSTER: &str = "scan";
const WAIT: Duration = Duration::from_secs(90);
const KNOWN_PORT: u16 = 8080;
/// A dropped SYN is retransmitted after 1 s: long enough for an accepted
/// one, short enough that a dropped one fails quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
const SCANNED: std::ops::RangeInclusive<u32> = 1..=1000;

fn image_id(i: usize) -> String {
    format!("sha256:{:064x}", 0x5ca0 + i)
}

fn image_name(i: usize) -> String {
    format!("registry.test/scan{i}:1")
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    cnnf_testkit::eventually(what, WAIT, check).await
}

/// NATS, a lab of three "containers" (all this node's workloads, container
/// `i` running image `i`), a state directory and the names derived from
/// the lab's index.
struct World {
    nats: NatsServer,
    js: jetstream::Context,
    /// Signs the table as the policy service would; the agent trusts it.
    key: cnnf_signing::SigningKey,
    lab: Lab,
    dir: tempfile::TempDir,
    node: String,
    prefix: String,
    queue: u16,
}

impl World {
    async fn new() -> World {
        let nats = NatsServer::start().await;
        let js = cnnf_bus::jetstream(async_nats::connect(nats.url()).await.unwrap());
        cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
        let lab = tokio::task::spawn_blocking(|| Lab::new(3).expect("lab (needs root)"))
            .await
            .unwrap();
        let k = lab.index();
        let world = World {
            nats,
            js,
            key: cnnf_signing::SigningKey::generate(),
            dir: tempfile::tempdir().unwrap(),
            node: format!("scan-node-{k}"),
            prefix: format!("AS{k}"),
            queue: 3100 + u16::from(k),
            lab,
        };
        let workloads: Vec<_> = world
            .lab
            .containers()
            .iter()
            .enumerate()
            .map(|(i, container)| {
                serde_json::json!({
                    "container_id": format!("c{i}"),
                    "container_name": container.name(),
                    "image_id": image_id(i),
                    "image_name": image_name(i),
                    "addresses": [container.ip().to_string()],
                })
            })
            .collect();
        let text = serde_json::json!({ "workloads": workloads }).to_string();
        std::fs::write(world.inventory_path(), text).unwrap();
        cnnf_signing::files::write_public_key(&world.keys_path(), world.key.public_key()).unwrap();
        world
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.path().join("trusted.pub")
    }

    fn inventory_path(&self) -> PathBuf {
        self.dir.path().join("inventory.json")
    }

    fn container(&self, i: usize) -> &FakeContainer {
        self.lab.container(i)
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        self.container(i).ip()
    }

    fn agent_config(&self) -> cnnf_agent::Config {
        let args = [
            "cnnf-agent".to_owned(),
            "--nats-url".to_owned(),
            self.nats.url(),
            "--cluster".to_owned(),
            CLUSTER.to_owned(),
            "--node".to_owned(),
            self.node.clone(),
            "--data-dir".to_owned(),
            self.dir.path().join("agent").display().to_string(),
            "--workloads".to_owned(),
            format!("inventory:{}", self.inventory_path().display()),
            "--chain-prefix".to_owned(),
            self.prefix.clone(),
            "--queue-first".to_owned(),
            self.queue.to_string(),
            "--queue-count".to_owned(),
            "1".to_owned(),
            "--aggregation-ms".to_owned(),
            "200".to_owned(),
            "--table-keys".to_owned(),
            self.keys_path().display().to_string(),
        ];
        cnnf_agent::Config::try_parse_from(args).unwrap()
    }

    /// Publishes this node's verdict table: PREVENT mode, images 0, 1 and
    /// 2 enforcing, the only known connection 0 → 1 on [`KNOWN_PORT`].
    async fn publish_table(&self) {
        let learned = |side: Side, peer: usize| LearnedConnection {
            side: side as i32,
            peer: Some(Identity {
                kind: IdentityKind::Image as i32,
                id: image_id(peer),
                name: image_name(peer),
                ..Default::default()
            }),
            port: u32::from(KNOWN_PORT),
            protocol: Protocol::Tcp as i32,
            count: 1,
            ..Default::default()
        };
        let model = |i: usize, inbound: Vec<LearnedConnection>, outbound: Vec<LearnedConnection>| CompiledModel {
            image_id: image_id(i),
            state: ModelState::Enforcing as i32,
            inbound,
            outbound,
        };
        let table = VerdictTable {
            version: 1,
            cluster: CLUSTER.into(),
            node: self.node.clone(),
            mode: Mode::Prevent as i32,
            models: vec![
                model(0, vec![], vec![learned(Side::Outbound, 1)]),
                model(1, vec![learned(Side::Inbound, 0)], vec![]),
                model(2, vec![], vec![]),
            ],
            ..Default::default()
        };
        let kv = self.js.get_key_value(VERDICTS_BUCKET).await.unwrap();
        kv.put(
            format!("{CLUSTER}.{}", self.node),
            self.key.sign_table_bytes(&table.encode_to_vec()).into(),
        )
        .await
        .unwrap();
    }

    async fn serve(&self, i: usize, port: u16) -> TcpServerGuard {
        let container = self.container(i).clone();
        tokio::task::spawn_blocking(move || container.tcp_listen(port).unwrap())
            .await
            .unwrap()
    }

    async fn connect(&self, from: usize, to: usize, port: u16) -> std::io::Result<Duration> {
        let container = self.container(from).clone();
        let destination = SocketAddrV4::new(self.ip(to), port);
        tokio::task::spawn_blocking(move || container.tcp_connect(destination, CONNECT_TIMEOUT))
            .await
            .unwrap()
    }

    /// Lines of iptables-save (both families) that name the agent's chains.
    fn rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for command in ["iptables-save", "ip6tables-save"] {
            let output = Command::new(command).output().unwrap();
            assert!(output.status.success(), "{command} failed");
            out.extend(
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|line| line.contains(&format!("{}-", self.prefix)))
                    .map(str::to_owned),
            );
        }
        out
    }

    /// Every message of `stream` on `subject_prefix*`: subject and envelope.
    async fn messages(&self, stream: &str, subject_prefix: &str) -> Vec<(String, Envelope)> {
        let mut handle = self.js.get_stream(stream).await.unwrap();
        let last = handle.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for sequence in 1..=last {
            let Ok(message) = handle.get_raw_message(sequence).await else {
                continue;
            };
            if message.subject.starts_with(subject_prefix) {
                out.push((
                    message.subject.to_string(),
                    Envelope::decode(message.payload.as_ref()).unwrap(),
                ));
            }
        }
        out
    }

    /// The agent's decisions on the flow stream, and its overflow counts.
    async fn decisions(&self) -> (Vec<ConnectionDecision>, u64) {
        let mut decisions = Vec::new();
        let mut overflow = 0;
        for (_, envelope) in self
            .messages(FLOWS, &format!("cnnf.flow.{CLUSTER}.{}", self.node))
            .await
        {
            if let Some(Payload::Decisions(batch)) = envelope.payload {
                overflow += batch.overflow_count;
                decisions.extend(batch.decisions);
            }
        }
        (decisions, overflow)
    }
}

impl Drop for World {
    /// Removes whatever a failed test left of the agent's chains.
    fn drop(&mut self) {
        let _ = cnnf_agent::dataplane::chains::remove_prefix(&self.prefix);
    }
}

/// The value of one metric line (`name{labels} value`), 0 if absent.
fn metric(health: &Health, name_and_labels: &str) -> f64 {
    health.metric(name_and_labels).unwrap_or(0.0)
}

/// A task running `run` until its stop sender fires.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn spawn<F>(run: impl FnOnce(tokio::sync::oneshot::Receiver<()>) -> F) -> Running
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        Running {
            stop: Some(stop),
            task: tokio::spawn(run(stopped)),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }
}

fn source_address(audit: &Audit) -> &str {
    &audit.source.as_ref().unwrap().address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nmap_scan_through_the_agent_is_one_incident_and_a_bounded_number_of_audits() {
    let world = World::new().await;
    world.publish_table().await;
    cnnf_service::init_logging();

    // The audit service, in this process.
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn ProjectionStore> = Arc::new(cnnf_audit::open_store(&data.path().join("audit")).unwrap());
    let grpc = free_addr();
    let url = world.nats.url();
    let config = cnnf_audit::Config::try_parse_from([
        "cnnf-audit",
        "--nats-url",
        &url,
        "--cluster",
        CLUSTER,
        "--grpc-addr",
        &grpc.to_string(),
        "--grpc-insecure",
        "--data-dir",
        &data.path().display().to_string(),
    ])
    .unwrap();
    let service_health = Health::default();
    let service = {
        let store = Arc::clone(&store);
        let health = service_health.clone();
        Running::spawn(move |stopped| {
            cnnf_audit::run_with_store(config, store, health, Default::default(), async move {
                let _ = stopped.await;
            })
        })
    };

    // The agent, in this process, enforcing the table.
    let agent_health = Health::default();
    let agent = {
        let config = world.agent_config();
        let health = agent_health.clone();
        Running::spawn(move |stopped| {
            cnnf_agent::run(config, health, async move {
                let _ = stopped.await;
            })
        })
    };
    eventually("the agent to queue three addresses under table 1", || async {
        assert!(!agent.task.is_finished(), "the agent ended early");
        (metric(&agent_health, "cnnf_agent_workload_addresses") == 3.0
            && metric(&agent_health, "cnnf_agent_table_version") == 1.0)
            .then_some(())
    })
    .await;
    eventually("the audit service to be ready", || async {
        assert!(!service.task.is_finished(), "the service ended early");
        (service_health.not_ready().is_empty() && AuditsClient::connect(format!("http://{grpc}")).await.is_ok())
            .then_some(())
    })
    .await;

    // The table is in force: the known connection passes, two probes from
    // container 2 (not a scan: two ports) are dropped.
    let known = world.serve(1, KNOWN_PORT).await;
    world
        .connect(0, 1, KNOWN_PORT)
        .await
        .expect("the known connection passes");
    for port in [9090, 9091] {
        let error = world.connect(2, 1, port).await.expect_err("an unknown port is dropped");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "dropped, not refused");
    }

    // The scan: every port of 1..=1000 probed once, from container 0.
    let scanner = world.container(0).clone();
    let target = world.ip(1).to_string();
    let range = format!("{}-{}", SCANNED.start(), SCANNED.end());
    let nmap = tokio::task::spawn_blocking(move || {
        scanner
            .exec(
                "nmap",
                &["-sS", "-Pn", "-n", "-p", &range, "-T4", "--max-retries", "0", &target],
            )
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&nmap.stdout).into_owned();
    assert!(
        nmap.status.success(),
        "nmap failed: {report}{}",
        String::from_utf8_lossy(&nmap.stderr)
    );
    assert!(
        report.contains("1000 filtered"),
        "every probe was dropped, none answered: {report}"
    );
    assert!(!agent.task.is_finished(), "the agent survived the scan");
    assert_eq!(known.accepted(), 1);

    // A clean stop hands the agent's last decisions to the stream; its
    // verdict counters are final.
    agent.stop().await;
    let dropped = metric(
        &agent_health,
        "cnnf_agent_verdicts_total{verdict=\"prevent\",action=\"drop\"}",
    ) as u64;
    // A clean stop keeps the chains (a restart must not open a gap);
    // removing them is its own command.
    assert!(
        world.rules().iter().any(|line| line.contains("NFQUEUE")),
        "a clean exit keeps the chains: {:#?}",
        world.rules()
    );
    cnnf_agent::uninstall(&world.agent_config()).unwrap();
    assert!(world.rules().is_empty(), "--remove-chains leaves no rule");

    let (decisions, overflow) = world.decisions().await;
    assert_eq!(overflow, 0, "no decision was lost to overflow");
    let prevented_from = |address: &str| -> (u64, BTreeSet<u32>) {
        decisions
            .iter()
            .filter(|d| d.verdict == Verdict::Prevent as i32 && d.source.as_ref().unwrap().address == address)
            .fold((0, BTreeSet::new()), |(count, mut ports), d| {
                ports.insert(d.destination.as_ref().unwrap().port);
                (count + d.count, ports)
            })
    };
    let scanner_ip = world.ip(0).to_string();
    let other_ip = world.ip(2).to_string();
    let (scan_syns, scan_ports) = prevented_from(&scanner_ip);
    let (other_syns, other_ports) = prevented_from(&other_ip);
    assert_eq!(
        scan_ports,
        SCANNED.collect::<BTreeSet<_>>(),
        "every probed port reached the agent"
    );
    assert_eq!(other_ports, BTreeSet::from([9090, 9091]));
    assert_eq!(
        scan_syns + other_syns,
        dropped,
        "the stream holds every SYN the agent dropped"
    );

    // The audit service applied every decision message.
    let flows_last = world
        .js
        .get_stream(FLOWS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    eventually("the audit service to apply every decision", || async {
        (applied_sequence(store.as_ref(), FLOWS_DURABLE).unwrap() >= flows_last).then_some(())
    })
    .await;
    let mut client = AuditsClient::connect(format!("http://{grpc}")).await.unwrap();
    let audits = client
        .list_audits(ListAuditsRequest {
            from_unix_nanos: 0,
            to_unix_nanos: 0,
            filter: Some(AuditFilter::default()),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(audits.next_page_token.is_empty(), "everything fits one page");
    let mut by_source: BTreeMap<&str, Vec<&Audit>> = BTreeMap::new();
    for audit in &audits.audits {
        by_source.entry(source_address(audit)).or_default().push(audit);
    }
    assert_eq!(
        by_source.keys().copied().collect::<Vec<_>>(),
        {
            let mut sources = vec![scanner_ip.as_str(), other_ip.as_str()];
            sources.sort();
            sources
        },
        "only prevented connections are audited"
    );
    let scan_audits = &by_source[scanner_ip.as_str()];
    let scan_counted: u64 = scan_audits.iter().map(|audit| audit.count).sum();
    let aggregated: Vec<_> = scan_audits
        .iter()
        .filter(|audit| audit.destination.as_ref().unwrap().port == 0)
        .collect();
    eprintln!(
        "nmap scan: {scan_syns} SYNs dropped on {} ports, {} audits ({} aggregated over ports, counts {:?})",
        scan_ports.len(),
        scan_audits.len(),
        aggregated.len(),
        aggregated.iter().map(|audit| audit.count).collect::<Vec<_>>()
    );
    assert!(
        scan_audits.len() < 50,
        "{} audits for a scan of {} ports",
        scan_audits.len(),
        scan_ports.len()
    );
    assert!(!aggregated.is_empty(), "the scanner's audits are aggregated over ports");
    assert_eq!(
        scan_counted, scan_syns,
        "the scan's audit counts add up to its dropped SYNs"
    );
    let other_audits = &by_source[other_ip.as_str()];
    // One audit per probed port and audit window: a retransmitted SYN that
    // lands in the next window opens a second audit for its port.
    let other_ports: std::collections::BTreeSet<u32> = other_audits
        .iter()
        .map(|audit| audit.destination.as_ref().unwrap().port)
        .collect();
    assert_eq!(
        other_ports.len(),
        2,
        "per-port audits for the two probed ports: {other_audits:#?}"
    );
    assert!(other_audits.len() as u64 <= other_syns, "{other_audits:#?}");
    assert!(other_audits
        .iter()
        .all(|audit| audit.destination.as_ref().unwrap().port != 0));
    assert_eq!(other_audits.iter().map(|audit| audit.count).sum::<u64>(), other_syns);

    // Exactly one incident, on the port-scan subject, naming the scanner.
    let incidents = eventually("the incident published", || async {
        let incidents = world.messages(INCIDENTS, "cnnf.incident.").await;
        (!incidents.is_empty()).then_some(incidents)
    })
    .await;
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let (subject, envelope) = &incidents[0];
    assert_eq!(subject, &format!("cnnf.incident.{CLUSTER}.port-scan"));
    let Some(Payload::Incident(incident)) = &envelope.payload else {
        panic!("not an incident: {envelope:?}")
    };
    assert_eq!(incident.kind, incident::Kind::PortScan as i32);
    assert_eq!(incident.details["source_address"], scanner_ip);
    assert_eq!(incident.details["source_container_id"], "c0");
    assert_eq!(incident.details["node"], world.node);
    assert_eq!(incident.image_id, image_id(0));

    // What integrations receive is bounded the same way: each audit once,
    // and again with its final count when its window closes.
    let published = eventually("every audit published", || async {
        let published = world.messages(AUDIT, &format!("cnnf.audit.v1.{CLUSTER}.")).await;
        let ids: BTreeSet<String> = published
            .iter()
            .filter_map(|(_, envelope)| match &envelope.payload {
                Some(Payload::Audit(audit)) => Some(audit.audit_id.clone()),
                _ => None,
            })
            .collect();
        (ids.len() == audits.audits.len()).then_some(published)
    })
    .await;
    assert!(
        published.len() <= 2 * audits.audits.len(),
        "{} audit messages for {} audits",
        published.len(),
        audits.audits.len()
    );
    service.stop().await;
}
