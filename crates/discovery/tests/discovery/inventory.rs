//! The inventory file source, on real files in a temporary directory.

use std::path::{Path, PathBuf};

use cnnf_discovery::{watch, watch_with_metrics, Change, DiscoveryError, DiscoveryMetrics, Source};
use cnnf_proto::v1::Workload;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{eventually, next_change};

/// Writes a temporary file beside `path` and renames it over `path`, as
/// editors and configuration tools do.
fn write_atomic(path: &Path, text: &str) {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// Truncates and rewrites `path` in place (same inode).
fn write_in_place(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn entry(id: &str, image: &str, addresses: &[&str]) -> String {
    let addresses: Vec<String> = addresses.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"container_id":"{id}","container_name":"{id}-name","image_id":"{image}","image_name":"img/{id}:1",
           "addresses":[{}],"labels":{{"app":"{id}"}},"namespace":"ns","pod":"{id}-pod"}}"#,
        addresses.join(",")
    )
}

fn inventory(entries: &[String]) -> String {
    format!(r#"{{"workloads":[{}]}}"#, entries.join(",\n"))
}

struct Running {
    changes: mpsc::Receiver<Change>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), DiscoveryError>>,
    metrics: DiscoveryMetrics,
}

impl Running {
    fn start(path: PathBuf) -> Self {
        let (tx, changes) = mpsc::channel(64);
        let (stop, stopped) = oneshot::channel::<()>();
        let metrics = DiscoveryMetrics::default();
        let task = tokio::spawn(watch_with_metrics(
            Source::Inventory(path),
            tx,
            async move {
                let _ = stopped.await;
            },
            metrics.clone(),
        ));
        Running {
            changes,
            stop: Some(stop),
            task,
            metrics,
        }
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
        // Nothing was emitted that the test did not expect.
        assert!(self.changes.recv().await.is_none(), "an unexpected change was left");
    }
}

fn stopped(change: Change) -> (Workload, String) {
    match change {
        Change::Stopped { workload, reason } => (workload, reason),
        Change::Started(w) => panic!("expected a stop, got the start of {}", w.container_id),
    }
}

fn started(change: Change) -> Workload {
    match change {
        Change::Started(w) => w,
        Change::Stopped { workload, .. } => panic!("expected a start, got the stop of {}", workload.container_id),
    }
}

#[tokio::test]
async fn inventory_start_add_remove_change_and_atomic_replace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.json");
    write_in_place(
        &path,
        &inventory(&[
            entry("b", "sha256:bbb", &["10.0.0.2"]),
            entry("a", "sha256:aaa", &["10.0.0.1", "FD00::1"]),
        ]),
    );
    let mut run = Running::start(path.clone());

    // Start: every workload present, in container ID order, canonical
    // addresses, cluster and node left to the agent.
    let a = started(next_change(&mut run.changes).await);
    let b = started(next_change(&mut run.changes).await);
    assert_eq!(a.container_id, "a");
    assert_eq!(a.addresses, vec!["10.0.0.1", "fd00::1"]);
    assert_eq!(a.image_id, "sha256:aaa");
    assert_eq!(a.image_name, "img/a:1");
    assert_eq!(a.container_name, "a-name");
    assert_eq!(a.labels.get("app").map(String::as_str), Some("a"));
    assert_eq!((a.namespace.as_str(), a.pod.as_str()), ("ns", "a-pod"));
    assert!(a.cluster.is_empty() && a.node.is_empty());
    assert_eq!(b.container_id, "b");

    // Add, by atomic replace.
    write_atomic(
        &path,
        &inventory(&[
            entry("a", "sha256:aaa", &["10.0.0.1", "fd00::1"]),
            entry("b", "sha256:bbb", &["10.0.0.2"]),
            entry("c", "sha256:ccc", &["10.0.0.3"]),
        ]),
    );
    assert_eq!(started(next_change(&mut run.changes).await).container_id, "c");

    // Remove, by in-place rewrite.
    write_in_place(
        &path,
        &inventory(&[
            entry("b", "sha256:bbb", &["10.0.0.2"]),
            entry("c", "sha256:ccc", &["10.0.0.3"]),
        ]),
    );
    let (gone, reason) = stopped(next_change(&mut run.changes).await);
    assert_eq!(
        (gone.container_id.as_str(), reason.as_str()),
        ("a", "inventory-removed")
    );
    assert_eq!(gone, a, "a stop carries the workload as it was started");

    // Change: b gets a new image, c a new address; each is stopped and
    // started again, stops first.
    write_atomic(
        &path,
        &inventory(&[
            entry("b", "sha256:b2", &["10.0.0.2"]),
            entry("c", "sha256:ccc", &["10.0.0.4"]),
        ]),
    );
    let (old_b, reason_b) = stopped(next_change(&mut run.changes).await);
    let (old_c, reason_c) = stopped(next_change(&mut run.changes).await);
    assert_eq!((old_b.image_id.as_str(), reason_b.as_str()), ("sha256:bbb", "changed"));
    assert_eq!(
        (old_c.addresses.as_slice(), reason_c.as_str()),
        (&["10.0.0.3".to_string()][..], "changed")
    );
    assert_eq!(started(next_change(&mut run.changes).await).image_id, "sha256:b2");
    assert_eq!(started(next_change(&mut run.changes).await).addresses, vec!["10.0.0.4"]);

    // Same content rewritten, and only reformatted: no change.
    write_in_place(
        &path,
        &inventory(&[
            entry("c", "sha256:ccc", &["10.0.0.4"]),
            entry("b", "sha256:b2", &["10.0.0.2"]),
        ]),
    );
    // Then a real change; it must be the very next thing received.
    write_atomic(&path, &inventory(&[entry("c", "sha256:ccc", &["10.0.0.4"])]));
    let (gone, reason) = stopped(next_change(&mut run.changes).await);
    assert_eq!(
        (gone.container_id.as_str(), reason.as_str()),
        ("b", "inventory-removed")
    );
    assert_eq!(run.metrics.inventory_rejected.get(), 0);
    assert_eq!(run.metrics.changes.get(), 9);

    run.shutdown().await;
}

