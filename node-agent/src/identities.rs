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
//! resolved [`Peer`] by reference count, allocating nothing. Each peer also
//! caches its identity interned in the table in force ([`Peer::interned`]),
//! so a decision compares integers instead of hashing image IDs and names. Writers build
//! a new map and swap it in; the fleet watcher batches the entries that
//! arrive together (a snapshot of many thousands of keys at start-up) so
//! it copies the map once per batch, not once per key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_nats::jetstream::{self, kv};
use cnnf_core::eval::{CompiledTable, Identity, InternedIdentity};
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
    /// The identity interned in the last table it was decided under.
    interned: InternCache,
}

/// A peer's identity interned in one compiled table, so the verdict
/// threads decide its SYNs with integers instead of hashing its image ID
/// and name on every SYN. Filled on the peer's first decision under a
/// table, replaced after a table swap; never part of what a peer is
/// (equality and hashing ignore it, clones start from the same value).
#[derive(Default)]
struct InternCache(ArcSwapOption<InternedIdentity>);

impl Clone for InternCache {
    fn clone(&self) -> Self {
        Self(ArcSwapOption::new(self.0.load_full()))
    }
}

impl PartialEq for InternCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for InternCache {}

impl std::hash::Hash for InternCache {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl std::fmt::Debug for InternCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InternCache")
    }
}

impl Peer {
    /// A peer known only by its identity (objects, unknown).
    pub fn bare(identity: Identity) -> Self {
        Self::new(identity, String::new(), String::new(), String::new())
    }

    /// A peer with everything decision events show of it.
    pub fn new(identity: Identity, container_id: String, cluster: String, node: String) -> Self {
        Self {
            identity,
            container_id,
            cluster,
            node,
            interned: InternCache::default(),
        }
    }

    /// The identity interned in `table`: from the cache when it was
    /// interned there before, else interned now and cached. A guard, not a
    /// clone, so threads deciding for the same peer share no reference
    /// count. Under a race with a table swap the guard may hold another
    /// table's interning: `decide_interned` then looks the identity up
    /// again, so the answer stays right.
    pub fn interned(&self, table: &CompiledTable) -> arc_swap::Guard<Option<Arc<InternedIdentity>>> {
        let cached = self.interned.0.load();
        if cached.as_deref().is_some_and(|interned| interned.is_for(table)) {
            return cached;
        }
        drop(cached);
        self.interned.0.store(Some(Arc::new(table.intern(&self.identity))));
        self.interned.0.load()
    }

