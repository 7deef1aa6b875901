//! How CNNF decides one new connection (SPEC.md section 4), written twice.
//!
//! [`reference`] reads like the specification and is the law; [`compiled`]
//! is what the agent runs on every SYN, built once per verdict table so a
//! decision costs a few hash lookups whatever the number of rules and
//! learned connections. A property test holds them to deciding identically.
//!
//! Both take the policy as the [`VerdictTable`](crate::proto::VerdictTable)
//! the policy service compiles and publishes, and a [`Connection`] whose
//! ends the agent has already resolved to identities.
//!
//! Semantics chosen where the specification is silent (ARCHITECTURE.md,
//! "Decision semantics", explains them to operators):
//! - A node decides the sides it hosts ([`Scope`]): the source's node checks
//!   the source's outbound side, the destination's node the destination's
//!   inbound side, a node hosting both checks both. Checked at both ends, a
//!   connection is known exactly when the specification says so.
//! - Only images have models. An image with no model in the table is new to
//!   the fleet and therefore learning. Host apps, network objects and
//!   unknown addresses have no side to check.
//! - The host mode decides host traffic: connections whose deciding side
//!   ([`Connection::subject`]) is a host app; the container mode decides the
//!   rest. A missing mode is `disabled`, the product's default.
//! - Rules of a source are every enabled rule whose source object matches
//!   it (an image by ID, by name, or by a name ending in `*` as a prefix; a
//!   host app by unit). Destinations with an alert or prevent effect are
//!   checked first ("a subnet rule of S alerts/prevents D"); prevent beats
//!   alert. Then allowed destinations, then the learned fallback of any rule
//!   that allows it, then the strongest effect among the source's rules.
//! - A destination object matches an image or host app by identity and a
//!   subnet by address, whatever the address resolved to. No ports means
//!   every port; protocol unspecified or `any` means every protocol.

pub mod compiled;
pub mod reference;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use crate::proto;

pub use compiled::{CompiledTable, InternedIdentity, TableError};

/// What an address resolved to, as evaluation needs it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A container of an image.
    Image {
        /// Image ID (digest): the model's key.
        id: String,
        /// Image name (`repo:tag`), for rules that name images.
        name: String,
    },
    /// A service on a host (systemd unit).
    HostApp {
        /// The unit name.
        unit: String,
    },
    /// A declared network object (subnet or single address).
    Object {
        /// The object's name.
        name: String,
    },
    /// Nothing matched: shown as such, never trusted.
    Unknown,
}

impl Identity {
    /// The identity as it travels in events (kind, id and name set).
    pub fn to_proto(&self) -> proto::Identity {
        let (kind, id, name) = match self {
            Identity::Image { id, name } => (proto::IdentityKind::Image, id.as_str(), name.as_str()),
            Identity::HostApp { unit } => (proto::IdentityKind::HostApp, unit.as_str(), unit.as_str()),
            Identity::Object { name } => (proto::IdentityKind::NetworkObject, name.as_str(), name.as_str()),
            Identity::Unknown => (proto::IdentityKind::Unknown, "", ""),
        };
        proto::Identity {
            kind: kind as i32,
            id: id.to_owned(),
            name: name.to_owned(),
            ..Default::default()
        }
    }

    /// The identity an event carries; an unspecified kind reads as unknown.
    pub fn from_proto(identity: &proto::Identity) -> Self {
        match proto::IdentityKind::try_from(identity.kind) {
            Ok(proto::IdentityKind::Image) => Identity::Image {
                id: identity.id.clone(),
                name: identity.name.clone(),
            },
            Ok(proto::IdentityKind::HostApp) => Identity::HostApp {
                unit: identity.id.clone(),
            },
            Ok(proto::IdentityKind::NetworkObject) => Identity::Object {
                name: identity.id.clone(),
            },
            _ => Identity::Unknown,
        }
    }

    /// True when this identity is `peer` of a learned connection: same kind
    /// and same id (image names do not count).
    pub fn is_peer(&self, peer: &proto::Identity) -> bool {
        let kind = proto::IdentityKind::try_from(peer.kind).unwrap_or(proto::IdentityKind::Unknown);
        match (self, kind) {
            (Identity::Image { id, .. }, proto::IdentityKind::Image) => *id == peer.id,
            (Identity::HostApp { unit }, proto::IdentityKind::HostApp) => *unit == peer.id,
            (Identity::Object { name }, proto::IdentityKind::NetworkObject) => *name == peer.id,
            (Identity::Unknown, proto::IdentityKind::Unknown | proto::IdentityKind::Unspecified) => true,
            _ => false,
        }
    }
}

