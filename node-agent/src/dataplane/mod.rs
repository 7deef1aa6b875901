//! The agent's data plane: iptables chains that send new TCP connections of
//! the node's workloads to NFQUEUE, the packet decoder, and the verdict
//! threads. It knows nothing of policy: a [`Decider`] supplied by the
//! control plane says accept or drop for each SYN.
//!
//! - [`packet`]: decodes the IP and TCP headers of a queued SYN, never
//!   panicking on hostile bytes.
//! - [`chains`]: the agent's iptables chains, written atomically with
//!   `iptables-restore --noflush`, with a per-source SYN rate limit before
//!   the queue; adopted on restart, kept when the agent stops (removed only
//!   on request).
//! - [`queue`]: one verdict thread per NFQUEUE queue, with batched verdicts,
//!   the kernel's fail-open-when-full flag as the decider wants it, and the
//!   kernel's drop counters.
//! - `netlink`: the NFQUEUE netlink protocol in safe Rust.
//!
//! Must never do I/O on the verdict path other than the netlink socket, and
//! must never depend on the control plane's types: the control plane depends
//! on this module, not the other way round.

pub mod chains;
mod netlink;
pub mod packet;
pub mod queue;

pub use chains::{ChainConfig, ChainCounters, ChainError, Chains, Family, Hook};
pub use packet::{decode_syn, PacketError, Syn};
pub use queue::{Decider, QueueConfig, QueueError, QueueOptions, QueueSet, QueueStat, QueueStats, Verdict};
