//! The service's long-running parts, each supervised: a part that fails is
//! started again after a pause, from what the store says.
//!
//! - three projection runners (policy, models, workloads), each the only
//!   writer of its tables, each announcing its commits to [`Dirty`];
//! - the verdict writer ([`crate::verdicts`]);
//! - the gRPC API ([`crate::api`]).

use std::sync::{Arc, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use cnnf_bus::runner::{CommitHook, HookAction, RunnerMetrics};
use cnnf_bus::topology::{self, MODELS, POLICY, WORKLOADS};
use cnnf_bus::{Projection, ProjectionRunner, RunnerConfig, RunnerHooks};
use cnnf_core::subjects::Token;
use cnnf_store::ProjectionStore;
use tokio::sync::watch;

use crate::projection::{Dirty, Feed, ModelProjection, Pending, PolicyProjection, WorkloadProjection};
use crate::verdicts::{VerdictWriter, WriterMetrics};

/// Durable consumer of this cluster's policy subjects.
pub const POLICY_DURABLE: &str = "policy-policy";
/// Durable consumer of the model stream.
pub const MODELS_DURABLE: &str = "policy-models";
/// Durable consumer of this cluster's workload subjects.
pub const WORKLOADS_DURABLE: &str = "policy-workloads";

/// Pause before a failed part starts again.
const BACKOFF: Duration = Duration::from_millis(500);

/// Completes when `stop` turns true (or its sender is gone).
pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// What every part shares.
pub struct Shared {
    /// JetStream.
    pub js: jetstream::Context,
    /// The policy store.
    pub store: Arc<dyn ProjectionStore>,
    /// Cluster of this service.
    pub cluster: Token,
    /// Marks and commits.
    pub dirty: Arc<Dirty>,
    /// Counters of the policy, models and workloads runners.
    pub metrics: [RunnerMetrics; 3],
    /// Counters of the verdict writer.
    pub writer: WriterMetrics,
    /// The key every published table is signed with.
    pub signing_key: Arc<cnnf_signing::SigningKey>,
    /// Called after each commit of the policy runner, before the ack (a
    /// test failpoint).
    pub policy_after_commit: Option<CommitHook>,
}

fn runner_config(stream: &str, durable: &str, filter: Option<String>) -> RunnerConfig {
    let mut config = match topology::consumer(durable) {
        Some(spec) => RunnerConfig::for_consumer(spec),
        None => RunnerConfig::new(stream, durable),
    };
    if let Some(filter) = filter {
        config.filter_subjects = vec![filter];
    }
    config
}

/// Runs one projection until `stop`, starting it again after a failure.
async fn supervise<P: Projection>(
    shared: Arc<Shared>,
    config: RunnerConfig,
    make: impl Fn() -> anyhow::Result<P> + Send,
    after_commit: CommitHook,
    metrics: RunnerMetrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let result = match make() {
            Ok(projection) => {
                ProjectionRunner::new(shared.js.clone(), Arc::clone(&shared.store), projection, config.clone())
                    .with_hooks(RunnerHooks {
                        after_commit: Some(Arc::clone(&after_commit)),
                    })
                    .with_metrics(metrics.clone())
                    .run(stopped(stop.clone()))
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
            Err(error) => Err(error),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(message = "Projection failed; starting it again.", durable = %config.durable, error = %format!("{error:#}"));
                tokio::select! {
                    () = stopped(stop.clone()) => return Ok(()),
                    () = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}

fn announcing(dirty: Arc<Dirty>, feed: Feed, pending: Option<Pending>, extra: Option<CommitHook>) -> CommitHook {
    Arc::new(move |committed| {
        if let Some(pending) = &pending {
            pending.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
        dirty.committed(feed, committed);
        extra.as_ref().map_or(HookAction::Continue, |hook| hook(committed))
    })
}

/// Runs the three runners.
pub async fn runners(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let cluster = shared.cluster.as_str().to_owned();
    let policy = {
        let store = Arc::clone(&shared.store);
        let dirty = Arc::clone(&shared.dirty);
        let cluster = cluster.clone();
        supervise(
            Arc::clone(&shared),
            runner_config(POLICY, POLICY_DURABLE, Some(format!("cnnf.policy.{cluster}.*"))),
            move || Ok(PolicyProjection::load(store.as_ref(), &cluster, Arc::clone(&dirty))?),
            announcing(
                Arc::clone(&shared.dirty),
                Feed::Policy,
                None,
                shared.policy_after_commit.clone(),
            ),
            shared.metrics[0].clone(),
            stop.clone(),
        )
    };
    let pending = Pending::default();
    let models = {
        let store = Arc::clone(&shared.store);
        let dirty = Arc::clone(&shared.dirty);
        let pending_for_make = Arc::clone(&pending);
        supervise(
            Arc::clone(&shared),
            runner_config(MODELS, MODELS_DURABLE, None),
            move || {
                pending_for_make.lock().unwrap_or_else(PoisonError::into_inner).clear();
                Ok(ModelProjection::new(
                    Arc::clone(&store),
                    Arc::clone(&pending_for_make),
                    Arc::clone(&dirty),
                ))
            },
            announcing(Arc::clone(&shared.dirty), Feed::Models, Some(pending), None),
            shared.metrics[1].clone(),
            stop.clone(),
        )
    };
    let workloads = {
        let dirty = Arc::clone(&shared.dirty);
        let cluster = cluster.clone();
        supervise(
            Arc::clone(&shared),
            runner_config(WORKLOADS, WORKLOADS_DURABLE, Some(format!("cnnf.workload.{cluster}.*"))),
            move || Ok(WorkloadProjection::new(&cluster, Arc::clone(&dirty))),
            announcing(Arc::clone(&shared.dirty), Feed::Workloads, None, None),
            shared.metrics[2].clone(),
            stop.clone(),
        )
    };
    let (a, b, c) = tokio::join!(policy, models, workloads);
    a.and(b).and(c)
}

/// Runs the verdict writer until `stop`, starting it again (with a
/// reconciliation) after a failure.
pub async fn verdict_writer(shared: Arc<Shared>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let result = async {
            let bucket = shared.js.get_key_value(topology::VERDICTS_BUCKET).await?;
            let mut writer = VerdictWriter::new(
                shared.js.clone(),
                bucket,
                Arc::clone(&shared.store),
                Arc::clone(&shared.dirty),
                shared.cluster.clone(),
                shared.writer.clone(),
                Arc::clone(&shared.signing_key),
            );
            writer.start().await?;
            loop {
                if *stop.borrow() {
                    return anyhow::Ok(());
                }
                writer.step().await?;
                tokio::select! {
                    () = stopped(stop.clone()) => {}
                    () = writer.wait() => {}
                }
            }
        }
        .await;
        match result {
            Ok(()) => return Ok(()),
            Err(error) => {
                tracing::warn!(message = "Verdict writer failed; starting it again.", error = %format!("{error:#}"));
                tokio::select! {
                    () = stopped(stop.clone()) => return Ok(()),
                    () = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}
