//! The decision of one SYN, as the verdict threads run it.
//!
//! Resolve both ends ([`Identities`]), derive the [`Scope`] from which ends
//! this node hosts, decide with the core crate's compiled table (the same
//! evaluation the policy service and the audit simulator use, with both
//! ends interned in the table once per peer), record the decision in the
//! ring, and answer accept or drop. Everything it touches is in memory: a
//! few atomic pointer loads, a few hash lookups, one non-blocking push.
//! Nothing waits on the network or the disk.
//!
//! A SYN with neither end local (rules not yet reconciled after a workload
//! stopped) is accepted undecided and counted: this node has no side of it
//! to check.
//!
//! A SYN that came in on a workload's host-side interface from a source
//! address that workload does not hold ([`WorkloadInterfaces`]) is an
//! unknown source inside a workload: no model or rule speaks for it, so the
//! mode decides (disabled: observe, alert: alert, prevent: prevent, that is
//! drop), whatever the destination, and the decision is recorded with an
//! unknown source.
//!
//! The engine also says whether a full queue should accept
//! ([`Engine::fail_open_when_full`], the `--queue-full` setting): with
//! `auto`, only while the table in force cannot drop anything.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cnnf_core::eval::{Connection, DecidedBy, Identity, Scope};
use cnnf_core::proto::{self, Protocol, VerdictTable};

use crate::config::QueueFull;
use crate::decisions::{DecisionRecord, Ring};
use crate::identities::{Identities, Peer};
use crate::interfaces::WorkloadInterfaces;
use crate::metrics::Metrics;
use crate::tables::Tables;

/// Decides SYNs; shared by every verdict thread.
#[derive(Debug, Clone)]
pub struct Engine {
    tables: Arc<Tables>,
    identities: Arc<Identities>,
    ring: Ring,
    metrics: Metrics,
    drop_undecodable: bool,
    interfaces: Arc<WorkloadInterfaces>,
    unknown: Arc<Peer>,
    queue_full: QueueFull,
    /// `(version + 1) << 1 | may_drop` of the last table looked at; 0: none.
    may_drop_cache: Arc<AtomicU64>,
}

/// The kernel's answer for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the SYN through.
    Accept,
    /// Drop the SYN.
    Drop,
}

