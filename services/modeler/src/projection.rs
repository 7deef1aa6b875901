//! The three folds of the modeler, one per runner, each the only writer
//! of its tables (see [`crate::store`]).
//!
//! - [`WorkloadProjection`] (`CNNF_WORKLOADS`): image liveness. The first
//!   time an image is seen anywhere in the fleet it writes a `Created`
//!   model event to its outbox, with learning ending `learning period`
//!   after that event's time. When an image's last container stops, and
//!   when one starts again, it writes a `Liveness` model event: the
//!   learning clock counts only time the image is alive.
//! - [`WorkloadProjection`] also keeps the placements: per node and image,
//!   each container's start and stop (event and receive times), and the
//!   receive time of the newest workload message applied.
//! - [`FlowProjection`] (`CNNF_FLOWS`): first the placement check
//!   ([`PlacementCheck`]): the decision's local image end must have run on
//!   the reporting node at the decision's time, or the message is refused
//!   (`image-not-on-node`); until the workloads runner is known to have
//!   applied what the server received up to the message's receive time
//!   plus the grace, the message is not decidable yet
//!   (`ApplyError::NotYet`). Then, for each decision, the sides the node
//!   hosts whose model is learning (as the models runner last committed it) are
//!   forwarded as one `Learned` event per image and flow message, unless
//!   the image is in a burst (more than `burst limit` new connections in
//!   `burst window` of the server's receive time): the excess is not learned and a
//!   `LEARNING_BURST` incident is raised, once per window. An image seen in
//!   a decision before it has a model gets one: the flows runner publishes
//!   a `Created` for it ahead of its `Learned`.
//! - [`ModelProjection`] (`CNNF_MODELS`): the state machine. It applies
//!   every model event, from the log, in log order: created (the first
//!   `Created` of an image makes its model; any later one, from the other
//!   producer or a rebuild, changes nothing), learned (only
//!   while learning, only connections first seen before learning ends),
//!   locked, extended, relearn, connection deleted, liveness (a pause
//!   moves the learning end by its length). The model set is a
//!   function of the `CNNF_WORKLOADS` and `CNNF_MODELS` logs alone, so a
//!   replay reproduces it exactly.
//!
//! Derived events go through outboxes with deterministic ids
//! (`cnnf_core::ids::derived`), published after the commit that wrote them.
//! JetStream drops a republished copy only within its duplicate window, so
//! [`ModelProjection`] also applies derived events idempotently by their
//! source: per image and producer stream it keeps the highest source
//! position (sequence, part) it applied ([`store::MODELS_SOURCES`], written
//! in the same batch) and ignores a derived event at or below it (see
//! [`derived_source`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cnnf_bus::runner::ApplyError;
use cnnf_bus::topology::{FLOWS, WORKLOADS};
use cnnf_bus::{Event, Projection};
use cnnf_core::envelope::Rejection;
use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{
    envelope::Payload, incident, model_event, ConnectionDecision, Direction, Envelope, Incident, LearnedConnection,
    ModelEvent, ModelState, Side,
};
use cnnf_store::{ProjectionStore, Txn};
use prometheus_client::metrics::counter::Counter;
use prost::Message as _;

use crate::store::{
    self, BurstRecord, ImageRecord, ModelRecord, OutboxMessage, Placements, Span, CONTAINERS, FLOWS_BURST, FLOWS_KNOWN,
    FLOWS_OUTBOX, IMAGES, LEARNED, MODELS, MODELS_SOURCES, PLACEMENTS, WORKLOADS_OUTBOX,
};

/// Producer name in the ids of what the modeler publishes.
pub const PRODUCER: &str = "modeler";
/// Subject token of learning burst incidents.
pub const LEARNING_BURST: &str = "learning-burst";
/// Actor of events the modeler derives from traffic and workloads.
pub const ACTOR_LEARNING: &str = "learning";

fn invalid(detail: impl Into<String>) -> ApplyError {
    ApplyError::Reject(Rejection::Invalid(detail.into()))
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// An envelope around a model event, on `cnnf.model.<image>`.
pub fn model_envelope(
    cluster: &str,
    id: &str,
    time: i64,
    event: ModelEvent,
) -> Result<OutboxMessage, subjects::InvalidToken> {
    let subject = subjects::model(&Token::new("image_id", &event.image_id)?);
    let envelope = Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id.to_owned(),
        cluster: cluster.to_owned(),
        time_unix_nanos: time,
        payload: Some(Payload::Model(event)),
        ..Envelope::default()
    };
    Ok(OutboxMessage {
        subject,
        id: id.to_owned(),
        payload: envelope.encode_to_vec(),
    })
}

/// Reads a record, absent as `None`.
fn read<M: prost::Message + Default>(txn: &Txn<'_>, table: &'static str, key: &[u8]) -> Result<Option<M>, ApplyError> {
    match txn.get(table, key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(store::decode(table, &bytes)?)),
    }
}

