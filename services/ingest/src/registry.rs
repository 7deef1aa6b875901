//! The identity registry in the projection store: its tables, its key
//! layout, the changes the projection makes, and the queries the gRPC API,
//! the KV writer and the liveness monitor ask.
//!
//! Every table is keyed so that the question asked of it is one prefix
//! scan. Parts of a key are separated by a NUL byte (the gate refuses
//! control characters in container and image IDs, cluster and node names
//! are subject tokens, and canonical addresses have none), and times are
//! 8 bytes big-endian with the sign bit flipped, so keys sort by time.
//! `<holder>` is `<cluster> NUL <node> NUL <container id>`.
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `holdings` | `<address> NUL <from> <holder>` | [`StoredHolding`]: the workload, from, until (0 while open), why it ended |
//! | `current` | `<address> NUL <holder>` | key of the open holding |
//! | `open_by_holder` | `<holder> NUL <address>` | key of the open holding |
//! | `by_image` | `<image id> NUL <from> <address> NUL <holder>` | key of the holding |
//! | `nodes_gone` | `<cluster> NUL <node>` | [`GoneRecord`]: the silence a `NodeGone` released |
//! | `heartbeats` | `<cluster> NUL <node>` | [`Liveness`]: the newest heartbeat (heartbeat runner) |
//! | `incident_outbox` | `<stream sequence> <part>` | [`OutboxMessage`]: an incident to publish after commit |
//!
//! The first five tables are the registry ([`REGISTRY_TABLES`]): a fold of
//! `CNNF_WORKLOADS` alone, identical however often it is rebuilt.
//! `heartbeats` folds `CNNF_HEARTBEATS` (its own runner, its own applied
//! sequence); the outbox is emptied as it is published.
//!
//! Workloads are stored in a canonical protobuf encoding
//! ([`encode_workload`]): prost keeps `labels` in a `HashMap`, whose order
//! changes from one process to the next, and two registries built from the
//! same log must be equal byte for byte.
//!
//! Prefix scans inside `apply` must see the batch's own uncommitted
//! writes, which `Txn` keeps but cannot scan: [`Writer`] records the writes
//! to the scanned tables in [`Pending`] and merges them into the store's
//! scan; the pending set is dropped when the runner commits.

use std::collections::{BTreeMap, HashMap};

use cnnf_proto::v1::{AddressHolding, Workload};
use cnnf_store::{Entry, ProjectionStore, StoreError, Txn};
use prost::Message as _;

/// Every holding: address, workload, from, until.
pub const HOLDINGS: &str = "holdings";
/// The open holdings of each address.
pub const CURRENT: &str = "current";
/// The open holdings of each holder (container), and so of each node.
pub const OPEN_BY_HOLDER: &str = "open_by_holder";
/// Every holding of each image, by start time.
pub const BY_IMAGE: &str = "by_image";
/// The silences `NodeGone` events released, per node.
pub const NODES_GONE: &str = "nodes_gone";
/// The newest heartbeat of each node.
pub const HEARTBEATS: &str = "heartbeats";
/// Incidents committed and not yet published.
pub const INCIDENT_OUTBOX: &str = "incident_outbox";

/// The tables that are the registry: a rebuild from `CNNF_WORKLOADS` into an
/// empty store gives exactly these (compare them with `cnnf_store::dump`).
pub const REGISTRY_TABLES: &[&str] = &[BY_IMAGE, CURRENT, HOLDINGS, NODES_GONE, OPEN_BY_HOLDER];

/// Every table the ingest store is opened with.
pub const TABLES: &[&str] = &[
    HOLDINGS,
    CURRENT,
    OPEN_BY_HOLDER,
    BY_IMAGE,
    NODES_GONE,
    HEARTBEATS,
    INCIDENT_OUTBOX,
];

/// Tables scanned by prefix inside `apply`: their writes are tracked in
/// [`Pending`].
const SCANNED: &[&str] = &[CURRENT, OPEN_BY_HOLDER];

