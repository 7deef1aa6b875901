//! `syn-verdicts`: a SYN flood (`hping3 --flood -S`) from one lab namespace
//! at another, first through a minimal accept-all `nfq` loop, then through
//! the agent's `QueueSet` deciding with the agent's own `Engine`
//! (identities, compiled verdict table in prevent mode, decision ring,
//! publisher into a spool; see `AgentEngine`). The table allows the flood,
//! so both phases accept every SYN and only the cost differs.
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
use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_agent::dataplane::{ChainConfig, Chains, Hook, QueueConfig, QueueOptions, QueueSet};
use cnnf_loadtest_nfqueue::{
    accept_and_close, kernel_counters, load_average, start_baseline, thread_cpu, AgentEngine, FleetShape,
};
use cnnf_testkit::Lab;

#[derive(Debug, Parser)]
#[command(about = "SYN verdicts per second through the agent's NFQUEUE threads vs. a minimal loop")]
struct Args {
    /// Seconds of flood per phase and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds; each floods the baseline, then the agent.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Queues per phase (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// First queue number; the run uses 2 × queues numbers from here.
    #[arg(long, default_value_t = 4100)]
    first_queue: u16,
    /// The fleet the engine is loaded with.
    #[command(flatten)]
    fleet: FleetShape,
    /// Flood a port nothing listens on (the server's kernel answers each
    /// SYN with a reset) instead of a listening one (SYN-ACK, then the
    /// flooder's reset): less kernel work per SYN after the verdict.
    #[arg(long)]
    closed_port: bool,
    /// Most packets per verdict batch of the agent.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

/// Calls of the engine alone per slice, and slices.
const ENGINE_SLICE: u32 = 20_000;
const ENGINE_SLICES: u32 = 20;

#[derive(Default)]
struct Outcome {
    verdicts: u64,
    queued: u64,
    queue_full: u64,
    socket_full: u64,
    seconds: f64,
    /// CPU seconds of the verdict threads.
    cpu: f64,
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.verdicts += other.verdicts;
        self.queued += other.queued;
        self.queue_full += other.queue_full;
        self.socket_full += other.socket_full;
        self.seconds += other.seconds;
        self.cpu += other.cpu;
    }
}

fn flood(
    lab: &Lab,
    port: u16,
    seconds: u64,
    queues: &RangeInclusive<u16>,
    verdicts: impl Fn() -> u64,
    threads: &str,
) -> anyhow::Result<Outcome> {
    let server = lab.container(1);
    let (queued0, full0, socket0) = kernel_counters(queues);
    let verdicts0 = verdicts();
    let cpu0 = thread_cpu(threads);
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
    let cpu = thread_cpu(threads) - cpu0;
    let (queued1, full1, socket1) = kernel_counters(queues);
    // Let the queue drain before the next phase.
    std::thread::sleep(Duration::from_millis(500));
    Ok(Outcome {
        verdicts,
        queued: queued1 - queued0,
        queue_full: full1 - full0,
        socket_full: socket1 - socket0,
        seconds: elapsed,
        cpu: cpu.as_secs_f64(),
    })
}

