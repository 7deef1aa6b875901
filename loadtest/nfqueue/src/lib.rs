//! Shared parts of the data-plane benchmarks: the baseline NFQUEUE loop,
//! the agent's engine loaded with a realistic fleet, a server that accepts
//! and closes, percentiles, per-thread CPU time.
//!
//! The baseline is the minimal loop the design's bars were measured with:
//! the `nfq` crate, one thread per queue, accept every packet without
//! looking at it. The agent's path is `cnnf_agent::dataplane::QueueSet`
//! deciding through the agent's own `Engine` ([`AgentEngine`]): identity
//! resolution, the compiled verdict table, the decision ring and the
//! publisher, loaded with a realistic fleet ([`FleetShape`]). [`AcceptAll`]
//! is the agent's queue threads with no engine behind them, and [`Timed`]
//! times a decider on the verdict thread itself. All run against the same
//! chains and queue settings (except the receive buffer, which `nfq`
//! cannot set), in the same process and lab, alternating, so the ratios
//! compare like with like.
//!
//! Benchmarks only: needs root, iptables and network namespaces; never
//! links RocksDB.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use cnnf_agent::dataplane::queue::kernel_queue_stats;
use cnnf_agent::dataplane::{Decider, Syn, Verdict};
use cnnf_agent::decisions::Ring;
use cnnf_agent::engine::{Action, Engine};
use cnnf_agent::events::{publish_decisions, Events, PublisherSettings};
use cnnf_agent::identities::{Identities, Peer};
use cnnf_agent::metrics::Metrics;
use cnnf_agent::tables::{Tables, Trust};
use cnnf_core::eval::Identity;
use cnnf_core::proto::{
    self, network_object::Kind as ObjectKind, CompiledModel, LearnedConnection, NetworkObject, PortRange, Rule,
    RuleDestination, VerdictTable,
};
use cnnf_core::subjects::Token;
use cnnf_testkit::images::{image_id, image_name};
use cnnf_testkit::FakeContainer;
use prost::Message as _;

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

/// The shape of the fleet the agent's engine is loaded with.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetShape {
    /// Images in the verdict table, each with an enforcing model.
    #[arg(long, default_value_t = 1_000)]
    pub images: u32,
    /// Learned connections per model (half outbound, half inbound).
    #[arg(long, default_value_t = 20)]
    pub learned: u32,
    /// Operator rules (sources: the first images; destinations: the next
    /// image, a partner subnet, a blocked subnet).
    #[arg(long, default_value_t = 200)]
    pub rules: u32,
    /// Partner subnet objects.
    #[arg(long, default_value_t = 100)]
    pub subnets: u32,
    /// Addresses of containers on other nodes in the fleet identity map.
    #[arg(long, default_value_t = 5_000)]
    pub fleet: u32,
    /// Other containers on this node (local identity map).
    #[arg(long, default_value_t = 30)]
    pub local: u32,
}

fn image_identity(id: &str, name: &str) -> proto::Identity {
    proto::Identity {
        kind: proto::IdentityKind::Image as i32,
        id: id.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    }
}

fn learned(peer: proto::Identity, port: u16) -> LearnedConnection {
    LearnedConnection {
        peer: Some(peer),
        port: u32::from(port),
        protocol: proto::Protocol::Tcp as i32,
        count: 1,
        ..Default::default()
    }
}

/// Address `n` of the fleet outside the lab (10.64.0.0/12, never the lab's
/// 10.199.0.0/16 nor an object's subnet).
fn fleet_v4(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + n)
}

/// Image and container of the lab's client and server.
const CLIENT_IMAGE: (&str, &str) = ("sha256:lab-client", "registry.example/lab/client:1");
const SERVER_IMAGE: (&str, &str) = ("sha256:lab-server", "registry.example/lab/server:1");

