//! `audit-index`: audits per second through the audit service's fold and
//! index into RocksDB, beside plain RocksDB puts of the same audits measured
//! in the same run, then query latency with that many audits stored.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest --bin audit-index -- --audits 10000000
//! ```
//!
//! 1. index: `--audits` distinct audited decisions (alert or prevent, 100
//!    nodes, 1000 images, 100 rules, spread over `--span-hours` of decision
//!    time), `--per-message` per decision message, folded by
//!    `cnnf_audit::FlowsProjection` (dedup lookup, port-scan state, audit
//!    record, seven index entries, outbox) in store writes of
//!    `--batch` messages, as the projection runner commits them. After each
//!    write the outbox is emptied as the service's drainer does (timed on
//!    its own), so the store holds what a running service keeps. NATS is
//!    not involved: this measures the fold and the index alone. The size of
//!    the store on disk is printed at the end of the phase.
//! 2. baseline: the same number of encoded audits written with plain
//!    RocksDB puts (one key each, same batch size), into a fresh database.
//! 3. query: `--queries` `ListAudits` pages (100 audits) per filter (none,
//!    node, verdict, rule, image) over a random 5-minute range, with the
//!    store holding every audit; p50 and p99 latency, beside a page of 100
//!    audits read straight from the baseline database (an iterator from a
//!    random key, each record decoded).
//!
//! The baseline database gets the projection store's table options (LZ4
//! compression, bloom filters, the block cache), so the ratio is the cost
//! of the fold and the index, not of different RocksDB settings.

use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_audit::index::{self, Query};
use cnnf_audit::{AuditSettings, FlowsProjection};
use cnnf_bus::{Event, Projection};
use cnnf_proto::v1::{
    decided_by, envelope::Payload, Audit, AuditFilter, ConnectionDecision, DecidedBy, DecisionBatch, Direction,
    Endpoint, Envelope, Identity, IdentityKind, Mode, Protocol, Verdict,
};
use cnnf_store::{ProjectionStore, Txn};
use cnnf_store_rocksdb::RocksStore;
use prost::Message as _;

#[derive(Debug, Parser)]
#[command(about = "CNNF audit index: audits/s into RocksDB against plain puts, and query latency")]
struct Args {
    /// Audits to index.
    #[arg(long, default_value_t = 10_000_000)]
    audits: u64,
    /// Decisions per decision message.
    #[arg(long, default_value_t = 10)]
    per_message: u64,
    /// Messages per store write (the runner's batch).
    #[arg(long, default_value_t = 1000)]
    batch: u64,
    /// Hours of decision time the audits spread over.
    #[arg(long, default_value_t = 24)]
    span_hours: u64,
    /// Queries per filter.
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Directory for the two databases (default: a temporary directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Also write the figures to this file as JSON.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const S: i64 = 1_000_000_000;
const BASE: i64 = 1_800_000_000 * S;
const NODES: u64 = 100;
const IMAGES: u64 = 1000;
const RULES: u64 = 100;

fn image(n: u64) -> Identity {
    Identity {
        kind: IdentityKind::Image as i32,
        id: format!("sha256:{:064x}", n % IMAGES),
        name: format!("registry.example/app-{}:1", n % IMAGES),
        container_id: format!("{n:064x}"),
        ..Default::default()
    }
}

fn time_of(i: u64, args: &Args) -> i64 {
    let span = i64::try_from(args.span_hours).unwrap_or(24) * 3600 * S;
    BASE + i64::try_from(u128::from(i) * span as u128 / u128::from(args.audits.max(1))).unwrap_or(0)
}

/// Decision `i`: a distinct source address and port, so every decision is
/// a new audit and no source looks like a scanner.
fn decision(i: u64, args: &Args) -> ConnectionDecision {
    let time = time_of(i, args);
    ConnectionDecision {
        source: Some(Endpoint {
            address: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
            port: 40_000,
            identity: Some(image(i)),
        }),
        destination: Some(Endpoint {
            address: format!("10.200.{}.{}", (i >> 8) & 255, i & 255),
            port: 1 + u32::try_from(i % 60_000).unwrap_or(0),
            identity: Some(image(i * 7 + 3)),
        }),
        protocol: Protocol::Tcp as i32,
        direction: Direction::Egress as i32,
        verdict: if i.is_multiple_of(3) {
            Verdict::Prevent
        } else {
            Verdict::Alert
        } as i32,
        decided_by: Some(DecidedBy {
            kind: decided_by::Kind::Rule as i32,
            rule_id: format!("rule-{}", i % RULES),
            model_image_id: String::new(),
        }),
        verdict_table_version: 1,
        mode: Mode::Alert as i32,
        first_seen_unix_nanos: time,
        last_seen_unix_nanos: time,
        count: 1,
    }
}

/// Makes a query's filter from a random number.
type FilterOf = Box<dyn Fn(u64) -> AuditFilter>;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| scratch.path().to_owned());
    let messages = args.audits.div_ceil(args.per_message);

