//! The checks every consumer applies to a message before trusting it.
//!
//! A message is accepted only if it is small enough, decodes as an
//! [`Envelope`], carries a schema version this build understands, has a
//! payload ([`decode`]), and names the origin its subject names
//! ([`check_origin`]): NATS permissions confine an agent to its own node's
//! subjects, so an envelope naming another node or cluster than its
//! subject is a publisher lying in the body. Anything else is a
//! [`Rejection`] whose [`reason`] (a short stable code) names the
//! dead-letter reason and metric label.
//!
//! [`reason`]: Rejection::reason

use cnnf_proto::v1::Envelope;
use cnnf_proto::SCHEMA_VERSION;
use prost::Message;

/// Largest message a consumer accepts by default (NATS's default maximum
/// payload is 1 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Larger than the consumer's limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Size of the message.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a protobuf `Envelope` (garbage, truncated, wrong type).
    #[error("not a valid cnnf.v1.Envelope: {0}")]
    Malformed(String),
    /// A schema version this build does not understand.
    #[error("schema version {found} is not supported (this build reads version {supported})")]
    UnknownSchemaVersion {
        /// The version in the message.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// An envelope without an event, or with one this build does not know.
    #[error("envelope carries no event this build knows")]
    NoPayload,
    /// The event's own fields are wrong (set by the projection that read it).
    #[error("{0}")]
    Invalid(String),
    /// The envelope names another cluster or node than its subject.
    #[error("origin-mismatch: subject {subject:?} does not name the envelope's cluster {cluster:?} and node {node:?}")]
    OriginMismatch {
        /// Subject the message came on.
        subject: String,
        /// Cluster in the envelope.
        cluster: String,
        /// Node in the envelope.
        node: String,
    },
    /// A projection refused the event for a reason of its own, with its
    /// own stable code (e.g. `image-not-on-node`).
    #[error("{reason}: {detail}")]
    Refused {
        /// Short, stable code: the dead-letter reason and metric label.
        reason: &'static str,
        /// What was wrong, and where.
        detail: String,
    },
}

impl Rejection {
    /// Short, stable code for dead-letter headers and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::Malformed(_) => "malformed",
            Self::UnknownSchemaVersion { .. } => "unknown-schema-version",
            Self::NoPayload => "no-payload",
            Self::Invalid(_) => "invalid",
            Self::OriginMismatch { .. } => "origin-mismatch",
            Self::Refused { reason, .. } => reason,
        }
    }
}

/// Where a subject says its message comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// An agent subject (`cnnf.workload|flow|heartbeat.<cluster>.<node>`).
    Agent {
        /// Cluster token of the subject.
        cluster: &'a str,
        /// Node token of the subject.
        node: &'a str,
    },
    /// A cluster subject (`cnnf.policy.<cluster>.<kind>`).
    Cluster {
        /// Cluster token of the subject.
        cluster: &'a str,
    },
    /// A subject that names no origin (models, incidents, audits, anything
    /// outside CNNF's subject space).
    Unnamed,
}

/// Checks the envelope against the origin its subject names: on an agent
/// subject the envelope's cluster and node must be the subject's, on a
/// policy subject its cluster must be. An agent or policy subject of the
/// wrong shape (a token too many or too few) names no origin it could
/// match and is refused too. Other subjects are not checked.
pub fn check_origin<'a>(subject: &'a str, envelope: &Envelope) -> Result<Origin<'a>, Rejection> {
    let mismatch = || Rejection::OriginMismatch {
        subject: subject.to_owned(),
        cluster: envelope.cluster.clone(),
        node: envelope.node.clone(),
    };
    let mut tokens = subject.split('.');
    if tokens.next() != Some(crate::subjects::ROOT) {
        return Ok(Origin::Unnamed);
    }
    let kind = tokens.next();
    let rest: Vec<&str> = tokens.collect();
    match kind {
        Some("workload" | "flow" | "heartbeat") => match rest.as_slice() {
            [cluster, node] if *cluster == envelope.cluster && *node == envelope.node => {
                Ok(Origin::Agent { cluster, node })
            }
            _ => Err(mismatch()),
        },
        Some("policy") => match rest.as_slice() {
            [cluster, _kind] if *cluster == envelope.cluster => Ok(Origin::Cluster { cluster }),
            _ => Err(mismatch()),
        },
        _ => Ok(Origin::Unnamed),
    }
}

