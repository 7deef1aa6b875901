//! Decision records: from the verdict thread, through a bounded ring, to
//! aggregated `ConnectionDecision`s.
//!
//! A verdict thread must never wait, so it hands each decision to a
//! bounded ring ([`Ring`]) with a non-blocking push; when the ring is full
//! the decision is counted as overflowed (metric and the next batch's
//! `overflow_count`), never silently lost. The publisher task drains the
//! ring into an [`Aggregator`], which folds identical decisions (same ends
//! and addresses, port, verdict, deciding rule or model, direction, mode
//! and table version; the source port never counts) seen in one window
//! into one decision with a count and first/last-seen times. Under a SYN
//! flood from one address, that makes one event per window instead of one
//! per SYN. A flood from many addresses makes many distinct decisions: a
//! window keeps at most `max_distinct` of them, and counts the rest as
//! overflowed, so the event stream stays bounded whatever arrives.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use cnnf_core::eval::DecidedBy;
use cnnf_core::proto::{self, ConnectionDecision, Direction, Mode, Verdict};

use crate::identities::Peer;
use crate::metrics::Metrics;

/// What decided, owned (the table's borrowed names outlive no table swap).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Decider {
    /// An operator rule, by id.
    Rule(Box<str>),
    /// A model, by image ID.
    Model(Box<str>),
    /// The mode alone.
    Mode,
    /// Nothing in force checks this connection.
    Default,
}

impl From<DecidedBy<'_>> for Decider {
    fn from(decided_by: DecidedBy<'_>) -> Self {
        match decided_by {
            DecidedBy::Rule(id) => Decider::Rule(id.into()),
            DecidedBy::Model(image) => Decider::Model(image.into()),
            DecidedBy::Mode => Decider::Mode,
            DecidedBy::Default => Decider::Default,
        }
    }
}

impl Decider {
    /// The form a decision event carries.
    pub fn to_proto(&self) -> proto::DecidedBy {
        match self {
            Decider::Rule(id) => DecidedBy::Rule(id).to_proto(),
            Decider::Model(image) => DecidedBy::Model(image).to_proto(),
            Decider::Mode => DecidedBy::Mode.to_proto(),
            Decider::Default => DecidedBy::Default.to_proto(),
        }
    }
}

/// One decision as the verdict thread records it.
#[derive(Debug, Clone)]
pub struct DecisionRecord {
    /// Who opened the connection.
    pub source: Arc<Peer>,
    /// The source address.
    pub source_address: IpAddr,
    /// Who was reached.
    pub destination: Arc<Peer>,
    /// The destination address.
    pub destination_address: IpAddr,
    /// The destination port.
    pub port: u16,
    /// Egress (source local) or ingress (destination local only).
    pub direction: Direction,
    /// The verdict.
    pub verdict: Verdict,
    /// What decided it.
    pub decided_by: Decider,
    /// The mode in force for this connection.
    pub mode: Mode,
    /// The verdict table's version.
    pub table_version: u64,
    /// When, Unix nanoseconds.
    pub at_unix_nanos: i64,
}

/// The producer side of the bounded ring: shared by every verdict thread.
#[derive(Debug, Clone)]
pub struct Ring {
    sender: SyncSender<DecisionRecord>,
    metrics: Metrics,
}

