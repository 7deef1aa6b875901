//! CNNF's use of NATS JetStream, in one place.
//!
//! - [`topology`]: every stream, KV bucket and durable consumer, declared in
//!   code and created or updated idempotently at start-up.
//! - [`publisher`]: publishes with deterministic `Nats-Msg-Id`s and a
//!   bounded window of in-flight acks, resending what was not acked, so
//!   events arrive exactly once across a server restart.
//! - [`runner`]: the projection runner, which folds a stream into a
//!   projection store exactly once: one atomic store write per batch holds
//!   the changes and the last applied stream sequence; only then are the
//!   messages acked; what cannot be decoded is dead-lettered.
//!
//! Must never depend on a storage engine (it sees stores only through
//! `cnnf-store`'s trait) nor on any service crate.

#![forbid(unsafe_code)]

pub mod outbox;
pub mod publisher;
pub mod runner;
pub mod topology;

pub use publisher::{OutgoingMessage, Publisher, PublisherConfig};
pub use runner::{Event, Projection, ProjectionRunner, RunnerConfig, RunnerHooks, RunnerMetrics};
pub use topology::TopologyConfig;

use std::time::Duration;

/// Connects to NATS for a CNNF component: unlimited reconnects, and a
/// first connection that keeps retrying in the background so a component
/// can start before the server does.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
}

/// A JetStream context with CNNF's defaults: API and ack timeout of 10 s.
pub fn jetstream(client: async_nats::Client) -> async_nats::jetstream::Context {
    async_nats::jetstream::context::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(16_384)
        .build(client)
}
