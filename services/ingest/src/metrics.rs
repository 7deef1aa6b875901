//! The service's metrics, each named and described once.

use cnnf_bus::RunnerMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of the gate's refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    /// Durable consumer that refused the event.
    pub consumer: String,
    /// Short reason code (`GateError::reason`).
    pub reason: String,
}

/// Labels of KV writes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvLabels {
    /// `put` or `delete`.
    pub operation: &'static str,
    /// `change` (an event changed the address) or `reconcile` (start-up
    /// found the KV differing from the registry).
    pub cause: &'static str,
}

/// Every metric of the ingest service. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// The workload projection's runner.
    pub workloads: RunnerMetrics,
    /// The heartbeat projection's runner.
    pub heartbeats: RunnerMetrics,
    /// Events the gate refused, by consumer and reason.
    pub gate_rejected: Family<GateLabels, Counter>,
    /// Address conflicts reported as incidents.
    pub address_conflicts: Counter,
    /// `NodeGone` events published for silent nodes.
    pub nodes_gone: Counter,
    /// Writes to the KV bucket `cnnf-identities`.
    pub kv_writes: Family<KvLabels, Counter>,
    /// Reconciliations of the KV bucket with the registry.
    pub kv_reconciliations: Counter,
}

impl Metrics {
    /// Registers every metric under `cnnf_ingest_`.
    pub fn register(&self, registry: &mut Registry) {
        self.workloads.register(registry, "cnnf_ingest_workloads_projection");
        self.heartbeats.register(registry, "cnnf_ingest_heartbeats_projection");
        registry.register(
            "cnnf_ingest_gate_rejected",
            "Agent events the gate refused and dead-lettered, by consumer and reason",
            self.gate_rejected.clone(),
        );
        registry.register(
            "cnnf_ingest_address_conflicts",
            "Addresses claimed by a workload while another held them (ADDRESS_CONFLICT incidents)",
            self.address_conflicts.clone(),
        );
        registry.register(
            "cnnf_ingest_nodes_gone",
            "NodeGone events published for nodes that stopped heartbeating",
            self.nodes_gone.clone(),
        );
        registry.register(
            "cnnf_ingest_kv_writes",
            "Writes to the KV bucket cnnf-identities, by operation and cause",
            self.kv_writes.clone(),
        );
        registry.register(
            "cnnf_ingest_kv_reconciliations",
            "Comparisons of the whole KV bucket cnnf-identities with the registry",
            self.kv_reconciliations.clone(),
        );
    }

    /// Counts one refusal of the gate.
    pub fn gate_rejected(&self, consumer: &str, reason: &str) {
        self.gate_rejected
            .get_or_create(&GateLabels {
                consumer: consumer.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one KV write.
    pub fn kv_write(&self, operation: &'static str, cause: &'static str) {
        self.kv_writes.get_or_create(&KvLabels { operation, cause }).inc();
    }
}
