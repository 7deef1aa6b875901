//! Prefixes by length: one hash map per prefix length and address family,
//! so finding every prefix that holds an address costs one lookup per
//! length in use (a handful in practice, at most 33 or 129), whatever the
//! number of prefixes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use foldhash::HashMap;
use ipnet::IpNet;

/// Values keyed by prefix.
#[derive(Clone, Debug)]
pub(super) struct PrefixIndex<V> {
    /// IPv4 prefixes, longest first.
    v4: Box<[(u8, HashMap<u32, V>)]>,
    /// IPv6 prefixes, longest first.
    v6: Box<[(u8, HashMap<u128, V>)]>,
}

impl<V> Default for PrefixIndex<V> {
    fn default() -> Self {
        Self {
            v4: Box::new([]),
            v6: Box::new([]),
        }
    }
}

/// Collects prefixes before they are frozen into a [`PrefixIndex`].
pub(super) struct PrefixBuilder<V> {
    v4: BTreeMap<u8, HashMap<u32, V>>,
    v6: BTreeMap<u8, HashMap<u128, V>>,
}

impl<V> PrefixBuilder<V> {
    pub fn new() -> Self {
        Self {
            v4: BTreeMap::new(),
            v6: BTreeMap::new(),
        }
    }

    /// The value of `net` (truncated), created by `create` when new.
    pub fn entry(&mut self, net: IpNet, create: impl FnOnce() -> V) -> &mut V {
        match net {
            IpNet::V4(net) => self
                .v4
                .entry(net.prefix_len())
                .or_default()
                .entry(u32::from(net.network()))
                .or_insert_with(create),
            IpNet::V6(net) => self
                .v6
                .entry(net.prefix_len())
                .or_default()
                .entry(u128::from(net.network()))
                .or_insert_with(create),
        }
    }

    /// The frozen index.
    pub fn build(self) -> PrefixIndex<V> {
        fn shrink<K: Eq + std::hash::Hash, V>((len, mut map): (u8, HashMap<K, V>)) -> (u8, HashMap<K, V>) {
            map.shrink_to_fit();
            (len, map)
        }
        PrefixIndex {
            v4: self.v4.into_iter().rev().map(shrink).collect(),
            v6: self.v6.into_iter().rev().map(shrink).collect(),
        }
    }
}

fn mask4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)
}

fn mask6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)
}

impl<V> PrefixIndex<V> {
    /// The value of the longest prefix holding `address`.
    pub fn longest(&self, address: IpAddr) -> Option<&V> {
        let mut found = None;
        self.each(address, |value| {
            found = Some(value);
            false
        });
        found
    }

    /// Calls `visit` with the value of every prefix holding `address`,
    /// longest first, until it returns false.
    #[inline]
    pub fn each<'s>(&'s self, address: IpAddr, mut visit: impl FnMut(&'s V) -> bool) {
        match address {
            IpAddr::V4(address) => {
                let bits = u32::from(address);
                for (len, map) in self.v4.iter() {
                    if let Some(value) = map.get(&(bits & mask4(*len))) {
                        if !visit(value) {
                            return;
                        }
                    }
                }
            }
            IpAddr::V6(address) => {
                let bits = u128::from(address);
                for (len, map) in self.v6.iter() {
                    if let Some(value) = map.get(&(bits & mask6(*len))) {
                        if !visit(value) {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Heap bytes held, with `value_heap` for what each value owns.
    pub fn heap_bytes(&self, value_heap: impl Fn(&V) -> usize) -> usize {
        let v4: usize = self
            .v4
            .iter()
            .map(|(_, map)| super::map_bytes(map) + map.values().map(&value_heap).sum::<usize>())
            .sum();
        let v6: usize = self
            .v6
            .iter()
            .map(|(_, map)| super::map_bytes(map) + map.values().map(&value_heap).sum::<usize>())
            .sum();
        v4 + v6 + std::mem::size_of_val(&*self.v4) + std::mem::size_of_val(&*self.v6)
    }
}
