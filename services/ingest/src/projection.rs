//! The gate of agent events and the two projections behind it.
//!
//! The projection runner already quarantines what cannot be trusted as a
//! message (oversized, not an envelope, unknown schema version, no
//! payload) and an envelope whose cluster and node are not its subject's
//! (`origin-mismatch`, `cnnf_core::envelope::check_origin`: NATS
//! permissions confine an agent to its own subjects, so a mismatch is an
//! agent lying in the body; see `deploy/nats/agent-permissions.md`). The
//! gate here refuses what is wrong as an *event*, before anything is
//! written: an event that does not belong on the stream, no event time, a
//! missing or malformed workload, no or unparseable addresses, a workload
//! naming another cluster or node than its envelope. It reads the origin
//! through the same shared check, so applied on its own (as the unit tests
//! do) it refuses a mismatch too. A refused event is returned as
//! `Rejection::Invalid("<reason>: <detail>")`: the runner rolls back its
//! writes and dead-letters it on `cnnf.dlq.<durable>`, and
//! `cnnf_ingest_gate_rejected{consumer,reason}` counts it.
//!
//! [`WorkloadProjection`] folds `CNNF_WORKLOADS` into the registry (see
//! [`crate::registry`]), by event time:
//!
//! - `WorkloadStarted` opens one holding per address, unless that very
//!   container already holds it (agents re-announce after a restart). If
//!   other workloads hold the address, the new holding is recorded all the
//!   same, beside theirs, and an `ADDRESS_CONFLICT` incident is written to
//!   the outbox: the conflict is reported, never settled by arrival order.
//! - `WorkloadStopped` closes the holdings *that container* opened, at the
//!   stop's event time (never before their start); a late stop therefore
//!   never ends a newer holder of the same address. A stop of a container
//!   the registry does not hold changes nothing.
//! - `NodeGone` closes every open holding of the node at the event's time
//!   and records the silence it released; a second `NodeGone` for the
//!   same silence changes nothing.
//!
//! [`HeartbeatProjection`] folds `CNNF_HEARTBEATS` into the newest
//! heartbeat of each node, which the liveness monitor reads.

use std::sync::{Arc, Mutex, PoisonError};

use cnnf_bus::runner::ApplyError;
use cnnf_bus::topology::WORKLOADS;
use cnnf_bus::{Event, Projection};
use cnnf_core::envelope::{Origin, Rejection};
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{envelope::Payload, incident, Envelope, Incident, Workload};
use cnnf_store::{ProjectionStore, Txn};
use prost::Message as _;

use crate::address::{self, InvalidAddress};
use crate::kv::Changes;
use crate::metrics::Metrics;
use crate::registry::{self, NewHolding, Opened, OutboxMessage, Pending, StoredHolding, Writer};

/// Most addresses one workload may hold.
pub const MAX_ADDRESSES: usize = 64;
/// Longest container ID accepted.
const MAX_CONTAINER_ID: usize = 256;
/// Longest image ID accepted.
const MAX_IMAGE_ID: usize = 512;
/// Subject token of address conflict incidents.
pub const ADDRESS_CONFLICT: &str = "address-conflict";
/// Producer name in the ids of what ingest publishes.
pub const PRODUCER: &str = "ingest";

