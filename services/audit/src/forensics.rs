//! Forensics: the log read back for a time range, and point-in-time
//! questions.
//!
//! - [`read_range`] reads a stream from a start time to a stop time with an
//!   ordered (ephemeral, unacknowledged) consumer; it stops at the stream's
//!   last message as of the call, so it always ends.
//! - [`replay`] folds the decisions of a time range, widened to whole audit
//!   windows, into a **fresh** store in its own directory with the very
//!   projection the live service runs, and returns the audits it built. The
//!   live store is not touched. JetStream stores messages by arrival, while
//!   ranges are in decision time: the read starts `lateness` before the
//!   range and ends `lateness` after it, so a decision that reached the
//!   stream more than `lateness` after it was made is missed (agents that
//!   spooled through a long outage). Within that bound, a replay of a range
//!   yields exactly the audits the live projection holds for it (same ids,
//!   counts and times), provided no port-scan suppression of a source began
//!   before the range (the live fold then aggregated that source's audits
//!   over ports, the replay starts without that knowledge).
//! - [`who_held`]: which workloads held an address at an instant, from the
//!   address history the workloads runner keeps (event time).
//! - [`state_at`]: the policy (revision, modes, objects, rules) folded from
//!   the policy history up to the instant, and each model's state (learning
//!   or enforcing, since when, learned connections as announced by
//!   `Learned` events less deletions) folded from the model history. The
//!   compiled verdict table the agents enforced is not stored: decisions
//!   carry its version.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use bytes::Bytes;
use cnnf_bus::topology::FLOWS;
use cnnf_bus::{Event, Projection};
use cnnf_core::{address, envelope};
use cnnf_proto::v1::{
    envelope::Payload, policy_event, AddressHolding, Audit, AuditFilter, Envelope, Incident, ModelState, ModelStateAt,
    StateAtResponse,
};
use cnnf_store::{ProjectionStore, StoreError, Txn};
use cnnf_store_rocksdb::RocksStore;
use futures::StreamExt;

use crate::index::matches;
use crate::projection::{AuditSettings, FlowsProjection};
use crate::store::{self, AuditNumber, AuditRecord, ModelChange, OutboxMessage, PolicyRecord};

/// Default lateness: how long after its time a decision may reach the stream.
pub const DEFAULT_LATENESS: Duration = Duration::from_secs(300);
/// Default most audits a replay returns.
pub const DEFAULT_MAX_AUDITS: usize = 10_000;

/// Why a forensic question could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ForensicsError {
    /// NATS failed.
    #[error("nats: {0}")]
    Nats(String),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The question itself is wrong.
    #[error("{0}")]
    Invalid(String),
}

impl From<store::CorruptRecord> for ForensicsError {
    fn from(error: store::CorruptRecord) -> Self {
        ForensicsError::Store(error.into())
    }
}

fn nats(error: impl std::fmt::Display) -> ForensicsError {
    ForensicsError::Nats(error.to_string())
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// What [`read_range`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Messages delivered.
    pub messages: u64,
}

/// One message read back: subject, stream sequence, payload.
pub type RangeMessage = (String, u64, Bytes);

/// Reads `stream` from the first message stored at or after `start` (Unix
/// nanoseconds) until one stored after `stop`, or the stream's last message
/// as of the call, handing messages to `each` in batches of up to 1000.
pub async fn read_range<F, Fut>(
    js: &jetstream::Context,
    stream: &str,
    start: i64,
    stop: i64,
    mut each: F,
) -> Result<ReadStats, ForensicsError>
where
    F: FnMut(Vec<RangeMessage>) -> Fut,
    Fut: std::future::Future<Output = Result<(), ForensicsError>>,
{
    let mut handle = js.get_stream(stream).await.map_err(nats)?;
    let last = handle.info().await.map_err(nats)?.state.last_sequence;
    let mut stats = ReadStats::default();
    if last == 0 {
        return Ok(stats);
    }
    let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(start.max(0)))
        .map_err(|error| ForensicsError::Invalid(format!("from: {error}")))?;
    let consumer = handle
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(stats);
    }
    let mut messages = consumer.messages().await.map_err(nats)?;
    let mut batch = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(nats)?;
        let info = message.info().map_err(nats)?;
        let sequence = info.stream_sequence;
        let stored = i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX);
        if sequence > last || stored > stop {
            break;
        }
        stats.messages += 1;
        batch.push((message.subject.to_string(), sequence, message.payload.clone()));
        if batch.len() >= 1000 {
            each(std::mem::take(&mut batch)).await?;
        }
        if sequence >= last {
            break;
        }
    }
    if !batch.is_empty() {
        each(batch).await?;
    }
    Ok(stats)
}

