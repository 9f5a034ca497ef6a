//! One session over one WebSocket: the upgrade, then a bridge into the
//! heartbeat service.
//!
//! The upgrade is checked the way the gRPC stream is admitted: the origin,
//! the subprotocol, then the service itself is called in-process, so
//! credentials and capacity decide before the socket opens, and a refusal is
//! an HTTP status (401, 403, 503) rather than a socket that closes at once.
//!
//! After the upgrade two halves run. The reader turns each client message
//! into one framed `HeartbeatRequest` on the call's request body (JSON is
//! transcoded; a message the session cannot take fails the request with
//! [`RefusedFrame`], which the session ends as a protocol violation), and
//! reports WebSocket pings and pongs as liveness once the session is open,
//! under the same rate rule as unsolicited frames. The writer sends the
//! session's frames as messages and, when the call ends, a close frame whose
//! code says why: `4000 + GoodbyeReason` after a server goodbye, as the
//! contract maps it.

use std::{
    error::Error as StdError,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::{
    tungstenite::{
        self,
        error::{CapacityError, ProtocolError},
        handshake::derive_accept_key,
        protocol::{frame::coding::CloseCode, CloseFrame, Role, WebSocketConfig},
        Message,
    },
    WebSocketStream,
};
use tonic::{Code, Status};
use tower::Service;
use tracing::debug;

use super::{http_status, text, WebBody, WebEndpoint};
use crate::{
    liveness::{LivenessBody, LivenessHandle},
    protocol::{
        grpc::{self, Deframer, HEARTBEAT_PATH},
        json,
        pb::{self, heartbeat_response::Frame as Out},
        text::truncate,
        CloseReason,
    },
    server::{
        connection::PeerInfo,
        heartbeat::{BridgedCall, RefusedFrame},
        session::StrikeCounter,
        SessionBody,
    },
};

/// The subprotocol of binary messages, each one encoded frame.
const PROTO: &str = "heartbeat.v1.proto";
/// The subprotocol of text messages, each one frame in proto3 JSON.
const JSON: &str = "heartbeat.v1.json";
/// How a browser passes a bearer token, which it cannot set as a header.
const BEARER_PREFIX: &str = "bearer.";

/// The most bytes a close frame's reason may have (125 less the code).
const CLOSE_REASON_BYTES: usize = 123;

/// Client frames waiting for the session: one is in hand while the next is
/// read, so a client that floods waits on its own socket.
const INBOUND_QUEUE: usize = 2;

/// How long the writer waits for the client's side of the closing handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Which of the two subprotocols a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subprotocol {
    Proto,
    Json,
}

type Inbound = mpsc::Sender<Result<Frame<Bytes>, Box<dyn StdError + Send + Sync>>>;

/// Checks the upgrade, admits the session, and answers `101 Switching
/// Protocols`; the bridge then runs in a task of its own.
pub(super) async fn upgrade(
    endpoint: Arc<WebEndpoint>,
    request: Request<Incoming>,
    peer: PeerInfo,
) -> Response<WebBody> {
    let headers = request.headers();
    let Some(key) = websocket_key(headers) else {
        let mut response = text(
            StatusCode::BAD_REQUEST,
            "this endpoint is a WebSocket: open it with new WebSocket(url, [\"heartbeat.v1.proto\"]) or send an HTTP/1.1 upgrade (Connection: Upgrade, Upgrade: websocket, Sec-WebSocket-Version: 13, Sec-WebSocket-Key)\n",
        );
        response
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return response;
    };
    if let Err(refusal) = endpoint.check_origin(headers) {
        return text(StatusCode::FORBIDDEN, refusal);
    }
    let (subprotocol, token) = match offered(headers) {
        Ok(offer) => offer,
        Err(problem) => return text(StatusCode::BAD_REQUEST, problem),
    };
    let hold = match peer.connection.hold_stream() {
        Ok(hold) => hold,
        Err(limit) => return refused(&Status::resource_exhausted(limit.refusal())),
    };

    // The same call a gRPC client makes, in-process.
    let (inbound, frames) = mpsc::channel(INBOUND_QUEUE);
    let mut call = Request::new(tonic::body::Body::new(StreamBody::new(
        ReceiverStream::new(frames),
    )));
    *call.method_mut() = http::Method::POST;
    *call.uri_mut() = http::Uri::from_static(HEARTBEAT_PATH);
    call.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let authorization = match token {
        Some(token) => HeaderValue::try_from(format!("Bearer {token}")).ok(),
        None => headers.get(header::AUTHORIZATION).cloned(),
    };
    if let Some(authorization) = authorization {
        call.headers_mut()
            .insert(header::AUTHORIZATION, authorization);
    }
    call.extensions_mut().insert(peer.clone());
    call.extensions_mut().insert(BridgedCall);
    let Ok(response) = endpoint.heartbeat.clone().call(call).await;
    if let Some(status) = Status::from_header_map(response.headers()) {
        return refused(&status);
    }
    let Some(handle) = response.extensions().get::<LivenessHandle>().cloned() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the session did not start; this is a defect of the server\n",
        );
    };
    let mut switching = Response::new(super::full(Bytes::new()));
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let answer = switching.headers_mut();
    answer.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    answer.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::try_from(derive_accept_key(key.as_bytes())) {
        answer.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    answer.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(match subprotocol {
            Subprotocol::Proto => PROTO,
            Subprotocol::Json => JSON,
        }),
    );

    let config = &endpoint.shared.config;
    let limit = config.limits.max_message_size as usize;
    let send_timeout = config.timeout;
    let client = ClientSide {
        handle,
        subprotocol,
        strikes: StrikeCounter::new(config),
        welcomed: Arc::new(AtomicBool::new(false)),
    };
    let body = response.into_body();
    let mut forced = endpoint.forced.clone();
    tokio::spawn(async move {
        // Held for the socket's life: the connection is busy, and the
        // listener's drain waits for it.
        let _held = (hold, endpoint);
        let upgraded = match hyper::upgrade::on(request).await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                // Dropping the call ends the session as disconnected.
                debug!(peer = %peer.remote_addr, %error, "WebSocket upgrade failed");
                return;
            }
        };
        let config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_write_buffer_size(64 * 1024)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        tokio::select! {
            () = bridge(socket, body, inbound, client, send_timeout) => {}
            // Past the shutdown grace, a socket still open is dropped.
            () = super::stop_requested(&mut forced) => {}
        }
    });
    switching
}

