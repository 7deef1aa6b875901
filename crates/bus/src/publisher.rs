//! Publishing with exactly-once arrival.
//!
//! Every message carries a deterministic `Nats-Msg-Id`; JetStream drops a
//! copy it has already stored inside the stream's duplicate window. The
//! publisher keeps a bounded window of messages whose acks are pending;
//! when the window is full the oldest ack is awaited (backpressure), and a
//! message whose ack fails or times out is sent again under the same id
//! until it is acked. So a server restart in the middle of a stream of
//! publishes loses nothing and duplicates nothing.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError as AckError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Subject to publish on.
    pub subject: String,
    /// Deterministic id, sent as `Nats-Msg-Id`.
    pub id: String,
    /// Encoded payload.
    pub payload: Bytes,
    /// Extra headers, if any.
    pub headers: Option<HeaderMap>,
}

impl OutgoingMessage {
    /// A message without extra headers.
    pub fn new(subject: impl Into<String>, id: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            subject: subject.into(),
            id: id.into(),
            payload: payload.into(),
            headers: None,
        }
    }

    fn to_publish(&self) -> PublishMessage {
        let mut publish = PublishMessage::build()
            .payload(self.payload.clone())
            .message_id(&self.id);
        if let Some(headers) = &self.headers {
            for (name, values) in headers.iter() {
                for value in values {
                    publish = publish.header(name.clone(), value.clone());
                }
            }
        }
        publish
    }
}

/// Settings of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// Most messages whose ack may be pending at once.
    pub max_in_flight: usize,
    /// Pause before sending a message again after a failed ack (doubles up
    /// to `max_backoff`).
    pub backoff: Duration,
    /// Longest pause between resends.
    pub max_backoff: Duration,
    /// Give up on a message after this long (`None`: never). Keep it below
    /// the streams' duplicate window, or a late resend can be stored twice.
    pub give_up_after: Option<Duration>,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 4096,
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            give_up_after: Some(Duration::from_secs(5 * 60)),
        }
    }
}

/// Why a publish was given up.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message can never be stored (larger than the server's maximum
    /// payload): retrying would not help.
    #[error("message {id} on {subject} rejected: {message}")]
    Rejected {
        /// Subject of the message.
        subject: String,
        /// Id of the message.
        id: String,
        /// What NATS said.
        message: String,
    },
    /// Not acked within `give_up_after`.
    #[error("message {id} on {subject} not acked after {attempts} attempts: {last_error}")]
    GaveUp {
        /// Subject of the message.
        subject: String,
        /// Id of the message.
        id: String,
        /// Sends tried.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
}

/// Counters of a publisher.
#[derive(Debug, Clone, Default)]
pub struct PublisherMetrics {
    /// Messages acked by JetStream as newly stored.
    pub acked: Counter,
    /// Messages JetStream reported as duplicates of one already stored.
    pub duplicates: Counter,
    /// Sends repeated after a failed or missing ack.
    pub resends: Counter,
}

impl PublisherMetrics {
    /// Registers the counters under `prefix` (e.g. `cnnf_agent_publish`).
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_acked"),
            "Messages acked by JetStream as newly stored",
            self.acked.clone(),
        );
        registry.register(
            format!("{prefix}_duplicates"),
            "Messages JetStream dropped as duplicates of one already stored",
            self.duplicates.clone(),
        );
        registry.register(
            format!("{prefix}_resends"),
            "Sends repeated after a failed or missing ack",
            self.resends.clone(),
        );
    }
}

/// The ack of one send, awaited by its own task from the moment it is sent,
/// so that the ack timeouts of a window of messages lost in an outage run
/// concurrently rather than one after the other.
type PendingAck = tokio::task::JoinHandle<Result<PublishAck, AckError>>;

struct InFlight {
    message: OutgoingMessage,
    ack: Option<PendingAck>,
    attempts: u32,
    first_sent: tokio::time::Instant,
    last_error: String,
}

