//! The compiler: policy + models + placement → one verdict table per node.
//!
//! A node decides only the sides it hosts (`cnnf_core::eval::Scope`), so
//! its table holds every object, every enabled rule and both modes, but
//! only the models of images with a container running on that node. An
//! image without a model in the table is learning, which is also what the
//! modeler says of an image it has not seen yet.
//!
//! Learned connections imported with a policy are policy-level records:
//! the compiler merges them into the model of their image (when the image
//! has a model and runs on the node), whatever the model's state. Learned
//! connections are shipped reduced to side, peer, port and protocol, in
//! key order, so a table is a pure function of its inputs.
//!
//! Version: the sum of the three applied stream sequences (policy, models,
//! workloads) read before the inputs. Every input change raises one of
//! them, a restart or a rebuild from the log reproduces them, and they
//! only grow, so versions are monotonic per node and across restarts
//! without a counter of their own.

use std::collections::{BTreeMap, BTreeSet};

use cnnf_proto::v1::{CompiledModel, LearnedConnection, Side, VerdictTable};
use cnnf_store::{ProjectionStore, StoreError};

use crate::policy::Policy;
use crate::store::{self, ModelRow};

/// What a table is stamped with.
#[derive(Clone, Debug, Default)]
pub struct Stamp {
    /// Cluster.
    pub cluster: String,
    /// Node.
    pub node: String,
    /// Table version.
    pub version: u64,
    /// Policy revision the table was compiled from.
    pub policy_revision: u64,
    /// Wall clock of the compilation.
    pub compiled_unix_nanos: i64,
}

/// A model as the compiler receives it: state and learned connections
/// (any order, duplicates allowed).
#[derive(Clone, Debug, Default)]
pub struct ModelInput {
    /// Image ID.
    pub image_id: String,
    /// `cnnf.v1.ModelState`.
    pub state: i32,
    /// Learned connections, both sides.
    pub learned: Vec<LearnedConnection>,
}

/// Compiles one node's table from `policy` and the models of the images
/// running on the node.
pub fn compile(policy: &Policy, models: Vec<ModelInput>, stamp: Stamp) -> VerdictTable {
    let mut compiled: Vec<CompiledModel> = models
        .into_iter()
        .map(|model| {
            let mut merged: BTreeMap<Vec<u8>, LearnedConnection> = BTreeMap::new();
            let imported = policy.learned.get(&model.image_id).map(Vec::as_slice).unwrap_or(&[]);
            for connection in model.learned.iter().chain(imported) {
                merged
                    .entry(store::learned_key(&model.image_id, connection))
                    .or_insert_with(|| store::essential(connection));
            }
            let (mut inbound, mut outbound) = (Vec::new(), Vec::new());
            for connection in merged.into_values() {
                if connection.side == Side::Inbound as i32 {
                    inbound.push(connection);
                } else if connection.side == Side::Outbound as i32 {
                    outbound.push(connection);
                }
            }
            CompiledModel {
                image_id: model.image_id,
                state: model.state,
                inbound,
                outbound,
            }
        })
        .collect();
    compiled.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    compiled.dedup_by(|a, b| a.image_id == b.image_id);
    VerdictTable {
        version: stamp.version,
        cluster: stamp.cluster,
        node: stamp.node,
        compiled_unix_nanos: stamp.compiled_unix_nanos,
        mode: policy.mode,
        host_mode: policy.host_mode,
        objects: policy.objects.values().cloned().collect(),
        rules: policy.rules.values().filter(|rule| !rule.disabled).cloned().collect(),
        models: compiled,
        policy_revision: stamp.policy_revision,
    }
}

/// Reads the committed policy.
pub fn load_policy(store: &dyn ProjectionStore) -> Result<Policy, StoreError> {
    let mut policy = Policy::default();
    for (_, value) in store.scan_prefix(store::OBJECTS, b"", usize::MAX)? {
        let object: cnnf_proto::v1::NetworkObject = store::decode("object", &value)?;
        policy.objects.insert(object.name.clone(), object);
    }
    for (_, value) in store.scan_prefix(store::RULES, b"", usize::MAX)? {
        let rule: cnnf_proto::v1::Rule = store::decode("rule", &value)?;
        policy.rules.insert(rule.id.clone(), rule);
    }
    let mode = |key: &[u8]| -> Result<i32, StoreError> {
        Ok(i32::try_from(cnnf_store::read_u64(store, store::SETTINGS, key)?).unwrap_or(0))
    };
    policy.mode = mode(store::MODE_KEY)?;
    policy.host_mode = mode(store::HOST_MODE_KEY)?;
    for (key, value) in store.scan_prefix(store::IMPORTED_LEARNED, b"", usize::MAX)? {
        let connection: LearnedConnection = store::decode("imported learned connection", &value)?;
        let image = image_of_key(&key);
        policy.learned.entry(image).or_default().push(connection);
    }
    Ok(policy)
}

