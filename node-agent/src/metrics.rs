//! The agent's metrics, each named and described once, all under
//! `cnnf_agent_`. The spool's own (depth, appends, acks, refusals) are
//! registered under `cnnf_agent_spool_` and discovery's under
//! `cnnf_agent_discovery_`.
//!
//! The verdict threads touch only plain atomic counters fetched once at
//! start ([`Metrics::verdict`]), never a labelled family lookup, so
//! counting costs one atomic add per SYN.

use std::sync::Arc;

use cnnf_core::proto::Verdict;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of verdicts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `allow`, `learn`, `observe`, `alert`, `prevent`, `block`, or
    /// `undecodable` (a queued packet that is not a TCP SYN the agent can
    /// read; accepted or dropped by the fail setting).
    pub verdict: &'static str,
    /// What the kernel was told: `accept` or `drop`.
    pub action: &'static str,
}

/// Labels of per-queue kernel counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    /// The NFQUEUE number.
    pub queue: String,
}

/// Labels of rejected tables.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// `unsigned`, `unknown-key`, `signature` (the signature does not
    /// verify), `decode`, `compile` or `wrong-node`.
    pub reason: &'static str,
}

/// Labels of identity counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// `local` (this node's workloads) or `fleet` (KV `cnnf-identities`).
    pub source: &'static str,
}

/// Labels of published events.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `decisions`, `workload-started` or `workload-stopped`.
    pub kind: &'static str,
}

/// Every reason a table is rejected for (the `reason` label).
pub const TABLE_REJECT_REASONS: [&str; 6] = [
    "unsigned",
    "unknown-key",
    "signature",
    "decode",
    "compile",
    "wrong-node",
];

const VERDICT_NAMES: [(&str, &str); 8] = [
    ("allow", "accept"),
    ("learn", "accept"),
    ("observe", "accept"),
    ("alert", "accept"),
    ("prevent", "drop"),
    ("block", "drop"),
    ("undecodable", "accept"),
    ("undecodable", "drop"),
];

