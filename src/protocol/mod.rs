//! The `heartbeat.v1` wire protocol: generated types, the codec, and the pieces of
//! protocol logic both ends share.
//!
//! - [`pb`]: the generated messages, clients and servers of `proto/heartbeat/v1`.
//! - [`CompactCodec`]: prost with small buffers, because an idle session should
//!   not pin 16 KiB of codec buffers the way tonic's defaults would.
//! - [`PingLedger`] and [`RttEstimator`]: ping numbering, pong matching and
//!   round-trip smoothing, one implementation for the client and the server.
//! - `convert`: wire ↔ domain conversions (durations, reasons).

mod codec;
mod convert;
mod ping;

pub use codec::CompactCodec;
pub use convert::{
    change_to_proto, close_reason_to_proto, duration_to_proto, goodbye_reason_of,
    proto_to_duration, session_to_proto, timestamp_to_proto,
};
pub use ping::{PingLedger, PongMatch, RttEstimator};

/// The generated `heartbeat.v1` types, clients and servers.
pub mod pb {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("heartbeat.v1");

    /// The encoded `FileDescriptorSet` of every `.proto` file, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/heartbeat_descriptor.bin"));
}
