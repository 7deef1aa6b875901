//! The RocksDB store passes the projection store conformance suite.

use cnnf_store::{conformance, ProjectionStore};
use cnnf_store_rocksdb::RocksStore;

#[test]
fn rocks_store_conforms() {
    let dirs = std::cell::RefCell::new(Vec::new());
    conformance::check_all(&|| {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), conformance::TABLES).unwrap();
        dirs.borrow_mut().push(dir);
        Box::new(store) as Box<dyn ProjectionStore>
    });
}

#[test]
fn rocks_store_is_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    conformance::check_durable(
        &|path| Box::new(RocksStore::open(path, conformance::TABLES).unwrap()) as Box<dyn ProjectionStore>,
        dir.path(),
    );
}

#[test]
fn opening_adds_new_tables_and_keeps_old_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RocksStore::open(dir.path(), &["alpha"]).unwrap();
        let mut batch = cnnf_store::WriteBatch::new();
        batch.put("alpha", b"k".to_vec(), b"v".to_vec());
        store.write(batch).unwrap();
    }
    let store = RocksStore::open(dir.path(), &["alpha", "beta"]).unwrap();
    assert_eq!(store.get("alpha", b"k").unwrap(), Some(b"v".to_vec()));
    assert_eq!(store.get("beta", b"k").unwrap(), None);
}

/// Bytes of the table files (`*.sst`) under `dir`.
fn table_file_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "sst"))
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

#[test]
fn table_files_are_compressed() {
    // Records shaped like the projections: repeated identifiers and names.
    let dir = tempfile::tempdir().unwrap();
    let mut raw = 0u64;
    {
        let store = RocksStore::open(dir.path(), &["audits"]).unwrap();
        for chunk in 0..20u32 {
            let mut batch = cnnf_store::WriteBatch::new();
            for i in 0..1_000u32 {
                let n = chunk * 1_000 + i;
                let key = format!("audit/{n:010}").into_bytes();
                let value = format!(
                    "cluster=prod node=node-{:03} source=sha256:{:064x} image=registry.example.com/shop/web:1.{} \
                     destination=sha256:{:064x} image=registry.example.com/shop/db:16 port=5432 verdict=prevent \
                     rule=model:sha256:{:064x} count={}",
                    n % 50,
                    n % 200,
                    n % 7,
                    n % 300,
                    n % 200,
                    n
                )
                .into_bytes();
                raw += (key.len() + value.len()) as u64;
                batch.put("audits", key, value);
            }
            store.write(batch).unwrap();
        }
    }
    // Reopening replays the write-ahead log into table files.
    let store = RocksStore::open(dir.path(), &["audits"]).unwrap();
    assert_eq!(
        store.scan_prefix("audits", b"audit/", usize::MAX).unwrap().len(),
        20_000
    );
    let on_disk = table_file_bytes(dir.path());
    assert!(on_disk > 0, "no table file written");
    assert!(
        on_disk * 3 < raw,
        "table files hold {on_disk} bytes for {raw} bytes of records: not compressed"
    );
}

/// Bytes of the write-ahead log files (`*.log`) under `dir`.
fn log_file_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "log"))
        .map(|entry| entry.metadata().unwrap().len())
        .sum()
}

#[test]
fn a_rarely_written_table_does_not_pin_the_write_ahead_log() {
    // "applied" gets one small write, "audits" three times the log limit:
    // without the limit, the log file holding "applied"'s write (and every
    // later one) stays until "applied" fills a memtable, which it never does.
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(dir.path(), &["applied", "audits"]).unwrap();
    let mut batch = cnnf_store::WriteBatch::new();
    batch.put("applied", b"seq".to_vec(), b"1".to_vec());
    store.write(batch).unwrap();
    let value_bytes = 16 * 1024;
    let writes = 3 * cnnf_store_rocksdb::MAX_WAL_BYTES / (100 * value_bytes as u64);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for write in 0..writes {
        let mut batch = cnnf_store::WriteBatch::new();
        for i in 0..100u64 {
            // Incompressible values, so the table files stay large too.
            let value: Vec<u8> = (0..value_bytes)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            batch.put("audits", format!("{write:08}/{i:03}").into_bytes(), value);
        }
        store.write(batch).unwrap();
    }
    let logs = log_file_bytes(dir.path());
    assert!(
        logs <= 2 * cnnf_store_rocksdb::MAX_WAL_BYTES,
        "{logs} bytes of write-ahead log after {} bytes written: the log is not bounded",
        writes * 100 * value_bytes as u64
    );
    assert_eq!(store.get("applied", b"seq").unwrap(), Some(b"1".to_vec()));
}
