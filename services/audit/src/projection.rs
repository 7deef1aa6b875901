//! The folds of the audit service: decisions into audits (with port-scan
//! detection), workloads into address history, policy and model changes
//! into their history.
//!
//! Audits. A decision with verdict alert, prevent or block joins the
//! audit of its dedup key ([`crate::audit::dedup_key`]) in its window (event
//! time, windows aligned on multiples of the window length, so a replay of
//! any range finds the same windows). The first decision of a key in a
//! window creates the audit: its number (and id) comes from that
//! decision's stream sequence and position, it is indexed, and it is put
//! in the outbox to be published at once. Later decisions add their counts.
//! When event time (the newest decision time in the stream, less the
//! grace) passes a window's end, every audit of that window whose count
//! grew since it was published is published again, same `audit_id`, with
//! the final count (message id `<audit_id>:<count>`). A window is
//! therefore closed by later traffic anywhere in the stream; the index
//! always holds the exact count.
//!
//! Everything the fold keeps is in the store, written in the runner's
//! batch, except a copy of the set of audits waiting for their window to
//! close, which is rebuilt from the store at every start.

use std::collections::BTreeSet;
use std::time::Duration;

use cnnf_bus::runner::ApplyError;
use cnnf_bus::topology::FLOWS;
use cnnf_bus::{Event, Projection};
use cnnf_core::envelope::Rejection;
use cnnf_core::{address, ids, subjects};
use cnnf_proto::v1::{
    envelope::Payload, incident, model_event, AddressHolding, Audit, ConnectionDecision, IdentityKind, Incident,
};
use cnnf_store::{ProjectionStore, StoreError, Txn};
use prost::Message as _;

use crate::audit::{self, audit_endpoint, decided_by_text, decision_time, dedup_key};
use crate::scan::{self, Outcome, ScanSettings};
use crate::store::{
    self, time_bytes, AuditNumber, AuditRecord, ContainerRecord, ModelChange, PolicyRecord, ScanRecord,
};

/// Producer of port-scan incident ids.
pub const SCAN_PRODUCER: &str = "audit-scan";
/// Subject token of port-scan incidents: `cnnf.incident.<cluster>.port-scan`.
pub const PORT_SCAN: &str = "port-scan";
/// Default dedup window, seconds.
pub const DEFAULT_WINDOW_SECONDS: u64 = 10;
/// Default grace after a window's end before it is closed, seconds.
pub const DEFAULT_GRACE_SECONDS: u64 = 5;

fn invalid(detail: impl Into<String>) -> ApplyError {
    ApplyError::Reject(Rejection::Invalid(detail.into()))
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX).max(1)
}

fn read<M: prost::Message + Default>(txn: &Txn<'_>, table: &'static str, key: &[u8]) -> Result<Option<M>, ApplyError> {
    match txn.get(table, key)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(
            store::decode(table, &bytes).map_err(|error| ApplyError::Store(error.into()))?,
        )),
    }
}

fn corrupt(what: &str) -> ApplyError {
    ApplyError::Store(StoreError::Engine(format!("stored {what} is corrupt")))
}

/// Settings of the audit fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Identical audits within one window are one audit.
    pub window: Duration,
    /// How far event time must pass a window's end before it is closed.
    pub grace: Duration,
    /// Port-scan detection.
    pub scan: ScanSettings,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(DEFAULT_WINDOW_SECONDS),
            grace: Duration::from_secs(DEFAULT_GRACE_SECONDS),
            scan: ScanSettings::default(),
        }
    }
}

impl AuditSettings {
    /// The window of a time.
    pub fn window_of(&self, time: i64) -> i64 {
        time.div_euclid(nanos(self.window))
    }

    /// `[from, to)` widened to whole windows.
    pub fn widen(&self, from: i64, to: i64) -> (i64, i64) {
        let window = nanos(self.window);
        let start = from.div_euclid(window).saturating_mul(window);
        let end = to.div_euclid(window).saturating_mul(window);
        let end = if end < to { end.saturating_add(window) } else { end };
        (start, end)
    }
}

