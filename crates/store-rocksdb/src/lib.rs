//! The RocksDB implementation of the CNNF projection store.
//!
//! Each table is a column family; a [`WriteBatch`](cnnf_store::WriteBatch)
//! becomes one RocksDB write batch, which the write-ahead log makes atomic
//! across column families. Writes are not fsynced one by one: a process
//! crash loses nothing that `write` returned, and a power loss can only
//! roll back the newest batches *together with* the applied sequence
//! stored in them, so the runner redelivers exactly what was rolled back.
//!
//! Only the services that keep projections depend on this crate. The node
//! agent, the CLI and the core crate must never depend on it (its bundled
//! C++ build is the slowest part of the workspace).

#![forbid(unsafe_code)]

use std::path::Path;

use cnnf_store::{Entry, Op, ProjectionStore, Result, StoreError, META_TABLE};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, DB,
};

/// Block cache shared by the tables of one store: hot data blocks stay in
/// memory up to this size.
pub const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// Most bytes of write-ahead log kept. One log serves every table, and a log
/// file goes only once every table with writes in it has flushed them, so
/// a table written rarely (the applied sequences, a small index) would
/// otherwise hold gigabytes of logs; past this size RocksDB flushes the
/// tables that pin the oldest log.
pub const MAX_WAL_BYTES: u64 = 128 << 20;
/// Bloom filter bits per key: about 1% false positives, so a point read of
/// a key that is not there (a dedup or index check) rarely touches disk.
const BLOOM_BITS_PER_KEY: f64 = 10.0;

/// Options of every table (column family): LZ4-compressed blocks (the
/// projections are protobuf and repeated identifiers, which compress
/// several-fold; LZ4 is the one codec built in), whole-key bloom filters,
/// and data blocks cached in the shared block cache. Index and filter
/// blocks stay with their open table files, outside that cache: in it,
/// data blocks evicted them and every point read loaded a filter from disk
/// again (60% of the audit index's time at 2M audits, measured with perf).
/// They cost about 10 bits per key of memory.
/// Public so benchmarks can give a plain RocksDB baseline the same options.
pub fn table_options(cache: &Cache) -> Options {
    let mut block = BlockBasedOptions::default();
    block.set_bloom_filter(BLOOM_BITS_PER_KEY, false);
    block.set_block_cache(cache);
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    options.set_bottommost_compression_type(DBCompressionType::Lz4);
    options.set_block_based_table_factory(&block);
    options
}

/// A projection store in one RocksDB database.
pub struct RocksStore {
    db: DB,
    tables: Vec<&'static str>,
}

impl RocksStore {
    /// Opens (creating if needed) the database at `path` with `tables` as
    /// column families, plus the meta table.
    pub fn open(path: &Path, tables: &[&'static str]) -> Result<Self> {
        let mut all: Vec<&'static str> = vec![META_TABLE];
        all.extend(tables.iter().copied().filter(|table| *table != META_TABLE));
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.increase_parallelism(2);
        options.set_max_total_wal_size(MAX_WAL_BYTES);
        // RocksDB refuses to open without every existing column family;
        // tables a newer version added and this one does not know are
        // opened too, and left alone.
        let existing = DB::list_cf(&options, path).unwrap_or_default();
        let mut names: Vec<String> = all.iter().map(|name| (*name).to_owned()).collect();
        let unknown: Vec<String> = existing
            .into_iter()
            .filter(|name| name != "default" && !names.contains(name))
            .collect();
        names.extend(unknown);
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let descriptors = names
            .into_iter()
            .map(|name| ColumnFamilyDescriptor::new(name, table_options(&cache)));
        let db = DB::open_cf_descriptors(&options, path, descriptors)
            .map_err(|error| StoreError::Engine(format!("open {}: {error}", path.display())))?;
        Ok(Self { db, tables: all })
    }

    fn cf(&self, table: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(table)
            .ok_or_else(|| StoreError::UnknownTable(table.to_owned()))
    }
}

fn engine(error: rocksdb::Error) -> StoreError {
    StoreError::Engine(error.into_string())
}

impl ProjectionStore for RocksStore {
    fn get(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(table)?, key).map_err(engine)
    }

    fn scan_prefix(&self, table: &'static str, prefix: &[u8], limit: usize) -> Result<Vec<Entry>> {
        let iter = self
            .db
            .iterator_cf(self.cf(table)?, IteratorMode::From(prefix, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(engine)?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.into_vec(), value.into_vec()));
        }
        Ok(out)
    }

    fn write(&self, batch: cnnf_store::WriteBatch) -> Result<()> {
        let mut rocks = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                Op::Put { table, key, value } => rocks.put_cf(self.cf(table)?, key, value),
                Op::Delete { table, key } => rocks.delete_cf(self.cf(table)?, key),
            }
        }
        self.db.write(rocks).map_err(engine)
    }

    fn tables(&self) -> Vec<&'static str> {
        self.tables.clone()
    }
}
