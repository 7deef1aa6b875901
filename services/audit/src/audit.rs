//! Pure pieces of an audit: which decisions are audited, what makes two
//! audits identical, how an audit travels (subjects, envelope, JSON twin).

use cnnf_core::subjects::{self, Token};
use cnnf_proto::v1::{
    decided_by, envelope::Payload, Audit, ConnectionDecision, Endpoint, Envelope, Identity, IdentityKind, Incident,
    Protocol, Verdict,
};
use prost::Message as _;
use serde::Serialize;

use crate::store::OutboxMessage;

/// Token of the JSON twin's subjects: `cnnf.audit.json.v1.<cluster>.<node>.<verdict>`.
pub const JSON_ROOT: &str = "cnnf.audit.json.v1";

/// True for the verdicts that raise an audit: alert, prevent, block.
pub fn audited(verdict: i32) -> bool {
    matches!(
        Verdict::try_from(verdict),
        Ok(Verdict::Alert | Verdict::Prevent | Verdict::Block)
    )
}

/// The verdict as a subject token and JSON value: `alert`, `prevent`, ...
pub fn verdict_name(verdict: i32) -> &'static str {
    match Verdict::try_from(verdict) {
        Ok(Verdict::Allow) => "allow",
        Ok(Verdict::Learn) => "learn",
        Ok(Verdict::Observe) => "observe",
        Ok(Verdict::Alert) => "alert",
        Ok(Verdict::Prevent) => "prevent",
        Ok(Verdict::Block) => "block",
        _ => "unspecified",
    }
}

/// The verdict named by [`verdict_name`], if any.
pub fn verdict_from_name(name: &str) -> Option<Verdict> {
    Some(match name {
        "allow" => Verdict::Allow,
        "learn" => Verdict::Learn,
        "observe" => Verdict::Observe,
        "alert" => Verdict::Alert,
        "prevent" => Verdict::Prevent,
        "block" => Verdict::Block,
        _ => return None,
    })
}

/// `Audit.decided_by` of a decision: `rule:<id>`, `model:<image-id>`,
/// `mode` or `default`.
pub fn decided_by_text(decision: &ConnectionDecision) -> String {
    let Some(by) = &decision.decided_by else {
        return "default".to_owned();
    };
    match decided_by::Kind::try_from(by.kind) {
        Ok(decided_by::Kind::Rule) => format!("rule:{}", by.rule_id),
        Ok(decided_by::Kind::Model) => format!("model:{}", by.model_image_id),
        Ok(decided_by::Kind::Mode) => "mode".to_owned(),
        _ => "default".to_owned(),
    }
}

/// The event time of a decision: its first sighting, else the envelope's.
pub fn decision_time(decision: &ConnectionDecision, envelope_time: i64) -> i64 {
    if decision.first_seen_unix_nanos != 0 {
        decision.first_seen_unix_nanos
    } else {
        envelope_time
    }
}

