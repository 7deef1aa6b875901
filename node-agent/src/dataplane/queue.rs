//! The verdict threads: one OS thread per NFQUEUE queue number, each
//! blocking in `recv` on its own netlink socket and giving every packet its
//! verdict before it looks at the next one.
//!
//! Why threads and not async: a verdict must never wait behind other work,
//! and the kernel already spreads SYNs over the queues (`--queue-balance`
//! with `--queue-cpu-fanout`), so one thread per queue is the whole
//! scheduler. The thread only decodes and asks the [`Decider`]; anything
//! slow (publishing, logging each decision) belongs behind the decider's own
//! bounded ring.
//!
//! Batching: a packet from a blocking receive is decided and answered at
//! once. Then the thread drains what else is already waiting without
//! blocking, up to [`QueueOptions::batch`] packets at a time, decides them in
//! arrival order and sends all their verdicts in one `send`, until a
//! non-blocking receive finds nothing and it blocks again. At low rates the
//! round trip is one receive, one decision and one send, as in the simplest
//! loop; under a flood the verdict system calls are shared.
//!
//! Queue full: the kernel's fail-open flag (accept instead of drop when a
//! queue is full) is set at bind from [`QueueOptions::fail_open_when_full`]
//! and afterwards follows [`Decider::fail_open_when_full`], which each
//! thread asks once per round of its loop (a table change that makes the
//! node drop clears the flag from the next round on). The change is one
//! config message on the thread's own socket: the kernel takes queue
//! configuration only from the socket bound to the queue.
//!
//! Stopping: each socket has a short receive timeout
//! ([`QueueOptions::stop_poll`]); a stopped thread notices at the latest
//! then, verdicts what it holds and closes its socket, which unbinds the
//! queue (from then on the kernel applies `--queue-bypass` or drops).

use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::netlink::{self, QueueSocket, Received, VERDICT_MESSAGE};
use super::packet::{decode_syn, PacketError, Syn};

/// The kernel's per-queue counters, one line per bound queue.
pub const KERNEL_QUEUE_STATS: &str = "/proc/net/netfilter/nfnetlink_queue";

/// What happens to a queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Let the packet continue.
    Accept,
    /// Discard the packet (the client sees a connect timeout).
    Drop,
}

/// The control plane's decision, called on the verdict threads for every
/// queued packet. Implementations must be fast and must never block or do
/// I/O: they run while the kernel holds the connection's first packet.
pub trait Decider: Send + Sync + 'static {
    /// The verdict for a decoded SYN.
    fn decide(&self, syn: &Syn) -> Verdict;

    /// The verdict for a queued packet that is not a decodable SYN (the
    /// chains queue only SYNs, so this means a malformed packet or a rule
    /// someone else added). Accepts by default.
    fn undecodable(&self, error: &PacketError) -> Verdict {
        let _ = error;
        Verdict::Accept
    }

    /// Whether a full queue should accept new packets (the kernel's
    /// fail-open flag) right now; `None` keeps what
    /// [`QueueOptions::fail_open_when_full`] set at bind. Asked once per
    /// round of every verdict thread: must be as cheap as `decide`.
    fn fail_open_when_full(&self) -> Option<bool> {
        None
    }
}

/// Settings of the kernel queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue numbers to bind, one thread each; the same range as the
    /// chains' `--queue-balance`.
    pub queues: RangeInclusive<u16>,
    /// Most packets the kernel holds per queue while waiting for a verdict;
    /// beyond it new packets are dropped (or accepted with
    /// [`QueueOptions::fail_open_when_full`]) and counted in `queue_dropped`.
    pub max_len: u32,
    /// Bytes of each packet copied to userspace: the headers suffice (128
    /// covers IPv4 or IPv6 with extension headers and TCP).
    pub copy_range: u16,
    /// Receive buffer of each queue's netlink socket (`SO_RCVBUFFORCE`, so
    /// it may exceed `net.core.rmem_max`). Packets that do not fit are
    /// dropped by the kernel and counted in `user_dropped`.
    pub recv_buffer_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            queues: 0..=0,
            max_len: 65536,
            copy_range: 128,
            recv_buffer_bytes: 8 << 20,
        }
    }
}

/// Settings of the verdict threads beyond the kernel queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// When a queue is full, accept new packets instead of dropping them
    /// (the kernel's `NFQA_CFG_F_FAIL_OPEN`), from the bind on; a
    /// [`Decider::fail_open_when_full`] that answers changes it later.
    pub fail_open_when_full: bool,
    /// Most packets decided per verdict `send`.
    pub batch: usize,
    /// How long a blocked receive waits before the thread checks whether it
    /// was stopped: the upper bound of [`QueueSet::stop`].
    pub stop_poll: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            fail_open_when_full: false,
            batch: 64,
            stop_poll: Duration::from_millis(100),
        }
    }
}