/// Decodes and checks one message.
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Envelope, Rejection> {
    if bytes.len() > max_bytes {
        return Err(Rejection::Oversized {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let envelope = Envelope::decode(bytes).map_err(|error| Rejection::Malformed(error.to_string()))?;
    if envelope.schema_version != SCHEMA_VERSION {
        return Err(Rejection::UnknownSchemaVersion {
            found: envelope.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    if envelope.payload.is_none() {
        return Err(Rejection::NoPayload);
    }
    Ok(envelope)
}

/// Encodes an envelope, stamping the current schema version.
pub fn encode(mut envelope: Envelope) -> Vec<u8> {
    envelope.schema_version = SCHEMA_VERSION;
    envelope.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnf_proto::v1::{envelope::Payload, NodeHeartbeat};

    fn heartbeat() -> Envelope {
        Envelope {
            event_id: "n1:b:1".into(),
            cluster: "c".into(),
            node: "n1".into(),
            payload: Some(Payload::NodeHeartbeat(NodeHeartbeat {
                boot_id: "b".into(),
                sequence: 1,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn the_origin_of_agent_and_policy_subjects_must_be_the_envelopes() {
        let envelope = heartbeat();
        for kind in ["workload", "flow", "heartbeat"] {
            assert_eq!(
                check_origin(&format!("cnnf.{kind}.c.n1"), &envelope),
                Ok(Origin::Agent {
                    cluster: "c",
                    node: "n1"
                })
            );
            for bad in [
                format!("cnnf.{kind}.c.n2"),
                format!("cnnf.{kind}.d.n1"),
                format!("cnnf.{kind}.c.n1.x"),
                format!("cnnf.{kind}.c"),
            ] {
                let rejection = check_origin(&bad, &envelope).unwrap_err();
                assert_eq!(rejection.reason(), "origin-mismatch", "{bad}");
                assert!(
                    rejection.to_string().starts_with("origin-mismatch: subject"),
                    "{rejection}"
                );
            }
        }
        assert_eq!(
            check_origin("cnnf.policy.c.rule", &envelope),
            Ok(Origin::Cluster { cluster: "c" })
        );
        for bad in ["cnnf.policy.d.rule", "cnnf.policy.c", "cnnf.policy.c.rule.x"] {
            assert_eq!(
                check_origin(bad, &envelope).unwrap_err().reason(),
                "origin-mismatch",
                "{bad}"
            );
        }
        for unnamed in [
            "cnnf.model.sha256:aa",
            "cnnf.incident.d.port-scan",
            "t.events.0",
            "cnnfx.flow.d.n9",
        ] {
            assert_eq!(check_origin(unnamed, &envelope), Ok(Origin::Unnamed), "{unnamed}");
        }
        let refused = Rejection::Refused {
            reason: "image-not-on-node",
            detail: "x".into(),
        };
        assert_eq!(
            (refused.reason(), refused.to_string().as_str()),
            ("image-not-on-node", "image-not-on-node: x")
        );
    }

    #[test]
    fn accepts_a_valid_envelope() {
        let bytes = encode(heartbeat());
        let decoded = decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(decoded.schema_version, SCHEMA_VERSION);
        assert_eq!(decoded.node, "n1");
    }

    #[test]
    fn rejects_garbage_truncation_versions_and_size() {
        let bytes = encode(heartbeat());
        assert_eq!(
            decode(&bytes[..bytes.len() - 3], DEFAULT_MAX_MESSAGE_BYTES)
                .unwrap_err()
                .reason(),
            "malformed"
        );
        assert_eq!(
            decode(&[0xff; 16], DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(),
            "malformed"
        );
        let mut future = heartbeat();
        future.schema_version = 2;
        let future = prost::Message::encode_to_vec(&future);
        assert_eq!(
            decode(&future, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err(),
            Rejection::UnknownSchemaVersion { found: 2, supported: 1 }
        );
        assert_eq!(decode(&bytes, 4).unwrap_err().reason(), "oversized");
        let empty = encode(Envelope::default());
        assert_eq!(
            decode(&empty, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err(),
            Rejection::NoPayload
        );
    }
}
