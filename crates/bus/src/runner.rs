//! The projection runner: a stream folded into a store exactly once.
//!
//! ```text
//! durable pull consumer ─► batch of messages ─► decode + origin check ─► Projection::apply (Txn)
//!        ▲                                         │ rejected                     │ not yet
//!        │                                         ▼                              ▼
//!        │                           cnnf.dlq.<durable> (published, acked first)  commit what came
//!        │                                                                         before; redeliver
//!        └── ack (AckAll, last of batch) ◄── ONE store write: changes + applied sequence
//! ```
//!
//! Before a projection sees a message, the runner checks it as every
//! consumer must ([`cnnf_core::envelope`]): size, protobuf, schema
//! version, payload, and that the envelope names the cluster (and node)
//! its subject names (`origin-mismatch`). A projection can answer
//! [`ApplyError::NotYet`] for an event it cannot decide before another
//! projection caught up: the runner commits the batch up to the message
//! before it, waits (20 ms, doubling, at most a second) and has the
//! consumer deliver again from there; past [`RunnerConfig::retry_limit`]
//! of waiting on the same message it dead-letters it with the reason the
//! projection gave.
//!
//! The store, not the consumer, is the truth about progress: each batch's
//! changes and the last stream sequence it covered go into one atomic
//! write, and a message at or below that sequence is skipped. A crash
//! anywhere (before the write, or between the write and the ack) therefore
//! neither loses nor double-counts. At start-up the durable consumer is
//! repositioned to the first sequence after the stored one unless it is
//! exactly there with nothing in flight, so uncommitted deliveries are
//! redelivered in order. While running, the runner checks that delivery
//! sequences have no gap: a gap means a delivery went elsewhere (a pull
//! request left over from a crashed incarnation), and since an ack of a
//! later message would ack it too, the runner commits what it has and
//! repositions instead. One runner owns one durable consumer and its store;
//! scale out by splitting subjects across durables.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, Message};
use cnnf_core::envelope::{self, Rejection};
use cnnf_proto::v1::Envelope;
use cnnf_store::{
    applied_key, applied_sequence, dead_letter_key, encode_u64, ProjectionStore, StoreError, Txn, META_TABLE,
};
use futures::future::FutureExt;
use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::topology::ConsumerSpec;

/// Header of a dead-lettered message: the short reason code.
pub const DLQ_REASON: &str = "Cnnf-Dlq-Reason";
/// Header of a dead-lettered message: the full reason.
pub const DLQ_DETAIL: &str = "Cnnf-Dlq-Detail";
/// Header of a dead-lettered message: the subject it came on.
pub const DLQ_SUBJECT: &str = "Cnnf-Dlq-Subject";
/// Header of a dead-lettered message: its stream and sequence.
pub const DLQ_SOURCE: &str = "Cnnf-Dlq-Source";

/// One accepted message, as a projection sees it.
#[derive(Debug)]
pub struct Event<'a> {
    /// Subject the message came on (the gate compares it with the event's
    /// own cluster and node).
    pub subject: &'a str,
    /// Its sequence in the stream.
    pub stream_sequence: u64,
    /// When the server stored it (Unix nanoseconds, the server's clock):
    /// a time the publisher cannot forge, unlike the envelope's own.
    pub received_unix_nanos: i64,
    /// The decoded, version- and origin-checked envelope.
    pub envelope: Envelope,
}

/// Why a projection did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event is wrong: dead-letter it, keep none of its changes, go on.
    #[error("rejected: {0}")]
    Reject(Rejection),
    /// The event cannot be decided yet (what it must be checked against,
    /// another projection, has not caught up): keep none of its changes,
    /// commit what came before it, and deliver it again later. Past the
    /// runner's retry limit it is dead-lettered with this rejection.
    #[error("not yet decidable: {0}")]
    NotYet(Rejection),
    /// The store failed: stop; nothing of the batch is committed or acked.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fold of events into a store.
pub trait Projection: Send + 'static {
    /// Applies one event through `txn`. Changes are committed with the
    /// rest of the batch; on `Err(Reject)` they are discarded.
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError>;
}

