//! The verdict table the agent enforces: one pointer, swapped atomically.
//!
//! Verdict threads read the table on every SYN without a lock
//! ([`Tables::current`] is one atomic load); a new table is compiled off
//! the hot path and swapped in with one pointer store, so a SYN is decided
//! either wholly by the old table or wholly by the new one.
//!
//! Where tables come from, in order:
//! 1. At start, the file the agent persisted last (`verdict-table.pb` in the
//!    state directory). An agent restarted while NATS is unreachable
//!    enforces what it enforced before.
//! 2. With no file (a fresh node), [`CompiledTable::empty`]: every mode
//!    disabled, which observes and learns everything and drops nothing.
//!    This is the documented safe default: a node that has never heard
//!    from the policy service must not cut its workloads off.
//! 3. Then every value of the node's key in KV `cnnf-verdicts`
//!    ([`watch`]): decoded, checked, compiled, swapped, persisted (temporary
//!    file, fsync, rename, fsync of the directory, so a crash leaves the old
//!    file or the new one, never a torn one).
//!
//! A table older than the one in force is ignored (KV redelivers the
//! current value after a reconnect, and a restarted agent sees again the
//! value it already persisted); a table that does not decode or compile,
//! or that names another cluster or node, is rejected and counted, and the
//! previous table stays in force.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_nats::jetstream::{self, kv};
use cnnf_core::eval::{CompiledTable, Identity, TableError};
use cnnf_core::proto::VerdictTable;
use cnnf_core::subjects::Token;
use futures::StreamExt;
use prost::Message as _;

use crate::identities::Peer;
use crate::metrics::Metrics;

/// Name of the persisted table inside the state directory.
pub const TABLE_FILE: &str = "verdict-table.pb";

/// A compiled table plus what the hot path derives from it once.
#[derive(Debug)]
pub struct ActiveTable {
    /// The compiled table.
    pub compiled: CompiledTable,
    /// One shared identity per network object, so resolving an address to
    /// an object allocates nothing.
    objects: HashMap<String, Arc<Peer>>,
}

impl ActiveTable {
    /// Wraps a compiled table.
    pub fn new(compiled: CompiledTable) -> Self {
        let objects = compiled
            .table()
            .objects
            .iter()
            .map(|object| {
                (
                    object.name.clone(),
                    Arc::new(Peer::bare(Identity::Object {
                        name: object.name.clone(),
                    })),
                )
            })
            .collect();
        Self { compiled, objects }
    }

    /// The network object `address` belongs to (longest prefix), if any.
    pub fn object_of(&self, address: std::net::IpAddr) -> Option<Arc<Peer>> {
        let name = self.compiled.resolve_object(address)?;
        self.objects.get(name).cloned()
    }

    /// The table's version.
    pub fn version(&self) -> u64 {
        self.compiled.version()
    }
}

/// Why a table was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RejectReason {
    /// The bytes are not a `VerdictTable`.
    #[error("not a verdict table: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The table does not compile.
    #[error("table does not compile: {0}")]
    Compile(#[from] TableError),
    /// The table is for another cluster or node.
    #[error("table is for cluster {cluster:?} node {node:?}")]
    WrongNode {
        /// Cluster the table names.
        cluster: String,
        /// Node the table names.
        node: String,
    },
}

impl RejectReason {
    /// Short code for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::Decode(_) => "decode",
            RejectReason::Compile(_) => "compile",
            RejectReason::WrongNode { .. } => "wrong-node",
        }
    }
}

/// What became of an offered table.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Swapped in (and persisted, unless persisting failed: see logs).
    Applied {
        /// The new version.
        version: u64,
    },
    /// Not newer than the table in force: ignored.
    Stale {
        /// The offered version.
        offered: u64,
        /// The version in force.
        current: u64,
    },
}

/// The table in force, shared by the verdict threads and the watcher.
#[derive(Debug)]
pub struct Tables {
    current: ArcSwap<ActiveTable>,
    /// True while the safe default is in force (no table ever taken).
    defaulted: AtomicBool,
    path: PathBuf,
    cluster: String,
    node: String,
    metrics: Metrics,
}

