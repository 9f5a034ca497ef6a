//! tonic-heartbeat: gRPC heartbeats and presence.
//!
//! Clients hold a bidirectional `heartbeat.v1.HeartbeatService/Heartbeat` stream
//! open and exchange pings with the server. The server knows to the millisecond
//! which clients are alive, marks late ones suspect, ends silent ones on time,
//! and says why every session ended.
//!
//! # Layout
//!
//! - [`protocol`]: the generated `heartbeat.v1` types, the codec, ping numbering
//!   and RTT smoothing shared by both ends, and [`CloseReason`], the one
//!   vocabulary of why sessions end. A leaf: it imports nothing of the crate.
//! - [`liveness`]: a generic tower layer that tracks each streaming call's
//!   liveness on a shared timer wheel and ends silent calls itself.
//! - [`registry`]: the open sessions, their revisions and history, and
//!   subscriptions (snapshot, then every change, with no gap).
//! - [`server`]: the heartbeat service behind its layer, admission, drain, and
//!   [`server::serve`] for the standalone server, with, on `ServerConfig::web`
//!   (feature `web`, default), the browser listener: the same sessions over
//!   WebSocket and the live presence page.
//! - [`client`]: a reconnecting client that keeps a session alive on its own
//!   thread and reports state, round-trip times and why sessions were lost.
//! - [`cluster`]: cluster mode, one presence across servers kept in etcd
//!   (run by [`server::serve`] when `ServerConfig::cluster` is set).
//! - [`presence`]: a client of a server's presence: list, evict, and a
//!   [`Watcher`](presence::Watcher) that resumes by itself, folded into a
//!   [`PresenceView`](presence::PresenceView); the registry's types on the wire.
//! - [`metrics`]: metric names and recorders, in Prometheus text.
//! - [`config`]: validated settings and their defaults.
//! - [`credentials`]: client credentials, which token may use which client ids.
//! - [`tls`]: the server's TLS, with certificates that reload.
//! - [`error`]: the errors returned at the library's boundaries.
//!
//! The `heartbeat` binary's command line lives in the binary, not here, behind
//! the default `cli` feature: `default-features = false` builds this library
//! without clap, anyhow or tracing-subscriber (and, without `web`, without
//! tungstenite, prost-reflect or serde_json). `ARCHITECTURE.md` in the
//! repository maps the modules and the invariants a change must keep.
#![deny(missing_docs)]
#![deny(clippy::disallowed_types)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]

mod backoff;
pub mod client;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod error;
pub mod liveness;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod tls;

pub use client::Client;
pub use config::{FrameLimits, ServerConfig};
pub use protocol::CloseReason;
pub use registry::SessionRegistry;
pub use server::{HeartbeatHandle, HeartbeatServer};