/// Image liveness from workload events.
pub struct WorkloadProjection {
    learning_period: Duration,
}

impl WorkloadProjection {
    /// A fold with learning period `learning_period`.
    pub fn new(learning_period: Duration) -> Self {
        Self { learning_period }
    }
}

/// Records that `container` of `image` started on `node` of `cluster`.
fn place(txn: &mut Txn<'_>, event: &Event<'_>, image: &str, container: &str) -> Result<(), ApplyError> {
    let envelope = &event.envelope;
    let key = store::placement_key(&envelope.cluster, &envelope.node, image);
    let mut placements = read::<Placements>(txn, PLACEMENTS, &key)?.unwrap_or_default();
    let running = placements
        .spans
        .iter()
        .any(|span| span.container_id == container && span.stopped_received_unix_nanos == 0);
    if !running {
        placements.spans.push(Span {
            container_id: container.to_owned(),
            started_unix_nanos: envelope.time_unix_nanos,
            started_received_unix_nanos: event.received_unix_nanos,
            stopped_unix_nanos: 0,
            stopped_received_unix_nanos: 0,
        });
    }
    placements.prune(event.received_unix_nanos);
    txn.put(PLACEMENTS, key, placements.encode_to_vec());
    Ok(())
}

/// Records that `container` (of whichever image it ran) stopped on the
/// node of the event, at the event's time.
fn unplace(txn: &mut Txn<'_>, event: &Event<'_>, container: &str) -> Result<(), ApplyError> {
    let Some(image) = txn.get(CONTAINERS, container.as_bytes())? else {
        return Ok(());
    };
    let envelope = &event.envelope;
    let key = store::placement_key(&envelope.cluster, &envelope.node, &String::from_utf8_lossy(&image));
    let Some(mut placements) = read::<Placements>(txn, PLACEMENTS, &key)? else {
        return Ok(());
    };
    for span in &mut placements.spans {
        if span.container_id == container && span.stopped_received_unix_nanos == 0 {
            span.stopped_unix_nanos = envelope.time_unix_nanos.max(span.started_unix_nanos);
            span.stopped_received_unix_nanos = event.received_unix_nanos.max(1);
        }
    }
    placements.prune(event.received_unix_nanos);
    txn.put(PLACEMENTS, key, placements.encode_to_vec());
    Ok(())
}

impl Projection for WorkloadProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let time = envelope.time_unix_nanos;
        // How far the flows runner may trust this projection: every
        // workload message the server received by then is applied.
        let received = txn
            .get(PLACEMENTS, store::WORKLOADS_RECEIVED_KEY)?
            .and_then(|bytes| bytes.try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(i64::MIN)
            .max(event.received_unix_nanos);
        txn.put(
            PLACEMENTS,
            store::WORKLOADS_RECEIVED_KEY.to_vec(),
            received.to_be_bytes().to_vec(),
        );
        // Images whose liveness changed: (image, alive).
        let mut liveness: Vec<(String, bool)> = Vec::new();
        match &envelope.payload {
            Some(Payload::WorkloadStarted(started)) => {
                let workload = started
                    .workload
                    .as_ref()
                    .ok_or_else(|| invalid("the event carries no workload"))?;
                let image = Token::new("image_id", &workload.image_id)
                    .map_err(|error| invalid(format!("invalid-image-id: {error}")))?;
                if workload.container_id.is_empty() {
                    return Err(invalid("invalid-container-id: container_id is empty"));
                }
                let key = image.as_str().as_bytes();
                let mut record = match read::<ImageRecord>(txn, IMAGES, key)? {
                    Some(record) => {
                        if record.containers.is_empty() {
                            liveness.push((image.as_str().to_owned(), true));
                        }
                        record
                    }
                    None => {
                        let created = ModelEvent {
                            image_id: image.as_str().to_owned(),
                            revision: 0,
                            actor: ACTOR_LEARNING.to_owned(),
                            change: Some(model_event::Change::Created(model_event::Created {
                                image_name: workload.image_name.clone(),
                                learning_ends_unix_nanos: time.saturating_add(nanos(self.learning_period)),
                            })),
                        };
                        let id = cnnf_core::ids::derived(PRODUCER, WORKLOADS, event.stream_sequence, None);
                        let message = model_envelope(&envelope.cluster, &id, time, created)
                            .map_err(|error| invalid(error.to_string()))?;
                        txn.put(
                            WORKLOADS_OUTBOX,
                            store::outbox_key(event.stream_sequence, 0),
                            message.encode_to_vec(),
                        );
                        ImageRecord {
                            image_name: workload.image_name.clone(),
                            first_seen_unix_nanos: time,
                            containers: Vec::new(),
                            namespaces: Default::default(),
                        }
                    }
                };
                if let Err(at) = record.containers.binary_search(&workload.container_id) {
                    record.containers.insert(at, workload.container_id.clone());
                }
                if workload.namespace.is_empty() {
                    record.namespaces.remove(&workload.container_id);
                } else {
                    record
                        .namespaces
                        .insert(workload.container_id.clone(), workload.namespace.clone());
                }
                txn.put(IMAGES, key.to_vec(), record.encode_to_vec());
                txn.put(CONTAINERS, workload.container_id.as_bytes().to_vec(), key.to_vec());
                place(txn, event, image.as_str(), &workload.container_id)?;
            }
            Some(Payload::WorkloadStopped(stopped)) => {
                let workload = stopped
                    .workload
                    .as_ref()
                    .ok_or_else(|| invalid("the event carries no workload"))?;
                unplace(txn, event, &workload.container_id)?;
                liveness.extend(remove_container(txn, &workload.container_id)?.map(|image| (image, false)));
            }
            Some(Payload::NodeGone(gone)) => {
                for container in &gone.container_ids {
                    unplace(txn, event, container)?;
                    liveness.extend(remove_container(txn, container)?.map(|image| (image, false)));
                }
            }
            // Other events on the stream say nothing about images.
            _ => {}
        }
        for (part, (image_id, alive)) in (1u32..).zip(liveness) {
            let change = ModelEvent {
                image_id,
                revision: 0,
                actor: ACTOR_LEARNING.to_owned(),
                change: Some(model_event::Change::Liveness(model_event::Liveness { alive })),
            };
            let id = cnnf_core::ids::derived(PRODUCER, WORKLOADS, event.stream_sequence, Some(part));
            let message =
                model_envelope(&envelope.cluster, &id, time, change).map_err(|error| invalid(error.to_string()))?;
            txn.put(
                WORKLOADS_OUTBOX,
                store::outbox_key(event.stream_sequence, part),
                message.encode_to_vec(),
            );
        }
        Ok(())
    }
}