#[tokio::test]
async fn malformed_inventory_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.json");
    let good = inventory(&[
        entry("a", "sha256:aaa", &["10.0.0.1"]),
        entry("b", "sha256:bbb", &["10.0.0.2"]),
    ]);
    write_atomic(&path, &good);
    let mut run = Running::start(path.clone());
    started(next_change(&mut run.changes).await);
    started(next_change(&mut run.changes).await);

    let malformed = [
        // Bad JSON (and a truncated write).
        (good[..good.len() / 2].to_string(), "document: invalid JSON".to_string()),
        // Missing image_id.
        (
            r#"{"workloads":[{"container_id":"a","image_id":"sha256:aaa"},{"container_id":"b"}]}"#.to_string(),
            r#"workloads[1] (container_id "b"): missing field `image_id`"#.to_string(),
        ),
        // Bad address.
        (
            inventory(&[
                entry("a", "sha256:aaa", &["10.0.0.1"]),
                entry("b", "sha256:bbb", &["10.0.0.999"]),
            ]),
            r#"workloads[1] (container_id "b").addresses[0]: "10.0.0.999" is not an IPv4 or IPv6 address"#.to_string(),
        ),
        // Duplicate container ID.
        (
            inventory(&[
                entry("a", "sha256:aaa", &["10.0.0.1"]),
                entry("a", "sha256:bbb", &["10.0.0.2"]),
            ]),
            r#"workloads[1] (container_id "a"): duplicate container_id, already used by workloads[0]"#.to_string(),
        ),
    ];
    for (count, (text, expected)) in malformed.iter().enumerate() {
        write_atomic(&path, text);
        let rejected = count as u64 + 1;
        eventually("the malformed inventory is rejected", || {
            run.metrics.inventory_rejected.get() == rejected
        })
        .await;
        // The error the watcher logged and counted names the file and entry.
        let error = cnnf_discovery::inventory::load(&path).await.unwrap_err().to_string();
        assert!(error.starts_with(&format!("inventory {}: ", path.display())), "{error}");
        assert!(error.contains(expected.as_str()), "{error}");
    }

    // The file deleted: counted once, nothing stopped.
    std::fs::remove_file(&path).unwrap();
    eventually("the missing inventory is reported", || {
        run.metrics.inventory_rejected.get() == 5
    })
    .await;

    // A good version again: only its real difference to the last good one
    // (c added) comes out, so nothing was stopped in between.
    write_atomic(
        &path,
        &inventory(&[
            entry("a", "sha256:aaa", &["10.0.0.1"]),
            entry("b", "sha256:bbb", &["10.0.0.2"]),
            entry("c", "sha256:ccc", &["10.0.0.3"]),
        ]),
    );
    assert_eq!(started(next_change(&mut run.changes).await).container_id, "c");
    assert_eq!(run.metrics.inventory_rejected.get(), 5);
    run.shutdown().await;
}

#[tokio::test]
async fn a_bad_inventory_at_start_is_an_error_naming_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.json");
    write_atomic(
        &path,
        r#"{"workloads":[{"container_id":"a","image_id":"sha256:a"},{"container_id":"b","image_id":""}]}"#,
    );
    let (tx, mut rx) = mpsc::channel(8);
    let error = watch(Source::Inventory(path.clone()), tx, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        error,
        format!(
            r#"inventory {}: workloads[1] (container_id "b").image_id: must not be empty"#,
            path.display()
        )
    );
    assert!(
        rx.recv().await.is_none(),
        "nothing is emitted from a rejected inventory"
    );

    let (tx, _rx) = mpsc::channel(8);
    let missing = dir.path().join("missing.json");
    let error = watch(Source::Inventory(missing), tx, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("missing.json: document: cannot read"), "{error}");
}

#[tokio::test]
async fn the_example_inventory_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/inventory.example.json");
    let workloads = cnnf_discovery::inventory::load(&path).await.unwrap();
    assert!(!workloads.is_empty());
    assert!(workloads.iter().all(|w| !w.image_id.is_empty()));
}