/// A publisher with a bounded window of pending acks. Not shared: one task
/// owns it and feeds it in order.
pub struct Publisher {
    js: Context,
    config: PublisherConfig,
    window: VecDeque<InFlight>,
    metrics: PublisherMetrics,
}

impl Publisher {
    /// A publisher on `js`.
    pub fn new(js: Context, config: PublisherConfig) -> Self {
        assert!(config.max_in_flight > 0, "max_in_flight must be at least 1");
        Self {
            js,
            config,
            window: VecDeque::new(),
            metrics: PublisherMetrics::default(),
        }
    }

    /// The publisher's counters.
    pub fn metrics(&self) -> &PublisherMetrics {
        &self.metrics
    }

    /// Number of messages whose ack is pending.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// Sends `message`; when the window is full, first waits for the oldest
    /// pending ack (resending it as needed).
    pub async fn publish(&mut self, message: OutgoingMessage) -> Result<(), PublishError> {
        while self.window.len() >= self.config.max_in_flight {
            self.settle_oldest().await?;
        }
        let mut entry = InFlight {
            message,
            ack: None,
            attempts: 0,
            first_sent: tokio::time::Instant::now(),
            last_error: String::new(),
        };
        self.send(&mut entry).await?;
        self.window.push_back(entry);
        Ok(())
    }

    /// Waits until every message sent so far is acked.
    pub async fn flush(&mut self) -> Result<(), PublishError> {
        while !self.window.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Sends one message (once); a send error is kept for the retry loop
    /// unless it can never succeed.
    async fn send(&self, entry: &mut InFlight) -> Result<(), PublishError> {
        entry.attempts += 1;
        match self
            .js
            .send_publish(entry.message.subject.clone(), entry.message.to_publish())
            .await
        {
            Ok(ack) => entry.ack = Some(tokio::spawn(ack.into_future())),
            Err(error) if matches!(error.kind(), PublishErrorKind::MaxPayloadExceeded) => {
                return Err(PublishError::Rejected {
                    subject: entry.message.subject.clone(),
                    id: entry.message.id.clone(),
                    message: error.to_string(),
                });
            }
            Err(error) => {
                entry.ack = None;
                entry.last_error = error.to_string();
            }
        }
        Ok(())
    }

    /// Awaits the oldest pending ack, resending until it is stored.
    async fn settle_oldest(&mut self) -> Result<(), PublishError> {
        let Some(mut entry) = self.window.pop_front() else {
            return Ok(());
        };
        let mut backoff = self.config.backoff;
        loop {
            if let Some(ack) = entry.ack.take() {
                let result = ack
                    .await
                    .unwrap_or_else(|join| Err(AckError::with_source(PublishErrorKind::Other, join)));
                match result {
                    Ok(ack) => {
                        if ack.duplicate {
                            self.metrics.duplicates.inc();
                        } else {
                            self.metrics.acked.inc();
                        }
                        return Ok(());
                    }
                    // "No stream" is retried too: right after a restart
                    // JetStream answers "no responders" until it is ready.
                    Err(error) => entry.last_error = error.to_string(),
                }
            }
            if let Some(limit) = self.config.give_up_after {
                if entry.first_sent.elapsed() >= limit {
                    return Err(PublishError::GaveUp {
                        subject: entry.message.subject.clone(),
                        id: entry.message.id.clone(),
                        attempts: entry.attempts,
                        last_error: entry.last_error.clone(),
                    });
                }
            }
            tracing::debug!(
                message = "Resending unacked message.",
                id = %entry.message.id,
                attempts = entry.attempts,
                error = %entry.last_error
            );
            // The first resend goes at once: a lost ack has already waited
            // out its timeout, and after a server restart a whole window of
            // messages needs resending. Only repeated failures of one
            // message back off.
            if entry.attempts > 1 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.config.max_backoff);
            }
            self.metrics.resends.inc();
            self.send(&mut entry).await?;
        }
    }
}
