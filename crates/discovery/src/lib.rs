//! Workload discovery for the node agent: which containers run on this node,
//! from which image, holding which addresses.
//!
//! The agent needs this to know which identity owns an address, so it
//! publishes a `WorkloadStarted` when a container appears and a
//! `WorkloadStopped` when it goes. This crate produces those changes; the
//! agent fills in cluster and node and publishes them.
//!
//! Three sources, chosen by [`Source`] (parsed from a flag such as
//! `inventory:/etc/cnnf/inventory.json`):
//!
//! - [`inventory`]: a static JSON file, watched for changes (tests, the demo,
//!   and hosts whose workloads are not containers).
//! - [`docker`]: the Docker Engine API on its unix socket, following its
//!   event stream and reconnecting when dockerd restarts.
//! - [`cri`]: a CRI runtime (containerd, CRI-O) over gRPC, polled every
//!   second.
//!
//! Every source works from snapshots of the node's workloads and turns two
//! consecutive snapshots into changes with [`diff`], so a missed event or a
//! reconnect never loses a start or a stop: the next snapshot settles it.
//! Every address goes through [`cnnf_core::address::canonical`], so one
//! address has one spelling in every event.
//!
//! Must never depend on a storage engine, on NATS, or on any service crate:
//! it only reads the container runtime and returns changes.

#![forbid(unsafe_code)]

pub mod cri;
pub mod docker;
pub mod inventory;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use cnnf_proto::v1::Workload;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

pub use inventory::InventoryError;

/// Where the node's workloads come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A static inventory file (JSON, see [`inventory`]), watched for changes.
    Inventory(PathBuf),
    /// The Docker Engine API on a unix socket.
    Docker {
        /// The socket, usually `/var/run/docker.sock`.
        socket: PathBuf,
    },
    /// A CRI runtime (containerd, CRI-O) on a unix socket.
    Cri {
        /// The socket, e.g. `/run/containerd/containerd.sock`.
        socket: PathBuf,
    },
}

/// A `--discovery` flag value that is not `inventory:PATH`, `docker:SOCKET`
/// or `cri:SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid workload source {spec:?}: {reason}")]
pub struct InvalidSource {
    /// The rejected text (cut to 200 characters).
    pub spec: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Source {
    type Err = InvalidSource;

    /// Parses `inventory:PATH`, `docker:SOCKET` or `cri:SOCKET`; a path must
    /// not be empty.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidSource {
            spec: spec.chars().take(200).collect(),
            reason,
        };
        let (kind, path) = spec
            .split_once(':')
            .ok_or_else(|| invalid("expected inventory:PATH, docker:SOCKET or cri:SOCKET"))?;
        if path.is_empty() {
            return Err(invalid("the path after the colon is empty"));
        }
        let path = PathBuf::from(path);
        match kind {
            "inventory" => Ok(Source::Inventory(path)),
            "docker" => Ok(Source::Docker { socket: path }),
            "cri" => Ok(Source::Cri { socket: path }),
            _ => Err(invalid("the kind before the colon must be inventory, docker or cri")),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Inventory(path) => write!(f, "inventory:{}", path.display()),
            Source::Docker { socket } => write!(f, "docker:{}", socket.display()),
            Source::Cri { socket } => write!(f, "cri:{}", socket.display()),
        }
    }
}

/// One change of the node's workloads.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A workload appeared (or is present when discovery starts).
    Started(Workload),
    /// A workload went away; `workload` is the one last reported started.
    Stopped {
        /// The workload as it was started.
        workload: Workload,
        /// Why: `exited`, `killed`, `deleted`, `inventory-removed`,
        /// `changed` (it comes back at once with new image or addresses), ...
        reason: String,
    },
}

/// Why discovery could not run.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The inventory file could not be read or is malformed at start-up
    /// (later errors keep the last good inventory instead).
    #[error(transparent)]
    Inventory(#[from] InventoryError),
}

