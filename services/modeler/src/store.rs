//! Tables, key layout and stored records of the modeler.
//!
//! Each table has exactly one writer, so no two runners ever
//! read-modify-write the same key:
//!
//! | table | writer | key | value |
//! | --- | --- | --- | --- |
//! | `modeler_images` | workloads runner | image id | [`ImageRecord`]: name, first seen, alive containers |
//! | `modeler_containers` | workloads runner | container id | image id (for `NodeGone`) |
//! | `modeler_placements` | workloads runner | [`placement_key`] `<cluster> 0 <node> 0 <image>` | [`Placements`]: the image's containers on that node, started and stopped (event and receive times); and [`WORKLOADS_RECEIVED_KEY`]: the receive time of the newest workload message applied |
//! | `modeler_workloads_outbox` | workloads runner (puts), its drainer (deletes) | `<seq> <part>` | [`OutboxMessage`] |
//! | `modeler_models` | models runner | image id | [`ModelRecord`]: state, learning end, revision, generation |
//! | `modeler_learned` | models runner | [`learned_key`] | `cnnf.v1.LearnedConnection` |
//! | `modeler_models_sources` | models runner | [`source_key`] | highest source position applied ([`encode_source`]) |
//! | `modeler_flows_known` | flows runner | [`learned_key`] | generation (u64) the connection was forwarded in |
//! | `modeler_flows_burst` | flows runner | image id | [`BurstRecord`] |
//! | `modeler_flows_outbox` | flows runner (puts), its drainer (deletes) | `<seq> <part>` | [`OutboxMessage`] |
//!
//! The *model set* (what a replay must reproduce exactly) is
//! [`MODEL_TABLES`]: images, containers, placements, models, learned
//! connections and the applied sources of derived events.
//! Records are protobuf messages without maps, so their encoding is
//! deterministic.

use cnnf_proto::v1::{Identity, IdentityKind, LearnedConnection, Protocol, Side};

/// Image liveness, owned by the workloads runner.
pub const IMAGES: &str = "modeler_images";
/// Container to image, owned by the workloads runner.
pub const CONTAINERS: &str = "modeler_containers";
/// Which node runs which image's containers, and when; owned by the
/// workloads runner, read by the flows runner.
pub const PLACEMENTS: &str = "modeler_placements";
/// Key in [`PLACEMENTS`] of the server receive time (Unix nanoseconds,
/// big-endian i64) of the newest workload message the workloads runner
/// applied. No placement key starts with a 0 byte (a cluster name is
/// never empty).
pub const WORKLOADS_RECEIVED_KEY: &[u8] = b"\0workloads-received";
/// Stopped containers are kept this long (server receive time after
/// their stop) for late decisions: the flows stream's default retention.
pub const STOPPED_RETENTION_NANOS: i64 = 7 * 24 * 3600 * 1_000_000_000;
/// Most containers of one image on one node kept; beyond, the oldest
/// stopped go first.
pub const MAX_SPANS: usize = 256;
/// Model events derived from workload events, to publish after commit.
pub const WORKLOADS_OUTBOX: &str = "modeler_workloads_outbox";
/// Model state, owned by the models runner.
pub const MODELS: &str = "modeler_models";
/// Learned connections, owned by the models runner.
pub const LEARNED: &str = "modeler_learned";
/// Per image and producer stream, the highest source position (sequence,
/// part) of a derived model event the models runner applied, owned by the
/// models runner: a derived event at or below it is a republish and is
/// ignored.
pub const MODELS_SOURCES: &str = "modeler_models_sources";
/// Connections the flows runner already forwarded (burst accounting).
pub const FLOWS_KNOWN: &str = "modeler_flows_known";
/// Burst window per image, owned by the flows runner.
pub const FLOWS_BURST: &str = "modeler_flows_burst";
/// Learned events and incidents derived from decisions, to publish after commit.
pub const FLOWS_OUTBOX: &str = "modeler_flows_outbox";

/// Every table of the modeler store.
pub const TABLES: &[&str] = &[
    IMAGES,
    CONTAINERS,
    PLACEMENTS,
    WORKLOADS_OUTBOX,
    MODELS,
    LEARNED,
    MODELS_SOURCES,
    FLOWS_KNOWN,
    FLOWS_BURST,
    FLOWS_OUTBOX,
];

/// The tables that make up the model set: a replay of the log into an
/// empty store reproduces them byte for byte.
pub const MODEL_TABLES: &[&str] = &[IMAGES, CONTAINERS, PLACEMENTS, MODELS, LEARNED, MODELS_SOURCES];

