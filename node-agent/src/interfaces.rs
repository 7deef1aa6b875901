//! The host-side interfaces of the node's workloads, and which addresses
//! each workload may send from.
//!
//! Why: the chains queue a workload's SYNs by its known addresses, and also
//! by its host-side interface (`-i` / `--physdev-in`), so a SYN sent from an
//! address the agent was never told about (an attacker adding an address
//! inside the container) is queued too. The verdict path then needs to know
//! that such a SYN came from a workload although its source address is not
//! that workload's: the queue reports the packet's input interface index,
//! and this map answers "does that interface's workload own this source?"
//! with one atomic pointer load and one hash lookup.
//!
//! Interface names come from discovery (the inventory's `interface`
//! field); indexes are resolved here (`if_nametoindex`) when the workloads
//! change and again by [`WorkloadInterfaces::refresh`] (called every stats
//! tick), so a veth recreated under the same name is found again. A name
//! that does not exist (yet) is kept and resolved later.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

/// Addresses of each workload interface, by interface name.
pub type InterfaceAddresses = BTreeMap<String, BTreeSet<IpAddr>>;

/// The workload interfaces of this node, by kernel interface index.
#[derive(Debug, Default)]
pub struct WorkloadInterfaces {
    by_index: ArcSwap<HashMap<u32, Arc<BTreeSet<IpAddr>>>>,
    by_name: Mutex<InterfaceAddresses>,
}

impl WorkloadInterfaces {
    /// No interfaces: every SYN is judged by its addresses alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the interfaces (name → addresses of the workload behind it)
    /// and resolves their indexes.
    pub fn set(&self, interfaces: InterfaceAddresses) {
        let mut by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        *by_name = interfaces;
        self.by_index.store(Arc::new(resolve(&by_name)));
    }

    /// Resolves the indexes again; swaps the map only if one changed.
    pub fn refresh(&self) {
        let by_name = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        let resolved = resolve(&by_name);
        if *self.by_index.load_full() != resolved {
            self.by_index.store(Arc::new(resolved));
        }
    }

    /// Whether the workload behind interface `index` owns `source`: `None`
    /// if `index` is no known workload interface. On the verdict path.
    pub fn owns(&self, index: u32, source: IpAddr) -> Option<bool> {
        self.by_index
            .load()
            .get(&index)
            .map(|owned| owned.contains(&source.to_canonical()))
    }

    /// Number of workload interfaces whose index is known.
    pub fn resolved(&self) -> usize {
        self.by_index.load().len()
    }
}

/// Index of every name that exists in this network namespace.
fn resolve(by_name: &InterfaceAddresses) -> HashMap<u32, Arc<BTreeSet<IpAddr>>> {
    by_name
        .iter()
        .filter_map(|(name, addresses)| {
            let index = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            Some((index, Arc::new(addresses.clone())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_owns_its_workloads_addresses_only() {
        let interfaces = WorkloadInterfaces::new();
        let own: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.99".parse().unwrap();
        interfaces.set(BTreeMap::from([
            ("lo".to_owned(), BTreeSet::from([own])),
            ("no-such-if0".to_owned(), BTreeSet::from([other])),
        ]));
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert_eq!(interfaces.owns(lo, own), Some(true));
        assert_eq!(interfaces.owns(lo, other), Some(false));
        assert_eq!(interfaces.owns(lo + 1000, own), None, "not a workload interface");
        assert_eq!(interfaces.resolved(), 1, "a missing interface waits to be resolved");
        interfaces.refresh();
        assert_eq!(interfaces.owns(lo, own), Some(true));
    }
}
