//! The in-memory store passes the conformance suite.

use cnnf_store::{conformance, MemStore, ProjectionStore};

#[test]
fn mem_store_conforms() {
    conformance::check_all(&|| Box::new(MemStore::new(conformance::TABLES)) as Box<dyn ProjectionStore>);
}