/// Why the gate refused an event.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The subject does not name the envelope's cluster and node (the
    /// shared check's rejection).
    #[error("{0}")]
    OriginMismatch(Rejection),
    /// The cluster or node cannot be a subject token.
    #[error(transparent)]
    InvalidName(#[from] subjects::InvalidToken),
    /// An event that does not belong on this stream.
    #[error("{found} events do not belong on {subject}")]
    UnexpectedEvent {
        /// Kind of the event.
        found: &'static str,
        /// Subject it came on.
        subject: String,
    },
    /// No event time.
    #[error("time_unix_nanos is {0}: the event has no time")]
    MissingTime(i64),
    /// No workload in a workload event.
    #[error("the event carries no workload")]
    MissingWorkload,
    /// A container ID the registry cannot key.
    #[error("container_id {0:?} is empty, longer than 256 bytes or holds control characters")]
    InvalidContainer(String),
    /// An image ID the registry cannot key.
    #[error("image_id {0:?} is empty, longer than 512 bytes or holds control characters")]
    InvalidImage(String),
    /// A started workload without addresses.
    #[error("a started workload must hold at least one address")]
    NoAddresses,
    /// More addresses than one workload may hold.
    #[error("{0} addresses: a workload may hold at most {MAX_ADDRESSES}")]
    TooManyAddresses(usize),
    /// An address that does not parse.
    #[error("address: {0}")]
    InvalidAddress(#[from] InvalidAddress),
    /// The workload names another cluster or node than its envelope.
    #[error(
        "the workload names cluster {workload_cluster:?} node {workload_node:?}, its envelope {cluster:?} {node:?}"
    )]
    WorkloadOriginMismatch {
        /// Cluster in the workload.
        workload_cluster: String,
        /// Node in the workload.
        workload_node: String,
        /// Cluster in the envelope.
        cluster: String,
        /// Node in the envelope.
        node: String,
    },
    /// A `NodeGone` without the heartbeat it follows, or one dated
    /// before that heartbeat.
    #[error("node_gone.last_heartbeat_unix_nanos is {last_heartbeat}: it must name the last heartbeat, before the event's time {time}")]
    InvalidLastHeartbeat {
        /// The heartbeat time in the event.
        last_heartbeat: i64,
        /// The event's time.
        time: i64,
    },
}

impl GateError {
    /// Short, stable code: the metric label, and the start of the
    /// dead letter's detail.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OriginMismatch(_) => "origin-mismatch",
            Self::InvalidName(_) => "invalid-name",
            Self::UnexpectedEvent { .. } => "unexpected-event",
            Self::MissingTime(_) => "missing-time",
            Self::MissingWorkload => "missing-workload",
            Self::InvalidContainer(_) => "invalid-container-id",
            Self::InvalidImage(_) => "invalid-image-id",
            Self::NoAddresses => "no-addresses",
            Self::TooManyAddresses(_) => "too-many-addresses",
            Self::InvalidAddress(_) => "invalid-address",
            Self::WorkloadOriginMismatch { .. } => "workload-origin-mismatch",
            Self::InvalidLastHeartbeat { .. } => "invalid-last-heartbeat",
        }
    }

    fn into_rejection(self) -> Rejection {
        match self {
            Self::OriginMismatch(rejection) => rejection,
            other => Rejection::Invalid(format!("{}: {other}", other.reason())),
        }
    }
}

/// Why `apply` stopped: the gate refused the event, or the store failed.
enum Failure {
    Gate(GateError),
    Store(cnnf_store::StoreError),
}

impl From<GateError> for Failure {
    fn from(error: GateError) -> Self {
        Self::Gate(error)
    }
}

impl From<cnnf_store::StoreError> for Failure {
    fn from(error: cnnf_store::StoreError) -> Self {
        Self::Store(error)
    }
}

fn payload_name(payload: &Payload) -> &'static str {
    match payload {
        Payload::WorkloadStarted(_) => "WorkloadStarted",
        Payload::WorkloadStopped(_) => "WorkloadStopped",
        Payload::NodeHeartbeat(_) => "NodeHeartbeat",
        Payload::NodeGone(_) => "NodeGone",
        Payload::Decisions(_) => "DecisionBatch",
        Payload::Model(_) => "ModelEvent",
        Payload::Policy(_) => "PolicyEvent",
        Payload::Audit(_) => "Audit",
        Payload::Incident(_) => "Incident",
    }
}

/// The cluster and node of an agent event, checked against its subject
/// with the check every consumer's runner applies
/// ([`cnnf_core::envelope::check_origin`]); a subject that is not an agent
/// subject names no node and is refused as a mismatch.
pub fn check_origin(subject: &str, envelope: &Envelope) -> Result<(Token, Token), GateError> {
    match cnnf_core::envelope::check_origin(subject, envelope).map_err(GateError::OriginMismatch)? {
        Origin::Agent { cluster, node } => Ok((Token::new("cluster", cluster)?, Token::new("node", node)?)),
        Origin::Cluster { .. } | Origin::Unnamed => Err(GateError::OriginMismatch(Rejection::OriginMismatch {
            subject: subject.to_owned(),
            cluster: envelope.cluster.clone(),
            node: envelope.node.clone(),
        })),
    }
}