    // 1. The fold and the index.
    let store = RocksStore::open(&dir.join("audit"), cnnf_audit::store::TABLES)?;
    let store: &dyn ProjectionStore = &store;
    let mut projection = FlowsProjection::open(store, AuditSettings::default())?;
    let started = Instant::now();
    let mut drained = Duration::ZERO;
    let mut message = 0u64;
    while message < messages {
        let mut txn = Txn::new(store);
        let end = (message + args.batch).min(messages);
        for m in message..end {
            let node = format!("node-{:04}", m % NODES);
            let first = m * args.per_message;
            let last = (first + args.per_message).min(args.audits);
            let envelope = Envelope {
                schema_version: cnnf_proto::SCHEMA_VERSION,
                event_id: format!("{node}:bench:{m}"),
                cluster: "bench".into(),
                node: node.clone(),
                time_unix_nanos: time_of(first, &args),
                payload: Some(Payload::Decisions(DecisionBatch {
                    decisions: (first..last).map(|i| decision(i, &args)).collect(),
                    overflow_count: 0,
                })),
                ..Default::default()
            };
            let subject = format!("cnnf.flow.bench.{node}");
            let event = Event {
                subject: &subject,
                stream_sequence: m + 1,
                received_unix_nanos: 0,
                envelope,
            };
            projection
                .apply(&event, &mut txn)
                .map_err(|error| anyhow::anyhow!("{error}"))?;
        }
        store.write(txn.into_batch())?;
        let drain_started = Instant::now();
        let mut done = cnnf_store::WriteBatch::new();
        for (key, _) in store.scan_prefix(cnnf_audit::store::OUTBOX, b"", usize::MAX)? {
            done.delete(cnnf_audit::store::OUTBOX, key);
        }
        store.write(done)?;
        drained += drain_started.elapsed();
        message = end;
        if message.is_multiple_of(args.batch * 100) {
            eprintln!(
                "indexed {} audits, {:.0}/s",
                (message * args.per_message).min(args.audits),
                (message * args.per_message) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let indexed = started.elapsed().saturating_sub(drained);
    let index_rate = args.audits as f64 / indexed.as_secs_f64();
    let store_bytes = disk_bytes(&dir.join("audit"));

    // 2. Plain RocksDB puts of the same audits.
    let plain = {
        let cache = rocksdb::Cache::new_lru_cache(cnnf_store_rocksdb::BLOCK_CACHE_BYTES);
        let mut options = cnnf_store_rocksdb::table_options(&cache);
        options.create_if_missing(true);
        options.increase_parallelism(2);
        rocksdb::DB::open(&options, dir.join("plain"))?
    };
    let started = Instant::now();
    let per_write = args.batch * args.per_message;
    let mut i = 0u64;
    while i < args.audits {
        let mut batch = rocksdb::WriteBatch::default();
        for j in i..(i + per_write).min(args.audits) {
            let d = decision(j, &args);
            let audit = Audit {
                audit_id: format!("audit:CNNF_FLOWS:{}:{}", j / args.per_message + 1, j % args.per_message),
                first_seen_unix_nanos: d.first_seen_unix_nanos,
                last_seen_unix_nanos: d.last_seen_unix_nanos,
                count: 1,
                cluster: "bench".into(),
                node: format!("node-{:04}", (j / args.per_message) % NODES),
                source: d.source,
                destination: d.destination,
                protocol: d.protocol,
                verdict: d.verdict,
                decided_by: format!("rule:rule-{}", j % RULES),
                verdict_table_version: 1,
            };
            batch.put(j.to_be_bytes(), audit.encode_to_vec());
        }
        plain.write(batch)?;
        i += per_write;
    }
    let plain_elapsed = started.elapsed();
    let plain_rate = args.audits as f64 / plain_elapsed.as_secs_f64();

    println!("audits indexed: {}", args.audits);
    println!(
        "index (fold + 7 index entries + outbox): {:.1} s, {index_rate:.0} audits/s",
        indexed.as_secs_f64()
    );
    println!(
        "baseline (plain RocksDB put, 1 key per audit): {:.1} s, {plain_rate:.0} audits/s",
        plain_elapsed.as_secs_f64()
    );
    println!("ratio index/baseline: {:.2}", index_rate / plain_rate);
    println!(
        "outbox drain (scan + delete after each write, not in the rate): {:.1} s",
        drained.as_secs_f64()
    );
    println!(
        "store on disk after indexing: {:.2} GiB ({:.0} bytes per audit)",
        store_bytes as f64 / f64::from(1u32 << 30),
        store_bytes as f64 / args.audits.max(1) as f64
    );
    let mut results = cnnf_loadtest::results::Results::new("audit-index");
    results.push(
        cnnf_loadtest::results::Figure::higher("audits indexed (fold + index + outbox)", index_rate, "audits/s")
            .baseline("plain RocksDB put, 1 key per audit", plain_rate)
            .target("≥ 100k events/s"),
    );

    // 3. Queries with every audit stored.
    let span = i64::try_from(args.span_hours).unwrap_or(24) * 3600 * S;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let filters: Vec<(&str, FilterOf)> = vec![
        ("none", Box::new(|_| AuditFilter::default())),
        (
            "node",
            Box::new(|r| AuditFilter {
                node: format!("node-{:04}", r % NODES),
                ..Default::default()
            }),
        ),
        (
            "verdict",
            Box::new(|_| AuditFilter {
                verdict: Verdict::Prevent as i32,
                ..Default::default()
            }),
        ),
        (
            "rule",
            Box::new(|r| AuditFilter {
                decided_by: format!("rule:rule-{}", r % RULES),
                ..Default::default()
            }),
        ),
        (
            "image",
            Box::new(|r| AuditFilter {
                image_id: format!("sha256:{:064x}", r % IMAGES),
                ..Default::default()
            }),
        ),
    ];
    println!(
        "query: ListAudits page of 100 over a random 5-minute range, {} queries per filter",
        args.queries
    );
    // Baseline: a page of 100 stored audits read straight from the plain
    // database (an iterator from a random key, each record decoded), the
    // least a page of audits costs in RocksDB.
    let mut baseline = Vec::with_capacity(args.queries);
    for _ in 0..args.queries {
        let from = (random() % args.audits.max(1)).to_be_bytes();
        let started = Instant::now();
        let mut page = Vec::with_capacity(100);
        for item in plain.iterator(rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward)) {
            let (_, value) = item?;
            page.push(Audit::decode(value.as_ref())?);
            if page.len() == 100 {
                break;
            }
        }
        baseline.push(started.elapsed());
        std::hint::black_box(page);
    }
    baseline.sort();
    let (base_p50, base_p99) = (
        percentile(&baseline, 0.5).as_secs_f64() * 1e3,
        percentile(&baseline, 0.99).as_secs_f64() * 1e3,
    );
    println!("  baseline: plain RocksDB page of 100   p50 {base_p50:>9.3} ms  p99 {base_p99:>9.3} ms");
    for (name, filter) in &filters {
        let mut latencies = Vec::with_capacity(args.queries);
        let mut returned = 0usize;
        for _ in 0..args.queries {
            let r = random();
            let from = BASE + i64::try_from(r % u64::try_from(span - 300 * S).unwrap_or(1)).unwrap_or(0);
            let query = Query {
                from,
                to: Some(from + 300 * S),
                filter: filter(r >> 8),
                page_size: 100,
                page_token: String::new(),
            };
            let started = Instant::now();
            let page = index::list(store, &query)?;
            latencies.push(started.elapsed());
            returned += page.audits.len();
        }
        latencies.sort();
        for (p, at, base) in [("p50", 0.5, base_p50), ("p99", 0.99, base_p99)] {
            results.push(
                cnnf_loadtest::results::Figure::lower(
                    format!(
                        "ListAudits page of 100, filter {name}, {p}, {} audits stored",
                        args.audits
                    ),
                    percentile(&latencies, at).as_secs_f64() * 1e3,
                    "ms",
                )
                .baseline(format!("plain RocksDB page of 100 (iterate + decode), {p}"), base),
            );
        }
        println!(
            "  filter {name:<8} p50 {:>9.3} ms  p99 {:>9.3} ms  (mean {:.1} audits per page)",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            returned as f64 / args.queries as f64
        );
    }
    results.write(args.json.as_deref())?;
    Ok(())
}