fn identity_part(key: &mut Vec<u8>, identity: Option<&Identity>) {
    let (kind, id) = identity.map_or((0, ""), |identity| (identity.kind, identity.id.as_str()));
    key.extend_from_slice(&kind.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key.push(0);
}

/// What makes two audits identical: cluster, node, source identity and
/// address, destination identity, address and port (0 while the source is
/// a known scanner), protocol, verdict and what decided.
pub fn dedup_key(
    cluster: &str,
    node: &str,
    decision: &ConnectionDecision,
    decided_by: &str,
    aggregate_ports: bool,
) -> Vec<u8> {
    let source = decision.source.clone().unwrap_or_default();
    let destination = decision.destination.clone().unwrap_or_default();
    let mut key = Vec::with_capacity(128);
    for text in [cluster, node] {
        key.extend_from_slice(text.as_bytes());
        key.push(0);
    }
    identity_part(&mut key, source.identity.as_ref());
    key.extend_from_slice(source.address.as_bytes());
    key.push(0);
    identity_part(&mut key, destination.identity.as_ref());
    key.extend_from_slice(destination.address.as_bytes());
    key.push(0);
    let port = if aggregate_ports { 0 } else { destination.port };
    key.extend_from_slice(&port.to_be_bytes());
    key.extend_from_slice(&decision.protocol.to_be_bytes());
    key.extend_from_slice(&decision.verdict.to_be_bytes());
    key.extend_from_slice(decided_by.as_bytes());
    key
}

/// The endpoint as an audit shows it (source port dropped: it changes with
/// every connection and would defeat counting).
pub fn audit_endpoint(endpoint: Option<&Endpoint>, keep_port: bool) -> Endpoint {
    let endpoint = endpoint.cloned().unwrap_or_default();
    Endpoint {
        port: if keep_port { endpoint.port } else { 0 },
        ..endpoint
    }
}

/// The subject of an audit: `cnnf.audit.v1.<cluster>.<node>.<verdict>`.
pub fn subject(audit: &Audit) -> Result<String, subjects::InvalidToken> {
    Ok(subjects::audit(
        &Token::new("cluster", &audit.cluster)?,
        &Token::new("node", &audit.node)?,
        &Token::new("verdict", verdict_name(audit.verdict))?,
    ))
}

/// The subject of an audit's JSON twin: `cnnf.audit.json.v1.<cluster>.<node>.<verdict>`.
pub fn json_subject(audit: &Audit) -> Result<String, subjects::InvalidToken> {
    Ok(format!(
        "{JSON_ROOT}.{}.{}.{}",
        Token::new("cluster", &audit.cluster)?,
        Token::new("node", &audit.node)?,
        verdict_name(audit.verdict)
    ))
}

/// An audit in an envelope, in the outbox, under `id`.
pub fn audit_message(id: &str, audit: &Audit) -> Result<OutboxMessage, subjects::InvalidToken> {
    let envelope = Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id.to_owned(),
        cluster: audit.cluster.clone(),
        node: audit.node.clone(),
        time_unix_nanos: audit.last_seen_unix_nanos,
        payload: Some(Payload::Audit(audit.clone())),
        ..Envelope::default()
    };
    Ok(OutboxMessage {
        subject: subject(audit)?,
        id: id.to_owned(),
        payload: envelope.encode_to_vec(),
    })
}

/// An incident in an envelope, in the outbox, under its id.
pub fn incident_message(
    cluster: &str,
    kind: &str,
    time: i64,
    incident: Incident,
) -> Result<OutboxMessage, subjects::InvalidToken> {
    let subject = subjects::incident(&Token::new("cluster", cluster)?, &Token::new("kind", kind)?);
    let id = incident.incident_id.clone();
    let envelope = Envelope {
        schema_version: cnnf_proto::SCHEMA_VERSION,
        event_id: id.clone(),
        cluster: cluster.to_owned(),
        time_unix_nanos: time,
        payload: Some(Payload::Incident(incident)),
        ..Envelope::default()
    };
    Ok(OutboxMessage {
        subject,
        id,
        payload: envelope.encode_to_vec(),
    })
}

/// An endpoint in the JSON twin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JsonEndpoint {
    /// Address, text form.
    pub address: String,
    /// Port (0: not recorded, or many: a scanner's aggregated audit).
    pub port: u32,
    /// `image`, `host_app`, `network_object`, `unknown`.
    pub identity_kind: String,
    /// Image ID, unit or object name.
    pub identity_id: String,
    /// Human name.
    pub identity_name: String,
    /// Container that held the address.
    pub container_id: String,
}

/// The JSON twin of an audit (field names are part of the published schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JsonAudit {
    /// Deterministic id; several messages with one id are one audit, the
    /// highest `count` is the latest.
    pub audit_id: String,
    /// First decision, Unix nanoseconds.
    pub first_seen_unix_nanos: i64,
    /// Last decision, Unix nanoseconds.
    pub last_seen_unix_nanos: i64,
    /// Decisions the audit stands for.
    pub count: u64,
    /// Cluster.
    pub cluster: String,
    /// Deciding node.
    pub node: String,
    /// Who opened the connection.
    pub source: JsonEndpoint,
    /// Who was reached.
    pub destination: JsonEndpoint,
    /// `tcp`, `udp`, `icmp`, `any`, `unspecified`.
    pub protocol: String,
    /// `alert`, `prevent` or `block`.
    pub verdict: String,
    /// `rule:<id>`, `model:<image-id>`, `mode` or `default`.
    pub decided_by: String,
    /// Verdict table version the agent decided with.
    pub verdict_table_version: u64,
}

/// The identity kind as JSON and incident details spell it.
pub fn identity_kind_name(kind: i32) -> &'static str {
    match IdentityKind::try_from(kind) {
        Ok(IdentityKind::Image) => "image",
        Ok(IdentityKind::HostApp) => "host_app",
        Ok(IdentityKind::NetworkObject) => "network_object",
        Ok(IdentityKind::Unknown) => "unknown",
        _ => "unspecified",
    }
}