/// The `Sec-WebSocket-Key` of a well-formed upgrade request.
fn websocket_key(headers: &HeaderMap) -> Option<&HeaderValue> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    };
    let upgrade =
        has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket");
    let version = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|version| version.as_bytes() == b"13");
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| upgrade && version)
}

/// The subprotocol to speak (the client's first of ours) and the bearer
/// token it passed among them, if any.
fn offered(headers: &HeaderMap) -> Result<(Subprotocol, Option<String>), String> {
    let mut chosen = None;
    let mut token = None;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        for offer in String::from_utf8_lossy(value.as_bytes()).split(',') {
            let offer = offer.trim();
            match offer {
                PROTO if chosen.is_none() => chosen = Some(Subprotocol::Proto),
                JSON if chosen.is_none() => chosen = Some(Subprotocol::Json),
                _ => {
                    if let Some(value) = offer.strip_prefix(BEARER_PREFIX) {
                        token = Some(value.to_owned());
                    }
                }
            }
        }
    }
    match chosen {
        Some(chosen) => Ok((chosen, token)),
        None => Err(format!(
            "ask for a subprotocol: {PROTO} (binary messages, each one encoded frame) or {JSON} (text messages, each one frame in proto3 JSON), as in new WebSocket(url, [\"{PROTO}\"])\n"
        )),
    }
}

