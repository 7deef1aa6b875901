//! KV watches that a narrowly permitted client can run.
//!
//! async-nats' `Store::watch*` creates its ordered consumer without a name,
//! so the request goes to `$JS.API.CONSUMER.CREATE.<stream>` with the
//! filter in the body only, which NATS permissions cannot tell apart from a
//! consumer on any key. [`watch`] names the consumer, so the request goes to
//! `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` (the server refuses a
//! body whose filter differs from it), and a node's permissions can allow
//! exactly its own key. It also needs no stream info request.

use std::pin::Pin;
use std::str::FromStr as _;

use async_nats::jetstream::{self, consumer::push, kv};
use futures::{Stream, StreamExt as _};

/// A stream of KV entries, latest value of each key first, then changes.
pub type Entries = Pin<Box<dyn Stream<Item = Result<kv::Entry, WatchError>> + Send>>;

/// Why a watch could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The consumer could not be created (refused, or no answer).
    #[error("creating the watch consumer {name} on {stream}: {source}")]
    Create {
        /// The KV stream.
        stream: String,
        /// The consumer name.
        name: String,
        /// The server's or client's error.
        source: async_nats::jetstream::stream::ConsumerError,
    },
    /// Deliveries failed (the ordered consumer could not be recreated).
    #[error("watching {stream}: {message}")]
    Deliveries {
        /// The KV stream.
        stream: String,
        /// What failed.
        message: String,
    },
}

/// Watches `key` (a key, or a pattern such as `>`) of KV `bucket` with an
/// ordered consumer named `name`: the latest value of every matching key,
/// then every change. `name` must be unique on the bucket's stream while
/// the watch runs (replacements after a gap are named `<name>_<n>`).
pub async fn watch(js: &jetstream::Context, bucket: &str, key: &str, name: &str) -> Result<Entries, WatchError> {
    let stream = format!("KV_{bucket}");
    let prefix = format!("$KV.{bucket}.");
    let consumer = js
        .create_consumer_on_stream(
            push::OrderedConfig {
                name: Some(name.to_owned()),
                deliver_subject: js.client().new_inbox(),
                description: Some("kv watch consumer".to_owned()),
                filter_subject: format!("{prefix}{key}"),
                replay_policy: jetstream::consumer::ReplayPolicy::Instant,
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            },
            &stream,
        )
        .await
        .map_err(|source| WatchError::Create {
            stream: stream.clone(),
            name: name.to_owned(),
            source,
        })?;
    let mut seen_current = consumer.cached_info().num_pending == 0;
    let messages = consumer.messages().await.map_err(|error| WatchError::Deliveries {
        stream: stream.clone(),
        message: error.to_string(),
    })?;
    let bucket = bucket.to_owned();
    Ok(Box::pin(messages.map(move |message| {
        let failed = |message: String| WatchError::Deliveries {
            stream: stream.clone(),
            message,
        };
        let message = message.map_err(|error| failed(error.to_string()))?;
        let info = message
            .info()
            .map_err(|error| failed(format!("bad message metadata: {error}")))?;
        let operation = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("KV-Operation"))
            .and_then(|value| kv::Operation::from_str(value.as_str()).ok())
            .unwrap_or(kv::Operation::Put);
        if info.pending == 0 {
            seen_current = true;
        }
        Ok(kv::Entry {
            bucket: bucket.clone(),
            key: message
                .subject
                .strip_prefix(prefix.as_str())
                .unwrap_or(&message.subject)
                .to_owned(),
            value: message.payload.clone(),
            revision: info.stream_sequence,
            delta: info.pending,
            created: info.published,
            operation,
            seen_current,
        })
    })))
}
