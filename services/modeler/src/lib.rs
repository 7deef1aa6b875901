//! The CNNF modeler service: one model per image: learning, locking, and
//! every model change on the log.
//!
//! The first time an image ID is seen anywhere in the fleet (a container
//! of it starts, or a decision names it) it gets a model, learning. While it learns, the connections its containers take
//! part in are recorded on the sides that learn (a connection S → D:port
//! teaches S's outbound side only while S's model learns, and D's inbound
//! side only while D's model learns). After the learning period the model
//! locks and enforces; operators can lock early, extend, relearn and
//! delete single learned connections. Every change is a `ModelEvent` on
//! `cnnf.model.<image-id>` (stream `CNNF_MODELS`), for the policy
//! compiler, the audit service and the Radar.
//!
//! ```text
//! cnnf.workload.<c>.<n> ─► runner modeler-workloads ─► images ─► outbox ─► Created, Liveness ──────┐
//! cnnf.flow.<c>.<n>     ─► runner modeler-flows ─► (reads models) ─► outbox ─► [Created,] Learned ─┤
//!                                                      └─► burst ─► Incident                       │
//! gRPC Models.Command ─► validated ─► Locked / Extended / Relearn / Deleted ───────────────────────┤
//! lock timer (learning end reached) ─► Locked ─────────────────────────────────────────────────────┤
//!                models, learned ◄── runner modeler-models ◄── cnnf.model.<image> (CNNF_MODELS) ◄──┘
//! ```
//!
//! Why three runners and the log in the middle: the workload and flow
//! runners each commit independently, so if both wrote a model they would
//! race (read-modify-write of one key). Instead each table has one writer
//! ([`store`]), and the model itself (state *and* learned connections) is
//! written only by the runner of `CNNF_MODELS`, from the log, in log order.
//! The model set is therefore a pure function of the `CNNF_WORKLOADS` and
//! `CNNF_MODELS` logs: a replay into an empty store yields it byte for
//! byte (derived events are republished under the same deterministic ids,
//! which JetStream drops). The flow runner reads the committed model
//! state to know which sides learn; a state change takes effect from its
//! next batch, and the models runner drops learned connections whose model
//! locked meanwhile or that were first seen after learning ended.
//!
//! Times are event times (`Envelope.time_unix_nanos`): first and last
//! seen, and the learning clock. A model learns for `period` of its image
//! being alive: learning ends `period` after the image was first seen,
//! later by every pause in which none of its containers ran (the workloads
//! runner publishes `Liveness` model events when the last container stops
//! and when one starts again), and the timer never locks a model whose
//! image is not alive. The lock timer uses the wall clock only to decide
//! *when* to publish `Locked`, which carries the period's end as its event
//! time.
//!
//! `ModelEvent.revision` is left 0 by producers (they cannot know it): a
//! model's revision is the `CNNF_MODELS` stream sequence of its last
//! change, as `GetModel` and the answer to `Command` report.
//!
//! Configuration (flags, or the environment), beside what every service
//! takes (`CNNF_NATS_URL`, `CNNF_CLUSTER`, `CNNF_DATA_DIR`, ...):
//!
//! | flag | environment | default | |
//! | --- | --- | --- | --- |
//! | `--learning-seconds` | `CNNF_LEARNING_SECONDS` | 3600 | learning period of a new model (time its image is alive) |
//! | `--burst-limit` | `CNNF_BURST_LIMIT` | 50 | new connections a learning image may learn per window |
//! | `--burst-window-seconds` | `CNNF_BURST_WINDOW_SECONDS` | 10 | the burst window (the server's receive time) |
//! | `--workloads-grace-ms` | `CNNF_WORKLOADS_GRACE_MS` | 1000 | how much later than a flow message a workload message published before it may be received (and the clock difference to the NATS servers) |
//! | `--workloads-wait-seconds` | `CNNF_WORKLOADS_WAIT_SECONDS` | 120 | longest wait of the flows runner on the workloads runner for one message |
//! | `--grpc-addr` | `CNNF_GRPC_ADDR` | unix:/run/cnnf/modeler.sock | the `Models` API: `unix:<path>`, or `<ip>:<port>` with mutual TLS (`--grpc-tls-cert`, `--grpc-tls-key`, `--grpc-client-ca`; see `cnnf_service::grpc`) |
//!
//! A learning image that reaches more than `burst-limit` new peers or
//! ports (new connections) within `burst-window-seconds` of the server's
//! receive time (which a node cannot forge, unlike its decisions' times)
//! does not learn the excess; a `LEARNING_BURST` incident is published on
//! `cnnf.incident.<cluster>.learning-burst`, once per window.
//!
//! A node teaches only images it runs. The workloads runner keeps, per
//! node and image, which containers started and stopped when
//! (`modeler_placements`); the flows runner learns a decision's local end
//! (the source of an egress decision, the destination of an ingress one)
//! only if that node ran that image at the decision's time, and the
//! destination of an egress decision only if the same node runs it too. A
//! flow message claiming an image its node did not run is dead-lettered
//! as `image-not-on-node` (`cnnf_modeler_flows_dead_lettered_total{reason}`)
//! and nothing of it is learned. The two runners read different streams:
//! a flow message is decided only once the workloads runner has provably
//! applied every workload message the server received up to the flow
//! message's receive time plus `workloads-grace-ms` (its own watermark,
//! or the watcher seeing it caught up with the stream); until then the
//! flows runner commits what came before and waits on it, and only what
//! was received by then counts, so a rebuild decides the same.
//!
//! Derived events are also idempotent by their source, beyond JetStream's
//! duplicate window (10 minutes): if the flows or workloads projection is
//! rebuilt from the log later than that (an emptied store, a fresh
//! durable), its `Learned`, `Created` and `Liveness` events are published
//! again under the same ids and JetStream stores them again. The models
//! runner keeps, per image and producer stream, the highest source
//! position it applied (the `<seq>` and `<part>` of
//! `modeler:CNNF_FLOWS:<seq>:<part>` or `modeler:CNNF_WORKLOADS:<seq>[:<part>]`,
//! in `modeler_models_sources`,
//! written in the same batch as the change) and ignores a derived event at
//! or below it, so counts and learning clocks are not applied twice. Such
//! events are counted in `cnnf_modeler_models_republished_ignored`.
//!
//! The store is RocksDB at `<data dir>/models`. Each runner's counters
//! are on `/metrics` as `cnnf_modeler_{workloads,flows,models}_*`.
//!
//! Must never depend on the node agent or on another service.