/// The verdict table of the benchmarks, in prevent mode: `shape.images`
/// fleet images with enforcing models of `shape.learned` connections,
/// image and subnet objects, `shape.rules` rules; plus the lab's client and
/// server images, whose models know client → server on every port of
/// `ports`, and a rule of the client (allow learned, prevent a blocked
/// subnet, allow a partner subnet on 443), so a lab SYN walks the rule,
/// destination and learned-connection lookups before it is allowed.
pub fn verdict_table(shape: &FleetShape, ports: &[u16]) -> VerdictTable {
    let images = shape.images.max(2);
    let per_side = (shape.learned / 2).max(1);
    let mut models: Vec<CompiledModel> = (0..images)
        .map(|i| CompiledModel {
            image_id: image_id(i),
            state: proto::ModelState::Enforcing as i32,
            outbound: (0..per_side)
                .map(|k| {
                    let to = (i + 1 + k * 97) % images;
                    learned(image_identity(&image_id(to), &image_name(to)), 8000 + (k % 16) as u16)
                })
                .collect(),
            inbound: (0..per_side)
                .map(|k| {
                    let from = (i + images * 97 - 1 - k * 97) % images;
                    learned(
                        image_identity(&image_id(from), &image_name(from)),
                        8000 + (k % 16) as u16,
                    )
                })
                .collect(),
        })
        .collect();
    let client = image_identity(CLIENT_IMAGE.0, CLIENT_IMAGE.1);
    let server = image_identity(SERVER_IMAGE.0, SERVER_IMAGE.1);
    models.push(CompiledModel {
        image_id: CLIENT_IMAGE.0.into(),
        state: proto::ModelState::Enforcing as i32,
        outbound: ports.iter().map(|port| learned(server.clone(), *port)).collect(),
        inbound: Vec::new(),
    });
    models.push(CompiledModel {
        image_id: SERVER_IMAGE.0.into(),
        state: proto::ModelState::Enforcing as i32,
        outbound: Vec::new(),
        inbound: ports.iter().map(|port| learned(client.clone(), *port)).collect(),
    });

    let mut objects: Vec<NetworkObject> = (0..images)
        .map(|i| NetworkObject {
            name: format!("img-{i}"),
            kind: ObjectKind::Image as i32,
            image_id: image_id(i),
            ..Default::default()
        })
        .collect();
    objects.push(NetworkObject {
        name: "lab-client".into(),
        kind: ObjectKind::Image as i32,
        image_name: CLIENT_IMAGE.1.into(),
        ..Default::default()
    });
    objects.push(NetworkObject {
        name: "team-images".into(),
        kind: ObjectKind::Image as i32,
        image_name: "registry.example/team-1*".into(),
        ..Default::default()
    });
    objects.push(NetworkObject {
        name: "blocked".into(),
        kind: ObjectKind::Subnet as i32,
        cidrs: vec!["10.250.0.0/16".into()],
        ..Default::default()
    });
    objects.extend((0..shape.subnets).map(|n| NetworkObject {
        name: format!("partner-{n}"),
        kind: ObjectKind::Subnet as i32,
        cidrs: vec![
            format!("10.{}.{}.0/24", 100 + (n >> 8) % 100, n & 255),
            format!("fd00:{n:x}::/48"),
        ],
        ..Default::default()
    }));

    let destination = |object: String, port: u32, effect: proto::RuleEffect| RuleDestination {
        object,
        ports: if port == 0 {
            Vec::new()
        } else {
            vec![PortRange { first: port, last: 0 }]
        },
        protocol: proto::Protocol::Tcp as i32,
        effect: effect as i32,
    };
    let partner = |r: u32| format!("partner-{}", r % shape.subnets.max(1));
    let mut rules = vec![Rule {
        id: "lab-client".into(),
        source: "lab-client".into(),
        destinations: vec![
            destination("blocked".into(), 0, proto::RuleEffect::Prevent),
            destination(partner(0), 443, proto::RuleEffect::Unspecified),
        ],
        allow_learned: true,
        effect: proto::RuleEffect::Prevent as i32,
        ..Default::default()
    }];
    rules.extend((0..shape.rules).map(|r| {
        let source = r % images;
        let mut destinations = vec![
            destination(
                format!("img-{}", (source + 1) % images),
                9000 + r / images,
                proto::RuleEffect::Unspecified,
            ),
            destination("blocked".into(), 0, proto::RuleEffect::Prevent),
        ];
        if shape.subnets > 0 {
            destinations.push(destination(partner(r), 443, proto::RuleEffect::Unspecified));
        }
        Rule {
            id: format!("rule-{r}"),
            source: if r % 10 == 9 {
                "team-images".into()
            } else {
                format!("img-{source}")
            },
            destinations,
            allow_learned: r % 2 == 0,
            effect: proto::RuleEffect::Prevent as i32,
            ..Default::default()
        }
    }));

    VerdictTable {
        version: 1,
        mode: proto::Mode::Prevent as i32,
        host_mode: proto::Mode::Prevent as i32,
        objects,
        rules,
        models,
        ..Default::default()
    }
}

/// The identity of a container of an image.
fn peer(container: &str, image: (&str, &str)) -> Arc<Peer> {
    Arc::new(Peer::new(
        Identity::Image {
            id: image.0.into(),
            name: image.1.into(),
        },
        container.into(),
        "bench".into(),
        "n1".into(),
    ))
}

