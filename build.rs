//! Compiles `proto/` into Rust without a system `protoc`: protox parses the files
//! (it carries the well-known types), tonic-prost-build generates the code, and the
//! encoded descriptor set is written beside it for gRPC server reflection.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/heartbeat/v1/heartbeat.proto",
    "proto/heartbeat/v1/presence.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("heartbeat_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::protocol::CompactCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
