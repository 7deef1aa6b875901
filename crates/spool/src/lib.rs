//! The node agent's durable outbox.
//!
//! Every event the agent publishes (decision batches, workload changes) is
//! appended to a local disk spool first and sent to JetStream from there.
//! So an agent keeps enforcing while NATS is down, buffers its events on
//! disk, and delivers every one exactly once when NATS is back, also across
//! a crash and restart of the agent:
//!
//! - [`Spool`]: segment files of checksummed records plus an ack cursor;
//!   a torn tail after a crash is cut off on open, never misread.
//! - [`SpoolHandle`]: the spool shared between appending tasks and the
//!   sender; appends are cheap enough for async tasks at high rates.
//! - [`Sender`]: a task that drains the spool through
//!   [`cnnf_bus::Publisher`] under each record's stored `Nats-Msg-Id`, and
//!   moves the cursor only through what JetStream acked.
//!
//! Nothing is dropped silently: a full spool refuses appends with
//! [`SpoolError::Full`] and counts them; see [`SpoolMetrics`].
//!
//! This crate must stay free of RocksDB and of the agent's data plane: it
//! depends on plain files, `async-nats` and `cnnf-bus` only.

pub mod frame;
mod handle;
mod metrics;
mod sender;
mod spool;

pub use frame::SpoolRecord;
pub use handle::SpoolHandle;
pub use metrics::SpoolMetrics;
pub use sender::{spawn_sender, Sender, SenderConfig};
pub use spool::{Spool, SpoolConfig, SpoolError, SyncJob, SyncPolicy};
