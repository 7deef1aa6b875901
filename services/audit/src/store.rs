//! Tables, key layout and stored records of the audit service.
//!
//! Each table has exactly one writer, so no two runners ever
//! read-modify-write the same key:
//!
//! | table | writer | key | value |
//! | --- | --- | --- | --- |
//! | `audit_keys` | flows runner | `<window u64> <dedup key>` | [`AuditNumber`] of the window's audit |
//! | `audit_records` | flows runner | [`AuditNumber`] | [`AuditRecord`]: the audit and the count last published |
//! | `audit_index` | flows runner | [`index_key`] | empty |
//! | `audit_dirty` | flows runner | `<window u64> <AuditNumber>` | empty: count grew since published |
//! | `audit_scan` | flows runner | `<cluster> 0 <source address>` | [`ScanRecord`] |
//! | `audit_state` | flows runner | name | watermark and time bounds (u64) |
//! | `audit_outbox` | flows runner (puts), its drainer (deletes) | `<seq u64> <part u32>` | [`OutboxMessage`] |
//! | `audit_holdings` | workloads runner | `<address> 0 <from> <seq>` | `cnnf.v1.AddressHolding` |
//! | `audit_containers` | workloads runner | container id | [`ContainerRecord`]: its open holdings |
//! | `audit_policy` | policy runner | `<time> <seq>` | [`PolicyRecord`] |
//! | `audit_models` | models runner | `<image> 0 <time> <seq>` | [`ModelChange`] |
//!
//! Times in keys are Unix nanoseconds with the sign bit flipped, big-endian,
//! so they sort in time order (negative times included). Records are
//! protobuf messages without maps, so their encoding is deterministic.

pub use cnnf_bus::outbox::OutboxMessage;
use cnnf_proto::v1::{Audit, PolicyEvent};

/// The audit of each (window, dedup key).
pub const KEYS: &str = "audit_keys";
/// Audit records by number.
pub const RECORDS: &str = "audit_records";
/// The query index: time, image, node, verdict, rule, cluster.
pub const INDEX: &str = "audit_index";
/// Audits whose count grew since they were last published, by window.
pub const DIRTY: &str = "audit_dirty";
/// Port-scan detection state per source.
pub const SCAN: &str = "audit_scan";
/// Small state of the flows runner (watermark, time bounds).
pub const STATE: &str = "audit_state";
/// Audits and incidents to publish once committed.
pub const OUTBOX: &str = "audit_outbox";
/// Address holdings over time.
pub const HOLDINGS: &str = "audit_holdings";
/// Open holdings per container.
pub const CONTAINERS: &str = "audit_containers";
/// Policy change history.
pub const POLICY: &str = "audit_policy";
/// Model change history.
pub const MODELS: &str = "audit_models";

/// Every table of the audit store.
pub const TABLES: &[&str] = &[
    KEYS, RECORDS, INDEX, DIRTY, SCAN, STATE, OUTBOX, HOLDINGS, CONTAINERS, POLICY, MODELS,
];

/// `audit_state` key: the last window whose dirty audits were published.
pub const STATE_CLOSED_WINDOW: &[u8] = b"closed-window";
/// `audit_state` key: the earliest minute that held an audit (retention
/// does not move it; queries seek the index for their first minute).
pub const STATE_FIRST_MINUTE: &[u8] = b"first-minute";
/// `audit_state` key: the latest minute holding an audit.
pub const STATE_LAST_MINUTE: &[u8] = b"last-minute";

/// Why a stored value could not be read.
#[derive(Debug, thiserror::Error)]
#[error("stored {what} is corrupt: {source}")]
pub struct CorruptRecord {
    /// What was being read.
    pub what: &'static str,
    /// The decoder's complaint.
    #[source]
    pub source: prost::DecodeError,
}

impl From<CorruptRecord> for cnnf_store::StoreError {
    fn from(error: CorruptRecord) -> Self {
        cnnf_store::StoreError::Engine(error.to_string())
    }
}

