//! The audit service against a real nats-server and real RocksDB stores:
//! audits counted per window, indexed and queried; a Python integration
//! (nats-py and the published .proto) decoding them; a replay equal to the
//! live projection; a simulation with exactly the expected changes; a port
//! scan that is one incident and a bounded number of audits; crashes and
//! restarts in the middle of the stream; point-in-time questions; retention
//! removing old audits and nothing else.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use clap::Parser as _;
use cnnf_audit::store::{self, AuditNumber};
use cnnf_audit::{Config, RunOptions, FLOWS_DURABLE, MODELS_DURABLE, POLICY_DURABLE, WORKLOADS_DURABLE};
use cnnf_bus::runner::HookAction;
use cnnf_bus::topology::{AUDIT, FLOWS, INCIDENTS, MODELS, POLICY, WORKLOADS};
use cnnf_proto::v1::audits_client::AuditsClient;
use cnnf_proto::v1::{
    decided_by, envelope::Payload, incident, model_event, network_object, policy_event, Audit, AuditFilter,
    CompiledModel, ConnectionDecision, DecidedBy, DecisionBatch, Direction, Endpoint, Envelope, Identity, IdentityKind,
    LearnedConnection, ListAuditsRequest, Mode, ModelEvent, ModelState, NetworkObject, PolicyEvent, PortRange,
    Protocol, ReplayRequest, Rule, RuleDestination, RuleEffect, Side, SimulateRequest, StateAtRequest, Verdict,
    VerdictTable, WhoHeldRequest, Workload, WorkloadStarted, WorkloadStopped,
};
use cnnf_service::Health;
use cnnf_store::{applied_sequence, ProjectionStore};
use cnnf_testkit::NatsServer;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const S: i64 = 1_000_000_000;
/// Event times of scripted tests that never read the log back by time.
const T0: i64 = 1_700_000_000 * S;
const CLUSTER: &str = "c";
const WAIT: Duration = Duration::from_secs(60);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// A recent instant on a 10-second boundary: replays and simulations read
/// the log by stored time, so their scenarios happen "now".
fn recent_base() -> i64 {
    let base = now() - 120 * S;
    base - base.rem_euclid(10 * S)
}

/// Polls `check` until it returns `Some`, or fails with `what`.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    cnnf_testkit::eventually(what, WAIT, check).await
}

fn open_store(dir: &Path) -> Arc<dyn ProjectionStore> {
    Arc::new(cnnf_audit::open_store(dir).unwrap())
}

/// One running audit service.
struct Service {
    store: Arc<dyn ProjectionStore>,
    grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    async fn start(server: &NatsServer, store: Arc<dyn ProjectionStore>, data: &Path, options: RunOptions) -> Self {
        Self::start_with(server, store, data, options, &[]).await
    }

