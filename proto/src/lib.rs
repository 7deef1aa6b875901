//! The CNNF event schema: protobuf package `cnnf.v1` and its gRPC services.
//!
//! Every message on a CNNF subject is a [`v1::Envelope`] carrying a
//! `schema_version`; consumers check it before anything else. The `.proto`
//! files beside this crate are the published schema integrations build
//! against. Code is generated at build time by a pure-Rust compiler, so no
//! `protoc` is needed.
//!
//! Must never depend on any other CNNF crate, on NATS, or on storage.

/// Package `cnnf.v1`, generated from `proto/cnnf/v1/*.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cnnf.v1");
}

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;
