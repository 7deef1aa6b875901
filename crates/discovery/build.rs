//! Compiles the CRI subset in `proto/runtime/v1/runtime.proto` with protox
//! (pure Rust, no `protoc`), like the schema crate does.

use std::io;

const PROTO: &str = "proto/runtime/v1/runtime.proto";

fn main() -> io::Result<()> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"]).map_err(io::Error::other)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
}
