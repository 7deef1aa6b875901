//! The three projections of the policy service, each the only writer of
//! its tables ([`crate::store`]), and the marks that tell the compiler
//! which nodes a committed change affects.
//!
//! - [`PolicyProjection`] (`policy-policy`, this cluster's
//!   `cnnf.policy.<cluster>.*`): objects, rules, modes, imported learned
//!   connections. It checks each change exactly like the API does and
//!   dead-letters one that is wrong. It marks every node.
//! - [`ModelProjection`] (`policy-models`, `CNNF_MODELS`): model state and
//!   learned connections per image, as the modeler's log says (a `Learned`
//!   event counts only while the model learns). It marks the nodes running
//!   the image.
//! - [`WorkloadProjection`] (`policy-workloads`, this cluster's
//!   `cnnf.workload.<cluster>.*`): which containers of which image run on
//!   which node, with their addresses and labels. It marks the node.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cnnf_bus::runner::ApplyError;
use cnnf_bus::{Event, Projection};
use cnnf_core::envelope::Rejection;
use cnnf_proto::v1::envelope::Payload;
use cnnf_proto::v1::{model_event, policy_event, ModelState, Workload};
use cnnf_store::{ProjectionStore, StoreError, Txn};
use tokio::sync::Notify;

use crate::policy::{change_of, describe, Policy};
use crate::store::{self, ModelRow};

/// The input a mark comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feed {
    /// `CNNF_POLICY`.
    Policy = 0,
    /// `CNNF_MODELS`.
    Models = 1,
    /// `CNNF_WORKLOADS`.
    Workloads = 2,
}

/// What a change affects.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Mark {
    /// Every node of the cluster.
    All,
    /// One node.
    Node(String),
    /// The nodes running an image.
    Image(String),
}

/// Marks of applied changes and the sequences the store committed: the
/// link between the runners and the compiler. A mark is taken only once
/// the store committed the event that made it, so the compiler never
/// compiles from a store that does not hold the change yet.
#[derive(Debug, Default)]
pub struct Dirty {
    marks: Mutex<Vec<(Feed, u64, Mark)>>,
    committed: [AtomicU64; 3],
    notify: Notify,
}

impl Dirty {
    /// Records that the event at `sequence` of `feed` affects `mark`.
    pub fn mark(&self, feed: Feed, sequence: u64, mark: Mark) {
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((feed, sequence, mark));
    }

    /// Records that the store committed `feed` up to `sequence`.
    pub fn committed(&self, feed: Feed, sequence: u64) {
        self.committed[feed as usize].fetch_max(sequence, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Takes the marks whose event is committed, each once.
    pub fn take(&self) -> HashSet<Mark> {
        let committed: Vec<u64> = self.committed.iter().map(|c| c.load(Ordering::SeqCst)).collect();
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = HashSet::new();
        marks.retain(|(feed, sequence, mark)| {
            if *sequence <= committed[*feed as usize] {
                out.insert(mark.clone());
                false
            } else {
                true
            }
        });
        out
    }

    /// Waits for a commit, at most `timeout`.
    pub async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notify.notified()).await;
    }
}

fn reject(detail: impl Into<String>) -> ApplyError {
    ApplyError::Reject(Rejection::Invalid(detail.into()))
}

/// Objects, rules, modes and imported learned connections of one cluster.
pub struct PolicyProjection {
    policy: Policy,
    cluster: String,
    dirty: Arc<Dirty>,
}

impl PolicyProjection {
    /// The projection over the committed policy in `store`.
    pub fn load(store: &dyn ProjectionStore, cluster: &str, dirty: Arc<Dirty>) -> Result<Self, StoreError> {
        Ok(Self {
            policy: crate::compile::load_policy(store)?,
            cluster: cluster.to_owned(),
            dirty,
        })
    }

    fn write(&self, change: &policy_event::Change, txn: &mut Txn<'_>) {
        match change {
            policy_event::Change::ObjectPut(put) => {
                if let Some(object) = &put.object {
                    txn.put(store::OBJECTS, object.name.as_bytes(), store::encode(object));
                }
            }
            policy_event::Change::ObjectDeleted(deleted) => txn.delete(store::OBJECTS, deleted.name.as_bytes()),
            policy_event::Change::RulePut(put) => {
                if let Some(rule) = &put.rule {
                    txn.put(store::RULES, rule.id.as_bytes(), store::encode(rule));
                }
            }
            policy_event::Change::RuleDeleted(deleted) => txn.delete(store::RULES, deleted.id.as_bytes()),
            policy_event::Change::ModeSet(set) => {
                let key = if set.host {
                    store::HOST_MODE_KEY
                } else {
                    store::MODE_KEY
                };
                txn.put(store::SETTINGS, key, mode_value(set.mode));
            }
            policy_event::Change::Imported(imported) => {
                for name in self.policy.objects.keys() {
                    txn.delete(store::OBJECTS, name.as_bytes());
                }
                for id in self.policy.rules.keys() {
                    txn.delete(store::RULES, id.as_bytes());
                }
                for (image, connections) in &self.policy.learned {
                    for connection in connections {
                        txn.delete(store::IMPORTED_LEARNED, store::learned_key(image, connection));
                    }
                }
                let next = Policy::from_imported(imported);
                for object in next.objects.values() {
                    txn.put(store::OBJECTS, object.name.as_bytes(), store::encode(object));
                }
                for rule in next.rules.values() {
                    txn.put(store::RULES, rule.id.as_bytes(), store::encode(rule));
                }
                for (image, connections) in &next.learned {
                    for connection in connections {
                        txn.put(
                            store::IMPORTED_LEARNED,
                            store::learned_key(image, connection),
                            store::encode(connection),
                        );
                    }
                }
                txn.put(store::SETTINGS, store::MODE_KEY, mode_value(next.mode));
                txn.put(store::SETTINGS, store::HOST_MODE_KEY, mode_value(next.host_mode));
            }
        }
    }
}

