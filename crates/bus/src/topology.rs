//! Every stream, KV bucket and durable consumer of CNNF, declared in code.
//!
//! [`ensure`] creates what is missing and updates what drifted, so every
//! component can call it at start-up, in any order, as often as it likes.
//! The table in `ARCHITECTURE.md` mirrors this file.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

/// Stream of workload started/stopped events from agents.
pub const WORKLOADS: &str = "CNNF_WORKLOADS";
/// Stream of connection decisions from agents.
pub const FLOWS: &str = "CNNF_FLOWS";
/// Stream of agent heartbeats (liveness).
pub const HEARTBEATS: &str = "CNNF_HEARTBEATS";
/// Stream of policy changes.
pub const POLICY: &str = "CNNF_POLICY";
/// Stream of model changes.
pub const MODELS: &str = "CNNF_MODELS";
/// Stream of audits for integrations.
pub const AUDIT: &str = "CNNF_AUDIT";
/// Stream of incidents.
pub const INCIDENTS: &str = "CNNF_INCIDENTS";
/// Stream of quarantined messages.
pub const DEAD_LETTER: &str = "CNNF_DEADLETTER";
/// KV bucket of compiled verdict tables, one key per cluster/node.
pub const VERDICTS_BUCKET: &str = "cnnf-verdicts";
/// Most consumers on the verdict bucket's stream. Every agent watches its
/// table with one ordered consumer, and nats-server caps a stream that sets
/// no limit at 1,000 consumers: a fleet of more nodes would leave agents
/// without tables. Set explicitly so the fleet size, not a server default,
/// is the limit.
pub const VERDICTS_MAX_CONSUMERS: i32 = 100_000;
/// KV bucket of the current address → identity map.
pub const IDENTITIES_BUCKET: &str = "cnnf-identities";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Sizes and retention of the topology; the defaults suit one node.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    /// Replicas of every stream and bucket (3 in a NATS cluster).
    pub replicas: usize,
    /// How long decisions are kept.
    pub flows_max_age: Duration,
    /// Size bound of the decision stream, bytes.
    pub flows_max_bytes: i64,
    /// How long audits are kept.
    pub audit_max_age: Duration,
    /// Window in which JetStream drops a message whose `Nats-Msg-Id` it
    /// has seen: the longest a publisher may take to resend.
    pub duplicate_window: Duration,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            flows_max_age: 7 * DAY,
            flows_max_bytes: 2 * 1024 * 1024 * 1024,
            audit_max_age: 28 * DAY,
            duplicate_window: Duration::from_secs(10 * 60),
        }
    }
}

/// The configuration of every stream.
pub fn streams(config: &TopologyConfig) -> Vec<stream::Config> {
    let base = |name: &str, subjects: &[&str], description: &str| stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        description: Some(description.to_owned()),
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        max_message_size: 1024 * 1024,
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    };
    vec![
        stream::Config {
            max_age: 365 * DAY,
            ..base(WORKLOADS, &["cnnf.workload.*.*"], "Workload started/stopped, by agents")
        },
        stream::Config {
            max_age: config.flows_max_age,
            max_bytes: config.flows_max_bytes,
            ..base(FLOWS, &["cnnf.flow.*.*"], "Connection decisions, by agents")
        },
        stream::Config {
            max_age: DAY,
            max_messages_per_subject: 1000,
            ..base(HEARTBEATS, &["cnnf.heartbeat.*.*"], "Agent heartbeats")
        },
        base(POLICY, &["cnnf.policy.*.*"], "Policy changes: objects, rules, modes"),
        base(MODELS, &["cnnf.model.*"], "Model changes, per image"),
        stream::Config {
            max_age: config.audit_max_age,
            ..base(AUDIT, &["cnnf.audit.v1.*.*.*"], "Audits for integrations")
        },
        stream::Config {
            max_age: 365 * DAY,
            ..base(INCIDENTS, &["cnnf.incident.*.*"], "Incidents")
        },
        stream::Config {
            max_age: 30 * DAY,
            deny_delete: false,
            ..base(DEAD_LETTER, &["cnnf.dlq.*"], "Messages consumers quarantined")
        },
    ]
}

/// A KV bucket, and what its stream needs that `kv::Config` cannot say.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    /// The bucket.
    pub config: kv::Config,
    /// Most consumers on the bucket's stream; `None` leaves the server's
    /// default.
    pub max_consumers: Option<i32>,
}

/// The configuration of every KV bucket.
pub fn buckets(config: &TopologyConfig) -> Vec<BucketSpec> {
    vec![
        BucketSpec {
            config: kv::Config {
                bucket: VERDICTS_BUCKET.to_owned(),
                description: "Compiled verdict tables, per cluster/node".to_owned(),
                history: 5,
                max_value_size: 64 * 1024 * 1024,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            },
            max_consumers: Some(VERDICTS_MAX_CONSUMERS),
        },
        BucketSpec {
            config: kv::Config {
                bucket: IDENTITIES_BUCKET.to_owned(),
                description: "Current address -> identity map".to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            },
            max_consumers: None,
        },
    ]
}

/// A durable consumer a service reads a stream with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSpec {
    /// Durable name; also the key of the applied sequence in the store.
    pub durable: &'static str,
    /// Stream it reads.
    pub stream: &'static str,
    /// Subjects it reads (empty: all of the stream).
    pub filter_subjects: &'static [&'static str],
}