#![forbid(unsafe_code)]

pub mod api;
pub mod projection;
pub mod service;
pub mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use cnnf_bus::runner::CommitHook;
use cnnf_proto::v1::models_server::ModelsServer;
use cnnf_service::grpc::{GrpcAddr, ServerTls};
use cnnf_service::{CommonConfig, Health};
use cnnf_store::ProjectionStore;
use cnnf_store_rocksdb::RocksStore;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

pub use service::{FLOWS_DURABLE, MODELS_DURABLE, WORKLOADS_DURABLE};
pub use store::{MODEL_TABLES, TABLES};

/// The service's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-modeler";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9102";

/// Default address of the `Models` gRPC API.
pub const DEFAULT_GRPC_ADDR: &str = "unix:/run/cnnf/modeler.sock";

/// Default learning period, seconds.
pub const DEFAULT_LEARNING_SECONDS: u64 = 3600;
/// Default burst limit: new connections per window.
pub const DEFAULT_BURST_LIMIT: u64 = 50;
/// Default burst window, seconds.
pub const DEFAULT_BURST_WINDOW_SECONDS: u64 = 10;
/// Default grace of the placement check, milliseconds.
pub const DEFAULT_WORKLOADS_GRACE_MS: u64 = 1000;
/// Default longest wait of the flows runner on the workloads runner, seconds.
pub const DEFAULT_WORKLOADS_WAIT_SECONDS: u64 = 120;