const SEP: u8 = 0;

/// One workload holding one address, as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredHolding {
    /// Canonical address.
    #[prost(string, tag = "1")]
    pub address: String,
    /// The holder key (`<cluster> NUL <node> NUL <container>`).
    #[prost(bytes = "vec", tag = "2")]
    pub holder: Vec<u8>,
    /// The workload, canonically encoded ([`encode_workload`]).
    #[prost(bytes = "vec", tag = "3")]
    pub workload: Vec<u8>,
    /// Event time of the start, Unix nanoseconds.
    #[prost(int64, tag = "4")]
    pub from: i64,
    /// Event time of the end (excluded), Unix nanoseconds; 0 while open.
    #[prost(int64, tag = "5")]
    pub until: i64,
    /// Why it ended: the stop reason, or `node-gone`.
    #[prost(string, tag = "6")]
    pub end_reason: String,
    /// Stream sequence of the event that opened it.
    #[prost(uint64, tag = "7")]
    pub opened_by: u64,
    /// Stream sequence of the event that closed it (0 while open).
    #[prost(uint64, tag = "8")]
    pub closed_by: u64,
}

impl StoredHolding {
    /// True when the holding covers instant `at`.
    pub fn covers(&self, at: i64) -> bool {
        self.from <= at && (self.until == 0 || at < self.until)
    }

    /// The workload, decoded.
    pub fn decode_workload(&self) -> Result<Workload, StoreError> {
        Workload::decode(self.workload.as_slice()).map_err(|error| corrupt("holding workload", &error))
    }

    /// As the gRPC API returns it.
    pub fn to_api(&self) -> Result<AddressHolding, StoreError> {
        Ok(AddressHolding {
            address: self.address.clone(),
            workload: Some(self.decode_workload()?),
            held_from_unix_nanos: self.from,
            held_until_unix_nanos: self.until,
            end_reason: self.end_reason.clone(),
        })
    }
}

/// A node silence that a `NodeGone` event released.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GoneRecord {
    /// Cluster of the node.
    #[prost(string, tag = "1")]
    pub cluster: String,
    /// The node.
    #[prost(string, tag = "2")]
    pub node: String,
    /// Time of the node's last heartbeat before it went silent.
    #[prost(int64, tag = "3")]
    pub last_heartbeat_unix_nanos: i64,
    /// Event time of the `NodeGone`: when its holdings ended.
    #[prost(int64, tag = "4")]
    pub gone_unix_nanos: i64,
}

/// The newest heartbeat of a node.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Liveness {
    /// Cluster of the node.
    #[prost(string, tag = "1")]
    pub cluster: String,
    /// The node.
    #[prost(string, tag = "2")]
    pub node: String,
    /// Event time of the newest heartbeat, Unix nanoseconds.
    #[prost(int64, tag = "3")]
    pub last_heartbeat_unix_nanos: i64,
    /// Boot id of the agent that sent it.
    #[prost(string, tag = "4")]
    pub boot_id: String,
    /// The agent's heartbeat sequence.
    #[prost(uint64, tag = "5")]
    pub sequence: u64,
}

pub use cnnf_bus::outbox::OutboxMessage;

fn corrupt(what: &str, error: &dyn std::fmt::Display) -> StoreError {
    StoreError::Engine(format!("corrupt {what} in the ingest store: {error}"))
}

/// Decodes a stored protobuf value.
pub fn decode<M: prost::Message + Default>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|error| corrupt(what, &error))
}

/// The canonical encoding of a workload: its fields in protobuf order, then
/// its labels sorted by key, each as its own map entry (protobuf merges
/// repeated map entries, so any decoder reads the same workload back).
pub fn encode_workload(workload: &Workload) -> Vec<u8> {
    let mut base = workload.clone();
    let labels = std::mem::take(&mut base.labels);
    let mut out = base.encode_to_vec();
    let mut labels: Vec<_> = labels.into_iter().collect();
    labels.sort_unstable();
    for (key, value) in labels {
        let entry = Workload {
            labels: HashMap::from([(key, value)]),
            ..Default::default()
        };
        out.extend(entry.encode_to_vec());
    }
    out
}

