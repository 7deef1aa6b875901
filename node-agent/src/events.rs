//! The agent's events on their way out: envelopes with deterministic ids,
//! written to the disk spool, from which the spool's sender drains them to
//! JetStream.
//!
//! Every event of one agent process gets the id `<node>:<boot>:<seq>`: a
//! random boot id per process start and one sequence for all its events
//! (heartbeats, workload changes, decision batches), so ids never repeat
//! across subjects or restarts. The id is fixed when the event is spooled;
//! the sender resends under the same id until JetStream acks, and
//! JetStream drops a copy it already stored. So an event spooled while
//! NATS is unreachable arrives once when NATS is back, and an agent killed
//! between a send and its ack resends on restart without duplicating.
//!
//! Heartbeats are not spooled: a stale heartbeat is worthless, so they are
//! published directly and simply missed while NATS is away.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use cnnf_core::proto::{envelope::Payload, DecisionBatch, Envelope, Workload};
use cnnf_core::subjects::{self, Token};
use cnnf_spool::{SpoolHandle, SpoolRecord};
use tokio::sync::watch;

use crate::decisions::{drain, Aggregator, DecisionRecord};
use crate::engine::now_nanos;
use crate::metrics::Metrics;

/// How often the publisher looks into the decision ring (at most).
const RING_POLL: Duration = Duration::from_millis(10);

/// Builds and spools the agent's events.
#[derive(Debug)]
pub struct Events {
    cluster: Token,
    node: Token,
    boot_id: String,
    sequence: AtomicU64,
    flow_subject: String,
    workload_subject: String,
    spool: SpoolHandle,
    metrics: Metrics,
}

impl Events {
    /// Events of `node` in `cluster` for the process with `boot_id`.
    pub fn new(cluster: Token, node: Token, boot_id: String, spool: SpoolHandle, metrics: Metrics) -> Self {
        Self {
            flow_subject: subjects::flow(&cluster, &node),
            workload_subject: subjects::workload(&cluster, &node),
            cluster,
            node,
            boot_id,
            sequence: AtomicU64::new(0),
            spool,
            metrics,
        }
    }

    /// This process's boot id.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The next event id (`<node>:<boot>:<seq>`, seq from 1).
    pub fn next_id(&self) -> (u64, String) {
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        (
            sequence,
            cnnf_core::ids::agent_event(self.node.as_str(), &self.boot_id, sequence),
        )
    }

    /// An envelope of this node holding `payload`.
    pub fn envelope(&self, event_id: String, payload: Payload) -> Envelope {
        Envelope {
            schema_version: cnnf_proto::SCHEMA_VERSION,
            event_id,
            cluster: self.cluster.to_string(),
            node: self.node.to_string(),
            time_unix_nanos: now_nanos(),
            payload: Some(payload),
            ..Default::default()
        }
    }

    /// A discovered workload with this node's cluster and node filled in.
    pub fn stamp(&self, mut workload: Workload) -> Workload {
        workload.cluster = self.cluster.to_string();
        workload.node = self.node.to_string();
        workload
    }

    fn spool(&self, subject: &str, payload: Payload) -> Result<(), cnnf_spool::SpoolError> {
        let (_, id) = self.next_id();
        let envelope = self.envelope(id.clone(), payload);
        let bytes = cnnf_core::envelope::encode(envelope);
        self.spool.append(&SpoolRecord::new(subject, id, bytes))?;
        Ok(())
    }

    /// Spools a workload event (`kind` names it in the metrics).
    pub fn emit_workload(&self, kind: &'static str, payload: Payload) -> Result<(), cnnf_spool::SpoolError> {
        self.spool(&self.workload_subject, payload)?;
        self.metrics.spooled(kind, 1);
        Ok(())
    }

    /// Spools one batch of decisions.
    pub fn emit_decisions(&self, batch: DecisionBatch) -> Result<(), cnnf_spool::SpoolError> {
        let count = batch.decisions.len() as u64;
        self.spool(&self.flow_subject, Payload::Decisions(batch))?;
        self.metrics.spooled("decisions", 1);
        self.metrics.decisions_published.inc_by(count);
        Ok(())
    }
}

/// Settings of the decision publisher.
#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// Aggregation window.
    pub window: Duration,
    /// Most distinct decisions per window.
    pub max_distinct: usize,
    /// Most decisions per message.
    pub batch_decisions: usize,
}

/// Drains the decision ring into aggregation windows and spools each
/// closed window as `DecisionBatch` messages, until `stop` turns true;
/// then drains what is left and spools it (the verdict threads must have
/// stopped by then for nothing to be missed).
pub async fn publish_decisions(
    receiver: Receiver<DecisionRecord>,
    events: std::sync::Arc<Events>,
    settings: PublisherSettings,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = events.metrics.clone();
    let mut aggregator = Aggregator::new(settings.max_distinct);
    let mut reported_overflow = metrics.decisions_overflowed.get();
    let mut poll = tokio::time::interval(RING_POLL.min(settings.window));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window_end = tokio::time::Instant::now() + settings.window;
    // Most records taken per poll: keeps one poll short under a flood.
    let per_poll = 1 << 16;
    loop {
        let stopping = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => true,
            _ = poll.tick() => false,
        };
        loop {
            let taken = drain(&receiver, &mut aggregator, per_poll);
            if taken < per_poll || !stopping {
                break;
            }
        }
        if stopping || tokio::time::Instant::now() >= window_end {
            flush(
                &events,
                &mut aggregator,
                &mut reported_overflow,
                settings.batch_decisions,
            );
            window_end = tokio::time::Instant::now() + settings.window;
        }
        if stopping {
            return;
        }
    }
}

/// Closes the window: spools its decisions, the overflow since the last
/// batch riding on the first message.
fn flush(events: &Events, aggregator: &mut Aggregator, reported_overflow: &mut u64, batch_decisions: usize) {
    let metrics = &events.metrics;
    let (decisions, distinct_overflow) = aggregator.take();
    metrics.decisions_overflowed.inc_by(distinct_overflow);
    let overflowed = metrics.decisions_overflowed.get();
    let mut overflow_count = overflowed - *reported_overflow;
    if decisions.is_empty() && overflow_count == 0 {
        return;
    }
    *reported_overflow = overflowed;
    if overflow_count > 0 {
        tracing::warn!(
            message = "Decisions overflowed; counted in the next batch.",
            overflow_count
        );
    }
    let mut batches: Vec<DecisionBatch> = decisions
        .chunks(batch_decisions.max(1))
        .map(|chunk| DecisionBatch {
            decisions: chunk.to_vec(),
            overflow_count: std::mem::take(&mut overflow_count),
        })
        .collect();
    if batches.is_empty() {
        batches.push(DecisionBatch {
            decisions: Vec::new(),
            overflow_count,
        });
    }
    for batch in batches {
        let count = batch.decisions.len();
        if let Err(error) = events.emit_decisions(batch) {
            // The spool counted the refusal (full or too large) as well.
            metrics.decisions_overflowed.inc_by(count as u64);
            tracing::error!(message = "Decision batch not spooled; its decisions count as overflowed.", %error, decisions = count);
        }
    }
}
