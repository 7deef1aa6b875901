//! Counters and gauges of a spool and its sender, in one place.
//!
//! Every value is an atomic, so any task reads them without taking the
//! spool's lock. Nothing the spool drops is dropped silently: refused
//! appends, torn tails, skipped corruption and records the server refused
//! each have a counter here.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges of a spool (cheap to clone: clones share values).
#[derive(Debug, Clone, Default)]
pub struct SpoolMetrics {
    /// Records waiting to be acked by JetStream.
    pub depth_records: Gauge,
    /// Bytes (frames) of the records waiting to be acked.
    pub depth_bytes: Gauge,
    /// Bytes of segment files on disk (what `max_bytes` bounds).
    pub disk_bytes: Gauge,
    /// Records appended.
    pub appended: Counter,
    /// Records acked (JetStream stored them, or refused them for good).
    pub acked: Counter,
    /// Appends refused because the spool was full.
    pub overflowed: Counter,
    /// Appends refused because the record exceeded `max_record_bytes`.
    pub too_large: Counter,
    /// Torn or garbage tails cut off the last segment when opening.
    pub torn_tails_repaired: Counter,
    /// Bytes cut off the last segment when opening.
    pub torn_bytes_dropped: Counter,
    /// Corrupt places found in older segments when opening (the rest of
    /// such a segment is skipped).
    pub corrupt_segments: Counter,
    /// Bytes skipped after corrupt places in older segments.
    pub corrupt_bytes_skipped: Counter,
    /// Failed fsyncs of the background syncer.
    pub sync_errors: Counter,
    /// Records JetStream refused for good (e.g. larger than the stream
    /// allows); logged and skipped so they cannot block the spool.
    pub server_rejected: Counter,
    /// Failed reads of the sender (I/O error or a record corrupted after
    /// the spool was opened); the sender retries with backoff.
    pub read_errors: Counter,
}

impl SpoolMetrics {
    /// Registers everything under `prefix` (e.g. `cnnf_agent_spool`).
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        let gauges = [
            (
                "depth_records",
                "Records waiting for a JetStream ack",
                &self.depth_records,
            ),
            (
                "depth_bytes",
                "Bytes of records waiting for a JetStream ack",
                &self.depth_bytes,
            ),
            ("disk_bytes", "Bytes of spool segment files on disk", &self.disk_bytes),
        ];
        for (name, help, gauge) in gauges {
            registry.register(format!("{prefix}_{name}"), help, gauge.clone());
        }
        let counters = [
            ("appended", "Records appended", &self.appended),
            (
                "acked",
                "Records acked by JetStream or refused by it for good",
                &self.acked,
            ),
            (
                "overflowed",
                "Appends refused because the spool was full",
                &self.overflowed,
            ),
            (
                "too_large",
                "Appends refused as larger than the record limit",
                &self.too_large,
            ),
            (
                "torn_tails_repaired",
                "Torn tails cut off the last segment at open",
                &self.torn_tails_repaired,
            ),
            (
                "torn_bytes_dropped",
                "Bytes cut off torn tails at open",
                &self.torn_bytes_dropped,
            ),
            (
                "corrupt_segments",
                "Corrupt places skipped in older segments at open",
                &self.corrupt_segments,
            ),
            (
                "corrupt_bytes_skipped",
                "Bytes skipped after corrupt places at open",
                &self.corrupt_bytes_skipped,
            ),
            ("sync_errors", "Failed background fsyncs", &self.sync_errors),
            (
                "server_rejected",
                "Records JetStream refused for good",
                &self.server_rejected,
            ),
            ("read_errors", "Failed spool reads of the sender", &self.read_errors),
        ];
        for (name, help, counter) in counters {
            registry.register(format!("{prefix}_{name}"), help, counter.clone());
        }
    }
}
