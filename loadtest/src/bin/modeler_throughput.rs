//! `modeler-throughput`: how many decision events per second the modeler
//! turns into models with many images and learned connections, and the
//! memory of the service at that size, beside a raw baseline measured in
//! the same run.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin modeler-throughput -- --images 10000 --connections 1000000
//! ```
//!
//! 1. fill: one container starts for each of `--images` images (each gets
//!    a learning model);
//! 2. learn: decisions between those images, `--per-message` per decision
//!    message, each a new image-to-image connection (learned twice: on the
//!    source's outbound side and on the destination's inbound side), until
//!    the models hold `--connections` learned connections. Measured from
//!    the first publish until the models runner counted every one of them
//!    (flows runner, outbox, `CNNF_MODELS`, models runner; the time the
//!    flows runner alone took is printed too). Baseline: the
//!    same decision messages, published the same way to a scratch stream
//!    and folded by a `ProjectionRunner` whose projection only counts
//!    (one counter per source and destination image), into RocksDB;
//! 3. memory: the process's resident set (`VmRSS`) after the load, with the
//!    modeler and its store at that size (the load is generated on the fly
//!    and the NATS server is another process).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use clap::Parser;
use cnnf_bus::runner::ApplyError;
use cnnf_bus::topology::WORKLOADS;
use cnnf_bus::{Event, OutgoingMessage, Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig};
use cnnf_loadtest::results::{Figure, Results};
use cnnf_proto::v1::{
    envelope::Payload, ConnectionDecision, DecisionBatch, Direction, Endpoint, Envelope, Identity, IdentityKind, Mode,
    Protocol, Verdict, Workload, WorkloadStarted,
};
use cnnf_store::{applied_sequence, ProjectionStore, Txn};
use cnnf_store_rocksdb::RocksStore;
use tokio::sync::oneshot;

#[derive(Debug, Parser)]
#[command(about = "CNNF modeler: decisions turned into models, and memory, against a raw baseline")]
struct Args {
    /// Images (one learning model each).
    #[arg(long, default_value_t = 10_000)]
    images: u64,
    /// Learned connections to reach (each decision teaches two: outbound
    /// on its source image, inbound on its destination image).
    #[arg(long, default_value_t = 1_000_000)]
    connections: u64,
    /// Decisions per decision message.
    #[arg(long, default_value_t = 100)]
    per_message: u64,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const CLUSTER: &str = "bench";
const NODE: &str = "node-0001";
const COUNTS: &str = "counts";
/// Destination images per decision message.
const PEERS: u64 = 10;

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn image_id(image: u64) -> String {
    format!("sha256:{image:064x}")
}

fn image_name(image: u64) -> String {
    format!("registry.example/team/app-{image}:1.{}", image % 7)
}

fn envelope(id: &str, payload: Payload) -> Envelope {
    Envelope {
        event_id: id.to_owned(),
        cluster: CLUSTER.into(),
        node: NODE.into(),
        time_unix_nanos: now_nanos(),
        payload: Some(payload),
        ..Default::default()
    }
}

/// The start of image `image`'s one container.
fn start(image: u64) -> OutgoingMessage {
    let workload = Workload {
        container_id: format!("{image:064x}"),
        container_name: format!("app-{image}"),
        image_id: image_id(image),
        image_name: image_name(image),
        addresses: vec![format!(
            "10.{}.{}.{}",
            (image >> 16) & 255,
            (image >> 8) & 255,
            image & 255
        )],
        cluster: CLUSTER.into(),
        node: NODE.into(),
        ..Default::default()
    };
    let id = format!("{NODE}:bench:start:{image}");
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload),
    });
    OutgoingMessage::new(
        format!("cnnf.workload.{CLUSTER}.{NODE}"),
        id.clone(),
        cnnf_core::envelope::encode(envelope(&id, payload)),
    )
}

fn identity(image: u64) -> Identity {
    Identity {
        kind: IdentityKind::Image as i32,
        id: image_id(image),
        name: image_name(image),
        container_id: format!("{image:064x}"),
        cluster: CLUSTER.into(),
        node: NODE.into(),
    }
}