/// Configuration of the modeler service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cnnf-modeler",
    version,
    about = "CNNF modeler service: one model per image: learning, locking, and every model change on the log"
)]
pub struct Config {
    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
    /// Learning period of a new model, seconds from the first time its
    /// image is seen (1 to 31622400).
    #[arg(long, env = "CNNF_LEARNING_SECONDS", default_value_t = DEFAULT_LEARNING_SECONDS, value_parser = clap::value_parser!(u64).range(1..=31_622_400))]
    pub learning_seconds: u64,
    /// Most new connections a learning image learns per burst window; the
    /// excess raises a LEARNING_BURST incident (1 to 1000000).
    #[arg(long, env = "CNNF_BURST_LIMIT", default_value_t = DEFAULT_BURST_LIMIT, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub burst_limit: u64,
    /// The burst window, seconds of the server's receive time (1 to 86400).
    #[arg(long, env = "CNNF_BURST_WINDOW_SECONDS", default_value_t = DEFAULT_BURST_WINDOW_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub burst_window_seconds: u64,
    /// How much later than a flow message the server may have received a
    /// workload message its agent published before it, milliseconds (0 to
    /// 600000); must also cover the difference between this host's clock
    /// and the NATS servers'.
    #[arg(long, env = "CNNF_WORKLOADS_GRACE_MS", default_value_t = DEFAULT_WORKLOADS_GRACE_MS, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub workloads_grace_ms: u64,
    /// Longest wait of the flows runner for the workloads runner to catch
    /// up with one flow message, seconds (1 to 86400); then the message is
    /// dead-lettered as `workloads-behind`.
    #[arg(long, env = "CNNF_WORKLOADS_WAIT_SECONDS", default_value_t = DEFAULT_WORKLOADS_WAIT_SECONDS, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub workloads_wait_seconds: u64,
    /// Address of the Models gRPC API.
    #[arg(long, env = "CNNF_GRPC_ADDR", default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: GrpcAddr,
    /// How the gRPC API is protected on TCP (mutual TLS, or `--grpc-insecure`).
    #[command(flatten)]
    pub grpc_tls: ServerTls,
}

impl Config {
    /// The defaults around `common` (for the all-in-one process).
    pub fn new(common: CommonConfig) -> Self {
        Self {
            common,
            learning_seconds: DEFAULT_LEARNING_SECONDS,
            burst_limit: DEFAULT_BURST_LIMIT,
            burst_window_seconds: DEFAULT_BURST_WINDOW_SECONDS,
            workloads_grace_ms: DEFAULT_WORKLOADS_GRACE_MS,
            workloads_wait_seconds: DEFAULT_WORKLOADS_WAIT_SECONDS,
            grpc_addr: DEFAULT_GRPC_ADDR.parse().expect("the default gRPC address parses"),
            grpc_tls: ServerTls::default(),
        }
    }

    /// Where the RocksDB store lives: `<data dir>/models`.
    pub fn store_path(&self) -> PathBuf {
        self.common.data_dir.join("models")
    }
}