fn check_time(envelope: &Envelope) -> Result<i64, GateError> {
    match envelope.time_unix_nanos {
        time if time > 0 => Ok(time),
        time => Err(GateError::MissingTime(time)),
    }
}

fn checked_id(value: &str, max: usize) -> bool {
    !value.is_empty() && value.len() <= max && !value.chars().any(char::is_control)
}

/// Checks a workload against its envelope and returns it normalized: the
/// envelope's cluster and node filled in where it left them empty, its
/// addresses canonical and without repeats. A started workload must hold
/// an address; a stopped one need not (its holdings are found by container).
pub fn check_workload(
    workload: Option<&Workload>,
    cluster: &Token,
    node: &Token,
    started: bool,
) -> Result<Workload, GateError> {
    let mut workload = workload.cloned().ok_or(GateError::MissingWorkload)?;
    if !checked_id(&workload.container_id, MAX_CONTAINER_ID) {
        return Err(GateError::InvalidContainer(
            workload.container_id.chars().take(300).collect(),
        ));
    }
    if started && !checked_id(&workload.image_id, MAX_IMAGE_ID) {
        return Err(GateError::InvalidImage(workload.image_id.chars().take(600).collect()));
    }
    let names_other = |own: &str, envelope: &Token| !own.is_empty() && own != envelope.as_str();
    if names_other(&workload.cluster, cluster) || names_other(&workload.node, node) {
        return Err(GateError::WorkloadOriginMismatch {
            workload_cluster: workload.cluster,
            workload_node: workload.node,
            cluster: cluster.to_string(),
            node: node.to_string(),
        });
    }
    workload.cluster = cluster.to_string();
    workload.node = node.to_string();
    if started && workload.addresses.is_empty() {
        return Err(GateError::NoAddresses);
    }
    if workload.addresses.len() > MAX_ADDRESSES {
        return Err(GateError::TooManyAddresses(workload.addresses.len()));
    }
    let mut addresses: Vec<String> = Vec::with_capacity(workload.addresses.len());
    for text in &workload.addresses {
        let canonical = address::canonical(text)?;
        if !addresses.contains(&canonical) {
            addresses.push(canonical);
        }
    }
    workload.addresses = addresses;
    Ok(workload)
}

/// Folds `CNNF_WORKLOADS` into the identity registry.
pub struct WorkloadProjection {
    store: Arc<dyn ProjectionStore>,
    pending: Arc<Mutex<Pending>>,
    changes: Arc<Changes>,
    metrics: Metrics,
    durable: String,
}

impl WorkloadProjection {
    /// A projection over `store`; `pending` is cleared by the runner's
    /// commit hook, `changes` tells the KV writer what to sync.
    pub fn new(
        store: Arc<dyn ProjectionStore>,
        pending: Arc<Mutex<Pending>>,
        changes: Arc<Changes>,
        metrics: Metrics,
        durable: &str,
    ) -> Self {
        Self {
            store,
            pending,
            changes,
            metrics,
            durable: durable.to_owned(),
        }
    }