    /// The peer a workload makes of its addresses.
    pub fn of_workload(workload: &Workload) -> Self {
        Self::new(
            Identity::Image {
                id: workload.image_id.clone(),
                name: workload.image_name.clone(),
            },
            workload.container_id.clone(),
            workload.cluster.clone(),
            workload.node.clone(),
        )
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

type AddressMap = HashMap<IpAddr, Arc<Peer>, AddressHashing>;

/// Hashing of the address maps. Every SYN looks up both of its addresses,
/// and the standard SipHash of an address costs about as much as the rest
/// of the lookup (measured in the data-plane benchmark), so the maps use a
/// folded multiply instead, keyed per process like the standard hasher (the
/// maps' keys come from this node's discovery and the fleet map, not from
/// packets, and a lookup of a hostile address only reads).
#[derive(Debug, Clone, Copy)]
struct AddressHashing {
    seed: u64,
}

impl Default for AddressHashing {
    fn default() -> Self {
        use std::hash::BuildHasher as _;
        Self {
            seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1,
        }
    }
}

impl std::hash::BuildHasher for AddressHashing {
    type Hasher = AddressHasher;

    fn build_hasher(&self) -> AddressHasher {
        AddressHasher { state: self.seed }
    }
}

/// The hasher of [`AddressHashing`].
#[derive(Debug, Clone, Copy)]
struct AddressHasher {
    state: u64,
}

/// Multiplier of the mix (the golden ratio's odd 64-bit constant).
const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl AddressHasher {
    #[inline]
    fn mix(&mut self, value: u64) {
        let product = u128::from(self.state ^ value) * u128::from(MIX);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl std::hash::Hasher for AddressHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word) ^ ((chunk.len() as u64) << 59));
        }
    }

    #[inline]
    fn write_u8(&mut self, value: u8) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u16(&mut self, value: u16) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    #[inline]
    fn write_u128(&mut self, value: u128) {
        self.mix(value as u64);
        self.mix((value >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // One more round, so the high bits (hashbrown's tag) depend on
        // every input bit.
        let product = u128::from(self.state) * u128::from(MIX ^ 0xff51_afd7_ed55_8ccd);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

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
            local: ArcSwap::from_pointee(AddressMap::default()),
            fleet: ArcSwap::from_pointee(AddressMap::default()),
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
        self.local.store(Arc::new(map.into_iter().collect()));
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
/// The watch consumers are named `<consumer>_<attempt>`.
pub async fn watch_fleet(
    js: jetstream::Context,
    consumer: String,
    identities: Arc<Identities>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let name = format!("{consumer}_{attempts}");
        let attempt = async {
            let mut entries = cnnf_bus::kv::watch(&js, cnnf_bus::topology::IDENTITIES_BUCKET, ">", &name).await?;
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
    use cnnf_core::proto::{network_object::Kind, NetworkObject, VerdictTable};

    fn image(id: &str) -> Arc<Peer> {
        Arc::new(Peer::bare(Identity::Image {
            id: id.into(),
            name: format!("{id}:latest"),
        }))
    }

    /// The address hasher must spread neighbouring addresses over the
    /// buckets (low bits) and the tags (top 7 bits) like a random hash, or
    /// lookups in a map of a fleet's addresses would probe long chains.
    #[test]
    fn address_hashes_spread_like_random_ones() {
        use std::collections::HashSet;
        use std::hash::BuildHasher as _;
        let hashing = AddressHashing::default();
        let v4: Vec<u64> = (0..4096u32)
            .map(|n| hashing.hash_one(IpAddr::from(std::net::Ipv4Addr::from(0x0a40_0000 + n))))
            .collect();
        let v6: Vec<u64> = (0..4096u128)
            .map(|n| hashing.hash_one(IpAddr::from(std::net::Ipv6Addr::from((0xfd00u128 << 112) + n))))
            .collect();
        for hashes in [&v4, &v6] {
            // 4096 keys into 4096 buckets: about 2589 distinct if random.
            let buckets: HashSet<u64> = hashes.iter().map(|hash| hash & 4095).collect();
            assert!(buckets.len() > 2400, "{} buckets of 4096", buckets.len());
            let tags: HashSet<u64> = hashes.iter().map(|hash| hash >> 57).collect();
            assert_eq!(tags.len(), 128);
        }
        // Keyed per map builder like the standard hasher.
        let other = AddressHashing::default();
        let address = IpAddr::from(std::net::Ipv4Addr::new(10, 0, 0, 1));
        assert_ne!(hashing.hash_one(address), other.hash_one(address));
    }

    #[test]
    fn a_peer_interns_once_per_table_and_equality_ignores_it() {
        let first = CompiledTable::empty();
        let second = CompiledTable::empty();
        let peer = image("sha256:a");
        let a = peer.interned(&first).as_ref().map(Arc::as_ptr);
        assert!(peer.interned(&first).as_deref().is_some_and(|i| i.is_for(&first)));
        // Cached: the same interning again.
        assert_eq!(peer.interned(&first).as_ref().map(Arc::as_ptr), a);
        // A new table: interned again, for it.
        let b = peer.interned(&second);
        assert!(b.as_deref().is_some_and(|i| i.is_for(&second) && !i.is_for(&first)));
        // What a peer is does not depend on its cache.
        assert_eq!(*peer, *image("sha256:a"));
        let hashing = std::collections::hash_map::RandomState::new();
        use std::hash::BuildHasher as _;
        assert_eq!(hashing.hash_one(&*peer), hashing.hash_one(&*image("sha256:a")));
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
