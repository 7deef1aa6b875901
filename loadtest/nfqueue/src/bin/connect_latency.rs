//! `connect-latency`: TCP connect latency between two lab namespaces
//! (a) with no rule, (b) with every SYN through a minimal accept-all `nfq`
//! loop, (c) through the agent's `QueueSet` with a decider that decodes the
//! SYN and looks it up in a hash map. Prints p50/p99 of each and the ratios
//! c/b (target p50 ≤ 1.1, p99 ≤ 1.2) and c/a.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest-nfqueue --bin connect-latency -- --connects 20000
//! ```
//!
//! The phases alternate in `--rounds` rounds so drift on a shared machine
//! hits all three alike; each phase connects to its own server port (so
//! TIME_WAIT never exhausts the ephemeral ports).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_agent::dataplane::{ChainConfig, Chains, Hook, QueueConfig, QueueSet};
use cnnf_loadtest_nfqueue::{accept_and_close, micros, percentile, start_baseline, LookupDecider};
use cnnf_testkit::Lab;

#[derive(Debug, Parser)]
#[command(about = "Connect latency through the agent's NFQUEUE threads vs. baselines")]
struct Args {
    /// Connects per phase, over all rounds.
    #[arg(long, default_value_t = 20_000)]
    connects: usize,
    /// Rounds; each runs every phase for connects/rounds connects.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Queues per phase (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// First queue number; the run uses 2 × queues numbers from here.
    #[arg(long, default_value_t = 4000)]
    first_queue: u16,
    /// Entries in the decider's hash map.
    #[arg(long, default_value_t = 100_000)]
    table: usize,
}

struct Phase {
    name: &'static str,
    port: u16,
    samples: Vec<Duration>,
    failures: usize,
    elapsed: Duration,
}

fn connect_many(lab: &Lab, target: SocketAddrV4, count: usize) -> anyhow::Result<(Vec<Duration>, usize, Duration)> {
    Ok(lab.container(0).run_in(move || {
        let mut samples = Vec::with_capacity(count);
        let mut failures = 0;
        let all = Instant::now();
        for _ in 0..count {
            let start = Instant::now();
            match TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(3)) {
                Ok(stream) => {
                    samples.push(start.elapsed());
                    drop(stream);
                }
                Err(_) => failures += 1,
            }
        }
        (samples, failures, all.elapsed())
    })?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.queues >= 1 && args.rounds >= 1,
        "--queues and --rounds must be at least 1"
    );
    let lab = Lab::new(2)?;
    let server = lab.container(1);
    let workload: BTreeSet<IpAddr> = [IpAddr::V4(server.ip())].into();
    let baseline_queues = args.first_queue..=args.first_queue + args.queues - 1;
    let agent_queues = args.first_queue + args.queues..=args.first_queue + 2 * args.queues - 1;
    let queue_config = QueueConfig {
        queues: agent_queues.clone(),
        ..QueueConfig::default()
    };

    let mut phases = [
        Phase {
            name: "a: no rule",
            port: accept_and_close(server)?,
            samples: Vec::new(),
            failures: 0,
            elapsed: Duration::ZERO,
        },
        Phase {
            name: "b: accept-all nfq loop",
            port: accept_and_close(server)?,
            samples: Vec::new(),
            failures: 0,
            elapsed: Duration::ZERO,
        },
        Phase {
            name: "c: agent QueueSet + lookup",
            port: accept_and_close(server)?,
            samples: Vec::new(),
            failures: 0,
            elapsed: Duration::ZERO,
        },
    ];
    let client_ip = IpAddr::V4(lab.container(0).ip());
    let allowed: Vec<_> = phases
        .iter()
        .map(|p| (client_ip, IpAddr::V4(server.ip()), p.port))
        .collect();

    let chain = |prefix: &str, queues| ChainConfig {
        prefix: prefix.into(),
        queues,
        fail_open: false,
        hooks: vec![Hook::Forward],
    };
    let mut baseline_chains = Chains::install(chain("CNNFBENCH-B", baseline_queues.clone()))?;
    let mut agent_chains = Chains::install(chain("CNNFBENCH-C", agent_queues.clone()))?;
    let baseline = start_baseline(baseline_queues, queue_config.copy_range, queue_config.max_len)?;
    let decider = Arc::new(LookupDecider::new(args.table, &allowed));
    let queue_set = QueueSet::start(queue_config, decider.clone())?;

    let per_round = (args.connects / args.rounds).max(1);
    let none = BTreeSet::new();
    for round in 0..args.rounds {
        for (index, phase) in phases.iter_mut().enumerate() {
            baseline_chains.set_addresses(if index == 1 { &workload } else { &none })?;
            agent_chains.set_addresses(if index == 2 { &workload } else { &none })?;
            let target = SocketAddrV4::new(server.ip(), phase.port);
            // Warm-up: caches, conntrack, the verdict thread's first wakeups.
            connect_many(&lab, target, 50)?;
            let (samples, failures, elapsed) = connect_many(&lab, target, per_round)?;
            phase.samples.extend(samples);
            phase.failures += failures;
            phase.elapsed += elapsed;
        }
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }
    baseline_chains.remove()?;
    agent_chains.remove()?;
    let stats = queue_set.stats().total();
    queue_set.stop();

    println!(
        "connect latency, {} connects per phase in {} rounds, {} queue(s), table of {} entries",
        per_round * args.rounds,
        args.rounds,
        args.queues,
        args.table
    );
    let mut summary = Vec::new();
    for phase in &mut phases {
        phase.samples.sort();
        let p50 = percentile(&phase.samples, 50.0);
        let p99 = percentile(&phase.samples, 99.0);
        let rate = phase.samples.len() as f64 / phase.elapsed.as_secs_f64().max(1e-9);
        println!(
            "  {:<28} p50 {:>7} µs  p99 {:>7} µs  max {:>9} µs  {:>8.0} connects/s  failures {}",
            phase.name,
            micros(p50),
            micros(p99),
            micros(phase.samples.last().copied().unwrap_or_default()),
            rate,
            phase.failures
        );
        summary.push((p50.as_secs_f64(), p99.as_secs_f64()));
    }
    let (a, b, c) = (summary[0], summary[1], summary[2]);
    println!(
        "  c/b: p50 {:.2}x  p99 {:.2}x   (target ≤ 1.1x, ≤ 1.2x)",
        c.0 / b.0,
        c.1 / b.1
    );
    println!("  c/a: p50 {:.2}x  p99 {:.2}x", c.0 / a.0, c.1 / a.1);
    println!(
        "  baseline verdicts {}, agent packets {} (accepted {}, dropped {}, undecodable {}), mean batch {:.2}",
        baseline.load(std::sync::atomic::Ordering::Relaxed),
        stats.packets,
        stats.accepted,
        stats.dropped,
        stats.undecodable,
        stats.packets as f64 / stats.batches.max(1) as f64
    );
    Ok(())
}