/// Removes a running container; the image, if that was its last one.
fn remove_container(txn: &mut Txn<'_>, container: &str) -> Result<Option<String>, ApplyError> {
    let Some(image) = txn.get(CONTAINERS, container.as_bytes())? else {
        return Ok(None);
    };
    txn.delete(CONTAINERS, container.as_bytes().to_vec());
    if let Some(mut record) = read::<ImageRecord>(txn, IMAGES, &image)? {
        if let Ok(at) = record.containers.binary_search(&container.to_owned()) {
            record.containers.remove(at);
            record.namespaces.remove(container);
            let dead = record.containers.is_empty();
            txn.put(IMAGES, image.clone(), record.encode_to_vec());
            if dead {
                return Ok(Some(String::from_utf8_lossy(&image).into_owned()));
            }
        }
    }
    Ok(None)
}

/// Burst limits of learning.
#[derive(Debug, Clone, Copy)]
pub struct BurstLimit {
    /// Most new connections one learning image may learn in one window.
    pub limit: u64,
    /// The window, in event time.
    pub window: Duration,
}

/// What one flow message teaches one image: its connections, each once
/// (repeats merged), in the order the decisions named them.
struct ImageCandidates {
    /// The image's name, as the decision named it (for a `Created`).
    name: String,
    /// `(learned key, connection)`, in decision order.
    connections: Vec<(Vec<u8>, LearnedConnection)>,
    /// Position of each learned key in `connections`.
    index: HashMap<Vec<u8>, usize>,
}

/// Decisions to `Learned` events (and burst incidents).
///
/// The work of one flow message is grouped by image before any store
/// read: one model read and one burst record per image and message, one
/// "already forwarded" read per distinct connection, one `Learned` event
/// per image. A decision batch of an agent typically names few images and
/// many connections, so this keeps the reads per decision far below one.
///
/// An image seen in a decision before any model exists for it (its
/// `Created` from the workload stream not applied yet, or never coming:
/// traffic of an image whose workload events were lost) is "seen in the
/// fleet" all the same: the flows runner publishes a `Created` for it
/// (learning, from the earliest first sight in the message) ahead of its
/// `Learned`, and remembers that it did (`BurstRecord::model_created`), so
/// it treats the image as learning (generation 1) until the models runner
/// applied one. Whichever `Created` reaches `CNNF_MODELS` first makes the
/// model; the models runner ignores every later one, so two producers
/// never make two models nor reset one, and a replay of the log decides
/// the same way.
pub struct FlowProjection {
    burst: BurstLimit,
    learning_period: Duration,
    placement: PlacementCheck,
}

/// Dead-letter reason of a flow message that claims an image its node
/// does not run.
pub const IMAGE_NOT_ON_NODE: &str = "image-not-on-node";
/// Dead-letter reason of a flow message the workloads runner did not
/// catch up with within the runner's retry limit.
pub const WORKLOADS_BEHIND: &str = "workloads-behind";