/// Decisions into audits and incidents.
pub struct FlowsProjection {
    settings: AuditSettings,
    range: Option<(i64, i64)>,
    /// Audits whose count grew since published, by window (copy of `audit_dirty`).
    dirty: BTreeSet<(i64, AuditNumber)>,
    /// Earliest and latest index minute holding an audit.
    bounds: Option<(i64, i64)>,
}

impl FlowsProjection {
    /// The fold of the live service over `store`'s committed state.
    pub fn open(store: &dyn ProjectionStore, settings: AuditSettings) -> Result<Self, StoreError> {
        let mut dirty = BTreeSet::new();
        for (key, _) in store.scan_prefix(store::DIRTY, b"", usize::MAX)? {
            let (window, number) =
                split_dirty(&key).ok_or_else(|| StoreError::Engine("stored dirty key is corrupt".into()))?;
            dirty.insert((window, number));
        }
        let first = store.get(store::STATE, store::STATE_FIRST_MINUTE)?;
        let last = store.get(store::STATE, store::STATE_LAST_MINUTE)?;
        let bounds = match (first, last) {
            (Some(first), Some(last)) => Some((decode_i64(&first)?, decode_i64(&last)?)),
            _ => None,
        };
        Ok(Self {
            settings,
            range: None,
            dirty,
            bounds,
        })
    }

    /// A fold for a replay into an empty store: only decisions whose time
    /// lies in `[from, to)` count (its outbox is never published).
    pub fn replay(settings: AuditSettings, from: i64, to: i64) -> Self {
        Self {
            settings,
            range: Some((from, to)),
            dirty: BTreeSet::new(),
            bounds: None,
        }
    }

    fn outbox(&self, txn: &mut Txn<'_>, sequence: u64, part: &mut u32, message: store::OutboxMessage) {
        let mut key = sequence.to_be_bytes().to_vec();
        key.extend_from_slice(&part.to_be_bytes());
        *part += 1;
        txn.put(store::OUTBOX, key, message.encode_to_vec());
    }

    fn note_minute(&mut self, txn: &mut Txn<'_>, time: i64) {
        let minute = store::minute_of(time);
        let (first, last) = self.bounds.unwrap_or((minute, minute));
        let bounds = (first.min(minute), last.max(minute));
        if self.bounds != Some(bounds) {
            txn.put(store::STATE, store::STATE_FIRST_MINUTE, bounds.0.to_be_bytes().to_vec());
            txn.put(store::STATE, store::STATE_LAST_MINUTE, bounds.1.to_be_bytes().to_vec());
            self.bounds = Some(bounds);
        }
    }

