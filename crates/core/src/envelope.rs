//! The checks every consumer applies to a message before trusting it.
//!
//! A message is accepted only if it is small enough, decodes as an
//! [`Envelope`], carries a schema version this build understands, and has
//! a payload. Anything else is a [`Rejection`] whose [`reason`]
//! (a short stable code) names the dead-letter reason and metric label.
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
        }
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
