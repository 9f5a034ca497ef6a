//! The `heartbeat.v1` wire protocol and what both ends share of it.
//!
//! - [`pb`]: the generated messages, clients and servers of `proto/heartbeat/v1`.
//! - [`CompactCodec`]: prost with small buffers for the generated services and
//!   clients (presence, the client's stream), instead of tonic's 8 KiB each way.
//! - [`grpc`]: gRPC's message framing, for the server's sessions and the load
//!   generator, which speak `Heartbeat` without tonic's codec.
//! - `json` (crate-private, feature `web`): proto3 JSON of the contract's
//!   messages, for browsers.
//! - [`PingLedger`] and [`RttEstimator`]: ping numbering, pong matching and
//!   round-trip smoothing, one implementation for the client and the server.
//! - [`CloseReason`]: why sessions end, and how that maps to `Goodbye` and to
//!   presence's reasons on the wire.
//! - [`duration_to_proto`] and [`proto_to_duration`]: durations on the wire.
//! - [`text`]: the contract's rules for client-supplied text (no control
//!   characters, messages cut at 1 KiB) and escaping for logs and terminals.
//!
//! This module is a leaf: it imports nothing else of the crate, so both ends
//! (and the registry) can build on it. Conversions of the registry's types
//! live beside their users, in the `presence` module.

mod codec;
mod duration;
pub mod grpc;
#[cfg(feature = "web")]
pub(crate) mod json;
mod phi;
mod ping;
mod reason;
pub mod text;

pub use codec::CompactCodec;
pub use duration::{duration_to_proto, proto_to_duration};
pub use phi::Phi;
pub use ping::{PingLedger, PongMatch, RttEstimator};
pub use reason::CloseReason;

/// The generated `heartbeat.v1` types, clients and servers.
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("heartbeat.v1");

    /// The encoded `FileDescriptorSet` of every `.proto` file, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat_descriptor.bin"));
}
