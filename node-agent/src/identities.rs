//! Who an address is: the identity resolution of both ends of every SYN.
//!
//! In order of precedence:
//! 1. **Local workloads**, from this node's discovery: the agent knows
//!    first-hand which container holds an address, so this beats anything
//!    the fleet map says (which may lag behind a restart by seconds).
//! 2. **The fleet map**, KV `cnnf-identities` (written by ingest: key = the
//!    address's KV key, value = the `cnnf.v1.Workload` holding it),
//!    followed with a watch ([`watch_fleet`]). An address claimed by two
//!    workloads has no key there and so falls through: never trusted.
//! 3. **Network objects** of the verdict table in force, by longest-prefix
//!    match.
//! 4. Else **unknown**.
//!
//! Host apps (socket owner → cgroup → systemd unit) are not resolved yet:
//! a host's own addresses resolve as above (usually unknown).
//!
//! Both maps are immutable hash maps behind an atomic pointer: a verdict
//! thread does one atomic load and one hash lookup per map, and shares the
//! resolved [`Peer`] by reference count, allocating nothing. Writers build
//! a new map and swap it in; the fleet watcher batches the entries that
//! arrive together (a snapshot of many thousands of keys at start-up) so
//! it copies the map once per batch, not once per key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_nats::jetstream::{self, kv};
use cnnf_core::eval::Identity;
use cnnf_core::proto::{self, Workload};
use futures::StreamExt;
use prost::Message as _;

use crate::metrics::{IdentityLabels, Metrics};
use crate::tables::ActiveTable;

/// Most KV entries gathered into one swap of the fleet map.
const FLEET_BATCH: usize = 8192;
/// Longest a KV entry waits for others to share its swap.
const FLEET_BATCH_DELAY: Duration = Duration::from_millis(50);

/// What an address resolved to, with what decision events show of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The identity evaluation sees.
    pub identity: Identity,
    /// The container holding the address, for images.
    pub container_id: String,
    /// Cluster of the workload, when known.
    pub cluster: String,
    /// Node of the workload, when known.
    pub node: String,
}

impl Peer {
    /// A peer known only by its identity (objects, unknown).
    pub fn bare(identity: Identity) -> Self {
        Self {
            identity,
            container_id: String::new(),
            cluster: String::new(),
            node: String::new(),
        }
    }

    /// The peer a workload makes of its addresses.
    pub fn of_workload(workload: &Workload) -> Self {
        Self {
            identity: Identity::Image {
                id: workload.image_id.clone(),
                name: workload.image_name.clone(),
            },
            container_id: workload.container_id.clone(),
            cluster: workload.cluster.clone(),
            node: workload.node.clone(),
        }
    }

    /// The identity as decision events carry it.
    pub fn to_proto(&self) -> proto::Identity {
        proto::Identity {
            container_id: self.container_id.clone(),
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            ..self.identity.to_proto()
        }
    }
}

/// An address resolved for one decision.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Who it is.
    pub peer: Arc<Peer>,
    /// True when it is a workload of this node.
    pub local: bool,
}

type AddressMap = HashMap<IpAddr, Arc<Peer>>;

/// The address → identity maps.
#[derive(Debug)]
pub struct Identities {
    local: ArcSwap<AddressMap>,
    fleet: ArcSwap<AddressMap>,
    unknown: Arc<Peer>,
    metrics: Metrics,
}

impl Identities {
    /// Empty maps: every address is unknown until discovery and KV speak.
    pub fn new(metrics: Metrics) -> Self {
        Self {
            local: ArcSwap::from_pointee(HashMap::new()),
            fleet: ArcSwap::from_pointee(HashMap::new()),
            unknown: Arc::new(Peer::bare(Identity::Unknown)),
            metrics,
        }
    }

    /// Resolves `address` (see the module doc for the order).
    pub fn resolve(&self, address: IpAddr, table: &ActiveTable) -> Resolved {
        let address = address.to_canonical();
        if let Some(peer) = self.local.load().get(&address) {
            return Resolved {
                peer: Arc::clone(peer),
                local: true,
            };
        }
        let peer = self
            .fleet
            .load()
            .get(&address)
            .cloned()
            .or_else(|| table.object_of(address))
            .unwrap_or_else(|| Arc::clone(&self.unknown));
        Resolved { peer, local: false }
    }

    /// Replaces the local map (the addresses of this node's workloads).
    pub fn set_local(&self, map: HashMap<IpAddr, Arc<Peer>>) {
        self.metrics
            .identities
            .get_or_create(&IdentityLabels { source: "local" })
            .set(map.len() as i64);
        self.local.store(Arc::new(map));
    }

    /// Applies KV changes to the fleet map: `Some` puts, `None` deletes.
    pub fn apply_fleet(&self, changes: Vec<(IpAddr, Option<Arc<Peer>>)>) {
        if changes.is_empty() {
            return;
        }
        let mut map = AddressMap::clone(&self.fleet.load());
        for (address, peer) in changes {
            match peer {
                Some(peer) => {
                    map.insert(address, peer);
                }
                None => {
                    map.remove(&address);
                }
            }
        }
        self.metrics
            .identities
            .get_or_create(&IdentityLabels { source: "fleet" })
            .set(map.len() as i64);
        self.fleet.store(Arc::new(map));
    }