/// Which sides of a connection the deciding node hosts, and so checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The source is local: check the source's outbound side.
    Egress,
    /// The destination is local: check the destination's inbound side.
    Ingress,
    /// Both ends are local: check both sides.
    Both,
}

impl Scope {
    /// Whether the source's outbound side is checked.
    pub fn checks_source(self) -> bool {
        matches!(self, Scope::Egress | Scope::Both)
    }

    /// Whether the destination's inbound side is checked.
    pub fn checks_destination(self) -> bool {
        matches!(self, Scope::Ingress | Scope::Both)
    }

    /// The direction recorded in the decision event.
    pub fn direction(self) -> proto::Direction {
        match self {
            Scope::Ingress => proto::Direction::Ingress,
            Scope::Egress | Scope::Both => proto::Direction::Egress,
        }
    }
}

/// One new connection with both ends resolved.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// Who opens it.
    pub source: &'a Identity,
    /// The source address.
    pub source_address: IpAddr,
    /// Who is reached.
    pub destination: &'a Identity,
    /// The destination address.
    pub destination_address: IpAddr,
    /// The destination port.
    pub port: u16,
    /// The transport protocol.
    pub protocol: proto::Protocol,
    /// Which sides the deciding node checks.
    pub scope: Scope,
}

impl Connection<'_> {
    /// The end whose side decides the mode and names the model in a
    /// decision: the destination for ingress, otherwise the source.
    pub fn subject(&self) -> &Identity {
        match self.scope {
            Scope::Ingress => self.destination,
            Scope::Egress | Scope::Both => self.source,
        }
    }

    /// True when the host mode (not the container mode) applies.
    pub fn is_host_traffic(&self) -> bool {
        matches!(self.subject(), Identity::HostApp { .. })
    }
}

/// What decided a connection; names borrow from the verdict table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecidedBy<'t> {
    /// An operator rule, by id.
    Rule(&'t str),
    /// A model (learning or enforcing), by image ID.
    Model(&'t str),
    /// The mode alone (disabled, or an anomaly with no rule).
    Mode,
    /// Nothing in force checks this connection (no model, no rule).
    Default,
}

impl DecidedBy<'_> {
    /// The form a decision event carries.
    pub fn to_proto(&self) -> proto::DecidedBy {
        let (kind, rule_id, model_image_id) = match self {
            DecidedBy::Rule(id) => (proto::decided_by::Kind::Rule, *id, ""),
            DecidedBy::Model(image) => (proto::decided_by::Kind::Model, "", *image),
            DecidedBy::Mode => (proto::decided_by::Kind::Mode, "", ""),
            DecidedBy::Default => (proto::decided_by::Kind::Default, "", ""),
        };
        proto::DecidedBy {
            kind: kind as i32,
            rule_id: rule_id.to_owned(),
            model_image_id: model_image_id.to_owned(),
        }
    }
}

/// The outcome for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'t> {
    /// Allow, learn, observe, alert or prevent.
    pub verdict: proto::Verdict,
    /// What decided it.
    pub decided_by: DecidedBy<'t>,
}

impl Decision<'_> {
    /// True when the SYN must be dropped.
    pub fn drops(&self) -> bool {
        matches!(self.verdict, proto::Verdict::Prevent | proto::Verdict::Block)
    }

    /// True when the decision raises an audit.
    pub fn audited(&self) -> bool {
        matches!(
            self.verdict,
            proto::Verdict::Alert | proto::Verdict::Prevent | proto::Verdict::Block
        )
    }
}

/// The mode in force, with unspecified read as disabled.
pub fn effective_mode(mode: i32) -> proto::Mode {
    match proto::Mode::try_from(mode) {
        Ok(proto::Mode::Alert) => proto::Mode::Alert,
        Ok(proto::Mode::Prevent) => proto::Mode::Prevent,
        _ => proto::Mode::Disabled,
    }
}

/// True when a rule or learned protocol `wanted` admits `protocol`.
pub fn protocol_admits(wanted: i32, protocol: proto::Protocol) -> bool {
    match proto::Protocol::try_from(wanted) {
        Ok(proto::Protocol::Any) | Ok(proto::Protocol::Unspecified) | Err(_) => true,
        Ok(wanted) => wanted == protocol,
    }
}

/// True when `port` lies in `ranges` (no ranges: every port).
pub fn ports_admit(ranges: &[proto::PortRange], port: u16) -> bool {
    ranges.is_empty()
        || ranges.iter().any(|range| {
            let last = if range.last == 0 { range.first } else { range.last };
            (range.first..=last).contains(&u32::from(port))
        })
}

/// True when an image object's name pattern matches `name`: equal, or a
/// prefix when the pattern ends in `*`.
pub fn image_name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}
