//! The bus against a real nats-server and a real RocksDB store: exactly-once
//! projections across kills and failpoints, exactly-once publishing across
//! a server restart, dead letters, and rebuilds from the log.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use cnnf_bus::runner::{ApplyError, HookAction, DLQ_REASON};
use cnnf_bus::{
    Event, OutgoingMessage, Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig, RunnerHooks,
};
use cnnf_core::envelope::Rejection;
use cnnf_proto::v1::{envelope::Payload, Envelope, NodeHeartbeat};
use cnnf_store::{applied_sequence, dead_letter_key, read_u64, ProjectionStore, Txn, META_TABLE};
use cnnf_store_rocksdb::RocksStore;
use cnnf_testkit::NatsServer;
use futures::StreamExt;
use prost::Message as _;
use rand::Rng;

const COUNTS: &str = "counts";
const STREAM: &str = "T_EVENTS";

/// Counts events per node and in total; rejects events from node "evil"
/// *after* writing, to prove a rejected event leaves nothing behind.
struct Counting;

impl Projection for Counting {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        if !matches!(event.envelope.payload, Some(Payload::NodeHeartbeat(_))) {
            return Err(ApplyError::Reject(Rejection::Invalid("not a heartbeat".into())));
        }
        txn.add_u64(COUNTS, format!("node/{}", event.envelope.node).as_bytes(), 1)?;
        txn.add_u64(COUNTS, b"total", 1)?;
        if event.envelope.node == "evil" {
            return Err(ApplyError::Reject(Rejection::Invalid(
                "events from node evil are refused".into(),
            )));
        }
        Ok(())
    }
}

fn event(i: u64, node: &str) -> Vec<u8> {
    cnnf_core::envelope::encode(Envelope {
        event_id: format!("t:{i}"),
        cluster: "c".into(),
        node: node.into(),
        payload: Some(Payload::NodeHeartbeat(NodeHeartbeat {
            boot_id: "b".into(),
            sequence: i,
            ..Default::default()
        })),
        ..Default::default()
    })
}

fn node_of(i: u64) -> String {
    format!("n{}", i % 37)
}

