//! The reference evaluator: SPEC.md section 4, line by line, with no care
//! for speed. It scans the whole table on every call; the agent never runs
//! it on the hot path. Tests and the property test hold
//! [`CompiledTable`](super::CompiledTable) to it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    effective_mode, image_name_matches, ports_admit, protocol_admits, Connection, DecidedBy, Decision, Identity,
};
use crate::proto::{self, network_object::Kind as ObjectKind, VerdictTable};

/// Decides `connection` under `table`, exactly as the specification reads.
pub fn decide<'t>(table: &'t VerdictTable, connection: &Connection<'_>) -> Decision<'t> {
    let mode = if connection.is_host_traffic() {
        effective_mode(table.host_mode)
    } else {
        effective_mode(table.mode)
    };

    // mode disabled -> allow; learn where learning; record (gray)
    if mode == proto::Mode::Disabled {
        return Decision {
            verdict: proto::Verdict::Observe,
            decided_by: DecidedBy::Mode,
        };
    }

    let rules: Vec<&proto::Rule> = table
        .rules
        .iter()
        .filter(|rule| !rule.disabled && source_matches(table, &rule.source, connection.source))
        .collect();

    // a subnet rule of S alerts/prevents D -> that effect
    let mut denied: Option<(proto::RuleEffect, &str)> = None;
    for rule in &rules {
        for destination in &rule.destinations {
            let effect = effect_of(destination.effect);
            if effect == proto::RuleEffect::Unspecified || !destination_matches(table, destination, connection) {
                continue;
            }
            let stronger = match denied {
                None => true,
                Some((held, _)) => held == proto::RuleEffect::Alert && effect == proto::RuleEffect::Prevent,
            };
            if stronger {
                denied = Some((effect, &rule.id));
            }
        }
    }
    if let Some((effect, rule)) = denied {
        return Decision {
            verdict: verdict_of(effect),
            decided_by: DecidedBy::Rule(rule),
        };
    }

    let known = known(table, connection);

    if !rules.is_empty() {
        // D:port among its destinations -> allow
        for rule in &rules {
            let allowed = rule.destinations.iter().any(|destination| {
                effect_of(destination.effect) == proto::RuleEffect::Unspecified
                    && destination_matches(table, destination, connection)
            });
            if allowed {
                return Decision {
                    verdict: proto::Verdict::Allow,
                    decided_by: DecidedBy::Rule(&rule.id),
                };
            }
        }
        // rule allows learned and known -> allow (learn where learning)
        if let Some(known) = known {
            if let Some(rule) = rules.iter().find(|rule| rule.allow_learned) {
                return Decision {
                    verdict: known,
                    decided_by: DecidedBy::Rule(&rule.id),
                };
            }
        }
        // otherwise -> the rule's effect (alert | prevent)
        let strongest = rules
            .iter()
            .find(|rule| effect_of(rule.effect) == proto::RuleEffect::Prevent)
            .unwrap_or(&rules[0]);
        return Decision {
            verdict: verdict_of(effect_of(strongest.effect)),
            decided_by: DecidedBy::Rule(&strongest.id),
        };
    }

    // no rule for S: known (learning sides learn) -> allow
    if let Some(verdict) = known {
        return Decision {
            verdict,
            decided_by: model_of(table, connection),
        };
    }
    // otherwise -> the global mode (alert: allow + audit, prevent: drop + audit)
    Decision {
        verdict: if mode == proto::Mode::Prevent {
            proto::Verdict::Prevent
        } else {
            proto::Verdict::Alert
        },
        decided_by: DecidedBy::Mode,
    }
}

/// Whether the checked sides know the connection: `Some(Learn)` when a
/// checked side is learning, `Some(Allow)` when every checked side allows it
/// from what it learned, `None` when a checked side does not know it.
fn known(table: &VerdictTable, connection: &Connection<'_>) -> Option<proto::Verdict> {
    let mut learning = false;
    let sides = [
        (
            connection.scope.checks_source(),
            connection.source,
            connection.destination,
            proto::Side::Outbound,
        ),
        (
            connection.scope.checks_destination(),
            connection.destination,
            connection.source,
            proto::Side::Inbound,
        ),
    ];
    for (checked, owner, peer, side) in sides {
        if !checked {
            continue;
        }
        let Identity::Image { id, .. } = owner else {
            continue; // only images have models
        };
        let Some(model) = table.models.iter().find(|model| model.image_id == *id) else {
            learning = true; // an image new to the fleet is learning
            continue;
        };
        if model.state != proto::ModelState::Enforcing as i32 {
            learning = true;
            continue;
        }
        let learned = match side {
            proto::Side::Inbound => &model.inbound,
            _ => &model.outbound,
        };
        let knows = learned.iter().any(|learned| {
            learned.port == u32::from(connection.port)
                && same_protocol(learned.protocol, connection.protocol)
                && learned.peer.as_ref().is_some_and(|known| peer.is_peer(known))
        });
        if !knows {
            return None;
        }
    }
    Some(if learning {
        proto::Verdict::Learn
    } else {
        proto::Verdict::Allow
    })
}