/// Decodes a stored record.
pub fn decode<M: prost::Message + Default>(what: &'static str, bytes: &[u8]) -> Result<M, CorruptRecord> {
    M::decode(bytes).map_err(|source| CorruptRecord { what, source })
}

/// The number of an audit: the stream sequence of the decision that opened
/// it and the decision's position in its batch. Its id is
/// `audit:CNNF_FLOWS:<seq>:<part>`, the same however often it is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditNumber {
    /// Stream sequence of the opening decision's message.
    pub sequence: u64,
    /// Index of the decision in its batch.
    pub part: u32,
}

impl AuditNumber {
    /// Length of the encoded form.
    pub const LEN: usize = 12;

    /// Big-endian bytes, sorting like the number.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.sequence.to_be_bytes());
        out[8..].copy_from_slice(&self.part.to_be_bytes());
        out
    }

    /// Reads [`encode`](Self::encode)'s output; `None` if the length is wrong.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        Some(Self {
            sequence: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            part: u32::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }

    /// The audit id.
    pub fn audit_id(&self) -> String {
        cnnf_core::ids::derived(
            crate::PRODUCER,
            cnnf_bus::topology::FLOWS,
            self.sequence,
            Some(self.part),
        )
    }
}

/// A stored audit and how much of it was published.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    /// The audit as it stands.
    #[prost(message, optional, tag = "1")]
    pub audit: Option<Audit>,
    /// The count the last publication carried.
    #[prost(uint64, tag = "2")]
    pub published_count: u64,
}

/// Port-scan detection state of one source.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScanRecord {
    /// Event time the current window started.
    #[prost(int64, tag = "1")]
    pub window_start_unix_nanos: i64,
    /// Distinct destination ports in the window (at most the threshold).
    #[prost(uint32, repeated, tag = "2")]
    pub ports: Vec<u32>,
    /// Distinct destination addresses in the window (at most the threshold).
    #[prost(string, repeated, tag = "3")]
    pub hosts: Vec<String>,
    /// Until this event time the source is a known scanner: no new incident,
    /// and its audits are aggregated over ports.
    #[prost(int64, tag = "4")]
    pub cooldown_until_unix_nanos: i64,
    /// Id of the last incident raised for this source.
    #[prost(string, tag = "5")]
    pub incident_id: String,
}

/// The holdings a container opened and has not closed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerRecord {
    /// Keys in `audit_holdings`.
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub holdings: Vec<Vec<u8>>,
}

/// One policy change as the log recorded it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PolicyRecord {
    /// The change.
    #[prost(message, optional, tag = "1")]
    pub event: Option<PolicyEvent>,
    /// Its event time.
    #[prost(int64, tag = "2")]
    pub time_unix_nanos: i64,
    /// Its `CNNF_POLICY` sequence.
    #[prost(uint64, tag = "3")]
    pub sequence: u64,
}

/// One model change, reduced to what point-in-time questions need.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelChange {
    /// "created", "learned", "locked", "extended", "relearn",
    /// "connection-deleted" or "liveness".
    #[prost(string, tag = "1")]
    pub kind: String,
    /// Image name (set by "created").
    #[prost(string, tag = "2")]
    pub image_name: String,
    /// Learned connections added ("learned") or removed ("connection-deleted").
    #[prost(uint64, tag = "3")]
    pub connections: u64,
    /// Event time.
    #[prost(int64, tag = "4")]
    pub time_unix_nanos: i64,
    /// `CNNF_MODELS` sequence.
    #[prost(uint64, tag = "5")]
    pub sequence: u64,
}

/// A time as 8 bytes sorting like the time.
pub fn time_bytes(unix_nanos: i64) -> [u8; 8] {
    ((unix_nanos as u64) ^ (1 << 63)).to_be_bytes()
}

