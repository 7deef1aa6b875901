//! The modeler against a real nats-server and real RocksDB stores:
//! learning, locking at the end of the period (not before), relearn,
//! extend, deleting a learned connection, invalid commands, learning
//! bursts, crashes and restarts in the middle of the stream, and a replay
//! of the whole log into an empty store.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use clap::Parser as _;
use cnnf_bus::runner::HookAction;
use cnnf_bus::topology::{FLOWS, INCIDENTS, MODELS, WORKLOADS};
use cnnf_modeler::{Config, RunOptions, FLOWS_DURABLE, MODELS_DURABLE, MODEL_TABLES, WORKLOADS_DURABLE};
use cnnf_proto::v1::models_client::ModelsClient;
use cnnf_proto::v1::{
    envelope::Payload, model_command, model_event, ConnectionDecision, DecisionBatch, Direction, Endpoint, Envelope,
    GetModelRequest, Identity, IdentityKind, LearnedConnection, ListLearnedConnectionsRequest, ModelCommand,
    ModelState, ModelSummary, Protocol, Side, Workload, WorkloadStarted, WorkloadStopped,
};
use cnnf_service::Health;
use cnnf_store::{applied_sequence, ProjectionStore};
use cnnf_testkit::NatsServer;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const S: i64 = 1_000_000_000;
/// Event times of the scripted tests: a fixed instant, so answers are exact.
const T0: i64 = 1_700_000_000 * S;
const CLUSTER: &str = "c";
const WAIT: Duration = Duration::from_secs(60);
const A: &str = "sha256:aaaa";
const B: &str = "sha256:bbbb";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
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
    Arc::new(cnnf_modeler::open_store(dir).unwrap())
}

/// A clock the test moves.
#[derive(Clone)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn new(at: i64) -> Self {
        Self(Arc::new(AtomicI64::new(at)))
    }
    fn set(&self, at: i64) {
        self.0.store(at, Ordering::SeqCst);
    }
    fn options(&self) -> RunOptions {
        let clock = Arc::clone(&self.0);
        RunOptions {
            clock: Some(Arc::new(move || clock.load(Ordering::SeqCst))),
            timer_interval: Some(Duration::from_millis(20)),
            ..RunOptions::default()
        }
    }
}