/// Every durable consumer of the services. The projection runner creates or
/// repositions its own at start-up, from the sequence its store applied.
pub const CONSUMERS: &[ConsumerSpec] = &[
    ConsumerSpec {
        durable: "ingest-workloads",
        stream: WORKLOADS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "ingest-heartbeats",
        stream: HEARTBEATS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "modeler-workloads",
        stream: WORKLOADS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "modeler-flows",
        stream: FLOWS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "modeler-models",
        stream: MODELS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "policy-policy",
        stream: POLICY,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "policy-models",
        stream: MODELS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "audit-flows",
        stream: FLOWS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "audit-workloads",
        stream: WORKLOADS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "audit-policy",
        stream: POLICY,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "audit-models",
        stream: MODELS,
        filter_subjects: &[],
    },
    ConsumerSpec {
        durable: "policy-workloads",
        stream: WORKLOADS,
        filter_subjects: &[],
    },
];

/// The spec of a declared consumer, by durable name.
pub fn consumer(durable: &str) -> Option<&'static ConsumerSpec> {
    CONSUMERS.iter().find(|spec| spec.durable == durable)
}

/// Errors while declaring the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A stream could not be created or updated.
    #[error("stream {name}: {message}")]
    Stream {
        /// Stream name.
        name: String,
        /// What NATS said.
        message: String,
    },
    /// A KV bucket could not be created or updated.
    #[error("KV bucket {name}: {message}")]
    Bucket {
        /// Bucket name.
        name: String,
        /// What NATS said.
        message: String,
    },
}

/// Creates every stream and bucket that is missing and updates those whose
/// configuration differs. Idempotent.
pub async fn ensure(js: &jetstream::Context, config: &TopologyConfig) -> Result<(), TopologyError> {
    for wanted in streams(config) {
        ensure_stream(js, wanted).await?;
    }
    for wanted in buckets(config) {
        let name = wanted.config.bucket.clone();
        let bucket_error = |message: String| TopologyError::Bucket {
            name: name.clone(),
            message,
        };
        match js.get_key_value(&name).await {
            Ok(_) => {
                js.update_key_value(wanted.config)
                    .await
                    .map_err(|error| bucket_error(error.to_string()))?;
            }
            Err(_) => {
                js.create_key_value(wanted.config)
                    .await
                    .map_err(|error| bucket_error(error.to_string()))?;
            }
        }
        if let Some(limit) = wanted.max_consumers {
            limit_consumers(js, &format!("KV_{name}"), limit).await?;
        }
    }
    Ok(())
}

/// Sets the consumer limit of stream `name` to `limit` unless it has it.
async fn limit_consumers(js: &jetstream::Context, name: &str, limit: i32) -> Result<(), TopologyError> {
    let stream_error = |message: String| TopologyError::Stream {
        name: name.to_owned(),
        message,
    };
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|error| stream_error(error.to_string()))?;
    let mut current = stream
        .info()
        .await
        .map_err(|error| stream_error(error.to_string()))?
        .config
        .clone();
    if current.max_consumers != limit {
        current.max_consumers = limit;
        js.update_stream(current)
            .await
            .map_err(|error| stream_error(error.to_string()))?;
    }
    Ok(())
}

async fn ensure_stream(js: &jetstream::Context, wanted: stream::Config) -> Result<(), TopologyError> {
    let name = wanted.name.clone();
    let stream_error = |message: String| TopologyError::Stream {
        name: name.clone(),
        message,
    };
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let current = existing
                .info()
                .await
                .map_err(|error| stream_error(error.to_string()))?
                .config
                .clone();
            if differs(&current, &wanted) {
                js.update_stream(wanted)
                    .await
                    .map_err(|error| stream_error(error.to_string()))?;
            }
        }
        Err(_) => {
            js.create_stream(wanted)
                .await
                .map_err(|error| stream_error(error.to_string()))?;
        }
    }
    Ok(())
}

/// True when a field CNNF manages differs (the server fills in others).
fn differs(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects != wanted.subjects
        || current.max_age != wanted.max_age
        || current.max_bytes != wanted.max_bytes
        || current.max_messages_per_subject != wanted.max_messages_per_subject
        || current.num_replicas != wanted.num_replicas
        || current.duplicate_window != wanted.duplicate_window
        || current.description != wanted.description
        || current.max_message_size != wanted.max_message_size
        || current.deny_delete != wanted.deny_delete
        || current.allow_direct != wanted.allow_direct
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_of_streams_do_not_overlap() {
        let streams = streams(&TopologyConfig::default());
        let mut prefixes: Vec<_> = streams
            .iter()
            .flat_map(|s| s.subjects.iter())
            .map(|s| s.split('*').next().unwrap().to_owned())
            .collect();
        prefixes.sort();
        for pair in prefixes.windows(2) {
            assert!(!pair[1].starts_with(&pair[0]), "{} overlaps {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn every_consumer_reads_a_declared_stream() {
        let names: Vec<_> = streams(&TopologyConfig::default())
            .into_iter()
            .map(|s| s.name)
            .collect();
        for spec in CONSUMERS {
            assert!(names.iter().any(|n| n == spec.stream), "{}", spec.durable);
        }
    }
}
