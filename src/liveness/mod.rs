//! Liveness for streaming calls, as a tower layer.
//!
//! [`LivenessLayer`] wraps any HTTP/2 gRPC service. For every call it tracks
//! when the peer last sent a whole message, marks the call *suspect* after a
//! stretch of silence, and **ends the call itself** when the silence reaches the
//! timeout: the response body yields a last message of your choosing, then
//! trailers with a status, and the service's own response is dropped.
//!
//! # Why a layer, and why it reads the request itself
//!
//! If liveness lived in the service, a service stuck on a lock would stop reading
//! the request and a live peer would look dead, and a stuck service could never
//! end a dead peer's call. So the layer reads the request body on the stream's own
//! task (hyper polls the response future and body there) into a bounded queue the
//! service drains at its own pace, and it answers for the service when the call
//! must end before the service has. Liveness never depends on the service.
//!
//! # Why a timer wheel
//!
//! A `Sleep` per call reset on every message does not scale to 100k calls: every
//! reset takes the runtime's timer lock. Here a message costs two atomic writes;
//! deadlines live in a shared [`TimerWheel`] whose entries re-check the last-seen
//! time when they come due and re-arm themselves if the peer spoke since.
//!
//! # Differences from `tower::timeout` and HTTP/2 keepalive
//!
//! `tower::timeout` bounds a whole call; this bounds the silence *within* a
//! call, resetting on every message. HTTP/2 keepalive proves the connection,
//! not the peer's application: a frozen process behind a live kernel still
//! answers HTTP/2 PINGs, but it sends no messages.
//!
//! # What the service sees
//!
//! A [`LivenessHandle`] in the request's extensions: the call's state, its
//! last-seen time and message counts, a place to hang a [`LivenessObserver`],
//! and [`LivenessHandle::end`] to end the call from anywhere with an [`Ending`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tonic_heartbeat::liveness::{Ending, LivenessLayer};
//!
//! // End calls after 30 s of silence with DEADLINE_EXCEEDED (status 4), and
//! // call them suspect after 20 s.
//! let layer = LivenessLayer::new(Duration::from_secs(30))
//!     .suspect_after(Duration::from_secs(20))
//!     .on_silence(Ending::status(4, "the client fell silent"));
//! // Wrap a single streaming service with it, for instance:
//! // Server::builder().add_service(tower::ServiceBuilder::new().layer(layer).service(svc))
//! # let _ = layer;
//! ```
//!
//! The server module mounts it in front of the heartbeat service; the
//! `liveness` integration test mounts it in front of an unrelated echo service.

mod body;
mod call;
mod framing;
mod future;
mod inbound;
mod layer;
mod phi;
mod policy;
mod service;
mod wheel;

pub use body::LivenessBody;
pub use call::{EndCause, Ending, LivenessHandle, LivenessObserver, LivenessState};
pub use future::ResponseFuture;
pub use inbound::InboundBody;
pub use layer::LivenessLayer;
pub use service::Liveness;
pub use wheel::{TimerWheel, WheelTarget};
