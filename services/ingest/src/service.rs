//! The service's long-running parts, each supervised: a part that fails is
//! started again after a growing pause, from what the store says.
//!
//! - the workload runner and the KV writer, as a pair: the runner's commit
//!   hook wakes the writer; a failure of either stops both (the runner
//!   gracefully, so that no store write is left in flight) and both start
//!   again, the writer with a reconciliation;
//! - the heartbeat runner;
//! - the liveness monitor ([`crate::liveness`]);
//! - the gRPC API ([`crate::api`]).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use cnnf_bus::runner::{CommitHook, HookAction};
use cnnf_bus::topology::{self, HEARTBEATS, IDENTITIES_BUCKET, WORKLOADS};
use cnnf_bus::{ProjectionRunner, RunnerConfig, RunnerHooks};
use cnnf_proto::v1::identity_registry_server::IdentityRegistryServer;
use cnnf_service::Readiness;
use cnnf_store::{applied_sequence, ProjectionStore};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::api::RegistryApi;
use crate::kv::{Changes, KvWriter};
use crate::metrics::Metrics;
use crate::projection::{HeartbeatProjection, WorkloadProjection};
use crate::registry::Pending;
use crate::RunOptions;

/// Durable consumer of the workload stream.
pub const WORKLOADS_DURABLE: &str = "ingest-workloads";
/// Durable consumer of the heartbeat stream.
pub const HEARTBEATS_DURABLE: &str = "ingest-heartbeats";

/// First pause before a failed part starts again.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest pause.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A part that ran this long before failing starts again at once.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// What every part shares.
pub struct Shared {
    /// JetStream.
    pub js: jetstream::Context,
    /// The ingest store.
    pub store: Arc<dyn ProjectionStore>,
    /// Counters.
    pub metrics: Metrics,
    /// Largest agent event accepted.
    pub max_event_bytes: usize,
    /// Set while the KV bucket is reconciled with the registry.
    pub registry_live: Arc<AtomicBool>,
    /// The service's readiness: set once the KV bucket is current.
    pub ready: Readiness,
    /// Test hooks.
    pub options: RunOptions,
}

impl Shared {
    fn runner_config(&self, stream: &str, durable: &str) -> RunnerConfig {
        let mut config = match topology::consumer(durable) {
            Some(spec) => RunnerConfig::for_consumer(spec),
            None => RunnerConfig::new(stream, durable),
        };
        config.max_message_bytes = self.max_event_bytes;
        config
    }
}

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Pauses that double after each failure.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: FIRST_BACKOFF }
    }

    /// Notes that a part failed after running `ran`, then waits. Returns
    /// false when `stop` turned true meanwhile.
    async fn pause(&mut self, ran: Duration, stop: &watch::Receiver<bool>) -> bool {
        if ran >= HEALTHY_RUN {
            self.next = FIRST_BACKOFF;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        tokio::select! {
            () = stopped(stop.clone()) => false,
            () = tokio::time::sleep(delay) => true,
        }
    }
}

/// Runs the workload runner and the KV writer until `stop`, starting them
/// again after any failure.
pub async fn workloads(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let changes = Arc::new(Changes::default());
    let mut writer = None;
    let mut backoff = Backoff::new();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match workloads_once(&shared, &changes, &mut writer, &stop).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(
                    message = "Workload projection failed; starting it again.",
                    durable = WORKLOADS_DURABLE,
                    error = %format!("{error:#}")
                );
                if !backoff.pause(started.elapsed(), &stop).await {
                    return Ok(());
                }
            }
        }
    }
}

