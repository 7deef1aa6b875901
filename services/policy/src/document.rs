//! The portable policy: JSON documents of schema `cnnf.policy/v1`
//! (`docs/policy-json.md` is the reference) and the learned policy as
//! Kubernetes NetworkPolicy YAML.
//!
//! Export writes in a deterministic order (objects by name, rules by id,
//! learned connections by image then side, peer, port, protocol; a rule's
//! destinations as written), so export → import → export gives the same
//! bytes. Import reads in two steps: the JSON itself (a syntax or type
//! error stops there, with its path, line and column), then every rule of
//! the policy (all problems, each with its JSON path). An invalid document
//! changes nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cnnf_proto::v1::network_object::Kind as ObjectKind;
use cnnf_proto::v1::{
    policy_event, Identity, IdentityKind, ImportedLearned, LearnedConnection, Mode, NetworkObject, PortRange, Protocol,
    Rule, RuleDestination, RuleEffect, Side,
};
use serde::{Deserialize, Serialize};

use crate::policy::{check_imported, Policy, Problem};

/// The schema every document names.
pub const SCHEMA: &str = "cnnf.policy/v1";

/// A mode as the document spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// Observe and learn.
    Disabled,
    /// Allow and audit anomalies.
    Alert,
    /// Drop and audit anomalies.
    Prevent,
}

/// An object kind as the document spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindName {
    /// An image by ID or name pattern.
    Image,
    /// CIDRs or single addresses.
    Subnet,
    /// A service on a host.
    HostApp,
}

/// A protocol as the document spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolName {
    /// Every protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
}

/// What a destination does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationEffect {
    /// An allowed destination.
    Allow,
    /// Traffic to it is allowed and audited, even where another rule allows it.
    Alert,
    /// Traffic to it is dropped and audited, even where another rule allows it.
    Prevent,
}

/// What happens to the rest of a rule's source traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectName {
    /// Allow and audit.
    Alert,
    /// Drop and audit.
    Prevent,
}

/// A side of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SideName {
    /// What the image is reached on, and from whom.
    Inbound,
    /// What the image reaches.
    Outbound,
}

/// A peer kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerKind {
    /// An image (id: digest).
    Image,
    /// A host app (id: unit).
    HostApp,
    /// A network object (id: its name).
    Object,
}

/// A network object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDoc {
    /// Unique name.
    pub name: String,
    /// Kind.
    pub kind: KindName,
    /// Image ID (digest), for images.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_id: String,
    /// Image name or `prefix*` pattern, for images.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_name: String,
    /// CIDRs or single addresses, for subnets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
    /// Unit name, for host apps.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_app: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A port or an inclusive range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsDoc {
    /// The port, or the first of the range.
    pub first: u32,
    /// The last port of the range; absent for a single port.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last: u32,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

fn yes() -> bool {
    true
}

/// One destination of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationDoc {
    /// Name of the destination object.
    pub object: String,
    /// Ports; empty: every port.
    #[serde(default)]
    pub ports: Vec<PortsDoc>,
    /// Protocol.
    pub protocol: ProtocolName,
    /// Allow (the default) or a deny effect.
    #[serde(default = "allow")]
    pub effect: DestinationEffect,
}

fn allow() -> DestinationEffect {
    DestinationEffect::Allow
}

/// A rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Unique id.
    pub id: String,
    /// Source object name.
    pub source: String,
    /// A host rule (host app source).
    #[serde(default)]
    pub host: bool,
    /// A disabled rule is kept but takes no part in decisions.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Allowed destinations (and subnet denies).
    #[serde(default)]
    pub destinations: Vec<DestinationDoc>,
    /// Allow what the source's model knows before applying `effect`.
    #[serde(default)]
    pub allow_learned: bool,
    /// What happens to all other traffic of the source.
    pub effect: EffectName,
    /// Free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A learned peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerDoc {
    /// Kind.
    pub kind: PeerKind,
    /// Image digest, unit, or object name.
    pub id: String,
    /// Human name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// One learned connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionDoc {
    /// The model's side.
    pub side: SideName,
    /// The other end.
    pub peer: PeerDoc,
    /// Port.
    pub port: u32,
    /// Protocol.
    pub protocol: ProtocolName,
}

