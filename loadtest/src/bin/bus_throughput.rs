//! `bus-throughput`: publish and projection throughput of the CNNF bus,
//! each beside a raw baseline measured in the same run.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin bus-throughput -- --events 200000
//! ```
//!
//! - publish: `Publisher` (dedup ids, bounded in-flight acks, resend) vs.
//!   plain JetStream async publishes with the same window and no ids;
//! - consume: plain pull consumption with one ack per batch, no store;
//! - project: `ProjectionRunner` from the stream into RocksDB vs. the same
//!   fold written straight to RocksDB in write batches of the same size.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use clap::Parser;
use cnnf_bus::runner::ApplyError;
use cnnf_bus::{Event, OutgoingMessage, Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig};
use cnnf_loadtest::results::{Figure, Results};
use cnnf_proto::v1::{envelope::Payload, Envelope};
use cnnf_store::{applied_sequence, ProjectionStore, Txn};
use cnnf_store_rocksdb::RocksStore;
use futures::StreamExt;
use prost::Message as _;

#[derive(Debug, Parser)]
#[command(about = "CNNF bus throughput against raw baselines")]
struct Args {
    /// Events per measurement.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Messages in flight (publish) and per store write (projection).
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const EDGES: &str = "edges";

/// Key of the edge a decision counts towards.
fn edge_key(envelope: &Envelope) -> Option<Vec<u8>> {
    let Some(Payload::Decisions(batch)) = &envelope.payload else {
        return None;
    };
    let decision = batch.decisions.first()?;
    let id = |endpoint: &Option<cnnf_proto::v1::Endpoint>| {
        endpoint
            .as_ref()
            .and_then(|e| e.identity.as_ref())
            .map(|i| i.id.clone())
            .unwrap_or_default()
    };
    let port = decision.destination.as_ref().map(|d| d.port).unwrap_or(0);
    Some(format!("{}/{}/{port}", id(&decision.source), id(&decision.destination)).into_bytes())
}

/// Counts decisions per (source image, destination image, port).
struct EdgeCounts;

impl Projection for EdgeCounts {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        if let Some(key) = edge_key(&event.envelope) {
            txn.add_u64(EDGES, &key, 1)?;
        }
        Ok(())
    }
}

async fn make_stream(js: &jetstream::Context, name: &str, subject: &str) -> anyhow::Result<()> {
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![subject.into()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Plain async publishes with a window of pending acks; with `ids`, each
/// carries a `Nats-Msg-Id` (so the server's dedup cost is in the baseline).
async fn raw_publish(
    js: &jetstream::Context,
    payloads: &[Bytes],
    window: usize,
    ids: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for (i, payload) in payloads.iter().enumerate() {
        if pending.len() >= window {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("non-empty");
            ack.await?;
        }
        let subject = format!("bench.raw.{}", i % 8);
        let ack = if ids {
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("raw:{i}"));
            js.send_publish(subject, publish).await?
        } else {
            js.publish(subject, payload.clone()).await?
        };
        pending.push_back(ack);
    }
    for ack in pending {
        ack.await?;
    }
    Ok(started.elapsed())
}

async fn cnnf_publish(js: &jetstream::Context, payloads: &[Bytes], window: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut publisher = Publisher::new(
        js.clone(),
        PublisherConfig {
            max_in_flight: window,
            ..Default::default()
        },
    );
    for (i, payload) in payloads.iter().enumerate() {
        publisher
            .publish(OutgoingMessage::new(
                format!("bench.cnnf.{}", i % 8),
                format!("bench:{i}"),
                payload.clone(),
            ))
            .await?;
    }
    publisher.flush().await?;
    Ok(started.elapsed())
}

async fn raw_consume(js: &jetstream::Context, events: u64, batch: usize) -> anyhow::Result<Duration> {
    let stream = js.get_stream("BENCH_CNNF").await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("raw-consume".into()),
            ack_policy: jetstream::consumer::AckPolicy::All,
            max_ack_pending: (batch * 4) as i64,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(batch).messages().await?;
    let mut seen = 0u64;
    while seen < events {
        let message = messages.next().await.context("stream ended")??;
        seen += 1;
        if seen.is_multiple_of(batch as u64) || seen == events {
            message.ack().await.map_err(|error| anyhow::anyhow!(error))?;
        }
    }
    Ok(started.elapsed())
}

fn raw_rocksdb(payloads: &[Bytes], batch: usize) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let db = rocksdb::DB::open_cf(&options, dir.path(), [EDGES])?;
    let cf = db.cf_handle(EDGES).context("column family")?;
    let started = Instant::now();
    for chunk in payloads.chunks(batch) {
        let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
        for payload in chunk {
            let envelope = Envelope::decode(payload.as_ref())?;
            if let Some(key) = edge_key(&envelope) {
                let count = match counts.get(&key) {
                    Some(count) => *count,
                    None => db
                        .get_cf(cf, &key)?
                        .and_then(|bytes| cnnf_store::decode_u64(&bytes))
                        .unwrap_or(0),
                };
                counts.insert(key, count + 1);
            }
        }
        let mut write = rocksdb::WriteBatch::default();
        for (key, count) in counts {
            write.put_cf(cf, key, count.to_be_bytes());
        }
        db.write(write)?;
    }
    Ok(started.elapsed())
}