    /// Number of addresses in the fleet map.
    pub fn fleet_len(&self) -> usize {
        self.fleet.load().len()
    }
}

/// Reads one KV entry of `cnnf-identities`: the address and its new peer
/// (`None`: the key was deleted). A key or value that cannot be read is
/// logged and skipped.
fn read_entry(entry: &kv::Entry) -> Option<(IpAddr, Option<Arc<Peer>>)> {
    let Some(address) = cnnf_core::address::from_kv_key(&entry.key).and_then(|text| text.parse::<IpAddr>().ok()) else {
        tracing::warn!(message = "Identity key is not an address; ignored.", key = %entry.key);
        return None;
    };
    if entry.operation != kv::Operation::Put {
        return Some((address, None));
    }
    match Workload::decode(entry.value.as_ref()) {
        Ok(workload) => Some((address, Some(Arc::new(Peer::of_workload(&workload))))),
        Err(error) => {
            tracing::warn!(message = "Identity value is not a Workload; address left unknown.", key = %entry.key, %error);
            Some((address, None))
        }
    }
}

/// Follows KV `cnnf-identities` (a snapshot of every key, then changes)
/// into `identities.apply_fleet` until `stop` turns true; watches again
/// after any failure (the snapshot is delivered again and simply reapplied).
pub async fn watch_fleet(
    js: jetstream::Context,
    identities: Arc<Identities>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let store = js.get_key_value(cnnf_bus::topology::IDENTITIES_BUCKET).await?;
            let mut entries = store.watch_with_history(">").await?;
            tracing::info!(message = "Following the fleet identity map.");
            while let Some(first) = entries.next().await {
                let mut batch: Vec<_> = read_entry(&first?).into_iter().collect();
                let deadline = tokio::time::Instant::now() + FLEET_BATCH_DELAY;
                while batch.len() < FLEET_BATCH {
                    match tokio::time::timeout_at(deadline, entries.next()).await {
                        Ok(Some(entry)) => batch.extend(read_entry(&entry?)),
                        Ok(None) | Err(_) => break,
                    }
                }
                identities.apply_fleet(batch);
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            outcome = attempt => match outcome {
                Ok(()) => tracing::warn!(message = "Identity watch ended; watching again."),
                Err(error) => tracing::warn!(message = "Identity watch failed; retrying.", error = %format!("{error:#}")),
            },
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
    use cnnf_core::eval::CompiledTable;
    use cnnf_core::proto::{network_object::Kind, NetworkObject, VerdictTable};

    fn image(id: &str) -> Arc<Peer> {
        Arc::new(Peer::bare(Identity::Image {
            id: id.into(),
            name: format!("{id}:latest"),
        }))
    }

    #[test]
    fn local_beats_fleet_beats_objects_beats_unknown() {
        let table = ActiveTable::new(
            CompiledTable::build(VerdictTable {
                objects: vec![
                    NetworkObject {
                        name: "wide".into(),
                        kind: Kind::Subnet as i32,
                        cidrs: vec!["10.0.0.0/8".into()],
                        ..Default::default()
                    },
                    NetworkObject {
                        name: "narrow".into(),
                        kind: Kind::Subnet as i32,
                        cidrs: vec!["10.1.0.0/16".into()],
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })
            .unwrap(),
        );
        let identities = Identities::new(Metrics::default());
        let a: IpAddr = "10.1.0.1".parse().unwrap();
        let b: IpAddr = "10.2.0.1".parse().unwrap();
        let c: IpAddr = "192.168.0.1".parse().unwrap();
        let object = |address| identities.resolve(address, &table).peer.identity.clone();
        assert_eq!(object(a), Identity::Object { name: "narrow".into() });
        assert_eq!(object(b), Identity::Object { name: "wide".into() });
        assert_eq!(object(c), Identity::Unknown);

        identities.apply_fleet(vec![(a, Some(image("fleet")))]);
        assert_eq!(identities.resolve(a, &table).peer, image("fleet"));
        assert!(!identities.resolve(a, &table).local);

        identities.set_local(HashMap::from([(a, image("local"))]));
        let resolved = identities.resolve(a, &table);
        assert_eq!(resolved.peer, image("local"));
        assert!(resolved.local);

        identities.set_local(HashMap::new());
        identities.apply_fleet(vec![(a, None)]);
        assert_eq!(object(a), Identity::Object { name: "narrow".into() });
        // An IPv4 address seen as IPv4-mapped IPv6 is the same address.
        identities.apply_fleet(vec![(c, Some(image("mapped")))]);
        assert_eq!(
            identities.resolve("::ffff:192.168.0.1".parse().unwrap(), &table).peer,
            image("mapped")
        );
    }
}