/// A clock in Unix nanoseconds.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Settings tests and benchmarks use; production leaves them at their defaults.
///
/// Time: the lock timer asks [`RunOptions::now`] what time it is (and the
/// API asks it when a command computes a new learning end), and it waits
/// between looks with a tokio sleep on [`RunOptions::timer_runtime`] (the
/// service's own runtime when `None`). Tests that need exact periods hand
/// in [`RunOptions::paced_by`] a runtime whose time is paused
/// (`start_paused`): the clock then reads that runtime's
/// `tokio::time::Instant` and the timer sleeps on it, so the test moves
/// time with `tokio::time::advance` and nothing else does. The NATS client,
/// the runners and the API keep running on an ordinary runtime in real
/// time (a paused runtime would fire their timeouts early), and a sleep
/// registered with the paused runtime only fires while that runtime is
/// driven, that is while the test advances it.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Called by the flows runner after each commit, before the ack: a
    /// failpoint where a crash hurts most.
    pub flows_after_commit: Option<CommitHook>,
    /// The wall clock of the lock timer and of commands (`None`: the system clock).
    pub clock: Option<Clock>,
    /// Longest wait of the lock timer between two looks (`None`: one
    /// second); it wakes earlier when a learning period ends sooner.
    pub timer_interval: Option<Duration>,
    /// The runtime whose timers pace the lock timer (`None`: the one the
    /// service runs on).
    pub timer_runtime: Option<tokio::runtime::Handle>,
    /// Run the projection runners on durables named `<durable>-<suffix>`
    /// (`None`: the declared names). A rebuild from the whole log beside
    /// the live consumers: fresh durables start at the first message.
    pub durable_suffix: Option<String>,
}

impl RunOptions {
    /// Options whose clock is the tokio clock of `runtime`, reading
    /// `anchor_unix_nanos` now and moving with it, and whose lock timer
    /// sleeps on `runtime`'s timers: with paused time, `tokio::time::advance`
    /// on `runtime` is what moves the modeler's notion of time.
    pub fn paced_by(runtime: tokio::runtime::Handle, anchor_unix_nanos: i64) -> Self {
        let start = {
            let _entered = runtime.enter();
            tokio::time::Instant::now()
        };
        let clock_runtime = runtime.clone();
        let clock: Clock = Arc::new(move || {
            let _entered = clock_runtime.enter();
            let elapsed = tokio::time::Instant::now().saturating_duration_since(start);
            anchor_unix_nanos.saturating_add(i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        });
        Self {
            clock: Some(clock),
            timer_runtime: Some(runtime),
            ..Self::default()
        }
    }

    /// Now, Unix nanoseconds.
    pub fn now(&self) -> i64 {
        match &self.clock {
            Some(clock) => clock(),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
                .unwrap_or(0),
        }
    }

    /// A sleep of `wait` on the timer's runtime.
    pub fn timer_sleep(&self, wait: Duration) -> tokio::time::Sleep {
        match &self.timer_runtime {
            Some(runtime) => {
                let _entered = runtime.enter();
                tokio::time::sleep(wait)
            }
            None => tokio::time::sleep(wait),
        }
    }
}

/// Opens the modeler store at `path` (creating it).
pub fn open_store(path: &std::path::Path) -> anyhow::Result<RocksStore> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    RocksStore::open(path, TABLES).with_context(|| format!("opening the modeler store at {}", path.display()))
}

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Not ready while the store opens (run_with_store takes the flag up).
    let _starting = health.component(NAME);
    let path = config.store_path();
    let store = tokio::task::spawn_blocking(move || open_store(&path)).await??;
    run_with_store(config, Arc::new(store), health, RunOptions::default(), shutdown).await
}