fn print(name: &str, o: &Outcome) {
    println!(
        "  {name:<28} {:>7.0} verdicts/s  {:>7.0} per CPU-second ({:.0}% busy, {:.1} µs/verdict)  queued {:>7.0}/s  kernel drops: queue full {:>6.0}/s, socket buffer full {:>6.0}/s",
        o.verdicts as f64 / o.seconds,
        o.verdicts as f64 / o.cpu.max(1e-9),
        100.0 * o.cpu / o.seconds,
        o.cpu * 1e6 / o.verdicts.max(1) as f64,
        o.queued as f64 / o.seconds,
        o.queue_full as f64 / o.seconds,
        o.socket_full as f64 / o.seconds
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.queues >= 1 && args.seconds >= 1 && args.rounds >= 1,
        "--queues, --seconds and --rounds must be at least 1"
    );
    let lab = Lab::new(2)?;
    let load_before = load_average();
    let server = lab.container(1);
    let port = if args.closed_port {
        // Bound and closed again: free, and nothing listens on it.
        let ip = server.ip();
        server
            .run_in(move || std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()))??
            .port()
    } else {
        accept_and_close(server)?
    };
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
        // Measures NFQUEUE itself: no per-source SYN limit in the way.
        syn_rate_per_source: 0,
        syn_burst_per_source: 0,
    };

    let mut baseline_chains = Chains::install(chain("CNNFBENCH-SB", baseline_queues.clone()))?;
    let mut agent_chains = Chains::install(chain("CNNFBENCH-SC", agent_queues.clone()))?;
    let baseline = start_baseline(baseline_queues.clone(), queue_config.copy_range, queue_config.max_len)?;
    let agent = AgentEngine::start(
        &args.fleet,
        IpAddr::V4(lab.container(0).ip()),
        IpAddr::V4(server.ip()),
        &[port],
    )?;
    let options = QueueOptions {
        batch: args.batch,
        ..QueueOptions::default()
    };
    let queue_set = QueueSet::start_with(queue_config, options, agent.engine.clone())?;

    // The phases alternate, so drift on a shared machine hits both alike.
    let none = BTreeSet::new();
    let mut b = Outcome::default();
    let mut c = Outcome::default();
    for round in 0..args.rounds {
        agent_chains.set_addresses(&none)?;
        baseline_chains.set_addresses(&workload)?;
        b.add(flood(
            &lab,
            port,
            args.seconds,
            &baseline_queues,
            || baseline.load(Ordering::Relaxed),
            "baseline-",
        )?);
        baseline_chains.set_addresses(&none)?;
        agent_chains.set_addresses(&workload)?;
        c.add(flood(
            &lab,
            port,
            args.seconds,
            &agent_queues,
            || agent.verdicts(),
            "nfqueue-",
        )?);
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    baseline_chains.remove()?;
    agent_chains.remove()?;
    let stats = queue_set.stats().total();
    queue_set.stop();

    println!(
        "SYN flood at a {} port, {} s per phase in {} rounds, {} queue(s); load average before {load_before}, after {}",
        if args.closed_port { "closed" } else { "listening" },
        args.seconds * args.rounds as u64,
        args.rounds,
        args.queues,
        load_average()
    );
    println!("  fleet: {:?}", args.fleet);
    print("b: accept-all nfq loop", &b);
    print("c: agent (QueueSet+Engine)", &c);
    println!(
        "  c/b verdicts per CPU-second: {:.2}x (design target: ≥ 200k per core)",
        (c.verdicts as f64 / c.cpu.max(1e-9)) / (b.verdicts as f64 / b.cpu.max(1e-9)).max(1e-9),
    );
    println!(
        "  c/b verdicts/s: {:.2}x; agent mean batch {:.1}, receive errors {}",
        (c.verdicts as f64 / c.seconds) / (b.verdicts as f64 / b.seconds).max(1e-9),
        stats.packets as f64 / stats.batches.max(1) as f64,
        stats.receive_errors
    );
    println!("  engine: {}", agent.summary());
    let lab_syn = [(IpAddr::V4(lab.container(0).ip()), server.ip(), port)];
    let mix = agent.fleet_mix(4096);
    for (what, syns) in [("the lab's SYN", &lab_syn[..]), ("a fleet mix", &mix[..])] {
        for threads in [1, 2] {
            // Paced in slices below the ring's capacity, so the publisher
            // keeps up as it does with the kernel in front.
            let mut slices = Vec::new();
            let mut overflowed = 0;
            for _ in 0..ENGINE_SLICES {
                std::thread::sleep(Duration::from_millis(30));
                let (mean, lost) = agent.time_decisions(syns, ENGINE_SLICE, threads);
                slices.push(mean);
                overflowed += lost;
            }
            slices.sort();
            println!(
                "  engine alone (no kernel), {what}, {threads} thread(s): {:.0} ns per SYN (median of {ENGINE_SLICES} slices; fastest {:.0} ns); ring overflowed {overflowed}",
                slices[slices.len() / 2].as_secs_f64() * 1e9,
                slices[0].as_secs_f64() * 1e9,
            );
        }
    }
    Ok(())
}
