//! A static inventory file: the workloads of a node written down in JSON.
//!
//! Used by tests, the demo, and hosts whose workloads are not managed by a
//! container runtime. The file is one object with a `workloads` array:
//!
//! ```json
//! {
//!   "workloads": [
//!     {
//!       "container_id": "web-1",
//!       "container_name": "web",
//!       "image_id": "sha256:4c1e…",
//!       "image_name": "registry.example/web:1.4",
//!       "addresses": ["10.88.0.10", "fd00::10"],
//!       "labels": {"tier": "frontend"},
//!       "namespace": "shop",
//!       "pod": "web-7f9c",
//!       "interface": "veth4c1e"
//!     }
//!   ]
//! }
//! ```
//!
//! `container_id` and `image_id` are required and non-empty; the other
//! fields may be left out. `interface` is the workload's host-side network
//! interface (its veth on this node): the agent then also queues SYNs that
//! arrive on it from addresses not listed, and decides them as unknown. It
//! must be 1 to 15 letters, digits, `_`, `-`, `.` or `@`. `container_id` is unique in the file. Every
//! address must be an IPv4 or IPv6 address; it is kept in canonical form
//! (`FD00::10` becomes `fd00::10`). Unknown fields are rejected, so a typo
//! (`"adresses"`) is an error rather than a workload without addresses.
//!
//! # Watching
//!
//! The file is polled every 200 ms and its whole content compared with the
//! last one acted on. Polling was chosen over inotify (`notify`): editors and
//! configuration tools replace files by writing a temporary file and renaming
//! it over the old one, which ends an inotify watch on the old inode and needs
//! the directory watched and re-armed; a poll of a small file by path sees an
//! atomic replace, an in-place rewrite and a file deleted and re-created the
//! same way, at negligible cost. Comparing content rather than modification
//! time also catches two writes within one timestamp tick. A changed content
//! is applied only once two consecutive polls read the same bytes, so a
//! rewrite caught half-written is not mistaken for a malformed file.
//!
//! A file that cannot be read or parsed at start-up is an error (the agent
//! refuses to start on bad configuration). Later, a malformed or unreadable
//! version is logged with the file and the entry at fault, counted in
//! [`DiscoveryMetrics::inventory_rejected`](crate::DiscoveryMetrics), and
//! ignored: the last good inventory stays in force and no workload is
//! stopped. Deleting the file therefore stops nothing; write
//! `{"workloads": []}` to stop every workload.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cnnf_proto::v1::Workload;
use serde::Deserialize;

use crate::{diff_with, DiscoveryError, Sink};

/// How often the file is read.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The largest inventory file read; a bigger one is rejected.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// An inventory file that cannot be read or is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inventory {}: {location}: {message}", path.display())]
pub struct InventoryError {
    /// The file.
    pub path: PathBuf,
    /// Where in the file: `workloads[2] (container_id "web-1").addresses[0]`,
    /// `document` for the file as a whole.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    workloads: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    container_id: String,
    #[serde(default)]
    container_name: String,
    image_id: String,
    #[serde(default)]
    image_name: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    pod: String,
    #[serde(default)]
    interface: String,
}

/// Longest interface name the kernel accepts.
const MAX_INTERFACE_NAME: usize = 15;

/// Whether `name` is an interface name the agent can put into a rule.
fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

/// Parses an inventory file's content; `path` is only for error messages.
/// Workloads come back in file order with canonical, sorted addresses.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Workload>, InventoryError> {
    let error = |location: String, message: String| InventoryError {
        path: path.to_path_buf(),
        location,
        message,
    };
    let file: File =
        serde_json::from_slice(bytes).map_err(|e| error("document".to_string(), format!("invalid JSON: {e}")))?;
    let mut workloads = Vec::with_capacity(file.workloads.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, value) in file.workloads.into_iter().enumerate() {
        let mut entry_name = format!("workloads[{index}]");
        if let Some(id) = value.get("container_id").and_then(|v| v.as_str()) {
            let id: String = id.chars().take(100).collect();
            entry_name = format!("{entry_name} (container_id {id:?})");
        }
        let entry: Entry = serde_json::from_value(value).map_err(|e| error(entry_name.clone(), e.to_string()))?;
        if entry.container_id.is_empty() {
            return Err(error(format!("{entry_name}.container_id"), "must not be empty".into()));
        }
        if entry.image_id.is_empty() {
            return Err(error(format!("{entry_name}.image_id"), "must not be empty".into()));
        }
        if let Some(first) = seen.insert(entry.container_id.clone(), index) {
            return Err(error(
                entry_name,
                format!("duplicate container_id, already used by workloads[{first}]"),
            ));
        }
        if !entry.interface.is_empty() && !valid_interface(&entry.interface) {
            return Err(error(
                format!("{entry_name}.interface"),
                format!(
                    "{:?} is not an interface name (1 to {MAX_INTERFACE_NAME} letters, digits, '_', '-', '.' or '@')",
                    entry.interface
                ),
            ));
        }
        let mut addresses = Vec::with_capacity(entry.addresses.len());
        for (i, text) in entry.addresses.iter().enumerate() {
            let address = cnnf_core::address::canonical(text)
                .map_err(|e| error(format!("{entry_name}.addresses[{i}]"), e.to_string()))?;
            addresses.push(address);
        }
        addresses.sort();
        addresses.dedup();
        workloads.push(Workload {
            container_id: entry.container_id,
            container_name: entry.container_name,
            image_id: entry.image_id,
            image_name: entry.image_name,
            addresses,
            labels: entry.labels.into_iter().collect(),
            namespace: entry.namespace,
            pod: entry.pod,
            interface: entry.interface,
            cluster: String::new(),
            node: String::new(),
        });
    }
    Ok(workloads)
}