/// One running modeler.
struct Modeler {
    store: Arc<dyn ProjectionStore>,
    /// `RunOptions::durable_suffix` it runs with.
    suffix: Option<String>,
    health: Health,
    grpc: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Modeler {
    async fn start(server: &NatsServer, store: Arc<dyn ProjectionStore>, extra: &[&str], options: RunOptions) -> Self {
        let grpc = free_addr();
        let url = server.url();
        let grpc_text = grpc.to_string();
        let mut args = vec![
            "cnnf-modeler",
            "--nats-url",
            &url,
            "--cluster",
            CLUSTER,
            "--grpc-addr",
            &grpc_text,
            "--grpc-insecure",
        ];
        if !extra.contains(&"--learning-seconds") {
            args.extend_from_slice(&["--learning-seconds", "100"]);
        }
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        cnnf_service::init_logging();
        let health = Health::default();
        let suffix = options.durable_suffix.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_modeler::run_with_store(
            config,
            Arc::clone(&store),
            health.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        let modeler = Self {
            store,
            suffix,
            health: health.clone(),
            grpc,
            stop: Some(stop),
            task,
        };
        eventually("the service to be ready", || async {
            assert!(!modeler.task.is_finished(), "the service ended early");
            (health.not_ready().is_empty() && ModelsClient::connect(format!("http://{}", modeler.grpc)).await.is_ok())
                .then_some(())
        })
        .await;
        modeler
    }

    async fn client(&self) -> ModelsClient<tonic::transport::Channel> {
        ModelsClient::connect(format!("http://{}", self.grpc)).await.unwrap()
    }

    async fn model(&self, image: &str) -> Option<ModelSummary> {
        let request = GetModelRequest { image_id: image.into() };
        self.client()
            .await
            .get_model(request)
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// Waits until the model of `image` satisfies `check`.
    async fn model_where(&self, what: &str, image: &str, check: impl Fn(&ModelSummary) -> bool) -> ModelSummary {
        eventually(what, || async { self.model(image).await.filter(|model| check(model)) }).await
    }

    async fn learned(&self, image: &str, side: Side, port: u32) -> Vec<LearnedConnection> {
        let request = ListLearnedConnectionsRequest {
            image_id: image.into(),
            side: side as i32,
            port,
            ..Default::default()
        };
        self.client()
            .await
            .list_learned_connections(request)
            .await
            .unwrap()
            .into_inner()
            .connections
    }

    async fn command(
        &self,
        image: &str,
        command: model_command::Command,
    ) -> Result<cnnf_proto::v1::ModelEvent, tonic::Status> {
        let request = ModelCommand {
            image_id: image.into(),
            actor: "alice".into(),
            command: Some(command),
        };
        self.client()
            .await
            .command(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until each runner applied its stream up to its last message.
    async fn caught_up(&self, js: &jetstream::Context) {
        for (stream, durable) in [
            (WORKLOADS, WORKLOADS_DURABLE),
            (FLOWS, FLOWS_DURABLE),
            (MODELS, MODELS_DURABLE),
        ] {
            let last = js
                .get_stream(stream)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .last_sequence;
            let durable = match &self.suffix {
                Some(suffix) => format!("{durable}-{suffix}"),
                None => durable.to_owned(),
            };
            eventually(&durable, || async {
                (applied_sequence(self.store.as_ref(), &durable).unwrap() >= last).then_some(())
            })
            .await;
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

fn envelope(node: &str, id: String, time: i64, payload: Payload) -> Envelope {
    Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id,
        cluster: CLUSTER.into(),
        node: node.into(),
        time_unix_nanos: time,
        payload: Some(payload),
        ..Default::default()
    }
}

async fn start_workload(js: &jetstream::Context, container: &str, image: &str, time: i64) {
    start_workload_in(js, container, image, "", time).await;
}

/// Starts `container` of `image` in Kubernetes namespace `namespace` (none when empty).
async fn start_workload_in(js: &jetstream::Context, container: &str, image: &str, namespace: &str, time: i64) {
    let workload = Workload {
        container_id: container.into(),
        image_id: image.into(),
        image_name: format!("{image}-name"),
        addresses: vec!["10.0.0.1".into()],
        cluster: CLUSTER.into(),
        node: "n1".into(),
        namespace: namespace.into(),
        ..Default::default()
    };
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload),
    });
    publish(
        js,
        "cnnf.workload.c.n1",
        envelope("n1", format!("n1:b:start:{container}"), time, payload),
    )
    .await;
}

async fn stop_workload(js: &jetstream::Context, container: &str, image: &str, time: i64) {
    let workload = Workload {
        container_id: container.into(),
        image_id: image.into(),
        cluster: CLUSTER.into(),
        node: "n1".into(),
        ..Default::default()
    };
    let payload = Payload::WorkloadStopped(WorkloadStopped {
        workload: Some(workload),
        reason: "exited".into(),
    });
    publish(
        js,
        "cnnf.workload.c.n1",
        envelope("n1", format!("n1:b:stop:{container}"), time, payload),
    )
    .await;
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

fn network_object(name: &str) -> Identity {
    Identity {
        kind: IdentityKind::NetworkObject as i32,
        id: name.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn decision(source: Identity, destination: Identity, port: u32, time: i64, count: u64) -> ConnectionDecision {
    ConnectionDecision {
        source: Some(Endpoint {
            address: "10.0.0.1".into(),
            port: 40000,
            identity: Some(source),
        }),
        destination: Some(Endpoint {
            address: "10.0.0.2".into(),
            port,
            identity: Some(destination),
        }),
        protocol: Protocol::Tcp as i32,
        first_seen_unix_nanos: time,
        last_seen_unix_nanos: time,
        count,
        ..Default::default()
    }
}

async fn decisions(js: &jetstream::Context, id: &str, time: i64, decisions: Vec<ConnectionDecision>) -> u64 {
    let payload = Payload::Decisions(DecisionBatch {
        decisions,
        overflow_count: 0,
    });
    publish(
        js,
        "cnnf.flow.c.n1",
        envelope("n1", format!("n1:b:flow:{id}"), time, payload),
    )
    .await
}

/// Every model event of `image` on the log, as (actor, kind).
async fn model_log(js: &jetstream::Context, image: &str) -> Vec<(String, &'static str)> {
    let stream = js.get_stream(MODELS).await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: format!("cnnf.model.{image}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let envelope = Envelope::decode(message.unwrap().payload.as_ref()).unwrap();
        let Some(Payload::Model(event)) = envelope.payload else {
            panic!("not a model event")
        };
        let kind = match event.change.unwrap() {
            model_event::Change::Created(_) => "created",
            model_event::Change::Learned(_) => "learned",
            model_event::Change::Locked(_) => "locked",
            model_event::Change::Extended(_) => "extended",
            model_event::Change::Relearn(_) => "relearn",
            model_event::Change::ConnectionDeleted(_) => "deleted",
            model_event::Change::Liveness(_) => "liveness",
        };
        out.push((event.actor, kind));
    }
    out
}

/// Every entry of the model tables.
type ModelSet = Vec<(&'static str, cnnf_store::Entry)>;

fn model_set(store: &dyn ProjectionStore) -> ModelSet {
    cnnf_store::dump(store)
        .unwrap()
        .into_iter()
        .filter(|(table, _)| MODEL_TABLES.contains(table))
        .collect()
}

const LEARNING: i32 = ModelState::Learning as i32;
const ENFORCING: i32 = ModelState::Enforcing as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_locks_at_the_end_relearns_extends_deletes_and_replays_identically() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "a2", A, T0 + S).await;
    start_workload(&js, "b1", B, T0).await;
    let a = modeler.model_where("model A", A, |m| m.state == LEARNING).await;
    assert_eq!(
        a.learning_ends_unix_nanos,
        T0 + 100 * S,
        "learning ends a period after first seen"
    );
    assert_eq!(a.image_name, format!("{A}-name"));
    modeler
        .model_where("model A containers", A, |m| m.container_count == 2)
        .await;
    modeler.model_where("model B", B, |m| m.state == LEARNING).await;

    // Learning: A → B:5432 (A outbound, B inbound) and A → payments:443.
    decisions(&js, "1", T0 + S, vec![decision(image(A), image(B), 5432, T0 + S, 3)]).await;
    decisions(
        &js,
        "2",
        T0 + 2 * S,
        vec![
            decision(image(A), network_object("payments"), 443, T0 + 2 * S, 1),
            decision(image(A), image(B), 5432, T0 + 2 * S, 2),
        ],
    )
    .await;
    modeler
        .model_where("A learned outbound", A, |m| m.outbound_count == 2)
        .await;
    modeler
        .model_where("B learned inbound", B, |m| m.inbound_count == 1)
        .await;
    modeler.caught_up(&js).await;
    let to_b = modeler.learned(A, Side::Outbound, 5432).await;
    assert_eq!(to_b.len(), 1);
    assert_eq!(
        (
            to_b[0].count,
            to_b[0].first_seen_unix_nanos,
            to_b[0].last_seen_unix_nanos
        ),
        (5, T0 + S, T0 + 2 * S)
    );
    assert_eq!(to_b[0].peer.as_ref().unwrap().id, B);
    assert!(
        to_b[0].peer.as_ref().unwrap().container_id.is_empty(),
        "peers are identities, not containers"
    );
    let from_a = modeler.learned(B, Side::Inbound, 0).await;
    assert_eq!((from_a.len(), from_a[0].port, from_a[0].count), (1, 5432, 5));

    // One nanosecond before the end: several timer ticks, still learning.
    clock.set(T0 + 100 * S - 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    modeler.caught_up(&js).await;
    assert_eq!(modeler.model(A).await.unwrap().state, LEARNING, "locked before the end");
    // Exactly at the end: locked.
    clock.set(T0 + 100 * S);
    modeler.model_where("A locked", A, |m| m.state == ENFORCING).await;
    modeler.model_where("B locked", B, |m| m.state == ENFORCING).await;

    // Enforcing sides learn nothing.
    decisions(
        &js,
        "3",
        T0 + 101 * S,
        vec![decision(image(A), image(B), 6000, T0 + 101 * S, 1)],
    )
    .await;
    modeler.caught_up(&js).await;
    assert_eq!(modeler.model(A).await.unwrap().outbound_count, 2);
    assert_eq!(modeler.model(B).await.unwrap().inbound_count, 1);

    // Relearn A from scratch: only A's outbound side learns; B enforces.
    let relearn = modeler.command(A, model_command::Command::Relearn(true)).await.unwrap();
    assert_eq!(relearn.actor, "alice");
    let a = modeler
        .model_where("A relearning", A, |m| m.state == LEARNING && m.outbound_count == 0)
        .await;
    assert_eq!(a.learning_ends_unix_nanos, T0 + 200 * S);
    assert_eq!(a.revision, relearn.revision);
    assert!(modeler.learned(A, Side::Outbound, 0).await.is_empty());
    decisions(
        &js,
        "4",
        T0 + 102 * S,
        vec![decision(image(A), image(B), 6000, T0 + 102 * S, 1)],
    )
    .await;
    modeler.model_where("A relearned", A, |m| m.outbound_count == 1).await;
    modeler.caught_up(&js).await;
    assert_eq!(
        modeler.model(B).await.unwrap().inbound_count,
        1,
        "an enforcing side learned"
    );

    // Extend by 50 s: from the current end. Sent as the operator gateway
    // sends it: the authenticated caller is recorded, whatever name the
    // body claims.
    let mut request = tonic::Request::new(ModelCommand {
        image_id: A.into(),
        actor: "mallory".into(),
        command: Some(model_command::Command::ExtendBySeconds(50)),
    });
    request.metadata_mut().insert("x-cnnf-actor", "bob".parse().unwrap());
    let extended = modeler.client().await.command(request).await.unwrap().into_inner();
    assert_eq!(extended.actor, "bob");
    modeler
        .model_where("A extended", A, |m| m.learning_ends_unix_nanos == T0 + 250 * S)
        .await;
    // Lock now.
    modeler.command(A, model_command::Command::LockNow(true)).await.unwrap();
    modeler
        .model_where("A locked by the operator", A, |m| m.state == ENFORCING)
        .await;

    // Delete the one learned connection.
    let learned = modeler.learned(A, Side::Outbound, 6000).await;
    assert_eq!(learned.len(), 1);
    modeler
        .command(A, model_command::Command::DeleteConnection(learned[0].clone()))
        .await
        .unwrap();
    modeler
        .model_where("A connection deleted", A, |m| m.outbound_count == 0)
        .await;
    assert!(modeler.learned(A, Side::Outbound, 0).await.is_empty());

    modeler.caught_up(&js).await;
    let log = model_log(&js, A).await;
    let kinds: Vec<&str> = log.iter().map(|(_, kind)| *kind).collect();
    assert_eq!(
        kinds,
        ["created", "learned", "learned", "locked", "relearn", "learned", "extended", "locked", "deleted"]
    );
    assert_eq!(log[3].0, "timer");
    assert_eq!(log[7].0, "alice");

    // Replay the whole log into an empty store: the same model set.
    let live = modeler.stop().await;
    let live_set = model_set(live.as_ref());
    let replay_dir = tempfile::tempdir().unwrap();
    let replay = Modeler::start(&server, open_store(replay_dir.path()), &[], clock.options()).await;
    replay.caught_up(&js).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    replay.caught_up(&js).await;
    let replayed = model_set(replay.store.as_ref());
    assert!(!replayed.is_empty());
    assert_eq!(replayed, live_set, "the replay differs from the live model set");
    assert_eq!(
        model_log(&js, A).await.len(),
        log.len(),
        "the replay published new model events"
    );
    replay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_change_nothing_and_say_why() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;
    start_workload(&js, "a1", A, T0).await;
    modeler.model_where("model A", A, |m| m.state == LEARNING).await;
    modeler.caught_up(&js).await;
    let before = model_set(modeler.store.as_ref());
    let models_before = js
        .get_stream(MODELS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;

    let never_learned = LearnedConnection {
        side: Side::Outbound as i32,
        peer: Some(image(B)),
        port: 1,
        protocol: Protocol::Tcp as i32,
        ..Default::default()
    };
    let cases: Vec<(&str, Option<model_command::Command>, tonic::Code, &str)> = vec![
        (
            "sha256:nope",
            Some(model_command::Command::LockNow(true)),
            tonic::Code::NotFound,
            "no model for image",
        ),
        (
            "",
            Some(model_command::Command::LockNow(true)),
            tonic::Code::InvalidArgument,
            "image_id",
        ),
        (
            "a.b",
            Some(model_command::Command::LockNow(true)),
            tonic::Code::InvalidArgument,
            "image_id",
        ),
        (A, None, tonic::Code::InvalidArgument, "command"),
        (
            A,
            Some(model_command::Command::LockNow(false)),
            tonic::Code::InvalidArgument,
            "lock_now",
        ),
        (
            A,
            Some(model_command::Command::ExtendBySeconds(0)),
            tonic::Code::InvalidArgument,
            "extend_by_seconds",
        ),
        (
            A,
            Some(model_command::Command::ExtendBySeconds(-5)),
            tonic::Code::InvalidArgument,
            "extend_by_seconds",
        ),
        (
            A,
            Some(model_command::Command::Relearn(false)),
            tonic::Code::InvalidArgument,
            "relearn",
        ),
        (
            A,
            Some(model_command::Command::DeleteConnection(never_learned.clone())),
            tonic::Code::NotFound,
            "no learned outbound connection",
        ),
        (
            A,
            Some(model_command::Command::DeleteConnection(LearnedConnection {
                side: 0,
                ..never_learned.clone()
            })),
            tonic::Code::InvalidArgument,
            "delete_connection.side",
        ),
    ];
    for (image_id, command, code, says) in cases {
        let request = ModelCommand {
            image_id: image_id.into(),
            actor: String::new(),
            command,
        };
        let status = modeler.client().await.command(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{image_id}: {status:?}");
        assert!(
            status.message().contains(says),
            "{image_id}: {:?} lacks {says:?}",
            status.message()
        );
    }
    // Locked: extending and locking again are refused.
    modeler.command(A, model_command::Command::LockNow(true)).await.unwrap();
    modeler.model_where("A locked", A, |m| m.state == ENFORCING).await;
    modeler.caught_up(&js).await;
    let locked = model_set(modeler.store.as_ref());
    for command in [
        model_command::Command::ExtendBySeconds(10),
        model_command::Command::LockNow(true),
    ] {
        let status = modeler.command(A, command).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("already enforces"), "{status:?}");
    }
    modeler.caught_up(&js).await;
    assert_eq!(model_set(modeler.store.as_ref()), locked);
    let models_after = js
        .get_stream(MODELS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert_eq!(models_after, models_before + 1, "only the valid lock reached the log");
    assert_ne!(before, locked);
    modeler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_raises_an_incident_and_does_not_learn_the_excess() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    // Windows are counted in the server's receive time (what the
    // decisions claim does not matter): short, so the test can wait one out.
    const WINDOW: Duration = Duration::from_secs(2);
    let extra = ["--burst-limit", "5", "--burst-window-seconds", "2"];
    let modeler = Modeler::start(&server, open_store(dir.path()), &extra, clock.options()).await;
    start_workload(&js, "a1", A, T0).await;
    modeler.model_where("model A", A, |m| m.state == LEARNING).await;

    // Eight new ports in one message: five learned, three not, one incident.
    let burst: Vec<_> = (1..=8)
        .map(|port| decision(image(A), network_object("internet"), port, T0 + S, 1))
        .collect();
    decisions(&js, "burst", T0 + S, burst).await;
    // Already learned ones are not new: they still count.
    decisions(
        &js,
        "again",
        T0 + 2 * S,
        vec![decision(image(A), network_object("internet"), 1, T0 + 2 * S, 1)],
    )
    .await;
    modeler.caught_up(&js).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    modeler.caught_up(&js).await;
    let a = modeler.model(A).await.unwrap();
    assert_eq!(a.outbound_count, 5, "the excess was learned");
    let ports: Vec<u32> = modeler
        .learned(A, Side::Outbound, 0)
        .await
        .iter()
        .map(|c| c.port)
        .collect();
    assert_eq!(ports, [1, 2, 3, 4, 5]);
    assert_eq!(modeler.learned(A, Side::Outbound, 1).await[0].count, 2);

    let mut incidents = js.get_stream(INCIDENTS).await.unwrap();
    let incident = eventually("the incident", || async {
        incidents
            .get_last_raw_message_by_subject("cnnf.incident.c.learning-burst")
            .await
            .ok()
    })
    .await;
    let envelope = Envelope::decode(incident.payload.as_ref()).unwrap();
    let Some(Payload::Incident(incident)) = envelope.payload else {
        panic!("not an incident")
    };
    assert_eq!(incident.kind, cnnf_proto::v1::incident::Kind::LearningBurst as i32);
    assert_eq!(incident.image_id, A);
    assert_eq!(
        incidents.info().await.unwrap().state.messages,
        1,
        "one incident per window"
    );

    // A new window learns again.
    tokio::time::sleep(WINDOW + Duration::from_millis(500)).await;
    decisions(
        &js,
        "later",
        T0 + 20 * S,
        vec![decision(image(A), network_object("internet"), 9, T0 + 20 * S, 1)],
    )
    .await;
    modeler
        .model_where("a new window learns", A, |m| m.outbound_count == 6)
        .await;
    modeler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_and_a_restart_in_the_middle_lose_and_double_nothing() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let crashed = Arc::new(AtomicBool::new(false));
    let mut options = clock.options();
    options.flows_after_commit = Some({
        let crashed = Arc::clone(&crashed);
        Arc::new(move |committed| {
            if committed >= 3 && !crashed.swap(true, Ordering::SeqCst) {
                HookAction::Crash
            } else {
                HookAction::Continue
            }
        })
    });
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], options).await;
    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "b1", B, T0).await;
    modeler.model_where("model A", A, |m| m.state == LEARNING).await;
    modeler.model_where("model B", B, |m| m.state == LEARNING).await;

    for i in 1..=6 {
        decisions(
            &js,
            &i.to_string(),
            T0 + i * S,
            vec![decision(image(A), image(B), 80, T0 + i * S, 1)],
        )
        .await;
    }
    modeler.caught_up(&js).await;
    assert!(crashed.load(Ordering::SeqCst), "the failpoint never fired");
    let store = modeler.stop().await;
    // While the service is down, more traffic.
    for i in 7..=10 {
        decisions(
            &js,
            &i.to_string(),
            T0 + i * S,
            vec![decision(image(A), image(B), 80, T0 + i * S, 1)],
        )
        .await;
    }
    let modeler = Modeler::start(&server, store, &[], clock.options()).await;
    let connection = eventually("all ten decisions", || async {
        let learned = modeler.learned(A, Side::Outbound, 80).await;
        learned.first().filter(|c| c.count >= 10).cloned()
    })
    .await;
    modeler.caught_up(&js).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    modeler.caught_up(&js).await;
    let connection_now = modeler.learned(A, Side::Outbound, 80).await;
    assert_eq!(connection_now[0].count, 10, "a decision was doubled");
    assert_eq!(
        (connection.first_seen_unix_nanos, connection_now[0].last_seen_unix_nanos),
        (T0 + S, T0 + 10 * S)
    );
    assert_eq!(modeler.learned(B, Side::Inbound, 80).await[0].count, 10);
    modeler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learning_clock_counts_only_time_the_image_is_alive() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    // Alive 10 s, gone 40 s, back: learning ends 40 s later.
    start_workload(&js, "a1", A, T0).await;
    stop_workload(&js, "a1", A, T0 + 10 * S).await;
    start_workload(&js, "a2", A, T0 + 50 * S).await;
    let a = modeler
        .model_where("the pause counted", A, |m| m.learning_ends_unix_nanos == T0 + 140 * S)
        .await;
    assert_eq!((a.state, a.container_count), (LEARNING, 1));

    // Gone again at 60 s: no lock while it is not alive, whatever the time.
    stop_workload(&js, "a2", A, T0 + 60 * S).await;
    modeler
        .model_where("no containers", A, |m| m.container_count == 0)
        .await;
    modeler.caught_up(&js).await;
    clock.set(T0 + 500 * S);
    tokio::time::sleep(Duration::from_millis(300)).await;
    modeler.caught_up(&js).await;
    assert_eq!(
        modeler.model(A).await.unwrap().state,
        LEARNING,
        "locked while not alive"
    );

    // Back at 70 s: ends at 150 s, long past: locks.
    start_workload(&js, "a3", A, T0 + 70 * S).await;
    let a = modeler
        .model_where("locked once alive", A, |m| m.state == ENFORCING)
        .await;
    assert_eq!(a.learning_ends_unix_nanos, T0 + 150 * S);
    let kinds: Vec<&str> = model_log(&js, A).await.iter().map(|(_, kind)| *kind).collect();
    assert_eq!(
        kinds,
        ["created", "liveness", "liveness", "liveness", "liveness", "locked"]
    );
    modeler.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_images_namespaces_follow_its_running_containers_across_a_restart() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    start_workload_in(&js, "a1", A, "shop", T0).await;
    start_workload_in(&js, "a2", A, "ops", T0 + S).await;
    start_workload_in(&js, "a3", A, "", T0 + 2 * S).await;
    start_workload_in(&js, "a4", A, "shop", T0 + 3 * S).await;
    let a = modeler
        .model_where("four containers", A, |m| m.container_count == 4)
        .await;
    assert_eq!(a.namespaces, ["ops", "shop"], "sorted, each once; none for a3");

    stop_workload(&js, "a2", A, T0 + 4 * S).await;
    stop_workload(&js, "a1", A, T0 + 5 * S).await;
    let a = modeler
        .model_where("two containers", A, |m| m.container_count == 2)
        .await;
    assert_eq!(a.namespaces, ["shop"], "a4 still runs in shop");

    // Kept in the projection: a restart answers the same.
    let store = modeler.stop().await;
    let modeler = Modeler::start(&server, store, &[], clock.options()).await;
    assert_eq!(modeler.model(A).await.unwrap().namespaces, ["shop"]);
    stop_workload(&js, "a4", A, T0 + 6 * S).await;
    let a = modeler
        .model_where("one container", A, |m| m.container_count == 1)
        .await;
    assert!(a.namespaces.is_empty(), "{:?}", a.namespaces);
    modeler.stop().await;
}

/// Every message on `CNNF_MODELS` the modeler derived from another stream.
async fn derived_model_events(js: &jetstream::Context) -> Vec<(String, Envelope)> {
    let stream = js.get_stream(MODELS).await.unwrap();
    let consumer = stream.create_consumer(pull::Config::default()).await.unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(1000)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        let envelope = Envelope::decode(message.payload.as_ref()).unwrap();
        if envelope.event_id.starts_with("modeler:CNNF_") {
            out.push((message.subject.to_string(), envelope));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_events_republished_after_the_duplicate_window_apply_once() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    // A pauses 40 s (learning ends at 140 s); A -> B:80 twice, A -> B:443 once.
    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "b1", B, T0).await;
    stop_workload(&js, "a1", A, T0 + 10 * S).await;
    start_workload(&js, "a2", A, T0 + 50 * S).await;
    modeler
        .model_where("the pause counted", A, |m| m.learning_ends_unix_nanos == T0 + 140 * S)
        .await;
    modeler.model_where("model B", B, |m| m.state == LEARNING).await;
    decisions(
        &js,
        "1",
        T0 + 51 * S,
        vec![decision(image(A), image(B), 80, T0 + 51 * S, 2)],
    )
    .await;
    decisions(
        &js,
        "2",
        T0 + 52 * S,
        vec![
            decision(image(A), image(B), 80, T0 + 52 * S, 3),
            decision(image(A), image(B), 443, T0 + 52 * S, 1),
        ],
    )
    .await;
    modeler.model_where("three learned", A, |m| m.outbound_count == 2).await;
    modeler.caught_up(&js).await;
    let before = model_set(modeler.store.as_ref());
    let a_before = modeler.model(A).await.unwrap();
    let b_before = modeler.model(B).await.unwrap();
    assert_eq!(modeler.learned(A, Side::Outbound, 80).await[0].count, 5);

    // The flows and workloads projections rebuilt after the duplicate
    // window: every derived event stored again, same content and event
    // id, a new message id (JetStream no longer remembers the old one).
    let derived = derived_model_events(&js).await;
    let kinds: Vec<_> = derived
        .iter()
        .filter_map(|(_, envelope)| match &envelope.payload {
            Some(Payload::Model(event)) => event.change.as_ref().map(|change| match change {
                model_event::Change::Learned(_) => "learned",
                model_event::Change::Liveness(_) => "liveness",
                model_event::Change::Created(_) => "created",
                _ => "other",
            }),
            _ => None,
        })
        .collect();
    for kind in ["created", "liveness", "learned"] {
        assert!(kinds.contains(&kind), "no {kind} event among {kinds:?}");
    }
    for (n, (subject, envelope)) in derived.iter().enumerate() {
        let publish = jetstream::message::PublishMessage::build()
            .payload(cnnf_core::envelope::encode(envelope.clone()).into())
            .message_id(format!("after-the-window-{n}"));
        js.send_publish(subject.clone(), publish).await.unwrap().await.unwrap();
    }
    modeler.caught_up(&js).await;

    assert_eq!(
        model_set(modeler.store.as_ref()),
        before,
        "a republished event changed the model set"
    );
    assert_eq!(modeler.model(A).await.unwrap(), a_before);
    assert_eq!(modeler.model(B).await.unwrap(), b_before);
    assert_eq!(
        modeler.learned(A, Side::Outbound, 80).await[0].count,
        5,
        "a count was doubled"
    );
    assert_eq!(
        modeler.learned(B, Side::Inbound, 80).await[0].count,
        5,
        "a count was doubled"
    );

    let metrics = modeler.health.encode_metrics();
    let ignored = format!("cnnf_modeler_models_republished_ignored_total {}", derived.len());
    assert!(metrics.contains(&ignored), "expected {ignored} in {metrics}");

    // What comes after is still learned.
    decisions(
        &js,
        "3",
        T0 + 53 * S,
        vec![decision(image(A), image(B), 80, T0 + 53 * S, 1)],
    )
    .await;
    eventually("the next decision", || async {
        let learned = modeler.learned(A, Side::Outbound, 80).await;
        (learned[0].count == 6).then_some(())
    })
    .await;
    modeler.stop().await;
}

/// The stored record of `image`'s model.
fn record(store: &dyn ProjectionStore, image: &str) -> cnnf_modeler::store::ModelRecord {
    let bytes = store
        .get(cnnf_modeler::store::MODELS, image.as_bytes())
        .unwrap()
        .unwrap();
    cnnf_modeler::store::decode("model", &bytes).unwrap()
}

/// The value of the metric line starting with `name` (0 when absent).
fn metric(modeler: &Modeler, name: &str) -> u64 {
    modeler
        .health
        .encode_metrics()
        .lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0)
}

const FLOWS_DEAD_LETTERED: &str = "cnnf_modeler_flows_dead_lettered_total{consumer=\"modeler-flows\",reason=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_stored_before_its_workload_started_is_learned_once_the_workload_arrives() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    // The agent spooled the starts first, but the flows stream has the
    // decision before the workloads stream has the starts (the two
    // runners lag each other): A → B:5432, first seen at 5 s.
    decisions(
        &js,
        "1",
        T0 + 5 * S,
        vec![decision(image(A), image(B), 5432, T0 + 5 * S, 2)],
    )
    .await;
    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "b1", B, T0).await;
    let a = modeler
        .model_where("A learned once its workload arrived", A, |m| m.outbound_count == 1)
        .await;
    assert_eq!(
        (a.state, a.container_count, a.learning_ends_unix_nanos),
        (LEARNING, 1, T0 + 100 * S)
    );
    assert_eq!(a.image_name, format!("{A}-name"));
    modeler
        .model_where("B learned inbound", B, |m| m.inbound_count == 1)
        .await;
    assert_eq!(modeler.learned(A, Side::Outbound, 5432).await[0].count, 2);
    modeler.caught_up(&js).await;
    assert!(
        metric(&modeler, "cnnf_modeler_flows_retried_total ") >= 1,
        "the flows runner never waited for the workloads runner"
    );
    for reason in ["image-not-on-node", "workloads-behind"] {
        assert_eq!(
            metric(&modeler, &format!("{FLOWS_DEAD_LETTERED}\"{reason}\"}}")),
            0,
            "{reason}"
        );
    }
    decisions(
        &js,
        "2",
        T0 + 11 * S,
        vec![decision(image(A), image(B), 5432, T0 + 11 * S, 1)],
    )
    .await;
    eventually("the next decision", || async {
        let learned = modeler.learned(A, Side::Outbound, 5432).await;
        (learned[0].count == 3).then_some(())
    })
    .await;
    modeler.caught_up(&js).await;
    assert_eq!(record(modeler.store.as_ref(), A).generation, 1);

    // A replay decides the same way.
    let live = model_set(modeler.stop().await.as_ref());
    let replay_dir = tempfile::tempdir().unwrap();
    let mut options = clock.options();
    options.durable_suffix = Some("replay".into());
    let replay = Modeler::start(&server, open_store(replay_dir.path()), &[], options).await;
    replay.caught_up(&js).await;
    assert_eq!(model_set(replay.store.as_ref()), live, "the replay differs");
    replay.stop().await;
}

/// Publishes `decisions` as node `node` reports them, on its own subject.
async fn decisions_of(
    js: &jetstream::Context,
    node: &str,
    id: &str,
    time: i64,
    decisions: Vec<ConnectionDecision>,
) -> u64 {
    let payload = Payload::Decisions(DecisionBatch {
        decisions,
        overflow_count: 0,
    });
    publish(
        js,
        &format!("cnnf.flow.c.{node}"),
        envelope(node, format!("{node}:b:flow:{id}"), time, payload),
    )
    .await
}

/// Starts `container` of `image` on `node`.
async fn start_workload_on(js: &jetstream::Context, node: &str, container: &str, image: &str, time: i64) {
    let workload = Workload {
        container_id: container.into(),
        image_id: image.into(),
        image_name: format!("{image}-name"),
        addresses: vec!["10.0.0.1".into()],
        cluster: CLUSTER.into(),
        node: node.into(),
        ..Default::default()
    };
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload),
    });
    publish(
        js,
        &format!("cnnf.workload.c.{node}"),
        envelope(node, format!("{node}:b:start:{container}"), time, payload),
    )
    .await;
}

