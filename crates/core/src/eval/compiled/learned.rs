//! Learned connections as one open-addressed table of packed `u64` keys.
//!
//! With a million entries the table is far larger than any cache, so a
//! lookup costs what its memory misses cost. A general hash set touches a
//! control byte and then the key, two misses apart; here the key is the
//! slot itself and linear probing stays within the first cache line in
//! almost every case: one miss per lookup, and no per-entry overhead.

use std::hash::BuildHasher;

/// The empty slot; no key is all ones (the model index never is).
const EMPTY: u64 = u64::MAX;

/// A set of learned-connection keys, built once.
#[derive(Clone, Debug)]
pub(super) struct LearnedSet {
    slots: Box<[u64]>,
    mask: usize,
    hasher: foldhash::fast::RandomState,
    len: usize,
}

impl LearnedSet {
    /// A set for up to `capacity` keys (kept under two-thirds full).
    pub fn with_capacity(capacity: usize) -> Self {
        let slots = (capacity.saturating_mul(3) / 2).max(8).next_power_of_two();
        Self {
            slots: vec![EMPTY; slots].into_boxed_slice(),
            mask: slots - 1,
            hasher: foldhash::fast::RandomState::default(),
            len: 0,
        }
    }

    /// Adds `key`; the set must have been sized for it.
    pub fn insert(&mut self, key: u64) {
        debug_assert_ne!(key, EMPTY);
        debug_assert!(self.len < self.slots.len() - 1, "sized by with_capacity");
        let mut slot = self.hasher.hash_one(key) as usize & self.mask;
        loop {
            match self.slots[slot] {
                EMPTY => {
                    self.slots[slot] = key;
                    self.len += 1;
                    return;
                }
                held if held == key => return,
                _ => slot = (slot + 1) & self.mask,
            }
        }
    }

    /// Whether `key` is in the set.
    #[inline]
    pub fn contains(&self, key: u64) -> bool {
        let mut slot = self.hasher.hash_one(key) as usize & self.mask;
        loop {
            match self.slots[slot] {
                EMPTY => return false,
                held if held == key => return true,
                _ => slot = (slot + 1) & self.mask,
            }
        }
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed keys are far from random (indices and ports side by side);
    /// probing must still stay short, or a lookup costs several misses.
    #[test]
    fn probes_stay_short_for_packed_keys() {
        let keys: Vec<u64> = (0..2_000u64)
            .flat_map(|model| {
                (0..50u64).map(move |k| (model << 42) | (((model + k * 97) % 2_000) << 19) | (8000 + k % 16))
            })
            .collect();
        let mut set = LearnedSet::with_capacity(keys.len());
        for key in &keys {
            set.insert(*key);
        }
        assert_eq!(set.len(), keys.len());
        let probes = |key: u64| {
            let mut slot = set.hasher.hash_one(key) as usize & set.mask;
            let mut probes = 1;
            while set.slots[slot] != EMPTY && set.slots[slot] != key {
                slot = (slot + 1) & set.mask;
                probes += 1;
            }
            probes
        };
        let present: usize = keys.iter().map(|key| probes(*key)).sum();
        let absent: usize = keys.iter().map(|key| probes(key ^ (1 << 18))).sum();
        let (present, absent) = (present as f64 / keys.len() as f64, absent as f64 / keys.len() as f64);
        assert!(keys.iter().all(|key| set.contains(*key)));
        assert!(!set.contains(keys[0] ^ (1 << 18)));
        assert!(
            present < 2.0 && absent < 4.0,
            "mean probes: present {present:.2}, absent {absent:.2}"
        );
    }
}
