//! Retention: audits first seen longer ago than `--retention-hours` leave
//! the store, with their index entries and dedup keys, so the store stays
//! bounded however long the service runs.
//!
//! A periodic sweep (every minute, and at start) walks the two tables whose
//! keys are time-ordered from their oldest entry: the time dimension of the
//! index (`T 0 <minute> <first seen> <number>`) and `audit_keys`
//! (`<window> <dedup key>`). For each expired audit it reads the record,
//! rebuilds the audit's index keys (every dimension shares the time of the
//! time entry) and deletes record and entries in one write; then it
//! deletes the dedup keys of the expired windows. The cut-off is a window
//! boundary, so an audit goes together with its whole window. The applied
//! sequences, the outbox, the scan state and the address, policy and model
//! history are never touched.
//!
//! The sweep writes beside the flows runner, which owns these tables, so
//! both sides tolerate the other: a decision older than the retention that
//! arrives late finds either its dedup key and record (and updates them), or
//! neither, or only the key (and opens a new audit); the next sweep removes
//! the result. Only such a late decision that reads its audit in the very
//! instant the sweep deletes it can put the record back without index
//! entries: it is then invisible to queries and remains as a stray record.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cnnf_store::{ProjectionStore, StoreError, WriteBatch};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::projection::AuditSettings;
use crate::store::{self, time_from_bytes, AuditNumber, AuditRecord, Dimension, INDEX_SUFFIX_LEN};

/// Default retention, hours (30 days).
pub const DEFAULT_RETENTION_HOURS: u64 = 720;
/// Default time between two sweeps.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Expired audits removed per store write.
const CHUNK: usize = 5_000;

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Audit records.
    pub audits: u64,
    /// Index entries.
    pub index_entries: u64,
    /// Dedup keys of expired windows.
    pub dedup_keys: u64,
}

/// Counters of the sweeps, on `/metrics`. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct RetentionMetrics {
    /// Audits removed.
    pub audits: Counter,
    /// Sweeps completed.
    pub sweeps: Counter,
}

impl RetentionMetrics {
    /// Registers the counters under `cnnf_audit_retention_`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cnnf_audit_retention_audits_removed",
            "Audits removed from the store because they were older than the retention",
            self.audits.clone(),
        );
        registry.register(
            "cnnf_audit_retention_sweeps",
            "Completed retention sweeps",
            self.sweeps.clone(),
        );
    }
}

/// The first instant that is kept when sweeping at `now` with `retention`:
/// the start of the window holding `now - retention`.
pub fn cutoff(settings: &AuditSettings, now: i64, retention: Duration) -> i64 {
    let retention = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
    let (start, _) = settings.widen(now.saturating_sub(retention), now.saturating_sub(retention));
    start
}

/// The current time, Unix nanoseconds.
pub fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Engine(format!("stored {what} is corrupt"))
}

/// Removes every audit first seen before `cutoff`, its index entries, and
/// the dedup keys of the windows that end at or before `cutoff` (a window
/// boundary, see [`cutoff`]).
pub fn sweep(store: &dyn ProjectionStore, settings: &AuditSettings, cutoff: i64) -> Result<Swept, StoreError> {
    let mut swept = Swept::default();
    let time_prefix = store::index_prefix(Dimension::Time, "");
    loop {
        let entries = store.scan_prefix(store::INDEX, &time_prefix, CHUNK)?;
        let mut batch = WriteBatch::new();
        let mut done = entries.len() < CHUNK;
        for (key, _) in &entries {
            let suffix = &key[time_prefix.len()..];
            if suffix.len() != INDEX_SUFFIX_LEN {
                return Err(corrupt("index key"));
            }
            let time = time_from_bytes(suffix[8..16].try_into().map_err(|_| corrupt("index key"))?);
            if time >= cutoff {
                done = true;
                break;
            }
            let number = AuditNumber::decode(&suffix[16..]).ok_or_else(|| corrupt("index key"))?;
            let record = match store.get(store::RECORDS, &number.encode())? {
                Some(bytes) => store::decode::<AuditRecord>("audit", &bytes)?.audit,
                None => None,
            };
            match record {
                Some(audit) => {
                    for index_key in crate::index::entries(&audit, time, number) {
                        batch.delete(store::INDEX, index_key);
                        swept.index_entries += 1;
                    }
                    batch.delete(store::RECORDS, number.encode().to_vec());
                    swept.audits += 1;
                }
                // A time entry without its record: only the entry is left.
                None => {
                    batch.delete(store::INDEX, key.clone());
                    swept.index_entries += 1;
                }
            }
        }
        if !batch.is_empty() {
            store.write(batch)?;
        }
        if done {
            break;
        }
    }
    let cutoff_window = settings.window_of(cutoff);
    loop {
        let entries = store.scan_prefix(store::KEYS, b"", CHUNK)?;
        let mut batch = WriteBatch::new();
        let mut done = entries.len() < CHUNK;
        for (key, _) in entries {
            let window = time_from_bytes(
                key.get(..8)
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| corrupt("dedup key"))?,
            );
            if window >= cutoff_window {
                done = true;
                break;
            }
            batch.delete(store::KEYS, key);
            swept.dedup_keys += 1;
        }
        if !batch.is_empty() {
            store.write(batch)?;
        }
        if done {
            break;
        }
    }
    Ok(swept)
}