/// Runs the service on an open store until `shutdown` completes: the
/// runners, the outbox drainers, the lock timer and the gRPC API.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn ProjectionStore>,
    health: Health,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ready = health.component(NAME);
    let listener = cnnf_service::grpc::Listener::bind(&config.grpc_addr, &config.grpc_tls).await?;
    let js = cnnf_service::connect_and_ensure(NAME, &config.common).await?;
    let timer_interval = options.timer_interval.unwrap_or(Duration::from_secs(1));
    let metrics: [cnnf_bus::runner::RunnerMetrics; 3] = Default::default();
    let republished = prometheus_client::metrics::counter::Counter::default();
    let timer_looks = prometheus_client::metrics::counter::Counter::default();
    health.register(|registry| {
        registry.register(
            "cnnf_modeler_lock_timer_looks",
            "Times the lock timer looked for models whose learning period ended",
            timer_looks.clone(),
        );
        registry.register(
            "cnnf_modeler_models_republished_ignored",
            "Derived model events the models runner ignored: already applied (republished after the duplicate window)",
            republished.clone(),
        );
        for (runner, prefix) in
            metrics
                .iter()
                .zip(["cnnf_modeler_workloads", "cnnf_modeler_flows", "cnnf_modeler_models"])
        {
            runner.register(registry, prefix);
        }
    });
    let shared = Arc::new(service::Shared {
        js: js.clone(),
        store: Arc::clone(&store),
        cluster: config.common.cluster.clone(),
        learning_period: Duration::from_secs(config.learning_seconds),
        burst: projection::BurstLimit {
            limit: config.burst_limit,
            window: Duration::from_secs(config.burst_window_seconds),
        },
        placement: projection::PlacementCheck {
            caught_up: Default::default(),
            grace: Duration::from_millis(config.workloads_grace_ms),
        },
        workloads_wait: Duration::from_secs(config.workloads_wait_seconds),
        options: options.clone(),
        metrics,
        republished,
        timer_looks,
    });
    let js_for_floors = js.clone();
    let options_for_floors = options.clone();
    let api = api::ModelsApi::new(
        Arc::clone(&store),
        js,
        config.common.cluster.clone(),
        config.learning_seconds,
        options,
    );

    let workloads_skip = service::rebuild_floor(
        &js_for_floors,
        store.as_ref(),
        cnnf_bus::topology::WORKLOADS,
        WORKLOADS_DURABLE,
        &options_for_floors,
    )
    .await?;
    let flows_skip = service::rebuild_floor(
        &js_for_floors,
        store.as_ref(),
        cnnf_bus::topology::FLOWS,
        FLOWS_DURABLE,
        &options_for_floors,
    )
    .await?;
    if workloads_skip > 0 || flows_skip > 0 {
        tracing::info!(
            message = "Rebuilding: derived events of messages the live runners acknowledged are not published again.",
            workloads_through = workloads_skip,
            flows_through = flows_skip
        );
    }

    let listener_addr = listener.addr().clone();
    let (stop, stopping) = watch::channel(false);
    let workloads_notify = Arc::new(Notify::new());
    let flows_notify = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_api(listener, api, stopping.clone()));
    tasks.spawn(service::runners(
        Arc::clone(&shared),
        [Arc::clone(&workloads_notify), Arc::clone(&flows_notify)],
        stopping.clone(),
    ));
    tasks.spawn(service::drain_outbox(
        Arc::clone(&shared),
        store::WORKLOADS_OUTBOX,
        workloads_skip,
        workloads_notify,
        stopping.clone(),
    ));
    tasks.spawn(service::drain_outbox(
        Arc::clone(&shared),
        store::FLOWS_OUTBOX,
        flows_skip,
        flows_notify,
        stopping.clone(),
    ));
    tasks.spawn(service::watch_workloads(Arc::clone(&shared), stopping.clone()));
    tasks.spawn(service::lock_timer(shared, timer_interval, stopping));
    ready.set(true);
    tracing::info!(
        message = "Service started.",
        service = NAME,
        cluster = %config.common.cluster,
        grpc_addr = %listener_addr,
        learning_seconds = config.learning_seconds,
        burst_limit = config.burst_limit,
        burst_window_seconds = config.burst_window_seconds
    );

    let result = cnnf_service::run_parts(tasks, stop, shutdown).await;
    tracing::info!(message = "Service stopped.", service = NAME);
    result
}

