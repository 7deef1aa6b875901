//! The node's workloads: what discovery reports, turned into the local
//! identity map, the addresses and host-side interfaces the iptables chains
//! queue, and `WorkloadStarted` / `WorkloadStopped` events.
//!
//! Order matters on a start: the identity map learns the new addresses
//! before the chains start queueing them, so no SYN of a new workload is
//! decided as unknown. On a stop the chains stop queueing first and the
//! identity goes after.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use cnnf_core::proto::{envelope::Payload, Workload, WorkloadStarted, WorkloadStopped};
use cnnf_discovery::Change;
use tokio::sync::mpsc;

use crate::events::Events;
use crate::identities::{Identities, Peer};
use crate::interfaces::InterfaceAddresses;
use crate::metrics::Metrics;

/// Where the set of workload addresses and the workloads' host-side
/// interfaces (each with its workload's addresses) go (the iptables chains
/// and the engine's interface map); called with the whole sets after every
/// change. Errors are logged and counted, and the next change tries again
/// with the then-current sets.
pub type AddressSink = Box<dyn FnMut(&BTreeSet<IpAddr>, &InterfaceAddresses) -> anyhow::Result<()> + Send>;

/// The workloads this node runs now, by container ID.
#[derive(Debug, Default)]
pub struct LocalWorkloads {
    by_container: BTreeMap<String, Workload>,
}

impl LocalWorkloads {
    /// Applies one change.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Started(workload) => {
                self.by_container
                    .insert(workload.container_id.clone(), workload.clone());
            }
            Change::Stopped { workload, .. } => {
                self.by_container.remove(&workload.container_id);
            }
        }
    }

    /// Every address of every workload.
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.by_container
            .values()
            .flat_map(|workload| workload.addresses.iter())
            .filter_map(|address| address.parse::<IpAddr>().ok())
            .map(|address| address.to_canonical())
            .collect()
    }

    /// The host-side interface of every workload that has one, with the
    /// addresses of the workloads behind it (workloads sharing one network
    /// namespace share its interface).
    pub fn interfaces(&self) -> InterfaceAddresses {
        let mut interfaces = InterfaceAddresses::new();
        for workload in self.by_container.values().filter(|w| !w.interface.is_empty()) {
            interfaces.entry(workload.interface.clone()).or_default().extend(
                workload
                    .addresses
                    .iter()
                    .filter_map(|address| address.parse::<IpAddr>().ok())
                    .map(|address| address.to_canonical()),
            );
        }
        interfaces
    }

    /// The identity map of the local addresses. Should two local
    /// workloads claim one address, the first by container ID wins here
    /// (ingest reports the conflict fleet-wide).
    pub fn identity_map(&self) -> HashMap<IpAddr, Arc<Peer>> {
        let mut map = HashMap::new();
        for workload in self.by_container.values() {
            let peer = Arc::new(Peer::of_workload(workload));
            for address in workload.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
                map.entry(address.to_canonical()).or_insert_with(|| Arc::clone(&peer));
            }
        }
        map
    }

    /// Number of workloads.
    pub fn len(&self) -> usize {
        self.by_container.len()
    }

    /// True when the node runs no workload.
    pub fn is_empty(&self) -> bool {
        self.by_container.is_empty()
    }
}