/// What a replay rebuilt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayOutcome {
    /// Audits by first seen time, then id (at most the asked number).
    pub audits: Vec<Audit>,
    /// Incidents derived (never published).
    pub incidents: Vec<Incident>,
    /// Stream messages read.
    pub messages_read: u64,
    /// Decisions in the range.
    pub decisions: u64,
    /// More audits than asked for.
    pub truncated: bool,
    /// The widened range.
    pub from: i64,
    /// The widened range's end.
    pub to: i64,
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplaySpec {
    /// Decision times from (included)...
    pub from: i64,
    /// ... to (excluded); both widened to whole windows.
    pub to: i64,
    /// How late a decision may have been stored.
    pub lateness: Duration,
    /// Audits to return.
    pub filter: AuditFilter,
    /// Most audits returned.
    pub max_audits: usize,
}

/// Replays the decisions of `spec`'s range from `CNNF_FLOWS` into a fresh
/// store at `dir` (which must not hold a store yet) with the live fold and
/// `settings`, and returns the audits it built.
pub async fn replay(
    js: &jetstream::Context,
    settings: AuditSettings,
    dir: &Path,
    spec: &ReplaySpec,
) -> Result<ReplayOutcome, ForensicsError> {
    if spec.to <= spec.from {
        return Err(ForensicsError::Invalid(format!(
            "range: from ({}) must be before to ({})",
            spec.from, spec.to
        )));
    }
    let (from, to) = settings.widen(spec.from, spec.to);
    let lateness = nanos(spec.lateness);
    let store = RocksStore::open(dir, store::TABLES)?;
    if store.scan_prefix(store::RECORDS, b"", 1)?.len() == 1 {
        return Err(ForensicsError::Invalid(format!(
            "{} already holds a store",
            dir.display()
        )));
    }
    let store = std::sync::Arc::new(store);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<RangeMessage>>(4);
    let writer_store = std::sync::Arc::clone(&store);
    let writer = tokio::task::spawn_blocking(move || -> Result<u64, ForensicsError> {
        let mut projection = FlowsProjection::replay(settings, from, to);
        let mut decisions = 0u64;
        while let Some(batch) = receiver.blocking_recv() {
            let mut txn = Txn::new(writer_store.as_ref());
            for (subject, sequence, payload) in batch {
                let Ok(envelope) = envelope::decode(&payload, envelope::DEFAULT_MAX_MESSAGE_BYTES) else {
                    continue;
                };
                if let Some(Payload::Decisions(batch)) = &envelope.payload {
                    decisions += batch
                        .decisions
                        .iter()
                        .filter(|decision| {
                            let time = crate::audit::decision_time(decision, envelope.time_unix_nanos);
                            time >= from && time < to
                        })
                        .count() as u64;
                }
                let event = Event {
                    subject: &subject,
                    stream_sequence: sequence,
                    // The audit fold never reads the server's receive time.
                    received_unix_nanos: 0,
                    envelope,
                };
                txn.mark();
                match projection.apply(&event, &mut txn) {
                    Ok(()) => {}
                    Err(cnnf_bus::runner::ApplyError::Reject(_) | cnnf_bus::runner::ApplyError::NotYet(_)) => {
                        txn.rollback_to_mark()
                    }
                    Err(cnnf_bus::runner::ApplyError::Store(error)) => return Err(error.into()),
                }
            }
            writer_store.write(txn.into_batch())?;
        }
        Ok(decisions)
    });
    let stats = read_range(
        js,
        FLOWS,
        from.saturating_sub(lateness),
        to.saturating_add(lateness),
        |batch| {
            let sender = sender.clone();
            async move {
                sender
                    .send(batch)
                    .await
                    .map_err(|_| ForensicsError::Invalid("the replay writer stopped".into()))
            }
        },
    )
    .await;
    drop(sender);
    let decisions = writer
        .await
        .map_err(|error| ForensicsError::Invalid(format!("replay writer: {error}")))??;
    let stats = stats?;

    let mut audits = Vec::new();
    for (key, value) in store.scan_prefix(store::RECORDS, b"", usize::MAX)? {
        let record: AuditRecord = store::decode("audit", &value)?;
        let number = AuditNumber::decode(&key).ok_or_else(|| StoreError::Engine("corrupt audit key".into()))?;
        if let Some(audit) = record.audit {
            if matches(&spec.filter, &audit) {
                audits.push((audit.first_seen_unix_nanos, number, audit));
            }
        }
    }
    audits.sort_by_key(|a| (a.0, a.1));
    let truncated = audits.len() > spec.max_audits;
    audits.truncate(spec.max_audits);
    let mut incidents = Vec::new();
    for (_, value) in store.scan_prefix(store::OUTBOX, b"", usize::MAX)? {
        let message: OutboxMessage = store::decode("outbox message", &value)?;
        if let Ok(Envelope {
            payload: Some(Payload::Incident(incident)),
            ..
        }) = <Envelope as prost::Message>::decode(message.payload.as_slice())
        {
            incidents.push(incident);
        }
    }
    Ok(ReplayOutcome {
        audits: audits.into_iter().map(|(_, _, audit)| audit).collect(),
        incidents,
        messages_read: stats.messages,
        decisions,
        truncated,
        from,
        to,
    })
}