/// Why the queues could not be started.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The configuration cannot work.
    #[error("invalid queue configuration: {0}")]
    Config(String),
    /// Binding a queue failed ("resource busy": another process holds it).
    #[error("cannot bind NFQUEUE {queue}: {source}")]
    Bind {
        /// The queue number.
        queue: u16,
        /// The netlink error.
        source: io::Error,
    },
    /// Setting a socket option failed.
    #[error("cannot configure the socket of NFQUEUE {queue}: {source}")]
    Socket {
        /// The queue number.
        queue: u16,
        /// The socket error.
        source: io::Error,
    },
    /// A thread could not be spawned.
    #[error("cannot spawn the thread of NFQUEUE {queue}: {source}")]
    Spawn {
        /// The queue number.
        queue: u16,
        /// The OS error.
        source: io::Error,
    },
}

/// Counters of one queue's thread.
#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    accepted: AtomicU64,
    dropped: AtomicU64,
    undecodable: AtomicU64,
    receive_errors: AtomicU64,
    batches: AtomicU64,
    /// The kernel's fail-open flag as last set by the thread.
    fail_open_when_full: AtomicBool,
}

/// The kernel's counters of one queue, from
/// [`KERNEL_QUEUE_STATS`]. They belong to the queue instance, which the
/// kernel creates when a socket binds and destroys when it unbinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelQueueStats {
    /// Netlink port id of the socket bound to the queue.
    pub peer_port_id: u32,
    /// Packets waiting for a verdict right now.
    pub queue_total: u64,
    /// Packets the kernel dropped (or accepted, with fail-open) because the
    /// queue was full.
    pub queue_dropped: u64,
    /// Packets the kernel could not deliver because the socket's receive
    /// buffer was full.
    pub user_dropped: u64,
    /// The id of the last queued packet: packets queued since the bind.
    pub id_sequence: u64,
}

/// Counters of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStat {
    /// The queue number.
    pub queue: u16,
    /// Packets received and given a verdict.
    pub packets: u64,
    /// Packets accepted (decoded or not).
    pub accepted: u64,
    /// Packets dropped (decoded or not).
    pub dropped: u64,
    /// Packets that did not decode as a SYN.
    pub undecodable: u64,
    /// Receive or verdict errors (e.g. the receive buffer overflowed).
    pub receive_errors: u64,
    /// Verdict `send`s (packets / batches is the mean batch size).
    pub batches: u64,
    /// Whether the kernel's fail-open flag (accept when full) is set.
    pub fail_open_when_full: bool,
    /// The kernel's counters; `None` if the queue is not bound (any more) or
    /// the kernel file could not be read.
    pub kernel: Option<KernelQueueStats>,
}

/// Counters of all queues of a [`QueueSet`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// One entry per queue, in queue order.
    pub queues: Vec<QueueStat>,
}

impl QueueStats {
    /// The sum of every queue's counters (the kernel's summed where known;
    /// `queue` is the first queue's number).
    pub fn total(&self) -> QueueStat {
        let mut total = QueueStat {
            queue: self.queues.first().map_or(0, |q| q.queue),
            ..QueueStat::default()
        };
        for q in &self.queues {
            total.packets += q.packets;
            total.accepted += q.accepted;
            total.dropped += q.dropped;
            total.undecodable += q.undecodable;
            total.receive_errors += q.receive_errors;
            total.batches += q.batches;
            total.fail_open_when_full |= q.fail_open_when_full;
            if let Some(k) = q.kernel {
                let sum = total.kernel.get_or_insert_with(KernelQueueStats::default);
                sum.queue_total += k.queue_total;
                sum.queue_dropped += k.queue_dropped;
                sum.user_dropped += k.user_dropped;
                sum.id_sequence += k.id_sequence;
            }
        }
        total
    }
}

/// Reads the kernel's counters of every bound queue (in this network
/// namespace), keyed by queue number.
pub fn kernel_queue_stats() -> io::Result<Vec<(u16, KernelQueueStats)>> {
    let text = fs::read_to_string(KERNEL_QUEUE_STATS)?;
    Ok(parse_kernel_queue_stats(&text))
}