    /// Folds one audited decision.
    #[allow(clippy::too_many_arguments)]
    fn audit_decision(
        &mut self,
        txn: &mut Txn<'_>,
        cluster: &str,
        node: &str,
        sequence: u64,
        index: u32,
        decision: &ConnectionDecision,
        time: i64,
        part: &mut u32,
    ) -> Result<(), ApplyError> {
        let count = decision.count.max(1);
        let source = decision.source.clone().unwrap_or_default();
        let destination = decision.destination.clone().unwrap_or_default();

        let mut scan_key = cluster.as_bytes().to_vec();
        scan_key.push(0);
        scan_key.extend_from_slice(source.address.as_bytes());
        let mut scan_record: ScanRecord = read(txn, store::SCAN, &scan_key)?.unwrap_or_default();
        let outcome = scan::observe(
            &self.settings.scan,
            &mut scan_record,
            time,
            &destination.address,
            destination.port,
        );
        if let Outcome::Detected {
            ports,
            hosts,
            window_start,
        } = outcome
        {
            let incident_id = ids::derived(SCAN_PRODUCER, FLOWS, sequence, Some(index));
            scan_record.incident_id = incident_id.clone();
            let identity = source.identity.clone().unwrap_or_default();
            let details = [
                ("source_address", source.address.clone()),
                (
                    "source_identity_kind",
                    audit::identity_kind_name(identity.kind).to_owned(),
                ),
                ("source_identity_id", identity.id.clone()),
                ("source_identity_name", identity.name.clone()),
                ("source_container_id", identity.container_id.clone()),
                ("node", node.to_owned()),
                ("distinct_ports", ports.to_string()),
                ("distinct_hosts", hosts.to_string()),
                ("window_start_unix_nanos", window_start.to_string()),
                ("detected_unix_nanos", time.to_string()),
                ("cooldown_seconds", self.settings.scan.cooldown.as_secs().to_string()),
            ]
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect();
            let incident = Incident {
                incident_id,
                kind: incident::Kind::PortScan as i32,
                image_id: if identity.kind == IdentityKind::Image as i32 {
                    identity.id.clone()
                } else {
                    String::new()
                },
                summary: format!(
                    "{} ({}) probed {ports} ports on {hosts} hosts within {} s",
                    source.address,
                    if identity.name.is_empty() {
                        "unknown"
                    } else {
                        identity.name.as_str()
                    },
                    self.settings.scan.window.as_secs()
                ),
                details,
            };
            tracing::warn!(message = "Port scan detected.", source = %source.address, node, ports, hosts);
            let message = audit::incident_message(cluster, PORT_SCAN, time, incident)
                .map_err(|error| invalid(error.to_string()))?;
            self.outbox(txn, sequence, part, message);
        }
        if outcome != Outcome::Suppressed {
            txn.put(store::SCAN, scan_key, scan_record.encode_to_vec());
        }

        let decided_by = decided_by_text(decision);
        let aggregate = outcome.aggregates_ports();
        let window = self.settings.window_of(time);
        let mut key = time_bytes(window).to_vec();
        key.extend_from_slice(&dedup_key(cluster, node, decision, &decided_by, aggregate));
        let last_seen = decision.last_seen_unix_nanos.max(time);

        // A dedup key whose record retention removed opens a new audit.
        let existing = match txn.get(store::KEYS, &key)? {
            Some(bytes) => {
                let number = AuditNumber::decode(&bytes).ok_or_else(|| corrupt("audit key"))?;
                read::<AuditRecord>(txn, store::RECORDS, &number.encode())?.map(|record| (number, record))
            }
            None => None,
        };
        if let Some((number, mut record)) = existing {
            let audit = record.audit.as_mut().ok_or_else(|| corrupt("audit"))?;
            audit.count = audit.count.saturating_add(count);
            audit.first_seen_unix_nanos = audit.first_seen_unix_nanos.min(time);
            audit.last_seen_unix_nanos = audit.last_seen_unix_nanos.max(last_seen);
            audit.verdict_table_version = audit.verdict_table_version.max(decision.verdict_table_version);
            let grew = audit.count > record.published_count;
            txn.put(store::RECORDS, number.encode().to_vec(), record.encode_to_vec());
            if grew && self.dirty.insert((window, number)) {
                txn.put(store::DIRTY, dirty_key(window, number), Vec::new());
            }
            return Ok(());
        }

        let number = AuditNumber { sequence, part: index };
        let audit = Audit {
            audit_id: number.audit_id(),
            first_seen_unix_nanos: time,
            last_seen_unix_nanos: last_seen,
            count,
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            source: Some(audit_endpoint(Some(&source), false)),
            destination: Some(audit_endpoint(Some(&destination), !aggregate)),
            protocol: decision.protocol,
            verdict: decision.verdict,
            decided_by: decided_by.clone(),
            verdict_table_version: decision.verdict_table_version,
        };
        txn.put(store::KEYS, key, number.encode().to_vec());
        let record = AuditRecord {
            audit: Some(audit.clone()),
            published_count: count,
        };
        txn.put(store::RECORDS, number.encode().to_vec(), record.encode_to_vec());
        for key in crate::index::entries(&audit, time, number) {
            txn.put(store::INDEX, key, Vec::new());
        }
        self.note_minute(txn, time);
        let message = audit::audit_message(&audit.audit_id, &audit).map_err(|error| invalid(error.to_string()))?;
        self.outbox(txn, sequence, part, message);
        Ok(())
    }