/// Decision message `m`: source image `m % images`, `per_message`
/// decisions to `PEERS` destination images on distinct ports; every
/// (source, destination, port) of the run is new.
fn decisions(m: u64, images: u64, per_message: u64, subject_prefix: Option<&str>) -> OutgoingMessage {
    let source = m % images;
    let round = m / images;
    let ports_per_peer = per_message.div_ceil(PEERS);
    let now = now_nanos();
    let decisions = (0..per_message)
        .map(|j| {
            let destination = (source + 1 + j % PEERS) % images;
            let port = 1000 + round * ports_per_peer + j / PEERS;
            ConnectionDecision {
                source: Some(Endpoint {
                    address: "10.1.0.1".into(),
                    port: 40000,
                    identity: Some(identity(source)),
                }),
                destination: Some(Endpoint {
                    address: "10.1.0.2".into(),
                    port: u32::try_from(port).unwrap_or(u32::MAX),
                    identity: Some(identity(destination)),
                }),
                protocol: Protocol::Tcp as i32,
                direction: Direction::Egress as i32,
                verdict: Verdict::Allow as i32,
                mode: Mode::Alert as i32,
                first_seen_unix_nanos: now,
                last_seen_unix_nanos: now,
                count: 1,
                ..Default::default()
            }
        })
        .collect();
    let id = format!("{NODE}:bench:flow:{m}");
    let payload = Payload::Decisions(DecisionBatch {
        decisions,
        overflow_count: 0,
    });
    let subject = format!("cnnf.flow.{CLUSTER}.{NODE}");
    let subject = match subject_prefix {
        Some(prefix) => format!("{prefix}.{subject}"),
        None => subject,
    };
    OutgoingMessage::new(subject, id.clone(), cnnf_core::envelope::encode(envelope(&id, payload)))
}

/// Counts decisions per source and destination image, nothing more: the
/// bus's own cost of a projection over the same messages.
struct Counting;

