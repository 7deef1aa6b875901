//! Publishes compiled verdict tables to KV bucket `cnnf-verdicts`, only
//! from what the store committed.
//!
//! - While running, the projections mark what each event affects
//!   ([`Dirty`]); once the store committed the event, the writer takes the
//!   marks, resolves them to nodes (every node, one node, the nodes running
//!   an image), recompiles exactly those nodes' tables and puts each one
//!   whose content changed under `verdict_key(cluster, node)`.
//! - At every (re)start the writer waits until the three runners caught up
//!   with their streams, then reconciles: compiles every known node's table
//!   and puts each that differs from what the bucket holds (content
//!   compared without version and compile time). So a process that died
//!   between a commit and its KV write loses nothing, and a rebuild from
//!   the log does not replay history into the bucket.
//! - Every table is checked with `CompiledTable::build` (what an agent
//!   does) before it is put; an invalid one is counted and not published,
//!   so agents keep their previous table.
//! - Every value put is a `SignedVerdictTable`: the encoded table signed
//!   with the service's key (`cnnf-signing`). At reconciliation a value
//!   that does not verify with this key (unsigned, signed by the previous
//!   key after a rotation, or tampered with) counts as absent, so every
//!   table is put again, signed by the current key.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use cnnf_core::eval::CompiledTable;
use cnnf_core::subjects::{verdict_key, Token};
use cnnf_proto::v1::VerdictTable;
use cnnf_store::{applied_sequence, ProjectionStore};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prost::Message as _;

use crate::compile::{self, Stamp};
use crate::projection::{Dirty, Mark};
use crate::service::{MODELS_DURABLE, POLICY_DURABLE, WORKLOADS_DURABLE};

/// How often the writer looks for work when no commit woke it.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// Longest wait for the runners to catch up before reconciling anyway.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// Counters of the writer.
#[derive(Clone, Debug, Default)]
pub struct WriterMetrics {
    /// Tables put into the bucket.
    pub published: Counter,
    /// Tables compiled (published or found unchanged).
    pub compiled: Counter,
    /// Tables that failed validation and were not published.
    pub invalid: Counter,
    /// Version of the last table published.
    pub version: Gauge,
}

impl WriterMetrics {
    /// Registers the counters.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "cnnf_policy_tables_published",
            "Verdict tables put into the KV bucket",
            self.published.clone(),
        );
        registry.register(
            "cnnf_policy_tables_compiled",
            "Verdict tables compiled (published or unchanged)",
            self.compiled.clone(),
        );
        registry.register(
            "cnnf_policy_tables_invalid",
            "Compiled verdict tables that failed validation and were not published",
            self.invalid.clone(),
        );
        registry.register(
            "cnnf_policy_table_version",
            "Version of the last verdict table published",
            self.version.clone(),
        );
    }
}

/// Hash of a table's content without version and compile time.
pub fn content_hash(table: &VerdictTable) -> u64 {
    let mut plain = table.clone();
    plain.version = 0;
    plain.compiled_unix_nanos = 0;
    let mut hasher = DefaultHasher::new();
    plain.encode_to_vec().hash(&mut hasher);
    hasher.finish()
}

/// The table version: the sum of the three applied sequences.
pub fn version(store: &dyn ProjectionStore) -> Result<u64, cnnf_store::StoreError> {
    let mut sum = 0u64;
    for durable in [POLICY_DURABLE, MODELS_DURABLE, WORKLOADS_DURABLE] {
        sum = sum.saturating_add(applied_sequence(store, durable)?);
    }
    Ok(sum)
}

/// Compiles and publishes tables.
pub struct VerdictWriter {
    js: jetstream::Context,
    bucket: kv::Store,
    store: Arc<dyn ProjectionStore>,
    dirty: Arc<Dirty>,
    cluster: Token,
    metrics: WriterMetrics,
    /// Content hash of what the bucket holds per node, as this writer knows it.
    shown: HashMap<String, u64>,
    /// Signs every table put.
    key: Arc<cnnf_signing::SigningKey>,
}

impl VerdictWriter {
    /// A writer for `cluster`.
    pub fn new(
        js: jetstream::Context,
        bucket: kv::Store,
        store: Arc<dyn ProjectionStore>,
        dirty: Arc<Dirty>,
        cluster: Token,
        metrics: WriterMetrics,
        key: Arc<cnnf_signing::SigningKey>,
    ) -> Self {
        Self {
            js,
            bucket,
            store,
            dirty,
            cluster,
            metrics,
            shown: HashMap::new(),
            key,
        }
    }

