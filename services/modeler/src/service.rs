//! The service's long-running parts, each supervised: a part that fails is
//! started again after a pause, from what the store says.
//!
//! - three projection runners (workloads, flows, models), each the only
//!   writer of its tables;
//! - two outbox drainers, woken by their runner's commit hook: they publish
//!   what a committed batch derived (deterministic ids, so a republish
//!   after a crash is dropped by JetStream) and then delete it;
//! - the lock timer ([`lock_timer`]);
//! - the workloads watcher ([`watch_workloads`]), which tells the flows
//!   runner how far the workloads runner has provably got;
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

use crate::projection::{
    model_envelope, BurstLimit, FlowProjection, ModelProjection, Pending, PlacementCheck, WorkloadProjection,
};
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
/// How often the lock timer looks whether the models runner caught up at start.
const CATCH_UP_POLL: Duration = Duration::from_millis(20);

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
    /// How decisions are checked against the workloads runner's placements.
    pub placement: PlacementCheck,
    /// Longest wait of the flows runner on the workloads runner for one
    /// flow message.
    pub workloads_wait: Duration,
    /// Test hooks.
    pub options: RunOptions,
    /// Counters of the workloads, flows and models runners.
    pub metrics: [RunnerMetrics; 3],
    /// Derived model events the models runner ignored as republished.
    pub republished: prometheus_client::metrics::counter::Counter,
    /// Looks of the lock timer.
    pub timer_looks: prometheus_client::metrics::counter::Counter,
}

/// The runner settings of `durable` on `stream`, renamed
/// `<durable>-<suffix>` when the options ask for fresh durables.
fn runner_config(stream: &str, durable: &str, options: &RunOptions) -> RunnerConfig {
    let mut config = match topology::consumer(durable) {
        Some(spec) => RunnerConfig::for_consumer(spec),
        None => RunnerConfig::new(stream, durable),
    };
    if let Some(suffix) = &options.durable_suffix {
        config.durable = format!("{durable}-{suffix}");
    }
    config
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
        let mut config = runner_config(stream, durable, &shared.options);
        config.retry_limit = shared.workloads_wait;
        let runner = ProjectionRunner::new(shared.js.clone(), Arc::clone(&shared.store), make(), config)
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
    let placement = shared.placement.clone();
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
        move || FlowProjection::new(burst, period, placement.clone()),
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

/// How often the workloads watcher looks.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Keeps [`PlacementCheck::caught_up`]: every [`WATCH_INTERVAL`] it notes
/// the time, reads `CNNF_WORKLOADS`'s last sequence, and if the workloads
/// runner's store has applied through it, every workload message the
/// server received before that time is applied, so the flows runner may
/// decide flow messages received up to that time less the grace. The time
/// is this process's clock, compared with the server's receive times: the
/// grace must cover the difference between the two clocks. Without it, a
/// quiet workload stream would leave the flows runner waiting until the
/// next workload message.
pub async fn watch_workloads(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let durable = runner_config(WORKLOADS, WORKLOADS_DURABLE, &shared.options).durable;
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let last = match shared.js.get_stream(WORKLOADS).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => Some(info.state.last_sequence),
                Err(error) => {
                    tracing::warn!(message = "Workloads watcher: reading CNNF_WORKLOADS failed.", %error);
                    None
                }
            },
            Err(error) => {
                tracing::warn!(message = "Workloads watcher: reading CNNF_WORKLOADS failed.", %error);
                None
            }
        };
        if let Some(last) = last {
            if cnnf_store::applied_sequence(shared.store.as_ref(), &durable)? >= last {
                shared
                    .placement
                    .caught_up
                    .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            }
        }
        tokio::select! {
            () = stopped(stop.clone()) => return Ok(()),
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
    }
}

/// The stream sequence through which the declared consumer `durable` on
/// `stream` has acknowledged (0: there is none).
pub async fn acked_floor(js: &jetstream::Context, stream: &str, durable: &str) -> anyhow::Result<u64> {
    let stream = js
        .get_stream(stream)
        .await
        .with_context(|| format!("looking up {stream}"))?;
    match stream.consumer_info(durable).await {
        Ok(info) => Ok(info.ack_floor.stream_sequence),
        Err(error) if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(0),
        Err(error) => Err(anyhow::Error::new(error).context(format!("looking up consumer {durable}"))),
    }
}

/// Through which source sequence a drainer must not publish: nothing
/// (0), unless this store is behind what the declared consumer `durable`
/// already acknowledged, that is unless this is a rebuild (an empty store,
/// fresh durables): then the events derived from those messages are on
/// the log already (the live runner commits before it acks and its outbox
/// publishes after the commit), and the rebuild re-derives them only to
/// rebuild its own tables. A flows rebuild reads another model state than
/// the live runner read and can derive other events from the same
/// message; published, they would land at the end of the log and change
/// models the live run never changed (old traffic taught to a relearnt
/// model). The exception: a store lost with outbox entries not yet
/// published; those few derived events were never on the log.
pub async fn rebuild_floor(
    js: &jetstream::Context,
    store: &dyn ProjectionStore,
    stream: &str,
    durable: &'static str,
    options: &RunOptions,
) -> anyhow::Result<u64> {
    let floor = acked_floor(js, stream, durable).await?;
    let ours = runner_config(stream, durable, options).durable;
    let applied = cnnf_store::applied_sequence(store, &ours)?;
    Ok(if applied < floor { floor } else { 0 })
}