impl Projection for Counting {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        if let Some(Payload::Decisions(batch)) = &event.envelope.payload {
            for decision in &batch.decisions {
                for endpoint in [&decision.source, &decision.destination] {
                    if let Some(identity) = endpoint.as_ref().and_then(|endpoint| endpoint.identity.as_ref()) {
                        txn.add_u64(COUNTS, identity.id.as_bytes(), 1)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Publishes `count` messages built by `make` and returns the stream
/// sequence of the last one.
async fn publish_all(
    js: &jetstream::Context,
    stream_name: &str,
    count: u64,
    make: impl Fn(u64) -> OutgoingMessage,
) -> anyhow::Result<u64> {
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for i in 0..count {
        publisher.publish(make(i)).await?;
    }
    publisher.flush().await?;
    let mut stream = js.get_stream(stream_name).await?;
    Ok(stream.info().await?.state.last_sequence)
}

async fn wait_applied(store: &dyn ProjectionStore, durable: &str, sequence: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    while applied_sequence(store, durable)? < sequence {
        anyhow::ensure!(Instant::now() < deadline, "{durable} did not reach {sequence}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Models in the store, and their learned connections (both sides).
fn model_counts(store: &dyn ProjectionStore) -> anyhow::Result<(u64, u64)> {
    let mut models = 0;
    let mut learned = 0;
    for (_, value) in store.scan_prefix(cnnf_modeler::store::MODELS, b"", usize::MAX)? {
        let record: cnnf_modeler::store::ModelRecord = cnnf_modeler::store::decode("model", &value)?;
        models += 1;
        learned += record.inbound_count + record.outbound_count;
    }
    Ok((models, learned))
}

/// Waits until the models hold `models` models and `learned` connections.
async fn wait_models(store: &Arc<dyn ProjectionStore>, models: u64, learned: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let scanned = Arc::clone(store);
        let (have_models, have_learned) = tokio::task::spawn_blocking(move || model_counts(scanned.as_ref())).await??;
        anyhow::ensure!(
            have_learned <= learned,
            "the models hold {have_learned} learned connections, more than the {learned} sent"
        );
        if have_models >= models && have_learned >= learned {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the models reached {have_models} models and {have_learned} of {learned} learned connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process's resident set, kB (`VmRSS` of /proc/self/status).
fn rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.images > PEERS && args.images < 1 << 24,
        "--images must be between {} and 16777215",
        PEERS + 1
    );
    anyhow::ensure!(args.per_message > 0, "--per-message must be at least 1");
    let decisions_total = args.connections.div_ceil(2).div_ceil(args.per_message) * args.per_message;
    let messages = decisions_total / args.per_message;
    let learned_total = decisions_total * 2;
    let (_server, js, url) = cnnf_loadtest::nats(args.nats_url.as_deref()).await?;
    println!(
        "{} images, {} decisions in {} messages of {} ({} learned connections), nats-server at {url}",
        args.images, decisions_total, messages, args.per_message, learned_total
    );
    let rss_start = rss_kb().unwrap_or(0);

    // The modeler, in this process; no burst limit to speak of.
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ProjectionStore> = Arc::new(cnnf_modeler::open_store(dir.path())?);
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let config = <cnnf_modeler::Config as Parser>::try_parse_from([
        "cnnf-modeler",
        "--nats-url",
        &url,
        "--cluster",
        CLUSTER,
        "--grpc-addr",
        &grpc,
        "--grpc-insecure",
        "--learning-seconds",
        "86400",
        "--burst-limit",
        "1000000",
        "--burst-window-seconds",
        "1",
    ])?;
    let health = cnnf_service::Health::default();
    let (stop_modeler, stopped) = oneshot::channel::<()>();
    let modeler = tokio::spawn(cnnf_modeler::run_with_store(
        config,
        Arc::clone(&store),
        health.clone(),
        cnnf_modeler::RunOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    while !health.not_ready().is_empty() {
        anyhow::ensure!(!modeler.is_finished(), "the modeler ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 1. Fill: every image gets a learning model.
    let started = Instant::now();
    let last = publish_all(&js, WORKLOADS, args.images, start).await?;
    wait_applied(store.as_ref(), cnnf_modeler::WORKLOADS_DURABLE, last).await?;
    wait_models(&store, args.images, 0).await?;
    let filled = started.elapsed();
    println!(
        "fill: {} models created in {:.2} s ({:.0} images/s)",
        args.images,
        filled.as_secs_f64(),
        cnnf_loadtest::rate(args.images, filled)
    );

    // 2. Learn.
    let (images, per_message) = (args.images, args.per_message);
    let started = Instant::now();
    let last_flow = publish_all(&js, cnnf_bus::topology::FLOWS, messages, |m| {
        decisions(m, images, per_message, None)
    })
    .await?;
    let published = started.elapsed();
    wait_applied(store.as_ref(), cnnf_modeler::FLOWS_DURABLE, last_flow).await?;
    let flows_done = started.elapsed();
    wait_models(&store, args.images, learned_total).await?;
    let learned = started.elapsed();
    let rss_loaded = rss_kb().unwrap_or(0);
    println!(
        "learn: {} decisions published in {:.2} s, all applied by the flows runner after {:.2} s, all {} connections in the models after {:.2} s",
        decisions_total,
        published.as_secs_f64(),
        flows_done.as_secs_f64(),
        learned_total,
        learned.as_secs_f64()
    );
    let _ = stop_modeler.send(());
    modeler.await??;

    // Baseline: the same messages folded by a projection that only counts.
    let _ = js.delete_stream("BENCH_MODELER").await;
    js.create_stream(stream::Config {
        name: "BENCH_MODELER".into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let counting_dir = tempfile::tempdir()?;
    let counting: Arc<dyn ProjectionStore> = Arc::new(RocksStore::open(counting_dir.path(), &[COUNTS])?);
    let runner = ProjectionRunner::new(
        js.clone(),
        Arc::clone(&counting),
        Counting,
        RunnerConfig::new("BENCH_MODELER", "bench-count"),
    );
    let (stop_counting, counting_stopped) = oneshot::channel::<()>();
    let counting_task = tokio::spawn(runner.run(async move {
        let _ = counting_stopped.await;
    }));
    let started = Instant::now();
    let last = publish_all(&js, "BENCH_MODELER", messages, |m| {
        decisions(m, images, per_message, Some("bench"))
    })
    .await?;
    wait_applied(counting.as_ref(), "bench-count", last).await?;
    let raw = started.elapsed();
    let _ = stop_counting.send(());
    counting_task.await??;

    cnnf_loadtest::report(
        "decisions into models (modeler)",
        cnnf_loadtest::rate(decisions_total, learned),
        "counting projection (runner)",
        cnnf_loadtest::rate(decisions_total, raw),
    );
    cnnf_loadtest::report(
        "decision messages into models",
        cnnf_loadtest::rate(messages, learned),
        "counting projection (runner)",
        cnnf_loadtest::rate(messages, raw),
    );
    let mut results = Results::new("modeler-throughput");
    results.push(
        Figure::higher(
            "decisions into models (modeler)",
            cnnf_loadtest::rate(decisions_total, learned),
            "decisions/s",
        )
        .baseline(
            "counting projection (runner)",
            cnnf_loadtest::rate(decisions_total, raw),
        )
        .target("≥ 100k events/s"),
    );
    results.push(
        Figure::higher(
            "decision messages into models",
            cnnf_loadtest::rate(messages, learned),
            "messages/s",
        )
        .baseline("counting projection (runner)", cnnf_loadtest::rate(messages, raw)),
    );
    results.push(Figure::lower(
        format!(
            "modeler memory (VmRSS) with {} models, {learned_total} learned connections",
            args.images
        ),
        rss_loaded as f64 / 1024.0,
        "MiB",
    ));
    results.write(args.json.as_deref())?;
    println!(
        "memory: VmRSS {:.1} MiB after the load ({} models, {} learned connections); {:.1} MiB before the modeler started",
        rss_loaded as f64 / 1024.0,
        args.images,
        learned_total,
        rss_start as f64 / 1024.0
    );
    Ok(())
}