/// Counters of workload discovery. Clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct DiscoveryMetrics {
    /// Inventory file versions rejected (unreadable or malformed); the last
    /// good inventory stayed in force.
    pub inventory_rejected: Counter,
    /// Snapshots of the container runtime that failed (Docker or CRI).
    pub snapshot_errors: Counter,
    /// Connections to the container runtime lost or refused.
    pub reconnects: Counter,
    /// Changes emitted (started and stopped).
    pub changes: Counter,
}

impl DiscoveryMetrics {
    /// Registers the counters under `prefix` (e.g. `cnnf_agent_discovery`).
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_inventory_rejected"),
            "Inventory file versions rejected (unreadable or malformed); the last good inventory stayed in force",
            self.inventory_rejected.clone(),
        );
        registry.register(
            format!("{prefix}_snapshot_errors"),
            "Snapshots of the container runtime that failed",
            self.snapshot_errors.clone(),
        );
        registry.register(
            format!("{prefix}_reconnects"),
            "Connections to the container runtime lost or refused",
            self.reconnects.clone(),
        );
        registry.register(
            format!("{prefix}_changes"),
            "Workload changes emitted (started and stopped)",
            self.changes.clone(),
        );
    }
}

/// Emits `Started` for every workload present at start, then changes as they
/// happen, until `shutdown` completes or the receiver of `changes` is gone.
///
/// Fails only when an inventory file is unreadable or malformed at start;
/// the Docker and CRI sources keep retrying an unreachable runtime (with
/// backoff, counted and logged) until shutdown, so the agent may start
/// before the runtime does.
pub async fn watch(
    source: Source,
    changes: mpsc::Sender<Change>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DiscoveryError> {
    watch_with_metrics(source, changes, shutdown, DiscoveryMetrics::default()).await
}

/// [`watch`], counting into `metrics`.
pub async fn watch_with_metrics(
    source: Source,
    changes: mpsc::Sender<Change>,
    shutdown: impl Future<Output = ()>,
    metrics: DiscoveryMetrics,
) -> Result<(), DiscoveryError> {
    let sink = Sink { changes, metrics };
    tracing::info!(message = "Workload discovery started.", source = %source);
    match source {
        Source::Inventory(path) => inventory::watch(path, sink, shutdown).await,
        Source::Docker { socket } => {
            docker::watch(socket, sink, shutdown).await;
            Ok(())
        }
        Source::Cri { socket } => {
            cri::watch(socket, sink, shutdown).await;
            Ok(())
        }
    }
}

/// Where a source sends its changes.
pub(crate) struct Sink {
    changes: mpsc::Sender<Change>,
    metrics: DiscoveryMetrics,
}

/// The receiver of changes is gone: discovery has no one to tell.
pub(crate) struct Closed;

impl Sink {
    /// Sends `changes` in order.
    pub(crate) async fn send(&self, changes: Vec<Change>) -> Result<(), Closed> {
        for change in changes {
            match &change {
                Change::Started(w) => {
                    tracing::info!(message = "Workload started.", container_id = %w.container_id, image_id = %w.image_id, addresses = ?w.addresses)
                }
                Change::Stopped { workload: w, reason } => {
                    tracing::info!(message = "Workload stopped.", container_id = %w.container_id, %reason)
                }
            }
            self.metrics.changes.inc();
            self.changes.send(change).await.map_err(|_| Closed)?;
        }
        Ok(())
    }

    pub(crate) fn metrics(&self) -> &DiscoveryMetrics {
        &self.metrics
    }
}

/// The changes that turn `previous` into `current`, keyed by container ID:
/// a workload only in `previous` is `Stopped` (reason `removed`), one only
/// in `current` is `Started`, and one whose image, addresses, name, labels,
/// namespace or pod differ is `Stopped` (reason `changed`) and `Started`
/// again. All stops come before all starts, so an address that moved from
/// one container to another is released before it is claimed. Output is
/// ordered by container ID within stops and within starts.
pub fn diff(previous: &[Workload], current: &[Workload]) -> Vec<Change> {
    diff_with(previous, current, |_| "removed".to_string())
}

/// [`diff`] with the reason of a removal chosen by the source.
pub(crate) fn diff_with(
    previous: &[Workload],
    current: &[Workload],
    mut removed_reason: impl FnMut(&Workload) -> String,
) -> Vec<Change> {
    let before: BTreeMap<&str, &Workload> = previous.iter().map(|w| (w.container_id.as_str(), w)).collect();
    let after: BTreeMap<&str, &Workload> = current.iter().map(|w| (w.container_id.as_str(), w)).collect();
    let mut stops = Vec::new();
    let mut starts = Vec::new();
    for (id, old) in &before {
        match after.get(id) {
            None => stops.push(Change::Stopped {
                workload: (*old).clone(),
                reason: removed_reason(old),
            }),
            Some(new) if !same_workload(old, new) => {
                stops.push(Change::Stopped {
                    workload: (*old).clone(),
                    reason: "changed".to_string(),
                });
                starts.push(Change::Started((*new).clone()));
            }
            Some(_) => {}
        }
    }
    for (id, new) in &after {
        if !before.contains_key(id) {
            starts.push(Change::Started((*new).clone()));
        }
    }
    stops.extend(starts);
    stops
}

/// Equal as far as discovery is concerned: addresses as sets (sources keep
/// them sorted, but a reordering must not restart a workload).
fn same_workload(a: &Workload, b: &Workload) -> bool {
    let mut a_addresses = a.addresses.clone();
    let mut b_addresses = b.addresses.clone();
    a_addresses.sort();
    b_addresses.sort();
    a.image_id == b.image_id
        && a.image_name == b.image_name
        && a_addresses == b_addresses
        && a.container_name == b.container_name
        && a.labels == b.labels
        && a.namespace == b.namespace
        && a.pod == b.pod
        && a.cluster == b.cluster
        && a.node == b.node
}

/// Canonical, sorted, deduplicated addresses from a runtime's report; text
/// that is not an address is logged and left out (a runtime's odd answer
/// must not hide the container).
pub(crate) fn runtime_addresses<'a>(container_id: &str, texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut addresses: Vec<String> = texts
        .into_iter()
        .filter(|t| !t.is_empty())
        .filter_map(|t| match cnnf_core::address::canonical(t) {
            Ok(a) => Some(a),
            Err(error) => {
                tracing::warn!(message = "Runtime reported an invalid address; left out.", container_id, %error);
                None
            }
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Kubernetes labels that container runtimes put on a pod's containers.
pub(crate) const K8S_POD_NAME: &str = "io.kubernetes.pod.name";
/// See [`K8S_POD_NAME`].
pub(crate) const K8S_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";

/// Labels as the event's map.
pub(crate) fn labels_map(labels: impl IntoIterator<Item = (String, String)>) -> HashMap<String, String> {
    labels.into_iter().collect()
}

/// Exponential backoff for reconnecting to a runtime: 100 ms doubling to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    pub(crate) fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt; doubles every call.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// After a success, start again from the first delay.
    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(id: &str, image: &str, addresses: &[&str]) -> Workload {
        Workload {
            container_id: id.into(),
            image_id: image.into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn diff_reports_starts_stops_and_replacements() {
        let a = workload("a", "sha256:1", &["10.0.0.1"]);
        let b = workload("b", "sha256:2", &["10.0.0.2"]);
        let c = workload("c", "sha256:3", &["10.0.0.3"]);
        let b_new_image = workload("b", "sha256:9", &["10.0.0.2"]);
        let a_new_address = workload("a", "sha256:1", &["10.0.0.3"]);

        assert_eq!(diff(&[], &[]), vec![]);
        assert_eq!(
            diff(&[], &[b.clone(), a.clone()]),
            vec![Change::Started(a.clone()), Change::Started(b.clone())]
        );
        assert_eq!(diff(&[a.clone(), b.clone()], &[b.clone(), a.clone()]), vec![]);
        assert_eq!(
            diff(&[a.clone(), b.clone()], &[b.clone(), c.clone()]),
            vec![
                Change::Stopped {
                    workload: a.clone(),
                    reason: "removed".into()
                },
                Change::Started(c.clone())
            ]
        );
        assert_eq!(
            diff(&[a.clone(), b.clone()], &[a.clone(), b_new_image.clone()]),
            vec![
                Change::Stopped {
                    workload: b.clone(),
                    reason: "changed".into()
                },
                Change::Started(b_new_image)
            ]
        );
        // An address moving from c to a: c's release comes before a's claim.
        assert_eq!(
            diff(&[a.clone(), c.clone()], std::slice::from_ref(&a_new_address)),
            vec![
                Change::Stopped {
                    workload: a.clone(),
                    reason: "changed".into()
                },
                Change::Stopped {
                    workload: c.clone(),
                    reason: "removed".into()
                },
                Change::Started(a_new_address)
            ]
        );
    }

    #[test]
    fn diff_ignores_address_order_but_not_labels() {
        let a = workload("a", "sha256:1", &["10.0.0.1", "fd00::1"]);
        let reordered = workload("a", "sha256:1", &["fd00::1", "10.0.0.1"]);
        assert_eq!(diff(std::slice::from_ref(&a), &[reordered]), vec![]);
        let mut relabelled = a.clone();
        relabelled.labels.insert("tier".into(), "web".into());
        assert_eq!(
            diff(std::slice::from_ref(&a), std::slice::from_ref(&relabelled)).len(),
            2
        );
        // Applying a diff's changes to `previous` yields `current`.
        let mut state: BTreeMap<String, Workload> =
            [a.clone()].into_iter().map(|w| (w.container_id.clone(), w)).collect();
        for change in diff(&[a], &[relabelled.clone()]) {
            match change {
                Change::Started(w) => assert!(state.insert(w.container_id.clone(), w).is_none()),
                Change::Stopped { workload, .. } => assert!(state.remove(&workload.container_id).is_some()),
            }
        }
        assert_eq!(state.into_values().collect::<Vec<_>>(), vec![relabelled]);
    }

    #[test]
    fn sources_parse_from_flags() {
        assert_eq!(
            "inventory:/etc/cnnf/inventory.json".parse::<Source>().unwrap(),
            Source::Inventory("/etc/cnnf/inventory.json".into())
        );
        assert_eq!(
            "docker:/var/run/docker.sock".parse::<Source>().unwrap(),
            Source::Docker {
                socket: "/var/run/docker.sock".into()
            }
        );
        assert_eq!(
            "cri:/run/containerd/containerd.sock".parse::<Source>().unwrap(),
            Source::Cri {
                socket: "/run/containerd/containerd.sock".into()
            }
        );
        for source in ["inventory:a.json", "docker:/d.sock", "cri:/c.sock"] {
            assert_eq!(source.parse::<Source>().unwrap().to_string(), source);
        }
        for (bad, what) in [
            ("", "expected"),
            ("/var/run/docker.sock", "expected"),
            ("docker:", "empty"),
            ("podman:/run/podman.sock", "must be inventory, docker or cri"),
        ] {
            let error = bad.parse::<Source>().unwrap_err();
            assert!(error.to_string().contains(what), "{bad:?}: {error}");
        }
    }

    #[test]
    fn runtime_addresses_are_canonical_sorted_and_valid() {
        assert_eq!(
            runtime_addresses("c", ["FD00::1", "", "10.0.0.2", "bogus", "::ffff:10.0.0.2", "10.0.0.1"]),
            vec!["10.0.0.1", "10.0.0.2", "fd00::1"]
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[7], Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }
}