    /// Publishes the final count of every grown audit whose window ended
    /// before `watermark`.
    fn close_windows(
        &mut self,
        txn: &mut Txn<'_>,
        watermark: i64,
        sequence: u64,
        part: &mut u32,
    ) -> Result<(), ApplyError> {
        let closable = self.settings.window_of(watermark);
        while let Some(&(window, number)) = self.dirty.first() {
            if window >= closable {
                break;
            }
            self.dirty.pop_first();
            txn.delete(store::DIRTY, dirty_key(window, number));
            let Some(mut record) = read::<AuditRecord>(txn, store::RECORDS, &number.encode())? else {
                continue;
            };
            let Some(audit) = record.audit.clone() else {
                continue;
            };
            if audit.count <= record.published_count {
                continue;
            }
            record.published_count = audit.count;
            txn.put(store::RECORDS, number.encode().to_vec(), record.encode_to_vec());
            let id = format!("{}:{}", audit.audit_id, audit.count);
            let message = audit::audit_message(&id, &audit).map_err(|error| invalid(error.to_string()))?;
            self.outbox(txn, sequence, part, message);
        }
        Ok(())
    }
}

fn decode_i64(bytes: &[u8]) -> Result<i64, StoreError> {
    Ok(i64::from_be_bytes(bytes.try_into().map_err(|_| {
        StoreError::Engine("stored time bound is corrupt".into())
    })?))
}

/// Key in `audit_dirty`.
pub fn dirty_key(window: i64, number: AuditNumber) -> Vec<u8> {
    let mut key = time_bytes(window).to_vec();
    key.extend_from_slice(&number.encode());
    key
}

fn split_dirty(key: &[u8]) -> Option<(i64, AuditNumber)> {
    if key.len() != 8 + AuditNumber::LEN {
        return None;
    }
    let window = store::time_from_bytes(key[..8].try_into().ok()?);
    Some((window, AuditNumber::decode(&key[8..])?))
}

impl Projection for FlowsProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let Some(Payload::Decisions(batch)) = &envelope.payload else {
            return Ok(());
        };
        match subjects::agent_origin(event.subject) {
            Some((cluster, node)) if cluster == envelope.cluster && node == envelope.node => {}
            _ => {
                return Err(invalid(format!(
                    "decisions of cluster {:?} node {:?} arrived on subject {:?}",
                    envelope.cluster, envelope.node, event.subject
                )))
            }
        }
        let mut part = 0u32;
        let mut newest = i64::MIN;
        for (index, decision) in batch.decisions.iter().enumerate() {
            let time = decision_time(decision, envelope.time_unix_nanos);
            newest = newest.max(time);
            if !audit::audited(decision.verdict) {
                continue;
            }
            if let Some((from, to)) = self.range {
                if time < from || time >= to {
                    continue;
                }
            }
            let index = u32::try_from(index).map_err(|_| invalid("more than 2^32 decisions in one batch"))?;
            self.audit_decision(
                txn,
                &envelope.cluster,
                &envelope.node,
                event.stream_sequence,
                index,
                decision,
                time,
                &mut part,
            )?;
        }
        if newest != i64::MIN {
            let watermark = newest.saturating_sub(nanos(self.settings.grace));
            self.close_windows(txn, watermark, event.stream_sequence, &mut part)?;
        }
        Ok(())
    }
}

/// Workload events into address holdings over time.
#[derive(Debug, Default)]
pub struct WorkloadsProjection;

impl WorkloadsProjection {
    fn close(txn: &mut Txn<'_>, container_id: &str, time: i64, reason: &str) -> Result<(), ApplyError> {
        let Some(record) = read::<ContainerRecord>(txn, store::CONTAINERS, container_id.as_bytes())? else {
            return Ok(());
        };
        for key in record.holdings {
            if let Some(mut holding) = read::<AddressHolding>(txn, store::HOLDINGS, &key)? {
                if holding.held_until_unix_nanos == 0 {
                    holding.held_until_unix_nanos = time.max(holding.held_from_unix_nanos);
                    holding.end_reason = reason.to_owned();
                    txn.put(store::HOLDINGS, key, holding.encode_to_vec());
                }
            }
        }
        txn.delete(store::CONTAINERS, container_id.as_bytes().to_vec());
        Ok(())
    }
}