/// Time as key bytes: big-endian with the sign bit flipped, so that keys
/// sort like the times.
fn time_key(time: i64) -> [u8; 8] {
    ((time as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_of_key(bytes: &[u8]) -> Option<i64> {
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|part| part.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(SEP);
        }
        key.extend_from_slice(part);
    }
    key
}

/// `<cluster> NUL <node> NUL <container>`.
pub fn holder_key(cluster: &str, node: &str, container: &str) -> Vec<u8> {
    join(&[cluster.as_bytes(), node.as_bytes(), container.as_bytes()])
}

/// `<cluster> NUL <node>`: key of per-node tables.
pub fn node_key(cluster: &str, node: &str) -> Vec<u8> {
    join(&[cluster.as_bytes(), node.as_bytes()])
}

/// Prefix of everything keyed by `<part> NUL ...`.
fn prefix(part: &[u8]) -> Vec<u8> {
    let mut key = part.to_vec();
    key.push(SEP);
    key
}

fn holding_key(address: &str, from: i64, holder: &[u8]) -> Vec<u8> {
    let mut key = prefix(address.as_bytes());
    key.extend_from_slice(&time_key(from));
    key.extend_from_slice(holder);
    key
}

fn current_key(address: &str, holder: &[u8]) -> Vec<u8> {
    join(&[address.as_bytes(), holder])
}

fn open_key(holder: &[u8], address: &str) -> Vec<u8> {
    join(&[holder, address.as_bytes()])
}

fn image_key(image_id: &str, from: i64, address: &str, holder: &[u8]) -> Vec<u8> {
    let mut key = prefix(image_id.as_bytes());
    key.extend_from_slice(&time_key(from));
    key.extend_from_slice(&join(&[address.as_bytes(), holder]));
    key
}

/// Writes of the scanned tables since the last commit, so that a prefix
/// scan inside `apply` sees the batch's own changes. One mark, like `Txn`:
/// the changes of a rejected event are undone with it.
#[derive(Debug, Default)]
pub struct Pending {
    entries: BTreeMap<TableKey, Option<Vec<u8>>>,
    /// Entries replaced since the mark (`None`: the key was not pending).
    undo: Vec<(TableKey, Option<Option<Vec<u8>>>)>,
}

/// A key of one table.
type TableKey = (&'static str, Vec<u8>);

impl Pending {
    /// Starts an event: later changes can be undone.
    pub fn mark(&mut self) {
        self.undo.clear();
    }

    /// Undoes the changes since the mark.
    pub fn rollback_to_mark(&mut self) {
        while let Some((key, previous)) = self.undo.pop() {
            match previous {
                Some(value) => self.entries.insert(key, value),
                None => self.entries.remove(&key),
            };
        }
    }

    /// Forgets everything: the batch is committed (or abandoned).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.undo.clear();
    }

    fn record(&mut self, table: &'static str, key: Vec<u8>, value: Option<Vec<u8>>) {
        let previous = self.entries.insert((table, key.clone()), value);
        self.undo.push(((table, key), previous));
    }
}

/// The projection's view of a batch: point reads through the `Txn`,
/// prefix scans over the store merged with [`Pending`].
pub struct Writer<'w, 'a> {
    /// The runner's transaction.
    pub txn: &'w mut Txn<'a>,
    /// This batch's writes to the scanned tables.
    pub pending: &'w mut Pending,
    /// The store under the transaction.
    pub store: &'w dyn ProjectionStore,
}

impl Writer<'_, '_> {
    /// Reads one key, seeing the batch's writes.
    pub fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.txn.get(table, key)
    }

    /// Sets a key.
    pub fn put(&mut self, table: &'static str, key: Vec<u8>, value: Vec<u8>) {
        if SCANNED.contains(&table) {
            self.pending.record(table, key.clone(), Some(value.clone()));
        }
        self.txn.put(table, key, value);
    }

    /// Removes a key.
    pub fn delete(&mut self, table: &'static str, key: Vec<u8>) {
        if SCANNED.contains(&table) {
            self.pending.record(table, key.clone(), None);
        }
        self.txn.delete(table, key);
    }

    /// Every entry of a scanned table under `prefix`, seeing the batch's writes.
    fn scan_prefix(&self, table: &'static str, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        debug_assert!(SCANNED.contains(&table), "{table} is not tracked for scans");
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            self.store.scan_prefix(table, prefix, usize::MAX)?.into_iter().collect();
        for ((pending_table, key), value) in self.pending.entries.range((table, prefix.to_vec())..) {
            if *pending_table != table || !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn holding(&self, key: &[u8]) -> Result<Option<StoredHolding>, StoreError> {
        self.get(HOLDINGS, key)?
            .map(|bytes| decode("holding", &bytes))
            .transpose()
    }
}

/// What opening a holding found.
#[derive(Debug)]
pub enum Opened {
    /// The holder already held the address: nothing changed.
    AlreadyOpen,
    /// A new holding; `others` are the other workloads holding the address
    /// at the same time (a conflict when not empty).
    New {
        /// The other open holdings of the address.
        others: Vec<StoredHolding>,
    },
}

/// A holding to open.
pub struct NewHolding<'a> {
    /// Canonical address.
    pub address: &'a str,
    /// Holder key.
    pub holder: &'a [u8],
    /// Image ID of the workload.
    pub image_id: &'a str,
    /// Canonically encoded workload.
    pub workload: &'a [u8],
    /// Event time of the start.
    pub from: i64,
    /// Stream sequence of the start.
    pub sequence: u64,
}

/// Opens a holding unless its holder already holds the address. Other
/// holders are left alone: a claim never ends someone else's holding.
pub fn open(w: &mut Writer<'_, '_>, new: &NewHolding<'_>) -> Result<Opened, StoreError> {
    let current = current_key(new.address, new.holder);
    if w.get(CURRENT, &current)?.is_some() {
        return Ok(Opened::AlreadyOpen);
    }
    let mut others = Vec::new();
    for (_, key) in w.scan_prefix(CURRENT, &prefix(new.address.as_bytes()))? {
        if let Some(holding) = w.holding(&key)? {
            others.push(holding);
        }
    }
    let key = holding_key(new.address, new.from, new.holder);
    let record = StoredHolding {
        address: new.address.to_owned(),
        holder: new.holder.to_vec(),
        workload: new.workload.to_vec(),
        from: new.from,
        until: 0,
        end_reason: String::new(),
        opened_by: new.sequence,
        closed_by: 0,
    };
    w.put(HOLDINGS, key.clone(), record.encode_to_vec());
    w.put(CURRENT, current, key.clone());
    w.put(OPEN_BY_HOLDER, open_key(new.holder, new.address), key.clone());
    w.put(
        BY_IMAGE,
        image_key(new.image_id, new.from, new.address, new.holder),
        key,
    );
    Ok(Opened::New { others })
}

/// Closes every open holding under `holder_prefix` (one holder, or every
/// holder of a node) at `until` (never before its start). Returns the
/// holdings closed.
pub fn close_all(
    w: &mut Writer<'_, '_>,
    holder_prefix: &[u8],
    until: i64,
    reason: &str,
    sequence: u64,
) -> Result<Vec<StoredHolding>, StoreError> {
    let mut closed = Vec::new();
    for (open, key) in w.scan_prefix(OPEN_BY_HOLDER, holder_prefix)? {
        let Some(mut holding) = w.holding(&key)? else {
            return Err(corrupt("index open_by_holder", &"it points to a missing holding"));
        };
        holding.until = until.max(holding.from);
        holding.end_reason = reason.to_owned();
        holding.closed_by = sequence;
        w.put(HOLDINGS, key, holding.encode_to_vec());
        w.delete(CURRENT, current_key(&holding.address, &holding.holder));
        w.delete(OPEN_BY_HOLDER, open);
        closed.push(holding);
    }
    Ok(closed)
}

/// Prefix of one holder's open holdings in `open_by_holder`.
pub fn holder_prefix(holder: &[u8]) -> Vec<u8> {
    prefix(holder)
}

/// Prefix of one node's open holdings in `open_by_holder`.
pub fn node_prefix(cluster: &str, node: &str) -> Vec<u8> {
    prefix(&node_key(cluster, node))
}

/// The silence of a node released last, if any (seeing the batch's writes).
pub fn gone_record(w: &Writer<'_, '_>, cluster: &str, node: &str) -> Result<Option<GoneRecord>, StoreError> {
    w.get(NODES_GONE, &node_key(cluster, node))?
        .map(|bytes| decode("gone record", &bytes))
        .transpose()
}

/// Records the silence a `NodeGone` released.
pub fn put_gone_record(w: &mut Writer<'_, '_>, record: &GoneRecord) {
    w.put(
        NODES_GONE,
        node_key(&record.cluster, &record.node),
        record.encode_to_vec(),
    );
}

/// Every holding of `address` that covered instant `at`, earliest first.
pub fn holdings_at(store: &dyn ProjectionStore, address: &str, at: i64) -> Result<Vec<StoredHolding>, StoreError> {
    let mut out = Vec::new();
    for (key, value) in store.scan_prefix(HOLDINGS, &prefix(address.as_bytes()), usize::MAX)? {
        let from = time_of_key(&key[address.len() + 1..]).unwrap_or(i64::MAX);
        if from > at {
            break;
        }
        let holding: StoredHolding = decode("holding", &value)?;
        if holding.covers(at) {
            out.push(holding);
        }
    }
    Ok(out)
}

/// More holdings matched than a caller allows.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// More than `limit` holdings matched.
    #[error("more than {limit} holdings match; narrow the range")]
    TooMany {
        /// The limit.
        limit: usize,
    },
}