/// The learned connections of one image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnedDoc {
    /// Image ID (digest).
    pub image_id: String,
    /// Its connections.
    #[serde(default)]
    pub connections: Vec<ConnectionDoc>,
}

/// A whole policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Always `policy`.
    pub kind: String,
    /// Container mode.
    pub mode: ModeName,
    /// Host mode.
    pub host_mode: ModeName,
    /// Objects, by name.
    #[serde(default)]
    pub objects: Vec<ObjectDoc>,
    /// Rules, by id.
    #[serde(default)]
    pub rules: Vec<RuleDoc>,
    /// Learned connections, by image.
    #[serde(default)]
    pub learned: Vec<LearnedDoc>,
}

/// A single rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Always `rule`.
    pub kind: String,
    /// The rule.
    pub rule: RuleDoc,
}

#[derive(Deserialize)]
struct Header {
    schema: Option<String>,
    kind: Option<String>,
}

/// What a valid document asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    /// Replace the whole policy.
    Policy(policy_event::Imported),
    /// Add or replace one rule.
    Rule(Rule),
}

/// Why a document was refused: every problem, with its JSON path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", crate::policy::describe(.problems))]
pub struct DocumentError {
    /// The problems, paths starting at `$`.
    pub problems: Vec<Problem>,
}

fn parse_json<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, DocumentError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let path = if path == "." {
            "$".to_owned()
        } else {
            format!("$.{path}")
        };
        DocumentError {
            problems: vec![Problem::new(path, inner.to_string())],
        }
    })?;
    deserializer.end().map_err(|error| DocumentError {
        problems: vec![Problem::new("$", error.to_string())],
    })?;
    Ok(value)
}

/// Reads a document: a whole policy (checked completely) or a single rule
/// (checked here for its own fields; its objects are checked against the
/// policy it is imported into).
pub fn parse(bytes: &[u8]) -> Result<Parsed, DocumentError> {
    let header: Header = parse_json(bytes)?;
    let mut problems = Vec::new();
    match header.schema.as_deref() {
        Some(SCHEMA) => {}
        Some(other) => problems.push(Problem::new("$.schema", format!("{other:?} is not {SCHEMA:?}"))),
        None => problems.push(Problem::new(
            "$.schema",
            format!("missing; this reader reads {SCHEMA:?}"),
        )),
    }
    let kind = header.kind.unwrap_or_default();
    if !problems.is_empty() {
        return Err(DocumentError { problems });
    }
    match kind.as_str() {
        "policy" => {
            let doc: PolicyDoc = parse_json(bytes)?;
            let imported = imported_of(&doc);
            check_imported(&imported, &mut problems);
            if problems.is_empty() {
                Ok(Parsed::Policy(imported))
            } else {
                Err(DocumentError {
                    problems: problems.into_iter().map(|problem| problem.under("$")).collect(),
                })
            }
        }
        "rule" => {
            let doc: RuleDocument = parse_json(bytes)?;
            Ok(Parsed::Rule(rule_of(&doc.rule)))
        }
        other => Err(DocumentError {
            problems: vec![Problem::new(
                "$.kind",
                format!("{other:?} is not a document kind (policy, rule)"),
            )],
        }),
    }
}

fn mode_of(mode: ModeName) -> i32 {
    match mode {
        ModeName::Disabled => Mode::Disabled as i32,
        ModeName::Alert => Mode::Alert as i32,
        ModeName::Prevent => Mode::Prevent as i32,
    }
}