/// What the modeler knows of an image's containers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageRecord {
    /// Image name as first started.
    #[prost(string, tag = "1")]
    pub image_name: String,
    /// Event time the image was first seen.
    #[prost(int64, tag = "2")]
    pub first_seen_unix_nanos: i64,
    /// Running containers, sorted, each once.
    #[prost(string, repeated, tag = "3")]
    pub containers: Vec<String>,
    /// The Kubernetes namespace of each running container that has one
    /// (container id to namespace); kept with `containers`.
    #[prost(btree_map = "string, string", tag = "4")]
    pub namespaces: std::collections::BTreeMap<String, String>,
}

impl ImageRecord {
    /// The namespaces the image runs in now, sorted, each once.
    pub fn running_namespaces(&self) -> Vec<String> {
        let namespaces: std::collections::BTreeSet<&String> = self.namespaces.values().collect();
        namespaces.into_iter().cloned().collect()
    }
}

/// One container of an image on a node: when it started and stopped, in
/// event time (the node's clock) and in receive time (the server's).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Event time of the start.
    #[prost(int64, tag = "2")]
    pub started_unix_nanos: i64,
    /// Server receive time of the start.
    #[prost(int64, tag = "3")]
    pub started_received_unix_nanos: i64,
    /// Event time of the stop (0: running).
    #[prost(int64, tag = "4")]
    pub stopped_unix_nanos: i64,
    /// Server receive time of the stop (0: running).
    #[prost(int64, tag = "5")]
    pub stopped_received_unix_nanos: i64,
}

/// The containers of one image on one node, oldest start first.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Placements {
    /// The containers, running and recently stopped.
    #[prost(message, repeated, tag = "1")]
    pub spans: Vec<Span>,
}

impl Placements {
    /// True if a container of the image ran on the node at some instant
    /// of `[first, last]` (event time), counting only what the server had
    /// received by `cutoff`: a start received later did not happen yet,
    /// nor did a stop received later. The answer is therefore the same
    /// however far the workloads runner has got beyond `cutoff`.
    pub fn ran_during(&self, first: i64, last: i64, cutoff: i64) -> bool {
        self.spans.iter().any(|span| {
            span.started_received_unix_nanos <= cutoff
                && span.started_unix_nanos <= last
                && (span.stopped_received_unix_nanos == 0
                    || span.stopped_received_unix_nanos > cutoff
                    || span.stopped_unix_nanos >= first)
        })
    }

    /// Drops stopped containers received stopped more than the retention
    /// before `received`, and the oldest stopped beyond [`MAX_SPANS`].
    pub fn prune(&mut self, received: i64) {
        let horizon = received.saturating_sub(STOPPED_RETENTION_NANOS);
        self.spans
            .retain(|span| span.stopped_received_unix_nanos == 0 || span.stopped_received_unix_nanos >= horizon);
        while self.spans.len() > MAX_SPANS {
            let Some(oldest) = self
                .spans
                .iter()
                .enumerate()
                .filter(|(_, span)| span.stopped_received_unix_nanos != 0)
                .min_by_key(|(_, span)| span.stopped_received_unix_nanos)
                .map(|(at, _)| at)
            else {
                break;
            };
            self.spans.remove(oldest);
        }
    }
}

/// Key of the placements of `image_id` on `node` of `cluster`:
/// `<cluster> 0 <node> 0 <image>`.
pub fn placement_key(cluster: &str, node: &str, image_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(cluster.len() + node.len() + image_id.len() + 2);
    key.extend_from_slice(cluster.as_bytes());
    key.push(0);
    key.extend_from_slice(node.as_bytes());
    key.push(0);
    key.extend_from_slice(image_id.as_bytes());
    key
}

/// The state of one model, as the `CNNF_MODELS` log made it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelRecord {
    /// Image name.
    #[prost(string, tag = "1")]
    pub image_name: String,
    /// `cnnf.v1.ModelState`.
    #[prost(int32, tag = "2")]
    pub state: i32,
    /// When learning ends (event time).
    #[prost(int64, tag = "3")]
    pub learning_ends_unix_nanos: i64,
    /// `CNNF_MODELS` stream sequence of the last change.
    #[prost(uint64, tag = "4")]
    pub revision: u64,
    /// Incremented by each relearn.
    #[prost(uint64, tag = "5")]
    pub generation: u64,
    /// Learned inbound connections.
    #[prost(uint64, tag = "6")]
    pub inbound_count: u64,
    /// Learned outbound connections.
    #[prost(uint64, tag = "7")]
    pub outbound_count: u64,
    /// Event time of the lock (0 while learning).
    #[prost(int64, tag = "8")]
    pub locked_unix_nanos: i64,
    /// Event time the image's last container stopped while learning (0:
    /// alive): the learning clock stands still until a container starts.
    #[prost(int64, tag = "9")]
    pub paused_unix_nanos: i64,
}