/// What the flows runner checks a decision's images against: the
/// placements the workloads runner keeps, once it is known to have applied
/// every workload message the server received up to the flow message's
/// receive time plus `grace`.
#[derive(Debug, Clone, Default)]
pub struct PlacementCheck {
    /// Server time through which the workloads runner is known to have
    /// applied every workload message (Unix nanoseconds), kept by the
    /// service's watcher ([`crate::service::watch_workloads`]); the runner's
    /// own committed watermark counts too.
    pub caught_up: Arc<AtomicI64>,
    /// How much later than a flow message the server may have received a
    /// workload message its agent published before it (two streams, two
    /// stores, and the watcher's clock against the server's).
    pub grace: Duration,
}

/// One image end of a decision to check against the reporting node.
struct Claim<'a> {
    /// Index of the decision in its batch.
    index: usize,
    image: &'a str,
    first: i64,
    last: i64,
    /// The end the decision's direction says is local: if the node does not
    /// run it, the message lies.
    required: bool,
    /// Which side it would teach.
    side: Side,
}

fn image_end(endpoint: Option<&cnnf_proto::v1::Endpoint>) -> Option<&str> {
    let identity = endpoint?.identity.as_ref()?;
    (identity.kind == cnnf_proto::v1::IdentityKind::Image as i32 && Token::new("image_id", &identity.id).is_ok())
        .then_some(identity.id.as_str())
}

/// The image ends of `decision` its node must (or may) host. An ingress
/// decision is about the local destination only; an egress one (or one
/// without a direction) about the local source, and the destination too
/// when the same node runs it (the agent records a connection between two
/// of its own workloads as egress).
fn claims<'a>(index: usize, decision: &'a ConnectionDecision, time: i64, out: &mut Vec<Claim<'a>>) {
    let first = if decision.first_seen_unix_nanos > 0 {
        decision.first_seen_unix_nanos
    } else {
        time
    };
    let last = decision.last_seen_unix_nanos.max(first);
    let claim = |image, required, side| Claim {
        index,
        image,
        first,
        last,
        required,
        side,
    };
    let source = image_end(decision.source.as_ref());
    let destination = image_end(decision.destination.as_ref());
    if decision.direction == Direction::Ingress as i32 {
        out.extend(destination.map(|image| claim(image, true, Side::Inbound)));
    } else {
        out.extend(source.map(|image| claim(image, true, Side::Outbound)));
        out.extend(destination.map(|image| claim(image, false, Side::Inbound)));
    }
}

impl FlowProjection {
    /// A fold with burst limits `burst`; models it creates learn for
    /// `learning_period`; decisions are checked against the placements as
    /// `placement` says.
    pub fn new(burst: BurstLimit, learning_period: Duration, placement: PlacementCheck) -> Self {
        Self {
            burst,
            learning_period,
            placement,
        }
    }

    /// Which sides of each decision the reporting node may teach
    /// (`(source outbound, destination inbound)`), or why the message is
    /// refused or cannot be decided yet.
    fn teachable(
        &self,
        event: &Event<'_>,
        decisions: &[ConnectionDecision],
        txn: &Txn<'_>,
    ) -> Result<Vec<(bool, bool)>, ApplyError> {
        let envelope = &event.envelope;
        let mut found = Vec::new();
        for (index, decision) in decisions.iter().enumerate() {
            claims(index, decision, envelope.time_unix_nanos, &mut found);
        }
        let mut sides = vec![(false, false); decisions.len()];
        if found.is_empty() {
            return Ok(sides);
        }
        let cutoff = event.received_unix_nanos.saturating_add(nanos(self.placement.grace));
        let applied = txn
            .get(PLACEMENTS, store::WORKLOADS_RECEIVED_KEY)?
            .and_then(|bytes| bytes.try_into().ok().map(i64::from_be_bytes))
            .unwrap_or(i64::MIN);
        let progress = applied.max(self.placement.caught_up.load(Ordering::SeqCst));
        if progress < cutoff {
            return Err(ApplyError::NotYet(Rejection::Refused {
                reason: WORKLOADS_BEHIND,
                detail: format!(
                    "the workloads runner is known to have applied workload messages received through {progress}, \
                     not yet through {cutoff} (this flow message's receive time and the grace): waited for it in vain"
                ),
            }));
        }
        let mut placements: HashMap<&str, Option<Placements>> = HashMap::new();
        for claim in found {
            let record = match placements.get(claim.image) {
                Some(record) => record,
                None => {
                    let key = store::placement_key(&envelope.cluster, &envelope.node, claim.image);
                    let record = read::<Placements>(txn, PLACEMENTS, &key)?;
                    placements.entry(claim.image).or_insert(record)
                }
            };
            let placed = record
                .as_ref()
                .is_some_and(|record| record.ran_during(claim.first, claim.last, cutoff));
            if !placed {
                if claim.required {
                    return Err(ApplyError::Reject(Rejection::Refused {
                        reason: IMAGE_NOT_ON_NODE,
                        detail: format!(
                            "decision {} claims image {} ran on node {} of cluster {} between {} and {}, which that node \
                             never announced; nothing of the message is learned",
                            claim.index, claim.image, envelope.node, envelope.cluster, claim.first, claim.last
                        ),
                    }));
                }
                continue;
            }
            let entry = &mut sides[claim.index];
            match claim.side {
                Side::Outbound => entry.0 = true,
                _ => entry.1 = true,
            }
        }
        Ok(sides)
    }