fn mode_name(mode: i32) -> ModeName {
    match Mode::try_from(mode) {
        Ok(Mode::Alert) => ModeName::Alert,
        Ok(Mode::Prevent) => ModeName::Prevent,
        _ => ModeName::Disabled,
    }
}

fn protocol_of(protocol: ProtocolName) -> i32 {
    match protocol {
        ProtocolName::Any => Protocol::Any as i32,
        ProtocolName::Tcp => Protocol::Tcp as i32,
        ProtocolName::Udp => Protocol::Udp as i32,
        ProtocolName::Icmp => Protocol::Icmp as i32,
    }
}

fn protocol_name(protocol: i32) -> ProtocolName {
    match Protocol::try_from(protocol) {
        Ok(Protocol::Tcp) => ProtocolName::Tcp,
        Ok(Protocol::Udp) => ProtocolName::Udp,
        Ok(Protocol::Icmp) => ProtocolName::Icmp,
        _ => ProtocolName::Any,
    }
}

fn object_of(doc: &ObjectDoc) -> NetworkObject {
    NetworkObject {
        name: doc.name.clone(),
        kind: match doc.kind {
            KindName::Image => ObjectKind::Image,
            KindName::Subnet => ObjectKind::Subnet,
            KindName::HostApp => ObjectKind::HostApp,
        } as i32,
        image_id: doc.image_id.clone(),
        image_name: doc.image_name.clone(),
        cidrs: doc.cidrs.clone(),
        host_app: doc.host_app.clone(),
        description: doc.description.clone(),
    }
}

fn object_doc(object: &NetworkObject) -> ObjectDoc {
    ObjectDoc {
        name: object.name.clone(),
        kind: match ObjectKind::try_from(object.kind) {
            Ok(ObjectKind::Subnet) => KindName::Subnet,
            Ok(ObjectKind::HostApp) => KindName::HostApp,
            _ => KindName::Image,
        },
        image_id: object.image_id.clone(),
        image_name: object.image_name.clone(),
        cidrs: object.cidrs.clone(),
        host_app: object.host_app.clone(),
        description: object.description.clone(),
    }
}

/// The proto rule a document rule describes.
pub fn rule_of(doc: &RuleDoc) -> Rule {
    Rule {
        id: doc.id.clone(),
        source: doc.source.clone(),
        destinations: doc
            .destinations
            .iter()
            .map(|destination| RuleDestination {
                object: destination.object.clone(),
                ports: destination
                    .ports
                    .iter()
                    .map(|ports| PortRange {
                        first: ports.first,
                        last: ports.last,
                    })
                    .collect(),
                protocol: protocol_of(destination.protocol),
                effect: match destination.effect {
                    DestinationEffect::Allow => RuleEffect::Unspecified,
                    DestinationEffect::Alert => RuleEffect::Alert,
                    DestinationEffect::Prevent => RuleEffect::Prevent,
                } as i32,
            })
            .collect(),
        allow_learned: doc.allow_learned,
        effect: match doc.effect {
            EffectName::Alert => RuleEffect::Alert,
            EffectName::Prevent => RuleEffect::Prevent,
        } as i32,
        description: doc.description.clone(),
        host: doc.host,
        disabled: !doc.enabled,
    }
}

/// The document form of a rule.
pub fn rule_doc(rule: &Rule) -> RuleDoc {
    RuleDoc {
        id: rule.id.clone(),
        source: rule.source.clone(),
        host: rule.host,
        enabled: !rule.disabled,
        destinations: rule
            .destinations
            .iter()
            .map(|destination| DestinationDoc {
                object: destination.object.clone(),
                ports: destination
                    .ports
                    .iter()
                    .map(|range| PortsDoc {
                        first: range.first,
                        last: range.last,
                    })
                    .collect(),
                protocol: protocol_name(destination.protocol),
                effect: match RuleEffect::try_from(destination.effect) {
                    Ok(RuleEffect::Alert) => DestinationEffect::Alert,
                    Ok(RuleEffect::Prevent) => DestinationEffect::Prevent,
                    _ => DestinationEffect::Allow,
                },
            })
            .collect(),
        allow_learned: rule.allow_learned,
        effect: match RuleEffect::try_from(rule.effect) {
            Ok(RuleEffect::Prevent) => EffectName::Prevent,
            _ => EffectName::Alert,
        },
        description: rule.description.clone(),
    }
}