/// The HTTP answer to an upgrade the service refused before any frame, as
/// the contract maps it: 401 for credentials, 503 for capacity and drain.
fn refused(status: &Status) -> Response<WebBody> {
    let code = http_status(status.code());
    let mut message = format!("{}\n", status.message());
    if code == StatusCode::UNAUTHORIZED {
        message.push_str("From a browser, pass the token as a subprotocol: new WebSocket(url, [\"heartbeat.v1.proto\", \"bearer.\" + token])\n");
    }
    let mut response = text(code, message);
    if code == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// What the reader knows of its client.
struct ClientSide {
    /// The call, to report WebSocket pings as liveness.
    handle: LivenessHandle,
    subprotocol: Subprotocol,
    /// The rate rule, applied to WebSocket pings.
    strikes: StrikeCounter,
    /// Set by the writer once the Welcome went out: before it, the socket's
    /// pings prove nothing, and the Hello deadline must hold.
    welcomed: Arc<AtomicBool>,
}

/// Runs one session's socket until the call ends and the socket closes.
async fn bridge(
    socket: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    body: LivenessBody<SessionBody>,
    inbound: Inbound,
    client: ClientSide,
    send_timeout: Duration,
) {
    let (mut sink, stream) = socket.split();
    let (subprotocol, welcomed) = (client.subprotocol, client.welcomed.clone());
    let mut reader = tokio::spawn(read_client(stream, inbound, client));
    let close = write_session(&mut sink, body, subprotocol, &welcomed, send_timeout).await;
    if let Some(close) = close {
        let sent = tokio::time::timeout(send_timeout, sink.send(Message::Close(Some(close)))).await;
        if matches!(sent, Ok(Ok(()))) {
            // The client answers with its close; then the reader ends.
            let _ = tokio::time::timeout(CLOSE_LINGER, &mut reader).await;
        }
    }
    reader.abort();
}

/// Feeds the client's messages to the session until the client closes, the
/// connection drops, or a message cannot be taken.
async fn read_client(
    mut stream: futures_util::stream::SplitStream<
        WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    >,
    inbound: Inbound,
    mut client: ClientSide,
) {
    let subprotocol = client.subprotocol;
    loop {
        let frame = match stream.next().await {
            Some(Ok(Message::Binary(payload))) => {
                frame_request(subprotocol, Payload::Binary(payload))
            }
            Some(Ok(Message::Text(text))) => {
                frame_request(subprotocol, Payload::Text(Bytes::from(text)))
            }
            // The transport's own keepalive proves an open session alive
            // too, under the rate rule, since tungstenite answers each one.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                let (_, over) = client.strikes.record(tokio::time::Instant::now());
                if over {
                    Err(refusal(
                        CloseReason::TooManyPings,
                        client.strikes.exceeded("WebSocket pings"),
                    ))
                } else {
                    if client.welcomed.load(Ordering::Acquire) {
                        client.handle.heard();
                    }
                    continue;
                }
            }
            // A browser closing or leaving the page says "going away"
            // (1001) for every socket on it: the client did not end its
            // session, its page went away, as a killed process's does.
            Some(Ok(Message::Close(Some(close)))) if close.code == CloseCode::Away => {
                Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the page went away (close code 1001)",
                )) as Box<dyn StdError + Send + Sync>)
            }
            // Any other close frame: the session's request ends (a
            // half-close, or after a Goodbye, nothing).
            Some(Ok(Message::Close(_))) => break,
            // Only produced when writing raw frames.
            Some(Ok(Message::Frame(_))) => continue,
            Some(Err(error)) => Err(read_error(error)),
            None => break,
        };
        let failed = frame.is_err();
        if inbound.send(frame).await.is_err() || failed {
            break;
        }
    }
    drop(inbound);
    // Reading on until the client closes completes the closing handshake,
    // and leaves no unread data that would make the kernel reset the
    // connection before the goodbye and the close frame reach the client.
    while let Some(Ok(_)) = stream.next().await {}
}

/// A failed request that ends the session for `reason`.
fn refusal(reason: CloseReason, message: String) -> Box<dyn StdError + Send + Sync> {
    Box::new(RefusedFrame { reason, message })
}

/// A client message, as it arrived.
enum Payload {
    Binary(Bytes),
    Text(Bytes),
}

/// One client message as a framed `HeartbeatRequest` for the session.
fn frame_request(
    subprotocol: Subprotocol,
    payload: Payload,
) -> Result<Frame<Bytes>, Box<dyn StdError + Send + Sync>> {
    let malformed = |problem: String| refusal(CloseReason::ProtocolViolation, problem);
    match (subprotocol, payload) {
        (Subprotocol::Proto, Payload::Binary(payload)) => {
            let mut framed = BytesMut::with_capacity(5 + payload.len());
            framed.put_u8(0);
            // The socket's message limit is far below 4 GiB.
            framed.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            framed.put_slice(&payload);
            Ok(Frame::data(framed.freeze()))
        }
        (Subprotocol::Json, Payload::Text(text)) => {
            json::from_json::<pb::HeartbeatRequest>(json::names::HEARTBEAT_REQUEST, &text)
                .map(|request| Frame::data(grpc::frame(&request)))
                .map_err(|error| malformed(format!("a text message is not a HeartbeatRequest: {error}")))
        }
        (Subprotocol::Proto, Payload::Text(_)) => Err(malformed(format!(
            "a text message on {PROTO}: send each frame as a binary message holding one encoded HeartbeatRequest"
        ))),
        (Subprotocol::Json, Payload::Binary(_)) => Err(malformed(format!(
            "a binary message on {JSON}: send each frame as a text message holding one HeartbeatRequest in proto3 JSON"
        ))),
    }
}

/// What a failed read means for the session: a message over the limit,
/// text that is not UTF-8 or broken WebSocket framing is the client's
/// violation; anything else means the connection is gone.
fn read_error(error: tungstenite::Error) -> Box<dyn StdError + Send + Sync> {
    let violation = |problem| refusal(CloseReason::ProtocolViolation, problem);
    match error {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
            violation(format!(
                "a message of {size} bytes; the limit is {max_size}"
            ))
        }
        tungstenite::Error::Capacity(problem) => violation(problem.to_string()),
        tungstenite::Error::Utf8(problem) => {
            violation(format!("a text message that is not UTF-8: {problem}"))
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the connection closed without a close frame",
            ))
        }
        tungstenite::Error::Protocol(problem) => {
            violation(format!("broken WebSocket framing: {problem}"))
        }
        other => Box::new(std::io::Error::other(other.to_string())),
    }
}