/// Every metric of the agent. Clones share the counters.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Verdicts given, by verdict and action.
    pub verdicts: Family<VerdictLabels, Counter>,
    /// The counters of `verdicts`, fetched once (see [`Metrics::verdict`]).
    verdict_counters: Arc<[Counter; 8]>,
    /// Decisions that could not be recorded: the ring was full, or a
    /// window held too many distinct decisions.
    pub decisions_overflowed: Counter,
    /// Decisions recorded (entered the ring).
    pub decisions_recorded: Counter,
    /// Connection decisions published (after aggregation: one per distinct
    /// decision per window).
    pub decisions_published: Counter,
    /// Queued packets whose ends were both foreign to this node (stale
    /// rules during a reconciliation): accepted, not decided.
    pub foreign_packets: Counter,
    /// Events handed to the spool, by kind.
    pub events_spooled: Family<EventLabels, Counter>,
    /// Version of the verdict table in force.
    pub table_version: Gauge,
    /// Verdict tables rejected, by reason.
    pub table_rejects: Family<RejectLabels, Counter>,
    /// Tables enforced but not persisted to disk.
    pub table_persist_failures: Counter,
    /// Addresses the agent can resolve, by source.
    pub identities: Family<IdentityLabels, Gauge>,
    /// Workload addresses queued by the iptables chains.
    pub workload_addresses: Gauge,
    /// iptables reconciliations that failed.
    pub chain_failures: Counter,
    /// Packets the kernel queued to the agent, per queue.
    pub queue_packets: Family<QueueLabels, Gauge>,
    /// Packets the kernel dropped because the queue was full, per queue.
    pub queue_dropped: Family<QueueLabels, Gauge>,
    /// Packets the kernel dropped because the agent's socket buffer was
    /// full, per queue.
    pub queue_user_dropped: Family<QueueLabels, Gauge>,
    /// Verdicts the agent failed to send to the kernel, per queue.
    pub queue_verdict_errors: Family<QueueLabels, Gauge>,
    /// Whether the kernel accepts SYNs when a queue is full, per queue.
    pub queue_fail_open: Family<QueueLabels, Gauge>,
    /// SYNs the chains handed to the queues (iptables rule counter).
    pub syn_queued: Counter,
    /// SYNs the per-source rate limit dropped before the queue.
    pub syn_rate_limited: Counter,
    /// SYNs handed to the queues that got no verdict and that the kernel
    /// accepted (full queue failing open, or no agent with fail-open).
    pub syn_bypassed: Counter,
    /// SYNs handed to the queues while no agent read them, dropped by the
    /// kernel (fail-closed).
    pub syn_unread_dropped: Counter,
    /// SYNs from a workload interface with a source address that workload
    /// does not hold (decided as unknown by the mode).
    pub unowned_sources: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let verdicts = Family::<VerdictLabels, Counter>::default();
        let table_rejects = Family::<RejectLabels, Counter>::default();
        for reason in TABLE_REJECT_REASONS {
            // Every reason shows on /metrics from the start, at 0.
            let _ = table_rejects.get_or_create(&RejectLabels { reason });
        }
        let verdict_counters = Arc::new(
            VERDICT_NAMES.map(|(verdict, action)| verdicts.get_or_create(&VerdictLabels { verdict, action }).clone()),
        );
        Self {
            verdicts,
            verdict_counters,
            decisions_overflowed: Counter::default(),
            decisions_recorded: Counter::default(),
            decisions_published: Counter::default(),
            foreign_packets: Counter::default(),
            events_spooled: Family::default(),
            table_version: Gauge::default(),
            table_rejects,
            table_persist_failures: Counter::default(),
            identities: Family::default(),
            workload_addresses: Gauge::default(),
            chain_failures: Counter::default(),
            queue_packets: Family::default(),
            queue_dropped: Family::default(),
            queue_user_dropped: Family::default(),
            queue_verdict_errors: Family::default(),
            queue_fail_open: Family::default(),
            syn_queued: Counter::default(),
            syn_rate_limited: Counter::default(),
            syn_bypassed: Counter::default(),
            syn_unread_dropped: Counter::default(),
            unowned_sources: Counter::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under `cnnf_agent_`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cnnf_agent_verdicts",
            "Verdicts given to queued SYNs, by verdict and action",
            self.verdicts.clone(),
        );
        registry.register(
            "cnnf_agent_decisions_overflowed",
            "Decisions not recorded individually (ring full or too many distinct decisions in a window); reported in DecisionBatch.overflow_count",
            self.decisions_overflowed.clone(),
        );
        registry.register(
            "cnnf_agent_decisions_recorded",
            "Decisions that entered the ring",
            self.decisions_recorded.clone(),
        );
        registry.register(
            "cnnf_agent_decisions_published",
            "Connection decisions handed to the spool after aggregation",
            self.decisions_published.clone(),
        );
        registry.register(
            "cnnf_agent_foreign_packets",
            "Queued packets with neither end a workload of this node (accepted undecided)",
            self.foreign_packets.clone(),
        );
        registry.register(
            "cnnf_agent_events_spooled",
            "Events handed to the spool, by kind",
            self.events_spooled.clone(),
        );
        registry.register(
            "cnnf_agent_table_version",
            "Version of the verdict table in force (0: the safe default)",
            self.table_version.clone(),
        );
        registry.register(
            "cnnf_agent_table_rejects",
            "Verdict tables rejected, by reason; the previous table stays in force",
            self.table_rejects.clone(),
        );
        registry.register(
            "cnnf_agent_table_persist_failures",
            "Verdict tables enforced but not written to the state directory",
            self.table_persist_failures.clone(),
        );
        registry.register(
            "cnnf_agent_identities",
            "Addresses the agent resolves to an identity, by source",
            self.identities.clone(),
        );
        registry.register(
            "cnnf_agent_workload_addresses",
            "Workload addresses whose SYNs the iptables chains queue",
            self.workload_addresses.clone(),
        );
        registry.register(
            "cnnf_agent_chain_failures",
            "iptables reconciliations that failed",
            self.chain_failures.clone(),
        );
        registry.register(
            "cnnf_agent_queue_packets",
            "Packets the kernel queued to the agent, per NFQUEUE (kernel counter)",
            self.queue_packets.clone(),
        );
        registry.register(
            "cnnf_agent_queue_dropped",
            "Packets the kernel dropped because the queue was full, per NFQUEUE (kernel counter)",
            self.queue_dropped.clone(),
        );
        registry.register(
            "cnnf_agent_queue_user_dropped",
            "Packets the kernel dropped because the agent's receive buffer was full, per NFQUEUE (kernel counter)",
            self.queue_user_dropped.clone(),
        );
        registry.register(
            "cnnf_agent_queue_verdict_errors",
            "Verdicts that could not be sent to the kernel, per NFQUEUE",
            self.queue_verdict_errors.clone(),
        );
        registry.register(
            "cnnf_agent_queue_fail_open",
            "1 while the kernel accepts SYNs unchecked when the NFQUEUE is full (--queue-full), per NFQUEUE",
            self.queue_fail_open.clone(),
        );
        registry.register(
            "cnnf_agent_syn_queued",
            "SYNs the agent's chains handed to NFQUEUE (iptables rule counter, sampled each second)",
            self.syn_queued.clone(),
        );
        registry.register(
            "cnnf_agent_syn_rate_limited",
            "SYNs dropped by the per-source rate limit before NFQUEUE (iptables rule counter)",
            self.syn_rate_limited.clone(),
        );
        registry.register(
            "cnnf_agent_syn_bypassed",
            "SYNs handed to NFQUEUE that got no verdict and were accepted by the kernel (full queue failing open, or no agent reading with --fail-mode open)",
            self.syn_bypassed.clone(),
        );
        registry.register(
            "cnnf_agent_syn_unread_dropped",
            "SYNs handed to NFQUEUE while no agent read it, dropped by the kernel (--fail-mode closed); counted at the next start",
            self.syn_unread_dropped.clone(),
        );
        registry.register(
            "cnnf_agent_unowned_sources",
            "SYNs from a workload's interface with a source address the workload does not hold, decided as unknown",
            self.unowned_sources.clone(),
        );
    }

    /// Counts one verdict (one atomic add).
    pub fn verdict(&self, verdict: Verdict) {
        let index = match verdict {
            Verdict::Allow | Verdict::Unspecified => 0,
            Verdict::Learn => 1,
            Verdict::Observe => 2,
            Verdict::Alert => 3,
            Verdict::Prevent => 4,
            Verdict::Block => 5,
        };
        self.verdict_counters[index].inc();
    }

    /// Counts one packet that could not be decoded, and what it was given.
    pub fn undecodable(&self, dropped: bool) {
        self.verdict_counters[if dropped { 7 } else { 6 }].inc();
    }

    /// Counts one rejected table.
    pub fn table_rejected(&self, reason: &'static str) {
        self.table_rejects.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Rejected tables, all reasons.
    pub fn table_rejects_total(&self) -> u64 {
        TABLE_REJECT_REASONS
            .into_iter()
            .map(|reason| self.table_rejects.get_or_create(&RejectLabels { reason }).get())
            .sum()
    }

    /// Rejected tables of one reason.
    pub fn table_rejects(&self, reason: &'static str) -> u64 {
        self.table_rejects.get_or_create(&RejectLabels { reason }).get()
    }

    /// Counts events handed to the spool.
    pub fn spooled(&self, kind: &'static str, count: u64) {
        self.events_spooled.get_or_create(&EventLabels { kind }).inc_by(count);
    }

    /// Total verdicts of one kind (tests and logs).
    pub fn verdict_count(&self, verdict: &'static str) -> u64 {
        VERDICT_NAMES
            .iter()
            .zip(self.verdict_counters.iter())
            .filter(|((name, _), _)| *name == verdict)
            .map(|(_, counter)| counter.get())
            .sum()
    }
}
