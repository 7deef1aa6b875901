//! Simulation: a candidate policy against recorded traffic.
//!
//! The candidate is a `cnnf.v1.VerdictTable` (objects, rules, modes and
//! models: what the policy service compiles and agents enforce), given as
//! protobuf or in the JSON form [`CandidateJson`] (documented in
//! `docs/integrations.md`). Every decision recorded in `CNNF_FLOWS` whose
//! time lies in the range is decided again with `cnnf-core`'s compiled
//! evaluator, the one agents run; where the verdict differs from the
//! recorded one, the connection counts (decision `count`s) are added up per
//! edge: source identity, destination identity, port, protocol, recorded
//! verdict, simulated verdict and what decided it.
//!
//! The candidate is evaluated as a whole: an image without a model in it is
//! new to the fleet and therefore learning, exactly as an agent would see
//! it. Decisions whose addresses cannot be parsed are not evaluated.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use async_nats::jetstream;
use cnnf_bus::topology::FLOWS;
use cnnf_core::envelope;
use cnnf_core::eval::{CompiledTable, Connection, DecidedBy, Identity, Scope};
use cnnf_proto::v1::{
    envelope::Payload, network_object, CompiledModel, Direction, LearnedConnection, NetworkObject, PortRange, Protocol,
    Rule, RuleDestination, RuleEffect, SimulateResponse, VerdictChange, VerdictTable,
};
use serde::Deserialize;

use crate::audit::decision_time;
use crate::forensics::{read_range, ForensicsError};

/// Why a candidate was refused.
#[derive(Debug, thiserror::Error)]
pub enum CandidateError {
    /// The JSON does not parse or does not fit the schema.
    #[error("candidate_json: {0}")]
    Json(#[from] serde_json::Error),
    /// A named value is not one of the allowed ones.
    #[error("candidate_json: {field}: {value:?} is not one of {allowed}")]
    BadValue {
        /// Where.
        field: String,
        /// What was given.
        value: String,
        /// What is allowed.
        allowed: &'static str,
    },
    /// The table itself is inconsistent.
    #[error("candidate: {0}")]
    Table(#[from] cnnf_core::eval::TableError),
}

fn bad(field: impl Into<String>, value: &str, allowed: &'static str) -> CandidateError {
    CandidateError::BadValue {
        field: field.into(),
        value: value.to_owned(),
        allowed,
    }
}

/// The JSON form of a candidate verdict table.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CandidateJson {
    /// Version the simulated decisions report.
    pub version: u64,
    /// Container mode: `disabled`, `alert`, `prevent`.
    pub mode: String,
    /// Host mode.
    pub host_mode: String,
    /// Network objects.
    pub objects: Vec<ObjectJson>,
    /// Rules.
    pub rules: Vec<RuleJson>,
    /// Models.
    pub models: Vec<ModelJson>,
}

/// A network object.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectJson {
    /// Name rules refer to.
    pub name: String,
    /// `image`, `subnet` or `host_app`.
    pub kind: String,
    /// Image ID (images).
    pub image_id: String,
    /// Image name or `prefix*` (images).
    pub image_name: String,
    /// CIDRs or addresses (subnets).
    pub cidrs: Vec<String>,
    /// Unit (host apps).
    pub host_app: String,
}

/// One destination of a rule.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestinationJson {
    /// Object name.
    pub object: String,
    /// `"80"` or `"8000-8080"`; none: every port.
    pub ports: Vec<String>,
    /// `tcp`, `udp`, `icmp`, `any` (default any).
    pub protocol: String,
    /// Empty (allowed), `alert` or `prevent`.
    pub effect: String,
}

/// A rule.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleJson {
    /// Rule id.
    pub id: String,
    /// Source object name.
    pub source: String,
    /// Destinations.
    pub destinations: Vec<DestinationJson>,
    /// Allow what the source's model knows.
    pub allow_learned: bool,
    /// `alert` or `prevent` for the rest.
    pub effect: String,
    /// Host rule.
    pub host: bool,
    /// Takes part in decisions.
    pub enabled: bool,
}

impl Default for RuleJson {
    fn default() -> Self {
        Self {
            id: String::new(),
            source: String::new(),
            destinations: Vec::new(),
            allow_learned: false,
            effect: String::new(),
            host: false,
            enabled: true,
        }
    }
}