/// Parses [`KERNEL_QUEUE_STATS`]: `queue_number peer_portid queue_total
/// copy_mode copy_range queue_dropped user_dropped id_sequence 1`. Lines
/// that do not parse are skipped.
pub fn parse_kernel_queue_stats(text: &str) -> Vec<(u16, KernelQueueStats)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<u64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            if fields.len() < 8 {
                return None;
            }
            Some((
                u16::try_from(fields[0]).ok()?,
                KernelQueueStats {
                    peer_port_id: u32::try_from(fields[1]).ok()?,
                    queue_total: fields[2],
                    queue_dropped: fields[5],
                    user_dropped: fields[6],
                    id_sequence: fields[7],
                },
            ))
        })
        .collect()
}

struct Worker {
    queue: u16,
    counters: Arc<Counters>,
    thread: JoinHandle<()>,
}

/// The running verdict threads, one per queue. Stops them on drop.
pub struct QueueSet {
    stop: Arc<AtomicBool>,
    workers: Vec<Worker>,
}

impl std::fmt::Debug for QueueSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSet")
            .field("queues", &self.workers.iter().map(|w| w.queue).collect::<Vec<_>>())
            .finish()
    }
}

impl QueueSet {
    /// Binds every queue of `config.queues` and starts one thread per queue
    /// deciding with `decider`, with default [`QueueOptions`].
    pub fn start(config: QueueConfig, decider: Arc<dyn Decider>) -> Result<QueueSet, QueueError> {
        QueueSet::start_with(config, QueueOptions::default(), decider)
    }

    /// Like [`QueueSet::start`] with explicit options. All queues are bound
    /// before any thread starts; if one fails, none stays bound.
    pub fn start_with(
        config: QueueConfig,
        options: QueueOptions,
        decider: Arc<dyn Decider>,
    ) -> Result<QueueSet, QueueError> {
        if config.queues.is_empty() {
            return Err(QueueError::Config(format!("empty queue range {:?}", config.queues)));
        }
        if options.batch == 0 {
            return Err(QueueError::Config("batch must be at least 1".into()));
        }
        if options.stop_poll.is_zero() {
            return Err(QueueError::Config("stop_poll must be above zero".into()));
        }
        let mut sockets = Vec::new();
        for queue in config.queues.clone() {
            let socket = QueueSocket::bind(queue, config.copy_range, config.max_len, options.fail_open_when_full)
                .map_err(|source| QueueError::Bind { queue, source })?;
            let granted = socket
                .set_receive_buffer(config.recv_buffer_bytes)
                .map_err(|source| QueueError::Socket { queue, source })?;
            socket
                .set_receive_timeout(options.stop_poll)
                .map_err(|source| QueueError::Socket { queue, source })?;
            tracing::info!(
                message = "NFQUEUE bound.",
                queue,
                copy_range = config.copy_range,
                max_len = config.max_len,
                receive_buffer = granted
            );
            sockets.push((queue, socket));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut set = QueueSet {
            stop: Arc::clone(&stop),
            workers: Vec::new(),
        };
        for (queue, socket) in sockets {
            let counters = Arc::new(Counters::default());
            counters
                .fail_open_when_full
                .store(options.fail_open_when_full, Ordering::Relaxed);
            let thread = {
                let counters = Arc::clone(&counters);
                let stop = Arc::clone(&stop);
                let decider = Arc::clone(&decider);
                let batch = options.batch;
                std::thread::Builder::new()
                    .name(format!("nfqueue-{queue}"))
                    .spawn(move || verdict_loop(socket, decider, counters, stop, batch))
                    .map_err(|source| QueueError::Spawn { queue, source })?
            };
            set.workers.push(Worker {
                queue,
                counters,
                thread,
            });
        }
        Ok(set)
    }

    /// The queue numbers this set serves.
    pub fn queues(&self) -> Vec<u16> {
        self.workers.iter().map(|w| w.queue).collect()
    }

    /// The counters of every queue, with the kernel's where readable.
    pub fn stats(&self) -> QueueStats {
        let kernel = kernel_queue_stats().unwrap_or_default();
        QueueStats {
            queues: self
                .workers
                .iter()
                .map(|w| {
                    let c = &w.counters;
                    QueueStat {
                        queue: w.queue,
                        packets: c.packets.load(Ordering::Relaxed),
                        accepted: c.accepted.load(Ordering::Relaxed),
                        dropped: c.dropped.load(Ordering::Relaxed),
                        undecodable: c.undecodable.load(Ordering::Relaxed),
                        receive_errors: c.receive_errors.load(Ordering::Relaxed),
                        batches: c.batches.load(Ordering::Relaxed),
                        fail_open_when_full: c.fail_open_when_full.load(Ordering::Relaxed),
                        kernel: kernel.iter().find(|(q, _)| *q == w.queue).map(|(_, k)| *k),
                    }
                })
                .collect(),
        }
    }

    /// Stops every thread and unbinds every queue; returns within about
    /// [`QueueOptions::stop_poll`].
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            if worker.thread.join().is_err() {
                tracing::error!(message = "NFQUEUE thread panicked.", queue = worker.queue);
            }
        }
    }
}