fn connection_of(doc: &ConnectionDoc) -> LearnedConnection {
    LearnedConnection {
        side: match doc.side {
            SideName::Inbound => Side::Inbound,
            SideName::Outbound => Side::Outbound,
        } as i32,
        peer: Some(Identity {
            kind: match doc.peer.kind {
                PeerKind::Image => IdentityKind::Image,
                PeerKind::HostApp => IdentityKind::HostApp,
                PeerKind::Object => IdentityKind::NetworkObject,
            } as i32,
            id: doc.peer.id.clone(),
            name: doc.peer.name.clone(),
            ..Default::default()
        }),
        port: doc.port,
        protocol: protocol_of(doc.protocol),
        ..Default::default()
    }
}

fn connection_doc(connection: &LearnedConnection) -> Option<ConnectionDoc> {
    let peer = connection.peer.as_ref()?;
    Some(ConnectionDoc {
        side: if connection.side == Side::Inbound as i32 {
            SideName::Inbound
        } else {
            SideName::Outbound
        },
        peer: PeerDoc {
            kind: match IdentityKind::try_from(peer.kind) {
                Ok(IdentityKind::HostApp) => PeerKind::HostApp,
                Ok(IdentityKind::NetworkObject) => PeerKind::Object,
                _ => PeerKind::Image,
            },
            id: peer.id.clone(),
            name: peer.name.clone(),
        },
        port: connection.port,
        protocol: protocol_name(connection.protocol),
    })
}

fn imported_of(doc: &PolicyDoc) -> policy_event::Imported {
    policy_event::Imported {
        objects: doc.objects.iter().map(object_of).collect(),
        rules: doc.rules.iter().map(rule_of).collect(),
        mode: mode_of(doc.mode),
        host_mode: mode_of(doc.host_mode),
        learned: doc
            .learned
            .iter()
            .map(|group| ImportedLearned {
                image_id: group.image_id.clone(),
                connections: group.connections.iter().map(connection_of).collect(),
            })
            .collect(),
    }
}

fn to_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// The whole policy as a document; `learned` is every learned connection
/// per image (models and imported records merged, essentials only, sorted).
pub fn export_policy(policy: &Policy, learned: &BTreeMap<String, Vec<LearnedConnection>>) -> Vec<u8> {
    let doc = PolicyDoc {
        schema: SCHEMA.to_owned(),
        kind: "policy".to_owned(),
        mode: mode_name(policy.mode),
        host_mode: mode_name(policy.host_mode),
        objects: policy.objects.values().map(object_doc).collect(),
        rules: policy.rules.values().map(rule_doc).collect(),
        learned: learned
            .iter()
            .filter(|(_, connections)| !connections.is_empty())
            .map(|(image_id, connections)| LearnedDoc {
                image_id: image_id.clone(),
                connections: connections.iter().filter_map(connection_doc).collect(),
            })
            .collect(),
    };
    to_bytes(&doc)
}

/// One rule as a document.
pub fn export_rule(rule: &Rule) -> Vec<u8> {
    to_bytes(&RuleDocument {
        schema: SCHEMA.to_owned(),
        kind: "rule".to_owned(),
        rule: rule_doc(rule),
    })
}

/// What the workload stream says about an image, for pod selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Image name.
    pub image_name: String,
    /// Labels of its most recently started container.
    pub labels: BTreeMap<String, String>,
    /// Kubernetes namespace, when known.
    pub namespace: String,
}