/// The protocol as JSON spells it.
pub fn protocol_name(protocol: i32) -> &'static str {
    match Protocol::try_from(protocol) {
        Ok(Protocol::Tcp) => "tcp",
        Ok(Protocol::Udp) => "udp",
        Ok(Protocol::Icmp) => "icmp",
        Ok(Protocol::Any) => "any",
        _ => "unspecified",
    }
}

fn json_endpoint(endpoint: Option<&Endpoint>) -> JsonEndpoint {
    let endpoint = endpoint.cloned().unwrap_or_default();
    let identity = endpoint.identity.unwrap_or_default();
    JsonEndpoint {
        address: endpoint.address,
        port: endpoint.port,
        identity_kind: identity_kind_name(identity.kind).to_owned(),
        identity_id: identity.id,
        identity_name: identity.name,
        container_id: identity.container_id,
    }
}

impl From<&Audit> for JsonAudit {
    fn from(audit: &Audit) -> Self {
        Self {
            audit_id: audit.audit_id.clone(),
            first_seen_unix_nanos: audit.first_seen_unix_nanos,
            last_seen_unix_nanos: audit.last_seen_unix_nanos,
            count: audit.count,
            cluster: audit.cluster.clone(),
            node: audit.node.clone(),
            source: json_endpoint(audit.source.as_ref()),
            destination: json_endpoint(audit.destination.as_ref()),
            protocol: protocol_name(audit.protocol).to_owned(),
            verdict: verdict_name(audit.verdict).to_owned(),
            decided_by: audit.decided_by.clone(),
            verdict_table_version: audit.verdict_table_version,
        }
    }
}

#[cfg(test)]
mod tests {
    use cnnf_proto::v1::DecidedBy;

    use super::*;

    fn decision(port: u32, verdict: Verdict) -> ConnectionDecision {
        ConnectionDecision {
            source: Some(Endpoint {
                address: "10.0.0.1".into(),
                port: 40_000 + port,
                identity: None,
            }),
            destination: Some(Endpoint {
                address: "10.0.0.2".into(),
                port,
                identity: None,
            }),
            verdict: verdict as i32,
            decided_by: Some(DecidedBy {
                kind: decided_by::Kind::Rule as i32,
                rule_id: "r1".into(),
                model_image_id: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_alert_prevent_and_block_are_audited() {
        assert!(audited(Verdict::Alert as i32));
        assert!(audited(Verdict::Prevent as i32));
        assert!(audited(Verdict::Block as i32));
        assert!(!audited(Verdict::Allow as i32));
        assert!(!audited(Verdict::Learn as i32));
        assert!(!audited(99));
    }

    #[test]
    fn source_port_does_not_split_audits_but_destination_port_does() {
        let a = decision(80, Verdict::Alert);
        let mut b = decision(80, Verdict::Alert);
        b.source.as_mut().unwrap().port = 1;
        let by = decided_by_text(&a);
        assert_eq!(by, "rule:r1");
        assert_eq!(dedup_key("c", "n", &a, &by, false), dedup_key("c", "n", &b, &by, false));
        let c = decision(81, Verdict::Alert);
        assert_ne!(dedup_key("c", "n", &a, &by, false), dedup_key("c", "n", &c, &by, false));
        assert_eq!(dedup_key("c", "n", &a, &by, true), dedup_key("c", "n", &c, &by, true));
        let d = decision(80, Verdict::Prevent);
        assert_ne!(dedup_key("c", "n", &a, &by, false), dedup_key("c", "n", &d, &by, false));
    }

    #[test]
    fn json_twin_uses_names_not_numbers() {
        let audit = Audit {
            audit_id: "audit:CNNF_FLOWS:1:0".into(),
            verdict: Verdict::Prevent as i32,
            protocol: Protocol::Tcp as i32,
            cluster: "c".into(),
            node: "n".into(),
            ..Default::default()
        };
        let json = serde_json::to_value(JsonAudit::from(&audit)).unwrap();
        assert_eq!(json["verdict"], "prevent");
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["source"]["identity_kind"], "unspecified");
        assert_eq!(json_subject(&audit).unwrap(), "cnnf.audit.json.v1.c.n.prevent");
        assert_eq!(subject(&audit).unwrap(), "cnnf.audit.v1.c.n.prevent");
    }
}