/// Settings of a runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Stream to read.
    pub stream: String,
    /// Durable consumer name; also the key of the applied sequence.
    pub durable: String,
    /// Subjects to read (empty: the whole stream).
    pub filter_subjects: Vec<String>,
    /// Most messages committed in one store write.
    pub batch_size: usize,
    /// How long to wait for more messages before committing a partial
    /// batch. Zero (the default) commits as soon as nothing more is
    /// buffered: batches grow with the load and latency stays low when idle.
    pub batch_wait: Duration,
    /// Larger messages are dead-lettered as oversized.
    pub max_message_bytes: usize,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    /// Longest wait on one message the projection answers
    /// [`ApplyError::NotYet`] for; then it is dead-lettered.
    pub retry_limit: Duration,
}

impl RunnerConfig {
    /// Defaults for a declared consumer.
    pub fn for_consumer(spec: &ConsumerSpec) -> Self {
        Self {
            stream: spec.stream.to_owned(),
            durable: spec.durable.to_owned(),
            filter_subjects: spec.filter_subjects.iter().map(|s| (*s).to_owned()).collect(),
            ..Self::new(spec.stream, spec.durable)
        }
    }

    /// Defaults for reading all of `stream` with durable `durable`.
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            durable: durable.to_owned(),
            filter_subjects: Vec::new(),
            batch_size: 1000,
            batch_wait: Duration::ZERO,
            max_message_bytes: envelope::DEFAULT_MAX_MESSAGE_BYTES,
            ack_wait: Duration::from_secs(30),
            retry_limit: Duration::from_secs(120),
        }
    }
}

/// What a hook tells the runner to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// Go on.
    Continue,
    /// Stop at once as if the process died here.
    Crash,
}

/// A hook called with the applied sequence just committed.
pub type CommitHook = Arc<dyn Fn(u64) -> HookAction + Send + Sync>;

/// Hooks into the runner's commit. Tests use them as failpoints (return
/// [`HookAction::Crash`]); services use them as a commit notification, to
/// publish derived state (a KV map, an outbox) only once it is committed.
#[derive(Clone, Default)]
pub struct RunnerHooks {
    /// Called after a batch is committed to the store and before it is
    /// acked: the spot where a crash hurts most.
    pub after_commit: Option<CommitHook>,
}

/// Labels of the dead-letter counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// Durable consumer name.
    pub consumer: String,
    /// Short reason code.
    pub reason: String,
}

/// Counters of a runner.
#[derive(Debug, Clone, Default)]
pub struct RunnerMetrics {
    /// Events applied to the projection.
    pub applied: Counter,
    /// Messages skipped because the store had already applied them.
    pub skipped: Counter,
    /// Messages dead-lettered, by reason.
    pub dead_lettered: Family<DeadLetterLabels, Counter>,
    /// Store writes (batches) committed.
    pub batches: Counter,
    /// Times a batch stopped at an event the projection could not decide
    /// yet, to deliver it again.
    pub retried: Counter,
    /// Last stream sequence committed.
    pub applied_sequence: Gauge,
}

impl RunnerMetrics {
    /// Registers the counters under `prefix` (e.g. `cnnf_ingest_projection`).
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_applied"),
            "Events applied to the projection",
            self.applied.clone(),
        );
        registry.register(
            format!("{prefix}_skipped"),
            "Messages skipped because the store had already applied them",
            self.skipped.clone(),
        );
        registry.register(
            format!("{prefix}_dead_lettered"),
            "Messages quarantined on cnnf.dlq.<consumer>, by reason",
            self.dead_lettered.clone(),
        );
        registry.register(
            format!("{prefix}_batches"),
            "Store writes committed",
            self.batches.clone(),
        );
        registry.register(
            format!("{prefix}_retried"),
            "Times a batch stopped at an event the projection could not decide yet, to deliver it again",
            self.retried.clone(),
        );
        registry.register(
            format!("{prefix}_applied_sequence"),
            "Last stream sequence committed to the store",
            self.applied_sequence.clone(),
        );
    }
}

/// Why a runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// NATS failed in a way the runner cannot ride out.
    #[error("nats: {0}")]
    Nats(String),
    /// A dead letter could not be stored; the batch was not committed.
    #[error("dead-lettering {sequence}: {message}")]
    DeadLetter {
        /// Stream sequence of the message.
        sequence: u64,
        /// What failed.
        message: String,
    },
    /// A failpoint simulated a crash.
    #[error("failpoint: simulated crash after committing sequence {0}")]
    Failpoint(u64),
}