    /// The candidate (image, image name, connection) triples of one
    /// decision, on the sides `(source, destination)` it may teach.
    fn candidates(
        decision: &ConnectionDecision,
        time: i64,
        (teach_source, teach_destination): (bool, bool),
        out: &mut Vec<(String, String, LearnedConnection)>,
    ) {
        let (Some(source), Some(destination)) = (decision.source.as_ref(), decision.destination.as_ref()) else {
            return;
        };
        let (Some(src), Some(dst)) = (source.identity.as_ref(), destination.identity.as_ref()) else {
            return;
        };
        let first = if decision.first_seen_unix_nanos > 0 {
            decision.first_seen_unix_nanos
        } else {
            time
        };
        let last = decision.last_seen_unix_nanos.max(first);
        let connection = |side: Side, peer| LearnedConnection {
            side: side as i32,
            peer: Some(peer),
            port: destination.port,
            protocol: decision.protocol,
            first_seen_unix_nanos: first,
            last_seen_unix_nanos: last,
            count: decision.count.max(1),
        };
        let is_image = |identity: &cnnf_proto::v1::Identity| {
            identity.kind == cnnf_proto::v1::IdentityKind::Image as i32 && Token::new("image_id", &identity.id).is_ok()
        };
        if teach_source && is_image(src) {
            if let Some(peer) = store::peer_identity(dst) {
                out.push((src.id.clone(), src.name.clone(), connection(Side::Outbound, peer)));
            }
        }
        if teach_destination && is_image(dst) {
            if let Some(peer) = store::peer_identity(src) {
                out.push((dst.id.clone(), dst.name.clone(), connection(Side::Inbound, peer)));
            }
        }
    }

    /// The decisions of one message grouped by image (in image order).
    fn group(decisions: &[ConnectionDecision], time: i64, sides: &[(bool, bool)]) -> BTreeMap<String, ImageCandidates> {
        let mut images: BTreeMap<String, ImageCandidates> = BTreeMap::new();
        let mut found = Vec::new();
        for (decision, sides) in decisions.iter().zip(sides) {
            Self::candidates(decision, time, *sides, &mut found);
            for (image, name, connection) in found.drain(..) {
                let key = store::learned_key(&image, &connection);
                let entry = match images.get_mut(&image) {
                    Some(entry) => entry,
                    None => images.entry(image).or_insert_with(|| ImageCandidates {
                        name,
                        connections: Vec::new(),
                        index: HashMap::new(),
                    }),
                };
                match entry.index.get(&key) {
                    Some(&at) => merge(&mut entry.connections[at].1, &connection),
                    None => {
                        entry.index.insert(key.clone(), entry.connections.len());
                        entry.connections.push((key, connection));
                    }
                }
            }
        }
        images
    }

    /// Puts one outbox message (part `part` of flow message `sequence`).
    fn outbox(txn: &mut Txn<'_>, sequence: u64, part: u32, message: &OutboxMessage) {
        txn.put(FLOWS_OUTBOX, store::outbox_key(sequence, part), message.encode_to_vec());
    }
}