    /// Waits until each runner applied everything its consumer had pending
    /// (or the limit passed), then makes the bucket match the store.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if self.caught_up().await.unwrap_or(false) || started.elapsed() > CATCH_UP_LIMIT {
                break;
            }
            self.dirty.wait(IDLE_CHECK).await;
        }
        self.dirty.take();
        self.reconcile().await
    }

    async fn caught_up(&self) -> anyhow::Result<bool> {
        for (stream, durable) in [
            (cnnf_bus::topology::POLICY, POLICY_DURABLE),
            (cnnf_bus::topology::MODELS, MODELS_DURABLE),
            (cnnf_bus::topology::WORKLOADS, WORKLOADS_DURABLE),
        ] {
            let stream = self.js.get_stream(stream).await?;
            let Ok(mut consumer) = stream.get_consumer::<jetstream::consumer::pull::Config>(durable).await else {
                return Ok(false);
            };
            let info = consumer.info().await?;
            let store = Arc::clone(&self.store);
            let applied = tokio::task::spawn_blocking(move || applied_sequence(store.as_ref(), durable)).await??;
            if info.num_pending > 0 || info.num_ack_pending > 0 || applied < info.delivered.stream_sequence {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits for a commit, or for the idle check.
    pub async fn wait(&self) {
        self.dirty.wait(IDLE_CHECK).await;
    }

    /// Recompiles the nodes the committed changes affect.
    pub async fn step(&mut self) -> anyhow::Result<()> {
        let marks = self.dirty.take();
        if marks.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let nodes = tokio::task::spawn_blocking(move || -> Result<BTreeSet<String>, cnnf_store::StoreError> {
            let mut nodes = BTreeSet::new();
            if marks.contains(&Mark::All) {
                nodes.extend(compile::known_nodes(store.as_ref())?);
                return Ok(nodes);
            }
            for mark in marks {
                match mark {
                    Mark::All => {}
                    Mark::Node(node) => {
                        nodes.insert(node);
                    }
                    Mark::Image(image) => nodes.extend(compile::nodes_of(store.as_ref(), &image)?),
                }
            }
            Ok(nodes)
        })
        .await??;
        self.publish(nodes, None).await
    }

    /// Makes the bucket hold the current table of every known node.
    async fn reconcile(&mut self) -> anyhow::Result<()> {
        let store = Arc::clone(&self.store);
        let mut nodes: BTreeSet<String> = tokio::task::spawn_blocking(move || compile::known_nodes(store.as_ref()))
            .await??
            .into_iter()
            .collect();
        let prefix = format!("{}.", self.cluster);
        let mut existing = HashMap::new();
        let mut resigned = 0usize;
        let trusted = [self.key.public_key().clone()];
        let mut keys = self.bucket.keys().await.context("listing the verdict bucket")?;
        while let Some(key) = futures::StreamExt::next(&mut keys).await {
            let key = key.context("listing the verdict bucket")?;
            let Some(node) = key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(value) = self.bucket.get(&key).await.context("reading the verdict bucket")? {
                match cnnf_signing::open(value.as_ref(), &trusted) {
                    Ok(opened) => {
                        if let Ok(table) = VerdictTable::decode(opened.table.as_slice()) {
                            existing.insert(node.to_owned(), content_hash(&table));
                        }
                    }
                    Err(error) => {
                        resigned += 1;
                        tracing::info!(
                            message = "Verdict table in the bucket not signed by this service's key; publishing it again.",
                            key = %key,
                            reason = error.code()
                        );
                    }
                }
            }
            nodes.insert(node.to_owned());
        }
        self.shown = existing;
        let count = nodes.len();
        self.publish(nodes, Some("reconcile")).await?;
        tracing::info!(
            message = "Verdict tables reconciled with the policy.",
            nodes = count,
            not_signed_by_this_key = resigned,
            key_id = %self.key.id()
        );
        Ok(())
    }

    /// Compiles `nodes` and puts each table whose content changed.
    async fn publish(&mut self, nodes: BTreeSet<String>, cause: Option<&'static str>) -> anyhow::Result<()> {
        let store = Arc::clone(&self.store);
        let cluster = self.cluster.as_str().to_owned();
        let now = crate::now();
        let tables = tokio::task::spawn_blocking(move || -> Result<Vec<VerdictTable>, cnnf_store::StoreError> {
            // The version is read before the inputs, so the inputs are at
            // least as new as the version says.
            let version = version(store.as_ref())?;
            let policy_revision = applied_sequence(store.as_ref(), POLICY_DURABLE)?;
            let policy = compile::load_policy(store.as_ref())?;
            let mut tables = Vec::with_capacity(nodes.len());
            for node in nodes {
                let models = compile::node_models(store.as_ref(), &node)?;
                tables.push(compile::compile(
                    &policy,
                    models,
                    Stamp {
                        cluster: cluster.clone(),
                        node,
                        version,
                        policy_revision,
                        compiled_unix_nanos: now,
                    },
                ));
            }
            Ok(tables)
        })
        .await??;
        for table in tables {
            self.metrics.compiled.inc();
            let hash = content_hash(&table);
            if self.shown.get(&table.node) == Some(&hash) {
                continue;
            }
            let Ok(node) = Token::new("node", &table.node) else {
                tracing::warn!(message = "Node name is not a valid key; table not published.", node = %table.node);
                self.metrics.invalid.inc();
                continue;
            };
            if let Err(error) = CompiledTable::build(table.clone()) {
                tracing::error!(message = "Compiled table is invalid; not published.", node = %table.node, %error);
                self.metrics.invalid.inc();
                continue;
            }
            let key = verdict_key(&self.cluster, &node);
            let bytes = self.key.sign_table_bytes(&table.encode_to_vec());
            self.bucket
                .put(&key, bytes.into())
                .await
                .with_context(|| format!("putting the verdict table of {key}"))?;
            self.shown.insert(table.node.clone(), hash);
            self.metrics.published.inc();
            self.metrics
                .version
                .set(i64::try_from(table.version).unwrap_or(i64::MAX));
            tracing::info!(
                message = "Verdict table published.",
                key = %key,
                version = table.version,
                policy_revision = table.policy_revision,
                rules = table.rules.len(),
                models = table.models.len(),
                key_id = %self.key.id(),
                cause = cause.unwrap_or("change")
            );
        }
        Ok(())
    }
}