/// The image id a learned key starts with.
pub fn image_of_key(key: &[u8]) -> String {
    let end = key.iter().position(|byte| *byte == 0).unwrap_or(key.len());
    String::from_utf8_lossy(&key[..end]).into_owned()
}

/// Images with a container running on `node`.
pub fn images_on(store: &dyn ProjectionStore, node: &str) -> Result<BTreeSet<String>, StoreError> {
    let prefix = store::pair_key(node, "");
    Ok(store
        .scan_prefix(store::NODE_CONTAINERS, &prefix, usize::MAX)?
        .into_iter()
        .map(|(_, image)| String::from_utf8_lossy(&image).into_owned())
        .collect())
}

/// Nodes running a container of `image`.
pub fn nodes_of(store: &dyn ProjectionStore, image: &str) -> Result<BTreeSet<String>, StoreError> {
    let prefix = store::pair_key(image, "");
    Ok(store
        .scan_prefix(store::IMAGE_NODES, &prefix, usize::MAX)?
        .into_iter()
        .filter_map(|(key, _)| {
            let rest = &key[prefix.len()..];
            let end = rest.iter().position(|byte| *byte == 0)?;
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        })
        .collect())
}

/// Every node that ever ran a workload.
pub fn known_nodes(store: &dyn ProjectionStore) -> Result<Vec<String>, StoreError> {
    Ok(store
        .scan_prefix(store::NODES, b"", usize::MAX)?
        .into_iter()
        .map(|(key, _)| String::from_utf8_lossy(&key).into_owned())
        .collect())
}

/// Every learned connection the models runner holds, per image.
pub fn model_learned(store: &dyn ProjectionStore, image: &str) -> Result<Vec<LearnedConnection>, StoreError> {
    store
        .scan_prefix(store::MODEL_LEARNED, &store::image_prefix(image), usize::MAX)?
        .into_iter()
        .map(|(_, value)| store::decode("learned connection", &value))
        .collect()
}

/// The model inputs of the images running on `node`.
pub fn node_models(store: &dyn ProjectionStore, node: &str) -> Result<Vec<ModelInput>, StoreError> {
    let mut out = Vec::new();
    for image in images_on(store, node)? {
        let Some(bytes) = store.get(store::MODELS, image.as_bytes())? else {
            continue; // no model yet: learning, which is what a missing model means
        };
        let row: ModelRow = store::decode("model", &bytes)?;
        let learned = model_learned(store, &image)?;
        out.push(ModelInput {
            image_id: image,
            state: row.state,
            learned,
        });
    }
    Ok(out)
}

/// Every learned connection per image: the models' and the imported ones,
/// merged, essentials only, in key order (for export).
pub fn all_learned(
    store: &dyn ProjectionStore,
    policy: &Policy,
) -> Result<BTreeMap<String, Vec<LearnedConnection>>, StoreError> {
    let mut merged: BTreeMap<String, BTreeMap<Vec<u8>, LearnedConnection>> = BTreeMap::new();
    for (key, value) in store.scan_prefix(store::MODEL_LEARNED, b"", usize::MAX)? {
        let connection: LearnedConnection = store::decode("learned connection", &value)?;
        let image = image_of_key(&key);
        merged
            .entry(image.clone())
            .or_default()
            .insert(store::learned_key(&image, &connection), store::essential(&connection));
    }
    for (image, connections) in &policy.learned {
        let entry = merged.entry(image.clone()).or_default();
        for connection in connections {
            entry
                .entry(store::learned_key(image, connection))
                .or_insert_with(|| store::essential(connection));
        }
    }
    Ok(merged
        .into_iter()
        .map(|(image, connections)| (image, connections.into_values().collect()))
        .collect())
}
