//! `cnnf-testkit`: test support for CNNF integration tests and benchmarks.
//!
//! It drives real parts only:
//! - [`nats`]: a real `nats-server` process (single node or a routed cluster)
//!   with JetStream on free loopback ports and temporary stores, plain or
//!   with an included configuration (operator mode) and/or TLS;
//! - [`netns`]: real Linux network namespaces attached to a private bridge,
//!   standing in for containers, with helpers to run commands and open
//!   sockets inside them;
//! - [`images`]: synthetic container image IDs and names for fleets of
//!   test and benchmark data.
//!
//! This crate is used only from tests and benchmarks (as a dev-dependency). It
//! must never depend on RocksDB, nor on any CNNF service crate: it knows
//! nothing about CNNF itself, so every crate can use it without cycles.
//!
//! Everything is safe to use from many test processes at once (as
//! cargo-nextest runs them): ports are picked free and retried, and each
//! [`netns::Lab`] holds a cross-process lock on its own /24 subnet, whose
//! index is also part of every interface and namespace name it creates.

pub mod images;
pub mod nats;
pub mod netns;
pub mod wait;

pub use nats::{NatsCluster, NatsServer, ServerOptions, TlsFiles};
pub use netns::{ChildGuard, FakeContainer, Lab, TcpServerGuard};
pub use wait::{eventually, eventually_every};
