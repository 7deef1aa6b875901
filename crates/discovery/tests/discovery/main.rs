//! Workload discovery against its real sources: inventory files on disk, a
//! real dockerd (when one can run), and a stand-in CRI runtime serving the
//! CRI gRPC API on a unix socket.

mod cri;
mod docker;
mod inventory;

use std::time::Duration;

use cnnf_discovery::Change;
use tokio::sync::mpsc;

/// Guards against a hang only; no test depends on how fast a change comes.
const PATIENCE: Duration = Duration::from_secs(60);

/// The next change, failing the test if none comes.
async fn next_change(changes: &mut mpsc::Receiver<Change>) -> Change {
    tokio::time::timeout(PATIENCE, changes.recv())
        .await
        .expect("no change arrived")
        .expect("discovery ended")
}

/// The container ID of a change, for messages.
fn started_id(change: &Change) -> &str {
    match change {
        Change::Started(w) => &w.container_id,
        Change::Stopped { workload, .. } => panic!("expected a start, got the stop of {}", workload.container_id),
    }
}

/// Waits until `condition` holds, polling.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