impl ModelRecord {
    /// True while the model learns.
    pub fn learning(&self) -> bool {
        self.state == cnnf_proto::v1::ModelState::Learning as i32
    }
}

/// What the flows runner keeps per image: new connections in the current
/// burst window, and whether it created the image's model.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BurstRecord {
    /// Event time the window started.
    #[prost(int64, tag = "1")]
    pub window_start_unix_nanos: i64,
    /// New connections forwarded in the window.
    #[prost(uint64, tag = "2")]
    pub new_count: u64,
    /// An incident was already raised for this window.
    #[prost(bool, tag = "3")]
    pub incident_raised: bool,
    /// The flows runner published a `Created` for the image (it was seen
    /// in a decision before any model existed): until the models runner
    /// applies a `Created`, the image learns, generation 1.
    #[prost(bool, tag = "4")]
    pub model_created: bool,
}

pub use cnnf_bus::outbox::OutboxMessage;

/// Key of an outbox message: part `part` of stream message `sequence`.
pub fn outbox_key(sequence: u64, part: u32) -> Vec<u8> {
    let mut key = sequence.to_be_bytes().to_vec();
    key.extend_from_slice(&part.to_be_bytes());
    key
}

/// A source position as stored in [`MODELS_SOURCES`]: the source
/// message's stream sequence, then the part, both big-endian.
pub fn encode_source(sequence: u64, part: u32) -> [u8; 12] {
    let mut out = [0; 12];
    out[..8].copy_from_slice(&sequence.to_be_bytes());
    out[8..].copy_from_slice(&part.to_be_bytes());
    out
}

/// Reads a stored source position. A bare sequence (8 bytes, written
/// before parts were recorded, when each source message derived at most
/// one event per image) covers every part of that message.
pub fn decode_source(bytes: &[u8]) -> Option<(u64, u32)> {
    match bytes.len() {
        8 => cnnf_store::decode_u64(bytes).map(|sequence| (sequence, u32::MAX)),
        12 => {
            let sequence = u64::from_be_bytes(bytes[..8].try_into().ok()?);
            let part = u32::from_be_bytes(bytes[8..].try_into().ok()?);
            Some((sequence, part))
        }
        _ => None,
    }
}

/// Key of the highest applied source sequence of `image_id`'s model
/// events derived from `stream`: `<image> 0 <stream>`.
pub fn source_key(image_id: &str, stream: &str) -> Vec<u8> {
    let mut key = image_prefix(image_id);
    key.extend_from_slice(stream.as_bytes());
    key
}

/// Prefix of every learned key of `image_id`.
pub fn image_prefix(image_id: &str) -> Vec<u8> {
    let mut key = image_id.as_bytes().to_vec();
    key.push(0);
    key
}

/// Key of one learned connection: `<image> 0 <side> <peer kind> <peer id> 0 <port BE32> <protocol>`.
/// Sorted by image, then side, then peer, then port.
pub fn learned_key(image_id: &str, connection: &LearnedConnection) -> Vec<u8> {
    let mut key = image_prefix(image_id);
    key.push(u8::try_from(connection.side).unwrap_or(0));
    let (kind, id) = connection
        .peer
        .as_ref()
        .map_or((0, ""), |peer| (peer.kind, peer.id.as_str()));
    key.push(u8::try_from(kind).unwrap_or(0));
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(&connection.port.to_be_bytes());
    key.push(u8::try_from(connection.protocol).unwrap_or(0));
    key
}

/// The identity a model names a peer by: kind, id and name only (not the
/// container or node that happened to carry it).
pub fn peer_identity(identity: &Identity) -> Option<Identity> {
    let kind = IdentityKind::try_from(identity.kind).ok()?;
    match kind {
        IdentityKind::Image | IdentityKind::HostApp | IdentityKind::NetworkObject if !identity.id.is_empty() => {
            Some(Identity {
                kind: identity.kind,
                id: identity.id.clone(),
                name: identity.name.clone(),
                ..Identity::default()
            })
        }
        _ => None,
    }
}

/// True for a side a learned connection may have.
pub fn valid_side(side: i32) -> bool {
    side == Side::Inbound as i32 || side == Side::Outbound as i32
}

/// True for a protocol a learned connection may have.
pub fn valid_protocol(protocol: i32) -> bool {
    Protocol::try_from(protocol).is_ok_and(|protocol| protocol != Protocol::Unspecified)
}

/// Decodes a stored record.
pub fn decode<M: prost::Message + Default>(what: &str, bytes: &[u8]) -> Result<M, cnnf_store::StoreError> {
    M::decode(bytes).map_err(|error| cnnf_store::StoreError::Engine(format!("stored {what} does not decode: {error}")))
}
