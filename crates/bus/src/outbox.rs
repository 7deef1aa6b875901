//! The record a projection stores in its outbox: a message to publish only
//! once the batch that produced it is committed (published after the
//! runner's commit hook fires, then deleted). Stored with the batch, it
//! survives a crash between the commit and the publish; its deterministic
//! id lets JetStream drop a second publish.

use crate::OutgoingMessage;

/// One message waiting in an outbox.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OutboxMessage {
    /// Subject to publish on.
    #[prost(string, tag = "1")]
    pub subject: String,
    /// Deterministic id (`Nats-Msg-Id`).
    #[prost(string, tag = "2")]
    pub id: String,
    /// Encoded envelope.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
}

impl From<OutboxMessage> for OutgoingMessage {
    fn from(message: OutboxMessage) -> Self {
        OutgoingMessage::new(message.subject, message.id, message.payload)
    }
}
