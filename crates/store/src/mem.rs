//! An in-memory store for pure unit tests of projection handlers. It keeps
//! nothing across restarts, so it is never used where durability matters.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::{Entry, Op, ProjectionStore, Result, StoreError, WriteBatch, META_TABLE};

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// A [`ProjectionStore`] held in memory.
#[derive(Debug)]
pub struct MemStore {
    tables: RwLock<BTreeMap<&'static str, Table>>,
}

impl MemStore {
    /// A store with `tables` (and the meta table).
    pub fn new(tables: &[&'static str]) -> Self {
        let mut map = BTreeMap::new();
        map.insert(META_TABLE, Table::new());
        for table in tables {
            map.insert(*table, Table::new());
        }
        Self {
            tables: RwLock::new(map),
        }
    }
}

impl ProjectionStore for MemStore {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let tables = self.tables.read().expect("store lock poisoned");
        let table = tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        Ok(table.get(key).cloned())
    }

    fn scan_prefix(&self, table: &'static str, prefix: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let tables = self.tables.read().expect("store lock poisoned");
        let table = tables
            .get(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))?;
        Ok(table
            .range(prefix.to_vec()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut tables = self.tables.write().expect("store lock poisoned");
        // Check every table first so a bad batch changes nothing.
        for op in batch.ops() {
            let (Op::Put { table, .. } | Op::Delete { table, .. }) = op;
            if !tables.contains_key(table) {
                return Err(StoreError::UnknownTable((*table).to_owned()));
            }
        }
        for op in batch.ops {
            match op {
                Op::Put { table, key, value } => {
                    tables.get_mut(table).expect("checked").insert(key, value);
                }
                Op::Delete { table, key } => {
                    tables.get_mut(table).expect("checked").remove(&key);
                }
            }
        }
        Ok(())
    }

    fn tables(&self) -> Vec<&'static str> {
        self.tables
            .read()
            .expect("store lock poisoned")
            .keys()
            .copied()
            .collect()
    }
}