async fn serve_api(
    listener: cnnf_service::grpc::Listener,
    api: api::ModelsApi,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let addr = listener.addr().clone();
    tracing::info!(message = "Serving the Models gRPC API.", %addr);
    tonic::transport::Server::builder()
        .add_service(ModelsServer::new(api))
        .serve_with_incoming_shutdown(listener.incoming(), service::stopped(stop))
        .await
        .with_context(|| format!("serving gRPC on {addr}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_match_the_all_in_one_constructor() {
        let parsed = Config::try_parse_from(["cnnf-modeler"]).unwrap();
        let built = Config::new(parsed.common.clone());
        assert_eq!(parsed.learning_seconds, built.learning_seconds);
        assert_eq!(parsed.burst_limit, built.burst_limit);
        assert_eq!(parsed.burst_window_seconds, built.burst_window_seconds);
        assert_eq!(parsed.workloads_grace_ms, built.workloads_grace_ms);
        assert_eq!(parsed.workloads_wait_seconds, built.workloads_wait_seconds);
        assert_eq!(parsed.grpc_addr, built.grpc_addr);
        assert_eq!(parsed.grpc_addr.to_string(), DEFAULT_GRPC_ADDR);
        assert!(!parsed.grpc_tls.grpc_insecure);
        assert_eq!(parsed.learning_seconds, 3600);
        assert_eq!((parsed.burst_limit, parsed.burst_window_seconds), (50, 10));
    }

    #[test]
    fn bad_flags_are_refused_with_their_name() {
        for (flag, value) in [
            ("--learning-seconds", "0"),
            ("--learning-seconds", "soon"),
            ("--burst-limit", "0"),
            ("--burst-window-seconds", "-1"),
            ("--workloads-grace-ms", "600001"),
            ("--workloads-wait-seconds", "0"),
            ("--grpc-addr", "localhost"),
        ] {
            let argument = format!("{flag}={value}");
            let error = Config::try_parse_from(["cnnf-modeler", &argument])
                .unwrap_err()
                .to_string();
            assert!(error.contains(flag), "{flag} {value}: {error}");
        }
    }

    #[test]
    fn the_timer_waits_while_the_image_is_not_alive() {
        let paused = store::ModelRecord {
            state: cnnf_proto::v1::ModelState::Learning as i32,
            learning_ends_unix_nanos: 1_000,
            paused_unix_nanos: 500,
            ..store::ModelRecord::default()
        };
        assert!(!service::lock_due(&paused, 5_000));
        // Died after the period ended: the lock is due all the same.
        let late = store::ModelRecord {
            paused_unix_nanos: 1_000,
            ..paused
        };
        assert!(service::lock_due(&late, 1_000));
    }

    #[test]
    fn the_timer_sleeps_until_the_earliest_end_at_most_its_interval() {
        let second = Duration::from_secs(1);
        assert_eq!(service::next_wait(100, Some(101), second), Duration::from_nanos(1));
        assert_eq!(service::next_wait(100, Some(100 + 5_000_000_000), second), second);
        assert_eq!(service::next_wait(100, Some(100), second), second, "due: applied soon");
        assert_eq!(service::next_wait(100, None, second), second);
    }

    #[test]
    fn source_positions_order_by_sequence_then_part() {
        let stored = store::encode_source(7, 3);
        assert_eq!(store::decode_source(&stored), Some((7, 3)));
        assert!(store::decode_source(&stored).unwrap() < (7, 4));
        assert!(store::decode_source(&stored).unwrap() > (6, u32::MAX));
        // A bare sequence (stored before parts were) covers every part.
        assert_eq!(store::decode_source(&cnnf_store::encode_u64(7)), Some((7, u32::MAX)));
        assert_eq!(store::decode_source(b"short"), None);
    }

    #[test]
    fn the_timer_locks_exactly_at_the_end_and_not_before() {
        let record = store::ModelRecord {
            state: cnnf_proto::v1::ModelState::Learning as i32,
            learning_ends_unix_nanos: 1_000,
            ..store::ModelRecord::default()
        };
        assert!(!service::lock_due(&record, 999));
        assert!(service::lock_due(&record, 1_000));
        let enforcing = store::ModelRecord {
            state: cnnf_proto::v1::ModelState::Enforcing as i32,
            ..record.clone()
        };
        assert!(!service::lock_due(&enforcing, 2_000));
        assert_eq!(service::lock_id("img", &record), service::lock_id("img", &record));
    }
}