fn mode_value(mode: i32) -> Vec<u8> {
    cnnf_store::encode_u64(u64::try_from(mode).unwrap_or(0)).to_vec()
}

impl Projection for PolicyProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let Some(Payload::Policy(policy_event)) = &event.envelope.payload else {
            return Err(reject("not a policy event"));
        };
        let subject_cluster = event.subject.split('.').nth(2).unwrap_or("");
        if event.envelope.cluster != subject_cluster || subject_cluster != self.cluster {
            return Err(reject(format!(
                "event of cluster {:?} on subject {:?}; this policy is cluster {:?}",
                event.envelope.cluster, event.subject, self.cluster
            )));
        }
        let change = change_of(policy_event).map_err(|problems| reject(describe(&problems)))?;
        self.policy
            .check(change)
            .map_err(|problems| reject(describe(&problems)))?;
        self.write(change, txn);
        self.policy.apply(change);
        self.dirty.mark(Feed::Policy, event.stream_sequence, Mark::All);
        Ok(())
    }
}

/// Learned keys put since the last commit (a relearn in the same batch
/// must delete them too, and the store does not show them yet).
pub type Pending = Arc<Mutex<HashSet<Vec<u8>>>>;

/// Model state and learned connections per image.
pub struct ModelProjection {
    store: Arc<dyn ProjectionStore>,
    pending: Pending,
    dirty: Arc<Dirty>,
}

impl ModelProjection {
    /// A projection reading committed learned keys from `store`.
    pub fn new(store: Arc<dyn ProjectionStore>, pending: Pending, dirty: Arc<Dirty>) -> Self {
        Self { store, pending, dirty }
    }
}

fn read_row(txn: &Txn<'_>, image: &str) -> Result<Option<ModelRow>, StoreError> {
    txn.get(store::MODELS, image.as_bytes())?
        .map(|bytes| store::decode("model", &bytes))
        .transpose()
}

impl Projection for ModelProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let Some(Payload::Model(model)) = &event.envelope.payload else {
            return Err(reject("not a model event"));
        };
        if model.image_id.is_empty() {
            return Err(reject("image_id: required"));
        }
        let image = model.image_id.as_str();
        let Some(change) = &model.change else {
            return Err(reject("change: required"));
        };
        let learning = || ModelRow {
            state: ModelState::Learning as i32,
            image_name: String::new(),
        };
        let changed = match change {
            model_event::Change::Created(created) => {
                if read_row(txn, image)?.is_none() {
                    let row = ModelRow {
                        state: ModelState::Learning as i32,
                        image_name: created.image_name.clone(),
                    };
                    txn.put(store::MODELS, image.as_bytes(), store::encode(&row));
                    true
                } else {
                    false
                }
            }
            model_event::Change::Learned(learned) => {
                let row = match read_row(txn, image)? {
                    Some(row) => row,
                    None => {
                        let row = learning();
                        txn.put(store::MODELS, image.as_bytes(), store::encode(&row));
                        row
                    }
                };
                let mut changed = false;
                if row.learning() {
                    let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                    for connection in &learned.connections {
                        if !crate::policy::valid_side(connection.side) || connection.peer.is_none() {
                            continue;
                        }
                        let key = store::learned_key(image, connection);
                        if txn.get(store::MODEL_LEARNED, &key)?.is_none() {
                            txn.put(
                                store::MODEL_LEARNED,
                                key.clone(),
                                store::encode(&store::essential(connection)),
                            );
                            pending.insert(key);
                            changed = true;
                        }
                    }
                }
                changed
            }
            model_event::Change::Locked(_) => {
                let mut row = read_row(txn, image)?.unwrap_or_else(learning);
                row.state = ModelState::Enforcing as i32;
                txn.put(store::MODELS, image.as_bytes(), store::encode(&row));
                true
            }
            model_event::Change::Relearn(_) => {
                let mut row = read_row(txn, image)?.unwrap_or_else(learning);
                row.state = ModelState::Learning as i32;
                txn.put(store::MODELS, image.as_bytes(), store::encode(&row));
                let prefix = store::image_prefix(image);
                for (key, _) in self.store.scan_prefix(store::MODEL_LEARNED, &prefix, usize::MAX)? {
                    txn.delete(store::MODEL_LEARNED, key);
                }
                let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                for key in pending.iter().filter(|key| key.starts_with(&prefix)) {
                    txn.delete(store::MODEL_LEARNED, key.clone());
                }
                true
            }
            model_event::Change::ConnectionDeleted(deleted) => match &deleted.connection {
                Some(connection) => {
                    txn.delete(store::MODEL_LEARNED, store::learned_key(image, connection));
                    true
                }
                None => return Err(reject("connection_deleted.connection: required")),
            },
            model_event::Change::Extended(_) | model_event::Change::Liveness(_) => false,
        };
        if changed {
            self.dirty
                .mark(Feed::Models, event.stream_sequence, Mark::Image(image.to_owned()));
        }
        Ok(())
    }
}