    /// Starts the service with `extra` flags after the usual ones.
    async fn start_with(
        server: &NatsServer,
        store: Arc<dyn ProjectionStore>,
        data: &Path,
        options: RunOptions,
        extra: &[&str],
    ) -> Self {
        let grpc = free_addr();
        let url = server.url();
        let grpc_text = grpc.to_string();
        let data_text = data.display().to_string();
        let mut args = vec![
            "cnnf-audit",
            "--nats-url",
            &url,
            "--cluster",
            CLUSTER,
            "--grpc-addr",
            &grpc_text,
            "--grpc-insecure",
            "--data-dir",
            &data_text,
        ];
        // Scripted tests use event times years back: keep their audits
        // unless a test sets a retention itself.
        if !extra.contains(&"--retention-hours") {
            args.extend_from_slice(&["--retention-hours", "876000"]);
        }
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        cnnf_service::init_logging();
        let health = Health::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_audit::run_with_store(
            config,
            Arc::clone(&store),
            health.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        let service = Self {
            store,
            grpc,
            stop: Some(stop),
            task,
        };
        eventually("the service to be ready", || async {
            assert!(!service.task.is_finished(), "the service ended early");
            (health.not_ready().is_empty() && AuditsClient::connect(format!("http://{}", service.grpc)).await.is_ok())
                .then_some(())
        })
        .await;
        service
    }

    async fn client(&self) -> AuditsClient<tonic::transport::Channel> {
        AuditsClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    /// Waits until each runner applied its stream up to its last message.
    async fn caught_up(&self, js: &jetstream::Context) {
        for (stream, durable) in [
            (FLOWS, FLOWS_DURABLE),
            (WORKLOADS, WORKLOADS_DURABLE),
            (POLICY, POLICY_DURABLE),
            (MODELS, MODELS_DURABLE),
        ] {
            let last = last_sequence(js, stream).await;
            eventually(durable, || async {
                (applied_sequence(self.store.as_ref(), durable).unwrap() >= last).then_some(())
            })
            .await;
        }
    }

    /// Every stored audit first seen in `[from, to)` matching `filter`,
    /// fetched `page_size` at a time.
    async fn list(&self, from: i64, to: i64, filter: AuditFilter, page_size: u32) -> Vec<Audit> {
        let mut client = self.client().await;
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = client
                .list_audits(ListAuditsRequest {
                    from_unix_nanos: from,
                    to_unix_nanos: to,
                    filter: Some(filter.clone()),
                    page_size,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.audits.len() <= page_size as usize);
            out.extend(page.audits);
            if page.next_page_token.is_empty() {
                return out;
            }
            token = page.next_page_token;
        }
    }

    async fn stop(mut self) -> Arc<dyn ProjectionStore> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        self.store
    }
}

async fn connect(server: &NatsServer) -> jetstream::Context {
    let js = cnnf_bus::jetstream(async_nats::connect(server.url()).await.unwrap());
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
    js
}

async fn last_sequence(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

/// Every message of `stream`: subject, Nats-Msg-Id, envelope.
async fn read_all(js: &jetstream::Context, stream: &str) -> Vec<(String, String, Envelope)> {
    let handle = js.get_stream(stream).await.unwrap();
    let last = last_sequence(js, stream).await;
    let mut out = Vec::new();
    for sequence in 1..=last {
        let Ok(message) = handle.get_raw_message(sequence).await else {
            continue;
        };
        let id = message
            .headers
            .get("Nats-Msg-Id")
            .map(|value| value.to_string())
            .unwrap_or_default();
        out.push((
            message.subject.to_string(),
            id,
            Envelope::decode(message.payload.as_ref()).unwrap(),
        ));
    }
    out
}

async fn publish(js: &jetstream::Context, subject: &str, envelope: Envelope) -> u64 {
    let publish = jetstream::message::PublishMessage::build()
        .payload(cnnf_core::envelope::encode(envelope.clone()).into())
        .message_id(&envelope.event_id);
    js.send_publish(subject.to_owned(), publish)
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

/// Publishes decisions as the agent of `node` would: one batch, id
/// `<node>:<boot>:<seq>`.
async fn publish_decisions(
    js: &jetstream::Context,
    node: &str,
    seq: u64,
    time: i64,
    decisions: Vec<ConnectionDecision>,
) {
    let envelope = Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: cnnf_core::ids::agent_event(node, "boot1", seq),
        cluster: CLUSTER.into(),
        node: node.into(),
        time_unix_nanos: time,
        payload: Some(Payload::Decisions(DecisionBatch {
            decisions,
            overflow_count: 0,
        })),
        ..Default::default()
    };
    publish(js, &format!("cnnf.flow.{CLUSTER}.{node}"), envelope).await;
}

fn image(id: &str) -> Identity {
    Identity {
        kind: IdentityKind::Image as i32,
        id: id.into(),
        name: format!("{id}-name"),
        container_id: format!("{id}-container"),
        ..Default::default()
    }
}

fn unknown() -> Identity {
    Identity {
        kind: IdentityKind::Unknown as i32,
        ..Default::default()
    }
}

#[allow(clippy::too_many_arguments)]
fn decision(
    source: (Identity, &str),
    destination: (Identity, &str),
    port: u32,
    verdict: Verdict,
    by: DecidedBy,
    time: i64,
    count: u64,
) -> ConnectionDecision {
    ConnectionDecision {
        source: Some(Endpoint {
            address: source.1.into(),
            port: 40_000 + (time.rem_euclid(1000)) as u32,
            identity: Some(source.0),
        }),
        destination: Some(Endpoint {
            address: destination.1.into(),
            port,
            identity: Some(destination.0),
        }),
        protocol: Protocol::Tcp as i32,
        direction: Direction::Egress as i32,
        verdict: verdict as i32,
        decided_by: Some(by),
        verdict_table_version: 7,
        mode: Mode::Alert as i32,
        first_seen_unix_nanos: time,
        last_seen_unix_nanos: time,
        count,
    }
}

fn by_rule(id: &str) -> DecidedBy {
    DecidedBy {
        kind: decided_by::Kind::Rule as i32,
        rule_id: id.into(),
        model_image_id: String::new(),
    }
}

fn by_mode() -> DecidedBy {
    DecidedBy {
        kind: decided_by::Kind::Mode as i32,
        ..Default::default()
    }
}

fn by_model(image: &str) -> DecidedBy {
    DecidedBy {
        kind: decided_by::Kind::Model as i32,
        model_image_id: image.into(),
        ..Default::default()
    }
}

const WEB: &str = "sha256:web";
const DB: &str = "sha256:db";
const API: &str = "sha256:api";
const WEB_IP: &str = "10.0.0.10";
const DB_IP: &str = "10.0.0.20";
const API_IP: &str = "10.0.0.30";
const EVIL_IP: &str = "203.0.113.9";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_audits_are_counted_indexed_and_finalised() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;

    // Window [T0, T0+10s): web -> db:22 alerted three times (counts 2, 1, 1),
    // web -> db:23 once, an allowed connection (no audit), and a prevent on n2.
    let t = T0 + S;
    publish_decisions(
        &js,
        "n1",
        1,
        t,
        vec![
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                22,
                Verdict::Alert,
                by_rule("r1"),
                t,
                2,
            ),
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                23,
                Verdict::Alert,
                by_rule("r1"),
                t + S,
                1,
            ),
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                5432,
                Verdict::Allow,
                by_model(WEB),
                t,
                9,
            ),
        ],
    )
    .await;
    publish_decisions(
        &js,
        "n1",
        2,
        t + 2 * S,
        vec![
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                22,
                Verdict::Alert,
                by_rule("r1"),
                t + 2 * S,
                1,
            ),
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                22,
                Verdict::Alert,
                by_rule("r1"),
                t + 3 * S,
                1,
            ),
        ],
    )
    .await;
    publish_decisions(
        &js,
        "n2",
        1,
        t + 4 * S,
        vec![decision(
            (image(API), API_IP),
            (unknown(), EVIL_IP),
            443,
            Verdict::Prevent,
            by_mode(),
            t + 4 * S,
            1,
        )],
    )
    .await;
    service.caught_up(&js).await;

    let all = service.list(T0, T0 + 60 * S, AuditFilter::default(), 100).await;
    assert_eq!(all.len(), 3, "{all:#?}");
    let first = &all[0];
    assert_eq!(first.audit_id, "audit:CNNF_FLOWS:1:0");
    assert_eq!(first.count, 4);
    assert_eq!(
        (first.first_seen_unix_nanos, first.last_seen_unix_nanos),
        (t, t + 3 * S)
    );
    assert_eq!(first.destination.as_ref().unwrap().port, 22);
    assert_eq!(
        first.source.as_ref().unwrap().port,
        0,
        "source ports are not part of an audit"
    );
    assert_eq!(
        first.source.as_ref().unwrap().identity.as_ref().unwrap().container_id,
        format!("{WEB}-container")
    );
    assert_eq!(first.decided_by, "rule:r1");
    assert_eq!((first.node.as_str(), first.verdict), ("n1", Verdict::Alert as i32));
    assert_eq!(first.verdict_table_version, 7);
    assert_eq!((all[1].destination.as_ref().unwrap().port, all[1].count), (23, 1));
    assert_eq!((all[2].node.as_str(), all[2].decided_by.as_str()), ("n2", "mode"));

    // Filters and paging.
    let ids = |audits: &[Audit]| audits.iter().map(|a| a.audit_id.clone()).collect::<Vec<_>>();
    let paged = service.list(T0, T0 + 60 * S, AuditFilter::default(), 1).await;
    assert_eq!(ids(&paged), ids(&all));
    let filter = |f: AuditFilter| f;
    let by_node = service
        .list(
            T0,
            0,
            filter(AuditFilter {
                node: "n2".into(),
                ..Default::default()
            }),
            10,
        )
        .await;
    assert_eq!(ids(&by_node), vec![all[2].audit_id.clone()]);
    let by_verdict = service
        .list(
            T0,
            0,
            AuditFilter {
                verdict: Verdict::Alert as i32,
                ..Default::default()
            },
            10,
        )
        .await;
    assert_eq!(ids(&by_verdict), ids(&all[..2]));
    let by_rule_page = service
        .list(
            T0,
            0,
            AuditFilter {
                decided_by: "rule:r1".into(),
                node: "n1".into(),
                ..Default::default()
            },
            1,
        )
        .await;
    assert_eq!(ids(&by_rule_page), ids(&all[..2]));
    let by_image = service
        .list(
            T0,
            0,
            AuditFilter {
                image_id: DB.into(),
                ..Default::default()
            },
            10,
        )
        .await;
    assert_eq!(ids(&by_image), ids(&all[..2]));
    let by_time = service.list(t + S, t + 2 * S, AuditFilter::default(), 10).await;
    assert_eq!(ids(&by_time), vec![all[1].audit_id.clone()]);
    let bad = service
        .client()
        .await
        .list_audits(ListAuditsRequest {
            page_token: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("page_token"), "{}", bad.message());

    // Published: one message per audit, at once.
    eventually("three audits published", || async {
        (stream_messages(&js, AUDIT).await == 3).then_some(())
    })
    .await;
    let published = read_all(&js, AUDIT).await;
    assert_eq!(published[0].0, "cnnf.audit.v1.c.n1.alert");
    assert_eq!(published[0].1, "audit:CNNF_FLOWS:1:0");
    assert!(published
        .iter()
        .any(|(subject, _, _)| subject == "cnnf.audit.v1.c.n2.prevent"));

    // A decision past the window's end and the grace closes the window: the
    // grown audit is published again with its final count.
    let later = T0 + 30 * S;
    publish_decisions(
        &js,
        "n1",
        3,
        later,
        vec![decision(
            (image(WEB), WEB_IP),
            (image(DB), DB_IP),
            5432,
            Verdict::Allow,
            by_model(WEB),
            later,
            1,
        )],
    )
    .await;
    eventually("the final count published", || async {
        (stream_messages(&js, AUDIT).await == 4).then_some(())
    })
    .await;
    let published = read_all(&js, AUDIT).await;
    let (_, id, envelope) = &published[3];
    assert_eq!(id, "audit:CNNF_FLOWS:1:0:4");
    let Some(Payload::Audit(last)) = &envelope.payload else {
        panic!("not an audit: {envelope:?}")
    };
    assert_eq!((last.audit_id.as_str(), last.count), ("audit:CNNF_FLOWS:1:0", 4));
    service.stop().await;
}