/// Every holding of `image_id` that overlaps `[from, until]`, by start time.
pub fn holdings_of_image(
    store: &dyn ProjectionStore,
    image_id: &str,
    from: i64,
    until: i64,
    limit: usize,
) -> Result<Vec<StoredHolding>, QueryError> {
    let image_prefix = prefix(image_id.as_bytes());
    let mut out = Vec::new();
    for (key, holding_key) in store.scan_prefix(BY_IMAGE, &image_prefix, usize::MAX)? {
        let started = time_of_key(&key[image_prefix.len()..]).unwrap_or(i64::MAX);
        if started > until {
            break;
        }
        let Some(bytes) = store.get(HOLDINGS, &holding_key)? else {
            return Err(corrupt("index by_image", &"it points to a missing holding").into());
        };
        let holding: StoredHolding = decode("holding", &bytes)?;
        if holding.until == 0 || holding.until > from {
            if out.len() == limit {
                return Err(QueryError::TooMany { limit });
            }
            out.push(holding);
        }
    }
    Ok(out)
}

/// The workload the KV map shows for `address`: the one holding it, or
/// none when nothing holds it or several workloads claim it.
pub fn kv_value(store: &dyn ProjectionStore, address: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let open = store.scan_prefix(CURRENT, &prefix(address.as_bytes()), 2)?;
    let [(_, key)] = open.as_slice() else {
        return Ok(None);
    };
    Ok(match store.get(HOLDINGS, key)? {
        Some(bytes) => Some(decode::<StoredHolding>("holding", &bytes)?.workload),
        None => None,
    })
}

