//! CNNF's pure logic, shared by the node agent, the services and the CLI.
//!
//! Everything here is deterministic and does no I/O: subject names and
//! event ids ([`subjects`], [`ids`]) and the checks every consumer applies
//! to a message before trusting it ([`envelope`]), and the decision of one
//! connection ([`eval`]): identities, rules, models and modes, once, for
//! the agent's hot path, the policy compiler and the audit simulator.
//!
//! Must never depend on NATS, RocksDB, tokio or any other I/O crate: the
//! agent's verdict loop and the simulator both link it.

#![forbid(unsafe_code)]

pub mod address;
pub mod envelope;
pub mod eval;
pub mod ids;
pub mod subjects;

pub use cnnf_proto::v1 as proto;