/// A model.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelJson {
    /// Image ID.
    pub image_id: String,
    /// `learning` or `enforcing`.
    pub state: String,
    /// Who reaches the image, on which port.
    pub inbound: Vec<LearnedJson>,
    /// What the image reaches.
    pub outbound: Vec<LearnedJson>,
}

/// A learned connection.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnedJson {
    /// The other end.
    pub peer: PeerJson,
    /// Destination port.
    pub port: u32,
    /// Protocol.
    pub protocol: String,
}

/// The other end of a learned connection.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerJson {
    /// `image`, `host_app`, `network_object`, `unknown`.
    pub kind: String,
    /// Image ID, unit or object name.
    pub id: String,
    /// Human name.
    pub name: String,
}

fn mode(field: &str, text: &str) -> Result<i32, CandidateError> {
    use cnnf_proto::v1::Mode;
    Ok(match text {
        "" | "disabled" => Mode::Disabled,
        "alert" => Mode::Alert,
        "prevent" => Mode::Prevent,
        other => return Err(bad(field, other, "disabled, alert, prevent")),
    } as i32)
}

fn protocol(field: &str, text: &str) -> Result<i32, CandidateError> {
    Ok(match text {
        "" | "any" => Protocol::Any,
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "icmp" => Protocol::Icmp,
        other => return Err(bad(field, other, "tcp, udp, icmp, any")),
    } as i32)
}

fn effect(field: &str, text: &str) -> Result<i32, CandidateError> {
    Ok(match text {
        "" => RuleEffect::Unspecified,
        "alert" => RuleEffect::Alert,
        "prevent" => RuleEffect::Prevent,
        other => return Err(bad(field, other, "alert, prevent")),
    } as i32)
}

fn port_range(field: &str, text: &str) -> Result<PortRange, CandidateError> {
    let parse = |part: &str| part.trim().parse::<u16>().map(u32::from);
    let range = match text.split_once('-') {
        Some((first, last)) => (parse(first), parse(last)),
        None => (parse(text), Ok(0)),
    };
    match range {
        (Ok(first), Ok(last)) if last == 0 || first <= last => Ok(PortRange { first, last }),
        _ => Err(bad(field, text, "a port 0-65535 or a range first-last")),
    }
}

fn learned(
    field: &str,
    side: cnnf_proto::v1::Side,
    learned: &LearnedJson,
) -> Result<LearnedConnection, CandidateError> {
    use cnnf_proto::v1::IdentityKind;
    let kind = match learned.peer.kind.as_str() {
        "image" => IdentityKind::Image,
        "host_app" => IdentityKind::HostApp,
        "network_object" => IdentityKind::NetworkObject,
        "" | "unknown" => IdentityKind::Unknown,
        other => {
            return Err(bad(
                format!("{field}.peer.kind"),
                other,
                "image, host_app, network_object, unknown",
            ))
        }
    };
    Ok(LearnedConnection {
        side: side as i32,
        peer: Some(cnnf_proto::v1::Identity {
            kind: kind as i32,
            id: learned.peer.id.clone(),
            name: learned.peer.name.clone(),
            ..Default::default()
        }),
        port: learned.port,
        protocol: protocol(&format!("{field}.protocol"), &learned.protocol)?,
        ..Default::default()
    })
}

impl CandidateJson {
    /// Parses the JSON form.
    pub fn parse(bytes: &[u8]) -> Result<VerdictTable, CandidateError> {
        let json: CandidateJson = serde_json::from_slice(bytes)?;
        json.into_table()
    }

