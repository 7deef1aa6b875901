//! The projection store: what a CNNF projection may ask of its storage.
//!
//! Projections (the identity registry, models, policy, audits) are folds of
//! the event log into key-value tables. They read single keys and key
//! ranges, and commit each batch of events as **one atomic write** that
//! also records the last applied stream sequence, so that a crash between
//! the commit and the JetStream ack neither loses nor double-counts.
//!
//! This crate is the contract only, plus an in-memory implementation for
//! pure unit tests of handlers. It must never depend on RocksDB or any
//! other storage engine, nor on NATS: handlers written against it compile
//! without either. `cnnf-store-rocksdb` implements it for production, and
//! both run the [`conformance`] suite.

#![forbid(unsafe_code)]

mod mem;
mod txn;

pub mod conformance;

pub use mem::MemStore;
pub use txn::Txn;

/// The table (RocksDB: column family) that holds runner bookkeeping: the
/// applied sequence and dead-letter counts of each projection.
pub const META_TABLE: &str = "meta";

/// Errors of a store. Every store error is fatal for the batch in hand: the
/// caller must not ack what it could not commit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The table was not declared when the store was opened.
    #[error("unknown table {0:?}: declare it when opening the store")]
    UnknownTable(String),
    /// The storage engine failed.
    #[error("storage engine: {0}")]
    Engine(String),
}

/// Result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One change inside a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `key` in `table` to `value`.
    Put {
        /// Table name.
        table: &'static str,
        /// Key bytes.
        key: Vec<u8>,
        /// Value bytes.
        value: Vec<u8>,
    },
    /// Remove `key` from `table`.
    Delete {
        /// Table name.
        table: &'static str,
        /// Key bytes.
        key: Vec<u8>,
    },
}

/// Changes committed together or not at all.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, table: &'static str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put {
            table,
            key: key.into(),
            value: value.into(),
        });
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: &'static str, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete { table, key: key.into() });
    }

    /// The changes in the order they were added (later ones win).
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A key and its value, as returned by scans.
pub type Entry = (Vec<u8>, Vec<u8>);

/// Storage for one or more projections: named tables of ordered byte keys.
///
/// Implementations must make [`ProjectionStore::write`] atomic and durable
/// against a process crash: after it returns, a reopened store shows all of
/// the batch; if the process dies during it, none of it.
pub trait ProjectionStore: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// All entries of `table` whose key starts with `prefix`, in key order,
    /// at most `limit` of them.
    fn scan_prefix(&self, table: &'static str, prefix: &[u8], limit: usize) -> Result<Vec<Entry>>;

    /// Commits a batch atomically.
    fn write(&self, batch: WriteBatch) -> Result<()>;

    /// The tables this store was opened with, `META_TABLE` included.
    fn tables(&self) -> Vec<&'static str>;
}

/// Key in [`META_TABLE`] of the last stream sequence a projection applied.
pub fn applied_key(projection: &str) -> Vec<u8> {
    format!("applied/{projection}").into_bytes()
}

/// Key in [`META_TABLE`] of the number of messages a projection dead-lettered.
pub fn dead_letter_key(projection: &str) -> Vec<u8> {
    format!("dead-lettered/{projection}").into_bytes()
}

/// Encodes a `u64` for storage (big-endian, so keys sort numerically).
pub fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes a `u64` written by [`encode_u64`]; `None` if the bytes are not 8 long.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Reads a `u64` counter or sequence from a table; absent means 0.
pub fn read_u64(store: &dyn ProjectionStore, table: &'static str, key: &[u8]) -> Result<u64> {
    match store.get(table, key)? {
        None => Ok(0),
        Some(bytes) => {
            decode_u64(&bytes).ok_or_else(|| StoreError::Engine(format!("value of {key:?} in {table} is not a u64")))
        }
    }
}

/// The last stream sequence `projection` applied (0: nothing yet).
pub fn applied_sequence(store: &dyn ProjectionStore, projection: &str) -> Result<u64> {
    read_u64(store, META_TABLE, &applied_key(projection))
}

/// Every entry of every table, in table then key order: for comparing two
/// projections (a live one and one rebuilt from the log) exactly.
pub fn dump(store: &dyn ProjectionStore) -> Result<Vec<(&'static str, Entry)>> {
    let mut tables = store.tables();
    tables.sort_unstable();
    let mut out = Vec::new();
    for table in tables {
        for entry in store.scan_prefix(table, b"", usize::MAX)? {
            out.push((table, entry));
        }
    }
    Ok(out)
}