/// Which containers run where.
pub struct WorkloadProjection {
    cluster: String,
    dirty: Arc<Dirty>,
}

impl WorkloadProjection {
    /// The projection of `cluster`'s workloads.
    pub fn new(cluster: &str, dirty: Arc<Dirty>) -> Self {
        Self {
            cluster: cluster.to_owned(),
            dirty,
        }
    }

    fn remove(txn: &mut Txn<'_>, container: &str) -> Result<(), StoreError> {
        let Some(bytes) = txn.get(store::CONTAINERS, container.as_bytes())? else {
            return Ok(());
        };
        let workload: Workload = store::decode("workload", &bytes)?;
        txn.delete(store::CONTAINERS, container.as_bytes());
        txn.delete(store::NODE_CONTAINERS, store::pair_key(&workload.node, container));
        txn.delete(
            store::IMAGE_NODES,
            store::image_node_key(&workload.image_id, &workload.node, container),
        );
        Ok(())
    }
}

impl Projection for WorkloadProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let Some((cluster, node)) = cnnf_core::subjects::agent_origin(event.subject) else {
            return Err(reject(format!("{:?} is not a workload subject", event.subject)));
        };
        if cluster != self.cluster || event.envelope.cluster != cluster || event.envelope.node != node {
            return Err(reject(format!(
                "event of {}/{} on subject {:?}; this policy is cluster {:?}",
                event.envelope.cluster, event.envelope.node, event.subject, self.cluster
            )));
        }
        match &event.envelope.payload {
            Some(Payload::WorkloadStarted(started)) => {
                let Some(workload) = &started.workload else {
                    return Err(reject("workload: required"));
                };
                if workload.container_id.is_empty() || workload.image_id.is_empty() {
                    return Err(reject("workload: container_id and image_id are required"));
                }
                let container = workload.container_id.as_str();
                Self::remove(txn, container)?;
                let mut stored = workload.clone();
                stored.node = node.to_owned();
                stored.cluster = cluster.to_owned();
                txn.put(store::CONTAINERS, container.as_bytes(), store::encode(&stored));
                txn.put(
                    store::NODE_CONTAINERS,
                    store::pair_key(node, container),
                    workload.image_id.as_bytes(),
                );
                txn.put(
                    store::IMAGE_NODES,
                    store::image_node_key(&workload.image_id, node, container),
                    Vec::new(),
                );
                txn.put(store::IMAGES, workload.image_id.as_bytes(), store::encode(&stored));
                txn.put(store::NODES, node.as_bytes(), Vec::new());
            }
            Some(Payload::WorkloadStopped(stopped)) => {
                let Some(workload) = &stopped.workload else {
                    return Err(reject("workload: required"));
                };
                Self::remove(txn, &workload.container_id)?;
            }
            Some(Payload::NodeGone(gone)) => {
                for container in &gone.container_ids {
                    Self::remove(txn, container)?;
                }
            }
            _ => return Ok(()),
        }
        self.dirty
            .mark(Feed::Workloads, event.stream_sequence, Mark::Node(node.to_owned()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_only_once_committed() {
        let dirty = Dirty::default();
        dirty.mark(Feed::Policy, 5, Mark::All);
        dirty.mark(Feed::Models, 3, Mark::Image("i".into()));
        dirty.mark(Feed::Workloads, 7, Mark::Node("n".into()));
        assert!(dirty.take().is_empty());
        dirty.committed(Feed::Models, 3);
        assert_eq!(dirty.take(), [Mark::Image("i".into())].into_iter().collect());
        dirty.committed(Feed::Policy, 9);
        assert_eq!(dirty.take(), [Mark::All].into_iter().collect());
        assert!(dirty.take().is_empty());
    }
}
