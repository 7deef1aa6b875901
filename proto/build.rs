//! Compiles `cnnf/v1/*.proto` with protox, a pure-Rust protobuf compiler, so
//! a fresh machine needs no `protoc`; tonic-prost-build turns the descriptor
//! set into Rust, and pbjson-build adds serde implementations that follow the
//! proto3 JSON mapping (used by the operator gateway's JSON API).

use std::io::{self, Write as _};
use std::path::PathBuf;

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
    let encoded = prost::Message::encode_to_vec(&descriptors);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    // serde for every message and enum, in proto3 JSON, included from the
    // generated module so the crate's source needs no change.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or_else(|| io::Error::other("OUT_DIR is not set"))?);
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)
        .map_err(io::Error::other)?
        .out_dir(&out)
        .build(&[".cnnf.v1"])
        .map_err(io::Error::other)?;
    let module = out.join("cnnf.v1.rs");
    let include = "include!(concat!(env!(\"OUT_DIR\"), \"/cnnf.v1.serde.rs\"));";
    if !std::fs::read_to_string(&module)?.contains(include) {
        let mut file = std::fs::OpenOptions::new().append(true).open(&module)?;
        writeln!(file, "\n{include}")?;
    }
    Ok(())
}