impl Tables {
    /// Loads the persisted table from `state_dir`, or the safe default when
    /// there is none or it cannot be read (logged and counted).
    pub fn load(state_dir: &Path, cluster: &Token, node: &Token, metrics: Metrics) -> Self {
        let path = state_dir.join(TABLE_FILE);
        let tables = Self {
            current: ArcSwap::from_pointee(ActiveTable::new(CompiledTable::empty())),
            defaulted: AtomicBool::new(true),
            path,
            cluster: cluster.to_string(),
            node: node.to_string(),
            metrics,
        };
        match fs::read(&tables.path) {
            Ok(bytes) => match tables.check(&bytes) {
                Ok(compiled) => {
                    tracing::info!(
                        message = "Enforcing the persisted verdict table.",
                        version = compiled.version(),
                        path = %tables.path.display()
                    );
                    tables.swap(compiled);
                }
                Err(error) => {
                    tables.metrics.table_rejected(error.code());
                    tracing::error!(
                        message = "Persisted verdict table unusable; enforcing the safe default until a table arrives.",
                        path = %tables.path.display(),
                        %error
                    );
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(
                    message =
                        "No persisted verdict table; enforcing the safe default (mode disabled) until a table arrives."
                );
            }
            Err(error) => {
                tracing::error!(
                    message = "Cannot read the persisted verdict table; enforcing the safe default until a table arrives.",
                    path = %tables.path.display(),
                    %error
                );
            }
        }
        tables.metrics.table_version.set(tables.version() as i64);
        tables
    }

    /// The table in force (one atomic load).
    pub fn current(&self) -> arc_swap::Guard<Arc<ActiveTable>> {
        self.current.load()
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.current.load().version()
    }

    /// Where the table is persisted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, bytes: &[u8]) -> Result<CompiledTable, RejectReason> {
        let table = VerdictTable::decode(bytes)?;
        let cluster_ok = table.cluster.is_empty() || table.cluster == self.cluster;
        let node_ok = table.node.is_empty() || table.node == self.node;
        if !cluster_ok || !node_ok {
            return Err(RejectReason::WrongNode {
                cluster: table.cluster,
                node: table.node,
            });
        }
        Ok(CompiledTable::build(table)?)
    }

    fn swap(&self, compiled: CompiledTable) {
        let version = compiled.version();
        self.current.store(Arc::new(ActiveTable::new(compiled)));
        self.defaulted.store(false, Ordering::SeqCst);
        self.metrics.table_version.set(version as i64);
    }

