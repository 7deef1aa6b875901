//! `ingest-churn`: how much workload churn the ingest service absorbs with
//! many live workloads, and how soon a started container's address shows
//! in the KV map, each beside a raw baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin ingest-churn -- --workloads 100000
//! ```
//!
//! 1. fill: `--workloads` containers start on `--nodes` nodes (the registry
//!    and the KV map then hold that many live addresses);
//! 2. churn: `--churn` events, each pair stopping a live container and
//!    starting another image's container on the freed address, published
//!    as fast as the `Publisher` goes; measured from the first publish
//!    until the registry applied the last event (and until the KV map shows
//!    the last start). Baseline: the same bytes, published the same way to
//!    a scratch stream and folded by a `ProjectionRunner` whose projection
//!    only counts, into RocksDB;
//! 3. latency: `--samples` new containers started at `--rate` per second;
//!    for each, the time from handing the "started" event to the publisher
//!    until a KV watch delivers the address. Baseline: plain KV puts of the
//!    same values at the same rate, timed to the same kind of watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use clap::Parser;
use cnnf_bus::runner::ApplyError;
use cnnf_bus::topology::{IDENTITIES_BUCKET, WORKLOADS};
use cnnf_bus::{Event, OutgoingMessage, Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig};
use cnnf_ingest::WORKLOADS_DURABLE;
use cnnf_loadtest::results::{Figure, Results};
use cnnf_proto::v1::{envelope::Payload, Envelope, Workload, WorkloadStarted, WorkloadStopped};
use cnnf_store::{applied_sequence, ProjectionStore, Txn};
use cnnf_store_rocksdb::RocksStore;
use futures::StreamExt;
use tokio::sync::oneshot;

#[derive(Debug, Parser)]
#[command(about = "CNNF ingest: churn absorbed and KV latency, against raw baselines")]
struct Args {
    /// Live workloads (one address each) before the churn starts.
    #[arg(long, default_value_t = 100_000)]
    workloads: u64,
    /// Churn events (stops and starts, half each).
    #[arg(long, default_value_t = 100_000)]
    churn: u64,
    /// Nodes the workloads run on.
    #[arg(long, default_value_t = 100)]
    nodes: u64,
    /// Started containers timed for the KV latency.
    #[arg(long, default_value_t = 2_000)]
    samples: u64,
    /// Starts per second while timing the latency.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const CLUSTER: &str = "bench";
const COUNTS: &str = "counts";

fn now_nanos() -> i64 {
    cnnf_ingest::liveness::now_nanos()
}

/// Address number `i` (10.0.0.0/8 has room for 16 million).
fn address(i: u64) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255)
}

fn node(i: u64, nodes: u64) -> String {
    format!("node-{:04}", i % nodes)
}

fn workload(container: u64, image: u64, addr: &str, node: &str) -> Workload {
    Workload {
        container_id: format!("{container:064x}"),
        container_name: format!("app-{image}-{container}"),
        image_id: format!("sha256:{:064x}", image),
        image_name: format!("registry.example/team/app-{image}:1.{}", image % 7),
        addresses: vec![addr.to_owned()],
        labels: [
            ("app".to_owned(), format!("app-{image}")),
            ("pod-template-hash".to_owned(), format!("{:08x}", container)),
            ("tier".to_owned(), "backend".to_owned()),
        ]
        .into(),
        cluster: CLUSTER.into(),
        node: node.to_owned(),
        namespace: format!("team-{}", image % 20),
        pod: format!("app-{image}-{container:x}"),
        interface: String::new(),
    }
}

/// A started or stopped event as an agent publishes it.
fn message(node: &str, id: String, payload: Payload) -> OutgoingMessage {
    let envelope = Envelope {
        event_id: id.clone(),
        cluster: CLUSTER.into(),
        node: node.to_owned(),
        time_unix_nanos: now_nanos(),
        payload: Some(payload),
        ..Default::default()
    };
    OutgoingMessage::new(
        format!("cnnf.workload.{CLUSTER}.{node}"),
        id,
        cnnf_core::envelope::encode(envelope),
    )
}