impl Engine {
    /// An engine over the given tables and identities, recording into
    /// `ring`. `drop_undecodable`: what a queued packet that is not a TCP
    /// SYN the agent can read gets (the fail-closed setting drops it).
    pub fn new(
        tables: Arc<Tables>,
        identities: Arc<Identities>,
        ring: Ring,
        metrics: Metrics,
        drop_undecodable: bool,
    ) -> Self {
        Self {
            tables,
            identities,
            ring,
            metrics,
            drop_undecodable,
            interfaces: Arc::new(WorkloadInterfaces::new()),
            unknown: Arc::new(Peer::bare(Identity::Unknown)),
            queue_full: QueueFull::Drop,
            may_drop_cache: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same engine with the `--queue-full` setting (default: drop).
    pub fn with_queue_full(mut self, queue_full: QueueFull) -> Self {
        self.queue_full = queue_full;
        self
    }

    /// The workload interfaces the engine checks source addresses against;
    /// the workloads task fills them.
    pub fn interfaces(&self) -> &Arc<WorkloadInterfaces> {
        &self.interfaces
    }

    /// Whether a full queue should accept (the kernel's fail-open flag):
    /// `drop` never, `accept` always, `auto` while the table in force
    /// cannot drop ([`may_drop`]). One atomic pointer load and one atomic
    /// load while the table stays the same.
    pub fn fail_open_when_full(&self) -> bool {
        match self.queue_full {
            QueueFull::Drop => false,
            QueueFull::Accept => true,
            QueueFull::Auto => {
                let table = self.tables.current();
                let key = table.version().wrapping_add(1) << 1;
                let cached = self.may_drop_cache.load(Ordering::Relaxed);
                let drops = if cached & !1 == key {
                    cached & 1 == 1
                } else {
                    let drops = may_drop(table.compiled.table());
                    self.may_drop_cache.store(key | u64::from(drops), Ordering::Relaxed);
                    drops
                };
                !drops
            }
        }
    }

    /// Decides a TCP SYN that came in on interface `in_interface` (0:
    /// unknown). A source the workload behind that interface does not hold
    /// is decided as an unknown source by the mode; everything else as
    /// [`Engine::decide`].
    pub fn decide_from(&self, source: IpAddr, destination: IpAddr, port: u16, in_interface: u32) -> Action {
        if in_interface != 0 && self.interfaces.owns(in_interface, source) == Some(false) {
            return self.decide_unowned_source(source, destination, port);
        }
        self.decide(source, destination, port)
    }

    /// A SYN from inside a workload with an address it does not hold.
    fn decide_unowned_source(&self, source: IpAddr, destination: IpAddr, port: u16) -> Action {
        let table = self.tables.current();
        let dst = self.identities.resolve(destination, &table);
        let scope = if dst.local { Scope::Both } else { Scope::Egress };
        let connection = Connection {
            source: &self.unknown.identity,
            source_address: source,
            destination: &dst.peer.identity,
            destination_address: destination,
            port,
            protocol: Protocol::Tcp,
            scope,
        };
        let mode = table.compiled.mode_for(&connection);
        let verdict = match mode {
            proto::Mode::Prevent => proto::Verdict::Prevent,
            proto::Mode::Alert => proto::Verdict::Alert,
            _ => proto::Verdict::Observe,
        };
        self.metrics.unowned_sources.inc();
        self.metrics.verdict(verdict);
        self.ring.push(DecisionRecord {
            source: Arc::clone(&self.unknown),
            source_address: source,
            destination: dst.peer,
            destination_address: destination,
            port,
            direction: scope.direction(),
            verdict,
            decided_by: DecidedBy::Mode.into(),
            mode,
            table_version: table.version(),
            at_unix_nanos: now_nanos(),
        });
        if verdict == proto::Verdict::Prevent {
            Action::Drop
        } else {
            Action::Accept
        }
    }

    /// Decides a TCP SYN from `source` to `destination:port`.
    pub fn decide(&self, source: IpAddr, destination: IpAddr, port: u16) -> Action {
        let table = self.tables.current();
        let src = self.identities.resolve(source, &table);
        let dst = self.identities.resolve(destination, &table);
        let scope = match (src.local, dst.local) {
            (true, true) => Scope::Both,
            (true, false) => Scope::Egress,
            (false, true) => Scope::Ingress,
            (false, false) => {
                self.metrics.foreign_packets.inc();
                return Action::Accept;
            }
        };
        let connection = Connection {
            source: &src.peer.identity,
            source_address: source,
            destination: &dst.peer.identity,
            destination_address: destination,
            port,
            protocol: Protocol::Tcp,
            scope,
        };
        let (source_interned, destination_interned) =
            (src.peer.interned(&table.compiled), dst.peer.interned(&table.compiled));
        let decision = match (source_interned.as_deref(), destination_interned.as_deref()) {
            (Some(source), Some(destination)) => table.compiled.decide_interned(&connection, source, destination),
            _ => table.compiled.decide(&connection),
        };
        let mode = table.compiled.mode_for(&connection);
        let drops = decision.drops();
        let verdict = decision.verdict;
        self.metrics.verdict(verdict);
        self.ring.push(DecisionRecord {
            source: src.peer,
            source_address: source,
            destination: dst.peer,
            destination_address: destination,
            port,
            direction: scope.direction(),
            verdict,
            decided_by: decision.decided_by.into(),
            mode,
            table_version: table.version(),
            at_unix_nanos: now_nanos(),
        });
        if drops {
            Action::Drop
        } else {
            Action::Accept
        }
    }

    /// The answer for a queued packet that could not be decoded.
    pub fn undecodable(&self) -> Action {
        self.metrics.undecodable(self.drop_undecodable);
        if self.drop_undecodable {
            Action::Drop
        } else {
            Action::Accept
        }
    }
}

/// Whether `table` can drop a connection: a mode (container or host) is
/// prevent, or a mode is alert and an enabled rule (or one of its
/// destinations) has the prevent effect. A table in which every mode is
/// disabled drops nothing.
pub fn may_drop(table: &VerdictTable) -> bool {
    let mode = |value: i32| proto::Mode::try_from(value).unwrap_or(proto::Mode::Unspecified);
    let modes = [mode(table.mode), mode(table.host_mode)];
    if modes.contains(&proto::Mode::Prevent) {
        return true;
    }
    if !modes.contains(&proto::Mode::Alert) {
        return false;
    }
    let prevent = proto::RuleEffect::Prevent as i32;
    table
        .rules
        .iter()
        .filter(|rule| !rule.disabled)
        .any(|rule| rule.effect == prevent || rule.destinations.iter().any(|d| d.effect == prevent))
}

/// Now, Unix nanoseconds.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

impl crate::dataplane::queue::Decider for Engine {
    fn decide(&self, syn: &crate::dataplane::packet::Syn) -> crate::dataplane::queue::Verdict {
        match Engine::decide_from(
            self,
            syn.source,
            syn.destination,
            syn.destination_port,
            syn.in_interface,
        ) {
            Action::Accept => crate::dataplane::queue::Verdict::Accept,
            Action::Drop => crate::dataplane::queue::Verdict::Drop,
        }
    }

    fn fail_open_when_full(&self) -> Option<bool> {
        Some(Engine::fail_open_when_full(self))
    }

    fn undecodable(&self, error: &crate::dataplane::packet::PacketError) -> crate::dataplane::queue::Verdict {
        tracing::debug!(message = "Queued packet not a decodable SYN.", %error);
        match Engine::undecodable(self) {
            Action::Accept => crate::dataplane::queue::Verdict::Accept,
            Action::Drop => crate::dataplane::queue::Verdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use cnnf_core::eval::Identity;
    use cnnf_core::proto::{Direction, Mode, Verdict, VerdictTable};
    use prost::Message as _;

    use super::*;
    use crate::decisions::{drain, Aggregator};
    use crate::identities::Peer;

    fn engine(mode: Mode, drop_undecodable: bool) -> (Engine, std::sync::mpsc::Receiver<DecisionRecord>, Metrics) {
        let dir = tempfile::tempdir().unwrap();
        let token = |value: &str| cnnf_core::subjects::Token::new("test", value).unwrap();
        let metrics = Metrics::default();
        let tables = Arc::new(Tables::load(
            dir.path(),
            &token("c"),
            &token("n"),
            crate::tables::Trust::allow_unsigned(Vec::new()),
            metrics.clone(),
        ));
        let table = VerdictTable {
            version: 2,
            mode: mode as i32,
            ..Default::default()
        };
        tables.offer(&table.encode_to_vec()).unwrap();
        let identities = Arc::new(Identities::new(metrics.clone()));
        let local = Arc::new(Peer::bare(Identity::Image {
            id: "sha256:l".into(),
            name: "local".into(),
        }));
        identities.set_local(HashMap::from([("10.0.0.1".parse().unwrap(), local)]));
        let (ring, receiver) = Ring::new(16, metrics.clone());
        (
            Engine::new(tables, identities, ring, metrics.clone(), drop_undecodable),
            receiver,
            metrics,
        )
    }

    #[test]
    fn scope_follows_the_local_end_and_foreign_packets_pass_undecided() {
        let (engine, receiver, metrics) = engine(Mode::Alert, false);
        let local = "10.0.0.1".parse().unwrap();
        let remote = "10.9.9.9".parse().unwrap();
        // Alert mode, a new image (learning): learned, allowed.
        assert_eq!(engine.decide(remote, local, 80), Action::Accept);
        assert_eq!(engine.decide(local, remote, 443), Action::Accept);
        assert_eq!(engine.decide(remote, "10.9.9.8".parse().unwrap(), 22), Action::Accept);
        assert_eq!(metrics.foreign_packets.get(), 1);
        let mut aggregator = Aggregator::new(16);
        assert_eq!(drain(&receiver, &mut aggregator, 16), 2);
        let (decisions, _) = aggregator.take();
        assert_eq!(decisions[0].direction, Direction::Ingress as i32);
        assert_eq!(decisions[0].source.as_ref().unwrap().identity.as_ref().unwrap().kind, 4);
        assert_eq!(decisions[1].direction, Direction::Egress as i32);
        assert!(decisions
            .iter()
            .all(|d| d.verdict == Verdict::Learn as i32 && d.verdict_table_version == 2));
    }

    #[test]
    fn an_unknown_source_on_a_workload_interface_is_decided_by_the_mode() {
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let own: IpAddr = "10.0.0.1".parse().unwrap();
        let spoofed: IpAddr = "10.0.0.200".parse().unwrap();
        let remote: IpAddr = "10.9.9.9".parse().unwrap();
        for (mode, action, verdict) in [
            (Mode::Prevent, Action::Drop, Verdict::Prevent),
            (Mode::Alert, Action::Accept, Verdict::Alert),
            (Mode::Disabled, Action::Accept, Verdict::Observe),
        ] {
            let (engine, receiver, metrics) = engine(mode, false);
            engine
                .interfaces()
                .set(std::collections::BTreeMap::from([("lo".to_owned(), [own].into())]));
            // Neither end is a known workload address: without the interface
            // this would pass undecided.
            assert_eq!(engine.decide_from(spoofed, remote, 443, lo), action, "{mode:?}");
            assert_eq!(metrics.unowned_sources.get(), 1);
            assert_eq!(metrics.foreign_packets.get(), 0);
            let mut aggregator = Aggregator::new(16);
            assert_eq!(drain(&receiver, &mut aggregator, 16), 1);
            let (decisions, _) = aggregator.take();
            assert_eq!(decisions[0].verdict, verdict as i32);
            assert_eq!(
                decisions[0].source.as_ref().unwrap().identity.as_ref().unwrap().kind,
                cnnf_core::proto::IdentityKind::Unknown as i32
            );
        }
        // The workload's own address on its own interface decides as usual.
        let (engine, _, metrics) = engine(Mode::Prevent, false);
        engine
            .interfaces()
            .set(std::collections::BTreeMap::from([("lo".to_owned(), [own].into())]));
        engine.decide_from(own, remote, 443, lo);
        assert_eq!(metrics.unowned_sources.get(), 0);
    }

    #[test]
    fn queue_full_auto_accepts_only_under_a_table_that_cannot_drop() {
        for (mode, accepts) in [(Mode::Disabled, true), (Mode::Alert, true), (Mode::Prevent, false)] {
            let (engine, _, _) = engine(mode, false);
            assert_eq!(
                engine.with_queue_full(QueueFull::Auto).fail_open_when_full(),
                accepts,
                "{mode:?}"
            );
        }
        let (engine, _, _) = engine(Mode::Disabled, false);
        let engine = engine.with_queue_full(QueueFull::Drop);
        assert!(!engine.fail_open_when_full());
        let (engine, _, _) = engine_pair_accept();
        assert!(engine.fail_open_when_full());

        let rule = |effect: cnnf_core::proto::RuleEffect, disabled: bool| cnnf_core::proto::Rule {
            id: "r".into(),
            effect: effect as i32,
            disabled,
            ..Default::default()
        };
        let alert = |rules| VerdictTable {
            mode: Mode::Alert as i32,
            rules,
            ..Default::default()
        };
        assert!(!may_drop(&alert(vec![rule(
            cnnf_core::proto::RuleEffect::Alert,
            false
        )])));
        assert!(may_drop(&alert(vec![rule(
            cnnf_core::proto::RuleEffect::Prevent,
            false
        )])));
        assert!(!may_drop(&alert(vec![rule(
            cnnf_core::proto::RuleEffect::Prevent,
            true
        )])));
        assert!(may_drop(&VerdictTable {
            host_mode: Mode::Prevent as i32,
            ..Default::default()
        }));
        assert!(
            !may_drop(&VerdictTable {
                rules: vec![rule(cnnf_core::proto::RuleEffect::Prevent, false)],
                ..Default::default()
            }),
            "disabled modes drop nothing"
        );
    }

    fn engine_pair_accept() -> (Engine, std::sync::mpsc::Receiver<DecisionRecord>, Metrics) {
        let (engine, receiver, metrics) = engine(Mode::Prevent, false);
        (engine.with_queue_full(QueueFull::Accept), receiver, metrics)
    }

    #[test]
    fn undecodable_packets_follow_the_fail_mode() {
        let (open, _, metrics) = engine(Mode::Prevent, false);
        assert_eq!(open.undecodable(), Action::Accept);
        assert_eq!(metrics.verdict_count("undecodable"), 1);
        let (closed, _, _) = engine(Mode::Prevent, true);
        assert_eq!(closed.undecodable(), Action::Drop);
    }
}