/// Label put on pods by the fallback selector when an image's labels are
/// unknown (operators must apply it, or edit the selector).
pub const FALLBACK_LABEL: &str = "cnnf.io/image";

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    })
}

fn slug(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out: String = out.trim_matches('-').chars().take(max).collect();
    out.trim_end_matches('-').to_owned()
}

/// The fallback label value of an image: 16 hex digits of its digest (or
/// a hash of its id when it has none).
pub fn fallback_value(image_id: &str) -> String {
    let hex: String = image_id
        .rsplit(':')
        .next()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    if hex.len() == 16 {
        hex.to_ascii_lowercase()
    } else {
        format!("{:016x}", fnv(image_id))
    }
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

fn selector(out: &mut String, indent: &str, image_id: &str, pods: &BTreeMap<String, PodInfo>) {
    let _ = writeln!(out, "{indent}matchLabels:");
    match pods.get(image_id).filter(|info| !info.labels.is_empty()) {
        Some(info) => {
            for (key, value) in &info.labels {
                let _ = writeln!(out, "{indent}  {}: {}", quote(key), quote(value));
            }
        }
        None => {
            let _ = writeln!(
                out,
                "{indent}  {}: {}",
                quote(FALLBACK_LABEL),
                quote(&fallback_value(image_id))
            );
        }
    }
}

/// The learned policy as Kubernetes NetworkPolicy YAML: one policy per
/// image with learned connections, selecting its pods by the labels of its
/// latest container (fallback: label [`FALLBACK_LABEL`]), with one ingress
/// rule per inbound and one egress rule per outbound connection. Image
/// peers become pod selectors (with a namespace selector when their
/// namespace is known), network objects become `ipBlock`s; host apps and
/// ICMP cannot be expressed and are written as comments.
pub fn kubernetes(
    learned: &BTreeMap<String, Vec<LearnedConnection>>,
    objects: &BTreeMap<String, NetworkObject>,
    pods: &BTreeMap<String, PodInfo>,
) -> String {
    let mut out = String::new();
    for (image_id, connections) in learned.iter().filter(|(_, c)| !c.is_empty()) {
        let info = pods.get(image_id).cloned().unwrap_or_default();
        let base = if info.image_name.is_empty() {
            image_id.as_str()
        } else {
            info.image_name.as_str()
        };
        let name = format!("cnnf-{}-{:08x}", slug(base, 40), fnv(image_id) & 0xffff_ffff);
        let _ = writeln!(out, "---");
        let _ = writeln!(out, "# Learned by CNNF for image {} ({})", quote(base), quote(image_id));
        let _ = writeln!(out, "apiVersion: networking.k8s.io/v1");
        let _ = writeln!(out, "kind: NetworkPolicy");
        let _ = writeln!(out, "metadata:");
        let _ = writeln!(out, "  name: {}", quote(&name));
        if !info.namespace.is_empty() {
            let _ = writeln!(out, "  namespace: {}", quote(&info.namespace));
        }
        let _ = writeln!(out, "spec:");
        let _ = writeln!(out, "  podSelector:");
        selector(&mut out, "    ", image_id, pods);
        let _ = writeln!(out, "  policyTypes:");
        let _ = writeln!(out, "  - Ingress");
        let _ = writeln!(out, "  - Egress");
        for (side, key, peers) in [(Side::Inbound, "ingress", "from"), (Side::Outbound, "egress", "to")] {
            let mut body = String::new();
            let mut notes = String::new();
            for connection in connections.iter().filter(|c| c.side == side as i32) {
                let Some(peer) = &connection.peer else { continue };
                let protocol = match Protocol::try_from(connection.protocol) {
                    Ok(Protocol::Udp) => "UDP",
                    Ok(Protocol::Icmp) => {
                        let _ = writeln!(notes, "  # icmp with {}: not expressible", quote(&peer.id));
                        continue;
                    }
                    _ => "TCP",
                };
                let mut peer_lines = String::new();
                match IdentityKind::try_from(peer.kind) {
                    Ok(IdentityKind::Image) => {
                        let _ = writeln!(peer_lines, "    - podSelector:");
                        selector(&mut peer_lines, "        ", &peer.id, pods);
                        if let Some(namespace) = pods.get(&peer.id).map(|p| &p.namespace).filter(|n| !n.is_empty()) {
                            let _ = writeln!(peer_lines, "      namespaceSelector:");
                            let _ = writeln!(peer_lines, "        matchLabels:");
                            let _ = writeln!(
                                peer_lines,
                                "          \"kubernetes.io/metadata.name\": {}",
                                quote(namespace)
                            );
                        }
                    }
                    Ok(IdentityKind::NetworkObject) => {
                        let Some(object) = objects.get(&peer.id).filter(|o| !o.cidrs.is_empty()) else {
                            let _ = writeln!(notes, "  # object {}: not declared, no addresses", quote(&peer.id));
                            continue;
                        };
                        for cidr in &object.cidrs {
                            let net = cnnf_core::eval::reference::parse_cidr(cidr)
                                .map_or_else(|| cidr.clone(), |net| net.to_string());
                            let _ = writeln!(peer_lines, "    - ipBlock:");
                            let _ = writeln!(peer_lines, "        cidr: {}", quote(&net));
                        }
                    }
                    _ => {
                        let _ = writeln!(
                            notes,
                            "  # {} port {}: not expressible",
                            quote(&peer.id),
                            connection.port
                        );
                        continue;
                    }
                }
                let _ = writeln!(body, "  - {peers}:");
                body.push_str(&peer_lines);
                let _ = writeln!(body, "    ports:");
                let _ = writeln!(body, "    - protocol: {protocol}");
                let _ = writeln!(body, "      port: {}", connection.port);
            }
            out.push_str(&notes);
            if body.is_empty() {
                // A listed policy type with no rule allows nothing that way.
                let _ = writeln!(out, "  {key}: []");
            } else {
                let _ = writeln!(out, "  {key}:");
                out.push_str(&body);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_json_path() {
        let text = br#"{"schema":"cnnf.policy/v1","kind":"policy","mode":"alert","host_mode":"disabled",
            "objects":[{"name":"a","kind":"subnet","cidrs":["10.0.0.0/8"]},{"name":"a","kind":"subnet","cidrs":["nope"]}],
            "rules":[{"id":"r","source":"x","effect":"prevent","destinations":[{"object":"a","protocol":"tcp","ports":[{"first":70000}]}]}]}"#;
        let error = parse(text).unwrap_err().to_string();
        assert!(error.contains("$.objects[1].name: \"a\" is declared twice"), "{error}");
        assert!(
            error.contains("$.objects[1].cidrs[0]: \"nope\" is not a CIDR"),
            "{error}"
        );
        assert!(error.contains("$.rules[0].source: no object named \"x\""), "{error}");
        assert!(
            error.contains("$.rules[0].destinations[0].ports[0].first: 70000 is not a port"),
            "{error}"
        );
    }

    #[test]
    fn syntax_and_type_errors_say_where() {
        let error = parse(br#"{"schema":"cnnf.policy/v1","kind":"policy","mode":"al"#).unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        let error = parse(
            br#"{"schema":"cnnf.policy/v1","kind":"policy","mode":"alert","host_mode":"alert","rules":[{"id":5}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("$.rules[0].id: invalid type"), "{error}");
    }

    #[test]
    fn slugs_and_fallbacks_are_label_safe() {
        assert_eq!(slug("Registry.example/Web:1.2", 40), "registry-example-web-1-2");
        assert_eq!(fallback_value("sha256:ABCDEF0123456789ffff"), "abcdef0123456789");
        assert_eq!(fallback_value("x").len(), 16);
    }
}