fn start(container: u64, image: u64, addr: &str, node: &str) -> OutgoingMessage {
    let payload = Payload::WorkloadStarted(WorkloadStarted {
        workload: Some(workload(container, image, addr, node)),
    });
    message(node, format!("{node}:bench:start:{container}"), payload)
}

fn stop(container: u64, image: u64, addr: &str, node: &str) -> OutgoingMessage {
    let payload = Payload::WorkloadStopped(WorkloadStopped {
        workload: Some(workload(container, image, addr, node)),
        reason: "exited".into(),
    });
    message(node, format!("{node}:bench:stop:{container}"), payload)
}

/// Counts events, nothing more: the bus's own cost of a projection.
struct Counting;

impl Projection for Counting {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let key = if matches!(event.envelope.payload, Some(Payload::WorkloadStarted(_))) {
            b"started".as_slice()
        } else {
            b"other".as_slice()
        };
        txn.add_u64(COUNTS, key, 1)?;
        Ok(())
    }
}

/// Publishes `messages` (on `subject_prefix` instead of their own subject,
/// when given) and returns the stream sequence of the last one.
async fn publish_all(
    js: &jetstream::Context,
    stream_name: &str,
    messages: &[OutgoingMessage],
    subject_prefix: Option<&str>,
) -> anyhow::Result<u64> {
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    for message in messages {
        let mut message = message.clone();
        if let Some(prefix) = subject_prefix {
            message.subject = format!("{prefix}.{}", message.subject);
        }
        publisher.publish(message).await?;
    }
    publisher.flush().await?;
    let mut stream = js.get_stream(stream_name).await?;
    Ok(stream.info().await?.state.last_sequence)
}

