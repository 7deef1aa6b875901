//! Shared parts of the data-plane benchmarks: the baseline NFQUEUE loop,
//! the realistic decider, a server that accepts and closes, percentiles.
//!
//! The baseline is the minimal loop the design's bars were measured with:
//! the `nfq` crate, one thread per queue, accept every packet without
//! looking at it. The agent's path is `cnnf_agent::dataplane::QueueSet` with
//! a decider that decodes the SYN and looks it up in a hash map, as the real
//! control plane does. Both run against the same chains and queue settings
//! (except the receive buffer, which `nfq` cannot set), in the same process
//! and lab, one after the other, so the ratios compare like with like.
//!
//! Benchmarks only: needs root, iptables and network namespaces; never
//! links RocksDB.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnnf_agent::dataplane::queue::kernel_queue_stats;
use cnnf_agent::dataplane::{Decider, Syn, Verdict};
use cnnf_testkit::FakeContainer;

/// Starts one `nfq` thread per queue that accepts every packet unseen, and
/// returns the count of verdicts given. The threads block in `recv` until
/// the process exits (`nfq` has no receive timeout), so give each phase its
/// own queue numbers.
pub fn start_baseline(queues: RangeInclusive<u16>, copy_range: u16, max_len: u32) -> io::Result<Arc<AtomicU64>> {
    let verdicts = Arc::new(AtomicU64::new(0));
    for number in queues {
        let mut queue = nfq::Queue::open()?;
        queue.bind(number)?;
        queue.set_copy_range(number, copy_range)?;
        queue.set_queue_max_len(number, max_len)?;
        let verdicts = Arc::clone(&verdicts);
        std::thread::Builder::new()
            .name(format!("baseline-{number}"))
            .spawn(move || loop {
                let Ok(mut message) = queue.recv() else { continue };
                message.set_verdict(nfq::Verdict::Accept);
                if queue.verdict(message).is_ok() {
                    verdicts.fetch_add(1, Ordering::Relaxed);
                }
            })?;
    }
    Ok(verdicts)
}

/// A decider shaped like the real one: a hash-map lookup on (source,
/// destination, destination port) among `entries` other connections.
#[derive(Debug)]
pub struct LookupDecider {
    table: HashMap<(IpAddr, IpAddr, u16), Verdict>,
    /// Verdicts given.
    pub decided: AtomicU64,
}

impl LookupDecider {
    /// A table with `entries` filler connections plus `allowed` (accepted);
    /// anything not in the table is accepted too, so only the cost differs.
    pub fn new(entries: usize, allowed: &[(IpAddr, IpAddr, u16)]) -> LookupDecider {
        let mut table = HashMap::with_capacity(entries + allowed.len());
        for i in 0..entries {
            let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            let destination = IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + (i as u32 * 7) % 65536));
            let verdict = if i % 3 == 0 { Verdict::Drop } else { Verdict::Accept };
            table.insert((source, destination, (i % 60000) as u16 + 1), verdict);
        }
        for key in allowed {
            table.insert(*key, Verdict::Accept);
        }
        LookupDecider {
            table,
            decided: AtomicU64::new(0),
        }
    }
}

impl Decider for LookupDecider {
    fn decide(&self, syn: &Syn) -> Verdict {
        self.decided.fetch_add(1, Ordering::Relaxed);
        *self
            .table
            .get(&(syn.source, syn.destination, syn.destination_port))
            .unwrap_or(&Verdict::Accept)
    }
}

/// Listens inside `container` on a free port and accepts and closes every
/// connection in a background thread; returns the port.
pub fn accept_and_close(container: &FakeContainer) -> io::Result<u16> {
    let ip = container.ip();
    let listener = container.run_in(move || TcpListener::bind((ip, 0)))??;
    let port = listener.local_addr()?.port();
    std::thread::Builder::new()
        .name(format!("server-{port}"))
        .spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        })?;
    Ok(port)
}

/// The `p`-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Kernel counters summed over `queues`: (queued since bind, dropped because
/// the queue was full, dropped because the socket buffer was full).
pub fn kernel_counters(queues: &RangeInclusive<u16>) -> (u64, u64, u64) {
    kernel_queue_stats()
        .unwrap_or_default()
        .iter()
        .filter(|(q, _)| queues.contains(q))
        .fold((0, 0, 0), |(a, b, c), (_, k)| {
            (a + k.id_sequence, b + k.queue_dropped, c + k.user_dropped)
        })
}

/// Microseconds with one decimal.
pub fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}