/// Reads [`time_bytes`]' output.
pub fn time_from_bytes(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// Nanoseconds in an index minute.
pub const MINUTE_NANOS: i64 = 60_000_000_000;

/// The index minute of a time.
pub fn minute_of(unix_nanos: i64) -> i64 {
    unix_nanos.div_euclid(MINUTE_NANOS)
}

/// One dimension of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Every audit, by time.
    Time,
    /// Source or destination image id.
    Image,
    /// Deciding node.
    Node,
    /// Verdict.
    Verdict,
    /// What decided ("rule:<id>", "model:<image>", "mode").
    Rule,
    /// Cluster.
    Cluster,
}

impl Dimension {
    fn tag(self) -> u8 {
        match self {
            Dimension::Time => b'T',
            Dimension::Image => b'I',
            Dimension::Node => b'N',
            Dimension::Verdict => b'V',
            Dimension::Rule => b'R',
            Dimension::Cluster => b'C',
        }
    }
}

/// The prefix of a dimension value's entries: `<tag> <value> 0`.
pub fn index_prefix(dimension: Dimension, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(value.len() + 2);
    key.push(dimension.tag());
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key
}

/// Length of the part of an index key after its prefix.
pub const INDEX_SUFFIX_LEN: usize = 8 + 8 + AuditNumber::LEN;

/// An index entry: `<prefix> <minute> <first seen> <audit number>`, so a
/// minute's entries are one prefix scan, in time order.
pub fn index_key(dimension: Dimension, value: &str, first_seen: i64, number: AuditNumber) -> Vec<u8> {
    let mut key = index_prefix(dimension, value);
    key.extend_from_slice(&index_suffix(first_seen, number));
    key
}

/// The suffix of an index key (also the page token, in hex).
pub fn index_suffix(first_seen: i64, number: AuditNumber) -> [u8; INDEX_SUFFIX_LEN] {
    let mut out = [0u8; INDEX_SUFFIX_LEN];
    out[..8].copy_from_slice(&time_bytes(minute_of(first_seen)));
    out[8..16].copy_from_slice(&time_bytes(first_seen));
    out[16..].copy_from_slice(&number.encode());
    out
}

/// The key of a holding.
pub fn holding_key(address: &str, from: i64, sequence: u64) -> Vec<u8> {
    let mut key = holding_prefix(address);
    key.extend_from_slice(&time_bytes(from));
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The prefix of an address's holdings.
pub fn holding_prefix(address: &str) -> Vec<u8> {
    let mut key = address.as_bytes().to_vec();
    key.push(0);
    key
}

/// The key of a model change.
pub fn model_key(image_id: &str, time: i64, sequence: u64) -> Vec<u8> {
    let mut key = image_id.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&time_bytes(time));
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The key of a policy change.
pub fn policy_key(time: i64, sequence: u64) -> Vec<u8> {
    let mut key = time_bytes(time).to_vec();
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_sort_in_time_order() {
        let times = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        for pair in times.windows(2) {
            assert!(time_bytes(pair[0]) < time_bytes(pair[1]));
        }
        for time in times {
            assert_eq!(time_from_bytes(time_bytes(time)), time);
        }
    }

    #[test]
    fn audit_numbers_round_trip_and_name_their_source() {
        let number = AuditNumber { sequence: 42, part: 3 };
        assert_eq!(AuditNumber::decode(&number.encode()), Some(number));
        assert_eq!(AuditNumber::decode(&[1, 2]), None);
        assert_eq!(number.audit_id(), "audit:CNNF_FLOWS:42:3");
    }

    #[test]
    fn index_keys_of_one_minute_share_a_prefix_and_sort_by_time() {
        let a = index_key(
            Dimension::Node,
            "n1",
            61_000_000_000,
            AuditNumber { sequence: 9, part: 0 },
        );
        let b = index_key(
            Dimension::Node,
            "n1",
            62_000_000_000,
            AuditNumber { sequence: 1, part: 0 },
        );
        assert_eq!(a[..11], b[..11]);
        assert!(a < b);
    }
}