/// The whole KV map the registry implies: address → workload, for every
/// address exactly one workload holds.
pub fn kv_map(store: &dyn ProjectionStore) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    let mut holders: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (key, holding_key) in store.scan_prefix(CURRENT, b"", usize::MAX)? {
        let address = key.split(|byte| *byte == SEP).next().unwrap_or_default().to_vec();
        holders.entry(address).or_default().push(holding_key);
    }
    let mut out = BTreeMap::new();
    for (address, keys) in holders {
        let [key] = keys.as_slice() else { continue };
        if let Some(bytes) = store.get(HOLDINGS, key)? {
            let holding: StoredHolding = decode("holding", &bytes)?;
            out.insert(holding.address, holding.workload);
        } else {
            let address = String::from_utf8_lossy(&address);
            return Err(corrupt(
                "index current",
                &format!("{address} points to a missing holding"),
            ));
        }
    }
    Ok(out)
}

/// The open holdings of a node.
pub fn open_holdings_of_node(
    store: &dyn ProjectionStore,
    cluster: &str,
    node: &str,
) -> Result<Vec<StoredHolding>, StoreError> {
    let mut out = Vec::new();
    for (_, key) in store.scan_prefix(OPEN_BY_HOLDER, &node_prefix(cluster, node), usize::MAX)? {
        if let Some(bytes) = store.get(HOLDINGS, &key)? {
            out.push(decode("holding", &bytes)?);
        }
    }
    Ok(out)
}