async fn wait_applied(store: &dyn ProjectionStore, durable: &str, sequence: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while applied_sequence(store, durable)? < sequence {
        anyhow::ensure!(Instant::now() < deadline, "{durable} did not reach {sequence}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Waits until the KV bucket shows container `container` at `addr`.
async fn wait_kv(bucket: &kv::Store, addr: &str, container: u64) -> anyhow::Result<()> {
    let want = format!("{container:064x}");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(value) = bucket.get(cnnf_ingest::address::kv_key(addr)).await? {
            if <Workload as prost::Message>::decode(value.as_ref())?.container_id == want {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the KV map never showed {addr}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The p-th percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Records when `watch` first delivers a put of each key, until it saw
/// `wanted` keys (or a minute of silence).
fn watch_keys(mut watch: kv::Watch, wanted: usize) -> tokio::task::JoinHandle<HashMap<String, Instant>> {
    tokio::spawn(async move {
        let mut seen: HashMap<String, Instant> = HashMap::with_capacity(wanted);
        while seen.len() < wanted {
            match tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
                Ok(Some(Ok(entry))) if entry.operation == kv::Operation::Put => {
                    seen.entry(entry.key).or_insert_with(Instant::now);
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        seen
    })
}

/// A ticker firing `rate` times a second.
fn pace(rate: u64) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    ticker
}

/// The sorted latencies from each key's send to its first sight.
fn latencies(keys: &[String], sent: &[Instant], seen: &HashMap<String, Instant>) -> anyhow::Result<Vec<Duration>> {
    anyhow::ensure!(
        seen.len() == keys.len(),
        "the watch saw {} of {} keys",
        seen.len(),
        keys.len()
    );
    let mut out: Vec<Duration> = keys
        .iter()
        .zip(sent)
        .map(|(key, sent)| seen[key].saturating_duration_since(*sent))
        .collect();
    out.sort();
    Ok(out)
}

fn report_latency(results: &mut Results, what: &str, cnnf: &[Duration], baseline_name: &str, baseline: &[Duration]) {
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        let (ours, theirs) = (percentile(cnnf, p), percentile(baseline, p));
        results.push(
            Figure::lower(format!("{what} {label}"), ours.as_secs_f64() * 1e3, "ms")
                .baseline(format!("{baseline_name} {label}"), theirs.as_secs_f64() * 1e3),
        );
        println!(
            "{what:<34} {label} {:>8.2} ms   {baseline_name:<30} {label} {:>8.2} ms   ratio {:.2}",
            ours.as_secs_f64() * 1e3,
            theirs.as_secs_f64() * 1e3,
            ours.as_secs_f64() / theirs.as_secs_f64().max(1e-9)
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.nodes > 0 && args.workloads > 0,
        "--nodes and --workloads must be at least 1"
    );
    anyhow::ensure!(
        args.workloads + args.churn / 2 + args.samples < 1 << 24,
        "too many addresses for 10.0.0.0/8"
    );
    let (_server, js, url) = cnnf_loadtest::nats(args.nats_url.as_deref()).await?;
    println!(
        "{} live workloads on {} nodes, {} churn events, {} latency samples at {}/s, nats-server at {url}",
        args.workloads, args.nodes, args.churn, args.samples, args.rate
    );

    // The ingest service, in this process.
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ProjectionStore> = Arc::new(cnnf_ingest::open_store(dir.path())?);
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let config = cnnf_ingest::Config::try_parse_from([
        "cnnf-ingest",
        "--nats-url",
        &url,
        "--cluster",
        CLUSTER,
        "--grpc-addr",
        &grpc,
        "--grpc-insecure",
    ])?;
    let health = cnnf_service::Health::default();
    let (stop_ingest, stopped) = oneshot::channel::<()>();
    let ingest = tokio::spawn(cnnf_ingest::run_with_store(
        config,
        Arc::clone(&store),
        health.clone(),
        cnnf_ingest::RunOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    while !health.not_ready().is_empty() {
        anyhow::ensure!(!ingest.is_finished(), "the ingest service ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let bucket = js.get_key_value(IDENTITIES_BUCKET).await?;

    // 1. Fill.
    let fill: Vec<OutgoingMessage> = (0..args.workloads)
        .map(|i| start(i, i % 1000, &address(i), &node(i, args.nodes)))
        .collect();
    let started = Instant::now();
    let last = publish_all(&js, WORKLOADS, &fill, None).await?;
    wait_applied(store.as_ref(), WORKLOADS_DURABLE, last).await?;
    let applied = started.elapsed();
    let i = args.workloads - 1;
    wait_kv(&bucket, &address(i), i).await?;
    println!(
        "fill: {} starts applied in {:.2} s ({:.0}/s), in the KV map after {:.2} s",
        args.workloads,
        applied.as_secs_f64(),
        cnnf_loadtest::rate(args.workloads, applied),
        started.elapsed().as_secs_f64()
    );
    drop(fill);

    // 2. Churn: stop container i, start container `next` on its address.
    let mut churn = Vec::with_capacity(args.churn as usize);
    let mut next = args.workloads;
    let mut final_start = (0, String::new());
    for pair in 0..args.churn / 2 {
        let victim = (pair * 7919) % args.workloads;
        let addr = address(victim);
        let owner = node(victim, args.nodes);
        churn.push(stop(victim, victim % 1000, &addr, &owner));
        churn.push(start(next, 1000 + next % 1000, &addr, &owner));
        final_start = (next, addr);
        next += 1;
    }
    let events = churn.len() as u64;
    let started = Instant::now();
    let last = publish_all(&js, WORKLOADS, &churn, None).await?;
    wait_applied(store.as_ref(), WORKLOADS_DURABLE, last).await?;
    let absorbed = started.elapsed();
    wait_kv(&bucket, &final_start.1, final_start.0).await?;
    let in_kv = started.elapsed();

    // Baseline: the same bytes folded by a projection that only counts.
    let _ = js.delete_stream("BENCH_INGEST").await;
    js.create_stream(stream::Config {
        name: "BENCH_INGEST".into(),
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
        RunnerConfig::new("BENCH_INGEST", "bench-count"),
    );
    let (stop_counting, counting_stopped) = oneshot::channel::<()>();
    let counting_task = tokio::spawn(runner.run(async move {
        let _ = counting_stopped.await;
    }));
    let started = Instant::now();
    let last = publish_all(&js, "BENCH_INGEST", &churn, Some("bench")).await?;
    wait_applied(counting.as_ref(), "bench-count", last).await?;
    let raw = started.elapsed();
    let _ = stop_counting.send(());
    counting_task.await??;
    let mut results = Results::new("ingest-churn");
    results.push(
        Figure::higher(
            "churn absorbed (registry applied)",
            cnnf_loadtest::rate(events, absorbed),
            "events/s",
        )
        .baseline("counting projection (runner)", cnnf_loadtest::rate(events, raw))
        .target("≥ 100k events/s"),
    );
    results.push(
        Figure::higher(
            "churn absorbed (in the KV map)",
            cnnf_loadtest::rate(events, in_kv),
            "events/s",
        )
        .baseline("counting projection (runner)", cnnf_loadtest::rate(events, raw)),
    );
    cnnf_loadtest::report(
        "churn absorbed (registry applied)",
        cnnf_loadtest::rate(events, absorbed),
        "counting projection (runner)",
        cnnf_loadtest::rate(events, raw),
    );
    cnnf_loadtest::report(
        "churn absorbed (in the KV map)",
        cnnf_loadtest::rate(events, in_kv),
        "counting projection (runner)",
        cnnf_loadtest::rate(events, raw),
    );
    drop(churn);

    // 3. Latency, started event to KV watch, with the registry full.
    let keys: Vec<(u64, String)> = (0..args.samples)
        .map(|sample| (next + sample, address(next + sample)))
        .collect();
    let kv_keys: Vec<String> = keys
        .iter()
        .map(|(_, addr)| cnnf_ingest::address::kv_key(addr))
        .collect();
    let watcher = watch_keys(bucket.watch_all().await?, keys.len());
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    let mut sent = Vec::with_capacity(keys.len());
    let mut ticker = pace(args.rate);
    for (container, addr) in &keys {
        ticker.tick().await;
        sent.push(Instant::now());
        publisher
            .publish(start(
                *container,
                2000 + container % 1000,
                addr,
                &node(*container, args.nodes),
            ))
            .await?;
    }
    publisher.flush().await?;
    let cnnf = latencies(&kv_keys, &sent, &watcher.await?)?;

    let scratch = js
        .create_key_value(kv::Config {
            bucket: "bench-kv".into(),
            history: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let watcher = watch_keys(scratch.watch_all().await?, keys.len());
    let mut sent = Vec::with_capacity(keys.len());
    let mut ticker = pace(args.rate);
    for ((container, addr), key) in keys.iter().zip(&kv_keys) {
        let value = cnnf_ingest::registry::encode_workload(&workload(
            *container,
            2000 + container % 1000,
            addr,
            &node(*container, args.nodes),
        ));
        ticker.tick().await;
        sent.push(Instant::now());
        scratch.put(key, Bytes::from(value)).await?;
    }
    let baseline = latencies(&kv_keys, &sent, &watcher.await?)?;
    report_latency(
        &mut results,
        "started -> address in KV watch",
        &cnnf,
        "plain KV put -> KV watch",
        &baseline,
    );

    let _ = stop_ingest.send(());
    ingest.await??;
    let live = cnnf_ingest::registry::kv_map(store.as_ref())?.len();
    println!("registry at the end: {live} addresses held");
    results.write(args.json.as_deref())?;
    Ok(())
}