impl Drop for QueueSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn verdict_loop(
    mut socket: QueueSocket,
    decider: Arc<dyn Decider>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    batch: usize,
) {
    let mut verdicts = Vec::with_capacity(batch * VERDICT_MESSAGE);
    let queue = socket.queue();
    // Draining: the last receive found a packet, so look for more without
    // blocking. A packet from a blocking receive is answered at once, alone,
    // so an idle queue adds no system call to a SYN's round trip.
    let mut draining = false;
    let mut fail_open = counters.fail_open_when_full.load(Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        if let Some(wanted) = decider.fail_open_when_full() {
            if wanted != fail_open {
                match socket.send_fail_open(wanted) {
                    Ok(()) => {
                        fail_open = wanted;
                        counters.fail_open_when_full.store(wanted, Ordering::Relaxed);
                        tracing::info!(
                            message = "NFQUEUE fail-open when full changed.",
                            queue,
                            fail_open_when_full = wanted
                        );
                    }
                    Err(error) => {
                        counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(message = "NFQUEUE fail-open flag not changed.", queue, %error);
                    }
                }
            }
        }
        verdicts.clear();
        let mut decided = 0u64;
        while decided < batch as u64 {
            match socket.receive(!draining) {
                Ok(Some(Received::Packet(packet))) => {
                    let verdict = decide(&*decider, packet.payload, packet.in_interface, &counters);
                    netlink::push_verdict(&mut verdicts, queue, packet.id, verdict == Verdict::Accept);
                    decided += 1;
                    if !draining {
                        break;
                    }
                }
                Ok(Some(Received::Other)) => {}
                Ok(None) => break,
                Err(error) => {
                    counters.receive_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(message = "NFQUEUE receive failed.", queue, %error);
                    break;
                }
            }
        }
        draining = decided > 0;
        if decided == 0 {
            continue;
        }
        counters.packets.fetch_add(decided, Ordering::Relaxed);
        counters.batches.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = socket.send(&verdicts) {
            counters.receive_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(message = "NFQUEUE verdicts not sent.", queue, packets = decided, %error);
        }
    }
    tracing::info!(message = "NFQUEUE thread stopped.", queue);
}

/// Decodes and decides one packet, counting it.
fn decide(decider: &dyn Decider, payload: &[u8], in_interface: u32, counters: &Counters) -> Verdict {
    let verdict = match decode_syn(payload) {
        Ok(mut syn) => {
            syn.in_interface = in_interface;
            decider.decide(&syn)
        }
        Err(error) => {
            counters.undecodable.fetch_add(1, Ordering::Relaxed);
            decider.undecodable(&error)
        }
    };
    match verdict {
        Verdict::Accept => counters.accepted.fetch_add(1, Ordering::Relaxed),
        Verdict::Drop => counters.dropped.fetch_add(1, Ordering::Relaxed),
    };
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_file() {
        let text = "    3  12345     0 2   128     7     9      20 1\n  4 -1 x\n 65535 1 2 2 128 3 4 5 1\n";
        let stats = parse_kernel_queue_stats(text);
        assert_eq!(
            stats,
            vec![
                (
                    3,
                    KernelQueueStats {
                        peer_port_id: 12345,
                        queue_total: 0,
                        queue_dropped: 7,
                        user_dropped: 9,
                        id_sequence: 20
                    }
                ),
                (
                    65535,
                    KernelQueueStats {
                        peer_port_id: 1,
                        queue_total: 2,
                        queue_dropped: 3,
                        user_dropped: 4,
                        id_sequence: 5
                    }
                )
            ]
        );
    }

    #[test]
    fn totals_add_up() {
        let stats = QueueStats {
            queues: vec![
                QueueStat {
                    queue: 4,
                    packets: 3,
                    accepted: 2,
                    dropped: 1,
                    kernel: Some(KernelQueueStats {
                        queue_dropped: 5,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                QueueStat {
                    queue: 5,
                    packets: 1,
                    accepted: 1,
                    ..Default::default()
                },
            ],
        };
        let total = stats.total();
        assert_eq!(
            (total.queue, total.packets, total.accepted, total.dropped),
            (4, 4, 3, 1)
        );
        assert_eq!(total.kernel.unwrap().queue_dropped, 5);
    }
}
