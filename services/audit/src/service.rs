//! The service's long-running parts, each supervised: a part that fails is
//! started again after a pause, from what the store says.
//!
//! - four projection runners (flows, workloads, policy, models), each the
//!   only writer of its tables;
//! - the outbox drainer, woken by the flows runner's commit hook: it
//!   publishes committed audits and incidents under their deterministic ids
//!   (JetStream drops a republished copy), then each audit's JSON twin on
//!   core NATS, then deletes them;
//! - the gRPC API ([`crate::api`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use cnnf_bus::runner::{CommitHook, HookAction, RunnerMetrics};
use cnnf_bus::topology;
use cnnf_bus::{Projection, ProjectionRunner, Publisher, PublisherConfig, RunnerConfig, RunnerHooks};
use cnnf_proto::v1::{envelope::Payload, Envelope};
use cnnf_store::{ProjectionStore, WriteBatch};
use prost::Message as _;
use tokio::sync::{watch, Notify};

use crate::audit::{json_subject, JsonAudit};
use crate::store::{self, OutboxMessage};

/// Pause before a failed part starts again.
const BACKOFF: Duration = Duration::from_millis(500);
/// The outbox is drained at least this often, even without a commit.
const DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn runner_config(stream: &str, durable: &str) -> RunnerConfig {
    match topology::consumer(durable) {
        Some(spec) => RunnerConfig::for_consumer(spec),
        None => RunnerConfig::new(stream, durable),
    }
}

/// Runs one projection until `stop`, starting it again after a failure.
/// `make` builds a fresh projection (from the committed store) for each start.
#[allow(clippy::too_many_arguments)]
pub async fn supervise_runner<P: Projection>(
    js: jetstream::Context,
    store: Arc<dyn ProjectionStore>,
    stream: &'static str,
    durable: &'static str,
    make: impl Fn() -> anyhow::Result<P> + Send,
    after_commit: Option<CommitHook>,
    metrics: RunnerMetrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let result = match make() {
            Ok(projection) => ProjectionRunner::new(
                js.clone(),
                Arc::clone(&store),
                projection,
                runner_config(stream, durable),
            )
            .with_hooks(RunnerHooks {
                after_commit: after_commit.clone(),
            })
            .with_metrics(metrics.clone())
            .run(stopped(stop.clone()))
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(message = "Projection failed; starting it again.", durable, error = %format!("{error:#}"));
                tokio::select! {
                    () = stopped(stop.clone()) => return Ok(()),
                    () = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}

/// A commit hook that wakes `notify`, then calls `extra` (a test failpoint).
pub fn waking_hook(notify: Arc<Notify>, extra: Option<CommitHook>) -> CommitHook {
    Arc::new(move |committed| {
        notify.notify_one();
        extra.as_ref().map_or(HookAction::Continue, |hook| hook(committed))
    })
}

/// Publishes what the outbox holds, then deletes it; woken by `notify`
/// and at least every second, until `stop`.
pub async fn drain_outbox(
    js: jetstream::Context,
    store: Arc<dyn ProjectionStore>,
    notify: Arc<Notify>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(js.clone(), PublisherConfig::default());
    loop {
        if let Err(error) = drain_once(&js, &store, &mut publisher).await {
            tracing::warn!(message = "Publishing the outbox failed; trying again.", error = %format!("{error:#}"));
            publisher = Publisher::new(js.clone(), PublisherConfig::default());
        }
        tokio::select! {
            () = stopped(stop.clone()) => return Ok(()),
            () = notify.notified() => {}
            () = tokio::time::sleep(DRAIN_INTERVAL) => {}
        }
    }
}

async fn drain_once(
    js: &jetstream::Context,
    store: &Arc<dyn ProjectionStore>,
    publisher: &mut Publisher,
) -> anyhow::Result<()> {
    let client = js.client();
    loop {
        let reader = Arc::clone(store);
        let entries = tokio::task::spawn_blocking(move || reader.scan_prefix(store::OUTBOX, b"", 1000)).await??;
        if entries.is_empty() {
            return Ok(());
        }
        let mut done = WriteBatch::new();
        let mut twins = Vec::new();
        for (key, value) in entries {
            let message: OutboxMessage = store::decode("outbox message", &value)?;
            if let Ok(Envelope {
                payload: Some(Payload::Audit(audit)),
                ..
            }) = Envelope::decode(message.payload.as_slice())
            {
                twins.push((json_subject(&audit)?, serde_json::to_vec(&JsonAudit::from(&audit))?));
            }
            publisher
                .publish(message.into())
                .await
                .context("publishing an audit or incident")?;
            done.delete(store::OUTBOX, key);
        }
        publisher.flush().await.context("publishing audits and incidents")?;
        for (subject, json) in twins {
            client
                .publish(subject, json.into())
                .await
                .context("publishing a JSON twin")?;
        }
        client.flush().await.context("publishing JSON twins")?;
        let writer = Arc::clone(store);
        tokio::task::spawn_blocking(move || writer.write(done)).await??;
    }
}