fn directed(mut decision: ConnectionDecision, direction: Direction) -> ConnectionDecision {
    decision.direction = direction as i32;
    decision
}

/// Every dead letter of `modeler-flows`: (reason, original bytes).
async fn flows_dead_letters(js: &jetstream::Context, count: usize) -> Vec<(String, Vec<u8>)> {
    let stream = js.get_stream(cnnf_bus::topology::DEAD_LETTER).await.unwrap();
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "cnnf.dlq.modeler-flows".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..count {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let reason = message
            .headers
            .as_ref()
            .unwrap()
            .get(cnnf_bus::runner::DLQ_REASON)
            .unwrap()
            .to_string();
        out.push((reason, message.payload.to_vec()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_teaches_only_the_images_it_runs() {
    const C: &str = "sha256:cccc";
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;
    // A and B run on n1 only; C on n2 only.
    start_workload_on(&js, "n1", "a1", A, T0).await;
    start_workload_on(&js, "n1", "b1", B, T0).await;
    start_workload_on(&js, "n2", "c1", C, T0).await;
    for image_id in [A, B, C] {
        modeler.model_where("a model", image_id, |m| m.state == LEARNING).await;
    }
    decisions_of(
        &js,
        "n1",
        "1",
        T0 + S,
        vec![directed(decision(image(A), image(B), 80, T0 + S, 1), Direction::Egress)],
    )
    .await;
    modeler.model_where("A learned", A, |m| m.outbound_count == 1).await;
    modeler.caught_up(&js).await;
    let learned_before = (
        modeler.learned(A, Side::Outbound, 0).await,
        modeler.learned(B, Side::Inbound, 0).await,
    );

    // n2 claims A (egress) and B (ingress), which it does not run; and a
    // message on n1's subject whose envelope names n2.
    let lies = [
        (
            "n2",
            directed(decision(image(A), image(B), 6000, T0 + 2 * S, 1), Direction::Egress),
        ),
        (
            "n2",
            directed(decision(image(C), image(B), 6001, T0 + 2 * S, 1), Direction::Ingress),
        ),
    ];
    for (n, (node, lie)) in lies.iter().enumerate() {
        decisions_of(&js, node, &format!("lie-{n}"), T0 + 2 * S, vec![lie.clone()]).await;
    }
    let spoofed = envelope(
        "n2",
        "n2:b:flow:spoofed".into(),
        T0 + 2 * S,
        Payload::Decisions(DecisionBatch {
            decisions: vec![decision(image(A), image(B), 6002, T0 + 2 * S, 1)],
            overflow_count: 0,
        }),
    );
    publish(&js, "cnnf.flow.c.n1", spoofed).await;
    // The same decision from the node that runs A (with C on n2 as its
    // destination: n1 teaches A's outbound side, not C's inbound one).
    decisions_of(
        &js,
        "n1",
        "truth",
        T0 + 3 * S,
        vec![
            directed(decision(image(A), image(B), 6000, T0 + 3 * S, 1), Direction::Egress),
            directed(decision(image(A), image(C), 7000, T0 + 3 * S, 1), Direction::Egress),
        ],
    )
    .await;
    modeler
        .model_where("A learned the truth", A, |m| m.outbound_count == 3)
        .await;
    modeler.caught_up(&js).await;

    let letters = flows_dead_letters(&js, 3).await;
    let reasons: Vec<&str> = letters.iter().map(|(reason, _)| reason.as_str()).collect();
    assert_eq!(reasons, ["image-not-on-node", "image-not-on-node", "origin-mismatch"]);
    assert_eq!(
        metric(&modeler, &format!("{FLOWS_DEAD_LETTERED}\"image-not-on-node\"}}")),
        2
    );
    assert_eq!(
        metric(&modeler, &format!("{FLOWS_DEAD_LETTERED}\"origin-mismatch\"}}")),
        1
    );

    // Nothing of the lies was learned: B's inbound list is as it was, and
    // A's outbound list grew by exactly the truth.
    assert_eq!(
        modeler.learned(B, Side::Inbound, 0).await.len(),
        2,
        "B learned from n1 only"
    );
    assert!(modeler.learned(B, Side::Inbound, 6001).await.is_empty(), "n2 taught B");
    assert_eq!(modeler.learned(B, Side::Inbound, 80).await, learned_before.1);
    assert_eq!(modeler.learned(A, Side::Outbound, 80).await, learned_before.0);
    let a_out: Vec<(u32, u64)> = modeler
        .learned(A, Side::Outbound, 0)
        .await
        .iter()
        .map(|c| (c.port, c.count))
        .collect();
    assert_eq!(a_out, [(80, 1), (6000, 1), (7000, 1)]);
    assert_eq!(
        modeler.model(C).await.unwrap().inbound_count,
        0,
        "n1 taught C, which runs on n2"
    );
    modeler.stop().await;
}

/// The server's receive time of message `sequence` of `stream`.
async fn stored_at(js: &jetstream::Context, stream: &str, sequence: u64) -> i64 {
    let message = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_raw_message(sequence)
        .await
        .unwrap();
    i64::try_from(message.time.unix_timestamp_nanos()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_burst_limit_counts_server_time_whatever_times_the_decisions_claim() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let extra = [
        "--burst-limit",
        "3",
        "--burst-window-seconds",
        "2",
        "--learning-seconds",
        "86400",
    ];
    let modeler = Modeler::start(&server, open_store(dir.path()), &extra, clock.options()).await;
    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "b1", B, T0).await;
    modeler.model_where("model A", A, |m| m.state == LEARNING).await;
    modeler.model_where("model B", B, |m| m.state == LEARNING).await;

    // A: six new ports in six messages claiming to be an hour apart each,
    // stored within the window: three learned, one incident.
    let mut stored = Vec::new();
    for port in 1..=6u32 {
        let time = T0 + i64::from(port) * 3600 * S;
        let sequence = decisions(
            &js,
            &format!("a-{port}"),
            time,
            vec![decision(image(A), network_object("internet"), port, time, 1)],
        )
        .await;
        stored.push(stored_at(&js, FLOWS, sequence).await);
    }
    assert!(
        stored[5] - stored[0] < 2 * S,
        "the six messages were not stored within the window; the test cannot tell"
    );
    modeler.model_where("A learned", A, |m| m.outbound_count == 3).await;
    modeler.caught_up(&js).await;
    let ports: Vec<u32> = modeler
        .learned(A, Side::Outbound, 0)
        .await
        .iter()
        .map(|c| c.port)
        .collect();
    assert_eq!(ports, [1, 2, 3]);
    eventually("the incident", || async {
        let mut incidents = js.get_stream(INCIDENTS).await.unwrap();
        (incidents.info().await.unwrap().state.messages == 1).then_some(())
    })
    .await;
    let mut incidents = js.get_stream(INCIDENTS).await.unwrap();

    // B: every decision claims one instant; five new ports in two messages
    // stored more than the window apart: the second is a new window.
    let first = decisions(
        &js,
        "b-1",
        T0 + S,
        (1..=3)
            .map(|port| decision(image(B), network_object("internet"), port, T0 + S, 1))
            .collect(),
    )
    .await;
    let first_at = stored_at(&js, FLOWS, first).await;
    // Server time must pass the window: wait for it, then check it did.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = decisions(
        &js,
        "b-2",
        T0 + S,
        (4..=5)
            .map(|port| decision(image(B), network_object("internet"), port, T0 + S, 1))
            .collect(),
    )
    .await;
    assert!(stored_at(&js, FLOWS, second).await - first_at >= 2 * S);
    modeler
        .model_where("B learned both windows", B, |m| m.outbound_count == 5)
        .await;
    modeler.caught_up(&js).await;
    assert_eq!(
        incidents.info().await.unwrap().state.messages,
        1,
        "B raised an incident"
    );
    modeler.stop().await;
}

/// The `cnnf_modeler_lock_timer_looks` counter of `modeler`.
fn looks(modeler: &Modeler) -> u64 {
    let metrics = modeler.health.encode_metrics();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("cnnf_modeler_lock_timer_looks_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Learning periods on tokio's paused time. The modeler (NATS client,
/// runners, API) runs on an ordinary runtime; its clock and its lock timer
/// follow a second runtime whose time is paused (`RunOptions::paced_by`),
/// which only `advance` below moves. Each step waits until the timer has
/// looked at the new time, so "not yet locked" is checked after a look at
/// exactly that instant, not after some wall-clock delay.
#[test]
fn on_paused_time_a_model_locks_exactly_at_the_end_of_its_period_and_an_extension_moves_it() {
    let real = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let paused = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let options = RunOptions::paced_by(paused.handle().clone(), T0);
    assert_eq!(
        options.timer_interval, None,
        "the production pace: one look a second at most"
    );
    let now = options.clone();
    let server = real.block_on(NatsServer::start());
    let js = real.block_on(connect(&server));
    let dir = tempfile::tempdir().unwrap();
    let modeler = real.block_on(Modeler::start(&server, open_store(dir.path()), &[], options));
    const C: &str = "sha256:cccc";

    real.block_on(async {
        start_workload(&js, "a1", A, T0).await;
        start_workload(&js, "c1", C, T0 + 10 * S).await;
        modeler.model_where("model A", A, |m| m.state == LEARNING).await;
        decisions(
            &js,
            "1",
            T0 + S,
            vec![decision(image(A), network_object("payments"), 443, T0 + S, 1)],
        )
        .await;
        modeler.model_where("A learned", A, |m| m.outbound_count == 1).await;
        modeler
            .model_where("model C", C, |m| m.learning_ends_unix_nanos == T0 + 110 * S)
            .await;
        eventually("the first look", || async { (looks(&modeler) >= 1).then_some(()) }).await;
    });
    // Moves paused time by `by`, then waits until the timer looked once at
    // the new time and everything it published is applied.
    let step = |by: Duration| {
        let before = looks(&modeler);
        paused.block_on(tokio::time::advance(by));
        real.block_on(async {
            eventually("a look of the timer", || async {
                (looks(&modeler) > before).then_some(())
            })
            .await;
            modeler.caught_up(&js).await;
        });
        assert_eq!(looks(&modeler), before + 1, "the timer looked while time stood still");
    };
    let state = |image: &str| real.block_on(modeler.model(image)).unwrap().state;

    // At 50 s the operator extends C by 50 s: from its end at 110 s to 160 s.
    step(Duration::from_secs(50));
    assert_eq!(now.now(), T0 + 50 * S);
    real.block_on(async {
        modeler
            .command(C, model_command::Command::ExtendBySeconds(50))
            .await
            .unwrap();
        modeler
            .model_where("C extended", C, |m| m.learning_ends_unix_nanos == T0 + 160 * S)
            .await;
    });

    // One nanosecond before A's end: a look, and nothing locks.
    step(Duration::from_secs(50) - Duration::from_nanos(1));
    assert_eq!(now.now(), T0 + 100 * S - 1);
    assert_eq!((state(A), state(C)), (LEARNING, LEARNING), "locked before the end");
    // Exactly at the end: A locks, at that event time; C does not.
    step(Duration::from_nanos(1));
    real.block_on(modeler.model_where("A locked", A, |m| m.state == ENFORCING));
    assert_eq!(record(modeler.store.as_ref(), A).locked_unix_nanos, T0 + 100 * S);
    assert_eq!(state(C), LEARNING);

    // C's old end passes: extended, it still learns.
    step(Duration::from_secs(10));
    assert_eq!(now.now(), T0 + 110 * S);
    assert_eq!(state(C), LEARNING, "locked at the end the extension replaced");
    step(Duration::from_secs(50) - Duration::from_nanos(1));
    assert_eq!(state(C), LEARNING, "locked before the extended end");
    step(Duration::from_nanos(1));
    real.block_on(modeler.model_where("C locked", C, |m| m.state == ENFORCING));
    assert_eq!(record(modeler.store.as_ref(), C).locked_unix_nanos, T0 + 160 * S);

    let (log_a, log_c) = real.block_on(async { (model_log(&js, A).await, model_log(&js, C).await) });
    let kinds = |log: &[(String, &'static str)]| log.iter().map(|(_, kind)| *kind).collect::<Vec<_>>();
    assert_eq!(kinds(&log_a), ["created", "learned", "locked"]);
    assert_eq!(kinds(&log_c), ["created", "extended", "locked"]);
    assert_eq!((log_a[2].0.as_str(), log_c[1].0.as_str()), ("timer", "alice"));
    real.block_on(modeler.stop());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_on_fresh_durables_after_commands_and_a_restart_is_byte_for_byte_the_live_model_set() {
    const C: &str = "sha256:cccc";
    const D: &str = "sha256:dddd";
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0 + 10 * S);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;

    for (container, image_id) in [("a1", A), ("b1", B), ("c1", C), ("d1", D)] {
        start_workload(&js, container, image_id, T0).await;
    }
    for image_id in [A, B, C, D] {
        modeler.model_where("a model", image_id, |m| m.state == LEARNING).await;
    }
    let traffic = |n: i64| {
        vec![
            decision(image(A), image(B), 5432, T0 + n * S, 1),
            decision(image(B), image(C), 80, T0 + n * S, 1),
            decision(
                image(C),
                network_object("internet"),
                443 + u32::try_from(n).unwrap(),
                T0 + n * S,
                1,
            ),
            decision(image(D), image(A), 8080, T0 + n * S, 1),
        ]
    };
    for n in 1..=3 {
        decisions(&js, &format!("live-{n}"), T0 + n * S, traffic(n)).await;
    }
    modeler.model_where("C learned", C, |m| m.outbound_count == 3).await;
    modeler.caught_up(&js).await;

    // Operator commands: lock A, extend B, relearn C, delete B's inbound connection from A.
    modeler.command(A, model_command::Command::LockNow(true)).await.unwrap();
    modeler
        .command(B, model_command::Command::ExtendBySeconds(30))
        .await
        .unwrap();
    modeler.command(C, model_command::Command::Relearn(true)).await.unwrap();
    let from_a = modeler.learned(B, Side::Inbound, 5432).await;
    modeler
        .command(B, model_command::Command::DeleteConnection(from_a[0].clone()))
        .await
        .unwrap();
    modeler.model_where("A locked", A, |m| m.state == ENFORCING).await;
    modeler.model_where("B lost one", B, |m| m.inbound_count == 0).await;
    modeler.model_where("C relearning", C, |m| m.outbound_count == 0).await;

    // A restart in the middle of the stream: traffic while it is down.
    let store = modeler.stop().await;
    for n in 4..=6 {
        decisions(&js, &format!("down-{n}"), T0 + n * S, traffic(n)).await;
    }
    // C stops after the last traffic it takes part in (event time), while
    // the service is down (log order).
    stop_workload(&js, "c1", C, T0 + 9 * S).await;
    let modeler = Modeler::start(&server, store, &[], clock.options()).await;
    for n in 7..=8 {
        decisions(&js, &format!("back-{n}"), T0 + n * S, traffic(n)).await;
    }
    modeler.model_where("C relearned", C, |m| m.outbound_count == 5).await;
    modeler.caught_up(&js).await;
    let live = model_set(modeler.store.as_ref());
    let d = record(modeler.store.as_ref(), D);
    assert_eq!((d.state, d.outbound_count), (LEARNING, 1));
    assert_eq!(
        modeler.learned(D, Side::Outbound, 8080).await[0].count,
        8,
        "lost or doubled"
    );
    let models_before = js
        .get_stream(MODELS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    modeler.stop().await;

    // A rebuild: fresh durables, an empty store, the whole log.
    let rebuild_dir = tempfile::tempdir().unwrap();
    let mut options = clock.options();
    options.durable_suffix = Some("rebuild".into());
    let rebuild = Modeler::start(&server, open_store(rebuild_dir.path()), &[], options).await;
    rebuild.caught_up(&js).await;
    let rebuilt = model_set(rebuild.store.as_ref());
    let tables: std::collections::BTreeSet<&str> = rebuilt.iter().map(|(table, _)| *table).collect();
    assert_eq!(
        tables.len(),
        MODEL_TABLES.len(),
        "every model table has entries: {tables:?}"
    );
    assert_eq!(rebuilt.len(), live.len());
    for (at, (rebuilt, live)) in rebuilt.iter().zip(&live).enumerate() {
        assert_eq!(rebuilt, live, "entry {at} differs");
    }
    // The live durables were left alone; the rebuild's own are at the end.
    assert!(applied_sequence(rebuild.store.as_ref(), MODELS_DURABLE).unwrap() == 0);
    assert!(applied_sequence(rebuild.store.as_ref(), &format!("{MODELS_DURABLE}-rebuild")).unwrap() >= models_before);
    let models_after = js
        .get_stream(MODELS)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert_eq!(models_after, models_before, "the rebuild stored new model events");
    rebuild.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lists_are_paged_and_refuse_foreign_tokens() {
    let server = NatsServer::start().await;
    let js = connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let modeler = Modeler::start(&server, open_store(dir.path()), &[], clock.options()).await;
    let images: Vec<String> = (1..=5).map(|n| format!("sha256:{n:04}")).collect();
    for (n, image_id) in images.iter().enumerate() {
        start_workload(&js, &format!("c{n}"), image_id, T0).await;
    }
    // A node teaches only the images it runs.
    start_workload(&js, "a1", A, T0).await;
    start_workload(&js, "b1", B, T0).await;
    let ports: Vec<u32> = (1..=5).collect();
    let traffic = ports
        .iter()
        .map(|port| decision(image(A), network_object("internet"), *port, T0 + S, 1))
        .chain([decision(image(B), image(A), 9, T0 + S, 1)])
        .collect();
    decisions(&js, "1", T0 + S, traffic).await;
    modeler.model_where("A learned", A, |m| m.outbound_count == 5).await;
    modeler.model_where("A reached", A, |m| m.inbound_count == 1).await;
    modeler.caught_up(&js).await;
    let mut client = modeler.client().await;

    // Models: 7 (five workloads, A and B) in pages of 3.
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let request = cnnf_proto::v1::ListModelsRequest {
            page_size: 3,
            page_token: token.clone(),
        };
        let page = client.list_models(request).await.unwrap().into_inner();
        assert!(page.models.len() <= 3);
        pages += 1;
        listed.extend(page.models.into_iter().map(|model| model.image_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let all = client
        .list_models(cnnf_proto::v1::ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.next_page_token.is_empty());
    let everything: Vec<String> = all.models.into_iter().map(|model| model.image_id).collect();
    assert_eq!(everything.len(), 7);
    assert_eq!((listed, pages), (everything, 3));

    // Learned connections of A, outbound only, in pages of 2: 5 of its 6.
    let mut ports_listed = Vec::new();
    let mut token = String::new();
    loop {
        let request = ListLearnedConnectionsRequest {
            image_id: A.into(),
            side: Side::Outbound as i32,
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = client.list_learned_connections(request).await.unwrap().into_inner();
        assert!(page.connections.len() <= 2);
        ports_listed.extend(page.connections.iter().map(|connection| connection.port));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ports_listed, ports);

    // A token of another image or of the other list, or made up: refused.
    let request = ListLearnedConnectionsRequest {
        image_id: A.into(),
        page_size: 1,
        ..Default::default()
    };
    let first = client.list_learned_connections(request).await.unwrap().into_inner();
    assert!(!first.next_page_token.is_empty());
    let bad_tokens = [
        (B, first.next_page_token.clone()),
        (A, "models:00".to_owned()),
        (A, "learned:zz".to_owned()),
        (A, "whatever".to_owned()),
    ];
    for (image_id, page_token) in bad_tokens {
        let request = ListLearnedConnectionsRequest {
            image_id: image_id.into(),
            page_token: page_token.clone(),
            ..Default::default()
        };
        let status = client.list_learned_connections(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{image_id} {page_token}");
        assert!(status.message().contains("page_token"), "{status:?}");
    }
    let status = client
        .list_models(cnnf_proto::v1::ListModelsRequest {
            page_size: 0,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    modeler.stop().await;
}
