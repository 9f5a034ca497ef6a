//! Compiles `proto/` into Rust without a system `protoc`: protox parses the files
//! (it carries the well-known types), tonic-prost-build generates the code, and the
//! encoded descriptor set is written beside it for gRPC server reflection.
//! The same pipeline builds a thin etcd client for cluster mode.

use std::{env, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/heartbeat/v1/heartbeat.proto",
    "proto/heartbeat/v1/presence.proto",
];

/// etcd's API, as much of it as cluster mode uses.
const ETCD_PROTO: &str = "src/cluster/etcd.proto";

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

    // The few etcd services cluster mode calls, as a client only.
    println!("cargo:rerun-if-changed={ETCD_PROTO}");
    let etcd = protox::compile([ETCD_PROTO], ["src/cluster"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
