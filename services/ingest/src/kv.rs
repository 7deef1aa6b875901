//! The current map in KV bucket `cnnf-identities`, and the incidents,
//! published only after the store committed what caused them.
//!
//! Agents start from a snapshot of the bucket and follow its changes with a
//! KV watch. Key: the address ([`crate::address::kv_key`]); value: the
//! `cnnf.v1.Workload` that holds it, canonically encoded. An address has a
//! value only while exactly one workload holds it: when none does, or when
//! several claim it (a conflict, reported as an incident), the key is
//! deleted and agents resolve the address as *unknown*, which is never
//! trusted.
//!
//! The registry is the truth, and the KV follows it:
//!
//! - While applying, the projection marks the addresses an event changed
//!   ([`Changes::touched`]) with the event's stream sequence. The runner's
//!   commit hook announces the committed sequence ([`Changes::committed`]).
//!   The writer takes the marks at or below it, reads what the *committed*
//!   registry says of each address now, and writes the difference from what
//!   it last wrote (puts and deletes pipelined, then all acks awaited, so
//!   two writes of one key are never reordered by a resend).
//! - At every (re)start the writer waits until the runner has caught up
//!   with the stream as it was when the runner started, then reconciles:
//!   reads the whole bucket and the whole registry and writes the
//!   difference. So a process that died between a commit and its KV write
//!   loses nothing, and a rebuild from the log does not replay history
//!   into the bucket: agents see only the final differences.
//! - Incidents travel through the `incident_outbox` table, written in the
//!   same batch as the holdings: published (deterministic ids, so a
//!   republication is dropped by JetStream) and then deleted.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use cnnf_bus::topology::WORKLOADS;
use cnnf_bus::{OutgoingMessage, Publisher, PublisherConfig};
use cnnf_store::{ProjectionStore, WriteBatch};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::address;
use crate::metrics::Metrics;
use crate::registry::{self, OutboxMessage};

/// How often the writer looks for work when no commit woke it.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// How long a snapshot of the bucket may wait for its next entry.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the projection changed and what the store committed: the link
/// between the runner and the KV writer.
#[derive(Debug, Default)]
pub struct Changes {
    /// Addresses to sync, with the highest stream sequence that touched each.
    dirty: Mutex<HashMap<String, u64>>,
    /// The highest stream sequence committed to the store.
    committed: AtomicU64,
    /// The highest stream sequence that wrote an incident.
    last_incident: AtomicU64,
    notify: Notify,
}

impl Changes {
    /// Records that the event at `sequence` changed `addresses` (and wrote
    /// incidents, when `incidents`).
    pub fn touched(&self, sequence: u64, addresses: Vec<String>, incidents: bool) {
        if !addresses.is_empty() {
            let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
            for address in addresses {
                let marked = dirty.entry(address).or_insert(sequence);
                *marked = (*marked).max(sequence);
            }
        }
        if incidents {
            self.last_incident.fetch_max(sequence, Ordering::SeqCst);
        }
    }