    /// The verdict table this JSON describes.
    pub fn into_table(self) -> Result<VerdictTable, CandidateError> {
        let mut table = VerdictTable {
            version: self.version,
            mode: mode("mode", &self.mode)?,
            host_mode: mode("host_mode", &self.host_mode)?,
            ..Default::default()
        };
        for (i, object) in self.objects.into_iter().enumerate() {
            let kind = match object.kind.as_str() {
                "image" => network_object::Kind::Image,
                "subnet" => network_object::Kind::Subnet,
                "host_app" => network_object::Kind::HostApp,
                other => return Err(bad(format!("objects[{i}].kind"), other, "image, subnet, host_app")),
            };
            table.objects.push(NetworkObject {
                name: object.name,
                kind: kind as i32,
                image_id: object.image_id,
                image_name: object.image_name,
                cidrs: object.cidrs,
                host_app: object.host_app,
                description: String::new(),
            });
        }
        for (i, rule) in self.rules.into_iter().enumerate() {
            let mut destinations = Vec::new();
            for (j, destination) in rule.destinations.into_iter().enumerate() {
                let field = format!("rules[{i}].destinations[{j}]");
                destinations.push(RuleDestination {
                    object: destination.object,
                    ports: destination
                        .ports
                        .iter()
                        .map(|text| port_range(&format!("{field}.ports"), text))
                        .collect::<Result<_, _>>()?,
                    protocol: protocol(&format!("{field}.protocol"), &destination.protocol)?,
                    effect: effect(&format!("{field}.effect"), &destination.effect)?,
                });
            }
            table.rules.push(Rule {
                id: rule.id,
                source: rule.source,
                destinations,
                allow_learned: rule.allow_learned,
                effect: effect(&format!("rules[{i}].effect"), &rule.effect)?,
                description: String::new(),
                host: rule.host,
                disabled: !rule.enabled,
            });
        }
        for (i, model) in self.models.into_iter().enumerate() {
            use cnnf_proto::v1::{ModelState, Side};
            let state = match model.state.as_str() {
                "learning" => ModelState::Learning,
                "" | "enforcing" => ModelState::Enforcing,
                other => return Err(bad(format!("models[{i}].state"), other, "learning, enforcing")),
            };
            table.models.push(CompiledModel {
                image_id: model.image_id,
                state: state as i32,
                inbound: model
                    .inbound
                    .iter()
                    .enumerate()
                    .map(|(j, l)| learned(&format!("models[{i}].inbound[{j}]"), Side::Inbound, l))
                    .collect::<Result<_, _>>()?,
                outbound: model
                    .outbound
                    .iter()
                    .enumerate()
                    .map(|(j, l)| learned(&format!("models[{i}].outbound[{j}]"), Side::Outbound, l))
                    .collect::<Result<_, _>>()?,
            });
        }
        CompiledTable::build(table.clone())?;
        Ok(table)
    }
}

fn decided_text(by: &DecidedBy<'_>) -> String {
    match by {
        DecidedBy::Rule(id) => format!("rule:{id}"),
        DecidedBy::Model(image) => format!("model:{image}"),
        DecidedBy::Mode => "mode".to_owned(),
        DecidedBy::Default => "default".to_owned(),
    }
}

type EdgeKey = (i32, String, i32, String, u32, i32, i32, i32, String);

/// Adds up verdict changes, edge by edge.
#[derive(Debug, Default)]
pub struct Simulation {
    table: Option<CompiledTable>,
    edges: BTreeMap<EdgeKey, (VerdictChange, BTreeSet<(String, String)>)>,
    decisions: u64,
    connections: u64,
    changed: u64,
}

impl Simulation {
    /// A simulation of `candidate`.
    pub fn new(candidate: VerdictTable) -> Result<Self, CandidateError> {
        Ok(Self {
            table: Some(CompiledTable::build(candidate)?),
            ..Self::default()
        })
    }

    /// Decides one recorded decision again and records a change.
    pub fn add(&mut self, decision: &cnnf_proto::v1::ConnectionDecision) {
        let Some(table) = &self.table else { return };
        let source = decision.source.clone().unwrap_or_default();
        let destination = decision.destination.clone().unwrap_or_default();
        let (Ok(source_address), Ok(destination_address), Ok(port)) = (
            source.address.parse::<IpAddr>(),
            destination.address.parse::<IpAddr>(),
            u16::try_from(destination.port),
        ) else {
            return;
        };
        let source_identity = source.identity.clone().unwrap_or_default();
        let destination_identity = destination.identity.clone().unwrap_or_default();
        let from = Identity::from_proto(&source_identity);
        let to = Identity::from_proto(&destination_identity);
        let protocol = Protocol::try_from(decision.protocol).unwrap_or(Protocol::Unspecified);
        let scope = if decision.direction == Direction::Ingress as i32 {
            Scope::Ingress
        } else {
            Scope::Egress
        };
        let simulated = table.decide(&Connection {
            source: &from,
            source_address,
            destination: &to,
            destination_address,
            port,
            protocol,
            scope,
        });
        let count = decision.count.max(1);
        self.decisions += 1;
        self.connections += count;
        let simulated_verdict = simulated.verdict as i32;
        if simulated_verdict == decision.verdict {
            return;
        }
        self.changed += count;
        let by = decided_text(&simulated.decided_by);
        let key = (
            source_identity.kind,
            source_identity.id.clone(),
            destination_identity.kind,
            destination_identity.id.clone(),
            destination.port,
            decision.protocol,
            decision.verdict,
            simulated_verdict,
            by.clone(),
        );
        let strip = |identity: cnnf_proto::v1::Identity| cnnf_proto::v1::Identity {
            kind: identity.kind,
            id: identity.id,
            name: identity.name,
            ..Default::default()
        };
        let entry = self.edges.entry(key).or_insert_with(|| {
            (
                VerdictChange {
                    source: Some(strip(source_identity)),
                    destination: Some(strip(destination_identity)),
                    port: destination.port,
                    protocol: decision.protocol,
                    recorded: decision.verdict,
                    simulated: simulated_verdict,
                    simulated_decided_by: by,
                    count: 0,
                    address_pairs: 0,
                },
                BTreeSet::new(),
            )
        });
        entry.0.count += count;
        entry.1.insert((source.address, destination.address));
    }