    fn apply_checked(
        &self,
        event: &Event<'_>,
        w: &mut Writer<'_, '_>,
        touched: &mut Vec<String>,
    ) -> Result<bool, Failure> {
        let envelope = &event.envelope;
        let (cluster, node) = check_origin(event.subject, envelope)?;
        let time = check_time(envelope)?;
        let sequence = event.stream_sequence;
        let mut incidents = false;
        match &envelope.payload {
            Some(Payload::WorkloadStarted(started)) => {
                let workload = check_workload(started.workload.as_ref(), &cluster, &node, true)?;
                let encoded = registry::encode_workload(&workload);
                let holder = registry::holder_key(cluster.as_str(), node.as_str(), &workload.container_id);
                for (part, address) in workload.addresses.iter().enumerate() {
                    let new = NewHolding {
                        address,
                        holder: &holder,
                        image_id: &workload.image_id,
                        workload: &encoded,
                        from: time,
                        sequence,
                    };
                    let Opened::New { others } = registry::open(w, &new)? else {
                        continue;
                    };
                    touched.push(address.clone());
                    if !others.is_empty() {
                        let message =
                            conflict_incident(envelope, &cluster, &workload, address, &others, sequence, part)?;
                        w.put(
                            registry::INCIDENT_OUTBOX,
                            registry::outbox_key(sequence, part as u32),
                            message.encode_to_vec(),
                        );
                        incidents = true;
                    }
                }
            }
            Some(Payload::WorkloadStopped(stopped)) => {
                let workload = check_workload(stopped.workload.as_ref(), &cluster, &node, false)?;
                let holder = registry::holder_key(cluster.as_str(), node.as_str(), &workload.container_id);
                let reason = if stopped.reason.is_empty() {
                    "stopped"
                } else {
                    stopped.reason.as_str()
                };
                let closed = registry::close_all(w, &registry::holder_prefix(&holder), time, reason, sequence)?;
                if closed.is_empty() {
                    tracing::debug!(
                        message = "Stop of a container that holds no address.",
                        cluster = %cluster,
                        node = %node,
                        container = %workload.container_id,
                        sequence
                    );
                }
                touched.extend(closed.into_iter().map(|holding| holding.address));
            }
            Some(Payload::NodeGone(gone)) => {
                // A silence released "in the future" would exempt the node
                // from liveness until then.
                if gone.last_heartbeat_unix_nanos <= 0 || gone.last_heartbeat_unix_nanos > time {
                    return Err(GateError::InvalidLastHeartbeat {
                        last_heartbeat: gone.last_heartbeat_unix_nanos,
                        time,
                    }
                    .into());
                }
                for text in &gone.released_addresses {
                    address::canonical(text).map_err(GateError::from)?;
                }
                let previous = registry::gone_record(w, cluster.as_str(), node.as_str())?;
                if previous.is_some_and(|record| record.last_heartbeat_unix_nanos >= gone.last_heartbeat_unix_nanos) {
                    return Ok(false);
                }
                let prefix = registry::node_prefix(cluster.as_str(), node.as_str());
                let closed = registry::close_all(w, &prefix, time, "node-gone", sequence)?;
                tracing::info!(
                    message = "Node gone: its addresses are released.",
                    cluster = %cluster,
                    node = %node,
                    last_heartbeat_unix_nanos = gone.last_heartbeat_unix_nanos,
                    released = closed.len()
                );
                registry::put_gone_record(
                    w,
                    &registry::GoneRecord {
                        cluster: cluster.to_string(),
                        node: node.to_string(),
                        last_heartbeat_unix_nanos: gone.last_heartbeat_unix_nanos,
                        gone_unix_nanos: time,
                    },
                );
                touched.extend(closed.into_iter().map(|holding| holding.address));
            }
            Some(other) => {
                return Err(GateError::UnexpectedEvent {
                    found: payload_name(other),
                    subject: event.subject.to_owned(),
                }
                .into())
            }
            // The runner dead-letters envelopes without a payload first.
            None => {
                return Err(GateError::UnexpectedEvent {
                    found: "empty",
                    subject: event.subject.to_owned(),
                }
                .into())
            }
        }
        Ok(incidents)
    }
}