fn nats(error: impl std::fmt::Display) -> RunnerError {
    RunnerError::Nats(error.to_string())
}

/// Runs one projection from one durable consumer into one store.
pub struct ProjectionRunner<P> {
    js: jetstream::Context,
    store: Arc<dyn ProjectionStore>,
    projection: P,
    config: RunnerConfig,
    hooks: RunnerHooks,
    metrics: RunnerMetrics,
    dead_letter_subject: String,
    /// The consumer (delivery) sequence the next fresh message must carry.
    next_delivery: u64,
    /// The message the projection could not decide yet: its stream
    /// sequence, since when, and how many times.
    waiting: Option<Waiting>,
}

/// A message the runner waits on.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    sequence: u64,
    since: Instant,
    attempts: u32,
}

impl Waiting {
    /// The pause before the next delivery: 20 ms, doubling, at most 1 s.
    fn backoff(&self) -> Duration {
        Duration::from_millis(20u64.saturating_mul(1 << self.attempts.min(6))).min(Duration::from_secs(1))
    }
}

impl<P: Projection> ProjectionRunner<P> {
    /// A runner; nothing happens until [`run`](Self::run).
    pub fn new(js: jetstream::Context, store: Arc<dyn ProjectionStore>, projection: P, config: RunnerConfig) -> Self {
        let dead_letter_subject = format!("{}.dlq.{}", cnnf_core::subjects::ROOT, config.durable);
        Self {
            js,
            store,
            projection,
            config,
            hooks: RunnerHooks::default(),
            metrics: RunnerMetrics::default(),
            dead_letter_subject,
            next_delivery: 1,
            waiting: None,
        }
    }

    /// Installs failpoints.
    pub fn with_hooks(mut self, hooks: RunnerHooks) -> Self {
        self.hooks = hooks;
        self
    }