    /// Records that the store committed everything up to `sequence`, and
    /// wakes the writer.
    pub fn committed(&self, sequence: u64) {
        self.committed.fetch_max(sequence, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn committed_sequence(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Takes the marks at or below `sequence`.
    fn take(&self, sequence: u64) -> Vec<String> {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        dirty.retain(|address, marked| {
            if *marked <= sequence {
                out.push(address.clone());
                false
            } else {
                true
            }
        });
        out
    }
}

fn value_hash(value: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Writes the registry's current map to the KV bucket and the outbox's
/// incidents to their subjects.
pub struct KvWriter {
    js: jetstream::Context,
    bucket: kv::Store,
    store: Arc<dyn ProjectionStore>,
    changes: Arc<Changes>,
    publisher: Publisher,
    metrics: Metrics,
    /// Subject prefix of the bucket's keys (`$KV.cnnf-identities.`).
    subject_prefix: String,
    /// Random per process: message ids of KV writes never repeat.
    boot: String,
    written: u64,
    /// What the bucket holds, as this writer knows it: address → value hash.
    shown: HashMap<String, u64>,
    /// Set once the bucket was reconciled after the last (re)start.
    live: Arc<AtomicBool>,
    /// The stream's last sequence when the runner (re)started.
    catch_up_to: u64,
    /// The outbox was emptied of everything up to this sequence.
    incidents_drained: u64,
}

impl KvWriter {
    /// A writer for bucket `bucket`; `live` tells others whether the bucket
    /// is current.
    pub fn new(
        js: jetstream::Context,
        bucket: kv::Store,
        store: Arc<dyn ProjectionStore>,
        changes: Arc<Changes>,
        metrics: Metrics,
        live: Arc<AtomicBool>,
    ) -> Self {
        let subject_prefix = bucket.put_prefix.clone().unwrap_or_else(|| bucket.prefix.clone());
        let publisher = Publisher::new(js.clone(), PublisherConfig::default());
        Self {
            js,
            bucket,
            store,
            changes,
            publisher,
            metrics,
            subject_prefix,
            boot: uuid::Uuid::new_v4().simple().to_string(),
            written: 0,
            shown: HashMap::new(),
            live,
            catch_up_to: u64::MAX,
            incidents_drained: 0,
        }
    }

    /// Prepares for a (re)started runner whose store applied `applied`:
    /// publishes what the outbox holds, and notes how far the runner must
    /// catch up before the bucket is reconciled.
    pub async fn restart(&mut self, applied: u64) -> anyhow::Result<()> {
        self.live.store(false, Ordering::SeqCst);
        self.changes.committed(applied);
        let mut stream = self
            .js
            .get_stream(WORKLOADS)
            .await
            .context("reading the workload stream")?;
        self.catch_up_to = stream
            .info()
            .await
            .context("reading the workload stream")?
            .state
            .last_sequence;
        self.incidents_drained = 0;
        self.drain_incidents(applied).await?;
        tracing::info!(
            message = "Registry catching up before the KV bucket is reconciled.",
            applied,
            catch_up_to = self.catch_up_to
        );
        Ok(())
    }

    /// True once the bucket was reconciled after the last (re)start.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Waits for a commit, or for the idle check.
    pub async fn wait(&self) {
        let _ = tokio::time::timeout(IDLE_CHECK, self.changes.notify.notified()).await;
    }

    /// Does what the committed changes call for: publishes new incidents,
    /// and reconciles the bucket (once caught up) or syncs the changed
    /// addresses.
    pub async fn step(&mut self) -> anyhow::Result<()> {
        let committed = self.changes.committed_sequence();
        if self.changes.last_incident.load(Ordering::SeqCst) > self.incidents_drained {
            self.drain_incidents(committed).await?;
        }
        if self.is_live() {
            let addresses = self.changes.take(committed);
            if !addresses.is_empty() {
                self.sync(addresses).await?;
            }
        } else if committed >= self.catch_up_to {
            self.reconcile().await?;
        } else {
            // Replaying: the reconciliation at the end covers these.
            self.changes.take(committed);
        }
        Ok(())
    }

    /// Awaits every pending write.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.publisher.flush().await.context("writing the KV bucket")
    }

    fn next_id(&mut self) -> String {
        self.written += 1;
        format!("{}:kv:{}:{}", crate::projection::PRODUCER, self.boot, self.written)
    }

    /// Puts `value` at `key`, or deletes `key` when there is none.
    async fn write(&mut self, key: &str, value: Option<Vec<u8>>, cause: &'static str) -> anyhow::Result<()> {
        let subject = format!("{}{key}", self.subject_prefix);
        let id = self.next_id();
        let message = match value {
            Some(value) => {
                self.metrics.kv_write("put", cause);
                OutgoingMessage::new(subject, id, value)
            }
            None => {
                self.metrics.kv_write("delete", cause);
                let mut headers = HeaderMap::new();
                headers.insert("KV-Operation", "DEL");
                OutgoingMessage {
                    headers: Some(headers),
                    ..OutgoingMessage::new(subject, id, Bytes::new())
                }
            }
        };
        self.publisher.publish(message).await.context("writing the KV bucket")
    }

    /// Syncs `addresses` with the committed registry.
    async fn sync(&mut self, addresses: Vec<String>) -> anyhow::Result<()> {
        let store = Arc::clone(&self.store);
        let values = tokio::task::spawn_blocking(move || {
            addresses
                .into_iter()
                .map(|address| registry::kv_value(store.as_ref(), &address).map(|value| (address, value)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await??;
        for (address, value) in values {
            let hash = value.as_deref().map(value_hash);
            if self.shown.get(&address).copied() == hash {
                continue;
            }
            match hash {
                Some(hash) => self.shown.insert(address.clone(), hash),
                None => self.shown.remove(&address),
            };
            self.write(&address::kv_key(&address), value, "change").await?;
        }
        self.flush().await
    }

    /// Makes the bucket equal to the registry's current map.
    async fn reconcile(&mut self) -> anyhow::Result<()> {
        let committed = self.changes.committed_sequence();
        // What the registry says now covers every change committed so far.
        self.changes.take(committed);
        let store = Arc::clone(&self.store);
        let wanted = tokio::task::spawn_blocking(move || registry::kv_map(store.as_ref())).await??;
        let existing = snapshot(&self.bucket).await?;
        let (mut puts, mut deletes) = (0u64, 0u64);
        let mut shown = HashMap::with_capacity(wanted.len());
        for (address, value) in &wanted {
            shown.insert(address.clone(), value_hash(value));
            let key = address::kv_key(address);
            if existing.get(&key).map(|bytes| bytes.as_ref()) != Some(value.as_slice()) {
                self.write(&key, Some(value.clone()), "reconcile").await?;
                puts += 1;
            }
        }
        for key in existing.keys() {
            // Keys that are no address, or not in canonical form, go too.
            let wanted_here = address::from_kv_key(key)
                .is_some_and(|address| wanted.contains_key(&address) && address::kv_key(&address) == *key);
            if !wanted_here {
                self.write(key, None, "reconcile").await?;
                deletes += 1;
            }
        }
        self.flush().await?;
        self.shown = shown;
        self.metrics.kv_reconciliations.inc();
        self.live.store(true, Ordering::SeqCst);
        tracing::info!(
            message = "KV bucket reconciled with the registry.",
            addresses = wanted.len(),
            puts,
            deletes,
            committed
        );
        Ok(())
    }

    /// Publishes every incident in the outbox, then deletes them.
    async fn drain_incidents(&mut self, committed: u64) -> anyhow::Result<()> {
        let store = Arc::clone(&self.store);
        let entries =
            tokio::task::spawn_blocking(move || store.scan_prefix(registry::INCIDENT_OUTBOX, b"", usize::MAX))
                .await??;
        let mut done = WriteBatch::new();
        for (key, value) in entries {
            let message: OutboxMessage = registry::decode("outbox message", &value)?;
            tracing::warn!(message = "Address conflict reported.", subject = %message.subject, id = %message.id);
            self.publisher
                .publish(message.into())
                .await
                .context("publishing an incident")?;
            self.metrics.address_conflicts.inc();
            done.delete(registry::INCIDENT_OUTBOX, key);
        }
        self.flush().await?;
        if !done.is_empty() {
            let store = Arc::clone(&self.store);
            tokio::task::spawn_blocking(move || store.write(done)).await??;
        }
        if self.changes.last_incident.load(Ordering::SeqCst) <= committed {
            self.incidents_drained = self.incidents_drained.max(committed);
        }
        Ok(())
    }
}

/// Every key of the bucket with a value, and the value.
pub async fn snapshot(bucket: &kv::Store) -> anyhow::Result<HashMap<String, Bytes>> {
    let mut out = HashMap::new();
    let mut stream = bucket.stream.clone();
    let info = stream.info().await.context("reading the KV bucket")?;
    if info.state.messages == 0 {
        return Ok(out);
    }
    let mut entries = bucket.watch_with_history(">").await.context("reading the KV bucket")?;
    loop {
        let entry = tokio::time::timeout(SNAPSHOT_TIMEOUT, entries.next())
            .await
            .context("reading the KV bucket: timed out")?
            .context("reading the KV bucket: the watch ended")?
            .context("reading the KV bucket")?;
        match entry.operation {
            kv::Operation::Put => out.insert(entry.key, entry.value),
            kv::Operation::Delete | kv::Operation::Purge => out.remove(&entry.key),
        };
        if entry.delta == 0 {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_only_once_committed() {
        let changes = Changes::default();
        changes.touched(5, vec!["10.0.0.1".into(), "10.0.0.2".into()], false);
        changes.touched(9, vec!["10.0.0.2".into()], true);
        assert_eq!(changes.take(4), Vec::<String>::new());
        assert_eq!(changes.take(5), vec!["10.0.0.1".to_owned()]);
        assert_eq!(changes.take(8), Vec::<String>::new());
        assert_eq!(changes.take(9), vec!["10.0.0.2".to_owned()]);
        assert_eq!(changes.last_incident.load(Ordering::SeqCst), 9);
    }
}