async fn setup(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    js.get_or_create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["t.events.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    cnnf_bus::topology::ensure(&js, &Default::default()).await.unwrap();
    js
}

async fn publish_events(js: &jetstream::Context, range: std::ops::Range<u64>) {
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for i in range {
        let message = OutgoingMessage::new(format!("t.events.{}", i % 4), format!("t:{i}"), event(i, &node_of(i)));
        publisher.publish(message).await.unwrap();
    }
    publisher.flush().await.unwrap();
}

async fn last_sequence(js: &jetstream::Context) -> u64 {
    js.get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}

fn open(dir: &std::path::Path) -> Arc<dyn ProjectionStore> {
    // A killed runner's last store write may still hold the database for a
    // moment (it runs on a blocking thread): retry the open, as a restarted
    // process would find the lock released.
    for _ in 0..500 {
        if let Ok(store) = RocksStore::open(dir, &[COUNTS]) {
            return Arc::new(store);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("store at {} never became free", dir.display());
}

/// Runs `runner` until the store has applied `target`, then shuts it down.
async fn run_until(runner: ProjectionRunner<Counting>, store: Arc<dyn ProjectionStore>, durable: &str, target: u64) {
    let durable = durable.to_owned();
    let reached = async move {
        while applied_sequence(store.as_ref(), &durable).unwrap() < target {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), runner.run(reached))
        .await
        .expect("projection did not catch up")
        .unwrap();
}

fn counts(store: &dyn ProjectionStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .scan_prefix(COUNTS, b"", usize::MAX)
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projection_is_exact_across_kills_and_a_failpoint_between_commit_and_ack() {
    const EVENTS: u64 = 100_000;
    let server = NatsServer::start().await;
    let js = setup(&server).await;
    publish_events(&js, 0..EVENTS).await;
    let target = last_sequence(&js).await;
    assert_eq!(target, EVENTS);

    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::thread_rng();
    let (mut kills, mut failpoints, mut restarts) = (0, 0, 0);
    loop {
        let store = open(dir.path());
        if applied_sequence(store.as_ref(), "counting").unwrap() >= target {
            break;
        }
        restarts += 1;
        // Every other run crashes right after a commit, before the ack, on
        // a random batch; the others are killed at a random moment after a
        // random number of commits (mid-batch, mid-write or mid-ack).
        // Interruptions are counted in commits, not time, so the test means
        // the same on a fast machine and a slow one.
        let crash_run = restarts % 2 == 0;
        let stop_after = rng.gen_range(1..6u64);
        let commits = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&commits);
        let hooks = RunnerHooks {
            after_commit: Some(Arc::new(move |_| {
                if counted.fetch_add(1, Ordering::SeqCst) + 1 == stop_after && crash_run {
                    HookAction::Crash
                } else {
                    HookAction::Continue
                }
            })),
        };
        let mut config = RunnerConfig::new(STREAM, "counting");
        config.batch_size = rng.gen_range(50..1000);
        let runner = ProjectionRunner::new(js.clone(), Arc::clone(&store), Counting, config).with_hooks(hooks);
        let watched = Arc::clone(&store);
        drop(store);
        let delay = Duration::from_micros(rng.gen_range(0..3000));
        let mut task = tokio::spawn(runner.run(std::future::pending()));
        let kill_at = async {
            loop {
                let caught_up = applied_sequence(watched.as_ref(), "counting").unwrap() >= target;
                if caught_up || (!crash_run && commits.load(Ordering::SeqCst) >= stop_after) {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            tokio::time::sleep(delay).await;
        };
        tokio::select! {
            result = &mut task => match result.unwrap() {
                Err(cnnf_bus::runner::RunnerError::Failpoint(_)) => failpoints += 1,
                other => panic!("runner ended unexpectedly: {:?}", other.err()),
            },
            () = kill_at => {
                task.abort();
                let _ = task.await;
                if !crash_run {
                    kills += 1;
                }
            }
        }
        drop(watched);
    }
    eprintln!("{restarts} restarts: {kills} kills, {failpoints} crashes at the commit/ack failpoint");
    assert!(
        kills >= 3 && failpoints >= 3,
        "too few interruptions to mean anything: {kills} kills, {failpoints} failpoints"
    );

    let store = open(dir.path());
    let counts = counts(store.as_ref());
    assert_eq!(
        read_u64(store.as_ref(), COUNTS, b"total").unwrap(),
        EVENTS,
        "after {restarts} restarts"
    );
    for n in 0..37u64 {
        let expected = (0..EVENTS).filter(|i| i % 37 == n).count() as u64;
        let key = format!("node/n{n}").into_bytes();
        assert_eq!(
            cnnf_store::decode_u64(&counts[&key]),
            Some(expected),
            "node n{n} after {kills} kills and {failpoints} failpoints"
        );
    }
    assert_eq!(applied_sequence(store.as_ref(), "counting").unwrap(), target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publisher_delivers_exactly_once_across_a_server_restart() {
    const EVENTS: u64 = 30_000;
    let mut server = NatsServer::start().await;
    let js = setup(&server).await;
    let publishing = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut publisher = Publisher::new(js, PublisherConfig::default());
            for i in 0..EVENTS {
                let message =
                    OutgoingMessage::new(format!("t.events.{}", i % 4), format!("t:{i}"), event(i, &node_of(i)));
                publisher.publish(message).await.unwrap();
                if i % 1000 == 0 {
                    // Leave the server time to go down mid-stream.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            publisher.flush().await.unwrap();
            let metrics = publisher.metrics();
            eprintln!(
                "acked {}, duplicates {}, resends {}",
                metrics.acked.get(),
                metrics.duplicates.get(),
                metrics.resends.get()
            );
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !publishing.is_finished(),
        "publishing ended before the restart: the test would prove nothing"
    );
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.restart().await;
    // Acks lost with the server cause resends; publishes the client
    // buffered through the outage need none. Either way: exactly once.
    tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .unwrap()
        .unwrap();

    // Read the whole stream back: every id exactly once.
    let stream = js.get_stream(STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = HashSet::new();
    let mut total = 0u64;
    while total < EVENTS {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("stream ended early")
            .unwrap()
            .unwrap();
        let envelope = Envelope::decode(message.payload.as_ref()).unwrap();
        assert!(
            seen.insert(envelope.event_id.clone()),
            "duplicate {}",
            envelope.event_id
        );
        total += 1;
    }
    assert_eq!(last_sequence(&js).await, EVENTS, "stream holds extra messages");
    assert_eq!(seen.len() as u64, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_dead_lettered_with_reasons_and_the_projection_goes_on() {
    let server = NatsServer::start().await;
    let js = setup(&server).await;
    let valid = event(1, "n1");
    let mut future_version = Envelope::decode(valid.as_slice()).unwrap();
    future_version.schema_version = 99;
    let oversized = cnnf_core::envelope::encode(Envelope {
        event_id: "big".into(),
        node: "x".repeat(4096),
        payload: Some(Payload::NodeHeartbeat(NodeHeartbeat::default())),
        ..Default::default()
    });
    let inputs: Vec<(Vec<u8>, Option<&str>)> = vec![
        (event(1, "n1"), None),
        (b"\xff\xfe garbage \x00\x01".to_vec(), Some("malformed")),
        (valid[..valid.len() - 4].to_vec(), Some("malformed")),
        (future_version.encode_to_vec(), Some("unknown-schema-version")),
        (cnnf_core::envelope::encode(Envelope::default()), Some("no-payload")),
        (oversized, Some("oversized")),
        (event(2, "evil"), Some("invalid")),
        (event(3, "n1"), None),
        (event(4, "n2"), None),
    ];
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for (i, (payload, _)) in inputs.iter().enumerate() {
        publisher
            .publish(OutgoingMessage::new("t.events.0", format!("bad:{i}"), payload.clone()))
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut config = RunnerConfig::new(STREAM, "counting");
    config.max_message_bytes = 2048;
    let runner = ProjectionRunner::new(js.clone(), Arc::clone(&store), Counting, config);
    let metrics = runner.metrics().clone();
    run_until(runner, Arc::clone(&store), "counting", inputs.len() as u64).await;

    // Only the three good events count; the rejected "evil" event left
    // nothing behind although it wrote before it was refused.
    let counts = counts(store.as_ref());
    assert_eq!(read_u64(store.as_ref(), COUNTS, b"total").unwrap(), 3);
    assert_eq!(cnnf_store::decode_u64(&counts[&b"node/n1".to_vec()]), Some(2));
    assert!(!counts.contains_key(b"node/evil".as_slice()));
    let expected: Vec<&str> = inputs.iter().filter_map(|(_, reason)| *reason).collect();
    assert_eq!(
        read_u64(store.as_ref(), META_TABLE, &dead_letter_key("counting")).unwrap(),
        expected.len() as u64
    );
    assert_eq!(metrics.applied.get(), 3);

    // Each quarantined message is on cnnf.dlq.counting, with its reason and
    // its original bytes.
    let stream = js.get_stream(cnnf_bus::topology::DEAD_LETTER).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut reasons = Vec::new();
    for _ in 0..expected.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(message.subject.as_str(), "cnnf.dlq.counting");
        let headers = message.headers.clone().unwrap();
        reasons.push(headers.get(DLQ_REASON).unwrap().to_string());
        let index = inputs
            .iter()
            .position(|(payload, _)| payload.as_slice() == message.payload.as_ref())
            .expect("dead letter carries the original bytes");
        assert_eq!(inputs[index].1, Some(reasons.last().unwrap().as_str()));
    }
    assert_eq!(reasons, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilding_from_the_stream_gives_the_live_projection_exactly() {
    const EVENTS: u64 = 20_000;
    let server = NatsServer::start().await;
    let js = setup(&server).await;

    // Live: the projection consumes while the events are being published.
    let live_dir = tempfile::tempdir().unwrap();
    let live = open(live_dir.path());
    let runner = ProjectionRunner::new(
        js.clone(),
        Arc::clone(&live),
        Counting,
        RunnerConfig::new(STREAM, "live"),
    );
    let consuming = tokio::spawn(run_until(runner, Arc::clone(&live), "live", EVENTS));
    for chunk in 0..10 {
        publish_events(&js, chunk * EVENTS / 10..(chunk + 1) * EVENTS / 10).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    consuming.await.unwrap();

    // Rebuild: a new durable into an empty store, from the first message.
    let rebuilt_dir = tempfile::tempdir().unwrap();
    let rebuilt = open(rebuilt_dir.path());
    let runner = ProjectionRunner::new(
        js.clone(),
        Arc::clone(&rebuilt),
        Counting,
        RunnerConfig::new(STREAM, "rebuild"),
    );
    run_until(runner, Arc::clone(&rebuilt), "rebuild", EVENTS).await;

    assert_eq!(read_u64(live.as_ref(), COUNTS, b"total").unwrap(), EVENTS);
    assert_eq!(counts(live.as_ref()), counts(rebuilt.as_ref()));
}

#[tokio::test]
async fn declaring_the_topology_is_idempotent_and_repairs_drift() {
    let server = NatsServer::start().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let config = cnnf_bus::TopologyConfig::default();
    cnnf_bus::topology::ensure(&js, &config).await.unwrap();
    cnnf_bus::topology::ensure(&js, &config).await.unwrap();
    for wanted in cnnf_bus::topology::streams(&config) {
        let mut stream = js.get_stream(&wanted.name).await.unwrap();
        assert_eq!(stream.info().await.unwrap().config.subjects, wanted.subjects);
    }
    for bucket in cnnf_bus::topology::buckets(&config) {
        js.get_key_value(&bucket.config.bucket).await.unwrap();
    }

    // Someone shortened the flow retention by hand: start-up puts it back.
    let mut flows = js.get_stream(cnnf_bus::topology::FLOWS).await.unwrap();
    let mut drifted = flows.info().await.unwrap().config.clone();
    drifted.max_age = Duration::from_secs(24 * 60 * 60);
    js.update_stream(drifted).await.unwrap();
    cnnf_bus::topology::ensure(&js, &config).await.unwrap();
    let mut flows = js.get_stream(cnnf_bus::topology::FLOWS).await.unwrap();
    assert_eq!(flows.info().await.unwrap().config.max_age, config.flows_max_age);
}

#[tokio::test]
async fn more_than_a_thousand_agents_can_watch_the_verdict_tables() {
    let server = NatsServer::start().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let config = cnnf_bus::TopologyConfig::default();
    cnnf_bus::topology::ensure(&js, &config).await.unwrap();
    let mut stream = js
        .get_stream(format!("KV_{}", cnnf_bus::topology::VERDICTS_BUCKET))
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_consumers,
        cnnf_bus::topology::VERDICTS_MAX_CONSUMERS
    );
    // One ordered consumer per agent, as agents watch their table.
    let store = js.get_key_value(cnnf_bus::topology::VERDICTS_BUCKET).await.unwrap();
    let mut watches = Vec::new();
    for node in 0..1100 {
        let watch = store
            .watch_with_history(format!("local.node-{node}"))
            .await
            .unwrap_or_else(|error| panic!("watch {node}: {error}"));
        watches.push(watch);
    }
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 1100);
}

/// Counts heartbeats like [`Counting`] and records the server's receive
/// time of each applied message under `received/<sequence>`.
struct Stamping;

impl Projection for Stamping {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        Counting.apply(event, txn)?;
        let key = format!("received/{:08}", event.stream_sequence);
        txn.put(
            COUNTS,
            key.into_bytes(),
            event.received_unix_nanos.to_be_bytes().to_vec(),
        );
        Ok(())
    }
}

fn heartbeat_on(cluster: &str, node: &str, i: u64) -> Vec<u8> {
    cnnf_core::envelope::encode(Envelope {
        event_id: format!("o:{i}"),
        cluster: cluster.into(),
        node: node.into(),
        payload: Some(Payload::NodeHeartbeat(NodeHeartbeat {
            boot_id: "b".into(),
            sequence: i,
            ..Default::default()
        })),
        ..Default::default()
    })
}

fn unix_nanos_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// Runs `runner` until `until` holds, then shuts it down.
async fn run_while<P: Projection>(runner: ProjectionRunner<P>, until: impl Fn() -> bool + Send + 'static) -> P {
    let reached = async move {
        while !until() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), runner.run(reached))
        .await
        .expect("the runner did not get there")
        .unwrap()
}

/// The dead letters of `durable`: (reason, detail, original bytes).
async fn dead_letters(js: &jetstream::Context, durable: &str, count: usize) -> Vec<(String, String, Vec<u8>)> {
    let stream = js.get_stream(cnnf_bus::topology::DEAD_LETTER).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("cnnf.dlq.{durable}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    for _ in 0..count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("a dead letter is missing")
            .unwrap()
            .unwrap();
        let headers = message.headers.clone().unwrap();
        out.push((
            headers.get(DLQ_REASON).unwrap().to_string(),
            headers.get(cnnf_bus::runner::DLQ_DETAIL).unwrap().to_string(),
            message.payload.to_vec(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_naming_another_origin_than_its_subject_is_dead_lettered_on_every_stream() {
    use cnnf_bus::topology::{FLOWS, HEARTBEATS, POLICY, WORKLOADS};
    let server = NatsServer::start().await;
    let js = setup(&server).await;
    // (stream, subject, the lie, the truth): the lie names node n2 (or
    // cluster d) on a subject of node n1 of cluster c.
    let cases = [
        (
            FLOWS,
            "cnnf.flow.c.n1",
            heartbeat_on("c", "n2", 1),
            heartbeat_on("c", "n1", 2),
        ),
        (
            WORKLOADS,
            "cnnf.workload.c.n1",
            heartbeat_on("c", "n2", 3),
            heartbeat_on("c", "n1", 4),
        ),
        (
            HEARTBEATS,
            "cnnf.heartbeat.c.n1",
            heartbeat_on("d", "n1", 5),
            heartbeat_on("c", "n1", 6),
        ),
        (
            POLICY,
            "cnnf.policy.c.rule",
            heartbeat_on("d", "", 7),
            heartbeat_on("c", "", 8),
        ),
    ];
    let before = unix_nanos_now();
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for (i, (_, subject, lie, truth)) in cases.iter().enumerate() {
        for (part, payload) in [lie, truth].into_iter().enumerate() {
            publisher
                .publish(OutgoingMessage::new(
                    *subject,
                    format!("origin:{i}:{part}"),
                    payload.clone(),
                ))
                .await
                .unwrap();
        }
    }
    publisher.flush().await.unwrap();
    let after = unix_nanos_now();

    for (stream, subject, lie, truth) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let durable = format!("origin-{}", stream.to_lowercase().replace('_', "-"));
        let runner = ProjectionRunner::new(
            js.clone(),
            Arc::clone(&store),
            Stamping,
            RunnerConfig::new(stream, &durable),
        );
        let metrics = runner.metrics().clone();
        let watched = Arc::clone(&store);
        let watched_durable = durable.clone();
        run_while(runner, move || {
            applied_sequence(watched.as_ref(), &watched_durable).unwrap() >= 2
        })
        .await;

        // The good event after the lie is applied; the lie left nothing.
        assert_eq!(read_u64(store.as_ref(), COUNTS, b"total").unwrap(), 1, "{subject}");
        assert_eq!(metrics.applied.get(), 1);
        let letters = dead_letters(&js, &durable, 1).await;
        let (reason, detail, bytes) = &letters[0];
        assert_eq!(reason, "origin-mismatch", "{subject}");
        assert!(detail.starts_with("origin-mismatch: subject"), "{detail}");
        assert_eq!(bytes, &lie, "the dead letter carries the original bytes");
        assert_ne!(bytes, &truth);
        let dead = metrics
            .dead_lettered
            .get_or_create(&cnnf_bus::runner::DeadLetterLabels {
                consumer: durable.clone(),
                reason: "origin-mismatch".into(),
            })
            .get();
        assert_eq!(dead, 1);

        // The projection saw the server's receive time of the good event.
        let stamps = store.scan_prefix(COUNTS, b"received/", 10).unwrap();
        assert_eq!(stamps.len(), 1);
        let received = i64::from_be_bytes(stamps[0].1.as_slice().try_into().unwrap());
        assert!(
            received >= before - 1_000_000_000 && received <= after + 1_000_000_000,
            "received {received} is not between {before} and {after}"
        );
    }
}

/// Refuses to decide events of node "late" until `ready`; counts the rest.
struct Gated {
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Projection for Gated {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        Counting.apply(event, txn)?;
        if event.envelope.node == "late" && !self.ready.load(Ordering::SeqCst) {
            return Err(ApplyError::NotYet(Rejection::Refused {
                reason: "not-ready",
                detail: "what it depends on has not arrived".into(),
            }));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_not_decidable_yet_is_delivered_again_and_dead_lettered_only_past_the_limit() {
    let server = NatsServer::start().await;
    let js = setup(&server).await;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    publish_events_of(&js, &[(1, "n1"), (2, "late"), (3, "n1")]).await;

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let runner = ProjectionRunner::new(
        js.clone(),
        Arc::clone(&store),
        Gated {
            ready: Arc::clone(&ready),
        },
        RunnerConfig::new(STREAM, "gated"),
    );
    let metrics = runner.metrics().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(runner.run(async move {
        let _ = stopped.await;
    }));
    // It commits what came before the undecidable event and waits on it.
    cnnf_testkit::eventually(
        "three deliveries of the late event",
        Duration::from_secs(30),
        || async { (metrics.retried.get() >= 3).then_some(()) },
    )
    .await;
    assert_eq!(applied_sequence(store.as_ref(), "gated").unwrap(), 1);
    assert_eq!(read_u64(store.as_ref(), COUNTS, b"total").unwrap(), 1);
    // Once decidable it is applied, with what follows; nothing was dead-lettered.
    ready.store(true, Ordering::SeqCst);
    cnnf_testkit::eventually("the rest applied", Duration::from_secs(30), || async {
        (applied_sequence(store.as_ref(), "gated").unwrap() >= 3).then_some(())
    })
    .await;
    assert_eq!(read_u64(store.as_ref(), COUNTS, b"total").unwrap(), 3);
    assert_eq!(
        read_u64(store.as_ref(), META_TABLE, &dead_letter_key("gated")).unwrap(),
        0
    );
    assert_eq!(metrics.applied.get(), 3);
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // With a limit, an event that never becomes decidable is dead-lettered
    // with the projection's reason once the limit passed; the next is applied.
    ready.store(false, Ordering::SeqCst);
    publish_events_of(&js, &[(4, "late"), (5, "n1")]).await;
    let mut config = RunnerConfig::new(STREAM, "gated");
    config.retry_limit = Duration::from_millis(300);
    let runner = ProjectionRunner::new(
        js.clone(),
        Arc::clone(&store),
        Gated {
            ready: Arc::clone(&ready),
        },
        config,
    );
    let metrics = runner.metrics().clone();
    let watched = Arc::clone(&store);
    let started = std::time::Instant::now();
    run_while(runner, move || {
        applied_sequence(watched.as_ref(), "gated").unwrap() >= 5
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "dead-lettered before the limit"
    );
    assert!(metrics.retried.get() >= 1);
    assert_eq!(read_u64(store.as_ref(), COUNTS, b"total").unwrap(), 4);
    let letters = dead_letters(&js, "gated", 1).await;
    assert_eq!(letters[0].0, "not-ready");
    assert_eq!(letters[0].2, event(4, "late"));
}

async fn publish_events_of(js: &jetstream::Context, events: &[(u64, &str)]) {
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for (i, node) in events {
        let message = OutgoingMessage::new("t.events.0", format!("g:{i}"), event(*i, node));
        publisher.publish(message).await.unwrap();
    }
    publisher.flush().await.unwrap();
}