impl Projection for FlowProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let Some(Payload::Decisions(batch)) = &envelope.payload else {
            return Err(invalid(
                "unexpected-event: only DecisionBatch events belong on CNNF_FLOWS",
            ));
        };
        let time = envelope.time_unix_nanos;
        // Bursts are counted in the server's receive time: a node can forge
        // its decisions' times, not when the server stored them.
        let received = event.received_unix_nanos;
        let sequence = event.stream_sequence;
        let window = nanos(self.burst.window);
        let mut incidents: Vec<(String, BurstRecord)> = Vec::new();
        let sides = self.teachable(event, &batch.decisions, txn)?;
        let grouped = Self::group(&batch.decisions, time, &sides);
        // Parts are fixed by the message alone, whatever the model state:
        // image `i` (in image order) owns parts 2i (its `Created`) and
        // 2i + 1 (its `Learned`); incidents follow. A rebuild that derives
        // differently from the live run (another model state) can then
        // never reuse an id for other content.
        let mut incident_part = u32::try_from(grouped.len().saturating_mul(2)).unwrap_or(u32::MAX);
        for (index, (image, candidates)) in grouped.into_iter().enumerate() {
            let created_part = u32::try_from(index.saturating_mul(2)).unwrap_or(u32::MAX);
            let image_key = image.as_bytes();
            let mut flow_state: Option<BurstRecord> = None;
            let (learning, generation, create) = match read::<ModelRecord>(txn, MODELS, image_key)? {
                Some(model) => (model.learning(), model.generation, false),
                None => {
                    let state = read::<BurstRecord>(txn, FLOWS_BURST, image_key)?.unwrap_or_default();
                    let create = !state.model_created;
                    flow_state = Some(state);
                    // A model this runner created (or is creating) learns, generation 1.
                    (true, 1, create)
                }
            };
            if !learning {
                continue;
            }
            let mut burst = match flow_state {
                Some(state) => state,
                None => read::<BurstRecord>(txn, FLOWS_BURST, image_key)?.unwrap_or_default(),
            };
            let mut burst_changed = false;
            if create {
                let seen = candidates
                    .connections
                    .iter()
                    .map(|(_, connection)| connection.first_seen_unix_nanos)
                    .min()
                    .unwrap_or(time)
                    .min(time);
                let created = ModelEvent {
                    image_id: image.clone(),
                    revision: 0,
                    actor: ACTOR_LEARNING.to_owned(),
                    change: Some(model_event::Change::Created(model_event::Created {
                        image_name: candidates.name.clone(),
                        learning_ends_unix_nanos: seen.saturating_add(nanos(self.learning_period)),
                    })),
                };
                let id = cnnf_core::ids::derived(PRODUCER, FLOWS, sequence, Some(created_part));
                let message = model_envelope(&envelope.cluster, &id, seen, created)
                    .map_err(|error| invalid(error.to_string()))?;
                Self::outbox(txn, sequence, created_part, &message);
                burst.model_created = true;
                burst_changed = true;
            }
            let mut learned = Vec::with_capacity(candidates.connections.len());
            let known_generation = cnnf_store::encode_u64(generation);
            for (key, connection) in candidates.connections {
                let known = txn
                    .get(FLOWS_KNOWN, &key)?
                    .and_then(|bytes| cnnf_store::decode_u64(&bytes))
                    .is_some_and(|known| known == generation);
                if !known {
                    if burst.new_count == 0 || received.saturating_sub(burst.window_start_unix_nanos) >= window {
                        burst = BurstRecord {
                            window_start_unix_nanos: received,
                            new_count: 0,
                            incident_raised: false,
                            model_created: burst.model_created,
                        };
                    }
                    burst_changed = true;
                    if burst.new_count >= self.burst.limit {
                        if !burst.incident_raised {
                            burst.incident_raised = true;
                            incidents.push((image.clone(), burst.clone()));
                        }
                        continue;
                    }
                    burst.new_count += 1;
                    txn.put(FLOWS_KNOWN, key, known_generation.to_vec());
                }
                learned.push(connection);
            }
            if burst_changed {
                txn.put(FLOWS_BURST, image_key.to_vec(), burst.encode_to_vec());
            }
            if learned.is_empty() {
                continue;
            }
            let event_out = ModelEvent {
                image_id: image,
                revision: 0,
                actor: ACTOR_LEARNING.to_owned(),
                change: Some(model_event::Change::Learned(model_event::Learned {
                    connections: learned,
                })),
            };
            let learned_part = created_part.saturating_add(1);
            let id = cnnf_core::ids::derived(PRODUCER, FLOWS, sequence, Some(learned_part));
            let message =
                model_envelope(&envelope.cluster, &id, time, event_out).map_err(|error| invalid(error.to_string()))?;
            Self::outbox(txn, sequence, learned_part, &message);
        }
        for (image, burst) in incidents {
            let cluster =
                Token::new("cluster", &envelope.cluster).map_err(|error| invalid(format!("invalid-name: {error}")))?;
            let part = incident_part;
            incident_part = incident_part.saturating_add(1);
            let id = cnnf_core::ids::derived(PRODUCER, FLOWS, sequence, Some(part));
            let incident = Incident {
                incident_id: id.clone(),
                kind: incident::Kind::LearningBurst as i32,
                image_id: image.clone(),
                summary: format!(
                    "image {image} reached more than {} new peers or ports within {} s while learning; the excess was not learned",
                    self.burst.limit,
                    self.burst.window.as_secs_f64()
                ),
                details: [
                    ("limit".to_owned(), self.burst.limit.to_string()),
                    ("window_seconds".to_owned(), self.burst.window.as_secs_f64().to_string()),
                    ("window_start_unix_nanos".to_owned(), burst.window_start_unix_nanos.to_string()),
                ]
                .into_iter()
                .collect(),
            };
            let out = Envelope {
                schema_version: cnnf_proto::SCHEMA_VERSION,
                event_id: id.clone(),
                cluster: envelope.cluster.clone(),
                node: envelope.node.clone(),
                time_unix_nanos: time,
                payload: Some(Payload::Incident(incident)),
                ..Envelope::default()
            };
            let message = OutboxMessage {
                subject: subjects::incident(
                    &cluster,
                    &Token::new("kind", LEARNING_BURST).map_err(|e| invalid(e.to_string()))?,
                ),
                id,
                payload: out.encode_to_vec(),
            };
            Self::outbox(txn, sequence, part, &message);
            tracing::warn!(message = "Learning burst: excess connections not learned.", image = %image, limit = self.burst.limit);
        }
        Ok(())
    }
}

