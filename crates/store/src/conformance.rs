//! The conformance suite every [`ProjectionStore`] implementation runs in
//! its own tests, so that handlers behave the same on all of them.
//!
//! Open the stores under test with [`TABLES`]. Call [`check_all`] with a
//! factory of fresh, empty stores; persistent implementations also call
//! [`check_durable`] with a function that opens (and reopens) a store in a
//! directory.

use std::path::Path;

use crate::{applied_key, applied_sequence, dump, ProjectionStore, Txn, WriteBatch, META_TABLE};

/// The tables the suite uses, besides [`META_TABLE`].
pub const TABLES: &[&str] = &["alpha", "beta"];

/// Runs every check that needs only fresh stores.
pub fn check_all(new_store: &dyn Fn() -> Box<dyn ProjectionStore>) {
    get_of_absent_key_is_none(new_store().as_ref());
    put_then_get(new_store().as_ref());
    tables_are_separate(new_store().as_ref());
    later_op_in_batch_wins(new_store().as_ref());
    delete_removes(new_store().as_ref());
    scan_prefix_in_key_order_with_limit(new_store().as_ref());
    unknown_table_is_an_error_and_changes_nothing(new_store().as_ref());
    txn_reads_its_own_writes(new_store().as_ref());
    tables_are_listed(new_store().as_ref());
}

/// Runs the checks that reopen a store: a committed batch survives a
/// reopen, including the applied sequence written with it.
pub fn check_durable(open: &dyn Fn(&Path) -> Box<dyn ProjectionStore>, dir: &Path) {
    let before = {
        let store = open(dir);
        let mut batch = WriteBatch::new();
        batch.put("alpha", b"k1".to_vec(), b"v1".to_vec());
        batch.put("beta", b"k2".to_vec(), b"v2".to_vec());
        batch.put(META_TABLE, applied_key("p"), crate::encode_u64(42).to_vec());
        store.write(batch).unwrap();
        dump(store.as_ref()).unwrap()
    };
    let store = open(dir);
    assert_eq!(applied_sequence(store.as_ref(), "p").unwrap(), 42);
    assert_eq!(dump(store.as_ref()).unwrap(), before);
}

fn get_of_absent_key_is_none(store: &dyn ProjectionStore) {
    assert_eq!(store.get("alpha", b"missing").unwrap(), None);
    assert_eq!(applied_sequence(store, "nobody").unwrap(), 0);
}

fn put_then_get(store: &dyn ProjectionStore) {
    let mut batch = WriteBatch::new();
    batch.put("alpha", b"k".to_vec(), b"v".to_vec());
    store.write(batch).unwrap();
    assert_eq!(store.get("alpha", b"k").unwrap(), Some(b"v".to_vec()));
}

fn tables_are_separate(store: &dyn ProjectionStore) {
    let mut batch = WriteBatch::new();
    batch.put("alpha", b"k".to_vec(), b"a".to_vec());
    batch.put("beta", b"k".to_vec(), b"b".to_vec());
    store.write(batch).unwrap();
    assert_eq!(store.get("alpha", b"k").unwrap(), Some(b"a".to_vec()));
    assert_eq!(store.get("beta", b"k").unwrap(), Some(b"b".to_vec()));
}

fn later_op_in_batch_wins(store: &dyn ProjectionStore) {
    let mut batch = WriteBatch::new();
    batch.put("alpha", b"k".to_vec(), b"first".to_vec());
    batch.put("alpha", b"k".to_vec(), b"second".to_vec());
    batch.put("alpha", b"gone".to_vec(), b"x".to_vec());
    batch.delete("alpha", b"gone".to_vec());
    store.write(batch).unwrap();
    assert_eq!(store.get("alpha", b"k").unwrap(), Some(b"second".to_vec()));
    assert_eq!(store.get("alpha", b"gone").unwrap(), None);
}

fn delete_removes(store: &dyn ProjectionStore) {
    let mut batch = WriteBatch::new();
    batch.put("alpha", b"k".to_vec(), b"v".to_vec());
    store.write(batch).unwrap();
    let mut batch = WriteBatch::new();
    batch.delete("alpha", b"k".to_vec());
    batch.delete("alpha", b"never-existed".to_vec());
    store.write(batch).unwrap();
    assert_eq!(store.get("alpha", b"k").unwrap(), None);
}

fn scan_prefix_in_key_order_with_limit(store: &dyn ProjectionStore) {
    let mut batch = WriteBatch::new();
    for key in ["p/3", "p/1", "q/1", "p/2", "o/9", "p"] {
        batch.put("alpha", key.as_bytes().to_vec(), key.as_bytes().to_vec());
    }
    batch.put("beta", b"p/0".to_vec(), b"other table".to_vec());
    store.write(batch).unwrap();
    let keys = |entries: Vec<(Vec<u8>, Vec<u8>)>| {
        entries
            .into_iter()
            .map(|(key, _)| String::from_utf8(key).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(store.scan_prefix("alpha", b"p/", usize::MAX).unwrap()),
        ["p/1", "p/2", "p/3"]
    );
    assert_eq!(keys(store.scan_prefix("alpha", b"p/", 2).unwrap()), ["p/1", "p/2"]);
    assert_eq!(
        keys(store.scan_prefix("alpha", b"", usize::MAX).unwrap()),
        ["o/9", "p", "p/1", "p/2", "p/3", "q/1"]
    );
}

fn unknown_table_is_an_error_and_changes_nothing(store: &dyn ProjectionStore) {
    assert!(store.get("no-such-table", b"k").is_err());
    let mut batch = WriteBatch::new();
    batch.put("alpha", b"k".to_vec(), b"v".to_vec());
    batch.put("no-such-table", b"k".to_vec(), b"v".to_vec());
    assert!(store.write(batch).is_err());
    assert_eq!(store.get("alpha", b"k").unwrap(), None);
}

fn txn_reads_its_own_writes(store: &dyn ProjectionStore) {
    let mut seed = WriteBatch::new();
    seed.put("alpha", b"n".to_vec(), crate::encode_u64(10).to_vec());
    seed.put("alpha", b"doomed".to_vec(), b"x".to_vec());
    store.write(seed).unwrap();

    let mut txn = Txn::new(store);
    assert_eq!(txn.add_u64("alpha", b"n", 1).unwrap(), 11);
    assert_eq!(txn.add_u64("alpha", b"n", 1).unwrap(), 12);
    txn.delete("alpha", b"doomed".to_vec());
    assert_eq!(txn.get("alpha", b"doomed").unwrap(), None);
    // Nothing reaches the store before the commit.
    assert_eq!(store.get("alpha", b"doomed").unwrap(), Some(b"x".to_vec()));
    txn.mark();
    txn.put("alpha", b"n".to_vec(), b"rejected".to_vec());
    txn.put("alpha", b"new".to_vec(), b"rejected".to_vec());
    txn.rollback_to_mark();
    assert_eq!(txn.get_u64("alpha", b"n").unwrap(), 12);
    assert_eq!(txn.get("alpha", b"new").unwrap(), None);
    store.write(txn.into_batch()).unwrap();
    assert_eq!(store.get("alpha", b"n").unwrap(), Some(crate::encode_u64(12).to_vec()));
    assert_eq!(store.get("alpha", b"new").unwrap(), None);
    assert_eq!(store.get("alpha", b"doomed").unwrap(), None);
}

fn tables_are_listed(store: &dyn ProjectionStore) {
    let mut tables = store.tables();
    tables.sort_unstable();
    assert_eq!(tables, ["alpha", "beta", META_TABLE]);
}
