//! `connect-latency`: TCP connect latency between two lab namespaces
//! (a) with no rule, (b) with every SYN through a minimal accept-all `nfq`
//! loop, (c) through the agent's `QueueSet` deciding with the agent's own
//! `Engine` (identities, compiled verdict table in prevent mode, decision
//! ring, publisher into a spool; see `AgentEngine`), and (q) through a
//! second `QueueSet` whose decider accepts without looking, which splits
//! c − b into the queue threads' share and the engine's. Prints p50/p99 of
//! each and the ratios c/b (target p50 ≤ 1.1, p99 ≤ 1.2), q/b and c/a.
//!
//! ```text
//! cargo run --release -p cnnf-loadtest-nfqueue --bin connect-latency -- --connects 20000
//! ```
//!
//! The phases alternate in `--rounds` rounds, in an order that rotates
//! every round, so drift on a shared machine hits all of them alike; each
//! phase connects to its own server port (so TIME_WAIT never exhausts the
//! ephemeral ports).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use cnnf_agent::dataplane::{ChainConfig, Chains, Hook, QueueConfig, QueueOptions, QueueSet};
use cnnf_loadtest_nfqueue::{
    accept_and_close, load_average, micros, percentile, start_baseline, AcceptAll, AgentEngine, FleetShape, Timed,
};
use cnnf_testkit::Lab;

#[derive(Debug, Parser)]
#[command(about = "Connect latency through the agent's NFQUEUE threads vs. baselines")]
struct Args {
    /// Connects per phase, over all rounds.
    #[arg(long, default_value_t = 20_000)]
    connects: usize,
    /// Rounds; each runs every phase for connects/rounds connects.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Queues per phase (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// First queue number; the run uses 3 × queues numbers from here.
    #[arg(long, default_value_t = 4000)]
    first_queue: u16,
    /// Receive buffer of the agent's queue sockets (c and q), bytes.
    #[arg(long, default_value_t = QueueConfig::default().recv_buffer_bytes)]
    recv_buffer: usize,
    /// How long a blocked receive of the agent's queue threads (c and q)
    /// waits before it checks whether it was stopped, milliseconds.
    #[arg(long, default_value_t = 100)]
    stop_poll_ms: u64,
    /// The fleet the engine is loaded with.
    #[command(flatten)]
    fleet: FleetShape,
}

struct Phase {
    name: &'static str,
    port: u16,
    /// Index into the chains (none for the no-rule phase).
    chains: Option<usize>,
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
    let queues = |n: u16| -> RangeInclusive<u16> {
        args.first_queue + n * args.queues..=args.first_queue + (n + 1) * args.queues - 1
    };
    let (baseline_queues, agent_queues, plain_queues) = (queues(0), queues(1), queues(2));

    let phase = |name, chains| -> anyhow::Result<Phase> {
        Ok(Phase {
            name,
            port: accept_and_close(server)?,
            chains,
            samples: Vec::new(),
            failures: 0,
            elapsed: Duration::ZERO,
        })
    };
    let mut phases = [
        phase("a: no rule", None)?,
        phase("b: accept-all nfq loop", Some(0))?,
        phase("c: agent (QueueSet+Engine)", Some(1))?,
        phase("q: QueueSet, accept-all", Some(2))?,
    ];
    let client_ip = IpAddr::V4(lab.container(0).ip());
    let ports: Vec<u16> = phases.iter().map(|p| p.port).collect();

    let chain = |prefix: &str, queues| ChainConfig {
        prefix: prefix.into(),
        queues,
        fail_open: false,
        hooks: vec![Hook::Forward],
        // Measures NFQUEUE itself: no per-source SYN limit in the way.
        syn_rate_per_source: 0,
        syn_burst_per_source: 0,
    };
    let mut chains = [
        Chains::install(chain("CNNFBENCH-B", baseline_queues.clone()))?,
        Chains::install(chain("CNNFBENCH-C", agent_queues.clone()))?,
        Chains::install(chain("CNNFBENCH-Q", plain_queues.clone()))?,
    ];
    let defaults = QueueConfig::default();
    let baseline = start_baseline(baseline_queues, defaults.copy_range, defaults.max_len)?;
    let agent = AgentEngine::start(&args.fleet, client_ip, IpAddr::V4(server.ip()), &ports)?;
    let timed = Arc::new(Timed::new(agent.engine.clone()));
    let options = QueueOptions {
        stop_poll: Duration::from_millis(args.stop_poll_ms.max(1)),
        ..QueueOptions::default()
    };
    let queue_set = QueueSet::start_with(
        QueueConfig {
            queues: agent_queues,
            recv_buffer_bytes: args.recv_buffer,
            ..QueueConfig::default()
        },
        options.clone(),
        timed.clone(),
    )?;
    let plain = QueueSet::start_with(
        QueueConfig {
            queues: plain_queues,
            recv_buffer_bytes: args.recv_buffer,
            ..QueueConfig::default()
        },
        options,
        Arc::new(AcceptAll),
    )?;
    let load_before = load_average();

    let per_round = (args.connects / args.rounds).max(1);
    let none = BTreeSet::new();
    for round in 0..args.rounds {
        // The order rotates every round, so no phase always follows another.
        for step in 0..phases.len() {
            let phase = &mut phases[(step + round) % 4];
            for (index, chains) in chains.iter_mut().enumerate() {
                chains.set_addresses(if phase.chains == Some(index) { &workload } else { &none })?;
            }
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
    for chains in chains {
        chains.remove()?;
    }
    let stats = queue_set.stats().total();
    queue_set.stop();
    plain.stop();

    println!(
        "connect latency, {} connects per phase in {} rounds, {} queue(s); load average before {load_before}, after {}",
        per_round * args.rounds,
        args.rounds,
        args.queues,
        load_average()
    );
    println!("  fleet: {:?}", args.fleet);
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
    let (a, b, c, q) = (summary[0], summary[1], summary[2], summary[3]);
    println!(
        "  c/b: p50 {:.2}x  p99 {:.2}x   (target ≤ 1.1x, ≤ 1.2x)",
        c.0 / b.0,
        c.1 / b.1
    );
    println!("  q/b: p50 {:.2}x  p99 {:.2}x", q.0 / b.0, q.1 / b.1);
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
    let decisions = timed.sorted();
    println!(
        "  engine on the verdict thread (c): p50 {} µs, p99 {} µs, max {} µs per SYN",
        micros(percentile(&decisions, 50.0)),
        micros(percentile(&decisions, 99.0)),
        micros(decisions.last().copied().unwrap_or_default())
    );
    println!("  engine: {}", agent.summary());
    agent.stop();
    Ok(())
}