/// Applies discovery's changes until the channel closes: identities,
/// chains, events. `chains` is `None` without a data plane.
pub async fn follow(
    mut changes: mpsc::Receiver<Change>,
    identities: Arc<Identities>,
    mut chains: Option<AddressSink>,
    events: Arc<Events>,
    metrics: Metrics,
) {
    let mut workloads = LocalWorkloads::default();
    let mut installed: Option<(BTreeSet<IpAddr>, InterfaceAddresses)> = None;
    while let Some(first) = changes.recv().await {
        // Take every change already waiting, so a snapshot of many
        // workloads costs one identity swap and one iptables-restore.
        let mut batch = vec![first];
        while let Ok(change) = changes.try_recv() {
            batch.push(change);
        }
        // Discovery knows neither cluster nor node: this agent does.
        let batch: Vec<Change> = batch
            .into_iter()
            .map(|change| match change {
                Change::Started(workload) => Change::Started(events.stamp(workload)),
                Change::Stopped { workload, reason } => Change::Stopped {
                    workload: events.stamp(workload),
                    reason,
                },
            })
            .collect();
        for change in &batch {
            workloads.apply(change);
        }
        let addresses = workloads.addresses();
        let interfaces = workloads.interfaces();
        let started = batch.iter().any(|change| matches!(change, Change::Started(_)));
        // Starts: identities first, then queueing. Stops: the reverse.
        if started {
            identities.set_local(workloads.identity_map());
        }
        if let Some(mut sink) = chains.take() {
            let wanted = (addresses.clone(), interfaces);
            if installed.as_ref() != Some(&wanted) {
                let set = wanted.clone();
                // iptables-restore is a child process: off the runtime.
                let joined = tokio::task::spawn_blocking(move || {
                    let outcome = sink(&set.0, &set.1);
                    (sink, outcome)
                })
                .await;
                let (returned, outcome) = match joined {
                    Ok(done) => done,
                    Err(error) => std::panic::resume_unwind(error.into_panic()),
                };
                sink = returned;
                match outcome {
                    Ok(()) => {
                        metrics.workload_addresses.set(addresses.len() as i64);
                        installed = Some(wanted);
                    }
                    Err(error) => {
                        metrics.chain_failures.inc();
                        tracing::error!(message = "iptables chains not updated.", error = %format!("{error:#}"));
                    }
                }
            }
            chains = Some(sink);
        }
        if !started {
            identities.set_local(workloads.identity_map());
        }
        for change in batch {
            let (kind, payload) = match change {
                Change::Started(workload) => (
                    "workload-started",
                    Payload::WorkloadStarted(WorkloadStarted {
                        workload: Some(workload),
                    }),
                ),
                Change::Stopped { workload, reason } => (
                    "workload-stopped",
                    Payload::WorkloadStopped(WorkloadStopped {
                        workload: Some(workload),
                        reason,
                    }),
                ),
            };
            if let Err(error) = events.emit_workload(kind, payload) {
                tracing::error!(message = "Workload event not spooled.", error = %format!("{error:#}"));
            }
        }
        tracing::info!(
            message = "Workloads updated.",
            workloads = workloads.len(),
            addresses = workloads.addresses().len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(id: &str, addresses: &[&str]) -> Workload {
        Workload {
            container_id: id.into(),
            image_id: format!("sha256:{id}"),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tracks_addresses_and_identities_of_running_workloads() {
        let mut local = LocalWorkloads::default();
        local.apply(&Change::Started(workload("a", &["10.0.0.1", "fd00::1"])));
        local.apply(&Change::Started(workload("b", &["10.0.0.2"])));
        assert_eq!(local.addresses().len(), 3);
        let map = local.identity_map();
        assert_eq!(map[&"fd00::1".parse::<IpAddr>().unwrap()].container_id, "a");
        local.apply(&Change::Stopped {
            workload: workload("a", &["10.0.0.1", "fd00::1"]),
            reason: "exited".into(),
        });
        assert_eq!(
            local.addresses(),
            BTreeSet::from(["10.0.0.2".parse::<IpAddr>().unwrap()])
        );
        assert_eq!(local.len(), 1);
    }

    #[test]
    fn interfaces_carry_the_addresses_of_their_workloads() {
        let mut local = LocalWorkloads::default();
        let mut a = workload("a", &["10.0.0.1"]);
        a.interface = "veth-a".into();
        let mut b = workload("b", &["10.0.0.2", "FD00::2"]);
        b.interface = "veth-a".into();
        local.apply(&Change::Started(a));
        local.apply(&Change::Started(b));
        local.apply(&Change::Started(workload("c", &["10.0.0.3"])));
        let interfaces = local.interfaces();
        assert_eq!(interfaces.len(), 1, "c has no interface");
        assert_eq!(
            interfaces["veth-a"],
            ["10.0.0.1", "10.0.0.2", "fd00::2"]
                .iter()
                .map(|a| a.parse::<IpAddr>().unwrap())
                .collect()
        );
    }
}
