//! `cnnf`: the operator CLI.
//!
//! Talks to NATS directly (and, as the services grow gRPC APIs, to them).
//! Must never depend on RocksDB or on a service crate: operators install it
//! on laptops.
//!
//! - `cnnf status`: streams, buckets and consumers, with their counts.
//! - `cnnf dlq`: the messages consumers quarantined, with the reasons.
//! - `cnnf demo`: publishes a small demo fleet (workloads and decisions).

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use cnnf_bus::runner::{DLQ_DETAIL, DLQ_REASON, DLQ_SOURCE, DLQ_SUBJECT};
use cnnf_bus::topology;
use futures::StreamExt;

mod demo;

#[derive(Debug, Parser)]
#[command(name = "cnnf", version, about = "CNNF operator CLI")]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CNNF_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Streams, KV buckets and consumers, with their counts.
    Status,
    /// Messages consumers quarantined, newest last.
    Dlq {
        /// Show at most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Publishes a demo fleet: workloads starting on two nodes and the
    /// connections they make.
    Demo {
        /// Cluster the demo nodes belong to.
        #[arg(long, default_value = "local")]
        cluster: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cnnf: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cnnf: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name("cnnf-cli")
        .connection_timeout(Duration::from_secs(5))
        .connect(&cli.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", cli.nats_url))?;
    let js = cnnf_bus::jetstream(client);
    match cli.command {
        Command::Status => status(&js).await,
        Command::Dlq { limit } => dead_letters(&js, limit).await,
        Command::Demo { cluster } => demo::publish(js, &cluster).await,
    }
}

async fn status(js: &jetstream::Context) -> anyhow::Result<()> {
    println!(
        "{:<22} {:>10} {:>12} {:>10}",
        "STREAM", "MESSAGES", "BYTES", "CONSUMERS"
    );
    let config = topology::TopologyConfig::default();
    let names = topology::streams(&config).into_iter().map(|stream| stream.name).chain(
        topology::buckets(&config)
            .into_iter()
            .map(|bucket| format!("KV_{}", bucket.config.bucket)),
    );
    for name in names {
        match js.get_stream(&name).await {
            Ok(mut stream) => {
                let info = stream.info().await?;
                println!(
                    "{:<22} {:>10} {:>12} {:>10}",
                    name, info.state.messages, info.state.bytes, info.state.consumer_count
                );
            }
            Err(_) => println!("{name:<22} {:>10}", "missing"),
        }
    }
    println!();
    println!(
        "{:<22} {:<18} {:>12} {:>12}",
        "CONSUMER", "STREAM", "PENDING", "APPLIED SEQ"
    );
    for spec in topology::CONSUMERS {
        let Ok(stream) = js.get_stream(spec.stream).await else {
            continue;
        };
        match stream
            .get_consumer::<jetstream::consumer::pull::Config>(spec.durable)
            .await
        {
            Ok(mut consumer) => {
                let info = consumer.info().await?;
                println!(
                    "{:<22} {:<18} {:>12} {:>12}",
                    spec.durable, spec.stream, info.num_pending, info.ack_floor.stream_sequence
                );
            }
            Err(_) => println!("{:<22} {:<18} {:>12}", spec.durable, spec.stream, "not started"),
        }
    }
    Ok(())
}

async fn dead_letters(js: &jetstream::Context, limit: usize) -> anyhow::Result<()> {
    let mut stream = js
        .get_stream(topology::DEAD_LETTER)
        .await
        .context("the dead-letter stream does not exist yet: start a service first")?;
    let last = stream.info().await?.state.last_sequence;
    let first = last.saturating_sub(limit as u64 - 1).max(1);
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: first },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut shown = 0;
    while shown < limit {
        let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(1), messages.next()).await else {
            break;
        };
        let message = message?;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .map(|value| value.to_string())
                .unwrap_or_default()
        };
        println!(
            "{} from {} ({}): {} - {} [{} bytes]",
            message.subject,
            header(DLQ_SOURCE),
            header(DLQ_SUBJECT),
            header(DLQ_REASON),
            header(DLQ_DETAIL),
            message.payload.len()
        );
        shown += 1;
    }
    if shown == 0 {
        println!("no dead letters");
    }
    Ok(())
}
