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

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cnnf_core::eval::{Connection, Scope};
use cnnf_core::proto::Protocol;

use crate::decisions::{DecisionRecord, Ring};
use crate::identities::Identities;
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

/// Now, Unix nanoseconds.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

impl crate::dataplane::queue::Decider for Engine {
    fn decide(&self, syn: &crate::dataplane::packet::Syn) -> crate::dataplane::queue::Verdict {
        match Engine::decide(self, syn.source, syn.destination, syn.destination_port) {
            Action::Accept => crate::dataplane::queue::Verdict::Accept,
            Action::Drop => crate::dataplane::queue::Verdict::Drop,
        }
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
    fn undecodable_packets_follow_the_fail_mode() {
        let (open, _, metrics) = engine(Mode::Prevent, false);
        assert_eq!(open.undecodable(), Action::Accept);
        assert_eq!(metrics.verdict_count("undecodable"), 1);
        let (closed, _, _) = engine(Mode::Prevent, true);
        assert_eq!(closed.undecodable(), Action::Drop);
    }
}