    /// Uses `metrics` (shared with a registry) instead of private counters.
    pub fn with_metrics(mut self, metrics: RunnerMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The runner's counters.
    pub fn metrics(&self) -> &RunnerMetrics {
        &self.metrics
    }

    /// Consumes until `shutdown` completes, then finishes the batch in hand
    /// (commits and acks it) and returns. Returns an error, without acking
    /// the batch in hand, when the store or NATS fails; the caller restarts
    /// the runner, which picks up exactly where the store says.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<P, RunnerError> {
        let shutdown = shutdown.fuse();
        tokio::pin!(shutdown);
        let mut applied = applied_sequence(self.store.as_ref(), &self.config.durable)?;
        self.metrics.applied_sequence.set(applied as i64);
        tracing::info!(message = "Projection runner starting.", durable = %self.config.durable, applied);
        let mut force_reposition = false;

        'consumer: loop {
            let (consumer, next_delivery) = self.position_consumer(applied, force_reposition).await?;
            self.next_delivery = next_delivery;
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(self.config.batch_size)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(nats)?;

            loop {
                let first = tokio::select! {
                    biased;
                    () = &mut shutdown => return Ok(self.projection),
                    next = messages.next() => next,
                };
                let first = match first {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::warn!(message = "Consumer stream error.", durable = %self.config.durable, %error);
                        continue;
                    }
                    None => return Err(RunnerError::Nats("consumer stream ended".into())),
                };
                let mut batch = vec![first];
                let mut stopping = false;
                let deadline = tokio::time::Instant::now() + self.config.batch_wait;
                while batch.len() < self.config.batch_size {
                    tokio::select! {
                        biased;
                        () = &mut shutdown, if !stopping => {
                            stopping = true;
                            break;
                        }
                        next = tokio::time::timeout_at(deadline, messages.next()) => match next {
                            Ok(Some(Ok(message))) => batch.push(message),
                            Ok(Some(Err(error))) => {
                                tracing::warn!(message = "Consumer stream error.", durable = %self.config.durable, %error);
                                break;
                            }
                            Ok(None) | Err(_) => break,
                        },
                    }
                }
                let outcome = self.process(batch, applied).await?;
                applied = outcome.applied;
                if stopping {
                    return Ok(self.projection);
                }
                if outcome.retry {
                    let wait = self
                        .waiting
                        .map_or(Duration::from_millis(20), |waiting| waiting.backoff());
                    tokio::select! {
                        biased;
                        () = &mut shutdown => return Ok(self.projection),
                        () = tokio::time::sleep(wait) => {}
                    }
                    force_reposition = true;
                    continue 'consumer;
                }
                if outcome.gap {
                    tracing::warn!(
                        message = "Delivery gap: repositioning the consumer.",
                        durable = %self.config.durable,
                        applied
                    );
                    force_reposition = true;
                    continue 'consumer;
                }
            }
        }
    }

    /// Applies, dead-letters, commits and acks one batch, up to the first
    /// delivery gap.
    async fn process(&mut self, batch: Vec<Message>, applied: u64) -> Result<BatchOutcome, RunnerError> {
        let store = Arc::clone(&self.store);
        let mut txn = Txn::new(store.as_ref());
        let mut high = applied;
        let mut applied_now = 0u64;
        let mut dead = Vec::new();
        let mut gap = false;
        let mut retry = false;
        let mut last_taken = None;
        for message in &batch {
            let info = message.info().map_err(nats)?;
            let (sequence, delivery) = (info.stream_sequence, info.consumer_sequence);
            if sequence <= high {
                // Already applied (a redelivery): safe to skip and to ack.
                self.metrics.skipped.inc();
                self.next_delivery = self.next_delivery.max(delivery + 1);
                last_taken = Some(message);
                continue;
            }
            if delivery != self.next_delivery {
                gap = true;
                break;
            }
            self.next_delivery = delivery + 1;
            let before = (high, last_taken);
            last_taken = Some(message);
            high = sequence;
            let checked = envelope::decode(&message.payload, self.config.max_message_bytes)
                .and_then(|envelope| envelope::check_origin(message.subject.as_str(), &envelope).map(|_| envelope));
            let envelope = match checked {
                Ok(envelope) => envelope,
                Err(rejection) => {
                    dead.push((message, sequence, rejection));
                    continue;
                }
            };
            let event = Event {
                subject: message.subject.as_str(),
                stream_sequence: sequence,
                received_unix_nanos: i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                envelope,
            };
            txn.mark();
            match self.projection.apply(&event, &mut txn) {
                Ok(()) => applied_now += 1,
                Err(ApplyError::Reject(rejection)) => {
                    txn.rollback_to_mark();
                    dead.push((message, sequence, rejection));
                }
                Err(ApplyError::NotYet(rejection)) => {
                    txn.rollback_to_mark();
                    let waiting = match self.waiting {
                        Some(waiting) if waiting.sequence == sequence => Waiting {
                            attempts: waiting.attempts.saturating_add(1),
                            ..waiting
                        },
                        _ => Waiting {
                            sequence,
                            since: Instant::now(),
                            attempts: 0,
                        },
                    };
                    if waiting.since.elapsed() >= self.config.retry_limit {
                        tracing::warn!(
                            message = "Gave up waiting on a message: dead-lettering it.",
                            durable = %self.config.durable,
                            sequence,
                            waited_ms = waiting.since.elapsed().as_millis() as u64,
                            detail = %rejection
                        );
                        self.waiting = None;
                        dead.push((message, sequence, rejection));
                        continue;
                    }
                    if waiting.attempts == 0 {
                        tracing::info!(
                            message = "Message not decidable yet: delivering it again later.",
                            durable = %self.config.durable,
                            sequence,
                            detail = %rejection
                        );
                    }
                    self.waiting = Some(waiting);
                    self.metrics.retried.inc();
                    (high, last_taken) = before;
                    retry = true;
                    break;
                }
                Err(ApplyError::Store(error)) => return Err(error.into()),
            }
            if self.waiting.is_some_and(|waiting| waiting.sequence == sequence) {
                self.waiting = None;
            }
        }

        if high > applied {
            self.dead_letter(&dead).await?;
            txn.put(META_TABLE, applied_key(&self.config.durable), encode_u64(high).to_vec());
            if !dead.is_empty() {
                txn.add_u64(META_TABLE, &dead_letter_key(&self.config.durable), dead.len() as u64)?;
            }
            let write = txn.into_batch();
            let writer = Arc::clone(&store);
            tokio::task::spawn_blocking(move || writer.write(write))
                .await
                .map_err(|error| StoreError::Engine(format!("store writer task: {error}")))??;
            self.metrics.batches.inc();
            self.metrics.applied.inc_by(applied_now);
            self.metrics.applied_sequence.set(high as i64);
            for (_, _, rejection) in &dead {
                self.metrics
                    .dead_lettered
                    .get_or_create(&DeadLetterLabels {
                        consumer: self.config.durable.clone(),
                        reason: rejection.reason().to_owned(),
                    })
                    .inc();
            }
            if let Some(hook) = &self.hooks.after_commit {
                if hook(high) == HookAction::Crash {
                    return Err(RunnerError::Failpoint(high));
                }
            }
        }
        // AckAll: acking the last delivery taken acks the whole batch up to
        // it. A lost ack only causes a redelivery, which the stored
        // sequence skips. After a gap nothing is acked: the consumer is
        // recreated anyway.
        if let (Some(last), false) = (last_taken, gap) {
            if let Err(error) = last.ack().await {
                tracing::warn!(message = "Ack failed; the batch will be redelivered and skipped.", %error);
            }
        }
        Ok(BatchOutcome {
            applied: high,
            gap,
            retry,
        })
    }

    /// Publishes every rejected message to the dead-letter subject and
    /// waits until JetStream stored each, before the batch is committed.
    async fn dead_letter(&self, dead: &[(&Message, u64, Rejection)]) -> Result<(), RunnerError> {
        let mut acks = Vec::with_capacity(dead.len());
        for (message, sequence, rejection) in dead {
            tracing::warn!(
                message = "Dead-lettering message.",
                durable = %self.config.durable,
                subject = %message.subject,
                sequence,
                reason = rejection.reason(),
                detail = %rejection
            );
            let publish = PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(format!("dlq:{}:{}:{sequence}", self.config.durable, self.config.stream))
                .header(DLQ_REASON, rejection.reason())
                .header(DLQ_DETAIL, header_safe(&rejection.to_string()).as_str())
                .header(DLQ_SUBJECT, message.subject.as_str())
                .header(DLQ_SOURCE, format!("{}:{sequence}", self.config.stream).as_str());
            let ack = self
                .js
                .send_publish(self.dead_letter_subject.clone(), publish)
                .await
                .map_err(|error| RunnerError::DeadLetter {
                    sequence: *sequence,
                    message: error.to_string(),
                })?;
            acks.push((*sequence, ack));
        }
        for (sequence, ack) in acks {
            ack.await.map_err(|error| RunnerError::DeadLetter {
                sequence,
                message: error.to_string(),
            })?;
        }
        Ok(())
    }

    /// Returns the durable consumer and the delivery sequence expected
    /// next. The consumer is kept only if it sits exactly at `applied`
    /// with nothing delivered-but-unacked and no pull request waiting;
    /// otherwise it is recreated to start right after `applied`.
    async fn position_consumer(&self, applied: u64, force: bool) -> Result<(PullConsumer, u64), RunnerError> {
        let stream = self.js.get_stream(&self.config.stream).await.map_err(nats)?;
        let durable = &self.config.durable;
        if let Ok(mut existing) = stream.get_consumer::<pull::Config>(durable).await {
            let info = existing.info().await.map_err(nats)?;
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            let clean = !force
                && info.delivered.stream_sequence == applied
                && info.num_ack_pending == 0
                && info.num_waiting == 0
                && filters == self.config.filter_subjects
                && info.config.ack_policy == AckPolicy::All;
            if clean {
                let next_delivery = info.delivered.consumer_sequence + 1;
                return Ok((existing, next_delivery));
            }
            tracing::info!(
                message = "Repositioning consumer to the store's applied sequence.",
                durable = %durable,
                delivered = info.delivered.stream_sequence,
                applied
            );
            stream.delete_consumer(durable).await.map_err(nats)?;
        }
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            description: Some(format!("CNNF projection {durable}")),
            deliver_policy: if applied == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: applied + 1,
                }
            },
            ack_policy: AckPolicy::All,
            ack_wait: self.config.ack_wait,
            max_deliver: -1,
            filter_subjects: self.config.filter_subjects.clone(),
            max_ack_pending: (self.config.batch_size * 4) as i64,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(nats)?;
        Ok((consumer, 1))
    }
}

/// What one batch did.
struct BatchOutcome {
    /// The applied sequence after the batch.
    applied: u64,
    /// A delivery gap stopped the batch: reposition the consumer.
    gap: bool,
    /// An event not decidable yet stopped the batch: wait, then
    /// reposition the consumer to deliver it again.
    retry: bool,
}

/// NATS header values cannot hold line breaks; keep them short, too.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}