/// Every node's newest heartbeat.
pub fn liveness(store: &dyn ProjectionStore) -> Result<Vec<Liveness>, StoreError> {
    store
        .scan_prefix(HEARTBEATS, b"", usize::MAX)?
        .into_iter()
        .map(|(_, value)| decode("liveness", &value))
        .collect()
}

/// Every node silence already released, by node key.
pub fn gone_records(store: &dyn ProjectionStore) -> Result<HashMap<Vec<u8>, GoneRecord>, StoreError> {
    store
        .scan_prefix(NODES_GONE, b"", usize::MAX)?
        .into_iter()
        .map(|(key, value)| Ok((key, decode("gone record", &value)?)))
        .collect()
}

/// The outbox key of part `part` of stream message `sequence`.
pub fn outbox_key(sequence: u64, part: u32) -> Vec<u8> {
    let mut key = sequence.to_be_bytes().to_vec();
    key.extend_from_slice(&part.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_sort_like_times() {
        let times = [i64::MIN, -5, -1, 0, 1, 1_000, i64::MAX];
        for pair in times.windows(2) {
            assert!(time_key(pair[0]) < time_key(pair[1]));
        }
        for time in times {
            assert_eq!(time_of_key(&time_key(time)), Some(time));
        }
    }

    #[test]
    fn workload_encoding_is_canonical() {
        let labels: Vec<(String, String)> = (0..40).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        let one = Workload {
            container_id: "c1".into(),
            labels: labels.iter().cloned().collect(),
            ..Default::default()
        };
        let other = Workload {
            container_id: "c1".into(),
            labels: labels.iter().rev().cloned().collect(),
            ..Default::default()
        };
        let encoded = encode_workload(&one);
        assert_eq!(encoded, encode_workload(&other));
        assert_eq!(Workload::decode(encoded.as_slice()).unwrap(), one);
    }

    #[test]
    fn key_prefixes_do_not_capture_longer_names() {
        assert!(!holding_key("10.0.0.10", 1, b"h").starts_with(&prefix(b"10.0.0.1")));
        assert!(holding_key("10.0.0.1", 1, b"h").starts_with(&prefix(b"10.0.0.1")));
        let n10 = holder_key("c", "n10", "x");
        assert!(!open_key(&n10, "10.0.0.1").starts_with(&node_prefix("c", "n1")));
        assert!(open_key(&holder_key("c", "n1", "x"), "10.0.0.1").starts_with(&node_prefix("c", "n1")));
        let abc = holder_key("c", "n1", "abc");
        assert!(!open_key(&holder_key("c", "n1", "abcd"), "a").starts_with(&holder_prefix(&abc)));
    }
}