/// Folds `more` into `into`: earliest first seen, latest last seen, counts added.
fn merge(into: &mut LearnedConnection, more: &LearnedConnection) {
    into.first_seen_unix_nanos = into.first_seen_unix_nanos.min(more.first_seen_unix_nanos);
    into.last_seen_unix_nanos = into.last_seen_unix_nanos.max(more.last_seen_unix_nanos);
    into.count = into.count.saturating_add(more.count);
    if into.peer.as_ref().is_some_and(|peer| peer.name.is_empty()) {
        into.peer.clone_from(&more.peer);
    }
}

/// Learned keys written since the last commit: a relearn must delete them
/// too, and scans of the store do not see them yet.
pub type Pending = Arc<Mutex<BTreeSet<Vec<u8>>>>;

/// The model state machine, from `CNNF_MODELS`.
pub struct ModelProjection {
    store: Arc<dyn ProjectionStore>,
    pending: Pending,
    republished: Counter,
}

impl ModelProjection {
    /// A fold over `store`; `pending` is cleared by the runner's commit hook.
    pub fn new(store: Arc<dyn ProjectionStore>, pending: Pending) -> Self {
        Self {
            store,
            pending,
            republished: Counter::default(),
        }
    }

    /// Counts the derived events ignored as republished in `counter`.
    #[must_use]
    pub fn with_republished(mut self, counter: Counter) -> Self {
        self.republished = counter;
        self
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<Vec<u8>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The source of a model event the modeler derived: its producer stream
/// (`CNNF_FLOWS` or `CNNF_WORKLOADS`), that stream's sequence and the
/// part, read from its event id `modeler:<stream>:<sequence>[:<part>]` (no
/// part: 0). `None` for any other event (commands, the lock timer).
///
/// Per image, the events derived from one source message have increasing
/// parts (a `Created` before the `Learned` of the same flow message; a
/// `Created` or one `Liveness` per workload message), and the outboxes
/// are published in (sequence, part) order, so per image and stream the
/// source positions on `CNNF_MODELS` only grow: one at or below the
/// highest applied is a republished copy.
pub fn derived_source(event_id: &str) -> Option<(&'static str, u64, u32)> {
    let rest = event_id.strip_prefix(PRODUCER)?.strip_prefix(':')?;
    let (stream, rest) = rest.split_once(':')?;
    let stream = [FLOWS, WORKLOADS].into_iter().find(|known| *known == stream)?;
    let (sequence, part) = match rest.split_once(':') {
        Some((sequence, part)) => (sequence, part.parse::<u32>().ok()?),
        None => (rest, 0),
    };
    let sequence = sequence.parse::<u64>().ok()?;
    Some((stream, sequence, part))
}

fn count_of(record: &mut ModelRecord, side: i32) -> &mut u64 {
    if side == Side::Inbound as i32 {
        &mut record.inbound_count
    } else {
        &mut record.outbound_count
    }
}

impl Projection for ModelProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let Some(Payload::Model(model)) = &envelope.payload else {
            return Err(invalid(
                "unexpected-event: only ModelEvent events belong on CNNF_MODELS",
            ));
        };
        Token::new("image_id", &model.image_id).map_err(|error| invalid(format!("invalid-image-id: {error}")))?;
        let change = model
            .change
            .as_ref()
            .ok_or_else(|| invalid("no-change: the model event carries no change"))?;
        let source = derived_source(&envelope.event_id);
        if let Some((stream, source_sequence, part)) = source {
            let applied = txn
                .get(MODELS_SOURCES, &store::source_key(&model.image_id, stream))?
                .and_then(|bytes| store::decode_source(&bytes));
            if applied.is_some_and(|applied| (source_sequence, part) <= applied) {
                self.republished.inc();
                tracing::debug!(
                    message = "Derived model event already applied; ignored.",
                    event_id = %envelope.event_id,
                    image = %model.image_id
                );
                return Ok(());
            }
        }
        self.apply_change(event, model, change, txn)?;
        if let Some((stream, source_sequence, part)) = source {
            txn.put(
                MODELS_SOURCES,
                store::source_key(&model.image_id, stream),
                store::encode_source(source_sequence, part).to_vec(),
            );
        }
        Ok(())
    }
}