/// The real agent's decision path, wired as the agent wires it: the
/// [`Engine`] deciding with the compiled verdict table and the identity
/// maps, recording every decision into the bounded ring, and the agent's
/// decision publisher draining the ring into aggregation windows and
/// writing `DecisionBatch` events into a real disk spool (in a temporary
/// directory). No NATS: nothing sends the spool on, which the verdict path
/// never waits for anyway.
pub struct AgentEngine {
    /// The engine: pass it to `QueueSet` as the decider.
    pub engine: Arc<Engine>,
    /// The agent's metrics (verdicts, ring and publisher counters).
    pub metrics: Metrics,
    stop: tokio::sync::watch::Sender<bool>,
    publisher: Option<std::thread::JoinHandle<()>>,
    _state: tempfile::TempDir,
    table_bytes: usize,
    build: Duration,
    shape: FleetShape,
}

impl std::fmt::Debug for AgentEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentEngine").finish_non_exhaustive()
    }
}

impl AgentEngine {
    /// Loads the engine with [`verdict_table`] and the identity maps: the
    /// lab's `client` and `server` plus `shape.local` other containers as
    /// this node's workloads, and `shape.fleet` addresses of containers
    /// elsewhere in the fleet map; starts the publisher.
    pub fn start(shape: &FleetShape, client: IpAddr, server: IpAddr, ports: &[u16]) -> anyhow::Result<AgentEngine> {
        let state = tempfile::tempdir()?;
        let metrics = Metrics::default();
        let cluster = Token::new("cluster", "bench")?;
        let node = Token::new("node", "n1")?;
        // Signed and verified as in production: the table's build time
        // below includes the signature check.
        let key = cnnf_signing::SigningKey::generate();
        let tables = Arc::new(Tables::load(
            state.path(),
            &cluster,
            &node,
            Trust::keys(vec![key.public_key().clone()]),
            metrics.clone(),
        ));
        let table = key.sign_table_bytes(&verdict_table(shape, ports).encode_to_vec());
        let started = Instant::now();
        tables
            .offer(&table)
            .map_err(|error| anyhow::anyhow!("the benchmark's verdict table is rejected: {error}"))?;
        let build = started.elapsed();

        let identities = Arc::new(Identities::new(metrics.clone()));
        let images = shape.images.max(2);
        let mut local = HashMap::new();
        local.insert(client, peer("lab-client-0", CLIENT_IMAGE));
        local.insert(server, peer("lab-server-0", SERVER_IMAGE));
        for n in 0..shape.local {
            let i = n % images;
            local.insert(
                IpAddr::V4(Ipv4Addr::new(10, 198, (n >> 8) as u8, n as u8)),
                peer(&format!("local-{n}"), (&image_id(i), &image_name(i))),
            );
        }
        identities.set_local(local);
        identities.apply_fleet(
            (0..shape.fleet)
                .map(|n| {
                    let i = n % images;
                    let peer = peer(&format!("fleet-{n}"), (&image_id(i), &image_name(i)));
                    (IpAddr::V4(fleet_v4(n)), Some(peer))
                })
                .chain([
                    (client, Some(peer("lab-client-0", CLIENT_IMAGE))),
                    (server, Some(peer("lab-server-0", SERVER_IMAGE))),
                ])
                .collect(),
        );

        let defaults = cnnf_agent::Config::try_parse_from(["cnnf-agent"])?;
        let (ring, receiver) = Ring::new(defaults.ring_size, metrics.clone());
        let engine = Arc::new(Engine::new(tables, identities, ring, metrics.clone(), false));
        for port in ports {
            anyhow::ensure!(
                engine.decide(client, server, *port) == Action::Accept,
                "the benchmark's table does not allow {client} → {server}:{port}"
            );
        }

        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let spool_dir = state.path().join(cnnf_agent::SPOOL_DIR);
        let settings = PublisherSettings {
            window: defaults.window(),
            max_distinct: defaults.max_distinct,
            batch_decisions: defaults.batch_decisions,
        };
        let publisher_metrics = metrics.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let spool = cnnf_spool::Spool::open(&spool_dir, cnnf_spool::SpoolConfig::default())?;
        let publisher = std::thread::Builder::new().name("publisher".into()).spawn(move || {
            runtime.block_on(async move {
                let spool = cnnf_spool::SpoolHandle::new(spool);
                let events = Arc::new(Events::new(cluster, node, "bench".into(), spool, publisher_metrics));
                publish_decisions(receiver, events, settings, stop_rx).await;
            });
        })?;
        Ok(AgentEngine {
            engine,
            metrics,
            stop,
            publisher: Some(publisher),
            _state: state,
            table_bytes: table.len(),
            build,
            shape: shape.clone(),
        })
    }

    /// Verdicts the engine gave (every kind, undecodable included).
    pub fn verdicts(&self) -> u64 {
        ["allow", "learn", "observe", "alert", "prevent", "block", "undecodable"]
            .into_iter()
            .map(|verdict| self.metrics.verdict_count(verdict))
            .sum::<u64>()
            + self.metrics.foreign_packets.get()
    }