/// Every holding of `address` that covered `at`, earliest first.
pub fn who_held(store: &dyn ProjectionStore, address: &str, at: i64) -> Result<Vec<AddressHolding>, ForensicsError> {
    let canonical =
        address::canonical(address).map_err(|error| ForensicsError::Invalid(format!("address: {error}")))?;
    let mut out = Vec::new();
    for (_, value) in store.scan_prefix(store::HOLDINGS, &store::holding_prefix(&canonical), usize::MAX)? {
        let holding: AddressHolding = store::decode("holding", &value)?;
        if holding.held_from_unix_nanos <= at
            && (holding.held_until_unix_nanos == 0 || at < holding.held_until_unix_nanos)
        {
            out.push(holding);
        }
    }
    Ok(out)
}

/// The policy and model states in force at `at`.
pub fn state_at(store: &dyn ProjectionStore, at: i64) -> Result<StateAtResponse, ForensicsError> {
    let mut state = StateAtResponse::default();
    let mut objects = std::collections::BTreeMap::new();
    let mut rules = std::collections::BTreeMap::new();
    for (_, value) in store.scan_prefix(store::POLICY, b"", usize::MAX)? {
        let record: PolicyRecord = store::decode("policy change", &value)?;
        if record.time_unix_nanos > at {
            break;
        }
        let Some(event) = record.event else { continue };
        state.policy_revision = event.revision;
        state.policy_stream_sequence = record.sequence;
        match event.change {
            Some(policy_event::Change::ObjectPut(put)) => {
                if let Some(object) = put.object {
                    objects.insert(object.name.clone(), object);
                }
            }
            Some(policy_event::Change::ObjectDeleted(deleted)) => {
                objects.remove(&deleted.name);
            }
            Some(policy_event::Change::RulePut(put)) => {
                if let Some(rule) = put.rule {
                    rules.insert(rule.id.clone(), rule);
                }
            }
            Some(policy_event::Change::RuleDeleted(deleted)) => {
                rules.remove(&deleted.id);
            }
            Some(policy_event::Change::ModeSet(set)) => {
                if set.host {
                    state.host_mode = set.mode;
                } else {
                    state.mode = set.mode;
                }
            }
            Some(policy_event::Change::Imported(imported)) => {
                objects = imported.objects.into_iter().map(|o| (o.name.clone(), o)).collect();
                rules = imported.rules.into_iter().map(|r| (r.id.clone(), r)).collect();
                state.mode = imported.mode;
                state.host_mode = imported.host_mode;
            }
            None => {}
        }
    }
    state.objects = objects.into_values().collect();
    state.rules = rules.into_values().collect();

    let mut current: Option<ModelStateAt> = None;
    for (key, value) in store.scan_prefix(store::MODELS, b"", usize::MAX)? {
        let Some(split) = key.iter().position(|byte| *byte == 0) else {
            return Err(StoreError::Engine("corrupt model history key".into()).into());
        };
        let image_id = String::from_utf8_lossy(&key[..split]).into_owned();
        if current.as_ref().is_some_and(|model| model.image_id != image_id) {
            state.models.extend(current.take());
        }
        let change: ModelChange = store::decode("model change", &value)?;
        if change.time_unix_nanos > at {
            continue;
        }
        let model = current.get_or_insert_with(|| ModelStateAt {
            image_id: image_id.clone(),
            ..Default::default()
        });
        model.revision = change.sequence;
        match change.kind.as_str() {
            "created" => {
                model.image_name = change.image_name;
                model.state = ModelState::Learning as i32;
                model.learned_connections = 0;
                model.state_since_unix_nanos = change.time_unix_nanos;
            }
            "learned" => model.learned_connections += change.connections,
            "locked" => {
                model.state = ModelState::Enforcing as i32;
                model.state_since_unix_nanos = change.time_unix_nanos;
            }
            "relearn" => {
                model.state = ModelState::Learning as i32;
                model.learned_connections = 0;
                model.state_since_unix_nanos = change.time_unix_nanos;
            }
            "connection-deleted" => {
                model.learned_connections = model.learned_connections.saturating_sub(change.connections);
            }
            _ => {}
        }
    }
    state.models.extend(current);
    Ok(state)
}