/// Reads the file, refusing one larger than [`MAX_FILE_BYTES`].
async fn read(path: &Path) -> Result<Vec<u8>, InventoryError> {
    let error = |message: String| InventoryError {
        path: path.to_path_buf(),
        location: "document".to_string(),
        message,
    };
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|e| error(format!("cannot read: {e}")))?;
    if metadata.len() > MAX_FILE_BYTES {
        return Err(error(format!(
            "{} bytes, larger than the limit of {MAX_FILE_BYTES}",
            metadata.len()
        )));
    }
    tokio::fs::read(path)
        .await
        .map_err(|e| error(format!("cannot read: {e}")))
}

/// Reads and parses the file.
pub async fn load(path: &Path) -> Result<Vec<Workload>, InventoryError> {
    parse(path, &read(path).await?)
}

pub(crate) async fn watch(path: PathBuf, sink: Sink, shutdown: impl Future<Output = ()>) -> Result<(), DiscoveryError> {
    let mut applied = read(&path).await?;
    let mut current = parse(&path, &applied)?;
    if sink.send(diff_with(&[], &current, removed)).await.is_err() {
        return Ok(());
    }
    // Content read at the previous poll that differs from `applied`: applied
    // once a second poll reads the same.
    let mut candidate: Option<Vec<u8>> = None;
    let mut read_failure: Option<String> = None;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {}
        }
        let bytes = match read(&path).await {
            Ok(bytes) => {
                read_failure = None;
                bytes
            }
            Err(error) => {
                // Report a lasting failure once, not every poll.
                if read_failure.as_deref() != Some(error.message.as_str()) {
                    tracing::warn!(message = "Inventory unreadable; keeping the last good one.", %error);
                    sink.metrics().inventory_rejected.inc();
                    read_failure = Some(error.message);
                }
                continue;
            }
        };
        if bytes == applied {
            candidate = None;
            continue;
        }
        if candidate.as_ref() != Some(&bytes) {
            candidate = Some(bytes);
            continue;
        }
        candidate = None;
        match parse(&path, &bytes) {
            Ok(next) => {
                let changes = diff_with(&current, &next, removed);
                tracing::info!(message = "Inventory reloaded.", path = %path.display(), workloads = next.len(), changes = changes.len());
                current = next;
                applied = bytes;
                if sink.send(changes).await.is_err() {
                    return Ok(());
                }
            }
            Err(error) => {
                tracing::warn!(message = "Inventory rejected; keeping the last good one.", %error);
                sink.metrics().inventory_rejected.inc();
                applied = bytes;
            }
        }
    }
}

fn removed(_: &Workload) -> String {
    "inventory-removed".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<Workload>, InventoryError> {
        parse(Path::new("inv.json"), text.as_bytes())
    }

    #[test]
    fn a_full_entry_parses_with_canonical_addresses() {
        let workloads = parse_str(
            r#"{"workloads":[{"container_id":"c1","container_name":"web","image_id":"sha256:1",
            "image_name":"web:1","addresses":["FD00::1","10.0.0.1","10.0.0.1"],"labels":{"a":"b"},
            "namespace":"ns","pod":"p","interface":"veth1"},{"container_id":"c2","image_id":"sha256:2"}]}"#,
        )
        .unwrap();
        assert_eq!(workloads.len(), 2);
        assert_eq!(workloads[0].addresses, vec!["10.0.0.1", "fd00::1"]);
        assert_eq!(workloads[0].labels.get("a").map(String::as_str), Some("b"));
        assert_eq!(
            (workloads[0].namespace.as_str(), workloads[0].pod.as_str()),
            ("ns", "p")
        );
        assert_eq!(workloads[0].interface, "veth1");
        assert!(workloads[1].addresses.is_empty() && workloads[1].image_name.is_empty());
        assert!(workloads[1].interface.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        for (text, expected) in [
            ("{", "inventory inv.json: document: invalid JSON"),
            (r#"{"workload":[]}"#, "document: invalid JSON: unknown field `workload`"),
            (
                r#"{"workloads":[{"container_id":"a","image_id":"i"},{"container_id":"b"}]}"#,
                r#"workloads[1] (container_id "b"): missing field `image_id`"#,
            ),
            (
                r#"{"workloads":[{"container_id":"a","image_id":""}]}"#,
                r#"workloads[0] (container_id "a").image_id: must not be empty"#,
            ),
            (
                r#"{"workloads":[{"container_id":"a","image_id":"i","addresses":["10.0.0.1","10.0.0.300"]}]}"#,
                r#"workloads[0] (container_id "a").addresses[1]: "10.0.0.300" is not an IPv4 or IPv6 address"#,
            ),
            (
                r#"{"workloads":[{"container_id":"a","image_id":"i"},{"container_id":"a","image_id":"j"}]}"#,
                r#"workloads[1] (container_id "a"): duplicate container_id, already used by workloads[0]"#,
            ),
            (
                r#"{"workloads":[{"container_id":"a","image_id":"i","adresses":[]}]}"#,
                "unknown field `adresses`",
            ),
            (
                r#"{"workloads":[{"image_id":"i"}]}"#,
                "workloads[0]: missing field `container_id`",
            ),
            (r#"{"workloads":[7]}"#, "workloads[0]: invalid type"),
            (
                r#"{"workloads":[{"container_id":"a","image_id":"i","interface":"eth0\n-A X"}]}"#,
                r#"workloads[0] (container_id "a").interface: "eth0\n-A X" is not an interface name"#,
            ),
        ] {
            let error = parse_str(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        for bytes in [&b"\xff\xfe"[..], b"null", b"[]", b"{\"workloads\":null}", b""] {
            assert!(parse(Path::new("x"), bytes).is_err());
        }
    }
}