/// The outbox message reporting that `workload` claimed `address` while
/// `others` held it.
fn conflict_incident(
    envelope: &Envelope,
    cluster: &Token,
    workload: &Workload,
    address: &str,
    others: &[StoredHolding],
    sequence: u64,
    part: usize,
) -> Result<OutboxMessage, cnnf_store::StoreError> {
    let id = cnnf_core::ids::derived(PRODUCER, WORKLOADS, sequence, Some(part as u32));
    let mut holders = Vec::with_capacity(others.len());
    for other in others {
        let held = other.decode_workload()?;
        holders.push(format!(
            "{}/{}/{} ({} {}) since {}",
            held.cluster, held.node, held.container_id, held.image_name, held.image_id, other.from
        ));
    }
    let holders = holders.join("; ");
    let incident = Incident {
        incident_id: id.clone(),
        kind: incident::Kind::AddressConflict as i32,
        image_id: workload.image_id.clone(),
        summary: format!(
            "address {address} claimed by container {} ({}) on node {} while held by {holders}",
            workload.container_id, workload.image_name, workload.node
        ),
        details: [
            ("address", address.to_owned()),
            ("claimant.container_id", workload.container_id.clone()),
            ("claimant.image_id", workload.image_id.clone()),
            ("claimant.image_name", workload.image_name.clone()),
            ("claimant.node", workload.node.clone()),
            ("claimant.from_unix_nanos", envelope.time_unix_nanos.to_string()),
            ("holders", holders),
            ("source", format!("{WORKLOADS}:{sequence}")),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect(),
    };
    let kind =
        Token::new("kind", ADDRESS_CONFLICT).map_err(|error| cnnf_store::StoreError::Engine(error.to_string()))?;
    let payload = cnnf_core::envelope::encode(Envelope {
        event_id: id.clone(),
        cluster: envelope.cluster.clone(),
        node: envelope.node.clone(),
        time_unix_nanos: envelope.time_unix_nanos,
        traceparent: envelope.traceparent.clone(),
        payload: Some(Payload::Incident(incident)),
        ..Default::default()
    });
    Ok(OutboxMessage {
        subject: subjects::incident(cluster, &kind),
        id,
        payload,
    })
}

impl Projection for WorkloadProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.mark();
        let mut touched = Vec::new();
        let mut writer = Writer {
            txn,
            pending: &mut pending,
            store: self.store.as_ref(),
        };
        match self.apply_checked(event, &mut writer, &mut touched) {
            Ok(incidents) => {
                self.changes.touched(event.stream_sequence, touched, incidents);
                Ok(())
            }
            Err(Failure::Gate(error)) => {
                pending.rollback_to_mark();
                self.metrics.gate_rejected(&self.durable, error.reason());
                Err(ApplyError::Reject(error.into_rejection()))
            }
            Err(Failure::Store(error)) => Err(ApplyError::Store(error)),
        }
    }
}

/// Folds `CNNF_HEARTBEATS` into the newest heartbeat of each node.
pub struct HeartbeatProjection {
    metrics: Metrics,
    durable: String,
}

impl HeartbeatProjection {
    /// A projection counting its refusals in `metrics`.
    pub fn new(metrics: Metrics, durable: &str) -> Self {
        Self {
            metrics,
            durable: durable.to_owned(),
        }
    }

    fn apply_checked(event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), Failure> {
        let envelope = &event.envelope;
        let (cluster, node) = check_origin(event.subject, envelope)?;
        let time = check_time(envelope)?;
        let heartbeat = match &envelope.payload {
            Some(Payload::NodeHeartbeat(heartbeat)) => heartbeat,
            other => {
                return Err(GateError::UnexpectedEvent {
                    found: other.as_ref().map_or("empty", payload_name),
                    subject: event.subject.to_owned(),
                }
                .into())
            }
        };
        let key = registry::node_key(cluster.as_str(), node.as_str());
        if let Some(bytes) = txn.get(registry::HEARTBEATS, &key)? {
            let known: registry::Liveness = registry::decode("liveness", &bytes)?;
            if known.last_heartbeat_unix_nanos >= time {
                return Ok(());
            }
        }
        let liveness = registry::Liveness {
            cluster: cluster.to_string(),
            node: node.to_string(),
            last_heartbeat_unix_nanos: time,
            boot_id: heartbeat.boot_id.clone(),
            sequence: heartbeat.sequence,
        };
        txn.put(registry::HEARTBEATS, key, liveness.encode_to_vec());
        Ok(())
    }
}

