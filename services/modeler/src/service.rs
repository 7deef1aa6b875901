//! The service's long-running parts, each supervised: a part that fails is
//! started again after a pause, from what the store says.
//!
//! - three projection runners (workloads, flows, models), each the only
//!   writer of its tables;
//! - two outbox drainers, woken by their runner's commit hook: they publish
//!   what a committed batch derived (deterministic ids, so a republish
//!   after a crash is dropped by JetStream) and then delete it;
//! - the lock timer ([`lock_timer`]);
//! - the gRPC API ([`crate::api`]).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use cnnf_bus::runner::{CommitHook, HookAction, RunnerMetrics};
use cnnf_bus::topology::{self, FLOWS, MODELS, WORKLOADS};
use cnnf_bus::{Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig, RunnerHooks};
use cnnf_proto::v1::{model_event, ModelEvent};
use cnnf_store::{ProjectionStore, WriteBatch};
use tokio::sync::{watch, Notify};

use crate::projection::{model_envelope, BurstLimit, FlowProjection, ModelProjection, Pending, WorkloadProjection};
use crate::store::{self, ModelRecord, OutboxMessage};
use crate::RunOptions;

/// Durable consumer of the workload stream.
pub const WORKLOADS_DURABLE: &str = "modeler-workloads";
/// Durable consumer of the flow stream.
pub const FLOWS_DURABLE: &str = "modeler-flows";
/// Durable consumer of the model stream (the modeler's own state machine).
pub const MODELS_DURABLE: &str = "modeler-models";
/// Actor of locks the timer publishes.
pub const ACTOR_TIMER: &str = "timer";

/// Pause before a failed part starts again.
const BACKOFF: Duration = Duration::from_millis(500);
/// Outboxes are drained at least this often, even without a commit.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// What every part shares.
pub struct Shared {
    /// JetStream.
    pub js: jetstream::Context,
    /// The modeler store.
    pub store: Arc<dyn ProjectionStore>,
    /// Cluster of this service.
    pub cluster: String,
    /// Learning period of new models.
    pub learning_period: Duration,
    /// Burst limits.
    pub burst: BurstLimit,
    /// Test hooks.
    pub options: RunOptions,
    /// Counters of the workloads, flows and models runners.
    pub metrics: [RunnerMetrics; 3],
    /// Derived model events the models runner ignored as republished.
    pub republished: prometheus_client::metrics::counter::Counter,
}

fn runner_config(stream: &str, durable: &str) -> RunnerConfig {
    match topology::consumer(durable) {
        Some(spec) => RunnerConfig::for_consumer(spec),
        None => RunnerConfig::new(stream, durable),
    }
}