    /// The report.
    pub fn finish(self) -> SimulateResponse {
        SimulateResponse {
            changes: self
                .edges
                .into_values()
                .map(|(mut change, pairs)| {
                    change.address_pairs = pairs.len() as u64;
                    change
                })
                .collect(),
            decisions_evaluated: self.decisions,
            connections_evaluated: self.connections,
            connections_changed: self.changed,
        }
    }
}

/// Simulates `candidate` on the decisions recorded in `[from, to)`.
pub async fn simulate(
    js: &jetstream::Context,
    candidate: VerdictTable,
    from: i64,
    to: i64,
    lateness: Duration,
) -> Result<SimulateResponse, ForensicsError> {
    if to <= from {
        return Err(ForensicsError::Invalid(format!(
            "range: from ({from}) must be before to ({to})"
        )));
    }
    let mut simulation = Simulation::new(candidate).map_err(|error| ForensicsError::Invalid(error.to_string()))?;
    let lateness = i64::try_from(lateness.as_nanos()).unwrap_or(i64::MAX);
    read_range(
        js,
        FLOWS,
        from.saturating_sub(lateness),
        to.saturating_add(lateness),
        |batch| {
            for (_, _, payload) in batch {
                let Ok(envelope) = envelope::decode(&payload, envelope::DEFAULT_MAX_MESSAGE_BYTES) else {
                    continue;
                };
                let Some(Payload::Decisions(decisions)) = &envelope.payload else {
                    continue;
                };
                for decision in &decisions.decisions {
                    let time = decision_time(decision, envelope.time_unix_nanos);
                    if time >= from && time < to {
                        simulation.add(decision);
                    }
                }
            }
            std::future::ready(Ok(()))
        },
    )
    .await?;
    Ok(simulation.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_candidate_maps_to_a_verdict_table() {
        let table = CandidateJson::parse(
            br#"{"version": 3, "mode": "prevent",
                 "objects": [{"name": "db", "kind": "image", "image_id": "sha256:db"},
                             {"name": "net", "kind": "subnet", "cidrs": ["10.0.0.0/8"]}],
                 "rules": [{"id": "r1", "source": "db", "effect": "alert",
                            "destinations": [{"object": "net", "ports": ["22", "8000-8080"], "protocol": "tcp"}]}],
                 "models": [{"image_id": "sha256:db", "outbound": [{"peer": {"kind": "image", "id": "sha256:x"}, "port": 1}]}]}"#,
        )
        .unwrap();
        assert_eq!(table.version, 3);
        assert_eq!(table.mode, cnnf_proto::v1::Mode::Prevent as i32);
        assert_eq!(
            table.rules[0].destinations[0].ports[1],
            PortRange {
                first: 8000,
                last: 8080
            }
        );
        assert!(!table.rules[0].disabled);
        assert_eq!(table.models[0].outbound[0].protocol, Protocol::Any as i32);
    }

    #[test]
    fn bad_json_candidates_say_where() {
        let error = CandidateJson::parse(br#"{"mode": "block"}"#).unwrap_err().to_string();
        assert!(error.contains("mode") && error.contains("block"), "{error}");
        let error = CandidateJson::parse(br#"{"rules": [{"destinations": [{"ports": ["99999"]}]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("rules[0].destinations[0].ports"), "{error}");
        let error = CandidateJson::parse(br#"{"surprise": 1}"#).unwrap_err().to_string();
        assert!(error.contains("surprise"), "{error}");
        let error = CandidateJson::parse(br#"{"objects": [{"name": "n", "kind": "subnet", "cidrs": ["x"]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"x\""), "{error}");
    }
}
