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
