//! `syn-verdicts`: a SYN flood (`hping3 --flood -S`) from one lab namespace
//! at another, first through a minimal accept-all `nfq` loop, then through
//! the agent's `QueueSet` with a decoding, hash-map-looking-up decider.
//! Prints verdicts per second of each, what the kernel queued, and what it
//! dropped (queue full, socket buffer full), and the ratio agent/baseline
//! (design target: ≥ 200k verdicts/s per core).
//!
//! ```text
//! cargo run --release -p cnnf-loadtest-nfqueue --bin syn-verdicts -- --seconds 5
//! ```
//!
//! Needs `hping3` (Debian package). The flood generator runs on the same
//! cores as the verdict threads, so the figures are a floor.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_agent::dataplane::{ChainConfig, Chains, Hook, QueueConfig, QueueOptions, QueueSet};
use cnnf_loadtest_nfqueue::{accept_and_close, kernel_counters, start_baseline, LookupDecider};
use cnnf_testkit::Lab;

#[derive(Debug, Parser)]
#[command(about = "SYN verdicts per second through the agent's NFQUEUE threads vs. a minimal loop")]
struct Args {
    /// Seconds of flood per phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Queues per phase (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// First queue number; the run uses 2 × queues numbers from here.
    #[arg(long, default_value_t = 4100)]
    first_queue: u16,
    /// Entries in the decider's hash map.
    #[arg(long, default_value_t = 100_000)]
    table: usize,
    /// Most packets per verdict batch of the agent.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

struct Outcome {
    verdicts: u64,
    queued: u64,
    queue_full: u64,
    socket_full: u64,
    seconds: f64,
}

fn flood(
    lab: &Lab,
    port: u16,
    seconds: u64,
    queues: &RangeInclusive<u16>,
    verdicts: impl Fn() -> u64,
) -> anyhow::Result<Outcome> {
    let server = lab.container(1);
    let (queued0, full0, socket0) = kernel_counters(queues);
    let verdicts0 = verdicts();
    let start = Instant::now();
    let output = lab.container(0).exec(
        "timeout",
        &[
            &seconds.to_string(),
            "hping3",
            "--flood",
            "-q",
            "-S",
            "-p",
            &port.to_string(),
            &server.ip().to_string(),
        ],
    )?;
    let elapsed = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(
        !stderr.contains("not found") && !stderr.contains("No such file"),
        "hping3 is missing (Debian package hping3): {stderr}"
    );
    let verdicts = verdicts() - verdicts0;
    let (queued1, full1, socket1) = kernel_counters(queues);
    // Let the queue drain before the next phase.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Outcome {
        verdicts,
        queued: queued1 - queued0,
        queue_full: full1 - full0,
        socket_full: socket1 - socket0,
        seconds: elapsed,
    })
}

fn print(name: &str, o: &Outcome) {
    println!(
        "  {name:<28} {:>9.0} verdicts/s  queued {:>9.0}/s  kernel drops: queue full {:>8.0}/s, socket buffer full {:>8.0}/s",
        o.verdicts as f64 / o.seconds,
        o.queued as f64 / o.seconds,
        o.queue_full as f64 / o.seconds,
        o.socket_full as f64 / o.seconds
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.queues >= 1 && args.seconds >= 1,
        "--queues and --seconds must be at least 1"
    );
    let lab = Lab::new(2)?;
    let server = lab.container(1);
    let port = accept_and_close(server)?;
    let workload: BTreeSet<IpAddr> = [IpAddr::V4(server.ip())].into();
    let baseline_queues = args.first_queue..=args.first_queue + args.queues - 1;
    let agent_queues = args.first_queue + args.queues..=args.first_queue + 2 * args.queues - 1;
    let queue_config = QueueConfig {
        queues: agent_queues.clone(),
        ..QueueConfig::default()
    };
    let chain = |prefix: &str, queues| ChainConfig {
        prefix: prefix.into(),
        queues,
        fail_open: false,
        hooks: vec![Hook::Forward],
    };

    let mut chains = Chains::install(chain("CNNFBENCH-SB", baseline_queues.clone()))?;
    let baseline = start_baseline(baseline_queues.clone(), queue_config.copy_range, queue_config.max_len)?;
    chains.set_addresses(&workload)?;
    let b = flood(&lab, port, args.seconds, &baseline_queues, || {
        baseline.load(Ordering::Relaxed)
    })?;
    chains.remove()?;

    let mut chains = Chains::install(chain("CNNFBENCH-SC", agent_queues.clone()))?;
    let decider = Arc::new(LookupDecider::new(args.table, &[]));
    let options = QueueOptions {
        batch: args.batch,
        ..QueueOptions::default()
    };
    let queue_set = QueueSet::start_with(queue_config, options, decider.clone())?;
    chains.set_addresses(&workload)?;
    let c = flood(&lab, port, args.seconds, &agent_queues, || {
        decider.decided.load(Ordering::Relaxed)
    })?;
    chains.remove()?;
    let stats = queue_set.stats().total();
    queue_set.stop();

    println!(
        "SYN flood, {} s per phase, {} queue(s), table of {} entries",
        args.seconds, args.queues, args.table
    );
    print("b: accept-all nfq loop", &b);
    print("c: agent QueueSet + lookup", &c);
    println!(
        "  c/b verdicts/s: {:.2}x; agent mean batch {:.1}, receive errors {}",
        (c.verdicts as f64 / c.seconds) / (b.verdicts as f64 / b.seconds).max(1e-9),
        stats.packets as f64 / stats.batches.max(1) as f64,
        stats.receive_errors
    );
    Ok(())
}