impl Ring {
    /// A ring of `capacity` records and its consumer side.
    pub fn new(capacity: usize, metrics: Metrics) -> (Ring, Receiver<DecisionRecord>) {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity.max(1));
        (Ring { sender, metrics }, receiver)
    }

    /// Records a decision without ever blocking; a full ring counts it as
    /// overflowed.
    pub fn push(&self, record: DecisionRecord) {
        match self.sender.try_send(record) {
            Ok(()) => {
                self.metrics.decisions_recorded.inc();
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.decisions_overflowed.inc();
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    source: Arc<Peer>,
    source_address: IpAddr,
    destination: Arc<Peer>,
    destination_address: IpAddr,
    port: u16,
    direction: Direction,
    verdict: Verdict,
    decided_by: Decider,
    mode: Mode,
    table_version: u64,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first: i64,
    last: i64,
    count: u64,
    order: u64,
}

/// Folds identical decisions of one window into one.
#[derive(Debug)]
pub struct Aggregator {
    open: HashMap<Key, Seen>,
    max_distinct: usize,
    overflowed: u64,
    next_order: u64,
}

impl Aggregator {
    /// An aggregator keeping at most `max_distinct` distinct decisions per
    /// window.
    pub fn new(max_distinct: usize) -> Self {
        Self {
            open: HashMap::new(),
            max_distinct: max_distinct.max(1),
            overflowed: 0,
            next_order: 0,
        }
    }

    /// Adds one decision to the window.
    pub fn add(&mut self, record: DecisionRecord) {
        let key = Key {
            source: record.source,
            source_address: record.source_address,
            destination: record.destination,
            destination_address: record.destination_address,
            port: record.port,
            direction: record.direction,
            verdict: record.verdict,
            decided_by: record.decided_by,
            mode: record.mode,
            table_version: record.table_version,
        };
        let at = record.at_unix_nanos;
        if let Some(seen) = self.open.get_mut(&key) {
            seen.first = seen.first.min(at);
            seen.last = seen.last.max(at);
            seen.count += 1;
            return;
        }
        if self.open.len() >= self.max_distinct {
            self.overflowed += 1;
            return;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.open.insert(
            key,
            Seen {
                first: at,
                last: at,
                count: 1,
                order,
            },
        );
    }

    /// True when the window holds nothing.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.overflowed == 0
    }

    /// Closes the window: its decisions in order of first arrival, and how
    /// many decisions it could not keep.
    pub fn take(&mut self) -> (Vec<ConnectionDecision>, u64) {
        let mut entries: Vec<_> = self.open.drain().collect();
        entries.sort_by_key(|(_, seen)| seen.order);
        self.next_order = 0;
        let decisions = entries
            .into_iter()
            .map(|(key, seen)| ConnectionDecision {
                source: Some(proto::Endpoint {
                    address: key.source_address.to_string(),
                    port: 0,
                    identity: Some(key.source.to_proto()),
                }),
                destination: Some(proto::Endpoint {
                    address: key.destination_address.to_string(),
                    port: u32::from(key.port),
                    identity: Some(key.destination.to_proto()),
                }),
                protocol: proto::Protocol::Tcp as i32,
                direction: key.direction as i32,
                verdict: key.verdict as i32,
                decided_by: Some(key.decided_by.to_proto()),
                verdict_table_version: key.table_version,
                mode: key.mode as i32,
                first_seen_unix_nanos: seen.first,
                last_seen_unix_nanos: seen.last,
                count: seen.count,
            })
            .collect();
        (decisions, std::mem::take(&mut self.overflowed))
    }
}

/// Drains what the ring holds now into `aggregator`, at most `limit`
/// records (so one busy ring cannot starve the publisher's other work).
/// Returns how many were taken.
pub fn drain(receiver: &Receiver<DecisionRecord>, aggregator: &mut Aggregator, limit: usize) -> usize {
    let mut taken = 0;
    while taken < limit {
        match receiver.try_recv() {
            Ok(record) => {
                aggregator.add(record);
                taken += 1;
            }
            Err(_) => break,
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnf_core::eval::Identity;

    fn record(source: &str, port: u16, at: i64) -> DecisionRecord {
        DecisionRecord {
            source: Arc::new(Peer::bare(Identity::Image {
                id: "sha256:a".into(),
                name: "a".into(),
            })),
            source_address: source.parse().unwrap(),
            destination: Arc::new(Peer::bare(Identity::Unknown)),
            destination_address: "10.0.0.2".parse().unwrap(),
            port,
            direction: Direction::Egress,
            verdict: Verdict::Alert,
            decided_by: Decider::Mode,
            mode: Mode::Alert,
            table_version: 4,
            at_unix_nanos: at,
        }
    }

    #[test]
    fn identical_decisions_fold_into_one_with_a_count() {
        let mut aggregator = Aggregator::new(10);
        aggregator.add(record("10.0.0.1", 80, 5));
        aggregator.add(record("10.0.0.1", 23, 6));
        aggregator.add(record("10.0.0.1", 80, 3));
        aggregator.add(record("10.0.0.1", 80, 9));
        let (decisions, overflowed) = aggregator.take();
        assert_eq!(overflowed, 0);
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions[0].destination.as_ref().unwrap().port, 80);
        assert_eq!(decisions[0].count, 3);
        assert_eq!(decisions[0].first_seen_unix_nanos, 3);
        assert_eq!(decisions[0].last_seen_unix_nanos, 9);
        assert_eq!(decisions[0].verdict_table_version, 4);
        assert_eq!(decisions[1].count, 1);
        assert!(aggregator.is_empty());
    }

    #[test]
    fn a_window_keeps_at_most_max_distinct_and_counts_the_rest() {
        let mut aggregator = Aggregator::new(2);
        for i in 0..5u8 {
            aggregator.add(record(&format!("10.0.1.{i}"), 80, 1));
        }
        aggregator.add(record("10.0.1.0", 80, 2));
        let (decisions, overflowed) = aggregator.take();
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions.iter().map(|d| d.count).sum::<u64>(), 3);
        assert_eq!(overflowed, 3);
        assert_eq!(aggregator.take().1, 0);
    }

    #[test]
    fn a_full_ring_counts_instead_of_blocking() {
        let metrics = Metrics::default();
        let (ring, receiver) = Ring::new(2, metrics.clone());
        for _ in 0..5 {
            ring.push(record("10.0.0.1", 80, 1));
        }
        assert_eq!(metrics.decisions_recorded.get(), 2);
        assert_eq!(metrics.decisions_overflowed.get(), 3);
        let mut aggregator = Aggregator::new(10);
        assert_eq!(drain(&receiver, &mut aggregator, 100), 2);
        assert_eq!(aggregator.take().0[0].count, 2);
    }
}
