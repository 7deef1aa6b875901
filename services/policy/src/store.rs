//! Tables, key layout and stored records of the policy service.
//!
//! Each table has exactly one writer (a projection runner), so no two
//! runners ever read-modify-write one key:
//!
//! | table | writer | key | value |
//! | --- | --- | --- | --- |
//! | `policy_objects` | policy runner | object name | `cnnf.v1.NetworkObject` |
//! | `policy_rules` | policy runner | rule id | `cnnf.v1.Rule` |
//! | `policy_settings` | policy runner | `mode`, `host_mode` | mode (u64) |
//! | `policy_imported_learned` | policy runner | [`learned_key`] | `cnnf.v1.LearnedConnection` |
//! | `policy_models` | models runner | image id | [`ModelRow`] |
//! | `policy_model_learned` | models runner | [`learned_key`] | `cnnf.v1.LearnedConnection` |
//! | `policy_containers` | workloads runner | container id | `cnnf.v1.Workload` |
//! | `policy_node_containers` | workloads runner | `<node> 0 <container>` | image id |
//! | `policy_image_nodes` | workloads runner | `<image> 0 <node> 0 <container>` | empty |
//! | `policy_nodes` | workloads runner | node | empty: every node that ever ran a workload |
//! | `policy_images` | workloads runner | image id | `cnnf.v1.Workload`: its latest started container |
//!
//! The policy revision is the applied sequence of the policy runner (its
//! consumer reads only this cluster's policy subjects), kept by the runner
//! in the `meta` table in the same write as the change.

use cnnf_proto::v1::{LearnedConnection, ModelState};

/// Network objects, by name.
pub const OBJECTS: &str = "policy_objects";
/// Rules, by id.
pub const RULES: &str = "policy_rules";
/// Modes.
pub const SETTINGS: &str = "policy_settings";
/// Learned connections imported with a whole policy.
pub const IMPORTED_LEARNED: &str = "policy_imported_learned";
/// Model state per image, from `CNNF_MODELS`.
pub const MODELS: &str = "policy_models";
/// Learned connections per image, from `CNNF_MODELS`.
pub const MODEL_LEARNED: &str = "policy_model_learned";
/// Running containers.
pub const CONTAINERS: &str = "policy_containers";
/// Containers by node.
pub const NODE_CONTAINERS: &str = "policy_node_containers";
/// Nodes by image.
pub const IMAGE_NODES: &str = "policy_image_nodes";
/// Every node that ever ran a workload.
pub const NODES: &str = "policy_nodes";
/// The most recently started container of each image (labels, namespace).
pub const IMAGES: &str = "policy_images";

/// Key of the container mode in [`SETTINGS`].
pub const MODE_KEY: &[u8] = b"mode";
/// Key of the host mode in [`SETTINGS`].
pub const HOST_MODE_KEY: &[u8] = b"host_mode";

/// Every table of the policy store.
pub const TABLES: &[&str] = &[
    OBJECTS,
    RULES,
    SETTINGS,
    IMPORTED_LEARNED,
    MODELS,
    MODEL_LEARNED,
    CONTAINERS,
    NODE_CONTAINERS,
    IMAGE_NODES,
    NODES,
    IMAGES,
];

/// What the compiler needs of a model.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelRow {
    /// `cnnf.v1.ModelState`.
    #[prost(int32, tag = "1")]
    pub state: i32,
    /// Image name as the model was created with.
    #[prost(string, tag = "2")]
    pub image_name: String,
}

impl ModelRow {
    /// True while the model learns.
    pub fn learning(&self) -> bool {
        self.state == ModelState::Learning as i32
    }
}

/// Prefix of every learned key of `image_id`.
pub fn image_prefix(image_id: &str) -> Vec<u8> {
    let mut key = image_id.as_bytes().to_vec();
    key.push(0);
    key
}

/// Key of one learned connection: `<image> 0 <side> <peer kind> <peer id> 0 <port BE32> <protocol>`
/// (the modeler's layout), sorted by image, side, peer, port.
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

/// The part of a learned connection a verdict table and an export keep:
/// side, peer (kind, id, name), port and protocol.
pub fn essential(connection: &LearnedConnection) -> LearnedConnection {
    LearnedConnection {
        side: connection.side,
        peer: connection.peer.as_ref().map(|peer| cnnf_proto::v1::Identity {
            kind: peer.kind,
            id: peer.id.clone(),
            name: peer.name.clone(),
            ..Default::default()
        }),
        port: connection.port,
        protocol: connection.protocol,
        ..Default::default()
    }
}

/// `<a> 0 <b>`.
pub fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut key = a.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(b.as_bytes());
    key
}

/// `<image> 0 <node> 0 <container>`.
pub fn image_node_key(image: &str, node: &str, container: &str) -> Vec<u8> {
    let mut key = pair_key(image, node);
    key.push(0);
    key.extend_from_slice(container.as_bytes());
    key
}

/// Decodes a stored record.
pub fn decode<M: prost::Message + Default>(what: &str, bytes: &[u8]) -> Result<M, cnnf_store::StoreError> {
    M::decode(bytes).map_err(|error| cnnf_store::StoreError::Engine(format!("stored {what} does not decode: {error}")))
}

/// Encodes a record for storage.
pub fn encode<M: prost::Message>(message: &M) -> Vec<u8> {
    message.encode_to_vec()
}
