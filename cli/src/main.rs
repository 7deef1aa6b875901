//! `cnnf`: the operator CLI.
//!
//! Talks to NATS directly (and, as the services grow gRPC APIs, to them).
//! Must never depend on RocksDB or on a service crate: operators install it
//! on laptops.
//!
//! - `cnnf status`: streams, buckets and consumers, with their counts.
//! - `cnnf dlq`: the messages consumers quarantined, with the reasons.
//! - `cnnf demo`: publishes a small demo fleet (workloads and decisions).
//! - `cnnf auth init`: the operator, accounts, services and system
//!   credentials and the nats-server include file of an installation.
//! - `cnnf nodes enroll|list|revoke`: one creds file per node agent,
//!   allowing exactly that node's subjects and keys; a revocation is pushed
//!   to the running server, which closes the node's connection.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use cnnf_bus::runner::{DLQ_DETAIL, DLQ_REASON, DLQ_SOURCE, DLQ_SUBJECT};
use cnnf_bus::topology;
use futures::StreamExt;

mod demo;
mod nodes;

/// Exit status for bad usage (EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "cnnf", version, about = "CNNF operator CLI")]
struct Cli {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "CNNF_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// NATS credentials (a `.creds` file, e.g. the auth directory's
    /// `services.creds`).
    #[arg(long, global = true, env = "CNNF_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// PEM file of the CAs that sign the NATS server's certificate (TLS is
    /// then required).
    #[arg(long, global = true, env = "CNNF_NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients.
    #[arg(long, global = true, env = "CNNF_NATS_CERT", requires = "nats_key")]
    nats_cert: Option<PathBuf>,
    /// PEM private key of `--nats-cert`.
    #[arg(long, global = true, env = "CNNF_NATS_KEY", requires = "nats_cert")]
    nats_key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// The connection settings the flags give, checked (missing files are
    /// bad usage).
    fn nats_options(&self) -> anyhow::Result<cnnf_bus::NatsOptions> {
        check_files(&[
            ("--nats-creds", &self.nats_creds),
            ("--nats-ca", &self.nats_ca),
            ("--nats-cert", &self.nats_cert),
            ("--nats-key", &self.nats_key),
        ])?;
        Ok(cnnf_bus::NatsOptions {
            credentials: self.nats_creds.clone(),
            ca: self.nats_ca.clone(),
            cert: self.nats_cert.clone(),
            key: self.nats_key.clone(),
            inbox_prefix: None,
        })
    }
}

/// Checks that each given file can be read; a failure is bad usage.
fn check_files(files: &[(&str, &Option<PathBuf>)]) -> anyhow::Result<()> {
    for (flag, path) in files {
        if let Some(path) = path {
            if let Err(error) = std::fs::File::open(path) {
                return Err(Usage(format!("{flag} {}: cannot be read: {error}", path.display())).into());
            }
        }
    }
    Ok(())
}

/// An error in how the command was called: exit status 64.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

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
    /// The credentials of this installation.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Node agents' credentials: enroll, list, revoke.
    Nodes {
        #[command(subcommand)]
        command: nodes::NodesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Creates the operator, the system and CNNF accounts, the services'
    /// and the system user's creds files and the nats-server include file
    /// in a directory; leaves a directory already initialised unchanged.
    Init {
        /// The auth directory (created if missing; keep it private).
        #[arg(long)]
        dir: PathBuf,
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
            if error.downcast_ref::<Usage>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = cli.nats_options()?;
    match cli.command {
        Command::Status => status(&jetstream_of(&cli.nats_url, &options).await?).await,
        Command::Dlq { limit } => dead_letters(&jetstream_of(&cli.nats_url, &options).await?, limit).await,
        Command::Demo { cluster } => demo::publish(jetstream_of(&cli.nats_url, &options).await?, &cluster).await,
        Command::Auth {
            command: AuthCommand::Init { dir },
        } => nodes::init(&dir),
        Command::Nodes { command } => nodes::run(command, &cli.nats_url, &options).await,
    }
}

/// Connects once (no retries: a tool should say at once that the server
/// is not there).
async fn jetstream_of(url: &str, options: &cnnf_bus::NatsOptions) -> anyhow::Result<jetstream::Context> {
    let client = cnnf_bus::connect_options("cnnf-cli", options)
        .await?
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    Ok(cnnf_bus::jetstream(client))
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
