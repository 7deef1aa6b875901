//! Conflicts found when a rule is written, returned to the operator as
//! warnings naming the rules involved (the write itself goes through).
//!
//! - **Subnet deny over an allow**: a rule of source S alerts on or
//!   prevents ports of a subnet, and a rule of S (the same or another)
//!   allows some of those ports to an image whose running containers hold
//!   addresses inside that subnet. The decision order checks "a subnet rule
//!   of S alerts/prevents D" first, so the deny wins there.
//! - **Duplicate**: two rules of one source with the same destinations,
//!   fallback and effect.
//! - **Shadowed**: every destination a rule allows is already allowed (same
//!   object, a superset of ports and protocol) by other rules of its source.
//!
//! Rules are grouped by source identity (image ID, image name pattern, or
//! host unit) so a check costs the size of one source's group, not the
//! number of rules: there is no fixed ceiling. Two image objects that name
//! one image differently (ID and name, or overlapping name patterns) are
//! not recognised as one source. Whether an image sits inside a subnet is
//! read from the addresses its containers hold when the rule is written.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use cnnf_core::eval::reference::parse_cidr;
use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::{NetworkObject, PortRange, Protocol, Rule, RuleDestination, RuleEffect};

use crate::policy::Policy;

/// The addresses running containers of an image object hold.
pub type Placement<'a> = dyn Fn(&NetworkObject) -> Vec<IpAddr> + 'a;

/// The identity key of a rule's source, or `None` when its object is missing.
fn source_key(policy: &Policy, rule: &Rule) -> Option<String> {
    let object = policy.objects.get(&rule.source)?;
    Some(match ObjectKind::try_from(object.kind) {
        Ok(ObjectKind::Image) if !object.image_id.is_empty() => format!("image-id:{}", object.image_id),
        Ok(ObjectKind::Image) => format!("image-name:{}", object.image_name),
        Ok(ObjectKind::HostApp) => format!("host:{}", object.host_app),
        _ => format!("object:{}", object.name),
    })
}

