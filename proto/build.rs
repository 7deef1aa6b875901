//! Compiles `cnnf/v1/*.proto` with protox, a pure-Rust protobuf compiler, so
//! a fresh machine needs no `protoc`; tonic-prost-build turns the descriptor
//! set into Rust.

use std::io;

const PROTOS: &[&str] = &[
    "cnnf/v1/common.proto",
    "cnnf/v1/events.proto",
    "cnnf/v1/model.proto",
    "cnnf/v1/policy.proto",
    "cnnf/v1/audit.proto",
    "cnnf/v1/services.proto",
];

fn main() -> io::Result<()> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."]).map_err(io::Error::other)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
}