async fn cnnf_projection(js: &jetstream::Context, events: u64, batch: usize) -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn ProjectionStore> = Arc::new(RocksStore::open(dir.path(), &[EDGES])?);
    let mut config = RunnerConfig::new("BENCH_CNNF", "bench-projection");
    config.batch_size = batch;
    let runner = ProjectionRunner::new(js.clone(), Arc::clone(&store), EdgeCounts, config);
    let started = Instant::now();
    let watched = Arc::clone(&store);
    runner
        .run(async move {
            while applied_sequence(watched.as_ref(), "bench-projection").unwrap_or(0) < events {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await?;
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (_server, js, url) = cnnf_loadtest::nats(args.nats_url.as_deref()).await?;
    make_stream(&js, "BENCH_RAW", "bench.raw.*").await?;
    make_stream(&js, "BENCH_CNNF", "bench.cnnf.*").await?;

    let payloads: Vec<Bytes> = (0..args.events)
        .map(|i| {
            Bytes::from(cnnf_core::envelope::encode(cnnf_loadtest::decision_event(
                i,
                "bench-node",
            )))
        })
        .collect();
    let size = payloads.iter().map(Bytes::len).sum::<usize>() / payloads.len().max(1);
    println!(
        "{} events of {size} bytes, window/batch {}, nats-server at {url}",
        args.events, args.batch
    );

    let raw = raw_publish(&js, &payloads, args.batch, false).await?;
    make_stream(&js, "BENCH_RAW", "bench.raw.*").await?;
    let raw_ids = raw_publish(&js, &payloads, args.batch, true).await?;
    let cnnf = cnnf_publish(&js, &payloads, args.batch).await?;
    cnnf_loadtest::report(
        "publish (Publisher, dedup ids)",
        cnnf_loadtest::rate(args.events, cnnf),
        "plain JetStream publish",
        cnnf_loadtest::rate(args.events, raw),
    );
    cnnf_loadtest::report(
        "publish (Publisher, dedup ids)",
        cnnf_loadtest::rate(args.events, cnnf),
        "plain publish with Nats-Msg-Id",
        cnnf_loadtest::rate(args.events, raw_ids),
    );

    let rocks = tokio::task::block_in_place(|| raw_rocksdb(&payloads, args.batch))?;
    let consume = raw_consume(&js, args.events, args.batch).await?;
    let projection = cnnf_projection(&js, args.events, args.batch).await?;
    cnnf_loadtest::report(
        "projection (runner -> RocksDB)",
        cnnf_loadtest::rate(args.events, projection),
        "plain RocksDB write batches",
        cnnf_loadtest::rate(args.events, rocks),
    );
    cnnf_loadtest::report(
        "projection (runner -> RocksDB)",
        cnnf_loadtest::rate(args.events, projection),
        "plain JetStream pull + ack",
        cnnf_loadtest::rate(args.events, consume),
    );

    let mut results = Results::new("bus-throughput");
    let publish_rate = cnnf_loadtest::rate(args.events, cnnf);
    let projection_rate = cnnf_loadtest::rate(args.events, projection);
    results.push(
        Figure::higher("publish (Publisher, dedup ids)", publish_rate, "events/s")
            .baseline("plain JetStream publish", cnnf_loadtest::rate(args.events, raw)),
    );
    results.push(
        Figure::higher("publish (Publisher, dedup ids)", publish_rate, "events/s").baseline(
            "plain publish with Nats-Msg-Id",
            cnnf_loadtest::rate(args.events, raw_ids),
        ),
    );
    results.push(
        Figure::higher("projection (runner -> RocksDB)", projection_rate, "events/s")
            .baseline("plain RocksDB write batches", cnnf_loadtest::rate(args.events, rocks))
            .target("≥ 100k events/s"),
    );
    results.push(
        Figure::higher("projection (runner -> RocksDB)", projection_rate, "events/s")
            .baseline("plain JetStream pull + ack", cnnf_loadtest::rate(args.events, consume)),
    );
    results.write(args.json.as_deref())?;
    Ok(())
}