/// The model that names a known connection: the subject's, if an image.
fn model_of<'t>(table: &'t VerdictTable, connection: &Connection<'_>) -> DecidedBy<'t> {
    let Identity::Image { id, .. } = connection.subject() else {
        return DecidedBy::Default;
    };
    match table.models.iter().find(|model| model.image_id == *id) {
        Some(model) => DecidedBy::Model(&model.image_id),
        None => DecidedBy::Default,
    }
}

/// Learned protocols compare exactly, with unspecified read as TCP.
pub(crate) fn same_protocol(learned: i32, protocol: proto::Protocol) -> bool {
    let learned = proto::Protocol::try_from(learned).unwrap_or(proto::Protocol::Unspecified);
    let normal = |p: proto::Protocol| {
        if p == proto::Protocol::Unspecified {
            proto::Protocol::Tcp
        } else {
            p
        }
    };
    normal(learned) == normal(protocol)
}

fn object<'t>(table: &'t VerdictTable, name: &str) -> Option<&'t proto::NetworkObject> {
    table.objects.iter().find(|object| object.name == name)
}

/// Whether the rule source object `name` is `source`.
fn source_matches(table: &VerdictTable, name: &str, source: &Identity) -> bool {
    let Some(object) = object(table, name) else {
        return false;
    };
    identity_matches(object, source)
}

/// An image or host-app object against an identity (subnets never match
/// by identity).
pub(crate) fn identity_matches(object: &proto::NetworkObject, identity: &Identity) -> bool {
    match (ObjectKind::try_from(object.kind), identity) {
        (Ok(ObjectKind::Image), Identity::Image { id, name }) => {
            if !object.image_id.is_empty() {
                object.image_id == *id
            } else {
                !object.image_name.is_empty() && image_name_matches(&object.image_name, name)
            }
        }
        (Ok(ObjectKind::HostApp), Identity::HostApp { unit }) => {
            !object.host_app.is_empty() && object.host_app == *unit
        }
        _ => false,
    }
}

/// Whether a rule destination covers the connection's destination, port
/// and protocol.
fn destination_matches(
    table: &VerdictTable,
    destination: &proto::RuleDestination,
    connection: &Connection<'_>,
) -> bool {
    if !ports_admit(&destination.ports, connection.port) || !protocol_admits(destination.protocol, connection.protocol)
    {
        return false;
    }
    let Some(object) = object(table, &destination.object) else {
        return false;
    };
    match ObjectKind::try_from(object.kind) {
        Ok(ObjectKind::Subnet) => subnet_contains(&object.cidrs, connection.destination_address),
        _ => identity_matches(object, connection.destination),
    }
}

/// Whether any of `cidrs` (CIDRs or single addresses) contains `address`;
/// unparsable entries never match.
pub(crate) fn subnet_contains(cidrs: &[String], address: IpAddr) -> bool {
    cidrs.iter().any(|cidr| match parse_cidr(cidr) {
        Some(net) => net.contains(&address),
        None => false,
    })
}

/// A CIDR, or a single address as a host prefix.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
        .map(|net| net.trunc())
}

/// A rule's or a destination's effect. An unknown value (from a newer
/// schema) reads as alert: a destination a newer policy meant to restrict
/// must not become an allowed one here, and a rule's unknown fallback
/// alerts as before.
pub(crate) fn effect_of(effect: i32) -> proto::RuleEffect {
    proto::RuleEffect::try_from(effect).unwrap_or(proto::RuleEffect::Alert)
}

/// The verdict of an effect; an unspecified rule effect alerts.
pub(crate) fn verdict_of(effect: proto::RuleEffect) -> proto::Verdict {
    match effect {
        proto::RuleEffect::Prevent => proto::Verdict::Prevent,
        _ => proto::Verdict::Alert,
    }
}