    /// One line on the table and the ring: its size and build time,
    /// verdicts by kind, decisions recorded, overflowed and published.
    pub fn summary(&self) -> String {
        format!(
            "table {} KiB protobuf, compiled in {:.1?}; verdicts allow {} prevent {} other {}; \
             decisions recorded {} overflowed {} published (aggregated) {}",
            self.table_bytes / 1024,
            self.build,
            self.metrics.verdict_count("allow"),
            self.metrics.verdict_count("prevent"),
            self.verdicts() - self.metrics.verdict_count("allow") - self.metrics.verdict_count("prevent"),
            self.metrics.decisions_recorded.get(),
            self.metrics.decisions_overflowed.get(),
            self.metrics.decisions_published.get(),
        )
    }

    /// SYNs between this node's other containers and containers elsewhere
    /// in the fleet, on learned ports and others: `count` of them, spread
    /// over the identity maps (and so over the table) like a busy node's.
    pub fn fleet_mix(&self, count: usize) -> Vec<(IpAddr, Ipv4Addr, u16)> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u32| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(below.max(1))) as u32
        };
        (0..count)
            .map(|_| {
                let local = next(self.shape.local);
                let source = IpAddr::V4(Ipv4Addr::new(10, 198, (local >> 8) as u8, local as u8));
                let port = if next(2) == 0 { 8000 + next(16) as u16 } else { 23 };
                (source, fleet_v4(next(self.shape.fleet)), port)
            })
            .collect()
    }

    /// The engine alone, without the kernel: the mean time of one
    /// `Engine::decide` (resolve both ends, decide, count, record into the
    /// ring) over `count` SYNs cycling through `syns` (source, destination,
    /// port), on each of `threads` threads at once. The publisher drains
    /// the ring meanwhile, as in the agent; returns the mean and how many
    /// records overflowed.
    pub fn time_decisions(&self, syns: &[(IpAddr, Ipv4Addr, u16)], count: u32, threads: usize) -> (Duration, u64) {
        let overflowed = self.metrics.decisions_overflowed.get();
        let elapsed: Vec<Duration> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let started = Instant::now();
                        for (source, destination, port) in syns.iter().cycle().take(count as usize) {
                            std::hint::black_box(self.engine.decide(
                                std::hint::black_box(*source),
                                IpAddr::V4(*destination),
                                *port,
                            ));
                        }
                        started.elapsed()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or_default())
                .collect()
        });
        let total: Duration = elapsed.iter().sum();
        (
            total / (count.max(1) * elapsed.len() as u32),
            self.metrics.decisions_overflowed.get() - overflowed,
        )
    }

    /// Stops the publisher after it spooled what the ring holds.
    pub fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(publisher) = self.publisher.take() {
            let _ = publisher.join();
        }
    }
}

/// A decider that accepts every SYN without looking at it: the agent's
/// queue threads with no engine behind them.
#[derive(Debug, Default)]
pub struct AcceptAll;

impl Decider for AcceptAll {
    fn decide(&self, _syn: &Syn) -> Verdict {
        Verdict::Accept
    }
}

/// A decider that times another one: how long each decision takes on the
/// verdict thread itself, cold caches and all (two clock reads around it).
pub struct Timed {
    inner: Arc<dyn Decider>,
    samples: std::sync::Mutex<Vec<Duration>>,
}

impl std::fmt::Debug for Timed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timed").finish_non_exhaustive()
    }
}

impl Timed {
    /// Times `inner`.
    pub fn new(inner: Arc<dyn Decider>) -> Timed {
        Timed {
            inner,
            samples: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The decisions' durations so far, sorted.
    pub fn sorted(&self) -> Vec<Duration> {
        let mut samples = self.samples.lock().map(|samples| samples.clone()).unwrap_or_default();
        samples.sort();
        samples
    }
}

impl Decider for Timed {
    fn decide(&self, syn: &Syn) -> Verdict {
        let started = Instant::now();
        let verdict = self.inner.decide(syn);
        let elapsed = started.elapsed();
        if let Ok(mut samples) = self.samples.lock() {
            samples.push(elapsed);
        }
        verdict
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

/// CPU time of this process's threads whose name starts with `prefix`
/// (`nfqueue-` for the agent's verdict threads, `baseline-` for the nfq
/// loop's), from the scheduler's per-thread counters. It includes the
/// kernel work a thread does in its own system calls, which for a verdict
/// thread is most of it: the kernel processes a reinjected packet's path
/// inside the verdict `send`.
pub fn thread_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix)))
        .filter_map(|task| {
            let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            text.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(Duration::from_nanos)
        .sum()
}

/// The 1, 5 and 15 minute load averages, as the kernel prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Microseconds with one decimal.
pub fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}
