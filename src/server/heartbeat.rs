//! The `Heartbeat` method: admission, then a session, with gRPC framing done here.
//!
//! # Why not tonic's generated server
//!
//! tonic's streaming path decodes through `Streaming` (a boxed body, a decode
//! buffer, its own state) and encodes through `EncodeBody` (another buffer),
//! boxed once more behind `tonic::body::Body`. A heartbeat is a handful of
//! bytes, so per message that machinery costs more than the heartbeat, and per
//! session its buffers and boxes cost more than the session's own state: at
//! 100k idle sessions they were about a fifth of the server's memory. The
//! method is one bidirectional stream of one message type, and the liveness
//! layer in front already reads the request and bounds message sizes, so the
//! session reads whole messages straight from the layer's queue and writes
//! them framed (see `SessionBody`). The generated types and the wire stay
//! exactly those of `proto/`.

use std::{
    convert::Infallible,
    future::{ready, Ready},
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use http::HeaderValue;
use tonic::Status;
use tower::Service;

use super::{
    admission::{authenticate, Refusal},
    connection::PeerInfo,
    farewell,
    session::{PingGroup, Session, SessionBody},
    shared::ServerShared,
};
use crate::{
    liveness::{InboundBody, LivenessHandle},
    protocol::{
        grpc::HEARTBEAT_PATH,
        text::{Escaped, QUOTE_BYTES},
        CloseReason,
    },
};

/// The request body the liveness layer hands the method.
pub(crate) type RequestBody = InboundBody<tonic::body::Body>;

/// The method behind the liveness layer.
#[derive(Clone)]
pub(crate) struct HeartbeatMethod {
    pub(crate) shared: Arc<ServerShared>,
}

impl Service<http::Request<RequestBody>> for HeartbeatMethod {
    type Response = http::Response<SessionBody>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let bridged = request.extensions().get::<BridgedCall>().is_some();
        let (body, refusal, handle) = match self.open(request) {
            Ok((session, handle)) => (session, None, Some(handle)),
            Err(status) => (SessionBody::refused(), Some(status), None),
        };
        let mut response = http::Response::new(body);
        if let Some(handle) = handle.filter(|_| bridged) {
            response.extensions_mut().insert(handle);
        }
        if let Some(status) = refusal {
            // A trailers-only response: the status in the headers, and no
            // body, so the client's call fails at once.
            response
                .headers_mut()
                .extend(farewell::status_trailers(&status));
        }
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        ready(Ok(response))
    }
}

impl HeartbeatMethod {
    /// Admits the stream and starts its session, or says why not.
    fn open(
        &self,
        request: http::Request<RequestBody>,
    ) -> Result<(SessionBody, LivenessHandle), Status> {
        if request.uri().path() != HEARTBEAT_PATH {
            return Err(Status::unimplemented(format!(
                "heartbeat.v1.HeartbeatService has no method {}: the only one is Heartbeat",
                request.uri().path()
            )));
        }
        if let Some(encoding) = request
            .headers()
            .get("grpc-encoding")
            .filter(|encoding| encoding.as_bytes() != b"identity")
        {
            let mut status = Status::unimplemented(format!(
                "messages compressed with \"{}\" are not taken: heartbeats are a few bytes, send them uncompressed (grpc-encoding identity)",
                Escaped::quote(&String::from_utf8_lossy(encoding.as_bytes()), QUOTE_BYTES)
            ));
            // What the gRPC compression spec asks a refusal to say.
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
            return Err(status);
        }
        let (parts, inbound) = request.into_parts();
        let handle = parts
            .extensions
            .get::<LivenessHandle>()
            .cloned()
            .ok_or_else(|| {
                Status::internal(
                    "the heartbeat method must be mounted behind the liveness layer: use server::HeartbeatServer",
                )
            })?;
        let refused = |refusal: Refusal| {
            self.shared.metrics.admission_rejected(refusal.as_str());
            refusal.status()
        };
        let peer_info = parts.extensions.get::<PeerInfo>();
        let allowed = authenticate(
            &self.shared.config,
            &parts.headers,
            peer_info.and_then(|peer| peer.certificate.as_ref()),
        )
        .map_err(refused)?;
        let permit = self.shared.gate.admit(handle.clone()).map_err(refused)?;
        let peer = peer_info
            .map(|peer| peer.remote_addr)
            .or_else(|| tonic_peer(&parts.extensions));
        let ping_group = peer_info.map(|peer| PingGroup {
            peer: peer.remote_addr,
            ordinal: peer.connection.next_session(),
        });
        let session = Session::new(
            self.shared.clone(),
            handle.clone(),
            permit,
            peer,
            ping_group,
            allowed,
            inbound,
        );
        Ok((SessionBody::session(session), handle))
    }
}

/// Marks a call made in-process by a bridge from another transport (the
/// WebSocket endpoint), which feeds the client's frames in and takes the
/// server's out. Its response carries the call's [`LivenessHandle`] in its
/// extensions, so that the bridge can report the transport's own keepalives
/// (WebSocket pings) as liveness.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BridgedCall;

/// How a bridge fails a call's request when the client broke a rule on the
/// bridge's side: a frame it cannot carry (the wrong kind of WebSocket
/// message, JSON that is not a frame, a message over the size limit) is a
/// protocol violation, a flood of the transport's own pings is too many
/// pings. The session ends with this reason and message, where any other
/// failed request means the client is gone.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct RefusedFrame {
    /// `ProtocolViolation` or `TooManyPings`.
    pub(crate) reason: CloseReason,
    /// What the client did, for its goodbye and the close.
    pub(crate) message: String,
}

/// The peer address tonic's own transport records, for a service mounted in
/// someone else's tonic server.
fn tonic_peer(extensions: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}