/// Runs one projection until `stop`, starting it again after a failure.
/// `make` builds a fresh projection for each start; `notify` is woken
/// after each commit.
pub async fn supervise_runner<P: Projection>(
    shared: Arc<Shared>,
    stream: &'static str,
    durable: &'static str,
    make: impl Fn() -> P + Send,
    after_commit: Option<CommitHook>,
    metrics: RunnerMetrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let runner = ProjectionRunner::new(
            shared.js.clone(),
            Arc::clone(&shared.store),
            make(),
            runner_config(stream, durable),
        )
        .with_hooks(RunnerHooks {
            after_commit: after_commit.clone(),
        })
        .with_metrics(metrics.clone());
        match runner.run(stopped(stop.clone())).await {
            Ok(_) => return Ok(()),
            Err(error) => {
                tracing::warn!(message = "Projection failed; starting it again.", durable, %error);
                tokio::select! {
                    () = stopped(stop.clone()) => return Ok(()),
                    () = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}

/// A commit hook that wakes `notify`, then calls `extra` (a test failpoint).
pub fn waking_hook(notify: Arc<Notify>, extra: Option<CommitHook>, pending: Option<Pending>) -> CommitHook {
    Arc::new(move |committed| {
        if let Some(pending) = &pending {
            pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        notify.notify_one();
        extra.as_ref().map_or(HookAction::Continue, |hook| hook(committed))
    })
}

/// Runs the three runners.
pub async fn runners(shared: Arc<Shared>, notify: [Arc<Notify>; 2], stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let [workloads_notify, flows_notify] = notify;
    let period = shared.learning_period;
    let burst = shared.burst;
    let workloads = supervise_runner(
        Arc::clone(&shared),
        WORKLOADS,
        WORKLOADS_DURABLE,
        move || WorkloadProjection::new(period),
        Some(waking_hook(workloads_notify, None, None)),
        shared.metrics[0].clone(),
        stop.clone(),
    );
    let flows = supervise_runner(
        Arc::clone(&shared),
        FLOWS,
        FLOWS_DURABLE,
        move || FlowProjection::new(burst),
        Some(waking_hook(
            flows_notify,
            shared.options.flows_after_commit.clone(),
            None,
        )),
        shared.metrics[1].clone(),
        stop.clone(),
    );
    let pending: Pending = Pending::default();
    let republished = shared.republished.clone();
    let models = {
        let store = Arc::clone(&shared.store);
        let pending_for_make = Arc::clone(&pending);
        supervise_runner(
            Arc::clone(&shared),
            MODELS,
            MODELS_DURABLE,
            move || {
                pending_for_make.lock().unwrap_or_else(PoisonError::into_inner).clear();
                ModelProjection::new(Arc::clone(&store), Arc::clone(&pending_for_make))
                    .with_republished(republished.clone())
            },
            Some(waking_hook(Arc::new(Notify::new()), None, Some(pending))),
            shared.metrics[2].clone(),
            stop.clone(),
        )
    };
    let (a, b, c) = tokio::join!(workloads, flows, models);
    a.and(b).and(c)
}

/// Publishes what `table` holds, then deletes it; woken by `notify` and
/// at least every second, until `stop`.
pub async fn drain_outbox(
    shared: Arc<Shared>,
    table: &'static str,
    notify: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
    loop {
        if let Err(error) = drain_once(&shared, table, &mut publisher).await {
            tracing::warn!(message = "Publishing the outbox failed; trying again.", table, error = %format!("{error:#}"));
            publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
        }
        tokio::select! {
            () = stopped(stop.clone()) => {
                // What is left is published at the next start.
                return Ok(());
            }
            () = notify.notified() => {}
            () = tokio::time::sleep(DRAIN_INTERVAL) => {}
        }
    }
}

async fn drain_once(shared: &Shared, table: &'static str, publisher: &mut Publisher) -> anyhow::Result<()> {
    loop {
        let store = Arc::clone(&shared.store);
        let entries = tokio::task::spawn_blocking(move || store.scan_prefix(table, b"", 1000)).await??;
        if entries.is_empty() {
            return Ok(());
        }
        let mut done = WriteBatch::new();
        for (key, value) in entries {
            let message: OutboxMessage = store::decode("outbox message", &value)?;
            publisher
                .publish(message.into())
                .await
                .context("publishing a derived event")?;
            done.delete(table, key);
        }
        publisher.flush().await.context("publishing derived events")?;
        let store = Arc::clone(&shared.store);
        tokio::task::spawn_blocking(move || store.write(done)).await??;
    }
}

/// True when a learning model must lock at `now`: exactly at the end of
/// its period, not before, and not while its image is not alive (unless
/// the image died after the period ended).
pub fn lock_due(record: &ModelRecord, now: i64) -> bool {
    let ends = record.learning_ends_unix_nanos;
    record.learning() && now >= ends && (record.paused_unix_nanos == 0 || record.paused_unix_nanos >= ends)
}

/// Id of the timer's lock of a model in the state `record`: the same for
/// every tick that sees that state, so JetStream keeps one.
pub fn lock_id(image_id: &str, record: &ModelRecord) -> String {
    format!(
        "{}-timer:{image_id}:{}:{}",
        crate::projection::PRODUCER,
        record.generation,
        record.learning_ends_unix_nanos
    )
}

/// Publishes `Locked` (reason "period-ended") for every learning model
/// whose learning period ended, every `interval`, until `stop`. The event's
/// time is the end of the period (event time), whenever the timer runs.
pub async fn lock_timer(shared: Arc<Shared>, interval: Duration, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
    loop {
        let now = shared.options.now();
        if let Err(error) = lock_once(&shared, &mut publisher, now).await {
            tracing::warn!(message = "Lock timer failed; trying again.", error = %format!("{error:#}"));
            publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
        }
        tokio::select! {
            () = stopped(stop.clone()) => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn lock_once(shared: &Shared, publisher: &mut Publisher, now: i64) -> anyhow::Result<()> {
    let store = Arc::clone(&shared.store);
    let models = tokio::task::spawn_blocking(move || store.scan_prefix(store::MODELS, b"", usize::MAX)).await??;
    let mut sent = false;
    for (key, value) in models {
        let record: ModelRecord = store::decode("model", &value)?;
        if !lock_due(&record, now) {
            continue;
        }
        let image_id = String::from_utf8_lossy(&key).into_owned();
        let id = lock_id(&image_id, &record);
        let event = ModelEvent {
            image_id: image_id.clone(),
            revision: 0,
            actor: ACTOR_TIMER.to_owned(),
            change: Some(model_event::Change::Locked(model_event::Locked {
                reason: "period-ended".to_owned(),
            })),
        };
        let message = model_envelope(&shared.cluster, &id, record.learning_ends_unix_nanos, event)?;
        tracing::info!(message = "Learning period ended: locking the model.", image = %image_id);
        publisher.publish(message.into()).await?;
        sent = true;
    }
    if sent {
        publisher.flush().await?;
    }
    Ok(())
}