/// A Python venv with nats-py and protobuf, made once per machine.
fn python() -> PathBuf {
    let venv = std::env::temp_dir().join("cnnf-audit-python-venv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import nats, google.protobuf"])
        .status()
        .is_ok_and(|status| status.success());
    if !ready {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(status.success(), "creating the venv failed");
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "nats-py", "protobuf"])
            .status()
            .expect("pip install");
        assert!(status.success(), "pip install nats-py protobuf failed");
    }
    python
}

/// Compiles the published .proto files to Python modules in `out`, with
/// `protoc` (Debian: protobuf-compiler) or else grpcio-tools.
fn python_modules(python: &Path, out: &Path) {
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<String> = ["common", "events", "model", "policy", "audit"]
        .iter()
        .map(|name| format!("cnnf/v1/{name}.proto"))
        .collect();
    let include = format!("-I{}", proto_root.display());
    let python_out = format!("--python_out={}", out.display());
    let with_protoc = Command::new("protoc")
        .arg(&include)
        .arg(&python_out)
        .args(&files)
        .status();
    if with_protoc.is_ok_and(|status| status.success()) {
        return;
    }
    let pip = python.with_file_name("pip");
    let status = Command::new(pip)
        .args(["install", "--quiet", "grpcio-tools"])
        .status()
        .unwrap();
    assert!(status.success(), "pip install grpcio-tools failed");
    let status = Command::new(python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(&include)
        .arg(&python_out)
        .args(&files)
        .status()
        .unwrap();
    assert!(status.success(), "compiling the .proto files failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_subscriber_decodes_protobuf_audits_and_json_twins() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;

    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let modules = tempfile::tempdir().unwrap();
    python_modules(&python, modules.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/subscriber.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .arg(server.url())
        .arg("2")
        .arg("60")
        .env("PYTHONPATH", modules.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let _ = lines_tx.send(serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}")));
        }
    });
    let ready = tokio::time::timeout(WAIT, lines.recv()).await.unwrap().unwrap();
    assert_eq!(ready["kind"], "ready");

    let t = T0 + S;
    publish_decisions(
        &js,
        "n1",
        1,
        t,
        vec![
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                22,
                Verdict::Alert,
                by_rule("r1"),
                t,
                3,
            ),
            decision(
                (image(WEB), WEB_IP),
                (unknown(), EVIL_IP),
                443,
                Verdict::Prevent,
                by_mode(),
                t,
                1,
            ),
            decision(
                (image(WEB), WEB_IP),
                (image(DB), DB_IP),
                5432,
                Verdict::Allow,
                by_model(WEB),
                t,
                1,
            ),
        ],
    )
    .await;

    let mut received = Vec::new();
    while received.len() < 4 {
        let line = tokio::time::timeout(WAIT, lines.recv()).await.unwrap().unwrap();
        assert_ne!(line["kind"], "timeout", "{line}");
        received.push(line);
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    reader.join().unwrap();
    service.stop().await;

    let of_kind = |kind: &str| {
        let mut audits: Vec<serde_json::Value> = received.iter().filter(|line| line["kind"] == kind).cloned().collect();
        audits.sort_by_key(|line| line["audit"]["audit_id"].as_str().unwrap().to_owned());
        audits
    };
    let proto = of_kind("proto");
    let json = of_kind("json");
    assert_eq!((proto.len(), json.len()), (2, 2), "{received:#?}");
    let alert = &proto[0];
    assert_eq!(alert["subject"], "cnnf.audit.v1.c.n1.alert");
    assert_eq!(alert["msg_id"], "audit:CNNF_FLOWS:1:0");
    assert_eq!(alert["audit"]["audit_id"], "audit:CNNF_FLOWS:1:0");
    assert_eq!(alert["audit"]["verdict"], "VERDICT_ALERT");
    assert_eq!(alert["audit"]["count"], 3);
    assert_eq!(alert["audit"]["decided_by"], "rule:r1");
    assert_eq!(alert["audit"]["source"]["address"], WEB_IP);
    assert_eq!(alert["audit"]["source"]["identity_id"], WEB);
    assert_eq!(alert["audit"]["source"]["container_id"], format!("{WEB}-container"));
    assert_eq!(alert["audit"]["destination"]["port"], 22);
    assert_eq!(alert["audit"]["protocol"], "PROTOCOL_TCP");
    let prevent = &proto[1];
    assert_eq!(prevent["subject"], "cnnf.audit.v1.c.n1.prevent");
    assert_eq!(
        prevent["audit"]["destination"]["identity_kind"],
        "IDENTITY_KIND_UNKNOWN"
    );
    assert_eq!(prevent["audit"]["destination"]["address"], EVIL_IP);

    let twin = &json[0];
    assert_eq!(twin["subject"], "cnnf.audit.json.v1.c.n1.alert");
    assert_eq!(twin["audit"]["audit_id"], "audit:CNNF_FLOWS:1:0");
    assert_eq!(twin["audit"]["verdict"], "alert");
    assert_eq!(twin["audit"]["count"], 3);
    assert_eq!(twin["audit"]["first_seen_unix_nanos"], t);
    assert_eq!(twin["audit"]["source"]["identity_kind"], "image");
    assert_eq!(twin["audit"]["destination"]["port"], 22);
    assert_eq!(json[1]["audit"]["verdict"], "prevent");
}

/// Decisions over several windows and nodes, some repeated.
async fn publish_scenario(js: &jetstream::Context, base: i64) {
    let mut seq = 0;
    for step in 0..12i64 {
        let t = base + step * 3 * S + 500_000_000;
        seq += 1;
        let node = if step % 3 == 0 { "n2" } else { "n1" };
        publish_decisions(
            js,
            node,
            seq,
            t,
            vec![
                decision(
                    (image(WEB), WEB_IP),
                    (image(DB), DB_IP),
                    22,
                    Verdict::Alert,
                    by_rule("r1"),
                    t,
                    1,
                ),
                decision(
                    (image(WEB), WEB_IP),
                    (unknown(), EVIL_IP),
                    443,
                    Verdict::Alert,
                    by_mode(),
                    t,
                    2,
                ),
                decision(
                    (image(API), API_IP),
                    (image(DB), DB_IP),
                    5432,
                    Verdict::Allow,
                    by_model(API),
                    t,
                    3,
                ),
                decision(
                    (image(API), API_IP),
                    (image(DB), DB_IP),
                    6379 + u32::try_from(step % 2).unwrap(),
                    Verdict::Prevent,
                    by_rule("r2"),
                    t + S,
                    1,
                ),
            ],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_range_equals_the_live_audits_of_that_range() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;
    let base = recent_base();
    publish_scenario(&js, base).await;
    service.caught_up(&js).await;

    // A range that starts and ends inside windows: widened to whole windows.
    let mut client = service.client().await;
    let replay = client
        .replay(ReplayRequest {
            from_unix_nanos: base + 12 * S,
            to_unix_nanos: base + 27 * S,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (replay.from_unix_nanos, replay.to_unix_nanos),
        (base + 10 * S, base + 30 * S)
    );
    assert!(!replay.truncated);
    let live = service
        .list(replay.from_unix_nanos, replay.to_unix_nanos, AuditFilter::default(), 7)
        .await;
    assert!(live.len() >= 6, "{live:#?}");
    assert_eq!(replay.audits, live);
    // Decisions of the widened range [10 s, 30 s): the three at
    // t = 3 s * step + 0.5 s of steps 4..=9, and the one at t + 1 s of
    // steps 3..=9 (allowed decisions count too).
    assert_eq!(replay.decisions, 6 * 3 + 7);

    // The whole scenario, filtered by node, also matches.
    let filter = AuditFilter {
        node: "n2".into(),
        ..Default::default()
    };
    let replay = client
        .replay(ReplayRequest {
            from_unix_nanos: base,
            to_unix_nanos: base + 60 * S,
            filter: Some(filter.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let live = service.list(base, base + 60 * S, filter, 100).await;
    assert!(!live.is_empty());
    assert_eq!(replay.audits, live);

    let bad = client
        .replay(ReplayRequest {
            from_unix_nanos: base,
            to_unix_nanos: base,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    service.stop().await;
}

/// A verdict change as compared: source id, destination id, port,
/// recorded, simulated, decided by, count, address pairs.
type Change = (String, String, u32, i32, i32, String, u64, u64);

fn object(name: &str, image_id: &str) -> NetworkObject {
    NetworkObject {
        name: name.into(),
        kind: network_object::Kind::Image as i32,
        image_id: image_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulating_a_candidate_reports_exactly_the_changed_connections() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;
    let base = recent_base();

    // Recorded under mode alert: web -> db:5432 allowed by web's model,
    // web -> evil:443 and web -> db:22 alerted, api -> db:5432 allowed by
    // api's model (still learning then).
    let mut seq = 0;
    for step in 0..5i64 {
        let t = base + step * S;
        seq += 1;
        publish_decisions(
            &js,
            "n1",
            seq,
            t,
            vec![
                decision(
                    (image(WEB), WEB_IP),
                    (image(DB), DB_IP),
                    5432,
                    Verdict::Allow,
                    by_model(WEB),
                    t,
                    2,
                ),
                decision(
                    (image(WEB), WEB_IP),
                    (unknown(), EVIL_IP),
                    443,
                    Verdict::Alert,
                    by_mode(),
                    t,
                    1,
                ),
                decision(
                    (image(WEB), WEB_IP),
                    (image(DB), DB_IP),
                    22,
                    Verdict::Alert,
                    by_mode(),
                    t,
                    3,
                ),
                decision(
                    (image(API), API_IP),
                    (image(DB), DB_IP),
                    5432,
                    Verdict::Learn,
                    by_model(API),
                    t,
                    1,
                ),
            ],
        )
        .await;
    }
    // Outside the range: never evaluated.
    let outside = base + 100 * S;
    publish_decisions(
        &js,
        "n1",
        99,
        outside,
        vec![decision(
            (image(WEB), WEB_IP),
            (unknown(), EVIL_IP),
            443,
            Verdict::Alert,
            by_mode(),
            outside,
            50,
        )],
    )
    .await;

    // The candidate: prevent mode; web may reach db on 22 and what it
    // learned, else prevent; web learned db:5432; api's model enforces
    // with nothing learned.
    let candidate = VerdictTable {
        version: 8,
        cluster: CLUSTER.into(),
        mode: Mode::Prevent as i32,
        objects: vec![object("web", WEB), object("db", DB)],
        rules: vec![Rule {
            id: "r-web".into(),
            source: "web".into(),
            destinations: vec![RuleDestination {
                object: "db".into(),
                ports: vec![PortRange { first: 22, last: 0 }],
                protocol: Protocol::Tcp as i32,
                effect: RuleEffect::Unspecified as i32,
            }],
            allow_learned: true,
            effect: RuleEffect::Prevent as i32,
            ..Default::default()
        }],
        models: vec![
            CompiledModel {
                image_id: WEB.into(),
                state: ModelState::Enforcing as i32,
                inbound: vec![],
                outbound: vec![LearnedConnection {
                    side: Side::Outbound as i32,
                    peer: Some(Identity {
                        kind: IdentityKind::Image as i32,
                        id: DB.into(),
                        ..Default::default()
                    }),
                    port: 5432,
                    protocol: Protocol::Tcp as i32,
                    ..Default::default()
                }],
            },
            CompiledModel {
                image_id: API.into(),
                state: ModelState::Enforcing as i32,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let mut client = service.client().await;
    let report = client
        .simulate(SimulateRequest {
            candidate: Some(candidate),
            from_unix_nanos: base,
            to_unix_nanos: base + 10 * S,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.decisions_evaluated, 20);
    assert_eq!(report.connections_evaluated, 5 * (2 + 1 + 3 + 1));
    let changes: Vec<Change> = report
        .changes
        .iter()
        .map(|change| {
            (
                change.source.as_ref().unwrap().id.clone(),
                change.destination.as_ref().unwrap().id.clone(),
                change.port,
                change.recorded,
                change.simulated,
                change.simulated_decided_by.clone(),
                change.count,
                change.address_pairs,
            )
        })
        .collect();
    // By source, then destination (identity kind, then id: an unknown
    // destination sorts after images), then port.
    let expected = vec![
        (
            API.to_owned(),
            DB.to_owned(),
            5432,
            Verdict::Learn as i32,
            Verdict::Prevent as i32,
            "mode".to_owned(),
            5,
            1,
        ),
        (
            WEB.to_owned(),
            DB.to_owned(),
            22,
            Verdict::Alert as i32,
            Verdict::Allow as i32,
            "rule:r-web".to_owned(),
            15,
            1,
        ),
        (
            WEB.to_owned(),
            String::new(),
            443,
            Verdict::Alert as i32,
            Verdict::Prevent as i32,
            "rule:r-web".to_owned(),
            5,
            1,
        ),
    ];
    assert_eq!(changes, expected);
    assert_eq!(report.connections_changed, 5 + 5 + 15);

    // The same candidate in its JSON form gives the same report.
    let json = format!(
        r#"{{"version": 8, "mode": "prevent",
            "objects": [{{"name": "web", "kind": "image", "image_id": "{WEB}"}},
                        {{"name": "db", "kind": "image", "image_id": "{DB}"}}],
            "rules": [{{"id": "r-web", "source": "web", "allow_learned": true, "effect": "prevent",
                        "destinations": [{{"object": "db", "ports": ["22"], "protocol": "tcp"}}]}}],
            "models": [{{"image_id": "{WEB}", "state": "enforcing",
                         "outbound": [{{"peer": {{"kind": "image", "id": "{DB}"}}, "port": 5432, "protocol": "tcp"}}]}},
                       {{"image_id": "{API}", "state": "enforcing"}}]}}"#
    );
    let from_json = client
        .simulate(SimulateRequest {
            candidate_json: json.into_bytes(),
            from_unix_nanos: base,
            to_unix_nanos: base + 10 * S,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_json, report);

    let bad = client
        .simulate(SimulateRequest {
            candidate_json: br#"{"mode": "sometimes"}"#.to_vec(),
            from_unix_nanos: base,
            to_unix_nanos: base + 10 * S,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("mode"), "{}", bad.message());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_scan_is_one_incident_and_a_bounded_number_of_audits() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;

    // An nmap-like sweep of ports 1..=1000 of one host within 1 s, in
    // batches of 100 as the agent publishes them, all prevented.
    let scanner = (image(WEB), WEB_IP);
    for batch in 0..10u32 {
        let decisions = (1..=100u32)
            .map(|i| {
                let port = batch * 100 + i;
                let t = T0 + i64::from(port) * 1_000_000;
                decision(
                    scanner.clone(),
                    (image(DB), DB_IP),
                    port,
                    Verdict::Prevent,
                    by_mode(),
                    t,
                    1,
                )
            })
            .collect();
        publish_decisions(&js, "n1", u64::from(batch) + 1, T0, decisions).await;
    }
    service.caught_up(&js).await;

    eventually("one incident", || async {
        (stream_messages(&js, INCIDENTS).await >= 1).then_some(())
    })
    .await;
    let audits = service.list(T0, T0 + 60 * S, AuditFilter::default(), 1000).await;
    // Ports 1..=19 are audited one by one; the 20th makes the source a
    // scanner, and it and every later probe join one audit with port 0.
    assert_eq!(audits.len(), 20, "{audits:#?}");
    let aggregated = audits
        .iter()
        .find(|audit| audit.destination.as_ref().unwrap().port == 0)
        .unwrap();
    assert_eq!(aggregated.count, 981);
    assert_eq!(audits.iter().map(|audit| audit.count).sum::<u64>(), 1000);
    eventually("20 audits published", || async {
        (stream_messages(&js, AUDIT).await == 20).then_some(())
    })
    .await;

    let incidents = read_all(&js, INCIDENTS).await;
    assert_eq!(incidents.len(), 1);
    let (subject, id, envelope) = &incidents[0];
    assert_eq!(subject, "cnnf.incident.c.port-scan");
    assert_eq!(id, "audit-scan:CNNF_FLOWS:1:19");
    let Some(Payload::Incident(incident)) = &envelope.payload else {
        panic!("not an incident")
    };
    assert_eq!(incident.kind, incident::Kind::PortScan as i32);
    assert_eq!(incident.image_id, WEB);
    assert_eq!(incident.details["source_address"], WEB_IP);
    assert_eq!(incident.details["distinct_ports"], "20");
    assert_eq!(incident.details["node"], "n1");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_a_restart_in_the_middle_of_the_stream_lose_and_double_nothing() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    // Crash once, after the commit of the batch holding sequence >= 5 and
    // before its ack.
    let crashed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&crashed);
    let options = RunOptions {
        flows_after_commit: Some(Arc::new(move |committed| {
            if committed >= 5 && !flag.swap(true, Ordering::SeqCst) {
                HookAction::Crash
            } else {
                HookAction::Continue
            }
        })),
        ..Default::default()
    };
    let service = Service::start(&server, store, data.path(), options).await;

    // 8 keys (ports), each seen 5 times over 20 messages, in one window.
    let mut seq = 0;
    let publish_half = |from: u64, to: u64| {
        let js = js.clone();
        async move {
            for message in from..to {
                let t = T0 + i64::try_from(message).unwrap() * 100_000_000;
                let decisions = (0..2u32)
                    .map(|i| {
                        let port = 1000 + ((u32::try_from(message).unwrap() * 2 + i) % 8);
                        decision(
                            (image(WEB), WEB_IP),
                            (image(DB), DB_IP),
                            port,
                            Verdict::Alert,
                            by_rule("r1"),
                            t,
                            1,
                        )
                    })
                    .collect();
                publish_decisions(&js, "n1", message + 1, t, decisions).await;
            }
        }
    };
    publish_half(0, 10).await;
    seq += 10;
    eventually("the failpoint", || async {
        crashed.load(Ordering::SeqCst).then_some(())
    })
    .await;
    service.caught_up(&js).await;
    let store = service.stop().await;
    // A full restart on the same store, then the rest of the stream.
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;
    publish_half(seq, 20).await;
    service.caught_up(&js).await;

    let audits = service.list(T0, T0 + 60 * S, AuditFilter::default(), 100).await;
    assert_eq!(audits.len(), 8);
    let counts: BTreeMap<u32, u64> = audits
        .iter()
        .map(|audit| (audit.destination.as_ref().unwrap().port, audit.count))
        .collect();
    assert_eq!(counts, (1000..1008).map(|port| (port, 5)).collect::<BTreeMap<_, _>>());
    eventually("8 audits published once each", || async {
        (stream_messages(&js, AUDIT).await == 8).then_some(())
    })
    .await;
    let published = read_all(&js, AUDIT).await;
    let mut ids: Vec<_> = published.iter().map(|(_, id, _)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);
    service.stop().await;
}

fn envelope(node: &str, id: &str, time: i64, payload: Payload) -> Envelope {
    Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id.into(),
        cluster: CLUSTER.into(),
        node: node.into(),
        time_unix_nanos: time,
        payload: Some(payload),
        ..Default::default()
    }
}

fn workload(container: &str, image_id: &str, address: &str) -> Workload {
    Workload {
        container_id: container.into(),
        image_id: image_id.into(),
        image_name: format!("{image_id}-name"),
        addresses: vec![address.into()],
        cluster: CLUSTER.into(),
        node: "n1".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_questions_answer_from_the_history() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, store, data.path(), RunOptions::default()).await;
    let workload_subject = "cnnf.workload.c.n1";
    let started = |container: &str, image_id: &str| {
        Payload::WorkloadStarted(WorkloadStarted {
            workload: Some(workload(container, image_id, "10.1.2.3")),
        })
    };
    publish(&js, workload_subject, envelope("n1", "w1", T0, started("c1", WEB))).await;
    let stopped = Payload::WorkloadStopped(WorkloadStopped {
        workload: Some(workload("c1", WEB, "10.1.2.3")),
        reason: "exited".into(),
    });
    publish(&js, workload_subject, envelope("n1", "w2", T0 + 100 * S, stopped)).await;
    publish(
        &js,
        workload_subject,
        envelope("n1", "w3", T0 + 200 * S, started("c2", DB)),
    )
    .await;

    let policy = |revision: u64, change: policy_event::Change| {
        Payload::Policy(PolicyEvent {
            revision,
            actor: "alice".into(),
            change: Some(change),
        })
    };
    let mode_set = policy_event::Change::ModeSet(policy_event::ModeSet {
        mode: Mode::Alert as i32,
        host: false,
    });
    publish(&js, "cnnf.policy.c.mode", envelope("", "p1", T0, policy(1, mode_set))).await;
    let rule = Rule {
        id: "r1".into(),
        source: "web".into(),
        ..Default::default()
    };
    let rule_put = policy_event::Change::RulePut(policy_event::RulePut { rule: Some(rule) });
    publish(
        &js,
        "cnnf.policy.c.rule",
        envelope("", "p2", T0 + 10 * S, policy(2, rule_put)),
    )
    .await;
    let imported = policy_event::Change::Imported(policy_event::Imported {
        objects: vec![object("db", DB)],
        rules: vec![],
        mode: Mode::Prevent as i32,
        host_mode: Mode::Alert as i32,
        ..Default::default()
    });
    publish(
        &js,
        "cnnf.policy.c.import",
        envelope("", "p3", T0 + 100 * S, policy(3, imported)),
    )
    .await;

    let model = |change: model_event::Change| {
        Payload::Model(ModelEvent {
            image_id: WEB.into(),
            revision: 0,
            actor: "learning".into(),
            change: Some(change),
        })
    };
    let created = model_event::Change::Created(model_event::Created {
        image_name: "web:1".into(),
        learning_ends_unix_nanos: T0 + 60 * S,
    });
    let model_subject = format!("cnnf.model.{WEB}");
    publish(&js, &model_subject, envelope("", "m1", T0, model(created))).await;
    let learned = model_event::Change::Learned(model_event::Learned {
        connections: vec![LearnedConnection::default(); 3],
    });
    publish(&js, &model_subject, envelope("", "m2", T0 + 5 * S, model(learned))).await;
    let locked = model_event::Change::Locked(model_event::Locked {
        reason: "period-ended".into(),
    });
    publish(&js, &model_subject, envelope("", "m3", T0 + 60 * S, model(locked))).await;
    service.caught_up(&js).await;

    let mut client = service.client().await;
    let who = |at: i64| {
        let mut client = client.clone();
        async move {
            client
                .who_held(WhoHeldRequest {
                    address: "10.1.2.3".into(),
                    at_unix_nanos: at,
                })
                .await
                .unwrap()
                .into_inner()
                .holdings
                .into_iter()
                .map(|holding| holding.workload.unwrap().container_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(who(T0 - S).await, Vec::<String>::new());
    assert_eq!(who(T0 + 50 * S).await, vec!["c1"]);
    assert_eq!(who(T0 + 150 * S).await, Vec::<String>::new());
    assert_eq!(who(T0 + 250 * S).await, vec!["c2"]);
    let bad = client
        .who_held(WhoHeldRequest {
            address: "not-an-address".into(),
            at_unix_nanos: T0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let state = client
        .state_at(StateAtRequest {
            at_unix_nanos: T0 + 30 * S,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((state.policy_revision, state.mode), (2, Mode::Alert as i32));
    assert_eq!(
        state.rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec!["r1"]
    );
    assert_eq!(state.models.len(), 1);
    assert_eq!(state.models[0].state, ModelState::Learning as i32);
    assert_eq!(state.models[0].learned_connections, 3);
    assert_eq!(state.models[0].image_name, "web:1");
    let state = client
        .state_at(StateAtRequest {
            at_unix_nanos: T0 + 150 * S,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (state.policy_revision, state.mode, state.host_mode),
        (3, Mode::Prevent as i32, Mode::Alert as i32)
    );
    assert!(state.rules.is_empty());
    assert_eq!(state.objects.len(), 1);
    assert_eq!(state.models[0].state, ModelState::Enforcing as i32);
    assert_eq!(state.models[0].state_since_unix_nanos, T0 + 60 * S);
    service.stop().await;
}

/// A store dump: table and entry.
type Dump = Vec<(&'static str, cnnf_store::Entry)>;

/// The store's entries of `table`.
fn entries_of(dump: &Dump, table: &str) -> Vec<cnnf_store::Entry> {
    dump.iter()
        .filter(|(name, _)| *name == table)
        .map(|(_, entry)| entry.clone())
        .collect()
}

/// The number of an audit from its id `audit:CNNF_FLOWS:<seq>:<part>`.
fn number_of(audit: &Audit) -> AuditNumber {
    let mut parts = audit.audit_id.rsplitn(3, ':');
    let part = parts.next().unwrap().parse().unwrap();
    let sequence = parts.next().unwrap().parse().unwrap();
    AuditNumber { sequence, part }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_audits_with_their_index_entries_and_nothing_else() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let data = tempfile::tempdir().unwrap();
    let store = open_store(&data.path().join("store"));
    let service = Service::start(&server, Arc::clone(&store), data.path(), RunOptions::default()).await;

    // Three hours ago (beyond a retention of one hour): web -> db:22
    // alerted twice (one audit, count 2) on n1, api -> evil:443 prevented
    // on n2, and a workload start (address history, which retention keeps).
    // Two minutes ago: web -> db:23 alerted on n1.
    let recent = recent_base();
    let old = recent - 3 * 3600 * S;
    let web_db = |port: u32, time: i64| {
        decision(
            (image(WEB), WEB_IP),
            (image(DB), DB_IP),
            port,
            Verdict::Alert,
            by_rule("r1"),
            time,
            1,
        )
    };
    publish_decisions(&js, "n1", 1, old + S, vec![web_db(22, old + S)]).await;
    let api_evil = decision(
        (image(API), API_IP),
        (unknown(), EVIL_IP),
        443,
        Verdict::Prevent,
        by_mode(),
        old + 2 * S,
        1,
    );
    publish_decisions(&js, "n2", 1, old + 2 * S, vec![api_evil]).await;
    publish_decisions(&js, "n1", 2, old + 3 * S, vec![web_db(22, old + 3 * S)]).await;
    let started = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload("c1", WEB, WEB_IP)),
    });
    publish(&js, "cnnf.workload.c.n1", envelope("n1", "w1", old, started)).await;
    publish_decisions(&js, "n1", 3, recent + S, vec![web_db(23, recent + S)]).await;
    service.caught_up(&js).await;
    eventually("the outbox drained", || async {
        store
            .scan_prefix(store::OUTBOX, b"", 1)
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    let all = service.list(0, 0, AuditFilter::default(), 100).await;
    assert_eq!(all.len(), 3, "kept under the default retention: {all:#?}");
    let (expired, kept): (Vec<_>, Vec<_>) = all.iter().partition(|audit| audit.first_seen_unix_nanos < recent);
    assert_eq!(expired.len(), 2);
    assert_eq!(expired[0].count, 2);
    let store = service.stop().await;
    let before = cnnf_store::dump(store.as_ref()).unwrap();

    // What retention must remove: the two records, every index entry of
    // them (7 for web -> db: time, node, verdict, rule, cluster, two images;
    // 6 for api -> evil: one image), and the dedup keys of their window.
    let mut removed: Dump = Vec::new();
    for audit in &expired {
        let number = number_of(audit);
        let record = store.get(store::RECORDS, &number.encode()).unwrap().unwrap();
        removed.push((store::RECORDS, (number.encode().to_vec(), record)));
        for key in cnnf_audit::index::entries(audit, audit.first_seen_unix_nanos, number) {
            removed.push((store::INDEX, (key, Vec::new())));
        }
    }
    assert_eq!(removed.len(), 2 + 7 + 6);
    let recent_window = store::time_bytes(recent.div_euclid(10 * S));
    let old_keys: Vec<_> = entries_of(&before, store::KEYS)
        .into_iter()
        .filter(|(key, _)| key[..8] < recent_window[..])
        .collect();
    assert_eq!(old_keys.len(), 2);
    removed.extend(old_keys.into_iter().map(|entry| (store::KEYS, entry)));
    let expected: Vec<_> = before
        .iter()
        .filter(|entry| !removed.contains(entry))
        .cloned()
        .collect();
    assert_eq!(expected.len(), before.len() - removed.len(), "every removal was stored");

    // Again with a retention of one hour, sweeping every 100 ms.
    let options = RunOptions {
        retention_sweep_interval: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let service = Service::start_with(&server, store, data.path(), options, &["--retention-hours", "1"]).await;
    eventually("the sweep to remove exactly the expired audits", || async {
        (cnnf_store::dump(service.store.as_ref()).unwrap() == expected).then_some(())
    })
    .await;
    let ids = |audits: &[Audit]| audits.iter().map(|a| a.audit_id.clone()).collect::<Vec<_>>();
    let kept_ids = vec![kept[0].audit_id.clone()];
    assert_eq!(ids(&service.list(0, 0, AuditFilter::default(), 100).await), kept_ids);
    for filter in [
        AuditFilter {
            node: "n2".into(),
            ..Default::default()
        },
        AuditFilter {
            image_id: API.into(),
            ..Default::default()
        },
        AuditFilter {
            verdict: Verdict::Prevent as i32,
            ..Default::default()
        },
    ] {
        assert!(service.list(0, 0, filter, 100).await.is_empty());
    }
    let by_rule = AuditFilter {
        decided_by: "rule:r1".into(),
        ..Default::default()
    };
    assert_eq!(ids(&service.list(0, 0, by_rule, 1).await), kept_ids);
    assert!(service
        .list(old, old + 60 * S, AuditFilter::default(), 100)
        .await
        .is_empty());
    let mut client = service.client().await;
    let holders = client
        .who_held(WhoHeldRequest {
            address: WEB_IP.into(),
            at_unix_nanos: old + S,
        })
        .await
        .unwrap()
        .into_inner()
        .holdings;
    assert_eq!(holders.len(), 1, "address history is not audits: it stays");

    // A decision older than the retention that arrives late is audited and
    // published like any other (its window's dedup key is gone, so it opens
    // a new audit), then the next sweep removes it.
    publish_decisions(&js, "n1", 4, old + 4 * S, vec![web_db(22, old + 4 * S)]).await;
    let late = last_sequence(&js, FLOWS).await;
    service.caught_up(&js).await;
    let late_id = format!("audit:CNNF_FLOWS:{late}:0");
    eventually("the late audit published", || async {
        read_all(&js, AUDIT)
            .await
            .iter()
            .any(|(_, id, _)| *id == late_id)
            .then_some(())
    })
    .await;
    eventually("the late audit removed", || async {
        let late_number = AuditNumber {
            sequence: late,
            part: 0,
        };
        service
            .store
            .get(store::RECORDS, &late_number.encode())
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(ids(&service.list(0, 0, AuditFilter::default(), 100).await), kept_ids);
    service.stop().await;
}
