//! The policy as a value: objects, rules, modes and imported learned
//! connections; every change validated before it is written, and applied
//! to the value only once valid.
//!
//! The same checks run in the API (against the committed policy at the
//! revision the caller names, before anything is published) and in the
//! projection (so an event that bypassed the API and is wrong is
//! dead-lettered instead of corrupting the policy). Problems carry the
//! path of the offending field, so an import can say exactly where its
//! file is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use cnnf_core::eval::reference::parse_cidr;
use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::{
    policy_event, IdentityKind, ImportedLearned, LearnedConnection, Mode, NetworkObject, PolicyEvent, Protocol, Rule,
    RuleEffect, Side,
};

use crate::store;

/// Longest object name or rule id.
pub const MAX_NAME: usize = 253;

/// One thing wrong with a change, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field (`rules[3].destinations[0].ports[1].first`); empty
    /// for the change as a whole.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same problem under `prefix` (`$` for a JSON document).
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_owned()
        } else if self.path.starts_with('[') {
            format!("{prefix}{}", self.path)
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Joins problems into one message, one per line.
pub fn describe(problems: &[Problem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// The whole policy of one cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Network objects, by name.
    pub objects: BTreeMap<String, NetworkObject>,
    /// Rules, by id (disabled ones included).
    pub rules: BTreeMap<String, Rule>,
    /// The container mode (`cnnf.v1.Mode`; unspecified reads as disabled).
    pub mode: i32,
    /// The host mode.
    pub host_mode: i32,
    /// Learned connections imported with a whole policy, per image, each
    /// reduced to its essentials and sorted by [`store::learned_key`].
    pub learned: BTreeMap<String, Vec<LearnedConnection>>,
}

impl Policy {
    /// Checks `change` against this policy; every problem found.
    pub fn check(&self, change: &policy_event::Change) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        match change {
            policy_event::Change::ObjectPut(put) => match &put.object {
                None => problems.push(Problem::new("object", "required")),
                Some(object) => {
                    check_object("object", object, &mut problems);
                    if problems.is_empty() {
                        // Rules that name it must still be valid with its new kind.
                        let lookup = |name: &str| {
                            if name == object.name {
                                Some(object)
                            } else {
                                self.objects.get(name)
                            }
                        };
                        for rule in self.rules.values().filter(|rule| names_object(rule, &object.name)) {
                            let mut inner = Vec::new();
                            check_rule("", rule, &lookup, &mut inner);
                            for problem in inner {
                                problems.push(Problem::new(
                                    "object.kind",
                                    format!("rule {:?} would become invalid: {problem}", rule.id),
                                ));
                            }
                        }
                    }
                }
            },
            policy_event::Change::ObjectDeleted(deleted) => {
                if !self.objects.contains_key(&deleted.name) {
                    problems.push(Problem::new("name", format!("no object named {:?}", deleted.name)));
                } else {
                    let users: Vec<&str> = self
                        .rules
                        .values()
                        .filter(|rule| names_object(rule, &deleted.name))
                        .map(|rule| rule.id.as_str())
                        .collect();
                    if !users.is_empty() {
                        problems.push(Problem::new(
                            "name",
                            format!(
                                "object {:?} is used by rules {users:?}; change or delete them first",
                                deleted.name
                            ),
                        ));
                    }
                }
            }
            policy_event::Change::RulePut(put) => match &put.rule {
                None => problems.push(Problem::new("rule", "required")),
                Some(rule) => check_rule("rule", rule, &|name| self.objects.get(name), &mut problems),
            },
            policy_event::Change::RuleDeleted(deleted) => {
                if !self.rules.contains_key(&deleted.id) {
                    problems.push(Problem::new("id", format!("no rule with id {:?}", deleted.id)));
                }
            }
            policy_event::Change::ModeSet(set) => check_mode("mode", set.mode, &mut problems),
            policy_event::Change::Imported(imported) => check_imported(imported, &mut problems),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Applies a change [`check`](Self::check) accepted.
    pub fn apply(&mut self, change: &policy_event::Change) {
        match change {
            policy_event::Change::ObjectPut(put) => {
                if let Some(object) = &put.object {
                    self.objects.insert(object.name.clone(), object.clone());
                }
            }
            policy_event::Change::ObjectDeleted(deleted) => {
                self.objects.remove(&deleted.name);
            }
            policy_event::Change::RulePut(put) => {
                if let Some(rule) = &put.rule {
                    self.rules.insert(rule.id.clone(), rule.clone());
                }
            }
            policy_event::Change::RuleDeleted(deleted) => {
                self.rules.remove(&deleted.id);
            }
            policy_event::Change::ModeSet(set) => {
                if set.host {
                    self.host_mode = set.mode;
                } else {
                    self.mode = set.mode;
                }
            }
            policy_event::Change::Imported(imported) => {
                *self = Self::from_imported(imported);
            }
        }
    }

    /// The policy an `Imported` change describes.
    pub fn from_imported(imported: &policy_event::Imported) -> Self {
        let mut learned: BTreeMap<String, BTreeMap<Vec<u8>, LearnedConnection>> = BTreeMap::new();
        for group in &imported.learned {
            let entry = learned.entry(group.image_id.clone()).or_default();
            for connection in &group.connections {
                entry.insert(
                    store::learned_key(&group.image_id, connection),
                    store::essential(connection),
                );
            }
        }
        Self {
            objects: imported
                .objects
                .iter()
                .map(|object| (object.name.clone(), object.clone()))
                .collect(),
            rules: imported
                .rules
                .iter()
                .map(|rule| (rule.id.clone(), rule.clone()))
                .collect(),
            mode: imported.mode,
            host_mode: imported.host_mode,
            learned: learned
                .into_iter()
                .filter(|(_, connections)| !connections.is_empty())
                .map(|(image, connections)| (image, connections.into_values().collect()))
                .collect(),
        }
    }

    /// This policy as an `Imported` change (sorted, so deterministic).
    pub fn to_imported(&self) -> policy_event::Imported {
        policy_event::Imported {
            objects: self.objects.values().cloned().collect(),
            rules: self.rules.values().cloned().collect(),
            mode: self.mode,
            host_mode: self.host_mode,
            learned: self
                .learned
                .iter()
                .map(|(image_id, connections)| ImportedLearned {
                    image_id: image_id.clone(),
                    connections: connections.clone(),
                })
                .collect(),
        }
    }
}

/// True when `rule` names `object` as its source or a destination.
pub fn names_object(rule: &Rule, object: &str) -> bool {
    rule.source == object || rule.destinations.iter().any(|destination| destination.object == object)
}

fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

fn check_name(path: String, what: &str, value: &str, problems: &mut Vec<Problem>) {
    if value.is_empty() {
        problems.push(Problem::new(path, format!("{what} is required")));
    } else if value.len() > MAX_NAME {
        problems.push(Problem::new(
            path,
            format!("{what} is {} bytes long; at most {MAX_NAME}", value.len()),
        ));
    } else if value.chars().any(char::is_control) {
        problems.push(Problem::new(
            path,
            format!("{what} {value:?} holds a control character"),
        ));
    }
}

/// A CIDR or a single address, with no host bits set.
pub fn check_cidr(path: String, value: &str, problems: &mut Vec<Problem>) {
    let Some(net) = parse_cidr(value) else {
        problems.push(Problem::new(path, format!("{value:?} is not a CIDR or an address")));
        return;
    };
    if let Ok(written) = value.parse::<ipnet::IpNet>() {
        if written != net {
            problems.push(Problem::new(
                path,
                format!("{value:?} has host bits set; did you mean {net}?"),
            ));
        }
    }
}

/// Checks one network object.
pub fn check_object(path: &str, object: &NetworkObject, problems: &mut Vec<Problem>) {
    check_name(join(path, "name"), "a name", &object.name, problems);
    match ObjectKind::try_from(object.kind) {
        Ok(ObjectKind::Image) => {
            if object.image_id.is_empty() && object.image_name.is_empty() {
                problems.push(Problem::new(
                    join(path, "image_id"),
                    "an image object needs an image_id or an image_name",
                ));
            }
            if !object.cidrs.is_empty() || !object.host_app.is_empty() {
                problems.push(Problem::new(
                    join(path, "kind"),
                    "an image object has no cidrs and no host_app",
                ));
            }
        }
        Ok(ObjectKind::Subnet) => {
            if object.cidrs.is_empty() {
                problems.push(Problem::new(
                    join(path, "cidrs"),
                    "a subnet object needs at least one CIDR",
                ));
            }
            for (index, cidr) in object.cidrs.iter().enumerate() {
                check_cidr(format!("{}[{index}]", join(path, "cidrs")), cidr, problems);
            }
            if !object.image_id.is_empty() || !object.image_name.is_empty() || !object.host_app.is_empty() {
                problems.push(Problem::new(
                    join(path, "kind"),
                    "a subnet object has no image_id, image_name or host_app",
                ));
            }
        }
        Ok(ObjectKind::HostApp) => {
            if object.host_app.is_empty() {
                problems.push(Problem::new(join(path, "host_app"), "a host app object needs its unit"));
            }
            if !object.cidrs.is_empty() || !object.image_id.is_empty() || !object.image_name.is_empty() {
                problems.push(Problem::new(
                    join(path, "kind"),
                    "a host app object has no cidrs, image_id or image_name",
                ));
            }
        }
        _ => problems.push(Problem::new(
            join(path, "kind"),
            format!("{} is not an object kind (image, subnet, host_app)", object.kind),
        )),
    }
}

/// Checks one rule; `objects` finds the objects it may name.
pub fn check_rule<'o>(
    path: &str,
    rule: &Rule,
    objects: &dyn Fn(&str) -> Option<&'o NetworkObject>,
    problems: &mut Vec<Problem>,
) {
    check_name(join(path, "id"), "an id", &rule.id, problems);
    let source_kind = if rule.source.is_empty() {
        problems.push(Problem::new(join(path, "source"), "a source object is required"));
        None
    } else {
        match objects(&rule.source) {
            None => {
                problems.push(Problem::new(
                    join(path, "source"),
                    format!("no object named {:?}", rule.source),
                ));
                None
            }
            Some(object) => ObjectKind::try_from(object.kind).ok(),
        }
    };
    match source_kind {
        Some(ObjectKind::Image) if rule.host => problems.push(Problem::new(
            join(path, "host"),
            format!("a host rule needs a host app source; {:?} is an image", rule.source),
        )),
        Some(ObjectKind::HostApp) if !rule.host => problems.push(Problem::new(
            join(path, "host"),
            format!("source {:?} is a host app: the rule must be a host rule", rule.source),
        )),
        Some(ObjectKind::Subnet) => problems.push(Problem::new(
            join(path, "source"),
            format!(
                "source {:?} is a subnet; a source is an image or a host app",
                rule.source
            ),
        )),
        _ => {}
    }
    match RuleEffect::try_from(rule.effect) {
        Ok(RuleEffect::Alert | RuleEffect::Prevent) => {}
        _ => problems.push(Problem::new(
            join(path, "effect"),
            format!(
                "{} is not an effect for all other traffic (alert or prevent)",
                rule.effect
            ),
        )),
    }
    for (index, destination) in rule.destinations.iter().enumerate() {
        let here = format!("{}[{index}]", join(path, "destinations"));
        match objects(&destination.object) {
            None => problems.push(Problem::new(
                join(&here, "object"),
                format!("no object named {:?}", destination.object),
            )),
            Some(object) => {
                let kind = ObjectKind::try_from(object.kind).ok();
                let fits = match kind {
                    Some(ObjectKind::Subnet) => true,
                    Some(ObjectKind::Image) => !rule.host,
                    Some(ObjectKind::HostApp) => rule.host,
                    _ => false,
                };
                if !fits {
                    problems.push(Problem::new(
                        join(&here, "object"),
                        if rule.host {
                            format!(
                                "{:?} is an image; host rules go to host apps and subnets",
                                destination.object
                            )
                        } else {
                            format!(
                                "{:?} is a host app; container rules go to images and subnets",
                                destination.object
                            )
                        },
                    ));
                }
            }
        }
        for (at, range) in destination.ports.iter().enumerate() {
            let port_path = format!("{}[{at}]", join(&here, "ports"));
            if !(1..=65_535).contains(&range.first) {
                problems.push(Problem::new(
                    join(&port_path, "first"),
                    format!("{} is not a port", range.first),
                ));
            }
            if range.last != 0 {
                if range.last > 65_535 {
                    problems.push(Problem::new(
                        join(&port_path, "last"),
                        format!("{} is not a port", range.last),
                    ));
                } else if range.last < range.first {
                    problems.push(Problem::new(
                        join(&port_path, "last"),
                        format!("range {}-{} ends before it starts", range.first, range.last),
                    ));
                }
            }
        }
        if Protocol::try_from(destination.protocol).is_err() {
            problems.push(Problem::new(
                join(&here, "protocol"),
                format!("{} is not a protocol", destination.protocol),
            ));
        }
        if RuleEffect::try_from(destination.effect).is_err() {
            problems.push(Problem::new(
                join(&here, "effect"),
                format!("{} is not an effect", destination.effect),
            ));
        }
    }
}

/// Checks a mode.
pub fn check_mode(path: &str, mode: i32, problems: &mut Vec<Problem>) {
    if !matches!(Mode::try_from(mode), Ok(Mode::Disabled | Mode::Alert | Mode::Prevent)) {
        problems.push(Problem::new(
            path,
            format!("{mode} is not a mode (disabled, alert, prevent)"),
        ));
    }
}

/// True for a side a learned connection may have.
pub fn valid_side(side: i32) -> bool {
    matches!(Side::try_from(side), Ok(Side::Inbound | Side::Outbound))
}

/// Checks one learned connection.
pub fn check_learned(path: &str, connection: &LearnedConnection, problems: &mut Vec<Problem>) {
    if !matches!(Side::try_from(connection.side), Ok(Side::Inbound | Side::Outbound)) {
        problems.push(Problem::new(
            join(path, "side"),
            format!("{} is not a side (inbound, outbound)", connection.side),
        ));
    }
    match &connection.peer {
        None => problems.push(Problem::new(join(path, "peer"), "a peer is required")),
        Some(peer) => {
            if !matches!(
                IdentityKind::try_from(peer.kind),
                Ok(IdentityKind::Image | IdentityKind::HostApp | IdentityKind::NetworkObject)
            ) {
                problems.push(Problem::new(
                    join(path, "peer.kind"),
                    format!("{} is not a peer kind (image, host_app, object)", peer.kind),
                ));
            }
            if peer.id.is_empty() {
                problems.push(Problem::new(join(path, "peer.id"), "a peer id is required"));
            }
        }
    }
    if !(1..=65_535).contains(&connection.port) {
        problems.push(Problem::new(
            join(path, "port"),
            format!("{} is not a port", connection.port),
        ));
    }
    if !matches!(
        Protocol::try_from(connection.protocol),
        Ok(Protocol::Tcp | Protocol::Udp | Protocol::Icmp)
    ) {
        problems.push(Problem::new(
            join(path, "protocol"),
            format!("{} is not a learned protocol (tcp, udp, icmp)", connection.protocol),
        ));
    }
}

/// Checks a whole imported policy: every problem, with its path.
pub fn check_imported(imported: &policy_event::Imported, problems: &mut Vec<Problem>) {
    let mut first_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, object) in imported.objects.iter().enumerate() {
        let path = format!("objects[{index}]");
        check_object(&path, object, problems);
        if let Some(first) = first_seen.insert(&object.name, index) {
            first_seen.insert(&object.name, first);
            problems.push(Problem::new(
                join(&path, "name"),
                format!("{:?} is declared twice (first at objects[{first}])", object.name),
            ));
        }
    }
    let objects: BTreeMap<&str, &NetworkObject> = imported
        .objects
        .iter()
        .map(|object| (object.name.as_str(), object))
        .collect();
    let lookup = |name: &str| objects.get(name).copied();
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, rule) in imported.rules.iter().enumerate() {
        let path = format!("rules[{index}]");
        check_rule(&path, rule, &lookup, problems);
        if let Some(first) = ids.insert(&rule.id, index) {
            ids.insert(&rule.id, first);
            problems.push(Problem::new(
                join(&path, "id"),
                format!("{:?} is declared twice (first at rules[{first}])", rule.id),
            ));
        }
    }
    check_mode("mode", imported.mode, problems);
    check_mode("host_mode", imported.host_mode, problems);
    let mut images = BTreeSet::new();
    for (index, group) in imported.learned.iter().enumerate() {
        let path = format!("learned[{index}]");
        if group.image_id.is_empty() {
            problems.push(Problem::new(join(&path, "image_id"), "an image id is required"));
        } else if !images.insert(group.image_id.as_str()) {
            problems.push(Problem::new(
                join(&path, "image_id"),
                format!("{:?} is listed twice", group.image_id),
            ));
        }
        for (at, connection) in group.connections.iter().enumerate() {
            check_learned(&format!("{path}.connections[{at}]"), connection, problems);
        }
    }
}