impl Projection for HeartbeatProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        match Self::apply_checked(event, txn) {
            Ok(()) => Ok(()),
            Err(Failure::Gate(error)) => {
                self.metrics.gate_rejected(&self.durable, error.reason());
                Err(ApplyError::Reject(error.into_rejection()))
            }
            Err(Failure::Store(error)) => Err(ApplyError::Store(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnf_proto::v1::{NodeGone, WorkloadStarted, WorkloadStopped};
    use cnnf_store::MemStore;

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_700_000_000 * S;

    /// Applies events one batch at a time, as the runner does.
    struct Harness {
        store: Arc<dyn ProjectionStore>,
        pending: Arc<Mutex<Pending>>,
        changes: Arc<Changes>,
        projection: WorkloadProjection,
        sequence: u64,
    }

    impl Harness {
        fn new() -> Self {
            let store: Arc<dyn ProjectionStore> = Arc::new(MemStore::new(registry::TABLES));
            let pending = Arc::new(Mutex::new(Pending::default()));
            let changes = Arc::new(Changes::default());
            let projection = WorkloadProjection::new(
                Arc::clone(&store),
                Arc::clone(&pending),
                Arc::clone(&changes),
                Metrics::default(),
                "test",
            );
            Self {
                store,
                pending,
                changes,
                projection,
                sequence: 0,
            }
        }

        /// Applies `events` (subject, envelope) in one batch; returns each outcome.
        fn batch(&mut self, events: Vec<(String, Envelope)>) -> Vec<Result<(), String>> {
            let store = Arc::clone(&self.store);
            let mut txn = Txn::new(store.as_ref());
            let mut outcomes = Vec::new();
            for (subject, envelope) in events {
                self.sequence += 1;
                let event = Event {
                    subject: &subject,
                    stream_sequence: self.sequence,
                    received_unix_nanos: T0,
                    envelope,
                };
                txn.mark();
                match self.projection.apply(&event, &mut txn) {
                    Ok(()) => outcomes.push(Ok(())),
                    Err(ApplyError::Reject(rejection)) => {
                        txn.rollback_to_mark();
                        outcomes.push(Err(rejection.to_string()));
                    }
                    Err(error) => panic!("store error: {error}"),
                }
            }
            store.write(txn.into_batch()).unwrap();
            self.pending.lock().unwrap().clear();
            self.changes.committed(self.sequence);
            outcomes
        }

        fn one(&mut self, subject: String, envelope: Envelope) -> Result<(), String> {
            self.batch(vec![(subject, envelope)]).remove(0)
        }

        fn holders(&self, address: &str, at: i64) -> Vec<String> {
            registry::holdings_at(self.store.as_ref(), address, at)
                .unwrap()
                .iter()
                .map(|holding| holding.decode_workload().unwrap().container_id)
                .collect()
        }
    }

    fn subject(node: &str) -> String {
        format!("cnnf.workload.c.{node}")
    }

    fn workload(node: &str, container: &str, image: &str, addresses: &[&str]) -> Workload {
        Workload {
            container_id: container.into(),
            image_id: image.into(),
            image_name: format!("{image}:1"),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            cluster: "c".into(),
            node: node.into(),
            ..Default::default()
        }
    }

    fn envelope(node: &str, time: i64, payload: Payload) -> Envelope {
        Envelope {
            schema_version: 1,
            event_id: format!("{node}:b:{time}"),
            cluster: "c".into(),
            node: node.into(),
            time_unix_nanos: time,
            payload: Some(payload),
            ..Default::default()
        }
    }

    fn start(node: &str, container: &str, image: &str, addresses: &[&str], time: i64) -> (String, Envelope) {
        let payload = Payload::WorkloadStarted(WorkloadStarted {
            workload: Some(workload(node, container, image, addresses)),
        });
        (subject(node), envelope(node, time, payload))
    }

    fn stop(node: &str, container: &str, time: i64) -> (String, Envelope) {
        let payload = Payload::WorkloadStopped(WorkloadStopped {
            workload: Some(workload(node, container, "", &[])),
            reason: "exited".into(),
        });
        (subject(node), envelope(node, time, payload))
    }

    #[test]
    fn a_late_stop_closes_only_the_holding_its_container_opened() {
        let mut h = Harness::new();
        let (s, e) = start("n1", "old", "img-a", &["10.0.0.5"], T0);
        h.one(s, e).unwrap();
        // The new holder's start arrives before the old holder's stop.
        let (s, e) = start("n2", "new", "img-b", &["10.0.0.5"], T0 + 11 * S);
        h.one(s, e).unwrap();
        let (s, e) = stop("n1", "old", T0 + 10 * S);
        h.one(s, e).unwrap();
        assert_eq!(h.holders("10.0.0.5", T0 + 9 * S), ["old"]);
        assert!(h.holders("10.0.0.5", T0 + 10 * S + S / 2).is_empty());
        assert_eq!(h.holders("10.0.0.5", T0 + 11 * S), ["new"]);
        assert_eq!(h.holders("10.0.0.5", T0 + 1000 * S), ["new"]);
        assert_eq!(
            registry::kv_value(h.store.as_ref(), "10.0.0.5").unwrap(),
            Some(registry::encode_workload(&workload(
                "n2",
                "new",
                "img-b",
                &["10.0.0.5"]
            )))
        );
    }

    #[test]
    fn two_claims_at_once_are_both_recorded_and_reported() {
        let mut h = Harness::new();
        let (s1, e1) = start("n1", "one", "img-a", &["10.0.0.9"], T0);
        let (s2, e2) = start("n2", "two", "img-b", &["10.0.0.9"], T0 + S);
        // In one batch: the second claim must see the first one's pending write.
        assert!(h.batch(vec![(s1, e1), (s2, e2)]).iter().all(Result::is_ok));
        assert_eq!(h.holders("10.0.0.9", T0 + 2 * S), ["one", "two"]);
        assert_eq!(registry::kv_value(h.store.as_ref(), "10.0.0.9").unwrap(), None);
        let outbox = h.store.scan_prefix(registry::INCIDENT_OUTBOX, b"", 10).unwrap();
        assert_eq!(outbox.len(), 1);
        let message: OutboxMessage = registry::decode("outbox", &outbox[0].1).unwrap();
        assert_eq!(message.subject, "cnnf.incident.c.address-conflict");
        assert_eq!(message.id, "ingest:CNNF_WORKLOADS:2:0");
        let incident = match cnnf_core::envelope::decode(&message.payload, 1 << 20).unwrap().payload {
            Some(Payload::Incident(incident)) => incident,
            other => panic!("{other:?}"),
        };
        assert_eq!(incident.kind, incident::Kind::AddressConflict as i32);
        assert_eq!(incident.details["address"], "10.0.0.9");
        // One stops: the other is the only holder again and the KV shows it.
        let (s, e) = stop("n1", "one", T0 + 5 * S);
        h.one(s, e).unwrap();
        assert_eq!(h.holders("10.0.0.9", T0 + 6 * S), ["two"]);
        assert!(registry::kv_value(h.store.as_ref(), "10.0.0.9").unwrap().is_some());
    }

    #[test]
    fn a_restarted_agent_reannouncing_a_container_changes_nothing() {
        let mut h = Harness::new();
        let (s, e) = start("n1", "c1", "img-a", &["fd00::1", "FD00:0::1", "10.0.0.1"], T0);
        h.one(s, e).unwrap();
        let before = cnnf_store::dump(h.store.as_ref()).unwrap();
        let (s, e) = start("n1", "c1", "img-a", &["10.0.0.1", "fd00::1"], T0 + 60 * S);
        h.one(s, e).unwrap();
        let after = cnnf_store::dump(h.store.as_ref()).unwrap();
        let registry_only = |dump: &Vec<(&'static str, cnnf_store::Entry)>| {
            dump.iter()
                .filter(|(table, _)| registry::REGISTRY_TABLES.contains(table))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(registry_only(&before), registry_only(&after));
        assert_eq!(h.holders("fd00::1", T0), ["c1"]);
        assert_eq!(
            h.store.scan_prefix(registry::INCIDENT_OUTBOX, b"", 10).unwrap().len(),
            0
        );
    }

    #[test]
    fn node_gone_releases_the_node_once_at_its_event_time() {
        let mut h = Harness::new();
        let (s1, e1) = start("n1", "a", "img-a", &["10.0.0.1"], T0);
        let (s2, e2) = start("n10", "b", "img-b", &["10.0.0.2"], T0);
        let gone = |time: i64, last: i64| {
            let payload = Payload::NodeGone(NodeGone {
                last_heartbeat_unix_nanos: last,
                ..Default::default()
            });
            (subject("n1"), envelope("n1", time, payload))
        };
        let (s3, e3) = gone(T0 + 32 * S, T0 + 2 * S);
        assert!(h.batch(vec![(s1, e1), (s2, e2), (s3, e3)]).iter().all(Result::is_ok));
        assert_eq!(h.holders("10.0.0.1", T0 + 31 * S), ["a"]);
        assert!(h.holders("10.0.0.1", T0 + 32 * S).is_empty());
        // Node n10 is another node, however alike the names.
        assert_eq!(h.holders("10.0.0.2", T0 + 40 * S), ["b"]);
        // A repeat of the same silence releases nothing, even what started since.
        let (s, e) = start("n1", "c", "img-c", &["10.0.0.3"], T0 + 50 * S);
        h.one(s, e).unwrap();
        let (s, e) = gone(T0 + 60 * S, T0 + 2 * S);
        h.one(s, e).unwrap();
        assert_eq!(h.holders("10.0.0.3", T0 + 70 * S), ["c"]);
    }

    #[test]
    fn the_gate_refuses_what_is_wrong_and_keeps_nothing_of_it() {
        let mut h = Harness::new();
        let (_, spoofed) = start("n2", "x", "img", &["10.0.0.1"], T0);
        let (s, mut no_time) = start("n1", "x", "img", &["10.0.0.1"], T0);
        no_time.time_unix_nanos = 0;
        let (_, mut other_node) = start("n1", "x", "img", &["10.0.0.1"], T0);
        if let Some(Payload::WorkloadStarted(started)) = &mut other_node.payload {
            started.workload.as_mut().unwrap().node = "n2".into();
        }
        let cases: Vec<((String, Envelope), &str)> = vec![
            ((subject("n1"), spoofed), "origin-mismatch"),
            ((s.clone(), no_time), "missing-time"),
            (start("n1", "x", "img", &[], T0), "no-addresses"),
            (start("n1", "x", "img", &["10.0.0.300"], T0), "invalid-address"),
            (start("n1", "", "img", &["10.0.0.1"], T0), "invalid-container-id"),
            (start("n1", "x", "", &["10.0.0.1"], T0), "invalid-image-id"),
            (start("n1", "x\n", "img", &["10.0.0.1"], T0), "invalid-container-id"),
            ((s.clone(), other_node), "workload-origin-mismatch"),
            (
                (
                    s.clone(),
                    envelope("n1", T0, Payload::WorkloadStarted(WorkloadStarted { workload: None })),
                ),
                "missing-workload",
            ),
            (
                (
                    s.clone(),
                    envelope(
                        "n1",
                        T0,
                        Payload::NodeHeartbeat(cnnf_proto::v1::NodeHeartbeat::default()),
                    ),
                ),
                "unexpected-event",
            ),
            (
                (
                    "cnnf.workload.c.n1.x".to_owned(),
                    start("n1", "x", "img", &["10.0.0.1"], T0).1,
                ),
                "origin-mismatch",
            ),
            (
                (
                    s.clone(),
                    envelope(
                        "n1",
                        T0,
                        Payload::NodeGone(NodeGone {
                            last_heartbeat_unix_nanos: T0 + S,
                            ..Default::default()
                        }),
                    ),
                ),
                "invalid-last-heartbeat",
            ),
        ];
        let (events, reasons): (Vec<_>, Vec<_>) = cases.into_iter().unzip();
        let outcomes = h.batch(events);
        for (outcome, reason) in outcomes.iter().zip(&reasons) {
            let error = outcome.as_ref().expect_err(reason);
            assert!(error.starts_with(reason), "{error} is not {reason}");
        }
        for table in registry::TABLES {
            assert!(
                h.store.scan_prefix(table, b"", 1).unwrap().is_empty(),
                "{table} was written"
            );
        }
    }
}
