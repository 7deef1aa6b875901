//! Tests of the decision: every line of SPEC.md section 4 through both
//! evaluators ([`order`]), the compiled table held to the reference on
//! random tables ([`property`]), and address resolution and table validation
//! ([`table`]).

mod order;
mod property;
mod table;

use std::net::IpAddr;

use super::{reference, CompiledTable, Connection, DecidedBy, Decision, Identity, Scope};
use crate::proto::{
    self, network_object::Kind as ObjectKind, CompiledModel, LearnedConnection, NetworkObject, PortRange, Rule,
    RuleDestination, VerdictTable,
};

pub(super) fn image(id: &str, name: &str) -> Identity {
    Identity::Image {
        id: id.to_owned(),
        name: name.to_owned(),
    }
}

pub(super) fn app(unit: &str) -> Identity {
    Identity::HostApp { unit: unit.to_owned() }
}

pub(super) fn image_object(name: &str, image_id: &str) -> NetworkObject {
    NetworkObject {
        name: name.to_owned(),
        kind: ObjectKind::Image as i32,
        image_id: image_id.to_owned(),
        ..Default::default()
    }
}

pub(super) fn image_name_object(name: &str, pattern: &str) -> NetworkObject {
    NetworkObject {
        name: name.to_owned(),
        kind: ObjectKind::Image as i32,
        image_name: pattern.to_owned(),
        ..Default::default()
    }
}

pub(super) fn subnet(name: &str, cidrs: &[&str]) -> NetworkObject {
    NetworkObject {
        name: name.to_owned(),
        kind: ObjectKind::Subnet as i32,
        cidrs: cidrs.iter().map(|cidr| (*cidr).to_owned()).collect(),
        ..Default::default()
    }
}

pub(super) fn host_app(name: &str, unit: &str) -> NetworkObject {
    NetworkObject {
        name: name.to_owned(),
        kind: ObjectKind::HostApp as i32,
        host_app: unit.to_owned(),
        ..Default::default()
    }
}

/// An enabled rule of `source` with effect `effect` and no destinations.
pub(super) fn rule(id: &str, source: &str, effect: proto::RuleEffect) -> Rule {
    Rule {
        id: id.to_owned(),
        source: source.to_owned(),
        effect: effect as i32,
        ..Default::default()
    }
}

/// An allowed destination on `ports` (inclusive ranges) over TCP.
pub(super) fn allow(object: &str, ports: &[(u32, u32)]) -> RuleDestination {
    RuleDestination {
        object: object.to_owned(),
        ports: ports.iter().map(|&(first, last)| PortRange { first, last }).collect(),
        protocol: proto::Protocol::Tcp as i32,
        effect: proto::RuleEffect::Unspecified as i32,
    }
}

/// A destination with `effect` on `ports`, any protocol.
pub(super) fn deny(object: &str, ports: &[(u32, u32)], effect: proto::RuleEffect) -> RuleDestination {
    RuleDestination {
        object: object.to_owned(),
        ports: ports.iter().map(|&(first, last)| PortRange { first, last }).collect(),
        protocol: proto::Protocol::Any as i32,
        effect: effect as i32,
    }
}

/// A learned connection with an image peer over TCP.
pub(super) fn learned(peer: &Identity, port: u32) -> LearnedConnection {
    LearnedConnection {
        peer: Some(peer.to_proto()),
        port,
        protocol: proto::Protocol::Tcp as i32,
        ..Default::default()
    }
}

pub(super) fn model(
    image_id: &str,
    state: proto::ModelState,
    inbound: Vec<LearnedConnection>,
    outbound: Vec<LearnedConnection>,
) -> CompiledModel {
    CompiledModel {
        image_id: image_id.to_owned(),
        state: state as i32,
        inbound,
        outbound,
    }
}

pub(super) fn table(mode: proto::Mode) -> VerdictTable {
    VerdictTable {
        version: 7,
        mode: mode as i32,
        host_mode: mode as i32,
        ..Default::default()
    }
}

pub(super) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A TCP connection `source` → `destination`:`port` decided with `scope`.
pub(super) fn connection<'a>(
    source: &'a Identity,
    source_address: &str,
    destination: &'a Identity,
    destination_address: &str,
    port: u16,
    scope: Scope,
) -> Connection<'a> {
    Connection {
        source,
        source_address: ip(source_address),
        destination,
        destination_address: ip(destination_address),
        port,
        protocol: proto::Protocol::Tcp,
        scope,
    }
}

/// Both evaluators decide `connection` under `table` as `expected`.
#[track_caller]
pub(super) fn assert_decides(
    table: &VerdictTable,
    connection: &Connection<'_>,
    verdict: proto::Verdict,
    decided_by: DecidedBy<'_>,
) {
    let expected = Decision { verdict, decided_by };
    let compiled = CompiledTable::build(table.clone()).unwrap();
    assert_eq!(
        reference::decide(table, connection),
        expected,
        "reference, {connection:?}"
    );
    assert_eq!(compiled.decide(connection), expected, "compiled, {connection:?}");
    let (source, destination) = (
        compiled.intern(connection.source),
        compiled.intern(connection.destination),
    );
    assert_eq!(
        compiled.decide_interned(connection, &source, &destination),
        expected,
        "compiled, interned, {connection:?}"
    );
}