/// Inclusive port intervals; no ranges means every port.
fn intervals(ports: &[PortRange]) -> Vec<(u32, u32)> {
    if ports.is_empty() {
        return vec![(0, 65_535)];
    }
    let mut out: Vec<(u32, u32)> = ports
        .iter()
        .map(|range| (range.first, if range.last == 0 { range.first } else { range.last }))
        .collect();
    out.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(out.len());
    for (first, last) in out {
        match merged.last_mut() {
            Some(previous) if first <= previous.1.saturating_add(1) => previous.1 = previous.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// The ports both sets hold.
fn common_ports(a: &[PortRange], b: &[PortRange]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for (a_first, a_last) in intervals(a) {
        for (b_first, b_last) in intervals(b) {
            let first = a_first.max(b_first);
            let last = a_last.min(b_last);
            if first <= last {
                out.push((first, last));
            }
        }
    }
    out
}

/// True when every port of `inner` is in `outer`.
fn ports_within(inner: &[PortRange], outer: &[PortRange]) -> bool {
    let outer = intervals(outer);
    intervals(inner).into_iter().all(|(first, last)| {
        outer
            .iter()
            .any(|(o_first, o_last)| *o_first <= first && last <= *o_last)
    })
}

fn wide(protocol: i32) -> bool {
    matches!(
        Protocol::try_from(protocol),
        Ok(Protocol::Any | Protocol::Unspecified) | Err(_)
    )
}

fn protocols_overlap(a: i32, b: i32) -> bool {
    wide(a) || wide(b) || a == b
}

fn protocol_within(inner: i32, outer: i32) -> bool {
    wide(outer) || (!wide(inner) && inner == outer)
}

fn show_ports(ports: &[(u32, u32)]) -> String {
    if ports == [(0, 65_535)] {
        return "every port".to_owned();
    }
    let parts: Vec<String> = ports
        .iter()
        .map(|(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            }
        })
        .collect();
    format!("port {}", parts.join(", "))
}

fn show_protocol(protocol: i32) -> &'static str {
    match Protocol::try_from(protocol) {
        Ok(Protocol::Tcp) => "tcp ",
        Ok(Protocol::Udp) => "udp ",
        Ok(Protocol::Icmp) => "icmp ",
        _ => "",
    }
}

fn denies(destination: &RuleDestination) -> Option<RuleEffect> {
    match RuleEffect::try_from(destination.effect) {
        Ok(effect @ (RuleEffect::Alert | RuleEffect::Prevent)) => Some(effect),
        _ => None,
    }
}

/// Warnings for the rules `changed` (ids) within `policy` (the policy with
/// the change applied), each naming the rules involved, sorted.
pub fn conflicts(policy: &Policy, changed: &[&str], placement: &Placement<'_>) -> Vec<String> {
    let mut groups: HashMap<String, Vec<&Rule>> = HashMap::new();
    for rule in policy.rules.values().filter(|rule| !rule.disabled) {
        if let Some(key) = source_key(policy, rule) {
            groups.entry(key).or_default().push(rule);
        }
    }
    let changed: BTreeSet<&str> = changed.iter().copied().collect();
    let mut warnings = BTreeSet::new();
    let mut addresses: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for rules in groups.values() {
        let touched: Vec<&Rule> = rules
            .iter()
            .copied()
            .filter(|rule| changed.contains(rule.id.as_str()))
            .collect();
        for rule in &touched {
            for other in rules {
                // Deny of one against allow of the other, both ways.
                deny_over_allow(policy, rule, other, placement, &mut addresses, &mut warnings);
                if rule.id != other.id {
                    deny_over_allow(policy, other, rule, placement, &mut addresses, &mut warnings);
                }
            }
            duplicates_and_shadows(rule, rules, &mut warnings);
        }
    }
    warnings.into_iter().collect()
}

fn deny_over_allow(
    policy: &Policy,
    denier: &Rule,
    allower: &Rule,
    placement: &Placement<'_>,
    addresses: &mut HashMap<String, Vec<IpAddr>>,
    warnings: &mut BTreeSet<String>,
) {
    for deny in &denier.destinations {
        let Some(effect) = denies(deny) else { continue };
        let Some(denied) = policy.objects.get(&deny.object) else {
            continue;
        };
        let nets: Vec<ipnet::IpNet> = denied.cidrs.iter().filter_map(|cidr| parse_cidr(cidr)).collect();
        for allow in allower.destinations.iter().filter(|d| denies(d).is_none()) {
            if !protocols_overlap(deny.protocol, allow.protocol) {
                continue;
            }
            let ports = common_ports(&deny.ports, &allow.ports);
            if ports.is_empty() {
                continue;
            }
            let Some(allowed) = policy.objects.get(&allow.object) else {
                continue;
            };
            let inside = allow.object == deny.object
                || (allowed.kind == ObjectKind::Image as i32
                    && denied.kind == ObjectKind::Subnet as i32
                    && addresses
                        .entry(allowed.name.clone())
                        .or_insert_with(|| placement(allowed))
                        .iter()
                        .any(|address| nets.iter().any(|net| net.contains(address))))
                || (allowed.kind == ObjectKind::Subnet as i32
                    && denied.kind == ObjectKind::Subnet as i32
                    && allowed
                        .cidrs
                        .iter()
                        .filter_map(|cidr| parse_cidr(cidr))
                        .any(|inner| nets.iter().any(|net| net.contains(&inner) || inner.contains(net))));
            if !inside {
                continue;
            }
            let (verb, noun) = match effect {
                RuleEffect::Prevent => ("prevents", "prevent"),
                _ => ("alerts on", "alert"),
            };
            let protocol = if wide(deny.protocol) {
                allow.protocol
            } else {
                deny.protocol
            };
            let whose = if allowed.kind == ObjectKind::Image as i32 && allow.object != deny.object {
                format!("image {:?} whose containers sit inside that subnet", allow.object)
            } else {
                format!("{:?}", allow.object)
            };
            let who = if denier.id == allower.id {
                format!("which the same rule allows to {whose}")
            } else {
                format!("which rule {:?} allows to {whose}", allower.id)
            };
            warnings.insert(format!(
                "rule {:?} {verb} {}{} of {:?}, {who}: the {noun} wins",
                denier.id,
                show_protocol(protocol),
                show_ports(&ports),
                deny.object,
            ));
        }
    }
}

/// A destination in a canonical, comparable form.
fn canonical(destination: &RuleDestination) -> (String, Vec<(u32, u32)>, i32, i32) {
    let protocol = if wide(destination.protocol) {
        Protocol::Any as i32
    } else {
        destination.protocol
    };
    (
        destination.object.clone(),
        intervals(&destination.ports),
        protocol,
        destination.effect,
    )
}

fn duplicates_and_shadows(rule: &Rule, group: &[&Rule], warnings: &mut BTreeSet<String>) {
    let mine: BTreeSet<_> = rule.destinations.iter().map(canonical).collect();
    let mut duplicated = false;
    for other in group.iter().filter(|other| other.id != rule.id) {
        let theirs: BTreeSet<_> = other.destinations.iter().map(canonical).collect();
        if mine == theirs && rule.allow_learned == other.allow_learned && rule.effect == other.effect {
            let (a, b) = if rule.id < other.id {
                (&rule.id, &other.id)
            } else {
                (&other.id, &rule.id)
            };
            warnings.insert(format!("rule {b:?} duplicates rule {a:?}"));
            duplicated = true;
        }
    }
    if duplicated {
        return;
    }
    // Shadowed, both ways: this rule by others, and others by this rule.
    shadowed(rule, group, warnings);
    for other in group.iter().filter(|other| other.id != rule.id) {
        shadowed(other, group, warnings);
    }
}

/// Warns when every destination `rule` allows is allowed by other rules of
/// its group (and it denies nothing).
fn shadowed(rule: &Rule, group: &[&Rule], warnings: &mut BTreeSet<String>) {
    if rule.destinations.is_empty() || rule.destinations.iter().any(|d| denies(d).is_some()) {
        return;
    }
    let mut by = BTreeSet::new();
    for destination in &rule.destinations {
        let cover = group.iter().filter(|other| other.id != rule.id).find(|other| {
            other.destinations.iter().any(|theirs| {
                denies(theirs).is_none()
                    && theirs.object == destination.object
                    && ports_within(&destination.ports, &theirs.ports)
                    && protocol_within(destination.protocol, theirs.protocol)
            })
        });
        match cover {
            Some(other) => {
                by.insert(other.id.as_str());
            }
            None => return,
        }
    }
    let names: Vec<String> = by.iter().map(|id| format!("{id:?}")).collect();
    warnings.insert(format!(
        "rule {:?} is shadowed: every destination it allows is already allowed by rule {}",
        rule.id,
        names.join(", ")
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(list: &[(u32, u32)]) -> Vec<PortRange> {
        list.iter()
            .map(|(first, last)| PortRange {
                first: *first,
                last: *last,
            })
            .collect()
    }

    #[test]
    fn port_sets_compare_as_sets() {
        assert!(ports_within(&ports(&[(80, 0)]), &ports(&[(1, 1024)])));
        assert!(ports_within(&ports(&[(80, 90)]), &ports(&[(80, 85), (86, 90)])));
        assert!(!ports_within(&ports(&[(80, 91)]), &ports(&[(80, 90)])));
        assert!(ports_within(&ports(&[(80, 0)]), &[]));
        assert!(!ports_within(&[], &ports(&[(80, 0)])));
        assert_eq!(
            common_ports(&ports(&[(80, 100)]), &ports(&[(90, 0), (99, 200)])),
            vec![(90, 90), (99, 100)]
        );
        assert!(common_ports(&ports(&[(80, 0)]), &ports(&[(81, 0)])).is_empty());
    }
}