/// The change of a policy event, or a problem.
pub fn change_of(event: &PolicyEvent) -> Result<&policy_event::Change, Vec<Problem>> {
    event
        .change
        .as_ref()
        .ok_or_else(|| vec![Problem::new("change", "required")])
}

#[cfg(test)]
mod tests {
    use cnnf_proto::v1::{PortRange, RuleDestination};

    use super::*;

    fn image(name: &str, id: &str) -> NetworkObject {
        NetworkObject {
            name: name.into(),
            kind: ObjectKind::Image as i32,
            image_id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_rule_reports_every_problem_with_its_path() {
        let policy = Policy {
            objects: [("web".to_owned(), image("web", "sha256:w"))].into_iter().collect(),
            ..Policy::default()
        };
        let rule = Rule {
            id: "r".into(),
            source: "web".into(),
            effect: RuleEffect::Prevent as i32,
            destinations: vec![RuleDestination {
                object: "nope".into(),
                ports: vec![PortRange { first: 80, last: 0 }, PortRange { first: 70_000, last: 0 }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let change = policy_event::Change::RulePut(policy_event::RulePut { rule: Some(rule) });
        let problems = policy.check(&change).unwrap_err();
        let text = describe(&problems);
        assert!(
            text.contains("rule.destinations[0].object: no object named \"nope\""),
            "{text}"
        );
        assert!(
            text.contains("rule.destinations[0].ports[1].first: 70000 is not a port"),
            "{text}"
        );
        assert_eq!(problems.len(), 2, "{text}");
    }

    #[test]
    fn cidrs_must_parse_and_have_no_host_bits() {
        let mut problems = Vec::new();
        check_cidr("c".into(), "10.0.0.1/24", &mut problems);
        check_cidr("c".into(), "10.0.0.0/33", &mut problems);
        check_cidr("c".into(), "10.0.0.7", &mut problems);
        check_cidr("c".into(), "fd00::/64", &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].message.contains("host bits"));
    }
}