impl ModelProjection {
    /// Applies the change of one model event.
    fn apply_change(
        &mut self,
        event: &Event<'_>,
        model: &ModelEvent,
        change: &model_event::Change,
        txn: &mut Txn<'_>,
    ) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let key = model.image_id.as_bytes();
        let sequence = event.stream_sequence;
        let existing = read::<ModelRecord>(txn, MODELS, key)?;
        let mut record = match (change, existing) {
            (model_event::Change::Created(created), None) => {
                let record = ModelRecord {
                    image_name: created.image_name.clone(),
                    state: ModelState::Learning as i32,
                    learning_ends_unix_nanos: created.learning_ends_unix_nanos,
                    revision: sequence,
                    generation: 1,
                    ..ModelRecord::default()
                };
                txn.put(MODELS, key.to_vec(), record.encode_to_vec());
                return Ok(());
            }
            // Created again (a rebuilt workload projection): nothing changes.
            (model_event::Change::Created(_), Some(_)) => return Ok(()),
            (_, None) => return Err(invalid(format!("unknown-image: no model for image {}", model.image_id))),
            (_, Some(record)) => record,
        };
        let changed = match change {
            model_event::Change::Created(_) => false,
            model_event::Change::Learned(learned) => {
                let mut changed = false;
                if record.learning() {
                    let mut written = Vec::with_capacity(learned.connections.len());
                    for connection in &learned.connections {
                        if !store::valid_side(connection.side)
                            || connection.first_seen_unix_nanos >= record.learning_ends_unix_nanos
                        {
                            continue;
                        }
                        let learned_key = store::learned_key(&model.image_id, connection);
                        let merged = match read::<LearnedConnection>(txn, LEARNED, &learned_key)? {
                            Some(mut stored) => {
                                merge(&mut stored, connection);
                                stored
                            }
                            None => {
                                *count_of(&mut record, connection.side) += 1;
                                connection.clone()
                            }
                        };
                        txn.put(LEARNED, learned_key.clone(), merged.encode_to_vec());
                        written.push(learned_key);
                        changed = true;
                    }
                    self.pending().extend(written);
                }
                changed
            }
            model_event::Change::Locked(_) => {
                let learning = record.learning();
                if learning {
                    record.state = ModelState::Enforcing as i32;
                    record.locked_unix_nanos = envelope.time_unix_nanos;
                    record.paused_unix_nanos = 0;
                }
                learning
            }
            model_event::Change::Liveness(liveness) => {
                let time = envelope.time_unix_nanos;
                match (record.learning(), liveness.alive, record.paused_unix_nanos) {
                    // The last container stopped: the learning clock stands still.
                    (true, false, 0) => {
                        record.paused_unix_nanos = time.max(1);
                        true
                    }
                    // Alive again: learning ends later by the pause (the
                    // part of it before the end).
                    (true, true, paused) if paused != 0 => {
                        if paused < record.learning_ends_unix_nanos {
                            let pause = time.saturating_sub(paused).max(0);
                            record.learning_ends_unix_nanos = record.learning_ends_unix_nanos.saturating_add(pause);
                        }
                        record.paused_unix_nanos = 0;
                        true
                    }
                    _ => false,
                }
            }
            model_event::Change::Extended(extended) => {
                let learning = record.learning();
                if learning {
                    record.learning_ends_unix_nanos = extended.learning_ends_unix_nanos;
                }
                learning
            }
            model_event::Change::Relearn(relearn) => {
                let prefix = store::image_prefix(&model.image_id);
                let mut doomed: BTreeSet<Vec<u8>> = self
                    .store
                    .scan_prefix(LEARNED, &prefix, usize::MAX)?
                    .into_iter()
                    .map(|(key, _)| key)
                    .collect();
                doomed.extend(self.pending().iter().filter(|k| k.starts_with(&prefix)).cloned());
                for doomed_key in doomed {
                    txn.delete(LEARNED, doomed_key);
                }
                record.state = ModelState::Learning as i32;
                record.learning_ends_unix_nanos = relearn.learning_ends_unix_nanos;
                record.locked_unix_nanos = 0;
                record.paused_unix_nanos = 0;
                record.generation += 1;
                record.inbound_count = 0;
                record.outbound_count = 0;
                true
            }
            model_event::Change::ConnectionDeleted(deleted) => {
                let connection = deleted
                    .connection
                    .as_ref()
                    .ok_or_else(|| invalid("no-connection: nothing to delete"))?;
                let learned_key = store::learned_key(&model.image_id, connection);
                let present = txn.get(LEARNED, &learned_key)?.is_some();
                if present {
                    txn.delete(LEARNED, learned_key);
                    let count = count_of(&mut record, connection.side);
                    *count = count.saturating_sub(1);
                }
                present
            }
        };
        if changed {
            record.revision = sequence;
            txn.put(MODELS, key.to_vec(), record.encode_to_vec());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_of_a_derived_event_is_read_from_its_id() {
        assert_eq!(derived_source("modeler:CNNF_FLOWS:42:3"), Some((FLOWS, 42, 3)));
        assert_eq!(derived_source("modeler:CNNF_WORKLOADS:7"), Some((WORKLOADS, 7, 0)));
        assert_eq!(derived_source("modeler:CNNF_WORKLOADS:7:1"), Some((WORKLOADS, 7, 1)));
        for other in [
            "modeler-timer:sha256:aaaa:1:5",
            "modeler:CNNF_MODELS:3",
            "modeler:CNNF_FLOWS:x:1",
            "modeler:CNNF_FLOWS:1:y",
            "alice:cmd:1",
            "",
        ] {
            assert_eq!(derived_source(other), None, "{other}");
        }
    }
}
