//! A write batch that can read its own writes.
//!
//! A projection handler often reads a value, changes it and writes it back
//! (a counter, a model). When two events of one batch touch the same key,
//! the second must see the first one's change, which is not yet in the
//! store. [`Txn`] keeps the pending changes in an overlay consulted before
//! the store, and turns into one [`WriteBatch`] at commit.

use std::collections::BTreeMap;

use crate::{ProjectionStore, Result, WriteBatch};

type Key = (&'static str, Vec<u8>);

/// Pending changes over a store, read-your-writes.
///
/// One [`mark`](Txn::mark) can be set at a time; [`rollback_to_mark`]
/// undoes every change made since, so a runner can drop the changes of one
/// rejected event and keep the rest of the batch.
///
/// [`rollback_to_mark`]: Txn::rollback_to_mark
pub struct Txn<'a> {
    store: &'a dyn ProjectionStore,
    /// `None` marks a pending delete.
    overlay: BTreeMap<Key, Option<Vec<u8>>>,
    /// Overlay entries replaced since the mark, oldest first (`None`: the
    /// key was not in the overlay).
    undo: Vec<(Key, Option<Option<Vec<u8>>>)>,
}

impl<'a> Txn<'a> {
    /// An empty transaction over `store`.
    pub fn new(store: &'a dyn ProjectionStore) -> Self {
        Self {
            store,
            overlay: BTreeMap::new(),
            undo: Vec::new(),
        }
    }

    /// Sets the mark: later changes can be undone with
    /// [`rollback_to_mark`](Txn::rollback_to_mark).
    pub fn mark(&mut self) {
        self.undo.clear();
    }

    /// Undoes every change made since the last [`mark`](Txn::mark).
    pub fn rollback_to_mark(&mut self) {
        while let Some((key, previous)) = self.undo.pop() {
            match previous {
                Some(value) => self.overlay.insert(key, value),
                None => self.overlay.remove(&key),
            };
        }
    }

    fn set(&mut self, key: Key, value: Option<Vec<u8>>) {
        let previous = self.overlay.insert(key.clone(), value);
        self.undo.push((key, previous));
    }

    /// Reads `key`, seeing this transaction's own pending changes.
    pub fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.overlay.get(&(table, key.to_vec())) {
            Some(pending) => Ok(pending.clone()),
            None => self.store.get(table, key),
        }
    }

    /// Sets `key` to `value` at commit.
    pub fn put(&mut self, table: &'static str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.set((table, key.into()), Some(value.into()));
    }

    /// Removes `key` at commit.
    pub fn delete(&mut self, table: &'static str, key: impl Into<Vec<u8>>) {
        self.set((table, key.into()), None);
    }

    /// Reads a `u64` (absent: 0), seeing pending changes.
    pub fn get_u64(&self, table: &'static str, key: &[u8]) -> Result<u64> {
        Ok(self
            .get(table, key)?
            .and_then(|bytes| crate::decode_u64(&bytes))
            .unwrap_or(0))
    }

    /// Adds `delta` to the `u64` at `key`.
    pub fn add_u64(&mut self, table: &'static str, key: &[u8], delta: u64) -> Result<u64> {
        let value = self.get_u64(table, key)?.saturating_add(delta);
        self.put(table, key.to_vec(), crate::encode_u64(value).to_vec());
        Ok(value)
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.overlay.is_empty()
    }

    /// The pending changes as one batch (in key order; each key once).
    pub fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for ((table, key), value) in self.overlay {
            match value {
                Some(value) => batch.put(table, key, value),
                None => batch.delete(table, key),
            }
        }
        batch
    }
}