    /// Offers a table as published (protobuf bytes): swapped in and
    /// persisted when newer than the one in force.
    pub fn offer(&self, bytes: &[u8]) -> Result<Offer, RejectReason> {
        let compiled = match self.check(bytes) {
            Ok(compiled) => compiled,
            Err(error) => {
                self.metrics.table_rejected(error.code());
                return Err(error);
            }
        };
        let current = self.version();
        let offered = compiled.version();
        // An equal version is the same table again (a redelivery), unless
        // only the safe default is in force.
        if offered < current || (offered == current && !self.defaulted.load(Ordering::SeqCst)) {
            return Ok(Offer::Stale { offered, current });
        }
        self.swap(compiled);
        if let Err(error) = persist(&self.path, bytes) {
            self.metrics.table_persist_failures.inc();
            tracing::error!(
                message = "Verdict table enforced but not persisted; a restart would fall back to the previous file.",
                path = %self.path.display(),
                %error
            );
        }
        Ok(Offer::Applied { version: offered })
    }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename,
/// fsync of the directory.
pub fn persist(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let temporary = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Follows the node's key in KV `cnnf-verdicts` and offers every value to
/// `tables`, until `stop` turns true. Reconnects (with back-off) whenever
/// the watch fails; the current value is redelivered then and ignored as
/// stale when already in force. The watch consumers are named
/// `<consumer>_<attempt>` (see `cnnf_bus::kv`: a node's credentials allow
/// a consumer on its own key only, named in the request subject).
pub async fn watch(
    js: jetstream::Context,
    key: String,
    consumer: String,
    tables: Arc<Tables>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let name = format!("{consumer}_{attempts}");
        let attempt = async {
            let mut entries = cnnf_bus::kv::watch(&js, cnnf_bus::topology::VERDICTS_BUCKET, &key, &name).await?;
            tracing::info!(message = "Following the verdict table.", key = %key);
            while let Some(entry) = entries.next().await {
                let entry = entry?;
                if entry.operation != kv::Operation::Put {
                    // A deleted table changes nothing: the agent keeps the
                    // last table it was given.
                    tracing::warn!(message = "Verdict table deleted in KV; keeping the one in force.", key = %key);
                    continue;
                }
                match tables.offer(&entry.value) {
                    Ok(Offer::Applied { version }) => {
                        tracing::info!(
                            message = "Verdict table swapped in.",
                            version,
                            revision = entry.revision
                        );
                    }
                    Ok(Offer::Stale { offered, current }) => {
                        tracing::debug!(message = "Verdict table not newer; ignored.", offered, current);
                    }
                    Err(error) => {
                        tracing::error!(
                            message = "Verdict table rejected; keeping the one in force.",
                            revision = entry.revision,
                            %error
                        );
                    }
                }
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            outcome = attempt => {
                match outcome {
                    Ok(()) => tracing::warn!(message = "Verdict table watch ended; watching again."),
                    Err(error) => tracing::warn!(message = "Verdict table watch failed; retrying.", error = %format!("{error:#}")),
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnf_core::proto::{self, Mode};

    fn token(value: &str) -> Token {
        Token::new("test", value).unwrap()
    }

    fn table(version: u64, mode: Mode) -> Vec<u8> {
        VerdictTable {
            version,
            cluster: "prod".into(),
            node: "n1".into(),
            mode: mode as i32,
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn newer_tables_swap_in_persist_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tables = Tables::load(dir.path(), &token("prod"), &token("n1"), Metrics::default());
        assert_eq!(tables.version(), 0);
        assert_eq!(
            tables.offer(&table(3, Mode::Prevent)).unwrap(),
            Offer::Applied { version: 3 }
        );
        assert_eq!(
            tables.offer(&table(2, Mode::Alert)).unwrap(),
            Offer::Stale { offered: 2, current: 3 }
        );
        assert_eq!(
            tables.offer(&table(3, Mode::Alert)).unwrap(),
            Offer::Stale { offered: 3, current: 3 }
        );
        assert!(matches!(tables.offer(b"\xff\xff\xff"), Err(RejectReason::Decode(_))));
        let other = VerdictTable {
            version: 9,
            cluster: "prod".into(),
            node: "n2".into(),
            ..Default::default()
        };
        assert!(matches!(
            tables.offer(&other.encode_to_vec()),
            Err(RejectReason::WrongNode { .. })
        ));
        let bad = VerdictTable {
            version: 9,
            objects: vec![proto::NetworkObject {
                name: "gw".into(),
                kind: proto::network_object::Kind::Subnet as i32,
                cidrs: vec!["10.0.0.0/99".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(matches!(
            tables.offer(&bad.encode_to_vec()),
            Err(RejectReason::Compile(_))
        ));
        assert_eq!(tables.version(), 3);

        let restarted = Tables::load(dir.path(), &token("prod"), &token("n1"), Metrics::default());
        assert_eq!(restarted.version(), 3);
        assert_eq!(restarted.current().compiled.table().mode, Mode::Prevent as i32);
    }

    #[test]
    fn a_corrupt_file_falls_back_to_the_safe_default() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TABLE_FILE), b"\x0a\xff\xff\xff\xff").unwrap();
        let metrics = Metrics::default();
        let tables = Tables::load(dir.path(), &token("prod"), &token("n1"), metrics.clone());
        assert_eq!(tables.version(), 0);
        assert_eq!(tables.current().compiled.table().mode, 0);
        assert_eq!(metrics.table_rejects_total(), 1);
    }
}