/// Sweeps `store` at start and then every `interval`, removing what is
/// older than `retention`, until `stop`. A failed sweep is logged and tried
/// again at the next tick.
pub async fn run(
    store: std::sync::Arc<dyn ProjectionStore>,
    settings: AuditSettings,
    retention: Duration,
    interval: Duration,
    metrics: RetentionMetrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = crate::service::stopped(stop.clone()) => return Ok(()),
            _ = ticks.tick() => {}
        }
        let cut = cutoff(&settings, now_unix_nanos(), retention);
        let reader = std::sync::Arc::clone(&store);
        match tokio::task::spawn_blocking(move || sweep(reader.as_ref(), &settings, cut)).await? {
            Ok(swept) => {
                metrics.sweeps.inc();
                metrics.audits.inc_by(swept.audits);
                if swept != Swept::default() {
                    tracing::info!(
                        message = "Removed audits older than the retention.",
                        audits = swept.audits,
                        index_entries = swept.index_entries,
                        dedup_keys = swept.dedup_keys,
                        cutoff_unix_nanos = cut
                    );
                }
            }
            Err(error) => tracing::warn!(message = "Retention sweep failed; trying again later.", %error),
        }
    }
}

#[cfg(test)]
mod tests {
    use cnnf_proto::v1::{Audit, Endpoint, Identity, IdentityKind, Verdict};
    use cnnf_store::MemStore;
    use prost::Message as _;

    use super::*;
    use crate::store::time_bytes;

    const S: i64 = 1_000_000_000;

    fn audit(node: &str, source_image: &str, destination_image: &str) -> Audit {
        let endpoint = |id: &str| Endpoint {
            identity: Some(Identity {
                kind: IdentityKind::Image as i32,
                id: id.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Audit {
            cluster: "c".into(),
            node: node.into(),
            verdict: Verdict::Alert as i32,
            decided_by: "mode".into(),
            source: Some(endpoint(source_image)),
            destination: Some(endpoint(destination_image)),
            ..Default::default()
        }
    }

    fn put(store: &MemStore, audit: &Audit, time: i64, sequence: u64) {
        let number = AuditNumber { sequence, part: 0 };
        let mut batch = WriteBatch::new();
        for key in crate::index::entries(audit, time, number) {
            batch.put(store::INDEX, key, Vec::new());
        }
        let record = AuditRecord {
            audit: Some(audit.clone()),
            published_count: 1,
        };
        batch.put(store::RECORDS, number.encode().to_vec(), record.encode_to_vec());
        let settings = AuditSettings::default();
        let mut key = time_bytes(settings.window_of(time)).to_vec();
        key.extend_from_slice(format!("dedup-{sequence}").as_bytes());
        batch.put(store::KEYS, key, number.encode().to_vec());
        store.write(batch).unwrap();
    }

    #[test]
    fn the_cutoff_is_the_start_of_the_window_of_now_less_the_retention() {
        let settings = AuditSettings::default();
        let now = 1_000 * 3600 * S + 7 * S;
        assert_eq!(cutoff(&settings, now, Duration::from_secs(3600)), 999 * 3600 * S);
    }

    #[test]
    fn a_sweep_removes_old_audits_with_every_index_entry_and_nothing_else() {
        let store = MemStore::new(store::TABLES);
        let settings = AuditSettings::default();
        // Same image at both ends: one image entry, six in all.
        put(&store, &audit("n1", "sha256:a", "sha256:a"), 100 * S, 1);
        put(&store, &audit("n2", "sha256:a", "sha256:b"), 105 * S, 2);
        put(&store, &audit("n1", "sha256:b", "sha256:c"), 110 * S, 3);
        store
            .write({
                let mut batch = WriteBatch::new();
                batch.put(store::SCAN, b"c\x0010.0.0.1".to_vec(), b"x".to_vec());
                batch
            })
            .unwrap();
        let before = cnnf_store::dump(&store).unwrap();
        let swept = sweep(&store, &settings, 110 * S).unwrap();
        assert_eq!(
            swept,
            Swept {
                audits: 2,
                index_entries: 6 + 7,
                dedup_keys: 2
            }
        );
        let after = cnnf_store::dump(&store).unwrap();
        let removed: Vec<_> = before.iter().filter(|entry| !after.contains(entry)).collect();
        assert_eq!(removed.len(), 2 + 13 + 2);
        assert!(after.iter().all(|entry| before.contains(entry)), "nothing added");
        assert!(removed
            .iter()
            .all(|(table, _)| [store::INDEX, store::RECORDS, store::KEYS].contains(table)));
        let left: Vec<_> = after.iter().filter(|(table, _)| *table == store::RECORDS).collect();
        assert_eq!(left.len(), 1);
        assert_eq!(
            after.iter().filter(|(table, _)| *table == store::INDEX).count(),
            7,
            "the kept audit keeps its entries"
        );
        assert_eq!(sweep(&store, &settings, 110 * S).unwrap(), Swept::default());
    }
}