/// Sends the session's frames until the call ends; the close frame to send
/// then, or `None` when the client is gone.
async fn write_session(
    sink: &mut futures_util::stream::SplitSink<
        WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
        Message,
    >,
    mut body: LivenessBody<SessionBody>,
    subprotocol: Subprotocol,
    welcomed: &AtomicBool,
    send_timeout: Duration,
) -> Option<CloseFrame> {
    let mut deframer = Deframer::default();
    let mut goodbye = None;
    loop {
        let Some(Ok(frame)) = body.frame().await else {
            // Ended without trailers: nothing more is known.
            return Some(close_frame(goodbye.as_ref(), None));
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                let status = frame
                    .into_trailers()
                    .ok()
                    .and_then(|trailers| Status::from_header_map(&trailers));
                return Some(close_frame(goodbye.as_ref(), status.as_ref()));
            }
        };
        deframer.push(data);
        while let Some(Ok(message)) = deframer.next_message() {
            let Ok(response) = pb::HeartbeatResponse::decode(message.clone()) else {
                continue;
            };
            // The goodbye that explains the end is the last frame before it:
            // a rotation's ask is followed by pings while the grace runs.
            match &response.frame {
                Some(Out::Goodbye(said)) => goodbye = Some(said.clone()),
                Some(Out::Welcome(_)) => welcomed.store(true, Ordering::Release),
                _ => goodbye = None,
            }
            let message = match subprotocol {
                Subprotocol::Proto => Message::Binary(message),
                Subprotocol::Json => {
                    Message::Text(json::to_json(json::names::HEARTBEAT_RESPONSE, &response).into())
                }
            };
            // A client that stops reading holds the writer here; past the
            // session's timeout it is dropped.
            match tokio::time::timeout(send_timeout, sink.send(message)).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }
}

/// The close frame for a session's end: after a server goodbye, `4000 +
/// reason` with its message; after the client's own end, 1000; a Hello its
/// credential does not allow (no goodbye, `PERMISSION_DENIED`), 1008;
/// anything else, 1011.
fn close_frame(goodbye: Option<&pb::Goodbye>, status: Option<&Status>) -> CloseFrame {
    let (code, reason) = match (goodbye, status) {
        // An OK status is the client's own end, whatever the server said
        // before it (a rotation's ask, say): no goodbye explains it.
        (_, Some(status)) if status.code() == Code::Ok => (CloseCode::Normal, ""),
        (Some(goodbye), _) => (
            CloseCode::from(4000 + u16::try_from(goodbye.reason).unwrap_or(0).min(999)),
            goodbye.message.as_str(),
        ),
        (None, Some(status)) if status.code() == Code::PermissionDenied => {
            (CloseCode::Policy, status.message())
        }
        (None, status) => (CloseCode::Error, status.map_or("", Status::message)),
    };
    CloseFrame {
        code,
        reason: truncate(reason, CLOSE_REASON_BYTES).to_owned().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests the close codes: 4000 + reason after a goodbye, with its message
    /// cut to 123 bytes at a character boundary; 1000, 1008 and 1011 without.
    #[test]
    fn close_codes_follow_the_goodbye() {
        let goodbye = pb::Goodbye {
            reason: pb::GoodbyeReason::Replaced as i32,
            message: "é".repeat(100),
            reconnect_after: None,
        };
        let close = close_frame(Some(&goodbye), Some(&Status::aborted("x")));
        assert_eq!(u16::from(close.code), 4007);
        assert_eq!(close.reason.len(), 122, "cut at a boundary");
        let code = |status: Status| u16::from(close_frame(None, Some(&status)).code);
        assert_eq!(code(Status::ok("")), 1000);
        assert_eq!(code(Status::permission_denied("no")), 1008);
        assert_eq!(code(Status::internal("?")), 1011);
    }

    /// Tests subprotocol choice: the client's first of ours, with a bearer
    /// token picked out, and a clear refusal without either.
    #[test]
    fn subprotocols_are_chosen_in_the_clients_order() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat, heartbeat.v1.json, bearer.s3cret, heartbeat.v1.proto"),
        );
        let (chosen, token) = offered(&headers).expect("offered");
        assert_eq!(chosen, Subprotocol::Json);
        assert_eq!(token.as_deref(), Some("s3cret"));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        let problem = offered(&headers).expect_err("neither");
        assert!(problem.contains("heartbeat.v1.proto"), "{problem}");
    }
}