async fn workloads_once(
    shared: &Shared,
    changes: &Arc<Changes>,
    writer: &mut Option<KvWriter>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let writer = match writer {
        Some(writer) => writer,
        None => {
            let bucket = shared
                .js
                .get_key_value(IDENTITIES_BUCKET)
                .await
                .with_context(|| format!("opening KV bucket {IDENTITIES_BUCKET}"))?;
            writer.insert(KvWriter::new(
                shared.js.clone(),
                bucket,
                Arc::clone(&shared.store),
                Arc::clone(changes),
                shared.metrics.clone(),
                Arc::clone(&shared.registry_live),
            ))
        }
    };
    let store = Arc::clone(&shared.store);
    let applied = tokio::task::spawn_blocking(move || applied_sequence(store.as_ref(), WORKLOADS_DURABLE)).await??;
    writer.restart(applied).await?;

    let pending = Arc::new(Mutex::new(Pending::default()));
    let hook: CommitHook = {
        let pending = Arc::clone(&pending);
        let changes = Arc::clone(changes);
        let extra = shared.options.after_commit.clone();
        Arc::new(move |committed| {
            // The batch is in the store: scans see it without the overlay.
            pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
            changes.committed(committed);
            extra.as_ref().map_or(HookAction::Continue, |hook| hook(committed))
        })
    };
    let projection = WorkloadProjection::new(
        Arc::clone(&shared.store),
        pending,
        Arc::clone(changes),
        shared.metrics.clone(),
        WORKLOADS_DURABLE,
    );
    let runner = ProjectionRunner::new(
        shared.js.clone(),
        Arc::clone(&shared.store),
        projection,
        shared.runner_config(WORKLOADS, WORKLOADS_DURABLE),
    )
    .with_hooks(RunnerHooks {
        after_commit: Some(hook),
    })
    .with_metrics(shared.metrics.workloads.clone());

    // The runner stops on the service's stop, or when the writer failed.
    let (quit, quitted) = oneshot::channel::<()>();
    let until = {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = stopped(stop) => {}
                _ = quitted => {}
            }
        }
    };
    // In a set, so that the runner dies with this future (a crash).
    let mut task = JoinSet::new();
    task.spawn(runner.run(until));
    loop {
        tokio::select! {
            Some(joined) = task.join_next() => {
                joined.context("workload runner task")?.context("workload runner")?;
                // Stopped cleanly after committing the batch in hand.
                writer.step().await?;
                return writer.flush().await;
            }
            () = writer.wait() => {}
        }
        if let Err(error) = writer.step().await {
            let _ = quit.send(());
            // Let the runner finish its store write before anything restarts.
            let _ = task.join_next().await;
            return Err(error);
        }
        if writer.is_live() {
            shared.ready.set(true);
        }
    }
}

/// Runs the heartbeat runner until `stop`, starting it again after any
/// failure.
pub async fn heartbeats(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut backoff = Backoff::new();
    loop {
        let started = Instant::now();
        let runner = ProjectionRunner::new(
            shared.js.clone(),
            Arc::clone(&shared.store),
            HeartbeatProjection::new(shared.metrics.clone(), HEARTBEATS_DURABLE),
            shared.runner_config(HEARTBEATS, HEARTBEATS_DURABLE),
        )
        .with_metrics(shared.metrics.heartbeats.clone());
        match runner.run(stopped(stop.clone())).await {
            Ok(_) => return Ok(()),
            Err(error) => {
                tracing::warn!(
                    message = "Heartbeat projection failed; starting it again.",
                    durable = HEARTBEATS_DURABLE,
                    %error
                );
                if !backoff.pause(started.elapsed(), &stop).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Serves the gRPC API on `listener` until `stop`.
pub async fn serve_api(
    listener: cnnf_service::grpc::Listener,
    store: Arc<dyn ProjectionStore>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let addr = listener.addr().clone();
    tracing::info!(message = "Serving the IdentityRegistry gRPC API.", %addr);
    tonic::transport::Server::builder()
        .add_service(IdentityRegistryServer::new(RegistryApi::new(store)))
        .serve_with_incoming_shutdown(listener.incoming(), stopped(stop))
        .await
        .with_context(|| format!("serving gRPC on {addr}"))
}