impl Projection for WorkloadsProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let envelope = &event.envelope;
        let time = envelope.time_unix_nanos;
        match &envelope.payload {
            Some(Payload::WorkloadStarted(started)) => {
                let workload = started
                    .workload
                    .clone()
                    .ok_or_else(|| invalid("workload_started: no workload"))?;
                if workload.container_id.is_empty() {
                    return Err(invalid("workload_started: empty container_id"));
                }
                let addresses = workload
                    .addresses
                    .iter()
                    .map(|text| address::canonical(text).map_err(|error| invalid(format!("workload_started: {error}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut record: ContainerRecord =
                    read(txn, store::CONTAINERS, workload.container_id.as_bytes())?.unwrap_or_default();
                for address in addresses {
                    let key = store::holding_key(&address, time, event.stream_sequence);
                    let holding = AddressHolding {
                        address,
                        workload: Some(workload.clone()),
                        held_from_unix_nanos: time,
                        held_until_unix_nanos: 0,
                        end_reason: String::new(),
                    };
                    txn.put(store::HOLDINGS, key.clone(), holding.encode_to_vec());
                    record.holdings.push(key);
                }
                txn.put(
                    store::CONTAINERS,
                    workload.container_id.as_bytes().to_vec(),
                    record.encode_to_vec(),
                );
            }
            Some(Payload::WorkloadStopped(stopped)) => {
                let workload = stopped
                    .workload
                    .clone()
                    .ok_or_else(|| invalid("workload_stopped: no workload"))?;
                let reason = if stopped.reason.is_empty() {
                    "stopped"
                } else {
                    stopped.reason.as_str()
                };
                Self::close(txn, &workload.container_id, time, reason)?;
            }
            Some(Payload::NodeGone(gone)) => {
                for container_id in &gone.container_ids {
                    Self::close(txn, container_id, time, "node-gone")?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Policy changes into their history.
#[derive(Debug, Default)]
pub struct PolicyProjection;

impl Projection for PolicyProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let Some(Payload::Policy(policy)) = &event.envelope.payload else {
            return Ok(());
        };
        let time = event.envelope.time_unix_nanos;
        let record = PolicyRecord {
            event: Some(policy.clone()),
            time_unix_nanos: time,
            sequence: event.stream_sequence,
        };
        txn.put(
            store::POLICY,
            store::policy_key(time, event.stream_sequence),
            record.encode_to_vec(),
        );
        Ok(())
    }
}

/// Model changes into their history.
#[derive(Debug, Default)]
pub struct ModelsProjection;

impl Projection for ModelsProjection {
    fn apply(&mut self, event: &Event<'_>, txn: &mut Txn<'_>) -> Result<(), ApplyError> {
        let Some(Payload::Model(model)) = &event.envelope.payload else {
            return Ok(());
        };
        if model.image_id.is_empty() {
            return Err(invalid("model event: empty image_id"));
        }
        let time = event.envelope.time_unix_nanos;
        let (kind, image_name, connections) = match &model.change {
            Some(model_event::Change::Created(created)) => ("created", created.image_name.clone(), 0),
            Some(model_event::Change::Learned(learned)) => ("learned", String::new(), learned.connections.len() as u64),
            Some(model_event::Change::Locked(_)) => ("locked", String::new(), 0),
            Some(model_event::Change::Extended(_)) => ("extended", String::new(), 0),
            Some(model_event::Change::Relearn(_)) => ("relearn", String::new(), 0),
            Some(model_event::Change::ConnectionDeleted(_)) => ("connection-deleted", String::new(), 1),
            Some(model_event::Change::Liveness(_)) => ("liveness", String::new(), 0),
            None => return Ok(()),
        };
        let change = ModelChange {
            kind: kind.to_owned(),
            image_name,
            connections,
            time_unix_nanos: time,
            sequence: event.stream_sequence,
        };
        txn.put(
            store::MODELS,
            store::model_key(&model.image_id, time, event.stream_sequence),
            change.encode_to_vec(),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_widen_to_whole_windows() {
        let settings = AuditSettings::default();
        let second = 1_000_000_000i64;
        assert_eq!(settings.widen(12 * second, 25 * second), (10 * second, 30 * second));
        assert_eq!(settings.widen(10 * second, 30 * second), (10 * second, 30 * second));
        assert_eq!(settings.widen(-5 * second, 0), (-10 * second, 0));
    }

    #[test]
    fn dirty_keys_round_trip() {
        let number = AuditNumber { sequence: 7, part: 1 };
        assert_eq!(split_dirty(&dirty_key(-3, number)), Some((-3, number)));
        assert_eq!(split_dirty(b"short"), None);
    }
}
