//! The ingest service against a real nats-server and real RocksDB stores:
//! point-in-time answers through the gRPC API and the KV map for two
//! nodes, node liveness, the gate's dead letters, and identical registries
//! after crashes, restarts and a rebuild from the log.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, kv};
use clap::Parser as _;
use cnnf_bus::runner::{HookAction, DLQ_DETAIL, DLQ_REASON};
use cnnf_bus::topology::{DEAD_LETTER, IDENTITIES_BUCKET, INCIDENTS, WORKLOADS};
use cnnf_ingest::{Config, RunOptions, WORKLOADS_DURABLE};
use cnnf_proto::v1::identity_registry_client::IdentityRegistryClient;
use cnnf_proto::v1::{
    envelope::Payload, AddressesOfImageRequest, Envelope, LookupAddressRequest, LookupAddressResponse, NodeGone,
    NodeHeartbeat, Workload, WorkloadStarted, WorkloadStopped,
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

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn now_nanos() -> i64 {
    cnnf_ingest::liveness::now_nanos()
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
    // A killed instance's last store write may still hold the database for
    // a moment: retry, as a restarted process would find the lock released.
    for _ in 0..1000 {
        if let Ok(store) = cnnf_ingest::open_store(dir) {
            return Arc::new(store);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("store at {} never became free", dir.display());
}

/// One running ingest service.
struct Ingest {
    store: Arc<dyn ProjectionStore>,
    grpc: SocketAddr,
    health: Health,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Ingest {
    async fn start(server: &NatsServer, store: Arc<dyn ProjectionStore>, extra: &[&str], options: RunOptions) -> Self {
        let grpc = free_addr();
        let url = server.url();
        let grpc_text = grpc.to_string();
        let mut args = vec![
            "cnnf-ingest",
            "--nats-url",
            &url,
            "--cluster",
            CLUSTER,
            "--grpc-addr",
            &grpc_text,
            "--grpc-insecure",
        ];
        args.extend_from_slice(extra);
        let config = Config::try_parse_from(args).unwrap();
        cnnf_service::init_logging();
        let health = Health::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cnnf_ingest::run_with_store(
            config,
            Arc::clone(&store),
            health.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        let ingest = Self {
            store,
            grpc,
            health,
            stop: Some(stop),
            task,
        };
        eventually("the service to be ready", || async {
            assert!(!ingest.task.is_finished(), "the service ended early");
            ingest.health.not_ready().is_empty().then_some(())
        })
        .await;
        ingest
    }

    /// Waits until the registry applied stream sequence `sequence`.
    async fn applied(&self, sequence: u64) {
        eventually("the registry to catch up", || async {
            (applied_sequence(self.store.as_ref(), WORKLOADS_DURABLE).unwrap() >= sequence).then_some(())
        })
        .await;
    }

    async fn client(&self) -> IdentityRegistryClient<tonic::transport::Channel> {
        IdentityRegistryClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
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

    /// Drops the service where it is, as a crash would.
    async fn kill(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

struct Bus {
    js: jetstream::Context,
    bucket: kv::Store,
}

impl Bus {
    async fn connect(server: &NatsServer) -> Self {
        let js = cnnf_bus::jetstream(async_nats::connect(server.url()).await.unwrap());
        cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
        let bucket = js.get_key_value(IDENTITIES_BUCKET).await.unwrap();
        Self { js, bucket }
    }

    /// Publishes raw bytes on `subject`; returns the stream sequence.
    async fn publish_bytes(&self, subject: &str, id: &str, payload: Vec<u8>) -> u64 {
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(id);
        self.js
            .send_publish(subject.to_owned(), publish)
            .await
            .unwrap()
            .await
            .unwrap()
            .sequence
    }

    async fn publish(&self, subject: &str, envelope: Envelope) -> u64 {
        let id = envelope.event_id.clone();
        self.publish_bytes(subject, &id, cnnf_core::envelope::encode(envelope))
            .await
    }

    /// The KV map: address key → container id.
    async fn kv(&self) -> BTreeMap<String, String> {
        cnnf_ingest::kv::snapshot(&self.bucket)
            .await
            .unwrap()
            .into_iter()
            .map(|(key, value)| (key, Workload::decode(value.as_ref()).unwrap().container_id))
            .collect()
    }

    async fn kv_is(&self, what: &str, expected: &[(&str, &str)]) {
        let expected: BTreeMap<String, String> = expected
            .iter()
            .map(|(key, container)| ((*key).to_owned(), (*container).to_owned()))
            .collect();
        let mut last = BTreeMap::new();
        let started = Instant::now();
        while started.elapsed() < WAIT {
            last = self.kv().await;
            if last == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("KV map {what}: expected {expected:?}, found {last:?}");
    }

    /// The first `count` messages on `subject` of `stream`, then checks
    /// that no more arrive for a moment.
    async fn read(&self, stream: &str, subject: &str, count: usize) -> Vec<jetstream::Message> {
        let consumer = self
            .js
            .get_stream(stream)
            .await
            .unwrap()
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::new();
        while out.len() < count {
            let message = tokio::time::timeout(WAIT, messages.next())
                .await
                .unwrap_or_else(|_| panic!("only {} of {count} messages on {subject}", out.len()))
                .unwrap()
                .unwrap();
            out.push(message);
        }
        if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(300), messages.next()).await {
            panic!(
                "more than {count} messages on {subject}: {:?}",
                extra.map(|m| m.subject.clone())
            );
        }
        out
    }
}

fn workload_subject(node: &str) -> String {
    format!("cnnf.workload.{CLUSTER}.{node}")
}

fn workload(node: &str, container: &str, image: &str, addresses: &[&str]) -> Workload {
    Workload {
        container_id: container.into(),
        container_name: format!("{container}-name"),
        image_id: format!("sha256:{image}"),
        image_name: format!("registry.example/{image}:1"),
        addresses: addresses.iter().map(|address| (*address).to_owned()).collect(),
        labels: [
            ("app".to_owned(), image.to_owned()),
            ("tier".to_owned(), "test".to_owned()),
        ]
        .into(),
        cluster: CLUSTER.into(),
        node: node.into(),
        ..Default::default()
    }
}

fn envelope(node: &str, id: String, time: i64, payload: Payload) -> Envelope {
    Envelope {
        event_id: id,
        cluster: CLUSTER.into(),
        node: node.into(),
        time_unix_nanos: time,
        payload: Some(payload),
        ..Default::default()
    }
}

fn started(node: &str, container: &str, image: &str, addresses: &[&str], time: i64) -> Envelope {
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload(node, container, image, addresses)),
    });
    envelope(node, format!("{node}:boot:start:{container}:{time}"), time, payload)
}

fn stopped(node: &str, container: &str, time: i64) -> Envelope {
    let payload = Payload::WorkloadStopped(WorkloadStopped {
        workload: Some(Workload {
            container_id: container.into(),
            cluster: CLUSTER.into(),
            node: node.into(),
            ..Default::default()
        }),
        reason: "exited".into(),
    });
    envelope(node, format!("{node}:boot:stop:{container}:{time}"), time, payload)
}

fn heartbeat(node: &str, boot: &str, sequence: u64, time: i64) -> Envelope {
    let payload = Payload::NodeHeartbeat(NodeHeartbeat {
        boot_id: boot.into(),
        sequence,
        ..Default::default()
    });
    envelope(node, cnnf_core::ids::agent_event(node, boot, sequence), time, payload)
}

/// The container of each holding, earliest first.
fn holders(response: &LookupAddressResponse) -> Vec<String> {
    response
        .holdings
        .iter()
        .map(|holding| holding.workload.as_ref().unwrap().container_id.clone())
        .collect()
}

async fn lookup(
    client: &mut IdentityRegistryClient<tonic::transport::Channel>,
    address: &str,
    at: i64,
) -> LookupAddressResponse {
    client
        .lookup_address(LookupAddressRequest {
            address: address.into(),
            at_unix_nanos: at,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_point_in_time_answers_and_the_kv_map_follow_every_change() {
    let server = NatsServer::start().await;
    let bus = Bus::connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(&server, open_store(dir.path()), &[], RunOptions::default()).await;

    // Two nodes start three containers, one with an IPv6 address too.
    bus.publish(
        &workload_subject("n1"),
        started("n1", "c1", "img-a", &["10.0.0.1"], T0 + S),
    )
    .await;
    bus.publish(
        &workload_subject("n1"),
        started("n1", "c2", "img-b", &["10.0.0.2", "FD00:0::2"], T0 + 2 * S),
    )
    .await;
    bus.publish(
        &workload_subject("n2"),
        started("n2", "c3", "img-c", &["10.0.1.1"], T0 + 2 * S),
    )
    .await;
    bus.kv_is(
        "after the starts",
        &[
            ("10.0.0.1", "c1"),
            ("10.0.0.2", "c2"),
            ("fd00__2", "c2"),
            ("10.0.1.1", "c3"),
        ],
    )
    .await;

    // c1 stops; a second later another image on the other node gets its address.
    bus.publish(&workload_subject("n1"), stopped("n1", "c1", T0 + 10 * S))
        .await;
    bus.kv_is(
        "after c1 stopped",
        &[("10.0.0.2", "c2"), ("fd00__2", "c2"), ("10.0.1.1", "c3")],
    )
    .await;
    bus.publish(
        &workload_subject("n2"),
        started("n2", "c4", "img-c", &["10.0.0.1"], T0 + 11 * S),
    )
    .await;
    bus.kv_is(
        "after the reuse",
        &[
            ("10.0.0.1", "c4"),
            ("10.0.0.2", "c2"),
            ("fd00__2", "c2"),
            ("10.0.1.1", "c3"),
        ],
    )
    .await;

    // c5 takes 10.0.0.2 before c2's stop arrives (which happened earlier).
    bus.publish(
        &workload_subject("n2"),
        started("n2", "c5", "img-d", &["10.0.0.2"], T0 + 21 * S),
    )
    .await;
    bus.publish(&workload_subject("n1"), stopped("n1", "c2", T0 + 20 * S))
        .await;
    bus.kv_is(
        "after the late stop",
        &[("10.0.0.1", "c4"), ("10.0.0.2", "c5"), ("10.0.1.1", "c3")],
    )
    .await;

    // Two workloads claim one address at once: both recorded, no KV value.
    bus.publish(
        &workload_subject("n1"),
        started("n1", "c6", "img-e", &["10.0.9.9"], T0 + 30 * S),
    )
    .await;
    let last = bus
        .publish(
            &workload_subject("n2"),
            started("n2", "c7", "img-f", &["10.0.9.9"], T0 + 31 * S),
        )
        .await;
    ingest.applied(last).await;
    bus.kv_is(
        "after the conflict",
        &[("10.0.0.1", "c4"), ("10.0.0.2", "c5"), ("10.0.1.1", "c3")],
    )
    .await;

    // Every instant, through the gRPC API.
    let mut client = ingest.client().await;
    let instants: &[(&str, i64, &[&str])] = &[
        ("10.0.0.1", T0, &[]),
        ("10.0.0.1", T0 + S - 1, &[]),
        ("10.0.0.1", T0 + S, &["c1"]),
        ("10.0.0.1", T0 + 10 * S - 1, &["c1"]),
        ("10.0.0.1", T0 + 10 * S, &[]),
        ("10.0.0.1", T0 + 10 * S + S / 2, &[]),
        ("10.0.0.1", T0 + 11 * S, &["c4"]),
        ("10.0.0.1", T0 + 500 * S, &["c4"]),
        ("10.0.0.1", 0, &["c4"]),
        ("10.0.0.2", T0 + 2 * S, &["c2"]),
        ("10.0.0.2", T0 + 20 * S - 1, &["c2"]),
        ("10.0.0.2", T0 + 20 * S, &[]),
        ("10.0.0.2", T0 + 21 * S, &["c5"]),
        ("fd00::2", T0 + 5 * S, &["c2"]),
        ("fd00:0:0::2", T0 + 20 * S, &[]),
        ("10.0.1.1", T0 + 2 * S, &["c3"]),
        ("10.0.9.9", T0 + 30 * S, &["c6"]),
        ("10.0.9.9", T0 + 31 * S, &["c6", "c7"]),
        ("10.9.9.9", T0 + 31 * S, &[]),
    ];
    for (address, at, expected) in instants {
        let response = lookup(&mut client, address, *at).await;
        assert_eq!(holders(&response), *expected, "{address} at T0{:+}ns", at - T0);
        assert_eq!(
            response.workload.as_ref().map(|w| w.container_id.as_str()),
            expected.first().copied(),
            "{address} at {at}"
        );
    }
    let c1 = lookup(&mut client, "10.0.0.1", T0 + 5 * S).await;
    assert_eq!(
        (c1.held_from_unix_nanos, c1.held_until_unix_nanos),
        (T0 + S, T0 + 10 * S)
    );
    let c1 = c1.workload.unwrap();
    assert_eq!((c1.image_id.as_str(), c1.node.as_str()), ("sha256:img-a", "n1"));
    assert_eq!(c1.labels["app"], "img-a");
    let conflict = lookup(&mut client, "10.0.9.9", T0 + 40 * S).await;
    assert_eq!(conflict.conflicting.len(), 1);
    assert_eq!(conflict.conflicting[0].container_id, "c7");
    assert_eq!(conflict.held_until_unix_nanos, 0);

    // All addresses an image had in a range.
    let of_image = |image: &str, from: i64, until: i64| AddressesOfImageRequest {
        image_id: format!("sha256:{image}"),
        from_unix_nanos: from,
        until_unix_nanos: until,
    };
    let holdings = client
        .addresses_of_image(of_image("img-c", T0, 0))
        .await
        .unwrap()
        .into_inner()
        .holdings;
    let found: Vec<(&str, i64, i64)> = holdings
        .iter()
        .map(|h| (h.address.as_str(), h.held_from_unix_nanos, h.held_until_unix_nanos))
        .collect();
    assert_eq!(found, [("10.0.1.1", T0 + 2 * S, 0), ("10.0.0.1", T0 + 11 * S, 0)]);
    let holdings = client
        .addresses_of_image(of_image("img-b", T0 + 20 * S, T0 + 30 * S))
        .await
        .unwrap()
        .into_inner()
        .holdings;
    assert!(holdings.is_empty(), "c2 ended at T0+20s: {holdings:?}");
    let holdings = client
        .addresses_of_image(of_image("img-b", T0 + 19 * S, T0 + 19 * S))
        .await
        .unwrap()
        .into_inner()
        .holdings;
    let addresses: Vec<&str> = holdings.iter().map(|h| h.address.as_str()).collect();
    assert_eq!(addresses, ["10.0.0.2", "fd00::2"]);
    assert!(holdings.iter().all(|h| h.end_reason == "exited"));

    // Bad arguments name the field.
    let bad = client
        .lookup_address(LookupAddressRequest {
            address: "10.0.0.300".into(),
            at_unix_nanos: T0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("address"), "{}", bad.message());
    let bad = client
        .lookup_address(LookupAddressRequest {
            address: "10.0.0.1".into(),
            at_unix_nanos: -1,
        })
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("at_unix_nanos"), "{}", bad.message());
    let bad = client
        .addresses_of_image(of_image("img-a", T0 + S, T0))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("from_unix_nanos"), "{}", bad.message());
    let bad = client
        .addresses_of_image(AddressesOfImageRequest::default())
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("image_id"), "{}", bad.message());

    // The conflicts were reported: the late stop's transient one and the real one.
    let incidents = bus.read(INCIDENTS, "cnnf.incident.c.address-conflict", 2).await;
    let incident = match Envelope::decode(incidents[1].payload.as_ref()).unwrap().payload {
        Some(Payload::Incident(incident)) => incident,
        other => panic!("not an incident: {other:?}"),
    };
    assert_eq!(incident.details["address"], "10.0.9.9");
    assert_eq!(incident.details["claimant.container_id"], "c7");
    assert!(incident.details["holders"].contains("c6"), "{:?}", incident.details);
    eventually("the conflict counter", || async {
        ingest
            .health
            .encode_metrics()
            .contains("cnnf_ingest_address_conflicts_total 2")
            .then_some(())
    })
    .await;
    ingest.stop().await;
}

/// Heartbeats every 100 ms with the current time until told to stop;
/// returns the time of the last one.
fn heartbeats(
    js: jetstream::Context,
    node: &'static str,
    boot: &'static str,
    running: Arc<AtomicBool>,
) -> JoinHandle<i64> {
    tokio::spawn(async move {
        let mut sequence = 0;
        let mut last = 0;
        while running.load(Ordering::SeqCst) {
            sequence += 1;
            last = now_nanos();
            let envelope = heartbeat(node, boot, sequence, last);
            let id = envelope.event_id.clone();
            let publish = jetstream::message::PublishMessage::build()
                .payload(cnnf_core::envelope::encode(envelope).into())
                .message_id(id);
            js.send_publish(format!("cnnf.heartbeat.{CLUSTER}.{node}"), publish)
                .await
                .unwrap()
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_is_released_after_the_timeout_and_not_before() {
    const TIMEOUT: i64 = 2 * S;
    let server = NatsServer::start().await;
    let bus = Bus::connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(
        &server,
        open_store(dir.path()),
        &["--node-timeout-seconds", "2"],
        RunOptions::default(),
    )
    .await;
    let (alive, silent) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
    let n1 = heartbeats(bus.js.clone(), "n1", "boot1", Arc::clone(&alive));
    let n2 = heartbeats(bus.js.clone(), "n2", "boot1", Arc::clone(&silent));
    let now = now_nanos();
    bus.publish(
        &workload_subject("n1"),
        started("n1", "a1", "img-a", &["10.1.0.1"], now),
    )
    .await;
    bus.publish(
        &workload_subject("n2"),
        started("n2", "b1", "img-b", &["10.2.0.1", "fd00::21"], now),
    )
    .await;
    bus.kv_is(
        "with both nodes up",
        &[("10.1.0.1", "a1"), ("10.2.0.1", "b1"), ("fd00__21", "b1")],
    )
    .await;

    // n2 goes silent.
    silent.store(false, Ordering::SeqCst);
    let last_heartbeat = n2.await.unwrap();
    let released = eventually("n2's addresses to be released", || async {
        let kv = bus.kv().await;
        let seen = now_nanos();
        (!kv.contains_key("10.2.0.1")).then_some((seen, kv))
    })
    .await;
    let (seen, kv) = released;
    assert!(
        seen >= last_heartbeat + TIMEOUT,
        "released {} ms after the last heartbeat, before the 2 s timeout",
        (seen - last_heartbeat) / 1_000_000
    );
    assert_eq!(
        kv.into_iter().collect::<Vec<_>>(),
        [("10.1.0.1".to_owned(), "a1".to_owned())]
    );

    // The release is an event on the log, with a deterministic id and time.
    let messages = bus.read(WORKLOADS, &workload_subject("n2"), 2).await;
    let gone = Envelope::decode(messages[1].payload.as_ref()).unwrap();
    assert_eq!(gone.event_id, format!("ingest:node-gone:{CLUSTER}:n2:{last_heartbeat}"));
    assert_eq!(gone.time_unix_nanos, last_heartbeat + TIMEOUT);
    let Some(Payload::NodeGone(NodeGone {
        last_heartbeat_unix_nanos,
        mut released_addresses,
        container_ids,
    })) = gone.payload
    else {
        panic!("not a NodeGone: {:?}", gone.payload);
    };
    released_addresses.sort();
    assert_eq!(last_heartbeat_unix_nanos, last_heartbeat);
    assert_eq!(released_addresses, ["10.2.0.1", "fd00::21"]);
    assert_eq!(container_ids, ["b1"]);

    // n2's holding ended exactly at the timeout; n1, still heartbeating, kept its own.
    let mut client = ingest.client().await;
    let before = lookup(&mut client, "10.2.0.1", last_heartbeat + TIMEOUT - 1).await;
    assert_eq!(holders(&before), ["b1"]);
    assert_eq!(before.held_until_unix_nanos, last_heartbeat + TIMEOUT);
    assert_eq!(before.holdings[0].end_reason, "node-gone");
    assert!(holders(&lookup(&mut client, "10.2.0.1", last_heartbeat + TIMEOUT).await).is_empty());
    assert_eq!(holders(&lookup(&mut client, "10.1.0.1", 0).await), ["a1"]);
    assert!(ingest
        .health
        .encode_metrics()
        .contains("cnnf_ingest_nodes_gone_total 1"));

    // n2 comes back (a new boot) and announces a container: held again.
    let back = Arc::new(AtomicBool::new(true));
    let n2 = heartbeats(bus.js.clone(), "n2", "boot2", Arc::clone(&back));
    bus.publish(
        &workload_subject("n2"),
        started("n2", "b2", "img-b", &["10.2.0.1"], now_nanos()),
    )
    .await;
    bus.kv_is("after n2 came back", &[("10.1.0.1", "a1"), ("10.2.0.1", "b2")])
        .await;
    alive.store(false, Ordering::SeqCst);
    back.store(false, Ordering::SeqCst);
    n1.await.unwrap();
    n2.await.unwrap();
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spoofed_and_malformed_events_are_dead_lettered_and_leave_the_registry_alone() {
    let server = NatsServer::start().await;
    let bus = Bus::connect(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = Ingest::start(&server, open_store(dir.path()), &[], RunOptions::default()).await;
    let n1 = workload_subject("n1");
    bus.publish(&n1, started("n1", "good-1", "img-a", &["10.3.0.1"], T0))
        .await;

    let valid = cnnf_core::envelope::encode(started("n1", "x", "img-x", &["10.3.0.9"], T0 + S));
    let mut future_version = Envelope::decode(valid.as_slice()).unwrap();
    future_version.schema_version = 2;
    let mut bloated = started("n1", "big", "img-x", &["10.3.0.9"], T0 + S);
    if let Some(Payload::WorkloadStarted(started)) = &mut bloated.payload {
        started
            .workload
            .as_mut()
            .unwrap()
            .labels
            .insert("blob".into(), "x".repeat(100_000));
    }
    let mut workload_elsewhere = started("n1", "x", "img-x", &["10.3.0.9"], T0 + S);
    if let Some(Payload::WorkloadStarted(started)) = &mut workload_elsewhere.payload {
        started.workload.as_mut().unwrap().node = "n2".into();
    }
    // (subject, bytes, reason, the start of the detail)
    let bad: Vec<(String, Vec<u8>, &str, &str)> = vec![
        (
            n1.clone(),
            cnnf_core::envelope::encode(started("n2", "spoof", "img-x", &["10.3.0.2"], T0 + S)),
            "origin-mismatch",
            "origin-mismatch",
        ),
        (
            workload_subject("n2"),
            cnnf_core::envelope::encode(stopped("n1", "good-1", T0 + 2 * S)),
            "origin-mismatch",
            "origin-mismatch",
        ),
        (n1.clone(), b"\x08\xff\xff garbage".to_vec(), "malformed", "not a valid"),
        (
            n1.clone(),
            future_version.encode_to_vec(),
            "unknown-schema-version",
            "schema version 2",
        ),
        (
            n1.clone(),
            cnnf_core::envelope::encode(started("n1", "x", "img-x", &[], T0 + S)),
            "invalid",
            "no-addresses",
        ),
        (
            n1.clone(),
            cnnf_core::envelope::encode(started("n1", "x", "img-x", &["10.3.0.256"], T0 + S)),
            "invalid",
            "invalid-address",
        ),
        (
            n1.clone(),
            cnnf_core::envelope::encode(workload_elsewhere),
            "invalid",
            "workload-origin-mismatch",
        ),
        (
            n1.clone(),
            cnnf_core::envelope::encode(bloated),
            "oversized",
            "message of",
        ),
    ];
    for (i, (subject, bytes, _, _)) in bad.iter().enumerate() {
        bus.publish_bytes(subject, &format!("bad:{i}"), bytes.clone()).await;
    }
    let spoofed_heartbeat = cnnf_core::envelope::encode(heartbeat("n2", "boot", 1, now_nanos()));
    bus.publish_bytes(
        &format!("cnnf.heartbeat.{CLUSTER}.n1"),
        "bad-heartbeat",
        spoofed_heartbeat,
    )
    .await;
    let last = bus
        .publish(&n1, started("n1", "good-2", "img-a", &["10.3.0.3"], T0 + 3 * S))
        .await;
    ingest.applied(last).await;

    // Each is on cnnf.dlq.<durable>, in order, with its reason.
    let letters = bus.read(DEAD_LETTER, "cnnf.dlq.ingest-workloads", bad.len()).await;
    for (letter, (subject, bytes, reason, detail)) in letters.iter().zip(&bad) {
        let headers = letter.headers.as_ref().unwrap();
        assert_eq!(headers.get(DLQ_REASON).unwrap().as_str(), *reason, "{subject}");
        let found = headers.get(DLQ_DETAIL).unwrap().as_str();
        assert!(found.starts_with(detail), "detail {found:?} is not {detail:?}");
        assert_eq!(
            letter.payload.as_ref(),
            bytes.as_slice(),
            "the dead letter carries the original bytes"
        );
    }
    let letters = bus.read(DEAD_LETTER, "cnnf.dlq.ingest-heartbeats", 1).await;
    let headers = letters[0].headers.as_ref().unwrap();
    assert_eq!(headers.get(DLQ_REASON).unwrap().as_str(), "origin-mismatch");
    assert!(headers.get(DLQ_DETAIL).unwrap().as_str().starts_with("origin-mismatch"));

    // The registry holds the two good containers and nothing else.
    bus.kv_is(
        "after the bad events",
        &[("10.3.0.1", "good-1"), ("10.3.0.3", "good-2")],
    )
    .await;
    let holdings = ingest
        .store
        .scan_prefix(cnnf_ingest::registry::HOLDINGS, b"", 100)
        .unwrap();
    assert_eq!(holdings.len(), 2);
    let mut client = ingest.client().await;
    assert!(holders(&lookup(&mut client, "10.3.0.2", T0 + 2 * S).await).is_empty());
    let good = lookup(&mut client, "10.3.0.1", 0).await;
    assert_eq!(
        (holders(&good), good.held_until_unix_nanos),
        (vec!["good-1".to_owned()], 0)
    );
    let metrics = ingest.health.encode_metrics();
    for line in [
        // The runner refuses a mismatched origin before the gate sees it.
        "cnnf_ingest_workloads_projection_dead_lettered_total{consumer=\"ingest-workloads\",reason=\"origin-mismatch\"} 2",
        "cnnf_ingest_heartbeats_projection_dead_lettered_total{consumer=\"ingest-heartbeats\",reason=\"origin-mismatch\"} 1",
        "cnnf_ingest_gate_rejected_total{consumer=\"ingest-workloads\",reason=\"no-addresses\"} 1",
        "cnnf_ingest_workloads_projection_dead_lettered_total{consumer=\"ingest-workloads\",reason=\"oversized\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    ingest.stop().await;
}

/// A deterministic churn of `count` events on four nodes over a pool of 64
/// addresses: reuse across nodes and images, late stops, conflicts, a
/// re-announced container, and a node gone.
fn churn(count: usize) -> Vec<(String, Envelope)> {
    let nodes = ["n1", "n2", "n3", "n4"];
    let mut events = Vec::with_capacity(count);
    // Live containers: (node, container, time of start).
    let mut live: Vec<(&str, String, i64)> = Vec::new();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut time = T0;
    let mut id = 0;
    while events.len() < count {
        time += S / 10 + (next() % 1000) as i64 * 1_000_000;
        id += 1;
        let roll = next() % 100;
        if roll < 50 || live.len() < 8 {
            let node = nodes[(next() % 4) as usize];
            let address = format!("10.9.{}.{}", next() % 2, next() % 32);
            let container = format!("ctr-{id}");
            let image = format!("img-{}", next() % 6);
            events.push((
                workload_subject(node),
                started(node, &container, &image, &[&address], time),
            ));
            live.push((node, container, time));
        } else if roll < 95 {
            let (node, container, _) = live.remove((next() as usize) % live.len());
            // Now and then the stop is stamped earlier than events already sent.
            let stamp = if roll < 60 { time - S } else { time };
            events.push((workload_subject(node), stopped(node, &container, stamp)));
        } else if roll < 98 {
            let (node, container, started_at) = live[(next() as usize) % live.len()].clone();
            let mut again = started(node, &container, "img-0", &["10.9.7.7"], started_at);
            again.event_id.push_str(":again");
            events.push((workload_subject(node), again));
        } else {
            let node = nodes[(next() % 4) as usize];
            let payload = Payload::NodeGone(NodeGone {
                last_heartbeat_unix_nanos: time - 30 * S,
                ..Default::default()
            });
            let gone = envelope(node, format!("ingest:node-gone:{CLUSTER}:{node}:{time}"), time, payload);
            events.push((workload_subject(node), gone));
            live.retain(|(owner, _, _)| *owner != node);
        }
    }
    events
}

fn registry_dump(store: &dyn ProjectionStore) -> Vec<(&'static str, cnnf_store::Entry)> {
    let dump = cnnf_store::dump(store).unwrap();
    dump.into_iter()
        .filter(|(table, _)| cnnf_ingest::REGISTRY_TABLES.contains(table))
        .collect()
}

/// Checks that the KV map is exactly what the registry implies.
async fn kv_matches_registry(bus: &Bus, store: &dyn ProjectionStore) {
    let wanted: BTreeMap<String, Vec<u8>> = cnnf_ingest::registry::kv_map(store)
        .unwrap()
        .into_iter()
        .map(|(address, value)| (cnnf_ingest::address::kv_key(&address), value))
        .collect();
    let mut found = BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < WAIT {
        found = cnnf_ingest::kv::snapshot(&bus.bucket)
            .await
            .unwrap()
            .into_iter()
            .map(|(key, value)| (key, value.to_vec()))
            .collect();
        if found == wanted {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the KV map differs from the registry: {} keys, {} wanted",
        found.len(),
        wanted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_restarts_and_a_rebuild_from_the_log_give_one_registry() {
    const EVENTS: usize = 3000;
    let server = NatsServer::start().await;
    let bus = Bus::connect(&server).await;
    let events = churn(EVENTS);
    let live_dir = tempfile::tempdir().unwrap();
    let chunks: Vec<_> = events.chunks(EVENTS / 6).collect();
    let mut last = 0;

    // Live, with a crash right after a commit (before the ack and the KV
    // writes) every few batches: the service restarts its runner in place.
    let commits = Arc::new(AtomicU64::new(0));
    let crashes = Arc::new(AtomicU64::new(0));
    let options = RunOptions {
        after_commit: Some({
            let (commits, crashes) = (Arc::clone(&commits), Arc::clone(&crashes));
            Arc::new(move |_| {
                if commits.fetch_add(1, Ordering::SeqCst) % 7 == 3 {
                    crashes.fetch_add(1, Ordering::SeqCst);
                    HookAction::Crash
                } else {
                    HookAction::Continue
                }
            })
        }),
    };
    let ingest = Ingest::start(&server, open_store(live_dir.path()), &[], options.clone()).await;
    for chunk in &chunks[..3] {
        for (subject, envelope) in chunk.iter().cloned() {
            last = bus.publish(&subject, envelope).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Killed mid-stream, as a process would be.
    ingest.kill().await;
    for (subject, envelope) in chunks[3].iter().cloned() {
        last = bus.publish(&subject, envelope).await;
    }
    // Restarted on the same store while the rest arrives.
    let ingest = Ingest::start(&server, open_store(live_dir.path()), &[], options).await;
    for chunk in &chunks[4..] {
        for (subject, envelope) in chunk.iter().cloned() {
            last = bus.publish(&subject, envelope).await;
        }
    }
    ingest.applied(last).await;
    assert!(crashes.load(Ordering::SeqCst) >= 2, "too few crashes to mean anything");
    kv_matches_registry(&bus, ingest.store.as_ref()).await;
    let live = ingest.stop().await;
    let live_dump = registry_dump(live.as_ref());
    assert!(
        live_dump
            .iter()
            .filter(|(table, _)| *table == cnnf_ingest::registry::HOLDINGS)
            .count()
            > 500,
        "the churn made too few holdings"
    );
    let outbox = live
        .scan_prefix(cnnf_ingest::registry::INCIDENT_OUTBOX, b"", 10)
        .unwrap();
    assert!(outbox.is_empty(), "incidents left unpublished");

    // Whatever happened to the KV bucket while the service was down (lost
    // writes, a stray key, a wrong value), a start puts it right.
    let map = bus.kv().await;
    let mut keys = map.keys();
    let (lost, wrong) = (keys.next().unwrap().clone(), keys.next().unwrap().clone());
    bus.bucket.delete(&lost).await.unwrap();
    bus.bucket.put(&wrong, "garbage".into()).await.unwrap();
    bus.bucket.put("10.255.255.255", "stray".into()).await.unwrap();
    drop(live);
    let ingest = Ingest::start(&server, open_store(live_dir.path()), &[], RunOptions::default()).await;
    kv_matches_registry(&bus, ingest.store.as_ref()).await;
    let live = ingest.stop().await;
    assert!(
        live_dump == registry_dump(live.as_ref()),
        "a restart without events changed the registry"
    );

    // A rebuild from the log into an empty store.
    let rebuilt_dir = tempfile::tempdir().unwrap();
    let rebuild = Ingest::start(&server, open_store(rebuilt_dir.path()), &[], RunOptions::default()).await;
    rebuild.applied(last).await;
    kv_matches_registry(&bus, rebuild.store.as_ref()).await;
    let rebuilt = rebuild.stop().await;
    let rebuilt_dump = registry_dump(rebuilt.as_ref());
    assert_eq!(live_dump.len(), rebuilt_dump.len());
    assert!(
        live_dump == rebuilt_dump,
        "the rebuilt registry differs from the live one"
    );
}