/// Publishes what `table` holds, then deletes it; woken by `notify` and
/// at least every second, until `stop`. Entries derived from source
/// messages at or below `skip_through` ([`rebuild_floor`]) are deleted
/// without being published.
pub async fn drain_outbox(
    shared: Arc<Shared>,
    table: &'static str,
    skip_through: u64,
    notify: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
    loop {
        if let Err(error) = drain_once(&shared, table, skip_through, &mut publisher).await {
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

async fn drain_once(
    shared: &Shared,
    table: &'static str,
    skip_through: u64,
    publisher: &mut Publisher,
) -> anyhow::Result<()> {
    loop {
        let store = Arc::clone(&shared.store);
        let entries = tokio::task::spawn_blocking(move || store.scan_prefix(table, b"", 1000)).await??;
        if entries.is_empty() {
            return Ok(());
        }
        let mut done = WriteBatch::new();
        for (key, value) in entries {
            let source = key
                .get(..8)
                .and_then(|sequence| sequence.try_into().ok())
                .map_or(u64::MAX, u64::from_be_bytes);
            if source <= skip_through {
                done.delete(table, key);
                continue;
            }
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

/// How long the lock timer waits after a look at `now`: until the
/// earliest learning end still ahead (`next_end`), at most `interval`.
pub fn next_wait(now: i64, next_end: Option<i64>, interval: Duration) -> Duration {
    match next_end {
        Some(end) if end > now => interval.min(Duration::from_nanos(u64::try_from(end - now).unwrap_or(u64::MAX))),
        _ => interval,
    }
}

/// Publishes `Locked` (reason "period-ended") for every learning model
/// whose learning period ended, until `stop`. The event's time is the end
/// of the period (event time), whenever the timer runs. Between looks it
/// sleeps until the earliest learning end still ahead, at most `interval`
/// (a model created, extended or relearnt meanwhile is seen within
/// `interval`), on the timer's runtime ([`RunOptions::timer_sleep`]), so
/// a model locks at the end of its period, not a tick later. Each look is
/// counted in `cnnf_modeler_lock_timer_looks`.
pub async fn lock_timer(shared: Arc<Shared>, interval: Duration, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
    // First the models runner applies the log as it stands: a store still
    // rebuilding shows old states (a model learning that was locked and
    // relearnt since), and a lock published from one would apply to the
    // current state.
    let models_durable = runner_config(MODELS, MODELS_DURABLE, &shared.options).durable;
    let mut caught_up_at = None;
    loop {
        let target = match caught_up_at {
            Some(target) => target,
            None => match shared.js.get_stream(MODELS).await {
                Ok(mut stream) => match stream.info().await {
                    Ok(info) => *caught_up_at.insert(info.state.last_sequence),
                    Err(error) => {
                        tracing::warn!(message = "Lock timer: reading CNNF_MODELS failed.", %error);
                        u64::MAX
                    }
                },
                Err(error) => {
                    tracing::warn!(message = "Lock timer: reading CNNF_MODELS failed.", %error);
                    u64::MAX
                }
            },
        };
        if cnnf_store::applied_sequence(shared.store.as_ref(), &models_durable)? >= target {
            break;
        }
        tokio::select! {
            () = stopped(stop.clone()) => return Ok(()),
            () = tokio::time::sleep(CATCH_UP_POLL) => {}
        }
    }
    loop {
        let now = shared.options.now();
        let wait = match lock_once(&shared, &mut publisher, now).await {
            Ok(next_end) => next_wait(now, next_end, interval),
            Err(error) => {
                tracing::warn!(message = "Lock timer failed; trying again.", error = %format!("{error:#}"));
                publisher = Publisher::new(shared.js.clone(), PublisherConfig::default());
                interval
            }
        };
        shared.timer_looks.inc();
        let sleep = shared.options.timer_sleep(wait);
        tokio::select! {
            () = stopped(stop.clone()) => return Ok(()),
            () = sleep => {}
        }
    }
}

/// One look of the lock timer at `now`: publishes the locks that are due
/// and returns the earliest learning end still ahead.
async fn lock_once(shared: &Shared, publisher: &mut Publisher, now: i64) -> anyhow::Result<Option<i64>> {
    let store = Arc::clone(&shared.store);
    let models = tokio::task::spawn_blocking(move || store.scan_prefix(store::MODELS, b"", usize::MAX)).await??;
    let mut sent = false;
    let mut next_end: Option<i64> = None;
    for (key, value) in models {
        let record: ModelRecord = store::decode("model", &value)?;
        if !lock_due(&record, now) {
            if record.learning() && record.paused_unix_nanos == 0 && record.learning_ends_unix_nanos > now {
                next_end = Some(next_end.map_or(record.learning_ends_unix_nanos, |end| {
                    end.min(record.learning_ends_unix_nanos)
                }));
            }
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
    Ok(next_end)
}
